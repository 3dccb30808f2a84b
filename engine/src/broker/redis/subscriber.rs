//! The subscriber task: owns the subscription connection, makes Redis hold what
//! [`Subscriptions`](crate::broker::redis::subscriptions::Subscriptions) says is wanted, and takes what Redis pushes on it (deliveries from the
//! other instances, control messages, probes, lost subscriptions).

use std::sync::Weak;
use std::sync::atomic::Ordering;

use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc;

use crate::broker::redis::instance::Redis;
use crate::broker::redis::keys;
use crate::broker::redis::link::{Link, Subscriber};
use crate::broker::redis::wire::{self, Dropped};

/// Works the rounds of the link's subscriptions one after another until the link is gone.
/// A round is one `SUBSCRIBE` and one `UNSUBSCRIBE` with every channel (on a Redis Cluster, one
/// per hash slot): 2,000 clients connecting at once cost a few round trips, not 2,000.
pub(crate) async fn run(redis: Weak<Redis>, link: Link, mut woken: mpsc::Receiver<()>) {
    let mut connection: Option<Subscriber> = None;
    while woken.recv().await.is_some() {
        loop {
            let Some(shared) = redis.upgrade() else { return };
            let subscriptions = &shared.subscriptions;
            let Some(mut round) = subscriptions.take(|c| shared.wants(c), || shared.everything()) else {
                break;
            };
            if round.rebuild {
                connection = None; // the old one closes
            }
            if round.subscribe.is_empty() && round.unsubscribe.is_empty() && !round.full {
                subscriptions.finished(round, true);
                continue;
            }
            if connection.is_none() {
                match subscription_connection(&link, &redis) {
                    Ok(c) => connection = Some(c),
                    Err(e) => {
                        shared.mark_down(&e.to_string());
                        subscriptions.finished(round, false);
                        break;
                    }
                }
            }
            let Some(con) = connection.as_mut() else { break };
            let mut result = Ok(());
            if !round.subscribe.is_empty() {
                result = con.subscribe(std::mem::take(&mut round.subscribe)).await;
            }
            if result.is_ok() && !round.unsubscribe.is_empty() {
                result = con.unsubscribe(round.unsubscribe.clone()).await;
            }
            if let Err(e) = &result {
                // Retried in whole when Redis is back (a resync subscribes to every channel).
                shared.mark_down(&e.to_string());
            }
            subscriptions.finished(round, result.is_ok());
        }
    }
}

/// A subscription connection whose pushes go to `redis`.
fn subscription_connection(link: &Link, redis: &Weak<Redis>) -> redis::RedisResult<Subscriber> {
    let handler = redis.clone();
    link.subscriber(move |push: PushInfo| {
        if let Some(redis) = handler.upgrade() {
            on_push(&redis, push);
        }
    })
}

fn on_push(redis: &Redis, push: PushInfo) {
    match push.kind {
        PushKind::Message | PushKind::SMessage => {
            let [Value::BulkString(channel), Value::BulkString(payload)] = push.data.as_slice() else { return };
            let Ok(channel) = std::str::from_utf8(channel) else { return };
            if let Some(client_channel) = keys::client_channel(channel) {
                match wire::decode(client_channel, payload, &redis.origin) {
                    Ok(delivery) => {
                        redis.hub.deliver(&delivery.channel, &delivery.frame);
                    }
                    Err(Dropped::Own) => {}
                    Err(Dropped::Malformed(e)) => {
                        let n = redis.malformed.fetch_add(1, Ordering::Relaxed) + 1;
                        if n.is_power_of_two() {
                            tracing::warn!(channel = client_channel, error = %e, dropped = n, "dropped a malformed message from Redis");
                        }
                    }
                }
            } else if channel == keys::CONTROL {
                redis.on_control(payload);
            } else if redis.probes.owns(channel)
                && let Some(seq) = std::str::from_utf8(payload).ok().and_then(|s| s.parse().ok())
            {
                redis.probes.saw(channel, seq);
            }
        }
        PushKind::SUnsubscribe => {
            // A Redis Cluster drops the sharded subscriptions of a slot that moved to another
            // node (a resharding, a failover). The ones still wanted are made again, on the
            // slot's new owner.
            let [Value::BulkString(channel), ..] = push.data.as_slice() else { return };
            let Ok(channel) = std::str::from_utf8(channel) else { return };
            redis.subscriptions.lost(channel, |c| redis.wants(c));
        }
        PushKind::Disconnection => redis.mark_down("the subscription connection to Redis was lost"),
        _ => {}
    }
}
