//! The admin listener and the public handshake over real sockets: a served `Host` must be a
//! loopback name when the admin listener is on loopback (DNS rebinding), the admin connection
//! cap, strict `Sec-WebSocket-Key`s, and close codes a client chooses never becoming a label.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::inproc::{HOUR, secret, token};
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use wsgate::gateway::{Gateway, GatewayOptions};
use wsgate::policy::{CompileOptions, PolicySource, compile};
use wsgate::server::{Listeners, ServeOptions};

/// A server on two ephemeral loopback ports; dropping the sender stops it.
struct Server {
    ws: SocketAddr,
    admin: SocketAddr,
    _stop: oneshot::Sender<()>,
}

async fn start() -> Server {
    let source = PolicySource::read_dir(&common::default_policy_dir()).unwrap();
    let policy = Arc::new(compile(&source, &CompileOptions { generation: 1, secret_lookup: &secret }).unwrap());
    let gw = Gateway::new(policy, GatewayOptions::new("test"));
    let ws = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (ws_addr, admin_addr) = (ws.local_addr().unwrap(), admin.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let shutdown = async move {
        let _ = stopped.await;
    };
    tokio::spawn(wsgate::server::serve(Listeners { ws, admin }, gw, ServeOptions::default(), shutdown));
    Server { ws: ws_addr, admin: admin_addr, _stop: stop }
}

/// Sends `head` (a whole request) and reads the answer's head and its `Content-Length` body
/// (an upgrade's 101 has none): status and body.
async fn exchange(stream: &mut TcpStream, head: &str) -> (u16, String) {
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let read = async {
        loop {
            let text = String::from_utf8_lossy(&raw).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length = head
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(0);
                if body.len() >= length {
                    let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
                    return (status, body.to_string());
                }
            }
            let mut buf = [0u8; 4096];
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before a complete answer: {text}");
            raw.extend_from_slice(&buf[..n]);
        }
    };
    timeout(Duration::from_secs(5), read).await.expect("an answer within 5 s")
}

async fn get(addr: SocketAddr, path: &str, host: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    exchange(&mut stream, &format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")).await
}

#[tokio::test]
async fn a_loopback_admin_listener_answers_only_loopback_hosts() {
    let server = start().await;
    let port = server.admin.port();
    for host in [format!("127.0.0.1:{port}"), format!("localhost:{port}"), "LocalHost".into(), "127.8.9.10".into()] {
        let (status, body) = get(server.admin, "/metrics", &host).await;
        assert_eq!(status, 200, "Host: {host}: {body}");
        assert!(body.contains("wsgate_up 1"), "Host: {host}");
    }
    // A page on evil.example whose name now resolves to 127.0.0.1 (DNS rebinding) sends its
    // own name: it must not read metrics or the policy.
    for host in [format!("evil.example:{port}"), "evil.example".into(), "127.0.0.1.evil.example".into(), "".into()] {
        for path in ["/metrics", "/v1/policy", "/healthz"] {
            let (status, body) = get(server.admin, path, &host).await;
            assert_eq!(status, 421, "Host: {host} {path}: {body}");
            let body: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(body["error"], "misdirected_request", "{body}");
            assert!(!body.to_string().contains("evil"), "the Host is never echoed: {body}");
        }
    }
}

#[tokio::test]
async fn a_loopback_admin_listener_on_ipv6_answers_its_bracketed_address() {
    let Ok(admin) = TcpListener::bind("[::1]:0").await else { return };
    let port = admin.local_addr().unwrap().port();
    let source = PolicySource::read_dir(&common::default_policy_dir()).unwrap();
    let policy = Arc::new(compile(&source, &CompileOptions { generation: 1, secret_lookup: &secret }).unwrap());
    let gw = Gateway::new(policy, GatewayOptions::new("test"));
    tokio::spawn(wsgate::admin::serve(admin, gw));
    let addr: SocketAddr = format!("[::1]:{port}").parse().unwrap();
    assert_eq!(get(addr, "/healthz", &format!("[::1]:{port}")).await.0, 200);
    assert_eq!(get(addr, "/healthz", "[::1]").await.0, 200);
    assert_eq!(get(addr, "/healthz", "[::2]").await.0, 421);
}

#[tokio::test]
async fn the_admin_listener_serves_at_most_its_cap_at_once() {
    let server = start().await;
    let host = server.admin.to_string();
    // The cap is held by idle connections that have sent nothing yet.
    let mut idle = Vec::new();
    for _ in 0..wsgate::admin::MAX_CONNECTIONS {
        idle.push(TcpStream::connect(server.admin).await.unwrap());
    }
    // Serving the last of them proves the server accepted every earlier one (it accepts in
    // order); then another takes its place.
    let mut last = idle.pop().unwrap();
    let head = format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    assert_eq!(exchange(&mut last, &head).await.0, 200, "a connection within the cap is served");
    idle.push(TcpStream::connect(server.admin).await.unwrap());
    let mut extra = TcpStream::connect(server.admin).await.unwrap();
    extra.write_all(head.as_bytes()).await.unwrap();
    let mut buf = [0u8; 64];
    let early = timeout(Duration::from_millis(500), extra.read(&mut buf)).await;
    assert!(early.is_err(), "a request past the cap is not served while the cap is held: {early:?}");
    // Freeing the cap serves the waiting request.
    idle.clear();
    let mut raw = Vec::new();
    timeout(Duration::from_secs(5), extra.read_to_end(&mut raw)).await.expect("served once the cap frees").unwrap();
    assert!(raw.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&raw));
}

