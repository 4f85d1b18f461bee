//! Run-queue latency (the runqlat shape): from becoming runnable (woken, or preempted while
//! runnable) to running. These programs fire on every context switch, so they are raw BTF
//! tracepoints (`tp_btf`: no trace record is built, arguments come straight from the context) and
//! load the kernel members they need directly (offsets from the kernel's BTF in `SCHED_OFFSETS`,
//! BTF-checked loads, no helper).
//!
//! - Default, `sched_switch_info` alone: the scheduler already stamps queued tasks for its own
//!   `sched_info` statistics; the program reads that stamp and the run queue's clock at the
//!   switch. No wakeup program, no map of stamps, no clock read.
//! - Fallback when the kernel lacks those members (`sched_wakeup`, `sched_wakeup_new`,
//!   `sched_switch`): the programs stamp wakeups themselves, in a direct-mapped array indexed by
//!   a hash of the pid (`runq_start`), whose lookup the verifier inlines (task-local storage,
//!   used before, cost a helper call and dependent pointer loads per event).
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
    sched::{runq_pack, runq_slot, runq_wait, still_runnable, RunqSampling, SchedOffsets, RUNQ_SLOTS},
};

/// `task_struct` member offsets, filled in by userspace from the kernel's BTF before load.
#[unsafe(no_mangle)]
static SCHED_OFFSETS: SchedOffsets = SchedOffsets {
    task_pid: 0,
    valid: 0,
    task_last_queued: 0,
    task_cfs_rq: 0,
    cfs_rq_rq: 0,
    rq_clock: 0,
    info_valid: 0,
    _pad: 0,
};

#[inline(always)]
fn offsets() -> SchedOffsets {
    // SAFETY: a plain read of a static; volatile so the compiler does not constant-fold the
    // zero initializer that userspace rewrites in .rodata before load.
    unsafe { core::ptr::read_volatile(&SCHED_OFFSETS) }
}

/// A `T` at `base + off`, where `base` is a BTF-typed kernel pointer (a `tp_btf` argument, or a
/// pointer member loaded through one) and `off` a member offset from `SCHED_OFFSETS`.
#[inline(always)]
fn load<T: Copy>(base: u64, off: u32) -> T {
    // SAFETY: the offset is a verifier-known constant (frozen read-only global), so the verifier
    // checks the load against the kernel's BTF (a member of this size), and the JIT makes a
    // faulting load (a NULL pointer, say) read 0.
    unsafe { core::ptr::read_volatile((base as *const u8).wrapping_add(off as usize) as *const T) }
}

/// `sched_switch(bool preempt, struct task_struct *prev, struct task_struct *next, ...)`, the
/// default run-queue program: the scheduler already stamps a task when it is queued (woken, or
/// preempted while runnable) in `sched_info.last_queued`, in run-queue clock time, and clears it
/// only after this tracepoint, when the task arrives on the CPU; `__schedule` updated this CPU's
/// run-queue clock just before. So the wait is `rq->clock - next->sched_info.last_queued`, the
/// very delta the kernel adds to the task's `run_delay`: no wakeup program, no map of stamps,
/// no clock helper. `next->se.cfs_rq->rq` is this CPU's run queue (set for every task on every
/// migration, whatever its class).
#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch_info(ctx: BtfTracePointContext) -> i32 {
    let off = offsets();
    if off.info_valid == 0 {
        return 0;
    }
    let next = ctx.arg::<u64>(2);
    let queued = load::<u64>(next, off.task_last_queued);
    if queued == 0 {
        // Not queued since it last ran (the idle task, or queued before the kernel kept it).
        return 0;
    }
    let rq = load::<u64>(load::<u64>(next, off.task_cfs_rq), off.cfs_rq_rq);
    let now = load::<u64>(rq, off.rq_clock);
    if rq == 0 || now < queued {
        return 0;
    }
    if let Some(h) = RUNQ_HIST.get_ptr_mut(0) {
        // SAFETY: this CPU's slot of a per-CPU array; a program does not migrate while running
        // and these programs do not nest on one CPU.
        unsafe { (*h).record(now - queued) };
    }
    0
}

/// Per waiting task: when it became runnable, packed with its pid (`mirror_common::sched`).
#[btf_map(name = "runq_start")]
static RUNQ_START: Array<u64, { RUNQ_SLOTS as usize }> = Array::new();

#[btf_map(name = "runq_hist")]
static RUNQ_HIST: PerCpuArray<LatHist, 1> = PerCpuArray::new();

/// The daemon's duty cycle of the run-queue programs (`mirror_common::sched::RunqSampling`);
/// written by userspace only, pinned for readers and bpftool.
#[btf_map(name = "runq_sampling")]
static RUNQ_SAMPLING: Array<RunqSampling, 1> = Array::new();

/// The pid of a task given as a `tp_btf` argument (`task_struct *`), or `None` when the
/// offsets are missing (the programs then do nothing).
#[inline(always)]
fn pid_of(task: u64) -> Option<u32> {
    let off = offsets();
    if off.valid == 0 {
        return None;
    }
    Some(load::<u32>(task, off.task_pid))
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
    let prev_pid =
        if still_runnable(preempt, prev_state) { pid_of(ctx.arg::<u64>(1)).unwrap_or(0) } else { 0 };
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
