//! Every check before the upgrade (SPEC §3), in order: path → method and upgrade headers →
//! lifecycle → `Origin` → token → JWT → connect rules → user id → limits → per-IP concurrent
//! connections → per-user reconnects (the last two across every instance with `--redis`). A refused client gets a plain HTTP response with a JSON
//! body and never a WebSocket; an admitted one gets `101` written here, by hand, so that all
//! of these checks may be asynchronous and none runs inside tungstenite's callback.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, timeout};
use tungstenite::handshake::derive_accept_key;
use tungstenite::protocol::WebSocketConfig;

use crate::auth::{self, Admission, NotAdmitted, SUBPROTOCOL};
use crate::broker::hub::SessionId;
use crate::broker::redis::admission::{FleetAdmission, Lease};
use crate::close::Refusal;
use crate::decisions;
use crate::gateway::Gateway;
use crate::http::{self, ReadError, Request};
use crate::limits::per_ip::IpSlot;
use crate::policy::decision::Denial;
use crate::policy::{ConnLimits, Policy, RequestInfo};
use crate::proxy::Client;
use crate::ws::WebSocket;

/// The WebSocket endpoint.
pub const WS_PATH: &str = "/ws";
/// A client must finish TLS and send its whole upgrade request within this time of being
/// accepted.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Read buffer per connection. tungstenite's default (128 KiB) would cost that much per idle
/// connection; messages larger than this still arrive, in several reads.
pub const READ_BUFFER_BYTES: usize = 1024;
/// How long writing a refusal may take.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// `Retry-After` for the per-IP limit: a slot frees whenever one of the IP's connections
/// closes, so there is no exact time; this keeps a well-behaved client from hammering.
pub const PER_IP_RETRY_AFTER_SECS: u64 = 5;

/// A handshake that passed every check.
pub struct Admitted {
    /// The policy it was admitted under.
    pub policy: Arc<Policy>,
    /// The user id (`auth.user_id`).
    pub user: String,
    /// The verified claims.
    pub claims: serde_json::Value,
    /// The token, kept for re-authentication; never logged.
    pub token: String,
    /// When the token stops being valid (`exp` + leeway).
    pub expires_at: Option<SystemTime>,
    /// The connection's limits.
    pub limits: ConnLimits,
    /// The request as connect rules see it (no token), kept for re-authentication.
    pub request: RequestInfo,
    /// Whether to answer the `wsgate.v1` subprotocol.
    pub subprotocol: bool,
    /// `Sec-WebSocket-Key`, for the accept header.
    pub ws_key: String,
    /// Audit-mode connect rules that would have refused.
    pub audit: Vec<Denial>,
    /// The session number, given here so the counts in Redis can name the connection.
    pub session: SessionId,
    /// The per-IP slot this connection holds until it ends.
    pub ip_slot: IpSlot,
    /// Its place in the counts in Redis (with `--redis`), held until it ends.
    pub lease: Option<Lease>,
}

/// A refusal with what the decision log needs.
#[derive(Debug)]
pub struct Refused {
    pub refusal: Refusal,
    /// The user, once known.
    pub user: Option<String>,
    /// The rule that refused, if a rule did.
    pub rule: Option<Denial>,
}

impl From<Refusal> for Box<Refused> {
    fn from(refusal: Refusal) -> Self {
        Box::new(Refused { refusal, user: None, rule: None })
    }
}

