//! `mirror`: the node daemon and its CLI.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use mirror::telemetry::{bpf, collector, view, Source};

#[derive(Parser, Debug)]
#[command(
    name = "mirror",
    version,
    about = "Adaptive block-storage mirroring with predictive failover",
    long_about = "Adaptive block-storage mirroring with predictive failover.\n\n\
        `mirror daemon` runs on each node (as root): it attaches the eBPF telemetry programs and \
        pins their maps under /sys/fs/bpf/mirror/ (inspect them with `bpftool map dump pinned \
        /sys/fs/bpf/mirror/blk_stats`). `mirror top` shows a running daemon's figures."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the node daemon: attach the eBPF programs, pin their maps, show live block latency.
    Daemon {
        /// bpffs directory for the pinned maps.
        #[arg(long, default_value = mirror_common::PIN_DIR)]
        pin_dir: PathBuf,
        /// How often to read the maps and print the interval's figures.
        #[arg(long, default_value = "1s", value_parser = mirror::parse_duration)]
        interval: Duration,
        /// Stop after this long (default: run until SIGINT/SIGTERM).
        #[arg(long = "for", value_parser = mirror::parse_duration)]
        run_for: Option<Duration>,
        /// Do not try eBPF; read /proc/diskstats instead.
        #[arg(long)]
        no_bpf: bool,
        /// Do not print the live table (logs only).
        #[arg(long)]
        quiet: bool,
        /// Print each interval in the Prometheus text format instead of the table.
        #[arg(long)]
        prometheus: bool,
        /// Turn on the kernel's BPF run-time statistics and write each program's run_time_ns and
        /// run_cnt as JSON to this file on exit (used by `cargo xtask bench ebpf`).
        #[arg(long)]
        bpf_stats_out: Option<PathBuf>,
    },
    /// Show the block latency figures of a running daemon, read from its pinned maps.
    Top {
        /// bpffs directory where the daemon pinned its maps.
        #[arg(long, default_value = mirror_common::PIN_DIR)]
        pin_dir: PathBuf,
        /// Interval between two readings.
        #[arg(long, default_value = "1s", value_parser = mirror::parse_duration)]
        interval: Duration,
        /// Number of intervals to show (default: until interrupted).
        #[arg(long)]
        count: Option<u64>,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Daemon {
            pin_dir,
            interval,
            run_for,
            no_bpf,
            quiet,
            prometheus,
            bpf_stats_out,
        } => rt.block_on(daemon(DaemonOpts {
            pin_dir,
            interval,
            run_for,
            allow_bpf: !no_bpf,
            quiet,
            prometheus,
            bpf_stats_out,
        })),
        Command::Top {
            pin_dir,
            interval,
            count,
        } => rt.block_on(top(pin_dir, interval, count)),
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[derive(Debug)]
struct DaemonOpts {
    pin_dir: PathBuf,
    interval: Duration,
    run_for: Option<Duration>,
    allow_bpf: bool,
    quiet: bool,
    prometheus: bool,
    bpf_stats_out: Option<PathBuf>,
}

fn write_program_stats(path: &std::path::Path, stats: &[bpf::ProgramStats]) -> Result<()> {
    let mut json = String::from("{");
    for (i, p) in stats.iter().enumerate() {
        if i > 0 {
            json.push(',');
        }
        json.push_str(&format!(
            "\"{}\":{{\"run_time_ns\":{},\"run_cnt\":{}}}",
            p.name, p.run_time_ns, p.run_cnt
        ));
    }
    json.push_str("}\n");
    std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))
}

async fn daemon(o: DaemonOpts) -> Result<()> {
    anyhow::ensure!(
        o.interval >= Duration::from_millis(10),
        "--interval must be at least 10ms"
    );
    let stats_fd = match &o.bpf_stats_out {
        Some(_) => Some(bpf::enable_run_time_stats()?),
        None => None,
    };
    let source = Source::open(&o.pin_dir, o.allow_bpf);
    if let Source::Bpf(p) = &source {
        for pin in p.pins() {
            tracing::info!("pinned map: bpftool map dump pinned {}", pin.display());
        }
    }
    let mut collector = collector::Collector::new(source)?;
    let deadline = o.run_for.map(|d| Instant::now() + d);
    let mut ticker = tokio::time::interval(o.interval);
    ticker.tick().await;
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => { tracing::info!("signal received, detaching"); break; }
            _ = ticker.tick() => {}
        }
        let sample = collector.tick()?;
        if o.prometheus {
            println!(
                "{}",
                collector::to_prometheus(&sample, mirror::telemetry::blk::dev_name)
            );
        } else if !o.quiet {
            println!(
                "--- node telemetry ({}, {:.1}s interval)",
                sample.source, sample.secs
            );
            print!("{}", view::sample(&sample));
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
    }
    if let (Some(path), Source::Bpf(p)) = (&o.bpf_stats_out, collector.source()) {
        write_program_stats(path, &p.program_stats())?;
    }
    drop(stats_fd);
    Ok(())
}

async fn top(pin_dir: PathBuf, interval: Duration, count: Option<u64>) -> Result<()> {
    let mut prev = bpf::read_pinned_all(&pin_dir).context("reading the daemon's pinned maps")?;
    let mut prev_t = Instant::now();
    let mut shown = 0u64;
    while count.is_none_or(|c| shown < c) {
        tokio::time::sleep(interval).await;
        let cur = bpf::read_pinned_all(&pin_dir)?;
        let now = Instant::now();
        let s = collector::sample(
            "ebpf",
            &prev,
            &cur,
            now.duration_since(prev_t).as_secs_f64(),
        );
        println!("--- node telemetry (pinned maps in {})", pin_dir.display());
        print!("{}", view::sample(&s));
        prev = cur;
        prev_t = now;
        shown += 1;
    }
    Ok(())
}
