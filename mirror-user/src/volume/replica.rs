//! One side of a mirrored volume as the router sees it: where its data is (local or remote), its
//! state (in sync, failed, resyncing), and its counters.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering},
        Arc, RwLock,
    },
    time::Duration,
};

use super::{
    inline::{self, ewma},
    remote::RemotePool,
    uring::{UringFile, ALIGN},
};
use crate::replication::{
    protocol::{Message, FLAG_FUA},
    server::Volume,
};

/// Where a replica's data is.
#[derive(Debug)]
pub enum Location {
    /// A volume of this process, also served to the peer by an embedded replica server at
    /// `addr` (where a resync from the peer reaches it).
    /// Its data path goes through `uring` when the ring could be set up.
    Local { vol: Arc<Volume>, addr: String, uring: Option<Arc<UringFile>> },
    /// A volume on a replica server.
    Remote {
        addr: String,
        volume: String,
        secret: Vec<u8>,
        conns: usize,
        pool: RwLock<Option<Arc<RemotePool>>>,
    },
}

/// Replica states.
pub const IN_SYNC: u8 = 0;
pub const FAILED: u8 = 1;
pub const RESYNCING: u8 = 2;

pub fn state_name(s: u8) -> &'static str {
    match s {
        IN_SYNC => "in-sync",
        FAILED => "failed",
        RESYNCING => "resyncing",
        _ => "?",
    }
}

/// Per-replica counters, for status and metrics.
#[derive(Debug, Default)]
pub struct ReplicaStats {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub errors: AtomicU64,
    pub timeouts: AtomicU64,
    /// Reads retried on the other replica after failing or timing out here.
    pub retries: AtomicU64,
    /// Exponentially weighted mean read latency, microseconds (0 = no sample yet).
    pub read_lat_ewma_us: AtomicU64,
    pub write_lat_ewma_us: AtomicU64,
}

/// A replica of the mirrored volume.
#[derive(Debug)]
pub struct Replica {
    /// "source" or "target".
    pub role: &'static str,
    pub location: Location,
    pub state: AtomicU8,
    pub stats: ReplicaStats,
    pub block_size: u64,
    /// Exponentially weighted mean duration of the writes done inline, microseconds.
    inline_lat_ewma_us: AtomicU64,
}

/// Largest write done on the calling thread (see [`Replica::inline_slot`]).
const INLINE_MAX: usize = 64 << 10;

/// A local write is running on an async worker (at most one at a time in the whole process, see
/// [`Replica::inline_slot`]).
static INLINE_BUSY: AtomicBool = AtomicBool::new(false);

/// Releases the inline slot (also if the write panics).
struct InlineSlot;

impl Drop for InlineSlot {
    fn drop(&mut self) {
        INLINE_BUSY.store(false, Ordering::Release);
    }
}

