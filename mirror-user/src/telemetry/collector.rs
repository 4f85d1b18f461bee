//! The collector: cumulative node snapshots (from the eBPF maps or /proc) turned into
//! per-interval rates and percentiles, a [`TelemetrySample`]. [`sample`] is pure; [`Collector`]
//! drives it from a [`Source`](super::Source) and a clock.

use std::{
    collections::BTreeMap,
    fmt::Write,
    time::{Duration, Instant},
};

use mirror_common::{hist::LatHist, net::TcpPeerKey};

use super::{
    blk::{self, BlkSnapshot},
    procfs::{Psi, PsiLine},
};

/// Everything cumulative the node measures at one instant. Signals a source lacks are `None`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeSnapshot {
    /// Block statistics per (device, op).
    pub blk: BlkSnapshot,
    /// Requests in flight per device (a gauge, kernel `dev_t`).
    pub inflight: BTreeMap<u32, u64>,
    /// Run-queue latency histogram (eBPF only).
    pub runq: Option<LatHist>,
    /// Nanoseconds the run-queue programs have been attached (they run a duty cycle, see
    /// `mirror_common::sched`); `None`: always, as long as the snapshots' interval.
    pub runq_on_ns: Option<u64>,
    /// Direct-reclaim stall histogram (eBPF only).
    pub reclaim: Option<LatHist>,
    /// TCP retransmits per remote peer (eBPF only).
    pub retrans: Option<BTreeMap<TcpPeerKey, u64>>,
    /// TCP retransmits of the whole node (`/proc/net/snmp`).
    pub retrans_total: Option<u64>,
    /// Pressure stall information (`/proc/pressure`).
    pub psi: Option<Psi>,
}

/// One operation class on one device during the interval.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct OpSample {
    pub op: &'static str,
    pub iops: f64,
    pub mib_per_s: f64,
    pub errors: u64,
    pub avg_us: Option<f64>,
    /// Percentiles need a histogram: `None` from /proc/diskstats.
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
}

/// One device during the interval.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DeviceSample {
    /// Kernel `dev_t` (major << 20 | minor); its name in JSON (`mirror top --json`).
    #[serde(rename = "device", serialize_with = "device_name")]
    pub dev: u32,
    /// Requests in flight at the end of the interval.
    pub inflight: u64,
    /// Busiest first; empty when the device only has requests in flight.
    pub ops: Vec<OpSample>,
}

/// A latency signal during the interval (run-queue latency, reclaim stalls).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct LatencySample {
    /// Events per second of measured time.
    pub events_per_s: f64,
    /// Time spent waiting, in milliseconds per second of measured time (summed over tasks).
    pub wait_ms_per_s: f64,
    /// Seconds of the interval the programs measured: all of it, or (the run queue's duty
    /// cycle) the attached part; the rates are per second of it.
    pub measured_s: f64,
    pub avg_us: Option<f64>,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
}

/// Retransmits towards one peer during the interval.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PeerRetrans {
    pub peer: std::net::IpAddr,
    pub per_s: f64,
}

/// Pressure during the interval: percent of wall time stalled (from the PSI totals), and the
/// kernel's own 10 s average at the end of the interval.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct PsiSample {
    pub pct: f64,
    pub avg10: f64,
}

/// PSI of the node during the interval.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct PressureSample {
    pub cpu_some: PsiSample,
    pub memory_some: PsiSample,
    pub memory_full: PsiSample,
    pub io_some: PsiSample,
    pub io_full: PsiSample,
}

/// A device as JSON names it: `vda`, `loop0` (or `MAJ:MIN` when unknown).
fn device_name<S: serde::Serializer>(dev: &u32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&blk::dev_name(*dev))
}

