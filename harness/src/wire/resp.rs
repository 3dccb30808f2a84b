//! A minimal Redis client, written by hand over a TCP stream: RESP2 command encoding, reply
//! parsing, and one command per connection. Enough for the harness to check that the Redis it
//! started is up (`PING`, `INFO`) and to play a backend publishing straight into Redis
//! (`PUBLISH`) — without a Redis client library between the scenario and the wire.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The largest reply the harness reads (an `INFO` answer is a few KiB).
const MAX_REPLY: usize = 1024 * 1024;

/// One RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    /// `+OK`, `+PONG`.
    Simple(String),
    /// `-ERR …`: Redis refused the command.
    Error(String),
    /// `:3`, e.g. how many subscribers a `PUBLISH` reached.
    Integer(i64),
    /// `$5\r\nhello`; `None` for the null bulk string `$-1`.
    Bulk(Option<Vec<u8>>),
    /// `*2\r\n…`; `None` for the null array `*-1`.
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// A short rendering for error messages.
    pub(crate) fn describe(&self) -> String {
        match self {
            Reply::Simple(s) => format!("+{s}"),
            Reply::Error(e) => format!("error {e:?}"),
            Reply::Integer(n) => format!("integer {n}"),
            Reply::Bulk(None) => "null bulk string".into(),
            Reply::Bulk(Some(b)) => format!("bulk string {}", crate::matching::clip(&String::from_utf8_lossy(b), 200)),
            Reply::Array(None) => "null array".into(),
            Reply::Array(Some(items)) => format!("array of {} replies", items.len()),
        }
    }
}

/// Encodes a command as a RESP array of bulk strings: `PUBLISH ch msg` becomes
/// `*3\r\n$7\r\nPUBLISH\r\n$2\r\nch\r\n$3\r\nmsg\r\n`. Bulk strings carry their length, so any
/// bytes (JSON with `\r\n` inside) go through unchanged.
pub(crate) fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Parses one reply from the start of `buf`: `Ok(None)` while it is incomplete, otherwise the
/// reply and how many bytes it took.
pub(crate) fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>, String> {
    let Some(line_end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let Some((&kind, line)) = buf[..line_end].split_first() else {
        return Err("an empty RESP line".into());
    };
    let line = std::str::from_utf8(line).map_err(|_| "a RESP line that is not UTF-8".to_string())?;
    let after = line_end + 2;
    let number = || line.parse::<i64>().map_err(|_| format!("a RESP length or integer that is not a number: {line:?}"));
    match kind {
        b'+' => Ok(Some((Reply::Simple(line.to_string()), after))),
        b'-' => Ok(Some((Reply::Error(line.to_string()), after))),
        b':' => Ok(Some((Reply::Integer(number()?), after))),
        b'$' => {
            let len = number()?;
            if len < 0 {
                return Ok(Some((Reply::Bulk(None), after)));
            }
            let len = usize::try_from(len).map_err(|_| "a bulk string too long".to_string())?;
            if len > MAX_REPLY {
                return Err(format!("a bulk string of {len} bytes, more than the {MAX_REPLY} the harness reads"));
            }
            let end = after + len;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err("a bulk string not followed by CRLF".into());
            }
            Ok(Some((Reply::Bulk(Some(buf[after..end].to_vec())), end + 2)))
        }
        b'*' => {
            let count = number()?;
            if count < 0 {
                return Ok(Some((Reply::Array(None), after)));
            }
            let mut items = Vec::new();
            let mut at = after;
            for _ in 0..count {
                match parse(&buf[at..])? {
                    None => return Ok(None),
                    Some((item, used)) => {
                        items.push(item);
                        at += used;
                    }
                }
            }
            Ok(Some((Reply::Array(Some(items)), at)))
        }
        other => Err(format!("not a RESP2 reply: it starts with {:?}", char::from(other))),
    }
}

/// Connects to `addr`, sends one command and reads its reply, all within `timeout`.
pub(crate) async fn command(addr: SocketAddr, args: &[&[u8]], timeout: Duration) -> Result<Reply, String> {
    let name = args.first().map(|a| String::from_utf8_lossy(a).into_owned()).unwrap_or_default();
    let exchange = async {
        let mut stream =
            TcpStream::connect(addr).await.map_err(|e| format!("cannot connect to Redis at {addr}: {e}"))?;
        stream.write_all(&encode(args)).await.map_err(|e| format!("cannot send {name} to Redis at {addr}: {e}"))?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            if let Some((reply, _)) = parse(&buf)? {
                return Ok(reply);
            }
            match stream.read(&mut chunk).await {
                Ok(0) => return Err(format!("Redis at {addr} closed the connection before answering {name}")),
                Ok(n) if buf.len() + n <= MAX_REPLY + 64 => buf.extend_from_slice(&chunk[..n]),
                Ok(_) => return Err(format!("Redis at {addr} answered {name} with more than {MAX_REPLY} bytes")),
                Err(e) => return Err(format!("cannot read the answer to {name} from Redis at {addr}: {e}")),
            }
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("Redis at {addr} did not answer {name} within {timeout:?}"))?
}

