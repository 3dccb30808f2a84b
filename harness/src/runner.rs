//! Runs one scenario: starts its Redis (with `redis: true`) and its servers from private policy
//! copies, carries out its steps in order against them, and turns the first unmet expectation
//! into a precise failure (step, what was expected, what arrived, and the tail of each
//! process's log). Every token and secret the scenario hands out is registered for redaction and
//! for the log-leak check that ends every passing scenario.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, Connection, Event, Handshake, Outcome, ReadMode};
use crate::duration::Dur;
use crate::http::{self, HttpError, HttpRequest, HttpResponse};
use crate::matching::{Saved, brief, clip, matches, matches_saving};
use crate::policy_dir::{PolicyDir, deep_merge};
use crate::redis_cluster::{Redis, RedisCluster};
use crate::redis_server::{self, RedisServer};
use crate::scenario::*;
use crate::supervisor::{Credentials, Redactor, WsgateOptions, WsgateServer, describe_exit};
use crate::tls::{self, ServerTls};
use crate::token::SigningKey;
use crate::token::{self, TokenSpec};

/// The default deadline of steps that wait for something.
const DEFAULT_WITHIN: Dur = Dur::secs(5);
/// How many log lines of each server a failure shows.
const LOG_TAIL: usize = 25;
/// How many log lines of Redis a failure shows.
const REDIS_LOG_TAIL: usize = 10;
/// How long Redis may take to start with the scenario.
const REDIS_READY: Duration = Duration::from_secs(10);
/// How long a three-node Redis Cluster may take to form.
const REDIS_CLUSTER_READY: Duration = Duration::from_secs(30);

/// What every scenario run needs to know.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The `wsgate` binary.
    pub bin: PathBuf,
    /// The policy directory each server's copy starts from (the repository's `policies/`).
    pub policies: PathBuf,
    /// How long a server may take to start listening.
    pub ready_timeout: Duration,
}

/// A running server of the scenario.
struct ServerState {
    /// The process and its addresses.
    server: WsgateServer,
    /// Its private policy directory (kept alive as long as the server runs); with `tls`, its
    /// `tls/` subdirectory holds the generated CA, certificate and key.
    dir: PolicyDir,
    /// With `tls: true`: the generated pair and the client that trusts it.
    tls: Option<ServerTls>,
    /// The last signal a `stop` step sent it, and when.
    signalled: Option<(StopSignal, Instant)>,
}

/// A connection opened by a `connect` step.
struct ConnState {
    /// The live connection.
    conn: Connection,
    /// Whether the scenario has seen it end (a close frame or a drop).
    ended: bool,
}

/// Everything one scenario run owns. Dropping it kills the servers and closes the sockets.
struct Ctx<'a> {
    cfg: &'a RunConfig,
    redactor: Arc<Redactor>,
    credentials: Credentials,
    servers: BTreeMap<String, ServerState>,
    conns: HashMap<String, ConnState>,
    /// The scenario's `signing_keys`, by name.
    signing_keys: HashMap<String, SigningKey>,
    /// With `redis: true`: the scenario's Redis.
    redis: Option<Redis>,
    /// Whether a `stop_redis` step took Redis down (so a report does not call that a crash).
    redis_stopped: bool,
    /// Values saved by `save_id` and `$save:NAME`, for `$saved:NAME`.
    saved: Saved,
}

/// Runs `scenario`; `Err` carries the complete, redacted failure report.
pub async fn run(scenario: &Scenario, cfg: &RunConfig) -> Result<(), String> {
    let redactor = Arc::new(Redactor::default());
    let credentials = Credentials::generate(&redactor);
    let mut ctx = Ctx {
        cfg,
        redactor,
        credentials,
        servers: BTreeMap::new(),
        conns: HashMap::new(),
        signing_keys: HashMap::new(),
        redis: None,
        redis_stopped: false,
        saved: Saved::new(),
    };
    let result = match ctx.start_servers(scenario).await {
        Err(e) => Err(e),
        Ok(()) => {
            let mut current = 0usize;
            let limit = scenario.timeout();
            let outcome = tokio::time::timeout(limit.0, ctx.run_steps(scenario, &mut current)).await;
            match outcome {
                Ok(result) => result,
                Err(_) => Err(format!(
                    "step {} ({}): the scenario did not finish within its timeout of {limit}",
                    current + 1,
                    scenario.steps[current].kind()
                )),
            }
        }
    };
    // A step failure is reported while the servers are as the failure left them.
    let report = result.map_err(|e| ctx.failure_report(&e, true));
    ctx.conns.clear();
    for state in ctx.servers.values_mut() {
        let process = &mut state.server.process;
        // A server that has already exited (an `expect_exit`, or a crash) is left alone; its
        // captured output is still complete for the leak check below.
        let _ = process.stop(Duration::from_secs(10)).await;
        // The last lines are still in the pipes when the process exits.
        let _ = process.log().wait_for(|_| None::<()>, Instant::now() + Duration::from_secs(2)).await;
    }
    // Redis last, so the servers never see it go away while they shut down.
    if let Some(redis) = &mut ctx.redis {
        redis.stop(Duration::from_secs(5)).await;
    }
    report?;
    // Checked after the stop, so what the servers print while shutting down counts too.
    let leaks = ctx.redactor.leaks();
    if leaks.is_empty() {
        Ok(())
    } else {
        Err(ctx.failure_report(&format!("a log contains a secret (SPEC §2): {}", leaks.join("; ")), false))
    }
}

/// Encodes a query-string value.
fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A JSON object padded with a `pad` string so that it serialises to exactly `size` bytes.
fn padded_json(value: &Value, size: usize) -> Result<String, String> {
    let mut object = value.clone();
    object["pad"] = Value::String(String::new());
    let base = serde_json::to_string(&object).map_err(|e| e.to_string())?.len();
    if base > size {
        return Err(format!("`pad_to: {size}` is smaller than the message itself ({base} bytes)"));
    }
    object["pad"] = Value::String("x".repeat(size - base));
    serde_json::to_string(&object).map_err(|e| e.to_string())
}

