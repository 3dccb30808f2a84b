//! How a scenario declares one wsgate instance, and the name of the one it gets without
//! declaring any.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use crate::process::haproxy::HaproxyMode;

/// The server name used when a scenario does not declare `servers`.
pub(crate) const DEFAULT_SERVER: &str = "main";

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct ServerSpec {
    /// Deep-merged into `policies/policy.yaml`.
    pub(crate) policy: Option<Value>,
    /// Extra files for the policy directory: relative path → content.
    pub(crate) files: BTreeMap<String, String>,
    /// Extra `wsgate serve` arguments.
    pub(crate) args: Vec<String>,
    /// Extra environment variables.
    pub(crate) env: BTreeMap<String, String>,
    /// Serve `wss://` with a generated certificate (`--tls-cert`/`--tls-key`); the scenario's
    /// clients trust only its CA.
    pub(crate) tls: bool,
    /// With the scenario's `redis: true`, whether this server is given `--redis` (default yes):
    /// `false` runs it alone, with its in-process broker.
    pub(crate) redis: Option<bool>,
    /// `false`: declared, but not started with the others; a `start` step starts it (an
    /// instance joining the cluster later). Default `true`.
    pub(crate) start: Option<bool>,
    /// Put an HAProxy in front of the server (`http`: `option forwardfor`; `tcp`:
    /// `send-proxy-v2`); steps with `proxied: true` go through it.
    pub(crate) haproxy: Option<HaproxyMode>,
}

impl ServerSpec {
    /// Whether the server starts with the scenario (not through a `start` step).
    pub(crate) fn starts_with_the_scenario(&self) -> bool {
        self.start.unwrap_or(true)
    }

    /// Whether the server gets `--redis`, in a scenario with `redis: scenario_redis`.
    pub(crate) fn uses_redis(&self, scenario_redis: bool) -> bool {
        scenario_redis && self.redis.unwrap_or(true)
    }
}
