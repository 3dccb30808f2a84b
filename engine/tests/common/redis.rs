//! A real `redis-server` for tests: on a free loopback port, without persistence, killed when
//! dropped. It can be stopped and started again on the same port (an outage). [`RedisCluster`]
//! is three of them made a Redis Cluster with `redis-cli --cluster create`; [`TestRedis`] is
//! either, for tests that run against both.

use std::net::TcpListener;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::time::Instant;

pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// A node of a Redis Cluster (its bus on `port + 10000`).
    cluster_node: bool,
}

impl RedisServer {
    /// Starts one and waits until it answers.
    pub async fn start() -> RedisServer {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut server = RedisServer { port, dir: tempfile::tempdir().unwrap(), child: None, cluster_node: false };
        server.restart().await;
        server
    }

    /// Starts a node for a Redis Cluster, on a free port whose bus port (+10000) is free too.
    async fn start_cluster_node() -> RedisServer {
        let port = loop {
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            if port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
                break port;
            }
        };
        let mut server = RedisServer { port, dir: tempfile::tempdir().unwrap(), child: None, cluster_node: true };
        server.restart().await;
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Starts it (again) on the same port.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child =
            Command::new("redis-server")
                .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(self.dir.path())
                .args(if self.cluster_node {
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "2000",
                    ][..]
                } else {
                    &[]
                })
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("redis-server must be installed (scripts/test.sh installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut con) = self.connection().await
                && redis::cmd("PING").query_async::<String>(&mut con).await.is_ok()
            {
                return;
            }
            assert!(Instant::now() < deadline, "redis-server did not answer within 10 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills it (as a crash or a network loss would look to the instances).
    pub async fn stop(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().await.unwrap();
    }

    /// A plain connection, for the test's own commands.
    pub async fn connection(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        let client = redis::Client::open(self.url())?;
        client.get_multiplexed_async_connection().await
    }
}

/// A Redis Cluster of three primaries (no replicas) on free loopback ports.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts three nodes, makes them a cluster and waits until it serves every slot.
    pub async fn start() -> RedisCluster {
        let mut nodes = Vec::new();
        for _ in 0..3 {
            nodes.push(RedisServer::start_cluster_node().await);
        }
        let status = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .expect("redis-cli must be installed (it comes with redis-server)");
        assert!(status.success(), "redis-cli --cluster create failed");
        let cluster = RedisCluster { nodes };
        cluster.wait_until_ok().await;
        cluster
    }

    /// The seed nodes, as `--redis` takes them with `--redis-cluster`.
    pub fn url(&self) -> String {
        self.nodes.iter().map(RedisServer::url).collect::<Vec<_>>().join(",")
    }

    async fn wait_until_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        for node in &self.nodes {
            loop {
                let info = match node.connection().await {
                    Ok(mut con) => redis::cmd("CLUSTER").arg("INFO").query_async::<String>(&mut con).await.ok(),
                    Err(_) => None,
                };
                if info.is_some_and(|i| i.contains("cluster_state:ok")) {
                    break;
                }
                assert!(Instant::now() < deadline, "the Redis Cluster did not come up within 20 s");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Kills every node.
    pub async fn stop(&mut self) {
        for node in &mut self.nodes {
            node.stop().await;
        }
    }

    /// Starts every node again (they keep their `nodes.conf`, so the same cluster forms).
    pub async fn restart(&mut self) {
        for node in &mut self.nodes {
            node.restart().await;
        }
        self.wait_until_ok().await;
    }
}

/// The Redis a test runs against: one server, or a cluster.
pub enum TestRedis {
    Server(RedisServer),
    Cluster(RedisCluster),
}

impl TestRedis {
    pub async fn server() -> TestRedis {
        TestRedis::Server(RedisServer::start().await)
    }

    pub async fn cluster() -> TestRedis {
        TestRedis::Cluster(RedisCluster::start().await)
    }

    pub fn url(&self) -> String {
        match self {
            TestRedis::Server(s) => s.url(),
            TestRedis::Cluster(c) => c.url(),
        }
    }

    pub fn topology(&self) -> wsgate::broker::redis::Topology {
        match self {
            TestRedis::Server(_) => wsgate::broker::redis::Topology::Server,
            TestRedis::Cluster(_) => wsgate::broker::redis::Topology::Cluster,
        }
    }

    /// `PUBLISH`, or `SPUBLISH` on a cluster: what a backend publishing straight into Redis uses.
    pub fn publish_command(&self) -> &'static str {
        match self {
            TestRedis::Server(_) => "PUBLISH",
            TestRedis::Cluster(_) => "SPUBLISH",
        }
    }

    /// A connection for the test's own commands (routed by key on a cluster).
    pub async fn connection(&self) -> wsgate::broker::redis::link::Commands {
        let link = wsgate::broker::redis::link::Link::open(&self.url(), self.topology()).unwrap();
        link.commands().unwrap()
    }

    /// Subscriptions to a Redis channel, over every node (on a cluster, sharded ones: only the
    /// node owning the channel's slot has any).
    pub async fn subscribers(&self, channel: &str) -> i64 {
        let numsub = match self {
            TestRedis::Server(_) => "NUMSUB",
            TestRedis::Cluster(_) => "SHARDNUMSUB",
        };
        let mut total = 0;
        for node in self.nodes() {
            let mut con = node.connection().await.unwrap();
            let (_, n): (String, i64) =
                redis::cmd("PUBSUB").arg(numsub).arg(channel).query_async(&mut con).await.unwrap();
            total += n;
        }
        total
    }

    /// Every node (one for a server).
    pub fn nodes(&self) -> &[RedisServer] {
        match self {
            TestRedis::Server(s) => std::slice::from_ref(s),
            TestRedis::Cluster(c) => &c.nodes,
        }
    }

    /// Kills every pub/sub connection on every node; answers how many.
    pub async fn kill_subscriptions(&self) -> i64 {
        let mut killed = 0;
        for node in self.nodes() {
            let mut con = node.connection().await.unwrap();
            killed +=
                redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub").query_async::<i64>(&mut con).await.unwrap();
        }
        killed
    }

    pub async fn stop(&mut self) {
        match self {
            TestRedis::Server(s) => s.stop().await,
            TestRedis::Cluster(c) => c.stop().await,
        }
    }

    pub async fn restart(&mut self) {
        match self {
            TestRedis::Server(s) => s.restart().await,
            TestRedis::Cluster(c) => c.restart().await,
        }
    }
}
