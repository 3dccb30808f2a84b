//! TCP connections from a chosen source address: Linux routes all of 127.0.0.0/8 to the loopback
//! interface, so a client bound to 127.0.0.2, 127.0.0.3, … is a distinct client address to the
//! server (and to a proxy in front of it) without any network setup.

use std::io;
use std::net::{IpAddr, SocketAddr};

use tokio::net::{TcpSocket, TcpStream};

/// Connects to `addr`, from `from` (any port) when given, else from wherever the kernel picks.
pub(crate) async fn connect(addr: SocketAddr, from: Option<IpAddr>) -> io::Result<TcpStream> {
    let Some(from) = from else {
        return TcpStream::connect(addr).await;
    };
    let socket = if from.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_client_bound_to_another_loopback_address_is_seen_from_it() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let from: IpAddr = "127.0.0.7".parse().unwrap();
        let (client, accepted) = tokio::join!(connect(addr, Some(from)), listener.accept());
        client.unwrap();
        assert_eq!(accepted.unwrap().1.ip(), from);
        let (client, accepted) = tokio::join!(connect(addr, None), listener.accept());
        client.unwrap();
        assert_eq!(accepted.unwrap().1.ip(), IpAddr::from([127, 0, 0, 1]));
    }
}
