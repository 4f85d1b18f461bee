//! The lease room's [`ReplicaLease`] over the router's replicas: a local replica's operations
//! are its volume's epoch gate (`storage::lease`, on the blocking pool: a claim fsyncs the
//! metadata), a remote one's are protocol requests (`LeaseRead`, `LeaseClaim`, `LeaseRenew`,
//! `LeaseRelease`) on its pool. A refusal keeps its data across the wire (`code::LEASE` carries
//! the `ClaimRefused` as JSON); a replica that cannot be reached is `Unreachable`, which the
//! lease's decisions treat apart from a refusal.
//!
//! [`take`] and [`Keeper`] are the holder's I/O: take the lease before the router's first write
//! and attach both replicas at its epoch, renew it on the schedule of `lease::tenure`, report it
//! to the router's `LeaseLine` (status, the safe window its writes are checked against) and fence
//! the router when it is lost.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::{
    error::ReplicaError,
    fence::LeaseStatus,
    replica::{Attachment, Location, Replica},
    router::Router,
};
use crate::{
    lease::{
        acquire,
        embedded::EmbeddedLeaseStore,
        etcd::{EtcdConfig, EtcdLeaseStore},
        replica::{Authority, Claim, ClaimRefused, ReplicaLease, ReplicaLeaseError, ReplicaLeaseView},
        take::{may_go_alone, ReplicaSeen, StoreKind},
        tenure::{Tenure, TenureConfig},
        Clock, Epoch, Held, Holder, LeaseError, LeaseMode, LeaseRecord, LeaseState, LeaseStore,
        MonotonicClock, ReplicaId, ReplicaUuid,
    },
    replication::protocol::{code, Message},
    storage::{StorageError, Volume},
};

/// One replica of the volume, as the lease sees it.
#[derive(Debug, Clone)]
pub struct LeaseReplica {
    id: ReplicaId,
    replica: Arc<Replica>,
}

impl LeaseReplica {
    /// The replica, named by the address peers reach it at.
    pub fn new(replica: Arc<Replica>) -> LeaseReplica {
        LeaseReplica { id: ReplicaId(replica.addr().to_string()), replica }
    }

    async fn local<T: Send + 'static>(
        vol: &Arc<Volume>,
        f: impl FnOnce(&Volume) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, ReplicaLeaseError> {
        let v = vol.clone();
        match tokio::task::spawn_blocking(move || f(&v)).await {
            Ok(r) => r.map_err(storage_error),
            Err(e) => Err(ReplicaLeaseError::Protocol(format!("local lease task: {e}"))),
        }
    }

    async fn op(
        &self,
        local: impl FnOnce(&Volume) -> Result<ReplicaLeaseView, StorageError> + Send + 'static,
        remote: Message,
    ) -> Result<ReplicaLeaseView, ReplicaLeaseError> {
        match &self.replica.location {
            Location::Local(l) => Self::local(l.volume(), local).await,
            Location::Remote(r) => r.lease_call(remote).await.map_err(replica_error),
        }
    }
}

fn storage_error(e: StorageError) -> ReplicaLeaseError {
    match e {
        StorageError::Lease(r) => ReplicaLeaseError::Refused(r),
        e => ReplicaLeaseError::Io { op: "lease", errno: e.errno().unwrap_or(0), message: e.to_string() },
    }
}

fn replica_error(e: ReplicaError) -> ReplicaLeaseError {
    match e {
        ReplicaError::Remote { code: code::LEASE, message, .. } => {
            match serde_json::from_str::<ClaimRefused>(&message) {
                Ok(r) => ReplicaLeaseError::Refused(r),
                Err(_) => {
                    ReplicaLeaseError::Protocol(format!("a lease refusal that does not decode: {message}"))
                }
            }
        }
        e @ (ReplicaError::Unreachable { .. }
        | ReplicaError::NotConnected { .. }
        | ReplicaError::ConnectionLost { .. }
        | ReplicaError::Timeout(_)) => ReplicaLeaseError::Unreachable(e.to_string()),
        e => ReplicaLeaseError::Io { op: "lease", errno: e.errno().unwrap_or(0), message: e.to_string() },
    }
}

