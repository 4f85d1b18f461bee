//! The node-health eBPF programs, attached by a real `mirror daemon`, against real load: a
//! cgroup I/O throttle moves the measured block latency, CPU hogs raise the run-queue latency, a
//! memory cgroup limit shows as reclaim stalls,
//! unanswered SYNs show as retransmits to that peer, and bpftool prints every map's field names.
//! Needs root. Also runs inside the VM (`cargo xtask vm-test`, Debian 6.12, cgroup2 only).

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Mutex,
    time::Duration,
};

use mirror::telemetry::{
    blk, bpf,
    collector::{self, NodeSnapshot, TelemetrySample},
};
use mirror_tests::{
    blockdev::{dd, LoopDev},
    cgroup::{IoCgroup, IoLimit, MemCgroup},
    env::{bpf_unavailable, in_vm, skip, which},
    net::SilentPeer,
    proc::{Daemon, Hogs},
};

/// The tests measure latency: one at a time, so a hog does not disturb a baseline.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A facility this machine lacks (a cgroup controller, veth): inside the VM that is the VM
/// image's business and only said; on the host CI requires it.
fn skip_env(test: &str, why: &str) {
    if in_vm() {
        eprintln!("skipped: {test}: {why} (in the VM)");
    } else {
        skip(test, "BPF", why);
    }
}

fn snap(d: &Daemon) -> NodeSnapshot {
    bpf::read_pinned_all(&d.pin_dir).expect("read pinned maps")
}

/// Runs `f` between two snapshots of the daemon's maps and returns the interval's sample.
fn measure(d: &Daemon, f: impl FnOnce()) -> TelemetrySample {
    let a = snap(d);
    let t = std::time::Instant::now();
    f();
    let b = snap(d);
    collector::sample("ebpf", &a, &b, t.elapsed().as_secs_f64())
}

// ---------------------------------------------------------------------------------------------
// cgroup I/O throttle

/// Runs `dd` reading `count` 4 KiB blocks with O_DIRECT from `dev` inside the cgroup.
fn dd_read(cg: &IoCgroup, dev: &Path, count: u32, skip_blocks: u32) {
    let out = cg
        .command("dd")
        .arg(format!("if={}", dev.display()))
        .args([
            "of=/dev/null",
            "bs=4k",
            &format!("count={count}"),
            &format!("skip={skip_blocks}"),
            "iflag=direct",
        ])
        .stderr(Stdio::piped())
        .output()
        .expect("run dd in the cgroup");
    assert!(out.status.success(), "dd in cgroup: {}", String::from_utf8_lossy(&out.stderr));
}

/// blk-throttle holds bios before they become requests, so a throttle on a device does not show
/// in that device's issue-to-complete latency. A loop device stacked on the throttled one does
/// see it: its requests complete only when the loop worker's (cgroup-charged, throttled) I/O to
/// the lower device does. So the test reads the upper device and throttles the lower one.
#[test]
fn cgroup_io_throttle_moves_measured_latency() {
    const T: &str = "telemetry::cgroup_io_throttle_moves_measured_latency";
    if let Some(why) = bpf_unavailable() {
        return skip(T, "BPF", &why);
    }
    let _serial = serial();
    let cg = match IoCgroup::new("throttle") {
        Ok(c) => c,
        Err(why) => return skip_env(T, &format!("{why:#}")),
    };
    let lower = LoopDev::new(64 << 20);
    let upper = LoopDev::over(&lower.dev);
    let dev = blk::kdev_of_path(&upper.dev).expect("stat upper loop");
    let daemon = Daemon::start(&[]);
    std::thread::sleep(Duration::from_millis(300));

    const COUNT: u32 = 200;
    const IOPS: u32 = 200; // 5 ms per request when throttled: 1 s of dd.
    let read_stats = |s: &TelemetrySample| {
        let d = s
            .devices
            .iter()
            .find(|d| d.dev == dev)
            .unwrap_or_else(|| panic!("no sample for {}: {s:?}", upper.dev.display()));
        let r = d.ops.iter().find(|o| o.op == "read").expect("read row");
        ((r.iops * s.secs).round(), r.avg_us.expect("avg"), r.p99_us.expect("p99"))
    };
    let base = measure(&daemon, || dd_read(&cg, &upper.dev, COUNT, 0));
    cg.limit(&lower.dev, &[(IoLimit::ReadIops, Some(IOPS.into()))]).unwrap_or_else(|e| panic!("{e:#}"));
    let thr = measure(&daemon, || dd_read(&cg, &upper.dev, COUNT, 4 * COUNT));
    let (n0, avg0, p99_0) = read_stats(&base);
    let (n1, avg1, p99_1) = read_stats(&thr);
    eprintln!(
        "{T}: unthrottled avg {avg0:.0} us p99 {p99_0:.0} us ({n0:.0} reads); throttled to \
         {IOPS} IOPS: avg {avg1:.0} us p99 {p99_1:.0} us ({n1:.0} reads)"
    );
    assert!(n0 >= f64::from(COUNT) && n1 >= f64::from(COUNT), "read counts {n0} {n1}");
    // 200 IOPS is 5000 us per request on average. blk-throttle lets a slice's budget through at
    // once and holds the next request until the next slice, so the median barely moves while the
    // average and the tail do: assert on those.
    assert!(avg1 >= 2000.0, "throttled avg {avg1} us, expected ~5000");
    assert!(avg1 >= 3.0 * avg0, "avg {avg0} -> {avg1} us: less than 3x");
    assert!(p99_1 >= 3.0 * p99_0, "p99 {p99_0} -> {p99_1} us: less than 3x");
}

