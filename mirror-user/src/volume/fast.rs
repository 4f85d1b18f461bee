//! The fast path's plan: for a frontend that submits file I/O itself (ublk, on its queue's own
//! ring), the volume decides per request which local replicas to drive and hands over a
//! [`FastPlan`]: their descriptors (borrowed from the volume), the inline policy (a read the page
//! cache holds done on the calling thread; a small buffered write done there too; the second
//! replica's write on another thread of the frontend), and the one completion path
//! ([`FastPlan::leg_done`]) that does the accounting. The frontend only submits and reports.
//!
//! The rule the plan encodes is the router's: a read goes to one in-sync replica, a write to
//! every replica of the plan, and the request succeeds only when every leg did. A plan that
//! fails is redone through [`BlockDev`](super::BlockDev)'s methods, which own failure handling
//! (retry a read on the other replica; mark a replica failed and record the range on the
//! survivor before a write is acknowledged), so the fast path never acknowledges a write that is
//! not on every replica of its plan, and never reports an error itself.

use std::{os::fd::RawFd, time::Instant};

use super::{
    activity::Busy,
    fence::{LeaseLine, WriteTicket},
    local::LocalReplica,
    replica::Replica,
};
use crate::storage::EpochGuard;

/// What a request does, for [`BlockDev::fast_path`](super::BlockDev::fast_path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FastOp {
    Read,
    /// A write without FUA (FUA takes the slow path).
    Write,
}

/// One replica of a plan.
#[derive(Debug)]
struct Leg<'a> {
    replica: &'a Replica,
    local: &'a LocalReplica,
    fd: RawFd,
    done: bool,
}

/// The replicas one request drives, and how (see the module doc).
#[derive(Debug)]
pub struct FastPlan<'a> {
    op: FastOp,
    offset: u64,
    len: u32,
    legs: [Option<Leg<'a>>; 2],
    left: u8,
    failed: bool,
    t0: Instant,
    /// A write's extents, busy in the activity log until the plan is dropped (completed).
    busy: Option<Busy<'a>>,
    /// A write under a lease (see [`FastPlan::under_lease`]).
    lease: Option<LeaseHold<'a>>,
}

/// What a write under a lease holds, as the slow path's `mirrored` does: its ticket in the
/// router's write count (a handover waits for it), each local replica's epoch gate (a new
/// epoch's claim waits for it), and the lease line, checked again before the acknowledgement.
#[derive(Debug)]
struct LeaseHold<'a> {
    line: &'a LeaseLine,
    _ticket: WriteTicket<'a>,
    _gates: [Option<EpochGuard>; 2],
}

impl<'a> FastPlan<'a> {
    /// A plan driving `replicas` (at most two: a read names one, a write every replica it must
    /// reach), or `None` when one of them cannot be driven directly (not a local file through
    /// io_uring, out of range, or, for a write, tracking). The volume's counters are updated as
    /// for the slow path.
    pub fn new(
        op: FastOp,
        offset: u64,
        len: u32,
        replicas: [Option<&'a Replica>; 2],
    ) -> Option<FastPlan<'a>> {
        let write = op == FastOp::Write;
        // Every descriptor first (checks), so nothing is counted for a plan that is not made.
        let mut legs: [Option<(&Replica, &LocalReplica)>; 2] = [None, None];
        for (slot, r) in legs.iter_mut().zip(replicas) {
            if let Some(r) = r {
                let local = r.as_local().filter(|l| if write { l.fast_write_ok() } else { l.is_uring() })?;
                *slot = Some((r, local));
            }
        }
        let mut out = [None, None];
        let mut left = 0;
        for (o, l) in out.iter_mut().zip(legs) {
            if let Some((replica, local)) = l {
                let fd = local.fast_fd(write, offset, len)?;
                *o = Some(Leg { replica, local, fd, done: false });
                left += 1;
            }
        }
        (left > 0).then(|| FastPlan {
            op,
            offset,
            len,
            legs: out,
            left,
            failed: false,
            t0: Instant::now(),
            busy: None,
            lease: None,
        })
    }

    /// The plan holds a write's extents busy until it is dropped (see `volume::activity`).
    pub fn holding(mut self, busy: Busy<'a>) -> Self {
        self.busy = Some(busy);
        self
    }

