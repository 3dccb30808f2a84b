//! Sliding windows: the per-connection message rate and the per-user reconnect limit.
//!
//! Windows are sliding windows: `{max: 5, per: 1m}` admits at most 5 events in *any* minute,
//! as a security engineer reads it — not a token bucket that lets a second burst through right
//! after the first. Up to [`EXACT_MAX`] a window is exact: it keeps the times of the last `max`
//! admitted events (nothing while idle). Above it, keeping one time per event would cost
//! megabytes per connection (`{max: 100000, per: 1h}`: 1.6 MB), so a window counts its events in
//! [`SLICES`] slices of `per` instead, in constant memory: it still never admits more than `max`
//! in any window of `per`, and it refuses only when `max` were admitted within the last
//! `per + per/SLICES`. Time is tokio's clock, so tests drive it with `tokio::time::pause()` and
//! `advance()`.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The largest `max` a window keeps exactly (one timestamp per admitted event, 2 KiB at most).
pub(crate) const EXACT_MAX: u64 = 128;
/// How many slices of `per` a window above [`EXACT_MAX`] counts in: its error is one slice.
pub(crate) const SLICES: u32 = 32;
/// Slices kept: a window of `per` overlaps at most `SLICES + 1` of them.
const SLOTS: usize = SLICES as usize + 1;

/// At most `max` events in any window of length `per`.
#[derive(Debug, Default, Clone)]
pub(crate) struct SlidingWindow {
    state: State,
}

#[derive(Debug, Clone)]
enum State {
    /// Times of the admitted events still inside the window, oldest first; never more than
    /// `max`. Empty (and unallocated) while idle.
    Exact(VecDeque<Instant>),
    /// Admitted events counted per slice, for a `max` above [`EXACT_MAX`]. Boxed: most windows
    /// are exact, and a connection should not carry the counts inline.
    Counted(Box<Counted>),
}

impl Default for State {
    fn default() -> Self {
        State::Exact(VecDeque::new())
    }
}

/// Events counted per slice of `per`. Slice `k` covers `[origin + k·width, origin + (k+1)·width)`;
/// the window at `t` counts every slice that overlaps `(t - per, t]` — whole, so events counted
/// may be up to one slice older than `per`, but never one that is inside the window is missed.
#[derive(Debug, Clone)]
struct Counted {
    /// The window the slices were cut for; another `per` re-cuts them.
    per: Duration,
    /// `per / SLICES`, rounded up to a whole nanosecond.
    width_nanos: u128,
    /// Start of slice 0.
    origin: Instant,
    /// The newest slice written so far; slice `k` lives in `counts[k % SLOTS]`.
    newest: u64,
    /// Admitted events per slice.
    counts: [u64; SLOTS],
}

impl Counted {
    /// Slices for `per`, holding `events` (time, count): each no later than `now`.
    fn new(now: Instant, per: Duration, events: &[(Instant, u64)]) -> Counted {
        let per_nanos = per.as_nanos().max(1);
        let live: Vec<(Instant, u64)> =
            events.iter().copied().filter(|&(t, n)| n > 0 && now.saturating_duration_since(t) < per).collect();
        let origin = live.iter().map(|&(t, _)| t).min().unwrap_or(now);
        let mut counted =
            Counted { per, width_nanos: per_nanos.div_ceil(u128::from(SLICES)), origin, newest: 0, counts: [0; SLOTS] };
        for (t, n) in live {
            // All within `per` of `origin`: at most SLICES slices after it.
            let k = counted.slice_of(t);
            counted.advance(k);
            let slot = (k % SLOTS as u64) as usize;
            counted.counts[slot] = counted.counts[slot].saturating_add(n);
        }
        counted.advance(counted.slice_of(now));
        counted
    }

