//! Frontends: what applications talk to. Each one serves a [`crate::volume::BlockDev`] over some
//! protocol; [`nbd`] is the Network Block Device server, [`ublk`] the
//! kernel block device (`/dev/ublkbN`) through the ublk driver.

pub mod nbd;
pub mod ublk;
mod ublk_writer;
