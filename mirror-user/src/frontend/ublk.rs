//! The ublk frontend: a [`BlockDev`] (the mirrored volume's router) as `/dev/ublkbN`.
//!
//! # Data path
//!
//! Each ublk hardware queue gets one thread (libublk's `run_target`) with its own io_uring,
//! which carries the ublk io commands (FETCH / COMMIT_AND_FETCH). A request takes one of two
//! paths, chosen per request by the volume ([`BlockDev::fast_path`]).
//!
//! **Fast path** (like rublk's loop target): when every replica is a local file driven through
//! io_uring, the volume hands the queue a plan per request (`volume::fast::FastPlan`): a read
//! goes to the replica the router would pick (same `Weights`, same random choice, same in-sync
//! rule), a write without FUA to both when both are in sync, no failure was recorded and neither
//! volume is tracking. The queue only carries the plan out: it submits each leg as an entry on
//! the queue's own ring, straight into (read) or out of (write) the tag's ublk io buffer (page
//! aligned, so aligned requests can use an `O_DIRECT` descriptor): no future, no `Vec`, no copy,
//! no tokio; or it lets the plan do a leg right here where its inline policy allows: a read the
//! page cache holds is one `preadv2(RWF_NOWAIT)` into the io buffer (on tmpfs / ramfs, which
//! refuse `RWF_NOWAIT`, a plain `pread`: their data is in memory), a small page-aligned write to
//! a buffered file one `pwrite` (a buffered write through io_uring is handed to an io-wq worker
//! on tmpfs, which costs more). For a dual write to two buffered files, both `pwrite`s run one
//! after the other on the queue thread, or with `--ublk-parallel-writes` the leg the plan
//! offloads on the queue's writer thread ([`super::ublk_writer`]) meanwhile. Each leg's
//! completion goes back to the plan, which does the accounting (per-replica and volume
//! counters, latency) as on the router path. A write is committed to the kernel only after every
//! leg completed it; any failure or short transfer redoes the whole request through the router
//! path, which retries a read on the other replica and, for a write, marks the failed replica
//! and records the range on the survivor before acknowledging (with the failure's errno when
//! none is left): the fast path never acknowledges a write that is not on every replica, and
//! never reports an error itself.
//!
//! **Router path** (everything else: a remote replica, one not in sync, tracking, FUA, flush,
//! discard, write-zeroes, fast-path failures, `--ublk-no-fast-path`): the request becomes the
//! router's future, polled right away on the queue thread inside the tokio runtime's context
//! (`Handle::enter`: the router uses tokio's timers for read deadlines and write timeouts,
//! `tokio::sync` locks and, for some local paths, the blocking pool). What the page cache
//! answers completes in that first poll. A future that has to wait (a replica's io_uring, a
//! remote replica, a timer) is parked in the tag's slot; its waker pushes the tag to the queue's
//! mailbox and bumps an eventfd, and the queue's ring holds a one-shot `POLL_ADD` on that
//! eventfd, so the queue thread wakes in the same `io_uring_enter` that waits for new commands.
//! This path copies data once between the ublk io buffer and the router's `Vec`.
//!
//! Why this shape: a request handed to the tokio runtime (`Handle::spawn`) pays a cross-thread
//! wakeup and a boxed future each way, so the router path polls on the queue thread instead;
//! libublk's own per-queue executor (smol) is not an option there, the router's futures need
//! tokio's context. The fast path exists because even polled in place the router path costs a
//! future, a `Vec` and a copy per request. Small writes to buffered files stay inline `pwrite`s
//! rather than io_uring entries because the ring hands a buffered write to an io-wq worker; the
//! writer thread is an option, off by default, because the handoff only pays where a core is
//! idle. The figures behind each of these choices (`cargo xtask bench ublk`, against md raid1,
//! rublk and the kernel loop device) are in `docs/benchmarks.md`, section "ublk".
//!
//! # Lifecycle
//!
//! [`UblkFrontend::start`] adds and starts the device (or, with [`UblkOptions::recover`],
//! re-attaches to a quiesced one); [`UblkFrontend::stop`] stops the device (the kernel flushes
//! it through us while the queues still run), waits for the queue threads and deletes it; the
//! caller then flushes both replicas. With [`UblkOptions::user_recovery`] (`UBLK_F_USER_RECOVERY` and
//! `_REISSUE`), a daemon killed with SIGKILL leaves the device quiesced: I/O waits (it is not
//! failed) until `mirror serve ... --ublk-recover N` takes the device over and reissues what
//! was in flight; `mirror ublk del N` removes it instead. Without it, the kernel removes the
//! disk when the daemon dies and fails what was in flight; `mirror ublk del N` frees the id.
//! A write is acknowledged to the kernel only after the router completed it on both replicas,
//! so a killed daemon loses no acknowledged write.

use std::{
    future::Future,
    io::{Read, Write},
    os::fd::FromRawFd,
    path::Path,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, Waker},
    thread::JoinHandle,
};

use io_uring::{opcode, types};
use libublk::{
    ctrl::{UblkCtrl, UblkCtrlBuilder},
    helpers::IoBuf,
    io::{BufDescList, UblkDev, UblkIOCtx, UblkQueue},
    sys, BufDesc, UblkFlags, UblkIORes,
};

use super::ublk_writer::{Job, Writer};
use crate::volume::{
    fast::{FastOp, FastPlan},
    BlockDev,
};

