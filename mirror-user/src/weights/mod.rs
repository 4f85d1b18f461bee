//! The decision path: health scores in, read weights out. Pure code with time passed in; see
//! [`engine`] for the state machine and why its default policy beats the seed formula.

pub mod driver;
pub mod engine;
pub mod policy;
