//! WebSocket framing over an async byte stream, driven from the connection's own task.
//!
//! tungstenite's [`WebSocketContext`] is the protocol state machine; it reads and writes
//! through whatever `Read + Write` it is handed per call. Here that is the socket borrowed
//! together with the task's [`Context`], so "would block" means "registered for a wake-up"
//! and nothing has to be stored between polls. Owning this layer (instead of
//! tokio-tungstenite's stream) lets a policy reload change a live connection's frame and
//! message limits ([`WebSocket::set_max_bytes`]), which tokio-tungstenite cannot.
//!
//! Only the server side of an upgrade this crate answered itself is supported, and one task
//! drives each connection (there is no split into halves).
//!
//! Closing: after the server's close frame, [`WebSocket::close_within`] keeps reading and
//! discarding raw bytes until the peer's close frame, EOF or a deadline, then shuts down the
//! write side. Dropping a socket with unread input makes the kernel answer with a reset, which
//! can destroy the close frame still in flight (a browser then reports 1006, not the code sent),
//! and a client still streaming a message is exactly one with unread input. To find the peer's
//! close in a stream the protocol may have given up on (a message over the limit stops it
//! mid-frame), [`InboundFrames`] follows the frame boundaries of every byte read from the
//! socket: headers only, never payloads.

use std::future::poll_fn;
use std::io::{self, Read, Write};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{Instant, timeout_at};
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig, WebSocketContext};
use tungstenite::{Error, Message};

/// What may wait in the write buffer beyond the frame being written. Our own frames are written
/// one at a time, each flushed before the next; only the pongs tungstenite queues by itself for
/// the peer's pings can pile up behind them. A peer that makes the server owe it more than this
/// in pongs without reading them is a slow consumer: its next read fails with
/// [`Error::WriteBufferFull`]. So the buffer holds at most the frame being written, this, and a
/// close frame.
pub const WRITE_SLACK_BYTES: usize = 64 * 1024;

/// Bytes of a frame's header, at most (what a payload costs in the write buffer beyond itself).
const MAX_HEADER_BYTES: usize = 14;

/// One server-side WebSocket connection.
pub struct WebSocket<S> {
    stream: S,
    protocol: WebSocketContext,
    /// Frame boundaries of what the peer sent, so a close can find the peer's answer.
    inbound: InboundFrames,
    /// Bytes of pongs answering the peer's pings that could not be written yet (an upper
    /// bound): tungstenite queues them by itself, so this is where a peer that pings and never
    /// reads shows, and what bounds the write buffer.
    pongs_owed: usize,
    /// The connection is over: it was closed or failed, and the error was already returned.
    ended: bool,
}

