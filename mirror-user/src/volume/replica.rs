//! One side of a mirrored volume as the router sees it: where its data is ([`Location`]: a
//! [`LocalReplica`] or a [`RemoteReplica`], each in its own type behind the same operations),
//! its [`ReplicaState`], and its counters ([`ReplicaStats`], snapshot [`ReplicaSnapshot`]).
//! The router calls [`Replica`]'s operations and never looks at the location to do I/O.

use std::{
    sync::{
        atomic::{AtomicU64, AtomicU8, Ordering},
        Arc, OnceLock,
    },
    time::Duration,
};

use super::{
    error::ReplicaError, inflight::InFlight, inline::ewma, local::LocalReplica, remote::RemoteReplica,
};
use crate::{
    lease::{Epoch, Holder, ReplicaUuid},
    replication::rate::SyncRate,
    storage::{EpochGuard, JobKind, VolumeStatus},
};

/// Where a replica's data is.
#[derive(Debug)]
pub enum Location {
    /// A volume of this process.
    Local(LocalReplica),
    /// A volume on a replica server.
    Remote(RemoteReplica),
}

/// A replica's standing in the mirror.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReplicaState {
    /// Holds every acknowledged write: receives writes, serves reads.
    InSync,
    /// Out of service: receives nothing; the other replica records what it misses.
    Failed,
    /// Being brought up to date by the other replica: receives writes, serves no reads.
    Resyncing,
}

impl ReplicaState {
    /// The state's name, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaState::InSync => "in-sync",
            ReplicaState::Failed => "failed",
            ReplicaState::Resyncing => "resyncing",
        }
    }

    fn to_u8(self) -> u8 {
        self as u8
    }

    fn from_u8(v: u8) -> ReplicaState {
        match v {
            0 => ReplicaState::InSync,
            1 => ReplicaState::Failed,
            _ => ReplicaState::Resyncing,
        }
    }
}

impl std::fmt::Display for ReplicaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A [`ReplicaState`] read and changed atomically (one load per request on the read path).
#[derive(Debug)]
pub struct AtomicReplicaState(AtomicU8);

impl AtomicReplicaState {
    pub fn new(s: ReplicaState) -> Self {
        AtomicReplicaState(AtomicU8::new(s.to_u8()))
    }
    pub fn load(&self) -> ReplicaState {
        ReplicaState::from_u8(self.0.load(Ordering::Acquire))
    }
    pub fn store(&self, s: ReplicaState) {
        self.0.store(s.to_u8(), Ordering::Release);
    }
    /// Sets `s`; returns the state before.
    pub fn swap(&self, s: ReplicaState) -> ReplicaState {
        ReplicaState::from_u8(self.0.swap(s.to_u8(), Ordering::AcqRel))
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

/// A replica's counters and state at one instant (the `replicas` entries of the router's status).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplicaSnapshot {
    /// "source" or "target".
    pub role: String,
    /// `local:PATH` or `remote:HOST:PORT`.
    pub location: String,
    /// How the data moves: `io_uring`, `io_uring, O_DIRECT`, `blocking pool`, `protocol`.
    pub io: String,
    pub state: ReplicaState,
    pub reads: u64,
    pub writes: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub errors: u64,
    pub timeouts: u64,
    pub retries: u64,
    pub read_latency_us: u64,
    pub write_latency_us: u64,
}

/// A replica of the mirrored volume.
#[derive(Debug)]
pub struct Replica {
    /// "source" or "target".
    pub role: &'static str,
    pub location: Location,
    state: AtomicReplicaState,
    pub stats: ReplicaStats,
    pub block_size: u64,
    /// Reads sent here and not answered yet (the age of the oldest: `volume::inflight`).
    pub reads_in_flight: InFlight,
    /// Writes likewise.
    pub writes_in_flight: InFlight,
    /// The lease holder and epoch this router writes at, once it took the lease (see
    /// [`Replica::attach`]); every mutation is fenced against it.
    attached: OnceLock<Attachment>,
}

/// Who a router connection writes for, and at which epoch (the protocol's `Attach`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub holder: Holder,
    pub epoch: Epoch,
}

impl Replica {
    pub fn new(role: &'static str, location: Location, block_size: u64) -> Replica {
        Replica {
            role,
            location,
            state: AtomicReplicaState::new(ReplicaState::InSync),
            stats: ReplicaStats::default(),
            block_size,
            reads_in_flight: InFlight::default(),
            writes_in_flight: InFlight::default(),
            attached: OnceLock::new(),
        }
    }

