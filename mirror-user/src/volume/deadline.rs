//! Write deadlines: how long a mirrored write waits for a replica that lags behind the other.
//!
//! A write (write-zeroes, flush) goes to both replicas and is acknowledged after both, so one
//! replica that stops answering (a frozen process, a black-holed link) would hold every write
//! until the hard timeout. Instead, once one replica has completed a write, the other gets a
//! deadline of its own; past it, it is failed and the write is acknowledged from the survivor
//! with the range recorded, exactly as when it returns an error.
//!
//! The deadline adapts to the lagging replica's observed latency ([`LatencyEstimate`]: the
//! smoothed mean plus four deviations, TCP's retransmission timeout of RFC 6298 applied to
//! completions), clamped to `[floor, cap]` ([`DeadlineConfig`]):
//! - the floor (250 ms) is above the longest pause the kernel imposes on a healthy writer: a
//!   process writing into the page cache faster than it drains is put to sleep by
//!   `balance_dirty_pages` for at most 200 ms at a time (`MAX_PAUSE`), plus scheduling delay on
//!   a loaded machine;
//! - the cap (750 ms) keeps the longest stall the application sees below one second: the cap,
//!   plus the survivor's durable record of the range (one metadata write).
//!
//! The guard against false positives: a spike on both replicas is not one replica failing. No
//! deadline runs while neither replica has answered (only the hard timeout does, which matches
//! the 30 s the kernel's block layer gives a request); and the laggard's deadline is at least
//! [`DeadlineConfig::guard`] times what the survivor took for this very write, so a write that
//! was slow on the survivor as well leaves the laggard time in proportion.
//!
//! Everything here is pure: durations in, a verdict out; the router measures and waits.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

/// Write deadline settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadlineConfig {
    /// The shortest deadline a lagging replica gets.
    pub floor: Duration,
    /// The longest (also before any latency was observed).
    pub cap: Duration,
    /// The laggard waits at least this many times what the survivor took for the same write.
    pub guard: u32,
    /// A replica that has not completed a write in this long fails even when the other has
    /// not answered either (both slow: the application gets the error).
    pub hard: Duration,
}

/// The floor's default; see the module doc for why.
pub const FLOOR: Duration = Duration::from_millis(250);
/// The cap's default; see the module doc for why.
pub const CAP: Duration = Duration::from_millis(750);
/// The hard timeout's default: the kernel block layer's default request timeout.
pub const HARD: Duration = Duration::from_secs(30);

impl Default for DeadlineConfig {
    fn default() -> Self {
        DeadlineConfig { floor: FLOOR, cap: CAP, guard: 4, hard: HARD }
    }
}

/// Why a setting is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeadlineConfigError {
    #[error("write deadline floor {floor:?} is above its cap {cap:?}")]
    FloorAboveCap { floor: Duration, cap: Duration },
    #[error("write deadline cap {cap:?} is not below the hard write timeout {hard:?}")]
    CapNotBelowHard { cap: Duration, hard: Duration },
    #[error("write deadline floor must be above zero")]
    ZeroFloor,
}

impl DeadlineConfig {
    /// Checks the settings make sense together.
    pub fn validate(&self) -> Result<(), DeadlineConfigError> {
        if self.floor.is_zero() {
            return Err(DeadlineConfigError::ZeroFloor);
        }
        if self.floor > self.cap {
            return Err(DeadlineConfigError::FloorAboveCap { floor: self.floor, cap: self.cap });
        }
        if self.cap >= self.hard {
            return Err(DeadlineConfigError::CapNotBelowHard { cap: self.cap, hard: self.hard });
        }
        Ok(())
    }

    /// How long after a write was issued its lagging replica is failed, given the laggard's
    /// own deadline ([`LatencyEstimate::deadline`]) and what the survivor took for this write.
    pub fn lag_limit(&self, lag_deadline: Duration, survivor_took: Duration) -> Duration {
        lag_deadline.max(survivor_took.saturating_mul(self.guard)).min(self.hard)
    }