fn deadline(within: Option<Dur>) -> (Instant, Dur) {
    let within = within.unwrap_or(DEFAULT_WITHIN);
    (Instant::now() + within.0, within)
}

fn parse_json(text: &str) -> Result<Value, String> {
    serde_json::from_str(text).map_err(|_| format!("a text frame that is not JSON: {}", clip(text, 300)))
}

impl Ctx<'_> {
    async fn start_servers(&mut self, scenario: &Scenario) -> Result<(), String> {
        for (i, marker) in scenario.never_logged.iter().enumerate() {
            self.redactor.register(format!("the planted marker `never_logged[{i}]`"), marker.clone());
        }
        for name in &scenario.signing_keys {
            let key = SigningKey::generate(name)?;
            self.redactor.register(format!("the private signing key `{name}`"), key.private_marker.clone());
            self.signing_keys.insert(name.clone(), key);
        }
        if scenario.redis {
            let bin =
                redis_server::find_redis_server().map_err(|e| format!("the scenario has `redis: true`, but {e}"))?;
            let redactor = Arc::clone(&self.redactor);
            self.redis = Some(if scenario.redis_cluster {
                Redis::Cluster(RedisCluster::start(&bin, redactor, REDIS_CLUSTER_READY).await?)
            } else {
                Redis::Server(Box::new(RedisServer::start(&bin, redactor, REDIS_READY).await?))
            });
        }
        for (name, spec) in &scenario.servers {
            if spec.starts_with_the_scenario() {
                self.start_server(name, spec, scenario.redis).await?;
            }
        }
        Ok(())
    }

    /// Starts one server (with the scenario, or at its `start` step) and waits until it listens.
    async fn start_server(&mut self, name: &str, spec: &ServerSpec, scenario_redis: bool) -> Result<(), String> {
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
        if spec.uses_redis(scenario_redis)
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
        self.servers.insert(name.to_string(), ServerState { server, dir, tls, signalled: None });
        Ok(())
    }

    async fn run_steps(&mut self, scenario: &Scenario, current: &mut usize) -> Result<(), String> {
        for (i, step) in scenario.steps.iter().enumerate() {
            *current = i;
            let label = match step.conn() {
                Some(conn) => format!("step {} ({} `{conn}`)", i + 1, step.kind()),
                None => format!("step {} ({})", i + 1, step.kind()),
            };
            self.run_step(scenario, i, step).await.map_err(|e| format!("{label}: {e}"))?;
        }
        Ok(())
    }

    /// The failure message plus each server's state and log tail, redacted.
    fn failure_report(&mut self, error: &str, show_exit: bool) -> String {
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
                for line in tail {
                    out.push_str("\n    ");
                    out.push_str(&clip(&line, 500));
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
                for line in tail {
                    out.push_str("\n    ");
                    out.push_str(&clip(&line, 500));
                }
            }
        }
        self.redactor.redact(&out)
    }

    fn server(&self, name: &Option<String>) -> &ServerState {
        // `scenario::resolve` filled in and checked every server name.
        &self.servers[name.as_deref().unwrap_or(DEFAULT_SERVER)]
    }

    fn conn(&mut self, name: &Option<String>) -> Result<&mut ConnState, String> {
        find_conn(&mut self.conns, name)
    }

    async fn run_step(&mut self, scenario: &Scenario, index: usize, step: &Step) -> Result<(), String> {
        match step {
            Step::Connect(s) => self.connect(index, s).await,
            Step::Send(s) => self.send(s).await,
            Step::Expect(s) => self.expect(s).await,
            Step::ExpectClose(s) => self.expect_close(s).await,
            Step::ExpectDropped(s) => self.expect_dropped(s).await,
            Step::ExpectNoFrame(s) => self.expect_no_frame(s).await,
            Step::Close(s) => self.close(s).await,
            Step::Wait(d) => {
                tokio::time::sleep(d.0).await;
                Ok(())
            }
            Step::Publish(s) => self.publish(s).await,
            Step::Http(s) => self.http(s).await,
            Step::EditPolicy(s) => {
                let files: Vec<(String, String)> = s.files.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                let state = self.server_mut(&s.server)?;
                state.dir.apply(s.policy.as_ref(), &files, s.replace)
            }
            Step::PauseReading(c) => {
                self.conn(&Some(c.clone()))?.conn.set_reading(false);
                Ok(())
            }
            Step::ResumeReading(c) => {
                self.conn(&Some(c.clone()))?.conn.set_reading(true);
                Ok(())
            }
            Step::ExpectLog(s) => {
                let (until, within) = deadline(s.within);
                let log = Arc::clone(self.server(&s.server).server.process.log());
                log.wait_for(|line| line.contains(s.contains.as_str()).then_some(()), until)
                    .await
                    .map_err(|_| format!("no log line containing {:?} within {within}", s.contains))
            }
            Step::Sighup(s) => self.server_mut(&s.server)?.server.process.signal("HUP").await,
            Step::Stop(s) => {
                let state = self.server_mut(&s.server)?;
                state.server.process.signal(s.signal.name()).await?;
                state.signalled = Some((s.signal, Instant::now()));
                Ok(())
            }
            Step::ExpectExit(s) => self.expect_exit(s).await,
            Step::Start(s) => {
                let name = s.server.as_deref().unwrap_or(DEFAULT_SERVER);
                let spec = scenario.servers.get(name).ok_or_else(|| format!("no server `{name}`"))?;
                self.start_server(name, spec, scenario.redis).await
            }
            Step::StopRedis(s) => {
                self.redis_mut()?.kill(s.signal.name()).await?;
                self.redis_stopped = true;
                Ok(())
            }
            Step::StartRedis(s) => {
                let within = s.within.unwrap_or(DEFAULT_REDIS_READY);
                self.redis_mut()?.restart(within.0).await?;
                self.redis_stopped = false;
                Ok(())
            }
            Step::RedisPublish(s) => self.redis_publish(s).await,
        }
    }

    fn redis_mut(&mut self) -> Result<&mut Redis, String> {
        self.redis.as_mut().ok_or_else(|| "the scenario has no Redis (`redis: true`)".to_string())
    }

    async fn redis_publish(&mut self, s: &RedisPublishStep) -> Result<(), String> {
        let payload = match &s.payload {
            Value::String(text) => text.clone(),
            other => other.to_string(),
        };
        let redis = self.redis_mut()?;
        let receivers = redis.publish(&s.channel, payload.as_bytes(), DEFAULT_WITHIN.0).await?;
        match s.expect_receivers {
            Some(want) if want != receivers => Err(format!(
                "expected {} {} to reach {want} Redis subscriber(s), it reached {receivers}",
                redis.publish_command(),
                s.channel
            )),
            _ => Ok(()),
        }
    }

    fn server_mut(&mut self, name: &Option<String>) -> Result<&mut ServerState, String> {
        let name = name.as_deref().unwrap_or(DEFAULT_SERVER);
        self.servers.get_mut(name).ok_or_else(|| format!("no server `{name}`"))
    }

    async fn expect_exit(&mut self, s: &ExpectExitStep) -> Result<(), String> {
        let within = s.within.unwrap_or(DEFAULT_EXIT_WITHIN);
        let until = Instant::now() + within.0;
        let state = self.server_mut(&s.server)?;
        let outcome = state.server.process.wait_exit(until).await?;
        // "(2301 ms after SIGTERM)", when a `stop` step sent one.
        let after = state
            .signalled
            .map(|(signal, at)| format!(" ({} ms after SIG{})", at.elapsed().as_millis(), signal.name()))
            .unwrap_or_default();
        match outcome {
            Some(status) if status.code() == Some(s.code) => Ok(()),
            Some(status) => Err(format!("expected exit status {}, got {}{after}", s.code, describe_exit(status))),
            None => Err(format!(
                "expected the server to exit with status {} within {within}; it is still running{after}",
                s.code
            )),
        }
    }

    async fn connect(&mut self, index: usize, s: &ConnectStep) -> Result<(), String> {
        let name = s.name.clone().unwrap_or_default();
        if s.expect_status.is_none()
            && let Some(existing) = self.conns.get(&name)
            && !existing.ended
        {
            return Err(format!(
                "connection `{name}` is still open (no close or drop was expected on it); give the new one another name"
            ));
        }
        let state = self.server(&s.server);
        let ws_addr = state.server.ws_addr;
        let tls = state.tls.as_ref().map(|t| t.client.clone());
        let algorithm = s.algorithm.as_deref().map(token::parse_algorithm).transpose()?;
        let spec = TokenSpec {
            kind: s.token,
            sub: s.user.as_deref(),
            claims: &s.claims,
            omit: &s.omit_claims,
            ttl: s.ttl.map_or(Duration::from_secs(15 * 60), |d| d.0),
            algorithm,
            key: s.signing_key.as_ref().and_then(|k| self.signing_keys.get(k)),
        };
        let token = token::mint(self.credentials.jwt_secret.as_bytes(), &spec, SystemTime::now())?;
        if let Some(t) = &token {
            self.redactor.register(format!("the token of step {}", index + 1), t.clone());
        }

        // SPEC §2: logs never contain a query string either; long values are distinctive enough
        // to look for.
        for (k, v) in &s.query {
            self.redactor.register(format!("the query parameter `{k}` of step {}", index + 1), v.clone());
        }
        let mut query: Vec<(String, String)> = s.query.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let mut headers: Vec<(String, String)> = Vec::new();
        if let Some(origin) = &s.origin {
            headers.push(("Origin".into(), origin.clone()));
        }
        match (s.via, &token) {
            (Via::Query, Some(t)) => query.push((s.token_name.clone().unwrap_or("token".into()), t.clone())),
            (Via::Header, Some(t)) => {
                headers.push((s.token_name.clone().unwrap_or("Authorization".into()), format!("Bearer {t}")))
            }
            (Via::Cookie, Some(t)) => {
                headers.push(("Cookie".into(), format!("{}={t}", s.token_name.as_deref().unwrap_or("wsgate_token"))))
            }
            (Via::Subprotocol, Some(t)) => {
                headers.push(("Sec-WebSocket-Protocol".into(), format!("wsgate.v1, bearer.{t}")))
            }
            (Via::Subprotocol, None) => headers.push(("Sec-WebSocket-Protocol".into(), "wsgate.v1".into())),
            (_, None) => {}
        }
        headers.extend(s.headers.iter().map(|(k, v)| (k.clone(), v.clone())));
        let mut path_and_query = s.path.clone().unwrap_or("/ws".into());
        for (i, (k, v)) in query.iter().enumerate() {
            path_and_query.push(if i == 0 && !path_and_query.contains('?') { '?' } else { '&' });
            path_and_query.push_str(&format!("{}={}", percent_encode(k), percent_encode(v)));
        }
        let (until, within) = deadline(s.within);
        let handshake = Handshake { addr: ws_addr, path_and_query, headers, timeout: within.0, tls };
        let mode = if s.silent { ReadMode::PauseAfterFirstFrame } else { ReadMode::Reading };
        let leaks_token = |text: &str| token.as_deref().is_some_and(|t| text.contains(t));

        match (client::connect(&handshake, mode).await?, s.expect_status) {
            (Outcome::Refused { status, headers, body }, Some(want)) => {
                let body_text = String::from_utf8_lossy(&body).into_owned();
                if status != want {
                    return Err(format!(
                        "expected the handshake to be refused with {want}, got {status} {}",
                        clip(&body_text, 300)
                    ));
                }
                if leaks_token(&body_text) || headers.iter().any(|(_, v)| leaks_token(v)) {
                    return Err("the refusal contains the token".into());
                }
                check_refusal(s, &headers, &body_text, &mut self.saved)
            }
            (Outcome::Refused { status, body, .. }, None) => Err(format!(
                "expected the handshake to be accepted, got {status} {}",
                clip(&String::from_utf8_lossy(&body), 300)
            )),
            (Outcome::Accepted { .. }, Some(want)) => {
                Err(format!("expected the handshake to be refused with {want}, but the server upgraded the connection"))
            }
            (Outcome::Accepted { mut conn, headers }, None) => {
                if let Some((name, _)) = headers.iter().find(|(_, v)| leaks_token(v)) {
                    return Err(format!("the 101 response's `{name}` header contains the token"));
                }
                if s.via == Via::Subprotocol {
                    let answered = headers.iter().find(|(k, _)| k == "sec-websocket-protocol").map(|(_, v)| v.as_str());
                    if answered != Some("wsgate.v1") {
                        return Err(format!("expected the server to answer subprotocol `wsgate.v1`, got {answered:?}"));
                    }
                }
                let mut pattern = json!({
                    "type": "welcome",
                    "session": "$nonempty",
                    "user": s.user.clone().unwrap_or_default(),
                    "instance": "$string",
                    "heartbeat_ms": "$number",
                });
                if let Some(extra) = &s.expect_welcome {
                    deep_merge(&mut pattern, extra);
                }
                let first = conn.next_event(until).await;
                let mut state = ConnState { conn, ended: false };
                match first {
                    None => return Err(format!("no welcome frame within {within}")),
                    Some(Event::Text(text)) => {
                        let value = parse_json(&text).map_err(|e| format!("expected the welcome frame, got {e}"))?;
                        matches_saving(&pattern, &value, &mut self.saved)
                            .map_err(|e| format!("the welcome frame {}: {e}", brief(&value)))?;
                    }
                    Some(other) => {
                        state.ended = other.is_end();
                        return Err(format!("expected the welcome frame, got {}", other.describe()));
                    }
                }
                self.conns.insert(name, state);
                Ok(())
            }
        }
    }

    async fn send(&mut self, s: &SendStep) -> Result<(), String> {
        let message = match (&s.text, &s.json, s.binary, s.text_size) {
            (Some(text), ..) => Message::text(text.clone()),
            (_, Some(value), ..) => match s.pad_to {
                Some(size) => Message::text(padded_json(value, size)?),
                None => Message::text(value.to_string()),
            },
            (_, _, Some(n), _) => Message::binary(vec![0xA5u8; n]),
            (_, _, _, Some(n)) => Message::text("x".repeat(n)),
            _ => return Err("nothing to send".into()),
        };
        let repeat = s.repeat.unwrap_or(1);
        let state = self.conn(&s.conn)?;
        for n in 1..=repeat {
            state.conn.send(message.clone(), DEFAULT_WITHIN.0).await.map_err(|e| {
                let which = if repeat > 1 { format!(" (message {n} of {repeat})") } else { String::new() };
                format!("cannot send{which}: {e}")
            })?;
        }
        Ok(())
    }

    async fn expect(&mut self, s: &ExpectStep) -> Result<(), String> {
        let repeat = s.repeat.unwrap_or(1);
        for n in 1..=repeat {
            self.expect_once(s)
                .await
                .map_err(|e| if repeat > 1 { format!("frame {n} of {repeat}: {e}") } else { e })?;
        }
        Ok(())
    }

    async fn expect_once(&mut self, s: &ExpectStep) -> Result<(), String> {
        let (until, within) = deadline(s.within);
        let state = find_conn(&mut self.conns, &s.conn)?;
        let saved = &mut self.saved;
        state.conn.set_reading(true);
        let mut remaining: Vec<&Value> = match (&s.json, &s.unordered) {
            (Some(pattern), _) => vec![pattern],
            (_, Some(patterns)) => patterns.iter().collect(),
            _ => Vec::new(),
        };
        if let Some(want) = &s.text {
            return match state.conn.next_event(until).await {
                Some(Event::Text(text)) if &text == want => Ok(()),
                Some(other) => {
                    state.ended = other.is_end();
                    Err(format!("expected text frame {}, got {}", clip(want, 300), other.describe()))
                }
                None => Err(format!("expected text frame {}, got nothing within {within}", clip(want, 300))),
            };
        }
        let total = remaining.len();
        while !remaining.is_empty() {
            let seen = total - remaining.len();
            let wanted = || match remaining.as_slice() {
                [one] if total == 1 => format!("a frame matching {}", brief(one)),
                many => format!(
                    "{} more frame(s) matching, in any order, {}",
                    many.len(),
                    many.iter().map(|v| brief(v)).collect::<Vec<_>>().join(" | ")
                ),
            };
            let event = match state.conn.next_event(until).await {
                None => {
                    return Err(format!("expected {}, got nothing within {within} (after {seen} matched)", wanted()));
                }
                Some(e) => e,
            };
            let Event::Text(text) = &event else {
                state.ended = event.is_end();
                return Err(format!("expected {}, got {}", wanted(), event.describe()));
            };
            let value = parse_json(text).map_err(|e| format!("expected {}, got {e}", wanted()))?;
            let mut errors = Vec::new();
            let mut hit = None;
            for (i, pattern) in remaining.iter().enumerate() {
                match matches_saving(pattern, &value, saved) {
                    Ok(()) => {
                        hit = Some(i);
                        break;
                    }
                    Err(e) => errors.push(e),
                }
            }
            match hit {
                Some(i) => {
                    remaining.remove(i);
                }
                None if total == 1 => {
                    return Err(format!("expected {}, got {} ({})", wanted(), brief(&value), errors.join("; ")));
                }
                None => return Err(format!("expected {}, got {} which matches none of them", wanted(), brief(&value))),
            }
        }
        Ok(())
    }

    async fn expect_close(&mut self, s: &ExpectCloseStep) -> Result<(), String> {
        let (until, within) = deadline(s.within);
        let state = self.conn(&s.conn)?;
        state.conn.set_reading(true);
        let wanted = match (s.code, &s.reason) {
            (Some(code), Some(r)) => format!("a close frame {code} with a reason containing {r:?}"),
            (Some(code), None) => format!("a close frame {code}"),
            (None, Some(r)) => format!("a close frame with a reason containing {r:?}"),
            (None, None) => "a close frame".to_string(),
        };
        let mut skipped = 0usize;
        let mut last_skipped = String::new();
        let skipped_note = |skipped: usize, last: &str| {
            if skipped == 0 {
                String::new()
            } else {
                format!(" (after skipping {skipped} data frames, the last: {last})")
            }
        };
        loop {
            match state.conn.next_event(until).await {
                None => {
                    return Err(format!(
                        "expected {wanted} within {within}, got nothing{}",
                        skipped_note(skipped, &last_skipped)
                    ));
                }
                Some(event @ (Event::Text(_) | Event::Binary(_))) => {
                    if s.no_frames_before {
                        return Err(format!("expected {wanted}, got {}", event.describe()));
                    }
                    skipped += 1;
                    last_skipped = event.describe();
                }
                Some(Event::Close { code, reason }) => {
                    state.ended = true;
                    let code_ok = s.code.is_none() || s.code == code;
                    let reason_ok = s.reason.as_deref().is_none_or(|r| reason.contains(r));
                    if code_ok && reason_ok {
                        return Ok(());
                    }
                    let got = Event::Close { code, reason }.describe();
                    return Err(format!("expected {wanted}, got {got}{}", skipped_note(skipped, &last_skipped)));
                }
                Some(event @ Event::Dropped { .. }) => {
                    state.ended = true;
                    return Err(format!(
                        "expected {wanted}, got {}{}",
                        event.describe(),
                        skipped_note(skipped, &last_skipped)
                    ));
                }
            }
        }
    }

    async fn expect_dropped(&mut self, s: &ExpectDroppedStep) -> Result<(), String> {
        let (until, within) = deadline(s.within);
        let state = self.conn(&s.conn)?;
        state.conn.set_reading(true);
        let wanted = match s.close_frame {
            Some(true) => "the connection to end with a close frame",
            Some(false) => "the connection to be dropped without a close frame",
            None => "the connection to end",
        };
        let mut skipped = 0usize;
        loop {
            match state.conn.next_event(until).await {
                None => {
                    return Err(format!(
                        "expected {wanted} within {within}; it is still open (skipped {skipped} data frames)"
                    ));
                }
                Some(Event::Text(_) | Event::Binary(_)) => skipped += 1,
                Some(event @ Event::Close { .. }) => {
                    state.ended = true;
                    return if s.close_frame == Some(false) {
                        Err(format!("expected {wanted}, got {}", event.describe()))
                    } else {
                        Ok(())
                    };
                }
                Some(event @ Event::Dropped { .. }) => {
                    state.ended = true;
                    return if s.close_frame == Some(true) {
                        Err(format!("expected {wanted}, got {}", event.describe()))
                    } else {
                        Ok(())
                    };
                }
            }
        }
    }

    async fn expect_no_frame(&mut self, s: &ExpectNoFrameStep) -> Result<(), String> {
        let duration = s.duration.unwrap_or(Dur::secs(1));
        let start = Instant::now();
        let state = self.conn(&s.conn)?;
        state.conn.set_reading(true);
        match state.conn.next_event(start + duration.0).await {
            None => Ok(()),
            Some(event) => {
                state.ended = event.is_end();
                Err(format!(
                    "expected nothing for {duration}, got {} after {}ms",
                    event.describe(),
                    start.elapsed().as_millis()
                ))
            }
        }
    }

    async fn close(&mut self, s: &CloseStep) -> Result<(), String> {
        let code = s.code.unwrap_or(1000);
        let want = s.expect_code.unwrap_or(code);
        let (until, within) = deadline(s.within);
        let state = self.conn(&s.conn)?;
        state.conn.set_reading(true);
        if let Err(e) = state.conn.close(code, s.reason.as_deref().unwrap_or(""), DEFAULT_WITHIN.0).await {
            // Say why: usually the server closed first.
            let already = state.conn.try_next_event().map(|e| format!(" ({})", e.describe())).unwrap_or_default();
            return Err(format!("cannot send the close frame: {e}{already}"));
        }
        let mut skipped = 0usize;
        loop {
            match state.conn.next_event(until).await {
                None => {
                    return Err(format!(
                        "expected the server to answer with close {want} within {within}, got nothing"
                    ));
                }
                Some(Event::Text(_) | Event::Binary(_)) => skipped += 1,
                Some(event @ (Event::Close { .. } | Event::Dropped { .. })) => {
                    state.ended = true;
                    return match event {
                        Event::Close { code: Some(c), .. } if c == want => Ok(()),
                        other => Err(format!(
                            "expected the server to answer with close {want}, got {} (after skipping {skipped} data frames)",
                            other.describe()
                        )),
                    };
                }
            }
        }
    }

    fn admin_headers(&self, auth: AdminAuth) -> Vec<(String, String)> {
        match auth {
            AdminAuth::Valid => vec![("Authorization".into(), format!("Bearer {}", self.credentials.admin_token))],
            AdminAuth::Wrong => vec![("Authorization".into(), "Bearer not-the-admin-token".into())],
            AdminAuth::None => Vec::new(),
        }
    }

    async fn publish(&mut self, s: &PublishStep) -> Result<(), String> {
        let admin = self.server(&s.server).server.admin_addr;
        let data = match (&s.data, s.data_size) {
            (_, Some(n)) => Value::String("d".repeat(n)),
            (Some(v), None) => v.clone(),
            (None, None) => Value::Null,
        };
        let body = serde_json::to_vec(&json!({"channel": s.channel, "data": data})).map_err(|e| e.to_string())?;
        let want = s.expect_status.unwrap_or(200);
        let repeat = s.repeat.unwrap_or(1);
        let req = HttpRequest {
            method: "POST",
            path: "/v1/publish",
            headers: self.admin_headers(s.auth),
            body: Some(("application/json", body)),
        };
        if let Some(until) = &s.until {
            return self.publish_until(s, until, admin, &req).await;
        }
        for n in 1..=repeat {
            let which = if repeat > 1 { format!(" (publish {n} of {repeat})") } else { String::new() };
            let id = publish_once(admin, &req, want, &which).await?;
            if let (Some(name), Some(id)) = (&s.save_id, id) {
                self.saved.insert(name.clone(), Value::String(id));
            }
        }
        Ok(())
    }

    /// `publish … until`: publishes every `every` until `until.conn` receives a frame matching
    /// `until.json`, up to `within`. Other frames on the connection are skipped.
    async fn publish_until(
        &mut self,
        s: &PublishStep,
        until: &DeliveredStep,
        admin: std::net::SocketAddr,
        req: &HttpRequest<'_>,
    ) -> Result<(), String> {
        let (give_up, within) = deadline(s.within);
        let every = s.every.unwrap_or(DEFAULT_PUBLISH_EVERY);
        let name = until.conn.clone().unwrap_or_default();
        let state = find_conn(&mut self.conns, &until.conn)?;
        let saved = &mut self.saved;
        state.conn.set_reading(true);
        let wanted = format!("a frame matching {} on `{name}`", brief(&until.json));
        let mut published = 0usize;
        let mut skipped = 0usize;
        let mut last_skipped = String::new();
        loop {
            published += 1;
            publish_once(admin, req, 200, &format!(" (publish {published})")).await?;
            let next = (Instant::now() + every.0).min(give_up);
            while let Some(event) = state.conn.next_event(next).await {
                match event {
                    Event::Text(text) => {
                        let value = serde_json::from_str::<Value>(&text);
                        if value.is_ok_and(|v| matches_saving(&until.json, &v, saved).is_ok()) {
                            return Ok(());
                        }
                        skipped += 1;
                        last_skipped = Event::Text(text).describe();
                    }
                    event @ Event::Binary(_) => {
                        skipped += 1;
                        last_skipped = event.describe();
                    }
                    end => {
                        state.ended = true;
                        return Err(format!("expected {wanted}, got {} (after {published} publishes)", end.describe()));
                    }
                }
            }
            if Instant::now() >= give_up {
                let note = if skipped == 0 {
                    String::new()
                } else {
                    format!("; skipped {skipped} other frames, the last: {last_skipped}")
                };
                return Err(format!("expected {wanted} within {within}; none came after {published} publishes{note}"));
            }
        }
    }

    async fn http(&mut self, s: &HttpStep) -> Result<(), String> {
        let state = self.server(&s.server);
        // The admin listener is always plaintext; the public one speaks TLS on a `tls` server.
        let (addr, tls) = match s.listener {
            Listener::Ws if s.plaintext => (state.server.ws_addr, None),
            Listener::Ws => (state.server.ws_addr, state.tls.as_ref().map(|t| t.client.clone())),
            Listener::Admin => (state.server.admin_addr, None),
        };
        let mut headers = s.auth.map(|a| self.admin_headers(a)).unwrap_or_default();
        headers.extend(s.headers.iter().map(|(k, v)| (k.clone(), v.clone())));
        let body = match (&s.json, &s.text) {
            (Some(v), _) => Some(("application/json", v.to_string().into_bytes())),
            (_, Some(t)) => Some(("text/plain", t.clone().into_bytes())),
            _ => None,
        };
        let method = s.method.clone().unwrap_or("GET".into()).to_ascii_uppercase();
        let req = HttpRequest { method: &method, path: &s.path, headers, body };
        let until = s.retry_within.map(|d| Instant::now() + d.0);
        loop {
            let outcome = match (http::send(addr, tls.as_ref(), &req, DEFAULT_WITHIN.0).await, s.expect_status) {
                (Ok(resp), Some(_)) => check_http(s, &resp, &mut self.saved),
                (Err(e), Some(_)) => Err(e.to_string()),
                (Err(HttpError::NoResponse(_)), None) => Ok(()),
                (Err(e @ (HttpError::Connect(_) | HttpError::Timeout(_))), None) => {
                    Err(format!("expected the server to end the connection without a response, got: {e}"))
                }
                (Ok(resp), None) => Err(format!(
                    "expected the server to end the connection without a response, got status {} {}",
                    resp.status,
                    body_text(&resp)
                )),
            };
            match (outcome, until) {
                (Ok(()), _) => return Ok(()),
                (Err(_), Some(until)) if Instant::now() < until => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                (Err(e), Some(_)) => {
                    let retried = s.retry_within.unwrap_or(Dur::secs(0));
                    return Err(format!("{e} (still, after retrying for {retried})"));
                }
                (Err(e), None) => return Err(e),
            }
        }
    }
}

