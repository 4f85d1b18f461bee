//! Sick-node fixtures: a mirrored volume served by `mirror serve` (local source, remote target
//! in its own `mirror replica` process, possibly inside a network namespace), fio driving its
//! NBD export with its latency figures read from fio's JSON, and the router's status through
//! `mirror ctl`. Used by the `sick_*` tests and `bench-sick-node`.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{
    env::mirror_bin,
    fs::{file_digest, secret_file, unique_name, TempDir},
    net::free_addr,
    proc::{drain, mirror_cli, spawn_until, sync_ok, Kill, Replica, ReplicaLaunch},
};

/// How the mirrored volume is set up.
#[derive(Debug, Clone)]
pub struct MirrorOpts {
    /// Volume size in bytes (both replica files, zero-filled, identical).
    pub size: u64,
    /// The target's read share in percent.
    pub target_weight: u8,
    /// Where the target replica listens (`None`: a free loopback port).
    pub target_listen: Option<String>,
    /// Run the target replica under this command prefix (e.g. `ip netns exec NS`).
    pub target_prefix: Vec<String>,
    /// More `mirror serve` flags.
    pub serve_extra: Vec<String>,
}

impl Default for MirrorOpts {
    fn default() -> Self {
        MirrorOpts {
            size: 128 << 20,
            target_weight: 50,
            target_listen: None,
            target_prefix: Vec::new(),
            serve_extra: Vec::new(),
        }
    }
}

impl MirrorOpts {
    /// The target replica inside `ns`, listening on its address there.
    pub fn in_namespace(ns: &crate::netns::NodeNs) -> MirrorOpts {
        MirrorOpts {
            target_listen: Some(format!("{}:0", ns.node_ip)),
            target_prefix: ns.prefix(),
            ..Default::default()
        }
    }
}

/// A mirrored volume being served: the target process, the router, their files.
#[derive(Debug)]
pub struct Mirror {
    pub dir: TempDir,
    pub secret: PathBuf,
    pub target: Replica,
    /// The `mirror serve` process (SIGKILL on drop).
    pub serve: Kill,
    /// The NBD export's `HOST:PORT`.
    pub nbd: String,
    /// The router's control socket.
    pub ctl: PathBuf,
    /// Where the local source's embedded server listens.
    pub source_listen: String,
}

impl Mirror {
    /// Creates two identical replicas, has them agree on a generation, and serves them.
    pub fn start(tag: &str, o: &MirrorOpts) -> Result<Mirror> {
        let dir = TempDir::create(tag)?;
        let secret = secret_file(&dir.0);
        let (s_img, t_img) = (dir.0.join("s.img"), dir.0.join("t.img"));
        for p in [&s_img, &t_img] {
            std::fs::File::create(p)?.set_len(o.size)?;
        }
        // A target beyond loopback (in its own namespace) would need TLS; these tests are about
        // what a sick link does to the data path, so they say plaintext out loud, as an operator
        // would have to (tls_replication tests the TLS link).
        let plain: &[&str] = match &o.target_listen {
            Some(l) if !l.starts_with("127.") => &["--insecure-plaintext"],
            _ => &[],
        };
        let mut args: Vec<String> = o.target_prefix.clone();
        args.push(mirror_bin().display().to_string());
        args.extend(
            [
                "replica",
                "--listen",
                o.target_listen.as_deref().unwrap_or("127.0.0.1:0"),
                "--volume",
                &format!("v={}", t_img.display()),
                "--secret-file",
                &secret.display().to_string(),
            ]
            .map(String::from),
        );
        args.extend(plain.iter().map(std::string::ToString::to_string));
        let bin = PathBuf::from(args.remove(0));
        let mut launch = ReplicaLaunch::new(bin, args);
        launch.rust_log = Some("warn".into());
        launch.log = Some(dir.0.join("target.log"));
        let target = Replica::launch(launch, &t_img)?;
        let source_listen = free_addr();
        // Identical content, new metadata: the first sync only agrees on a generation.
        let s0 = Replica::start(&s_img, &secret, Some(&source_listen), plain);
        sync_ok(&s0.addr, &target.addr, &secret, plain);
        drop(s0);
        std::thread::sleep(Duration::from_millis(200));
        let ctl = std::env::temp_dir().join(format!("{}.sock", unique_name("sick")));
        let log = std::fs::File::create(dir.0.join("serve.log"))?;
        let (child, nbd, out) = spawn_until(
            Command::new(mirror_bin())
                .arg("serve")
                .args(["--volume", "v", "--source", &format!("local:{}", s_img.display())])
                .args(["--target", &format!("remote:{}", target.addr)])
                .arg("--secret-file")
                .arg(&secret)
                .args(["--source-listen", &source_listen, "--target-weight", &o.target_weight.to_string()])
                .arg("--ctl-socket")
                .arg(&ctl)
                .args(["--nbd", "127.0.0.1:0"])
                .args(plain)
                .args(&o.serve_extra)
                .env("RUST_LOG", "warn")
                .stderr(log),
            "nbd listening on ",
        )
        .context("mirror serve")?;
        drain(out);
        Ok(Mirror { dir, secret, target, serve: Kill(child), nbd, ctl, source_listen })
    }

