//! A connection's timers: heartbeat, idle, re-authentication, the token's expiry and a
//! reload's booked close.

use std::time::SystemTime;

use tokio::time::Instant;

use crate::close::CloseCode;
use crate::policy::ConnLimits;

/// The timers of one connection, as instants on tokio's clock. They keep when things
/// happened, not deadlines: each deadline is computed from the connection's current limits,
/// so a reloaded policy's heartbeat, idle and re-authentication intervals apply at once.
pub(super) struct Timers {
    /// When the last ping was sent (the connection's start before the first).
    pub(super) last_ping: Instant,
    /// A ping was sent and nothing has arrived since.
    pub(super) awaiting_pong: bool,
    /// The last client message (idle time counts from here).
    pub(super) last_message: Instant,
    /// The last re-authentication (or the handshake).
    pub(super) last_auth: Instant,
    /// The token's expiry (`exp` + leeway), if it has one.
    pub(super) expires: Option<Instant>,
    /// A reloaded policy no longer admits this connection: it closes then (see
    /// [`crate::limits::Limiters::reload_closes`]), or at its next message, whichever comes first.
    pub(super) revoked: Option<(Instant, CloseCode, Box<str>)>,
}

impl Timers {
    pub(super) fn new(now: Instant, expires: Option<Instant>) -> Timers {
        Timers { last_ping: now, awaiting_pong: false, last_message: now, last_auth: now, expires, revoked: None }
    }

    /// Send a ping then, or (when a pong is awaited) drop the peer then.
    pub(super) fn heartbeat(&self, limits: &ConnLimits) -> Instant {
        let wait = if self.awaiting_pong { limits.heartbeat_timeout } else { limits.heartbeat_interval };
        self.last_ping + wait
    }

    pub(super) fn idle(&self, limits: &ConnLimits) -> Instant {
        self.last_message + limits.idle_timeout
    }

    pub(super) fn reauth(&self, limits: &ConnLimits) -> Instant {
        self.last_auth + limits.reauth_interval
    }

    /// The next instant that may end the connection outright: the token's expiry or a
    /// reload's booked close.
    pub(super) fn ends(&self) -> Option<Instant> {
        match (self.expires, &self.revoked) {
            (Some(e), Some((r, ..))) => Some(e.min(*r)),
            (e, r) => e.or(r.as_ref().map(|(at, ..)| *at)),
        }
    }

    pub(super) fn next(&self, limits: &ConnLimits) -> Instant {
        let t = self.heartbeat(limits).min(self.idle(limits)).min(self.reauth(limits));
        let t = self.expires.map_or(t, |e| t.min(e));
        self.revoked.as_ref().map_or(t, |(at, ..)| t.min(*at))
    }
}

/// A wall-clock instant as an instant on tokio's clock (the past becomes now).
pub(super) fn instant_of(t: SystemTime) -> Instant {
    let now = Instant::now();
    t.duration_since(SystemTime::now()).map_or(now, |d| now + d)
}
