//! JWT keys and verification settings, loaded from the policy (`auth.jwt`).
//!
//! Keys are loaded when the policy compiles, so a missing secret or an unreadable key file
//! refuses the policy instead of every handshake. HMAC and public-key algorithms never mix in
//! one policy: a verifier that accepts HS256 next to a public key is the classic algorithm
//! confusion (an attacker signs with the public key as an HMAC secret).
//!
//! Public-key families (RSA, EC, Ed) may mix in one JWKS, but every key verifies only the
//! algorithms of its own family that the policy allows (and, when the JWK names one, only its
//! `alg`): a token naming an EC key with an RS256 header is refused before any signature check.
//! Every allowed algorithm must have a key that can verify it.

use std::collections::HashSet;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

/// Shortest HMAC secret accepted, in bytes (RFC 7518 §3.2: at least the hash size).
pub(crate) const MIN_SECRET_BYTES: usize = 32;

/// The keys a policy verifies tokens with.
pub(crate) enum KeySet {
    /// One shared HMAC secret.
    Secret(DecodingKey),
    /// One public key from a PEM file.
    Public(DecodingKey),
    /// A JWKS: tokens name their key with `kid`; a set of one key also serves tokens without.
    Jwks(Vec<JwksKey>),
}

/// One key of a JWKS with the settings it verifies under.
pub(crate) struct JwksKey {
    /// The JWK's `kid`, which a token names in its header.
    pub kid: Option<String>,
    pub key: DecodingKey,
    /// The policy's validation narrowed to this key's algorithms: jsonwebtoken refuses a key
    /// when any listed algorithm is of another family, and a key must never be tried with one.
    pub validation: Validation,
}

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        match self {
            KeySet::Secret(_) => f.write_str("KeySet::Secret(..)"),
            KeySet::Public(_) => f.write_str("KeySet::Public(..)"),
            KeySet::Jwks(keys) => write!(f, "KeySet::Jwks({} keys)", keys.len()),
        }
    }
}

/// Claims jsonwebtoken itself knows how to require; any other required claim is checked by us.
const SPEC_CLAIMS: [&str; 5] = ["exp", "nbf", "iss", "aud", "sub"];

/// Verifies tokens under one policy.
#[derive(Debug)]
pub struct JwtVerifier {
    pub(crate) keys: KeySet,
    /// Algorithms, leeway, issuer, audience and the registered claims that must be present.
    pub(crate) validation: Validation,
    /// Required claims beyond the registered ones (`roles`, `tenant`): checked for presence.
    pub(crate) required_custom: Vec<String>,
}

/// Why a token was refused. Every variant maps to HTTP 401; the text is safe to show a client
/// (it never contains the token).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    /// Not a JWT, or claims that are not JSON.
    Malformed,
    /// The signature does not match any key.
    BadSignature,
    /// An algorithm the policy does not allow, or one that does not fit the key.
    WrongAlgorithm,
    /// `exp` is in the past.
    Expired,
    /// `nbf` is in the future.
    NotYetValid,
    /// `iss` is not the policy's issuer.
    WrongIssuer,
    /// `aud` is not the policy's audience.
    WrongAudience,
    /// A claim the policy requires is missing.
    MissingClaim,
    /// The token names a key (`kid`) the JWKS does not hold.
    UnknownKey,
}

impl TokenError {
    /// A short reason for the response body and the decision log.
    pub fn reason(self) -> &'static str {
        match self {
            TokenError::Malformed => "malformed token",
            TokenError::BadSignature => "bad signature",
            TokenError::WrongAlgorithm => "algorithm not allowed",
            TokenError::Expired => "token expired",
            TokenError::NotYetValid => "token not yet valid",
            TokenError::WrongIssuer => "wrong issuer",
            TokenError::WrongAudience => "wrong audience",
            TokenError::MissingClaim => "missing required claim",
            TokenError::UnknownKey => "unknown signing key",
        }
    }
}

