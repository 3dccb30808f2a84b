//! `connections`: per-user and per-IP limits, the reconnect window, heartbeats, the idle
//! timeout and the global handshake spike window.

use super::bounds::{GLOBAL_VARS, LIMIT_VARS, MAX_RECONNECT_WINDOW, SECS};
use super::driver::Compiler;
use crate::policy::compiled::ConnectionPolicy;
use crate::policy::model::ConnectionsSection;

impl Compiler<'_> {
    pub(super) fn connections(&mut self, file: &str, c: &ConnectionsSection) -> Option<ConnectionPolicy> {
        let max_per_user = self.limit(file, "connections.max_per_user", &c.max_per_user, LIMIT_VARS, 1..=1000);
        let max_per_ip = self.limit(file, "connections.max_per_ip", &c.max_per_ip, LIMIT_VARS, 1..=1_000_000);
        let reconnects =
            self.window(file, "connections.reconnects", &c.reconnects, LIMIT_VARS, SECS(1)..=MAX_RECONNECT_WINDOW);
        let hb = &c.heartbeat.value;
        let interval =
            self.limit(file, "connections.heartbeat.interval", &hb.interval, LIMIT_VARS, SECS(1)..=SECS(3600));
        let timeout = self.limit(file, "connections.heartbeat.timeout", &hb.timeout, LIMIT_VARS, SECS(1)..=SECS(3600));
        let idle =
            self.limit(file, "connections.idle_timeout", &c.idle_timeout, LIMIT_VARS, SECS(1)..=SECS(7 * 86_400));
        let spike = self.window(file, "connections.spike", &c.spike, GLOBAL_VARS, SECS(1)..=SECS(3600));
        Some(ConnectionPolicy {
            max_per_user: max_per_user?,
            max_per_ip: max_per_ip?,
            reconnects: reconnects?,
            heartbeat_interval: interval?,
            heartbeat_timeout: timeout?,
            idle_timeout: idle?,
            spike: spike?,
        })
    }
}