/// Errors of the ublk boundary.
#[derive(Debug, thiserror::Error)]
pub enum UblkError {
    /// The kernel has no ublk driver (or it cannot be loaded).
    #[error(
        "ublk is not available on this kernel ({0}); use the NBD frontend instead \
         (`mirror serve --frontend nbd`, then e.g. `nbd-client` or qemu's nbd: driver)"
    )]
    Unavailable(String),
    /// A request the device cannot honour.
    #[error("invalid ublk setting: {0}")]
    Invalid(String),
    /// The ublk driver (or libublk) refused an operation.
    #[error("ublk {what}: {source}")]
    Driver {
        what: &'static str,
        #[source]
        source: libublk::UblkError,
    },
    /// The device thread ended before the device came up.
    #[error("ublk device did not start: {0}")]
    Start(String),
}

fn driver(what: &'static str) -> impl FnOnce(libublk::UblkError) -> UblkError {
    move |source| UblkError::Driver { what, source }
}

/// Device parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UblkOptions {
    /// Device id (`/dev/ublkbN`), -1 lets the driver pick.
    pub id: i32,
    /// Hardware queues (one thread each).
    pub queues: u16,
    /// Requests in flight per queue.
    pub depth: u16,
    /// Largest request, bytes.
    pub max_io_bytes: u32,
    /// Logical block size (512 or 4096); 0 = 512.
    pub logical_block_size: u32,
    /// Physical block size; 0 = the volume's block size.
    pub physical_block_size: u32,
    /// Advertise discard / write-zeroes.
    pub discard: bool,
    /// Advertise a volatile write cache (the kernel sends FLUSH and FUA).
    pub flush: bool,
    /// UBLK_F_USER_RECOVERY(+REISSUE): survive a daemon crash with I/O held.
    pub user_recovery: bool,
    /// Re-attach to the quiesced device `id` instead of adding one.
    pub recover: bool,
    /// Submit local replicas' file I/O on the queue's own ring when the volume allows (the fast
    /// path, see the module doc); off: every request goes through the router's futures.
    pub fast_path: bool,
    /// On the fast path, a dual write to two buffered files runs the second replica's `pwrite`
    /// on the queue's writer thread while the queue thread does the first (off, the default:
    /// one after the other on the queue thread; in the VM under TCG on two host cores, where
    /// the CPU is the limit, the handoff cost more than the overlap gained).
    pub parallel_writes: bool,
}

impl Default for UblkOptions {
    fn default() -> Self {
        UblkOptions {
            id: -1,
            queues: 1,
            depth: 128,
            max_io_bytes: 512 << 10,
            logical_block_size: 512,
            physical_block_size: 0,
            discard: true,
            flush: true,
            user_recovery: false,
            recover: false,
            fast_path: true,
            parallel_writes: false,
        }
    }
}

/// `mirror serve` flags for the ublk frontend.
#[derive(Debug, Clone, clap::Args)]
pub struct UblkArgs {
    /// ublk device id (-1: the driver picks).
    #[arg(long = "ublk-id", default_value_t = -1, allow_negative_numbers = true)]
    pub id: i32,
    /// ublk hardware queues (one io thread each).
    #[arg(long = "ublk-queues", default_value_t = 1)]
    pub queues: u16,
    /// ublk queue depth.
    #[arg(long = "ublk-depth", default_value_t = 128)]
    pub depth: u16,
    /// Logical block size of /dev/ublkbN (512 or 4096).
    #[arg(long = "ublk-logical-bs", default_value_t = 512)]
    pub logical_bs: u32,
    /// Physical block size (default: the volume's block size).
    #[arg(long = "ublk-physical-bs")]
    pub physical_bs: Option<u32>,
    /// Do not advertise discard / write-zeroes.
    #[arg(long = "ublk-no-discard")]
    pub no_discard: bool,
    /// Do not advertise a volatile cache (no FLUSH / FUA from the kernel).
    #[arg(long = "ublk-no-flush")]
    pub no_flush: bool,
    /// Keep the device (I/O held, not failed) if the daemon dies, for `--ublk-recover`.
    #[arg(long = "ublk-recovery")]
    pub recovery: bool,
    /// Take over the quiesced ublk device N left by a killed daemon (same volume).
    #[arg(long = "ublk-recover", conflicts_with = "id")]
    pub recover: Option<i32>,
    /// Send every request through the router's futures (no fast path on the queue's ring).
    #[arg(long = "ublk-no-fast-path")]
    pub no_fast_path: bool,
    /// Write the second replica's buffered fast-path writes on a writer thread per queue, at
    /// the same time as the first (default: one after the other on the queue thread). For
    /// hosts with idle cores; where the CPU is the limit it costs more than it gains.
    #[arg(long = "ublk-parallel-writes")]
    pub parallel_writes: bool,
}

impl UblkArgs {
    pub fn options(&self) -> UblkOptions {
        UblkOptions {
            id: self.recover.unwrap_or(self.id),
            queues: self.queues,
            depth: self.depth,
            logical_block_size: self.logical_bs,
            physical_block_size: self.physical_bs.unwrap_or(0),
            discard: !self.no_discard,
            flush: !self.no_flush,
            user_recovery: self.recovery || self.recover.is_some(),
            recover: self.recover.is_some(),
            fast_path: !self.no_fast_path,
            parallel_writes: self.parallel_writes,
            ..Default::default()
        }
    }
}

const CONTROL: &str = "/dev/ublk-control";

