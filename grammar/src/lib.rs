//! The small grammars the gateway and its harness must agree on byte for byte: duration
//! literals (policy files and scenario files share one spelling) and the JUnit XML both write
//! for CI. Std-only, so either side can depend on it without pulling anything else in.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod duration;
pub mod junit;
