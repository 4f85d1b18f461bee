//! Run-queue latency (the runqlat shape) from the BTF tracepoints (`tp_btf`) `sched_wakeup`,
//! `sched_wakeup_new` and `sched_switch`. These fire on every wakeup and context switch, so:
//! - they are raw BTF tracepoints: no trace record is built for them (a classic tracepoint with
//!   a BPF program fills a perf record first, which cost more than the program itself), and the
//!   arguments are read straight from the context;
//! - a task's pid is loaded straight from its `task_struct` (offset from the kernel's BTF, a
//!   BTF-checked load, no helper);
//! - the wakeup time lives in a direct-mapped array indexed by a hash of the pid (`runq_start`),
//!   whose lookup the verifier inlines: no helper call, no lock, no allocation per event (task
//!   storage, used before, cost a helper call and two dependent pointer loads per event).
//!
//! Layout of the maps and what a slot collision costs: `mirror_common::sched`.

use aya_ebpf::{
    btf_maps::{Array, PerCpuArray},
    helpers::bpf_ktime_get_ns,
    macros::{btf_map, btf_tracepoint},
    programs::BtfTracePointContext,
};
use mirror_common::{
    hist::LatHist,
    sched::{runq_pack, runq_slot, runq_wait, still_runnable, SchedOffsets, RUNQ_SLOTS},
};

/// `task_struct` member offsets, filled in by userspace from the kernel's BTF before load.
#[unsafe(no_mangle)]
static SCHED_OFFSETS: SchedOffsets = SchedOffsets {
    task_pid: 0,
    valid: 0,
};

/// Per waiting task: when it became runnable, packed with its pid (`mirror_common::sched`).
#[btf_map(name = "runq_start")]
static RUNQ_START: Array<u64, { RUNQ_SLOTS as usize }> = Array::new();

#[btf_map(name = "runq_hist")]
static RUNQ_HIST: PerCpuArray<LatHist, 1> = PerCpuArray::new();

/// The pid of a task given as a `tp_btf` argument (`task_struct *`), or `None` when the
/// offsets are missing (the programs then do nothing).
#[inline(always)]
fn pid_of(task: u64) -> Option<u32> {
    // SAFETY: a plain read of a static; volatile so the compiler does not constant-fold the
    // zero initializer that userspace rewrites in .rodata before load.
    let off = unsafe { core::ptr::read_volatile(&SCHED_OFFSETS) };
    if off.valid == 0 {
        return None;
    }
    // SAFETY: `task` is the tracepoint's typed task_struct pointer and the offset a verifier-known
    // constant: the verifier checks the load against the kernel's BTF (an int member of this
    // size), and the JIT makes a faulting load read 0.
    Some(unsafe {
        core::ptr::read_volatile(
            (task as *const u8).wrapping_add(off.task_pid as usize) as *const u32
        )
    })
}

#[inline(always)]
fn slot(pid: u32) -> Option<*mut u64> {
    RUNQ_START.get_ptr_mut(runq_slot(pid))
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// Stamps a task that became runnable at `t`. pid 0 is the idle task, never measured.
#[inline(always)]
fn stamp(pid: u32, t: u64) {
    if pid == 0 {
        return;
    }
    if let Some(s) = slot(pid) {
        // SAFETY: an element of an array map; one aligned 8-byte store, so a reader on another
        // CPU sees the old or the new value, never a mix.
        unsafe { core::ptr::write_volatile(s, runq_pack(t, pid)) };
    }
}

#[inline(always)]
fn woken(ctx: &BtfTracePointContext) {
    if let Some(pid) = pid_of(ctx.arg::<u64>(0)) {
        stamp(pid, now());
    }
}

/// `sched_wakeup(struct task_struct *p)`
#[btf_tracepoint(function = "sched_wakeup")]
pub fn sched_wakeup(ctx: BtfTracePointContext) -> i32 {
    woken(&ctx);
    0
}

/// `sched_wakeup_new(struct task_struct *p)`
#[btf_tracepoint(function = "sched_wakeup_new")]
pub fn sched_wakeup_new(ctx: BtfTracePointContext) -> i32 {
    woken(&ctx);
    0
}

/// `sched_switch(bool preempt, struct task_struct *prev, struct task_struct *next,
/// unsigned int prev_state)` (5.18+; `prev_state` is the raw `__state`, 0 = TASK_RUNNING).
///
/// A switch that neither stamps `prev` nor finds a stamp for `next` (a task going to sleep and
/// idle coming in, say) reads no clock.
#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch(ctx: BtfTracePointContext) -> i32 {
    let preempt = ctx.arg::<u64>(0) & 0xff != 0;
    let prev_state = ctx.arg::<u64>(3) & 0xffff_ffff;
    let Some(next_pid) = pid_of(ctx.arg::<u64>(2)) else {
        return 0;
    };
    // Preempted (or yielded) while runnable: it waits on the run queue from now.
    let prev_pid = if still_runnable(preempt, prev_state) {
        pid_of(ctx.arg::<u64>(1)).unwrap_or(0)
    } else {
        0
    };
    let next_slot = if next_pid != 0 { slot(next_pid) } else { None };
    // SAFETY: an element of an array map (aligned 8-byte load).
    let next_stamp = next_slot.map_or(0, |s| unsafe { core::ptr::read_volatile(s) });
    let waiting = next_stamp != 0;
    if prev_pid == 0 && !waiting {
        return 0;
    }
    let t = now();
    if let (Some(s), Some(wait)) = (next_slot, runq_wait(next_stamp, next_pid, t)) {
        // Only its own stamp is cleared: a different pid's is another waiting task's. Cleared
        // before prev is stamped, which may land in the same slot.
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(s, 0) };
        if let Some(h) = RUNQ_HIST.get_ptr_mut(0) {
            // SAFETY: this CPU's slot of a per-CPU array; a program does not migrate while
            // running and these programs do not nest on one CPU.
            unsafe { (*h).record(wait) };
        }
    }
    stamp(prev_pid, t);
    0
}
