//! A local replica: a [`Volume`] of this process (also served to the peer by an embedded replica
//! server, where a resync from the peer reaches it), its data path through io_uring when the
//! ring could be set up (else tokio's blocking pool), and the rules for I/O done on the calling
//! thread. Every failure is the storage engine's [`StorageError`], errno included.

use std::{
    os::fd::RawFd,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
};

use super::{
    error::ReplicaError,
    inline::{self, ewma},
    uring::{UringFile, ALIGN},
};
use crate::{
    replication::{rate::SyncRate, sync, transport::Transport},
    storage::{Access, IoOp, JobKind, StorageError, Volume, VolumeStatus},
};

/// Largest write done on the calling thread (see [`LocalReplica::inline_slot`]).
const INLINE_MAX: usize = 64 << 10;

/// A local write is running on an async worker (at most one at a time in the whole process, see
/// [`LocalReplica::inline_slot`]).
static INLINE_BUSY: AtomicBool = AtomicBool::new(false);

/// Releases the inline slot (also if the write panics).
struct InlineSlot;

impl Drop for InlineSlot {
    fn drop(&mut self) {
        INLINE_BUSY.store(false, Ordering::Release);
    }
}

/// A volume of this process as one side of a mirrored volume.
#[derive(Debug)]
pub struct LocalReplica {
    vol: Arc<Volume>,
    /// Where the embedded replica server serves it to the peer.
    addr: String,
    uring: Option<Arc<UringFile>>,
    /// Exponentially weighted mean duration of the writes done inline, microseconds.
    inline_lat_ewma_us: AtomicU64,
    /// How its sync jobs reach the peer.
    transport: Transport,
}

impl LocalReplica {
    /// `vol`, served to the peer at `addr`; its data path through `uring` when given.
    pub fn new(vol: Arc<Volume>, addr: String, uring: Option<Arc<UringFile>>) -> LocalReplica {
        LocalReplica {
            vol,
            addr,
            uring,
            inline_lat_ewma_us: AtomicU64::new(0),
            transport: Transport::default(),
        }
    }

    /// The same, its sync jobs connecting to the peer over `transport`.
    pub fn with_transport(self, transport: Transport) -> LocalReplica {
        LocalReplica { transport, ..self }
    }

    pub fn volume(&self) -> &Arc<Volume> {
        &self.vol
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// How the data moves: `io_uring` (with `O_DIRECT` for aligned requests or not), or the
    /// blocking pool.
    pub fn io_kind(&self) -> &'static str {
        match &self.uring {
            Some(u) if u.is_direct() => "io_uring, O_DIRECT",
            Some(_) => "io_uring",
            None => "blocking pool",
        }
    }

    /// True when the data file is driven through io_uring (what the ublk fast path can submit to
    /// itself).
    pub fn is_uring(&self) -> bool {
        self.uring.is_some()
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Volume) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, ReplicaError> {
        let v = self.vol.clone();
        Ok(tokio::task::spawn_blocking(move || f(&v))
            .await
            .map_err(|e| ReplicaError::Task(e.to_string()))??)
    }

    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, ReplicaError> {
        match &self.uring {
            Some(u) => {
                self.vol.admit(Access::Read, offset, u64::from(len))?;
                Ok(u.read(offset, len as usize).await.map_err(StorageError::io(IoOp::Read, offset))?)
            }
            None => self.blocking(move |v| v.read(offset, len)).await,
        }
    }

    /// Writes `data` at `offset`; `attempt` numbers the replica's writes (the slow-on-average
    /// guard of the inline writes probes one in `inline::PROBE`).
    pub async fn write(
        &self,
        offset: u64,
        data: Arc<Vec<u8>>,
        fua: bool,
        attempt: u64,
    ) -> Result<(), ReplicaError> {
        if let Some(slot) = self.inline_slot(offset, data.len(), fua, attempt) {
            let t = std::time::Instant::now();
            let r = self.vol.write(offset, &data, false);
            ewma(&self.inline_lat_ewma_us, t.elapsed().as_micros() as u64);
            drop(slot);
            return Ok(r?);
        }
        match &self.uring {
            Some(u) => self.uring_write(u, offset, &data, fua).await,
            None => self.blocking(move |v| v.write(offset, &data, fua)).await,
        }
    }

    /// Whether a local write may run right here, on the async worker, as one buffered `pwrite`
    /// (what nbdkit's worker threads do): a handoff to the ring thread and its io-wq worker costs
    /// more than such a write. Only small, page-aligned writes (whole pages: no read of an
    /// uncached page first), without FUA, while not tracking (no bitmap fsync), at most one at a
    /// time in the whole process (so a stalled file holds at most one worker: the others keep
    /// the runtime going), and only while inline writes stay fast on average.
    fn inline_slot(&self, offset: u64, len: usize, fua: bool, attempt: u64) -> Option<InlineSlot> {
        if fua || !inline::whole_pages(offset, len, ALIGN as u64, INLINE_MAX) {
            return None;
        }
        // Slow on average: the ring (or the pool) takes them, one in `inline::PROBE` aside.
        if inline::too_slow(&self.inline_lat_ewma_us, attempt) {
            return None;
        }
        if self.vol.tracking() {
            return None;
        }
        INLINE_BUSY
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .ok()
            .map(|_| InlineSlot)
    }

