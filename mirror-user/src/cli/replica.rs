//! `mirror replica`: a replica server for the volumes of this node, with the node's health
//! monitor. Its settings are the flags laid over the config file (`--config`, see
//! [`crate::config`]), and the file over the defaults ([`ReplicaArgs::settings`]).

use std::path::PathBuf;

use anyhow::Result;

use super::{
    exit::CliError,
    health::{HealthArgs, MonitorSettings},
};
use crate::{
    config::{ReplicaFile, Size},
    health::{monitor::NodeHealth, score::ScoreConfig},
    replication::{
        auth::load_secret,
        rate::SyncRate,
        server::{Server, ServerConfig},
    },
    storage::VolumeSpec,
};

/// Where a replica server listens when neither the flag nor the file says.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7700";
/// Bitmap grain when neither the flag nor the file says.
pub const DEFAULT_BLOCK_SIZE: u32 = 4096;

/// `mirror replica` flags. Those that the config file can set too have no clap default (the
/// default is in the help text and applied after the file).
#[derive(clap::Args, Debug, Clone)]
pub struct ReplicaArgs {
    /// TOML config file (e.g. /etc/mirror/replica.toml, see mirror(8) FILES); flags given on the
    /// command line override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:7700].
    #[arg(long)]
    pub listen: Option<String>,
    /// A volume to serve, NAME=PATH[:SIZE]; the file is created sparse with SIZE when missing.
    /// Metadata (generations, dirty bitmap) lives in PATH.meta, or /var/lib/mirror/DEVICE.meta for a block device. Repeatable.
    #[arg(long = "volume", value_parser = VolumeSpec::parse)]
    pub volumes: Vec<VolumeSpec>,
    /// File holding the shared secret (>= 16 bytes) peers authenticate with.
    #[arg(long, env = "MIRROR_SECRET_FILE")]
    pub secret_file: Option<PathBuf>,
    /// Sync rate while the volume serves application I/O, bytes/s [default: 16M].
    #[arg(long, value_parser = crate::parse_size)]
    pub sync_min_rate: Option<u64>,
    /// Sync rate when the volume is idle, bytes/s, 0 = unlimited [default: 0].
    #[arg(long, value_parser = crate::parse_size)]
    pub sync_max_rate: Option<u64>,
    /// Bitmap grain in bytes, a power of two in 512..=65536 [default: 4096].
    #[arg(long)]
    pub block_size: Option<u32>,
    /// Aligned I/O on the volumes with O_DIRECT: bypasses this node's page cache, so the
    /// disk's own latency shows on the data path and in the health score.
    #[arg(long)]
    pub direct_io: bool,
    #[command(flatten)]
    pub health: HealthArgs,
    #[command(flatten)]
    pub transport: super::transport::TransportArgs,
    /// With --tls: accept only clients whose certificate names this node (repeatable) [default:
    /// any node of the CA].
    #[arg(long = "tls-allow", value_name = "NODE")]
    pub tls_allow: Vec<String>,
}

/// What a replica server runs with: the flags over the config file over the defaults.
#[derive(Debug, Clone)]
pub struct ReplicaSettings {
    pub listen: String,
    /// The file's volumes, then the flags' (all with the block size and `--direct-io`).
    pub volumes: Vec<VolumeSpec>,
    pub secret_file: PathBuf,
    pub rate: SyncRate,
    /// How the node's health is scored (the file's `[health]` table).
    pub score: ScoreConfig,
    /// The health monitor (the flags over the file's `[monitor]` table).
    pub monitor: MonitorSettings,
    /// The replication link: `--tls` / `--insecure-plaintext` over the file's keys.
    pub transport: super::transport::TransportArgs,
    /// With TLS: the client node names accepted (`--tls-allow` over `tls_allow`).
    pub tls_allow: Vec<String>,
}

