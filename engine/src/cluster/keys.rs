//! Where wsgate keeps things in Redis. Backends that publish straight into Redis depend on the
//! channel names and the message format; everything else is wsgate's own (documented in the
//! README so an operator can inspect it).
//!
//! | name | kind | what |
//! |---|---|---|
//! | `wsgate:ch:<channel>` | pub/sub channel | messages for `<channel>`: `{"id": …, "data": …}` |
//! | `wsgate:control` | pub/sub channel | instance to instance: replacements, disconnects |
//! | `wsgate:probe:<origin>` | pub/sub channel | an instance's liveness probe of its own subscription |
//! | `wsgate:revoked:<user>` | string, TTL | revocation time (ms since the epoch) |
//! | `wsgate:ip:<address>` | sorted set | live connections of a client address: leases |
//! | `wsgate:user:<user>` | sorted set | live connections of a user: leases |
//! | `wsgate:reconnects:<user>` | sorted set | the user's recent handshakes |

use std::net::IpAddr;

/// Every key and channel starts with this.
pub const PREFIX: &str = "wsgate:";
/// Pub/sub channels of client channels: `wsgate:ch:<channel>`.
pub const CHANNEL_PREFIX: &str = "wsgate:ch:";
/// Instance-to-instance control messages.
pub const CONTROL: &str = "wsgate:control";
/// Revocations: `wsgate:revoked:<user>`.
pub const REVOKED_PREFIX: &str = "wsgate:revoked:";

/// The pub/sub channel carrying client channel `channel`.
pub fn channel(channel: &str) -> String {
    format!("{CHANNEL_PREFIX}{channel}")
}

/// The client channel a pub/sub channel carries, if it is one.
pub fn client_channel(redis_channel: &str) -> Option<&str> {
    redis_channel.strip_prefix(CHANNEL_PREFIX)
}

/// An instance's probe channel.
pub fn probe(origin: &str) -> String {
    format!("{PREFIX}probe:{origin}")
}

/// A user's revocation.
pub fn revoked(user: &str) -> String {
    format!("{REVOKED_PREFIX}{user}")
}

/// Live connections of an address, grouped as the local limit groups them (IPv6 by /64).
pub fn ip(ip: IpAddr) -> String {
    format!("{PREFIX}ip:{}", crate::limits::limit_key(ip))
}

/// Live connections of a user.
pub fn user(user: &str) -> String {
    format!("{PREFIX}user:{user}")
}

/// A user's recent handshakes.
pub fn reconnects(user: &str) -> String {
    format!("{PREFIX}reconnects:{user}")
}

/// A connection's name in the lease sets: `<connected ms, 15 digits>|<origin>|<session>`. The
/// fixed-width time first makes the lexical order the order of connection, so "the oldest" is
/// the smallest member.
pub fn member(connected_ms: u64, origin: &str, session: u64) -> String {
    format!("{connected_ms:015}|{origin}|{session}")
}

/// The origin and session number of a lease member.
pub fn parse_member(member: &str) -> Option<(&str, u64)> {
    let mut parts = member.splitn(3, '|');
    let _time = parts.next()?;
    let origin = parts.next()?;
    let session = parts.next()?.parse().ok()?;
    Some((origin, session))
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
    fn layout() {
        assert_eq!(channel("user:42"), "wsgate:ch:user:42");
        assert_eq!(client_channel("wsgate:ch:user:42"), Some("user:42"));
        assert_eq!(client_channel("wsgate:control"), None);
        assert_eq!(ip("2001:db8::1:2:3:4".parse().unwrap()), "wsgate:ip:2001:db8::");
        assert_eq!(ip("::ffff:10.0.0.1".parse().unwrap()), "wsgate:ip:10.0.0.1");
    }
}
