//! `reload-latency`: how long from saving a policy change to a live connection being decided
//! under it. Starts one wsgate (watching its policy directory), connects one client, then
//! repeatedly saves the policy the way editors do (a temporary file renamed over
//! `policy.yaml`), each save flipping whether an application `ping` is allowed. Right after
//! each save the client sends pings back to back; the latency is from just before the rename
//! to the first answer decided under the new policy (`pong` ↔ `forbidden`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::fixtures::policy_dir::PolicyDir;
use crate::measure::fleet;
use crate::process::supervisor::{Credentials, Redactor, WsgateOptions, WsgateServer};
use crate::wire::client::{Connection, Event};

#[derive(Debug, Clone)]
pub(crate) struct LatencyOptions {
    pub(crate) bin: PathBuf,
    /// The policy directory to start from.
    pub(crate) policies: PathBuf,
    pub(crate) saves: usize,
}

/// Longest a save may take to show; past it the measurement fails.
const GIVE_UP: Duration = Duration::from_secs(5);
/// Pause between saves, so each is reloaded on its own (the debounce merges closer saves).
const BETWEEN_SAVES: Duration = Duration::from_millis(150);

/// The latencies, one per save, sorted.
#[derive(Debug, Clone)]
pub(crate) struct Latencies(pub(crate) Vec<Duration>);

impl Latencies {
    /// The `p`th percentile (nearest rank).
    pub(crate) fn percentile(&self, p: usize) -> Duration {
        let n = self.0.len();
        if n == 0 {
            return Duration::ZERO;
        }
        self.0[((n * p).div_ceil(100)).clamp(1, n) - 1]
    }

    /// `reload latency over N saves: p50 X ms, p99 Y ms, max Z ms`.
    pub(crate) fn summary(&self) -> String {
        let ms = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1000.0);
        format!(
            "reload latency (save -> enforced on a live connection) over {} saves: p50 {} ms, p99 {} ms, max {} ms",
            self.0.len(),
            ms(self.percentile(50)),
            ms(self.percentile(99)),
            ms(self.0.last().copied().unwrap_or_default())
        )
    }
}

/// The policy with pings allowed or not; rate and invalid-message limits out of the way of
/// back-to-back probing.
fn policy(allow_ping: bool, save: usize) -> Value {
    let mut ping = json!({"schema": "ping.json"});
    if !allow_ping {
        ping["allow"] = json!({"expr": "false", "reason": format!("pings are off (save {save})")});
    }
    json!({
        "messages": {
            "rate": {"max": 1_000_000, "per": "1s", "action": "reject"},
            "max_invalid": 1_000_000,
            "types": {"ping": ping},
        }
    })
}

/// Sends pings until one is answered the way `allowed` says; returns when that answer came.
async fn probe_until(conn: &mut Connection, allowed: bool, give_up: Instant) -> Result<Instant, String> {
    let mut n = 0u64;
    loop {
        n += 1;
        let text = json!({"type": "ping", "id": n.to_string()}).to_string();
        conn.send(Message::Text(text.into()), GIVE_UP).await?;
        let reply = loop {
            match conn.next_event(give_up).await {
                Some(Event::Text(t)) => {
                    let v: Value = serde_json::from_str(&t).map_err(|e| format!("a reply that is not JSON: {e}"))?;
                    if v["ref"] == json!(n.to_string()) {
                        break v;
                    }
                }
                Some(Event::Binary(_)) => continue,
                Some(other) => return Err(format!("the connection ended: {}", other.describe())),
                None => return Err(format!("no answer to probe {n} within {GIVE_UP:?}")),
            }
        };
        let now = Instant::now();
        let shows_allowed = reply["type"] == "pong";
        if shows_allowed == allowed {
            return Ok(now);
        }
        if !shows_allowed && reply["code"] != "forbidden" {
            return Err(format!("unexpected answer {reply}"));
        }
        if now >= give_up {
            return Err(format!("the saved policy was not enforced within {GIVE_UP:?}"));
        }
    }
}

pub(crate) async fn measure(opts: &LatencyOptions) -> Result<Latencies, String> {
    let redactor = Arc::new(Redactor::default());
    let credentials = Credentials::generate(&redactor);
    let mut dir = PolicyDir::create(&opts.policies, Some(&policy(true, 0)), &[])?;
    let server = WsgateServer::start(
        &WsgateOptions {
            bin: &opts.bin,
            name: "reload",
            policies: dir.path(),
            args: &[],
            env: &[("RUST_LOG".into(), "warn".into())],
            credentials: &credentials,
            ready_timeout: Duration::from_secs(20),
        },
        Arc::clone(&redactor),
    )
    .await?;
    let token = fleet::mint_valid(&credentials, "probe")?;
    let mut conn = fleet::open_one(server.ws_addr, token).await.map_err(|e| redactor.redact(&e))?;
    probe_until(&mut conn, true, Instant::now() + GIVE_UP).await?;
    let mut latencies = Vec::with_capacity(opts.saves);
    let mut allowed = true;
    for save in 1..=opts.saves {
        tokio::time::sleep(BETWEEN_SAVES).await;
        allowed = !allowed;
        let saved = Instant::now();
        // `replace`: each save starts from the repository's policy, so it holds exactly one rule set.
        dir.apply(Some(&policy(allowed, save)), &[], true)?;
        let seen = probe_until(&mut conn, allowed, saved + GIVE_UP).await.map_err(|e| format!("save {save}: {e}"))?;
        latencies.push(seen.duration_since(saved));
    }
    latencies.sort();
    drop(conn);
    drop(server);
    Ok(Latencies(latencies))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let l = Latencies((1..=100).map(Duration::from_millis).collect());
        assert_eq!(l.percentile(50), Duration::from_millis(50));
        assert_eq!(l.percentile(99), Duration::from_millis(99));
        let l = Latencies((1..=50).map(Duration::from_millis).collect());
        assert_eq!(l.percentile(99), Duration::from_millis(50));
        assert!(l.summary().contains("over 50 saves: p50 25.0 ms, p99 50.0 ms, max 50.0 ms"), "{}", l.summary());
    }
}
