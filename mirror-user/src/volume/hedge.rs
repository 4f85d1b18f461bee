//! Hedged reads: the rules for when a read that has not completed on its replica is sent to the
//! other in-sync replica too (the first answer wins), as in Dean and Barroso's "The Tail at
//! Scale".
//!
//! - **When**: after the replica's observed high percentile of read latency
//!   ([`HedgeConfig::percentile`], p99), bounded to `[min, max]` (1 ms..100 ms). The percentile
//!   comes from a log-scale histogram of the reads that replica completed and served
//!   ([`LatencyHistogram`], four buckets per octave, halved every 4096 samples so it follows the
//!   present); reads overtaken by their hedge are dropped before they complete, so a stalling
//!   replica does not drag its own percentile, and so its hedge delay, up.
//! - **How many**: a token budget ([`HedgeBudget`]): every read earns `budget_pct` percent of a
//!   hedge, a hedge spends one, at most `burst` saved up: extra reads stay under `budget_pct`
//!   percent of all reads over any long run (the burst of 100 covers a stall of a few hundred
//!   milliseconds at a thousand reads a second). A read that cannot hedge waits for the read
//!   deadline and is retried as before.
//!
//! Pure: samples and counts in, durations and yes/no out; the router does the I/O.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

/// Hedged-read settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HedgeConfig {
    /// The read-latency percentile after which a read is hedged (0..1).
    pub percentile: f64,
    /// Bounds of the hedge delay.
    pub min: Duration,
    pub max: Duration,
    /// Extra reads allowed, percent of all reads.
    pub budget_pct: u32,
    /// Hedges that may be saved up for a burst.
    pub burst: u32,
}

impl Default for HedgeConfig {
    fn default() -> Self {
        HedgeConfig {
            percentile: 0.99,
            min: Duration::from_millis(1),
            max: Duration::from_millis(100),
            budget_pct: 5,
            burst: 100,
        }
    }
}

/// Buckets per octave of the histogram.
const PER_OCTAVE: usize = 4;
/// 2^24 µs (16.8 s) and up land in the last bucket.
const BUCKETS: usize = 24 * PER_OCTAVE + 1;
/// The histogram halves every this many samples.
const HALVE_EVERY: u64 = 4096;

/// A log-scale histogram of latencies (relaxed atomics: a racing update may lose one sample).
#[derive(Debug)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; BUCKETS],
    samples: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram { buckets: std::array::from_fn(|_| AtomicU64::new(0)), samples: AtomicU64::new(0) }
    }
}

/// The bucket of `us` microseconds: `PER_OCTAVE * log2(us)`, rounded up.
fn bucket(us: u64) -> usize {
    if us <= 1 {
        return 0;
    }
    let l = (us as f64).log2() * PER_OCTAVE as f64;
    (l.ceil() as usize).min(BUCKETS - 1)
}

/// The upper bound of bucket `b`, microseconds.
fn bound_us(b: usize) -> u64 {
    2f64.powf(b as f64 / PER_OCTAVE as f64).ceil() as u64
}

impl LatencyHistogram {
    pub fn observe(&self, took: Duration) {
        self.buckets[bucket(took.as_micros() as u64)].fetch_add(1, Ordering::Relaxed);
        if self.samples.fetch_add(1, Ordering::Relaxed) % HALVE_EVERY == HALVE_EVERY - 1 {
            for b in &self.buckets {
                b.store(b.load(Ordering::Relaxed) / 2, Ordering::Relaxed);
            }
        }
    }

    /// The latency below which fraction `p` of the samples fall (a bucket's upper bound);
    /// `None` with fewer than 100 samples.
    pub fn percentile(&self, p: f64) -> Option<Duration> {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total < 100 {
            return None;
        }
        let want = (total as f64 * p).ceil() as u64;
        let mut seen = 0;
        for (b, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                return Some(Duration::from_micros(bound_us(b)));
            }
        }
        Some(Duration::from_micros(bound_us(BUCKETS - 1)))
    }
}

impl HedgeConfig {
    /// How long a read on a replica with latency histogram `h` waits before it is hedged: its
    /// percentile within `[min, max]`; `max` while too few reads were seen.
    pub fn delay(&self, h: &LatencyHistogram) -> Duration {
        h.percentile(self.percentile).map_or(self.max, |d| d.clamp(self.min, self.max))
    }
}

/// The hedge budget: tokens in hundredths of a hedge.
#[derive(Debug, Default)]
pub struct HedgeBudget {
    tokens: AtomicU64,
}

impl HedgeBudget {
    /// A read was issued: it earns `budget_pct` hundredths of a hedge.
    pub fn earn(&self, cfg: &HedgeConfig) {
        let cap = u64::from(cfg.burst) * 100;
        let _ = self.tokens.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
            (t < cap).then(|| (t + u64::from(cfg.budget_pct)).min(cap))
        });
    }

    /// Takes one hedge, if the budget has it.
    pub fn try_spend(&self) -> bool {
        self.tokens.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| t.checked_sub(100)).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn the_percentile_follows_the_samples_within_a_bucket() {
        let h = LatencyHistogram::default();
        assert_eq!(h.percentile(0.99), None);
        // 990 reads of 500 us, 10 of 40 ms: p99 is the fast ones, p99.9 the slow ones.
        for _ in 0..990 {
            h.observe(500 * US);
        }
        for _ in 0..10 {
            h.observe(40_000 * US);
        }
        let p99 = h.percentile(0.99).unwrap();
        assert!(p99 >= 500 * US && p99 < 600 * US, "{p99:?}");
        let p999 = h.percentile(0.999).unwrap();
        assert!(p999 >= 40_000 * US && p999 < 48_000 * US, "{p999:?}");
    }

    #[test]
    fn the_delay_is_bounded_and_the_max_without_samples() {
        let cfg = HedgeConfig::default();
        let h = LatencyHistogram::default();
        assert_eq!(cfg.delay(&h), cfg.max);
        for _ in 0..1000 {
            h.observe(50 * US);
        }
        assert_eq!(cfg.delay(&h), cfg.min);
        let slow = LatencyHistogram::default();
        for _ in 0..1000 {
            slow.observe(Duration::from_secs(1));
        }
        assert_eq!(cfg.delay(&slow), cfg.max);
    }

    #[test]
    fn old_samples_fade() {
        let h = LatencyHistogram::default();
        for _ in 0..HALVE_EVERY {
            h.observe(Duration::from_millis(30));
        }
        for _ in 0..8 * HALVE_EVERY {
            h.observe(200 * US);
        }
        let p99 = h.percentile(0.99).unwrap();
        assert!(p99 < Duration::from_millis(1), "the old 30 ms reads still count: {p99:?}");
    }

    #[test]
    fn the_budget_keeps_hedges_to_its_share_after_the_burst() {
        let cfg = HedgeConfig::default();
        let b = HedgeBudget::default();
        // Every read wants a hedge (a stalled replica): 10 000 reads.
        let mut hedges = 0;
        for _ in 0..10_000 {
            b.earn(&cfg);
            if b.try_spend() {
                hedges += 1;
            }
        }
        assert!(hedges <= 10_000 * cfg.budget_pct / 100 + cfg.burst, "{hedges}");
        assert!(hedges >= 10_000 * cfg.budget_pct / 100 - 1, "{hedges}");
        // A quiet spell saves up at most the burst.
        let b = HedgeBudget::default();
        for _ in 0..100_000 {
            b.earn(&cfg);
        }
        let burst = (0..100).filter(|_| b.try_spend()).count();
        assert_eq!(burst, cfg.burst as usize);
    }
}