/// Reads and checks the upgrade request (by `deadline`); answers a refusal, or upgrades and
/// hands over the WebSocket and what was admitted. Every outcome is counted and logged here.
/// `peer` is the address the request came from (the TCP peer, or the one a PROXY header
/// named); `tls` whether it came over TLS. Behind a trusted proxy the client is whoever its
/// forwarding headers say ([`crate::proxy`]).
pub async fn upgrade<S>(
    mut stream: S,
    peer: SocketAddr,
    tls: bool,
    gw: &Gateway,
    deadline: Instant,
) -> Option<(WebSocket<S>, Admitted)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut request = match http::read_request(&mut stream, deadline.saturating_duration_since(Instant::now())).await {
        Ok(r) => r,
        Err(ReadError::TooLarge) => {
            let _ = timeout(REFUSAL_WRITE_TIMEOUT, refuse(&mut stream, &Refusal::HeadTooLarge)).await;
            return None;
        }
        Err(ReadError::Malformed | ReadError::LengthRequired) => {
            let refusal = Refusal::BadRequest("malformed HTTP request");
            let _ = timeout(REFUSAL_WRITE_TIMEOUT, refuse(&mut stream, &refusal)).await;
            return None;
        }
        Err(ReadError::Closed | ReadError::TimedOut) => return None,
    };
    let started = Instant::now();
    if request.path == WS_PATH {
        gw.limits.spike.record();
    }
    let client = gw.options.proxies.client(peer.ip(), &request, tls);
    let admitted = match check(gw, &request, &client, started).await {
        Ok(admitted) => admitted,
        Err(refused) => {
            if refused.refusal == Refusal::NotFound {
                gw.metrics.handshake(refused.refusal.error());
                tracing::debug!(ip = %client.ip, "no such path");
            } else {
                decisions::handshake_refused(
                    &gw.metrics,
                    &refused.refusal,
                    refused.rule.as_ref(),
                    refused.user.as_deref(),
                    client.ip,
                );
            }
            let _ = timeout(REFUSAL_WRITE_TIMEOUT, refuse(&mut stream, &refused.refusal)).await;
            gw.metrics.handshake_duration.observe(started.elapsed());
            return None;
        }
    };
    if accept(&mut stream, &admitted).await.is_err() {
        gw.metrics.handshake("aborted");
        return None;
    }
    gw.metrics.handshake("accepted");
    gw.metrics.handshake_duration.observe(started.elapsed());
    let config = ws_config(&admitted.limits);
    // Frames the client sent right after its request; the rest of the request is freed.
    let early = std::mem::take(&mut request.rest);
    drop(request);
    Some((WebSocket::from_partially_read(stream, early, config), admitted))
}

async fn refuse<S: AsyncWrite + Unpin>(stream: &mut S, refusal: &Refusal) -> std::io::Result<()> {
    let retry_after = match refusal {
        Refusal::TooMany { retry_after_secs, .. } => vec![("retry-after", retry_after_secs.to_string())],
        _ => vec![],
    };
    http::write_refusal(stream, refusal.status(), refusal.error(), &refusal.reason(), &retry_after).await
}

/// WebSocket settings for a connection: size limits from the policy (a fragmented message
/// counts as a whole), small buffers.
pub fn ws_config(limits: &ConnLimits) -> WebSocketConfig {
    let max = usize::try_from(limits.max_bytes).unwrap_or(usize::MAX);
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(0)
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
}