impl ReplicaLease for LeaseReplica {
    fn id(&self) -> &ReplicaId {
        &self.id
    }

    fn uuid(&self) -> Option<ReplicaUuid> {
        self.replica.uuid()
    }

    async fn read_lease(&self) -> Result<ReplicaLeaseView, ReplicaLeaseError> {
        self.op(|v| Ok(v.lease().view()), Message::LeaseRead).await
    }

    async fn raise_epoch(&self, claim: &Claim) -> Result<ReplicaLeaseView, ReplicaLeaseError> {
        let c = claim.clone();
        let msg = Message::LeaseClaim {
            holder: claim.holder.0.clone(),
            epoch: claim.epoch.0,
            ttl_ms: claim.ttl.as_millis() as u64,
            coordinated: u8::from(claim.authority == Authority::Coordinator),
        };
        self.op(move |v| v.lease_claim(&c), msg).await
    }

    async fn renew(
        &self,
        holder: &Holder,
        epoch: Epoch,
        ttl: Duration,
    ) -> Result<ReplicaLeaseView, ReplicaLeaseError> {
        let h = holder.clone();
        let msg =
            Message::LeaseRenew { holder: holder.0.clone(), epoch: epoch.0, ttl_ms: ttl.as_millis() as u64 };
        self.op(move |v| v.lease_renew(&h, epoch, ttl), msg).await
    }

    async fn release(
        &self,
        holder: &Holder,
        epoch: Epoch,
        successor: Option<&Holder>,
    ) -> Result<ReplicaLeaseView, ReplicaLeaseError> {
        let (h, s) = (holder.clone(), successor.cloned());
        let msg = Message::LeaseRelease {
            holder: holder.0.clone(),
            epoch: epoch.0,
            successor: successor.map(|s| s.0.clone()).unwrap_or_default(),
        };
        self.op(move |v| v.lease_release(&h, epoch, s.as_ref()), msg).await
    }
}

/// Where the lease lives.
#[derive(Debug, Clone)]
pub enum LeaseBackend {
    /// At the two replicas (no extra service).
    Embedded,
    /// In etcd (`--lease-store etcd://...`); the replicas only keep the epoch.
    Etcd(EtcdConfig),
}

/// How `mirror serve` holds the volume's lease.
#[derive(Debug, Clone)]
pub struct LeaseOptions {
    /// This router: `node/instance`.
    pub holder: Holder,
    pub ttl: Duration,
    /// Take it with one replica unreachable (the operator vouches no other router runs).
    pub force: bool,
    pub backend: LeaseBackend,
    /// Wait for the lease (etcd): announce this router as a standby and take over when the
    /// holder's lease expires or is handed to it.
    pub standby: bool,
    /// Where a standby shows what it waits on while it waits (`ctl status` on the standby).
    pub standby_view: Option<StandbyView>,
}

/// A standby router's status while it waits for the lease: what `mirror ctl status` answers on
/// the standby's node before it serves anything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StandbyStatus {
    pub volume: String,
    /// This router's lease, in standby mode (the same shape as an active router's `lease`).
    pub lease: LeaseStatus,
    /// The router holding the lease now (`null`: nobody holds it, a takeover is under way).
    pub active: Option<ActiveSeen>,
    /// How long this router has been standing by, milliseconds.
    pub waiting_ms: u64,
}

/// The active router as a standby last read it from the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveSeen {
    pub holder: Holder,
    pub epoch: Epoch,
    /// How long its lease runs without another renewal, milliseconds (0: expired: the standby
    /// takes over).
    pub time_left_ms: u64,
    /// The lease was handed to this router (a planned handover under way).
    pub handed_to_me: bool,
}

#[derive(Debug)]
struct Seen {
    since: Instant,
    /// The store's record at `at` and its time left then.
    record: Option<(LeaseRecord, Duration)>,
    at: Instant,
    last_epoch: Epoch,
    reason: String,
}

