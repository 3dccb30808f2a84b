//! One instance's link to Redis: the connections, the state every Redis task shares (whether
//! Redis is up, the subscriptions, the probes, the leases) and the narrow handles into this
//! instance those tasks act on. What each task does lives in its own sibling file.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::auth::Revocations;
use crate::broker::hub::Hub;
use crate::broker::ids::random_tag;
use crate::broker::redis::keys;
use crate::broker::redis::lease::Leases;
use crate::broker::redis::link::{Commands, Link, Topology};
use crate::broker::redis::probe::Probes;
use crate::broker::redis::subscriptions::Subscriptions;
use crate::metrics::Metrics;
use crate::registry::Registry;

/// One instance's link to Redis and to the other instances through it.
pub struct Redis {
    /// Where Redis is; the subscriber task builds (and rebuilds) its connection from it.
    pub(crate) link: Link,
    /// Commands and publishes (multiplexed, reconnecting).
    commands: Commands,
    /// Names this process in Redis: its publishes, its leases, its probe channel.
    pub(crate) origin: String,
    /// How long a revocation lasts.
    pub(crate) revocation_ttl: Duration,
    pub(crate) metrics: Arc<Metrics>,
    /// Local subscriptions: deliveries from the other instances go there, and they say which
    /// channels are wanted.
    pub(crate) hub: Arc<Hub>,
    /// Local sessions, closed on a replacement or a disconnect from another instance.
    pub(crate) sessions: Arc<Registry>,
    /// Revocations heard from the other instances, or read back from Redis, land here.
    pub(crate) revocations: Arc<Revocations>,
    /// Whether Redis answered the last probe and the subscription delivered it.
    up: AtomicBool,
    /// Whether the current outage has been logged (once per episode).
    outage_logged: AtomicBool,
    /// The probe's channels, and the last probe each delivered.
    pub(crate) probes: Probes,
    /// Malformed payloads dropped (logged at powers of two).
    pub(crate) malformed: AtomicU64,
    /// What should be subscribed in Redis and what is; the subscriber task makes them match.
    pub(crate) subscriptions: Subscriptions,
    pub(crate) leases: Leases,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis").field("origin", &self.origin).field("up", &self.is_up()).finish_non_exhaustive()
    }
}

/// What the Redis tasks act on in this instance, besides Redis: the narrow parts of the gateway
/// they need, so they never hold the gateway itself.
#[derive(Debug, Clone)]
pub(crate) struct Handles {
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) hub: Arc<Hub>,
    pub(crate) sessions: Arc<Registry>,
    pub(crate) revocations: Arc<Revocations>,
    pub(crate) revocation_ttl: Duration,
}

impl Redis {
    /// A link to the Redis at `url` (for a Redis Cluster, its seed nodes; see [`Link::open`]),
    /// and the wake-ups of its subscriber task. Connects lazily: a Redis that is down at start
    /// is waited for (the instance serves locally meanwhile); a malformed URL is an error.
    pub(crate) fn new(
        url: &str,
        topology: Topology,
        handles: Handles,
    ) -> Result<(Arc<Redis>, mpsc::Receiver<()>), String> {
        let link = Link::open(url, topology)?;
        let commands = link.commands()?;
        let (subscriptions, subscriber) = Subscriptions::new();
        let origin = random_tag();
        let Handles { metrics, hub, sessions, revocations, revocation_ttl } = handles;
        metrics.redis_configured.store(1, Ordering::Relaxed);
        metrics.redis_up.store(0, Ordering::Relaxed);
        let redis = Arc::new(Redis {
            link,
            commands,
            revocation_ttl,
            metrics,
            hub,
            sessions,
            revocations,
            up: AtomicBool::new(false),
            outage_logged: AtomicBool::new(false),
            probes: Probes::new(&origin),
            origin,
            malformed: AtomicU64::new(0),
            subscriptions,
            leases: Leases::default(),
        });
        Ok((redis, subscriber))
    }

    /// This process's name in Redis.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Channels whose subscribe or unsubscribe Redis has not carried out yet. While Redis is
    /// away this is at most the channels wanted or held, however many changes were made.
    pub fn pending_subscriptions(&self) -> usize {
        self.subscriptions.pending()
    }

    /// Whether Redis is reachable and the subscription works.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub(crate) fn mark_down(&self, why: &str) {
        self.up.store(false, Ordering::Relaxed);
        self.subscriptions.out_of_step();
        self.metrics.redis_up.store(0, Ordering::Relaxed);
        if !self.outage_logged.swap(true, Ordering::Relaxed) {
            tracing::error!(
                error = why,
                "Redis unavailable: clients stay connected and local delivery goes on; cross-instance delivery is off and limits count this instance only until it returns"
            );
        }
    }

    pub(crate) fn mark_up(&self) {
        let was_up = self.up.swap(true, Ordering::Relaxed);
        self.metrics.redis_up.store(1, Ordering::Relaxed);
        if self.outage_logged.swap(false, Ordering::Relaxed) {
            tracing::info!("Redis available again: resubscribed, leases and revocations restored");
        } else if !was_up {
            tracing::info!("connected to Redis");
        }
    }

    pub(crate) fn connection(&self) -> Commands {
        self.commands.clone()
    }

    /// One `PUBLISH` (`SPUBLISH` on a Redis Cluster); a failure marks Redis away. Returns
    /// whether Redis took it.
    pub(crate) async fn send(&self, channel: &str, payload: &str) -> bool {
        let published: redis::RedisResult<i64> =
            redis::cmd(self.link.publish_command()).arg(channel).arg(payload).query_async(&mut self.connection()).await;
        match published {
            Ok(_) => true,
            Err(e) => {
                self.mark_down(&e.to_string());
                false
            }
        }
    }

    /// Has the subscriber task subscribe to everything wanted (after `rebuild`, on a new
    /// connection) and waits (at most `within`) for whether it succeeded.
    pub(crate) async fn resync(&self, rebuild: bool, within: Duration) -> bool {
        let answer = self.subscriptions.resync(rebuild);
        matches!(tokio::time::timeout(within, answer).await, Ok(Ok(true)))
    }

    /// The channels this instance listens to whatever its clients do: control and its probes.
    pub(crate) fn own_channels(&self) -> Vec<String> {
        let mut channels = vec![keys::CONTROL.to_string()];
        channels.extend(self.probes.channels());
        channels
    }

    /// Whether this instance wants Redis channel `channel` subscribed: a client channel while
    /// it has a local subscriber, its own channels always.
    pub(crate) fn wants(&self, channel: &str) -> bool {
        match keys::client_channel(channel) {
            Some(client_channel) => self.hub.has_subscribers(client_channel),
            None => self.own_channels().iter().any(|c| c == channel),
        }
    }

    /// Every Redis channel this instance wants subscribed.
    pub(crate) fn everything(&self) -> HashSet<String> {
        let mut channels: HashSet<String> = self.own_channels().into_iter().collect();
        channels.extend(self.hub.channels().iter().map(|c| keys::channel(c)));
        channels
    }
}
