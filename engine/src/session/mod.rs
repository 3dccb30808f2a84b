//! One connection's life after the upgrade: welcome → one `select!` over the next frame, the
//! outbound queue, the timers (heartbeat, token expiry, re-authentication, idle) and the
//! signals from outside (replacement, shutdown) → close. No connection state lives anywhere
//! else; the registry and the hub hold only ways to reach this task.
//!
//! - [`event_loop`]: opening the session, the loop, and what each event means.
//! - `protocol`: what an accepted message does (route, publish, `auth`).
//! - `recheck`: checking the connection again (re-authentication, `auth`, a reload) and
//!   adopting what was admitted.
//! - `write`: sending, with a write deadline, and closing.
//! - `timers`: when each timer fires.
//!
//! The handlers are synchronous: they decide, queue the frames to send and say what happens
//! next ([`Step`]). The loop is the only place that waits (to publish, to write, to close).
//! That keeps the task small — every idle connection holds its whole state machine — and
//! makes each handler a plain function.
//!
//! Timers: the server pings every `heartbeat.interval`; a peer that sends nothing within
//! `heartbeat.timeout` of a ping is dropped (its TCP connection closed, no close frame: a dead
//! peer cannot read one). The token's expiry closes with 4001 at that instant. Every
//! `reauth_interval` the token and connect rules are checked again under the current policy.
//! No client message for `idle_timeout` closes with 1000.
//!
//! Slow consumers: deliveries wait in a bounded queue of [`OUTBOX_CAPACITY`] frames. A client
//! whose queue overflows, or that does not take a frame within `heartbeat.timeout`, is closed
//! with 4008, so a client that does not read never makes the server hold more than that.

pub(crate) mod event_loop;
mod protocol;
mod recheck;
mod timers;
mod write;

pub(crate) use event_loop::open;
