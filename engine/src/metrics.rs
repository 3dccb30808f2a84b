//! Every metric wsgate exports, by name, in one place (SPEC §8), and their Prometheus text
//! rendering for `GET /metrics`.
//!
//! Counters and gauges are atomics; histograms have fixed buckets. Label values are bounded and
//! never chosen by a client: outcomes, reasons, modes and close codes are fixed sets (a close
//! code a client sends that the server itself does not use is counted as `other`), and rule
//! names come from the policy (a policy holds at most a few hundred rules). No user id, IP,
//! channel, header or claim is a label.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::close::{CloseCode, DROPPED, Ended, ErrorCode, NO_STATUS_RECEIVED};

/// Upper bounds (seconds) of the latency histograms: 10 µs to 1 s.
const LATENCY_BUCKETS: [f64; 11] = [0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01, 0.1, 1.0];
/// Upper bounds (seconds) of the connection-duration histogram: 1 s to 1 day.
const DURATION_BUCKETS: [f64; 9] = [1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 14_400.0, 43_200.0, 86_400.0];

/// A histogram with fixed buckets.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Cumulative counts are computed when rendering; these are per bucket, plus +Inf last.
    counts: Vec<AtomicU64>,
    /// Sum of observations in nanoseconds.
    sum_nanos: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub(crate) fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self.bounds.iter().position(|b| secs <= *b).unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, bound) in self.bounds.iter().enumerate() {
            cumulative += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.counts[self.bounds.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {cumulative}");
    }
}

/// Handshake outcomes (`wsgate_handshakes_total{outcome}`): `accepted`, or a refusal's error.
pub(crate) const HANDSHAKE_OUTCOMES: [&str; 8] = [
    "accepted",
    "bad_request",
    "unauthorized",
    "forbidden",
    "not_found",
    "too_many_requests",
    "unavailable",
    "aborted",
];

/// The `code` label values of `wsgate_connections_closed_total`: `0` (dropped without a close
/// frame), `1005` (the client's close frame had no code), every code the server sends
/// ([`CloseCode::ALL`]), and `other` for any code a client chose that is none of these — a
/// client may send about 2,000 distinct codes, and each would be a series of its own.
pub(crate) const CLOSE_LABELS: [&str; CloseCode::ALL.len() + 3] = [
    "0", "1000", "1001", "1002", "1003", "1005", "1007", "1008", "1009", "1011", "4001", "4003", "4008", "4009",
    "4010", "4029", "other",
];

/// The [`CLOSE_LABELS`] entry for a connection that ended with `code`: sent by the server
/// (`by_client` false; 0 when it was dropped without a close) or received from the client
/// (1005 when its close frame had none).
#[cfg(test)]
fn close_label(code: u16, by_client: bool) -> &'static str {
    CLOSE_LABELS[close_index(code, by_client)]
}

/// Where `code` stands in [`CLOSE_LABELS`] (the last entry, `other`, for any code a client chose).
fn close_index(code: u16, by_client: bool) -> usize {
    let other = CLOSE_LABELS.len() - 1;
    let pseudo = if by_client { NO_STATUS_RECEIVED } else { DROPPED };
    if code != pseudo && !CloseCode::ALL.iter().any(|c| c.code() == code) {
        return other;
    }
    CLOSE_LABELS.iter().position(|l| l.parse() == Ok(code)).unwrap_or(other)
}

/// Why a message was rejected (`wsgate_messages_rejected_total{reason}`): an error code, or
/// `closed` for a message that closed its connection.
fn reject_reasons() -> impl Iterator<Item = &'static str> {
    ErrorCode::ALL.iter().map(|c| c.as_str()).chain(["closed"])
}

