//! The compiled policy: the immutable types a handshake and a message are decided under, as
//! `compile` builds them from the file format in `model`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::expr::eval::Expr;
use super::keys::JwtVerifier;
use super::model::{BinaryMode, RuleAction, RuleMode};

/// One compiled policy. Immutable: a reload builds a new one and swaps it in whole, so every
/// handshake and message is decided under exactly one generation.
pub struct Policy {
    /// Increases by one with every policy that replaces another.
    pub generation: u64,
    /// SHA-256 over the policy's documents, schemas and key files, hex.
    pub content_hash: String,
    /// The files it was compiled from, relative to its directory.
    pub sources: Vec<String>,
    /// When it was compiled.
    pub loaded_at: SystemTime,
    /// Who may connect.
    pub auth: AuthPolicy,
    /// Which origins may connect.
    pub origins: OriginPolicy,
    /// Connection limits.
    pub connections: ConnectionPolicy,
    /// Message limits, types and rules.
    pub messages: MessagePolicy,
    /// The CEL environment every expression of this policy runs in (built once: it is the
    /// expensive part of a CEL context).
    pub(crate) cel_env: Arc<cel::Env>,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("generation", &self.generation)
            .field("content_hash", &self.content_hash)
            .field("sources", &self.sources)
            .field("auth", &self.auth)
            .field("origins", &self.origins)
            .field("connections", &self.connections)
            .field("messages", &self.messages)
            .finish_non_exhaustive()
    }
}

/// Where a token may be found in a handshake request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `?NAME=` in the query string.
    Query(String),
    /// A request header (lower-case name); `authorization` expects `Bearer <token>`.
    Header(String),
    /// A cookie; only with listed origins (SPEC §9).
    Cookie(String),
    /// `Sec-WebSocket-Protocol: wsgate.v1, bearer.<token>`.
    Subprotocol,
}

/// A rule's test: refuse when the expression is true (`deny`) or false (`allow`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleKind {
    /// Refuse when true.
    Deny,
    /// Refuse when false.
    Allow,
}

/// One compiled rule.
#[derive(Debug)]
pub struct Rule {
    /// Unique name, for logs, metrics and tests.
    pub name: Arc<str>,
    /// `deny` or `allow`.
    pub kind: RuleKind,
    /// Refuses when true (`deny`) or false (`allow`); it reads only the variables its
    /// place allows, and `uses` says which to bind.
    pub expr: Expr,
    /// Enforced or audit-only.
    pub mode: RuleMode,
    /// For message rules: reject the message or close the connection.
    pub action: RuleAction,
    /// The reason given to the client and the log.
    pub reason: Arc<str>,
}

/// A limit: a literal, or a CEL expression evaluated per connection.
#[derive(Debug)]
pub enum Limit<T> {
    /// Known at load time.
    Literal(T),
    /// Evaluated for each connection (over `claims`, `request`, `now`); a result outside
    /// `min..=max` is an evaluation error, and the connection is refused (fail closed).
    Expr {
        /// Yields the limit, an `int` or a `duration`.
        expr: Expr,
        /// Smallest acceptable result.
        min: T,
        /// Largest acceptable result.
        max: T,
    },
}

impl<T: Copy> Limit<T> {
    /// The value, when it is a literal.
    pub fn literal(&self) -> Option<T> {
        match self {
            Limit::Literal(v) => Some(*v),
            Limit::Expr { .. } => None,
        }
    }
}

/// A count of events over a window.
#[derive(Debug)]
pub struct WindowLimit {
    /// Events admitted per window.
    pub max: Limit<u64>,
    /// How long the window is.
    pub per: Limit<Duration>,
}

/// `auth`, compiled.
#[derive(Debug)]
pub struct AuthPolicy {
    /// Token sources, in the order they are tried.
    pub token_sources: Vec<TokenSource>,
    /// Checks a token's signature and registered claims with the policy's keys.
    pub jwt: JwtVerifier,
    /// Yields the user id that per-user limits and `conn.user` go by.
    pub user_id: Expr,
    /// How often live connections are re-checked.
    pub reauth_interval: Limit<Duration>,
    /// Connect rules, in order.
    pub rules: Vec<Rule>,
}

/// One allowed origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginPattern {
    /// Any origin.
    Any,
    /// Exactly this origin (lower-case `scheme://host[:port]`).
    Exact(String),
    /// `scheme://*.suffix[:port]`: any subdomain of the suffix (not the suffix itself).
    Subdomains {
        /// `http` or `https`.
        scheme: String,
        /// `.example.com`, with the leading dot.
        suffix: String,
    },
}

/// `origins`, compiled.
#[derive(Debug)]
pub struct OriginPolicy {
    /// Allowed origins; empty refuses every request that carries an `Origin`.
    pub allowed: Vec<OriginPattern>,
    /// Refuse `http://` origins.
    pub require_https: bool,
    /// Refuse requests without an `Origin` header.
    pub require_origin: bool,
}

/// `connections`, compiled.
#[derive(Debug)]
pub struct ConnectionPolicy {
    /// Live connections per user.
    pub max_per_user: Limit<u64>,
    /// Live connections per IP.
    pub max_per_ip: Limit<u64>,
    /// Handshakes per user per window.
    pub reconnects: WindowLimit,
    /// Ping interval.
    pub heartbeat_interval: Limit<Duration>,
    /// Pong deadline.
    pub heartbeat_timeout: Limit<Duration>,
    /// Close after this long without a client message.
    pub idle_timeout: Limit<Duration>,
    /// Global handshake rate that raises the spike gauge.
    pub spike: WindowLimit,
}

/// `messages.rate`, compiled.
#[derive(Debug)]
pub struct RatePolicy {
    /// Messages per window.
    pub max: Limit<u64>,
    /// How long the window is.
    pub per: Limit<Duration>,
    /// Reject or close when exceeded.
    pub action: RuleAction,
}

/// One message type.
#[derive(Debug)]
pub struct MessageType {
    /// The schema file it is validated against, for messages.
    pub schema_file: String,
    /// `schema_file`, compiled once at load.
    pub schema: Arc<jsonschema::Validator>,
    /// Its rules: the type's `allow` first, then the `messages.rules` that apply to it.
    pub rules: Vec<Arc<Rule>>,
    /// Whether any of its rules reads `message` (otherwise it is not converted for CEL).
    pub reads_message: bool,
    /// Whether any of its rules reads `now`.
    pub reads_now: bool,
}

/// `messages`, compiled.
#[derive(Debug)]
pub struct MessagePolicy {
    /// Largest message, bytes.
    pub max_bytes: Limit<u64>,
    /// Deepest JSON nesting.
    pub max_depth: Limit<u64>,
    /// Per-connection message rate.
    pub rate: RatePolicy,
    /// Binary frames.
    pub binary: BinaryMode,
    /// Invalid messages before close.
    pub max_invalid: Limit<u64>,
    /// Message types by name.
    pub types: HashMap<String, MessageType>,
}
