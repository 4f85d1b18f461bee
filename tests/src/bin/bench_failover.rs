//! `cargo xtask bench failover`: issue 7's scenarios with real processes (see
//! `mirror_tests::scenario`), for the default adaptive policy and, as the peer measured in the
//! same run, the seed formula (`--policy seed`: source health x 0.6, target health x 0.4):
//! (a) source disk throttled: seconds until the target weight reaches 90, reversals after;
//! (b) SIGKILL of the source under fio verify: seconds until the target weight is 100;
//! (c) the source restarted: resync, failback, fio errors, replicas identical;
//! (d) health oscillating around the "good" line: direction changes of the weights;
//! (g) a degradation that grows slowly: seconds the target's share rose before the source's
//! health fell under the critical line, and the distinct shares held on the way;
//! a long degradation (the source disk slow for `--long-secs`): reversals;
//! a calm period under CPU hogs: the highest target weight.
//! Rounds of (a) alternate which policy goes first; the table and `target/bench/failover.json`
//! report medians.

use std::{path::PathBuf, time::Duration};

use anyhow::{bail, Result};
use clap::Parser;
use mirror_tests::{
    proc::Hogs,
    scenario::{self, Opts},
    stats::median,
};

/// Issue 7's failover scenarios with real processes (two replica nodes, the node daemon, `mirror
/// serve`, fio verifying through NBD), for the adaptive policy and the seed formula in the same
/// run: (a) source disk throttled, (b) SIGKILL of the source, (c) restart, resync and failback,
/// (d) source health oscillating. Needs root. Prints a table of medians and writes them as JSON.
#[derive(Debug, Parser)]
#[command(name = "bench-failover", args_override_self = true)]
struct Args {
    /// The `mirror` binary to measure.
    #[arg(long = "mirror-bin", value_name = "PATH", default_value = "target/release/mirror")]
    mirror: PathBuf,
    /// Where the JSON results go.
    #[arg(long, default_value = "target/bench/failover.json")]
    out: PathBuf,
    /// Rounds of (a), (b) and (c); the rounds of (a) alternate which policy goes first.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    rounds: u64,
    /// Seconds of the oscillation of scenario (d), per policy.
    #[arg(long, default_value_t = 60)]
    oscillation_secs: u64,
    /// IOPS the source disk is throttled to in scenario (a).
    #[arg(long, default_value_t = 100)]
    throttle_iops: u32,
    /// Seconds the source disk stays slow in the long degradation.
    #[arg(long, default_value_t = 600)]
    long_secs: u64,
    /// Seconds of the calm period under CPU hogs.
    #[arg(long, default_value_t = 60)]
    calm_secs: u64,
}

fn opts(a: &Args, seed: bool) -> Opts {
    let mut o = Opts::new(a.mirror.clone());
    o.failback_hold = Duration::from_secs(2);
    o.ramp = Duration::from_secs(3);
    if seed {
        o.serve_args = vec!["--policy".into(), "seed".into()];
    }
    o
}

fn fmt(x: Option<f64>) -> String {
    x.map_or("never".into(), |v| format!("{v:.2}"))
}

