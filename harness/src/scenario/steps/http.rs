//! `http`: one request to a listener, and the admin credentials it (or a `publish`) carries.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use tokio::time::Instant;

use crate::duration::Dur;
use crate::matching::{Saved, brief, clip, matches_saving};
use crate::process::supervisor::Credentials;
use crate::runner::ctx::{DEFAULT_WITHIN, RunCtx};
use crate::scenario::check::{CheckCtx, check_origin, check_pattern, exactly_one};
use crate::scenario::kind::{StepKind, about};
use crate::wire::http::{self, HttpError, HttpRequest, HttpResponse, Origin};

/// Which admin credentials a request carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum AdminAuth {
    /// `Authorization: Bearer <the admin token>`.
    #[default]
    Valid,
    /// No `Authorization` header.
    None,
    /// A bearer token that is not the admin token.
    Wrong,
}

/// Which listener an `http` step talks to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Listener {
    /// The public WebSocket listener.
    #[default]
    Ws,
    /// The admin listener.
    Admin,
}

/// A PROXY protocol header an `http` step sends before its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ProxyHeader {
    /// v2 `LOCAL`: the connection is the proxy's own, as HAProxy's health checks send it.
    Local,
}

impl ProxyHeader {
    fn bytes(self) -> Vec<u8> {
        match self {
            ProxyHeader::Local => {
                let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
                h.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
                h
            }
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HttpStep {
    pub(crate) server: Option<String>,
    /// Which listener (default ws).
    #[serde(default)]
    pub(crate) listener: Listener,
    /// The method (default GET).
    pub(crate) method: Option<String>,
    /// Path and query.
    pub(crate) path: String,
    /// Extra headers.
    #[serde(default)]
    pub(crate) headers: BTreeMap<String, String>,
    pub(crate) json: Option<Value>,
    pub(crate) text: Option<String>,
    /// Admin credentials (default none).
    pub(crate) auth: Option<AdminAuth>,
    /// To the public listener of a `tls` server: plain TCP instead of TLS.
    #[serde(default)]
    pub(crate) plaintext: bool,
    pub(crate) expect_status: Option<u16>,
    /// Instead of a status: the server must end the connection without an HTTP response.
    #[serde(default)]
    pub(crate) expect_no_response: bool,
    /// The body is JSON matching this subset.
    pub(crate) expect_body: Option<Value>,
    /// The body contains this text.
    pub(crate) expect_text: Option<String>,
    /// Headers that must be present; the value must contain the given text.
    #[serde(default)]
    pub(crate) expect_headers: BTreeMap<String, String>,
    /// Repeat the request until it matches, up to this long (for state that settles).
    pub(crate) retry_within: Option<Dur>,
    /// Connect from this loopback address (127.0.0.2, …).
    pub(crate) from: Option<Ipv4Addr>,
    /// To the public listener through the server's HAProxy.
    #[serde(default)]
    pub(crate) proxied: bool,
    /// Send this PROXY protocol header first (as a proxy in front of a `--proxy-protocol`
    /// listener would).
    pub(crate) proxy_header: Option<ProxyHeader>,
}

/// The headers that carry `auth`.
pub(crate) fn admin_headers(credentials: &Credentials, auth: AdminAuth) -> Vec<(String, String)> {
    match auth {
        AdminAuth::Valid => vec![("Authorization".into(), format!("Bearer {}", credentials.admin_token))],
        AdminAuth::Wrong => vec![("Authorization".into(), "Bearer not-the-admin-token".into())],
        AdminAuth::None => Vec::new(),
    }
}

pub(crate) fn body_text(resp: &HttpResponse) -> String {
    clip(&String::from_utf8_lossy(&resp.body), 300)
}

impl StepKind for HttpStep {
    about!(server);

    fn check_keys(&mut self, ctx: &mut CheckCtx) -> Result<(), String> {
        let s = self;
        if !s.path.starts_with('/') {
            return Err(format!("`path` must start with `/`: `{}`", s.path));
        }
        if s.json.is_some() && s.text.is_some() {
            return Err("give only one of `json`, `text`".into());
        }
        exactly_one(&[("expect_status", s.expect_status.is_some()), ("expect_no_response", s.expect_no_response)])?;
        if s.expect_no_response && (s.expect_body.is_some() || s.expect_text.is_some() || !s.expect_headers.is_empty())
        {
            return Err("`expect_body`, `expect_text` and `expect_headers` need a response (`expect_status`)".into());
        }
        if let Some(pattern) = &s.expect_body {
            check_pattern(pattern, &mut ctx.saved)?;
        }
        check_origin(s.from, s.proxied, s.server.as_deref(), &ctx.servers)?;
        if s.listener != Listener::Ws && (s.proxied || s.proxy_header.is_some()) {
            return Err("`proxied` and `proxy_header` are for the `ws` listener".into());
        }
        let tls = s.server.as_ref().is_some_and(|n| ctx.servers.tls.contains(n));
        if s.plaintext && (s.listener != Listener::Ws || !tls) {
            return Err(
                "`plaintext` is for the `ws` listener of a `tls: true` server; everything else is plaintext already"
                    .into(),
            );
        }
        Ok(())
    }

    async fn run(&self, ctx: &mut RunCtx<'_>) -> Result<(), String> {
        let s = self;
        let state = ctx.server(&s.server);
        // The admin listener is always plaintext; the public one speaks TLS on a `tls` server.
        let (addr, tls) = match s.listener {
            Listener::Ws if s.plaintext => (state.route(s.proxied)?.0, None),
            Listener::Ws => state.route(s.proxied)?,
            Listener::Admin => (state.server.admin_addr, None),
        };
        let preamble = s.proxy_header.map(ProxyHeader::bytes).unwrap_or_default();
        let origin = Origin { from: s.from.map(IpAddr::V4), preamble: &preamble };
        let mut headers = s.auth.map(|a| admin_headers(&ctx.credentials, a)).unwrap_or_default();
        headers.extend(s.headers.iter().map(|(k, v)| (k.clone(), v.clone())));
        let body = match (&s.json, &s.text) {
            (Some(v), _) => Some(("application/json", v.to_string().into_bytes())),
            (_, Some(t)) => Some(("text/plain", t.clone().into_bytes())),
            _ => None,
        };
        let method = s.method.clone().unwrap_or("GET".into()).to_ascii_uppercase();
        let req = HttpRequest { method: &method, path: &s.path, headers, body };
        let until = s.retry_within.map(|d| Instant::now() + d.0);
        loop {
            let sent = http::send_from(addr, origin, tls.as_ref(), &req, DEFAULT_WITHIN.0).await;
            let outcome = match (sent, s.expect_status) {
                (Ok(resp), Some(_)) => check_http(s, &resp, &mut ctx.saved),
                (Err(e), Some(_)) => Err(e.to_string()),
                (Err(HttpError::NoResponse(_)), None) => Ok(()),
                (Err(e @ (HttpError::Connect(_) | HttpError::Timeout(_))), None) => {
                    Err(format!("expected the server to end the connection without a response, got: {e}"))
                }
                (Ok(resp), None) => Err(format!(
                    "expected the server to end the connection without a response, got status {} {}",
                    resp.status,
                    body_text(&resp)
                )),
            };
            match (outcome, until) {
                (Ok(()), _) => return Ok(()),
                (Err(_), Some(until)) if Instant::now() < until => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                (Err(e), Some(_)) => {
                    let retried = s.retry_within.unwrap_or(Dur::secs(0));
                    return Err(format!("{e} (still, after retrying for {retried})"));
                }
                (Err(e), None) => return Err(e),
            }
        }
    }
}

fn check_http(s: &HttpStep, resp: &HttpResponse, saved: &mut Saved) -> Result<(), String> {
    let what = format!("{} {}", s.method.as_deref().unwrap_or("GET").to_ascii_uppercase(), s.path);
    if let Some(want) = s.expect_status
        && resp.status != want
    {
        return Err(format!("{what}: expected status {want}, got {} {}", resp.status, body_text(resp)));
    }
    for (name, want) in &s.expect_headers {
        match resp.header(name) {
            Some(v) if v.contains(want.as_str()) => {}
            Some(v) => return Err(format!("{what}: expected header `{name}` to contain {want:?}, got {v:?}")),
            None => return Err(format!("{what}: expected a `{name}` header, got none")),
        }
    }
    if let Some(want) = &s.expect_text
        && !String::from_utf8_lossy(&resp.body).contains(want.as_str())
    {
        return Err(format!("{what}: expected the body to contain {want:?}, got {}", body_text(resp)));
    }
    if let Some(pattern) = &s.expect_body {
        let value: Value = serde_json::from_slice(&resp.body)
            .map_err(|_| format!("{what}: expected a JSON body, got {}", body_text(resp)))?;
        matches_saving(pattern, &value, saved).map_err(|e| format!("{what}: body {}: {e}", brief(&value)))?;
    }
    Ok(())
}