    /// The NBD URI of the export.
    pub fn uri(&self) -> String {
        format!("nbd://{}/", self.nbd)
    }

    /// The router's status (`mirror ctl status --json`).
    pub fn status(&self) -> Result<serde_json::Value> {
        let socket = self.ctl.display().to_string();
        let (ok, out, err) = mirror_cli(&["ctl", "--socket", &socket, "status", "--json"]);
        if !ok {
            bail!("mirror ctl status: {err}");
        }
        serde_json::from_str(&out).with_context(|| format!("ctl status json: {out}"))
    }

    /// The router's `replicas` entries (source, target) of its status.
    pub fn replicas(&self) -> Result<Vec<serde_json::Value>> {
        let st = self.status()?;
        let r = st.pointer("/router/replicas").or_else(|| st.get("replicas")).cloned();
        match r {
            Some(serde_json::Value::Array(v)) => Ok(v),
            _ => bail!("no replicas in the status: {st}"),
        }
    }

    /// Waits until the target is back in sync: the source records nothing for it and the router
    /// has it in sync.
    pub fn wait_in_sync(&self, limit: Duration) -> Result<()> {
        let sec = self.secret.display().to_string();
        let deadline = Instant::now() + limit;
        loop {
            let (ok, out, _) = mirror_cli(&[
                "status",
                "--node",
                &self.source_listen,
                "--volume",
                "v",
                "--secret-file",
                &sec,
            ]);
            let clean = ok
                && serde_json::from_str::<serde_json::Value>(&out)
                    .is_ok_and(|js| js["tracking"] == false && js["dirty_bytes"] == 0);
            if clean && self.replicas()?.iter().all(|r| r["state"] == "in-sync") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the target is not back in sync after {limit:?}: {out}; {:?}", self.replicas());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Stops the router (SIGKILL: what it acknowledged is on both replicas already).
    pub fn stop(&mut self) {
        let _ = self.serve.0.kill();
        let _ = self.serve.0.wait();
    }

    /// Digests of the two replica files (after the router stopped).
    pub fn digests(&self) -> (u128, u128) {
        (file_digest(&self.dir.0.join("s.img")), file_digest(&self.dir.0.join("t.img")))
    }

    /// The router's log so far (for failure messages).
    pub fn serve_log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("serve.log")).unwrap_or_default()
    }
}

/// Sends signal `sig` (e.g. libc::SIGSTOP) to process `pid`.
pub fn signal(pid: u32, sig: i32) -> Result<()> {
    // SAFETY: kill(2) on a process of the test's own; no memory is involved.
    if unsafe { libc::kill(pid as i32, sig) } != 0 {
        bail!("kill({pid}, {sig}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// fio's nbd engine on `uri` with these job arguments, JSON output; killed on drop.
#[derive(Debug)]
pub struct Fio(Option<Child>);

/// What fio reported for its one job.
#[derive(Debug, Clone)]
pub struct FioResult {
    /// fio's exit status was success.
    pub ok: bool,
    /// The job's error number (0: none).
    pub error: i64,
    /// Longest write and read completion (submission to completion), milliseconds.
    pub write_max_ms: f64,
    pub read_max_ms: f64,
    pub write_iops: f64,
    pub read_iops: f64,
    pub write_ios: u64,
    pub read_ios: u64,
    /// Read completion latency percentiles in ms (fio's `clat_ns.percentile` keys, e.g. "99.900000").
    pub read_pct_ms: Vec<(String, f64)>,
    /// The whole JSON and stderr, for messages.
    pub json: serde_json::Value,
    pub stderr: String,
}

impl FioResult {
    /// The read completion percentile `p` (e.g. "99.900000"), ms.
    pub fn read_pct(&self, p: &str) -> Option<f64> {
        self.read_pct_ms.iter().find(|(k, _)| k == p).map(|(_, v)| *v)
    }
}

impl Fio {
    pub fn spawn(uri: &str, args: &[&str]) -> Result<Fio> {
        let child = Command::new("fio")
            .args(["--name=sick", "--ioengine=nbd", "--output-format=json"])
            .args(["--percentile_list=50:99:99.9:100"])
            .args(args)
            .arg(format!("--uri={uri}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn fio")?;
        Ok(Fio(Some(child)))
    }

    pub fn wait(mut self) -> Result<FioResult> {
        let out = self.0.take().expect("not waited yet").wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        // fio may print notes before the JSON document.
        let start = stdout.find('{').with_context(|| format!("fio printed no JSON: {stdout}\n{stderr}"))?;
        let json: serde_json::Value = serde_json::from_str(&stdout[start..])
            .with_context(|| format!("fio JSON: {stdout}\n{stderr}"))?;
        let job = &json["jobs"][0];
        let ms = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0) / 1e6;
        let read_pct_ms = job["read"]["clat_ns"]["percentile"]
            .as_object()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), ms(v))).collect())
            .unwrap_or_default();
        Ok(FioResult {
            ok: out.status.success(),
            error: job["error"].as_i64().unwrap_or(-1),
            write_max_ms: ms(&job["write"]["lat_ns"]["max"]),
            read_max_ms: ms(&job["read"]["lat_ns"]["max"]),
            write_iops: job["write"]["iops"].as_f64().unwrap_or(0.0),
            read_iops: job["read"]["iops"].as_f64().unwrap_or(0.0),
            write_ios: job["write"]["total_ios"].as_u64().unwrap_or(0),
            read_ios: job["read"]["total_ios"].as_u64().unwrap_or(0),
            read_pct_ms,
            json,
            stderr,
        })
    }
}

