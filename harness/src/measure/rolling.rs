//! `rolling-restart`: what a rolling restart does to the instance that stays. Starts a Redis and
//! two wsgate instances on it, connects N clients (distinct users, from several loopback
//! addresses) to the first, sends it SIGTERM, and has every client do what a client behind a
//! load balancer does when its instance goes away: reconnect — to the second instance — at once,
//! retrying after a short pause when refused. The figure is the peak rate of successful
//! handshakes the second instance saw in any one second, and how long the move took.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::measure::fanout::{READY_TIMEOUT, wait_ready};
use crate::measure::fleet::{self, mint_valid};
use crate::process::redis_server::{self, RedisServer};
use crate::process::supervisor::{Credentials, Redactor};
use crate::wire::client::{Connection, Event};

/// Loopback source addresses the clients are spread over (127.0.0.2 …), so the per-address
/// handshake cap of one address is not what the figure measures.
const SOURCES: u8 = 16;
/// A refused reconnect is tried again after this long.
const RETRY_AFTER: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub(crate) struct RollingOptions {
    pub(crate) bin: PathBuf,
    pub(crate) policies: PathBuf,
    pub(crate) clients: usize,
    /// The stopping instance's `--drain-timeout`.
    pub(crate) drain_timeout: Duration,
    /// Extra arguments for the stopping instance (`--drain-delay 5s`).
    pub(crate) args: Vec<String>,
}

/// What the clients saw.
#[derive(Debug, Clone, Default)]
pub(crate) struct RollingMeasurement {
    pub(crate) clients: usize,
    /// After the signal, when each client got its close from the first instance.
    pub(crate) closed: Vec<Duration>,
    /// After the signal, when each client was welcomed by the second instance.
    pub(crate) moved: Vec<Duration>,
    /// Reconnect attempts the second instance refused or dropped.
    pub(crate) refused: usize,
    /// Clients that never made it to the second instance.
    pub(crate) lost: usize,
}

impl RollingMeasurement {
    /// The most arrivals in any window of one second.
    pub(crate) fn peak_per_second(times: &[Duration]) -> usize {
        let mut sorted = times.to_vec();
        sorted.sort();
        let mut peak = 0;
        let mut start = 0;
        for end in 0..sorted.len() {
            while sorted[end] - sorted[start] >= Duration::from_secs(1) {
                start += 1;
            }
            peak = peak.max(end + 1 - start);
        }
        peak
    }

    pub(crate) fn summary(&self) -> String {
        let span = |times: &[Duration]| {
            let first = times.iter().min().copied().unwrap_or_default().as_millis();
            let last = times.iter().max().copied().unwrap_or_default().as_millis();
            format!("{first}–{last} ms")
        };
        format!(
            "rolling restart: {} clients; closes sent {} after SIGTERM; {} moved to the other instance {} after it, \
             peak {} handshakes/s there (any 1 s); {} reconnects refused and retried; {} never moved",
            self.clients,
            span(&self.closed),
            self.moved.len(),
            span(&self.moved),
            Self::peak_per_second(&self.moved),
            self.refused,
            self.lost,
        )
    }
}

/// One client's life across the restart: on instance `a` until its close, then on `b`.
struct Mover {
    conn: Connection,
    b: std::net::SocketAddr,
    token: String,
    from: IpAddr,
}

/// How one client's move went: when it was closed, when welcomed on `b`, refusals meanwhile.
type Moved = (Option<Duration>, Option<Duration>, usize, Option<Connection>);

impl Mover {
    async fn run(mut self, signalled: Arc<tokio::sync::OnceCell<Instant>>, give_up: Instant) -> Moved {
        let closed = loop {
            match self.conn.next_event(give_up).await {
                Some(Event::Text(_) | Event::Binary(_)) => continue,
                Some(_) => break Instant::now(),
                None => return (None, None, 0, None),
            }
        };
        let since = |t: Instant| signalled.get().map_or(Duration::ZERO, |s| t.saturating_duration_since(*s));
        let mut refused = 0;
        while Instant::now() < give_up {
            if let Ok(conn) = fleet::open_one_from(self.b, &self.token, Some(self.from)).await {
                return (Some(since(closed)), Some(since(Instant::now())), refused, Some(conn));
            }
            refused += 1;
            tokio::time::sleep(RETRY_AFTER).await;
        }
        (Some(since(closed)), None, refused, None)
    }
}

