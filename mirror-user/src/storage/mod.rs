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
//! The wire types it stores ([`GenInfo`](crate::replication::protocol::GenInfo), `JobKind`) are
//! the protocol's: pure data, no I/O.

pub mod error;
pub mod job;
pub mod lease;
pub mod meta;
pub mod status;
pub mod store;
pub mod volume;

pub use error::{IoOp, StorageError};
pub use job::{Job, JobState, JobStatus};
pub use lease::{EpochGuard, LeaseGate};
pub use status::VolumeStatus;
pub use volume::{default_meta_path, Access, Counters, OpenError, Volume, VolumeSpec, META_DIR};
