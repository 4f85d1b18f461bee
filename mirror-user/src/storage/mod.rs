//! The storage room: one replica's storage engine, used by the replica server (which only turns
//! frames into these calls and their results into reply frames) and by the router's local
//! replicas alike.
//!
//! - [`store`]: the data file or block device, positioned I/O and block digests;
//! - [`meta`]: the crash-safe metadata (generations, tracking, dirty bitmap, write intent) and
//!   the pure sync planning over generations;
//! - [`volume`]: [`Volume`], the two together with the write rule, the application I/O counters
//!   and the job slot; every operation returns a [`StorageError`];
//! - [`lease`]: the epoch gate: the replica's lease record applied (claims, renewals, releases,
//!   persisted in the metadata header) and every mutating request admitted only at the accepted
//!   epoch (fencing);
//! - [`job`]: the job slot's live progress and its [`JobStatus`] / [`JobState`];
//! - [`status`]: [`VolumeStatus`], the typed status, with the hex forms of its identifiers.
//!
//! Errors carry their data: a range with the volume's size, a failed system call with its
//! operation, offset and errno ([`StorageError::errno`]), so an ENOSPC from the disk reaches the
//! application as ENOSPC.
//!
//! The generations ([`GenInfo`], [`HISTORY`] of them remembered) and the [`JobKind`]s are
//! defined here, with the state they describe; the protocol carries them as they are.

pub mod error;
pub mod job;
pub mod lease;
pub mod meta;
pub mod status;
pub mod store;
pub mod volume;

pub use error::{IoOp, StorageError};
pub use job::{Job, JobKind, JobState, JobStatus};
pub use lease::{EpochGuard, LeaseGate};
pub use meta::{GenInfo, HISTORY};
pub use status::VolumeStatus;
pub use volume::{default_meta_path, Access, Counters, OpenError, Volume, VolumeSpec, META_DIR};

/// A path in the temporary directory for a unit test's volume or metadata file, unique to the
/// call; the file and its default metadata file are removed on drop.
#[cfg(test)]
pub(crate) struct TempFile(pub std::path::PathBuf);

#[cfg(test)]
impl TempFile {
    pub(crate) fn new(tag: &str) -> TempFile {
        let name = format!("mirror-{tag}-{}-{:x}", std::process::id(), meta::random_u64());
        TempFile(std::env::temp_dir().join(name))
    }
}

#[cfg(test)]
impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::remove_file(default_meta_path(&self.0));
    }
}
