//! /proc sources used next to (or instead of) eBPF: pressure stall information
//! (`/proc/pressure/{cpu,memory,io}`) and the TCP retransmit counter of `/proc/net/snmp`.

use super::TelemetryError;

/// One line of a PSI file: `some avg10=0.12 avg60=0.05 avg300=0.01 total=12345`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PsiLine {
    /// Share of the last 10 s some (or all) tasks were stalled, in percent (kernel-averaged).
    pub avg10: f64,
    /// Cumulative stall time in microseconds.
    pub total_us: u64,
}

/// Pressure stall information of the whole node.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Psi {
    pub cpu_some: PsiLine,
    pub memory_some: PsiLine,
    pub memory_full: PsiLine,
    pub io_some: PsiLine,
    pub io_full: PsiLine,
}

/// Parses a PSI file into its `some` and `full` lines (a missing `full` line reads as zero).
pub fn parse_psi(text: &str) -> Option<(PsiLine, PsiLine)> {
    let mut some = None;
    let mut full = PsiLine::default();
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let kind = parts.next();
        let mut l = PsiLine::default();
        for p in parts {
            if let Some(v) = p.strip_prefix("avg10=") {
                l.avg10 = v.parse().ok()?;
            } else if let Some(v) = p.strip_prefix("total=") {
                l.total_us = v.parse().ok()?;
            }
        }
        match kind {
            Some("some") => some = Some(l),
            Some("full") => full = l,
            _ => {}
        }
    }
    some.map(|s| (s, full))
}

/// Reads `/proc/pressure/*`; `None` when the kernel has no PSI (or it is disabled).
pub fn read_psi() -> Option<Psi> {
    let read = |what: &str| {
        std::fs::read_to_string(format!("/proc/pressure/{what}")).ok().and_then(|t| parse_psi(&t))
    };
    let (cpu_some, _) = read("cpu")?;
    let (memory_some, memory_full) = read("memory")?;
    let (io_some, io_full) = read("io")?;
    Some(Psi { cpu_some, memory_some, memory_full, io_some, io_full })
}

/// `RetransSegs` of the `Tcp:` header/value line pair of `/proc/net/snmp`.
pub fn parse_snmp_retrans(text: &str) -> Option<u64> {
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let header = tcp.next()?;
    let values = tcp.next()?;
    let idx = header.split_whitespace().position(|f| f == "RetransSegs")?;
    values.split_whitespace().nth(idx)?.parse().ok()
}

/// Cumulative TCP segments retransmitted by this node (all peers).
pub fn read_tcp_retrans() -> Result<u64, TelemetryError> {
    let text =
        std::fs::read_to_string("/proc/net/snmp").map_err(|e| TelemetryError::io("/proc/net/snmp", e))?;
    parse_snmp_retrans(&text).ok_or_else(|| {
        TelemetryError::io("/proc/net/snmp", std::io::Error::other("no Tcp RetransSegs field"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psi_lines() {
        let (s, f) = parse_psi(
            "some avg10=1.50 avg60=0.20 avg300=0.00 total=123456\n\
             full avg10=0.25 avg60=0.00 avg300=0.00 total=789\n",
        )
        .unwrap();
        assert_eq!((s.avg10, s.total_us, f.avg10, f.total_us), (1.5, 123_456, 0.25, 789));
        let (s, f) = parse_psi("some avg10=0.00 avg60=0.00 avg300=0.00 total=5\n").unwrap();
        assert_eq!((s.total_us, f), (5, PsiLine::default()));
        assert!(parse_psi("").is_none());
    }

    #[test]
    fn snmp_retrans() {
        let text = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
                    Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails EstabResets CurrEstab InSegs OutSegs RetransSegs InErrs OutRsts InCsumErrors\n\
                    Tcp: 1 200 120000 -1 10 5 0 0 2 1000 900 42 0 3 0\n\
                    Udp: InDatagrams\nUdp: 7\n";
        assert_eq!(parse_snmp_retrans(text), Some(42));
        assert_eq!(parse_snmp_retrans("Udp: x\nUdp: 1\n"), None);
    }

    #[test]
    fn reads_this_machine() {
        // /proc/net/snmp exists on every Linux with IPv4; PSI may be disabled, so only parse it.
        assert!(read_tcp_retrans().is_ok());
        let _ = read_psi();
    }
}
