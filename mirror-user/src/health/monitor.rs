//! The node's health monitor: every interval it reads the node's telemetry (the daemon's pinned
//! eBPF maps, or /proc), probes the application endpoints, scores the result, and publishes the
//! score with the signals behind it in a [`NodeHealth`] that the replica server sends in every
//! heartbeat reply. Each published part (a resource's sub-score) is the median of its last three
//! interval sub-scores, and the published score is composed from them: one odd interval (a burst
//! of I/O, a stalled sample) moves nothing, a real change shows after two. The node's facts
//! (free space, memory, interface errors, load) are read with [`super::facts`] each interval.

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::{
    facts::FactReader,
    probe::{ProbeSpec, Prober},
    score::{composite, Health, Part, ScoreConfig, Scorer},
};
use crate::telemetry::{collector::Collector, Source};

/// A node's health as it reports it: the score and the signals behind it. The heartbeat reply
/// carries it as JSON text (`{"margin":M,"parts":[{"name":..,"score":..,"weight":..}],"score":S,
/// "signals":[{"name":..,"score":..,"unit":..,"value":..}],"telemetry":"ebpf"}`, `{}` before the
/// first score): [`NodeReport::to_wire`] and [`NodeReport::from_wire`] are that edge. Fields are
/// declared in the order of that text. A report without `margin` and `parts` (an older node) is
/// judged by its score alone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeReport {
    /// The score's `worst_margin`: it is at most the worst part plus this.
    #[serde(default)]
    pub margin: f64,
    /// The resources' sub-scores and weights the score is composed of.
    #[serde(default)]
    pub parts: Vec<PartReport>,
    /// 0..=100, rounded to two decimals.
    pub score: f64,
    pub signals: Vec<SignalReport>,
    /// Where the figures came from: `ebpf`, `procfs`, ...
    pub telemetry: String,
}

/// One signal of a [`NodeReport`], rounded to two decimals.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignalReport {
    pub name: String,
    /// Sub-score 0..=100.
    pub score: f64,
    pub unit: String,
    /// The measured value in `unit`; not a number is written as `null`.
    #[serde(deserialize_with = "null_as_nan")]
    pub value: f64,
}

/// One part of a [`NodeReport`]: a resource's sub-score (the worst of its signals) and its
/// weight in the score, rounded to two decimals.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartReport {
    pub name: String,
    pub score: f64,
    pub weight: f64,
}

/// `null` (how JSON writes a value that is not a number) reads back as NaN.
fn null_as_nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

impl NodeReport {
    /// The report of a score composed with `margin`.
    pub fn new(h: &Health, margin: f64, telemetry: &str) -> NodeReport {
        let round = |x: f64| (x * 100.0).round() / 100.0;
        NodeReport {
            margin: round(margin),
            parts: h
                .parts
                .iter()
                .map(|p| PartReport { name: p.name.into(), score: round(p.score), weight: round(p.weight) })
                .collect(),
            score: round(h.score),
            signals: h
                .signals
                .iter()
                .map(|s| SignalReport {
                    name: s.name.into(),
                    score: round(s.score),
                    unit: s.unit.into(),
                    value: round(s.value),
                })
                .collect(),
            telemetry: telemetry.into(),
        }
    }

    /// The heartbeat reply's text of a report, `{}` for none yet.
    pub fn to_wire(report: Option<&NodeReport>) -> String {
        match report {
            // A struct of strings and numbers always serializes.
            Some(r) => serde_json::to_string(r).unwrap_or_else(|_| String::from("{}")),
            None => String::from("{}"),
        }
    }

    /// A report from a heartbeat reply's text: `None` for `{}` (not scored yet) and for text that
    /// is no report (logged).
    pub fn from_wire(text: &str) -> Option<NodeReport> {
        if text.trim() == "{}" {
            return None;
        }
        serde_json::from_str(text)
            .map_err(|e| tracing::debug!("heartbeat: health report not understood ({e}): {text}"))
            .ok()
    }
}

