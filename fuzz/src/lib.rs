//! Shared pieces of the wsgate fuzz targets: the default policy, fixed claims and connection
//! records, and the stacks the engine runs on.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::{Arc, OnceLock, mpsc};
use std::time::{Duration, SystemTime};

use wsgate::policy::source::SourceFile;
use wsgate::policy::{CompileOptions, ConnInfo, Policy, PolicySource, RequestInfo, Scheme, compile};

/// The default policy directory of the repository.
pub const POLICY_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../policies");

/// Stack of the policy compiler's thread (`compile.rs`): CEL parsing recurses with nesting.
pub const COMPILE_STACK: usize = 256 << 20;

/// Stack the server evaluates on: a tokio worker's default. Every accepted expression must
/// evaluate and drop within it.
pub const WORKER_STACK: usize = 2 << 20;

/// A fixed instant, so that runs are reproducible (2026-01-04T03:30:00Z, a Sunday).
pub fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_497_400)
}

fn secret_lookup(_: &str) -> Option<String> {
    Some("0123456789abcdef0123456789abcdef-bench".to_string())
}

/// Compile options with a fixed HMAC secret (the process environment is never read).
pub fn options() -> CompileOptions<'static> {
    CompileOptions { generation: 1, secret_lookup: &secret_lookup }
}

/// The default policy's files, read once.
pub fn default_source() -> &'static PolicySource {
    static SOURCE: OnceLock<PolicySource> = OnceLock::new();
    SOURCE.get_or_init(|| {
        PolicySource::read_dir(Path::new(POLICY_DIR)).unwrap_or_else(|e| panic!("reading {POLICY_DIR}: {e:?}"))
    })
}

/// The default policy's schema files.
pub fn default_schemas() -> &'static [SourceFile] {
    &default_source().schemas
}

/// The default policy, compiled once.
pub fn default_policy() -> Arc<Policy> {
    static POLICY: OnceLock<Arc<Policy>> = OnceLock::new();
    POLICY
        .get_or_init(|| {
            Arc::new(compile(default_source(), &options()).unwrap_or_else(|e| panic!("compiling {POLICY_DIR}: {e:?}")))
        })
        .clone()
}

/// Claims of a publisher with a few fields of every JSON kind.
pub fn publisher_claims() -> serde_json::Value {
    serde_json::json!({
        "sub": "ops",
        "roles": ["reader", "publisher"],
        "team": "eu",
        "email": "ops@example.com",
        "email_verified": true,
        "exp": 4_102_444_800_i64,
        "iat": 1_767_400_000_i64,
        "big": u64::MAX,
        "ratio": 0.5,
        "nested": {"a": {"b": [true, null, -1, "x"]}}
    })
}

/// Claims of a user with no roles at all.
pub fn plain_claims() -> serde_json::Value {
    serde_json::json!({"sub": "alice", "exp": 4_102_444_800_i64})
}

/// A connection record.
pub fn conn_info() -> ConnInfo {
    ConnInfo {
        id: "c-0001".into(),
        user: "ops".into(),
        ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)),
        instance: "fuzz".into(),
        connected_at: now() - Duration::from_secs(60),
    }
}

/// An upgrade request.
pub fn request_info() -> RequestInfo {
    RequestInfo {
        ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7)),
        scheme: Scheme::Wss,
        origin: Some("https://app.example.com".into()),
        path: "/ws".into(),
        query: vec![("v".into(), "1".into())],
        headers: vec![("user-agent".into(), "fuzz/1.0".into()), ("host".into(), "gw.example.com".into())],
    }
}

/// A message of every JSON kind.
pub fn sample_message() -> serde_json::Value {
    serde_json::json!({
        "type": "publish",
        "id": "m-1",
        "channel": "alerts:eu",
        "data": {"level": "high", "text": "disk full", "n": 3, "items": [1, 2, 3], "f": 1.5, "from": "ops"}
    })
}

type Job = Box<dyn FnOnce() + Send>;

/// A thread with a chosen stack size that runs closures one at a time. Kept for the whole run:
/// spawning a thread with a 256 MiB stack for every input costs milliseconds under ASan.
pub struct Worker {
    jobs: mpsc::Sender<Job>,
}

impl Worker {
    /// Starts a worker thread with a `stack`-byte stack.
    pub fn new(name: &str, stack: usize) -> Worker {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name(name.into())
            .stack_size(stack)
            .spawn(move || {
                for job in queue {
                    job();
                }
            })
            .expect("spawning a worker thread");
        Worker { jobs }
    }

    /// Runs `f` on the worker and returns its result. A panic there still aborts the process:
    /// libFuzzer's panic hook runs on every thread.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (done, result) = mpsc::sync_channel(1);
        self.jobs
            .send(Box::new(move || {
                let _ = done.send(f());
            }))
            .expect("the worker thread is gone");
        result.recv().expect("the worker thread panicked")
    }
}

/// A worker with the policy compiler's stack.
pub fn compile_worker() -> &'static Worker {
    static WORKER: OnceLock<Worker> = OnceLock::new();
    WORKER.get_or_init(|| Worker::new("fuzz-compile", COMPILE_STACK))
}

/// A worker with a server worker's stack.
pub fn eval_worker() -> &'static Worker {
    static WORKER: OnceLock<Worker> = OnceLock::new();
    WORKER.get_or_init(|| Worker::new("fuzz-eval", WORKER_STACK))
}
