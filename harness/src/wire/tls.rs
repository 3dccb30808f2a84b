//! TLS for servers started with `tls: true`: a fresh certificate authority and a `localhost` /
//! 127.0.0.1 leaf certificate per server (written as PEM files for `--tls-cert` / `--tls-key`),
//! the client configuration that trusts that CA and nothing else, and [`Stream`], the socket
//! the WebSocket and HTTP clients speak through — plain TCP or TLS over it.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

/// The name the client sends as SNI and the certificate is issued for (with IP 127.0.0.1).
pub(crate) const SERVER_NAME: &str = "localhost";

/// A generated certificate pair on disk, and how to connect to the server that uses it.
#[derive(Clone)]
pub(crate) struct ServerTls {
    /// The leaf certificate (PEM), for `--tls-cert`.
    pub(crate) cert: PathBuf,
    /// Its private key (PEM), for `--tls-key`.
    pub(crate) key: PathBuf,
    /// The first line of the key's base64, to make sure no log ever shows it.
    pub(crate) key_marker: String,
    /// A client that trusts only the generated CA.
    pub(crate) client: TlsClient,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").field("cert", &self.cert).field("key", &self.key).finish_non_exhaustive()
    }
}

/// A TLS client configuration: one root (the generated CA), SNI `localhost`, ALPN `http/1.1`.
#[derive(Clone)]
pub(crate) struct TlsClient {
    connector: TlsConnector,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsClient")
    }
}

fn rcgen_error(what: &str) -> impl Fn(rcgen::Error) -> String + '_ {
    move |e| format!("cannot generate the {what}: {e}")
}

/// Generates a CA and a leaf certificate for `localhost` and 127.0.0.1 signed by it, and writes
/// `ca.pem`, `cert.pem` and `key.pem` into `dir` (created if needed). `name` goes into the
/// subjects' common names.
pub(crate) fn generate(dir: &Path, name: &str) -> Result<ServerTls, String> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(rcgen_error("CA"))?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, format!("wsgate-harness CA for {name}"));
    let ca_key = KeyPair::generate().map_err(rcgen_error("CA key"))?;
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).map_err(rcgen_error("CA"))?;

    let key = KeyPair::generate().map_err(rcgen_error("server key"))?;
    let mut params = CertificateParams::new(vec![SERVER_NAME.to_string()]).map_err(rcgen_error("certificate"))?;
    params.subject_alt_names.push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
    params.distinguished_name.push(DnType::CommonName, format!("wsgate {name}"));
    let cert = params.signed_by(&key, &ca).map_err(rcgen_error("certificate"))?;

    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let write = |file: &str, text: &str| {
        let path = dir.join(file);
        std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok::<PathBuf, String>(path)
    };
    let ca_pem = ca.pem();
    write("ca.pem", &ca_pem)?;
    let cert_path = write("cert.pem", &cert.pem())?;
    let key_pem = key.serialize_pem();
    let key_path = write("key.pem", &key_pem)?;
    let key_marker = key_pem.lines().find(|l| !l.starts_with("-----")).unwrap_or_default().to_string();
    Ok(ServerTls { cert: cert_path, key: key_path, key_marker, client: TlsClient::trusting(ca_pem.as_bytes())? })
}

