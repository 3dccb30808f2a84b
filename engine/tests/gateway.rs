//! The gateway in-process: real handshakes and sessions over in-memory streams, so tokio's
//! paused clock drives heartbeats, token expiry, re-authentication, idle and rate windows —
//! minutes of protocol time in milliseconds. End-to-end behaviour against real processes is
//! covered by the harness scenarios (`harness/scenarios`).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::inproc::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use wsgate::broker::Delivery;
use wsgate::gateway::{Failpoint, Gateway, GatewayOptions};
use wsgate::lifecycle::Phase;
use wsgate::policy::source::SourceFile;
use wsgate::policy::{CompileOptions, Policy, PolicySource, compile};

fn policy(edit: impl Fn(String) -> String) -> Arc<Policy> {
    let mut source = PolicySource::read_dir(&common::default_policy_dir()).unwrap();
    let doc = source.documents[0].text.clone();
    let edited = edit(doc.clone());
    source.documents = vec![SourceFile { name: "policy.yaml".into(), text: edited }];
    Arc::new(compile(&source, &CompileOptions { generation: 1, secret_lookup: &secret }).unwrap())
}

fn gateway(edit: impl Fn(String) -> String) -> Arc<Gateway> {
    gateway_with(edit, None)
}

fn gateway_with(edit: impl Fn(String) -> String, failpoint: Option<Failpoint>) -> Arc<Gateway> {
    Gateway::new(policy(edit), GatewayOptions { failpoint, ..GatewayOptions::new("test") })
}

fn same(s: String) -> String {
    s
}

#[tokio::test(start_paused = true)]
async fn heartbeat_drops_a_silent_peer_and_keeps_a_responsive_one() {
    let gw = gateway(same);
    let mut silent = connect(&gw, &token("silent", HOUR, &[])).await;
    let mut alive = connect(&gw, &token("alive", HOUR, &[])).await;
    let start = Instant::now();
    // The responsive client reads all along (its library answers pings); the silent one does not.
    let reader = tokio::spawn(async move {
        let mut pings = 0;
        while Instant::now() < start + Duration::from_secs(125) {
            match tokio::time::timeout(Duration::from_secs(1), alive.next()).await {
                Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
                Ok(Some(Ok(other))) => panic!("unexpected {other:?}"),
                Ok(other) => panic!("the responsive client was dropped: {other:?}"),
                Err(_) => {}
            }
        }
        send(&mut alive, json!({"type": "ping", "id": "p"})).await;
        assert_eq!(next_json(&mut alive).await, json!({"type": "pong", "ref": "p"}));
        pings
    });
    tokio::time::sleep(Duration::from_secs(60)).await;
    // Ping at 30 s, no pong by 40 s: dropped without a close frame.
    assert_eq!(close_code(&mut silent).await, None);
    let pings = reader.await.unwrap();
    assert_eq!(pings, 4, "one ping per 30 s interval over 125 s");
    assert!(start.elapsed() < Duration::from_secs(130));
}

#[tokio::test(start_paused = true)]
async fn token_expiry_closes_4001_at_exp_plus_leeway() {
    let gw = gateway(same);
    let mut ws = connect(&gw, &token("alice", Duration::from_secs(60), &[])).await;
    let start = Instant::now();
    assert_eq!(close_code(&mut ws).await, Some(4001));
    let at = start.elapsed();
    // `exp` is whole seconds: 59–60 s from now, plus the default policy's 5 s leeway.
    assert!(at >= Duration::from_secs(63) && at <= Duration::from_secs(66), "closed after {at:?}");
}

