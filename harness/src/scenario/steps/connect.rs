//! `connect`: the handshake — which token, where it goes, what the refusal or the welcome must
//! look like.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::duration::Dur;
use crate::fixtures::policy_dir::deep_merge;
use crate::fixtures::token::{self, TokenKind, TokenSpec};
use crate::matching::{Saved, brief, clip, matches, matches_saving};
use crate::runner::ctx::{ConnState, RunCtx, deadline, parse_json};
use crate::scenario::check::{CheckCtx, check_origin, check_pattern, valid_name};
use crate::scenario::kind::{StepKind, about};
use crate::wire::client::{self, Event, Handshake, Outcome, ReadMode};

/// Where a `connect` step puts its token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Via {
    /// `?token=…` (or `?<token_name>=…`).
    #[default]
    Query,
    /// `Authorization: Bearer …` (or `<token_name>: Bearer …`).
    Header,
    /// `Cookie: wsgate_token=…` (or `<token_name>=…`).
    Cookie,
    /// `Sec-WebSocket-Protocol: wsgate.v1, bearer.<token>`.
    Subprotocol,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct ConnectStep {
    /// The connection's name in later steps (default: the user).
    pub(crate) name: Option<String>,
    /// Which server (default: the only one).
    pub(crate) server: Option<String>,
    /// The token's `sub` (default: the connection's name).
    #[serde(alias = "sub")]
    pub(crate) user: Option<String>,
    /// Extra claims, merged over `sub`/`iat`/`exp`.
    pub(crate) claims: Map<String, Value>,
    /// Claims to leave out of the token.
    pub(crate) omit_claims: Vec<String>,
    /// Which token to present.
    pub(crate) token: TokenKind,
    /// The algorithm of a `wrong_algorithm` token (default HS384).
    pub(crate) algorithm: Option<String>,
    /// A valid token's lifetime (default 15m).
    pub(crate) ttl: Option<Dur>,
    /// Where the token goes.
    pub(crate) via: Via,
    /// The query parameter, header or cookie name for the token.
    pub(crate) token_name: Option<String>,
    /// Sign a valid token with this scenario signing key (ES256, `kid` = the name) instead
    /// of the HS256 secret.
    pub(crate) signing_key: Option<String>,
    /// The `Origin` header.
    pub(crate) origin: Option<String>,
    /// The request path (default `/ws`).
    pub(crate) path: Option<String>,
    /// Extra query parameters.
    pub(crate) query: BTreeMap<String, String>,
    /// Extra request headers.
    pub(crate) headers: BTreeMap<String, String>,
    /// After the welcome, stop reading (never answer pings) until a later step reads.
    pub(crate) silent: bool,
    /// The handshake must be refused with this status.
    pub(crate) expect_status: Option<u16>,
    /// The refusal body's `error` must be this.
    pub(crate) expect_error: Option<String>,
    /// The refusal body must match this JSON subset.
    pub(crate) expect_body: Option<Value>,
    /// The refusal must (true) or must not (false) carry `Retry-After` (whole seconds ≥ 1).
    pub(crate) retry_after: Option<bool>,
    /// Extra fields the welcome frame must match.
    pub(crate) expect_welcome: Option<Value>,
    /// Deadline for the handshake and the welcome (default 5s).
    pub(crate) within: Option<Dur>,
    /// Connect from this loopback address (127.0.0.2, …): another client address.
    pub(crate) from: Option<Ipv4Addr>,
    /// Connect through the server's HAProxy instead of to wsgate itself.
    pub(crate) proxied: bool,
}

impl StepKind for ConnectStep {
    about!(server);

    fn conn(&self) -> Option<&str> {
        self.name.as_deref()
    }

    fn check_keys(&mut self, ctx: &mut CheckCtx) -> Result<(), String> {
        let s = self;
        check_origin(s.from, s.proxied, s.server.as_deref(), &ctx.servers)?;
        for pattern in [&s.expect_welcome, &s.expect_body].into_iter().flatten() {
            check_pattern(pattern, &mut ctx.saved)?;
        }
        if s.name.is_none() {
            s.name = s.user.clone();
        }
        if s.user.is_none() && s.token != TokenKind::None {
            s.user = s.name.clone();
        }
        if let Some(alg) = &s.algorithm {
            token::parse_algorithm(alg)?;
            if s.token != TokenKind::WrongAlgorithm {
                return Err("`algorithm` only goes with `token: wrong_algorithm`".into());
            }
        }
        if let Some(key) = &s.signing_key {
            if !ctx.servers.keys.contains(key) {
                return Err(format!("signing key `{key}` is not in the scenario's `signing_keys`"));
            }
            if s.token != TokenKind::Valid {
                return Err("`signing_key` signs a valid token; it does not go with `token`".into());
            }
        }
        if let Some(path) = &s.path
            && !path.starts_with('/')
        {
            return Err(format!("`path` must start with `/`: `{path}`"));
        }
        match s.expect_status {
            Some(status) => {
                if status == 101 || !(100..600).contains(&status) {
                    return Err(format!("`expect_status: {status}` is not a refusal status"));
                }
                if s.silent || s.expect_welcome.is_some() {
                    return Err("`silent` and `expect_welcome` need an accepted connection".into());
                }
            }
            None => {
                if s.expect_error.is_some() || s.expect_body.is_some() || s.retry_after.is_some() {
                    return Err("`expect_error`, `expect_body` and `retry_after` need `expect_status`".into());
                }
                let name = s.name.clone().ok_or("an accepted connection needs a `name` or a `user`")?;
                if !valid_name(&name) {
                    return Err(format!("connection name `{name}`: use letters, digits, `-`, `_`, `.`, `:`"));
                }
                ctx.conns.insert(name);
            }
        }
        Ok(())
    }

