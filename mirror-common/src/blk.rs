//! Block-layer latency: the `block_rq_issue` / `block_rq_complete` tracepoint programs and their maps.
//!
//! Map `blk_start` (hash, [`BlkStartKey`] -> [`BlkStart`]): requests in flight, keyed by device and
//! start sector, written at issue and removed at completion.
//! Map `blk_stats` (per-CPU array of [`BLK_STATS_ENTRIES`] [`BlkStatsSlot`]s): cumulative counters
//! and a log2 latency histogram per device and operation, each slot naming its (device, op). A
//! (device, op) lives in the first free or matching slot of up to [`BLK_STATS_PROBES`] from
//! [`blk_stats_slot`] (linear probing in this CPU's copy, so CPUs may place it differently);
//! userspace sums every CPU's slots by key. An array, not a hash map: its lookup is inlined by
//! the verifier, where a per-CPU hash lookup cost ~35 ns per request.
//!
//! Latency sampling (the BTF program `blk_rq_done` only): counts, bytes and errors are exact
//! for every request. Reading the clock is that program's largest cost, so at high request
//! rates the latency of every `stride`-th request of a (device, op) on a CPU is measured, each
//! measured request standing for `stride` requests in `lat_sum_ns` and `hist_us` (their totals
//! still estimate all requests'; `lat_measured` counts the requests actually measured). The
//! stride is chosen once per window of [`BLK_SAMPLE_WINDOW_NS`] from the previous window's count
//! ([`blk_sample_weight`]): every request is measured below twice [`BLK_SAMPLE_TARGET`] requests
//! per window (16k a second per CPU), exactly as without sampling; above, between that many and
//! twice as many per window are (8k-16k timed requests a second per CPU: thousands per collector
//! interval, plenty for a p99). [`BlkRqOffsets::max_stride`] 1 turns sampling off.

use bytemuck::{Pod, Zeroable};

/// Name of the in-flight map (also its pin name under [`crate::PIN_DIR`]).
pub const MAP_BLK_START: &str = "blk_start";
/// Name of the statistics map (also its pin name under [`crate::PIN_DIR`]).
pub const MAP_BLK_STATS: &str = "blk_stats";
/// Name of the global holding the tracepoint field offsets.
pub const GLOBAL_BLK_OFFSETS: &str = "BLK_OFFSETS";

/// Capacity of the in-flight map.
pub const BLK_START_ENTRIES: u32 = 16384;
/// Slots of the statistics map (devices x operations in use).
pub const BLK_STATS_ENTRIES: u32 = 256;
/// Slots tried per (device, op) before it is not counted.
pub const BLK_STATS_PROBES: u32 = 8;

/// Number of log2 latency buckets: bucket `i` counts latencies `l` (in microseconds) with
/// `floor(log2(l)) == i` (bucket 0 also holds 0 us). 32 buckets reach past an hour.
pub const BLK_HIST_SLOTS: usize = 32;

/// Operation classes, the `op` of [`BlkStatsKey`].
pub const BLK_OP_READ: u32 = 0;
pub const BLK_OP_WRITE: u32 = 1;
pub const BLK_OP_FLUSH: u32 = 2;
pub const BLK_OP_DISCARD: u32 = 3;
pub const BLK_OP_OTHER: u32 = 4;
/// Number of operation classes.
pub const BLK_OPS: u32 = 5;

/// Human names of the operation classes, indexed by op.
pub const BLK_OP_NAMES: [&str; BLK_OPS as usize] = ["read", "write", "flush", "discard", "other"];

/// Offsets of the fields the programs read in the two tracepoints' records. Userspace parses them
/// from tracefs (`events/block/<tp>/format`) because they differ between kernel versions, and
/// stores them in the read-only global [`GLOBAL_BLK_OFFSETS`] before loading. `valid == 0` makes
/// the programs ignore every event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct BlkTpOffsets {
    pub issue_dev: u32,
    pub issue_sector: u32,
    pub issue_bytes: u32,
    pub issue_rwbs: u32,
    pub complete_dev: u32,
    pub complete_sector: u32,
    pub complete_error: u32,
    pub complete_rwbs: u32,
    pub valid: u32,
    pub _pad: u32,
}