    fn slice_of(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.origin).as_nanos() / self.width_nanos).unwrap_or(u64::MAX)
    }

    /// Makes `k` the newest slice (if it is newer), emptying the slots it reuses.
    fn advance(&mut self, k: u64) {
        if k <= self.newest {
            return;
        }
        let stale = (k - self.newest).min(SLOTS as u64);
        for j in 0..stale {
            self.counts[((k - j) % SLOTS as u64) as usize] = 0;
        }
        self.newest = k;
    }

    /// The oldest slice overlapping `(t - per, t]`.
    fn first_counted(&self, t: Instant, per: Duration) -> u64 {
        let elapsed = t.saturating_duration_since(self.origin).as_nanos();
        let first = elapsed.saturating_sub(per.as_nanos()) / self.width_nanos;
        let first = u64::try_from(first).unwrap_or(u64::MAX);
        first.max((self.newest + 1).saturating_sub(SLOTS as u64))
    }

    /// Slices `first..=newest` with their counts, oldest first.
    fn slices(&self, first: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        (first..=self.newest).map(|k| (k, self.counts[(k % SLOTS as u64) as usize]))
    }

    fn in_window(&self, t: Instant, per: Duration) -> u64 {
        self.slices(self.first_counted(t, per)).fold(0u64, |sum, (_, n)| sum.saturating_add(n))
    }

    /// When slice `k` stops overlapping the window: `per` after its end.
    fn leaves(&self, k: u64) -> Instant {
        let end = u64::try_from((u128::from(k) + 1) * self.width_nanos).unwrap_or(u64::MAX);
        self.origin + Duration::from_nanos(end) + self.per
    }

    /// The counted events as (time, count), each at the latest time its slice allows (never
    /// after `now`): moved later, they expire later, so a re-cut window never admits more.
    fn events(&self, now: Instant) -> Vec<(Instant, u64)> {
        self.slices(self.first_counted(now, self.per))
            .filter(|&(_, n)| n > 0)
            .map(|(k, n)| {
                let end = u64::try_from((u128::from(k) + 1) * self.width_nanos).unwrap_or(u64::MAX);
                let latest = self.origin + Duration::from_nanos(end) - Duration::from_nanos(1);
                (latest.min(now), n)
            })
            .collect()
    }

    fn admit(&mut self, now: Instant, max: u64) -> Result<(), Duration> {
        // A clock read just before another caller's (a shared window) counts as that one's.
        let k = self.slice_of(now).max(self.newest);
        self.advance(k);
        let first = self.first_counted(now, self.per);
        let in_window = self.in_window(now, self.per);
        if in_window < max {
            let slot = (k % SLOTS as u64) as usize;
            self.counts[slot] = self.counts[slot].saturating_add(1);
            return Ok(());
        }
        // Full: slices leave oldest first; the wait ends when enough have left.
        let mut left = in_window;
        for (k, n) in self.slices(first) {
            left = left.saturating_sub(n);
            if left < max {
                return Err(self.leaves(k).saturating_duration_since(now).max(Duration::from_millis(1)));
            }
        }
        Err(self.leaves(self.newest).saturating_duration_since(now).max(Duration::from_millis(1)))
    }
}

impl SlidingWindow {
    /// Admits an event at `now` if fewer than `max` were admitted in `(now - per, now]`.
    /// Otherwise returns how long until one slot frees up (if nothing else is admitted).
    ///
    /// `max` and `per` may change between calls (a policy reload): the window switches between
    /// exact and counted as `max` crosses [`EXACT_MAX`], moving events only ever later in
    /// time, so a switch never admits more than the new limit allows.
    pub(crate) fn admit(&mut self, now: Instant, max: u64, per: Duration) -> Result<(), Duration> {
        self.expire(now, per);
        let exact = max <= EXACT_MAX;
        if let State::Exact(admitted) = &self.state
            && !exact
        {
            let events: Vec<(Instant, u64)> = admitted.iter().map(|&t| (t, 1)).collect();
            self.state = State::Counted(Box::new(Counted::new(now, per, &events)));
        }
        // Re-cutting is needed only when the limit changed shape (a reload): the common case, a
        // counted window under the same limit, allocates nothing per event.
        if let State::Counted(counted) = &mut self.state
            && (exact || counted.per != per)
        {
            let events = counted.events(now);
            let total = events.iter().fold(0u64, |sum, &(_, n)| sum.saturating_add(n));
            if exact && total <= EXACT_MAX {
                // Every counted event becomes a timestamp: a later, larger `max` must still
                // see them all.
                let admitted = events.iter().flat_map(|&(t, n)| std::iter::repeat_n(t, n as usize)).collect();
                self.state = State::Exact(admitted);
            } else if counted.per != per {
                **counted = Counted::new(now, per, &events);
            }
            // Otherwise a counted window stays counted (even under a small `max`) until it
            // holds few enough events to list.
        }
        let admitted = match &mut self.state {
            State::Counted(counted) => return counted.admit(now, max),
            State::Exact(admitted) => admitted,
        };
        let max = usize::try_from(max).unwrap_or(usize::MAX);
        if admitted.len() < max {
            admitted.push_back(now);
            return Ok(());
        }
        // Full: the oldest admitted event leaves the window `per` after it happened. If `max`
        // shrank (a policy reload), several must leave; the one that frees a slot is the
        // (len - max)-th oldest.
        let freeing = admitted[admitted.len() - max.max(1)];
        Err((freeing + per).saturating_duration_since(now).max(Duration::from_millis(1)))
    }

