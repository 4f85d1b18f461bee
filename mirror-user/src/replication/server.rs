//! The replica server: serves volumes over TCP to authenticated peers (the router, a sync source,
//! the CLI), and runs sync / verify jobs that push this replica's data to a peer.
//!
//! One thread per connection; requests on a connection are handled in order, so a client may
//! pipeline. Nothing is applied before its whole frame has arrived and passed its checksum; any
//! protocol violation closes that connection only.

use std::{
    collections::HashMap,
    io::ErrorKind,
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use crate::health::monitor::NodeHealth;

use super::{
    auth,
    conn::{Conn, ConnError},
    meta::{new_generation, MetaError, VolumeMeta},
    protocol::{code, GenInfo, JobKind, Message, VolumeInfo, FLAG_FUA, MAX_DIGESTS, MAX_IO, VERSION},
    rate::SyncRate,
    store::Store,
    sync::{self, JobState},
};

/// One volume to serve.
#[derive(Debug, Clone)]
pub struct VolumeSpec {
    pub name: String,
    pub path: PathBuf,
    /// Size to create the backing file with when it does not exist.
    pub size: Option<u64>,
    /// Metadata file (default: `<path>.meta`).
    pub meta: Option<PathBuf>,
    /// Bitmap grain.
    pub block_size: u32,
    /// Aligned I/O with O_DIRECT (bypassing this node's page cache).
    pub direct_io: bool,
}

impl VolumeSpec {
    /// Parses `NAME=PATH[:SIZE]` (SIZE like 256M, 1G).
    pub fn parse(s: &str) -> Result<VolumeSpec, String> {
        let (name, rest) = s.split_once('=').ok_or_else(|| format!("`{s}`: expected NAME=PATH[:SIZE]"))?;
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(format!("`{name}`: a volume name uses letters, digits, '-', '_', '.'"));
        }
        let (path, size) = match rest.rsplit_once(':') {
            Some((p, sz)) => (p, Some(crate::parse_size(sz)?)),
            None => (rest, None),
        };
        Ok(VolumeSpec {
            name: name.into(),
            path: path.into(),
            size,
            meta: None,
            block_size: 4096,
            direct_io: false,
        })
    }
}

/// Where a volume's metadata lives unless configured: `PATH.meta` next to a regular file; for a
/// block device `/var/lib/mirror/<device name>.meta` (next to it would be /dev, a RAM filesystem
/// that forgets the dirty bitmap at reboot).
pub fn default_meta_path(path: &std::path::Path) -> PathBuf {
    let regular = std::fs::metadata(path).map(|m| m.is_file()).unwrap_or(true);
    if regular {
        let mut p = path.to_path_buf().into_os_string();
        p.push(".meta");
        return p.into();
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "volume".into());
    PathBuf::from(META_DIR).join(format!("{name}.meta"))
}

/// Directory of the metadata of block-device volumes.
pub const META_DIR: &str = "/var/lib/mirror";

/// Server configuration.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: String,
    pub volumes: Vec<VolumeSpec>,
    pub secret: Vec<u8>,
    pub rate: SyncRate,
    /// This node's health score and signals, sent in heartbeat replies.
    pub health: Arc<NodeHealth>,
}

/// Errors starting a server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    #[error("volume {name}: backing {path}: {source}")]
    Store { name: String, path: PathBuf, source: std::io::Error },
    #[error("volume {name}: {source}")]
    Meta { name: String, source: MetaError },
    #[error("volume {0} is configured twice")]
    Duplicate(String),
    #[error("listen on {addr}: {source}")]
    Listen { addr: String, source: std::io::Error },
    #[error("block size {0} must be a power of two between 512 and 65536")]
    BlockSize(u32),
}

/// Per-volume counters.
#[derive(Debug, Default)]
pub struct Counters {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub errors: AtomicU64,
}

/// A served volume.
#[derive(Debug)]
pub struct Volume {
    pub name: String,
    pub store: Store,
    pub meta: VolumeMeta,
    pub block_size: u32,
    pub counters: Counters,
    /// Nanoseconds since server start of the last application read or write.
    pub last_app_io: AtomicU64,
    pub job: Mutex<Option<Arc<JobState>>>,
    pub epoch: Instant,
}

impl Volume {
    pub fn info(&self) -> VolumeInfo {
        let h = self.meta.header();
        VolumeInfo { uuid: h.uuid, size: self.store.size(), block_size: self.block_size, gen: h.gen }
    }