/// Checks that the ublk driver answers, loading `ublk_drv` when the control device is missing.
pub fn check_available() -> Result<(), UblkError> {
    if !Path::new(CONTROL).exists() {
        let modprobe = std::process::Command::new("modprobe")
            .arg("ublk_drv")
            .stderr(std::process::Stdio::null())
            .status();
        if !Path::new(CONTROL).exists() {
            let why = match modprobe {
                Ok(s) if s.success() => format!("{CONTROL} missing after `modprobe ublk_drv`"),
                Ok(_) => format!("no {CONTROL} and `modprobe ublk_drv` failed"),
                Err(e) => format!("no {CONTROL} and modprobe could not run: {e}"),
            };
            return Err(UblkError::Unavailable(why));
        }
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(CONTROL)
        .map(drop)
        .map_err(|e| UblkError::Unavailable(format!("open {CONTROL}: {e}")))
}

/// Items for a queue thread from other threads, with an eventfd its ring polls: requests of the
/// queue that are waiting for something (a replica's io_uring, a timer, a lock), whose wakers
/// push the tag here, and the writer thread's results (`ublk_writer`); the queue thread takes
/// them when the eventfd fires.
#[derive(Debug)]
pub(super) struct Mailbox<T> {
    ready: Mutex<Vec<T>>,
    efd: std::fs::File,
}

impl<T> Mailbox<T> {
    pub(super) fn new() -> std::io::Result<Mailbox<T>> {
        // SAFETY: eventfd(2) takes no pointers; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor we own; the File takes sole ownership.
        let efd = unsafe { std::fs::File::from_raw_fd(fd) };
        Ok(Mailbox { ready: Mutex::new(Vec::new()), efd })
    }

    /// The eventfd that counts posts (poll it for `POLLIN`).
    pub(super) fn efd(&self) -> &std::fs::File {
        &self.efd
    }

    pub(super) fn post(&self, item: T) {
        let was_empty = {
            let mut q = self.ready.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            q.push(item);
            q.len() == 1
        };
        // A non-empty mailbox has a wakeup pending already (the queue thread reads the eventfd
        // before it takes the mailbox).
        if was_empty {
            let _ = (&self.efd).write(&1u64.to_ne_bytes());
        }
    }

    /// What was posted since the last call.
    pub(super) fn take(&self) -> Vec<T> {
        let mut buf = [0u8; 8];
        let _ = (&self.efd).read(&mut buf);
        std::mem::take(&mut *self.ready.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }
}

/// Wakes request `tag` of a queue.
struct TagWaker {
    tag: u16,
    mb: Arc<Mailbox<u16>>,
}

impl std::task::Wake for TagWaker {
    fn wake(self: Arc<Self>) {
        self.mb.post(self.tag);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.mb.post(self.tag);
    }
}

/// A request in progress: its result and, for reads, the data.
type Pending = Pin<Box<dyn Future<Output = (i32, Option<Vec<u8>>)>>>;

/// Marks the eventfd poll's CQE (an op number no ublk request uses).
const POLL_OP: u32 = 0xfe;

fn errno(e: &std::io::Error) -> i32 {
    -e.raw_os_error().filter(|&n| n > 0).unwrap_or(libc::EIO)
}

fn arm_poll(q: &UblkQueue, efd: &std::fs::File, op: u32) {
    use std::os::fd::AsRawFd;
    let data = UblkIOCtx::build_user_data(0, op, 0, true);
    let sqe = opcode::PollAdd::new(types::Fd(efd.as_raw_fd()), libc::POLLIN as u32).build().user_data(data);
    if let Err(e) = q.ublk_submit_sqe_sync(sqe) {
        tracing::error!("ublk: arming the completion eventfd failed: {e}");
    }
}

/// The router call for one request, or the errno to fail it with at once.
fn request<D: BlockDev>(dev: &Arc<D>, iod: &sys::ublksrv_io_desc, buf: &[u8]) -> Result<Pending, i32> {
    let op = iod.op_flags & 0xff;
    let off = iod.start_sector.wrapping_shl(9);
    let len = u64::from(iod.nr_sectors) << 9;
    let fua = iod.op_flags & sys::UBLK_IO_F_FUA != 0;
    // A flush carries no range (its start sector is all ones).
    let in_range = iod
        .start_sector
        .checked_mul(512)
        .and_then(|o| o.checked_add(len))
        .is_some_and(|end| end <= dev.size());
    if op != sys::UBLK_IO_OP_FLUSH && !in_range {
        return Err(-libc::EINVAL);
    }
    let bytes = len as u32; // reads and writes are at most max_io_bytes
    let dev = dev.clone();
    let done = |r: std::io::Result<()>, ok: i32| (r.map_or_else(|e| errno(&e), |()| ok), None);
    Ok(match op {
        sys::UBLK_IO_OP_READ => Box::pin(async move {
            match dev.read(off, bytes).await {
                Ok(v) if v.len() == bytes as usize => (bytes as i32, Some(v)),
                Ok(_) => (-libc::EIO, None),
                Err(e) => (errno(&e), None),
            }
        }),
        sys::UBLK_IO_OP_WRITE => {
            let data = buf.get(..bytes as usize).ok_or(-libc::EINVAL)?.to_vec();
            Box::pin(async move { done(dev.write(off, data, fua).await, bytes as i32) })
        }
        sys::UBLK_IO_OP_FLUSH => Box::pin(async move { done(dev.flush().await, 0) }),
        sys::UBLK_IO_OP_DISCARD => Box::pin(async move { done(dev.trim(off, len).await, 0) }),
        sys::UBLK_IO_OP_WRITE_ZEROES => Box::pin(async move { done(dev.write_zeroes(off, len).await, 0) }),
        _ => return Err(-libc::EOPNOTSUPP),
    })
}

fn complete(q: &UblkQueue, tag: u16, buf: &[u8], res: i32) {
    if res < 0 {
        let iod = q.get_iod(tag);
        tracing::debug!(
            tag,
            op = iod.op_flags & 0xff,
            sector = iod.start_sector,
            sectors = iod.nr_sectors,
            "ublk: request failed: errno {}",
            -res
        );
    }
    if let Err(e) = q.complete_io_cmd_unified(tag, BufDesc::Slice(buf), Ok(UblkIORes::Result(res))) {
        tracing::error!(tag, "ublk: committing a result failed: {e}");
    }
}

/// Polls request `tag` of a queue; completes it when done.
fn drive(q: &UblkQueue, tag: u16, pending: &mut [Option<Pending>], bufs: &mut [IoBuf<u8>], wakers: &[Waker]) {
    let t = tag as usize;
    let (Some(slot), Some(buf), Some(waker)) = (pending.get_mut(t), bufs.get_mut(t), wakers.get(t)) else {
        return;
    };
    let Some(fut) = slot.as_mut() else { return };
    if let Poll::Ready((res, data)) = fut.as_mut().poll(&mut Context::from_waker(waker)) {
        *slot = None;
        if let Some(d) = &data {
            buf.as_mut_slice()[..d.len()].copy_from_slice(d);
        }
        complete(q, tag, buf.as_slice(), res);
    }
}

/// Marks the fast path's file reads and writes (tgt_data: the replica).
const FAST_READ_OP: u32 = 0xf0;
const FAST_WRITE_OP: u32 = 0xf1;
/// Marks the poll of the writer thread's eventfd.
const WRITER_OP: u32 = 0xf2;

/// Starts request `tag` on the fast path: the volume's plan ([`BlockDev::fast_path`]) carried
/// out as entries on the queue's ring, straight into (read) or out of (write) the tag's io
/// buffer, or right here where the plan's inline policy allows. `None` when the volume says no
/// (a remote replica, one not in sync, tracking, ...) or the request is not a plain read or
/// write without FUA: then the router path takes it.
fn fast_submit<'d, D: BlockDev>(
    q: &UblkQueue,
    tag: u16,
    dev: &'d D,
    iod: &sys::ublksrv_io_desc,
    buf: &mut IoBuf<u8>,
    writer: Option<&Writer>,
) -> Option<FastPlan<'d>> {
    let op = match iod.op_flags & 0xff {
        sys::UBLK_IO_OP_READ => FastOp::Read,
        sys::UBLK_IO_OP_WRITE if iod.op_flags & sys::UBLK_IO_F_FUA == 0 => FastOp::Write,
        _ => return None,
    };
    let off = iod.start_sector.checked_mul(512)?;
    let len = iod.nr_sectors.checked_mul(512)?;
    if len == 0 || len as usize > buf.len() || off.checked_add(u64::from(len))? > dev.size() {
        return None;
    }
    let mut plan = dev.fast_path(op, off, len)?;
    // From here on nothing returns `None`: what was submitted must complete before the router
    // may take the request (and the tag's buffer) over.
    // A dual write of two buffered files: one leg goes to the queue's writer thread first, then
    // the queue thread writes the other meanwhile.
    let offloaded = writer.zip(plan.offload()).and_then(|(w, i)| {
        let fd = plan.fd(i)?;
        w.submit(Job { tag, fd, ptr: buf.as_mut_ptr().cast_const(), len: len as usize, offset: off });
        Some(i)
    });
    let legs = [0, 1].map(|i| plan.fd(i).is_some() && Some(i) != offloaded);
    for i in (0..2).filter(|&i| legs[i]) {
        let data = buf.as_mut_slice().get_mut(..len as usize).unwrap_or_default();
        // A page-cache hit, or a small page-aligned write to a buffered file: right here (what
        // the page cache answers at once); a handoff to io_uring's workers costs more.
        if plan.try_inline(i, data) {
            continue;
        }
        let Some(fd) = plan.fd(i) else { continue };
        let (fd, ptr) = (types::Fd(fd), buf.as_mut_ptr());
        let (ring_op, sqe) = match op {
            FastOp::Write => {
                (FAST_WRITE_OP, opcode::Write::new(fd, ptr.cast_const(), len).offset(off).build())
            }
            FastOp::Read => (FAST_READ_OP, opcode::Read::new(fd, ptr, len).offset(off).build()),
        };
        // The entry points into the tag's io buffer, which the kernel does not touch while the
        // tag is ours (between its FETCH completion and our COMMIT, which waits for this entry's
        // completion) and which outlives the ring (see `queue_main`).
        let sqe = sqe.user_data(UblkIOCtx::build_user_data(tag, ring_op, i as u32, true));
        if let Err(e) = q.ublk_submit_sqe_sync(sqe) {
            // (Only when flushing a full submission queue fails.) The request is marked failed
            // and redone through the router once what was submitted completed.
            tracing::error!(tag, "ublk: submitting a file request failed: {e}");
            for j in (i..2).filter(|&j| legs[j]) {
                plan.abandon(j);
            }
            break;
        }
    }
    Some(plan)
}