fn main() -> Result<()> {
    let a = Args::parse();
    if let Some(why) = scenario::unavailable() {
        bail!("cannot run the failover benchmark: {why}");
    }
    let (mut shift, mut shift_seed) = (Vec::new(), Vec::new());
    let (mut rev_a, mut rev_a_seed) = (Vec::new(), Vec::new());
    let (mut failover, mut failback) = (Vec::new(), Vec::new());
    let mut recovery = Vec::new();
    let mut failed_ios = 0u64;
    let mut identical = true;
    for round in 0..a.rounds {
        let order = if round % 2 == 0 { [false, true] } else { [true, false] };
        for seed in order {
            let r = scenario::scenario_a(&opts(&a, seed), a.throttle_iops)?;
            eprintln!(
                "round {round} (a) {}: shift {} s, reversals {}, min weight after {}, back to 0 {} s after \
                 the lift, fio errors {}",
                if seed { "seed" } else { "adaptive" },
                fmt(r.shift_s),
                r.reversals,
                r.min_after,
                fmt(r.recovered_s),
                r.failed_ios
            );
            failed_ios += r.failed_ios;
            if !seed {
                recovery.push(r.recovered_s);
            }
            if seed {
                shift_seed.push(r.shift_s);
                rev_a_seed.push(f64::from(r.reversals));
            } else {
                shift.push(r.shift_s);
                rev_a.push(f64::from(r.reversals));
            }
        }
        let r = scenario::scenario_bc(&opts(&a, false))?;
        eprintln!(
            "round {round} (b,c): failover {:.3} s, failback {:.1} s, fio errors {}, identical {}",
            r.failover_s, r.failback_s, r.failed_ios, r.replicas_identical
        );
        failed_ios += r.failed_ios;
        identical &= r.replicas_identical;
        failover.push(r.failover_s);
        failback.push(r.failback_s);
    }
    let mut osc = [0u32; 2];
    let mut crossings = [0usize; 2];
    for (i, seed) in [false, true].into_iter().enumerate() {
        let r = scenario::scenario_d(&opts(&a, seed), a.oscillation_secs)?;
        eprintln!(
            "(d) {}: {} reversals, health crossed 80 {} times, fio errors {}",
            if seed { "seed" } else { "adaptive" },
            r.reversals,
            r.crossings,
            r.failed_ios
        );
        failed_ios += r.failed_ios;
        osc[i] = r.reversals;
        crossings[i] = r.crossings;
    }
    let mut gradual = Vec::new();
    for seed in [false, true] {
        let r =
            scenario::scenario_gradual(&opts(&a, seed), &scenario::GRADUAL_STEPS, Duration::from_secs(4))?;
        eprintln!(
            "(g) {}: lead {} s, intermediate shares {:?}, reversals {}, fio errors {}",
            if seed { "seed" } else { "adaptive" },
            fmt(r.lead_s),
            r.intermediate_shares,
            r.reversals,
            r.failed_ios
        );
        failed_ios += r.failed_ios;
        gradual.push(r);
    }
    let long =
        scenario::scenario_a_held(&opts(&a, false), a.throttle_iops, Duration::from_secs(a.long_secs))?;
    eprintln!(
        "long degradation ({} s): shift {} s, reversals {}, min weight after {}",
        a.long_secs,
        fmt(long.shift_s),
        long.reversals,
        long.min_after
    );
    failed_ios += long.failed_ios;
    let calm = {
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let _hogs = Hogs::spawn(cpus);
        scenario::calm_period(&opts(&a, false), a.calm_secs)?
    };
    eprintln!("calm period under CPU hogs ({} s): highest target weight {calm}", a.calm_secs);
    // A run that never reached 90 counts as infinitely slow in the median.
    let med = |v: &[Option<f64>]| {
        let m = median(v.iter().map(|x| x.unwrap_or(f64::INFINITY)).collect());
        m.is_finite().then_some(m)
    };
    let (s, ss) = (med(&shift), med(&shift_seed));
    let ra = median(rev_a.clone());
    let ras = median(rev_a_seed.clone());
    println!("\nfailover benchmark: {} rounds, medians; peer = the seed formula in the same run", a.rounds);
    println!("{:<44} {:>10} {:>10} {:>8}", "metric", "adaptive", "seed", "ratio");
    let ratio = |x: Option<f64>, y: Option<f64>| match (x, y) {
        (Some(x), Some(y)) if y > 0.0 => format!("{:.2}", x / y),
        (Some(_), None) => "seed never".into(),
        _ => "-".into(),
    };
    println!("{:<44} {:>10} {:>10} {:>8}", "(a) seconds until target >= 90", fmt(s), fmt(ss), ratio(s, ss));
    println!(
        "{:<44} {:>10} {:>10} {:>8}",
        "(a) reversals while degraded",
        ra,
        ras,
        ratio(Some(ra), Some(ras))
    );
    println!(
        "{:<44} {:>10} {:>10} {:>8}",
        "(d) reversals in the oscillation",
        osc[0],
        osc[1],
        ratio(Some(f64::from(osc[0])), Some(f64::from(osc[1])))
    );
    println!("{:<44} {:>10}", "(a) seconds from the lift to target 0", fmt(med(&recovery)));
    println!("{:<44} {:>10.3}", "(b) seconds until target = 100 after SIGKILL", median(failover.clone()));
    println!("{:<44} {:>10.1}", "(c) seconds from restart to failback done", median(failback.clone()));
    println!("{:<44} {:>10}", "(b,c) failed I/Os (fio, all scenarios)", failed_ios);
    println!("{:<44} {:>10}", "(c) replicas identical", identical);
    println!(
        "{:<44} {:>10} {:>10}",
        "(g) seconds the share rose before critical",
        fmt(gradual[0].lead_s),
        fmt(gradual[1].lead_s)
    );
    println!(
        "{:<44} {:>10} {:>10}",
        "(g) intermediate shares held >= 1 s",
        gradual[0].intermediate_shares.len(),
        gradual[1].intermediate_shares.len()
    );
    println!("{:<44} {:>10}", format!("reversals, source slow {} s", a.long_secs), long.reversals);
    println!("{:<44} {:>10}", "highest target weight, calm under CPU hogs", calm);
    let json = serde_json::json!({
        "predictive_shift_s": s,
        "reversals_under_degradation": ra,
        "recovery_s": med(&recovery),
        "failover_s": median(failover.clone()),
        "failed_ios": failed_ios,
        "replicas_identical": identical,
        "oscillation_reversals": osc[0],
        "oscillation_health_crossings": crossings[0],
        "failback_s": median(failback.clone()),
        "seed_predictive_shift_s": ss,
        "seed_reversals_under_degradation": ras,
        "seed_oscillation_reversals": osc[1],
        "gradual_lead_s": gradual[0].lead_s,
        "gradual_intermediate_shares": gradual[0].intermediate_shares.len(),
        "seed_gradual_lead_s": gradual[1].lead_s,
        "seed_gradual_intermediate_shares": gradual[1].intermediate_shares.len(),
        "long_degradation_reversals": long.reversals,
        "long_degradation_secs": a.long_secs,
        "calm_start_max_target_weight": calm,
        "calm_secs": a.calm_secs,
        "rounds": a.rounds,
        "throttle_iops": a.throttle_iops,
        "samples": {
            "predictive_shift_s": shift, "seed_predictive_shift_s": shift_seed,
            "failover_s": failover, "failback_s": failback, "recovery_s": recovery,
        },
    });
    if let Some(d) = a.out.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&a.out, serde_json::to_string_pretty(&json)? + "\n")?;
    println!("wrote {}", a.out.display());
    Ok(())
}
