//! The declarative scenario format (documented in `harness/README.md`): what a scenario file
//! may say, parsed strictly (`deny_unknown_fields` everywhere: a misspelt key is an error, not
//! a silently skipped check), then checked as a whole before anything runs — every `server`
//! and `conn` a step names must exist at that point, and defaults are filled in, so the runner
//! only ever sees complete steps.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::duration::Dur;
use crate::token::TokenKind;

/// The server name used when a scenario does not declare `servers`.
pub const DEFAULT_SERVER: &str = "main";

/// A scenario file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// What the scenario shows, in prose (the name is the file name).
    #[serde(default)]
    pub description: Option<String>,
    /// Named servers; absent: one server called `main` configured by the keys below.
    #[serde(default)]
    pub servers: BTreeMap<String, ServerSpec>,
    /// Shorthand for `servers: {main: {policy: …}}`.
    #[serde(default)]
    pub policy: Option<Value>,
    /// Shorthand for `servers: {main: {files: …}}`.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
    /// Shorthand for `servers: {main: {args: …}}`.
    #[serde(default)]
    pub args: Vec<String>,
    /// Shorthand for `servers: {main: {env: …}}`.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Shorthand for `servers: {main: {tls: true}}`.
    #[serde(default)]
    pub tls: bool,
    /// The longest the whole scenario may take (default 60s).
    #[serde(default)]
    pub timeout: Option<Dur>,
    /// ES256 key pairs generated for the scenario: each public key is written into every
    /// server's policy directory as `keys/<name>.pem`; `connect` signs with one by name.
    #[serde(default)]
    pub signing_keys: Vec<String>,
    /// Start a `redis-server` for the scenario (before any server) and pass every server
    /// `--redis` to it, unless the server says `redis: false`.
    #[serde(default)]
    pub redis: bool,
    /// With `redis: true`: the Redis is a Redis Cluster of three nodes, and servers get
    /// `--redis <seed nodes> --redis-cluster` (sharded pub/sub).
    #[serde(default)]
    pub redis_cluster: bool,
    /// Markers planted in policy files or messages that no server may ever print: each is
    /// checked in every log line as a secret is.
    #[serde(default)]
    pub never_logged: Vec<String>,
    /// What to do, in order.
    pub steps: Vec<Step>,
}

/// One wsgate instance.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSpec {
    /// Deep-merged into `policies/policy.yaml`.
    #[serde(default)]
    pub policy: Option<Value>,
    /// Extra files for the policy directory: relative path → content.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
    /// Extra `wsgate serve` arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Serve `wss://` with a generated certificate (`--tls-cert`/`--tls-key`); the scenario's
    /// clients trust only its CA.
    #[serde(default)]
    pub tls: bool,
    /// With the scenario's `redis: true`, whether this server is given `--redis` (default yes):
    /// `false` runs it alone, with its in-process broker.
    #[serde(default)]
    pub redis: Option<bool>,
    /// `false`: declared, but not started with the others; a `start` step starts it (an
    /// instance joining the cluster later). Default `true`.
    #[serde(default)]
    pub start: Option<bool>,
}

impl ServerSpec {
    /// Whether the server starts with the scenario (not through a `start` step).
    pub fn starts_with_the_scenario(&self) -> bool {
        self.start.unwrap_or(true)
    }

    /// Whether the server gets `--redis`, in a scenario with `redis: scenario_redis`.
    pub fn uses_redis(&self, scenario_redis: bool) -> bool {
        scenario_redis && self.redis.unwrap_or(true)
    }
}

/// One step. Written as a one-key mapping: `- connect: {…}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Open a WebSocket connection (or expect the handshake to be refused).
    Connect(ConnectStep),
    /// Send one or more frames.
    Send(SendStep),
    /// The next frame(s) must match.
    Expect(ExpectStep),
    /// The server must close the connection with a close frame.
    ExpectClose(ExpectCloseStep),
    /// The connection must end (TCP closed), with or without a close frame.
    ExpectDropped(ExpectDroppedStep),
    /// Nothing may arrive for a while.
    ExpectNoFrame(ExpectNoFrameStep),
    /// The client closes and expects the server's close echo.
    Close(CloseStep),
    /// Let time pass (only where time itself is the subject).
    Wait(Dur),
    /// Publish through the admin API.
    Publish(PublishStep),
    /// A plain HTTP request to a listener.
    Http(HttpStep),
    /// Rewrite a running server's policy directory.
    EditPolicy(EditPolicyStep),
    /// Stop reading a connection's socket (a slow consumer).
    PauseReading(String),
    /// Read it again.
    ResumeReading(String),
    /// A server's log must (come to) contain a text.
    ExpectLog(ExpectLogStep),
    /// Send a server a signal (SIGTERM by default) and go on at once.
    Stop(StopStep),
    /// Send a server SIGHUP (reload its policy and certificate) and go on at once.
    Sighup(SighupStep),
    /// A server must exit, with this status, within a deadline.
    ExpectExit(ExpectExitStep),
    /// Start a server declared with `start: false`, and wait until it listens.
    Start(StartStep),
    /// Kill the scenario's Redis (SIGKILL by default) and wait until it is gone.
    StopRedis(StopRedisStep),
    /// Start the scenario's Redis again, on the same port, and wait until it answers.
    StartRedis(StartRedisStep),
    /// `PUBLISH` straight into the scenario's Redis, as a backend would.
    RedisPublish(RedisPublishStep),
}