/// What the node looked like during one interval: the input of the health monitor and of the
/// metrics endpoint.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TelemetrySample {
    /// `ebpf` or `procfs`.
    pub source: &'static str,
    /// Length of the interval in seconds.
    pub secs: f64,
    /// Devices with completions or requests in flight.
    pub devices: Vec<DeviceSample>,
    pub runq: Option<LatencySample>,
    pub reclaim: Option<LatencySample>,
    /// Per peer, most retransmits first (eBPF only).
    pub retrans: Vec<PeerRetrans>,
    /// Node-wide retransmitted segments per second (`/proc/net/snmp`).
    pub retrans_per_s: Option<f64>,
    pub pressure: Option<PressureSample>,
}

/// The interval's figures of a latency histogram measured during `secs` seconds (0: not at all).
fn latency(prev: Option<&LatHist>, cur: &LatHist, secs: f64) -> LatencySample {
    let zero = LatHist::default();
    let p = match prev {
        Some(p) if p.count <= cur.count => p,
        _ => &zero,
    };
    let count = cur.count - p.count;
    let sum_ns = cur.sum_ns.saturating_sub(p.sum_ns);
    let mut hist = [0u64; mirror_common::hist::HIST_SLOTS];
    for (i, h) in hist.iter_mut().enumerate() {
        *h = cur.hist_us[i].saturating_sub(p.hist_us[i]);
    }
    let per_s = |x: f64| if secs > 0.0 { x / secs } else { 0.0 };
    LatencySample {
        events_per_s: per_s(count as f64),
        wait_ms_per_s: per_s(sum_ns as f64 / 1e6),
        measured_s: secs,
        avg_us: (count > 0).then(|| sum_ns as f64 / count as f64 / 1000.0),
        p50_us: blk::percentile_us(&hist, 0.5),
        p99_us: blk::percentile_us(&hist, 0.99),
    }
}

fn psi(prev: &PsiLine, cur: &PsiLine, secs: f64) -> PsiSample {
    let us = cur.total_us.saturating_sub(prev.total_us) as f64;
    PsiSample { pct: (us / (secs * 1e6) * 100.0).min(100.0), avg10: cur.avg10 }
}

/// Turns two cumulative snapshots `secs` seconds apart into the interval's figures. Counters
/// that went backwards (maps recreated) count from zero.
pub fn sample(source: &'static str, prev: &NodeSnapshot, cur: &NodeSnapshot, secs: f64) -> TelemetrySample {
    let secs = if secs > 0.0 { secs } else { f64::MIN_POSITIVE };
    let mut devices: BTreeMap<u32, DeviceSample> = BTreeMap::new();
    let mut rows = blk::interval(&prev.blk, &cur.blk, secs);
    rows.sort_by(|a, b| b.ios.cmp(&a.ios).then(a.key.cmp(&b.key)));
    for r in &rows {
        let d = devices.entry(r.key.dev).or_insert_with(|| DeviceSample {
            dev: r.key.dev,
            inflight: 0,
            ops: Vec::new(),
        });
        d.ops.push(OpSample {
            op: r.op_name(),
            iops: r.iops(),
            mib_per_s: r.mib_per_s(),
            errors: r.errors,
            avg_us: r.avg_us(),
            p50_us: r.percentile_us(0.5),
            p99_us: r.percentile_us(0.99),
        });
    }
    for (&dev, &n) in &cur.inflight {
        if n > 0 {
            devices
                .entry(dev)
                .or_insert_with(|| DeviceSample { dev, inflight: 0, ops: Vec::new() })
                .inflight = n;
        }
    }
    let mut retrans: Vec<PeerRetrans> = match &cur.retrans {
        Some(c) => c
            .iter()
            .filter_map(|(k, &n)| {
                let before =
                    prev.retrans.as_ref().and_then(|p| p.get(k)).copied().filter(|&b| b <= n).unwrap_or(0);
                let d = n - before;
                (d > 0).then(|| k.ip().map(|peer| PeerRetrans { peer, per_s: d as f64 / secs }))?
            })
            .collect(),
        None => Vec::new(),
    };
    retrans.sort_by(|a, b| b.per_s.total_cmp(&a.per_s).then(a.peer.cmp(&b.peer)));
    let pressure = match (&prev.psi, &cur.psi) {
        (Some(p), Some(c)) => Some(PressureSample {
            cpu_some: psi(&p.cpu_some, &c.cpu_some, secs),
            memory_some: psi(&p.memory_some, &c.memory_some, secs),
            memory_full: psi(&p.memory_full, &c.memory_full, secs),
            io_some: psi(&p.io_some, &c.io_some, secs),
            io_full: psi(&p.io_full, &c.io_full, secs),
        }),
        _ => None,
    };
    TelemetrySample {
        source,
        secs,
        devices: devices.into_values().collect(),
        runq: cur.runq.as_ref().map(|c| latency(prev.runq.as_ref(), c, runq_secs(prev, cur, secs))),
        reclaim: cur.reclaim.as_ref().map(|c| latency(prev.reclaim.as_ref(), c, secs)),
        retrans,
        retrans_per_s: match (prev.retrans_total, cur.retrans_total) {
            (Some(p), Some(c)) => Some(c.saturating_sub(p) as f64 / secs),
            _ => None,
        },
        pressure,
    }
}

