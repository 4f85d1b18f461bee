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
    s.assert_unnoticed("black-holed", MAX_WRITE_MS);
}