/// This node's latest health: written by the monitor, read by heartbeats and status.
#[derive(Debug)]
pub struct NodeHealth {
    score: AtomicU8,
    /// `None` until the first score.
    report: Mutex<Option<NodeReport>>,
}

impl NodeHealth {
    /// A node that has not been scored yet counts as healthy (100), with no signals.
    pub fn new() -> Arc<NodeHealth> {
        Arc::new(NodeHealth { score: AtomicU8::new(100), report: Mutex::new(None) })
    }

    pub fn score(&self) -> u8 {
        self.score.load(Ordering::Relaxed)
    }

    /// The latest report, `None` before the first score.
    pub fn node_report(&self) -> Option<NodeReport> {
        self.report.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// The latest report as the heartbeat reply carries it (JSON text, `{}` before the first
    /// score): encoded here, when the replica server answers.
    pub fn report(&self) -> String {
        NodeReport::to_wire(self.report.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_ref())
    }

    /// Publishes a new score (composed with `margin`).
    pub fn publish(&self, h: &Health, margin: f64, telemetry: &str) {
        let score = h.score.round().clamp(0.0, 100.0) as u8;
        *self.report.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some(NodeReport::new(h, margin, telemetry));
        self.score.store(score, Ordering::Relaxed);
    }
}

fn median(v: impl IntoIterator<Item = f64>) -> f64 {
    let mut s: Vec<f64> = v.into_iter().collect();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => 100.0,
        n if n % 2 == 1 => s[n / 2],
        n => f64::midpoint(s[n / 2 - 1], s[n / 2]),
    }
}

/// The latest interval's health with each part replaced by the median of its sub-scores over
/// `recent` (the latest last), and the score composed from those medians with `margin`.
pub fn smoothed(recent: &std::collections::VecDeque<Health>, margin: f64) -> Option<Health> {
    let mut h = recent.back()?.clone();
    for p in &mut h.parts {
        let scores = recent.iter().filter_map(|r| r.parts.iter().find(|q| q.name == p.name).map(|q| q.score));
        p.score = median(scores);
    }
    h.score = composite(h.parts.iter().map(|p: &Part| (p.weight, p.score)), margin);
    Some(h)
}

/// What the monitor watches.
#[derive(Debug, Clone)]
pub struct MonitorConfig {
    pub interval: Duration,
    /// The replica whose filesystem's free space counts (the first volume's path).
    pub replica: Option<PathBuf>,
    /// Where the node daemon pinned its maps.
    pub pin_dir: PathBuf,
    pub score: ScoreConfig,
    pub probes: Vec<ProbeSpec>,
}

