//! Tokens in a handshake: where to find one (the policy's `auth.token_sources`, in order),
//! whether it admits a connection ([`admit`]: the same decision for a handshake, a
//! re-authentication, an `auth` message and a policy reload), when it stops being valid, and
//! what of the request connect rules may see.
//!
//! A token is a bearer credential: it is never logged, never echoed and never shown to CEL.
//! [`request_info`] therefore strips every place a token could be (the token's query
//! parameter, `Authorization`, `Cookie`, any header named as a source, and `bearer.*`
//! subprotocols) before the request becomes `request` in connect rules.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::close::Readmission;
use crate::http::Request;
use crate::policy::compiled::{Policy, TokenSource};
use crate::policy::decision::{ConnLimits, RequestInfo, Scheme, Verdict};
use crate::policy::decision::{Denial, LimitError};
use crate::policy::expr::eval::EvalError;
use crate::policy::keys::TokenError;

/// The subprotocol wsgate speaks; clients that send a token as a subprotocol offer it too.
pub const SUBPROTOCOL: &str = "wsgate.v1";
/// The prefix of a token offered as a subprotocol: `bearer.<token>`.
pub const SUBPROTOCOL_TOKEN_PREFIX: &str = "bearer.";
/// Most query parameters or headers passed to connect rules; the head is bounded anyway.
const MAX_REQUEST_PAIRS: usize = 64;

/// The first non-empty token found in `request`, trying `sources` in order.
pub fn find_token(request: &Request, sources: &[TokenSource]) -> Option<String> {
    sources.iter().find_map(|source| token_from(request, source)).filter(|t| !t.is_empty())
}

fn token_from(request: &Request, source: &TokenSource) -> Option<String> {
    match source {
        TokenSource::Query(name) => {
            request.query_pairs().into_iter().find(|(k, v)| k == name && !v.is_empty()).map(|(_, v)| v)
        }
        TokenSource::Header(name) if name == "authorization" => {
            let value = request.header("authorization")?.trim();
            let (scheme, token) = value.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_string()).filter(|t| !t.is_empty())
        }
        TokenSource::Header(name) => request.header(name).map(|v| v.trim().to_string()).filter(|t| !t.is_empty()),
        TokenSource::Cookie(name) => cookies(request).find(|(k, v)| k == name && !v.is_empty()).map(|(_, v)| v.into()),
        TokenSource::Subprotocol => request
            .header_tokens("sec-websocket-protocol")
            .find_map(|p| p.strip_prefix(SUBPROTOCOL_TOKEN_PREFIX))
            .filter(|t| !t.is_empty())
            .map(str::to_string),
    }
}

fn cookies(request: &Request) -> impl Iterator<Item = (&str, &str)> {
    request
        .headers
        .iter()
        .filter(|(n, _)| n == "cookie")
        .flat_map(|(_, v)| v.split(';'))
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.trim(), v.trim().trim_matches('"')))
}

/// The subprotocols a client offered, in order.
pub fn offered_subprotocols(request: &Request) -> Vec<&str> {
    request.header_tokens("sec-websocket-protocol").filter(|p| !p.is_empty()).collect()
}

/// The request of a client at `ip` that connected with `scheme`, as connect rules see it, with
/// every token-bearing part removed.
pub fn request_info(request: &Request, ip: IpAddr, scheme: Scheme, sources: &[TokenSource]) -> RequestInfo {
    let token_query: Vec<&str> = sources
        .iter()
        .filter_map(|s| match s {
            TokenSource::Query(name) => Some(name.as_str()),
            _ => None,
        })
        .collect();
    let token_header = |name: &str| {
        matches!(name, "authorization" | "cookie" | "proxy-authorization")
            || sources.iter().any(|s| matches!(s, TokenSource::Header(h) if h == name))
    };
    // The upgrade's own mechanics say nothing a rule could use, and the request is kept for
    // the connection's life (re-authentication): leave them out.
    let mechanics = |name: &str| {
        matches!(
            name,
            "connection" | "upgrade" | "sec-websocket-key" | "sec-websocket-version" | "sec-websocket-extensions"
        )
    };
    let query = request
        .query_pairs()
        .into_iter()
        .filter(|(k, _)| !token_query.contains(&k.as_str()))
        .take(MAX_REQUEST_PAIRS)
        .collect();
    let headers = request
        .headers
        .iter()
        .filter(|(n, _)| !token_header(n) && !mechanics(n))
        .filter_map(|(n, v)| {
            if n != "sec-websocket-protocol" {
                return Some((n.clone(), v.clone()));
            }
            let kept: Vec<&str> = v
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty() && !p.starts_with(SUBPROTOCOL_TOKEN_PREFIX))
                .collect();
            (!kept.is_empty()).then(|| (n.clone(), kept.join(", ")))
        })
        .take(MAX_REQUEST_PAIRS)
        .collect();
    RequestInfo {
        ip,
        scheme,
        origin: request.header("origin").map(str::to_string),
        path: request.path.clone(),
        query,
        headers,
    }
}

