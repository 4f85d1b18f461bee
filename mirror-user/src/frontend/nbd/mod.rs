//! NBD server (protocol: NetworkBlockDevice/nbd `doc/proto.md`) in front of a [`BlockDev`].
//!
//! Fixed newstyle handshake with `NBD_OPT_EXPORT_NAME`, `INFO`, `GO`, `LIST`, `ABORT` and
//! `STRUCTURED_REPLY`; commands `READ`, `WRITE`, `FLUSH`, `TRIM`, `WRITE_ZEROES`, `DISC` with FUA.
//! One export; any number of connections to it (multi-conn is advertised: every connection
//! drives the same device, whose flush covers all completed writes). Each connection reads
//! requests continuously and runs them concurrently (bounded by [`NbdOptions::max_in_flight`]
//! and a byte budget), replies go through one writer. A write's payload is read in full before
//! the device sees it, so a client that disconnects mid-payload changes nothing.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use std::sync::Arc;
//! use mirror::{frontend::nbd::{NbdOptions, NbdServer}, volume::file::FileDev};
//! let dev = FileDev::open("/tmp/disk.img".as_ref(), Some(1 << 30))?;
//! let opts = NbdOptions { export_name: "vol".into(), ..NbdOptions::default() };
//! let server = NbdServer::bind(Arc::new(dev), "127.0.0.1:10809".parse()?, opts).await?;
//! println!("listening on {}", server.local_addr()); // the real port when binding :0
//! server.run(tokio::signal::ctrl_c()).await?; // drains in-flight requests, then returns
//! # Ok(())
//! # }
//! ```
//!
//! Three parts, as in nbdkit (`protocol-handshake-newstyle.c` vs `protocol.c`): [`wire`] holds
//! the protocol's numbers (the tests' clients use them too), `handshake` the fixed newstyle
//! negotiation up to `NBD_OPT_GO` / `NBD_OPT_EXPORT_NAME`, `transmission` the request loop,
//! the device calls and the replies. This file holds the server: options, listening, accepting,
//! the per-connection task that runs the two phases, and the shutdown.

use std::{
    fmt,
    future::Future,
    io,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, BufReader},
    net::{TcpListener, UnixListener},
    sync::watch,
    task::JoinSet,
};

use crate::{
    replication::preauth::{Gate, Release, Ticket},
    volume::BlockDev,
};

mod handshake;
mod transmission;
pub mod wire;

pub use transmission::nbd_errno;
use wire::MAX_STRING;
pub use wire::{errno, flags};

/// The whole handshake (greeting, options, STARTTLS and the TLS handshake, `NBD_OPT_GO`), as on
/// the replication link.
const HANDSHAKE_TIMEOUT: Duration = crate::tls::HANDSHAKE_TIMEOUT;
/// The socket buffer under rustls on an NBD connection over TLS.
const TLS_READ_BUF: usize = 64 << 10;
/// Connections served at once; more are closed right after accept. Those still in the
/// handshake also pass the pre-auth [`Gate`] (256 in all, 16 per peer address, the oldest
/// evicted to admit a new one), so slow unauthenticated clients cannot fill this.
const MAX_CONNECTIONS: usize = 1024;

/// What to export and how.
#[derive(Debug, Clone)]
pub struct NbdOptions {
    /// The export's name; clients may also ask for the default export "".
    pub export_name: String,
    /// Shown by `nbdinfo` / `NBD_OPT_LIST`.
    pub description: Option<String>,
    /// Writes, trims and write-zeroes fail with EPERM.
    pub read_only: bool,
    /// Largest READ / WRITE payload (advertised as the maximum block size); 64 KiB..=256 MiB.
    pub max_request: u32,
    /// Requests run at once per connection.
    pub max_in_flight: usize,
    /// TLS required on every connection (`NBD_OPT_STARTTLS`), with this server's certificate
    /// and client-certificate policy.
    pub tls: Option<crate::tls::TlsServer>,
}

