//! The replica server: serves volumes over TCP to authenticated peers (the router, a sync source,
//! the CLI), and runs sync / verify jobs that push this replica's data to a peer.
//!
//! It is a thin adapter: each request frame becomes one call on the volume's storage engine
//! ([`crate::storage::Volume`]) and its result a reply frame; a [`StorageError`] becomes
//! `Message::Error` with its protocol code and the errno of the failed system call
//! ([`error_reply`]), so the peer's router can hand that errno to its application.
//!
//! Until a connection has authenticated it is a task on the accept thread's runtime: admitted
//! by the [`PreAuthGate`] (caps in all and per peer address, the oldest evicted), the TLS
//! handshake (under `--tls`) and the protocol handshake within one deadline, its frames held to
//! [`auth::PRE_AUTH_MAX_PAYLOAD`]; no thread and no large buffer. An authenticated connection
//! gets a thread and its buffers; its requests are handled in order, so a client may pipeline.
//! Nothing is applied before its whole frame has arrived and passed its checksum (and, under
//! TLS, its record its authentication); any protocol violation closes that connection only.

use std::{
    collections::HashMap,
    io::ErrorKind,
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use rustls::StreamOwned;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::{
    health::monitor::NodeHealth,
    lease::{
        replica::{Authority, Claim},
        Epoch, Holder,
    },
    storage::{OpenError, StorageError, Volume, VolumeSpec},
    tls::HANDSHAKE_TIMEOUT,
};

use super::{
    auth,
    conn::{Conn, ConnError, Stream},
    frame::FrameDecoder,
    preauth::{Gate, Release, Ticket},
    protocol::{code, encode_frame, Message, FLAG_FUA, MAX_IO, MAX_PAYLOAD, VERSION},
    rate::SyncRate,
    sync,
    transport::{PlaintextRefused, Transport},
};

/// Server configuration.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: String,
    pub volumes: Vec<VolumeSpec>,
    pub secret: Vec<u8>,
    pub rate: SyncRate,
    /// This node's health score and signals, sent in heartbeat replies.
    pub health: Arc<NodeHealth>,
    /// TLS or plaintext, for accepted connections and for the sync jobs' own.
    pub transport: Transport,
}

/// Errors starting a server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("volume {0} is configured twice")]
    Duplicate(String),
    #[error("listen on {addr}: {source}")]
    Listen { addr: String, source: std::io::Error },
    #[error("listen on {0}")]
    Plaintext(#[from] PlaintextRefused),
    #[error("--tls credentials are for a client only: a server needs server-cert.pem and server-key.pem")]
    NoServerCredentials,
}

struct Shared {
    volumes: HashMap<String, Arc<Volume>>,
    secret: Vec<u8>,
    rate: SyncRate,
    health: Arc<NodeHealth>,
    transport: Transport,
}

/// A running server.
pub struct Server {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Server({})", self.addr)
    }
}

impl Server {
    /// Opens the volumes, binds, and serves in background threads.
    pub fn start(cfg: ServerConfig) -> Result<Server, ServerError> {
        let mut volumes = HashMap::new();
        for v in &cfg.volumes {
            if volumes.contains_key(&v.name) {
                return Err(ServerError::Duplicate(v.name.clone()));
            }
            volumes.insert(v.name.clone(), Arc::new(Volume::open(v)?));
        }
        let listener = TcpListener::bind(&cfg.listen)
            .map_err(|source| ServerError::Listen { addr: cfg.listen.clone(), source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ServerError::Listen { addr: cfg.listen.clone(), source })?;
        cfg.transport.check(addr)?;
        if cfg.transport.is_tls() && cfg.transport.server().is_none() {
            return Err(ServerError::NoServerCredentials);
        }
        let transport = cfg.transport;
        tracing::info!(%addr, transport = %transport.describe(), "replication transport");
        let shared =
            Arc::new(Shared { volumes, secret: cfg.secret, rate: cfg.rate, health: cfg.health, transport });
        let stop = Arc::new(AtomicBool::new(false));
        let (sh, st) = (shared.clone(), stop.clone());
        std::thread::Builder::new()
            .name("mirror-accept".into())
            .spawn(move || accept_loop(listener, sh, st))
            .expect("spawn accept thread");
        tracing::info!(%addr, "replica server listening");
        Ok(Server { addr, shared, stop })
    }

    pub fn volume(&self, name: &str) -> Option<Arc<Volume>> {
        self.shared.volumes.get(name).cloned()
    }

    /// Stops accepting, cancels jobs and flushes every volume.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        for v in self.shared.volumes.values() {
            v.cancel_job();
            if let Err(e) = v.flush() {
                tracing::error!(volume = %v.name(), "flush on shutdown failed: {e}");
            }
        }
    }
}

