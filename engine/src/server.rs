//! Listeners, the accept loop and shutdown. [`serve`] takes its listeners and its shutdown
//! signal from the caller, so tests bind port 0 and stop the server when they like; the CLI
//! passes real sockets and the process's signals.
//!
//! Every accepted connection is one task ([`connection`]): take a place among the handshakes in
//! progress ([`crate::handshaking`]: capped per address and in total, or the socket is closed
//! at once), then within one [`HANDSHAKE_TIMEOUT`] finish TLS (on a `wss://` listener) and read
//! the bounded request head, run the handshake checks, then either answer with a refusal or
//! upgrade, give the handshake place back and run the session. Each task holds a permit of the
//! connection cap and a clone of one "done" sender: when the last clone is gone, every
//! connection has finished and the drain is complete. While draining, new connections still
//! take a permit (or are closed at once), so a drain never holds more than the cap either.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::{Instant, timeout, timeout_at};
use tungstenite::protocol::WebSocketConfig;

use crate::close::Refusal;
use crate::gateway::{Gateway, Phase};
use crate::handshaking::HandshakeSlot;
use crate::http::{self, ReadError};
use crate::policy::compile::MAX_RECONNECT_WINDOW;
use crate::policy::{ConnLimits, Limit};
use crate::session::{self, Session};
use crate::tls::Tls;
use crate::ws::WebSocket;
use crate::{admin, decisions, handshake};

/// A client must finish TLS and send its whole upgrade request within this time of being
/// accepted.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Read buffer per connection. tungstenite's default (128 KiB) would cost that much per idle
/// connection; messages larger than this still arrive, in several reads.
pub const READ_BUFFER_BYTES: usize = 1024;
/// How often emptied reconnect windows are forgotten.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);
/// How long writing a refusal may take.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// The sockets a server listens on.
pub struct Listeners {
    /// The public WebSocket listener.
    pub ws: TcpListener,
    /// The admin listener (metrics, health, admin API); never the public one.
    pub admin: TcpListener,
}

/// Server settings that are not policy.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Most connections held at once (handshaking or upgraded); further clients wait in the
    /// listen backlog.
    pub max_connections: usize,
    /// How long shutdown waits for clients to finish their close handshakes.
    pub drain_timeout: Duration,
    /// TLS for the public listener (`wss://`); `None` serves plaintext.
    pub tls: Option<Arc<Tls>>,
    /// Most connections in their handshake at once, over every address; more are closed at
    /// once (see [`crate::handshaking`]).
    pub max_handshakes: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            max_connections: 50_000,
            drain_timeout: Duration::from_secs(10),
            tls: None,
            max_handshakes: crate::handshaking::DEFAULT_MAX_TOTAL,
        }
    }
}

/// Serves until `shutdown` completes, then drains: every client is sent 1001, new handshakes
/// get 503, and the call returns when all connections are gone or the drain timeout passed.
pub async fn serve(
    listeners: Listeners,
    gw: Arc<Gateway>,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let cap = Arc::new(Semaphore::new(options.max_connections));
    gw.handshaking.set_max_total(options.max_handshakes);
    let admin = tokio::spawn(admin::serve(listeners.admin, gw.clone()));
    let sweeper = tokio::spawn(sweep(gw.clone()));
    let spike = tokio::spawn(watch_spikes(gw.clone()));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = cap.clone().acquire_owned() => permit.expect("the connection cap is never closed"),
        };
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = accept(&listeners.ws) => accepted,
        };
        spawn_connection(stream, peer, &gw, &options, permit, Some(done_tx.clone()));
    }
    tracing::info!("shutting down: draining connections");
    gw.set_phase(Phase::Draining);
    drop(done_tx);
    // While clients finish their close handshakes, new ones still get an answer: 503.
    let drained = timeout(options.drain_timeout, done_rx.recv());
    tokio::pin!(drained);
    loop {
        tokio::select! {
            outcome = &mut drained => {
                if outcome.is_err() {
                    tracing::warn!(timeout = ?options.drain_timeout, "drain timeout: dropping the remaining connections");
                }
                break;
            }
            (stream, peer) = accept(&listeners.ws) => {
                // Answered 503 (after TLS), within the same cap as ever; past it, closed at once.
                if let Ok(permit) = cap.clone().try_acquire_owned() {
                    spawn_connection(stream, peer, &gw, &options, permit, None);
                }
            }
        }
    }
    drop(listeners.ws);
    gw.set_phase(Phase::Closed);
    admin.abort();
    sweeper.abort();
    spike.abort();
    Ok(())
}

