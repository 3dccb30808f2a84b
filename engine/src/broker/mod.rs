//! The broker: local subscriptions in a [`hub::Hub`], and a backplane that carries every
//! publish to every instance — this one alone, or several through Redis (`--redis`,
//! [`redis`]). [`Broker`] owns both, with the message ids; nothing else reaches Redis.

pub mod delivery;
pub mod hub;
pub(crate) mod ids;
pub mod redis;

use std::net::IpAddr;
use std::sync::Arc;

pub use delivery::Delivery;

use crate::auth::Revocations;
use crate::broker::delivery::{Backplane, BrokerError, LocalBackplane};
use crate::broker::hub::{Fanout, Hub, Outbox, SessionId};
use crate::broker::ids::MessageIds;
use crate::broker::redis::admission::{FleetAdmission, Lease};
use crate::broker::redis::backplane::RedisBackplane;
use crate::broker::redis::instance::{Handles, Redis};
use crate::broker::redis::link::Topology;
use crate::broker::redis::{health, subscriber};
use crate::metrics::Metrics;
use crate::policy::decision::ConnLimits;
use crate::registry::Registry;

/// Fan-out for one instance: who is subscribed here, how a publish reaches every instance, and
/// (with `--redis`) the link to the others.
pub struct Broker {
    /// Local channel subscriptions.
    hub: Arc<Hub>,
    /// Carries publishes to every instance (embedded: just this one).
    backplane: Arc<dyn Backplane>,
    /// Message ids, unique across instances.
    ids: MessageIds,
    /// `None`: a single instance.
    redis: Option<Arc<Redis>>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").field("redis", &self.redis).finish_non_exhaustive()
    }
}

impl Broker {
    /// The embedded broker: one instance.
    pub fn local(metrics: Arc<Metrics>) -> Broker {
        let hub = Arc::new(Hub::with_metrics(metrics));
        Broker { backplane: Arc::new(LocalBackplane::new(hub.clone())), hub, ids: MessageIds::new(), redis: None }
    }

    /// A broker for one of several instances sharing the Redis at `url` (a Redis Cluster's seed
    /// nodes, comma-separated, for [`Topology::Cluster`]). Must be called inside the runtime: it
    /// starts the Redis tasks, which end when the broker and the connections' leases are gone.
    /// A Redis that is down is waited for; only a malformed URL is an error. Replacements and
    /// disconnects from other instances close `sessions`; their revocations go to
    /// `revocations`, and last `revocation_ttl`.
    pub fn redis(
        url: &str,
        topology: Topology,
        metrics: Arc<Metrics>,
        sessions: Arc<Registry>,
        revocations: Arc<Revocations>,
        revocation_ttl: std::time::Duration,
    ) -> Result<Broker, String> {
        let hub = Arc::new(Hub::with_metrics(metrics.clone()));
        let handles = Handles { metrics, hub: hub.clone(), sessions, revocations, revocation_ttl };
        let (redis, woken) = Redis::new(url, topology, handles)?;
        let topology = if redis.link.is_sharded() { "cluster" } else { "server" };
        tracing::info!(topology, origin = %redis.origin(), "one of several instances over Redis");
        tokio::spawn(subscriber::run(Arc::downgrade(&redis), redis.link.clone(), woken));
        tokio::spawn(health::run(Arc::downgrade(&redis)));
        Ok(Broker {
            backplane: Arc::new(RedisBackplane::new(redis.clone())),
            hub,
            ids: MessageIds::new(),
            redis: Some(redis),
        })
    }

    /// Local channel subscriptions.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// The link to Redis and the other instances; `None`: a single instance.
    pub fn redis_link(&self) -> Option<&Arc<Redis>> {
        self.redis.as_ref()
    }

    /// Whether this instance is meant to be one of several but cannot reach Redis now.
    pub fn redis_away(&self) -> bool {
        self.redis.as_ref().is_some_and(|r| !r.is_up())
    }

    /// The next message id, unique across instances.
    pub fn next_id(&self) -> String {
        self.ids.next_id()
    }

    /// Delivers `delivery` here and sends it to every other instance.
    pub async fn publish(&self, delivery: Delivery) -> Result<Fanout, BrokerError> {
        self.backplane.publish(delivery).await
    }

    /// Subscribes session `id` to `channel` here; the backplane listens for the channel from
    /// its first local subscriber on.
    pub(crate) fn subscribe(&self, channel: &str, id: SessionId, outbox: &Outbox) {
        if self.hub.subscribe(channel, id, outbox) {
            self.backplane.interest(channel, true);
        }
    }

    /// Ends session `id`'s subscription to `channel`; the backplane stops listening after the
    /// last local subscriber.
    pub(crate) fn unsubscribe(&self, channel: &str, id: SessionId) {
        if self.hub.unsubscribe(channel, id) {
            self.backplane.interest(channel, false);
        }
    }

    /// Ends every subscription of session `id` among `channels`.
    pub(crate) fn unsubscribe_all<'a>(&self, channels: impl Iterator<Item = &'a str>, id: SessionId) {
        for channel in self.hub.unsubscribe_all(channels, id) {
            self.backplane.interest(&channel, false);
        }
    }

    /// Resolves once every subscription made so far is in effect (bounded; see
    /// [`Backplane::listening`]).
    pub(crate) async fn listening(&self) {
        self.backplane.listening().await;
    }

    /// Counts the handshake of `session` against the address's and the user's limits across
    /// every instance, while Redis is up. `None`: count on this instance (a single instance,
    /// Redis away, or Redis failing just now, which marks it away).
    pub(crate) async fn admit(
        &self,
        ip: IpAddr,
        user: &str,
        limits: &ConnLimits,
        session: SessionId,
    ) -> Option<FleetAdmission> {
        let redis = self.redis.as_ref().filter(|r| r.is_up())?;
        redis.admit(ip, user, limits, session).await.ok()
    }

    /// For a handshake counted on this instance: with `--redis`, a lease known here and added
    /// to the counts in Redis when Redis returns.
    pub(crate) fn lease_locally(&self, ip: IpAddr, session: SessionId) -> Option<Lease> {
        self.redis.as_ref().map(|r| r.lease_locally(ip, session))
    }
}
