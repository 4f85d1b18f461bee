//! The router over two real replica servers (processes on loopback): weighted reads, dual
//! writes, a replica killed under load, automatic resync and return to service.

use std::{sync::Arc, time::Duration};

use mirror::{
    replication::auth::load_secret,
    volume::{
        remote::RemotePool,
        remote::RemoteReplica,
        replica::{Location, Replica, ReplicaState},
        router::{Router, RouterConfig, Weights},
        BlockDev,
    },
};
use mirror_tests::{
    fs::{file_digest, random_bytes, secret_file, TempDir},
    proc::{sync_ok, Replica as Proc},
};

const MIB: u64 = 1 << 20;

async fn remote(role: &'static str, p: &Proc, secret: &[u8]) -> Replica {
    let (pool, _) = RemotePool::connect(&p.addr, "v", secret, 4).await.expect("connect replica");
    let loc = Location::Remote(RemoteReplica::new(&p.addr, "v", secret, 4, Some(pool)));
    Replica::new(role, loc, 4096)
}

struct Setup {
    dir: TempDir,
    s: Proc,
    t: Proc,
    router: Arc<Router>,
}

async fn setup(tag: &str, size: u64, target_weight: u8) -> Setup {
    let dir = TempDir::new(tag);
    let secret_path = secret_file(&dir.0);
    let data = random_bytes(size as usize, 77);
    std::fs::write(dir.0.join("s.img"), &data).unwrap();
    std::fs::write(dir.0.join("t.img"), &data).unwrap();
    let s = Proc::start(&dir.0.join("s.img"), &secret_path, None, &[]);
    let t = Proc::start(&dir.0.join("t.img"), &secret_path, None, &[]);
    // Identical content: the first sync establishes the shared generation without moving data.
    sync_ok(&s.addr, &t.addr, &secret_path, &[]);
    let secret = load_secret(&secret_path).unwrap();
    let cfg = RouterConfig {
        secret: secret.clone(),
        supervise_every: Duration::from_millis(100),
        ..Default::default()
    };
    let router = Router::new(
        remote("source", &s, &secret).await,
        remote("target", &t, &secret).await,
        size,
        Weights::new(target_weight),
        cfg,
    );
    router.spawn_supervisor();
    Setup { dir, s, t, router }
}

