//! A sick target the application must not notice: the remote target replica frozen (SIGSTOP)
//! for several seconds under fio's verifying 4 KiB random writes through the NBD export. The
//! router's write deadline fails the laggard and acknowledges from the source: fio sees no
//! error and no write longer than a second; after SIGCONT the target is resynced and both
//! replicas are identical.

use std::time::{Duration, Instant};

use mirror_tests::{
    env::{skip, which},
    sick::{signal, verify_job, Fio, Mirror, MirrorOpts},
};

/// The bar (issue 15): the longest write fio sees across the freeze.
const MAX_WRITE_MS: f64 = 1000.0;

#[test]
fn a_frozen_target_stalls_no_write_past_a_second_and_resyncs_identical() {
    const T: &str = "sick_frozen::a_frozen_target_stalls_no_write_past_a_second_and_resyncs_identical";
    if which("fio").is_none() {
        return skip(T, "NBD", "fio is not installed (cargo xtask setup)");
    }
    let o = MirrorOpts::default();
    let m = Mirror::start("sick-frozen", &o).unwrap_or_else(|e| panic!("{e:#}"));
    // 64 MiB of 4 KiB writes at 1500/s: about 11 s of writes, the freeze in the middle.
    let job = verify_job(64 << 20, 16, 1500);
    let fio = Fio::spawn(&m.uri(), &job.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let pid = m.target.pid();
    signal(pid, libc::SIGSTOP).unwrap();
    let frozen = Instant::now();
    std::thread::sleep(Duration::from_secs(5));
    let during = m.replicas().unwrap();
    signal(pid, libc::SIGCONT).unwrap();
    let held = frozen.elapsed();
    let r = fio.wait().unwrap();
    println!(
        "frozen for {held:?}: fio write max {:.1} ms, read max {:.1} ms, {} writes ({:.0} IOPS), error {}",
        r.write_max_ms, r.read_max_ms, r.write_ios, r.write_iops, r.error
    );
    assert!(r.ok && r.error == 0, "fio failed: {}\n{}", r.stderr, r.json);
    // Not vacuous: the target was failed during the freeze, by its deadline.
    assert_eq!(during[1]["state"], "failed", "target during the freeze: {during:?}");
    assert!(during[1]["timeouts"].as_u64().unwrap_or(0) > 0, "no deadline fired: {during:?}");
    assert!(r.write_ios > 5000, "fio wrote too little to span the freeze: {}", r.write_ios);
    assert!(
        r.write_max_ms <= MAX_WRITE_MS,
        "fio's longest write took {:.1} ms (bar {MAX_WRITE_MS} ms)\n{}",
        r.write_max_ms,
        m.serve_log()
    );
    m.wait_in_sync(Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e:#}\n{}", m.serve_log()));
    let (s, t) = m.digests();
    assert_eq!(s, t, "replicas differ after the resync");
}
