//! Policies: from a directory of files to one immutable, fully compiled [`Policy`].
//!
//! `source` reads the files, `model` says what they may contain, `compile` turns them into a
//! `Policy` (the types of `compiled`; every CEL expression, schema and key checked and
//! compiled; any error refuses the whole policy), `decision` evaluates a compiled policy for a
//! handshake or a message, and `testing` runs a policy's own test cases; `matches` holds the
//! regexes compiled at load. `wsgate policy check`, `wsgate policy test` and `wsgate serve` all
//! go through [`compile`](compile::compile): there is one path, not two.
//!
//! This file only declares the submodules and re-exports the public API; inside the crate,
//! items are imported from the file that defines them.

pub mod compile;
pub mod compiled;
pub mod decision;
pub mod error;
pub mod expr;
pub mod keys;
pub mod matches;
pub mod model;
pub mod source;
pub mod testing;
pub mod units;
pub mod value;

pub use compile::driver::{CompileOptions, compile, compile_dir};
pub use compiled::{
    AuthPolicy, ConnectionPolicy, Limit, MessagePolicy, MessageType, OriginPattern, OriginPolicy, Policy, RatePolicy,
    Rule, RuleKind, TokenSource, WindowLimit,
};
pub use decision::{ConnContext, ConnInfo, ConnLimits, Denial, MessageVerdict, RequestInfo, Scheme, Verdict};
pub use error::{PolicyError, PolicyErrors};
pub use model::{BinaryMode, RuleAction, RuleMode};
pub use source::PolicySource;
