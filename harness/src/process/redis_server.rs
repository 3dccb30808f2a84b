//! The `redis-server` a scenario with `redis: true` (or a measurement with several instances)
//! runs beside its wsgate instances: started on a free loopback port with persistence off and
//! its working directory in a private temporary directory (it never writes to the harness's
//! working directory), ready once it answers on that port as the process the harness started,
//! killed and restarted on the same port for outage scenarios, and killed when dropped — like
//! every child of the harness, it never outlives it.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use tokio::process::Command;
use tokio::time::Instant;

use crate::process::supervisor::{LogBuffer, Process, Redactor, describe_exit, find_program};
use crate::wire::resp;

/// How long one readiness probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// Pause between readiness probes while Redis starts (it is usually up within a few ms).
const PROBE_INTERVAL: Duration = Duration::from_millis(20);
/// Free ports tried before giving up, when another process takes the chosen one first.
const PORT_ATTEMPTS: usize = 5;
/// How long Redis may take to exit after a signal.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Finds `redis-server` on `PATH`, or says clearly that it is missing and how to get it.
pub(crate) fn find_redis_server() -> Result<PathBuf, String> {
    find_program("redis-server", "redis-server")
}

/// A free TCP port on 127.0.0.1 (bound and released at once; Redis binds it right after).
fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| format!("cannot find a free loopback port for Redis: {e}"))?;
    listener.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

/// Why a launch failed.
enum LaunchError {
    /// The port was taken by another process: worth another port on first start.
    PortTaken(String),
    Failed(String),
}

/// A supervised `redis-server`.
#[derive(Debug)]
pub(crate) struct RedisServer {
    /// The binary, to restart it.
    bin: PathBuf,
    /// Its port on 127.0.0.1; a restart reuses it, so the wsgate instances find it again.
    port: u16,
    /// Its `--dir`: with persistence off nothing should land there, but if anything does, it
    /// lands here and is deleted with it, never in the harness's working directory.
    dir: tempfile::TempDir,
    /// The current run (a restart replaces it).
    process: Process,
    /// Shared with the scenario, so its output is redacted and leak-checked like the servers'.
    redactor: Arc<Redactor>,
    /// A node of a Redis Cluster (`--cluster-enabled yes`, its bus on `port + 10000`).
    cluster_node: bool,
}

impl RedisServer {
    /// Starts `bin` on a free loopback port and waits until it answers there, within
    /// `ready_timeout`.
    pub(crate) async fn start(bin: &Path, redactor: Arc<Redactor>, ready_timeout: Duration) -> Result<Self, String> {
        Self::start_as(bin, redactor, ready_timeout, false).await
    }

    /// Starts a node for a Redis Cluster (see `redis_cluster.rs`): on a free port whose
    /// cluster bus port (+10000) is free too.
    pub(crate) async fn start_cluster_node(
        bin: &Path,
        redactor: Arc<Redactor>,
        ready_timeout: Duration,
    ) -> Result<Self, String> {
        Self::start_as(bin, redactor, ready_timeout, true).await
    }

