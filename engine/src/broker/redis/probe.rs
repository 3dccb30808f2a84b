//! The liveness probe's channels. Every [`PROBE_INTERVAL`](crate::broker::redis::health::PROBE_INTERVAL) an instance publishes a
//! sequence number to channels only it subscribes to, and checks that the previous one came
//! back through its subscription.
//!
//! On one server that is one channel, `wsgate:probe:<origin>`. On a Redis Cluster the
//! subscription is one connection per node, and a sharded publish goes only to the node owning
//! the channel's slot: one channel would check one node. So there is one channel per primary,
//! `wsgate:probe:<origin>:<n>`, with `n` the first number whose slot the primary owns. The set
//! is read again from `CLUSTER SLOTS` when a probe fails and every
//! [`PROBE_TOPOLOGY_EVERY`](crate::broker::redis::health::PROBE_TOPOLOGY_EVERY) probes, so a failover or a moved slot changes it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use redis::Value;

use crate::broker::redis::keys;

/// The probe channels of one instance and the last probe each delivered.
#[derive(Debug)]
pub(crate) struct Probes {
    prefix: String,
    channels: Mutex<Vec<String>>,
    seen: Mutex<HashMap<String, u64>>,
}

impl Probes {
    /// One channel, `wsgate:probe:<origin>`, until [`Probes::replace`] says otherwise.
    pub(crate) fn new(origin: &str) -> Probes {
        let prefix = keys::probe(origin);
        Probes { channels: Mutex::new(vec![prefix.clone()]), prefix, seen: Mutex::default() }
    }

    /// The channels probed now.
    pub(crate) fn channels(&self) -> Vec<String> {
        self.channels.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Probes `channels` from now on; returns the ones that are new (to subscribe to) and the
    /// ones no longer probed (to leave), or `None` when nothing changed.
    pub(crate) fn replace(&self, channels: Vec<String>) -> Option<(Vec<String>, Vec<String>)> {
        let mut current = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if *current == channels {
            return None;
        }
        let new = channels.iter().filter(|c| !current.contains(c)).cloned().collect();
        let gone = current.iter().filter(|c| !channels.contains(c)).cloned().collect();
        *current = channels;
        Some((new, gone))
    }

    /// Whether `channel` is one of this instance's probe channels.
    pub(crate) fn owns(&self, channel: &str) -> bool {
        channel.strip_prefix(self.prefix.as_str()).is_some_and(|rest| rest.is_empty() || rest.starts_with(':'))
    }

    /// Probe `seq` came back on `channel`.
    pub(crate) fn saw(&self, channel: &str, seq: u64) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let last = seen.entry(channel.to_string()).or_default();
        *last = (*last).max(seq);
    }

    /// Whether probe `seq` came back on every channel (and there is one).
    pub(crate) fn all_back(&self, seq: u64) -> bool {
        let channels = self.channels();
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        !channels.is_empty() && channels.iter().all(|c| seen.get(c).is_some_and(|&s| s >= seq))
    }
}

/// One probe channel per primary of `slots` (ranges of slots with the primary owning them);
/// none for an empty slot map.
pub(crate) fn per_primary(origin: &str, slots: &[SlotRange]) -> Vec<String> {
    let mut primaries: BTreeMap<&str, Vec<(u16, u16)>> = BTreeMap::new();
    for range in slots {
        primaries.entry(&range.primary).or_default().push((range.first, range.last));
    }
    let prefix = keys::probe(origin);
    let mut channels = Vec::new();
    for ranges in primaries.values() {
        // A primary owning a single slot is found within about 16,384 tries; a million is plenty.
        let owned = (0..1u32 << 20).map(|n| format!("{prefix}:{n}")).find(|channel| {
            let slot = keys::slot(channel.as_bytes());
            ranges.iter().any(|&(first, last)| (first..=last).contains(&slot))
        });
        channels.extend(owned);
    }
    channels.sort();
    channels
}

/// Slots `first..=last`, served by `primary` (its node id, or `host:port` without one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SlotRange {
    pub(crate) first: u16,
    pub(crate) last: u16,
    pub(crate) primary: String,
}

