//! Attachment leases and fencing: exactly one active router per volume.
//!
//! Two things keep the line, and only together are they safe:
//! - the **lease** says who may be the active router (the *holder*) and for how long: embedded at
//!   the replicas ([`embedded`]), or an etcd lease ([`etcd`]), both behind [`LeaseStore`];
//! - the **epoch** makes the lease's decision stick at the data: every holder gets an epoch greater
//!   than any before it, writes it to the replicas before its first write, and a replica refuses
//!   every mutating request from a connection with a lower epoch ([`replica::ReplicaLeaseTable`]).
//!   A lease by itself is not a lock (a paused holder wakes up believing it still holds one); the
//!   epoch check at the replicas is what makes a stale holder harmless.
//!
//! The room keeps the three paths apart. The decision path is pure, with time passed in, and is
//! tested with scripted traces in simulated time like the weighting engine: [`take`] (may this
//! router take the lease, with which epoch), [`tenure`] (the holder's side: renewal schedule and
//! the moment it must consider itself fenced), [`replica`] (the replica's side: which claims,
//! renewals and requests it accepts), [`handover`] (the planned handover, active and standby).
//! The I/O lives in the stores: [`etcd`] talks to etcd, [`embedded`] to the replicas through the
//! [`replica::ReplicaLease`] operations.
//!
//! Times: every `Duration` called `now`, `expires_at` or `sent_at` is a reading of the *local*
//! monotonic clock of the process that holds the value ([`Clock`]). Clocks of different machines
//! are never compared; a store reports the time left on a lease as a length, and the reader turns
//! it into its own `expires_at`. How far clock *rates* may differ is a parameter of the fencing
//! margin ([`tenure::Margin`]). The design note is `docs/leases.md`.

pub mod embedded;
pub mod etcd;
pub mod handover;
pub mod replica;
pub mod take;
pub mod tenure;

use std::{fmt, future::Future, time::Duration};

use serde::{Deserialize, Serialize};

pub use replica::{ClaimRefused, Fenced, ReplicaLeaseError};

/// A fencing epoch: each holder of a volume's lease has a greater one than every holder before
/// it. 0 means "never leased".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Epoch(pub u64);

impl Epoch {
    /// The epoch after this one.
    pub fn next(self) -> Epoch {
        Epoch(self.0 + 1)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Who holds (or wants) a lease: a router instance. It names the node and the process instance
/// (`node/instance`), so a restarted router is a new holder and never mistakes an old lease for
/// its own.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Holder(pub String);

impl Holder {
    /// `node/instance`.
    pub fn new(node: &str, instance: &str) -> Holder {
        Holder(format!("{node}/{instance}"))
    }

    /// The node part of the name.
    pub fn node(&self) -> &str {
        self.0.split_once('/').map_or(&self.0, |(n, _)| n)
    }
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A replica of a volume as this router names it (the address it reaches it at), for messages and
/// logs. Two routers may name the same replica differently (loopback on its own node, the node's
/// address on the other), so the marks in a store never use it: they use [`ReplicaUuid`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ReplicaId(pub String);

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A replica's identity for every router: the random `uuid` of its metadata (`storage::meta`),
/// delivered in `VolumeInfo` at connect. It is made once, when the metadata is created, and never
/// copied to the peer; metadata made anew is a new replica (it holds none of the old writes).
/// Serialised as 32 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ReplicaUuid(#[serde(with = "crate::storage::status::hex::bytes16")] pub [u8; 16]);

impl fmt::Display for ReplicaUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// What a holder recorded in the store before it acknowledged a write with one replica only
/// ([`LeaseStore::mark_current`]): which replica holds every acknowledged write. No mark: both
/// do, as far as the store knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CurrentMark {
    /// This replica alone holds every acknowledged write (the holder writes without the other).
    Only(ReplicaUuid),
    /// Neither does by itself: the holder wrote to a replica that was still being resynced (it
    /// lacks some of what the other holds, and the other lacks the new writes).
    Neither,
}

impl fmt::Display for CurrentMark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CurrentMark::Only(u) => write!(f, "replica {u} alone holds every acknowledged write"),
            CurrentMark::Neither => f.write_str("no single replica holds every acknowledged write"),
        }
    }
}

/// A lease as read from a store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub volume: String,
    pub holder: Holder,
    pub epoch: Epoch,
    pub ttl: Duration,
    /// When the lease runs out if it is not renewed, on the reader's clock (the store's time left
    /// added to the reader's `now` at the read).
    pub expires_at: Duration,
    /// The holder released the lease naming this successor (embedded handover): only the successor
    /// may take it until it expires.
    pub handed_to: Option<Holder>,
}

