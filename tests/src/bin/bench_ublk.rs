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
//!   - loop:         the kernel loop device on one file,
//!   - base-2local:  with `--baseline-bin PATH`, ours-2local served by another build's binary (an
//!     A/B of two commits in one run, alternating with the rest; `<job>_vs_baseline` in the JSON).
//!
//! Jobs: 4 KiB random read / write at iodepth 32, 128 KiB sequential read / write at iodepth 8.
//! Rounds rotate the order of the devices; the median over rounds is reported, and ratios
//! ours / md raid1 and ours-1replica / rublk. Writes the JSON to `--out`.

use std::{
    any::Any,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
};

use anyhow::{ensure, Context, Result};
use clap::{Parser, ValueEnum};
use mirror::{
    frontend::ublk::{UblkFrontend, UblkOptions},
    replication::server::{Server, ServerConfig},
    storage::VolumeSpec,
    volume::{
        fast::{FastOp, FastPlan},
        local::LocalReplica,
        replica::{Location, Replica},
        uring::UringFile,
        BlockDev,
    },
};
use mirror_tests::{
    blockdev::LoopDev,
    proc::{drain, output as run, spawn_until, Kill},
    stats::median,
};

/// Our ublk device against md raid1, rublk and the kernel loop device, inside the VM (`cargo
/// xtask bench ublk`): fio with io_uring and O_DIRECT, 4 KiB random and 128 KiB sequential reads
/// and writes, rounds rotating the devices. Prints a table of medians and ratios and writes them
/// as JSON.
#[derive(Debug, Parser)]
#[command(name = "bench-ublk", args_override_self = true)]
struct Args {
    /// Size of each data file (suffixes K, M, G).
    #[arg(long, default_value = "256M", value_parser = mirror::parse_size)]
    size: u64,
    /// Rounds; each rotates the order of the devices.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds per fio job (after one second of ramp).
    #[arg(long, default_value_t = 4)]
    runtime: u64,
    /// The `mirror` binary to measure.
    #[arg(long = "mirror-bin", value_name = "PATH", default_value = "target/release/mirror")]
    mirror: PathBuf,
    /// Another build's `mirror` binary, served as base-2local beside ours-2local (A/B).
    #[arg(long = "baseline-bin", value_name = "PATH")]
    baseline: Option<PathBuf>,
    /// The rublk binary (the reference ublk server).
    #[arg(long, default_value = "/root/.cargo/bin/rublk")]
    rublk: PathBuf,
    /// Scratch directory (a tmpfs is mounted on it unless one is there).
    #[arg(long, default_value = "/run/mirror-bench-ublk")]
    dir: PathBuf,
    /// Where the JSON results go.
    #[arg(long, default_value = "target/bench/ublk.json")]
    out: PathBuf,
    /// Our devices without the queue-thread fast path (`--ublk-no-fast-path`).
    #[arg(long = "no-fast-path", action = clap::ArgAction::SetFalse)]
    fast_path: bool,
    /// Filesystem of the data files: the tmpfs itself, or ext4 on a loop device over a tmpfs
    /// file (a disk filesystem serves page-cache reads without blocking, tmpfs does not).
    #[arg(long, value_enum, default_value_t = Fs::Tmpfs)]
    fs: Fs,
    /// Only these jobs (comma-separated; default: all), for quick experiments. A ratio whose
    /// side was left out reads NaN.
    #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(JOBS.iter().map(|j| j.0)))]
    jobs: Vec<String>,
    /// Only these devices (comma-separated; default: all).
    #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(DEVICES))]
    devices: Vec<String>,
    /// An extra argument for `mirror serve` (ours-2local), repeatable: `--serve-arg=--ublk-queues=2`.
    #[arg(long = "serve-arg", allow_hyphen_values = true)]
    serve_args: Vec<String>,
    /// Create the data files sparse (of `--size`, nothing written) instead of writing zeroes
    /// over them: a volume larger than the VM's memory, every extent cold (issue 18's large
    /// volume; for write jobs: reads of holes cost nothing).
    #[arg(long)]
    sparse: bool,
    /// Where the data files go (set in `main`).
    #[arg(skip)]
    data: PathBuf,
}

