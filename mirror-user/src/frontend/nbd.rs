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

use std::{fmt, future::Future, io, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader},
    net::{TcpListener, UnixListener},
    sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore},
    task::JoinSet,
};

use crate::volume::BlockDev;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;
const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
const FLAG_C_NO_ZEROES: u32 = 1 << 1;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

const INFO_EXPORT: u16 = 0;
const INFO_NAME: u16 = 1;
const INFO_DESCRIPTION: u16 = 2;
const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags (`NBD_FLAG_*`), as sent in `NBD_INFO_EXPORT`.
pub mod flags {
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const SEND_DF: u16 = 1 << 7;
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
}

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;

const CMD_FLAG_FUA: u16 = 1 << 0;
const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
const CMD_FLAG_DF: u16 = 1 << 2;

const REPLY_FLAG_DONE: u16 = 1;
const REPLY_TYPE_NONE: u16 = 0;
const REPLY_TYPE_OFFSET_DATA: u16 = 1;
const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// NBD error values (`NBD_E*`) sent in replies.
pub mod errno {
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const ENOMEM: u32 = 12;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
    pub const ENOTSUP: u32 = 95;
    pub const ESHUTDOWN: u32 = 108;
}

/// Option data longer than this is not read into memory.
const MAX_OPTION_LEN: u32 = 64 << 10;
/// Longer option data than this (or an oversized `NBD_OPT_EXPORT_NAME`) closes the connection.
const MAX_OPTION_DISCARD: u32 = 16 << 20;
/// Options in one handshake before the server gives up on the client.
const MAX_OPTIONS: usize = 4096;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a closing connection waits for its in-flight requests.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once; more are closed right after accept.
const MAX_CONNECTIONS: usize = 1024;
/// Reply payloads up to this size are copied behind their header and sent in one write.
const COALESCE_MAX: usize = 64 << 10;
/// Names and descriptions are strings of at most 4096 bytes in the protocol.
const MAX_STRING: usize = 4096;

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
}

