//! Compiling a policy directory into one [`Policy`](crate::policy::compiled::Policy): parse
//! every document, merge sections, compile every expression, schema and key, and refuse the
//! whole policy on any error.
//!
//! Every problem is collected (not just the first) and reported as
//! `file:line:col: key.path: message`. A partially compiled policy never escapes this module.
//!
//! `driver` runs a compile; `auth`, `connections` and `messages` compile their sections, out
//! of the `rules` and `literals` they share, within the `bounds` of each place. This file only
//! declares them and re-exports the public API.

pub(crate) mod auth;
pub(crate) mod bounds;
pub(crate) mod connections;
pub(crate) mod driver;
pub(crate) mod literals;
pub(crate) mod messages;
pub(crate) mod rules;

pub use bounds::{MAX_CLAIMS_BYTES, MAX_REQUEST_BYTES};
pub use driver::{CompileOptions, compile, compile_dir};
