//! A remote replica: [`RemoteReplica`], the replica operations as protocol requests, over a
//! [`RemotePool`] of authenticated, pipelined connections to a replica server, driven from
//! tokio. Each connection has a writer task (requests in order) and a reader task (replies come
//! back in request order and complete their requests). A remote `Error` reply becomes
//! [`ReplicaError::Remote`] with the errno the server's disk gave.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex, RwLock,
    },
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter},
    net::TcpStream,
    sync::{mpsc, oneshot},
};

use super::{error::ReplicaError, replica::Attachment};
use crate::{
    lease::replica::ReplicaLeaseView,
    replication::{
        auth::{self, Binding},
        client::{remote_or_unexpected, ClientError, CONNECT_TIMEOUT},
        frame::{ConnError, Frame, FrameDecoder},
        protocol::{encode_frame, Message, VolumeInfo, MAX_PAYLOAD, VERSION},
        transport::{PeerAddr, Transport},
    },
    storage::{JobKind, VolumeStatus},
    tls::{TlsClient, TlsError, HANDSHAKE_TIMEOUT},
};

/// A reply, or why the connection broke before it came.
type Reply = oneshot::Sender<Result<Message, String>>;

struct Conn {
    tx: mpsc::Sender<(Message, u16, Reply)>,
    dead: Arc<AtomicBool>,
    pending: Arc<Mutex<Pending>>,
}

/// Connections to one volume on a replica server.
pub struct RemotePool {
    pub addr: String,
    /// The replica's metadata uuid, from the Welcome (`VolumeInfo`).
    pub uuid: [u8; 16],
    /// The data connections, then one for the lease (the last): a replica server handles a
    /// connection's requests in order, so a renewal sent behind pipelined writes to a slow disk
    /// would wait for all of them, and the holder's safe window would close on a healthy router.
    conns: Vec<Conn>,
    next: AtomicUsize,
}

impl std::fmt::Debug for RemotePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RemotePool({}, {} conns)", self.addr, self.conns.len())
    }
}

fn broken(what: &str) -> String {
    what.to_string()
}

impl RemotePool {
    /// Connects `n` authenticated plaintext connections (loopback only): see
    /// [`Self::connect_over`].
    pub async fn connect(
        addr: &str,
        volume: &str,
        secret: &[u8],
        n: usize,
    ) -> Result<(RemotePool, u64), ReplicaError> {
        Self::connect_over(&Transport::default(), addr, volume, secret, n, None).await
    }

    /// Connects `n` authenticated connections to `addr` (`HOST:PORT`, or `NODE@HOST:PORT` to
    /// accept only that node's certificate) over `transport`: TCP within the connect timeout,
    /// the TLS handshake, then the protocol handshake with frames held to the pre-auth cap;
    /// with `attach` (a router that holds the lease) each connection attaches right after the
    /// Welcome, before it carries anything. A replica that accepted a newer epoch refuses with
    /// `code::FENCED` ([`ReplicaError::is_fenced`]).
    pub async fn connect_over(
        transport: &Transport,
        addr: &str,
        volume: &str,
        secret: &[u8],
        n: usize,
        attach: Option<&Attachment>,
    ) -> Result<(RemotePool, u64), ReplicaError> {
        let refused = |source| ReplicaError::Refused { addr: addr.into(), source };
        let peer = PeerAddr::parse(addr).map_err(|e| refused(ClientError::Unexpected(e)))?;
        let tls = transport
            .client_for(&peer)
            .map_err(|source| refused(ClientError::Tls { addr: peer.addr.clone(), source }))?;
        let mut conns = Vec::new();
        let (mut size, mut uuid) = (0, [0; 16]);
        // `n` for data, one more for the lease.
        for i in 0..=n.max(1) {
            let (conn, info, node) =
                connect_one(transport, tls.as_ref(), &peer, volume, secret, attach).await?;
            if let (0, Some(node)) = (i, node) {
                tracing::info!(peer = %peer.addr, %node, volume, "remote replica connected over TLS");
            }
            (size, uuid) = (info.size, info.uuid);
            conns.push(conn);
        }
        Ok((RemotePool { addr: addr.into(), uuid, conns, next: AtomicUsize::new(0) }, size))
    }

