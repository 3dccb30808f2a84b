//! The Redis a scenario runs beside its wsgate instances: one `redis-server` (`redis: true`) or,
//! with `redis_cluster: true`, a Redis Cluster of three primaries made with
//! `redis-cli --cluster create` (wsgate then gets `--redis <seed nodes> --redis-cluster` and uses
//! sharded pub/sub). `stop_redis` and `start_redis` act on every node; `redis_publish` sends
//! `SPUBLISH` to the node owning the channel, as a backend would.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use tokio::process::Command;
use tokio::time::Instant;

use crate::process::redis_server::RedisServer;
use crate::process::supervisor::Redactor;
use crate::wire::resp::{self, Reply};

/// Nodes of a scenario's cluster: the fewest Redis accepts.
const NODES: usize = 3;
/// How long a node may take to answer `CLUSTER INFO`.
const INFO_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Debug)]
pub(crate) enum Redis {
    Server(Box<RedisServer>),
    Cluster(RedisCluster),
}

impl Redis {
    /// What wsgate is given: `--redis <url>`, and `--redis-cluster` for a cluster.
    pub(crate) fn args(&self) -> Vec<String> {
        match self {
            Redis::Server(s) => vec!["--redis".into(), s.url()],
            Redis::Cluster(c) => vec!["--redis".into(), c.url(), "--redis-cluster".into()],
        }
    }

    /// Every node (one for a server), for failure reports.
    pub(crate) fn nodes_mut(&mut self) -> &mut [RedisServer] {
        match self {
            Redis::Server(s) => std::slice::from_mut(s),
            Redis::Cluster(c) => &mut c.nodes,
        }
    }

    /// Sends `signal` to every node and waits until they are gone.
    pub(crate) async fn kill(&mut self, signal: &str) -> Result<(), String> {
        for node in self.nodes_mut() {
            node.kill(signal).await?;
        }
        Ok(())
    }

    /// Starts every node again on its port; a cluster is back once it serves every slot.
    pub(crate) async fn restart(&mut self, ready_timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + ready_timeout;
        for node in self.nodes_mut() {
            node.restart(ready_timeout).await?;
        }
        match self {
            Redis::Server(_) => Ok(()),
            Redis::Cluster(c) => c.wait_until_ok(deadline).await,
        }
    }

    /// Stops every node (SIGTERM, then SIGKILL after `grace`).
    pub(crate) async fn stop(&mut self, grace: Duration) {
        for node in self.nodes_mut() {
            let _ = node.stop(grace).await;
        }
    }

    /// A node that is no longer running, with its exit status.
    pub(crate) fn exited(&mut self) -> Option<(u16, ExitStatus)> {
        self.nodes_mut().iter_mut().find_map(|n| n.exit_status().map(|s| (n.addr().port(), s)))
    }

    /// The command [`Redis::publish`] sends.
    pub(crate) fn publish_command(&self) -> &'static str {
        match self {
            Redis::Server(_) => "PUBLISH",
            Redis::Cluster(_) => "SPUBLISH",
        }
    }

    /// Publishes as a backend would: `PUBLISH`, or on a cluster `SPUBLISH` to the node owning
    /// the channel. Answers how many subscribers got it.
    pub(crate) async fn publish(&mut self, channel: &str, payload: &[u8], timeout: Duration) -> Result<i64, String> {
        match self {
            Redis::Server(s) => resp::publish(s.addr(), channel, payload, timeout).await,
            Redis::Cluster(c) => c.spublish(channel, payload, timeout).await,
        }
    }
}

/// Three `redis-server` nodes made one Redis Cluster.
#[derive(Debug)]
pub(crate) struct RedisCluster {
    nodes: Vec<RedisServer>,
}

/// Finds `redis-cli` on `PATH` (Debian's `redis-tools`, which `redis-server` depends on).
fn find_redis_cli() -> Result<PathBuf, String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("redis-cli"))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| "redis-cli is not installed (not found on PATH): install `redis-tools`".to_string())
}

