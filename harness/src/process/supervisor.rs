//! Child processes the harness runs: the `wsgate` servers and `redis-server`. A
//! [`Process`] captures the child's stdout and stderr into a [`LogBuffer`] for failure reports
//! and log checks, waits for a readiness line, stops the child with SIGTERM, and kills it when
//! dropped — nothing the harness starts may outlive it.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::time::Instant;

/// Lines kept per process (older ones are dropped; leak checks still see every line).
const MAX_LOG_LINES: usize = 20_000;

/// Secrets and tokens the harness handed out. Every captured log line is checked against them
/// (SPEC §2: logs never contain a token or a secret) and redacted before anyone sees it, so a
/// failure report never prints one either.
#[derive(Debug, Default)]
pub(crate) struct Redactor {
    /// (label, secret) pairs; the label says what leaked without showing it.
    secrets: Mutex<Vec<(String, String)>>,
    /// Labels of secrets seen in some process's output, with the process name.
    leaks: Mutex<Vec<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Redactor {
    /// Registers a secret under a label (e.g. "the token of connection `a`"). Short strings are
    /// ignored: they would match innocent text.
    pub(crate) fn register(&self, label: impl Into<String>, secret: impl Into<String>) {
        let secret = secret.into();
        if secret.len() >= 16 {
            lock(&self.secrets).push((label.into(), secret));
        }
    }

    /// `text` with every registered secret replaced by `<redacted: label>`.
    pub(crate) fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        for (label, secret) in lock(&self.secrets).iter() {
            if out.contains(secret.as_str()) {
                out = out.replace(secret.as_str(), &format!("<redacted: {label}>"));
            }
        }
        out
    }

    /// Redacts one captured line, remembering which secrets it contained.
    fn scrub(&self, process: &str, line: &str) -> String {
        let mut leaked = Vec::new();
        for (label, secret) in lock(&self.secrets).iter() {
            if line.contains(secret.as_str()) {
                leaked.push(format!("{process} logged {label}"));
            }
        }
        if !leaked.is_empty() {
            let mut leaks = lock(&self.leaks);
            for l in leaked {
                if !leaks.contains(&l) {
                    leaks.push(l);
                }
            }
        }
        self.redact(line)
    }

    /// What leaked so far, one description per secret and process.
    pub(crate) fn leaks(&self) -> Vec<String> {
        lock(&self.leaks).clone()
    }
}

/// Which stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

#[derive(Debug, Default)]
struct LogInner {
    /// The most recent lines (already redacted).
    lines: VecDeque<(Stream, String)>,
    /// How many lines were ever pushed: absolute line numbers survive dropping old ones.
    total: u64,
    /// How many of stdout and stderr have reached EOF.
    closed: u8,
}

/// Everything a process printed, redacted, with a way to wait for new lines.
#[derive(Debug)]
pub(crate) struct LogBuffer {
    /// The process name, for leak reports.
    name: String,
    inner: Mutex<LogInner>,
    /// Bumped on every new line and at EOF, so waiters wake without polling.
    changed: watch::Sender<u64>,
    /// Shared with everything else the scenario runs.
    redactor: Arc<Redactor>,
}

impl LogBuffer {
    fn new(name: &str, redactor: Arc<Redactor>) -> Self {
        LogBuffer { name: name.into(), inner: Mutex::default(), changed: watch::Sender::new(0), redactor }
    }

    fn push(&self, stream: Stream, line: &str) {
        let line = self.redactor.scrub(&self.name, line);
        let total = {
            let mut inner = lock(&self.inner);
            inner.lines.push_back((stream, line));
            if inner.lines.len() > MAX_LOG_LINES {
                inner.lines.pop_front();
            }
            inner.total += 1;
            inner.total
        };
        self.changed.send_replace(total);
    }

    fn close_stream(&self) {
        lock(&self.inner).closed += 1;
        self.changed.send_modify(|_| {});
    }

    /// The last `n` lines, each prefixed with its stream.
    pub(crate) fn tail(&self, n: usize) -> Vec<String> {
        let inner = lock(&self.inner);
        let skip = inner.lines.len().saturating_sub(n);
        inner
            .lines
            .iter()
            .skip(skip)
            .map(|(s, l)| format!("{} {l}", if *s == Stream::Stdout { "out|" } else { "err|" }))
            .collect()
    }

    /// Whether any kept line contains `needle`.
    #[cfg(test)]
    pub(crate) fn contains(&self, needle: &str) -> bool {
        lock(&self.inner).lines.iter().any(|(_, l)| l.contains(needle))
    }