impl TlsClient {
    /// A client whose only root is the CA certificate in `ca_pem`.
    pub(crate) fn trusting(ca_pem: &[u8]) -> Result<TlsClient, String> {
        let ca = CertificateDer::from_pem_slice(ca_pem).map_err(|e| format!("the CA certificate: {e}"))?;
        let mut roots = RootCertStore::empty();
        roots.add(ca).map_err(|e| format!("the CA certificate: {e}"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS client: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsClient { connector: TlsConnector::from(Arc::new(config)) })
    }

    /// The TLS handshake over `tcp`, with SNI `localhost`.
    pub(crate) async fn handshake(&self, tcp: TcpStream) -> io::Result<Stream> {
        let name = ServerName::try_from(SERVER_NAME).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok(Stream::Tls(Box::new(self.connector.connect(name, tcp).await?)))
    }
}

/// The `Host` header (and URL authority) for `addr`: over TLS, the certificate's name.
pub(crate) fn host(addr: SocketAddr, tls: bool) -> String {
    if tls { format!("{SERVER_NAME}:{}", addr.port()) } else { addr.to_string() }
}

/// A connection to a listener: plain TCP, or TLS over it.
#[derive(Debug)]
pub(crate) enum Stream {
    Plain(TcpStream),
    /// TLS (boxed: the session state is large).
    Tls(Box<TlsStream<TcpStream>>),
}

/// Connects to `addr`, then (with `tls`) performs the TLS handshake, all before `deadline`.
/// The messages say which part failed. (Clients connect with [`open_from`]; the tests here
/// need no source address.)
#[cfg(test)]
pub(crate) async fn open(addr: SocketAddr, tls: Option<&TlsClient>, deadline: Instant) -> Result<Stream, String> {
    open_from(addr, None, tls, deadline).await
}

/// [`open`], from the source address `from` when given.
pub(crate) async fn open_from(
    addr: SocketAddr,
    from: Option<IpAddr>,
    tls: Option<&TlsClient>,
    deadline: Instant,
) -> Result<Stream, String> {
    let tcp = tokio::time::timeout_at(deadline, crate::wire::tcp::connect(addr, from))
        .await
        .map_err(|_| format!("connecting to {addr} timed out"))?
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let Some(tls) = tls else {
        return Ok(Stream::Plain(tcp));
    };
    tokio::time::timeout_at(deadline, tls.handshake(tcp))
        .await
        .map_err(|_| format!("the TLS handshake with {addr} timed out"))?
        .map_err(|e| format!("the TLS handshake with {addr} failed: {e}"))
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::TlsAcceptor;
    use tokio_rustls::rustls::ServerConfig;
    use tokio_rustls::rustls::pki_types::PrivateKeyDer;

    /// A TLS acceptor serving the pair `generate` wrote, as wsgate would.
    pub(crate) fn acceptor(tls: &ServerTls) -> TlsAcceptor {
        let chain = vec![CertificateDer::from_pem_file(&tls.cert).unwrap()];
        let key = PrivateKeyDer::from_pem_file(&tls.key).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        TlsAcceptor::from(Arc::new(config))
    }

    fn soon() -> Instant {
        Instant::now() + std::time::Duration::from_secs(5)
    }

    #[tokio::test]
    async fn the_generated_certificate_is_trusted_for_localhost_only_by_its_own_ca() {
        let dir = tempfile::tempdir().unwrap();
        let tls = generate(&dir.path().join("tls"), "main").unwrap();
        for file in ["ca.pem", "cert.pem", "key.pem"] {
            assert!(dir.path().join("tls").join(file).is_file(), "{file}");
        }
        assert!(tls.key_marker.len() >= 16, "{:?}", tls.key_marker.len());
        let acceptor = acceptor(&tls);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                if let Ok(mut s) = acceptor.accept(tcp).await {
                    let mut buf = [0u8; 5];
                    s.read_exact(&mut buf).await.unwrap();
                    s.write_all(&buf).await.unwrap();
                    s.shutdown().await.unwrap();
                }
            }
        });
        let mut s = open(addr, Some(&tls.client), soon()).await.unwrap();
        let Stream::Tls(inner) = &s else { panic!("plain") };
        assert_eq!(inner.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        s.write_all(b"hello").await.unwrap();
        let mut echo = Vec::new();
        s.read_to_end(&mut echo).await.unwrap();
        assert_eq!(echo, b"hello");

        // Another server's CA does not vouch for this certificate.
        let other = generate(&dir.path().join("other"), "other").unwrap();
        let e = open(addr, Some(&other.client), soon()).await.unwrap_err();
        assert!(e.starts_with(&format!("the TLS handshake with {addr} failed: ")), "{e}");
    }
}
