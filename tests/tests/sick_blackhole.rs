//! A partition the application must not notice: the target replica runs in a network namespace
//! of its own behind a veth link, and the link is black-holed (tc `blackhole` on both ends: every
//! packet dropped, TCP retransmitting into the void) for several seconds under fio's verifying
//! 4 KiB random writes through NBD. The write deadline fails the target: no error, no write
//! longer than a second; after the link heals the target is resynced and identical.

use std::time::{Duration, Instant};

use mirror_tests::{
    env::{skip, which},
    netns::{self, NodeNs},
    sick::{verify_job, Fio, Mirror, MirrorOpts},
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
    let o = MirrorOpts {
        target_listen: Some(format!("{}:0", ns.node_ip)),
        target_prefix: ns.prefix(),
        ..Default::default()
    };
    let m = Mirror::start("sick-blackhole", &o).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(m.target.addr.starts_with(&ns.node_ip.to_string()), "target at {}", m.target.addr);
    let job = verify_job(64 << 20, 16, 1500);
    let fio = Fio::spawn(&m.uri(), &job.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    ns.blackhole().unwrap();
    let cut = Instant::now();
    std::thread::sleep(Duration::from_secs(5));
    let during = m.replicas().unwrap();
    ns.heal().unwrap();
    let held = cut.elapsed();
    let r = fio.wait().unwrap();
    println!(
        "black-holed for {held:?}: fio write max {:.1} ms, read max {:.1} ms, {} writes ({:.0} IOPS), error {}",
        r.write_max_ms, r.read_max_ms, r.write_ios, r.write_iops, r.error
    );
    assert!(r.ok && r.error == 0, "fio failed: {}\n{}", r.stderr, r.json);
    assert_eq!(during[1]["state"], "failed", "target during the partition: {during:?}");
    assert!(r.write_ios > 5000, "fio wrote too little to span the partition: {}", r.write_ios);
    assert!(
        r.write_max_ms <= MAX_WRITE_MS,
        "fio's longest write took {:.1} ms (bar {MAX_WRITE_MS} ms)\n{}",
        r.write_max_ms,
        m.serve_log()
    );
    let t0 = Instant::now();
    m.wait_in_sync(Duration::from_secs(120)).unwrap_or_else(|e| panic!("{e:#}\n{}", m.serve_log()));
    println!("back in sync {:?} after fio ended", t0.elapsed());
    let (s, t) = m.digests();
    assert_eq!(s, t, "replicas differ after the resync");
}
