//! Several instances as one gateway, through Redis (`--redis URL`).
//!
//! - **Fan-out** ([`RedisBackplane`]): a publish is delivered to this instance's subscribers at
//!   once and published to `wsgate:ch:<channel>`; other instances deliver it to theirs. An
//!   instance subscribes only to the channels it has local subscribers for, and skips its own
//!   publishes when Redis echoes them (they carry its origin), so every subscriber gets a
//!   message exactly once, under the id its publisher gave it. What it subscribes to is kept as
//!   state, not as a queue of orders ([`subscriptions`]): bounded by the channels, however long
//!   Redis is away.
//! - **Counts** ([`scripts`]): per-IP concurrent connections, the per-user reconnect window and
//!   the user's live connections (`max_per_user`, newest wins) are counted in Redis by atomic
//!   scripts, over leases that lapse when an instance stops renewing them.
//! - **Control** ([`wire::Control`] on `wsgate:control`): replacements (4009) and disconnects
//!   (4010) of connections on other instances. Revocations are also kept in one Redis sorted
//!   set (`wsgate:revocations`), read by an instance when it starts and whenever Redis returns.
//! - **Topology** ([`link`]): one server, or a Redis Cluster with sharded pub/sub
//!   (`--redis-cluster`), where commands, pipelines and scripts each stay within one hash slot.
//! - **Health**: every [`PROBE_INTERVAL`] the instance publishes a probe to a channel only it
//!   subscribes to and checks that the last one came back through its subscription: a
//!   subscription that is wedged while commands still work is noticed and rebuilt. While Redis
//!   is away (`wsgate_redis_up` 0, `/readyz` 503) every client stays connected, local delivery
//!   goes on, and the limits fall back to this instance's own counts.

pub mod keys;
pub mod link;
mod probe;
mod scripts;
mod subscriptions;
pub mod wire;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc;

use crate::broker::hub::{Fanout, Hub, SessionId};
use crate::broker::{Backplane, BoxFuture, BrokerError, Delivery, random_tag};
use crate::close::CloseCode;
use crate::gateway::Gateway;
use crate::metrics::Metrics;
use crate::policy::ConnLimits;
use wire::{Control, Dropped};

/// How often the instance probes Redis and its own subscription.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// On a Redis Cluster, how many probes pass between readings of the slot map (which choose the
/// probe channels, one per primary); a failed probe reads it again at once.
pub const PROBE_TOPOLOGY_EVERY: u64 = 10;
/// Probes in a row that may go missing before the subscription connection is rebuilt.
pub const WEDGED_AFTER: u32 = 3;
/// How long a connection's lease lasts unless renewed: a crashed instance's connections stop
/// counting after this.
pub const LEASE: Duration = Duration::from_secs(30);
/// How often an instance renews its connections' leases.
pub const LEASE_REFRESH: Duration = Duration::from_secs(10);
pub use link::RESPONSE_TIMEOUT;
pub use link::Topology;
use link::{Commands, Link};
/// Commands per pipeline when renewing leases.
const PIPELINE_CHUNK: usize = 500;

/// One instance's link to Redis.
pub struct Cluster {
    /// Where Redis is; the subscriber task builds (and rebuilds) its connection from it.
    link: Link,
    /// Commands and publishes (multiplexed, reconnecting).
    commands: Commands,
    /// Names this process in Redis: its publishes, its leases, its probe channel.
    origin: String,
    /// How long a revocation lasts.
    revocation_ttl: Duration,
    metrics: Arc<Metrics>,
    /// Whether Redis answered the last probe and the subscription delivered it.
    up: AtomicBool,
    /// Whether the current outage has been logged (once per episode).
    outage_logged: AtomicBool,
    /// The probe's channels, and the last probe each delivered.
    probes: probe::Probes,
    /// Malformed payloads dropped (logged at powers of two).
    malformed: AtomicU64,
    /// What should be subscribed in Redis and what is; the subscriber task makes them match.
    subscriptions: subscriptions::Subscriptions,
    /// The subscriber task's wake-ups, until [`Cluster::start`] takes them.
    subscriber: Mutex<Option<mpsc::Receiver<()>>>,
    /// This instance's live connections in Redis: member → the sets holding it.
    leases: Mutex<HashMap<Box<str>, LeaseKeys>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("origin", &self.origin).field("up", &self.is_up()).finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct LeaseKeys {
    ip: String,
    user: Option<String>,
}

/// A connection counted in Redis; dropping it takes the connection out of the counts.
pub struct Lease {
    cluster: Arc<Cluster>,
    member: Box<str>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Lease").field(&self.member).finish()
    }
}

