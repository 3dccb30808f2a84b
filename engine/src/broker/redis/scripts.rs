//! The Lua scripts that count connections across instances. Each runs atomically in Redis, so
//! two instances admitting at the same moment cannot both take the last slot.
//!
//! Live connections are *leases*: sorted-set members scored with the time they lapse. An
//! instance renews its connections' leases every [`LEASE_REFRESH`]; a crashed instance's
//! connections lapse within [`LEASE`] and stop counting.
//!
//! [`LEASE`]: crate::broker::redis::lease::LEASE
//! [`LEASE_REFRESH`]: crate::broker::redis::lease::LEASE_REFRESH Times are
//! milliseconds since the epoch from the instance's clock (instances must agree within a few
//! seconds, as NTP keeps them).
//!
//! A reply that says more than "done" is decoded here, once, into what it means
//! ([`AdmitReply`]).

use std::sync::LazyLock;
use std::time::Duration;

use redis::{FromRedisValue, ParsingError, Script, Value};

/// What [`ADMIT`], [`ADMIT_IP`] and [`ADMIT_RECONNECT`] answer, each as `{code, wait_ms}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AdmitReply {
    /// `{0, 0}`: counted.
    Admitted,
    /// `{1, 0}`: the address is at its limit.
    PerIp,
    /// `{2, wait_ms}`: the user reconnects too often; a slot frees after this long.
    Reconnects(Duration),
}

impl FromRedisValue for AdmitReply {
    fn from_redis_value(v: Value) -> Result<Self, ParsingError> {
        let (code, wait): (i64, i64) = FromRedisValue::from_redis_value(v)?;
        Ok(match code {
            0 => AdmitReply::Admitted,
            1 => AdmitReply::PerIp,
            _ => AdmitReply::Reconnects(Duration::from_millis(u64::try_from(wait).unwrap_or(1))),
        })
    }
}

/// The Lua functions [`ADMIT`], [`ADMIT_IP`] and [`ADMIT_RECONNECT`] are made of, so the
/// counting is written once whether it runs in one script or, on a Redis Cluster, in two.
macro_rules! admit_functions {
    () => {
        r"
-- Lapsed leases go; whether the address has `max` live connections.
local function address_full(key, now, max)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  return redis.call('ZCARD', key) >= max
end
local function lease_address(key, now, lease, member)
  redis.call('ZADD', key, now + lease, member)
  redis.call('PEXPIRE', key, lease)
end
-- Handshakes older than the window go; 0 when another is allowed, else the wait in ms until
-- the oldest that counts leaves the window.
local function reconnect_wait(key, now, max, per)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - per)
  local n = redis.call('ZCARD', key)
  if n < max then
    return 0
  end
  if n == 0 then
    return math.max(per, 1)
  end
  local freeing = redis.call('ZRANGE', key, n - math.max(max, 1), n - math.max(max, 1), 'WITHSCORES')
  return math.max(tonumber(freeing[2]) + per - now, 1)
end
local function record_handshake(key, now, per, member)
  redis.call('ZADD', key, now, member)
  redis.call('PEXPIRE', key, per)
end
"
    };
}

/// Per-IP concurrent connections and the per-user reconnect window, in one step.
///
/// KEYS: `wsgate:ip:<addr>`, `wsgate:reconnects:<user>`.
/// ARGV: now, lease, member, max_per_ip, reconnects max, reconnects window (ms).
/// Returns an [`AdmitReply`]; when admitted, the lease and the handshake are recorded.
pub(crate) static ADMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        admit_functions!(),
        r"
local now = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
local per = tonumber(ARGV[6])
if address_full(KEYS[1], now, tonumber(ARGV[4])) then
  return {1, 0}
end
local wait = reconnect_wait(KEYS[2], now, tonumber(ARGV[5]), per)
if wait > 0 then
  return {2, wait}
end
lease_address(KEYS[1], now, lease, ARGV[3])
record_handshake(KEYS[2], now, per, ARGV[3])
return {0, 0}
"
    ))
});

/// The address half of [`ADMIT`], for a Redis Cluster (where the two keys lie in different
/// slots).
///
/// KEYS: `wsgate:ip:<addr>`. ARGV: now, lease, member, max_per_ip.
/// Returns an [`AdmitReply`], admitted (the lease is recorded) or at the address's limit.
pub(crate) static ADMIT_IP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        admit_functions!(),
        r"
local now = tonumber(ARGV[1])
if address_full(KEYS[1], now, tonumber(ARGV[4])) then
  return {1, 0}
end
lease_address(KEYS[1], now, tonumber(ARGV[2]), ARGV[3])
return {0, 0}
"
    ))
});

/// The reconnect-window half of [`ADMIT`], for a Redis Cluster.
///
/// KEYS: `wsgate:reconnects:<user>`. ARGV: now, member, reconnects max, window (ms).
/// Returns an [`AdmitReply`], admitted (the handshake is recorded) or the wait until a slot
/// frees.
pub(crate) static ADMIT_RECONNECT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        admit_functions!(),
        r"
local now = tonumber(ARGV[1])
local per = tonumber(ARGV[4])
local wait = reconnect_wait(KEYS[1], now, tonumber(ARGV[3]), per)
if wait > 0 then
  return {2, wait}
end
record_handshake(KEYS[1], now, per, ARGV[2])
return {0, 0}
"
    ))
});

/// Records a revocation and forgets the lapsed ones.
///
/// KEYS: `wsgate:revocations`. ARGV: now, forget at (ms since the epoch), member
/// (`<revoked at>|<user>`), ttl (ms). The key lives as long as its longest revocation.
pub(crate) static REVOKE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[1]))
redis.call('ZADD', KEYS[1], tonumber(ARGV[2]), ARGV[3])
local ttl = tonumber(ARGV[4])
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return 1
",
    )
});

/// Registers a live connection of a user; the oldest beyond the user's maximum are displaced.
///
/// KEYS: `wsgate:user:<user>`. ARGV: now, lease, member, max_per_user.
/// Returns the displaced members (oldest first), which are removed from the set.
pub(crate) static REGISTER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local now = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + lease, ARGV[3])
redis.call('PEXPIRE', KEYS[1], lease)
local all = redis.call('ZRANGE', KEYS[1], 0, -1)
local max = math.max(tonumber(ARGV[4]), 1)
if #all <= max then
  return {}
end
table.sort(all)
local displaced = {}
for i = 1, #all - max do
  displaced[i] = all[i]
  redis.call('ZREM', KEYS[1], all[i])
end
return displaced
",
    )
});