/// Shared between a standby's wait ([`take`]) and its control socket.
#[derive(Debug, Clone)]
pub struct StandbyView {
    volume: String,
    me: Holder,
    store: &'static str,
    ttl: Duration,
    seen: Arc<Mutex<Seen>>,
}

impl StandbyView {
    pub fn new(volume: &str, me: Holder, ttl: Duration) -> StandbyView {
        let now = Instant::now();
        StandbyView {
            volume: volume.into(),
            me,
            store: "etcd",
            ttl,
            seen: Arc::new(Mutex::new(Seen {
                since: now,
                record: None,
                at: now,
                last_epoch: Epoch(0),
                reason: "standing by: connecting to the lease store".into(),
            })),
        }
    }

    /// What the store said at `clock_now` (the standby's lease clock).
    fn saw(&self, state: &LeaseState, clock_now: Duration, reason: String) {
        let mut s = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        s.record = state.record.clone().map(|r| {
            let left = r.time_left(clock_now);
            (r, left)
        });
        s.at = Instant::now();
        s.last_epoch = state.last_epoch;
        s.reason = reason;
    }

    /// The status at `now`.
    pub fn status(&self, now: Instant) -> StandbyStatus {
        let s = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let ms = |d: Duration| d.as_millis().try_into().unwrap_or(u64::MAX);
        let active = s.record.as_ref().map(|(r, left)| ActiveSeen {
            holder: r.holder.clone(),
            epoch: r.epoch,
            time_left_ms: ms(left.saturating_sub(now.saturating_duration_since(s.at))),
            handed_to_me: r.handed_to.as_ref() == Some(&self.me),
        });
        StandbyStatus {
            volume: self.volume.clone(),
            lease: LeaseStatus {
                store: self.store.into(),
                mode: LeaseMode::Standby,
                holder: self.me.clone(),
                epoch: active.as_ref().map_or(s.last_epoch, |a| a.epoch),
                ttl_ms: ms(self.ttl),
                time_left_ms: 0,
                reason: s.reason.clone(),
            },
            active,
            waiting_ms: ms(now.saturating_duration_since(s.since)),
        }
    }
}

/// The embedded store over the router's two replicas.
pub type Embedded = EmbeddedLeaseStore<LeaseReplica, MonotonicClock>;
/// The etcd store.
pub type Etcd = EtcdLeaseStore<MonotonicClock>;

/// A lease this router holds, in its store.
#[derive(Debug)]
pub enum Keeper {
    Embedded(Arc<KeeperOf<Embedded>>),
    Etcd(Arc<KeeperOf<Etcd>>),
}

impl Keeper {
    pub fn held(&self) -> &Held {
        match self {
            Keeper::Embedded(k) => &k.held,
            Keeper::Etcd(k) => &k.held,
        }
    }

    /// The store's view of the lease (to confirm a handover whose answer was lost).
    pub async fn current(&self) -> Result<crate::lease::LeaseState, LeaseError> {
        match self {
            Keeper::Embedded(k) => k.store.current().await,
            Keeper::Etcd(k) => k.store.current().await,
        }
    }

    /// Hands the lease to a standby (a planned handover; writes are quiesced and both replicas
    /// flushed): `to` names its node, or its full `node/instance`; without it, the one announced
    /// standby. Asked before anything is quiesced.
    pub async fn successor(&self, to: Option<&str>) -> Result<Holder, LeaseError> {
        match self {
            Keeper::Embedded(k) => Err(LeaseError::Handover {
                volume: k.held.volume.clone(),
                to: Holder(to.unwrap_or("?").into()),
                reason: "the embedded lease store has no way for a standby to announce itself yet: \
                         planned handover needs --lease-store etcd://... (see docs/leases.md)"
                    .into(),
            }),
            Keeper::Etcd(k) => {
                let volume = k.held.volume.clone();
                let all = k.store.standbys().await?;
                let fits = |h: &Holder| to.is_none_or(|t| h.0 == t || h.node() == t);
                let mut fitting: Vec<Holder> = all.iter().filter(|h| fits(h)).cloned().collect();
                let successor = match fitting.len() {
                    1 => fitting.remove(0),
                    0 => {
                        let known: Vec<String> = all.iter().map(ToString::to_string).collect();
                        return Err(LeaseError::Handover {
                            volume,
                            to: Holder(to.unwrap_or("a standby").into()),
                            reason: format!(
                                "no standby router is announced{} (start `mirror serve --standby` on \
                                 the other node); announced: [{}]",
                                to.map(|t| format!(" for {t}")).unwrap_or_default(),
                                known.join(", ")
                            ),
                        });
                    }
                    _ => {
                        let known: Vec<String> = fitting.iter().map(ToString::to_string).collect();
                        return Err(LeaseError::Handover {
                            volume,
                            to: Holder(to.unwrap_or("a standby").into()),
                            reason: format!("several standbys fit, name one with --to: {}", known.join(", ")),
                        });
                    }
                };
                Ok(successor)
            }
        }
    }

