//! Weight policies: health scores in, the target's read share out. Pure functions of their
//! inputs and state; time is passed in. [`judge`] weighs the source against the target resource
//! by resource, so that what both nodes suffer moves nothing while what only the source suffers
//! counts in full.

use std::time::Duration;

use crate::health::{monitor::PartReport, score::composite};

/// A node as the router judges it: its health report's parts over a short recent window, as
/// the best and the worst score each part had in it (empty for a node that sends none), with the
/// margin they are composed with, its score, and its data-path score (averaged over
/// [`DATAPATH_WINDOW`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NodeJudged<'a> {
    pub score: f64,
    pub best: &'a [PartReport],
    pub worst: &'a [PartReport],
    pub margin: f64,
    pub datapath: Option<f64>,
}

/// The best and the worst score of each part over a window of reports (oldest first; the
/// weights of the latest report that has the part).
pub fn window_parts<'a>(
    reports: impl IntoIterator<Item = &'a [PartReport]>,
) -> (Vec<PartReport>, Vec<PartReport>) {
    let (mut best, mut worst): (Vec<PartReport>, Vec<PartReport>) = (Vec::new(), Vec::new());
    for parts in reports {
        for p in parts {
            if let Some(k) = best.iter().position(|q| q.name == p.name) {
                best[k] = PartReport { score: best[k].score.max(p.score), ..p.clone() };
                worst[k] = PartReport { score: worst[k].score.min(p.score), ..p.clone() };
            } else {
                best.push(p.clone());
                worst.push(p.clone());
            }
        }
    }
    (best, worst)
}

/// How far back a node's data-path score is averaged for judging it against the other's
/// (five ticks): a burst of slow completions on one replica of a loaded machine (the other has
/// its burst a moment before or after) is averaged down, while a slow disk, slow at every tick,
/// counts in full after half a second.
pub const DATAPATH_WINDOW: Duration = Duration::from_millis(500);

/// A node's data-path scores of the last [`DATAPATH_WINDOW`].
#[derive(Debug, Clone, Default)]
pub struct DatapathWindow {
    scores: std::collections::VecDeque<(Duration, f64)>,
}

impl DatapathWindow {
    /// Adds the score of `now` (`None`: no evidence; the window empties) and drops what fell
    /// out.
    pub fn push(&mut self, now: Duration, score: Option<f64>) {
        match score {
            Some(x) => self.scores.push_back((now, x)),
            None => self.scores.clear(),
        }
        while self.scores.front().is_some_and(|(t, _)| now.saturating_sub(*t) > DATAPATH_WINDOW) {
            self.scores.pop_front();
        }
    }

    /// The mean score over the window (`None`: no evidence in it).
    pub fn mean(&self) -> Option<f64> {
        let n = self.scores.len();
        (n > 0).then(|| self.scores.iter().map(|&(_, x)| x).sum::<f64>() / n as f64)
    }
}

/// `own` as far as it is worse than `other`: `100 - max(0, other - own)`.
fn beyond(own: f64, other: f64) -> f64 {
    (100.0 - (other - own).max(0.0)).clamp(0.0, 100.0)
}

/// A node's health with what `other` shares left out: each part, at its best over the window,
/// counts only as far as it is worse than the same part of `other` at its worst (a part `other`
/// lacks counts in full), composed again; the data path likewise, and the node's health is the
/// worse of the two. A part that merely wavers on both nodes (the same loaded machine sampled at
/// other moments) is never consistently worse on one, so it moves nothing; a part that stays
/// worse for the whole window counts. Without parts on both sides (an older node), the node's
/// score stands as it is.
fn unshared(a: &NodeJudged, other: Option<&NodeJudged>) -> f64 {
    let node = match other {
        Some(b) if !a.best.is_empty() && !b.worst.is_empty() => composite(
            a.best.iter().map(|p| {
                let theirs = b.worst.iter().find(|q| q.name == p.name).map_or(100.0, |q| q.score);
                (p.weight, beyond(p.score, theirs))
            }),
            a.margin,
        ),
        _ => a.score,
    };
    let dp = match (a.datapath, other.and_then(|b| b.datapath)) {
        (Some(d), Some(o)) => beyond(d, o),
        (Some(d), None) => d,
        (None, _) => 100.0,
    };
    node.min(dp)
}