#[tokio::test]
async fn an_upgrade_needs_a_key_of_16_base64_bytes() {
    let server = start().await;
    let t = token("alice", HOUR, &[]);
    let upgrade = |key: &str| {
        format!(
            "GET /ws?token={t} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n",
            server.ws
        )
    };
    for key in [
        "!!!!!!!!!!!!!!!!!!!!!!==", // 24 characters, not base64
        "AAAAAAAAAAAAAAAAAAAAAAA=", // base64 of 17 bytes
        "AAAAAAAAAAAAAAAAAAAAAA=A", // padding in the middle
        "AAAAAAAAAAAAAAAAAAAAAB==", // 16 bytes with stray bits set: not a canonical encoding
        "AAAAAAAAAAAAAAAAAAAA",     // too short
    ] {
        let mut stream = TcpStream::connect(server.ws).await.unwrap();
        let (status, body) = exchange(&mut stream, &upgrade(key)).await;
        assert_eq!(status, 400, "key {key}: {body}");
        assert!(!body.contains(key), "the key is not echoed: {body}");
    }
    let mut stream = TcpStream::connect(server.ws).await.unwrap();
    let (status, _) = exchange(&mut stream, &upgrade("dGhlIHNhbXBsZSBub25jZQ==")).await;
    assert_eq!(status, 101, "RFC 6455's example key upgrades");
}

#[tokio::test]
async fn close_codes_a_client_chooses_are_counted_as_other() {
    let server = start().await;
    for (user, code) in [("alice", 3999), ("bob", 4321), ("carol", 4009), ("dave", 1000)] {
        let url = format!("ws://{}/ws?token={}", server.ws, token(user, HOUR, &[]));
        let stream = TcpStream::connect(server.ws).await.unwrap();
        let (mut ws, _) = tokio_tungstenite::client_async(url, stream).await.unwrap();
        let welcome = ws.next().await.unwrap().unwrap();
        assert!(matches!(welcome, Message::Text(_)), "{welcome:?}");
        ws.close(Some(CloseFrame { code: CloseCode::from(code), reason: "".into() })).await.unwrap();
        while let Some(Ok(_)) = ws.next().await {}
    }
    let host = server.admin.to_string();
    let deadline = Instant::now() + Duration::from_secs(5);
    let metrics = loop {
        let (_, metrics) = get(server.admin, "/metrics", &host).await;
        let closed: u64 = metrics
            .lines()
            .filter(|l| l.starts_with("wsgate_connections_closed_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        if closed == 4 {
            break metrics;
        }
        assert!(Instant::now() < deadline, "the four closes are not counted within 5 s:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(metrics.contains("wsgate_connections_closed_total{code=\"other\"} 2"), "{metrics}");
    assert!(metrics.contains("wsgate_connections_closed_total{code=\"4009\"} 1"), "a code the server sends keeps it");
    assert!(!metrics.contains("3999") && !metrics.contains("4321"), "{metrics}");
}