    /// True when application I/O happened within `window`.
    pub fn app_active(&self, window: Duration) -> bool {
        let last = self.last_app_io.load(Ordering::Relaxed);
        last != 0 && (self.epoch.elapsed().as_nanos() as u64).saturating_sub(last) < window.as_nanos() as u64
    }

    /// Records application I/O now (sync pacing gives it priority).
    pub fn touch(&self) {
        self.last_app_io.store((self.epoch.elapsed().as_nanos() as u64).max(1), Ordering::Relaxed);
    }

    /// Local write with the server's semantics: write-intent while tracking, FUA flushes.
    pub fn local_write(&self, offset: u64, data: &[u8], fua: bool) -> std::io::Result<()> {
        match apply_write(self, offset, data, if fua { FLAG_FUA } else { 0 }) {
            Message::Ok => Ok(()),
            Message::Error { message, .. } => Err(std::io::Error::other(message)),
            m => Err(std::io::Error::other(format!("unexpected {m:?}"))),
        }
    }

    /// Local zeroing with write-intent.
    pub fn local_write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        check_range(self, offset, len).map_err(|m| std::io::Error::other(format!("{m:?}")))?;
        self.touch();
        tracked(self, offset, len, || self.store.write_zeroes(offset, len))
            .map_err(|m| std::io::Error::other(format!("{m:?}")))
    }

    /// Local read (counted as application I/O).
    pub fn local_read(&self, offset: u64, len: u32) -> std::io::Result<Vec<u8>> {
        check_range(self, offset, len as u64).map_err(|m| std::io::Error::other(format!("{m:?}")))?;
        self.touch();
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        self.counters.read_bytes.fetch_add(len as u64, Ordering::Relaxed);
        let mut buf = vec![0u8; len as usize];
        self.store.read_at(&mut buf, offset)?;
        Ok(buf)
    }

    /// Enters degraded tracking (new generation if not tracking yet) and records a range.
    pub fn mark_degraded(&self, offset: u64, len: u64) -> std::io::Result<()> {
        match dispatch_mark_dirty(self, offset, len) {
            Message::Ok => Ok(()),
            m => Err(std::io::Error::other(format!("{m:?}"))),
        }
    }

    /// Status as JSON.
    pub fn status_json(&self) -> serde_json::Value {
        self.status()
    }

    fn status(&self) -> serde_json::Value {
        let h = self.meta.header();
        let bs = self.block_size as u64;
        let job = self.job.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|j| j.to_json());
        serde_json::json!({
            "volume": self.name,
            "path": self.store.path().display().to_string(),
            "size": self.store.size(),
            "block_size": self.block_size,
            "uuid": hex(&h.uuid),
            "generation": gen_json(&h.gen),
            "tracking": h.tracking,
            "dirty_bytes": self.meta.dirty_bits() * bs,
            "pending_bytes": self.meta.pending_bits() * bs,
            "reads": self.counters.reads.load(Ordering::Relaxed),
            "writes": self.counters.writes.load(Ordering::Relaxed),
            "read_bytes": self.counters.read_bytes.load(Ordering::Relaxed),
            "write_bytes": self.counters.write_bytes.load(Ordering::Relaxed),
            "errors": self.counters.errors.load(Ordering::Relaxed),
            "job": job,
        })
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn gen_json(g: &GenInfo) -> serde_json::Value {
    serde_json::json!({
        "current": format!("{:016x}", g.current),
        "history": g.history.iter().map(|h| format!("{h:016x}")).collect::<Vec<_>>(),
        "consistent": g.consistent,
        "sync_source": format!("{:016x}", g.sync_source),
    })
}

/// The inverse of [`gen_json`]; `None` when a field is missing or malformed.
pub fn gen_from_json(v: &serde_json::Value) -> Option<GenInfo> {
    let hex64 = |v: &serde_json::Value| u64::from_str_radix(v.as_str()?, 16).ok();
    let mut history = [0u64; super::protocol::HISTORY];
    let h = v["history"].as_array()?;
    if h.len() != history.len() {
        return None;
    }
    for (slot, x) in history.iter_mut().zip(h) {
        *slot = hex64(x)?;
    }
    Some(GenInfo {
        current: hex64(&v["current"])?,
        history,
        consistent: v["consistent"].as_bool()?,
        sync_source: hex64(&v["sync_source"])?,
    })
}