/// Name of the global holding the `struct request` member offsets (BTF path).
pub const GLOBAL_BLK_RQ_OFFSETS: &str = "BLK_RQ_OFFSETS";

/// Member offsets the BTF `block_rq_complete` program reads, resolved by userspace from the
/// kernel's BTF: `request.q`, `request.part`, `request.cmd_flags`, `request.start_time_ns`,
/// `block_device.bd_dev` (the device, via `request.part`), and for requests without a
/// partition `request_queue.disk`, `gendisk.major` and `gendisk.first_minor`. The program loads
/// each member directly through the tracepoint's typed `struct request *` (the verifier sees
/// these read-only values as constants and checks every load against the kernel's BTF), without
/// `bpf_probe_read_kernel`. `valid == 0` disables the program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct BlkRqOffsets {
    pub rq_q: u32,
    pub rq_part: u32,
    pub bdev_dev: u32,
    pub rq_cmd_flags: u32,
    pub rq_start_time_ns: u32,
    pub q_disk: u32,
    pub disk_major: u32,
    pub disk_first_minor: u32,
    pub valid: u32,
    /// Largest latency sampling stride (a power of two; 1 measures every request, see the
    /// module documentation).
    pub max_stride: u32,
}

/// Length of a latency sampling window, in the requests' own start times.
pub const BLK_SAMPLE_WINDOW_NS: u64 = 1_000_000;
/// Requests per window (per device, op and CPU) measured at least once the stride rises above 1.
pub const BLK_SAMPLE_TARGET: u32 = 8;
/// Default [`BlkRqOffsets::max_stride`].
pub const BLK_SAMPLE_MAX_STRIDE: u32 = 64;

/// Latency sampling state of one (device, op) on one CPU, see [`blk_sample_weight`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct BlkSample {
    /// Start of the current window: the `start_time_ns` of the request that opened it.
    pub win_start_ns: u64,
    /// Requests completed in the current window.
    pub win_count: u32,
    /// Every `stride`-th request of the current window is measured (0 before the first window).
    pub stride: u32,
}

/// The stride for a window after one of `count` requests: the largest power of two `p` with
/// `count / p >= BLK_SAMPLE_TARGET` (1 when there is none), at most `max_stride`.
#[inline(always)]
pub const fn blk_sample_stride(count: u32, max_stride: u32) -> u32 {
    let r = count / BLK_SAMPLE_TARGET;
    let p = if r <= 1 { 1 } else { 1u32 << crate::log2_u64(r as u64) };
    let max = if max_stride <= 1 { 1 } else { 1u32 << crate::log2_u64(max_stride as u64) };
    if p > max {
        max
    } else {
        p
    }
}

/// Counts a request that started at `start_ns` (its `start_time_ns`) into the sampling state and
/// returns its weight: 0 when its latency is not measured, else the number of requests it
/// stands for. Requests that started before the current window (completions out of order)
/// count in it. A window that ends more than a window after it began (the rate fell, or the
/// device was idle) gives stride 1.
#[inline(always)]
pub fn blk_sample_weight(s: &mut BlkSample, start_ns: u64, max_stride: u32) -> u32 {
    if start_ns > s.win_start_ns && start_ns - s.win_start_ns >= BLK_SAMPLE_WINDOW_NS {
        s.stride = if start_ns - s.win_start_ns < 2 * BLK_SAMPLE_WINDOW_NS {
            blk_sample_stride(s.win_count, max_stride)
        } else {
            1
        };
        s.win_start_ns = start_ns;
        s.win_count = 0;
    }
    let n = s.win_count;
    s.win_count = n.wrapping_add(1);
    let stride = if s.stride == 0 { 1 } else { s.stride };
    if n & (stride - 1) == 0 {
        stride
    } else {
        0
    }
}

/// `REQ_OP_*` (the low byte of `request.cmd_flags`) to an operation class.
#[inline(always)]
pub const fn classify_req_op(cmd_flags: u32) -> u32 {
    match cmd_flags & 0xff {
        0 => BLK_OP_READ,
        1 => BLK_OP_WRITE,
        2 => BLK_OP_FLUSH,
        3 | 5 => BLK_OP_DISCARD, // DISCARD, SECURE_ERASE
        _ => BLK_OP_OTHER,
    }
}

