//! Evaluating a compiled policy: the origin check, connect rules, the user id and limits for a
//! handshake, and the decision for each message of a connection.
//!
//! Every rule fails closed: an expression that errors at run time refuses, and the refusal
//! says so (`Denial::error`). Rules in `audit` mode never refuse; what they would have refused
//! is returned alongside the verdict, for the decision log and metrics.
//!
//! A connection evaluates its messages in a [`ConnContext`]: a CEL scope holding `claims` and
//! `conn`, built once per connection (binding a map costs microseconds), so a message binds
//! only `message` and `now`, and only when a rule reads them. The context holds the policy it
//! was built from, so a message is always decided entirely under one generation.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use cel::{Context, Value};

use super::compiled::{Limit, MessageType, OriginPattern, Policy, Rule, RuleKind};
use super::expr::eval::EvalError;
use super::expr::vars::Var;
use super::model::{RuleAction, RuleMode};
use super::value::{cel_map, cel_string, json_to_cel};
use crate::close::ErrorCode;

pub(crate) const MAX_TYPE_LEN: usize = 64;
pub(crate) const MAX_ID_LEN: usize = 128;
pub(crate) const MAX_USER_ID_LEN: usize = 256;
/// Longest reason text sent to a client.
const MAX_REASON_LEN: usize = 200;

/// What a rule refused, or would have refused in audit mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// The rule's name (`origins` for the origin check).
    pub rule: Arc<str>,
    /// The rule's mode.
    pub mode: RuleMode,
    /// Reject the message or close the connection (message rules).
    pub action: RuleAction,
    /// The reason for the client and the log.
    pub reason: Arc<str>,
    /// Set when the rule refused because its expression failed (fail closed).
    pub error: Option<String>,
}

/// The outcome of the connect rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    /// The enforced refusal, if any; the handshake gets 403.
    pub denied: Option<Denial>,
    /// Audit-mode rules that would have refused.
    pub audit: Vec<Denial>,
}

/// Why a message was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageRefusal {
    /// The message is not of a known type or does not match its schema.
    Invalid {
        /// `schema_violation` or `unknown_type`.
        code: ErrorCode,
        /// What is wrong.
        reason: String,
    },
    /// A rule refused it (`forbidden`).
    Rule(Denial),
}

impl MessageRefusal {
    /// The error code for the client's `error` frame.
    pub fn code(&self) -> ErrorCode {
        match self {
            MessageRefusal::Invalid { code, .. } => *code,
            MessageRefusal::Rule(_) => ErrorCode::Forbidden,
        }
    }
}

/// The outcome of one message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessageVerdict {
    /// The refusal, if any.
    pub refused: Option<MessageRefusal>,
    /// Audit-mode rules that would have refused.
    pub audit: Vec<Denial>,
}

/// How the client connected (`request.scheme`): over TLS (`wss`) or not (`ws`) — to this server,
/// or, behind a trusted proxy, to the proxy (`X-Forwarded-Proto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    /// Plaintext.
    Ws,
    /// TLS.
    Wss,
}

impl Scheme {
    /// `"ws"` or `"wss"`, as CEL sees it.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Ws => "ws",
            Scheme::Wss => "wss",
        }
    }
}

/// The HTTP upgrade request, as connect rules see it (`request`). Token-bearing parts (the
/// token's query parameter, `Authorization`, `Cookie`) are left out by whoever builds it.
#[derive(Debug, Clone)]
pub struct RequestInfo {
    /// The client's address.
    pub ip: IpAddr,
    /// Whether the client used TLS.
    pub scheme: Scheme,
    /// The `Origin` header.
    pub origin: Option<String>,
    /// The request path.
    pub path: String,
    /// Query parameters.
    pub query: Vec<(String, String)>,
    /// Headers, lower-case names.
    pub headers: Vec<(String, String)>,
}

