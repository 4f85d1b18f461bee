//! [`ReplicaError`]: how an operation on one replica failed, local or remote, with what the
//! router needs to decide (was the node unreachable or did it refuse us; did a disk fail, and
//! with which errno) and what the application is finally told ([`ReplicaError::to_io`]).

use std::time::Duration;

use crate::{replication::client::ClientError, storage::StorageError};

/// Errors of one replica's operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicaError {
    /// The node did not answer (connection refused, timed out, no route): it may be down.
    #[error("{addr} unreachable: {source}")]
    Unreachable {
        addr: String,
        #[source]
        source: ClientError,
    },
    /// The node answered but refused us (secret, volume, protocol version).
    #[error("{addr} refused the connection: {source}")]
    Refused {
        addr: String,
        #[source]
        source: ClientError,
    },
    /// A remote replica without connections (never connected, or dropped after a failure).
    #[error("{addr}: replica not connected")]
    NotConnected { addr: String },
    /// A remote replica's connection broke while the request was in flight.
    #[error("{addr}: {why}")]
    ConnectionLost { addr: String, why: String },
    /// A local replica's storage engine failed the operation.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A remote replica's server failed the operation: its protocol code, the errno of the
    /// system call that failed there (0 = none) and its message.
    #[error("{addr} (code {code}, errno {errno}): {message}")]
    Remote { addr: String, code: u16, errno: u32, message: String },
    /// A reply that does not answer the request.
    #[error("{addr}: unexpected reply {reply}")]
    Protocol { addr: String, reply: String },
    /// The replica did not complete the operation in time.
    #[error("no completion within {0:?}")]
    Timeout(Duration),
    /// The blocking task running a local operation did not finish (it panicked).
    #[error("local replica task: {0}")]
    Task(String),
    /// A write would be acknowledged with this replica alone, but the lease store could not
    /// record first that it alone holds every acknowledged write (`volume::mark`): not
    /// acknowledged (the application gets `EIO`).
    #[error(
        "not acknowledged with the {role} replica alone: recording that in the lease store failed: {why}"
    )]
    Unmarked { role: &'static str, why: String },
}

impl ReplicaError {
    /// The errno of the failed system call behind this error, local or remote, if there was one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            ReplicaError::Storage(e) => e.errno(),
            ReplicaError::Remote { errno, .. } => i32::try_from(*errno).ok().filter(|&n| n > 0),
            _ => None,
        }
    }

    /// True when the replica refused the request because it accepted a newer lease epoch: this
    /// router is fenced and must acknowledge no further write.
    pub fn is_fenced(&self) -> bool {
        matches!(
            self,
            ReplicaError::Storage(StorageError::Fenced(_))
                | ReplicaError::Remote { code: crate::replication::protocol::code::FENCED, .. }
        )
    }

    /// True when the node did not answer at all (it may be down), rather than refused us.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ReplicaError::Unreachable { .. })
    }

    /// The error a frontend reports: the errno when a disk failed (ENOSPC stays ENOSPC for the
    /// NBD client and the ublk completion), else an `EIO`-class error with the text.
    pub fn to_io(&self) -> std::io::Error {
        if let ReplicaError::Unmarked { .. } = self {
            return std::io::Error::from_raw_os_error(libc::EIO);
        }
        match self.errno() {
            Some(n) => std::io::Error::from_raw_os_error(n),
            None => std::io::Error::other(self.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::IoOp;

    #[test]
    fn errno_of_local_and_remote_failures_reaches_the_frontend() {
        let local = ReplicaError::Storage(StorageError::Io {
            op: IoOp::Write,
            offset: 0,
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
        });
        assert_eq!(local.to_io().raw_os_error(), Some(libc::ENOSPC));
        let remote = ReplicaError::Remote {
            addr: "a:1".into(),
            code: 6,
            errno: libc::EROFS as u32,
            message: "x".into(),
        };
        assert_eq!(remote.to_io().raw_os_error(), Some(libc::EROFS));
        let no_errno =
            ReplicaError::Remote { addr: "a:1".into(), code: 5, errno: 0, message: "range".into() };
        assert_eq!(no_errno.errno(), None);
        assert_eq!(no_errno.to_io().raw_os_error(), None);
        assert_eq!(ReplicaError::Timeout(Duration::from_secs(5)).to_io().raw_os_error(), None);
    }
}