/// The accept thread: a current-thread runtime on which every connection is a task until it
/// has authenticated (TLS handshake and protocol handshake under one deadline, frames held to
/// the pre-auth cap, the connection admitted by the [`PreAuthGate`]); only then does it get its
/// data-path thread and buffers.
fn accept_loop(listener: TcpListener, shared: Arc<Shared>, stop: Arc<AtomicBool>) {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("replica server: no runtime for the accept loop: {e}");
            return;
        }
    };
    rt.block_on(async move {
        let listener = match listener.set_nonblocking(true).and_then(|()| tokio::net::TcpListener::from_std(listener)) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("replica server: accept: {e}");
                return;
            }
        };
        let gate: Arc<Mutex<Gate>> = Arc::default();
        loop {
            let accepted = listener.accept().await;
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let (tcp, addr) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    // Out of descriptors, say: do not spin.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let (ticket, evicted) = Gate::admit(&gate, addr.ip());
            if evicted > 0 {
                tracing::debug!(peer = %addr, evicted, "unauthenticated connections evicted to admit a new one");
            }
            let sh = shared.clone();
            tokio::spawn(async move {
                let peer = addr.to_string();
                let Ticket { id, evicted, gate } = ticket;
                let _release = Release { id, gate };
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, authenticate(tcp, &peer, &sh));
                let authenticated = tokio::select! {
                    r = handshake => if let Ok(r) = r { r } else {
                        tracing::warn!("refused peer={peer}: handshake not finished within {HANDSHAKE_TIMEOUT:?}");
                        None
                    },
                    _ = evicted => {
                        tracing::debug!("refused peer={peer}: evicted (too many unauthenticated connections)");
                        None
                    }
                };
                drop(_release);
                let Some((stream, vol)) = authenticated else { return };
                let spawned = std::thread::Builder::new().name("mirror-conn".into()).spawn(move || {
                    match Conn::over(stream) {
                        Ok(conn) => serve(conn, vol, &peer, &sh),
                        Err(e) => tracing::warn!(%peer, "connection: {e}"),
                    }
                });
                if let Err(e) = spawned {
                    tracing::error!("no thread for an authenticated connection: {e}");
                }
            });
        }
    });
}

/// The TLS handshake (when the transport has it) and the protocol handshake; the authenticated
/// stream, made blocking for its data-path thread, and the volume. `None`: refused, and logged.
async fn authenticate(
    tcp: tokio::net::TcpStream,
    peer: &str,
    shared: &Shared,
) -> Option<(Stream, Arc<Volume>)> {
    let _ = tcp.set_nodelay(true);
    let blocking = |tcp: tokio::net::TcpStream| match tcp
        .into_std()
        .and_then(|t| t.set_nonblocking(false).map(|()| t))
    {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::warn!(%peer, "connection: {e}");
            None
        }
    };
    match shared.transport.server() {
        None => {
            let mut io = tcp;
            let vol =
                handshake(&mut io, peer, None, |_: &tokio::net::TcpStream, _: &str| Ok(None), shared).await?;
            Some((Stream::Plain(blocking(io)?), vol))
        }
        Some(tls) => {
            let (mut io, id) = match tls.accept_async(tcp, HANDSHAKE_TIMEOUT).await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("refused peer={peer}: {e}");
                    return None;
                }
            };
            let node = id.map(|id| id.node);
            let bind = |io: &tokio_rustls::server::TlsStream<tokio::net::TcpStream>, volume: &str| {
                auth::binding(io.get_ref().1, volume).map(Some)
            };
            let vol = handshake(&mut io, peer, node.as_deref(), bind, shared).await?;
            // Plaintext rustls decrypted already stays in its buffers and is read first.
            let (tcp, conn) = io.into_inner();
            Some((Stream::TlsServer(Box::new(StreamOwned::new(conn, blocking(tcp)?))), vol))
        }
    }
}