    /// Waits until some line (from the first kept one on) gives `Some` under `find`, until
    /// `deadline`. `Err(true)` when both streams closed first, `Err(false)` on timeout.
    pub(crate) async fn wait_for<T>(
        &self,
        mut find: impl FnMut(&str) -> Option<T>,
        deadline: Instant,
    ) -> Result<T, bool> {
        let mut rx = self.changed.subscribe();
        let mut next: u64 = 0;
        loop {
            rx.borrow_and_update();
            {
                let inner = lock(&self.inner);
                let first = inner.total - inner.lines.len() as u64;
                let start = next.max(first);
                for (_, line) in inner.lines.iter().skip((start - first) as usize) {
                    if let Some(found) = find(line) {
                        return Ok(found);
                    }
                }
                next = inner.total;
                if inner.closed >= 2 {
                    return Err(true);
                }
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return Err(false),
            }
        }
    }
}

#[derive(Debug)]
pub(crate) struct Process {
    /// A name for messages (`wsgate main`).
    name: String,
    /// The child; `kill_on_drop` so a failing or interrupted harness leaves nothing behind.
    child: Child,
    log: Arc<LogBuffer>,
    /// Its exit status once known.
    status: Option<ExitStatus>,
}

impl Process {
    /// Starts `command` with stdin closed and stdout/stderr captured.
    pub(crate) fn spawn(name: &str, mut command: Command, redactor: Arc<Redactor>) -> Result<Self, String> {
        command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        let mut child = command.spawn().map_err(|e| format!("cannot start {name}: {e}"))?;
        let log = Arc::new(LogBuffer::new(name, redactor));
        if let Some(out) = child.stdout.take() {
            tokio::spawn(capture(out, Stream::Stdout, Arc::clone(&log)));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(capture(err, Stream::Stderr, Arc::clone(&log)));
        }
        Ok(Process { name: name.into(), child, log, status: None })
    }

    /// Its captured output.
    pub(crate) fn log(&self) -> &Arc<LogBuffer> {
        &self.log
    }

    /// Its process id while it runs.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Its exit status, if it has exited.
    pub(crate) fn exit_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Sends `signal` (`TERM`, `INT`, …) and returns at once. Fails when the process has
    /// already exited (its id may belong to another process by now) or `kill` fails.
    pub(crate) async fn signal(&mut self, signal: &str) -> Result<(), String> {
        if let Some(status) = self.exit_status() {
            return Err(format!("{} has already exited ({status})", self.name));
        }
        let pid = self.pid().ok_or_else(|| format!("{} has already exited", self.name))?;
        let sent = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
        match sent {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => Err(format!("`kill -{signal} {pid}` failed ({s})")),
            Err(e) => Err(format!("cannot run `kill`: {e}")),
        }
    }

    /// Waits for the process to exit, until `deadline`; `None` if it is still running then.
    pub(crate) async fn wait_exit(&mut self, deadline: Instant) -> Result<Option<ExitStatus>, String> {
        if let Some(status) = self.exit_status() {
            return Ok(Some(status));
        }
        match tokio::time::timeout_at(deadline, self.child.wait()).await {
            Ok(status) => {
                let status = status.map_err(|e| format!("cannot wait for {}: {e}", self.name))?;
                self.status = Some(status);
                Ok(Some(status))
            }
            Err(_) => Ok(None),
        }
    }

    /// Sends SIGTERM and waits up to `grace` for the exit; kills it after that. A process that
    /// has already exited is left alone and its status returned.
    pub(crate) async fn stop(&mut self, grace: Duration) -> Result<ExitStatus, String> {
        if let Some(status) = self.exit_status() {
            return Ok(status);
        }
        if self.signal("TERM").await.is_err() {
            let _ = self.child.start_kill();
        }
        match self.wait_exit(Instant::now() + grace).await? {
            Some(status) => Ok(status),
            None => {
                let _ = self.child.kill().await;
                Err(format!("{} did not exit within {grace:?} of SIGTERM; killed", self.name))
            }
        }
    }
}

/// How a process ended, in words: `exit status 0`, `killed by SIGKILL`.
pub(crate) fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(9)) => "killed by SIGKILL".into(),
        (None, Some(15)) => "killed by SIGTERM".into(),
        (None, Some(2)) => "killed by SIGINT".into(),
        (None, Some(6)) => "killed by SIGABRT".into(),
        (None, Some(11)) => "killed by SIGSEGV".into(),
        (None, Some(n)) => format!("killed by signal {n}"),
        (None, None) => status.to_string(),
    }
}

