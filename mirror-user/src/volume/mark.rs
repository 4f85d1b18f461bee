//! The degraded-write mark on the request path: before a write is acknowledged with one replica
//! only, the lease store must hold, durably and under this router's lease, which replica holds
//! every acknowledged write ([`CurrentMark`], by metadata uuid). That is what lets a standby take
//! over with one replica safely (`lease::take::may_go_alone`): with etcd as the third party, no
//! mark means both replicas hold every acknowledged write.
//!
//! [`DegradedMark`] does it once per degraded episode: the first write of an episode writes the
//! mark (one etcd transaction), every write that comes meanwhile waits for that same mark, and
//! once it is durable the rest pass on one uncontended lock. A mark that cannot be written fails
//! the write (`EIO`): no write is acknowledged degraded before the mark is durable. After the
//! resync, the supervisor clears it ([`DegradedMark::clear_if`], best effort: a mark left set
//! only keeps a taker from going on with the other replica alone, the safe direction).
//!
//! The store is a [`MarkStore`] installed by the etcd lease keeper; without one (the embedded
//! lease, no lease) there is nothing to record and [`DegradedMark::ensure`] passes.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex, OnceLock},
};

use crate::lease::{CurrentMark, LeaseError};

/// A boxed future of a mark operation.
pub type MarkFuture<'a> = Pin<Box<dyn Future<Output = Result<(), LeaseError>> + Send + 'a>>;

/// Where the mark is recorded (the etcd keeper: `LeaseStore::mark_current` under its lease).
pub trait MarkStore: Send + Sync + fmt::Debug {
    /// Records `mark`, durably, before it returns `Ok`.
    fn mark(&self, mark: CurrentMark) -> MarkFuture<'_>;
    /// Removes the mark.
    fn clear(&self) -> MarkFuture<'_>;
}

/// See the module doc.
#[derive(Debug, Default)]
pub struct DegradedMark {
    store: OnceLock<Arc<dyn MarkStore>>,
    /// The mark the store durably holds, as far as this router knows; `None`: none, or unknown
    /// (a write or clear in progress, or one whose outcome is not known): it must be written
    /// before a degraded write is acknowledged.
    durable: Mutex<Option<CurrentMark>>,
    /// One store operation at a time: concurrent writes of an episode wait for the same mark.
    serial: tokio::sync::Mutex<()>,
}

impl DegradedMark {
    fn durable(&self) -> std::sync::MutexGuard<'_, Option<CurrentMark>> {
        self.durable.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Installs the store (once, when the lease is taken, before the first write).
    pub fn install(&self, store: Arc<dyn MarkStore>) {
        let _ = self.store.set(store);
    }

    /// True when marks are recorded (a store is installed).
    pub fn needed(&self) -> bool {
        self.store.get().is_some()
    }

    /// Makes sure the store holds `want` before a write is acknowledged with one replica only.
    /// Passes at once when it does already (or there is no store); otherwise writes it, with
    /// concurrent callers waiting for that one write. `Err`: the write must not be acknowledged.
    pub async fn ensure(&self, want: CurrentMark) -> Result<(), LeaseError> {
        let Some(store) = self.store.get() else { return Ok(()) };
        if *self.durable() == Some(want) {
            return Ok(());
        }
        let _one = self.serial.lock().await;
        if *self.durable() == Some(want) {
            return Ok(());
        }
        *self.durable() = None;
        match store.mark(want).await {
            Ok(()) => {
                tracing::info!("lease: recorded in the lease store that {want}, before acknowledging writes with one replica");
                *self.durable() = Some(want);
                Ok(())
            }
            Err(e) => {
                tracing::error!("lease: could not record that {want}: {e}; the write is not acknowledged");
                Err(e)
            }
        }
    }

