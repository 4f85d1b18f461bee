//! Run-queue latency from `sched:sched_wakeup`, `sched:sched_wakeup_new` and `sched:sched_switch`.
//! These fire very often: the programs do one field read or three, one map update or lookup and
//! delete, and no logging. Layout and semantics of the maps: `mirror_common::sched`.

use aya_ebpf::{
    btf_maps::{HashMap, PerCpuArray},
    helpers::bpf_ktime_get_ns,
    macros::{btf_map, tracepoint},
    programs::TracePointContext,
};
use mirror_common::{
    hist::LatHist,
    sched::{still_runnable, SchedTpOffsets, RUNQ_START_ENTRIES},
};

use crate::record::Record;

/// Tracepoint field offsets, filled in by userspace before load (see `SchedTpOffsets`).
#[unsafe(no_mangle)]
static SCHED_OFFSETS: SchedTpOffsets = SchedTpOffsets {
    wakeup_pid: 0,
    wakeup_new_pid: 0,
    switch_prev_pid: 0,
    switch_prev_state: 0,
    switch_prev_state_size: 0,
    switch_next_pid: 0,
    valid: 0,
    _pad: 0,
};

#[btf_map(name = "runq_start")]
static RUNQ_START: HashMap<u32, u64, { RUNQ_START_ENTRIES as usize }> = HashMap::new();

#[btf_map(name = "runq_hist")]
static RUNQ_HIST: PerCpuArray<LatHist, 1> = PerCpuArray::new();

#[inline(always)]
fn offsets() -> SchedTpOffsets {
    // SAFETY: a plain read of a static; volatile so the compiler does not constant-fold the
    // zero initializer that userspace rewrites in .rodata before load.
    unsafe { core::ptr::read_volatile(&SCHED_OFFSETS) }
}

#[inline(always)]
fn stamp(pid: u32) {
    if pid == 0 {
        return;
    }
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // A full map drops the sample; nothing else to do from here.
    let _ = RUNQ_START.insert(&pid, &now, 0);
}

#[inline(always)]
fn wakeup(ctx: &TracePointContext, offset: u32) {
    // SAFETY: offset from the tracepoint's format file; read_at uses bpf_probe_read_kernel,
    // so a wrong offset reads garbage, never faults. One field: a direct read is cheapest.
    if let Ok(pid) = unsafe { ctx.read_at::<i32>(offset as usize) } {
        stamp(pid as u32);
    }
}

#[tracepoint(category = "sched", name = "sched_wakeup")]
pub fn sched_wakeup(ctx: TracePointContext) -> u32 {
    let off = offsets();
    if off.valid != 0 {
        wakeup(&ctx, off.wakeup_pid);
    }
    0
}

#[tracepoint(category = "sched", name = "sched_wakeup_new")]
pub fn sched_wakeup_new(ctx: TracePointContext) -> u32 {
    let off = offsets();
    if off.valid != 0 {
        wakeup(&ctx, off.wakeup_new_pid);
    }
    0
}

#[tracepoint(category = "sched", name = "sched_switch")]
pub fn sched_switch(ctx: TracePointContext) -> u32 {
    let _ = try_switch(&ctx);
    0
}

#[inline(always)]
fn try_switch(ctx: &TracePointContext) -> Result<(), i64> {
    let off = offsets();
    if off.valid == 0 {
        return Ok(());
    }
    let rec = Record::read(ctx).ok_or(-1i64)?;
    let prev_pid = rec.u32(off.switch_prev_pid);
    let next_pid = rec.u32(off.switch_next_pid);
    let prev_state = if off.switch_prev_state_size == 8 {
        rec.u64(off.switch_prev_state)
    } else {
        u64::from(rec.u32(off.switch_prev_state))
    };
    if still_runnable(prev_state) {
        // Preempted: it waits on the run queue from now.
        stamp(prev_pid);
    }
    if next_pid == 0 {
        return Ok(());
    }
    let Some(start) = RUNQ_START.get_ptr(&next_pid) else {
        return Ok(());
    };
    // SAFETY: the pointer came from a successful lookup and is read before the remove below.
    let start = unsafe { *start };
    let _ = RUNQ_START.remove(&next_pid);
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(h) = RUNQ_HIST.get_ptr_mut(0) {
        // SAFETY: this CPU's slot of a per-CPU array; a program does not migrate while running
        // and tracepoint programs do not nest on one CPU.
        unsafe { (*h).record(now.saturating_sub(start)) };
    }
    Ok(())
}