/// Every metric.
#[derive(Debug)]
pub struct Metrics {
    /// `wsgate_connections_active`.
    pub connections_active: AtomicI64,
    handshakes: [AtomicU64; HANDSHAKE_OUTCOMES.len()],
    /// `wsgate_messages_received_total`: data frames from clients.
    pub messages_received: AtomicU64,
    rejected: [AtomicU64; ErrorCode::ALL.len() + 1],
    /// `wsgate_messages_delivered_total`: frames queued for clients by the broker.
    pub messages_delivered: AtomicU64,
    /// `wsgate_outbound_dropped_total`: deliveries refused by a full outbox.
    pub outbound_dropped: AtomicU64,
    /// `wsgate_connection_duration_seconds`.
    pub connection_duration: Histogram,
    /// `wsgate_pipeline_duration_seconds`: one client frame through the pipeline.
    pub pipeline_duration: Histogram,
    /// `wsgate_handshake_duration_seconds`: request read to answer.
    pub handshake_duration: Histogram,
    /// `wsgate_connections_closed_total{code}`, by [`CLOSE_LABELS`] index.
    closed: [AtomicU64; CLOSE_LABELS.len()],
    /// `wsgate_policy_decisions_total{rule,mode,outcome}`.
    decisions: Mutex<BTreeMap<(String, &'static str, &'static str), u64>>,
    /// `wsgate_policy_reloads_total{outcome="ok"}`.
    pub reloads_ok: AtomicU64,
    /// `wsgate_policy_reloads_total{outcome="error"}`.
    pub reloads_error: AtomicU64,
    /// `wsgate_policy_reloads_total{outcome="unchanged"}`: the files held the active policy.
    pub reloads_unchanged: AtomicU64,
    /// `wsgate_policy_generation`.
    pub policy_generation: AtomicU64,
    /// `wsgate_connection_spike`: 1 while handshakes exceed the policy's spike rate.
    pub connection_spike: AtomicU64,
    /// `wsgate_redis_up`: 1 while Redis is reachable (0 without Redis configured).
    pub redis_up: AtomicU64,
    /// `wsgate_tls_handshake_failures_total`.
    pub tls_failures: AtomicU64,
    /// `wsgate_proxy_refused_total{reason="untrusted_peer"}`: connections closed at once because
    /// the listener serves only its trusted proxies.
    pub proxy_untrusted: AtomicU64,
    /// `wsgate_proxy_refused_total{reason="no_proxy_header"}`: connections from a trusted proxy
    /// closed without a valid PROXY protocol header (a balancer not configured to send one).
    pub proxy_no_header: AtomicU64,
    /// `wsgate_redis_configured`: 1 when the instance runs with `--redis`, so alerts on
    /// `wsgate_redis_up` apply only there.
    pub redis_configured: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            connections_active: AtomicI64::new(0),
            handshakes: Default::default(),
            messages_received: AtomicU64::new(0),
            rejected: Default::default(),
            messages_delivered: AtomicU64::new(0),
            outbound_dropped: AtomicU64::new(0),
            connection_duration: Histogram::new(&DURATION_BUCKETS),
            pipeline_duration: Histogram::new(&LATENCY_BUCKETS),
            handshake_duration: Histogram::new(&LATENCY_BUCKETS),
            closed: Default::default(),
            decisions: Mutex::default(),
            reloads_ok: AtomicU64::new(0),
            reloads_error: AtomicU64::new(0),
            reloads_unchanged: AtomicU64::new(0),
            policy_generation: AtomicU64::new(0),
            connection_spike: AtomicU64::new(0),
            redis_up: AtomicU64::new(0),
            tls_failures: AtomicU64::new(0),
            proxy_untrusted: AtomicU64::new(0),
            proxy_no_header: AtomicU64::new(0),
            redis_configured: AtomicU64::new(0),
        }
    }
}

/// The names, so dashboards and alerts can be checked against them.
pub const NAMES: [&str; 19] = [
    "wsgate_redis_configured",
    "wsgate_tls_handshake_failures_total",
    "wsgate_proxy_refused_total",
    "wsgate_connections_active",
    "wsgate_handshakes_total",
    "wsgate_messages_received_total",
    "wsgate_messages_rejected_total",
    "wsgate_messages_delivered_total",
    "wsgate_outbound_dropped_total",
    "wsgate_connection_duration_seconds",
    "wsgate_pipeline_duration_seconds",
    "wsgate_handshake_duration_seconds",
    "wsgate_connections_closed_total",
    "wsgate_policy_decisions_total",
    "wsgate_policy_reloads_total",
    "wsgate_policy_generation",
    "wsgate_connection_spike",
    "wsgate_redis_up",
    "wsgate_up",
];