// ---------------------------------------------------------------------------------------------
// CPU hogs

#[test]
fn cpu_hogs_raise_run_queue_latency() {
    const T: &str = "telemetry::cpu_hogs_raise_run_queue_latency";
    if let Some(why) = bpf_unavailable() {
        return skip(T, "BPF", &why);
    }
    cpu_hogs_raise_run_queue_latency_with(T, &[]);
}

/// The same with the fallback that stamps wakeups itself, used when the kernel's BTF lacks the
/// scheduler's `sched_info` stamps or the path to the run-queue clock.
#[test]
fn cpu_hogs_raise_run_queue_latency_with_wakeup_stamps() {
    const T: &str = "telemetry::cpu_hogs_raise_run_queue_latency_with_wakeup_stamps";
    if let Some(why) = bpf_unavailable() {
        return skip(T, "BPF", &why);
    }
    cpu_hogs_raise_run_queue_latency_with(T, &[("MIRROR_RUNQ_STAMP", "1")]);
}

fn cpu_hogs_raise_run_queue_latency_with(t: &'static str, env: &[(&str, &str)]) {
    let _serial = serial();
    let daemon = Daemon::start_with_env(&[], env);
    std::thread::sleep(Duration::from_millis(200));
    let idle = measure(&daemon, || std::thread::sleep(Duration::from_millis(1500)));
    let cpus = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
    let hogs = Hogs::spawn(2 * cpus);
    std::thread::sleep(Duration::from_millis(200));
    let busy = measure(&daemon, || std::thread::sleep(Duration::from_millis(1500)));
    drop(hogs);
    let i = idle.runq.expect("runq signal attached");
    let b = busy.runq.expect("runq signal attached");
    eprintln!(
        "{t}: idle {:.0}/s p50 {:?} p99 {:?} wait {:.1} ms/s; {} hogs on {cpus} cpus: {:.0}/s \
         p50 {:?} p99 {:?} wait {:.1} ms/s",
        i.events_per_s,
        i.p50_us,
        i.p99_us,
        i.wait_ms_per_s,
        2 * cpus,
        b.events_per_s,
        b.p50_us,
        b.p99_us,
        b.wait_ms_per_s
    );
    // The machine may carry other load (CI neighbours), so the "idle" tail is not always
    // small: assert on what the hogs add. With 2 hogs per CPU one always waits, about 1000 ms
    // of waiting per second per CPU; most run-queue events are then hogs' preemptions, which
    // moves the median from microseconds to milliseconds.
    let added = b.wait_ms_per_s - i.wait_ms_per_s;
    assert!(
        added >= 250.0 * cpus as f64,
        "run-queue wait {} -> {} ms/s under {} hogs",
        i.wait_ms_per_s,
        b.wait_ms_per_s,
        2 * cpus
    );
    // The median is left out: a busy neighbour's many short waits can hold it down. The idle
    // p99 is not compared either: at ~100 events/s its tail is a handful of waits, and one
    // stall of the TCG VM set it to 26.7 ms, above the 15 ms the hogs' preemptions reach (CI,
    // 2026-12-07). What the hogs add is the wait above and a tail of milliseconds here.
    let bp99 = b.p99_us.expect("busy p99");
    assert!(bp99 >= 1000.0, "busy p99 {bp99} us");
}