impl LeaseRecord {
    /// Time left at `now` (zero once expired).
    pub fn time_left(&self, now: Duration) -> Duration {
        self.expires_at.saturating_sub(now)
    }

    /// Not yet expired at `now`.
    pub fn live(&self, now: Duration) -> bool {
        now < self.expires_at
    }
}

/// What a store knows about a volume's lease: the record if anyone holds it, the last epoch the
/// store issued, and which replica holds every acknowledged write when a holder wrote with one
/// only (`None`: both do, or the store keeps no marks: embedded).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LeaseState {
    pub record: Option<LeaseRecord>,
    pub last_epoch: Epoch,
    pub current: Option<CurrentMark>,
    /// The store's version of this state (etcd: the revision of the read), for compare-and-set.
    pub revision: i64,
}

/// A router's role for a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaseMode {
    /// Holds the lease and serves.
    Active,
    /// Waits to be handed the lease, or to take it when it expires.
    Standby,
    /// Lost the lease (not renewed in time, or a replica has seen a higher epoch): acknowledges no
    /// more writes and stops.
    Fenced,
}

impl LeaseMode {
    /// Every mode, in the order status and metrics list them.
    pub const ALL: [LeaseMode; 3] = [LeaseMode::Active, LeaseMode::Standby, LeaseMode::Fenced];

    /// The mode's name, as its JSON spells it (`active`, `standby`, `fenced`).
    pub fn as_str(self) -> &'static str {
        match self {
            LeaseMode::Active => "active",
            LeaseMode::Standby => "standby",
            LeaseMode::Fenced => "fenced",
        }
    }
}

/// How a lease is taken: at which epoch, and which replica the taker goes without.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Takeover {
    pub epoch: Epoch,
    /// The replica the taker cannot reach (decided by [`take::decide`]); the stores refuse a take
    /// that misses any other.
    pub without: Option<ReplicaId>,
}

/// A lease this router holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub volume: String,
    pub holder: Holder,
    pub epoch: Epoch,
    pub ttl: Duration,
    /// When the request that granted the lease went out, on the holder's clock: the tenure counts
    /// from here (the store started its TTL later, never earlier).
    pub sent_at: Duration,
    /// The store's handle (etcd: the lease id; embedded: 0).
    pub token: i64,
}

/// A successful renewal: the request went out at `sent_at` (holder's clock) and the store granted
/// `ttl` from its receipt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Renewal {
    pub sent_at: Duration,
    pub ttl: Duration,
}