/// Runs one accepted connection in its own task, holding its `permit` of the connection cap
/// and (while running, not draining) a clone of the drain's `done` sender until it ends.
fn spawn_connection(
    stream: TcpStream,
    peer: SocketAddr,
    gw: &Arc<Gateway>,
    options: &ServeOptions,
    permit: OwnedSemaphorePermit,
    done: Option<mpsc::Sender<()>>,
) {
    let (gw, tls) = (gw.clone(), options.tls.clone());
    tokio::spawn(async move {
        let _ = stream.set_nodelay(true);
        connection(stream, peer, gw, tls).await;
        drop(permit);
        drop(done);
    });
}

/// How often the handshake rate is compared with `connections.spike`.
pub const SPIKE_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Raises and clears `wsgate_connection_spike` as the handshake rate crosses the policy's
/// threshold.
async fn watch_spikes(gw: Arc<Gateway>) {
    let mut every = tokio::time::interval(SPIKE_CHECK_INTERVAL);
    loop {
        every.tick().await;
        gw.check_spike();
    }
}

/// Forgets reconnect windows that have emptied, so the map holds only recently active users.
async fn sweep(gw: Arc<Gateway>) {
    let mut every = tokio::time::interval(SWEEP_INTERVAL);
    loop {
        every.tick().await;
        // With a CEL window, any user's window may be up to the longest one allowed.
        let per = match &gw.policy().connections.reconnects.per {
            Limit::Literal(per) => *per,
            Limit::Expr { .. } => MAX_RECONNECT_WINDOW,
        };
        gw.reconnects.sweep(Instant::now(), per);
    }
}

/// Accepts the next connection, backing off on errors (such as running out of file
/// descriptors) instead of spinning or giving up.
async fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    let mut backoff = Duration::from_millis(5);
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// One accepted TCP connection, plaintext or TLS: its place among the handshakes is taken
/// before anything is read. The TLS path is boxed: its state (rustls and the TLS stream) would
/// otherwise size the task of every plaintext connection too.
pub async fn connection(stream: TcpStream, peer: SocketAddr, gw: Arc<Gateway>, tls: Option<Arc<Tls>>) {
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let Some(slot) = handshake_slot(&gw, peer) else { return };
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    match tls {
        None => upgrade_and_serve(stream, peer, gw, slot, deadline).await,
        Some(tls) => Box::pin(handle_tls(stream, peer, gw, &tls, slot, deadline)).await,
    }
}

/// The TLS handshake of a connection on a TLS listener (by `deadline`, which the request head
/// shares), then the WebSocket handshake. A failed TLS handshake is counted and logged,
/// nothing more.
async fn handle_tls(
    stream: TcpStream,
    peer: SocketAddr,
    gw: Arc<Gateway>,
    tls: &Tls,
    slot: HandshakeSlot,
    deadline: Instant,
) {
    match timeout_at(deadline, tls.acceptor().accept(stream)).await {
        Ok(Ok(stream)) => upgrade_and_serve(stream, peer, gw, slot, deadline).await,
        Ok(Err(e)) => {
            gw.metrics.tls_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(ip = %peer.ip(), error = %e, "TLS handshake failed");
        }
        Err(_) => {
            gw.metrics.tls_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(ip = %peer.ip(), "TLS handshake timed out");
        }
    }
}

/// A connection's place among the handshakes in progress, or `None` (it is then closed
/// unanswered): its address or the whole server is at its cap.
fn handshake_slot(gw: &Gateway, peer: SocketAddr) -> Option<HandshakeSlot> {
    let slot = gw.handshaking.acquire(peer.ip());
    if slot.is_none() {
        tracing::debug!(ip = %peer.ip(), "too many handshakes in progress: closed unanswered");
    }
    slot
}

