//! `mirror serve`: its flags, and how they become the settings of the weighting engine
//! ([`EngineArgs::config`]), of the volume and of its endpoints; the lifecycle itself (start
//! order, signals, shutdown order) is [`crate::serve::run`].

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Result;

use super::{
    exit::CliError,
    health::{HealthArgs, MonitorSettings},
};
use crate::{
    config::{EngineFile, ServeFile},
    frontend::ublk::UblkArgs,
    health::monitor::NodeHealth,
    health::score::ScoreConfig,
    replication::{auth::load_secret, rate::SyncRate},
    serve::{Endpoints, Frontend},
    volume::{
        deadline::DeadlineConfig,
        open::{ReplicaSpec, VolumeConfig},
    },
    weights::{
        driver::DriverConfig,
        engine::{EngineConfig, Policy},
        policy::SeedLinear,
    },
};

/// `mirror serve` flags. Those that the config file (`--config`) can set too have no clap
/// default: the default is in the help text and applied after the file ([`ServeArgs::settings`]).
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// TOML config file (e.g. /etc/mirror/volumes/NAME.toml): its keys are these flags' names
    /// with `_` for `-`, the engine's in an [engine] table, the health monitor's in [monitor];
    /// flags given on the command line override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Volume name (as the replica servers know it). Required, here or in --config.
    #[arg(long)]
    pub volume: Option<String>,
    /// The source replica: local:PATH[:SIZE] or remote:HOST:PORT. Required, here or in --config.
    #[arg(long, value_parser = ReplicaSpec::parse)]
    pub source: Option<ReplicaSpec>,
    /// The target replica: local:PATH[:SIZE] or remote:HOST:PORT. Required, here or in --config.
    #[arg(long, value_parser = ReplicaSpec::parse)]
    pub target: Option<ReplicaSpec>,
    /// File holding the shared secret (>= 16 bytes) the replicas authenticate with. Required,
    /// here, in MIRROR_SECRET_FILE or in --config.
    #[arg(long, env = "MIRROR_SECRET_FILE")]
    pub secret_file: Option<PathBuf>,
    /// NBD on TCP (port 0 picks a free one) [default: 127.0.0.1:10809].
    #[arg(long)]
    pub nbd: Option<SocketAddr>,
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
    /// Where a local source replica is served to its peer (for resync) [default: 127.0.0.1:0].
    #[arg(long)]
    pub source_listen: Option<String>,
    /// Where a local target replica is served to its peer (for resync) [default: 127.0.0.1:0].
    #[arg(long)]
    pub target_listen: Option<String>,
    /// Connections per remote replica [default: 4].
    #[arg(long)]
    pub conns: Option<usize>,
    /// Shortest time a write waits for a replica lagging behind the other, once the other has
    /// completed it; past its deadline (mean + 4 deviations of its write latency, within floor
    /// and cap) the laggard is failed and resynced later [default: 250ms].
    #[arg(long, value_parser = crate::parse_duration)]
    pub write_deadline_floor: Option<Duration>,
    /// Longest such wait (also before any latency is known) [default: 750ms].
    #[arg(long, value_parser = crate::parse_duration)]
    pub write_deadline_cap: Option<Duration>,
    /// A write neither replica completes in this long fails (both slow: no deadline runs until
    /// one answers) [default: 30s].
    #[arg(long, value_parser = crate::parse_duration)]
    pub write_timeout: Option<Duration>,
    /// The most 4 MiB extents kept with write intent (DRBD's al-extents): a router that dies
    /// costs the next start a digest pass over about these (65536: 256 GiB). Writes spread over
    /// more extents evict the least recently written (at most every 2 s), each eviction a flush
    /// of both replicas; a larger number saves flushes and costs a longer pass after a crash
    /// [default: 65536].
    #[arg(long)]
    pub al_extents: Option<usize>,
    /// Start even when a replica cannot be reached and the other's metadata does not show it
    /// as behind: the operator vouches that the missing replica holds no newer writes. The
    /// survivor records every write; the missing replica is resynced when it returns (one
    /// that was written elsewhere meanwhile is refused as split brain, never overwritten).
    /// Not needed when the survivor already knows the other is behind (it was degraded).
    #[arg(long)]
    pub degraded: bool,
    /// Where the volume's lease lives: `embedded` (at the two replicas, the default),
    /// `etcd://HOST:PORT[,HOST:PORT...]` (an etcd cluster: needed for `--standby`), or `none` (no
    /// lease and no fencing: only for a router that is certainly alone).
    #[arg(long, default_value = "embedded")]
    pub lease_store: String,
    /// Stand by for the lease (etcd): wait, announced, until the active router's lease expires
    /// (its node died, or it stopped renewing) or is handed over, then take it and serve.
    #[arg(long)]
    pub standby: bool,
    /// The lease's TTL: a router that cannot renew for this long stops acknowledging writes, and
    /// another may take over after it [default: 2s].
    #[arg(long, value_parser = crate::parse_duration)]
    pub lease_ttl: Option<std::time::Duration>,
    /// This router's name in the lease (`NODE`; a random instance is appended) [default: the
    /// host name].
    #[arg(long)]
    pub lease_holder: Option<String>,
    /// Take the lease with one replica unreachable (implies `--degraded`). You vouch that no
    /// other router is running: if one is, behind a partition, writes it acknowledged to the
    /// replica you cannot reach are not on the one you keep (see docs/leases.md). Never
    /// overrides a live lease.
    #[arg(long)]
    pub force: bool,
    /// Take two never-synced replicas as identical (like `mdadm --assume-clean`, e.g. both
    /// freshly zeroed) instead of the initial full sync from the source. Ignored once the
    /// replicas share a generation.
    #[arg(long)]
    pub assume_clean: bool,
    /// Control socket for `mirror ctl` (root only) [default: /run/mirror/ctl.sock].
    #[arg(long)]
    pub ctl_socket: Option<PathBuf>,
    /// Serve Prometheus metrics (weights, mode, node health and signals, per-replica
    /// counters, sync progress) at http://ADDR/metrics; prints `metrics on ADDR` when ready.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// This node's health (used for local replicas).
    #[command(flatten)]
    pub health: HealthArgs,
    /// Also expose the volume as /dev/ublkbN: `ublk` (fail when the kernel has no ublk),
    /// `auto` (ublk when available, else NBD only), `nbd` (NBD only). NBD is always served
    /// [default: nbd].
    #[arg(long, value_enum)]
    pub frontend: Option<Frontend>,
    #[command(flatten)]
    pub ublk: UblkArgs,
    /// The replication links (to remote replicas, and the local replicas' servers).
    #[command(flatten)]
    pub transport: super::transport::TransportArgs,
    /// TLS required on the NBD listeners (NBD_OPT_STARTTLS, X.509): the node's credentials
    /// directory (server-cert.pem is presented to applications; qemu's tls-creds-x509 layout).
    #[arg(long, value_name = "DIR")]
    pub nbd_tls: Option<PathBuf>,
    /// With --nbd-tls (or `nbd_tls` in --config): NBD clients must present a certificate of the
    /// directory's CA.
    #[arg(long)]
    pub nbd_tls_verify_peer: bool,
    /// Serve NBD without TLS on an address that is not loopback (anyone who reaches it reads
    /// and writes the volume).
    #[arg(long, conflicts_with = "nbd_tls")]
    pub nbd_insecure_plaintext: bool,
}

