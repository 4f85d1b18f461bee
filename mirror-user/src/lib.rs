//! mirror: adaptive block-storage mirroring with predictive failover.
//!
//! Rooms: [`telemetry`] (eBPF programs, pinned maps, /proc fallback: what the node measures).

pub mod telemetry;

/// Parses durations such as `500ms`, `2s`, `10m` for command-line flags.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 2s, 10m)"))
}
