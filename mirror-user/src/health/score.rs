//! The node health score (0..=100) from one telemetry interval and the application probes.
//! Pure: the caller passes samples in; the only state is the disk-latency baseline.
//!
//! Each signal gets a sub-score from 100 (fine) to 0 (bad) on a log scale between a "good" and a
//! "bad" threshold (a latency ten times the good one is as bad as it gets):
//! - disk: the replica device's read/write latency (p99, else mean) against the node's own
//!   baseline (a slow moving average learned while the ratio stays below 2); any I/O error is 0;
//! - cpu: run-queue latency p99, and CPU pressure (PSI some);
//! - memory: direct-reclaim stall time per second, and memory pressure (PSI full);
//! - network: TCP retransmits per second towards the peer (or node-wide);
//! - app: the share of application probes that answered as expected.
//!
//! The composite is the weighted mean of the sub-scores, capped at the worst sub-score plus
//! `worst_margin`: one failing resource is enough to make a node unhealthy, which a plain mean
//! would dilute.

use std::net::IpAddr;

use crate::telemetry::collector::TelemetrySample;

/// Weights of the signals in the mean (they need not sum to 1).
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Weights {
    pub disk: f64,
    pub cpu: f64,
    pub memory: f64,
    pub network: f64,
    pub app: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Weights { disk: 0.35, cpu: 0.15, memory: 0.15, network: 0.15, app: 0.20 }
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
    /// The peer node, for retransmits; `None`: node-wide retransmits.
    pub peer: Option<IpAddr>,
    /// Disk latency / baseline ratio from which the disk sub-score falls (1 = at baseline).
    pub disk_ratio_good: f64,
    pub disk_ratio_bad: f64,
    /// Run-queue p99 in microseconds.
    pub runq_good_us: f64,
    pub runq_bad_us: f64,
    /// Direct-reclaim stall, milliseconds per second.
    pub reclaim_good_ms: f64,
    pub reclaim_bad_ms: f64,
    /// Memory pressure (PSI full) percentages.
    pub psi_good_pct: f64,
    pub psi_bad_pct: f64,
    /// CPU pressure (PSI some) thresholds, used without a run-queue histogram.
    pub psi_cpu_good_pct: f64,
    pub psi_cpu_bad_pct: f64,
    /// Retransmits per second.
    pub retrans_good: f64,
    pub retrans_bad: f64,
    /// The composite is at most the worst sub-score plus this.
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
            reclaim_good_ms: 1.0,
            reclaim_bad_ms: 200.0,
            psi_good_pct: 20.0,
            psi_cpu_good_pct: 50.0,
            psi_cpu_bad_pct: 98.0,
            psi_bad_pct: 80.0,
            retrans_good: 1.0,
            retrans_bad: 50.0,
            worst_margin: 15.0,
            disk_min_ios: 4.0,
            disk_floor_us: 1000.0,
        }
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

/// A node's health.
#[derive(Debug, Clone, PartialEq)]
pub struct Health {
    pub score: f64,
    pub signals: Vec<Signal>,
}