/// The run-queue program's duty cycle: attached `--runq-duty` percent of each `--runq-period`,
/// the attached time published in `runq_sampling`, rates per attached second. Two daemons side
/// by side over the same seconds under CPU hogs, one measuring 20% of the time and one always,
/// agree on the switch rate and both see the hogs' tail.
#[test]
fn run_queue_duty_cycle_measures_a_share_of_the_time_with_the_same_rates() {
    const T: &str = "telemetry::run_queue_duty_cycle_measures_a_share_of_the_time_with_the_same_rates";
    if let Some(why) = bpf_unavailable() {
        return skip(T, "BPF", &why);
    }
    let _serial = serial();
    let cpus = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
    let hogs = Hogs::spawn(2 * cpus);
    let duties = [20u32, 100];
    let daemons: Vec<Daemon> = duties
        .iter()
        .map(|d| Daemon::start(&["--runq-duty", &d.to_string(), "--runq-period", "250ms"]))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let before: Vec<NodeSnapshot> = daemons.iter().map(snap).collect();
    let t = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let after: Vec<NodeSnapshot> = daemons.iter().map(snap).collect();
    let secs = t.elapsed().as_secs_f64();
    drop(hogs);
    let mut rates = Vec::new();
    for (i, duty) in duties.iter().enumerate() {
        let r = collector::sample("ebpf", &before[i], &after[i], secs).runq.expect("runq signal attached");
        let share = r.measured_s / secs;
        eprintln!(
            "{T}: duty {duty}%: measured {:.3} of {secs:.3} s ({:.0}%), {:.0} switches/s, wait {:.0} ms/s, p99 {:?} us",
            r.measured_s,
            100.0 * share,
            r.events_per_s,
            r.wait_ms_per_s,
            r.p99_us
        );
        // A window lasts its share from when it really opened; the daemon's own wakeups come late
        // under the hogs (more so in the emulated VM), which only lengthens windows.
        let want = f64::from(*duty) / 100.0;
        assert!(
            share >= want - 0.05 && share <= want + 0.15,
            "duty {duty}%: attached {:.0}% of the time",
            100.0 * share
        );
        assert!(r.p99_us.is_some_and(|p| p >= 1000.0), "duty {duty}%: p99 {:?} under hogs", r.p99_us);
        rates.push(r.events_per_s);
    }
    let ratio = rates[0] / rates[1];
    assert!((0.6..1.6).contains(&ratio), "switch rate sampled {:.0}/s vs always {:.0}/s", rates[0], rates[1]);
}

// ---------------------------------------------------------------------------------------------
// Memory-cgroup reclaim

/// Reading a device through the page cache inside a cgroup limited far below the data read
/// makes the reader reclaim its own cgroup's pages: memcg direct reclaim, a stall the daemon
/// must see.
#[test]
fn cgroup_memory_limit_shows_reclaim_stalls() {
    const T: &str = "telemetry::cgroup_memory_limit_shows_reclaim_stalls";
    if let Some(why) = bpf_unavailable() {
        return skip(T, "BPF", &why);
    }
    let _serial = serial();
    let cg = match MemCgroup::new(24 << 20) {
        Ok(c) => c,
        Err(why) => return skip_env(T, &format!("{why:#}")),
    };
    let lo = LoopDev::new(160 << 20);
    let daemon = Daemon::start(&[]);
    let s = measure(&daemon, || {
        let out = cg
            .command("dd")
            .arg(format!("if={}", lo.dev.display()))
            .args(["of=/dev/null", "bs=1M", "count=160"])
            .stderr(Stdio::piped())
            .output()
            .expect("run dd in the memory cgroup");
        assert!(out.status.success(), "dd: {}", String::from_utf8_lossy(&out.stderr));
    });
    let r = s.reclaim.expect("reclaim signal attached");
    let stalls = (r.events_per_s * s.secs).round();
    eprintln!("{T}: {stalls} reclaim stalls, {:.2} ms/s, p99 {:?} us", r.wait_ms_per_s, r.p99_us);
    assert!(stalls >= 1.0, "no reclaim stall measured: {r:?}");
    assert!(r.wait_ms_per_s > 0.0 && r.p99_us.is_some(), "{r:?}");
}

// ---------------------------------------------------------------------------------------------
// TCP retransmits