/// When a token stops being valid: its `exp` plus the policy's leeway, the same instant the
/// verifier starts refusing it. `None` for a token without `exp` (a policy that does not
/// require one).
pub fn expiry(claims: &serde_json::Value, leeway: Duration) -> Option<SystemTime> {
    let exp = claims.get("exp")?;
    let secs = exp.as_u64().or_else(|| exp.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))?;
    UNIX_EPOCH.checked_add(Duration::from_secs(secs))?.checked_add(leeway)
}

/// A token that admits a connection.
#[derive(Debug)]
pub struct Admission {
    /// The user id (`auth.user_id`).
    pub user: String,
    /// The verified claims.
    pub claims: serde_json::Value,
    /// When the token stops being valid (`exp` + leeway).
    pub expires: Option<SystemTime>,
    /// The connection's limits.
    pub limits: ConnLimits,
}

/// Why a token does not admit a connection.
#[derive(Debug)]
pub enum NotAdmitted {
    /// The token does not verify.
    Token(TokenError),
    /// It verifies, but for another user than the connection's.
    OtherUser,
    /// A connect rule refuses it.
    Rule {
        denial: Denial,
        /// The user id, when it could be determined.
        user: Option<String>,
    },
    /// `auth.user_id` could not be evaluated.
    NoUser(EvalError),
    /// The user's tokens up to this one's `iat` were revoked.
    Revoked { user: String },
    /// The connection's limits could not be evaluated.
    Limits {
        user: String,
        /// Which limit, and why.
        error: LimitError,
    },
}

impl NotAdmitted {
    /// What a client is told (never the token or a value from it).
    pub fn reason(&self) -> String {
        match self {
            NotAdmitted::Token(e) => e.reason().to_string(),
            NotAdmitted::OtherUser => "the token is for another user".into(),
            NotAdmitted::NoUser(_) => "the user id could not be determined".into(),
            NotAdmitted::Revoked { .. } => "token revoked".into(),
            NotAdmitted::Rule { denial, .. } => denial.reason.to_string(),
            NotAdmitted::Limits { error, .. } => format!("{} could not be evaluated", error.key),
        }
    }

    /// What it means for a live connection's close code.
    pub fn readmission(&self) -> Readmission {
        match self {
            NotAdmitted::Token(TokenError::Expired) => Readmission::Expired,
            NotAdmitted::Token(_) | NotAdmitted::OtherUser | NotAdmitted::NoUser(_) => Readmission::Invalid,
            _ => Readmission::Refused,
        }
    }

    /// The connect rule that refused, if one did.
    pub fn rule(&self) -> Option<&Denial> {
        match self {
            NotAdmitted::Rule { denial, .. } => Some(denial),
            _ => None,
        }
    }
}

