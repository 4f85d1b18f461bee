//! Issue 7's scenario tests, with real processes (see `mirror_tests::scenario`): two replica
//! nodes, the node daemon's eBPF telemetry, `mirror serve` with its weighting engine, and fio
//! verifying through NBD. The numbers are the acceptance bars. Root only (loop devices, cgroups).
//! `cargo xtask bench failover` runs the same scenarios and records the figures.

mod support;

use std::time::Duration;

use mirror_tests::scenario::{reversals, Cluster, Opts, ProbeServer, Recorder, Workload};
use support::skip;

/// The scenarios share the machine: one at a time, or they would time each other.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn cluster(test: &str, o: impl FnOnce(&mut Opts)) -> Option<(std::sync::MutexGuard<'static, ()>, Cluster)> {
    if let Some(why) = mirror_tests::scenario::unavailable() {
        skip(test, "BPF", &why);
        return None;
    }
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut opts = Opts::new(support::mirror_bin());
    o(&mut opts);
    let c = Cluster::start(&opts).expect("start the two-node cluster");
    Some((guard, c))
}

fn target_weight(s: &serde_json::Value) -> u64 {
    s["weights"]["target"].as_u64().unwrap_or(0)
}

#[test]
fn a_source_disk_latency_x10_shifts_reads_within_2s_without_reversal() {
    const T: &str = "failover::a_source_disk_latency_x10_shifts_reads_within_2s_without_reversal";
    let Some((_g, c)) = cluster(T, |_| {}) else { return };
    let w = Workload::start(&c.nbd, 48, None);
    // Let the source's monitor learn its disk's baseline under the workload.
    std::thread::sleep(Duration::from_secs(4));
    let s = c.status().unwrap();
    assert_eq!(target_weight(&s), 0, "a healthy source keeps every read: {s:#}");
    let mut rec = Recorder::start(&support::mirror_bin(), &c.ctl, Duration::from_millis(100));
    let t0 = rec.mark("throttle");
    c.throttle_source(Some(100)).unwrap();
    let shift = c
        .wait_for("target weight >= 90", Duration::from_secs(10), |s| target_weight(s) >= 90)
        .unwrap_or_else(|e| panic!("{e}\n{}", c.serve_log()));
    std::thread::sleep(Duration::from_secs(5));
    rec.stop();
    let after: Vec<u8> =
        rec.points().iter().filter(|p| p.t >= t0 + shift.as_secs_f64()).map(|p| p.target_weight).collect();
    c.throttle_source(None).unwrap();
    let r = w.finish();
    assert_eq!(r.failed_ios, 0, "fio: {:?}", r.failures);
    assert!(shift <= Duration::from_secs(2), "target weight reached 90 after {shift:?} (bar: 2 s)");
    assert!(after.iter().all(|&x| x >= 90), "no reversal while the disk stays slow: {after:?}");
    assert_eq!(reversals(after), 0);
}

