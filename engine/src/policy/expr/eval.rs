//! A compiled expression and its evaluation: the CEL environment policies run in, and
//! run-time errors that name types, never values.

use std::fmt;
use std::sync::Arc;

use cel::objects::ValueType;
use cel::{Context, ExecutionError, IdedExpr, Value};
use regex::Regex;

use super::vars::VarSet;
use crate::policy::matches::{self, RegexScope};

/// A compiled, bounded CEL expression.
pub struct Expr {
    /// The expression as written, for messages and decision logs.
    pub source: Arc<str>,
    /// The parsed tree, with every `matches` rewritten to call one of `regexes`.
    pub(super) tree: IdedExpr,
    /// The regular expressions its `matches` calls use, compiled at load.
    pub(super) regexes: Arc<[Regex]>,
    /// The variables it reads, so callers bind only those.
    pub uses: VarSet,
    /// Its estimated worst-case cost.
    pub cost: u64,
}

impl fmt::Debug for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Expr").field("source", &self.source).field("cost", &self.cost).finish()
    }
}

/// The CEL environment policies run in: the standard library, plus the function that
/// `matches` calls are rewritten to. Build one per policy (it is the expensive part of a
/// context) and evaluate every [`Expr`] in a context made from it.
pub fn env() -> cel::Env {
    let mut env = cel::Env::stdlib();
    matches::register(&mut env);
    env
}

/// Why an evaluation did not produce a usable answer. Callers fail closed on it. The text names
/// the kind of failure and the types involved, never a value (see [`describe`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvalError(pub String);

impl fmt::Display for EvalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Expr {
    /// Evaluates in `ctx`. A panic inside the CEL interpreter is caught and becomes an error,
    /// so a policy can never take the process down.
    pub fn eval(&self, ctx: &Context<'_, '_>) -> Result<Value, EvalError> {
        let _regexes = (!self.regexes.is_empty()).then(|| RegexScope::enter(&self.regexes));
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ctx.resolve(&self.tree))) {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(EvalError(describe(&e))),
            Err(_) => Err(EvalError("the CEL interpreter failed on this expression".into())),
        }
    }

    /// Evaluates to a bool; anything else is an error.
    pub fn eval_bool(&self, ctx: &Context<'_, '_>) -> Result<bool, EvalError> {
        match self.eval(ctx)? {
            Value::Bool(b) => Ok(b),
            other => Err(EvalError(format!("expected a bool, got {}", type_name(other.type_of())))),
        }
    }
}

/// A run-time error by kind, with the names of functions and the types of operands only. The
/// interpreter's own messages print operand values (`Unsupported binary operator '_+_': Int(1),
/// String("…")`) and map keys, which can be claims, message fields or tokens.
pub fn describe(e: &ExecutionError) -> String {
    let ty = |v: &Value| type_name(v.type_of());
    let function = |f: &str| if f == matches::COMPILED { "matches".to_string() } else { f.to_string() };
    match e {
        ExecutionError::InvalidArgumentCount { expected, actual } => {
            format!("wrong number of arguments: expected {expected}, got {actual}")
        }
        ExecutionError::UnsupportedTargetType { target } => format!("unsupported target of type {}", ty(target)),
        ExecutionError::NotSupportedAsMethod { method, target } => {
            format!("`{}` is not a method of {}", function(method), ty(target))
        }
        ExecutionError::UnsupportedKeyType(v) => format!("a {} cannot be a map key", ty(v)),
        ExecutionError::UnexpectedType { got, want } => format!("unexpected type: got {got}, want {want}"),
        ExecutionError::NoSuchKey(_) => "no such key".to_string(),
        ExecutionError::NoSuchOverload(o) => {
            format!("no overload of `{}` for ({})", function(o.function()), o.argument_types().join(", "))
        }
        ExecutionError::UndeclaredReference(_) => "undeclared reference".to_string(),
        ExecutionError::MissingArgumentOrTarget => "missing argument or target".to_string(),
        ExecutionError::ValuesNotComparable(a, b) => format!("a {} cannot be compared to a {}", ty(a), ty(b)),
        ExecutionError::UnsupportedBinaryOperator(op, a, b) => {
            format!("operator `{op}` does not apply to {} and {}", ty(a), ty(b))
        }
        ExecutionError::UnsupportedIndex(index, target) => {
            format!("cannot index a {} with a {}", ty(target), ty(index))
        }
        ExecutionError::FunctionError { function: f, .. } => format!("`{}` failed", function(f)),
        ExecutionError::DivisionByZero(_) => "division by zero".to_string(),
        ExecutionError::RemainderByZero(_) => "remainder by zero".to_string(),
        ExecutionError::Overflow(op, _, _) => format!("overflow in `{op}`"),
        ExecutionError::IndexOutOfBounds(_) => "index out of bounds".to_string(),
        ExecutionError::DuplicateKey(_) => "duplicate map key".to_string(),
        _ => "evaluation failed".to_string(),
    }
}

fn type_name(t: ValueType) -> String {
    t.to_string()
}