/// Decides whether `token` admits a connection under `policy`, in SPEC §3's order: JWT →
/// connect rules → user id → revocation → limits. With `expected_user` (a live connection
/// checking itself again), a token for anyone else is refused right after the JWT. Where the
/// token came from, the origin and the per-address and per-user counts are the caller's.
/// Also returns the audit-mode connect rules that would have refused (empty when the rules did
/// not run).
pub fn admit(
    policy: &Policy,
    token: &str,
    request: &RequestInfo,
    expected_user: Option<&str>,
    revocations: &Revocations,
    now: SystemTime,
) -> (Result<Admission, NotAdmitted>, Vec<Denial>) {
    let claims = match policy.auth.jwt.verify(token) {
        Ok(claims) => claims,
        Err(e) => return (Err(NotAdmitted::Token(e)), Vec::new()),
    };
    let scope = policy.handshake_scope(&claims, request, now);
    if let Some(expected) = expected_user {
        match scope.user_id() {
            Ok(user) if user == expected => {}
            Ok(_) => return (Err(NotAdmitted::OtherUser), Vec::new()),
            Err(e) => return (Err(NotAdmitted::NoUser(e)), Vec::new()),
        }
    }
    let Verdict { denied, audit } = scope.connect_rules();
    if let Some(denial) = denied {
        return (Err(NotAdmitted::Rule { denial, user: scope.user_id().ok() }), audit);
    }
    let user = match scope.user_id() {
        Ok(user) => user,
        Err(e) => return (Err(NotAdmitted::NoUser(e)), audit),
    };
    if revocations.is_revoked(&user, &claims, now) {
        return (Err(NotAdmitted::Revoked { user }), audit);
    }
    let limits = match scope.limits() {
        Ok(limits) => limits,
        Err(error) => return (Err(NotAdmitted::Limits { user, error }), audit),
    };
    drop(scope);
    let expires = expiry(&claims, Duration::from_secs(policy.auth.jwt.validation.leeway));
    (Ok(Admission { user, claims, expires, limits }), audit)
}

/// Revoked tokens, by user: `POST /v1/disconnect` with `revoke_tokens` refuses every token of
/// that user issued before the call.
///
/// `iat` has whole seconds, so "before the call" cannot be told apart from "in the same second
/// after it": every token whose `iat` falls in or before the second of the revocation is
/// refused, and so is a token without `iat`. A client must get a new token at least a second
/// after a revocation. A revocation is kept for `ttl` (the longest token lifetime the operator
/// issues), after which every token it refused has expired anyway.
#[derive(Debug)]
pub struct Revocations {
    /// User → (revoked at, forget after).
    users: Mutex<HashMap<String, (SystemTime, SystemTime)>>,
    /// How long a revocation lasts.
    ttl: Duration,
}

impl Revocations {
    /// Revocations that last `ttl`.
    pub fn new(ttl: Duration) -> Revocations {
        Revocations { users: Mutex::default(), ttl }
    }

    /// Revokes every token of `user` issued up to `at`.
    pub fn revoke(&self, user: &str, at: SystemTime) {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        users.retain(|_, (_, until)| *until > at);
        users.insert(user.to_string(), (at, at + self.ttl));
    }

    /// Records a revocation made elsewhere (another instance, or Redis at start-up): every
    /// token of `user` issued up to `at` is refused until `until`. A later revocation of the
    /// same user is kept over an earlier one.
    pub fn insert(&self, user: &str, at: SystemTime, until: SystemTime) {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let now = SystemTime::now();
        users.retain(|_, (_, until)| *until > now);
        match users.get(user) {
            Some((known, _)) if *known >= at => {}
            _ => {
                users.insert(user.to_string(), (at, until));
            }
        }
    }

