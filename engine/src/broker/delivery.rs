//! What a publish is on its way out ([`Delivery`]) and the [`Backplane`] trait that carries it
//! to every instance, with the embedded backplane that serves one instance alone. The Redis one
//! (with `--redis`) is [`crate::broker::redis::backplane`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::broker::hub::{Fanout, Hub};
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

    /// Builds the frame around `data` that is already JSON text (as it came from another
    /// instance), without parsing it again. The keys are in the order [`Delivery::new`] writes
    /// them, so a message is the same bytes whichever instance framed it.
    pub(crate) fn from_raw(channel: &str, id: String, data: &serde_json::value::RawValue) -> Delivery {
        let quoted = |s: &str| serde_json::Value::from(s).to_string();
        let frame = format!(
            "{{\"channel\":{},\"data\":{},\"id\":{},\"type\":\"message\"}}",
            quoted(channel),
            data.get(),
            quoted(&id)
        );
        Delivery { channel: channel.to_string(), id, frame: Utf8Bytes::from(frame) }
    }
}

/// Why a publish did not leave this instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerError(pub String);

/// A boxed future, so backplanes can be used as trait objects.
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Carries deliveries between instances.
pub(crate) trait Backplane: Send + Sync + 'static {
    /// Sends a delivery to every instance, this one included (which hands it to its hub).
    fn publish(&self, delivery: Delivery) -> BoxFuture<'_, Result<Fanout, BrokerError>>;
    /// This instance has gained its first local subscriber of `channel` (`true`) or lost its
    /// last (`false`); a backplane listens only for channels with local subscribers.
    fn interest(&self, channel: &str, subscribed: bool);
    /// Resolves once every interest declared so far is in effect: a session waits for it
    /// before it confirms a subscription (its welcome, or `ok` to a `subscribe`), so that
    /// anything published after the confirmation reaches it. Bounded: a backplane that cannot
    /// confirm (Redis away) resolves anyway.
    fn listening(&self) -> BoxFuture<'_, ()>;
}

/// The embedded backplane: one instance, delivery straight to the local hub.
#[derive(Debug)]
pub(crate) struct LocalBackplane {
    hub: Arc<Hub>,
}

impl LocalBackplane {
    pub(crate) fn new(hub: Arc<Hub>) -> LocalBackplane {
        LocalBackplane { hub }
    }
}

impl Backplane for LocalBackplane {
    fn publish(&self, delivery: Delivery) -> BoxFuture<'_, Result<Fanout, BrokerError>> {
        Box::pin(async move { Ok(self.hub.deliver(&delivery.channel, &delivery.frame)) })
    }

    fn interest(&self, _channel: &str, _subscribed: bool) {}

    fn listening(&self) -> BoxFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_from_raw_data_is_the_same_bytes_as_one_from_a_value() {
        let data = serde_json::json!({"level": "high", "n": [1, 2.5, "\u{e9}\"x"]});
        let raw = serde_json::value::RawValue::from_string(data.to_string()).unwrap();
        let a = Delivery::new("alerts:\"eu\"", "ab-1".into(), &data);
        let b = Delivery::from_raw("alerts:\"eu\"", "ab-1".into(), &raw);
        assert_eq!(a.frame, b.frame);
        let parsed: serde_json::Value = serde_json::from_str(b.frame.as_str()).unwrap();
        assert_eq!(parsed["data"], data);
        assert_eq!(parsed["type"], "message");
    }
}
