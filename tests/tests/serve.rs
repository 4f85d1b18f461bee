//! `mirror serve` end to end: the router behind the NBD frontend, driven by fio's nbd engine (a
//! client nobody here wrote), with a replica server killed in the middle of a verifying run.

mod support;

use std::{
    io::BufRead,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use support::{file_digest, mirror_bin, random_bytes, secret_file, skip, which, Replica, TempDir};

const MIB: u64 = 1 << 20;

struct Serve {
    child: std::process::Child,
    nbd: String,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_addr() -> String {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string()
}

fn serve(args: &[&str]) -> Serve {
    let mut child = Command::new(mirror_bin())
        .arg("serve")
        .args(args)
        .args(["--nbd", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn mirror serve");
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let nbd = line
        .trim()
        .strip_prefix("nbd listening on ")
        .unwrap_or_else(|| panic!("serve said {line:?}"))
        .to_string();
    std::thread::spawn(move || for _ in out.lines() {});
    Serve { child, nbd }
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
    support::sync_ok(&s0.addr, &t.addr, &secret, &[]);
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
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (ok, out, _) = support::mirror_cli(&[
            "status",
            "--node",
            &source_listen,
            "--volume",
            "v",
            "--secret-file",
            &sec,
        ]);
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

fn run_tool(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
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
    support::sync_ok(&s0.addr, &t.addr, &secret, &[]);
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
    if !support::is_root() {
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
    ]);
    let ctl = |args: &[&str]| {
        let mut all = vec!["ctl", "--socket", &sock];
        all.extend_from_slice(args);
        let (ok, out, err) = support::mirror_cli(&all);
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
    let (ok, _, err) = support::mirror_cli(&["ctl", "--socket", &sock, "weights", "set", "--target", "101"]);
    assert!(!ok && err.contains("101"), "{err}");
}