/// Key of the in-flight map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct BlkStartKey {
    /// Kernel-internal `dev_t` (major << 20 | minor).
    pub dev: u32,
    pub _pad: u32,
    pub sector: u64,
}

/// Value of the in-flight map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct BlkStart {
    /// `bpf_ktime_get_ns()` at issue.
    pub issue_ns: u64,
    pub bytes: u32,
    pub op: u32,
}

/// Key of the statistics map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct BlkStatsKey {
    /// Kernel-internal `dev_t` (major << 20 | minor).
    pub dev: u32,
    /// One of the `BLK_OP_*` classes.
    pub op: u32,
}

/// Value of the statistics map: cumulative since the map was created.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BlkStats {
    /// Completed requests.
    pub ios: u64,
    /// Bytes of completed requests (as issued).
    pub bytes: u64,
    /// Completions with a non-zero error.
    pub errors: u64,
    /// Sum of issue-to-complete latencies.
    pub lat_sum_ns: u64,
    /// Largest single latency seen.
    pub lat_max_ns: u64,
    /// log2 histogram of latencies in microseconds, see [`BLK_HIST_SLOTS`].
    pub hist_us: [u64; BLK_HIST_SLOTS],
    /// Requests whose latency was measured: `ios` unless sampled (see the module documentation).
    pub lat_measured: u64,
}

impl Default for BlkStats {
    fn default() -> Self {
        Self::zeroed()
    }
}

impl BlkStats {
    /// Adds another per-CPU copy into this one.
    pub fn accumulate(&mut self, other: &BlkStats) {
        self.ios += other.ios;
        self.bytes += other.bytes;
        self.errors += other.errors;
        self.lat_sum_ns += other.lat_sum_ns;
        self.lat_measured += other.lat_measured;
        if other.lat_max_ns > self.lat_max_ns {
            self.lat_max_ns = other.lat_max_ns;
        }
        let mut i = 0;
        while i < BLK_HIST_SLOTS {
            self.hist_us[i] += other.hist_us[i];
            i += 1;
        }
    }
}

/// A slot of the statistics map: which (device, op) it counts, and the counts. Free while
/// `stats.ios == 0`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct BlkStatsSlot {
    pub key: BlkStatsKey,
    pub sample: BlkSample,
    pub stats: BlkStats,
}

/// First slot tried for a (device, op): a multiplicative hash.
#[inline(always)]
pub const fn blk_stats_slot(key: &BlkStatsKey) -> u32 {
    let h = (key.dev ^ key.op.wrapping_mul(0x85eb_ca6b)).wrapping_mul(0x9e37_79b1);
    h >> (32 - BLK_STATS_ENTRIES.trailing_zeros())
}

/// Histogram bucket of a latency in nanoseconds.
#[inline(always)]
pub const fn hist_slot(lat_ns: u64) -> usize {
    let s = crate::log2_u64(lat_ns / 1000) as usize;
    let s = if s >= BLK_HIST_SLOTS { BLK_HIST_SLOTS - 1 } else { s };
    // The mask is a no-op after the clamp; it lets the verifier see the bound.
    s & (BLK_HIST_SLOTS - 1)
}

/// Classifies the tracepoint's `rwbs` string (see the kernel's `blk_fill_rwbs`): the operation
/// letter wins over a leading `F` (preflush), a request that is only `F` is a flush.
#[inline(always)]
pub fn classify_rwbs(rwbs: &[u8; 4]) -> u32 {
    let mut flush = false;
    let mut i = 0;
    while i < 4 {
        match rwbs[i] {
            b'R' => return BLK_OP_READ,
            b'W' => return BLK_OP_WRITE,
            b'D' | b'E' => return BLK_OP_DISCARD,
            b'F' => flush = true,
            0 => break,
            _ => {}
        }
        i += 1;
    }
    if flush {
        BLK_OP_FLUSH
    } else {
        BLK_OP_OTHER
    }
}