    /// Attaches every connection at `a` (the pool was connected before the lease was taken).
    pub async fn attach(&self, volume: &str, a: &Attachment) -> Result<(), ReplicaError> {
        for i in 0..self.conns.len() {
            let msg = Message::Attach { volume: volume.into(), holder: a.holder.0.clone(), epoch: a.epoch.0 };
            match self.call_on(i, msg, 0).await? {
                Message::Json(_) => {}
                m => return Err(ReplicaError::Protocol { addr: self.addr.clone(), reply: format!("{m:?}") }),
            }
        }
        Ok(())
    }

    /// True when a connection has failed (the pool must be replaced).
    pub fn is_broken(&self) -> bool {
        self.conns.iter().any(|c| c.dead.load(Ordering::Relaxed))
    }

    /// Requests sent and not yet answered (on live connections), including those whose caller
    /// stopped waiting (a write past its deadline): the server may still apply them.
    pub fn outstanding(&self) -> usize {
        let queued = |c: &Conn| c.tx.max_capacity() - c.tx.capacity();
        self.conns
            .iter()
            .map(|c| c.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner).q.len() + queued(c))
            .sum()
    }

    /// Sends a request on the next connection and waits for its reply. A remote error reply
    /// becomes [`ReplicaError::Remote`], with the server's code, errno and message.
    pub async fn call(&self, msg: Message, flags: u16) -> Result<Message, ReplicaError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.data_conns();
        self.call_on(i, msg, flags).await
    }

    /// As [`Self::call`], on the lease's own connection (nothing else queues there).
    pub async fn call_lease(&self, msg: Message) -> Result<Message, ReplicaError> {
        self.call_on(self.conns.len() - 1, msg, 0).await
    }

    /// The connections data requests take (all but the lease's).
    fn data_conns(&self) -> usize {
        (self.conns.len() - 1).max(1)
    }

    /// As [`Self::call`], on connection `i`.
    async fn call_on(&self, i: usize, msg: Message, flags: u16) -> Result<Message, ReplicaError> {
        let lost = |why: String| ReplicaError::ConnectionLost { addr: self.addr.clone(), why };
        let (tx, rx) = oneshot::channel();
        self.conns[i]
            .tx
            .send((msg, flags, tx))
            .await
            .map_err(|_| lost(broken("replica connection closed")))?;
        match rx.await.map_err(|_| lost(broken("replica connection closed")))?.map_err(lost)? {
            Message::Error { code, errno, message } => {
                Err(ReplicaError::Remote { addr: self.addr.clone(), code, errno, message })
            }
            m => Ok(m),
        }
    }
}

/// A replica on a replica server: the replica operations as protocol requests over a
/// [`RemotePool`], which the router's supervisor replaces when it breaks.
#[derive(Debug)]
pub struct RemoteReplica {
    addr: String,
    volume: String,
    secret: Vec<u8>,
    conns: usize,
    pool: RwLock<Option<Arc<RemotePool>>>,
    /// Every (re)connection attaches at this, once the router took the lease.
    attached: RwLock<Option<Attachment>>,
    transport: Transport,
}

impl RemoteReplica {
    /// Volume `volume` on the server at `addr`, over `conns` connections; `pool`: connected
    /// already (else the supervisor connects it).
    pub fn new(
        addr: &str,
        volume: &str,
        secret: &[u8],
        conns: usize,
        pool: Option<RemotePool>,
    ) -> RemoteReplica {
        RemoteReplica {
            addr: addr.into(),
            volume: volume.into(),
            secret: secret.to_vec(),
            conns,
            pool: RwLock::new(pool.map(Arc::new)),
            attached: RwLock::new(None),
            transport: Transport::default(),
        }
    }

    /// The same, (re)connecting over `transport`.
    pub fn with_transport(self, transport: Transport) -> RemoteReplica {
        RemoteReplica { transport, ..self }
    }

    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn volume(&self) -> &str {
        &self.volume
    }

    pub fn secret(&self) -> &[u8] {
        &self.secret
    }

    fn pool(&self) -> Result<Arc<RemotePool>, ReplicaError> {
        self.pool
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or_else(|| ReplicaError::NotConnected { addr: self.addr.clone() })
    }

    async fn call(&self, msg: Message, flags: u16) -> Result<Message, ReplicaError> {
        self.pool()?.call(msg, flags).await
    }

    fn unexpected(&self, m: &Message) -> ReplicaError {
        ReplicaError::Protocol { addr: self.addr.clone(), reply: format!("{m:?}") }
    }

