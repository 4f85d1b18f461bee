//! [`Volume`]: one replica's storage engine. The data file or block device ([`Store`]), its
//! metadata ([`VolumeMeta`]: generations, tracking, dirty bitmap, write intent), the counters of
//! application I/O and the job slot, with the operations the replica server and a local replica
//! both use, each returning a [`StorageError`].
//!
//! The write rule lives here once: while the volume is tracking (degraded or syncing), a
//! mutation's range is recorded durably before it is applied and set again after it
//! (`VolumeMeta::begin_write` / `end_write`), so a sync that took the range meanwhile resends it.
//! A data path that moves the bytes itself (io_uring, the ublk fast path) asks for the same
//! checks and accounting with [`Volume::admit`] and follows the rule with
//! [`Volume::begin_write`] / [`Volume::end_write`].
//!
//! Fencing is the volume's too ([`Volume::lease`], `storage::lease`): the replica server and a
//! local replica pass every mutation of an attached connection through the epoch gate first.

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use super::{
    error::{IoOp, StorageError},
    job::{Job, JobStatus},
    lease::LeaseGate,
    meta::{new_generation, MetaError, VolumeMeta, MAX_HOLDER},
    status::VolumeStatus,
    store::{Digest, Store},
};
use super::{GenInfo, JobKind, HISTORY};
use crate::{
    lease::{
        replica::{Claim, PersistedLease, ReplicaLeaseView},
        Epoch, Holder,
    },
    replication::protocol::{VolumeInfo, MAX_DIGESTS, MAX_IO},
};

/// One volume to open.
#[derive(Debug, Clone)]
pub struct VolumeSpec {
    pub name: String,
    pub path: PathBuf,
    /// Size to create the backing file with when it does not exist.
    pub size: Option<u64>,
    /// Metadata file (default: [`default_meta_path`]).
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
pub fn default_meta_path(path: &Path) -> PathBuf {
    let regular = std::fs::metadata(path).map_or(true, |m| m.is_file());
    if regular {
        let mut p = path.to_path_buf().into_os_string();
        p.push(".meta");
        return p.into();
    }
    let name = path.file_name().map_or_else(|| "volume".into(), |n| n.to_string_lossy().into_owned());
    PathBuf::from(META_DIR).join(format!("{name}.meta"))
}

/// Directory of the metadata of block-device volumes.
pub const META_DIR: &str = "/var/lib/mirror";

/// Errors opening a volume.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    #[error("volume {name}: backing {path}: {source}")]
    Store { name: String, path: PathBuf, source: std::io::Error },
    #[error("volume {name}: {source}")]
    Meta { name: String, source: MetaError },
    #[error("block size {0} must be a power of two between 512 and 65536")]
    BlockSize(u32),
}

/// Counters of application I/O on a volume.
#[derive(Debug, Default)]
pub struct Counters {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    /// Requests that failed (counted by the server that answered them).
    pub errors: AtomicU64,
}

/// A read or a write, for [`Volume::admit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// One replica's storage engine.
#[derive(Debug)]
pub struct Volume {
    name: String,
    store: Store,
    meta: VolumeMeta,
    block_size: u32,
    counters: Counters,
    /// Nanoseconds since `epoch` of the last application read or write.
    last_app_io: AtomicU64,
    job: Mutex<Option<Arc<Job>>>,
    epoch: Instant,
    /// The epoch gate (fencing), restored from the metadata header.
    lease: Arc<LeaseGate>,
}

