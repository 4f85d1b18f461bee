//! Sync pacing: application I/O keeps priority. While the volume sees application I/O the sync
//! runs at most at `min_bps` (DRBD's c-min-rate), otherwise at most at `max_bps` (c-max-rate;
//! 0 = unlimited). Pure: time is passed in.

use std::time::Duration;

/// Sync rate limits in bytes per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncRate {
    pub min_bps: u64,
    pub max_bps: u64,
}

impl Default for SyncRate {
    fn default() -> Self {
        SyncRate { min_bps: 16 << 20, max_bps: 0 }
    }
}

/// A pacer: call [`Pacer::delay`] after each chunk of sync work; sleep for what it returns.
#[derive(Debug, Clone)]
pub struct Pacer {
    rate: SyncRate,
    next_free: Duration,
}

impl Pacer {
    pub fn new(rate: SyncRate) -> Self {
        Pacer { rate, next_free: Duration::ZERO }
    }

    /// How long to wait after moving `bytes` at time `now`, given whether the application is
    /// active. Credit does not accumulate while idle (no burst after a pause).
    pub fn delay(&mut self, now: Duration, bytes: u64, app_active: bool) -> Duration {
        let limit = if app_active {
            match (self.rate.min_bps, self.rate.max_bps) {
                (0, m) => m,
                (n, 0) => n,
                (n, m) => n.min(m),
            }
        } else {
            self.rate.max_bps
        };
        if limit == 0 {
            self.next_free = now;
            return Duration::ZERO;
        }
        let cost = Duration::from_secs_f64(bytes as f64 / limit as f64);
        self.next_free = self.next_free.max(now) + cost;
        self.next_free.saturating_sub(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_when_idle_and_no_max() {
        let mut p = Pacer::new(SyncRate { min_bps: 1 << 20, max_bps: 0 });
        assert_eq!(p.delay(Duration::ZERO, 1 << 30, false), Duration::ZERO);
    }

    #[test]
    fn app_activity_slows_to_min_rate() {
        let mut p = Pacer::new(SyncRate { min_bps: 1 << 20, max_bps: 0 });
        // 4 MiB at 1 MiB/s: 4 s of debt.
        let d = p.delay(Duration::ZERO, 4 << 20, true);
        assert!((d.as_secs_f64() - 4.0).abs() < 1e-6, "{d:?}");
        // Half a second later, 3.5 s remain plus the new chunk.
        let d = p.delay(Duration::from_millis(500), 1 << 20, true);
        assert!((d.as_secs_f64() - 4.5).abs() < 1e-6, "{d:?}");
    }

    #[test]
    fn max_rate_caps_and_idle_time_gives_no_burst() {
        let mut p = Pacer::new(SyncRate { min_bps: 1 << 20, max_bps: 10 << 20 });
        let d = p.delay(Duration::ZERO, 10 << 20, false);
        assert!((d.as_secs_f64() - 1.0).abs() < 1e-6);
        // After 100 s idle, the next chunk pays its full cost.
        let d = p.delay(Duration::from_secs(101), 10 << 20, false);
        assert!((d.as_secs_f64() - 1.0).abs() < 1e-6, "{d:?}");
    }
}
