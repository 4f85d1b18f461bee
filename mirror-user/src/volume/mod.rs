//! The request path: what a frontend (NBD, ublk) drives. [`BlockDev`] is the seam: the router
//! implements it for a mirrored volume; [`file::FileDev`] implements it for one file (a single
//! replica, used as a baseline and in frontend tests).

pub mod activity;
pub mod file;
pub mod inline;
pub mod open;
pub mod remote;
pub mod replica;
pub mod router;
pub mod uring;

use std::future::Future;

use replica::Replica;

/// Replicas a fast-path write must reach, as a bit set (bit `i` = replica `i`).
pub type ReplicaSet = u8;

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

    // The fast path (ublk): a frontend that can submit file I/O itself asks, per request, which
    // local replicas it may drive directly; `None` sends the request through the methods above.
    // A fast-path request that fails is redone through them, so failure handling stays theirs.

    /// The replica a read goes to, when the volume's choice (weights, in-sync rule) is a local
    /// file the frontend may read itself ([`Replica::fast_fd`]).
    fn fast_read(&self) -> Option<usize> {
        None
    }
    /// The replicas a write of `[offset, offset+len)` goes to, when every one of them is a
    /// local file the frontend may write itself and nothing else has to happen first (no
    /// failure handling under way, the range's write intent already recorded).
    fn fast_write(&self, _offset: u64, _len: u64) -> Option<ReplicaSet> {
        None
    }
    /// Replica `i` of [`BlockDev::fast_read`] / [`BlockDev::fast_write`].
    fn replica(&self, _i: usize) -> Option<&Replica> {
        None
    }
}
