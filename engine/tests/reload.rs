//! Live policy reload against a real policy directory: the reload path (`wsgate::reload`) and
//! the directory watcher, with sessions in-process. The end-to-end scenarios against a real
//! process are `harness/scenarios/reload_*`.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use common::PolicyCopy;
use common::inproc::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use wsgate::gateway::{Gateway, GatewayOptions};
use wsgate::policy::{CompileOptions, compile_dir};
use wsgate::reload::{Outcome, PolicyDir, SecretLookup, Trigger};

/// A gateway serving the policy in `dir`, reloadable from it.
fn gateway(dir: &PolicyCopy, secrets: SecretLookup) -> Arc<Gateway> {
    let policy = compile_dir(dir.path(), &CompileOptions { generation: 1, secret_lookup: &*secrets }).unwrap();
    let options = GatewayOptions {
        policy_dir: Some(PolicyDir { dir: dir.path().to_path_buf(), secrets }),
        ..GatewayOptions::new("test")
    };
    Gateway::new(Arc::new(policy), options)
}

/// Rewrites `policy.yaml` the way editors do: a temporary file renamed over it.
fn save(dir: &PolicyCopy, text: &str) {
    let tmp = dir.path().join(".policy.yaml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.path().join("policy.yaml")).unwrap();
}

/// A policy with a `probe` message type that accepts `{"v": "<letter>"}` twice over: its schema
/// requires the letter (`const`) and its rule checks it again. Under generation A a probe "A"
/// is accepted and a probe "B" fails the schema. A message decided half under A and half under
/// B would pass one check and fail the other: a `forbidden` answer.
fn probe_policy(base: &str, letter: &str) -> String {
    let rule = format!(
        "    probe:\n      schema: probe.json\n      allow:\n        expr: 'message.v == \"{letter}\"'\n        reason: rule of {letter}\n"
    );
    base.replace("rate: {max: 20, per: 1s, action: reject}", "rate: {max: 100000, per: 1s, action: reject}")
        .replace("max_invalid: 5", "max_invalid: 1000000")
        .replace("  types:\n", &format!("  types:\n{rule}"))
}

fn probe_schema(letter: &str) -> String {
    json!({"type": "object", "required": ["type", "v"], "properties": {"v": {"const": letter}}}).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_racing_with_a_thousand_messages_a_second_never_mixes_generations() {
    let dir = PolicyCopy::new();
    let base = dir.read("policy.yaml");
    let write_generation = |letter: &str| {
        std::fs::write(dir.path().join("schemas/probe.json"), probe_schema(letter)).unwrap();
        save(&dir, &probe_policy(&base, letter));
    };
    write_generation("A");
    let gw = gateway(&dir, Arc::new(secret));
    let ws = connect(&gw, &token("alice", HOUR, &[])).await;
    let (mut tx, mut rx) = ws.split();

    // 1,000 messages a second for two seconds, alternating "A" and "B", each with its id.
    const MESSAGES: usize = 2000;
    let sender = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        for i in 0..MESSAGES {
            tick.tick().await;
            let letter = if i % 2 == 0 { "A" } else { "B" };
            let text = json!({"type": "probe", "id": format!("{i}"), "v": letter}).to_string();
            tx.send(Message::Text(text.into())).await.unwrap();
        }
        tx
    });
    // Meanwhile the files flip between A and B and are reloaded, as fast as they compile.
    let stop = Arc::new(AtomicBool::new(false));
    let reloads = Arc::new(AtomicU64::new(0));
    let flipper = {
        let (gw, stop, reloads, dir_path) = (gw.clone(), stop.clone(), reloads.clone(), dir.path().to_path_buf());
        let base = base.clone();
        tokio::spawn(async move {
            let mut letter = "B";
            while !stop.load(Ordering::Relaxed) {
                std::fs::write(dir_path.join("schemas/probe.json"), probe_schema(letter)).unwrap();
                let tmp = dir_path.join(".policy.yaml.tmp");
                std::fs::write(&tmp, probe_policy(&base, letter)).unwrap();
                std::fs::rename(&tmp, dir_path.join("policy.yaml")).unwrap();
                assert!(matches!(gw.policy.reload(Trigger::Admin).await, Outcome::Applied { .. }));
                reloads.fetch_add(1, Ordering::Relaxed);
                letter = if letter == "A" { "B" } else { "A" };
            }
        })
    };
    let (mut accepted, mut schema_refused) = ([0usize; 2], [0usize; 2]);
    for _ in 0..MESSAGES {
        let reply: Value = loop {
            match rx.next().await {
                Some(Ok(Message::Text(t))) => break serde_json::from_str(&t).unwrap(),
                Some(Ok(_)) => continue,
                other => panic!("the connection ended: {other:?}"),
            }
        };
        let i: usize = reply["ref"].as_str().unwrap().parse().unwrap();
        match (reply["type"].as_str(), reply["code"].as_str()) {
            (Some("ok"), _) => accepted[i % 2] += 1,
            (Some("error"), Some("schema_violation")) => schema_refused[i % 2] += 1,
            _ => panic!("message {i} was decided under two generations: {reply}"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    flipper.await.unwrap();
    let _ = sender.await.unwrap();
    let reloads = reloads.load(Ordering::Relaxed);
    assert!(reloads >= 10, "only {reloads} reloads raced with the messages");
    assert!(
        accepted.iter().chain(&schema_refused).all(|&n| n > 0),
        "both generations decided messages of both kinds: accepted {accepted:?}, refused {schema_refused:?}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn compiling_a_policy_never_blocks_the_connection_tasks() {
    // The secret lookup runs inside the compiler. Here it blocks until the test has done a
    // round trip with a live connection — which needs the runtime's one thread. Were the
    // compile on that thread, the round trip could not happen and the lookup would time out.
    let (release, released) = mpsc::channel::<()>();
    let released = Mutex::new(released);
    let armed = Arc::new(AtomicBool::new(false));
    let timed_out = Arc::new(AtomicBool::new(false));
    let secrets: SecretLookup = {
        let (armed, timed_out) = (armed.clone(), timed_out.clone());
        Arc::new(move |name| {
            if armed.load(Ordering::SeqCst) {
                let waited = released.lock().unwrap().recv_timeout(Duration::from_secs(10));
                timed_out.store(waited.is_err(), Ordering::SeqCst);
            }
            secret(name)
        })
    };
    let dir = PolicyCopy::new();
    let gw = gateway(&dir, secrets);
    let mut ws = connect(&gw, &token("alice", HOUR, &[])).await;
    armed.store(true, Ordering::SeqCst);
    let reloading = tokio::spawn({
        let gw = gw.clone();
        async move { gw.policy.reload(Trigger::Admin).await }
    });
    send(&mut ws, json!({"type": "ping", "id": "during"})).await;
    assert_eq!(next_json(&mut ws).await, json!({"type": "pong", "ref": "during"}));
    release.send(()).unwrap();
    assert_eq!(reloading.await.unwrap(), Outcome::Unchanged { generation: 1 });
    assert!(!timed_out.load(Ordering::SeqCst), "the compile held the runtime thread");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_saves_never_activates_a_broken_one_and_the_next_valid_save_applies() {
    let dir = PolicyCopy::new();
    let base = dir.read("policy.yaml");
    let gw = gateway(&dir, Arc::new(secret));
    let _watch = wsgate::watcher::watch(gw.policy.clone()).unwrap();
    // Every generation that becomes active is recorded.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let observer = {
        let (mut active, seen) = (gw.policy.watch(), seen.clone());
        tokio::spawn(async move {
            while active.changed().await.is_ok() {
                let p = active.borrow_and_update().clone();
                seen.lock().unwrap().push((p.generation, p.messages.max_bytes.literal()));
            }
        })
    };
    // 100 saves in about a second; every tenth is a half-written (broken) file.
    let with_max = |n: u64| base.replace("max_bytes: 10240", &format!("max_bytes: {n}"));
    for i in 1..=100u64 {
        if i % 10 == 0 {
            // Cut inside a quoted string: whatever a reload reads of it cannot parse.
            let full = with_max(5000 + i);
            save(&dir, &full[..full.find("banned").unwrap()]);
        } else {
            save(&dir, &with_max(5000 + i));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The last save (#100) is broken: its reload is refused, and a valid save stays active
    // (whichever the debounce last read: #99 may never have been read on its own).
    wait_for(|| {
        gw.policy.history().last_error.is_some() && gw.policy.history().last.is_some_and(|r| r.outcome == "error")
    })
    .await;
    let reloads = gw.metrics.reloads_ok.load(Ordering::Relaxed) + gw.metrics.reloads_error.load(Ordering::Relaxed);
    assert!(reloads < 50, "{reloads} reloads for 100 saves: the debounce should merge them");
    observer.abort();
    let seen = seen.lock().unwrap().clone();
    assert!(!seen.is_empty(), "no save of the storm was applied");
    for (generation, max) in &seen {
        let max = max.expect("a literal limit");
        assert!(max % 10 != 0, "generation {generation} has the broken save's limit {max}");
    }
    assert_eq!(gw.policy.current().messages.max_bytes.literal(), seen.last().unwrap().1);
    save(&dir, &with_max(6001));
    wait_for(|| gw.policy.current().messages.max_bytes.literal() == Some(6001)).await;

    // A file being written (opened, half written, not closed) is not read until it is closed.
    let before = gw.metrics.reloads_error.load(Ordering::Relaxed) + gw.metrics.reloads_ok.load(Ordering::Relaxed);
    let full = with_max(7777);
    let (first, second) = full.split_at(full.len() / 2);
    let mut file = std::fs::OpenOptions::new().write(true).truncate(true).open(dir.path().join("policy.yaml")).unwrap();
    std::io::Write::write_all(&mut file, first.as_bytes()).unwrap();
    std::io::Write::flush(&mut file).unwrap();
    // Well past the quiet time, well within the write hold: a negative check needs a wait.
    tokio::time::sleep(wsgate::watcher::QUIET * 8).await;
    let during = gw.metrics.reloads_error.load(Ordering::Relaxed) + gw.metrics.reloads_ok.load(Ordering::Relaxed);
    assert_eq!(during, before, "a reload read the half-written file");
    std::io::Write::write_all(&mut file, second.as_bytes()).unwrap();
    drop(file);
    wait_for(|| gw.policy.current().messages.max_bytes.literal() == Some(7777)).await;
    assert!(gw.policy.history().last_error.is_none(), "a valid policy clears the last error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saved_policy_is_enforced_on_a_live_connection() {
    let dir = PolicyCopy::new();
    let base = dir.read("policy.yaml");
    let gw = gateway(&dir, Arc::new(secret));
    let _watch = wsgate::watcher::watch(gw.policy.clone()).unwrap();
    let mut ws = connect(&gw, &token("alice", HOUR, &[])).await;
    save(
        &dir,
        &base.replace(
            "ping:\n      schema: ping.json",
            "ping:\n      schema: ping.json\n      allow: {expr: 'false', reason: no more pings}",
        ),
    );
    wait_for(|| gw.policy.current().generation == 2).await;
    send(&mut ws, json!({"type": "ping", "id": "x"})).await;
    let reply = next_json(&mut ws).await;
    assert_eq!((reply["code"].as_str(), reply["reason"].as_str()), (Some("forbidden"), Some("no more pings")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_file_outside_the_policy_directory_is_watched_too() {
    // The key lives beside the policy directory and is named through `..`.
    let keys = tempfile::tempdir().unwrap();
    let key_pem = || rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap().public_key_pem();
    std::fs::write(keys.path().join("pub.pem"), key_pem()).unwrap();
    let dir = PolicyCopy::new();
    let relative = format!("../{}/pub.pem", keys.path().file_name().unwrap().to_str().unwrap());
    let jwt = format!("  jwt:\n    algorithms: [ES256]\n    secret_env: null\n    public_key_file: {relative}\n");
    let text = dir.read("policy.yaml");
    let start = text.find("  jwt:\n").unwrap();
    let end = start + text[start..].find("  user_id:").unwrap();
    save(&dir, &format!("{}{jwt}{}", &text[..start], &text[end..]));
    let gw = gateway(&dir, Arc::new(secret));
    let _watch = wsgate::watcher::watch(gw.policy.clone()).unwrap();
    // Rotate the key: the file is replaced, the policy directory untouched.
    let tmp = keys.path().join(".pub.pem.tmp");
    std::fs::write(&tmp, key_pem()).unwrap();
    std::fs::rename(&tmp, keys.path().join("pub.pem")).unwrap();
    wait_for(|| gw.policy.current().generation == 2).await;
}

/// A copy of `from` as version `n` of a ConfigMap volume in `dir`: `..v<n>` holds the files.
fn copy_version(from: &std::path::Path, dir: &std::path::Path, n: u32) -> std::path::PathBuf {
    fn copy(from: &std::path::Path, to: &std::path::Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap().flatten() {
            let (name, kind) = (entry.file_name(), entry.file_type().unwrap());
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            if kind.is_dir() {
                copy(&entry.path(), &to.join(&name));
            } else {
                std::fs::copy(entry.path(), to.join(&name)).unwrap();
            }
        }
    }
    let version = dir.join(format!("..v{n}"));
    copy(from, &version);
    version
}

/// Swaps `..data` to version `n` as the kubelet does: `..data_tmp` linked to it and renamed over
/// `..data` (one atomic rename), then the previous version removed.
fn kubelet_swap(dir: &std::path::Path, n: u32) {
    std::os::unix::fs::symlink(format!("..v{n}"), dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    let _ = std::fs::remove_dir_all(dir.join(format!("..v{}", n - 1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_configmap_swap_is_followed() {
    // The policy directory as a ConfigMap volume mounts it: each visible name a link through
    // `..data`, which links to the current version's directory.
    let source = PolicyCopy::new();
    let base = source.read("policy.yaml");
    let dir = tempfile::tempdir().unwrap();
    copy_version(source.path(), dir.path(), 1);
    std::os::unix::fs::symlink("..v1", dir.path().join("..data")).unwrap();
    for name in ["policy.yaml", "schemas", "tests"] {
        std::os::unix::fs::symlink(format!("..data/{name}"), dir.path().join(name)).unwrap();
    }
    let secrets: SecretLookup = Arc::new(secret);
    let policy = compile_dir(dir.path(), &CompileOptions { generation: 1, secret_lookup: &*secrets }).unwrap();
    let options = GatewayOptions {
        policy_dir: Some(PolicyDir { dir: dir.path().to_path_buf(), secrets }),
        ..GatewayOptions::new("test")
    };
    let gw = Gateway::new(Arc::new(policy), options);
    let _watch = wsgate::watcher::watch(gw.policy.clone()).unwrap();
    for n in 2..=6 {
        let max_bytes = 7000 + n;
        let version = copy_version(source.path(), dir.path(), n);
        let text = base.replace("max_bytes: 10240", &format!("max_bytes: {max_bytes}"));
        std::fs::write(version.join("policy.yaml"), text).unwrap();
        kubelet_swap(dir.path(), n);
        wait_for(|| gw.policy.current().messages.max_bytes.literal() == Some(u64::from(max_bytes))).await;
    }
    assert!(gw.policy.history().last_error.is_none(), "{:?}", gw.policy.history().last_error);
}

/// `GET /v1/policy` through the admin handler, as a client would see it.
async fn admin_policy(gw: &Arc<Gateway>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let handler = tokio::spawn(wsgate::admin::handle(server, gw.clone()));
    client.write_all(b"GET /v1/policy HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut response = String::new();
    client.read_to_string(&mut response).await.unwrap();
    handler.await.unwrap();
    response
}

/// One way to break the policy directory.
type Breaks<'a> = Box<dyn Fn() + 'a>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_reload_shows_where_and_why_but_never_a_value_from_the_files() {
    let dir = PolicyCopy::new();
    let base = dir.read("policy.yaml");
    let gw = gateway(&dir, Arc::new(secret));
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("leak.yaml"), "version: 1\nmessages:\n  binary: PLANTED-MARKER-OUTSIDE\n")
        .unwrap();
    let broken: Vec<(&str, Breaks<'_>)> = vec![
        ("an unknown variant", Box::new(|| save(&dir, &base.replace("binary: reject", "binary: PLANTED-MARKER-1")))),
        (
            "a string where a number goes",
            Box::new(|| save(&dir, &base.replace("version: 1", "version: PLANTED-MARKER-2"))),
        ),
        (
            "a malformed duration",
            Box::new(|| save(&dir, &base.replace("idle_timeout: 10m", "idle_timeout: 10PLANTEDMARKER"))),
        ),
        (
            "a CEL syntax error next to a literal",
            Box::new(|| {
                save(&dir, &base.replace(r#""banned" in claims.roles'"#, r#""PLANTED-MARKER-5" in claims.roles &&'"#))
            }),
        ),
        ("a value in a schema", Box::new(|| dir.write("schemas/ping.json", r#"{"type": "PLANTED-MARKER-3"}"#))),
        (
            "a document linked from outside the directory",
            Box::new(|| {
                std::os::unix::fs::symlink(outside.path().join("leak.yaml"), dir.path().join("leak.yaml")).unwrap()
            }),
        ),
    ];
    let pristine_schema = dir.read("schemas/ping.json");
    for (what, breaks) in &broken {
        breaks();
        let outcome = gw.policy.reload(Trigger::Admin).await;
        let shown = format!("{outcome:?}");
        assert!(matches!(outcome, Outcome::Refused { .. }), "{what}: {shown}");
        let body = admin_policy(&gw).await;
        assert!(body.contains("\"last_error\":\""), "{what}: {body}");
        for text in [&shown, &body] {
            assert!(!text.contains("PLANTED-MARKER") && !text.contains("PLANTEDMARKER"), "{what} is echoed: {text}");
        }
        // Put the file back for the next case.
        save(&dir, &base);
        dir.write("schemas/ping.json", &pristine_schema);
        let _ = std::fs::remove_file(dir.path().join("leak.yaml"));
    }
}
