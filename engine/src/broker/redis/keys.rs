//! Where wsgate keeps things in Redis. Backends that publish straight into Redis depend on the
//! channel names and the message format; everything else is wsgate's own (documented in the
//! README so an operator can inspect it).
//!
//! | name | kind | what |
//! |---|---|---|
//! | `wsgate:ch:<channel>` | pub/sub channel | messages for `<channel>`: `{"id": …, "data": …}` |
//! | `wsgate:control` | pub/sub channel | instance to instance: replacements, disconnects |
//! | `wsgate:probe:<origin>` | pub/sub channel | an instance's liveness probe of its own subscription |
//! | `wsgate:revocations` | sorted set | `<revoked at ms>\|<user>`, scored with when it is forgotten |
//! | `wsgate:ip:<address>` | sorted set | live connections of a client address: leases |
//! | `wsgate:user:<user>` | sorted set | live connections of a user: leases |
//! | `wsgate:reconnects:<user>` | sorted set | the user's recent handshakes |

use std::net::IpAddr;

/// Every key and channel starts with this.
pub(crate) const PREFIX: &str = "wsgate:";
/// Pub/sub channels of client channels: `wsgate:ch:<channel>`.
pub(crate) const CHANNEL_PREFIX: &str = "wsgate:ch:";
/// Instance-to-instance control messages.
pub(crate) const CONTROL: &str = "wsgate:control";
/// Every live revocation, in one sorted set: one key, so one node of a Redis Cluster holds
/// them all and one read loads them (no `SCAN`, which does not span a cluster's nodes).
pub(crate) const REVOCATIONS: &str = "wsgate:revocations";

/// The pub/sub channel carrying client channel `channel`.
pub(crate) fn channel(channel: &str) -> String {
    format!("{CHANNEL_PREFIX}{channel}")
}

/// The client channel a pub/sub channel carries, if it is one.
pub(crate) fn client_channel(redis_channel: &str) -> Option<&str> {
    redis_channel.strip_prefix(CHANNEL_PREFIX)
}

/// An instance's probe channel.
pub(crate) fn probe(origin: &str) -> String {
    format!("{PREFIX}probe:{origin}")
}

/// A revocation's member in [`REVOCATIONS`]: `<revoked at, ms since the epoch>|<user>`.
pub(crate) fn revocation(revoked_at_ms: u64, user: &str) -> String {
    format!("{revoked_at_ms}|{user}")
}

/// The time and user of a revocation member.
pub(crate) fn parse_revocation(member: &str) -> Option<(u64, &str)> {
    let (at, user) = member.split_once('|')?;
    Some((at.parse().ok()?, user))
}

/// Live connections of an address, grouped as the local limit groups them (IPv6 by /64).
pub(crate) fn ip(ip: IpAddr) -> String {
    format!("{PREFIX}ip:{}", crate::limits::per_ip::limit_key(ip))
}

/// Live connections of a user.
pub(crate) fn user(user: &str) -> String {
    format!("{PREFIX}user:{user}")
}

/// A user's recent handshakes.
pub(crate) fn reconnects(user: &str) -> String {
    format!("{PREFIX}reconnects:{user}")
}

/// A connection's name in the lease sets: `<connected ms, 15 digits>|<origin>|<session>`. The
/// fixed-width time first makes the lexical order the order of connection, so "the oldest" is
/// the smallest member.
pub(crate) fn member(connected_ms: u64, origin: &str, session: u64) -> String {
    format!("{connected_ms:015}|{origin}|{session}")
}

/// The origin and session number of a lease member.
pub(crate) fn parse_member(member: &str) -> Option<(&str, u64)> {
    let mut parts = member.splitn(3, '|');
    let _time = parts.next()?;
    let origin = parts.next()?;
    let session = parts.next()?.parse().ok()?;
    Some((origin, session))
}

/// The Redis Cluster hash slot of `key` (CRC16/XMODEM mod 16384 of the key, or of its hash tag:
/// the text between the first `{` and the next `}`, when not empty). Commands of one pipeline or
/// one script must stay in one slot.
pub fn slot(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.iter().position(|&b| b == b'}').filter(|&close| close > 0).map(|close| &rest[..close])
        })
        .unwrap_or(key);
    crc16_xmodem(hashed) % 16384
}

fn crc16_xmodem(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_sort_by_connection_time_and_parse_back() {
        let older = member(999, "aa", 7);
        let newer = member(1_700_000_000_000, "bb", 3);
        assert!(older < newer);
        assert_eq!(parse_member(&newer), Some(("bb", 3)));
        assert_eq!(parse_member("junk"), None);
    }

    #[test]
    fn revocations_parse_back_whatever_the_user_holds() {
        assert_eq!(parse_revocation(&revocation(1_700_000_000_123, "a|b")), Some((1_700_000_000_123, "a|b")));
        assert_eq!(parse_revocation("x|alice"), None);
        assert_eq!(parse_revocation("alice"), None);
    }

    #[test]
    fn slots_follow_the_redis_cluster_specification() {
        // The specification's check value, and examples `CLUSTER KEYSLOT` gives.
        assert_eq!(crc16_xmodem(b"123456789"), 0x31C3);
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
        assert_eq!(slot(b"foo{}{bar}"), crc16_xmodem(b"foo{}{bar}") % 16384, "an empty tag hashes the whole key");
        assert_ne!(slot(b"foo{}{bar}"), slot(b"bar"));
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
        assert_eq!(slot(b"foo{bar}{zap}"), slot(b"bar"));
    }

    #[test]
    fn layout() {
        assert_eq!(channel("user:42"), "wsgate:ch:user:42");
        assert_eq!(client_channel("wsgate:ch:user:42"), Some("user:42"));
        assert_eq!(client_channel("wsgate:control"), None);
        assert_eq!(ip("2001:db8::1:2:3:4".parse().unwrap()), "wsgate:ip:2001:db8::");
        assert_eq!(ip("::ffff:10.0.0.1".parse().unwrap()), "wsgate:ip:10.0.0.1");
    }
}