/// Runs every check on an upgrade request from `client`.
pub async fn check(gw: &Gateway, request: &Request, client: &Client, now: Instant) -> Result<Admitted, Box<Refused>> {
    if request.path != WS_PATH {
        return Err(Refusal::NotFound.into());
    }
    if request.method != "GET" {
        return Err(Refusal::BadRequest("a WebSocket upgrade is a GET").into());
    }
    if !gw.lifecycle.phase().serves() {
        return Err(Refusal::Unavailable("the server is shutting down").into());
    }
    let ws_key = upgrade_key(request)?;
    let offered = auth::offered_subprotocols(request);
    let subprotocol = offered.contains(&SUBPROTOCOL);
    if !offered.is_empty() && !subprotocol {
        return Err(Refusal::BadRequest("the only subprotocol is wsgate.v1").into());
    }
    // One generation decides the whole handshake.
    let policy = gw.policy.current();
    if let Err(denial) = policy.check_origin(request.header("origin")) {
        return Err(Box::new(Refused { refusal: forbidden(&denial), user: None, rule: Some(denial) }));
    }
    let Some(token) = auth::find_token(request, &policy.auth.token_sources) else {
        return Err(Refusal::Unauthorized("no token".into()).into());
    };
    let request_info = auth::request_info(request, client.ip, client.scheme, &policy.auth.token_sources);
    let (admitted, audit) = auth::admit(&policy, &token, &request_info, None, &gw.revocations, SystemTime::now());
    let Admission { user, claims, expires, limits } = admitted.map_err(refused)?;
    let too_many = |reason, retry_after_secs| {
        Box::new(Refused {
            refusal: Refusal::TooMany { reason, retry_after_secs },
            user: Some(user.clone()),
            rule: None,
        })
    };
    let session = gw.registry.next_id();
    let (ip_slot, lease) = match count(gw, client.ip, &user, &limits, session, now).await {
        Ok(counted) => counted,
        Err(Limited::PerIp) => {
            return Err(too_many("too many connections from this address", PER_IP_RETRY_AFTER_SECS));
        }
        Err(Limited::Reconnects(wait)) => {
            return Err(too_many("too many connection attempts for this user", ceil_secs(wait)));
        }
    };
    Ok(Admitted {
        policy,
        user,
        claims,
        token,
        expires_at: expires,
        limits,
        request: request_info,
        subprotocol,
        ws_key,
        audit,
        session,
        ip_slot,
        lease,
    })
}

/// A limit on counts that refused a handshake.
enum Limited {
    PerIp,
    Reconnects(Duration),
}

/// Counts the connection against `max_per_ip` and the user's reconnect window: across every
/// instance while Redis is up, on this instance otherwise. The local counts are kept either way,
/// so they are current the moment Redis goes away.
async fn count(
    gw: &Gateway,
    ip: std::net::IpAddr,
    user: &str,
    limits: &ConnLimits,
    session: SessionId,
    now: Instant,
) -> Result<(IpSlot, Option<Lease>), Limited> {
    match gw.broker.admit(ip, user, limits, session).await {
        Some(FleetAdmission::Counted(lease)) => {
            let slot = gw.limits.per_ip.acquire(ip, u64::MAX).ok_or(Limited::PerIp)?;
            let _ = gw.limits.reconnects.admit(&user.to_string(), now, u64::MAX, limits.reconnects_per);
            return Ok((slot, Some(lease)));
        }
        Some(FleetAdmission::PerIp) => return Err(Limited::PerIp),
        Some(FleetAdmission::Reconnects(wait)) => return Err(Limited::Reconnects(wait)),
        // A single instance, or Redis away (or failing just now, which marks it away).
        None => {}
    }
    let slot = gw.limits.per_ip.acquire(ip, limits.max_per_ip).ok_or(Limited::PerIp)?;
    gw.limits
        .reconnects
        .admit(&user.to_string(), now, limits.reconnects_max, limits.reconnects_per)
        .map_err(Limited::Reconnects)?;
    // With `--redis`: known here, and added to the counts in Redis when Redis returns.
    Ok((slot, gw.broker.lease_locally(ip, session)))
}

/// The handshake's answer to a token that does not admit the connection.
fn refused(not: NotAdmitted) -> Box<Refused> {
    let (refusal, user, rule) = match not {
        NotAdmitted::Token(_) => (Refusal::Unauthorized(not.reason()), None, None),
        NotAdmitted::Rule { denial, user } => (forbidden(&denial), user, Some(denial)),
        // No user id, no identity: 401, as `wsgate policy test` reports it.
        NotAdmitted::NoUser(ref e) => {
            (Refusal::Unauthorized(not.reason()), None, Some(failed_rule("auth.user_id", &e.0)))
        }
        NotAdmitted::Revoked { ref user } => (Refusal::Unauthorized(not.reason()), Some(user.clone()), None),
        NotAdmitted::Limits { user, error } => (
            Refusal::Forbidden {
                rule: error.key.into(),
                reason: "the connection's limits could not be evaluated".into(),
            },
            Some(user),
            Some(failed_rule(error.key, &error.error)),
        ),
        // Only a live connection's re-check names the user it expects.
        NotAdmitted::OtherUser => (Refusal::Unauthorized(not.reason()), None, None),
    };
    Box::new(Refused { refusal, user, rule })
}