impl Drop for Fio {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// fio's verifying 4 KiB random-write job over `size` bytes at queue depth `qd`, paced at
/// `iops` (so it spans a known time).
pub fn verify_job(size: u64, qd: u32, iops: u32) -> Vec<String> {
    [
        "--rw=randwrite".to_string(),
        "--bs=4k".into(),
        format!("--iodepth={qd}"),
        format!("--size={size}"),
        format!("--rate_iops={iops}"),
        "--verify=crc32c".into(),
        "--do_verify=1".into(),
        "--verify_fatal=1".into(),
        "--verify_backlog=256".into(),
        "--randrepeat=0".into(),
        "--verify_state_save=0".into(),
    ]
    .into()
}

/// Freezes a process for `stall` every `period` (SIGSTOP, SIGCONT) from a thread, until dropped
/// (which leaves it running).
#[derive(Debug)]
pub struct Staller {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<u32>>,
}

impl Staller {
    pub fn start(pid: u32, stall: Duration, period: Duration) -> Staller {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut n = 0;
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(period.saturating_sub(stall));
                if signal(pid, libc::SIGSTOP).is_err() {
                    break;
                }
                std::thread::sleep(stall);
                let _ = signal(pid, libc::SIGCONT);
                n += 1;
            }
            n
        });
        Staller { stop, thread: Some(thread) }
    }

    /// Stops stalling; returns how many stalls there were.
    pub fn finish(mut self) -> u32 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().map_or(0, |t| t.join().unwrap_or(0))
    }
}

