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