/// Filesystem of the data files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Fs {
    Tmpfs,
    Ext4,
}

impl Fs {
    fn name(self) -> &'static str {
        match self {
            Fs::Tmpfs => "tmpfs",
            Fs::Ext4 => "ext4",
        }
    }
}

/// Every device of the benchmark, in its order.
const DEVICES: &[&str] = &["ours-2local", "ours-1replica", "md-raid1", "rublk", "loop", "base-2local"];

/// A data file (written, not sparse: every config starts from allocated pages).
fn data_file(a: &Args, name: &str) -> Result<PathBuf> {
    let p = a.data.join(name);
    if a.sparse {
        std::fs::File::create(&p)?.set_len(a.size)?;
        return Ok(p);
    }
    run(Command::new("dd").args([
        "if=/dev/zero",
        &format!("of={}", p.display()),
        "bs=1M",
        &format!("count={}", a.size >> 20),
        "status=none",
    ]))?;
    Ok(p)
}

/// What is torn down at the end, the last set up first (an md array before its loop devices, a
/// filesystem before the loop device under it): guards (loop devices) and [`Cmd`]s.
#[derive(Default)]
struct Undo(Vec<Box<dyn Any>>);

impl Undo {
    fn push(&mut self, guard: impl Any) {
        self.0.push(Box::new(guard));
    }

    /// A command to run at teardown.
    fn cmd(&mut self, argv: Vec<String>) {
        self.push(Cmd(argv));
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        while let Some(g) = self.0.pop() {
            drop(g);
        }
    }
}

/// A command run on drop, its output discarded.
struct Cmd(Vec<String>);

impl Drop for Cmd {
    fn drop(&mut self) {
        let c = &self.0;
        let _ = Command::new(&c[0]).args(&c[1..]).stdout(Stdio::null()).stderr(Stdio::null()).status();
    }
}

