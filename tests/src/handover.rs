//! The etcd-mode handover setup that the lease tests and `bench-handover` share: a real etcd,
//! two `mirror replica` servers (files `s.img`, `t.img`), router A active (source s, target t)
//! and router B `--standby` with roles swapped (source t, target s), each with its own NBD port
//! fixed up front (so a client knows both addresses before B serves), control socket and log
//! (`DIR/nodeA.log`, `DIR/nodeB.log`, RUST_LOG=info).

use std::{
    fs::File,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};

use crate::{
    etcd::Etcd,
    fs::{secret_file, TempDir},
    net::free_port,
    proc::{Kill, Replica, ReplicaLaunch},
};

/// The two routers, by index: A (active first) and B (standby first).
pub const NODES: [&str; 2] = ["nodeA", "nodeB"];

/// etcd, the replicas, router A serving, router B standing by.
#[derive(Debug)]
pub struct Pair {
    pub bin: PathBuf,
    pub ttl: String,
    pub size: u64,
    /// The routers' NBD addresses, A's then B's.
    pub nbd: [String; 2],
    /// The routers while they run (killed on drop).
    pub routers: [Option<Kill>; 2],
    pub s: Replica,
    pub t: Replica,
    pub etcd: Etcd,
    pub dir: TempDir,
    /// When B printed `nbd listening on` (read by a thread as it comes).
    b_serving: mpsc::Receiver<Instant>,
}

impl Pair {
    /// Starts everything with `bin`, a `ttl` such as `2s` and replica files of `size` bytes
    /// (zeros); returns once A serves and B stands by.
    pub fn start(tag: &str, bin: &Path, ttl: &str, size: u64) -> Result<Pair> {
        let mut p = Pair::start_active(tag, bin, ttl, size)?;
        p.start_standby()?;
        Ok(p)
    }

    /// [`Pair::start`] without B: etcd, the replicas and A serving.
    pub fn start_active(tag: &str, bin: &Path, ttl: &str, size: u64) -> Result<Pair> {
        let dir = TempDir::create(tag)?;
        let secret = secret_file(&dir.0);
        let etcd = Etcd::start(1)?;
        let replica = |name: &str| -> Result<Replica> {
            let path = dir.0.join(name);
            // Written and synced: the first flush of a run must not be the file's creation.
            let f = File::create(&path)?;
            std::io::Write::write_all(&mut &f, &vec![0u8; usize::try_from(size)?])?;
            f.sync_all()?;
            let args = vec![
                "replica".into(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--volume".into(),
                format!("v={}", path.display()),
                "--secret-file".into(),
                secret.display().to_string(),
            ];
            let mut l = ReplicaLaunch::new(bin.to_path_buf(), args);
            l.rust_log = Some("warn".into());
            l.log = Some(dir.0.join(format!("{name}.log")));
            Replica::launch(l, &path)
        };
        let (s, t) = (replica("s.img")?, replica("t.img")?);
        let nbd = [format!("127.0.0.1:{}", free_port()?), format!("127.0.0.1:{}", free_port()?)];
        let mut p = Pair {
            bin: bin.to_path_buf(),
            ttl: ttl.into(),
            size,
            nbd,
            routers: [None, None],
            s,
            t,
            etcd,
            dir,
            b_serving: mpsc::channel().1,
        };
        let (child, _, out) = crate::proc::spawn_until(&mut p.serve(0, &[]), "nbd listening on ")
            .with_context(|| format!("router A: {}", p.log(0)))?;
        crate::proc::drain(out);
        p.routers[0] = Some(Kill(child));
        Ok(p)
    }

    /// Starts B `--standby` and waits until it stands by.
    pub fn start_standby(&mut self) -> Result<()> {
        self.start_standby_with(&[])
    }

    /// [`Self::start_standby`] with `extra` flags for B.
    pub fn start_standby_with(&mut self, extra: &[&str]) -> Result<()> {
        let p = self;
        let mut b = p.serve(1, &[&["--standby"], extra].concat());
        let mut child = b.stdout(Stdio::piped()).spawn().context("spawn router B")?;
        let out = BufReader::new(child.stdout.take().context("B's stdout")?);
        let (tx, rx) = mpsc::channel();
        p.b_serving = rx;
        std::thread::spawn(move || {
            for l in out.lines() {
                let Ok(l) = l else { return };
                if l.starts_with("nbd listening on ") {
                    let _ = tx.send(Instant::now());
                }
            }
        });
        p.routers[1] = Some(Kill(child));
        p.wait_log(1, "standing by", Duration::from_secs(20))?;
        Ok(())
    }

    /// `mirror serve` for router `i` (its own replica first), with `extra` flags.
    pub fn serve(&self, i: usize, extra: &[&str]) -> Command {
        let (src, tgt) = if i == 0 { (&self.s, &self.t) } else { (&self.t, &self.s) };
        let node = NODES[i];
        let mut c = Command::new(&self.bin);
        c.args(["serve", "--lease-store", &self.etcd.url()]).args(extra);
        c.args(["--volume", "v", "--source", &format!("remote:{}", src.addr)])
            .args(["--target", &format!("remote:{}", tgt.addr)])
            .args(["--secret-file", &self.dir.0.join("secret").display().to_string()])
            .args(["--lease-holder", node, "--lease-ttl", &self.ttl, "--assume-clean"])
            .args(["--ctl-socket", &self.socket(i).display().to_string()])
            .args(["--nbd", &self.nbd[i]])
            .env("RUST_LOG", "info");
        if let Ok(f) = File::create(self.dir.0.join(format!("{node}.log"))) {
            c.stderr(f);
        }
        c
    }

    pub fn socket(&self, i: usize) -> PathBuf {
        self.dir.0.join(format!("{}.sock", NODES[i]))
    }

    /// Router `i`'s log so far.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.0.join(format!("{}.log", NODES[i]))).unwrap_or_default()
    }