/// One `POST /v1/publish` that must answer `want`; with 200 the answer must carry the message
/// id, which is returned. `which` says which publish of several it was, for messages.
async fn publish_once(
    admin: std::net::SocketAddr,
    req: &HttpRequest<'_>,
    want: u16,
    which: &str,
) -> Result<Option<String>, String> {
    let resp = http::send(admin, None, req, DEFAULT_WITHIN.0).await.map_err(|e| format!("{e}{which}"))?;
    if resp.status != want {
        return Err(format!("expected status {want}{which}, got {} {}", resp.status, body_text(&resp)));
    }
    if want != 200 {
        return Ok(None);
    }
    let value: Value = serde_json::from_slice(&resp.body)
        .map_err(|_| format!("expected a JSON answer{which}, got {}", body_text(&resp)))?;
    match value.get("id") {
        Some(Value::String(id)) if !id.is_empty() => Ok(Some(id.clone())),
        _ => Err(format!("expected {{\"id\": \"<message id>\"}}{which}, got {}", brief(&value))),
    }
}

/// A connection by name (`conns` apart from the rest of the context, so a step can hold a
/// connection and the saved values at once).
fn find_conn<'c>(
    conns: &'c mut HashMap<String, ConnState>,
    name: &Option<String>,
) -> Result<&'c mut ConnState, String> {
    let name = name.as_deref().unwrap_or_default();
    conns.get_mut(name).ok_or_else(|| format!("connection `{name}` was never opened (its connect step failed?)"))
}

