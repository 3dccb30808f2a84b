//! The in-process hub: which local sessions are subscribed to which channels, and delivery to
//! them through bounded outboxes.
//!
//! A delivery is serialized once and shared (reference-counted `Utf8Bytes`) by every
//! subscriber. An outbox is a bounded queue: a subscriber whose queue is full is not waited
//! for — the delivery to it is dropped and the session closes as a slow consumer, so one
//! client that does not read never grows memory or delays anyone else.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::metrics::Metrics;
use tungstenite::Utf8Bytes;

/// A session's id, unique within the process.
pub type SessionId = u64;

/// What a session takes from its outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outbound {
    /// A ready `message` frame (JSON text).
    Frame(Utf8Bytes),
    /// The outbox overflowed: close the session as a slow consumer.
    Overflow,
}

/// One session's queue of deliveries. Bounded: an offer to a full queue is refused and marks
/// the outbox overflowed, and the session then closes. An idle outbox holds no buffer (the
/// queue allocates only while deliveries wait), which matters at tens of thousands of idle
/// connections.
#[derive(Debug, Clone)]
pub(crate) struct Outbox {
    shared: Arc<OutboxShared>,
}

#[derive(Debug)]
struct OutboxShared {
    /// Waiting deliveries, oldest first.
    queue: Mutex<VecDeque<Utf8Bytes>>,
    /// Wakes the session when a delivery arrives or the queue overflows.
    ready: Notify,
    /// Most deliveries waiting at once.
    capacity: usize,
    /// Set once a delivery was refused; the session closes.
    overflowed: AtomicBool,
}

impl Outbox {
    /// An outbox holding at most `capacity` frames.
    pub(crate) fn new(capacity: usize) -> Outbox {
        Outbox {
            shared: Arc::new(OutboxShared {
                queue: Mutex::new(VecDeque::new()),
                ready: Notify::new(),
                capacity,
                overflowed: AtomicBool::new(false),
            }),
        }
    }

    /// Queues a frame without waiting. Returns false when the queue is full (the outbox is
    /// then overflowed for good) or already overflowed.
    pub(crate) fn offer(&self, frame: &Utf8Bytes) -> bool {
        let s = &self.shared;
        if s.overflowed.load(Ordering::Relaxed) {
            return false;
        }
        let queued = {
            let mut queue = s.queue.lock().unwrap_or_else(|e| e.into_inner());
            if queue.len() >= s.capacity {
                s.overflowed.store(true, Ordering::Relaxed);
                false
            } else {
                queue.push_back(frame.clone());
                true
            }
        };
        s.ready.notify_one();
        queued
    }

    /// Whether a delivery was refused because the queue was full: the session must close.
    pub(crate) fn overflowed(&self) -> bool {
        self.shared.overflowed.load(Ordering::Relaxed)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.shared.queue.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn take(&self) -> Option<Utf8Bytes> {
        let mut queue = self.shared.queue.lock().unwrap_or_else(|e| e.into_inner());
        let frame = queue.pop_front();
        if queue.is_empty() && queue.capacity() > 0 {
            // Give the buffer back: a burst does not cost memory for the rest of the connection.
            *queue = VecDeque::new();
        }
        frame
    }

    /// The next delivery, or the overflow notice. Cancel-safe: a frame is only taken in the
    /// poll that returns it.
    pub(crate) async fn recv(&self) -> Outbound {
        loop {
            if self.overflowed() {
                return Outbound::Overflow;
            }
            if let Some(frame) = self.take() {
                return Outbound::Frame(frame);
            }
            self.shared.ready.notified().await;
        }
    }
}

/// Channels and their local subscribers.
#[derive(Debug, Default)]
pub struct Hub {
    channels: Mutex<HashMap<Arc<str>, HashMap<SessionId, Outbox>>>,
    /// Counts deliveries and drops.
    metrics: Arc<Metrics>,
}

/// What a delivery reached.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Fanout {
    /// Sessions the frame was queued for.
    pub delivered: usize,
    /// Sessions whose outbox was full (they are being closed).
    pub dropped: usize,
}

impl Hub {
    /// A hub counting into `metrics`.
    pub(crate) fn with_metrics(metrics: Arc<Metrics>) -> Hub {
        Hub { channels: Mutex::default(), metrics }
    }

    /// Subscribes a session. Returns true when this is the channel's first local subscriber
    /// (a backplane then starts listening for it).
    pub(crate) fn subscribe(&self, channel: &str, session: SessionId, outbox: &Outbox) -> bool {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        let subscribers = channels.entry(Arc::from(channel)).or_default();
        let first = subscribers.is_empty();
        subscribers.insert(session, outbox.clone());
        first
    }