    async fn run(&self, ctx: &mut RunCtx<'_>) -> Result<(), String> {
        let s = self;
        let index = ctx.index;
        let name = s.name.clone().unwrap_or_default();
        if s.expect_status.is_none()
            && let Some(existing) = ctx.conns.get(&name)
            && !existing.ended
        {
            return Err(format!(
                "connection `{name}` is still open (no close or drop was expected on it); give the new one another name"
            ));
        }
        let state = ctx.server(&s.server);
        let (ws_addr, tls) = state.route(s.proxied)?;
        let algorithm = s.algorithm.as_deref().map(token::parse_algorithm).transpose()?;
        let spec = TokenSpec {
            kind: s.token,
            sub: s.user.as_deref(),
            claims: &s.claims,
            omit: &s.omit_claims,
            ttl: s.ttl.map_or(Duration::from_secs(15 * 60), |d| d.0),
            algorithm,
            key: s.signing_key.as_ref().and_then(|k| ctx.signing_keys.get(k)),
        };
        let token = token::mint(ctx.credentials.jwt_secret.as_bytes(), &spec, SystemTime::now())?;
        if let Some(t) = &token {
            ctx.redactor.register(format!("the token of step {}", index + 1), t.clone());
        }

        // SPEC §2: logs never contain a query string either; long values are distinctive enough
        // to look for.
        for (k, v) in &s.query {
            ctx.redactor.register(format!("the query parameter `{k}` of step {}", index + 1), v.clone());
        }
        let mut query: Vec<(String, String)> = s.query.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let mut headers: Vec<(String, String)> = Vec::new();
        if let Some(origin) = &s.origin {
            headers.push(("Origin".into(), origin.clone()));
        }
        match (s.via, &token) {
            (Via::Query, Some(t)) => query.push((s.token_name.clone().unwrap_or("token".into()), t.clone())),
            (Via::Header, Some(t)) => {
                headers.push((s.token_name.clone().unwrap_or("Authorization".into()), format!("Bearer {t}")))
            }
            (Via::Cookie, Some(t)) => {
                headers.push(("Cookie".into(), format!("{}={t}", s.token_name.as_deref().unwrap_or("wsgate_token"))))
            }
            (Via::Subprotocol, Some(t)) => {
                headers.push(("Sec-WebSocket-Protocol".into(), format!("wsgate.v1, bearer.{t}")))
            }
            (Via::Subprotocol, None) => headers.push(("Sec-WebSocket-Protocol".into(), "wsgate.v1".into())),
            (_, None) => {}
        }
        headers.extend(s.headers.iter().map(|(k, v)| (k.clone(), v.clone())));
        let mut path_and_query = s.path.clone().unwrap_or("/ws".into());
        for (i, (k, v)) in query.iter().enumerate() {
            path_and_query.push(if i == 0 && !path_and_query.contains('?') { '?' } else { '&' });
            path_and_query.push_str(&format!("{}={}", percent_encode(k), percent_encode(v)));
        }
        let (until, within) = deadline(s.within);
        let from = s.from.map(IpAddr::V4);
        let handshake = Handshake { addr: ws_addr, path_and_query, headers, timeout: within.0, tls, from };
        let mode = if s.silent { ReadMode::PauseAfterFirstFrame } else { ReadMode::Reading };
        let leaks_token = |text: &str| token.as_deref().is_some_and(|t| text.contains(t));

        match (client::connect(&handshake, mode).await?, s.expect_status) {
            (Outcome::Refused { status, headers, body }, Some(want)) => {
                let body_text = String::from_utf8_lossy(&body).into_owned();
                if status != want {
                    return Err(format!(
                        "expected the handshake to be refused with {want}, got {status} {}",
                        clip(&body_text, 300)
                    ));
                }
                if leaks_token(&body_text) || headers.iter().any(|(_, v)| leaks_token(v)) {
                    return Err("the refusal contains the token".into());
                }
                check_refusal(s, &headers, &body_text, &mut ctx.saved)
            }
            (Outcome::Refused { status, body, .. }, None) => Err(format!(
                "expected the handshake to be accepted, got {status} {}",
                clip(&String::from_utf8_lossy(&body), 300)
            )),
            (Outcome::Accepted { .. }, Some(want)) => {
                Err(format!("expected the handshake to be refused with {want}, but the server upgraded the connection"))
            }
            (Outcome::Accepted { mut conn, headers }, None) => {
                if let Some((name, _)) = headers.iter().find(|(_, v)| leaks_token(v)) {
                    return Err(format!("the 101 response's `{name}` header contains the token"));
                }
                if s.via == Via::Subprotocol {
                    let answered = headers.iter().find(|(k, _)| k == "sec-websocket-protocol").map(|(_, v)| v.as_str());
                    if answered != Some("wsgate.v1") {
                        return Err(format!("expected the server to answer subprotocol `wsgate.v1`, got {answered:?}"));
                    }
                }
                let mut pattern = json!({
                    "type": "welcome",
                    "session": "$nonempty",
                    "user": s.user.clone().unwrap_or_default(),
                    "instance": "$string",
                    "heartbeat_ms": "$number",
                });
                if let Some(extra) = &s.expect_welcome {
                    deep_merge(&mut pattern, extra);
                }
                let first = conn.next_event(until).await;
                let mut state = ConnState { conn, ended: false };
                match first {
                    None => return Err(format!("no welcome frame within {within}")),
                    Some(Event::Text(text)) => {
                        let value = parse_json(&text).map_err(|e| format!("expected the welcome frame, got {e}"))?;
                        matches_saving(&pattern, &value, &mut ctx.saved)
                            .map_err(|e| format!("the welcome frame {}: {e}", brief(&value)))?;
                    }
                    Some(other) => {
                        state.ended = other.is_end();
                        return Err(format!("expected the welcome frame, got {}", other.describe()));
                    }
                }
                ctx.conns.insert(name, state);
                Ok(())
            }
        }
    }
}

fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Checks a refusal against SPEC §3 (a JSON body with `error` and `reason`) and the step.
fn check_refusal(s: &ConnectStep, headers: &[(String, String)], body: &str, saved: &mut Saved) -> Result<(), String> {
    let value: Value = serde_json::from_str(body)
        .map_err(|_| format!("expected a JSON body {{\"error\", \"reason\"}} (SPEC §3), got {}", clip(body, 300)))?;
    matches(&json!({"error": "$string", "reason": "$string"}), &value)
        .map_err(|e| format!("the refusal body {} does not have the shape of SPEC §3: {e}", brief(&value)))?;
    if let Some(want) = &s.expect_error {
        matches(&json!({ "error": want }), &value).map_err(|e| format!("the refusal body {}: {e}", brief(&value)))?;
    }
    if let Some(pattern) = &s.expect_body {
        matches_saving(pattern, &value, saved).map_err(|e| format!("the refusal body {}: {e}", brief(&value)))?;
    }
    let retry_after = headers.iter().find(|(k, _)| k == "retry-after").map(|(_, v)| v.trim());
    match (s.retry_after, retry_after) {
        (Some(true), None) => Err("expected a Retry-After header, got none".into()),
        (Some(true), Some(v)) if !v.parse::<u64>().is_ok_and(|n| n >= 1) => {
            Err(format!("expected Retry-After to be whole seconds ≥ 1, got {v:?}"))
        }
        (Some(false), Some(v)) => Err(format!("expected no Retry-After header, got {v:?}")),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_encodes_query_values() {
        assert_eq!(percent_encode("a.b-c_d~e"), "a.b-c_d~e");
        assert_eq!(percent_encode("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
    }

    fn connect_step(yaml: &str) -> ConnectStep {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn refusals_must_have_the_spec_shape() {
        let s = connect_step("{user: a, expect_status: 429, expect_error: too_many_requests, retry_after: true}");
        let ok = r#"{"error":"too_many_requests","reason":"per-IP limit"}"#;
        let retry = vec![("retry-after".to_string(), "3".to_string())];
        assert!(check_refusal(&s, &retry, ok, &mut Saved::new()).is_ok());
        assert!(check_refusal(&s, &[], ok, &mut Saved::new()).unwrap_err().contains("Retry-After"));
        let zero = vec![("retry-after".to_string(), "0".to_string())];
        assert!(check_refusal(&s, &zero, ok, &mut Saved::new()).is_err());
        assert!(check_refusal(&s, &retry, "nope", &mut Saved::new()).unwrap_err().contains("SPEC §3"));
        assert!(
            check_refusal(&s, &retry, r#"{"error":"too_many_requests"}"#, &mut Saved::new())
                .unwrap_err()
                .contains(".reason")
        );
        assert!(
            check_refusal(&s, &retry, r#"{"error":"forbidden","reason":"x"}"#, &mut Saved::new())
                .unwrap_err()
                .contains(".error")
        );
    }
}
