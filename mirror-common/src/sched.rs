//! Run-queue latency (the runqlat shape): time from a task becoming runnable (woken, or preempted
//! while still runnable) to it running on a CPU. By default from the BTF tracepoint
//! `sched_switch` alone, reading the scheduler's own `sched_info.last_queued` stamp of the
//! incoming task and the run queue's clock (see [`SchedOffsets`]); as a fallback from
//! `sched_wakeup`, `sched_wakeup_new` and `sched_switch`, stamping wakeups in `runq_start`.
//!
//! Map `runq_start` (fallback only) (array of [`RUNQ_SLOTS`] `u64`, not pinned): when waiting tasks became
//! runnable, direct-mapped by pid (see [`runq_slot`], [`runq_pack`]). Slot `i` holds
//! `(t << RUNQ_PID_BITS) | pid` for a task whose pid maps to `i`, stamped at `t` (the low
//! [`RUNQ_TIME_BITS`] bits of `bpf_ktime_get_ns`), or 0. A slot is cleared when its task runs. Two
//! tasks waiting at once in the same slot: the later stamp replaces the earlier one, whose wait is
//! then not measured (with `W` tasks waiting at once, about `W / RUNQ_SLOTS` of the waits).
//! Map `runq_hist` (per-CPU array, one [`LatHist`](crate::hist::LatHist) at index 0): cumulative.
//! Map `runq_sampling` (array, one [`RunqSampling`] at index 0), written by the daemon only: how
//! long the run-queue programs have been attached. The default program fires on every context
//! switch, so the daemon attaches it for a share of each period only (a duty cycle, say 50 ms of
//! every 250 ms): the histogram then holds a time sample of the switches, which leaves its
//! percentiles unbiased (the wait of a task switched in during a window is measured whole,
//! from the scheduler's own stamp, however long before the window it was queued), and rates
//! are per second of attached time ([`RunqSampling::on_ns_at`]).

use bytemuck::{Pod, Zeroable};

/// Name (and pin name) of the wakeup-time map.
pub const MAP_RUNQ_START: &str = "runq_start";
/// Name (and pin name) of the histogram map.
pub const MAP_RUNQ_HIST: &str = "runq_hist";
/// Name (and pin name) of the duty-cycle map.
pub const MAP_RUNQ_SAMPLING: &str = "runq_sampling";
/// Name of the global holding the `task_struct` member offsets.
pub const GLOBAL_SCHED_OFFSETS: &str = "SCHED_OFFSETS";
/// `TASK_RUNNING`: the raw `__state` of a task that stays on the run queue.
pub const TASK_RUNNING: u64 = 0;

/// log2 of the number of slots of `runq_start`.
pub const RUNQ_SLOT_BITS: u32 = 14;
/// Slots of `runq_start` (16384: 128 KiB).
pub const RUNQ_SLOTS: u32 = 1 << RUNQ_SLOT_BITS;
/// Bits of a slot holding the pid: the kernel's `PID_MAX_LIMIT` is 2^22 on 64-bit.
pub const RUNQ_PID_BITS: u32 = 22;
/// Bits of a slot holding the stamp: waits are measured modulo 2^42 ns (73 minutes).
pub const RUNQ_TIME_BITS: u32 = 64 - RUNQ_PID_BITS;

/// Member offsets the run-queue programs read, from the kernel's BTF.
///
/// The default program (`sched_switch_info`) reads what the scheduler itself keeps for
/// `/proc/PID/schedstat` (`CONFIG_SCHED_INFO`): `task_struct.sched_info.last_queued`
/// ([`Self::task_last_queued`], the run-queue clock when the task was queued, 0 when not
/// queued) and the run queue's clock through `task_struct.se.cfs_rq` -> `cfs_rq.rq` ->
/// `rq.clock`; `info_valid == 0` when one is missing. The stamping fallback
/// (`sched_wakeup`, `sched_wakeup_new`, `sched_switch`) reads `task_struct.pid`; `valid == 0`
/// when it is missing. Programs whose offsets are not valid ignore every event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SchedOffsets {
    pub task_pid: u32,
    pub valid: u32,
    /// `task_struct.sched_info` + `sched_info.last_queued`.
    pub task_last_queued: u32,
    /// `task_struct.se` + `sched_entity.cfs_rq`.
    pub task_cfs_rq: u32,
    pub cfs_rq_rq: u32,
    pub rq_clock: u32,
    pub info_valid: u32,
    pub _pad: u32,
}

/// True when a task switched out is still runnable: preempted, or switched out with state
/// `TASK_RUNNING` (yield). Any other state means it went to sleep and will be woken.
#[inline(always)]
pub const fn still_runnable(preempt: bool, prev_state: u64) -> bool {
    preempt || prev_state == TASK_RUNNING
}

