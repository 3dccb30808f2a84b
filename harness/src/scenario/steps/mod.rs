//! The steps, one file per family; each struct is its serde form and implements
//! `StepKind` (`scenario/kind.rs`) beside it.

pub(crate) mod close;
pub(crate) mod connect;
pub(crate) mod frames;
pub(crate) mod http;
pub(crate) mod policy;
pub(crate) mod process;
pub(crate) mod publish;
pub(crate) mod redis;
