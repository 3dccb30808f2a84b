//! A client that pings and never reads the pongs must not make the server hold its answers:
//! the write buffer is bounded, and a client owing more than the slack is a slow consumer
//! (4008). Alone in its test binary, so the process's resident memory is this test's alone.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::inproc::{HOUR, secret, token};
use common::wire::{RawClient, TcpServer, client_frame};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use wsgate::gateway::{Gateway, GatewayOptions};
use wsgate::policy::source::SourceFile;
use wsgate::policy::{CompileOptions, PolicySource, compile};
use wsgate::server::ServeOptions;

/// Resident memory of this process, from /proc.
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_clients_pinging_100000_times_without_reading_leave_memory_flat() {
    // A rate no ping flood reaches, so only the write path is measured.
    let mut source = PolicySource::read_dir(&common::default_policy_dir()).unwrap();
    let doc = source.documents[0].text.replace("rate: {max: 20, per: 1s", "rate: {max: 1000000, per: 10ms");
    source.documents = vec![SourceFile { name: "policy.yaml".into(), text: doc }];
    let policy = Arc::new(compile(&source, &CompileOptions { generation: 1, secret_lookup: &secret }).unwrap());
    let gw = Gateway::new(policy, GatewayOptions::new("test"));
    let server = TcpServer::start(gw.clone(), ServeOptions::default()).await;
    // 100,000 pings of 125 bytes (the most a control frame holds) each, then one message: built before the first measurement.
    let mut flood = Vec::with_capacity(100_000 * 131 + 64);
    for _ in 0..100_000 {
        flood.extend(client_frame(true, 9, &[b'p'; 125]));
    }
    flood.extend(client_frame(true, 1, br#"{"type":"ping"}"#));
    let flood = Arc::new(flood);
    let mut clients = Vec::new();
    for i in 0..10 {
        let mut client = RawClient::connect_small_window(server.addr, &token(&format!("u{i}"), HOUR, &[])).await;
        client.frame().await.expect("welcome");
        clients.push(client);
    }
    let before = rss_bytes();
    let writers: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            let flood = flood.clone();
            // Writes everything and never reads; a reset (the server gave up on it) ends it.
            tokio::spawn(async move {
                let _ = client.stream.write_all(&flood).await;
                client
            })
        })
        .collect();
    // Done when every pinger was closed, or the server read every one to its last message.
    let deadline = Instant::now() + Duration::from_secs(60);
    while gw.metrics.connections_active.load(Ordering::Relaxed) > 0
        && gw.metrics.messages_received.load(Ordering::Relaxed) < 10
    {
        assert!(Instant::now() < deadline, "the server neither read the pings nor closed the clients");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let grown = rss_bytes().saturating_sub(before);
    println!("RSS grew by {} KiB", grown / 1024);
    let metrics = gw.metrics.render();
    assert!(grown < 4 * 1024 * 1024, "RSS grew by {} KiB", grown / 1024);
    assert!(metrics.contains("wsgate_connections_closed_total{code=\"4008\"} 10"), "{metrics}");
    for writer in writers {
        let _ = writer.await;
    }
}
