//! Weight policies: health scores in, the target's read share out. Pure functions of their
//! inputs and state; time is passed in.

use std::time::Duration;

/// The seed formula: weights proportional to `source_health * source_factor` and
/// `target_health * target_factor`, normalized to sum 100. Kept available as a policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SeedLinear {
    pub source_factor: f64,
    pub target_factor: f64,
}

impl Default for SeedLinear {
    fn default() -> Self {
        SeedLinear { source_factor: 0.6, target_factor: 0.4 }
    }
}

impl SeedLinear {
    /// The target's share (0..=100) for two health scores (0..=100).
    pub fn target_weight(&self, source_health: f64, target_health: f64) -> u8 {
        let s = (source_health.clamp(0.0, 100.0) * self.source_factor).max(0.0);
        let t = (target_health.clamp(0.0, 100.0) * self.target_factor).max(0.0);
        if s + t <= 0.0 {
            return 50;
        }
        (100.0 * t / (s + t)).round().clamp(0.0, 100.0) as u8
    }
}

/// Damped Holt (level + damped trend) smoothing of a health series, for forecasting where the
/// health is heading.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Holt {
    pub alpha: f64,
    pub beta: f64,
    /// Trend damping per second (0..1]: a trend fades instead of running forever.
    pub phi: f64,
    level: Option<f64>,
    /// Units per second.
    trend: f64,
    last: Duration,
}

impl Holt {
    pub fn new(alpha: f64, beta: f64, phi: f64) -> Holt {
        Holt { alpha, beta, phi, level: None, trend: 0.0, last: Duration::ZERO }
    }

    /// Adds a sample taken at `now`.
    pub fn update(&mut self, now: Duration, x: f64) {
        let Some(level) = self.level else {
            self.level = Some(x);
            self.last = now;
            return;
        };
        let dt = now.saturating_sub(self.last).as_secs_f64().max(1e-3);
        let damp = self.phi.powf(dt);
        let predicted = level + self.trend * dt * damp;
        let new_level = self.alpha * x + (1.0 - self.alpha) * predicted;
        let slope = (new_level - level) / dt;
        self.trend = self.beta * slope + (1.0 - self.beta) * self.trend * damp;
        self.level = Some(new_level);
        self.last = now;
    }

    pub fn level(&self) -> Option<f64> {
        self.level
    }

    /// Forecast `horizon` ahead of the last sample (the damped trend's sum).
    pub fn forecast(&self, horizon: Duration) -> Option<f64> {
        let level = self.level?;
        let h = horizon.as_secs_f64();
        let steps = if (self.phi - 1.0).abs() < 1e-9 {
            h
        } else {
            (1.0 - self.phi.powf(h)) / (1.0 - self.phi) * self.phi
        };
        Some(level + self.trend * steps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_formula_normalizes_to_100() {
        let p = SeedLinear::default();
        // Equal health: 40 / (60 + 40) = 40 % to the target.
        assert_eq!(p.target_weight(100.0, 100.0), 40);
        // Source at half health: 20 / (30 + 20) = 57 %... 40/(30+40) = 57.
        assert_eq!(p.target_weight(50.0, 100.0), 57);
        assert_eq!(p.target_weight(0.0, 100.0), 100);
        assert_eq!(p.target_weight(100.0, 0.0), 0);
        assert_eq!(p.target_weight(0.0, 0.0), 50);
        let custom = SeedLinear { source_factor: 0.5, target_factor: 0.5 };
        assert_eq!(custom.target_weight(100.0, 100.0), 50);
    }

    #[test]
    fn holt_follows_a_falling_series_and_forecasts_below_it() {
        let mut h = Holt::new(0.5, 0.3, 0.9);
        for i in 0..20 {
            h.update(Duration::from_millis(100 * i), 100.0 - 2.0 * i as f64);
        }
        let level = h.level().unwrap();
        assert!((55.0..70.0).contains(&level), "level {level}");
        let f = h.forecast(Duration::from_secs(2)).unwrap();
        assert!(f < level, "forecast {f} below level {level} while falling");
    }

    #[test]
    fn holt_on_a_flat_series_forecasts_flat() {
        let mut h = Holt::new(0.5, 0.3, 0.9);
        for i in 0..50 {
            h.update(Duration::from_millis(100 * i), 80.0);
        }
        assert!((h.forecast(Duration::from_secs(5)).unwrap() - 80.0).abs() < 0.5);
    }
}