    fn expire(&mut self, now: Instant, per: Duration) {
        let idle = match &mut self.state {
            State::Exact(admitted) => {
                while let Some(&t) = admitted.front() {
                    if now.saturating_duration_since(t) >= per {
                        admitted.pop_front();
                    } else {
                        break;
                    }
                }
                admitted.is_empty() && admitted.capacity() > 0
            }
            State::Counted(counted) => counted.in_window(now, per.max(counted.per)) == 0,
        };
        if idle {
            // Idle windows hold no memory.
            self.state = State::default();
        }
    }

    /// Whether nothing is left in the window at `now`.
    pub(crate) fn is_idle(&mut self, now: Instant, per: Duration) -> bool {
        self.expire(now, per);
        matches!(&self.state, State::Exact(admitted) if admitted.is_empty())
    }

    /// Bytes this window holds on the heap.
    #[cfg(test)]
    pub(crate) fn heap_bytes(&self) -> usize {
        match &self.state {
            State::Exact(admitted) => admitted.capacity() * std::mem::size_of::<Instant>(),
            State::Counted(_) => std::mem::size_of::<Counted>(),
        }
    }
}

/// Sliding windows per key (user id), for the reconnect limit.
#[derive(Debug, Default)]
pub struct KeyedWindows<K: Hash + Eq> {
    windows: Mutex<HashMap<K, SlidingWindow>>,
}

impl<K: Hash + Eq + Clone> KeyedWindows<K> {
    /// Admits an event for `key`, or says how long to wait.
    pub(crate) fn admit(&self, key: &K, now: Instant, max: u64, per: Duration) -> Result<(), Duration> {
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        windows.entry(key.clone()).or_default().admit(now, max, per)
    }