impl Step {
    /// The step's key, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Step::Connect(_) => "connect",
            Step::Send(_) => "send",
            Step::Expect(_) => "expect",
            Step::ExpectClose(_) => "expect_close",
            Step::ExpectDropped(_) => "expect_dropped",
            Step::ExpectNoFrame(_) => "expect_no_frame",
            Step::Close(_) => "close",
            Step::Wait(_) => "wait",
            Step::Publish(_) => "publish",
            Step::Http(_) => "http",
            Step::EditPolicy(_) => "edit_policy",
            Step::PauseReading(_) => "pause_reading",
            Step::ResumeReading(_) => "resume_reading",
            Step::ExpectLog(_) => "expect_log",
            Step::Stop(_) => "stop",
            Step::Sighup(_) => "sighup",
            Step::ExpectExit(_) => "expect_exit",
            Step::Start(_) => "start",
            Step::StopRedis(_) => "stop_redis",
            Step::StartRedis(_) => "start_redis",
            Step::RedisPublish(_) => "redis_publish",
        }
    }

    /// The server a step talks to, once `resolve` has filled it in (`None` for steps about a
    /// connection, whose server was named when it was opened).
    pub fn server(&self) -> Option<&str> {
        match self {
            Step::Connect(s) => s.server.as_deref(),
            Step::Publish(s) => s.server.as_deref(),
            Step::Http(s) => s.server.as_deref(),
            Step::EditPolicy(s) => s.server.as_deref(),
            Step::ExpectLog(s) => s.server.as_deref(),
            Step::Stop(s) => s.server.as_deref(),
            Step::Sighup(s) => s.server.as_deref(),
            Step::ExpectExit(s) => s.server.as_deref(),
            Step::Start(s) => s.server.as_deref(),
            _ => None,
        }
    }

    /// The connection a step is about, if any.
    pub fn conn(&self) -> Option<&str> {
        match self {
            Step::Connect(s) => s.name.as_deref(),
            Step::Send(s) => s.conn.as_deref(),
            Step::Expect(s) => s.conn.as_deref(),
            Step::ExpectClose(s) => s.conn.as_deref(),
            Step::ExpectDropped(s) => s.conn.as_deref(),
            Step::ExpectNoFrame(s) => s.conn.as_deref(),
            Step::Close(s) => s.conn.as_deref(),
            Step::PauseReading(c) | Step::ResumeReading(c) => Some(c),
            _ => None,
        }
    }
}

/// Where a `connect` step puts its token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    /// `?token=…` (or `?<token_name>=…`).
    #[default]
    Query,
    /// `Authorization: Bearer …` (or `<token_name>: Bearer …`).
    Header,
    /// `Cookie: wsgate_token=…` (or `<token_name>=…`).
    Cookie,
    /// `Sec-WebSocket-Protocol: wsgate.v1, bearer.<token>`.
    Subprotocol,
}

/// `connect`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectStep {
    /// The connection's name in later steps (default: the user).
    #[serde(default)]
    pub name: Option<String>,
    /// Which server (default: the only one).
    #[serde(default)]
    pub server: Option<String>,
    /// The token's `sub` (default: the connection's name).
    #[serde(default, alias = "sub")]
    pub user: Option<String>,
    /// Extra claims, merged over `sub`/`iat`/`exp`.
    #[serde(default)]
    pub claims: Map<String, Value>,
    /// Claims to leave out of the token.
    #[serde(default)]
    pub omit_claims: Vec<String>,
    /// Which token to present.
    #[serde(default)]
    pub token: TokenKind,
    /// The algorithm of a `wrong_algorithm` token (default HS384).
    #[serde(default)]
    pub algorithm: Option<String>,
    /// A valid token's lifetime (default 15m).
    #[serde(default)]
    pub ttl: Option<Dur>,
    /// Where the token goes.
    #[serde(default)]
    pub via: Via,
    /// The query parameter, header or cookie name for the token.
    #[serde(default)]
    pub token_name: Option<String>,
    /// Sign a valid token with this scenario signing key (ES256, `kid` = the name) instead
    /// of the HS256 secret.
    #[serde(default)]
    pub signing_key: Option<String>,
    /// The `Origin` header.
    #[serde(default)]
    pub origin: Option<String>,
    /// The request path (default `/ws`).
    #[serde(default)]
    pub path: Option<String>,
    /// Extra query parameters.
    #[serde(default)]
    pub query: BTreeMap<String, String>,
    /// Extra request headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// After the welcome, stop reading (never answer pings) until a later step reads.
    #[serde(default)]
    pub silent: bool,
    /// The handshake must be refused with this status.
    #[serde(default)]
    pub expect_status: Option<u16>,
    /// The refusal body's `error` must be this.
    #[serde(default)]
    pub expect_error: Option<String>,
    /// The refusal body must match this JSON subset.
    #[serde(default)]
    pub expect_body: Option<Value>,
    /// The refusal must (true) or must not (false) carry `Retry-After` (whole seconds ≥ 1).
    #[serde(default)]
    pub retry_after: Option<bool>,
    /// Extra fields the welcome frame must match.
    #[serde(default)]
    pub expect_welcome: Option<Value>,
    /// Deadline for the handshake and the welcome (default 5s).
    #[serde(default)]
    pub within: Option<Dur>,
}

/// `send`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendStep {
    /// Which connection.
    #[serde(default)]
    pub conn: Option<String>,
    /// A text frame, verbatim.
    #[serde(default)]
    pub text: Option<String>,
    /// A text frame holding this value as JSON.
    #[serde(default)]
    pub json: Option<Value>,
    /// With `json` (an object): add a `pad` string so the frame is exactly this many bytes.
    #[serde(default)]
    pub pad_to: Option<usize>,
    /// A binary frame of this many bytes.
    #[serde(default)]
    pub binary: Option<usize>,
    /// A text frame of this many bytes (`x` repeated).
    #[serde(default)]
    pub text_size: Option<usize>,
    /// Send it this many times (default 1).
    #[serde(default)]
    pub repeat: Option<u32>,
}

/// `expect`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectStep {
    /// Which connection.
    #[serde(default)]
    pub conn: Option<String>,
    /// The next frame is text holding JSON that matches this subset.
    #[serde(default)]
    pub json: Option<Value>,
    /// The next frame is exactly this text.
    #[serde(default)]
    pub text: Option<String>,
    /// The next frames match these subsets, one each, in any order.
    #[serde(default)]
    pub unordered: Option<Vec<Value>>,
    /// Expect this many frames matching `json` (or `text`) in a row (default 1).
    #[serde(default)]
    pub repeat: Option<u32>,
    /// Deadline (default 5s).
    #[serde(default)]
    pub within: Option<Dur>,
}

/// `expect_close`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectCloseStep {
    /// Which connection.
    #[serde(default)]
    pub conn: Option<String>,
    /// The close code (absent: any code).
    #[serde(default)]
    pub code: Option<u16>,
    /// A substring of the close reason.
    #[serde(default)]
    pub reason: Option<String>,
    /// Deadline (default 5s).
    #[serde(default)]
    pub within: Option<Dur>,
    /// Fail on data frames before the close instead of skipping them.
    #[serde(default)]
    pub no_frames_before: bool,
}

