//! The router's side of the lease on the request path: whether it may still acknowledge writes.
//! [`LeaseLine`] holds what the lease keeper last reported (holder, epoch, mode, the end of the
//! safe window) and the fence: once a replica answered `FENCED`, or the tenure ran out, the
//! router is fenced for good. It then acknowledges nothing: every request fails with
//! `ESHUTDOWN` (NBD's "server shutting down": reconnecting clients go elsewhere), and `serve`
//! stops (it waits on [`LeaseLine::fenced_wait`]).
//!
//! A router without a lease (no keeper: `--lease none`, tests of the router alone) has no
//! window: only a replica's `FENCED` answer fences it.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Mutex, OnceLock,
    },
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::lease::{Epoch, Holder, LeaseMode};

/// The lease as `ctl status`, `--json` and the metrics show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseStatus {
    /// `embedded` or `etcd`.
    pub store: String,
    pub mode: LeaseMode,
    pub holder: Holder,
    pub epoch: Epoch,
    pub ttl_ms: u64,
    /// Time this router may still acknowledge writes without another renewal (0 unless active).
    pub time_left_ms: u64,
    /// Why the mode is what it is (the last change).
    pub reason: String,
}

#[derive(Debug, Clone)]
struct Reported {
    status: LeaseStatus,
    /// End of the safe window, when active.
    valid_until: Option<Instant>,
}

/// See the module doc.
#[derive(Debug)]
pub struct LeaseLine {
    reported: Mutex<Option<Reported>>,
    /// The end of the safe window in nanoseconds after `origin` ([`NO_WINDOW`] when there is
    /// none): what every write checks, without the lock.
    window_end: AtomicU64,
    origin: Instant,
    fenced: OnceLock<String>,
    tx: tokio::sync::watch::Sender<bool>,
    /// Writes held at the gate (a planned handover's quiesce): `true` while held. The atomic is
    /// what a write checks; the channel wakes the writes that wait.
    held: AtomicBool,
    held_tx: tokio::sync::watch::Sender<bool>,
    /// Writes past the gate and not yet answered. A write counts itself, then reads `held`; a
    /// quiesce sets `held`, then reads the count (all sequentially consistent): either the write
    /// sees the hold, or the quiesce sees the write and waits for it. No lock on the way.
    in_flight: AtomicU64,
    /// The last write out while held wakes the quiesce.
    drained: tokio::sync::Notify,
    /// Which replica holds every acknowledged write, recorded in the lease store before a write
    /// is acknowledged with one replica only (`volume::mark`; etcd only).
    pub mark: super::mark::DegradedMark,
}

/// A write past the quiesce gate ([`LeaseLine::enter_write`]); dropping it ends it.
#[derive(Debug)]
pub struct WriteTicket<'a>(&'a LeaseLine);

impl Drop for WriteTicket<'_> {
    fn drop(&mut self) {
        self.0.leave_write();
    }
}

impl Default for LeaseLine {
    fn default() -> Self {
        LeaseLine {
            reported: Mutex::new(None),
            window_end: AtomicU64::new(NO_WINDOW),
            origin: Instant::now(),
            fenced: OnceLock::new(),
            tx: tokio::sync::watch::Sender::new(false),
            held: AtomicBool::new(false),
            held_tx: tokio::sync::watch::Sender::new(false),
            in_flight: AtomicU64::new(0),
            drained: tokio::sync::Notify::new(),
            mark: super::mark::DegradedMark::default(),
        }
    }
}

/// `window_end` of a router that is not active (or has no lease): no window to close.
const NO_WINDOW: u64 = u64::MAX;

/// The error every request gets once the router is fenced.
pub fn fenced_error(why: &str) -> std::io::Error {
    let e = std::io::Error::from_raw_os_error(libc::ESHUTDOWN);
    tracing::debug!("request refused, fenced: {why}");
    e
}

impl LeaseLine {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Reported>> {
        self.reported.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The keeper's report: the lease as it stands, and (active) how long writes may be
    /// acknowledged from `now`.
    pub fn report(&self, status: LeaseStatus, time_left: Duration, now: Instant) {
        if self.fenced().is_some() {
            return;
        }
        let valid_until = (status.mode == LeaseMode::Active).then(|| now + time_left);
        if status.mode == LeaseMode::Fenced {
            self.fence(status.reason.clone());
        }
        let end = valid_until.map_or(NO_WINDOW, |t| self.nanos_at(t));
        let mut r = self.lock();
        *r = Some(Reported { status, valid_until });
        self.window_end.store(end, Ordering::Release);
    }

