//! The replication manager: replica servers (adapters between protocol frames and the
//! [`storage`](crate::storage) engine), the protocol between them, and the jobs that bring a peer
//! up to date (initial sync, resync of the dirty bitmap, online verify).

pub mod auth;
pub mod client;
pub mod conn;
pub mod frame;
pub mod preauth;
pub mod protocol;
pub mod rate;
pub mod server;
pub mod sync;
pub mod transport;
