//! `mirror top`: a running daemon's block latency figures, read from its pinned maps.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::telemetry::{bpf, collector, view};

/// `mirror top` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct TopArgs {
    /// bpffs directory where the daemon pinned its maps.
    #[arg(long, default_value = mirror_common::PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Interval between two readings.
    #[arg(long, default_value = "1s", value_parser = crate::parse_duration)]
    pub interval: Duration,
    /// Number of intervals to show (default: until interrupted).
    #[arg(long)]
    pub count: Option<u64>,
    /// One JSON object per interval (a line each) instead of the table.
    #[arg(long)]
    pub json: bool,
}

impl TopArgs {
    /// Prints `--count` intervals (or until interrupted).
    pub async fn run(self) -> Result<()> {
        let TopArgs { pin_dir, interval, count, json } = self;
        let mut prev = bpf::read_pinned_all(&pin_dir).context("reading the daemon's pinned maps")?;
        let mut prev_t = Instant::now();
        let mut shown = 0u64;
        while count.is_none_or(|c| shown < c) {
            tokio::time::sleep(interval).await;
            let cur = bpf::read_pinned_all(&pin_dir)?;
            let now = Instant::now();
            let s = collector::sample("ebpf", &prev, &cur, now.duration_since(prev_t).as_secs_f64());
            if json {
                crate::outln!("{}", serde_json::to_string(&s)?);
            } else {
                crate::outln!("--- node telemetry (pinned maps in {})", pin_dir.display());
                crate::out!("{}", view::sample(&s));
            }
            prev = cur;
            prev_t = now;
            shown += 1;
        }
        Ok(())
    }
}