    /// The replica files, s then t.
    pub fn files(&self) -> [PathBuf; 2] {
        [self.dir.0.join("s.img"), self.dir.0.join("t.img")]
    }

    /// Whether the two replica files are byte-identical.
    pub fn identical(&self) -> Result<bool> {
        let [a, b] = self.files();
        Ok(std::fs::read(a)? == std::fs::read(b)?)
    }

    /// Waits until router `i`'s log contains `what`.
    pub fn wait_log(&self, i: usize, what: &str, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        while !self.log(i).contains(what) {
            ensure!(Instant::now() < deadline, "{} never logged {what:?}: {}", NODES[i], self.log(i));
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Waits up to `limit` until B printed `nbd listening on` (it took the lease and serves);
    /// returns when it printed it.
    pub fn wait_b_serving(&self, limit: Duration) -> Result<Instant> {
        self.b_serving
            .recv_timeout(limit)
            .map_err(|_| anyhow::anyhow!("router B did not serve within {limit:?}: {}", self.log(1)))
    }

    /// `mirror ctl --socket <router i's> ARGS`.
    pub fn ctl(&self, i: usize, args: &[&str]) -> Result<Output> {
        Command::new(&self.bin)
            .arg("ctl")
            .arg("--socket")
            .arg(self.socket(i))
            .args(args)
            .output()
            .context("mirror ctl")
    }

    /// `ctl status --json` of router `i`.
    pub fn status(&self, i: usize) -> Result<serde_json::Value> {
        let out = self.ctl(i, &["status", "--json"])?;
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "ctl status --json: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// `ctl --json handover` on A: its JSON answer (successor, epoch, paused_ms, ...).
    pub fn handover(&self) -> Result<serde_json::Value> {
        let out = self.ctl(0, &["--json", "handover"])?;
        ensure!(
            out.status.success(),
            "handover: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log(0)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Router `i`'s pid.
    pub fn pid(&self, i: usize) -> Result<u32> {
        Ok(self.routers[i].as_ref().context("the router is not running")?.0.id())
    }

    /// Sends `sig` (SIGKILL, SIGSTOP, ...) to router `i`.
    pub fn signal(&self, i: usize, sig: i32) -> Result<()> {
        let pid = i32::try_from(self.pid(i)?)?;
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let r = unsafe { libc::kill(pid, sig) };
        ensure!(r == 0, "kill({pid}, {sig}): {}", std::io::Error::last_os_error());
        Ok(())
    }

    /// Waits up to `limit` for router `i` to exit by itself.
    pub fn wait_exit(&mut self, i: usize, limit: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + limit;
        let k = self.routers[i].as_mut().context("the router is not running")?;
        loop {
            if let Some(st) = k.0.try_wait()? {
                return Ok(st);
            }
            ensure!(Instant::now() < deadline, "{} did not stop: {}", NODES[i], self.log(i));
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM to router `i` and its exit (killed after `limit`).
    pub fn stop(&mut self, i: usize, limit: Duration) -> Option<ExitStatus> {
        let mut k = self.routers[i].take()?;
        crate::proc::terminate(&mut k.0, limit)
    }

    /// Waits until router `i` reports both replicas in sync.
    pub fn wait_in_sync(&self, i: usize, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let st = self.status(i)?;
            let reps = st["replicas"].as_array().context("replicas")?;
            if reps.iter().all(|r| r.to_string().contains("\"in-sync\"")) {
                return Ok(());
            }
            ensure!(Instant::now() < deadline, "{}'s replicas never both in sync: {st}", NODES[i]);
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