/// `expect_dropped`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectDroppedStep {
    /// Which connection.
    #[serde(default)]
    pub conn: Option<String>,
    /// true: a close frame must come first; false: none may; absent: either.
    #[serde(default)]
    pub close_frame: Option<bool>,
    /// Deadline (default 5s).
    #[serde(default)]
    pub within: Option<Dur>,
}

/// `expect_no_frame`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectNoFrameStep {
    /// Which connection.
    #[serde(default)]
    pub conn: Option<String>,
    /// How long to watch (default 1s).
    #[serde(default, rename = "for")]
    pub duration: Option<Dur>,
}

/// `close`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloseStep {
    /// Which connection.
    #[serde(default)]
    pub conn: Option<String>,
    /// The code the client sends (default 1000).
    #[serde(default)]
    pub code: Option<u16>,
    /// The reason the client sends.
    #[serde(default)]
    pub reason: Option<String>,
    /// The code the server must echo (default: the same code).
    #[serde(default)]
    pub expect_code: Option<u16>,
    /// Deadline for the echo (default 5s).
    #[serde(default)]
    pub within: Option<Dur>,
}

/// Which admin credentials a request carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminAuth {
    /// `Authorization: Bearer <the admin token>`.
    #[default]
    Valid,
    /// No `Authorization` header.
    None,
    /// A bearer token that is not the admin token.
    Wrong,
}

/// `publish`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishStep {
    /// Which server's admin API.
    #[serde(default)]
    pub server: Option<String>,
    /// The channel.
    pub channel: String,
    /// The data (any JSON).
    #[serde(default)]
    pub data: Option<Value>,
    /// Instead of `data`: a string of this many bytes.
    #[serde(default)]
    pub data_size: Option<usize>,
    /// Publish this many times (default 1).
    #[serde(default)]
    pub repeat: Option<u32>,
    /// The admin credentials to present (default valid).
    #[serde(default)]
    pub auth: AdminAuth,
    /// The expected status (default 200, which also requires `{"id": …}`).
    #[serde(default)]
    pub expect_status: Option<u16>,
    /// Save the message id the server answered under this name, for `$saved:<name>` in later
    /// patterns (e.g. every instance delivers the message with that id).
    #[serde(default)]
    pub save_id: Option<String>,
    /// Publish again every `every` until a connection receives a matching frame, up to
    /// `within`: for deliveries that start working at some point (Redis coming back).
    #[serde(default)]
    pub until: Option<DeliveredStep>,
    /// With `until`: the deadline (default 5s).
    #[serde(default)]
    pub within: Option<Dur>,
    /// With `until`: how long each publish waits for the frame before the next (default 250ms).
    #[serde(default)]
    pub every: Option<Dur>,
}

/// `publish … until`: the frame a repeated publish waits for.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveredStep {
    /// Which connection.
    #[serde(default)]
    pub conn: Option<String>,
    /// A frame holding JSON that matches this subset.
    pub json: Value,
}

/// The default pause between the publishes of `publish … until`.
pub const DEFAULT_PUBLISH_EVERY: Dur = Dur(std::time::Duration::from_millis(250));

/// Which listener an `http` step talks to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Listener {
    /// The public WebSocket listener.
    #[default]
    Ws,
    /// The admin listener.
    Admin,
}

/// `http`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpStep {
    /// Which server.
    #[serde(default)]
    pub server: Option<String>,
    /// Which listener (default ws).
    #[serde(default)]
    pub listener: Listener,
    /// The method (default GET).
    #[serde(default)]
    pub method: Option<String>,
    /// Path and query.
    pub path: String,
    /// Extra headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// A JSON body.
    #[serde(default)]
    pub json: Option<Value>,
    /// A text body.
    #[serde(default)]
    pub text: Option<String>,
    /// Admin credentials (default none).
    #[serde(default)]
    pub auth: Option<AdminAuth>,
    /// To the public listener of a `tls` server: plain TCP instead of TLS.
    #[serde(default)]
    pub plaintext: bool,
    /// The expected status.
    #[serde(default)]
    pub expect_status: Option<u16>,
    /// Instead of a status: the server must end the connection without an HTTP response.
    #[serde(default)]
    pub expect_no_response: bool,
    /// The body is JSON matching this subset.
    #[serde(default)]
    pub expect_body: Option<Value>,
    /// The body contains this text.
    #[serde(default)]
    pub expect_text: Option<String>,
    /// Headers that must be present; the value must contain the given text.
    #[serde(default)]
    pub expect_headers: BTreeMap<String, String>,
    /// Repeat the request until it matches, up to this long (for state that settles).
    #[serde(default)]
    pub retry_within: Option<Dur>,
}

/// `edit_policy`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EditPolicyStep {
    /// Which server.
    #[serde(default)]
    pub server: Option<String>,
    /// Overrides merged into the policy as it stands (or into the repository's with `replace`).
    #[serde(default)]
    pub policy: Option<Value>,
    /// Files to (re)write.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
    /// Start from the repository's policy instead of the current one.
    #[serde(default)]
    pub replace: bool,
}

/// `expect_log`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectLogStep {
    /// Which server.
    #[serde(default)]
    pub server: Option<String>,
    /// The text a line must contain.
    pub contains: String,
    /// Deadline (default 5s).
    #[serde(default)]
    pub within: Option<Dur>,
}

/// The signal a `stop` step sends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum StopSignal {
    /// SIGTERM (what an orchestrator sends).
    #[default]
    #[serde(alias = "SIGTERM")]
    #[serde(rename = "TERM")]
    Term,
    /// SIGINT (Ctrl-C).
    #[serde(alias = "SIGINT")]
    #[serde(rename = "INT")]
    Int,
}

impl StopSignal {
    /// The name `kill` takes (`TERM`, `INT`).
    pub fn name(self) -> &'static str {
        match self {
            StopSignal::Term => "TERM",
            StopSignal::Int => "INT",
        }
    }
}

/// `stop`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopStep {
    /// Which server (default: the only one).
    #[serde(default)]
    pub server: Option<String>,
    /// `TERM` (default) or `INT`.
    #[serde(default)]
    pub signal: StopSignal,
}