/// The source's health judged against the target, for the adaptive policy: each node's health
/// with what the other shares left out ([`unshared`]), and then the source's as far as it is
/// worse than the target's (`100 - max(0, target - source)`): a node-wide condition both nodes
/// suffer (a busy shared host, the same load on both) moves nothing, a resource only the source
/// has trouble with counts in full even while the target suffers something else, and two nodes
/// sick in different ways stay as they are (the target would not serve better). Without a
/// target, the source's own health.
pub fn judge(source: &NodeJudged, target: Option<&NodeJudged>) -> f64 {
    let s = unshared(source, target);
    match target {
        Some(t) => beyond(s, unshared(t, Some(source))),
        None => s,
    }
}

/// How long a kind of request's mean latency (reads, or writes) stands for the replica after
/// the last completion of that kind: a replica that gets no reads (at weight 0, or steered away
/// from) keeps the read mean of its worst moment, and that old figure must not hold the replica
/// down once its writes show it well again.
pub const DATAPATH_FRESH: Duration = Duration::from_secs(2);

/// The progress of one kind of request on a replica, as the weighting loop saw it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Completions counted at the last look.
    count: u64,
    /// When the count last advanced.
    advanced_at: Option<Duration>,
}

impl Progress {
    /// Looks at the completion count at `now`; true when it advanced since the last look.
    pub fn observe(&mut self, now: Duration, count: u64) -> bool {
        let advanced = count != std::mem::replace(&mut self.count, count);
        if advanced {
            self.advanced_at = Some(now);
        }
        advanced
    }

    /// `mean_us` when a request of this kind completed within [`DATAPATH_FRESH`] of `now`, else
    /// 0 (no evidence).
    pub fn fresh_mean_us(&self, now: Duration, mean_us: u64) -> u64 {
        match self.advanced_at {
            Some(t) if now.saturating_sub(t) <= DATAPATH_FRESH => mean_us,
            _ => 0,
        }
    }
}

/// The latency a replica's data path shows at one tick of the weighting loop, microseconds:
/// the mean of its completions (`mean_us`), or, when it completed nothing since the last tick
/// while requests wait there, the age of the oldest of them (`oldest`) if that is longer. A
/// replica that stops completing anything (a throttled disk at a few IOPS, a frozen process)
/// freezes its mean at the last completion's value; the age of what it holds keeps growing.
/// Less `late`: how far the loop's own tick came late, a stall of this process (or of the whole
/// machine) that delays the answers and the tick alike, shared by both replicas.
pub fn datapath_latency_us(mean_us: u64, oldest: Option<Duration>, completed: bool, late: Duration) -> u64 {
    match oldest {
        Some(age) if !completed => {
            let age = age.saturating_sub(late).as_micros().min(u128::from(u64::MAX)) as u64;
            mean_us.max(age)
        }
        _ => mean_us,
    }
}

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

/// The trend of a health series that a step is not: the least-squares slope of each half of the
/// last `window` of samples, and the trend the gentler of the two when both fall (or both rise),
/// else none. A step (a disk that got slower once and stays so) is flat on both sides of it and
/// moves the share by its level alone; a degradation that keeps growing falls in both halves
/// and is projected ahead ([`Trend::forecast`]). Units per second; time passed in.
#[derive(Debug, Clone, PartialEq)]
pub struct Trend {
    pub window: Duration,
    samples: std::collections::VecDeque<(Duration, f64)>,
}

/// Least-squares slope of `(t, x)` points, `None` below three points.
fn slope(points: &[(Duration, f64)]) -> Option<f64> {
    if points.len() < 3 {
        return None;
    }
    let n = points.len() as f64;
    let mt = points.iter().map(|p| p.0.as_secs_f64()).sum::<f64>() / n;
    let mx = points.iter().map(|p| p.1).sum::<f64>() / n;
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for p in points {
        let dt = p.0.as_secs_f64() - mt;
        sxy += dt * (p.1 - mx);
        sxx += dt * dt;
    }
    (sxx > 0.0).then(|| sxy / sxx)
}

impl Trend {
    pub fn new(window: Duration) -> Trend {
        Trend { window, samples: std::collections::VecDeque::new() }
    }

    pub fn update(&mut self, now: Duration, x: f64) {
        self.samples.push_back((now, x));
        while self.samples.front().is_some_and(|(t, _)| now.saturating_sub(*t) > self.window) {
            self.samples.pop_front();
        }
    }

