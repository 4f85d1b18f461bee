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
//! - **Where**: a replica whose oldest read in flight has waited longer than its hedge delay
//!   ([`steer`], the age from `volume::inflight`) has stalled: new reads go to the other replica
//!   straight away, as a choice and not as an extra read, so a stall costs hedges only for the
//!   reads it caught in flight, not for every read the weights send there while it lasts (at a
//!   thousand reads a second, half of them weighted to the stalled replica, a 200 ms stall took
//!   about a hundred hedges, the whole burst, and under load the budget ran dry). Reads return
//!   once the replica answers its old reads (they are kept running, not dropped, so they
//!   count until it does).
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
        // Two passes over the atomics (no allocation: every read asks, see `steer`); a sample
        // landing between them may shift the answer by a bucket.
        let total: u64 = self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum();
        if total < 100 {
            return None;
        }
        let want = (total as f64 * p).ceil() as u64;
        let mut seen = 0;
        for (b, c) in self.buckets.iter().enumerate() {
            seen += c.load(Ordering::Relaxed);
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

/// How many times further past its delay a replica's oldest read must be than the other's for
/// the read to leave it when both are past their delays.
pub const STALLED_FURTHER: f64 = 2.0;

/// The replica a read goes to of two in sync that both may serve it: `first` (the weighted
/// choice) unless its oldest read in flight has waited longer than its hedge delay (`age[i]`
/// against `delay[i]`: it stalled) while the other's has not, or has by far less
/// ([`STALLED_FURTHER`]: on a loaded machine the other replica's oldest read is often a little
/// past its high percentile, and that is no stall to send reads into). Both past their delays
/// alike is a condition they share: the weights stand.
pub fn steer(first: usize, age: [Option<Duration>; 2], delay: [Duration; 2]) -> usize {
    let past = |i: usize| age[i].map_or(0.0, |a| a.as_secs_f64() / delay[i].as_secs_f64().max(1e-6));
    let other = 1 - first;
    let (mine, theirs) = (past(first), past(other));
    if mine > 1.0 && (theirs <= 1.0 || mine > STALLED_FURTHER * theirs) {
        other
    } else {
        first
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::inflight::{InFlight, Started};
    use std::time::Instant;

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

    #[test]
    fn a_read_avoids_a_replica_whose_oldest_read_is_older_than_its_delay() {
        let ms = Duration::from_millis;
        let d = [ms(2), ms(5)];
        // Idle or answering within its delay: the weighted choice.
        assert_eq!(steer(1, [None, None], d), 1);
        assert_eq!(steer(1, [None, Some(ms(4))], d), 1);
        assert_eq!(steer(0, [Some(ms(2)), None], d), 0);
        // Stalled: the other one.
        assert_eq!(steer(1, [None, Some(ms(6))], d), 0);
        assert_eq!(steer(0, [Some(ms(3)), Some(ms(1))], d), 1);
        // Both past their delays alike (a shared condition): the weights stand.
        assert_eq!(steer(1, [Some(ms(3)), Some(ms(6))], d), 1);
        assert_eq!(steer(0, [Some(ms(3)), Some(ms(6))], d), 0);
        // One stalled, the other a little past its delay (a loaded machine): away from the stall.
        assert_eq!(steer(1, [Some(ms(3)), Some(ms(200))], d), 0);
        assert_eq!(steer(0, [Some(ms(3)), Some(ms(200))], d), 0);
    }

    /// Hedges and the longest read of a simulated run: a read a millisecond for 12 s, every
    /// other one weighted to the target, each answered in 1 ms (on the source one in fifty in
    /// 3 ms, as on a loaded machine), except that the target answers
    /// nothing for 200 ms every 2 s (what it holds is answered when the stall ends). A read that
    /// passes the 2 ms hedge delay is hedged (budget permitting) and then done 1 ms later on the
    /// source; an unhedged one waits for its 50 ms deadline and is retried. With `steering`, a
    /// read weighted to the target goes to the source while the target's oldest read in flight
    /// is older than the delay ([`steer`]). Returns (hedges sent, of them for reads on the
    /// target, hedges refused by the budget, the longest read).
    fn simulate(steering: bool) -> (u32, u32, u32, Duration) {
        let ms = Duration::from_millis;
        let (lat, delay, deadline) = (ms(1), ms(2), ms(50));
        let cfg = HedgeConfig::default();
        let budget = HedgeBudget::default();
        let t0 = Instant::now();
        let flights = [InFlight::default(), InFlight::default()];
        // Reads still held by a replica, with when it answers them.
        let mut held: Vec<(Instant, Started<'_>)> = Vec::new();
        let stalled_until = |t: Duration| {
            let p = t.as_millis() % 2000;
            (1000..1200).contains(&p).then(|| t + ms((1200 - p) as u64))
        };
        // The source on a loaded machine: one read in fifty takes 3 ms, past its delay.
        let source_lat = |k: u64| if k % 50 == 24 { ms(3) } else { lat };
        let (mut sent, mut on_target, mut refused, mut longest) = (0, 0, 0, Duration::ZERO);
        for k in 0..12_000u64 {
            let t = ms(k);
            let now = t0 + t;
            held.retain(|(done, _)| *done > now);
            let age = [flights[0].oldest_age(now), flights[1].oldest_age(now)];
            let first = usize::from(k % 2 == 1);
            let i = if steering { steer(first, age, [delay; 2]) } else { first };
            let answered = if i == 1 { stalled_until(t).unwrap_or(t) + lat } else { t + source_lat(k) };
            held.push((t0 + answered, flights[i].begin(now)));
            budget.earn(&cfg);
            let wait = answered.saturating_sub(t);
            let took = if wait <= delay {
                wait
            } else if budget.try_spend() {
                sent += 1;
                on_target += u32::from(i == 1);
                wait.min(delay + lat)
            } else {
                refused += 1;
                wait.min(deadline + lat)
            };
            longest = longest.max(took);
        }
        (sent, on_target, refused, longest)
    }

    #[test]
    fn steering_away_from_a_stalled_replica_keeps_hedges_to_the_reads_it_held() {
        let (sent, on_target, refused, longest) = simulate(false);
        // Without it, every read weighted there during the stall wants a hedge: ~100 a stall of
        // six, more than the budget earns beside the source's own slow reads, so it runs dry and
        // reads wait for their deadline (the flake of sick_stall_reads under load).
        assert!(on_target + refused >= 6 * 80, "without steering: {on_target} hedges on the target");
        assert!(refused > 0 && longest >= Duration::from_millis(50), "{refused} refused, {longest:?}");
        let (steered_sent, steered_on_target, refused_steered, longest_steered) = simulate(true);
        // With it, only the reads caught in flight, and those sent before the oldest passed the
        // delay: a handful a stall, far inside the budget, though the source's slow reads put
        // its own oldest read past its delay now and then (those are hedged as ever: the rest).
        assert!(
            steered_on_target <= 6 * 3,
            "with steering: {steered_on_target} hedges on the target (without: {on_target})"
        );
        assert_eq!(refused_steered, 0);
        assert!(longest_steered <= Duration::from_millis(3), "{longest_steered:?}");
        println!(
            "without steering: {sent} hedges ({on_target} on the target), {refused} refused, \
             longest {longest:?}; with: {steered_sent} ({steered_on_target}), {refused_steered}, \
             {longest_steered:?}"
        );
    }
}
