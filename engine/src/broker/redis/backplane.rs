//! The Redis backplane. A publish is delivered to this instance's subscribers at once and
//! published to `wsgate:ch:<channel>`; other instances deliver it to theirs. An instance
//! subscribes only to the channels it has local subscribers for, and skips its own publishes
//! when Redis echoes them (they carry its origin), so every subscriber gets a message exactly
//! once, under the id its publisher gave it.

use std::sync::Arc;

use crate::broker::delivery::{Backplane, BoxFuture, BrokerError, Delivery};
use crate::broker::hub::Fanout;
use crate::broker::redis::instance::Redis;
use crate::broker::redis::keys;
use crate::broker::redis::link::RESPONSE_TIMEOUT;
use crate::broker::redis::wire;

/// Local delivery at once, then one publish for the other instances.
#[derive(Debug)]
pub(crate) struct RedisBackplane {
    redis: Arc<Redis>,
}

impl RedisBackplane {
    pub(crate) fn new(redis: Arc<Redis>) -> RedisBackplane {
        RedisBackplane { redis }
    }
}

impl Backplane for RedisBackplane {
    fn publish(&self, delivery: Delivery) -> BoxFuture<'_, Result<Fanout, BrokerError>> {
        Box::pin(async move {
            let fanout = self.redis.hub.deliver(&delivery.channel, &delivery.frame);
            // Skipped while Redis is away.
            if self.redis.is_up() {
                let payload = wire::encode(&delivery, &self.redis.origin);
                self.redis.send(&keys::channel(&delivery.channel), &payload).await;
            }
            Ok(fanout)
        })
    }

    fn listening(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if !self.redis.is_up() {
                return; // nothing to wait for: delivery is local until Redis returns
            }
            self.redis.subscriptions.settled(RESPONSE_TIMEOUT).await;
        })
    }

    fn interest(&self, channel: &str, _subscribed: bool) {
        // The hub, not the order of the calls, says whether the channel is wanted: of a last
        // unsubscribe and a new first subscribe racing, the outcome is the hub's final state.
        self.redis.subscriptions.touch(keys::channel(channel), |c| self.redis.wants(c));
    }
}
