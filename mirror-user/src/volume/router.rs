//! The router: one mirrored volume over two replicas (0 = source, 1 = target).
//!
//! Reads go to the target with probability `target_weight / 100` (one atomic load per request),
//! otherwise to the source, but only to a replica that holds every block of the request; a read
//! that fails or misses its deadline is retried on the other replica. Writes, write-zeroes and
//! flushes go to both in parallel; when one replica fails, it is marked failed and the range is
//! recorded durably on the survivor *before* the write is acknowledged, so the application sees an
//! error only when both fail. A replica that lags behind the other on a write past its adaptive
//! deadline (`volume::deadline`) counts as failed the same way; while neither has answered, the
//! write waits (a spike on both is not one failing). A supervisor reconnects a failed remote replica, has the survivor
//! resync it, and returns it to service when the survivor's dirty bitmap is empty. While both
//! replicas are in sync, each write's 4 MiB extent carries a durable write intent on the source
//! (`volume::activity`), so a router that dies mid-write leaves a record for the next start.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use super::{
    activity::{ActivityLog, Busy},
    deadline::{DeadlineConfig, LatencyEstimate},
    error::ReplicaError,
    fast::{FastOp, FastPlan},
    fence::{fenced_error, LeaseLine, LeaseStatus},
    hedge::{steer, HedgeBudget, HedgeConfig, LatencyHistogram},
    replica::{Replica, ReplicaSnapshot, ReplicaState},
    BlockDev,
};
use crate::{
    lease::CurrentMark,
    replication::{protocol::MAX_IO, rate::SyncRate},
    storage::JobState,
};

/// Read weights: the target's share in percent; the source gets the rest.
#[derive(Debug)]
pub struct Weights {
    target: AtomicU8,
}

impl Weights {
    pub fn new(target: u8) -> Arc<Weights> {
        Arc::new(Weights { target: AtomicU8::new(target.min(100)) })
    }
    pub fn target(&self) -> u8 {
        self.target.load(Ordering::Relaxed)
    }
    pub fn set_target(&self, t: u8) {
        self.target.store(t.min(100), Ordering::Relaxed);
    }
}

/// Router settings.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// Shortest read deadline before retrying on the other replica.
    pub read_deadline_min: Duration,
    /// Longest read deadline (also used before any latency was observed).
    pub read_deadline_cap: Duration,
    /// When a slow read is sent to the other replica too.
    pub hedge: HedgeConfig,
    /// When a write (or flush) stops waiting for a replica: the adaptive deadline of one that
    /// lags behind the other, and the hard timeout.
    pub write_deadline: DeadlineConfig,
    /// Secret for replicas to authenticate each other during resync.
    pub secret: Vec<u8>,
    /// Pacing for resyncs the router starts from a local survivor.
    pub rate: SyncRate,
    /// How often the supervisor checks replicas.
    pub supervise_every: Duration,
    /// The most extents with write intent recorded (`--al-extents`, see `volume::activity`).
    pub al_extents: usize,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            read_deadline_min: Duration::from_millis(50),
            read_deadline_cap: Duration::from_secs(2),
            hedge: HedgeConfig::default(),
            write_deadline: DeadlineConfig::default(),
            secret: Vec::new(),
            rate: SyncRate::default(),
            supervise_every: Duration::from_millis(250),
            al_extents: super::activity::DEFAULT_AL_EXTENTS,
        }
    }
}

/// A mirrored volume.
#[derive(Debug)]
pub struct Router {
    pub replicas: [Arc<Replica>; 2],
    size: u64,
    block_size: u32,
    pub weights: Arc<Weights>,
    cfg: RouterConfig,
    /// The survivor of a failure has recorded the degraded state (tracking on).
    degraded_marked: AtomicBool,
    /// Writes hold it shared while they pick and use their set of replicas; a replica re-enters
    /// the write set only under it exclusively, so every write that left the replica out has
    /// completed (and been recorded by the survivor) before the replica is written or read again.
    membership: tokio::sync::RwLock<()>,
    /// Write intent for router crashes (see `volume::activity`), kept in the source's bitmap.
    al: ActivityLog,
    /// Each replica's completion latency per kind of mirrored request (their write deadlines).
    latency: [[LatencyEstimate; 3]; 2],
    /// Woken when a replica is marked failed: the requests still waiting for it stop.
    failed: [tokio::sync::Notify; 2],
    /// Each replica's latency of the reads it served (their hedge delay).
    read_hist: [LatencyHistogram; 2],
    hedge_budget: HedgeBudget,
    hedges_sent: AtomicU64,
    hedges_won: AtomicU64,
    /// The lease: may this router still acknowledge writes (see `volume::fence`).
    pub lease: LeaseLine,
}

/// The kinds of mirrored request, each with its own latency (a flush is not a 4 KiB write).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mirrored {
    Write = 0,
    Zeroes = 1,
    Flush = 2,
}

/// An extent with write intent recorded is dropped after this long without a write (at least;
/// always longer than the hard write timeout, see `drop_idle_intents`).
pub const INTENT_IDLE: Duration = Duration::from_secs(10);