/// Seconds the run-queue programs were attached between two snapshots `secs` apart.
fn runq_secs(prev: &NodeSnapshot, cur: &NodeSnapshot, secs: f64) -> f64 {
    match (prev.runq_on_ns, cur.runq_on_ns) {
        (Some(p), Some(c)) if c >= p => ((c - p) as f64 / 1e9).min(secs),
        _ => secs,
    }
}

/// Reads a [`Source`](super::Source) at each call and returns the figures since the last one;
/// each sample is also published to subscribers (the health monitor, the metrics endpoint).
#[derive(Debug)]
pub struct Collector {
    source: super::Source,
    prev: NodeSnapshot,
    prev_t: Instant,
    tx: tokio::sync::watch::Sender<Option<std::sync::Arc<TelemetrySample>>>,
}

impl Collector {
    /// Takes the first snapshot.
    pub fn new(source: super::Source) -> Result<Self, super::TelemetryError> {
        let prev = source.snapshot()?;
        Ok(Self { source, prev, prev_t: Instant::now(), tx: tokio::sync::watch::channel(None).0 })
    }

    /// The latest sample (`None` before the first tick), updated at every [`Collector::tick`].
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Option<std::sync::Arc<TelemetrySample>>> {
        self.tx.subscribe()
    }

    /// The figures since the previous call (or since [`Collector::new`]).
    pub fn tick(&mut self) -> Result<TelemetrySample, super::TelemetryError> {
        self.source.flush_logs();
        let cur = self.source.snapshot()?;
        let now = Instant::now();
        let s = sample(self.source.name(), &self.prev, &cur, now.duration_since(self.prev_t).as_secs_f64());
        self.prev = cur;
        self.prev_t = now;
        self.tx.send_replace(Some(std::sync::Arc::new(s.clone())));
        Ok(s)
    }

    /// Takes the source back (e.g. to detach the programs).
    pub fn into_source(self) -> super::Source {
        self.source
    }

    pub fn source(&self) -> &super::Source {
        &self.source
    }

    pub fn source_mut(&mut self) -> &mut super::Source {
        &mut self.source
    }

    /// Time since the last snapshot.
    pub fn since_last(&self) -> Duration {
        self.prev_t.elapsed()
    }
}

fn gauge(out: &mut String, name: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
}

fn opt_metric(out: &mut String, name: &str, labels: &str, v: Option<f64>) {
    if let Some(v) = v {
        let _ = writeln!(out, "{name}{{{labels}}} {v}");
    }
}

