//! A replica's disk failing with an errno, end to end: replica files on small tmpfs filesystems
//! that run out of space under `mirror serve`. The replica that fills first is failed and the
//! write is acknowledged from the survivor; when the survivor fills too, the application sees
//! ENOSPC (not EIO): through NBD with `qemu-io`, once with the local source filling first and
//! once with the remote target (its errno crosses the replication protocol), and through ublk
//! with `dd oflag=direct` inside the VM.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::Command,
};

use mirror_tests::{
    env::{mirror_bin, skip, which},
    fs::{secret_file, TempDir},
    proc::{drain, mirror_cli, run_tool, spawn_until, Kill, Replica},
};

const MIB: u64 = 1 << 20;
const ENOSPC_TEXT: &str = "No space left on device";

/// A tmpfs of `size` bytes mounted in a directory of its own, unmounted on drop.
struct SmallFs {
    dir: PathBuf,
}

impl SmallFs {
    fn mount(parent: &Path, name: &str, size: u64) -> SmallFs {
        let dir = parent.join(name);
        std::fs::create_dir(&dir).unwrap();
        run_tool(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o"])
                .arg(format!("size={size}"))
                .arg("mirror-test")
                .arg(&dir),
        );
        SmallFs { dir }
    }

    /// A sparse file of `size` bytes (larger than the filesystem) in it.
    fn sparse(&self, name: &str, size: u64) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::File::create(&p).and_then(|f| f.set_len(size)).unwrap();
        p
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// `mirror serve`, killed on drop; `addr` is what it printed after `prefix`.
struct Serve {
    _child: Kill,
    addr: String,
    ctl: String,
}

impl Serve {
    fn start(dir: &Path, secret: &Path, source: &str, target: &str, prefix: &str, extra: &[&str]) -> Serve {
        let ctl = dir.join("ctl.sock").display().to_string();
        let (child, addr, out) = spawn_until(
            Command::new(mirror_bin())
                .args(["serve", "--volume", "v", "--nbd", "127.0.0.1:0"])
                .args(["--ctl-socket", &ctl, "--secret-file"])
                .arg(secret)
                .arg(format!("--source={source}"))
                .arg(format!("--target={target}"))
                // Both files start zeroed alike (their metadata was never synced); reads go to
                // the source while it is in sync.
                .args(["--assume-clean", "--target-weight", "0"])
                .args(extra)
                .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into())),
            prefix,
        )
        .unwrap_or_else(|e| panic!("mirror serve: {e:#}"));
        drain(out);
        Serve { _child: Kill(child), addr, ctl }
    }

    /// The replicas' states from `mirror ctl status --json`: (source, target).
    fn states(&self) -> (String, String) {
        let (ok, out, err) = mirror_cli(&["ctl", "--socket", &self.ctl, "status", "--json"]);
        assert!(ok, "mirror ctl status: {err}");
        let st: serde_json::Value = serde_json::from_str(&out).unwrap();
        let state = |i: usize| st["replicas"][i]["state"].as_str().unwrap_or("?").to_string();
        (state(0), state(1))
    }
}

/// `qemu-io` writing 1 MiB pieces (pattern = index + 1) at `[first, last)` MiB: whether every
/// write succeeded (qemu-io exits 1 after a failed command), and its output.
fn qemu_io_writes(nbd: &str, first: u64, last: u64) -> (bool, String) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", &format!("nbd://{nbd}/")]);
    for i in first..last {
        cmd.args(["-c", &format!("write -P {} {}M 1M", i + 1, i)]);
    }
    let out = cmd.output().expect("run qemu-io");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn qemu_io_reads_back(nbd: &str, first: u64, last: u64) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", &format!("nbd://{nbd}/")]);
    for i in first..last {
        cmd.args(["-c", &format!("read -P {} {}M 1M", i + 1, i)]);
    }
    let text = run_tool(&mut cmd);
    assert!(!text.contains("failed"), "read back:\n{text}");
}

fn cannot_run(test: &str, tool: &str) -> bool {
    if !mirror_tests::env::is_root() {
        skip(test, "NBD", "needs root (mounts a tmpfs, uses the root-only control socket)");
        return true;
    }
    if which(tool).is_none() {
        skip(test, "NBD", &format!("{tool} is not installed (cargo xtask setup)"));
        return true;
    }
    false
}