struct Shared {
    volumes: HashMap<String, Arc<Volume>>,
    secret: Vec<u8>,
    rate: SyncRate,
    health: Arc<NodeHealth>,
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
        let epoch = Instant::now();
        for v in &cfg.volumes {
            if !(512..=65536).contains(&v.block_size) || !v.block_size.is_power_of_two() {
                return Err(ServerError::BlockSize(v.block_size));
            }
            if volumes.contains_key(&v.name) {
                return Err(ServerError::Duplicate(v.name.clone()));
            }
            let store_err =
                |source| ServerError::Store { name: v.name.clone(), path: v.path.clone(), source };
            let mut store = Store::open(&v.path, v.size).map_err(store_err)?;
            if v.direct_io {
                store.set_direct_io().map_err(store_err)?;
            }
            let meta_path = v.meta.clone().unwrap_or_else(|| default_meta_path(&v.path));
            if let Some(dir) = meta_path.parent() {
                std::fs::create_dir_all(dir).map_err(|source| ServerError::Store {
                    name: v.name.clone(),
                    path: dir.to_path_buf(),
                    source,
                })?;
            }
            let meta = VolumeMeta::open(&meta_path, store.size(), v.block_size)
                .map_err(|source| ServerError::Meta { name: v.name.clone(), source })?;
            let h = meta.header();
            tracing::info!(
                volume = %v.name, path = %v.path.display(), size = store.size(),
                generation = format!("{:016x}", h.gen.current), consistent = h.gen.consistent,
                tracking = h.tracking, dirty_blocks = meta.dirty_bits(), "volume opened"
            );
            volumes.insert(
                v.name.clone(),
                Arc::new(Volume {
                    name: v.name.clone(),
                    store,
                    meta,
                    block_size: v.block_size,
                    counters: Counters::default(),
                    last_app_io: AtomicU64::new(0),
                    job: Mutex::new(None),
                    epoch,
                }),
            );
        }
        let listener = TcpListener::bind(&cfg.listen)
            .map_err(|source| ServerError::Listen { addr: cfg.listen.clone(), source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ServerError::Listen { addr: cfg.listen.clone(), source })?;
        let shared = Arc::new(Shared { volumes, secret: cfg.secret, rate: cfg.rate, health: cfg.health });
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
            if let Some(j) = v.job.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                j.cancel.store(true, Ordering::SeqCst);
            }
            if let Err(e) = v.store.flush() {
                tracing::error!(volume = %v.name, "flush on shutdown failed: {e}");
            }
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>, stop: Arc<AtomicBool>) {
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        match stream {
            Ok(s) => {
                let sh = shared.clone();
                let _ = std::thread::Builder::new().name("mirror-conn".into()).spawn(move || {
                    let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
                    handle(s, &peer, &sh);
                });
            }
            Err(e) => tracing::warn!("accept: {e}"),
        }
    }
}

fn refuse(conn: &mut Conn, peer: &str, code: u16, message: String) {
    tracing::warn!(%peer, "refused: {message}");
    let _ = conn.send(0, 0, &Message::Error { code, errno: 0, message });
    let _ = conn.flush();
}

/// Runs the handshake; returns the authenticated volume or None (already refused and logged).
fn handshake(conn: &mut Conn, peer: &str, shared: &Shared) -> Option<Arc<Volume>> {
    let (volume, client_nonce) = match conn.recv() {
        Ok((_, Message::Hello { version, volume, nonce })) => {
            if version != VERSION {
                refuse(
                    conn,
                    peer,
                    code::VERSION,
                    format!("protocol version mismatch: this server speaks {VERSION}, the peer {version}"),
                );
                return None;
            }
            (volume, nonce)
        }
        Ok((_, m)) => {
            refuse(conn, peer, code::PROTOCOL, format!("expected Hello, got {m:?}"));
            return None;
        }
        Err(e) => {
            tracing::warn!(%peer, "handshake failed: {e}");
            return None;
        }
    };
    let server_nonce = auth::nonce();
    if conn
        .send(0, 0, &Message::Challenge { version: VERSION, nonce: server_nonce })
        .and_then(|_| conn.flush())
        .is_err()
    {
        return None;
    }
    let mac = match conn.recv() {
        Ok((_, Message::Auth { mac })) => mac,
        Ok((_, m)) => {
            refuse(conn, peer, code::PROTOCOL, format!("expected Auth, got {m:?}"));
            return None;
        }
        Err(e) => {
            tracing::warn!(%peer, "handshake failed: {e}");
            return None;
        }
    };
    if !auth::verify_client(&shared.secret, &server_nonce, &client_nonce, &volume, &mac) {
        refuse(
            conn,
            peer,
            code::AUTH,
            "authentication failed: the peer does not know the shared secret".into(),
        );
        return None;
    }
    let Some(vol) = shared.volumes.get(&volume).cloned() else {
        refuse(conn, peer, code::NO_VOLUME, format!("no volume named {volume:?} here"));
        return None;
    };
    let mac = auth::server_proof(&shared.secret, &server_nonce, &client_nonce, &volume);
    if conn.send(0, 0, &Message::Welcome { mac, info: vol.info() }).and_then(|_| conn.flush()).is_err() {
        return None;
    }
    tracing::debug!(%peer, volume = %vol.name, "peer authenticated");
    Some(vol)
}

