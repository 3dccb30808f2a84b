//! The health loop: every [`PROBE_INTERVAL`] the instance publishes a probe to channels only it
//! subscribes to and checks that the last one came back through its subscription, so a
//! subscription that is wedged while commands still work is noticed and rebuilt. It marks the
//! link up or away, restores what an outage lost and renews leases. While Redis is away
//! (`wsgate_redis_up` 0, `/readyz` 503) every client stays connected, local delivery goes on,
//! and the limits fall back to this instance's own counts.

use std::sync::Weak;
use std::time::Duration;

use redis::Value;

use crate::broker::redis::instance::Redis;
use crate::broker::redis::lease::LEASE_REFRESH;
use crate::broker::redis::link::RESPONSE_TIMEOUT;
use crate::broker::redis::probe;

/// How often the instance probes Redis and its own subscription.
pub(crate) const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// On a Redis Cluster, how many probes pass between readings of the slot map (which choose the
/// probe channels, one per primary); a failed probe reads it again at once.
pub(crate) const PROBE_TOPOLOGY_EVERY: u64 = 10;
/// Probes in a row that may go missing before the subscription connection is rebuilt.
const WEDGED_AFTER: u32 = 3;

/// Probes Redis and the subscription every [`PROBE_INTERVAL`] until the link is gone.
pub(crate) async fn run(redis: Weak<Redis>) {
    // Subscribe first, so the first probe finds the subscription in place.
    if let Some(redis) = redis.upgrade() {
        redis.resync(false, resync_within(&redis)).await;
    }
    let mut every = tokio::time::interval(PROBE_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    let mut last_sent: Option<u64> = None;
    let mut missing = 0u32;
    let mut renewed = tokio::time::Instant::now();
    loop {
        every.tick().await;
        let Some(redis) = redis.upgrade() else { return };
        if (seq.is_multiple_of(PROBE_TOPOLOGY_EVERY) || missing > 0) && redis.refresh_probes().await {
            last_sent = None; // the new channels have not carried the last probe
        }
        seq += 1;
        let verdict = match redis.probe(seq).await {
            Err(e) => {
                last_sent = None;
                Err(e.to_string())
            }
            Ok(receivers) => {
                // The previous probe had a whole interval to come back.
                let came_back = last_sent.is_none_or(|sent| redis.probes.all_back(sent));
                last_sent = Some(seq);
                if receivers > 0 && came_back {
                    Ok(())
                } else {
                    missing += 1;
                    Err("the subscription did not deliver the liveness probe".to_string())
                }
            }
        };
        match verdict {
            Ok(()) => {
                missing = 0;
                if !redis.is_up() {
                    restore(&redis).await;
                    renewed = tokio::time::Instant::now();
                } else if renewed.elapsed() >= LEASE_REFRESH {
                    if let Err(e) = redis.renew_leases().await {
                        redis.mark_down(&e.to_string());
                    }
                    renewed = tokio::time::Instant::now();
                }
            }
            Err(why) => {
                redis.mark_down(&why);
                if missing >= WEDGED_AFTER {
                    // Commands work but the subscription does not deliver: replace it.
                    tracing::warn!(probes = missing, "the Redis subscription stopped delivering; reconnecting it");
                    missing = 0;
                    last_sent = None;
                    redis.resync(true, RESPONSE_TIMEOUT * 2).await;
                }
            }
        }
    }
}

/// How long a resync may take: it subscribes to every channel with a local subscriber, which on
/// a Redis Cluster is one command per hash slot (a second per thousand channels is generous).
fn resync_within(redis: &Redis) -> Duration {
    let thousands = u32::try_from(redis.hub.channel_count() / 1000).unwrap_or(u32::MAX);
    RESPONSE_TIMEOUT.saturating_mul(thousands.saturating_add(2))
}

/// Back from an outage (or the first contact): subscribe to everything, restore leases and
/// revocations, then mark the link up.
async fn restore(redis: &Redis) {
    if !redis.resync(false, resync_within(redis)).await {
        return;
    }
    if let Err(e) = redis.renew_leases().await {
        return redis.mark_down(&e.to_string());
    }
    match redis.load_revocations().await {
        Ok(n) if n > 0 => tracing::info!(revocations = n, "revocations read from Redis"),
        Ok(_) => {}
        Err(e) => return redis.mark_down(&e.to_string()),
    }
    redis.mark_up();
}

impl Redis {
    /// Sends the probe numbered `seq` on every probe channel; answers the fewest subscribers
    /// any of them reached (0 when there is no channel: nothing was checked).
    async fn probe(&self, seq: u64) -> redis::RedisResult<i64> {
        let mut fewest: Option<i64> = None;
        for channel in self.probes.channels() {
            let reached: i64 = redis::cmd(self.link.publish_command())
                .arg(&channel)
                .arg(seq)
                .query_async(&mut self.connection())
                .await?;
            fewest = Some(fewest.map_or(reached, |f| f.min(reached)));
        }
        Ok(fewest.unwrap_or(0))
    }

    /// On a Redis Cluster, reads the slot map and probes one channel per primary from now on;
    /// the new channels are subscribed to before this returns. Whether the channels changed.
    async fn refresh_probes(&self) -> bool {
        if !self.link.is_sharded() {
            return false;
        }
        let slots: redis::RedisResult<Value> =
            redis::cmd("CLUSTER").arg("SLOTS").query_async(&mut self.connection()).await;
        let Some(slots) = slots.ok().as_ref().and_then(probe::parse_cluster_slots) else { return false };
        let channels = probe::per_primary(&self.origin, &slots);
        if channels.is_empty() {
            return false; // a Redis Cluster still forming: keep probing what was probed
        }
        let Some((new, gone)) = self.probes.replace(channels) else { return false };
        for channel in new.into_iter().chain(gone) {
            self.subscriptions.touch(channel, |c| self.own_channels().iter().any(|own| own == c));
        }
        // Out of step (Redis is marked away, as after the failed probe that led here): a resync
        // subscribes the new channels now, with everything else. Waiting for Redis' return
        // would wait for a probe on channels nobody listens to.
        if !self.subscriptions.settled(RESPONSE_TIMEOUT * 2).await {
            self.resync(false, RESPONSE_TIMEOUT * 2).await;
        }
        true
    }
}
