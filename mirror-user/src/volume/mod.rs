//! The request path: what a frontend (NBD, ublk) drives. [`BlockDev`] is the seam: the router
//! implements it for a mirrored volume; [`file::FileDev`] implements it for one file (a single
//! replica, used as a baseline and in frontend tests).

pub mod file;
pub mod open;
pub mod remote;
pub mod replica;
pub mod router;
pub mod uring;

use std::future::Future;

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
}
