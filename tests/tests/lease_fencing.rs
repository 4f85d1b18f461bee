//! Fencing and the embedded lease with real processes: two `mirror replica` servers and the
//! routers (`mirror serve`) that share them. A replica refuses the writes of a connection whose
//! epoch a newer holder has passed (the protocol's `FENCED`, errno `ESTALE`); a second router
//! against a live lease is refused, naming the holder; a router whose lease is taken while it is
//! frozen (SIGSTOP past the TTL) is fenced when it wakes, none of its writes lands afterwards
//! (checked by digest on both replica files) and it stops. Fencing works the same over the TLS link.

use std::{
    fs::File,
    os::unix::fs::FileExt,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use mirror::replication::{
    client::{Client, ClientError},
    protocol::{code, Message},
};
use mirror_tests::{
    env::{mirror_bin, skip, which},
    etcd::{self, Etcd},
    fs::{secret_file, TempDir},
    handover::Pair,
    nbd::{landed, lost, lost_through, NbdClient, Writer, WriterLog, WriterOpts, BLOCK},
    proc::{drain, spawn_until, Kill, Replica},
};

const MIB: u64 = 1 << 20;

fn replicas(dir: &Path) -> (Replica, Replica) {
    let secret = dir.join("secret");
    for f in ["s.img", "t.img"] {
        std::fs::write(dir.join(f), vec![0u8; (16 * MIB) as usize]).unwrap();
    }
    let s = Replica::start(&dir.join("s.img"), &secret, None, &[]);
    let t = Replica::start(&dir.join("t.img"), &secret, None, &[]);
    (s, t)
}

/// `mirror serve` over the two remote replicas as `node`, with `extra` flags (the lease store,
/// `--standby`), its log in `DIR/NODE.log`.
fn serve_with(dir: &Path, s: &Replica, t: &Replica, node: &str, ttl: &str, extra: &[&str]) -> Command {
    let mut c = serve_synced(dir, s, t, node, ttl, extra);
    c.arg("--assume-clean");
    c
}

/// As [`serve_with`], without `--assume-clean`: the first router syncs the fresh replicas (so
/// both carry a consistent generation, as replicas that may serve alone must).
fn serve_synced(dir: &Path, s: &Replica, t: &Replica, node: &str, ttl: &str, extra: &[&str]) -> Command {
    let mut c = Command::new(mirror_bin());
    c.args(["serve"]).args(extra);
    c.args(["--volume", "v", "--source", &format!("remote:{}", s.addr)])
        .args(["--target", &format!("remote:{}", t.addr)])
        .args(["--secret-file", &dir.join("secret").display().to_string()])
        .args(["--lease-holder", node, "--lease-ttl", ttl])
        .args(["--ctl-socket", &dir.join(format!("{node}.sock")).display().to_string()])
        .args(["--nbd", "127.0.0.1:0"])
        .env("RUST_LOG", "info")
        .stderr(File::create(dir.join(format!("{node}.log"))).unwrap());
    c
}

/// Spawns `cmd` and waits for its `nbd listening on` line.
fn started(dir: &Path, node: &str, cmd: &mut Command) -> (Kill, String) {
    let (child, nbd, out) =
        spawn_until(cmd, "nbd listening on ").unwrap_or_else(|e| panic!("{e:#}: {}", log(dir, node)));
    drain(out);
    (Kill(child), nbd)
}

fn log(dir: &Path, node: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{node}.log"))).unwrap_or_default()
}

fn qemu_io(nbd: &str, cmds: &[String]) -> std::process::Output {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", &format!("nbd://{nbd}/")]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.output().expect("qemu-io")
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill").args([sig, &pid.to_string()]).status().is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {pid}");
}

fn region(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    File::open(path).unwrap().read_exact_at(&mut b, offset).unwrap();
    b
}

