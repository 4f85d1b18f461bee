//! Run-queue latency (the runqlat shape) from the BTF tracepoints (`tp_btf`) `sched_wakeup`,
//! `sched_wakeup_new` and `sched_switch`. These fire on every wakeup and context switch, so:
//! - they are raw BTF tracepoints: no trace record is built for them (a classic tracepoint with
//!   a BPF program fills a perf record first, which cost more than the program itself), and the
//!   arguments are read straight from the context;
//! - the wakeup time lives in task-local storage (`runq_start`), not in a shared hash map: no
//!   bucket lock, no element allocation per event, and it goes away with the task;
//! - the switching-out task's pid comes from `bpf_get_current_pid_tgid` (it is `current`).
//!
//! Layout of the maps: `mirror_common::sched`.

use aya_ebpf::{
    bindings::{task_struct, BPF_F_NO_PREALLOC, BPF_LOCAL_STORAGE_GET_F_CREATE},
    btf_maps::PerCpuArray,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, generated::bpf_task_storage_get},
    macros::{btf_map, btf_tracepoint},
    programs::BtfTracePointContext,
};
use mirror_common::{hist::LatHist, sched::still_runnable};

/// A BTF map definition of type `BPF_MAP_TYPE_TASK_STORAGE` (29), which aya-ebpf 0.2.1 does
/// not wrap; same shape as its `btf_map_def!` output (the loader reads the member types).
#[repr(C)]
pub struct TaskStorage<T> {
    r#type: *const [i32; 29],
    key: *const i32,
    value: *const T,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
}

// SAFETY: the fields are placeholders the loader patches; they are never dereferenced.
unsafe impl<T> Sync for TaskStorage<T> {}

impl<T> TaskStorage<T> {
    pub const fn new() -> Self {
        Self {
            r#type: core::ptr::null(),
            key: core::ptr::null(),
            value: core::ptr::null(),
            max_entries: core::ptr::null(),
            map_flags: core::ptr::null(),
        }
    }

    /// The task's value, created zeroed when `create` and absent; `None` when absent (or when
    /// the kernel refuses under recursion).
    #[inline(always)]
    fn get(&self, task: *mut task_struct, create: bool) -> Option<*mut T> {
        let flags = if create {
            u64::from(BPF_LOCAL_STORAGE_GET_F_CREATE)
        } else {
            0
        };
        // SAFETY: `self` is a map definition the loader turned into a map fd; `task` is a
        // trusted task_struct pointer straight from the tracepoint's arguments.
        let p = unsafe {
            bpf_task_storage_get(
                core::ptr::from_ref(self).cast_mut().cast(),
                task,
                core::ptr::null_mut(),
                flags,
            )
        };
        (!p.is_null()).then_some(p.cast())
    }
}

/// Per task: when it became runnable, in `bpf_ktime_get_ns` time; 0 when not waiting.
#[btf_map(name = "runq_start")]
static RUNQ_START: TaskStorage<u64> = TaskStorage::new();

#[btf_map(name = "runq_hist")]
static RUNQ_HIST: PerCpuArray<LatHist, 1> = PerCpuArray::new();

#[inline(always)]
fn stamp(task: *mut task_struct, now: u64) {
    if let Some(p) = RUNQ_START.get(task, true) {
        // SAFETY: a live task-local storage value of this map.
        unsafe { *p = now };
    }
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// `sched_wakeup(struct task_struct *p)`
#[btf_tracepoint(function = "sched_wakeup")]
pub fn sched_wakeup(ctx: BtfTracePointContext) -> i32 {
    stamp(ctx.arg::<*mut task_struct>(0), now());
    0
}

/// `sched_wakeup_new(struct task_struct *p)`
#[btf_tracepoint(function = "sched_wakeup_new")]
pub fn sched_wakeup_new(ctx: BtfTracePointContext) -> i32 {
    stamp(ctx.arg::<*mut task_struct>(0), now());
    0
}

/// `sched_switch(bool preempt, struct task_struct *prev, struct task_struct *next,
/// unsigned int prev_state)` (5.18+; `prev_state` is the raw `__state`, 0 = TASK_RUNNING).
#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch(ctx: BtfTracePointContext) -> i32 {
    let preempt = ctx.arg::<u64>(0) & 0xff != 0;
    let prev = ctx.arg::<*mut task_struct>(1);
    let next = ctx.arg::<*mut task_struct>(2);
    let prev_state = ctx.arg::<u64>(3) & 0xffff_ffff;
    let t = now();
    // `current` is still prev here; pid 0 is the idle task, never measured.
    let prev_pid = bpf_get_current_pid_tgid() as u32;
    if prev_pid != 0 && still_runnable(preempt, prev_state) {
        // Preempted (or yielded) while runnable: it waits on the run queue from now.
        stamp(prev, t);
    }
    let Some(p) = RUNQ_START.get(next, false) else {
        return 0;
    };
    // SAFETY: a live task-local storage value of this map.
    let start = unsafe { core::ptr::replace(p, 0) };
    if start == 0 {
        return 0;
    }
    if let Some(h) = RUNQ_HIST.get_ptr_mut(0) {
        // SAFETY: this CPU's slot of a per-CPU array; a program does not migrate while running
        // and these programs do not nest on one CPU.
        unsafe { (*h).record(t.saturating_sub(start)) };
    }
    0
}