/// Writes past the space of the replica that fills first (all acknowledged by the other, which
/// then serves the reads), then past the other's: the first write that fails on both reports
/// ENOSPC. `small`, `large`: which replica (0 = local source, 1 = remote target) gets the 8 MiB
/// and which the 16 MiB filesystem.
fn fill_both(test: &str, small: usize) {
    if cannot_run(test, "qemu-io") {
        return;
    }
    let dir = TempDir::new("storage-enospc");
    let secret = secret_file(&dir.0);
    let sizes = if small == 0 { [8 * MIB, 16 * MIB] } else { [16 * MIB, 8 * MIB] };
    let s_fs = SmallFs::mount(&dir.0, "s", sizes[0]);
    let t_fs = SmallFs::mount(&dir.0, "t", sizes[1]);
    // Sparse replica files four times the size of the larger filesystem.
    let (s_img, t_img) = (s_fs.sparse("s.img", 64 * MIB), t_fs.sparse("t.img", 64 * MIB));
    let t = Replica::start(&t_img, &secret, None, &[]);
    let srv = Serve::start(
        &dir.0,
        &secret,
        &format!("local:{}", s_img.display()),
        &format!("remote:{}", t.addr),
        "nbd listening on ",
        &[],
    );
    assert_eq!(srv.states(), ("in-sync".into(), "in-sync".into()));

    // 12 MiB: more than the small filesystem holds, less than the large one.
    let (ok, text) = qemu_io_writes(&srv.addr, 0, 12);
    assert!(ok && !text.contains("failed"), "a write failed although one replica had room:\n{text}");
    assert_eq!(text.matches("wrote 1048576/1048576 bytes").count(), 12, "{text}");
    let (s, t_state) = srv.states();
    let (full, survivor) = if small == 0 { (s, t_state) } else { (t_state, s) };
    assert_ne!(full, "in-sync", "the replica out of space is out of service");
    assert_eq!(survivor, "in-sync", "the survivor serves");
    // Everything acknowledged is there (read from the survivor: the other is out of service).
    qemu_io_reads_back(&srv.addr, 0, 12);

    // On to 24 MiB: the survivor fills too; its ENOSPC reaches the client.
    let (ok, text) = qemu_io_writes(&srv.addr, 12, 24);
    assert!(!ok, "qemu-io says every write succeeded:\n{text}");
    let first_failure =
        text.lines().find(|l| l.contains("failed")).unwrap_or_else(|| panic!("no write failed:\n{text}"));
    assert_eq!(first_failure, format!("write failed: {ENOSPC_TEXT}"), "{text}");
    let wrote = text.matches("wrote 1048576/1048576 bytes").count();
    assert!((1..4).contains(&wrote), "the 16 MiB filesystem took {wrote} MiB past 12 MiB:\n{text}");
    drop(srv);
    // Every acknowledged write is on the replica that filled last (the router serves no reads
    // with both replicas out of service: read its file).
    let data = std::fs::read(if small == 0 { &t_img } else { &s_img }).unwrap();
    for i in 0..12 + wrote {
        let piece = &data[i * MIB as usize..(i + 1) * MIB as usize];
        assert!(piece.iter().all(|&b| b as usize == i + 1), "MiB {i} of the survivor differs");
    }
}

/// The local source's filesystem fills first (its ENOSPC comes from the storage engine in this
/// process); the remote target's, later, comes back over the wire.
#[test]
fn enospc_of_the_local_source_fails_it_then_the_remote_targets_reaches_the_client() {
    fill_both(
        "storage_errors::enospc_of_the_local_source_fails_it_then_the_remote_targets_reaches_the_client",
        0,
    );
}

/// The remote target fills first (its errno crosses the protocol and fails it); the local
/// source's ENOSPC, later, reaches the client.
#[test]
fn enospc_of_the_remote_target_fails_it_then_the_local_sources_reaches_the_client() {
    fill_both(
        "storage_errors::enospc_of_the_remote_target_fails_it_then_the_local_sources_reaches_the_client",
        1,
    );
}

/// The same through ublk: `dd oflag=direct` on /dev/ublkbN over two local replicas on an 8 MiB
/// and a 16 MiB tmpfs writes past the first filesystem's space (the fast path fails, the router
/// path fails that replica and acknowledges from the other) and ends with ENOSPC when the second
/// fills.
#[test]
fn enospc_reaches_the_application_through_ublk() {
    const T: &str = "storage_errors::enospc_reaches_the_application_through_ublk";
    if mirror_tests::env::not_in_vm(T) {
        return;
    }
    let dir = TempDir::new("storage-enospc-ublk");
    let secret = secret_file(&dir.0);
    let s_fs = SmallFs::mount(&dir.0, "s", 8 * MIB);
    let t_fs = SmallFs::mount(&dir.0, "t", 16 * MIB);
    let (s_img, t_img) = (s_fs.sparse("s.img", 64 * MIB), t_fs.sparse("t.img", 64 * MIB));
    let srv = Serve::start(
        &dir.0,
        &secret,
        &format!("local:{}", s_img.display()),
        &format!("local:{}", t_img.display()),
        "ublk device ",
        &["--frontend", "ublk"],
    );
    let out = Command::new("dd")
        .args(["if=/dev/urandom", "bs=1M", "count=32", "oflag=direct", "status=none"])
        .arg(format!("of={}", srv.addr))
        .output()
        .expect("run dd");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "dd wrote 32 MiB onto 16 MiB of space: {err}");
    assert!(err.contains(ENOSPC_TEXT), "dd did not see ENOSPC: {err}");
    let (s, t) = srv.states();
    assert_eq!((s.as_str(), t.as_str()), ("failed", "failed"), "both replicas full");
    drop(srv);
    // How far the writes got: past what the 8 MiB filesystem holds (the survivor took them).
    let t_used = std::fs::metadata(&t_img).map(|m| m.blocks() * 512).unwrap();
    assert!((8 * MIB..16 * MIB).contains(&t_used), "the 16 MiB replica holds {t_used} bytes");
}
