//! The embedded lease store (the default, no extra service): the lease lives at the two replicas,
//! in their metadata, and the replicas are the arbiters ([`super::replica::ReplicaLeaseTable`]).
//!
//! - **Take**: raise the epoch on both replicas (each refuses while another holder's lease is live
//!   on its clock). One replica unreachable: only with `--force` ([`super::take`]); the unreachable
//!   one is claimed too if it answers after all. A take that fails half-way (the other replica
//!   refused: a concurrent campaign) releases what it claimed, so that one of the two contenders
//!   wins on the next try instead of both waiting out a TTL.
//! - **Renew**: restart the timer on both replicas every third of a TTL. A renewal counts when
//!   at least one replica accepted it and none refused it; a refusal (another holder claimed a
//!   higher epoch) means the lease is lost. A replica that does not answer is tolerated (the other
//!   still holds the line; the unreachable one's timer runs out, and only a `--force` take can use
//!   it then: the operator's call).
//! - **Release / hand over**: release on both, naming the successor for a handover; the successor
//!   then takes it like any other (epoch + 1).
//! - **Which replica is current**: nothing to record here ([`LeaseStore::mark_current`] is a
//!   no-op): the replica a degraded holder keeps writing to
//!   tracks the blocks the other one misses (the dirty bitmap and generations), and nobody takes
//!   over automatically in this mode.
//!
//! With two nodes and no third party, nothing can take over automatically and safely: a router
//! that reaches only one replica cannot tell "the other node is dead" from "the link to it is
//! down and its router serves on". So this store never takes without both replicas unless told.

use std::time::Duration;

use super::{
    replica::{Authority, Claim, ClaimRefused, ReplicaLease, ReplicaLeaseError, ReplicaLeaseView},
    take::ReplicaSeen,
    Clock, CurrentMark, Epoch, Held, Holder, LeaseError, LeaseRecord, LeaseState, LeaseStore, Renewal,
    ReplicaId, Takeover,
};

/// The embedded store for one volume and one router, over the volume's two replicas.
#[derive(Debug)]
pub struct EmbeddedLeaseStore<R, C> {
    volume: String,
    me: Holder,
    ttl: Duration,
    replicas: [R; 2],
    clock: C,
}

impl<R: ReplicaLease, C: Clock> EmbeddedLeaseStore<R, C> {
    pub fn new(volume: &str, me: Holder, ttl: Duration, replicas: [R; 2], clock: C) -> Self {
        EmbeddedLeaseStore { volume: volume.into(), me, ttl, replicas, clock }
    }

    pub fn replicas(&self) -> &[R; 2] {
        &self.replicas
    }

    /// Reads both replicas: the merged state and what was seen of each (for [`super::take::decide`]).
    pub async fn survey(&self) -> (LeaseState, Vec<ReplicaSeen>) {
        let [a, b] = &self.replicas;
        let (ra, rb) = tokio::join!(a.read_lease(), b.read_lease());
        let now = self.clock.now();
        let views = [(a, ra), (b, rb)];
        let seen = views
            .iter()
            .map(|(rep, r)| ReplicaSeen {
                id: rep.id().clone(),
                uuid: rep.uuid(),
                accepted: r.as_ref().ok().map(|v| v.accepted),
            })
            .collect();
        let ok: Vec<&ReplicaLeaseView> = views.iter().filter_map(|(_, r)| r.as_ref().ok()).collect();
        (merge(&self.volume, now, &ok), seen)
    }

    /// A replica that refused a renewal because it never saw our epoch (it was unreachable when
    /// the lease was taken with `--force`, or restarted from an older disk) is claimed now, unless
    /// it has accepted an epoch at least as high: then someone newer exists.
    async fn rejoin(&self, r: &R, held: &Held) -> Result<(), String> {
        let v = r.read_lease().await.map_err(|e| format!("cannot be read: {e}"))?;
        if v.accepted >= held.epoch {
            return Err(format!("has accepted epoch {} from {:?}", v.accepted, v.holder));
        }
        let claim = Claim {
            holder: held.holder.clone(),
            epoch: held.epoch,
            ttl: held.ttl,
            authority: Authority::Embedded,
        };
        r.raise_epoch(&claim).await.map(|_| ()).map_err(|e| format!("refused our epoch: {e}"))
    }

