//! `cargo xtask bench handover`: issue 14's benchmark with real processes (a real etcd, two
//! `mirror replica` servers, router A active and router B `--standby` with roles swapped; see
//! `mirror_tests::handover`) and a client that reconnects (`mirror_tests::nbd::Writer`: numbered
//! 4 KiB blocks carrying their sequence number and digest, each acknowledgement timed, the next
//! router's address tried in turn when a connection drops or a write is refused). Per round:
//! - planned: `mirror ctl handover` on A under the writer: the longest gap between acknowledged
//!   writes (`planned_pause_s`), and where it went (writes held at A, B serving, the first
//!   acknowledgement through B);
//! - crash: A SIGKILLed under the writer: the kill to the first write acknowledged by B
//!   (`crash_takeover_s`), next to the lease TTL the router reports;
//! - frozen: A SIGSTOPped past the TTL while the writer keeps sending to it (pipelined), B takes
//!   over, A resumed: blocks A was sent after the freeze found on a replica (`stale_writes_landed`);
//!
//! and after each scenario every acknowledged block is read back from both replica files
//! (`acked_writes_lost`) and the files are compared. The order of the scenarios rotates per round.
//! Prints a table of medians, spread and the targets; writes `target/bench/handover.json`.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use clap::Parser;
use mirror_tests::{
    bench::rotation,
    handover::Pair,
    nbd::{landed, lost, Writer, WriterLog, WriterOpts, BLOCK},
    stats::median,
};

/// Issue 14's handover benchmark: planned handover pause, SIGKILL takeover time, stale writes of
/// a fenced router, acknowledged writes lost. Needs etcd (Debian etcd-server).
#[derive(Debug, Parser)]
#[command(name = "bench-handover", args_override_self = true)]
struct Args {
    /// The `mirror` binary to measure.
    #[arg(long = "mirror-bin", value_name = "PATH", default_value = "target/release/mirror")]
    mirror: PathBuf,
    /// Where the JSON results go.
    #[arg(long, default_value = "target/bench/handover.json")]
    out: PathBuf,
    /// Rounds of each scenario.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    rounds: u64,
    /// The lease TTL given to both routers (`--lease-ttl`).
    #[arg(long, default_value = "2s")]
    ttl: String,
    /// Milliseconds between two writes of the client (its resolution for the pause).
    #[arg(long, default_value_t = 5)]
    pace_ms: u64,
    /// Seconds the writer runs before and after each event.
    #[arg(long, default_value_t = 1.0)]
    settle_s: f64,
    /// Keep the routers' logs (RUST_LOG=info, timestamped) of every scenario in this directory.
    #[arg(long, value_name = "DIR")]
    logs: Option<PathBuf>,
}

/// Copies the routers' logs to `--logs DIR` as `SCENARIO-ROUND-NODE.log`.
fn keep_logs(a: &Args, p: &Pair, scenario: &str, round: u64) -> Result<()> {
    let Some(d) = &a.logs else { return Ok(()) };
    std::fs::create_dir_all(d)?;
    for (i, node) in mirror_tests::handover::NODES.iter().enumerate() {
        std::fs::write(d.join(format!("{scenario}-{round}-{node}.log")), p.log(i))?;
    }
    Ok(())
}

const SIZE: u64 = 64 << 20;

fn writer(p: &Pair, depth: usize, pace: Duration) -> Writer {
    let mut o = WriterOpts::new(p.nbd.to_vec(), 0, SIZE / BLOCK as u64);
    o.depth = depth;
    o.pace = pace;
    Writer::start(o)
}

