//! What a scenario run holds while its steps execute: the servers and their private policy
//! directories, the open connections, the scenario's keys, its Redis, the saved values — and
//! the failure report built from all of them. Steps reach everything through [`RunCtx`].

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use crate::duration::Dur;
use crate::fixtures::policy_dir::PolicyDir;
use crate::fixtures::token::SigningKey;
use crate::matching::{Saved, clip};
use crate::process::haproxy::{Haproxy, HaproxyMode, find_haproxy};
use crate::process::redis_cluster::Redis;
use crate::process::supervisor::{Credentials, Redactor, WsgateOptions, WsgateServer, describe_exit};
use crate::scenario::server::{DEFAULT_SERVER, ServerSpec};
use crate::wire::client::{Connection, Event};
use crate::wire::tls::{self, ServerTls, TlsClient};

/// The default deadline of steps that wait for something.
pub(crate) const DEFAULT_WITHIN: Dur = Dur::secs(5);
/// How many log lines of each server a failure shows.
const LOG_TAIL: usize = 25;
/// How many log lines of Redis (and of an HAProxy) a failure shows.
const REDIS_LOG_TAIL: usize = 10;

/// What every scenario run needs to know.
#[derive(Debug, Clone)]
pub(crate) struct RunConfig {
    pub(crate) bin: PathBuf,
    /// The policy directory each server's copy starts from (the repository's `policies/`).
    pub(crate) policies: PathBuf,
    /// How long a server may take to start listening.
    pub(crate) ready_timeout: Duration,
}

pub(crate) struct ServerState {
    pub(crate) server: WsgateServer,
    /// Kept alive as long as the server runs; with `tls`, its `tls/` subdirectory holds the
    /// generated CA, certificate and key.
    pub(crate) dir: PolicyDir,
    /// With `tls: true`: the generated pair and the client that trusts it.
    pub(crate) tls: Option<ServerTls>,
    /// The signal (its `kill` name) the last `stop` step sent, and when, so an exit can be
    /// reported as "N ms after SIGTERM".
    pub(crate) signalled: Option<(&'static str, Instant)>,
    /// With `haproxy`: the HAProxy in front of it.
    pub(crate) haproxy: Option<Haproxy>,
}

impl ServerState {
    /// Where a step connects to reach the public listener, and with which TLS client: to wsgate
    /// itself, or with `proxied` through the HAProxy (TLS to it with `https`, through it to
    /// wsgate with `tcp`, none with `http`).
    pub(crate) fn route(&self, proxied: bool) -> Result<(SocketAddr, Option<TlsClient>), String> {
        let own = self.tls.as_ref().map(|t| t.client.clone());
        match (&self.haproxy, proxied) {
            (_, false) => Ok((self.server.ws_addr, own)),
            (Some(haproxy), true) => {
                let tls = match haproxy.mode() {
                    HaproxyMode::Http => None,
                    HaproxyMode::Https => haproxy.tls().cloned(),
                    HaproxyMode::Tcp => own,
                };
                Ok((haproxy.addr(), tls))
            }
            (None, true) => Err("the server has no HAProxy in front".into()),
        }
    }
}

pub(crate) struct ConnState {
    pub(crate) conn: Connection,
    /// Whether the scenario has seen it end (a close frame or a drop), so a new `connect` may
    /// reuse the name.
    pub(crate) ended: bool,
}

/// The data frames a read skipped on its way to what it waited for, for the failure message.
#[derive(Debug, Default)]
pub(crate) struct Skipped {
    pub(crate) count: usize,
    pub(crate) last: String,
}

impl ConnState {
    /// Reads until the connection ends — the close or drop event, with the connection marked
    /// ended — or `until` passes (`None`). Data frames are counted in `skipped`, except one that
    /// `stop` claims: the read ends there and returns it.
    pub(crate) async fn read_to_end(
        &mut self,
        until: Instant,
        skipped: &mut Skipped,
        mut stop: impl FnMut(&Event) -> bool,
    ) -> Option<Event> {
        loop {
            let event = self.conn.next_event(until).await?;
            if event.is_end() {
                self.ended = true;
                return Some(event);
            }
            if stop(&event) {
                return Some(event);
            }
            skipped.count += 1;
            skipped.last = event.describe();
        }
    }
}

/// Everything one scenario run owns. Dropping it kills the servers and closes the sockets.
pub(crate) struct RunCtx<'a> {
    pub(crate) cfg: &'a RunConfig,
    /// The scenario's servers as declared, for a `start` step.
    pub(crate) specs: &'a BTreeMap<String, ServerSpec>,
    pub(crate) scenario_redis: bool,
    /// The number (from 0) of the step running, for redaction labels.
    pub(crate) index: usize,
    pub(crate) redactor: Arc<Redactor>,
    pub(crate) credentials: Credentials,
    pub(crate) servers: BTreeMap<String, ServerState>,
    pub(crate) conns: HashMap<String, ConnState>,
    pub(crate) signing_keys: HashMap<String, SigningKey>,
    pub(crate) redis: Option<Redis>,
    /// Whether a `stop_redis` step took Redis down (so a report does not call that a crash).
    pub(crate) redis_stopped: bool,
    /// Values saved by `save_id` and `$save:NAME`, for `$saved:NAME`.
    pub(crate) saved: Saved,
}