impl Metrics {
    /// Counts a handshake outcome (`accepted` or a refusal's error name).
    pub fn handshake(&self, outcome: &str) {
        let i = HANDSHAKE_OUTCOMES.iter().position(|o| *o == outcome).unwrap_or(HANDSHAKE_OUTCOMES.len() - 1);
        self.handshakes[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a policy reload by outcome (`ok`, `unchanged` or `error`).
    pub fn reloaded(&self, outcome: &str) {
        let counter = match outcome {
            "ok" => &self.reloads_ok,
            "unchanged" => &self.reloads_unchanged,
            _ => &self.reloads_error,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a rejected message: by error code, or `Err` for one that closed its connection.
    pub(crate) fn rejected(&self, code: Result<ErrorCode, CloseCode>) {
        let i = match code {
            Ok(c) => ErrorCode::ALL.iter().position(|x| *x == c).unwrap_or(0),
            Err(_) => ErrorCode::ALL.len(),
        };
        self.rejected[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an ended connection by its [`close_label`].
    pub fn closed(&self, ended: &Ended) {
        let (code, by_client) = ended.counted_as();
        self.closed[close_index(code, by_client)].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a rule's decision: `outcome` is `deny` or `would_deny`.
    pub fn decision(&self, rule: &str, audit: bool, outcome: &'static str) {
        let mode = if audit { "audit" } else { "enforce" };
        *self
            .decisions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((rule.to_string(), mode, outcome))
            .or_default() += 1;
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let gauge = |out: &mut String, name: &str, help: &str, v: String| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        let counter_head = |out: &mut String, name: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        };
        gauge(&mut out, "wsgate_up", "1 while the process runs.", "1".into());
        gauge(
            &mut out,
            "wsgate_connections_active",
            "Open WebSocket connections.",
            self.connections_active.load(Ordering::Relaxed).to_string(),
        );
        counter_head(&mut out, "wsgate_handshakes_total", "Handshakes by outcome.");
        for (i, outcome) in HANDSHAKE_OUTCOMES.iter().enumerate() {
            let _ = writeln!(out, "wsgate_handshakes_total{{outcome=\"{outcome}\"}} {}", load(&self.handshakes[i]));
        }
        counter_head(&mut out, "wsgate_messages_received_total", "Data frames received from clients.");
        let _ = writeln!(out, "wsgate_messages_received_total {}", load(&self.messages_received));
        counter_head(&mut out, "wsgate_messages_rejected_total", "Client messages refused, by reason.");
        for (i, reason) in reject_reasons().enumerate() {
            let _ = writeln!(out, "wsgate_messages_rejected_total{{reason=\"{reason}\"}} {}", load(&self.rejected[i]));
        }
        counter_head(&mut out, "wsgate_messages_delivered_total", "Deliveries queued for clients.");
        let _ = writeln!(out, "wsgate_messages_delivered_total {}", load(&self.messages_delivered));
        counter_head(
            &mut out,
            "wsgate_outbound_dropped_total",
            "Deliveries dropped because a client's queue was full.",
        );
        let _ = writeln!(out, "wsgate_outbound_dropped_total {}", load(&self.outbound_dropped));
        counter_head(
            &mut out,
            "wsgate_connections_closed_total",
            "Connections ended, by close code (0: dropped without a close; other: a client's code the server does not use).",
        );
        for (i, code) in CLOSE_LABELS.iter().enumerate() {
            let _ = writeln!(out, "wsgate_connections_closed_total{{code=\"{code}\"}} {}", load(&self.closed[i]));
        }
        counter_head(&mut out, "wsgate_policy_decisions_total", "Rule decisions that refused or would have refused.");
        for ((rule, mode, outcome), n) in self.decisions.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let rule = escape(rule);
            let _ = writeln!(
                out,
                "wsgate_policy_decisions_total{{rule=\"{rule}\",mode=\"{mode}\",outcome=\"{outcome}\"}} {n}"
            );
        }
        counter_head(&mut out, "wsgate_tls_handshake_failures_total", "TLS handshakes that failed.");
        let _ = writeln!(out, "wsgate_tls_handshake_failures_total {}", load(&self.tls_failures));
        counter_head(
            &mut out,
            "wsgate_proxy_refused_total",
            "Connections closed before their handshake: from a peer outside --trusted-proxies where only proxies are served, or from a trusted proxy without a valid PROXY header.",
        );
        for (reason, n) in [("untrusted_peer", &self.proxy_untrusted), ("no_proxy_header", &self.proxy_no_header)] {
            let _ = writeln!(out, "wsgate_proxy_refused_total{{reason=\"{reason}\"}} {}", load(n));
        }
        counter_head(&mut out, "wsgate_policy_reloads_total", "Policy reloads by outcome.");
        let _ = writeln!(out, "wsgate_policy_reloads_total{{outcome=\"ok\"}} {}", load(&self.reloads_ok));
        let _ = writeln!(out, "wsgate_policy_reloads_total{{outcome=\"error\"}} {}", load(&self.reloads_error));
        let _ = writeln!(out, "wsgate_policy_reloads_total{{outcome=\"unchanged\"}} {}", load(&self.reloads_unchanged));
        let gauges = [
            ("wsgate_policy_generation", "Generation of the active policy.", &self.policy_generation),
            (
                "wsgate_connection_spike",
                "1 while the handshake rate exceeds the policy's spike threshold.",
                &self.connection_spike,
            ),
            ("wsgate_redis_up", "1 while Redis is reachable (0 without Redis).", &self.redis_up),
            ("wsgate_redis_configured", "1 when the instance runs with Redis.", &self.redis_configured),
        ];
        for (name, help, value) in gauges {
            gauge(&mut out, name, help, load(value).to_string());
        }
        let histograms = [
            (&self.connection_duration, "wsgate_connection_duration_seconds", "How long connections lasted."),
            (&self.pipeline_duration, "wsgate_pipeline_duration_seconds", "One client frame through the pipeline."),
            (&self.handshake_duration, "wsgate_handshake_duration_seconds", "Upgrade request read to answer."),
        ];
        for (histogram, name, help) in histograms {
            histogram.render(&mut out, name, help);
        }
        out
    }
}

/// Escapes a label value (rule names are policy text).
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_is_rendered_and_histograms_are_cumulative() {
        let m = Metrics::default();
        m.handshake("accepted");
        m.rejected(Ok(ErrorCode::RateLimited));
        m.closed(&Ended::Closed(CloseCode::Replaced, String::new()));
        m.decision("a \"quoted\" rule", true, "would_deny");
        m.pipeline_duration.observe(Duration::from_micros(30));
        m.pipeline_duration.observe(Duration::from_secs(5));
        let text = m.render();
        for name in NAMES {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing");
        }
        assert!(text.contains("wsgate_handshakes_total{outcome=\"accepted\"} 1"));
        assert!(text.contains("wsgate_messages_rejected_total{reason=\"rate_limited\"} 1"));
        assert!(text.contains("wsgate_connections_closed_total{code=\"4009\"} 1"));
        assert!(text.contains(r#"rule="a \"quoted\" rule",mode="audit",outcome="would_deny"} 1"#));
        assert!(text.contains("wsgate_pipeline_duration_seconds_bucket{le=\"0.00005\"} 1"));
        assert!(text.contains("wsgate_pipeline_duration_seconds_bucket{le=\"1\"} 1"));
        assert!(text.contains("wsgate_pipeline_duration_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(text.contains("wsgate_pipeline_duration_seconds_count 2"));
    }

    #[test]
    fn close_labels_are_the_servers_codes_and_other() {
        for code in CloseCode::ALL {
            let label = code.code().to_string();
            assert!(CLOSE_LABELS.contains(&label.as_str()), "{label} has no label");
            assert_eq!(close_label(code.code(), false), label);
            assert_eq!(close_label(code.code(), true), label, "a client's 1000 or 4009 is counted as such");
        }
        assert_eq!(close_label(0, false), "0");
        assert_eq!(close_label(1005, true), "1005");
        for chosen in [0, 999, 1004, 1005, 1006, 1010, 1015, 2999, 3000, 3999, 4000, 4321, 4999, 65_535] {
            if chosen != 1005 {
                assert_eq!(close_label(chosen, true), "other", "client code {chosen}");
            }
            if chosen != 0 {
                assert_eq!(close_label(chosen, false), "other", "server code {chosen}");
            }
        }
        // Every 16-bit value a client could send lands on one of the fixed labels.
        let labels: std::collections::BTreeSet<_> = (0..=u16::MAX).map(|c| close_label(c, true)).collect();
        assert!(labels.len() < CLOSE_LABELS.len(), "{labels:?}");
        let m = Metrics::default();
        m.closed(&Ended::ClientClosed(Some(3999)));
        m.closed(&Ended::ClientClosed(Some(4321)));
        let text = m.render();
        assert!(text.contains("wsgate_connections_closed_total{code=\"other\"} 2"), "{text}");
        assert!(!text.contains("3999") && !text.contains("4321"));
    }
}