    /// Units per second; 0 unless both halves of the window move the same way.
    pub fn slope(&self) -> f64 {
        let v: Vec<(Duration, f64)> = self.samples.iter().copied().collect();
        let (a, b) = v.split_at(v.len() / 2);
        match (slope(a), slope(b)) {
            (Some(a), Some(b)) if a < 0.0 && b < 0.0 => a.max(b),
            (Some(a), Some(b)) if a > 0.0 && b > 0.0 => a.min(b),
            _ => 0.0,
        }
    }

    /// `level` carried `horizon` ahead along the trend.
    pub fn forecast(&self, level: f64, horizon: Duration) -> f64 {
        level + self.slope() * horizon.as_secs_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(v: &[(&str, f64)]) -> Vec<PartReport> {
        v.iter().map(|&(n, s)| PartReport { name: n.into(), score: s, weight: 0.2 }).collect()
    }

    fn node(score: f64, parts: &[PartReport], datapath: Option<f64>) -> NodeJudged<'_> {
        NodeJudged { score, best: parts, worst: parts, margin: 15.0, datapath }
    }

    /// Bursts of slow completions on one replica, then on the other (a loaded machine), average
    /// out; a data path slow at every tick counts in full.
    #[test]
    fn the_data_path_is_judged_by_its_mean_over_the_window() {
        let ms = Duration::from_millis;
        let (mut s, mut t) = (DatapathWindow::default(), DatapathWindow::default());
        let judged = |s: &DatapathWindow, t: &DatapathWindow| {
            judge(&node(100.0, &[], s.mean()), Some(&node(100.0, &[], t.mean())))
        };
        // Alternating one-tick bursts.
        for k in 0..20u64 {
            let burst = k % 2 == 0;
            s.push(ms(k * 100), Some(if burst { 40.0 } else { 100.0 }));
            t.push(ms(k * 100), Some(if burst { 100.0 } else { 40.0 }));
            if k >= 5 {
                assert!(judged(&s, &t) >= 88.0, "tick {k}: {}", judged(&s, &t));
            }
        }
        // The source slow at every tick.
        for k in 20..30u64 {
            s.push(ms(k * 100), Some(25.0));
            t.push(ms(k * 100), Some(90.0));
        }
        assert_eq!(judged(&s, &t), 35.0);
        // No evidence: no data-path part.
        s.push(ms(3000), None);
        assert_eq!(s.mean(), None);
        assert_eq!(judged(&s, &t), 100.0);
    }

    #[test]
    fn judging_leaves_out_what_both_nodes_share() {
        // Both CPUs loaded alike: the source's 5 points worse CPU is all that counts, far above
        // any line that moves reads.
        let (s, t) = (parts(&[("disk", 100.0), ("cpu", 30.0)]), parts(&[("disk", 100.0), ("cpu", 35.0)]));
        assert_eq!(judge(&node(45.0, &s, Some(60.0)), Some(&node(50.0, &t, Some(62.0)))), 97.5);
        assert_eq!(judge(&node(50.0, &t, Some(62.0)), Some(&node(45.0, &s, Some(60.0)))), 100.0);
        // The source's disk is slow while both CPUs are loaded: the disk counts in full, though
        // the target's score is as low as the source's.
        let s = parts(&[("disk", 0.0), ("cpu", 30.0)]);
        let j = judge(&node(15.0, &s, None), Some(&node(45.0, &t, None)));
        assert!(j <= 15.0, "{j}");
        // Sick in different ways (source CPU, target disk): the target would not serve better.
        let (s, t) = (parts(&[("disk", 100.0), ("cpu", 0.0)]), parts(&[("disk", 0.0), ("cpu", 100.0)]));
        assert_eq!(judge(&node(15.0, &s, None), Some(&node(15.0, &t, None))), 100.0);
        // A part only the source has (a failing probe) counts in full.
        let (s, t) = (parts(&[("disk", 100.0), ("app", 0.0)]), parts(&[("disk", 100.0)]));
        assert_eq!(judge(&node(15.0, &s, None), Some(&node(100.0, &t, None))), 15.0);
        // The data path alone: the source's slower than the target's.
        let t = parts(&[("disk", 100.0)]);
        let s = t.clone();
        assert_eq!(judge(&node(100.0, &s, Some(20.0)), Some(&node(100.0, &t, Some(90.0)))), 30.0);
    }