    async fn call_ok(&self, msg: Message, flags: u16) -> Result<(), ReplicaError> {
        match self.call(msg, flags).await? {
            Message::Ok => Ok(()),
            m => Err(self.unexpected(&m)),
        }
    }

    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, ReplicaError> {
        match self.call(Message::Read { offset, len }, 0).await? {
            Message::Data(d) if d.len() == len as usize => Ok(d),
            m => Err(self.unexpected(&m)),
        }
    }

    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ReplicaError> {
        let flags = if fua { crate::replication::protocol::FLAG_FUA } else { 0 };
        self.call_ok(Message::Write { offset, data: data.to_vec() }, flags).await
    }

    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), ReplicaError> {
        let pool = self.pool()?;
        let mut o = offset;
        while o < offset + len {
            let n = (offset + len - o).min(1 << 30) as u32;
            match pool.call(Message::WriteZeroes { offset: o, len: n }, 0).await? {
                Message::Ok => {}
                m => return Err(self.unexpected(&m)),
            }
            o += u64::from(n);
        }
        Ok(())
    }

    pub async fn flush(&self) -> Result<(), ReplicaError> {
        self.call_ok(Message::Flush, 0).await
    }

    pub async fn mark_dirty(&self, offset: u64, len: u64) -> Result<(), ReplicaError> {
        self.call_ok(Message::MarkDirty { offset, len }, 0).await
    }

    pub async fn mark_intent(&self, offset: u64, len: u64) -> Result<(), ReplicaError> {
        self.call_ok(Message::MarkIntent { offset, len }, 0).await
    }

    pub async fn clear_intent(&self, offset: u64, len: u64) -> Result<bool, ReplicaError> {
        match self.call(Message::ClearIntent { offset, len }, 0).await? {
            Message::Data(d) if d.len() == 1 => Ok(d[0] == 1),
            m => Err(self.unexpected(&m)),
        }
    }

    /// The volume's status, decoded from the server's JSON right here.
    pub async fn status(&self) -> Result<VolumeStatus, ReplicaError> {
        match self.call(Message::Status, 0).await? {
            Message::Json(s) => serde_json::from_str(&s).map_err(|e| ReplicaError::Protocol {
                addr: self.addr.clone(),
                reply: format!("status that does not decode ({e}): {s}"),
            }),
            m => Err(self.unexpected(&m)),
        }
    }

    /// Has the server run a job on its volume pushing to `peer`.
    pub async fn start_job(&self, kind: JobKind, peer: String) -> Result<(), ReplicaError> {
        self.call_ok(Message::StartJob { kind, peer }, 0).await
    }

    /// Writes at `a` from now on: the connections there attach, and so does every reconnect.
    /// Not connected: only recorded (the supervisor's reconnect attaches).
    pub async fn attach(&self, a: Attachment) -> Result<(), ReplicaError> {
        *self.attached.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(a.clone());
        match self.pool() {
            Ok(p) => p.attach(&self.volume, &a).await,
            Err(_) => Ok(()),
        }
    }

    /// A lease request (`LeaseRead`, `LeaseClaim`, ...): the replica's view, decoded.
    pub async fn lease_call(&self, msg: Message) -> Result<ReplicaLeaseView, ReplicaError> {
        match self.pool()?.call_lease(msg).await? {
            Message::Json(s) => serde_json::from_str(&s).map_err(|e| ReplicaError::Protocol {
                addr: self.addr.clone(),
                reply: format!("lease view that does not decode ({e}): {s}"),
            }),
            m => Err(self.unexpected(&m)),
        }
    }

    /// The replica's metadata uuid as its last connection reported it (`None`: never connected).
    pub fn uuid(&self) -> Option<[u8; 16]> {
        self.pool.read().unwrap_or_else(std::sync::PoisonError::into_inner).as_ref().map(|p| p.uuid)
    }

    /// (Re)connects; returns the size of the volume.
    pub async fn connect(&self) -> Result<u64, ReplicaError> {
        let attach = self.attached.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        let (p, size) = RemotePool::connect_over(
            &self.transport,
            &self.addr,
            &self.volume,
            &self.secret,
            self.conns,
            attach.as_ref(),
        )
        .await?;
        *self.pool.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::new(p));
        Ok(size)
    }

    /// Drops the connections (the replica then counts as broken).
    pub fn disconnect(&self) {
        *self.pool.write().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }

    /// True when no request sent on the current connections is still unanswered: a replica
    /// failed for lagging (frozen, partitioned) may still apply the writes it was sent, so it is
    /// reconnected and resynced only after they were answered (or their connection died), never
    /// while one of them could land on top of the resync's copy.
    pub fn quiesced(&self) -> bool {
        self.pool
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .is_none_or(|p| p.outstanding() == 0)
    }

    /// True when the connections broke (or there are none).
    pub fn connection_broken(&self) -> bool {
        self.pool
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .is_none_or(|p| p.is_broken())
    }
}

