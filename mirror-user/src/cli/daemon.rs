//! `mirror daemon`: the node daemon. Attaches the eBPF programs (or falls back to /proc), pins
//! their maps for `mirror top` and the health monitors, prints each interval's figures, runs the
//! run-queue program's duty cycle ([`crate::telemetry::duty`]), and on `--pause-signals` detaches
//! and attaches the programs on SIGUSR1 / SIGUSR2 for `cargo xtask bench ebpf`.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde::{ser::SerializeMap, Serialize, Serializer};

use crate::telemetry::{blk, bpf, collector, duty::DutyCycle, view, Source};

/// `mirror daemon` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct DaemonArgs {
    /// bpffs directory for the pinned maps.
    #[arg(long, default_value = mirror_common::PIN_DIR)]
    pub pin_dir: PathBuf,
    /// How often to read the maps and print the interval's figures.
    #[arg(long, default_value = "1s", value_parser = crate::parse_duration)]
    pub interval: Duration,
    /// Stop after this long (default: run until SIGINT/SIGTERM).
    #[arg(long = "for", value_parser = crate::parse_duration)]
    pub run_for: Option<Duration>,
    /// Do not try eBPF; read /proc/diskstats instead.
    #[arg(long)]
    pub no_bpf: bool,
    /// Do not print the live table (logs only).
    #[arg(long)]
    pub quiet: bool,
    /// Print each interval in the Prometheus text format instead of the table.
    #[arg(long, conflicts_with = "json")]
    pub prometheus: bool,
    /// Print each interval as one JSON object (a line) instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Turn on the kernel's BPF run-time statistics and write each program's run_time_ns,
    /// run_cnt and recursion_misses (runs the kernel skipped because another BPF program was
    /// running on that CPU: events not counted) as JSON to this file on exit (used by `cargo
    /// xtask bench ebpf` and the block-statistics tests).
    #[arg(long)]
    pub bpf_stats_out: Option<PathBuf>,
    /// SIGUSR1 detaches the programs (maps and pins stay), SIGUSR2 attaches them again; each
    /// change is acknowledged with a line `programs detached` / `programs attached` on
    /// stdout. `cargo xtask bench ebpf` uses it to alternate with and without the programs
    /// within one fio run.
    #[arg(long)]
    pub pause_signals: bool,
    /// Read the clock for every block request. By default, above 16k requests a second per
    /// device and CPU only a weighted sample of requests is timed (counts and bytes stay
    /// exact; latency sums and histograms become estimates), which spares most of the block
    /// program's clock reads (`cargo xtask bench ebpf --exact-latency` measures the
    /// difference).
    #[arg(long)]
    pub exact_block_latency: bool,
    /// Percent of each --runq-period the run-queue latency program is attached (1-100). It
    /// fires on every context switch, the most frequent event the daemon watches; attached
    /// part of the time, it measures a time sample of the switches: percentiles unchanged
    /// (each wait is read whole from the scheduler's own stamp), rates per second of
    /// attached time, and its cost cut by the same share. 100 measures every switch.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub runq_duty: u32,
    /// Length of the run-queue duty cycle (every interval of this length holds the same
    /// attached time; keep it at or below the health monitors' interval, 250ms).
    #[arg(long, default_value = "250ms", value_parser = crate::parse_duration)]
    pub runq_period: Duration,
}

impl DaemonArgs {
    /// The probe's settings.
    fn probe(&self) -> bpf::ProbeOptions {
        bpf::ProbeOptions {
            exact_block_latency: self.exact_block_latency,
            runq_duty_pct: self.runq_duty,
            runq_period: self.runq_period,
        }
    }