impl Default for NbdOptions {
    fn default() -> Self {
        NbdOptions {
            export_name: "mirror".into(),
            description: None,
            read_only: false,
            max_request: 32 << 20,
            max_in_flight: 64,
            tls: None,
        }
    }
}

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdListen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl NbdListen {
    /// The NBD URI of `export` at this address (`nbd://host:port/name` or
    /// `nbd+unix:///name?socket=path`), as understood by qemu, nbdinfo, nbdcopy and fio.
    pub fn uri(&self, export: &str) -> String {
        match self {
            NbdListen::Tcp(a) => format!("nbd://{a}/{export}"),
            NbdListen::Unix(p) => format!("nbd+unix:///{export}?socket={}", p.display()),
        }
    }
}

impl std::str::FromStr for NbdListen {
    type Err = NbdError;

    /// `HOST:PORT` (an IP address and port) is TCP; `unix:PATH`, or anything with a `/`, is a
    /// Unix socket.
    fn from_str(s: &str) -> Result<Self, NbdError> {
        if let Some(p) = s.strip_prefix("unix:") {
            return Ok(NbdListen::Unix(p.into()));
        }
        if s.contains('/') {
            return Ok(NbdListen::Unix(s.into()));
        }
        s.parse().map(NbdListen::Tcp).map_err(|_| {
            NbdError::Config(format!(
                "`{s}` is neither IP:PORT (127.0.0.1:10809, [::1]:10809) nor unix:PATH / a socket path"
            ))
        })
    }
}

impl fmt::Display for NbdListen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NbdListen::Tcp(a) => write!(f, "{a}"),
            NbdListen::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Errors at the boundary of the NBD frontend. Problems of single clients are logged and end
/// only that connection; they never surface here.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NbdError {
    #[error("invalid NBD options: {0}")]
    Config(String),
    #[error("cannot listen for NBD clients on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: io::Error,
    },
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

struct Shared<B> {
    dev: Arc<B>,
    opts: NbdOptions,
    size: u64,
    pref_block: u32,
    byte_budget: u32,
}

impl<B: BlockDev> Shared<B> {
    fn transmission_flags(&self, structured: bool) -> u16 {
        let mut f = flags::HAS_FLAGS
            | flags::SEND_FLUSH
            | flags::SEND_FUA
            | flags::SEND_TRIM
            | flags::SEND_WRITE_ZEROES
            | flags::CAN_MULTI_CONN;
        if self.opts.read_only {
            f |= flags::READ_ONLY;
        }
        if structured {
            // Reads are always answered with a single content chunk.
            f |= flags::SEND_DF;
        }
        f
    }

    fn name_ok(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.opts.export_name.as_bytes()
    }
}

/// A bound NBD server; [`NbdServer::run`] serves it.
pub struct NbdServer<B: BlockDev> {
    shared: Arc<Shared<B>>,
    listener: Listener,
    addr: NbdListen,
}

impl<B: BlockDev> fmt::Debug for NbdServer<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdServer").field("addr", &self.addr).field("opts", &self.shared.opts).finish()
    }
}

/// Binds and serves `dev` until `shutdown` completes (see [`NbdServer::run`]).
pub async fn serve<B: BlockDev>(
    dev: Arc<B>,
    listen: NbdListen,
    opts: NbdOptions,
    shutdown: impl Future,
) -> Result<(), NbdError> {
    NbdServer::bind(dev, listen, opts).await?.run(shutdown).await
}

