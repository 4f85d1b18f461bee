//! May this router take the volume's lease now, and with which epoch? Pure: the caller reads the
//! store and the replicas, passes what it saw and `now`, and gets a [`TakeDecision`].
//!
//! A router may take the lease when
//! - nobody holds it, or the holder's lease has expired, or the holder handed it to this router;
//! - and it reaches both replicas; or it reaches one and
//!   - embedded mode: the operator said `--force` (with two nodes and no third party, a router that
//!     cannot see the other replica cannot tell a dead peer router from a partitioned one, so it
//!     never decides that alone);
//!   - etcd mode: the store holds no mark, or marks the one it reaches (by its metadata uuid) as
//!     the one that holds every acknowledged write ([`may_go_alone`]), or `--force`. etcd is the
//!     third party: a holder acknowledges no write with one replica only before it recorded in
//!     etcd which one that is ([`super::LeaseStore::mark_current`]), so no mark means both replicas
//!     hold every acknowledged write. The mark names the replica that *has* the writes, not the
//!     one that misses them: a holder writing alone may never have known the other's uuid (it
//!     took over while that one was unreachable).
//!
//! A live lease of another holder is never overridden, not even with `--force`: live means the
//! holder renewed it within the TTL, so it is not gone. Its expiry is the wait.
//!
//! The epoch taken is strictly greater than every epoch seen: the store's last issued one and the
//! accepted epoch of every replica that answered ([`next_epoch`]). With etcd the counter in etcd
//! issues it (compare-and-set), raised above the replicas' if one of them is ahead (a replica may
//! have seen an epoch from an earlier etcd or from the embedded mode).

use std::time::Duration;

use super::{CurrentMark, Epoch, Holder, LeaseError, LeaseState, ReplicaId, ReplicaUuid, Takeover};

/// Which store decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Embedded,
    Etcd,
}

/// What a router saw of one replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaSeen {
    /// How this router names it (messages).
    pub id: ReplicaId,
    /// Its metadata uuid, when known (every router knows it of a replica it reached).
    pub uuid: Option<ReplicaUuid>,
    /// The replica's accepted epoch, None when it did not answer.
    pub accepted: Option<Epoch>,
}

/// Everything the take decision depends on.
#[derive(Debug, Clone)]
pub struct TakeInput<'a> {
    pub volume: &'a str,
    pub me: &'a Holder,
    pub now: Duration,
    pub kind: StoreKind,
    pub force: bool,
    pub state: &'a LeaseState,
    pub replicas: &'a [ReplicaSeen],
}

/// The decision.
#[derive(Debug)]
pub enum TakeDecision {
    /// Take it: campaign with `how`.
    Take { how: Takeover, reason: String },
    /// Wait for the live lease to expire (or to be handed over); the error names the holder.
    Wait { until: Duration, refusal: LeaseError },
    /// Not without the operator (or not at all).
    Refuse(LeaseError),
}

/// The smallest epoch above all that were seen.
pub fn next_epoch(seen: impl IntoIterator<Item = Epoch>) -> Epoch {
    seen.into_iter().max().unwrap_or_default().next()
}

/// May a router go on with replica `kept` alone (`kept_uuid`: its metadata uuid), given the
/// store's `mark`? Yes when there is no mark (both hold every acknowledged write), or the mark says
/// `kept` alone does; otherwise the refusal names the mark.
pub fn may_go_alone(
    volume: &str,
    kept: &ReplicaId,
    kept_uuid: Option<ReplicaUuid>,
    mark: Option<CurrentMark>,
) -> Result<(), LeaseError> {
    match mark {
        None => Ok(()),
        Some(CurrentMark::Only(u)) if Some(u) == kept_uuid => Ok(()),
        Some(mark) => Err(LeaseError::NotCurrent { volume: volume.into(), kept: kept.clone(), mark }),
    }
}