const _: () = {
    assert!(core::mem::size_of::<BlkTpOffsets>() == 40);
    assert!(core::mem::size_of::<BlkRqOffsets>() == 40);
    assert!(core::mem::size_of::<BlkSample>() == 16);
    assert!(core::mem::size_of::<BlkStartKey>() == 16);
    assert!(core::mem::align_of::<BlkStartKey>() == 8);
    assert!(core::mem::size_of::<BlkStart>() == 16);
    assert!(core::mem::size_of::<BlkStatsKey>() == 8);
    assert!(core::mem::size_of::<BlkStats>() == 8 * (6 + BLK_HIST_SLOTS));
    assert!(core::mem::align_of::<BlkStats>() == 8);
    assert!(core::mem::size_of::<BlkStatsSlot>() == 8 + 16 + 8 * (6 + BLK_HIST_SLOTS));
    assert!(BLK_STATS_ENTRIES.is_power_of_two());
};

#[cfg(feature = "user")]
mod user {
    use super::{
        BlkRqOffsets, BlkSample, BlkStart, BlkStartKey, BlkStats, BlkStatsKey, BlkStatsSlot, BlkTpOffsets,
    };

    // SAFETY: each type is #[repr(C)], has no padding (bytemuck's Pod derive checks that) and
    // every bit pattern is valid, which is what aya::Pod requires.
    unsafe impl aya::Pod for BlkTpOffsets {}
    // SAFETY: as above.
    unsafe impl aya::Pod for BlkRqOffsets {}
    // SAFETY: as above.
    unsafe impl aya::Pod for BlkStartKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for BlkStart {}
    // SAFETY: as above.
    unsafe impl aya::Pod for BlkStatsKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for BlkStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for BlkStatsSlot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for BlkSample {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rwbs_classes() {
        let c = |s: &[u8]| {
            let mut b = [0u8; 4];
            b[..s.len()].copy_from_slice(s);
            classify_rwbs(&b)
        };
        assert_eq!(c(b"R"), BLK_OP_READ);
        assert_eq!(c(b"RA"), BLK_OP_READ);
        assert_eq!(c(b"RM"), BLK_OP_READ);
        assert_eq!(c(b"W"), BLK_OP_WRITE);
        assert_eq!(c(b"WS"), BLK_OP_WRITE);
        assert_eq!(c(b"FWS"), BLK_OP_WRITE);
        assert_eq!(c(b"WFS"), BLK_OP_WRITE);
        assert_eq!(c(b"F"), BLK_OP_FLUSH);
        assert_eq!(c(b"FF"), BLK_OP_FLUSH);
        assert_eq!(c(b"D"), BLK_OP_DISCARD);
        assert_eq!(c(b"DS"), BLK_OP_DISCARD);
        assert_eq!(c(b"N"), BLK_OP_OTHER);
        assert_eq!(c(b""), BLK_OP_OTHER);
    }

    #[test]
    fn req_ops() {
        assert_eq!(classify_req_op(0), BLK_OP_READ);
        assert_eq!(classify_req_op(1 | 1 << 17), BLK_OP_WRITE); // WRITE | PREFLUSH-ish flag bits
        assert_eq!(classify_req_op(2), BLK_OP_FLUSH);
        assert_eq!(classify_req_op(3), BLK_OP_DISCARD);
        assert_eq!(classify_req_op(5), BLK_OP_DISCARD);
        assert_eq!(classify_req_op(9), BLK_OP_OTHER); // WRITE_ZEROES
    }

    #[test]
    fn stats_slots_in_range_and_spread() {
        let mut seen = [false; BLK_STATS_ENTRIES as usize];
        let mut distinct = 0;
        // 8 loop devices and 8 sd disks, reads and writes.
        for dev in (0..8).map(|m| (7 << 20) | m).chain((0..8).map(|m| (8 << 20) | (m * 16))) {
            for op in [BLK_OP_READ, BLK_OP_WRITE] {
                let s = blk_stats_slot(&BlkStatsKey { dev, op });
                assert!(s < BLK_STATS_ENTRIES);
                if !seen[s as usize] {
                    seen[s as usize] = true;
                    distinct += 1;
                }
            }
        }
        assert!(distinct >= 28, "{distinct} distinct first slots of 32 keys");
    }

