//! What this instance wants subscribed in Redis, and the task that makes Redis hold it.
//!
//! Sessions (a channel's first subscriber, its last leaving), the probe (its channels follow the
//! slot map) and Redis itself (a cluster drops the subscriptions of a slot that moved) change
//! what should be subscribed, and none of them waits for Redis. A change marks the channel
//! *dirty*: its wanted state — read from the hub, or the instance's own channels, at the time —
//! may differ from what Redis *holds*. The subscriber task takes the dirty channels, subscribes
//! and unsubscribes the difference, and reports how far it got ([`Subscriptions::settled`]).
//! The task itself is [`crate::broker::redis::subscriber`].
//!
//! So the bookkeeping is bounded by channels, never by operations: a channel touched 10,000
//! times while Redis is away is one entry, and one that came and went meanwhile is none. While
//! Redis is away (or after a failed command) the task only keeps the state; the resync that
//! follows Redis' return subscribes to everything wanted and leaves what is held but no longer
//! wanted, superseding whatever was dirty.

use std::collections::HashSet;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

/// The wanted and held subscriptions of one instance, shared by everything that changes them
/// and the subscriber task.
#[derive(Debug)]
pub(crate) struct Subscriptions {
    state: Mutex<State>,
    /// Wakes the subscriber task; one pending wake-up is enough (it reads the whole state), so
    /// the channel holds one and a full channel means "already woken".
    wake: mpsc::Sender<()>,
    /// How many changes ([`State::changes`]) Redis has carried out, for [`Subscriptions::settled`].
    done: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct State {
    /// Redis channels whose wanted state may differ from what Redis holds.
    dirty: HashSet<String>,
    /// Redis channels Redis holds (or is being told to hold) for this instance; after a failed
    /// command, those it may still hold, so a resync can leave them.
    held: HashSet<String>,
    /// Changes made so far; a caller of [`Subscriptions::settled`] waits for its number.
    changes: u64,
    /// Whether `held` is known to match Redis: false from the start, after a failed command and
    /// while Redis is marked away, until a resync succeeds. Until then only a resync is tried.
    synced: bool,
    /// Callers waiting for the next resync.
    resync: Vec<oneshot::Sender<bool>>,
    /// Whether the next resync first replaces the subscription connection.
    rebuild: bool,
}

/// One round of the subscriber task's work, taken from the state at once.
#[derive(Debug)]
pub(crate) struct Round {
    pub(crate) subscribe: Vec<String>,
    pub(crate) unsubscribe: Vec<String>,
    /// A resync: everything wanted is subscribed, whatever `held` said.
    pub(crate) full: bool,
    pub(crate) rebuild: bool,
    replies: Vec<oneshot::Sender<bool>>,
    /// The changes this round carries out.
    upto: u64,
}

impl Subscriptions {
    /// Empty bookkeeping, and the receiving end of its wake-ups for the subscriber task.
    pub(crate) fn new() -> (Subscriptions, mpsc::Receiver<()>) {
        let (wake, woken) = mpsc::channel(1);
        let subscriptions = Subscriptions { state: Mutex::default(), wake, done: watch::Sender::new(0) };
        (subscriptions, woken)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wake(&self) {
        let _ = self.wake.try_send(());
    }

    /// `channel` (a Redis channel) may be wanted or not wanted now. `wanted` is asked under the
    /// state's lock: of two racing changes to one channel, the later asks last, so the outcome
    /// follows the hub's final state whatever order the callers arrive in.
    pub(crate) fn touch(&self, channel: String, wanted: impl FnOnce(&str) -> bool) {
        let mut state = self.state();
        if wanted(&channel) == state.held.contains(&channel) {
            state.dirty.remove(&channel);
        } else {
            state.dirty.insert(channel);
        }
        state.changes += 1;
        drop(state);
        self.wake();
    }

    /// Redis dropped its subscription to `channel` (a cluster's slot moved): subscribed again,
    /// on the slot's new owner, if it is still wanted.
    pub(crate) fn lost(&self, channel: &str, wanted: impl FnOnce(&str) -> bool) {
        let mut state = self.state();
        state.held.remove(channel);
        if wanted(channel) {
            state.dirty.insert(channel.to_string());
        }
        state.changes += 1;
        drop(state);
        self.wake();
    }

    /// Asks for a resync (after `rebuild`, on a new connection); the answer says whether it
    /// succeeded. Resyncs asked for before the task gets to them are one.
    pub(crate) fn resync(&self, rebuild: bool) -> oneshot::Receiver<bool> {
        let (reply, answer) = oneshot::channel();
        let mut state = self.state();
        state.resync.push(reply);
        state.rebuild |= rebuild;
        drop(state);
        self.wake();
        answer
    }

    /// Redis is away (or the subscription stopped delivering): what it holds is unknown, so
    /// nothing but a resync is tried until one succeeds.
    pub(crate) fn out_of_step(&self) {
        self.state().synced = false;
    }

    /// Resolves once every change made before the call is in effect in Redis (true), or at
    /// once with false while Redis is out of step, or with false after `within`.
    pub(crate) async fn settled(&self, within: Duration) -> bool {
        let target = {
            let state = self.state();
            if !state.synced {
                return false;
            }
            state.changes
        };
        let mut done = self.done.subscribe();
        matches!(tokio::time::timeout(within, done.wait_for(|&d| d >= target)).await, Ok(Ok(_)))
    }

    /// Channels whose change Redis has not carried out yet: at most the channels wanted or
    /// held, however many changes were made.
    pub(crate) fn pending(&self) -> usize {
        self.state().dirty.len()
    }

    /// The next round of work, if there is any now. A resync asked for comes first and
    /// supersedes the dirty channels: it subscribes to `everything` wanted.
    pub(crate) fn take(
        &self,
        wanted: impl Fn(&str) -> bool,
        everything: impl FnOnce() -> HashSet<String>,
    ) -> Option<Round> {
        let mut state = self.state();
        let state = &mut *state;
        if !state.resync.is_empty() || state.rebuild {
            let want = everything();
            let unsubscribe = state.held.difference(&want).cloned().collect();
            let subscribe = want.iter().cloned().collect();
            state.held = want;
            state.dirty.clear();
            return Some(Round {
                subscribe,
                unsubscribe,
                full: true,
                rebuild: std::mem::take(&mut state.rebuild),
                replies: std::mem::take(&mut state.resync),
                upto: state.changes,
            });
        }
        if !state.synced || (state.dirty.is_empty() && *self.done.borrow() >= state.changes) {
            return None;
        }
        let (mut subscribe, mut unsubscribe) = (Vec::new(), Vec::new());
        for channel in state.dirty.drain() {
            match (wanted(&channel), state.held.contains(&channel)) {
                (true, false) => {
                    state.held.insert(channel.clone());
                    subscribe.push(channel);
                }
                (false, true) => {
                    state.held.remove(&channel);
                    unsubscribe.push(channel);
                }
                _ => {}
            }
        }
        Some(Round { subscribe, unsubscribe, full: false, rebuild: false, replies: Vec::new(), upto: state.changes })
    }

    /// `round` was carried out (`ok`) or failed. A failure leaves Redis out of step: the
    /// channels it was to leave may still be held, and nothing but a resync is tried until one
    /// succeeds.
    pub(crate) fn finished(&self, round: Round, ok: bool) {
        let mut state = self.state();
        if ok {
            state.synced |= round.full;
            self.done.send_if_modified(|done| {
                let advanced = round.upto > *done;
                *done = (*done).max(round.upto);
                advanced
            });
        } else {
            state.synced = false;
            state.held.extend(round.unsubscribe);
        }
        drop(state);
        for reply in round.replies {
            let _ = reply.send(ok);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(channels: &[&str]) -> HashSet<String> {
        channels.iter().map(|c| c.to_string()).collect()
    }

    /// A resync asked for and taken, as after Redis' return.
    fn resync(subs: &Subscriptions, everything: &[&str]) -> Round {
        let _answer = subs.resync(false);
        let round = subs.take(|_| unreachable!(), || set(everything)).expect("a resync");
        assert!(round.full);
        round
    }

    #[test]
    fn churn_while_out_of_step_is_bounded_by_the_channels() {
        let (subs, _woken) = Subscriptions::new();
        let round = resync(&subs, &["ctl", "a"]);
        subs.finished(round, true);
        // Redis goes away: a command fails.
        subs.touch("b".into(), |_| true);
        let round = subs.take(|c| c == "b" || c == "a", || unreachable!()).unwrap();
        assert_eq!(round.subscribe, vec!["b"]);
        subs.finished(round, false);
        for n in 0..50_000 {
            let channel = format!("c{}", n / 2);
            subs.touch(channel, |_| n % 2 == 0);
        }
        assert_eq!(subs.pending(), 0, "every churned channel came and went");
        subs.touch("kept".into(), |_| true);
        subs.touch("a".into(), |_| false);
        assert_eq!(subs.pending(), 2);
        assert!(subs.take(|_| true, || unreachable!()).is_none(), "nothing but a resync while out of step");
        subs.out_of_step();
        assert!(subs.take(|_| true, || unreachable!()).is_none(), "Redis marked away: still nothing");

        // Back: the resync subscribes to what is wanted and leaves what is not.
        let round = resync(&subs, &["ctl", "kept", "b"]);
        let mut subscribe = round.subscribe.clone();
        subscribe.sort();
        assert_eq!(
            (subscribe, round.unsubscribe.clone()),
            (vec!["b".into(), "ctl".into(), "kept".into()], vec!["a".to_string()])
        );
        assert_eq!(subs.pending(), 0, "the resync superseded the dirty channels");
        subs.finished(round, true);
        subs.touch("kept".into(), |_| false);
        let round = subs.take(|_| false, || unreachable!()).unwrap();
        assert_eq!((round.subscribe.len(), round.unsubscribe.clone()), (0, vec!["kept".to_string()]));
    }

    #[test]
    fn a_failed_unsubscribe_is_left_by_the_next_resync() {
        let (subs, _woken) = Subscriptions::new();
        let round = resync(&subs, &["a"]);
        subs.finished(round, true);
        subs.touch("a".into(), |_| false);
        let round = subs.take(|_| false, || unreachable!()).unwrap();
        assert_eq!(round.unsubscribe, vec!["a"]);
        subs.finished(round, false);
        let round = resync(&subs, &["ctl"]);
        assert_eq!(round.unsubscribe, vec!["a"], "Redis may still hold it");
    }

    #[test]
    fn a_channel_redis_dropped_is_subscribed_again_if_wanted() {
        let (subs, _woken) = Subscriptions::new();
        let round = resync(&subs, &["a", "b"]);
        subs.finished(round, true);
        subs.lost("a", |_| true);
        subs.lost("b", |_| false);
        let round = subs.take(|c| c == "a", || unreachable!()).unwrap();
        assert_eq!((round.subscribe.clone(), round.unsubscribe.len()), (vec!["a".to_string()], 0));
    }

    #[tokio::test(start_paused = true)]
    async fn settled_waits_for_the_changes_before_it() {
        let (subs, _woken) = Subscriptions::new();
        assert!(!subs.settled(Duration::from_secs(1)).await, "out of step: no wait");
        let round = resync(&subs, &["a"]);
        subs.finished(round, true);
        assert!(subs.settled(Duration::from_secs(1)).await, "nothing changed since");
        subs.touch("b".into(), |_| true);
        assert!(!subs.settled(Duration::from_secs(1)).await, "not carried out within the bound");
        let round = subs.take(|_| true, || unreachable!()).unwrap();
        subs.finished(round, true);
        assert!(subs.settled(Duration::from_secs(1)).await);
        // A change already in effect still counts as a change, and settles with the next round.
        subs.touch("b".into(), |_| true);
        assert_eq!(subs.pending(), 0);
        let round = subs.take(|_| true, || unreachable!()).expect("a round that only reports");
        assert!(round.subscribe.is_empty() && round.unsubscribe.is_empty());
        subs.finished(round, true);
        assert!(subs.settled(Duration::from_secs(1)).await);
    }
}
