//! `mirror`: the node daemon and its CLI.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use mirror::{
    frontend::nbd::{NbdListen, NbdOptions, NbdServer},
    replication::{
        auth::load_secret,
        client::Client,
        protocol::{JobKind, Message},
        rate::SyncRate,
        server::{Server, ServerConfig, VolumeSpec},
    },
    telemetry::{bpf, collector, view, Source},
    volume::{
        open::{ReplicaSpec, VolumeConfig},
        BlockDev,
    },
};

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
enum CtlCmd {
    /// Weights and per-replica state and counters.
    Status {
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Read weights: pin them or return to automatic.
    Weights {
        #[command(subcommand)]
        cmd: WeightsCmd,
    },
    /// Send every read to the target now (the target must be in sync); holds until the source
    /// is healthy and in sync for the failback hold time, or until `failback` / `weights auto`.
    Failover,
    /// Ramp reads back to the source now (it must be in sync), without waiting for the hold time.
    Failback,
}

#[derive(Subcommand, Debug)]
enum UblkCmd {
    /// One line per device: id, state, queues, depth, block device.
    List,
    /// Delete device N (stop it first when live).
    Del { id: i32 },
}

#[derive(Subcommand, Debug)]
enum WeightsCmd {
    /// Pin the target's share of reads (0..=100), optionally for a while.
    Set {
        #[arg(long, value_parser = clap::value_parser!(u8).range(0..=100))]
        target: u8,
        /// How long the pin holds (e.g. 10m); then weights return to automatic.
        #[arg(long = "for", value_parser = mirror::parse_duration)]
        for_: Option<Duration>,
    },
    /// Return to automatic weights.
    Auto,
}

/// The node's health monitor (sent to the router in every heartbeat reply).
#[derive(clap::Args, Debug, Clone)]
struct HealthArgs {
    /// How often the node's health is scored.
    #[arg(long, default_value = "250ms", value_parser = mirror::parse_duration)]
    health_interval: Duration,
    /// HTTP GET probe of an application endpoint: URL[,timeout=2s][,status=200]. Repeatable.
    #[arg(long = "probe", value_parser = mirror::health::probe::ProbeSpec::parse)]
    probes: Vec<mirror::health::probe::ProbeSpec>,
    /// The disk whose latency counts in the score [default: the device under the first volume].
    #[arg(long)]
    health_device: Option<PathBuf>,
    /// Where the node daemon (`mirror daemon`) pinned its eBPF maps; without them the monitor
    /// reads /proc (and says so once).
    #[arg(long, default_value = mirror_common::PIN_DIR)]
    pin_dir: PathBuf,
}

impl HealthArgs {
    /// Starts the monitor publishing into `health`; `volume` is the path whose device is
    /// scored unless --health-device.
    fn spawn(
        &self,
        health: &std::sync::Arc<mirror::health::monitor::NodeHealth>,
        volume: Option<&std::path::Path>,
        score: mirror::health::score::ScoreConfig,
    ) {
        use mirror::health::{monitor, score::ScoreConfig};
        let dev_path = self.health_device.as_deref().or(volume);
        let device = dev_path.and_then(|p| match mirror::telemetry::blk::kdev_of_path(p) {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::warn!(path = %p.display(), "health: cannot tell the disk under it ({e}); scoring the busiest disk");
                None
            }
        });
        if let Some(d) = device {
            tracing::info!(device = %mirror::telemetry::blk::dev_name(d), "health: disk latency from this device");
        }
        monitor::spawn(
            monitor::MonitorConfig {
                interval: self.health_interval,
                pin_dir: self.pin_dir.clone(),
                score: ScoreConfig { device, ..score },
                probes: self.probes.clone(),
            },
            health.clone(),
        );
    }
}

