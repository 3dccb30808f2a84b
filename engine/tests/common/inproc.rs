//! An in-process client for a [`Gateway`]: real handshakes and sessions over in-memory
//! streams (no sockets), so tests can run on tokio's paused clock.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::DuplexStream;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use wsgate::gateway::Gateway;

pub type Client = WebSocketStream<DuplexStream>;

pub fn secret(_: &str) -> Option<String> {
    Some(super::SECRET.to_string())
}

pub fn token(sub: &str, ttl: Duration, claims: &[(&str, &str)]) -> String {
    let claims: Vec<(String, String)> = claims.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    wsgate::token::mint(super::SECRET.as_bytes(), sub, ttl, &claims, SystemTime::now()).unwrap()
}

pub const HOUR: Duration = Duration::from_secs(3600);

/// A refused handshake: status, `Retry-After`, body.
#[derive(Debug)]
pub struct Refused {
    pub status: u16,
    pub retry_after: Option<String>,
    pub body: Value,
}

pub async fn connect_from(
    gw: &Arc<Gateway>,
    target: &str,
    peer: &str,
    headers: &[(&'static str, &str)],
) -> Result<Client, Refused> {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let peer: SocketAddr = peer.parse().unwrap();
    tokio::spawn(wsgate::server::handle(server, peer, gw.clone()));
    let mut request = format!("ws://localhost{target}").into_client_request().unwrap();
    for (name, value) in headers {
        request.headers_mut().insert(*name, value.parse().unwrap());
    }
    match tokio_tungstenite::client_async(request, client).await {
        Ok((ws, _)) => Ok(ws),
        Err(WsError::Http(response)) => Err(Refused {
            status: response.status().as_u16(),
            retry_after: response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string()),
            body: serde_json::from_slice(response.body().as_deref().unwrap_or_default()).unwrap_or(Value::Null),
        }),
        Err(e) => panic!("handshake failed: {e}"),
    }
}

pub async fn connect(gw: &Arc<Gateway>, token: &str) -> Client {
    let mut ws = connect_from(gw, &format!("/ws?token={token}"), "127.0.0.1:40000", &[]).await.expect("admitted");
    let welcome = next_json(&mut ws).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    ws
}

/// The next data frame as JSON (pings are answered by the client library as it reads).
pub async fn next_json(ws: &mut Client) -> Value {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).unwrap(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// Reads until the connection ends: the server's close code, or `None` when it was dropped
/// without a close frame.
pub async fn close_code(ws: &mut Client) -> Option<u16> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return None,
        }
    }
}

/// Waits (on the real clock, bounded) until `done` holds.
pub async fn wait_for(done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "condition not reached within 5 s");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

pub async fn send(ws: &mut Client, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}
