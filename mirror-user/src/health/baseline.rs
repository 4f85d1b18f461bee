//! A latency baseline that a degradation cannot become: what "normal" is for a disk or a data
//! path, learned from the thing itself. Pure; time is passed in.
//!
//! The ratio `latency / max(baseline, floor)` is what the scores judge, so the baseline decides
//! whether a slow disk still looks slow after a while. Three rules keep it honest:
//! - **learned only while healthy**: a sample counts at full speed only while its ratio is
//!   below `healthy_ratio` (the score's "good" line). A faster latency is followed within
//!   seconds (`follow_down`); a slower but still healthy one over minutes (`learn_up`), so a
//!   degradation that grows step by step does not carry the baseline up with it;
//! - **decays slowly while degraded**: at or above the healthy ratio the baseline moves towards
//!   the latency over hours (`degraded_drift`): a disk that changed for good (new hardware, a new
//!   workload's larger requests) becomes the new normal eventually, a ten-minute degradation
//!   moves it by a few percent (1 - e^(-10 min / 3 h) of the way, in log terms);
//! - **anchored**: a second level, the anchor, learns a slower healthy latency over hours
//!   (`anchor_learn_up`; a faster one ten times slower than the baseline), and the baseline never
//!   rises above `anchor * anchor_factor`. Whatever creeps past the baseline's learning (a very
//!   slow ramp, many small steps each under the healthy ratio) meets the anchor: judged against
//!   it, a disk that drifted to three times its long-term level within an hour still shows as
//!   slow. While degraded, the anchor drifts with the baseline.
//!
//! Smoothing is exponential in log space (latencies are judged as ratios) with
//! `1 - e^(-dt / tau)` per sample, so the figures do not depend on how often samples come.

use std::time::Duration;

/// How a [`Baseline`] learns.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BaselineConfig {
    /// Samples with a ratio below this are healthy and learned.
    pub healthy_ratio: f64,
    /// Time constant for following a faster (lower) latency.
    pub follow_down: Duration,
    /// Time constant for learning a slower but healthy latency.
    pub learn_up: Duration,
    /// Time constant of the drift towards a degraded latency (baseline and anchor).
    pub degraded_drift: Duration,
    /// Time constant for the anchor's learning of a slower healthy latency.
    pub anchor_learn_up: Duration,
    /// The baseline stays at or below the anchor times this.
    pub anchor_factor: f64,
}

impl Default for BaselineConfig {
    fn default() -> Self {
        BaselineConfig {
            healthy_ratio: 2.0,
            follow_down: Duration::from_secs(2),
            learn_up: Duration::from_mins(2),
            degraded_drift: Duration::from_hours(3),
            anchor_learn_up: Duration::from_hours(6),
            anchor_factor: 1.5,
        }
    }
}

/// A learned latency level (any unit; the caller's).
#[derive(Debug, Clone, PartialEq)]
pub struct Baseline {
    pub cfg: BaselineConfig,
    /// The baseline (log of the value).
    level: Option<f64>,
    /// The anchor (log of the value).
    anchor: f64,
    last: Duration,
}

/// The share of the way an exponential average moves in `dt` with time constant `tau`.
fn step(dt: Duration, tau: Duration) -> f64 {
    let tau = tau.as_secs_f64();
    if tau <= 0.0 {
        return 1.0;
    }
    1.0 - (-dt.as_secs_f64() / tau).exp()
}

impl Default for Baseline {
    fn default() -> Self {
        Baseline::new(BaselineConfig::default())
    }
}

impl Baseline {
    pub fn new(cfg: BaselineConfig) -> Baseline {
        Baseline { cfg, level: None, anchor: 0.0, last: Duration::ZERO }
    }

    /// The baseline, `None` before the first sample.
    pub fn value(&self) -> Option<f64> {
        self.level.map(f64::exp)
    }

    /// The anchor, `None` before the first sample.
    pub fn anchor(&self) -> Option<f64> {
        self.level.map(|_| self.anchor.exp())
    }