/// `PING`: `Ok` when Redis answers `+PONG`.
#[cfg(test)]
pub(crate) async fn ping(addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    match command(addr, &[b"PING"], timeout).await? {
        Reply::Simple(s) if s == "PONG" => Ok(()),
        other => Err(format!("Redis at {addr} answered PING with {}", other.describe())),
    }
}

/// `PUBLISH channel payload`: how many subscribers (channel and pattern) received it.
pub(crate) async fn publish(addr: SocketAddr, channel: &str, payload: &[u8], timeout: Duration) -> Result<i64, String> {
    match command(addr, &[b"PUBLISH", channel.as_bytes(), payload], timeout).await? {
        Reply::Integer(n) => Ok(n),
        other => Err(format!("Redis at {addr} answered PUBLISH with {}", other.describe())),
    }
}

/// The `process_id` that `INFO server` reports: proves the Redis answering on a port is the
/// one the harness started, not another process that took the port.
pub(crate) async fn process_id(addr: SocketAddr, timeout: Duration) -> Result<u32, String> {
    let info = match command(addr, &[b"INFO", b"server"], timeout).await? {
        Reply::Bulk(Some(text)) => String::from_utf8_lossy(&text).into_owned(),
        other => return Err(format!("Redis at {addr} answered INFO with {}", other.describe())),
    };
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|pid| pid.trim().parse().ok())
        .ok_or_else(|| format!("Redis at {addr} answered INFO server without a process_id"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn encodes_commands_as_arrays_of_bulk_strings() {
        assert_eq!(encode(&[b"PING"]), b"*1\r\n$4\r\nPING\r\n");
        let payload = br#"{"id":"b-1","data":{"text":"a\r\nb"}}"#;
        let mut want = b"*3\r\n$7\r\nPUBLISH\r\n$16\r\nwsgate:ch:alerts\r\n".to_vec();
        want.extend_from_slice(format!("${}\r\n", payload.len()).as_bytes());
        want.extend_from_slice(payload);
        want.extend_from_slice(b"\r\n");
        assert_eq!(encode(&[b"PUBLISH", b"wsgate:ch:alerts", payload]), want);
        assert_eq!(encode(&[b"SET", b"k", b""]), b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n");
    }

    #[test]
    fn parses_every_reply_kind() {
        assert_eq!(parse(b"+PONG\r\n").unwrap(), Some((Reply::Simple("PONG".into()), 7)));
        assert_eq!(parse(b"-ERR wrong\r\nrest").unwrap(), Some((Reply::Error("ERR wrong".into()), 12)));
        assert_eq!(parse(b":2\r\n").unwrap(), Some((Reply::Integer(2), 4)));
        assert_eq!(parse(b":-7\r\n").unwrap(), Some((Reply::Integer(-7), 5)));
        assert_eq!(parse(b"$5\r\na\r\nbc\r\n").unwrap(), Some((Reply::Bulk(Some(b"a\r\nbc".to_vec())), 11)));
        assert_eq!(parse(b"$-1\r\n").unwrap(), Some((Reply::Bulk(None), 5)));
        assert_eq!(parse(b"*-1\r\n").unwrap(), Some((Reply::Array(None), 5)));
        let (reply, used) = parse(b"*3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n").unwrap().unwrap();
        assert_eq!(used, 30);
        assert_eq!(
            reply,
            Reply::Array(Some(vec![
                Reply::Bulk(Some(b"subscribe".to_vec())),
                Reply::Bulk(Some(b"c".to_vec())),
                Reply::Integer(1)
            ]))
        );
    }

    #[test]
    fn incomplete_replies_wait_for_more_bytes() {
        for partial in [&b""[..], b"+PON", b":1\r", b"$5\r\nab", b"$5\r\nabcde", b"$5\r\nabcde\r", b"*2\r\n:1\r\n"] {
            assert_eq!(parse(partial).unwrap(), None, "{:?}", String::from_utf8_lossy(partial));
        }
    }

    #[test]
    fn malformed_replies_are_errors() {
        assert!(parse(b"?what\r\n").unwrap_err().contains("not a RESP2 reply"));
        assert!(parse(b":x\r\n").unwrap_err().contains("not a number"));
        assert!(parse(b"$2\r\nabcd\r\n").unwrap_err().contains("CRLF"));
        assert!(parse(b"\r\n").unwrap_err().contains("empty"));
    }

    /// Against a stand-in that answers in two TCP segments: the reply is read whole.
    #[tokio::test]
    async fn publish_reads_the_integer_reply() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            while parse(&got).unwrap().is_none() {
                let n = s.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
            }
            s.write_all(b":").await.unwrap();
            s.flush().await.unwrap();
            tokio::task::yield_now().await;
            s.write_all(b"2\r\n").await.unwrap();
            got
        });
        assert_eq!(publish(addr, "wsgate:ch:alerts", b"{}", Duration::from_secs(5)).await.unwrap(), 2);
        assert_eq!(server.await.unwrap(), encode(&[b"PUBLISH", b"wsgate:ch:alerts", b"{}"]));
    }
}
