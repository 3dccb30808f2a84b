//! Several instances over a real `redis-server` (`--redis`): fan-out, one session per user,
//! shared limits, disconnects and revocations across instances, and a Redis outage. Instances
//! run in-process (clients over in-memory streams); Redis is a real process on a free port,
//! killed and restarted for the outage tests. Waits are conditions with deadlines.

mod common;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use common::inproc::*;
use common::redis::TestRedis;
use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use wsgate::broker::Delivery;
use wsgate::broker::redis::Topology;
use wsgate::gateway::{Gateway, GatewayOptions};
use wsgate::policy::source::SourceFile;
use wsgate::policy::{CompileOptions, Policy, PolicySource, compile};

/// Runs a test body against one `redis-server`, and (with `cluster`) against a Redis Cluster of
/// three nodes with sharded pub/sub: `<name>::server`, `<name>::cluster`.
macro_rules! against {
    ($name:ident: $($topology:ident),+) => {
        mod $name {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $topology() {
                    super::$name(super::TestRedis::$topology().await).await;
                }
            )+
        }
    };
}

against!(a_publish_reaches_every_instance_once_with_one_id: server, cluster);
against!(an_instance_listens_only_for_channels_it_has_subscribers_for: server, cluster);
against!(a_newer_connection_on_another_instance_closes_the_older_with_4009: server, cluster);
against!(disconnect_and_revocation_reach_every_instance_and_one_started_later: server, cluster);
against!(per_ip_and_reconnect_limits_count_every_instance: server, cluster);
against!(a_crashed_instances_connections_stop_counting_when_their_leases_lapse: server, cluster);
against!(a_redis_outage_keeps_clients_and_local_delivery_and_heals_by_itself: server, cluster);
against!(churn_during_an_outage_is_kept_as_state_not_as_a_queue: server, cluster);
against!(a_killed_subscription_is_noticed_and_restored: server, cluster);
against!(a_wedged_subscription_is_noticed_by_the_probe_and_rebuilt: server, cluster);
against!(a_confirmed_subscription_is_in_effect_in_redis: server, cluster);
against!(an_instance_started_while_redis_is_down_waits_for_it: server, cluster);
against!(slots_are_the_clusters_own: cluster);
against!(the_probe_checks_every_node_and_follows_a_moved_slot: cluster);

const ADMIN: &str = "cluster-admin-token";

fn policy(edit: impl Fn(String) -> String) -> Arc<Policy> {
    let mut source = PolicySource::read_dir(&common::default_policy_dir()).unwrap();
    let edited = edit(source.documents[0].text.clone());
    source.documents = vec![SourceFile { name: "policy.yaml".into(), text: edited }];
    Arc::new(compile(&source, &CompileOptions { generation: 1, secret_lookup: &secret }).unwrap())
}

fn same(s: String) -> String {
    s
}

/// An instance on `redis`, once it has reached Redis.
async fn instance(redis: &TestRedis, name: &str, edit: impl Fn(String) -> String) -> Arc<Gateway> {
    let options = GatewayOptions { admin_token: Some(ADMIN.into()), ..GatewayOptions::new(name) };
    let gw = Gateway::with_redis(policy(edit), options, &redis.url(), redis.topology()).unwrap();
    eventually(&format!("instance {name} reaches Redis"), Duration::from_secs(10), || async { up(&gw) }).await;
    gw
}

fn up(gw: &Gateway) -> bool {
    gw.broker.redis_link().unwrap().is_up()
}

/// Polls `check` until it holds; fails the test after `within`.
async fn eventually<F: Future<Output = bool>>(what: &str, within: Duration, mut check: impl FnMut() -> F) {
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Subscribers of a client channel in Redis (one per instance listening for it).
async fn listeners(redis: &TestRedis, channel: &str) -> i64 {
    redis.subscribers(&format!("wsgate:ch:{channel}")).await
}

async fn publish(gw: &Gateway, channel: &str, data: Value) -> String {
    let delivery = Delivery::new(channel, gw.broker.next_id(), &data);
    let id = delivery.id.clone();
    gw.broker.publish(delivery).await.unwrap();
    id
}

/// One admin call over the admin handler: status and JSON body.
async fn admin(gw: &Arc<Gateway>, method: &str, path: &str, body: &str) -> (u16, Value) {
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    tokio::spawn(wsgate::admin::handle(server, gw.clone()));
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: admin\r\nauthorization: Bearer {ADMIN}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    client.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut response)).await.unwrap().unwrap();
    let text = String::from_utf8(response).unwrap();
    let status = text[9..12].parse().unwrap();
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