/// The sample in the Prometheus text exposition format (every figure a gauge over the last
/// interval). `dev_name` names devices (e.g. [`blk::dev_name`]).
pub fn to_prometheus(s: &TelemetrySample, dev_name: impl Fn(u32) -> String) -> String {
    let mut out = String::new();
    gauge(&mut out, "mirror_blk_iops", "Completed requests per second");
    for d in &s.devices {
        let dn = dev_name(d.dev);
        for o in &d.ops {
            let _ = writeln!(out, "mirror_blk_iops{{dev=\"{dn}\",op=\"{}\"}} {}", o.op, o.iops);
        }
    }
    gauge(&mut out, "mirror_blk_mib_per_s", "MiB per second");
    for d in &s.devices {
        let dn = dev_name(d.dev);
        for o in &d.ops {
            let _ = writeln!(out, "mirror_blk_mib_per_s{{dev=\"{dn}\",op=\"{}\"}} {}", o.op, o.mib_per_s);
        }
    }
    gauge(&mut out, "mirror_blk_latency_us", "Request latency, issue to completion");
    for d in &s.devices {
        let dn = dev_name(d.dev);
        for o in &d.ops {
            for (q, v) in [("avg", o.avg_us), ("p50", o.p50_us), ("p99", o.p99_us)] {
                opt_metric(
                    &mut out,
                    "mirror_blk_latency_us",
                    &format!("dev=\"{dn}\",op=\"{}\",stat=\"{q}\"", o.op),
                    v,
                );
            }
        }
    }
    gauge(&mut out, "mirror_blk_inflight", "Requests in flight");
    for d in &s.devices {
        let _ = writeln!(out, "mirror_blk_inflight{{dev=\"{}\"}} {}", dev_name(d.dev), d.inflight);
    }
    for (name, sig) in [("runq", &s.runq), ("reclaim", &s.reclaim)] {
        let Some(l) = sig else { continue };
        let metric = format!("mirror_{name}_latency_us");
        gauge(&mut out, &metric, &format!("{name} latency over the interval"));
        for (q, v) in [("avg", l.avg_us), ("p50", l.p50_us), ("p99", l.p99_us)] {
            opt_metric(&mut out, &metric, &format!("stat=\"{q}\""), v);
        }
        let metric = format!("mirror_{name}_wait_ms_per_s");
        gauge(&mut out, &metric, &format!("{name} waiting time per second"));
        let _ = writeln!(out, "{metric} {}", l.wait_ms_per_s);
    }
    if !s.retrans.is_empty() {
        gauge(&mut out, "mirror_tcp_retrans_per_s", "TCP retransmits per peer per second");
        for r in &s.retrans {
            let _ = writeln!(out, "mirror_tcp_retrans_per_s{{peer=\"{}\"}} {}", r.peer, r.per_s);
        }
    }
    if let Some(v) = s.retrans_per_s {
        gauge(&mut out, "mirror_tcp_retrans_total_per_s", "TCP retransmits of the node per second");
        let _ = writeln!(out, "mirror_tcp_retrans_total_per_s {v}");
    }
    if let Some(p) = &s.pressure {
        gauge(&mut out, "mirror_psi_pct", "Percent of the interval stalled (PSI)");
        for (res, kind, v) in [
            ("cpu", "some", p.cpu_some),
            ("memory", "some", p.memory_some),
            ("memory", "full", p.memory_full),
            ("io", "some", p.io_some),
            ("io", "full", p.io_full),
        ] {
            let _ = writeln!(out, "mirror_psi_pct{{resource=\"{res}\",kind=\"{kind}\"}} {}", v.pct);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use mirror_common::blk::{BlkStats, BlkStatsKey};

    fn hist(count: u64, sum_ns: u64, slot: usize) -> LatHist {
        let mut h = LatHist { count, sum_ns, ..Default::default() };
        h.hist_us[slot] = count;
        h
    }

    fn peer(a: [u8; 4]) -> TcpPeerKey {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&a);
        TcpPeerKey { family: 2, addr }
    }

    fn snaps() -> (NodeSnapshot, NodeSnapshot) {
        let k = BlkStatsKey { dev: blk::kdev(7, 0), op: 0 };
        let mut s0 = BlkStats { ios: 100, bytes: 100 * 4096, lat_sum_ns: 100 * 20_000, ..Default::default() };
        s0.hist_us[4] = 100;
        let mut s1 = s0;
        s1.ios += 2000;
        s1.bytes += 2000 * 4096;
        s1.lat_sum_ns += 2000 * 20_000;
        s1.hist_us[4] += 1960;
        s1.hist_us[12] += 40; // 4-8 ms tail: 2%
        let psi0 = Psi::default();
        let mut psi1 = Psi::default();
        psi1.memory_some.total_us = 200_000; // 0.2 s stalled in 2 s
        psi1.cpu_some.avg10 = 3.5;
        let prev = NodeSnapshot {
            blk: BlkSnapshot::from([(k, s0)]),
            inflight: BTreeMap::new(),
            runq: Some(hist(1000, 1000 * 5_000, 2)),
            runq_on_ns: None,
            reclaim: Some(LatHist::default()),
            retrans: Some(BTreeMap::from([(peer([10, 0, 0, 2]), 5)])),
            retrans_total: Some(50),
            psi: Some(psi0),
        };
        let mut runq1 = hist(1000, 1000 * 5_000, 2);
        runq1.count += 1000;
        runq1.sum_ns += 1000 * 3_000_000;
        runq1.hist_us[11] += 1000; // 2-4 ms: a hog
        let cur = NodeSnapshot {
            blk: BlkSnapshot::from([(k, s1)]),
            inflight: BTreeMap::from([(blk::kdev(7, 0), 3), (blk::kdev(8, 0), 1)]),
            runq: Some(runq1),
            runq_on_ns: None,
            reclaim: Some(hist(4, 40_000_000, 13)),
            retrans: Some(BTreeMap::from([(peer([10, 0, 0, 2]), 25), (peer([10, 0, 0, 3]), 1)])),
            retrans_total: Some(76),
            psi: Some(psi1),
        };
        (prev, cur)
    }

    #[test]
    fn rates_and_percentiles_per_device() {
        let (prev, cur) = snaps();
        let s = sample("ebpf", &prev, &cur, 2.0);
        assert_eq!(s.devices.len(), 2, "loop0 with I/O, sda with only in-flight");
        let d = &s.devices[0];
        assert_eq!((d.dev, d.inflight), (blk::kdev(7, 0), 3));
        let r = &d.ops[0];
        assert_eq!(r.op, "read");
        assert_eq!(r.iops, 1000.0);
        assert!((r.mib_per_s - 2000.0 * 4096.0 / 2.0 / 1_048_576.0).abs() < 1e-9);
        assert_eq!(r.avg_us, Some(20.0));
        let p50 = r.p50_us.unwrap();
        let p99 = r.p99_us.unwrap();
        assert!((16.0..32.0).contains(&p50), "{p50}");
        assert!((4096.0..=8192.0).contains(&p99), "{p99}");
        assert_eq!((s.devices[1].inflight, s.devices[1].ops.len()), (1, 0));
    }

    #[test]
    fn runq_reclaim_retrans_and_psi() {
        let (prev, cur) = snaps();
        let s = sample("ebpf", &prev, &cur, 2.0);
        let rq = s.runq.unwrap();
        assert_eq!(rq.events_per_s, 500.0);
        assert!((2048.0..=4096.0).contains(&rq.p50_us.unwrap()));
        assert!((rq.wait_ms_per_s - 1500.0).abs() < 1e-9);
        let rc = s.reclaim.unwrap();
        assert_eq!((rc.events_per_s, rc.wait_ms_per_s), (2.0, 20.0));
        assert_eq!(s.retrans.len(), 2);
        assert_eq!(s.retrans[0].peer.to_string(), "10.0.0.2");
        assert_eq!(s.retrans[0].per_s, 10.0);
        assert_eq!(s.retrans[1].per_s, 0.5);
        assert_eq!(s.retrans_per_s, Some(13.0));
        let p = s.pressure.unwrap();
        assert!((p.memory_some.pct - 10.0).abs() < 1e-9);
        assert_eq!(p.cpu_some.avg10, 3.5);
    }

    #[test]
    fn runq_rates_are_per_second_of_attached_time() {
        let (mut prev, mut cur) = snaps();
        // Attached 0.4 s of the 2 s interval (a 20% duty cycle): the 1000 switches measured
        // stand for 2500 a second, the waits' percentiles are unchanged.
        prev.runq_on_ns = Some(7_000_000_000);
        cur.runq_on_ns = Some(7_400_000_000);
        let rq = sample("ebpf", &prev, &cur, 2.0).runq.unwrap();
        assert!((rq.measured_s - 0.4).abs() < 1e-9);
        assert!((rq.events_per_s - 2500.0).abs() < 1e-9);
        assert!((rq.wait_ms_per_s - 7500.0).abs() < 1e-9);
        assert!((2048.0..=4096.0).contains(&rq.p50_us.unwrap()));
        // Continuous (no duty cycle known): the wall interval.
        cur.runq_on_ns = None;
        assert_eq!(sample("ebpf", &prev, &cur, 2.0).runq.unwrap().measured_s, 2.0);
        // Not attached at all during the interval: no rates, no percentiles invented.
        let mut idle = prev.clone();
        idle.runq_on_ns = prev.runq_on_ns;
        let rq = sample("ebpf", &prev, &idle, 2.0).runq.unwrap();
        assert_eq!((rq.measured_s, rq.events_per_s, rq.p99_us), (0.0, 0.0, None));
    }

    #[test]
    fn missing_signals_and_resets() {
        let (prev, mut cur) = snaps();
        // Maps recreated: counters lower than before count from zero.
        cur.runq = Some(hist(10, 10_000, 3));
        cur.retrans = None;
        cur.psi = None;
        let s = sample("procfs", &prev, &cur, 1.0);
        assert_eq!(s.runq.unwrap().events_per_s, 10.0);
        assert!(s.retrans.is_empty() && s.pressure.is_none());
        let none = sample("procfs", &NodeSnapshot::default(), &NodeSnapshot::default(), 1.0);
        assert!(none.devices.is_empty() && none.runq.is_none() && none.retrans_per_s.is_none());
    }

    #[test]
    fn collector_publishes_each_sample() {
        let mut c = Collector::new(crate::telemetry::Source::Procfs).expect("read /proc");
        let rx = c.subscribe();
        assert!(rx.borrow().is_none());
        let s = c.tick().expect("tick");
        let got = rx.borrow().clone().expect("published");
        assert_eq!((got.source, got.secs), (s.source, s.secs));
        assert!(got.retrans_per_s.is_some(), "/proc/net/snmp in the fallback");
    }

    #[test]
    fn prometheus_text() {
        let (prev, cur) = snaps();
        let text =
            to_prometheus(&sample("ebpf", &prev, &cur, 2.0), |d| format!("dev{}", blk::major_minor(d).0));
        for needle in [
            "mirror_blk_iops{dev=\"dev7\",op=\"read\"} 1000",
            "mirror_blk_latency_us{dev=\"dev7\",op=\"read\",stat=\"avg\"} 20",
            "mirror_blk_inflight{dev=\"dev8\"} 1",
            "mirror_runq_latency_us{stat=\"p99\"}",
            "mirror_tcp_retrans_per_s{peer=\"10.0.0.2\"} 10",
            "mirror_psi_pct{resource=\"memory\",kind=\"some\"} 10",
            "# TYPE mirror_blk_iops gauge",
        ] {
            assert!(text.contains(needle), "{needle} missing:\n{text}");
        }
    }
}
