//! The fleet every measurement stands up: a wsgate sized for N loopback clients, and N
//! authenticated clients of distinct users, each past its welcome.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::{Map, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::fixtures::policy_dir::PolicyDir;
use crate::fixtures::token::{self, TokenKind, TokenSpec};
use crate::process::supervisor::{Credentials, Redactor, WsgateOptions, WsgateServer};
use crate::wire::client::{self, Connection, Event, Handshake, Outcome, ReadMode};

/// What a measurement of one wsgate and its clients is given.
#[derive(Debug, Clone)]
pub(crate) struct FleetOptions {
    /// The wsgate binary (a release build gives the figure that matters).
    pub(crate) bin: PathBuf,
    /// The policy directory to start from.
    pub(crate) policies: PathBuf,
    /// How many clients to connect.
    pub(crate) connections: usize,
    /// How many handshakes run at once.
    pub(crate) parallel: usize,
}

/// Opens one authenticated connection (token in the `Authorization` header) and waits for its
/// welcome. The connection keeps reading, so it answers pings and close frames.
pub(crate) async fn open_one(addr: std::net::SocketAddr, token: String) -> Result<Connection, String> {
    open_one_from(addr, &token, None).await
}

/// [`open_one`] from the source address `from` (another loopback address is another client).
pub(crate) async fn open_one_from(
    addr: std::net::SocketAddr,
    token: &str,
    from: Option<std::net::IpAddr>,
) -> Result<Connection, String> {
    let handshake = Handshake {
        addr,
        path_and_query: "/ws".into(),
        headers: vec![("Authorization".into(), format!("Bearer {token}"))],
        timeout: Duration::from_secs(20),
        tls: None,
        from,
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
pub(crate) fn mint_valid(credentials: &Credentials, user: &str) -> Result<String, String> {
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
pub(crate) async fn start_server(
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
pub(crate) async fn open_all(
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