/// A fast-path request whose file I/O is all done: committed, or (failed) redone through the
/// router, which retries a read on the other replica and handles a failed write (replica marked
/// failed, the range recorded on the survivor) before anything is acknowledged. The io buffer
/// still holds the write's data: the kernel only takes the tag back at our commit.
fn fast_finish<'d, D: BlockDev>(
    q: &UblkQueue,
    tag: u16,
    plan: FastPlan<'d>,
    dev: &'d Arc<D>,
    st: &mut QueueState<'d>,
) {
    if plan.failed() {
        tracing::debug!(tag, op = ?plan.op(), "ublk: fast-path request failed; redoing it through the router");
        start(q, tag, dev, st, false);
    } else if let Some(buf) = st.bufs.get(tag as usize) {
        complete(q, tag, buf.as_slice(), plan.len() as i32);
    }
}

/// Starts request `tag`: on the fast path when the volume allows, else as the router's future.
fn start<'d, D: BlockDev>(q: &UblkQueue, tag: u16, dev: &'d Arc<D>, st: &mut QueueState<'d>, fast_ok: bool) {
    let t = tag as usize;
    let iod = *q.get_iod(tag);
    let Some(buf) = st.bufs.get_mut(t) else { return };
    if fast_ok {
        if let Some(plan) = fast_submit(q, tag, &**dev, &iod, buf, st.writer.as_ref()) {
            if plan.complete() {
                fast_finish(q, tag, plan, dev, st);
            } else {
                st.fast[t] = Some(plan);
                st.fast_in_flight += 1;
            }
            return;
        }
    }
    // The first poll runs right here: a request the page cache answers (a cached read, a small
    // buffered write) completes without leaving this thread.
    match request(dev, &iod, buf.as_slice()) {
        Ok(fut) => {
            st.pending[t] = Some(fut);
            drive(q, tag, &mut st.pending, &mut st.bufs, &st.wakers);
        }
        Err(res) => complete(q, tag, buf.as_slice(), res),
    }
}