fn ctl_status(dir: &Path, node: &str) -> serde_json::Value {
    let out = Command::new(mirror_bin())
        .args([
            "ctl",
            "--socket",
            &dir.join(format!("{node}.sock")).display().to_string(),
            "status",
            "--json",
        ])
        .output()
        .expect("mirror ctl");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "ctl status --json: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The protocol alone, against a real replica process: a connection attached at epoch 1 is
/// refused with `FENCED` (errno `ESTALE`) once another holder claimed epoch 2, for every
/// mutating request, and a new attach at 1 is refused at once; reads still pass; the epoch
/// survives a restart of the replica.
#[test]
fn a_replica_fences_the_connections_of_an_older_epoch_and_remembers_across_a_restart() {
    let dir = TempDir::new("lease-fence-proto");
    let secret = secret_file(&dir.0);
    let key = mirror::replication::auth::load_secret(&secret).unwrap();
    std::fs::write(dir.0.join("r.img"), vec![0u8; MIB as usize]).unwrap();
    let mut r = Replica::start(&dir.0.join("r.img"), &secret, None, &[]);
    let claim = |c: &mut Client, who: &str, epoch: u64| {
        c.call(&Message::LeaseClaim { holder: who.into(), epoch, ttl_ms: 1000, coordinated: 1 })
    };
    let mut old = Client::connect(&r.addr, "v", &key).unwrap();
    assert!(matches!(claim(&mut old, "a/1", 1).unwrap(), Message::Json(_)));
    old.attach("a/1", 1).unwrap();
    old.write(0, vec![0xaa; 4096]).unwrap();
    let mut new = Client::connect(&r.addr, "v", &key).unwrap();
    claim(&mut new, "b/1", 2).unwrap();
    new.attach("b/1", 2).unwrap();
    new.write(4096, vec![0xbb; 4096]).unwrap();
    let fenced = |e: ClientError| match e {
        ClientError::Remote { code: c, errno, message, .. } => {
            assert_eq!((c, errno), (code::FENCED, libc::ESTALE as u32), "{message}");
            assert!(message.contains("fenced") && message.contains('2'), "{message}");
        }
        e => panic!("not fenced: {e}"),
    };
    for m in [
        Message::Write { offset: 0, data: vec![0xcc; 4096] },
        Message::Flush,
        Message::WriteZeroes { offset: 0, len: 4096 },
        Message::Trim { offset: 0, len: 4096 },
        Message::MarkDirty { offset: 0, len: 4096 },
        Message::MarkIntent { offset: 0, len: 4096 },
        Message::SyncBegin { source_gen: 1 },
    ] {
        fenced(old.call(&m).unwrap_err());
    }
    assert_eq!(old.read(0, 4096).unwrap(), vec![0xaa; 4096], "reads are not fenced; no stale write landed");
    let mut again = Client::connect(&r.addr, "v", &key).unwrap();
    fenced(again.attach("a/1", 1).unwrap_err());
    // An older claim is refused with the lease's own code, its data in JSON.
    match claim(&mut again, "a/1", 2).unwrap_err() {
        ClientError::Remote { code: c, message, .. } => {
            assert_eq!(c, code::LEASE);
            assert!(message.contains("Stale"), "{message}");
        }
        e => panic!("{e}"),
    }
    drop((old, new, again));
    r.kill();
    r.restart();
    let mut after = Client::connect(&r.addr, "v", &key).unwrap();
    fenced(after.attach("a/1", 1).unwrap_err());
    let mut after = Client::connect(&r.addr, "v", &key).unwrap();
    after.attach("b/1", 2).unwrap();
    after.write(8192, vec![0xdd; 4096]).unwrap();
}

/// A second `mirror serve` against a live lease is refused, naming the holder and when the lease
/// expires; the first keeps serving and shows its lease in `ctl status --json`.
#[test]
fn a_second_router_against_a_live_lease_is_refused_naming_the_holder() {
    const T: &str = "lease_fencing::a_second_router_against_a_live_lease_is_refused_naming_the_holder";
    if which("qemu-io").is_none() {
        return skip(T, "NBD", "qemu-io is not installed (cargo xtask setup)");
    }
    second_router_refused("lease-second", &[], "embedded");
}

/// The second-router scenario with `store` flags for both routers; `kind` the store's name.
fn second_router_refused(tag: &str, store: &[&str], kind: &str) {
    let dir = TempDir::new(tag);
    secret_file(&dir.0);
    let (s, t) = replicas(&dir.0);
    let (_a, nbd) = started(&dir.0, "nodeA", &mut serve_with(&dir.0, &s, &t, "nodeA", "2s", store));
    let t0 = Instant::now();
    let out = serve_with(&dir.0, &s, &t, "nodeB", "2s", store).stdout(Stdio::null()).output().unwrap();
    let err = log(&dir.0, "nodeB");
    assert!(!out.status.success(), "the second router started: {err}");
    assert!(err.contains("the lease is held by nodeA/") && err.contains("expires in"), "{err}");
    println!(
        "second router refused after {:.2} s: {}",
        t0.elapsed().as_secs_f64(),
        err.lines().find(|l| l.contains("held by")).unwrap_or("")
    );
    let w = qemu_io(&nbd, &["write -P 0x5a 0 64k".into()]);
    assert!(w.status.success(), "the first router still serves: {}", String::from_utf8_lossy(&w.stderr));
    let st = ctl_status(&dir.0, "nodeA");
    let lease = &st["lease"];
    assert_eq!(lease["mode"], "active", "{st}");
    assert_eq!(lease["store"], kind);
    assert!(lease["holder"].as_str().unwrap().starts_with("nodeA/"), "{lease}");
    assert!(lease["epoch"].as_u64().unwrap() >= 1 && lease["time_left_ms"].as_u64().unwrap() > 0, "{lease}");
}

/// The active router frozen past its TTL; a second router takes the lease (a higher epoch on
/// both replicas) and writes a pattern over the region the first one keeps writing. The first
/// resumed: fenced, it exits non-zero saying why, and the pattern is intact on both replicas.
#[test]
fn a_frozen_router_whose_lease_was_taken_is_fenced_and_none_of_its_writes_land() {
    const T: &str =
        "lease_fencing::a_frozen_router_whose_lease_was_taken_is_fenced_and_none_of_its_writes_land";
    if which("qemu-io").is_none() {
        return skip(T, "NBD", "qemu-io is not installed (cargo xtask setup)");
    }
    frozen_router_fenced("lease-frozen", &[], "1s");
}

/// The frozen-router scenario with `extra` flags for both routers (the lease store) and B's own
/// (`--standby` in etcd mode: B waits announced before A is frozen, and takes over by itself).
fn frozen_router_fenced(tag: &str, store: &[&str], ttl: &str) {
    frozen_router_fenced_with(tag, store, &[], ttl);
}

fn frozen_router_fenced_with(tag: &str, store: &[&str], b_extra: &[&str], ttl: &str) {
    let dir = TempDir::new(tag);
    secret_file(&dir.0);
    let (s, t) = replicas(&dir.0);
    let (mut a, nbd_a) = started(&dir.0, "nodeA", &mut serve_with(&dir.0, &s, &t, "nodeA", ttl, store));
    // A standby starts now and waits (it prints nothing until it takes over).
    let b_args: Vec<&str> = store.iter().chain(b_extra).copied().collect();
    let standby = (!b_extra.is_empty()).then(|| {
        let mut c = serve_with(&dir.0, &s, &t, "nodeB", ttl, &b_args);
        c.stdout(Stdio::piped());
        Kill(c.spawn().unwrap())
    });
    let ok = qemu_io(&nbd_a, &["write -P 0x11 0 1M".into()]);
    assert!(ok.status.success());
    // A keeps writing 0xcc over [2M, 4M) while it is frozen and resumed.
    let cmds: Vec<String> = (0..40)
        .flat_map(|_| (0..32u64).map(|k| format!("write -P 0xcc {} 64k", 2 * MIB + k * 65536)))
        .collect();
    let mut writer = Command::new("qemu-io");
    writer.args(["-f", "raw", &format!("nbd://{nbd_a}/")]);
    for c in &cmds {
        writer.args(["-c", c]);
    }
    let writer = writer.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let mut writer = Kill(writer);
    std::thread::sleep(Duration::from_millis(300));
    signal(a.0.id(), "-STOP");
    let frozen = Instant::now();
    // B waits out A's lease (not renewed: A is frozen) and takes it; a standby by itself.
    let (_b, nbd_b) = match standby {
        None => started(&dir.0, "nodeB", &mut serve_with(&dir.0, &s, &t, "nodeB", ttl, &b_args)),
        Some(mut k) => {
            let out = k.0.stdout.take().unwrap();
            let mut lines = std::io::BufRead::lines(std::io::BufReader::new(out));
            let nbd = loop {
                let l = lines.next().expect("the standby exited before serving").unwrap();
                if let Some(a) = l.strip_prefix("nbd listening on ") {
                    break a.to_string();
                }
            };
            std::thread::spawn(move || lines.for_each(drop));
            (k, nbd)
        }
    };
    println!("takeover {:.2} s after the freeze (TTL {ttl})", frozen.elapsed().as_secs_f64());
    let st = ctl_status(&dir.0, "nodeB");
    assert_eq!(st["lease"]["mode"], "active", "{st}");
    assert!(st["lease"]["epoch"].as_u64().unwrap() >= 2, "{st}");
    let w = qemu_io(&nbd_b, &["write -P 0xbb 2M 2M".into(), "flush".into()]);
    assert!(w.status.success(), "B writes: {}", String::from_utf8_lossy(&w.stderr));
    signal(a.0.id(), "-CONT");
    // A stops by itself, non-zero, saying why.
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(st) = a.0.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "the fenced router did not stop: {}", log(&dir.0, "nodeA"));
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = writer.0.kill();
    let _ = writer.0.wait();
    let la = log(&dir.0, "nodeA");
    assert!(!status.success(), "the fenced router exited 0: {la}");
    assert!(la.contains("fenced"), "{la}");
    for l in la.lines().filter(|l| l.contains("fenced")).take(3) {
        println!("router A: {l}");
    }
    // Nothing A sent after the takeover landed: B's pattern is whole on both replicas, and the
    // lease is still B's (a flush through B, then the files compared).
    let f = qemu_io(&nbd_b, &["flush".into(), "read -P 0xbb 2M 2M".into()]);
    assert!(f.status.success(), "{}", String::from_utf8_lossy(&f.stdout));
    for file in ["s.img", "t.img"] {
        let r = region(&dir.0.join(file), 2 * MIB, (2 * MIB) as usize);
        let stale = r.iter().filter(|&&b| b != 0xbb).count();
        assert_eq!(stale, 0, "{file}: {stale} bytes of [2M, 4M) are not B's pattern: a stale write landed");
    }
    println!("the fenced router exited with {status}; stale writes landed: 0");
}