fn reads(r: &Router, i: usize) -> u64 {
    r.replicas[i].stats.reads.load(std::sync::atomic::Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_follow_the_weights() {
    let su = setup("router-weights", 16 * MIB, 30).await;
    let r = &su.router;
    let n = 4000u64;
    for i in 0..n {
        r.read((i * 4096) % (16 * MIB), 4096).await.unwrap();
    }
    let t = reads(r, 1);
    // Each read is counted on the replica that served it, and a hedged read on both.
    let hedges = r.status().hedges.sent;
    assert_eq!(reads(r, 0) + t, n + hedges, "{hedges} hedges");
    assert!(hedges <= n / 20, "{hedges} hedges: above the 5% budget");
    // Binomial(4000, 0.3): mean 1200, sd 29; 5 sd is 145.
    assert!((1055..=1345).contains(&t), "target got {t} of {n} reads at weight 30");
    r.weights.set_target(0);
    let before = reads(r, 1);
    for i in 0..500u64 {
        r.read(i * 4096, 4096).await.unwrap();
    }
    assert_eq!(reads(r, 1), before, "weight 0: no read to the target");
    r.weights.set_target(100);
    let before = reads(r, 0);
    for i in 0..500u64 {
        r.read(i * 4096, 4096).await.unwrap();
    }
    assert_eq!(reads(r, 0), before, "weight 100: no read to the source");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_reach_both_replicas() {
    let su = setup("router-writes", 16 * MIB, 50).await;
    for i in 0..200u64 {
        let off = (i * 7919 % 4096) * 4096;
        su.router.write(off, random_bytes(4096, i), i % 10 == 0).await.unwrap();
    }
    su.router.write_zeroes(MIB, 64 * 1024).await.unwrap();
    su.router.flush().await.unwrap();
    assert_eq!(file_digest(&su.dir.0.join("s.img")), file_digest(&su.dir.0.join("t.img")));
    assert_eq!(su.router.read(MIB, 4096).await.unwrap(), vec![0u8; 4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_costs_no_error_and_comes_back_resynced() {
    let mut su = setup("router-kill", 32 * MIB, 50).await;
    let router = su.router.clone();
    // A verifying workload: write a block, read it back, compare; all through the router.
    let worker = tokio::spawn(async move {
        let mut errors = 0u64;
        let mut ops = 0u64;
        let mut model = std::collections::HashMap::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(6);
        let mut i = 0u64;
        while tokio::time::Instant::now() < deadline {
            let off = (i * 104_729 % 8192) * 4096;
            let data = random_bytes(4096, 1_000_000 + i);
            if router.write(off, data.clone(), false).await.is_err() {
                errors += 1;
            }
            model.insert(off, data);
            let check = (i * 31 % 8192) * 4096;
            match router.read(check, 4096).await {
                Ok(d) => {
                    if let Some(m) = model.get(&check) {
                        assert_eq!(&d, m, "read back what was acknowledged at {check}");
                    }
                }
                Err(_) => errors += 1,
            }
            ops += 2;
            i += 1;
        }
        (ops, errors)
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    su.t.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_ne!(su.router.replicas[1].state(), ReplicaState::InSync, "the router noticed the dead target");
    su.t.restart();
    let (ops, errors) = worker.await.unwrap();
    assert_eq!(errors, 0, "the application saw errors ({errors} of {ops} operations)");
    // The supervisor reconnects, the source resyncs the target, the target returns to service.
    let mut waited = 0;
    while su.router.replicas[1].state() != ReplicaState::InSync {
        assert!(waited < 300, "target not back in service: {:?}", su.router.status());
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += 1;
    }
    su.router.flush().await.unwrap();
    let (a, b) =
        (std::fs::read(su.dir.0.join("s.img")).unwrap(), std::fs::read(su.dir.0.join("t.img")).unwrap());
    let differing: Vec<usize> =
        (0..a.len() / 4096).filter(|i| a[i * 4096..(i + 1) * 4096] != b[i * 4096..(i + 1) * 4096]).collect();
    assert!(
        differing.is_empty(),
        "blocks differ: {:?} (of {}); router {:?}; source {:?}",
        &differing[..differing.len().min(20)],
        differing.len(),
        su.router.status(),
        su.router.replicas[0].status().await.unwrap()
    );
    let _ = &su.s;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_retry_on_the_other_replica_when_one_dies() {
    let mut su = setup("router-retry", 8 * MIB, 0).await;
    su.router.read(0, 4096).await.unwrap();
    su.s.kill();
    for i in 0..50u64 {
        su.router.read(i * 4096, 4096).await.expect("read served by the target");
    }
    assert!(reads(&su.router, 1) >= 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_io_uring_replica_with_a_remote_peer_fails_over_and_resyncs() {
    use mirror::volume::open::{open, ReplicaSpec, VolumeConfig};
    let dir = TempDir::new("router-local");
    let secret_path = secret_file(&dir.0);
    let size = 16 * MIB;
    let data = random_bytes(size as usize, 99);
    std::fs::write(dir.0.join("s.img"), &data).unwrap();
    std::fs::write(dir.0.join("t.img"), &data).unwrap();
    let mut t = Proc::start(&dir.0.join("t.img"), &secret_path, None, &[]);
    let secret = load_secret(&secret_path).unwrap();
    let cfg = VolumeConfig {
        name: "v".into(),
        source: ReplicaSpec::Local { path: dir.0.join("s.img"), size: None },
        target: ReplicaSpec::Remote { addr: t.addr.clone() },
        secret,
        local_listen: ["127.0.0.1:0".into(), "127.0.0.1:0".into()],
        target_weight: 50,
        conns: 2,
        rate: Default::default(),
        write_deadline: Default::default(),
        al_extents: mirror::volume::activity::DEFAULT_AL_EXTENTS,
        node_health: mirror::health::monitor::NodeHealth::new(),
        allow_degraded: false,
        // Both files hold the same bytes; their fresh metadata was never synced.
        assume_clean: true,
        lease: None,
        transport: Default::default(),
    };
    let vol = open(&cfg).await.expect("open volume");
    let r = vol.router.clone();
    assert_eq!(r.replicas[0].snapshot().io, "io_uring");
    // Aligned (direct) and unaligned (buffered) writes through the router.
    for i in 0..64u64 {
        r.write(i * 8192, random_bytes(4096, i), false).await.unwrap();
        r.write(i * 8192 + 4096 + 17, random_bytes(100, 1000 + i), false).await.unwrap();
    }
    r.flush().await.unwrap();
    assert_eq!(file_digest(&dir.0.join("s.img")), file_digest(&dir.0.join("t.img")));
    // The remote dies: writes keep succeeding on the local replica, which records them.
    t.kill();
    for i in 0..64u64 {
        r.write(MIB + i * 4096, random_bytes(4096, 5000 + i), false).await.expect("degraded write");
        assert_eq!(r.read(MIB + i * 4096, 4096).await.unwrap(), random_bytes(4096, 5000 + i));
    }
    t.restart();
    let mut waited = 0;
    while r.replicas[1].state() != ReplicaState::InSync {
        assert!(waited < 300, "target not back: {:?}", r.status());
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += 1;
    }
    r.flush().await.unwrap();
    assert_eq!(file_digest(&dir.0.join("s.img")), file_digest(&dir.0.join("t.img")));
}
