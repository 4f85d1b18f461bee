//! The ublk frontend end to end, inside the VM (`cargo xtask vm-test`, Debian 6.12 with
//! ublk_drv): `mirror serve --frontend ublk` over two local replicas, driven through
//! /dev/ublkbN by fio, ext4 and a SIGKILL of the daemon.

use std::{
    io::BufRead,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use mirror_tests::{
    env::{mirror_bin, not_in_vm, skip, which},
    fs::{file_digest, random_bytes, secret_file, TempDir},
    proc::{mirror_cli, run_tool},
};

const MIB: u64 = 1 << 20;

/// `mirror serve --frontend ublk`, killed (SIGKILL) on drop unless stopped.
struct Serve {
    child: std::process::Child,
    dev: String,
    id: i32,
}

impl Serve {
    /// SIGTERM, and waits for a clean exit (the device is stopped, deleted, replicas flushed).
    fn stop(&mut self) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                assert!(st.success(), "mirror serve exited with {st}");
                return;
            }
            assert!(Instant::now() < deadline, "mirror serve did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
            // A killed daemon leaves its device behind (dead, or quiesced with recovery).
            let _ = Command::new(mirror_bin()).args(["ublk", "del", &self.id.to_string()]).output();
        }
    }
}

struct Vol {
    /// Where the replica files (and the control socket) are: the temporary directory, or a
    /// tmpfs mounted inside it (unmounted on drop, before the directory goes).
    data: PathBuf,
    tmpfs: bool,
    secret: String,
    size: u64,
    _dir: TempDir,
}

impl Vol {
    fn new(tag: &str, size: u64) -> Vol {
        Vol::create(tag, size, false)
    }

    /// The replica files on a tmpfs of their own: the memory-backed read path (plain `pread`
    /// on the queue thread once tmpfs refuses `RWF_NOWAIT`) instead of the VM's overlay /tmp.
    fn on_tmpfs(tag: &str, size: u64) -> Vol {
        Vol::create(tag, size, true)
    }

    fn create(tag: &str, size: u64, tmpfs: bool) -> Vol {
        let dir = TempDir::new(tag);
        let data = if tmpfs {
            let m = dir.0.join("mem");
            std::fs::create_dir(&m).unwrap();
            run_tool(
                Command::new("mount")
                    .args(["-t", "tmpfs", "-o"])
                    .arg(format!("size={}", 3 * size))
                    .arg("mirror-test")
                    .arg(&m),
            );
            m
        } else {
            dir.0.clone()
        };
        let secret = secret_file(&data).display().to_string();
        for f in ["s.img", "t.img"] {
            std::fs::File::create(data.join(f)).and_then(|f| f.set_len(size)).unwrap();
        }
        Vol { data, tmpfs, secret, size, _dir: dir }
    }

    fn path(&self, f: &str) -> PathBuf {
        self.data.join(f)
    }

    fn ctl_sock(&self) -> String {
        self.path("ctl.sock").display().to_string()
    }

    fn serve(&self, extra: &[&str]) -> Serve {
        let mut child = Command::new(mirror_bin())
            .arg("serve")
            .args(["--volume", "v", "--secret-file", &self.secret, "--nbd", "127.0.0.1:0"])
            .arg(format!("--source=local:{}", self.path("s.img").display()))
            .arg(format!("--target=local:{}", self.path("t.img").display()))
            .args(["--ctl-socket", &self.ctl_sock(), "--frontend", "ublk"])
            // Both files start zeroed alike (their metadata was never synced).
            .arg("--assume-clean")
            .args(extra)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn mirror serve");
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut dev = None;
        for _ in 0..4 {
            let mut line = String::new();
            if out.read_line(&mut line).unwrap() == 0 {
                break;
            }
            if let Some(d) = line.trim().strip_prefix("ublk device ") {
                dev = Some(d.to_string());
                break;
            }
        }
        let Some(dev) = dev else {
            let _ = child.kill();
            panic!("mirror serve did not report a ublk device: {:?}", child.wait_with_output());
        };
        std::thread::spawn(move || for _ in out.lines() {});
        let id = dev.trim_start_matches("/dev/ublkb").parse().expect("ublk id");
        Serve { child, dev, id }
    }