/// `sighup`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SighupStep {
    /// Which server (default: the only one).
    #[serde(default)]
    pub server: Option<String>,
}

/// `expect_exit`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectExitStep {
    /// Which server (default: the only one).
    #[serde(default)]
    pub server: Option<String>,
    /// The exit status it must have (default 0).
    #[serde(default)]
    pub code: i32,
    /// Deadline (default 15s: the server's default drain timeout of 10s, and some margin).
    #[serde(default)]
    pub within: Option<Dur>,
}

/// `start`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartStep {
    /// Which server (one declared with `start: false`).
    #[serde(default)]
    pub server: Option<String>,
}

/// The signal `stop_redis` sends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum RedisSignal {
    /// SIGKILL: Redis dies at once, as in a crash or a lost host.
    #[default]
    #[serde(alias = "SIGKILL")]
    #[serde(rename = "KILL")]
    Kill,
    /// SIGTERM: Redis shuts down cleanly, closing its clients' connections.
    #[serde(alias = "SIGTERM")]
    #[serde(rename = "TERM")]
    Term,
}

impl RedisSignal {
    /// The name `kill` takes (`KILL`, `TERM`).
    pub fn name(self) -> &'static str {
        match self {
            RedisSignal::Kill => "KILL",
            RedisSignal::Term => "TERM",
        }
    }
}

/// `stop_redis`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopRedisStep {
    /// `KILL` (default) or `TERM`.
    #[serde(default)]
    pub signal: RedisSignal,
}

/// `start_redis`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRedisStep {
    /// How long Redis may take to answer (default 10s).
    #[serde(default)]
    pub within: Option<Dur>,
}

/// `redis_publish`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisPublishStep {
    /// The Redis channel (`wsgate:ch:alerts` for the gateway channel `alerts`).
    pub channel: String,
    /// The message: a string is sent as it is, anything else as JSON.
    pub payload: Value,
    /// How many Redis subscribers must have received it (the integer `PUBLISH` answers).
    #[serde(default)]
    pub expect_receivers: Option<i64>,
}

/// The default deadline of `start_redis`.
pub const DEFAULT_REDIS_READY: Dur = Dur::secs(10);

/// The default deadline of `expect_exit`.
pub const DEFAULT_EXIT_WITHIN: Dur = Dur::secs(15);

/// Reads and checks a scenario file.
pub fn load(path: &Path) -> Result<Scenario, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse(&text)
}

/// Parses and checks a scenario.
pub fn parse(text: &str) -> Result<Scenario, String> {
    let mut scenario: Scenario = serde_saphyr::from_str(text).map_err(|e| e.to_string())?;
    scenario.resolve()?;
    Ok(scenario)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
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
        let servers = Servers {
            all: self.servers.keys().cloned().collect(),
            tls: self.servers.iter().filter(|(_, spec)| spec.tls).map(|(name, _)| name.clone()).collect(),
            keys: self.signing_keys.iter().cloned().collect(),
        };
        let mut conns: BTreeSet<String> = BTreeSet::new();
        // Names saved so far (`save_id`, `$save:NAME`), for `$saved:NAME`.
        let mut saved: BTreeSet<String> = BTreeSet::new();
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
            resolve_step(step, &servers, &mut conns, &mut saved).map_err(at)?;
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
    pub fn timeout(&self) -> Dur {
        self.timeout.unwrap_or(Dur::secs(60))
    }
}

/// The scenario's server names, for checking steps.
struct Servers {
    /// Every server.
    all: BTreeSet<String>,
    /// Those with `tls: true`.
    tls: BTreeSet<String>,
    /// The scenario's signing keys.
    keys: BTreeSet<String>,
}

fn pick_server(name: &mut Option<String>, servers: &Servers) -> Result<(), String> {
    let servers = &servers.all;
    match name {
        Some(n) if servers.contains(n.as_str()) => Ok(()),
        Some(n) => Err(format!("no server named `{n}` (servers: {})", list(servers))),
        None if servers.len() == 1 => {
            *name = servers.iter().next().cloned();
            Ok(())
        }
        None => Err(format!("say which `server` (servers: {})", list(servers))),
    }
}

fn pick_conn(name: &mut Option<String>, conns: &BTreeSet<String>) -> Result<(), String> {
    match name {
        Some(n) if conns.contains(n.as_str()) => Ok(()),
        Some(n) if conns.is_empty() => {
            Err(format!("no connection named `{n}`: no connection was opened before this step"))
        }
        Some(n) => Err(format!("no connection named `{n}` before this step (connections: {})", list(conns))),
        None if conns.len() == 1 => {
            *name = conns.iter().next().cloned();
            Ok(())
        }
        None if conns.is_empty() => Err("no connection was opened before this step".into()),
        None => Err(format!("say which `conn` (connections: {})", list(conns))),
    }
}

fn list(names: &BTreeSet<String>) -> String {
    names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
}

fn exactly_one(what: &[(&str, bool)]) -> Result<(), String> {
    let given: Vec<&str> = what.iter().filter(|(_, set)| *set).map(|(k, _)| *k).collect();
    if given.len() == 1 {
        return Ok(());
    }
    let keys = what.iter().map(|(k, _)| format!("`{k}`")).collect::<Vec<_>>().join(", ");
    if given.is_empty() { Err(format!("give one of {keys}")) } else { Err(format!("give only one of {keys}")) }
}

/// Checks a JSON pattern's wildcards, and that each `$saved:NAME` names a value an earlier step
/// saved; then adds the names it saves itself.
fn check_pattern(pattern: &Value, saved: &mut BTreeSet<String>) -> Result<(), String> {
    let new = crate::matching::check_pattern(pattern, saved)?;
    saved.extend(new);
    Ok(())
}

