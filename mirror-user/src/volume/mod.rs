//! The request path: what a frontend (NBD, ublk) drives. [`BlockDev`] is the seam: the router
//! implements it for a mirrored volume over two [`replica::Replica`]s (each a
//! [`local::LocalReplica`] or a [`remote::RemoteReplica`], failing with a
//! [`error::ReplicaError`]); [`file::FileDev`] implements it for one file (a single replica, used
//! as a baseline and in frontend tests).

pub mod activity;
pub mod deadline;
pub mod error;
pub mod fast;
pub mod fence;
pub mod file;
pub mod hedge;
pub mod inflight;
pub mod inline;
pub mod lease;
pub mod local;
pub mod mark;
pub mod open;
pub mod remote;
pub mod replica;
pub mod router;
pub mod uring;

use std::future::Future;

use fast::{FastOp, FastPlan};

/// A block device of fixed size, driven by a frontend. Offsets and lengths are bytes; the
/// frontend validates ranges against [`BlockDev::size`] before calling. Errors are
/// `std::io::Error`s whose `raw_os_error` (when set) is the errno to report to the client.
pub trait BlockDev: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Logical block size the device prefers (512 or 4096).
    fn block_size(&self) -> u32;
    /// Reads `len` bytes at `offset`.
    fn read(&self, offset: u64, len: u32) -> impl Future<Output = std::io::Result<Vec<u8>>> + Send;
    /// Writes `data` at `offset`; with `fua`, durable before returning.
    fn write(
        &self,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> impl Future<Output = std::io::Result<()>> + Send;
    /// Makes every completed write durable.
    fn flush(&self) -> impl Future<Output = std::io::Result<()>> + Send;
    /// Discards a range; it reads back as zeroes afterwards.
    fn trim(&self, offset: u64, len: u64) -> impl Future<Output = std::io::Result<()>> + Send;
    /// Writes zeroes over a range.
    fn write_zeroes(&self, offset: u64, len: u64) -> impl Future<Output = std::io::Result<()>> + Send;

    /// The fast path (ublk): a frontend that can submit file I/O itself asks, per request,
    /// whether it may drive the volume's local replicas directly, and gets the plan to follow
    /// ([`FastPlan`]); `None` sends the request through the methods above. A plan that fails is
    /// redone through them, so failure handling stays theirs.
    fn fast_path(&self, _op: FastOp, _offset: u64, _len: u32) -> Option<FastPlan<'_>> {
        None
    }
}
