//! `cargo xtask bench ublk` (runs inside the VM, where ublk, loop and raid1 load): fio with
//! io_uring and O_DIRECT on block devices, all set up side by side in the same VM on files of
//! the same size in one tmpfs (or, with `--fs ext4`, in one ext4 filesystem on a loop device over
//! a tmpfs file: a disk filesystem serves page-cache reads without blocking, tmpfs does not):
//!   - ours-2local:  `mirror serve --frontend ublk`, two local replicas (weights 50/50),
//!   - ours-1replica: our ublk frontend over one local replica (the router needs two replicas,
//!     so this is one `Replica` with the same local data path, io_uring and page cache, without
//!     the router's second write; served in-process by this driver),
//!   - md-raid1:     md raid1 over two loop devices,
//!   - rublk:        rublk's loop target on one file (`--buffered-io`, like the others),
//!   - loop:         the kernel loop device on one file.
//!
//! Jobs: 4 KiB random read / write at iodepth 32, 128 KiB sequential read / write at iodepth 8.
//! Rounds rotate the order of the devices; the median over rounds is reported, and ratios
//! ours / md raid1 and ours-1replica / rublk. Writes the JSON to `--out`.

use std::{
    io::BufRead,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
};

use anyhow::{bail, ensure, Context, Result};
use mirror::{
    frontend::ublk::{UblkFrontend, UblkOptions},
    replication::server::{Server, ServerConfig, VolumeSpec},
    volume::{
        fast::{FastOp, FastPlan},
        local::LocalReplica,
        replica::{Location, Replica},
        uring::UringFile,
        BlockDev,
    },
};
use mirror_tests::bench::{median, Kill};

struct Args {
    size: u64,
    rounds: usize,
    runtime: u64,
    mirror: PathBuf,
    rublk: PathBuf,
    dir: PathBuf,
    out: PathBuf,
    fast_path: bool,
    /// Filesystem of the data files: `tmpfs`, or `ext4` (on a loop device over a tmpfs file).
    fs: String,
    /// Where the data files go (set in `main`).
    data: PathBuf,
    /// Only these jobs / devices (by name; empty: all), for quick experiments. The report's
    /// ratios need both sides: a ratio whose device was left out reads NaN.
    jobs: Vec<String>,
    devices: Vec<String>,
    /// Extra arguments for `mirror serve` (ours-2local), e.g. `--serve-arg=--ublk-queues=2`.
    serve_args: Vec<String>,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        size: 256 << 20,
        rounds: 3,
        runtime: 4,
        mirror: PathBuf::from("target/release/mirror"),
        rublk: PathBuf::from("/root/.cargo/bin/rublk"),
        dir: PathBuf::from("/run/mirror-bench-ublk"),
        out: PathBuf::from("target/bench/ublk.json"),
        fast_path: true,
        fs: "tmpfs".into(),
        data: PathBuf::new(),
        jobs: Vec::new(),
        devices: Vec::new(),
        serve_args: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        if k == "--no-fast-path" {
            a.fast_path = false;
            continue;
        }
        if let Some(v) = k.strip_prefix("--serve-arg=") {
            a.serve_args.push(v.to_string());
            continue;
        }
        let v = it.next().with_context(|| format!("{k} needs a value"))?;
        match k.as_str() {
            "--size" => a.size = mirror::parse_size(&v).map_err(anyhow::Error::msg)?,
            "--rounds" => a.rounds = v.parse()?,
            "--runtime" => a.runtime = v.parse()?,
            "--mirror-bin" => a.mirror = v.into(),
            "--rublk" => a.rublk = v.into(),
            "--dir" => a.dir = v.into(),
            "--out" => a.out = v.into(),
            "--fs" if v == "tmpfs" || v == "ext4" => a.fs = v,
            "--fs" => bail!("--fs is tmpfs or ext4, not {v:?}"),
            "--jobs" => a.jobs = list(&v, JOBS.iter().map(|j| j.0))?,
            "--devices" => a.devices = list(&v, DEVICES.iter().copied())?,
            _ => bail!(
                "unknown flag {k} (--size, --rounds, --runtime, --mirror-bin, --rublk, --dir, --out, --fs, \
                 --jobs, --devices, --serve-arg=ARG, --no-fast-path)"
            ),
        }
    }
    Ok(a)
}

