//! Block-layer latency from the `block:block_rq_issue` and `block:block_rq_complete` tracepoints.
//! Layout and semantics of the maps: `mirror_common::blk`.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    btf_maps::{HashMap, PerCpuHashMap},
    helpers::bpf_ktime_get_ns,
    macros::{btf_map, tracepoint},
    programs::TracePointContext,
};
use aya_log_ebpf::warn;

use crate::record::Record;
use mirror_common::blk::{
    classify_rwbs, hist_slot, BlkStart, BlkStartKey, BlkStats, BlkStatsKey, BlkTpOffsets,
    BLK_START_ENTRIES, BLK_STATS_ENTRIES,
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
static BLK_STATS: PerCpuHashMap<BlkStatsKey, BlkStats, { BLK_STATS_ENTRIES as usize }> =
    PerCpuHashMap::new();

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
    let key = BlkStartKey {
        dev,
        _pad: 0,
        sector,
    };
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let issue_ns = unsafe { bpf_ktime_get_ns() };
    let start = BlkStart {
        issue_ns,
        bytes,
        op: classify_rwbs(&rwbs),
    };
    if let Err(e) = BLK_START.insert(&key, &start, 0) {
        // Only when more than BLK_START_ENTRIES requests are in flight: worth a daemon log line.
        warn!(
            ctx,
            "blk_start full ({}): request on dev {} not measured", e, dev
        );
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
    let key = BlkStartKey {
        dev,
        _pad: 0,
        sector,
    };
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
    let stats = match BLK_STATS.get_ptr_mut(&skey) {
        Some(p) => p,
        None => {
            let zero = BlkStats::default();
            // Another CPU may have inserted it meanwhile: NOEXIST keeps theirs, and the
            // lookup below then finds this CPU's (per-CPU) copy.
            let _ = BLK_STATS.insert(&skey, &zero, u64::from(BPF_NOEXIST));
            BLK_STATS.get_ptr_mut(&skey).ok_or(-1i64)?
        }
    };
    // SAFETY: per-CPU value of this CPU; BPF programs do not migrate while running, and no other
    // program instance touches this CPU's copy concurrently.
    let s = unsafe { &mut *stats };
    s.ios += 1;
    s.bytes += u64::from(start.bytes);
    if error != 0 {
        s.errors += 1;
    }
    s.lat_sum_ns += lat;
    if lat > s.lat_max_ns {
        s.lat_max_ns = lat;
    }
    s.hist_us[hist_slot(lat)] += 1;
    Ok(())
}