    /// A write through io_uring under the volume's write rule (see `storage::volume`): while
    /// tracking, the range is recorded durably before and set again after; the metadata calls
    /// that may fsync run on the blocking pool.
    async fn uring_write(
        &self,
        u: &UringFile,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> Result<(), ReplicaError> {
        let len = data.len() as u64;
        self.vol.admit(Access::Write, offset, len)?;
        let tracked = if self.vol.tracking() {
            self.blocking(move |v| v.begin_write(offset, len)).await?
        } else {
            self.vol.begin_write(offset, len)?
        };
        let r = async {
            u.write(offset, data).await.map_err(StorageError::io(IoOp::Write, offset))?;
            if fua {
                u.fsync().await.map_err(StorageError::io(IoOp::Flush, 0))?;
            }
            Ok::<(), StorageError>(())
        }
        .await;
        if tracked {
            self.blocking(move |v| v.end_write(offset, len)).await?;
        }
        Ok(r?)
    }

    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), ReplicaError> {
        self.blocking(move |v| v.write_zeroes(offset, len)).await
    }

    pub async fn flush(&self) -> Result<(), ReplicaError> {
        match &self.uring {
            Some(u) => Ok(u.fsync().await.map_err(StorageError::io(IoOp::Flush, 0))?),
            None => self.blocking(super::super::storage::volume::Volume::flush).await,
        }
    }

    /// Records a range as missing on the peer (entering degraded tracking), durably.
    pub async fn mark_dirty(&self, offset: u64, len: u64) -> Result<(), ReplicaError> {
        self.blocking(move |v| v.mark_dirty(offset, len)).await
    }

    pub async fn mark_intent(&self, offset: u64, len: u64) -> Result<(), ReplicaError> {
        self.blocking(move |v| v.mark_intent(offset, len)).await
    }

    pub async fn mark_intents(&self, ranges: Vec<(u64, u64)>) -> Result<(), ReplicaError> {
        self.blocking(move |v| v.mark_intents(&ranges)).await
    }

    pub async fn clear_intent(&self, offset: u64, len: u64) -> Result<bool, ReplicaError> {
        self.blocking(move |v| v.clear_intent(offset, len)).await
    }

    pub async fn clear_intents(&self, ranges: Vec<(u64, u64)>) -> Result<bool, ReplicaError> {
        self.blocking(move |v| v.clear_intents(&ranges)).await
    }

    pub fn status(&self) -> VolumeStatus {
        self.vol.status()
    }

    /// Runs a job on this volume pushing to `peer` (see `replication::sync::start_job`).
    pub fn start_job(
        &self,
        secret: &[u8],
        rate: SyncRate,
        kind: JobKind,
        peer: String,
    ) -> Result<(), ReplicaError> {
        Ok(sync::start_job(&self.vol, &self.transport, secret.to_vec(), rate, kind, peer)?)
    }

    // The fast path's parts (see `volume::fast`).

    /// True when a write may take the fast path: through io_uring, and the volume is not
    /// tracking (its write rule only the slow path follows).
    pub(super) fn fast_write_ok(&self) -> bool {
        self.uring.is_some() && !self.vol.tracking()
    }

    /// The descriptor for `[offset, offset+len)` from an [`ALIGN`]-aligned buffer, after the
    /// range check [`LocalReplica::read`] / [`LocalReplica::write`] make, with the volume's
    /// counters updated (a write asks [`LocalReplica::fast_write_ok`] first). `None`: take the
    /// slow path. Valid while `self` is.
    pub(super) fn fast_fd(&self, write: bool, offset: u64, len: u32) -> Option<RawFd> {
        let u = self.uring.as_ref()?;
        let access = if write { Access::Write } else { Access::Read };
        self.vol.admit(access, offset, u64::from(len)).ok()?;
        Some(u.fd_for(offset, len as usize))
    }

    /// A read into `buf` at `offset` done right here when the page cache holds all of it (see
    /// `UringFile::read_cached_into`): true when done.
    pub(super) fn fast_read_cached(&self, offset: u64, buf: &mut [u8]) -> bool {
        self.uring.as_ref().is_some_and(|u| u.read_cached_into(offset, buf))
    }

    /// A write of `data` at `offset` done right here, as one buffered `pwrite`, under the rules
    /// of [`LocalReplica::inline_slot`] and only on a file without `O_DIRECT`. `Some(ok)` when
    /// done, `None`: submit it.
    pub(super) fn fast_write_inline(&self, offset: u64, data: &[u8], attempt: u64) -> Option<bool> {
        let u = self.uring.as_ref().filter(|u| !u.is_direct())?;
        let slot = self.inline_slot(offset, data.len(), false, attempt)?;
        let t = std::time::Instant::now();
        let r = u.write_cached(offset, data);
        ewma(&self.inline_lat_ewma_us, t.elapsed().as_micros() as u64);
        drop(slot);
        if let Err(e) = &r {
            tracing::debug!(volume = %self.vol.name(), offset, len = data.len(), "inline write failed: {e}");
        }
        Some(r.is_ok())
    }

    /// True when a write of `len` bytes at `offset` may be a plain buffered `pwrite` on another
    /// thread of the frontend (the ublk queue's writer): a file without `O_DIRECT`, and the
    /// inline-write rules of size and alignment. The process-wide one-at-a-time rule of
    /// [`LocalReplica::inline_slot`] does not apply: it keeps the runtime's threads free, and
    /// that thread is the frontend's own.
    pub(super) fn fast_write_elsewhere_ok(&self, offset: u64, len: usize) -> bool {
        self.uring.as_ref().is_some_and(|u| !u.is_direct())
            && inline::whole_pages(offset, len, ALIGN as u64, INLINE_MAX)
    }
}
