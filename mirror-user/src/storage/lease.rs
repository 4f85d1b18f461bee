//! The epoch gate of a volume: the replica's side of fencing, on the request path. It holds the
//! lease table ([`ReplicaLeaseTable`], the rules) restored from the metadata header, applies
//! claims, renewals and releases (persisting before it answers), and admits each mutating request
//! only at the accepted epoch.
//!
//! Why a gate and not a check: a request admitted at epoch N must not land *after* the replica
//! accepted N+1 and told the new holder so, or the new holder's first write could be overwritten
//! by the old one's. So a mutation holds an [`EpochGuard`] from its check until it has been
//! applied, and a claim, once recorded (new requests of lower epochs are refused from then on),
//! waits until every guard admitted before it is dropped before it replies.
//!
//! Who is checked: a connection that attached (every router connection, every sync job's
//! connection) presents its epoch; a request passes when it equals the accepted one. A caller
//! that never attached (`None`: the operator's CLI, status, resolve) is not checked; fencing is
//! against stale routers, which always attach.

use std::{
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst},
        Arc, Condvar, Mutex, MutexGuard,
    },
    time::{Duration, Instant},
};

use super::{error::StorageError, meta::MetaError};
use crate::lease::{
    replica::{check_epoch, Claim, EpochCheck, PersistedLease, ReplicaLeaseTable, ReplicaLeaseView},
    Epoch, Holder,
};

/// The epoch gate (see the module doc).
///
/// The request path takes no lock: a mutation counts itself in `inflight`, then reads
/// `accepted` (both sequentially consistent); a claim stores the new `accepted`, then waits for
/// `inflight` to reach zero. Either the mutation's read comes after the claim's store (it is
/// refused) or its count comes before it (the claim waits for it): no mutation admitted at the
/// old epoch can land after the claim is answered.
pub struct LeaseGate {
    /// The table (the rules and what is persisted); changed under the lock.
    st: Mutex<ReplicaLeaseTable>,
    /// `table.accepted()`, mirrored for the request path; stored under the lock.
    accepted: AtomicU64,
    /// Mutations admitted and not yet finished.
    inflight: AtomicU64,
    /// Claims waiting for `inflight` to drain: only then does a finishing mutation notify.
    waiting: AtomicUsize,
    drained: Condvar,
    /// The replica's clock for the lease's timer.
    origin: Instant,
}

impl std::fmt::Debug for LeaseGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LeaseGate(accepted {})", self.accepted())
    }
}

/// A mutation admitted by the gate: a claim waits for it to be dropped.
#[derive(Debug)]
pub struct EpochGuard(Arc<LeaseGate>);

impl Drop for EpochGuard {
    fn drop(&mut self) {
        self.0.leave();
    }
}

impl LeaseGate {
    /// The gate of a volume whose header holds `p` (a recorded lease counts as just renewed).
    pub fn new(p: PersistedLease) -> Arc<LeaseGate> {
        let origin = Instant::now();
        let table = ReplicaLeaseTable::restore(p, Duration::ZERO);
        Arc::new(LeaseGate {
            accepted: AtomicU64::new(table.accepted().0),
            st: Mutex::new(table),
            inflight: AtomicU64::new(0),
            waiting: AtomicUsize::new(0),
            drained: Condvar::new(),
            origin,
        })
    }

    fn lock(&self) -> MutexGuard<'_, ReplicaLeaseTable> {
        self.st.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A mutation finished: the last one out wakes a waiting claim.
    fn leave(&self) {
        if self.inflight.fetch_sub(1, SeqCst) == 1 && self.waiting.load(SeqCst) > 0 {
            // Taken so that the notification cannot fall between a claim's check and its wait.
            let _st = self.lock();
            self.drained.notify_all();
        }
    }

    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    pub fn accepted(&self) -> Epoch {
        Epoch(self.accepted.load(SeqCst))
    }

    pub fn view(&self) -> ReplicaLeaseView {
        let now = self.now();
        self.lock().view(now)
    }