impl Default for NbdOptions {
    fn default() -> Self {
        NbdOptions {
            export_name: "mirror".into(),
            description: None,
            read_only: false,
            max_request: 32 << 20,
            max_in_flight: 64,
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
                    Ok((stream, peer)) => {
                        if conns.len() >= MAX_CONNECTIONS {
                            tracing::warn!("NBD: refusing {peer}: {MAX_CONNECTIONS} connections already");
                            continue;
                        }
                        let shared = self.shared.clone();
                        let rx = stop_rx.clone();
                        match stream {
                            Stream::Tcp(s) => { conns.spawn(connection(s, shared, rx, peer)); }
                            Stream::Unix(s) => { conns.spawn(connection(s, shared, rx, peer)); }
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

async fn accept(l: &Listener) -> io::Result<(Stream, String)> {
    match l {
        Listener::Tcp(l) => {
            let (s, peer) = l.accept().await?;
            let _ = s.set_nodelay(true);
            Ok((Stream::Tcp(s), peer.to_string()))
        }
        Listener::Unix(l, p) => {
            let (s, _) = l.accept().await?;
            Ok((Stream::Unix(s), format!("unix:{}", p.display())))
        }
    }
}

async fn until_stop(rx: &mut watch::Receiver<bool>) {
    // An error means the server is gone: stop as well.
    let _ = rx.wait_for(|v| *v).await;
}

fn protocol(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

async fn connection<S, B>(stream: S, shared: Arc<Shared<B>>, mut stop: watch::Receiver<bool>, peer: String)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
    B: BlockDev,
{
    let (rh, mut wh) = tokio::io::split(stream);
    let mut r = BufReader::with_capacity(256 << 10, rh);
    let session = tokio::select! {
        biased;
        _ = until_stop(&mut stop) => return,
        s = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&shared, &mut r, &mut wh)) => s,
    };
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
    match transmission(shared, r, wh, structured, stop).await {
        Ok(()) => tracing::debug!("NBD {peer}: disconnected"),
        Err(e) if e.kind() == io::ErrorKind::InvalidData => tracing::warn!("NBD {peer}: closed: {e}"),
        Err(e) => tracing::info!("NBD {peer}: connection lost: {e}"),
    }
}

async fn opt_reply<W: AsyncWrite + Unpin>(w: &mut W, opt: u32, typ: u32, data: &[u8]) -> io::Result<()> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&typ.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    w.write_all(&b).await?;
    w.flush().await
}

async fn discard<R: AsyncRead + Unpin>(r: &mut R, len: u64) -> io::Result<()> {
    let n = tokio::io::copy(&mut r.take(len), &mut tokio::io::sink()).await?;
    if n < len {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "client closed mid-payload"));
    }
    Ok(())
}

/// Parses `NBD_OPT_INFO` / `NBD_OPT_GO` data: (name, information requests).
fn parse_info(data: &[u8]) -> Result<(&[u8], Vec<u16>), String> {
    if data.len() < 6 {
        return Err(format!("option data of {} bytes is too short", data.len()));
    }
    let name_len = u32::from_be_bytes(data[..4].try_into().expect("4 bytes")) as usize;
    if name_len > data.len() - 6 {
        return Err(format!("name length {name_len} exceeds the option data"));
    }
    let name = &data[4..4 + name_len];
    let rest = &data[4 + name_len..];
    let n = u16::from_be_bytes([rest[0], rest[1]]) as usize;
    let reqs = &rest[2..];
    if reqs.len() != 2 * n {
        return Err(format!("{n} information requests but {} bytes for them", reqs.len()));
    }
    Ok((name, reqs.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect()))
}

/// Runs the fixed newstyle handshake. `Some(structured)` when the client entered transmission.
async fn handshake<B, R, W>(shared: &Shared<B>, r: &mut R, w: &mut W) -> io::Result<Option<bool>>
where
    B: BlockDev,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    w.write_all(&hello).await?;
    w.flush().await?;
    let cflags = r.read_u32().await?;
    if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(protocol(format!("unknown client flags {cflags:#x}")));
    }
    let no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;
    let opts = &shared.opts;
    let mut structured = false;
    for _ in 0..MAX_OPTIONS {
        let magic = r.read_u64().await?;
        if magic != IHAVEOPT {
            return Err(protocol(format!("bad option magic {magic:#018x}")));
        }
        let opt = r.read_u32().await?;
        let len = r.read_u32().await?;
        if len > MAX_OPTION_LEN {
            if opt == OPT_EXPORT_NAME || len > MAX_OPTION_DISCARD {
                return Err(protocol(format!("option {opt} with {len} bytes of data")));
            }
            discard(r, len as u64).await?;
            let msg = format!("option data of {len} bytes exceeds {MAX_OPTION_LEN}");
            opt_reply(w, opt, REP_ERR_TOO_BIG, msg.as_bytes()).await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).await?;
        match opt {
            OPT_EXPORT_NAME => {
                if !shared.name_ok(&data) {
                    return Err(protocol(format!(
                        "NBD_OPT_EXPORT_NAME for unknown export {:?}",
                        String::from_utf8_lossy(&data)
                    )));
                }
                let mut b = Vec::with_capacity(134);
                b.extend_from_slice(&shared.size.to_be_bytes());
                b.extend_from_slice(&shared.transmission_flags(structured).to_be_bytes());
                if !no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                w.write_all(&b).await?;
                w.flush().await?;
                return Ok(Some(structured));
            }
            OPT_ABORT => {
                // The client may already be gone.
                let _ = opt_reply(w, opt, REP_ACK, &[]).await;
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    opt_reply(w, opt, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data").await?;
                    continue;
                }
                let name = opts.export_name.as_bytes();
                let mut b = Vec::new();
                b.extend_from_slice(&(name.len() as u32).to_be_bytes());
                b.extend_from_slice(name);
                if let Some(d) = &opts.description {
                    b.extend_from_slice(d.as_bytes());
                }
                opt_reply(w, opt, REP_SERVER, &b).await?;
                opt_reply(w, opt, REP_ACK, &[]).await?;
            }
            OPT_INFO | OPT_GO => {
                let (name, reqs) = match parse_info(&data) {
                    Ok(v) => v,
                    Err(msg) => {
                        opt_reply(w, opt, REP_ERR_INVALID, msg.as_bytes()).await?;
                        continue;
                    }
                };
                if !shared.name_ok(name) {
                    let msg = format!(
                        "no export named {:?} (this server exports {:?})",
                        String::from_utf8_lossy(name),
                        opts.export_name
                    );
                    opt_reply(w, opt, REP_ERR_UNKNOWN, msg.as_bytes()).await?;
                    continue;
                }
                let mut info = Vec::with_capacity(12);
                info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                info.extend_from_slice(&shared.size.to_be_bytes());
                info.extend_from_slice(&shared.transmission_flags(structured).to_be_bytes());
                opt_reply(w, opt, REP_INFO, &info).await?;
                if reqs.contains(&INFO_NAME) {
                    let mut b = INFO_NAME.to_be_bytes().to_vec();
                    b.extend_from_slice(opts.export_name.as_bytes());
                    opt_reply(w, opt, REP_INFO, &b).await?;
                }
                if let (true, Some(d)) = (reqs.contains(&INFO_DESCRIPTION), &opts.description) {
                    let mut b = INFO_DESCRIPTION.to_be_bytes().to_vec();
                    b.extend_from_slice(d.as_bytes());
                    opt_reply(w, opt, REP_INFO, &b).await?;
                }
                let mut b = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                b.extend_from_slice(&1u32.to_be_bytes());
                b.extend_from_slice(&shared.pref_block.to_be_bytes());
                b.extend_from_slice(&opts.max_request.to_be_bytes());
                opt_reply(w, opt, REP_INFO, &b).await?;
                opt_reply(w, opt, REP_ACK, &[]).await?;
                if opt == OPT_GO {
                    return Ok(Some(structured));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    opt_reply(w, opt, REP_ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data").await?;
                    continue;
                }
                structured = true;
                opt_reply(w, opt, REP_ACK, &[]).await?;
            }
            OPT_STARTTLS => {
                opt_reply(w, opt, REP_ERR_UNSUP, b"TLS is not supported by this server").await?;
            }
            _ => {
                let msg = format!("option {opt} is not supported");
                opt_reply(w, opt, REP_ERR_UNSUP, msg.as_bytes()).await?;
            }
        }
    }
    Err(protocol(format!("more than {MAX_OPTIONS} options in one handshake")))
}