    /// Runs the daemon until SIGINT / SIGTERM or `--for`.
    pub async fn run(self) -> Result<()> {
        anyhow::ensure!(self.interval >= Duration::from_millis(10), "--interval must be at least 10ms");
        anyhow::ensure!(
            self.runq_period >= Duration::from_millis(10),
            "--runq-period must be at least 10ms (each window attaches and detaches a program)"
        );
        let stats_fd = match &self.bpf_stats_out {
            Some(_) => Some(bpf::enable_run_time_stats()?),
            None => None,
        };
        let source = Source::open(&self.pin_dir, !self.no_bpf, &self.probe());
        let stop = super::shutdown_signal();
        let mut pause = if self.pause_signals {
            anyhow::ensure!(
                matches!(source, Source::Bpf(_)),
                "--pause-signals needs the eBPF programs (root, a kernel with BPF), not {}",
                source.name()
            );
            use tokio::signal::unix::{signal, SignalKind};
            Some((signal(SignalKind::user_defined1())?, signal(SignalKind::user_defined2())?))
        } else {
            None
        };
        if let Source::Bpf(p) = &source {
            for pin in p.pins() {
                tracing::info!("pinned map: bpftool map dump pinned {}", pin.display());
            }
        }
        // Readiness for supervisors and tests: the programs are attached from here on.
        crate::announce(format_args!("ready: block statistics from {}", source.name()));
        let mut collector = collector::Collector::new(source)?;
        let deadline = self.run_for.map(|d| Instant::now() + d);
        let mut ticker = tokio::time::interval(self.interval);
        ticker.tick().await;
        let runq = match collector.source() {
            Source::Bpf(p) => p.runq_cycle(),
            _ => None,
        };
        if let Some((on, period)) = runq {
            tracing::info!(
                "run-queue latency measured {} ms of every {} ms (--runq-duty, --runq-period)",
                on.as_millis(),
                period.as_millis()
            );
        }
        // The run-queue duty cycle: the window opened at attach; its schedule counts from here.
        let clock = tokio::time::Instant::now();
        let mut cycle = runq.map(|(on, period)| DutyCycle::new(on, period, clock.elapsed()));
        tokio::pin!(stop);
        loop {
            let next_change = async {
                match &cycle {
                    Some(c) => tokio::time::sleep_until(clock + c.next_change()).await,
                    None => std::future::pending().await,
                }
            };
            let toggle = async {
                match &mut pause {
                    Some((detach, attach)) => tokio::select! {
                        _ = detach.recv() => Some(false),
                        _ = attach.recv() => Some(true),
                    },
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = &mut stop => { tracing::info!("signal received, detaching"); break; }
                () = next_change => {
                    if let Some(c) = &mut cycle {
                        let open = c.change(clock.elapsed());
                        if let Source::Bpf(p) = collector.source_mut() {
                            p.set_runq_window(open)?;
                        }
                        c.changed(clock.elapsed());
                    }
                    continue;
                }
                Some(on) = toggle => {
                    if let Source::Bpf(p) = collector.source_mut() {
                        if on { p.resume()? } else { p.pause()? }
                    }
                    crate::announce(format_args!("programs {}", if on { "attached" } else { "detached" }));
                    continue;
                }
                _ = ticker.tick() => {}
            }
            let sample = collector.tick()?;
            if self.json {
                crate::outln!("{}", serde_json::to_string(&sample)?);
            } else if self.prometheus {
                crate::outln!("{}", collector::to_prometheus(&sample, blk::dev_name));
            } else if !self.quiet {
                crate::outln!("--- node telemetry ({}, {:.1}s interval)", sample.source, sample.secs);
                crate::out!("{}", view::sample(&sample));
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
        }
        if let (Some(path), Source::Bpf(p)) = (&self.bpf_stats_out, collector.source()) {
            write_program_stats(path, &p.program_stats())?;
        }
        drop(stats_fd);
        Ok(())
    }
}

/// `--bpf-stats-out`: `{"PROGRAM":{"run_time_ns":N,"run_cnt":N,"recursion_misses":N},...}`, in
/// the programs' order.
struct ProgramStatsJson<'a>(&'a [bpf::ProgramStats]);

impl Serialize for ProgramStatsJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Counts {
            run_time_ns: u64,
            run_cnt: u64,
            recursion_misses: u64,
        }
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for p in self.0 {
            let c = Counts {
                run_time_ns: p.run_time_ns,
                run_cnt: p.run_cnt,
                recursion_misses: p.recursion_misses,
            };
            m.serialize_entry(p.name, &c)?;
        }
        m.end()
    }
}

fn write_program_stats(path: &Path, stats: &[bpf::ProgramStats]) -> Result<()> {
    let mut json = serde_json::to_string(&ProgramStatsJson(stats))?;
    json.push('\n');
    std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use crate::telemetry::bpf::ProgramStats;

    #[test]
    fn program_stats_are_json_in_the_programs_order() {
        let stats = [
            ProgramStats { name: "sched_switch_info", run_time_ns: 900, run_cnt: 10, recursion_misses: 0 },
            ProgramStats { name: "blk_rq_done", run_time_ns: 50, run_cnt: 2, recursion_misses: 1 },
        ];
        assert_eq!(
            serde_json::to_string(&super::ProgramStatsJson(&stats)).unwrap(),
            r#"{"sched_switch_info":{"run_time_ns":900,"run_cnt":10,"recursion_misses":0},"blk_rq_done":{"run_time_ns":50,"run_cnt":2,"recursion_misses":1}}"#
        );
    }
}