/// Frames before authentication: held to [`auth::PRE_AUTH_MAX_PAYLOAD`], read with no buffer
/// beyond the frame's own.
struct PreAuth<'a, S> {
    io: &'a mut S,
    frames: FrameDecoder,
    buf: Vec<u8>,
    peer: &'a str,
}

impl<S: AsyncRead + AsyncWrite + Unpin> PreAuth<'_, S> {
    async fn send(&mut self, msg: &Message) -> std::io::Result<()> {
        self.buf.clear();
        encode_frame(&mut self.buf, 0, 0, msg);
        self.io.write_all(&self.buf).await?;
        self.io.flush().await
    }

    /// The next frame; `None` when the stream failed (logged).
    async fn recv(&mut self) -> Option<Message> {
        match self.frames.read_async(self.io).await {
            Ok(f) => Some(f.msg),
            Err(e) => {
                tracing::warn!("refused peer={}: handshake failed: {e}", self.peer);
                None
            }
        }
    }

    async fn refuse(&mut self, code: u16, message: String) {
        tracing::warn!("refused peer={}: {message}", self.peer);
        let _ = self.send(&Message::Error { code, errno: 0, message }).await;
    }
}

/// Runs the protocol handshake; returns the authenticated volume or None (already refused and
/// logged). `bind` gives the TLS binding of the proofs for a volume (see `auth`).
async fn handshake<S, B>(
    io: &mut S,
    peer: &str,
    node: Option<&str>,
    bind: B,
    shared: &Shared,
) -> Option<Arc<Volume>>
where
    S: AsyncRead + AsyncWrite + Unpin,
    B: Fn(&S, &str) -> Result<auth::Binding, rustls::Error>,
{
    let mut c = PreAuth { io, frames: FrameDecoder::new(auth::PRE_AUTH_MAX_PAYLOAD), buf: Vec::new(), peer };
    let (volume, client_nonce) = match c.recv().await? {
        Message::Hello { version, volume, nonce } => {
            if version != VERSION {
                c.refuse(
                    code::VERSION,
                    format!("protocol version mismatch: this server speaks {VERSION}, the peer {version}"),
                )
                .await;
                return None;
            }
            (volume, nonce)
        }
        m => {
            c.refuse(code::PROTOCOL, format!("expected Hello, got {m:?}")).await;
            return None;
        }
    };
    let binding = match bind(c.io, &volume) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!("refused peer={peer}: TLS exporter: {e}");
            return None;
        }
    };
    let server_nonce = auth::nonce();
    let ex =
        auth::Exchange { server_nonce: &server_nonce, client_nonce: &client_nonce, volume: &volume, binding };
    c.send(&Message::Challenge { version: VERSION, nonce: server_nonce }).await.ok()?;
    let mac = match c.recv().await? {
        Message::Auth { mac } => mac,
        m => {
            c.refuse(code::PROTOCOL, format!("expected Auth, got {m:?}")).await;
            return None;
        }
    };
    if !ex.verify_client(&shared.secret, &mac) {
        c.refuse(code::AUTH, "authentication failed: the peer does not know the shared secret".into()).await;
        return None;
    }
    let Some(vol) = shared.volumes.get(&volume).cloned() else {
        c.refuse(code::NO_VOLUME, format!("no volume named {volume:?} here")).await;
        return None;
    };
    let mac = ex.server_proof(&shared.secret);
    c.send(&Message::Welcome { mac, info: vol.info() }).await.ok()?;
    if let Some(node) = node {
        tracing::info!(%peer, %node, volume = %vol.name(), "peer authenticated");
    } else {
        tracing::debug!(%peer, volume = %vol.name(), "peer authenticated (plaintext)");
    }
    Some(vol)
}

