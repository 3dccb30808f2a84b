//! Rules, as connect rules (`auth.rules`) and message rules (`messages.rules`) share them: one
//! of `deny` or `allow`, a name unique in its list, and keys only message rules may have.

use std::collections::HashMap;

use super::driver::Compiler;
use crate::policy::compiled::{Rule, RuleKind};
use crate::policy::error::At;
use crate::policy::expr::vars::VarSet;
use crate::policy::model::RuleSpec;

impl Compiler<'_> {
    /// The rule at `at` (its place is its name's).
    pub(super) fn rule(&mut self, at: &At<'_>, spec: &RuleSpec, vars: VarSet, message_rule: bool) -> Option<Rule> {
        if !message_rule && spec.action.is_some() {
            self.errors
                .push(&at.under(".action"), "connect rules have no `action`: a refused handshake always gets 403");
        }
        if !message_rule && spec.types.is_some() {
            self.errors.push(&at.under(".types"), "`types` belongs to message rules only");
        }
        let name = spec.name.value.trim();
        if name.is_empty() {
            self.errors.push(&at.under(".name"), "a rule needs a name");
        }
        let (kind, text) = match (&spec.deny, &spec.allow) {
            (Some(deny), None) => (RuleKind::Deny, deny),
            (None, Some(allow)) => (RuleKind::Allow, allow),
            _ => {
                self.errors.push(at, "a rule has exactly one of `deny` or `allow`");
                return None;
            }
        };
        let key = if kind == RuleKind::Deny { "deny" } else { "allow" };
        let expr = self.expr(&At::of(at.file, format!("{}.{key}", at.path), text), &text.value, vars)?;
        Some(Rule {
            name: name.into(),
            kind,
            expr,
            mode: spec.mode,
            action: spec.action.unwrap_or_default(),
            reason: spec.reason.clone().unwrap_or_else(|| name.to_string()).into(),
        })
    }

    /// Refuses a rule whose name an earlier rule of `seen` (this list, or lists checked
    /// before it) already has: decision logs, metrics and policy tests tell rules by name.
    pub(super) fn unique_names<'r>(
        &mut self,
        file: &str,
        path: &str,
        rules: impl IntoIterator<Item = &'r RuleSpec>,
        seen: &mut HashMap<String, String>,
    ) {
        for (i, r) in rules.into_iter().enumerate() {
            let name = r.name.value.trim().to_string();
            if let Some(other) = seen.insert(name, format!("{path}[{i}]")) {
                let at = At::of(file, format!("{path}[{i}].name"), &r.name);
                self.errors.push(&at, format!("this name is already used by {other}"));
            }
        }
    }
}
