//! Connections still in their handshake (TLS, then the HTTP upgrade request), before anything
//! is authenticated: capped per address and in total, from the moment a connection is accepted.
//! A peer that opens sockets and never finishes them holds at most its share, so it cannot take
//! every `--max-connections` slot or the memory of thousands of TLS states.
//!
//! Per address: an IPv4 address, and an IPv6 client at three prefix lengths at once — its /64
//! (one host commonly holds a whole /64), its /56 and its /48 (what one customer or site is
//! commonly given) — so a single allocation cannot exhaust the cap by spreading its sockets over
//! its addresses. Authenticated connections are limited by the policy's `max_per_ip` instead.
//!
//! The count is of the TCP peer, known before anything is read: a peer in `--trusted-proxies`
//! carries many clients' handshakes and is held to the total only ([`crate::proxy`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Handshakes one IPv4 address or one IPv6 /64 may have at once.
pub(crate) const PER_ADDRESS: u32 = 128;
/// Handshakes one IPv6 /56 may have at once.
pub(crate) const PER_56: u32 = 256;
/// Handshakes one IPv6 /48 may have at once.
pub(crate) const PER_48: u32 = 512;
/// Handshakes in progress at once, over every address, unless `--max-handshakes` says otherwise.
pub(crate) const DEFAULT_MAX_TOTAL: usize = 1024;

/// An address prefix a cap counts: the masked address and its length.
type Prefix = (IpAddr, u8);

/// The counts, per prefix and in total.
#[derive(Debug)]
pub struct Handshaking {
    counts: Mutex<HashMap<Prefix, u32>>,
    total: AtomicUsize,
    max_total: AtomicUsize,
}

impl Default for Handshaking {
    fn default() -> Self {
        Handshaking {
            counts: Mutex::default(),
            total: AtomicUsize::new(0),
            max_total: AtomicUsize::new(DEFAULT_MAX_TOTAL),
        }
    }
}

/// One connection's place among the handshakes; dropping it gives the place back.
#[derive(Debug)]
pub(crate) struct HandshakeSlot {
    owner: Arc<Handshaking>,
    prefixes: [Option<Prefix>; 3],
}

impl Handshaking {
    /// Sets the total cap (`--max-handshakes`).
    pub(crate) fn set_max_total(&self, max: usize) {
        self.max_total.store(max.max(1), Ordering::Relaxed);
    }

    /// Takes a place for a connection from `ip`, unless its address (at any prefix length) or
    /// the whole server is at its cap.
    pub(crate) fn acquire(self: &Arc<Self>, ip: IpAddr) -> Option<HandshakeSlot> {
        self.take(prefixes(ip))
    }

    /// Takes a place for a connection from a trusted proxy, which carries the handshakes of many
    /// clients: exempt from the per-address caps, counted in the total like any other.
    pub(crate) fn acquire_for_proxy(self: &Arc<Self>) -> Option<HandshakeSlot> {
        self.take([None; 3])
    }

