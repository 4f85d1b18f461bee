//! Fallback source when BPF is not usable: `/proc/diskstats` turned into the same cumulative
//! snapshot shape (counts, bytes, summed latency; no histogram, so no percentiles).

use mirror_common::blk::{BlkStats, BlkStatsKey, BLK_OP_DISCARD, BLK_OP_FLUSH, BLK_OP_READ, BLK_OP_WRITE};

use super::{blk::kdev, blk::BlkSnapshot, TelemetryError};

/// Parses the text of `/proc/diskstats`. Devices with no I/O at all are left out.
pub fn parse(text: &str) -> BlkSnapshot {
    let mut snap = BlkSnapshot::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 14 {
            continue;
        }
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let (Ok(major), Ok(minor)) = (f[0].parse::<u32>(), f[1].parse::<u32>()) else {
            continue;
        };
        let dev = kdev(major, minor);
        // (op, completed, sectors, ms): reads 3,5,6; writes 7,9,10; discards 14,16,17;
        // flushes 18,-,19 (fields after 13 exist on newer kernels only).
        let groups = [
            (BLK_OP_READ, num(3), num(5), num(6)),
            (BLK_OP_WRITE, num(7), num(9), num(10)),
            (BLK_OP_DISCARD, num(14), num(16), num(17)),
            (BLK_OP_FLUSH, num(18), 0, num(19)),
        ];
        for (op, ios, sectors, ms) in groups {
            if ios == 0 {
                continue;
            }
            let s = BlkStats { ios, bytes: sectors * 512, lat_sum_ns: ms * 1_000_000, ..Default::default() };
            snap.insert(BlkStatsKey { dev, op }, s);
        }
    }
    snap
}

/// Requests in flight per device (field 9 of the statistics, "I/Os currently in progress");
/// devices with none are left out.
pub fn parse_inflight(text: &str) -> std::collections::BTreeMap<u32, u64> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let major = f.first()?.parse::<u32>().ok()?;
            let minor = f.get(1)?.parse::<u32>().ok()?;
            let n = f.get(11)?.parse::<u64>().ok()?;
            (n > 0).then(|| (kdev(major, minor), n))
        })
        .collect()
}

/// Reads and parses `/proc/diskstats`: cumulative statistics and the in-flight gauge.
pub fn read_all() -> Result<(BlkSnapshot, std::collections::BTreeMap<u32, u64>), TelemetryError> {
    let text =
        std::fs::read_to_string("/proc/diskstats").map_err(|e| TelemetryError::io("/proc/diskstats", e))?;
    Ok((parse(&text), parse_inflight(&text)))
}

/// Reads and parses `/proc/diskstats`.
pub fn read() -> Result<BlkSnapshot, TelemetryError> {
    read_all().map(|(s, _)| s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_lines() {
        let text = "   7       0 loop0 100 0 800 50 20 0 160 40 0 90 90 0 0 0 0 3 7\n\
                    253       0 vda 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n";
        let s = parse(text);
        let r = s[&BlkStatsKey { dev: kdev(7, 0), op: BLK_OP_READ }];
        assert_eq!((r.ios, r.bytes, r.lat_sum_ns), (100, 800 * 512, 50_000_000));
        let w = s[&BlkStatsKey { dev: kdev(7, 0), op: BLK_OP_WRITE }];
        assert_eq!((w.ios, w.bytes), (20, 160 * 512));
        let fl = s[&BlkStatsKey { dev: kdev(7, 0), op: BLK_OP_FLUSH }];
        assert_eq!((fl.ios, fl.lat_sum_ns), (3, 7_000_000));
        assert_eq!(s.len(), 3, "idle vda and empty groups are left out");
        let text2 = "   7       0 loop0 100 0 800 50 20 0 160 40 5 90 90\n";
        assert_eq!(parse_inflight(text2)[&kdev(7, 0)], 5);
        assert!(parse_inflight(text).is_empty());
    }

    #[test]
    fn reads_this_machine() {
        // /proc/diskstats exists on every Linux; the parse must not fail on the real format.
        let _ = read().expect("read /proc/diskstats");
    }
}