    /// `t` in nanoseconds after `origin` (the window's clock).
    fn nanos_at(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.origin).as_nanos()).unwrap_or(NO_WINDOW - 1)
    }

    /// Fences the router for good, logging why (only the first reason counts).
    pub fn fence(&self, reason: String) {
        if self.fenced.set(reason.clone()).is_ok() {
            tracing::error!(
                epoch = ?self.lock().as_ref().map(|r| r.status.epoch),
                "lease: fenced: {reason}; acknowledging no more writes, stopping"
            );
            if let Some(r) = self.lock().as_mut() {
                r.status.mode = LeaseMode::Fenced;
                r.status.reason = reason;
                r.valid_until = None;
            }
            self.window_end.store(NO_WINDOW, Ordering::Release);
            let _ = self.tx.send(true);
        }
    }

    /// Retires the router after a planned handover: like [`Self::fence`] (nothing more is
    /// acknowledged; requests get `ESHUTDOWN`, so clients reconnect elsewhere), logged as the
    /// planned step it is; then the writes held at the quiesce gate are let go, to be refused.
    pub fn retire(&self, reason: String) {
        if self.fenced.set(reason.clone()).is_ok() {
            tracing::info!("lease: {reason}; acknowledging no more writes");
            if let Some(r) = self.lock().as_mut() {
                r.status.reason = reason;
                r.valid_until = None;
            }
        }
        self.resume();
    }

    /// Why the router is fenced, once it is.
    pub fn fenced(&self) -> Option<&str> {
        self.fenced.get().map(String::as_str)
    }

    /// May a request be acknowledged now? `Err(ESHUTDOWN)` once fenced; a holder whose safe
    /// window closed (the keeper could not renew in time, or this process was paused) is fenced
    /// right here.
    pub fn admit(&self) -> std::io::Result<()> {
        if let Some(why) = self.fenced() {
            return Err(fenced_error(why));
        }
        let end = self.window_end.load(Ordering::Acquire);
        let closed = end != NO_WINDOW && self.nanos_at(Instant::now()) >= end;
        if closed {
            self.fence("the lease's safe window closed before the write could be acknowledged".into());
            return Err(fenced_error("safe window closed"));
        }
        Ok(())
    }

    /// [`Self::enter_write`] without waiting: `None` while a handover holds writes (the fast
    /// path then hands the write to the slow path, which waits).
    pub fn try_enter_write(&self) -> Option<WriteTicket<'_>> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        if self.held.load(Ordering::SeqCst) {
            // Held: back out (the quiesce may be waiting for this count).
            self.leave_write();
            return None;
        }
        Some(WriteTicket(self))
    }

    /// Waits while writes are held (a handover quiesces them), then counts this one in flight
    /// until the ticket drops. A held write is never answered if the handover completes: its
    /// client's connection closes and the client re-issues it to the new router.
    pub async fn enter_write(&self) -> WriteTicket<'_> {
        loop {
            if let Some(ticket) = self.try_enter_write() {
                return ticket;
            }
            let mut rx = self.held_tx.subscribe();
            let _ = rx.wait_for(|h| !*h).await;
        }
    }

    fn leave_write(&self) {
        if self.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 && self.held.load(Ordering::SeqCst) {
            self.drained.notify_waiters();
        }
    }

    /// Holds new writes at the gate and waits for those in flight to be answered.
    pub async fn quiesce(&self) {
        self.held.store(true, Ordering::SeqCst);
        self.held_tx.send_replace(true);
        loop {
            // Registered before the count is read, so the last write's notification is not lost.
            let drained = self.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if self.in_flight.load(Ordering::SeqCst) == 0 {
                return;
            }
            drained.await;
        }
    }

    /// Admits writes again (an aborted handover).
    pub fn resume(&self) {
        self.held.store(false, Ordering::SeqCst);
        self.held_tx.send_replace(false);
    }

    /// Resolves once the router is fenced.
    pub async fn fenced_wait(&self) {
        let mut rx = self.tx.subscribe();
        let _ = rx.wait_for(|f| *f).await;
    }

    /// The lease for status, `None` without one.
    pub fn status(&self) -> Option<LeaseStatus> {
        let r = self.lock().clone()?;
        let mut s = r.status;
        s.time_left_ms =
            r.valid_until.map_or(0, |t| t.saturating_duration_since(Instant::now()).as_millis() as u64);
        Some(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(mode: LeaseMode) -> LeaseStatus {
        LeaseStatus {
            store: "embedded".into(),
            mode,
            holder: Holder("n/1".into()),
            epoch: Epoch(3),
            ttl_ms: 2000,
            time_left_ms: 0,
            reason: "took it".into(),
        }
    }

    #[test]
    fn a_closed_window_or_a_fence_refuses_for_good() {
        let l = LeaseLine::default();
        assert!(l.admit().is_ok() && l.status().is_none(), "no lease: nothing to refuse");
        l.report(status(LeaseMode::Active), Duration::from_secs(5), Instant::now());
        assert!(l.admit().is_ok());
        assert!(l.status().unwrap().time_left_ms > 4000);
        l.report(status(LeaseMode::Active), Duration::ZERO, Instant::now());
        assert_eq!(l.admit().unwrap_err().raw_os_error(), Some(libc::ESHUTDOWN));
        let s = l.status().unwrap();
        assert_eq!((s.mode, s.time_left_ms), (LeaseMode::Fenced, 0));
        assert!(s.reason.contains("safe window"), "{}", s.reason);
        // Fencing is final: a later report of an active lease does not revive it.
        l.report(status(LeaseMode::Active), Duration::from_secs(5), Instant::now());
        assert!(l.admit().is_err() && l.fenced().is_some());
    }

    #[tokio::test]
    async fn a_quiesce_waits_for_the_writes_past_the_gate_and_holds_new_ones() {
        let l = std::sync::Arc::new(LeaseLine::default());
        let first = l.enter_write().await;
        let q = {
            let l = l.clone();
            tokio::spawn(async move { l.quiesce().await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!q.is_finished(), "a write past the gate is waited for");
        let later = {
            let l = l.clone();
            tokio::spawn(async move {
                let _t = l.enter_write().await;
            })
        };
        drop(first);
        tokio::time::timeout(Duration::from_secs(5), q).await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!later.is_finished(), "a write that came while held waits");
        l.resume();
        tokio::time::timeout(Duration::from_secs(5), later).await.unwrap().unwrap();
        assert_eq!(l.in_flight.load(Ordering::SeqCst), 0);
    }
}
