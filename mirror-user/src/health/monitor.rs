//! The node's health monitor: every interval it reads the node's telemetry (the daemon's pinned
//! eBPF maps, or /proc), probes the application endpoints, scores the result, and publishes the
//! score with the signals behind it in a [`NodeHealth`] that the replica server sends in every
//! heartbeat reply. The published score is the median of the last three interval scores: one
//! odd interval (a burst of I/O, a stalled sample) moves nothing, a real change shows after two.

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use super::{
    probe::{ProbeSpec, Prober},
    score::{Health, ScoreConfig, Scorer},
};
use crate::telemetry::{collector::Collector, Source};

/// This node's latest health: written by the monitor, read by heartbeats and status.
#[derive(Debug)]
pub struct NodeHealth {
    score: AtomicU8,
    /// JSON: `{"score":S,"telemetry":"ebpf","signals":[{"name":..,"value":..,"unit":..,"score":..}]}`.
    report: Mutex<String>,
}

impl NodeHealth {
    /// A node that has not been scored yet counts as healthy (100), with no signals.
    pub fn new() -> Arc<NodeHealth> {
        Arc::new(NodeHealth { score: AtomicU8::new(100), report: Mutex::new(String::from("{}")) })
    }

    pub fn score(&self) -> u8 {
        self.score.load(Ordering::Relaxed)
    }

    /// The latest report as JSON text.
    pub fn report(&self) -> String {
        self.report.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Publishes a new score.
    pub fn publish(&self, h: &Health, telemetry: &str) {
        let score = h.score.round().clamp(0.0, 100.0) as u8;
        let report = report_json(h, telemetry).to_string();
        *self.report.lock().unwrap_or_else(|e| e.into_inner()) = report;
        self.score.store(score, Ordering::Relaxed);
    }
}

/// A health score and its signals as JSON.
pub fn report_json(h: &Health, telemetry: &str) -> serde_json::Value {
    let round = |x: f64| (x * 100.0).round() / 100.0;
    serde_json::json!({
        "score": round(h.score),
        "telemetry": telemetry,
        "signals": h.signals.iter().map(|s| serde_json::json!({
            "name": s.name, "value": round(s.value), "unit": s.unit, "score": round(s.score),
        })).collect::<Vec<_>>(),
    })
}

fn median(v: &std::collections::VecDeque<f64>) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().collect();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => 100.0,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// What the monitor watches.
#[derive(Debug, Clone)]
pub struct MonitorConfig {
    pub interval: Duration,
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
        let prober = Prober::default();
        let mut ticker = tokio::time::interval(cfg.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        let mut last_score: Option<u8> = None;
        let mut recent: std::collections::VecDeque<f64> = std::collections::VecDeque::new();
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
            let mut h = scorer.score(&sample, &probes);
            if recent.len() == 3 {
                recent.pop_front();
            }
            recent.push_back(h.score);
            h.score = median(&recent);
            out.publish(&h, sample.source);
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
    #[test]
    fn median_of_recent_scores() {
        let v: std::collections::VecDeque<f64> = [100.0, 10.0, 95.0].into_iter().collect();
        assert_eq!(super::median(&v), 95.0);
        let v: std::collections::VecDeque<f64> = [100.0, 10.0].into_iter().collect();
        assert_eq!(super::median(&v), 55.0);
    }
}
