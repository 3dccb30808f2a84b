//! `fanout-latency`: how long a message published through the admin API takes to reach every
//! connected client, on one instance or on several sharing a Redis. Starts the instances (and
//! Redis when there are several, or with `--redis`), connects N clients of distinct users spread
//! evenly across them, then publishes M messages to `alerts` through `POST /v1/publish` on the
//! first instance, paced, each carrying its send time. Every client records every delivery's
//! latency (arrival − send, both on this process's monotonic clock); the result is the latency
//! distribution over all deliveries, and the count of deliveries, which must be N × M.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

use crate::measure::fleet;
use crate::measure::reload_latency::Latencies;
use crate::process::redis_cluster::{Redis, RedisCluster};
use crate::process::redis_server::{self, RedisServer};
use crate::process::supervisor::{Credentials, Redactor};
use crate::wire::client::{Connection, Event};
use crate::wire::http::{self, HttpRequest};

/// The channel every connection is subscribed to from the start (SPEC §4).
const CHANNEL: &str = "alerts";
/// How long instances with Redis may take to report ready.
pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone)]
pub(crate) struct FanoutOptions {
    pub(crate) bin: PathBuf,
    /// The policy directory to start from.
    pub(crate) policies: PathBuf,
    /// How many clients, spread evenly across the instances.
    pub(crate) clients: usize,
    /// How many wsgate instances; more than one share a Redis.
    pub(crate) instances: usize,
    /// Run with a Redis even with one instance (to see what Redis adds).
    pub(crate) redis: bool,
    /// The Redis is a three-node Redis Cluster (`--redis-cluster`, sharded pub/sub).
    pub(crate) redis_cluster: bool,
    /// How many messages to publish.
    pub(crate) messages: usize,
    /// The pause between two publishes.
    pub(crate) interval: Duration,
    /// How long after the last publish the clients may take to receive everything.
    pub(crate) grace: Duration,
    /// How many handshakes run at once.
    pub(crate) parallel: usize,
}

impl FanoutOptions {
    /// Whether the measurement runs a Redis.
    pub(crate) fn with_redis(&self) -> bool {
        self.redis || self.redis_cluster || self.instances > 1
    }
}

/// One delivery a client received.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Delivery {
    /// The message's number (0-based, in publish order).
    seq: usize,
    /// Arrival − send.
    latency: Duration,
    /// The message id the delivery carried.
    id: String,
}

/// What one client saw.
#[derive(Debug, Clone, Default)]
struct ClientLog {
    /// Every delivery of a measurement message, in arrival order.
    deliveries: Vec<Delivery>,
    /// How the connection ended, if it ended before the measurement did.
    ended: Option<String>,
}

#[derive(Debug, Clone)]
pub(crate) struct FanoutMeasurement {
    /// Clients connected.
    pub(crate) clients: usize,
    /// Instances they were spread over.
    pub(crate) instances: usize,
    /// Whether the instances ran with Redis.
    pub(crate) redis: bool,
    /// Whether that Redis was a Redis Cluster.
    pub(crate) redis_cluster: bool,
    /// Messages published.
    pub(crate) messages: usize,
    /// The latency of each first delivery of a message to a client, sorted.
    pub(crate) latencies: Vec<Duration>,
    /// (client, message) pairs never delivered.
    pub(crate) missing: usize,
    /// Deliveries of a message a client had already received.
    pub(crate) duplicates: usize,
    /// Deliveries whose id is not the one the publish answered.
    pub(crate) wrong_ids: usize,
    /// Clients whose connection ended during the measurement, with how (the first few).
    pub(crate) ended: Vec<String>,
}

impl FanoutMeasurement {
    /// Deliveries expected: every client gets every message once.
    pub(crate) fn expected(&self) -> usize {
        self.clients * self.messages
    }

    /// Whether every client got every message exactly once, with the published id.
    pub(crate) fn passed(&self) -> bool {
        self.missing == 0 && self.duplicates == 0 && self.wrong_ids == 0 && self.ended.is_empty()
    }