    /// Writes from now on at `a` (once, after the lease was taken): a remote replica's
    /// connections attach (and every reconnect does), a local one's mutations pass the volume's
    /// epoch gate with it. `Err` with the fenced error when the replica accepted a newer epoch.
    pub async fn attach(&self, a: Attachment) -> Result<(), ReplicaError> {
        let _ = self.attached.set(a.clone());
        match &self.location {
            Location::Local(l) => {
                let _ = l.volume().lease().attach(a.epoch)?;
                Ok(())
            }
            Location::Remote(r) => r.attach(a).await,
        }
    }

    /// The attachment, when the router holds a lease.
    pub fn attachment(&self) -> Option<&Attachment> {
        self.attached.get()
    }

    /// A local mutation's pass through the epoch gate (remote ones are checked by the server);
    /// the fast path holds it across its own write, as the slow path does.
    pub(crate) fn admit(&self) -> Result<Option<EpochGuard>, ReplicaError> {
        match &self.location {
            Location::Local(l) => Ok(Some(l.volume().lease().enter(self.attached.get().map(|a| a.epoch))?)),
            Location::Remote(_) => Ok(None),
        }
    }

    pub fn state(&self) -> ReplicaState {
        self.state.load()
    }

    pub fn set_state(&self, s: ReplicaState) {
        self.state.store(s);
    }

    /// Sets `s`; returns the state before.
    pub fn swap_state(&self, s: ReplicaState) -> ReplicaState {
        self.state.swap(s)
    }

    /// The replica's metadata uuid: its identity for every router (a local one's header; a
    /// remote one's as its last connection reported it, `None` if it was never reached).
    pub fn uuid(&self) -> Option<ReplicaUuid> {
        match &self.location {
            Location::Local(l) => Some(ReplicaUuid(l.volume().info().uuid)),
            Location::Remote(r) => r.uuid().map(ReplicaUuid),
        }
    }

    /// Address peers reach this replica at.
    pub fn addr(&self) -> &str {
        match &self.location {
            Location::Local(l) => l.addr(),
            Location::Remote(r) => r.addr(),
        }
    }

    /// The local replica, when this is one (for the fast path, which drives its file itself).
    pub fn as_local(&self) -> Option<&LocalReplica> {
        match &self.location {
            Location::Local(l) => Some(l),
            Location::Remote(_) => None,
        }
    }

    /// The remote replica, when this is one (its node is heard through heartbeats).
    pub fn as_remote(&self) -> Option<&RemoteReplica> {
        match &self.location {
            Location::Remote(r) => Some(r),
            Location::Local(_) => None,
        }
    }

    pub fn is_local(&self) -> bool {
        self.as_local().is_some()
    }

    /// True when this replica is a local file driven through io_uring (what the ublk fast path
    /// can submit to itself).
    pub fn is_local_uring(&self) -> bool {
        self.as_local().is_some_and(LocalReplica::is_uring)
    }

    /// True when this replica may serve reads: only in sync. A resyncing replica serves no
    /// reads at all: the resync may briefly write an older copy of a block over a newer one (it
    /// re-marks and resends it), so no bitmap snapshot can tell which of its blocks are current
    /// at the instant of a read.
    pub fn serves_reads(&self) -> bool {
        self.state() == ReplicaState::InSync
    }

    /// Read deadline from observed latency: ten times the mean, within [min, cap].
    pub fn read_deadline(&self, min: Duration, cap: Duration) -> Duration {
        match self.stats.read_lat_ewma_us.load(Ordering::Relaxed) {
            0 => cap,
            us => Duration::from_micros(us.saturating_mul(10)).clamp(min, cap),
        }
    }

    /// Reads `len` bytes at `offset`; the read counts in [`Self::reads_in_flight`] until it
    /// is answered (or this future is dropped).
    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, ReplicaError> {
        let t0 = std::time::Instant::now();
        let _in_flight = self.reads_in_flight.begin(t0);
        let r = match &self.location {
            Location::Local(l) => l.read(offset, len).await,
            Location::Remote(r) => r.read(offset, len).await,
        };
        if r.is_ok() {
            self.count(false, len.into(), t0);
        }
        r
    }

    pub async fn write(&self, offset: u64, data: Arc<Vec<u8>>, fua: bool) -> Result<(), ReplicaError> {
        let t0 = std::time::Instant::now();
        let _in_flight = self.writes_in_flight.begin(t0);
        let len = data.len() as u64;
        let _admitted = self.admit()?;
        let r = match &self.location {
            Location::Local(l) => l.write(offset, data, fua, self.stats.writes.load(Ordering::Relaxed)).await,
            Location::Remote(r) => r.write(offset, &data, fua).await,
        };
        if r.is_ok() {
            self.count(true, len, t0);
        }
        r
    }

