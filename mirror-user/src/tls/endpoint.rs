//! TLS 1.3 endpoints with mutual certificates: [`TlsServer`] accepts, [`TlsClient`] connects,
//! each on a blocking `TcpStream` (rustls `StreamOwned`) or on any tokio stream (tokio-rustls).
//! Both return the peer's identity (the node its certificate names) for the caller to log and to
//! use as the peer's name; a handshake that does not finish within its timeout is abandoned.
//!
//! Sessions are never resumed: every connection runs the full certificate check, and replication
//! connections live long enough that the saved round trip would not show.

use std::{
    io::{ErrorKind, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use rustls::{
    pki_types::ServerName,
    server::{NoServerSessionStorage, WebPkiClientVerifier},
    version::TLS13,
    ClientConfig, ClientConnection, ConnectionCommon, ServerConfig, ServerConnection, SideData, StreamOwned,
};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    cert::CertInfo,
    creds::{Credentials, Endpoint},
    error::TlsError,
    provider,
    verify::{explain, ClientAuth, NodeClientVerifier, NodeServerVerifier, PeerPolicy},
};

/// How long a TLS handshake may take by default (the protocol handshake's own timeout).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is at the other end, as its certificate (verified) says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The node name: the certificate's common name, else its first DNS name.
    pub node: String,
    pub cert: CertInfo,
}

impl PeerIdentity {
    fn of<D: SideData>(conn: &ConnectionCommon<D>) -> Result<Option<PeerIdentity>, TlsError> {
        let Some(der) = conn.peer_certificates().and_then(|c| c.first()) else { return Ok(None) };
        let cert = CertInfo::parse(der).map_err(|e| TlsError::Handshake(rustls::Error::General(e)))?;
        let node = cert.node_name().unwrap_or_default().to_string();
        Ok(Some(PeerIdentity { node, cert }))
    }
}

impl std::fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.node)
    }
}

/// What either end needs to name the reason of a failure: the CA file peers are checked against
/// and the end the peer plays.
#[derive(Debug, Clone)]
struct Judge {
    ca: PathBuf,
    peer_end: Endpoint,
}

impl Judge {
    fn handshake_error(&self, e: std::io::Error, timeout: Duration) -> TlsError {
        if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
            return TlsError::Timeout { after: timeout };
        }
        explain(e, &self.ca, self.peer_end, true)
    }

    /// Runs an async handshake within `timeout`.
    async fn within<T>(
        &self,
        timeout: Duration,
        handshake: impl std::future::Future<Output = std::io::Result<T>>,
    ) -> Result<T, TlsError> {
        tokio::time::timeout(timeout, handshake)
            .await
            .map_err(|_| TlsError::Timeout { after: timeout })?
            .map_err(|e| self.handshake_error(e, timeout))
    }
}

fn require_endpoint(creds: &Credentials, wanted: Endpoint) -> Result<(), TlsError> {
    if creds.endpoint() == wanted {
        return Ok(());
    }
    Err(TlsError::WrongEndpoint { dir: creds.dir().to_path_buf(), loaded: creds.endpoint(), wanted })
}

/// The accepting end: presents `server-cert.pem`, checks clients' certificates.
#[derive(Debug, Clone)]
pub struct TlsServer {
    config: Arc<ServerConfig>,
    judge: Judge,
    /// Our own certificate.
    pub identity: CertInfo,
}

impl TlsServer {
    /// A TLS 1.3 server from checked server credentials.
    pub fn new(creds: &Credentials, auth: ClientAuth) -> Result<TlsServer, TlsError> {
        require_endpoint(creds, Endpoint::Server)?;
        let provider = provider();
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&TLS13])
            .map_err(TlsError::Config)?;
        let builder = match auth {
            ClientAuth::Required(policy) => builder.with_client_cert_verifier(Arc::new(
                NodeClientVerifier::new(creds.roots().clone(), provider, policy, creds.ca_path())?,
            )),
            ClientAuth::NotRequested => {
                builder.with_client_cert_verifier(WebPkiClientVerifier::no_client_auth())
            }
        };
        let mut config = builder.with_single_cert(creds.chain(), creds.key()).map_err(TlsError::Config)?;
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(TlsServer {
            config: Arc::new(config),
            judge: Judge { ca: creds.ca_path().to_path_buf(), peer_end: Endpoint::Client },
            identity: creds.info().clone(),
        })
    }

    /// Loads `dir`'s server credentials (checked at `now`) and builds the server.
    pub fn from_dir(dir: &Path, auth: ClientAuth, now: SystemTime) -> Result<TlsServer, TlsError> {
        Self::new(&Credentials::load(dir, Endpoint::Server, now)?, auth)
    }

    /// The rustls configuration, for callers that drive connections themselves.
    pub fn config(&self) -> &Arc<ServerConfig> {
        &self.config
    }

    /// Runs the server handshake on a blocking socket, within `timeout` in all. The peer is
    /// `None` only when client certificates are not requested.
    pub fn accept(
        &self,
        mut tcp: TcpStream,
        timeout: Duration,
    ) -> Result<(StreamOwned<ServerConnection, TcpStream>, Option<PeerIdentity>), TlsError> {
        let mut conn = ServerConnection::new(self.config.clone()).map_err(TlsError::Config)?;
        drive(&mut conn, &mut tcp, timeout).map_err(|e| self.judge.handshake_error(e, timeout))?;
        let peer = PeerIdentity::of(&conn)?;
        Ok((StreamOwned::new(conn, tcp), peer))
    }

    /// Runs the server handshake on a tokio stream, within `timeout`.
    pub async fn accept_async<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        io: S,
        timeout: Duration,
    ) -> Result<(tokio_rustls::server::TlsStream<S>, Option<PeerIdentity>), TlsError> {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.config.clone());
        let stream = self.judge.within(timeout, acceptor.accept(io)).await?;
        let peer = PeerIdentity::of(stream.get_ref().1)?;
        Ok((stream, peer))
    }

    /// Names the reason behind an I/O error on an established connection (e.g. the peer's
    /// alert, a corrupted record); plain I/O errors stay [`TlsError::Io`].
    pub fn explain(&self, e: std::io::Error) -> TlsError {
        explain(e, &self.judge.ca, self.judge.peer_end, false)
    }
}