impl Drop for Staller {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// fio's 4 KiB random-read job at queue depth `qd`, paced at `iops`, for `secs` seconds.
pub fn read_job(qd: u32, iops: u32, secs: u32) -> Vec<String> {
    [
        "--rw=randread".to_string(),
        "--bs=4k".into(),
        format!("--iodepth={qd}"),
        format!("--rate_iops={iops}"),
        "--time_based=1".into(),
        format!("--runtime={secs}"),
        "--randrepeat=0".into(),
    ]
    .into()
}

/// What makes the target sick in [`write_stall`].
#[derive(Debug, Clone, Copy)]
pub enum Sickness<'a> {
    /// The target process frozen (SIGSTOP ... SIGCONT).
    Frozen,
    /// The target's link black-holed (its node in `NodeNs`), then healed.
    Blackhole(&'a crate::netns::NodeNs),
}

/// What [`write_stall`] saw.
#[derive(Debug)]
pub struct WriteStall {
    pub fio: FioResult,
    /// The router's replicas at the end of the sickness.
    pub during: Vec<serde_json::Value>,
    /// How long the sickness lasted.
    pub held: Duration,
    /// From fio's end until the target was back in sync.
    pub resync: Duration,
    /// The replica files' digests after the router stopped.
    pub digests: (u128, u128),
}

impl WriteStall {
    /// Issue 15's bar for a sick target under writes, `what` naming the sickness: fio ran
    /// without error through enough writes to span it, the target was failed during it by its
    /// deadline, no write took longer than `max_write_ms`, and the replicas are identical after
    /// the resync. Prints the figures; panics with what failed.
    pub fn assert_unnoticed(&self, what: &str, max_write_ms: f64) {
        let r = &self.fio;
        println!(
            "{what} for {:?}: fio write max {:.1} ms, read max {:.1} ms, {} writes ({:.0} IOPS), error {}; \
             back in sync {:?} after fio ended",
            self.held, r.write_max_ms, r.read_max_ms, r.write_ios, r.write_iops, r.error, self.resync
        );
        assert!(r.ok && r.error == 0, "{what}: fio failed: {}\n{}", r.stderr, r.json);
        let target = &self.during[1];
        assert_eq!(target["state"], "failed", "{what}: the target during it: {:?}", self.during);
        assert!(target["timeouts"].as_u64().unwrap_or(0) > 0, "{what}: no deadline fired: {:?}", self.during);
        assert!(r.write_ios > 5000, "{what}: fio wrote too little to span it: {}", r.write_ios);
        assert!(
            r.write_max_ms <= max_write_ms,
            "{what}: fio's longest write took {:.1} ms (bar {max_write_ms} ms)",
            r.write_max_ms
        );
        assert_eq!(self.digests.0, self.digests.1, "{what}: replicas differ after the resync");
    }
}

/// fio's verifying 4 KiB random writes (QD16, 64 MiB at 1500/s: about 11 s) through the
/// mirror's export with the target sick for `hold` in the middle; then waits for the resync and
/// stops the router.
pub fn write_stall(m: Mirror, sick: Sickness<'_>, hold: Duration) -> Result<WriteStall> {
    let job = verify_job(64 << 20, 16, 1500);
    let fio = Fio::spawn(&m.uri(), &job.iter().map(String::as_str).collect::<Vec<_>>())?;
    std::thread::sleep(Duration::from_secs(2));
    let start = Instant::now();
    match sick {
        Sickness::Frozen => signal(m.target.pid(), libc::SIGSTOP)?,
        Sickness::Blackhole(ns) => ns.blackhole()?,
    }
    std::thread::sleep(hold);
    let during = m.replicas();
    match sick {
        Sickness::Frozen => signal(m.target.pid(), libc::SIGCONT)?,
        Sickness::Blackhole(ns) => ns.heal()?,
    }
    let held = start.elapsed();
    let fio = fio.wait()?;
    let during = during?;
    let t0 = Instant::now();
    m.wait_in_sync(Duration::from_mins(2)).with_context(|| m.serve_log())?;
    let resync = t0.elapsed();
    let mut m = m;
    m.stop();
    let digests = m.digests();
    Ok(WriteStall { fio, during, held, resync, digests })
}

/// What [`stalling_reads`] saw.
#[derive(Debug)]
pub struct StallingReads {
    /// fio's random reads with both replicas healthy, then with the target stalling.
    pub healthy: FioResult,
    pub stalled: FioResult,
    pub stalls: u32,
    /// Hedges over both runs.
    pub hedges_sent: u64,
    pub hedges_won: u64,
    /// The router's replicas at the end.
    pub replicas: Vec<serde_json::Value>,
}

impl StallingReads {
    /// fio's read p99.9 while stalling over the healthy one.
    pub fn p999_ratio(&self) -> Option<f64> {
        Some(self.stalled.read_pct("99.900000")? / self.healthy.read_pct("99.900000")?)
    }

    /// Hedges as a percentage of all reads of both runs.
    pub fn extra_reads_pct(&self) -> f64 {
        100.0 * self.hedges_sent as f64 / (self.healthy.read_ios + self.stalled.read_ios).max(1) as f64
    }
}

/// fio's 4 KiB random reads (QD8, 1000/s) through the export: `healthy_secs` with both replicas
/// well, then `stalled_secs` with the target frozen for `stall` every `period`.
pub fn stalling_reads(
    m: &Mirror,
    stall: Duration,
    period: Duration,
    healthy_secs: u32,
    stalled_secs: u32,
) -> Result<StallingReads> {
    let run = |secs| -> Result<Fio> {
        Fio::spawn(&m.uri(), &read_job(8, 1000, secs).iter().map(String::as_str).collect::<Vec<_>>())
    };
    let healthy = run(healthy_secs)?.wait()?;
    let fio = run(stalled_secs)?;
    std::thread::sleep(Duration::from_secs(1));
    let staller = Staller::start(m.target.pid(), stall, period);
    let stalled = fio.wait()?;
    let stalls = staller.finish();
    let st = m.status()?;
    let count = |k: &str| st["hedges"][k].as_u64().unwrap_or(0);
    Ok(StallingReads {
        healthy,
        stalled,
        stalls,
        hedges_sent: count("sent"),
        hedges_won: count("won"),
        replicas: m.replicas()?,
    })
}
