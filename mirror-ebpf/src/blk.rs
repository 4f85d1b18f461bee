//! Block-layer latency from the `block:block_rq_issue` and `block:block_rq_complete` tracepoints.
//! Layout and semantics of the maps: `mirror_common::blk`.

use aya_ebpf::{
    btf_maps::{HashMap, PerCpuArray},
    helpers::bpf_ktime_get_ns,
    macros::{btf_map, btf_tracepoint, tracepoint},
    programs::{BtfTracePointContext, TracePointContext},
};
use aya_log_ebpf::warn;

use crate::record::Record;
use mirror_common::blk::{
    blk_sample_weight, blk_stats_slot, classify_req_op, classify_rwbs, hist_slot, BlkRqOffsets, BlkStart,
    BlkStartKey, BlkStatsKey, BlkStatsSlot, BlkTpOffsets, BLK_START_ENTRIES, BLK_STATS_ENTRIES,
    BLK_STATS_PROBES,
};

/// Tracepoint field offsets, filled in by userspace before load (see `BlkTpOffsets`).
#[unsafe(no_mangle)]
static BLK_OFFSETS: BlkTpOffsets = BlkTpOffsets {
    issue_dev: 0,
    issue_sector: 0,
    issue_bytes: 0,
    issue_rwbs: 0,
    complete_dev: 0,
    complete_sector: 0,
    complete_error: 0,
    complete_rwbs: 0,
    valid: 0,
    _pad: 0,
};

#[btf_map(name = "blk_start")]
static BLK_START: HashMap<BlkStartKey, BlkStart, { BLK_START_ENTRIES as usize }> = HashMap::new();

#[btf_map(name = "blk_stats")]
static BLK_STATS: PerCpuArray<BlkStatsSlot, { BLK_STATS_ENTRIES as usize }> = PerCpuArray::new();

#[inline(always)]
fn offsets() -> BlkTpOffsets {
    // SAFETY: a plain read of a static; volatile so the compiler does not constant-fold the
    // zero initializer that userspace rewrites in .rodata before load.
    unsafe { core::ptr::read_volatile(&BLK_OFFSETS) }
}

#[tracepoint(category = "block", name = "block_rq_issue")]
pub fn blk_rq_issue(ctx: TracePointContext) -> u32 {
    let _ = try_issue(&ctx);
    0
}

#[tracepoint(category = "block", name = "block_rq_complete")]
pub fn blk_rq_complete(ctx: TracePointContext) -> u32 {
    let _ = try_complete(&ctx);
    0
}

#[inline(always)]
fn try_issue(ctx: &TracePointContext) -> Result<(), i64> {
    let off = offsets();
    if off.valid == 0 {
        return Ok(());
    }
    let rec = Record::read(ctx).ok_or(-1i64)?;
    let dev = rec.u32(off.issue_dev);
    let sector = rec.u64(off.issue_sector);
    let bytes = rec.u32(off.issue_bytes);
    let rwbs = rec.bytes::<4>(off.issue_rwbs);
    let key = BlkStartKey { dev, _pad: 0, sector };
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let issue_ns = unsafe { bpf_ktime_get_ns() };
    let start = BlkStart { issue_ns, bytes, op: classify_rwbs(&rwbs) };
    if let Err(e) = BLK_START.insert(&key, &start, 0) {
        // Only when more than BLK_START_ENTRIES requests are in flight: worth a daemon log line.
        warn!(ctx, "blk_start full ({}): request on dev {} not measured", e, dev);
    }
    Ok(())
}

#[inline(always)]
fn try_complete(ctx: &TracePointContext) -> Result<(), i64> {
    let off = offsets();
    if off.valid == 0 {
        return Ok(());
    }
    let rec = Record::read(ctx).ok_or(-1i64)?;
    let dev = rec.u32(off.complete_dev);
    let sector = rec.u64(off.complete_sector);
    let error = rec.u32(off.complete_error) as i32;
    let key = BlkStartKey { dev, _pad: 0, sector };
    let Some(start) = BLK_START.get_ptr(&key) else {
        // Issued before we attached, or its slot was taken by another request.
        return Ok(());
    };
    // SAFETY: the pointer came from a successful lookup and is read before the remove below.
    let start = unsafe { *start };
    let _ = BLK_START.remove(&key);
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let lat = now.saturating_sub(start.issue_ns);

    let skey = BlkStatsKey { dev, op: start.op };
    account(&skey, u64::from(start.bytes), error != 0, Lat::Measured(lat))
}

/// A completed request's latency: measured already, or to be measured (when sampled) from its
/// start time.
#[derive(Clone, Copy)]
enum Lat {
    Measured(u64),
    Since { start_ns: u64, max_stride: u32 },
}