fn losetup(file: &Path, undo: &mut Undo) -> Result<String> {
    let l = LoopDev::attach(file, false)?;
    let dev = l.dev.display().to_string();
    undo.push(l);
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
            transport: Default::default(),
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
    let a = Args::parse();
    for m in ["ublk_drv", "loop", "raid1"] {
        let _ = Command::new("modprobe").arg(m).status();
    }
    std::fs::create_dir_all(&a.dir)?;
    let mounted = std::fs::read_to_string("/proc/mounts")?
        .lines()
        .any(|l| l.split_whitespace().nth(1) == a.dir.to_str());
    let mut undo = Undo::default();
    if !mounted {
        run(Command::new("mount").args(["-t", "tmpfs", "-o", "size=90%", "tmpfs"]).arg(&a.dir))?;
        undo.cmd(vec!["umount".into(), "-l".into(), a.dir.display().to_string()]);
    }
    std::fs::write(a.dir.join("secret"), "bench-secret-0123456789\n")?;
    let mut a = a;
    a.data = a.dir.clone();
    if a.fs == Fs::Ext4 {
        // A disk filesystem, as replicas would live on: unlike tmpfs it serves page-cache reads
        // without blocking (RWF_NOWAIT, io_uring's inline completion), for every device here.
        let img = a.dir.join("ext4.img");
        std::fs::File::create(&img)?.set_len(8 * a.size + (256 << 20))?;
        let dev = losetup(&img, &mut undo)?;
        run(Command::new("mkfs.ext4").args(["-q", "-F", "-E", "nodiscard", &dev]))?;
        a.data = a.dir.join("ext4");
        std::fs::create_dir_all(&a.data)?;
        run(Command::new("mount").arg(&dev).arg(&a.data))?;
        undo.cmd(vec!["umount".into(), "-l".into(), a.data.display().to_string()]);
    }
    let a = a;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let _enter = rt.enter();
    let want = |d: &str| a.devices.is_empty() || a.devices.iter().any(|n| n == d);
    let mut devs: Vec<(&str, String)> = Vec::new();

    // ours-2local, and base-2local (the same, served by the baseline build)
    let mut _serves = Vec::new();
    let builds: Vec<(&str, &Path)> = std::iter::once(("ours-2local", a.mirror.as_path()))
        .chain(a.baseline.as_deref().map(|b| ("base-2local", b)))
        .collect();
    for (name, bin) in builds {
        if !want(name) {
            continue;
        }
        let (s, t) = (data_file(&a, &format!("{name}-s.img"))?, data_file(&a, &format!("{name}-t.img"))?);
        let mut serve = Command::new(bin);
        serve
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
            .arg(a.dir.join(format!("{name}-ctl.sock")))
            .env("RUST_LOG", "error");
        let (child, dev, out) = spawn_until(&mut serve, "ublk device ")
            .with_context(|| format!("{name} ({}): its ublk device did not come up", bin.display()))?;
        _serves.push(Kill(child));
        drain(out);
        devs.push((name, dev));
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
        undo.cmd(vec!["mdadm".into(), "--stop".into(), "/dev/md/mirrorbench".into()]);
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
        undo.cmd(vec![a.rublk.display().to_string(), "del".into(), "-n".into(), rublk_id.to_string()]);
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
        a.fs.name(),
        a.rounds,
        a.runtime
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
        if a.baseline.is_some() {
            js.insert(format!("{job}_vs_baseline"), (med[o2][j] / med[slot("base-2local")][j]).into());
        }
        for &i in &shown {
            js.insert(format!("{}_{job}", DEVICES[i]), med[i][j].into());
        }
    }
    if let Some(b) = &a.baseline {
        js.insert("baseline_bin".into(), b.display().to_string().into());
        let base = slot("base-2local");
        for (j, (job, ..)) in JOBS.iter().enumerate() {
            println!("A/B {job:<10} ours-2local / base-2local {:>6.3}x", med[o2][j] / med[base][j]);
        }
    }
    js.insert("rounds".into(), a.rounds.into());
    js.insert("fast_path".into(), a.fast_path.into());
    js.insert("filesystem".into(), a.fs.name().into());
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

#[cfg(test)]
mod tests {
    use super::*;

    /// As `cargo xtask bench ublk -- ARGS` passes them: its own `--mirror-bin`, `--rublk` and
    /// `--out` first, then the user's (a repeated flag: the last one counts).
    #[test]
    fn flags_parse_as_xtask_passes_them() {
        use clap::CommandFactory;
        Args::command().debug_assert();
        let a = Args::try_parse_from([
            "bench-ublk",
            "--mirror-bin",
            "/r/mirror",
            "--rublk",
            "/r/rublk",
            "--out",
            "/r/ublk.json",
            "--out",
            "/x.json",
            "--serve-arg=--ublk-queues=2",
            "--serve-arg",
            "--ublk-depth=64",
            "--jobs",
            "randread,seqwrite",
            "--fs",
            "ext4",
            "--no-fast-path",
            "--size",
            "64M",
        ])
        .unwrap();
        assert_eq!(a.out, PathBuf::from("/x.json"));
        assert_eq!(a.mirror, PathBuf::from("/r/mirror"));
        assert_eq!(a.serve_args, ["--ublk-queues=2", "--ublk-depth=64"]);
        assert_eq!(a.jobs, ["randread", "seqwrite"]);
        assert!(a.devices.is_empty() && a.fs == Fs::Ext4 && !a.fast_path && a.size == 64 << 20);
        let d = Args::try_parse_from(["bench-ublk"]).unwrap();
        assert!(d.fast_path && d.fs == Fs::Tmpfs && d.size == 256 << 20 && d.rounds == 3 && d.runtime == 4);
    }
}
