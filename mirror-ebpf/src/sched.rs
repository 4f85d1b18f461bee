//! Run-queue latency (the runqlat shape) from the BTF tracepoints (`tp_btf`) `sched_wakeup`,
//! `sched_wakeup_new` and `sched_switch`. These fire on every wakeup and context switch, so they
//! are raw BTF tracepoints: no trace record is built for them (a classic tracepoint with a BPF
//! program fills a perf record first, which cost this workload several times the program
//! itself), and the arguments are read straight from the context. Tasks are keyed by their
//! `task_struct` address, so no field of it is read either; the switching-out task's pid comes
//! from `bpf_get_current_pid_tgid` (it is `current`). Layout of the maps: `mirror_common::sched`.

use aya_ebpf::{
    btf_maps::{HashMap, PerCpuArray},
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{btf_map, btf_tracepoint},
    programs::BtfTracePointContext,
};
use mirror_common::{
    hist::LatHist,
    sched::{still_runnable, RUNQ_START_ENTRIES},
};

#[btf_map(name = "runq_start")]
static RUNQ_START: HashMap<u64, u64, { RUNQ_START_ENTRIES as usize }> = HashMap::new();

#[btf_map(name = "runq_hist")]
static RUNQ_HIST: PerCpuArray<LatHist, 1> = PerCpuArray::new();

#[inline(always)]
fn stamp(task: u64) {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // A full map drops the sample; nothing else to do from here.
    let _ = RUNQ_START.insert(&task, &now, 0);
}

/// `sched_wakeup(struct task_struct *p)`
#[btf_tracepoint(function = "sched_wakeup")]
pub fn sched_wakeup(ctx: BtfTracePointContext) -> i32 {
    stamp(ctx.arg::<u64>(0));
    0
}

/// `sched_wakeup_new(struct task_struct *p)`
#[btf_tracepoint(function = "sched_wakeup_new")]
pub fn sched_wakeup_new(ctx: BtfTracePointContext) -> i32 {
    stamp(ctx.arg::<u64>(0));
    0
}

/// `sched_switch(bool preempt, struct task_struct *prev, struct task_struct *next,
/// unsigned int prev_state)` (5.18+; `prev_state` is the raw `__state`, 0 = TASK_RUNNING).
#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch(ctx: BtfTracePointContext) -> i32 {
    let preempt = ctx.arg::<u64>(0) & 0xff != 0;
    let prev = ctx.arg::<u64>(1);
    let next = ctx.arg::<u64>(2);
    let prev_state = ctx.arg::<u64>(3) & 0xffff_ffff;
    // `current` is still prev here; pid 0 is the idle task, never measured.
    let prev_pid = bpf_get_current_pid_tgid() as u32;
    if prev_pid != 0 && still_runnable(preempt, prev_state) {
        // Preempted (or yielded) while runnable: it waits on the run queue from now.
        stamp(prev);
    }
    let Some(start) = RUNQ_START.get_ptr(&next) else {
        return 0;
    };
    // SAFETY: the pointer came from a successful lookup and is read before the remove below.
    let start = unsafe { *start };
    let _ = RUNQ_START.remove(&next);
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(h) = RUNQ_HIST.get_ptr_mut(0) {
        // SAFETY: this CPU's slot of a per-CPU array; a program does not migrate while running
        // and these programs do not nest on one CPU.
        unsafe { (*h).record(now.saturating_sub(start)) };
    }
    0
}
