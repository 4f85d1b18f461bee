//! The node health score (0..=100) from one telemetry interval, the node's facts and the
//! application probes. Pure: the caller passes samples in (their interval lengths are the
//! clock); the only state is the disk-latency baseline ([`super::baseline`]).
//!
//! Each signal gets a sub-score from 100 (fine) to 0 (bad) on a log scale between a "good" and a
//! "bad" threshold (a latency ten times the good one is as bad as it gets):
//! - disk: the replica device's read/write latency (p99, else mean) against the node's own
//!   baseline (learned only while healthy, anchored: see [`super::baseline`]); any I/O error
//!   is 0;
//! - cpu: run-queue latency p99, judged against what the interval's own load explains (the
//!   thresholds scale with 1 + tasks waiting per CPU: on a saturated node a woken task waits for
//!   the ones queued ahead of it, which is load, not sickness); CPU saturation (runnable tasks
//!   per CPU, the one-minute load average over the CPU count); CPU pressure (PSI some) stands in
//!   for the run-queue histogram without eBPF;
//! - memory: direct-reclaim stall time per second, memory pressure (PSI full), and memory
//!   available (percent of total);
//! - network: TCP retransmits per second towards the peer (or node-wide), and errors plus drops
//!   per second on the interface that routes to the peer;
//! - space: free space of the filesystem holding the replica (a replica about to hit ENOSPC is
//!   sick), percent of the filesystem;
//! - app: the share of application probes that answered as expected.
//!
//! Signals of one resource make one *part* (the worst of them); the composite is the weighted
//! mean of the parts, capped at the worst part plus `worst_margin`: one failing resource is
//! enough to make a node unhealthy, which a plain mean would dilute. The parts travel with the
//! score so the router can judge a node against its peer resource by resource
//! ([`crate::weights::policy::judge`]). A busy node loses nothing: full CPUs with nothing
//! waiting, a page cache that filled the memory (available counts reclaimable memory), a disk
//! busy at its usual latency are all scored 100.

use std::{net::IpAddr, time::Duration};

use super::baseline::{Baseline, BaselineConfig};
use crate::telemetry::collector::TelemetrySample;

/// Weights of the parts in the mean (they need not sum to 1).
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Weights {
    pub disk: f64,
    pub cpu: f64,
    pub memory: f64,
    pub network: f64,
    pub app: f64,
    pub space: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Weights { disk: 0.35, cpu: 0.15, memory: 0.15, network: 0.15, app: 0.20, space: 0.15 }
    }
}

/// How the score is made; every threshold is configurable (the `[health]` table of a replica's
/// config file, field names as here).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScoreConfig {
    pub weights: Weights,
    /// The replica's backing device (kernel dev_t); `None`: the busiest device. Set from the
    /// volume or `--health-device`, not from the file.
    #[serde(skip)]
    pub device: Option<u32>,
    /// The peer node, for retransmits and the interface's errors; `None`: node-wide.
    pub peer: Option<IpAddr>,
    /// Disk latency / baseline ratio from which the disk sub-score falls (1 = at baseline).
    pub disk_ratio_good: f64,
    pub disk_ratio_bad: f64,
    /// Run-queue p99 in microseconds (scaled by 1 + tasks waiting per CPU).
    pub runq_good_us: f64,
    pub runq_bad_us: f64,
    /// CPU saturation: runnable tasks per CPU (one-minute load average / CPUs).
    pub load_good: f64,
    pub load_bad: f64,
    /// Direct-reclaim stall, milliseconds per second.
    pub reclaim_good_ms: f64,
    pub reclaim_bad_ms: f64,
    /// Memory pressure (PSI full) percentages.
    pub psi_good_pct: f64,
    pub psi_bad_pct: f64,
    /// CPU pressure (PSI some) thresholds, used without a run-queue histogram.
    pub psi_cpu_good_pct: f64,
    pub psi_cpu_bad_pct: f64,
    /// Memory available, percent of total (lower is worse).
    pub mem_available_good_pct: f64,
    pub mem_available_bad_pct: f64,
    /// Retransmits per second.
    pub retrans_good: f64,
    pub retrans_bad: f64,
    /// Errors plus drops per second on the interface towards the peer.
    pub link_errors_good: f64,
    pub link_errors_bad: f64,
    /// Free space of the replica's filesystem, percent (lower is worse).
    pub fs_free_good_pct: f64,
    pub fs_free_bad_pct: f64,
    /// The composite is at most the worst part plus this.
    pub worst_margin: f64,
    /// Latency below this (microseconds) is never judged slow: a page-cached or idle disk's
    /// baseline is tiny and triples under ordinary load; the ratio is taken against
    /// max(baseline, floor).
    pub disk_floor_us: f64,
    /// Fewer completions than this in an interval say nothing about the disk: the previous
    /// disk score holds.
    pub disk_min_ios: f64,
}