    /// The rule at one instant, `elapsed` after the write was issued to a replica whose own
    /// deadline is `lag_deadline`: `survivor_took` is what the other replica took, once it
    /// has completed the write (`None`: it has not).
    pub fn verdict(
        &self,
        lag_deadline: Duration,
        elapsed: Duration,
        survivor_took: Option<Duration>,
    ) -> Verdict {
        let limit = match survivor_took {
            Some(s) => self.lag_limit(lag_deadline, s),
            None => self.hard,
        };
        if elapsed >= limit {
            Verdict::Fail
        } else {
            Verdict::Wait
        }
    }
}

/// What to do with a replica that has not completed a write yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Keep waiting for it.
    Wait,
    /// Fail it (the survivor, if there is one, records the range).
    Fail,
}

/// A replica's completion latency for one kind of request: smoothed mean and mean deviation in
/// microseconds (0 = no sample yet), updated with relaxed atomics (a lost update under a race
/// only drops one sample).
#[derive(Debug, Default)]
pub struct LatencyEstimate {
    mean_us: AtomicU64,
    dev_us: AtomicU64,
}

impl LatencyEstimate {
    /// Folds in one completion time (RFC 6298's gains: 1/8 for the mean, 1/4 for the deviation).
    pub fn observe(&self, took: Duration) {
        let r = (took.as_micros() as u64).max(1);
        let mean = self.mean_us.load(Ordering::Relaxed);
        if mean == 0 {
            self.mean_us.store(r, Ordering::Relaxed);
            self.dev_us.store(r / 2, Ordering::Relaxed);
            return;
        }
        let dev = self.dev_us.load(Ordering::Relaxed);
        self.dev_us.store((dev * 3 + mean.abs_diff(r)) / 4, Ordering::Relaxed);
        self.mean_us.store(((mean * 7 + r) / 8).max(1), Ordering::Relaxed);
    }