/// `within`, or the default, as a deadline from now and the duration for messages.
pub(crate) fn deadline(within: Option<Dur>) -> (Instant, Dur) {
    let within = within.unwrap_or(DEFAULT_WITHIN);
    (Instant::now() + within.0, within)
}

pub(crate) fn parse_json(text: &str) -> Result<Value, String> {
    serde_json::from_str(text).map_err(|_| format!("a text frame that is not JSON: {}", clip(text, 300)))
}

/// A connection by name (`conns` apart from the rest of the context, so a step can hold a
/// connection and the saved values at once).
pub(crate) fn find_conn<'c>(
    conns: &'c mut HashMap<String, ConnState>,
    name: &Option<String>,
) -> Result<&'c mut ConnState, String> {
    let name = name.as_deref().unwrap_or_default();
    conns.get_mut(name).ok_or_else(|| format!("connection `{name}` was never opened (its connect step failed?)"))
}

impl<'a> RunCtx<'a> {
    pub(crate) fn new(cfg: &'a RunConfig, specs: &'a BTreeMap<String, ServerSpec>, scenario_redis: bool) -> Self {
        let redactor = Arc::new(Redactor::default());
        let credentials = Credentials::generate(&redactor);
        RunCtx {
            cfg,
            specs,
            scenario_redis,
            index: 0,
            redactor,
            credentials,
            servers: BTreeMap::new(),
            conns: HashMap::new(),
            signing_keys: HashMap::new(),
            redis: None,
            redis_stopped: false,
            saved: Saved::new(),
        }
    }

    /// Starts one server (with the scenario, or at its `start` step) and waits until it listens.
    pub(crate) async fn start_server(&mut self, name: &str) -> Result<(), String> {
        let spec = self.specs.get(name).ok_or_else(|| format!("no server `{name}`"))?;
        let mut files: Vec<(String, String)> =
            self.signing_keys.values().map(|k| (format!("keys/{}.pem", k.name), k.public_pem.clone())).collect();
        files.extend(spec.files.iter().map(|(k, v)| (k.clone(), v.clone())));
        let dir = PolicyDir::create(&self.cfg.policies, spec.policy.as_ref(), &files)
            .map_err(|e| format!("server `{name}`: {e}"))?;
        let env: Vec<(String, String)> = spec.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let mut args = spec.args.clone();
        let tls = if spec.tls {
            // Not a policy file: wsgate reads only `*.yaml` at the top and `schemas/`, `tests/`.
            let tls = tls::generate(&dir.path().join("tls"), name).map_err(|e| format!("server `{name}`: {e}"))?;
            self.redactor.register(format!("the TLS private key of server `{name}`"), tls.key_marker.clone());
            args.push("--tls-cert".into());
            args.push(tls.cert.display().to_string());
            args.push("--tls-key".into());
            args.push(tls.key.display().to_string());
            Some(tls)
        } else {
            None
        };
        if spec.uses_redis(self.scenario_redis)
            && let Some(redis) = &self.redis
        {
            args.extend(redis.args());
        }
        let opts = WsgateOptions {
            bin: &self.cfg.bin,
            name,
            policies: dir.path(),
            args: &args,
            env: &env,
            credentials: &self.credentials,
            ready_timeout: self.cfg.ready_timeout,
        };
        let server = WsgateServer::start(&opts, Arc::clone(&self.redactor)).await?;
        let haproxy = match spec.haproxy {
            None => None,
            Some(mode) => {
                let bin = find_haproxy().map_err(|e| format!("server `{name}` has `haproxy`, but {e}"))?;
                let redactor = Arc::clone(&self.redactor);
                let started = Haproxy::start(&bin, mode, server.ws_addr, redactor, self.cfg.ready_timeout).await;
                Some(started.map_err(|e| format!("server `{name}`: {e}"))?)
            }
        };
        self.servers.insert(name.to_string(), ServerState { server, dir, tls, signalled: None, haproxy });
        Ok(())
    }