/// The weighting engine's settings.
#[derive(clap::Args, Debug, Clone)]
struct EngineArgs {
    /// `adaptive` (default: no reads to the target while the source is healthy; predictive
    /// shift, hysteresis, failover, gradual failback) or `seed` (source health x 0.6 and target
    /// health x 0.4, normalized to 100; factors from --seed-factors).
    #[arg(long, default_value = "adaptive", value_parser = ["adaptive", "seed"])]
    policy: String,
    /// Factors of the seed policy: SOURCE,TARGET.
    #[arg(long, default_value = "0.6,0.4")]
    seed_factors: String,
    /// Source health at or above which it needs no help.
    #[arg(long, default_value_t = 80.0)]
    good_health: f64,
    /// Source health below which reads fail over to the target at once.
    #[arg(long, default_value_t = 30.0)]
    critical_health: f64,
    /// No heartbeat answer from the source for this long: failover.
    #[arg(long, default_value = "1s", value_parser = mirror::parse_duration)]
    heartbeat_timeout: Duration,
    /// After a failover: the source must be in sync and healthy this long before failback.
    #[arg(long, default_value = "10s", value_parser = mirror::parse_duration)]
    failback_hold: Duration,
    /// Length of the failback ramp from 100% target back to the normal share.
    #[arg(long, default_value = "30s", value_parser = mirror::parse_duration)]
    ramp: Duration,
    /// Spread reads by health (seed formula) even when the source is healthy.
    #[arg(long)]
    balance_reads: bool,
    /// How often the engine takes a sample and heartbeats are sent.
    #[arg(long, default_value = "100ms", value_parser = mirror::parse_duration)]
    tick: Duration,
}

