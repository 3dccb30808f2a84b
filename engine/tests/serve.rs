//! `wsgate serve` as a process: the start-up refusals (status 64, one clear line), `--dev`,
//! the listening line, and a clean exit on SIGTERM.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

fn serve(args: &[&str], secret: Option<&str>) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsgate"));
    cmd.arg("serve").args(args).env_remove("WSGATE_ADMIN_TOKEN").env("RUST_LOG", "info");
    match secret {
        Some(s) => cmd.env("WSGATE_JWT_SECRET", s),
        None => cmd.env_remove("WSGATE_JWT_SECRET"),
    };
    cmd
}

const EPHEMERAL: [&str; 4] = ["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"];

fn refused(mut cmd: Command) -> String {
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(out.stdout.is_empty(), "nothing listened: {}", String::from_utf8_lossy(&out.stdout));
    stderr
}

#[test]
fn an_invalid_policy_exits_64_before_binding() {
    let copy = common::PolicyCopy::new();
    copy.replace("policy.yaml", "max_per_user: 1", "max_per_usr: 1");
    let dir = copy.path().to_str().unwrap();
    let stderr = refused(serve(&[&EPHEMERAL[..], &["--policies", dir]].concat(), Some(common::SECRET)));
    assert!(stderr.contains("policy.yaml:") && stderr.contains("max_per_usr"), "{stderr}");
    assert!(stderr.contains("nothing was started"), "{stderr}");
}

#[test]
fn a_missing_key_exits_64() {
    let dir = common::default_policy_dir();
    let stderr = refused(serve(&[&EPHEMERAL[..], &["--policies", dir.to_str().unwrap()]].concat(), None));
    assert!(stderr.contains("WSGATE_JWT_SECRET"), "{stderr}");
}

#[test]
fn redis_cluster_needs_redis_and_bad_seeds_are_refused_without_their_password() {
    let dir = common::default_policy_dir();
    let dir = dir.to_str().unwrap();
    let out = serve(&[&EPHEMERAL[..], &["--policies", dir, "--redis-cluster"]].concat(), Some(common::SECRET))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "a usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--redis <REDIS>"));
    let seeds = "redis://u:hunter2-secret@127.0.0.1:1,not a url";
    let stderr = refused(serve(
        &[&EPHEMERAL[..], &["--policies", dir, "--redis", seeds, "--redis-cluster"]].concat(),
        Some(common::SECRET),
    ));
    assert!(stderr.contains("--redis") && !stderr.contains("hunter2"), "{stderr}");
    let stderr =
        refused(serve(&[&EPHEMERAL[..], &["--policies", dir, "--redis", seeds]].concat(), Some(common::SECRET)));
    assert!(stderr.contains("--redis-cluster") && !stderr.contains("hunter2"), "several URLs: {stderr}");
}

#[test]
fn flag_variables_take_1_and_yes() {
    let dir = common::default_policy_dir();
    let args = ["--listen", "0.0.0.0:0", "--admin-listen", "127.0.0.1:0", "--policies", dir.to_str().unwrap()];
    let mut cmd = serve(&args, Some(common::SECRET));
    cmd.env("WSGATE_ALLOW_PLAINTEXT", "1").env("WSGATE_NO_WATCH", "yes");
    let mut child = spawn(cmd);
    let (line, _) = first_lines(&mut child, 1);
    assert!(line[0].starts_with("wsgate listening ws=0.0.0.0:"), "{line:?}");
    stop(child);
}

#[test]
fn plaintext_on_a_public_address_exits_64_unless_allowed() {
    let dir = common::default_policy_dir();
    let dir = dir.to_str().unwrap();
    let args = ["--listen", "0.0.0.0:0", "--admin-listen", "127.0.0.1:0", "--policies", dir];
    let stderr = refused(serve(&args, Some(common::SECRET)));
    assert!(stderr.contains("--allow-plaintext"), "{stderr}");
    let mut child = spawn(serve(&[&args[..], &["--allow-plaintext"]].concat(), Some(common::SECRET)));
    let (line, _) = first_lines(&mut child, 1);
    assert!(line[0].starts_with("wsgate listening ws=0.0.0.0:"), "{line:?}");
    // SIGHUP never terminates the server: the following SIGTERM still drains and exits 0.
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    stop(child);
}

