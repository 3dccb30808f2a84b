//! The live policy ([`LivePolicy`]): the generation every new handshake and message is decided
//! under, and its reload (SPEC §7): read the policy directory again, compile it with the same
//! code as `wsgate policy check`, and either swap the result in whole or refuse it whole.
//!
//! Three triggers lead here — the directory watcher ([`crate::watcher`]), `SIGHUP` and
//! `POST /v1/policy/reload` — and they take turns: one reload runs at a time, so generations
//! only ever go up by one. Compiling runs on the blocking pool, never on a connection's
//! thread. A policy whose content hash equals the active one's is not swapped in (the
//! generation does not move). A refused policy changes nothing that is enforced: it is logged
//! (`file:line:col: …`), counted in `wsgate_policy_reloads_total{outcome="error"}` and shown
//! in `GET /v1/policy` until a later reload succeeds.

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::policy::{CompileOptions, Policy, PolicyError, compile_dir};

/// Reads the environment variable holding a JWT secret (`auth.jwt.secret_env`).
pub type SecretLookup = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Where a running gateway's policy comes from, so that it can be read again.
#[derive(Clone)]
pub struct PolicyDir {
    /// The policy directory.
    pub dir: PathBuf,
    /// How secrets are looked up: the same way as at start-up.
    pub secrets: SecretLookup,
}

impl fmt::Debug for PolicyDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicyDir").field("dir", &self.dir).finish_non_exhaustive()
    }
}

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// A file in the policy directory changed.
    Watch,
    /// `SIGHUP`.
    Signal,
    /// `POST /v1/policy/reload`.
    Admin,
}

impl Trigger {
    /// The name logs use.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Watch => "watch",
            Trigger::Signal => "sighup",
            Trigger::Admin => "admin",
        }
    }
}

/// How a reload ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A new policy is active.
    Applied {
        /// One more than the generation it replaced.
        generation: u64,
        /// The SHA-256 of its files, as `GET /v1/policy` shows it.
        content_hash: String,
    },
    /// The files hold the active policy already; nothing changed.
    Unchanged {
        /// The generation that stays active.
        generation: u64,
    },
    /// The policy was refused; the active one stays.
    Refused {
        /// Every error, `file:line:col: key.path: message`.
        errors: Vec<String>,
    },
    /// This gateway's policy was not read from a directory (a library user's in-memory
    /// policy): there is nothing to read again.
    NoSource,
}

impl Outcome {
    /// `ok`, `unchanged` or `error`: the metric label and the admin API's word.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Applied { .. } => "ok",
            Outcome::Unchanged { .. } => "unchanged",
            Outcome::Refused { .. } | Outcome::NoSource => "error",
        }
    }
}

/// The last refused reload, as `GET /v1/policy` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastError {
    /// Every error.
    pub errors: Vec<String>,
    /// When the reload was refused.
    pub at: SystemTime,
}

/// The last reload, whatever its outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastReload {
    /// `ok`, `unchanged` or `error`.
    pub outcome: &'static str,
    /// What triggered it.
    pub trigger: Trigger,
    /// When it ended.
    pub at: SystemTime,
}

/// What `GET /v1/policy` reports about reloads.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// The last reload, if any ran.
    pub last: Option<LastReload>,
    /// The last refusal; cleared when a later reload finds a valid policy.
    pub last_error: Option<LastError>,
}

/// The active policy and how it is read again. A reload replaces the `Arc` whole; readers clone
/// it and decide entirely under that one generation.
pub struct LivePolicy {
    /// Sessions and the watcher hold receivers, to move to a new generation.
    current: watch::Sender<Arc<Policy>>,
    /// `None`: a policy built in memory, with nothing to read again.
    source: Option<PolicyDir>,
    /// Held for the whole of a reload: one at a time, so generations only go up by one.
    turn: tokio::sync::Mutex<()>,
    history: Mutex<History>,
    metrics: Arc<Metrics>,
}

impl fmt::Debug for LivePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LivePolicy").field("generation", &self.current().generation).finish_non_exhaustive()
    }
}