    fn refused(&self, id: &ReplicaId, e: ReplicaLeaseError) -> LeaseError {
        match e {
            ReplicaLeaseError::Refused(ClaimRefused::Held { holder, epoch, remaining }) => {
                LeaseError::Held { volume: self.volume.clone(), holder, epoch, time_left: remaining }
            }
            ReplicaLeaseError::Refused(ClaimRefused::Stale { .. }) => {
                LeaseError::Changed { volume: self.volume.clone() }
            }
            source => LeaseError::Replica { replica: id.clone(), source },
        }
    }
}

/// The lease the replicas agree on: the live record of the highest epoch (a replica that missed the
/// latest claim reports an older one).
fn merge(volume: &str, now: Duration, views: &[&ReplicaLeaseView]) -> LeaseState {
    let last_epoch = views.iter().map(|v| v.accepted).max().unwrap_or_default();
    let record =
        views.iter().filter(|v| v.holder.is_some()).max_by_key(|v| (v.accepted, v.remaining)).map(|v| {
            LeaseRecord {
                volume: volume.into(),
                holder: v.holder.clone().unwrap_or_else(|| Holder(String::new())),
                epoch: v.accepted,
                ttl: v.ttl,
                // `now` was read after both answers: never earlier than when the replica measured.
                expires_at: now + v.remaining,
                handed_to: v.handed_to.clone(),
            }
        });
    LeaseState { record, last_epoch, current: None, revision: 0 }
}

impl<R: ReplicaLease, C: Clock> LeaseStore for EmbeddedLeaseStore<R, C> {
    fn volume(&self) -> &str {
        &self.volume
    }

    fn me(&self) -> &Holder {
        &self.me
    }

    async fn current(&self) -> Result<LeaseState, LeaseError> {
        let (state, seen) = self.survey().await;
        if seen.iter().all(|s| s.accepted.is_none()) {
            return Err(LeaseError::NoReplica { volume: self.volume.clone() });
        }
        Ok(state)
    }

    async fn stand_by(&self) -> Result<(), LeaseError> {
        Ok(())
    }

    async fn renew_standby(&self) -> Result<(), LeaseError> {
        Ok(())
    }

    async fn campaign(&self, seen: &LeaseState, how: &Takeover) -> Result<Held, LeaseError> {
        if how.epoch <= seen.last_epoch {
            return Err(LeaseError::EpochTooLow {
                volume: self.volume.clone(),
                epoch: how.epoch,
                floor: seen.last_epoch,
            });
        }
        let claim = Claim {
            holder: self.me.clone(),
            epoch: how.epoch,
            ttl: self.ttl,
            authority: Authority::Embedded,
        };
        let sent_at = self.clock.now();
        let [a, b] = &self.replicas;
        let (ra, rb) = tokio::join!(a.raise_epoch(&claim), b.raise_epoch(&claim));
        let mut failure = None;
        let mut claimed = Vec::new();
        for (r, res) in [(a, ra), (b, rb)] {
            match res {
                Ok(_) => claimed.push(r),
                Err(e) if e.is_unreachable() && how.without.as_ref() == Some(r.id()) => {}
                Err(e) => failure = failure.or(Some(self.refused(r.id(), e))),
            }
        }
        if let Some(e) = failure {
            for r in claimed {
                // Best effort: an unanswered release runs out with the TTL.
                let _ = r.release(&self.me, how.epoch, None).await;
            }
            return Err(e);
        }
        Ok(Held {
            volume: self.volume.clone(),
            holder: self.me.clone(),
            epoch: how.epoch,
            ttl: self.ttl,
            sent_at,
            token: 0,
        })
    }