impl<B: BlockDev> NbdServer<B> {
    /// Validates `opts` and binds. A TCP port of 0 picks a free port (see [`Self::local_addr`]);
    /// a stale Unix socket file (nobody listening) is replaced.
    pub async fn bind(dev: Arc<B>, listen: NbdListen, opts: NbdOptions) -> Result<Self, NbdError> {
        if opts.export_name.len() > MAX_STRING {
            return Err(NbdError::Config(format!("export name longer than {MAX_STRING} bytes")));
        }
        if opts.description.as_ref().is_some_and(|d| d.len() > MAX_STRING) {
            return Err(NbdError::Config(format!("description longer than {MAX_STRING} bytes")));
        }
        if !(64 << 10..=256 << 20).contains(&opts.max_request) {
            return Err(NbdError::Config(format!(
                "max_request {} is outside 64 KiB..=256 MiB",
                opts.max_request
            )));
        }
        if !(1..=1024).contains(&opts.max_in_flight) {
            return Err(NbdError::Config(format!(
                "max_in_flight {} is outside 1..=1024",
                opts.max_in_flight
            )));
        }
        let bs = dev.block_size();
        if !bs.is_power_of_two() || bs > 64 << 10 {
            return Err(NbdError::Config(format!("device block size {bs} is not a power of 2 <= 64 KiB")));
        }
        let bind_err = |source| NbdError::Bind { addr: listen.to_string(), source };
        let (listener, addr) = match &listen {
            NbdListen::Tcp(a) => {
                let l = TcpListener::bind(a).await.map_err(bind_err)?;
                let local = l.local_addr().map_err(bind_err)?;
                (Listener::Tcp(l), NbdListen::Tcp(local))
            }
            NbdListen::Unix(p) => {
                if let Ok(meta) = std::fs::symlink_metadata(p) {
                    use std::os::unix::fs::FileTypeExt;
                    if !meta.file_type().is_socket() {
                        return Err(bind_err(io::Error::new(
                            io::ErrorKind::AlreadyExists,
                            "the path exists and is not a socket",
                        )));
                    }
                    if std::os::unix::net::UnixStream::connect(p).is_ok() {
                        return Err(bind_err(io::Error::new(
                            io::ErrorKind::AddrInUse,
                            "another server is listening on this socket",
                        )));
                    }
                    std::fs::remove_file(p).map_err(bind_err)?;
                }
                let l = UnixListener::bind(p).map_err(bind_err)?;
                (Listener::Unix(l, p.clone()), listen.clone())
            }
        };
        let size = dev.size();
        let shared = Shared {
            dev,
            pref_block: bs.max(512),
            byte_budget: opts.max_request.saturating_mul(4),
            size,
            opts,
        };
        Ok(NbdServer { shared: Arc::new(shared), listener, addr })
    }

    /// The bound address (with the actual port when binding port 0).
    pub fn local_addr(&self) -> &NbdListen {
        &self.addr
    }

