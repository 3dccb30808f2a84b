//! The connections to Redis, for one server (`--redis URL`) or a Redis Cluster
//! (`--redis-cluster`). What differs between the two is kept here:
//!
//! - **Pub/sub.** One server: `PUBLISH` and `SUBSCRIBE`. A cluster: sharded pub/sub
//!   (`SPUBLISH`/`SSUBSCRIBE`, Redis 7), so a message goes to the one node owning its channel's
//!   slot, not over the cluster bus to every node, and a subscription is held on that node.
//! - **Slots.** A cluster refuses a command, pipeline or script whose keys lie in different hash
//!   slots. [`Link::group`] says which commands may share a pipeline.
//!
//! Both connect lazily and reconnect by themselves: a Redis that is down when the instance
//! starts is waited for.

use std::collections::BTreeMap;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, PushInfo, RedisFuture, RedisResult, Value};

use crate::broker::redis::keys;

/// Longest wait for one Redis reply; a slower Redis counts as away.
pub(crate) const RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);

/// What `--redis` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Topology {
    /// One server (or a primary behind a failover proxy): plain pub/sub.
    #[default]
    Server,
    /// A Redis Cluster (`--redis-cluster`): sharded pub/sub, keys routed by slot.
    Cluster,
}

/// Where Redis is.
#[derive(Clone)]
pub enum Link {
    /// One server (or a primary behind a failover proxy).
    Single(redis::Client),
    /// A Redis Cluster, found from its seed nodes.
    Sharded(Box<ClusterClient>),
}

impl Link {
    /// `url`: one Redis URL, or for a [`Topology::Cluster`] the comma-separated URLs of its seed
    /// nodes. Errors never repeat the URL (it may hold a password).
    pub fn open(url: &str, topology: Topology) -> Result<Link, String> {
        // One server's URL is taken whole (a password may hold a comma); a cluster's is split.
        let urls: Vec<String> = match topology {
            Topology::Server => vec![with_resp3(url.trim())],
            Topology::Cluster => url.split(',').map(str::trim).filter(|u| !u.is_empty()).map(with_resp3).collect(),
        };
        if urls.iter().any(|u| u.starts_with("rediss://")) {
            return Err("--redis: TLS to Redis (rediss://) is not supported by this build".into());
        }
        let invalid = "--redis is not a valid Redis URL (redis://[user:password@]host:port[/db])";
        if topology == Topology::Server {
            return redis::Client::open(urls[0].as_str()).map(Link::Single).map_err(|_| {
                if url.contains(',') {
                    format!("{invalid}; comma-separated URLs are the seed nodes of a Redis Cluster (--redis-cluster)")
                } else {
                    invalid.to_string()
                }
            });
        }
        if urls.is_empty() {
            return Err(invalid.into());
        }
        ClusterClient::builder(urls)
            .use_protocol(redis::ProtocolVersion::RESP3)
            .connection_timeout(RESPONSE_TIMEOUT)
            .response_timeout(RESPONSE_TIMEOUT)
            .retries(2)
            .min_retry_wait(100)
            .max_retry_wait(2000)
            .build()
            .map(|client| Link::Sharded(Box::new(client)))
            .map_err(|e| match e.kind() {
                redis::ErrorKind::InvalidClientConfig => {
                    "--redis: the seed nodes of a Redis Cluster must share their user and password".to_string()
                }
                _ => format!("{invalid} (each seed node of the cluster)"),
            })
    }

    /// Whether this is a Redis Cluster (sharded pub/sub).
    pub(crate) fn is_sharded(&self) -> bool {
        matches!(self, Link::Sharded(_))
    }

    /// The command that publishes to a pub/sub channel.
    pub(crate) fn publish_command(&self) -> &'static str {
        match self {
            Link::Single(_) => "PUBLISH",
            Link::Sharded(_) => "SPUBLISH",
        }
    }

    /// Which pipeline a command on `key` may join: all of them on one server, the key's hash
    /// slot on a cluster.
    pub(crate) fn group(&self, key: &str) -> u16 {
        match self {
            Link::Single(_) => 0,
            Link::Sharded(_) => keys::slot(key.as_bytes()),
        }
    }

    /// The connection for commands and publishes: multiplexed, shared by every caller.
    pub fn commands(&self) -> Result<Commands, String> {
        match self {
            Link::Single(client) => ConnectionManager::new_lazy_with_config(client.clone(), config())
                .map(Commands::Single)
                .map_err(|e| format!("--redis: {:?}", e.kind())),
            Link::Sharded(client) => {
                Ok(Commands::Sharded(client.get_pending_async_connection_with_config(cluster_config())))
            }
        }
    }

    /// A new subscription connection whose pushes go to `on_push`; it resubscribes by itself
    /// after a reconnect (and, on a cluster, after slots move).
    pub(crate) fn subscriber(&self, on_push: impl Fn(PushInfo) + Send + Sync + 'static) -> RedisResult<Subscriber> {
        let sender = move |push: PushInfo| {
            on_push(push);
            Ok::<(), std::convert::Infallible>(())
        };
        match self {
            Link::Single(client) => {
                let config = config().set_automatic_resubscription().set_push_sender(sender);
                ConnectionManager::new_lazy_with_config(client.clone(), config).map(Subscriber::Single)
            }
            Link::Sharded(client) => {
                let config = cluster_config().set_push_sender(sender);
                Ok(Subscriber::Sharded(client.get_pending_async_connection_with_config(config)))
            }
        }
    }
}

/// The URL with RESP3 asked for (pushes need it), unless it says otherwise.
fn with_resp3(url: &str) -> String {
    if url.contains("protocol=") {
        url.to_string()
    } else if url.contains('?') {
        format!("{url}&protocol=resp3")
    } else {
        format!("{url}?protocol=resp3")
    }
}

