//! The state one gateway instance shares between its connections: the active policy, the
//! broker (and, with `--redis`, the link to the other instances), the session registry, the
//! limiters and the lifecycle phase. Everything else about a
//! connection lives in its own task ([`crate::session`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::watch;

use crate::auth::Revocations;
use crate::broker::hub::{Hub, SessionId};
use crate::broker::{Backplane, LocalBackplane, MessageIds};
use crate::cluster::{Cluster, RedisBackplane, Topology};
use crate::handshaking::Handshaking;
use crate::limits::{IpCounter, KeyedWindows, Pacer, RateEstimator};
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::reload::{PolicyDir, Reloads};
use crate::sessions::Registry;

/// Where the server is in its life: running → draining → closed, never back. Connections watch
/// it: leaving `Running` closes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Accepting and serving.
    Running,
    /// Shutting down: new handshakes get 503, every client is sent 1001, and the server waits
    /// (up to the drain timeout) for their close handshakes.
    Draining,
    /// The drain is over: what is left is dropped and the process exits.
    Closed,
}

/// Settings of an instance that do not come from the policy.
#[derive(Debug, Clone)]
pub struct GatewayOptions {
    /// This instance's id: in welcome frames, `conn.instance`, session ids.
    pub instance_id: String,
    /// `WSGATE_ADMIN_TOKEN`: required by state-changing admin calls; `None` refuses them.
    pub admin_token: Option<String>,
    /// Test-only fault injection, honoured in debug builds only (see [`Failpoint`]).
    pub failpoint: Option<Failpoint>,
    /// How long a token revocation lasts: the longest lifetime of the tokens in use.
    pub revocation_ttl: std::time::Duration,
    /// Where the policy was read from, for reloads (`None`: a policy built in memory).
    pub policy_dir: Option<PolicyDir>,
}

impl GatewayOptions {
    /// Options for an instance named `instance_id`, everything else default.
    pub fn new(instance_id: &str) -> GatewayOptions {
        GatewayOptions {
            instance_id: instance_id.to_string(),
            admin_token: None,
            failpoint: None,
            revocation_ttl: DEFAULT_REVOCATION_TTL,
            policy_dir: None,
        }
    }
}

/// Live connections a reload denies are closed at most this fast, after a first burst of
/// [`RELOAD_CLOSE_BURST`]: 10,000 denied connections close over ten seconds, not in one tick
/// (and do not all reconnect in the same one).
pub const RELOAD_CLOSES_PER_SECOND: u32 = 1000;
/// Denied connections closed at once after a reload.
pub const RELOAD_CLOSE_BURST: u32 = 100;

/// How long revocations last unless configured: one day.
pub const DEFAULT_REVOCATION_TTL: std::time::Duration = std::time::Duration::from_secs(86_400);

/// A deliberate fault, so tests can show how the server contains its own failures. Read from
/// `WSGATE_FAILPOINT` by debug builds only; release builds ignore it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failpoint {
    /// `panic_on_message_type:TYPE`: processing an accepted message of this type panics.
    PanicOnMessageType(String),
}

impl Failpoint {
    /// Parses `panic_on_message_type:TYPE`.
    pub fn parse(s: &str) -> Option<Failpoint> {
        let kind = s.strip_prefix("panic_on_message_type:")?;
        (!kind.is_empty()).then(|| Failpoint::PanicOnMessageType(kind.to_string()))
    }
}

/// One instance's shared state.
pub struct Gateway {
    /// The policy every new handshake and message is decided under. A reload replaces the
    /// `Arc` whole; readers clone it and decide entirely under that one generation. Sessions
    /// watch it to move to a new generation.
    policy: watch::Sender<Arc<Policy>>,
    /// Reload turns and history.
    pub reloads: Reloads,
    /// Instance settings.
    pub options: GatewayOptions,
    /// Every metric (SPEC §8).
    pub metrics: Arc<Metrics>,
    /// Local channel subscriptions.
    pub hub: Arc<Hub>,
    /// Carries publishes to every instance (embedded: just this one).
    pub backplane: Arc<dyn Backplane>,
    /// The link to Redis and the other instances (`--redis`); `None`: a single instance.
    pub cluster: Option<Arc<Cluster>>,
    /// Message ids, unique across instances.
    pub ids: MessageIds,
    /// Live sessions by user: max per user, logout.
    pub sessions: Registry,
    /// Revoked tokens by user.
    pub revocations: Revocations,
    /// Handshakes per user, for `connections.reconnects`.
    pub reconnects: KeyedWindows<String>,
    /// Live connections per IP, for `connections.max_per_ip`.
    pub per_ip: Arc<IpCounter>,
    /// Connections still in their handshake (not yet authenticated), capped per address and
    /// in total so no one can hold every connection slot with sockets that never authenticate.
    pub handshaking: Arc<Handshaking>,
    /// Handshake attempts, for the connection-spike detector.
    pub handshake_rate: std::sync::Mutex<RateEstimator>,
    /// Paces the 4003 closes of live connections a reloaded policy no longer admits.
    pub reload_closes: Pacer,
    /// The lifecycle phase; sessions hold receivers.
    phase: watch::Sender<Phase>,
    /// Next session number.
    next_session: AtomicU64,
}

