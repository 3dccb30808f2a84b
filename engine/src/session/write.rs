//! What the session sends: frames queued by the handlers, written with a deadline (a client
//! that does not read is closed with 4008), and the close handshake.

use std::task::Poll;

use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, sleep_until, timeout_at};
use tungstenite::protocol::CloseFrame;
use tungstenite::{Message, Utf8Bytes};

use super::event_loop::{CLOSE_TIMEOUT, Session, Step};
use crate::close::{CloseCode, Ended, Ending, ErrorCode};

/// Longest close reason (RFC 6455: the close payload is at most 125 bytes).
const MAX_CLOSE_REASON: usize = 123;

impl<S> Session<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    pub(super) fn queue_ok(&mut self, id: Option<&str>) {
        if let Some(id) = id {
            self.queue_json(&json!({"type": "ok", "ref": id}));
        }
    }

    pub(super) fn queue_error(&mut self, id: Option<&str>, code: ErrorCode, reason: &str) {
        self.queue_json(&json!({"type": "error", "ref": id, "code": code.as_str(), "reason": reason}));
    }

    pub(super) fn queue_json(&mut self, value: &Value) {
        self.out.push(Message::Text(Utf8Bytes::from(value.to_string())));
    }

    /// Writes the queued frames. A client that does not take one within the write deadline
    /// (`heartbeat.timeout`) is a slow consumer: closed with 4008. Most writes complete at once; one the socket cannot take yet waits in
    /// [`write_waiting`](Self::write_waiting) (boxed: its timers would otherwise take room in
    /// every idle connection's task).
    pub(super) async fn flush(&mut self) -> Result<(), Ended> {
        // Taking the queue also gives its buffer back: an idle connection holds none.
        let mut queued = std::mem::take(&mut self.out).into_iter();
        while let Some(message) = queued.next() {
            self.queue(message).await?;
            match self.ws.try_flush() {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => return Err(Ended::Dropped("write failed")),
                Poll::Pending => return Box::pin(self.write_waiting(queued.collect())).await,
            }
        }
        Ok(())
    }

    /// Puts one frame in the write buffer.
    pub(super) async fn queue(&mut self, message: Message) -> Result<(), Ended> {
        self.ws.queue(message).await.map_err(|_| Ended::Dropped("write failed"))
    }

    /// Waits for what is buffered to be written, then writes `rest` the same way. While a write
    /// waits, what must end the connection still does at once — a logout or replacement, the
    /// shutdown, the token's expiry, a reload's close — so a client that does not read cannot
    /// hold its connection past them.
    pub(super) async fn write_waiting(&mut self, rest: Vec<Message>) -> Result<(), Ended> {
        let mut rest = rest.into_iter();
        loop {
            self.wait_written().await?;
            match rest.next() {
                Some(message) => self.queue(message).await?,
                None => return Ok(()),
            }
        }
    }

    pub(super) async fn wait_written(&mut self) -> Result<(), Ended> {
        let deadline = Instant::now() + self.pipeline.limits.heartbeat_timeout;
        let mut ends = self.timers.ends();
        loop {
            let step = tokio::select! {
                biased;
                control = self.mailbox.recv() => self.on_control(control),
                changed = self.phase.changed(), if self.phase_open => self.on_phase(changed.is_ok()),
                () = sleep_until(ends.unwrap_or(deadline)), if ends.is_some_and(|e| e < deadline) => self.on_timer(),
                flushed = timeout_at(deadline, self.ws.flush()) => match flushed {
                    Ok(Ok(())) => return Ok(()),
                    Ok(Err(_)) => return Err(Ended::Dropped("write failed")),
                    Err(_) => Ending::NotReading.into(),
                },
            };
            match step {
                Step::Close(code, reason) => return Err(self.close(code, &reason).await),
                Step::Drop(why) => return Err(Ended::Dropped(why)),
                // Nothing that ends the connection (that timer is not waited for again): keep
                // writing; the flush is cancel-safe.
                _ => ends = None,
            }
        }
    }

    /// Sends a close frame and waits (bounded) for the client's; then the connection is done.
    /// Boxed: it happens once per connection, and inline its timer would sit in every idle
    /// connection's task.
    pub(super) fn close<'a>(
        &'a mut self,
        code: CloseCode,
        reason: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Ended> + Send + 'a>> {
        Box::pin(self.close_now(code, reason))
    }

    pub(super) async fn close_now(&mut self, code: CloseCode, reason: &str) -> Ended {
        let frame = CloseFrame { code: code.code().into(), reason: truncate(reason, MAX_CLOSE_REASON).into() };
        // The close frame may wait behind what a slow client has not read yet: a client that
        // catches up within the close timeout still learns why (4008 included). Whatever the
        // peer still sends meanwhile is read and discarded until its close: closing with unread
        // input would reset the connection and could destroy our close frame.
        self.ws.close_within(Some(frame), CLOSE_TIMEOUT).await;
        Ended::Closed(code, reason.to_string())
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