/// One completion of a fast-path leg of `tag` (replica `i`): `ok` when all of it transferred.
fn fast_complete<'d, D: BlockDev>(
    q: &UblkQueue,
    tag: u16,
    i: usize,
    ok: bool,
    dev: &'d Arc<D>,
    st: &mut QueueState<'d>,
) {
    let t = tag as usize;
    let Some(plan) = st.fast.get_mut(t).and_then(|f| f.as_mut()) else { return };
    if !plan.leg_done(i, ok) {
        return;
    }
    let Some(plan) = st.fast[t].take() else { return };
    st.fast_in_flight -= 1;
    fast_finish(q, tag, plan, dev, st);
}

/// Per-queue state of the io loop; the fast path's plans borrow the volume (`'d`).
struct QueueState<'d> {
    bufs: Vec<IoBuf<u8>>,
    pending: Vec<Option<Pending>>,
    wakers: Vec<Waker>,
    fast: Vec<Option<FastPlan<'d>>>,
    fast_in_flight: usize,
    /// The second replica's buffered writes (see `ublk_writer`), when on.
    writer: Option<Writer>,
}

/// The io loop of one queue thread.
fn queue_main<D: BlockDev>(
    qid: u16,
    udev: &UblkDev,
    dev: Arc<D>,
    rt: tokio::runtime::Handle,
    fast_path: bool,
    parallel_writes: bool,
) {
    // The router's futures use tokio's timers and blocking pool: they need the runtime's context.
    let _rt = rt.enter();
    // The fast path's plans borrow the volume for as long as the queue runs.
    let dev = &dev;
    let mb = match Mailbox::new() {
        Ok(m) => Arc::new(m),
        Err(e) => {
            tracing::error!(qid, "ublk: eventfd: {e}");
            return;
        }
    };
    let bufs = udev.alloc_queue_io_bufs();
    let n = bufs.len();
    let wakers: Vec<Waker> =
        (0..n as u16).map(|tag| Waker::from(Arc::new(TagWaker { tag, mb: mb.clone() }))).collect();
    let mut st = QueueState {
        bufs,
        pending: (0..n).map(|_| None).collect(),
        wakers,
        fast: (0..n).map(|_| None).collect(),
        fast_in_flight: 0,
        writer: None,
    };
    if fast_path && parallel_writes {
        match Writer::start(qid) {
            Ok(w) => st.writer = Some(w),
            Err(e) => tracing::warn!(qid, "ublk: no writer thread ({e}): dual writes one after the other"),
        }
    }
    let q = match UblkQueue::new(qid, udev)
        .and_then(|q| q.submit_fetch_commands_unified(BufDescList::Slices(Some(&st.bufs))))
    {
        Ok(q) => q,
        Err(e) => {
            tracing::error!(qid, "ublk: queue setup failed: {e}");
            return;
        }
    };
    arm_poll(&q, mb.efd(), POLL_OP);
    if let Some(w) = &st.writer {
        arm_poll(&q, w.efd(), WRITER_OP);
    }
    let handler = |q: &UblkQueue, tag: u16, ctx: &UblkIOCtx| {
        if ctx.is_tgt_io() {
            let data = ctx.user_data();
            match UblkIOCtx::user_data_to_op(data) {
                POLL_OP => {
                    arm_poll(q, mb.efd(), POLL_OP);
                    for tag in mb.take() {
                        drive(q, tag, &mut st.pending, &mut st.bufs, &st.wakers);
                    }
                }
                FAST_READ_OP | FAST_WRITE_OP => {
                    let i = ((data >> 24) & 0xffff) as usize;
                    let res = ctx.result();
                    let whole = st
                        .fast
                        .get(tag as usize)
                        .and_then(|f| f.as_ref())
                        .map(super::super::volume::fast::FastPlan::len);
                    let ok = res >= 0 && whole == Some(res as u32);
                    fast_complete(q, tag, i, ok, dev, &mut st);
                }
                WRITER_OP => {
                    let done = st.writer.as_ref().map(|w| {
                        arm_poll(q, w.efd(), WRITER_OP);
                        w.take_done()
                    });
                    for (tag, ok) in done.unwrap_or_default() {
                        // The leg the plan offloaded (the same on every call).
                        let leg = st
                            .fast
                            .get(tag as usize)
                            .and_then(|f| f.as_ref())
                            .and_then(super::super::volume::fast::FastPlan::offload);
                        fast_complete(q, tag, leg.unwrap_or(1), ok, dev, &mut st);
                    }
                }
                _ => {}
            }
            return;
        }
        start(q, tag, dev, &mut st, fast_path);
    };
    q.wait_and_handle_io(handler);
    // What the writer thread was handed is written before the buffers can go.
    if let Some(w) = st.writer.take() {
        w.stop();
    }
    if st.fast_in_flight > 0 {
        // The queue stopped with file requests still pointing into io buffers: the kernel may
        // write into them after this returns, so they are leaked rather than freed.
        tracing::warn!(qid, in_flight = st.fast_in_flight, "ublk: queue stopped with file I/O in flight");
        std::mem::forget(st.bufs);
    }
}

