//! Tokens a scenario presents: valid HS256 tokens signed with the harness's secret, and each
//! kind of bad token the gateway must refuse (expired, not yet valid, wrong signature, wrong
//! algorithm, `alg: none`, malformed, garbage).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Deserialize;
use serde_json::{Map, Value};

/// Which token a `connect` step presents.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenKind {
    /// A correct HS256 token: `sub`, `iat`, `exp` = now + ttl, plus the step's claims.
    #[default]
    Valid,
    /// No token at all.
    None,
    /// Correctly signed, but `exp` an hour ago (beyond any allowed leeway).
    Expired,
    /// Correctly signed, but `nbf` an hour from now.
    NotYetValid,
    /// Signed with another secret.
    BadSignature,
    /// Signed with the right secret but another HMAC algorithm (HS384 unless `algorithm` says).
    WrongAlgorithm,
    /// Header `{"alg":"none"}` and an empty signature.
    AlgNone,
    /// Three base64url segments, but the payload is not JSON.
    Malformed,
    /// A string that is not a JWT at all.
    Garbage,
}

/// What to put in a token.
#[derive(Debug, Clone)]
pub struct TokenSpec<'a> {
    /// The kind of token.
    pub kind: TokenKind,
    /// The `sub` claim (left out when `None`).
    pub sub: Option<&'a str>,
    /// Extra claims, merged over the defaults (`sub`, `iat`, `exp`, `nbf`).
    pub claims: &'a Map<String, Value>,
    /// Claims to remove after merging (e.g. `exp`).
    pub omit: &'a [String],
    /// Lifetime of a valid token.
    pub ttl: Duration,
    /// The algorithm for `wrong_algorithm` (`HS384` by default).
    pub algorithm: Option<Algorithm>,
    /// Sign a valid token with this ES256 key instead of the secret.
    pub key: Option<&'a SigningKey>,
}

/// A generated ES256 key pair a scenario signs tokens with; its public key goes into the
/// servers' policy directories.
pub struct SigningKey {
    /// The name, also the tokens' `kid`.
    pub name: String,
    encoding: EncodingKey,
    /// The public key, PEM (SubjectPublicKeyInfo).
    pub public_pem: String,
    /// A line of the private key's PEM, for the log leak check.
    pub private_marker: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("name", &self.name).finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A fresh P-256 key pair.
    pub fn generate(name: &str) -> Result<SigningKey, String> {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| format!("cannot generate signing key `{name}`: {e}"))?;
        let private_pem = pair.serialize_pem();
        let encoding =
            EncodingKey::from_ec_pem(private_pem.as_bytes()).map_err(|e| format!("signing key `{name}`: {e}"))?;
        let private_marker = private_pem.lines().find(|l| !l.starts_with("-----")).unwrap_or_default().to_string();
        Ok(SigningKey { name: name.to_string(), encoding, public_pem: pair.public_key_pem(), private_marker })
    }
}