/// After a scenario: B flushes and stops (SIGTERM), then every acknowledged block is read from
/// both files. Returns (blocks lost, files identical).
fn check(p: &mut Pair, log: &WriterLog) -> Result<(usize, bool)> {
    p.wait_in_sync(1, Duration::from_secs(30))?;
    p.stop(1, Duration::from_secs(15)).context("B did not stop on SIGTERM")?;
    let files = p.files();
    let lost = lost(log, 0, &[&files[0], &files[1]])?;
    if !lost.is_empty() {
        eprintln!("  acknowledged blocks missing (file, seq): {:?}", &lost[..lost.len().min(10)]);
    }
    Ok((lost.len(), p.identical()?))
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[derive(Debug, Default)]
struct Planned {
    pause_s: f64,
    held_ms: f64,
    /// From `ctl handover` to: the last acknowledgement through A, its answer, B serving, the
    /// first acknowledgement through B.
    last_a_s: f64,
    ctl_s: f64,
    b_serving_s: f64,
    first_b_s: f64,
    lost: usize,
    identical: bool,
    acked: usize,
}

fn planned(a: &Args, round: u64) -> Result<Planned> {
    let mut p = Pair::start(&format!("bench-handover-planned-{round}"), &a.mirror, &a.ttl, SIZE)?;
    let w = writer(&p, 1, Duration::from_millis(a.pace_ms));
    std::thread::sleep(Duration::from_secs_f64(a.settle_s));
    let t0 = Instant::now();
    let h = p.handover()?;
    let ctl = t0.elapsed();
    let st = p.wait_exit(0, Duration::from_secs(15))?;
    ensure!(st.success(), "A exited {st} after the handover: {}", p.log(0));
    let serving = p.wait_b_serving(Duration::from_secs(15))?;
    std::thread::sleep(Duration::from_secs_f64(a.settle_s));
    let log = w.stop()?;
    let (gap, _) = log.longest_gap().context("no acknowledgements")?;
    let last_a = log.writes.iter().filter(|x| x.addr == 0).filter_map(|x| x.acked).max();
    let first_b = log.first_ack_after(t0, 1);
    let rel = |t: Option<Instant>| t.map_or(f64::NAN, |t| secs(t.saturating_duration_since(t0)));
    let (lost, identical) = check(&mut p, &log)?;
    keep_logs(a, &p, "planned", round)?;
    Ok(Planned {
        pause_s: secs(gap),
        held_ms: h["paused_ms"].as_f64().unwrap_or(f64::NAN),
        last_a_s: rel(last_a),
        ctl_s: secs(ctl),
        b_serving_s: rel(Some(serving)),
        first_b_s: rel(first_b),
        lost,
        identical,
        acked: log.acked().count(),
    })
}

#[derive(Debug, Default)]
struct Crash {
    takeover_s: f64,
    serving_s: f64,
    ttl_s: f64,
    lost: usize,
    identical: bool,
    acked: usize,
}

fn crash(a: &Args, round: u64) -> Result<Crash> {
    let mut p = Pair::start(&format!("bench-handover-crash-{round}"), &a.mirror, &a.ttl, SIZE)?;
    let ttl_ms = p.status(0)?["lease"]["ttl_ms"].as_f64().context("lease.ttl_ms in A's status")?;
    let w = writer(&p, 1, Duration::from_millis(a.pace_ms));
    std::thread::sleep(Duration::from_secs_f64(a.settle_s));
    p.signal(0, libc::SIGKILL)?;
    let killed = Instant::now();
    p.wait_exit(0, Duration::from_secs(5))?;
    let serving = p.wait_b_serving(Duration::from_secs(30))?;
    std::thread::sleep(Duration::from_secs_f64(a.settle_s));
    let log = w.stop()?;
    let first_b = log.first_ack_after(killed, 1).context("no write acknowledged by B")?;
    let (lost, identical) = check(&mut p, &log)?;
    keep_logs(a, &p, "crash", round)?;
    Ok(Crash {
        takeover_s: secs(first_b - killed),
        serving_s: secs(serving - killed),
        ttl_s: ttl_ms / 1000.0,
        lost,
        identical,
        acked: log.acked().count(),
    })
}

#[derive(Debug, Default)]
struct Frozen {
    /// Writes sent to A after the freeze (+ margin), and of those: found on a replica, acknowledged.
    sent_frozen: usize,
    landed: usize,
    acked_by_fenced: usize,
    /// Of those sent when frozen: refused by A with an NBD error once it ran again (it read them
    /// and answered), and cut off (the connection closed without a reply).
    refused: usize,
    cut_off: usize,
    /// Sent to A before the freeze and never answered: may or may not be on the replicas.
    in_doubt: usize,
    takeover_s: f64,
    fenced_exit: bool,
    acked: usize,
    lost: usize,
    identical: bool,
}

/// How long after SIGSTOP a request counts as certainly sent to a stopped process.
const FREEZE_MARGIN: Duration = Duration::from_millis(50);

fn frozen(a: &Args, round: u64) -> Result<Frozen> {
    let mut p = Pair::start(&format!("bench-handover-frozen-{round}"), &a.mirror, &a.ttl, SIZE)?;
    // Pipelined: the writer goes on sending to the frozen router until 64 are in flight.
    let w = writer(&p, 64, Duration::from_millis(a.pace_ms));
    std::thread::sleep(Duration::from_secs_f64(a.settle_s));
    p.signal(0, libc::SIGSTOP)?;
    let stopped = Instant::now();
    let serving = p.wait_b_serving(Duration::from_secs(30))?;
    p.signal(0, libc::SIGCONT)?;
    let st = p.wait_exit(0, Duration::from_secs(15))?;
    let fenced_exit = !st.success() && p.log(0).contains("fenced");
    std::thread::sleep(Duration::from_secs_f64(a.settle_s));
    let log = w.stop()?;
    let after = |x: &mirror_tests::nbd::Sent| x.addr == 0 && x.sent > stopped + FREEZE_MARGIN;
    let files = p.files();
    let stale = landed(&log, 0, &[&files[0], &files[1]], after)?;
    if !stale.is_empty() {
        eprintln!("  stale blocks on a replica (file, seq): {:?}", &stale[..stale.len().min(10)]);
    }
    let r = Frozen {
        sent_frozen: log.writes.iter().filter(|x| after(x)).count(),
        landed: stale.len(),
        acked_by_fenced: log.writes.iter().filter(|x| after(x) && x.acked.is_some()).count(),
        refused: log.writes.iter().filter(|x| after(x) && x.error.is_some_and(|e| e != u32::MAX)).count(),
        cut_off: log.writes.iter().filter(|x| after(x) && x.error == Some(u32::MAX)).count(),
        in_doubt: log
            .writes
            .iter()
            .filter(|x| x.addr == 0 && x.sent <= stopped + FREEZE_MARGIN && x.acked.is_none())
            .count(),
        takeover_s: secs(serving - stopped),
        fenced_exit,
        acked: log.acked().count(),
        ..Frozen::default()
    };
    let (lost, identical) = check(&mut p, &log)?;
    keep_logs(a, &p, "frozen", round)?;
    Ok(Frozen { lost, identical, ..r })
}

fn spread(v: &[f64]) -> String {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{lo:.3}..{hi:.3}")
}

fn main() -> Result<()> {
    let a = Args::parse();
    ensure!(
        mirror_tests::etcd::binary().is_some(),
        "etcd is not installed (Debian etcd-server; cargo xtask setup)"
    );
    ensure!(Path::new(&a.mirror).is_file(), "{} not built", a.mirror.display());
    let (mut pl, mut cr, mut fr) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..a.rounds {
        for k in rotation(usize::try_from(round)?, 3) {
            match k {
                0 => {
                    let r = planned(&a, round)?;
                    eprintln!(
                        "round {round} planned: pause {:.3} s (writes held {:.0} ms; from ctl handover: last ack via A {:.3} s, \
                         ctl answered {:.3} s, B serving {:.3} s, first ack via B {:.3} s); {} acked, lost {}, identical {}",
                        r.pause_s, r.held_ms, r.last_a_s, r.ctl_s, r.b_serving_s, r.first_b_s, r.acked, r.lost, r.identical
                    );
                    pl.push(r);
                }
                1 => {
                    let r = crash(&a, round)?;
                    eprintln!(
                        "round {round} crash: TTL {:.1} s, B serving {:.3} s after SIGKILL, first ack via B {:.3} s; {} acked, lost {}, identical {}",
                        r.ttl_s, r.serving_s, r.takeover_s, r.acked, r.lost, r.identical
                    );
                    cr.push(r);
                }
                _ => {
                    let r = frozen(&a, round)?;
                    eprintln!(
                        "round {round} frozen: B serving {:.3} s after SIGSTOP; {} writes sent to the frozen router ({} refused by it, {} cut off), \
                         {} landed, {} acknowledged, {} in doubt (sent before the freeze); fenced exit {}; {} acked, lost {}, identical {}",
                        r.takeover_s,
                        r.sent_frozen,
                        r.refused,
                        r.cut_off,
                        r.landed,
                        r.acked_by_fenced,
                        r.in_doubt,
                        r.fenced_exit,
                        r.acked,
                        r.lost,
                        r.identical
                    );
                    fr.push(r);
                }
            }
        }
    }
    let pause: Vec<f64> = pl.iter().map(|r| r.pause_s).collect();
    let take: Vec<f64> = cr.iter().map(|r| r.takeover_s).collect();
    let ttl = cr.first().map_or(f64::NAN, |r| r.ttl_s);
    let stale: usize = fr.iter().map(|r| r.landed + r.acked_by_fenced).sum();
    let lost: usize =
        pl.iter().map(|r| r.lost).chain(cr.iter().map(|r| r.lost)).chain(fr.iter().map(|r| r.lost)).sum();
    let identical =
        pl.iter().all(|r| r.identical) && cr.iter().all(|r| r.identical) && fr.iter().all(|r| r.identical);
    let col = |f: fn(&Planned) -> f64| median(pl.iter().map(f).collect());
    println!("\nhandover benchmark: {} rounds, lease TTL {ttl:.1} s; medians (min..max)", a.rounds);
    println!("{:<50} {:>8} {:>14} {:>12}", "metric", "median", "spread", "target");
    println!(
        "{:<50} {:>8.3} {:>14} {:>12}",
        "planned_pause_s (longest gap between acks)",
        median(pause.clone()),
        spread(&pause),
        "<= 1.0"
    );
    println!("{:<50} {:>8.0}", "  writes held at A (ms)", col(|r| r.held_ms));
    println!("{:<50} {:>8.3}", "  ctl handover -> last ack via A (s)", col(|r| r.last_a_s));
    println!("{:<50} {:>8.3}", "  ctl handover -> its answer (s)", col(|r| r.ctl_s));
    println!("{:<50} {:>8.3}", "  ctl handover -> B serving (s)", col(|r| r.b_serving_s));
    println!("{:<50} {:>8.3}", "  ctl handover -> first ack via B (s)", col(|r| r.first_b_s));
    println!(
        "{:<50} {:>8.3} {:>14} {:>12}",
        "crash_takeover_s (SIGKILL -> first ack via B)",
        median(take.clone()),
        spread(&take),
        format!("<= {:.1}", ttl + 1.0)
    );
    println!(
        "{:<50} {:>8.3}",
        "  SIGKILL -> B serving (s)",
        median(cr.iter().map(|r| r.serving_s).collect())
    );
    println!(
        "{:<50} {:>8.3}",
        "frozen: SIGSTOP -> B serving (s)",
        median(fr.iter().map(|r| r.takeover_s).collect())
    );
    println!(
        "{:<50} {:>8} {:>14} {:>12}",
        "stale_writes_landed (of writes sent when frozen)",
        stale,
        format!("of {}", fr.iter().map(|r| r.sent_frozen).sum::<usize>()),
        "0"
    );
    let acked: usize =
        pl.iter().map(|r| r.acked).chain(cr.iter().map(|r| r.acked)).chain(fr.iter().map(|r| r.acked)).sum();
    println!(
        "{:<50} {:>8} {:>14} {:>12}",
        "acked_writes_lost (all scenarios)",
        lost,
        format!("of {acked}"),
        "0"
    );
    println!("{:<50} {:>8} {:>14} {:>12}", "replicas identical (all scenarios)", identical, "", "true");
    let json = serde_json::json!({
        "planned_pause_s": median(pause.clone()),
        "crash_takeover_s": median(take.clone()),
        "lease_ttl_s": ttl,
        "stale_writes_landed": stale,
        "acked_writes_lost": lost,
        "acked_writes": acked,
        "replicas_identical": identical,
        "fenced_router_stopped": fr.iter().all(|r| r.fenced_exit),
        "targets": {
            "planned_pause_s": 1.0, "crash_takeover_s": ttl + 1.0,
            "stale_writes_landed": 0, "acked_writes_lost": 0,
        },
        "rounds": a.rounds,
        "pace_ms": a.pace_ms,
        "planned": pl.iter().map(|r| serde_json::json!({
            "pause_s": r.pause_s, "held_ms": r.held_ms, "last_ack_a_s": r.last_a_s, "ctl_answer_s": r.ctl_s,
            "b_serving_s": r.b_serving_s, "first_ack_b_s": r.first_b_s, "acked": r.acked,
            "lost": r.lost, "identical": r.identical,
        })).collect::<Vec<_>>(),
        "crash": cr.iter().map(|r| serde_json::json!({
            "takeover_s": r.takeover_s, "b_serving_s": r.serving_s, "ttl_s": r.ttl_s, "acked": r.acked,
            "lost": r.lost, "identical": r.identical,
        })).collect::<Vec<_>>(),
        "frozen": fr.iter().map(|r| serde_json::json!({
            "sent_while_frozen": r.sent_frozen, "refused": r.refused, "cut_off": r.cut_off, "landed": r.landed, "acked_by_fenced": r.acked_by_fenced,
            "in_doubt": r.in_doubt, "b_serving_s": r.takeover_s, "fenced_exit": r.fenced_exit, "acked": r.acked,
            "lost": r.lost, "identical": r.identical,
        })).collect::<Vec<_>>(),
    });
    if let Some(d) = a.out.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&a.out, serde_json::to_string_pretty(&json)? + "\n")?;
    println!("wrote {}", a.out.display());
    Ok(())
}