    async fn start_as(
        bin: &Path,
        redactor: Arc<Redactor>,
        ready_timeout: Duration,
        cluster_node: bool,
    ) -> Result<Self, String> {
        let dir = tempfile::Builder::new()
            .prefix("wsgate-redis-")
            .tempdir()
            .map_err(|e| format!("cannot create a temporary directory for Redis: {e}"))?;
        let mut last = String::new();
        // About a fifth of the ephemeral ports have no room for a bus port above them.
        let attempts = if cluster_node { 4 * PORT_ATTEMPTS } else { PORT_ATTEMPTS };
        for _ in 0..attempts {
            let port = free_port()?;
            if cluster_node
                && (port >= 55_000 || std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port + 10_000)).is_err())
            {
                last = format!("the cluster bus port of {port} is not free");
                continue;
            }
            match launch(bin, port, dir.path(), &redactor, ready_timeout, cluster_node).await {
                Ok(process) => {
                    return Ok(RedisServer { bin: bin.to_path_buf(), port, dir, process, redactor, cluster_node });
                }
                Err(LaunchError::PortTaken(why)) => last = why,
                Err(LaunchError::Failed(why)) => return Err(why),
            }
        }
        Err(format!("could not start Redis on a free port in {attempts} attempts; the last: {last}"))
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The URL wsgate takes with `--redis`.
    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The current run's output.
    pub(crate) fn log(&self) -> &Arc<LogBuffer> {
        self.process.log()
    }

    /// Whether the current run is still going.
    pub(crate) fn is_running(&mut self) -> bool {
        self.process.exit_status().is_none()
    }

    /// Its exit status, once it has exited.
    pub(crate) fn exit_status(&mut self) -> Option<ExitStatus> {
        self.process.exit_status()
    }

    /// Sends `signal` (`KILL`, `TERM`) and waits until the process is gone, so that when this
    /// returns, nothing answers on the port any more.
    pub(crate) async fn kill(&mut self, signal: &str) -> Result<(), String> {
        self.process.signal(signal).await?;
        match self.process.wait_exit(Instant::now() + EXIT_TIMEOUT).await? {
            Some(_) => Ok(()),
            None => Err(format!("redis-server did not exit within {EXIT_TIMEOUT:?} of SIG{signal}")),
        }
    }

    /// Starts it again on the same port (after [`kill`](Self::kill)) and waits until it answers.
    pub(crate) async fn restart(&mut self, ready_timeout: Duration) -> Result<(), String> {
        if self.is_running() {
            return Err(format!("redis-server is still running on port {}", self.port));
        }
        match launch(&self.bin, self.port, self.dir.path(), &self.redactor, ready_timeout, self.cluster_node).await {
            Ok(process) => {
                self.process = process;
                Ok(())
            }
            Err(LaunchError::PortTaken(why)) => {
                Err(format!("cannot restart Redis on the same port {}: another process took it ({why})", self.port))
            }
            Err(LaunchError::Failed(why)) => Err(why),
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; an exited Redis is left alone.
    pub(crate) async fn stop(&mut self, grace: Duration) -> Result<ExitStatus, String> {
        self.process.stop(grace).await
    }
}

/// Starts one `redis-server` run on `port` and waits until it answers there as itself.
async fn launch(
    bin: &Path,
    port: u16,
    dir: &Path,
    redactor: &Arc<Redactor>,
    ready_timeout: Duration,
    cluster_node: bool,
) -> Result<Process, LaunchError> {
    let mut command = Command::new(bin);
    command
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        // No persistence: nothing to load at a restart, nothing written anywhere.
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        // The log goes to stdout, where the supervisor captures it for failure reports.
        .args(["--logfile", "", "--daemonize", "no", "--protected-mode", "yes"]);
    if cluster_node {
        // Its slot map goes to `nodes.conf` in its private directory, so a restart on the same
        // port rejoins the same cluster.
        command.args([
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "2000",
        ]);
    }
    let label = format!("redis-server on port {port}");
    let mut process = Process::spawn(&label, command, Arc::clone(redactor)).map_err(LaunchError::Failed)?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + ready_timeout;
    loop {
        if let Some(status) = process.exit_status() {
            // The last lines may still be in the pipe.
            let _ = process.log().wait_for(|_| None::<()>, Instant::now() + Duration::from_secs(1)).await;
            let tail = process.log().tail(15).join("\n  ");
            let why =
                format!("{label} exited ({}) before answering; its last output:\n  {tail}", describe_exit(status));
            return Err(if tail.contains("Address already in use") {
                LaunchError::PortTaken(why)
            } else {
                LaunchError::Failed(why)
            });
        }
        // Ready once the process answering on the port is the one just started (not another
        // Redis that took the port in between).
        match resp::process_id(addr, PROBE_TIMEOUT).await {
            Ok(pid) if Some(pid) == process.pid() => return Ok(process),
            Ok(other) => {
                let _ = process.stop(Duration::from_secs(2)).await;
                return Err(LaunchError::PortTaken(format!("another Redis (pid {other}) answers on port {port}")));
            }
            Err(_) if Instant::now() < deadline => tokio::time::sleep(PROBE_INTERVAL).await,
            Err(e) => {
                let _ = process.stop(Duration::from_secs(2)).await;
                let tail = process.log().tail(15).join("\n  ");
                return Err(LaunchError::Failed(format!(
                    "{label} did not answer within {ready_timeout:?} ({e}); its last output:\n  {tail}"
                )));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pid_is_alive(pid: u32) -> bool {
        // A zombie (exited, not yet reaped) counts as gone.
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| stat.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
    }

    /// A real redis-server: started on a free port, PING over the harness's RESP client, killed
    /// (nothing answers), restarted on the same port (answers again, a new process), PUBLISH
    /// with no subscriber, and killed when dropped. The working directory stays empty.
    #[tokio::test]
    async fn starts_kills_and_restarts_a_real_redis_on_the_same_port() {
        let bin = find_redis_server().unwrap();
        let redactor = Arc::new(Redactor::default());
        let mut redis = RedisServer::start(&bin, redactor, Duration::from_secs(10)).await.unwrap();
        let addr = redis.addr();
        assert!(redis.url().starts_with("redis://127.0.0.1:") && redis.url().ends_with('/'));
        let t = Duration::from_secs(5);
        resp::ping(addr, t).await.unwrap();
        let first = redis.process.pid().unwrap();
        assert!(redis.is_running());

        redis.kill("KILL").await.unwrap();
        assert!(!redis.is_running());
        assert!(resp::ping(addr, t).await.unwrap_err().contains("cannot connect"));
        assert!(redis.kill("KILL").await.unwrap_err().contains("already exited"));

        redis.restart(Duration::from_secs(10)).await.unwrap();
        assert_eq!(redis.addr(), addr);
        resp::ping(addr, t).await.unwrap();
        let second = redis.process.pid().unwrap();
        assert_ne!(first, second);
        assert!(redis.restart(Duration::from_secs(10)).await.unwrap_err().contains("still running"));
        assert_eq!(resp::publish(addr, "wsgate:ch:alerts", b"{}", t).await.unwrap(), 0);
        assert!(redis.log().tail(100).iter().any(|l| l.contains("Ready to accept connections")));

        let dir = redis.dir.path().to_path_buf();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "Redis wrote into its --dir");
        drop(redis);
        // kill_on_drop: the process is gone, and with it its port and directory.
        let deadline = Instant::now() + Duration::from_secs(5);
        while pid_is_alive(second) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!pid_is_alive(second), "redis-server outlived its RedisServer");
        assert!(!dir.exists());
    }

    /// A port held by someone else makes a restart fail with a clear message.
    #[tokio::test]
    async fn restart_on_a_taken_port_says_so() {
        let bin = find_redis_server().unwrap();
        let mut redis = RedisServer::start(&bin, Arc::new(Redactor::default()), Duration::from_secs(10)).await.unwrap();
        redis.kill("TERM").await.unwrap();
        let squatter = std::net::TcpListener::bind(redis.addr()).unwrap();
        let e = redis.restart(Duration::from_secs(10)).await.unwrap_err();
        assert!(e.contains("cannot restart Redis on the same port"), "{e}");
        drop(squatter);
    }
}