fn config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(RESPONSE_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_number_of_retries(2)
        .set_min_delay(Duration::from_millis(100))
        .set_max_delay(Duration::from_secs(2))
}

/// [`config`]'s timeouts, for a cluster's connections (its retries are set on the client).
fn cluster_config() -> ClusterConfig {
    ClusterConfig::new().set_connection_timeout(RESPONSE_TIMEOUT).set_response_timeout(RESPONSE_TIMEOUT)
}

/// The commands connection, to one server or to a cluster (which routes each command to the
/// node owning its key's slot).
#[derive(Clone)]
pub enum Commands {
    /// One server.
    Single(ConnectionManager),
    /// A cluster.
    Sharded(ClusterConnection),
}

impl ConnectionLike for Commands {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Commands::Single(c) => c.req_packed_command(cmd),
            Commands::Sharded(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Commands::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Commands::Sharded(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Commands::Single(c) => c.get_db(),
            Commands::Sharded(c) => c.get_db(),
        }
    }
}

/// The subscription connection.
pub(crate) enum Subscriber {
    /// `SUBSCRIBE` on one server.
    Single(ConnectionManager),
    /// `SSUBSCRIBE` on the nodes owning the channels' slots.
    Sharded(ClusterConnection),
}

impl Subscriber {
    /// Subscribes to `channels`: one command on one server; on a cluster, one per hash slot
    /// (a sharded subscribe's channels must share a slot), [`IN_FLIGHT`] at a time.
    pub(crate) async fn subscribe(&mut self, channels: Vec<String>) -> RedisResult<()> {
        match self {
            Subscriber::Single(c) => c.subscribe(channels).await,
            Subscriber::Sharded(c) => {
                per_slot(c, channels, |mut c, group| async move { c.ssubscribe(group).await }).await
            }
        }
    }

    /// Unsubscribes from `channels`, grouped as [`Subscriber::subscribe`] groups them.
    pub(crate) async fn unsubscribe(&mut self, channels: Vec<String>) -> RedisResult<()> {
        match self {
            Subscriber::Single(c) => c.unsubscribe(channels).await,
            Subscriber::Sharded(c) => {
                per_slot(c, channels, |mut c, group| async move { c.sunsubscribe(group).await }).await
            }
        }
    }
}

/// Commands a cluster connection is given at once when one order spans many slots (a resync
/// after an outage subscribes to every user's channel: thousands of slots).
pub(crate) const IN_FLIGHT: usize = 64;

/// Runs `command` for each slot's group of `channels`, [`IN_FLIGHT`] at a time; the first
/// error is returned (after the others have run).
async fn per_slot<F, Fut>(connection: &ClusterConnection, channels: Vec<String>, command: F) -> RedisResult<()>
where
    F: Fn(ClusterConnection, Vec<String>) -> Fut,
    Fut: std::future::Future<Output = RedisResult<()>>,
{
    use futures_util::StreamExt;
    let results: Vec<RedisResult<()>> = futures_util::stream::iter(by_slot(channels))
        .map(|group| command(connection.clone(), group))
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    results.into_iter().collect()
}

/// `channels` in groups of one hash slot each.
fn by_slot(channels: Vec<String>) -> impl Iterator<Item = Vec<String>> {
    let mut slots: BTreeMap<u16, Vec<String>> = BTreeMap::new();
    for channel in channels {
        slots.entry(keys::slot(channel.as_bytes())).or_default().push(channel);
    }
    slots.into_values()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resp3_is_asked_for_unless_the_url_says() {
        assert_eq!(with_resp3("redis://h:1"), "redis://h:1?protocol=resp3");
        assert_eq!(with_resp3("redis://h:1/0?x=1"), "redis://h:1/0?x=1&protocol=resp3");
        assert_eq!(with_resp3("redis://h/?protocol=resp3"), "redis://h/?protocol=resp3");
    }

    #[test]
    fn a_sharded_subscribe_is_split_by_slot() {
        let channels: Vec<String> = (0..50).map(|i| keys::channel(&format!("c{i}"))).collect();
        let groups: Vec<Vec<String>> = by_slot(channels.clone()).collect();
        assert_eq!(groups.iter().map(Vec::len).sum::<usize>(), 50);
        for group in &groups {
            let slot = keys::slot(group[0].as_bytes());
            assert!(group.iter().all(|c| keys::slot(c.as_bytes()) == slot));
        }
        let tagged = vec!["wsgate:ch:{t}a".to_string(), "wsgate:ch:{t}b".to_string()];
        assert_eq!(by_slot(tagged).count(), 1, "one hash tag, one slot, one command");
    }

    #[test]
    fn urls_are_checked_without_being_repeated() {
        let err = Link::open("not a url :secret", Topology::Server).err().unwrap();
        assert!(!err.contains("secret"), "{err}");
        assert!(Link::open("rediss://h:1", Topology::Server).is_err());
        let err = Link::open("redis://a:1,redis://b:2", Topology::Server).err().unwrap();
        assert!(err.contains("--redis-cluster"), "seed lists are for clusters: {err}");
        assert!(Link::open("redis://u:pa,ss@h:1", Topology::Server).is_ok(), "a comma in a password");
        let link = Link::open("redis://a:1, redis://b:2", Topology::Cluster).unwrap();
        assert!(link.is_sharded());
        assert_eq!(link.publish_command(), "SPUBLISH");
        assert_eq!(link.group("wsgate:user:{x}"), link.group("wsgate:ip:{x}"));
        assert_eq!(Link::open("redis://a:1", Topology::Server).unwrap().group("anything"), 0);
    }
}
