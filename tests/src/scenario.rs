//! A two-node mirrored volume on one machine, with real processes, for the failover scenario
//! tests, `cargo xtask bench failover` and `cargo xtask demo`:
//! - the **source** node: a `mirror replica` process serving a loop device stacked on another
//!   loop device (so a cgroup I/O throttle on the lower one shows as latency of the upper one, the
//!   disk the node scores), with O_DIRECT, inside its own blkio cgroup;
//! - the **target** node: a `mirror replica` process serving the same kind of stacked loop
//!   device (unthrottled), so that what the one machine does to both nodes (CPU load) does the
//!   same to both disks;
//! - `mirror daemon` attaching the eBPF programs, pinned in a private directory both nodes read;
//! - `mirror serve`: the router and its weighting engine, NBD on a free port;
//! - a verifying workload (fio's nbd engine, `--verify=crc32c`) and a recorder of the timeline.

use std::{
    io::{Read, Write},
    net::TcpListener,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::{
    blockdev::LoopDev,
    cgroup::{IoCgroup, IoLimit},
    env::{is_root, which},
    fs::{try_file_digest, TempDir},
    net::free_port,
    proc::{mirror_out, spawn_until, terminate, Daemon, Kill, Replica, ReplicaLaunch},
};

/// Settings of a cluster.
#[derive(Debug, Clone)]
pub struct Opts {
    /// The `mirror` binary.
    pub bin: PathBuf,
    /// Volume size.
    pub size: u64,
    /// HTTP probe URLs the source node checks.
    pub source_probes: Vec<String>,
    pub failback_hold: Duration,
    pub ramp: Duration,
    /// Extra arguments of `mirror serve`.
    pub serve_args: Vec<String>,
    /// Put the source's replica in a file on an ext4 filesystem of this size of its own (on a
    /// loop device, the disk scored and throttled) instead of on the loop stack, so that the
    /// filesystem can be filled ([`Cluster::source_fs`]).
    pub source_fs: Option<u64>,
}

impl Opts {
    pub fn new(bin: PathBuf) -> Opts {
        Opts {
            bin,
            size: 64 << 20,
            source_probes: Vec::new(),
            failback_hold: Duration::from_secs(3),
            ramp: Duration::from_secs(5),
            serve_args: Vec::new(),
            source_fs: None,
        }
    }
}

/// Why the cluster cannot run here (not root, no loop devices, no cgroup I/O controller).
pub fn unavailable() -> Option<String> {
    if !is_root() {
        return Some("needs root (loop devices, cgroups, eBPF)".into());
    }
    if !crate::cgroup::io_available() {
        return Some("no cgroup v1 blkio or v2 io controller to throttle the source disk".into());
    }
    for tool in ["losetup", "fio"] {
        if which(tool).is_none() {
            return Some(format!("{tool} is not installed (cargo xtask setup)"));
        }
    }
    None
}

/// The whole cluster; everything is stopped and removed on drop.
pub struct Cluster {
    pub dir: PathBuf,
    /// Owns `dir` (removed on drop unless MIRROR_KEEP_SCENARIO is set).
    tmp: Option<TempDir>,
    bin: PathBuf,
    secret: PathBuf,
    pub ctl: PathBuf,
    pub nbd: String,
    /// The source node: serves a loop device stacked on `source_disk`.
    pub source: Replica,
    /// The target node: serves a file.
    pub target: Replica,
    serve: Option<Kill>,
    daemon: Option<Daemon>,
    pin_dir: PathBuf,
    /// The source node's cgroup: its I/O to `source_disk` can be throttled.
    cgroup: IoCgroup,
    /// The lower loop device of the source's disk, the one throttled.
    source_disk: PathBuf,
    loops: Vec<LoopDev>,
    /// Where the source's own filesystem is mounted ([`Opts::source_fs`]).
    pub source_fs: Option<PathBuf>,
    pub epoch: Instant,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cluster({})", self.dir.display())
    }
}