#[tokio::test(start_paused = true)]
async fn an_auth_message_extends_the_session_only_for_the_same_user() {
    let gw = gateway(same);
    let mut ws = connect(&gw, &token("alice", Duration::from_secs(60), &[])).await;
    let start = Instant::now();
    // Another user's valid token is refused and the original expiry stands.
    send(&mut ws, json!({"type": "auth", "id": "a1", "token": token("mallory", HOUR, &[])})).await;
    let refused = next_json(&mut ws).await;
    assert_eq!((refused["type"].as_str(), refused["code"].as_str()), (Some("error"), Some("forbidden")), "{refused}");
    assert_eq!(refused["ref"], "a1");
    assert_eq!(close_code(&mut ws).await, Some(4001));
    assert!(start.elapsed() < Duration::from_secs(70));

    let mut ws = connect(&gw, &token("bob", Duration::from_secs(60), &[])).await;
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(30)).await;
    send(&mut ws, json!({"type": "auth", "id": "a2", "token": token("bob", Duration::from_secs(300), &[])})).await;
    assert_eq!(next_json(&mut ws).await, json!({"type": "ok", "ref": "a2"}));
    // The new token's 300 s (+5 s leeway) count from when it was presented, 30 s in: closed at
    // about 335 s, not 65 s.
    assert_eq!(close_code(&mut ws).await, Some(4001));
    let at = start.elapsed();
    assert!(at >= Duration::from_secs(333) && at <= Duration::from_secs(336), "closed after {at:?}");
}

#[tokio::test(start_paused = true)]
async fn reauthentication_rechecks_under_the_current_policy() {
    let gw = gateway(same);
    let mut ws = connect(&gw, &token("alice", Duration::from_secs(86_400), &[])).await;
    let start = Instant::now();
    // Keep the connection from idling out while the re-check is pending.
    let keep_busy = {
        let deny_alice = policy(|doc| {
            doc.replace(
                "deny: 'has(claims.roles) && \"banned\" in claims.roles'",
                "deny: 'has(claims.roles) && \"banned\" in claims.roles || claims.sub == \"alice\"'",
            )
        });
        gw.policy.set(deny_alice);
        async move {
            // Read all along (answering heartbeat pings) and send a message every minute.
            let mut next_ping = Instant::now();
            loop {
                if Instant::now() >= next_ping {
                    // Once the server has closed, the write fails and the read finds the close.
                    let _ = ws.send(Message::Text(json!({"type": "ping"}).to_string().into())).await;
                    next_ping += Duration::from_secs(60);
                }
                match tokio::time::timeout(Duration::from_secs(1), ws.next()).await {
                    Ok(Some(Ok(Message::Close(f)))) => return f.map(|f| u16::from(f.code)),
                    Ok(Some(Ok(_))) | Err(_) => {}
                    Ok(_) => return None,
                }
            }
        }
    };
    assert_eq!(keep_busy.await, Some(4003), "a connect rule now denies: access revoked");
    let at = start.elapsed();
    assert!(at >= Duration::from_secs(900) && at < Duration::from_secs(960), "re-checked after {at:?}");
}

