//! [`StorageError`]: what a storage operation reports, with the data a caller needs to act on it
//! (the range and the volume's size, the operation and offset of a failed system call with its
//! errno, the metadata failure) instead of a message.

use super::meta::MetaError;
use crate::lease::{ClaimRefused, Epoch, Fenced};

/// The storage operation a system call belonged to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum IoOp {
    Read,
    Write,
    WriteZeroes,
    Flush,
    Digest,
}

impl std::fmt::Display for IoOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IoOp::Read => "read",
            IoOp::Write => "write",
            IoOp::WriteZeroes => "write zeroes",
            IoOp::Flush => "flush",
            IoOp::Digest => "digest",
        })
    }
}

/// Errors of the storage room's operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// `[offset, offset+len)` is not inside the volume.
    #[error("range {offset}+{len} outside the volume ({size} bytes)")]
    Range { offset: u64, len: u64, size: u64 },
    /// A system call on the data file or device failed; `source` keeps the errno.
    #[error("{op} at {offset}: {source}")]
    Io {
        op: IoOp,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    /// The metadata (generations, dirty bitmap, write intent) could not be read or made durable.
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// A request beyond a bound of the engine (or of one protocol frame).
    #[error("{what}: {len} exceeds the limit of {max}")]
    TooLarge { what: &'static str, len: u64, max: u64 },
    /// A digest grain the engine does not compute.
    #[error("digest grain {grain} outside {min}..={max}")]
    Grain { grain: u32, min: u32, max: u32 },
    /// The volume's job slot is taken (a sync or verify runs on it).
    #[error("busy: {0}")]
    Busy(&'static str),
    /// The job's thread could not be started.
    #[error("starting the job: {0}")]
    Spawn(#[source] std::io::Error),
    /// A mutation from a connection whose epoch is below the accepted one: a newer lease holder
    /// exists (the protocol's `FENCED`, errno `ESTALE`).
    #[error(transparent)]
    Fenced(Fenced),
    /// A mutation at an epoch this replica never accepted (a claim must come first).
    #[error("epoch {ours} was never claimed here (accepted {accepted})")]
    Unclaimed { ours: Epoch, accepted: Epoch },
    /// A lease claim, renewal or release refused by the replica's rules.
    #[error("lease refused: {0}")]
    Lease(ClaimRefused),
}

impl StorageError {
    /// The errno of the system call behind this error, when one failed (`Io`, a metadata write,
    /// a thread spawn); `None` for refusals the engine makes itself.
    pub fn errno(&self) -> Option<i32> {
        let source = match self {
            StorageError::Io { source, .. } | StorageError::Spawn(source) => source,
            StorageError::Meta(MetaError::Io { source, .. }) => source,
            _ => return None,
        };
        source.raw_os_error()
    }

    pub(crate) fn io(op: IoOp, offset: u64) -> impl FnOnce(std::io::Error) -> StorageError {
        move |source| StorageError::Io { op, offset, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_survives_io_and_metadata_failures_only() {
        let e =
            StorageError::Io { op: IoOp::Write, offset: 4096, source: std::io::Error::from_raw_os_error(28) };
        assert_eq!(e.errno(), Some(libc::ENOSPC));
        assert_eq!(e.to_string(), "write at 4096: No space left on device (os error 28)");
        let m = MetaError::Io { path: "/m".into(), source: std::io::Error::from_raw_os_error(libc::EIO) };
        assert_eq!(StorageError::from(m).errno(), Some(libc::EIO));
        assert_eq!(StorageError::Meta(MetaError::Corrupt("/m".into())).errno(), None);
        // An I/O error that carries no errno (a short transfer) has none to give.
        let short =
            StorageError::Io { op: IoOp::Read, offset: 0, source: std::io::ErrorKind::UnexpectedEof.into() };
        assert_eq!(short.errno(), None);
        let r = StorageError::Range { offset: 10, len: 20, size: 16 };
        assert_eq!(r.errno(), None);
        assert_eq!(r.to_string(), "range 10+20 outside the volume (16 bytes)");
        assert_eq!(StorageError::Busy("a job runs").errno(), None);
        assert_eq!(StorageError::TooLarge { what: "digests", len: 9, max: 8 }.errno(), None);
        assert_eq!(
            StorageError::Spawn(std::io::Error::from_raw_os_error(libc::EAGAIN)).errno(),
            Some(libc::EAGAIN)
        );
    }
}