fn forbidden(denial: &Denial) -> Refusal {
    Refusal::Forbidden { rule: denial.rule.to_string(), reason: denial.reason.to_string() }
}

fn failed_rule(key: &str, error: &str) -> Denial {
    Denial {
        rule: key.into(),
        mode: crate::policy::RuleMode::Enforce,
        action: crate::policy::RuleAction::Reject,
        reason: "evaluation failed".into(),
        error: Some(error.to_string()),
    }
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Checks the upgrade headers (RFC 6455 §4.2.1) and returns `Sec-WebSocket-Key`.
fn upgrade_key(request: &Request) -> Result<String, Refusal> {
    let has = |name: &str, token: &str| request.header_tokens(name).any(|t| t.eq_ignore_ascii_case(token));
    if !has("upgrade", "websocket") || !has("connection", "upgrade") {
        return Err(Refusal::BadRequest("expected a WebSocket upgrade"));
    }
    if request.header("sec-websocket-version").map(str::trim) != Some("13") {
        return Err(Refusal::BadRequest("only WebSocket version 13 is supported"));
    }
    match request.header("sec-websocket-key").map(str::trim) {
        Some(key) if is_websocket_key(key) => Ok(key.to_string()),
        _ => Err(Refusal::BadRequest("missing or malformed Sec-WebSocket-Key")),
    }
}

/// RFC 6455 §4.1: the key is 16 bytes in base64 — 22 characters of the standard alphabet, the
/// last carrying only 2 bits (so one of `A`, `Q`, `g`, `w`), then `==`. Anything else is not
/// a WebSocket client's key, and is refused rather than hashed into the answer.
fn is_websocket_key(key: &str) -> bool {
    let b = key.as_bytes();
    b.len() == 24
        && b.ends_with(b"==")
        && b[..22].iter().all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
        && matches!(b[21], b'A' | b'Q' | b'g' | b'w')
}

/// Writes the `101 Switching Protocols` answer.
pub async fn accept<S: AsyncWrite + Unpin>(stream: &mut S, admitted: &Admitted) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {}\r\n",
        derive_accept_key(admitted.ws_key.as_bytes())
    );
    if admitted.subprotocol {
        // Only ever the protocol name: the token offered next to it is never echoed.
        head.push_str("sec-websocket-protocol: wsgate.v1\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.flush().await
}

#[cfg(test)]
mod tests {
    use super::is_websocket_key;

    #[test]
    fn a_websocket_key_is_16_bytes_of_base64() {
        // RFC 6455's example, and 16 bytes of 0x00 and of 0xff.
        for good in [
            "dGhlIHNhbXBsZSBub25jZQ==",
            "AAAAAAAAAAAAAAAAAAAAAA==",
            "/////////////////////w==",
            "a+b/AAAAAAAAAAAAAAAAAQ==",
        ] {
            assert!(is_websocket_key(good), "{good}");
        }
        for bad in [
            "",
            "dGhlIHNhbXBsZSBub25jZQ=",
            "dGhlIHNhbXBsZSBub25jZQ===",
            "AAAAAAAAAAAAAAAAAAAAAAA=",
            "AAAAAAAAAAAAAAAAAAAAAB==",
            "AAAAAAAAAAAAAAAAAAAAA-==",
            "AAAAAAAAAAAAAAAAAAAAA_A=",
            "!!!!!!!!!!!!!!!!!!!!!!==",
            "AAAAAAAAAAAAAAAAAAAAAA=A",
            "AAAAAAAAAAAAAAAAAAAA\u{e9}==",
        ] {
            assert!(!is_websocket_key(bad), "{bad}");
        }
    }
}