    /// Judges `x` (taken at `now`) against the baseline: returns `x / max(baseline, floor)`
    /// from the baseline as it was before this sample, then learns from it by the rules above.
    pub fn observe(&mut self, now: Duration, x: f64, floor: f64) -> f64 {
        let x = x.max(1e-6);
        let lx = x.ln();
        let Some(level) = self.level else {
            self.level = Some(lx);
            self.anchor = lx;
            self.last = now;
            return x / floor.max(x);
        };
        let ratio = x / level.exp().max(floor);
        let dt = now.saturating_sub(self.last);
        self.last = now;
        let c = self.cfg;
        let healthy = ratio < c.healthy_ratio;
        let toward = |from: f64, tau_down: Duration, tau_up: Duration| {
            let tau = if lx < from { tau_down } else { tau_up };
            from + (lx - from) * step(dt, tau)
        };
        let (level, anchor) = if healthy {
            (
                toward(level, c.follow_down, c.learn_up),
                toward(self.anchor, c.follow_down * 10, c.anchor_learn_up),
            )
        } else {
            (
                toward(level, c.degraded_drift, c.degraded_drift),
                toward(self.anchor, c.degraded_drift, c.degraded_drift),
            )
        };
        self.anchor = anchor;
        self.level = Some(level.min(anchor + c.anchor_factor.max(1.0).ln()));
        ratio
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    /// Feeds `x` every 250 ms from `from` for `secs`; returns the last ratio.
    fn feed(b: &mut Baseline, from: u64, secs: u64, x: f64) -> f64 {
        (0..secs * 4).map(|i| b.observe(ms(from + i * 250), x, 1.0)).last().unwrap_or(0.0)
    }

    #[test]
    fn a_ten_minute_degradation_stays_a_degradation() {
        let mut b = Baseline::new(BaselineConfig::default());
        feed(&mut b, 0, 60, 1000.0);
        // Ten minutes at 20x: still about 20x at the end (a few percent absorbed).
        let r = feed(&mut b, 60_000, 600, 20_000.0);
        assert!(r > 17.0, "ratio {r} after ten minutes; baseline {:?}", b.value());
        // Healthy again: back near 1 at once.
        let r = b.observe(ms(661_000), 1000.0, 1.0);
        assert!((r - 1.0).abs() < 0.25, "{r}");
    }

    #[test]
    fn a_slow_ramp_is_not_absorbed() {
        let mut b = Baseline::new(BaselineConfig::default());
        feed(&mut b, 0, 60, 1000.0);
        // Latency +10% every 5 s for a minute (x3.1), each step under the healthy ratio.
        let mut x = 1000.0;
        let mut r = 0.0;
        for k in 0..12 {
            x *= 1.1;
            r = feed(&mut b, 60_000 + k * 5000, 5, x);
        }
        assert!(r > 2.5, "ratio {r} at x{:.2}: the ramp was absorbed (baseline {:?})", x / 1000.0, b.value());
        // A ramp to x5 over an hour meets the anchor: the baseline stays within 1.5x of it.
        let mut b = Baseline::new(BaselineConfig::default());
        feed(&mut b, 0, 60, 1000.0);
        let mut x = 1000.0;
        let mut t = 60_000;
        for _ in 0..3600 {
            x *= 1.00045;
            b.observe(ms(t), x, 1.0);
            t += 1000;
        }
        let (v, a) = (b.value().unwrap(), b.anchor().unwrap());
        assert!(v <= a * 1.5 + 1e-6, "baseline {v} anchor {a}");
        assert!(x / v >= 2.0, "judged against the anchored baseline: ratio {}", x / v);
    }

    #[test]
    fn a_faster_disk_is_followed_within_seconds_and_the_floor_counts() {
        let mut b = Baseline::new(BaselineConfig::default());
        feed(&mut b, 0, 10, 4000.0);
        feed(&mut b, 10_000, 10, 1000.0);
        assert!(b.value().unwrap() < 1100.0, "{:?}", b.value());
        // Under the floor nothing is slow.
        let mut b = Baseline::new(BaselineConfig::default());
        feed(&mut b, 0, 10, 30.0);
        assert!(b.observe(ms(10_000), 600.0, 1000.0) < 1.0);
    }

    #[test]
    fn a_disk_that_changed_for_good_becomes_normal_in_hours() {
        let mut b = Baseline::new(BaselineConfig::default());
        feed(&mut b, 0, 60, 1000.0);
        let mut t = 60_000;
        let mut r = 0.0;
        for _ in 0..(8 * 3600) {
            r = b.observe(ms(t), 5000.0, 1.0);
            t += 1000;
        }
        assert!(r < 2.0, "ratio {r} after eight hours at 5x");
    }
}