    fn take(self: &Arc<Self>, prefixes: [Option<Prefix>; 3]) -> Option<HandshakeSlot> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if self.total.load(Ordering::Relaxed) >= self.max_total.load(Ordering::Relaxed) {
            return None;
        }
        let full = prefixes.iter().flatten().any(|p| counts.get(p).is_some_and(|&n| n >= cap(p.1)));
        if full {
            return None;
        }
        for p in prefixes.iter().flatten() {
            *counts.entry(*p).or_insert(0) += 1;
        }
        self.total.fetch_add(1, Ordering::Relaxed);
        Some(HandshakeSlot { owner: self.clone(), prefixes })
    }

    /// Handshakes in progress from `ip`'s address (IPv4) or /64 (IPv6).
    pub fn count(&self, ip: IpAddr) -> u64 {
        let key = prefixes(ip)[0].expect("every address has its first prefix");
        u64::from(self.counts.lock().unwrap_or_else(|e| e.into_inner()).get(&key).copied().unwrap_or(0))
    }

    /// Handshakes in progress over every address.
    pub fn total(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut counts = self.owner.counts.lock().unwrap_or_else(|e| e.into_inner());
        for p in self.prefixes.iter().flatten() {
            if let Some(n) = counts.get_mut(p) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(p);
                }
            }
        }
        self.owner.total.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The cap of a prefix of this length (/56 and /48 are IPv6 only; an IPv4 /32 and an IPv6 /64
/// are one address).
fn cap(len: u8) -> u32 {
    match len {
        56 => PER_56,
        48 => PER_48,
        _ => PER_ADDRESS,
    }
}

/// The prefixes `ip` is counted under: IPv4 (and IPv4-mapped IPv6) as the address; IPv6 as its
/// /64, /56 and /48.
fn prefixes(ip: IpAddr) -> [Option<Prefix>; 3] {
    match ip.to_canonical() {
        IpAddr::V4(v4) => [Some((IpAddr::V4(v4), 32)), None, None],
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let masked = |len: u8| (IpAddr::V6(std::net::Ipv6Addr::from((bits >> (128 - len)) << (128 - len))), len);
            [Some(masked(64)), Some(masked(56)), Some(masked(48))]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn one_address_or_64_holds_at_most_its_cap_and_gets_it_back() {
        let h = Arc::new(Handshaking::default());
        let held: Vec<_> = (0..PER_ADDRESS).map(|_| h.acquire(ip("192.0.2.7")).unwrap()).collect();
        assert!(h.acquire(ip("192.0.2.7")).is_none());
        assert!(h.acquire(ip("::ffff:192.0.2.7")).is_none(), "IPv4-mapped is the same address");
        assert!(h.acquire(ip("192.0.2.8")).is_some());
        drop(held);
        assert_eq!(h.count(ip("192.0.2.7")), 0);
        assert_eq!(h.total(), 0);
        assert!(h.counts.lock().unwrap().is_empty(), "nothing is kept for idle addresses");
    }

    #[test]
    fn an_ipv6_allocation_cannot_spread_past_its_56_and_48() {
        let h = Arc::new(Handshaking::default());
        let mut held = Vec::new();
        // Two /64s of one /56 fill it: the /56's other /64s are refused.
        for net in 0..2 {
            for host in 0..PER_ADDRESS {
                held.push(h.acquire(ip(&format!("2001:db8:0:{net}::{:x}", host + 1))).unwrap());
            }
        }
        assert!(h.acquire(ip("2001:db8:0:5::1")).is_none(), "the /56 is full");
        // Other /56s of the same /48 still get in, until the /48 is full.
        for net in 1..2 {
            for host in 0..PER_56 {
                let addr = format!("2001:db8:0:{:x}::{:x}", net << 8 | (host / PER_ADDRESS), host % PER_ADDRESS + 1);
                held.push(h.acquire(ip(&addr)).unwrap());
            }
        }
        assert!(h.acquire(ip("2001:db8:0:ff00::1")).is_none(), "the /48 is full");
        assert!(h.acquire(ip("2001:db8:1::1")).is_some(), "another /48");
    }

    #[test]
    fn a_trusted_proxy_is_exempt_from_the_per_address_cap_but_not_the_total() {
        let h = Arc::new(Handshaking::default());
        h.set_max_total(PER_ADDRESS as usize + 10);
        let held: Vec<_> = (0..PER_ADDRESS + 5).map(|_| h.acquire_for_proxy().unwrap()).collect();
        assert_eq!(h.total(), PER_ADDRESS as usize + 5);
        assert!(h.counts.lock().unwrap().is_empty(), "no address is charged");
        let more: Vec<_> = (0..5).map(|_| h.acquire_for_proxy().unwrap()).collect();
        assert!(h.acquire_for_proxy().is_none(), "the total holds");
        assert!(h.acquire(ip("192.0.2.7")).is_none(), "for everyone");
        drop((held, more));
        assert_eq!(h.total(), 0);
    }

    #[test]
    fn the_total_caps_every_address_together() {
        let h = Arc::new(Handshaking::default());
        h.set_max_total(3);
        let held: Vec<_> = (1..=3).map(|i| h.acquire(ip(&format!("10.0.0.{i}"))).unwrap()).collect();
        assert!(h.acquire(ip("10.0.0.9")).is_none());
        drop(held);
        assert!(h.acquire(ip("10.0.0.9")).is_some());
    }
}
