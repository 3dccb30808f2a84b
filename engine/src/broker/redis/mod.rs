//! Several instances as one gateway, through Redis (`--redis URL`, or `--redis-cluster` for a
//! Redis Cluster). One file per job:
//!
//! - [`instance`]: the link itself and the state its tasks share.
//! - [`backplane`]: fan-out to the other instances.
//! - [`admission`]: counts (per-IP connections, reconnects, `max_per_user`) over leases
//!   ([`lease`]), by the atomic [`scripts`].
//! - [`control`]: replacements, disconnects and revocations across instances.
//! - [`subscriber`] and [`subscriptions`]: what is subscribed in Redis, kept as state rather
//!   than as a queue of orders, so it stays bounded however long Redis is away.
//! - [`health`] and [`probe`]: noticing that Redis or the subscription is gone, and restoring
//!   what an outage lost.
//! - [`link`], [`keys`], [`wire`]: the connections (one server or a Redis Cluster), the names
//!   in Redis, and what travels between instances.

pub(crate) mod admission;
pub(crate) mod backplane;
pub(crate) mod control;
pub(crate) mod health;
pub mod instance;
pub mod keys;
pub(crate) mod lease;
pub mod link;
pub(crate) mod probe;
pub(crate) mod scripts;
pub(crate) mod subscriber;
pub(crate) mod subscriptions;
pub(crate) mod wire;

pub use instance::Redis;
pub use lease::now_ms;
pub use link::Topology;
