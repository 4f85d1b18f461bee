//! Text rendering of interval figures (the live view of `mirror daemon` and `mirror top`).

use std::fmt::Write;

use super::blk::{dev_name, BlkInterval};

fn opt(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into())
}

/// A fixed-width table, one row per (device, op), busiest first.
pub fn table(rows: &[BlkInterval]) -> String {
    let mut rows: Vec<&BlkInterval> = rows.iter().collect();
    rows.sort_by(|a, b| b.ios.cmp(&a.ios).then(a.key.cmp(&b.key)));
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<12} {:<7} {:>10} {:>9} {:>10} {:>10} {:>10} {:>6}",
        "DEVICE", "OP", "IOPS", "MiB/s", "AVG_us", "P50_us", "P99_us", "ERR"
    );
    if rows.is_empty() {
        let _ = writeln!(s, "(no completed block I/O in this interval)");
    }
    for r in rows {
        let _ = writeln!(
            s,
            "{:<12} {:<7} {:>10.1} {:>9.2} {:>10} {:>10} {:>10} {:>6}",
            dev_name(r.key.dev),
            r.op_name(),
            r.iops(),
            r.mib_per_s(),
            opt(r.avg_us()),
            opt(r.percentile_us(0.5)),
            opt(r.percentile_us(0.99)),
            r.errors
        );
    }
    s
}
