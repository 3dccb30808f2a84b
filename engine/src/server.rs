//! Listeners, the accept loop and shutdown. [`serve`] takes its listeners and its shutdown
//! signal from the caller, so tests bind port 0 and stop the server when they like; the CLI
//! passes real sockets and the process's signals.
//!
//! Every accepted connection is one task ([`connection`]): take a place among the handshakes in
//! progress ([`crate::limits::handshaking`]: capped per address and in total, or the socket is closed
//! at once), then within one [`HANDSHAKE_TIMEOUT`] finish TLS (on a `wss://` listener) and read
//! the bounded request head, run the handshake checks, then either answer with a refusal or
//! upgrade, give the handshake place back and run the session. Each task holds a permit of the
//! connection cap and a clone of one "done" sender: when the last clone is gone, every
//! connection has finished and the drain is complete. While draining, new connections still
//! take a permit (or are closed at once), so a drain never holds more than the cap either.
//! Behind load balancers ([`crate::proxy`]) a peer the listener does not serve is closed before
//! it takes a place, and on a `--proxy-protocol` listener the PROXY header comes first, before
//! TLS.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::{Instant, timeout, timeout_at};

use crate::gateway::Gateway;
use crate::handshake::{self, HANDSHAKE_TIMEOUT};
use crate::lifecycle::Phase;
use crate::limits::handshaking::HandshakeSlot;
use crate::limits::upkeep;
use crate::proxy::protocol;
use crate::tls::Tls;
use crate::{admin, drain, session};

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
    /// How long after the shutdown signal everything goes on but `/readyz` (503), before the
    /// drain starts (`--drain-delay`).
    pub drain_delay: Duration,
    /// TLS for the public listener (`wss://`); `None` serves plaintext.
    pub tls: Option<Arc<Tls>>,
    /// Most connections in their handshake at once, over every address; more are closed at
    /// once (see [`crate::limits::handshaking`]).
    pub max_handshakes: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            max_connections: 50_000,
            drain_timeout: Duration::from_secs(10),
            drain_delay: Duration::ZERO,
            tls: None,
            max_handshakes: crate::limits::handshaking::DEFAULT_MAX_TOTAL,
        }
    }
}

/// Serves until `shutdown` completes; then, for `drain_delay`, goes on serving with `/readyz` at
/// 503; then drains: new handshakes get 503, every client is sent 1001 (paced, see
/// [`crate::drain`]), and the call returns when all connections are gone or the drain timeout
/// passed.
pub async fn serve(
    listeners: Listeners,
    gw: Arc<Gateway>,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let cap = Arc::new(Semaphore::new(options.max_connections));
    gw.limits.handshaking.set_max_total(options.max_handshakes);
    let admin = tokio::spawn(admin::serve(listeners.admin, gw.clone()));
    let upkeep = tokio::spawn(upkeep::run(gw.limits.clone(), gw.policy.clone()));
    let accepting = Accepting { listener: &listeners.ws, cap: &cap, gw: &gw, options: &options, done: &done_tx };
    accepting.until(shutdown).await;
    if !options.drain_delay.is_zero() {
        tracing::info!(delay = ?options.drain_delay, "shutting down: /readyz answers 503, serving on until the drain delay has passed");
        gw.lifecycle.set(Phase::Leaving);
        accepting.until(tokio::time::sleep(options.drain_delay)).await;
    }
    tracing::info!("shutting down: draining connections");
    gw.lifecycle.set(Phase::Draining);
    // Listed after the phase changed: a session that starts later closes by itself.
    let closing = tokio::spawn(drain::close_all(gw.registry.clone(), options.drain_timeout));
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
    closing.abort();
    drop(listeners.ws);
    gw.lifecycle.set(Phase::Closed);
    admin.abort();
    upkeep.abort();
    Ok(())
}