impl Gateway {
    /// A gateway serving `policy` with the embedded broker: one instance.
    pub fn new(policy: Arc<Policy>, options: GatewayOptions) -> Arc<Gateway> {
        let metrics = Arc::new(Metrics::default());
        Gateway::build(policy, options, metrics, None)
    }

    /// A gateway that is one of several instances sharing the Redis at `url` (a Redis Cluster's
    /// seed nodes, comma-separated, for [`Topology::Cluster`]). Must be called inside the
    /// runtime (it starts the Redis tasks). A Redis that is down is waited for; only a malformed
    /// URL is an error.
    pub fn with_redis(
        policy: Arc<Policy>,
        options: GatewayOptions,
        url: &str,
        topology: Topology,
    ) -> Result<Arc<Gateway>, String> {
        let metrics = Arc::new(Metrics::default());
        let cluster = Cluster::new(url, topology, metrics.clone(), options.revocation_ttl)?;
        let gw = Gateway::build(policy, options, metrics, Some(cluster.clone()));
        cluster.start(&gw);
        Ok(gw)
    }

    fn build(
        policy: Arc<Policy>,
        options: GatewayOptions,
        metrics: Arc<Metrics>,
        cluster: Option<Arc<Cluster>>,
    ) -> Arc<Gateway> {
        // The spike window until the first check evaluates `connections.spike` again.
        let spike_window = crate::policy::decision::spike_threshold(&policy, std::time::SystemTime::now())
            .map_or(std::time::Duration::from_secs(10), |(_, per)| per);
        metrics.policy_generation.store(policy.generation, std::sync::atomic::Ordering::Relaxed);
        let hub = Arc::new(Hub::with_metrics(metrics.clone()));
        let backplane: Arc<dyn Backplane> = match &cluster {
            Some(cluster) => Arc::new(RedisBackplane::new(hub.clone(), cluster.clone())),
            None => Arc::new(LocalBackplane::new(hub.clone())),
        };
        Arc::new(Gateway {
            cluster,
            policy: watch::channel(policy).0,
            reloads: Reloads::default(),
            metrics,
            hub,
            backplane,
            ids: MessageIds::new(),
            sessions: Registry::default(),
            revocations: Revocations::new(options.revocation_ttl),
            reconnects: KeyedWindows::default(),
            per_ip: Arc::default(),
            handshaking: Arc::default(),
            handshake_rate: std::sync::Mutex::new(RateEstimator::new(tokio::time::Instant::now(), spike_window)),
            reload_closes: Pacer::new(RELOAD_CLOSES_PER_SECOND, RELOAD_CLOSE_BURST),
            phase: watch::channel(Phase::Running).0,
            options,
            next_session: AtomicU64::new(1),
        })
    }

    /// The active policy.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.borrow().clone()
    }

    /// Makes `policy` the active one, in one swap: every handshake from now on and every
    /// session's next event see it (the reload path ends here).
    pub fn set_policy(&self, policy: Arc<Policy>) {
        self.metrics.policy_generation.store(policy.generation, Ordering::Relaxed);
        self.policy.send_replace(policy);
    }

    /// A receiver that sees every policy swap; sessions select on it.
    pub fn watch_policy(&self) -> watch::Receiver<Arc<Policy>> {
        self.policy.subscribe()
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// Moves to `phase`; every session watching sees it.
    pub fn set_phase(&self, phase: Phase) {
        self.phase.send_replace(phase);
    }

    /// A receiver sessions select on.
    pub fn watch_phase(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    /// A fresh session id, unique within the process.
    pub fn next_session_id(&self) -> SessionId {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// Counts a handshake attempt for the spike detector (in the window the last check used).
    pub fn record_handshake(&self) {
        self.handshake_rate.lock().unwrap_or_else(|e| e.into_inner()).record(tokio::time::Instant::now());
    }

    /// Updates `wsgate_connection_spike` from the handshake rate and the policy's
    /// `connections.spike`; logs a warning when an episode starts and a note when it ends.
    /// Returns whether a spike is on.
    pub fn check_spike(&self) -> bool {
        use std::sync::atomic::Ordering;
        let policy = self.policy();
        let (max, per) = match crate::policy::decision::spike_threshold(&policy, std::time::SystemTime::now()) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "connections.spike could not be evaluated");
                return self.metrics.connection_spike.load(Ordering::Relaxed) == 1;
            }
        };
        let rate =
            self.handshake_rate.lock().unwrap_or_else(|e| e.into_inner()).estimate(tokio::time::Instant::now(), per);
        let spiking = rate > max as f64;
        let was = self.metrics.connection_spike.swap(u64::from(spiking), Ordering::Relaxed) == 1;
        match (was, spiking) {
            (false, true) => {
                tracing::warn!(rate = rate.round(), max, per = ?per, "connection spike: handshakes exceed connections.spike")
            }
            (true, false) => tracing::info!(rate = rate.round(), max, per = ?per, "connection spike over"),
            _ => {}
        }
        spiking
    }

    /// The failpoint, in debug builds only.
    pub fn failpoint(&self) -> Option<&Failpoint> {
        if cfg!(debug_assertions) { self.options.failpoint.as_ref() } else { None }
    }
}