/// A volume of `dir/s.img` (local) and the remote replica at `target` (both taken as in sync),
/// under the embedded lease as holder `nodeA/1`, its links over `transport`.
fn leased_config(
    dir: &Path,
    target: &str,
    key: &[u8],
    transport: mirror::replication::transport::Transport,
) -> mirror::volume::open::VolumeConfig {
    use mirror::{
        lease::Holder,
        volume::{
            lease::{LeaseBackend, LeaseOptions},
            open::{ReplicaSpec, VolumeConfig},
        },
    };
    VolumeConfig {
        name: "v".into(),
        source: ReplicaSpec::Local { path: dir.join("s.img"), size: None },
        target: ReplicaSpec::Remote { addr: target.into() },
        secret: key.to_vec(),
        local_listen: ["127.0.0.1:0".into(), "127.0.0.1:0".into()],
        target_weight: 0,
        conns: 2,
        rate: Default::default(),
        node_health: mirror::health::monitor::NodeHealth::new(),
        allow_degraded: false,
        assume_clean: true,
        write_deadline: Default::default(),
        al_extents: mirror::volume::activity::DEFAULT_AL_EXTENTS,
        transport,
        lease: Some(LeaseOptions {
            holder: Holder::new("nodeA", "1"),
            ttl: Duration::from_secs(30),
            force: false,
            backend: LeaseBackend::Embedded,
            standby: false,
            standby_view: None,
        }),
    }
}

/// After a newer holder passed its epoch: the next write (64 KiB at 64 KiB) and any after it
/// fail with `ESHUTDOWN`, no read is served, and the status says fenced, with the reason.
async fn assert_fenced(r: &mirror::volume::router::Router) {
    use mirror::{lease::LeaseMode, volume::BlockDev};
    let e = r.write(65536, vec![0xcc; 65536], false).await.expect_err("a fenced write acknowledged");
    assert_eq!(e.raw_os_error(), Some(libc::ESHUTDOWN), "{e}");
    let e = r.write(0, vec![0xcc; 4096], false).await.expect_err("a write after the fence");
    assert_eq!(e.raw_os_error(), Some(libc::ESHUTDOWN), "{e}");
    assert!(r.read(0, 4096).await.is_err(), "a fenced router serves no reads");
    let st = r.status().lease.unwrap();
    assert_eq!(st.mode, LeaseMode::Fenced);
    assert!(st.reason.contains("refused") && st.reason.contains("fenced"), "{}", st.reason);
}