/// The accept loop of a serving server: each connection waits for a permit of the cap, then is
/// accepted and run in its own task, holding a clone of the drain's `done` sender.
struct Accepting<'a> {
    listener: &'a TcpListener,
    cap: &'a Arc<Semaphore>,
    gw: &'a Arc<Gateway>,
    options: &'a ServeOptions,
    done: &'a mpsc::Sender<()>,
}

impl Accepting<'_> {
    /// Accepts and serves connections until `stop` completes.
    async fn until(&self, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            let permit = tokio::select! {
                () = &mut stop => return,
                permit = self.cap.clone().acquire_owned() => permit.expect("the connection cap is never closed"),
            };
            let (stream, peer) = tokio::select! {
                () = &mut stop => return,
                accepted = accept(self.listener) => accepted,
            };
            spawn_connection(stream, peer, self.gw, self.options, permit, Some(self.done.clone()));
        }
    }
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
/// before anything is read. With proxies configured ([`crate::proxy`]), a peer the listener does
/// not serve is closed first, and on a `--proxy-protocol` listener the PROXY header is read
/// (before TLS) within the same deadline. The TLS path is boxed: its state (rustls and the TLS
/// stream) would otherwise size the task of every plaintext connection too.
pub async fn connection(mut stream: TcpStream, peer: SocketAddr, gw: Arc<Gateway>, tls: Option<Arc<Tls>>) {
    let peer = canonical(peer);
    let proxies = &gw.options.proxies;
    if !proxies.serves(peer.ip()) {
        gw.metrics.proxy_untrusted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::debug!(ip = %peer.ip(), "not a trusted proxy: closed at once");
        return;
    }
    let Some(slot) = handshake_slot(&gw, peer) else { return };
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let peer = if proxies.protocol {
        match timeout_at(deadline, protocol::read_header(&mut stream)).await {
            Ok(Ok(header)) => header.source().map_or(peer, canonical),
            Ok(Err(e)) => {
                gw.metrics.proxy_no_header.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::debug!(ip = %peer.ip(), error = %e, "no valid PROXY protocol header: closed");
                return;
            }
            Err(_) => {
                gw.metrics.proxy_no_header.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::debug!(ip = %peer.ip(), "no PROXY protocol header in time: closed");
                return;
            }
        }
    } else {
        peer
    };
    match tls {
        None => upgrade_and_serve(stream, peer, false, gw, slot, deadline).await,
        Some(tls) => Box::pin(handle_tls(stream, peer, gw, &tls, slot, deadline)).await,
    }
}

/// An address with an IPv4-mapped IPv6 address as IPv4.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
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
        Ok(Ok(stream)) => upgrade_and_serve(stream, peer, true, gw, slot, deadline).await,
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
/// unanswered): its address or the whole server is at its cap. A trusted proxy, which carries
/// many clients, is held to the total only.
fn handshake_slot(gw: &Gateway, peer: SocketAddr) -> Option<HandshakeSlot> {
    let slot = if gw.options.proxies.is_trusted(peer.ip()) {
        gw.limits.handshaking.acquire_for_proxy()
    } else {
        gw.limits.handshaking.acquire(peer.ip())
    };
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
    let peer = canonical(peer);
    let Some(slot) = handshake_slot(&gw, peer) else { return };
    upgrade_and_serve(stream, peer, false, gw, slot, Instant::now() + HANDSHAKE_TIMEOUT).await;
}

/// The WebSocket handshake, then the session. The handshake's state is boxed, so it is freed
/// when the session starts instead of sizing the task of every long-lived connection; so is
/// the handshake place.
async fn upgrade_and_serve<S>(
    stream: S,
    peer: SocketAddr,
    tls: bool,
    gw: Arc<Gateway>,
    slot: HandshakeSlot,
    deadline: Instant,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let Some((ws, admitted)) = Box::pin(handshake::upgrade(stream, peer, tls, &gw, deadline)).await else { return };
    let session = session::open(ws, admitted, gw);
    drop(slot);
    session.run().await;
}