/// Starts the monitor on the current tokio runtime; it runs until the runtime stops.
pub fn spawn(cfg: MonitorConfig, out: Arc<NodeHealth>) {
    tokio::spawn(async move {
        let source = Source::open_pinned(&cfg.pin_dir);
        let mut collector = match Collector::new(source) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("health monitor: no telemetry ({e}); scoring probes only");
                match Collector::new(Source::Procfs) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::error!("health monitor disabled: cannot read /proc either: {e}");
                        return;
                    }
                }
            }
        };
        let mut scorer = Scorer::new(cfg.score.clone());
        let mut facts = FactReader::new(cfg.replica.as_deref(), cfg.score.peer);
        let prober = Prober::default();
        let mut ticker = tokio::time::interval(cfg.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        let mut last_score: Option<u8> = None;
        let mut recent: std::collections::VecDeque<Health> = std::collections::VecDeque::new();
        loop {
            // Probes run while the interval elapses, so a slow endpoint delays nothing.
            let (probes, _) = tokio::join!(prober.probe_all(&cfg.probes), ticker.tick());
            let sample = match collector.tick() {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("health monitor: telemetry read failed: {e}");
                    continue;
                }
            };
            let h = scorer.score(&sample, &facts.read(), &probes);
            if recent.len() == 3 {
                recent.pop_front();
            }
            recent.push_back(h);
            let Some(h) = smoothed(&recent, cfg.score.worst_margin) else { continue };
            out.publish(&h, cfg.score.worst_margin, sample.source);
            let score = out.score();
            // Log moves of 10 points or more, with the signals behind them.
            if last_score.is_none_or(|l| l.abs_diff(score) >= 10) {
                tracing::info!(score, report = %out.report(), "node health");
                last_score = Some(score);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::{smoothed, NodeHealth, NodeReport};
    use crate::health::score::{Health, Part, Signal};

    #[test]
    fn the_report_keeps_its_wire_text() {
        let h = Health {
            score: 87.456,
            signals: vec![
                Signal { name: "disk_latency_ratio", value: 1.234_56, unit: "x baseline", score: 99.999 },
                Signal { name: "runq_p99", value: f64::NAN, unit: "us", score: 100.0 },
            ],
            parts: vec![Part { name: "disk", weight: 0.35, score: 99.999 }],
        };
        let health = NodeHealth::new();
        assert_eq!(health.report(), "{}", "no report before the first score");
        assert_eq!(health.node_report(), None);
        health.publish(&h, 15.0, "ebpf");
        assert_eq!(health.score(), 87);
        // The text `report_json` wrote (serde_json's sorted keys, two decimals, NaN as null).
        let text = concat!(
            r#"{"margin":15.0,"parts":[{"name":"disk","score":100.0,"weight":0.35}],"#,
            r#""score":87.46,"signals":[{"name":"disk_latency_ratio","score":100.0,"unit":"x baseline","#,
            r#""value":1.23},{"name":"runq_p99","score":100.0,"unit":"us","value":null}],"telemetry":"ebpf"}"#
        );
        assert_eq!(health.report(), text);
        let back = NodeReport::from_wire(text).expect("decodes");
        assert_eq!((back.score, back.telemetry.as_str(), back.signals.len()), (87.46, "ebpf", 2));
        assert_eq!((back.signals[0].name.as_str(), back.signals[0].value), ("disk_latency_ratio", 1.23));
        assert!(back.signals[1].value.is_nan());
        assert_eq!(NodeReport::to_wire(Some(&back)), text);
        assert_eq!(NodeReport::from_wire("{}"), None);
        // An older node's report (no parts) still reads.
        let old = NodeReport::from_wire(r#"{"score":50.0,"signals":[],"telemetry":"procfs"}"#).unwrap();
        assert_eq!((old.score, old.parts.len(), old.margin), (50.0, 0, 0.0));
        assert_eq!(NodeReport::from_wire("not json"), None);
    }

    #[test]
    fn median_of_recent_scores() {
        assert_eq!(super::median([100.0, 10.0, 95.0]), 95.0);
        assert_eq!(super::median([100.0, 10.0]), 55.0);
    }

    #[test]
    fn each_part_is_the_median_of_its_last_three() {
        let h = |disk: f64, app: Option<f64>| Health {
            score: 0.0,
            signals: vec![],
            parts: std::iter::once(Part { name: "disk", weight: 0.35, score: disk })
                .chain(app.map(|s| Part { name: "app", weight: 0.2, score: s }))
                .collect(),
        };
        // One odd disk interval moves nothing; a failing probe shows at the second interval.
        let recent = [h(100.0, Some(100.0)), h(0.0, Some(100.0)), h(100.0, Some(0.0))].into_iter().collect();
        assert_eq!(smoothed(&recent, 15.0).unwrap().score, 100.0);
        let recent = [h(100.0, Some(100.0)), h(100.0, Some(0.0)), h(100.0, Some(0.0))].into_iter().collect();
        assert_eq!(smoothed(&recent, 15.0).unwrap().score, 15.0);
        // A part that appeared only lately is its own median.
        let recent = [h(100.0, None), h(100.0, Some(40.0))].into_iter().collect();
        let s = smoothed(&recent, 15.0).unwrap();
        assert_eq!(s.parts[1].score, 40.0);
    }
}