/// Requests awaiting replies, and whether the connection is dead; one lock so that no request
/// can be queued after the reader has given up on the connection.
#[derive(Default)]
struct Pending {
    dead: bool,
    q: VecDeque<(u64, Reply)>,
}

/// How long the protocol handshake may take once the transport is up.
const PROTOCOL_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// One authenticated connection: its reader and writer tasks, the volume's size, and the
/// server's node name (TLS).
async fn connect_one(
    transport: &Transport,
    tls: Option<&TlsClient>,
    peer: &PeerAddr,
    volume: &str,
    secret: &[u8],
    attach: Option<&Attachment>,
) -> Result<(Conn, VolumeInfo, Option<String>), ReplicaError> {
    let a = peer.addr.as_str();
    let refused = |source| ReplicaError::Refused { addr: a.into(), source };
    let unreachable = |source| ReplicaError::Unreachable {
        addr: a.into(),
        source: ClientError::Connect { addr: a.into(), source },
    };
    let mut last = std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address");
    let mut tcp = None;
    for sa in tokio::net::lookup_host(a).await.map_err(unreachable)? {
        transport.check(sa).map_err(|e| refused(e.into()))?;
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(sa)).await {
            Ok(Ok(s)) => {
                tcp = Some(s);
                break;
            }
            Ok(Err(e)) => last = e,
            Err(_) => last = std::io::ErrorKind::TimedOut.into(),
        }
    }
    let tcp = tcp.ok_or_else(|| unreachable(last))?;
    let _ = tcp.set_nodelay(true);
    let within = |d: Duration| move |_| ReplicaError::Timeout(d);
    match tls {
        None => {
            let mut io = tcp;
            let info = tokio::time::timeout(
                PROTOCOL_HANDSHAKE_TIMEOUT,
                handshake(&mut io, a, volume, secret, None, None, attach),
            )
            .await
            .map_err(within(PROTOCOL_HANDSHAKE_TIMEOUT))??;
            let (r, w) = io.into_split();
            Ok((spawn_conn(r, w), info, None))
        }
        Some(c) => {
            let tls_err = |source| refused(ClientError::Tls { addr: a.into(), source });
            let (mut io, id) = c.connect_async(tcp, HANDSHAKE_TIMEOUT).await.map_err(tls_err)?;
            let binding =
                auth::binding(io.get_ref().1, volume).map_err(|e| tls_err(TlsError::Handshake(e)))?;
            let info = tokio::time::timeout(
                PROTOCOL_HANDSHAKE_TIMEOUT,
                handshake(&mut io, a, volume, secret, Some(binding), Some(c), attach),
            )
            .await
            .map_err(within(PROTOCOL_HANDSHAKE_TIMEOUT))??;
            let (r, w) = tokio::io::split(io);
            Ok((spawn_conn(r, w), info, Some(id.node)))
        }
    }
}

