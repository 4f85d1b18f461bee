//! Loading, attaching and pinning the embedded eBPF object, and reading its maps (live or pinned).

use std::{
    borrow::Borrow,
    fs,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Map, MapData, PerCpuHashMap},
    programs::TracePoint,
    Ebpf, EbpfLoader,
};
use mirror_common::blk::{BlkStats, BlkStatsKey, GLOBAL_BLK_OFFSETS, MAP_BLK_START, MAP_BLK_STATS};

use super::{blk::BlkSnapshot, tracefs, TelemetryError};

/// The object built by `cargo xtask build` (empty when the build had none).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mirror-ebpf.o"));

/// True when this binary embeds the eBPF programs.
pub fn has_object() -> bool {
    !OBJECT.is_empty()
}

/// Tracepoint programs in the object: (program name, category, tracepoint).
const TRACEPOINTS: &[(&str, &str, &str)] =
    &[("blk_rq_issue", "block", "block_rq_issue"), ("blk_rq_complete", "block", "block_rq_complete")];

/// The attached block-latency programs. Dropping it detaches them and removes the pins.
#[derive(Debug)]
pub struct BlkProbe {
    ebpf: Ebpf,
    pins: Pins,
}

/// Removes the pinned maps when dropped, also when attaching fails half way.
#[derive(Debug)]
struct Pins(Vec<PathBuf>);

impl Drop for Pins {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = fs::remove_file(p);
        }
    }
}

impl BlkProbe {
    /// Loads the object, pins its maps under `pin_dir` (replacing stale pins of a previous run)
    /// and attaches the tracepoints. Needs root; mounts tracefs and bpffs when they are missing.
    pub fn attach(pin_dir: &Path) -> Result<Self, TelemetryError> {
        if !has_object() {
            return Err(TelemetryError::NoObject);
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        let uid = unsafe { libc::geteuid() };
        if uid != 0 {
            return Err(TelemetryError::NotRoot(uid));
        }
        let tracefs_root = tracefs::ensure_tracefs()?;
        tracefs::ensure_bpffs()?;
        let offsets = tracefs::blk_offsets(&tracefs_root)?;

        fs::create_dir_all(pin_dir)
            .map_err(|e| TelemetryError::io(format!("create {}", pin_dir.display()), e))?;
        let pins: Vec<PathBuf> = [MAP_BLK_START, MAP_BLK_STATS].iter().map(|m| pin_dir.join(m)).collect();
        for p in &pins {
            match fs::remove_file(p) {
                Ok(()) => tracing::info!(pin = %p.display(), "removed stale pin of a previous run"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(TelemetryError::io(format!("remove {}", p.display()), e)),
            }
        }

        let ebpf = EbpfLoader::new()
            .override_global(GLOBAL_BLK_OFFSETS, &offsets, true)
            .map_pin_path(MAP_BLK_START, pins[0].clone())
            .map_pin_path(MAP_BLK_STATS, pins[1].clone())
            .load(OBJECT);
        let pins = Pins(pins);
        let mut ebpf = ebpf?;
        for &(name, category, tp) in TRACEPOINTS {
            let prog: &mut TracePoint = ebpf
                .program_mut(name)
                .ok_or(TelemetryError::MissingProgram(name))?
                .try_into()
                .map_err(|source| TelemetryError::Program { name, source })?;
            prog.load().map_err(|source| TelemetryError::Program { name, source })?;
            prog.attach(category, tp).map_err(|source| TelemetryError::Program { name, source })?;
        }
        tracing::info!(pin_dir = %pin_dir.display(), "block latency programs attached");
        Ok(BlkProbe { ebpf, pins })
    }

    /// Cumulative statistics, summed over CPUs.
    pub fn snapshot(&self) -> Result<BlkSnapshot, TelemetryError> {
        let map = self.ebpf.map(MAP_BLK_STATS).ok_or(TelemetryError::MissingMap(MAP_BLK_STATS))?;
        let map: PerCpuHashMap<&MapData, BlkStatsKey, BlkStats> = PerCpuHashMap::try_from(map)
            .map_err(|source| TelemetryError::Map { name: MAP_BLK_STATS.into(), source })?;
        sum_per_cpu(&map)
    }

    /// Where the maps are pinned.
    pub fn pins(&self) -> &[PathBuf] {
        &self.pins.0
    }
}

fn sum_per_cpu<T: Borrow<MapData>>(
    map: &PerCpuHashMap<T, BlkStatsKey, BlkStats>,
) -> Result<BlkSnapshot, TelemetryError> {
    let mut snap = BlkSnapshot::new();
    for item in map.iter() {
        let (key, values) =
            item.map_err(|source| TelemetryError::Map { name: MAP_BLK_STATS.into(), source })?;
        let total = snap.entry(key).or_default();
        for v in values.iter() {
            total.accumulate(v);
        }
    }
    Ok(snap)
}

/// Reads the statistics map pinned by a running daemon under `pin_dir`.
pub fn read_pinned(pin_dir: &Path) -> Result<BlkSnapshot, TelemetryError> {
    let path = pin_dir.join(MAP_BLK_STATS);
    if !path.exists() {
        return Err(TelemetryError::NotPinned(path));
    }
    let err = |source| TelemetryError::Map { name: path.display().to_string(), source };
    let data = MapData::from_pin(&path).map_err(err)?;
    let map = Map::from_map_data(data).map_err(err)?;
    let map: PerCpuHashMap<MapData, BlkStatsKey, BlkStats> = PerCpuHashMap::try_from(map).map_err(err)?;
    sum_per_cpu(&map)
}