/// Defaults of `mirror serve` that neither a flag nor the file gave.
pub const DEFAULT_NBD: &str = "127.0.0.1:10809";
/// Where local replicas are served to their peer by default (a free loopback port).
pub const DEFAULT_LOCAL_LISTEN: &str = "127.0.0.1:0";
/// Connections per remote replica by default.
pub const DEFAULT_CONNS: usize = 4;

/// What `mirror serve` runs with: the flags over the config file over the defaults.
#[derive(Debug, Clone)]
pub struct ServeSettings {
    pub volume: String,
    pub source: ReplicaSpec,
    pub target: ReplicaSpec,
    pub secret_file: PathBuf,
    /// Where local source and target replicas are served to their peer.
    pub local_listen: [String; 2],
    pub conns: usize,
    /// When a write stops waiting for a lagging replica.
    pub write_deadline: DeadlineConfig,
    /// The bound of the activity log's hot set (`--al-extents`).
    pub al_extents: usize,
    pub driver: DriverConfig,
    pub endpoints: Endpoints,
    pub monitor: MonitorSettings,
    /// How this node's health is scored (the file's `[health]` table).
    pub score: ScoreConfig,
    /// The replication link: `--tls` / `--insecure-plaintext` over the file's keys.
    pub transport: super::transport::TransportArgs,
    /// NBD STARTTLS: the flags over the file's `nbd_tls*` keys.
    pub nbd_tls: NbdTlsSettings,
}