/// The protocol handshake (see `replication::auth`) on an async stream, frames held to the
/// pre-auth cap: the volume's description once the server has proved the secret. With
/// `attach`, the connection then attaches at that epoch (protocol 4) before it carries anything;
/// a refusal keeps the server's code (`code::FENCED`: a newer holder exists).
async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    addr: &str,
    volume: &str,
    secret: &[u8],
    binding: Binding,
    tls: Option<&TlsClient>,
    attach: Option<&Attachment>,
) -> Result<VolumeInfo, ReplicaError> {
    let refused = |source| ReplicaError::Refused { addr: addr.into(), source };
    // Under TLS a refusal of our certificate shows on the first read: name it.
    let failed = |e: ConnError| {
        refused(match (e, tls) {
            (ConnError::Io(e), Some(c)) => ClientError::Tls { addr: addr.into(), source: c.explain(e) },
            (e, _) => ClientError::Conn(e),
        })
    };
    let mut frames = FrameDecoder::new(auth::PRE_AUTH_MAX_PAYLOAD);
    let mut buf = Vec::new();
    let client_nonce = auth::nonce();
    let hello = Message::Hello { version: VERSION, volume: volume.into(), nonce: client_nonce };
    encode_frame(&mut buf, 0, 0, &hello);
    io.write_all(&buf).await.and(io.flush().await).map_err(|e| failed(e.into()))?;
    let server_nonce = match frames.read_async(io).await.map_err(failed)?.msg {
        Message::Challenge { nonce, .. } => nonce,
        m => return Err(refused(remote_or_unexpected(addr, m))),
    };
    let ex = auth::Exchange { server_nonce: &server_nonce, client_nonce: &client_nonce, volume, binding };
    buf.clear();
    encode_frame(&mut buf, 0, 0, &Message::Auth { mac: ex.client_proof(secret) });
    io.write_all(&buf).await.and(io.flush().await).map_err(|e| failed(e.into()))?;
    let (mac, info) = match frames.read_async(io).await.map_err(failed)?.msg {
        Message::Welcome { mac, info } => (mac, info),
        m => return Err(refused(remote_or_unexpected(addr, m))),
    };
    if !ex.verify_server(secret, &mac) {
        return Err(refused(ClientError::ServerAuth(addr.into())));
    }
    if let Some(at) = attach {
        let lost = |e: ConnError| ReplicaError::ConnectionLost { addr: addr.into(), why: e.to_string() };
        frames.set_max_payload(MAX_PAYLOAD);
        buf.clear();
        let msg = Message::Attach { volume: volume.into(), holder: at.holder.0.clone(), epoch: at.epoch.0 };
        encode_frame(&mut buf, 0, 0, &msg);
        io.write_all(&buf).await.and(io.flush().await).map_err(|e| lost(e.into()))?;
        match frames.read_async(io).await.map_err(lost)?.msg {
            Message::Json(_) => {}
            Message::Error { code, errno, message } => {
                return Err(ReplicaError::Remote { addr: addr.into(), code, errno, message })
            }
            m => return Err(ReplicaError::Protocol { addr: addr.into(), reply: format!("{m:?}") }),
        }
    }
    Ok(info)
}

fn spawn_conn<R, W>(r: R, w: W) -> Conn
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<(Message, u16, Reply)>(256);
    let pending: Arc<Mutex<Pending>> = Arc::default();
    let pending_out = pending.clone();
    let dead = Arc::new(AtomicBool::new(false));
    let fail_all = {
        let pending = pending.clone();
        let dead = dead.clone();
        move |why: &str| {
            dead.store(true, Ordering::Relaxed);
            let mut p = pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            p.dead = true;
            for (_, reply) in p.q.drain(..) {
                let _ = reply.send(Err(broken(why)));
            }
        }
    };
    let (p2, fail_w) = (pending.clone(), fail_all.clone());
    tokio::spawn(async move {
        let mut w = BufWriter::with_capacity(256 << 10, w);
        let mut id = 1u64;
        let mut buf = Vec::new();
        while let Some((msg, flags, reply)) = rx.recv().await {
            {
                let mut p = p2.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if p.dead {
                    let _ = reply.send(Err(broken("replica connection closed")));
                    continue;
                }
                p.q.push_back((id, reply));
            }
            buf.clear();
            encode_frame(&mut buf, id, flags, &msg);
            id += 1;
            let mut ok = w.write_all(&buf).await.is_ok();
            if ok && rx.is_empty() {
                ok = w.flush().await.is_ok();
            }
            if !ok {
                fail_w("write to replica failed");
            }
        }
    });
    tokio::spawn(async move {
        let mut r = BufReader::with_capacity(256 << 10, r);
        let mut frames = FrameDecoder::default();
        loop {
            let Frame { header, msg } = match frames.read_async(&mut r).await {
                Ok(f) => f,
                Err(ConnError::Proto(e)) => {
                    fail_all(&format!("bad reply: {e}"));
                    return;
                }
                Err(_) => {
                    fail_all("replica connection closed");
                    return;
                }
            };
            let next = pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner).q.pop_front();
            match next {
                Some((id, reply)) if id == header.id => {
                    let _ = reply.send(Ok(msg));
                }
                Some((_, reply)) => {
                    let _ = reply.send(Err(broken("reply out of order")));
                    fail_all("reply out of order");
                    return;
                }
                None => {
                    fail_all("unsolicited reply");
                    return;
                }
            }
        }
    });
    Conn { tx, dead, pending: pending_out }
}
