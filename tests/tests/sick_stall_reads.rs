//! A stalling replica must not show in the application's read tail: the remote target frozen
//! for 200 ms every 2 s (SIGSTOP / SIGCONT) under fio's 4 KiB random reads through NBD, half of
//! them weighted to it. Reads there that pass the target's high percentile are hedged to the
//! source within a 5% budget; fio's read p99.9 stays under the healthy phase's plus half the
//! stall.

use std::time::Duration;

use mirror_tests::{
    env::{skip, which},
    sick::{stalling_reads, Mirror, MirrorOpts},
};

const STALL: Duration = Duration::from_millis(200);

#[test]
fn reads_complete_well_under_a_replica_stall_with_few_hedges() {
    const T: &str = "sick_stall_reads::reads_complete_well_under_a_replica_stall_with_few_hedges";
    if which("fio").is_none() {
        return skip(T, "NBD", "fio is not installed (cargo xtask setup)");
    }
    let o = MirrorOpts { size: 64 << 20, target_weight: 50, ..Default::default() };
    let m = Mirror::start("sick-stall", &o).unwrap_or_else(|e| panic!("{e:#}"));
    let s = stalling_reads(&m, STALL, Duration::from_secs(2), 6, 12).unwrap_or_else(|e| panic!("{e:#}"));
    let pct = |r: &mirror_tests::sick::FioResult, p: &str| r.read_pct(p).unwrap_or(f64::NAN);
    let (h, r) = (&s.healthy, &s.stalled);
    println!(
        "healthy: {} reads, p99 {:.2} ms, p99.9 {:.2} ms, max {:.1} ms",
        h.read_ios,
        pct(h, "99.000000"),
        pct(h, "99.900000"),
        h.read_max_ms
    );
    println!(
        "{} stalls of {STALL:?}: {} reads, p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.1} ms; \
         hedges sent {} ({:.2}% of all reads), won {}; p99.9 ratio {:.2}",
        s.stalls,
        r.read_ios,
        pct(r, "50.000000"),
        pct(r, "99.000000"),
        pct(r, "99.900000"),
        r.read_max_ms,
        s.hedges_sent,
        s.extra_reads_pct(),
        s.hedges_won,
        s.p999_ratio().unwrap_or(f64::NAN)
    );
    for x in &s.replicas {
        println!(
            "{}: {} reads, {} timeouts, {} retries, mean read latency {} us",
            x["role"], x["reads"], x["timeouts"], x["retries"], x["read_latency_us"]
        );
    }
    assert!(r.ok && r.error == 0, "fio failed: {}\n{}", r.stderr, r.json);
    assert!(s.stalls >= 4, "only {} stalls", s.stalls);
    assert!(s.replicas.iter().all(|x| x["state"] == "in-sync"), "a replica left service: {:?}", s.replicas);
    assert!(s.hedges_won > 0, "no hedge won: sent {}, won {}", s.hedges_sent, s.hedges_won);
    // The budget: 5% of reads, plus the burst of 100 saved up.
    let reads = (r.read_ios + h.read_ios) as f64;
    assert!(s.hedges_sent as f64 <= 0.05 * reads + 100.0, "{} hedges for {reads} reads", s.hedges_sent);
    // Unhedged, the stall itself is the tail (p99.9 at about 200 ms). Hedged, the tail is the
    // machine's own (the healthy phase's p99.9, measured in the same run: on a loaded machine it
    // is tens of milliseconds by itself) plus less than half the stall.
    let (p999, healthy_p999) = (pct(r, "99.900000"), pct(h, "99.900000"));
    let bar = healthy_p999 + STALL.as_secs_f64() * 1000.0 / 2.0;
    assert!(
        p999 < bar,
        "read p99.9 {p999:.1} ms: not under the healthy phase's {healthy_p999:.1} ms plus half the \
         {STALL:?} stall\n{}",
        m.serve_log()
    );
}
