//! One gateway instance: its owners — the live policy ([`crate::reload`]), the broker, the
//! session registry, the limiters ([`crate::limits`]) and the lifecycle ([`crate::lifecycle`]) —
//! built together and handed to the accept loop, the admin API and the sessions.

use std::sync::Arc;

use crate::auth::Revocations;
use crate::broker::Broker;
use crate::broker::redis::link::Topology;
use crate::lifecycle::Lifecycle;
use crate::limits::Limiters;
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::proxy::Proxies;
use crate::registry::Registry;
use crate::reload::{LivePolicy, PolicyDir};

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
    /// Which peers are proxies, and how they name the client (none by default: every peer is
    /// its own client).
    pub proxies: Proxies,
    /// `--ready-without-redis`: `/readyz` stays 200 while Redis is away (the instance serves its
    /// own clients meanwhile); by default it answers 503 then (SPEC §6).
    pub ready_without_redis: bool,
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
            proxies: Proxies::default(),
            ready_without_redis: false,
        }
    }
}

/// How long revocations last unless configured: one day.
pub(crate) const DEFAULT_REVOCATION_TTL: std::time::Duration = std::time::Duration::from_secs(86_400);

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

/// One instance's shared state: the owners of each concern, built together. Everything else
/// about a connection lives in its own task ([`crate::session`]).
pub struct Gateway {
    /// Instance settings.
    pub options: GatewayOptions,
    /// Every metric (SPEC §8).
    pub metrics: Arc<Metrics>,
    /// The policy every new handshake and message is decided under, and its reloads.
    pub policy: Arc<LivePolicy>,
    /// This instance's own limiters.
    pub limits: Arc<Limiters>,
    /// Running, draining or closed.
    pub lifecycle: Lifecycle,
    /// Local subscriptions and fan-out to every instance (with `--redis`, through Redis).
    pub broker: Broker,
    /// Live sessions by user: max per user, logout. Shared with the broker, which closes the
    /// sessions other instances displace or disconnect.
    pub registry: Arc<Registry>,
    /// Revoked tokens by user. Shared with the broker, which adds the other instances'.
    pub revocations: Arc<Revocations>,
}

impl Gateway {
    /// A gateway serving `policy` with the embedded broker: one instance.
    pub fn new(policy: Arc<Policy>, options: GatewayOptions) -> Arc<Gateway> {
        let metrics = Arc::new(Metrics::default());
        let revocations = Arc::new(Revocations::new(options.revocation_ttl));
        Gateway::build(policy, options, metrics.clone(), Broker::local(metrics), Arc::default(), revocations)
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
        let sessions = Arc::<Registry>::default();
        let revocations = Arc::new(Revocations::new(options.revocation_ttl));
        let broker = Broker::redis(
            url,
            topology,
            metrics.clone(),
            sessions.clone(),
            revocations.clone(),
            options.revocation_ttl,
        )?;
        Ok(Gateway::build(policy, options, metrics, broker, sessions, revocations))
    }

    fn build(
        policy: Arc<Policy>,
        mut options: GatewayOptions,
        metrics: Arc<Metrics>,
        broker: Broker,
        sessions: Arc<Registry>,
        revocations: Arc<Revocations>,
    ) -> Arc<Gateway> {
        Arc::new(Gateway {
            limits: Arc::new(Limiters::new(&policy, metrics.clone())),
            policy: Arc::new(LivePolicy::new(policy, options.policy_dir.take(), metrics.clone())),
            metrics,
            broker,
            registry: sessions,
            revocations,
            lifecycle: Lifecycle::default(),
            options,
        })
    }

    /// The failpoint, in debug builds only.
    pub fn failpoint(&self) -> Option<&Failpoint> {
        if cfg!(debug_assertions) { self.options.failpoint.as_ref() } else { None }
    }
}
