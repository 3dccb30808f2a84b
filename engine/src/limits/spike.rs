//! The connection-spike detector (`connections.spike`): how fast handshakes come, against the
//! policy's threshold, published as `wsgate_connection_spike` for the rules that read it.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::rate::RateEstimator;
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::policy::decision::spike_threshold;

/// Handshake attempts, and whether the last check found them over the threshold.
#[derive(Debug)]
pub struct SpikeDetector {
    handshakes: Mutex<RateEstimator>,
    /// `wsgate_connection_spike` is the detector's state: rules and the next check read it.
    metrics: Arc<Metrics>,
}

impl SpikeDetector {
    /// A detector whose first window is `policy`'s `connections.spike.per` (10 s when it cannot
    /// be evaluated), until the first check evaluates it again.
    pub fn new(policy: &Policy, metrics: Arc<Metrics>) -> SpikeDetector {
        let window = spike_threshold(policy, SystemTime::now()).map_or(Duration::from_secs(10), |(_, per)| per);
        SpikeDetector { handshakes: Mutex::new(RateEstimator::new(Instant::now(), window)), metrics }
    }

    /// Counts a handshake attempt (in the window the last check used).
    pub fn record(&self) {
        self.handshakes.lock().unwrap_or_else(|e| e.into_inner()).record(Instant::now());
    }

    /// Updates `wsgate_connection_spike` from the handshake rate and `policy`'s
    /// `connections.spike`; logs a warning when an episode starts and a note when it ends.
    /// Returns whether a spike is on.
    pub fn check(&self, policy: &Policy) -> bool {
        let (max, per) = match spike_threshold(policy, SystemTime::now()) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "connections.spike could not be evaluated");
                return self.metrics.connection_spike.load(Ordering::Relaxed) == 1;
            }
        };
        let rate = self.handshakes.lock().unwrap_or_else(|e| e.into_inner()).estimate(Instant::now(), per);
        let spiking = rate > max as f64;
        let was = self.metrics.connection_spike.swap(u64::from(spiking), Ordering::Relaxed) == 1;
        match (was, spiking) {
            (false, true) => {
                tracing::warn!(rate = rate.round(), max, per = ?per, "connection spike: handshakes exceed connections.spike")
            }
            (true, false) => tracing::info!(rate = rate.round(), max, per = ?per, "connection spike over"),
            _ => {}
        }
        spiking
    }
}