    async fn renew(&self, held: &Held) -> Result<Renewal, LeaseError> {
        let sent_at = self.clock.now();
        let [a, b] = &self.replicas;
        // Each replica gets a third of the TTL (one renewal period) to answer, but once one of
        // them renewed, the other only a twelfth more: a frozen or black-holed replica must not
        // hold up the renewal on the other, which alone keeps the lease (the survivor serves;
        // see `mirrored`), until the safe window closes. A renewal is due a third of the TTL
        // after the last one was sent and must be answered before the safe window (0.8 TTL)
        // closes; a round that waited the whole third for one slow replica (a throttled source
        // disk, its renewal behind the data requests on the connection) left 0.13 TTL, 262 ms of
        // a 2 s lease, for the keeper's wake-up and the answer, and under CPU hogs on two cores
        // the router fenced itself in scenario (a). A shorter bound for each alone (a sixth)
        // failed rounds where both answered slowly under heavy load; so: both may take the
        // third, one slow one only the grace after the other.
        let limit = held.ttl / 3;
        let grace = held.ttl / 12;
        let no_answer = |within: Duration| {
            Err(ReplicaLeaseError::Unreachable(format!("no answer to the renewal within {within:?}")))
        };
        let bounded =
            |f| async move { tokio::time::timeout(limit, f).await.unwrap_or_else(|_| no_answer(limit)) };
        let (fa, fb) = (
            bounded(a.renew(&held.holder, held.epoch, held.ttl)),
            bounded(b.renew(&held.holder, held.epoch, held.ttl)),
        );
        tokio::pin!(fa, fb);
        let then =
            |first: &Result<ReplicaLeaseView, ReplicaLeaseError>| if first.is_ok() { grace } else { limit };
        let (ra, rb) = tokio::select! {
            ra = &mut fa => {
                let wait = then(&ra);
                (ra, tokio::time::timeout(wait, &mut fb).await.unwrap_or_else(|_| no_answer(wait)))
            }
            rb = &mut fb => {
                let wait = then(&rb);
                (tokio::time::timeout(wait, &mut fa).await.unwrap_or_else(|_| no_answer(wait)), rb)
            }
        };
        let mut renewed = 0;
        let mut unreachable = Vec::new();
        for (r, res) in [(a, ra), (b, rb)] {
            match res {
                Ok(_) => renewed += 1,
                Err(ReplicaLeaseError::Refused(why)) => match self.rejoin(r, held).await {
                    Ok(()) => renewed += 1,
                    Err(e) => {
                        return Err(LeaseError::Lost {
                            volume: self.volume.clone(),
                            epoch: held.epoch,
                            reason: format!("replica {} refused the renewal ({why}) and {e}", r.id()),
                        })
                    }
                },
                Err(e) => unreachable.push(LeaseError::Replica { replica: r.id().clone(), source: e }),
            }
        }
        match unreachable.pop() {
            Some(e) if renewed == 0 => Err(e),
            _ => Ok(Renewal { sent_at, ttl: held.ttl }),
        }
    }

    async fn mark_current(&self, _held: &Held, _mark: CurrentMark) -> Result<(), LeaseError> {
        Ok(())
    }

    async fn clear_current(&self, _held: &Held) -> Result<(), LeaseError> {
        Ok(())
    }

    async fn hand_over(&self, held: &Held, to: &Holder) -> Result<Epoch, LeaseError> {
        // Both must answer before anything is released: a handover that reaches one replica only
        // would leave this router's lease half gone.
        let (_, seen) = self.survey().await;
        if let Some(gone) = seen.iter().find(|s| s.accepted.is_none()) {
            return Err(LeaseError::Handover {
                volume: self.volume.clone(),
                to: to.clone(),
                reason: format!("replica {} unreachable", gone.id),
            });
        }
        let [a, b] = &self.replicas;
        let (ra, rb) = tokio::join!(
            a.release(&held.holder, held.epoch, Some(to)),
            b.release(&held.holder, held.epoch, Some(to))
        );
        for (r, res) in [(a, ra), (b, rb)] {
            if let Err(e) = res {
                return Err(LeaseError::Lost {
                    volume: self.volume.clone(),
                    epoch: held.epoch,
                    reason: format!("handover to {to} reached one replica only (replica {}: {e})", r.id()),
                });
            }
        }
        Ok(held.epoch.next())
    }

