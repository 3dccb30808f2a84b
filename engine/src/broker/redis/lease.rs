//! The clock and the lease terms shared by everything that counts connections in Redis, and the
//! record of which keys hold each of this instance's live connections.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long a connection's lease lasts unless renewed: a crashed instance's connections stop
/// counting after this.
pub(crate) const LEASE: Duration = Duration::from_secs(30);
/// How often an instance renews its connections' leases.
pub(crate) const LEASE_REFRESH: Duration = Duration::from_secs(10);

/// Milliseconds since the epoch on this machine's clock.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, millis)
}

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The sets holding one live connection, so its leases can be renewed and released.
#[derive(Debug)]
pub(crate) struct LeaseKeys {
    pub(crate) ip: String,
    pub(crate) user: Option<String>,
}

/// This instance's live connections in Redis: member → the sets holding it.
#[derive(Debug, Default)]
pub(crate) struct Leases(Mutex<HashMap<Box<str>, LeaseKeys>>);

impl Leases {
    pub(crate) fn lock(&self) -> MutexGuard<'_, HashMap<Box<str>, LeaseKeys>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}
