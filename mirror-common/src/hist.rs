//! A log2 latency histogram shared by the signals that measure one duration per event
//! (run-queue latency, direct-reclaim stalls).

use bytemuck::{Pod, Zeroable};

/// Number of log2 buckets: bucket `i` counts durations `d` (in microseconds) with
/// `floor(log2(d)) == i` (bucket 0 also holds 0 us). Same layout as `BlkStats::hist_us`.
pub const HIST_SLOTS: usize = 32;

/// Cumulative count, sum, maximum and log2 histogram of durations.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct LatHist {
    /// Events measured.
    pub count: u64,
    /// Sum of their durations.
    pub sum_ns: u64,
    /// Longest single duration.
    pub max_ns: u64,
    /// log2 histogram of durations in microseconds, see [`HIST_SLOTS`].
    pub hist_us: [u64; HIST_SLOTS],
}

impl Default for LatHist {
    fn default() -> Self {
        Self::zeroed()
    }
}

impl LatHist {
    /// Records one duration (eBPF side, on this CPU's copy).
    #[inline(always)]
    pub fn record(&mut self, ns: u64) {
        self.count += 1;
        self.sum_ns += ns;
        if ns > self.max_ns {
            self.max_ns = ns;
        }
        self.hist_us[crate::blk::hist_slot(ns)] += 1;
    }

    /// Adds another per-CPU copy into this one.
    pub fn accumulate(&mut self, other: &LatHist) {
        self.count += other.count;
        self.sum_ns += other.sum_ns;
        if other.max_ns > self.max_ns {
            self.max_ns = other.max_ns;
        }
        let mut i = 0;
        while i < HIST_SLOTS {
            self.hist_us[i] += other.hist_us[i];
            i += 1;
        }
    }
}

const _: () = {
    assert!(core::mem::size_of::<LatHist>() == 8 * (3 + HIST_SLOTS));
    assert!(core::mem::align_of::<LatHist>() == 8);
    assert!(HIST_SLOTS == crate::blk::BLK_HIST_SLOTS);
};

#[cfg(feature = "user")]
// SAFETY: #[repr(C)], no padding (bytemuck's Pod derive checks it), every bit pattern valid.
unsafe impl aya::Pod for LatHist {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_and_accumulate() {
        let mut a = LatHist::default();
        a.record(3_000); // 3 us -> slot 1
        a.record(1_000_000); // 1 ms -> slot 9
        let mut b = LatHist::default();
        b.record(5_000_000);
        a.accumulate(&b);
        assert_eq!((a.count, a.sum_ns, a.max_ns), (3, 6_003_000, 5_000_000));
        assert_eq!((a.hist_us[1], a.hist_us[9], a.hist_us[12]), (1, 1, 1));
    }
}
