//! The telemetry path: eBPF programs attached to kernel tracepoints write into maps pinned under
//! `/sys/fs/bpf/mirror/`; the collector reads them into per-interval figures. When BPF is not
//! usable, [`diskstats`] and [`procfs`] read `/proc/diskstats`, `/proc/pressure` and
//! `/proc/net/snmp` instead. [`collector`] turns snapshots into per-interval samples; [`duty`]
//! schedules the run-queue program's duty cycle.

pub mod blk;
pub mod bpf;
pub mod btf;
pub mod collector;
pub mod diskstats;
pub mod duty;
pub mod procfs;
pub mod tracefs;
pub mod view;

use std::path::PathBuf;

/// Errors at the telemetry boundary (kernel, tracefs, bpffs).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TelemetryError {
    #[error("this binary was built without the eBPF object: run `cargo xtask build`")]
    NoObject,
    #[error("eBPF needs root (CAP_BPF and CAP_PERFMON); running as uid {0}")]
    NotRoot(u32),
    #[error("cannot mount {fs} at {path}: {source}")]
    Mount { fs: &'static str, path: PathBuf, source: std::io::Error },
    #[error("tracepoint format {path}: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program { name: &'static str, source: aya::programs::ProgramError },
    #[error("the eBPF object has no program {0}")]
    MissingProgram(&'static str),
    #[error("the eBPF object has no map {0}")]
    MissingMap(&'static str),
    #[error("map {name}: {source}")]
    Map { name: String, source: aya::maps::MapError },
    #[error("no pinned map at {0}: is `mirror daemon` running (as root)?")]
    NotPinned(PathBuf),
}

impl TelemetryError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io { what: what.into(), source }
    }
}

/// Where the node's figures come from: the eBPF programs, or /proc when BPF is not usable here
/// (not root, no BTF, old kernel, built without the object).
#[derive(Debug)]
pub enum Source {
    Bpf(Box<bpf::Probe>),
    /// The maps a running `mirror daemon` pinned in this directory (read only).
    Pinned(PathBuf),
    Procfs,
}

/// What the /proc fallback measures, said once when falling back.
const FALLBACK: &str = "/proc/diskstats (block averages, no percentiles), /proc/pressure (PSI) \
                        and /proc/net/snmp (node-wide TCP retransmits); no run-queue histogram, \
                        no per-peer retransmits";

impl Source {
    /// Attaches the eBPF programs, or falls back to /proc with one clear warning saying why.
    pub fn open(pin_dir: &std::path::Path, allow_bpf: bool, opts: &bpf::ProbeOptions) -> Self {
        if !allow_bpf {
            tracing::info!("eBPF disabled by flag: telemetry from {FALLBACK}");
            return Self::Procfs;
        }
        match bpf::Probe::attach(pin_dir, opts) {
            Ok(p) => Self::Bpf(Box::new(p)),
            Err(e) => {
                tracing::warn!("eBPF telemetry unavailable ({e}); falling back to {FALLBACK}");
                Self::Procfs
            }
        }
    }

    /// The node daemon's pinned maps when it runs (one set of programs per node, shared by
    /// every process that needs the figures), else the /proc fallback, said once.
    pub fn open_pinned(pin_dir: &std::path::Path) -> Self {
        match bpf::read_pinned_all(pin_dir) {
            Ok(_) => {
                tracing::info!(pin_dir = %pin_dir.display(), "telemetry from the node daemon's pinned eBPF maps");
                Self::Pinned(pin_dir.to_path_buf())
            }
            Err(e) => {
                tracing::warn!(
                    "no pinned eBPF maps ({e}); telemetry from {FALLBACK}. Run `mirror daemon` \
                     on this node (as root) for eBPF figures"
                );
                Self::Procfs
            }
        }
    }

    /// Cumulative figures now.
    pub fn snapshot(&self) -> Result<collector::NodeSnapshot, TelemetryError> {
        match self {
            Self::Bpf(p) => p.snapshot(),
            Self::Pinned(dir) => bpf::read_pinned_all(dir),
            Self::Procfs => {
                let (blk, inflight) = diskstats::read_all()?;
                Ok(collector::NodeSnapshot {
                    blk,
                    inflight,
                    psi: procfs::read_psi(),
                    retrans_total: procfs::read_tcp_retrans().ok(),
                    ..Default::default()
                })
            }
        }
    }

    /// Forwards eBPF-side log records (aya-log) to the daemon's log.
    pub fn flush_logs(&mut self) {
        if let Self::Bpf(p) = self {
            p.flush_logs();
        }
    }

    /// Short name of the source for views and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Bpf(_) | Self::Pinned(_) => "ebpf",
            Self::Procfs => "procfs",
        }
    }
}