/// Builds the token `spec` describes, signed with `secret`; `None` for [`TokenKind::None`].
pub fn mint(secret: &[u8], spec: &TokenSpec<'_>, now: SystemTime) -> Result<Option<String>, String> {
    let now_s = now.duration_since(UNIX_EPOCH).map_err(|_| "the clock is before 1970")?.as_secs();
    let (iat, exp, nbf) = match spec.kind {
        TokenKind::Expired => (now_s - 7200, now_s - 3600, None),
        TokenKind::NotYetValid => (now_s, now_s + 7200, Some(now_s + 3600)),
        _ => (now_s, now_s + spec.ttl.as_secs(), None),
    };
    let mut claims = Map::new();
    if let Some(sub) = spec.sub {
        claims.insert("sub".into(), Value::String(sub.to_string()));
    }
    claims.insert("iat".into(), Value::from(iat));
    claims.insert("exp".into(), Value::from(exp));
    if let Some(nbf) = nbf {
        claims.insert("nbf".into(), Value::from(nbf));
    }
    for (k, v) in spec.claims {
        claims.insert(k.clone(), v.clone());
    }
    for k in spec.omit {
        claims.remove(k);
    }
    let claims = Value::Object(claims);
    let sign = |alg: Algorithm, key: &[u8]| {
        jsonwebtoken::encode(&Header::new(alg), &claims, &EncodingKey::from_secret(key))
            .map_err(|e| format!("cannot sign a token: {e}"))
    };
    let token = match spec.kind {
        TokenKind::None => return Ok(None),
        TokenKind::Valid if spec.key.is_some() => {
            let key = spec.key.expect("checked by the guard");
            let mut header = Header::new(Algorithm::ES256);
            header.kid = Some(key.name.clone());
            jsonwebtoken::encode(&header, &claims, &key.encoding).map_err(|e| format!("cannot sign a token: {e}"))?
        }
        TokenKind::Valid | TokenKind::Expired | TokenKind::NotYetValid => sign(Algorithm::HS256, secret)?,
        TokenKind::BadSignature => sign(Algorithm::HS256, b"not-the-gateway-secret-but-32-bytes-long!")?,
        TokenKind::WrongAlgorithm => sign(spec.algorithm.unwrap_or(Algorithm::HS384), secret)?,
        TokenKind::AlgNone => {
            let header = b64url(br#"{"alg":"none","typ":"JWT"}"#);
            format!("{header}.{}.", b64url(claims.to_string().as_bytes()))
        }
        TokenKind::Malformed => {
            let header = b64url(br#"{"alg":"HS256","typ":"JWT"}"#);
            format!("{header}.{}.{}", b64url(b"this is not json"), b64url(b"not a signature"))
        }
        TokenKind::Garbage => "garbage-that-is-not-a-jwt".to_string(),
    };
    Ok(Some(token))
}

/// Parses an algorithm name as policies spell it (`HS384`).
pub fn parse_algorithm(name: &str) -> Result<Algorithm, String> {
    name.parse::<Algorithm>().map_err(|_| format!("`{name}` is not a JWT algorithm"))
}

/// Base64url without padding (RFC 7515), for hand-built tokens.
fn b64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-test";

    fn spec(kind: TokenKind, claims: &Map<String, Value>) -> TokenSpec<'_> {
        TokenSpec {
            kind,
            sub: Some("alice"),
            claims,
            omit: &[],
            ttl: Duration::from_secs(60),
            algorithm: None,
            key: None,
        }
    }

    fn decode(token: &str, alg: Algorithm) -> Result<Value, jsonwebtoken::errors::Error> {
        let mut v = Validation::new(alg);
        v.validate_nbf = true;
        v.leeway = 0;
        v.required_spec_claims.clear();
        jsonwebtoken::decode::<Value>(token, &DecodingKey::from_secret(SECRET), &v).map(|d| d.claims)
    }

    #[test]
    fn base64url_matches_rfc4648_vectors() {
        assert_eq!(b64url(b""), "");
        assert_eq!(b64url(b"f"), "Zg");
        assert_eq!(b64url(b"fo"), "Zm8");
        assert_eq!(b64url(b"foo"), "Zm9v");
        assert_eq!(b64url(b"foob"), "Zm9vYg");
        assert_eq!(b64url(&[0xfb, 0xff]), "-_8");
    }

    #[test]
    fn valid_token_carries_claims() {
        let mut extra = Map::new();
        extra.insert("roles".into(), serde_json::json!(["publisher"]));
        let t = mint(SECRET, &spec(TokenKind::Valid, &extra), SystemTime::now()).unwrap().unwrap();
        let claims = decode(&t, Algorithm::HS256).unwrap();
        assert_eq!(claims["sub"], "alice");
        assert_eq!(claims["roles"], serde_json::json!(["publisher"]));
        assert!(claims["exp"].as_u64().unwrap() > claims["iat"].as_u64().unwrap());
    }

    #[test]
    fn omitted_claims_are_removed() {
        let empty = Map::new();
        let omit = vec!["exp".to_string(), "sub".to_string()];
        let s = TokenSpec { omit: &omit, ..spec(TokenKind::Valid, &empty) };
        let t = mint(SECRET, &s, SystemTime::now()).unwrap().unwrap();
        let claims = decode(&t, Algorithm::HS256).unwrap();
        assert!(claims.get("exp").is_none() && claims.get("sub").is_none());
    }

    #[test]
    fn each_bad_kind_is_refused_by_a_strict_verifier() {
        let empty = Map::new();
        let now = SystemTime::now();
        for kind in [
            TokenKind::Expired,
            TokenKind::NotYetValid,
            TokenKind::BadSignature,
            TokenKind::WrongAlgorithm,
            TokenKind::AlgNone,
            TokenKind::Malformed,
            TokenKind::Garbage,
        ] {
            let t = mint(SECRET, &spec(kind, &empty), now).unwrap().unwrap();
            assert!(decode(&t, Algorithm::HS256).is_err(), "{kind:?} was accepted");
        }
        assert_eq!(mint(SECRET, &spec(TokenKind::None, &empty), now).unwrap(), None);
    }

    #[test]
    fn wrong_algorithm_is_a_valid_token_of_that_algorithm() {
        let empty = Map::new();
        let t = mint(SECRET, &spec(TokenKind::WrongAlgorithm, &empty), SystemTime::now()).unwrap().unwrap();
        assert!(decode(&t, Algorithm::HS384).is_ok());
        let s =
            TokenSpec { algorithm: Some(parse_algorithm("HS512").unwrap()), ..spec(TokenKind::WrongAlgorithm, &empty) };
        let t = mint(SECRET, &s, SystemTime::now()).unwrap().unwrap();
        assert!(decode(&t, Algorithm::HS512).is_ok());
    }
}
