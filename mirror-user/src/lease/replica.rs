//! The replica's side of leases and fencing: the highest epoch a replica has accepted, the lease
//! record it keeps for the embedded mode, and the rules by which it accepts claims, renewals,
//! releases and requests. Pure (the replica's clock is passed in); the storage room persists
//! [`PersistedLease`] in the volume's metadata and the replica server answers with it.
//!
//! Rules:
//! - A **claim** (holder, epoch, ttl) is accepted when its epoch is strictly greater than the
//!   accepted one and the replica knows no live lease of another holder (an embedded claim), or
//!   regardless of the replica's timer when the epoch comes from a coordinator (etcd decided, and
//!   the epoch says who is newer). It is persisted (fsynced) before the reply: a replica that
//!   crashes never forgets an epoch it has acknowledged, so it never accepts the old holder again.
//! - A **renewal** restarts the lease's timer on the replica's own clock; only the holder at the
//!   accepted epoch may renew. It changes nothing on disk (the timer is not persisted), so it is
//!   cheap enough to run every third of a TTL.
//! - A **release** ends the lease (the timer reads zero at once) or, naming a successor, reserves
//!   it for that successor for one TTL (the embedded handover).
//! - After a restart the timer starts afresh: a lease recorded on disk counts as just renewed.
//!   A restart can make a lease last longer, never shorter.
//! - A **request** (write, trim, write-zeroes, flush, mark, sync) passes when its connection's
//!   epoch equals the accepted one. Lower: [`Fenced`] (a newer holder exists). Higher: refused too
//!   (an epoch is only valid once claimed). The timer plays no part here: a holder whose lease ran
//!   out but whom nobody replaced writes nothing that anyone else could contradict.

use std::{future::Future, time::Duration};

use serde::{Deserialize, Serialize};

use super::{Epoch, Holder, ReplicaId};

/// What a replica keeps durably about its volume's lease (in the metadata header).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PersistedLease {
    /// The highest epoch accepted: requests from lower epochs are fenced.
    pub accepted: Epoch,
    /// Who claimed `accepted`.
    pub holder: Option<Holder>,
    pub ttl_ms: u64,
    /// Released naming this successor.
    pub handed_to: Option<Holder>,
    /// Released (the lease is over; `accepted` stays).
    pub released: bool,
    /// Claimed with an epoch from a coordinator (etcd).
    pub coordinated: bool,
}

/// Where a claim's epoch comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Authority {
    /// The embedded lease: the replicas are the arbiters, their timers count.
    Embedded,
    /// A coordinator (etcd) granted the lease and the epoch: only the epoch counts.
    Coordinator,
}

/// A router's claim of the lease at a replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub holder: Holder,
    pub epoch: Epoch,
    pub ttl: Duration,
    pub authority: Authority,
}

/// The lease a replica knows, as it answers a read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaLeaseView {
    pub accepted: Epoch,
    pub holder: Option<Holder>,
    pub ttl: Duration,
    /// Time left on the replica's clock (zero: expired or released).
    pub remaining: Duration,
    pub handed_to: Option<Holder>,
    pub coordinated: bool,
}

/// Why a replica refused a claim, renewal or release.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ClaimRefused {
    #[error("epoch {offered} is not above {accepted}, the one accepted")]
    Stale { offered: Epoch, accepted: Epoch },
    #[error("held by {holder} (epoch {epoch}) for {:.1} s more", remaining.as_secs_f64())]
    Held { holder: Holder, epoch: Epoch, remaining: Duration },
    #[error("{holder} does not hold epoch {epoch} here")]
    NotHolder { holder: Holder, epoch: Epoch },
    #[error("the lease here was granted by etcd (epoch {accepted}): an embedded claim would bypass it")]
    Coordinated { accepted: Epoch },
}

/// A request refused because a newer holder exists: the distinct *fenced* error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("fenced: this connection's epoch {ours} is below {accepted}, accepted from a newer holder")]
pub struct Fenced {
    pub ours: Epoch,
    pub accepted: Epoch,
}

/// Why a request's epoch does not pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EpochCheck {
    #[error(transparent)]
    Fenced(#[from] Fenced),
    #[error("epoch {ours} was never claimed here (accepted {accepted})")]
    Unclaimed { ours: Epoch, accepted: Epoch },
}

/// A replica's lease state: the persisted part and the timer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaLeaseTable {
    p: PersistedLease,
    /// When the timer was last restarted, on the replica's clock.
    renewed_at: Duration,
}

