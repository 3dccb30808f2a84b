//! `idle-memory`: how much resident memory one idle, authenticated connection costs the
//! gateway. Starts one wsgate, reads its `VmRSS`, opens N connections of distinct users (each
//! waits for its welcome), waits for the RSS to settle, and divides the growth by N.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::{Map, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::client::{self, Connection, Event, Handshake, Outcome, ReadMode};
use crate::policy_dir::PolicyDir;
use crate::supervisor::{Credentials, Redactor, WsgateOptions, WsgateServer};
use crate::token::{self, TokenKind, TokenSpec};

/// What to measure.
#[derive(Debug, Clone)]
pub struct MemoryOptions {
    /// The wsgate binary (a release build gives the figure that matters).
    pub bin: PathBuf,
    /// The policy directory to start from.
    pub policies: PathBuf,
    /// How many idle connections to open.
    pub connections: usize,
    /// How many handshakes run at once.
    pub parallel: usize,
}

/// The measurement.
#[derive(Debug, Clone, Copy)]
pub struct Measurement {
    /// Connections held open.
    pub connections: usize,
    /// RSS before, KiB.
    pub before_kib: u64,
    /// RSS with every connection open and settled, KiB.
    pub after_kib: u64,
}

impl Measurement {
    /// KiB per connection.
    pub fn per_connection_kib(&self) -> f64 {
        self.after_kib.saturating_sub(self.before_kib) as f64 / self.connections.max(1) as f64
    }
}

/// Reads `VmRSS` (KiB) from `/proc/PID/status`.
pub fn read_rss_kib(pid: u32) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("cannot read /proc/{pid}/status: {e}"))?;
    parse_vm_rss(&status).ok_or_else(|| format!("no VmRSS in /proc/{pid}/status"))
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut words = line["VmRSS:".len()..].split_whitespace();
    let n: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") | None => Some(n),
        _ => None,
    }
}

/// Samples RSS every 250 ms until three samples in a row stay within 1% (or 64 KiB), or 15 s pass.
async fn settled_rss(pid: u32) -> Result<u64, String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut previous = read_rss_kib(pid)?;
    let mut steady = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.tick().await;
    while Instant::now() < deadline {
        tick.tick().await;
        let now = read_rss_kib(pid)?;
        let tolerance = (previous / 100).max(64);
        steady = if now.abs_diff(previous) <= tolerance { steady + 1 } else { 0 };
        previous = now;
        if steady >= 3 {
            break;
        }
    }
    Ok(previous)
}

/// Opens one authenticated connection (token in the `Authorization` header) and waits for its
/// welcome. The connection keeps reading, so it answers pings and close frames.
pub async fn open_one(addr: std::net::SocketAddr, token: String) -> Result<Connection, String> {
    let handshake = Handshake {
        addr,
        path_and_query: "/ws".into(),
        headers: vec![("Authorization".into(), format!("Bearer {token}"))],
        timeout: Duration::from_secs(20),
        tls: None,
    };
    match client::connect(&handshake, ReadMode::Reading).await? {
        Outcome::Refused { status, body, .. } => {
            Err(format!("handshake refused with {status} {}", String::from_utf8_lossy(&body)))
        }
        Outcome::Accepted { mut conn, .. } => match conn.next_event(Instant::now() + Duration::from_secs(20)).await {
            Some(Event::Text(t)) if t.contains("\"welcome\"") => Ok(conn),
            Some(other) => Err(format!("expected the welcome frame, got {}", other.describe())),
            None => Err("no welcome frame within 20s".into()),
        },
    }
}

/// A valid token for `user`, an hour long, signed with the measurement's secret.
pub fn mint_valid(credentials: &Credentials, user: &str) -> Result<String, String> {
    let claims = Map::new();
    let spec = TokenSpec {
        kind: TokenKind::Valid,
        sub: Some(user),
        claims: &claims,
        omit: &[],
        ttl: Duration::from_secs(3600),
        algorithm: None,
        key: None,
    };
    token::mint(credentials.jwt_secret.as_bytes(), &spec, SystemTime::now()).map(|t| t.unwrap_or_default())
}

