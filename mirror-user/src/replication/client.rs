//! The blocking protocol client: connect (TLS or plaintext, per the [`Transport`]),
//! authenticate, call. Used by sync jobs (source server to peer), the CLI, and tests.

use std::{net::TcpStream, time::Duration};

use crate::lease::replica::ReplicaLeaseView;

use super::{
    auth,
    conn::{Conn, ConnError, Stream},
    protocol::{Message, VolumeInfo, MAX_PAYLOAD, VERSION},
    transport::{PeerAddr, PlaintextRefused, Transport},
};
use crate::tls::{TlsError, HANDSHAKE_TIMEOUT};

/// Errors talking to a replica server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error(transparent)]
    Conn(#[from] ConnError),
    #[error("{addr} refused: {message}")]
    Remote { addr: String, code: u16, errno: u32, message: String },
    #[error("{0} failed to prove it knows the shared secret")]
    ServerAuth(String),
    #[error("unexpected reply {0}")]
    Unexpected(String),
    #[error("{addr}: {source}")]
    Tls { addr: String, source: TlsError },
    #[error(transparent)]
    Plaintext(#[from] PlaintextRefused),
}

/// How long a TCP connect may take before the node counts as unreachable (a dead host answers
/// nothing; the kernel's own SYN retries would take about two minutes).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Dials `addr` (each address it resolves to in turn); plaintext only where `transport` allows.
fn connect_tcp(transport: &Transport, addr: &str) -> Result<TcpStream, ClientError> {
    use std::net::ToSocketAddrs;
    let io = |source| ClientError::Connect { addr: addr.into(), source };
    let mut last = None;
    for a in addr.to_socket_addrs().map_err(io)? {
        transport.check(a)?;
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(io(last.unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address"))))
}

fn tls(addr: &str, source: TlsError) -> ClientError {
    ClientError::Tls { addr: addr.into(), source }
}

impl ClientError {
    /// The node did not answer at all (connection refused, timed out, no route): it may be
    /// down. Anything else (a refusal, a failed proof, a certificate refused) is a configuration
    /// error.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ClientError::Connect { .. })
    }
}

/// An authenticated connection to one volume on a replica server.
#[derive(Debug)]
pub struct Client {
    pub conn: Conn,
    pub info: VolumeInfo,
    pub addr: String,
    /// The volume this connection was opened for (what [`Self::attach`] names).
    info_volume: String,
    /// The server's node name, as its certificate says (TLS only).
    pub node: Option<String>,
    next_id: u64,
}

impl Client {
    /// Connects in plaintext (loopback only) and runs the handshake: see [`Self::connect_over`].
    pub fn connect(addr: &str, volume: &str, secret: &[u8]) -> Result<Client, ClientError> {
        Self::connect_over(&Transport::default(), &PeerAddr::any(addr), volume, secret)
    }

    /// Connects to `peer` over `transport` (TLS: the server's certificate checked against the
    /// CA and the pinned node, if any) and runs the protocol handshake (version, mutual HMAC
    /// proof bound to the TLS session, volume), its frames held to the pre-auth cap.
    pub fn connect_over(
        transport: &Transport,
        peer: &PeerAddr,
        volume: &str,
        secret: &[u8],
    ) -> Result<Client, ClientError> {
        let addr = peer.addr.as_str();
        let tcp = connect_tcp(transport, addr)?;
        let io = |source| ClientError::Connect { addr: addr.into(), source };
        let client = transport.client_for(peer).map_err(|source| tls(addr, source))?;
        let (stream, node) = match &client {
            None => (Stream::Plain(tcp), None),
            Some(c) => {
                let (s, id) = c.connect(tcp, HANDSHAKE_TIMEOUT).map_err(|source| tls(addr, source))?;
                (Stream::TlsClient(Box::new(s)), Some(id.node))
            }
        };
        let binding = stream.binding(volume).map_err(|e| tls(addr, TlsError::Handshake(e)))?;
        let _ = stream.tcp().set_read_timeout(Some(Duration::from_secs(30)));
        let mut conn = Conn::over(stream).map_err(io)?;
        conn.set_max_payload(auth::PRE_AUTH_MAX_PAYLOAD);
        let client_nonce = auth::nonce();
        // Under TLS a refusal of our certificate shows on the first read: name it.
        let explain = |e: ConnError| match (e, &client) {
            (ConnError::Io(e), Some(c)) => tls(addr, c.explain(e)),
            (e, _) => ClientError::Conn(e),
        };
        conn.send(0, 0, &Message::Hello { version: VERSION, volume: volume.into(), nonce: client_nonce })
            .and_then(|()| conn.flush())
            .map_err(explain)?;
        let server_nonce = match conn.recv().map_err(explain)?.1 {
            Message::Challenge { nonce, .. } => nonce,
            m => return Err(remote_or_unexpected(addr, m)),
        };
        let ex = auth::Exchange { server_nonce: &server_nonce, client_nonce: &client_nonce, volume, binding };
        conn.send(0, 0, &Message::Auth { mac: ex.client_proof(secret) })?;
        conn.flush()?;
        let (mac, info) = match conn.recv()?.1 {
            Message::Welcome { mac, info } => (mac, info),
            m => return Err(remote_or_unexpected(addr, m)),
        };
        if !ex.verify_server(secret, &mac) {
            return Err(ClientError::ServerAuth(addr.into()));
        }
        conn.set_max_payload(MAX_PAYLOAD);
        let _ = conn.set_read_timeout(None);
        if let Some(n) = &node {
            tracing::debug!(peer = %addr, node = %n, volume, "connected over TLS");
        }
        Ok(Client { conn, info, addr: addr.into(), info_volume: volume.into(), node, next_id: 1 })
    }

    /// Attaches this connection for `holder` at `epoch` (protocol 4; routers and sync jobs do,
    /// right after the Welcome): the replica checks every mutating request on it against its
    /// accepted epoch. `Remote` with `code::FENCED` when a newer holder exists.
    pub fn attach(&mut self, holder: &str, epoch: u64) -> Result<ReplicaLeaseView, ClientError> {
        let volume = self.info_volume.clone();
        match self.call(&Message::Attach { volume, holder: holder.into(), epoch })? {
            Message::Json(s) => serde_json::from_str(&s)
                .map_err(|e| ClientError::Unexpected(format!("attach reply {s}: {e}"))),
            m => Err(ClientError::Unexpected(format!("{m:?}"))),
        }
    }

    /// The authenticated stream, for another client to take over after the handshake.
    pub fn into_stream(self) -> std::io::Result<Stream> {
        self.conn.into_stream()
    }

    /// Queues a request; returns its id. Pair with [`Self::recv`] to pipeline.
    pub fn send(&mut self, flags: u16, msg: &Message) -> Result<u64, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        self.conn.send(id, flags, msg)?;
        Ok(id)
    }

    /// Reads the next reply (replies come in request order); an Error reply is an error.
    pub fn recv(&mut self) -> Result<(u64, Message), ClientError> {
        self.conn.flush()?;
        let (h, m) = self.conn.recv()?;
        match m {
            Message::Error { code, errno, message } => {
                Err(ClientError::Remote { addr: self.addr.clone(), code, errno, message })
            }
            m => Ok((h.id, m)),
        }
    }

    /// One request, one reply.
    pub fn call(&mut self, msg: &Message) -> Result<Message, ClientError> {
        self.call_flags(0, msg)
    }

    pub fn call_flags(&mut self, flags: u16, msg: &Message) -> Result<Message, ClientError> {
        let id = self.send(flags, msg)?;
        let (rid, m) = self.recv()?;
        if rid != id {
            return Err(ClientError::Unexpected(format!("reply id {rid} for request {id}")));
        }
        Ok(m)
    }

    /// A call whose only success reply is Ok.
    pub fn call_ok(&mut self, msg: &Message) -> Result<(), ClientError> {
        match self.call(msg)? {
            Message::Ok => Ok(()),
            m => Err(ClientError::Unexpected(format!("{m:?}"))),
        }
    }

    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, ClientError> {
        match self.call(&Message::Read { offset, len })? {
            Message::Data(d) => Ok(d),
            m => Err(ClientError::Unexpected(format!("{m:?}"))),
        }
    }

    pub fn write(&mut self, offset: u64, data: Vec<u8>) -> Result<(), ClientError> {
        self.call_ok(&Message::Write { offset, data })
    }

    /// A JSON reply (status, job status) parsed.
    pub fn json(&mut self, msg: &Message) -> Result<serde_json::Value, ClientError> {
        match self.call(msg)? {
            Message::Json(s) => {
                serde_json::from_str(&s).map_err(|e| ClientError::Unexpected(format!("bad json: {e}")))
            }
            m => Err(ClientError::Unexpected(format!("{m:?}"))),
        }
    }
}

pub(crate) fn remote_or_unexpected(addr: &str, m: Message) -> ClientError {
    match m {
        Message::Error { code, errno, message } => {
            ClientError::Remote { addr: addr.into(), code, errno, message }
        }
        m => ClientError::Unexpected(format!("{m:?} during handshake")),
    }
}
