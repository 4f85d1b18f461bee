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
    let _ = writeln!(std::io::stderr(), "skipped: {test}: runs only inside `cargo xtask vm-test`");
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
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
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
        std::fs::File::create(&img).and_then(|f| f.set_len(size)).expect("create backing file");
        Self::attach(&img, "on", dir)
    }

    /// A loop device whose backing file is read through the page cache (`--direct-io=off`):
    /// a fast device, for high request rates.
    pub fn cached(size: u64) -> Self {
        let dir = TempDir::new("loop-cached");
        let img = dir.0.join("disk.img");
        std::fs::File::create(&img).and_then(|f| f.set_len(size)).expect("create backing file");
        Self::attach(&img, "off", dir)
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
        assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
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
    /// The daemon's stdout after its "ready" line.
    pub out: std::io::BufReader<std::process::ChildStdout>,
}

impl Daemon {
    /// Starts the daemon pinning into a private bpffs directory and waits until it says it is
    /// ready (programs attached; the pins alone appear before attachment).
    pub fn start(extra: &[&str]) -> Self {
        Self::start_with_env(extra, &[])
    }

    /// As [`Daemon::start`], with extra environment variables for the daemon.
    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Self {
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/mirror-test-{}-{}", std::process::id(), nanos()));
        use std::io::BufRead;
        let mut child = Command::new(mirror_bin())
            .args(["daemon", "--quiet", "--interval", "100ms", "--pin-dir"])
            .arg(&pin_dir)
            .args(extra)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn mirror daemon");
        let mut line = String::new();
        let mut out = std::io::BufReader::new(child.stdout.take().expect("piped"));
        out.read_line(&mut line).expect("read daemon stdout");
        assert!(
            line.starts_with("ready: block statistics from ebpf"),
            "daemon not ready with eBPF: {line:?}"
        );
        let stats = pin_dir.join(mirror_common::blk::MAP_BLK_STATS);
        assert!(stats.exists(), "daemon ready but {} missing", stats.display());
        Daemon { child, pin_dir, out }
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
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0)
}

/// dd with O_DIRECT; panics when it fails.
pub fn dd(args: &[&str]) {
    let out = Command::new("dd").args(args).stderr(Stdio::piped()).output().expect("run dd");
    assert!(out.status.success(), "dd {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A `mirror replica` process serving one volume `v`, killed (SIGKILL) on drop unless stopped.
pub struct Replica {
    pub child: Child,
    pub addr: String,
    pub path: PathBuf,
    args: Vec<String>,
}

impl Replica {
    /// Starts a replica serving `path` as volume `v`, listening on a free loopback port (or
    /// `addr` when restarting), with extra flags.
    pub fn start(path: &Path, secret: &Path, addr: Option<&str>, extra: &[&str]) -> Replica {
        let mut args: Vec<String> = vec![
            "replica".into(),
            "--listen".into(),
            addr.unwrap_or("127.0.0.1:0").into(),
            "--volume".into(),
            format!("v={}", path.display()),
            "--secret-file".into(),
            secret.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::spawn(path, args)
    }

    fn spawn(path: &Path, args: Vec<String>) -> Replica {
        use std::io::BufRead;
        let mut child = Command::new(mirror_bin())
            .args(&args)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn mirror replica");
        let mut line = String::new();
        let mut out = std::io::BufReader::new(child.stdout.take().expect("piped"));
        out.read_line(&mut line).expect("read replica stdout");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("replica said {line:?}"))
            .to_string();
        Replica { child, addr, path: path.to_path_buf(), args }
    }

    /// Restarts on the same address (after a kill).
    pub fn restart(&mut self) {
        let mut args = self.args.clone();
        if let Some(i) = args.iter().position(|a| a == "--listen") {
            args[i + 1] = self.addr.clone();
        }
        self.kill();
        // The old process is dead and reaped; dropping its handle is harmless.
        *self = Self::spawn(&self.path, args);
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs the `mirror` CLI; returns (success, stdout, stderr).
pub fn mirror_cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(mirror_bin()).args(args).env("RUST_LOG", "warn").output().expect("run mirror");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A secret file in `dir`.
pub fn secret_file(dir: &Path) -> PathBuf {
    let p = dir.join("secret");
    std::fs::write(&p, b"test-secret-0123456789abcdef\n").expect("write secret");
    p
}

/// Deterministic pseudo-random bytes (xorshift), fast enough for hundreds of MiB.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// xxh3-128 of a whole file, read in 4 MiB pieces.
pub fn file_digest(path: &Path) -> u128 {
    use std::io::Read;
    let mut f = std::fs::File::open(path).expect("open for digest");
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = f.read(&mut buf).expect("read for digest");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.digest128()
}

/// `mirror sync` of volume `v` from `node` to `peer`; panics unless the CLI succeeds. `extra`:
/// more flags, e.g. `--no-wait`.
pub fn sync_ok(node: &str, peer: &str, secret: &Path, extra: &[&str]) {
    let sec = secret.display().to_string();
    let mut args = vec!["sync", "--node", node, "--peer", peer, "--volume", "v", "--secret-file", &sec];
    args.extend_from_slice(extra);
    let (ok, _, err) = mirror_cli(&args);
    assert!(ok, "mirror {args:?}: {err}");
}