impl JwtVerifier {
    /// Verifies a token's signature and standard claims, returning its claims.
    pub fn verify(&self, token: &str) -> Result<serde_json::Value, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(classify)?;
        if !self.validation.algorithms.contains(&header.alg) {
            return Err(TokenError::WrongAlgorithm);
        }
        let (key, validation) = match &self.keys {
            KeySet::Secret(key) | KeySet::Public(key) => (key, &self.validation),
            KeySet::Jwks(keys) => {
                let entry = match (&header.kid, keys.as_slice()) {
                    // Keys of different families may share a `kid` (RFC 7517 §4.5): take the one
                    // that may verify the token's `alg`.
                    (Some(kid), _) => {
                        let mut named = keys.iter().filter(|k| k.kid.as_deref() == Some(kid)).peekable();
                        if named.peek().is_none() {
                            return Err(TokenError::UnknownKey);
                        }
                        named
                            .find(|k| k.validation.algorithms.contains(&header.alg))
                            .ok_or(TokenError::WrongAlgorithm)?
                    }
                    (None, [only]) => only,
                    (None, _) => return Err(TokenError::UnknownKey),
                };
                (&entry.key, &entry.validation)
            }
        };
        // The key's own family and `alg` decide, not the policy's whole list.
        if !validation.algorithms.contains(&header.alg) {
            return Err(TokenError::WrongAlgorithm);
        }
        let data = jsonwebtoken::decode::<serde_json::Value>(token, key, validation).map_err(classify)?;
        let Some(claims) = data.claims.as_object() else {
            return Err(TokenError::Malformed);
        };
        if self.required_custom.iter().any(|c| !claims.contains_key(c)) {
            return Err(TokenError::MissingClaim);
        }
        Ok(data.claims)
    }
}

fn classify(e: jsonwebtoken::errors::Error) -> TokenError {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::InvalidSignature => TokenError::BadSignature,
        K::InvalidAlgorithm | K::InvalidAlgorithmName | K::UnsupportedAlgorithm => TokenError::WrongAlgorithm,
        K::ExpiredSignature => TokenError::Expired,
        K::ImmatureSignature => TokenError::NotYetValid,
        K::InvalidIssuer => TokenError::WrongIssuer,
        K::InvalidAudience => TokenError::WrongAudience,
        K::MissingRequiredClaim(_) => TokenError::MissingClaim,
        _ => TokenError::Malformed,
    }
}

/// What `auth.jwt` says, resolved against the environment and the file system.
pub(crate) struct JwtSettings<'a> {
    pub algorithms: &'a [String],
    /// Environment variable of the HMAC secret, if the policy names one.
    pub secret_env: Option<&'a str>,
    /// Whether `secret_env` was written in the file rather than defaulted.
    pub secret_env_written: bool,
    pub public_key_file: Option<&'a str>,
    pub jwks_file: Option<&'a str>,
    pub issuer: Option<&'a str>,
    pub audience: Option<&'a str>,
    pub leeway_secs: u64,
    pub required_claims: &'a [String],
}

/// Which setting a key problem is about, so the error points at the right key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyField {
    /// `auth.jwt.algorithms`.
    Algorithms,
    /// `auth.jwt.secret_env`.
    SecretEnv,
    /// `auth.jwt.public_key_file`.
    PublicKeyFile,
    /// `auth.jwt.jwks_file`.
    JwksFile,
}

