//! Frontends: what applications talk to. Each one serves a [`crate::volume::BlockDev`] over some
//! protocol; [`nbd`] is the Network Block Device server.

pub mod nbd;
