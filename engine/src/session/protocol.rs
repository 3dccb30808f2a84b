//! The session's protocol (SPEC §4): what an accepted message does — subscribe, unsubscribe,
//! publish, `auth`, `ping` — and the session's subscriptions in the hub.

use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};

use super::event_loop::{MAX_SUBSCRIPTIONS, Session, Step};
use crate::broker::delivery::Delivery;
use crate::close::{Ending, ErrorCode};
use crate::decisions;

impl<S> Session<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    /// An accepted message, by type.
    pub(super) fn route(&mut self, message: &Value) -> Step {
        let id = message.get("id").and_then(Value::as_str);
        let kind = message.get("type").and_then(Value::as_str).unwrap_or_default();
        let channel = message.get("channel").and_then(Value::as_str);
        match (kind, channel) {
            ("subscribe", Some(channel)) => {
                if !self.channels.iter().any(|c| &**c == channel) {
                    if self.channels.len() >= MAX_SUBSCRIPTIONS {
                        let reason = format!("at most {MAX_SUBSCRIPTIONS} subscriptions per connection");
                        self.queue_error(id, ErrorCode::Forbidden, &reason);
                        return Step::Continue;
                    }
                    self.subscribe(channel);
                }
                self.queue_ok(id);
            }
            ("unsubscribe", Some(channel)) => {
                self.unsubscribe(channel);
                self.queue_ok(id);
            }
            ("publish", Some(channel)) => {
                let data = message.get("data").unwrap_or(&Value::Null);
                let delivery = Delivery::new(channel, self.gw.broker.next_id(), data);
                return Step::Publish(Box::new((delivery, id.map(str::to_string))));
            }
            ("subscribe" | "unsubscribe" | "publish", None) => {
                self.queue_error(id, ErrorCode::SchemaViolation, "`channel` must be a string");
            }
            ("auth", _) => {
                let token = message.get("token").and_then(Value::as_str).unwrap_or_default();
                self.on_auth(id, token);
            }
            ("ping", _) => match id {
                Some(id) => self.queue_json(&json!({"type": "pong", "ref": id})),
                None => self.queue_json(&json!({"type": "pong"})),
            },
            // A type the policy defines beyond the built-in ones: validated and acknowledged.
            _ => self.queue_ok(id),
        }
        Step::Continue
    }

    pub(super) async fn publish(&mut self, delivery: Delivery, id: Option<String>) -> Step {
        match self.gw.broker.publish(delivery).await {
            Ok(_) => {
                self.queue_ok(id.as_deref());
                Step::Continue
            }
            Err(e) => {
                tracing::error!(session = %self.name, error = %e.0, "publish failed");
                Ending::PublishFailed.into()
            }
        }
    }

    /// An `auth` message: a valid token for the same user replaces the session's token and
    /// its expiry; anything else is refused and the current token stands.
    pub(super) fn on_auth(&mut self, id: Option<&str>, token: &str) {
        // The generation this message was decided under; a newer one is adopted (and this new
        // token re-checked under it) at the next event.
        let policy = self.pipeline.ctx.policy().clone();
        match self.admit(&policy, token, "auth") {
            Ok(admission) => {
                self.adopt(policy, Some(token.to_string()), admission);
                self.queue_ok(id);
            }
            Err(denied) => {
                let reason = denied.reason();
                decisions::message_refused(&self.gw.metrics, Ok(ErrorCode::Forbidden), None, &reason, self.who());
                self.queue_error(id, ErrorCode::Forbidden, &reason);
            }
        }
    }

    pub(super) fn subscribe(&mut self, channel: &str) {
        self.gw.broker.subscribe(channel, self.id, &self.outbox);
        // Even when another session subscribed first: its subscription may still be on its way.
        self.listen_pending = true;
        self.channels.push(channel.into());
    }

    pub(super) fn unsubscribe(&mut self, channel: &str) {
        if let Some(i) = self.channels.iter().position(|c| &**c == channel) {
            self.channels.swap_remove(i);
            self.gw.broker.unsubscribe(channel, self.id);
        }
    }
}