/// Runs the measurement; `Err` when it could not be made.
pub(crate) async fn measure(opts: &RollingOptions) -> Result<RollingMeasurement, String> {
    let redactor = Arc::new(Redactor::default());
    let credentials = Credentials::generate(&redactor);
    let redis_bin = redis_server::find_redis_server()?;
    let redis = RedisServer::start(&redis_bin, Arc::clone(&redactor), Duration::from_secs(10)).await?;
    let mut a_args = vec!["--redis".to_string(), redis.url(), "--drain-timeout".into()];
    a_args.push(format!("{}ms", opts.drain_timeout.as_millis()));
    a_args.extend(opts.args.iter().cloned());
    let b_args = vec!["--redis".to_string(), redis.url()];
    let (mut a, _a_dir) =
        fleet::start_server(&opts.bin, &opts.policies, "leaving", opts.clients, &a_args, &credentials, &redactor)
            .await?;
    let (b, _b_dir) =
        fleet::start_server(&opts.bin, &opts.policies, "staying", opts.clients, &b_args, &credentials, &redactor)
            .await?;
    let deadline = Instant::now() + READY_TIMEOUT;
    wait_ready(a.admin_addr, deadline).await?;
    wait_ready(b.admin_addr, deadline).await?;

    let signalled = Arc::new(tokio::sync::OnceCell::new());
    let give_up = Instant::now() + opts.drain_timeout + Duration::from_secs(60);
    let mut movers = JoinSet::new();
    let gate = Arc::new(tokio::sync::Semaphore::new(32));
    let mut opening = JoinSet::new();
    for i in 0..opts.clients {
        let token = mint_valid(&credentials, &format!("mover-{i}"))?;
        let from = IpAddr::from([127, 0, 0, 2 + (i % usize::from(SOURCES)) as u8]);
        let (addr, gate) = (a.ws_addr, Arc::clone(&gate));
        opening.spawn(async move {
            let _permit = gate.acquire_owned().await.map_err(|e| e.to_string())?;
            let conn = fleet::open_one_from(addr, &token, Some(from)).await.map_err(|e| format!("client {i}: {e}"))?;
            Ok::<_, String>((conn, token, from))
        });
    }
    while let Some(joined) = opening.join_next().await {
        let (conn, token, from) = joined.map_err(|e| e.to_string())?.map_err(|e| redactor.redact(&e))?;
        let mover = Mover { conn, b: b.ws_addr, token, from };
        movers.spawn(mover.run(Arc::clone(&signalled), give_up));
    }
    tokio::task::yield_now().await;
    let _ = signalled.set(Instant::now());
    a.process.signal("TERM").await?;

    let mut m = RollingMeasurement { clients: opts.clients, ..RollingMeasurement::default() };
    let mut held = Vec::with_capacity(opts.clients);
    while let Some(joined) = movers.join_next().await {
        let (closed, moved, refused, conn) = joined.map_err(|e| e.to_string())?;
        m.closed.extend(closed);
        match moved {
            Some(at) => m.moved.push(at),
            None => m.lost += 1,
        }
        m.refused += refused;
        held.extend(conn);
    }
    drop(held);
    drop((a, b, redis));
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peak_is_the_most_arrivals_in_any_second() {
        let ms = |v: &[u64]| v.iter().map(|&n| Duration::from_millis(n)).collect::<Vec<_>>();
        assert_eq!(RollingMeasurement::peak_per_second(&ms(&[])), 0);
        assert_eq!(RollingMeasurement::peak_per_second(&ms(&[5, 10, 999, 1004, 1500, 1900, 2100])), 4);
        assert_eq!(RollingMeasurement::peak_per_second(&ms(&[3000, 0, 1000, 2000])), 1);
    }
}