/// The router's status (`ctl status`, metrics). `R` is what each replica's entry holds: its
/// [`ReplicaSnapshot`] here, with its node's status above the router (`weights::status`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RouterStatus<R = ReplicaSnapshot> {
    pub size: u64,
    /// Read weights in percent.
    pub weights: WeightsStatus,
    /// Extents of the volume with write intent recorded.
    pub intent_extents: usize,
    /// Hedged reads (`volume::hedge`).
    pub hedges: HedgeStatus,
    /// Source, target.
    pub replicas: [R; 2],
    /// The lease this router holds (`null` without one: `--lease-store none`).
    #[serde(default)]
    pub lease: Option<LeaseStatus>,
}

impl<R> RouterStatus<R> {
    /// The same status with each replica's entry turned into another (`i`: 0 source, 1 target).
    pub fn map_replicas<S>(self, mut f: impl FnMut(usize, R) -> S) -> RouterStatus<S> {
        let [source, target] = self.replicas;
        RouterStatus {
            size: self.size,
            weights: self.weights,
            intent_extents: self.intent_extents,
            hedges: self.hedges,
            replicas: [f(0, source), f(1, target)],
            lease: self.lease,
        }
    }
}

/// Hedged reads since start: sent to the other replica, and answered there first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HedgeStatus {
    pub sent: u64,
    pub won: u64,
}

/// The read weights: each replica's share in percent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WeightsStatus {
    pub source: u8,
    pub target: u8,
}

fn eio(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::other(msg.into())
}

/// Why a replica's failure could not be absorbed by the other replica.
#[derive(Debug)]
enum Unabsorbed {
    /// The other replica has failed too.
    NoSurvivor,
    /// The survivor could not record the range (the write must not be acknowledged).
    Recording(ReplicaError),
}

/// Of the failures of one request, the one to report: the first with an errno (a disk's ENOSPC
/// reaches the application as ENOSPC), else the first.
fn keep_reportable(kept: &mut Option<ReplicaError>, e: ReplicaError) {
    if kept.as_ref().is_none_or(|k| k.errno().is_none() && e.errno().is_some()) {
        *kept = Some(e);
    }
}

impl Router {
    pub fn new(
        source: Replica,
        target: Replica,
        size: u64,
        weights: Arc<Weights>,
        cfg: RouterConfig,
    ) -> Arc<Router> {
        let idle = INTENT_IDLE.max(cfg.write_deadline.hard.saturating_mul(2));
        let al_extents = cfg.al_extents;
        Arc::new(Router {
            replicas: [Arc::new(source), Arc::new(target)],
            size,
            block_size: 4096,
            weights,
            cfg,
            degraded_marked: AtomicBool::new(false),
            membership: tokio::sync::RwLock::new(()),
            al: ActivityLog::new(size, idle, al_extents),
            latency: Default::default(),
            failed: Default::default(),
            read_hist: Default::default(),
            hedge_budget: HedgeBudget::default(),
            hedges_sent: AtomicU64::new(0),
            hedges_won: AtomicU64::new(0),
            lease: LeaseLine::default(),
        })
    }

