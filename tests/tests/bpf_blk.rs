//! The block-latency eBPF programs, attached by a real `mirror daemon`, measuring real I/O on a
//! loop device. Needs root and a binary built with the eBPF object (`cargo xtask build`).
//! Also runs inside the VM (`cargo xtask vm-test`) on the Debian 6.12 kernel.

use std::{process::Command, time::Duration};

use mirror::telemetry::{blk, bpf};
use mirror_common::blk::{BlkStatsKey, BLK_OP_READ, BLK_OP_WRITE, MAP_BLK_STATS};
use mirror_tests::{
    blockdev::{dd, LoopDev},
    env::{bpf_unavailable, mirror_bin, skip, which},
    fs::TempDir,
    proc::Daemon,
};

const WRITES: u64 = 512;
const READS: u64 = 256;

#[test]
fn daemon_counts_loop_device_io_with_plausible_latency() {
    const T: &str = "bpf_blk::daemon_counts_loop_device_io_with_plausible_latency";
    if let Some(why) = bpf_unavailable() {
        return skip(T, "BPF", &why);
    }
    // Every request timed, so the histogram must hold each exactly once; the default
    // (sampled) mode is checked against the same I/O below and by the sampling test.
    counts_loop_device_io(&["--exact-block-latency"], &[]);
}

/// The default mode: counts and bytes exact, the latency of a weighted sample (dd's bursts can
/// pass the 16 requests per millisecond per CPU where sampling starts).
#[test]
fn sampled_mode_counts_loop_device_io_exactly_too() {
    const T: &str = "bpf_blk::sampled_mode_counts_loop_device_io_exactly_too";
    if let Some(why) = bpf_unavailable() {
        return skip(T, "BPF", &why);
    }
    counts_loop_device_io(&[], &[]);
}

/// The same with the classic issue/complete tracepoints, the path used when the kernel's BTF
/// lacks the `struct request` members.
#[test]
fn classic_tracepoint_path_counts_loop_device_io_too() {
    const T: &str = "bpf_blk::classic_tracepoint_path_counts_loop_device_io_too";
    if let Some(why) = bpf_unavailable() {
        return skip(T, "BPF", &why);
    }
    counts_loop_device_io(&[], &[("MIRROR_BLK_CLASSIC", "1")]);
}

