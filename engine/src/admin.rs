//! The admin listener (SPEC §6): health, readiness and the admin API. It is a separate
//! listener, never the public one. Calls that change state need
//! `Authorization: Bearer $WSGATE_ADMIN_TOKEN`, compared in constant time; when the variable is
//! unset they answer 403.
//!
//! It serves at most [`MAX_CONNECTIONS`] connections at once (more wait to be accepted), each
//! within [`REQUEST_TIMEOUT`] per read and [`CONNECTION_DEADLINE`] in all. Bound to a loopback
//! address, it answers only requests whose `Host` is a loopback name: a web page whose own
//! name an attacker points at 127.0.0.1 (DNS rebinding) would otherwise read `/metrics` and
//! `/v1/policy` from the operator's browser.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::broker::delivery::Delivery;
use crate::close::Ending;
use crate::gateway::Gateway;
use crate::http::{self, Request};
use crate::lifecycle::Phase;
use crate::reload::{Outcome, Trigger};

/// Largest admin request body.
pub(crate) const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Longest channel name the admin API publishes to.
pub(crate) const MAX_CHANNEL_LEN: usize = 256;
/// How long a client may take to send a request head, and then its body.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest one admin connection is served, from accept to the end of its answer.
pub(crate) const CONNECTION_DEADLINE: Duration = Duration::from_secs(30);
/// Most admin connections served at once. Further ones wait in the listen backlog and are
/// served as slots free up: a burst of scrapes and probes is delayed, not refused, and idle
/// connections cannot exhaust the process's memory or file descriptors.
pub const MAX_CONNECTIONS: usize = 64;

/// Which `Host` headers the listener answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hosts {
    /// Any: the listener is reachable from elsewhere, and is named as the operator chose.
    Any,
    /// Loopback names and addresses only: the listener is bound to loopback.
    Loopback,
}

