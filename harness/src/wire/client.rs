//! The WebSocket protocol client: one handshake over a socket the harness opens itself (plain
//! TCP for `ws://`, TLS over it for `wss://`), then one background task per accepted connection
//! that owns the socket, forwards what arrives to a queue and carries out commands. A
//! connection can stop reading (a dead peer that never answers pings, a slow consumer whose TCP
//! window fills) and resume later.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{WebSocketStream, client_async_with_config};

use crate::wire::tls::{self, Stream, TlsClient};

/// The largest refusal body the harness reads.
const MAX_REFUSAL_BODY: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub(crate) struct Handshake {
    /// The gateway's public address.
    pub(crate) addr: SocketAddr,
    /// Path and query, e.g. `/ws?token=…` (never logged: it may hold a token).
    pub(crate) path_and_query: String,
    /// Extra request headers (`Origin`, `Authorization`, `Cookie`, `Sec-WebSocket-Protocol`, …).
    pub(crate) headers: Vec<(String, String)>,
    /// Deadline for the whole handshake (TCP, TLS and HTTP).
    pub(crate) timeout: Duration,
    /// `Some`: `wss://` — TLS with this client configuration; `None`: `ws://`.
    pub(crate) tls: Option<TlsClient>,
    /// The source address to connect from (a loopback address other than 127.0.0.1 is another
    /// client); `None`: the kernel's choice.
    pub(crate) from: Option<std::net::IpAddr>,
}

/// How the connection's task reads after the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadMode {
    /// Read and forward everything (and so answer pings).
    Reading,
    /// Read the first data frame (the welcome), then stop reading: the peer looks dead.
    PauseAfterFirstFrame,
}

/// What a handshake came to.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The server upgraded; the connection runs.
    Accepted {
        conn: Connection,
        /// The 101 response's headers (lower-case names).
        headers: Vec<(String, String)>,
    },
    /// The server answered with a plain HTTP response.
    Refused {
        status: u16,
        /// Its headers (lower-case names).
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
}

/// Something that arrived on a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    Text(String),
    Binary(Vec<u8>),
    /// A close frame (`code` is `None` for a close frame without a status).
    Close {
        code: Option<u16>,
        reason: String,
    },
    /// The connection ended without a close frame: EOF or a reset.
    Dropped {
        /// What the socket said.
        error: String,
    },
}

impl Event {
    /// A one-line description for failure messages.
    pub(crate) fn describe(&self) -> String {
        match self {
            Event::Text(t) => format!("text frame {}", crate::matching::clip(t, 300)),
            Event::Binary(b) => format!("binary frame of {} bytes", b.len()),
            Event::Close { code: Some(code), reason } => format!("close frame {code} {reason:?}"),
            Event::Close { code: None, .. } => "close frame without a code".to_string(),
            Event::Dropped { error } => format!("connection dropped without a close frame ({error})"),
        }
    }

    /// Whether the connection is over after this event.
    pub(crate) fn is_end(&self) -> bool {
        matches!(self, Event::Close { .. } | Event::Dropped { .. })
    }
}

enum Command {
    Send(Message, oneshot::Sender<Result<(), String>>),
    Reading(bool),
}