    /// Hands the lease to `to` (from [`Self::successor`]; writes quiesced, both replicas
    /// flushed); returns the epoch it holds. On success the renewals stop.
    pub async fn hand_over(&self, to: &Holder) -> Result<Epoch, LeaseError> {
        let epoch = match self {
            Keeper::Embedded(k) => k.store.hand_over(&k.held, to).await?,
            Keeper::Etcd(k) => k.store.hand_over(&k.held, to).await?,
        };
        match self {
            Keeper::Embedded(k) => k.stop.send_replace(true),
            Keeper::Etcd(k) => k.stop.send_replace(true),
        };
        tracing::info!(%to, %epoch, "lease: handed over (planned handover)");
        Ok(epoch)
    }

    /// May this router go on with replica `kept` alone? In the etcd mode the store's verdict
    /// ([`may_go_alone`]: no mark, or `kept` is marked as holding every acknowledged write), read
    /// now (this router holds the lease: nobody else changes the mark). The embedded mode keeps
    /// no marks: `NeedForce`.
    pub async fn vouches_alone(&self, kept: &Replica, gone: &Replica) -> Result<(), LeaseError> {
        match self {
            Keeper::Embedded(k) => Err(LeaseError::NeedForce {
                volume: k.held.volume.clone(),
                unreachable: ReplicaId(gone.addr().into()),
            }),
            Keeper::Etcd(k) => {
                let state = k.store.current().await?;
                may_go_alone(&k.held.volume, &ReplicaId(kept.addr().into()), kept.uuid(), state.current)
            }
        }
    }

    /// Gives the lease up (a clean stop, after the final flush): the next router takes it at once.
    pub async fn release(&self) {
        match self {
            Keeper::Embedded(k) => k.release().await,
            Keeper::Etcd(k) => k.release().await,
        }
    }
}

/// The lease held in store `S`: the grant and the renewal loop's stop.
#[derive(Debug)]
pub struct KeeperOf<S> {
    store: S,
    held: Held,
    kind: &'static str,
    clock: MonotonicClock,
    stop: tokio::sync::watch::Sender<bool>,
}

/// What the router saw of its replicas: their accepted epochs and metadata uuids (for
/// `take::decide`). A remote replica whose connections broke (a standby that waited while it
/// went away and came back) is reconnected first.
async fn seen(replicas: &[LeaseReplica; 2]) -> Vec<ReplicaSeen> {
    let reconnect = |r: &LeaseReplica| {
        let r = r.replica.clone();
        async move {
            if !r.is_local() && r.connection_broken() {
                if let Err(e) = r.connect().await {
                    tracing::debug!(replica = r.role, "lease: reconnecting before the campaign: {e}");
                }
            }
        }
    };
    tokio::join!(reconnect(&replicas[0]), reconnect(&replicas[1]));
    let (a, b) = tokio::join!(replicas[0].read_lease(), replicas[1].read_lease());
    [(&replicas[0], a), (&replicas[1], b)]
        .into_iter()
        .map(|(r, v)| ReplicaSeen {
            id: r.id().clone(),
            uuid: r.uuid(),
            accepted: v.ok().map(|v| v.accepted),
        })
        .collect()
}