/// Errors at the lease boundary.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LeaseError {
    #[error("volume {volume}: the lease is held by {holder} (epoch {epoch}) and expires in {:.1} s", time_left.as_secs_f64())]
    Held { volume: String, holder: Holder, epoch: Epoch, time_left: Duration },
    #[error(
        "volume {volume}: replica {unreachable} is unreachable; --force takes the lease with the other one \
         alone (you vouch that no other router is running: if one is, it may have acknowledged writes \
         that the replica you keep does not have)"
    )]
    NeedForce { volume: String, unreachable: ReplicaId },
    #[error("volume {volume}: no replica reachable")]
    NoReplica { volume: String },
    #[error(
        "volume {volume}: replica {kept} is the only one reachable, and the store says {mark} (a holder \
         wrote with one replica only): no automatic takeover with {kept}; bring the other replica back, or \
         --force accepts losing the writes {kept} lacks"
    )]
    NotCurrent { volume: String, kept: ReplicaId, mark: CurrentMark },
    #[error("volume {volume}: the lease (epoch {epoch}) is lost: {reason}")]
    Lost { volume: String, epoch: Epoch, reason: String },
    #[error("volume {volume}: the lease changed while it was being taken (someone else campaigned)")]
    Changed { volume: String },
    #[error("volume {volume}: handover to {to} refused: {reason}")]
    Handover { volume: String, to: Holder, reason: String },
    #[error("volume {volume}: epoch {epoch} is not above {floor}, the highest seen")]
    EpochTooLow { volume: String, epoch: Epoch, floor: Epoch },
    #[error("etcd {op}: {source}")]
    Etcd {
        op: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    #[error("etcd {op}: no answer within {:.1} s", timeout.as_secs_f64())]
    EtcdTimeout { op: &'static str, timeout: Duration },
    #[error("lease record {key}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("replica {replica}: {source}")]
    Replica {
        replica: ReplicaId,
        #[source]
        source: ReplicaLeaseError,
    },
}

impl LeaseError {
    /// The store did not answer (or the answer was lost): the operation may or may not have
    /// happened, and only reading the store again tells.
    pub fn is_indeterminate(&self) -> bool {
        matches!(self, LeaseError::EtcdTimeout { .. } | LeaseError::Etcd { .. })
    }
}

/// A monotonic clock, the only source of `now` for the lease's I/O side (the decision side is
/// handed its `now`).
pub trait Clock: Send + Sync {
    fn now(&self) -> Duration;
}

/// The process's monotonic clock, counted from its creation.
#[derive(Debug, Clone, Copy)]
pub struct MonotonicClock(std::time::Instant);

impl MonotonicClock {
    pub fn new() -> MonotonicClock {
        MonotonicClock(std::time::Instant::now())
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        MonotonicClock::new()
    }
}

impl Clock for MonotonicClock {
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

/// Where a volume's lease lives. A store is made for one volume and one router (`me`); the
/// decisions (may I take it, with which epoch, am I still safe) are [`take`] and [`tenure`]'s, the
/// store only reads and performs them atomically.
pub trait LeaseStore: Send + Sync {
    fn volume(&self) -> &str;
    fn me(&self) -> &Holder;
    /// The lease as the store sees it now.
    fn current(&self) -> impl Future<Output = Result<LeaseState, LeaseError>> + Send;
    /// Says that `me` stands by for this volume, so that the holder may hand it the lease
    /// (etcd: a key under `me`'s own etcd lease, kept alive by [`LeaseStore::renew_standby`]).
    fn stand_by(&self) -> impl Future<Output = Result<(), LeaseError>> + Send;
    /// Keeps the standby announcement alive (etcd); a no-op where there is none.
    fn renew_standby(&self) -> impl Future<Output = Result<(), LeaseError>> + Send;
    /// Takes the lease at epoch `how.epoch` if nothing changed since `seen`: free, expired, or
    /// handed to `me`. `how` comes from [`take::decide`]; [`acquire`] does both.
    fn campaign(
        &self,
        seen: &LeaseState,
        how: &Takeover,
    ) -> impl Future<Output = Result<Held, LeaseError>> + Send;
    /// Renews the held lease.
    fn renew(&self, held: &Held) -> impl Future<Output = Result<Renewal, LeaseError>> + Send;
    /// Records, durably and while `held` is the holder, which replica holds every acknowledged
    /// write, before the first write acknowledged with one replica only (a no-op where the store
    /// keeps no marks: embedded).
    fn mark_current(
        &self,
        held: &Held,
        mark: CurrentMark,
    ) -> impl Future<Output = Result<(), LeaseError>> + Send;
    /// Clears the mark once both replicas hold every acknowledged write again (after the resync).
    fn clear_current(&self, held: &Held) -> impl Future<Output = Result<(), LeaseError>> + Send;
    /// Hands the lease to the standby `to`; returns the epoch `to` now holds (greater than ours).
    /// The caller has stopped writing and flushed both replicas.
    fn hand_over(&self, held: &Held, to: &Holder) -> impl Future<Output = Result<Epoch, LeaseError>> + Send;
    /// Gives the lease up.
    fn release(&self, held: &Held) -> impl Future<Output = Result<(), LeaseError>> + Send;
    /// Waits until the record differs from `seen` (taken, expired, released, handed over) or
    /// `timeout` passes; returns the state then.
    fn wait_change(
        &self,
        seen: Option<&LeaseRecord>,
        timeout: Duration,
    ) -> impl Future<Output = Result<LeaseState, LeaseError>> + Send;
}

/// Reads the store, decides with [`take::decide`] and campaigns: the one way a router takes a
/// lease. `replicas` is what the router saw of each replica (their accepted epochs); the decision's
/// reason is logged.
pub async fn acquire<S: LeaseStore>(
    store: &S,
    kind: take::StoreKind,
    force: bool,
    replicas: &[take::ReplicaSeen],
    clock: &dyn Clock,
) -> Result<Held, LeaseError> {
    let state = store.current().await?;
    let input = take::TakeInput {
        volume: store.volume(),
        me: store.me(),
        now: clock.now(),
        kind,
        force,
        state: &state,
        replicas,
    };
    match take::decide(&input) {
        take::TakeDecision::Take { how, reason } => {
            let held = store.campaign(&state, &how).await?;
            tracing::info!(volume = store.volume(), holder = %held.holder, epoch = %held.epoch, "lease taken: {reason}");
            Ok(held)
        }
        take::TakeDecision::Wait { refusal, .. } | take::TakeDecision::Refuse(refusal) => Err(refusal),
    }
}

#[cfg(test)]
mod mode_tests {
    #[test]
    fn lease_mode_names_are_the_json_ones() {
        for m in super::LeaseMode::ALL {
            assert_eq!(serde_json::to_value(m).unwrap(), m.as_str());
        }
    }
}
