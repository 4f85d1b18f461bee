//! Memory pressure: direct-reclaim stalls, from `vmscan:mm_vmscan_direct_reclaim_begin` / `_end`
//! and `vmscan:mm_vmscan_memcg_reclaim_begin` / `_end` (a task over its memory cgroup's limit
//! reclaiming on its own; the usual stall in containers). All fire in the stalled task's context,
//! so the key is the current pid; no record fields are read.
//!
//! Map `reclaim_start` (hash, pid `u32` -> `u64` ns): tasks inside direct reclaim.
//! Map `reclaim_stats` (per-CPU array, one [`LatHist`](crate::hist::LatHist) at index 0): stall
//! count, total and histogram, cumulative.

/// Name (and pin name) of the in-reclaim map.
pub const MAP_RECLAIM_START: &str = "reclaim_start";
/// Name (and pin name) of the stall statistics map.
pub const MAP_RECLAIM_STATS: &str = "reclaim_stats";
/// Capacity of the in-reclaim map.
pub const RECLAIM_START_ENTRIES: u32 = 4096;