/// The router's side, deterministic: a router holding the lease over a local replica and a
/// remote one; another holder claims a higher epoch on both (as a new router does). The next
/// write fails with `ESHUTDOWN` and is on neither replica, the router is fenced for good (reads
/// too), and its status says so, with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_answered_fenced_acknowledges_no_write_after() {
    use mirror::{
        lease::LeaseMode,
        volume::{open::open, BlockDev},
    };
    let dir = TempDir::new("lease-router");
    let secret_path = secret_file(&dir.0);
    let key = mirror::replication::auth::load_secret(&secret_path).unwrap();
    for f in ["s.img", "t.img"] {
        std::fs::write(dir.0.join(f), vec![0u8; (4 * MIB) as usize]).unwrap();
    }
    let t = Replica::start(&dir.0.join("t.img"), &secret_path, None, &[]);
    let cfg = leased_config(&dir.0, &t.addr, &key, Default::default());
    let vol = open(&cfg).await.expect("open volume");
    let r = vol.router.clone();
    r.write(0, vec![0x11; 65536], false).await.expect("a write under the lease");
    let st = r.status().lease.expect("the router reports its lease");
    assert_eq!((st.mode, st.epoch.0), (LeaseMode::Active, 1));
    // A newer holder claims epoch 2 on both replicas (the source through its embedded server).
    let source_addr = r.replicas[0].addr().to_string();
    for addr in [&source_addr, &t.addr] {
        let (a, k) = (addr.clone(), key.clone());
        tokio::task::spawn_blocking(move || {
            let mut c = Client::connect(&a, "v", &k).unwrap();
            c.call(&Message::LeaseClaim {
                holder: "nodeB/1".into(),
                epoch: 2,
                ttl_ms: 30000,
                coordinated: 1,
            })
            .unwrap();
        })
        .await
        .unwrap();
    }
    assert_fenced(&r).await;
    let json = serde_json::to_value(r.status()).unwrap();
    assert_eq!(json["lease"]["mode"], "fenced", "{json}");
    for f in ["s.img", "t.img"] {
        let b = region(&dir.0.join(f), 0, (2 * 65536) as usize);
        assert!(b[..65536].iter().all(|&x| x == 0x11), "{f}: the acknowledged write is there");
        assert!(b[65536..].iter().all(|&x| x == 0), "{f}: a fenced write landed");
    }
    for s in &vol.local_servers {
        s.shutdown();
    }
}

/// Fencing over the TLS link: a router holding the lease (a local source, a remote target
/// `mirror replica --tls`, both links TLS 1.3 with mutual certificates) writes at epoch 1 (its
/// connections attached over TLS); another holder raises the target's epoch to 2 underneath it.
/// The next write is answered FENCED over TLS and fails with `ESHUTDOWN`, nothing of it is on
/// the target, the router is fenced for good; a fresh TLS connection attaching at the old epoch
/// (what a reconnect does) is refused FENCED, one at the new epoch is attached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_over_tls_is_fenced_when_its_remote_replicas_epoch_is_raised() {
    use mirror::{
        lease::{Epoch, Holder, LeaseMode},
        replication::transport::{PeerAddr, Transport},
        tls::PeerPolicy,
        volume::{open::open, remote::RemotePool, replica::Attachment, BlockDev},
    };
    use mirror_tests::{proc::ReplicaLaunch, tls::pki};
    let dir = TempDir::new("lease-tls");
    let secret_path = secret_file(&dir.0);
    let key = mirror::replication::auth::load_secret(&secret_path).unwrap();
    pki(&dir.0, "ca", &["node-a", "node-b"]);
    let (a, b) = (dir.0.join("node-a"), dir.0.join("node-b"));
    for f in ["s.img", "t.img"] {
        std::fs::write(dir.0.join(f), vec![0u8; (4 * MIB) as usize]).unwrap();
    }
    let rlog = dir.0.join("replica.log");
    let args: Vec<String> = ["replica", "--listen", "127.0.0.1:0", "--secret-file"]
        .iter()
        .map(std::string::ToString::to_string)
        .chain([secret_path.display().to_string(), "--tls".into(), b.display().to_string()])
        .chain(["--tls-allow".into(), "node-a".into()])
        .chain(["--volume".into(), format!("v={}", dir.0.join("t.img").display())])
        .collect();
    let mut launch = ReplicaLaunch::new(mirror_bin(), args);
    launch.log = Some(rlog.clone());
    launch.rust_log = Some("info".into());
    let t = Replica::launch(launch, &dir.0.join("t.img")).unwrap_or_else(|e| panic!("{e:#}"));
    let now = std::time::SystemTime::now();
    let tls = Transport::tls_node(&a, PeerPolicy::AnyNode, now).expect("node-a credentials");
    assert!(tls.is_tls());
    let target = format!("node-b@{}", t.addr);
    let cfg = leased_config(&dir.0, &target, &key, tls.clone());
    let vol = open(&cfg).await.expect("open volume");
    let r = vol.router.clone();
    r.write(0, vec![0x11; 65536], false).await.expect("a write under the lease, attached over TLS");
    let st = r.status().lease.expect("the router reports its lease");
    assert_eq!((st.mode, st.epoch.0), (LeaseMode::Active, 1));
    let text = std::fs::read_to_string(&rlog).unwrap();
    assert!(
        text.lines().any(|l| l.contains("peer authenticated") && l.contains("node-a")),
        "the target saw no TLS peer node-a:\n{text}"
    );
    // A newer holder claims epoch 2 on the target only, over TLS as node-a's credentials allow.
    let (p, k, c) = (PeerAddr::parse(&target).unwrap(), key.clone(), Transport::tls_client(&a, now).unwrap());
    let view = tokio::task::spawn_blocking(move || {
        let mut cl = Client::connect_over(&c, &p, "v", &k).expect("connect over TLS");
        assert_eq!(cl.node.as_deref(), Some("node-b"));
        cl.call(&Message::LeaseClaim { holder: "nodeB/1".into(), epoch: 2, ttl_ms: 30000, coordinated: 1 })
            .expect("claim epoch 2")
    })
    .await
    .unwrap();
    println!("target after the claim: {view:?}");
    assert_fenced(&r).await;
    let b = region(&dir.0.join("t.img"), 0, 2 * 65536);
    assert!(b[..65536].iter().all(|&x| x == 0x11), "t.img: the acknowledged write is there");
    assert!(b[65536..].iter().all(|&x| x == 0), "t.img: a fenced write landed");
    // The connect path a reconnect takes: TLS, handshake, Attach at the old epoch: FENCED.
    let old = Attachment { holder: Holder::new("nodeA", "1"), epoch: Epoch(1) };
    let e = RemotePool::connect_over(&tls, &target, "v", &key, 1, Some(&old))
        .await
        .expect_err("an attach at the passed epoch accepted");
    assert!(e.is_fenced(), "{e}");
    let new = Attachment { holder: Holder::new("nodeB", "1"), epoch: Epoch(2) };
    let (pool, _) = RemotePool::connect_over(&tls, &target, "v", &key, 1, Some(&new))
        .await
        .expect("an attach at the accepted epoch over TLS");
    assert!(matches!(
        pool.call(Message::Write { offset: MIB, data: vec![0x22; 4096] }, 0).await,
        Ok(Message::Ok)
    ));
    for s in &vol.local_servers {
        s.shutdown();
    }
}

