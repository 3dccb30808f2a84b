//! Who the client is, behind load balancers (`--trusted-proxies`, `--proxy-protocol`).
//!
//! A connection arrives from a peer. When that peer is in a trusted range it is a proxy, and
//! the client is whoever the proxy says: first the PROXY protocol header on a `--proxy-protocol`
//! listener ([`protocol`]), then the forwarding headers of the HTTP request ([`trusted`]). From
//! any other peer nothing of the sort is believed. The client address found here is what every
//! per-address decision sees (`max_per_ip`, reconnect windows, `request.ip`, `conn.ip`, logs,
//! the decision log); the peer itself only decides whether the connection is served at all and
//! whether it is exempt from the per-address handshake cap ([`crate::limits::handshaking`]).

pub mod protocol;
pub mod trusted;

use std::net::IpAddr;

use crate::http::Request;
use crate::policy::decision::Scheme;
use trusted::{ForwardedHeader, TrustedProxies, forwarded};

/// How the public listener treats proxies.
#[derive(Debug, Clone, Default)]
pub struct Proxies {
    /// `--trusted-proxies`: the peers whose word about the client is taken.
    pub trusted: TrustedProxies,
    /// `--forwarded-header`: where they write it in the request.
    pub header: ForwardedHeader,
    /// `--proxy-protocol`: every connection starts with a PROXY header, from a trusted peer.
    pub protocol: bool,
    /// Connections from peers outside the trusted ranges are closed at once: the listener is
    /// plaintext on a non-loopback address and only serves through the proxies (or it expects
    /// PROXY headers, which only trusted peers may send).
    pub closes_untrusted: bool,
}

/// Who a handshake is from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Client {
    /// The client's address.
    pub ip: IpAddr,
    /// Whether it used TLS: to this server, or (as a trusted proxy says) to the proxy.
    pub scheme: Scheme,
}

impl Proxies {
    /// Whether `peer` is a trusted proxy.
    pub fn is_trusted(&self, peer: IpAddr) -> bool {
        self.trusted.contains(peer)
    }

    /// Whether only the trusted proxies are served: every other peer is closed at once.
    pub fn serves_only_proxies(&self) -> bool {
        self.protocol || self.closes_untrusted
    }

    /// Whether a connection from `peer` is served at all, before anything is read from it.
    pub fn serves(&self, peer: IpAddr) -> bool {
        !self.serves_only_proxies() || self.is_trusted(peer)
    }

    /// The client behind a request from `peer` (the TCP peer, or the address its PROXY header
    /// named), which arrived over TLS or not.
    pub fn client(&self, peer: IpAddr, request: &Request, tls: bool) -> Client {
        let own = if tls { Scheme::Wss } else { Scheme::Ws };
        let said = forwarded(&self.trusted, self.header, peer, request);
        Client { ip: said.ip, scheme: said.scheme.unwrap_or(own) }
    }
}