impl ReplicaArgs {
    /// Lays the flags over `file`, and both over the defaults.
    pub fn settings(&self, file: &ReplicaFile) -> Result<ReplicaSettings> {
        let block_size = self.block_size.or(file.block_size).unwrap_or(DEFAULT_BLOCK_SIZE);
        let mut volumes = file.volume_specs(block_size);
        volumes.extend(self.volumes.iter().map(|v| VolumeSpec { block_size, ..v.clone() }));
        for v in &mut volumes {
            v.direct_io |= self.direct_io;
        }
        anyhow::ensure!(
            !volumes.is_empty(),
            "no volume to serve: give --volume NAME=PATH[:SIZE] or [[volume]] in --config"
        );
        let secret_file = self.secret_file.clone().or(file.secret_file.clone()).ok_or_else(|| {
            anyhow::anyhow!("a shared secret is required: --secret-file FILE (or secret_file in --config); create one with `head -c 32 /dev/urandom | base64 > FILE`")
        })?;
        let default = SyncRate::default();
        let rate = |flag: Option<u64>, f: &Option<Size>, default: u64| -> Result<u64> {
            Ok(match (flag, f) {
                (Some(v), _) => v,
                (None, Some(s)) => s.bytes().map_err(anyhow::Error::msg)?,
                (None, None) => default,
            })
        };
        let transport = self.transport.over_file(file.tls.as_deref(), file.insecure_plaintext);
        let tls_allow =
            if self.tls_allow.is_empty() { file.tls_allow.clone() } else { self.tls_allow.clone() };
        anyhow::ensure!(
            tls_allow.is_empty() || transport.tls.is_some(),
            "--tls-allow / tls_allow need TLS: give --tls DIR or `tls` in --config"
        );
        Ok(ReplicaSettings {
            transport,
            tls_allow,
            listen: self.listen.clone().or(file.listen.clone()).unwrap_or_else(|| DEFAULT_LISTEN.into()),
            volumes,
            secret_file,
            rate: SyncRate {
                min_bps: rate(self.sync_min_rate, &file.sync_min_rate, default.min_bps)?,
                max_bps: rate(self.sync_max_rate, &file.sync_max_rate, default.max_bps)?,
            },
            score: file.health.clone().unwrap_or_default(),
            monitor: self.health.settings(&file.monitor),
        })
    }

    /// Serves until SIGINT / SIGTERM, then flushes the volumes. Prints `listening on ADDR` when
    /// ready.
    pub fn run(self, rt: &tokio::runtime::Runtime) -> Result<()> {
        let file = match &self.config {
            Some(p) => ReplicaFile::load(p).map_err(CliError::usage)?,
            None => ReplicaFile::default(),
        };
        let s = self.settings(&file).map_err(CliError::usage)?;
        let cfg = ServerConfig {
            listen: s.listen,
            volumes: s.volumes,
            secret: load_secret(&s.secret_file)?,
            rate: s.rate,
            health: NodeHealth::new(),
            transport: s.transport.node(&s.tls_allow).map_err(CliError::usage)?,
        };
        let node_health = cfg.health.clone();
        let first_volume = cfg.volumes.first().map(|v| v.path.clone());
        let server = Server::start(cfg)?;
        // After the start: a volume file created by it now exists to tell its disk.
        let _rt_guard = rt.enter();
        s.monitor.spawn(&node_health, first_volume.as_deref(), s.score);
        let stop = super::shutdown_signal();
        crate::announce(format_args!("listening on {}", server.addr));
        rt.block_on(stop);
        tracing::info!("signal received: flushing volumes and exiting");
        server.shutdown();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::path::Path;

    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        args: ReplicaArgs,
    }

    fn args(argv: &[&str]) -> ReplicaArgs {
        Cmd::try_parse_from(std::iter::once("replica").chain(argv.iter().copied())).unwrap().args
    }

    const FILE: &str = r#"
        listen = "0.0.0.0:7700"
        secret_file = "/etc/mirror/secret"
        sync_min_rate = "8M"
        block_size = 512
        [[volume]]
        name = "vol0"
        path = "/var/lib/mirror/vol0.img"
        [health]
        disk_ratio_good = 3.0
    "#;