    /// A write of a router holding a lease: takes a write ticket and every leg's epoch gate and
    /// checks the lease, as `mirrored` does before issuing a write; `None` (take the slow path,
    /// which waits or answers fenced) when a handover holds writes, a replica refuses the
    /// epoch or the lease is not safe. [`FastPlan::failed`] checks the lease again once the legs
    /// are in: a plan whose lease lapsed meanwhile is redone through the slow path, which
    /// refuses it, so no write is acknowledged outside the lease's safe window.
    pub fn under_lease(mut self, line: &'a LeaseLine) -> Option<Self> {
        let ticket = line.try_enter_write()?;
        let mut gates = [None, None];
        for (gate, leg) in gates.iter_mut().zip(&self.legs) {
            if let Some(leg) = leg {
                *gate = Some(leg.replica.admit().ok()??);
            }
        }
        line.admit().ok()?;
        self.lease = Some(LeaseHold { line, _ticket: ticket, _gates: gates });
        Some(self)
    }

    pub fn op(&self) -> FastOp {
        self.op
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The legs of the plan (indices for [`FastPlan::fd`], [`FastPlan::try_inline`],
    /// [`FastPlan::leg_done`]).
    pub fn legs(&self) -> impl Iterator<Item = usize> + '_ {
        (0..2).filter(|&i| self.legs[i].is_some())
    }

    /// The descriptor leg `i` submits to, from an `ALIGN`-aligned buffer (the frontend's io
    /// buffer); valid while the volume is.
    pub fn fd(&self, i: usize) -> Option<RawFd> {
        self.legs.get(i)?.as_ref().map(|l| l.fd)
    }

    /// For a write to two buffered files: the leg another thread of the frontend may write with
    /// a plain `pwrite` while the calling thread does the other (see `LocalReplica`'s inline
    /// rules), if the frontend has such a thread.
    pub fn offload(&self) -> Option<usize> {
        if self.op != FastOp::Write {
            return None;
        }
        let [Some(a), Some(b)] = &self.legs else { return None };
        let ok = |l: &Leg<'_>| l.local.fast_write_elsewhere_ok(self.offset, self.len as usize);
        (ok(a) && ok(b)).then_some(1)
    }

    /// Leg `i` done right here when the inline policy allows: a read the page cache holds into
    /// `buf`, or a small buffered write of `buf`. True when the leg is complete (and counted,
    /// as a failure too); false: submit it.
    pub fn try_inline(&mut self, i: usize, buf: &mut [u8]) -> bool {
        let Some(leg) = self.legs.get(i).and_then(Option::as_ref) else { return false };
        let ok = match self.op {
            FastOp::Read => {
                if !leg.local.fast_read_cached(self.offset, buf) {
                    return false;
                }
                true
            }
            FastOp::Write => {
                let attempt = leg.replica.stats.writes.load(std::sync::atomic::Ordering::Relaxed);
                match leg.local.fast_write_inline(self.offset, buf, attempt) {
                    Some(ok) => ok,
                    None => return false,
                }
            }
        };
        self.leg_done(i, ok);
        true
    }

    /// Leg `i` completed (`ok`: all of it transferred): counts it on its replica with its
    /// latency, or as an error. Returns true when every leg of the plan is in; then
    /// [`FastPlan::failed`] says whether the request must be redone through the slow path.
    pub fn leg_done(&mut self, i: usize, ok: bool) -> bool {
        if let Some(leg) = self.legs.get_mut(i).and_then(Option::as_mut) {
            if !leg.done {
                leg.done = true;
                self.left -= 1;
                if ok {
                    leg.replica.count(self.op == FastOp::Write, u64::from(self.len), self.t0);
                } else {
                    leg.replica.stats.errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    self.failed = true;
                }
            }
        }
        self.left == 0
    }

    /// Leg `i` could not be submitted (the frontend's ring refused it): it counts as done, not
    /// against its replica, and the plan as failed. Returns true when every leg is in (the
    /// others submitted must still complete before the request is redone).
    pub fn abandon(&mut self, i: usize) -> bool {
        if let Some(leg) = self.legs.get_mut(i).and_then(Option::as_mut) {
            if !leg.done {
                leg.done = true;
                self.left -= 1;
            }
        }
        self.failed = true;
        self.left == 0
    }

    /// True when every leg is in.
    pub fn complete(&self) -> bool {
        self.left == 0
    }

    /// True when a leg failed (or the plan was failed): redo the request through the slow path.
    pub fn failed(&self) -> bool {
        self.failed || self.lease.as_ref().is_some_and(|l| l.line.admit().is_err())
    }
}