fn spawn(mut cmd: Command) -> Child {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
}

/// The first `n` stdout lines, and the reader for the rest.
fn first_lines(child: &mut Child, n: usize) -> (Vec<String>, BufReader<std::process::ChildStdout>) {
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut lines = Vec::new();
    for _ in 0..n {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        lines.push(line.trim_end().to_string());
    }
    (lines, out)
}

/// SIGTERM, then the exit status must be 0.
fn stop(mut child: Child) {
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn dev_mode_prints_a_ready_token_that_connects() {
    let dir = common::default_policy_dir();
    let args = [&EPHEMERAL[..], &["--dev", "--policies", dir.to_str().unwrap(), "--instance-id", "dev-1"]].concat();
    let mut child = spawn(serve(&args, None));
    let (lines, _rest) = first_lines(&mut child, 3);
    assert!(lines[0].starts_with("wsgate listening ws=127.0.0.1:") && lines[0].contains(" admin=127.0.0.1:"));
    assert!(lines[1].starts_with("dev token"), "{lines:?}");
    let url = lines[2].strip_prefix("connect: ").expect("a ready URL");
    assert!(url.starts_with("ws://127.0.0.1:") && url.contains("/ws?token="), "{url}");

    let request = url.into_client_request().unwrap();
    let host = request.uri().authority().unwrap().to_string();
    let tcp = tokio::net::TcpStream::connect(host).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(request, tcp).await.unwrap();
    let welcome = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.unwrap().unwrap().unwrap();
    let Message::Text(welcome) = welcome else { panic!("{welcome:?}") };
    let welcome: serde_json::Value = serde_json::from_str(&welcome).unwrap();
    assert_eq!(welcome["user"], "dev-user");
    assert_eq!(welcome["instance"], "dev-1");
    assert_eq!(welcome["heartbeat_ms"], 30_000);
    // SIGTERM: the client gets 1001 and the process exits 0.
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await.unwrap() {
            Some(Ok(Message::Close(f))) => break f.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    };
    assert_eq!(close, Some(1001));
    drop(ws);
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    assert_eq!(status.code(), Some(0));
}

/// A server with the default policy, and one client that never reads: it never answers the
/// server's 1001, so it holds the drain open.
struct Lingering {
    child: Child,
    ws_addr: String,
    admin_addr: String,
    url: String,
    client: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    _stdout: BufReader<std::process::ChildStdout>,
}

async fn with_a_lingering_client(drain_timeout: &str) -> Lingering {
    with_a_lingering_client_and(&["--drain-timeout", drain_timeout]).await
}

async fn with_a_lingering_client_and(more: &[&str]) -> Lingering {
    let dir = common::default_policy_dir();
    let args = [&EPHEMERAL[..], &["--policies", dir.to_str().unwrap()], more].concat();
    let mut child = spawn(serve(&args, Some(common::SECRET)));
    let (lines, stdout) = first_lines(&mut child, 1);
    let mut addrs = lines[0].split_whitespace().skip(2);
    let ws_addr = addrs.next().unwrap().strip_prefix("ws=").unwrap().to_string();
    let admin_addr = addrs.next().unwrap().strip_prefix("admin=").unwrap().to_string();
    let token = wsgate::token::mint(
        common::SECRET.as_bytes(),
        "alice",
        Duration::from_secs(600),
        &[],
        std::time::SystemTime::now(),
    )
    .unwrap();
    let url = format!("ws://{ws_addr}/ws?token={token}");
    let tcp = tokio::net::TcpStream::connect(&ws_addr).await.unwrap();
    let (client, _) = tokio_tungstenite::client_async(url.as_str(), tcp).await.unwrap();
    Lingering { child, ws_addr, admin_addr, url, client, _stdout: stdout }
}

#[tokio::test]
async fn while_draining_new_handshakes_get_503_and_the_process_exits_0() {
    let Lingering { mut child, ws_addr, url, client: lingering, .. } = with_a_lingering_client("20s").await;
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        let tcp = tokio::net::TcpStream::connect(&ws_addr).await.unwrap();
        match tokio_tungstenite::client_async(url.as_str(), tcp).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => break response.status().as_u16(),
            // Not draining yet: this one was admitted (and replaced the first); try again.
            Ok(_) => {}
            Err(e) => panic!("{e}"),
        }
        assert!(tokio::time::Instant::now() < deadline, "never refused with 503");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status, 503);
    drop(lingering);
    let exit = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    assert_eq!(exit.code(), Some(0));
}