/// The connecting end: presents `client-cert.pem`, checks the server's certificate.
#[derive(Debug, Clone)]
pub struct TlsClient {
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
    judge: Judge,
    /// Our own certificate.
    pub identity: CertInfo,
}

impl TlsClient {
    /// A TLS 1.3 client from checked client credentials; `policy` says which servers it accepts.
    pub fn new(creds: &Credentials, policy: PeerPolicy) -> Result<TlsClient, TlsError> {
        require_endpoint(creds, Endpoint::Client)?;
        // The server name only feeds SNI (the verifier checks the policy's names): the expected
        // node when there is one, else an address, for which no SNI is sent.
        let server_name = match &policy {
            PeerPolicy::Nodes(names) if !names.is_empty() => ServerName::try_from(names[0].clone())
                .map_err(|e| TlsError::InvalidNodeName { name: names[0].clone(), detail: e.to_string() })?,
            _ => ServerName::IpAddress(std::net::Ipv4Addr::UNSPECIFIED.into()),
        };
        let provider = provider();
        let verifier = NodeServerVerifier::new(creds.roots().clone(), provider.clone(), policy);
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&TLS13])
            .map_err(TlsError::Config)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(creds.chain(), creds.key())
            .map_err(TlsError::Config)?;
        config.resumption = rustls::client::Resumption::disabled();
        Ok(TlsClient {
            config: Arc::new(config),
            server_name,
            judge: Judge { ca: creds.ca_path().to_path_buf(), peer_end: Endpoint::Server },
            identity: creds.info().clone(),
        })
    }

    /// Loads `dir`'s client credentials (checked at `now`) and builds the client.
    pub fn from_dir(dir: &Path, policy: PeerPolicy, now: SystemTime) -> Result<TlsClient, TlsError> {
        Self::new(&Credentials::load(dir, Endpoint::Client, now)?, policy)
    }

    pub fn config(&self) -> &Arc<ClientConfig> {
        &self.config
    }

    /// Runs the client handshake on a blocking socket, within `timeout` in all.
    ///
    /// In TLS 1.3 the server judges our certificate after our side has finished: a refusal of
    /// it shows on the first read, which [`TlsClient::explain`] turns into
    /// [`TlsError::RefusedByPeer`].
    pub fn connect(
        &self,
        mut tcp: TcpStream,
        timeout: Duration,
    ) -> Result<(StreamOwned<ClientConnection, TcpStream>, PeerIdentity), TlsError> {
        let mut conn =
            ClientConnection::new(self.config.clone(), self.server_name.clone()).map_err(TlsError::Config)?;
        drive(&mut conn, &mut tcp, timeout).map_err(|e| self.judge.handshake_error(e, timeout))?;
        let peer = PeerIdentity::of(&conn)?.ok_or(TlsError::NoPeerCertificate)?;
        Ok((StreamOwned::new(conn, tcp), peer))
    }

    /// Runs the client handshake on a tokio stream, within `timeout`.
    pub async fn connect_async<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        io: S,
        timeout: Duration,
    ) -> Result<(tokio_rustls::client::TlsStream<S>, PeerIdentity), TlsError> {
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        let stream = self.judge.within(timeout, connector.connect(self.server_name.clone(), io)).await?;
        let peer = PeerIdentity::of(stream.get_ref().1)?.ok_or(TlsError::NoPeerCertificate)?;
        Ok((stream, peer))
    }

    /// Names the reason behind an I/O error on an established connection.
    pub fn explain(&self, e: std::io::Error) -> TlsError {
        explain(e, &self.judge.ca, self.judge.peer_end, false)
    }
}

/// Drives a handshake on a blocking socket to its end, bounded by `timeout` in all (each read
/// and write gets what is left), then gives the socket back its own timeouts.
fn drive<C, D>(conn: &mut C, tcp: &mut TcpStream, timeout: Duration) -> std::io::Result<()>
where
    C: std::ops::DerefMut<Target = ConnectionCommon<D>>,
    D: SideData,
{
    let saved = (tcp.read_timeout()?, tcp.write_timeout()?);
    let deadline = Instant::now() + timeout;
    let result = (|| {
        while conn.is_handshaking() || conn.wants_write() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::Error::from(ErrorKind::TimedOut));
            }
            tcp.set_read_timeout(Some(left))?;
            tcp.set_write_timeout(Some(left))?;
            conn.complete_io(tcp)?;
        }
        tcp.flush()
    })();
    tcp.set_read_timeout(saved.0)?;
    tcp.set_write_timeout(saved.1)?;
    result
}