impl RequestInfo {
    fn to_cel(&self) -> Value {
        let pairs = |items: &[(String, String)]| cel_map(items.iter().map(|(k, v)| (k.as_str(), cel_string(v))));
        cel_map([
            ("ip", cel_string(&self.ip.to_string())),
            ("scheme", cel_string(self.scheme.as_str())),
            ("origin", self.origin.as_deref().map_or(Value::Null, cel_string)),
            ("path", cel_string(&self.path)),
            ("query", pairs(&self.query)),
            ("headers", pairs(&self.headers)),
        ])
    }
}

/// A live connection, as message rules see it (`conn`).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// Session id.
    pub id: String,
    /// User id.
    pub user: String,
    /// Client address.
    pub ip: IpAddr,
    /// The instance holding the connection.
    pub instance: String,
    /// When it was accepted.
    pub connected_at: SystemTime,
}

impl ConnInfo {
    fn to_cel(&self) -> Value {
        cel_map([
            ("id", cel_string(&self.id)),
            ("user", cel_string(&self.user)),
            ("ip", cel_string(&self.ip.to_string())),
            ("instance", cel_string(&self.instance)),
            ("connected_at", timestamp(self.connected_at)),
        ])
    }
}

/// A CEL timestamp.
pub fn timestamp(t: SystemTime) -> Value {
    let utc: chrono::DateTime<chrono::Utc> = t.into();
    Value::Timestamp(utc.fixed_offset())
}

/// The limits of one connection, with every CEL limit evaluated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnLimits {
    /// Live connections per user.
    pub max_per_user: u64,
    /// Live connections per IP.
    pub max_per_ip: u64,
    /// Handshakes per user per `reconnects_per`.
    pub reconnects_max: u64,
    /// The reconnect window.
    pub reconnects_per: Duration,
    /// Ping interval.
    pub heartbeat_interval: Duration,
    /// Pong deadline.
    pub heartbeat_timeout: Duration,
    /// Idle close.
    pub idle_timeout: Duration,
    /// Re-authentication interval.
    pub reauth_interval: Duration,
    /// Largest message.
    pub max_bytes: u64,
    /// Deepest JSON nesting.
    pub max_depth: u64,
    /// Messages per `rate_per`.
    pub rate_max: u64,
    /// The rate window.
    pub rate_per: Duration,
    /// What exceeding the rate does.
    pub rate_action: RuleAction,
    /// Invalid messages before 1008.
    pub max_invalid: u64,
}

/// A limit expression that failed; the connection is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitError {
    /// The policy key (`connections.max_per_ip`).
    pub key: &'static str,
    /// What went wrong.
    pub error: String,
}

impl std::fmt::Display for LimitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.error)
    }
}

impl Policy {
    /// The origin check. `None` origin: allowed unless the policy requires one.
    pub fn check_origin(&self, origin: Option<&str>) -> Result<(), Denial> {
        let refuse = |reason: &str| Denial {
            rule: "origins".into(),
            mode: RuleMode::Enforce,
            action: RuleAction::Reject,
            reason: reason.into(),
            error: None,
        };
        let Some(origin) = origin else {
            return if self.origins.require_origin { Err(refuse("an Origin header is required")) } else { Ok(()) };
        };
        let origin = origin.to_ascii_lowercase();
        if self.origins.require_https && !origin.starts_with("https://") {
            return Err(refuse("only https:// origins are allowed"));
        }
        let allowed = self.origins.allowed.iter().any(|p| match p {
            OriginPattern::Any => true,
            OriginPattern::Exact(o) => *o == origin,
            OriginPattern::Subdomains { scheme, suffix } => {
                origin.strip_prefix(scheme.as_str()).and_then(|r| r.strip_prefix("://")).is_some_and(|host| {
                    // An origin is `host[:port]` and nothing else: no path, query or userinfo
                    // that could carry the suffix (`https://evil.test/x.example.com`).
                    host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'))
                        && host.len() > suffix.len()
                        && host.ends_with(suffix.as_str())
                })
            }
        });
        if allowed { Ok(()) } else { Err(refuse("origin not allowed")) }
    }

