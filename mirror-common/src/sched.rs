//! Run-queue latency (the runqlat shape): time from a task becoming runnable (woken, or preempted
//! while still runnable) to it running on a CPU, from the `sched:sched_wakeup`,
//! `sched:sched_wakeup_new` and `sched:sched_switch` tracepoints.
//!
//! Map `runq_start` (hash, pid `u32` -> `u64` ns): when each runnable task became runnable.
//! Map `runq_hist` (per-CPU array, one [`LatHist`](crate::hist::LatHist) at index 0): cumulative.

use bytemuck::{Pod, Zeroable};

/// Name (and pin name) of the wakeup-time map.
pub const MAP_RUNQ_START: &str = "runq_start";
/// Name (and pin name) of the histogram map.
pub const MAP_RUNQ_HIST: &str = "runq_hist";
/// Name of the global holding the tracepoint field offsets.
pub const GLOBAL_SCHED_OFFSETS: &str = "SCHED_OFFSETS";
/// Capacity of the wakeup-time map (runnable tasks at once).
pub const RUNQ_START_ENTRIES: u32 = 16384;

/// `sched_switch`'s `prev_state` reports a preempted task as `TASK_REPORT_MAX` (0x100 on 5.x/6.x,
/// printed `R+`) and a task that stayed runnable as 0; any bit below this mask is a sleeping state.
pub const SCHED_STATE_SLEEP_MASK: u64 = 0xff;

/// Offsets of the fields read in the sched tracepoint records, parsed by userspace from tracefs.
/// `prev_state_size` is 4 or 8 (`long` since 5.x, `int` on some older kernels).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SchedTpOffsets {
    pub wakeup_pid: u32,
    pub wakeup_new_pid: u32,
    pub switch_prev_pid: u32,
    pub switch_prev_state: u32,
    pub switch_prev_state_size: u32,
    pub switch_next_pid: u32,
    pub valid: u32,
    pub _pad: u32,
}

/// True when a task switched out with this `prev_state` is still runnable (preempted or yielded).
#[inline(always)]
pub const fn still_runnable(prev_state: u64) -> bool {
    prev_state & SCHED_STATE_SLEEP_MASK == 0
}

const _: () = assert!(core::mem::size_of::<SchedTpOffsets>() == 32);

#[cfg(feature = "user")]
// SAFETY: #[repr(C)], no padding (bytemuck's Pod derive checks it), every bit pattern valid.
unsafe impl aya::Pod for SchedTpOffsets {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runnable_states() {
        assert!(still_runnable(0)); // R
        assert!(still_runnable(0x100)); // R+ (preempted)
        assert!(!still_runnable(1)); // S
        assert!(!still_runnable(2)); // D
        assert!(!still_runnable(0x80)); // I
    }
}
