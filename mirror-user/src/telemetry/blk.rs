//! Block-latency figures: cumulative snapshots of the `blk_stats` map (or /proc/diskstats) and
//! the per-interval rates and percentiles computed from two of them. Pure code, no I/O but
//! device-name lookup.

use std::collections::BTreeMap;

use mirror_common::blk::{BlkStats, BlkStatsKey, BLK_HIST_SLOTS, BLK_OP_NAMES};

/// Cumulative statistics per (device, operation), summed over CPUs.
pub type BlkSnapshot = BTreeMap<BlkStatsKey, BlkStats>;

/// What happened on one device for one operation class during one interval.
#[derive(Debug, Clone, PartialEq)]
pub struct BlkInterval {
    pub key: BlkStatsKey,
    pub ios: u64,
    pub bytes: u64,
    pub errors: u64,
    /// Sum of latencies: of every request, or with sampling (`mirror_common::blk`) the weighted
    /// sum of the timed ones, an estimate of every request's.
    pub lat_sum_ns: u64,
    /// Interval histogram, weighted like `lat_sum_ns`; all zero when the source has none
    /// (/proc fallback).
    pub hist_us: [u64; BLK_HIST_SLOTS],
    /// Requests whose latency was timed: `ios` unless sampled, 0 from /proc.
    pub lat_measured: u64,
    pub secs: f64,
}

impl BlkInterval {
    pub fn op_name(&self) -> &'static str {
        BLK_OP_NAMES.get(self.key.op as usize).copied().unwrap_or("?")
    }
    pub fn iops(&self) -> f64 {
        self.ios as f64 / self.secs
    }
    pub fn mib_per_s(&self) -> f64 {
        self.bytes as f64 / self.secs / (1024.0 * 1024.0)
    }
    /// Mean latency: over the histogram's weights when there is a histogram (they are what
    /// `lat_sum_ns` sums over when sampled), else over every request (/proc).
    pub fn avg_us(&self) -> Option<f64> {
        let weights: u64 = self.hist_us.iter().sum();
        let n = if weights > 0 { weights } else { self.ios };
        (n > 0).then(|| self.lat_sum_ns as f64 / n as f64 / 1000.0)
    }
    pub fn percentile_us(&self, q: f64) -> Option<f64> {
        percentile_us(&self.hist_us, q)
    }
}

/// Differences `cur - prev` per key over `secs` seconds; keys without completions are left out.
/// A counter that went backwards (map recreated) counts from zero.
pub fn interval(prev: &BlkSnapshot, cur: &BlkSnapshot, secs: f64) -> Vec<BlkInterval> {
    let secs = if secs > 0.0 { secs } else { f64::MIN_POSITIVE };
    let mut out = Vec::new();
    for (key, c) in cur {
        let zero = BlkStats::default();
        let p = match prev.get(key) {
            Some(p) if p.ios <= c.ios => p,
            _ => &zero,
        };
        let ios = c.ios - p.ios;
        if ios == 0 {
            continue;
        }
        let mut hist_us = [0u64; BLK_HIST_SLOTS];
        for (i, h) in hist_us.iter_mut().enumerate() {
            *h = c.hist_us[i].saturating_sub(p.hist_us[i]);
        }
        out.push(BlkInterval {
            key: *key,
            ios,
            bytes: c.bytes.saturating_sub(p.bytes),
            errors: c.errors.saturating_sub(p.errors),
            lat_sum_ns: c.lat_sum_ns.saturating_sub(p.lat_sum_ns),
            hist_us,
            lat_measured: c.lat_measured.saturating_sub(p.lat_measured),
            secs,
        });
    }
    out
}

/// The `q` quantile (0..=1) of a log2 microsecond histogram, interpolated linearly inside its
/// bucket (bucket `i` spans `[2^i, 2^(i+1))` us, bucket 0 spans `[0, 2)`). `None` when empty.
pub fn percentile_us(hist: &[u64], q: f64) -> Option<f64> {
    let total: u64 = hist.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = (q.clamp(0.0, 1.0) * total as f64).max(1.0);
    let mut seen = 0u64;
    for (i, &n) in hist.iter().enumerate() {
        if n == 0 {
            continue;
        }
        if (seen + n) as f64 >= rank {
            let lo = if i == 0 { 0.0 } else { (1u64 << i) as f64 };
            let hi = (1u64 << (i + 1)) as f64;
            let frac = (rank - seen as f64) / n as f64;
            return Some(lo + (hi - lo) * frac);
        }
        seen += n;
    }
    None
}