#[test]
fn unanswered_syns_show_as_retransmits_to_that_peer() {
    const T: &str = "telemetry::unanswered_syns_show_as_retransmits_to_that_peer";
    if let Some(why) = bpf_unavailable() {
        return skip(T, "BPF", &why);
    }
    let _serial = serial();
    let peer = match SilentPeer::new() {
        Ok(p) => p,
        Err(why) => return skip_env(T, &format!("{why:#}")),
    };
    let daemon = Daemon::start(&[]);
    let addr = std::net::SocketAddr::from((peer.peer, 9));
    let s = measure(&daemon, || {
        // SYN at 0 s, retransmitted at ~1 s and ~3 s; the connect gives up before the third.
        let r = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(3500));
        assert!(r.is_err(), "nobody should answer at {addr}");
    });
    eprintln!("{T}: {:?}", s.retrans);
    let r = s
        .retrans
        .iter()
        .find(|r| r.peer == std::net::IpAddr::V4(peer.peer))
        .unwrap_or_else(|| panic!("no retransmits recorded for {}: {:?}", peer.peer, s.retrans));
    let n = (r.per_s * s.secs).round() as u64;
    assert!((1..=4).contains(&n), "{n} retransmits to {}", peer.peer);
    assert!(s.retrans_per_s.is_some_and(|v| v > 0.0), "/proc/net/snmp agrees: {:?}", s.retrans_per_s);
}

// ---------------------------------------------------------------------------------------------
// bpftool

#[test]
fn bpftool_prints_field_names_of_every_map() {
    const T: &str = "telemetry::bpftool_prints_field_names_of_every_map";
    if let Some(why) = bpf_unavailable() {
        return skip(T, "BPF", &why);
    }
    let Some(bpftool) = which("bpftool")
        .or_else(|| ["/usr/sbin/bpftool", "/sbin/bpftool"].iter().map(PathBuf::from).find(|p| p.is_file()))
    else {
        return skip(T, "BPF", "bpftool not installed (cargo xtask setup)");
    };
    let _serial = serial();
    let daemon = Daemon::start(&[]);
    let lo = LoopDev::new(16 << 20);
    // Something in every map that can fill at will: block I/O (blk_stats), and the scheduler
    // runs all the time (runq_hist). blk_start and runq_start are transient; their value types
    // are checked through `map show`-independent BTF via `btf dump`.
    dd(&["if=/dev/zero", &format!("of={}", lo.dev.display()), "bs=4k", "count=16", "oflag=direct"]);
    std::thread::sleep(Duration::from_millis(200));
    let dump = |map: &str| {
        let out = Command::new(&bpftool)
            .args(["map", "dump", "pinned"])
            .arg(daemon.pin_dir.join(map))
            .output()
            .expect("bpftool");
        assert!(out.status.success(), "bpftool map dump {map}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let runq = dump("runq_hist");
    for f in ["\"count\"", "\"sum_ns\"", "\"max_ns\"", "\"hist_us\""] {
        assert!(runq.contains(f), "runq_hist lacks {f}:\n{runq}");
    }
    let sampling = dump("runq_sampling");
    for f in ["\"on_ns\"", "\"on_since_ns\"", "\"duty_pct\"", "\"period_ms\""] {
        assert!(sampling.contains(f), "runq_sampling lacks {f}:\n{sampling}");
    }
    let reclaim = dump("reclaim_stats");
    assert!(reclaim.contains("\"sum_ns\""), "reclaim_stats:\n{reclaim}");
    let blk = dump("blk_stats");
    assert!(blk.contains("\"hist_us\"") && blk.contains("\"op\""), "{blk}");
    // Maps that are empty most of the time: their BTF key/value types carry the names.
    for (map, fields) in [
        ("tcp_retrans", &["TcpPeerKey", "family", "addr", "TcpRetrans", "retransmits"][..]),
        ("blk_start", &["BlkStartKey", "sector", "BlkStart", "issue_ns"][..]),
    ] {
        let out = Command::new(&bpftool)
            .args(["btf", "dump", "map", "pinned"])
            .arg(daemon.pin_dir.join(map))
            .output()
            .expect("bpftool btf dump");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "bpftool btf dump {map}: {}", String::from_utf8_lossy(&out.stderr));
        for f in fields {
            assert!(text.contains(f), "{map} BTF lacks {f}:\n{text}");
        }
    }
}
