//! The child processes a scenario or a measurement runs: wsgate servers, redis-server nodes and
//! HAProxy, supervised, with their output captured and redacted.

pub(crate) mod haproxy;
pub(crate) mod redis_cluster;
pub(crate) mod redis_server;
pub(crate) mod supervisor;