    /// The failure message plus each server's state and log tail, redacted.
    pub(crate) fn failure_report(&mut self, error: &str, show_exit: bool) -> String {
        let mut out = error.to_string();
        for (name, state) in &mut self.servers {
            let process = &mut state.server.process;
            if show_exit && let Some(status) = process.exit_status() {
                out.push_str(&format!("\n  wsgate `{name}` is no longer running ({status})"));
            }
            let tail = process.log().tail(LOG_TAIL);
            if tail.is_empty() {
                out.push_str(&format!("\n  wsgate `{name}` printed nothing"));
            } else {
                out.push_str(&format!("\n  last {} lines of wsgate `{name}`:", tail.len()));
                push_lines(&mut out, tail);
            }
            if let Some(haproxy) = &state.haproxy {
                let tail = haproxy.log().tail(REDIS_LOG_TAIL);
                if !tail.is_empty() {
                    out.push_str(&format!("\n  last {} lines of the HAProxy in front of `{name}`:", tail.len()));
                    push_lines(&mut out, tail);
                }
            }
        }
        if let Some(redis) = &mut self.redis {
            if show_exit
                && !self.redis_stopped
                && let Some((port, status)) = redis.exited()
            {
                out.push_str(&format!(
                    "\n  redis-server on port {port} is no longer running ({})",
                    describe_exit(status)
                ));
            }
            let several = redis.nodes_mut().len() > 1;
            for node in redis.nodes_mut() {
                let tail = node.log().tail(REDIS_LOG_TAIL);
                let which = if several { format!(" on port {}", node.addr().port()) } else { String::new() };
                out.push_str(&format!("\n  last {} lines of redis-server{which}:", tail.len()));
                push_lines(&mut out, tail);
            }
        }
        self.redactor.redact(&out)
    }

    pub(crate) fn server(&self, name: &Option<String>) -> &ServerState {
        // `scenario::format::resolve` filled in and checked every server name.
        &self.servers[name.as_deref().unwrap_or(DEFAULT_SERVER)]
    }

    pub(crate) fn server_mut(&mut self, name: &Option<String>) -> Result<&mut ServerState, String> {
        let name = name.as_deref().unwrap_or(DEFAULT_SERVER);
        self.servers.get_mut(name).ok_or_else(|| format!("no server `{name}`"))
    }

    pub(crate) fn conn(&mut self, name: &Option<String>) -> Result<&mut ConnState, String> {
        find_conn(&mut self.conns, name)
    }

    /// The connection, reading again (a step that waits for frames ends a `pause_reading`).
    pub(crate) fn reading(&mut self, name: &Option<String>) -> Result<&mut ConnState, String> {
        let state = self.conn(name)?;
        state.conn.set_reading(true);
        Ok(state)
    }

    pub(crate) fn redis_mut(&mut self) -> Result<&mut Redis, String> {
        self.redis.as_mut().ok_or_else(|| "the scenario has no Redis (`redis: true`)".to_string())
    }
}

fn push_lines(out: &mut String, lines: Vec<String>) {
    for line in lines {
        out.push_str("\n    ");
        out.push_str(&clip(&line, 500));
    }
}
