//! The telemetry path: eBPF programs attached to kernel tracepoints write into maps pinned under
//! `/sys/fs/bpf/mirror/`; the collector reads them into per-interval figures. When BPF is not
//! usable, [`diskstats`] reads `/proc/diskstats` instead.

pub mod blk;
pub mod bpf;
pub mod diskstats;
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

/// Where block statistics come from: the eBPF programs, or `/proc/diskstats` when BPF is not
/// usable here (not root, no BTF, built without the object).
#[derive(Debug)]
pub enum BlkSource {
    Bpf(bpf::BlkProbe),
    Procfs,
}

impl BlkSource {
    /// Attaches the eBPF programs, or falls back to /proc with one clear warning saying why.
    pub fn open(pin_dir: &std::path::Path, allow_bpf: bool) -> Self {
        if !allow_bpf {
            tracing::info!("eBPF disabled by flag: block statistics from /proc/diskstats");
            return Self::Procfs;
        }
        match bpf::BlkProbe::attach(pin_dir) {
            Ok(p) => Self::Bpf(p),
            Err(e) => {
                tracing::warn!(
                    "eBPF telemetry unavailable ({e}); falling back to /proc/diskstats \
                     (averages only, no percentiles)"
                );
                Self::Procfs
            }
        }
    }

    /// Cumulative statistics now.
    pub fn snapshot(&self) -> Result<blk::BlkSnapshot, TelemetryError> {
        match self {
            Self::Bpf(p) => p.snapshot(),
            Self::Procfs => diskstats::read(),
        }
    }

    /// Short name of the source for views and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Bpf(_) => "ebpf",
            Self::Procfs => "procfs",
        }
    }
}