/// NBD's TLS settings: `--nbd-tls` (or `nbd_tls`), `--nbd-tls-verify-peer`,
/// `--nbd-insecure-plaintext`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NbdTlsSettings {
    pub dir: Option<PathBuf>,
    pub verify_peer: bool,
    pub insecure_plaintext: bool,
    /// `dir` came from the config file (errors name the key).
    pub from_file: bool,
}

/// The read policy's name on the command line (`--policy`); [`Policy`] is the policy itself.
/// (No doc comments on the variants: clap would list them under the flag, whose help says it.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PolicyName {
    Adaptive,
    Seed,
}

/// The weighting engine's settings. Each can come from the config file's `[engine]` table too,
/// so none has a clap default (the default is in the help text, applied in [`Self::config`]).
#[derive(clap::Args, Debug, Clone)]
pub struct EngineArgs {
    /// `adaptive` (default: no reads to the target while the source is healthy; predictive
    /// shift, hysteresis, failover, gradual failback) or `seed` (source health x 0.6 and target
    /// health x 0.4, normalized to 100; factors from --seed-factors).
    #[arg(long, value_enum)]
    pub policy: Option<PolicyName>,
    /// Factors of the seed policy: SOURCE,TARGET [default: 0.6,0.4].
    #[arg(long)]
    pub seed_factors: Option<String>,
    /// Source health at or above which it needs no help [default: 80].
    #[arg(long)]
    pub good_health: Option<f64>,
    /// Source health below which reads fail over to the target at once [default: 30].
    #[arg(long)]
    pub critical_health: Option<f64>,
    /// No heartbeat answer from the source for this long: failover [default: 1s].
    #[arg(long, value_parser = crate::parse_duration)]
    pub heartbeat_timeout: Option<Duration>,
    /// After a failover: the source must be in sync and healthy this long before failback
    /// [default: 10s].
    #[arg(long, value_parser = crate::parse_duration)]
    pub failback_hold: Option<Duration>,
    /// Length of the failback ramp from 100% target back to the normal share [default: 30s].
    #[arg(long, value_parser = crate::parse_duration)]
    pub ramp: Option<Duration>,
    /// Spread reads by health (seed formula) even when the source is healthy.
    #[arg(long)]
    pub balance_reads: bool,
    /// How often the engine takes a sample and heartbeats are sent [default: 100ms].
    #[arg(long, value_parser = crate::parse_duration)]
    pub tick: Option<Duration>,
}

/// The engine's defaults when neither a flag nor the file says (the flags' help repeats them).
mod engine_default {
    use std::time::Duration;
    pub(super) const SEED_FACTORS: &str = "0.6,0.4";
    pub(super) const GOOD_HEALTH: f64 = 80.0;
    pub(super) const CRITICAL_HEALTH: f64 = 30.0;
    pub(super) const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(1);
    pub(super) const FAILBACK_HOLD: Duration = Duration::from_secs(10);
    pub(super) const RAMP: Duration = Duration::from_secs(30);
    pub(super) const TICK: Duration = Duration::from_millis(100);
}

impl EngineArgs {
    /// The weighting loop's settings, the flags over the file's `[engine]` table, checked;
    /// `initial_pin` is `--target-weight`. An error names the flag (and so the key).
    pub fn config(&self, file: &EngineFile, initial_pin: Option<u8>) -> Result<DriverConfig> {
        use engine_default as d;
        let seed_factors =
            self.seed_factors.as_deref().or(file.seed_factors.as_deref()).unwrap_or(d::SEED_FACTORS);
        let policy = match self.policy.or(file.policy).unwrap_or(PolicyName::Adaptive) {
            PolicyName::Seed => {
                let (a, b) = seed_factors
                    .split_once(',')
                    .and_then(|(a, b)| Some((a.trim().parse::<f64>().ok()?, b.trim().parse::<f64>().ok()?)))
                    .filter(|(a, b)| *a >= 0.0 && *b >= 0.0 && a + b > 0.0)
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "--seed-factors `{seed_factors}`: expected two non-negative numbers, e.g. 0.6,0.4"
                        )
                    })?;
                Policy::Seed(SeedLinear { source_factor: a, target_factor: b })
            }
            PolicyName::Adaptive => Policy::Adaptive,
        };
        let good = self.good_health.or(file.good_health).unwrap_or(d::GOOD_HEALTH);
        let critical = self.critical_health.or(file.critical_health).unwrap_or(d::CRITICAL_HEALTH);
        anyhow::ensure!(
            (0.0..=100.0).contains(&critical) && critical < good && good <= 100.0,
            "need 0 <= --critical-health < --good-health <= 100"
        );
        let tick = self.tick.or(file.tick).unwrap_or(d::TICK);
        anyhow::ensure!(tick >= Duration::from_millis(10), "--tick must be at least 10ms");
        Ok(DriverConfig {
            engine: EngineConfig {
                policy,
                good,
                critical,
                heartbeat_timeout: self
                    .heartbeat_timeout
                    .or(file.heartbeat_timeout)
                    .unwrap_or(d::HEARTBEAT_TIMEOUT),
                failback_hold: self.failback_hold.or(file.failback_hold).unwrap_or(d::FAILBACK_HOLD),
                ramp: self.ramp.or(file.ramp).unwrap_or(d::RAMP),
                balance_reads: self.balance_reads || file.balance_reads,
                ..Default::default()
            },
            tick,
            initial_pin,
            ..Default::default()
        })
    }
}