/// Decides whether `me` may take the lease now.
pub fn decide(i: &TakeInput<'_>) -> TakeDecision {
    let volume = i.volume.to_string();
    let handed_to_me =
        i.state.record.as_ref().is_some_and(|r| {
            r.handed_to.as_ref() == Some(i.me) || (r.holder == *i.me && r.handed_to.is_none())
        });
    if let Some(r) = i.state.record.as_ref().filter(|r| r.live(i.now) && !handed_to_me) {
        let holder = r.handed_to.clone().unwrap_or_else(|| r.holder.clone());
        return TakeDecision::Wait {
            until: r.expires_at,
            refusal: LeaseError::Held { volume, holder, epoch: r.epoch, time_left: r.time_left(i.now) },
        };
    }
    let reachable: Vec<&ReplicaSeen> = i.replicas.iter().filter(|r| r.accepted.is_some()).collect();
    let missing: Vec<&ReplicaSeen> = i.replicas.iter().filter(|r| r.accepted.is_none()).collect();
    let epoch = next_epoch(
        reachable
            .iter()
            .filter_map(|r| r.accepted)
            .chain([i.state.last_epoch])
            .chain(i.state.record.as_ref().map(|r| r.epoch)),
    );
    let why = if handed_to_me {
        "handed over to this router".to_string()
    } else if i.state.record.is_some() {
        "the holder's lease expired".to_string()
    } else {
        "nobody holds the lease".to_string()
    };
    match (reachable.len(), missing.as_slice()) {
        (0, _) => TakeDecision::Refuse(LeaseError::NoReplica { volume }),
        (_, []) => TakeDecision::Take {
            how: Takeover { epoch, without: None },
            reason: format!("{why}; both replicas reachable; epoch {epoch}"),
        },
        (_, [gone]) => {
            let kept = reachable[0];
            if !i.force {
                let verdict = match i.kind {
                    StoreKind::Embedded => {
                        Err(LeaseError::NeedForce { volume: volume.clone(), unreachable: gone.id.clone() })
                    }
                    StoreKind::Etcd => may_go_alone(&volume, &kept.id, kept.uuid, i.state.current),
                };
                if let Err(refusal) = verdict {
                    return TakeDecision::Refuse(refusal);
                }
            }
            let how = if i.force { "forced by the operator" } else { "etcd decided" };
            TakeDecision::Take {
                how: Takeover { epoch, without: Some(gone.id.clone()) },
                reason: format!(
                    "{why}; replica {} unreachable, taking it alone ({how}); epoch {epoch}",
                    gone.id
                ),
            }
        }
        _ => TakeDecision::Refuse(LeaseError::NoReplica { volume }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::LeaseRecord;

    const TTL: Duration = Duration::from_secs(2);

    fn s(x: f64) -> Duration {
        Duration::from_secs_f64(x)
    }

    fn me() -> Holder {
        Holder("b/1".into())
    }

    fn record(holder: &str, epoch: u64, expires_at: f64, handed_to: Option<&str>) -> LeaseRecord {
        LeaseRecord {
            volume: "v".into(),
            holder: Holder(holder.into()),
            epoch: Epoch(epoch),
            ttl: TTL,
            expires_at: s(expires_at),
            handed_to: handed_to.map(|h| Holder(h.into())),
        }
    }

    const UA: ReplicaUuid = ReplicaUuid([0xa; 16]);
    const UB: ReplicaUuid = ReplicaUuid([0xb; 16]);

    /// Replicas `a` and `b` with their epochs (None: unreachable). The uuid of an unreachable one
    /// is unknown, as for a router that never reached it.
    fn seen(a: Option<u64>, b: Option<u64>) -> Vec<ReplicaSeen> {
        vec![
            ReplicaSeen { id: ReplicaId("a".into()), uuid: a.map(|_| UA), accepted: a.map(Epoch) },
            ReplicaSeen { id: ReplicaId("b".into()), uuid: b.map(|_| UB), accepted: b.map(Epoch) },
        ]
    }

    fn run(
        kind: StoreKind,
        force: bool,
        state: &LeaseState,
        replicas: &[ReplicaSeen],
        now: f64,
    ) -> TakeDecision {
        decide(&TakeInput { volume: "v", me: &me(), now: s(now), kind, force, state, replicas })
    }

    #[test]
    fn a_live_lease_of_another_is_waited_for_even_with_force() {
        let state = LeaseState {
            record: Some(record("a/1", 4, 11.5, None)),
            last_epoch: Epoch(4),
            ..Default::default()
        };
        for (kind, force) in
            [(StoreKind::Embedded, false), (StoreKind::Embedded, true), (StoreKind::Etcd, true)]
        {
            match run(kind, force, &state, &seen(Some(4), Some(4)), 10.0) {
                TakeDecision::Wait { until, refusal: LeaseError::Held { holder, epoch, time_left, .. } } => {
                    assert_eq!(
                        (until, holder.0.as_str(), epoch, time_left),
                        (s(11.5), "a/1", Epoch(4), s(1.5))
                    );
                }
                d => panic!("{kind:?} force {force}: {d:?}"),
            }
        }
        // The message names the holder and the time left.
        let TakeDecision::Wait { refusal, .. } =
            run(StoreKind::Etcd, false, &state, &seen(Some(4), Some(4)), 10.0)
        else {
            panic!()
        };
        assert_eq!(refusal.to_string(), "volume v: the lease is held by a/1 (epoch 4) and expires in 1.5 s");
    }

    #[test]
    fn expired_or_free_with_both_replicas_is_taken_above_every_epoch_seen() {
        let expired = LeaseState {
            record: Some(record("a/1", 4, 9.0, None)),
            last_epoch: Epoch(4),
            ..Default::default()
        };
        match run(StoreKind::Embedded, false, &expired, &seen(Some(4), Some(6)), 10.0) {
            TakeDecision::Take { how, reason } => {
                assert_eq!(how, Takeover { epoch: Epoch(7), without: None });
                assert!(reason.contains("expired"), "{reason}");
            }
            d => panic!("{d:?}"),
        }
        // etcd's counter ahead of the replicas: above it.
        let free = LeaseState { last_epoch: Epoch(40), ..Default::default() };
        let TakeDecision::Take { how, .. } = run(StoreKind::Etcd, false, &free, &seen(Some(4), Some(4)), 0.0)
        else {
            panic!()
        };
        assert_eq!(how.epoch, Epoch(41));
        assert_eq!(next_epoch([]), Epoch(1));
    }

    #[test]
    fn handed_over_is_taken_before_expiry_and_others_wait_naming_the_successor() {
        let handed = LeaseState {
            record: Some(record("a/1", 4, 11.0, Some("b/1"))),
            last_epoch: Epoch(4),
            ..Default::default()
        };
        let TakeDecision::Take { how, reason } =
            run(StoreKind::Embedded, false, &handed, &seen(Some(4), Some(4)), 10.0)
        else {
            panic!()
        };
        assert_eq!(how.epoch, Epoch(5));
        assert!(reason.contains("handed over"));
        let other = Holder("c/1".into());
        let d = decide(&TakeInput {
            volume: "v",
            me: &other,
            now: s(10.0),
            kind: StoreKind::Embedded,
            force: false,
            state: &handed,
            replicas: &seen(Some(4), Some(4)),
        });
        assert!(
            matches!(d, TakeDecision::Wait { refusal: LeaseError::Held { ref holder, .. }, .. } if holder.0 == "b/1"),
            "{d:?}"
        );
        // etcd moves the key to the successor: the record names me as holder.
        let moved = LeaseState {
            record: Some(record("b/1", 5, 12.0, None)),
            last_epoch: Epoch(5),
            ..Default::default()
        };
        let TakeDecision::Take { how, .. } =
            run(StoreKind::Etcd, false, &moved, &seen(Some(4), Some(4)), 10.0)
        else {
            panic!()
        };
        assert_eq!(
            how.epoch,
            Epoch(6),
            "above the handover's epoch: the store keeps the one it gave if greater"
        );
    }

    #[test]
    fn one_replica_unreachable_embedded_needs_force() {
        let free = LeaseState::default();
        match run(StoreKind::Embedded, false, &free, &seen(Some(2), None), 0.0) {
            TakeDecision::Refuse(LeaseError::NeedForce { unreachable, .. }) => assert_eq!(unreachable.0, "b"),
            d => panic!("{d:?}"),
        }
        let TakeDecision::Take { how, reason } =
            run(StoreKind::Embedded, true, &free, &seen(Some(2), None), 0.0)
        else {
            panic!()
        };
        assert_eq!(how, Takeover { epoch: Epoch(3), without: Some(ReplicaId("b".into())) });
        assert!(reason.contains("forced"), "{reason}");
    }

    #[test]
    fn one_replica_unreachable_etcd_takes_without_a_mark_or_when_the_kept_one_is_marked_current() {
        let free = LeaseState { last_epoch: Epoch(9), ..Default::default() };
        // No mark: both replicas hold every acknowledged write; etcd decides.
        let TakeDecision::Take { how, reason } =
            run(StoreKind::Etcd, false, &free, &seen(None, Some(9)), 0.0)
        else {
            panic!()
        };
        assert_eq!(how, Takeover { epoch: Epoch(10), without: Some(ReplicaId("a".into())) });
        assert!(reason.contains("etcd decided"), "{reason}");
        // The holder wrote with `a` alone (marked by uuid): `b` alone is refused, naming the mark.
        let a_current = LeaseState { current: Some(CurrentMark::Only(UA)), ..free.clone() };
        match run(StoreKind::Etcd, false, &a_current, &seen(None, Some(9)), 0.0) {
            TakeDecision::Refuse(e @ LeaseError::NotCurrent { .. }) => {
                let LeaseError::NotCurrent { ref kept, mark, .. } = e else { unreachable!() };
                assert_eq!((kept.0.as_str(), mark), ("b", CurrentMark::Only(UA)));
                let m = e.to_string();
                assert!(m.contains(&UA.to_string()) && m.contains("--force"), "{m}");
            }
            d => panic!("{d:?}"),
        }
        // ... unless forced; and `a` alone is taken (it has every acknowledged write).
        assert!(matches!(
            run(StoreKind::Etcd, true, &a_current, &seen(None, Some(9)), 0.0),
            TakeDecision::Take { .. }
        ));
        assert!(matches!(
            run(StoreKind::Etcd, false, &a_current, &seen(Some(9), None), 0.0),
            TakeDecision::Take { how: Takeover { without: Some(ReplicaId(ref g)), .. }, .. } if g == "b"
        ));
        // Both reachable: the mark does not matter (the metadata decides the resync).
        assert!(matches!(
            run(StoreKind::Etcd, false, &a_current, &seen(Some(9), Some(9)), 0.0),
            TakeDecision::Take { how: Takeover { without: None, .. }, .. }
        ));
        // Written to a replica being resynced: neither alone will do.
        let neither = LeaseState { current: Some(CurrentMark::Neither), ..free.clone() };
        for one in [seen(None, Some(9)), seen(Some(9), None)] {
            assert!(matches!(
                run(StoreKind::Etcd, false, &neither, &one, 0.0),
                TakeDecision::Refuse(LeaseError::NotCurrent { mark: CurrentMark::Neither, .. })
            ));
        }
        // A kept replica whose uuid this router does not know cannot match a mark.
        let unknown = [
            ReplicaSeen { id: ReplicaId("a".into()), uuid: None, accepted: Some(Epoch(9)) },
            ReplicaSeen { id: ReplicaId("b".into()), uuid: None, accepted: None },
        ];
        assert!(matches!(
            run(StoreKind::Etcd, false, &a_current, &unknown, 0.0),
            TakeDecision::Refuse(LeaseError::NotCurrent { .. })
        ));
        // The embedded mode keeps no marks and still needs --force.
        assert!(matches!(
            run(StoreKind::Embedded, false, &free, &seen(None, Some(9)), 0.0),
            TakeDecision::Refuse(LeaseError::NeedForce { .. })
        ));
    }

    #[test]
    fn marks_are_by_uuid_and_serialise_as_hex() {
        let m = CurrentMark::Only(ReplicaUuid([0x01, 0xab, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff]));
        let v = serde_json::to_value(m).unwrap();
        assert_eq!(v, serde_json::json!({"only": format!("01ab{}ff", "0".repeat(26))}));
        assert_eq!(serde_json::from_value::<CurrentMark>(v).unwrap(), m);
        assert_eq!(serde_json::to_value(CurrentMark::Neither).unwrap(), "neither");
    }

    #[test]
    fn no_replica_no_lease() {
        for force in [false, true] {
            let d = run(StoreKind::Etcd, force, &LeaseState::default(), &seen(None, None), 0.0);
            assert!(matches!(d, TakeDecision::Refuse(LeaseError::NoReplica { .. })), "{d:?}");
        }
    }
}
