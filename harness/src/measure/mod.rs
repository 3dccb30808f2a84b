//! The measuring commands (idle memory, drain time, reload latency, fan-out latency, a rolling
//! restart) and the
//! fleet of servers and clients they share.

pub(crate) mod drain;
pub(crate) mod fanout;
pub(crate) mod fleet;
pub(crate) mod memory;
pub(crate) mod reload_latency;
pub(crate) mod rolling;
