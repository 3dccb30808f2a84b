//! The PROXY protocol (HAProxy's `send-proxy` / `send-proxy-v2`, AWS NLB, and others): the
//! header a TCP proxy writes before anything else on a connection, naming the client's address.
//! Both versions are read, v1 (one text line) and v2 (binary):
//!
//! - v1: `PROXY TCP4|TCP6 <src> <dst> <sport> <dport>\r\n`, or `PROXY UNKNOWN …\r\n`; at most
//!   107 bytes.
//! - v2: a 12-byte signature, version and command, family and transport, a 16-bit length, then
//!   the addresses and optional TLVs (ignored). The `LOCAL` command (health checks) names no one:
//!   the connection is the proxy's own.
//!
//! [`parse`] decides from a buffer alone, saying how many more bytes it needs at least, so
//! [`read_header`] reads exactly the header and not one byte of what follows (the TLS
//! handshake or the HTTP request, read by their own code). It is bounded: a v1 line of at most
//! [`V1_MAX`] bytes, a v2 header of at most [`V2_MAX`]. Malformed input is an error, never a
//! panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt};

/// The v2 signature.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 line, CRLF included (the protocol's own bound).
pub const V1_MAX: usize = 107;
/// The longest v2 header accepted (16 fixed bytes, the addresses and TLVs). The protocol allows
/// 64 KiB; the TLVs proxies send in practice (AWS's VPC endpoint id, HAProxy's unique id and
/// TLS details) are far smaller, and each connection waiting for its header holds this much.
pub const V2_MAX: usize = 16 + 1024;

/// What a PROXY header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// The proxy relays a client at this address (the header's source).
    Proxied(SocketAddr),
    /// The connection is the proxy's own (v2 `LOCAL`, a health check), or the proxy does not
    /// know the client (v1 `UNKNOWN`, a v2 family other than TCP over IPv4/IPv6): the peer is
    /// taken as it is.
    Local,
}

impl Header {
    /// The client's address the header names, if it names one.
    pub fn source(&self) -> Option<SocketAddr> {
        match self {
            Header::Proxied(addr) => Some(*addr),
            Header::Local => None,
        }
    }
}

/// The outcome of looking at the bytes read so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A whole header.
    Done {
        /// What it says.
        header: Header,
        /// Its length in bytes: where what follows it starts.
        len: usize,
    },
    /// Not enough bytes yet: at least this many more are part of the header.
    Need(usize),
}