    async fn release(&self, held: &Held) -> Result<(), LeaseError> {
        let [a, b] = &self.replicas;
        let (ra, rb) = tokio::join!(
            a.release(&held.holder, held.epoch, None),
            b.release(&held.holder, held.epoch, None)
        );
        for (r, res) in [(a, ra), (b, rb)] {
            match res {
                Ok(_) => {}
                Err(e) if e.is_unreachable() => {}
                Err(e) => return Err(LeaseError::Replica { replica: r.id().clone(), source: e }),
            }
        }
        Ok(())
    }

    async fn wait_change(
        &self,
        seen: Option<&LeaseRecord>,
        timeout: Duration,
    ) -> Result<LeaseState, LeaseError> {
        let key = |r: Option<&LeaseRecord>, now: Duration| {
            r.map(|r| (r.holder.clone(), r.epoch, r.handed_to.clone(), r.live(now)))
        };
        let start = self.clock.now();
        let poll = (self.ttl / 8).max(Duration::from_millis(20));
        loop {
            let state = self.current().await?;
            let now = self.clock.now();
            // `seen` as it was when the wait began, the state as it is now: an expiry is a change.
            if key(state.record.as_ref(), now) != key(seen, start) || now >= start + timeout {
                return Ok(state);
            }
            tokio::time::sleep(poll).await;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! The embedded store over replicas kept in memory: the real [`ReplicaLeaseTable`] rules, each
    //! replica with its own clock, a switch for "unreachable" and a restart that keeps only what
    //! is persisted. Time is tokio's paused clock, so TTLs pass in no time.

    use std::sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    };

    use super::*;
    use crate::lease::{
        acquire,
        replica::{EpochCheck, Fenced, PersistedLease, ReplicaLeaseTable},
        take::StoreKind,
    };

    const TTL: Duration = Duration::from_secs(2);

    /// Tokio's clock (paused in these tests), shifted by `offset`.
    #[derive(Debug, Clone, Copy)]
    pub(crate) struct TestClock {
        origin: tokio::time::Instant,
        offset: Duration,
    }

    impl TestClock {
        pub(crate) fn new(offset: Duration) -> TestClock {
            TestClock { origin: tokio::time::Instant::now(), offset }
        }
    }

    impl Clock for TestClock {
        fn now(&self) -> Duration {
            self.origin.elapsed() + self.offset
        }
    }

    #[derive(Debug)]
    pub(crate) struct MemReplica {
        id: ReplicaId,
        table: Mutex<ReplicaLeaseTable>,
        disk: Mutex<PersistedLease>,
        up: AtomicBool,
        /// Frozen (SIGSTOP, a black-holed link): renewals get no answer at all.
        frozen: AtomicBool,
        clock: TestClock,
    }

    impl MemReplica {
        pub(crate) fn new(id: &str, clock: TestClock) -> Arc<MemReplica> {
            Arc::new(MemReplica {
                id: ReplicaId(id.into()),
                table: Mutex::new(ReplicaLeaseTable::restore(PersistedLease::default(), clock.now())),
                disk: Mutex::new(PersistedLease::default()),
                up: AtomicBool::new(true),
                frozen: AtomicBool::new(false),
                clock,
            })
        }

        pub(crate) fn set_up(&self, up: bool) {
            self.up.store(up, Ordering::SeqCst);
        }

        /// A crash and restart: the timer is lost, what was persisted stays.
        pub(crate) fn restart(&self) {
            let p = self.disk.lock().unwrap().clone();
            *self.table.lock().unwrap() = ReplicaLeaseTable::restore(p, self.clock.now());
        }

        pub(crate) fn check(&self, epoch: Epoch) -> Result<(), EpochCheck> {
            self.table.lock().unwrap().check(epoch)
        }

        fn op(
            &self,
            f: impl FnOnce(&mut ReplicaLeaseTable, Duration) -> Result<ReplicaLeaseView, ClaimRefused>,
        ) -> Result<ReplicaLeaseView, ReplicaLeaseError> {
            if !self.up.load(Ordering::SeqCst) {
                return Err(ReplicaLeaseError::Unreachable(format!("{} is down", self.id)));
            }
            let mut t = self.table.lock().unwrap();
            let v = f(&mut t, self.clock.now())?;
            // Persisted before the answer, as the storage room will.
            *self.disk.lock().unwrap() = t.persisted().clone();
            Ok(v)
        }
    }

    impl ReplicaLease for Arc<MemReplica> {
        fn id(&self) -> &ReplicaId {
            &self.id
        }

        async fn read_lease(&self) -> Result<ReplicaLeaseView, ReplicaLeaseError> {
            self.op(|t, now| Ok(t.view(now)))
        }

        async fn raise_epoch(&self, claim: &Claim) -> Result<ReplicaLeaseView, ReplicaLeaseError> {
            self.op(|t, now| t.claim(now, claim))
        }

        async fn renew(
            &self,
            holder: &Holder,
            epoch: Epoch,
            ttl: Duration,
        ) -> Result<ReplicaLeaseView, ReplicaLeaseError> {
            if self.frozen.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            self.op(|t, now| t.renew(now, holder, epoch, ttl))
        }

        async fn release(
            &self,
            holder: &Holder,
            epoch: Epoch,
            successor: Option<&Holder>,
        ) -> Result<ReplicaLeaseView, ReplicaLeaseError> {
            self.op(|t, now| t.release(now, holder, epoch, successor))
        }
    }

    type Store = EmbeddedLeaseStore<Arc<MemReplica>, TestClock>;

    struct Pair {
        a: Arc<MemReplica>,
        b: Arc<MemReplica>,
    }

    impl Pair {
        /// Two replicas whose clocks disagree by whole seconds (only rates matter, never offsets).
        fn new() -> Pair {
            Pair {
                a: MemReplica::new("a", TestClock::new(Duration::from_secs(1000))),
                b: MemReplica::new("b", TestClock::new(Duration::from_secs(7))),
            }
        }

        fn router(&self, name: &str) -> Store {
            EmbeddedLeaseStore::new(
                "v",
                Holder(name.into()),
                TTL,
                [self.a.clone(), self.b.clone()],
                TestClock::new(Duration::from_secs(50)),
            )
        }
    }

    async fn take(store: &Store, force: bool) -> Result<Held, LeaseError> {
        let (_, seen) = store.survey().await;
        acquire(store, StoreKind::Embedded, force, &seen, &store.clock).await
    }

    async fn sleep(secs: f64) {
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_router_is_refused_naming_the_holder_until_the_lease_expires() {
        let p = Pair::new();
        let (r1, r2) = (p.router("node1/r1"), p.router("node2/r2"));
        let held = take(&r1, false).await.unwrap();
        assert_eq!(held.epoch, Epoch(1));
        for i in 0..6 {
            sleep(0.6).await;
            r1.renew(&held).await.unwrap();
            let e = take(&r2, false).await.unwrap_err();
            assert!(
                matches!(e, LeaseError::Held { ref holder, epoch: Epoch(1), .. } if holder.0 == "node1/r1"),
                "{i}: {e}"
            );
            assert!(e.to_string().contains("node1/r1") && e.to_string().contains("expires in 2.0 s"), "{e}");
        }
        // r1 stops renewing (dies): 2 s later r2 takes it, one epoch up, and r1 is fenced at both.
        sleep(1.0).await;
        assert!(matches!(take(&r2, false).await, Err(LeaseError::Held { .. })));
        sleep(1.0).await;
        let held2 = take(&r2, false).await.unwrap();
        assert_eq!(held2.epoch, Epoch(2));
        for r in [&p.a, &p.b] {
            assert_eq!(
                r.check(Epoch(1)),
                Err(EpochCheck::Fenced(Fenced { ours: Epoch(1), accepted: Epoch(2) }))
            );
            assert_eq!(r.check(Epoch(2)), Ok(()));
        }
        // r1 wakes up: its renewal is refused, the lease is lost.
        assert!(matches!(r1.renew(&held).await, Err(LeaseError::Lost { .. })));
    }

    /// A replica that never answers (frozen, or its link black-holed) must not hold up the
    /// renewal on the other until the safe window closes: the router would fence itself over a
    /// sick target it is meant to survive.
    #[tokio::test(start_paused = true)]
    async fn a_frozen_replica_does_not_hold_up_the_renewal_on_the_other() {
        let p = Pair::new();
        let r1 = p.router("node1/r1");
        let held = take(&r1, false).await.unwrap();
        p.b.frozen.store(true, Ordering::SeqCst);
        for _ in 0..5 {
            sleep(0.6).await;
            let t0 = tokio::time::Instant::now();
            r1.renew(&held).await.unwrap();
            // (tokio's timers round up to the millisecond)
            // The other replica answered at once: the frozen one gets the grace, not the third.
            assert!(t0.elapsed() <= TTL / 12 + Duration::from_millis(1), "renewal took {:?}", t0.elapsed());
        }
        assert_eq!(p.a.check(Epoch(1)), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn one_replica_down_needs_force_and_renewals_go_on_with_one() {
        let p = Pair::new();
        let r1 = p.router("node1/r1");
        p.b.set_up(false);
        let e = take(&r1, false).await.unwrap_err();
        assert!(matches!(e, LeaseError::NeedForce { ref unreachable, .. } if unreachable.0 == "b"), "{e}");
        assert!(e.to_string().contains("--force"));
        let held = take(&r1, true).await.unwrap();
        assert_eq!(held.epoch, Epoch(1));
        assert_eq!(p.a.check(Epoch(1)), Ok(()));
        sleep(0.6).await;
        r1.renew(&held).await.unwrap();
        // b returns: it never saw epoch 1, so the renewal claims it there.
        p.b.set_up(true);
        r1.renew(&held).await.unwrap();
        assert_eq!(p.b.check(Epoch(1)), Ok(()));
        // Had someone newer claimed b meanwhile, the lease would be lost instead.
        let c = Claim {
            holder: Holder("node2/r2".into()),
            epoch: Epoch(5),
            ttl: TTL,
            authority: Authority::Coordinator,
        };
        p.b.raise_epoch(&c).await.unwrap();
        assert!(matches!(r1.renew(&held).await, Err(LeaseError::Lost { .. })));
        // With both down nothing is renewed.
        let p = Pair::new();
        let r1 = p.router("node1/r1");
        let held = take(&r1, false).await.unwrap();
        p.a.set_up(false);
        r1.renew(&held).await.unwrap();
        p.b.set_up(false);
        assert!(matches!(r1.renew(&held).await, Err(LeaseError::Replica { .. })));
    }

    #[tokio::test(start_paused = true)]
    async fn a_half_won_campaign_is_given_back() {
        let p = Pair::new();
        let (r1, r2) = (p.router("node1/r1"), p.router("node2/r2"));
        // r2 won replica b first (its claim reached b before r1's).
        let c = Claim {
            holder: Holder("node2/r2".into()),
            epoch: Epoch(1),
            ttl: TTL,
            authority: Authority::Embedded,
        };
        p.b.raise_epoch(&c).await.unwrap();
        let state = LeaseState::default();
        let e = r1.campaign(&state, &Takeover { epoch: Epoch(1), without: None }).await.unwrap_err();
        assert!(matches!(e, LeaseError::Changed { .. }), "{e}");
        // r1 won a meanwhile and gave it back: a's lease is released (epoch 1 stays the floor).
        let va = p.a.read_lease().await.unwrap();
        assert_eq!((va.accepted, va.remaining), (Epoch(1), Duration::ZERO));
        // So the next round resolves at once: r2 takes both at epoch 2, r1 is refused naming it.
        let held = take(&r2, false).await.unwrap();
        assert_eq!(held.epoch, Epoch(2));
        assert!(matches!(take(&r1, false).await, Err(LeaseError::Held { .. })));
    }

    #[tokio::test(start_paused = true)]
    async fn handover_reserves_the_lease_for_the_successor() {
        let p = Pair::new();
        let (r1, r2, r3) = (p.router("node1/r1"), p.router("node2/r2"), p.router("node3/r3"));
        let held = take(&r1, false).await.unwrap();
        let next = r1.hand_over(&held, &Holder("node2/r2".into())).await.unwrap();
        assert_eq!(next, Epoch(2));
        let e = take(&r3, false).await.unwrap_err();
        assert!(matches!(e, LeaseError::Held { ref holder, .. } if holder.0 == "node2/r2"), "{e}");
        // The successor needs no wait.
        let held2 = take(&r2, false).await.unwrap();
        assert_eq!(held2.epoch, Epoch(2));
        assert!(matches!(p.a.check(Epoch(1)), Err(EpochCheck::Fenced(_))));
        // r1 may not renew what it gave away.
        assert!(matches!(r1.renew(&held).await, Err(LeaseError::Lost { .. })));
        // A handover with a replica down does not start.
        p.b.set_up(false);
        let e = r2.hand_over(&held2, &Holder("node1/r4".into())).await.unwrap_err();
        assert!(matches!(e, LeaseError::Handover { .. }), "{e}");
        p.b.set_up(true);
        r2.renew(&held2).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_replica_restart_keeps_the_epoch_and_restarts_the_timer() {
        let p = Pair::new();
        let (r1, r2) = (p.router("node1/r1"), p.router("node2/r2"));
        let held = take(&r1, false).await.unwrap();
        sleep(1.9).await;
        p.a.restart();
        p.b.restart();
        sleep(0.5).await;
        // 2.4 s after the last renewal, but the replicas restarted 0.5 s ago: still held.
        assert!(matches!(take(&r2, false).await, Err(LeaseError::Held { .. })));
        r1.renew(&held).await.unwrap();
        assert_eq!(p.a.check(Epoch(1)), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn wait_change_sees_expiry_and_a_handover() {
        let p = Pair::new();
        let (r1, r2) = (p.router("node1/r1"), p.router("node2/r2"));
        let held = take(&r1, false).await.unwrap();
        let st = r2.current().await.unwrap();
        let t0 = r2.clock.now();
        let after = r2.wait_change(st.record.as_ref(), Duration::from_secs(10)).await.unwrap();
        let waited = r2.clock.now().checked_sub(t0).unwrap();
        // Unrenewed, it expires after the TTL; the poller notices within a poll.
        assert!(waited >= TTL && waited <= TTL + TTL / 4, "{waited:?}");
        assert!(!after.record.unwrap().live(r2.clock.now()));
        drop(held);
        let held = take(&r1, false).await.unwrap();
        let st = r2.current().await.unwrap();
        let waiter = r2.wait_change(st.record.as_ref(), Duration::from_secs(10));
        let handing = async {
            sleep(0.5).await;
            r1.hand_over(&held, &Holder("node2/r2".into())).await.unwrap()
        };
        let (after, _) = tokio::join!(waiter, handing);
        assert_eq!(after.unwrap().record.unwrap().handed_to, Some(Holder("node2/r2".into())));
        // Nothing changes: the timeout returns the same state.
        let held2 = take(&r2, false).await.unwrap();
        let t0 = r2.clock.now();
        let renewing = async {
            for _ in 0..5 {
                sleep(0.6).await;
                r2.renew(&held2).await.unwrap();
            }
        };
        let st = r1.current().await.unwrap();
        let (same, ()) = tokio::join!(r1.wait_change(st.record.as_ref(), Duration::from_secs(3)), renewing);
        assert_eq!(same.unwrap().record.unwrap().holder.0, "node2/r2");
        assert!(r2.clock.now().checked_sub(t0).unwrap() >= Duration::from_secs(3));
    }
}
