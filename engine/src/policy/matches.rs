//! `matches` with a regex compiled once, at load: the pattern table of an expression, the
//! rewrite of its `matches` calls, and the function they call instead.
//!
//! The standard `matches` compiles its pattern on every call (milliseconds for a large one) and
//! takes the pattern as a value, so it could come from a message. A policy's patterns are
//! literals (the checker in `expr.rs` refuses anything else); each is compiled here under
//! [`MAX_REGEX_BYTES`], and the call is rewritten to `@matches(text, index)`. Environment
//! functions are plain function pointers, so an evaluation makes its expression's regexes
//! visible to that function through a thread-local for its duration ([`RegexScope`]).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use cel::common::ast::{EntryExpr, Expr as Node, LiteralValue};
use cel::common::types::{CelBool, CelInt, CelString, INT_TYPE, STRING_TYPE};
use cel::common::value::CowVal;
use cel::{ExecutionError, IdedExpr};
use regex::Regex;

use super::expr::error::ExprError;

/// Largest compiled form of one regular expression (`regex`'s `size_limit`), and of its lazy
/// DFA cache: a pattern that needs more makes the policy invalid. Counted repetitions of large
/// classes (`[\w\s]{1,500}`, Unicode `\w` is hundreds of ranges) are what hit it.
pub(crate) const MAX_REGEX_BYTES: usize = 1024 * 1024;

/// Adds the function rewritten `matches` calls run to a policy's CEL environment.
pub(crate) fn register(env: &mut cel::Env) {
    env.add_overload(COMPILED, "wsgate_matches_compiled", vec![STRING_TYPE, INT_TYPE], compiled_matches)
        .expect("the name is not a standard function");
}

/// What `matches` calls become. The parser never yields a name starting with `@` from policy
/// text, so no expression can call it with an index of its own.
pub(crate) const COMPILED: &str = "@matches";

thread_local! {
    /// The regexes of the expression this thread is evaluating. Environment functions are plain
    /// function pointers, so this is how [`compiled_matches`] reaches them.
    static EVALUATING: RefCell<Option<Arc<[Regex]>>> = const { RefCell::new(None) };
}

/// Makes an expression's regexes visible to [`compiled_matches`] for one evaluation, and puts
/// back what was there before (even when the evaluation panics).
pub(crate) struct RegexScope(Option<Arc<[Regex]>>);

impl RegexScope {
    pub(crate) fn enter(regexes: &Arc<[Regex]>) -> RegexScope {
        RegexScope(EVALUATING.with_borrow_mut(|slot| slot.replace(regexes.clone())))
    }
}

impl Drop for RegexScope {
    fn drop(&mut self) {
        let previous = self.0.take();
        EVALUATING.with_borrow_mut(|slot| *slot = previous);
    }
}

fn compiled_matches<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    let text = args.first().and_then(|a| a.downcast_ref::<CelString<'_>>().map(|s| s.inner()));
    let index = args.get(1).and_then(|a| a.downcast_ref::<CelInt>().map(|i| *i.inner()));
    let (Some(text), Some(index)) = (text, index) else {
        return Err(ExecutionError::function_error("matches", "expects a string"));
    };
    EVALUATING
        .with_borrow(|regexes| {
            let regex = regexes.as_ref()?.get(usize::try_from(index).ok()?)?;
            Some(regex.is_match(text))
        })
        .map(|matched| CowVal::owned(CelBool::from(matched)))
        .ok_or_else(|| ExecutionError::function_error("matches", "no compiled pattern"))
}

/// The regexes of one expression, each pattern compiled once however often it is used.
#[derive(Default)]
pub(crate) struct RegexTable {
    compiled: Vec<Regex>,
    index: HashMap<String, usize>,
}