impl LivePolicy {
    /// `policy` made live, to be read again from `source` (when it came from a directory).
    pub fn new(policy: Arc<Policy>, source: Option<PolicyDir>, metrics: Arc<Metrics>) -> LivePolicy {
        metrics.policy_generation.store(policy.generation, std::sync::atomic::Ordering::Relaxed);
        LivePolicy {
            current: watch::channel(policy).0,
            source,
            turn: tokio::sync::Mutex::default(),
            history: Mutex::default(),
            metrics,
        }
    }

    /// The active policy.
    pub fn current(&self) -> Arc<Policy> {
        self.current.borrow().clone()
    }

    /// Makes `policy` the active one, in one swap: every handshake from now on and every
    /// session's next event see it (the reload path ends here).
    pub fn set(&self, policy: Arc<Policy>) {
        self.metrics.policy_generation.store(policy.generation, std::sync::atomic::Ordering::Relaxed);
        self.current.send_replace(policy);
    }

    /// A receiver that sees every swap.
    pub fn watch(&self) -> watch::Receiver<Arc<Policy>> {
        self.current.subscribe()
    }

    /// Where the policy is read again from.
    pub fn source(&self) -> Option<&PolicyDir> {
        self.source.as_ref()
    }

    /// What `GET /v1/policy` reports about reloads.
    pub fn history(&self) -> History {
        self.history.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reads and compiles the policy directory again and swaps the result in when it is valid
    /// and different. Waits for a reload already running to end first.
    pub async fn reload(&self, trigger: Trigger) -> Outcome {
        let Some(source) = self.source.clone() else {
            return Outcome::NoSource;
        };
        let _turn = self.turn.lock().await;
        let started = Instant::now();
        let current = self.current();
        let generation = current.generation + 1;
        let dir = source.dir.clone();
        let compiled = tokio::task::spawn_blocking(move || {
            compile_dir(&source.dir, &CompileOptions { generation, secret_lookup: &*source.secrets })
        })
        .await;
        let outcome = match compiled {
            Ok(Ok(policy)) if policy.content_hash == current.content_hash => {
                Outcome::Unchanged { generation: current.generation }
            }
            Ok(Ok(policy)) => {
                let content_hash = policy.content_hash.clone();
                self.set(Arc::new(policy));
                Outcome::Applied { generation, content_hash }
            }
            Ok(Err(errors)) => Outcome::Refused { errors: errors.0.iter().map(PolicyError::to_string).collect() },
            Err(e) => Outcome::Refused { errors: vec![format!("{}: the policy compiler failed: {e}", dir.display())] },
        };
        log(&outcome, trigger, &dir, current.generation, started.elapsed().as_secs_f64() * 1000.0);
        self.metrics.reloaded(outcome.label());
        let mut history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        let at = SystemTime::now();
        history.last = Some(LastReload { outcome: outcome.label(), trigger, at });
        match &outcome {
            Outcome::Refused { errors } => history.last_error = Some(LastError { errors: errors.clone(), at }),
            _ => history.last_error = None,
        }
        outcome
    }
}

fn log(outcome: &Outcome, trigger: Trigger, dir: &std::path::Path, active_generation: u64, took_ms: f64) {
    match outcome {
        Outcome::Applied { generation, content_hash } => tracing::info!(
            trigger = trigger.as_str(),
            generation,
            sha256 = %content_hash,
            took_ms,
            "policy reloaded"
        ),
        Outcome::Unchanged { generation } if trigger == Trigger::Watch => {
            tracing::debug!(trigger = trigger.as_str(), generation, "policy files unchanged")
        }
        Outcome::Unchanged { generation } => {
            tracing::info!(trigger = trigger.as_str(), generation, "policy files unchanged; nothing to reload")
        }
        Outcome::Refused { errors } => tracing::error!(
            trigger = trigger.as_str(),
            policy = %dir.display(),
            errors = %errors.join("; "),
            active_generation,
            "policy reload refused; the active policy stays"
        ),
        Outcome::NoSource => {}
    }
}
