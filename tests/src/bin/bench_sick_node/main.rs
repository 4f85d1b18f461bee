//! `cargo xtask bench sick-node`: issue 15's sick-node figures with real processes (a local
//! source, a remote target replica process, `mirror serve`, fio through NBD; see
//! `mirror_tests::sick`): the longest write fio sees with the target frozen (SIGSTOP) and with
//! its link black-holed (target in a network namespace), and the read tail with the target
//! stalling 200 ms every 2 s against the healthy tail of the same run, with the hedged reads it
//! cost. Each scenario runs `--rounds` times; the JSON holds the worst write stall and the
//! median read figures.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use clap::Parser;
use mirror_tests::{
    netns::{self, NodeNs},
    sick::{stalling_reads, write_stall, Mirror, MirrorOpts, Sickness},
    stats::median,
};

/// Issue 15's sick-node benchmark: frozen target, black-holed target link, stalling replica.
/// Needs root for the namespace; prints the figures and writes them as JSON.
#[derive(Debug, Parser)]
#[command(name = "bench-sick-node", args_override_self = true)]
struct Args {
    /// The `mirror` binary to measure.
    #[arg(long = "mirror-bin", value_name = "PATH", default_value = "target/release/mirror")]
    mirror: PathBuf,
    /// Where the JSON results go.
    #[arg(long, default_value = "target/bench/sick-node.json")]
    out: PathBuf,
    /// Rounds of each scenario.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..))]
    rounds: u64,
    /// How long the target is frozen or black-holed, seconds.
    #[arg(long, default_value_t = 5)]
    hold_secs: u64,
}

fn main() -> Result<()> {
    let a = Args::parse();
    // The fixtures start this binary.
    std::env::set_var("MIRROR_BIN", &a.mirror);
    let hold = Duration::from_secs(a.hold_secs);
    let mut frozen = Vec::new();
    let mut blackhole = Vec::new();
    let mut ratio = Vec::new();
    let mut extra = Vec::new();
    let ns_missing = netns::unavailable();
    for round in 1..=a.rounds {
        let m = Mirror::start("bench-frozen", &MirrorOpts::default())?;
        let s = write_stall(m, Sickness::Frozen, hold)?;
        anyhow::ensure!(s.fio.ok && s.fio.error == 0, "frozen target: fio failed: {}", s.fio.stderr);
        anyhow::ensure!(s.digests.0 == s.digests.1, "frozen target: replicas differ after the resync");
        println!("round {round}: frozen target: fio write max {:.1} ms", s.fio.write_max_ms);
        frozen.push(s.fio.write_max_ms);

        if ns_missing.is_none() {
            let ns = NodeNs::new("bench", 0)?;
            let m = Mirror::start("bench-blackhole", &MirrorOpts::in_namespace(&ns))?;
            let s = write_stall(m, Sickness::Blackhole(&ns), hold)?;
            anyhow::ensure!(s.fio.ok && s.fio.error == 0, "black hole: fio failed: {}", s.fio.stderr);
            anyhow::ensure!(s.digests.0 == s.digests.1, "black hole: replicas differ after the resync");
            println!("round {round}: black-holed target link: fio write max {:.1} ms", s.fio.write_max_ms);
            blackhole.push(s.fio.write_max_ms);
        }

        let o = MirrorOpts { size: 64 << 20, target_weight: 50, ..Default::default() };
        let m = Mirror::start("bench-stall", &o)?;
        let s = stalling_reads(&m, Duration::from_millis(200), Duration::from_secs(2), 10, 20)?;
        anyhow::ensure!(s.stalled.ok && s.stalled.error == 0, "stalling replica: fio failed");
        let r = s.p999_ratio().context("fio gave no read p99.9")?;
        println!(
            "round {round}: stalling replica: read p99.9 {:.2} ms vs {:.2} ms healthy (x{r:.2}), hedges {:.2}% of reads",
            s.stalled.read_pct("99.900000").unwrap_or(f64::NAN),
            s.healthy.read_pct("99.900000").unwrap_or(f64::NAN),
            s.extra_reads_pct()
        );
        ratio.push(r);
        extra.push(s.extra_reads_pct());
    }
    let worst = |v: &[f64]| v.iter().copied().fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
    let mut json = serde_json::json!({
        "frozen_target_max_write_ms": worst(&frozen),
        "blackhole_target_max_write_ms": worst(&blackhole),
        "stalling_replica_p999_read_ratio": median(ratio.clone()),
        "hedged_extra_reads_pct": median(extra.clone()),
        "rounds": a.rounds,
        "hold_secs": a.hold_secs,
        "targets": {
            "frozen_target_max_write_ms": 1000, "blackhole_target_max_write_ms": 1000,
            "stalling_replica_p999_read_ratio": 2.0, "hedged_extra_reads_pct": 5,
        },
        "not_measured": {
            "netem_write_iops_vs_bound": "the host kernel has no sch_netem (only the VM's has)",
        },
    });
    if let Some(why) = ns_missing {
        json["not_measured"]["blackhole_target_max_write_ms"] = why.into();
    }
    if let Some(d) = a.out.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&a.out, serde_json::to_string_pretty(&json)? + "\n")?;
    println!("{}", serde_json::to_string_pretty(&json)?);
    Ok(())
}