impl ReplicaLeaseTable {
    /// Restores the table from disk at `now`: a recorded, unreleased lease counts as just renewed.
    pub fn restore(p: PersistedLease, now: Duration) -> ReplicaLeaseTable {
        ReplicaLeaseTable { p, renewed_at: now }
    }

    /// What to write to disk (after [`Self::claim`] or [`Self::release`]: before replying).
    pub fn persisted(&self) -> &PersistedLease {
        &self.p
    }

    pub fn accepted(&self) -> Epoch {
        self.p.accepted
    }

    fn remaining(&self, now: Duration) -> Duration {
        if self.p.holder.is_none() || (self.p.released && self.p.handed_to.is_none()) {
            return Duration::ZERO;
        }
        (self.renewed_at + Duration::from_millis(self.p.ttl_ms)).saturating_sub(now)
    }

    /// The answer to a lease read at `now`.
    pub fn view(&self, now: Duration) -> ReplicaLeaseView {
        ReplicaLeaseView {
            accepted: self.p.accepted,
            holder: self.p.holder.clone(),
            ttl: Duration::from_millis(self.p.ttl_ms),
            remaining: self.remaining(now),
            handed_to: self.p.handed_to.clone(),
            coordinated: self.p.coordinated,
        }
    }

    /// Accepts or refuses a claim at `now`. On success the caller persists before replying.
    pub fn claim(&mut self, now: Duration, c: &Claim) -> Result<ReplicaLeaseView, ClaimRefused> {
        if c.epoch <= self.p.accepted {
            return Err(ClaimRefused::Stale { offered: c.epoch, accepted: self.p.accepted });
        }
        if c.authority == Authority::Embedded {
            if self.p.coordinated && !self.p.released {
                return Err(ClaimRefused::Coordinated { accepted: self.p.accepted });
            }
            let remaining = self.remaining(now);
            let other = self.p.holder.as_ref().filter(|h| **h != c.holder);
            let reserved_for_me = self.p.handed_to.as_ref() == Some(&c.holder);
            if let Some(holder) = other {
                if !remaining.is_zero() && !reserved_for_me {
                    let holder = self.p.handed_to.clone().unwrap_or_else(|| holder.clone());
                    return Err(ClaimRefused::Held { holder, epoch: self.p.accepted, remaining });
                }
            }
        }
        self.p = PersistedLease {
            accepted: c.epoch,
            holder: Some(c.holder.clone()),
            ttl_ms: c.ttl.as_millis() as u64,
            handed_to: None,
            released: false,
            coordinated: c.authority == Authority::Coordinator,
        };
        self.renewed_at = now;
        Ok(self.view(now))
    }

    fn is_holder(&self, holder: &Holder, epoch: Epoch) -> Result<(), ClaimRefused> {
        if epoch != self.p.accepted || self.p.holder.as_ref() != Some(holder) || self.p.released {
            return Err(ClaimRefused::NotHolder { holder: holder.clone(), epoch });
        }
        Ok(())
    }

    /// Restarts the timer for the holder at `epoch`. Nothing to persist unless the TTL changed
    /// ([`Self::persisted`] tells).
    pub fn renew(
        &mut self,
        now: Duration,
        holder: &Holder,
        epoch: Epoch,
        ttl: Duration,
    ) -> Result<ReplicaLeaseView, ClaimRefused> {
        self.is_holder(holder, epoch)?;
        self.p.ttl_ms = ttl.as_millis() as u64;
        self.renewed_at = now;
        Ok(self.view(now))
    }

    /// Ends the holder's lease, or reserves it for `successor` for one TTL from `now`.
    pub fn release(
        &mut self,
        now: Duration,
        holder: &Holder,
        epoch: Epoch,
        successor: Option<&Holder>,
    ) -> Result<ReplicaLeaseView, ClaimRefused> {
        self.is_holder(holder, epoch)?;
        self.p.released = true;
        self.p.handed_to = successor.cloned();
        self.renewed_at = now;
        Ok(self.view(now))
    }

    /// The request path's check of a connection's epoch.
    pub fn check(&self, ours: Epoch) -> Result<(), EpochCheck> {
        check_epoch(ours, self.p.accepted)
    }
}