    /// How long the oldest read or write in flight here has waited at `now` (`None`: none).
    pub fn oldest_in_flight(&self, now: std::time::Instant) -> Option<Duration> {
        self.reads_in_flight.oldest_age(now).max(self.writes_in_flight.oldest_age(now))
    }

    /// Counts a completed read or write of `len` bytes started at `t0`.
    pub(super) fn count(&self, write: bool, len: u64, t0: std::time::Instant) {
        let s = &self.stats;
        let us = t0.elapsed().as_micros() as u64;
        let (n, bytes, lat) = if write {
            (&s.writes, &s.write_bytes, &s.write_lat_ewma_us)
        } else {
            (&s.reads, &s.read_bytes, &s.read_lat_ewma_us)
        };
        n.fetch_add(1, Ordering::Relaxed);
        bytes.fetch_add(len, Ordering::Relaxed);
        ewma(lat, us);
    }

    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), ReplicaError> {
        let _admitted = self.admit()?;
        match &self.location {
            Location::Local(l) => l.write_zeroes(offset, len).await,
            Location::Remote(r) => r.write_zeroes(offset, len).await,
        }
    }

    pub async fn flush(&self) -> Result<(), ReplicaError> {
        let _admitted = self.admit()?;
        match &self.location {
            Location::Local(l) => l.flush().await,
            Location::Remote(r) => r.flush().await,
        }
    }

    /// Records a range as missing on the peer (entering degraded tracking), durably.
    pub async fn mark_degraded(&self, offset: u64, len: u64) -> Result<(), ReplicaError> {
        let _admitted = self.admit()?;
        match &self.location {
            Location::Local(l) => l.mark_dirty(offset, len).await,
            Location::Remote(r) => r.mark_dirty(offset, len).await,
        }
    }

    /// The router's write intent on this replica (see `VolumeMeta::mark_intent`), durable when
    /// it returns.
    pub async fn mark_intent(&self, offset: u64, len: u64) -> Result<(), ReplicaError> {
        let _admitted = self.admit()?;
        match &self.location {
            Location::Local(l) => l.mark_intent(offset, len).await,
            Location::Remote(r) => r.mark_intent(offset, len).await,
        }
    }

    /// The router's write intent of many ranges, durable when it returns: one metadata sync on
    /// a local replica; a remote one is asked for every range at once, over the connections of
    /// its pool (one range per request), and its metadata's group commit syncs the ranges that
    /// arrive together once.
    pub async fn mark_intents(&self, ranges: Vec<(u64, u64)>) -> Result<(), ReplicaError> {
        let _admitted = self.admit()?;
        match &self.location {
            Location::Local(l) => l.mark_intents(ranges).await,
            Location::Remote(r) => {
                try_join_all(ranges.into_iter().map(|(offset, len)| r.mark_intent(offset, len))).await
            }
        }
    }

    /// Drops the router's write intent of a range; `Ok(false)` when the replica is tracking (its
    /// bits then record what the peer lacks and stay).
    pub async fn clear_intent(&self, offset: u64, len: u64) -> Result<bool, ReplicaError> {
        let _admitted = self.admit()?;
        match &self.location {
            Location::Local(l) => l.clear_intent(offset, len).await,
            Location::Remote(r) => r.clear_intent(offset, len).await,
        }
    }

    /// [`Replica::clear_intent`] of many ranges: one metadata sync on a local replica; a remote
    /// one is asked for every range at once (see [`Replica::mark_intents`]). `Ok(false)` when a
    /// range was kept (tracking).
    pub async fn clear_intents(&self, ranges: Vec<(u64, u64)>) -> Result<bool, ReplicaError> {
        let _admitted = self.admit()?;
        match &self.location {
            Location::Local(l) => l.clear_intents(ranges).await,
            Location::Remote(r) => {
                let kept = std::sync::atomic::AtomicBool::new(false);
                try_join_all(ranges.into_iter().map(|(offset, len)| {
                    let kept = &kept;
                    async move {
                        if !r.clear_intent(offset, len).await? {
                            kept.store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                        Ok::<(), ReplicaError>(())
                    }
                }))
                .await?;
                Ok(!kept.load(std::sync::atomic::Ordering::Relaxed))
            }
        }
    }

    /// The replica's volume status.
    pub async fn status(&self) -> Result<VolumeStatus, ReplicaError> {
        match &self.location {
            Location::Local(l) => Ok(l.status()),
            Location::Remote(r) => r.status().await,
        }
    }

    /// Has this replica push its data to `peer` (a sync job on its volume).
    pub async fn start_sync(&self, peer: String, secret: &[u8], rate: SyncRate) -> Result<(), ReplicaError> {
        let _admitted = self.admit()?;
        match &self.location {
            Location::Local(l) => l.start_job(secret, rate, JobKind::Sync, peer),
            Location::Remote(r) => r.start_job(JobKind::Sync, peer).await,
        }
    }

    /// (Re)connects a remote replica; returns the size of its volume (a local one: its own).
    pub async fn connect(&self) -> Result<u64, ReplicaError> {
        match &self.location {
            Location::Local(l) => Ok(l.volume().size()),
            Location::Remote(r) => r.connect().await,
        }
    }

    /// Drops a remote replica's connections (it then counts as broken).
    pub fn disconnect(&self) {
        if let Location::Remote(r) = &self.location {
            r.disconnect();
        }
    }

    /// True when nothing sent to this replica is unanswered (always for a local one); see
    /// [`RemoteReplica::quiesced`].
    pub fn quiesced(&self) -> bool {
        self.as_remote().is_none_or(RemoteReplica::quiesced)
    }

    /// True when a remote replica's connections broke.
    pub fn connection_broken(&self) -> bool {
        self.as_remote().is_some_and(RemoteReplica::connection_broken)
    }

    pub fn snapshot(&self) -> ReplicaSnapshot {
        let s = &self.stats;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (location, io) = match &self.location {
            Location::Local(lr) => (format!("local:{}", lr.volume().path().display()), lr.io_kind()),
            Location::Remote(r) => (format!("remote:{}", r.addr()), "protocol"),
        };
        ReplicaSnapshot {
            role: self.role.into(),
            location,
            io: io.into(),
            state: self.state(),
            reads: l(&s.reads),
            writes: l(&s.writes),
            read_bytes: l(&s.read_bytes),
            write_bytes: l(&s.write_bytes),
            errors: l(&s.errors),
            timeouts: l(&s.timeouts),
            retries: l(&s.retries),
            read_latency_us: l(&s.read_lat_ewma_us),
            write_latency_us: l(&s.write_lat_ewma_us),
        }
    }
}

