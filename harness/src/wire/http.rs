//! A minimal HTTP/1.1 client over TCP (or TLS over it, for the public listener of a `tls`
//! server), written by hand: one request per connection (`Connection: close`), enough for the
//! admin API and for probing the public listener. Small on purpose: the harness must see
//! exactly what the server sends, with nothing in between.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::wire::tls::{self, TlsClient};

/// The largest response the harness reads; anything beyond is an error.
const MAX_RESPONSE: usize = 16 * 1024 * 1024;

#[derive(Debug, Clone)]
pub(crate) struct HttpResponse {
    pub(crate) status: u16,
    /// Header names (lower-case) and values, in order.
    pub(crate) headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub(crate) body: Vec<u8>,
}

impl HttpResponse {
    /// The first header called `name` (case-insensitive).
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Clone, Default)]
pub(crate) struct HttpRequest<'a> {
    /// `GET`, `POST`, …
    pub(crate) method: &'a str,
    /// Path and query, starting with `/`.
    pub(crate) path: &'a str,
    /// Extra headers.
    pub(crate) headers: Vec<(String, String)>,
    /// A body with its content type.
    pub(crate) body: Option<(&'a str, Vec<u8>)>,
}

/// Why no response came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HttpError {
    /// The TCP connection could not be made.
    Connect(String),
    /// Connected, but the server ended the exchange without a complete HTTP response: a failed
    /// TLS handshake, a close or reset, or bytes that are not HTTP (such as a TLS alert).
    NoResponse(String),
    /// Neither a response nor the end of the connection within the deadline.
    Timeout(String),
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpError::Connect(m) | HttpError::NoResponse(m) | HttpError::Timeout(m) => f.write_str(m),
        }
    }
}

/// Where a request's connection comes from, and what it says before the request.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Origin<'a> {
    /// The source address (`None`: the kernel's choice).
    pub(crate) from: Option<IpAddr>,
    /// Bytes written first, before TLS and the request (a PROXY protocol header).
    pub(crate) preamble: &'a [u8],
}

/// Sends `req` to `addr` (over TLS with `tls`) and reads the whole response, all within
/// `timeout`.
pub(crate) async fn send(
    addr: SocketAddr,
    tls: Option<&TlsClient>,
    req: &HttpRequest<'_>,
    timeout: Duration,
) -> Result<HttpResponse, HttpError> {
    send_from(addr, Origin::default(), tls, req, timeout).await
}

/// [`send`], over a connection from `origin`.
pub(crate) async fn send_from(
    addr: SocketAddr,
    origin: Origin<'_>,
    tls: Option<&TlsClient>,
    req: &HttpRequest<'_>,
    timeout: Duration,
) -> Result<HttpResponse, HttpError> {
    let what = || format!("{} {} to {addr}", req.method, req.path);
    let deadline = Instant::now() + timeout;
    // Connecting is its own phase: only a refused TCP connection is a `Connect` error.
    let mut tcp = tokio::time::timeout_at(deadline, crate::wire::tcp::connect(addr, origin.from))
        .await
        .map_err(|_| HttpError::Timeout(format!("{}: connecting timed out after {timeout:?}", what())))?
        .map_err(|e| HttpError::Connect(format!("{}: cannot connect: {e}", what())))?;
    let exchange = async {
        if !origin.preamble.is_empty() {
            tcp.write_all(origin.preamble)
                .await
                .map_err(|e| HttpError::NoResponse(format!("{}: cannot send the preamble: {e}", what())))?;
        }
        let stream = match tls {
            None => tls::Stream::Plain(tcp),
            Some(client) => client
                .handshake(tcp)
                .await
                .map_err(|e| HttpError::NoResponse(format!("{}: the TLS handshake failed: {e}", what())))?,
        };
        exchange(stream, &tls::host(addr, tls.is_some()), addr, req).await.map_err(HttpError::NoResponse)
    };
    tokio::time::timeout_at(deadline, exchange)
        .await
        .map_err(|_| HttpError::Timeout(format!("{}: no complete response within {timeout:?}", what())))?
}

async fn exchange(
    mut stream: tls::Stream,
    host: &str,
    addr: SocketAddr,
    req: &HttpRequest<'_>,
) -> Result<HttpResponse, String> {
    let what = || format!("{} {} to {addr}", req.method, req.path);
    let mut head = format!("{} {} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n", req.method, req.path);
    for (k, v) in &req.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    let body: &[u8] = match &req.body {
        Some((content_type, body)) => {
            head.push_str(&format!("Content-Type: {content_type}\r\nContent-Length: {}\r\n", body.len()));
            body
        }
        None if req.method == "POST" || req.method == "PUT" => {
            head.push_str("Content-Length: 0\r\n");
            &[]
        }
        None => &[],
    };
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    stream.write_all(&out).await.map_err(|e| format!("{}: cannot send: {e}", what()))?;

    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                raw.extend_from_slice(&buf[..n]);
                if raw.len() > MAX_RESPONSE {
                    return Err(format!("{}: response larger than {MAX_RESPONSE} bytes", what()));
                }
                // A server that keeps the connection open after a complete response is fine.
                if let Ok(Some(resp)) = parse_response(&raw, false) {
                    return Ok(resp);
                }
            }
            // A reset after a complete response still leaves a usable answer.
            Err(e) if raw.is_empty() => return Err(format!("{}: cannot read: {e}", what())),
            Err(_) => break,
        }
    }
    match parse_response(&raw, true) {
        Ok(Some(resp)) => Ok(resp),
        Ok(None) => Err(format!("{}: the connection closed before a complete response ({} bytes)", what(), raw.len())),
        Err(e) => Err(format!("{}: {e}", what())),
    }
}

