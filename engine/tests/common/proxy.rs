//! A TCP proxy in front of Redis that can wedge subscription connections: after
//! [`Proxy::wedge_subscriptions`], the connections that have sent a SUBSCRIBE (or SSUBSCRIBE) so far stay open
//! but get nothing more from Redis — what a half-dead connection after a failover looks like
//! to a client. Connections opened later pass through.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct Proxy {
    pub port: u16,
    /// Connections numbered below this that subscribed get nothing more.
    wedged_below: Arc<AtomicU64>,
    /// Connections opened so far.
    opened: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let wedged_below = Arc::new(AtomicU64::new(0));
        let opened = Arc::new(AtomicU64::new(0));
        let (wedged, count) = (wedged_below.clone(), opened.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else { continue };
                let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::spawn(pump(n, client, server, wedged.clone()));
            }
        });
        Proxy { port, wedged_below, opened, task }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Wedges the subscription connections open now; later ones pass through.
    pub fn wedge_subscriptions(&self) {
        self.wedged_below.store(self.opened.load(Ordering::SeqCst) + 1, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(n: u64, client: TcpStream, server: TcpStream, wedged_below: Arc<AtomicU64>) {
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    let subscriber = Arc::new(AtomicBool::new(false));
    let marks = subscriber.clone();
    let up = tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(read) = from_client.read(&mut buf).await {
            if read == 0 {
                break;
            }
            if buf[..read].windows(9).any(|w| w.eq_ignore_ascii_case(b"SUBSCRIBE")) {
                marks.store(true, Ordering::SeqCst);
            }
            if to_server.write_all(&buf[..read]).await.is_err() {
                break;
            }
        }
    });
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(read) = from_server.read(&mut buf).await {
        if read == 0 {
            break;
        }
        if subscriber.load(Ordering::SeqCst) && n < wedged_below.load(Ordering::SeqCst) {
            continue; // wedged: swallowed
        }
        if to_client.write_all(&buf[..read]).await.is_err() {
            break;
        }
    }
    up.abort();
}
