//! The decision path: health scores in, read weights out. Pure code with time passed in; see
//! [`engine`] for the state machine and why its default policy beats the seed formula; [`driver`]
//! is the loop that feeds it, [`status`] the typed state of `mirror serve` the loop reports.

pub mod driver;
pub mod engine;
pub mod policy;
pub mod status;