fn io_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl Replica {
    pub fn new(role: &'static str, location: Location, block_size: u64) -> Replica {
        Replica {
            role,
            location,
            state: AtomicU8::new(IN_SYNC),
            stats: ReplicaStats::default(),
            block_size,
            inline_lat_ewma_us: AtomicU64::new(0),
        }
    }

    pub fn state(&self) -> u8 {
        self.state.load(Ordering::Acquire)
    }

    /// Address peers reach this replica at.
    pub fn addr(&self) -> &str {
        match &self.location {
            Location::Remote { addr, .. } | Location::Local { addr, .. } => addr,
        }
    }

    /// True when this replica may serve reads: only in sync. A
    /// resyncing replica serves no reads at all: the resync may briefly write an older copy of a
    /// block over a newer one (it re-marks and resends it), so no bitmap snapshot can tell which
    /// of its blocks are current at the instant of a read.
    pub fn serves_reads(&self) -> bool {
        self.state() == IN_SYNC
    }

    /// Read deadline from observed latency: ten times the mean, within [min, cap].
    pub fn read_deadline(&self, min: Duration, cap: Duration) -> Duration {
        match self.stats.read_lat_ewma_us.load(Ordering::Relaxed) {
            0 => cap,
            us => Duration::from_micros(us.saturating_mul(10)).clamp(min, cap),
        }
    }

    pub fn pool(&self) -> std::io::Result<Arc<RemotePool>> {
        match &self.location {
            Location::Remote { pool, .. } => {
                pool.read().unwrap_or_else(|p| p.into_inner()).clone().ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::NotConnected,
                        format!("{} replica not connected", self.role),
                    )
                })
            }
            Location::Local { .. } => Err(io_err("not remote")),
        }
    }

    async fn local<T: Send + 'static>(
        vol: &Arc<Volume>,
        f: impl FnOnce(&Volume) -> std::io::Result<T> + Send + 'static,
    ) -> std::io::Result<T> {
        let v = vol.clone();
        tokio::task::spawn_blocking(move || f(&v)).await.map_err(io_err)?
    }

    pub async fn read(&self, offset: u64, len: u32) -> std::io::Result<Vec<u8>> {
        let t0 = std::time::Instant::now();
        let r = match &self.location {
            Location::Local { vol: v, uring: Some(u), .. } => {
                crate::replication::server::check_range(v, offset, len as u64)
                    .map_err(|m| io_err(format!("{m:?}")))?;
                v.touch();
                v.counters.reads.fetch_add(1, Ordering::Relaxed);
                v.counters.read_bytes.fetch_add(len as u64, Ordering::Relaxed);
                u.read(offset, len as usize).await
            }
            Location::Local { vol: v, .. } => Self::local(v, move |v| v.local_read(offset, len)).await,
            Location::Remote { .. } => match self.pool()?.call(Message::Read { offset, len }, 0).await? {
                Message::Data(d) if d.len() == len as usize => Ok(d),
                m => Err(io_err(format!("unexpected reply {m:?}"))),
            },
        };
        if r.is_ok() {
            self.stats.reads.fetch_add(1, Ordering::Relaxed);
            self.stats.read_bytes.fetch_add(len as u64, Ordering::Relaxed);
            ewma(&self.stats.read_lat_ewma_us, t0.elapsed().as_micros() as u64);
        }
        r
    }

    /// True when this replica is a local file driven through io_uring (what the ublk fast path
    /// can submit to itself).
    pub fn is_local_uring(&self) -> bool {
        matches!(self.location, Location::Local { uring: Some(_), .. })
    }

    /// For a frontend that submits this replica's file I/O itself (the ublk fast path): the
    /// descriptor for `[offset, offset+len)` from an [`ALIGN`]-aligned buffer, after the checks
    /// [`Replica::read`] / [`Replica::write`] make (range, and for a write: the volume is not
    /// tracking, whose write-intent rules only the slow path follows), with the volume's counters
    /// updated. `None`: use [`Replica::read`] / [`Replica::write`]. The descriptor is valid while
    /// the replica is. Report the outcome with [`Replica::fast_done`].
    pub fn fast_fd(&self, write: bool, offset: u64, len: u32) -> Option<std::os::fd::RawFd> {
        let Location::Local { vol: v, uring: Some(u), .. } = &self.location else { return None };
        crate::replication::server::check_range(v, offset, u64::from(len)).ok()?;
        if write && v.meta.tracking() {
            return None;
        }
        v.touch();
        let (n, bytes) = if write {
            (&v.counters.writes, &v.counters.write_bytes)
        } else {
            (&v.counters.reads, &v.counters.read_bytes)
        };
        n.fetch_add(1, Ordering::Relaxed);
        bytes.fetch_add(u64::from(len), Ordering::Relaxed);
        Some(u.fd_for(offset, len as usize))
    }

    /// The fast path's read into `buf` at `offset` done right here when the page cache holds all
    /// of it (`preadv2(RWF_NOWAIT)` on a file without `O_DIRECT`): true when done; otherwise
    /// submit it. Call after [`Replica::fast_fd`].
    pub fn fast_read_cached(&self, offset: u64, buf: &mut [u8]) -> bool {
        matches!(&self.location, Location::Local { uring: Some(u), .. } if u.read_cached_into(offset, buf))
    }

    /// The fast path's write of `data` at `offset` done right here, as one buffered `pwrite`,
    /// under the same rules as the router path's inline writes ([`Replica::inline_slot`]: small,
    /// page-aligned, not tracking, inline writes fast on average) and only on a file without
    /// `O_DIRECT`. `Some(ok)` when done, `None`: submit it. Call after [`Replica::fast_fd`].
    pub fn fast_write_inline(&self, offset: u64, data: &[u8]) -> Option<bool> {
        let Location::Local { vol: v, uring: Some(u), .. } = &self.location else { return None };
        if u.is_direct() {
            return None;
        }
        let slot = self.inline_slot(v, offset, data.len(), false)?;
        let t = std::time::Instant::now();
        let r = u.write_cached(offset, data);
        ewma(&self.inline_lat_ewma_us, t.elapsed().as_micros() as u64);
        drop(slot);
        if let Err(e) = &r {
            tracing::debug!(replica = self.role, offset, len = data.len(), "inline write failed: {e}");
        }
        Some(r.is_ok())
    }

    /// True when the fast path's write of `len` bytes at `offset` may be a plain buffered `pwrite`
    /// on the ublk queue's writer thread (`frontend::ublk_writer`): a local file without
    /// `O_DIRECT`, and the inline-write rules of size and alignment (small, whole pages). The
    /// process-wide one-at-a-time rule of [`Replica::inline_slot`] does not apply: it keeps the
    /// runtime's threads free, and that thread is the frontend's own. Call after
    /// [`Replica::fast_fd`], which made the other checks and gave the descriptor.
    pub fn fast_write_elsewhere_ok(&self, offset: u64, len: usize) -> bool {
        let Location::Local { uring: Some(u), .. } = &self.location else { return false };
        !u.is_direct() && inline::whole_pages(offset, len, ALIGN as u64, INLINE_MAX)
    }

    /// Counts a fast-path request started at `t0` that completed here (`ok`), or an error.
    pub fn fast_done(&self, write: bool, len: u32, t0: std::time::Instant, ok: bool) {
        let s = &self.stats;
        if !ok {
            s.errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let us = t0.elapsed().as_micros() as u64;
        if write {
            s.writes.fetch_add(1, Ordering::Relaxed);
            s.write_bytes.fetch_add(u64::from(len), Ordering::Relaxed);
            ewma(&s.write_lat_ewma_us, us);
        } else {
            s.reads.fetch_add(1, Ordering::Relaxed);
            s.read_bytes.fetch_add(u64::from(len), Ordering::Relaxed);
            ewma(&s.read_lat_ewma_us, us);
        }
    }

    fn expect_ok(m: Message) -> std::io::Result<()> {
        match m {
            Message::Ok => Ok(()),
            m => Err(io_err(format!("unexpected reply {m:?}"))),
        }
    }

    pub async fn write(&self, offset: u64, data: Arc<Vec<u8>>, fua: bool) -> std::io::Result<()> {
        let t0 = std::time::Instant::now();
        let len = data.len() as u64;
        let r = match &self.location {
            Location::Local { vol: v, uring, .. } => {
                if let Some(slot) = self.inline_slot(v, offset, data.len(), fua) {
                    let t = std::time::Instant::now();
                    let r = v.local_write(offset, &data, false);
                    ewma(&self.inline_lat_ewma_us, t.elapsed().as_micros() as u64);
                    drop(slot);
                    r
                } else if let Some(u) = uring {
                    Self::uring_write(v, u, offset, &data, fua).await
                } else {
                    Self::local(v, move |v| v.local_write(offset, &data, fua)).await
                }
            }
            Location::Remote { .. } => {
                let flags = if fua { FLAG_FUA } else { 0 };
                Self::expect_ok(
                    self.pool()?.call(Message::Write { offset, data: data.to_vec() }, flags).await?,
                )
            }
        };
        if r.is_ok() {
            self.stats.writes.fetch_add(1, Ordering::Relaxed);
            self.stats.write_bytes.fetch_add(len, Ordering::Relaxed);
            ewma(&self.stats.write_lat_ewma_us, t0.elapsed().as_micros() as u64);
        }
        r
    }

    /// Whether a local write may run right here, on the async worker, as one buffered `pwrite`
    /// (what nbdkit's worker threads do): a handoff to the ring thread and its io-wq worker costs
    /// more than such a write. Only small, page-aligned writes (whole pages: no read of an
    /// uncached page first), without FUA, while not tracking (no bitmap fsync), at most one at a
    /// time in the whole process (so a stalled file holds at most one worker: the others keep
    /// the runtime going), and only while inline writes stay fast on average.
    fn inline_slot(&self, v: &Volume, offset: u64, len: usize, fua: bool) -> Option<InlineSlot> {
        if fua || !inline::whole_pages(offset, len, ALIGN as u64, INLINE_MAX) {
            return None;
        }
        // Slow on average: the ring (or the pool) takes them, one in `inline::PROBE` aside.
        if inline::too_slow(&self.inline_lat_ewma_us, self.stats.writes.load(Ordering::Relaxed)) {
            return None;
        }
        if v.meta.tracking() {
            return None;
        }
        INLINE_BUSY
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .ok()
            .map(|_| InlineSlot)
    }

    /// A local write through io_uring under the volume's write-intent rules (see
    /// `VolumeMeta::begin_write`): while tracking, the range is recorded durably before and set
    /// again after; the metadata calls that may fsync run on the blocking pool.
    async fn uring_write(
        v: &Arc<Volume>,
        u: &UringFile,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> std::io::Result<()> {
        let len = data.len() as u64;
        crate::replication::server::check_range(v, offset, len).map_err(|m| io_err(format!("{m:?}")))?;
        v.touch();
        v.counters.writes.fetch_add(1, Ordering::Relaxed);
        v.counters.write_bytes.fetch_add(len, Ordering::Relaxed);
        let tracked = if v.meta.tracking() {
            Self::local(v, move |v| v.meta.begin_write(offset, len).map_err(io_err)).await?
        } else {
            v.meta.begin_write(offset, len).map_err(io_err)?
        };
        let r = async {
            u.write(offset, data).await?;
            if fua {
                u.fsync().await?;
            }
            Ok(())
        }
        .await;
        if tracked {
            Self::local(v, move |v| v.meta.end_write(offset, len).map_err(io_err)).await?;
        }
        r
    }

    pub async fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        match &self.location {
            Location::Local { vol: v, .. } => {
                Self::local(v, move |v| v.local_write_zeroes(offset, len)).await
            }
            Location::Remote { .. } => {
                let pool = self.pool()?;
                let mut o = offset;
                while o < offset + len {
                    let n = (offset + len - o).min(1 << 30) as u32;
                    Self::expect_ok(pool.call(Message::WriteZeroes { offset: o, len: n }, 0).await?)?;
                    o += n as u64;
                }
                Ok(())
            }
        }
    }

    pub async fn flush(&self) -> std::io::Result<()> {
        match &self.location {
            Location::Local { uring: Some(u), .. } => u.fsync().await,
            Location::Local { vol: v, .. } => Self::local(v, |v| v.store.flush()).await,
            Location::Remote { .. } => Self::expect_ok(self.pool()?.call(Message::Flush, 0).await?),
        }
    }

    /// Records a range as missing on the peer (entering degraded tracking), durably.
    pub async fn mark_degraded(&self, offset: u64, len: u64) -> std::io::Result<()> {
        match &self.location {
            Location::Local { vol: v, .. } => Self::local(v, move |v| v.mark_degraded(offset, len)).await,
            Location::Remote { .. } => {
                Self::expect_ok(self.pool()?.call(Message::MarkDirty { offset, len }, 0).await?)
            }
        }
    }

    /// The router's write intent on this replica (see `VolumeMeta::mark_intent`), durable when
    /// it returns.
    pub async fn mark_intent(&self, offset: u64, len: u64) -> std::io::Result<()> {
        match &self.location {
            Location::Local { vol: v, .. } => {
                Self::local(v, move |v| v.meta.mark_intent(offset, len).map(|_| ()).map_err(io_err)).await
            }
            Location::Remote { .. } => {
                Self::expect_ok(self.pool()?.call(Message::MarkIntent { offset, len }, 0).await?)
            }
        }
    }

    /// Drops the router's write intent of a range; `Ok(false)` when the replica is tracking (its
    /// bits then record what the peer lacks and stay).
    pub async fn clear_intent(&self, offset: u64, len: u64) -> std::io::Result<bool> {
        match &self.location {
            Location::Local { vol: v, .. } => {
                Self::local(v, move |v| v.meta.clear_intent(offset, len).map_err(io_err)).await
            }
            Location::Remote { .. } => {
                match self.pool()?.call(Message::ClearIntent { offset, len }, 0).await? {
                    Message::Data(d) if d.len() == 1 => Ok(d[0] == 1),
                    m => Err(io_err(format!("unexpected reply {m:?}"))),
                }
            }
        }
    }

    /// The replica's volume status.
    pub async fn status(&self) -> std::io::Result<serde_json::Value> {
        match &self.location {
            Location::Local { vol: v, .. } => Ok(v.status_json()),
            Location::Remote { .. } => match self.pool()?.call(Message::Status, 0).await? {
                Message::Json(s) => serde_json::from_str(&s).map_err(io_err),
                m => Err(io_err(format!("unexpected reply {m:?}"))),
            },
        }
    }

    /// (Re)connects a remote replica; returns the size of its volume (a local one: its store's).
    pub async fn connect(&self) -> std::io::Result<u64> {
        match &self.location {
            Location::Remote { addr, volume, secret, conns, pool } => {
                let (p, size) = RemotePool::connect(addr, volume, secret, *conns).await?;
                *pool.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(p));
                Ok(size)
            }
            Location::Local { vol, .. } => Ok(vol.store.size()),
        }
    }

    /// Drops a remote replica's connections (it then counts as broken).
    pub fn disconnect(&self) {
        if let Location::Remote { pool, .. } = &self.location {
            *pool.write().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }

    /// True when a remote replica's connections broke.
    pub fn connection_broken(&self) -> bool {
        match &self.location {
            Location::Remote { pool, .. } => {
                pool.read().unwrap_or_else(|p| p.into_inner()).as_ref().is_none_or(|p| p.is_broken())
            }
            Location::Local { .. } => false,
        }
    }

    pub fn stats_json(&self) -> serde_json::Value {
        let s = &self.stats;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "role": self.role,
            "location": match &self.location { Location::Local { vol: v, .. } => format!("local:{}", v.store.path().display()), Location::Remote { addr, .. } => format!("remote:{addr}") },
            "io": match &self.location { Location::Local { uring: Some(u), .. } => if u.is_direct() { "io_uring, O_DIRECT" } else { "io_uring" }, Location::Local { .. } => "blocking pool", Location::Remote { .. } => "protocol" },
            "state": state_name(self.state()),
            "reads": l(&s.reads), "writes": l(&s.writes),
            "read_bytes": l(&s.read_bytes), "write_bytes": l(&s.write_bytes),
            "errors": l(&s.errors), "timeouts": l(&s.timeouts), "retries": l(&s.retries),
            "read_latency_us": l(&s.read_lat_ewma_us), "write_latency_us": l(&s.write_lat_ewma_us),
        })
    }
}