/// Reads the replicas, decides and campaigns. With one replica unreachable the decision is
/// `take::decide`'s: the embedded mode needs `--force`; the etcd mode takes it when etcd holds no
/// mark or marks the reachable replica as the one with every acknowledged write (`volume::mark`
/// records it before any write is acknowledged with one replica).
async fn acquire_checked<S: LeaseStore>(
    store: &S,
    kind: StoreKind,
    force: bool,
    replicas: &[LeaseReplica; 2],
    clock: &MonotonicClock,
) -> Result<Held, LeaseError> {
    acquire(store, kind, force, &seen(replicas).await, clock).await
}

/// Reads the store and the replicas and takes the lease. A live lease is refused naming its
/// holder, unless it runs out without a renewal: a holder that died (SIGKILL, a crashed node)
/// leaves its lease live for up to a TTL, so the first refusal is looked at again once that lease
/// should have expired, and only a lease that was renewed meanwhile is refused.
async fn acquire_once_more<S: LeaseStore>(
    store: &S,
    kind: StoreKind,
    force: bool,
    replicas: &[LeaseReplica; 2],
    clock: &MonotonicClock,
    ttl: Duration,
) -> Result<Held, LeaseError> {
    let attempt = || acquire_checked(store, kind, force, replicas, clock);
    match attempt().await {
        Err(LeaseError::Held { holder, epoch, time_left, .. })
            if time_left <= ttl.max(Duration::from_mins(1)) =>
        {
            tracing::info!(
                %holder, %epoch,
                "lease: held by {holder} (epoch {epoch}) for {:.1} s more; waiting once to see whether it is renewed",
                time_left.as_secs_f64()
            );
            tokio::time::sleep(time_left + Duration::from_millis(100)).await;
            attempt().await
        }
        r => r,
    }
}

/// Takes the lease for `router` (both replicas, or one with `force`; a standby waits for it
/// first), writes its epoch to the replicas (etcd: a coordinated claim; embedded: the take is the
/// claim) and attaches both at it, before the router's first write.
pub async fn take(router: &Arc<Router>, volume: &str, o: &LeaseOptions) -> Result<Keeper, LeaseError> {
    let clock = MonotonicClock::new();
    let replicas =
        || [LeaseReplica::new(router.replicas[0].clone()), LeaseReplica::new(router.replicas[1].clone())];
    match &o.backend {
        LeaseBackend::Embedded => {
            let store = EmbeddedLeaseStore::new(volume, o.holder.clone(), o.ttl, replicas(), clock);
            let held =
                acquire_once_more(&store, StoreKind::Embedded, o.force, store.replicas(), &clock, o.ttl)
                    .await?;
            attach(router, volume, &held).await?;
            Ok(Keeper::Embedded(KeeperOf::start(store, held, "embedded", clock, router)))
        }
        LeaseBackend::Etcd(cfg) => {
            let store = EtcdLeaseStore::connect(cfg.clone(), volume, o.holder.clone(), o.ttl, clock).await?;
            let reps = replicas();
            let held = if o.standby {
                stand_by(&store, &reps, &clock, o).await?
            } else {
                acquire_once_more(&store, StoreKind::Etcd, o.force, &reps, &clock, o.ttl).await?
            };
            claim_at_replicas(&reps, &held, volume).await?;
            attach(router, volume, &held).await?;
            let keeper = KeeperOf::start(store, held, "etcd", clock, router);
            // Before the first write: a write acknowledged with one replica is recorded in etcd first.
            router.lease.mark.install(keeper.clone());
            Ok(Keeper::Etcd(keeper))
        }
    }
}

