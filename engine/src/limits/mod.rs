//! The limiters one instance keeps for itself: connections per address (in their handshake and
//! after it), reconnects per user, the connection-spike detector, message rates per connection,
//! and the pacing of the closes a reload decides. With `--redis`, per-address connections and
//! reconnects are counted across the instances by the broker instead, and these counts are the
//! fallback while Redis is away.
//!
//! Windows are sliding windows: `{max: 5, per: 1m}` admits at most 5 events in *any* minute, as a
//! security engineer reads it — not a token bucket that lets a second burst through right after
//! the first ([`window`]). Time is tokio's clock, so tests drive it with `tokio::time::pause()`.

pub mod handshaking;
pub mod per_ip;
pub mod rate;
pub mod spike;
pub mod upkeep;
pub mod window;

use std::sync::Arc;

use crate::metrics::Metrics;
use crate::policy::Policy;
use handshaking::Handshaking;
use per_ip::IpCounter;
use rate::Pacer;
use spike::SpikeDetector;
use window::KeyedWindows;

/// Live connections a reload denies are closed at most this fast, after a first burst of
/// [`RELOAD_CLOSE_BURST`]: 10,000 denied connections close over ten seconds, not in one tick
/// (and do not all reconnect in the same one).
pub const RELOAD_CLOSES_PER_SECOND: u32 = 1000;
/// Denied connections closed at once after a reload.
pub(crate) const RELOAD_CLOSE_BURST: u32 = 100;

/// The instance's own limiters, shared by every connection.
#[derive(Debug)]
pub struct Limiters {
    /// `connections.max_per_ip`.
    pub per_ip: Arc<IpCounter>,
    /// Unauthenticated connections, capped per address and in total, so no one can hold every
    /// connection slot with sockets that never authenticate.
    pub handshaking: Arc<Handshaking>,
    /// `connections.reconnects`, per user.
    pub reconnects: KeyedWindows<String>,
    /// `connections.spike`.
    pub spike: SpikeDetector,
    /// Paces the 4003 closes of live connections a reloaded policy no longer admits.
    pub reload_closes: Pacer,
}

impl Limiters {
    /// Limiters whose spike window starts as `policy` says.
    pub fn new(policy: &Policy, metrics: Arc<Metrics>) -> Limiters {
        Limiters {
            per_ip: Arc::default(),
            handshaking: Arc::default(),
            reconnects: KeyedWindows::default(),
            spike: SpikeDetector::new(policy, metrics),
            reload_closes: Pacer::new(RELOAD_CLOSES_PER_SECOND, RELOAD_CLOSE_BURST),
        }
    }
}