/// The rule for a request at `ours` against the `accepted` epoch: only equal passes.
pub fn check_epoch(ours: Epoch, accepted: Epoch) -> Result<(), EpochCheck> {
    match ours.cmp(&accepted) {
        std::cmp::Ordering::Equal => Ok(()),
        std::cmp::Ordering::Less => Err(Fenced { ours, accepted }.into()),
        std::cmp::Ordering::Greater => Err(EpochCheck::Unclaimed { ours, accepted }),
    }
}

/// Errors of the replica-side operations as a router sees them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicaLeaseError {
    #[error("unreachable: {0}")]
    Unreachable(String),
    #[error(transparent)]
    Refused(#[from] ClaimRefused),
    #[error("{op}: {message} (errno {errno})")]
    Io { op: &'static str, errno: i32, message: String },
    #[error("protocol: {0}")]
    Protocol(String),
}

impl ReplicaLeaseError {
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ReplicaLeaseError::Unreachable(_))
    }
}

/// The lease operations a router needs from one replica. Phase 2 implements it over the
/// replication protocol (a remote replica) and the storage room (a local one); each operation is
/// [`ReplicaLeaseTable`]'s rule applied at the replica, persisted there before the answer.
pub trait ReplicaLease: Send + Sync {
    fn id(&self) -> &ReplicaId;
    /// The replica's metadata uuid, when this router knows it (it connected at least once).
    fn uuid(&self) -> Option<super::ReplicaUuid> {
        None
    }
    /// The replica's lease record and accepted epoch.
    fn read_lease(&self) -> impl Future<Output = Result<ReplicaLeaseView, ReplicaLeaseError>> + Send;
    /// Raises the accepted epoch to `claim.epoch` and records the holder ([`ReplicaLeaseTable::claim`]).
    fn raise_epoch(
        &self,
        claim: &Claim,
    ) -> impl Future<Output = Result<ReplicaLeaseView, ReplicaLeaseError>> + Send;
    /// Restarts the lease's timer ([`ReplicaLeaseTable::renew`]).
    fn renew(
        &self,
        holder: &Holder,
        epoch: Epoch,
        ttl: Duration,
    ) -> impl Future<Output = Result<ReplicaLeaseView, ReplicaLeaseError>> + Send;
    /// Ends the lease or reserves it for a successor ([`ReplicaLeaseTable::release`]).
    fn release(
        &self,
        holder: &Holder,
        epoch: Epoch,
        successor: Option<&Holder>,
    ) -> impl Future<Output = Result<ReplicaLeaseView, ReplicaLeaseError>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(2);

    fn s(x: f64) -> Duration {
        Duration::from_secs_f64(x)
    }

    fn h(n: &str) -> Holder {
        Holder(n.into())
    }

    fn claim(who: &str, epoch: u64, authority: Authority) -> Claim {
        Claim { holder: h(who), epoch: Epoch(epoch), ttl: TTL, authority }
    }

    fn fresh() -> ReplicaLeaseTable {
        ReplicaLeaseTable::restore(PersistedLease::default(), s(0.0))
    }

    #[test]
    fn a_claim_needs_a_greater_epoch_and_no_live_lease_of_another() {
        let mut t = fresh();
        let v = t.claim(s(0.0), &claim("a/1", 1, Authority::Embedded)).unwrap();
        assert_eq!((v.accepted, v.remaining), (Epoch(1), TTL));
        // Same epoch: stale, whoever asks.
        assert_eq!(
            t.claim(s(0.1), &claim("b/1", 1, Authority::Embedded)),
            Err(ClaimRefused::Stale { offered: Epoch(1), accepted: Epoch(1) })
        );
        // Greater epoch but a's lease is live: held, naming a and the time left.
        assert_eq!(
            t.claim(s(0.5), &claim("b/1", 2, Authority::Embedded)),
            Err(ClaimRefused::Held { holder: h("a/1"), epoch: Epoch(1), remaining: s(1.5) })
        );
        // Expired: b takes it.
        assert!(t.claim(s(2.0), &claim("b/1", 2, Authority::Embedded)).is_ok());
        assert_eq!(t.view(s(2.0)).holder, Some(h("b/1")));
    }

