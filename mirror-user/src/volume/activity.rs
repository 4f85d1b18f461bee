//! The router's activity log: write intent, so that a router that dies with writes in flight
//! leaves a record of where the two replicas may differ.
//!
//! A write goes to both replicas in parallel; if the router dies after one applied it and before
//! the other did (or the other node died with it), the replicas differ in that range and neither
//! knows. Before the first write to an extent (4 MiB) the router records its intent durably in
//! the source replica's bitmap (`VolumeMeta::mark_intent`: the bits a resync sends, without
//! entering degraded tracking), and keeps the extent "hot" for as long as it is written. An
//! extent idle for [`ActivityLog::cold_after`] is dropped again: both replicas are flushed,
//! then its bits are cleared. The next start of a router finds the bits of the extents that were
//! hot when the last one died, and resyncs them (digest-compared: equal blocks cost a digest).
//! Like DRBD's activity log, with the source's bitmap as the log.
//!
//! The hot set is bounded (`--al-extents`, DRBD's `al-extents`): above [`ActivityLog::limit`]
//! the least recently written extents with no write in flight are evicted, down to three
//! quarters, the same way (taken out, both replicas flushed, bits cleared in one metadata
//! write), at most once per [`EVICT_EVERY`]. Each write holds its extents [`Busy`]
//! from the moment it finds them hot until both replicas answered, so an extent is never
//! dropped under a write in flight: the flush covers every write the dropped extents saw. The
//! bound is soft by what writes add between two evictions.
//!
//! Pure bookkeeping: the router calls the replicas; this module decides which extents need an
//! intent recorded or may drop it, lock-free for writes to hot extents.

use std::{
    ops::Range,
    sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering},
    time::{Duration, Instant},
};

/// Extent size (log2): 4 MiB.
pub const EXTENT_SHIFT: u32 = 22;

/// The group commit of intents: runs of cold extents waiting for the next metadata write, and
/// the batch numbers. A writer queues its cold runs and gets the number of the open batch (its
/// ticket); the next holder of [`ActivityLog::marking`] takes the whole queue as one batch
/// (closing it: later writers join the next) and records it with one durable write; a writer
/// whose ticket is at most [`Self::durable`] has its intent recorded and may write.
#[derive(Debug)]
struct Queue {
    runs: Vec<Range<usize>>,
    /// The batch queued runs join.
    open: u64,
    /// Every batch up to this one is durable.
    durable: u64,
}

/// One batch of cold runs to record with one metadata write (see [`ActivityLog::take_batch`]).
#[derive(Debug, PartialEq, Eq)]
pub struct Batch {
    pub id: u64,
    pub runs: Vec<Range<usize>>,
}

/// Which extents carry a recorded intent, and when each was last written.
#[derive(Debug)]
pub struct ActivityLog {
    epoch: Instant,
    /// Milliseconds since `epoch` (+1) as last read by [`Self::tick`]: writes stamp their
    /// extents with it instead of reading the clock (cheap on the fast path; it lags by at most
    /// the supervisor's period, far below [`Self::cold_after`], and only ever makes a write look
    /// older, never younger).
    clock: AtomicU64,
    size: u64,
    /// Per extent: milliseconds since `epoch` of its last write, plus one; 0 = no intent
    /// recorded (cold).
    hot: Vec<AtomicU64>,
    /// Held while an intent is recorded or dropped, so a write never relies on an intent that
    /// is being dropped.
    pub marking: tokio::sync::Mutex<()>,
    queue: std::sync::Mutex<Queue>,
    /// An extent not written for this long is dropped (longer than a write may be in flight
    /// anyway: the router fails a replica whose write takes more than its 5 s write timeout).
    pub cold_after: Duration,
    /// Per extent: writes in flight that found it hot (see [`Busy`]).
    busy: Vec<AtomicU32>,
    /// Extents carrying an intent.
    count: AtomicUsize,
    /// The most extents kept with an intent before the least recently written are evicted.
    pub limit: usize,
    /// Milliseconds since `epoch` (+1) of the last eviction; 0 = none yet.
    last_eviction: AtomicU64,
}