async fn capture(stream: impl AsyncRead + Unpin, which: Stream, log: Arc<LogBuffer>) {
    let mut reader = BufReader::new(stream);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let line = String::from_utf8_lossy(&buf);
                log.push(which, line.trim_end_matches(['\n', '\r']));
            }
        }
    }
    log.close_stream();
}

/// Random bytes as lower-case hex (`bytes` of entropy, twice as many characters).
pub(crate) fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).expect("the OS random source failed");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// The credentials shared by every server of one scenario (so tokens work on each instance).
#[derive(Debug, Clone)]
pub(crate) struct Credentials {
    /// `WSGATE_JWT_SECRET`.
    pub(crate) jwt_secret: String,
    /// `WSGATE_ADMIN_TOKEN`.
    pub(crate) admin_token: String,
}

impl Credentials {
    /// Fresh random credentials, registered with `redactor`.
    pub(crate) fn generate(redactor: &Redactor) -> Self {
        let creds = Credentials { jwt_secret: random_hex(32), admin_token: random_hex(24) };
        redactor.register("the JWT secret", creds.jwt_secret.clone());
        redactor.register("the admin token", creds.admin_token.clone());
        creds
    }
}

/// Finds the program `name` on `PATH` (and in the `sbin` directories, where Debian puts
/// daemons such as `haproxy`, which a non-root `PATH` may lack), or says clearly that it is
/// missing and which Debian package has it.
pub(crate) fn find_program(name: &str, package: &str) -> Result<PathBuf, String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let sbin = ["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from);
    std::env::split_paths(&path).chain(sbin).map(|dir| dir.join(name)).find(|candidate| candidate.is_file()).ok_or_else(
        || format!("{name} is not installed (not found on PATH): install it with `apt-get install {package}` (scripts/test.sh does)"),
    )
}

/// Finds the `wsgate` binary: `explicit`, else `$WSGATE_BIN`, else `wsgate` next to this
/// executable (both live in `target/<profile>/`).
pub(crate) fn find_wsgate(explicit: Option<&Path>) -> Result<PathBuf, String> {
    let path = match (explicit, std::env::var_os("WSGATE_BIN")) {
        (Some(p), _) => p.to_path_buf(),
        (None, Some(p)) => PathBuf::from(p),
        (None, None) => {
            let exe = std::env::current_exe().map_err(|e| format!("cannot locate the harness executable: {e}"))?;
            exe.parent().map(|d| d.join("wsgate")).ok_or("the harness executable has no directory")?
        }
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "no wsgate binary at {} (build it with `cargo build -p wsgate`, or set WSGATE_BIN / --bin)",
            path.display()
        ))
    }
}

/// How to start one wsgate instance.
#[derive(Debug, Clone)]
pub(crate) struct WsgateOptions<'a> {
    pub(crate) bin: &'a Path,
    /// The server's name in the scenario, also its `--instance-id`.
    pub(crate) name: &'a str,
    /// Its policy directory.
    pub(crate) policies: &'a Path,
    /// Extra command-line arguments.
    pub(crate) args: &'a [String],
    /// Extra environment (applied last, so it may override `RUST_LOG`).
    pub(crate) env: &'a [(String, String)],
    /// Secrets to give it.
    pub(crate) credentials: &'a Credentials,
    /// How long it may take to print its listening line.
    pub(crate) ready_timeout: Duration,
}

#[derive(Debug)]
pub(crate) struct WsgateServer {
    /// The public (WebSocket) listener.
    pub(crate) ws_addr: SocketAddr,
    /// The admin listener.
    pub(crate) admin_addr: SocketAddr,
    pub(crate) process: Process,
}

/// Parses `wsgate listening ws=ADDR admin=ADDR`.
pub(crate) fn parse_listening(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let rest = &line[line.find("wsgate listening ")? + "wsgate listening ".len()..];
    let mut ws = None;
    let mut admin = None;
    for word in rest.split_whitespace() {
        if let Some(a) = word.strip_prefix("ws=") {
            ws = a.parse().ok();
        } else if let Some(a) = word.strip_prefix("admin=") {
            admin = a.parse().ok();
        }
    }
    Some((ws?, admin?))
}