    /// The smoothed mean, when a sample was seen.
    pub fn mean(&self) -> Option<Duration> {
        match self.mean_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// The deadline this replica gets: mean + 4 deviations within `[floor, cap]`; the cap
    /// before any sample.
    pub fn deadline(&self, cfg: &DeadlineConfig) -> Duration {
        match self.mean_us.load(Ordering::Relaxed) {
            0 => cfg.cap,
            mean => {
                let dev = self.dev_us.load(Ordering::Relaxed);
                Duration::from_micros(mean.saturating_add(dev.saturating_mul(4))).clamp(cfg.floor, cfg.cap)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// A simulated run: a replica answering in `us` microseconds, `n` times.
    fn trained(samples: impl IntoIterator<Item = u64>) -> LatencyEstimate {
        let e = LatencyEstimate::default();
        for us in samples {
            e.observe(Duration::from_micros(us));
        }
        e
    }

    #[test]
    fn no_sample_gets_the_cap_and_a_fast_replica_the_floor() {
        let cfg = DeadlineConfig::default();
        assert_eq!(LatencyEstimate::default().deadline(&cfg), cfg.cap);
        // 200 us writes with a little jitter: far below the floor.
        let e = trained((0..1000).map(|i| 200 + (i % 7) * 10));
        assert_eq!(e.deadline(&cfg), cfg.floor);
        assert!(e.mean().unwrap() < Duration::from_micros(260));
    }

    #[test]
    fn a_slow_but_steady_replica_gets_more_time_never_past_the_cap() {
        let cfg = DeadlineConfig::default();
        // 200-300 ms writes: mean + 4 dev is above the floor.
        let e = trained((0..500).map(|i| 200_000 + (i % 3) * 50_000));
        let d = e.deadline(&cfg);
        assert!(d > cfg.floor && d < cfg.cap, "{d:?}");
        // 2 s writes: capped.
        let e = trained((0..50).map(|_| 2_000_000));
        assert_eq!(e.deadline(&cfg), cfg.cap);
    }

    #[test]
    fn one_outlier_widens_the_deadline_and_it_narrows_again() {
        let cfg = DeadlineConfig::default();
        let e = trained((0..200).map(|_| 5_000));
        assert_eq!(e.deadline(&cfg), cfg.floor);
        e.observe(Duration::from_millis(400));
        let wide = e.deadline(&cfg);
        assert!(wide > cfg.floor, "{wide:?}");
        for _ in 0..100 {
            e.observe(Duration::from_millis(5));
        }
        assert_eq!(e.deadline(&cfg), cfg.floor);
    }

    #[test]
    fn a_frozen_laggard_fails_at_its_deadline_when_the_survivor_was_fast() {
        let cfg = DeadlineConfig::default();
        let lag = trained((0..100).map(|_| 300));
        // The survivor took 1 ms: the laggard is failed at the floor, well inside a second.
        let limit = cfg.lag_limit(lag.deadline(&cfg), MS);
        assert_eq!(limit, cfg.floor);
        assert!(limit < Duration::from_secs(1));
    }

    #[test]
    fn a_spike_on_both_replicas_is_not_one_failing() {
        let cfg = DeadlineConfig::default();
        let lag = trained((0..100).map(|_| 300));
        // Both slow: the survivor took 2 s, the laggard is still in proportion at 2.5 s.
        let limit = cfg.lag_limit(lag.deadline(&cfg), 2000 * MS);
        assert_eq!(limit, 8000 * MS);
        assert!(limit > 2500 * MS);
        // Never past the hard timeout.
        assert_eq!(cfg.lag_limit(lag.deadline(&cfg), 20 * HARD), cfg.hard);
    }

    /// How a write ends, in simulated time stepped by 1 ms: replica `a` completes at `a` (None:
    /// never), `b` likewise; both have deadline `d`. Returns when the write is acknowledged
    /// (None: it fails) and which replicas were failed.
    fn simulate(
        cfg: &DeadlineConfig,
        d: Duration,
        a: Option<Duration>,
        b: Option<Duration>,
    ) -> (Option<Duration>, [bool; 2]) {
        let done = [a, b];
        let mut failed = [false; 2];
        let mut t = Duration::ZERO;
        loop {
            let complete = |i: usize, failed: &[bool; 2]| done[i].is_some_and(|c| c <= t) && !failed[i];
            for i in 0..2 {
                if complete(i, &failed) || failed[i] {
                    continue;
                }
                let other = 1 - i;
                let survivor = complete(other, &failed).then(|| done[other].unwrap());
                if cfg.verdict(d, t, survivor) == Verdict::Fail {
                    failed[i] = true;
                }
            }
            if (0..2).all(|i| complete(i, &failed) || failed[i]) {
                return ((0..2).any(|i| complete(i, &failed)).then_some(t), failed);
            }
            t += MS;
        }
    }

    #[test]
    fn simulated_frozen_target_is_failed_and_the_write_acked_within_a_second() {
        let cfg = DeadlineConfig::default();
        let (acked, failed) = simulate(&cfg, cfg.floor, Some(MS), None);
        assert_eq!(failed, [false, true]);
        assert_eq!(acked, Some(cfg.floor));
    }

    #[test]
    fn simulated_shared_spike_fails_nobody() {
        let cfg = DeadlineConfig::default();
        // Both replicas take 3 s and 3.5 s: far past their 250 ms deadline, but together.
        let (acked, failed) = simulate(&cfg, cfg.floor, Some(3000 * MS), Some(3500 * MS));
        assert_eq!(failed, [false, false]);
        assert_eq!(acked, Some(3500 * MS));
        // Both frozen past the hard timeout: both fail, the write fails.
        let (acked, failed) = simulate(&cfg, cfg.floor, None, None);
        assert_eq!((acked, failed), (None, [true, true]));
    }

    #[test]
    fn simulated_slow_survivor_then_frozen_laggard_waits_in_proportion() {
        let cfg = DeadlineConfig::default();
        let (acked, failed) = simulate(&cfg, cfg.floor, Some(600 * MS), None);
        assert_eq!(failed, [false, true]);
        assert_eq!(acked, Some(2400 * MS));
    }

    #[test]
    fn settings_are_checked() {
        assert_eq!(DeadlineConfig::default().validate(), Ok(()));
        let bad = DeadlineConfig { floor: 2 * CAP, ..Default::default() };
        assert!(matches!(bad.validate(), Err(DeadlineConfigError::FloorAboveCap { .. })));
        let bad = DeadlineConfig { cap: HARD, ..Default::default() };
        assert!(matches!(bad.validate(), Err(DeadlineConfigError::CapNotBelowHard { .. })));
        let bad = DeadlineConfig { floor: Duration::ZERO, ..Default::default() };
        assert_eq!(bad.validate(), Err(DeadlineConfigError::ZeroFloor));
    }
}
