//! The in-process hub: which local sessions are subscribed to which channels, and delivery to
//! them through bounded outboxes.
//!
//! A delivery is serialized once and shared (reference-counted `Utf8Bytes`) by every subscriber. An outbox is a
//! bounded queue: a subscriber whose queue is full is not waited for — the delivery to it is
//! dropped and the session is told to close as a slow consumer, so one client that does not
//! read never grows memory or delays anyone else.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// A session's id, unique within the process.
pub type SessionId = u64;

/// What the hub hands a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    /// A ready `message` frame (JSON text).
    Frame(Utf8Bytes),
    /// The session's outbox overflowed: close it as a slow consumer.
    Overflow,
}

/// One session's end of the hub.
#[derive(Debug, Clone)]
pub struct Outbox {
    /// Bounded queue into the session task.
    pub tx: mpsc::Sender<Outbound>,
    /// Set once the overflow notice is queued, so it is sent only once.
    overflowed: Arc<std::sync::atomic::AtomicBool>,
}

impl Outbox {
    /// An outbox and its receiving end, holding at most `capacity` frames.
    pub fn new(capacity: usize) -> (Outbox, mpsc::Receiver<Outbound>) {
        // One extra slot keeps room for the overflow notice itself.
        let (tx, rx) = mpsc::channel(capacity + 1);
        (Outbox { tx, overflowed: Arc::default() }, rx)
    }

    /// Queues a frame without waiting. Returns false when the session is gone or overflowed.
    pub fn offer(&self, frame: &Utf8Bytes) -> bool {
        use std::sync::atomic::Ordering;
        if self.overflowed.load(Ordering::Relaxed) {
            return false;
        }
        // Keep the last slot for the overflow notice.
        if self.tx.capacity() <= 1 {
            self.overflowed.store(true, Ordering::Relaxed);
            let _ = self.tx.try_send(Outbound::Overflow);
            return false;
        }
        self.tx.try_send(Outbound::Frame(frame.clone())).is_ok()
    }

    /// Whether a delivery was dropped because the queue was full: the session must close.
    pub fn overflowed(&self) -> bool {
        self.overflowed.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Channels and their local subscribers.
#[derive(Debug, Default)]
pub struct Hub {
    channels: Mutex<HashMap<Arc<str>, HashMap<SessionId, Outbox>>>,
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
    /// Subscribes a session. Returns true when this is the channel's first local subscriber
    /// (a backplane then starts listening for it).
    pub fn subscribe(&self, channel: &str, session: SessionId, outbox: &Outbox) -> bool {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        let subscribers = channels.entry(Arc::from(channel)).or_default();
        let first = subscribers.is_empty();
        subscribers.insert(session, outbox.clone());
        first
    }

    /// Unsubscribes a session. Returns true when the channel has no local subscriber left.
    pub fn unsubscribe(&self, channel: &str, session: SessionId) -> bool {
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
    pub fn unsubscribe_all<'a>(&self, channels: impl IntoIterator<Item = &'a str>, session: SessionId) -> Vec<String> {
        channels.into_iter().filter(|c| self.unsubscribe(c, session)).map(str::to_string).collect()
    }

    /// Queues `frame` for every local subscriber of `channel`.
    pub fn deliver(&self, channel: &str, frame: &Utf8Bytes) -> Fanout {
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
        fanout
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
        let (a, mut ra) = Outbox::new(8);
        let (b, mut rb) = Outbox::new(8);
        assert!(hub.subscribe("alerts", 1, &a));
        assert!(!hub.subscribe("alerts", 2, &b));
        assert!(hub.subscribe("user:1", 1, &a));
        let frame = Utf8Bytes::from("{\"type\":\"message\"}");
        assert_eq!(hub.deliver("alerts", &frame), Fanout { delivered: 2, dropped: 0 });
        assert_eq!(hub.deliver("user:1", &frame).delivered, 1);
        assert_eq!(hub.deliver("nobody", &frame).delivered, 0);
        assert_eq!(ra.recv().await, Some(Outbound::Frame(frame.clone())));
        assert_eq!(ra.recv().await, Some(Outbound::Frame(frame.clone())));
        assert_eq!(rb.recv().await, Some(Outbound::Frame(frame.clone())));
        assert!(!hub.unsubscribe("alerts", 1));
        assert!(hub.unsubscribe("alerts", 2));
        assert_eq!(hub.unsubscribe_all(["user:1", "alerts"], 1), vec!["user:1".to_string()]);
        assert!(hub.channels().is_empty());
    }

    #[tokio::test]
    async fn a_full_outbox_drops_and_signals_overflow_once() {
        let hub = Hub::default();
        let (slow, mut rx) = Outbox::new(2);
        hub.subscribe("alerts", 1, &slow);
        let frame = Utf8Bytes::from("x");
        let results: Vec<Fanout> = (0..5).map(|_| hub.deliver("alerts", &frame)).collect();
        assert_eq!(results.iter().map(|f| f.delivered).sum::<usize>(), 2);
        assert_eq!(results.iter().map(|f| f.dropped).sum::<usize>(), 3);
        let mut got = Vec::new();
        while let Ok(o) = rx.try_recv() {
            got.push(o);
        }
        assert_eq!(got, vec![Outbound::Frame(frame.clone()), Outbound::Frame(frame), Outbound::Overflow]);
    }
}