fn refuse(conn: &mut Conn, peer: &str, code: u16, message: String) {
    tracing::warn!(%peer, "refused: {message}");
    let _ = conn.send(0, 0, &Message::Error { code, errno: 0, message });
    let _ = conn.flush();
}

/// Serves an authenticated connection: request, reply, in turn, until it ends. An `Attach`
/// (protocol 4, right after the Welcome) sets the epoch the connection writes at; `dispatch`
/// checks every mutation against it.
fn serve(mut conn: Conn, vol: Arc<Volume>, peer: &str, shared: &Shared) {
    // The epoch this connection writes at, once it attached (see `storage::lease`).
    let mut attached: Option<Epoch> = None;
    loop {
        let (h, msg) = match conn.recv() {
            Ok(x) => x,
            Err(ConnError::Io(e))
                if matches!(e.kind(), ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset) =>
            {
                tracing::debug!(%peer, "peer disconnected");
                return;
            }
            Err(ConnError::Io(e)) if conn.session().is_tls() => {
                // A record that fails its authentication (corrupted or forged on the way): the
                // session is over, and nothing of the frame it carried was applied.
                let why = match shared.transport.server() {
                    Some(t) => t.explain(e).to_string(),
                    None => e.to_string(),
                };
                tracing::warn!(%peer, volume = %vol.name(), "closing connection: {why}");
                return;
            }
            Err(e) => {
                refuse(&mut conn, peer, code::PROTOCOL, format!("closing connection: {e}"));
                return;
            }
        };
        let (reply, close) = dispatch(&vol, shared, h.flags, msg, &mut attached);
        if let Message::Error { code, errno, message } = &reply {
            vol.counters().errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, volume = %vol.name(), code, errno, "request failed: {message}");
        }
        if conn.send(h.id, 0, &reply).and_then(|()| conn.flush()).is_err() || close {
            return;
        }
    }
}

/// A reply refusing a request for a reason of the protocol (not of the storage engine).
fn refusal(code: u16, message: impl Into<String>) -> Message {
    Message::Error { code, errno: 0, message: message.into() }
}

/// The reply for a failed storage operation: its protocol code, the errno of the system call
/// that failed (0 = none), and the error's text.
pub fn error_reply(e: &StorageError) -> Message {
    let code = match e {
        StorageError::Range { .. } | StorageError::TooLarge { .. } | StorageError::Grain { .. } => {
            code::RANGE
        }
        StorageError::Busy(_) => code::BUSY,
        StorageError::Fenced(_) => {
            return Message::Error { code: code::FENCED, errno: libc::ESTALE as u32, message: e.to_string() }
        }
        StorageError::Lease(refused) => {
            // Typed across the wire: the router's lease store acts on the refusal's data.
            let message = serde_json::to_string(refused).unwrap_or_else(|_| refused.to_string());
            return Message::Error { code: code::LEASE, errno: 0, message };
        }
        StorageError::Unclaimed { .. } => code::REFUSED,
        _ => code::IO,
    };
    let errno = e.errno().and_then(|n| u32::try_from(n).ok()).unwrap_or(0);
    Message::Error { code, errno, message: e.to_string() }
}