    /// After a resync: removes the mark if `in_sync()` still holds once no new mark can pass
    /// unseen (best effort, logged). `in_sync` is read after every later [`Self::ensure`] has
    /// been made to wait: a write that saw a replica leave service either sees the mark unknown
    /// (and writes it after this clear) or made `in_sync` false (and the mark stays).
    pub async fn clear_if(&self, in_sync: impl Fn() -> bool) {
        let Some(store) = self.store.get() else { return };
        let _one = self.serial.lock().await;
        *self.durable() = None;
        if !in_sync() {
            return;
        }
        match store.clear().await {
            Ok(()) => tracing::info!("lease: both replicas in sync again: mark cleared in the lease store"),
            Err(e) => tracing::warn!(
                "lease: clearing the mark failed: {e}; it stays (a takeover then needs the marked replica)"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::{AtomicBool, AtomicUsize, Ordering},
        time::Duration,
    };

    use super::*;
    use crate::lease::ReplicaUuid;

    /// A store that takes `delay` to make a mark durable, counting calls; `fail` refuses.
    #[derive(Debug, Default)]
    struct Slow {
        marks: AtomicUsize,
        clears: AtomicUsize,
        durable: Mutex<Option<CurrentMark>>,
        fail: AtomicBool,
    }

    impl MarkStore for Slow {
        fn mark(&self, mark: CurrentMark) -> MarkFuture<'_> {
            Box::pin(async move {
                self.marks.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(200)).await;
                if self.fail.load(Ordering::SeqCst) {
                    return Err(LeaseError::EtcdTimeout { op: "mark", timeout: Duration::from_secs(1) });
                }
                *self.durable.lock().unwrap() = Some(mark);
                Ok(())
            })
        }
        fn clear(&self) -> MarkFuture<'_> {
            Box::pin(async move {
                self.clears.fetch_add(1, Ordering::SeqCst);
                *self.durable.lock().unwrap() = None;
                Ok(())
            })
        }
    }

    const S: CurrentMark = CurrentMark::Only(ReplicaUuid([1; 16]));
    const T: CurrentMark = CurrentMark::Only(ReplicaUuid([2; 16]));

    fn line() -> (Arc<DegradedMark>, Arc<Slow>) {
        let m = Arc::new(DegradedMark::default());
        let store = Arc::new(Slow::default());
        m.install(store.clone());
        (m, store)
    }

    /// `n` concurrent "degraded writes": each acknowledges only after `ensure`, and records what
    /// the store durably held at that instant.
    async fn writes(m: &Arc<DegradedMark>, store: &Arc<Slow>, n: usize, want: CurrentMark) -> Vec<bool> {
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let (m, store) = (m.clone(), store.clone());
                tokio::spawn(async move {
                    m.ensure(want).await.ok().map(|()| *store.durable.lock().unwrap() == Some(want))
                })
            })
            .collect();
        let mut acked = Vec::new();
        for t in tasks {
            if let Some(durable) = t.await.unwrap() {
                acked.push(durable);
            }
        }
        acked
    }

    #[tokio::test(start_paused = true)]
    async fn one_mark_per_episode_and_no_write_acknowledged_before_it_is_durable() {
        let (m, store) = line();
        let acked = writes(&m, &store, 16, S).await;
        assert_eq!(acked.len(), 16);
        assert!(acked.iter().all(|d| *d), "a write passed before the mark was durable");
        assert_eq!(store.marks.load(Ordering::SeqCst), 1, "one mark for the episode");
        // Later writes of the episode pass without the store.
        assert_eq!(writes(&m, &store, 4, S).await.len(), 4);
        assert_eq!(store.marks.load(Ordering::SeqCst), 1);
        // Back in sync: cleared; the next episode (the other survivor) marks again.
        m.clear_if(|| true).await;
        assert_eq!((store.clears.load(Ordering::SeqCst), *store.durable.lock().unwrap()), (1, None));
        assert!(writes(&m, &store, 8, T).await.iter().all(|d| *d));
        assert_eq!(store.marks.load(Ordering::SeqCst), 2);
        // A replica left service again before the clear: the mark stays, and the next degraded
        // write writes it again (idempotent) rather than trust what may have changed.
        m.clear_if(|| false).await;
        assert_eq!((store.clears.load(Ordering::SeqCst), *store.durable.lock().unwrap()), (1, Some(T)));
        assert_eq!(writes(&m, &store, 2, T).await.len(), 2);
        assert_eq!(store.marks.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_mark_that_cannot_be_written_fails_every_write_waiting_for_it() {
        let (m, store) = line();
        store.fail.store(true, Ordering::SeqCst);
        assert!(writes(&m, &store, 8, S).await.is_empty(), "no write acknowledged without the mark");
        assert_eq!(*store.durable.lock().unwrap(), None);
        // The store answers again: the next write marks, and passes.
        store.fail.store(false, Ordering::SeqCst);
        assert_eq!(writes(&m, &store, 3, S).await, [true, true, true]);
    }

    #[tokio::test]
    async fn without_a_store_there_is_nothing_to_record() {
        let m = DegradedMark::default();
        m.ensure(S).await.unwrap();
        m.clear_if(|| true).await;
    }
}