/// One wsgate for a measurement of `connections` clients from loopback: the per-IP limit
/// raised past them (it would refuse everything past 100), `RUST_LOG=warn`, plus `args`.
pub async fn start_server(
    bin: &std::path::Path,
    policies: &std::path::Path,
    name: &str,
    connections: usize,
    args: &[String],
    credentials: &Credentials,
    redactor: &Arc<Redactor>,
) -> Result<(WsgateServer, PolicyDir), String> {
    let overrides = json!({"connections": {"max_per_ip": connections + 16}});
    let dir = PolicyDir::create(policies, Some(&overrides), &[])?;
    let server = WsgateServer::start(
        &WsgateOptions {
            bin,
            name,
            policies: dir.path(),
            args,
            env: &[("RUST_LOG".into(), "warn".into())],
            credentials,
            ready_timeout: Duration::from_secs(20),
        },
        Arc::clone(redactor),
    )
    .await?;
    Ok((server, dir))
}

/// Opens `connections` connections of distinct users (`<prefix>-<i>`), `parallel` handshakes at
/// a time, each waiting for its welcome.
pub async fn open_all(
    addr: std::net::SocketAddr,
    credentials: &Credentials,
    prefix: &str,
    connections: usize,
    parallel: usize,
) -> Result<Vec<Connection>, String> {
    let gate = Arc::new(Semaphore::new(parallel.max(1)));
    let mut tasks = JoinSet::new();
    for i in 0..connections {
        let token = mint_valid(credentials, &format!("{prefix}-{i}"))?;
        let gate = Arc::clone(&gate);
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await.map_err(|e| e.to_string())?;
            open_one(addr, token).await.map_err(|e| format!("connection {i}: {e}"))
        });
    }
    let mut held = Vec::with_capacity(connections);
    while let Some(joined) = tasks.join_next().await {
        held.push(joined.map_err(|e| e.to_string())??);
    }
    Ok(held)
}

/// Runs the measurement; `Err` when something failed along the way.
pub async fn measure(opts: &MemoryOptions) -> Result<Measurement, String> {
    let redactor = Arc::new(Redactor::default());
    let credentials = Credentials::generate(&redactor);
    let (server, _dir) =
        start_server(&opts.bin, &opts.policies, "memory", opts.connections, &[], &credentials, &redactor).await?;
    let pid = server.process.pid().ok_or("wsgate exited")?;
    let addr = server.ws_addr;

    // One connection first, so one-time costs (first handshake, lazily built state) are not
    // counted per connection.
    let warmup = mint_valid(&credentials, "warmup")?;
    drop(open_one(addr, warmup).await.map_err(|e| format!("warm-up connection: {e}"))?);
    let before_kib = settled_rss(pid).await?;

    let held =
        open_all(addr, &credentials, "idle", opts.connections, opts.parallel).await.map_err(|e| redactor.redact(&e))?;
    let after_kib = settled_rss(pid).await?;
    drop(held);
    drop(server);
    Ok(Measurement { connections: opts.connections, before_kib, after_kib })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vm_rss() {
        let status = "Name:\twsgate\nVmPeak:\t  100 kB\nVmRSS:\t   12345 kB\nThreads: 3\n";
        assert_eq!(parse_vm_rss(status), Some(12345));
        assert_eq!(parse_vm_rss("Name: x\n"), None);
    }

    #[test]
    fn per_connection_figure() {
        let m = Measurement { connections: 2000, before_kib: 10_000, after_kib: 24_000 };
        assert!((m.per_connection_kib() - 7.0).abs() < 1e-9);
        let shrunk = Measurement { connections: 10, before_kib: 10, after_kib: 5 };
        assert_eq!(shrunk.per_connection_kib(), 0.0);
    }

    #[test]
    fn reads_our_own_rss() {
        assert!(read_rss_kib(std::process::id()).unwrap() > 0);
    }
}
