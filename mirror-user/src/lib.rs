//! mirror: adaptive block-storage mirroring with predictive failover.
//!
//! Rooms: [`telemetry`] (eBPF programs, pinned maps, /proc fallback: what the node measures),
//! [`health`] (the node's score), [`weights`] (the weighting engine and its loop),
//! [`storage`] (one replica's storage engine: data, metadata, the write rule), [`replication`]
//! (replica servers, the protocol, sync / resync / verify), [`volume`] (the router over a local
//! or remote replica pair), [`frontend`] (NBD and ublk in front of a [`volume::BlockDev`]),
//! [`serve`] (the lifecycle of `mirror serve`), [`control`] and [`metrics`] (its operator
//! endpoints), [`cli`] (the command line: each command's flags with the code they drive), [`lease`] (who
//! may write: epochs and leases), [`tls`] (X.509 credentials, TLS 1.3 endpoints, `mirror certs`).

pub mod cli;
pub mod config;
pub mod control;
pub mod frontend;
pub mod health;
pub mod lease;
pub mod metrics;
pub mod replication;
pub mod serve;
pub mod storage;
pub mod telemetry;
pub mod tls;
pub mod volume;
pub mod weights;

/// Prints a readiness line on stdout and flushes it at once: supervisors and tests wait for these
/// lines (`listening on ADDR`, `nbd listening on ADDR`, `ready: ...`). A closed stdout is no
/// reason to stop serving, so write errors are ignored.
pub fn announce(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Parses sizes such as `4096`, `64K`, `256M`, `1G`, `1GiB`, `10MiB/s` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim().trim_end_matches("/s");
    let t = t.trim_end_matches(['B', 'b']).trim_end_matches('i');
    let (num, mul) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mul = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("`{s}`: unknown unit (use K, M, G, T)")),
            };
            (&t[..i], mul)
        }
        _ => (t, 1),
    };
    let n: f64 =
        num.trim().parse().map_err(|_| format!("`{s}` is not a size (examples: 4096, 64K, 256M, 1G)"))?;
    if !(n >= 0.0 && n.is_finite()) {
        return Err(format!("`{s}` is not a size"));
    }
    Ok((n * mul as f64) as u64)
}

/// Parses durations such as `500ms`, `2s`, `10m` for command-line flags.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 2s, 10m)"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes() {
        assert_eq!(super::parse_size("4096"), Ok(4096));
        assert_eq!(super::parse_size("64K"), Ok(65536));
        assert_eq!(super::parse_size("256M"), Ok(256 << 20));
        assert_eq!(super::parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(super::parse_size("10MiB/s"), Ok(10 << 20));
        assert_eq!(super::parse_size("1.5G"), Ok(3 << 29));
        assert!(super::parse_size("lots").is_err());
        assert!(super::parse_size("5X").is_err());
    }
}