impl RegexTable {
    /// Compiles `pattern` (once, however often it is used).
    pub(crate) fn add(&mut self, pattern: &str) -> Result<(), ExprError> {
        if self.index.contains_key(pattern) {
            return Ok(());
        }
        let regex = regex::RegexBuilder::new(pattern)
            .size_limit(MAX_REGEX_BYTES)
            .dfa_size_limit(MAX_REGEX_BYTES)
            .build()
            .map_err(|e| ExprError { message: regex_error(&e) })?;
        self.index.insert(pattern.to_string(), self.compiled.len());
        self.compiled.push(regex);
        Ok(())
    }

    /// Rewrites `tree`'s `matches` calls to use the compiled regexes, and hands them over.
    pub(crate) fn finish(self, tree: &mut IdedExpr) -> Arc<[Regex]> {
        if !self.compiled.is_empty() {
            use_compiled_regexes(tree, &self.index);
        }
        self.compiled.into()
    }
}

/// Why a pattern does not compile, without the pattern: `regex` quotes it in its message, and
/// nothing from a policy file is repeated in an error.
fn regex_error(e: &regex::Error) -> String {
    match e {
        regex::Error::CompiledTooBig(limit) => format!(
            "the regular expression of `matches` is too large once compiled (limit {limit} bytes): \
             use smaller counted repetitions or classes"
        ),
        regex::Error::Syntax(text) => {
            let kind = text.lines().rev().find_map(|l| l.trim().strip_prefix("error: "));
            format!("the regular expression of `matches` is invalid: {}", kind.unwrap_or("syntax error"))
        }
        _ => "the regular expression of `matches` does not compile".to_string(),
    }
}

/// Rewrites every `s.matches('p')` and `matches(s, 'p')` (the checker made sure `p` is a literal
/// it compiled) into `@matches(s, i)`, `i` being `p`'s place in the expression's regexes.
/// Recursion is safe: the depth bound has been checked.
fn use_compiled_regexes(node: &mut IdedExpr, index: &HashMap<String, usize>) {
    if let Node::Call(call) = &mut node.expr
        && call.func_name == "matches"
    {
        let mut args: Vec<IdedExpr> = call.target.take().map(|t| *t).into_iter().chain(call.args.drain(..)).collect();
        if let Some(pattern) = args.get_mut(1)
            && let Node::Literal(LiteralValue::String(p)) = &pattern.expr
            && let Some(i) = index.get(p.inner())
        {
            pattern.expr = Node::Literal(LiteralValue::Int(CelInt::from(*i as i64)));
        }
        call.func_name = COMPILED.to_string();
        call.args = args;
    }
    match &mut node.expr {
        Node::Call(call) => {
            if let Some(t) = call.target.as_deref_mut() {
                use_compiled_regexes(t, index);
            }
            call.args.iter_mut().for_each(|a| use_compiled_regexes(a, index));
        }
        Node::Comprehension(c) => {
            for part in [&mut c.iter_range, &mut c.accu_init, &mut c.loop_cond, &mut c.loop_step, &mut c.result] {
                use_compiled_regexes(part, index);
            }
        }
        Node::List(list) => list.elements.iter_mut().for_each(|e| use_compiled_regexes(e, index)),
        Node::Map(map) => map.entries.iter_mut().for_each(|e| entry_compiled_regexes(e, index)),
        Node::Struct(s) => s.entries.iter_mut().for_each(|e| entry_compiled_regexes(e, index)),
        Node::Select(select) => use_compiled_regexes(&mut select.operand, index),
        Node::Ident(_) | Node::Literal(_) | Node::Unspecified => {}
    }
}

fn entry_compiled_regexes(entry: &mut cel::common::ast::IdedEntryExpr, index: &HashMap<String, usize>) {
    match &mut entry.expr {
        EntryExpr::MapEntry(m) => {
            use_compiled_regexes(&mut m.key, index);
            use_compiled_regexes(&mut m.value, index);
        }
        EntryExpr::StructField(f) => use_compiled_regexes(&mut f.value, index),
    }
}

/// Whether no expression's regexes are visible on this thread (between evaluations).
#[cfg(test)]
pub(crate) fn evaluating_none() -> bool {
    EVALUATING.with_borrow(|r| r.is_none())
}