impl<S> WebSocket<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// A connection whose upgrade has been answered; `early` holds bytes read after the
    /// request head (a client may send its first frames right behind it).
    pub fn from_partially_read(stream: S, early: Vec<u8>, config: WebSocketConfig) -> WebSocket<S> {
        let mut inbound = InboundFrames::default();
        inbound.feed(&early);
        WebSocket {
            stream,
            protocol: WebSocketContext::from_partially_read(
                early,
                Role::Server,
                // Frames go straight to the socket (no write-behind buffer).
                Some(config.write_buffer_size(0)),
            ),
            inbound,
            pongs_owed: 0,
            ended: false,
        }
    }

    /// Sets the largest message and frame accepted from now on; a larger one fails the read
    /// with [`Error::Capacity`] before its payload is buffered.
    pub fn set_max_bytes(&mut self, max_bytes: usize) {
        self.protocol.set_config(|c| {
            c.max_message_size = Some(max_bytes);
            c.max_frame_size = Some(max_bytes);
        });
    }

    /// The largest message currently accepted.
    #[cfg(test)]
    pub fn max_bytes(&self) -> Option<usize> {
        self.protocol.get_config().max_message_size
    }

    /// The next message; `None` once the connection is over. Answers pings and echoes the
    /// client's close by itself. Cancel-safe: a partly read frame stays buffered.
    pub async fn next(&mut self) -> Option<Result<Message, Error>> {
        poll_fn(|cx| self.poll_next(cx)).await
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Message, Error>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match self.io(cx, |protocol, io| protocol.read(io)) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Message::Ping(payload))) => {
                // tungstenite has queued the pong; see whether the peer takes it.
                match self.poll_flush(cx) {
                    Poll::Ready(Ok(())) => self.pongs_owed = 0,
                    Poll::Ready(Err(_)) => {}
                    Poll::Pending => {
                        self.pongs_owed += payload.len() + MAX_HEADER_BYTES;
                        if self.pongs_owed > WRITE_SLACK_BYTES {
                            self.ended = true;
                            return Poll::Ready(Some(Err(Error::WriteBufferFull(Box::new(Message::Ping(payload))))));
                        }
                    }
                }
                Poll::Ready(Some(Ok(Message::Ping(payload))))
            }
            Poll::Ready(Ok(message)) => Poll::Ready(Some(Ok(message))),
            Poll::Ready(Err(e)) => {
                self.ended = true;
                match e {
                    Error::ConnectionClosed | Error::AlreadyClosed => Poll::Ready(None),
                    e => Poll::Ready(Some(Err(e))),
                }
            }
        }
    }

    /// Sends one message and flushes it.
    #[cfg(test)]
    pub async fn send(&mut self, message: Message) -> Result<(), Error> {
        self.queue(message).await?;
        self.flush().await
    }

    /// Puts one message in the write buffer and writes what the socket takes at once; the
    /// rest goes out with [`flush`](Self::flush), which must complete before the next message
    /// is queued (see [`WRITE_SLACK_BYTES`]).
    pub async fn queue(&mut self, message: Message) -> Result<(), Error> {
        let mut message = Some(message);
        poll_fn(|cx| {
            let Some(message) = message.take() else { return Poll::Ready(Ok(())) };
            match self.io(cx, |protocol, io| protocol.write(io, message)) {
                // The frame is queued; the socket is full for now.
                Poll::Pending => Poll::Ready(Ok(())),
                done => done,
            }
        })
        .await
    }

    /// Writes out everything queued, including automatic pong and close replies. Cancel-safe:
    /// what is not written yet stays queued.
    pub async fn flush(&mut self) -> Result<(), Error> {
        poll_fn(|cx| self.poll_flush(cx)).await
    }

    /// Flushes what the socket takes now, without waiting: `Pending` means some is still
    /// buffered, and [`flush`](Self::flush) waits for it.
    pub fn try_flush(&mut self) -> Poll<Result<(), Error>> {
        self.poll_flush(&mut Context::from_waker(std::task::Waker::noop()))
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let flushed = match self.io(cx, |protocol, io| protocol.flush(io)) {
            // The close handshake just completed: nothing more to write, not an error.
            Poll::Ready(Err(Error::ConnectionClosed)) => Poll::Ready(Ok(())),
            other => other,
        };
        if let Poll::Ready(Ok(())) = flushed {
            self.pongs_owed = 0;
        }
        flushed
    }

    /// Starts the close handshake with `frame` and writes it out. The client's answer
    /// arrives through [`next`](Self::next).
    pub async fn close(&mut self, frame: Option<CloseFrame>) -> Result<(), Error> {
        let mut frame = Some(frame);
        poll_fn(|cx| {
            if let Some(frame) = frame.take() {
                match self.io(cx, |protocol, io| protocol.close(io, frame)) {
                    Poll::Ready(Err(Error::ConnectionClosed)) => return Poll::Ready(Ok(())),
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(())) | Poll::Pending => {}
                }
            }
            self.poll_flush(cx)
        })
        .await
    }

    /// Closes within `within`: sends `frame` — or, after the peer's close, writes out the echo
    /// tungstenite queued — then ends the connection as [`finish_close`](Self::finish_close)
    /// does. A peer that takes nothing is given up on at the deadline.
    pub async fn close_within(&mut self, frame: Option<CloseFrame>, within: std::time::Duration) {
        let deadline = Instant::now() + within;
        if let Ok(Ok(())) = timeout_at(deadline, self.close(frame)).await {
            self.finish_close(deadline).await;
        }
    }

    /// Ends the connection after a close frame was sent (or the peer's was echoed): reads and
    /// discards what the peer still sends until its close frame has arrived, it closed its side,
    /// the socket failed or `deadline` passed; then shuts down the write side (for TLS, after a
    /// `close_notify`). Nothing read here is decoded beyond frame headers, buffered or acted on.
    async fn finish_close(&mut self, deadline: Instant) {
        let mut discard = [0u8; 512];
        while !self.inbound.closed {
            match timeout_at(deadline, self.stream.read(&mut discard)).await {
                Ok(Ok(n)) if n > 0 => self.inbound.feed(&discard[..n]),
                _ => break,
            }
        }
        self.ended = true;
        let _ = timeout_at(deadline, self.stream.shutdown()).await;
    }

    /// Runs one protocol call over the socket, with "would block" turned into `Pending`.
    fn io<T>(
        &mut self,
        cx: &mut Context<'_>,
        call: impl FnOnce(&mut WebSocketContext, &mut Io<'_, '_, S>) -> Result<T, Error>,
    ) -> Poll<Result<T, Error>> {
        let mut io = Io { stream: &mut self.stream, inbound: &mut self.inbound, cx };
        match call(&mut self.protocol, &mut io) {
            Err(Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => Poll::Pending,
            other => Poll::Ready(other),
        }
    }
}