impl Cluster {
    /// Builds and starts everything; returns when NBD is listening and the engine runs.
    pub fn start(o: &Opts) -> Result<Cluster> {
        let tmp = TempDir::create("scenario")?;
        let dir = tmp.path().to_path_buf();
        let secret = dir.join("secret");
        std::fs::write(&secret, "scenario-secret-0123456789abcdef\n")?;
        // Source disk: file -> lower loop -> upper loop (O_DIRECT to the lower one); or, with
        // `source_fs`, a file on ext4 on a loop device.
        let s_img = dir.join("source.img");
        let mut source_fs = None;
        let (lower, upper, s_vol) = match o.source_fs {
            None => {
                std::fs::File::create(&s_img)?.set_len(o.size)?;
                let lower = LoopDev::attach(&s_img, false)?;
                let upper = LoopDev::attach(&lower.dev, true)?;
                let vol = upper.dev.clone();
                (lower, Some(upper), vol)
            }
            Some(fs_size) => {
                std::fs::File::create(&s_img)?.set_len(fs_size)?;
                let lower = LoopDev::attach(&s_img, false)?;
                crate::proc::run_tool(Command::new("mkfs.ext4").args(["-q", "-m", "0"]).arg(&lower.dev));
                let mnt = dir.join("source-fs");
                std::fs::create_dir(&mnt)?;
                crate::proc::run_tool(Command::new("mount").arg(&lower.dev).arg(&mnt));
                let vol = mnt.join("source.img");
                std::fs::File::create(&vol)?.set_len(o.size)?;
                source_fs = Some(mnt);
                (lower, None, vol)
            }
        };
        let cgroup = IoCgroup::new("scenario")?;
        // Target disk: the same stack. The two nodes share the machine, so they must also have
        // the same kind of disk: a loop worker waits for CPU like any task, and a source on a
        // loop stack beside a target on the host's disk made CPU load on the one machine look
        // like a slow source disk (the scenario (a) flake under the suite's load).
        let t_img = dir.join("target.img");
        std::fs::File::create(&t_img)?.set_len(o.size)?;
        let t_lower = LoopDev::attach(&t_img, false)?;
        let t_upper = LoopDev::attach(&t_lower.dev, true)?;

        let pin_dir = Path::new("/sys/fs/bpf").join(crate::fs::unique_name("scenario"));
        let mut daemon = Daemon::command(&o.bin, &pin_dir, "1s");
        daemon.stderr(std::fs::File::create(dir.join("daemon.log"))?);
        let (daemon, _) = Daemon::spawn(&mut daemon, pin_dir.clone())
            .with_context(|| format!("mirror daemon (see {})", dir.join("daemon.log").display()))?;
        let daemon = Some(daemon);

        let node = |name: &str,
                    vol: &Path,
                    cfg: String,
                    cgroup: Option<&Path>,
                    probes: &[String]|
         -> Result<Replica> {
            let port = free_port()?;
            let conf = dir.join(format!("{name}.toml"));
            std::fs::write(&conf, cfg)?;
            let mut args: Vec<String> = vec![
                "replica".into(),
                "--config".into(),
                conf.display().to_string(),
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                "--secret-file".into(),
                secret.display().to_string(),
                "--pin-dir".into(),
                pin_dir.display().to_string(),
                "--direct-io".into(),
            ];
            for p in probes {
                args.extend(["--probe".into(), format!("{p},timeout=200ms")]);
            }
            let mut launch = ReplicaLaunch::new(o.bin.clone(), args);
            launch.cgroup = cgroup.map(Path::to_path_buf);
            launch.log = Some(dir.join(format!("{name}.log")));
            Replica::launch(launch, vol)
        };
        let vol_cfg = |path: &Path, meta: &Path| {
            format!(
                "[[volume]]\nname = \"v\"\npath = \"{}\"\nmeta = \"{}\"\n",
                path.display(),
                meta.display()
            )
        };
        let source = node(
            "source",
            &s_vol,
            vol_cfg(&s_vol, &dir.join("source.meta")),
            Some(cgroup.dir()),
            &o.source_probes,
        )?;
        let target =
            node("target", &t_upper.dev, vol_cfg(&t_upper.dev, &dir.join("target.meta")), None, &[])?;
        let sec = secret.display().to_string();
        mirror_out(
            &o.bin,
            &[
                "sync",
                "--node",
                &source.addr,
                "--peer",
                &target.addr,
                "--volume",
                "v",
                "--secret-file",
                &sec,
                "--json",
            ],
        )
        .context("initial sync")?;

        let ctl = dir.join("ctl.sock");
        let mut serve = Command::new(&o.bin);
        serve
            .args(["serve", "--volume", "v", "--nbd", "127.0.0.1:0", "--secret-file", &sec])
            .arg(format!("--source=remote:{}", source.addr))
            .arg(format!("--target=remote:{}", target.addr))
            .arg("--ctl-socket")
            .arg(&ctl)
            .arg(format!("--failback-hold={}ms", o.failback_hold.as_millis()))
            .arg(format!("--ramp={}ms", o.ramp.as_millis()))
            .arg("--pin-dir")
            .arg(&pin_dir)
            .args(&o.serve_args)
            .stderr(std::fs::File::create(dir.join("serve.log"))?);
        let (serve, nbd, _) = spawn_until(&mut serve, "nbd listening on ")
            .with_context(|| format!("serve did not start (see {})", dir.join("serve.log").display()))?;
        let c = Cluster {
            dir,
            tmp: Some(tmp),
            bin: o.bin.clone(),
            secret,
            ctl,
            nbd,
            source,
            target,
            serve: Some(Kill(serve)),
            daemon,
            pin_dir,
            cgroup,
            source_disk: lower.dev.clone(),
            // Upper devices first: each is detached before the one under it.
            loops: upper.into_iter().chain([t_upper, lower, t_lower]).collect(),
            source_fs,
            epoch: Instant::now(),
        };
        // The engine has heard from both nodes.
        c.wait_for("both nodes answering", Duration::from_secs(10), |s| {
            (0..2).all(|i| s["replicas"][i]["node"]["heartbeat_age_ms"].as_u64().is_some_and(|a| a < 1000))
        })?;
        Ok(c)
    }