fn handle(stream: TcpStream, peer: &str, shared: &Shared) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok(mut conn) = Conn::new(stream) else { return };
    let Some(vol) = handshake(&mut conn, peer, shared) else { return };
    let _ = conn.stream().set_read_timeout(None);
    loop {
        let (h, msg) = match conn.recv() {
            Ok(x) => x,
            Err(ConnError::Io(e))
                if matches!(e.kind(), ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset) =>
            {
                tracing::debug!(%peer, "peer disconnected");
                return;
            }
            Err(e) => {
                refuse(&mut conn, peer, code::PROTOCOL, format!("closing connection: {e}"));
                return;
            }
        };
        let (reply, close) = dispatch(&vol, shared, h.flags, msg);
        if let Message::Error { code, message, .. } = &reply {
            vol.counters.errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, volume = %vol.name, code, "request failed: {message}");
        }
        if conn.send(h.id, 0, &reply).and_then(|_| conn.flush()).is_err() || close {
            return;
        }
    }
}

fn err(code: u16, message: impl Into<String>) -> Message {
    Message::Error { code, errno: 0, message: message.into() }
}

pub(crate) fn check_range(vol: &Volume, offset: u64, len: u64) -> Result<(), Message> {
    match offset.checked_add(len) {
        Some(end) if end <= vol.store.size() => Ok(()),
        _ => Err(err(
            code::RANGE,
            format!("range {offset}+{len} outside the volume ({} bytes)", vol.store.size()),
        )),
    }
}

/// Applies a mutation under write-intent: while tracking, the range is recorded durably before
/// and set again after (see `VolumeMeta::end_write`).
fn tracked<T>(
    vol: &Volume,
    offset: u64,
    len: u64,
    f: impl FnOnce() -> std::io::Result<T>,
) -> Result<T, Message> {
    let tracked = vol.meta.begin_write(offset, len).map_err(|e| err(code::IO, e.to_string()))?;
    let r = f();
    if tracked {
        vol.meta.end_write(offset, len).map_err(|e| err(code::IO, e.to_string()))?;
    }
    r.map_err(|e| err(code::IO, format!("at {offset}: {e}")))
}

fn apply_write(vol: &Volume, offset: u64, data: &[u8], flags: u16) -> Message {
    if let Err(m) = check_range(vol, offset, data.len() as u64) {
        return m;
    }
    vol.touch();
    vol.counters.writes.fetch_add(1, Ordering::Relaxed);
    vol.counters.write_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
    let r = tracked(vol, offset, data.len() as u64, || {
        vol.store.write_at(data, offset)?;
        if flags & FLAG_FUA != 0 {
            vol.store.flush()?;
        }
        Ok(())
    });
    match r {
        Ok(()) => Message::Ok,
        Err(m) => m,
    }
}