/// A probe result (HTTP GET of an application endpoint).
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeResult {
    pub name: String,
    pub ok: bool,
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

/// The scorer: configuration plus the learned disk baseline.
#[derive(Debug, Clone)]
pub struct Scorer {
    pub cfg: ScoreConfig,
    /// Baseline disk latency in microseconds.
    baseline_us: Option<f64>,
    /// The last disk signal (ratio, score), held through intervals with too few completions.
    last_disk: Option<(f64, f64)>,
}

impl Scorer {
    pub fn new(cfg: ScoreConfig) -> Scorer {
        Scorer { cfg, baseline_us: None, last_disk: None }
    }

    pub fn baseline_us(&self) -> Option<f64> {
        self.baseline_us
    }

    /// Disk latency of the interval (worst op's p99, else mean) and whether errors occurred.
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
    pub fn score(&mut self, s: &TelemetrySample, probes: &[ProbeResult]) -> Health {
        let c = &self.cfg;
        let mut signals = Vec::new();
        let mut weighted = Vec::new();
        let disk = match self.disk_latency(s) {
            Some((_, true, _)) => Some((f64::INFINITY, 0.0)),
            Some((lat, false, ios)) if ios >= c.disk_min_ios => {
                let lat = lat.max(1.0);
                let base = *self.baseline_us.get_or_insert(lat);
                let ratio = lat / base.max(c.disk_floor_us);
                // The baseline follows a faster disk at once, a slower one slowly while the
                // ratio is ordinary, and hardly at all (hours) while it is not.
                self.baseline_us = Some(if lat < base {
                    (base + lat) / 2.0
                } else if ratio < 2.0 {
                    base * 0.95 + lat * 0.05
                } else {
                    base * 0.999 + lat * 0.001
                });
                Some((ratio, falloff(ratio, c.disk_ratio_good, c.disk_ratio_bad)))
            }
            _ => self.last_disk,
        };
        if let Some((ratio, score)) = disk {
            self.last_disk = Some((ratio, score));
            signals.push(Signal { name: "disk_latency_ratio", value: ratio, unit: "x baseline", score });
            weighted.push((c.weights.disk, score));
        }
        let mut cpu = None;
        if let Some(p99) = s.runq.and_then(|r| r.p99_us) {
            let score = falloff(p99, c.runq_good_us, c.runq_bad_us);
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
        if let Some(score) = cpu {
            weighted.push((c.weights.cpu, score));
        }
        let mut mem = None;
        if let Some(r) = s.reclaim {
            let score = falloff(r.wait_ms_per_s, c.reclaim_good_ms, c.reclaim_bad_ms);
            signals.push(Signal { name: "reclaim_stall", value: r.wait_ms_per_s, unit: "ms/s", score });
            mem = Some(score);
        }
        if let Some(p) = s.pressure {
            let score = falloff(p.memory_full.pct, c.psi_good_pct, c.psi_bad_pct);
            signals.push(Signal { name: "psi_memory_full", value: p.memory_full.pct, unit: "%", score });
            mem = Some(mem.map_or(score, |x: f64| x.min(score)));
        }
        if let Some(score) = mem {
            weighted.push((c.weights.memory, score));
        }
        let retrans = match c.peer {
            Some(peer) => Some(s.retrans.iter().find(|r| r.peer == peer).map_or(0.0, |r| r.per_s)),
            None => s.retrans_per_s,
        };
        if let Some(r) = retrans {
            let score = falloff(r, c.retrans_good, c.retrans_bad);
            signals.push(Signal { name: "tcp_retransmits", value: r, unit: "/s", score });
            weighted.push((c.weights.network, score));
        }
        if !probes.is_empty() {
            let ok = probes.iter().filter(|p| p.ok).count() as f64 / probes.len() as f64;
            let score = 100.0 * ok;
            signals.push(Signal { name: "app_probes_ok", value: ok * 100.0, unit: "%", score });
            weighted.push((c.weights.app, score));
        }
        let total: f64 = weighted.iter().map(|(w, _)| w).sum();
        let mean = if total > 0.0 { weighted.iter().map(|(w, s)| w * s).sum::<f64>() / total } else { 100.0 };
        let worst = weighted.iter().map(|(_, s)| *s).fold(100.0, f64::min);
        Health { score: mean.min(worst + c.worst_margin).clamp(0.0, 100.0), signals }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::collector::{DeviceSample, LatencySample, OpSample, PeerRetrans};

    fn sample(disk_p99: f64, runq_p99: f64, retrans: f64) -> TelemetrySample {
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
        let h = s.score(&sample(2000.0, 200.0, 0.0), &[ProbeResult { name: "api".into(), ok: true }]);
        assert!(h.score > 95.0, "{h:?}");
        let names: Vec<_> = h.signals.iter().map(|s| s.name).collect();
        assert_eq!(names, ["disk_latency_ratio", "runq_p99", "tcp_retransmits", "app_probes_ok"]);
    }

    #[test]
    fn disk_latency_ten_times_the_baseline_drives_the_score_low() {
        let mut s = Scorer::new(ScoreConfig::default());
        for _ in 0..20 {
            s.score(&sample(2000.0, 200.0, 0.0), &[]);
        }
        let h = s.score(&sample(20000.0, 200.0, 0.0), &[]);
        assert!(h.score <= 15.0, "{h:?}");
        // The degraded interval hardly moved the baseline (0.1% of the way).
        assert!((s.baseline_us().unwrap() - 2000.0).abs() < 25.0, "{:?}", s.baseline_us());
    }

    #[test]
    fn a_quiet_interval_holds_the_disk_signal_and_a_faster_disk_lowers_the_baseline() {
        let mut s = Scorer::new(ScoreConfig::default());
        s.score(&sample(20000.0, 200.0, 0.0), &[]);
        s.score(&sample(2000.0, 200.0, 0.0), &[]);
        assert!(s.baseline_us().unwrap() < 12000.0, "follows a faster disk at once: {:?}", s.baseline_us());
        for _ in 0..10 {
            s.score(&sample(2000.0, 200.0, 0.0), &[]);
        }
        let slow = s.score(&sample(40000.0, 200.0, 0.0), &[]).score;
        let mut quiet = sample(10.0, 200.0, 0.0);
        quiet.devices[0].ops[0].iops = 1.0; // 1 completion in a 1 s interval: says nothing
        let held = s.score(&quiet, &[]).score;
        assert!(slow < 20.0 && (held - slow).abs() < 1e-9, "slow {slow} held {held}");
    }

    #[test]
    fn latency_under_the_floor_is_never_slow() {
        let mut s = Scorer::new(ScoreConfig::default());
        for _ in 0..10 {
            s.score(&sample(30.0, 200.0, 0.0), &[]);
        }
        // 30 us -> 600 us is 20x the baseline but still under the 1 ms floor.
        assert!(s.score(&sample(600.0, 200.0, 0.0), &[]).score > 95.0);
        assert!(s.score(&sample(20000.0, 200.0, 0.0), &[]).score < 20.0);
    }

    #[test]
    fn a_failing_probe_lowers_health() {
        let mut s = Scorer::new(ScoreConfig::default());
        let ok = s.score(&sample(2000.0, 200.0, 0.0), &[ProbeResult { name: "api".into(), ok: true }]).score;
        let bad =
            s.score(&sample(2000.0, 200.0, 0.0), &[ProbeResult { name: "api".into(), ok: false }]).score;
        assert!(ok - bad >= 50.0, "ok {ok} bad {bad}");
    }

    #[test]
    fn retransmits_to_the_peer_and_cpu_wait_count() {
        let cfg = ScoreConfig { peer: Some("10.0.0.2".parse().unwrap()), ..Default::default() };
        let mut s = Scorer::new(cfg);
        assert!(s.score(&sample(2000.0, 200.0, 100.0), &[]).score < 30.0);
        assert!(s.score(&sample(2000.0, 100_000.0, 0.0), &[]).score < 30.0);
    }
}
