//! `mirror sync`: has a replica server push a volume to its peer (sync), or compare them
//! (`--verify`, `--repair`), and follows the job with a progress bar until it ends.

use std::{path::PathBuf, time::Duration};

use anyhow::Result;

use super::exit::CliError;
use crate::{
    replication::{auth::load_secret, client::Client, protocol::Message},
    storage::{JobKind, JobState, JobStatus},
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
        let status = loop {
            let s = job_status(&mut c)?;
            if let Some(j) = &s {
                bar.set_length(j.total_bytes);
                bar.set_position(j.done_bytes);
                bar.set_message(j.state.to_string());
            }
            match s {
                Some(j) if !j.state.is_final() => std::thread::sleep(Duration::from_millis(200)),
                s => break s,
            }
        };
        bar.finish_and_clear();
        let Some(status) = status else {
            if json {
                crate::outln!("{{\"state\":\"none\"}}");
            }
            anyhow::bail!("{kind:?} none: unknown error")
        };
        if json {
            // Keys sorted, as the document always printed.
            crate::outln!("{}", serde_json::to_value(&status)?);
        }
        let state = status.state;
        let mib = |b: u64| b as f64 / f64::from(1 << 20);
        let summary = format!(
            "{state}: examined {:.1} MiB, changed {:.1} MiB, sent {:.2} MiB of data, {:.2} MiB on the wire in {:.2} s",
            mib(status.done_bytes),
            mib(status.changed_bytes),
            mib(status.data_bytes),
            mib(status.wire_bytes),
            status.elapsed_s
        );
        match state {
            JobState::Done | JobState::UpToDate | JobState::Repaired => {
                if !json {
                    crate::outln!("{summary}");
                }
                Ok(())
            }
            JobState::DoneMismatches => {
                let ranges = serde_json::to_string(&status.mismatches)?;
                Err(CliError::Differ { count: status.mismatches.len(), ranges }.into())
            }
            _ => anyhow::bail!("{kind:?} {state}: {}", status.error.as_deref().unwrap_or("unknown error")),
        }
    }
}

/// The job on the node's volume, as its replica server reports it (`None`: it never ran one).
fn job_status(c: &mut Client) -> Result<Option<JobStatus>> {
    match c.call(&Message::JobStatus)? {
        Message::Json(text) => job_reply(&text),
        m => anyhow::bail!("job status: unexpected reply {m:?}"),
    }
}

/// The text of the reply to `JobStatus`: the job's status, or `{"state":"none"}`.
fn job_reply(text: &str) -> Result<Option<JobStatus>> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Reply {
        Job(Box<JobStatus>),
        Nothing { state: NoJob },
    }
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "lowercase")]
    enum NoJob {
        None,
    }
    match serde_json::from_str(text) {
        Ok(Reply::Job(j)) => Ok(Some(*j)),
        Ok(Reply::Nothing { state: NoJob::None }) => Ok(None),
        Err(e) => anyhow::bail!("job status not understood ({e}): {text}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Job;

    #[test]
    fn the_job_reply_reads_as_a_job_or_none() {
        // What the replica server sends: a job's status as JSON, or `{"state":"none"}`.
        let job = Job::new(JobKind::Verify, "127.0.0.1:7701".into()).status();
        let text = serde_json::to_string(&job).unwrap();
        assert_eq!(job_reply(&text).unwrap(), Some(job));
        assert_eq!(job_reply(r#"{"state":"none"}"#).unwrap(), None);
        assert!(job_reply(r#"{"state":"syncing"}"#).is_err(), "a job lacking its fields");
        assert!(job_reply("[]").is_err());
    }
}
