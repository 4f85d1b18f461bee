//! `cargo xtask demo`: the whole product on one machine with embedded defaults.
//!
//! Two node processes (`mirror replica`, each with its own health monitor) hold the replicas,
//! the node daemon attaches the eBPF telemetry, `mirror serve` routes an NBD export, and fio
//! verifies every block it writes throughout. The demo then slows the source disk (cgroup I/O
//! throttle) step by step and shows the weights moving, lifts it and shows the failback, kills
//! the source node (SIGKILL) and shows the target taking every read with no failed I/O, restarts
//! it and shows the resync and the gradual failback. It ends with a summary table, and writes a
//! timeline plot (SVG) and the raw points (JSON).

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use clap::Parser;
use mirror_tests::scenario::{self, Cluster, Opts, Recorder, Workload};

/// The whole product on one machine (`cargo xtask demo`, root): two nodes, the node daemon,
/// `mirror serve` and fio verifying through NBD, while the source disk slows down step by step,
/// recovers, and the source node is killed and restarted. Ends with a summary table and writes
/// a timeline plot (SVG) and its points (JSON).
#[derive(Debug, Parser)]
#[command(name = "demo", args_override_self = true)]
struct Args {
    /// The `mirror` binary to run.
    #[arg(long = "mirror-bin", value_name = "PATH", default_value = "target/release/mirror")]
    mirror: PathBuf,
    /// Where timeline.svg and timeline.json go.
    #[arg(long, default_value = "target/demo")]
    out_dir: PathBuf,
    /// Seconds of each calm phase of the story (the whole demo takes about 10x this).
    #[arg(long = "phase-seconds", default_value_t = 6)]
    phase: u64,
}