/// One connection over any stream (in-process tests use this): handshake, then the session or
/// a refusal. The handshake place is taken here.
pub async fn handle<S>(stream: S, peer: SocketAddr, gw: Arc<Gateway>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let Some(slot) = handshake_slot(&gw, peer) else { return };
    upgrade_and_serve(stream, peer, gw, slot, Instant::now() + HANDSHAKE_TIMEOUT).await;
}

/// The WebSocket handshake, then the session. The handshake's state is boxed, so it is freed
/// when the session starts instead of sizing the task of every long-lived connection; so is
/// the handshake place.
async fn upgrade_and_serve<S>(stream: S, peer: SocketAddr, gw: Arc<Gateway>, slot: HandshakeSlot, deadline: Instant)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let session = Box::pin(handshake(stream, peer, gw, deadline)).await;
    drop(slot);
    if let Some(session) = session {
        session.run().await;
    }
}

/// Reads and checks the upgrade request; answers a refusal, or upgrades and opens the session.
async fn handshake<S>(mut stream: S, peer: SocketAddr, gw: Arc<Gateway>, deadline: Instant) -> Option<Box<Session<S>>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut request = match http::read_request(&mut stream, deadline.saturating_duration_since(Instant::now())).await {
        Ok(r) => r,
        Err(ReadError::TooLarge) => {
            let _ = timeout(
                REFUSAL_WRITE_TIMEOUT,
                http::write_refusal(&mut stream, 431, "bad_request", "request head too large", &[]),
            )
            .await;
            return None;
        }
        Err(ReadError::Malformed | ReadError::LengthRequired) => {
            let refusal = Refusal::BadRequest("malformed HTTP request");
            let _ = timeout(REFUSAL_WRITE_TIMEOUT, refuse(&mut stream, &refusal)).await;
            return None;
        }
        Err(ReadError::Closed | ReadError::TimedOut) => return None,
    };
    let started = Instant::now();
    if request.path == handshake::WS_PATH {
        gw.record_handshake();
    }
    let admitted = match handshake::check(&gw, &request, peer, started).await {
        Ok(admitted) => admitted,
        Err(refused) => {
            if refused.refusal == Refusal::NotFound {
                gw.metrics.handshake(refused.refusal.error());
                tracing::debug!(ip = %peer.ip(), "no such path");
            } else {
                decisions::handshake_refused(&gw.metrics, &refused, peer.ip());
            }
            let _ = timeout(REFUSAL_WRITE_TIMEOUT, refuse(&mut stream, &refused.refusal)).await;
            gw.metrics.handshake_duration.observe(started.elapsed());
            return None;
        }
    };
    if handshake::accept(&mut stream, &admitted).await.is_err() {
        gw.metrics.handshake("aborted");
        return None;
    }
    gw.metrics.handshake("accepted");
    gw.metrics.handshake_duration.observe(started.elapsed());
    let config = ws_config(&admitted.limits);
    // Frames the client sent right after its request; the rest of the request is freed.
    let early = std::mem::take(&mut request.rest);
    drop(request);
    let ws = WebSocket::from_partially_read(stream, early, config);
    Some(session::open(ws, admitted, gw))
}

async fn refuse<S: AsyncWrite + Unpin>(stream: &mut S, refusal: &Refusal) -> std::io::Result<()> {
    let retry_after = match refusal {
        Refusal::TooMany { retry_after_secs, .. } => vec![("retry-after", retry_after_secs.to_string())],
        _ => vec![],
    };
    http::write_refusal(stream, refusal.status(), refusal.error(), &refusal.reason(), &retry_after).await
}

/// WebSocket settings for a connection: size limits from the policy (a fragmented message
/// counts as a whole), small buffers.
pub fn ws_config(limits: &ConnLimits) -> WebSocketConfig {
    let max = usize::try_from(limits.max_bytes).unwrap_or(usize::MAX);
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(0)
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
}
