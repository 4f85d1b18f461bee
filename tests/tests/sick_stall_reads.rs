//! A stalling replica must not show in the application's read tail: the remote target frozen
//! for 200 ms every 2 s (SIGSTOP / SIGCONT) under fio's 4 KiB random reads through NBD, half of
//! them weighted to it. Reads there that pass the target's high percentile are hedged to the
//! source within a 5% budget; fio's read p99.9 stays well under the stall.

use std::time::Duration;

use mirror_tests::{
    env::{skip, which},
    sick::{read_job, Fio, Mirror, MirrorOpts, Staller},
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
    let healthy = Fio::spawn(&m.uri(), &read_job(8, 1000, 6).iter().map(String::as_str).collect::<Vec<_>>())
        .unwrap()
        .wait()
        .unwrap();
    let h999 = healthy.read_pct("99.900000").unwrap_or(f64::NAN);
    println!(
        "healthy: {} reads, p99 {:.2} ms, p99.9 {h999:.2} ms, max {:.1} ms; {}",
        healthy.read_ios,
        healthy.read_pct("99.000000").unwrap_or(f64::NAN),
        healthy.read_max_ms,
        m.status().unwrap()["hedges"]
    );
    let job = read_job(8, 1000, 12);
    let fio = Fio::spawn(&m.uri(), &job.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let staller = Staller::start(m.target.pid(), STALL, Duration::from_secs(2));
    let r = fio.wait().unwrap();
    let stalls = staller.finish();
    let st = m.status().unwrap();
    let (sent, won) = (st["hedges"]["sent"].as_u64().unwrap(), st["hedges"]["won"].as_u64().unwrap());
    let p999 = r.read_pct("99.900000").unwrap_or(f64::NAN);
    println!(
        "{stalls} stalls of {STALL:?}: {} reads, p50 {:.2} ms, p99 {:.2} ms, p99.9 {p999:.2} ms, max {:.1} ms; \
         hedges sent {sent} ({:.2}% of reads), won {won}",
        r.read_ios,
        r.read_pct("50.000000").unwrap_or(f64::NAN),
        r.read_pct("99.000000").unwrap_or(f64::NAN),
        r.read_max_ms,
        100.0 * sent as f64 / r.read_ios.max(1) as f64
    );
    assert!(r.ok && r.error == 0, "fio failed: {}\n{}", r.stderr, r.json);
    assert!(stalls >= 4, "only {stalls} stalls");
    let reps = m.replicas().unwrap();
    let t = &reps[1];
    println!("target: {} reads, {} timeouts, {} retries", t["reads"], t["timeouts"], t["retries"]);
    assert!(reps.iter().all(|x| x["state"] == "in-sync"), "a replica left service: {reps:?}");
    assert!(won > 0, "no hedge won: sent {sent}, won {won}");
    // The budget: 5% of reads (both runs), plus the burst of 100 saved up.
    let reads = (r.read_ios + healthy.read_ios) as f64;
    assert!(sent as f64 <= 0.05 * reads + 100.0, "{sent} hedges for {reads} reads");
    assert!(
        p999 < STALL.as_secs_f64() * 1000.0 / 2.0,
        "read p99.9 {p999:.1} ms is not well under the {STALL:?} stall\n{}",
        m.serve_log()
    );
}
