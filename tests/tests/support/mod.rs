//! Helpers for the integration tests: loud skips, loop devices, the daemon as a real process.
#![allow(dead_code)]

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// Says loudly that a test cannot run here, or fails it when the environment demands that it
/// runs (`MIRROR_REQUIRE_<WHAT>=1`, set by CI). Writes straight to stderr, which libtest does not
/// capture, so the line shows even for a passing test.
pub fn skip(test: &str, require: &str, why: &str) {
    let var = format!("MIRROR_REQUIRE_{require}");
    if std::env::var(&var).is_ok_and(|v| v == "1") {
        panic!("{test}: cannot run ({why}) but {var}=1 requires it");
    }
    let _ = writeln!(std::io::stderr(), "skipped: {test}: {why}");
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// For tests that only make sense inside the VM: true when they should return now. Outside the
/// VM they say so (not a failure even in CI: `cargo xtask vm-test` runs them, and fails itself
/// when MIRROR_REQUIRE_VM=1 and the VM cannot boot).
pub fn not_in_vm(test: &str) -> bool {
    if in_vm() {
        return false;
    }
    let _ = writeln!(
        std::io::stderr(),
        "skipped: {test}: runs only inside `cargo xtask vm-test`"
    );
    true
}

pub fn in_vm() -> bool {
    std::env::var("MIRROR_IN_VM").is_ok_and(|v| v == "1")
}

/// The `mirror` binary: $MIRROR_BIN (set by `cargo xtask test`) or target/debug/mirror.
pub fn mirror_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MIRROR_BIN") {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/mirror")
}

pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A unique scratch directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let p = std::env::temp_dir().join(format!("mirror-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A loop device over a sparse file, detached on drop.
pub struct LoopDev {
    pub dev: PathBuf,
    _dir: TempDir,
}

impl LoopDev {
    pub fn new(size: u64) -> Self {
        let dir = TempDir::new("loop");
        let img = dir.0.join("disk.img");
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(size))
            .expect("create backing file");
        Self::attach(&img, "on", dir)
    }

    /// A loop device stacked on another block device (e.g. another loop device).
    pub fn over(backing: &Path) -> Self {
        Self::attach(backing, "on", TempDir::new("loop-over"))
    }

    fn attach(backing: &Path, direct_io: &str, dir: TempDir) -> Self {
        if !Path::new("/dev/loop-control").exists() {
            let _ = Command::new("modprobe").arg("loop").status();
        }
        let out = Command::new("losetup")
            .args(["-f", "--show", &format!("--direct-io={direct_io}")])
            .arg(backing)
            .output()
            .expect("run losetup");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        LoopDev { dev, _dir: dir }
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// `mirror daemon` as a child process, stopped with SIGTERM on drop.
pub struct Daemon {
    pub child: Child,
    pub pin_dir: PathBuf,
}

impl Daemon {
    /// Starts the daemon pinning into a private bpffs directory and waits for its maps.
    pub fn start(extra: &[&str]) -> Self {
        Self::start_with_env(extra, &[])
    }

    /// As [`Daemon::start`], with extra environment variables for the daemon.
    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Self {
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/mirror-test-{}-{}",
            std::process::id(),
            nanos()
        ));
        let child = Command::new(mirror_bin())
            .args(["daemon", "--quiet", "--interval", "100ms", "--pin-dir"])
            .arg(&pin_dir)
            .args(extra)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn mirror daemon");
        let mut d = Daemon { child, pin_dir };
        let stats = d.pin_dir.join(mirror_common::blk::MAP_BLK_STATS);
        let start = Instant::now();
        while !stats.exists() {
            if let Ok(Some(st)) = d.child.try_wait() {
                panic!("daemon exited early with {st}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "daemon did not pin its maps in 20 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    /// Sends SIGTERM and waits; returns whether it exited successfully.
    pub fn stop(&mut self) -> bool {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.success();
            }
            if start.elapsed() > Duration::from_secs(10) {
                let _ = self.child.kill();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
        let _ = std::fs::remove_dir(&self.pin_dir);
    }
}

pub fn nanos() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}

/// dd with O_DIRECT; panics when it fails.
pub fn dd(args: &[&str]) {
    let out = Command::new("dd")
        .args(args)
        .stderr(Stdio::piped())
        .output()
        .expect("run dd");
    assert!(
        out.status.success(),
        "dd {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