/// `--standby`: announces this router, and waits until the lease is free (the holder's etcd lease
/// expired: its node died, or it was paused past its TTL) or handed to it; then campaigns. Losing
/// that campaign to another standby means standing by again.
async fn stand_by(
    store: &Etcd,
    replicas: &[LeaseReplica; 2],
    clock: &MonotonicClock,
    o: &LeaseOptions,
) -> Result<Held, LeaseError> {
    store.stand_by().await?;
    tracing::info!(holder = %o.holder, "lease: standing by (etcd); taking over when the holder's lease expires");
    loop {
        let state = store.current().await?;
        if let Some(v) = &o.standby_view {
            let why = match &state.record {
                Some(r) if r.holder != o.holder && r.live(clock.now()) => {
                    format!("standing by: {} holds the lease at epoch {}", r.holder, r.epoch)
                }
                _ => "standing by: the lease is free, taking it".into(),
            };
            v.saw(&state, clock.now(), why);
        }
        let waiting_on = state.record.filter(|r| r.holder != o.holder && r.live(clock.now()));
        match waiting_on {
            Some(r) => {
                let _ = store.wait_change(Some(&r), o.ttl / 3).await;
                if let Err(e) = store.renew_standby().await {
                    tracing::warn!("lease: keeping the standby announcement alive: {e}");
                }
            }
            None => match acquire_checked(store, StoreKind::Etcd, o.force, replicas, clock).await {
                Ok(held) => {
                    tracing::info!(epoch = %held.epoch, "lease: standby taking over: the holder's lease is gone");
                    return Ok(held);
                }
                Err(LeaseError::Held { holder, .. }) => {
                    tracing::info!(%holder, "lease: another router took it first; standing by again");
                }
                Err(e @ (LeaseError::Changed { .. } | LeaseError::EpochTooLow { .. })) => {
                    tracing::info!("lease: campaign lost ({e}); standing by again");
                }
                // Not with the replicas reachable now: stand by until that changes (a replica
                // returns), saying why; the operator's `--force` is the other way out.
                Err(
                    e @ (LeaseError::NotCurrent { .. }
                    | LeaseError::NoReplica { .. }
                    | LeaseError::NeedForce { .. }),
                ) => {
                    tracing::warn!("lease: standby not taking over: {e}; standing by");
                    if let Some(v) = &o.standby_view {
                        v.saw(
                            &store.current().await.unwrap_or_default(),
                            clock.now(),
                            format!("standing by, not taking over: {e}"),
                        );
                    }
                    let _ = store.wait_change(None, o.ttl).await;
                    if let Err(e) = store.renew_standby().await {
                        tracing::warn!("lease: keeping the standby announcement alive: {e}");
                    }
                }
                Err(e) => return Err(e),
            },
        }
    }
}

/// The etcd holder writes its epoch to the replicas before its first write (a coordinated claim:
/// etcd decided, the replicas' timers do not count). One unreachable is tolerated (etcd's
/// decision allowed going without it; it is claimed when it returns); a replica that has accepted
/// a higher epoch means someone newer exists.
async fn claim_at_replicas(
    replicas: &[LeaseReplica; 2],
    held: &Held,
    volume: &str,
) -> Result<(), LeaseError> {
    let claim = Claim {
        holder: held.holder.clone(),
        epoch: held.epoch,
        ttl: held.ttl,
        authority: Authority::Coordinator,
    };
    let (a, b) = tokio::join!(replicas[0].raise_epoch(&claim), replicas[1].raise_epoch(&claim));
    let mut claimed = 0;
    for (r, res) in [(&replicas[0], a), (&replicas[1], b)] {
        match res {
            Ok(_) => claimed += 1,
            Err(e) if e.is_unreachable() => {
                tracing::warn!(replica = %r.id(), "lease: epoch not written: {e}");
            }
            Err(source) => return Err(LeaseError::Replica { replica: r.id().clone(), source }),
        }
    }
    if claimed == 0 {
        return Err(LeaseError::NoReplica { volume: volume.into() });
    }
    tracing::info!(epoch = %held.epoch, replicas = claimed, "lease: epoch written to the replicas");
    Ok(())
}