    /// Starts the background supervisor (reconnect, resync, return to service).
    pub fn spawn_supervisor(self: &Arc<Self>) {
        let r = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(router) = r.upgrade() else { return };
                router.supervise_once().await;
                let every = router.cfg.supervise_every;
                drop(router);
                tokio::time::sleep(every).await;
            }
        });
    }

    fn other(i: usize) -> usize {
        1 - i
    }

    /// Marks replica `i` failed because of `why`, and makes sure the survivor records
    /// `[offset, offset+len)` (and from then on every write) before anything is acknowledged.
    async fn fail_replica(
        &self,
        i: usize,
        why: &(dyn std::fmt::Display + Sync),
        offset: u64,
        len: u64,
    ) -> Result<(), Unabsorbed> {
        let r = &self.replicas[i];
        if r.swap_state(ReplicaState::Failed) != ReplicaState::Failed {
            tracing::warn!(
                replica = r.role,
                "replica failed: {why}; serving from the {} replica",
                self.replicas[Self::other(i)].role
            );
        }
        self.failed[i].notify_waiters();
        r.stats.errors.fetch_add(1, Ordering::Relaxed);
        let s = &self.replicas[Self::other(i)];
        if s.state() == ReplicaState::Failed {
            tracing::error!(replica = r.role, "both replicas failed: {why}");
            return Err(Unabsorbed::NoSurvivor);
        }
        // The lease store first (etcd: which replica holds every acknowledged write), then the
        // survivor's own record.
        self.ensure_alone(Self::other(i)).await.map_err(Unabsorbed::Recording)?;
        s.mark_degraded(offset, len).await.map_err(Unabsorbed::Recording)?;
        self.degraded_marked.store(true, Ordering::Release);
        Ok(())
    }

    /// Before anything is acknowledged by replica `i` alone: the lease store records that `i`
    /// holds every acknowledged write (or, `i` still being resynced, that neither replica alone
    /// does), once per degraded episode (`volume::mark`). A no-op without a store that keeps marks
    /// (embedded lease, no lease).
    async fn ensure_alone(&self, i: usize) -> Result<(), ReplicaError> {
        if !self.lease.mark.needed() {
            return Ok(());
        }
        let s = &self.replicas[i];
        let unmarked = |why: String| ReplicaError::Unmarked { role: s.role, why };
        let want = if s.state() == ReplicaState::InSync {
            CurrentMark::Only(s.uuid().ok_or_else(|| unmarked("its metadata uuid is not known".into()))?)
        } else {
            CurrentMark::Neither
        };
        self.lease.mark.ensure(want).await.map_err(|e| unmarked(e.to_string()))
    }

    /// Clears the lease store's mark when both replicas are in sync (after a resync, or at a start
    /// that found them in sync); best effort.
    pub async fn clear_mark_if_in_sync(&self) {
        let in_sync = || self.replicas.iter().all(|r| r.state() == ReplicaState::InSync);
        if self.lease.mark.needed() && in_sync() {
            self.lease.mark.clear_if(in_sync).await;
        }
    }

    /// True while both replicas are in sync and nothing is being recorded: then writes need
    /// their intent recorded (otherwise the survivor, or the sync source, records them all).
    fn intent_needed(&self) -> bool {
        !self.degraded_marked.load(Ordering::Acquire)
            && self.replicas.iter().all(|r| r.state() == ReplicaState::InSync)
    }

    /// Makes sure the write intent of `[offset, offset+len)` is recorded on the source before a
    /// write there is issued (lock-free when its extents are hot). Group commit: the write's
    /// cold extents join the open batch; whoever next holds `marking` records the whole batch
    /// with one metadata write, so writes arriving while a sync is in flight share the next one.
    /// A write proceeds only once its batch is durable, holding its extents busy (the guard
    /// returned) until both replicas answered. A source that cannot record it has failed: the
    /// target takes over and records the range (`None`: nothing to hold).
    async fn record_intent(&self, offset: u64, len: u64) -> Result<Option<Busy<'_>>, ReplicaError> {
        loop {
            if let Some(busy) = self.al.touch_if_hot(offset, len) {
                return Ok(Some(busy));
            }
            let ticket = self.al.enqueue(self.al.cold_runs(offset, len));
            let marking = self.al.marking.lock().await;
            if !self.al.covered(ticket) {
                let batch = self.al.take_batch();
                let ranges: Vec<(u64, u64)> =
                    batch.runs.iter().map(|r| self.al.byte_range(r.clone())).collect();
                let res =
                    if ranges.is_empty() { Ok(()) } else { self.replicas[0].mark_intents(ranges).await };
                match res {
                    Ok(()) => self.al.committed(&batch, Instant::now()),
                    Err(e) => {
                        self.al.requeue(batch);
                        if e.is_fenced() {
                            self.lease.fence(format!("the source replica refused the write intent: {e}"));
                            return Err(e);
                        }
                        let why = format!("recording write intent: {e}");
                        return match self.fail_replica(0, &why, offset, len).await {
                            Ok(()) => Ok(None),
                            Err(Unabsorbed::NoSurvivor) => Err(e),
                            Err(Unabsorbed::Recording(e2)) => Err(e2),
                        };
                    }
                }
            }
            drop(marking);
            // Covered: hot now, unless dropped meanwhile (then recorded again).
        }
    }

    /// Drops the intent of extents idle for [`INTENT_IDLE`] (or twice the hard write timeout):
    /// both replicas flushed (every write there completed long ago: a write that takes more than
    /// the hard timeout fails its replica), then the source's bits cleared. Skipped while a failure or a resync is being
    /// recorded (the bits are then part of that record).
    async fn drop_idle_intents(&self) {
        self.al.tick(Instant::now());
        if !self.intent_needed() {
            return;
        }
        let mut runs = self.al.take_cold(Instant::now());
        // Above the bound (`--al-extents`): the least recently written go too.
        runs.extend(self.al.take_victims(self.al.over_limit(Instant::now())));
        if runs.is_empty() {
            return;
        }
        self.drop_intents(runs).await;
    }

    /// Drops the intent of extents taken out of the log (no write in flight there): both
    /// replicas flushed, so every write they saw is durable on both; then, holding `marking`,
    /// the bits of those not recorded again meanwhile cleared with one metadata write. No lock
    /// is held across the flush: writes to other extents, cold or hot, go on.
    async fn drop_intents(&self, runs: Vec<std::ops::Range<usize>>) {
        let (a, b) = tokio::join!(self.replicas[0].flush(), self.replicas[1].flush());
        if a.is_err() || b.is_err() {
            // Kept: the flush failure is handled by the next write or flush.
            for run in runs {
                self.al.set_hot(run, Instant::now());
            }
            return;
        }
        let _marking = self.al.marking.lock().await;
        let still = self.al.still_cold(runs);
        if still.is_empty() {
            return;
        }
        let ranges: Vec<(u64, u64)> = still.iter().map(|r| self.al.byte_range(r.clone())).collect();
        if let Err(e) = self.replicas[0].clear_intents(ranges).await {
            tracing::debug!("dropping the write intent of {} runs: {e}; kept", still.len());
            for run in still {
                self.al.set_hot(run, Instant::now());
            }
        }
    }

    /// Clean shutdown, after the last write was flushed: drops every recorded intent, so the
    /// next start finds the replicas in sync.
    pub async fn close_intents(&self) {
        if !self.intent_needed() {
            return;
        }
        let all = self.al.take_all();
        if !all.is_empty() {
            self.drop_intents(all).await;
        }
    }

    /// Extents of the volume with write intent recorded (for status).
    pub fn intent_extents(&self) -> usize {
        self.al.hot_count()
    }

    /// Runs a write-like operation on every live replica; handles failures as described above.
    /// `kind`: a write or write-zeroes, whose intent must be recorded first, or a flush.
    async fn mirrored<F, Fut>(&self, offset: u64, len: u64, kind: Mirrored, op: F) -> std::io::Result<()>
    where
        F: Fn(Arc<Replica>) -> Fut,
        Fut: std::future::Future<Output = Result<(), ReplicaError>>,
    {
        let _ticket = match kind {
            Mirrored::Flush => None,
            _ => Some(self.lease.enter_write().await),
        };
        self.lease.admit()?;
        let _membership = self.membership.read().await;
        let _busy = if kind != Mirrored::Flush && self.intent_needed() {
            self.record_intent(offset, len).await.map_err(|e| match self.lease.fenced() {
                Some(why) => fenced_error(why),
                None => e.to_io(),
            })?
        } else {
            None
        };
        // Read before the write is issued: only a survivor that was already tracking when this
        // write began has recorded it.
        let tracked_before = self.degraded_marked.load(Ordering::Acquire);
        let live: Vec<usize> = (0..2).filter(|&i| self.replicas[i].state() != ReplicaState::Failed).collect();
        let (a, b) = match live.as_slice() {
            [a, b] => {
                let (ra, rb) = self.on_both(kind, len, &op).await;
                (Some((*a, ra)), Some((*b, rb)))
            }
            [a] => (Some((*a, self.timed(*a, kind, &op).await)), None),
            _ => return Err(eio("no replica available")),
        };
        // A replica that has seen a newer holder: this router is fenced, and the write is not
        // acknowledged, whatever the other replica answered (it may not have seen the new epoch
        // yet; going on degraded with it would be the split brain the lease exists to prevent).
        for (i, r) in [&a, &b].into_iter().flatten() {
            if let Err(e) = r {
                if e.is_fenced() {
                    self.lease.fence(format!("the {} replica refused a write: {e}", self.replicas[*i].role));
                }
            }
        }
        if let Some(why) = self.lease.fenced() {
            return Err(fenced_error(why));
        }
        let mut ok = 0;
        let mut acked_by = None;
        let mut failure = None;
        for (i, r) in [a, b].into_iter().flatten() {
            match r {
                Ok(()) => {
                    ok += 1;
                    acked_by = Some(i);
                }
                Err(e) => {
                    match self.fail_replica(i, &e, offset, len).await {
                        // Absorbed by the survivor, or no survivor: then `ok == 0` below.
                        Ok(()) | Err(Unabsorbed::NoSurvivor) => {}
                        Err(Unabsorbed::Recording(e2)) => {
                            tracing::error!("recording a failed write on the survivor failed: {e2}");
                            return Err(e2.to_io());
                        }
                    }
                    keep_reportable(&mut failure, e);
                }
            }
        }
        if ok == 0 {
            // Every replica failed the request: the application gets the failure's errno.
            return Err(failure.map_or_else(|| eio("write failed"), |e| e.to_io()));
        }
        if let (1, Some(i)) = (ok, acked_by) {
            // Acknowledged by one replica only: the lease store knows first (once per episode).
            self.ensure_alone(i).await.map_err(|e| e.to_io())?;
        }
        if live.len() == 1 && !tracked_before {
            // A replica is down and the survivor may not be tracking yet: record this range.
            let s = &self.replicas[live[0]];
            s.mark_degraded(offset, len).await.map_err(|e| e.to_io())?;
            self.degraded_marked.store(true, Ordering::Release);
        }
        // The tenure is checked again right before the acknowledgement (see `lease::tenure`).
        self.lease.admit()
    }

    /// Replica `i`'s part of a mirrored request, within the hard timeout; its latency observed.
    async fn timed<F, Fut>(&self, i: usize, kind: Mirrored, op: &F) -> Result<(), ReplicaError>
    where
        F: Fn(Arc<Replica>) -> Fut,
        Fut: std::future::Future<Output = Result<(), ReplicaError>>,
    {
        let hard = self.cfg.write_deadline.hard;
        let t0 = Instant::now();
        let r = tokio::time::timeout(hard, op(self.replicas[i].clone()))
            .await
            .unwrap_or(Err(ReplicaError::Timeout(hard)));
        if r.is_ok() {
            self.latency[i][kind as usize].observe(t0.elapsed());
        }
        r
    }

    /// A mirrored request on both replicas (source's result first). Once one has completed it,
    /// the other has until its lag limit (`volume::deadline`) or until it is failed by another
    /// request; one that failed leaves the other the hard timeout.
    async fn on_both<F, Fut>(
        &self,
        kind: Mirrored,
        len: u64,
        op: &F,
    ) -> (Result<(), ReplicaError>, Result<(), ReplicaError>)
    where
        F: Fn(Arc<Replica>) -> Fut,
        Fut: std::future::Future<Output = Result<(), ReplicaError>>,
    {
        let t0 = Instant::now();
        let (f0, f1) = (self.timed(0, kind, op), self.timed(1, kind, op));
        tokio::pin!(f0, f1);
        let (first, r_first, lagging) = tokio::select! {
            r = &mut f0 => (0, r, f1),
            r = &mut f1 => (1, r, f0),
        };
        let lag = Self::other(first);
        let r_lag = if r_first.is_ok() {
            let cfg = &self.cfg.write_deadline;
            let mut limit = cfg.lag_limit(self.latency[lag][kind as usize].deadline(cfg), t0.elapsed());
            if kind == Mirrored::Zeroes {
                // A remote replica zeroes a long range in 1 GiB requests, one after the other.
                limit = limit.saturating_mul(len.div_ceil(1 << 30).max(1) as u32).min(cfg.hard);
            }
            self.lagging(lag, t0, limit, lagging).await
        } else {
            lagging.await
        };
        if first == 0 {
            (r_first, r_lag)
        } else {
            (r_lag, r_first)
        }
    }

    /// Waits for lagging replica `i` until `t0 + limit`, or until another request fails it;
    /// but only while the other replica (which has completed the request) is in sync: the last
    /// replica in service is never given up for being slow, it is waited for.
    async fn lagging(
        &self,
        i: usize,
        t0: Instant,
        limit: Duration,
        request: impl std::future::Future<Output = Result<(), ReplicaError>>,
    ) -> Result<(), ReplicaError> {
        let failed = self.failed[i].notified();
        tokio::pin!(failed, request);
        failed.as_mut().enable();
        let r = &self.replicas[i];
        let survivor_in_sync = || self.replicas[Self::other(i)].state() == ReplicaState::InSync;
        if r.state() != ReplicaState::Failed {
            tokio::select! {
                biased;
                res = &mut request => return res,
                () = &mut failed => {}
                () = tokio::time::sleep_until((t0 + limit).into()) => {}
            }
        }
        if !survivor_in_sync() {
            // The survivor left service meanwhile: this replica is the one left.
            return request.await;
        }
        if r.state() != ReplicaState::Failed {
            r.stats.timeouts.fetch_add(1, Ordering::Relaxed);
            return Err(ReplicaError::Timeout(limit));
        }
        Err(ReplicaError::Timeout(t0.elapsed()))
    }

    /// Puts replica `i` into resync (it receives writes, serves no reads) and has the other
    /// replica push what `i` lacks; the supervisor returns `i` to service when that sync is done
    /// and the other replica's bitmap is clean.
    pub async fn start_resync(&self, i: usize) -> Result<(), ReplicaError> {
        let r = &self.replicas[i];
        let s = &self.replicas[Self::other(i)];
        {
            // Wait out every write that left this replica out (see `membership`).
            let _exclusive = self.membership.write().await;
            r.set_state(ReplicaState::Resyncing);
        }
        s.start_sync(r.addr().to_string(), &self.cfg.secret, self.cfg.rate).await
    }

    /// At start, a replica that cannot be reached: out of service, the other one records every
    /// write from now on (a new generation), the supervisor reconnects and resyncs it.
    pub async fn start_without(&self, i: usize, why: &str) -> Result<(), ReplicaError> {
        match self.fail_replica(i, &why, 0, 0).await {
            Ok(()) => Ok(()),
            Err(Unabsorbed::Recording(e)) => Err(e),
            Err(Unabsorbed::NoSurvivor) => {
                Err(ReplicaError::NotConnected { addr: self.replicas[i].addr().to_string() })
            }
        }
    }

    /// One supervisor round.
    pub async fn supervise_once(&self) {
        self.drop_idle_intents().await;
        for i in 0..2 {
            let r = &self.replicas[i];
            let s = &self.replicas[Self::other(i)];
            match r.state() {
                ReplicaState::InSync if r.connection_broken() => {
                    let _ = self.fail_replica(i, &"connection lost", 0, 0).await;
                }
                // Not while requests it was sent are unanswered (see `Replica::quiesced`).
                ReplicaState::Failed
                    if !r.is_local() && s.state() == ReplicaState::InSync && r.quiesced() =>
                {
                    match r.connect().await {
                        Ok(size) if size == self.size => {}
                        Ok(size) => {
                            tracing::error!(
                                replica = r.role,
                                "replica reachable again but its volume is {size} bytes, not {}: left out of service",
                                self.size
                            );
                            r.disconnect();
                            continue;
                        }
                        Err(_) => continue,
                    }
                    // Back: it receives writes again, serves no reads, and the survivor pushes
                    // what it missed.
                    tracing::info!(
                        replica = r.role,
                        "replica reachable again: resyncing it from the {}",
                        s.role
                    );
                    if let Err(e) = self.start_resync(i).await {
                        tracing::warn!(replica = r.role, "could not start the resync: {e}");
                        r.set_state(ReplicaState::Failed);
                    }
                }
                ReplicaState::Resyncing => {
                    if r.connection_broken() {
                        let _ = self.fail_replica(i, &"connection lost during resync", 0, 0).await;
                        continue;
                    }
                    let Ok(status) = s.status().await else { continue };
                    let Some(job) = status.job else { continue };
                    match job.state {
                        JobState::Done | JobState::UpToDate if !status.tracking => {
                            // The sync left the source's bitmap empty: the log starts over.
                            self.al.take_all();
                            r.set_state(ReplicaState::InSync);
                            self.degraded_marked.store(false, Ordering::Release);
                            tracing::info!(replica = r.role, "replica resynced and back in service");
                            self.clear_mark_if_in_sync().await;
                        }
                        JobState::Done | JobState::UpToDate => {
                            // The job ended with tracking still on: writes kept re-dirtying
                            // blocks through all its passes. What they left is recorded; go
                            // again (each pass sends less once the writes slow down).
                            tracing::info!(
                                replica = r.role,
                                "resync ended with writes still arriving; starting another pass"
                            );
                            if let Err(e) = self.start_resync(i).await {
                                tracing::warn!(replica = r.role, "could not restart the resync: {e}");
                                r.set_state(ReplicaState::Failed);
                            }
                        }
                        state @ (JobState::Failed | JobState::Refused | JobState::Cancelled) => {
                            let error = job.error.as_deref().unwrap_or("");
                            tracing::warn!(
                                replica = r.role,
                                error,
                                "resync {state}; replica stays out of service"
                            );
                            r.set_state(ReplicaState::Failed);
                        }
                        _ => {}
                    }
                }
                _ => {}
            }
        }
    }

    /// Status of the volume and both replicas, for `ctl status` and metrics.
    pub fn status(&self) -> RouterStatus {
        let target = self.weights.target();
        RouterStatus {
            size: self.size,
            weights: WeightsStatus { source: 100 - target, target },
            intent_extents: self.al.hot_count(),
            hedges: HedgeStatus {
                sent: self.hedges_sent.load(Ordering::Relaxed),
                won: self.hedges_won.load(Ordering::Relaxed),
            },
            replicas: [self.replicas[0].snapshot(), self.replicas[1].snapshot()],
            lease: self.lease.status(),
        }
    }
}