impl WsgateServer {
    /// Starts wsgate on ephemeral loopback ports and waits for its listening line.
    pub(crate) async fn start(opts: &WsgateOptions<'_>, redactor: Arc<Redactor>) -> Result<Self, String> {
        let mut command = Command::new(opts.bin);
        command
            .arg("serve")
            .arg("--policies")
            .arg(opts.policies)
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--instance-id", opts.name])
            .args(opts.args);
        // Nothing from the harness's own environment may redirect the server (a stray
        // WSGATE_REDIS_URL, WSGATE_POLICIES, …).
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("WSGATE_") {
                command.env_remove(&key);
            }
        }
        command
            .env("WSGATE_JWT_SECRET", &opts.credentials.jwt_secret)
            .env("WSGATE_ADMIN_TOKEN", &opts.credentials.admin_token)
            .env("RUST_LOG", "info");
        for (k, v) in opts.env {
            command.env(k, v);
        }
        let label = format!("wsgate `{}`", opts.name);
        let mut process = Process::spawn(&label, command, redactor)?;
        let deadline = Instant::now() + opts.ready_timeout;
        match process.log().wait_for(parse_listening, deadline).await {
            Ok((ws_addr, admin_addr)) => Ok(WsgateServer { ws_addr, admin_addr, process }),
            Err(exited) => {
                let why = if exited {
                    let status = process.stop(Duration::from_secs(2)).await.map(|s| s.to_string()).unwrap_or_default();
                    format!("exited ({status}) before printing `wsgate listening ws=… admin=…`")
                } else {
                    format!("did not print `wsgate listening ws=… admin=…` within {:?}", opts.ready_timeout)
                };
                let tail = process.log().tail(30).join("\n  ");
                Err(format!("{label} {why}; its last output:\n  {tail}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_listening_line() {
        let (ws, admin) = parse_listening("wsgate listening ws=127.0.0.1:4000 admin=127.0.0.1:4001").unwrap();
        assert_eq!(ws.port(), 4000);
        assert_eq!(admin.port(), 4001);
        assert!(parse_listening("2025 INFO wsgate listening ws=[::1]:1 admin=127.0.0.1:2").is_some());
        assert!(parse_listening("wsgate listening ws=127.0.0.1:4000").is_none());
        assert!(parse_listening("something else").is_none());
    }

    #[test]
    fn redacts_and_reports_leaks_without_the_secret() {
        let r = Redactor::default();
        r.register("the token of `a`", "eyJhbGciOiJIUzI1NiJ9.payload.sig");
        r.register("short", "abc");
        let line = r.scrub("wsgate `main`", "rejected token=eyJhbGciOiJIUzI1NiJ9.payload.sig abc");
        assert_eq!(line, "rejected token=<redacted: the token of `a`> abc");
        assert_eq!(r.leaks(), vec!["wsgate `main` logged the token of `a`".to_string()]);
    }

    #[tokio::test]
    async fn captures_output_and_waits_for_a_line() {
        let r = Arc::new(Redactor::default());
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "echo one; echo two >&2; echo 'wsgate listening ws=127.0.0.1:1 admin=127.0.0.1:2'; exec sleep 30",
        ]);
        let mut p = Process::spawn("sh", cmd, r).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let addrs = p.log().wait_for(parse_listening, deadline).await.unwrap();
        assert_eq!(addrs.1.port(), 2);
        assert!(p.log().contains("one"));
        let status = p.stop(Duration::from_secs(5)).await.unwrap();
        assert!(!status.success(), "SIGTERM ends sh");
        assert!(p.log().tail(10).iter().any(|l| l == "err| two"));
    }

    #[tokio::test]
    async fn signals_and_waits_for_the_exit() {
        let r = Arc::new(Redactor::default());
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "trap 'echo draining; exit 7' INT; echo ready; while :; do sleep 0.05; done"]);
        let mut p = Process::spawn("sh", cmd, r).unwrap();
        let soon = || Instant::now() + Duration::from_secs(10);
        p.log().wait_for(|l| (l == "ready").then_some(()), soon()).await.unwrap();
        assert_eq!(p.wait_exit(Instant::now() + Duration::from_millis(100)).await.unwrap(), None);
        p.signal("INT").await.unwrap();
        let status = p.wait_exit(soon()).await.unwrap().expect("exited");
        assert_eq!(describe_exit(status), "exit status 7");
        assert!(p.signal("TERM").await.unwrap_err().contains("already exited"));
        // Stopping an exited process only reports how it ended.
        assert_eq!(p.stop(Duration::from_secs(1)).await.unwrap().code(), Some(7));
        p.log().wait_for(|_| None::<()>, soon()).await.unwrap_err();
        assert!(p.log().contains("draining"));
    }

    #[tokio::test]
    async fn reports_an_early_exit() {
        let r = Arc::new(Redactor::default());
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo bye >&2; exit 3"]);
        let p = Process::spawn("sh", cmd, r).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        assert_eq!(p.log().wait_for(parse_listening, deadline).await, Err(true));
    }
}
