//! The declarative scenario format (documented in `harness/README.md`): what a scenario file
//! may say, parsed strictly (`deny_unknown_fields` everywhere: a misspelt key is an error, not
//! a silently skipped check), then checked as a whole before anything runs — every `server`
//! and `conn` a step names must exist at that point, and defaults are filled in, so the runner
//! only ever sees complete steps. Each step checks itself; this file owns what spans steps.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::duration::Dur;
use crate::process::haproxy::HaproxyMode;
use crate::scenario::check::{CheckCtx, Servers, valid_name};
use crate::scenario::server::{DEFAULT_SERVER, ServerSpec};
use crate::scenario::step::Step;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Scenario {
    /// What the scenario shows, in prose (the name is the file name).
    pub(crate) description: Option<String>,
    /// Named servers; absent: one server called `main` configured by the keys below.
    #[serde(default)]
    pub(crate) servers: BTreeMap<String, ServerSpec>,
    /// Shorthand for `servers: {main: {policy: …}}`.
    pub(crate) policy: Option<Value>,
    /// Shorthand for `servers: {main: {files: …}}`.
    #[serde(default)]
    pub(crate) files: BTreeMap<String, String>,
    /// Shorthand for `servers: {main: {args: …}}`.
    #[serde(default)]
    pub(crate) args: Vec<String>,
    /// Shorthand for `servers: {main: {env: …}}`.
    #[serde(default)]
    pub(crate) env: BTreeMap<String, String>,
    /// Shorthand for `servers: {main: {tls: true}}`.
    #[serde(default)]
    pub(crate) tls: bool,
    /// The longest the whole scenario may take (default 60s).
    pub(crate) timeout: Option<Dur>,
    /// ES256 key pairs generated for the scenario: each public key is written into every
    /// server's policy directory as `keys/<name>.pem`; `connect` signs with one by name.
    #[serde(default)]
    pub(crate) signing_keys: Vec<String>,
    /// Start a `redis-server` for the scenario (before any server) and pass every server
    /// `--redis` to it, unless the server says `redis: false`.
    #[serde(default)]
    pub(crate) redis: bool,
    /// With `redis: true`: the Redis is a Redis Cluster of three nodes, and servers get
    /// `--redis <seed nodes> --redis-cluster` (sharded pub/sub).
    #[serde(default)]
    pub(crate) redis_cluster: bool,
    /// Markers planted in policy files or messages that no server may ever print: each is
    /// checked in every log line as a secret is.
    #[serde(default)]
    pub(crate) never_logged: Vec<String>,
    /// What to do, in order.
    pub(crate) steps: Vec<Step>,
}

/// Reads and checks a scenario file.
pub(crate) fn load(path: &Path) -> Result<Scenario, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse(&text)
}

/// Parses and checks a scenario.
pub(crate) fn parse(text: &str) -> Result<Scenario, String> {
    let mut scenario: Scenario = serde_saphyr::from_str(text).map_err(|e| e.to_string())?;
    scenario.resolve()?;
    Ok(scenario)
}