/// `args` with `--exact-block-latency`, or the classic path (`MIRROR_BLK_CLASSIC` in `env`),
/// time every request: then the histogram holds each request exactly once. Otherwise (the
/// sampled default) it holds a weighted sample whose weights add up to about the count.
///
/// Counts are exact except for runs the kernel skipped: a block program is not run on a CPU
/// where a BPF program is running already (a completion interrupting another program's run,
/// under load from other devices); the kernel counts those as the program's recursion misses,
/// which the daemon writes out on exit (`--bpf-stats-out`). A request may be missing from the
/// counts only as far as those misses go.
fn counts_loop_device_io(args: &[&str], env: &[(&str, &str)]) {
    let exact =
        args.contains(&"--exact-block-latency") || env.iter().any(|(k, _)| *k == "MIRROR_BLK_CLASSIC");
    let lo = LoopDev::new(64 << 20);
    let dev = blk::kdev_of_path(&lo.dev).expect("stat loop device");
    let stats_dir = TempDir::new("bpf-blk-stats");
    let stats_out = stats_dir.0.join("programs.json");
    let stats_arg = stats_out.display().to_string();
    let args: Vec<&str> = args.iter().copied().chain(["--bpf-stats-out", &stats_arg]).collect();
    let mut daemon = Daemon::start_with_env(&args, env);
    // Let udev/blkid's probe reads of the new device settle before the measured I/O.
    std::thread::sleep(Duration::from_millis(300));
    let before = bpf::read_pinned(&daemon.pin_dir).expect("read pinned map");
    let kernel_before = kernel_writes(&lo.dev);

    let of = format!("of={}", lo.dev.display());
    let iff = format!("if={}", lo.dev.display());
    dd(&["if=/dev/urandom", &of, "bs=4k", &format!("count={WRITES}"), "oflag=direct"]);
    dd(&[&iff, "of=/dev/null", "bs=64k", &format!("count={READS}"), "iflag=direct"]);
    std::thread::sleep(Duration::from_millis(200));
    let after = bpf::read_pinned(&daemon.pin_dir).expect("read pinned map");
    let kernel = kernel_writes(&lo.dev) - kernel_before;
    assert!(daemon.stop(), "daemon exits cleanly on SIGTERM");
    let programs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&stats_out).expect("--bpf-stats-out written"))
            .expect("program stats JSON");
    let misses: Vec<u64> = ["blk_rq_done", "blk_rq_complete"]
        .iter()
        .filter_map(|p| programs[*p]["recursion_misses"].as_u64())
        .collect();
    assert!(!misses.is_empty(), "no block program's recursion misses in {programs}");
    let misses: u64 = misses.iter().sum();

    let iv = blk::interval(&before, &after, 1.0);
    let get = |op| iv.iter().find(|r| r.key == BlkStatsKey { dev, op }).cloned();
    let w = get(BLK_OP_WRITE).expect("no writes recorded for the loop device");
    let r = get(BLK_OP_READ).expect("no reads recorded for the loop device");
    // Nobody else writes to this fresh device: the kernel's own count of completed write
    // requests (diskstats) is dd's 512 (unless the block layer merged some), and ours is that.
    assert!(
        w.ios <= kernel && kernel - w.ios <= misses,
        "write count {} (bytes {}); the kernel completed {kernel} write requests for {WRITES} \
         writes; {misses} runs of the block program skipped by the kernel",
        w.ios,
        w.bytes
    );
    assert!(kernel <= WRITES, "the kernel completed {kernel} write requests for {WRITES} writes");
    assert_eq!(w.bytes, WRITES * 4096 - (kernel - w.ios) * 4096, "write bytes");
    // Reads: ours, plus possibly a few probe reads by udev/blkid.
    assert!(r.ios + misses >= READS && r.ios <= READS + 64, "read count {} ({misses} skipped runs)", r.ios);
    assert!(r.bytes >= (READS - misses.min(READS)) * 65536, "read bytes {}", r.bytes);
    for s in [&w, &r] {
        let hist_total: u64 = s.hist_us.iter().sum();
        if exact {
            assert_eq!(s.lat_measured, s.ios, "every request timed ({})", s.op_name());
            assert_eq!(hist_total, s.ios, "histogram holds every request ({})", s.op_name());
        } else {
            // A sampling window overshoots or falls short by less than one stride (at most 64)
            // per CPU at each end of the interval.
            let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get) as u64;
            assert!(s.lat_measured >= 1 && s.lat_measured <= s.ios, "timed {} of {}", s.lat_measured, s.ios);
            assert!(
                hist_total.abs_diff(s.ios) <= 2 * 64 * cpus,
                "histogram weights {hist_total} for {} requests ({})",
                s.ios,
                s.op_name()
            );
        }
        let avg = s.avg_us().expect("average");
        assert!((0.5..1_000_000.0).contains(&avg), "{} avg latency {avg} us", s.op_name());
        let p50 = s.percentile_us(0.5).expect("p50");
        let p99 = s.percentile_us(0.99).expect("p99");
        assert!(p50 <= p99 && p99 < 2_000_000.0, "{}: p50 {p50} p99 {p99}", s.op_name());
        assert_eq!(s.errors, 0);
    }
}

/// Write requests the kernel completed on `dev` (its diskstats: /sys/block/NAME/stat, field 5).
fn kernel_writes(dev: &std::path::Path) -> u64 {
    let name = dev.file_name().expect("device name").to_string_lossy().into_owned();
    let stat = std::fs::read_to_string(format!("/sys/block/{name}/stat")).expect("read diskstats");
    stat.split_whitespace().nth(4).and_then(|f| f.parse().ok()).expect("writes completed field")
}

