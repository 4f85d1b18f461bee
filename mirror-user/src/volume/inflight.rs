//! Requests in flight on one replica, and the age of the oldest of them: the signal of a replica
//! that stopped answering *now*, before any completed request can say so (a stalled replica
//! completes nothing, so every latency measured from completions stays at its last value while
//! the stall lasts).
//!
//! A request counts from [`InFlight::begin`] until its [`Started`] guard drops. A caller that
//! stops waiting for a request the replica still holds (a read overtaken by its hedge, one past
//! its deadline) keeps the request running to its answer (see the router's `abandon`), so the
//! request still counts: the replica has not answered it.
//!
//! Time is passed in (`now`), so the decisions built on it are tested with simulated instants.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex, PoisonError,
    },
    time::{Duration, Instant},
};

/// The requests in flight on one replica, by start.
#[derive(Debug, Default)]
pub struct InFlight {
    next: AtomicU64,
    /// Start of each request in flight, by sequence number (so the first entry is the oldest).
    started: Mutex<BTreeMap<u64, Instant>>,
}

/// A request in flight; it stops counting when this drops.
#[derive(Debug)]
#[must_use = "the request counts as in flight while this lives"]
pub struct Started<'a> {
    set: &'a InFlight,
    id: u64,
}

impl InFlight {
    /// A request started at `now`.
    pub fn begin(&self, now: Instant) -> Started<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.started.lock().unwrap_or_else(PoisonError::into_inner).insert(id, now);
        Started { set: self, id }
    }

    /// How long the oldest request in flight has been waiting at `now`; `None` when none is.
    pub fn oldest_age(&self, now: Instant) -> Option<Duration> {
        let started = self.started.lock().unwrap_or_else(PoisonError::into_inner);
        // Sequence numbers are taken before the lock, so the first entry may be a hair younger
        // than another: the oldest start is the minimum.
        started.values().min().map(|&t| now.saturating_duration_since(t))
    }

    /// Requests in flight.
    pub fn len(&self) -> usize {
        self.started.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Started<'_> {
    fn drop(&mut self) {
        self.set.started.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_age_is_the_oldest_requests_and_none_when_idle() {
        let f = InFlight::default();
        let t0 = Instant::now();
        assert_eq!(f.oldest_age(t0), None);
        let a = f.begin(t0);
        let b = f.begin(t0 + 5 * MS);
        assert_eq!(f.oldest_age(t0 + 7 * MS), Some(7 * MS));
        assert_eq!(f.len(), 2);
        // The oldest answered: the next one's age.
        drop(a);
        assert_eq!(f.oldest_age(t0 + 7 * MS), Some(2 * MS));
        drop(b);
        assert_eq!(f.oldest_age(t0 + 7 * MS), None);
        assert!(f.is_empty());
    }

    #[test]
    fn a_stalled_request_ages_while_later_ones_come_and_go() {
        let f = InFlight::default();
        let t0 = Instant::now();
        let stuck = f.begin(t0);
        for k in 1..100 {
            let quick = f.begin(t0 + k * MS);
            drop(quick);
        }
        assert_eq!(f.oldest_age(t0 + 150 * MS), Some(150 * MS));
        drop(stuck);
        assert_eq!(f.oldest_age(t0 + 150 * MS), None);
    }
}