/// The socket as blocking-style I/O for one call: `Pending` becomes `WouldBlock`, with the
/// task registered to be woken when the socket is ready.
struct Io<'a, 'b, S> {
    stream: &'a mut S,
    /// Sees every byte read.
    inbound: &'a mut InboundFrames,
    cx: &'a mut Context<'b>,
}

impl<S: AsyncRead + Unpin> Read for Io<'_, '_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut buf = ReadBuf::new(buf);
        match Pin::new(&mut *self.stream).poll_read(self.cx, &mut buf) {
            Poll::Ready(Ok(())) => {
                self.inbound.feed(buf.filled());
                Ok(buf.filled().len())
            }
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl<S: AsyncWrite + Unpin> Write for Io<'_, '_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match Pin::new(&mut *self.stream).poll_write(self.cx, buf) {
            Poll::Ready(result) => result,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match Pin::new(&mut *self.stream).poll_flush(self.cx) {
            Poll::Ready(result) => result,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

/// Follows the frame boundaries of the bytes a peer sends (RFC 6455 §5.2): a header is
/// collected, its payload skipped by count. Only the opcode and length of each header are
/// looked at; `closed` turns true once a whole close frame has gone by. A stream that is not
/// valid WebSocket framing only makes `closed` wrong, and a close then waits for EOF or its
/// deadline instead.
#[derive(Debug, Default)]
struct InboundFrames {
    /// The header of the frame being read, while it is incomplete (at most 14 bytes).
    header: [u8; 14],
    /// How many bytes of `header` have arrived.
    have: u8,
    /// Payload bytes of the current frame still to come.
    remaining: u64,
    /// The current frame is a close frame.
    in_close: bool,
    /// A whole close frame has arrived.
    closed: bool,
}

impl InboundFrames {
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.remaining > 0 {
                let skip = usize::try_from(self.remaining).map_or(bytes.len(), |r| r.min(bytes.len()));
                bytes = &bytes[skip..];
                self.remaining -= skip as u64;
                self.closed |= self.remaining == 0 && self.in_close;
                continue;
            }
            let need = self.header_len();
            let take = (need - usize::from(self.have)).min(bytes.len());
            let at = usize::from(self.have);
            self.header[at..at + take].copy_from_slice(&bytes[..take]);
            self.have += take as u8;
            bytes = &bytes[take..];
            // The length byte can make the header longer than first thought.
            if usize::from(self.have) == need && need == self.header_len() {
                self.start_payload();
            }
        }
    }

    /// The current header's length: 2 until the second byte says more.
    fn header_len(&self) -> usize {
        if self.have < 2 {
            return 2;
        }
        let mask = if self.header[1] & 0x80 != 0 { 4 } else { 0 };
        let extended = match self.header[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        2 + extended + mask
    }

    fn start_payload(&mut self) {
        let len = match self.header[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([self.header[2], self.header[3]])),
            127 => u64::from_be_bytes(self.header[2..10].try_into().unwrap_or_default()),
            n => u64::from(n),
        };
        self.in_close = self.header[0] & 0x0f == 0x8;
        self.remaining = len;
        self.have = 0;
        self.closed |= len == 0 && self.in_close;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    /// A masked client frame (RFC 6455 §5.2) with a zero mask, so the payload reads as is.
    fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![0x80 | opcode];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
        }
        frame.extend_from_slice(&[0, 0, 0, 0]);
        frame.extend_from_slice(payload);
        frame
    }

    #[test]
    fn inbound_frames_find_the_close_however_the_bytes_are_split() {
        let mut stream = Vec::new();
        stream.extend(client_frame(1, &[b'x'; 300]));
        stream.extend(client_frame(9, b""));
        stream.extend(client_frame(0, &[b'y'; 70_000][..65_535]));
        let close_at = stream.len();
        stream.extend(client_frame(8, &[0x03, 0xE8]));
        for piece in [1, 2, 3, 7, 13, 100, 4096, stream.len()] {
            let mut frames = InboundFrames::default();
            for (i, chunk) in stream.chunks(piece).enumerate() {
                let before = frames.closed;
                frames.feed(chunk);
                let end = ((i + 1) * piece).min(stream.len());
                assert_eq!(
                    frames.closed,
                    end == stream.len(),
                    "piece {piece}, after {end} bytes (close at {close_at})"
                );
                assert!(!before || frames.closed);
            }
        }
    }

    #[test]
    fn inbound_frames_skip_a_64_bit_length_without_buffering_it() {
        let mut frames = InboundFrames::default();
        // A header claiming a 5 GB payload: only counted, never stored.
        let mut header = vec![0x81, 0x80 | 127];
        header.extend_from_slice(&5_000_000_000u64.to_be_bytes());
        header.extend_from_slice(&[0, 0, 0, 0]);
        frames.feed(&header);
        frames.feed(&[0u8; 4096]);
        assert_eq!(frames.remaining, 5_000_000_000 - 4096);
        assert!(!frames.closed);
    }

    #[tokio::test]
    async fn finish_close_discards_what_the_peer_still_sends_until_its_close() {
        let (server, mut client) = duplex(256);
        let mut ws = WebSocket::from_partially_read(server, Vec::new(), config(1024));
        ws.close(Some(CloseFrame { code: 1009.into(), reason: "".into() })).await.unwrap();
        let writer = tokio::spawn(async move {
            // Far more than the pipe holds: only a server that keeps reading lets this finish.
            for _ in 0..100 {
                client.write_all(&client_frame(1, &[b'a'; 100])).await.unwrap();
            }
            client.write_all(&client_frame(8, &[0x03, 0xF1])).await.unwrap();
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).await.unwrap();
            rest
        });
        ws.finish_close(Instant::now() + std::time::Duration::from_secs(5)).await;
        let rest = writer.await.unwrap();
        assert_eq!(&rest[..2], &[0x88, 2], "the close frame, then EOF");
        assert_eq!(ws.next().await.map(|r| r.is_ok()), None, "the connection is over");
    }

    fn config(max: usize) -> WebSocketConfig {
        WebSocketConfig::default().max_message_size(Some(max)).max_frame_size(Some(max))
    }

    #[tokio::test]
    async fn reads_early_bytes_then_the_socket_and_answers_pings() {
        let (server, mut client) = duplex(4096);
        let mut ws = WebSocket::from_partially_read(server, client_frame(1, b"first"), config(1024));
        client.write_all(&client_frame(9, b"p")).await.unwrap();
        client.write_all(&client_frame(1, b"second")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("first"));
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::Ping("p".into()));
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("second"));
        ws.flush().await.unwrap();
        let mut pong = [0u8; 3];
        client.read_exact(&mut pong).await.unwrap();
        assert_eq!(pong, [0x8A, 1, b'p']);
    }

    #[tokio::test]
    async fn a_lowered_limit_refuses_the_next_larger_message() {
        let (server, mut client) = duplex(8192);
        let mut ws = WebSocket::from_partially_read(server, Vec::new(), config(4096));
        client.write_all(&client_frame(1, &[b'a'; 2000])).await.unwrap();
        assert!(matches!(ws.next().await, Some(Ok(Message::Text(t))) if t.len() == 2000));
        ws.set_max_bytes(1024);
        assert_eq!(ws.max_bytes(), Some(1024));
        client.write_all(&client_frame(1, &[b'a'; 2000])).await.unwrap();
        assert!(matches!(ws.next().await, Some(Err(Error::Capacity(_)))));
        assert!(ws.next().await.is_none(), "a failed connection is over");
    }

    #[tokio::test]
    async fn a_raised_limit_accepts_what_the_old_one_refused() {
        let (server, mut client) = duplex(8192);
        let mut ws = WebSocket::from_partially_read(server, Vec::new(), config(1024));
        ws.set_max_bytes(4096);
        client.write_all(&client_frame(1, &[b'a'; 2000])).await.unwrap();
        assert!(matches!(ws.next().await, Some(Ok(Message::Text(t))) if t.len() == 2000));
    }

    #[tokio::test]
    async fn send_waits_for_a_full_pipe_and_close_completes_the_handshake() {
        let (server, mut client) = duplex(64);
        let mut ws = WebSocket::from_partially_read(server, Vec::new(), config(1024));
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            let mut buf = [0u8; 16];
            // Read slowly until the close frame (0x88) has arrived, then answer it.
            loop {
                let n = client.read(&mut buf).await.unwrap();
                all.extend_from_slice(&buf[..n]);
                if let Some(i) = all.iter().position(|&b| b == 0x88)
                    && all.len() >= i + 4
                {
                    client.write_all(&client_frame(8, &[0x03, 0xE8])).await.unwrap();
                    return all;
                }
            }
        });
        ws.send(Message::text("x".repeat(300))).await.unwrap();
        ws.close(Some(CloseFrame { code: 1000.into(), reason: "".into() })).await.unwrap();
        assert!(matches!(ws.next().await, Some(Ok(Message::Close(_))) | None));
        let written = reader.await.unwrap();
        assert_eq!(written[0], 0x81, "a final text frame first");
        assert_eq!(&written[4..304], "x".repeat(300).as_bytes());
    }
}