/// Prints one live line per `every` for `secs` seconds (or until `until` holds).
fn watch(c: &Cluster, rec: &Recorder, secs: f64, until: impl Fn(&serde_json::Value) -> bool) -> Duration {
    let t0 = Instant::now();
    while t0.elapsed().as_secs_f64() < secs {
        let Ok(s) = c.status() else {
            std::thread::sleep(Duration::from_millis(250));
            continue;
        };
        let tw = s["weights"]["target"].as_u64().unwrap_or(0);
        let bar = |w: u64| "#".repeat((w / 5) as usize);
        let node = |i: usize| {
            let r = &s["replicas"][i];
            let h = match (r["node"]["reachable"].as_bool(), r["node"]["health"].as_u64()) {
                (Some(false), _) => "down".to_string(),
                (_, Some(h)) => h.to_string(),
                _ => "?".into(),
            };
            let lat =
                r["read_latency_us"].as_u64().unwrap_or(0).max(r["write_latency_us"].as_u64().unwrap_or(0));
            let job = &r["node"]["sync"];
            let sync = match (job["state"].as_str(), job["total_bytes"].as_u64()) {
                (Some(st), Some(t)) if t > 0 => {
                    format!(" {st} {:.0}%", job["done_bytes"].as_u64().unwrap_or(0) as f64 * 100.0 / t as f64)
                }
                _ if r["state"] != "in-sync" => format!(" {}", r["state"].as_str().unwrap_or("?")),
                _ => String::new(),
            };
            format!("health {h:>4} lat {lat:>6}us{sync}")
        };
        println!(
            "{:>6.1}s  source {:>3}% {:<20} target {:>3}% {:<20} {:<10} | src {} | tgt {}",
            rec.points().last().map_or(0.0, |p| p.t),
            100 - tw,
            bar(100 - tw),
            tw,
            bar(tw),
            s["mode"].as_str().unwrap_or("?"),
            node(0),
            node(1)
        );
        if until(&s) {
            return t0.elapsed();
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    t0.elapsed()
}

fn main() -> Result<()> {
    let a = Args::parse();
    if let Some(why) = scenario::unavailable() {
        bail!("the demo cannot run here: {why}");
    }
    let mut o = Opts::new(a.mirror.clone());
    o.failback_hold = Duration::from_secs(3);
    o.ramp = Duration::from_secs(8);
    // A ublk device too where the kernel has one (the workload drives NBD either way).
    o.serve_args = vec!["--frontend".into(), "auto".into()];
    println!(
        "== starting: two nodes (source: slow-able disk, target: the same kind), node daemon (eBPF), router + NBD"
    );
    let mut c = Cluster::start(&o)?;
    println!(
        "   NBD export at nbd://{}/ ; control socket {} ; logs in {}",
        c.nbd,
        c.ctl.display(),
        c.dir.display()
    );
    let mut rec = Recorder::start(&a.mirror, &c.ctl, Duration::from_millis(200));
    // Depth 1: each throttle step below the 400 IOPS the workload asks for shows as latency of
    // about 1 / IOPS, so the source degrades step by step (at depth 8 every step under the rate
    // would queue eight deep at once: a cliff, not a slope).
    let w = Workload::start_qd(&c.nbd, 48, Some(400), 1);
    rec.mark("fio verify starts");
    let p = a.phase as f64;
    println!("== healthy: every read goes to the source (no leak to a target that is not needed)");
    watch(&c, &rec, p, |_| false);

    let steps = scenario::GRADUAL_STEPS;
    println!(
        "== degrading the source disk step by step (cgroup I/O throttle: {} IOPS): the target's share rises part way first",
        steps.map(|s| s.to_string()).join(", ")
    );
    let t_degrade = rec.mark(&format!("source disk throttled {} IOPS", steps[0]));
    for (k, &iops) in steps.iter().enumerate() {
        if k > 0 {
            rec.mark(&format!("{iops} IOPS"));
        }
        c.throttle_source(Some(iops))?;
        let last = k + 1 == steps.len();
        watch(&c, &rec, if last { p } else { p * 0.6 }, |_| false);
    }
    let part_way: Vec<u8> = scenario::held_shares(
        &rec.points()
            .iter()
            .filter(|pt| pt.t >= t_degrade)
            .map(|pt| (pt.t, pt.target_weight))
            .collect::<Vec<_>>(),
        1.0,
    );
    let shift =
        rec.points().iter().find(|pt| pt.t >= t_degrade && pt.target_weight >= 90).map(|pt| pt.t - t_degrade);

    println!("== the disk recovers: failback after the hold time, then a gradual ramp");
    let t_heal = rec.mark("throttle lifted");
    c.throttle_source(None)?;
    let normal = |s: &serde_json::Value| {
        s["replicas"][0]["state"] == "in-sync" && s["mode"] == "Normal" && s["weights"]["target"] == 0
    };
    let took = watch(&c, &rec, 40.0, normal);
    let heal_back = (took.as_secs_f64() < 40.0).then(|| rec.points().last().map_or(0.0, |pt| pt.t - t_heal));

    println!("== SIGKILL of the source node under the verifying workload");
    let t_kill = rec.mark("source node SIGKILL");
    c.source.kill();
    watch(&c, &rec, p, |_| false);
    let failover =
        rec.points().iter().find(|pt| pt.t >= t_kill && pt.target_weight == 100).map(|pt| pt.t - t_kill);

    println!("== restarting the source node: resync of what it missed, then the gradual failback");
    let t_restart = rec.mark("source node restarted");
    c.source.try_restart()?;
    let took = watch(&c, &rec, 90.0, normal);
    let resynced =
        rec.points().iter().find(|pt| pt.t >= t_restart && pt.in_sync[0]).map(|pt| pt.t - t_restart);
    let failback =
        (took.as_secs_f64() < 90.0).then(|| rec.points().last().map_or(0.0, |pt| pt.t - t_restart));
    watch(&c, &rec, 2.0, |_| false);
    rec.mark("fio stops");
    let runs = w.runs.load(std::sync::atomic::Ordering::Relaxed);
    let r = w.finish();
    rec.stop();
    let status = c.status()?;
    c.stop_serve();
    let (ds, dt) = c.digests()?;

    let pts = rec.points();
    let events = rec.events.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    std::fs::create_dir_all(&a.out_dir)?;
    let svg_path = a.out_dir.join("timeline.svg");
    std::fs::write(
        &svg_path,
        mirror_tests::timeline::svg(
            "mirror demo: predictive failover, failover, resync, failback",
            &pts,
            &events,
        ),
    )?;
    let json_path = a.out_dir.join("timeline.json");
    let json = serde_json::json!({
        "events": events.iter().map(|(t, e)| serde_json::json!({"t": t, "event": e})).collect::<Vec<_>>(),
        "points": pts.iter().map(|p| serde_json::json!({
            "t": p.t, "target_weight": p.target_weight, "mode": p.mode,
            "health": p.health, "latency_us": p.latency_us, "reads": p.reads, "in_sync": p.in_sync,
        })).collect::<Vec<_>>(),
        "weight_changes": status["events"],
    });
    std::fs::write(&json_path, serde_json::to_string_pretty(&json)?)?;

    let s = |x: Option<f64>| x.map_or("did not happen".to_string(), |v| format!("{v:.2} s"));
    println!("\n== summary");
    println!("{:<52} {}", "source disk throttled -> target weight >= 90", s(shift));
    println!("{:<52} {:?}", "target shares held >= 1 s on the way (part way)", part_way);
    println!("{:<52} {}", "throttle lifted -> failback complete (hold + ramp)", s(heal_back));
    println!("{:<52} {}", "source SIGKILL -> target weight 100", s(failover));
    println!("{:<52} {}", "source restarted -> back in sync (router view)", s(resynced));
    println!("{:<52} {}", "source restarted -> failback complete", s(failback));
    println!("{:<52} {}", "fio verify runs completed", runs.max(r.runs));
    println!("{:<52} {}", "failed I/Os (fio, crc32c verified)", r.failed_ios);
    println!("{:<52} {}", "weight changes logged", status["weight_changes"]);
    println!("{:<52} {}", "replicas byte-identical at the end", ds == dt);
    println!("timeline plot: {}  (open it in a browser)", svg_path.display());
    println!("timeline data: {}", json_path.display());
    if r.failed_ios > 0 {
        bail!("fio reported {} failed I/Os: {:?}", r.failed_ios, r.failures);
    }
    if ds != dt {
        bail!("the replicas differ at the end");
    }
    Ok(())
}
