//! The replication manager: replica servers, the protocol between them, and the jobs that bring
//! a peer up to date (initial sync, resync of the dirty bitmap, online verify).

pub mod auth;
pub mod client;
pub mod conn;
pub mod frame;
pub mod meta;
pub mod protocol;
pub mod rate;
pub mod server;
pub mod store;
pub mod sync;