impl ServeArgs {
    /// Lays the flags over `file`, and both over the defaults; checks the engine's settings and
    /// names what is missing.
    pub fn settings(&self, file: &ServeFile) -> Result<ServeSettings> {
        let missing = |flag: &str, key: &str| {
            anyhow::anyhow!("{flag} is required: give it on the command line or `{key}` in --config")
        };
        let volume =
            self.volume.clone().or(file.volume.clone()).ok_or_else(|| missing("--volume NAME", "volume"))?;
        let source =
            self.source.clone().or(file.source.clone()).ok_or_else(|| missing("--source SPEC", "source"))?;
        let target =
            self.target.clone().or(file.target.clone()).ok_or_else(|| missing("--target SPEC", "target"))?;
        let secret_file = self.secret_file.clone().or(file.secret_file.clone()).ok_or_else(|| {
            anyhow::anyhow!("a shared secret is required: --secret-file FILE (or secret_file in --config); create one with `head -c 32 /dev/urandom | base64 > FILE`")
        })?;
        let conns = self.conns.or(file.conns).unwrap_or(DEFAULT_CONNS);
        anyhow::ensure!(conns >= 1, "--conns: at least 1 connection per remote replica");
        let d = DeadlineConfig::default();
        let write_deadline = DeadlineConfig {
            floor: self.write_deadline_floor.or(file.write_deadline_floor).unwrap_or(d.floor),
            cap: self.write_deadline_cap.or(file.write_deadline_cap).unwrap_or(d.cap),
            hard: self.write_timeout.or(file.write_timeout).unwrap_or(d.hard),
            ..d
        };
        write_deadline.validate()?;
        let al_extents =
            self.al_extents.or(file.al_extents).unwrap_or(crate::volume::activity::DEFAULT_AL_EXTENTS);
        anyhow::ensure!(al_extents >= 8, "--al-extents: at least 8 extents (given {al_extents})");
        let listen = |flag: &Option<String>, key: &Option<String>| {
            flag.clone().or(key.clone()).unwrap_or_else(|| DEFAULT_LOCAL_LISTEN.into())
        };
        let monitor = self.health.settings(&file.monitor);
        let endpoints = Endpoints {
            nbd: self.nbd.or(file.nbd).unwrap_or_else(|| DEFAULT_NBD.parse().expect("a socket address")),
            nbd_unix: self.nbd_unix.clone().or(file.nbd_unix.clone()),
            export: self.export.clone().or(file.export.clone()).unwrap_or_else(|| volume.clone()),
            ctl_socket: self
                .ctl_socket
                .clone()
                .or(file.ctl_socket.clone())
                .unwrap_or_else(|| crate::control::DEFAULT_SOCKET.into()),
            metrics: self.metrics.or(file.metrics),
            pin_dir: monitor.pin_dir.clone(),
            frontend: self.frontend.or(file.frontend).unwrap_or(Frontend::Nbd),
            ublk: self.ublk.options(),
            nbd_tls: None,
        };
        // As for --tls: a flag replaces the file's choice, --nbd-insecure-plaintext included.
        let nbd_tls = if self.nbd_tls.is_some() || self.nbd_insecure_plaintext {
            NbdTlsSettings {
                dir: self.nbd_tls.clone(),
                verify_peer: self.nbd_tls_verify_peer,
                insecure_plaintext: self.nbd_insecure_plaintext,
                from_file: false,
            }
        } else {
            NbdTlsSettings {
                dir: file.nbd_tls.clone(),
                verify_peer: file.nbd_tls_verify_peer || self.nbd_tls_verify_peer,
                insecure_plaintext: file.nbd_insecure_plaintext,
                from_file: file.nbd_tls.is_some(),
            }
        };
        anyhow::ensure!(
            !nbd_tls.verify_peer || nbd_tls.dir.is_some(),
            "--nbd-tls-verify-peer / nbd_tls_verify_peer need --nbd-tls DIR or `nbd_tls` in --config"
        );
        Ok(ServeSettings {
            transport: self.transport.over_file(file.tls.as_deref(), file.insecure_plaintext),
            nbd_tls,
            driver: self.engine.config(&file.engine, self.target_weight)?,
            volume,
            source,
            target,
            secret_file,
            local_listen: [
                listen(&self.source_listen, &file.source_listen),
                listen(&self.target_listen, &file.target_listen),
            ],
            conns,
            write_deadline,
            al_extents,
            endpoints,
            monitor,
            score: file.health.clone().unwrap_or_default(),
        })
    }