/// Adds one completed request to this CPU's statistics of its (device, op): the matching slot,
/// or the first free one, of the `BLK_STATS_PROBES` from `blk_stats_slot`. Counts and bytes
/// always; the latency with the weight the sampling gives it (`mirror_common::blk`).
#[inline(always)]
fn account(skey: &BlkStatsKey, bytes: u64, failed: bool, lat: Lat) -> Result<(), i64> {
    let first = blk_stats_slot(skey);
    let mut i = 0;
    while i < BLK_STATS_PROBES {
        let idx = (first + i) & (BLK_STATS_ENTRIES - 1);
        i += 1;
        let Some(slot) = BLK_STATS.get_ptr_mut(idx) else {
            continue;
        };
        // SAFETY: this CPU's copy of a per-CPU array element; BPF programs do not migrate while
        // running, and no other program instance touches this CPU's copy concurrently (the
        // kernel does not nest a program on one CPU).
        let slot = unsafe { &mut *slot };
        if slot.stats.ios == 0 {
            slot.key = *skey;
        } else if slot.key != *skey {
            continue;
        }
        let s = &mut slot.stats;
        s.ios += 1;
        s.bytes += bytes;
        if failed {
            s.errors += 1;
        }
        let (weight, lat) = match lat {
            Lat::Measured(l) => (1, l),
            Lat::Since { start_ns, max_stride } => {
                let w = blk_sample_weight(&mut slot.sample, start_ns, max_stride);
                if w == 0 {
                    return Ok(());
                }
                // SAFETY: bpf_ktime_get_ns has no preconditions.
                let now = unsafe { bpf_ktime_get_ns() };
                (u64::from(w), now.saturating_sub(start_ns))
            }
        };
        let s = &mut slot.stats;
        s.lat_measured += 1;
        s.lat_sum_ns += lat * weight;
        if lat > s.lat_max_ns {
            s.lat_max_ns = lat;
        }
        s.hist_us[hist_slot(lat)] += weight;
        return Ok(());
    }
    // More (device, op) pairs near this one than BLK_STATS_PROBES: not counted.
    Err(-1)
}

/// `struct request` member offsets, filled in by userspace from the kernel's BTF before load.
#[unsafe(no_mangle)]
static BLK_RQ_OFFSETS: BlkRqOffsets = BlkRqOffsets {
    rq_q: 0,
    rq_part: 0,
    bdev_dev: 0,
    rq_cmd_flags: 0,
    rq_start_time_ns: 0,
    q_disk: 0,
    disk_major: 0,
    disk_first_minor: 0,
    valid: 0,
    max_stride: 1,
};

/// The cheap path, preferred when the kernel's BTF has the members: one BTF tracepoint at
/// completion, `block_rq_complete(struct request *rq, blk_status_t error, unsigned int
/// nr_bytes)`, keyed by the request itself. The latency starts at the request's own
/// `start_time_ns` (stamped by the block layer for its I/O statistics when the request is set
/// up), so no start map, no issue program and no hash-map update per request. At high request
/// rates only a weighted sample of the requests reads the clock (`mirror_common::blk`).
#[btf_tracepoint(function = "block_rq_complete")]
pub fn blk_rq_done(ctx: BtfTracePointContext) -> i32 {
    let _ = try_done(&ctx);
    0
}

/// A `T` at `base + off` where `base` is a BTF-typed kernel pointer (a `tp_btf` argument, or a
/// pointer member read through one) and `off` a member offset from the read-only globals.
///
/// The verifier knows the globals' values (the map is frozen and read-only for programs), so
/// `base + off` is a constant offset into a known struct and the load is checked against the
/// kernel's BTF; the JIT emits it as a fault-tolerant load (a bad or NULL pointer reads as 0),
/// with no helper call and no copy. Much cheaper than `bpf_probe_read_kernel`.
#[inline(always)]
fn load<T: Copy>(base: u64, off: u32) -> T {
    // SAFETY: see above: the verifier admits the load only at a member of the right size, and
    // the JIT turns a fault into a zero result.
    unsafe { core::ptr::read_volatile((base as *const u8).wrapping_add(off as usize) as *const T) }
}

/// One member offset of `BLK_RQ_OFFSETS`, loaded where it is used (a whole-struct volatile copy
/// costs a load and a stack spill for every member, used or not).
macro_rules! rq_off {
    ($field:ident) => {
        // SAFETY: a plain read of a static; volatile so the compiler does not constant-fold the
        // zero initializer that userspace rewrites in .rodata before load.
        unsafe { core::ptr::read_volatile(&BLK_RQ_OFFSETS.$field) }
    };
}

#[inline(always)]
fn try_done(ctx: &BtfTracePointContext) -> Result<(), i64> {
    if rq_off!(valid) == 0 {
        return Ok(());
    }
    let rq = ctx.arg::<u64>(0);
    let start = load::<u64>(rq, rq_off!(rq_start_time_ns));
    if start == 0 {
        // The block layer did not stamp it (I/O statistics off for this queue).
        return Ok(());
    }
    let error = ctx.arg::<u64>(1) & 0xff;
    let nr_bytes = ctx.arg::<u64>(2) & 0xffff_ffff;
    let part = load::<u64>(rq, rq_off!(rq_part));
    let dev = if part != 0 {
        // bd_dev is already the kernel's dev_t encoding.
        load::<u32>(part, rq_off!(bdev_dev))
    } else {
        // No partition (e.g. a flush): the queue's disk.
        let disk = load::<u64>(load::<u64>(rq, rq_off!(rq_q)), rq_off!(q_disk));
        let major = load::<u32>(disk, rq_off!(disk_major));
        let minor = load::<u32>(disk, rq_off!(disk_first_minor));
        (major << 20) | (minor & 0xf_ffff)
    };
    let skey = BlkStatsKey { dev, op: classify_req_op(load::<u32>(rq, rq_off!(rq_cmd_flags))) };
    let lat = Lat::Since { start_ns: start, max_stride: rq_off!(max_stride) };
    account(&skey, nr_bytes, error != 0, lat)
}