    /// The result line, e.g. `fanout latency: 2000 clients on 2 instances with Redis, 50
    /// messages, 100000 of 100000 deliveries: p50 1.2 ms, p99 8.4 ms, max 15.0 ms`.
    pub(crate) fn summary(&self) -> String {
        let ms = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1000.0);
        let sorted = Latencies(self.latencies.clone());
        let instances =
            if self.instances == 1 { "1 instance".to_string() } else { format!("{} instances", self.instances) };
        let broker = match (self.redis, self.redis_cluster) {
            (true, true) => "over a Redis Cluster",
            (true, false) => "with Redis",
            _ => "without Redis",
        };
        let mut problems = Vec::new();
        if self.missing > 0 {
            problems.push(format!("{} missing", self.missing));
        }
        if self.duplicates > 0 {
            problems.push(format!("{} duplicated", self.duplicates));
        }
        if self.wrong_ids > 0 {
            problems.push(format!("{} with another id", self.wrong_ids));
        }
        if !self.ended.is_empty() {
            problems.push(format!("{} connections ended", self.ended.len()));
        }
        let problems = if problems.is_empty() { String::new() } else { format!(" ({})", problems.join(", ")) };
        format!(
            "fanout latency: {} clients on {instances} {broker}, {} messages, {} of {} deliveries{problems}: \
             p50 {} ms, p99 {} ms, max {} ms",
            self.clients,
            self.messages,
            self.latencies.len(),
            self.expected(),
            ms(sorted.percentile(50)),
            ms(sorted.percentile(99)),
            ms(self.latencies.last().copied().unwrap_or_default()),
        )
    }
}

/// Sums up what the clients saw against the ids the publishes answered (`ids[seq]`).
fn tally(opts: &FanoutOptions, ids: &[String], logs: Vec<ClientLog>) -> FanoutMeasurement {
    let mut m = FanoutMeasurement {
        clients: opts.clients,
        instances: opts.instances,
        redis: opts.with_redis(),
        redis_cluster: opts.redis_cluster,
        messages: ids.len(),
        latencies: Vec::with_capacity(opts.clients * ids.len()),
        missing: 0,
        duplicates: 0,
        wrong_ids: 0,
        ended: Vec::new(),
    };
    let mut ended = 0usize;
    for log in logs {
        let mut seen = BTreeSet::new();
        for d in log.deliveries {
            if !seen.insert(d.seq) {
                m.duplicates += 1;
                continue;
            }
            if ids.get(d.seq) != Some(&d.id) {
                m.wrong_ids += 1;
            }
            m.latencies.push(d.latency);
        }
        m.missing += ids.len() - seen.len();
        if let Some(how) = log.ended {
            ended += 1;
            if m.ended.len() < 5 {
                m.ended.push(how);
            }
        }
    }
    if ended > m.ended.len() {
        m.ended.push(format!("… {} more", ended - m.ended.len()));
    }
    m.latencies.sort();
    m
}

/// Reads one frame: `Some` for a delivery of a measurement message.
fn delivery(text: &str, t0: Instant, now: Instant) -> Option<Delivery> {
    let v: Value = serde_json::from_str(text).ok()?;
    if v["type"] != "message" || v["channel"] != CHANNEL {
        return None;
    }
    let seq = usize::try_from(v["data"]["seq"].as_u64()?).ok()?;
    let sent = Duration::from_micros(v["data"]["sent_us"].as_u64()?);
    let latency = now.duration_since(t0).saturating_sub(sent);
    Some(Delivery { seq, latency, id: v["id"].as_str().unwrap_or_default().to_string() })
}

/// One client's reader: records deliveries until it has `messages` of them, its connection
/// ends, or `stop` says the measurement is over. Keeps the connection until then, so it stays
/// subscribed (and answers pings).
async fn collect(mut conn: Connection, t0: Instant, messages: usize, mut stop: watch::Receiver<bool>) -> ClientLog {
    let mut log = ClientLog::default();
    let record = |log: &mut ClientLog, event: Event, at: Instant| match event {
        Event::Text(text) => {
            if let Some(d) = delivery(&text, t0, at) {
                log.deliveries.push(d);
            }
            false
        }
        Event::Binary(_) => false,
        end => {
            log.ended = Some(end.describe());
            true
        }
    };
    let far = Instant::now() + Duration::from_secs(24 * 3600);
    // Each arrival is timed by the connection's task as it reads the socket, so the time an
    // event waits for this reader is not counted.
    while log.deliveries.len() < messages {
        tokio::select! {
            event = conn.next_event_timed(far) => {
                let Some((event, at)) = event else { break };
                if record(&mut log, event, at) {
                    return log;
                }
            }
            _ = stop.changed() => {
                // What already arrived still counts.
                while let Some((event, at)) = conn.try_next_event_timed() {
                    if record(&mut log, event, at) {
                        return log;
                    }
                }
                break;
            }
        }
    }
    log
}