    /// The NBD listeners' TLS server, from `--nbd-tls` / `nbd_tls` and their verify-peer.
    fn nbd_tls(t: &NbdTlsSettings) -> Result<Option<crate::tls::TlsServer>> {
        use crate::tls::{ClientAuth, PeerPolicy, TlsServer};
        let Some(dir) = &t.dir else { return Ok(None) };
        let auth =
            if t.verify_peer { ClientAuth::Required(PeerPolicy::AnyNode) } else { ClientAuth::NotRequested };
        let server = TlsServer::from_dir(dir, auth, std::time::SystemTime::now()).map_err(|e| {
            if t.from_file {
                anyhow::anyhow!("nbd_tls = {:?} (config): {e}", dir.display().to_string())
            } else {
                anyhow::anyhow!("--nbd-tls {}: {e}", dir.display())
            }
        })?;
        Ok(Some(server))
    }

    /// Reads the config file, settles the settings, starts this node's health monitor (scoring
    /// the disk under the first local replica), then serves until SIGINT / SIGTERM.
    pub async fn run(self) -> Result<()> {
        let file = match &self.config {
            Some(p) => ServeFile::load(p).map_err(CliError::usage)?,
            None => ServeFile::default(),
        };
        let mut s = self.settings(&file).map_err(CliError::usage)?;
        s.endpoints.nbd_tls = Self::nbd_tls(&s.nbd_tls).map_err(CliError::usage)?;
        if s.endpoints.nbd_tls.is_none()
            && !s.nbd_tls.insecure_plaintext
            && !crate::replication::transport::is_loopback(s.endpoints.nbd.ip())
        {
            return Err(CliError::usage(anyhow::anyhow!(
                "NBD on `{}`, not a loopback address: give `--nbd-tls DIR` (`nbd_tls` in --config), or `--nbd-insecure-plaintext` (`nbd_insecure_plaintext`) to let anyone who reaches it read and write the volume",
                s.endpoints.nbd
            )));
        }
        let local = [&s.source, &s.target].into_iter().find_map(|r| match r {
            ReplicaSpec::Local { path, .. } => Some(path.clone()),
            ReplicaSpec::Remote { .. } => None,
        });
        let node_health = NodeHealth::new();
        s.monitor.spawn(&node_health, local.as_deref(), s.score);
        let volume = VolumeConfig {
            name: s.volume,
            source: s.source,
            target: s.target,
            secret: load_secret(&s.secret_file)?,
            local_listen: s.local_listen,
            target_weight: self.target_weight.unwrap_or(0),
            conns: s.conns,
            rate: SyncRate::default(),
            write_deadline: s.write_deadline,
            al_extents: s.al_extents,
            node_health,
            allow_degraded: self.degraded || self.force,
            assume_clean: self.assume_clean,
            lease: self.lease_options()?,
            transport: s.transport.node(&[]).map_err(CliError::usage)?,
        };
        Ok(crate::serve::run(volume, s.driver, s.endpoints, super::shutdown_signal).await?)
    }
}