impl RedisCluster {
    /// Starts three nodes of `bin`, joins them with `redis-cli --cluster create` and waits until
    /// every node reports `cluster_state:ok`.
    pub(crate) async fn start(bin: &Path, redactor: Arc<Redactor>, ready_timeout: Duration) -> Result<Self, String> {
        let cli = find_redis_cli()?;
        let mut nodes = Vec::with_capacity(NODES);
        for _ in 0..NODES {
            nodes.push(RedisServer::start_cluster_node(bin, Arc::clone(&redactor), ready_timeout).await?);
        }
        let deadline = Instant::now() + ready_timeout;
        let output = Command::new(cli)
            .arg("--cluster")
            .arg("create")
            .args(nodes.iter().map(|n| n.addr().to_string()))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout_at(deadline, output)
            .await
            .map_err(|_| format!("redis-cli --cluster create did not finish within {ready_timeout:?}"))?
            .map_err(|e| format!("cannot run redis-cli: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "redis-cli --cluster create failed: {}",
                String::from_utf8_lossy(&output.stdout).lines().rev().take(5).collect::<Vec<_>>().join(" / ")
            ));
        }
        let cluster = RedisCluster { nodes };
        cluster.wait_until_ok(deadline).await?;
        Ok(cluster)
    }

    /// The seed nodes, as `--redis` takes them with `--redis-cluster`.
    pub(crate) fn url(&self) -> String {
        self.nodes.iter().map(RedisServer::url).collect::<Vec<_>>().join(",")
    }

    async fn wait_until_ok(&self, deadline: Instant) -> Result<(), String> {
        for node in &self.nodes {
            loop {
                let info = resp::command(node.addr(), &[b"CLUSTER", b"INFO"], INFO_TIMEOUT).await;
                if matches!(&info, Ok(Reply::Bulk(Some(text))) if text.windows(16).any(|w| w == b"cluster_state:ok")) {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "the Redis Cluster node on {} did not report cluster_state:ok in time",
                        node.addr()
                    ));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// `SPUBLISH` to any node, then to the one a `MOVED` reply names.
    async fn spublish(&self, channel: &str, payload: &[u8], timeout: Duration) -> Result<i64, String> {
        let mut addr = self.nodes[0].addr();
        for _ in 0..2 {
            match resp::command(addr, &[b"SPUBLISH", channel.as_bytes(), payload], timeout).await? {
                Reply::Integer(n) => return Ok(n),
                Reply::Error(e) if e.starts_with("MOVED ") => addr = moved_to(&e)?,
                other => return Err(format!("Redis at {addr} answered SPUBLISH with {}", other.describe())),
            }
        }
        Err(format!("SPUBLISH {channel}: the cluster kept redirecting"))
    }
}

/// The node a `MOVED <slot> <host>:<port>` error names (loopback: the scenario's nodes).
fn moved_to(error: &str) -> Result<SocketAddr, String> {
    let port = error
        .rsplit_once(':')
        .and_then(|(_, port)| port.trim().parse::<u16>().ok())
        .ok_or_else(|| format!("an unexpected redirection: {error}"))?;
    Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::redis_server::find_redis_server;

    #[test]
    fn redirections_name_the_owning_node() {
        assert_eq!(moved_to("MOVED 3999 127.0.0.1:6381").unwrap().port(), 6381);
        assert!(moved_to("MOVED 3999").is_err());
    }

    /// Three real nodes become one cluster; a sharded publish finds its node wherever the
    /// channel's slot is; killed and restarted, the same cluster forms again.
    #[tokio::test]
    async fn a_real_cluster_forms_publishes_and_comes_back() {
        let bin = find_redis_server().unwrap();
        let cluster = RedisCluster::start(&bin, Arc::new(Redactor::default()), Duration::from_secs(20)).await.unwrap();
        let mut redis = Redis::Cluster(cluster);
        assert_eq!(redis.args()[2], "--redis-cluster");
        assert_eq!(redis.args()[1].matches("redis://127.0.0.1:").count(), 3);
        for channel in ["wsgate:ch:alerts", "wsgate:ch:user:1", "wsgate:ch:x", "wsgate:ch:y"] {
            assert_eq!(redis.publish(channel, b"{}", Duration::from_secs(5)).await.unwrap(), 0, "{channel}");
        }
        redis.kill("KILL").await.unwrap();
        assert!(redis.exited().is_some());
        redis.restart(Duration::from_secs(20)).await.unwrap();
        assert!(redis.exited().is_none());
        assert_eq!(redis.publish("wsgate:ch:alerts", b"{}", Duration::from_secs(5)).await.unwrap(), 0);
    }
}