/// Handles one request: the reply, and whether to close the connection after it.
fn dispatch(vol: &Arc<Volume>, shared: &Shared, flags: u16, msg: Message) -> (Message, bool) {
    let reply = match msg {
        Message::Read { offset, len } => {
            if len > MAX_IO {
                return (err(code::RANGE, format!("read of {len} bytes exceeds {MAX_IO}")), false);
            }
            if let Err(m) = check_range(vol, offset, len as u64) {
                return (m, false);
            }
            vol.touch();
            vol.counters.reads.fetch_add(1, Ordering::Relaxed);
            vol.counters.read_bytes.fetch_add(len as u64, Ordering::Relaxed);
            let mut buf = vec![0u8; len as usize];
            match vol.store.read_at(&mut buf, offset) {
                Ok(()) => Message::Data(buf),
                Err(e) => err(code::IO, format!("read at {offset}: {e}")),
            }
        }
        Message::Write { offset, data } => {
            if data.len() as u64 > MAX_IO as u64 {
                return (err(code::RANGE, "write too large"), false);
            }
            apply_write(vol, offset, &data, flags)
        }
        Message::WriteLz4 { offset, raw_len, data } => {
            if raw_len > MAX_IO {
                return (err(code::RANGE, "write too large"), false);
            }
            match lz4_flex::block::decompress(&data, raw_len as usize) {
                Ok(raw) if raw.len() == raw_len as usize => apply_write(vol, offset, &raw, flags),
                _ => {
                    return (
                        err(code::PROTOCOL, "lz4 payload does not decompress to its stated length"),
                        true,
                    )
                }
            }
        }
        Message::Flush => match vol.store.flush() {
            Ok(()) => Message::Ok,
            Err(e) => err(code::IO, format!("flush: {e}")),
        },
        Message::Trim { offset, len } | Message::WriteZeroes { offset, len } => {
            if let Err(m) = check_range(vol, offset, len as u64) {
                return (m, false);
            }
            vol.touch();
            match tracked(vol, offset, len as u64, || vol.store.write_zeroes(offset, len as u64)) {
                Ok(()) => Message::Ok,
                Err(m) => m,
            }
        }
        Message::Digests { grain, extents } => digests(vol, grain, &extents),
        Message::MarkDirty { offset, len } => dispatch_mark_dirty(vol, offset, len),
        Message::MarkIntent { offset, len } => match check_range(vol, offset, len) {
            Err(m) => m,
            Ok(()) => match vol.meta.mark_intent(offset, len) {
                Ok(_) => Message::Ok,
                Err(e) => err(code::IO, e.to_string()),
            },
        },
        Message::ClearIntent { offset, len } => match check_range(vol, offset, len) {
            Err(m) => m,
            // One byte: 1 cleared, 0 kept (tracking: the bits record what the peer lacks).
            Ok(()) => match vol.meta.clear_intent(offset, len) {
                Ok(cleared) => Message::Data(vec![cleared as u8]),
                Err(e) => err(code::IO, e.to_string()),
            },
        },
        Message::Heartbeat { seq, .. } => {
            Message::HeartbeatAck { seq, health: shared.health.score(), report: shared.health.report() }
        }
        Message::Status => Message::Json(vol.status().to_string()),
        Message::SyncBegin { source_gen } => {
            if job_running(vol) {
                return (
                    err(code::BUSY, "this replica is running its own job; refusing to be a sync target"),
                    false,
                );
            }
            match vol.meta.update(|h| {
                h.gen.consistent = false;
                h.gen.sync_source = source_gen;
            }) {
                Ok(_) => {
                    tracing::info!(volume = %vol.name, source = format!("{source_gen:016x}"), "sync target: inconsistent until the sync ends");
                    Message::Ok
                }
                Err(e) => err(code::IO, e.to_string()),
            }
        }
        Message::SyncEnd { current, history } => {
            let r = vol.store.flush().map_err(|e| e.to_string()).and_then(|_| {
                vol.meta.clear_all().map_err(|e| e.to_string())?;
                vol.meta
                    .update(|h| {
                        h.gen = GenInfo { current, history, consistent: true, sync_source: 0 };
                        h.tracking = false;
                    })
                    .map_err(|e| e.to_string())
            });
            match r {
                Ok(_) => {
                    tracing::info!(volume = %vol.name, generation = format!("{current:016x}"), "sync target: consistent");
                    Message::Ok
                }
                Err(e) => err(code::IO, e),
            }
        }
        Message::StartJob { kind, peer } => start_job(vol, shared, kind, peer),
        Message::GetBitmap => {
            let bits = vol.meta.bitmap_bytes();
            if bits.len() > super::protocol::MAX_PAYLOAD as usize {
                err(code::RANGE, format!("the bitmap ({} bytes) exceeds one frame", bits.len()))
            } else {
                Message::Data(bits)
            }
        }
        Message::JobStatus => {
            let j = vol.job.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|j| j.to_json());
            Message::Json(j.unwrap_or(serde_json::json!({"state": "none"})).to_string())
        }
        Message::CancelJob => {
            if let Some(j) = vol.job.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                j.cancel.store(true, Ordering::SeqCst);
            }
            Message::Ok
        }
        Message::ResolveDiscard => {
            if job_running(vol) {
                return (err(code::BUSY, "a job is running; cancel it first"), false);
            }
            let r = vol.meta.clear_all().and_then(|_| {
                vol.meta.update(|h| {
                    h.gen = GenInfo::default();
                    h.tracking = false;
                })
            });
            match r {
                Ok(_) => {
                    tracing::warn!(volume = %vol.name, "operator discarded this replica's data: the next sync onto it is a full one");
                    Message::Ok
                }
                Err(e) => err(code::IO, e.to_string()),
            }
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
        | Message::Json(_)) => return (err(code::PROTOCOL, format!("{m:?} is not a request")), true),
    };
    (reply, false)
}