/// Serves admin requests until the task is aborted.
pub async fn serve(listener: TcpListener, gw: Arc<Gateway>) {
    let hosts = match listener.local_addr() {
        Ok(addr) if addr.ip().is_loopback() => Hosts::Loopback,
        _ => Hosts::Any,
    };
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let slot = slots.clone().acquire_owned().await.expect("the admin slots are never closed");
        match listener.accept().await {
            Ok((stream, _)) => {
                let gw = gw.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(CONNECTION_DEADLINE, serve_connection(stream, gw, hosts)).await;
                    drop(slot);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Whether `host` (a `Host` header: name or address, with or without a port) names this
/// machine's loopback interface: `localhost`, `127.0.0.0/8` or `[::1]`.
fn is_loopback_host(host: &str) -> bool {
    let port_ok = |p: &str| p.is_empty() || p.strip_prefix(':').is_some_and(|p| p.parse::<u16>().is_ok());
    if let Some(rest) = host.strip_prefix('[') {
        let Some((addr, port)) = rest.split_once(']') else { return false };
        return port_ok(port) && addr.parse::<Ipv6Addr>().is_ok_and(|a| a.to_canonical().is_loopback());
    }
    let name = match host.split_once(':') {
        Some((name, port)) if port.parse::<u16>().is_ok() => name,
        Some(_) => return false,
        None => host,
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<Ipv4Addr>().is_ok_and(|a| a.is_loopback())
}

/// An admin answer.
struct Reply {
    status: u16,
    body: Value,
}

fn reply(status: u16, body: Value) -> Reply {
    Reply { status, body }
}

fn error(status: u16, error: &str, reason: &str) -> Reply {
    reply(status, json!({"error": error, "reason": reason}))
}

/// One admin connection: one request, one response, whatever its `Host` (for callers that
/// are not a listener; [`serve`] checks it).
pub async fn handle<S: AsyncRead + AsyncWrite + Unpin>(stream: S, gw: Arc<Gateway>) {
    serve_connection(stream, gw, Hosts::Any).await;
}

async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, gw: Arc<Gateway>, hosts: Hosts) {
    let Ok(request) = http::read_request(&mut stream, REQUEST_TIMEOUT).await else { return };
    let host_ok = hosts == Hosts::Any || request.header("host").is_some_and(|h| is_loopback_host(h.trim()));
    let reply = match (request.method.as_str(), request.path.as_str()) {
        // Never echoes the Host it refuses.
        _ if !host_ok => error(
            421,
            "misdirected_request",
            "this listener is on loopback and answers only Host localhost, 127.0.0.1 or [::1]",
        ),
        ("GET", "/healthz") => reply(200, json!({"status": "ok"})),
        ("GET", "/metrics") => {
            let text = gw.metrics.render();
            let content_type = "text/plain; version=0.0.4; charset=utf-8";
            let _ = http::write_response(&mut stream, 200, content_type, &[], text.as_bytes()).await;
            return;
        }
        ("GET", "/readyz") => match gw.lifecycle.phase() {
            Phase::Running if gw.broker.redis_away() && !gw.options.ready_without_redis => {
                reply(503, json!({"status": "redis_unavailable"}))
            }
            Phase::Running if gw.broker.redis_away() => reply(200, json!({"status": "ready", "redis": "unavailable"})),
            Phase::Running => reply(200, json!({"status": "ready"})),
            Phase::Leaving => reply(503, json!({"status": "leaving"})),
            Phase::Draining => reply(503, json!({"status": "draining"})),
            Phase::Closed => reply(503, json!({"status": "closed"})),
        },
        ("GET", "/v1/policy") => policy(&gw),
        ("POST", "/v1/policy/reload") => match authorize(&gw, &request) {
            Err(r) => r,
            Ok(()) => reload(&gw).await,
        },
        ("POST", path @ ("/v1/publish" | "/v1/disconnect")) => match authorize(&gw, &request) {
            Err(r) => r,
            Ok(()) => match http::read_body(&mut stream, &request, MAX_BODY_BYTES, REQUEST_TIMEOUT).await {
                Ok(body) if path == "/v1/publish" => publish(&gw, &body).await,
                Ok(body) => disconnect(&gw, &body).await,
                Err(http::ReadError::TooLarge) => error(413, "bad_request", "body too large"),
                Err(http::ReadError::LengthRequired) => error(411, "bad_request", "a body needs Content-Length"),
                Err(http::ReadError::Malformed) => {
                    error(400, "bad_request", "unreadable Content-Length, or a chunked body (not supported)")
                }
                Err(_) => return,
            },
        },
        (
            _,
            "/healthz" | "/readyz" | "/metrics" | "/v1/publish" | "/v1/disconnect" | "/v1/policy" | "/v1/policy/reload",
        ) => error(405, "method_not_allowed", "method not allowed"),
        _ => error(404, "not_found", "no such path"),
    };
    let body = reply.body.to_string();
    let _ = http::write_response(&mut stream, reply.status, "application/json", &[], body.as_bytes()).await;
}

/// Checks the admin bearer token in constant time.
fn authorize(gw: &Gateway, request: &Request) -> Result<(), Reply> {
    let Some(expected) = gw.options.admin_token.as_deref().filter(|t| !t.is_empty()) else {
        return Err(error(403, "forbidden", "the admin API is disabled: WSGATE_ADMIN_TOKEN is not set"));
    };
    let presented = request
        .header("authorization")
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .unwrap_or_default();
    if constant_time_eq(presented.as_bytes(), expected.as_bytes()) {
        Ok(())
    } else {
        Err(error(401, "unauthorized", "missing or wrong admin token"))
    }
}

/// Compares digests so neither the content nor the length of the secret leaks through timing.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let (da, db) = (Sha256::digest(a), Sha256::digest(b));
    da.iter().zip(db.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `POST /v1/publish {"channel": "...", "data": ...}`.
async fn publish(gw: &Gateway, body: &[u8]) -> Reply {
    let parsed: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return error(400, "bad_request", &format!("body is not JSON: {e}")),
    };
    let Some(channel) = parsed.get("channel").and_then(Value::as_str) else {
        return error(400, "bad_request", "`channel` must be a string");
    };
    if channel.is_empty() || channel.len() > MAX_CHANNEL_LEN || channel.chars().any(char::is_control) {
        return error(400, "bad_request", "`channel` must be 1 to 256 bytes without control characters");
    }
    let data = parsed.get("data").unwrap_or(&Value::Null);
    let delivery = Delivery::new(channel, gw.broker.next_id(), data);
    let id = delivery.id.clone();
    match gw.broker.publish(delivery).await {
        Ok(fanout) => reply(200, json!({"id": id, "delivered": fanout.delivered})),
        Err(e) => {
            tracing::error!(error = %e.0, "admin publish failed");
            error(503, "unavailable", "publish failed")
        }
    }
}

/// `GET /v1/policy`: what is being enforced, and how the last reload went.
fn policy(gw: &Gateway) -> Reply {
    let p = gw.policy.current();
    let history = gw.policy.history();
    let last_reload =
        history.last.map(|r| json!({"outcome": r.outcome, "trigger": r.trigger.as_str(), "at": rfc3339(r.at)}));
    let (last_error, last_error_at) = match history.last_error {
        Some(e) => (json!(e.errors.join("\n")), json!(rfc3339(e.at))),
        None => (Value::Null, Value::Null),
    };
    reply(
        200,
        json!({
            "generation": p.generation,
            "content_hash": p.content_hash,
            "loaded_at": rfc3339(p.loaded_at),
            "sources": p.sources,
            "last_error": last_error,
            "last_error_at": last_error_at,
            "last_reload": last_reload,
        }),
    )
}

fn rfc3339(t: std::time::SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// `POST /v1/policy/reload`: reloads now and answers how it went — 200 with the active
/// generation (`reloaded` or `unchanged`), or 422 with every error (the old policy stays).
async fn reload(gw: &Gateway) -> Reply {
    match gw.policy.reload(Trigger::Admin).await {
        Outcome::Applied { generation, content_hash } => {
            reply(200, json!({"outcome": "reloaded", "generation": generation, "content_hash": content_hash}))
        }
        Outcome::Unchanged { generation } => reply(200, json!({"outcome": "unchanged", "generation": generation})),
        Outcome::Refused { errors } => {
            reply(422, json!({"outcome": "refused", "generation": gw.policy.current().generation, "errors": errors}))
        }
        Outcome::NoSource => error(409, "no_policy_directory", "this gateway's policy was not read from a directory"),
    }
}

/// `POST /v1/disconnect {"user": "...", "reason": "logout", "revoke_tokens": true}`: closes the
/// user's connections with 4010; with `revoke_tokens`, the user's tokens issued until now are
/// refused (see [`crate::auth::Revocations`]). With `--redis` the revocation is stored in Redis
/// and every other instance closes the user's connections too; `everywhere` says whether Redis
/// carried it (`false`: this instance only, Redis is away).
async fn disconnect(gw: &Gateway, body: &[u8]) -> Reply {
    let parsed: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return error(400, "bad_request", &format!("body is not JSON: {e}")),
    };
    let Some(user) = parsed.get("user").and_then(Value::as_str).filter(|u| !u.is_empty()) else {
        return error(400, "bad_request", "`user` must be a non-empty string");
    };
    let reason = match parsed.get("reason") {
        None => "logged out",
        Some(Value::String(r)) if r.len() <= 100 && !r.chars().any(char::is_control) => r.as_str(),
        Some(_) => return error(400, "bad_request", "`reason` must be a string of at most 100 bytes"),
    };
    let revoke = match parsed.get("revoke_tokens") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return error(400, "bad_request", "`revoke_tokens` must be true or false"),
    };
    // Revoke first: a client reconnecting right after the close must already be refused.
    let now = std::time::SystemTime::now();
    if revoke {
        gw.revocations.revoke(user, now);
    }
    let (code, close_reason) = Ending::LoggedOut(reason.to_string()).close();
    let closed = gw.registry.close_user(user, code, &close_reason);
    let everywhere = match gw.broker.redis_link() {
        Some(redis) => redis.disconnect(user, reason, revoke.then_some(now)).await,
        None => true,
    };
    crate::decisions::admin_disconnect(user, closed, revoke, everywhere);
    reply(200, json!({"user": user, "closed": closed, "revoked": revoke, "everywhere": everywhere}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_are_loopback_names_and_addresses() {
        for host in
            ["localhost", "LOCALHOST:9090", "127.0.0.1", "127.0.0.1:9090", "127.255.0.9:1", "[::1]", "[::1]:9090"]
        {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "",
            "evil.example",
            "evil.example:9090",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "10.0.0.1:9090",
            "0.0.0.0",
            "[::2]",
            "[::1",
            "[::1]9090",
            "[::1]:x",
            "localhost:",
            "localhost:99999",
            "localhost:9090:1",
            "::1",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }

    #[test]
    fn constant_time_comparison_is_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
    }
}
