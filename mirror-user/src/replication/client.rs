//! The blocking protocol client: connect, authenticate, call. Used by sync jobs (source server
//! to peer), the CLI, and tests.

use std::{net::TcpStream, time::Duration};

use crate::lease::replica::ReplicaLeaseView;

use super::{
    auth,
    conn::{Conn, ConnError},
    protocol::{Message, VolumeInfo, VERSION},
};

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
}

/// How long a TCP connect may take before the node counts as unreachable (a dead host answers
/// nothing; the kernel's own SYN retries would take about two minutes).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

fn connect_tcp(addr: &str) -> std::io::Result<TcpStream> {
    use std::net::ToSocketAddrs;
    let mut last = None;
    for a in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address")))
}

impl ClientError {
    /// The node did not answer at all (connection refused, timed out, no route): it may be
    /// down. Anything else (a refusal, a failed proof) is a configuration error.
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
    info_volume: String,
    next_id: u64,
}

impl Client {
    /// Connects and runs the handshake (version, mutual HMAC proof, volume).
    pub fn connect(addr: &str, volume: &str, secret: &[u8]) -> Result<Client, ClientError> {
        let stream =
            connect_tcp(addr).map_err(|source| ClientError::Connect { addr: addr.into(), source })?;
        let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
        let mut conn =
            Conn::new(stream).map_err(|source| ClientError::Connect { addr: addr.into(), source })?;
        let client_nonce = auth::nonce();
        conn.send(0, 0, &Message::Hello { version: VERSION, volume: volume.into(), nonce: client_nonce })?;
        conn.flush()?;
        let server_nonce = match conn.recv()?.1 {
            Message::Challenge { nonce, .. } => nonce,
            m => return Err(remote_or_unexpected(addr, m)),
        };
        let mac = auth::client_proof(secret, &server_nonce, &client_nonce, volume);
        conn.send(0, 0, &Message::Auth { mac })?;
        conn.flush()?;
        let (mac, info) = match conn.recv()?.1 {
            Message::Welcome { mac, info } => (mac, info),
            m => return Err(remote_or_unexpected(addr, m)),
        };
        if !auth::verify_server(secret, &server_nonce, &client_nonce, volume, &mac) {
            return Err(ClientError::ServerAuth(addr.into()));
        }
        let _ = conn.stream().set_read_timeout(None);
        Ok(Client { conn, info, addr: addr.into(), info_volume: volume.into(), next_id: 1 })
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

    /// The authenticated TCP stream, for an async client to take over after the handshake.
    pub fn into_stream(self) -> std::io::Result<TcpStream> {
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

fn remote_or_unexpected(addr: &str, m: Message) -> ClientError {
    match m {
        Message::Error { code, errno, message } => {
            ClientError::Remote { addr: addr.into(), code, errno, message }
        }
        m => ClientError::Unexpected(format!("{m:?} during handshake")),
    }
}
