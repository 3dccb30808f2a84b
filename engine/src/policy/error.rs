//! Policy errors: every problem found while loading or compiling a policy, each pointing at
//! the file, line and column it comes from, and the key path inside the document.
//!
//! An error never repeats a value from a file. Policy errors are printed by `policy check`,
//! logged, and shown by `GET /v1/policy` (which needs no token), and a value in a policy can be
//! a secret pasted into the wrong key. So an error says where (file, position, key path) and
//! what was expected; the messages of the parsers, which quote the offending value, are
//! rewritten here ([`yaml_message`], [`cel_syntax_message`]).

use std::fmt;

use super::model::Located;

/// One problem in a policy directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    /// The file, relative to the policy directory (or the directory itself for
    /// directory-level problems).
    pub file: String,
    /// 1-based line; 0 when the problem has no single place (a missing file, say).
    pub line: usize,
    /// 1-based column; 0 when unknown.
    pub col: usize,
    /// Dotted key path inside the document (`messages.types.publish.allow`); empty when the
    /// problem is the file as a whole.
    pub path: String,
    /// What is wrong, for a security engineer to act on.
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line.max(1), self.col.max(1))?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// Every problem found in one policy directory; a policy with any of them is refused whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

/// Where a value of a policy is: what every [`PolicyError`] points at. Line and column are 0
/// for a value written nowhere (a default), or a problem with no single place.
#[derive(Debug, Clone)]
pub(crate) struct At<'a> {
    pub(crate) file: &'a str,
    pub(crate) path: String,
    pub(crate) line: usize,
    pub(crate) col: usize,
}

impl<'a> At<'a> {
    /// Where `value`, under the key `path` of `file`, was written.
    pub(crate) fn of<T>(file: &'a str, path: impl Into<String>, value: &Located<T>) -> At<'a> {
        At { file, path: path.into(), line: value.line, col: value.col }
    }

    /// The same place, under the longer key `path` + `suffix`.
    pub(crate) fn under(&self, suffix: &str) -> At<'a> {
        At { path: format!("{}{suffix}", self.path), ..self.clone() }
    }

    /// The file as a whole, at `line:col` (a parser's position, or 0:0).
    pub(crate) fn in_file(file: &'a str, line: usize, col: usize) -> At<'a> {
        At { file, path: String::new(), line, col }
    }
}

/// Collects errors while compiling, so that one run reports every problem, not the first.
#[derive(Debug, Default)]
pub(crate) struct ErrorSink {
    errors: Vec<PolicyError>,
}

impl ErrorSink {
    pub(crate) fn push(&mut self, at: &At<'_>, message: impl Into<String>) {
        self.errors.push(PolicyError {
            file: at.file.to_string(),
            line: at.line,
            col: at.col,
            path: at.path.clone(),
            message: message.into(),
        });
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    /// The errors, or `Ok` when there were none.
    pub(crate) fn finish(self) -> Result<(), PolicyErrors> {
        if self.errors.is_empty() { Ok(()) } else { Err(PolicyErrors(self.errors)) }
    }
}

/// serde-saphyr's message for a document that does not parse: what was expected and what kind
/// of thing was found, never the value (`unknown variant `…`` becomes `unknown variant`). Key
/// names (an unknown or missing field, a duplicate key) are kept: they are the key path.
pub(crate) fn yaml_message(e: &serde_saphyr::Error) -> String {
    use serde_saphyr::Error as E;
    let e = e.without_snippet();
    match e {
        E::SerdeInvalidType { unexpected, expected, .. } => {
            format!("invalid type: {}, expected {expected}", kind_only(unexpected))
        }
        E::SerdeInvalidValue { unexpected, expected, .. } => {
            format!("invalid value: {}, expected {expected}", kind_only(unexpected))
        }
        E::SerdeUnknownVariant { expected, .. } => format!("unknown variant, expected one of {}", expected.join(", ")),
        E::NonFiniteFloat { .. } => "a number that is not finite".to_string(),
        E::SerdeUnknownField { .. }
        | E::SerdeMissingField { .. }
        | E::DuplicateMappingKey { .. }
        | E::SerdeInvalidLength { .. } => strip_position(&e.to_string()),
        // Anything else is the parser's own text; quoted parts of it may be values.
        _ => without_quoted(&strip_position(&e.to_string())),
    }
}

/// A CEL syntax error: its position in the expression and the parser's message with quoted
/// tokens other than operators left out (a token can be a string literal), never the line of
/// source the parser prints under it.
pub(crate) fn cel_syntax_message(errors: &cel::ParseErrors) -> String {
    match errors.errors.first() {
        Some(e) => format!(
            "CEL syntax error at line {}, column {} of the expression: {}",
            e.pos.0,
            e.pos.1 + 1,
            without_quoted(&e.msg.split_whitespace().collect::<Vec<_>>().join(" "))
        ),
        None => "CEL syntax error".to_string(),
    }
}

/// `string "abc"` → `string`; `integer `5`` → `integer`: serde's description of what was found,
/// without the value it quotes.
fn kind_only(unexpected: &str) -> String {
    let cut = unexpected.find([' ', '\t']).filter(|&i| unexpected[i..].trim_start().starts_with(['"', '`', '\'']));
    let kind = cut.map_or(unexpected, |i| &unexpected[..i]);
    if kind.len() > 40 { "a value of another type".to_string() } else { kind.to_string() }
}

/// Replaces each quoted part (`…`, "…", '…') that is more than punctuation or a CEL keyword
/// (an operator, a bracket, `true`, `<EOF>` stay: they say what the parser expected) with `…`.
fn without_quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(['"', '`', '\'']) {
        let quote = rest[start..].chars().next().unwrap_or('"');
        let body_start = start + quote.len_utf8();
        let Some(len) = rest[body_start..].find(quote) else { break };
        let body = &rest[body_start..body_start + len];
        out.push_str(&rest[..start]);
        let harmless = matches!(body, "<EOF>" | "true" | "false" | "null" | "in")
            || (body.len() <= 3 && body.chars().all(|c| c.is_ascii_punctuation()));
        out.push(quote);
        out.push_str(if harmless { body } else { "…" });
        out.push(quote);
        rest = &rest[body_start + len + quote.len_utf8()..];
    }
    out.push_str(rest);
    out
}

/// The first line of a parser's message, without the ` at line L column C` it ends with (the
/// position is printed in front of every error).
pub(crate) fn strip_position(message: &str) -> String {
    let first = message.lines().next().unwrap_or_default();
    match first.rfind(" at line ") {
        Some(i) => first[..i].to_string(),
        None => first.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_values_are_left_out_and_operators_kept() {
        assert_eq!(kind_only("string \"SECRET\""), "string");
        assert_eq!(kind_only("integer `7`"), "integer");
        assert_eq!(kind_only("sequence"), "sequence");
        assert_eq!(
            without_quoted("extraneous input '\"SECRET\"' expecting {'&&', <EOF>} at 'x'"),
            "extraneous input '…' expecting {'&&', <EOF>} at '…'"
        );
        assert_eq!(without_quoted("mismatched input '<EOF>'"), "mismatched input '<EOF>'");
        assert_eq!(without_quoted("expecting {'true', 'x1'}"), "expecting {'true', '…'}");
        assert_eq!(without_quoted("an unclosed `quote"), "an unclosed `quote");
    }
}