impl Default for ScoreConfig {
    fn default() -> Self {
        ScoreConfig {
            weights: Weights::default(),
            device: None,
            peer: None,
            disk_ratio_good: 2.0,
            disk_ratio_bad: 10.0,
            runq_good_us: 1_000.0,
            runq_bad_us: 50_000.0,
            load_good: 4.0,
            load_bad: 32.0,
            reclaim_good_ms: 1.0,
            reclaim_bad_ms: 200.0,
            psi_good_pct: 20.0,
            psi_cpu_good_pct: 50.0,
            psi_cpu_bad_pct: 98.0,
            psi_bad_pct: 80.0,
            mem_available_good_pct: 10.0,
            mem_available_bad_pct: 2.0,
            retrans_good: 1.0,
            retrans_bad: 50.0,
            link_errors_good: 1.0,
            link_errors_bad: 100.0,
            fs_free_good_pct: 10.0,
            fs_free_bad_pct: 5.0,
            worst_margin: 15.0,
            disk_min_ios: 4.0,
            disk_floor_us: 1000.0,
        }
    }
}

impl ScoreConfig {
    /// Every threshold pair ordered (bad beyond good), weights and margin not negative; the
    /// error names the offending keys.
    pub fn validate(&self) -> Result<(), String> {
        let higher_worse = [
            ("disk_ratio", self.disk_ratio_good, self.disk_ratio_bad),
            ("runq", self.runq_good_us, self.runq_bad_us),
            ("load", self.load_good, self.load_bad),
            ("reclaim", self.reclaim_good_ms, self.reclaim_bad_ms),
            ("psi", self.psi_good_pct, self.psi_bad_pct),
            ("psi_cpu", self.psi_cpu_good_pct, self.psi_cpu_bad_pct),
            ("retrans", self.retrans_good, self.retrans_bad),
            ("link_errors", self.link_errors_good, self.link_errors_bad),
        ];
        for (k, g, b) in higher_worse {
            if !(g > 0.0 && g < b) {
                return Err(format!("{k}_good ({g}) must be above 0 and below {k}_bad ({b})"));
            }
        }
        for (k, g, b) in [
            ("mem_available", self.mem_available_good_pct, self.mem_available_bad_pct),
            ("fs_free", self.fs_free_good_pct, self.fs_free_bad_pct),
        ] {
            if !(b > 0.0 && b < g && g <= 100.0) {
                return Err(format!(
                    "{k}_bad_pct ({b}) must be above 0 and below {k}_good_pct ({g}), at most 100"
                ));
            }
        }
        let w = self.weights;
        if [w.disk, w.cpu, w.memory, w.network, w.app, w.space].iter().any(|x| x.is_nan() || *x < 0.0) {
            return Err("weights must not be negative".into());
        }
        if !(self.worst_margin >= 0.0 && self.disk_floor_us >= 0.0 && self.disk_min_ios >= 0.0) {
            return Err("worst_margin, disk_floor_us and disk_min_ios must not be negative".into());
        }
        Ok(())
    }
}

/// One signal's contribution, for status and logs.
#[derive(Debug, Clone, PartialEq)]
pub struct Signal {
    pub name: &'static str,
    /// The measured value, in the unit of `unit`.
    pub value: f64,
    pub unit: &'static str,
    pub score: f64,
}

/// One resource's sub-score (the worst of its signals) and its weight in the composite.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Part {
    pub name: &'static str,
    pub weight: f64,
    pub score: f64,
}

/// A node's health.
#[derive(Debug, Clone, PartialEq)]
pub struct Health {
    pub score: f64,
    pub signals: Vec<Signal>,
    pub parts: Vec<Part>,
}