/// Builds the verifier. `secret_lookup` reads an environment variable (injected so that
/// `serve --dev` can supply an ephemeral secret and tests need no process environment);
/// `read_file` reads a key file relative to the policy directory and records it for the
/// policy's content hash.
pub(crate) fn load(
    settings: &JwtSettings<'_>,
    secret_lookup: &dyn Fn(&str) -> Option<String>,
    read_file: &mut dyn FnMut(&str) -> Result<Vec<u8>, String>,
) -> Result<JwtVerifier, (KeyField, String)> {
    let mut algorithms = Vec::new();
    for name in settings.algorithms {
        let alg = Algorithm::from_str(name).map_err(|_| {
            (KeyField::Algorithms, "unknown algorithm (use HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384 or EdDSA)".to_string())
        })?;
        if !algorithms.contains(&alg) {
            algorithms.push(alg);
        }
    }
    if algorithms.is_empty() {
        return Err((KeyField::Algorithms, "at least one algorithm is required".into()));
    }
    let hmac = |a: &Algorithm| matches!(a, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512);
    let any_hmac = algorithms.iter().any(hmac);
    let any_public = algorithms.iter().any(|a| !hmac(a));
    if any_hmac && any_public {
        return Err((KeyField::Algorithms, "HMAC (HS*) and public-key algorithms cannot be mixed: a verifier that accepts both is open to algorithm confusion".into()));
    }
    let mut validation = Validation::new(algorithms[0]);
    validation.algorithms = algorithms;
    validation.leeway = settings.leeway_secs;
    validation.validate_exp = true;
    validation.validate_nbf = true;
    let (spec, custom): (Vec<&String>, Vec<&String>) =
        settings.required_claims.iter().partition(|c| SPEC_CLAIMS.contains(&c.as_str()));
    let mut required: HashSet<String> = spec.into_iter().cloned().collect();
    // A configured issuer or audience must also be present: jsonwebtoken alone only refuses a
    // token whose `iss`/`aud` differs, and would accept one that carries none.
    if let Some(iss) = settings.issuer {
        validation.set_issuer(&[iss]);
        required.insert("iss".into());
    }
    match settings.audience {
        Some(aud) => {
            validation.set_audience(&[aud]);
            required.insert("aud".into());
        }
        None => validation.validate_aud = false,
    }
    validation.required_spec_claims = required;
    let keys = if any_hmac {
        if settings.public_key_file.is_some() {
            return Err((KeyField::PublicKeyFile, "an HMAC algorithm is never allowed with a public key".into()));
        }
        if settings.jwks_file.is_some() {
            return Err((KeyField::JwksFile, "an HMAC algorithm is never allowed with a JWKS".into()));
        }
        let var = settings.secret_env.ok_or((
            KeyField::SecretEnv,
            "HMAC algorithms need `secret_env`, the environment variable holding the secret".to_string(),
        ))?;
        let secret = secret_lookup(var)
            .filter(|s| !s.is_empty())
            .ok_or((KeyField::SecretEnv, format!("{} is not set", shown_var(var))))?;
        if secret.len() < MIN_SECRET_BYTES {
            return Err((
                KeyField::SecretEnv,
                format!(
                    "the secret in {} is {} bytes; at least {MIN_SECRET_BYTES} are required",
                    shown_var(var),
                    secret.len()
                ),
            ));
        }
        KeySet::Secret(DecodingKey::from_secret(secret.as_bytes()))
    } else {
        if settings.secret_env_written {
            return Err((
                KeyField::SecretEnv,
                "`secret_env` is for HMAC algorithms; this policy allows only public-key algorithms".into(),
            ));
        }
        match (settings.public_key_file, settings.jwks_file) {
            (Some(_), Some(_)) => {
                return Err((KeyField::JwksFile, "give `public_key_file` or `jwks_file`, not both".into()));
            }
            (None, None) => {
                return Err((
                    KeyField::Algorithms,
                    "public-key algorithms need `public_key_file` or `jwks_file`".into(),
                ));
            }
            (Some(path), None) => {
                let pem = read_file(path).map_err(|e| (KeyField::PublicKeyFile, e))?;
                KeySet::Public(pem_key(&validation.algorithms, &pem).map_err(|e| (KeyField::PublicKeyFile, e))?)
            }
            (None, Some(path)) => {
                let text = read_file(path).map_err(|e| (KeyField::JwksFile, e))?;
                let set: JwkSet = serde_json::from_slice(&text).map_err(|e| (KeyField::JwksFile, jwks_error(&e)))?;
                KeySet::Jwks(jwks_keys(&set, &validation)?)
            }
        }
    };
    Ok(JwtVerifier { keys, validation, required_custom: custom.into_iter().cloned().collect() })
}