fn shift(v: u32, what: &str) -> Result<u8, UblkError> {
    if !v.is_power_of_two() || !(512..=65536).contains(&v) {
        return Err(UblkError::Invalid(format!("{what} {v}: a power of two in 512..=65536")));
    }
    Ok(v.trailing_zeros() as u8)
}

fn params(o: &UblkOptions, size: u64, vol_bs: u32, max_io: u32) -> Result<sys::ublk_params, UblkError> {
    let lbs = if o.logical_block_size == 0 { 512 } else { o.logical_block_size };
    let pbs = if o.physical_block_size == 0 { vol_bs.max(lbs) } else { o.physical_block_size };
    let (lshift, pshift) = (shift(lbs, "logical block size")?, shift(pbs, "physical block size")?);
    if pbs < lbs {
        return Err(UblkError::Invalid(format!("physical block size {pbs} < logical {lbs}")));
    }
    if !size.is_multiple_of(u64::from(lbs)) {
        return Err(UblkError::Invalid(format!("volume size {size} is not a multiple of {lbs}")));
    }
    let mut attrs = 0;
    if o.flush {
        attrs |= sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA;
    }
    let mut p = sys::ublk_params {
        types: sys::UBLK_PARAM_TYPE_BASIC,
        basic: sys::ublk_param_basic {
            attrs,
            logical_bs_shift: lshift,
            physical_bs_shift: pshift,
            io_opt_shift: pshift,
            io_min_shift: lshift,
            max_sectors: max_io >> 9,
            dev_sectors: size >> 9,
            ..Default::default()
        },
        ..Default::default()
    };
    if o.discard {
        p.types |= sys::UBLK_PARAM_TYPE_DISCARD;
        p.discard = sys::ublk_param_discard {
            discard_granularity: pbs,
            max_discard_sectors: u32::MAX >> 9,
            max_write_zeroes_sectors: u32::MAX >> 9,
            max_discard_segments: 1,
            ..Default::default()
        };
    }
    Ok(p)
}

/// A running ublk device.
pub struct UblkFrontend {
    thread: Option<JoinHandle<Result<(), UblkError>>>,
    id: u32,
}

impl std::fmt::Debug for UblkFrontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UblkFrontend").field("id", &self.id).finish_non_exhaustive()
    }
}

