//! The etcd lease store against a real etcd (Debian's, started by `mirror_tests::etcd` on
//! 127.0.0.1): campaigns, a refused second campaigner, expiry once keep-alives stop, epochs that
//! only grow, a handover, and a handover that completes while a member of a three-member cluster is
//! killed. Real time (2 s TTLs), real processes; etcd is never mocked.

use std::{sync::Arc, time::Duration};

use mirror::lease::{
    acquire,
    etcd::{EtcdConfig, EtcdLeaseStore},
    take::{ReplicaSeen, StoreKind},
    tenure::{Tenure, TenureConfig},
    Clock, Epoch, Held, Holder, LeaseError, LeaseStore, MonotonicClock, ReplicaId,
};
use mirror_tests::env::skip;
use mirror_tests::etcd::{self, Etcd};

const TTL: Duration = Duration::from_secs(2);

type Store = EtcdLeaseStore<MonotonicClock>;

fn etcd_or_skip(test: &str, members: usize) -> Option<Etcd> {
    if etcd::binary().is_none() {
        skip(test, "ETCD", "etcd is not installed (Debian etcd-server; `cargo xtask setup` installs it)");
        return None;
    }
    Some(Etcd::start(members).expect("start etcd"))
}

/// A router's store for volume `vol`, sharing `clock` (one process here, so one clock).
async fn router(e: &Etcd, vol: &str, name: &str, clock: MonotonicClock) -> Store {
    let cfg = EtcdConfig::parse(&e.url()).unwrap();
    EtcdLeaseStore::connect(cfg, vol, Holder::new(name, "1"), TTL, clock).await.expect("connect to etcd")
}

/// Both replicas reachable, with these accepted epochs.
fn replicas(a: u64, b: u64) -> Vec<ReplicaSeen> {
    vec![
        ReplicaSeen { id: ReplicaId("a".into()), uuid: None, accepted: Some(Epoch(a)) },
        ReplicaSeen { id: ReplicaId("b".into()), uuid: None, accepted: Some(Epoch(b)) },
    ]
}

