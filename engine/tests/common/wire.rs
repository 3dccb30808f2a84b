//! A raw WebSocket client over a real TCP socket: it writes exactly the bytes a test says
//! (fragments, floods, pings it never reads the answers to) and reads the server's frames by
//! hand, so a test sees what the kernel delivered — a close frame, or a reset that destroyed it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use wsgate::gateway::Gateway;
use wsgate::server::{Listeners, ServeOptions};

/// A server on real loopback sockets, stopped when dropped.
pub struct TcpServer {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<()>,
}

impl TcpServer {
    pub async fn start(gw: Arc<Gateway>, options: ServeOptions) -> TcpServer {
        let ws = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (addr, admin_addr) = (ws.local_addr().unwrap(), admin.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            wsgate::serve(Listeners { ws, admin }, gw, options, shutdown).await.unwrap();
        });
        TcpServer { addr, admin: admin_addr, stop: Some(stop), task }
    }

    /// Starts the drain (as SIGTERM would).
    pub fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.shutdown();
        self.task.abort();
    }
}

/// A client frame (RFC 6455 §5.2), masked with a fixed mask.
pub fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut frame = vec![(u8::from(fin) << 7) | opcode];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n if n <= 0xffff => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// One text message of `len` bytes as frames of `piece` bytes each (a first frame, then
/// continuations, the last one final).
pub fn fragments(len: usize, piece: usize) -> Vec<Vec<u8>> {
    let payload = vec![b'a'; len];
    let pieces: Vec<&[u8]> = payload.chunks(piece).collect();
    let last = pieces.len() - 1;
    pieces.iter().enumerate().map(|(i, chunk)| client_frame(i == last, if i == 0 { 1 } else { 0 }, chunk)).collect()
}

/// A client connection after a successful upgrade.
pub struct RawClient {
    pub stream: TcpStream,
    /// Bytes read past what was parsed.
    buf: Vec<u8>,
}

/// What the client saw of the connection's end.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    /// A close frame with this code.
    Close(u16),
    /// The connection ended without a close frame (what a browser reports as 1006).
    Abnormal(String),
}

impl RawClient {
    /// Upgrades with `token` in the query; panics unless the answer is 101.
    pub async fn connect(addr: SocketAddr, token: &str) -> RawClient {
        RawClient::upgrade(TcpStream::connect(addr).await.unwrap(), token).await
    }

    /// As [`connect`](Self::connect), with a receive buffer of a few KiB (no autotuning): a
    /// client that does not read then stops taking data at once, not after megabytes.
    pub async fn connect_small_window(addr: SocketAddr, token: &str) -> RawClient {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        RawClient::upgrade(socket.connect(addr).await.unwrap(), token).await
    }

    async fn upgrade(mut stream: TcpStream, token: &str) -> RawClient {
        let request = format!(
            "GET /ws?token={token} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let end = loop {
            let mut chunk = [0u8; 1024];
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed during the upgrade");
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        buf.drain(..end);
        RawClient { stream, buf }
    }

    /// Writes `frames` one write each, as a client streaming a message does: the first `at_once`
    /// back to back, the rest 1 ms apart (a client still sending while the server decides). A
    /// failed write (the server reset the connection) is the end a browser reports as 1006.
    pub async fn send_each(&mut self, frames: &[Vec<u8>], at_once: usize) -> Result<(), Seen> {
        for (i, frame) in frames.iter().enumerate() {
            if i >= at_once {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            if let Err(e) = self.stream.write_all(frame).await {
                return Err(Seen::Abnormal(format!("write failed: {e}")));
            }
        }
        Ok(())
    }

    /// The next server frame: (opcode, payload). `Err` when the connection ended or failed first.
    pub async fn frame(&mut self) -> Result<(u8, Vec<u8>), String> {
        loop {
            if let Some((opcode, payload, used)) = parse(&self.buf) {
                self.buf.drain(..used);
                return Ok((opcode, payload));
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk).await {
                Ok(0) => return Err("EOF".into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// Reads until the server's close frame, answers it as a browser does, and checks that the
    /// server then ends the connection cleanly (EOF, no reset).
    pub async fn close_seen(&mut self, within: Duration) -> Seen {
        let seen = tokio::time::timeout(within, async {
            loop {
                match self.frame().await {
                    Ok((8, payload)) => {
                        let code = payload.get(..2).map_or(1005, |c| u16::from_be_bytes([c[0], c[1]]));
                        return Seen::Close(code);
                    }
                    Ok(_) => continue,
                    Err(e) => return Seen::Abnormal(e),
                }
            }
        })
        .await
        .unwrap_or_else(|_| Seen::Abnormal("no close frame in time".into()));
        if let Seen::Close(code) = seen {
            let _ = self.stream.write_all(&client_frame(true, 8, &code.to_be_bytes())).await;
            let mut rest = [0u8; 4096];
            let end = tokio::time::timeout(within, async {
                loop {
                    match self.stream.read(&mut rest).await {
                        Ok(0) => return Ok(()),
                        Ok(_) => continue,
                        Err(e) => return Err(e.to_string()),
                    }
                }
            })
            .await;
            match end {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Seen::Abnormal(format!("after the close frame: {e}")),
                Err(_) => return Seen::Abnormal("the server did not end the connection after the close".into()),
            }
        }
        seen
    }
}

/// A whole unmasked server frame at the start of `buf`: (opcode, payload, bytes used).
fn parse(buf: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let opcode = buf[0] & 0x0f;
    let (len, at) = match buf[1] & 0x7f {
        126 => (u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]) as usize, 4),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize, 10),
        n => (n as usize, 2),
    };
    let payload = buf.get(at..at + len)?.to_vec();
    Some((opcode, payload, at + len))
}
