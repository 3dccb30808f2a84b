//! `idle-memory`: how much resident memory one idle, authenticated connection costs the
//! gateway. Starts one wsgate, reads its `VmRSS`, opens N connections of distinct users (each
//! waits for its welcome), waits for the RSS to settle, and divides the growth by N.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::measure::fleet::{FleetOptions, mint_valid, open_all, open_one, start_server};
use crate::process::supervisor::{Credentials, Redactor};

#[derive(Debug, Clone, Copy)]
pub(crate) struct Measurement {
    /// Connections held open.
    pub(crate) connections: usize,
    /// RSS before, KiB.
    pub(crate) before_kib: u64,
    /// RSS with every connection open and settled, KiB.
    pub(crate) after_kib: u64,
}

impl Measurement {
    /// KiB per connection.
    pub(crate) fn per_connection_kib(&self) -> f64 {
        self.after_kib.saturating_sub(self.before_kib) as f64 / self.connections.max(1) as f64
    }
}

/// Reads `VmRSS` (KiB) from `/proc/PID/status`.
pub(crate) fn read_rss_kib(pid: u32) -> Result<u64, String> {
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

/// Runs the measurement; `Err` when something failed along the way.
pub(crate) async fn measure(opts: &FleetOptions) -> Result<Measurement, String> {
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