/// The reply of `CLUSTER SLOTS`: `[[first, last, [host, port, id, …], replicas…], …]`. The
/// host may be null (an unknown endpoint); the node id names the primary when given.
pub(crate) fn parse_cluster_slots(reply: &Value) -> Option<Vec<SlotRange>> {
    let text = |v: &Value| match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    let Value::Array(ranges) = reply else { return None };
    ranges
        .iter()
        .map(|range| {
            let Value::Array(fields) = range else { return None };
            let [Value::Int(first), Value::Int(last), Value::Array(primary), ..] = fields.as_slice() else {
                return None;
            };
            let [host, Value::Int(port), rest @ ..] = primary.as_slice() else { return None };
            let primary = match rest.first().and_then(text) {
                Some(id) => id,
                None => format!("{}:{port}", text(host).unwrap_or_default()),
            };
            Some(SlotRange { first: u16::try_from(*first).ok()?, last: u16::try_from(*last).ok()?, primary })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(first: u16, last: u16, primary: &str) -> SlotRange {
        SlotRange { first, last, primary: primary.into() }
    }

    #[test]
    fn one_channel_per_primary_in_a_slot_it_owns() {
        let slots = [range(0, 5460, "a:1"), range(5461, 10922, "b:1"), range(10923, 16383, "c:1"), range(7, 7, "d:1")];
        let channels = per_primary("abc", &slots);
        assert_eq!(channels.len(), 4);
        for (channel, owner) in channels.iter().map(|c| (c, keys::slot(c.as_bytes()))) {
            assert!(channel.starts_with("wsgate:probe:abc:"));
            assert!(slots.iter().any(|r| (r.first..=r.last).contains(&owner)), "{channel} in slot {owner}");
        }
        assert!(channels.iter().any(|c| keys::slot(c.as_bytes()) == 7), "even a one-slot primary gets one");
    }

    #[test]
    fn a_primary_with_several_ranges_gets_one_channel() {
        let slots = [range(0, 100, "a:1"), range(200, 16383, "a:1"), range(101, 199, "b:1")];
        assert_eq!(per_primary("o", &slots).len(), 2);
    }

    #[test]
    fn probes_are_back_only_when_every_channel_delivered() {
        let probes = Probes::new("o");
        assert_eq!(probes.channels(), vec!["wsgate:probe:o".to_string()]);
        assert!(probes.owns("wsgate:probe:o") && probes.owns("wsgate:probe:o:3"));
        assert!(!probes.owns("wsgate:probe:other") && !probes.owns("wsgate:probe:o2"));
        let (new, gone) = probes.replace(vec!["wsgate:probe:o:1".into(), "wsgate:probe:o:2".into()]).unwrap();
        assert_eq!((new.len(), gone), (2, vec!["wsgate:probe:o".to_string()]));
        assert_eq!(probes.replace(probes.channels()), None);
        probes.saw("wsgate:probe:o:1", 5);
        assert!(!probes.all_back(5));
        probes.saw("wsgate:probe:o:2", 5);
        assert!(probes.all_back(5) && !probes.all_back(6));
    }

    #[test]
    fn cluster_slots_replies_parse() {
        let node = |host: &str, port: i64| {
            Value::Array(vec![Value::BulkString(host.into()), Value::Int(port), Value::BulkString(b"id".to_vec())])
        };
        let node_b = |port: i64| Value::Array(vec![Value::BulkString(b"h".to_vec()), Value::Int(port)]);
        let reply = Value::Array(vec![
            Value::Array(vec![Value::Int(0), Value::Int(8191), node("127.0.0.1", 7000), node("127.0.0.1", 7003)]),
            Value::Array(vec![Value::Int(8192), Value::Int(16383), node_b(7001)]),
        ]);
        assert_eq!(parse_cluster_slots(&reply), Some(vec![range(0, 8191, "id"), range(8192, 16383, "h:7001")]));
        let unknown_endpoint = Value::Array(vec![Value::Array(vec![
            Value::Int(0),
            Value::Int(16383),
            Value::Array(vec![Value::Nil, Value::Int(7000)]),
        ])]);
        assert_eq!(parse_cluster_slots(&unknown_endpoint), Some(vec![range(0, 16383, ":7000")]));
        assert!(per_primary("o", &[]).is_empty());
        assert!(!Probes::new("o").all_back(0), "the first probe has not come back yet");
        assert_eq!(parse_cluster_slots(&Value::Nil), None);
        assert_eq!(parse_cluster_slots(&Value::Array(vec![Value::Int(1)])), None);
    }
}