/// The `runq_start` slot of a pid: the top bits of a multiplicative (Fibonacci) hash, so
/// consecutive pids spread over the table.
#[inline(always)]
pub const fn runq_slot(pid: u32) -> u32 {
    pid.wrapping_mul(0x9e37_79b1) >> (32 - RUNQ_SLOT_BITS)
}

/// A slot's value: the stamp `t` (ns, low [`RUNQ_TIME_BITS`] bits kept) and the pid. Never 0 for
/// a pid other than 0.
#[inline(always)]
pub const fn runq_pack(t: u64, pid: u32) -> u64 {
    (t << RUNQ_PID_BITS) | (pid as u64 & ((1 << RUNQ_PID_BITS) - 1))
}

/// The wait from a slot's value to `now`, if the slot holds `pid`'s stamp.
#[inline(always)]
pub const fn runq_wait(slot: u64, pid: u32, now: u64) -> Option<u64> {
    if slot == 0 || slot & ((1 << RUNQ_PID_BITS) - 1) != pid as u64 {
        return None;
    }
    let since = slot >> RUNQ_PID_BITS;
    Some(now.wrapping_sub(since) & ((1 << RUNQ_TIME_BITS) - 1))
}

/// How long the run-queue programs have been attached (see the module documentation). Times are
/// CLOCK_MONOTONIC nanoseconds (`bpf_ktime_get_ns`'s clock), so any process of the node can
/// tell the attached time up to its own "now".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct RunqSampling {
    /// Attached time of every window already closed.
    pub on_ns: u64,
    /// Start of the open window; 0 while detached.
    pub on_since_ns: u64,
    /// Configured share of each period attached, percent (100: always attached).
    pub duty_pct: u32,
    /// Length of the sampling period, milliseconds.
    pub period_ms: u32,
}

impl RunqSampling {
    /// Attached time up to `now_ns`: the closed windows plus the open one's part before `now_ns`.
    #[inline(always)]
    pub const fn on_ns_at(&self, now_ns: u64) -> u64 {
        if self.on_since_ns != 0 && now_ns > self.on_since_ns {
            self.on_ns + (now_ns - self.on_since_ns)
        } else {
            self.on_ns
        }
    }
}

const _: () = {
    assert!(core::mem::size_of::<RunqSampling>() == 24);
    assert!(core::mem::align_of::<RunqSampling>() == 8);
    assert!(core::mem::size_of::<SchedOffsets>() == 32);
    assert!(RUNQ_SLOTS.is_power_of_two());
};

#[cfg(feature = "user")]
// SAFETY: #[repr(C)], no padding (bytemuck's Pod derive checks it), every bit pattern valid.
unsafe impl aya::Pod for SchedOffsets {}

#[cfg(feature = "user")]
// SAFETY: #[repr(C)], no padding (bytemuck's Pod derive checks it), every bit pattern valid.
unsafe impl aya::Pod for RunqSampling {}

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

    #[test]
    fn slots_spread_and_stay_in_range() {
        let mut seen = [false; RUNQ_SLOTS as usize];
        let mut distinct = 0;
        for pid in 1..=4096u32 {
            let s = runq_slot(pid);
            assert!(s < RUNQ_SLOTS);
            if !seen[s as usize] {
                seen[s as usize] = true;
                distinct += 1;
            }
        }
        // 4096 consecutive pids over 16384 slots: a Fibonacci hash leaves almost no collisions.
        assert!(distinct > 4000, "{distinct} distinct slots");
        assert!(runq_slot(4_194_303) < RUNQ_SLOTS);
    }

    #[test]
    fn attached_time_counts_the_open_window_up_to_now() {
        let mut s = RunqSampling { on_ns: 500, on_since_ns: 0, duty_pct: 20, period_ms: 250 };
        assert_eq!(s.on_ns_at(10_000), 500);
        s.on_since_ns = 9_000;
        assert_eq!(s.on_ns_at(10_000), 1_500);
        // A reader whose clock read came before the window opened.
        assert_eq!(s.on_ns_at(8_000), 500);
    }

    #[test]
    fn pack_and_wait() {
        let t = 123_456_789_012_345u64;
        let v = runq_pack(t, 4_194_303);
        assert_ne!(v, 0);
        assert_eq!(runq_wait(v, 4_194_303, t + 5_000), Some(5_000));
        // Another task in the same slot, or an empty slot: no wait.
        assert_eq!(runq_wait(v, 42, t + 5_000), None);
        assert_eq!(runq_wait(0, 42, t), None);
        // Across a wrap of the kept time bits.
        let t = (1u64 << RUNQ_TIME_BITS) - 10;
        assert_eq!(runq_wait(runq_pack(t, 7), 7, t + 30), Some(30));
    }
}