    /// Whether `claims` (of `user`) were issued before a revocation still in force at `now`.
    pub fn is_revoked(&self, user: &str, claims: &serde_json::Value, now: SystemTime) -> bool {
        let users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let Some((at, until)) = users.get(user) else { return false };
        if now >= *until {
            return false;
        }
        let revoked_second = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        match claims.get("iat").and_then(serde_json::Value::as_f64) {
            Some(iat) if iat >= 0.0 => (iat.floor() as u64) <= revoked_second,
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(target: &str, headers: &[(&str, &str)]) -> Request {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        Request {
            method: "GET".into(),
            path: path.into(),
            query: query.into(),
            headers: headers.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect(),
            rest: vec![],
        }
    }

    fn all() -> Vec<TokenSource> {
        vec![
            TokenSource::Query("token".into()),
            TokenSource::Header("authorization".into()),
            TokenSource::Cookie("wsgate_token".into()),
            TokenSource::Subprotocol,
        ]
    }

    #[test]
    fn sources_are_tried_in_order() {
        let r = request(
            "/ws?token=q",
            &[
                ("authorization", "Bearer h"),
                ("cookie", "a=1; wsgate_token=c"),
                ("sec-websocket-protocol", "wsgate.v1, bearer.s"),
            ],
        );
        assert_eq!(find_token(&r, &all()).as_deref(), Some("q"));
        let mut reversed = all();
        reversed.reverse();
        assert_eq!(find_token(&r, &reversed).as_deref(), Some("s"));
        assert_eq!(find_token(&r, &all()[1..2]).as_deref(), Some("h"));
        assert_eq!(find_token(&r, &all()[2..3]).as_deref(), Some("c"));
    }

    #[test]
    fn empty_or_foreign_values_are_not_tokens() {
        let r = request("/ws?token=", &[("authorization", "Basic abc"), ("cookie", "wsgate_token=")]);
        assert_eq!(find_token(&r, &all()), None);
        let r = request("/ws", &[("authorization", "bearer  t1 ")]);
        assert_eq!(find_token(&r, &all()).as_deref(), Some("t1"), "the scheme is case-insensitive");
    }

    #[test]
    fn connect_rules_never_see_a_token() {
        let r = request(
            "/ws?token=SECRET&room=7",
            &[
                ("authorization", "Bearer SECRET"),
                ("cookie", "wsgate_token=SECRET"),
                ("x-api-token", "SECRET"),
                ("sec-websocket-protocol", "wsgate.v1, bearer.SECRET"),
                ("user-agent", "t"),
            ],
        );
        let mut sources = all();
        sources.push(TokenSource::Header("x-api-token".into()));
        let info = request_info(&r, "127.0.0.1".parse().unwrap(), Scheme::Ws, &sources);
        let seen = format!("{info:?}");
        assert!(!seen.contains("SECRET"), "{seen}");
        assert_eq!(info.query, vec![("room".to_string(), "7".to_string())]);
        assert!(info.headers.contains(&("sec-websocket-protocol".into(), "wsgate.v1".into())));
        assert!(info.headers.contains(&("user-agent".into(), "t".into())));
    }

    #[test]
    fn revocation_covers_the_whole_second_and_tokens_without_iat() {
        let r = Revocations::new(Duration::from_secs(3600));
        let at = UNIX_EPOCH + Duration::from_millis(100_700);
        r.revoke("alice", at);
        let now = at + Duration::from_secs(1);
        let iat = |secs: f64| serde_json::json!({"iat": secs});
        assert!(r.is_revoked("alice", &iat(99.0), now));
        assert!(r.is_revoked("alice", &iat(100.0), now), "minted in the same second, before the call");
        assert!(!r.is_revoked("alice", &iat(101.0), now));
        assert!(r.is_revoked("alice", &serde_json::json!({}), now), "no iat: refused");
        assert!(!r.is_revoked("bob", &iat(50.0), now));
        assert!(!r.is_revoked("alice", &iat(50.0), at + Duration::from_secs(3601)), "expired revocation");
    }

    #[test]
    fn a_revocation_from_elsewhere_keeps_the_later_one() {
        let r = Revocations::new(Duration::from_secs(60));
        let now = SystemTime::now();
        let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_secs() as f64;
        let later = now - Duration::from_secs(5);
        let earlier = now - Duration::from_secs(50);
        r.insert("alice", later, now + Duration::from_secs(60));
        r.insert("alice", earlier, now + Duration::from_secs(60));
        let iat = serde_json::json!({"iat": secs(later) - 1.0});
        assert!(r.is_revoked("alice", &iat, now), "the earlier revocation did not replace the later one");
        r.insert("bob", earlier, now - Duration::from_secs(1));
        assert!(!r.is_revoked("bob", &serde_json::json!({}), now), "a lapsed revocation refuses nothing");
    }

    #[test]
    fn expiry_is_exp_plus_leeway() {
        let claims = serde_json::json!({"exp": 100});
        assert_eq!(expiry(&claims, Duration::from_secs(5)), Some(UNIX_EPOCH + Duration::from_secs(105)));
        assert_eq!(expiry(&serde_json::json!({}), Duration::ZERO), None);
    }
}