impl Lease {
    /// The connection's name in Redis.
    pub fn member(&self) -> &str {
        &self.member
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.cluster.release(&self.member);
    }
}

/// The cluster's answer to a handshake.
#[derive(Debug)]
pub enum Admission {
    /// Counted: the connection holds this lease.
    Admitted(Lease),
    /// The address has `max_per_ip` live connections across the cluster.
    PerIp,
    /// The user reconnected too often; a slot frees after this long.
    Reconnects(Duration),
}

/// Milliseconds since the epoch on this machine's clock.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Cluster {
    /// A link to the Redis at `url` (for a cluster, its seed nodes; see [`Link::open`]).
    /// Connects lazily: a Redis that is down at start is waited for (the instance serves
    /// locally meanwhile); a malformed URL is an error.
    pub fn new(
        url: &str,
        topology: Topology,
        metrics: Arc<Metrics>,
        revocation_ttl: Duration,
    ) -> Result<Arc<Cluster>, String> {
        let link = Link::open(url, topology)?;
        let commands = link.commands()?;
        let (subscriptions, subscriber) = subscriptions::Subscriptions::new();
        let origin = random_tag();
        metrics.redis_configured.store(1, Ordering::Relaxed);
        metrics.redis_up.store(0, Ordering::Relaxed);
        Ok(Arc::new(Cluster {
            link,
            commands,
            revocation_ttl,
            metrics,
            up: AtomicBool::new(false),
            outage_logged: AtomicBool::new(false),
            probes: probe::Probes::new(&origin),
            origin,
            malformed: AtomicU64::new(0),
            subscriptions,
            subscriber: Mutex::new(Some(subscriber)),
            leases: Mutex::default(),
        }))
    }

    /// Starts the subscriber and the health loop for `gw`. They hold the gateway weakly and
    /// end with it.
    pub fn start(&self, gw: &Arc<Gateway>) {
        let Some(rx) = self.subscriber.lock().unwrap_or_else(|e| e.into_inner()).take() else { return };
        let topology = if self.link.is_sharded() { "cluster" } else { "server" };
        tracing::info!(topology, origin = %self.origin, "one of several instances over Redis");
        tokio::spawn(subscriptions::run(Arc::downgrade(gw), self.link.clone(), rx));
        tokio::spawn(health(Arc::downgrade(gw)));
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

    fn mark_down(&self, why: &str) {
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

    fn mark_up(&self) {
        let was_up = self.up.swap(true, Ordering::Relaxed);
        self.metrics.redis_up.store(1, Ordering::Relaxed);
        if self.outage_logged.swap(false, Ordering::Relaxed) {
            tracing::info!("Redis available again: resubscribed, leases and revocations restored");
        } else if !was_up {
            tracing::info!("connected to Redis");
        }
    }

    fn connection(&self) -> Commands {
        self.commands.clone()
    }

    /// Publishes a delivery for the other instances. Skipped while Redis is away.
    async fn publish(&self, delivery: &Delivery) {
        if self.is_up() {
            self.send(&keys::channel(&delivery.channel), &wire::encode(delivery, &self.origin)).await;
        }
    }

    /// One `PUBLISH` (`SPUBLISH` on a cluster); a failure marks Redis away. Returns whether
    /// Redis took it.
    async fn send(&self, channel: &str, payload: &str) -> bool {
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
    async fn resync(&self, rebuild: bool, within: Duration) -> bool {
        let answer = self.subscriptions.resync(rebuild);
        matches!(tokio::time::timeout(within, answer).await, Ok(Ok(true)))
    }

    /// Counts a handshake against the address's and the user's cluster-wide limits; `Err`
    /// when Redis failed (it is then marked away and the caller counts locally).
    pub async fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        user: &str,
        limits: &ConnLimits,
        member: String,
    ) -> Result<Admission, ()> {
        let ip_key = keys::ip(ip);
        let reply = if self.link.is_sharded() {
            self.admit_in_two_slots(&ip_key, user, limits, &member).await
        } else {
            scripts::ADMIT
                .key(&ip_key)
                .key(keys::reconnects(user))
                .arg(now_ms())
                .arg(millis(LEASE))
                .arg(&member)
                .arg(limits.max_per_ip)
                .arg(limits.reconnects_max)
                .arg(millis(limits.reconnects_per))
                .invoke_async(&mut self.connection())
                .await
        };
        match reply {
            Ok((0, _)) => Ok(Admission::Admitted(self.lease(ip_key, member))),
            Ok((1, _)) => Ok(Admission::PerIp),
            Ok((_, wait)) => Ok(Admission::Reconnects(Duration::from_millis(u64::try_from(wait).unwrap_or(1)))),
            Err(e) => {
                self.mark_down(&e.to_string());
                Err(())
            }
        }
    }

    /// [`scripts::ADMIT`] on a cluster, where the address's key and the user's lie in different
    /// slots: the address is counted first, then the user's reconnects; a refusal of the second
    /// takes the first back. Each step is atomic; between them another handshake from the same
    /// address may see this one counted (and be refused by a slot that is then freed).
    async fn admit_in_two_slots(
        &self,
        ip_key: &str,
        user: &str,
        limits: &ConnLimits,
        member: &str,
    ) -> redis::RedisResult<(i64, i64)> {
        let mut con = self.connection();
        let now = now_ms();
        let full: i64 = scripts::ADMIT_IP
            .key(ip_key)
            .arg(now)
            .arg(millis(LEASE))
            .arg(member)
            .arg(limits.max_per_ip)
            .invoke_async(&mut con)
            .await?;
        if full != 0 {
            return Ok((1, 0));
        }
        let wait: redis::RedisResult<i64> = scripts::ADMIT_RECONNECT
            .key(keys::reconnects(user))
            .arg(now)
            .arg(member)
            .arg(limits.reconnects_max)
            .arg(millis(limits.reconnects_per))
            .invoke_async(&mut con)
            .await;
        if !matches!(wait, Ok(0)) {
            // Refused, or Redis failed (the caller then counts locally): take the address's
            // count back. Should that fail, the lease lapses by itself within [`LEASE`]; the
            // outcome stands either way.
            let _: redis::RedisResult<i64> = redis::cmd("ZREM").arg(ip_key).arg(member).query_async(&mut con).await;
        }
        match wait? {
            0 => Ok((0, 0)),
            wait => Ok((2, wait)),
        }
    }

    /// A lease for a connection admitted while Redis was away: it is known here and is added
    /// to the cluster's counts when Redis returns.
    pub fn lease_locally(self: &Arc<Self>, ip: IpAddr, member: String) -> Lease {
        self.lease(keys::ip(ip), member)
    }

    fn lease(self: &Arc<Self>, ip_key: String, member: String) -> Lease {
        let member: Box<str> = member.into();
        self.leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(member.clone(), LeaseKeys { ip: ip_key, user: None });
        Lease { cluster: self.clone(), member }
    }

    /// Records the connection of `lease` as one of `user`'s live connections; those beyond the
    /// user's `max` (the oldest, wherever they are) are closed with 4009.
    pub async fn register(&self, gw: &Gateway, lease: &str, user: &str, max: u64) {
        let user_key = keys::user(user);
        match self.leases.lock().unwrap_or_else(|e| e.into_inner()).get_mut(lease) {
            Some(keys) => keys.user = Some(user_key.clone()),
            None => return, // the connection has already ended
        }
        if !self.is_up() {
            return;
        }
        let displaced: redis::RedisResult<Vec<String>> = scripts::REGISTER
            .key(&user_key)
            .arg(now_ms())
            .arg(millis(LEASE))
            .arg(lease)
            .arg(max)
            .invoke_async(&mut self.connection())
            .await;
        let displaced = match displaced {
            Ok(d) => d,
            Err(e) => return self.mark_down(&e.to_string()),
        };
        if !self.leases.lock().unwrap_or_else(|e| e.into_inner()).contains_key(lease) {
            // Ended while being registered: take it out again.
            let _: redis::RedisResult<i64> =
                redis::cmd("ZREM").arg(&user_key).arg(lease).query_async(&mut self.connection()).await;
        }
        let mut elsewhere: BTreeMap<&str, Vec<SessionId>> = BTreeMap::new();
        for member in &displaced {
            match keys::parse_member(member) {
                Some((origin, session)) if origin == self.origin => {
                    gw.sessions.close_session(user, session, CloseCode::Replaced, REPLACED);
                }
                Some((origin, session)) => elsewhere.entry(origin).or_default().push(session),
                None => {}
            }
        }
        for (origin, sessions) in elsewhere {
            let control = Control::Replace { to: origin.to_string(), user: user.to_string(), sessions };
            self.control(&control).await;
        }
    }

    async fn control(&self, control: &Control) -> bool {
        self.send(keys::CONTROL, &control.encode()).await
    }

    /// `POST /v1/disconnect` taken here (and done locally already): records the revocation in
    /// Redis and tells every other instance. Returns whether Redis carried it.
    pub async fn disconnect(&self, user: &str, reason: &str, revoked_at: Option<SystemTime>) -> bool {
        let revoked_at_ms = revoked_at.map(|t| t.duration_since(UNIX_EPOCH).map_or(0, millis));
        if let Some(at) = revoked_at_ms {
            let forget_at = at.saturating_add(millis(self.revocation_ttl));
            let now = now_ms();
            let stored: redis::RedisResult<i64> = scripts::REVOKE
                .key(keys::REVOCATIONS)
                .arg(now)
                .arg(forget_at)
                .arg(keys::revocation(at, user))
                .arg(forget_at.saturating_sub(now).max(1))
                .invoke_async(&mut self.connection())
                .await;
            if let Err(e) = stored {
                self.mark_down(&e.to_string());
                return false;
            }
        }
        let control = Control::Disconnect {
            from: self.origin.clone(),
            user: user.to_string(),
            reason: reason.to_string(),
            revoked_at_ms,
        };
        self.control(&control).await
    }

    /// Takes a connection out of the counts (it ended).
    fn release(&self, member: &str) {
        let Some(keys) = self.leases.lock().unwrap_or_else(|e| e.into_inner()).remove(member) else { return };
        if !self.is_up() {
            return; // the lease lapses by itself
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let mut con = self.connection();
        let member = member.to_string();
        runtime.spawn(async move {
            // One command per key: on a cluster the two keys lie in different slots.
            for key in std::iter::once(&keys.ip).chain(&keys.user) {
                let _: redis::RedisResult<i64> = redis::cmd("ZREM").arg(key).arg(&member).query_async(&mut con).await;
            }
        });
    }

    /// Renews (or, after Redis lost them, restores) the leases of every live connection here.
    async fn renew_leases(&self) -> redis::RedisResult<()> {
        // (pipeline group, key) → the key's members. A pipeline holds one group (on a cluster,
        // one hash slot), so it is sent whenever the group changes or it is full.
        let mut members: BTreeMap<(u16, String), Vec<Box<str>>> = BTreeMap::new();
        for (member, keys) in self.leases.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            for key in std::iter::once(&keys.ip).chain(&keys.user) {
                members.entry((self.link.group(key), key.clone())).or_default().push(member.clone());
            }
        }
        let lease = millis(LEASE);
        let mut pipes = Vec::new();
        let mut pipe = redis::pipe();
        let mut pipe_group = None;
        for ((group, key), members) in members {
            if pipe_group != Some(group) || pipe.len() >= PIPELINE_CHUNK {
                if !pipe.is_empty() {
                    pipes.push(std::mem::take(&mut pipe));
                }
                pipe_group = Some(group);
            }
            for chunk in members.chunks(PIPELINE_CHUNK) {
                let until = now_ms() + lease;
                let zadd = pipe.cmd("ZADD").arg(&key);
                for member in chunk {
                    zadd.arg(until).arg(&**member);
                }
                zadd.ignore();
            }
            pipe.cmd("PEXPIRE").arg(&key).arg(lease).ignore();
        }
        if !pipe.is_empty() {
            pipes.push(pipe);
        }
        // On a cluster, one pipeline per slot: many, sent a few at a time.
        let results: Vec<redis::RedisResult<()>> = futures_util::stream::iter(pipes)
            .map(|pipe| {
                let mut con = self.connection();
                async move { pipe.query_async::<()>(&mut con).await }
            })
            .buffer_unordered(link::IN_FLIGHT)
            .collect()
            .await;
        results.into_iter().collect()
    }

    /// Reads every revocation in Redis into `gw`'s (an instance started later, or back from an
    /// outage, honours the ones it did not hear of).
    async fn load_revocations(&self, gw: &Gateway) -> redis::RedisResult<usize> {
        let now = now_ms();
        let live: Vec<(String, f64)> = redis::cmd("ZRANGEBYSCORE")
            .arg(keys::REVOCATIONS)
            .arg(now)
            .arg("+inf")
            .arg("WITHSCORES")
            .query_async(&mut self.connection())
            .await?;
        let mut loaded = 0;
        for (member, forget_at) in &live {
            let Some((at, user)) = keys::parse_revocation(member) else { continue };
            // Scores are whole milliseconds, exact in a double.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let forget_at = UNIX_EPOCH + Duration::from_millis(*forget_at as u64);
            gw.revocations.insert(user, UNIX_EPOCH + Duration::from_millis(at), forget_at);
            loaded += 1;
        }
        Ok(loaded)
    }

    /// Sends the probe numbered `seq` on every probe channel; answers the fewest subscribers
    /// any of them reached (0 when there is no channel: nothing was checked).
    async fn probe(&self, seq: u64) -> redis::RedisResult<i64> {
        let mut fewest: Option<i64> = None;
        for channel in self.probes.channels() {
            let reached: i64 = redis::cmd(self.link.publish_command())
                .arg(&channel)
                .arg(seq)
                .query_async(&mut self.connection())
                .await?;
            fewest = Some(fewest.map_or(reached, |f| f.min(reached)));
        }
        Ok(fewest.unwrap_or(0))
    }

    /// On a cluster, reads the slot map and probes one channel per primary from now on; the
    /// new channels are subscribed to before this returns. Whether the channels changed.
    async fn refresh_probes(&self) -> bool {
        if !self.link.is_sharded() {
            return false;
        }
        let slots: redis::RedisResult<Value> =
            redis::cmd("CLUSTER").arg("SLOTS").query_async(&mut self.connection()).await;
        let Some(slots) = slots.ok().as_ref().and_then(probe::parse_cluster_slots) else { return false };
        let channels = probe::per_primary(&self.origin, &slots);
        if channels.is_empty() {
            return false; // a cluster still forming: keep probing what was probed
        }
        let Some((new, gone)) = self.probes.replace(channels) else { return false };
        for channel in new.into_iter().chain(gone) {
            self.subscriptions.touch(channel, |c| self.own_channels().iter().any(|own| own == c));
        }
        // Out of step (Redis is marked away, as after the failed probe that led here): a resync
        // subscribes the new channels now, with everything else. Waiting for Redis' return
        // would wait for a probe on channels nobody listens to.
        if !self.subscriptions.settled(RESPONSE_TIMEOUT * 2).await {
            self.resync(false, RESPONSE_TIMEOUT * 2).await;
        }
        true
    }

    /// The channels this instance listens to whatever its clients do: control and its probes.
    fn own_channels(&self) -> Vec<String> {
        let mut channels = vec![keys::CONTROL.to_string()];
        channels.extend(self.probes.channels());
        channels
    }

    /// Whether this instance wants Redis channel `channel` subscribed: a client channel while
    /// it has a local subscriber, its own channels always.
    fn wants(&self, hub: &Hub, channel: &str) -> bool {
        match keys::client_channel(channel) {
            Some(client_channel) => hub.has_subscribers(client_channel),
            None => self.own_channels().iter().any(|c| c == channel),
        }
    }

    /// Every Redis channel this instance wants subscribed.
    fn everything(&self, hub: &Hub) -> std::collections::HashSet<String> {
        let mut channels: std::collections::HashSet<String> = self.own_channels().into_iter().collect();
        channels.extend(hub.channels().iter().map(|c| keys::channel(c)));
        channels
    }

    fn on_push(&self, gw: &Gateway, push: PushInfo) {
        match push.kind {
            PushKind::Message | PushKind::SMessage => {
                let [Value::BulkString(channel), Value::BulkString(payload)] = push.data.as_slice() else { return };
                let Ok(channel) = std::str::from_utf8(channel) else { return };
                if let Some(client_channel) = keys::client_channel(channel) {
                    match wire::decode(client_channel, payload, &self.origin) {
                        Ok(delivery) => {
                            gw.hub.deliver(&delivery.channel, &delivery.frame);
                        }
                        Err(Dropped::Own) => {}
                        Err(Dropped::Malformed(e)) => {
                            let n = self.malformed.fetch_add(1, Ordering::Relaxed) + 1;
                            if n.is_power_of_two() {
                                tracing::warn!(channel = client_channel, error = %e, dropped = n, "dropped a malformed message from Redis");
                            }
                        }
                    }
                } else if channel == keys::CONTROL {
                    self.on_control(gw, payload);
                } else if self.probes.owns(channel)
                    && let Some(seq) = std::str::from_utf8(payload).ok().and_then(|s| s.parse().ok())
                {
                    self.probes.saw(channel, seq);
                }
            }
            PushKind::SUnsubscribe => {
                // A Redis Cluster drops the sharded subscriptions of a slot that moved to another
                // node (a resharding, a failover). The ones still wanted are made again, on the
                // slot's new owner.
                let [Value::BulkString(channel), ..] = push.data.as_slice() else { return };
                let Ok(channel) = std::str::from_utf8(channel) else { return };
                self.subscriptions.lost(channel, |c| self.wants(&gw.hub, c));
            }
            PushKind::Disconnection => self.mark_down("the subscription connection to Redis was lost"),
            _ => {}
        }
    }

    fn on_control(&self, gw: &Gateway, payload: &[u8]) {
        match Control::decode(payload) {
            Ok(Control::Replace { to, user, sessions }) if to == self.origin => {
                for session in sessions {
                    gw.sessions.close_session(&user, session, CloseCode::Replaced, REPLACED);
                }
            }
            Ok(Control::Disconnect { from, user, reason, revoked_at_ms }) if from != self.origin => {
                if let Some(at) = revoked_at_ms {
                    let at = UNIX_EPOCH + Duration::from_millis(at);
                    gw.revocations.insert(&user, at, at + self.revocation_ttl);
                }
                let closed = gw.sessions.close_user(&user, CloseCode::LoggedOut, &reason);
                tracing::info!(target: crate::decisions::TARGET, kind = "admin", outcome = "disconnect", user, closed, revoke = revoked_at_ms.is_some(), "user disconnected by another instance");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "dropped a malformed control message from Redis"),
        }
    }
}

/// The close reason of a connection displaced by a newer one of its user.
pub const REPLACED: &str = "replaced by a newer connection";

/// The health loop: probes Redis and the subscription every [`PROBE_INTERVAL`], marks the
/// link up or away, rebuilds a wedged subscription, restores what an outage lost, renews
/// leases.
async fn health(gw: Weak<Gateway>) {
    // Subscribe first, so the first probe finds the subscription in place.
    if let Some(gw) = gw.upgrade()
        && let Some(cluster) = gw.cluster.clone()
    {
        cluster.resync(false, resync_within(&gw)).await;
    }
    let mut every = tokio::time::interval(PROBE_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    let mut last_sent: Option<u64> = None;
    let mut missing = 0u32;
    let mut renewed = tokio::time::Instant::now();
    loop {
        every.tick().await;
        let Some(gw) = gw.upgrade() else { return };
        let Some(cluster) = gw.cluster.clone() else { return };
        if (seq.is_multiple_of(PROBE_TOPOLOGY_EVERY) || missing > 0) && cluster.refresh_probes().await {
            last_sent = None; // the new channels have not carried the last probe
        }
        seq += 1;
        let verdict = match cluster.probe(seq).await {
            Err(e) => {
                last_sent = None;
                Err(e.to_string())
            }
            Ok(receivers) => {
                // The previous probe had a whole interval to come back.
                let came_back = last_sent.is_none_or(|sent| cluster.probes.all_back(sent));
                last_sent = Some(seq);
                if receivers > 0 && came_back {
                    Ok(())
                } else {
                    missing += 1;
                    Err("the subscription did not deliver the liveness probe".to_string())
                }
            }
        };
        match verdict {
            Ok(()) => {
                missing = 0;
                if !cluster.is_up() {
                    restore(&gw, &cluster).await;
                    renewed = tokio::time::Instant::now();
                } else if renewed.elapsed() >= LEASE_REFRESH {
                    if let Err(e) = cluster.renew_leases().await {
                        cluster.mark_down(&e.to_string());
                    }
                    renewed = tokio::time::Instant::now();
                }
            }
            Err(why) => {
                cluster.mark_down(&why);
                if missing >= WEDGED_AFTER {
                    // Commands work but the subscription does not deliver: replace it.
                    tracing::warn!(probes = missing, "the Redis subscription stopped delivering; reconnecting it");
                    missing = 0;
                    last_sent = None;
                    cluster.resync(true, RESPONSE_TIMEOUT * 2).await;
                }
            }
        }
    }
}

/// How long a resync may take: it subscribes to every channel with a local subscriber, which on
/// a cluster is one command per hash slot (a second per thousand channels is generous).
fn resync_within(gw: &Gateway) -> Duration {
    let thousands = u32::try_from(gw.hub.channel_count() / 1000).unwrap_or(u32::MAX);
    RESPONSE_TIMEOUT.saturating_mul(thousands.saturating_add(2))
}

/// Back from an outage (or the first contact): subscribe to everything, restore leases and
/// revocations, then mark the link up.
async fn restore(gw: &Gateway, cluster: &Cluster) {
    if !cluster.resync(false, resync_within(gw)).await {
        return;
    }
    if let Err(e) = cluster.renew_leases().await {
        return cluster.mark_down(&e.to_string());
    }
    match cluster.load_revocations(gw).await {
        Ok(n) if n > 0 => tracing::info!(revocations = n, "revocations read from Redis"),
        Ok(_) => {}
        Err(e) => return cluster.mark_down(&e.to_string()),
    }
    cluster.mark_up();
}

/// The Redis backplane: local delivery at once, then one publish for the other instances.
#[derive(Debug)]
pub struct RedisBackplane {
    hub: Arc<Hub>,
    cluster: Arc<Cluster>,
}

impl RedisBackplane {
    /// A backplane delivering to `hub` and through `cluster`.
    pub fn new(hub: Arc<Hub>, cluster: Arc<Cluster>) -> RedisBackplane {
        RedisBackplane { hub, cluster }
    }
}

impl Backplane for RedisBackplane {
    fn publish(&self, delivery: Delivery) -> BoxFuture<'_, Result<Fanout, BrokerError>> {
        Box::pin(async move {
            let fanout = self.hub.deliver(&delivery.channel, &delivery.frame);
            self.cluster.publish(&delivery).await;
            Ok(fanout)
        })
    }

    fn listening(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if !self.cluster.is_up() {
                return; // nothing to wait for: delivery is local until Redis returns
            }
            self.cluster.subscriptions.settled(RESPONSE_TIMEOUT).await;
        })
    }

    fn interest(&self, channel: &str, _subscribed: bool) {
        // The hub, not the order of the calls, says whether the channel is wanted: of a last
        // unsubscribe and a new first subscribe racing, the outcome is the hub's final state.
        self.cluster.subscriptions.touch(keys::channel(channel), |c| self.cluster.wants(&self.hub, c));
    }
}
