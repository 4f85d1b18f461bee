//! The health monitor: what makes a node healthy, as a score 0..=100 with the signals behind it.

pub mod baseline;
pub mod facts;
pub mod monitor;
pub mod probe;
pub mod score;