/// Why the bytes are not a PROXY header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Neither signature.
    #[error("not a PROXY protocol header")]
    NotProxy,
    /// A v1 line that breaks the grammar or is too long.
    #[error("malformed PROXY v1 line: {0}")]
    V1(&'static str),
    /// A v2 header that breaks the format or is too long.
    #[error("malformed PROXY v2 header: {0}")]
    V2(&'static str),
    /// The connection ended (or failed) before the whole header.
    #[error("the connection ended before a whole PROXY header")]
    Closed,
}

/// Decides what `buf` (the first bytes of a connection) holds.
pub fn parse(buf: &[u8]) -> Result<Parsed, Error> {
    const V1_PREFIX: &[u8] = b"PROXY ";
    let v2_seen = buf.len().min(V2_SIGNATURE.len());
    let v1_seen = buf.len().min(V1_PREFIX.len());
    if buf[..v2_seen] == V2_SIGNATURE[..v2_seen] {
        if v2_seen < V2_SIGNATURE.len() {
            return Ok(Parsed::Need(V2_SIGNATURE.len() - v2_seen + 4));
        }
        return parse_v2(buf);
    }
    if buf[..v1_seen] == V1_PREFIX[..v1_seen] {
        if v1_seen < V1_PREFIX.len() {
            // The shortest line is `PROXY UNKNOWN\r\n`.
            return Ok(Parsed::Need(15 - buf.len()));
        }
        return parse_v1(buf);
    }
    Err(Error::NotProxy)
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, Error> {
    let Some(lf) = buf.iter().position(|&b| b == b'\n') else {
        if buf.len() >= V1_MAX {
            return Err(Error::V1("longer than 107 bytes"));
        }
        // At least `\r\n` is still to come; only `\n` once the `\r` is here.
        return Ok(Parsed::Need(if buf.ends_with(b"\r") { 1 } else { 2 }));
    };
    let len = lf + 1;
    if len > V1_MAX {
        return Err(Error::V1("longer than 107 bytes"));
    }
    if lf == 0 || buf[lf - 1] != b'\r' {
        return Err(Error::V1("the line does not end with CRLF"));
    }
    let line = std::str::from_utf8(&buf[..lf - 1]).map_err(|_| Error::V1("not ASCII"))?;
    let mut words = line.split(' ');
    let _proxy = words.next();
    let header = match words.next() {
        // The receiver must ignore whatever follows UNKNOWN.
        Some("UNKNOWN") => Header::Local,
        Some(family @ ("TCP4" | "TCP6")) => {
            let fields: Vec<&str> = words.collect();
            let [src, dst, sport, dport] = fields[..] else {
                return Err(Error::V1("expected source, destination and both ports, one space apart"));
            };
            let parse_ip = |s: &str| -> Result<IpAddr, Error> {
                let ip = if family == "TCP4" {
                    s.parse::<Ipv4Addr>().map(IpAddr::V4)
                } else {
                    s.parse::<Ipv6Addr>().map(IpAddr::V6)
                };
                ip.map_err(|_| Error::V1("an address is not of the family the line names"))
            };
            let src = parse_ip(src)?;
            parse_ip(dst)?;
            let sport = v1_port(sport)?;
            v1_port(dport)?;
            Header::Proxied(SocketAddr::new(src, sport))
        }
        _ => return Err(Error::V1("the protocol is neither TCP4, TCP6 nor UNKNOWN")),
    };
    Ok(Parsed::Done { header, len })
}

/// A v1 port: 1 to 5 digits, no sign, no leading zero (other than `0` itself), at most 65535.
fn v1_port(s: &str) -> Result<u16, Error> {
    let digits = !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits || (s.len() > 1 && s.starts_with('0')) {
        return Err(Error::V1("a port is not a number from 0 to 65535"));
    }
    s.parse().map_err(|_| Error::V1("a port is not a number from 0 to 65535"))
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, Error> {
    if buf.len() < 16 {
        return Ok(Parsed::Need(16 - buf.len()));
    }
    let (version, command) = (buf[12] >> 4, buf[12] & 0x0f);
    if version != 2 {
        return Err(Error::V2("the version is not 2"));
    }
    let (family, transport) = (buf[13] >> 4, buf[13] & 0x0f);
    let body = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let len = 16 + body;
    if len > V2_MAX {
        return Err(Error::V2("longer than this server accepts"));
    }
    if buf.len() < len {
        return Ok(Parsed::Need(len - buf.len()));
    }
    let addresses = &buf[16..len];
    let header = match command {
        // The proxy's own connection (a health check): whatever addresses follow are ignored.
        0 => Header::Local,
        1 => match (family, transport) {
            // TCP over IPv4: source, destination (4 bytes each), then the ports.
            (1, 1) => {
                let a = addresses.get(..12).ok_or(Error::V2("too short for IPv4 addresses"))?;
                let ip = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
                Header::Proxied(SocketAddr::new(IpAddr::V4(ip), u16::from_be_bytes([a[8], a[9]])))
            }
            // TCP over IPv6: 16 bytes each, then the ports.
            (2, 1) => {
                let a = addresses.get(..36).ok_or(Error::V2("too short for IPv6 addresses"))?;
                let octets: [u8; 16] = a[..16].try_into().expect("16 bytes");
                let port = u16::from_be_bytes([a[32], a[33]]);
                Header::Proxied(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(octets)), port))
            }
            // UNSPEC or a Unix socket over a stream: the proxy knows no client address to give.
            (0, _) | (3, 0 | 1) => Header::Local,
            (1 | 2, _) => return Err(Error::V2("not a stream transport")),
            _ => return Err(Error::V2("an unknown address family or transport")),
        },
        _ => return Err(Error::V2("the command is neither LOCAL nor PROXY")),
    };
    Ok(Parsed::Done { header, len })
}

/// Reads one PROXY header from the start of `stream`, exactly its bytes (the caller bounds the
/// time).
pub async fn read_header<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Header, Error> {
    let mut buf = Vec::with_capacity(V1_MAX);
    // `PROXY` or the start of the v2 signature: both need at least this many bytes.
    let mut need = 5;
    loop {
        let start = buf.len();
        buf.resize(start + need, 0);
        stream.read_exact(&mut buf[start..]).await.map_err(|_| Error::Closed)?;
        match parse(&buf)? {
            Parsed::Done { header, len } => {
                debug_assert_eq!(len, buf.len(), "the reads stop at the header's end");
                return Ok(header);
            }
            Parsed::Need(n) => need = n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    fn v2_tcp4(src: [u8; 4], sport: u16) -> Vec<u8> {
        let mut body = src.to_vec();
        body.extend_from_slice(&[127, 0, 0, 1]);
        body.extend_from_slice(&sport.to_be_bytes());
        body.extend_from_slice(&8080u16.to_be_bytes());
        v2(1, 0x11, &body)
    }

    fn done(buf: &[u8]) -> Header {
        match parse(buf) {
            Ok(Parsed::Done { header, len }) => {
                assert_eq!(len, buf.len());
                header
            }
            other => panic!("{other:?}"),
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_lines() {
        assert_eq!(done(b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n"), Header::Proxied(addr("192.0.2.1:56324")));
        assert_eq!(
            done(b"PROXY TCP6 2001:db8::1 2001:db8::2 4711 443\r\n"),
            Header::Proxied(addr("[2001:db8::1]:4711"))
        );
        assert_eq!(done(b"PROXY UNKNOWN\r\n"), Header::Local);
        assert_eq!(done(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"), Header::Local);
        for bad in [
            &b"PROXY TCP4 192.0.2.1 198.51.100.2 56324\r\n"[..],
            b"PROXY TCP4 192.0.2.1  198.51.100.2 1 2\r\n",
            b"PROXY TCP4 2001:db8::1 198.51.100.2 1 2\r\n",
            b"PROXY TCP6 192.0.2.1 2001:db8::2 1 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 +1 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 01 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\n",
            b"PROXY UDP4 192.0.2.1 198.51.100.2 1 2\r\n",
            b"PROXY \r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2 \r\n",
        ] {
            assert!(parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let long = format!("PROXY UNKNOWN {}\r\n", "x".repeat(100));
        assert_eq!(parse(long.as_bytes()), Err(Error::V1("longer than 107 bytes")));
        assert_eq!(parse(&[b'P'; 1][..]).unwrap(), Parsed::Need(14));
        assert_eq!(parse(b"PROXY TCP4 1.2.3.4").unwrap(), Parsed::Need(2));
        assert_eq!(parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r").unwrap(), Parsed::Need(1));
    }

    #[test]
    fn v2_headers() {
        assert_eq!(done(&v2_tcp4([192, 0, 2, 1], 56324)), Header::Proxied(addr("192.0.2.1:56324")));
        let mut six = Vec::new();
        six.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        six.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        six.extend_from_slice(&4711u16.to_be_bytes());
        six.extend_from_slice(&443u16.to_be_bytes());
        assert_eq!(done(&v2(1, 0x21, &six)), Header::Proxied(addr("[2001:db8::1]:4711")));
        // LOCAL (a health check), with or without addresses; UNSPEC and Unix sockets.
        assert_eq!(done(&v2(0, 0x00, &[])), Header::Local);
        assert_eq!(done(&v2(0, 0x11, &[0; 12])), Header::Local);
        assert_eq!(done(&v2(1, 0x00, &[])), Header::Local);
        assert_eq!(done(&v2(1, 0x31, &[0; 216])), Header::Local);
        // TLVs after the addresses are skipped (AWS's VPC endpoint id, say).
        let mut tlv = v2_tcp4([10, 1, 2, 3], 1)[16..].to_vec();
        tlv.extend_from_slice(&[0xea, 0x00, 0x04, 1, 2, 3, 4]);
        assert_eq!(done(&v2(1, 0x11, &tlv)), Header::Proxied(addr("10.1.2.3:1")));
        for bad in [
            v2(1, 0x11, &[0; 11]),
            v2(1, 0x21, &[0; 35]),
            v2(1, 0x12, &[0; 12]),
            v2(1, 0x41, &[0; 12]),
            v2(2, 0x11, &[0; 12]),
            v2(1, 0x11, &vec![0; V2_MAX]),
        ] {
            assert!(parse(&bad).is_err(), "{bad:?}");
        }
        let mut v3 = v2_tcp4([1, 2, 3, 4], 1);
        v3[12] = 0x31;
        assert_eq!(parse(&v3), Err(Error::V2("the version is not 2")));
        assert_eq!(parse(&V2_SIGNATURE[..5]).unwrap(), Parsed::Need(11));
        assert_eq!(parse(&v2_tcp4([1, 2, 3, 4], 1)[..16]).unwrap(), Parsed::Need(12));
    }

    #[test]
    fn anything_else_is_not_a_proxy_header() {
        for other in [&b"GET /ws HTTP/1.1\r\n"[..], b"\x16\x03\x01", b"proxy ", b"\r\n\r\n\0\r\nQUIT!"] {
            assert_eq!(parse(other), Err(Error::NotProxy), "{other:?}");
        }
    }

    /// Reads through an in-memory pipe: exactly the header is consumed, what follows stays.
    async fn read_then_rest(bytes: Vec<u8>) -> (Result<Header, Error>, Vec<u8>) {
        let (mut client, mut server) = tokio::io::duplex(4096);
        tokio::io::AsyncWriteExt::write_all(&mut client, &bytes).await.unwrap();
        drop(client);
        let header = read_header(&mut server).await;
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        (header, rest)
    }

    #[tokio::test]
    async fn reading_takes_the_header_and_not_one_byte_more() {
        let mut v1 = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n".to_vec();
        v1.extend_from_slice(b"GET /ws HTTP/1.1\r\n");
        assert_eq!(
            read_then_rest(v1).await,
            (Ok(Header::Proxied(addr("192.0.2.1:56324"))), b"GET /ws HTTP/1.1\r\n".to_vec())
        );
        let mut short = b"PROXY UNKNOWN\r\n".to_vec();
        short.push(0x16);
        assert_eq!(read_then_rest(short).await, (Ok(Header::Local), vec![0x16]));
        let mut local = v2(0, 0, &[]);
        local.extend_from_slice(b"GET");
        assert_eq!(read_then_rest(local).await, (Ok(Header::Local), b"GET".to_vec()));
        assert_eq!(read_then_rest(b"PROXY TCP4 1.2".to_vec()).await.0, Err(Error::Closed));
        assert_eq!(read_then_rest(b"GET /ws HTTP/1.1\r\n".to_vec()).await.0, Err(Error::NotProxy));
    }

    proptest! {
        /// Any input: an error or a decision, never a panic; a header ends within the input.
        #[test]
        fn any_bytes_parse_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(Parsed::Done { len, .. }) = parse(&bytes) {
                prop_assert!(len <= bytes.len());
            }
        }

        /// Fed the bytes `Need` asks for, one read at a time, the parser reaches the same answer
        /// as with the whole input, and never asks for a byte past the header's end.
        #[test]
        fn what_it_needs_never_runs_past_the_header(
            src in any::<[u8; 4]>(),
            port in any::<u16>(),
            tail in proptest::collection::vec(any::<u8>(), 0..40),
            text in any::<bool>(),
        ) {
            let header = if text {
                format!("PROXY TCP4 {} 127.0.0.1 {port} 80\r\n", Ipv4Addr::from(src)).into_bytes()
            } else {
                v2_tcp4(src, port)
            };
            let mut input = header.clone();
            input.extend_from_slice(&tail);
            let mut have = 5;
            loop {
                match parse(&input[..have]).unwrap() {
                    Parsed::Need(n) => {
                        have += n;
                        prop_assert!(have <= header.len(), "asked past the header's end");
                    }
                    Parsed::Done { header: h, len } => {
                        prop_assert_eq!(len, header.len());
                        prop_assert_eq!(h, Header::Proxied(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(src)), port)));
                        break;
                    }
                }
            }
        }
    }
}
