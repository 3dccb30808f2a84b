//! The limiters' upkeep: the spike detector's periodic check and the sweep of emptied
//! reconnect windows, both under the live policy.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::Limiters;
use crate::policy::Limit;
use crate::policy::compile::bounds::MAX_RECONNECT_WINDOW;
use crate::reload::LivePolicy;

/// How often the handshake rate is compared with `connections.spike`.
pub(crate) const SPIKE_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How often emptied reconnect windows are forgotten.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// Raises and clears `wsgate_connection_spike` as the handshake rate crosses the policy's
/// threshold, and forgets reconnect windows that have emptied (so the map holds only recently
/// active users). Runs until aborted.
pub async fn run(limits: Arc<Limiters>, policy: Arc<LivePolicy>) {
    let mut spikes = tokio::time::interval(SPIKE_CHECK_INTERVAL);
    let mut sweeps = tokio::time::interval(SWEEP_INTERVAL);
    loop {
        tokio::select! {
            _ = spikes.tick() => {
                limits.spike.check(&policy.current());
            }
            _ = sweeps.tick() => {
                // With a CEL window, any user's window may be up to the longest one allowed.
                let per = match &policy.current().connections.reconnects.per {
                    Limit::Literal(per) => *per,
                    Limit::Expr { .. } => MAX_RECONNECT_WINDOW,
                };
                limits.reconnects.sweep(Instant::now(), per);
            }
        }
    }
}
