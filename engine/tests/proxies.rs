//! Clients behind load balancers (`--trusted-proxies`, `--proxy-protocol`): from a trusted peer
//! the client is the rightmost untrusted `X-Forwarded-For` entry and `request.scheme` follows
//! `X-Forwarded-Proto`; from anyone else those headers are ignored; a PROXY protocol listener
//! takes the client from the header and serves trusted peers only; a plaintext non-loopback
//! listener behind trusted proxies starts without `--allow-plaintext` and closes other peers at
//! once. The same against a real HAProxy is in the harness scenarios (`proxy_*`).

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::inproc::{HOUR, Refused, connect_from, secret, token};
use common::wire::{RawClient, TcpServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use wsgate::gateway::{Gateway, GatewayOptions};
use wsgate::policy::source::SourceFile;
use wsgate::policy::{CompileOptions, Policy, PolicySource, compile};
use wsgate::proxy::Proxies;
use wsgate::proxy::trusted::TrustedProxies;
use wsgate::server::ServeOptions;

fn policy(edit: impl Fn(String) -> String) -> Arc<Policy> {
    let mut source = PolicySource::read_dir(&common::default_policy_dir()).unwrap();
    let edited = edit(source.documents[0].text.clone());
    source.documents = vec![SourceFile { name: "policy.yaml".into(), text: edited }];
    Arc::new(compile(&source, &CompileOptions { generation: 1, secret_lookup: &secret }).unwrap())
}

fn proxies(trusted: &str) -> Proxies {
    Proxies { trusted: TrustedProxies::parse(trusted).unwrap(), ..Proxies::default() }
}

fn gateway(proxies: Proxies, edit: impl Fn(String) -> String) -> Arc<Gateway> {
    Gateway::new(policy(edit), GatewayOptions { proxies, ..GatewayOptions::new("test") })
}

fn one_per_ip(doc: String) -> String {
    doc.replace("max_per_ip: 100", "max_per_ip: 1")
}

fn target(user: &str) -> String {
    format!("/ws?token={}", token(user, HOUR, &[]))
}

fn status(result: Result<common::inproc::Client, Refused>) -> u16 {
    match result {
        Ok(_) => 101,
        Err(refused) => refused.status,
    }
}

#[tokio::test]
async fn behind_a_trusted_proxy_max_per_ip_counts_the_forwarded_clients() {
    let gw = gateway(proxies("10.0.0.0/8"), one_per_ip);
    let proxy = "10.0.0.1:40000";
    let mut held = Vec::new();
    held.push(connect_from(&gw, &target("a"), proxy, &[("x-forwarded-for", "203.0.113.1")]).await.unwrap());
    // Another client through the same proxy: another address.
    held.push(connect_from(&gw, &target("b"), proxy, &[("x-forwarded-for", "203.0.113.2")]).await.unwrap());
    // The first client again, through a chain of trusted proxies: the same address, refused.
    let chained = [("x-forwarded-for", "203.0.113.1, 10.9.9.9")];
    let again = connect_from(&gw, &target("c"), proxy, &chained).await.unwrap_err();
    assert_eq!(again.status, 429, "{:?}", again.body);
    // A client that forges an entry only adds it on the left: its own address still counts.
    let forged = [("x-forwarded-for", "198.51.100.50, 203.0.113.2")];
    assert_eq!(status(connect_from(&gw, &target("d"), proxy, &forged).await), 429);
    // The proxy itself is not the client: a third client is served.
    held.push(connect_from(&gw, &target("e"), proxy, &[("x-forwarded-for", "203.0.113.3")]).await.unwrap());
    assert_eq!(gw.limits.per_ip.count("203.0.113.1".parse().unwrap()), 1);
    assert_eq!(gw.limits.per_ip.count("10.0.0.1".parse().unwrap()), 0);
}

#[tokio::test]
async fn from_any_other_peer_the_forwarding_headers_are_ignored() {
    let gw = gateway(proxies("10.0.0.0/8"), one_per_ip);
    let _a = connect_from(&gw, &target("a"), "10.0.0.1:1", &[("x-forwarded-for", "203.0.113.1")]).await.unwrap();
    // A direct client naming the address already at its limit is counted as itself.
    let direct = [("x-forwarded-for", "203.0.113.1"), ("forwarded", "for=203.0.113.1")];
    let _b = connect_from(&gw, &target("b"), "198.51.100.7:1", &direct).await.unwrap();
    // And naming a fresh address does not get it past its own limit.
    let fresh = [("x-forwarded-for", "203.0.113.99")];
    assert_eq!(status(connect_from(&gw, &target("c"), "198.51.100.7:2", &fresh).await), 429);
    // Without --trusted-proxies nobody's headers count.
    let plain = gateway(Proxies::default(), one_per_ip);
    let _d = connect_from(&plain, &target("d"), "10.0.0.1:1", &[("x-forwarded-for", "203.0.113.1")]).await.unwrap();
    let e = [("x-forwarded-for", "203.0.113.2")];
    assert_eq!(status(connect_from(&plain, &target("e"), "10.0.0.1:2", &e).await), 429);
}

#[tokio::test]
async fn request_ip_and_scheme_follow_the_trusted_proxy() {
    let rules = |doc: String| {
        doc.replace(
            "  rules:\n",
            "  rules:\n    - name: tls-only\n      deny: 'request.scheme != \"wss\"'\n    - name: not-203-0-113-66\n      deny: 'request.ip == \"203.0.113.66\"'\n",
        )
    };
    let gw = gateway(proxies("10.0.0.0/8"), rules);
    let https = [("x-forwarded-for", "203.0.113.1"), ("x-forwarded-proto", "https")];
    connect_from(&gw, &target("a"), "10.0.0.1:1", &https).await.unwrap();
    // The balancer says the client used plaintext, or says nothing over a plaintext hop.
    let http = [("x-forwarded-for", "203.0.113.2"), ("x-forwarded-proto", "http")];
    let refused = connect_from(&gw, &target("b"), "10.0.0.1:1", &http).await.unwrap_err();
    assert_eq!((refused.status, refused.body["error"].as_str()), (403, Some("forbidden")));
    assert_eq!(status(connect_from(&gw, &target("c"), "10.0.0.1:1", &[("x-forwarded-for", "203.0.113.3")]).await), 403);
    // A direct client cannot claim TLS.
    let claimed = [("x-forwarded-proto", "https")];
    assert_eq!(status(connect_from(&gw, &target("d"), "198.51.100.7:1", &claimed).await), 403);
    // request.ip is the forwarded client.
    let banned = [("x-forwarded-for", "203.0.113.66"), ("x-forwarded-proto", "https")];
    let refused = connect_from(&gw, &target("e"), "10.0.0.1:1", &banned).await.unwrap_err();
    assert_eq!(refused.body["reason"].as_str().map(|r| r.is_empty()), Some(false));
    assert_eq!(refused.status, 403);
}

#[tokio::test]
async fn rfc_7239_forwarded_when_the_proxies_write_it() {
    let mut p = proxies("10.0.0.0/8");
    p.header = wsgate::proxy::trusted::ForwardedHeader::Forwarded;
    let gw = gateway(p, one_per_ip);
    let quoted = [("forwarded", r#"for="[2001:db8::17]:4711";proto=https"#)];
    let _a = connect_from(&gw, &target("a"), "10.0.0.1:1", &quoted).await.unwrap();
    assert_eq!(gw.limits.per_ip.count("2001:db8::17".parse().unwrap()), 1);
    // X-Forwarded-For is then not read at all.
    let xff = [("x-forwarded-for", "203.0.113.1")];
    let _b = connect_from(&gw, &target("b"), "10.0.0.1:1", &xff).await.unwrap();
    assert_eq!(status(connect_from(&gw, &target("c"), "10.0.0.1:2", &xff).await), 429, "both are the proxy itself");
}

/// Whether the server closes `stream` without sending anything, within a second.
async fn closed_unanswered(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
}

async fn connect(addr: SocketAddr, from: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    socket.connect(addr).await.unwrap()
}

const UPGRADE_TAIL: &str = " HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                            Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

/// The status line's code of what the server answers `request` (sent after `preamble`).
async fn answer(stream: &mut TcpStream, preamble: &[u8], user: &str) -> String {
    let mut bytes = preamble.to_vec();
    bytes.extend_from_slice(format!("GET {}{UPGRADE_TAIL}", target(user)).as_bytes());
    stream.write_all(&bytes).await.unwrap();
    let mut head = vec![0u8; 12];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut head)).await.unwrap().unwrap();
    String::from_utf8_lossy(&head[9..12]).into_owned()
}

fn v2_local() -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_protocol_listener_takes_the_client_from_the_header_and_serves_trusted_peers_only() {
    let mut p = proxies("127.0.0.1/32");
    p.protocol = true;
    let server = TcpServer::start(gateway(p, one_per_ip), ServeOptions::default()).await;
    let v1 = |client: &str| format!("PROXY TCP4 {client} 127.0.0.1 40000 8080\r\n").into_bytes();
    let mut a = TcpStream::connect(server.addr).await.unwrap();
    assert_eq!(answer(&mut a, &v1("203.0.113.1"), "a").await, "101");
    let mut b = TcpStream::connect(server.addr).await.unwrap();
    assert_eq!(answer(&mut b, &v1("203.0.113.2"), "b").await, "101", "another client");
    let mut c = TcpStream::connect(server.addr).await.unwrap();
    assert_eq!(answer(&mut c, &v1("203.0.113.1"), "c").await, "429", "the first client again");
    // LOCAL (a health check) is the proxy itself.
    let mut local = TcpStream::connect(server.addr).await.unwrap();
    assert_eq!(answer(&mut local, &v2_local(), "d").await, "101");
    // A trusted peer without a header, and any untrusted peer, are closed at once.
    let mut bare = TcpStream::connect(server.addr).await.unwrap();
    bare.write_all(format!("GET {}{UPGRADE_TAIL}", target("e")).as_bytes()).await.unwrap();
    assert!(closed_unanswered(&mut bare).await);
    let mut stranger = connect(server.addr, "127.0.0.2").await;
    let _ = stranger.write_all(&v1("203.0.113.9")).await;
    assert!(closed_unanswered(&mut stranger).await);
    // X-Forwarded-For behind PROXY counts only when the header names a trusted proxy: here it
    // names a client, whose forged header is ignored (203.0.113.2 is at its limit).
    let mut forged = TcpStream::connect(server.addr).await.unwrap();
    let mut bytes = v1("203.0.113.3");
    bytes.extend_from_slice(format!("GET {} HTTP/1.1\r\nX-Forwarded-For: 203.0.113.2\r\n", target("f")).as_bytes());
    bytes.extend_from_slice(&UPGRADE_TAIL.as_bytes()[" HTTP/1.1\r\n".len()..]);
    forged.write_all(&bytes).await.unwrap();
    let mut head = vec![0u8; 12];
    forged.read_exact(&mut head).await.unwrap();
    assert_eq!(&head[9..12], b"101");
    // When the header names a trusted proxy (an HTTP proxy behind the TCP one), its
    // X-Forwarded-For is believed: 203.0.113.2 is at its limit.
    let mut relayed = TcpStream::connect(server.addr).await.unwrap();
    let mut bytes = v1("127.0.0.1");
    bytes.extend_from_slice(format!("GET {} HTTP/1.1\r\nX-Forwarded-For: 203.0.113.2\r\n", target("g")).as_bytes());
    bytes.extend_from_slice(&UPGRADE_TAIL.as_bytes()[" HTTP/1.1\r\n".len()..]);
    relayed.write_all(&bytes).await.unwrap();
    let mut head = vec![0u8; 12];
    relayed.read_exact(&mut head).await.unwrap();
    assert_eq!(&head[9..12], b"429");
    drop((a, b, forged));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_serving_only_its_proxies_closes_other_peers_at_once() {
    let mut p = proxies("127.0.0.1/32");
    p.closes_untrusted = true;
    let server = TcpServer::start(gateway(p, |d| d), ServeOptions::default()).await;
    let mut stranger = connect(server.addr, "127.0.0.2").await;
    assert!(closed_unanswered(&mut stranger).await);
    let mut proxied = RawClient::connect(server.addr, &token("a", HOUR, &[])).await;
    proxied.frame().await.expect("the welcome");
}

fn serve(args: &[&str]) -> Command {
    let dir = common::default_policy_dir();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsgate"));
    cmd.arg("serve")
        .args(["--admin-listen", "127.0.0.1:0", "--policies", dir.to_str().unwrap()])
        .args(args)
        .env_remove("WSGATE_ADMIN_TOKEN")
        .env_remove("WSGATE_ALLOW_PLAINTEXT")
        .env("WSGATE_JWT_SECRET", common::SECRET)
        .env("RUST_LOG", "info");
    cmd
}

#[test]
fn the_flags_are_checked_before_anything_binds() {
    let out = serve(&["--listen", "127.0.0.1:0", "--proxy-protocol"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "--proxy-protocol needs --trusted-proxies");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--trusted-proxies"));
    for bad in ["10.0.0.1/8", "10.0.0.0/33", "nope", "10.0.0.0/8,"] {
        let out = serve(&["--listen", "127.0.0.1:0", "--trusted-proxies", bad]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{bad}: {stderr}");
        assert!(stderr.contains("--trusted-proxies"), "{stderr}");
        assert!(out.stdout.is_empty());
    }
}

#[tokio::test]
async fn plaintext_on_a_public_address_behind_trusted_proxies_needs_no_allow_plaintext() {
    let mut cmd = serve(&["--listen", "0.0.0.0:0", "--trusted-proxies", "127.0.0.1/32"]);
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert!(line.starts_with("wsgate listening ws=0.0.0.0:"), "{line:?}");
    let port: u16 = line.split_whitespace().nth(2).unwrap().rsplit(':').next().unwrap().parse().unwrap();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut stranger = connect(addr, "127.0.0.2").await;
    let closed = closed_unanswered(&mut stranger).await;
    let mut proxy = connect(addr, "127.0.0.1").await;
    let code = answer(&mut proxy, &[], "a").await;
    let _ = child.kill();
    let _ = child.wait();
    assert!(closed, "a peer outside --trusted-proxies is closed at once");
    assert_eq!(code, "101", "the trusted proxy is served");
}

#[test]
fn a_policy_test_case_sets_request_scheme_wss_unless_it_says_ws() {
    let copy = common::PolicyCopy::new();
    copy.replace(
        "policy.yaml",
        "  rules:\n",
        "  rules:\n    - name: tls-only\n      deny: 'request.scheme != \"wss\"'\n",
    );
    copy.write(
        "tests/scheme.yaml",
        "cases:\n  - name: a production client uses wss by default\n    claims: {sub: a}\n    expect: accept\n\
         \x20 - name: a plaintext client is refused\n    claims: {sub: b}\n    request: {scheme: ws}\n\
         \x20   expect: {status: 403, rule: tls-only}\n",
    );
    let (code, stdout, stderr) = common::wsgate(&["policy", "test", copy.path().to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    copy.write("tests/bad.yaml", "cases:\n  - name: x\n    request: {scheme: gopher}\n    expect: accept\n");
    let (code, stdout, stderr) = common::wsgate(&["policy", "test", copy.path().to_str().unwrap()], &[]);
    assert_ne!(code, 0, "only ws and wss: {stdout}{stderr}");
}
