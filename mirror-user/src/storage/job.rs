//! The job slot of a volume: the live progress of the sync or verify job running on it (the
//! algorithm is `replication::sync`), and its typed snapshot [`JobStatus`] for status replies.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

/// Kinds of background jobs a replica server runs against its peer (`Message::StartJob`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum JobKind {
    /// Push what differs (dirty bitmap, or everything on a first sync) to the peer.
    Sync,
    /// Compare digests of the whole volume with the peer and report mismatches.
    Verify,
    /// Verify, then resync the mismatching ranges.
    VerifyRepair,
}

/// Where a job is, as status reports it (the strings are the JSON values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobState {
    /// Connecting to and authenticating with the peer.
    Connecting,
    /// Sending what differs.
    Syncing,
    /// Comparing digests of the whole volume.
    Verifying,
    /// Resending the ranges a verify found different.
    Repairing,
    /// Ended: the peer already held everything.
    UpToDate,
    /// Ended: synced, or verified without a mismatch.
    Done,
    /// Ended: verify found mismatches (and did not repair them).
    DoneMismatches,
    /// Ended: verify found mismatches and resent them.
    Repaired,
    /// Ended: not safe to push (split brain, newer peer, size mismatch).
    Refused,
    /// Ended: cancelled by the operator.
    Cancelled,
    /// Ended: an error (the job's `error` says which).
    Failed,
}

impl JobState {
    /// The state's name, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Connecting => "connecting",
            JobState::Syncing => "syncing",
            JobState::Verifying => "verifying",
            JobState::Repairing => "repairing",
            JobState::UpToDate => "up-to-date",
            JobState::Done => "done",
            JobState::DoneMismatches => "done-mismatches",
            JobState::Repaired => "repaired",
            JobState::Refused => "refused",
            JobState::Cancelled => "cancelled",
            JobState::Failed => "failed",
        }
    }

    /// True once the job ended (successfully or not).
    pub fn is_final(self) -> bool {
        !matches!(self, JobState::Connecting | JobState::Syncing | JobState::Verifying | JobState::Repairing)
    }

    /// True for the end states after which the peer holds this replica's data.
    pub fn synced(self) -> bool {
        matches!(self, JobState::Done | JobState::UpToDate)
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A snapshot of a job, for status replies (`Message::JobStatus`, a volume's `job`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct JobStatus {
    pub kind: JobKind,
    pub peer: String,
    pub state: JobState,
    /// The sync plan chosen (`Resync`, `Full`, ...), empty before it is.
    pub plan: String,
    pub total_bytes: u64,
    pub done_bytes: u64,
    pub changed_bytes: u64,
    pub data_bytes: u64,
    pub wire_bytes: u64,
    pub rate_bps: f64,
    pub eta_s: Option<f64>,
    pub elapsed_s: f64,
    /// Ranges `(offset, len)` a verify found different.
    pub mismatches: Vec<(u64, u64)>,
    pub error: Option<String>,
}

/// Reads the bytes a job's connection moved so far (its wire counter).
#[derive(Clone)]
pub struct WireBytes(pub Arc<dyn Fn() -> u64 + Send + Sync>);

impl std::fmt::Debug for WireBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WireBytes({})", (self.0)())
    }
}

