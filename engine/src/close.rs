//! The one mapping from outcomes to what a client sees: error codes in `error` frames (and,
//! as the gateway grows, close codes and HTTP statuses). Every code of SPEC §4–§5 is named
//! here and nowhere else.

/// The `code` of an `error` frame (SPEC §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The frame is not JSON, or is nested deeper than the policy allows.
    InvalidJson,
    /// The message does not match its type's schema, or has no string `type`.
    SchemaViolation,
    /// The policy defines no such message type.
    UnknownType,
    /// A rule refused the message.
    Forbidden,
    /// The connection's message rate is exceeded.
    RateLimited,
    /// A binary frame where the policy refuses them.
    BinaryNotAllowed,
}

impl ErrorCode {
    /// Every code, for documentation and metrics.
    pub const ALL: [ErrorCode; 6] = [
        ErrorCode::InvalidJson,
        ErrorCode::SchemaViolation,
        ErrorCode::UnknownType,
        ErrorCode::Forbidden,
        ErrorCode::RateLimited,
        ErrorCode::BinaryNotAllowed,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::SchemaViolation => "schema_violation",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::BinaryNotAllowed => "binary_not_allowed",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// HTTP status of a handshake refused because the token is missing or invalid.
pub const STATUS_UNAUTHORIZED: u16 = 401;
/// HTTP status of a handshake refused by a connect rule or the origin check.
pub const STATUS_FORBIDDEN: u16 = 403;

/// WebSocket close codes (SPEC §5), plus RFC 6455's 1002 and 1007 and 4008 for a client that
/// does not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseCode {
    /// 1000: normal closure (also an idle connection past `idle_timeout`).
    Normal,
    /// 1001: the server is shutting down.
    GoingAway,
    /// 1002: the client broke the WebSocket protocol (RFC 6455).
    ProtocolError,
    /// 1003: a binary frame where the policy says `binary: close`.
    Unsupported,
    /// 1007: a text frame that is not UTF-8 (RFC 6455).
    InvalidPayload,
    /// 1008: a rule with action `close`, or too many invalid messages.
    PolicyViolation,
    /// 1009: a message larger than `messages.max_bytes`.
    TooBig,
    /// 1011: an internal error.
    Internal,
    /// 4001: the token expired, or re-authentication failed.
    TokenExpired,
    /// 4003: a policy reload or a revocation now denies this connection.
    Revoked,
    /// 4008: the client does not read; its outbound queue overflowed.
    SlowConsumer,
    /// 4009: the same user opened a newer connection.
    Replaced,
    /// 4010: logged out through the admin API.
    LoggedOut,
    /// 4029: message rate exceeded where the policy says `close`.
    RateLimited,
}

impl CloseCode {
    /// Every code the server sends, for documentation and metrics.
    pub const ALL: [CloseCode; 14] = [
        CloseCode::Normal,
        CloseCode::GoingAway,
        CloseCode::ProtocolError,
        CloseCode::Unsupported,
        CloseCode::InvalidPayload,
        CloseCode::PolicyViolation,
        CloseCode::TooBig,
        CloseCode::Internal,
        CloseCode::TokenExpired,
        CloseCode::Revoked,
        CloseCode::SlowConsumer,
        CloseCode::Replaced,
        CloseCode::LoggedOut,
        CloseCode::RateLimited,
    ];

    /// The numeric code on the wire.
    pub fn code(self) -> u16 {
        match self {
            CloseCode::Normal => 1000,
            CloseCode::GoingAway => 1001,
            CloseCode::ProtocolError => 1002,
            CloseCode::Unsupported => 1003,
            CloseCode::InvalidPayload => 1007,
            CloseCode::PolicyViolation => 1008,
            CloseCode::TooBig => 1009,
            CloseCode::Internal => 1011,
            CloseCode::TokenExpired => 4001,
            CloseCode::Revoked => 4003,
            CloseCode::SlowConsumer => 4008,
            CloseCode::Replaced => 4009,
            CloseCode::LoggedOut => 4010,
            CloseCode::RateLimited => 4029,
        }
    }
}

/// Why a handshake was refused, with the HTTP status it gets (SPEC §3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// 404: not the WebSocket path.
    NotFound,
    /// 400: not a valid WebSocket upgrade request.
    BadRequest(&'static str),
    /// 401: no token, or an invalid, expired or revoked one.
    Unauthorized(String),
    /// 403: the origin is not allowed, or a connect rule denies.
    Forbidden {
        /// The rule (`origins` for the origin check).
        rule: String,
        /// The rule's reason.
        reason: String,
    },
    /// 429: reconnect or per-IP limit; retry after this many seconds.
    TooMany {
        /// What limit.
        reason: &'static str,
        /// Seconds for `Retry-After`.
        retry_after_secs: u64,
    },
    /// 503: shutting down, or no valid policy.
    Unavailable(&'static str),
}

impl Refusal {
    /// The HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            Refusal::NotFound => 404,
            Refusal::BadRequest(_) => 400,
            Refusal::Unauthorized(_) => STATUS_UNAUTHORIZED,
            Refusal::Forbidden { .. } => STATUS_FORBIDDEN,
            Refusal::TooMany { .. } => 429,
            Refusal::Unavailable(_) => 503,
        }
    }

    /// The `error` field of the JSON body, and the metrics outcome label.
    pub fn error(&self) -> &'static str {
        match self {
            Refusal::NotFound => "not_found",
            Refusal::BadRequest(_) => "bad_request",
            Refusal::Unauthorized(_) => "unauthorized",
            Refusal::Forbidden { .. } => "forbidden",
            Refusal::TooMany { .. } => "too_many_requests",
            Refusal::Unavailable(_) => "unavailable",
        }
    }

    /// The `reason` field: never a token or a query string.
    pub fn reason(&self) -> String {
        match self {
            Refusal::NotFound => "no such path".into(),
            Refusal::BadRequest(r) | Refusal::Unavailable(r) => (*r).into(),
            Refusal::TooMany { reason, .. } => (*reason).into(),
            Refusal::Unauthorized(r) => r.clone(),
            Refusal::Forbidden { reason, .. } => reason.clone(),
        }
    }
}