impl EngineArgs {
    fn config(&self, initial_pin: Option<u8>) -> Result<mirror::weights::driver::DriverConfig> {
        use mirror::weights::{
            driver::DriverConfig,
            engine::{EngineConfig, Policy},
            policy::SeedLinear,
        };
        let policy = if self.policy == "seed" {
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
        } else {
            Policy::Adaptive
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
        /// SIGUSR1 detaches the programs (maps and pins stay), SIGUSR2 attaches them again; each
        /// change is acknowledged with a line `programs detached` / `programs attached` on
        /// stdout. `cargo xtask bench ebpf` uses it to alternate with and without the programs
        /// within one fio run.
        #[arg(long)]
        pause_signals: bool,
        /// Read the clock for every block request. By default, above 16k requests a second per
        /// device and CPU only a weighted sample of requests is timed (counts and bytes stay
        /// exact; latency sums and histograms become estimates), which spares most of the block
        /// program's clock reads (`cargo xtask bench ebpf --exact-latency` measures the
        /// difference).
        #[arg(long)]
        exact_block_latency: bool,
        /// Percent of each --runq-period the run-queue latency program is attached (1-100). It
        /// fires on every context switch, the most frequent event the daemon watches; attached
        /// part of the time, it measures a time sample of the switches: percentiles unchanged
        /// (each wait is read whole from the scheduler's own stamp), rates per second of
        /// attached time, and its cost cut by the same share. 100 measures every switch.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=100))]
        runq_duty: u32,
        /// Length of the run-queue duty cycle (every interval of this length holds the same
        /// attached time; keep it at or below the health monitors' interval, 250ms).
        #[arg(long, default_value = "250ms", value_parser = mirror::parse_duration)]
        runq_period: Duration,
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
    /// Run a replica server: serve volumes (files or block devices) to authenticated peers over
    /// TCP, and run sync / verify jobs that push this replica's data to a peer.
    Replica {
        /// TOML config file (see README); flags given on the command line override it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Address to listen on [default: 127.0.0.1:7700].
        #[arg(long)]
        listen: Option<String>,
        /// A volume to serve, NAME=PATH[:SIZE]; the file is created sparse with SIZE when missing.
        /// Metadata (generations, dirty bitmap) lives in PATH.meta, or /var/lib/mirror/DEVICE.meta for a block device. Repeatable.
        #[arg(long = "volume", value_parser = VolumeSpec::parse)]
        volumes: Vec<VolumeSpec>,
        /// File holding the shared secret (>= 16 bytes) peers authenticate with.
        #[arg(long, env = "MIRROR_SECRET_FILE")]
        secret_file: Option<PathBuf>,
        /// Sync rate while the volume serves application I/O, bytes/s [default: 16M].
        #[arg(long, value_parser = mirror::parse_size)]
        sync_min_rate: Option<u64>,
        /// Sync rate when the volume is idle, bytes/s, 0 = unlimited [default: 0].
        #[arg(long, value_parser = mirror::parse_size)]
        sync_max_rate: Option<u64>,
        /// Bitmap grain in bytes, a power of two in 512..=65536 [default: 4096].
        #[arg(long)]
        block_size: Option<u32>,
        /// Aligned I/O on the volumes with O_DIRECT: bypasses this node's page cache, so the
        /// disk's own latency shows on the data path and in the health score.
        #[arg(long)]
        direct_io: bool,
        #[command(flatten)]
        health: HealthArgs,
    },
    /// Serve a mirrored volume to applications over NBD. Reads go to the target with probability
    /// --target-weight/100 (only where it is in sync), writes to both replicas; a replica that
    /// fails is recorded on the survivor, resynced when it returns and put back in service.
    /// Prints `nbd listening on ADDR` when ready.
    Serve {
        /// Volume name (as the replica servers know it).
        #[arg(long)]
        volume: String,
        /// The source replica: local:PATH[:SIZE] or remote:HOST:PORT.
        #[arg(long, value_parser = ReplicaSpec::parse)]
        source: ReplicaSpec,
        /// The target replica: local:PATH[:SIZE] or remote:HOST:PORT.
        #[arg(long, value_parser = ReplicaSpec::parse)]
        target: ReplicaSpec,
        #[arg(long, env = "MIRROR_SECRET_FILE")]
        secret_file: PathBuf,
        /// NBD on TCP (port 0 picks a free one).
        #[arg(long, default_value = "127.0.0.1:10809")]
        nbd: std::net::SocketAddr,
        /// Also serve NBD on this Unix socket.
        #[arg(long)]
        nbd_unix: Option<PathBuf>,
        /// NBD export name [default: the volume's name]; clients may also ask for the default export "".
        #[arg(long)]
        export: Option<String>,
        /// Start with the target's read share pinned at this value (0..=100) instead of automatic
        /// weights; `mirror ctl weights auto` hands it to the engine.
        #[arg(long, value_parser = clap::value_parser!(u8).range(0..=100))]
        target_weight: Option<u8>,
        /// Where a local source replica is served to its peer (for resync).
        #[arg(long, default_value = "127.0.0.1:0")]
        source_listen: String,
        /// Where a local target replica is served to its peer (for resync).
        #[arg(long, default_value = "127.0.0.1:0")]
        target_listen: String,
        /// Connections per remote replica.
        #[arg(long, default_value_t = 4)]
        conns: usize,
        /// Start even when a replica cannot be reached and the other's metadata does not show it
        /// as behind: the operator vouches that the missing replica holds no newer writes. The
        /// survivor records every write; the missing replica is resynced when it returns (one
        /// that was written elsewhere meanwhile is refused as split brain, never overwritten).
        /// Not needed when the survivor already knows the other is behind (it was degraded).
        #[arg(long)]
        degraded: bool,
        /// Take two never-synced replicas as identical (like `mdadm --assume-clean`, e.g. both
        /// freshly zeroed) instead of the initial full sync from the source. Ignored once the
        /// replicas share a generation.
        #[arg(long)]
        assume_clean: bool,
        /// Control socket for `mirror ctl` (root only).
        #[arg(long, default_value = mirror::control::DEFAULT_SOCKET)]
        ctl_socket: PathBuf,
        /// Serve Prometheus metrics (weights, mode, node health and signals, per-replica
        /// counters) at http://ADDR/metrics; prints `metrics on ADDR` when ready.
        #[arg(long)]
        metrics: Option<std::net::SocketAddr>,
        #[command(flatten)]
        engine: Box<EngineArgs>,
        /// This node's health (used for local replicas).
        #[command(flatten)]
        health: Box<HealthArgs>,
        /// Also expose the volume as /dev/ublkbN: `ublk` (fail when the kernel has no ublk),
        /// `auto` (ublk when available, else NBD only), `nbd` (NBD only). NBD is always served.
        #[arg(long, default_value = "nbd", value_parser = ["nbd", "ublk", "auto"])]
        frontend: String,
        #[command(flatten)]
        ublk: Box<mirror::frontend::ublk::UblkArgs>,
    },
    /// ublk devices: list them, delete one left by a killed daemon.
    Ublk {
        #[command(subcommand)]
        cmd: UblkCmd,
    },
    /// Talk to a running `mirror serve` over its control socket (root only).
    Ctl {
        /// The control socket.
        #[arg(long, default_value = mirror::control::DEFAULT_SOCKET)]
        socket: PathBuf,
        #[command(subcommand)]
        cmd: CtlCmd,
    },
    /// Bring a peer up to date from a replica (`--node` pushes to `--peer`), or verify them.
    /// Shows progress; exits non-zero when refused (split brain, peer newer) or failed.
    Sync {
        /// The replica server that holds the data to push (it runs the job).
        #[arg(long)]
        node: String,
        /// The replica server to bring up to date, as `--node` reaches it.
        #[arg(long)]
        peer: String,
        #[arg(long)]
        volume: String,
        #[arg(long, env = "MIRROR_SECRET_FILE")]
        secret_file: PathBuf,
        /// Compare digests of the whole volume and report mismatching ranges instead of syncing.
        #[arg(long)]
        verify: bool,
        /// With --verify: resync the mismatching ranges from --node to --peer.
        #[arg(long, requires = "verify")]
        repair: bool,
        /// Start the job and return without waiting.
        #[arg(long)]
        no_wait: bool,
        /// No progress bar; print the final JSON status.
        #[arg(long)]
        json: bool,
    },
    /// Show a replica's volume status (generation, dirty bytes, counters, job).
    Status {
        #[arg(long)]
        node: String,
        #[arg(long)]
        volume: String,
        #[arg(long, env = "MIRROR_SECRET_FILE")]
        secret_file: PathBuf,
    },
    /// Resolve a split brain: discard this replica's data (the next sync onto it is a full one).
    Resolve {
        /// The replica whose writes are discarded.
        #[arg(long)]
        node: String,
        #[arg(long)]
        volume: String,
        #[arg(long, env = "MIRROR_SECRET_FILE")]
        secret_file: PathBuf,
        /// Required: confirms that this replica's divergent writes are thrown away.
        #[arg(long, required = true)]
        discard: bool,
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
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command {
        Command::Daemon {
            pin_dir,
            interval,
            run_for,
            no_bpf,
            quiet,
            prometheus,
            bpf_stats_out,
            pause_signals,
            exact_block_latency,
            runq_duty,
            runq_period,
        } => rt.block_on(daemon(DaemonOpts {
            pin_dir,
            interval,
            run_for,
            allow_bpf: !no_bpf,
            quiet,
            prometheus,
            bpf_stats_out,
            pause_signals,
            probe: bpf::ProbeOptions { exact_block_latency, runq_duty_pct: runq_duty, runq_period },
        })),
        Command::Top { pin_dir, interval, count } => rt.block_on(top(pin_dir, interval, count)),
        Command::Replica {
            config,
            listen,
            volumes,
            secret_file,
            sync_min_rate,
            sync_max_rate,
            block_size,
            direct_io,
            health,
        } => {
            let file = match &config {
                Some(p) => mirror::config::ReplicaFile::load(p)?,
                None => mirror::config::ReplicaFile::default(),
            };
            let block_size = block_size.or(file.block_size).unwrap_or(4096);
            let mut specs = file.volume_specs(block_size);
            specs.extend(volumes.into_iter().map(|v| VolumeSpec { block_size, ..v }));
            for s in &mut specs {
                s.direct_io |= direct_io;
            }
            anyhow::ensure!(
                !specs.is_empty(),
                "no volume to serve: give --volume NAME=PATH[:SIZE] or [[volume]] in --config"
            );
            let secret_file = secret_file.or(file.secret_file.clone()).ok_or_else(|| {
                anyhow::anyhow!("a shared secret is required: --secret-file FILE (or secret_file in --config); create one with `head -c 32 /dev/urandom | base64 > FILE`")
            })?;
            let rate = |flag: Option<u64>, f: &Option<mirror::config::Size>, default: u64| -> Result<u64> {
                Ok(match (flag, f) {
                    (Some(v), _) => v,
                    (None, Some(s)) => s.bytes().map_err(anyhow::Error::msg)?,
                    (None, None) => default,
                })
            };
            let cfg = ServerConfig {
                listen: listen.or(file.listen.clone()).unwrap_or_else(|| "127.0.0.1:7700".into()),
                volumes: specs,
                secret: load_secret(&secret_file)?,
                rate: SyncRate {
                    min_bps: rate(sync_min_rate, &file.sync_min_rate, 16 << 20)?,
                    max_bps: rate(sync_max_rate, &file.sync_max_rate, 0)?,
                },
                health: mirror::health::monitor::NodeHealth::new(),
            };
            let node_health = cfg.health.clone();
            let first_volume = cfg.volumes.first().map(|v| v.path.clone());
            let server = Server::start(cfg)?;
            // After the start: a volume file created by it now exists to tell its disk.
            let _rt_guard = rt.enter();
            health.spawn(&node_health, first_volume.as_deref(), file.health.clone().unwrap_or_default());
            let stop = shutdown_signal();
            {
                use std::io::Write;
                let mut out = std::io::stdout();
                let _ = writeln!(out, "listening on {}", server.addr);
                let _ = out.flush();
            }
            rt.block_on(stop);
            tracing::info!("signal received: flushing volumes and exiting");
            server.shutdown();
            Ok(())
        }
        Command::Serve {
            volume,
            source,
            target,
            secret_file,
            nbd,
            nbd_unix,
            export,
            target_weight,
            source_listen,
            target_listen,
            conns,
            degraded,
            assume_clean,
            ctl_socket,
            metrics,
            engine,
            health,
            frontend,
            ublk,
        } => {
            let driver_cfg = engine.config(target_weight)?;
            let local = [&source, &target].into_iter().find_map(|r| match r {
                ReplicaSpec::Local { path, .. } => Some(path.clone()),
                ReplicaSpec::Remote { .. } => None,
            });
            let _rt_guard = rt.enter();
            let node_health = mirror::health::monitor::NodeHealth::new();
            health.spawn(&node_health, local.as_deref(), Default::default());
            let cfg = VolumeConfig {
                name: volume,
                source,
                target,
                secret: load_secret(&secret_file)?,
                local_listen: [source_listen, target_listen],
                target_weight: target_weight.unwrap_or(0),
                conns,
                rate: SyncRate::default(),
                node_health,
                allow_degraded: degraded,
                assume_clean,
            };
            let pin_dir = health.pin_dir.clone();
            let ublk = (frontend != "nbd").then(|| (frontend == "ublk", ublk.options()));
            let export = export.unwrap_or_else(|| cfg.name.clone());
            let ep = Endpoints { nbd, nbd_unix, export, ctl_socket, metrics, pin_dir, ublk };
            rt.block_on(serve(cfg, driver_cfg, ep))
        }
        Command::Ublk { cmd: UblkCmd::List } => {
            for l in mirror::frontend::ublk::list()? {
                println!("{l}");
            }
            Ok(())
        }
        Command::Ublk { cmd: UblkCmd::Del { id } } => {
            mirror::frontend::ublk::delete(id)?;
            println!("ublk device {id} deleted");
            Ok(())
        }
        Command::Ctl { socket, cmd } => rt.block_on(ctl(socket, cmd)),
        Command::Sync { node, peer, volume, secret_file, verify, repair, no_wait, json } => {
            let kind = match (verify, repair) {
                (false, _) => JobKind::Sync,
                (true, false) => JobKind::Verify,
                (true, true) => JobKind::VerifyRepair,
            };
            sync_cmd(&node, &peer, &volume, &load_secret(&secret_file)?, kind, no_wait, json)
        }
        Command::Status { node, volume, secret_file } => {
            let mut c = Client::connect(&node, &volume, &load_secret(&secret_file)?)?;
            println!("{}", serde_json::to_string_pretty(&c.json(&Message::Status)?)?);
            Ok(())
        }
        Command::Resolve { node, volume, secret_file, discard } => {
            anyhow::ensure!(discard, "--discard is required");
            let mut c = Client::connect(&node, &volume, &load_secret(&secret_file)?)?;
            c.call_ok(&Message::ResolveDiscard)?;
            println!("{volume} on {node}: data discarded; sync onto it from the other replica (a full, digest-compared sync)");
            Ok(())
        }
    }
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is called, not when the
/// future is first polled, so a caller that announces readiness after calling it cannot be
/// killed by a signal sent in between. Call it inside the runtime.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
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
    pause_signals: bool,
    probe: bpf::ProbeOptions,
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
    anyhow::ensure!(o.interval >= Duration::from_millis(10), "--interval must be at least 10ms");
    anyhow::ensure!(
        o.probe.runq_period >= Duration::from_millis(10),
        "--runq-period must be at least 10ms (each window attaches and detaches a program)"
    );
    let stats_fd = match &o.bpf_stats_out {
        Some(_) => Some(bpf::enable_run_time_stats()?),
        None => None,
    };
    let source = Source::open(&o.pin_dir, o.allow_bpf, &o.probe);
    let stop = shutdown_signal();
    let mut pause = if o.pause_signals {
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
    {
        // Readiness for supervisors and tests: the programs are attached from here on.
        use std::io::Write;
        let mut out = std::io::stdout();
        let _ = writeln!(out, "ready: block statistics from {}", source.name());
        let _ = out.flush();
    }
    let mut collector = collector::Collector::new(source)?;
    let deadline = o.run_for.map(|d| Instant::now() + d);
    let mut ticker = tokio::time::interval(o.interval);
    ticker.tick().await;
    // The run-queue duty cycle: the window opened at attach; it closes after `on`, reopens at
    // the next period.
    let cycle = match collector.source() {
        Source::Bpf(p) => p.runq_cycle(),
        _ => None,
    };
    if let Some((on, period)) = cycle {
        tracing::info!(
            "run-queue latency measured {} ms of every {} ms (--runq-duty, --runq-period)",
            on.as_millis(),
            period.as_millis()
        );
    }
    // Windows are scheduled at `window_start + k * period` (deadlines kept, not recomputed, so
    // one that passed while the loop was busy still takes effect at once); each stays open
    // `on` from when it really opened (the daemon itself waits for a CPU on a loaded node).
    let mut window_start = tokio::time::Instant::now();
    let mut opened_at = window_start;
    let mut window_open = true;
    tokio::pin!(stop);
    loop {
        let next_toggle = async {
            match cycle {
                Some((on, period)) => {
                    tokio::time::sleep_until(if window_open { opened_at + on } else { window_start + period })
                        .await
                }
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
            _ = &mut stop => { tracing::info!("signal received, detaching"); break; }
            _ = next_toggle => {
                window_open = !window_open;
                if let (true, Some((_, period))) = (window_open, cycle) {
                    window_start += period;
                    // Far behind (the loop stalled): start afresh rather than catch up.
                    if window_start + period < tokio::time::Instant::now() {
                        window_start = tokio::time::Instant::now();
                    }
                }
                if let Source::Bpf(p) = collector.source_mut() {
                    p.set_runq_window(window_open)?;
                }
                opened_at = tokio::time::Instant::now();
                continue;
            }
            Some(on) = toggle => {
                if let Source::Bpf(p) = collector.source_mut() {
                    if on { p.resume()? } else { p.pause()? }
                }
                use std::io::Write;
                let mut out = std::io::stdout();
                let _ = writeln!(out, "programs {}", if on { "attached" } else { "detached" });
                let _ = out.flush();
                continue;
            }
            _ = ticker.tick() => {}
        }
        let sample = collector.tick()?;
        if o.prometheus {
            println!("{}", collector::to_prometheus(&sample, mirror::telemetry::blk::dev_name));
        } else if !o.quiet {
            println!("--- node telemetry ({}, {:.1}s interval)", sample.source, sample.secs);
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
        let s = collector::sample("ebpf", &prev, &cur, now.duration_since(prev_t).as_secs_f64());
        println!("--- node telemetry (pinned maps in {})", pin_dir.display());
        print!("{}", view::sample(&s));
        prev = cur;
        prev_t = now;
        shown += 1;
    }
    Ok(())
}

fn sync_cmd(
    node: &str,
    peer: &str,
    volume: &str,
    secret: &[u8],
    kind: JobKind,
    no_wait: bool,
    json: bool,
) -> Result<()> {
    let mut c = Client::connect(node, volume, secret)?;
    c.call_ok(&Message::StartJob { kind, peer: peer.into() })?;
    if no_wait {
        println!("{kind:?} of {volume} from {node} to {peer} started; `mirror status` shows progress");
        return Ok(());
    }
    let bar = if json {
        indicatif::ProgressBar::hidden()
    } else {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:10} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        b
    };
    let status = loop {
        let s = c.json(&Message::JobStatus)?;
        bar.set_length(s["total_bytes"].as_u64().unwrap_or(0));
        bar.set_position(s["done_bytes"].as_u64().unwrap_or(0));
        bar.set_message(s["state"].as_str().unwrap_or("?").to_string());
        if !matches!(s["state"].as_str(), Some("connecting" | "syncing" | "verifying" | "repairing")) {
            break s;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    bar.finish_and_clear();
    if json {
        println!("{status}");
    }
    let state = status["state"].as_str().unwrap_or("?");
    let mib = |k: &str| status[k].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64;
    let summary = format!(
        "{state}: examined {:.1} MiB, changed {:.1} MiB, sent {:.2} MiB of data, {:.2} MiB on the wire in {:.2} s",
        mib("done_bytes"),
        mib("changed_bytes"),
        mib("data_bytes"),
        mib("wire_bytes"),
        status["elapsed_s"].as_f64().unwrap_or(0.0)
    );
    match state {
        "done" | "up-to-date" | "repaired" => {
            if !json {
                println!("{summary}");
            }
            Ok(())
        }
        "done-mismatches" => {
            let ranges = status["mismatches"].as_array().map(|a| a.len()).unwrap_or(0);
            anyhow::bail!(
                "verify found {ranges} mismatching range(s) (offset, length): {}",
                status["mismatches"]
            )
        }
        _ => anyhow::bail!("{kind:?} {state}: {}", status["error"].as_str().unwrap_or("unknown error")),
    }
}

/// Where `mirror serve` is reached: NBD, the control socket, metrics, the weights map.
struct Endpoints {
    nbd: std::net::SocketAddr,
    nbd_unix: Option<PathBuf>,
    export: String,
    ctl_socket: PathBuf,
    metrics: Option<std::net::SocketAddr>,
    pin_dir: PathBuf,
    /// `Some((required, options))`: also a ublk device.
    ublk: Option<(bool, mirror::frontend::ublk::UblkOptions)>,
}

async fn serve(
    cfg: VolumeConfig,
    driver_cfg: mirror::weights::driver::DriverConfig,
    ep: Endpoints,
) -> Result<()> {
    let Endpoints { nbd, nbd_unix, export, ctl_socket, metrics, pin_dir, ublk } = ep;
    let vol = mirror::volume::open::open(&cfg).await?;
    let driver =
        mirror::weights::driver::Driver::start(vol.router.clone(), driver_cfg, cfg.node_health.clone());
    let control = mirror::control::Control::new(driver.clone());
    let weights_pin = pin_dir.join(format!("weights-{}", cfg.name));
    match bpf::WeightsMap::create(&weights_pin) {
        Ok(mut m) => {
            tracing::info!("read weights mirrored in BPF: bpftool map dump pinned {}", weights_pin.display());
            let mut warned = false;
            driver.set_sink(Box::new(move |w| {
                if let Err(e) = m.set(w) {
                    if !std::mem::replace(&mut warned, true) {
                        tracing::warn!("updating the pinned weights map failed: {e}");
                    }
                }
            }));
        }
        Err(e) => tracing::info!("read weights not mirrored into a pinned BPF map: {e}"),
    }
    let metrics_addr = match metrics {
        Some(a) => Some(
            mirror::metrics::serve(driver.clone(), a)
                .await
                .with_context(|| format!("metrics endpoint {a}"))?,
        ),
        None => None,
    };
    let ctl_path = ctl_socket.clone();
    tokio::spawn(async move {
        if let Err(e) = mirror::control::serve(control, ctl_path.clone()).await {
            tracing::warn!(socket = %ctl_path.display(), "control socket unavailable: {e}");
        }
    });
    let opts = NbdOptions {
        export_name: export,
        description: Some(format!("mirror volume {}", cfg.name)),
        ..Default::default()
    };
    // Before "listening" is printed: a supervisor may send SIGTERM as soon as it reads it.
    let stop = shutdown_signal();
    let tcp = NbdServer::bind(vol.router.clone(), NbdListen::Tcp(nbd), opts.clone()).await?;
    let unix = match nbd_unix {
        Some(p) => Some(NbdServer::bind(vol.router.clone(), NbdListen::Unix(p), opts).await?),
        None => None,
    };
    {
        use std::io::Write;
        let mut out = std::io::stdout();
        let _ = writeln!(out, "nbd listening on {}", tcp.local_addr());
        if let Some(m) = metrics_addr {
            let _ = writeln!(out, "metrics on {m}");
        }
        if let Some(u) = &unix {
            let _ = writeln!(out, "nbd listening on {}", u.local_addr());
        }
        let _ = out.flush();
    }
    let ublk = mirror::frontend::ublk::start_for_serve(vol.router.clone(), ublk)?;
    tracing::info!(volume = %cfg.name, size = vol.router.size(), "serving");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let unix_task = unix.map(|u| tokio::spawn(u.run(stopped(stop_rx.clone()))));
    let tcp_task = tokio::spawn(tcp.run(stopped(stop_rx)));
    stop.await;
    tracing::info!("signal received: draining NBD connections, flushing both replicas");
    mirror::frontend::ublk::stop_for_serve(ublk).await;
    let _ = stop_tx.send(true);
    let _ = tcp_task.await;
    if let Some(t) = unix_task {
        let _ = t.await;
    }
    match vol.router.flush().await {
        // Everything written is on both: the write intent goes (the next start needs no resync).
        Ok(()) => vol.router.close_intents().await,
        Err(e) => tracing::error!("final flush failed: {e}"),
    }
    for s in &vol.local_servers {
        s.shutdown();
    }
    Ok(())
}

async fn ctl(socket: PathBuf, cmd: CtlCmd) -> Result<()> {
    use mirror::control::request;
    let said = |r: &serde_json::Value| {
        format!(
            "target {} / source {} ({}: {})",
            r["target"],
            100 - r["target"].as_u64().unwrap_or(0),
            r["mode"].as_str().unwrap_or("?"),
            r["reason"].as_str().unwrap_or("")
        )
    };
    match cmd {
        CtlCmd::Status { json } => {
            let r = request(&socket, &serde_json::json!({"cmd": "status"})).await?;
            let st = &r["status"];
            if json {
                println!("{}", serde_json::to_string_pretty(st)?);
                return Ok(());
            }
            print!("{}", status_table(st));
        }
        CtlCmd::Weights { cmd: WeightsCmd::Set { target, for_ } } => {
            let req = serde_json::json!({"cmd": "weights_set", "target": target, "for_s": for_.map(|d| d.as_secs_f64())});
            request(&socket, &req).await?;
            match for_ {
                Some(d) => println!("target weight pinned at {target} for {}", humantime::format_duration(d)),
                None => println!("target weight pinned at {target} (until `mirror ctl weights auto`)"),
            }
        }
        CtlCmd::Weights { cmd: WeightsCmd::Auto } => {
            let r = request(&socket, &serde_json::json!({"cmd": "weights_auto"})).await?;
            println!("automatic weights: {}", said(&r));
        }
        CtlCmd::Failover => {
            let r = request(&socket, &serde_json::json!({"cmd": "failover"})).await?;
            println!("failover: {}", said(&r));
        }
        CtlCmd::Failback => {
            let r = request(&socket, &serde_json::json!({"cmd": "failback"})).await?;
            println!("failback: {}", said(&r));
        }
    }
    Ok(())
}

/// `mirror ctl status` as a table: weights and mode, then one row per node, then the signals.
fn status_table(st: &serde_json::Value) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "weights: source {} / target {}   mode {} ({})   size {} bytes",
        st["weights"]["source"],
        st["weights"]["target"],
        st["mode"].as_str().unwrap_or("?"),
        st["reason"].as_str().unwrap_or(""),
        st["size"]
    );
    let _ = writeln!(
        o,
        "{:<7} {:>6} {:>7} {:<10} {:<16} {:>10} {:>10} {:>7} {:>8} {:>8} {:>9} {:>9}",
        "REPLICA",
        "HEALTH",
        "WEIGHT",
        "STATE",
        "SYNC",
        "READS",
        "WRITES",
        "ERRORS",
        "TIMEOUTS",
        "RETRIES",
        "READ_us",
        "WRITE_us"
    );
    for r in st["replicas"].as_array().into_iter().flatten() {
        let role = r["role"].as_str().unwrap_or("?");
        let weight = if role == "target" { &st["weights"]["target"] } else { &st["weights"]["source"] };
        let job = &r["node"]["sync"];
        let sync = match (job["state"].as_str(), job["total_bytes"].as_u64()) {
            (Some(s), Some(t)) if t > 0 => {
                format!("{s} {:.0}%", job["done_bytes"].as_u64().unwrap_or(0) as f64 * 100.0 / t as f64)
            }
            (Some(s), _) => s.to_string(),
            _ if r["state"] == "in-sync" => "-".to_string(),
            _ => "waiting".to_string(),
        };
        let health = match r["node"]["health"].as_u64() {
            Some(h) if r["node"]["reachable"] != false => h.to_string(),
            _ => "down".to_string(),
        };
        let _ = writeln!(
            o,
            "{:<7} {:>6} {:>7} {:<10} {:<16} {:>10} {:>10} {:>7} {:>8} {:>8} {:>9} {:>9}",
            role,
            health,
            weight.to_string(),
            r["state"].as_str().unwrap_or("?"),
            sync,
            r["reads"],
            r["writes"],
            r["errors"],
            r["timeouts"],
            r["retries"],
            r["read_latency_us"],
            r["write_latency_us"]
        );
    }
    for r in st["replicas"].as_array().into_iter().flatten() {
        let signals: Vec<String> = r["node"]["signals"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                format!(
                    "{} {}{} (score {})",
                    s["name"].as_str().unwrap_or("?"),
                    s["value"],
                    s["unit"].as_str().map(|u| format!(" {u}")).unwrap_or_default(),
                    s["score"]
                )
            })
            .collect();
        let _ = writeln!(
            o,
            "{} signals ({}): {}",
            r["role"].as_str().unwrap_or("?"),
            r["node"]["telemetry"].as_str().unwrap_or("none yet"),
            if signals.is_empty() { "-".to_string() } else { signals.join(", ") }
        );
    }
    o
}
