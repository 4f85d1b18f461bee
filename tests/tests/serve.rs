//! `mirror serve` end to end: the router behind the NBD frontend, driven by fio's nbd engine (a
//! client nobody here wrote), with a replica server killed in the middle of a verifying run.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use mirror_tests::{
    env::{is_root, mirror_bin, skip, which},
    fs::{file_digest, random_bytes, secret_file, unique_name, TempDir},
    net::free_addr,
    proc::{drain, mirror_cli, run_tool, spawn_until, sync_ok, Kill, Replica},
};

const MIB: u64 = 1 << 20;

/// `mirror serve`, killed (SIGKILL) on drop.
struct Serve {
    child: Kill,
    nbd: String,
}

fn serve(args: &[&str]) -> Serve {
    // A control socket of its own (the default one may belong to a real router, or to another
    // test running at the same time).
    let own_ctl = (!args.contains(&"--ctl-socket")).then(|| {
        let p = std::env::temp_dir().join(format!("{}.sock", unique_name("serve-test")));
        vec!["--ctl-socket".to_string(), p.display().to_string()]
    });
    let (child, nbd, out) = spawn_until(
        Command::new(mirror_bin())
            .arg("serve")
            .args(args)
            .args(own_ctl.unwrap_or_default())
            .args(["--nbd", "127.0.0.1:0"])
            .env("RUST_LOG", "warn"),
        "nbd listening on ",
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    drain(out);
    Serve { child: Kill(child), nbd }
}

#[test]
fn fio_verify_survives_a_killed_replica_and_the_replicas_end_identical() {
    const T: &str = "serve::fio_verify_survives_a_killed_replica_and_the_replicas_end_identical";
    if which("fio").is_none() {
        return skip(T, "NBD", "fio is not installed (cargo xtask setup)");
    }
    let dir = TempDir::new("serve-kill");
    let secret = secret_file(&dir.0);
    let sec = secret.display().to_string();
    let size = 64 * MIB;
    let data = random_bytes(size as usize, 5);
    std::fs::write(dir.0.join("s.img"), &data).unwrap();
    std::fs::write(dir.0.join("t.img"), &data).unwrap();
    let mut t = Replica::start(&dir.0.join("t.img"), &secret, None, &[]);
    let source_listen = free_addr();
    let src = format!("local:{}", dir.0.join("s.img").display());
    let tgt = format!("remote:{}", t.addr);
    // Identical content, new metadata: the first sync only agrees on a generation.
    let s0 = Replica::start(&dir.0.join("s.img"), &secret, Some(&source_listen), &[]);
    sync_ok(&s0.addr, &t.addr, &secret, &[]);
    drop(s0);
    std::thread::sleep(Duration::from_millis(200));

    let srv = serve(&[
        "--volume",
        "v",
        "--source",
        &src,
        "--target",
        &tgt,
        "--secret-file",
        &sec,
        "--source-listen",
        &source_listen,
        "--target-weight",
        "50",
    ]);
    let fio = Command::new("fio")
        .args(["--name=verify", "--ioengine=nbd", "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=48M"])
        .args([
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_backlog=256",
            "--randrepeat=0",
            "--verify_state_save=0",
        ])
        .arg(format!("--uri=nbd://{}/", srv.nbd))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run fio");
    std::thread::sleep(Duration::from_millis(1500));
    t.kill();
    std::thread::sleep(Duration::from_millis(1500));
    t.restart();
    let out = fio.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "fio failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("err= 0"), "fio reports errors:\n{text}");

    // The source's embedded server reports the resync; wait until it is done and clean.
    let deadline = Instant::now() + Duration::from_mins(1);
    loop {
        let (ok, out, _) =
            mirror_cli(&["status", "--node", &source_listen, "--volume", "v", "--secret-file", &sec]);
        if ok {
            let js: serde_json::Value = serde_json::from_str(&out).unwrap();
            if js["tracking"] == false && js["dirty_bytes"] == 0 {
                break;
            }
        }
        assert!(Instant::now() < deadline, "resync did not finish: {out}");
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(srv);
    assert_eq!(
        file_digest(&dir.0.join("s.img")),
        file_digest(&dir.0.join("t.img")),
        "replicas differ after resync"
    );
}

#[test]
fn real_clients_through_the_router_leave_both_replicas_identical() {
    const T: &str = "serve::real_clients_through_the_router_leave_both_replicas_identical";
    for tool in ["qemu-io", "nbdinfo", "nbdcopy", "fio"] {
        if which(tool).is_none() {
            return skip(T, "NBD", &format!("{tool} is not installed (cargo xtask setup)"));
        }
    }
    let dir = TempDir::new("serve-clients");
    let secret = secret_file(&dir.0);
    let sec = secret.display().to_string();
    let size = 64 * MIB;
    std::fs::write(dir.0.join("s.img"), vec![0u8; size as usize]).unwrap();
    std::fs::write(dir.0.join("t.img"), vec![0u8; size as usize]).unwrap();
    let t = Replica::start(&dir.0.join("t.img"), &secret, None, &[]);
    let src = format!("local:{}", dir.0.join("s.img").display());
    let tgt = format!("remote:{}", t.addr);
    // The replicas start identical (zeroes); the first sync only agrees on a generation.
    let s0 = Replica::start(&dir.0.join("s.img"), &secret, None, &[]);
    sync_ok(&s0.addr, &t.addr, &secret, &[]);
    drop(s0);
    let unix = dir.0.join("nbd.sock");
    let srv = serve(&[
        "--volume",
        "v",
        "--source",
        &src,
        "--target",
        &tgt,
        "--secret-file",
        &sec,
        "--target-weight",
        "50",
        "--nbd-unix",
        &unix.display().to_string(),
    ]);
    let uri = format!("nbd://{}/", srv.nbd);
    let identical = |what: &str| {
        assert_eq!(
            file_digest(&dir.0.join("s.img")),
            file_digest(&dir.0.join("t.img")),
            "replicas differ after {what}"
        );
    };

    // qemu-io: pattern writes (one FUA) and read-backs, over TCP and over the Unix socket.
    let text = run_tool(Command::new("qemu-io").args(["-f", "raw", &uri]).args([
        "-c",
        "write -P 0xab 0 64k",
        "-c",
        "write -P 0xcd -f 1M 128k",
        "-c",
        "read -P 0xab 0 64k",
        "-c",
        "read -P 0xcd 1M 128k",
    ]));
    assert!(!text.contains("Pattern verification failed"), "{text}");
    let unix_uri = format!("nbd+unix:///?socket={}", unix.display());
    let text = run_tool(Command::new("qemu-io").args(["-f", "raw", &unix_uri, "-c", "read -P 0xcd 1M 128k"]));
    assert!(!text.contains("Pattern verification failed"), "{text}");
    identical("qemu-io");

    // nbdinfo sees the volume and its capabilities.
    let text = run_tool(Command::new("nbdinfo").args(["--json", &uri]));
    let js: serde_json::Value = serde_json::from_str(&text).expect("nbdinfo json");
    let export = &js["exports"][0];
    assert_eq!(export["export-size"], size, "{text}");
    for cap in ["can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"] {
        assert_eq!(export[cap], true, "{cap}: {text}");
    }

    // nbdcopy a random image in (4 connections) and back out.
    let img = dir.0.join("in.img");
    std::fs::write(&img, random_bytes(size as usize, 3)).unwrap();
    run_tool(Command::new("nbdcopy").args(["--connections=4"]).arg(&img).arg(&uri));
    identical("nbdcopy in");
    let back = dir.0.join("out.img");
    run_tool(Command::new("nbdcopy").arg(&uri).arg(&back));
    assert_eq!(file_digest(&img), file_digest(&back), "nbdcopy round trip");
    assert_eq!(file_digest(&img), file_digest(&dir.0.join("t.img")));

    // fio random writes with verification, 4 connections.
    let text = run_tool(
        Command::new("fio")
            .args([
                "--name=v",
                "--ioengine=nbd",
                "--rw=randwrite",
                "--bsrange=4k-64k",
                "--iodepth=16",
                "--numjobs=4",
            ])
            .args([
                "--size=16M",
                "--offset_increment=16M",
                "--verify=crc32c",
                "--verify_fatal=1",
                "--verify_state_save=0",
            ])
            .arg(format!("--uri={uri}")),
    );
    assert!(text.contains("err= 0") && !text.contains("err= 5"), "{text}");
    identical("fio verify");
    let _ = &t;
}

#[test]
fn ctl_pins_weights_and_reads_follow_them() {
    const T: &str = "serve::ctl_pins_weights_and_reads_follow_them";
    if !is_root() {
        return skip(T, "NBD", "the control socket is root only");
    }
    if which("fio").is_none() {
        return skip(T, "NBD", "fio is not installed (cargo xtask setup)");
    }
    let dir = TempDir::new("serve-ctl");
    let secret = secret_file(&dir.0);
    let sec = secret.display().to_string();
    for f in ["a.img", "b.img"] {
        std::fs::write(dir.0.join(f), vec![0u8; (16 * MIB) as usize]).unwrap();
    }
    let sock = dir.0.join("ctl.sock").display().to_string();
    let a = format!("local:{}", dir.0.join("a.img").display());
    let b = format!("local:{}", dir.0.join("b.img").display());
    let srv = serve(&[
        "--volume",
        "v",
        "--source",
        &a,
        "--target",
        &b,
        "--secret-file",
        &sec,
        "--ctl-socket",
        &sock,
        // Both files are zeroed alike; their metadata was never synced.
        "--assume-clean",
    ]);
    let ctl = |args: &[&str]| {
        let mut all = vec!["ctl", "--socket", &sock];
        all.extend_from_slice(args);
        let (ok, out, err) = mirror_cli(&all);
        assert!(ok, "mirror {all:?}: {err}");
        out
    };
    let status = || -> serde_json::Value { serde_json::from_str(&ctl(&["status", "--json"])).unwrap() };
    assert_eq!(status()["weights"]["target"], 0);
    ctl(&["weights", "set", "--target", "30"]);
    assert_eq!(status()["weights"]["target"], 30);
    let before: Vec<u64> = (0..2).map(|i| status()["replicas"][i]["reads"].as_u64().unwrap()).collect();
    run_tool(
        Command::new("fio")
            .args([
                "--name=r",
                "--ioengine=nbd",
                "--rw=randread",
                "--bs=4k",
                "--iodepth=8",
                "--io_size=16M",
                "--size=16M",
            ])
            .arg(format!("--uri=nbd://{}/", srv.nbd)),
    );
    let after: Vec<u64> = (0..2).map(|i| status()["replicas"][i]["reads"].as_u64().unwrap()).collect();
    let (s, t) = (after[0] - before[0], after[1] - before[1]);
    assert_eq!(s + t, 4096, "one replica read per 4 KiB read");
    // Binomial(4096, 0.3): mean 1229, sd 29; 5 sd = 147.
    assert!((1082..=1376).contains(&t), "target served {t} of 4096 reads at weight 30");
    let table = ctl(&["status"]);
    assert!(table.contains("weights: source 70 / target 30") && table.contains("target"), "{table}");
    // A pin with a duration expires back to automatic weights (0: both nodes healthy).
    ctl(&["weights", "set", "--target", "100", "--for", "1s"]);
    assert_eq!(status()["weights"]["target"], 100);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(status()["weights"]["target"], 0);
    ctl(&["weights", "set", "--target", "40"]);
    ctl(&["weights", "auto"]);
    let st = status();
    assert_eq!(st["weights"]["target"], 0, "{st:#}");
    let (ok, _, err) = mirror_cli(&["ctl", "--socket", &sock, "weights", "set", "--target", "101"]);
    assert!(!ok && err.contains("101"), "{err}");
}

fn argv(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// `qemu-io` on the router's NBD export; panics on a failed command or pattern.
fn qemu_io(srv: &Serve, cmds: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", &format!("nbd://{}/", srv.nbd)]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    let text = run_tool(&mut cmd);
    assert!(!text.contains("Pattern verification failed") && !text.contains("failed:"), "{cmds:?}:\n{text}");
}

/// Waits until the replica served at `node` records nothing for its peer and its sync job (if
/// any) is done: the peer is in sync.
fn wait_clean(node: &str, sec: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_mins(1);
    loop {
        let (ok, out, err) = mirror_cli(&["status", "--node", node, "--volume", "v", "--secret-file", sec]);
        if ok {
            let js: serde_json::Value = serde_json::from_str(&out).unwrap();
            let job = js["job"]["state"].as_str().unwrap_or("none");
            if js["tracking"] == false && js["dirty_bytes"] == 0 && job != "running" {
                assert!(matches!(job, "none" | "done" | "up-to-date"), "{what}: sync job {job}: {out}");
                return;
            }
        }
        assert!(Instant::now() < deadline, "{what}: not clean after 60 s: {out}{err}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A router restarted while its target was away must not read the target's stale blocks: the
/// source's metadata (degraded, writes recorded) makes the target resync before it serves reads,
/// even with every read weighted to it.
#[test]
fn a_restarted_router_resyncs_a_stale_target_before_reading_from_it() {
    const T: &str = "serve::a_restarted_router_resyncs_a_stale_target_before_reading_from_it";
    if which("qemu-io").is_none() {
        return skip(T, "NBD", "qemu-io is not installed (cargo xtask setup)");
    }
    let dir = TempDir::new("serve-stale");
    let secret = secret_file(&dir.0);
    let sec = secret.display().to_string();
    for f in ["s.img", "t.img"] {
        std::fs::write(dir.0.join(f), vec![0u8; (16 * MIB) as usize]).unwrap();
    }
    let mut t = Replica::start(&dir.0.join("t.img"), &secret, None, &[]);
    let source_listen = free_addr();
    let s0 = Replica::start(&dir.0.join("s.img"), &secret, Some(&source_listen), &[]);
    sync_ok(&s0.addr, &t.addr, &secret, &[]);
    drop(s0);
    std::thread::sleep(Duration::from_millis(200));
    let src = format!("local:{}", dir.0.join("s.img").display());
    let tgt = format!("remote:{}", t.addr);
    let args = |weight: &'static str| -> Vec<String> {
        ["--volume", "v", "--source", &src, "--target", &tgt, "--secret-file", &sec]
            .iter()
            .map(std::string::ToString::to_string)
            .chain(["--source-listen".into(), source_listen.clone(), "--target-weight".into(), weight.into()])
            .chain(["--ctl-socket".into(), dir.0.join("ctl.sock").display().to_string()])
            .collect()
    };

    let srv = serve(&argv(&args("0")));
    qemu_io(&srv, &["write -P 0xaa 0 1M"]);
    t.kill();
    // Degraded: acknowledged from the source, recorded in its bitmap.
    qemu_io(&srv, &["write -P 0xbb 0 1M", "read -P 0xbb 0 1M"]);
    drop(srv); // SIGKILL: the router's own state is gone
    t.restart(); // holds 0xaa

    let srv = serve(&argv(&args("100")));
    // Every read weighted to the target, which is stale: the router must read the source.
    qemu_io(&srv, &["read -P 0xbb 0 1M"]);
    wait_clean(&source_listen, &sec, "resync of the stale target");
    // Back in service: now the target answers, with the resynced data.
    std::thread::sleep(Duration::from_millis(600));
    qemu_io(&srv, &["read -P 0xbb 0 1M", "read -P 0 1M 1M"]);
    drop(srv);
    assert_eq!(file_digest(&dir.0.join("s.img")), file_digest(&dir.0.join("t.img")), "replicas differ");
}

/// A replica that cannot be reached at start: refused while nothing shows it is behind (it might
/// hold newer writes), allowed with `--degraded`; once the survivor has recorded writes it knows
/// the other is behind and starts without the flag; the returning replica is resynced.
#[test]
fn serve_starts_without_an_unreachable_replica_only_when_safe_and_resyncs_it_later() {
    const T: &str = "serve::serve_starts_without_an_unreachable_replica_only_when_safe_and_resyncs_it_later";
    if which("qemu-io").is_none() {
        return skip(T, "NBD", "qemu-io is not installed (cargo xtask setup)");
    }
    let dir = TempDir::new("serve-missing");
    let secret = secret_file(&dir.0);
    let sec = secret.display().to_string();
    for f in ["s.img", "t.img"] {
        std::fs::write(dir.0.join(f), vec![0u8; (16 * MIB) as usize]).unwrap();
    }
    let mut t = Replica::start(&dir.0.join("t.img"), &secret, None, &[]);
    let source_listen = free_addr();
    let s0 = Replica::start(&dir.0.join("s.img"), &secret, Some(&source_listen), &[]);
    sync_ok(&s0.addr, &t.addr, &secret, &[]);
    drop(s0);
    t.kill();
    std::thread::sleep(Duration::from_millis(200));
    let src = format!("local:{}", dir.0.join("s.img").display());
    let tgt = format!("remote:{}", t.addr);
    let base: Vec<String> = [
        "--volume",
        "v",
        "--source",
        &src,
        "--target",
        &tgt,
        "--secret-file",
        &sec,
        "--source-listen",
        &source_listen,
        "--target-weight",
        "100",
        "--ctl-socket",
        &dir.0.join("ctl.sock").display().to_string(),
    ]
    .iter()
    .map(std::string::ToString::to_string)
    .collect();
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter().cloned().chain(extra.iter().map(std::string::ToString::to_string)).collect()
    };

    let out = Command::new(mirror_bin())
        .arg("serve")
        .args(&base)
        .args(["--nbd", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run mirror serve");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "refused with a clean error: {err}");
    assert!(err.contains("unreachable") && err.contains("--degraded"), "{err}");

    let srv = serve(&argv(&with(&["--degraded"])));
    qemu_io(&srv, &["write -P 0xcc 0 1M", "read -P 0xcc 0 1M"]);
    drop(srv);
    // The source recorded writes the target lacks: no flag needed now.
    let srv = serve(&argv(&base));
    qemu_io(&srv, &["write -P 0xdd 2M 64k"]);
    t.restart();
    wait_clean(&source_listen, &sec, "resync of the returning target");
    std::thread::sleep(Duration::from_millis(600));
    qemu_io(&srv, &["read -P 0xcc 0 1M", "read -P 0xdd 2M 64k"]);
    drop(srv);
    assert_eq!(file_digest(&dir.0.join("s.img")), file_digest(&dir.0.join("t.img")), "replicas differ");
}

/// Two replicas that were never synced hold different bytes: the router syncs the target from
/// the source before it serves reads (every read weighted to the target still sees the source's
/// data), and a second start finds them in sync.
#[test]
fn never_synced_replicas_get_an_initial_sync_before_the_target_serves_reads() {
    const T: &str = "serve::never_synced_replicas_get_an_initial_sync_before_the_target_serves_reads";
    if which("nbdcopy").is_none() {
        return skip(T, "NBD", "nbdcopy is not installed (cargo xtask setup)");
    }
    let (dir, _, sec) = never_synced_pair("serve-initial", 11);
    let source_digest = file_digest(&dir.0.join("s.img"));
    let source_listen = free_addr();
    let src = format!("local:{}", dir.0.join("s.img").display());
    let tgt = format!("local:{}", dir.0.join("t.img").display());
    let args = [
        "--volume",
        "v",
        "--source",
        &src,
        "--target",
        &tgt,
        "--secret-file",
        &sec,
        "--source-listen",
        &source_listen,
        "--target-weight",
        "100",
    ];
    let srv = serve(&args);
    let back = dir.0.join("back.img");
    run_tool(Command::new("nbdcopy").arg(format!("nbd://{}/", srv.nbd)).arg(&back));
    assert_eq!(file_digest(&back), source_digest, "reads returned something else than the source's data");
    wait_clean(&source_listen, &sec, "initial sync");
    drop(srv);
    assert_eq!(file_digest(&dir.0.join("t.img")), source_digest, "target not synced");
    // Now they share a generation: a second start serves the target at once, with the same data.
    let srv = serve(&args);
    let _ = std::fs::remove_file(&back);
    run_tool(Command::new("nbdcopy").arg(format!("nbd://{}/", srv.nbd)).arg(&back));
    assert_eq!(file_digest(&back), source_digest);
}

/// A directory with a secret and two replica files that were never synced, 16 MiB of different
/// random data each (`s.img` from `seed`, `t.img` from `seed + 1`); the secret as a path and as
/// a flag's text.
fn never_synced_pair(tag: &str, seed: u64) -> (TempDir, std::path::PathBuf, String) {
    let dir = TempDir::new(tag);
    let secret = secret_file(&dir.0);
    let sec = secret.display().to_string();
    let size = 16 * MIB as usize;
    std::fs::write(dir.0.join("s.img"), random_bytes(size, seed)).unwrap();
    std::fs::write(dir.0.join("t.img"), random_bytes(size, seed + 1)).unwrap();
    (dir, secret, sec)
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill").args([sig, &pid.to_string()]).status().is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {pid}");
}

/// The source's dirty bytes and whether it is tracking, from its embedded server.
fn source_bits(node: &str, sec: &str) -> (u64, bool) {
    let (ok, out, err) = mirror_cli(&["status", "--node", node, "--volume", "v", "--secret-file", sec]);
    assert!(ok, "mirror status: {err}");
    let js: serde_json::Value = serde_json::from_str(&out).unwrap();
    (js["dirty_bytes"].as_u64().unwrap(), js["tracking"] == true)
}

/// A router killed while a write is applied on the source but not on the target (the target
/// node dies with it): the write intent recorded in the source's bitmap before the write makes
/// the next start resync that extent, instead of trusting two replicas that differ.
#[test]
fn a_router_killed_mid_write_leaves_intent_and_the_next_start_resyncs_it() {
    const T: &str = "serve::a_router_killed_mid_write_leaves_intent_and_the_next_start_resyncs_it";
    if which("qemu-io").is_none() {
        return skip(T, "NBD", "qemu-io is not installed (cargo xtask setup)");
    }
    let dir = TempDir::new("serve-intent");
    let secret = secret_file(&dir.0);
    let sec = secret.display().to_string();
    for f in ["s.img", "t.img"] {
        std::fs::write(dir.0.join(f), vec![0u8; (16 * MIB) as usize]).unwrap();
    }
    let mut t = Replica::start(&dir.0.join("t.img"), &secret, None, &[]);
    let source_listen = free_addr();
    let s0 = Replica::start(&dir.0.join("s.img"), &secret, Some(&source_listen), &[]);
    sync_ok(&s0.addr, &t.addr, &secret, &[]);
    drop(s0);
    std::thread::sleep(Duration::from_millis(200));
    let target = t.addr.clone(); // kept across its restart
    let args = |weight: &str| {
        killed_router_args(&dir.0, &target, &sec, &source_listen, &["--target-weight", weight])
    };

    let srv = serve(&argv(&args("0")));
    qemu_io(&srv, &["write -P 0xaa 0 1M"]);
    // The target node freezes (it stops reading the router's connection), a write goes out: the
    // source applies it, the target never will, and the router dies with the target.
    signal(t.child.id(), "-STOP");
    let mut pending = Command::new("qemu-io")
        .args(["-f", "raw", &format!("nbd://{}/", srv.nbd), "-c", "write -P 0xbb 0 64k"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-io");
    std::thread::sleep(Duration::from_millis(800));
    drop(srv); // SIGKILL
    t.kill(); // SIGKILL of the stopped target: the buffered write is never applied
    let _ = pending.kill();
    let _ = pending.wait();
    let (dirty, tracking) = differing_with_intent(&dir.0, &secret);
    assert!(dirty > 0 && !tracking, "no write intent on the source: {dirty} bytes, tracking {tracking}");

    t.restart();
    let srv = serve(&argv(&args("100")));
    // Every read weighted to the target, which lacks the write: the start resynced it first.
    qemu_io(&srv, &["read -P 0xbb 0 64k", "read -P 0xaa 64k 960k"]);
    wait_clean(&source_listen, &sec, "resync of the extent with write intent");
    std::thread::sleep(Duration::from_millis(600));
    qemu_io(&srv, &["read -P 0xbb 0 64k"]);
    drop(srv);
    assert_eq!(file_digest(&dir.0.join("s.img")), file_digest(&dir.0.join("t.img")), "replicas differ");
}

/// A router killed (with its target node) during random writes spread over a whole 1 GiB sparse
/// volume, most extents cold when first written: every write the source applied had its
/// extent's intent durable first (group commit), so the next start resyncs all of them and the
/// replicas end byte-identical.
#[test]
fn a_router_killed_during_writes_over_many_cold_extents_resyncs_them_all() {
    const T: &str = "serve::a_router_killed_during_writes_over_many_cold_extents_resyncs_them_all";
    // Writes spread over the volume's 256 extents for a while (each intent recorded before its
    // first write), then the target freezes with writes in flight and the router dies with it.
    let dirty = killed_during_spread_writes(T, "serve-intent-burst", &[], |dirty| dirty >= 128 * 4 * MIB);
    assert!(dirty >= 128 * 4 * MIB, "write intent on the source: {dirty} bytes");
}

/// The same with the hot set bounded to 16 extents (`--al-extents`): the writes keep all 256
/// extents busy, so the log evicts the least recently written every two seconds (flush, then
/// clear), which the idle drop never would. Killed after evictions were seen: no extent lost its
/// intent with a write in flight, so the restart still leaves the replicas byte-identical.
#[test]
fn a_router_killed_while_its_bounded_log_evicts_resyncs_every_differing_extent() {
    const T: &str = "serve::a_router_killed_while_its_bounded_log_evicts_resyncs_every_differing_extent";
    let (mut peak, mut evictions, mut last) = (0u64, 0u32, 0u64);
    let dirty = killed_during_spread_writes(T, "serve-intent-evict", &["--al-extents", "16"], |dirty| {
        // An eviction: the intent on disk fell by at least a quarter of the limit (4 extents)
        // from the highest seen since the last one.
        peak = peak.max(dirty);
        if dirty + 4 * 4 * MIB <= peak {
            evictions += 1;
            peak = dirty;
        }
        last = dirty;
        evictions >= 3 && last >= 8 * 4 * MIB
    });
    assert!(dirty > 0, "write intent on the source: {dirty} bytes");
}

/// Runs fio random writes at QD32 over a 1 GiB sparse volume served with `extra`, polls the
/// source's intent bytes (every 200 ms, up to a minute) until `ready` says so, then freezes the
/// target, SIGKILLs the router and the target, checks the replicas differ, restarts both, waits
/// for the resync and checks the replicas are byte-identical. Returns the intent bytes the
/// killed router left on the source.
fn killed_during_spread_writes(
    t: &str,
    tag: &str,
    extra: &[&str],
    mut ready: impl FnMut(u64) -> bool,
) -> u64 {
    if which("fio").is_none() {
        skip(t, "NBD", "fio is not installed (cargo xtask setup)");
        return u64::MAX;
    }
    let dir = TempDir::new(tag);
    let secret = secret_file(&dir.0);
    let sec = secret.display().to_string();
    for f in ["s.img", "t.img"] {
        std::fs::File::create(dir.0.join(f)).unwrap().set_len(1 << 30).unwrap();
    }
    let mut t = Replica::start(&dir.0.join("t.img"), &secret, None, &[]);
    let source_listen = free_addr();
    let target = t.addr.clone(); // kept across its restart
    let args = |first: bool| {
        // Two sparse files, both all zeros: identical without an initial sync.
        let clean: &[&str] = if first { &["--assume-clean"] } else { &[] };
        killed_router_args(
            &dir.0,
            &target,
            &sec,
            &source_listen,
            &[&["--target-weight", "100"], clean, extra].concat(),
        )
    };
    let srv = serve(&argv(&args(true)));
    let mut fio = Command::new("fio")
        .args([
            "--name=burst",
            "--ioengine=nbd",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--size=1g",
            "--time_based",
            "--runtime=120",
            "--norandommap",
            "--randrepeat=0",
        ])
        .arg(format!("--uri=nbd://{}/", srv.nbd))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("fio");
    let deadline = Instant::now() + Duration::from_mins(1);
    loop {
        let (dirty, _) = source_bits(&source_listen, &sec);
        if ready(dirty) {
            break;
        }
        assert!(Instant::now() < deadline, "not ready in 60 s; intent on the source: {} MiB", dirty >> 20);
        std::thread::sleep(Duration::from_millis(200));
    }
    signal(t.child.id(), "-STOP");
    std::thread::sleep(Duration::from_millis(500));
    drop(srv); // SIGKILL
    t.kill(); // SIGKILL of the stopped target: the writes buffered for it are never applied
    let _ = fio.kill();
    let _ = fio.wait();
    let (dirty, tracking) = differing_with_intent(&dir.0, &secret);
    assert!(!tracking, "intent, not degraded tracking");

    t.restart();
    let srv = serve(&argv(&args(false)));
    wait_clean(&source_listen, &sec, "resync of every extent with write intent");
    drop(srv);
    assert_eq!(file_digest(&dir.0.join("s.img")), file_digest(&dir.0.join("t.img")), "replicas differ");
    dirty
}

/// `mirror serve` arguments of the router-kill tests: the local source `DIR/s.img` (its replica
/// server on `source_listen`), the remote target at `target`, then `extra`. The write deadline is
/// longer than the tests: the router must die before it notices the frozen target (its deadline
/// would fail the target and record the write as degraded instead of as intent).
fn killed_router_args(
    dir: &std::path::Path,
    target: &str,
    sec: &str,
    source_listen: &str,
    extra: &[&str],
) -> Vec<String> {
    let src = format!("local:{}", dir.join("s.img").display());
    let tgt = format!("remote:{target}");
    [
        "--volume",
        "v",
        "--source",
        &src,
        "--target",
        &tgt,
        "--secret-file",
        sec,
        "--source-listen",
        source_listen,
        "--write-deadline-floor",
        "10s",
        "--write-deadline-cap",
        "10s",
    ]
    .iter()
    .chain(extra)
    .map(std::string::ToString::to_string)
    .collect()
}

/// After a router-kill: the replica files differ (the test did what it meant to); returns the
/// source's offline metadata (bytes with write intent, tracking).
fn differing_with_intent(dir: &std::path::Path, secret: &std::path::Path) -> (u64, bool) {
    let (s, t) = (file_digest(&dir.join("s.img")), file_digest(&dir.join("t.img")));
    assert_ne!(s, t, "the test did not make the replicas differ");
    source_bits_offline(&dir.join("s.img"), secret)
}

/// The source's metadata while no router runs: served briefly by a replica process.
fn source_bits_offline(path: &std::path::Path, secret: &std::path::Path) -> (u64, bool) {
    let r = Replica::start(path, secret, None, &[]);
    source_bits(&r.addr, &secret.display().to_string())
}

/// A router stopped cleanly (SIGTERM) drops its write intent after the final flush: the next
/// start needs no resync. While it runs, the intent of the written extent is on the source.
#[test]
fn a_clean_stop_drops_the_write_intent() {
    const T: &str = "serve::a_clean_stop_drops_the_write_intent";
    if which("qemu-io").is_none() {
        return skip(T, "NBD", "qemu-io is not installed (cargo xtask setup)");
    }
    let dir = TempDir::new("serve-clean");
    let secret = secret_file(&dir.0);
    let sec = secret.display().to_string();
    for f in ["s.img", "t.img"] {
        std::fs::write(dir.0.join(f), vec![0u8; (16 * MIB) as usize]).unwrap();
    }
    let (src, tgt) = (
        format!("local:{}", dir.0.join("s.img").display()),
        format!("local:{}", dir.0.join("t.img").display()),
    );
    let source_listen = free_addr();
    let args = [
        "--volume",
        "v",
        "--source",
        &src,
        "--target",
        &tgt,
        "--secret-file",
        &sec,
        "--source-listen",
        &source_listen,
        "--assume-clean",
    ];
    let mut srv = serve(&args);
    qemu_io(&srv, &["write -P 0xcc 5M 8k"]);
    let (dirty, tracking) = source_bits(&source_listen, &sec);
    assert_eq!((dirty, tracking), (4 << 20, false), "the written extent's intent (4 MiB), no tracking");
    signal(srv.child.0.id(), "-TERM");
    let status = srv.child.0.wait().unwrap();
    assert!(status.success(), "serve exit {status:?}");
    let (dirty, _) = source_bits_offline(&dir.0.join("s.img"), &secret);
    assert_eq!(dirty, 0, "intent left after a clean stop");
    assert_eq!(file_digest(&dir.0.join("s.img")), file_digest(&dir.0.join("t.img")));
}

/// `serve --volume v` exports `v`, which is also the default export; a client asking for
/// another name is refused, and told the name there is.
#[test]
fn the_export_is_named_after_the_volume() {
    const T: &str = "serve::the_export_is_named_after_the_volume";
    for tool in ["qemu-io", "nbdinfo"] {
        if which(tool).is_none() {
            return skip(T, "NBD", &format!("{tool} is not installed (cargo xtask setup)"));
        }
    }
    let dir = TempDir::new("serve-export");
    let secret = secret_file(&dir.0);
    let sec = secret.display().to_string();
    let size = 8 * MIB;
    for f in ["s.img", "t.img"] {
        std::fs::write(dir.0.join(f), vec![0u8; size as usize]).unwrap();
    }
    let (src, tgt) = (
        format!("local:{}", dir.0.join("s.img").display()),
        format!("local:{}", dir.0.join("t.img").display()),
    );
    let unix = dir.0.join("nbd.sock");
    let unix_arg = unix.display().to_string();
    let srv = serve(&[
        "--volume",
        "v",
        "--source",
        &src,
        "--target",
        &tgt,
        "--secret-file",
        &sec,
        "--assume-clean",
        "--nbd-unix",
        &unix_arg,
    ]);
    let sock = unix.display();

    // By name and as the default export, over the Unix socket; the list names it.
    let text = run_tool(Command::new("nbdinfo").args(["--json", &format!("nbd+unix:///v?socket={sock}")]));
    let js: serde_json::Value = serde_json::from_str(&text).expect("nbdinfo json");
    assert_eq!(js["exports"][0]["export-name"], "v", "{text}");
    assert_eq!(js["exports"][0]["export-size"], size, "{text}");
    let text = run_tool(Command::new("nbdinfo").args(["--size", &format!("nbd+unix:///?socket={sock}")]));
    assert_eq!(text.trim(), size.to_string(), "default export");
    let text = run_tool(Command::new("nbdinfo").args(["--list", "--json", &format!("nbd://{}", srv.nbd)]));
    let js: serde_json::Value = serde_json::from_str(&text).expect("nbdinfo --list json");
    let names: Vec<&str> =
        js["exports"].as_array().expect("exports").iter().filter_map(|e| e["export-name"].as_str()).collect();
    assert_eq!(names, ["v"], "{text}");

    // qemu-io by name over TCP: a write reads back.
    let text = run_tool(Command::new("qemu-io").args(["-f", "raw", &format!("nbd://{}/v", srv.nbd)]).args([
        "-c",
        "write -P 0x5a 4k 4k",
        "-c",
        "read -P 0x5a 4k 4k",
    ]));
    assert!(!text.contains("Pattern verification failed"), "{text}");

    // Another name is refused; qemu-io shows the server's message, which names the export.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", &format!("nbd://{}/w", srv.nbd), "-c", "read 0 4k"])
        .output()
        .expect("qemu-io");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "export w was opened:\n{text}");
    assert!(text.contains(r#"no export named "w" (this server exports "v")"#), "{text}");
    let out = Command::new("nbdinfo").arg(format!("nbd+unix:///w?socket={sock}")).output().expect("nbdinfo");
    assert!(!out.status.success(), "nbdinfo opened export w");
    assert!(String::from_utf8_lossy(&out.stderr).contains("export: w"), "{out:?}");
}

/// One row of the schema in docs/status.md: a path (`replicas[].node.sync`), its JSON type and
/// whether it may be `null`.
struct SchemaRow {
    path: String,
    kind: String,
    nullable: bool,
}

/// The schema table of docs/status.md.
fn status_schema() -> Vec<SchemaRow> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/status.md")).unwrap();
    let rows: Vec<SchemaRow> = doc
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let path = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            let kind = cells.get(2)?;
            let (kind, nullable) = kind.strip_suffix(" or null").map_or((*kind, false), |k| (k, true));
            Some(SchemaRow { path: path.into(), kind: kind.into(), nullable })
        })
        .collect();
    assert!(rows.len() > 20, "the schema table of docs/status.md: {} rows", rows.len());
    rows
}

/// Holds `v` (at `path`) to the schema: records each documented path it meets in `seen`, and
/// what does not fit in the result.
fn check_schema(
    v: &serde_json::Value,
    path: &str,
    rows: &[SchemaRow],
    seen: &mut Vec<String>,
) -> Vec<String> {
    use serde_json::Value;
    let mut bad = Vec::new();
    if !path.is_empty() {
        let Some(row) = rows.iter().find(|r| r.path == path) else {
            return vec![format!("{path}: not in docs/status.md ({v})")];
        };
        if !seen.iter().any(|s| s == path) {
            seen.push(path.into());
        }
        let fits = match v {
            Value::Null => row.nullable,
            Value::Number(n) if row.kind == "integer" => n.is_u64() || n.is_i64(),
            Value::Number(_) => row.kind == "number",
            Value::String(_) => row.kind == "string",
            Value::Bool(_) => row.kind == "boolean",
            Value::Object(_) => row.kind == "object",
            Value::Array(_) => row.kind == "array",
        };
        if !fits {
            bad.push(format!(
                "{path}: {v} is not {}{}",
                row.kind,
                if row.nullable { " or null" } else { "" }
            ));
        }
    }
    let prefix = if path.is_empty() { String::new() } else { format!("{path}.") };
    match v {
        Value::Object(map) => {
            for r in rows {
                let child = r.path.strip_prefix(&prefix).filter(|c| !c.contains(['.', '[']));
                if let Some(key) = child.filter(|c| !map.contains_key(*c)) {
                    bad.push(format!("{path}: no `{key}`"));
                }
            }
            for (k, x) in map {
                bad.extend(check_schema(x, &format!("{prefix}{k}"), rows, seen));
            }
        }
        Value::Array(items) if rows.iter().any(|r| r.path == format!("{path}[]")) => {
            for x in items {
                bad.extend(check_schema(x, &format!("{path}[]"), rows, seen));
            }
        }
        _ => {}
    }
    bad
}

/// `mirror ctl status --json` of a real `serve`, while a sync runs and after, against the schema
/// docs/status.md writes down: every key documented with its type, every documented key there.
#[test]
fn ctl_status_json_has_the_documented_shape() {
    const T: &str = "serve::ctl_status_json_has_the_documented_shape";
    if !is_root() {
        return skip(T, "NBD", "the control socket is root only");
    }
    let rows = status_schema();
    let (dir, secret, sec) = never_synced_pair("serve-schema", 21);
    // A paced source: the initial sync of the never-synced pair takes about 8 s, long enough to
    // see its job in the status.
    let s = Replica::start(
        &dir.0.join("s.img"),
        &secret,
        None,
        &["--sync-min-rate", "2M", "--sync-max-rate", "2M"],
    );
    let t = Replica::start(&dir.0.join("t.img"), &secret, None, &[]);
    let sock = dir.0.join("ctl.sock").display().to_string();
    let flags = format!(
        "--volume v --source remote:{} --target remote:{} --secret-file {sec} --ctl-socket {sock}",
        s.addr, t.addr
    );
    let _srv = serve(&flags.split_whitespace().collect::<Vec<_>>());
    let mut seen = Vec::new();
    let (mut docs, mut syncing) = (0, 0);
    let deadline = Instant::now() + Duration::from_mins(1);
    loop {
        let (ok, out, err) = mirror_cli(&["ctl", "--socket", &sock, "status", "--json"]);
        assert!(ok, "ctl status: {err}");
        let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
        let bad = check_schema(&doc, "", &rows, &mut seen);
        assert!(bad.is_empty(), "not as docs/status.md says:\n{}\n{doc:#}", bad.join("\n"));
        docs += 1;
        syncing += usize::from(doc["replicas"][1]["node"]["sync"]["state"] == "syncing");
        let missing: Vec<&str> =
            rows.iter().map(|r| r.path.as_str()).filter(|p| !seen.iter().any(|s| s == p)).collect();
        if missing.is_empty() && doc["replicas"][1]["state"] == "in-sync" {
            break;
        }
        assert!(Instant::now() < deadline, "after {docs} documents, never seen: {missing:?}\n{doc:#}");
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(syncing > 0, "the target's sync job was seen running");
    eprintln!("{T}: {docs} documents checked against {} rows, {syncing} during the sync", rows.len());
}