fn body_text(resp: &HttpResponse) -> String {
    clip(&String::from_utf8_lossy(&resp.body), 300)
}

fn check_http(s: &HttpStep, resp: &HttpResponse, saved: &mut Saved) -> Result<(), String> {
    let what = format!("{} {}", s.method.as_deref().unwrap_or("GET").to_ascii_uppercase(), s.path);
    if let Some(want) = s.expect_status
        && resp.status != want
    {
        return Err(format!("{what}: expected status {want}, got {} {}", resp.status, body_text(resp)));
    }
    for (name, want) in &s.expect_headers {
        match resp.header(name) {
            Some(v) if v.contains(want.as_str()) => {}
            Some(v) => return Err(format!("{what}: expected header `{name}` to contain {want:?}, got {v:?}")),
            None => return Err(format!("{what}: expected a `{name}` header, got none")),
        }
    }
    if let Some(want) = &s.expect_text
        && !String::from_utf8_lossy(&resp.body).contains(want.as_str())
    {
        return Err(format!("{what}: expected the body to contain {want:?}, got {}", body_text(resp)));
    }
    if let Some(pattern) = &s.expect_body {
        let value: Value = serde_json::from_slice(&resp.body)
            .map_err(|_| format!("{what}: expected a JSON body, got {}", body_text(resp)))?;
        matches_saving(pattern, &value, saved).map_err(|e| format!("{what}: body {}: {e}", brief(&value)))?;
    }
    Ok(())
}