impl UblkFrontend {
    /// Adds and starts (or recovers) the device; returns once `/dev/ublkbN` serves I/O. Must be
    /// called from inside the tokio runtime the router runs on.
    pub fn start<D: BlockDev>(dev: Arc<D>, o: &UblkOptions) -> Result<UblkFrontend, UblkError> {
        check_available()?;
        let rt = tokio::runtime::Handle::current();
        let (mut queues, mut depth) = (o.queues, o.depth);
        if queues == 0 || depth == 0 {
            return Err(UblkError::Invalid("queues and depth must be at least 1".into()));
        }
        let recovery = u64::from(sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE);
        if o.recover && o.id < 0 {
            return Err(UblkError::Invalid("recovering needs the device id".into()));
        }
        let p = params(o, dev.size(), dev.block_size(), o.max_io_bytes)?;
        let size = dev.size();
        let o2 = o.clone();
        // libublk's control ring is per thread: the device is added, run and deleted on its own
        // thread; `stop` opens its own handle.
        let (up_tx, up_rx) = std::sync::mpsc::channel::<Result<(u32, u16, u16), UblkError>>();
        let thread = std::thread::Builder::new()
            .name("ublk".into())
            .spawn(move || {
                let o = o2;
                let fail = |tx: &std::sync::mpsc::Sender<_>, e: UblkError| {
                    let _ = tx.send(Err(e));
                    Ok(())
                };
                let (ctrl_flags, dev_flags) = if o.recover {
                    let old = match UblkCtrl::new_simple(o.id) {
                        Ok(c) => c,
                        Err(e) => return fail(&up_tx, driver("opening the device to recover")(e)),
                    };
                    let info = old.dev_info();
                    if u32::from(info.state) != sys::UBLK_S_DEV_QUIESCED {
                        let e = UblkError::Invalid(format!(
                            "ublk device {} is not quiesced (state {}): nothing to recover",
                            o.id, info.state
                        ));
                        return fail(&up_tx, e);
                    }
                    (queues, depth) = (info.nr_hw_queues, info.queue_depth);
                    if let Err(e) = old.start_user_recover() {
                        return fail(&up_tx, driver("starting the recovery")(e));
                    }
                    (recovery, UblkFlags::UBLK_DEV_F_RECOVER_DEV)
                } else {
                    (if o.user_recovery { recovery } else { 0 }, UblkFlags::UBLK_DEV_F_ADD_DEV)
                };
                let ctrl = match UblkCtrlBuilder::default()
                    .name("mirror")
                    .id(o.id)
                    .nr_queues(queues)
                    .depth(depth)
                    .io_buf_bytes(o.max_io_bytes)
                    .ctrl_flags(ctrl_flags)
                    .dev_flags(dev_flags)
                    .build()
                {
                    Ok(c) => c,
                    Err(e) => return fail(&up_tx, driver("adding the device")(e)),
                };
                let id = ctrl.dev_info().dev_id;
                let tgt_init = move |udev: &mut UblkDev| {
                    udev.tgt.dev_size = size;
                    udev.tgt.params = p;
                    // Per tag: its ublk command and up to two fast-path file requests (a write
                    // to both replicas); one more for the completion eventfd's poll.
                    let d = udev.tgt.sq_depth;
                    udev.tgt.sq_depth = d.saturating_mul(3).saturating_add(1);
                    udev.tgt.cq_depth = d.saturating_mul(3).saturating_add(1);
                    Ok(())
                };
                let (fast_path, parallel) = (o.fast_path, o.parallel_writes);
                let q_fn =
                    move |qid: u16, udev: &UblkDev| queue_main(qid, udev, dev, rt, fast_path, parallel);
                let tx = up_tx.clone();
                let up = move |_: &UblkCtrl| {
                    let _ = tx.send(Ok((id, queues, depth)));
                };
                let r = ctrl.run_target(tgt_init, q_fn, up).map(drop).map_err(driver("running the device"));
                // Stopped (by `stop`): remove the device; a recovered one is not removed on drop.
                let _ = ctrl.del_dev();
                if let Err(e) = r {
                    let _ = up_tx.send(Err(e));
                }
                Ok(())
            })
            .map_err(|e| UblkError::Start(format!("spawning the device thread: {e}")))?;
        let (id, queues, depth) = match up_rx.recv() {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let why = match thread.join() {
                    Err(_) => "the device thread panicked",
                    Ok(_) => "the device thread ended",
                };
                return Err(UblkError::Start(why.into()));
            }
        };
        let fe = UblkFrontend { thread: Some(thread), id };
        tracing::info!(
            id,
            queues,
            depth,
            recovery = o.user_recovery,
            recovered = o.recover,
            "ublk device up: {}",
            fe.bdev_path()
        );
        Ok(fe)
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn bdev_path(&self) -> String {
        format!("/dev/ublkb{}", self.id)
    }

    /// Stops the device (the kernel writes back and flushes through the still-running queues),
    /// waits for the queue threads, and deletes the device. Blocking: call it off the runtime's
    /// worker threads (e.g. `spawn_blocking`).
    pub fn stop(mut self) -> Result<(), UblkError> {
        let stopped = UblkCtrl::new_simple(self.id as i32)
            .and_then(|c| c.kill_dev())
            .map(drop)
            .map_err(driver("stopping the device"));
        let joined = match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(UblkError::Start("the device thread panicked".into())),
            None => Ok(()),
        };
        stopped.and(joined)
    }
}

/// For `mirror serve --frontend ublk|auto`: `Some((required, options))` starts the device and
/// prints `ublk device /dev/ublkbN` on stdout. Without ublk, `auto` logs a warning and serves NBD
/// only; `ublk` fails with [`UblkError::Unavailable`], which names the NBD frontend.
pub fn start_for_serve<D: BlockDev>(
    dev: Arc<D>,
    want: Option<(bool, UblkOptions)>,
) -> Result<Option<UblkFrontend>, UblkError> {
    let Some((required, o)) = want else { return Ok(None) };
    match UblkFrontend::start(dev, &o) {
        Ok(fe) => {
            let mut out = std::io::stdout();
            let _ = writeln!(out, "ublk device {}", fe.bdev_path());
            let _ = out.flush();
            Ok(Some(fe))
        }
        Err(e @ UblkError::Unavailable(_)) if !required => {
            tracing::warn!("{e}; serving NBD only");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Stops and deletes the device of [`start_for_serve`], if any (before the final flush).
pub async fn stop_for_serve(fe: Option<UblkFrontend>) {
    let Some(fe) = fe else { return };
    let path = fe.bdev_path();
    match tokio::task::spawn_blocking(move || fe.stop()).await {
        Ok(Ok(())) => tracing::info!("{path} stopped and deleted"),
        Ok(Err(e)) => tracing::error!("{path}: {e}"),
        Err(e) => tracing::error!("{path}: stopping panicked: {e}"),
    }
}

/// A ublk device's state, as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DevState {
    /// Served: its daemon answers I/O.
    Live,
    /// Its daemon is gone and it waits for one to recover it (I/O is held).
    Quiesced,
    /// Its daemon is gone; I/O fails until it is deleted.
    Dead,
    /// A state this build does not know.
    Unknown,
}

impl DevState {
    pub fn as_str(self) -> &'static str {
        match self {
            DevState::Live => "live",
            DevState::Quiesced => "quiesced",
            DevState::Dead => "dead",
            DevState::Unknown => "unknown",
        }
    }
}

/// One ublk device of the kernel (`mirror ublk list`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UblkDevice {
    pub id: u32,
    /// `/dev/ublkbN`.
    pub block_device: String,
    /// What its control device says; why it could not be read otherwise.
    #[serde(flatten)]
    pub info: DevInfo,
}