#[test]
fn bpftool_dump_shows_field_names_and_pins_go_away_on_stop() {
    const T: &str = "bpf_blk::bpftool_dump_shows_field_names_and_pins_go_away_on_stop";
    if let Some(why) = bpf_unavailable() {
        return skip(T, "BPF", &why);
    }
    let Some(bpftool) = which("bpftool").or_else(|| {
        ["/usr/sbin/bpftool", "/sbin/bpftool"].iter().map(std::path::PathBuf::from).find(|p| p.is_file())
    }) else {
        return skip(T, "BPF", "bpftool not installed (cargo xtask setup)");
    };
    let lo = LoopDev::new(16 << 20);
    let mut daemon = Daemon::start(&[]);
    dd(&["if=/dev/zero", &format!("of={}", lo.dev.display()), "bs=4k", "count=16", "oflag=direct"]);
    std::thread::sleep(Duration::from_millis(100));
    let pin = daemon.pin_dir.join(MAP_BLK_STATS);
    let out = Command::new(&bpftool).args(["map", "dump", "pinned"]).arg(&pin).output().expect("bpftool");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "bpftool: {}", String::from_utf8_lossy(&out.stderr));
    for field in [
        "\"dev\"",
        "\"op\"",
        "\"ios\"",
        "\"bytes\"",
        "\"lat_sum_ns\"",
        "\"lat_max_ns\"",
        "\"hist_us\"",
        "\"lat_measured\"",
    ] {
        assert!(text.contains(field), "bpftool output lacks {field}:\n{text}");
    }
    assert!(daemon.stop(), "daemon exits cleanly on SIGTERM");
    assert!(!pin.exists(), "pin {} removed on shutdown", pin.display());
}

/// `--pause-signals`: SIGUSR1 detaches the programs (nothing is counted, the maps stay),
/// SIGUSR2 attaches them again (counting resumes); each change is acknowledged on stdout.
#[test]
fn pause_signals_detach_and_reattach_the_programs() {
    const T: &str = "bpf_blk::pause_signals_detach_and_reattach_the_programs";
    if let Some(why) = bpf_unavailable() {
        return skip(T, "BPF", &why);
    }
    use std::io::BufRead;
    let lo = LoopDev::new(16 << 20);
    let dev = blk::kdev_of_path(&lo.dev).expect("stat loop device");
    let mut daemon = Daemon::start(&["--pause-signals"]);
    std::thread::sleep(Duration::from_millis(300));
    let writes = |n: u64| {
        let of = format!("of={}", lo.dev.display());
        dd(&["if=/dev/zero", &of, "bs=4k", &format!("count={n}"), "oflag=direct"]);
        std::thread::sleep(Duration::from_millis(100));
    };
    let written = |d: &Daemon| {
        let snap = bpf::read_pinned(&d.pin_dir).expect("read pinned map");
        blk::interval(&Default::default(), &snap, 1.0)
            .iter()
            .find(|r| r.key == BlkStatsKey { dev, op: BLK_OP_WRITE })
            .map_or(0, |r| r.ios)
    };
    let signal = |d: &mut Daemon, sig: i32, ack: &str| {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        assert_eq!(unsafe { libc::kill(d.child.id() as i32, sig) }, 0);
        let mut line = String::new();
        d.out.read_line(&mut line).expect("read daemon stdout");
        assert_eq!(line.trim_end(), ack);
    };
    writes(32);
    let attached = written(&daemon);
    assert_eq!(attached, 32, "writes counted while attached");
    signal(&mut daemon, libc::SIGUSR1, "programs detached");
    writes(32);
    assert_eq!(written(&daemon), attached, "nothing counted while detached");
    signal(&mut daemon, libc::SIGUSR2, "programs attached");
    writes(32);
    assert_eq!(written(&daemon), attached + 32, "counting resumes once attached again");
    assert!(daemon.stop(), "daemon exits cleanly on SIGTERM");
}