impl ServeArgs {
    /// The lease settings of `--lease-store`, `--lease-ttl`, `--lease-holder`, `--force`.
    fn lease_options(&self) -> Result<Option<crate::volume::lease::LeaseOptions>> {
        let backend = match self.lease_store.as_str() {
            "none" => return Ok(None),
            "embedded" => crate::volume::lease::LeaseBackend::Embedded,
            url if url.starts_with("etcd://") => crate::volume::lease::LeaseBackend::Etcd(
                crate::lease::etcd::EtcdConfig::parse(url)
                    .map_err(|e| CliError::usage(anyhow::anyhow!(e)))?,
            ),
            other => {
                return Err(CliError::usage(anyhow::anyhow!(
                    "--lease-store {other}: `embedded`, `etcd://HOST:PORT[,HOST:PORT...]` or `none`"
                )))
            }
        };
        if self.standby && !matches!(backend, crate::volume::lease::LeaseBackend::Etcd(_)) {
            return Err(CliError::usage(anyhow::anyhow!(
                "--standby needs --lease-store etcd://...: with two nodes and no third party nothing can \
                 take over automatically and safely (see docs/leases.md)"
            )));
        }
        let node = self.lease_holder.clone().unwrap_or_else(host_name);
        let mut b = [0u8; 4];
        getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("random instance name: {e}"))?;
        let instance = format!("{}-{:02x}{:02x}{:02x}{:02x}", std::process::id(), b[0], b[1], b[2], b[3]);
        Ok(Some(crate::volume::lease::LeaseOptions {
            holder: crate::lease::Holder::new(&node, &instance),
            ttl: self.lease_ttl.unwrap_or(std::time::Duration::from_secs(2)),
            force: self.force,
            backend,
            standby: self.standby,
            standby_view: None,
        }))
    }
}

