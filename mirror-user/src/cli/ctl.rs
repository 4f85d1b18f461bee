//! `mirror ctl`: talks to a running `mirror serve` over its control socket
//! ([`crate::control`]): status (as a table or JSON), weight pins, forced failover and failback.

use std::{path::PathBuf, time::Duration};

use anyhow::Result;

use crate::{
    control::{request, Reply, Request, WeightsReply},
    volume::lease::StandbyStatus,
    volume::replica::ReplicaState,
    weights::status::{ReplicaStatus, ServeStatus},
};

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
    /// Weights and per-replica state and counters; with --watch, live until interrupted.
    Status {
        /// Show the status again every --interval: a redrawn screen on a terminal (weights as
        /// bars, the table, the last weight changes), otherwise one line per update (with
        /// --json, one JSON document per line). Stops on Ctrl-C; an unreachable `serve` is
        /// reported and retried.
        #[arg(long)]
        watch: bool,
        /// How often --watch updates.
        #[arg(long, default_value = "1s", value_parser = crate::parse_duration, requires = "watch")]
        interval: Duration,
    },
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
    /// Planned handover (soft migration) to the standby router on the other node: reads move
    /// to the other node, writes are held, both replicas flushed, the lease handed to the
    /// standby (`mirror serve --standby`, etcd lease store), and this router stops; the standby
    /// serves with its own replica as the source, and NBD clients reconnect to it. Refused,
    /// serving on, when no standby is announced, this router holds no lease, or the store
    /// cannot be reached. Alias: `migrate`.
    #[command(visible_alias = "migrate")]
    Handover {
        /// The standby to hand to: its node name (`--lease-holder`) or `node/instance`
        /// [default: the one announced].
        #[arg(long)]
        to: Option<String>,
    },
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
            CtlCmd::Status { watch: true, interval } => return watch(socket, interval, json).await,
            CtlCmd::Status { watch: false, .. } => match request(socket, &Request::Status).await? {
                Reply::Standby(sb) if json => crate::outln!("{}", serde_json::to_string_pretty(&sb)?),
                Reply::Standby(sb) => crate::outln!("{}", standby_line(&sb)),
                r => {
                    let st = r.into_status()?;
                    if json {
                        crate::outln!("{}", serde_json::to_string_pretty(&sorted(&st)?)?);
                    } else {
                        crate::out!("{}", status_table(&st));
                    }
                }
            },
            CtlCmd::Weights { cmd: WeightsCmd::Set { target, for_ } } => {
                let req = Request::WeightsSet { for_s: for_.map(|d| d.as_secs_f64()), target: target.into() };
                weights(req).await?;
                match for_ {
                    _ if json => {}
                    Some(d) => {
                        crate::outln!(
                            "target weight pinned at {target} for {}",
                            humantime::format_duration(d)
                        );
                    }
                    None => {
                        crate::outln!("target weight pinned at {target} (until `mirror ctl weights auto`)");
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
            CtlCmd::Handover { to } => {
                if !json {
                    crate::outln!(
                        "handover: shifting reads, holding writes, flushing both replicas, handing the lease to {}...",
                        to.as_deref().unwrap_or("the announced standby")
                    );
                }
                let h = request(socket, &Request::Handover { to: to.clone() }).await?.into_handover()?;
                if json {
                    crate::outln!("{}", serde_json::to_string_pretty(&h)?);
                } else {
                    for s in &h.steps {
                        crate::outln!("  {s}");
                    }
                    crate::outln!(
                        "handed over to {} (epoch {}); writes were held {} ms; this router has stopped",
                        h.successor,
                        h.epoch,
                        h.paused_ms
                    );
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

/// `mirror ctl status --watch`: the status every `interval` until Ctrl-C, redrawn on a terminal
/// ([`watch_screen`]), a line per update otherwise ([`status_line`], or the JSON document).
async fn watch(socket: &std::path::Path, interval: Duration, json: bool) -> Result<()> {
    use std::io::IsTerminal;
    anyhow::ensure!(interval >= Duration::from_millis(100), "--interval must be at least 100ms");
    let terminal = std::io::stdout().is_terminal() && !json;
    let stop = super::shutdown_signal();
    tokio::pin!(stop);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut stop => break,
            _ = ticker.tick() => {}
        }
        let reply = request(socket, &Request::Status).await;
        let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
        if let Ok(Reply::Standby(sb)) = &reply {
            match (terminal, json) {
                (_, true) => crate::outln!("{}", serde_json::to_string(sb)?),
                (true, false) => crate::out!("{CLEAR}{now}  {}\n", standby_line(sb)),
                (false, false) => crate::outln!("{now} {}", standby_line(sb)),
            }
            continue;
        }
        let st = reply.and_then(Reply::into_status);
        match (&st, terminal, json) {
            (Ok(st), true, _) => crate::out!("{}", watch_screen(st, &now.to_string(), interval)),
            (Ok(st), false, true) => crate::outln!("{}", sorted(st)?),
            (Ok(st), false, false) => crate::outln!("{now} {}", status_line(st)),
            (Err(e), true, _) => crate::out!("{CLEAR}{now}  {e}\n"),
            (Err(e), false, _) => crate::outln!("{now} unreachable: {e}"),
        }
    }
    if terminal {
        crate::outln!();
    }
    Ok(())
}

/// A standby router's status as a line: what it waits on.
pub fn standby_line(sb: &StandbyStatus) -> String {
    let active = match &sb.active {
        Some(a) if a.handed_to_me => format!("{} is handing the lease to it (epoch {})", a.holder, a.epoch),
        Some(a) if a.time_left_ms > 0 => format!(
            "active router {} at epoch {}, its lease runs {:.1} s more without a renewal",
            a.holder,
            a.epoch,
            a.time_left_ms as f64 / 1000.0
        ),
        Some(a) => format!("the lease of {} (epoch {}) expired: taking over", a.holder, a.epoch),
        None => "nobody holds the lease: taking it".into(),
    };
    format!(
        "volume {}: standby router {} ({} lease store, TTL {:.1} s), waiting {:.1} s; {active}",
        sb.volume,
        sb.lease.holder,
        sb.lease.store,
        sb.lease.ttl_ms as f64 / 1000.0,
        sb.waiting_ms as f64 / 1000.0
    )
}

/// The status as the JSON document `--json` prints: its keys sorted at every level, as they
/// always were (docs/status.md lists them).
fn sorted(st: &ServeStatus) -> serde_json::Result<serde_json::Value> {
    serde_json::to_value(st)
}

/// Moves the cursor home and clears the screen (ANSI), for a redrawn `--watch` screen.
const CLEAR: &str = "\x1b[H\x1b[2J";

/// A share of reads as a bar of 20 cells.
fn bar(percent: u64) -> String {
    let n = (percent.min(100) / 5) as usize;
    format!("{}{}", "#".repeat(n), ".".repeat(20 - n))
}

/// The `--watch` screen: weights as bars with the mode, the status table, the last weight changes.
pub fn watch_screen(st: &ServeStatus, now: &str, interval: Duration) -> String {
    use std::fmt::Write;
    let mut o = String::from(CLEAR);
    let tw = u64::from(st.target_weight());
    let _ = writeln!(
        o,
        "mirror ctl status --watch   every {}   {now}   (Ctrl-C stops)\n",
        humantime::format_duration(interval)
    );
    let _ = writeln!(
        o,
        "source {:>3}% {}   target {:>3}% {}",
        100 - tw.min(100),
        bar(100 - tw.min(100)),
        tw,
        bar(tw)
    );
    let _ = writeln!(o);
    o.push_str(&status_table(st));
    if !st.events.is_empty() {
        let _ = writeln!(o, "\nlast weight changes ({} since start):", st.weight_changes);
        for e in st.events.iter().rev().take(5) {
            let _ = writeln!(
                o,
                "  {:>9.1}s  target {:>3}%  {:<10} {}",
                e.t_ms as f64 / 1000.0,
                e.target,
                format!("{:?}", e.mode),
                e.reason
            );
        }
    }
    o
}

/// One `--watch` update as a line (the demo's live line): the weights and mode, then each
/// replica's health, state, sync progress and data-path latency.
pub fn status_line(st: &ServeStatus) -> String {
    let tw = st.target_weight();
    let replicas: Vec<String> = st
        .replicas()
        .iter()
        .map(|r| {
            format!(
                "{} health {} {} sync {} lat {}us",
                r.replica.role,
                health_cell(r),
                r.replica.state.as_str(),
                sync_cell(r),
                r.latency_us()
            )
        })
        .collect();
    format!("source {}% target {tw}% mode {:?} | {}", 100 - tw.min(100), st.mode, replicas.join(" | "))
}

/// A replica's SYNC cell: its node's current or last job and progress, `-` when in sync with
/// none, `waiting` otherwise.
fn sync_cell(r: &ReplicaStatus) -> String {
    match &r.node.sync {
        Some(job) if job.total_bytes > 0 => {
            format!("{} {:.0}%", job.state, job.done_bytes as f64 * 100.0 / job.total_bytes as f64)
        }
        Some(job) => job.state.to_string(),
        None if r.replica.state == ReplicaState::InSync => "-".to_string(),
        None => "waiting".to_string(),
    }
}

/// A replica's HEALTH cell: its node's score, `down` when unreachable.
fn health_cell(r: &ReplicaStatus) -> String {
    match r.node.health {
        Some(h) if r.node.reachable => h.to_string(),
        _ => "down".to_string(),
    }
}

/// A figure as JSON writes it (`0.0`, `14.5`, `null` for not a number), as the table always
/// showed signal values and scores.
fn json_number(x: f64) -> String {
    serde_json::to_string(&x).unwrap_or_else(|_| "null".into())
}

/// `mirror ctl status` as a table: weights and mode, then one row per node, then the signals.
pub fn status_table(st: &ServeStatus) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let w = &st.router.weights;
    let _ = writeln!(
        o,
        "weights: source {} / target {}   mode {:?} ({})   size {} bytes",
        w.source, w.target, st.mode, st.reason, st.router.size
    );
    if let Some(lease) = &st.router.lease {
        let mode = lease.mode.as_str();
        let _ = writeln!(
            o,
            "lease: {mode} ({} store)   holder {}   epoch {}   {:.1} s left   ({})",
            lease.store,
            lease.holder.0,
            lease.epoch.0,
            lease.time_left_ms as f64 / 1e3,
            lease.reason
        );
    }
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
    for r in st.replicas() {
        let p = &r.replica;
        let _ = writeln!(
            o,
            "{:<7} {:>6} {:>7} {:<10} {:<16} {:>10} {:>10} {:>7} {:>8} {:>8} {:>9} {:>9}",
            p.role,
            health_cell(r),
            r.weight(st),
            p.state.as_str(),
            sync_cell(r),
            p.reads,
            p.writes,
            p.errors,
            p.timeouts,
            p.retries,
            p.read_latency_us,
            p.write_latency_us
        );
    }
    for r in st.replicas() {
        let signals: Vec<String> = r
            .node
            .signals
            .iter()
            .flatten()
            .map(|s| {
                format!("{} {} {} (score {})", s.name, json_number(s.value), s.unit, json_number(s.score))
            })
            .collect();
        let _ = writeln!(
            o,
            "{} signals ({}): {}",
            r.replica.role,
            r.node.telemetry.as_deref().unwrap_or("none yet"),
            if signals.is_empty() { "-".to_string() } else { signals.join(", ") }
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> ServeStatus {
        crate::weights::status::example()
    }

    #[test]
    fn a_watch_line_carries_weights_mode_health_sync_and_latency() {
        assert_eq!(
            status_line(&status()),
            "source 40% target 60% mode Failback | source health 91 resyncing sync syncing 25% lat 900us | \
             target health down in-sync sync - lat 700us"
        );
    }

    #[test]
    fn the_watch_screen_redraws_bars_table_and_the_last_changes() {
        let s = watch_screen(&status(), "2026-12-06T10:00:00Z", Duration::from_secs(1));
        assert!(s.starts_with(CLEAR), "{s:?}");
        assert!(s.contains("every 1s   2026-12-06T10:00:00Z"), "{s}");
        assert!(s.contains("source  40% ########............   target  60% ############........"), "{s}");
        assert!(s.contains(&status_table(&status())), "{s}");
        let newest = s.find("Failback   ramping").unwrap();
        let older = s.find("Failover   source down").unwrap();
        assert!(newest < older, "the newest change first: {s}");
    }

    #[test]
    fn the_table_aligns_its_numbers() {
        let t = status_table(&status());
        let rows: Vec<&str> =
            t.lines().filter(|l| l.starts_with("source ") || l.starts_with("target ")).collect();
        let header = t.lines().nth(1).unwrap();
        for r in &rows[..2] {
            assert_eq!(r.len(), header.len(), "{header}\n{r}");
        }
        assert!(rows[0].contains("     12345"), "{t}");
        assert!(t.starts_with(
            "weights: source 40 / target 60   mode Failback (ramping reads back)   size 1024 bytes\n"
        ));
        // Signal figures as JSON writes them (as when the table read the JSON document).
        assert!(
            t.contains("\nsource signals (ebpf): disk_latency_ratio 14.5 x baseline (score 0.0)\n"),
            "{t}"
        );
        assert!(t.ends_with("\ntarget signals (none yet): -\n"), "{t}");
    }
}
