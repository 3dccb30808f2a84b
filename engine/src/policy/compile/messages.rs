//! `messages`: size, depth, rate and invalid-message limits, the message types with their
//! schemas and `allow`, and the rules of `messages.rules` attached to the types they apply to.

use std::collections::HashMap;
use std::sync::Arc;

use super::bounds::{LIMIT_VARS, MAX_MESSAGE_BYTES, MESSAGE_VARS, MILLIS, SECS};
use super::driver::Compiler;
use crate::policy::compiled::{Limit, MessagePolicy, MessageType, RatePolicy, Rule, RuleKind};
use crate::policy::error::{At, strip_position};
use crate::policy::expr::vars::Var;
use crate::policy::model::{MessagesSection, RuleAction, RuleMode, TypeAllow};

impl Compiler<'_> {
    pub(super) fn messages(
        &mut self,
        file: &str,
        m: &MessagesSection,
        schemas: &HashMap<String, Arc<jsonschema::Validator>>,
    ) -> Option<MessagePolicy> {
        let max_bytes = self.limit(file, "messages.max_bytes", &m.max_bytes, LIMIT_VARS, 16..=MAX_MESSAGE_BYTES);
        if let Some(Limit::Literal(n)) = &max_bytes {
            self.sizes.message = *n;
        }
        let max_depth = self.limit(file, "messages.max_depth", &m.max_depth, LIMIT_VARS, 1..=128);
        let r = &m.rate.value;
        let rate_max = self.limit(file, "messages.rate.max", &r.max, LIMIT_VARS, 1..=1_000_000);
        let rate_per = self.limit(file, "messages.rate.per", &r.per, LIMIT_VARS, MILLIS(10)..=SECS(3600));
        let max_invalid = self.limit(file, "messages.max_invalid", &m.max_invalid, LIMIT_VARS, 0..=1_000_000);

        let mut names = HashMap::new();
        self.unique_names(file, "messages.rules", &m.rules, &mut names);
        let mut global = Vec::new();
        for (i, spec) in m.rules.iter().enumerate() {
            if let Some(types) = &spec.types {
                for (j, t) in types.iter().enumerate() {
                    if !m.types.contains_key(t) {
                        self.errors.push(
                            &At::of(file, format!("messages.rules[{i}].types[{j}]"), &spec.name),
                            "not a message type defined in messages.types",
                        );
                    }
                }
            }
            let at = At::of(file, format!("messages.rules[{i}]"), &spec.name);
            if let Some(rule) = self.rule(&at, spec, MESSAGE_VARS, true) {
                global.push((spec.types.clone(), Arc::new(rule)));
            }
        }

        let mut types = HashMap::new();
        for (name, spec) in &m.types {
            let path = format!("messages.types.{name}");
            if !valid_type_name(name) {
                self.errors.push(
                    &At::of(file, path.as_str(), spec),
                    "a message type name is 1–64 characters of letters, digits, `_`, `-`, `.` or `:`",
                );
            }
            let t = &spec.value;
            let schema_file = format!("schemas/{}", t.schema.value.trim_start_matches("schemas/"));
            let schema = schemas.get(&schema_file).cloned();
            if schema.is_none() && !self.source.schemas.iter().any(|f| f.name == schema_file) {
                self.errors.push(
                    &At::of(file, format!("{path}.schema"), &t.schema),
                    "no such file in the policy directory's schemas/",
                );
            }
            let mut rules = Vec::new();
            if let Some(allow) = &t.allow {
                let rule_name = format!("{name}.allow");
                let at = At::of(file, format!("{path}.allow"), allow);
                if names.contains_key(&rule_name) {
                    self.errors.push(&at, format!("rule name `{rule_name}` is also used in messages.rules"));
                }
                let (text, mode, action, reason) = match &allow.value {
                    TypeAllow::Expr(e) => (e.as_str(), RuleMode::Enforce, RuleAction::Reject, None),
                    TypeAllow::Rule(r) => (r.expr.as_str(), r.mode, r.action, r.reason.clone()),
                };
                if let Some(expr) = self.expr(&at, text, MESSAGE_VARS) {
                    rules.push(Arc::new(Rule {
                        reason: reason.unwrap_or_else(|| format!("{name} is not allowed")).into(),
                        name: rule_name.into(),
                        kind: RuleKind::Allow,
                        expr,
                        mode,
                        action,
                    }));
                }
            }
            for (applies, rule) in &global {
                if applies.as_ref().is_none_or(|ts| ts.iter().any(|x| x == name)) {
                    rules.push(rule.clone());
                }
            }
            let reads = |v: Var| rules.iter().any(|r| r.expr.uses.contains(v));
            let (reads_message, reads_now) = (reads(Var::Message), reads(Var::Now));
            if let Some(schema) = schema {
                types.insert(name.clone(), MessageType { schema_file, schema, rules, reads_message, reads_now });
            }
        }
        Some(MessagePolicy {
            max_bytes: max_bytes?,
            max_depth: max_depth?,
            rate: RatePolicy { max: rate_max?, per: rate_per?, action: r.action },
            binary: m.binary,
            max_invalid: max_invalid?,
            types,
        })
    }

    /// Compiles every file in `schemas/`, referenced or not: a broken schema is an error even
    /// before a type uses it. No `$ref` is ever fetched (no network, no file system), and
    /// `pattern` uses a linear-time regex engine.
    pub(super) fn compile_schemas(&mut self) -> HashMap<String, Arc<jsonschema::Validator>> {
        let mut out = HashMap::new();
        for file in &self.source.schemas {
            let json: serde_json::Value = match serde_json::from_str(&file.text) {
                Ok(v) => v,
                Err(e) => {
                    self.errors.push(
                        &At::in_file(&file.name, e.line(), e.column()),
                        format!("not valid JSON: {}", strip_position(&e.to_string())),
                    );
                    continue;
                }
            };
            let built =
                jsonschema::options().offline().with_pattern_options(jsonschema::PatternOptions::regex()).build(&json);
            match built {
                Ok(v) => {
                    out.insert(file.name.clone(), Arc::new(v));
                }
                Err(e) => {
                    let at = e.schema_path().to_string();
                    let path = if at.is_empty() { String::new() } else { format!("schema {at}") };
                    let at = At { file: &file.name, path, line: 1, col: 1 };
                    self.errors.push(&at, format!("invalid JSON Schema: {}", schema_message(&e)));
                }
            }
        }
        out
    }
}

/// What is wrong with a schema, by keyword and place: jsonschema's own message quotes the
/// offending value (and a `$ref`'s address).
fn schema_message(e: &jsonschema::ValidationError<'_>) -> String {
    match e.kind() {
        jsonschema::error::ValidationErrorKind::Referencing(_) => {
            "a `$ref` that does not resolve inside this schema (nothing is ever fetched)".to_string()
        }
        kind => {
            let at = e.instance_path().to_string();
            format!("`{}` does not hold at `{}`", kind.keyword(), if at.is_empty() { "/" } else { &at })
        }
    }
}

fn valid_type_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}
