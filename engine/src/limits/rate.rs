//! Rates in constant memory: an estimate of how fast events come (the connection-spike
//! detector's input) and a pacer that spreads events out (the closes a reload decides).

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// An event rate over a sliding window, estimated from two fixed windows (the current one and
/// the one before, weighted by how much of it still overlaps): constant memory whatever the
/// rate, for thresholds that may be in the millions (the connection-spike detector).
#[derive(Debug)]
pub(crate) struct RateEstimator {
    /// The window, as last given to [`RateEstimator::estimate`]; events are recorded in it.
    per: Duration,
    /// Start of the current fixed window.
    start: Instant,
    /// Events in the current window.
    current: u64,
    /// Events in the previous window.
    previous: u64,
}

impl RateEstimator {
    /// An estimator over windows of `per`, starting at `now`.
    pub fn new(now: Instant, per: Duration) -> RateEstimator {
        RateEstimator { per, start: now, current: 0, previous: 0 }
    }

    fn roll(&mut self, now: Instant) {
        let per = self.per.max(Duration::from_millis(1));
        let elapsed = now.saturating_duration_since(self.start);
        if elapsed >= per * 2 {
            self.previous = 0;
            self.current = 0;
            self.start = now;
        } else if elapsed >= per {
            self.previous = self.current;
            self.current = 0;
            self.start += per;
        }
    }

    /// Records one event at `now`.
    pub fn record(&mut self, now: Instant) {
        self.roll(now);
        self.current += 1;
    }

    /// Events in the window `(now - per, now]`, estimated; `per` becomes the window from now on
    /// (a policy may change it).
    pub(crate) fn estimate(&mut self, now: Instant, per: Duration) -> f64 {
        self.per = per;
        self.roll(now);
        let into = now.saturating_duration_since(self.start).as_secs_f64() / per.as_secs_f64().max(1e-3);
        self.previous as f64 * (1.0 - into.min(1.0)) + self.current as f64
    }
}

/// Spreads events over time: the first `burst` at once, then one every `interval`. A policy
/// reload that denies thousands of live connections closes them through one of these, so
/// they never all close (and reconnect) in the same tick.
#[derive(Debug)]
pub struct Pacer {
    /// When the next event may happen, burst aside.
    next: Mutex<Option<Instant>>,
    interval: Duration,
    burst: Duration,
}

impl Pacer {
    /// A pacer allowing `burst` events at once, then `per_second`.
    pub fn new(per_second: u32, burst: u32) -> Pacer {
        let interval = Duration::from_secs(1) / per_second.max(1);
        Pacer { next: Mutex::new(None), interval, burst: interval * burst.saturating_sub(1) }
    }

    /// Books the next slot: when the caller's event may happen (`now` or later).
    pub fn slot(&self, now: Instant) -> Instant {
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let at = next.map_or(now, |n| n.max(now));
        *next = Some(at + self.interval);
        // Within the burst, at once; beyond it, spaced by the interval.
        at.checked_sub(self.burst).map_or(now, |t| t.max(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_pacer_lets_a_burst_through_then_spaces_the_rest() {
        let pacer = Pacer::new(1000, 100);
        let now = Instant::now();
        let slots: Vec<Instant> = (0..1100).map(|_| pacer.slot(now)).collect();
        assert!(slots[..100].iter().all(|&s| s == now), "the burst goes at once");
        assert_eq!(slots[100], now + Duration::from_millis(1));
        assert_eq!(slots[1099], now + Duration::from_millis(1000), "1000 more take a second");
        assert!(slots.windows(2).all(|w| w[0] <= w[1]));
        // Once idle for long enough, a new burst goes at once again.
        let later = now + Duration::from_secs(5);
        assert_eq!(pacer.slot(later), later);
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_estimate_follows_bursts_and_decays() {
        let per = Duration::from_secs(10);
        let mut r = RateEstimator::new(Instant::now(), per);
        for _ in 0..100 {
            r.record(Instant::now());
        }
        assert_eq!(r.estimate(Instant::now(), per), 100.0);
        tokio::time::advance(Duration::from_secs(15)).await;
        // Half of the previous window still overlaps the last 10 s.
        let half = r.estimate(Instant::now(), per);
        assert!((49.0..=51.0).contains(&half), "{half}");
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(r.estimate(Instant::now(), per), 0.0);
        tokio::time::advance(Duration::from_secs(1000)).await;
        r.record(Instant::now());
        assert_eq!(r.estimate(Instant::now(), per), 1.0, "a long pause forgets everything");
    }
}