/// The shortest time between two evictions (see [`ActivityLog::over_limit`]).
pub const EVICT_EVERY: Duration = Duration::from_secs(2);

/// The extents of one write in flight, held from [`ActivityLog::touch_if_hot`] until the write
/// completed on every replica (dropped): no eviction or idle drop takes them meanwhile.
#[derive(Debug)]
pub struct Busy<'a> {
    al: &'a ActivityLog,
    extents: Range<usize>,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        for e in self.extents.clone() {
            self.al.busy[e].fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// The default of [`ActivityLog::limit`] (`--al-extents`): 65536 extents of 4 MiB (DRBD's
/// largest `al-extents`), so a router that dies costs its successor a digest pass over at most
/// 256 GiB (plus the extents two seconds of writes add between evictions). A volume of up to
/// 256 GiB never evicts; each eviction costs a flush of both replicas, which on sparse files
/// written all over cost more than half the write rate here (docs/benchmarks.md).
pub const DEFAULT_AL_EXTENTS: usize = 65536;

impl ActivityLog {
    pub fn new(size: u64, cold_after: Duration, limit: usize) -> ActivityLog {
        let n = size.div_ceil(1 << EXTENT_SHIFT) as usize;
        ActivityLog {
            busy: (0..n).map(|_| AtomicU32::new(0)).collect(),
            count: AtomicUsize::new(0),
            limit: limit.max(1),
            last_eviction: AtomicU64::new(0),
            epoch: Instant::now(),
            clock: AtomicU64::new(1),
            size,
            hot: (0..n).map(|_| AtomicU64::new(0)).collect(),
            marking: tokio::sync::Mutex::new(()),
            queue: std::sync::Mutex::new(Queue { runs: Vec::new(), open: 1, durable: 0 }),
            cold_after,
        }
    }

    fn now_ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64 + 1
    }

    /// Advances the cached clock writes stamp their extents with.
    pub fn tick(&self, now: Instant) {
        self.clock.fetch_max(self.now_ms(now), Ordering::AcqRel);
    }

    /// The extents `[offset, offset+len)` touches (a zero-length range touches none).
    pub fn extents(&self, offset: u64, len: u64) -> Range<usize> {
        if len == 0 || offset >= self.size {
            return 0..0;
        }
        let end = offset.saturating_add(len).min(self.size);
        (offset >> EXTENT_SHIFT) as usize..((end - 1) >> EXTENT_SHIFT) as usize + 1
    }

    /// The byte range of extents `e` (clipped to the volume).
    pub fn byte_range(&self, e: Range<usize>) -> (u64, u64) {
        let start = (e.start as u64) << EXTENT_SHIFT;
        let end = ((e.end as u64) << EXTENT_SHIFT).min(self.size);
        (start, end.saturating_sub(start))
    }

    /// Marks every extent of the range written now and busy until the returned guard drops, if
    /// each already carries an intent; `None` when one does not (then the caller records it
    /// under [`Self::marking`], see [`Self::cold_runs`] and [`Self::set_hot`]). Against
    /// [`Self::take_cold`] and [`Self::take_victims`] (which zero an extent, then check it is
    /// not busy): the write counts itself busy, then checks the extent is hot; whichever comes
    /// second sees the other, so an extent a write was told is hot is not dropped.
    pub fn touch_if_hot(&self, offset: u64, len: u64) -> Option<Busy<'_>> {
        let t = self.clock.load(Ordering::Acquire);
        let extents = self.extents(offset, len);
        for e in extents.clone() {
            self.busy[e].fetch_add(1, Ordering::SeqCst);
        }
        let busy = Busy { al: self, extents: extents.clone() };
        for e in extents {
            let slot = &self.hot[e];
            let mut v = slot.load(Ordering::SeqCst);
            loop {
                if v == 0 {
                    return None;
                }
                if v >= t {
                    break;
                }
                match slot.compare_exchange_weak(v, t, Ordering::SeqCst, Ordering::SeqCst) {
                    Ok(_) => break,
                    Err(cur) => v = cur,
                }
            }
        }
        Some(busy)
    }

    /// Takes extent `e` (stamped `v`) out of the log unless a write holds it busy (then it is
    /// put back); true when taken.
    fn take_one(&self, e: usize, v: u64) -> bool {
        let slot = &self.hot[e];
        if slot.compare_exchange(v, 0, Ordering::SeqCst, Ordering::SeqCst).is_err() {
            return false;
        }
        self.count.fetch_sub(1, Ordering::AcqRel);
        if self.busy[e].load(Ordering::SeqCst) != 0 {
            // A write in flight found it hot: back (unless recorded again meanwhile, which
            // counted it).
            if slot.compare_exchange(0, v, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
                self.count.fetch_add(1, Ordering::AcqRel);
            }
            return false;
        }
        true
    }

    /// How many extents to evict now: none up to [`Self::limit`], else down to three quarters
    /// of it; none either within [`EVICT_EVERY`] of the last eviction (each costs a flush of both
    /// replicas: fewer, larger ones).
    pub fn over_limit(&self, now: Instant) -> usize {
        let n = self.count.load(Ordering::Acquire);
        if n <= self.limit {
            return 0;
        }
        let t = self.now_ms(now);
        let last = self.last_eviction.load(Ordering::Acquire);
        if last != 0 && t.saturating_sub(last) < EVICT_EVERY.as_millis() as u64 {
            return 0;
        }
        self.last_eviction.store(t, Ordering::Release);
        n - self.limit * 3 / 4
    }

    /// Takes up to `want` of the least recently written extents with no write in flight out of
    /// the log (eviction; see [`Self::take_cold`] for what the caller does with them).
    pub fn take_victims(&self, want: usize) -> Vec<Range<usize>> {
        if want == 0 {
            return Vec::new();
        }
        let mut cands: Vec<(u64, usize)> = self
            .hot
            .iter()
            .enumerate()
            .filter_map(|(e, s)| {
                let v = s.load(Ordering::Acquire);
                (v != 0 && self.busy[e].load(Ordering::Acquire) == 0).then_some((v, e))
            })
            .collect();
        if want < cands.len() {
            cands.select_nth_unstable(want);
            cands.truncate(want);
        }
        let mut taken: Vec<usize> =
            cands.into_iter().filter(|&(v, e)| self.take_one(e, v)).map(|(_, e)| e).collect();
        taken.sort_unstable();
        runs_of(taken)
    }

    /// Whether extent `e` carries no intent (taken out, not recorded again).
    pub fn is_cold(&self, e: usize) -> bool {
        self.hot[e].load(Ordering::SeqCst) == 0
    }

    /// Runs of extents of the range without an intent (to record, holding [`Self::marking`]).
    pub fn cold_runs(&self, offset: u64, len: u64) -> Vec<Range<usize>> {
        runs_of(self.extents(offset, len).filter(|&e| self.hot[e].load(Ordering::Acquire) == 0))
    }

    /// Of extents taken out of the log, the runs still cold (not recorded again meanwhile):
    /// whose bits may be cleared, holding [`Self::marking`].
    pub fn still_cold(&self, taken: Vec<Range<usize>>) -> Vec<Range<usize>> {
        runs_of(taken.into_iter().flatten().filter(|&e| self.is_cold(e)))
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues the cold runs of a write for the next batch; returns its ticket (see [`Queue`]).
    pub fn enqueue(&self, runs: Vec<Range<usize>>) -> u64 {
        let mut q = self.queue();
        q.runs.extend(runs);
        q.open
    }

    /// Whether the batch of `ticket` (and every earlier one) is durable.
    pub fn covered(&self, ticket: u64) -> bool {
        self.queue().durable >= ticket
    }

    /// Closes the open batch and takes its runs (coalesced, extents already hot left out) to
    /// record with one metadata write, holding [`Self::marking`]; then [`Self::committed`] or,
    /// if the write failed, [`Self::requeue`].
    pub fn take_batch(&self) -> Batch {
        let mut q = self.queue();
        let id = q.open;
        q.open += 1;
        let mut extents: Vec<usize> =
            q.runs.drain(..).flatten().filter(|&e| self.hot[e].load(Ordering::Acquire) == 0).collect();
        drop(q);
        extents.sort_unstable();
        extents.dedup();
        Batch { id, runs: runs_of(extents) }
    }

    /// The batch is durable: its extents are hot (written now), and every ticket up to its id
    /// is covered.
    pub fn committed(&self, batch: &Batch, now: Instant) {
        for r in &batch.runs {
            self.set_hot(r.clone(), now);
        }
        let mut q = self.queue();
        q.durable = q.durable.max(batch.id);
    }

    /// The batch's metadata write failed: its runs go back to the queue, so that the writers
    /// waiting on it (not covered) record them again with the next batch.
    pub fn requeue(&self, batch: Batch) {
        self.queue().runs.extend(batch.runs);
    }

    /// The intent of extents `e` is recorded: hot, written now.
    pub fn set_hot(&self, e: Range<usize>, now: Instant) {
        self.tick(now);
        let t = self.clock.load(Ordering::Acquire);
        for i in e {
            if self.hot[i].swap(t, Ordering::SeqCst) == 0 {
                self.count.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    /// Takes the extents idle for [`Self::cold_after`] with no write in flight out of the log
    /// (cold from here on: a write to one records its intent again, waiting for
    /// [`Self::marking`]) and returns them as runs. The caller flushes both replicas, then,
    /// holding [`Self::marking`], clears the bits of those still cold ([`Self::is_cold`]: not
    /// recorded again meanwhile), or puts them back with [`Self::set_hot`] if it cannot.
    pub fn take_cold(&self, now: Instant) -> Vec<Range<usize>> {
        self.tick(now);
        let t = self.now_ms(now);
        let idle = self.cold_after.as_millis() as u64;
        let taken: Vec<usize> = (0..self.hot.len())
            .filter(|&e| {
                let v = self.hot[e].load(Ordering::Acquire);
                v != 0 && t.saturating_sub(v) >= idle && self.take_one(e, v)
            })
            .collect();
        runs_of(taken)
    }

    /// Every extent with an intent recorded, as runs, taken out of the log (a clean shutdown, or
    /// the log restarting empty after a replica returned).
    pub fn take_all(&self) -> Vec<Range<usize>> {
        let taken: Vec<usize> = (0..self.hot.len())
            .filter(|&e| {
                let was = self.hot[e].swap(0, Ordering::SeqCst) != 0;
                if was {
                    self.count.fetch_sub(1, Ordering::AcqRel);
                }
                was
            })
            .collect();
        runs_of(taken)
    }

    /// Extents carrying an intent.
    pub fn hot_count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }
}

/// Extent numbers as runs: each joins the run before it when it follows that run's end.
fn runs_of(sorted: impl IntoIterator<Item = usize>) -> Vec<Range<usize>> {
    let mut runs: Vec<Range<usize>> = Vec::new();
    for e in sorted {
        match runs.last_mut() {
            Some(r) if r.end == e => r.end = e + 1,
            _ => runs.push(e..e + 1),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn extents_of_ranges() {
        let al = ActivityLog::new(10 * MIB, Duration::from_secs(10), 1 << 20);
        assert_eq!(al.extents(0, 0), 0..0);
        assert_eq!(al.extents(0, 4096), 0..1);
        assert_eq!(al.extents(4 * MIB - 1, 2), 0..2);
        assert_eq!(al.extents(9 * MIB, 4 * MIB), 2..3, "clipped to the volume");
        assert_eq!(al.byte_range(2..3), (8 * MIB, 2 * MIB));
    }

    #[test]
    fn writes_record_intent_once_and_idle_extents_are_dropped() {
        let t0 = Instant::now();
        let al = ActivityLog::new(16 * MIB, Duration::from_secs(10), 1 << 20);
        assert!(al.touch_if_hot(MIB, 4096).is_none(), "nothing recorded yet");
        assert_eq!(al.cold_runs(0, 16 * MIB), vec![0..4]);
        al.set_hot(0..1, t0);
        assert_eq!(al.cold_runs(0, 16 * MIB), vec![1..4]);
        al.tick(t0 + Duration::from_secs(3));
        assert!(al.touch_if_hot(MIB, 4096).is_some());
        assert!(al.touch_if_hot(3 * MIB, 2 * MIB).is_none(), "spans a cold extent");
        al.set_hot(2..3, t0);
        // At 11 s: extent 2 idle since 3 s (the clock writes stamp with), extent 0 written at 3
        // s too: neither idle for 10 s yet.
        assert!(al.take_cold(t0 + Duration::from_secs(11)).is_empty());
        // The clock moved to 11 s with the cleaner: a write now is stamped 11 s.
        assert!(al.touch_if_hot(0, 1).is_some());
        // At 14 s: extent 2 idle since 3 s, extent 0 written at 11 s.
        let t = t0 + Duration::from_secs(14);
        assert_eq!(al.take_cold(t), vec![2..3]);
        assert_eq!(al.hot_count(), 1);
        assert!(al.touch_if_hot(8 * MIB, 1).is_none(), "a dropped extent records again");
        assert!(al.take_cold(t0 + Duration::from_secs(20)).is_empty());
        assert_eq!(al.take_cold(t0 + Duration::from_secs(21)), vec![0..1]);
        al.set_hot(1..3, t);
        assert_eq!(al.take_all(), vec![1..3]);
        assert_eq!(al.hot_count(), 0);
    }

    #[test]
    #[allow(clippy::single_range_in_vec_init)] // runs of extents, not vectors of numbers
    fn writers_queued_during_a_commit_share_the_next_one() {
        let t0 = Instant::now();
        let al = ActivityLog::new(64 * MIB, Duration::from_secs(10), 1 << 20);
        // Writer A: cold extent 0; it leads batch 1.
        let a = al.enqueue(al.cold_runs(0, 4096));
        let first = al.take_batch();
        assert_eq!(first, Batch { id: 1, runs: vec![0..1] });
        // While batch 1 is being synced, B, C and D need extents 5, 3 and 4 (and D also 0,
        // which batch 1 is recording): they all join batch 2.
        let b = al.enqueue(al.cold_runs(5 * 4 * MIB, 4096));
        let c = al.enqueue(al.cold_runs(3 * 4 * MIB, 4096));
        let d = al.enqueue(al.cold_runs(0, 5 * 4 * MIB));
        assert_eq!((a, b, c, d), (1, 2, 2, 2));
        assert!(!al.covered(a), "no write before its batch is durable");
        al.committed(&first, t0);
        assert!(al.covered(a) && !al.covered(b) && !al.covered(c) && !al.covered(d));
        assert!(al.touch_if_hot(0, 4096).is_some());
        // B takes the lock next and records every extent queued meanwhile in one batch
        // (coalesced; extent 0, hot since batch 1, left out).
        let second = al.take_batch();
        assert_eq!(second, Batch { id: 2, runs: vec![1..6] });
        al.committed(&second, t0);
        assert!(al.covered(c) && al.covered(d), "C and D find their batch durable: no sync of their own");
        assert!(al.touch_if_hot(0, 24 * MIB).is_some());
        assert_eq!(al.take_batch().runs, Vec::<Range<usize>>::new(), "nothing left to record");
    }

    #[test]
    #[allow(clippy::single_range_in_vec_init)] // runs of extents, not vectors of numbers
    fn a_failed_batch_is_recorded_again_before_its_writers_go() {
        let t0 = Instant::now();
        let al = ActivityLog::new(64 * MIB, Duration::from_secs(10), 1 << 20);
        let a = al.enqueue(vec![2..3]);
        let b = al.enqueue(vec![7..9]);
        let failed = al.take_batch();
        assert_eq!(failed.runs, vec![2..3, 7..9]);
        al.requeue(failed);
        assert!(!al.covered(a) && !al.covered(b));
        let c = al.enqueue(vec![4..5]);
        let retry = al.take_batch();
        assert_eq!(retry.runs, vec![2..3, 4..5, 7..9], "the failed runs go with the next batch");
        al.committed(&retry, t0);
        assert!(al.covered(a) && al.covered(b) && al.covered(c));
        assert_eq!(al.hot_count(), 4);
    }

    #[test]
    fn a_touch_and_a_drop_never_both_win() {
        // Extent 0 recorded at t0, last written then; a writer touches it at t0 + 10 s while
        // the cleaner, at t0 + 15 s, drops what is idle for 10 s. A writer told "hot" holds the
        // extent busy until it is done, and the cleaner leaves a busy extent: never both. (Both
        // may lose: the writer found it taken and records it again, the cleaner found it busy
        // and put it back.)
        let (mut seen_hot, mut seen_dropped) = (0, 0);
        for _ in 0..2000 {
            let al = std::sync::Arc::new(ActivityLog::new(4 * MIB, Duration::from_secs(10), 1 << 20));
            al.set_hot(0..1, al.epoch);
            al.tick(al.epoch + Duration::from_secs(10));
            let a = al.clone();
            let cleaner =
                std::thread::spawn(move || !a.take_cold(a.epoch + Duration::from_secs(15)).is_empty());
            let busy = al.touch_if_hot(0, 4096);
            let touched = busy.is_some();
            let dropped = cleaner.join().unwrap();
            assert!(!(touched && dropped), "a write was told hot and its extent was dropped");
            assert_eq!(al.hot_count(), usize::from(!dropped), "the count follows the log");
            assert_eq!(al.is_cold(0), dropped);
            drop(busy);
            seen_hot += usize::from(touched);
            seen_dropped += usize::from(dropped);
        }
        assert!(seen_hot + seen_dropped >= 1000, "the race mostly has a winner: {seen_hot} + {seen_dropped}");
    }

    #[test]
    fn a_busy_extent_is_neither_dropped_nor_evicted() {
        let t0 = Instant::now();
        let al = ActivityLog::new(64 * MIB, Duration::from_secs(10), 1 << 20);
        al.set_hot(0..4, t0);
        let busy = al.touch_if_hot(MIB, 4 * MIB).expect("hot"); // extents 0 and 1
        assert_eq!(al.take_cold(t0 + Duration::from_secs(30)), vec![2..4], "idle, not busy");
        assert!(al.take_victims(10).is_empty(), "both left are busy");
        drop(busy);
        assert_eq!(al.take_victims(10), vec![0..2]);
        assert_eq!(al.hot_count(), 0);
    }

    #[test]
    fn above_the_limit_the_least_recently_written_go() {
        let t0 = Instant::now();
        let al = ActivityLog::new(64 * MIB, Duration::from_secs(10), 8);
        for e in 0..8 {
            // Extent e last written at t0 + e s; extent 3 written again at 9 s.
            al.set_hot(e..e + 1, t0 + Duration::from_secs(e as u64));
        }
        let t9 = t0 + Duration::from_secs(9);
        assert_eq!(al.over_limit(t9), 0, "8 of 8: at the limit");
        al.tick(t9);
        assert!(al.touch_if_hot(3 * 4 * MIB, 4096).is_some());
        al.set_hot(8..9, t9);
        assert_eq!(al.over_limit(t9), 3, "9 of 8: down to 6");
        assert_eq!(al.take_victims(3), vec![0..3], "the three least recently written");
        al.set_hot(9..12, t0 + Duration::from_secs(10));
        assert_eq!(al.hot_count(), 9);
        assert_eq!(al.over_limit(t0 + Duration::from_secs(10)), 0, "within EVICT_EVERY of the last eviction");
        let t12 = t0 + Duration::from_secs(12);
        assert_eq!(al.over_limit(t12), 3);
        assert_eq!(al.take_victims(3), vec![4..7], "3 was written at 9 s");
        assert!(al.is_cold(2) && !al.is_cold(3) && !al.is_cold(7));
    }
}
