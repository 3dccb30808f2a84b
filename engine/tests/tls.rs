//! `wsgate serve --tls-cert --tls-key` as a process: `wss://` with a generated certificate,
//! a failed TLS handshake that costs nothing else, certificate rotation on SIGHUP, and a bad
//! pair refused at start-up with status 64.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, mpsc};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_tungstenite::tungstenite::Message;

/// A test CA, and a `localhost` / 127.0.0.1 certificate it signed, written as PEM files.
struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "wsgate test CA");
        Pki { ca: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap() }
    }

    /// Writes a fresh leaf certificate (with `name` as its common name) and key into `dir`.
    fn write_leaf(&self, dir: &Path, name: &str) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.subject_alt_names.push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.signed_by(&key, &self.ca).unwrap();
        std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    }

    fn connector(&self) -> TlsConnector {
        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(self.ca.pem().as_bytes()).unwrap()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        TlsConnector::from(Arc::new(config))
    }
}

/// `wsgate serve` with the default policy and the pair in `dir`, listening on `listen`.
fn serve_tls(dir: &Path, listen: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsgate"));
    cmd.args(["serve", "--listen", listen, "--admin-listen", "127.0.0.1:0", "--policies"])
        .arg(common::default_policy_dir())
        .arg("--tls-cert")
        .arg(dir.join("cert.pem"))
        .arg("--tls-key")
        .arg(dir.join("key.pem"))
        .env("WSGATE_JWT_SECRET", common::SECRET);
    cmd
}

/// A running server: the process, its addresses, and its log lines as they come.
struct Server {
    child: Child,
    ws: String,
    admin: String,
    log: mpsc::Receiver<String>,
}

fn start(dir: &Path, listen: &str) -> Server {
    let mut child = serve_tls(dir, listen).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let (tx, log) = mpsc::channel();
    std::thread::spawn(move || stderr.lines().map_while(Result::ok).try_for_each(|l| tx.send(l)));
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let mut parts = line.split_whitespace().skip(2);
    let ws = parts.next().unwrap().strip_prefix("ws=").unwrap().to_string();
    let admin = parts.next().unwrap().strip_prefix("admin=").unwrap().to_string();
    Server { child, ws, admin, log }
}

/// Waits (bounded) for a log line containing `text`.
fn wait_for_log(log: &mpsc::Receiver<String>, text: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match log.recv_timeout(left) {
            Ok(line) if line.contains(text) => return,
            Ok(_) => {}
            Err(_) => panic!("no log line with `{text}` within 10 s"),
        }
    }
}

/// Connects over TLS and returns the server certificate's DER and the welcome frame.
async fn wss_welcome(pki: &Pki, addr: &str) -> (Vec<u8>, serde_json::Value) {
    wss_welcome_over(pki, tokio::net::TcpStream::connect(addr).await.unwrap()).await
}

async fn wss_welcome_over(pki: &Pki, tcp: tokio::net::TcpStream) -> (Vec<u8>, serde_json::Value) {
    let tls = pki.connector().connect(ServerName::try_from("localhost").unwrap(), tcp).await.unwrap();
    let served = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let token =
        wsgate::token::mint(common::SECRET.as_bytes(), "alice", Duration::from_secs(600), &[], SystemTime::now())
            .unwrap();
    let url = format!("wss://localhost/ws?token={token}");
    let (mut ws, _) = tokio_tungstenite::client_async(url, tls).await.unwrap();
    let Some(Ok(Message::Text(welcome))) = ws.next().await else { panic!("no welcome") };
    (served, serde_json::from_str(&welcome).unwrap())
}

async fn metrics(admin: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    text
}

#[tokio::test]
async fn wss_with_a_generated_certificate_rotated_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    pki.write_leaf(dir.path(), "first");
    let Server { child, ws, admin, log } = start(dir.path(), "127.0.0.1:0");

    let (first, welcome) = wss_welcome(&pki, &ws).await;
    assert_eq!(welcome["user"], "alice");

    // Plain HTTP to the TLS port fails its handshake: counted, and nobody else notices.
    let mut plain = tokio::net::TcpStream::connect(&ws).await.unwrap();
    plain.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut sink = Vec::new();
    let _ = plain.read_to_end(&mut sink).await;
    // The server may count the failure just after the client sees the connection end.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !metrics(&admin).await.contains("wsgate_tls_handshake_failures_total 1") {
        assert!(tokio::time::Instant::now() < deadline, "the failed TLS handshake was not counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Rotate: new files, SIGHUP, and new connections get the new certificate.
    pki.write_leaf(dir.path(), "second");
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (served, _) = wss_welcome(&pki, &ws).await;
        if served != first {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the rotated certificate was never served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A broken pair on SIGHUP is refused; the current certificate stays in service.
    std::fs::write(dir.path().join("cert.pem"), "not a certificate").unwrap();
    assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    wait_for_log(&log, "the TLS certificate could not be re-read");
    let (_, welcome) = wss_welcome(&pki, &ws).await;
    assert_eq!(welcome["type"], "welcome");
    stop(child);
}

/// Idle sockets from one address are under the per-address handshake cap before their TLS
/// handshake starts: they cannot hold every `--max-connections` slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_with_600_idle_sockets_does_not_lock_out_another_client() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    pki.write_leaf(dir.path(), "caps");
    let mut cmd = serve_tls(dir.path(), "127.0.0.1:0");
    cmd.args(["--max-connections", "400"]).stdout(Stdio::piped()).stderr(Stdio::null());
    let mut child = KillOnDrop(Some(cmd.spawn().unwrap()));
    let mut line = String::new();
    BufReader::new(child.0.as_mut().unwrap().stdout.take().unwrap()).read_line(&mut line).unwrap();
    let ws = line.split_whitespace().nth(2).unwrap().strip_prefix("ws=").unwrap().to_string();
    // 600 sockets from 127.0.0.1 that never send a byte, opened at once. What the server does
    // not accept waits in the listen backlog; wait until 500 are connected.
    let idle: Vec<_> = (0..600).map(|_| tokio::spawn(tokio::net::TcpStream::connect(ws.clone()))).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while idle.iter().filter(|c| c.is_finished()).count() < 500 {
        assert!(tokio::time::Instant::now() < deadline, "the idle sockets could not connect");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = tokio::time::Instant::now();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let other = socket.connect(ws.parse().unwrap());
    let welcome =
        tokio::time::timeout(Duration::from_secs(2), async { wss_welcome_over(&pki, other.await.unwrap()).await });
    let (_, welcome) = welcome.await.expect("the other client connected within 2 s");
    assert_eq!(welcome["type"], "welcome");
    assert!(started.elapsed() < Duration::from_secs(2));
    idle.iter().for_each(|c| c.abort());
    stop(child.0.take().unwrap());
}

/// A server process that a failing assertion does not leave behind.
struct KillOnDrop(Option<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn a_bad_certificate_pair_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    pki.write_leaf(dir.path(), "first");
    let other = tempfile::tempdir().unwrap();
    pki.write_leaf(other.path(), "other");
    // The key of another certificate.
    std::fs::copy(other.path().join("key.pem"), dir.path().join("key.pem")).unwrap();
    let out = serve_tls(dir.path(), "127.0.0.1:0").output().unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("TLS:"));
    // With TLS a public address is fine (the admin listener stays on loopback).
    pki.write_leaf(dir.path(), "first");
    let server = start(dir.path(), "0.0.0.0:0");
    assert!(server.ws.starts_with("0.0.0.0:"), "{}", server.ws);
    stop(server.child);
}

fn stop(mut child: Child) {
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    assert_eq!(child.wait().unwrap().code(), Some(0));
}
