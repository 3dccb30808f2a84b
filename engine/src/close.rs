//! The one mapping from outcomes to what a client sees: error codes in `error` frames, close
//! codes and their reasons, and the HTTP statuses of refused handshakes. Every code of SPEC §3–§5
//! is chosen here and nowhere else; the rest of the crate names outcomes.

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
pub(crate) const STATUS_UNAUTHORIZED: u16 = 401;
/// HTTP status of a handshake refused by a connect rule or the origin check.
pub(crate) const STATUS_FORBIDDEN: u16 = 403;

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
    /// The close reason of a connection displaced by a newer one of its user
    /// ([`CloseCode::Replaced`]), on whichever instance the newer one opened.
    pub(crate) const REPLACED: &str = "replaced by a newer connection";

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
    /// 431: the request head does not fit the read buffer.
    HeadTooLarge,
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
            Refusal::HeadTooLarge => 431,
        }
    }

    /// The `error` field of the JSON body, and the metrics outcome label.
    pub fn error(&self) -> &'static str {
        match self {
            Refusal::NotFound => "not_found",
            Refusal::BadRequest(_) | Refusal::HeadTooLarge => "bad_request",
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
            Refusal::HeadTooLarge => "request head too large".into(),
            Refusal::BadRequest(r) | Refusal::Unavailable(r) => (*r).into(),
            Refusal::TooMany { reason, .. } => (*reason).into(),
            Refusal::Unauthorized(r) => r.clone(),
            Refusal::Forbidden { reason, .. } => reason.clone(),
        }
    }
}

/// The close code a metric counts for a client that closed without one (RFC 6455's "no status
/// received"); it is never sent.
pub(crate) const NO_STATUS_RECEIVED: u16 = 1005;
/// The close code a metric counts for a connection dropped without a close handshake.
pub(crate) const DROPPED: u16 = 0;

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The server closed it with this code.
    Closed(CloseCode, String),
    /// The client closed it (its close code, if it sent one).
    ClientClosed(Option<u16>),
    /// The connection was dropped without a close handshake.
    Dropped(&'static str),
}

impl Ended {
    /// The code `wsgate_connections_closed_total` counts it under, and whether the client chose it.
    pub(crate) fn counted_as(&self) -> (u16, bool) {
        match self {
            Ended::Closed(code, _) => (code.code(), false),
            Ended::ClientClosed(code) => (code.unwrap_or(NO_STATUS_RECEIVED), true),
            Ended::Dropped(_) => (DROPPED, false),
        }
    }
}

/// What a re-check found wrong with a live connection, as far as its close code goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Readmission {
    /// The token expired.
    Expired,
    /// The token no longer verifies, names another user, or yields no user id.
    Invalid,
    /// Anything else: the origin, a revocation, a connect rule, the limits.
    Refused,
}

/// Why the server ends a connection, with the code and reason each one gets: the only place a
/// close code is chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ending {
    /// The drain began (1001).
    ShuttingDown,
    /// No client message for `idle_timeout` (1000).
    Idle,
    /// The client broke the WebSocket protocol (1002).
    ProtocolError,
    /// A text frame that is not UTF-8 (1007).
    NotUtf8,
    /// A binary frame where the policy says `binary: close` (1003).
    BinaryRefused,
    /// A message rule with `action: close` refused a message, for this reason (1008).
    RuleClosed(String),
    /// More invalid messages than `messages.max_invalid` (1008).
    TooManyInvalid,
    /// The message rate was exceeded where the policy says `action: close` (4029).
    RateExceeded,
    /// A newer connection of the same user displaced this one (4009).
    Replaced,
    /// `POST /v1/disconnect`, with its reason (4010).
    LoggedOut(String),
    /// A message over `messages.max_bytes` (1009).
    TooBig {
        /// The limit.
        max: u64,
    },
    /// A panic while deciding a message (1011).
    Internal,
    /// The backplane refused a publish (1011).
    PublishFailed,
    /// The token's expiry passed (4001).
    TokenExpired,
    /// The client does not take what is written to it (4008).
    NotReading,
    /// The client's delivery queue of this many frames overflowed (4008).
    Overflow {
        /// The queue's capacity.
        capacity: usize,
    },
    /// The periodic re-authentication refused the connection (4001 or 4003).
    ReauthFailed(Readmission, String),
    /// A reloaded policy no longer admits the connection (4001 or 4003).
    Reloaded(Readmission, String),
}

impl Ending {
    /// The close code and reason.
    pub fn close(self) -> (CloseCode, String) {
        match self {
            Ending::ShuttingDown => (CloseCode::GoingAway, "server shutting down".into()),
            Ending::Idle => (CloseCode::Normal, "idle timeout".into()),
            Ending::ProtocolError => (CloseCode::ProtocolError, "protocol error".into()),
            Ending::NotUtf8 => (CloseCode::InvalidPayload, "text frame is not UTF-8".into()),
            Ending::BinaryRefused => (CloseCode::Unsupported, "binary frames are not accepted".into()),
            Ending::RuleClosed(reason) => (CloseCode::PolicyViolation, reason),
            Ending::TooManyInvalid => (CloseCode::PolicyViolation, "too many invalid messages".into()),
            Ending::RateExceeded => (CloseCode::RateLimited, "message rate exceeded".into()),
            Ending::Replaced => (CloseCode::Replaced, CloseCode::REPLACED.into()),
            Ending::LoggedOut(reason) => (CloseCode::LoggedOut, reason),
            Ending::TooBig { max } => (CloseCode::TooBig, format!("message larger than {max} bytes")),
            Ending::Internal => (CloseCode::Internal, "internal error".into()),
            Ending::PublishFailed => (CloseCode::Internal, "publish failed".into()),
            Ending::TokenExpired => (CloseCode::TokenExpired, "token expired".into()),
            Ending::NotReading => (CloseCode::SlowConsumer, "the client does not read".into()),
            Ending::Overflow { capacity } => {
                (CloseCode::SlowConsumer, format!("more than {capacity} undelivered messages"))
            }
            Ending::ReauthFailed(found, reason) => {
                (readmission_code(found, false), format!("re-authentication failed: {reason}"))
            }
            Ending::Reloaded(found, reason) => (readmission_code(found, true), format!("policy reloaded: {reason}")),
        }
    }
}

/// An expired token is 4001. A token that no longer verifies is 4001 at a re-authentication and
/// 4003 after a reload (a reload changed what is accepted); anything else is 4003.
fn readmission_code(found: Readmission, after_reload: bool) -> CloseCode {
    match found {
        Readmission::Expired => CloseCode::TokenExpired,
        Readmission::Invalid if !after_reload => CloseCode::TokenExpired,
        _ => CloseCode::Revoked,
    }
}
