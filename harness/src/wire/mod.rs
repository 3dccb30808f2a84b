//! What the harness speaks on a socket: the WebSocket client, HTTP/1.1, RESP, the TLS that
//! wraps the first two, and TCP from a chosen loopback source address.

pub(crate) mod client;
pub(crate) mod http;
pub(crate) mod resp;
pub(crate) mod tcp;
pub(crate) mod tls;
