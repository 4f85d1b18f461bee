//! `mirror sync`: has a replica server push a volume to its peer (sync), or compare them
//! (`--verify`, `--repair`), and follows the job with a progress bar until it ends.

use std::{path::PathBuf, time::Duration};

use anyhow::Result;

use super::exit::CliError;
use crate::replication::{
    auth::load_secret,
    client::Client,
    protocol::{JobKind, Message},
};

/// `mirror sync` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct SyncArgs {
    /// The replica server that holds the data to push (it runs the job).
    #[arg(long)]
    pub node: String,
    /// The replica server to bring up to date, as `--node` reaches it.
    #[arg(long)]
    pub peer: String,
    #[arg(long)]
    pub volume: String,
    #[arg(long, env = "MIRROR_SECRET_FILE")]
    pub secret_file: PathBuf,
    /// Compare digests of the whole volume and report mismatching ranges instead of syncing.
    #[arg(long)]
    pub verify: bool,
    /// With --verify: resync the mismatching ranges from --node to --peer.
    #[arg(long, requires = "verify")]
    pub repair: bool,
    /// Start the job and return without waiting.
    #[arg(long)]
    pub no_wait: bool,
    /// No progress bar; print the final JSON status.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub transport: super::transport::TransportArgs,
}

impl SyncArgs {
    /// The job the flags ask for.
    pub fn kind(&self) -> JobKind {
        match (self.verify, self.repair) {
            (false, _) => JobKind::Sync,
            (true, false) => JobKind::Verify,
            (true, true) => JobKind::VerifyRepair,
        }
    }

    /// Starts the job and, unless `--no-wait`, follows it; fails when it ends in anything but
    /// success.
    pub fn run(self) -> Result<()> {
        let kind = self.kind();
        let SyncArgs { node, peer, volume, secret_file, no_wait, json, transport, .. } = self;
        let (t, to) = (transport.client()?, super::transport::peer(&node)?);
        super::transport::peer(&peer)?;
        let mut c = Client::connect_over(&t, &to, &volume, &load_secret(&secret_file)?)?;
        c.call_ok(&Message::StartJob { kind, peer: peer.clone() })?;
        if no_wait {
            crate::outln!(
                "{kind:?} of {volume} from {node} to {peer} started; `mirror status` shows progress"
            );
            return Ok(());
        }
        let bar = if json {
            indicatif::ProgressBar::hidden()
        } else {
            let b = indicatif::ProgressBar::new(0);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg:10} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            b
        };
        // The job's status is still the replica server's JSON document (typed in the storage
        // rework); these are its field names.
        let status = loop {
            let s = c.json(&Message::JobStatus)?;
            bar.set_length(s["total_bytes"].as_u64().unwrap_or(0));
            bar.set_position(s["done_bytes"].as_u64().unwrap_or(0));
            bar.set_message(s["state"].as_str().unwrap_or("?").to_string());
            if !matches!(s["state"].as_str(), Some("connecting" | "syncing" | "verifying" | "repairing")) {
                break s;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        bar.finish_and_clear();
        if json {
            crate::outln!("{status}");
        }
        let state = status["state"].as_str().unwrap_or("?");
        let mib = |k: &str| status[k].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64;
        let summary = format!(
            "{state}: examined {:.1} MiB, changed {:.1} MiB, sent {:.2} MiB of data, {:.2} MiB on the wire in {:.2} s",
            mib("done_bytes"),
            mib("changed_bytes"),
            mib("data_bytes"),
            mib("wire_bytes"),
            status["elapsed_s"].as_f64().unwrap_or(0.0)
        );
        match state {
            "done" | "up-to-date" | "repaired" => {
                if !json {
                    crate::outln!("{summary}");
                }
                Ok(())
            }
            "done-mismatches" => {
                let count = status["mismatches"].as_array().map(|a| a.len()).unwrap_or(0);
                Err(CliError::Differ { count, ranges: status["mismatches"].to_string() }.into())
            }
            _ => anyhow::bail!("{kind:?} {state}: {}", status["error"].as_str().unwrap_or("unknown error")),
        }
    }
}