/// Every device of the benchmark, in its order.
const DEVICES: &[&str] = &["ours-2local", "ours-1replica", "md-raid1", "rublk", "loop"];

/// A comma-separated subset of `known`.
fn list<'a>(v: &str, known: impl Iterator<Item = &'a str> + Clone) -> Result<Vec<String>> {
    let names: Vec<String> = v.split(',').filter(|n| !n.is_empty()).map(str::to_string).collect();
    for n in &names {
        ensure!(
            known.clone().any(|k| k == n),
            "unknown name {n:?} (known: {})",
            known.collect::<Vec<_>>().join(", ")
        );
    }
    Ok(names)
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A data file (written, not sparse: every config starts from allocated pages).
fn data_file(a: &Args, name: &str) -> Result<PathBuf> {
    let p = a.data.join(name);
    run(Command::new("dd").args([
        "if=/dev/zero",
        &format!("of={}", p.display()),
        "bs=1M",
        &format!("count={}", a.size >> 20),
        "status=none",
    ]))?;
    Ok(p)
}

/// Something torn down at the end (loop devices, md array, rublk device).
struct Undo(Vec<Vec<String>>);

impl Drop for Undo {
    fn drop(&mut self) {
        for c in self.0.iter().rev() {
            let _ = Command::new(&c[0]).args(&c[1..]).stdout(Stdio::null()).stderr(Stdio::null()).status();
        }
    }
}

fn losetup(file: &Path, undo: &mut Undo) -> Result<String> {
    let dev =
        run(Command::new("losetup").args(["-f", "--show", "--direct-io=off"]).arg(file))?.trim().to_string();
    undo.0.push(vec!["losetup".into(), "-d".into(), dev.clone()]);
    Ok(dev)
}

/// One local replica of volume `v` as a [`BlockDev`] (the router's local data path, alone).
struct OneReplica {
    r: Replica,
    size: u64,
    _server: Server,
}

impl OneReplica {
    fn open(path: &Path) -> Result<OneReplica> {
        let server = Server::start(ServerConfig {
            listen: "127.0.0.1:0".into(),
            volumes: vec![VolumeSpec {
                name: "v".into(),
                path: path.into(),
                size: None,
                meta: None,
                block_size: 4096,
                direct_io: false,
            }],
            secret: b"bench-secret-0123456789".to_vec(),
            rate: Default::default(),
            health: mirror::health::monitor::NodeHealth::new(),
        })?;
        let vol = server.volume("v").context("volume v")?;
        let size = vol.size();
        let uring = Some(Arc::new(UringFile::open(path, false)?));
        let loc = Location::Local(LocalReplica::new(vol, server.addr.to_string(), uring));
        Ok(OneReplica { r: Replica::new("source", loc, 4096), size, _server: server })
    }
}

impl BlockDev for OneReplica {
    fn size(&self) -> u64 {
        self.size
    }
    fn block_size(&self) -> u32 {
        4096
    }
    async fn read(&self, offset: u64, len: u32) -> std::io::Result<Vec<u8>> {
        self.r.read(offset, len).await.map_err(|e| e.to_io())
    }
    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> std::io::Result<()> {
        self.r.write(offset, Arc::new(data), fua).await.map_err(|e| e.to_io())
    }
    async fn flush(&self) -> std::io::Result<()> {
        self.r.flush().await.map_err(|e| e.to_io())
    }
    async fn trim(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.r.write_zeroes(offset, len).await.map_err(|e| e.to_io())
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.r.write_zeroes(offset, len).await.map_err(|e| e.to_io())
    }
    fn fast_path(&self, op: FastOp, offset: u64, len: u32) -> Option<FastPlan<'_>> {
        FastPlan::new(op, offset, len, [Some(&self.r), None])
    }
}