    /// Unsubscribes a session. Returns true when the channel has no local subscriber left.
    pub(crate) fn unsubscribe(&self, channel: &str, session: SessionId) -> bool {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        let Some(subscribers) = channels.get_mut(channel) else { return false };
        if subscribers.remove(&session).is_none() {
            return false;
        }
        if subscribers.is_empty() {
            channels.remove(channel);
            return true;
        }
        false
    }

    /// Removes a session from all of `channels`; returns the channels left without subscribers.
    pub(crate) fn unsubscribe_all<'a>(
        &self,
        channels: impl IntoIterator<Item = &'a str>,
        session: SessionId,
    ) -> Vec<String> {
        channels.into_iter().filter(|c| self.unsubscribe(c, session)).map(str::to_string).collect()
    }

    /// Queues `frame` for every local subscriber of `channel`.
    pub(crate) fn deliver(&self, channel: &str, frame: &Utf8Bytes) -> Fanout {
        // Clone the outboxes out of the lock: queueing never happens under it.
        let outboxes: Vec<Outbox> = {
            let channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
            match channels.get(channel) {
                Some(subscribers) => subscribers.values().cloned().collect(),
                None => return Fanout::default(),
            }
        };
        let mut fanout = Fanout::default();
        for outbox in outboxes {
            if outbox.offer(frame) {
                fanout.delivered += 1;
            } else {
                fanout.dropped += 1;
            }
        }
        self.metrics.messages_delivered.fetch_add(fanout.delivered as u64, Ordering::Relaxed);
        self.metrics.outbound_dropped.fetch_add(fanout.dropped as u64, Ordering::Relaxed);
        fanout
    }

    /// How many channels have a local subscriber.
    pub fn channel_count(&self) -> usize {
        self.channels.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether `channel` has a local subscriber.
    pub(crate) fn has_subscribers(&self, channel: &str) -> bool {
        self.channels.lock().unwrap_or_else(|e| e.into_inner()).contains_key(channel)
    }

    /// Channels with at least one local subscriber.
    pub fn channels(&self) -> HashSet<String> {
        self.channels.lock().unwrap_or_else(|e| e.into_inner()).keys().map(|c| c.to_string()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn delivers_to_subscribers_only_and_tracks_first_and_last() {
        let hub = Hub::default();
        let a = Outbox::new(8);
        let b = Outbox::new(8);
        assert!(hub.subscribe("alerts", 1, &a));
        assert!(!hub.subscribe("alerts", 2, &b));
        assert!(hub.subscribe("user:1", 1, &a));
        let frame = Utf8Bytes::from("{\"type\":\"message\"}");
        assert_eq!(hub.deliver("alerts", &frame), Fanout { delivered: 2, dropped: 0 });
        assert_eq!(hub.deliver("user:1", &frame).delivered, 1);
        assert_eq!(hub.deliver("nobody", &frame).delivered, 0);
        assert_eq!(a.recv().await, Outbound::Frame(frame.clone()));
        assert_eq!(a.recv().await, Outbound::Frame(frame.clone()));
        assert_eq!(b.recv().await, Outbound::Frame(frame.clone()));
        assert!(a.is_empty() && b.is_empty());
        assert!(!hub.unsubscribe("alerts", 1));
        assert!(hub.unsubscribe("alerts", 2));
        assert_eq!(hub.unsubscribe_all(["user:1", "alerts"], 1), vec!["user:1".to_string()]);
        assert!(hub.channels().is_empty());
    }

    #[tokio::test]
    async fn a_full_outbox_refuses_and_stays_overflowed() {
        let hub = Hub::default();
        let slow = Outbox::new(2);
        hub.subscribe("alerts", 1, &slow);
        let frame = Utf8Bytes::from("x");
        let results: Vec<Fanout> = (0..5).map(|_| hub.deliver("alerts", &frame)).collect();
        assert_eq!(results.iter().map(|f| f.delivered).sum::<usize>(), 2);
        assert_eq!(results.iter().map(|f| f.dropped).sum::<usize>(), 3);
        assert!(slow.overflowed());
        assert_eq!(slow.recv().await, Outbound::Overflow, "overflow comes before what is queued");
        assert_eq!(slow.len(), 2, "and never more than the capacity was held");
    }

    #[tokio::test(start_paused = true)]
    async fn recv_waits_for_a_delivery() {
        let outbox = Outbox::new(4);
        let waiting = {
            let outbox = outbox.clone();
            tokio::spawn(async move { outbox.recv().await })
        };
        tokio::task::yield_now().await;
        assert!(outbox.offer(&Utf8Bytes::from("late")));
        assert_eq!(waiting.await.unwrap(), Outbound::Frame(Utf8Bytes::from("late")));
    }
}