/// Whether qemu-io and etcd are here (a loud skip when not).
fn etcd_tools(test: &str) -> bool {
    if which("qemu-io").is_none() {
        skip(test, "NBD", "qemu-io is not installed (cargo xtask setup)");
        return false;
    }
    if etcd::binary().is_none() {
        skip(test, "ETCD", "etcd is not installed (Debian etcd-server; `cargo xtask setup` installs it)");
        return false;
    }
    true
}

fn etcd_or_skip(test: &str) -> Option<Etcd> {
    etcd_tools(test).then(|| Etcd::start(1).expect("start etcd"))
}

/// etcd mode: a second router is refused naming the holder, as in the embedded mode.
#[test]
fn etcd_a_second_router_against_a_live_lease_is_refused_naming_the_holder() {
    let Some(e) =
        etcd_or_skip("lease_fencing::etcd_a_second_router_against_a_live_lease_is_refused_naming_the_holder")
    else {
        return;
    };
    let url = e.url();
    second_router_refused("lease-etcd-second", &["--lease-store", &url], "etcd");
}

/// etcd mode: a standby waits announced; the active router is frozen (SIGSTOP) past the TTL; the
/// standby takes over by itself, writes its epoch to both replicas and serves; the old router,
/// resumed (SIGCONT), is fenced, stops, and nothing it sent after the takeover is on either
/// replica.
#[test]
fn etcd_a_standby_takes_over_from_a_frozen_router_which_is_then_fenced() {
    let Some(e) =
        etcd_or_skip("lease_fencing::etcd_a_standby_takes_over_from_a_frozen_router_which_is_then_fenced")
    else {
        return;
    };
    let url = e.url();
    frozen_router_fenced_with("lease-etcd-standby", &["--lease-store", &url], &["--standby"], "2s");
}

/// The handover fixture (`mirror_tests::handover`) with 64 MiB replicas and a 2 s TTL.
fn pair(tag: &str, standby: bool) -> Pair {
    let bin = mirror_bin();
    let p =
        if standby { Pair::start(tag, &bin, "2s", SIZE) } else { Pair::start_active(tag, &bin, "2s", SIZE) };
    p.unwrap_or_else(|e| panic!("{e:#}"))
}

const SIZE: u64 = 64 * MIB;

/// The reconnecting writer (`mirror_tests::nbd::Writer`) over both routers' addresses, from
/// byte `base`, `depth` writes in flight at most.
fn writer(p: &Pair, base: u64, depth: usize) -> Writer {
    let mut o = WriterOpts::new(p.nbd.to_vec(), base, (SIZE - base) / BLOCK as u64);
    o.depth = depth;
    Writer::start(o)
}

