//! Policy errors: every problem found while loading or compiling a policy, each pointing at
//! the file, line and column it comes from, and the key path inside the document.

use std::fmt;

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

/// Collects errors while compiling, so that one run reports every problem, not the first.
#[derive(Debug, Default)]
pub struct ErrorSink {
    errors: Vec<PolicyError>,
}

impl ErrorSink {
    /// Records a problem at `file:line:col`, under the key `path`.
    pub fn push(&mut self, file: &str, path: &str, line: usize, col: usize, message: impl Into<String>) {
        self.errors.push(PolicyError {
            file: file.to_string(),
            line,
            col,
            path: path.to_string(),
            message: message.into(),
        });
    }

    /// Whether nothing went wrong so far.
    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    /// The errors, or `Ok` when there were none.
    pub fn finish(self) -> Result<(), PolicyErrors> {
        if self.errors.is_empty() { Ok(()) } else { Err(PolicyErrors(self.errors)) }
    }
}