    #[test]
    fn renewals_restart_the_timer_and_only_the_holder_at_its_epoch_renews() {
        let mut t = fresh();
        t.claim(s(0.0), &claim("a/1", 1, Authority::Embedded)).unwrap();
        for i in 1..10 {
            let now = s(f64::from(i) * 0.7);
            assert_eq!(t.renew(now, &h("a/1"), Epoch(1), TTL).unwrap().remaining, TTL);
            assert!(t.claim(now + s(0.1), &claim("b/1", 2, Authority::Embedded)).is_err());
        }
        assert_eq!(
            t.renew(s(7.0), &h("b/1"), Epoch(1), TTL),
            Err(ClaimRefused::NotHolder { holder: h("b/1"), epoch: Epoch(1) })
        );
        assert!(t.renew(s(7.0), &h("a/1"), Epoch(0), TTL).is_err());
        // A renewal does not change what is on disk (the timer is volatile).
        let before = t.persisted().clone();
        t.renew(s(7.1), &h("a/1"), Epoch(1), TTL).unwrap();
        assert_eq!(t.persisted(), &before);
    }

    #[test]
    fn a_restart_counts_the_recorded_lease_as_just_renewed() {
        let mut t = fresh();
        t.claim(s(0.0), &claim("a/1", 3, Authority::Embedded)).unwrap();
        // The replica restarts at 1.9 s (its clock starts anew at 0): a's lease is good for a whole
        // TTL again, and epoch 3 is still the floor.
        let mut r = ReplicaLeaseTable::restore(t.persisted().clone(), s(0.0));
        assert_eq!(r.view(s(0.0)).remaining, TTL);
        assert!(matches!(
            r.claim(s(1.0), &claim("b/1", 4, Authority::Embedded)),
            Err(ClaimRefused::Held { .. })
        ));
        assert!(matches!(
            r.claim(s(3.0), &claim("b/1", 3, Authority::Embedded)),
            Err(ClaimRefused::Stale { .. })
        ));
        assert!(r.claim(s(3.0), &claim("b/1", 4, Authority::Embedded)).is_ok());
    }

    #[test]
    fn release_frees_at_once_and_a_handover_reserves_for_the_successor() {
        let mut t = fresh();
        t.claim(s(0.0), &claim("a/1", 1, Authority::Embedded)).unwrap();
        let v = t.release(s(0.5), &h("a/1"), Epoch(1), None).unwrap();
        assert_eq!(v.remaining, Duration::ZERO);
        t.claim(s(0.6), &claim("b/1", 2, Authority::Embedded)).unwrap();
        // b hands over to c: d is refused (naming c) for one TTL, c is not.
        t.release(s(1.0), &h("b/1"), Epoch(2), Some(&h("c/1"))).unwrap();
        assert_eq!(
            t.claim(s(1.5), &claim("d/1", 3, Authority::Embedded)),
            Err(ClaimRefused::Held { holder: h("c/1"), epoch: Epoch(2), remaining: s(1.5) })
        );
        assert!(t.claim(s(1.5), &claim("c/1", 3, Authority::Embedded)).is_ok());
        // A released holder cannot renew or release again.
        assert!(t.renew(s(1.6), &h("b/1"), Epoch(2), TTL).is_err());
    }

    #[test]
    fn a_coordinator_claim_ignores_the_timer_but_not_the_epoch() {
        let mut t = fresh();
        t.claim(s(0.0), &claim("a/1", 5, Authority::Coordinator)).unwrap();
        assert!(t.claim(s(0.1), &claim("b/1", 5, Authority::Coordinator)).is_err());
        assert!(t.claim(s(0.1), &claim("b/1", 6, Authority::Coordinator)).is_ok());
        // An embedded claim never overrides an etcd-granted lease, even once its timer ran out.
        assert_eq!(
            t.claim(s(9.0), &claim("c/1", 7, Authority::Embedded)),
            Err(ClaimRefused::Coordinated { accepted: Epoch(6) })
        );
    }

    #[test]
    fn requests_pass_only_at_the_accepted_epoch() {
        let mut t = fresh();
        t.claim(s(0.0), &claim("a/1", 1, Authority::Embedded)).unwrap();
        assert_eq!(t.check(Epoch(1)), Ok(()));
        // The timer running out does not fence: nobody newer exists.
        assert_eq!(t.check(Epoch(1)), Ok(()));
        t.claim(s(5.0), &claim("b/1", 2, Authority::Embedded)).unwrap();
        assert_eq!(t.check(Epoch(1)), Err(EpochCheck::Fenced(Fenced { ours: Epoch(1), accepted: Epoch(2) })));
        assert_eq!(t.check(Epoch(3)), Err(EpochCheck::Unclaimed { ours: Epoch(3), accepted: Epoch(2) }));
        assert_eq!(t.check(Epoch(2)), Ok(()));
    }
}