impl Volume {
    /// Opens (or creates, when `spec.size` is given) the data file or device and its metadata.
    pub fn open(spec: &VolumeSpec) -> Result<Volume, OpenError> {
        if !(512..=65536).contains(&spec.block_size) || !spec.block_size.is_power_of_two() {
            return Err(OpenError::BlockSize(spec.block_size));
        }
        let store_err =
            |source| OpenError::Store { name: spec.name.clone(), path: spec.path.clone(), source };
        let mut store = Store::open(&spec.path, spec.size).map_err(store_err)?;
        if spec.direct_io {
            store.set_direct_io().map_err(store_err)?;
        }
        let meta_path = spec.meta.clone().unwrap_or_else(|| default_meta_path(&spec.path));
        if let Some(dir) = meta_path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| OpenError::Store {
                name: spec.name.clone(),
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let meta = VolumeMeta::open(&meta_path, store.size(), spec.block_size)
            .map_err(|source| OpenError::Meta { name: spec.name.clone(), source })?;
        let h = meta.header();
        let lease = LeaseGate::new(h.lease.clone());
        tracing::info!(
            volume = %spec.name, path = %spec.path.display(), size = store.size(),
            generation = format!("{:016x}", h.gen.current), consistent = h.gen.consistent,
            tracking = h.tracking, dirty_blocks = meta.dirty_bits(), lease_epoch = %h.lease.accepted,
            lease_holder = ?h.lease.holder, "volume opened"
        );
        Ok(Volume {
            name: spec.name.clone(),
            store,
            meta,
            block_size: spec.block_size,
            counters: Counters::default(),
            last_app_io: AtomicU64::new(0),
            job: Mutex::new(None),
            epoch: Instant::now(),
            lease,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn size(&self) -> u64 {
        self.store.size()
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    pub fn path(&self) -> &Path {
        self.store.path()
    }

    /// The data file or device, for the sync engine (reads and digests of what it sends).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The metadata, for the sync engine (which takes and commits windows of the bitmap).
    pub fn meta(&self) -> &VolumeMeta {
        &self.meta
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Time since the volume was opened (the clock of [`Volume::app_active`] and of sync pacing).
    pub fn uptime(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// Whether writes are being recorded (degraded or syncing).
    pub fn tracking(&self) -> bool {
        self.meta.tracking()
    }

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
    fn touch(&self) {
        self.last_app_io.store((self.epoch.elapsed().as_nanos() as u64).max(1), Ordering::Relaxed);
    }

    /// `Ok` when `[offset, offset+len)` lies inside the volume.
    pub fn check_range(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.store.size() => Ok(()),
            _ => Err(StorageError::Range { offset, len, size: self.store.size() }),
        }
    }

    /// For a data path that moves the bytes itself: the range check and the accounting of an
    /// application read or write of `len` bytes at `offset` (what [`Volume::read`] and
    /// [`Volume::write`] do before their system call).
    pub fn admit(&self, access: Access, offset: u64, len: u64) -> Result<(), StorageError> {
        self.check_range(offset, len)?;
        self.touch();
        let (n, bytes) = match access {
            Access::Read => (&self.counters.reads, &self.counters.read_bytes),
            Access::Write => (&self.counters.writes, &self.counters.write_bytes),
        };
        n.fetch_add(1, Ordering::Relaxed);
        bytes.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    /// Before a mutation the caller applies itself: while tracking, records its range durably
    /// (may fsync). Returns whether [`Volume::end_write`] must follow (also when it failed).
    pub fn begin_write(&self, offset: u64, len: u64) -> Result<bool, StorageError> {
        Ok(self.meta.begin_write(offset, len)?)
    }

    /// After a tracked mutation was applied or failed: sets its range again (see the module doc).
    pub fn end_write(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        Ok(self.meta.end_write(offset, len)?)
    }

    /// Applies a mutation under the write rule of the module doc.
    fn tracked(
        &self,
        offset: u64,
        len: u64,
        f: impl FnOnce() -> Result<(), StorageError>,
    ) -> Result<(), StorageError> {
        let tracked = self.begin_write(offset, len)?;
        let r = f();
        if tracked {
            self.end_write(offset, len)?;
        }
        r
    }

    /// Reads `len` bytes at `offset` (application I/O).
    pub fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, StorageError> {
        self.admit(Access::Read, offset, u64::from(len))?;
        let mut buf = vec![0u8; len as usize];
        self.store.read_at(&mut buf, offset).map_err(StorageError::io(IoOp::Read, offset))?;
        Ok(buf)
    }

    /// Writes `data` at `offset` (application I/O); with `fua`, durable before returning.
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), StorageError> {
        self.admit(Access::Write, offset, data.len() as u64)?;
        self.tracked(offset, data.len() as u64, || {
            self.store.write_at(data, offset).map_err(StorageError::io(IoOp::Write, offset))?;
            if fua {
                self.flush()?;
            }
            Ok(())
        })
    }

    /// Writes zeroes over a range (also what a trim does: both replicas must read back the same
    /// bytes afterwards).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        self.check_range(offset, len)?;
        self.touch();
        self.tracked(offset, len, || {
            self.store.write_zeroes(offset, len).map_err(StorageError::io(IoOp::WriteZeroes, offset))
        })
    }

    /// Makes completed writes durable.
    pub fn flush(&self) -> Result<(), StorageError> {
        self.store.flush().map_err(StorageError::io(IoOp::Flush, 0))
    }

    /// The peer misses `[offset, offset+len)`: enters degraded tracking (a new generation, if not
    /// tracking yet) and records the range, durably.
    pub fn mark_dirty(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        self.check_range(offset, len)?;
        let h = self.meta.update(|h| {
            if !h.tracking {
                // Entering degraded mode: our writes from here on are a new generation.
                new_generation(&mut h.gen);
                h.tracking = true;
            }
        })?;
        tracing::warn!(volume = %self.name, generation = format!("{:016x}", h.gen.current), offset, len, "peer missing writes: range marked dirty");
        self.meta.mark_dirty(offset, len)?;
        Ok(())
    }

    /// The router's write intent of a range, durable when it returns (see
    /// `VolumeMeta::mark_intent`).
    pub fn mark_intent(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        self.check_range(offset, len)?;
        self.meta.mark_intent(offset, len)?;
        Ok(())
    }

    /// The router's write intent of many ranges, with one durable metadata write (see
    /// `VolumeMeta::mark_intents`).
    pub fn mark_intents(&self, ranges: &[(u64, u64)]) -> Result<(), StorageError> {
        for &(offset, len) in ranges {
            self.check_range(offset, len)?;
        }
        self.meta.mark_intents(ranges)?;
        Ok(())
    }

    /// Drops the router's write intent of a range: true when cleared, false when kept because
    /// the volume is tracking (its bits then record what the peer lacks).
    pub fn clear_intent(&self, offset: u64, len: u64) -> Result<bool, StorageError> {
        self.check_range(offset, len)?;
        Ok(self.meta.clear_intent(offset, len)?)
    }

    /// [`Volume::clear_intent`] of many ranges, with one metadata sync.
    pub fn clear_intents(&self, ranges: &[(u64, u64)]) -> Result<bool, StorageError> {
        for &(offset, len) in ranges {
            self.check_range(offset, len)?;
        }
        Ok(self.meta.clear_intents(ranges)?)
    }

    /// One digest per `grain` bytes of each extent `(offset, len)`, in order (bounded work:
    /// at most `MAX_DIGESTS`).
    pub fn digests(&self, grain: u32, extents: &[(u64, u32)]) -> Result<Vec<Digest>, StorageError> {
        if !(512..=MAX_IO).contains(&grain) {
            return Err(StorageError::Grain { grain, min: 512, max: MAX_IO });
        }
        let mut count = 0u64;
        for &(o, l) in extents {
            self.check_range(o, u64::from(l))?;
            count += u64::from(l).div_ceil(u64::from(grain));
        }
        if count > MAX_DIGESTS {
            return Err(StorageError::TooLarge { what: "digests requested", len: count, max: MAX_DIGESTS });
        }
        let mut out = Vec::with_capacity(count as usize);
        for &(o, l) in extents {
            self.store
                .digests(o, u64::from(l), grain, &mut out)
                .map_err(StorageError::io(IoOp::Digest, o))?;
        }
        Ok(out)
    }

    /// A sync source begins writing here: inconsistent (its data a mix) until
    /// [`Volume::sync_end`]. Refused while this volume runs a job of its own.
    pub fn sync_begin(&self, source_gen: u64) -> Result<(), StorageError> {
        if self.job_running() {
            return Err(StorageError::Busy(
                "this replica is running its own job; refusing to be a sync target",
            ));
        }
        self.meta.update(|h| {
            h.gen.consistent = false;
            h.gen.sync_source = source_gen;
        })?;
        tracing::info!(volume = %self.name, source = format!("{source_gen:016x}"), "sync target: inconsistent until the sync ends");
        Ok(())
    }

    /// The sync source is done: flushed, nothing recorded, its generations taken, consistent.
    pub fn sync_end(&self, current: u64, history: [u64; HISTORY]) -> Result<(), StorageError> {
        self.flush()?;
        self.meta.clear_all()?;
        self.meta.update(|h| {
            h.gen = GenInfo { current, history, consistent: true, sync_source: 0 };
            h.tracking = false;
        })?;
        tracing::info!(volume = %self.name, generation = format!("{current:016x}"), "sync target: consistent");
        Ok(())
    }

    /// Manual split-brain resolution: this volume's data no longer counts (no generation,
    /// nothing recorded), so the next sync onto it compares every block.
    pub fn resolve_discard(&self) -> Result<(), StorageError> {
        if self.job_running() {
            return Err(StorageError::Busy("a job is running; cancel it first"));
        }
        self.meta.clear_all()?;
        self.meta.update(|h| {
            h.gen = GenInfo::default();
            h.tracking = false;
        })?;
        tracing::warn!(volume = %self.name, "operator discarded this replica's data: the next sync onto it is a full one");
        Ok(())
    }

    /// The epoch gate: every mutation of a router or sync connection passes it
    /// ([`LeaseGate::enter`]).
    pub fn lease(&self) -> &Arc<LeaseGate> {
        &self.lease
    }

    fn persist_lease(&self, p: &PersistedLease) -> Result<(), MetaError> {
        self.meta.update(|h| h.lease = p.clone()).map(|_| ())
    }

    /// Claims the lease here ([`LeaseGate::claim`]), durable before it returns. The holder's
    /// name is bounded by what the header keeps.
    pub fn lease_claim(&self, c: &Claim) -> Result<ReplicaLeaseView, StorageError> {
        if c.holder.0.len() > MAX_HOLDER {
            return Err(StorageError::TooLarge {
                what: "the holder's name",
                len: c.holder.0.len() as u64,
                max: MAX_HOLDER as u64,
            });
        }
        let v = self.lease.claim(c, |p| self.persist_lease(p))?;
        tracing::info!(volume = %self.name, holder = %c.holder, epoch = %c.epoch, authority = ?c.authority, "lease claimed: epoch raised");
        Ok(v)
    }

    /// Restarts the lease's timer ([`LeaseGate::renew`]).
    pub fn lease_renew(
        &self,
        holder: &Holder,
        epoch: Epoch,
        ttl: Duration,
    ) -> Result<ReplicaLeaseView, StorageError> {
        self.lease.renew(holder, epoch, ttl, |p| self.persist_lease(p))
    }

    /// Ends the lease or reserves it for `successor` ([`LeaseGate::release`]), durably.
    pub fn lease_release(
        &self,
        holder: &Holder,
        epoch: Epoch,
        successor: Option<&Holder>,
    ) -> Result<ReplicaLeaseView, StorageError> {
        let v = self.lease.release(holder, epoch, successor, |p| self.persist_lease(p))?;
        tracing::info!(volume = %self.name, %holder, %epoch, successor = ?successor, "lease released");
        Ok(v)
    }

    /// The dirty bitmap (see `VolumeMeta::bitmap_bytes`).
    pub fn bitmap(&self) -> Vec<u8> {
        self.meta.bitmap_bytes()
    }

    fn job_slot(&self) -> std::sync::MutexGuard<'_, Option<Arc<Job>>> {
        self.job.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// True while a job runs on this volume.
    pub fn job_running(&self) -> bool {
        self.job_slot().as_ref().is_some_and(|j| !j.finished())
    }

    /// Takes the job slot for a new job (the caller runs it); `Busy` while one runs.
    pub fn claim_job(&self, kind: JobKind, peer: String) -> Result<Arc<Job>, StorageError> {
        let mut slot = self.job_slot();
        if slot.as_ref().is_some_and(|j| !j.finished()) {
            return Err(StorageError::Busy("a job is already running on this volume"));
        }
        let job = Arc::new(Job::new(kind, peer));
        *slot = Some(job.clone());
        Ok(job)
    }

    /// The latest job's status (running or ended), if any ran.
    pub fn job_status(&self) -> Option<JobStatus> {
        self.job_slot().as_ref().map(|j| j.status())
    }

    /// Asks the running job, if any, to stop.
    pub fn cancel_job(&self) {
        if let Some(j) = self.job_slot().as_ref() {
            j.cancel.store(true, Ordering::SeqCst);
        }
    }

    pub fn status(&self) -> VolumeStatus {
        let h = self.meta.header();
        let bs = u64::from(self.block_size);
        let c = &self.counters;
        VolumeStatus {
            volume: self.name.clone(),
            path: self.store.path().display().to_string(),
            size: self.store.size(),
            block_size: self.block_size,
            uuid: h.uuid,
            generation: h.gen,
            tracking: h.tracking,
            dirty_bytes: self.meta.dirty_bits() * bs,
            pending_bytes: self.meta.pending_bits() * bs,
            reads: c.reads.load(Ordering::Relaxed),
            writes: c.writes.load(Ordering::Relaxed),
            read_bytes: c.read_bytes.load(Ordering::Relaxed),
            write_bytes: c.write_bytes.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            job: self.job_status(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::storage::TempFile;

    fn volume(tag: &str) -> (TempFile, Volume) {
        let t = TempFile::new(&format!("volume-{tag}"));
        let spec =
            VolumeSpec { size: Some(1 << 20), ..VolumeSpec::parse(&format!("v={}", t.0.display())).unwrap() };
        (t, Volume::open(&spec).unwrap())
    }

    #[test]
    fn metadata_of_a_device_does_not_go_to_dev() {
        let f = std::env::temp_dir().join(format!("mirror-metapath-{}", std::process::id()));
        std::fs::write(&f, b"x").unwrap();
        assert_eq!(default_meta_path(&f), PathBuf::from(format!("{}.meta", f.display())));
        // /dev/null is no regular file: its metadata goes to the persistent directory.
        assert_eq!(default_meta_path(Path::new("/dev/null")), PathBuf::from("/var/lib/mirror/null.meta"));
        let _ = std::fs::remove_file(&f);
    }

    #[test]
    fn operations_check_ranges_count_and_follow_the_write_rule() {
        let (_t, v) = volume("ops");
        assert!(matches!(
            v.read(1 << 20, 1),
            Err(StorageError::Range { offset: 1_048_576, len: 1, size: 1_048_576 })
        ));
        assert!(matches!(v.write(u64::MAX, &[1], false), Err(StorageError::Range { .. })));
        v.write(4096, &[7; 4096], true).unwrap();
        assert_eq!(v.read(4096, 4096).unwrap(), vec![7; 4096]);
        let s = v.status();
        assert_eq!((s.reads, s.writes, s.read_bytes, s.write_bytes), (1, 1, 4096, 4096));
        assert!(!s.tracking && s.dirty_bytes == 0, "in sync: nothing recorded");
        // Degraded: the range and every later write are recorded.
        v.mark_dirty(0, 4096).unwrap();
        v.write(8192, &[1; 10], false).unwrap();
        v.write_zeroes(65536, 4096).unwrap();
        let s = v.status();
        assert!(s.tracking);
        assert_eq!(s.dirty_bytes, 3 * 4096);
        assert_ne!(s.generation.current, 0, "degraded mode starts a generation");
        assert!(!v.clear_intent(0, 4096).unwrap(), "tracking bits stay");
        assert!(matches!(v.digests(100, &[(0, 4096)]), Err(StorageError::Grain { grain: 100, .. })));
        assert!(matches!(v.digests(512, &[(0, 1 << 20); 200]), Err(StorageError::TooLarge { .. })));
        assert_eq!(v.digests(4096, &[(4096, 8192)]).unwrap().len(), 2);
        // The job slot.
        let j = v.claim_job(JobKind::Verify, "peer".into()).unwrap();
        assert!(matches!(v.claim_job(JobKind::Sync, "peer".into()), Err(StorageError::Busy(_))));
        assert!(matches!(v.sync_begin(5), Err(StorageError::Busy(_))));
        assert!(matches!(v.resolve_discard(), Err(StorageError::Busy(_))));
        j.finish(crate::storage::JobState::Done, None);
        v.sync_begin(5).unwrap();
        assert!(!v.status().generation.consistent);
        v.sync_end(9, [5, 0, 0, 0]).unwrap();
        let s = v.status();
        assert_eq!(
            (s.generation.current, s.generation.consistent, s.tracking, s.dirty_bytes),
            (9, true, false, 0)
        );
        v.resolve_discard().unwrap();
        assert_eq!(v.status().generation, GenInfo::default());
    }
}