    fn assert_identical(&self, what: &str) {
        assert_eq!(
            file_digest(&self.path("s.img")),
            file_digest(&self.path("t.img")),
            "replicas differ after {what}"
        );
    }
}

impl Drop for Vol {
    fn drop(&mut self) {
        if self.tmpfs {
            let _ = Command::new("umount").arg("-l").arg(&self.data).status();
        }
    }
}

/// Skips (loudly) outside the VM or without a tool.
fn cannot_run(test: &str, tools: &[&str]) -> bool {
    if not_in_vm(test) {
        return true;
    }
    for t in tools {
        if which(t).is_none() {
            skip(test, "VM", &format!("{t} is not installed (cargo xtask setup)"));
            return true;
        }
    }
    false
}

fn fio_verify(dev: &str, size: &str, extra: &[&str]) -> Command {
    let mut c = Command::new("fio");
    c.args(["--name=verify", "--ioengine=io_uring", "--direct=1", "--rw=randwrite", "--bs=4k"])
        .args(["--iodepth=32", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1"])
        .args(["--verify_backlog=256", "--randrepeat=0", "--verify_state_save=0", "--group_reporting"])
        .arg(format!("--size={size}"))
        .arg(format!("--filename={dev}"))
        .args(extra);
    c
}

/// fio verifying random writes from two jobs on /dev/ublkbN (two queues, and `extra` serve
/// flags), then a clean stop and both replica files identical.
fn fio_verify_and_compare(vol: &Vol, extra: &[&str]) {
    let mut srv = vol.serve(&[&["--ublk-queues", "2"], extra].concat());
    let size = std::fs::read_to_string(format!("/sys/block/ublkb{}/size", srv.id)).unwrap();
    assert_eq!(size.trim().parse::<u64>().unwrap() * 512, vol.size, "device size");
    // Two jobs on disjoint halves: a block written by one job is never rewritten by the other
    // (overlapping jobs make fio's verify fail on correct data).
    let text = run_tool(&mut fio_verify(&srv.dev, "32M", &["--numjobs=2", "--offset_increment=32M"]));
    assert!(text.contains("err= 0"), "fio reports errors:\n{text}");
    srv.stop();
    assert!(!Path::new(&srv.dev).exists(), "{} still there after a clean stop", srv.dev);
    vol.assert_identical("fio verify");
    // The data is really there: both replicas are not all zeroes.
    let s = std::fs::read(vol.path("s.img")).unwrap();
    assert!(s.iter().any(|&b| b != 0), "nothing reached the replicas");
}

#[test]
fn fio_verify_through_ublk_leaves_both_replicas_identical() {
    const T: &str = "ublk::fio_verify_through_ublk_leaves_both_replicas_identical";
    if cannot_run(T, &["fio"]) {
        return;
    }
    fio_verify_and_compare(&Vol::new("ublk-fio", 64 * MIB), &[]);
}

/// The other data paths: reads from memory-backed files (plain `pread` on the queue thread) and
/// the second replica's writes on the queue's writer thread.
#[test]
fn fio_verify_through_ublk_with_replicas_on_tmpfs_and_parallel_writes() {
    const T: &str = "ublk::fio_verify_through_ublk_with_replicas_on_tmpfs_and_parallel_writes";
    if cannot_run(T, &["fio"]) {
        return;
    }
    fio_verify_and_compare(&Vol::on_tmpfs("ublk-fio-tmpfs", 64 * MIB), &["--ublk-parallel-writes"]);
}

#[test]
fn ext4_on_ublk_mounts_keeps_files_and_checks_clean() {
    const T: &str = "ublk::ext4_on_ublk_mounts_keeps_files_and_checks_clean";
    if cannot_run(T, &["mkfs.ext4", "fsck"]) {
        return;
    }
    let vol = Vol::new("ublk-ext4", 128 * MIB);
    let mut srv = vol.serve(&[]);
    run_tool(Command::new("mkfs.ext4").args(["-q", "-F", &srv.dev]));
    let mnt = vol.path("mnt");
    std::fs::create_dir(&mnt).unwrap();
    run_tool(Command::new("mount").arg(&srv.dev).arg(&mnt));
    let files: Vec<(PathBuf, Vec<u8>)> = (0..8u64)
        .map(|i| (mnt.join(format!("f{i}")), random_bytes((i as usize + 1) * 700_000, i + 11)))
        .collect();
    for (p, d) in &files {
        std::fs::write(p, d).unwrap();
    }
    run_tool(&mut Command::new("sync"));
    // Read back from the device, not the page cache: remount.
    run_tool(Command::new("umount").arg(&mnt));
    run_tool(Command::new("mount").arg(&srv.dev).arg(&mnt));
    for (p, d) in &files {
        assert!(std::fs::read(p).unwrap() == *d, "{} differs after remount", p.display());
    }
    run_tool(Command::new("umount").arg(&mnt));
    let text = run_tool(Command::new("fsck").args(["-fn", &srv.dev]));
    assert!(text.contains("clean") || text.contains("files"), "fsck said: {text}");
    srv.stop();
    vol.assert_identical("ext4");
}

#[test]
fn sigkill_under_fio_then_recover_loses_no_acknowledged_write() {
    const T: &str = "ublk::sigkill_under_fio_then_recover_loses_no_acknowledged_write";
    if cannot_run(T, &["fio"]) {
        return;
    }
    let vol = Vol::new("ublk-kill", 64 * MIB);
    let mut srv = vol.serve(&["--ublk-recovery"]);
    let (dev, id) = (srv.dev.clone(), srv.id);
    // fio writes and verifies what it wrote; the daemon dies in the middle and a new one takes
    // the device over: fio sees no error, and every block it verifies reads back as written.
    let fio =
        fio_verify(&dev, "48M", &[]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("run fio");
    std::thread::sleep(Duration::from_secs(3));
    let pid = srv.child.id();
    srv.kill();
    let (ok, list, err) = mirror_cli(&["ublk", "list"]);
    assert!(ok, "mirror ublk list: {err}");
    assert!(list.lines().any(|l| l.starts_with(&format!("{id}\t"))), "device {id} not listed: {list}");
    // The kernel quiesces the device once it notices the daemon is gone; `--json` says so with
    // the same figures as the line.
    let deadline = Instant::now() + Duration::from_secs(20);
    let dev_json = loop {
        let (_, list, _) = mirror_cli(&["ublk", "list"]);
        if let Some(line) = list.lines().find(|l| l.starts_with(&format!("{id}\tquiesced"))) {
            let (ok, json, err) = mirror_cli(&["ublk", "list", "--json"]);
            assert!(ok, "mirror ublk list --json: {err}");
            let all: serde_json::Value = serde_json::from_str(&json).unwrap();
            let d = all.as_array().unwrap().iter().find(|d| d["id"] == id).cloned();
            let d = d.unwrap_or_else(|| panic!("device {id} not in {json}"));
            let want = format!(
                "{id}\t{}\tqueues={} depth={} pid={}\t{}",
                d["state"].as_str().unwrap(),
                d["queues"],
                d["depth"],
                d["pid"],
                d["block_device"].as_str().unwrap()
            );
            assert_eq!(line, want, "the line and the JSON disagree: {json}");
            break d;
        }
        assert!(Instant::now() < deadline, "device {id} not quiesced: {list}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(dev_json["block_device"], dev.as_str(), "{dev_json}");
    assert_eq!(dev_json["pid"], pid, "the daemon that served it: {dev_json}");
    let mut srv2 = vol.serve(&["--ublk-recover", &id.to_string()]);
    assert_eq!(srv2.dev, dev, "recovered a different device");
    let out = fio.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "fio failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("err= 0"), "fio reports errors:\n{text}");
    srv2.stop();
    let (_, list, _) = mirror_cli(&["ublk", "list"]);
    assert!(!list.lines().any(|l| l.starts_with(&format!("{id}\t"))), "device {id} left: {list}");
    vol.assert_identical("kill and recovery");
}

#[test]
fn sigkill_without_recovery_fails_io_and_the_device_is_deleted() {
    const T: &str = "ublk::sigkill_without_recovery_fails_io_and_the_device_is_deleted";
    if cannot_run(T, &["fio"]) {
        return;
    }
    let vol = Vol::new("ublk-kill-del", 64 * MIB);
    let mut srv = vol.serve(&[]);
    let id = srv.id;
    let fio = fio_verify(&srv.dev, "48M", &["--verify_fatal=0", "--continue_on_error=all"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run fio");
    std::thread::sleep(Duration::from_secs(2));
    srv.kill();
    // No hung I/O: fio ends on its own (with errors) within a bounded time.
    let started = Instant::now();
    let mut fio = fio;
    loop {
        if fio.try_wait().unwrap().is_some() {
            break;
        }
        assert!(started.elapsed() < Duration::from_mins(1), "fio hangs after the daemon was killed");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (ok, _, err) = mirror_cli(&["ublk", "del", &id.to_string()]);
    assert!(ok, "mirror ublk del {id}: {err}");
    let (_, list, _) = mirror_cli(&["ublk", "list"]);
    assert!(!list.lines().any(|l| l.starts_with(&format!("{id}\t"))), "device {id} left: {list}");
}

#[test]
fn reads_follow_weights_30_70_through_ublk() {
    const T: &str = "ublk::reads_follow_weights_30_70_through_ublk";
    if cannot_run(T, &["fio"]) {
        return;
    }
    let vol = Vol::new("ublk-weights", 32 * MIB);
    let mut srv = vol.serve(&[]);
    let sock = vol.ctl_sock();
    let ctl = |args: &[&str]| {
        let mut all = vec!["ctl", "--socket", &sock];
        all.extend_from_slice(args);
        let (ok, out, err) = mirror_cli(&all);
        assert!(ok, "mirror {all:?}: {err}");
        out
    };
    ctl(&["weights", "set", "--target", "70"]);
    let status = || -> serde_json::Value { serde_json::from_str(&ctl(&["status", "--json"])).unwrap() };
    assert_eq!(status()["weights"]["target"], 70);
    let reads =
        || -> Vec<u64> { (0..2).map(|i| status()["replicas"][i]["reads"].as_u64().unwrap()).collect() };
    let before = reads();
    run_tool(Command::new("fio").args([
        "--name=r",
        "--ioengine=io_uring",
        "--direct=1",
        "--rw=randread",
        "--bs=4k",
        "--iodepth=16",
        "--io_size=16M",
        "--size=32M",
        &format!("--filename={}", srv.dev),
    ]));
    let after = reads();
    let (s, t) = (after[0] - before[0], after[1] - before[1]);
    // fio's 4096 reads, plus whatever the kernel read on its own (partition scan, readahead).
    let n = s + t;
    assert!((4096..4096 + 256).contains(&n), "{n} replica reads for 4096 reads");
    // Binomial(n, 0.7): sd = sqrt(n * 0.21) (~29 for 4096); accept 5 sd.
    let (mean, sd) = (n as f64 * 0.7, (n as f64 * 0.21).sqrt());
    assert!((t as f64 - mean).abs() <= 5.0 * sd, "target served {t} of {n} reads at weight 70");
    srv.stop();
}

#[test]
fn without_ublk_serve_names_the_nbd_frontend_and_auto_falls_back_to_it() {
    const T: &str = "ublk::without_ublk_serve_names_the_nbd_frontend_and_auto_falls_back_to_it";
    if Path::new("/dev/ublk-control").exists() {
        return skip(T, "NOUBLK", "this kernel has ublk (the VM tests cover it)");
    }
    let vol = Vol::new("ublk-absent", 4 * MIB);
    let base = |frontend: &str| {
        let mut c = Command::new(mirror_bin());
        c.arg("serve")
            .args(["--volume", "v", "--secret-file", &vol.secret, "--nbd", "127.0.0.1:0"])
            .arg(format!("--source=local:{}", vol.path("s.img").display()))
            .arg(format!("--target=local:{}", vol.path("t.img").display()))
            .args(["--ctl-socket", &vol.ctl_sock(), "--frontend", frontend, "--assume-clean"])
            .env("RUST_LOG", "warn");
        c
    };
    let out = base("ublk").output().expect("run mirror serve");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "--frontend ublk without ublk succeeded");
    assert_eq!(out.status.code(), Some(1), "a clean error exit, not a crash: {err}");
    assert!(err.contains("ublk is not available") && err.contains("NBD frontend"), "{err}");
    // auto: a warning, and NBD serves.
    let mut child = base("auto").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    // `serve` installs its SIGTERM handler just after printing its addresses.
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(line.starts_with("nbd listening on "), "auto without ublk: {line:?} {err}");
    assert!(err.contains("serving NBD only"), "{err}");
    assert!(out.status.success(), "{err}");
}