    /// A CEL scope for one handshake: `claims`, `request`, `now`.
    pub fn handshake_scope(
        &self,
        claims: &serde_json::Value,
        request: &RequestInfo,
        now: SystemTime,
    ) -> HandshakeScope<'_> {
        let mut ctx = Context::with_env(self.cel_env.clone());
        ctx.add_variable_from_value(Var::Claims.name(), json_to_cel(claims));
        ctx.add_variable_from_value(Var::Request.name(), request.to_cel());
        ctx.add_variable_from_value(Var::Now.name(), timestamp(now));
        HandshakeScope { policy: self, ctx }
    }
}

/// Evaluates a handshake's connect rules, user id and limits in one CEL scope.
pub struct HandshakeScope<'p> {
    policy: &'p Policy,
    ctx: Context<'static, 'static>,
}

impl HandshakeScope<'_> {
    /// The connect rules, in order.
    pub fn connect_rules(&self) -> Verdict {
        let (denied, audit) = run_rules(self.policy.auth.rules.iter(), &self.ctx);
        Verdict { denied, audit }
    }

    /// The user id (`auth.user_id`): a non-empty string of at most 256 bytes.
    pub fn user_id(&self) -> Result<String, EvalError> {
        match self.policy.auth.user_id.eval(&self.ctx)? {
            Value::String(s) if !s.is_empty() && s.len() <= MAX_USER_ID_LEN => Ok(s.to_string()),
            Value::String(_) => Err(EvalError(format!("the user id must be 1 to {MAX_USER_ID_LEN} bytes"))),
            Value::Int(i) => Ok(i.to_string()),
            Value::UInt(u) => Ok(u.to_string()),
            other => Err(EvalError(format!("the user id must be a string, got {}", other.type_of()))),
        }
    }

    /// Every per-connection limit.
    pub fn limits(&self) -> Result<ConnLimits, LimitError> {
        let p = self.policy;
        let c = &p.connections;
        let m = &p.messages;
        let ctx = &self.ctx;
        Ok(ConnLimits {
            max_per_user: count(&c.max_per_user, ctx, "connections.max_per_user")?,
            max_per_ip: count(&c.max_per_ip, ctx, "connections.max_per_ip")?,
            reconnects_max: count(&c.reconnects.max, ctx, "connections.reconnects.max")?,
            reconnects_per: duration(&c.reconnects.per, ctx, "connections.reconnects.per")?,
            heartbeat_interval: duration(&c.heartbeat_interval, ctx, "connections.heartbeat.interval")?,
            heartbeat_timeout: duration(&c.heartbeat_timeout, ctx, "connections.heartbeat.timeout")?,
            idle_timeout: duration(&c.idle_timeout, ctx, "connections.idle_timeout")?,
            reauth_interval: duration(&p.auth.reauth_interval, ctx, "auth.reauth_interval")?,
            max_bytes: count(&m.max_bytes, ctx, "messages.max_bytes")?,
            max_depth: count(&m.max_depth, ctx, "messages.max_depth")?,
            rate_max: count(&m.rate.max, ctx, "messages.rate.max")?,
            rate_per: duration(&m.rate.per, ctx, "messages.rate.per")?,
            rate_action: m.rate.action,
            max_invalid: count(&m.max_invalid, ctx, "messages.max_invalid")?,
        })
    }
}

/// The global spike threshold: `(max, per)`, evaluated over `now` only.
pub fn spike_threshold(policy: &Policy, now: SystemTime) -> Result<(u64, Duration), LimitError> {
    let mut ctx = Context::with_env(policy.cel_env.clone());
    ctx.add_variable_from_value(Var::Now.name(), timestamp(now));
    Ok((
        count(&policy.connections.spike.max, &ctx, "connections.spike.max")?,
        duration(&policy.connections.spike.per, &ctx, "connections.spike.per")?,
    ))
}

pub(crate) fn count(limit: &Limit<u64>, ctx: &Context<'_, '_>, key: &'static str) -> Result<u64, LimitError> {
    match limit {
        Limit::Literal(v) => Ok(*v),
        Limit::Expr { expr, min, max } => {
            let fail = |error: String| LimitError { key, error };
            let v = match expr.eval(ctx).map_err(|e| fail(e.0))? {
                Value::Int(i) if i >= 0 => i as u64,
                Value::UInt(u) => u,
                other => return Err(fail(format!("expected a non-negative int, got {}", other.type_of()))),
            };
            if (*min..=*max).contains(&v) { Ok(v) } else { Err(fail(format!("the result is outside {min}..={max}"))) }
        }
    }
}

