//! Fan-out: local subscriptions in a [`hub::Hub`], and a [`Backplane`] that carries every
//! publish to every instance. The embedded backplane serves one instance; the Redis one (with
//! `--redis`) implements the same trait.

pub mod hub;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use hub::{Fanout, Hub};
use tungstenite::Utf8Bytes;

/// A published message on its way to subscribers.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The channel.
    pub channel: String,
    /// The message id, the same on every instance.
    pub id: String,
    /// The `message` frame, serialized once and shared by every subscriber (reference-counted,
    /// handed to the WebSocket layer without a copy).
    pub frame: Utf8Bytes,
}

impl Delivery {
    /// Builds the `message` frame for `data` on `channel`.
    pub fn new(channel: &str, id: String, data: &serde_json::Value) -> Delivery {
        let frame = serde_json::json!({"type": "message", "channel": channel, "id": id, "data": data}).to_string();
        Delivery { channel: channel.to_string(), id, frame: Utf8Bytes::from(frame) }
    }
}

/// Why a publish did not leave this instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerError(pub String);

/// A boxed future, so backplanes can be used as trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Carries deliveries between instances.
pub trait Backplane: Send + Sync + 'static {
    /// Sends a delivery to every instance, this one included (which hands it to its hub).
    fn publish(&self, delivery: Delivery) -> BoxFuture<'_, Result<Fanout, BrokerError>>;
    /// This instance has gained its first local subscriber of `channel` (`true`) or lost its
    /// last (`false`); a backplane listens only for channels with local subscribers.
    fn interest(&self, channel: &str, subscribed: bool);
}

/// The embedded backplane: one instance, delivery straight to the local hub.
#[derive(Debug)]
pub struct LocalBackplane {
    hub: Arc<Hub>,
}

impl LocalBackplane {
    /// A backplane over `hub`.
    pub fn new(hub: Arc<Hub>) -> LocalBackplane {
        LocalBackplane { hub }
    }
}

impl Backplane for LocalBackplane {
    fn publish(&self, delivery: Delivery) -> BoxFuture<'_, Result<Fanout, BrokerError>> {
        Box::pin(async move { Ok(self.hub.deliver(&delivery.channel, &delivery.frame)) })
    }

    fn interest(&self, _channel: &str, _subscribed: bool) {}
}

/// Makes message ids unique across instances: a random prefix per process and a counter.
#[derive(Debug)]
pub struct MessageIds {
    prefix: String,
    next: AtomicU64,
}

impl MessageIds {
    /// Ids with a fresh random prefix.
    pub fn new() -> MessageIds {
        let mut bytes = [0u8; 6];
        // Uniqueness, not secrecy: fall back to the clock if the OS has no randomness.
        if getrandom::fill(&mut bytes).is_err() {
            let nanos =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
            bytes.copy_from_slice(&nanos.to_le_bytes()[..6]);
        }
        MessageIds { prefix: bytes.iter().map(|b| format!("{b:02x}")).collect(), next: AtomicU64::new(1) }
    }

    /// The next id.
    pub fn next_id(&self) -> String {
        format!("{}-{:x}", self.prefix, self.next.fetch_add(1, Ordering::Relaxed))
    }
}

impl Default for MessageIds {
    fn default() -> Self {
        Self::new()
    }
}