/// A fio job: (name, rw, bs, iodepth).
const JOBS: &[(&str, &str, &str, u32)] = &[
    ("randread", "randread", "4k", 32),
    ("randwrite", "randwrite", "4k", 32),
    ("seqread", "read", "128k", 8),
    ("seqwrite", "write", "128k", 8),
];

/// IOPS for 4 KiB jobs, MiB/s for 128 KiB jobs.
fn fio(dev: &str, rw: &str, bs: &str, depth: u32, runtime: u64) -> Result<f64> {
    let out = run(Command::new("fio")
        .args(["--name=bench", "--ioengine=io_uring", "--direct=1", "--output-format=json"])
        .args(["--time_based", "--norandommap", "--randrepeat=0", "--ramp_time=1"])
        .arg(format!("--filename={dev}"))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={bs}"))
        .arg(format!("--iodepth={depth}"))
        .arg(format!("--runtime={runtime}")))?;
    let js: serde_json::Value = serde_json::from_str(&out).context("fio json")?;
    let job = &js["jobs"][0];
    let side = if rw.contains("read") { &job["read"] } else { &job["write"] };
    ensure!(job["error"] == 0, "fio {rw} on {dev}: error {}", job["error"]);
    Ok(if bs == "4k" {
        side["iops"].as_f64().unwrap_or(0.0)
    } else {
        side["bw"].as_f64().unwrap_or(0.0) / 1024.0
    })
}