pub(crate) fn duration(
    limit: &Limit<Duration>,
    ctx: &Context<'_, '_>,
    key: &'static str,
) -> Result<Duration, LimitError> {
    match limit {
        Limit::Literal(v) => Ok(*v),
        Limit::Expr { expr, min, max } => {
            let fail = |error: String| LimitError { key, error };
            let v = match expr.eval(ctx).map_err(|e| fail(e.0))? {
                Value::Duration(d) => d.to_std().map_err(|_| fail("negative duration".into()))?,
                other => return Err(fail(format!("expected a duration, got {}", other.type_of()))),
            };
            if (*min..=*max).contains(&v) {
                Ok(v)
            } else {
                Err(fail(format!("the result is outside {min:?}..={max:?}")))
            }
        }
    }
}

/// Runs rules in order: the first enforced refusal stops; audit refusals are collected.
fn run_rules<'r>(rules: impl Iterator<Item = &'r Rule>, ctx: &Context<'_, '_>) -> (Option<Denial>, Vec<Denial>) {
    let mut audit = Vec::new();
    for rule in rules {
        let Some(denial) = apply(rule, ctx) else { continue };
        match rule.mode {
            RuleMode::Audit => audit.push(denial),
            RuleMode::Enforce => return (Some(denial), audit),
        }
    }
    (None, audit)
}

/// One rule: `Some` when it refuses, including when its expression fails (fail closed).
fn apply(rule: &Rule, ctx: &Context<'_, '_>) -> Option<Denial> {
    let (refuses, error) = match rule.expr.eval_bool(ctx) {
        Ok(value) => (matches!((rule.kind, value), (RuleKind::Deny, true) | (RuleKind::Allow, false)), None),
        Err(e) => (true, Some(e.0)),
    };
    refuses.then(|| Denial {
        rule: rule.name.clone(),
        mode: rule.mode,
        action: rule.action,
        reason: rule.reason.clone(),
        error,
    })
}

/// One connection's evaluation context: the policy it was built under and a CEL scope with
/// `claims` and `conn` bound. Rebuild it when the policy changes.
pub struct ConnContext {
    policy: Arc<Policy>,
    ctx: Context<'static, 'static>,
}

impl ConnContext {
    /// Binds a connection's claims and record under `policy`.
    pub fn new(policy: Arc<Policy>, claims: &serde_json::Value, conn: &ConnInfo) -> ConnContext {
        let mut ctx = Context::with_env(policy.cel_env.clone());
        ctx.add_variable_from_value(Var::Claims.name(), json_to_cel(claims));
        ctx.add_variable_from_value(Var::Conn.name(), conn.to_cel());
        ConnContext { policy, ctx }
    }