    #[test]
    fn the_file_fills_in_what_the_flags_leave_out() {
        let file = ReplicaFile::parse(FILE).unwrap();
        let s = args(&[]).settings(&file).unwrap();
        assert_eq!(s.listen, "0.0.0.0:7700");
        assert_eq!(s.secret_file, PathBuf::from("/etc/mirror/secret"));
        assert_eq!(s.rate, SyncRate { min_bps: 8 << 20, max_bps: 0 });
        assert_eq!(s.volumes.len(), 1);
        assert_eq!((s.volumes[0].name.as_str(), s.volumes[0].block_size), ("vol0", 512));
        assert!(!s.volumes[0].direct_io);
        assert_eq!(s.score.disk_ratio_good, 3.0);
    }

    #[test]
    fn flags_override_the_file() {
        let file = ReplicaFile::parse(FILE).unwrap();
        let s = args(&[
            "--listen",
            "127.0.0.1:7701",
            "--secret-file",
            "/tmp/s",
            "--sync-min-rate",
            "1M",
            "--sync-max-rate",
            "64M",
            "--block-size",
            "4096",
            "--direct-io",
            "--volume",
            "vol1=/tmp/vol1.img:1M",
        ])
        .settings(&file)
        .unwrap();
        assert_eq!(s.listen, "127.0.0.1:7701");
        assert_eq!(s.secret_file, PathBuf::from("/tmp/s"));
        assert_eq!(s.rate, SyncRate { min_bps: 1 << 20, max_bps: 64 << 20 });
        let names: Vec<_> = s.volumes.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["vol0", "vol1"], "the file's volumes, then the flags'");
        assert!(s.volumes.iter().all(|v| v.block_size == 4096 && v.direct_io));
        assert_eq!(s.volumes[1].size, Some(1 << 20));
    }

    #[test]
    fn tls_and_its_allowed_nodes_come_from_the_file_unless_flags_say_otherwise() {
        let file =
            ReplicaFile::parse(&format!("tls = \"/etc/mirror/tls\"\ntls_allow = [\"node-a\"]\n{FILE}"))
                .unwrap();
        // Not from the environment: MIRROR_TLS_DIR may be set where the tests run.
        let no_env = |argv: &[&str]| {
            let mut a = args(argv);
            if !argv.contains(&"--tls") {
                a.transport.tls = None;
            }
            a
        };
        let s = no_env(&[]).settings(&file).unwrap();
        assert_eq!(s.transport.tls.as_deref(), Some(Path::new("/etc/mirror/tls")));
        assert!(s.transport.from_file);
        assert_eq!(s.tls_allow, ["node-a"]);
        let s = no_env(&["--tls", "/tmp/t", "--tls-allow", "node-b"]).settings(&file).unwrap();
        assert_eq!(s.transport.tls.as_deref(), Some(Path::new("/tmp/t")));
        assert_eq!(s.tls_allow, ["node-b"]);
        // --insecure-plaintext turns the file's TLS off; its allowed nodes then make no sense.
        let e = no_env(&["--insecure-plaintext"]).settings(&file).unwrap_err();
        assert!(e.to_string().contains("need TLS"), "{e}");
        let e = no_env(&["--tls-allow", "node-b"]).settings(&ReplicaFile::parse(FILE).unwrap()).unwrap_err();
        assert!(e.to_string().contains("need TLS"), "{e}");
    }

    #[test]
    fn defaults_apply_without_a_file_and_what_is_missing_is_named() {
        let s = args(&["--volume", "v=/tmp/v.img", "--secret-file", "/tmp/s"])
            .settings(&ReplicaFile::default())
            .unwrap();
        assert_eq!(s.listen, DEFAULT_LISTEN);
        assert_eq!(s.rate, SyncRate { min_bps: 16 << 20, max_bps: 0 });
        assert_eq!(s.volumes[0].block_size, DEFAULT_BLOCK_SIZE);
        let e = args(&["--secret-file", "/tmp/s"]).settings(&ReplicaFile::default()).unwrap_err();
        assert!(e.to_string().contains("no volume to serve"), "{e}");
        // (Not from the environment either: MIRROR_SECRET_FILE may be set where the tests run.)
        let no_secret = ReplicaArgs { secret_file: None, ..args(&["--volume", "v=/tmp/v.img"]) };
        let e = no_secret.settings(&ReplicaFile::default()).unwrap_err();
        assert!(e.to_string().contains("--secret-file"), "{e}");
    }
}