    /// Admits a mutation from a connection attached at `epoch` (`None`: not attached, not
    /// checked). Lower than the accepted epoch: [`StorageError::Fenced`].
    pub fn enter(self: &Arc<Self>, epoch: Option<Epoch>) -> Result<EpochGuard, StorageError> {
        // Counted first, checked second (see the type's doc for why this order).
        self.inflight.fetch_add(1, SeqCst);
        let guard = EpochGuard(self.clone());
        if let Some(ours) = epoch {
            match check_epoch(ours, self.accepted()) {
                Ok(()) => {}
                Err(EpochCheck::Fenced(f)) => return Err(StorageError::Fenced(f)),
                Err(EpochCheck::Unclaimed { ours, accepted }) => {
                    return Err(StorageError::Unclaimed { ours, accepted })
                }
            }
        }
        Ok(guard)
    }

    /// Checks an attachment at `epoch` (the Attach request): refused only when lower.
    pub fn attach(&self, epoch: Epoch) -> Result<ReplicaLeaseView, StorageError> {
        let now = self.now();
        let st = self.lock();
        match st.check(epoch) {
            Err(EpochCheck::Fenced(f)) => Err(StorageError::Fenced(f)),
            _ => Ok(st.view(now)),
        }
    }

    /// Applies `f` to a copy of the table; when it accepts, persists the result with `persist`
    /// (before anyone is told) and only then installs it.
    fn change(
        &self,
        f: impl FnOnce(&mut ReplicaLeaseTable, Duration) -> Result<ReplicaLeaseView, crate::lease::ClaimRefused>,
        persist: impl FnOnce(&PersistedLease) -> Result<(), MetaError>,
    ) -> Result<(MutexGuard<'_, ReplicaLeaseTable>, ReplicaLeaseView), StorageError> {
        let now = self.now();
        let mut st = self.lock();
        let mut t = st.clone();
        let view = f(&mut t, now).map_err(StorageError::Lease)?;
        if t.persisted() != st.persisted() {
            persist(t.persisted())?;
        }
        *st = t;
        self.accepted.store(st.accepted().0, SeqCst);
        Ok((st, view))
    }