/// `GET path` on the admin listener: the status line's code and the body.
async fn admin_get(admin: &str, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    tokio::io::AsyncWriteExt::write_all(&mut s, request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut s, &mut answer).await.unwrap();
    let code = answer.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, answer.split("\r\n\r\n").nth(1).unwrap_or_default().to_string())
}

/// The next text frame of `ws`, by `deadline`.
async fn next_text(ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>, within: Duration) -> String {
    loop {
        match tokio::time::timeout(within, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return t.to_string(),
            Ok(Some(Ok(_))) => continue,
            other => panic!("no text frame: {other:?}"),
        }
    }
}

#[tokio::test]
async fn with_a_drain_delay_readyz_is_503_at_once_while_clients_are_still_served() {
    use futures_util::SinkExt;
    let delay = Duration::from_secs(3);
    let Lingering { mut child, ws_addr, admin_addr, client: mut alice, .. } =
        with_a_lingering_client_and(&["--drain-timeout", "10s", "--drain-delay", "3s"]).await;
    assert!(next_text(&mut alice, Duration::from_secs(5)).await.contains("\"welcome\""));
    assert_eq!(admin_get(&admin_addr, "/readyz").await.0, 200);
    let signalled = tokio::time::Instant::now();
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    loop {
        let (code, body) = admin_get(&admin_addr, "/readyz").await;
        if code == 503 {
            assert!(body.contains("\"leaving\""), "{body}");
            break;
        }
        assert!(signalled.elapsed() < Duration::from_secs(2), "/readyz did not turn 503 at once");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Within the delay: a new client is admitted, and a live one is answered.
    let token = wsgate::token::mint(
        common::SECRET.as_bytes(),
        "bob",
        Duration::from_secs(600),
        &[],
        std::time::SystemTime::now(),
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(&ws_addr).await.unwrap();
    let (mut bob, _) =
        tokio_tungstenite::client_async(format!("ws://{ws_addr}/ws?token={token}").as_str(), tcp).await.unwrap();
    assert!(next_text(&mut bob, Duration::from_secs(5)).await.contains("\"welcome\""));
    alice.send(Message::text(r#"{"type":"ping"}"#)).await.unwrap();
    assert!(next_text(&mut alice, Duration::from_secs(5)).await.contains("\"pong\""));
    assert!(signalled.elapsed() < delay, "the checks above ran within the delay");
    // Then the drain: 1001, no sooner than the delay.
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(15), alice.next()).await.unwrap() {
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(close, Some(1001));
    assert!(signalled.elapsed() >= delay, "closed {:?} after the signal", signalled.elapsed());
    drop((alice, bob));
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn a_second_signal_exits_at_once_without_waiting_for_the_drain() {
    let Lingering { mut child, admin_addr: admin, client: _lingering, .. } = with_a_lingering_client("60s").await;
    let pid = child.id().to_string();
    let started = tokio::time::Instant::now();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    // Wait until the first signal has been taken (the admin listener reports draining).
    loop {
        let mut s = tokio::net::TcpStream::connect(&admin).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut s, b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await.unwrap();
        let mut answer = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut s, &mut answer).await.unwrap();
        if answer.starts_with("HTTP/1.1 503") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "never draining");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    assert_eq!(status.code(), Some(wsgate::cli::serve::EXIT_INTERRUPTED));
    assert!(started.elapsed() < Duration::from_secs(10), "exited at once, not after the 60 s drain");
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = common::default_policy_dir();
    let args = [&EPHEMERAL[..], &["--policies", dir.to_str().unwrap(), "--log-format", "json"]].concat();
    let mut child = serve(&args, Some(common::SECRET)).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let _ = first_lines(&mut child, 1);
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let log = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert!(lines.len() >= 2, "{log}");
    for line in lines {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["level"].is_string() && v["message"].is_string() && v["timestamp"].is_string(), "{line}");
    }
}