/// A failed request: the NBD error value and a message for structured replies and logs.
#[derive(Debug)]
struct Failure {
    errno: u32,
    msg: String,
}

fn fail(errno: u32, msg: String) -> Failure {
    Failure { errno, msg }
}

/// Maps a device error to an NBD error value.
pub fn nbd_errno(e: &io::Error) -> u32 {
    if let Some(code) = e.raw_os_error() {
        return match code {
            libc::EPERM | libc::EACCES | libc::EROFS => errno::EPERM,
            libc::EIO => errno::EIO,
            libc::ENOMEM => errno::ENOMEM,
            libc::EINVAL => errno::EINVAL,
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => errno::ENOSPC,
            libc::EOVERFLOW => errno::EOVERFLOW,
            libc::ENOTSUP => errno::ENOTSUP,
            libc::ESHUTDOWN => errno::ESHUTDOWN,
            _ => errno::EIO,
        };
    }
    match e.kind() {
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => errno::EPERM,
        io::ErrorKind::InvalidInput => errno::EINVAL,
        io::ErrorKind::StorageFull | io::ErrorKind::FileTooLarge => errno::ENOSPC,
        io::ErrorKind::OutOfMemory => errno::ENOMEM,
        io::ErrorKind::Unsupported => errno::ENOTSUP,
        _ => errno::EIO,
    }
}