#[tokio::test]
async fn a_connection_a_reload_denies_is_counted_as_the_rules_decision() {
    let gw = gateway(same);
    let mut ws = connect(&gw, &token("alice", HOUR, &[])).await;
    let deny_alice = |doc: String| {
        doc.replace(
            "deny: 'has(claims.roles) && \"banned\" in claims.roles'",
            "deny: 'has(claims.roles) && \"banned\" in claims.roles || claims.sub == \"alice\"'",
        )
    };
    gw.policy.set(reloaded(deny_alice, 2));
    assert_eq!(close_code(&mut ws).await, Some(4003));
    let text = gw.metrics.render();
    assert!(
        text.contains(r#"wsgate_policy_decisions_total{rule="not-banned",mode="enforce",outcome="deny"} 1"#),
        "{text}"
    );
}

/// `policy(edit)` as a reload would produce it: a later generation.
fn reloaded(edit: impl Fn(String) -> String, generation: u64) -> Arc<Policy> {
    let mut p = Arc::into_inner(policy(edit)).unwrap();
    p.generation = generation;
    Arc::new(p)
}

#[tokio::test]
async fn a_reload_ends_the_subscriptions_it_no_longer_allows() {
    let gw = gateway(same);
    let mut ws = connect(&gw, &token("alice", HOUR, &[])).await;
    for (id, channel) in [("1", "alerts.eu"), ("2", "alerts.us")] {
        send(&mut ws, json!({"type": "subscribe", "channel": channel, "id": id})).await;
        assert_eq!(next_json(&mut ws).await, json!({"type": "ok", "ref": id}));
    }
    let only_us = |d: String| d.replace(r#"startsWith("alerts")'"#, r#"startsWith("alerts.us")'"#);
    gw.policy.set(reloaded(only_us, 2));
    let ended = tokio::time::timeout(Duration::from_secs(5), next_json(&mut ws)).await.expect("told within 5 s");
    assert_eq!(ended["type"], "unsubscribed", "{ended}");
    assert_eq!(ended["channel"], "alerts.eu");
    assert!(ended["reason"].as_str().unwrap().contains("only alerts channels"), "{ended}");
    // Its messages stop at once; the allowed subscription and the built-in channels go on.
    for channel in ["alerts.eu", "alerts.us", "alerts", "user:alice"] {
        let delivery = Delivery::new(channel, gw.broker.next_id(), &json!(channel));
        gw.broker.publish(delivery).await.unwrap();
    }
    for channel in ["alerts.us", "alerts", "user:alice"] {
        let message = next_json(&mut ws).await;
        assert_eq!((message["type"].as_str(), message["channel"].as_str()), (Some("message"), Some(channel)));
    }
    // Subscribing again is refused under the new policy; the connection stays.
    send(&mut ws, json!({"type": "subscribe", "channel": "alerts.eu", "id": "3"})).await;
    assert_eq!(next_json(&mut ws).await["code"], "forbidden");
}

#[tokio::test]
async fn a_reload_keeps_subscriptions_that_rules_on_other_fields_cannot_decide() {
    // A rule for every message that reads `id`: a live subscription has none to show it.
    let id_rule = |d: String| {
        d.replace(
            "  types:\n",
            "  rules:\n    - name: short-ids\n      allow: '!has(message.id) || message.id.size() < 64'\n  types:\n",
        )
    };
    let strict_id_rule = |d: String| {
        d.replace("  types:\n", "  rules:\n    - name: short-ids\n      allow: 'message.id.size() < 64'\n  types:\n")
    };
    let gw = gateway(id_rule);
    let mut ws = connect(&gw, &token("alice", HOUR, &[])).await;
    send(&mut ws, json!({"type": "subscribe", "channel": "alerts.eu", "id": "1"})).await;
    assert_eq!(next_json(&mut ws).await, json!({"type": "ok", "ref": "1"}));
    gw.policy.set(reloaded(strict_id_rule, 2));
    // Still subscribed: the next delivery on the channel arrives, with no `unsubscribed` first.
    send(&mut ws, json!({"type": "ping", "id": "p"})).await;
    assert_eq!(next_json(&mut ws).await, json!({"type": "pong", "ref": "p"}));
    gw.broker.publish(Delivery::new("alerts.eu", gw.broker.next_id(), &json!("still"))).await.unwrap();
    let message = next_json(&mut ws).await;
    assert_eq!((message["type"].as_str(), message["data"].as_str()), (Some("message"), Some("still")), "{message}");
}

#[tokio::test(start_paused = true)]
async fn a_reload_moves_live_connections_to_the_new_heartbeat() {
    let gw = gateway(same);
    let mut ws = connect(&gw, &token("alice", HOUR, &[])).await;
    let start = Instant::now();
    gw.policy.set(reloaded(|d| d.replace("{interval: 30s, timeout: 10s}", "{interval: 5s, timeout: 2s}"), 2));
    loop {
        match ws.next().await {
            Some(Ok(Message::Ping(_))) => break,
            Some(Ok(_)) => continue,
            other => panic!("connection ended: {other:?}"),
        }
    }
    let at = start.elapsed();
    assert!(at >= Duration::from_secs(5) && at < Duration::from_secs(6), "first ping after {at:?}, not 30 s");
}

#[tokio::test(start_paused = true)]
async fn connections_a_reload_denies_are_closed_4003_spread_over_time() {
    let gw = gateway(|d| d.replace("max_per_ip: 100", "max_per_ip: 1000"));
    let mut contractors = Vec::with_capacity(150);
    for i in 0..150 {
        contractors.push(connect(&gw, &token(&format!("c{i}"), HOUR, &[("roles", r#"["contractor"]"#)])).await);
    }
    let mut staff = connect(&gw, &token("staff", HOUR, &[("roles", r#"["staff"]"#)])).await;
    let start = Instant::now();
    let deny = r#"    - name: no-contractors
      deny: 'has(claims.roles) && "contractor" in claims.roles'
      reason: contractors are off
origins:"#;
    gw.policy.set(reloaded(|d| d.replace("origins:", deny), 2));
    // Each client reads on its own, so each close is timed when it arrives.
    let readers: Vec<_> = contractors
        .into_iter()
        .map(|mut ws| tokio::spawn(async move { (close_code(&mut ws).await, start.elapsed()) }))
        .collect();
    let mut closed_at = Vec::new();
    for reader in readers {
        let (code, at) = reader.await.unwrap();
        assert_eq!(code, Some(4003));
        closed_at.push(at);
    }
    closed_at.sort();
    // The first hundred at once, then one a millisecond (wsgate::limits::RELOAD_CLOSES_PER_SECOND).
    assert!(closed_at[99] < Duration::from_millis(1), "the burst: {:?}", closed_at[99]);
    assert!(closed_at[149] >= Duration::from_millis(50), "the rest are spread: {:?}", closed_at[149]);
    send(&mut staff, json!({"type": "ping", "id": "s"})).await;
    assert_eq!(next_json(&mut staff).await, json!({"type": "pong", "ref": "s"}), "others are untouched");
}

#[tokio::test(start_paused = true)]
async fn a_denied_connection_is_closed_at_its_next_message_and_a_later_reload_can_spare_it() {
    let gw = gateway(|d| d.replace("max_per_ip: 100", "max_per_ip: 1000"));
    let deny_alice = |d: String| {
        d.replace("origins:", "    - {name: no-alice, deny: 'claims.sub == \"alice\"', reason: no alice}\norigins:")
    };
    // Fill the burst so alice's close is scheduled later, then undo the rule before it comes.
    let mut others = Vec::new();
    for i in 0..120 {
        others.push(connect(&gw, &token(&format!("u{i}"), HOUR, &[("roles", r#"["x"]"#)])).await);
    }
    let mut alice = connect(&gw, &token("alice", HOUR, &[])).await;
    let deny_x = |d: String| {
        d.replace(
            "origins:",
            "    - {name: no-x, deny: 'has(claims.roles) && \"x\" in claims.roles', reason: no x}\norigins:",
        )
    };
    // Each generation is seen by every session before the next (time does not move).
    let settle = || tokio::time::sleep(Duration::from_micros(10));
    gw.policy.set(reloaded(deny_x, 2));
    settle().await;
    gw.policy.set(reloaded(|d| deny_x(deny_alice(d)), 3));
    settle().await;
    gw.policy.set(reloaded(deny_x, 4));
    settle().await;
    send(&mut alice, json!({"type": "ping", "id": "spared"})).await;
    assert_eq!(
        next_json(&mut alice).await,
        json!({"type": "pong", "ref": "spared"}),
        "generation 4 admits alice again"
    );
    gw.policy.set(reloaded(|d| deny_x(deny_alice(d)), 5));
    settle().await;
    // Denied again: its paced close is behind the 120 others' (20 ms away), but a message
    // from it is not served — the connection closes at once.
    let sent = Instant::now();
    send(&mut alice, json!({"type": "ping", "id": "denied"})).await;
    assert_eq!(close_code(&mut alice).await, Some(4003));
    assert!(sent.elapsed() < Duration::from_millis(1), "closed after {:?}", sent.elapsed());
    drop(others);
}

#[tokio::test(start_paused = true)]
async fn an_idle_connection_is_closed_1000() {
    let gw = gateway(|d| d.replace("idle_timeout: 10m", "idle_timeout: 90s"));
    let mut ws = connect(&gw, &token("alice", HOUR, &[])).await;
    let start = Instant::now();
    // Answering pings (as the client library does while reading) is not activity.
    assert_eq!(close_code(&mut ws).await, Some(1000));
    let at = start.elapsed();
    assert!(at >= Duration::from_secs(90) && at < Duration::from_secs(91), "closed after {at:?}");
}

#[tokio::test(start_paused = true)]
async fn the_message_rate_window_slides_on_the_clock() {
    let gw = gateway(same);
    let mut ws = connect(&gw, &token("alice", HOUR, &[])).await;
    for round in 0..3 {
        for i in 0..25 {
            send(&mut ws, json!({"type": "ping", "id": format!("{round}-{i}")})).await;
        }
        let mut codes = Vec::new();
        for _ in 0..25 {
            let f = next_json(&mut ws).await;
            codes.push(f["code"].as_str().unwrap_or(f["type"].as_str().unwrap()).to_string());
        }
        assert_eq!(codes.iter().filter(|c| *c == "pong").count(), 20, "round {round}: {codes:?}");
        assert_eq!(codes.iter().filter(|c| *c == "rate_limited").count(), 5, "round {round}: {codes:?}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[tokio::test]
async fn connection_limits_answer_4009_and_429_with_retry_after() {
    let gw =
        gateway(|d| d.replace("max_per_ip: 100", "max_per_ip: 2").replace("{max: 5, per: 1m}", "{max: 3, per: 1m}"));
    let mut first = connect(&gw, &token("alice", HOUR, &[])).await;
    let _second = connect(&gw, &token("alice", HOUR, &[])).await;
    assert_eq!(close_code(&mut first).await, Some(4009), "the newer connection wins");
    drop(first);
    let ip = "127.0.0.1".parse().unwrap();
    wait_for(|| gw.limits.per_ip.count(ip) == 1).await;
    // alice holds one slot of 127.0.0.1's two; bob takes the other; carol is refused.
    let _bob = connect(&gw, &token("bob", HOUR, &[])).await;
    let refused =
        connect_from(&gw, &format!("/ws?token={}", token("carol", HOUR, &[])), "127.0.0.1:1", &[]).await.unwrap_err();
    assert_eq!(refused.status, 429);
    assert_eq!(refused.retry_after.as_deref(), Some("5"));
    assert_eq!(refused.body["error"], "too_many_requests");
    // From another address: the reconnect window (3 per minute) refuses alice's fourth handshake.
    let alice = format!("/ws?token={}", token("alice", HOUR, &[]));
    connect_from(&gw, &alice, "10.0.0.2:1", &[]).await.unwrap();
    let refused = connect_from(&gw, &alice, "10.0.0.3:1", &[]).await.unwrap_err();
    assert_eq!(refused.status, 429);
    let retry: u64 = refused.retry_after.unwrap().parse().unwrap();
    assert!((59..=60).contains(&retry), "Retry-After {retry}");
}

/// A handshake: target, headers, expected status (200 for admitted) and error.
type Case = (String, Vec<(&'static str, &'static str)>, u16, &'static str);

#[tokio::test]
async fn handshake_statuses_and_bodies() {
    let gw = gateway(|d| d.replace("allowed: [\"*\"]", "allowed: [\"https://app.example.com\"]"));
    let good = token("alice", HOUR, &[]);
    let cases: Vec<Case> = vec![
        ("/nope".into(), vec![], 404, "not_found"),
        ("/ws".into(), vec![], 401, "unauthorized"),
        ("/ws?token=not.a.jwt".into(), vec![], 401, "unauthorized"),
        (format!("/ws?token={}", token("alice", Duration::ZERO, &[])), vec![], 200, ""),
        (format!("/ws?token={good}"), vec![("origin", "https://evil.example")], 403, "forbidden"),
        (format!("/ws?token={}", token("eve", HOUR, &[("roles", r#"["banned"]"#)])), vec![], 403, "forbidden"),
    ];
    for (target, headers, status, error) in cases {
        match connect_from(&gw, &target, "127.0.0.1:1", &headers).await {
            Ok(_) => assert_eq!(status, 200, "{target} was admitted"),
            Err(r) => {
                assert_eq!((r.status, r.body["error"].as_str().unwrap()), (status, error), "{target}");
                let body = r.body.to_string();
                assert!(!body.contains(&good) && !body.contains("eyJ"), "a body never carries a token: {body}");
            }
        }
    }
    // A token via the subprotocol: the server answers `wsgate.v1` and never echoes the token.
    let (client, server) = tokio::io::duplex(64 * 1024);
    tokio::spawn(wsgate::server::handle(server, "127.0.0.1:2".parse().unwrap(), gw.clone()));
    let mut request = "ws://localhost/ws".into_client_request().unwrap();
    let offer = format!("wsgate.v1, bearer.{good}");
    request.headers_mut().insert("sec-websocket-protocol", offer.parse().unwrap());
    request.headers_mut().insert("origin", "https://app.example.com".parse().unwrap());
    let (_ws, response) = tokio_tungstenite::client_async(request, client).await.unwrap();
    let answered: Vec<_> = response.headers().get_all("sec-websocket-protocol").iter().collect();
    assert_eq!(answered, vec!["wsgate.v1"]);
    // Leaving (the drain delay): still admitted. Draining: new handshakes get 503, while live
    // clients are served until the drain closes them (paced, server::serve); once the drain is
    // over, 1001.
    let mut live =
        connect_from(&gw, &format!("/ws?token={}", token("bob", HOUR, &[])), "127.0.0.1:3", &[]).await.unwrap();
    assert_eq!(next_json(&mut live).await["type"], "welcome");
    gw.lifecycle.set(Phase::Leaving);
    let admitted = connect_from(&gw, &format!("/ws?token={}", token("carol", HOUR, &[])), "127.0.0.1:4", &[]).await;
    assert!(admitted.is_ok(), "admitted while leaving: {:?}", admitted.err());
    gw.lifecycle.set(Phase::Draining);
    let refused = connect_from(&gw, &format!("/ws?token={good}"), "127.0.0.1:4", &[]).await.unwrap_err();
    assert_eq!((refused.status, refused.body["error"].as_str()), (503, Some("unavailable")));
    send(&mut live, json!({"type": "ping", "id": "draining"})).await;
    assert_eq!(next_json(&mut live).await, json!({"type": "pong", "ref": "draining"}), "still served while draining");
    gw.lifecycle.set(Phase::Closed);
    assert_eq!(close_code(&mut live).await, Some(1001));
}

#[tokio::test]
async fn an_oversized_message_closes_1009() {
    let gw = gateway(same);
    let mut ws = connect(&gw, &token("alice", HOUR, &[])).await;
    let big = json!({"type": "ping", "pad": "x".repeat(20_000)});
    let _ = ws.send(Message::Text(big.to_string().into())).await;
    assert_eq!(close_code(&mut ws).await, Some(1009));
}

#[tokio::test]
async fn a_panic_deciding_a_message_closes_only_that_connection_1011() {
    let gw = gateway_with(
        |d| {
            d.replace(
                "    ping:\n      schema: ping.json",
                "    ping:\n      schema: ping.json\n    boom:\n      schema: ping.json",
            )
        },
        Some(Failpoint::PanicOnMessageType("ping".into())),
    );
    let mut other = connect(&gw, &token("bob", HOUR, &[])).await;
    let mut ws = connect(&gw, &token("alice", HOUR, &[])).await;
    send(&mut ws, json!({"type": "ping"})).await;
    assert_eq!(close_code(&mut ws).await, Some(1011));
    send(&mut other, json!({"type": "subscribe", "channel": "alerts.x", "id": "s"})).await;
    assert_eq!(next_json(&mut other).await, json!({"type": "ok", "ref": "s"}));
}

#[tokio::test(start_paused = true)]
async fn a_client_that_does_not_read_is_closed_4008_with_bounded_memory() {
    let gw = gateway(same);
    let mut slow = connect(&gw, &token("slow", HOUR, &[])).await;
    let data = json!({"text": "x".repeat(1000)});
    let mut dropped = 0;
    for _ in 0..2000 {
        let fanout = gw.broker.publish(Delivery::new("user:slow", gw.broker.next_id(), &data)).await.unwrap();
        dropped += fanout.dropped;
    }
    assert!(dropped > 0, "the bounded outbox refused deliveries instead of growing");
    // The session is stuck writing into a full pipe; after heartbeat.timeout (10 s) it gives up.
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(close_code(&mut slow).await, Some(4008));
}

#[tokio::test(start_paused = true)]
async fn a_client_that_does_not_read_is_still_logged_out_within_the_write_deadline() {
    let gw = gateway(same);
    let _slow = connect(&gw, &token("slow", HOUR, &[])).await;
    let data = json!({"text": "x".repeat(1000)});
    for _ in 0..120 {
        gw.broker.publish(Delivery::new("user:slow", gw.broker.next_id(), &data)).await.unwrap();
    }
    // The session is now stuck writing into a full pipe (its write deadline is 10 s).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let start = Instant::now();
    assert_eq!(gw.registry.close_user("slow", wsgate::close::CloseCode::LoggedOut, "logout"), 1);
    while gw.metrics.connections_active.load(std::sync::atomic::Ordering::Relaxed) > 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = start.elapsed();
    assert!(took <= Duration::from_secs(10), "the logout took {took:?}");
    let metrics = gw.metrics.render();
    assert!(metrics.contains("wsgate_connections_closed_total{code=\"4010\"} 1"), "{metrics}");
}

#[tokio::test]
async fn unsolicited_pongs_count_toward_the_rate_like_pings() {
    let gw = gateway(same);
    let mut ws = connect(&gw, &token("alice", HOUR, &[])).await;
    for _ in 0..40 {
        if ws.send(Message::Pong(Default::default())).await.is_err() {
            break;
        }
    }
    let code = tokio::time::timeout(Duration::from_secs(5), close_code(&mut ws)).await;
    assert_eq!(code, Ok(Some(1008)), "40 pongs in a second are a flood");
}

#[tokio::test]
async fn subscribe_publish_and_deliveries() {
    let gw = gateway(same);
    let mut publisher = connect(&gw, &token("pub", HOUR, &[("roles", r#"["publisher"]"#)])).await;
    let mut reader = connect(&gw, &token("reader", HOUR, &[])).await;
    let mut outsider = connect(&gw, &token("outsider", HOUR, &[])).await;
    send(&mut reader, json!({"type": "subscribe", "channel": "alerts.eu", "id": "1"})).await;
    assert_eq!(next_json(&mut reader).await, json!({"type": "ok", "ref": "1"}));
    send(&mut reader, json!({"type": "subscribe", "channel": "secret", "id": "2"})).await;
    let refused = next_json(&mut reader).await;
    assert_eq!((refused["code"].as_str(), refused["ref"].as_str()), (Some("forbidden"), Some("2")));
    // A refused publish reaches no one.
    send(&mut reader, json!({"type": "publish", "channel": "alerts.eu", "data": 1, "id": "3"})).await;
    assert_eq!(next_json(&mut reader).await["code"], "forbidden");
    send(&mut publisher, json!({"type": "publish", "channel": "alerts.eu", "data": {"n": 2}, "id": "4"})).await;
    assert_eq!(next_json(&mut publisher).await, json!({"type": "ok", "ref": "4"}));
    let delivery = next_json(&mut reader).await;
    assert_eq!((delivery["type"].as_str(), delivery["channel"].as_str()), (Some("message"), Some("alerts.eu")));
    assert_eq!(delivery["data"], json!({"n": 2}));
    assert!(delivery["id"].as_str().is_some_and(|id| !id.is_empty()));
    // Everyone is in `alerts` and their own `user:<id>` from the start.
    send(&mut publisher, json!({"type": "publish", "channel": "alerts", "data": "all"})).await;
    send(&mut publisher, json!({"type": "publish", "channel": "user:outsider", "data": "you"})).await;
    for ws in [&mut reader, &mut outsider, &mut publisher] {
        assert_eq!(next_json(ws).await["data"], "all");
    }
    assert_eq!(next_json(&mut outsider).await["data"], "you");
    send(&mut reader, json!({"type": "ping", "id": "5"})).await;
    assert_eq!(next_json(&mut reader).await, json!({"type": "pong", "ref": "5"}), "nothing else was delivered");
}

/// Every idle connection holds its task's whole state machine: keep it small. (The session's
/// own state is boxed separately; the handshake's is freed once the session starts.)
#[tokio::test]
async fn a_connection_task_stays_small() {
    let gw = gateway(same);
    let (_client, server) = tokio::io::duplex(16);
    let task = wsgate::server::handle(server, "127.0.0.1:1".parse().unwrap(), gw);
    let size = std::mem::size_of_val(&task);
    assert!(size <= 1024, "a connection's task is {size} bytes");
    // What the accept loop spawns for a real socket, with TLS possible.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
    let (stream, peer) = listener.accept().await.unwrap();
    let task = wsgate::server::connection(stream, peer, gateway(same), None);
    let size = std::mem::size_of_val(&task);
    assert!(size <= 1024, "an accepted connection's task is {size} bytes");
}

#[tokio::test]
async fn a_ping_flood_counts_toward_the_rate_and_closes() {
    let gw = gateway(same);
    let mut ws = connect(&gw, &token("alice", HOUR, &[])).await;
    // 20 pings per second are fine; beyond that each is invalid, and the 6th invalid closes.
    for _ in 0..40 {
        if ws.send(Message::Ping(Default::default())).await.is_err() {
            break;
        }
    }
    assert_eq!(close_code(&mut ws).await, Some(1008));
}

#[tokio::test]
async fn a_schema_violation_never_echoes_the_value() {
    let gw = gateway(same);
    let mut ws = connect(&gw, &token("alice", HOUR, &[])).await;
    let secret = "SECRET-".repeat(1300);
    send(&mut ws, json!({"type": "auth", "id": "x", "token": secret})).await;
    let refused = next_json(&mut ws).await;
    assert_eq!(refused["code"], "schema_violation", "{refused}");
    let reason = refused["reason"].as_str().unwrap();
    assert!(!reason.contains("SECRET"), "{reason}");
    assert!(reason.contains("/token"), "the reason says where: {reason}");
}

#[tokio::test(start_paused = true)]
async fn one_address_cannot_hold_more_than_128_unfinished_handshakes() {
    let gw = gateway(same);
    let peer: SocketAddr = "192.0.2.7:1".parse().unwrap();
    let mut stalled = Vec::new();
    for _ in 0..128 {
        let (client, server) = tokio::io::duplex(1024);
        tokio::spawn(wsgate::server::handle(server, peer, gw.clone()));
        stalled.push(client);
    }
    wait_for(|| gw.limits.handshaking.count(peer.ip()) == 128).await;
    let (mut refused, server) = tokio::io::duplex(1024);
    wsgate::server::handle(server, peer, gw.clone()).await;
    let mut buf = [0u8; 16];
    let n = tokio::io::AsyncReadExt::read(&mut refused, &mut buf).await.unwrap();
    assert_eq!(n, 0, "closed without an answer");
    // Other addresses are not affected, and the stalled ones are dropped after 10 s.
    let _other = connect(&gw, &token("bob", HOUR, &[])).await;
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(gw.limits.handshaking.count(peer.ip()), 0);
}

#[tokio::test(start_paused = true)]
async fn the_spike_gauge_rises_with_the_handshake_rate_and_clears() {
    let gw = gateway(|d| d.replace("spike: {max: 500, per: 10s}", "spike: {max: 5, per: 10s}"));
    let gauge = || gw.metrics.connection_spike.load(std::sync::atomic::Ordering::Relaxed);
    let mut clients = Vec::new();
    for i in 0..5 {
        clients.push(connect(&gw, &token(&format!("u{i}"), HOUR, &[])).await);
    }
    assert!(!gw.limits.spike.check(&gw.policy.current()), "5 in 10 s is at the threshold, not over it");
    clients.push(connect(&gw, &token("u5", HOUR, &[])).await);
    assert!(gw.limits.spike.check(&gw.policy.current()));
    assert_eq!(gauge(), 1);
    tokio::time::sleep(Duration::from_secs(25)).await;
    assert!(!gw.limits.spike.check(&gw.policy.current()));
    assert_eq!(gauge(), 0);
}