#[test]
fn b_sigkill_source_fails_over_in_half_a_second_then_c_resync_and_failback_leave_identical_replicas() {
    const T: &str = "failover::b_sigkill_source_fails_over_in_half_a_second_then_c_resync_and_failback_leave_identical_replicas";
    let Some((_g, mut c)) = cluster(T, |o| {
        o.failback_hold = Duration::from_secs(2);
        o.ramp = Duration::from_secs(3);
    }) else {
        return;
    };
    let w = Workload::start(&c.nbd, 48, None);
    std::thread::sleep(Duration::from_secs(2));
    c.source.kill();
    let failover = c.wait_for("target 100", Duration::from_secs(5), |s| target_weight(s) == 100).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    c.source.restart().unwrap();
    // (c): resync, hold, ramp, back to normal.
    let back = c
        .wait_for("failback complete", Duration::from_secs(90), |s| {
            s["replicas"][0]["state"] == "in-sync" && s["mode"] == "Normal" && target_weight(s) == 0
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", c.serve_log()));
    let status = c.status().unwrap();
    let r = w.finish();
    c.stop_serve();
    let (a, b) = c.digests().unwrap();
    assert_eq!(r.failed_ios, 0, "fio reported errors: {:?}", r.failures);
    assert!(failover <= Duration::from_millis(500), "target 100 after {failover:?} (bar: 0.5 s)");
    let events: Vec<&str> =
        status["events"].as_array().unwrap().iter().filter_map(|e| e["reason"].as_str()).collect();
    assert!(events.iter().any(|e| e.starts_with("failback ramp")), "a gradual ramp: {events:?}");
    assert_eq!(a, b, "replicas differ after resync and failback ({back:?}); events {events:?}");
}

#[test]
fn d_health_oscillating_around_the_threshold_for_a_minute_changes_direction_at_most_once() {
    const T: &str =
        "failover::d_health_oscillating_around_the_threshold_for_a_minute_changes_direction_at_most_once";
    let steady = ProbeServer::start().unwrap();
    let flappy = ProbeServer::start().unwrap();
    let Some((_g, c)) = cluster(T, |o| o.source_probes = vec![steady.url.clone(), flappy.url.clone()]) else {
        return;
    };
    let w = Workload::start(&c.nbd, 48, Some(500));
    std::thread::sleep(Duration::from_secs(3));
    let mut rec = Recorder::start(&support::mirror_bin(), &c.ctl, Duration::from_millis(100));
    let t0 = std::time::Instant::now();
    let mut healthy = true;
    while t0.elapsed() < Duration::from_secs(60) {
        healthy = !healthy;
        flappy.healthy.store(healthy, std::sync::atomic::Ordering::Relaxed);
        std::thread::sleep(Duration::from_secs(2));
    }
    rec.stop();
    let r = w.finish();
    let pts = rec.points();
    let weights: Vec<u8> = pts.iter().map(|p| p.target_weight).collect();
    let health: Vec<u8> = pts.iter().map(|p| p.health[0].unwrap_or(0.0) as u8).collect();
    assert_eq!(r.failed_ios, 0, "fio: {:?}", r.failures);
    // The health did cross the threshold (good = 80) both ways, many times.
    let crossings = health.windows(2).filter(|w| (w[0] >= 80) != (w[1] >= 80)).count();
    assert!(crossings >= 6, "health did not oscillate around 80: {health:?}");
    let n = reversals(weights.iter().copied());
    assert!(n <= 1, "{n} direction changes of the weights in a minute: {weights:?}\nhealth {health:?}");
}

#[test]
fn e_a_failing_http_probe_on_the_source_lowers_its_health_and_shifts_reads() {
    const T: &str = "failover::e_a_failing_http_probe_on_the_source_lowers_its_health_and_shifts_reads";
    let app = ProbeServer::start().unwrap();
    let Some((_g, c)) = cluster(T, |o| o.source_probes = vec![app.url.clone()]) else { return };
    let w = Workload::start(&c.nbd, 48, None);
    std::thread::sleep(Duration::from_secs(2));
    let s = c.status().unwrap();
    assert_eq!(target_weight(&s), 0, "{s:#}");
    assert!(s["replicas"][0]["node"]["health"].as_u64().unwrap() >= 80, "{s:#}");
    app.healthy.store(false, std::sync::atomic::Ordering::Relaxed);
    c.wait_for("target weight >= 90", Duration::from_secs(5), |s| target_weight(s) >= 90).unwrap();
    let s1 = c.status().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let s2 = c.status().unwrap();
    let reads = |s: &serde_json::Value, i: usize| s["replicas"][i]["reads"].as_u64().unwrap();
    let r = w.finish();
    assert_eq!(r.failed_ios, 0, "fio: {:?}", r.failures);
    let health = s2["replicas"][0]["node"]["health"].as_u64().unwrap();
    assert!(health < 30, "a failing probe lowers the source's health: {health}");
    let signals = s2["replicas"][0]["node"]["signals"].to_string();
    assert!(signals.contains("app_probes_ok"), "{signals}");
    let (src, tgt) = (reads(&s2, 0) - reads(&s1, 0), reads(&s2, 1) - reads(&s1, 1));
    assert!(tgt > 0 && tgt >= 9 * src, "reads moved to the target: source {src}, target {tgt}");
}