enum Op {
    Read { offset: u64, len: u32 },
    Write { offset: u64, data: Vec<u8>, fua: bool },
    Flush,
    Trim { offset: u64, len: u64, fua: bool },
    Zeroes { offset: u64, len: u64, fua: bool },
}

struct Header {
    magic: u32,
    flags: u16,
    typ: u16,
    cookie: u64,
    offset: u64,
    len: u32,
}

/// Reads a request header; `None` on a clean end of stream before its first byte.
async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<Header>> {
    let mut b = [0u8; 28];
    let mut filled = 0;
    while filled < b.len() {
        let n = r.read(&mut b[filled..]).await?;
        if n == 0 {
            if filled == 0 {
                return Ok(None);
            }
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "client closed mid-request"));
        }
        filled += n;
    }
    let be32 = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().expect("4 bytes"));
    let be64 = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    Ok(Some(Header {
        magic: be32(0),
        flags: u16::from_be_bytes([b[4], b[5]]),
        typ: u16::from_be_bytes([b[6], b[7]]),
        cookie: be64(8),
        offset: be64(16),
        len: be32(24),
    }))
}

fn in_range(size: u64, offset: u64, len: u64) -> bool {
    offset.checked_add(len).is_some_and(|end| end <= size)
}

/// Checks a request (other than WRITE's payload, already read) and builds its operation.
fn validate<B>(
    shared: &Shared<B>,
    h: &Header,
    structured: bool,
    data: Option<Vec<u8>>,
) -> Result<Op, Failure> {
    let fua = h.flags & CMD_FLAG_FUA != 0;
    let allowed = match h.typ {
        CMD_READ if structured => CMD_FLAG_FUA | CMD_FLAG_DF,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        _ => CMD_FLAG_FUA,
    };
    if h.flags & !allowed != 0 {
        return Err(fail(
            errno::EINVAL,
            format!("command flags {:#x} not valid for command {}", h.flags, h.typ),
        ));
    }
    let (off, len) = (h.offset, h.len as u64);
    let writes = matches!(h.typ, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && shared.opts.read_only {
        return Err(fail(errno::EPERM, "the export is read-only".into()));
    }
    let range = |e: u32| {
        if in_range(shared.size, off, len) {
            Ok(())
        } else {
            Err(fail(e, format!("range {off}+{len} exceeds the export size {}", shared.size)))
        }
    };
    match h.typ {
        CMD_READ => {
            if h.len > shared.opts.max_request {
                return Err(fail(
                    errno::EINVAL,
                    format!("read of {len} bytes exceeds the maximum {}", shared.opts.max_request),
                ));
            }
            range(errno::EINVAL)?;
            Ok(Op::Read { offset: off, len: h.len })
        }
        CMD_WRITE => {
            range(errno::ENOSPC)?;
            Ok(Op::Write { offset: off, data: data.unwrap_or_default(), fua })
        }
        CMD_FLUSH => Ok(Op::Flush),
        CMD_TRIM => {
            range(errno::EINVAL)?;
            Ok(Op::Trim { offset: off, len, fua })
        }
        CMD_WRITE_ZEROES => {
            range(errno::ENOSPC)?;
            Ok(Op::Zeroes { offset: off, len, fua })
        }
        t => Err(fail(errno::EINVAL, format!("command {t} is not supported"))),
    }
}

async fn execute<B: BlockDev>(dev: &B, op: Op) -> Result<Option<Vec<u8>>, Failure> {
    let io = |what: &str| {
        let what = what.to_string();
        move |e: io::Error| fail(nbd_errno(&e), format!("{what}: {e}"))
    };
    match op {
        Op::Read { offset, len } => {
            if len == 0 {
                return Ok(Some(Vec::new()));
            }
            let data = dev.read(offset, len).await.map_err(io("read"))?;
            if data.len() != len as usize {
                return Err(fail(
                    errno::EIO,
                    format!("device returned {} bytes for a {len}-byte read", data.len()),
                ));
            }
            Ok(Some(data))
        }
        Op::Write { offset, data, fua } => {
            if data.is_empty() {
                if fua {
                    dev.flush().await.map_err(io("flush"))?;
                }
                return Ok(None);
            }
            dev.write(offset, data, fua).await.map_err(io("write"))?;
            Ok(None)
        }
        Op::Flush => {
            dev.flush().await.map_err(io("flush"))?;
            Ok(None)
        }
        Op::Trim { offset, len, fua } => {
            if len > 0 {
                dev.trim(offset, len).await.map_err(io("trim"))?;
            }
            if fua {
                dev.flush().await.map_err(io("flush"))?;
            }
            Ok(None)
        }
        Op::Zeroes { offset, len, fua } => {
            if len > 0 {
                dev.write_zeroes(offset, len).await.map_err(io("write zeroes"))?;
            }
            if fua {
                dev.flush().await.map_err(io("flush"))?;
            }
            Ok(None)
        }
    }
}

/// Turns a panic while polling the inner future into `Err(())`.
struct CatchUnwind<F>(std::pin::Pin<Box<F>>);

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, ()>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let inner = self.0.as_mut();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(std::task::Poll::Ready(v)) => std::task::Poll::Ready(Ok(v)),
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Err(_) => std::task::Poll::Ready(Err(())),
        }
    }
}

