//! Which peers are proxies (`--trusted-proxies`), and what a proxy's forwarding headers say about
//! the client behind it.
//!
//! Each proxy on the way appends the address it received the request from, so the list in
//! `X-Forwarded-For` (or RFC 7239 `Forwarded`) grows to the right, and only the entries a trusted
//! proxy wrote are worth anything: whatever the client sent arrives on the left, untouched. The
//! client is therefore found by walking from the right — from the peer itself — for as long as
//! the address at hand is a trusted proxy: the first entry that is not is the client. An entry
//! that does not parse (or RFC 7239's `unknown` and obfuscated names) ends the walk at the last
//! trusted hop, never further left.

use std::net::{IpAddr, SocketAddr};

use crate::http::Request;
use crate::policy::decision::Scheme;

/// Most forwarding entries looked at, from the right: more proxies than this in a row is not a
/// deployment, and the head is bounded anyway.
const MAX_HOPS: usize = 32;
/// Most ranges `--trusted-proxies` may list (each connection's peer is checked against them).
pub(crate) const MAX_RANGES: usize = 256;

/// One address range: `10.0.0.0/8`, `2001:db8::/32`, or a single address (`/32`, `/128`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// The network address (no bits set past `len`).
    network: IpAddr,
    /// The prefix length.
    len: u8,
}

/// Bits of an address as a number, and how many there are.
fn bits(ip: IpAddr) -> (u128, u8) {
    match ip {
        IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32),
        IpAddr::V6(v6) => (u128::from(v6), 128),
    }
}

/// The mask of a `len`-bit prefix in a `width`-bit address.
fn mask(len: u8, width: u8) -> u128 {
    if len == 0 { 0 } else { (u128::MAX << (128 - u32::from(len))) >> (128 - u32::from(width)) }
}

impl Cidr {
    /// Parses `ADDR/LEN` or a bare address. IPv4-mapped IPv6 ranges are refused (clients'
    /// IPv4-mapped addresses are compared as IPv4: write the range as IPv4), and so is a range
    /// with bits set past its length (`10.0.0.1/8` is a typo more often than not).
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let s = s.trim();
        let example = "e.g. 10.0.0.0/8, 192.0.2.7 or 2001:db8::/32";
        let (addr, len) = match s.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (s, None),
        };
        let ip: IpAddr = addr.parse().map_err(|_| format!("`{s}` is not an address range ({example})"))?;
        if let IpAddr::V6(v6) = ip
            && v6.to_ipv4_mapped().is_some()
        {
            return Err(format!("`{s}` is an IPv4-mapped range: write it as IPv4"));
        }
        let (value, width) = bits(ip);
        let len = match len {
            None => width,
            Some(l) if !l.is_empty() && l.len() <= 3 && l.bytes().all(|b| b.is_ascii_digit()) => {
                l.parse::<u8>().ok().filter(|n| *n <= width).ok_or_else(|| {
                    format!(
                        "`{s}`: the prefix length of an IPv{} range is 0 to {width}",
                        if width == 32 { 4 } else { 6 }
                    )
                })?
            }
            Some(_) => return Err(format!("`{s}` is not an address range ({example})")),
        };
        if value & !mask(len, width) != 0 {
            let network = match ip {
                IpAddr::V4(_) => IpAddr::from(std::net::Ipv4Addr::from((value & mask(len, width)) as u32)),
                IpAddr::V6(_) => IpAddr::from(std::net::Ipv6Addr::from(value & mask(len, width))),
            };
            return Err(format!("`{s}` has bits set past /{len}: did you mean {network}/{len}?"));
        }
        Ok(Cidr { network: ip, len })
    }

    /// Whether `ip` is in the range (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (want, width) = bits(self.network);
        let (have, have_width) = bits(ip.to_canonical());
        width == have_width && have & mask(self.len, width) == want
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.len)
    }
}

/// The ranges `--trusted-proxies` names. Empty: no peer is a proxy, and forwarding headers are
/// never read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    ranges: Vec<Cidr>,
}

impl TrustedProxies {
    /// Parses a comma-separated list of ranges (at least one, at most [`MAX_RANGES`]).
    pub fn parse(list: &str) -> Result<TrustedProxies, String> {
        let ranges = list.split(',').map(Cidr::parse).collect::<Result<Vec<_>, _>>()?;
        if ranges.len() > MAX_RANGES {
            return Err(format!("{} ranges; at most {MAX_RANGES}", ranges.len()));
        }
        Ok(TrustedProxies { ranges })
    }

