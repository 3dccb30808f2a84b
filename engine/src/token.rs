//! Minting tokens for development and tests (`wsgate token mint`): HS256 with a shared secret.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{EncodingKey, Header};
use serde_json::{Map, Value};

/// Builds and signs an HS256 token for `sub`, valid for `ttl` from `now`, with extra claims.
/// Claim values that parse as JSON (`roles=["a","b"]`, `n=3`) are used as JSON; others as
/// strings.
pub fn mint(
    secret: &[u8],
    sub: &str,
    ttl: Duration,
    claims: &[(String, String)],
    now: SystemTime,
) -> Result<String, String> {
    let iat = now.duration_since(UNIX_EPOCH).map_err(|_| "the clock is before 1970")?;
    let mut body = Map::new();
    for (k, v) in claims {
        let value = serde_json::from_str::<Value>(v).unwrap_or_else(|_| Value::String(v.clone()));
        body.insert(k.clone(), value);
    }
    body.insert("sub".into(), Value::String(sub.to_string()));
    body.insert("iat".into(), Value::from(iat.as_secs()));
    body.insert("exp".into(), Value::from((iat + ttl).as_secs()));
    jsonwebtoken::encode(&Header::default(), &Value::Object(body), &EncodingKey::from_secret(secret))
        .map_err(|e| format!("cannot sign the token: {e}"))
}