    /// Accepts clients until `shutdown` completes; then stops accepting, lets every connection
    /// finish the requests it has read (no new ones are read), closes them and returns. A Unix
    /// socket file is removed on return.
    pub async fn run(self, shutdown: impl Future) -> Result<(), NbdError> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut conns = JoinSet::new();
        let mut shutdown = std::pin::pin!(shutdown);
        let gate: Arc<Mutex<Gate>> = Arc::default();
        tracing::info!(
            "NBD: serving export {:?} ({} bytes) on {}",
            self.shared.opts.export_name,
            self.shared.size,
            self.addr
        );
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                acc = accept(&self.listener) => match acc {
                    Ok((stream, peer, ip)) => {
                        if conns.len() >= MAX_CONNECTIONS {
                            tracing::warn!("NBD: refusing {peer}: {MAX_CONNECTIONS} connections already");
                            continue;
                        }
                        let (ticket, evicted) = Gate::admit(&gate, ip);
                        if evicted > 0 {
                            tracing::debug!("NBD: {evicted} unauthenticated connection(s) evicted to admit {peer}");
                        }
                        let shared = self.shared.clone();
                        let rx = stop_rx.clone();
                        match stream {
                            Stream::Tcp(s) => { conns.spawn(connection(s, shared, rx, peer, ticket)); }
                            Stream::Unix(s) => { conns.spawn(connection(s, shared, rx, peer, ticket)); }
                        }
                    }
                    Err(e) => {
                        // EMFILE, ECONNABORTED and friends: transient, keep serving.
                        tracing::warn!("NBD: accept on {}: {e}", self.addr);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        let _ = stop_tx.send(true);
        if let Listener::Unix(_, p) = &self.listener {
            let _ = std::fs::remove_file(p);
        }
        while conns.join_next().await.is_some() {}
        tracing::info!("NBD: stopped serving on {}", self.addr);
        Ok(())
    }
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

/// An accepted connection, its name for the logs and its address for the pre-auth gate (a
/// Unix socket's clients share one scope, `::`).
async fn accept(l: &Listener) -> io::Result<(Stream, String, IpAddr)> {
    match l {
        Listener::Tcp(l) => {
            let (s, peer) = l.accept().await?;
            let _ = s.set_nodelay(true);
            Ok((Stream::Tcp(s), peer.to_string(), peer.ip()))
        }
        Listener::Unix(l, p) => {
            let (s, _) = l.accept().await?;
            Ok((Stream::Unix(s), format!("unix:{}", p.display()), IpAddr::V6(Ipv6Addr::UNSPECIFIED)))
        }
    }
}

async fn until_stop(rx: &mut watch::Receiver<bool>) {
    // An error means the server is gone: stop as well.
    let _ = rx.wait_for(|v| *v).await;
}

/// A client broke the protocol (the connection is closed with this).
fn protocol(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Reads and drops `len` bytes the server will not act on (option data, an oversized payload),
/// keeping the stream in step.
async fn discard<R: AsyncRead + Unpin>(r: &mut R, len: u64) -> io::Result<()> {
    let n = tokio::io::copy(&mut r.take(len), &mut tokio::io::sink()).await?;
    if n < len {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "client closed mid-payload"));
    }
    Ok(())
}

/// A connection until its handshake is done holds its place in the pre-auth gate (`ticket`):
/// it is closed when evicted, or when the handshake (TLS included) takes longer than
/// [`HANDSHAKE_TIMEOUT`] in all.
async fn connection<S, B>(
    stream: S,
    shared: Arc<Shared<B>>,
    mut stop: watch::Receiver<bool>,
    peer: String,
    ticket: Ticket,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    B: BlockDev,
{
    let Ticket { id, mut evicted, gate } = ticket;
    let pre =
        PreAuth { release: Release { id, gate }, deadline: tokio::time::Instant::now() + HANDSHAKE_TIMEOUT };
    let Some(tls) = shared.opts.tls.clone() else {
        return session(stream, None, shared, stop, peer, pre, evicted).await;
    };
    // Forced TLS: the greeting and the options before STARTTLS on the raw stream, then the TLS
    // handshake, all within the handshake's deadline; then the session inside TLS.
    let deadline = pre.deadline;
    let mut stream = stream;
    let upgrade = async {
        let greeting = {
            let (mut r, mut w) = tokio::io::split(&mut stream);
            handshake::greet(&mut r, &mut w).await.map_err(|e| e.to_string())?
        };
        if !handshake::before_tls(&mut stream).await.map_err(|e| e.to_string())? {
            return Ok(None);
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        // rustls reads the socket 4 KiB at a time: a buffer under it makes that one read(2) per
        // 64 KiB of records instead (a 128 KiB write took 33 reads; measured in bench tls).
        let buffered = BufReader::with_capacity(TLS_READ_BUF, stream);
        let (tls_stream, id) = tls.accept_async(buffered, left).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(Some((tls_stream, id, greeting)))
    };
    let upgraded = tokio::select! {
        biased;
        () = until_stop(&mut stop) => return,
        _ = &mut evicted => {
            tracing::debug!("NBD refused peer={peer}: evicted (too many unauthenticated connections)");
            return;
        }
        u = tokio::time::timeout_at(deadline, upgrade) => u,
    };
    match upgraded {
        Ok(Ok(Some((tls_stream, id, greeting)))) => {
            if let Some(id) = &id {
                tracing::info!("NBD {peer}: TLS established, client certificate of node {}", id.node);
            } else {
                tracing::debug!("NBD {peer}: TLS established");
            }
            session(tls_stream, Some(greeting), shared, stop, peer, pre, evicted).await;
        }
        Ok(Ok(None)) => tracing::debug!("NBD {peer}: client ended the handshake"),
        Ok(Err(e)) => tracing::warn!("NBD refused peer={peer}: {e}"),
        Err(_) => {
            tracing::warn!("NBD refused peer={peer}: handshake not finished within {HANDSHAKE_TIMEOUT:?}");
        }
    }
}

/// A connection's place in the pre-auth gate and its handshake's deadline.
struct PreAuth {
    release: Release,
    deadline: tokio::time::Instant,
}

/// The handshake (the greeting already exchanged when `greeted`, inside TLS) and transmission.
/// The connection leaves the pre-auth gate once the handshake is done.
async fn session<S, B>(
    stream: S,
    greeted: Option<handshake::Greeting>,
    shared: Arc<Shared<B>>,
    mut stop: watch::Receiver<bool>,
    peer: String,
    pre: PreAuth,
    mut evicted: tokio::sync::oneshot::Receiver<()>,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
    B: BlockDev,
{
    let (rh, mut wh) = tokio::io::split(stream);
    let mut r = BufReader::with_capacity(256 << 10, rh);
    let negotiate = async {
        match greeted {
            None => handshake::handshake(&shared, &mut r, &mut wh).await,
            Some(g) => handshake::options(&shared, &mut r, &mut wh, g, true).await,
        }
    };
    let session = tokio::select! {
        biased;
        () = until_stop(&mut stop) => return,
        _ = &mut evicted => {
            tracing::debug!("NBD refused peer={peer}: evicted (too many unauthenticated connections)");
            return;
        }
        s = tokio::time::timeout_at(pre.deadline, negotiate) => s,
    };
    drop(pre.release);
    let structured = match session {
        Ok(Ok(Some(structured))) => structured,
        Ok(Ok(None)) => {
            tracing::debug!("NBD {peer}: client ended the handshake");
            return;
        }
        Ok(Err(e)) => {
            tracing::warn!("NBD {peer}: handshake failed: {e}");
            return;
        }
        Err(_) => {
            tracing::warn!("NBD {peer}: handshake not finished within {HANDSHAKE_TIMEOUT:?}");
            return;
        }
    };
    tracing::debug!("NBD {peer}: transmission (structured replies: {structured})");
    match transmission::transmission(shared, r, wh, structured, stop).await {
        Ok(()) => tracing::debug!("NBD {peer}: disconnected"),
        Err(e) if e.kind() == io::ErrorKind::InvalidData => tracing::warn!("NBD {peer}: closed: {e}"),
        Err(e) => tracing::info!("NBD {peer}: connection lost: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::{wire::*, *};
    use tokio::io::AsyncWriteExt;
    use tokio::net::UnixStream;

    /// An in-memory device; writes take `delay`, and every operation fails with `fail` when set.
    struct MemDev {
        data: std::sync::Mutex<Vec<u8>>,
        delay: Duration,
        fail: Option<i32>,
    }

    impl MemDev {
        fn new(size: usize, delay: Duration, fail: Option<i32>) -> Arc<MemDev> {
            Arc::new(MemDev { data: std::sync::Mutex::new(vec![0; size]), delay, fail })
        }
        fn check(&self) -> io::Result<()> {
            assert_ne!(self.fail, Some(-1), "device bug");
            self.fail.map_or(Ok(()), |e| Err(io::Error::from_raw_os_error(e)))
        }
    }

    impl BlockDev for MemDev {
        fn size(&self) -> u64 {
            self.data.lock().unwrap().len() as u64
        }
        fn block_size(&self) -> u32 {
            4096
        }
        async fn read(&self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
            self.check()?;
            Ok(self.data.lock().unwrap()[offset as usize..][..len as usize].to_vec())
        }
        async fn write(&self, offset: u64, data: Vec<u8>, _fua: bool) -> io::Result<()> {
            tokio::time::sleep(self.delay).await;
            self.check()?;
            self.data.lock().unwrap()[offset as usize..][..data.len()].copy_from_slice(&data);
            Ok(())
        }
        async fn flush(&self) -> io::Result<()> {
            self.check()
        }
        async fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
            self.write_zeroes(offset, len).await
        }
        async fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
            self.check()?;
            self.data.lock().unwrap()[offset as usize..][..len as usize].fill(0);
            Ok(())
        }
    }

    /// Handshake with NBD_OPT_GO on the default export; returns the export size.
    async fn go<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> u64 {
        assert_eq!(s.read_u64().await.unwrap(), NBDMAGIC);
        assert_eq!(s.read_u64().await.unwrap(), IHAVEOPT);
        s.read_u16().await.unwrap();
        s.write_u32(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await.unwrap();
        s.write_u64(IHAVEOPT).await.unwrap();
        s.write_u32(OPT_GO).await.unwrap();
        s.write_u32(8).await.unwrap();
        s.write_all(&[0, 0, 0, 0, 0, 1, 0, INFO_BLOCK_SIZE as u8]).await.unwrap();
        let mut size = 0;
        loop {
            assert_eq!(s.read_u64().await.unwrap(), OPT_REPLY_MAGIC);
            let (_, typ, len) =
                (s.read_u32().await.unwrap(), s.read_u32().await.unwrap(), s.read_u32().await);
            let mut d = vec![0; len.unwrap() as usize];
            s.read_exact(&mut d).await.unwrap();
            match typ {
                REP_INFO if d[..2] == [0, 0] => size = u64::from_be_bytes(d[2..10].try_into().unwrap()),
                REP_INFO if d[..2] == [0, 3] => {
                    assert_eq!(&d[2..], &[0, 0, 0, 1, 0, 0, 16, 0, 0, 16, 0, 0][..], "block sizes 1/4096/1M");
                }
                REP_ACK => return size,
                t => panic!("reply {t:#x}"),
            }
        }
    }

    async fn request<S: AsyncWrite + Unpin>(s: &mut S, typ: u16, cookie: u64, offset: u64, payload: &[u8]) {
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&typ.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&(payload.len().max(512) as u32).to_be_bytes());
        if typ == CMD_WRITE {
            b.extend_from_slice(payload);
        }
        s.write_all(&b).await.unwrap();
    }

    async fn simple<S: AsyncRead + Unpin>(s: &mut S) -> (u32, u64) {
        assert_eq!(s.read_u32().await.unwrap(), SIMPLE_REPLY_MAGIC);
        (s.read_u32().await.unwrap(), s.read_u64().await.unwrap())
    }

    fn opts() -> NbdOptions {
        NbdOptions { max_request: 1 << 20, ..NbdOptions::default() }
    }

    #[test]
    fn listen_parsing() {
        let tcp: NbdListen = "127.0.0.1:10809".parse().unwrap();
        assert_eq!(tcp, NbdListen::Tcp("127.0.0.1:10809".parse().unwrap()));
        assert_eq!(tcp.uri("vol"), "nbd://127.0.0.1:10809/vol");
        assert_eq!("unix:s.sock".parse::<NbdListen>().unwrap(), NbdListen::Unix("s.sock".into()));
        assert_eq!("/run/x.sock".parse::<NbdListen>().unwrap(), NbdListen::Unix("/run/x.sock".into()));
        assert!("localhost".parse::<NbdListen>().unwrap_err().to_string().contains("neither"));
    }

    #[tokio::test]
    async fn bad_options_are_refused() {
        let dev = MemDev::new(1 << 20, Duration::ZERO, None);
        let err = NbdServer::bind(
            dev.clone(),
            NbdListen::Tcp("127.0.0.1:0".parse().unwrap()),
            NbdOptions { max_request: 100, ..opts() },
        );
        assert!(matches!(err.await, Err(NbdError::Config(_))));
        let held = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let taken = held.local_addr().unwrap();
        let err = NbdServer::bind(dev.clone(), NbdListen::Tcp(taken), opts()).await.unwrap_err();
        assert!(err.to_string().contains("cannot listen"), "{err}");

        // Unix: a stale socket is replaced; a live one or a regular file is not touched.
        let dir = std::env::temp_dir().join(format!("mirror-nbd-bind-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("s");
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        let live = NbdServer::bind(dev.clone(), NbdListen::Unix(sock.clone()), opts()).await.unwrap();
        let err = NbdServer::bind(dev.clone(), NbdListen::Unix(sock.clone()), opts()).await.unwrap_err();
        assert!(err.to_string().contains("another server"), "{err}");
        drop(live);
        let file = dir.join("f");
        std::fs::write(&file, b"keep").unwrap();
        let err = NbdServer::bind(dev, NbdListen::Unix(file.clone()), opts()).await.unwrap_err();
        assert!(err.to_string().contains("not a socket"), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"keep");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Shutdown lets a request already read (a slow write) finish and reply, then closes the
    /// connection, returns, and removes the Unix socket.
    #[tokio::test]
    async fn graceful_shutdown_finishes_in_flight_requests() {
        let dir = std::env::temp_dir().join(format!("mirror-nbd-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("s");
        let dev = MemDev::new(1 << 20, Duration::from_millis(300), None);
        let server = NbdServer::bind(dev.clone(), NbdListen::Unix(sock.clone()), opts()).await.unwrap();
        assert_eq!(server.local_addr().uri("x"), format!("nbd+unix:///x?socket={}", sock.display()));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let run = tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        let mut c = UnixStream::connect(&sock).await.unwrap();
        assert_eq!(go(&mut c).await, 1 << 20);
        request(&mut c, CMD_WRITE, 7, 4096, &[0x42; 4096]).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        tx.send(()).unwrap();
        assert_eq!(simple(&mut c).await, (0, 7));
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "closed after the reply");
        tokio::time::timeout(Duration::from_secs(5), run).await.unwrap().unwrap().unwrap();
        assert_eq!(dev.data.lock().unwrap()[4096..8192], [0x42; 4096]);
        assert!(!sock.exists(), "socket file left behind");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Device errors reach the client as NBD errors; the connection goes on.
    #[tokio::test]
    async fn device_errors_become_nbd_errors() {
        let dev = MemDev::new(1 << 20, Duration::ZERO, Some(libc::ENOSPC));
        let server =
            NbdServer::bind(dev, NbdListen::Tcp("127.0.0.1:0".parse().unwrap()), opts()).await.unwrap();
        let NbdListen::Tcp(addr) = *server.local_addr() else { unreachable!() };
        let run = tokio::spawn(server.run(std::future::pending::<()>()));
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        go(&mut c).await;
        request(&mut c, CMD_WRITE, 1, 0, &[1; 512]).await;
        assert_eq!(simple(&mut c).await, (errno::ENOSPC, 1));
        request(&mut c, CMD_READ, 2, 0, &[]).await;
        assert_eq!(simple(&mut c).await, (errno::ENOSPC, 2));
        request(&mut c, CMD_FLUSH, 3, 0, &[]).await;
        assert_eq!(simple(&mut c).await, (errno::ENOSPC, 3));
        run.abort();
    }

    /// A device that panics fails the request with EIO; the server goes on.
    #[tokio::test]
    async fn panicking_device_fails_requests_with_eio() {
        let dev = MemDev::new(1 << 20, Duration::ZERO, Some(-1));
        let server =
            NbdServer::bind(dev, NbdListen::Tcp("127.0.0.1:0".parse().unwrap()), opts()).await.unwrap();
        let NbdListen::Tcp(addr) = *server.local_addr() else { unreachable!() };
        let run = tokio::spawn(server.run(std::future::pending::<()>()));
        for round in 0..2 {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            go(&mut c).await;
            request(&mut c, CMD_WRITE, round, 0, &[1; 512]).await;
            assert_eq!(simple(&mut c).await, (errno::EIO, round));
            request(&mut c, CMD_FLUSH, 10 + round, 0, &[]).await;
            assert_eq!(simple(&mut c).await, (errno::EIO, 10 + round));
        }
        run.abort();
    }
}