async fn ping_pong(ws: &mut Client, id: &str) {
    send(ws, json!({"type": "ping", "id": id})).await;
    let pong = next_json(ws).await;
    assert_eq!(pong, json!({"type": "pong", "ref": id}), "the connection is alive and nothing else was queued");
}

async fn connect_as(gw: &Arc<Gateway>, user: &str, peer: &str) -> Result<Client, Refused> {
    let mut ws = connect_from(gw, &format!("/ws?token={}", token(user, HOUR, &[])), peer, &[]).await?;
    assert_eq!(next_json(&mut ws).await["type"], "welcome");
    Ok(ws)
}

async fn a_publish_reaches_every_instance_once_with_one_id(redis: TestRedis) {
    let a = instance(&redis, "a", same).await;
    let b = instance(&redis, "b", same).await;
    let mut on_a = connect(&a, &token("alice", HOUR, &[])).await;
    let mut on_b = connect(&b, &token("bob", HOUR, &[])).await;
    eventually("both instances listen for alerts", Duration::from_secs(5), || async {
        listeners(&redis, "alerts").await == 2
    })
    .await;

    let id = publish(&a, "alerts", json!({"n": 1})).await;
    for ws in [&mut on_a, &mut on_b] {
        let m = next_json(ws).await;
        assert_eq!(
            (m["type"].as_str(), m["id"].as_str(), &m["data"]),
            (Some("message"), Some(id.as_str()), &json!({"n": 1}))
        );
    }

    // A backend publishing straight into Redis reaches both, under its own id.
    let mut con = redis.connection().await;
    let reached: i64 = redis::cmd(redis.publish_command())
        .arg("wsgate:ch:alerts")
        .arg(r#"{"id":"backend-1","data":{"from":"backend"}}"#)
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(reached, 2, "one subscription per instance");
    for ws in [&mut on_a, &mut on_b] {
        let m = next_json(ws).await;
        assert_eq!((m["id"].as_str(), &m["data"]), (Some("backend-1"), &json!({"from": "backend"})));
    }
    // Exactly once: the next frame after the messages is the answer to a ping.
    ping_pong(&mut on_a, "a").await;
    ping_pong(&mut on_b, "b").await;

    // A user channel reaches its user only, wherever the publish came from.
    let id = publish(&a, "user:bob", json!("for bob")).await;
    assert_eq!(next_json(&mut on_b).await["id"], id.as_str());
    ping_pong(&mut on_a, "a2").await;
}

async fn an_instance_listens_only_for_channels_it_has_subscribers_for(redis: TestRedis) {
    let a = instance(&redis, "a", same).await;
    let b = instance(&redis, "b", same).await;
    let _alice = connect(&a, &token("alice", HOUR, &[])).await;
    eventually("a listens for alerts and user:alice", Duration::from_secs(5), || async {
        listeners(&redis, "alerts").await == 1 && listeners(&redis, "user:alice").await == 1
    })
    .await;
    assert_eq!(listeners(&redis, "user:bob").await, 0);
    let bob = connect(&b, &token("bob", HOUR, &[])).await;
    eventually("b listens once bob is there", Duration::from_secs(5), || async {
        listeners(&redis, "alerts").await == 2 && listeners(&redis, "user:bob").await == 1
    })
    .await;
    drop(bob);
    eventually("b stops listening when bob leaves", Duration::from_secs(5), || async {
        listeners(&redis, "alerts").await == 1 && listeners(&redis, "user:bob").await == 0
    })
    .await;
    assert!(b.broker.hub().channels().is_empty());
}

async fn a_newer_connection_on_another_instance_closes_the_older_with_4009(redis: TestRedis) {
    let a = instance(&redis, "a", same).await;
    let b = instance(&redis, "b", same).await;
    let mut older = connect(&a, &token("alice", HOUR, &[])).await;
    let mut con = redis.connection().await;
    eventually("alice's connection is registered", Duration::from_secs(5), || {
        let mut con = con.clone();
        async move { redis::cmd("ZCARD").arg("wsgate:user:alice").query_async::<i64>(&mut con).await.unwrap() == 1 }
    })
    .await;
    let mut newer = connect(&b, &token("alice", HOUR, &[])).await;
    let welcomed = Instant::now();
    assert_eq!(close_code(&mut older).await, Some(4009));
    let took = welcomed.elapsed();
    // The issue's bound is 100 ms on loopback; this only guards against it being lost for seconds.
    assert!(took < Duration::from_secs(1), "the older connection closed {took:?} after the newer was welcomed");
    eprintln!("4009 across instances {took:?} after the newer connection's welcome");
    ping_pong(&mut newer, "still-here").await;
    let left: i64 = redis::cmd("ZCARD").arg("wsgate:user:alice").query_async(&mut con).await.unwrap();
    assert_eq!(left, 1);
}

async fn disconnect_and_revocation_reach_every_instance_and_one_started_later(redis: TestRedis) {
    let a = instance(&redis, "a", same).await;
    let b = instance(&redis, "b", same).await;
    let old_token = token("alice", HOUR, &[]);
    let mut on_b = connect(&b, &old_token).await;
    let (status, body) =
        admin(&a, "POST", "/v1/disconnect", r#"{"user":"alice","reason":"logout","revoke_tokens":true}"#).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["everywhere"], true);
    assert_eq!(close_code(&mut on_b).await, Some(4010));
    for gw in [&a, &b] {
        let refused = connect_from(gw, &format!("/ws?token={old_token}"), "127.0.0.1:40001", &[]).await.unwrap_err();
        assert_eq!(refused.status, 401, "{:?}", refused.body);
    }
    let later = instance(&redis, "c", same).await;
    let refused = connect_from(&later, &format!("/ws?token={old_token}"), "127.0.0.1:40001", &[]).await.unwrap_err();
    assert_eq!(refused.status, 401, "an instance started after the revocation honours it: {:?}", refused.body);
    let mut con = redis.connection().await;
    let live: Vec<String> =
        redis::cmd("ZRANGE").arg("wsgate:revocations").arg(0).arg(-1).query_async(&mut con).await.unwrap();
    assert!(
        matches!(&live[..], [one] if one.ends_with("|alice") && one.split('|').next().unwrap().parse::<u64>().is_ok()),
        "one revocation, `<revoked at ms>|alice`: {live:?}"
    );
    let ttl: i64 = redis::cmd("PTTL").arg("wsgate:revocations").query_async(&mut con).await.unwrap();
    assert!(ttl > 0 && ttl <= 86_400_000, "the revocations last the revocation TTL: {ttl} ms");
    // Another user is untouched.
    connect(&later, &token("bob", HOUR, &[])).await;
}

async fn per_ip_and_reconnect_limits_count_every_instance(redis: TestRedis) {
    let edit =
        |d: String| d.replace("max_per_ip: 100", "max_per_ip: 2").replace("{max: 5, per: 1m}", "{max: 2, per: 1m}");
    let a = instance(&redis, "a", edit).await;
    let b = instance(&redis, "b", edit).await;
    let first = connect_as(&a, "u1", "10.0.0.1:1000").await.unwrap();
    let _second = connect_as(&b, "u2", "10.0.0.1:1001").await.unwrap();
    for gw in [&a, &b] {
        let refused = connect_as(gw, "u3", "10.0.0.1:1002").await.unwrap_err();
        assert_eq!(refused.status, 429, "{:?}", refused.body);
        assert_eq!(refused.retry_after.as_deref(), Some("5"));
    }
    connect_as(&a, "u4", "10.0.0.2:1000").await.expect("another address has its own count");
    drop(first);
    eventually("a closed connection frees its slot everywhere", Duration::from_secs(5), || async {
        connect_as(&b, "u5", "10.0.0.1:1003").await.is_ok()
    })
    .await;

    // Reconnects: two handshakes of a user in a minute, on any instance; the third waits.
    connect_as(&a, "roamer", "10.1.0.1:1").await.unwrap();
    connect_as(&b, "roamer", "10.1.0.2:1").await.unwrap();
    let refused = connect_as(&a, "roamer", "10.1.0.3:1").await.unwrap_err();
    assert_eq!(refused.status, 429, "{:?}", refused.body);
    let wait: u64 = refused.retry_after.unwrap().parse().unwrap();
    assert!((55..=60).contains(&wait), "retry after the oldest leaves the window: {wait}");
    let mut con = redis.connection().await;
    let leased: i64 = redis::cmd("ZCARD").arg("wsgate:ip:10.1.0.3").query_async(&mut con).await.unwrap();
    assert_eq!(leased, 0, "a handshake refused for reconnects holds no lease on its address");
}

async fn an_instance_started_while_redis_is_down_waits_for_it(mut redis: TestRedis) {
    redis.stop().await;
    let options = GatewayOptions { admin_token: Some(ADMIN.into()), ..GatewayOptions::new("early") };
    let a = Gateway::with_redis(policy(same), options, &redis.url(), redis.topology()).unwrap();
    let mut alice = connect(&a, &token("alice", HOUR, &[])).await;
    let (status, _) = admin(&a, "GET", "/readyz", "").await;
    assert_eq!(status, 503, "not ready without Redis");
    // Unless told to stay ready: it serves its own clients meanwhile.
    let options = GatewayOptions { ready_without_redis: true, ..GatewayOptions::new("ready") };
    let ready = Gateway::with_redis(policy(same), options, &redis.url(), redis.topology()).unwrap();
    let (status, body) = admin(&ready, "GET", "/readyz", "").await;
    assert_eq!((status, body), (200, json!({"status": "ready", "redis": "unavailable"})));
    let local = publish(&a, "alerts", json!("local")).await;
    assert_eq!(next_json(&mut alice).await["id"], local.as_str(), "serving locally meanwhile");

    redis.restart().await;
    eventually("the instance reaches Redis once it is there", Duration::from_secs(15), || async { up(&a) }).await;
    let b = instance(&redis, "b", same).await;
    eventually("a listens for alerts", Duration::from_secs(5), || async { listeners(&redis, "alerts").await == 1 })
        .await;
    let id = publish(&b, "alerts", json!("from b")).await;
    assert_eq!(next_json(&mut alice).await["id"], id.as_str());
}

/// The hash slots wsgate computes (to keep each pipeline and subscribe in one slot) are the
/// cluster's own.
async fn slots_are_the_clusters_own(redis: TestRedis) {
    let mut con = redis.connection().await;
    let mut keys: Vec<String> =
        ["wsgate:ch:alerts", "wsgate:user:{alice}", "{}x", "a{b}c{d}", "{{x}}", "é{ü}", ""].map(String::from).to_vec();
    keys.extend((0..200).map(|n| format!("wsgate:ip:10.0.{}.{n}", n % 7)));
    for key in keys {
        let theirs: u16 = redis::cmd("CLUSTER").arg("KEYSLOT").arg(&key).query_async(&mut con).await.unwrap();
        assert_eq!(wsgate::broker::redis::keys::slot(key.as_bytes()), theirs, "{key:?}");
    }
}

async fn a_crashed_instances_connections_stop_counting_when_their_leases_lapse(redis: TestRedis) {
    let a = instance(&redis, "a", |d| d.replace("max_per_ip: 100", "max_per_ip: 2")).await;
    // Two connections of an instance that died without a word: leases that lapse soon.
    let mut con = redis.connection().await;
    let lapse = wsgate::broker::redis::now_ms() + 400;
    let _: () = redis::cmd("ZADD")
        .arg("wsgate:ip:10.0.0.9")
        .arg(lapse)
        .arg("000000000000001|dead|1")
        .arg(lapse)
        .arg("000000000000001|dead|2")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(connect_as(&a, "u1", "10.0.0.9:1").await.unwrap_err().status, 429);
    let deadline = Instant::now() + Duration::from_secs(5);
    let _live = loop {
        match connect_as(&a, "u1", "10.0.0.9:2").await {
            Ok(ws) => break ws,
            Err(r) => assert!(r.status == 429 && Instant::now() < deadline, "the dead instance's leases lapse: {r:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let live: i64 = redis::cmd("ZCARD").arg("wsgate:ip:10.0.0.9").query_async(&mut con).await.unwrap();
    assert_eq!(live, 1, "only the live connection is left");
}

async fn a_redis_outage_keeps_clients_and_local_delivery_and_heals_by_itself(mut redis: TestRedis) {
    let a = instance(&redis, "a", same).await;
    let b = instance(&redis, "b", same).await;
    let mut alice = connect(&a, &token("alice", HOUR, &[])).await;
    let mut bob = connect(&b, &token("bob", HOUR, &[])).await;
    eventually("both listen", Duration::from_secs(5), || async { listeners(&redis, "alerts").await == 2 }).await;

    redis.stop().await;
    eventually("both notice", Duration::from_secs(5), || async { !up(&a) && !up(&b) }).await;
    for gw in [&a, &b] {
        assert_eq!(gw.metrics.redis_up.load(std::sync::atomic::Ordering::Relaxed), 0);
        let (status, body) = admin(gw, "GET", "/readyz", "").await;
        assert_eq!((status, body), (503, json!({"status": "redis_unavailable"})));
    }
    ping_pong(&mut alice, "alive").await;
    ping_pong(&mut bob, "alive").await;
    let local = publish(&a, "alerts", json!("during the outage")).await;
    assert_eq!(next_json(&mut alice).await["id"], local.as_str(), "local delivery goes on");
    // New connections are admitted on local counts.
    let _carol = connect(&b, &token("carol", HOUR, &[])).await;
    let (status, body) = admin(&a, "POST", "/v1/disconnect", r#"{"user":"nobody"}"#).await;
    assert_eq!((status, &body["everywhere"]), (200, &json!(false)), "the caller learns it stayed local");

    redis.restart().await;
    eventually("both reconnect and resubscribe", Duration::from_secs(10), || async { up(&a) && up(&b) }).await;
    let (status, _) = admin(&a, "GET", "/readyz", "").await;
    assert_eq!(status, 200);
    let id = publish(&a, "alerts", json!("after")).await;
    let m = tokio::time::timeout(Duration::from_secs(2), next_json(&mut bob)).await.expect("cross-instance again");
    assert_eq!(m["id"], id.as_str(), "bob got nothing from the outage, then this");
    assert_eq!(next_json(&mut alice).await["id"], id.as_str());
    // The counts were restored: carol (admitted during the outage) and the others hold leases.
    let mut con = redis.connection().await;
    let leased: i64 = redis::cmd("ZCARD").arg("wsgate:ip:127.0.0.1").query_async(&mut con).await.unwrap();
    assert_eq!(leased, 3);
}

/// Subscribes and unsubscribes while Redis is away are not queued one by one: the instance
/// keeps what it wants subscribed, so 50,000 of them leave a backlog the size of the live
/// channels, and Redis' return costs one resync instead of 50,000 orders.
async fn churn_during_an_outage_is_kept_as_state_not_as_a_queue(mut redis: TestRedis) {
    const CONNECTS: usize = 100;
    const CHURN: usize = 50_000;
    let edit = |d: String| d.replace("{max: 20, per: 1s, action: reject}", "{max: 1000000, per: 1s, action: reject}");
    let a = instance(&redis, "a", edit).await;
    let b = instance(&redis, "b", same).await;
    let mut alice = connect(&a, &token("alice", HOUR, &[])).await;
    let mut churner = connect(&a, &token("churner", HOUR, &[])).await;
    let mut bob = connect(&b, &token("bob", HOUR, &[])).await;
    eventually("both listen", Duration::from_secs(5), || async { listeners(&redis, "alerts").await == 2 }).await;

    redis.stop().await;
    eventually("both notice", Duration::from_secs(5), || async { !up(&a) && !up(&b) }).await;
    // Users come and go (`user:<id>`: one subscribe and one unsubscribe each)…
    for n in 0..CONNECTS {
        let peer = format!("10.9.{}.{}:1000", n / 200, n % 200 + 1);
        let ws = connect_as(&a, &format!("churn-{n}"), &peer).await.unwrap();
        drop(ws);
    }
    // …and a client subscribes and unsubscribes, one channel after another.
    for n in 0..(CHURN - 2 * CONNECTS) / 2 {
        let channel = format!("alerts-churn-{n}");
        for kind in ["subscribe", "unsubscribe"] {
            let frame = json!({"type": kind, "channel": channel}).to_string();
            churner.feed(Message::text(frame)).await.unwrap();
        }
    }
    send(&mut churner, json!({"type": "subscribe", "channel": "alerts-kept", "id": "kept"})).await;
    assert_eq!(next_json(&mut churner).await, json!({"type": "ok", "ref": "kept"}), "every churn message was taken");
    let mut carol = connect(&a, &token("carol", HOUR, &[])).await;
    // alerts, user:alice, user:churner, alerts-kept, user:carol.
    eventually("the churned connections are gone", Duration::from_secs(10), || async {
        a.broker.hub().channel_count() == 5
    })
    .await;
    let pending = a.broker.redis_link().unwrap().pending_subscriptions();
    eprintln!("{CHURN} subscription changes during the outage leave {pending} pending");
    assert!(
        pending <= a.broker.hub().channel_count(),
        "bounded by the live channels, not the operations: {pending} pending"
    );

    redis.restart().await;
    let back = Instant::now();
    eventually("both ready within 10 s of Redis' return", Duration::from_secs(10), || async {
        up(&a)
            && up(&b)
            && admin(&a, "GET", "/readyz", "").await.0 == 200
            && admin(&b, "GET", "/readyz", "").await.0 == 200
    })
    .await;
    eprintln!("ready {:?} after Redis returned", back.elapsed());
    assert_eq!(a.broker.redis_link().unwrap().pending_subscriptions(), 0, "the resync carried every change");
    // Channels subscribed before, during and after the outage all reach across again.
    for (from, channel, ws) in [
        (&b, "alerts-kept", &mut churner),
        (&b, "user:carol", &mut carol),
        (&b, "user:alice", &mut alice),
        (&a, "user:bob", &mut bob),
    ] {
        let id = publish(from, channel, json!(channel)).await;
        let m = tokio::time::timeout(Duration::from_secs(2), next_json(ws)).await.expect("cross-instance again");
        assert_eq!(m["id"], id.as_str(), "{channel}");
    }
    for gone in ["alerts-churn-0", "user:churn-0", "user:churn-99"] {
        assert_eq!(listeners(&redis, gone).await, 0, "{gone}: no subscription left in Redis");
    }
}

async fn a_killed_subscription_is_noticed_and_restored(redis: TestRedis) {
    let a = instance(&redis, "a", same).await;
    let b = instance(&redis, "b", same).await;
    let _alice = connect(&a, &token("alice", HOUR, &[])).await;
    let mut bob = connect(&b, &token("bob", HOUR, &[])).await;
    eventually("both listen", Duration::from_secs(5), || async { listeners(&redis, "alerts").await == 2 }).await;
    let killed = redis.kill_subscriptions().await;
    // One per instance, and on a cluster one per instance and node (each probes every node).
    assert_eq!(killed, 2 * redis.nodes().len() as i64);
    eventually("the subscriptions are back", Duration::from_secs(10), || async {
        listeners(&redis, "alerts").await == 2 && up(&a) && up(&b)
    })
    .await;
    let id = publish(&a, "alerts", json!("after the kill")).await;
    let m = tokio::time::timeout(Duration::from_secs(2), next_json(&mut bob)).await.expect("delivered again");
    assert_eq!(m["id"], id.as_str());
}

/// Centrifugo #1189: after a failover a subscription connection stayed open but delivered
/// nothing, and health stayed green. Here the subscription is wedged the same way (open, but
/// Redis' pushes never arrive) while commands keep working: the probe notices, the instance
/// reports itself away, and rebuilds the subscription.
async fn a_wedged_subscription_is_noticed_by_the_probe_and_rebuilt(redis: TestRedis) {
    let (proxy, a, b) = match &redis {
        TestRedis::Server(server) => {
            // Only b goes through the proxy.
            let proxy = common::proxy::Proxy::start(server.port).await;
            let a = instance(&redis, "a", same).await;
            let options = GatewayOptions { admin_token: Some(ADMIN.into()), ..GatewayOptions::new("b") };
            let b = Gateway::with_redis(policy(same), options, &proxy.url(), Topology::Server).unwrap();
            eventually("b reaches Redis through the proxy", Duration::from_secs(10), || async { up(&b) }).await;
            (proxy, a, b)
        }
        TestRedis::Cluster(cluster) => {
            // The node owning `alerts` announces the proxy's port, so every client reaches it
            // through the proxy: wedging it wedges one node's subscriptions, not the others'.
            let owner = node_owning(&redis, "wsgate:ch:alerts").await;
            let node = &cluster.nodes[owner];
            let proxy = common::proxy::Proxy::start(node.port).await;
            let mut con = node.connection().await.unwrap();
            for (key, value) in
                [("cluster-announce-bus-port", node.port + 10_000), ("cluster-announce-port", proxy.port)]
            {
                let _: () = redis::cmd("CONFIG").arg("SET").arg(key).arg(value).query_async(&mut con).await.unwrap();
            }
            eventually("every node knows the owner by the proxy's port", Duration::from_secs(15), || async {
                let mut all = true;
                for n in &cluster.nodes {
                    let mut con = n.connection().await.unwrap();
                    let nodes: String = redis::cmd("CLUSTER").arg("NODES").query_async(&mut con).await.unwrap();
                    all &= nodes.contains(&format!("127.0.0.1:{}@", proxy.port));
                }
                all
            })
            .await;
            let a = instance(&redis, "a", same).await;
            let b = instance(&redis, "b", same).await;
            (proxy, a, b)
        }
    };
    let _alice = connect(&a, &token("alice", HOUR, &[])).await;
    let mut bob = connect(&b, &token("bob", HOUR, &[])).await;
    eventually("both listen", Duration::from_secs(5), || async { listeners(&redis, "alerts").await == 2 }).await;

    proxy.wedge_subscriptions();
    eventually("b notices its subscription delivers nothing", Duration::from_secs(5), || async { !up(&b) }).await;
    let (status, _) = admin(&b, "GET", "/readyz", "").await;
    assert_eq!(status, 503, "not ready while wedged");
    eventually("the subscriptions are rebuilt", Duration::from_secs(15), || async { up(&a) && up(&b) }).await;
    let id = publish(&a, "alerts", json!("after the wedge")).await;
    let m = tokio::time::timeout(Duration::from_secs(2), next_json(&mut bob)).await.expect("delivered again");
    assert_eq!(m["id"], id.as_str());
}

/// The index of the node owning `key`'s slot (the others answer `MOVED`).
async fn node_owning(redis: &TestRedis, key: &str) -> usize {
    for (i, node) in redis.nodes().iter().enumerate() {
        let mut con = node.connection().await.unwrap();
        if redis::cmd("SPUBLISH").arg(key).arg("{}").query_async::<i64>(&mut con).await.is_ok() {
            return i;
        }
    }
    panic!("no node owns {key}")
}

/// A client's welcome (and its `ok` to a `subscribe`) is sent only once Redis has its
/// subscription in effect: whatever is published after it arrives.
async fn a_confirmed_subscription_is_in_effect_in_redis(redis: TestRedis) {
    let a = instance(&redis, "a", same).await;
    let mut con = redis.connection().await;
    for n in 0..40 {
        let user = format!("fresh{n}");
        let mut ws = connect(&a, &token(&user, HOUR, &[])).await;
        let reached: i64 = redis::cmd(redis.publish_command())
            .arg(format!("wsgate:ch:user:{user}"))
            .arg(r#"{"id":"x","data":1}"#)
            .query_async(&mut con)
            .await
            .unwrap();
        assert_eq!(reached, 1, "{user}: subscribed in Redis before the welcome");
        assert_eq!(next_json(&mut ws).await["id"], "x");
        send(&mut ws, json!({"type": "subscribe", "channel": format!("alerts-{n}"), "id": "s"})).await;
        assert_eq!(next_json(&mut ws).await, json!({"type": "ok", "ref": "s"}));
        let reached: i64 = redis::cmd(redis.publish_command())
            .arg(format!("wsgate:ch:alerts-{n}"))
            .arg("{}")
            .query_async(&mut con)
            .await
            .unwrap();
        assert_eq!(reached, 1, "alerts-{n}: subscribed in Redis before the ok");
    }
}

/// This instance's probe channels on each node.
async fn probe_channels_per_node(redis: &TestRedis, gw: &Gateway) -> Vec<Vec<String>> {
    let pattern = format!("wsgate:probe:{}:*", gw.broker.redis_link().unwrap().origin());
    let mut per_node = Vec::new();
    for node in redis.nodes() {
        let mut con = node.connection().await.unwrap();
        let channels: Vec<String> =
            redis::cmd("PUBSUB").arg("SHARDCHANNELS").arg(&pattern).query_async(&mut con).await.unwrap();
        per_node.push(channels);
    }
    per_node
}

/// On a cluster the subscription is one connection per node, so the probe has one channel per
/// primary. When a probe channel's slot moves to another node (as in a resharding or a
/// failover), the probe fails there, the slot map is read again and the probe follows.
async fn the_probe_checks_every_node_and_follows_a_moved_slot(redis: TestRedis) {
    let a = instance(&redis, "a", same).await;
    let b = instance(&redis, "b", same).await;
    eventually("one probe channel on every node", Duration::from_secs(15), || async {
        probe_channels_per_node(&redis, &a).await.iter().all(|c| c.len() == 1)
    })
    .await;

    // Move the slot of the first node's probe channel to the second node.
    let channel = probe_channels_per_node(&redis, &a).await[0][0].clone();
    move_slot(&redis, wsgate::broker::redis::keys::slot(channel.as_bytes()), 0, 1).await;

    eventually(
        "the probe follows: again one channel per node, none on a moved slot",
        Duration::from_secs(20),
        || async {
            let per_node = probe_channels_per_node(&redis, &a).await;
            per_node.iter().all(|c| c.len() == 1) && !per_node[0].contains(&channel) && up(&a)
        },
    )
    .await;
    let mut on_b = connect(&b, &token("bob", HOUR, &[])).await;
    eventually("b listens", Duration::from_secs(5), || async { listeners(&redis, "alerts").await == 1 }).await;
    let id = publish(&a, "alerts", json!("after the move")).await;
    assert_eq!(next_json(&mut on_b).await["id"], id.as_str());

    // A client channel's slot moves: the subscription moves with it.
    let holder = node_with_subscribers(&redis, "wsgate:ch:alerts").await;
    move_slot(&redis, wsgate::broker::redis::keys::slot(b"wsgate:ch:alerts"), holder, (holder + 1) % 3).await;
    eventually("b's subscription to alerts is on the slot's new node", Duration::from_secs(20), || async {
        node_with_subscribers(&redis, "wsgate:ch:alerts").await == (holder + 1) % 3
    })
    .await;
    let id = publish(&a, "alerts", json!("after the channel moved")).await;
    let m = tokio::time::timeout(Duration::from_secs(5), next_json(&mut on_b)).await.expect("delivered after the move");
    assert_eq!(m["id"], id.as_str());
}

/// The node holding the (sharded) subscriptions to `channel`.
async fn node_with_subscribers(redis: &TestRedis, channel: &str) -> usize {
    for (i, node) in redis.nodes().iter().enumerate() {
        let mut con = node.connection().await.unwrap();
        let (_, n): (String, i64) =
            redis::cmd("PUBSUB").arg("SHARDNUMSUB").arg(channel).query_async(&mut con).await.unwrap();
        if n > 0 {
            return i;
        }
    }
    usize::MAX
}

/// Moves an empty `slot` from node `from` to node `to`, as a resharding does.
async fn move_slot(redis: &TestRedis, slot: u16, from: usize, to: usize) {
    let nodes = redis.nodes();
    let mut ids = Vec::new();
    for node in nodes {
        let mut con = node.connection().await.unwrap();
        ids.push(redis::cmd("CLUSTER").arg("MYID").query_async::<String>(&mut con).await.unwrap());
    }
    let mut source = nodes[from].connection().await.unwrap();
    let mut target = nodes[to].connection().await.unwrap();
    let keys: i64 = redis::cmd("CLUSTER").arg("COUNTKEYSINSLOT").arg(slot).query_async(&mut source).await.unwrap();
    assert_eq!(keys, 0, "slot {slot} holds no keys to migrate");
    let setslot = |state: &str, id: &str| redis::cmd("CLUSTER").arg("SETSLOT").arg(slot).arg(state).arg(id).clone();
    let _: () = setslot("IMPORTING", &ids[from]).query_async(&mut target).await.unwrap();
    let _: () = setslot("MIGRATING", &ids[to]).query_async(&mut source).await.unwrap();
    for node in nodes {
        let mut con = node.connection().await.unwrap();
        let _: () = setslot("NODE", &ids[to]).query_async(&mut con).await.unwrap();
    }
}