/// Checks a refusal against SPEC §3 (a JSON body with `error` and `reason`) and the step.
fn check_refusal(s: &ConnectStep, headers: &[(String, String)], body: &str, saved: &mut Saved) -> Result<(), String> {
    let value: Value = serde_json::from_str(body)
        .map_err(|_| format!("expected a JSON body {{\"error\", \"reason\"}} (SPEC §3), got {}", clip(body, 300)))?;
    matches(&json!({"error": "$string", "reason": "$string"}), &value)
        .map_err(|e| format!("the refusal body {} does not have the shape of SPEC §3: {e}", brief(&value)))?;
    if let Some(want) = &s.expect_error {
        matches(&json!({ "error": want }), &value).map_err(|e| format!("the refusal body {}: {e}", brief(&value)))?;
    }
    if let Some(pattern) = &s.expect_body {
        matches_saving(pattern, &value, saved).map_err(|e| format!("the refusal body {}: {e}", brief(&value)))?;
    }
    let retry_after = headers.iter().find(|(k, _)| k == "retry-after").map(|(_, v)| v.trim());
    match (s.retry_after, retry_after) {
        (Some(true), None) => Err("expected a Retry-After header, got none".into()),
        (Some(true), Some(v)) if !v.parse::<u64>().is_ok_and(|n| n >= 1) => {
            Err(format!("expected Retry-After to be whole seconds ≥ 1, got {v:?}"))
        }
        (Some(false), Some(v)) => Err(format!("expected no Retry-After header, got {v:?}")),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_json_to_an_exact_size() {
        let text = padded_json(&json!({"type": "ping"}), 20480).unwrap();
        assert_eq!(text.len(), 20480);
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["type"], "ping");
        assert!(padded_json(&json!({"type": "ping"}), 5).is_err());
    }

    #[test]
    fn percent_encodes_query_values() {
        assert_eq!(percent_encode("a.b-c_d~e"), "a.b-c_d~e");
        assert_eq!(percent_encode("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
    }

    /// A stand-in for wsgate: a shell script, so the supervisor and reports can be tested
    /// without the server.
    fn fake_server(dir: &std::path::Path, body: &str) -> RunConfig {
        use std::os::unix::fs::PermissionsExt;
        let bin = dir.join("fake-wsgate");
        std::fs::write(&bin, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        RunConfig {
            bin,
            policies: std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies"),
            ready_timeout: Duration::from_secs(10),
        }
    }

    #[tokio::test]
    async fn a_server_that_exits_is_reported_with_its_output_redacted() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = fake_server(dir.path(), "echo \"starting with $WSGATE_JWT_SECRET\" >&2; exit 3");
        let scenario = crate::scenario::parse("steps:\n  - wait: 10ms\n").unwrap();
        let report = run(&scenario, &cfg).await.unwrap_err();
        assert!(report.contains("exited (exit status: 3)"), "{report}");
        assert!(report.contains("starting with <redacted: the JWT secret>"), "{report}");
    }

    #[tokio::test]
    async fn a_secret_in_the_log_fails_an_otherwise_passing_scenario() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = fake_server(
            dir.path(),
            "echo 'wsgate listening ws=127.0.0.1:9 admin=127.0.0.1:9'; echo \"admin=$WSGATE_ADMIN_TOKEN\" >&2; exec sleep 30",
        );
        let scenario = crate::scenario::parse("steps:\n  - wait: 10ms\n").unwrap();
        let report = run(&scenario, &cfg).await.unwrap_err();
        assert!(
            report.starts_with("a log contains a secret (SPEC §2): wsgate `main` logged the admin token"),
            "{report}"
        );
        assert!(report.contains("admin=<redacted: the admin token>"), "{report}");
    }

    /// A stand-in that drains on SIGTERM: prints `line` and exits with `code`.
    fn draining_server(dir: &std::path::Path, line: &str, code: i32) -> RunConfig {
        fake_server(
            dir,
            &format!(
                "trap 'echo \"{line}\" >&2; exit {code}' TERM\n\
                 echo 'wsgate listening ws=127.0.0.1:9 admin=127.0.0.1:9'\n\
                 while :; do sleep 0.05; done"
            ),
        )
    }

    #[tokio::test]
    async fn stop_then_expect_exit_passes_and_the_log_of_the_exited_server_is_still_scanned() {
        let dir = tempfile::tempdir().unwrap();
        let scenario = crate::scenario::parse(
            "steps:\n  - stop: {}\n  - expect_exit: {code: 0, within: 5s}\n  - expect_log: {contains: draining}\n",
        )
        .unwrap();
        run(&scenario, &draining_server(dir.path(), "draining", 0)).await.unwrap();

        let leaky = draining_server(dir.path(), "draining with $WSGATE_ADMIN_TOKEN", 0);
        let report = run(&scenario, &leaky).await.unwrap_err();
        assert!(
            report.starts_with("a log contains a secret (SPEC §2): wsgate `main` logged the admin token"),
            "{report}"
        );
        assert!(report.contains("draining with <redacted: the admin token>"), "{report}");
    }

    #[tokio::test]
    async fn expect_exit_reports_the_wrong_status_and_a_server_that_keeps_running() {
        let dir = tempfile::tempdir().unwrap();
        let scenario = crate::scenario::parse("steps:\n  - stop: {}\n  - expect_exit: {}\n").unwrap();
        let report = run(&scenario, &draining_server(dir.path(), "bye", 3)).await.unwrap_err();
        assert!(report.starts_with("step 2 (expect_exit): expected exit status 0, got exit status 3 ("), "{report}");
        assert!(report.contains("ms after SIGTERM)"), "{report}");

        let scenario = crate::scenario::parse("steps:\n  - expect_exit: {within: 300ms}\n").unwrap();
        let report = run(&scenario, &draining_server(dir.path(), "bye", 0)).await.unwrap_err();
        assert!(
            report.starts_with(
                "step 1 (expect_exit): expected the server to exit with status 0 within 300ms; it is still running"
            ),
            "{report}"
        );
    }

    /// A scenario with `redis: true` against stand-in servers that print their arguments: the
    /// Redis is started first and every server that uses it gets `--redis` with its URL (a late
    /// server too, one with `redis: false` not); `stop_redis`, `start_redis` and `redis_publish`
    /// run against the real redis-server.
    #[tokio::test]
    async fn redis_scenarios_start_redis_and_pass_its_url() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = fake_server(
            dir.path(),
            "echo \"started with $*\" >&2; echo 'wsgate listening ws=127.0.0.1:9 admin=127.0.0.1:9'; exec sleep 30",
        );
        let scenario = crate::scenario::parse(
            "redis: true\n\
             servers: {a: {}, solo: {redis: false}, late: {start: false}}\n\
             steps:\n\
             \x20 - expect_log: {server: a, contains: '--redis redis://127.0.0.1:'}\n\
             \x20 - redis_publish: {channel: 'wsgate:ch:alerts', payload: {id: b-1, data: {}}, expect_receivers: 0}\n\
             \x20 - stop_redis: {}\n\
             \x20 - start_redis: {}\n\
             \x20 - redis_publish: {channel: 'wsgate:ch:alerts', payload: 'raw text'}\n\
             \x20 - start: {server: late}\n\
             \x20 - expect_log: {server: late, contains: '--instance-id late --redis redis://127.0.0.1:'}\n\
             \x20 - expect_log: {server: solo, contains: '--instance-id solo', within: 1s}\n",
        )
        .unwrap();
        run(&scenario, &cfg).await.unwrap();

        // The Redis URL is the one of the Redis the harness started: PUBLISH a count that fails.
        let wrong = crate::scenario::parse(
            "redis: true\nsteps:\n  - redis_publish: {channel: c, payload: x, expect_receivers: 3}\n",
        )
        .unwrap();
        let report = run(&wrong, &cfg).await.unwrap_err();
        assert!(
            report
                .starts_with("step 1 (redis_publish): expected PUBLISH c to reach 3 Redis subscriber(s), it reached 0"),
            "{report}"
        );
        assert!(
            report.contains("lines of redis-server:") && report.contains("Ready to accept connections"),
            "{report}"
        );

        // `redis: false` leaves `--redis` out.
        let solo = crate::scenario::parse(
            "redis: true\nservers: {solo: {redis: false}}\nsteps:\n  - expect_log: {contains: '--redis', within: 300ms}\n",
        )
        .unwrap();
        let report = run(&solo, &cfg).await.unwrap_err();
        assert!(report.contains("no log line containing \"--redis\""), "{report}");
    }

    fn connect_step(yaml: &str) -> ConnectStep {
        let scenario = crate::scenario::parse(&format!("steps:\n  - connect: {yaml}\n")).unwrap();
        match &scenario.steps[0] {
            Step::Connect(c) => c.clone(),
            _ => unreachable!(),
        }
    }

    #[test]
    fn refusals_must_have_the_spec_shape() {
        let s = connect_step("{user: a, expect_status: 429, expect_error: too_many_requests, retry_after: true}");
        let ok = r#"{"error":"too_many_requests","reason":"per-IP limit"}"#;
        let retry = vec![("retry-after".to_string(), "3".to_string())];
        assert!(check_refusal(&s, &retry, ok, &mut Saved::new()).is_ok());
        assert!(check_refusal(&s, &[], ok, &mut Saved::new()).unwrap_err().contains("Retry-After"));
        let zero = vec![("retry-after".to_string(), "0".to_string())];
        assert!(check_refusal(&s, &zero, ok, &mut Saved::new()).is_err());
        assert!(check_refusal(&s, &retry, "nope", &mut Saved::new()).unwrap_err().contains("SPEC §3"));
        assert!(
            check_refusal(&s, &retry, r#"{"error":"too_many_requests"}"#, &mut Saved::new())
                .unwrap_err()
                .contains(".reason")
        );
        assert!(
            check_refusal(&s, &retry, r#"{"error":"forbidden","reason":"x"}"#, &mut Saved::new())
                .unwrap_err()
                .contains(".error")
        );
    }
}
