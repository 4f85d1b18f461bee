//! A partition the application must not notice: the target replica runs in a network namespace
//! of its own behind a veth link, and the link is black-holed (tc `blackhole` on both ends: every
//! packet dropped, TCP retransmitting into the void) for several seconds under fio's verifying
//! 4 KiB random writes through NBD. The write deadline fails the target: no error, no write
//! longer than a second; after the link heals the target is resynced and identical.

use std::time::Duration;

use mirror_tests::{
    env::{skip, which},
    netns::{self, NodeNs},
    sick::{write_stall, Mirror, MirrorOpts, Sickness},
};

/// The bar (issue 15): the longest write fio sees across the partition.
const MAX_WRITE_MS: f64 = 1000.0;

#[test]
fn a_black_holed_target_link_stalls_no_write_past_a_second_and_resyncs_identical() {
    const T: &str =
        "sick_blackhole::a_black_holed_target_link_stalls_no_write_past_a_second_and_resyncs_identical";
    if which("fio").is_none() {
        return skip(T, "NBD", "fio is not installed (cargo xtask setup)");
    }
    if let Some(why) = netns::unavailable() {
        return skip(T, "network namespaces", &why);
    }
    let ns = NodeNs::new("bh", 0).unwrap_or_else(|e| panic!("{e:#}"));
    let o = MirrorOpts::in_namespace(&ns);
    let m = Mirror::start("sick-blackhole", &o).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(m.target.addr.starts_with(&ns.node_ip.to_string()), "target at {}", m.target.addr);
    let s =
        write_stall(m, Sickness::Blackhole(&ns), Duration::from_secs(5)).unwrap_or_else(|e| panic!("{e:#}"));
    let r = &s.fio;
    println!(
        "black-holed for {:?}: fio write max {:.1} ms, read max {:.1} ms, {} writes ({:.0} IOPS), error {}; \
         back in sync {:?} after fio ended",
        s.held, r.write_max_ms, r.read_max_ms, r.write_ios, r.write_iops, r.error, s.resync
    );
    assert!(r.ok && r.error == 0, "fio failed: {}\n{}", r.stderr, r.json);
    assert_eq!(s.during[1]["state"], "failed", "target during the partition: {:?}", s.during);
    assert!(r.write_ios > 5000, "fio wrote too little to span the partition: {}", r.write_ios);
    assert!(
        r.write_max_ms <= MAX_WRITE_MS,
        "fio's longest write took {:.1} ms (bar {MAX_WRITE_MS} ms)",
        r.write_max_ms
    );
    assert_eq!(s.digests.0, s.digests.1, "replicas differ after the resync");
}
