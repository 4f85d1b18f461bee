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
//! Pure bookkeeping: the router calls the replicas; this module decides which extents need an
//! intent recorded or may drop it, lock-free for writes to hot extents.

use std::{
    ops::Range,
    sync::atomic::{AtomicU64, Ordering},
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
    /// An extent not written for this long is dropped: longer than a write may be in flight
    /// (the router fails a replica whose write takes more than its 5 s write timeout).
    pub cold_after: Duration,
}

impl ActivityLog {
    pub fn new(size: u64, cold_after: Duration) -> ActivityLog {
        let n = size.div_ceil(1 << EXTENT_SHIFT) as usize;
        ActivityLog {
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

    /// Marks every extent of the range written now, if each already carries an intent; false
    /// when one does not (then the caller records it under [`Self::marking`], see
    /// [`Self::cold_runs`] and [`Self::set_hot`]). Atomic with respect to [`Self::take_cold`]: an
    /// extent touched here is not dropped, one dropped there is not touched.
    pub fn touch_if_hot(&self, offset: u64, len: u64) -> bool {
        let t = self.clock.load(Ordering::Acquire);
        for e in self.extents(offset, len) {
            let slot = &self.hot[e];
            let mut v = slot.load(Ordering::Acquire);
            loop {
                if v == 0 {
                    return false;
                }
                if v >= t {
                    break;
                }
                match slot.compare_exchange_weak(v, t, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => break,
                    Err(cur) => v = cur,
                }
            }
        }
        true
    }

    /// Runs of extents of the range without an intent (to record, holding [`Self::marking`]).
    pub fn cold_runs(&self, offset: u64, len: u64) -> Vec<Range<usize>> {
        let mut runs: Vec<Range<usize>> = Vec::new();
        for e in self.extents(offset, len) {
            if self.hot[e].load(Ordering::Acquire) == 0 {
                match runs.last_mut() {
                    Some(r) if r.end == e => r.end = e + 1,
                    _ => runs.push(e..e + 1),
                }
            }
        }
        runs
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
        let mut runs: Vec<Range<usize>> = Vec::new();
        for e in extents {
            match runs.last_mut() {
                Some(r) if r.end == e => r.end = e + 1,
                _ => runs.push(e..e + 1),
            }
        }
        Batch { id, runs }
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
            self.hot[i].store(t, Ordering::Release);
        }
    }

    /// Takes the extents idle for [`Self::cold_after`] out of the log (cold from here on: a
    /// write to one records its intent again, waiting for [`Self::marking`]) and returns them
    /// as runs; the caller holds [`Self::marking`], flushes both replicas and then drops their
    /// intent, or puts them back with [`Self::set_hot`] if it cannot.
    pub fn take_cold(&self, now: Instant) -> Vec<Range<usize>> {
        self.tick(now);
        let t = self.now_ms(now);
        let idle = self.cold_after.as_millis() as u64;
        let mut runs: Vec<Range<usize>> = Vec::new();
        for (e, slot) in self.hot.iter().enumerate() {
            let v = slot.load(Ordering::Acquire);
            if v == 0 || t.saturating_sub(v) < idle {
                continue;
            }
            if slot.compare_exchange(v, 0, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                match runs.last_mut() {
                    Some(r) if r.end == e => r.end = e + 1,
                    _ => runs.push(e..e + 1),
                }
            }
        }
        runs
    }

    /// Every extent with an intent recorded, as runs, taken out of the log (a clean shutdown, or
    /// the log restarting empty after a replica returned).
    pub fn take_all(&self) -> Vec<Range<usize>> {
        let mut runs: Vec<Range<usize>> = Vec::new();
        for (e, slot) in self.hot.iter().enumerate() {
            if slot.swap(0, Ordering::AcqRel) != 0 {
                match runs.last_mut() {
                    Some(r) if r.end == e => r.end = e + 1,
                    _ => runs.push(e..e + 1),
                }
            }
        }
        runs
    }

    /// Extents carrying an intent.
    pub fn hot_count(&self) -> usize {
        self.hot.iter().filter(|s| s.load(Ordering::Relaxed) != 0).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn extents_of_ranges() {
        let al = ActivityLog::new(10 * MIB, Duration::from_secs(10));
        assert_eq!(al.extents(0, 0), 0..0);
        assert_eq!(al.extents(0, 4096), 0..1);
        assert_eq!(al.extents(4 * MIB - 1, 2), 0..2);
        assert_eq!(al.extents(9 * MIB, 4 * MIB), 2..3, "clipped to the volume");
        assert_eq!(al.byte_range(2..3), (8 * MIB, 2 * MIB));
    }

    #[test]
    fn writes_record_intent_once_and_idle_extents_are_dropped() {
        let t0 = Instant::now();
        let al = ActivityLog::new(16 * MIB, Duration::from_secs(10));
        assert!(!al.touch_if_hot(MIB, 4096), "nothing recorded yet");
        assert_eq!(al.cold_runs(0, 16 * MIB), vec![0..4]);
        al.set_hot(0..1, t0);
        assert_eq!(al.cold_runs(0, 16 * MIB), vec![1..4]);
        al.tick(t0 + Duration::from_secs(3));
        assert!(al.touch_if_hot(MIB, 4096));
        assert!(!al.touch_if_hot(3 * MIB, 2 * MIB), "spans a cold extent");
        al.set_hot(2..3, t0);
        // At 11 s: extent 2 idle since 3 s (the clock writes stamp with), extent 0 written at 3
        // s too: neither idle for 10 s yet.
        assert!(al.take_cold(t0 + Duration::from_secs(11)).is_empty());
        // The clock moved to 11 s with the cleaner: a write now is stamped 11 s.
        assert!(al.touch_if_hot(0, 1));
        // At 14 s: extent 2 idle since 3 s, extent 0 written at 11 s.
        let t = t0 + Duration::from_secs(14);
        assert_eq!(al.take_cold(t), vec![2..3]);
        assert_eq!(al.hot_count(), 1);
        assert!(!al.touch_if_hot(8 * MIB, 1), "a dropped extent records again");
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
        let al = ActivityLog::new(64 * MIB, Duration::from_secs(10));
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
        assert!(al.touch_if_hot(0, 4096));
        // B takes the lock next and records every extent queued meanwhile in one batch
        // (coalesced; extent 0, hot since batch 1, left out).
        let second = al.take_batch();
        assert_eq!(second, Batch { id: 2, runs: vec![1..6] });
        al.committed(&second, t0);
        assert!(al.covered(c) && al.covered(d), "C and D find their batch durable: no sync of their own");
        assert!(al.touch_if_hot(0, 24 * MIB));
        assert_eq!(al.take_batch().runs, Vec::<Range<usize>>::new(), "nothing left to record");
    }

    #[test]
    #[allow(clippy::single_range_in_vec_init)] // runs of extents, not vectors of numbers
    fn a_failed_batch_is_recorded_again_before_its_writers_go() {
        let t0 = Instant::now();
        let al = ActivityLog::new(64 * MIB, Duration::from_secs(10));
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
        // the cleaner, at t0 + 15 s, drops what is idle for 10 s. Whichever comes first, a
        // writer told "hot" finds it still hot, and one that finds it dropped is told "cold".
        let (mut seen_hot, mut seen_cold) = (0, 0);
        for _ in 0..2000 {
            let al = std::sync::Arc::new(ActivityLog::new(4 * MIB, Duration::from_secs(10)));
            al.set_hot(0..1, al.epoch);
            al.tick(al.epoch + Duration::from_secs(10));
            let a = al.clone();
            let cleaner =
                std::thread::spawn(move || !a.take_cold(a.epoch + Duration::from_secs(15)).is_empty());
            let touched = al.touch_if_hot(0, 4096);
            let dropped = cleaner.join().unwrap();
            assert_eq!(touched, !dropped, "touched {touched}, dropped {dropped}");
            assert_eq!(al.hot_count() == 1, touched);
            if touched {
                seen_hot += 1;
            } else {
                seen_cold += 1;
            }
        }
        assert_eq!(seen_hot + seen_cold, 2000);
    }
}