async fn take(s: &Store, clock: &MonotonicClock, seen: &[ReplicaSeen]) -> Result<Held, LeaseError> {
    acquire(s, StoreKind::Etcd, false, seen, clock).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaign_and_a_second_campaigner_refused_naming_the_holder() {
    let Some(e) = etcd_or_skip("campaign_and_a_second_campaigner_refused_naming_the_holder", 1) else {
        return;
    };
    let clock = MonotonicClock::new();
    let (r1, r2) = (router(&e, "vol1", "node1", clock).await, router(&e, "vol1", "node2", clock).await);
    let held = take(&r1, &clock, &replicas(0, 0)).await.expect("the first campaign wins");
    assert_eq!(held.epoch, Epoch(1));
    assert_eq!(held.ttl, TTL, "etcd granted the TTL asked for");
    let err = take(&r2, &clock, &replicas(1, 1)).await.unwrap_err();
    match &err {
        LeaseError::Held { holder, epoch, time_left, .. } => {
            assert_eq!((holder.0.as_str(), *epoch), ("node1/1", Epoch(1)));
            assert!(*time_left <= TTL, "{time_left:?}");
        }
        e => panic!("expected Held, got {e}"),
    }
    assert!(err.to_string().contains("held by node1/1"), "{err}");
    // The holder's record as others read it.
    let st = r2.current().await.unwrap();
    let rec = st.record.expect("a record");
    assert_eq!((rec.holder, rec.epoch, st.last_epoch), (Holder::new("node1", "1"), Epoch(1), Epoch(1)));
    // Another volume is independent.
    let r3 = router(&e, "vol2", "node2", clock).await;
    assert_eq!(take(&r3, &clock, &replicas(0, 0)).await.unwrap().epoch, Epoch(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_after_the_keep_alive_stops_and_the_holder_fenced_itself_first() {
    let Some(e) = etcd_or_skip("expiry_after_the_keep_alive_stops_and_the_holder_fenced_itself_first", 1)
    else {
        return;
    };
    let clock = MonotonicClock::new();
    let (r1, r2) = (router(&e, "vol", "node1", clock).await, router(&e, "vol", "node2", clock).await);
    let held = take(&r1, &clock, &replicas(0, 0)).await.unwrap();
    let cfg = TenureConfig::for_ttl(held.ttl);
    let mut tenure = Tenure::begin(cfg, held.epoch, held.sent_at);
    // Three seconds of renewals: the lease outlives its TTL, r2 is refused throughout.
    let until = clock.now() + Duration::from_secs(3);
    while clock.now() < until {
        tokio::time::sleep(cfg.renew_every).await;
        let sent = clock.now();
        tenure.renew_sent(sent);
        let r = r1.renew(&held).await.expect("keep-alive");
        tenure.renewed(clock.now(), r.sent_at, r.ttl);
        assert!(tenure.check(clock.now()).is_ok());
        assert!(matches!(take(&r2, &clock, &replicas(1, 1)).await, Err(LeaseError::Held { .. })));
    }
    // The keep-alive stops (the holder froze). r2 watches and sees the key go.
    let last_sent = clock.now();
    let seen = r2.current().await.unwrap().record;
    let mut st = r2.wait_change(seen.as_ref(), Duration::from_secs(6)).await.unwrap();
    while st.record.is_some() && clock.now() < last_sent + Duration::from_secs(6) {
        st = r2.wait_change(st.record.as_ref(), Duration::from_secs(6)).await.unwrap();
    }
    assert!(st.record.is_none(), "the key outlived its lease");
    let gone_after = clock.now().checked_sub(last_sent).unwrap();
    let held2 = take(&r2, &clock, &replicas(1, 1)).await.expect("r2 takes the expired lease");
    let taken_at = clock.now();
    eprintln!(
        "lease expired {:.2} s after the last keep-alive (TTL {} s)",
        gone_after.as_secs_f64(),
        TTL.as_secs()
    );
    // etcd kept the lease at least the TTL from the last keep-alive it received (allowing for
    // its 1-second TTL granularity below, never above), and let it go within a second after.
    assert!(gone_after >= cfg.margin.safe_window(TTL), "{gone_after:?}");
    assert!(gone_after <= TTL + Duration::from_millis(1500), "{gone_after:?}");
    assert_eq!(held2.epoch, Epoch(2));
    // The old holder had stopped acknowledging before r2 held the lease.
    assert!(tenure.check(taken_at).is_err(), "the old holder still thought itself active");
    assert!(tenure.time_left(taken_at).is_zero());
    // Its keep-alive now fails: the lease is gone.
    let r = r1.renew(&held).await;
    assert!(matches!(r, Err(LeaseError::Lost { .. })), "renewing an expired lease: {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_epoch_strictly_grows_across_takeovers() {
    let Some(e) = etcd_or_skip("the_epoch_strictly_grows_across_takeovers", 1) else {
        return;
    };
    let clock = MonotonicClock::new();
    let mut last = Epoch(0);
    for i in 0..4 {
        let r = router(&e, "vol", &format!("node{i}"), clock).await;
        let held = take(&r, &clock, &replicas(last.0, last.0)).await.unwrap();
        assert!(held.epoch > last, "{} after {}", held.epoch, last);
        last = held.epoch;
        // Every other holder releases; the rest let the lease run out.
        if i % 2 == 0 {
            r.release(&held).await.unwrap();
        } else {
            let mut st = r.current().await.unwrap();
            while st.record.is_some() {
                st = r.wait_change(st.record.as_ref(), Duration::from_secs(5)).await.unwrap();
            }
        }
    }
    // A replica ahead of etcd (it saw an epoch etcd never issued: an older etcd, or the embedded
    // mode) lifts the counter above itself.
    let r = router(&e, "vol", "node9", clock).await;
    let held = take(&r, &clock, &replicas(last.0, 100)).await.unwrap();
    assert_eq!(held.epoch, Epoch(101));
    assert_eq!(r.current().await.unwrap().last_epoch, Epoch(101));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handover_moves_the_lease_to_the_standby_atomically() {
    let Some(e) = etcd_or_skip("handover_moves_the_lease_to_the_standby_atomically", 1) else {
        return;
    };
    let clock = MonotonicClock::new();
    let (r1, r2, r3) = (
        router(&e, "vol", "node1", clock).await,
        router(&e, "vol", "node2", clock).await,
        router(&e, "vol", "node3", clock).await,
    );
    let held = take(&r1, &clock, &replicas(0, 0)).await.unwrap();
    // No standby announced: refused, and r1 still holds the lease.
    let err = r1.hand_over(&held, r2.me()).await.unwrap_err();
    assert!(matches!(err, LeaseError::Handover { .. }), "{err}");
    r1.renew(&held).await.expect("still ours");
    r2.stand_by().await.unwrap();
    r2.renew_standby().await.unwrap();
    let seen = r2.current().await.unwrap().record;
    let epoch = r1.hand_over(&held, r2.me()).await.expect("handover");
    assert!(epoch > held.epoch);
    // The standby sees itself named, on its own etcd lease.
    let st = r2.wait_change(seen.as_ref(), Duration::from_secs(5)).await.unwrap();
    let rec = st.record.expect("a holder");
    assert_eq!((&rec.holder, rec.epoch), (r2.me(), epoch));
    let held2 =
        take(&r2, &clock, &replicas(held.epoch.0, held.epoch.0)).await.expect("the standby adopts it");
    assert!(held2.epoch > epoch, "{} after {}", held2.epoch, epoch);
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        r2.renew(&held2).await.expect("the standby keeps its session alive");
    }
    // The old holder lost it for good; a third router is refused naming the new one.
    assert!(matches!(r1.renew(&held).await, Err(LeaseError::Lost { .. })));
    match take(&r3, &clock, &replicas(held2.epoch.0, held2.epoch.0)).await {
        Err(LeaseError::Held { holder, .. }) => assert_eq!(&holder, r2.me()),
        other => panic!("{other:?}"),
    }
}

/// Hands the lease over, confirming by reading the store whenever an answer was lost (the rule of
/// `mirror::lease::handover`: an indeterminate outcome is never taken for success or failure).
async fn hand_over_confirmed(
    from: &Store,
    held: &Held,
    to: &Holder,
    limit: Duration,
) -> Result<Epoch, String> {
    let start = std::time::Instant::now();
    let mut log = Vec::new();
    while start.elapsed() < limit {
        match from.hand_over(held, to).await {
            Ok(epoch) => return Ok(epoch),
            Err(e) if e.is_indeterminate() => {
                log.push(format!("{:.2}s: {e}", start.elapsed().as_secs_f64()));
                if let Ok(st) = from.current().await {
                    if let Some(r) = st.record.filter(|r| &r.holder == to) {
                        return Ok(r.epoch);
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(format!("{e}; before: {log:?}")),
        }
    }
    Err(format!("no handover within {limit:?}: {log:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_one_killed_during_a_handover_still_completes_it() {
    let Some(mut e) = etcd_or_skip("three_members_one_killed_during_a_handover_still_completes_it", 3) else {
        return;
    };
    let clock = MonotonicClock::new();
    let r1 = Arc::new(router(&e, "vol", "node1", clock).await);
    let r2 = Arc::new(router(&e, "vol", "node2", clock).await);
    let held = take(&r1, &clock, &replicas(0, 0)).await.unwrap();
    r2.stand_by().await.unwrap();
    // Both keep their etcd leases alive in the background, as serve does.
    let keep = |s: Arc<Store>, standby: bool, held: Option<Held>| {
        tokio::spawn(async move {
            let mut failures = 0u32;
            loop {
                tokio::time::sleep(TTL / 3).await;
                let r = match (&held, standby) {
                    (_, true) => s.renew_standby().await,
                    (Some(h), false) => s.renew(h).await.map(|_| ()),
                    (None, false) => return failures,
                };
                match r {
                    Ok(()) => {}
                    Err(LeaseError::Lost { .. }) => return failures,
                    Err(_) => failures += 1,
                }
            }
        })
    };
    let k1 = keep(r1.clone(), false, Some(held.clone()));
    let k2 = keep(r2.clone(), true, None);
    // Kill the leader, the member whose loss hurts most, and hand over at once: the request meets
    // an election in progress.
    let leader = e.leader().expect("a leader");
    e.kill(leader);
    let start = std::time::Instant::now();
    let epoch = hand_over_confirmed(&r1, &held, r2.me(), Duration::from_secs(15)).await.expect("handover");
    let took = start.elapsed();
    eprintln!("handover with member m{leader} (the leader) killed: {:.2} s", took.as_secs_f64());
    assert!(epoch > held.epoch);
    // The standby holds it and keeps it through the two remaining members.
    let held2 = {
        let mut tries = 0;
        loop {
            match take(&r2, &clock, &replicas(held.epoch.0, held.epoch.0)).await {
                Ok(h) => break h,
                Err(err) if err.is_indeterminate() && tries < 20 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(err) => panic!("the standby could not take the handed lease: {err}"),
            }
        }
    };
    assert!(held2.epoch > epoch);
    k2.abort();
    let mut tenure = Tenure::begin(TenureConfig::for_ttl(held2.ttl), held2.epoch, held2.sent_at);
    for _ in 0..6 {
        tokio::time::sleep(TTL / 3).await;
        let sent = clock.now();
        tenure.renew_sent(sent);
        match r2.renew(&held2).await {
            Ok(r) => tenure.renewed(clock.now(), r.sent_at, r.ttl),
            Err(err) => {
                tenure.renew_failed(clock.now(), sent, &err.to_string());
            }
        }
        assert!(tenure.check(clock.now()).is_ok(), "the new holder lost its lease: {}", tenure.reason());
    }
    let rec = r2.current().await.unwrap().record.expect("held");
    assert_eq!((&rec.holder, rec.epoch), (r2.me(), held2.epoch));
    // The old holder's keep-alive ended with the lease lost.
    let failures =
        tokio::time::timeout(Duration::from_secs(5), k1).await.expect("r1's keep-alive ends").unwrap();
    eprintln!("r1's keep-alive: {failures} unanswered renewals during the election");
}
