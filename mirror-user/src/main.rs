//! `mirror`: the node daemon and its CLI.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use mirror::telemetry::{blk, bpf, view, BlkSource};

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
        } => rt.block_on(daemon(pin_dir, interval, run_for, !no_bpf, quiet)),
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

async fn daemon(
    pin_dir: PathBuf,
    interval: Duration,
    run_for: Option<Duration>,
    allow_bpf: bool,
    quiet: bool,
) -> Result<()> {
    anyhow::ensure!(
        interval >= Duration::from_millis(10),
        "--interval must be at least 10ms"
    );
    let source = BlkSource::open(&pin_dir, allow_bpf);
    if let BlkSource::Bpf(p) = &source {
        for pin in p.pins() {
            tracing::info!("pinned map: bpftool map dump pinned {}", pin.display());
        }
    }
    let deadline = run_for.map(|d| Instant::now() + d);
    let mut prev = source.snapshot()?;
    let mut prev_t = Instant::now();
    let mut ticker = tokio::time::interval(interval);
    ticker.tick().await;
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => { tracing::info!("signal received, detaching"); break; }
            _ = ticker.tick() => {}
        }
        let cur = source.snapshot()?;
        let now = Instant::now();
        let rows = blk::interval(&prev, &cur, now.duration_since(prev_t).as_secs_f64());
        if !quiet {
            println!(
                "--- block latency ({}, {:.1}s interval)",
                source.name(),
                interval.as_secs_f64()
            );
            print!("{}", view::table(&rows));
        }
        prev = cur;
        prev_t = now;
        if deadline.is_some_and(|d| now >= d) {
            break;
        }
    }
    Ok(())
}

async fn top(pin_dir: PathBuf, interval: Duration, count: Option<u64>) -> Result<()> {
    let mut prev = bpf::read_pinned(&pin_dir).context("reading the daemon's pinned maps")?;
    let mut prev_t = Instant::now();
    let mut shown = 0u64;
    while count.is_none_or(|c| shown < c) {
        tokio::time::sleep(interval).await;
        let cur = bpf::read_pinned(&pin_dir)?;
        let now = Instant::now();
        let rows = blk::interval(&prev, &cur, now.duration_since(prev_t).as_secs_f64());
        println!("--- block latency (pinned maps in {})", pin_dir.display());
        print!("{}", view::table(&rows));
        prev = cur;
        prev_t = now;
        shown += 1;
    }
    Ok(())
}