impl BlockDev for Router {
    fn size(&self) -> u64 {
        self.size
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Reads: both replicas local (so the weighted choice below is the router's own, not skewed
    /// by a replica the fast path cannot drive), the same random choice and in-sync rule as
    /// `read`. Writes: both replicas local and in sync, no failure recorded, the range's intent
    /// recorded already: a write to both, acknowledged after both, is what `mirrored` would do.
    /// (Local replicas never return from failed in this process, so no write that left one out
    /// can still be in flight: no `membership`.)
    fn fast_path(&self, op: FastOp, offset: u64, len: u32) -> Option<FastPlan<'_>> {
        if self.lease.fenced().is_some() {
            return None;
        }
        let [s, t] = &self.replicas;
        let replicas = match op {
            FastOp::Read => {
                if !(s.is_local_uring() && t.is_local_uring()) {
                    return None;
                }
                let first = usize::from(fastrand::u8(0..100) < self.weights.target());
                let i = [first, Self::other(first)].into_iter().find(|&i| self.replicas[i].serves_reads())?;
                let mut one = [None, None];
                one[i] = Some(&*self.replicas[i]);
                one
            }
            FastOp::Write => {
                let ok = !self.degraded_marked.load(Ordering::Acquire)
                    && self.replicas.iter().all(|r| r.is_local_uring() && r.state() == ReplicaState::InSync);
                if !ok {
                    return None;
                }
                let busy = self.al.touch_if_hot(offset, u64::from(len))?;
                let plan = FastPlan::new(op, offset, len, [Some(&**s), Some(&**t)])?.holding(busy);
                // Under a lease: the write ticket, the epoch gates and the tenure check, as the
                // slow path takes them (`FastPlan::under_lease`).
                return if self.replicas.iter().any(|r| r.attachment().is_some()) {
                    plan.under_lease(&self.lease)
                } else {
                    Some(plan)
                };
            }
        };
        FastPlan::new(op, offset, len, replicas)
    }

    async fn read(&self, offset: u64, len: u32) -> std::io::Result<Vec<u8>> {
        if let Some(why) = self.lease.fenced() {
            return Err(fenced_error(why));
        }
        if len > MAX_IO {
            // Frontends take larger requests than the protocol carries (NBD: 32 MiB).
            let mut out = Vec::with_capacity(len as usize);
            for (o, l) in pieces(offset, u64::from(len)) {
                out.extend_from_slice(&self.read_one(o, l).await?);
            }
            return Ok(out);
        }
        self.read_one(offset, len).await
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> std::io::Result<()> {
        if data.len() > MAX_IO as usize {
            // Piece by piece, each mirrored on its own (a failed request may leave some
            // pieces written, as a disk may).
            for (o, l) in pieces(offset, data.len() as u64) {
                let at = (o - offset) as usize;
                self.write_one(o, data[at..at + l as usize].to_vec(), fua).await?;
            }
            return Ok(());
        }
        self.write_one(offset, data, fua).await
    }

    async fn flush(&self) -> std::io::Result<()> {
        // A replica that fails a flush may have lost any write since its last flush: the whole
        // volume is recorded on the survivor (the resync compares digests, so it stays cheap).
        let size = self.size;
        self.mirrored(0, size, Mirrored::Flush, |r| async move { r.flush().await }).await
    }

    async fn trim(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.write_zeroes(offset, len).await
    }

    /// Not split: write-zeroes carries a length, not data (a remote replica sends it in 1 GiB
    /// requests).
    async fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.mirrored(offset, len, Mirrored::Zeroes, |r| async move { r.write_zeroes(offset, len).await })
            .await
    }
}

/// How a hedged read ended.
enum Hedged {
    /// With this result (a success, or the failure of both replicas).
    Done(Result<Vec<u8>, ReplicaError>),
    /// The first replica failed or missed its deadline without a hedge: retry on the other.
    Retry(ReplicaError),
}

/// `[offset, offset+len)` in pieces of at most [`MAX_IO`] bytes: `(offset, len)` each.
fn pieces(offset: u64, len: u64) -> impl Iterator<Item = (u64, u32)> {
    let max = u64::from(MAX_IO);
    (0..len.div_ceil(max)).map(move |k| (offset + k * max, (len - k * max).min(max) as u32))
}

/// A read on one replica and how long it took (owned, so a read the router stops waiting for
/// can be left running: [`abandon`]).
type TimedRead =
    std::pin::Pin<Box<dyn std::future::Future<Output = (Result<Vec<u8>, ReplicaError>, Duration)> + Send>>;

fn timed_read(r: Arc<Replica>, offset: u64, len: u32) -> TimedRead {
    Box::pin(async move {
        let t0 = Instant::now();
        let res = r.read(offset, len).await;
        (res, t0.elapsed())
    })
}

/// Leaves a read the router no longer waits for (overtaken by its hedge, past its deadline)
/// running to its answer, so it counts in its replica's reads in flight until the replica
/// answers it (`volume::inflight`): a stalled replica keeps its old reads' age and is steered
/// around ([`steer`]) instead of seeming idle. It ends with the replica's answer or its
/// connection.
fn abandon(read: TimedRead) {
    drop(tokio::spawn(read));
}

impl Router {
    /// A read of at most [`MAX_IO`] bytes: the weighted choice (steered away from a stalled
    /// replica), the hedge, the deadline and the retry.
    async fn read_one(&self, offset: u64, len: u32) -> std::io::Result<Vec<u8>> {
        let first = usize::from(fastrand::u8(0..100) < self.weights.target());
        let mut candidates: Vec<usize> =
            [first, Self::other(first)].into_iter().filter(|&i| self.replicas[i].serves_reads()).collect();
        let mut last_err = None;
        let mut k = 0;
        if let [i, _] = candidates[..] {
            if self.reads_shared() {
                let s = self.steered(i);
                candidates = vec![s, Self::other(s)];
            }
            let (i, j) = (candidates[0], candidates[1]);
            self.hedge_budget.earn(&self.cfg.hedge);
            match self.hedged_read(i, j, offset, len).await {
                Hedged::Done(r) => return r.map_err(|e| e.to_io()),
                Hedged::Retry(e) => {
                    last_err = Some(e);
                    k = 1;
                }
            }
        }
        for (k, &i) in candidates.iter().enumerate().skip(k) {
            let r = &self.replicas[i];
            if k > 0 {
                self.replicas[candidates[0]].stats.retries.fetch_add(1, Ordering::Relaxed);
            }
            match self.served(i, timed_read(self.replicas[i].clone(), offset, len).await) {
                Ok(d) => return Ok(d),
                Err(e) => {
                    r.stats.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(
                        replica = r.role,
                        offset,
                        len,
                        "read failed: {e}; trying the other replica"
                    );
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.map_or_else(|| eio("no replica holds this range in sync"), |e| e.to_io()))
    }

    /// Both replicas have a share of the reads (not 0 or 100: pinned, or failed over). Only
    /// then is a read hedged or steered to the other: never to a replica the weights keep
    /// reads away from.
    fn reads_shared(&self) -> bool {
        let target = self.weights.target();
        target > 0 && target < 100
    }

    /// Where a read weighted to `first` goes, both replicas in sync: [`steer`] on their
    /// oldest reads in flight now and their hedge delays.
    fn steered(&self, first: usize) -> usize {
        let now = Instant::now();
        let age = [0, 1].map(|k| self.replicas[k].reads_in_flight.oldest_age(now));
        let delay = [0, 1].map(|k| self.cfg.hedge.delay(&self.read_hist[k]));
        steer(first, age, delay)
    }

    /// A read's result on replica `i`; a success's latency is recorded for `i`'s hedge delay.
    fn served(
        &self,
        i: usize,
        (res, took): (Result<Vec<u8>, ReplicaError>, Duration),
    ) -> Result<Vec<u8>, ReplicaError> {
        if res.is_ok() {
            self.read_hist[i].observe(took);
        }
        res
    }

    /// A read on `i` with `j` in sync beside it: after `i`'s hedge delay or its read deadline,
    /// whichever is shorter, it goes to `j` too (budget permitting) and the first success wins;
    /// without a hedge, `i` has the rest of its read deadline. `Retry`: `i` failed or missed
    /// its deadline unhedged (the caller retries on `j`). A read no longer waited for is left
    /// running ([`abandon`]).
    async fn hedged_read(&self, i: usize, j: usize, offset: u64, len: u32) -> Hedged {
        let r = &self.replicas[i];
        let deadline = r.read_deadline(self.cfg.read_deadline_min, self.cfg.read_deadline_cap);
        let delay = self.cfg.hedge.delay(&self.read_hist[i]);
        let t0 = Instant::now();
        let mut primary = timed_read(self.replicas[i].clone(), offset, len);
        let wait = delay.min(deadline);
        let early = tokio::select! {
            biased;
            res = &mut primary => Some(res),
            () = tokio::time::sleep(wait) => None,
        };
        let failed = |e: ReplicaError| {
            if matches!(e, ReplicaError::Timeout(_)) {
                r.stats.timeouts.fetch_add(1, Ordering::Relaxed);
            } else {
                r.stats.errors.fetch_add(1, Ordering::Relaxed);
            }
            tracing::debug!(replica = r.role, offset, len, "read: {e}; trying the other replica");
            Hedged::Retry(e)
        };
        match early.map(|res| self.served(i, res)) {
            Some(Ok(d)) => return Hedged::Done(Ok(d)),
            Some(Err(e)) => return failed(e),
            None => {}
        }
        if !self.reads_shared() || !self.hedge_budget.try_spend() {
            // No hedge: the rest of the deadline, then the retry.
            let left = deadline.saturating_sub(t0.elapsed());
            let Ok(res) = tokio::time::timeout(left, &mut primary).await else {
                abandon(primary);
                return failed(ReplicaError::Timeout(deadline));
            };
            return match self.served(i, res) {
                Ok(d) => Hedged::Done(Ok(d)),
                Err(e) => failed(e),
            };
        }
        self.hedges_sent.fetch_add(1, Ordering::Relaxed);
        let mut hedge = timed_read(self.replicas[j].clone(), offset, len);
        tokio::select! {
            biased;
            res = &mut primary => match self.served(i, res) {
                Ok(d) => {
                    abandon(hedge);
                    Hedged::Done(Ok(d))
                }
                Err(e) => {
                    r.stats.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(replica = r.role, offset, len, "read failed: {e}; the hedge decides");
                    let res = self.served(j, hedge.await);
                    Hedged::Done(self.hedge_result(j, res))
                }
            },
            res = &mut hedge => match self.served(j, res) {
                Ok(d) => {
                    self.hedges_won.fetch_add(1, Ordering::Relaxed);
                    abandon(primary);
                    Hedged::Done(Ok(d))
                }
                Err(e) => {
                    self.replicas[j].stats.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(replica = self.replicas[j].role, offset, len, "hedged read: {e}");
                    Hedged::Done(self.served(i, primary.await))
                }
            },
        }
    }

    /// The hedge's answer after the primary failed.
    fn hedge_result(&self, j: usize, res: Result<Vec<u8>, ReplicaError>) -> Result<Vec<u8>, ReplicaError> {
        match res {
            Ok(d) => {
                self.hedges_won.fetch_add(1, Ordering::Relaxed);
                Ok(d)
            }
            Err(e) => {
                self.replicas[j].stats.errors.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// A write of at most [`MAX_IO`] bytes, mirrored.
    async fn write_one(&self, offset: u64, data: Vec<u8>, fua: bool) -> std::io::Result<()> {
        let len = data.len() as u64;
        let data = Arc::new(data);
        self.mirrored(offset, len, Mirrored::Write, |r| {
            let d = data.clone();
            async move { r.write(offset, d, fua).await }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_range_in_max_io_steps() {
        let m = u64::from(MAX_IO);
        let p: Vec<_> = pieces(4096, 4 * m).collect();
        assert_eq!(p.len(), 4);
        assert!(p.iter().all(|&(_, l)| l == MAX_IO));
        assert_eq!(p[3].0, 4096 + 3 * m);
        let p: Vec<_> = pieces(0, 2 * m + 512).collect();
        assert_eq!(p, [(0, MAX_IO), (m, MAX_IO), (2 * m, 512)]);
        assert_eq!(pieces(0, 100).collect::<Vec<_>>(), [(0, 100)]);
    }
}
