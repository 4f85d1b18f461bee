//! Direct-reclaim stalls from `vmscan:mm_vmscan_direct_reclaim_begin` / `_end`. Both fire in the
//! stalled task's context, so the key is the current pid and no record field is read.
//! Layout and semantics of the maps: `mirror_common::mm`.

use aya_ebpf::{
    btf_maps::{HashMap, PerCpuArray},
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{btf_map, tracepoint},
    programs::TracePointContext,
};
use aya_log_ebpf::warn;
use mirror_common::{hist::LatHist, mm::RECLAIM_START_ENTRIES};

#[btf_map(name = "reclaim_start")]
static RECLAIM_START: HashMap<u32, u64, { RECLAIM_START_ENTRIES as usize }> = HashMap::new();

#[btf_map(name = "reclaim_stats")]
static RECLAIM_STATS: PerCpuArray<LatHist, 1> = PerCpuArray::new();

#[inline(always)]
fn current_pid() -> u32 {
    // The low half is the thread id.
    bpf_get_current_pid_tgid() as u32
}

#[tracepoint(category = "vmscan", name = "mm_vmscan_direct_reclaim_begin")]
pub fn reclaim_begin(ctx: TracePointContext) -> u32 {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let pid = current_pid();
    if RECLAIM_START.insert(&pid, &now, 0).is_err() {
        // Rare (the map holds more tasks than can stall at once): worth a line in the daemon log.
        warn!(&ctx, "reclaim_start full: stall of pid {} not measured", pid);
    }
    0
}

#[tracepoint(category = "vmscan", name = "mm_vmscan_direct_reclaim_end")]
pub fn reclaim_end(_ctx: TracePointContext) -> u32 {
    let pid = current_pid();
    let Some(start) = RECLAIM_START.get_ptr(&pid) else {
        return 0;
    };
    // SAFETY: the pointer came from a successful lookup and is read before the remove below.
    let start = unsafe { *start };
    let _ = RECLAIM_START.remove(&pid);
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(h) = RECLAIM_STATS.get_ptr_mut(0) {
        // SAFETY: this CPU's slot of a per-CPU array; see sched.rs.
        unsafe { (*h).record(now.saturating_sub(start)) };
    }
    0
}
