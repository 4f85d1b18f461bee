//! The node health monitor's flags, shared by `mirror replica` and `mirror serve` (the monitor
//! scores this node for heartbeat replies and for local replicas).

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use crate::{
    config::MonitorFile,
    health::{
        monitor::{self, MonitorConfig, NodeHealth},
        probe::ProbeSpec,
        score::ScoreConfig,
    },
    telemetry::blk,
};

/// The node's health monitor (sent to the router in every heartbeat reply). The flags that the
/// config file's `[monitor]` table can set too have no clap default (it is in the help text and
/// applied after the file, [`HealthArgs::settings`]).
#[derive(clap::Args, Debug, Clone)]
pub struct HealthArgs {
    /// How often the node's health is scored [default: 250ms].
    #[arg(long, value_parser = crate::parse_duration)]
    pub health_interval: Option<Duration>,
    /// HTTP GET probe of an application endpoint: URL[,timeout=2s][,status=200]. Repeatable.
    #[arg(long = "probe", value_parser = ProbeSpec::parse)]
    pub probes: Vec<ProbeSpec>,
    /// The disk whose latency counts in the score [default: the device under the first volume].
    #[arg(long)]
    pub health_device: Option<PathBuf>,
    /// Where the node daemon (`mirror daemon`) pinned its eBPF maps; without them the monitor
    /// reads /proc (and says so once) [default: /sys/fs/bpf/mirror].
    #[arg(long)]
    pub pin_dir: Option<PathBuf>,
}

/// How often the health is scored when neither the flag nor the file says.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_millis(250);

/// The health monitor's settings: the flags over the file's `[monitor]` table over the defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct MonitorSettings {
    pub interval: Duration,
    /// The file's probes, then the flags'.
    pub probes: Vec<ProbeSpec>,
    pub device: Option<PathBuf>,
    pub pin_dir: PathBuf,
}

impl HealthArgs {
    /// Lays the flags over `file`, and both over the defaults.
    pub fn settings(&self, file: &MonitorFile) -> MonitorSettings {
        MonitorSettings {
            interval: self.health_interval.or(file.interval).unwrap_or(DEFAULT_HEALTH_INTERVAL),
            probes: file.probe.iter().chain(&self.probes).cloned().collect(),
            device: self.health_device.clone().or(file.device.clone()),
            pin_dir: self
                .pin_dir
                .clone()
                .or(file.pin_dir.clone())
                .unwrap_or_else(|| mirror_common::PIN_DIR.into()),
        }
    }
}

impl MonitorSettings {
    /// Starts the monitor publishing into `health` on the current tokio runtime; `volume` is
    /// the path whose device is scored unless a device is set.
    pub fn spawn(&self, health: &Arc<NodeHealth>, volume: Option<&Path>, score: ScoreConfig) {
        let dev_path = self.device.as_deref().or(volume);
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
                interval: self.interval,
                replica: volume.map(Path::to_path_buf),
                pin_dir: self.pin_dir.clone(),
                score: ScoreConfig { device, ..score },
                probes: self.probes.clone(),
            },
            health.clone(),
        );
    }
}