/// Every acknowledged block reads back through B's NBD export.
fn verify_through_b(p: &Pair, log: &WriterLog, base: u64) {
    let mut c =
        NbdClient::connect(&p.nbd[1], Duration::from_secs(5), Duration::from_secs(30)).expect("connect to B");
    let lost = lost_through(&mut c, log, base).expect("read through B");
    assert!(
        lost.is_empty(),
        "{} acknowledged blocks do not read back through B: {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
}

/// Every acknowledged block intact on both replica files, and the files byte-identical (B
/// stopped first: its final flush).
fn verify_files(p: &mut Pair, log: &WriterLog, base: u64) {
    p.stop(1, Duration::from_secs(15)).expect("B stops on SIGTERM");
    let files = p.files();
    let lost = lost(log, base, &[&files[0], &files[1]]).unwrap();
    assert!(
        lost.is_empty(),
        "acknowledged blocks missing on a replica (file, seq): {:?}",
        &lost[..lost.len().min(10)]
    );
    assert!(p.identical().unwrap(), "the replicas differ");
}

/// `ctl status` on a standby that waits: its lease in standby mode, the active router it waits
/// on (holder, epoch, a lease with time left), as JSON and as a line; anything but status is
/// refused naming the active router.
fn assert_standing_by(p: &Pair, node: &str, active: &str, epoch: u64) {
    let st = p.status(1).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(st["lease"]["mode"], "standby", "{st}");
    assert!(st["lease"]["holder"].as_str().unwrap().starts_with(&format!("{node}/")), "{st}");
    assert!(st["active"]["holder"].as_str().unwrap().starts_with(active), "{st}");
    assert_eq!(st["active"]["epoch"].as_u64(), Some(epoch), "{st}");
    assert!(st["active"]["time_left_ms"].as_u64().unwrap() > 0, "the active router renews: {st}");
    let line = p.ctl(1, &["status"]).unwrap();
    let text = String::from_utf8_lossy(&line.stdout);
    println!("{node} standing by: {text}");
    assert!(line.status.success() && text.contains("standby router") && text.contains(active), "{text}");
    let no = p.ctl(1, &["failover"]).unwrap();
    let err = String::from_utf8_lossy(&no.stderr);
    assert!(!no.status.success() && err.contains("is a standby") && err.contains(active), "{err}");
}

/// Planned handover (etcd): `mirror ctl handover` on the active router A is refused while no
/// standby is announced (A serves on); with B standing by (its own replica, t, named as its
/// source), A shifts reads, quiesces, flushes, hands the lease to B and exits 0 naming B and the
/// epoch; B serves at a higher epoch with roles swapped (source t, target s: the old source is
/// its replica), what A acknowledged reads back through B, and the replica files are
/// byte-identical after B's writes. The workload is the reconnecting writer: one numbered block
/// per write, to A and, once A hands over, to B.
#[test]
fn etcd_planned_handover_moves_the_volume_to_the_standby_with_roles_swapped() {
    let tag = "lease_fencing::etcd_planned_handover_moves_the_volume_to_the_standby_with_roles_swapped";
    if !etcd_tools(tag) {
        return;
    }
    let mut p = pair("lease-handover", false);
    let nbd_a = p.nbd[0].clone();
    let w = qemu_io(&nbd_a, &["write -P 0x5a 0 1M".into(), "write -P 0x6b 3M 512k".into()]);
    assert!(w.status.success(), "{}", String::from_utf8_lossy(&w.stderr));
    // No standby yet: refused, clearly, and A serves on.
    let no = p.ctl(0, &["handover"]).unwrap();
    let err = String::from_utf8_lossy(&no.stderr);
    assert!(!no.status.success() && err.contains("no standby router is announced"), "{err}");
    let w = qemu_io(&nbd_a, &["write -P 0x7c 1M 1M".into()]);
    assert!(w.status.success(), "A serves on after the refusal: {}", String::from_utf8_lossy(&w.stderr));
    let epoch_a = p.status(0).unwrap()["lease"]["epoch"].as_u64().unwrap();
    // B stands by with its own replica as the source.
    let metrics_b = mirror_tests::net::free_addr();
    p.start_standby_with(&["--metrics", &metrics_b]).unwrap_or_else(|e| panic!("{e:#}"));
    assert_standing_by(&p, "nodeB", "nodeA/", epoch_a);
    let m = mirror_tests::net::http_get(&metrics_b, "/metrics").unwrap();
    assert!(
        m.contains("mirror_lease_mode{mode=\"standby\"} 1") && m.contains("mirror_standby_waiting_seconds"),
        "{m}"
    );
    let writer = writer(&p, 4 * MIB, 1);
    std::thread::sleep(Duration::from_millis(500));
    let started_at = Instant::now();
    let h = p.handover().unwrap_or_else(|e| panic!("{e:#}"));
    assert!(h["successor"].as_str().unwrap().starts_with("nodeB/"), "{h}");
    let epoch = h["epoch"].as_u64().unwrap();
    assert!(epoch > epoch_a, "{h}");
    println!(
        "handover: {:.2} s, writes held {} ms, epoch {epoch_a} -> {epoch}",
        started_at.elapsed().as_secs_f64(),
        h["paused_ms"]
    );
    // A stops by itself, 0, naming its successor and the epoch.
    let status = p.wait_exit(0, Duration::from_secs(15)).unwrap_or_else(|e| panic!("{e:#}"));
    let la = p.log(0);
    assert!(status.success(), "A exited {status}: {la}");
    assert!(la.contains("handed over to nodeB/") && la.contains(&format!("(epoch {epoch})")), "{la}");
    // B serves, active, roles swapped.
    p.wait_b_serving(Duration::from_secs(15)).unwrap_or_else(|e| panic!("{e:#}"));
    println!("B serving {:.2} s after the handover began", started_at.elapsed().as_secs_f64());
    std::thread::sleep(Duration::from_millis(500));
    let log = writer.stop().unwrap_or_else(|e| panic!("{e:#}"));
    let (gap, _) = log.longest_gap().unwrap();
    let by = |i: usize| log.acked().filter(|w| w.addr == i).count();
    println!(
        "workload: {} writes acknowledged ({} by A, {} by B), longest gap {:.2} s",
        log.acked().count(),
        by(0),
        by(1),
        gap.as_secs_f64()
    );
    assert!(by(0) > 0 && by(1) > 0, "the workload did not span the handover");
    verify_through_b(&p, &log, 4 * MIB);
    let st = p.status(1).unwrap();
    assert_eq!(st["lease"]["mode"], "active", "{st}");
    let m = mirror_tests::net::http_get(&metrics_b, "/metrics").unwrap();
    assert!(m.contains("mirror_lease_mode{mode=\"active\"} 1") && m.contains("mirror_read_weight"), "{m}");
    assert!(st["lease"]["epoch"].as_u64().unwrap() >= epoch, "{st}");
    let reps = st["replicas"].as_array().unwrap();
    // B's source is t (A's target), its target s: the old source serves as the new one's replica.
    assert!(reps[0].to_string().contains(&p.t.addr) && reps[1].to_string().contains(&p.s.addr), "{st}");
    let r = qemu_io(
        &p.nbd[1],
        &[
            "read -P 0x5a 0 1M".into(),
            "read -P 0x7c 1M 1M".into(),
            "read -P 0x6b 3M 512k".into(),
            "write -P 0x8d 2M 1M".into(),
            "flush".into(),
        ],
    );
    let said = String::from_utf8_lossy(&r.stdout);
    assert!(r.status.success() && !said.contains("Pattern verification failed"), "{said}");
    verify_files(&mut p, &log, 4 * MIB);
    let fs = std::fs::read(&p.files()[0]).unwrap();
    assert!(fs[2 * MIB as usize..3 * MIB as usize].iter().all(|&x| x == 0x8d));
}

/// Planned handover under a pipelined reconnecting writer (up to 8 writes in flight, so some
/// are in flight when A quiesces: those are held, then refused, never acknowledged): every
/// write the client saw acknowledged, by A or by B, is intact on both replica files, the files
/// are byte-identical, and the writer went on through B. (The check itself is checked: the
/// acknowledged blocks are found by the same digest test that finds stale ones.)
#[test]
fn etcd_planned_handover_under_a_reconnecting_writer_loses_no_acknowledged_write() {
    let tag = "lease_fencing::etcd_planned_handover_under_a_reconnecting_writer_loses_no_acknowledged_write";
    if !etcd_tools(tag) {
        return;
    }
    let mut p = pair("lease-handover-writer", true);
    let writer = writer(&p, 0, 8);
    std::thread::sleep(Duration::from_millis(500));
    let h = p.handover().unwrap_or_else(|e| panic!("{e:#}"));
    let status = p.wait_exit(0, Duration::from_secs(15)).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(status.success(), "A exited {status}: {}", p.log(0));
    p.wait_b_serving(Duration::from_secs(15)).unwrap_or_else(|e| panic!("{e:#}"));
    std::thread::sleep(Duration::from_millis(500));
    let log = writer.stop().unwrap_or_else(|e| panic!("{e:#}"));
    let by = |i: usize| log.acked().filter(|w| w.addr == i).count();
    let refused = log.writes.iter().filter(|w| w.error.is_some()).count();
    println!(
        "handover (writes held {} ms): {} writes sent, {} acknowledged by A, {} by B, {refused} refused or cut off; {} connections",
        h["paused_ms"],
        log.writes.len(),
        by(0),
        by(1),
        log.connects.len()
    );
    assert!(by(0) > 0 && by(1) > 0, "the writer did not go on through B: {:?}", log.connects);
    assert!(log.connects.iter().any(|(_, a)| *a == 1), "the writer never connected to B");
    p.wait_in_sync(1, Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e:#}"));
    verify_through_b(&p, &log, 0);
    verify_files(&mut p, &log, 0);
    let files = p.files();
    let found = landed(&log, 0, &[&files[0], &files[1]], |w| w.acked.is_some()).unwrap();
    assert_eq!(
        found.len(),
        2 * log.acked().count(),
        "the digest check finds every acknowledged block on both files"
    );
}

/// etcd mode: the active router SIGKILLed under the reconnecting writer; the standby takes over
/// once A's lease expires, every write acknowledged (before the kill, through A, and after,
/// through B) reads back through B, and once B reports both replicas in sync and stops, every
/// acknowledged block is on both files and the files are byte-identical.
#[test]
fn etcd_sigkill_of_the_active_router_under_a_workload_loses_no_acknowledged_write() {
    let tag = "lease_fencing::etcd_sigkill_of_the_active_router_under_a_workload_loses_no_acknowledged_write";
    if !etcd_tools(tag) {
        return;
    }
    let mut p = pair("lease-sigkill", true);
    let writer = writer(&p, 0, 1);
    std::thread::sleep(Duration::from_millis(700));
    p.signal(0, libc::SIGKILL).unwrap();
    let killed = Instant::now();
    p.wait_exit(0, Duration::from_secs(5)).unwrap_or_else(|e| panic!("{e:#}"));
    let serving = p.wait_b_serving(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e:#}"));
    std::thread::sleep(Duration::from_millis(500));
    let log = writer.stop().unwrap_or_else(|e| panic!("{e:#}"));
    let first_b = log.first_ack_after(killed, 1);
    let before = log.acked().filter(|w| w.acked.is_some_and(|t| t < killed)).count();
    println!(
        "SIGKILL (TTL 2 s): B serving {:.2} s after, the first write acknowledged by B {:.2} s after; {} writes acknowledged, {before} before the kill",
        (serving - killed).as_secs_f64(),
        first_b.map_or(f64::NAN, |t| (t - killed).as_secs_f64()),
        log.acked().count()
    );
    assert!(before > 0 && first_b.is_some(), "the workload did not span the kill");
    verify_through_b(&p, &log, 0);
    p.wait_in_sync(1, Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e:#}"));
    verify_files(&mut p, &log, 0);
}

/// The first `nbd listening on` address `b` prints within `limit` (`None`: it did not serve by
/// then, or exited); the rest of its stdout is drained.
fn serving_within(lines: &std::sync::mpsc::Receiver<String>, limit: Duration) -> Option<String> {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        match lines.recv_timeout(left) {
            Ok(l) => {
                if let Some(x) = l.strip_prefix("nbd listening on ") {
                    return Some(x.to_string());
                }
            }
            Err(_) => return None,
        }
    }
}

/// A standby B (`t` named first, `s` second) spawned with its stdout lines on a channel; waits
/// until it stands by.
fn standby(dir: &Path, s: &Replica, t: &Replica, url: &str) -> (Kill, std::sync::mpsc::Receiver<String>) {
    let mut c = serve_synced(dir, t, s, "nodeB", "2s", &["--lease-store", url, "--standby"]);
    c.stdout(Stdio::piped());
    let mut b = Kill(c.spawn().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = b.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !log(dir, "nodeB").contains("standing by") {
        assert!(Instant::now() < deadline, "B never stood by: {}", log(dir, "nodeB"));
        std::thread::sleep(Duration::from_millis(50));
    }
    (b, rx)
}

/// Waits until the router of `node` reports both replicas in sync.
fn both_in_sync(dir: &Path, node: &str) {
    let deadline = Instant::now() + Duration::from_mins(1);
    loop {
        let st = ctl_status(dir, node);
        if st["replicas"].as_array().unwrap().iter().all(|r| r["state"] == "in-sync") {
            return;
        }
        assert!(Instant::now() < deadline, "{node}'s replicas never both in sync: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Writes `(offset, len, pattern)` through `nbd`, each its own qemu-io with a flush; all must be
/// acknowledged.
fn write_all(nbd: &str, writes: &[(u64, u64, u8)]) {
    for (o, l, p) in writes {
        let w = qemu_io(nbd, &[format!("write -P {p} {o} {l}"), "flush".into()]);
        assert!(w.status.success(), "write {p} at {o}: {}", String::from_utf8_lossy(&w.stderr));
    }
}

/// Every write of `writes` reads back with its pattern through `nbd`.
fn read_back(nbd: &str, writes: &[(u64, u64, u8)]) {
    let cmds: Vec<String> = writes.iter().map(|(o, l, p)| format!("read -P {p} {o} {l}")).collect();
    let r = qemu_io(nbd, &cmds);
    let said = String::from_utf8_lossy(&r.stdout);
    assert!(r.status.success() && !said.contains("Pattern verification failed"), "read back: {said}");
}

/// Node death (etcd): A active on s (its node's replica) and t, B standing by naming t first.
/// A's router and s's replica are SIGKILLed at once; B takes over by itself, without `--force`,
/// with the one replica it reaches (etcd holds no mark: nothing was acknowledged with one replica),
/// records in etcd that t alone is current before its first write, serves, and every write A
/// acknowledged reads back through B.
#[test]
fn etcd_node_death_the_standby_takes_over_with_the_replica_it_reaches() {
    let tag = "lease_fencing::etcd_node_death_the_standby_takes_over_with_the_replica_it_reaches";
    let Some(e) = etcd_or_skip(tag) else {
        return;
    };
    let url = e.url();
    let dir = TempDir::new("lease-node-death");
    secret_file(&dir.0);
    let (mut s, t) = replicas(&dir.0);
    let store = ["--lease-store", url.as_str()];
    let (mut a, nbd_a) = started(&dir.0, "nodeA", &mut serve_synced(&dir.0, &s, &t, "nodeA", "2s", &store));
    both_in_sync(&dir.0, "nodeA");
    let (mut b, lines) = standby(&dir.0, &s, &t, &url);
    let acked =
        [(0, MIB, 0x11u8), (3 * MIB, 512 * 1024, 0x22), (9 * MIB, 2 * MIB, 0x33), (15 * MIB, 4096, 0x44)];
    write_all(&nbd_a, &acked);
    // Node A dies: its router and its replica at once.
    signal(a.0.id(), "-KILL");
    s.kill();
    let killed = Instant::now();
    let _ = a.0.wait();
    let nbd_b = serving_within(&lines, Duration::from_secs(30))
        .unwrap_or_else(|| panic!("B did not take over: {}", log(&dir.0, "nodeB")));
    println!("node death (TTL 2 s): B serving {:.2} s after the kill", killed.elapsed().as_secs_f64());
    let lb = log(&dir.0, "nodeB");
    assert!(lb.contains("etcd decided"), "B took the lease on etcd's word, not --force: {lb}");
    assert!(lb.contains("alone holds every acknowledged write"), "B marked t current before writing: {lb}");
    read_back(&nbd_b, &acked);
    let more = [(5 * MIB, MIB, 0x55u8)];
    write_all(&nbd_b, &more);
    read_back(&nbd_b, &more);
    let st = ctl_status(&dir.0, "nodeB");
    assert_eq!(st["lease"]["mode"], "active", "{st}");
    let reps = st["replicas"].as_array().unwrap();
    assert!(reps[0]["state"] == "in-sync" && reps[1]["state"] == "failed", "{st}");
    signal(b.0.id(), "-TERM");
    let _ = b.0.wait();
}

/// The refusal (etcd): t's replica dies first, A writes on s alone (etcd marks s as the one with
/// every acknowledged write, before A acknowledges any); then A's router and s die, and t comes
/// back. B must not take over with t alone: it stands by, naming the reason, and serves nothing.
/// Once s is back, B takes over with both, resyncs t from s, nothing acknowledged is lost, and the
/// mark is cleared once both are in sync.
#[test]
fn etcd_no_takeover_with_the_replica_that_missed_acknowledged_writes() {
    let tag = "lease_fencing::etcd_no_takeover_with_the_replica_that_missed_acknowledged_writes";
    let Some(e) = etcd_or_skip(tag) else {
        return;
    };
    let url = e.url();
    let dir = TempDir::new("lease-no-takeover");
    secret_file(&dir.0);
    let (mut s, mut t) = replicas(&dir.0);
    let store = ["--lease-store", url.as_str()];
    let (mut a, nbd_a) = started(&dir.0, "nodeA", &mut serve_synced(&dir.0, &s, &t, "nodeA", "2s", &store));
    both_in_sync(&dir.0, "nodeA");
    let (mut b, lines) = standby(&dir.0, &s, &t, &url);
    let before = [(0, MIB, 0x61u8), (8 * MIB, MIB, 0x62)];
    write_all(&nbd_a, &before);
    t.kill();
    // Acknowledged with s alone.
    let degraded = [(2 * MIB, MIB, 0x63u8), (8 * MIB, 4096, 0x64), (12 * MIB, 3 * MIB, 0x65)];
    write_all(&nbd_a, &degraded);
    let la = log(&dir.0, "nodeA");
    assert!(la.contains("alone holds every acknowledged write"), "A marked s current: {la}");
    signal(a.0.id(), "-KILL");
    s.kill();
    let _ = a.0.wait();
    t.restart();
    // A's lease runs out after its TTL; B then campaigns and must refuse t alone.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !log(&dir.0, "nodeB").contains("not taking over") {
        assert!(
            Instant::now() < deadline,
            "B never said why it does not take over: {}",
            log(&dir.0, "nodeB")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        serving_within(&lines, Duration::from_secs(5)).is_none(),
        "B served with t alone: {}",
        log(&dir.0, "nodeB")
    );
    let lb = log(&dir.0, "nodeB");
    assert!(lb.contains("alone holds every acknowledged write") && lb.contains("--force"), "{lb}");
    let st = ctl_status(&dir.0, "nodeB");
    assert_eq!(st["lease"]["mode"], "standby", "{st}");
    assert!(st["lease"]["reason"].as_str().unwrap().contains("not taking over"), "{st}");
    println!("B standing by: {}", st["lease"]["reason"]);
    // s returns: B takes over with both.
    s.restart();
    let nbd_b = serving_within(&lines, Duration::from_secs(30))
        .unwrap_or_else(|| panic!("B did not take over once s was back: {}", log(&dir.0, "nodeB")));
    // What was acknowledged, the degraded overwrite of 8M's first block included (t has the
    // older 0x62 there).
    let acked = [
        (0, MIB, 0x61u8),
        (8 * MIB, 4096, 0x64),
        (8 * MIB + 4096, MIB - 4096, 0x62),
        (2 * MIB, MIB, 0x63),
        (12 * MIB, 3 * MIB, 0x65),
    ];
    read_back(&nbd_b, &acked);
    both_in_sync(&dir.0, "nodeB");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !log(&dir.0, "nodeB").contains("mark cleared") {
        assert!(Instant::now() < deadline, "B never cleared the mark: {}", log(&dir.0, "nodeB"));
        std::thread::sleep(Duration::from_millis(100));
    }
    read_back(&nbd_b, &acked);
    signal(b.0.id(), "-TERM");
    let _ = b.0.wait();
    let (fs, ft) = (std::fs::read(dir.0.join("s.img")).unwrap(), std::fs::read(dir.0.join("t.img")).unwrap());
    assert!(fs == ft, "the replicas differ after the resync");
}