/// A live connection. Dropping it aborts its task and so closes the socket without a close frame.
#[derive(Debug)]
pub(crate) struct Connection {
    /// Commands to the task that owns the socket.
    commands: mpsc::UnboundedSender<Command>,
    /// What the task received, in order, each with when it came off the socket. Unbounded so
    /// the task never stops reading because the scenario has not looked yet (that would fake a
    /// slow consumer).
    events: mpsc::UnboundedReceiver<(Event, Instant)>,
    /// The task, aborted on drop.
    task: JoinHandle<()>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Send(m, _) => write!(f, "Send({} bytes)", m.len()),
            Command::Reading(on) => write!(f, "Reading({on})"),
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Connection {
    /// Sends a message; fails when the connection is over or the send does not finish in time
    /// (a server that stopped reading).
    pub(crate) async fn send(&self, message: Message, timeout: Duration) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(Command::Send(message, tx)).map_err(|_| "the connection's task has ended".to_string())?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err("the connection's task has ended".into()),
            Err(_) => Err(format!("the send did not complete within {timeout:?}")),
        }
    }

    /// Sends a close frame; the server's answer arrives as an [`Event::Close`].
    pub(crate) async fn close(&self, code: u16, reason: &str, timeout: Duration) -> Result<(), String> {
        let frame = CloseFrame { code: CloseCode::from(code), reason: reason.into() };
        self.send(Message::Close(Some(frame)), timeout).await
    }

    /// Starts or stops reading the socket. While not reading, nothing is received and pings go
    /// unanswered; the server's frames pile up in the TCP buffers.
    pub(crate) fn set_reading(&self, on: bool) {
        let _ = self.commands.send(Command::Reading(on));
    }

    /// The next event, or `None` when nothing arrived before `deadline`.
    pub(crate) async fn next_event(&mut self, deadline: Instant) -> Option<Event> {
        self.next_event_timed(deadline).await.map(|(event, _)| event)
    }

    /// The next event with the moment the connection's task read it off the socket (for latency
    /// measurements: it does not include the time the event waited for the reader).
    pub(crate) async fn next_event_timed(&mut self, deadline: Instant) -> Option<(Event, Instant)> {
        match tokio::time::timeout_at(deadline, self.events.recv()).await {
            Ok(Some(timed)) => Some(timed),
            // The task only ends after reporting the end of the connection, or when aborted.
            Ok(None) => Some((Event::Dropped { error: "the connection's task ended".into() }, Instant::now())),
            Err(_) => None,
        }
    }

    /// An event that has already arrived, without waiting.
    pub(crate) fn try_next_event(&mut self) -> Option<Event> {
        self.try_next_event_timed().map(|(event, _)| event)
    }

    /// An event that has already arrived, with when it was read, without waiting.
    pub(crate) fn try_next_event_timed(&mut self) -> Option<(Event, Instant)> {
        self.events.try_recv().ok()
    }
}

/// Performs the handshake. `Err` only for failures that are neither an upgrade nor an HTTP
/// answer (no listener, a broken response, a timeout). Messages never contain the request path,
/// which may hold a token.
pub(crate) async fn connect(handshake: &Handshake, mode: ReadMode) -> Result<Outcome, String> {
    let deadline = Instant::now() + handshake.timeout;
    let addr = handshake.addr;
    let stream = tls::open_from(addr, handshake.from, handshake.tls.as_ref(), deadline).await?;
    // A second handle on the same stream: tungstenite keeps only the bytes of a refusal's body
    // that arrived with its head, so the rest is read through this one.
    let stream = Shared(Arc::new(Mutex::new(stream)));
    let spare = Shared(Arc::clone(&stream.0));

    // Over TLS the request names the certificate's host, as a browser would.
    let scheme = if handshake.tls.is_some() { "wss" } else { "ws" };
    let url = format!("{scheme}://{}{}", tls::host(addr, handshake.tls.is_some()), handshake.path_and_query);
    let mut request =
        url.into_client_request().map_err(|e| format!("cannot build the handshake request: {}", redact_error(&e)))?;
    for (name, value) in &handshake.headers {
        let name: tungstenite::http::HeaderName =
            name.parse().map_err(|_| format!("`{name}` is not a valid header name"))?;
        let value = HeaderValue::from_str(value).map_err(|_| format!("the value of header `{name}` is not valid"))?;
        request.headers_mut().append(name, value);
    }
    let result = tokio::time::timeout_at(deadline, client_async_with_config(request, stream, None))
        .await
        .map_err(|_| format!("the handshake with {addr} did not finish within {:?}", handshake.timeout))?;
    match result {
        Ok((ws, response)) => {
            drop(spare);
            let headers = header_list(response.headers());
            Ok(Outcome::Accepted { conn: spawn(ws, mode), headers })
        }
        Err(tungstenite::Error::Http(response)) => {
            let headers = header_list(response.headers());
            let tail = response.body().clone().unwrap_or_default();
            let body = complete_body(tail, &headers, spare, deadline).await;
            Ok(Outcome::Refused { status: response.status().as_u16(), headers, body })
        }
        Err(e) => Err(format!("the handshake with {addr} failed: {}", redact_error(&e))),
    }
}

