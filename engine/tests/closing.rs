//! Server-initiated closes over real TCP: the close frame reaches a client that is still
//! sending. After its close the server keeps reading (and discarding) until the client's close,
//! EOF or the close timeout, so unread input never makes the kernel reset the connection and
//! destroy the close frame in flight (a browser would report 1006 instead of the code).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::inproc::{HOUR, secret, token};
use common::wire::{RawClient, Seen, TcpServer, client_frame, fragments};
use wsgate::gateway::{Gateway, GatewayOptions};
use wsgate::policy::source::SourceFile;
use wsgate::policy::{CompileOptions, Policy, PolicySource, compile};
use wsgate::server::ServeOptions;

fn policy(edit: impl Fn(String) -> String) -> Arc<Policy> {
    let mut source = PolicySource::read_dir(&common::default_policy_dir()).unwrap();
    let edited = edit(source.documents[0].text.clone());
    source.documents = vec![SourceFile { name: "policy.yaml".into(), text: edited }];
    Arc::new(compile(&source, &CompileOptions { generation: 1, secret_lookup: &secret }).unwrap())
}

async fn server(edit: impl Fn(String) -> String) -> TcpServer {
    let gw = Gateway::new(policy(edit), GatewayOptions::new("test"));
    TcpServer::start(gw, ServeOptions::default()).await
}

/// `tries` connections in a row, each writing `frames` (the first `at_once` back to back, the
/// rest streamed) and then answering the server's close: every one must see `code`.
async fn every_try_sees(server: &TcpServer, tries: usize, frames: &[Vec<u8>], at_once: usize, code: u16) {
    for i in 0..tries {
        let mut client = RawClient::connect(server.addr, &token(&format!("u{i}"), HOUR, &[])).await;
        let (opcode, payload) = client.frame().await.expect("welcome");
        assert!(opcode == 1 && String::from_utf8_lossy(&payload).contains("\"welcome\""));
        let seen = match client.send_each(frames, at_once).await {
            Ok(()) => client.close_seen(Duration::from_secs(10)).await,
            Err(seen) => seen,
        };
        assert_eq!(seen, Seen::Close(code), "try {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fragmented_message_over_the_limit_sees_1009_200_times_in_a_row() {
    let server = server(|p| p).await;
    // 12,000 bytes in 100-byte fragments, limit 10,240: the server decides 1009 while the
    // client's last fragments are still arriving.
    every_try_sees(&server, 200, &fragments(12_000, 100), 95, 1009).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_frame_closes_1003_while_the_client_keeps_sending() {
    let server = server(|p| p.replace("binary: reject", "binary: close")).await;
    let mut burst = vec![client_frame(true, 2, b"binary")];
    burst.extend((0..20).map(|_| client_frame(true, 1, br#"{"type":"ping"}"#)));
    every_try_sees(&server, 20, &burst, 1, 1003).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_close_4029_reaches_a_flooding_client() {
    let server = server(|p| p.replace("action: reject}", "action: close}")).await;
    let flood: Vec<_> = (0..40).map(|_| client_frame(true, 1, br#"{"type":"ping"}"#)).collect();
    every_try_sees(&server, 20, &flood, 15, 4029).await;
}