/// True for the requests that change data or metadata: each passes the epoch gate first.
fn mutates(msg: &Message) -> bool {
    matches!(
        msg,
        Message::Write { .. }
            | Message::WriteLz4 { .. }
            | Message::Flush
            | Message::Trim { .. }
            | Message::WriteZeroes { .. }
            | Message::MarkDirty { .. }
            | Message::MarkIntent { .. }
            | Message::ClearIntent { .. }
            | Message::SyncBegin { .. }
            | Message::SyncEnd { .. }
            | Message::StartJob { .. }
            | Message::CancelJob
            | Message::ResolveDiscard
    )
}

/// A request whose size one frame (or one reply) cannot carry.
fn too_large(what: &'static str, len: u64, max: u32) -> Result<Message, StorageError> {
    Err(StorageError::TooLarge { what, len, max: u64::from(max) })
}

/// Handles one request: the reply, and whether to close the connection after it. `attached`:
/// the connection's epoch (set by `Attach`); a mutation holds the epoch gate until applied.
fn dispatch(
    vol: &Arc<Volume>,
    shared: &Shared,
    flags: u16,
    msg: Message,
    attached: &mut Option<Epoch>,
) -> (Message, bool) {
    let fua = flags & FLAG_FUA != 0;
    let ok = |r: Result<(), StorageError>| r.map(|()| Message::Ok);
    let _admitted = if mutates(&msg) {
        match vol.lease().enter(*attached) {
            Ok(g) => Some(g),
            Err(e) => return (error_reply(&e), false),
        }
    } else {
        None
    };
    let reply: Result<Message, StorageError> = match msg {
        Message::Read { len, .. } if len > MAX_IO => too_large("read", u64::from(len), MAX_IO),
        Message::Read { offset, len } => vol.read(offset, len).map(Message::Data),
        Message::Write { data, .. } if data.len() > MAX_IO as usize => {
            too_large("write", data.len() as u64, MAX_IO)
        }
        Message::Write { offset, data } => ok(vol.write(offset, &data, fua)),
        Message::WriteLz4 { raw_len, .. } if raw_len > MAX_IO => {
            too_large("write", u64::from(raw_len), MAX_IO)
        }
        Message::WriteLz4 { offset, raw_len, data } => {
            match lz4_flex::block::decompress(&data, raw_len as usize) {
                Ok(raw) if raw.len() == raw_len as usize => ok(vol.write(offset, &raw, fua)),
                _ => {
                    return (
                        refusal(code::PROTOCOL, "lz4 payload does not decompress to its stated length"),
                        true,
                    )
                }
            }
        }
        Message::Flush => ok(vol.flush()),
        Message::Trim { offset, len } | Message::WriteZeroes { offset, len } => {
            ok(vol.write_zeroes(offset, u64::from(len)))
        }
        Message::Digests { grain, extents } => vol.digests(grain, &extents).map(Message::DigestList),
        Message::MarkDirty { offset, len } => ok(vol.mark_dirty(offset, len)),
        Message::MarkIntent { offset, len } => ok(vol.mark_intent(offset, len)),
        // One byte: 1 cleared, 0 kept (tracking: the bits record what the peer lacks).
        Message::ClearIntent { offset, len } => {
            vol.clear_intent(offset, len).map(|cleared| Message::Data(vec![u8::from(cleared)]))
        }
        Message::Heartbeat { seq, .. } => {
            Ok(Message::HeartbeatAck { seq, health: shared.health.score(), report: shared.health.report() })
        }
        Message::Status => Ok(json_reply(&vol.status())),
        Message::SyncBegin { source_gen } => ok(vol.sync_begin(source_gen)),
        Message::SyncEnd { current, history } => ok(vol.sync_end(current, history)),
        Message::StartJob { kind, peer } => {
            ok(sync::start_job(vol, &shared.transport, shared.secret.clone(), shared.rate, kind, peer))
        }
        Message::GetBitmap => match vol.bitmap() {
            bits if bits.len() > MAX_PAYLOAD as usize => {
                too_large("the bitmap", bits.len() as u64, MAX_PAYLOAD)
            }
            bits => Ok(Message::Data(bits)),
        },
        Message::JobStatus => Ok(match vol.job_status() {
            Some(j) => json_reply(&j),
            None => Message::Json(serde_json::json!({"state": "none"}).to_string()),
        }),
        Message::CancelJob => {
            vol.cancel_job();
            Ok(Message::Ok)
        }
        Message::ResolveDiscard => ok(vol.resolve_discard()),
        Message::Attach { volume, .. } if volume != vol.name() => {
            return (
                refusal(code::NO_VOLUME, format!("attach to {volume:?} on a connection to {:?}", vol.name())),
                true,
            )
        }
        Message::Attach { holder, epoch, .. } => vol.lease().attach(Epoch(epoch)).map(|v| {
            tracing::debug!(volume = %vol.name(), %holder, epoch, "connection attached");
            *attached = Some(Epoch(epoch));
            json_reply(&v)
        }),
        Message::LeaseRead => Ok(json_reply(&vol.lease().view())),
        Message::LeaseClaim { holder, epoch, ttl_ms, coordinated } => {
            let authority = if coordinated == 1 { Authority::Coordinator } else { Authority::Embedded };
            let claim = Claim {
                holder: Holder(holder),
                epoch: Epoch(epoch),
                ttl: Duration::from_millis(ttl_ms),
                authority,
            };
            vol.lease_claim(&claim).map(|v| json_reply(&v))
        }
        Message::LeaseRenew { holder, epoch, ttl_ms } => vol
            .lease_renew(&Holder(holder), Epoch(epoch), Duration::from_millis(ttl_ms))
            .map(|v| json_reply(&v)),
        Message::LeaseRelease { holder, epoch, successor } => {
            let successor = (!successor.is_empty()).then_some(Holder(successor));
            vol.lease_release(&Holder(holder), Epoch(epoch), successor.as_ref()).map(|v| json_reply(&v))
        }
        m @ (Message::Hello { .. }
        | Message::Challenge { .. }
        | Message::Auth { .. }
        | Message::Welcome { .. }
        | Message::Ok
        | Message::Data(_)
        | Message::DigestList(_)
        | Message::Error { .. }
        | Message::HeartbeatAck { .. }
        | Message::Json(_)) => return (refusal(code::PROTOCOL, format!("{m:?} is not a request")), true),
    };
    (reply.unwrap_or_else(|e| error_reply(&e)), false)
}