    #[test]
    fn a_part_wavering_on_both_nodes_moves_nothing_one_staying_worse_counts() {
        // The same loaded machine sampled at other moments: each node's CPU between 30 and 85.
        let src = [parts(&[("disk", 100.0), ("cpu", 30.0)]), parts(&[("disk", 100.0), ("cpu", 85.0)])];
        let tgt = [parts(&[("disk", 100.0), ("cpu", 85.0)]), parts(&[("disk", 100.0), ("cpu", 30.0)])];
        let (sb, sw) = window_parts(src.iter().map(|v| &v[..]));
        let (tb, tw) = window_parts(tgt.iter().map(|v| &v[..]));
        assert_eq!((sb[1].score, sw[1].score), (85.0, 30.0));
        let j = |sb, sw, tb, tw| {
            judge(
                &NodeJudged { score: 45.0, best: sb, worst: sw, margin: 15.0, datapath: None },
                Some(&NodeJudged { score: 45.0, best: tb, worst: tw, margin: 15.0, datapath: None }),
            )
        };
        assert_eq!(j(&sb, &sw, &tb, &tw), 100.0);
        // Judged on the latest reports alone, the same waver would have counted.
        assert!(j(&src[0], &src[0], &tgt[0], &tgt[0]) < 70.0);
        // The source's disk slow for the whole window while the target's CPU wavers: it counts.
        let src = [parts(&[("disk", 0.0), ("cpu", 30.0)]), parts(&[("disk", 0.0), ("cpu", 85.0)])];
        let (sb, sw) = window_parts(src.iter().map(|v| &v[..]));
        assert!(j(&sb, &sw, &tb, &tw) <= 15.0, "{}", j(&sb, &sw, &tb, &tw));
    }

    #[test]
    fn a_step_has_no_trend_a_growing_fall_has() {
        let ms = Duration::from_millis;
        let mut t = Trend::new(ms(2000));
        for i in 0..20 {
            t.update(ms(i * 100), 95.0);
        }
        for i in 20..40 {
            t.update(ms(i * 100), 70.0);
            assert_eq!(t.slope(), 0.0, "a step is no trend (at {} ms)", i * 100);
        }
        let mut t = Trend::new(ms(2000));
        for i in 0..40 {
            t.update(ms(i * 100), 95.0 - i as f64);
        }
        assert!((t.slope() + 10.0).abs() < 1e-6, "{}", t.slope());
        assert!((t.forecast(55.0, ms(2000)) - 35.0).abs() < 1e-6);
    }

    #[test]
    fn without_parts_the_scores_are_compared_as_they_are() {
        assert_eq!(judge(&node(60.0, &[], None), Some(&node(100.0, &[], None))), 60.0);
        assert_eq!(judge(&node(60.0, &[], None), Some(&node(40.0, &[], None))), 100.0);
        assert_eq!(judge(&node(60.0, &[], Some(50.0)), None), 50.0);
    }

    #[test]
    fn a_replica_that_completes_nothing_shows_the_age_of_what_it_holds() {
        let ms = Duration::from_millis;
        // Completing: the mean, whatever waits.
        assert_eq!(datapath_latency_us(800, Some(ms(300)), true, ms(0)), 800);
        // Nothing completed this tick: the oldest request's age, when longer than the mean.
        assert_eq!(datapath_latency_us(800, Some(ms(3)), false, ms(0)), 3000);
        assert_eq!(datapath_latency_us(800, Some(Duration::from_micros(100)), false, ms(0)), 800);
        // Idle: the mean.
        assert_eq!(datapath_latency_us(800, None, false, ms(0)), 800);
        // The loop itself 250 ms late (this process, or the machine, stalled): that much of the
        // age is shared, not the replica's.
        assert_eq!(datapath_latency_us(800, Some(ms(300)), false, ms(250)), 50_000);
        assert_eq!(datapath_latency_us(800, Some(ms(300)), false, ms(400)), 800);
    }

    #[test]
    fn a_kinds_mean_stands_only_while_that_kind_completes() {
        let s = Duration::from_secs;
        let mut reads = Progress::default();
        assert_eq!(reads.fresh_mean_us(s(0), 900), 0, "nothing completed yet");
        assert!(reads.observe(s(1), 10));
        assert_eq!(reads.fresh_mean_us(s(1), 900), 900);
        // No read completes for a while (the replica gets none): the mean it froze at fades.
        assert!(!reads.observe(s(2), 10));
        assert_eq!(reads.fresh_mean_us(s(3), 900), 900, "within DATAPATH_FRESH");
        assert!(!reads.observe(s(4), 10));
        assert_eq!(reads.fresh_mean_us(s(4), 900), 0, "stale");
        assert!(reads.observe(s(5), 11));
        assert_eq!(reads.fresh_mean_us(s(5), 80), 80);
    }

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