/// One reply on its way to the writer task, with the permits of its request (released once it
/// is written, so that queued replies count against the in-flight and byte limits).
struct Reply {
    hdr: Vec<u8>,
    payload: Option<Vec<u8>>,
    _permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

/// Encodes the reply to one request: header (with small payloads appended) and a large payload.
fn encode_reply(
    structured: bool,
    cookie: u64,
    offset: u64,
    res: Result<Option<Vec<u8>>, Failure>,
) -> (Vec<u8>, Option<Vec<u8>>) {
    let mut hdr = Vec::with_capacity(32);
    let mut payload: Option<Vec<u8>> = None;
    let chunk = |hdr: &mut Vec<u8>, typ: u16, len: usize| {
        hdr.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        hdr.extend_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
        hdr.extend_from_slice(&typ.to_be_bytes());
        hdr.extend_from_slice(&cookie.to_be_bytes());
        hdr.extend_from_slice(&(len as u32).to_be_bytes());
    };
    match res {
        Ok(data) if structured => match data {
            Some(d) if !d.is_empty() => {
                chunk(&mut hdr, REPLY_TYPE_OFFSET_DATA, 8 + d.len());
                hdr.extend_from_slice(&offset.to_be_bytes());
                payload = Some(d);
            }
            _ => chunk(&mut hdr, REPLY_TYPE_NONE, 0),
        },
        Ok(data) => {
            hdr.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
            hdr.extend_from_slice(&0u32.to_be_bytes());
            hdr.extend_from_slice(&cookie.to_be_bytes());
            payload = data;
        }
        Err(f) if structured => {
            let mut msg = f.msg.as_str();
            while msg.len() > MAX_STRING {
                let mut end = MAX_STRING;
                while !msg.is_char_boundary(end) {
                    end -= 1;
                }
                msg = &msg[..end];
            }
            chunk(&mut hdr, REPLY_TYPE_ERROR, 6 + msg.len());
            hdr.extend_from_slice(&f.errno.to_be_bytes());
            hdr.extend_from_slice(&(msg.len() as u16).to_be_bytes());
            hdr.extend_from_slice(msg.as_bytes());
        }
        Err(f) => {
            hdr.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
            hdr.extend_from_slice(&f.errno.to_be_bytes());
            hdr.extend_from_slice(&cookie.to_be_bytes());
        }
    }
    if let Some(p) = payload.take_if(|p| p.len() <= COALESCE_MAX) {
        hdr.extend_from_slice(&p);
    }
    (hdr, payload)
}

/// The one writer of a connection: writes replies as they come, batching whatever is queued
/// into one buffer flush. Ends when every sender is gone (then shuts the stream down) or on a
/// write error.
async fn writer_task<W: AsyncWrite + Unpin>(w: W, mut rx: mpsc::Receiver<Reply>) -> io::Result<()> {
    let mut w = tokio::io::BufWriter::with_capacity(256 << 10, w);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(r) = next {
            w.write_all(&r.hdr).await?;
            if let Some(p) = &r.payload {
                w.write_all(p).await?;
            }
            next = rx.try_recv().ok();
        }
        w.flush().await?;
    }
    w.shutdown().await
}

