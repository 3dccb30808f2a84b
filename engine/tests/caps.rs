//! The connection cap holds in every phase: while draining, a new connection is still answered
//! (503 once its request arrives) only within `--max-connections`; past it, it is closed at once
//! instead of being spawned without a limit.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::inproc::{HOUR, secret, token};
use common::wire::{RawClient, TcpServer};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use wsgate::gateway::{Gateway, GatewayOptions};
use wsgate::policy::{CompileOptions, compile_dir};
use wsgate::server::ServeOptions;

/// Whether the server closes `stream` within `within` (EOF or a reset), without a byte sent.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(tokio::time::timeout(within, stream.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_draining_connections_past_the_cap_are_closed_at_once() {
    let policy = compile_dir(&common::default_policy_dir(), &CompileOptions { generation: 1, secret_lookup: &secret });
    let gw = Gateway::new(Arc::new(policy.unwrap()), GatewayOptions::new("test"));
    let options =
        ServeOptions { max_connections: 3, drain_timeout: Duration::from_secs(30), ..ServeOptions::default() };
    let mut server = TcpServer::start(gw.clone(), options).await;
    // One client that never answers its 1001 keeps the drain going (for the close timeout).
    let mut lingering = RawClient::connect(server.addr, &token("alice", HOUR, &[])).await;
    lingering.frame().await.expect("welcome");
    server.shutdown();
    let deadline = Instant::now() + Duration::from_secs(5);
    while gw.lifecycle.phase() == wsgate::lifecycle::Phase::Running {
        assert!(Instant::now() < deadline, "the drain did not start");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Ten sockets that send nothing: two fit under the cap (three, one held by alice).
    let mut idle = Vec::new();
    for _ in 0..10 {
        idle.push(TcpStream::connect(server.addr).await.unwrap());
    }
    let mut closed = 0;
    for stream in &mut idle {
        if closed_within(stream, Duration::from_millis(500)).await {
            closed += 1;
        }
    }
    assert!(closed >= 8, "only {closed} of 10 connections past the cap were closed at once");
}