/// Runs every future concurrently until all are done; the first error in order, if any (every
/// request still completes: none is abandoned half sent).
async fn try_join_all<E>(
    futs: impl IntoIterator<Item = impl std::future::Future<Output = Result<(), E>>>,
) -> Result<(), E> {
    let mut futs: Vec<_> = futs.into_iter().map(|f| Some(Box::pin(f))).collect();
    let mut results: Vec<Option<Result<(), E>>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, r) in futs.iter_mut().zip(results.iter_mut()) {
            if let Some(fut) = f {
                match fut.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        *r = Some(v);
                        *f = None;
                    }
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    results.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_are_atomic_and_named_as_before() {
        let a = AtomicReplicaState::new(ReplicaState::InSync);
        assert_eq!(a.swap(ReplicaState::Failed), ReplicaState::InSync);
        assert_eq!(a.load(), ReplicaState::Failed);
        a.store(ReplicaState::Resyncing);
        assert_eq!(a.load(), ReplicaState::Resyncing);
        for s in [ReplicaState::InSync, ReplicaState::Failed, ReplicaState::Resyncing] {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        assert_eq!(ReplicaState::InSync.to_string(), "in-sync");
    }

    #[test]
    fn snapshot_json_keeps_the_field_names() {
        let snap = ReplicaSnapshot {
            role: "source".into(),
            location: "remote:10.0.0.1:7700".into(),
            io: "protocol".into(),
            state: ReplicaState::Failed,
            reads: 1,
            writes: 2,
            read_bytes: 3,
            write_bytes: 4,
            errors: 5,
            timeouts: 6,
            retries: 7,
            read_latency_us: 8,
            write_latency_us: 9,
        };
        let v = serde_json::to_value(&snap).unwrap();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "errors",
                "io",
                "location",
                "read_bytes",
                "read_latency_us",
                "reads",
                "retries",
                "role",
                "state",
                "timeouts",
                "write_bytes",
                "write_latency_us",
                "writes"
            ]
        );
        assert_eq!(v["state"], "failed");
        assert_eq!(serde_json::from_value::<ReplicaSnapshot>(v).unwrap(), snap);
    }
}