/// Runs a request on the reader's task as far as it goes without waiting: a request the device
/// completes at once (a page-cache read, a small buffered write done inline) costs no task and
/// no handoff between workers. Only a request that would wait becomes a task of its own (polled
/// again there; its futures re-register their wakers), so a slow request never holds up the
/// reading of the next ones.
fn run_or_spawn<F: Future<Output = ()> + Send + 'static>(mut request: std::pin::Pin<Box<F>>) {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    // A panic outside the device (which `CatchUnwind` already covers) would otherwise end the
    // reader; as a task of its own it would only have lost this reply.
    let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| request.as_mut().poll(&mut cx)));
    match polled {
        Ok(std::task::Poll::Ready(())) => {}
        Ok(std::task::Poll::Pending) => {
            tokio::spawn(request);
        }
        Err(_) => tracing::error!("NBD: a request panicked outside the device; its reply is lost"),
    }
}

async fn transmission<B, R, W>(
    shared: Arc<Shared<B>>,
    mut r: BufReader<R>,
    w: W,
    structured: bool,
    mut stop: watch::Receiver<bool>,
) -> io::Result<()>
where
    B: BlockDev,
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let max_in_flight = shared.opts.max_in_flight;
    // Every queued reply holds a slot, so sends never wait.
    let (tx, rx) = mpsc::channel::<Reply>(max_in_flight);
    let mut writer = tokio::spawn(writer_task(w, rx));
    let slots = Arc::new(Semaphore::new(max_in_flight));
    let budget = Arc::new(Semaphore::new(shared.byte_budget as usize));
    let result: io::Result<()> = loop {
        let slot = slots.clone().acquire_owned().await.expect("semaphore never closed");
        let h = tokio::select! {
            biased;
            _ = until_stop(&mut stop) => break Ok(()),
            h = read_header(&mut r) => h,
        };
        let h = match h {
            Ok(Some(h)) => h,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        if h.magic != REQUEST_MAGIC {
            break Err(protocol(format!("bad request magic {:#010x}", h.magic)));
        }
        if h.typ == CMD_DISC {
            break Ok(());
        }
        let max = shared.opts.max_request;
        let sized = matches!(h.typ, CMD_READ | CMD_WRITE) && h.len <= max;
        // Bytes held in memory by this request (payload or read buffer).
        let held = if sized { h.len } else { 0 };
        let bytes = budget.clone().acquire_many_owned(held).await.expect("semaphore never closed");
        let mut data = None;
        if h.typ == CMD_WRITE {
            if h.len > max {
                // The payload cannot be accepted; skip it so the stream stays in sync (it is
                // at most 4 GiB, read and thrown away in small pieces).
                let skipped = tokio::select! {
                    biased;
                    _ = until_stop(&mut stop) => break Ok(()),
                    s = discard(&mut r, h.len as u64) => s,
                };
                if let Err(e) = skipped {
                    break Err(e);
                }
                let f = fail(errno::EINVAL, format!("write of {} bytes exceeds the maximum {max}", h.len));
                let (hdr, payload) = encode_reply(structured, h.cookie, h.offset, Err(f));
                if tx.send(Reply { hdr, payload, _permits: (slot, bytes) }).await.is_err() {
                    break Err(io::Error::new(io::ErrorKind::BrokenPipe, "cannot send replies"));
                }
                continue;
            }
            let mut buf = vec![0u8; h.len as usize];
            let got = tokio::select! {
                biased;
                _ = until_stop(&mut stop) => break Ok(()),
                g = r.read_exact(&mut buf) => g,
            };
            if let Err(e) = got {
                break Err(io::Error::new(
                    e.kind(),
                    format!("client closed during a {}-byte write payload (nothing written): {e}", h.len),
                ));
            }
            data = Some(buf);
        }
        let op = validate(&shared, &h, structured, data);
        let shared = shared.clone();
        let tx = tx.clone();
        let request = Box::pin(async move {
            let res = match op {
                Ok(op) => {
                    // A panicking device fails this request with EIO instead of leaving it
                    // unanswered.
                    let res = match CatchUnwind(Box::pin(execute(&*shared.dev, op))).await {
                        Ok(res) => res,
                        Err(()) => Err(fail(errno::EIO, "the device panicked".into())),
                    };
                    if let Err(f) = &res {
                        let (t, o, l) = (h.typ, h.offset, h.len);
                        tracing::warn!("NBD: command {t} at {o}+{l}: {} (errno {})", f.msg, f.errno);
                    }
                    res
                }
                Err(f) => {
                    let (t, o, l) = (h.typ, h.offset, h.len);
                    tracing::debug!("NBD: refused command {t} at {o}+{l}: {} (errno {})", f.msg, f.errno);
                    Err(f)
                }
            };
            let (hdr, payload) = encode_reply(structured, h.cookie, h.offset, res);
            // A closed channel means the writer failed (client gone); the permits drop with it.
            let _ = tx.send(Reply { hdr, payload, _permits: (slot, bytes) }).await;
        });
        run_or_spawn(request);
    };
    drop(tx);
    // Let the requests already read finish and their replies go out, then close. A client
    // that stopped reading replies cannot hold a server shutdown forever.
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, slots.acquire_many(max_in_flight as u32)).await;
    if drained.is_err() {
        tracing::warn!("NBD: replies still pending after {DRAIN_TIMEOUT:?}; closing anyway");
        writer.abort();
        return result;
    }
    // All replies are written (or the writer failed); the writer now shuts the stream down.
    match tokio::time::timeout(DRAIN_TIMEOUT, &mut writer).await {
        Ok(Ok(Err(e))) if result.is_ok() => Err(e),
        Ok(_) => result,
        Err(_) => {
            writer.abort();
            result
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
                    assert_eq!(&d[2..], &[0, 0, 0, 1, 0, 0, 16, 0, 0, 16, 0, 0][..], "block sizes 1/4096/1M")
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
    fn errno_mapping() {
        let raw = |e| nbd_errno(&io::Error::from_raw_os_error(e));
        assert_eq!(raw(libc::ENOSPC), errno::ENOSPC);
        assert_eq!(raw(libc::EDQUOT), errno::ENOSPC);
        assert_eq!(raw(libc::EROFS), errno::EPERM);
        assert_eq!(raw(libc::EINVAL), errno::EINVAL);
        assert_eq!(raw(libc::ECONNREFUSED), errno::EIO);
        assert_eq!(nbd_errno(&io::Error::new(io::ErrorKind::InvalidInput, "x")), errno::EINVAL);
        assert_eq!(nbd_errno(&io::Error::other("replica gone")), errno::EIO);
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

    #[test]
    fn info_parsing() {
        assert_eq!(parse_info(b"\0\0\0\x03vol\0\x01\0\x03").unwrap(), (&b"vol"[..], vec![3]));
        assert_eq!(parse_info(b"\0\0\0\0\0\0").unwrap(), (&b""[..], vec![]));
        assert!(parse_info(b"\0\0\0\x09vol\0\0").is_err(), "name longer than the data");
        assert!(parse_info(b"\0\0\0\0\0\x02\0\x03").is_err(), "fewer requests than announced");
        assert!(parse_info(b"\0\0").is_err());
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
