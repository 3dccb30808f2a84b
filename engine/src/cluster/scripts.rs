//! The Lua scripts that count connections across instances. Each runs atomically in Redis, so
//! two instances admitting at the same moment cannot both take the last slot.
//!
//! Live connections are *leases*: sorted-set members scored with the time they lapse. An
//! instance renews its connections' leases every [`super::LEASE_REFRESH`]; a crashed
//! instance's connections lapse within [`super::LEASE`] and stop counting. Times are
//! milliseconds since the epoch from the instance's clock (instances must agree within a few
//! seconds, as NTP keeps them).

use std::sync::LazyLock;

use redis::Script;

/// Per-IP concurrent connections and the per-user reconnect window, in one step.
///
/// KEYS: `wsgate:ip:<addr>`, `wsgate:reconnects:<user>`.
/// ARGV: now, lease, member, max_per_ip, reconnects max, reconnects window (ms).
/// Returns `{0, 0}` admitted (the lease and the handshake are recorded), `{1, 0}` the address
/// is at its limit, `{2, wait_ms}` the user reconnects too often.
pub static ADMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local now = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then
  return {1, 0}
end
local max = tonumber(ARGV[5])
local per = tonumber(ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - per)
local n = redis.call('ZCARD', KEYS[2])
if n >= max then
  if n == 0 then
    return {2, per}
  end
  local freeing = redis.call('ZRANGE', KEYS[2], n - math.max(max, 1), n - math.max(max, 1), 'WITHSCORES')
  return {2, math.max(tonumber(freeing[2]) + per - now, 1)}
end
redis.call('ZADD', KEYS[1], now + lease, ARGV[3])
redis.call('PEXPIRE', KEYS[1], lease)
redis.call('ZADD', KEYS[2], now, ARGV[3])
redis.call('PEXPIRE', KEYS[2], per)
return {0, 0}
",
    )
});

/// The address half of [`ADMIT`], for a Redis Cluster (where the two keys lie in different
/// slots).
///
/// KEYS: `wsgate:ip:<addr>`. ARGV: now, lease, member, max_per_ip.
/// Returns 0 admitted (the lease is recorded) or 1 the address is at its limit.
pub static ADMIT_IP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local now = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then
  return 1
end
redis.call('ZADD', KEYS[1], now + lease, ARGV[3])
redis.call('PEXPIRE', KEYS[1], lease)
return 0
",
    )
});

/// The reconnect-window half of [`ADMIT`], for a Redis Cluster.
///
/// KEYS: `wsgate:reconnects:<user>`. ARGV: now, member, reconnects max, window (ms).
/// Returns 0 admitted (the handshake is recorded) or the wait in ms until a slot frees.
pub static ADMIT_RECONNECT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local now = tonumber(ARGV[1])
local max = tonumber(ARGV[3])
local per = tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - per)
local n = redis.call('ZCARD', KEYS[1])
if n >= max then
  if n == 0 then
    return math.max(per, 1)
  end
  local freeing = redis.call('ZRANGE', KEYS[1], n - math.max(max, 1), n - math.max(max, 1), 'WITHSCORES')
  return math.max(tonumber(freeing[2]) + per - now, 1)
end
redis.call('ZADD', KEYS[1], now, ARGV[2])
redis.call('PEXPIRE', KEYS[1], per)
return 0
",
    )
});

/// Records a revocation and forgets the lapsed ones.
///
/// KEYS: `wsgate:revocations`. ARGV: now, forget at (ms since the epoch), member
/// (`<revoked at>|<user>`), ttl (ms). The key lives as long as its longest revocation.
pub static REVOKE: LazyLock<Script> = LazyLock::new(|| {
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
pub static REGISTER: LazyLock<Script> = LazyLock::new(|| {
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
