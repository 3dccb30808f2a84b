//! Live connections per client address, for `connections.max_per_ip` on one instance.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Live connections per client IP.
#[derive(Debug, Default)]
pub struct IpCounter {
    counts: Mutex<HashMap<IpAddr, u64>>,
}

/// Holds one slot of an IP's count; dropping it gives the slot back.
#[derive(Debug)]
pub(crate) struct IpSlot {
    counter: Arc<IpCounter>,
    ip: IpAddr,
}

/// The address a limit counts: IPv4-mapped IPv6 as IPv4, other IPv6 by its /64 (one host
/// commonly holds a whole /64, so counting single addresses would be no limit at all).
pub(crate) fn limit_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let mut octets = v6.octets();
            octets[8..].fill(0);
            IpAddr::from(octets)
        }
        v4 => v4,
    }
}

impl IpCounter {
    /// Takes a slot for `ip` (grouped by [`limit_key`]) if it holds fewer than `max`.
    pub(crate) fn acquire(self: &Arc<Self>, ip: IpAddr, max: u64) -> Option<IpSlot> {
        let ip = limit_key(ip);
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(ip).or_insert(0);
        if *count >= max {
            if *count == 0 {
                counts.remove(&ip);
            }
            return None;
        }
        *count += 1;
        Some(IpSlot { counter: self.clone(), ip })
    }

    /// Live connections of `ip` (grouped by [`limit_key`]).
    pub fn count(&self, ip: IpAddr) -> u64 {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).get(&limit_key(ip)).copied().unwrap_or(0)
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut counts = self.counter.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = counts.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_counts_by_prefix_and_mapped_ipv4_as_ipv4() {
        let c = Arc::new(IpCounter::default());
        let _a = c.acquire("2001:db8:1:2::1".parse().unwrap(), 2).unwrap();
        let _b = c.acquire("2001:db8:1:2:ffff::9".parse().unwrap(), 2).unwrap();
        assert!(c.acquire("2001:db8:1:2::3".parse().unwrap(), 2).is_none(), "same /64");
        assert!(c.acquire("2001:db8:1:3::1".parse().unwrap(), 2).is_some(), "another /64");
        let _m = c.acquire("::ffff:10.0.0.1".parse().unwrap(), 2).unwrap();
        assert_eq!(c.count("10.0.0.1".parse().unwrap()), 1);
    }

    #[test]
    fn ip_slots_are_returned_on_drop() {
        let c = Arc::new(IpCounter::default());
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let a = c.acquire(ip, 2).unwrap();
        let b = c.acquire(ip, 2).unwrap();
        assert!(c.acquire(ip, 2).is_none());
        drop(a);
        assert_eq!(c.count(ip), 1);
        let _c = c.acquire(ip, 2).unwrap();
        drop(b);
        assert_eq!(c.count(ip), 1);
    }
}