    #[test]
    fn hist_slots() {
        assert_eq!(hist_slot(0), 0);
        assert_eq!(hist_slot(999), 0);
        assert_eq!(hist_slot(1_000), 0);
        assert_eq!(hist_slot(2_000), 1);
        assert_eq!(hist_slot(1_000_000), 9); // 1 ms = 1000 us, log2 = 9.97
        assert_eq!(hist_slot(u64::MAX), 31);
    }

    /// Requests at `per_ms` a millisecond for `ms` milliseconds: (requests, measured, weights).
    fn sample_run(s: &mut BlkSample, t0: u64, per_ms: u64, ms: u64, max_stride: u32) -> (u64, u64, u64) {
        let (mut n, mut measured, mut weights) = (0, 0, 0);
        for i in 0..per_ms * ms {
            let w = blk_sample_weight(s, t0 + i * 1_000_000 / per_ms, max_stride);
            n += 1;
            if w > 0 {
                measured += 1;
                weights += u64::from(w);
            }
        }
        (n, measured, weights)
    }

    #[test]
    fn sampling_strides() {
        assert_eq!(blk_sample_stride(0, 64), 1);
        assert_eq!(blk_sample_stride(15, 64), 1);
        assert_eq!(blk_sample_stride(16, 64), 2);
        assert_eq!(blk_sample_stride(70, 64), 8);
        assert_eq!(blk_sample_stride(140, 64), 16);
        assert_eq!(blk_sample_stride(1 << 20, 64), 64);
        assert_eq!(blk_sample_stride(1 << 20, 1), 1);
        assert_eq!(blk_sample_stride(1 << 20, 0), 1);
        assert_eq!(blk_sample_stride(1 << 20, 48), 32); // not a power of two: rounded down
    }

    #[test]
    fn low_rates_measure_every_request() {
        let mut s = BlkSample::default();
        // 15 a millisecond (15k/s on one CPU): still below 2 x the target per window.
        let (n, measured, weights) = sample_run(&mut s, 5_000_000, 15, 50, 64);
        assert_eq!((measured, weights), (n, n));
    }

    #[test]
    fn high_rates_measure_a_weighted_sample() {
        let mut s = BlkSample::default();
        // 200 a millisecond: after the first window, stride 16 (200 / 8 = 25 -> 16).
        let (n, measured, weights) = sample_run(&mut s, 5_000_000, 200, 100, 64);
        assert_eq!(s.stride, 16);
        assert!(measured < n / 12, "{measured} of {n} measured");
        // The weights stand for every request, to within one stride per window.
        assert!(weights.abs_diff(n) <= 16 * 100, "weights {weights} for {n} requests");
        // 1000 a millisecond: the stride stops at the maximum.
        let mut s = BlkSample::default();
        sample_run(&mut s, 5_000_000, 1000, 10, 64);
        assert_eq!(s.stride, 64);
        // Sampling off: every request.
        let mut s = BlkSample::default();
        let (n, measured, weights) = sample_run(&mut s, 5_000_000, 1000, 20, 1);
        assert_eq!((measured, weights), (n, n));
    }

    #[test]
    fn a_pause_resets_the_stride_and_old_requests_stay_in_the_window() {
        let mut s = BlkSample::default();
        sample_run(&mut s, 5_000_000, 200, 10, 64);
        assert_eq!(s.stride, 16);
        // Idle for 10 ms, then slow requests: every one measured again.
        let (n, measured, _) = sample_run(&mut s, 25_000_000, 10, 5, 64);
        assert_eq!(measured, n);
        // A request that started before the window (completed out of order) stays in it.
        let before = s;
        blk_sample_weight(&mut s, before.win_start_ns - 1, 64);
        assert_eq!((s.win_start_ns, s.win_count), (before.win_start_ns, before.win_count + 1));
    }

    #[test]
    fn accumulate_sums_and_maxes() {
        let mut a = BlkStats { ios: 1, bytes: 4096, lat_max_ns: 10, ..Default::default() };
        a.hist_us[3] = 1;
        let mut b = BlkStats { ios: 2, bytes: 8192, errors: 1, lat_max_ns: 5, ..Default::default() };
        b.hist_us[3] = 2;
        a.accumulate(&b);
        assert_eq!((a.ios, a.bytes, a.errors, a.lat_max_ns, a.hist_us[3]), (3, 12288, 1, 10, 3));
    }
}