fn dispatch_mark_dirty(vol: &Volume, offset: u64, len: u64) -> Message {
    if let Err(m) = check_range(vol, offset, len) {
        return m;
    }
    let r = vol.meta.update(|h| {
        if !h.tracking {
            // Entering degraded mode: our writes from here on are a new generation.
            new_generation(&mut h.gen);
            h.tracking = true;
        }
    });
    match r.and_then(|h| {
        tracing::warn!(volume = %vol.name, generation = format!("{:016x}", h.gen.current), offset, len, "peer missing writes: range marked dirty");
        vol.meta.mark_dirty(offset, len)
    }) {
        Ok(_) => Message::Ok,
        Err(e) => err(code::IO, e.to_string()),
    }
}

fn job_running(vol: &Volume) -> bool {
    vol.job.lock().unwrap_or_else(|p| p.into_inner()).as_ref().is_some_and(|j| !j.finished())
}

fn digests(vol: &Volume, grain: u32, extents: &[(u64, u32)]) -> Message {
    if !(512..=MAX_IO).contains(&grain) {
        return err(code::RANGE, format!("digest grain {grain} outside 512..={MAX_IO}"));
    }
    let mut count = 0u64;
    for &(o, l) in extents {
        if let Err(m) = check_range(vol, o, l as u64) {
            return m;
        }
        count += (l as u64).div_ceil(grain as u64);
    }
    if count > MAX_DIGESTS {
        return err(code::RANGE, format!("{count} digests requested, at most {MAX_DIGESTS}"));
    }
    let mut out = Vec::with_capacity(count as usize);
    for &(o, l) in extents {
        if let Err(e) = vol.store.digests(o, l as u64, grain, &mut out) {
            return err(code::IO, format!("digest at {o}: {e}"));
        }
    }
    Message::DigestList(out)
}

/// Starts a job on a volume of this process (a local replica pushing to its peer).
pub fn start_local_job(
    vol: &Arc<Volume>,
    secret: Vec<u8>,
    rate: SyncRate,
    kind: JobKind,
    peer: String,
) -> Result<(), String> {
    let mut slot = vol.job.lock().unwrap_or_else(|p| p.into_inner());
    if slot.as_ref().is_some_and(|j| !j.finished()) {
        return Err("a job is already running on this volume".into());
    }
    let state = Arc::new(JobState::new(kind, peer.clone()));
    *slot = Some(state.clone());
    drop(slot);
    let v = vol.clone();
    std::thread::Builder::new()
        .name("mirror-job".into())
        .spawn(move || sync::run_job(&v, &peer, &secret, rate, &state))
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn start_job(vol: &Arc<Volume>, shared: &Shared, kind: JobKind, peer: String) -> Message {
    let mut slot = vol.job.lock().unwrap_or_else(|p| p.into_inner());
    if slot.as_ref().is_some_and(|j| !j.finished()) {
        return err(code::BUSY, "a job is already running on this volume");
    }
    let state = Arc::new(JobState::new(kind, peer.clone()));
    *slot = Some(state.clone());
    drop(slot);
    let (v, secret, rate) = (vol.clone(), shared.secret.clone(), shared.rate);
    let spawned = std::thread::Builder::new().name("mirror-job".into()).spawn(move || {
        sync::run_job(&v, &peer, &secret, rate, &state);
    });
    match spawned {
        Ok(_) => Message::Ok,
        Err(e) => err(code::IO, format!("spawn job: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_of_a_device_does_not_go_to_dev() {
        let f = std::env::temp_dir().join(format!("mirror-metapath-{}", std::process::id()));
        std::fs::write(&f, b"x").unwrap();
        assert_eq!(default_meta_path(&f), PathBuf::from(format!("{}.meta", f.display())));
        // /dev/null is no regular file: its metadata goes to the persistent directory.
        assert_eq!(
            default_meta_path(std::path::Path::new("/dev/null")),
            PathBuf::from("/var/lib/mirror/null.meta")
        );
        let _ = std::fs::remove_file(&f);
    }
}
