//! `mirror ctl`: talks to a running `mirror serve` over its control socket
//! ([`crate::control`]): status (as a table or JSON), weight pins, forced failover and failback.

use std::{path::PathBuf, time::Duration};

use anyhow::Result;

use crate::control::{request, Request, WeightsReply};

/// `mirror ctl` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct CtlArgs {
    /// The control socket.
    #[arg(long, default_value = crate::control::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Print the reply as JSON (for every subcommand; `status --json` too).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub cmd: CtlCmd,
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum CtlCmd {
    /// Weights and per-replica state and counters.
    Status,
    /// Read weights: pin them or return to automatic.
    Weights {
        #[command(subcommand)]
        cmd: WeightsCmd,
    },
    /// Send every read to the target now (the target must be in sync); holds until the source
    /// is healthy and in sync for the failback hold time, or until `failback` / `weights auto`.
    Failover,
    /// Ramp reads back to the source now (it must be in sync), without waiting for the hold time.
    Failback,
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum WeightsCmd {
    /// Pin the target's share of reads (0..=100), optionally for a while.
    Set {
        #[arg(long, value_parser = clap::value_parser!(u8).range(0..=100))]
        target: u8,
        /// How long the pin holds (e.g. 10m); then weights return to automatic.
        #[arg(long = "for", value_parser = crate::parse_duration)]
        for_: Option<Duration>,
    },
    /// Return to automatic weights.
    Auto,
}

/// A decision as `mirror ctl` says it.
fn said(r: &WeightsReply) -> String {
    format!("target {} / source {} ({:?}: {})", r.target, 100 - u32::from(r.target), r.mode, r.reason)
}

impl CtlArgs {
    pub async fn run(self) -> Result<()> {
        let socket = &self.socket;
        let json = self.json;
        let weights = |req: Request| async move {
            let r = request(socket, &req).await?.into_weights()?;
            if json {
                crate::outln!("{}", serde_json::to_string_pretty(&r)?);
            }
            anyhow::Ok(r)
        };
        match self.cmd {
            CtlCmd::Status => {
                let st = request(socket, &Request::Status).await?.into_status()?;
                if json {
                    crate::outln!("{}", serde_json::to_string_pretty(&st)?);
                } else {
                    crate::out!("{}", status_table(&st));
                }
            }
            CtlCmd::Weights { cmd: WeightsCmd::Set { target, for_ } } => {
                let req = Request::WeightsSet { for_s: for_.map(|d| d.as_secs_f64()), target: target.into() };
                weights(req).await?;
                match for_ {
                    _ if json => {}
                    Some(d) => {
                        crate::outln!(
                            "target weight pinned at {target} for {}",
                            humantime::format_duration(d)
                        )
                    }
                    None => {
                        crate::outln!("target weight pinned at {target} (until `mirror ctl weights auto`)")
                    }
                }
            }
            CtlCmd::Weights { cmd: WeightsCmd::Auto } => {
                let r = weights(Request::WeightsAuto).await?;
                if !json {
                    crate::outln!("automatic weights: {}", said(&r));
                }
            }
            CtlCmd::Failover => {
                let r = weights(Request::Failover).await?;
                if !json {
                    crate::outln!("failover: {}", said(&r));
                }
            }
            CtlCmd::Failback => {
                let r = weights(Request::Failback).await?;
                if !json {
                    crate::outln!("failback: {}", said(&r));
                }
            }
        }
        Ok(())
    }
}

/// `mirror ctl status` as a table: weights and mode, then one row per node, then the signals.
/// (Reads the status document as JSON until the serve status is typed.)
pub fn status_table(st: &serde_json::Value) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "weights: source {} / target {}   mode {} ({})   size {} bytes",
        st["weights"]["source"],
        st["weights"]["target"],
        st["mode"].as_str().unwrap_or("?"),
        st["reason"].as_str().unwrap_or(""),
        st["size"]
    );
    let _ = writeln!(
        o,
        "{:<7} {:>6} {:>7} {:<10} {:<16} {:>10} {:>10} {:>7} {:>8} {:>8} {:>9} {:>9}",
        "REPLICA",
        "HEALTH",
        "WEIGHT",
        "STATE",
        "SYNC",
        "READS",
        "WRITES",
        "ERRORS",
        "TIMEOUTS",
        "RETRIES",
        "READ_us",
        "WRITE_us"
    );
    for r in st["replicas"].as_array().into_iter().flatten() {
        let role = r["role"].as_str().unwrap_or("?");
        let weight = if role == "target" { &st["weights"]["target"] } else { &st["weights"]["source"] };
        let job = &r["node"]["sync"];
        let sync = match (job["state"].as_str(), job["total_bytes"].as_u64()) {
            (Some(s), Some(t)) if t > 0 => {
                format!("{s} {:.0}%", job["done_bytes"].as_u64().unwrap_or(0) as f64 * 100.0 / t as f64)
            }
            (Some(s), _) => s.to_string(),
            _ if r["state"] == "in-sync" => "-".to_string(),
            _ => "waiting".to_string(),
        };
        let health = match r["node"]["health"].as_u64() {
            Some(h) if r["node"]["reachable"] != false => h.to_string(),
            _ => "down".to_string(),
        };
        let _ = writeln!(
            o,
            "{:<7} {:>6} {:>7} {:<10} {:<16} {:>10} {:>10} {:>7} {:>8} {:>8} {:>9} {:>9}",
            role,
            health,
            weight.to_string(),
            r["state"].as_str().unwrap_or("?"),
            sync,
            r["reads"],
            r["writes"],
            r["errors"],
            r["timeouts"],
            r["retries"],
            r["read_latency_us"],
            r["write_latency_us"]
        );
    }
    for r in st["replicas"].as_array().into_iter().flatten() {
        let signals: Vec<String> = r["node"]["signals"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                format!(
                    "{} {}{} (score {})",
                    s["name"].as_str().unwrap_or("?"),
                    s["value"],
                    s["unit"].as_str().map(|u| format!(" {u}")).unwrap_or_default(),
                    s["score"]
                )
            })
            .collect();
        let _ = writeln!(
            o,
            "{} signals ({}): {}",
            r["role"].as_str().unwrap_or("?"),
            r["node"]["telemetry"].as_str().unwrap_or("none yet"),
            if signals.is_empty() { "-".to_string() } else { signals.join(", ") }
        );
    }
    o
}
