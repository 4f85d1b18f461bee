//! Run-queue latency (the runqlat shape): time from a task becoming runnable (woken, or preempted
//! while still runnable) to it running on a CPU, from the BTF tracepoints `sched_wakeup`,
//! `sched_wakeup_new` and `sched_switch`.
//!
//! Map `runq_start` (task-local storage, `u64` ns per task, 0 when not waiting): when each
//! runnable task became runnable. Not pinned (bpftool cannot dump task storage by key).
//! Map `runq_hist` (per-CPU array, one [`LatHist`](crate::hist::LatHist) at index 0): cumulative.

/// Name (and pin name) of the wakeup-time map.
pub const MAP_RUNQ_START: &str = "runq_start";
/// Name (and pin name) of the histogram map.
pub const MAP_RUNQ_HIST: &str = "runq_hist";
/// `TASK_RUNNING`: the raw `__state` of a task that stays on the run queue.
pub const TASK_RUNNING: u64 = 0;

/// True when a task switched out is still runnable: preempted, or switched out with state
/// `TASK_RUNNING` (yield). Any other state means it went to sleep and will be woken.
#[inline(always)]
pub const fn still_runnable(preempt: bool, prev_state: u64) -> bool {
    preempt || prev_state == TASK_RUNNING
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runnable_states() {
        assert!(still_runnable(true, 1)); // preempted while setting up to sleep
        assert!(still_runnable(false, 0)); // yield
        assert!(!still_runnable(false, 1)); // TASK_INTERRUPTIBLE
        assert!(!still_runnable(false, 2)); // TASK_UNINTERRUPTIBLE
        assert!(!still_runnable(false, 0x402)); // TASK_IDLE
    }
}