impl Scenario {
    /// Folds the shorthand keys into `servers`, fills in default `server`/`conn` names and
    /// checks every reference and combination.
    fn resolve(&mut self) -> Result<(), String> {
        let shorthand = self.policy.is_some()
            || !self.files.is_empty()
            || !self.args.is_empty()
            || !self.env.is_empty()
            || self.tls;
        if self.servers.is_empty() {
            let spec = ServerSpec {
                policy: self.policy.take(),
                files: std::mem::take(&mut self.files),
                args: std::mem::take(&mut self.args),
                env: std::mem::take(&mut self.env),
                tls: std::mem::take(&mut self.tls),
                redis: None,
                start: None,
                haproxy: None,
            };
            self.servers.insert(DEFAULT_SERVER.to_string(), spec);
        } else if shorthand {
            return Err(
                "write `policy`, `files`, `args`, `env` and `tls` inside `servers` when `servers` is given".into()
            );
        }
        for (name, spec) in &self.servers {
            if !valid_name(name) {
                return Err(format!("server name `{name}`: use letters, digits, `-`, `_`, `.`, `:`"));
            }
            if spec.policy.as_ref().is_some_and(|p| !p.is_object()) {
                return Err(format!("server `{name}`: `policy` must be a mapping"));
            }
            let tls_arg = spec.args.iter().find(|a| a.starts_with("--tls-cert") || a.starts_with("--tls-key"));
            if let (true, Some(arg)) = (spec.tls, tls_arg) {
                return Err(format!(
                    "server `{name}`: `tls: true` generates the certificate; drop `{arg}` from `args`"
                ));
            }
            if spec.tls && matches!(spec.haproxy, Some(HaproxyMode::Http | HaproxyMode::Https)) {
                return Err(format!(
                    "server `{name}`: `haproxy: http` and `https` speak plaintext HTTP to the server; with `tls: true` \
                     use `haproxy: tcp`"
                ));
            }
            if spec.redis == Some(true) && !self.redis {
                return Err(format!(
                    "server `{name}`: `redis: true` needs `redis: true` at the top level, which starts the Redis"
                ));
            }
            if spec.uses_redis(self.redis) && spec.args.iter().any(|a| a.starts_with("--redis")) {
                return Err(format!(
                    "server `{name}`: the scenario's `redis: true` passes `--redis`; drop it from `args`"
                ));
            }
        }
        if self.redis_cluster && !self.redis {
            return Err("`redis_cluster: true` needs `redis: true`".into());
        }
        if self.steps.is_empty() {
            return Err("a scenario needs at least one step".into());
        }
        if let Some(short) = self.never_logged.iter().find(|m| m.len() < 16) {
            return Err(format!(
                "`never_logged` marker `{short}`: at least 16 characters, so it cannot match innocent text"
            ));
        }
        for key in &self.signing_keys {
            if !valid_name(key) || key.contains(':') {
                return Err(format!("signing key `{key}`: use letters, digits, `-`, `_`, `.`"));
            }
        }
        let mut check = CheckCtx {
            servers: Servers {
                all: self.servers.keys().cloned().collect(),
                tls: self.servers.iter().filter(|(_, spec)| spec.tls).map(|(name, _)| name.clone()).collect(),
                keys: self.signing_keys.iter().cloned().collect(),
                haproxy: self
                    .servers
                    .iter()
                    .filter(|(_, spec)| spec.haproxy.is_some())
                    .map(|(name, _)| name.clone())
                    .collect(),
            },
            conns: BTreeSet::new(),
            saved: BTreeSet::new(),
        };
        // Servers an `expect_exit` has seen exit, with that step's number.
        let mut exited: BTreeMap<String, usize> = BTreeMap::new();
        // Servers running at this point: those not declared `start: false`, and those started.
        let mut started: BTreeSet<String> = self
            .servers
            .iter()
            .filter(|(_, spec)| spec.starts_with_the_scenario())
            .map(|(name, _)| name.clone())
            .collect();
        // The step whose `stop_redis` Redis is down since, if it is.
        let mut redis_down: Option<usize> = None;
        for (i, step) in self.steps.iter_mut().enumerate() {
            let kind = step.kind();
            let at = |e: String| format!("step {} ({kind}): {e}", i + 1);
            step.check(&mut check).map_err(at)?;
            // Only the log of a server that has exited can still be looked at.
            if let Some(server) = step.server()
                && let Some(when) = exited.get(server)
                && !matches!(step, Step::ExpectLog(_))
            {
                return Err(at(format!("server `{server}` has exited (step {when}); only `expect_log` can follow")));
            }
            match &*step {
                Step::Start(s) => {
                    let server = s.server.clone().unwrap_or_default();
                    if !started.insert(server.clone()) {
                        return Err(at(format!(
                            "server `{server}` is already running (only a server declared with `start: false` \
                             is started by a step, once)"
                        )));
                    }
                }
                step => {
                    if let Some(server) = step.server()
                        && !started.contains(server)
                    {
                        return Err(at(format!(
                            "server `{server}` is not running yet (it is declared with `start: false`); \
                             start it first with `start: {{server: {server}}}`"
                        )));
                    }
                }
            }
            let redis_step = matches!(step, Step::StopRedis(_) | Step::StartRedis(_) | Step::RedisPublish(_));
            if redis_step && !self.redis {
                return Err(at("there is no Redis: declare `redis: true` at the top level".into()));
            }
            match (&*step, redis_down) {
                (Step::StopRedis(_), Some(when)) => {
                    return Err(at(format!("Redis is already stopped (step {when})")));
                }
                (Step::StopRedis(_), None) => redis_down = Some(i + 1),
                (Step::StartRedis(_), None) => {
                    return Err(at("Redis is running; `start_redis` restarts it after a `stop_redis`".into()));
                }
                (Step::StartRedis(_), Some(_)) => redis_down = None,
                (Step::RedisPublish(_), Some(when)) => {
                    return Err(at(format!("Redis is stopped (step {when}); `start_redis` first")));
                }
                (Step::ExpectExit(s), _) => {
                    exited.insert(s.server.clone().unwrap_or_default(), i + 1);
                }
                _ => {}
            }
        }
        if let Some(name) = self.servers.keys().find(|name| !started.contains(*name)) {
            return Err(format!("server `{name}` is declared with `start: false`, but no `start` step starts it"));
        }
        Ok(())
    }

    /// The deadline for the whole scenario.
    pub(crate) fn timeout(&self) -> Dur {
        self.timeout.unwrap_or(Dur::secs(60))
    }
}
