//! The processes of the tests: `mirror daemon`, `mirror replica` and the `mirror` CLI as real
//! processes, CPU hogs, and the guards that stop them (SIGKILL on drop, or SIGTERM and a wait).
//!
//! A server says it is ready on its stdout (`listening on ADDR`, `nbd listening on ADDR`,
//! `ready: ...`, `ublk device DEV`): [`spawn_until`] starts it and reads up to that line.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{env::mirror_bin, fs::unique_name};

/// A child process killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct Kill(pub Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends SIGTERM and waits up to `limit` for the exit. A process still running then is killed
/// and reaped: `None`.
pub fn terminate(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Spawns `cmd` with its stdout piped and reads stdout up to the first line that starts with
/// `prefix`. Returns the child, the rest of that line (trimmed) and the stdout after it (keep
/// it, [`drain`] it, or drop it to close the pipe). A process whose stdout ends first is killed
/// and the error says what it printed.
pub fn spawn_until(cmd: &mut Command, prefix: &str) -> Result<(Child, String, BufReader<ChildStdout>)> {
    let mut child = cmd.stdout(Stdio::piped()).spawn().with_context(|| format!("spawn {cmd:?}"))?;
    let mut out = BufReader::new(child.stdout.take().expect("stdout is piped"));
    let mut said = String::new();
    let found = loop {
        let mut line = String::new();
        match out.read_line(&mut line) {
            Ok(0) => break Err(anyhow::anyhow!("its stdout ended")),
            Ok(_) => {}
            Err(e) => break Err(e.into()),
        }
        if let Some(rest) = line.trim().strip_prefix(prefix) {
            break Ok(rest.trim().to_string());
        }
        said.push_str(&line);
    };
    match found {
        Ok(rest) => Ok((child, rest, out)),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} did not print a line starting with {prefix:?} ({e}); it printed {said:?}")
        }
    }
}

/// Spawns `cmd` with its stdout piped, reads its first `n` lines (trimmed; a server's readiness
/// lines, in whatever order it prints them) and drains the rest. The child is killed on drop.
pub fn spawn_lines(cmd: &mut Command, n: usize) -> Result<(Kill, Vec<String>)> {
    let mut child = cmd.stdout(Stdio::piped()).spawn().with_context(|| format!("spawn {cmd:?}"))?;
    let mut out = BufReader::new(child.stdout.take().expect("stdout is piped"));
    let child = Kill(child);
    let mut lines = Vec::new();
    for _ in 0..n {
        let mut line = String::new();
        if out.read_line(&mut line)? == 0 {
            bail!("{cmd:?} ended its stdout after {lines:?}");
        }
        lines.push(line.trim().to_string());
    }
    drain(out);
    Ok((child, lines))
}

/// Reads and discards the rest of a child's stdout in a thread, so the child never blocks on a
/// full pipe.
pub fn drain(out: BufReader<ChildStdout>) {
    std::thread::spawn(move || for _ in out.lines() {});
}

