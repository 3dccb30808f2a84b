//! Just enough HTTP/1.1 for a WebSocket upgrade and a small admin API: read one bounded
//! request head (and body), write one response.
//!
//! wsgate reads the upgrade request itself, rather than inside tungstenite's synchronous
//! handshake callback, so that every check (token, revocation, limits) runs before the
//! upgrade and may be asynchronous. Bounds: the head is at most [`MAX_HEAD_BYTES`] with at
//! most [`MAX_HEADERS`] headers, and a client that has not sent a complete head within the
//! caller's deadline is dropped (a slowloris holds nothing for long).

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest request head accepted (request line and headers).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most headers accepted.
pub const MAX_HEADERS: usize = 64;

/// One parsed request head.
#[derive(Debug, Clone)]
pub struct Request {
    /// `GET`, `POST`, …
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The raw query string (after `?`), never logged: it may carry a token.
    pub query: String,
    /// Headers with lower-case names, in order.
    pub headers: Vec<(String, String)>,
    /// Bytes read past the head (a body's start, or frames a client sent early).
    pub rest: Vec<u8>,
}

impl Request {
    /// The first header named `name` (lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// Every value of header `name`, comma-separated lists split.
    pub fn header_tokens<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers.iter().filter(move |(n, _)| n == name).flat_map(|(_, v)| v.split(',')).map(str::trim)
    }

    /// Query parameters, percent-decoded.
    pub fn query_pairs(&self) -> Vec<(String, String)> {
        self.query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (percent_decode(k), percent_decode(v))
            })
            .collect()
    }
}

/// Why no request could be read. None of these gets a response but `TooLarge` and `Malformed`.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadError {
    /// The connection closed before a complete head.
    Closed,
    /// No complete head before the deadline.
    TimedOut,
    /// The head exceeds the bounds (431).
    TooLarge,
    /// Not HTTP/1.1, or a body that is chunked or has an unreadable length (400).
    Malformed,
    /// A body without `Content-Length` (411).
    LengthRequired,
}

/// Reads one request head within `deadline`.
pub async fn read_request<S: AsyncRead + Unpin>(stream: &mut S, deadline: Duration) -> Result<Request, ReadError> {
    match tokio::time::timeout(deadline, read_head(stream)).await {
        Ok(r) => r,
        Err(_) => Err(ReadError::TimedOut),
    }
}

async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Request, ReadError> {
    // A heap buffer only: this future lives inside every connection's task, and a stack
    // array here would be carried by every idle connection.
    let mut buf = Vec::with_capacity(1024);
    loop {
        if buf.capacity() - buf.len() < 512 {
            buf.reserve(2048);
        }
        let before = buf.len();
        let n = stream.read_buf(&mut buf).await.map_err(|_| ReadError::Closed)?;
        if n == 0 {
            return Err(ReadError::Closed);
        }
        // Parse only once the blank line has arrived: a client sending a byte at a time must
        // not make every read re-parse everything before it.
        let from = before.saturating_sub(3);
        if !buf[from..].windows(4).any(|w| w == b"\r\n\r\n") {
            if buf.len() > MAX_HEAD_BYTES {
                return Err(ReadError::TooLarge);
            }
            continue;
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                if len > MAX_HEAD_BYTES {
                    return Err(ReadError::TooLarge);
                }
                if req.version != Some(1) {
                    return Err(ReadError::Malformed);
                }
                let target = req.path.unwrap_or("/");
                let (path, query) = target.split_once('?').unwrap_or((target, ""));
                let headers = req
                    .headers
                    .iter()
                    .map(|h| (h.name.to_ascii_lowercase(), String::from_utf8_lossy(h.value).into_owned()))
                    .collect();
                return Ok(Request {
                    method: req.method.unwrap_or("").to_string(),
                    path: path.to_string(),
                    query: query.to_string(),
                    headers,
                    rest: buf[len..].to_vec(),
                });
            }
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => return Err(ReadError::TooLarge),
            Ok(httparse::Status::Partial) => continue,
            Err(httparse::Error::TooManyHeaders) => return Err(ReadError::TooLarge),
            Err(_) => return Err(ReadError::Malformed),
        }
    }
}

/// Reads a body of `Content-Length` bytes (at most `max`) after the head, within `deadline`.
pub async fn read_body<S: AsyncRead + Unpin>(
    stream: &mut S,
    request: &Request,
    max: usize,
    deadline: Duration,
) -> Result<Vec<u8>, ReadError> {
    if request.header("transfer-encoding").is_some() {
        return Err(ReadError::Malformed);
    }
    let len: usize = match request.header("content-length") {
        None => return Err(ReadError::LengthRequired),
        Some(v) => v.trim().parse().map_err(|_| ReadError::Malformed)?,
    };
    if len > max {
        return Err(ReadError::TooLarge);
    }
    let mut body = request.rest.clone();
    body.truncate(len);
    let read = async {
        while body.len() < len {
            let mut chunk = vec![0u8; (len - body.len()).min(8192)];
            let n = stream.read(&mut chunk).await.map_err(|_| ReadError::Closed)?;
            if n == 0 {
                return Err(ReadError::Closed);
            }
            body.extend_from_slice(&chunk[..n]);
        }
        Ok(())
    };
    tokio::time::timeout(deadline, read).await.map_err(|_| ReadError::TimedOut)??;
    Ok(body)
}

