//! wsgate: a WebSocket gateway whose security is policy, not code.
//!
//! The library holds everything; the `wsgate` binary only parses its command line and calls
//! in. [`policy`] turns a policy directory into one immutable, compiled [`policy::Policy`] and
//! evaluates it; [`close`] is the one mapping from outcomes to what clients see; [`cli`]
//! defines the command line and runs its commands.
#![forbid(unsafe_code)]
#![deny(missing_docs, rust_2018_idioms)]

pub mod admin;
pub(crate) mod auth;
pub mod broker;
pub mod cli;
pub mod close;
pub(crate) mod decisions;
pub(crate) mod drain;
pub mod gateway;
pub(crate) mod handshake;
pub(crate) mod http;
pub mod lifecycle;
pub mod limits;
pub mod metrics;
pub mod pipeline;
pub mod policy;
pub mod proxy;
pub(crate) mod registry;
pub mod reload;
pub mod server;
pub(crate) mod session;
pub(crate) mod tls;
pub mod token;
pub mod watcher;
pub(crate) mod ws;

pub use gateway::{Gateway, GatewayOptions};
pub use server::{Listeners, ServeOptions, serve};