/// What the control device of a ublk device says about it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum DevInfo {
    Read {
        state: DevState,
        queues: u16,
        depth: u16,
        /// The daemon serving it (or that last did).
        pid: i32,
    },
    Unreadable {
        error: String,
    },
}

impl std::fmt::Display for UblkDevice {
    /// The line `mirror ublk list` prints: id, state, queues, depth, block device.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.info {
            DevInfo::Read { state, queues, depth, pid } => write!(
                f,
                "{}\t{}\tqueues={queues} depth={depth} pid={pid}\t{}",
                self.id,
                state.as_str(),
                self.block_device
            ),
            DevInfo::Unreadable { error } => write!(f, "{}\t?\t{error}", self.id),
        }
    }
}

/// The kernel's ublk devices.
pub fn list() -> Result<Vec<UblkDevice>, UblkError> {
    check_available()?;
    let out = Arc::new(Mutex::new(Vec::new()));
    let o = out.clone();
    UblkCtrl::for_each_dev_id(move |id| {
        let info = match UblkCtrl::new_simple(id as i32) {
            Ok(c) => {
                let i = c.dev_info();
                let state = match u32::from(i.state) {
                    sys::UBLK_S_DEV_LIVE => DevState::Live,
                    sys::UBLK_S_DEV_QUIESCED => DevState::Quiesced,
                    sys::UBLK_S_DEV_DEAD => DevState::Dead,
                    _ => DevState::Unknown,
                };
                DevInfo::Read { state, queues: i.nr_hw_queues, depth: i.queue_depth, pid: i.ublksrv_pid }
            }
            Err(e) => DevInfo::Unreadable { error: e.to_string() },
        };
        let dev = UblkDevice { id, block_device: format!("/dev/ublkb{id}"), info };
        o.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(dev);
    });
    let v = std::mem::take(&mut *out.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    Ok(v)
}

/// Deletes ublk device `id` (a dead or quiesced one left by a killed daemon, or a live one,
/// whose I/O then fails).
pub fn delete(id: i32) -> Result<(), UblkError> {
    check_available()?;
    let c = UblkCtrl::new_simple(id).map_err(driver("opening the device"))?;
    c.kill_dev().map_err(driver("stopping the device"))?;
    c.del_dev().map(drop).map_err(driver("deleting the device"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listed_device_prints_its_line_and_its_json() {
        let live = UblkDevice {
            id: 3,
            block_device: "/dev/ublkb3".into(),
            info: DevInfo::Read { state: DevState::Quiesced, queues: 2, depth: 128, pid: 4242 },
        };
        assert_eq!(live.to_string(), "3\tquiesced\tqueues=2 depth=128 pid=4242\t/dev/ublkb3");
        assert_eq!(
            serde_json::to_value(&live).unwrap(),
            serde_json::json!({"id": 3, "block_device": "/dev/ublkb3", "state": "quiesced", "queues": 2,
                               "depth": 128, "pid": 4242})
        );
        let bad = UblkDevice {
            id: 4,
            block_device: "/dev/ublkb4".into(),
            info: DevInfo::Unreadable { error: "EACCES".into() },
        };
        assert_eq!(bad.to_string(), "4\t?\tEACCES");
        let v = serde_json::to_value(&bad).unwrap();
        assert_eq!(v, serde_json::json!({"id": 4, "block_device": "/dev/ublkb4", "error": "EACCES"}));
        for d in [live, bad] {
            let back: UblkDevice = serde_json::from_str(&serde_json::to_string(&d).unwrap()).unwrap();
            assert_eq!(back, d);
        }
    }

    #[test]
    fn params_follow_the_volume_and_the_options() {
        let o = UblkOptions::default();
        let p = params(&o, 1 << 30, 4096, 512 << 10).unwrap();
        assert_eq!(p.basic.logical_bs_shift, 9);
        assert_eq!(p.basic.physical_bs_shift, 12);
        assert_eq!(p.basic.dev_sectors, (1 << 30) >> 9);
        assert_eq!(p.basic.max_sectors, 1024);
        assert_ne!(p.basic.attrs & sys::UBLK_ATTR_VOLATILE_CACHE, 0);
        assert_ne!(p.types & sys::UBLK_PARAM_TYPE_DISCARD, 0);
        let o = UblkOptions { logical_block_size: 4096, discard: false, flush: false, ..o };
        let p = params(&o, 1 << 30, 4096, 512 << 10).unwrap();
        assert_eq!(p.basic.logical_bs_shift, 12);
        assert_eq!(p.basic.attrs, 0);
        assert_eq!(p.types & sys::UBLK_PARAM_TYPE_DISCARD, 0);
        assert!(params(&UblkOptions { logical_block_size: 1000, ..o.clone() }, 1 << 30, 4096, 4096).is_err());
        assert!(params(&o, (1 << 30) + 512, 4096, 4096).is_err());
    }

    #[test]
    fn unavailable_names_the_nbd_frontend() {
        let e = UblkError::Unavailable("no /dev/ublk-control".into()).to_string();
        assert!(e.contains("NBD frontend"), "{e}");
    }
}