/// Attaches both replicas at the held epoch.
async fn attach(router: &Arc<Router>, volume: &str, held: &Held) -> Result<(), LeaseError> {
    let a = Attachment { holder: held.holder.clone(), epoch: held.epoch };
    for r in &router.replicas {
        match r.attach(a.clone()).await {
            Ok(()) => {}
            // Taken without it: it is claimed when it returns.
            Err(e) if !e.is_fenced() => tracing::warn!(replica = r.role, "lease: attaching: {e}"),
            Err(e) => {
                return Err(LeaseError::Lost {
                    volume: volume.into(),
                    epoch: held.epoch,
                    reason: format!("the {} replica accepted a newer epoch at once: {e}", r.role),
                })
            }
        }
    }
    Ok(())
}

impl<S: LeaseStore + std::fmt::Debug + 'static> super::mark::MarkStore for KeeperOf<S> {
    fn mark(&self, mark: crate::lease::CurrentMark) -> super::mark::MarkFuture<'_> {
        Box::pin(self.store.mark_current(&self.held, mark))
    }

    fn clear(&self) -> super::mark::MarkFuture<'_> {
        Box::pin(self.store.clear_current(&self.held))
    }
}

impl<S: LeaseStore + 'static> KeeperOf<S> {
    fn start(
        store: S,
        held: Held,
        kind: &'static str,
        clock: MonotonicClock,
        router: &Arc<Router>,
    ) -> Arc<Self> {
        let (stop, _) = tokio::sync::watch::channel(false);
        let keeper = Arc::new(KeeperOf { store, held, kind, clock, stop });
        let k = keeper.clone();
        let weak = Arc::downgrade(router);
        tokio::spawn(async move { k.run(weak).await });
        keeper
    }

    fn report(&self, router: &Router, t: &Tenure) {
        let now = self.clock.now();
        let status = LeaseStatus {
            store: self.kind.into(),
            mode: t.mode(),
            holder: self.held.holder.clone(),
            epoch: t.epoch(),
            ttl_ms: self.held.ttl.as_millis() as u64,
            time_left_ms: 0,
            reason: t.reason().into(),
        };
        router.lease.report(status, t.time_left(now), std::time::Instant::now());
    }
    /// Renews every third of the TTL until stopped, fenced or the router is gone; reports each
    /// change to the router's [`LeaseLine`](super::fence::LeaseLine).
    async fn run(&self, router: std::sync::Weak<Router>) {
        let cfg = TenureConfig::for_ttl(self.held.ttl);
        let mut t = Tenure::begin(cfg, self.held.epoch, self.held.sent_at);
        let mut stop = self.stop.subscribe();
        loop {
            let Some(r) = router.upgrade() else { return };
            if *stop.borrow() {
                return;
            }
            let now = self.clock.now();
            if let Err(na) = t.check(now) {
                r.lease.fence(na.reason);
                return;
            }
            if t.renew_due(now) {
                match self.store.renew(&self.held).await {
                    Ok(ren) => {
                        t.renew_sent(ren.sent_at);
                        t.renewed(self.clock.now(), ren.sent_at, ren.ttl);
                    }
                    Err(e @ LeaseError::Lost { .. }) => {
                        r.lease.fence(e.to_string());
                        return;
                    }
                    Err(e) => {
                        tracing::warn!("lease: renewal failed: {e}; retrying");
                        if let Some(ev) = t.renew_failed(self.clock.now(), now, &e.to_string()) {
                            r.lease.fence(ev.reason);
                            return;
                        }
                    }
                }
            }
            self.report(&r, &t);
            if t.mode() == LeaseMode::Fenced {
                r.lease.fence(t.reason().into());
                return;
            }
            let next = t.next_renewal().unwrap_or(now + cfg.retry_every).saturating_sub(self.clock.now());
            drop(r);
            tokio::select! {
                () = tokio::time::sleep(next.max(Duration::from_millis(10))) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Gives the lease up (a clean stop, after the final flush): the next router takes it at once.
    pub async fn release(&self) {
        let _ = self.stop.send(true);
        match self.store.release(&self.held).await {
            Ok(()) => tracing::info!(epoch = %self.held.epoch, "lease: released (clean stop)"),
            Err(e) => tracing::warn!("lease: release failed: {e}; it runs out with its TTL"),
        }
    }
}
