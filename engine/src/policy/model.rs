//! The policy file format: typed serde structures for every section of a policy document.
//!
//! These types say what a policy file may contain and nothing more. Every struct denies
//! unknown fields, so a misspelt key is an error and never a silently ignored setting. Values
//! that compile to something (CEL, durations, sizes, schemas, keys) stay as written here;
//! `compile` turns them into the immutable `Policy`. `policies/policy.schema.json` is generated
//! from these types, so editors complete and validate policy files.

use std::borrow::Cow;
use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer};

/// A value with the place in its file it was written, so that a compile error can point there.
#[derive(Debug, Clone)]
pub(crate) struct Located<T> {
    /// The deserialized value.
    pub value: T,
    /// 1-based line of the value in its file (0 when unknown).
    pub line: usize,
    /// 1-based column of the value in its file (0 when unknown).
    pub col: usize,
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Located<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let spanned = serde_saphyr::Spanned::<T>::deserialize(deserializer)?;
        Ok(Located {
            line: spanned.referenced.line() as usize,
            col: spanned.referenced.column() as usize,
            value: spanned.value,
        })
    }
}

impl<T: JsonSchema> JsonSchema for Located<T> {
    fn schema_name() -> Cow<'static, str> {
        T::schema_name()
    }
    fn schema_id() -> Cow<'static, str> {
        T::schema_id()
    }
    fn inline_schema() -> bool {
        T::inline_schema()
    }
    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        T::json_schema(generator)
    }
}

/// One policy file. Every top-level section is optional in a file, but a section may be
/// defined in only one file of a policy directory; sections no file defines take their
/// defaults.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "wsgate policy document")]
pub(crate) struct PolicyDocument {
    /// Format version. Must be 1.
    pub version: Located<u32>,
    /// Who may connect: token sources, JWT verification, user id, connect rules.
    pub auth: Option<Located<AuthSection>>,
    /// Which browser origins may open a connection.
    pub origins: Option<Located<OriginsSection>>,
    /// Connection limits and timers.
    pub connections: Option<Located<ConnectionsSection>>,
    /// Message limits, types, schemas and rules.
    pub messages: Option<Located<MessagesSection>>,
}

/// A count that is a literal or a CEL expression evaluated for each connection.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(untagged)]
pub(crate) enum CountSpec {
    /// A literal count.
    Literal(u64),
    /// A CEL expression that yields an `int`.
    Expr(String),
}

/// A duration: `"500ms"`, `"30s"`, `"15m"`, `"1h30m"`, `"1d"`, or a CEL expression that yields
/// a `duration` (e.g. `'"admin" in claims.roles ? duration("1h") : duration("15m")'`).
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(transparent)]
pub(crate) struct DurationSpec(pub String);

/// A size in bytes: `10240`, `"10KiB"`, `"1MiB"`, `"512B"`, or a CEL expression that yields an
/// `int` number of bytes.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(untagged)]
pub(crate) enum SizeSpec {
    /// A literal number of bytes.
    Literal(u64),
    /// A size with a unit, or a CEL expression.
    Text(String),
}

/// Whether a rule is enforced, or only evaluated, logged and counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RuleMode {
    /// The rule's decision is applied.
    #[default]
    Enforce,
    /// The rule is evaluated and a "would deny" is logged and counted; it never refuses.
    Audit,
}

/// What happens to a connection when one of its messages is refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RuleAction {
    /// The message is dropped and the client gets an `error` frame.
    #[default]
    Reject,
    /// The connection is closed (1008 for a rule, 4029 for the message rate).
    Close,
}

/// What to do with binary frames.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BinaryMode {
    /// Refuse with an `error` frame, code `binary_not_allowed`.
    #[default]
    Reject,
    /// Close the connection with 1003.
    Close,
    /// Pass binary frames through the remaining checks (they are never parsed as JSON).
    Allow,
}

/// A rule: exactly one of `deny` (refuse when true) or `allow` (refuse when false).
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RuleSpec {
    /// A unique name, used in decision logs, metrics and policy tests.
    pub name: Located<String>,
    /// CEL: the request or message is refused when this is true.
    pub deny: Option<Located<String>>,
    /// CEL: the request or message is refused when this is false.
    pub allow: Option<Located<String>>,
    /// `enforce` (default) or `audit`.
    #[serde(default)]
    pub mode: RuleMode,
    /// Message rules only: `reject` (default) or `close` (1008).
    pub action: Option<RuleAction>,
    /// A human reason, sent to the client and logged. Defaults to the rule's name.
    pub reason: Option<String>,
    /// Message rules in `messages.rules` only: the message types the rule applies to
    /// (default: all).
    pub types: Option<Vec<String>>,
}