/// The reason phrase of the statuses wsgate sends.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Payload Too Large",
        421 => "Misdirected Request",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// Writes a complete response and flushes it. The connection is closed by the caller.
pub async fn write_response<S: AsyncWrite + Unpin>(
    stream: &mut S,
    status: u16,
    content_type: &str,
    extra_headers: &[(&str, String)],
    body: &[u8],
) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\ncache-control: no-store\r\n",
        reason_phrase(status),
        body.len()
    );
    for (name, value) in extra_headers {
        head.push_str(name);
        head.push_str(": ");
        head.push_str(value);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    stream.flush().await
}

/// Writes the SPEC's JSON refusal: `{"error": "...", "reason": "..."}`.
pub async fn write_refusal<S: AsyncWrite + Unpin>(
    stream: &mut S,
    status: u16,
    error: &str,
    reason: &str,
    extra_headers: &[(&str, String)],
) -> std::io::Result<()> {
    let body = serde_json::json!({ "error": error, "reason": reason }).to_string();
    write_response(stream, status, "application/json", extra_headers, body.as_bytes()).await
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn reads_a_head_and_keeps_what_follows() {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        client
            .write_all(b"GET /ws?token=a%2Bb&x=1 HTTP/1.1\r\nHost: h\r\nOrigin: https://o\r\nSec-WebSocket-Protocol: wsgate.v1, bearer.t\r\n\r\n\x81\x00")
            .await
            .unwrap();
        let r = read_request(&mut server, Duration::from_secs(1)).await.unwrap();
        assert_eq!((r.method.as_str(), r.path.as_str()), ("GET", "/ws"));
        assert_eq!(r.query_pairs(), vec![("token".into(), "a+b".into()), ("x".into(), "1".into())]);
        assert_eq!(r.header("origin"), Some("https://o"));
        assert_eq!(r.header_tokens("sec-websocket-protocol").collect::<Vec<_>>(), vec!["wsgate.v1", "bearer.t"]);
        assert_eq!(r.rest, vec![0x81, 0x00]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_client_times_out() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(b"GET /ws HTTP/1.1\r\nHost: h\r\n").await.unwrap();
        let r = read_request(&mut server, Duration::from_secs(10)).await;
        assert_eq!(r.unwrap_err(), ReadError::TimedOut);
        drop(client);
    }

    #[tokio::test]
    async fn oversized_heads_are_refused() {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD_BYTES));
        client.write_all(big.as_bytes()).await.unwrap();
        assert_eq!(read_request(&mut server, Duration::from_secs(1)).await.unwrap_err(), ReadError::TooLarge);
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let many: String = (0..100).map(|i| format!("X{i}: y\r\n")).collect();
        client.write_all(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()).await.unwrap();
        assert_eq!(read_request(&mut server, Duration::from_secs(1)).await.unwrap_err(), ReadError::TooLarge);
    }

    #[tokio::test]
    async fn bodies_need_a_plain_content_length() {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        client.write_all(b"POST /v1/publish HTTP/1.1\r\n\r\n{}").await.unwrap();
        let r = read_request(&mut server, Duration::from_secs(1)).await.unwrap();
        assert_eq!(read_body(&mut server, &r, 100, Duration::from_secs(1)).await, Err(ReadError::LengthRequired));
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        client.write_all(b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n").await.unwrap();
        let r = read_request(&mut server, Duration::from_secs(1)).await.unwrap();
        assert_eq!(read_body(&mut server, &r, 100, Duration::from_secs(1)).await, Err(ReadError::Malformed));
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        client.write_all(b"POST / HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}").await.unwrap();
        let r = read_request(&mut server, Duration::from_secs(1)).await.unwrap();
        assert_eq!(read_body(&mut server, &r, 100, Duration::from_secs(1)).await.unwrap(), b"{}");
    }

    #[tokio::test]
    async fn a_head_sent_a_byte_at_a_time_is_read() {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let reader = tokio::spawn(async move { read_request(&mut server, Duration::from_secs(5)).await });
        for b in b"GET /ws HTTP/1.1\r\nHost: h\r\n\r\n" {
            client.write_all(&[*b]).await.unwrap();
            tokio::task::yield_now().await;
        }
        assert_eq!(reader.await.unwrap().unwrap().path, "/ws");
    }

    #[test]
    fn percent_decoding_is_total() {
        assert_eq!(percent_decode("a%20b%zz%2"), "a b%zz%2");
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("%4"), "%4");
    }
}