/// Live state of a job, shared with status requests.
#[derive(Debug)]
pub struct Job {
    pub kind: JobKind,
    pub peer: String,
    started: Instant,
    pub cancel: AtomicBool,
    finished: AtomicBool,
    /// Bytes of volume to examine (grows if writes re-dirty blocks).
    pub total_bytes: AtomicU64,
    /// Bytes of volume examined.
    pub done_bytes: AtomicU64,
    /// Payload bytes of data sent (after compression).
    pub data_bytes: AtomicU64,
    /// Bytes found different and rewritten on the peer (before compression).
    pub changed_bytes: AtomicU64,
    wire: Mutex<Option<WireBytes>>,
    state: Mutex<JobState>,
    plan: Mutex<String>,
    error: Mutex<Option<String>>,
    mismatches: Mutex<Vec<(u64, u64)>>,
    elapsed: Mutex<Option<Duration>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Job {
    pub fn new(kind: JobKind, peer: String) -> Self {
        Job {
            kind,
            peer,
            started: Instant::now(),
            cancel: AtomicBool::new(false),
            finished: AtomicBool::new(false),
            total_bytes: AtomicU64::new(0),
            done_bytes: AtomicU64::new(0),
            data_bytes: AtomicU64::new(0),
            changed_bytes: AtomicU64::new(0),
            wire: Mutex::new(None),
            state: Mutex::new(JobState::Connecting),
            plan: Mutex::new(String::new()),
            error: Mutex::new(None),
            mismatches: Mutex::new(Vec::new()),
            elapsed: Mutex::new(None),
        }
    }

    pub fn finished(&self) -> bool {
        self.finished.load(Ordering::SeqCst)
    }

    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    pub fn set_state(&self, s: JobState) {
        *lock(&self.state) = s;
    }

    pub fn set_plan(&self, plan: String) {
        *lock(&self.plan) = plan;
    }

    pub fn plan(&self) -> String {
        lock(&self.plan).clone()
    }

    pub fn set_wire(&self, w: WireBytes) {
        *lock(&self.wire) = Some(w);
    }

    pub fn set_mismatches(&self, m: Vec<(u64, u64)>) {
        *lock(&self.mismatches) = m;
    }

    /// Records the end of the job: its final state and, for a failure, the error.
    pub fn finish(&self, state: JobState, error: Option<String>) {
        *lock(&self.elapsed) = Some(self.started.elapsed());
        self.set_state(state);
        *lock(&self.error) = error;
        self.finished.store(true, Ordering::SeqCst);
    }

    pub fn status(&self) -> JobStatus {
        let elapsed = lock(&self.elapsed).unwrap_or_else(|| self.started.elapsed()).as_secs_f64();
        let done = self.done_bytes.load(Ordering::Relaxed);
        let total = self.total_bytes.load(Ordering::Relaxed).max(done);
        let rate = if elapsed > 0.0 { done as f64 / elapsed } else { 0.0 };
        let eta = if rate > 0.0 && !self.finished() { Some((total - done) as f64 / rate) } else { None };
        JobStatus {
            kind: self.kind,
            peer: self.peer.clone(),
            state: *lock(&self.state),
            plan: self.plan(),
            total_bytes: total,
            done_bytes: done,
            changed_bytes: self.changed_bytes.load(Ordering::Relaxed),
            data_bytes: self.data_bytes.load(Ordering::Relaxed),
            wire_bytes: lock(&self.wire).as_ref().map_or(0, |w| (w.0)()),
            rate_bps: rate,
            eta_s: eta,
            elapsed_s: elapsed,
            mismatches: lock(&self.mismatches).clone(),
            error: lock(&self.error).clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_status_json_keeps_its_field_names_and_state_strings() {
        let j = Job::new(JobKind::Verify, "10.0.0.2:7700".into());
        j.total_bytes.store(100, Ordering::Relaxed);
        j.set_wire(WireBytes(Arc::new(|| 77)));
        let v = serde_json::to_value(j.status()).unwrap();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "changed_bytes",
                "data_bytes",
                "done_bytes",
                "elapsed_s",
                "error",
                "eta_s",
                "kind",
                "mismatches",
                "peer",
                "plan",
                "rate_bps",
                "state",
                "total_bytes",
                "wire_bytes"
            ]
        );
        assert_eq!(v["state"], "connecting");
        assert_eq!(v["kind"], "Verify");
        assert_eq!(v["wire_bytes"], 77);
        assert_eq!(v["error"], serde_json::Value::Null);
        j.set_mismatches(vec![(4096, 8192)]);
        j.finish(JobState::DoneMismatches, None);
        let v = serde_json::to_value(j.status()).unwrap();
        assert_eq!(v["state"], "done-mismatches");
        assert_eq!(v["mismatches"], serde_json::json!([[4096, 8192]]));
        assert_eq!(v["eta_s"], serde_json::Value::Null, "no estimate once finished");
        let names: Vec<String> = [
            JobState::Connecting,
            JobState::Syncing,
            JobState::Verifying,
            JobState::Repairing,
            JobState::UpToDate,
            JobState::Done,
            JobState::DoneMismatches,
            JobState::Repaired,
            JobState::Refused,
            JobState::Cancelled,
            JobState::Failed,
        ]
        .iter()
        .map(|s| {
            let name = serde_json::to_value(s).unwrap().as_str().unwrap().to_string();
            assert_eq!(name, s.as_str(), "Display and JSON agree");
            name
        })
        .collect();
        assert_eq!(
            names,
            [
                "connecting",
                "syncing",
                "verifying",
                "repairing",
                "up-to-date",
                "done",
                "done-mismatches",
                "repaired",
                "refused",
                "cancelled",
                "failed"
            ]
        );
        // And back: a remote job's status decodes into the same type.
        let back: JobStatus = serde_json::from_value(v).unwrap();
        assert_eq!(back.state, JobState::DoneMismatches);
    }
}
