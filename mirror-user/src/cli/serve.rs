//! `mirror serve`: its flags, and how they become the settings of the weighting engine
//! ([`EngineArgs::config`]), of the volume and of its endpoints; the lifecycle itself (start
//! order, signals, shutdown order) is [`crate::serve::run`].

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Result;

use super::health::HealthArgs;
use crate::{
    frontend::ublk::UblkArgs,
    health::monitor::NodeHealth,
    replication::{auth::load_secret, rate::SyncRate},
    serve::{Endpoints, Frontend},
    volume::open::{ReplicaSpec, VolumeConfig},
    weights::{
        driver::DriverConfig,
        engine::{EngineConfig, Policy},
        policy::SeedLinear,
    },
};

/// `mirror serve` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Volume name (as the replica servers know it).
    #[arg(long)]
    pub volume: String,
    /// The source replica: local:PATH[:SIZE] or remote:HOST:PORT.
    #[arg(long, value_parser = ReplicaSpec::parse)]
    pub source: ReplicaSpec,
    /// The target replica: local:PATH[:SIZE] or remote:HOST:PORT.
    #[arg(long, value_parser = ReplicaSpec::parse)]
    pub target: ReplicaSpec,
    #[arg(long, env = "MIRROR_SECRET_FILE")]
    pub secret_file: PathBuf,
    /// NBD on TCP (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:10809")]
    pub nbd: SocketAddr,
    /// Also serve NBD on this Unix socket.
    #[arg(long)]
    pub nbd_unix: Option<PathBuf>,
    /// NBD export name [default: the volume's name]; clients may also ask for the default export "".
    #[arg(long)]
    pub export: Option<String>,
    /// Start with the target's read share pinned at this value (0..=100) instead of automatic
    /// weights; `mirror ctl weights auto` hands it to the engine.
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub target_weight: Option<u8>,
    /// Where a local source replica is served to its peer (for resync).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub source_listen: String,
    /// Where a local target replica is served to its peer (for resync).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub target_listen: String,
    /// Connections per remote replica.
    #[arg(long, default_value_t = 4)]
    pub conns: usize,
    /// Start even when a replica cannot be reached and the other's metadata does not show it
    /// as behind: the operator vouches that the missing replica holds no newer writes. The
    /// survivor records every write; the missing replica is resynced when it returns (one
    /// that was written elsewhere meanwhile is refused as split brain, never overwritten).
    /// Not needed when the survivor already knows the other is behind (it was degraded).
    #[arg(long)]
    pub degraded: bool,
    /// Take two never-synced replicas as identical (like `mdadm --assume-clean`, e.g. both
    /// freshly zeroed) instead of the initial full sync from the source. Ignored once the
    /// replicas share a generation.
    #[arg(long)]
    pub assume_clean: bool,
    /// Control socket for `mirror ctl` (root only).
    #[arg(long, default_value = crate::control::DEFAULT_SOCKET)]
    pub ctl_socket: PathBuf,
    /// Serve Prometheus metrics (weights, mode, node health and signals, per-replica
    /// counters) at http://ADDR/metrics; prints `metrics on ADDR` when ready.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// This node's health (used for local replicas).
    #[command(flatten)]
    pub health: HealthArgs,
    /// Also expose the volume as /dev/ublkbN: `ublk` (fail when the kernel has no ublk),
    /// `auto` (ublk when available, else NBD only), `nbd` (NBD only). NBD is always served.
    #[arg(long, value_enum, default_value_t = Frontend::Nbd)]
    pub frontend: Frontend,
    #[command(flatten)]
    pub ublk: UblkArgs,
}

/// The read policy's name on the command line (`--policy`); [`Policy`] is the policy itself.
/// (No doc comments on the variants: clap would list them under the flag, whose help says it.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PolicyName {
    Adaptive,
    Seed,
}

/// The weighting engine's settings.
#[derive(clap::Args, Debug, Clone)]
pub struct EngineArgs {
    /// `adaptive` (default: no reads to the target while the source is healthy; predictive
    /// shift, hysteresis, failover, gradual failback) or `seed` (source health x 0.6 and target
    /// health x 0.4, normalized to 100; factors from --seed-factors).
    #[arg(long, value_enum, default_value_t = PolicyName::Adaptive)]
    pub policy: PolicyName,
    /// Factors of the seed policy: SOURCE,TARGET.
    #[arg(long, default_value = "0.6,0.4")]
    pub seed_factors: String,
    /// Source health at or above which it needs no help.
    #[arg(long, default_value_t = 80.0)]
    pub good_health: f64,
    /// Source health below which reads fail over to the target at once.
    #[arg(long, default_value_t = 30.0)]
    pub critical_health: f64,
    /// No heartbeat answer from the source for this long: failover.
    #[arg(long, default_value = "1s", value_parser = crate::parse_duration)]
    pub heartbeat_timeout: Duration,
    /// After a failover: the source must be in sync and healthy this long before failback.
    #[arg(long, default_value = "10s", value_parser = crate::parse_duration)]
    pub failback_hold: Duration,
    /// Length of the failback ramp from 100% target back to the normal share.
    #[arg(long, default_value = "30s", value_parser = crate::parse_duration)]
    pub ramp: Duration,
    /// Spread reads by health (seed formula) even when the source is healthy.
    #[arg(long)]
    pub balance_reads: bool,
    /// How often the engine takes a sample and heartbeats are sent.
    #[arg(long, default_value = "100ms", value_parser = crate::parse_duration)]
    pub tick: Duration,
}