/// Waits until `GET /readyz` on `admin` answers 200 (Redis connected), up to `deadline`.
pub(crate) async fn wait_ready(admin: SocketAddr, deadline: Instant) -> Result<(), String> {
    let req = HttpRequest { method: "GET", path: "/readyz", headers: Vec::new(), body: None };
    loop {
        let last = match http::send(admin, None, &req, Duration::from_secs(2)).await {
            Ok(resp) if resp.status == 200 => return Ok(()),
            Ok(resp) => format!("{} {}", resp.status, String::from_utf8_lossy(&resp.body)),
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            return Err(format!("the instance at {admin} did not become ready within {READY_TIMEOUT:?}: {last}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How many of `clients` go to instance `k` of `instances`: evenly, the first ones one more.
fn share(clients: usize, instances: usize, k: usize) -> usize {
    clients / instances + usize::from(k < clients % instances)
}

/// Runs the measurement; `Err` when it could not be made (an instance did not start, a client
/// was refused, a publish failed).
pub(crate) async fn measure(opts: &FanoutOptions) -> Result<FanoutMeasurement, String> {
    if opts.instances == 0 || opts.clients == 0 || opts.messages == 0 {
        return Err("--instances, --clients and --messages must each be at least 1".into());
    }
    let redactor = Arc::new(Redactor::default());
    let credentials = Credentials::generate(&redactor);
    let redis = if opts.with_redis() {
        let bin = redis_server::find_redis_server()
            .map_err(|e| format!("several instances (or --redis) need a Redis, but {e}"))?;
        let redactor = Arc::clone(&redactor);
        Some(if opts.redis_cluster {
            Redis::Cluster(RedisCluster::start(&bin, redactor, Duration::from_secs(30)).await?)
        } else {
            Redis::Server(Box::new(RedisServer::start(&bin, redactor, Duration::from_secs(10)).await?))
        })
    } else {
        None
    };
    let args: Vec<String> = redis.iter().flat_map(Redis::args).collect();
    // Each instance's per-IP limit is raised past every client: with Redis it counts the
    // connections of the whole cluster, all of which come from 127.0.0.1.
    let mut servers = Vec::with_capacity(opts.instances);
    for k in 1..=opts.instances {
        let name = format!("fanout-{k}");
        servers.push(
            fleet::start_server(&opts.bin, &opts.policies, &name, opts.clients, &args, &credentials, &redactor).await?,
        );
    }
    if redis.is_some() {
        let deadline = Instant::now() + READY_TIMEOUT;
        for (server, _) in &servers {
            wait_ready(server.admin_addr, deadline).await?;
        }
    }

    let mut conns = Vec::with_capacity(opts.clients);
    for (k, (server, _)) in servers.iter().enumerate() {
        let n = share(opts.clients, opts.instances, k);
        let prefix = format!("fanout{}", k + 1);
        let opened = fleet::open_all(server.ws_addr, &credentials, &prefix, n, opts.parallel)
            .await
            .map_err(|e| redactor.redact(&format!("instance {}: {e}", k + 1)))?;
        conns.extend(opened);
    }

    let t0 = Instant::now();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut readers = JoinSet::new();
    for conn in conns {
        readers.spawn(collect(conn, t0, opts.messages, stop_rx.clone()));
    }

    let admin = servers[0].0.admin_addr;
    let headers = vec![("Authorization".to_string(), format!("Bearer {}", credentials.admin_token))];
    let mut ids = Vec::with_capacity(opts.messages);
    let mut tick = tokio::time::interval(opts.interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    for seq in 0..opts.messages {
        tick.tick().await;
        let sent_us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
        let body = json!({"channel": CHANNEL, "data": {"seq": seq, "sent_us": sent_us}}).to_string();
        let req = HttpRequest {
            method: "POST",
            path: "/v1/publish",
            headers: headers.clone(),
            body: Some(("application/json", body.into_bytes())),
        };
        let resp = http::send(admin, None, &req, Duration::from_secs(5))
            .await
            .map_err(|e| format!("publish {}: {e}", seq + 1))?;
        let answer: Value = serde_json::from_slice(&resp.body).unwrap_or_default();
        match (resp.status, answer["id"].as_str()) {
            (200, Some(id)) if !id.is_empty() => ids.push(id.to_string()),
            (status, _) => {
                return Err(format!(
                    "publish {}: expected 200 with {{\"id\": …}}, got {status} {}",
                    seq + 1,
                    String::from_utf8_lossy(&resp.body)
                ));
            }
        }
    }

    // Readers finish as soon as they have everything; the stragglers get `grace`.
    let grace = opts.grace;
    let stopper = tokio::spawn(async move {
        tokio::time::sleep(grace).await;
        let _ = stop_tx.send(true);
    });
    let mut logs = Vec::with_capacity(opts.clients);
    while let Some(joined) = readers.join_next().await {
        logs.push(joined.map_err(|e| format!("a client's reader failed: {e}"))?);
    }
    stopper.abort();
    // The clients are gone with their readers; the instances and Redis go when dropped.
    drop(servers);
    drop(redis);
    Ok(tally(opts, &ids, logs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(clients: usize, instances: usize) -> FanoutOptions {
        FanoutOptions {
            bin: PathBuf::new(),
            policies: PathBuf::new(),
            clients,
            instances,
            redis: false,
            redis_cluster: false,
            messages: 2,
            interval: Duration::from_millis(20),
            grace: Duration::from_secs(10),
            parallel: 32,
        }
    }

    fn d(seq: usize, ms: u64, id: &str) -> Delivery {
        Delivery { seq, latency: Duration::from_millis(ms), id: id.into() }
    }

    #[test]
    fn clients_are_spread_evenly() {
        assert_eq!((0..2).map(|k| share(2000, 2, k)).collect::<Vec<_>>(), vec![1000, 1000]);
        assert_eq!((0..3).map(|k| share(10, 3, k)).collect::<Vec<_>>(), vec![4, 3, 3]);
        assert_eq!(share(7, 1, 0), 7);
        assert!(opts(1, 2).with_redis() && !opts(1, 1).with_redis());
        assert!(FanoutOptions { redis_cluster: true, ..opts(1, 1) }.with_redis());
    }

    #[test]
    fn reads_a_delivery_and_its_latency() {
        let t0 = Instant::now();
        let frame = r#"{"type":"message","channel":"alerts","id":"m-1","data":{"seq":3,"sent_us":1000}}"#;
        let got = delivery(frame, t0, t0 + Duration::from_millis(5)).unwrap();
        assert_eq!(got, Delivery { seq: 3, latency: Duration::from_millis(4), id: "m-1".into() });
        assert_eq!(delivery(r#"{"type":"pong"}"#, t0, t0), None);
        assert_eq!(delivery(r#"{"type":"message","channel":"other","data":{"seq":1,"sent_us":1}}"#, t0, t0), None);
        assert_eq!(delivery("not json", t0, t0), None);
    }

    #[test]
    fn every_delivery_once_with_its_id_passes() {
        let ids = vec!["a".to_string(), "b".to_string()];
        let logs = vec![
            ClientLog { deliveries: vec![d(0, 3, "a"), d(1, 1, "b")], ended: None },
            ClientLog { deliveries: vec![d(1, 2, "b"), d(0, 4, "a")], ended: None },
        ];
        let m = tally(&opts(2, 2), &ids, logs);
        assert!(m.passed());
        assert_eq!(m.latencies, [1, 2, 3, 4].map(Duration::from_millis).to_vec());
        assert_eq!(
            m.summary(),
            "fanout latency: 2 clients on 2 instances with Redis, 2 messages, 4 of 4 deliveries: \
             p50 2.0 ms, p99 4.0 ms, max 4.0 ms"
        );
    }

    #[test]
    fn missing_duplicated_and_foreign_deliveries_fail() {
        let ids = vec!["a".to_string(), "b".to_string()];
        let logs = vec![
            ClientLog { deliveries: vec![d(0, 3, "a"), d(0, 5, "a"), d(1, 1, "x")], ended: None },
            ClientLog { deliveries: vec![d(1, 2, "b")], ended: Some("close frame 4009 \"replaced\"".into()) },
        ];
        let m = tally(&opts(2, 1), &ids, logs);
        assert!(!m.passed());
        assert_eq!((m.missing, m.duplicates, m.wrong_ids), (1, 1, 1));
        assert_eq!(
            m.summary(),
            "fanout latency: 2 clients on 1 instance without Redis, 2 messages, 3 of 4 deliveries \
             (1 missing, 1 duplicated, 1 with another id, 1 connections ended): p50 2.0 ms, p99 3.0 ms, max 3.0 ms"
        );
    }
}