/// A status reply: the JSON of `value` (the edge where typed state becomes text).
fn json_reply(value: &impl serde::Serialize) -> Message {
    match serde_json::to_string(value) {
        Ok(s) => Message::Json(s),
        Err(e) => refusal(code::IO, format!("status does not serialize: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{replication::protocol::decode_frame, storage::IoOp};

    #[test]
    fn storage_errors_become_error_replies_with_their_errno() {
        let e =
            StorageError::Io { op: IoOp::Write, offset: 8192, source: std::io::Error::from_raw_os_error(28) };
        let reply = error_reply(&e);
        assert_eq!(
            reply,
            Message::Error {
                code: code::IO,
                errno: 28,
                message: "write at 8192: No space left on device (os error 28)".into()
            }
        );
        // On the wire: code u16 LE | errno u32 LE | the message string.
        let mut frame = Vec::new();
        crate::replication::protocol::encode_frame(&mut frame, 1, 0, &reply);
        assert_eq!(&frame[24..30], &[6, 0, 28, 0, 0, 0]);
        assert_eq!(decode_frame(&frame).unwrap().unwrap().1, reply);
        let range = error_reply(&StorageError::Range { offset: 1, len: 2, size: 3 });
        assert!(matches!(range, Message::Error { code: code::RANGE, errno: 0, .. }), "{range:?}");
        let busy = error_reply(&StorageError::Busy("a job is running"));
        assert!(matches!(busy, Message::Error { code: code::BUSY, errno: 0, .. }), "{busy:?}");
    }
}