/// The `allow` of a message type: a CEL string, or a rule without a name.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(untagged)]
pub(crate) enum TypeAllow {
    /// CEL: the message is refused when this is false.
    Expr(String),
    /// The same with a mode, action and reason.
    Rule(TypeAllowRule),
}

/// The long form of a message type's `allow`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct TypeAllowRule {
    /// CEL: the message is refused when this is false.
    pub expr: String,
    /// `enforce` (default) or `audit`.
    #[serde(default)]
    pub mode: RuleMode,
    /// `reject` (default) or `close`.
    #[serde(default)]
    pub action: RuleAction,
    /// Reason sent to the client.
    pub reason: Option<String>,
}

/// `auth`: who may connect.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct AuthSection {
    /// Where the token is looked for, in order: `query:NAME`, `header:authorization`,
    /// `cookie:NAME`, `subprotocol`. A `cookie:` source needs a list of allowed origins
    /// (`origins.allowed` without `"*"`).
    pub token_sources: Located<Vec<Located<String>>>,
    /// How tokens are verified.
    pub jwt: Located<JwtSection>,
    /// CEL over `claims` (and `request`) that yields the user id.
    pub user_id: Located<String>,
    /// How often a live connection's token and connect rules are re-checked.
    pub reauth_interval: Located<DurationSpec>,
    /// Connect rules, CEL over `claims`, `request`, `now`.
    pub rules: Vec<RuleSpec>,
}

impl Default for AuthSection {
    fn default() -> Self {
        AuthSection {
            // No cookie: the default origins allow any, and cookies need a list (SPEC §9).
            token_sources: unlocated(
                ["query:token", "header:authorization", "subprotocol"]
                    .into_iter()
                    .map(|s| unlocated(s.to_string()))
                    .collect(),
            ),
            jwt: unlocated(JwtSection::default()),
            user_id: unlocated("claims.sub".to_string()),
            reauth_interval: unlocated(DurationSpec("15m".into())),
            rules: Vec::new(),
        }
    }
}

/// `auth.jwt`: token verification.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct JwtSection {
    /// Accepted algorithms: HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512,
    /// ES256, ES384, EdDSA. HMAC and public-key algorithms cannot be mixed.
    pub algorithms: Located<Vec<String>>,
    /// Environment variable holding the HMAC secret (at least 32 bytes).
    pub secret_env: Option<Located<String>>,
    /// PEM public key file, relative to the policy directory.
    pub public_key_file: Option<Located<String>>,
    /// JWKS file (`{"keys": [...]}`), relative to the policy directory; tokens pick a key by `kid`.
    pub jwks_file: Option<Located<String>>,
    /// Required `iss`, checked when set.
    pub issuer: Option<String>,
    /// Required `aud`, checked when set.
    pub audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Located<DurationSpec>,
    /// Claims every token must carry.
    pub required_claims: Vec<String>,
}

impl Default for JwtSection {
    fn default() -> Self {
        JwtSection {
            algorithms: unlocated(vec!["HS256".into()]),
            secret_env: Some(unlocated("WSGATE_JWT_SECRET".into())),
            public_key_file: None,
            jwks_file: None,
            issuer: None,
            audience: None,
            leeway: unlocated(DurationSpec("5s".into())),
            required_claims: vec!["exp".into(), "sub".into()],
        }
    }
}

/// `origins`: browser origins allowed to connect.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct OriginsSection {
    /// Allowed origins: `"*"`, an exact origin (`https://app.example.com`), or a wildcard
    /// subdomain (`https://*.example.com`).
    pub allowed: Vec<Located<String>>,
    /// Refuse `http://` origins (no mixed content).
    pub require_https: bool,
    /// Refuse requests without an `Origin` header (non-browser clients send none).
    pub require_origin: bool,
}

impl Default for OriginsSection {
    fn default() -> Self {
        OriginsSection { allowed: vec![unlocated("*".into())], require_https: false, require_origin: false }
    }
}

/// A count over a time window.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct WindowSpec {
    /// How many events the window admits.
    pub max: Located<CountSpec>,
    /// The window's length.
    pub per: Located<DurationSpec>,
}