/// Each JWK with the policy's validation narrowed to the algorithms it may verify: those of
/// its family and, when the JWK names one (RFC 7517 `alg`), only that one. Every allowed
/// algorithm must be left to some key, or tokens of it could never verify.
fn jwks_keys(set: &JwkSet, validation: &Validation) -> Result<Vec<JwksKey>, (KeyField, String)> {
    let mut keys = Vec::new();
    for (i, jwk) in set.keys.iter().enumerate() {
        let key = DecodingKey::from_jwk(jwk).map_err(|e| (KeyField::JwksFile, format!("unusable key: {e}")))?;
        let declared = jwk.common.key_algorithm.map(Algorithm::try_from);
        let algorithms: Vec<Algorithm> = validation
            .algorithms
            .iter()
            .copied()
            .filter(|a| a.family() == key.family())
            .filter(|a| match &declared {
                None => true,
                Some(Ok(d)) => d == a,
                Some(Err(_)) => false,
            })
            .collect();
        if algorithms.is_empty() {
            // Named by position: a kid is a value from the file.
            return Err((KeyField::JwksFile, format!("key {i} fits none of the policy's algorithms")));
        }
        let mut narrowed = validation.clone();
        narrowed.algorithms = algorithms;
        keys.push(JwksKey { kid: jwk.common.key_id.clone(), key, validation: narrowed });
    }
    if keys.is_empty() {
        return Err((KeyField::JwksFile, "the JWKS holds no keys".into()));
    }
    if let Some(alg) = validation.algorithms.iter().find(|a| !keys.iter().any(|k| k.validation.algorithms.contains(a)))
    {
        return Err((
            KeyField::Algorithms,
            format!("{alg:?} is allowed, but no key in the JWKS can verify it: remove it, or add a key for it"),
        ));
    }
    Ok(keys)
}

fn pem_key(algorithms: &[Algorithm], pem: &[u8]) -> Result<DecodingKey, String> {
    use jsonwebtoken::AlgorithmFamily as F;
    if algorithms.iter().any(|a| a.family() != algorithms[0].family()) {
        return Err("one public key cannot serve algorithms of different families (RSA, EC, Ed)".into());
    }
    let key = match algorithms[0].family() {
        F::Rsa => DecodingKey::from_rsa_pem(pem),
        F::Ec => DecodingKey::from_ec_pem(pem),
        F::Ed => DecodingKey::from_ed_pem(pem),
        F::Hmac => return Err("HMAC algorithms take a secret, not a public key".into()),
    };
    key.map_err(|e| format!("not a usable PEM public key: {e}"))
}

/// Resolves a key file path: absolute as written, or relative to the policy directory.
pub(crate) fn key_path(dir: &Path, path: &str) -> std::path::PathBuf {
    let p = Path::new(path);
    if p.is_absolute() { p.to_path_buf() } else { dir.join(p) }
}

/// Why a JWKS file does not parse, by position: serde_json's message quotes the offending value.
fn jwks_error(e: &serde_json::Error) -> String {
    let what = match e.classify() {
        serde_json::error::Category::Data => "not a JWKS (a JSON object with a `keys` list of JWKs)",
        serde_json::error::Category::Eof => "not a JWKS: the JSON ends early",
        _ => "not a JWKS: not valid JSON",
    };
    format!("{what} (line {}, column {} of the file)", e.line(), e.column())
}

/// How an error names `secret_env`'s variable: by name only when that cannot be a secret pasted
/// there by mistake — it has the shape of a variable name and is shorter than any secret
/// accepted — since errors are logged and shown by the admin API.
fn shown_var(var: &str) -> String {
    let name_shaped = var.bytes().next().is_some_and(|b| b.is_ascii_uppercase() || b == b'_')
        && var.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
    if name_shaped && var.len() < MIN_SECRET_BYTES {
        format!("environment variable {var}")
    } else {
        "the environment variable `secret_env` names".to_string()
    }
}