/// tungstenite's URL errors may quote the URL, which may hold a token.
fn redact_error(e: &tungstenite::Error) -> String {
    match e {
        tungstenite::Error::Url(_) => "invalid URL".to_string(),
        other => other.to_string(),
    }
}

fn header_list(headers: &tungstenite::http::HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(k, v)| (k.as_str().to_ascii_lowercase(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect()
}

/// Reads the rest of a refusal's body: up to its `Content-Length`, or to EOF without one.
async fn complete_body(
    mut body: Vec<u8>,
    headers: &[(String, String)],
    mut spare: Shared,
    deadline: Instant,
) -> Vec<u8> {
    let want = headers.iter().find(|(k, _)| k == "content-length").and_then(|(_, v)| v.trim().parse::<usize>().ok());
    let mut buf = [0u8; 4096];
    while want.is_none_or(|n| body.len() < n) && body.len() < MAX_REFUSAL_BODY {
        match tokio::time::timeout_at(deadline, spare.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => body.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    if let Some(n) = want {
        body.truncate(n);
    }
    body
}

/// The connection's stream, shared between tungstenite and the harness (see [`connect`]). Only
/// one task polls it at a time, so the lock is never contended.
#[derive(Debug)]
struct Shared(Arc<Mutex<Stream>>);

impl Shared {
    fn with<T>(&self, f: impl FnOnce(Pin<&mut Stream>) -> T) -> T {
        let mut stream = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        f(Pin::new(&mut *stream))
    }
}

impl AsyncRead for Shared {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.with(|s| s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Shared {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.with(|s| s.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.with(|s| s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.with(|s| s.poll_shutdown(cx))
    }
}

fn spawn(ws: WebSocketStream<Shared>, mode: ReadMode) -> Connection {
    let (commands, command_rx) = mpsc::unbounded_channel();
    let (event_tx, events) = mpsc::unbounded_channel();
    let task = tokio::spawn(run(ws, command_rx, event_tx, mode));
    Connection { commands, events, task }
}

/// The task that owns one socket.
async fn run(
    mut ws: WebSocketStream<Shared>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedSender<(Event, Instant)>,
    mode: ReadMode,
) {
    let mut reading = true;
    let mut pause_after_first = mode == ReadMode::PauseAfterFirstFrame;
    let mut ended = false;
    let mut saw_close = false;
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                None => return,
                Some(Command::Reading(on)) => reading = on,
                Some(Command::Send(message, reply)) => {
                    let result = if ended {
                        Err("the connection is closed".to_string())
                    } else {
                        ws.send(message).await.map_err(|e| e.to_string())
                    };
                    let _ = reply.send(result);
                }
            },
            item = ws.next(), if reading && !ended => {
                let event = match item {
                    Some(Ok(Message::Text(text))) => Some(Event::Text(text.to_string())),
                    Some(Ok(Message::Binary(bytes))) => Some(Event::Binary(bytes.to_vec())),
                    Some(Ok(Message::Close(frame))) => {
                        // tungstenite answers the close itself; keep reading until the socket ends.
                        saw_close = true;
                        Some(match frame {
                            Some(f) => Event::Close { code: Some(u16::from(f.code)), reason: f.reason.to_string() },
                            None => Event::Close { code: None, reason: String::new() },
                        })
                    }
                    Some(Ok(_)) => None, // ping, pong: answered by tungstenite
                    Some(Err(e)) => {
                        ended = true;
                        (!saw_close).then(|| Event::Dropped { error: e.to_string() })
                    }
                    None => {
                        ended = true;
                        (!saw_close).then(|| Event::Dropped { error: "end of stream".into() })
                    }
                };
                if let Some(event) = event {
                    let data = matches!(event, Event::Text(_) | Event::Binary(_));
                    let _ = events.send((event, Instant::now()));
                    if data && pause_after_first {
                        pause_after_first = false;
                        reading = false;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    async fn listener() -> (TcpListener, SocketAddr) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        (l, addr)
    }

    fn handshake(addr: SocketAddr) -> Handshake {
        Handshake {
            addr,
            path_and_query: "/ws?token=abc".into(),
            headers: vec![],
            timeout: Duration::from_secs(5),
            tls: None,
            from: None,
        }
    }

    async fn accepted(addr: SocketAddr, mode: ReadMode) -> Connection {
        let Outcome::Accepted { conn, .. } = connect(&handshake(addr), mode).await.unwrap() else { panic!("refused") };
        conn
    }

    /// Reads a request up to the end of its head, and returns it.
    async fn read_head(s: &mut (impl tokio::io::AsyncRead + Unpin)) -> String {
        let mut buf = vec![0u8; 4096];
        let mut got = Vec::new();
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(got).unwrap()
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    /// A refusal whose body arrives in a later TCP segment than its head is read completely.
    #[tokio::test]
    async fn refusal_body_split_from_its_head_is_complete() {
        let (l, addr) = listener().await;
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let request = read_head(&mut s).await;
            let body = br#"{"error":"too_many_requests","reason":"per-IP limit"}"#;
            let head =
                format!("HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\nContent-Length: {}\r\n\r\n", body.len());
            s.write_all(head.as_bytes()).await.unwrap();
            s.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            s.write_all(body).await.unwrap();
            request
        });
        let mut h = handshake(addr);
        h.headers.push(("Origin".into(), "https://app.example.com".into()));
        match connect(&h, ReadMode::Reading).await.unwrap() {
            Outcome::Refused { status, headers, body } => {
                assert_eq!(status, 429);
                assert!(headers.contains(&("retry-after".to_string(), "7".to_string())));
                assert_eq!(body, br#"{"error":"too_many_requests","reason":"per-IP limit"}"#);
            }
            Outcome::Accepted { .. } => panic!("accepted"),
        }
        let request = server.await.unwrap();
        assert!(request.starts_with("GET /ws?token=abc HTTP/1.1\r\n"), "{request}");
        assert!(request.contains("Origin: https://app.example.com\r\n"), "{request}");
    }

    /// Frames, then a close frame with code and reason, arrive in order.
    #[tokio::test]
    async fn forwards_frames_and_the_close_code() {
        let (l, addr) = listener().await;
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(s).await.unwrap();
            ws.send(Message::text("hello")).await.unwrap();
            ws.send(Message::binary(vec![1, 2, 3])).await.unwrap();
            let frame = CloseFrame { code: CloseCode::from(4009), reason: "replaced".into() };
            ws.send(Message::Close(Some(frame))).await.unwrap();
            while let Some(Ok(_)) = ws.next().await {}
        });
        let mut conn = accepted(addr, ReadMode::Reading).await;
        assert_eq!(conn.next_event(soon()).await, Some(Event::Text("hello".into())));
        assert_eq!(conn.next_event(soon()).await, Some(Event::Binary(vec![1, 2, 3])));
        assert_eq!(conn.next_event(soon()).await, Some(Event::Close { code: Some(4009), reason: "replaced".into() }));
    }

    /// A peer that goes away without a close frame is reported as dropped.
    #[tokio::test]
    async fn reports_a_drop_without_close_frame() {
        let (l, addr) = listener().await;
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(s).await.unwrap();
            ws.send(Message::text("welcome")).await.unwrap();
            drop(ws);
        });
        let mut conn = accepted(addr, ReadMode::Reading).await;
        assert_eq!(conn.next_event(soon()).await, Some(Event::Text("welcome".into())));
        assert!(matches!(conn.next_event(soon()).await, Some(Event::Dropped { .. })));
    }

    /// A silent connection takes its welcome, then reads nothing until told to.
    #[tokio::test]
    async fn silent_connection_reads_only_when_resumed() {
        let (l, addr) = listener().await;
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(s).await.unwrap();
            ws.send(Message::text("welcome")).await.unwrap();
            ws.send(Message::text("second")).await.unwrap();
            while let Some(Ok(_)) = ws.next().await {}
        });
        let Outcome::Accepted { mut conn, .. } =
            connect(&handshake(addr), ReadMode::PauseAfterFirstFrame).await.unwrap()
        else {
            panic!("refused")
        };
        assert_eq!(conn.next_event(soon()).await, Some(Event::Text("welcome".into())));
        assert_eq!(conn.next_event(Instant::now() + Duration::from_millis(300)).await, None);
        conn.set_reading(true);
        assert_eq!(conn.next_event(soon()).await, Some(Event::Text("second".into())));
    }

    /// Over TLS (`wss://`, SNI `localhost`): an upgrade with its frames and close code, and a
    /// refusal whose body arrives in a later TLS record than its head, read completely.
    #[tokio::test]
    async fn wss_upgrade_and_refusal() {
        let dir = tempfile::tempdir().unwrap();
        let pair = crate::wire::tls::generate(dir.path(), "test").unwrap();
        let acceptor = crate::wire::tls::tests::acceptor(&pair);
        let (l, addr) = listener().await;
        let server = tokio::spawn(async move {
            // First connection: upgraded.
            let (s, _) = l.accept().await.unwrap();
            let s = acceptor.accept(s).await.unwrap();
            let mut host = String::new();
            // The callback's type is tungstenite's.
            #[allow(clippy::result_large_err)]
            let callback = |req: &tungstenite::handshake::server::Request, resp| {
                host = req.headers()["host"].to_str().unwrap().to_string();
                Ok(resp)
            };
            let mut ws = tokio_tungstenite::accept_hdr_async(s, callback).await.unwrap();
            ws.send(Message::text("welcome")).await.unwrap();
            let frame = CloseFrame { code: CloseCode::from(4010), reason: "bye".into() };
            ws.send(Message::Close(Some(frame))).await.unwrap();
            while let Some(Ok(_)) = ws.next().await {}
            // Second: refused, the body in its own record.
            let (s, _) = l.accept().await.unwrap();
            let mut s = acceptor.accept(s).await.unwrap();
            read_head(&mut s).await;
            let body = br#"{"error":"unauthorized","reason":"no token"}"#;
            let head = format!("HTTP/1.1 401 Unauthorized\r\nContent-Length: {}\r\n\r\n", body.len());
            s.write_all(head.as_bytes()).await.unwrap();
            s.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            s.write_all(body).await.unwrap();
            s.flush().await.unwrap();
            host
        });
        let mut h = handshake(addr);
        h.tls = Some(pair.client.clone());
        let Outcome::Accepted { mut conn, .. } = connect(&h, ReadMode::Reading).await.unwrap() else {
            panic!("refused")
        };
        assert_eq!(conn.next_event(soon()).await, Some(Event::Text("welcome".into())));
        assert_eq!(conn.next_event(soon()).await, Some(Event::Close { code: Some(4010), reason: "bye".into() }));
        match connect(&h, ReadMode::Reading).await.unwrap() {
            Outcome::Refused { status, body, .. } => {
                assert_eq!(status, 401);
                assert_eq!(body, br#"{"error":"unauthorized","reason":"no token"}"#);
            }
            Outcome::Accepted { .. } => panic!("accepted"),
        }
        assert_eq!(server.await.unwrap(), format!("localhost:{}", addr.port()));
    }

    /// The client's close is answered by a conforming server's echo.
    #[tokio::test]
    async fn client_close_gets_the_echo() {
        let (l, addr) = listener().await;
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(s).await.unwrap();
            while let Some(Ok(_)) = ws.next().await {}
        });
        let mut conn = accepted(addr, ReadMode::Reading).await;
        conn.close(1000, "bye", Duration::from_secs(5)).await.unwrap();
        assert_eq!(conn.next_event(soon()).await, Some(Event::Close { code: Some(1000), reason: "bye".into() }));
        assert!(conn.send(Message::text("late"), Duration::from_secs(1)).await.is_err());
    }
}