fn resolve_step(
    step: &mut Step,
    servers: &Servers,
    conns: &mut BTreeSet<String>,
    saved: &mut BTreeSet<String>,
) -> Result<(), String> {
    match step {
        Step::Connect(s) => {
            pick_server(&mut s.server, servers)?;
            for pattern in [&s.expect_welcome, &s.expect_body].into_iter().flatten() {
                check_pattern(pattern, saved)?;
            }
            if s.name.is_none() {
                s.name = s.user.clone();
            }
            if s.user.is_none() && s.token != TokenKind::None {
                s.user = s.name.clone();
            }
            if let Some(alg) = &s.algorithm {
                crate::token::parse_algorithm(alg)?;
                if s.token != TokenKind::WrongAlgorithm {
                    return Err("`algorithm` only goes with `token: wrong_algorithm`".into());
                }
            }
            if let Some(key) = &s.signing_key {
                if !servers.keys.contains(key) {
                    return Err(format!("signing key `{key}` is not in the scenario's `signing_keys`"));
                }
                if s.token != TokenKind::Valid {
                    return Err("`signing_key` signs a valid token; it does not go with `token`".into());
                }
            }
            if let Some(path) = &s.path
                && !path.starts_with('/')
            {
                return Err(format!("`path` must start with `/`: `{path}`"));
            }
            match s.expect_status {
                Some(status) => {
                    if status == 101 || !(100..600).contains(&status) {
                        return Err(format!("`expect_status: {status}` is not a refusal status"));
                    }
                    if s.silent || s.expect_welcome.is_some() {
                        return Err("`silent` and `expect_welcome` need an accepted connection".into());
                    }
                }
                None => {
                    if s.expect_error.is_some() || s.expect_body.is_some() || s.retry_after.is_some() {
                        return Err("`expect_error`, `expect_body` and `retry_after` need `expect_status`".into());
                    }
                    let name = s.name.clone().ok_or("an accepted connection needs a `name` or a `user`")?;
                    if !valid_name(&name) {
                        return Err(format!("connection name `{name}`: use letters, digits, `-`, `_`, `.`, `:`"));
                    }
                    conns.insert(name);
                }
            }
            Ok(())
        }
        Step::Send(s) => {
            pick_conn(&mut s.conn, conns)?;
            exactly_one(&[
                ("text", s.text.is_some()),
                ("json", s.json.is_some()),
                ("binary", s.binary.is_some()),
                ("text_size", s.text_size.is_some()),
            ])?;
            if s.pad_to.is_some() && !s.json.as_ref().is_some_and(Value::is_object) {
                return Err("`pad_to` needs `json` holding a mapping".into());
            }
            if s.repeat == Some(0) {
                return Err("`repeat` must be at least 1".into());
            }
            Ok(())
        }
        Step::Expect(s) => {
            pick_conn(&mut s.conn, conns)?;
            exactly_one(&[
                ("json", s.json.is_some()),
                ("text", s.text.is_some()),
                ("unordered", s.unordered.is_some()),
            ])?;
            if s.unordered.as_ref().is_some_and(Vec::is_empty) {
                return Err("`unordered` needs at least one pattern".into());
            }
            if s.repeat == Some(0) || (s.repeat.is_some() && s.unordered.is_some()) {
                return Err("`repeat` must be at least 1, and goes with `json` or `text`".into());
            }
            for pattern in s.json.iter().chain(s.unordered.iter().flatten()) {
                check_pattern(pattern, saved)?;
            }
            Ok(())
        }
        Step::ExpectClose(s) => pick_conn(&mut s.conn, conns),
        Step::ExpectDropped(s) => pick_conn(&mut s.conn, conns),
        Step::ExpectNoFrame(s) => pick_conn(&mut s.conn, conns),
        Step::Close(s) => pick_conn(&mut s.conn, conns),
        Step::PauseReading(c) | Step::ResumeReading(c) => {
            let mut name = Some(c.clone());
            pick_conn(&mut name, conns)
        }
        Step::Wait(_) => Ok(()),
        Step::Publish(s) => {
            pick_server(&mut s.server, servers)?;
            if s.data.is_some() && s.data_size.is_some() {
                return Err("give only one of `data`, `data_size`".into());
            }
            if s.repeat == Some(0) {
                return Err("`repeat` must be at least 1".into());
            }
            match &mut s.until {
                Some(until) => {
                    if s.repeat.is_some() || s.save_id.is_some() || s.expect_status.is_some_and(|st| st != 200) {
                        return Err(
                            "`until` publishes as often as it takes (status 200 each time); it does not go with \
                             `repeat`, `save_id` or another `expect_status`"
                                .into(),
                        );
                    }
                    pick_conn(&mut until.conn, conns)?;
                    check_pattern(&until.json, saved)?;
                }
                None if s.within.is_some() || s.every.is_some() => {
                    return Err("`within` and `every` go with `until`".into());
                }
                None => {}
            }
            if s.every.is_some_and(|d| d.0.is_zero()) {
                return Err("`every` must be more than 0ms".into());
            }
            if let Some(name) = &s.save_id {
                if s.expect_status.is_some_and(|st| st != 200) {
                    return Err("`save_id` needs an accepted publish (status 200)".into());
                }
                if !crate::matching::valid_saved_name(name) {
                    return Err(format!("`save_id: {name}`: use letters, digits, `-`, `_`, `.`"));
                }
                saved.insert(name.clone());
            }
            Ok(())
        }
        Step::Http(s) => {
            pick_server(&mut s.server, servers)?;
            if !s.path.starts_with('/') {
                return Err(format!("`path` must start with `/`: `{}`", s.path));
            }
            if s.json.is_some() && s.text.is_some() {
                return Err("give only one of `json`, `text`".into());
            }
            exactly_one(&[("expect_status", s.expect_status.is_some()), ("expect_no_response", s.expect_no_response)])?;
            if s.expect_no_response
                && (s.expect_body.is_some() || s.expect_text.is_some() || !s.expect_headers.is_empty())
            {
                return Err(
                    "`expect_body`, `expect_text` and `expect_headers` need a response (`expect_status`)".into()
                );
            }
            if let Some(pattern) = &s.expect_body {
                check_pattern(pattern, saved)?;
            }
            let tls = s.server.as_ref().is_some_and(|n| servers.tls.contains(n));
            if s.plaintext && (s.listener != Listener::Ws || !tls) {
                return Err(
                    "`plaintext` is for the `ws` listener of a `tls: true` server; everything else is plaintext already"
                        .into(),
                );
            }
            Ok(())
        }
        Step::EditPolicy(s) => {
            pick_server(&mut s.server, servers)?;
            if s.policy.as_ref().is_some_and(|p| !p.is_object()) {
                return Err("`policy` must be a mapping".into());
            }
            Ok(())
        }
        Step::ExpectLog(s) => pick_server(&mut s.server, servers),
        Step::Stop(s) => pick_server(&mut s.server, servers),
        Step::Sighup(s) => pick_server(&mut s.server, servers),
        Step::ExpectExit(s) => pick_server(&mut s.server, servers),
        Step::Start(s) => pick_server(&mut s.server, servers),
        Step::StopRedis(_) => Ok(()),
        Step::StartRedis(s) => {
            if s.within.is_some_and(|d| d.0.is_zero()) {
                return Err("`within` must be more than 0ms".into());
            }
            Ok(())
        }
        Step::RedisPublish(s) => {
            if s.channel.is_empty() {
                return Err("`channel` must not be empty".into());
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_scenario_gets_the_default_server_and_names() {
        let s = parse("steps:\n  - connect: {user: alice}\n  - send: {json: {type: ping}}\n").unwrap();
        assert_eq!(s.servers.keys().collect::<Vec<_>>(), vec!["main"]);
        let Step::Connect(c) = &s.steps[0] else { panic!() };
        assert_eq!(c.name.as_deref(), Some("alice"));
        assert_eq!(c.server.as_deref(), Some("main"));
        assert_eq!(c.token, TokenKind::Valid);
        assert_eq!(c.via, Via::Query);
        let Step::Send(send) = &s.steps[1] else { panic!() };
        assert_eq!(send.conn.as_deref(), Some("alice"));
    }

    #[test]
    fn shorthand_policy_goes_to_main() {
        let s = parse(
            "policy:\n  connections: {max_per_ip: 1}\nfiles:\n  schemas/boom.json: '{}'\nenv: {A: b}\n\
             steps:\n  - connect: {user: a, expect_status: 429, retry_after: true}\n",
        )
        .unwrap();
        let main = &s.servers["main"];
        assert_eq!(main.policy.as_ref().unwrap()["connections"]["max_per_ip"], 1);
        assert_eq!(main.files["schemas/boom.json"], "{}");
        assert_eq!(main.env["A"], "b");
    }

    #[test]
    fn every_step_kind_parses() {
        let text = r#"
description: all the steps
timeout: 30s
servers:
  a: {policy: {messages: {binary: close}}, args: [--dev], env: {X: "1"}}
  b: {}
steps:
  - connect: {name: c1, server: a, user: alice, claims: {roles: [publisher]}, ttl: 2s, via: subprotocol,
              origin: "https://app.example.com", silent: true, expect_welcome: {heartbeat_ms: 1000}}
  - connect: {server: b, token: wrong_algorithm, algorithm: HS512, expect_status: 401, expect_error: unauthorized}
  - connect: {name: c2, server: b, user: bob, via: cookie, token_name: sid, path: /ws, query: {x: "1"}, headers: {X-A: b}}
  - send: {conn: c1, json: {type: publish, channel: alerts, data: 1}, pad_to: 100, repeat: 2}
  - send: {conn: c1, binary: 16}
  - send: {conn: c1, text_size: 20480}
  - send: {conn: c2, text: "not json"}
  - expect: {conn: c1, json: {type: ok}, within: 2s, repeat: 2}
  - expect: {conn: c1, text: "hi"}
  - expect: {conn: c2, unordered: [{type: ok}, {type: message}]}
  - expect_close: {conn: c1, code: 1009, reason: big, within: 3s, no_frames_before: true}
  - expect_dropped: {conn: c2, close_frame: false}
  - expect_no_frame: {conn: c2, for: 500ms}
  - close: {conn: c2, code: 1000, reason: bye, expect_code: 1000}
  - wait: 1s
  - publish: {server: a, channel: alerts, data: {level: high}, repeat: 3, auth: wrong, expect_status: 403}
  - publish: {server: b, channel: "user:bob", data_size: 8192}
  - http: {server: a, listener: admin, method: POST, path: /v1/policy/reload, auth: valid, json: {},
           expect_status: 200, expect_body: {ok: true}, expect_text: ok, expect_headers: {content-type: json},
           retry_within: 2s}
  - edit_policy: {server: a, policy: {connections: {max_per_ip: 2}}, files: {x.json: "{}"}, replace: true}
  - pause_reading: c1
  - resume_reading: c1
  - expect_log: {server: a, contains: listening, within: 1s}
  - stop: {server: a, signal: INT}
  - stop: {server: b}
  - expect_exit: {server: a, code: 0, within: 12s}
  - expect_log: {server: a, contains: stopped}
"#;
        let s = parse(text).unwrap();
        assert_eq!(s.steps.len(), 26);
        assert_eq!(s.timeout(), Dur::secs(30));
        let kinds: Vec<&str> = s.steps.iter().map(Step::kind).collect();
        assert!(kinds.contains(&"edit_policy") && kinds.contains(&"resume_reading"));
        let Step::ExpectNoFrame(n) = &s.steps[12] else { panic!() };
        assert_eq!(n.duration, Some(Dur::millis(500)));
    }

    #[test]
    fn tls_servers_and_plaintext_http() {
        let s = parse("tls: true\nsteps:\n  - http: {path: /ws, plaintext: true, expect_no_response: true}\n").unwrap();
        assert!(s.servers["main"].tls);
        let Step::Http(h) = &s.steps[0] else { panic!() };
        assert!(h.plaintext && h.expect_no_response && h.expect_status.is_none());
        let two = "servers: {a: {tls: true}, b: {}}\nsteps:\n";
        parse(&format!("{two}  - http: {{server: a, path: /, plaintext: true, expect_status: 400}}\n")).unwrap();
        for step in [
            "{server: b, path: /, plaintext: true, expect_status: 404}",
            "{server: a, listener: admin, path: /, plaintext: true, expect_status: 404}",
        ] {
            let e = err(&format!("{two}  - http: {step}\n"));
            assert!(e.contains("`plaintext` is for the `ws` listener of a `tls: true` server"), "{e}");
        }
        let e = err("tls: true\nservers: {a: {}}\nsteps:\n  - wait: 1s\n");
        assert!(e.contains("inside `servers`"), "{e}");
        let e = err("tls: true\nargs: [--tls-cert, x.pem]\nsteps:\n  - wait: 1s\n");
        assert!(e.contains("drop `--tls-cert`"), "{e}");
        assert!(err("steps:\n  - http: {path: /}\n").contains("give one of `expect_status`, `expect_no_response`"));
        let both = "steps:\n  - http: {path: /, expect_status: 200, expect_no_response: true}\n";
        assert!(err(both).contains("give only one"));
        let e = err("steps:\n  - http: {path: /, expect_no_response: true, expect_text: x}\n");
        assert!(e.contains("need a response"), "{e}");
    }

    #[test]
    fn stop_and_expect_exit_defaults() {
        let s = parse("steps:\n  - stop: {}\n  - expect_exit: {}\n").unwrap();
        let Step::Stop(stop) = &s.steps[0] else { panic!() };
        assert_eq!((stop.server.as_deref(), stop.signal), (Some("main"), StopSignal::Term));
        let Step::ExpectExit(exit) = &s.steps[1] else { panic!() };
        assert_eq!((exit.server.as_deref(), exit.code, exit.within), (Some("main"), 0, None));
        let s = parse("steps:\n  - stop: {signal: SIGINT}\n").unwrap();
        let Step::Stop(stop) = &s.steps[0] else { panic!() };
        assert_eq!(stop.signal.name(), "INT");
    }

    #[test]
    fn nothing_but_expect_log_follows_an_exit() {
        let e = err("steps:\n  - stop: {}\n  - expect_exit: {}\n  - http: {path: /, expect_status: 404}\n");
        assert!(e.starts_with("step 3 (http)") && e.contains("has exited (step 2)"), "{e}");
        let e = err("steps:\n  - expect_exit: {}\n  - stop: {}\n");
        assert!(e.contains("has exited"), "{e}");
        assert!(err("steps:\n  - stop: {signal: KILL}\n").contains("KILL"));
        let two = "servers: {a: {}, b: {}}\nsteps:\n  - stop: {server: a}\n  - expect_exit: {server: a}\n";
        let ok =
            format!("{two}  - expect_log: {{server: a, contains: stopped}}\n  - connect: {{server: b, user: x}}\n");
        parse(&ok).unwrap();
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err()
    }

    #[test]
    fn a_redis_cluster_needs_redis() {
        let s = parse("redis: true\nredis_cluster: true\nsteps:\n  - connect: {user: alice}\n").unwrap();
        assert!(s.redis && s.redis_cluster);
        let e = parse("redis_cluster: true\nsteps:\n  - connect: {user: alice}\n").unwrap_err();
        assert!(e.contains("`redis_cluster: true` needs `redis: true`"), "{e}");
    }

    #[test]
    fn redis_and_late_servers_parse() {
        let text = r#"
redis: true
servers:
  a: {}
  b: {redis: false}
  c: {start: false}
steps:
  - connect: {server: a, user: alice}
  - publish: {server: a, channel: alerts, data: {n: 1}, save_id: first}
  - expect: {conn: alice, json: {type: message, id: $saved:first}}
  - stop_redis: {}
  - publish: {server: a, channel: alerts, until: {json: {type: message, id: $save:again}}, within: 10s, every: 100ms}
  - start_redis: {within: 3s}
  - stop_redis: {signal: SIGTERM}
  - start_redis: {}
  - redis_publish: {channel: "wsgate:ch:alerts", payload: {id: b-1, data: {x: 1}}, expect_receivers: 2}
  - redis_publish: {channel: "wsgate:ch:alerts", payload: 'not json'}
  - start: {server: c}
  - http: {server: c, listener: admin, path: /readyz, expect_status: 200, expect_body: {id: $saved:again}}
"#;
        let s = parse(text).unwrap();
        assert!(s.redis);
        assert!(s.servers["a"].uses_redis(s.redis) && !s.servers["b"].uses_redis(s.redis));
        assert!(!s.servers["c"].starts_with_the_scenario() && s.servers["a"].starts_with_the_scenario());
        let kinds: Vec<&str> = s.steps.iter().map(Step::kind).collect();
        assert_eq!(
            kinds,
            [
                "connect",
                "publish",
                "expect",
                "stop_redis",
                "publish",
                "start_redis",
                "stop_redis",
                "start_redis",
                "redis_publish",
                "redis_publish",
                "start",
                "http"
            ]
        );
        let Step::Publish(p) = &s.steps[4] else { panic!() };
        let until = p.until.as_ref().unwrap();
        assert_eq!(
            (until.conn.as_deref(), p.within, p.every),
            (Some("alice"), Some(Dur::secs(10)), Some(Dur::millis(100)))
        );
        let Step::StopRedis(stop) = &s.steps[3] else { panic!() };
        assert_eq!(stop.signal.name(), "KILL");
        let Step::StopRedis(stop) = &s.steps[6] else { panic!() };
        assert_eq!(stop.signal, RedisSignal::Term);
        let Step::RedisPublish(r) = &s.steps[8] else { panic!() };
        assert_eq!((r.payload["id"].as_str(), r.expect_receivers), (Some("b-1"), Some(2)));
        let Step::Start(start) = &s.steps[10] else { panic!() };
        assert_eq!(start.server.as_deref(), Some("c"));
        // With one server, the shorthand form gets the Redis too.
        let s = parse("redis: true\nsteps:\n  - stop_redis: {}\n").unwrap();
        assert!(s.servers["main"].uses_redis(s.redis));
    }

    #[test]
    fn redis_steps_need_a_redis_in_the_right_state() {
        let e = err("steps:\n  - stop_redis: {}\n");
        assert!(e.starts_with("step 1 (stop_redis)") && e.contains("declare `redis: true`"), "{e}");
        assert!(err("steps:\n  - redis_publish: {channel: x, payload: y}\n").contains("declare `redis: true`"));
        let r = "redis: true\nsteps:\n";
        assert!(err(&format!("{r}  - start_redis: {{}}\n")).contains("Redis is running"));
        let e = err(&format!("{r}  - stop_redis: {{}}\n  - stop_redis: {{signal: TERM}}\n"));
        assert!(e.starts_with("step 2") && e.contains("already stopped (step 1)"), "{e}");
        let e = err(&format!("{r}  - stop_redis: {{}}\n  - redis_publish: {{channel: c, payload: {{}}}}\n"));
        assert!(e.contains("Redis is stopped (step 1)"), "{e}");
        assert!(err(&format!("{r}  - stop_redis: {{signal: INT}}\n")).contains("INT"));
        assert!(err(&format!("{r}  - redis_publish: {{channel: c}}\n")).contains("payload"));
        let e = err("servers: {a: {redis: true}}\nsteps:\n  - wait: 1s\n");
        assert!(e.contains("needs `redis: true` at the top level"), "{e}");
        let e = err("redis: true\nargs: [--redis, redis://x/]\nsteps:\n  - wait: 1s\n");
        assert!(e.contains("drop it from `args`"), "{e}");
        // A server that does not use the Redis may name its own.
        parse("redis: true\nservers: {a: {redis: false, args: [--redis, redis://x/]}}\nsteps:\n  - wait: 1s\n")
            .unwrap();
    }

    #[test]
    fn late_servers_are_started_once_before_use() {
        let two = "servers: {a: {}, b: {start: false}}\nsteps:\n";
        let e = err(&format!("{two}  - connect: {{server: b, user: x}}\n  - start: {{server: b}}\n"));
        assert!(e.starts_with("step 1 (connect)") && e.contains("not running yet") && e.contains("start: {server: b}"));
        let e = err(&format!("{two}  - start: {{server: b}}\n  - start: {{server: b}}\n"));
        assert!(e.starts_with("step 2 (start)") && e.contains("already running"), "{e}");
        assert!(err(&format!("{two}  - start: {{server: a}}\n")).contains("already running"));
        assert!(err(&format!("{two}  - wait: 1s\n")).contains("no `start` step starts it"));
        assert!(err(&format!("{two}  - start: {{}}\n")).contains("say which `server`"));
        let e = err(&format!(
            "{two}  - start: {{server: b}}\n  - stop: {{server: b}}\n  - expect_exit: {{server: b}}\n  - start: {{server: b}}\n"
        ));
        assert!(e.contains("has exited"), "{e}");
    }

    #[test]
    fn saved_values_and_publish_until_are_checked() {
        let c = "steps:\n  - connect: {user: a}\n";
        let e = err(&format!("{c}  - expect: {{json: {{id: $saved:m}}}}\n"));
        assert!(e.starts_with("step 2 (expect)") && e.contains("no earlier step saved a value as `m`"), "{e}");
        let e = err(&format!("{c}  - expect: {{json: {{id: $bogus}}}}\n"));
        assert!(e.contains("unknown wildcard `$bogus`"), "{e}");
        parse(&format!("{c}  - expect: {{json: {{id: $save:m}}}}\n  - expect: {{json: {{id: $saved:m}}}}\n")).unwrap();
        let e = err(&format!("{c}  - publish: {{channel: x, save_id: 'a b'}}\n"));
        assert!(e.contains("save_id"), "{e}");
        assert!(
            err(&format!("{c}  - publish: {{channel: x, save_id: m, expect_status: 403}}\n")).contains("status 200")
        );
        let until = "until: {json: {type: message}}";
        assert!(err(&format!("{c}  - publish: {{channel: x, {until}, repeat: 2}}\n")).contains("does not go with"));
        assert!(err(&format!("{c}  - publish: {{channel: x, {until}, save_id: m}}\n")).contains("does not go with"));
        assert!(err(&format!("{c}  - publish: {{channel: x, {until}, every: 0ms}}\n")).contains("more than 0ms"));
        assert!(err(&format!("{c}  - publish: {{channel: x, within: 1s}}\n")).contains("go with `until`"));
        assert!(err(&format!("{c}  - publish: {{channel: x, until: {{conn: z, json: {{}}}}}}\n")).contains("`z`"));
        assert!(err("steps:\n  - publish: {channel: x, until: {json: {}}}\n").contains("no connection was opened"));
    }

    #[test]
    fn unknown_keys_are_errors() {
        assert!(err("steps:\n  - connect: {user: a, tokn: none}\n").contains("tokn"));
        assert!(err("stepz: []\n").contains("stepz"));
        assert!(err("steps:\n  - conect: {user: a}\n").contains("conect"));
        assert!(err("steps:\n  - connect: {user: a, token: expird}\n").contains("expird"));
    }

    #[test]
    fn references_must_exist_in_order() {
        let e = err("steps:\n  - send: {conn: a, text: x}\n  - connect: {user: a}\n");
        assert!(e.starts_with("step 1") && e.contains("no connection"), "{e}");
        let e = err("steps:\n  - connect: {user: a}\n  - connect: {user: b}\n  - send: {text: x}\n");
        assert!(e.starts_with("step 3") && e.contains("say which `conn`"), "{e}");
        let e = err("steps:\n  - connect: {user: a, server: other}\n");
        assert!(e.contains("no server named `other`"), "{e}");
        let e = err("servers: {a: {}, b: {}}\nsteps:\n  - connect: {user: a}\n");
        assert!(e.contains("say which `server`"), "{e}");
        // A refused handshake opens no connection.
        let e = err("steps:\n  - connect: {user: a, expect_status: 401}\n  - send: {conn: a, text: x}\n");
        assert!(e.contains("no connection"), "{e}");
    }

    #[test]
    fn combinations_are_checked() {
        assert!(err("steps:\n  - connect: {user: a}\n  - send: {text: x, json: {}}\n").contains("only one"));
        assert!(err("steps:\n  - connect: {user: a}\n  - send: {}\n").contains("give one of"));
        assert!(err("steps:\n  - connect: {user: a}\n  - send: {text: x, pad_to: 5}\n").contains("pad_to"));
        assert!(err("steps:\n  - connect: {user: a, retry_after: true}\n").contains("expect_status"));
        assert!(err("steps:\n  - connect: {user: a, silent: true, expect_status: 401}\n").contains("silent"));
        assert!(err("steps:\n  - connect: {user: a, algorithm: HS384}\n").contains("wrong_algorithm"));
        assert!(err("steps:\n  - connect: {user: a, token: wrong_algorithm, algorithm: XX1}\n").contains("XX1"));
        assert!(err("steps:\n  - connect: {token: none}\n").contains("name"));
        assert!(err("steps:\n  - wait: 5\n").contains("duration"));
        assert!(err("steps: []\n").contains("at least one step"));
        assert!(err("policy: {a: 1}\nservers: {x: {}}\nsteps:\n  - wait: 1s\n").contains("inside `servers`"));
        assert!(err("policy: [1]\nsteps:\n  - wait: 1s\n").contains("mapping"));
    }
}