/// A probe result (HTTP GET of an application endpoint).
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeResult {
    pub name: String,
    pub ok: bool,
}

/// What the node's own figures say, read with `sysinfo` and sysfs by the monitor
/// ([`super::facts`]); each is `None` where it cannot be known (a replica on a block device has
/// no filesystem, a peer with no route has no interface).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeFacts {
    /// The filesystem holding the replica.
    pub fs: Option<FsFacts>,
    pub memory: Option<MemFacts>,
    /// The interface towards the peer (node-wide when the peer is not known).
    pub link: Option<LinkFacts>,
    pub load: Option<LoadFacts>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FsFacts {
    pub mount: std::path::PathBuf,
    pub free_bytes: u64,
    pub total_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemFacts {
    pub available_bytes: u64,
    pub total_bytes: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LinkFacts {
    pub iface: String,
    /// Receive and transmit errors plus drops per second over the last interval.
    pub errors_per_s: f64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadFacts {
    /// One-minute load average.
    pub load1: f64,
    pub cpus: usize,
}

/// 100 at or below `good`, 0 at or above `bad`, log-linear in between.
pub fn falloff(value: f64, good: f64, bad: f64) -> f64 {
    if !value.is_finite() || value <= good {
        return 100.0;
    }
    if value >= bad {
        return 0.0;
    }
    let (v, g, b) = (value.max(1e-9).ln(), good.max(1e-9).ln(), bad.max(1e-9).ln());
    (100.0 * (b - v) / (b - g)).clamp(0.0, 100.0)
}

/// [`falloff`] for a figure where lower is worse (free space): 100 at or above `good`, 0 at or
/// below `bad`, log-linear in between.
pub fn falloff_low(value: f64, good: f64, bad: f64) -> f64 {
    if value.is_nan() {
        return 100.0;
    }
    falloff(1.0 / value.max(1e-12), 1.0 / good, 1.0 / bad)
}

/// The composite of parts: their weighted mean, at most the worst part plus `margin` (100 with
/// no weighted part).
pub fn composite(parts: impl IntoIterator<Item = (f64, f64)>, margin: f64) -> f64 {
    let parts: Vec<(f64, f64)> = parts.into_iter().filter(|&(w, _)| w > 0.0).collect();
    let worst = parts.iter().map(|&(_, s)| s).fold(100.0f64, f64::min);
    let total: f64 = parts.iter().map(|&(w, _)| w).sum();
    // The mean as the worst plus the weighted excess over it: exact when all parts are equal.
    let mean = if total > 0.0 {
        worst + parts.iter().map(|&(w, s)| w * (s - worst)).sum::<f64>() / total
    } else {
        100.0
    };
    mean.min(worst + margin).clamp(0.0, 100.0)
}

/// The scorer: configuration plus the learned disk baseline.
#[derive(Debug, Clone)]
pub struct Scorer {
    pub cfg: ScoreConfig,
    baseline: Baseline,
    /// The scorer's clock: the sum of the intervals scored.
    now: Duration,
    /// The last disk signal (ratio, score), held through intervals with too few completions.
    last_disk: Option<(f64, f64)>,
}

impl Scorer {
    pub fn new(cfg: ScoreConfig) -> Scorer {
        let baseline =
            Baseline::new(BaselineConfig { healthy_ratio: cfg.disk_ratio_good, ..Default::default() });
        Scorer { cfg, baseline, now: Duration::ZERO, last_disk: None }
    }

    pub fn baseline_us(&self) -> Option<f64> {
        self.baseline.value()
    }

    /// The scored device's worst latency (p99, else mean), whether it had errors, and how many
    /// requests completed.
    fn disk_latency(&self, s: &TelemetrySample) -> Option<(f64, bool, f64)> {
        let dev = match self.cfg.device {
            Some(d) => s.devices.iter().find(|x| x.dev == d)?,
            None => s.devices.iter().max_by(|a, b| {
                let io =
                    |d: &crate::telemetry::collector::DeviceSample| d.ops.iter().map(|o| o.iops).sum::<f64>();
                io(a).total_cmp(&io(b))
            })?,
        };
        let lat = dev
            .ops
            .iter()
            .filter_map(|o| o.p99_us.or(o.avg_us))
            .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))))?;
        let ios = dev.ops.iter().map(|o| o.iops).sum::<f64>() * s.secs;
        Some((lat, dev.ops.iter().any(|o| o.errors > 0), ios))
    }

    /// Scores one interval.
    pub fn score(&mut self, s: &TelemetrySample, facts: &NodeFacts, probes: &[ProbeResult]) -> Health {
        self.now += Duration::from_secs_f64(s.secs.clamp(0.0, 3600.0));
        let c = self.cfg.clone();
        let mut signals = Vec::new();
        let mut parts: Vec<Part> = Vec::new();
        let mut part = |name: &'static str, weight: f64, score: Option<f64>| {
            if let Some(score) = score {
                parts.push(Part { name, weight, score });
            }
        };
        let worse = |a: Option<f64>, b: f64| Some(a.map_or(b, |a| a.min(b)));
        let disk = match self.disk_latency(s) {
            Some((_, true, _)) => Some((f64::INFINITY, 0.0)),
            Some((lat, false, ios)) if ios >= c.disk_min_ios => {
                let ratio = self.baseline.observe(self.now, lat.max(1.0), c.disk_floor_us);
                Some((ratio, falloff(ratio, c.disk_ratio_good, c.disk_ratio_bad)))
            }
            _ => self.last_disk,
        };
        if let Some((ratio, score)) = disk {
            self.last_disk = Some((ratio, score));
            signals.push(Signal { name: "disk_latency_ratio", value: ratio, unit: "x baseline", score });
        }
        part("disk", c.weights.disk, disk.map(|d| d.1));

        let mut cpu = None;
        let cpus = facts.load.map_or(1, |l| l.cpus.max(1)) as f64;
        if let Some(r) = s.runq.filter(|r| r.p99_us.is_some()) {
            let p99 = r.p99_us.unwrap_or(0.0);
            // What the interval's load explains: each task queued ahead on a CPU is a wait.
            let explained = 1.0 + (r.wait_ms_per_s / 1000.0 / cpus).max(0.0);
            let score = falloff(p99 / explained, c.runq_good_us, c.runq_bad_us);
            signals.push(Signal { name: "runq_p99", value: p99, unit: "us", score });
            cpu = Some(score);
        }
        // CPU pressure ("some" task waiting) is high on any busy node without anything being
        // wrong; it stands in only when the run-queue histogram (eBPF) is missing, with the
        // looser CPU thresholds.
        if let (None, Some(p)) = (cpu, s.pressure) {
            let score = falloff(p.cpu_some.pct, c.psi_cpu_good_pct, c.psi_cpu_bad_pct);
            signals.push(Signal { name: "psi_cpu_some", value: p.cpu_some.pct, unit: "%", score });
            cpu = Some(score);
        }
        if let Some(l) = facts.load {
            let per_cpu = l.load1 / cpus;
            let score = falloff(per_cpu, c.load_good, c.load_bad);
            signals.push(Signal { name: "cpu_saturation", value: per_cpu, unit: "tasks/cpu", score });
            cpu = worse(cpu, score);
        }
        part("cpu", c.weights.cpu, cpu);

        let mut mem = None;
        if let Some(r) = s.reclaim {
            let score = falloff(r.wait_ms_per_s, c.reclaim_good_ms, c.reclaim_bad_ms);
            signals.push(Signal { name: "reclaim_stall", value: r.wait_ms_per_s, unit: "ms/s", score });
            mem = Some(score);
        }
        if let Some(p) = s.pressure {
            let score = falloff(p.memory_full.pct, c.psi_good_pct, c.psi_bad_pct);
            signals.push(Signal { name: "psi_memory_full", value: p.memory_full.pct, unit: "%", score });
            mem = worse(mem, score);
        }
        if let Some(m) = facts.memory.filter(|m| m.total_bytes > 0) {
            let pct = m.available_bytes as f64 * 100.0 / m.total_bytes as f64;
            let score = falloff_low(pct, c.mem_available_good_pct, c.mem_available_bad_pct);
            signals.push(Signal { name: "mem_available", value: pct, unit: "%", score });
            mem = worse(mem, score);
        }
        part("memory", c.weights.memory, mem);

        let mut net = None;
        let retrans = match c.peer {
            Some(peer) => Some(s.retrans.iter().find(|r| r.peer == peer).map_or(0.0, |r| r.per_s)),
            None => s.retrans_per_s,
        };
        if let Some(r) = retrans {
            let score = falloff(r, c.retrans_good, c.retrans_bad);
            signals.push(Signal { name: "tcp_retransmits", value: r, unit: "/s", score });
            net = Some(score);
        }
        if let Some(l) = &facts.link {
            let score = falloff(l.errors_per_s, c.link_errors_good, c.link_errors_bad);
            signals.push(Signal { name: "link_errors", value: l.errors_per_s, unit: "/s", score });
            net = worse(net, score);
        }
        part("network", c.weights.network, net);

        if let Some(f) = facts.fs.as_ref().filter(|f| f.total_bytes > 0) {
            let pct = f.free_bytes as f64 * 100.0 / f.total_bytes as f64;
            let score = falloff_low(pct, c.fs_free_good_pct, c.fs_free_bad_pct);
            signals.push(Signal { name: "fs_free", value: pct, unit: "%", score });
            part("space", c.weights.space, Some(score));
        }

        if !probes.is_empty() {
            let ok = probes.iter().filter(|p| p.ok).count() as f64 / probes.len() as f64;
            let score = 100.0 * ok;
            signals.push(Signal { name: "app_probes_ok", value: ok * 100.0, unit: "%", score });
            part("app", c.weights.app, Some(score));
        }
        let score = composite(parts.iter().map(|p| (p.weight, p.score)), c.worst_margin);
        Health { score, signals, parts }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::telemetry::collector::{DeviceSample, LatencySample, OpSample, PeerRetrans};

    /// One second of telemetry: the disk's read p99, the run queue's p99, retransmits to the peer.
    pub(crate) fn sample(disk_p99: f64, runq_p99: f64, retrans: f64) -> TelemetrySample {
        TelemetrySample {
            source: "test",
            secs: 1.0,
            devices: vec![DeviceSample {
                dev: 7 << 20,
                inflight: 1,
                ops: vec![OpSample {
                    op: "read",
                    iops: 1000.0,
                    mib_per_s: 4.0,
                    errors: 0,
                    avg_us: Some(disk_p99 / 2.0),
                    p50_us: None,
                    p99_us: Some(disk_p99),
                }],
            }],
            runq: Some(LatencySample {
                events_per_s: 100.0,
                wait_ms_per_s: 1.0,
                measured_s: 1.0,
                avg_us: None,
                p50_us: None,
                p99_us: Some(runq_p99),
            }),
            reclaim: None,
            retrans: vec![PeerRetrans { peer: "10.0.0.2".parse().unwrap(), per_s: retrans }],
            retrans_per_s: Some(retrans),
            pressure: None,
        }
    }

    #[test]
    fn falloff_is_log_linear_between_thresholds() {
        assert_eq!(falloff(1.0, 2.0, 20.0), 100.0);
        assert_eq!(falloff(20.0, 2.0, 20.0), 0.0);
        assert!((falloff(2.0 * 10f64.sqrt(), 2.0, 20.0) - 50.0).abs() < 1e-6);
        assert_eq!(falloff(f64::NAN, 2.0, 20.0), 100.0);
    }

    #[test]
    fn a_healthy_node_scores_high_and_explains_itself() {
        let mut s = Scorer::new(ScoreConfig::default());
        let h = s.score(
            &sample(2000.0, 200.0, 0.0),
            &NodeFacts::default(),
            &[ProbeResult { name: "api".into(), ok: true }],
        );
        assert!(h.score > 95.0, "{h:?}");
        let names: Vec<_> = h.signals.iter().map(|s| s.name).collect();
        assert_eq!(names, ["disk_latency_ratio", "runq_p99", "tcp_retransmits", "app_probes_ok"]);
    }

    #[test]
    fn disk_latency_ten_times_the_baseline_drives_the_score_low() {
        let mut s = Scorer::new(ScoreConfig::default());
        for _ in 0..20 {
            s.score(&sample(2000.0, 200.0, 0.0), &NodeFacts::default(), &[]);
        }
        let h = s.score(&sample(20000.0, 200.0, 0.0), &NodeFacts::default(), &[]);
        assert!(h.score <= 15.0, "{h:?}");
        // The degraded interval hardly moved the baseline (0.1% of the way).
        assert!((s.baseline_us().unwrap() - 2000.0).abs() < 25.0, "{:?}", s.baseline_us());
    }

    #[test]
    fn a_quiet_interval_holds_the_disk_signal_and_a_faster_disk_lowers_the_baseline() {
        let mut s = Scorer::new(ScoreConfig::default());
        s.score(&sample(20000.0, 200.0, 0.0), &NodeFacts::default(), &[]);
        s.score(&sample(2000.0, 200.0, 0.0), &NodeFacts::default(), &[]);
        assert!(s.baseline_us().unwrap() < 12000.0, "follows a faster disk at once: {:?}", s.baseline_us());
        for _ in 0..10 {
            s.score(&sample(2000.0, 200.0, 0.0), &NodeFacts::default(), &[]);
        }
        let slow = s.score(&sample(40000.0, 200.0, 0.0), &NodeFacts::default(), &[]).score;
        let mut quiet = sample(10.0, 200.0, 0.0);
        quiet.devices[0].ops[0].iops = 1.0; // 1 completion in a 1 s interval: says nothing
        let held = s.score(&quiet, &NodeFacts::default(), &[]).score;
        assert!(slow < 20.0 && (held - slow).abs() < 1e-9, "slow {slow} held {held}");
    }

    #[test]
    fn latency_under_the_floor_is_never_slow() {
        let mut s = Scorer::new(ScoreConfig::default());
        for _ in 0..10 {
            s.score(&sample(30.0, 200.0, 0.0), &NodeFacts::default(), &[]);
        }
        // 30 us -> 600 us is 20x the baseline but still under the 1 ms floor.
        assert!(s.score(&sample(600.0, 200.0, 0.0), &NodeFacts::default(), &[]).score > 95.0);
        assert!(s.score(&sample(20000.0, 200.0, 0.0), &NodeFacts::default(), &[]).score < 20.0);
    }

    #[test]
    fn a_failing_probe_lowers_health() {
        let mut s = Scorer::new(ScoreConfig::default());
        let ok = s
            .score(
                &sample(2000.0, 200.0, 0.0),
                &NodeFacts::default(),
                &[ProbeResult { name: "api".into(), ok: true }],
            )
            .score;
        let bad = s
            .score(
                &sample(2000.0, 200.0, 0.0),
                &NodeFacts::default(),
                &[ProbeResult { name: "api".into(), ok: false }],
            )
            .score;
        assert!(ok - bad >= 50.0, "ok {ok} bad {bad}");
    }

    #[test]
    fn retransmits_to_the_peer_and_cpu_wait_count() {
        let cfg = ScoreConfig { peer: Some("10.0.0.2".parse().unwrap()), ..Default::default() };
        let mut s = Scorer::new(cfg);
        assert!(s.score(&sample(2000.0, 200.0, 100.0), &NodeFacts::default(), &[]).score < 30.0);
        assert!(s.score(&sample(2000.0, 100_000.0, 0.0), &NodeFacts::default(), &[]).score < 30.0);
    }

    fn facts(fs_free_pct: f64, mem_avail_pct: f64, link_errs: f64, load_per_cpu: f64) -> NodeFacts {
        NodeFacts {
            fs: Some(FsFacts {
                mount: "/var/lib/mirror".into(),
                free_bytes: (fs_free_pct * 1e7) as u64,
                total_bytes: 1_000_000_000,
            }),
            memory: Some(MemFacts {
                available_bytes: (mem_avail_pct * 1e7) as u64,
                total_bytes: 1_000_000_000,
            }),
            link: Some(LinkFacts { iface: "eth0".into(), errors_per_s: link_errs }),
            load: Some(LoadFacts { load1: load_per_cpu * 2.0, cpus: 2 }),
        }
    }

    fn signal<'a>(h: &'a Health, name: &str) -> &'a Signal {
        h.signals.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("no {name} in {h:?}"))
    }

    #[test]
    fn a_busy_but_healthy_node_loses_nothing() {
        let mut s = Scorer::new(ScoreConfig::default());
        // Both CPUs busy (load 1 per CPU), the page cache filled memory (40% available), some
        // tasks waiting with run-queue latency their number explains.
        let mut busy = sample(2000.0, 2500.0, 0.0);
        busy.runq.as_mut().unwrap().wait_ms_per_s = 4000.0; // 2 tasks waiting per CPU
        let h = s.score(&busy, &facts(60.0, 40.0, 0.0, 1.0), &[]);
        assert!(h.score >= 99.0, "{h:?}");
        let names: Vec<_> = h.signals.iter().map(|s| s.name).collect();
        for n in ["cpu_saturation", "mem_available", "link_errors", "fs_free"] {
            assert!(names.contains(&n), "{n} in {names:?}");
        }
        assert_eq!(
            h.parts.iter().map(|p| p.name).collect::<Vec<_>>(),
            ["disk", "cpu", "memory", "network", "space"]
        );
        // The same run-queue latency with nothing waiting is a CPU the node does not get.
        let h = s.score(&sample(2000.0, 2500.0 * 3.0, 0.0), &facts(60.0, 40.0, 0.0, 1.0), &[]);
        assert!(signal(&h, "runq_p99").score < 80.0, "{h:?}");
    }

    #[test]
    fn a_replica_filesystem_near_full_makes_the_node_sick_and_says_so() {
        let mut s = Scorer::new(ScoreConfig::default());
        let ok = s.score(&sample(2000.0, 200.0, 0.0), &facts(30.0, 40.0, 0.0, 0.5), &[]);
        assert!(ok.score >= 99.0, "{ok:?}");
        let h = s.score(&sample(2000.0, 200.0, 0.0), &facts(5.0, 40.0, 0.0, 0.5), &[]);
        assert!(h.score <= 15.0, "95% full: {h:?}");
        assert_eq!((signal(&h, "fs_free").value, signal(&h, "fs_free").score), (5.0, 0.0));
        // Half way (in log terms) between 10% and 5% free.
        let mid = s.score(&sample(2000.0, 200.0, 0.0), &facts(50f64.sqrt(), 40.0, 0.0, 0.5), &[]);
        assert!((signal(&mid, "fs_free").score - 50.0).abs() < 1e-6, "{mid:?}");
    }

    #[test]
    fn memory_link_errors_and_saturation_count() {
        let mut s = Scorer::new(ScoreConfig::default());
        for (f, name) in [
            (facts(60.0, 1.5, 0.0, 0.5), "mem_available"),
            (facts(60.0, 40.0, 150.0, 0.5), "link_errors"),
            (facts(60.0, 40.0, 0.0, 40.0), "cpu_saturation"),
        ] {
            let h = s.score(&sample(2000.0, 200.0, 0.0), &f, &[]);
            assert_eq!(signal(&h, name).score, 0.0, "{h:?}");
            assert!(h.score <= 15.0, "{name}: {h:?}");
        }
    }

    #[test]
    fn the_config_is_validated() {
        assert_eq!(ScoreConfig::default().validate(), Ok(()));
        let bad = |c: ScoreConfig| c.validate().unwrap_err();
        assert!(bad(ScoreConfig { load_good: 40.0, ..Default::default() }).contains("load_good"));
        assert!(bad(ScoreConfig { fs_free_bad_pct: 20.0, ..Default::default() }).contains("fs_free_bad_pct"));
        assert!(bad(ScoreConfig { mem_available_good_pct: 120.0, ..Default::default() })
            .contains("mem_available"));
        let w = Weights { space: -1.0, ..Default::default() };
        assert!(bad(ScoreConfig { weights: w, ..Default::default() }).contains("weights"));
        assert!(bad(ScoreConfig { link_errors_bad: 0.5, ..Default::default() }).contains("link_errors"));
    }

    #[test]
    fn composite_and_falloff_low() {
        assert_eq!(composite([(0.5, 100.0), (0.5, 0.0)], 15.0), 15.0);
        assert_eq!(composite([(0.5, 100.0), (0.5, 80.0)], 15.0), 90.0);
        assert_eq!(composite([(0.0, 0.0)], 15.0), 100.0, "a part of weight 0 does not count");
        assert_eq!(composite(std::iter::empty(), 15.0), 100.0);
        assert_eq!(falloff_low(20.0, 10.0, 5.0), 100.0);
        assert_eq!(falloff_low(4.0, 10.0, 5.0), 0.0);
    }
}