/// This machine's host name (the lease holder's node part by default).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::path::Path;

    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        engine: EngineArgs,
    }

    fn engine(argv: &[&str]) -> Result<DriverConfig> {
        Cmd::try_parse_from(std::iter::once("serve").chain(argv.iter().copied()))
            .unwrap()
            .engine
            .config(&EngineFile::default(), None)
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

    #[derive(Parser)]
    struct ServeCmd {
        #[command(flatten)]
        args: ServeArgs,
    }

    fn serve(argv: &[&str]) -> ServeArgs {
        let mut a =
            ServeCmd::try_parse_from(std::iter::once("serve").chain(argv.iter().copied())).unwrap().args;
        // Not from the environment: MIRROR_SECRET_FILE may be set where the tests run.
        if !argv.contains(&"--secret-file") {
            a.secret_file = None;
        }
        // Nor MIRROR_TLS_DIR.
        if !argv.contains(&"--tls") {
            a.transport.tls = None;
        }
        a
    }

    #[test]
    fn tls_comes_from_the_file_unless_a_flag_says_otherwise() {
        let file =
            ServeFile::parse(&format!("tls = \"/etc/mirror/tls\"\nnbd_tls = \"/etc/mirror/nbd\"\n{FILE}"))
                .unwrap();
        let s = serve(&[]).settings(&file).unwrap();
        assert_eq!(s.transport.tls.as_deref(), Some(Path::new("/etc/mirror/tls")));
        assert!(s.transport.from_file && !s.transport.insecure_plaintext);
        assert_eq!(s.nbd_tls.dir.as_deref(), Some(Path::new("/etc/mirror/nbd")));
        assert!(s.nbd_tls.from_file && !s.nbd_tls.verify_peer);
        // The verify flag adds to the file's directory.
        let s = serve(&["--nbd-tls-verify-peer"]).settings(&file).unwrap();
        assert!(s.nbd_tls.verify_peer);
        // Flags replace the file's choice: another directory, or plaintext for this start.
        let s = serve(&["--tls", "/tmp/t", "--nbd-tls", "/tmp/n"]).settings(&file).unwrap();
        assert_eq!(s.transport.tls.as_deref(), Some(Path::new("/tmp/t")));
        assert_eq!(s.nbd_tls.dir.as_deref(), Some(Path::new("/tmp/n")));
        assert!(!s.transport.from_file && !s.nbd_tls.from_file);
        let s = serve(&["--insecure-plaintext", "--nbd-insecure-plaintext"]).settings(&file).unwrap();
        assert!(s.transport.tls.is_none() && s.transport.insecure_plaintext);
        assert!(s.nbd_tls.dir.is_none() && s.nbd_tls.insecure_plaintext);
        // Verifying peers needs a directory from one side or the other.
        let plain = ServeFile::parse(FILE).unwrap();
        let e = serve(&["--nbd-tls-verify-peer"]).settings(&plain).unwrap_err();
        assert!(e.to_string().contains("--nbd-tls DIR or `nbd_tls`"), "{e}");
        // Without either, plaintext (loopback only, checked where the addresses are known).
        let s = serve(&[]).settings(&plain).unwrap();
        assert_eq!(s.transport.tls, None);
        assert_eq!(s.nbd_tls, NbdTlsSettings::default());
    }

    const FILE: &str = r#"
        volume = "vol0"
        source = "local:/var/lib/mirror/vol0.img:1G"
        target = "remote:10.0.0.2:7700"
        secret_file = "/etc/mirror/secret"
        nbd = "0.0.0.0:10810"
        nbd_unix = "/run/mirror/vol0.nbd"
        source_listen = "0.0.0.0:7700"
        conns = 2
        ctl_socket = "/run/mirror/vol0.ctl"
        metrics = "127.0.0.1:9187"
        frontend = "auto"
        [engine]
        policy = "seed"
        seed_factors = "1,1"
        good_health = 70
        failback_hold = "3s"
        balance_reads = true
        [monitor]
        interval = "1s"
        probe = ["http://127.0.0.1:8080/health,timeout=1s"]
        pin_dir = "/run/mirror/bpf"
        [health]
        disk_ratio_good = 3.0
    "#;

    #[test]
    fn the_serve_file_fills_in_what_the_flags_leave_out() {
        let file = ServeFile::parse(FILE).unwrap();
        let s = serve(&[]).settings(&file).unwrap();
        assert_eq!(s.volume, "vol0");
        assert_eq!(
            s.source,
            ReplicaSpec::Local { path: "/var/lib/mirror/vol0.img".into(), size: Some(1 << 30) }
        );
        assert_eq!(s.target, ReplicaSpec::Remote { addr: "10.0.0.2:7700".into() });
        assert_eq!(s.secret_file, PathBuf::from("/etc/mirror/secret"));
        assert_eq!(s.local_listen, ["0.0.0.0:7700".to_string(), DEFAULT_LOCAL_LISTEN.to_string()]);
        assert_eq!(s.conns, 2);
        let e = &s.endpoints;
        assert_eq!(e.nbd, "0.0.0.0:10810".parse().unwrap());
        assert_eq!(e.nbd_unix.as_deref(), Some(std::path::Path::new("/run/mirror/vol0.nbd")));
        assert_eq!(e.export, "vol0", "the export is named after the volume");
        assert_eq!(e.ctl_socket, PathBuf::from("/run/mirror/vol0.ctl"));
        assert_eq!(e.metrics, Some("127.0.0.1:9187".parse().unwrap()));
        assert_eq!(e.frontend, Frontend::Auto);
        assert_eq!(
            e.pin_dir,
            PathBuf::from("/run/mirror/bpf"),
            "the weights map goes where the monitor reads"
        );
        let en = &s.driver.engine;
        assert_eq!(en.policy, Policy::Seed(SeedLinear { source_factor: 1.0, target_factor: 1.0 }));
        assert_eq!((en.good, en.critical), (70.0, 30.0));
        assert_eq!((en.failback_hold, en.ramp), (Duration::from_secs(3), Duration::from_secs(30)));
        assert!(en.balance_reads);
        assert_eq!(s.monitor.interval, Duration::from_secs(1));
        assert_eq!(s.monitor.probes.len(), 1);
        assert_eq!(s.score.disk_ratio_good, 3.0);
    }

    #[test]
    fn serve_flags_override_the_file() {
        let file = ServeFile::parse(FILE).unwrap();
        let s = serve(&[
            "--volume",
            "vol1",
            "--source",
            "remote:10.0.0.1:7700",
            "--target",
            "local:/tmp/t.img",
            "--secret-file",
            "/tmp/s",
            "--nbd",
            "127.0.0.1:0",
            "--source-listen",
            "127.0.0.1:7701",
            "--conns",
            "8",
            "--ctl-socket",
            "/tmp/ctl",
            "--metrics",
            "127.0.0.1:0",
            "--frontend",
            "nbd",
            "--policy",
            "adaptive",
            "--good-health",
            "90",
            "--failback-hold",
            "1s",
            "--health-interval",
            "100ms",
            "--probe",
            "http://127.0.0.1:9000/",
            "--pin-dir",
            "/tmp/pins",
            "--target-weight",
            "40",
        ])
        .settings(&file)
        .unwrap();
        assert_eq!(s.volume, "vol1");
        assert_eq!(s.source, ReplicaSpec::Remote { addr: "10.0.0.1:7700".into() });
        assert_eq!(s.target, ReplicaSpec::Local { path: "/tmp/t.img".into(), size: None });
        assert_eq!(s.secret_file, PathBuf::from("/tmp/s"));
        assert_eq!(s.local_listen[0], "127.0.0.1:7701");
        assert_eq!(s.conns, 8);
        assert_eq!(s.endpoints.nbd, "127.0.0.1:0".parse().unwrap());
        assert_eq!(s.endpoints.export, "vol1", "the export follows the volume the flags name");
        assert_eq!(s.endpoints.ctl_socket, PathBuf::from("/tmp/ctl"));
        assert_eq!(s.endpoints.metrics, Some("127.0.0.1:0".parse().unwrap()));
        assert_eq!(s.endpoints.frontend, Frontend::Nbd);
        assert_eq!(s.endpoints.pin_dir, PathBuf::from("/tmp/pins"));
        assert_eq!(s.driver.engine.policy, Policy::Adaptive);
        assert_eq!(s.driver.engine.good, 90.0);
        assert_eq!(s.driver.engine.failback_hold, Duration::from_secs(1));
        assert_eq!(s.driver.initial_pin, Some(40));
        assert_eq!(s.monitor.interval, Duration::from_millis(100));
        let urls: Vec<_> = s.monitor.probes.iter().map(|p| p.url.as_str()).collect();
        assert_eq!(
            urls,
            ["http://127.0.0.1:8080/health", "http://127.0.0.1:9000/"],
            "the file's, then the flags'"
        );
    }

    #[test]
    fn serve_defaults_apply_without_a_file_and_what_is_missing_is_named() {
        let s = serve(&[
            "--volume",
            "v",
            "--source",
            "local:/tmp/a",
            "--target",
            "local:/tmp/b",
            "--secret-file",
            "/s",
        ])
        .settings(&ServeFile::default())
        .unwrap();
        assert_eq!(s.endpoints.nbd, DEFAULT_NBD.parse().unwrap());
        assert_eq!(s.endpoints.export, "v");
        assert_eq!(s.endpoints.ctl_socket, PathBuf::from(crate::control::DEFAULT_SOCKET));
        assert_eq!((s.endpoints.metrics, s.endpoints.nbd_unix.clone()), (None, None));
        assert_eq!(s.endpoints.frontend, Frontend::Nbd);
        assert_eq!(s.endpoints.pin_dir, PathBuf::from(mirror_common::PIN_DIR));
        assert_eq!(s.local_listen, [DEFAULT_LOCAL_LISTEN.to_string(), DEFAULT_LOCAL_LISTEN.to_string()]);
        assert_eq!(s.conns, DEFAULT_CONNS);
        assert_eq!(s.monitor.interval, super::super::health::DEFAULT_HEALTH_INTERVAL);
        let en = &s.driver.engine;
        assert_eq!((en.policy, en.good, en.critical), (Policy::Adaptive, 80.0, 30.0));
        assert_eq!(
            (en.heartbeat_timeout, en.failback_hold, en.ramp, s.driver.tick),
            (
                Duration::from_secs(1),
                Duration::from_secs(10),
                Duration::from_secs(30),
                Duration::from_millis(100)
            )
        );
        assert!(!en.balance_reads);
        let full = ["--volume", "v", "--source", "local:/a", "--target", "local:/b", "--secret-file", "/s"];
        for (skip, named) in [(0, "--volume"), (2, "--source"), (4, "--target"), (6, "--secret-file")] {
            let argv: Vec<&str> = full
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != skip && *i != skip + 1)
                .map(|(_, a)| *a)
                .collect();
            let e = serve(&argv).settings(&ServeFile::default()).unwrap_err().to_string();
            assert!(e.contains(named) && e.contains("--config"), "{e}");
        }
        let e = serve(&full.iter().copied().chain(["--conns", "0"]).collect::<Vec<_>>())
            .settings(&ServeFile::default())
            .unwrap_err();
        assert!(e.to_string().contains("--conns"), "{e}");
    }

    #[test]
    fn engine_file_values_are_checked_like_the_flags() {
        let file = ServeFile::parse("[engine]\ncritical_health = 85").unwrap();
        let e = serve(&[]).engine.config(&file.engine, None).unwrap_err().to_string();
        assert!(e.contains("--critical-health < --good-health"), "{e}");
        let file = ServeFile::parse("[engine]\npolicy = \"seed\"\nseed_factors = \"x\"").unwrap();
        let e = serve(&[]).engine.config(&file.engine, None).unwrap_err().to_string();
        assert!(e.contains("--seed-factors") && e.contains('x'), "{e}");
        // The flag wins over a bad file value.
        let c = serve(&["--seed-factors", "2,1"]).engine.config(&file.engine, None).unwrap();
        assert_eq!(c.engine.policy, Policy::Seed(SeedLinear { source_factor: 2.0, target_factor: 1.0 }));
    }
}