    /// Drops keys whose windows are empty, so the map holds only recently active keys.
    /// `per` is the longest window any key may use.
    pub(crate) fn sweep(&self, now: Instant, per: Duration) {
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        windows.retain(|_, w| !w.is_idle(now, per));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.windows.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use proptest::prelude::*;

    /// The model: an event is admitted iff fewer than `max` admitted events lie in
    /// `(t - per, t]`.
    fn model(times_ms: &[u64], max: usize, per_ms: u64) -> Vec<bool> {
        let mut admitted: Vec<u64> = Vec::new();
        times_ms
            .iter()
            .map(|&t| {
                let in_window = admitted.iter().filter(|&&a| t - a < per_ms).count();
                let ok = in_window < max;
                if ok {
                    admitted.push(t);
                }
                ok
            })
            .collect()
    }

    proptest! {
        #[test]
        fn sliding_window_matches_the_model(
            gaps in proptest::collection::vec(0u64..400, 1..200),
            max in 1u64..12,
            per_ms in 1u64..2000,
        ) {
            let start = Instant::now();
            let mut times = Vec::new();
            let mut t = 0;
            for g in gaps { t += g; times.push(t); }
            let expected = model(&times, max as usize, per_ms);
            let mut w = SlidingWindow::default();
            for (i, &t) in times.iter().enumerate() {
                let now = start + Duration::from_millis(t);
                let got = w.admit(now, max, Duration::from_millis(per_ms));
                prop_assert_eq!(got.is_ok(), expected[i], "event {} at {}ms", i, t);
                if let Err(wait) = got {
                    // Waiting as told admits the next event (nothing else happens meanwhile).
                    let mut probe = w.clone();
                    prop_assert!(probe.admit(now + wait, max, Duration::from_millis(per_ms)).is_ok());
                    if wait > Duration::from_millis(1) {
                        let mut early = w.clone();
                        prop_assert!(early.admit(now + wait - Duration::from_millis(1), max, Duration::from_millis(per_ms)).is_err());
                    }
                }
            }
        }

        /// Above [`EXACT_MAX`] the window is counted in slices. It never admits more than `max`
        /// in any window of `per` (no error that way), refuses only when `max` were admitted in
        /// the last `per + per/SLICES` (its whole error), and its wait is right to the slice.
        #[test]
        fn a_counted_window_errs_only_by_one_slice_and_only_towards_refusing(
            gaps in proptest::collection::vec(0u64..10, 1..900),
            max in (EXACT_MAX + 1)..250,
            per_ms in 100u64..2000,
        ) {
            let start = Instant::now();
            let per = Duration::from_millis(per_ms);
            let slice_nanos = u64::try_from(per.as_nanos().div_ceil(u128::from(SLICES))).unwrap();
            let mut w = SlidingWindow::default();
            let mut admitted: Vec<u64> = Vec::new();
            let mut t = 0;
            for g in gaps {
                t += g;
                let now = start + Duration::from_millis(t);
                let in_last = |span_nanos: u64| admitted.iter().filter(|&&a| (t - a) * 1_000_000 < span_nanos).count() as u64;
                match w.admit(now, max, per) {
                    Ok(()) => {
                        prop_assert!(in_last(per_ms * 1_000_000) < max, "admitted past max at {}ms", t);
                        admitted.push(t);
                    }
                    Err(wait) => {
                        prop_assert!(in_last(per_ms * 1_000_000 + slice_nanos) >= max, "refused at {}ms with room", t);
                        prop_assert!(wait <= per + Duration::from_nanos(slice_nanos), "wait {:?}", wait);
                        prop_assert!(w.clone().admit(now + wait, max, per).is_ok(), "waiting as told admits");
                        if wait > Duration::from_millis(1) {
                            prop_assert!(w.clone().admit(now + wait - Duration::from_millis(1), max, per).is_err());
                        }
                    }
                }
                prop_assert!(w.heap_bytes() <= 2048);
            }
        }

        /// A reload may move `max` across [`EXACT_MAX`] (and the Redis path records with an
        /// unbounded `max`): switching modes never admits more than the `max` in force.
        #[test]
        fn switching_between_exact_and_counted_never_admits_more(
            events in proptest::collection::vec((0u64..30, prop_oneof![Just(3u64), Just(20), Just(128), Just(129), Just(200), Just(u64::MAX)]), 1..500),
            per_ms in 100u64..2000,
        ) {
            let start = Instant::now();
            let per = Duration::from_millis(per_ms);
            let mut w = SlidingWindow::default();
            let mut admitted: Vec<u64> = Vec::new();
            let mut t = 0;
            for (g, max) in events {
                t += g;
                if w.admit(start + Duration::from_millis(t), max, per).is_ok() {
                    let before = admitted.iter().filter(|&&a| t - a < per_ms).count() as u64;
                    prop_assert!(before < max, "admitted a {}th event in {}ms under max {} at {}ms", before + 1, per_ms, max, t);
                    admitted.push(t);
                }
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_configured_rate_is_the_rate_not_one_per_second() {
        // 20 per second means 20 in any second, refilled as the window slides: not 1/s.
        let mut w = SlidingWindow::default();
        let per = Duration::from_secs(1);
        for _ in 0..20 {
            assert!(w.admit(Instant::now(), 20, per).is_ok());
        }
        assert_eq!(w.admit(Instant::now(), 20, per), Err(per));
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(w.admit(Instant::now(), 20, per).is_err());
        tokio::time::advance(Duration::from_millis(1)).await;
        for _ in 0..20 {
            assert!(w.admit(Instant::now(), 20, per).is_ok(), "a whole new second admits all 20 again");
        }
        // 100 per 10 ms.
        let mut fast = SlidingWindow::default();
        let mut admitted = 0;
        for _ in 0..1000 {
            if fast.admit(Instant::now(), 100, Duration::from_millis(10)).is_ok() {
                admitted += 1;
            }
            tokio::time::advance(Duration::from_micros(100)).await;
        }
        // 100 ms of traffic at one event per 0.1 ms: 10 windows of 100.
        assert_eq!(admitted, 1000, "one event per 0.1 ms is exactly 100 per 10 ms");
    }

    #[tokio::test(start_paused = true)]
    async fn a_window_stays_small_whatever_its_max() {
        let (max, per) = (100_000, Duration::from_secs(3600));
        let mut w = SlidingWindow::default();
        for _ in 0..100_000 {
            assert!(w.admit(Instant::now(), max, per).is_ok());
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        assert!(w.admit(Instant::now(), max, per).is_err(), "100,000 in 1000 s: the hour is full");
        assert!(w.heap_bytes() <= 1024, "a window of max 100000 holds {} bytes", w.heap_bytes());
        // The first events leave `per` after they happened, give or take one slice.
        let wait = w.admit(Instant::now(), max, per).unwrap_err();
        let after_the_first = per - Duration::from_secs(1000);
        assert!(wait >= after_the_first && wait <= after_the_first + per / SLICES, "{wait:?}");
        tokio::time::advance(per + per / SLICES).await;
        assert!(w.is_idle(Instant::now(), per));
        assert_eq!(w.heap_bytes(), 0, "an idle window holds nothing");
    }

    #[tokio::test(start_paused = true)]
    async fn keyed_windows_are_per_key_and_swept_when_idle() {
        let k: KeyedWindows<String> = KeyedWindows::default();
        let per = Duration::from_secs(60);
        for _ in 0..5 {
            assert!(k.admit(&"alice".into(), Instant::now(), 5, per).is_ok());
        }
        let wait = k.admit(&"alice".into(), Instant::now(), 5, per).unwrap_err();
        assert_eq!(wait, per);
        assert!(k.admit(&"bob".into(), Instant::now(), 5, per).is_ok());
        tokio::time::advance(per).await;
        k.sweep(Instant::now(), per);
        assert!(k.is_empty());
    }
}