/// `connections.heartbeat`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct HeartbeatSpec {
    /// How often the server pings.
    pub interval: Located<DurationSpec>,
    /// How long a pong may take before the connection is dropped.
    pub timeout: Located<DurationSpec>,
}

/// `connections`: connection limits and timers.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct ConnectionsSection {
    /// Live connections per user; the newest wins and the oldest is closed with 4009.
    pub max_per_user: Located<CountSpec>,
    /// Live connections per client IP; past it handshakes get 429.
    pub max_per_ip: Located<CountSpec>,
    /// Handshakes per user per window; past it handshakes get 429 with `Retry-After`.
    pub reconnects: Located<WindowSpec>,
    /// Server pings and the pong deadline.
    pub heartbeat: Located<HeartbeatSpec>,
    /// A connection with no client message for this long is closed (1000).
    pub idle_timeout: Located<DurationSpec>,
    /// Handshake rate over which `wsgate_connection_spike` is raised (global, CEL over `now` only).
    pub spike: Located<WindowSpec>,
}

impl Default for ConnectionsSection {
    fn default() -> Self {
        ConnectionsSection {
            max_per_user: unlocated(CountSpec::Literal(1)),
            max_per_ip: unlocated(CountSpec::Literal(100)),
            reconnects: unlocated(window(5, "1m")),
            heartbeat: unlocated(HeartbeatSpec {
                interval: unlocated(DurationSpec("30s".into())),
                timeout: unlocated(DurationSpec("10s".into())),
            }),
            idle_timeout: unlocated(DurationSpec("10m".into())),
            spike: unlocated(window(500, "10s")),
        }
    }
}

/// `messages.rate`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RateSpec {
    /// Messages admitted per window.
    pub max: Located<CountSpec>,
    /// The window's length.
    pub per: Located<DurationSpec>,
    /// `reject` (error `rate_limited`, default) or `close` (4029).
    #[serde(default)]
    pub action: RuleAction,
}

/// One message type a client may send.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct TypeSpec {
    /// JSON Schema file in `schemas/` the whole message must match.
    pub schema: Located<String>,
    /// CEL over `claims`, `conn`, `message`, `now`: the message is refused when false.
    pub allow: Option<Located<TypeAllow>>,
}

/// `messages`: what clients may send.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct MessagesSection {
    /// Largest message in bytes (fragments count as a whole); larger closes with 1009.
    pub max_bytes: Located<SizeSpec>,
    /// Deepest JSON nesting accepted.
    pub max_depth: Located<CountSpec>,
    /// Message rate per connection.
    pub rate: Located<RateSpec>,
    /// Binary frames: `reject`, `close` (1003) or `allow`.
    pub binary: BinaryMode,
    /// Invalid messages a connection may send before it is closed with 1008.
    pub max_invalid: Located<CountSpec>,
    /// Rules over every message (or the `types` they name), after the type's schema.
    pub rules: Vec<RuleSpec>,
    /// The message types clients may send; any other type is refused `unknown_type`.
    pub types: BTreeMap<String, Located<TypeSpec>>,
}

impl Default for MessagesSection {
    fn default() -> Self {
        MessagesSection {
            max_bytes: unlocated(SizeSpec::Literal(10240)),
            max_depth: unlocated(CountSpec::Literal(32)),
            rate: unlocated(RateSpec {
                max: unlocated(CountSpec::Literal(20)),
                per: unlocated(DurationSpec("1s".into())),
                action: RuleAction::Reject,
            }),
            binary: BinaryMode::Reject,
            max_invalid: unlocated(CountSpec::Literal(5)),
            rules: Vec::new(),
            types: BTreeMap::new(),
        }
    }
}

fn window(max: u64, per: &str) -> WindowSpec {
    WindowSpec { max: unlocated(CountSpec::Literal(max)), per: unlocated(DurationSpec(per.into())) }
}

/// A default value: it was written nowhere.
pub(crate) fn unlocated<T>(value: T) -> Located<T> {
    Located { value, line: 0, col: 0 }
}

/// The JSON Schema of the policy document format, as written to `policies/policy.schema.json`.
pub fn policy_json_schema() -> String {
    let schema = schemars::schema_for!(PolicyDocument);
    let mut text = serde_json::to_string_pretty(&schema).expect("a schema serializes");
    text.push('\n');
    text
}