/// Runs `cmd` to completion: (success, stdout, stderr).
pub fn captured(cmd: &mut Command) -> std::io::Result<(bool, String, String)> {
    let out = cmd.output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Runs a tool to completion and returns its stdout; the error carries what it printed.
pub fn output(cmd: &mut Command) -> Result<String> {
    let (ok, out, err) = captured(cmd).with_context(|| format!("{cmd:?}"))?;
    if !ok {
        bail!("{cmd:?}: {out}{err}");
    }
    Ok(out)
}

/// Runs a tool to completion and returns its stdout and stderr; panics unless it succeeds.
pub fn run_tool(cmd: &mut Command) -> String {
    let (ok, out, err) = captured(cmd).unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!("{out}{err}");
    assert!(ok, "{cmd:?} failed:\n{text}");
    text
}

/// Runs the `mirror` CLI ([`mirror_bin`], RUST_LOG=warn); returns (success, stdout, stderr).
pub fn mirror_cli(args: &[&str]) -> (bool, String, String) {
    captured(Command::new(mirror_bin()).args(args).env("RUST_LOG", "warn")).expect("run mirror")
}

/// Runs the `mirror` binary `bin` with `args`; its stdout, or an error with its stderr.
pub fn mirror_out(bin: &Path, args: &[&str]) -> Result<String> {
    let (ok, out, err) =
        captured(Command::new(bin).args(args)).with_context(|| format!("run {}", bin.display()))?;
    if !ok {
        bail!("mirror {args:?}: {err}");
    }
    Ok(out)
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

/// `qemu-io` on the NBD export at `nbd` (HOST:PORT); panics on a failed command or pattern.
pub fn qemu_io(nbd: &str, cmds: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", &format!("nbd://{nbd}/")]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    let text = run_tool(&mut cmd);
    assert!(!text.contains("Pattern verification failed") && !text.contains("failed:"), "{cmds:?}:\n{text}");
}

/// Waits (60 s) until the replica served at `node` records nothing for its peer and its sync
/// job (if any) is done: the peer is in sync. `extra`: more flags for `mirror status` (`--tls`).
pub fn wait_clean(node: &str, secret: &Path, extra: &[&str]) {
    let sec = secret.display().to_string();
    let mut args = vec!["status", "--node", node, "--volume", "v", "--secret-file", &sec];
    args.extend_from_slice(extra);
    let deadline = Instant::now() + Duration::from_mins(1);
    loop {
        let (ok, out, err) = mirror_cli(&args);
        if ok {
            let js: serde_json::Value = serde_json::from_str(&out).expect("status JSON");
            let job = js["job"]["state"].as_str().unwrap_or("none");
            if js["tracking"] == false && js["dirty_bytes"] == 0 && job != "running" {
                assert!(matches!(job, "none" | "done" | "up-to-date"), "sync job {job}: {out}");
                return;
            }
        }
        assert!(Instant::now() < deadline, "{node}: not clean after 60 s: {out}{err}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `mirror daemon` as a child process, stopped with SIGTERM on drop (it unpins its maps), its pin
/// directory removed after.
#[derive(Debug)]
pub struct Daemon {
    pub child: Child,
    pub pin_dir: PathBuf,
    /// The daemon's stdout after its "ready" line.
    pub out: BufReader<ChildStdout>,
}

impl Daemon {
    /// Starts the daemon pinning into a private bpffs directory and waits until it says it is
    /// ready (programs attached; the pins alone appear before attachment).
    pub fn start(extra: &[&str]) -> Self {
        Self::start_with_env(extra, &[])
    }

    /// As [`Daemon::start`], with extra environment variables for the daemon.
    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Self {
        let pin_dir = Path::new("/sys/fs/bpf").join(unique_name("test"));
        let mut cmd = Self::command(&mirror_bin(), &pin_dir, "100ms");
        cmd.args(extra).env("RUST_LOG", "warn").envs(env.iter().copied());
        let (d, ready) =
            Self::spawn(&mut cmd, pin_dir).unwrap_or_else(|e| panic!("spawn mirror daemon: {e:#}"));
        assert!(ready.starts_with("block statistics from ebpf"), "daemon not ready with eBPF: {ready:?}");
        let stats = d.pin_dir.join(mirror_common::blk::MAP_BLK_STATS);
        assert!(stats.exists(), "daemon ready but {} missing", stats.display());
        d
    }

    /// `BIN daemon --quiet --interval INTERVAL --pin-dir PIN_DIR`, to add to and [`spawn`].
    ///
    /// [`spawn`]: Daemon::spawn
    pub fn command(bin: &Path, pin_dir: &Path, interval: &str) -> Command {
        let mut c = Command::new(bin);
        c.args(["daemon", "--quiet", "--interval", interval, "--pin-dir"]).arg(pin_dir);
        c
    }

    /// Spawns the daemon `cmd` starts (pinning into `pin_dir`) and waits for its `ready: ...`
    /// line; returns the daemon and the rest of that line (what the block statistics come from).
    pub fn spawn(cmd: &mut Command, pin_dir: PathBuf) -> Result<(Self, String)> {
        let (child, ready, out) = spawn_until(cmd, "ready: ")?;
        Ok((Daemon { child, pin_dir, out }, ready))
    }

    /// Sends SIGTERM and waits; returns whether it exited successfully.
    pub fn stop(&mut self) -> bool {
        terminate(&mut self.child, Duration::from_secs(10)).is_some_and(|st| st.success())
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

/// How a `mirror replica` process starts; kept to restart it the same way.
#[derive(Debug, Clone)]
pub struct ReplicaLaunch {
    pub bin: PathBuf,
    /// Everything after the binary: `replica`, `--listen ADDR`, the volume, the secret, ...
    pub args: Vec<String>,
    /// The cgroup (its directory) the process joins before it execs.
    pub cgroup: Option<PathBuf>,
    /// Its stderr is appended to this file; `None`: inherited.
    pub log: Option<PathBuf>,
    /// Its RUST_LOG; `None`: inherited.
    pub rust_log: Option<String>,
}

impl ReplicaLaunch {
    pub fn new(bin: PathBuf, args: Vec<String>) -> Self {
        ReplicaLaunch { bin, args, cgroup: None, log: None, rust_log: None }
    }

    fn command(&self) -> Result<Command> {
        let mut c = match &self.cgroup {
            Some(dir) => crate::cgroup::command_in(dir, &self.bin),
            None => Command::new(&self.bin),
        };
        c.args(&self.args);
        if let Some(l) = &self.rust_log {
            c.env("RUST_LOG", l);
        }
        if let Some(log) = &self.log {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .with_context(|| format!("open {}", log.display()))?;
            c.stderr(f);
        }
        Ok(c)
    }
}

/// A `mirror replica` process, killed (SIGKILL) on drop unless stopped; it can be killed and
/// restarted on the same address.
#[derive(Debug)]
pub struct Replica {
    pub child: Child,
    /// Where it listens (from its `listening on` line).
    pub addr: String,
    /// What it serves (for digests).
    pub path: PathBuf,
    launch: ReplicaLaunch,
}

impl Replica {
    /// Starts a replica ([`mirror_bin`]) serving `path` as volume `v`, listening on a free
    /// loopback port (or `addr` when restarting), with extra flags; RUST_LOG as the test's, or
    /// warn. Panics when it does not start.
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
        args.extend(extra.iter().map(std::string::ToString::to_string));
        let mut launch = ReplicaLaunch::new(mirror_bin(), args);
        launch.rust_log = Some(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()));
        Self::launch(launch, path).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Starts a replica as `launch` says, serving `path`, and waits until it listens.
    pub fn launch(launch: ReplicaLaunch, path: &Path) -> Result<Replica> {
        let (child, addr) = Self::spawn(&launch)?;
        Ok(Replica { child, addr, path: path.to_path_buf(), launch })
    }

    fn spawn(launch: &ReplicaLaunch) -> Result<(Child, String)> {
        let see = launch.log.as_ref().map(|l| format!(" (see {})", l.display())).unwrap_or_default();
        let (child, addr, _) = spawn_until(&mut launch.command()?, "listening on ")
            .with_context(|| format!("mirror replica{see}"))?;
        Ok((child, addr))
    }

    /// Restarts on the same address (after a kill); panics when it does not start.
    pub fn restart(&mut self) {
        self.try_restart().unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// Kills it and starts it again with the same arguments, on the same address.
    pub fn try_restart(&mut self) -> Result<()> {
        if let Some(i) = self.launch.args.iter().position(|a| a == "--listen") {
            self.launch.args[i + 1] = self.addr.clone();
        }
        self.kill();
        // The old process is dead and reaped; dropping its handle is harmless.
        (self.child, self.addr) = Self::spawn(&self.launch)?;
        Ok(())
    }

    /// SIGKILL, and reaped.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Busy-looping shells (CPU hogs), killed on drop.
#[derive(Debug)]
pub struct Hogs {
    _procs: Vec<Kill>,
}

impl Hogs {
    pub fn spawn(n: usize) -> Self {
        let hog = || Kill(Command::new("sh").args(["-c", "while :; do :; done"]).spawn().expect("spawn hog"));
        Hogs { _procs: (0..n).map(|_| hog()).collect() }
    }
}