    /// The policy this context decides under.
    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    /// Decides one parsed message: envelope, type, schema, then the type's rules.
    pub fn decide(&self, message: &serde_json::Value, now: SystemTime) -> MessageVerdict {
        let invalid = |code, reason: String| MessageVerdict {
            refused: Some(MessageRefusal::Invalid { code, reason }),
            audit: Vec::new(),
        };
        let Some(fields) = message.as_object() else {
            return invalid(ErrorCode::SchemaViolation, "a message is a JSON object".into());
        };
        let Some(kind) = fields.get("type").and_then(|t| t.as_str()) else {
            return invalid(ErrorCode::SchemaViolation, "a message needs a string `type`".into());
        };
        match fields.get("id") {
            None => {}
            Some(serde_json::Value::String(id)) if id.len() <= MAX_ID_LEN => {}
            Some(_) => {
                return invalid(
                    ErrorCode::SchemaViolation,
                    format!("`id` must be a string of at most {MAX_ID_LEN} bytes"),
                );
            }
        }
        let Some(t) = self.policy.messages.types.get(kind).filter(|_| kind.len() <= MAX_TYPE_LEN) else {
            return invalid(ErrorCode::UnknownType, "unknown message type".into());
        };
        if !t.schema.is_valid(message) {
            // The reason names where and which keyword, never the offending value: a value can
            // be a secret (an `auth` message's token) and this text is logged and sent back.
            let detail = t
                .schema
                .iter_errors(message)
                .next()
                .map(|e| {
                    let schema_path = e.schema_path().to_string();
                    let keyword = schema_path.rsplit('/').next().unwrap_or_default().to_string();
                    let at = schema_named_path(&e.instance_path().to_string(), &schema_path);
                    format!("does not match the schema: `{keyword}` at `{}`", if at.is_empty() { "/" } else { &at })
                })
                .unwrap_or_default();
            return invalid(ErrorCode::SchemaViolation, truncate(&detail, MAX_REASON_LEN));
        }
        if t.rules.is_empty() {
            return MessageVerdict::default();
        }
        let scope = self.rule_scope(t, message, now);
        let (denied, audit) = run_rules(t.rules.iter().map(|r| r.as_ref()), &scope);
        MessageVerdict { refused: denied.map(MessageRefusal::Rule), audit }
    }

    /// The scope a type's rules run in: the connection's, with `message` and `now` bound when
    /// the rules read them.
    fn rule_scope(&self, t: &MessageType, message: &serde_json::Value, now: SystemTime) -> Context<'_, '_> {
        let mut scope = self.ctx.new_inner_scope();
        if t.reads_message {
            scope.add_variable_from_value(Var::Message.name(), json_to_cel(message));
        }
        if t.reads_now {
            scope.add_variable_from_value(Var::Now.name(), timestamp(now));
        }
        scope
    }

    /// Whether a live subscription to `channel` is still allowed under this context's policy,
    /// decided as a `subscribe` for it would be by the rules that apply to `subscribe` (a
    /// reloaded policy re-checks every subscription). A live subscription has no message beyond
    /// its type and channel: the schema is not consulted, and a rule that cannot be evaluated on
    /// those two fields alone (it reads another field of the message, and fails) does not end
    /// it — only a rule that decides against the channel does. Audit-mode rules that would
    /// refuse are returned for the decision log; a policy without a `subscribe` type allows no
    /// subscription.
    pub fn allows_subscription(&self, channel: &str, now: SystemTime) -> (Result<(), Denial>, Vec<Denial>) {
        let Some(t) = self.policy.messages.types.get("subscribe") else {
            let denial = Denial {
                rule: "messages.types.subscribe".into(),
                mode: RuleMode::Enforce,
                action: RuleAction::Reject,
                reason: "the policy defines no subscribe type".into(),
                error: None,
            };
            return (Err(denial), Vec::new());
        };
        if t.rules.is_empty() {
            return (Ok(()), Vec::new());
        }
        let scope = self.rule_scope(t, &serde_json::json!({"type": "subscribe", "channel": channel}), now);
        let mut audit = Vec::new();
        for rule in &t.rules {
            match apply(rule, &scope) {
                // Undecidable from the channel alone (the live subscription was admitted whole).
                Some(denial) if denial.error.is_some() => {}
                Some(denial) if rule.mode == RuleMode::Audit => audit.push(denial),
                Some(denial) => return (Err(denial), audit),
                None => {}
            }
        }
        (Ok(()), audit)
    }
}

/// The place of a schema violation, with only the keys the schema names (under `properties`)
/// and array indexes: any other key is one the client chose (`additionalProperties`,
/// `patternProperties`), and is shown as `*`, since this text is logged.
fn schema_named_path(instance_path: &str, schema_path: &str) -> String {
    let parts: Vec<&str> = schema_path.split('/').collect();
    let named: Vec<&str> = parts.windows(2).filter(|w| w[0] == "properties").map(|w| w[1]).collect();
    instance_path
        .split('/')
        .skip(1)
        .map(|seg| if seg.bytes().all(|b| b.is_ascii_digit()) || named.contains(&seg) { seg } else { "*" })
        .fold(String::new(), |path, seg| path + "/" + seg)
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