    /// `mirror ctl status --json`.
    pub fn status(&self) -> Result<serde_json::Value> {
        let out =
            mirror_out(&self.bin, &["ctl", "--socket", &self.ctl.display().to_string(), "status", "--json"])?;
        Ok(serde_json::from_str(&out)?)
    }

    pub fn ctl(&self, args: &[&str]) -> Result<String> {
        let sock = self.ctl.display().to_string();
        let mut all = vec!["ctl", "--socket", &sock];
        all.extend_from_slice(args);
        mirror_out(&self.bin, &all)
    }

    /// Polls the status until `pred` holds; returns the time it took.
    pub fn wait_for(
        &self,
        what: &str,
        limit: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<Duration> {
        let t0 = Instant::now();
        loop {
            if let Ok(s) = self.status() {
                if pred(&s) {
                    return Ok(t0.elapsed());
                }
            }
            if t0.elapsed() > limit {
                anyhow::bail!(
                    "timed out after {limit:?} waiting for {what}; status: {:#}",
                    self.status().unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Throttles the source disk's reads and writes to `iops` (None: unthrottled).
    pub fn throttle_source(&self, iops: Option<u32>) -> Result<()> {
        let v = iops.map(u64::from);
        self.cgroup.limit(&self.source_disk, &[(IoLimit::ReadIops, v), (IoLimit::WriteIops, v)])
    }

    /// Digests of the two replicas' data.
    pub fn digests(&self) -> Result<(u128, u128)> {
        Ok((try_file_digest(&self.source.path)?, try_file_digest(&self.target.path)?))
    }

    /// The serve log (for failure messages).
    pub fn serve_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("serve.log")).unwrap_or_default()
    }

    /// Stops serve (SIGTERM, so it flushes; SIGKILL after 10 s), then the nodes.
    pub fn stop_serve(&mut self) {
        if let Some(mut k) = self.serve.take() {
            terminate(&mut k.0, Duration::from_secs(10));
        }
    }

    /// The secret file (for `mirror sync` / `status` against the nodes).
    pub fn secret(&self) -> &Path {
        &self.secret
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_serve();
        self.source.kill();
        self.target.kill();
        self.daemon = None;
        if let Some(m) = &self.source_fs {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
        self.loops.clear();
        if std::env::var_os("MIRROR_KEEP_SCENARIO").is_some() {
            if let Some(t) = self.tmp.take() {
                t.keep();
            }
        }
    }
}

/// fio through NBD with `--verify=crc32c`, run back to back until stopped.
#[derive(Debug)]
pub struct Workload {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<WorkloadResult>>,
    /// Completed fio runs so far.
    pub runs: Arc<AtomicU64>,
}

/// What the workload saw.
#[derive(Debug, Clone, Default)]
pub struct WorkloadResult {
    pub runs: u64,
    /// I/O errors fio reported (sum of `err=`), plus one per failed fio run.
    pub failed_ios: u64,
    /// Output of fio runs that reported errors.
    pub failures: Vec<String>,
}

impl Workload {
    /// Random 4 KiB writes, each verified, at queue depth 8.
    pub fn start(nbd: &str, size_mib: u64, rate_iops: Option<u32>) -> Workload {
        Workload::start_qd(nbd, size_mib, rate_iops, 8)
    }

    /// As [`Workload::start`] at queue depth `qd`. At depth 1 an IOPS throttle below the rate
    /// shows as latency of about 1 / IOPS, so a throttle lowered step by step degrades the disk
    /// step by step (at depth 8 any throttle under the rate queues eight deep at once).
    pub fn start_qd(nbd: &str, size_mib: u64, rate_iops: Option<u32>, qd: u32) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let runs = Arc::new(AtomicU64::new(0));
        let (st, rn, uri) = (stop.clone(), runs.clone(), format!("nbd://{nbd}/"));
        let thread = std::thread::spawn(move || {
            let mut r = WorkloadResult::default();
            let mut k = 0u64;
            while !st.load(Ordering::Relaxed) {
                k += 1;
                let mut cmd = Command::new("fio");
                cmd.args(["--name=verify", "--ioengine=nbd", "--rw=randwrite", "--bs=4k"])
                    .arg(format!("--iodepth={qd}"))
                    .arg(format!("--size={size_mib}M"))
                    .arg(format!("--offset={}M", 0))
                    .args(["--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_backlog=64"])
                    .args(["--randrepeat=0", "--verify_state_save=0", "--io_size=8M"])
                    .arg(format!("--uri={uri}"));
                if let Some(i) = rate_iops {
                    cmd.arg(format!("--rate_iops={i}"));
                }
                let out = cmd.output();
                let Ok(out) = out else {
                    r.failed_ios += 1;
                    r.failures.push("fio did not start".into());
                    break;
                };
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                let errs = fio_errors(&text);
                if !out.status.success() || errs > 0 {
                    r.failed_ios += errs.max(1);
                    r.failures.push(format!("run {k}: {text}\n{}", String::from_utf8_lossy(&out.stderr)));
                }
                r.runs += 1;
                rn.fetch_add(1, Ordering::Relaxed);
            }
            r
        });
        Workload { stop, thread: Some(thread), runs }
    }

    /// Lets the current fio run finish and returns the totals.
    pub fn finish(mut self) -> WorkloadResult {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().and_then(|t| t.join().ok()).unwrap_or_default()
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Sum of fio's `err=` counts.
pub fn fio_errors(text: &str) -> u64 {
    text.match_indices("err=")
        .filter_map(|(i, _)| {
            text[i + 4..].trim_start().split(|c: char| !c.is_ascii_digit()).next()?.parse::<u64>().ok()
        })
        .sum()
}

/// An HTTP endpoint answering 200 or 503, switchable; for application probes.
#[derive(Debug)]
pub struct ProbeServer {
    pub url: String,
    pub healthy: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl ProbeServer {
    pub fn start() -> Result<ProbeServer> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let url = format!("http://{}/health", l.local_addr()?);
        l.set_nonblocking(true)?;
        let healthy = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let (h, st) = (healthy.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                        let mut buf = [0u8; 1024];
                        let _ = s.read(&mut buf);
                        let (code, body) = if h.load(Ordering::Relaxed) {
                            ("200 OK", "ok")
                        } else {
                            ("503 Service Unavailable", "down")
                        };
                        let _ = write!(
                            s,
                            "HTTP/1.1 {code}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(ProbeServer { url, healthy, stop })
    }
}

impl Drop for ProbeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One point of the timeline.
#[derive(Debug, Clone)]
pub struct Point {
    pub t: f64,
    pub target_weight: u8,
    pub mode: String,
    pub health: [Option<f64>; 2],
    /// Data-path latency (mean of reads and writes, EWMA) per replica, microseconds.
    pub latency_us: [f64; 2],
    pub reads: [u64; 2],
    /// The replica holds every block (router view).
    pub in_sync: [bool; 2],
    /// The nodes' signals below 100 and the data-path scores, as `name=score` (for post-mortems).
    pub low_signals: [String; 2],
}

impl Point {
    /// One line of a post-mortem timeline.
    pub fn line(&self) -> String {
        let h = |i: usize| self.health[i].map_or("-".into(), |h| format!("{h:.0}"));
        format!(
            "{:7.2}s target {:3} {:<10} health {:>3}/{:>3} lat {:.0}/{:.0} us  source [{}] target [{}]",
            self.t,
            self.target_weight,
            self.mode,
            h(0),
            h(1),
            self.latency_us[0],
            self.latency_us[1],
            self.low_signals[0],
            self.low_signals[1]
        )
    }
}

/// A post-mortem timeline of points, one a line.
pub fn timeline_text(points: &[Point]) -> String {
    points.iter().map(Point::line).collect::<Vec<_>>().join("\n")
}

/// Polls the cluster's status every `every` in a thread; events are marked by the caller.
#[derive(Debug)]
pub struct Recorder {
    stop: Arc<AtomicBool>,
    pub points: Arc<Mutex<Vec<Point>>>,
    pub events: Arc<Mutex<Vec<(f64, String)>>>,
    epoch: Instant,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Recorder {
    pub fn start(bin: &Path, ctl: &Path, every: Duration) -> Recorder {
        let stop = Arc::new(AtomicBool::new(false));
        let points = Arc::new(Mutex::new(Vec::new()));
        let epoch = Instant::now();
        let (st, pts, bin, sock) =
            (stop.clone(), points.clone(), bin.to_path_buf(), ctl.display().to_string());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                if let Ok(out) = mirror_out(&bin, &["ctl", "--socket", &sock, "status", "--json"]) {
                    if let Ok(s) = serde_json::from_str::<serde_json::Value>(&out) {
                        let r = |i: usize| &s["replicas"][i];
                        let lat = |i: usize| {
                            let (a, b) = (
                                r(i)["read_latency_us"].as_f64().unwrap_or(0.0),
                                r(i)["write_latency_us"].as_f64().unwrap_or(0.0),
                            );
                            a.max(b)
                        };
                        let health = |i: usize| {
                            if r(i)["node"]["reachable"] == false {
                                None
                            } else {
                                r(i)["node"]["health"].as_f64()
                            }
                        };
                        let low = |i: usize| {
                            let mut v: Vec<String> = r(i)["node"]["signals"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .filter(|g| g["score"].as_f64().is_some_and(|x| x < 100.0))
                                .map(|g| format!("{}={:.0}", g["name"].as_str().unwrap_or("?"), g["score"]))
                                .collect();
                            if let Some(d) = r(i)["node"]["datapath_score"].as_f64() {
                                v.push(format!("datapath={d:.0}"));
                            }
                            v.join(" ")
                        };
                        pts.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(Point {
                            t: epoch.elapsed().as_secs_f64(),
                            target_weight: s["weights"]["target"].as_u64().unwrap_or(0) as u8,
                            mode: s["mode"].as_str().unwrap_or("?").to_string(),
                            health: [health(0), health(1)],
                            latency_us: [lat(0), lat(1)],
                            reads: [r(0)["reads"].as_u64().unwrap_or(0), r(1)["reads"].as_u64().unwrap_or(0)],
                            in_sync: [r(0)["state"] == "in-sync", r(1)["state"] == "in-sync"],
                            low_signals: [low(0), low(1)],
                        });
                    }
                }
                std::thread::sleep(every.saturating_sub(t0.elapsed()));
            }
        });
        Recorder { stop, points, events: Arc::new(Mutex::new(Vec::new())), epoch, thread: Some(thread) }
    }

    /// Marks an event now; returns its time.
    pub fn mark(&self, what: &str) -> f64 {
        let t = self.epoch.elapsed().as_secs_f64();
        self.events.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push((t, what.to_string()));
        t
    }

    pub fn points(&self) -> Vec<Point> {
        self.points.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Number of times the target weight changed direction in a series of weights.
pub fn reversals(weights: impl IntoIterator<Item = u8>) -> u32 {
    let mut last: Option<u8> = None;
    let mut dir = 0i8;
    let mut n = 0;
    for w in weights {
        if let Some(l) = last {
            let d = (i16::from(w) - i16::from(l)).signum() as i8;
            if d != 0 {
                if dir != 0 && d != dir {
                    n += 1;
                }
                dir = d;
            }
        }
        last = Some(w);
    }
    n
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_fio_errors_and_reversals() {
        assert_eq!(super::fio_errors("verify: (groupid=0, jobs=1): err= 0: pid=1"), 0);
        assert_eq!(super::fio_errors("a: err= 5: pid\nb: err=2 (file"), 7);
        assert_eq!(super::reversals([0, 0, 30, 30, 100, 100]), 0);
        assert_eq!(super::reversals([0, 30, 0, 30]), 2);
        assert_eq!(super::reversals([0, 100, 80, 60, 0]), 1);
    }
}

/// The target's read weight in a `mirror ctl status --json` answer.
pub fn target_weight(s: &serde_json::Value) -> u64 {
    s["weights"]["target"].as_u64().unwrap_or(0)
}

/// Scenario (a): the source disk gets slow (cgroup throttle to `iops`) under a verifying
/// workload.
#[derive(Debug, Clone)]
pub struct DegradeResult {
    /// Seconds from the throttle until the target weight reached 90 (None: not within 10 s).
    pub shift_s: Option<f64>,
    /// Direction changes of the weights after it (5 s, or the hold), while the disk stays slow.
    pub reversals: u32,
    /// Lowest target weight in that time.
    pub min_after: u8,
    /// Highest target weight during the calm start (the 4 s under the workload before the
    /// throttle): nothing is wrong yet, so it should stay near 0.
    pub calm_max: u8,
    /// Seconds from lifting the throttle until the target's share was back at 0 (None: not
    /// within [`RECOVERY_WAIT`]): a source whose disk is well again gets its reads back.
    pub recovered_s: Option<f64>,
    pub failed_ios: u64,
    pub failures: Vec<String>,
    /// The recorded timeline, one point a line (for failure messages).
    pub timeline: String,
}

/// How long scenario (a) waits for the reads to come back after the throttle is lifted: the
/// release or failback hold, the ramp, and room for a loaded machine.
pub const RECOVERY_WAIT: Duration = Duration::from_mins(1);

pub fn scenario_a(o: &Opts, iops: u32) -> Result<DegradeResult> {
    scenario_a_held(o, iops, Duration::from_secs(5))
}

/// Scenario (a) with the disk kept slow for `hold` after the shift (the long degradation: the
/// disk's baseline must not absorb it while it lasts).
pub fn scenario_a_held(o: &Opts, iops: u32, hold: Duration) -> Result<DegradeResult> {
    let c = Cluster::start(o)?;
    let w = Workload::start(&c.nbd, 48, None);
    let mut rec = Recorder::start(&o.bin, &c.ctl, Duration::from_millis(100));
    // Let the source's monitor learn its disk's baseline under the workload.
    std::thread::sleep(Duration::from_secs(4));
    let t0 = rec.mark("throttle");
    let calm_max = rec.points().iter().map(|p| p.target_weight).max().unwrap_or(0);
    c.throttle_source(Some(iops))?;
    let shift = c.wait_for("target weight >= 90", Duration::from_secs(10), |s| target_weight(s) >= 90).ok();
    let from = t0 + shift.map_or(0.0, |d| d.as_secs_f64());
    std::thread::sleep(hold);
    let lifted = rec.mark("throttle lifted");
    let points = rec.points();
    let after: Vec<u8> = points.iter().filter(|p| p.t >= from).map(|p| p.target_weight).collect();
    c.throttle_source(None)?;
    let recovered = c.wait_for("target weight back to 0", RECOVERY_WAIT, |s| target_weight(s) == 0).ok();
    rec.stop();
    let points = rec.points();
    let r = w.finish();
    Ok(DegradeResult {
        shift_s: shift.map(|d| d.as_secs_f64()),
        reversals: reversals(after.iter().copied()),
        min_after: after.iter().copied().min().unwrap_or(0),
        calm_max,
        recovered_s: recovered.map(|d| d.as_secs_f64()),
        failed_ios: r.failed_ios,
        failures: r.failures,
        timeline: format!("throttle at {t0:.2}s, lifted at {lifted:.2}s\n{}", timeline_text(&points)),
    })
}

/// Scenarios (b) and (c): SIGKILL the source under a verifying workload, restart it, wait for
/// resync and failback.
#[derive(Debug, Clone)]
pub struct KillResult {
    /// Seconds from the kill until the target weight was 100.
    pub failover_s: f64,
    /// Seconds from the restart until failback completed (source in sync, weights normal).
    pub failback_s: f64,
    pub failed_ios: u64,
    pub failures: Vec<String>,
    pub replicas_identical: bool,
    /// Reasons of the weight changes, in order.
    pub events: Vec<String>,
}

pub fn scenario_bc(o: &Opts) -> Result<KillResult> {
    let mut c = Cluster::start(o)?;
    let w = Workload::start(&c.nbd, 48, None);
    std::thread::sleep(Duration::from_secs(2));
    c.source.kill();
    let failover = c.wait_for("target 100", Duration::from_secs(5), |s| target_weight(s) == 100)?;
    std::thread::sleep(Duration::from_secs(2));
    c.source.try_restart()?;
    let back = c
        .wait_for("failback complete", Duration::from_mins(2), |s| {
            s["replicas"][0]["state"] == "in-sync" && s["mode"] == "Normal" && target_weight(s) == 0
        })
        .map_err(|e| anyhow::anyhow!("{e}\n{}", c.serve_log()))?;
    let status = c.status()?;
    let r = w.finish();
    c.stop_serve();
    let (a, b) = c.digests()?;
    Ok(KillResult {
        failover_s: failover.as_secs_f64(),
        failback_s: back.as_secs_f64(),
        failed_ios: r.failed_ios,
        failures: r.failures,
        replicas_identical: a == b,
        events: status["events"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["reason"].as_str().map(str::to_string))
            .collect(),
    })
}

/// Scenario (d): the source's health oscillates around the "good" line for `secs` (one of two
/// application probes flips every 2 s).
#[derive(Debug, Clone)]
pub struct OscillationResult {
    /// Direction changes of the target weight.
    pub reversals: u32,
    /// Times the source health crossed 80 (either way), as the router saw it.
    pub crossings: usize,
    pub weights: Vec<u8>,
    pub health: Vec<u8>,
    pub failed_ios: u64,
    pub failures: Vec<String>,
}

pub fn scenario_d(o: &Opts, secs: u64) -> Result<OscillationResult> {
    let steady = ProbeServer::start()?;
    let flappy = ProbeServer::start()?;
    let mut o = o.clone();
    o.source_probes = vec![steady.url.clone(), flappy.url.clone()];
    let c = Cluster::start(&o)?;
    let w = Workload::start(&c.nbd, 48, Some(500));
    std::thread::sleep(Duration::from_secs(3));
    let mut rec = Recorder::start(&o.bin, &c.ctl, Duration::from_millis(100));
    let t0 = Instant::now();
    let mut healthy = true;
    while t0.elapsed() < Duration::from_secs(secs) {
        healthy = !healthy;
        flappy.healthy.store(healthy, Ordering::Relaxed);
        std::thread::sleep(Duration::from_secs(2));
    }
    rec.stop();
    let r = w.finish();
    let pts = rec.points();
    let weights: Vec<u8> = pts.iter().map(|p| p.target_weight).collect();
    let health: Vec<u8> = pts.iter().map(|p| p.health[0].unwrap_or(0.0) as u8).collect();
    Ok(OscillationResult {
        reversals: reversals(weights.iter().copied()),
        crossings: health.windows(2).filter(|w| (w[0] >= 80) != (w[1] >= 80)).count(),
        weights,
        health,
        failed_ios: r.failed_ios,
        failures: r.failures,
    })
}

/// The steps of the slowly growing degradation: IOPS of the source disk's throttle, lowered every
/// few seconds under a depth-1 workload at 400 IOPS (latency about 2, 3, 4, 5.5, 7.5, 10 ms
/// against a disk of about 1 ms).
pub const GRADUAL_STEPS: [u32; 6] = [500, 330, 250, 180, 130, 100];

/// Scenario (g): a degradation that grows slowly.
#[derive(Debug, Clone)]
pub struct GradualResult {
    /// Seconds from the target's share first rising to the source's health first falling below
    /// the critical line (30), as `ctl status` shows them (None: one of them did not happen).
    pub lead_s: Option<f64>,
    /// Distinct target shares strictly between 0 and 100 held for at least a second.
    pub intermediate_shares: Vec<u8>,
    pub reversals: u32,
    pub failed_ios: u64,
    pub failures: Vec<String>,
    pub timeline: String,
}

/// Distinct values strictly between 0 and 100 held for at least `hold_s` in a series of
/// (time, share).
pub fn held_shares(w: &[(f64, u8)], hold_s: f64) -> Vec<u8> {
    let mut out: Vec<u8> = Vec::new();
    let mut i = 0;
    while i < w.len() {
        let j = (i..w.len()).find(|&j| w[j].1 != w[i].1).unwrap_or(w.len());
        let end = if j < w.len() { w[j].0 } else { w[w.len() - 1].0 };
        if w[i].1 > 0 && w[i].1 < 100 && end - w[i].0 >= hold_s && !out.contains(&w[i].1) {
            out.push(w[i].1);
        }
        i = j;
    }
    out
}

/// Runs scenario (g): a calm start, then the source's throttle lowered through `steps`, `every`
/// apart, and held at the last step for `every`.
pub fn scenario_gradual(o: &Opts, steps: &[u32], every: Duration) -> Result<GradualResult> {
    let c = Cluster::start(o)?;
    let w = Workload::start_qd(&c.nbd, 48, Some(400), 1);
    let mut rec = Recorder::start(&o.bin, &c.ctl, Duration::from_millis(100));
    std::thread::sleep(Duration::from_secs(4));
    let t0 = rec.mark("ramp starts");
    for &iops in steps {
        rec.mark(&format!("{iops} IOPS"));
        c.throttle_source(Some(iops))?;
        std::thread::sleep(every);
    }
    std::thread::sleep(every);
    rec.stop();
    c.throttle_source(None)?;
    let r = w.finish();
    let pts: Vec<Point> = rec.points().into_iter().filter(|p| p.t >= t0).collect();
    let rise = pts.iter().find(|p| p.target_weight > 0).map(|p| p.t);
    let critical = pts.iter().find(|p| p.health[0].is_some_and(|h| h < 30.0)).map(|p| p.t);
    let shares: Vec<(f64, u8)> = pts.iter().map(|p| (p.t, p.target_weight)).collect();
    Ok(GradualResult {
        lead_s: rise.zip(critical).map(|(r, c)| c - r),
        intermediate_shares: held_shares(&shares, 1.0),
        reversals: reversals(shares.iter().map(|p| p.1)),
        failed_ios: r.failed_ios,
        failures: r.failures,
        timeline: format!("ramp from {t0:.2}s\n{}", timeline_text(&pts)),
    })
}

/// A calm period of `secs` under the verifying workload with nothing wrong: the highest target
/// weight seen (nothing is wrong, so it should stay near 0; run it beside CPU hogs to see that a
/// condition both nodes share moves nothing).
pub fn calm_period(o: &Opts, secs: u64) -> Result<u8> {
    let c = Cluster::start(o)?;
    let w = Workload::start(&c.nbd, 48, None);
    let mut rec = Recorder::start(&o.bin, &c.ctl, Duration::from_millis(100));
    std::thread::sleep(Duration::from_secs(secs));
    rec.stop();
    let r = w.finish();
    if r.failed_ios > 0 {
        anyhow::bail!("fio failed during the calm period: {:?}", r.failures);
    }
    Ok(rec.points().iter().map(|p| p.target_weight).max().unwrap_or(0))
}
