//! The node health monitor's flags, shared by `mirror replica` and `mirror serve` (the monitor
//! scores this node for heartbeat replies and for local replicas).

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use crate::{
    health::{
        monitor::{self, MonitorConfig, NodeHealth},
        probe::ProbeSpec,
        score::ScoreConfig,
    },
    telemetry::blk,
};

/// The node's health monitor (sent to the router in every heartbeat reply).
#[derive(clap::Args, Debug, Clone)]
pub struct HealthArgs {
    /// How often the node's health is scored.
    #[arg(long, default_value = "250ms", value_parser = crate::parse_duration)]
    pub health_interval: Duration,
    /// HTTP GET probe of an application endpoint: URL[,timeout=2s][,status=200]. Repeatable.
    #[arg(long = "probe", value_parser = ProbeSpec::parse)]
    pub probes: Vec<ProbeSpec>,
    /// The disk whose latency counts in the score [default: the device under the first volume].
    #[arg(long)]
    pub health_device: Option<PathBuf>,
    /// Where the node daemon (`mirror daemon`) pinned its eBPF maps; without them the monitor
    /// reads /proc (and says so once).
    #[arg(long, default_value = mirror_common::PIN_DIR)]
    pub pin_dir: PathBuf,
}

impl HealthArgs {
    /// Starts the monitor publishing into `health` on the current tokio runtime; `volume` is
    /// the path whose device is scored unless --health-device.
    pub fn spawn(&self, health: &Arc<NodeHealth>, volume: Option<&Path>, score: ScoreConfig) {
        let dev_path = self.health_device.as_deref().or(volume);
        let device = dev_path.and_then(|p| match blk::kdev_of_path(p) {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::warn!(path = %p.display(), "health: cannot tell the disk under it ({e}); scoring the busiest disk");
                None
            }
        });
        if let Some(d) = device {
            tracing::info!(device = %blk::dev_name(d), "health: disk latency from this device");
        }
        monitor::spawn(
            MonitorConfig {
                interval: self.health_interval,
                pin_dir: self.pin_dir.clone(),
                score: ScoreConfig { device, ..score },
                probes: self.probes.clone(),
            },
            health.clone(),
        );
    }
}