    /// Whether no range is configured.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Whether `ip` is in one of the ranges.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.ranges.iter().any(|r| r.contains(ip))
    }

    /// The ranges, for the start-up log.
    pub fn ranges(&self) -> &[Cidr] {
        &self.ranges
    }
}

/// Which header the trusted proxies write the client's address into.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ForwardedHeader {
    /// `X-Forwarded-For`, with the scheme in `X-Forwarded-Proto` (HAProxy `option forwardfor`,
    /// nginx, AWS ALB, most load balancers).
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=…;proto=…` (HAProxy `option forwarded`, Envoy, some CDNs).
    Forwarded,
}

/// What the forwarding headers say about the client: its address, and the scheme it used when
/// the proxies said so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forwarded {
    /// The client's address.
    pub ip: IpAddr,
    /// `X-Forwarded-Proto` (or `proto=`): `None` when absent or neither `http(s)` nor `ws(s)`.
    pub scheme: Option<Scheme>,
}

/// Walks the entries written right to left, starting at `peer`: the first address that is not
/// trusted is the client. Returns it, and the position (from the right) of the entry it came
/// from (`None`: the peer itself).
fn walk(
    trusted: &TrustedProxies,
    peer: IpAddr,
    from_right: impl Iterator<Item = Option<IpAddr>>,
) -> (IpAddr, Option<usize>) {
    let mut client = (peer, None);
    for (i, entry) in from_right.take(MAX_HOPS).enumerate() {
        if !trusted.contains(client.0) {
            break;
        }
        match entry {
            Some(ip) => client = (ip.to_canonical(), Some(i)),
            None => break,
        }
    }
    client
}

/// Every comma-separated entry of every `name` header, in order (left to right).
fn list<'a>(request: &'a Request, name: &'a str) -> Vec<&'a str> {
    request.headers.iter().filter(|(n, _)| n == name).flat_map(|(_, v)| v.split(',')).map(str::trim).collect()
}

/// What `request`'s forwarding headers say, when `peer` — the address that sent it — is trusted.
/// From any other peer the headers are not read at all.
pub fn forwarded(trusted: &TrustedProxies, header: ForwardedHeader, peer: IpAddr, request: &Request) -> Forwarded {
    let peer = peer.to_canonical();
    if !trusted.contains(peer) {
        return Forwarded { ip: peer, scheme: None };
    }
    match header {
        ForwardedHeader::XForwardedFor => {
            let hops = list(request, "x-forwarded-for");
            let (ip, at) = walk(trusted, peer, hops.iter().rev().map(|e| node(e)));
            // Each proxy that appends its own entry to `X-Forwarded-Proto` as well keeps the two
            // lists aligned; one that overwrites it leaves one value. Either way the rightmost
            // value is the nearest trusted proxy's, never a client's.
            let protos = list(request, "x-forwarded-proto");
            let proto = match at {
                Some(i) if protos.len() == hops.len() => protos.get(protos.len() - 1 - i),
                _ => protos.last(),
            };
            Forwarded { ip, scheme: proto.and_then(|p| scheme(p)) }
        }
        ForwardedHeader::Forwarded => {
            let elements: Vec<Vec<(String, String)>> =
                request.headers.iter().filter(|(n, _)| n == "forwarded").flat_map(|(_, v)| elements(v)).collect();
            let fors = elements.iter().rev().map(|pairs| param(pairs, "for").and_then(node));
            let (ip, at) = walk(trusted, peer, fors);
            // The element that named the client also says how the client reached that proxy.
            let proto = at.and_then(|i| param(&elements[elements.len() - 1 - i], "proto"));
            Forwarded { ip, scheme: proto.and_then(scheme) }
        }
    }
}

/// The scheme a proxy reports: `https`/`wss` is TLS, `http`/`ws` is not; anything else says
/// nothing.
fn scheme(value: &str) -> Option<Scheme> {
    match value.trim().to_ascii_lowercase().as_str() {
        "https" | "wss" => Some(Scheme::Wss),
        "http" | "ws" => Some(Scheme::Ws),
        _ => None,
    }
}

/// One node of a forwarding list: `192.0.2.1`, `192.0.2.1:443`, `2001:db8::1`, `[2001:db8::1]`,
/// `[2001:db8::1]:443`. Anything else (`unknown`, `_hidden`, garbage) is `None`.
pub(crate) fn node(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    if let Some(rest) = entry.strip_prefix('[') {
        let (addr, after) = rest.split_once(']')?;
        let ip: std::net::Ipv6Addr = addr.parse().ok()?;
        return match after {
            "" => Some(IpAddr::V6(ip)),
            port if port.strip_prefix(':').is_some_and(is_port) => Some(IpAddr::V6(ip)),
            _ => None,
        };
    }
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(ip);
    }
    // `a.b.c.d:port` (a bare IPv6 address never has a port without brackets).
    entry.parse::<SocketAddr>().ok().filter(SocketAddr::is_ipv4).map(|a| a.ip())
}

fn is_port(s: &str) -> bool {
    !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit()) && s.parse::<u16>().is_ok()
}

/// The elements of one `Forwarded` header value (RFC 7239 §4): comma-separated, each a list of
/// `;`-separated `name=value` pairs, values tokens or quoted strings (which may hold `,` and
/// `;`). Names are lower-cased; quoted values unescaped.
fn elements(value: &str) -> Vec<Vec<(String, String)>> {
    let mut out = vec![Vec::new()];
    let mut name = String::new();
    let mut val = String::new();
    let mut in_value = false;
    let mut quoted = false;
    let mut chars = value.chars();
    let finish = |name: &mut String, val: &mut String, element: &mut Vec<(String, String)>| {
        let n = name.trim().to_ascii_lowercase();
        if !n.is_empty() {
            element.push((n, val.trim().to_string()));
        }
        name.clear();
        val.clear();
    };
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '\\') => val.extend(chars.next()),
            (true, '"') => quoted = false,
            (true, c) => val.push(c),
            (false, '"') if in_value => quoted = true,
            (false, '=') if !in_value => in_value = true,
            (false, ';') => {
                finish(&mut name, &mut val, out.last_mut().expect("never empty"));
                in_value = false;
            }
            (false, ',') => {
                finish(&mut name, &mut val, out.last_mut().expect("never empty"));
                in_value = false;
                out.push(Vec::new());
            }
            (false, c) if in_value => val.push(c),
            (false, c) => name.push(c),
        }
    }
    finish(&mut name, &mut val, out.last_mut().expect("never empty"));
    out
}

/// The first value of parameter `name` in one element.
fn param<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn request(headers: &[(&str, &str)]) -> Request {
        Request {
            method: "GET".into(),
            path: "/ws".into(),
            query: String::new(),
            headers: headers.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect(),
            rest: Vec::new(),
        }
    }

    fn trusted(list: &str) -> TrustedProxies {
        TrustedProxies::parse(list).unwrap()
    }

    #[test]
    fn ranges_parse_strictly_and_match_their_addresses() {
        let r = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(r.contains(ip("10.255.1.2")) && !r.contains(ip("11.0.0.1")));
        assert!(r.contains(ip("::ffff:10.1.2.3")), "IPv4-mapped counts as IPv4");
        assert!(!r.contains(ip("::a00:1")), "an IPv6 address is never in an IPv4 range");
        let one = Cidr::parse("192.0.2.7").unwrap();
        assert!(one.contains(ip("192.0.2.7")) && !one.contains(ip("192.0.2.8")));
        let v6 = Cidr::parse("2001:db8::/32").unwrap();
        assert!(v6.contains(ip("2001:db8:ffff::1")) && !v6.contains(ip("2001:db9::1")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("203.0.113.9")));
        assert!(Cidr::parse("::/0").unwrap().contains(ip("2001:db8::1")));
        assert_eq!(Cidr::parse(" 127.0.0.1/32 ").unwrap().to_string(), "127.0.0.1/32");
        for bad in [
            "",
            "10.0.0.0/",
            "10.0.0.0/33",
            "::/129",
            "10.0.0.0/+8",
            "10.0.0.0/08x",
            "10.0.0/8",
            "x/8",
            "::ffff:10.0.0.0/104",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
        let e = Cidr::parse("10.0.0.1/8").unwrap_err();
        assert!(e.contains("did you mean 10.0.0.0/8"), "{e}");
    }

    #[test]
    fn a_list_is_comma_separated_and_bounded() {
        let t = trusted("10.0.0.0/8, 192.0.2.1,2001:db8::/32");
        assert_eq!(t.ranges().len(), 3);
        assert!(t.contains(ip("192.0.2.1")) && t.contains(ip("2001:db8::5")) && !t.contains(ip("192.0.2.2")));
        assert!(TrustedProxies::parse("10.0.0.0/8,").is_err(), "an empty entry is a typo");
        assert!(TrustedProxies::parse("").is_err());
        let many = vec!["10.0.0.1"; MAX_RANGES + 1].join(",");
        assert!(TrustedProxies::parse(&many).is_err());
    }

    #[test]
    fn the_client_is_the_rightmost_entry_that_is_not_trusted() {
        let t = trusted("10.0.0.0/8");
        let xff = |v: &str| {
            forwarded(&t, ForwardedHeader::XForwardedFor, ip("10.0.0.1"), &request(&[("x-forwarded-for", v)]))
        };
        assert_eq!(xff("203.0.113.9").ip, ip("203.0.113.9"));
        // A client that forges the header only adds entries on the left.
        assert_eq!(xff("198.51.100.1, 203.0.113.9").ip, ip("203.0.113.9"));
        // Proxies in a row: every trusted hop is skipped.
        assert_eq!(xff("203.0.113.9, 10.1.1.1, 10.2.2.2").ip, ip("203.0.113.9"));
        // Everything trusted: the leftmost entry.
        assert_eq!(xff("10.3.3.3, 10.1.1.1").ip, ip("10.3.3.3"));
        // Garbage or an empty entry ends the walk at the last trusted hop.
        assert_eq!(xff("203.0.113.9, garbage").ip, ip("10.0.0.1"));
        assert_eq!(xff("203.0.113.9, 10.1.1.1, unknown").ip, ip("10.0.0.1"));
        assert_eq!(xff("198.51.100.1, garbage, 10.1.1.1").ip, ip("10.1.1.1"));
        assert_eq!(xff("").ip, ip("10.0.0.1"));
        // Ports, brackets, IPv4-mapped.
        assert_eq!(xff("203.0.113.9:4711").ip, ip("203.0.113.9"));
        assert_eq!(xff("[2001:db8::1]:4711").ip, ip("2001:db8::1"));
        assert_eq!(xff("2001:db8::1").ip, ip("2001:db8::1"));
        assert_eq!(xff("::ffff:203.0.113.9").ip, ip("203.0.113.9"));
        // Several headers are one list, in order.
        let two = request(&[("x-forwarded-for", "198.51.100.1"), ("x-forwarded-for", "203.0.113.9, 10.9.9.9")]);
        assert_eq!(forwarded(&t, ForwardedHeader::XForwardedFor, ip("10.0.0.1"), &two).ip, ip("203.0.113.9"));
    }

    #[test]
    fn an_untrusted_peer_is_itself_whatever_its_headers_say() {
        let t = trusted("10.0.0.0/8");
        let r = request(&[
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-proto", "https"),
            ("forwarded", "for=203.0.113.9;proto=https"),
        ]);
        for header in [ForwardedHeader::XForwardedFor, ForwardedHeader::Forwarded] {
            let f = forwarded(&t, header, ip("198.51.100.7"), &r);
            assert_eq!(f, Forwarded { ip: ip("198.51.100.7"), scheme: None });
        }
        let none = TrustedProxies::default();
        assert_eq!(forwarded(&none, ForwardedHeader::XForwardedFor, ip("10.0.0.1"), &r).ip, ip("10.0.0.1"));
    }

    #[test]
    fn the_scheme_is_the_nearest_trusted_proxys_word() {
        let t = trusted("10.0.0.0/8");
        let at = |headers: &[(&str, &str)]| {
            forwarded(&t, ForwardedHeader::XForwardedFor, ip("10.0.0.1"), &request(headers)).scheme
        };
        assert_eq!(at(&[("x-forwarded-for", "203.0.113.9"), ("x-forwarded-proto", "https")]), Some(Scheme::Wss));
        assert_eq!(at(&[("x-forwarded-for", "203.0.113.9"), ("x-forwarded-proto", "HTTP")]), Some(Scheme::Ws));
        assert_eq!(at(&[("x-forwarded-for", "203.0.113.9")]), None);
        assert_eq!(at(&[("x-forwarded-for", "203.0.113.9"), ("x-forwarded-proto", "gopher")]), None);
        // A client's forged value stays on the left when the proxy appends.
        assert_eq!(at(&[("x-forwarded-for", "203.0.113.9"), ("x-forwarded-proto", "https, http")]), Some(Scheme::Ws));
        // Lists kept aligned by two proxies: the value beside the client's entry.
        let aligned = [("x-forwarded-for", "203.0.113.9, 10.1.1.1"), ("x-forwarded-proto", "https, http")];
        assert_eq!(at(&aligned), Some(Scheme::Wss));
        // A trusted peer without any forwarded address still says the scheme.
        assert_eq!(at(&[("x-forwarded-proto", "https")]), Some(Scheme::Wss));
    }

    #[test]
    fn rfc_7239_for_and_proto() {
        let t = trusted("10.0.0.0/8");
        let fwd = |v: &str| forwarded(&t, ForwardedHeader::Forwarded, ip("10.0.0.1"), &request(&[("forwarded", v)]));
        assert_eq!(fwd("for=203.0.113.9"), Forwarded { ip: ip("203.0.113.9"), scheme: None });
        assert_eq!(fwd("for=198.51.100.1, For=203.0.113.9;proto=https;by=10.0.0.1").scheme, Some(Scheme::Wss));
        assert_eq!(fwd("for=198.51.100.1, For=203.0.113.9;proto=https").ip, ip("203.0.113.9"));
        assert_eq!(
            fwd(r#"for="[2001:db8:cafe::17]:4711";proto=http"#),
            Forwarded { ip: ip("2001:db8:cafe::17"), scheme: Some(Scheme::Ws) }
        );
        assert_eq!(fwd(r#"for="203.0.113.9:80""#).ip, ip("203.0.113.9"));
        // A quoted value may hold the separators.
        assert_eq!(fwd(r#"for="_a,b;c", for=203.0.113.9"#).ip, ip("203.0.113.9"));
        // Trusted hops are skipped; `unknown` and obfuscated names end the walk.
        assert_eq!(fwd("for=203.0.113.9;proto=https, for=10.1.1.1;proto=http").scheme, Some(Scheme::Wss));
        assert_eq!(fwd("for=203.0.113.9, for=unknown").ip, ip("10.0.0.1"));
        assert_eq!(fwd("for=203.0.113.9, for=_hidden").ip, ip("10.0.0.1"));
        assert_eq!(fwd("by=10.0.0.1").ip, ip("10.0.0.1"));
        // X-Forwarded-For is not read when Forwarded is the header.
        let both = request(&[("x-forwarded-for", "198.51.100.1"), ("forwarded", "for=203.0.113.9")]);
        assert_eq!(forwarded(&t, ForwardedHeader::Forwarded, ip("10.0.0.1"), &both).ip, ip("203.0.113.9"));
        assert_eq!(forwarded(&t, ForwardedHeader::XForwardedFor, ip("10.0.0.1"), &both).ip, ip("198.51.100.1"));
    }

    #[test]
    fn the_walk_is_bounded() {
        let t = trusted("10.0.0.0/8");
        let mut hops = vec!["203.0.113.9".to_string()];
        hops.extend((0..100).map(|i| format!("10.0.0.{}", i % 250 + 1)));
        let f = forwarded(
            &t,
            ForwardedHeader::XForwardedFor,
            ip("10.0.0.1"),
            &request(&[("x-forwarded-for", &hops.join(","))]),
        );
        assert!(t.contains(f.ip), "past {MAX_HOPS} hops the walk stops at a trusted hop, never at a forged entry");
    }

    proptest::proptest! {
        #[test]
        fn any_header_walks_without_panicking(xff in ".{0,300}", fwd in ".{0,300}", proto in ".{0,40}") {
            let t = trusted("10.0.0.0/8,2001:db8::/32");
            let r = request(&[("x-forwarded-for", &xff), ("forwarded", &fwd), ("x-forwarded-proto", &proto)]);
            for header in [ForwardedHeader::XForwardedFor, ForwardedHeader::Forwarded] {
                let _ = forwarded(&t, header, ip("10.0.0.1"), &r);
            }
            let _ = Cidr::parse(&xff);
        }
    }
}
