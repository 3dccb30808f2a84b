//! CEL expressions: compiled once at load time, bounded so that no policy can crash or stall
//! the server, and evaluated fail-closed.
//!
//! The `cel` crate has no cost limit, and deep expressions overflow the stack while parsing,
//! evaluating or dropping (see CRATES.md). So before an expression is accepted it must pass,
//! in this order:
//! 1. a length bound ([`MAX_EXPR_LEN`]) checked before parsing, which also bounds how deep
//!    the parser can recurse; the whole policy compile runs on a thread with a large stack
//!    (`compile.rs`), so even the longest allowed expression parses and drops safely;
//! 2. an AST depth bound ([`MAX_AST_DEPTH`]), measured without recursion, so every accepted
//!    expression evaluates and drops well within a 2 MiB worker stack;
//! 3. a bound on nested comprehensions ([`MAX_COMPREHENSION_NESTING`]);
//! 4. known variables only, from the set the expression's place allows (a connect rule cannot
//!    read `message`), and known functions only, so a typo fails at load, not per request;
//! 5. a static worst-case cost estimate under [`COST_BUDGET`], in the spirit of Kubernetes'
//!    CEL cost estimator: each node costs one unit, work over strings and lists costs by
//!    their worst-case size, and a comprehension multiplies its body by its range's worst-case
//!    length. Sizes of inputs come from the policy's own bounds (`messages.max_bytes`, the
//!    token and header limits).
//!
//! Regular expressions (`matches`) must be string literals: each is compiled here, once, under
//! [`MAX_REGEX_BYTES`](crate::policy::matches::MAX_REGEX_BYTES), and the expression is rewritten to call the compiled regex (see
//! `matches.rs`), so no evaluation compiles a pattern and no pattern can come from a message or
//! a claim.
//!
//! Run-time errors ([`EvalError`]) name the kind of failure and the types involved, never an
//! operand's value: a value can be a claim, a message field or a token, and these errors are
//! logged and shown in policy test output.
//!
//! `vars` holds the variables and their worst-case sizes, `check` the load-time bounds and
//! checks, `eval` the compiled expression and its evaluation; `error` is the refusal that
//! `matches` shares. This file only declares them and re-exports the public API.

pub(crate) mod check;
pub(crate) mod error;
pub(crate) mod eval;
pub(crate) mod vars;

#[cfg(test)]
mod tests;

pub use check::{COST_BUDGET, MAX_AST_DEPTH, MAX_COMPREHENSION_NESTING, MAX_EXPR_LEN, compile};
pub use error::ExprError;
pub use eval::{EvalError, Expr, describe, env};
pub use vars::{InputSizes, Var, VarSet};