/// Random 4 KiB reads at a high rate: by default the block program times a weighted sample of
/// the requests (counts stay exact, the weights stand for every request); with
/// `--exact-block-latency` it times every one.
#[test]
fn sampled_latency_weights_stand_for_every_request_and_exact_mode_times_all() {
    const T: &str = "bpf_blk::sampled_latency_weights_stand_for_every_request_and_exact_mode_times_all";
    if let Some(why) = bpf_unavailable() {
        return skip(T, "BPF", &why);
    }
    if which("fio").is_none() {
        return skip(T, "BPF", "fio not installed (cargo xtask setup)");
    }
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get) as f64;
    for exact in [false, true] {
        let lo = LoopDev::cached(64 << 20);
        let dev = blk::kdev_of_path(&lo.dev).expect("stat loop device");
        let daemon = Daemon::start(if exact { &["--exact-block-latency"] } else { &[] });
        std::thread::sleep(Duration::from_millis(300));
        let before = bpf::read_pinned(&daemon.pin_dir).expect("read pinned map");
        let out = Command::new("fio")
            .args(["--name=sample", "--rw=randread", "--bs=4k", "--direct=1", "--ioengine=io_uring"])
            .args(["--iodepth=16", "--time_based", "--runtime=2", "--norandommap"])
            .arg(format!("--filename={}", lo.dev.display()))
            .output()
            .expect("run fio");
        assert!(out.status.success(), "fio: {}", String::from_utf8_lossy(&out.stderr));
        let after = bpf::read_pinned(&daemon.pin_dir).expect("read pinned map");
        let iv = blk::interval(&before, &after, 1.0);
        let r = iv.iter().find(|r| r.key == BlkStatsKey { dev, op: BLK_OP_READ }).expect("reads recorded");
        let weights: u64 = r.hist_us.iter().sum();
        let iops = r.ios as f64 / 2.0;
        eprintln!(
            "{T}: exact={exact}: {} reads (~{iops:.0} IOPS), {} timed, histogram weights {weights}, \
             avg {:.1} us, p50 {:.1} us, p99 {:.1} us",
            r.ios,
            r.lat_measured,
            r.avg_us().unwrap_or(f64::NAN),
            r.percentile_us(0.5).unwrap_or(f64::NAN),
            r.percentile_us(0.99).unwrap_or(f64::NAN),
        );
        assert!(r.ios > 1000, "fio made only {} reads", r.ios);
        if exact {
            assert_eq!(r.lat_measured, r.ios, "every request timed");
            assert_eq!(weights, r.ios, "the histogram holds every request once");
        } else {
            assert!(r.lat_measured <= r.ios);
            // Each window overshoots by less than one stride (at most 64) per CPU; the windows
            // cut by the two snapshots may lose as much.
            let slack = r.ios / 10 + 2 * 64 * cpus as u64;
            assert!(weights.abs_diff(r.ios) <= slack, "weights {weights} for {} requests", r.ios);
            // Sampled above 16k requests a second per CPU: at 40k per CPU on average, some CPU is.
            if iops / cpus > 40_000.0 {
                assert!(r.lat_measured < r.ios, "no sampling at {iops:.0} IOPS");
            }
        }
        let (p50, p99) = (r.percentile_us(0.5).expect("p50"), r.percentile_us(0.99).expect("p99"));
        assert!(p50 > 0.0 && p50 <= p99 && p99 < 1_000_000.0, "p50 {p50} p99 {p99}");
        let avg = r.avg_us().expect("avg");
        assert!(avg > 0.0 && avg < 1_000_000.0, "avg {avg}");
    }
}

#[test]
fn top_reads_a_running_daemons_maps() {
    const T: &str = "bpf_blk::top_reads_a_running_daemons_maps";
    if let Some(why) = bpf_unavailable() {
        return skip(T, "BPF", &why);
    }
    let lo = LoopDev::new(16 << 20);
    let daemon = Daemon::start(&[]);
    let dev = lo.dev.clone();
    let writer = std::thread::spawn(move || {
        for _ in 0..10 {
            dd(&["if=/dev/zero", &format!("of={}", dev.display()), "bs=4k", "count=64", "oflag=direct"]);
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let out = Command::new(mirror_bin())
        .args(["top", "--interval", "300ms", "--count", "2", "--pin-dir"])
        .arg(&daemon.pin_dir)
        .output()
        .expect("run mirror top");
    writer.join().expect("writer");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "mirror top failed: {}", String::from_utf8_lossy(&out.stderr));
    let name = lo.dev.file_name().unwrap().to_string_lossy().to_string();
    assert!(text.contains("P99_us"), "table header missing:\n{text}");
    assert!(
        text.lines().any(|l| l.starts_with(&name) && l.contains("write")),
        "no {name} write row:\n{text}"
    );
}