fn main() -> Result<()> {
    let a = parse_args()?;
    for m in ["ublk_drv", "loop", "raid1"] {
        let _ = Command::new("modprobe").arg(m).status();
    }
    std::fs::create_dir_all(&a.dir)?;
    let mounted = std::fs::read_to_string("/proc/mounts")?
        .lines()
        .any(|l| l.split_whitespace().nth(1) == a.dir.to_str());
    let mut undo = Undo(Vec::new());
    if !mounted {
        run(Command::new("mount").args(["-t", "tmpfs", "-o", "size=90%", "tmpfs"]).arg(&a.dir))?;
        undo.0.push(vec!["umount".into(), "-l".into(), a.dir.display().to_string()]);
    }
    std::fs::write(a.dir.join("secret"), "bench-secret-0123456789\n")?;
    let mut a = a;
    a.data = a.dir.clone();
    if a.fs == "ext4" {
        // A disk filesystem, as replicas would live on: unlike tmpfs it serves page-cache reads
        // without blocking (RWF_NOWAIT, io_uring's inline completion), for every device here.
        let img = a.dir.join("ext4.img");
        std::fs::File::create(&img)?.set_len(8 * a.size + (256 << 20))?;
        let dev = losetup(&img, &mut undo)?;
        run(Command::new("mkfs.ext4").args(["-q", "-F", "-E", "nodiscard", &dev]))?;
        a.data = a.dir.join("ext4");
        std::fs::create_dir_all(&a.data)?;
        run(Command::new("mount").arg(&dev).arg(&a.data))?;
        undo.0.push(vec!["umount".into(), "-l".into(), a.data.display().to_string()]);
    }
    let a = a;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let _enter = rt.enter();
    let want = |d: &str| a.devices.is_empty() || a.devices.iter().any(|n| n == d);
    let mut devs: Vec<(&str, String)> = Vec::new();

    // ours-2local
    let mut _serve = None;
    if want("ours-2local") {
        let (s, t) = (data_file(&a, "s.img")?, data_file(&a, "t.img")?);
        let mut child = Command::new(&a.mirror)
            .args([
                "serve",
                "--volume",
                "v",
                "--nbd",
                "127.0.0.1:0",
                "--frontend",
                "ublk",
                "--target-weight",
                "50",
                // Both data files are zeroed alike (md raid1 gets --assume-clean too).
                "--assume-clean",
            ])
            .args(["--ublk-queues", "1", "--ublk-depth", "128"])
            .args(if a.fast_path { &[][..] } else { &["--ublk-no-fast-path"][..] })
            .args(&a.serve_args)
            .arg("--secret-file")
            .arg(a.dir.join("secret"))
            .arg(format!("--source=local:{}", s.display()))
            .arg(format!("--target=local:{}", t.display()))
            .arg("--ctl-socket")
            .arg(a.dir.join("ctl.sock"))
            .env("RUST_LOG", "error")
            .stdout(Stdio::piped())
            .spawn()
            .context("mirror serve")?;
        let mut out = std::io::BufReader::new(child.stdout.take().expect("piped"));
        _serve = Some(Kill(child));
        let ours = loop {
            let mut line = String::new();
            ensure!(out.read_line(&mut line)? > 0, "mirror serve exited before its ublk device came up");
            if let Some(d) = line.trim().strip_prefix("ublk device ") {
                break d.to_string();
            }
        };
        std::thread::spawn(move || for _ in out.lines() {});
        devs.push(("ours-2local", ours));
    }

    // ours-1replica, in this process
    let mut fe = None;
    if want("ours-1replica") {
        let one = Arc::new(OneReplica::open(&data_file(&a, "one.img")?)?);
        let opts = UblkOptions { queues: 1, depth: 128, fast_path: a.fast_path, ..Default::default() };
        let f = UblkFrontend::start(one, &opts)?;
        devs.push(("ours-1replica", f.bdev_path()));
        fe = Some(f);
    }

    // md raid1 over two loop devices
    if want("md-raid1") {
        let (la, lb) = (
            losetup(&data_file(&a, "md-a.img")?, &mut undo)?,
            losetup(&data_file(&a, "md-b.img")?, &mut undo)?,
        );
        run(Command::new("mdadm")
            .args([
                "--create",
                "/dev/md/mirrorbench",
                "--run",
                "--level=1",
                "--raid-devices=2",
                "--assume-clean",
            ])
            .args(["--metadata=1.2", "--bitmap=none", &la, &lb]))?;
        undo.0.push(vec!["mdadm".into(), "--stop".into(), "/dev/md/mirrorbench".into()]);
        devs.push(("md-raid1", "/dev/md/mirrorbench".into()));
    }

    // rublk loop on one file
    if want("rublk") {
        let rublk_id = 7;
        let rf = data_file(&a, "rublk.img")?;
        run(Command::new(&a.rublk)
            .args([
                "add",
                "loop",
                "-n",
                &rublk_id.to_string(),
                "-q",
                "1",
                "-d",
                "128",
                "--buffered-io",
                "--quiet",
                "-f",
            ])
            .arg(&rf))?;
        undo.0.push(vec![a.rublk.display().to_string(), "del".into(), "-n".into(), rublk_id.to_string()]);
        devs.push(("rublk", format!("/dev/ublkb{rublk_id}")));
    }

    // kernel loop
    if want("loop") {
        devs.push(("loop", losetup(&data_file(&a, "loop.img")?, &mut undo)?));
    }
    // The data files were just written: their writeback would otherwise land on whichever
    // device runs first.
    run(&mut Command::new("sync"))?;
    for (_, d) in &devs {
        for _ in 0..100 {
            if Path::new(d).exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        ensure!(Path::new(d).exists(), "{d} did not appear");
    }

    // Samples per device of DEVICES and job of JOBS (left-out ones stay empty: NaN medians).
    let mut samples: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); JOBS.len()]; DEVICES.len()];
    let slot = |n: &str| DEVICES.iter().position(|d| *d == n).expect("known device");
    for round in 0..a.rounds {
        for k in 0..devs.len() {
            let (name, dev) = &devs[(k + round) % devs.len()];
            for (j, (job, rw, bs, depth)) in JOBS.iter().enumerate() {
                if !a.jobs.is_empty() && !a.jobs.iter().any(|n| n == job) {
                    continue;
                }
                let v = fio(dev, rw, bs, *depth, a.runtime)?;
                eprintln!("round {round} {name:<14} {rw:<9} {v:>10.0}");
                samples[slot(name)][j].push(v);
            }
        }
    }
    let med: Vec<Vec<f64>> = samples.into_iter().map(|d| d.into_iter().map(median).collect()).collect();
    let (o2, o1, md, ru, lo) =
        (slot("ours-2local"), slot("ours-1replica"), slot("md-raid1"), slot("rublk"), slot("loop"));
    // The devices that ran, in the table's order.
    let shown: Vec<usize> =
        (0..DEVICES.len()).filter(|&i| devs.iter().any(|(n, _)| *n == DEVICES[i])).collect();
    println!(
        "\nublk benchmark (VM, TCG; data files on {}; {} rounds x {} s; medians; 4k: IOPS, 128k: MiB/s)",
        a.fs, a.rounds, a.runtime
    );
    print!("{:<10}", "job");
    for &i in &shown {
        print!("{:>15}", DEVICES[i]);
    }
    println!("{:>14}{:>14}", "2local/md", "1repl/rublk");
    let mut js = serde_json::Map::new();
    for (j, (job, ..)) in JOBS.iter().enumerate() {
        if !a.jobs.is_empty() && !a.jobs.iter().any(|n| n == job) {
            continue;
        }
        print!("{job:<10}");
        for &i in &shown {
            print!("{:>15.0}", med[i][j]);
        }
        let (vs_md, vs_rublk) = (med[o2][j] / med[md][j], med[o1][j] / med[ru][j]);
        println!("{vs_md:>13.2}x{vs_rublk:>13.2}x");
        js.insert(format!("{job}_vs_md_raid1"), vs_md.into());
        js.insert(format!("single_replica_{job}_vs_rublk"), vs_rublk.into());
        js.insert(format!("{job}_vs_kernel_loop"), (med[o2][j] / med[lo][j]).into());
        for &i in &shown {
            js.insert(format!("{}_{job}", DEVICES[i]), med[i][j].into());
        }
    }
    js.insert("rounds".into(), a.rounds.into());
    js.insert("fast_path".into(), a.fast_path.into());
    js.insert("filesystem".into(), a.fs.clone().into());
    js.insert("runtime_s".into(), a.runtime.into());
    js.insert("size_bytes".into(), a.size.into());
    if !a.jobs.is_empty() || !a.devices.is_empty() || !a.serve_args.is_empty() {
        js.insert("jobs".into(), a.jobs.clone().into());
        js.insert("devices".into(), a.devices.clone().into());
        js.insert("serve_args".into(), a.serve_args.clone().into());
    }
    js.insert(
        "single_replica".into(),
        "our ublk frontend over one local Replica (same io_uring/page-cache data path; no router: it needs two replicas)".into(),
    );
    if let Some(p) = a.out.parent() {
        std::fs::create_dir_all(p)?;
    }
    std::fs::write(&a.out, serde_json::to_string_pretty(&serde_json::Value::Object(js))? + "\n")?;
    println!("wrote {}", a.out.display());
    let targets = [
        ("randread vs md raid1", med[o2][0] / med[md][0], 1.0),
        ("randwrite vs md raid1", med[o2][1] / med[md][1], 1.0),
        ("single-replica randread vs rublk", med[o1][0] / med[ru][0], 0.9),
        ("single-replica randwrite vs rublk", med[o1][1] / med[ru][1], 0.9),
    ];
    for (what, got, want) in targets {
        println!("target {what} >= {want:.1}x: {got:.2}x {}", if got >= want { "met" } else { "NOT met" });
    }
    if let Some(Err(e)) = fe.map(UblkFrontend::stop) {
        eprintln!("stopping ours-1replica: {e}");
    }
    Ok(())
}
