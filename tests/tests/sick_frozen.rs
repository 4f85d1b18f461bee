//! A sick target the application must not notice: the remote target replica frozen (SIGSTOP)
//! for several seconds under fio's verifying 4 KiB random writes through the NBD export. The
//! router's write deadline fails the laggard and acknowledges from the source: fio sees no
//! error and no write longer than a second; after SIGCONT the target is resynced and both
//! replicas are identical.

use std::time::Duration;

use mirror_tests::{
    env::{skip, which},
    sick::{write_stall, Mirror, MirrorOpts, Sickness},
};

/// The bar (issue 15): the longest write fio sees across the freeze.
const MAX_WRITE_MS: f64 = 1000.0;

#[test]
fn a_frozen_target_stalls_no_write_past_a_second_and_resyncs_identical() {
    const T: &str = "sick_frozen::a_frozen_target_stalls_no_write_past_a_second_and_resyncs_identical";
    if which("fio").is_none() {
        return skip(T, "NBD", "fio is not installed (cargo xtask setup)");
    }
    let m = Mirror::start("sick-frozen", &MirrorOpts::default()).unwrap_or_else(|e| panic!("{e:#}"));
    let s = write_stall(m, Sickness::Frozen, Duration::from_secs(5)).unwrap_or_else(|e| panic!("{e:#}"));
    let r = &s.fio;
    println!(
        "frozen for {:?}: fio write max {:.1} ms, read max {:.1} ms, {} writes ({:.0} IOPS), error {}; \
         back in sync {:?} after fio ended",
        s.held, r.write_max_ms, r.read_max_ms, r.write_ios, r.write_iops, r.error, s.resync
    );
    assert!(r.ok && r.error == 0, "fio failed: {}\n{}", r.stderr, r.json);
    // Not vacuous: the target was failed during the freeze, by its deadline.
    assert_eq!(s.during[1]["state"], "failed", "target during the freeze: {:?}", s.during);
    assert!(s.during[1]["timeouts"].as_u64().unwrap_or(0) > 0, "no deadline fired: {:?}", s.during);
    assert!(r.write_ios > 5000, "fio wrote too little to span the freeze: {}", r.write_ios);
    assert!(
        r.write_max_ms <= MAX_WRITE_MS,
        "fio's longest write took {:.1} ms (bar {MAX_WRITE_MS} ms)",
        r.write_max_ms
    );
    assert_eq!(s.digests.0, s.digests.1, "replicas differ after the resync");
}