/// Splits a kernel-internal `dev_t` (as the block tracepoints report it) into major and minor.
pub fn major_minor(dev: u32) -> (u32, u32) {
    (dev >> 20, dev & ((1 << 20) - 1))
}

/// Kernel-internal `dev_t` of a major/minor pair.
pub fn kdev(major: u32, minor: u32) -> u32 {
    (major << 20) | (minor & ((1 << 20) - 1))
}

/// Kernel-internal `dev_t` of a block device node (e.g. `/dev/loop0`), from its `st_rdev`.
pub fn kdev_of_path(path: &std::path::Path) -> std::io::Result<u32> {
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata(path)?.rdev();
    // glibc's encoding of a userspace dev_t (gnu_dev_major / gnu_dev_minor).
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    Ok(kdev(major as u32, minor as u32))
}

/// Device name (`loop0`, `vda`) from sysfs, or `major:minor` when it has none.
pub fn dev_name(dev: u32) -> String {
    let (ma, mi) = major_minor(dev);
    std::fs::read_to_string(format!("/sys/dev/block/{ma}:{mi}/uevent"))
        .ok()
        .and_then(|u| u.lines().find_map(|l| l.strip_prefix("DEVNAME=").map(str::to_string)))
        .unwrap_or_else(|| format!("{ma}:{mi}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(ios: u64, lat_sum_ns: u64, slot: usize) -> BlkStats {
        let mut s = BlkStats { ios, bytes: ios * 4096, lat_sum_ns, ..Default::default() };
        s.hist_us[slot] = ios;
        s
    }

    #[test]
    fn interval_subtracts_and_skips_idle() {
        let k1 = BlkStatsKey { dev: kdev(7, 0), op: 0 };
        let k2 = BlkStatsKey { dev: kdev(7, 1), op: 1 };
        let prev = BlkSnapshot::from([(k1, stats(10, 10_000, 3)), (k2, stats(5, 1, 3))]);
        let cur = BlkSnapshot::from([(k1, stats(30, 50_000, 3)), (k2, stats(5, 1, 3))]);
        let iv = interval(&prev, &cur, 2.0);
        assert_eq!(iv.len(), 1);
        assert_eq!(iv[0].ios, 20);
        assert_eq!(iv[0].iops(), 10.0);
        assert_eq!(iv[0].avg_us(), Some(2.0));
        assert_eq!(iv[0].hist_us[3], 20);
    }

    #[test]
    fn interval_handles_reset_counters() {
        let k = BlkStatsKey { dev: 1, op: 0 };
        let prev = BlkSnapshot::from([(k, stats(100, 1, 0))]);
        let cur = BlkSnapshot::from([(k, stats(4, 1, 0))]);
        assert_eq!(interval(&prev, &cur, 1.0)[0].ios, 4);
    }

    #[test]
    fn percentiles_from_log2_buckets() {
        let mut h = [0u64; BLK_HIST_SLOTS];
        assert_eq!(percentile_us(&h, 0.5), None);
        h[4] = 90; // 16..32 us
        h[10] = 10; // 1024..2048 us
        let p50 = percentile_us(&h, 0.5).unwrap();
        assert!((16.0..32.0).contains(&p50), "{p50}");
        let p99 = percentile_us(&h, 0.99).unwrap();
        assert!((1024.0..=2048.0).contains(&p99), "{p99}");
        let p0 = percentile_us(&h, 0.0).unwrap();
        assert!((16.0..32.0).contains(&p0), "{p0}");
    }

    #[test]
    fn dev_numbers_round_trip() {
        assert_eq!(major_minor(kdev(259, 3)), (259, 3));
        assert_eq!(major_minor(kdev(7, 1 << 19)), (7, 1 << 19));
    }

    #[test]
    fn kdev_of_a_real_node() {
        // /dev/null is char 1:3 everywhere.
        assert_eq!(major_minor(kdev_of_path(std::path::Path::new("/dev/null")).unwrap()), (1, 3));
    }
}
