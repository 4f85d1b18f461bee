//! Text rendering of interval figures (the live view of `mirror daemon` and `mirror top`).

use std::fmt::Write;

use super::{
    blk::{dev_name, BlkInterval},
    collector::{LatencySample, TelemetrySample},
};

fn opt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.1}"))
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

/// One signal's line; `secs` is the interval, to say when only a part of it was measured.
fn latency_line(s: &mut String, what: &str, l: &LatencySample, secs: f64) {
    let sampled = if l.measured_s < secs * 0.95 {
        format!("  (measured {:.0}% of the time)", 100.0 * l.measured_s / secs)
    } else {
        String::new()
    };
    let _ = writeln!(
        s,
        "{what:<12} {:>10.1}/s  wait {:>8.1} ms/s  avg {:>8} us  p50 {:>8} us  p99 {:>8} us{sampled}",
        l.events_per_s,
        l.wait_ms_per_s,
        opt(l.avg_us),
        opt(l.p50_us),
        opt(l.p99_us)
    );
}

/// The whole sample: block table (with in-flight), then one line per node signal.
pub fn sample(smp: &TelemetrySample) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<12} {:<7} {:>10} {:>9} {:>10} {:>10} {:>10} {:>6} {:>6}",
        "DEVICE", "OP", "IOPS", "MiB/s", "AVG_us", "P50_us", "P99_us", "ERR", "INFL"
    );
    if smp.devices.is_empty() {
        let _ = writeln!(s, "(no block I/O in this interval)");
    }
    for d in &smp.devices {
        let name = dev_name(d.dev);
        if d.ops.is_empty() {
            let _ = writeln!(
                s,
                "{name:<12} {:<7} {:>10} {:>9} {:>10} {:>10} {:>10} {:>6} {:>6}",
                "-", "-", "-", "-", "-", "-", "-", d.inflight
            );
        }
        for o in &d.ops {
            let _ = writeln!(
                s,
                "{name:<12} {:<7} {:>10.1} {:>9.2} {:>10} {:>10} {:>10} {:>6} {:>6}",
                o.op,
                o.iops,
                o.mib_per_s,
                opt(o.avg_us),
                opt(o.p50_us),
                opt(o.p99_us),
                o.errors,
                d.inflight
            );
        }
    }
    if let Some(l) = &smp.runq {
        latency_line(&mut s, "runq", l, smp.secs);
    }
    if let Some(l) = &smp.reclaim {
        latency_line(&mut s, "reclaim", l, smp.secs);
    }
    if let Some(p) = &smp.pressure {
        let _ = writeln!(
            s,
            "psi          cpu some {:.1}%  memory some {:.1}% full {:.1}%  io some {:.1}% full {:.1}%",
            p.cpu_some.pct, p.memory_some.pct, p.memory_full.pct, p.io_some.pct, p.io_full.pct
        );
    }
    let mut tcp = String::new();
    if let Some(r) = smp.retrans_per_s {
        let _ = write!(tcp, "node {r:.1}/s");
    }
    for p in smp.retrans.iter().take(5) {
        let _ = write!(tcp, "  {} {:.1}/s", p.peer, p.per_s);
    }
    if !tcp.is_empty() {
        let _ = writeln!(s, "tcp retrans  {}", tcp.trim_start());
    }
    s
}