/// Parses a response from `raw`. `Ok(None)`: incomplete. With `eof`, a body without a length
/// runs to the end.
pub(crate) fn parse_response(raw: &[u8], eof: bool) -> Result<Option<HttpResponse>, String> {
    let Some(head_end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&raw[..head_end]).map_err(|_| "the response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (version, code) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    if !version.starts_with("HTTP/1.") {
        return Err(format!("not an HTTP/1.x status line: {status_line:?}"));
    }
    let status: u16 = code.parse().map_err(|_| format!("bad status line: {status_line:?}"))?;
    let mut headers = Vec::new();
    for line in lines {
        let (k, v) = line.split_once(':').ok_or_else(|| format!("bad header line: {line:?}"))?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let rest = &raw[head_end + 4..];
    let find = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let no_body = status == 204 || status == 304 || (100..200).contains(&status);
    let body = if no_body {
        Vec::new()
    } else if find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        match dechunk(rest)? {
            Some(body) => body,
            None => return Ok(None),
        }
    } else if let Some(len) = find("content-length") {
        let len: usize = len.parse().map_err(|_| format!("bad content-length: {len:?}"))?;
        if rest.len() < len {
            return Ok(None);
        }
        rest[..len].to_vec()
    } else if eof {
        rest.to_vec()
    } else {
        return Ok(None);
    };
    Ok(Some(HttpResponse { status, headers, body }))
}

/// Decodes a chunked body; `Ok(None)` while incomplete.
fn dechunk(mut rest: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let mut body = Vec::new();
    loop {
        let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let size_text = std::str::from_utf8(&rest[..line_end]).map_err(|_| "bad chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| format!("bad chunk size {size_text:?}"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(Some(body));
        }
        if rest.len() < size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_content_length() {
        let raw = b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 5\r\n\r\nhello";
        let r = parse_response(raw, false).unwrap().unwrap();
        assert_eq!(r.status, 404);
        assert_eq!(r.header("Content-Type"), Some("application/json"));
        assert_eq!(r.body, b"hello");
    }

    #[test]
    fn waits_for_the_whole_body() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello";
        assert!(parse_response(raw, false).unwrap().is_none());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Le", false).unwrap().is_none());
    }

    #[test]
    fn parses_chunked() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n";
        assert_eq!(parse_response(raw, false).unwrap().unwrap().body, b"hello world");
        let partial = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel";
        assert!(parse_response(partial, false).unwrap().is_none());
    }

    #[test]
    fn body_to_eof_without_length() {
        let raw = b"HTTP/1.1 200 OK\r\n\r\nabc";
        assert!(parse_response(raw, false).unwrap().is_none());
        assert_eq!(parse_response(raw, true).unwrap().unwrap().body, b"abc");
    }

    #[test]
    fn refuses_non_http() {
        assert!(parse_response(b"SSH-2.0\r\n\r\n", true).is_err());
    }

    #[tokio::test]
    async fn talks_to_a_local_listener() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") || !got.ends_with(b"{}") {
                let n = s.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
            }
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{\"id\":\"1\"}").await.unwrap();
            String::from_utf8(got).unwrap()
        });
        let req = HttpRequest {
            method: "POST",
            path: "/v1/publish",
            headers: vec![("Authorization".into(), "Bearer x".into())],
            body: Some(("application/json", b"{}".to_vec())),
        };
        let resp = send(addr, None, &req, Duration::from_secs(5)).await.unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(resp.body, b"{\"id\":\"1\"}");
        let seen = server.await.unwrap();
        assert!(seen.starts_with("POST /v1/publish HTTP/1.1\r\n"), "{seen}");
        assert!(seen.contains("Content-Length: 2\r\n") && seen.contains("Authorization: Bearer x\r\n"));
    }

    /// Over TLS the request names `localhost`; plain HTTP to a TLS listener gets no response,
    /// a closed port is a connect error, and a server that says nothing is a timeout.
    #[tokio::test]
    async fn tls_and_the_kinds_of_failure() {
        let dir = tempfile::tempdir().unwrap();
        let pair = crate::wire::tls::generate(dir.path(), "test").unwrap();
        let acceptor = crate::wire::tls::tests::acceptor(&pair);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let Ok(mut s) = acceptor.accept(tcp).await else { continue };
                let mut got = Vec::new();
                let mut buf = [0u8; 1024];
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut buf).await.unwrap();
                    got.extend_from_slice(&buf[..n]);
                }
                let host =
                    String::from_utf8(got).unwrap().lines().find_map(|l| l.strip_prefix("Host: ").map(String::from));
                let body = host.unwrap_or_default();
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
                s.write_all(head.as_bytes()).await.unwrap();
                s.write_all(body.as_bytes()).await.unwrap();
                s.shutdown().await.unwrap();
            }
        });
        let req = HttpRequest { method: "GET", path: "/", ..HttpRequest::default() };
        let five = Duration::from_secs(5);
        let resp = send(addr, Some(&pair.client), &req, five).await.unwrap();
        assert_eq!((resp.status, resp.body), (200, format!("localhost:{}", addr.port()).into_bytes()));
        assert!(matches!(send(addr, None, &req, five).await, Err(HttpError::NoResponse(_))));

        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let quiet = silent.local_addr().unwrap();
        let e = send(quiet, None, &req, Duration::from_millis(300)).await.unwrap_err();
        assert!(matches!(e, HttpError::Timeout(_)), "{e}");
        drop(silent);
        let e = send(quiet, None, &req, five).await.unwrap_err();
        assert!(matches!(e, HttpError::Connect(_)), "{e}");
    }
}