    /// A claim ([`ReplicaLeaseTable::claim`]): persisted, then every mutation admitted before it
    /// is waited out, then answered.
    pub fn claim(
        &self,
        c: &Claim,
        persist: impl FnOnce(&PersistedLease) -> Result<(), MetaError>,
    ) -> Result<ReplicaLeaseView, StorageError> {
        let (mut st, view) = self.change(|t, now| t.claim(now, c), persist)?;
        // Announced before the count is read, so the last mutation out sees it and notifies.
        self.waiting.fetch_add(1, SeqCst);
        while self.inflight.load(SeqCst) > 0 {
            st = self.drained.wait(st).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        self.waiting.fetch_sub(1, SeqCst);
        drop(st);
        Ok(view)
    }

    /// A renewal ([`ReplicaLeaseTable::renew`]): persisted only when the TTL changed.
    pub fn renew(
        &self,
        holder: &Holder,
        epoch: Epoch,
        ttl: Duration,
        persist: impl FnOnce(&PersistedLease) -> Result<(), MetaError>,
    ) -> Result<ReplicaLeaseView, StorageError> {
        self.change(|t, now| t.renew(now, holder, epoch, ttl), persist).map(|(_, v)| v)
    }

    /// A release ([`ReplicaLeaseTable::release`]), persisted.
    pub fn release(
        &self,
        holder: &Holder,
        epoch: Epoch,
        successor: Option<&Holder>,
        persist: impl FnOnce(&PersistedLease) -> Result<(), MetaError>,
    ) -> Result<ReplicaLeaseView, StorageError> {
        self.change(|t, now| t.release(now, holder, epoch, successor), persist).map(|(_, v)| v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::{replica::Authority, Fenced};

    fn claim(who: &str, epoch: u64) -> Claim {
        Claim {
            holder: Holder(who.into()),
            epoch: Epoch(epoch),
            ttl: Duration::from_secs(2),
            authority: Authority::Coordinator,
        }
    }

    #[test]
    fn a_claim_fences_lower_epochs_and_waits_out_what_was_admitted_before_it() {
        let g = LeaseGate::new(PersistedLease::default());
        // Never leased: epoch 0 and unattached callers pass.
        drop(g.enter(Some(Epoch(0))).unwrap());
        g.claim(&claim("a/1", 1), |_| Ok(())).unwrap();
        let old = g.enter(Some(Epoch(1))).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let g2 = g.clone();
        let t = std::thread::spawn(move || {
            let v = g2.claim(&claim("b/1", 2), |p| {
                assert_eq!(p.accepted, Epoch(2));
                Ok(())
            });
            tx.send(()).unwrap();
            v
        });
        // The claim is recorded (epoch 1 refused from now on) but not answered while `old` runs.
        std::thread::sleep(Duration::from_millis(100));
        assert!(rx.try_recv().is_err(), "the claim waits for the mutation admitted before it");
        assert!(matches!(
            g.enter(Some(Epoch(1))),
            Err(StorageError::Fenced(Fenced { ours: Epoch(1), accepted: Epoch(2) }))
        ));
        drop(old);
        assert_eq!(t.join().unwrap().unwrap().accepted, Epoch(2));
        assert!(g.enter(Some(Epoch(2))).is_ok() && g.enter(None).is_ok());
        assert!(matches!(g.enter(Some(Epoch(3))), Err(StorageError::Unclaimed { .. })));
        assert!(matches!(g.attach(Epoch(1)), Err(StorageError::Fenced(_))));
        assert_eq!(g.attach(Epoch(3)).unwrap().accepted, Epoch(2));
    }

    #[test]
    fn no_mutation_of_the_old_epoch_runs_after_the_claim_is_answered() {
        use std::sync::atomic::AtomicBool;
        // Writers at epoch 1 race a claim of epoch 2, many times: once the claim has answered,
        // no writer may still hold (or newly get) a guard of epoch 1.
        for _ in 0..50 {
            let g = LeaseGate::new(PersistedLease::default());
            g.claim(&claim("a/1", 1), |_| Ok(())).unwrap();
            let answered = Arc::new(AtomicBool::new(false));
            let writers: Vec<_> = (0..4)
                .map(|_| {
                    let (g, answered) = (g.clone(), answered.clone());
                    std::thread::spawn(move || {
                        let mut late = 0u32;
                        loop {
                            match g.enter(Some(Epoch(1))) {
                                Ok(guard) => {
                                    std::hint::spin_loop();
                                    if answered.load(SeqCst) {
                                        late += 1;
                                    }
                                    drop(guard);
                                }
                                Err(StorageError::Fenced(_)) => return late,
                                Err(e) => panic!("{e}"),
                            }
                        }
                    })
                })
                .collect();
            std::thread::sleep(Duration::from_micros(200));
            g.claim(&claim("b/1", 2), |_| Ok(())).unwrap();
            answered.store(true, SeqCst);
            let late: u32 = writers.into_iter().map(|w| w.join().unwrap()).sum();
            assert_eq!(late, 0, "an epoch-1 mutation ran after epoch 2 was answered");
            assert_eq!(g.inflight.load(SeqCst), 0);
        }
    }

    #[test]
    fn a_refused_or_unpersisted_change_leaves_the_table_as_it_was() {
        let g = LeaseGate::new(PersistedLease::default());
        g.claim(&claim("a/1", 5), |_| Ok(())).unwrap();
        assert!(matches!(g.claim(&claim("b/1", 5), |_| Ok(())), Err(StorageError::Lease(_))));
        let failed = g.claim(&claim("b/1", 6), |_| Err(MetaError::Corrupt("/m".into())));
        assert!(matches!(failed, Err(StorageError::Meta(_))));
        assert_eq!(g.accepted(), Epoch(5), "a claim that was not made durable was not made");
        // Renewing with the same TTL writes nothing.
        let v =
            g.renew(&Holder("a/1".into()), Epoch(5), Duration::from_secs(2), |_| panic!("no write")).unwrap();
        assert_eq!(v.remaining, Duration::from_secs(2));
    }
}