impl EngineArgs {
    /// The weighting loop's settings, checked; `initial_pin` is `--target-weight`.
    pub fn config(&self, initial_pin: Option<u8>) -> Result<DriverConfig> {
        let policy = match self.policy {
            PolicyName::Seed => {
                let (a, b) = self
                    .seed_factors
                    .split_once(',')
                    .and_then(|(a, b)| Some((a.trim().parse::<f64>().ok()?, b.trim().parse::<f64>().ok()?)))
                    .filter(|(a, b)| *a >= 0.0 && *b >= 0.0 && a + b > 0.0)
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "--seed-factors `{}`: expected two non-negative numbers, e.g. 0.6,0.4",
                            self.seed_factors
                        )
                    })?;
                Policy::Seed(SeedLinear { source_factor: a, target_factor: b })
            }
            PolicyName::Adaptive => Policy::Adaptive,
        };
        anyhow::ensure!(
            (0.0..=100.0).contains(&self.critical_health)
                && self.critical_health < self.good_health
                && self.good_health <= 100.0,
            "need 0 <= --critical-health < --good-health <= 100"
        );
        anyhow::ensure!(self.tick >= Duration::from_millis(10), "--tick must be at least 10ms");
        Ok(DriverConfig {
            engine: EngineConfig {
                policy,
                good: self.good_health,
                critical: self.critical_health,
                heartbeat_timeout: self.heartbeat_timeout,
                failback_hold: self.failback_hold,
                ramp: self.ramp,
                balance_reads: self.balance_reads,
                ..Default::default()
            },
            tick: self.tick,
            initial_pin,
            ..Default::default()
        })
    }
}

impl ServeArgs {
    /// Checks the engine's settings, starts this node's health monitor (scoring the disk under
    /// the first local replica), then serves until SIGINT / SIGTERM.
    pub async fn run(self) -> Result<()> {
        let driver = self.engine.config(self.target_weight)?;
        let local = [&self.source, &self.target].into_iter().find_map(|r| match r {
            ReplicaSpec::Local { path, .. } => Some(path.clone()),
            ReplicaSpec::Remote { .. } => None,
        });
        let node_health = NodeHealth::new();
        self.health.spawn(&node_health, local.as_deref(), Default::default());
        let volume_name = self.volume.clone();
        let volume = VolumeConfig {
            name: self.volume,
            source: self.source,
            target: self.target,
            secret: load_secret(&self.secret_file)?,
            local_listen: [self.source_listen, self.target_listen],
            target_weight: self.target_weight.unwrap_or(0),
            conns: self.conns,
            rate: SyncRate::default(),
            node_health,
            allow_degraded: self.degraded,
            assume_clean: self.assume_clean,
        };
        let endpoints = Endpoints {
            nbd: self.nbd,
            nbd_unix: self.nbd_unix,
            export: self.export.unwrap_or_else(|| volume_name.clone()),
            ctl_socket: self.ctl_socket,
            metrics: self.metrics,
            pin_dir: self.health.pin_dir,
            frontend: self.frontend,
            ublk: self.ublk.options(),
        };
        Ok(crate::serve::run(volume, driver, endpoints, super::shutdown_signal).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        engine: EngineArgs,
    }

    fn engine(argv: &[&str]) -> Result<DriverConfig> {
        Cmd::try_parse_from(std::iter::once("serve").chain(argv.iter().copied())).unwrap().engine.config(None)
    }

    #[test]
    fn the_policy_and_its_factors() {
        assert_eq!(engine(&[]).unwrap().engine.policy, Policy::Adaptive);
        assert_eq!(
            engine(&["--policy", "seed"]).unwrap().engine.policy,
            Policy::Seed(SeedLinear { source_factor: 0.6, target_factor: 0.4 })
        );
        assert_eq!(
            engine(&["--policy", "seed", "--seed-factors", "1, 3"]).unwrap().engine.policy,
            Policy::Seed(SeedLinear { source_factor: 1.0, target_factor: 3.0 })
        );
        // Factors count only for the seed policy.
        assert_eq!(engine(&["--seed-factors", "x"]).unwrap().engine.policy, Policy::Adaptive);
        for bad in ["0.6", "a,b", "-1,2", "0,0"] {
            let e = engine(&["--policy", "seed", &format!("--seed-factors={bad}")]).unwrap_err().to_string();
            assert!(e.contains("--seed-factors") && e.contains(bad), "{e}");
        }
        assert!(Cmd::try_parse_from(["serve", "--policy", "random"]).is_err());
    }

    #[test]
    fn thresholds_and_tick_are_checked() {
        let c = engine(&["--good-health", "90", "--critical-health", "20", "--tick", "50ms"]).unwrap();
        assert_eq!((c.engine.good, c.engine.critical, c.tick), (90.0, 20.0, Duration::from_millis(50)));
        for bad in [&["--critical-health", "80"][..], &["--good-health", "101"], &["--critical-health=-1"]] {
            let e = engine(bad).unwrap_err().to_string();
            assert!(e.contains("--critical-health < --good-health"), "{bad:?}: {e}");
        }
        assert!(engine(&["--tick", "5ms"]).unwrap_err().to_string().contains("--tick"));
    }
}
