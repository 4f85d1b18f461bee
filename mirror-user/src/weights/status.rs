//! [`ServeStatus`]: the state of a running `mirror serve` as one typed document, from the
//! replicas' counters up to the weighting loop's decision. The driver assembles it
//! ([`super::driver::Driver::status`]); the control socket carries it (`mirror ctl status`), the
//! metrics endpoint encodes it, `ctl status` renders its table and `--watch` screen from it.
//!
//! Its JSON is the document `mirror ctl status --json` prints; `docs/status.md` lists every field
//! with its type and meaning, and the field names and shapes stay as they are there (tests hold
//! both the structs and a real `serve`'s document to that list). Layout:
//!
//! - the router's part ([`RouterStatus`]: size, weights, write intent) flattened into the top
//!   level, each of its two replicas a [`ReplicaStatus`]: the router's [`ReplicaSnapshot`]
//!   flattened, plus the `node` it runs on ([`NodeStatus`]: health, signals, heartbeat,
//!   data-path score, and the sync job that brings the replica back);
//! - the loop's part: mode, reason, count of weight changes, uptime, the recent [`WeightEvent`]s.

use serde::{Deserialize, Serialize};

use super::engine::Mode;
use crate::{
    health::monitor::SignalReport,
    storage::JobStatus,
    volume::{replica::ReplicaSnapshot, router::RouterStatus},
};

/// The status of `mirror serve` (`mirror ctl status --json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServeStatus {
    /// Size, weights, write intent and both replicas (source, target).
    #[serde(flatten)]
    pub router: RouterStatus<ReplicaStatus>,
    /// The weighting engine's mode.
    pub mode: Mode,
    /// Why the weights are what they are (the engine's last decision).
    pub reason: String,
    /// Changes of the read weights since start (the start itself counts).
    pub weight_changes: u64,
    /// Milliseconds since `mirror serve` started.
    pub uptime_ms: u64,
    /// The recent weight changes, oldest first (at most 256).
    pub events: Vec<WeightEvent>,
}

/// One replica in [`ServeStatus`]: the router's view of it and the node it runs on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    /// Role, location, state, counters and latency, as the router counts them.
    #[serde(flatten)]
    pub replica: ReplicaSnapshot,
    pub node: NodeStatus,
}

/// What the weighting loop knows of the node that holds a replica.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The node's health score 0..=100 (this node's own monitor for a local replica, the latest
    /// heartbeat answer for a remote one); `None` before the first answer.
    pub health: Option<u8>,
    /// The signals behind the score; `None` before the node's first report.
    pub signals: Option<Vec<SignalReport>>,
    /// Where the node's figures come from (`ebpf`, `procfs`); `None` before its first report.
    pub telemetry: Option<String>,
    /// Milliseconds since the latest heartbeat answer (0 for a local replica); `None` before
    /// the first.
    pub heartbeat_age_ms: Option<u64>,
    /// False when the latest heartbeat could not reach the node.
    pub reachable: bool,
    /// Score 0..=100 from the data path's latency against its own baseline (rounded); `None`
    /// before the first I/O.
    pub datapath_score: Option<f64>,
    /// While the replica is not in sync: the job that brings it back, as its survivor reports
    /// it (current or last); `None` when in sync, or when the survivor did not answer in time.
    pub sync: Option<JobStatus>,
}

/// One change of the read weights, as `mirror ctl status` lists it (`events`) and the demo's
/// timeline draws it. Fields in the order of its JSON text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeightEvent {
    pub mode: Mode,
    pub reason: String,
    /// Milliseconds since `mirror serve` started.
    pub t_ms: u64,
    /// The target's share of reads after the change, percent.
    pub target: u8,
}

impl ServeStatus {
    /// The target's share of reads, percent.
    pub fn target_weight(&self) -> u8 {
        self.router.weights.target
    }

    /// Source, target.
    pub fn replicas(&self) -> &[ReplicaStatus; 2] {
        &self.router.replicas
    }
}

impl ReplicaStatus {
    /// The replica's share of reads in `st`, percent.
    pub fn weight(&self, st: &ServeStatus) -> u8 {
        if self.replica.role == "target" {
            st.router.weights.target
        } else {
            st.router.weights.source
        }
    }

    /// The data path's latency: the larger of the read and write averages, microseconds.
    pub fn latency_us(&self) -> u64 {
        self.replica.read_latency_us.max(self.replica.write_latency_us)
    }
}

/// A status with every kind of value set, for the tests of the modules that render it.
#[cfg(test)]
pub(crate) fn example() -> ServeStatus {
    use crate::{
        storage::{JobKind, JobState},
        volume::{replica::ReplicaState, router::WeightsStatus},
    };
    let snapshot = |role: &str, state, reads, lat: (u64, u64)| ReplicaSnapshot {
        role: role.into(),
        location: format!("local:/srv/{role}.img"),
        io: "io_uring".into(),
        state,
        reads,
        writes: 7,
        read_bytes: reads * 4096,
        write_bytes: 7 * 4096,
        errors: u64::from(role == "source"),
        timeouts: 0,
        retries: if role == "source" { 2 } else { 0 },
        read_latency_us: lat.0,
        write_latency_us: lat.1,
    };
    let job = JobStatus {
        kind: JobKind::Sync,
        peer: "127.0.0.1:7701".into(),
        state: JobState::Syncing,
        plan: "Resync".into(),
        total_bytes: 1024,
        done_bytes: 256,
        changed_bytes: 128,
        data_bytes: 64,
        wire_bytes: 100,
        rate_bps: 512.0,
        eta_s: Some(1.5),
        elapsed_s: 0.5,
        mismatches: vec![],
        error: None,
    };
    ServeStatus {
        router: RouterStatus {
            size: 1024,
            weights: WeightsStatus { source: 40, target: 60 },
            intent_extents: 1,
            hedges: crate::volume::router::HedgeStatus { sent: 5, won: 4 },
            lease: None,
            replicas: [
                ReplicaStatus {
                    replica: snapshot("source", ReplicaState::Resyncing, 12345, (150, 900)),
                    node: NodeStatus {
                        health: Some(91),
                        signals: Some(vec![SignalReport {
                            name: "disk_latency_ratio".into(),
                            score: 0.0,
                            unit: "x baseline".into(),
                            value: 14.5,
                        }]),
                        telemetry: Some("ebpf".into()),
                        heartbeat_age_ms: Some(40),
                        reachable: true,
                        datapath_score: Some(100.0),
                        sync: Some(job),
                    },
                },
                ReplicaStatus {
                    replica: snapshot("target", ReplicaState::InSync, 3, (80, 700)),
                    node: NodeStatus {
                        health: None,
                        signals: None,
                        telemetry: None,
                        heartbeat_age_ms: None,
                        reachable: false,
                        datapath_score: None,
                        sync: None,
                    },
                },
            ],
        },
        mode: Mode::Failback,
        reason: "ramping reads back".into(),
        weight_changes: 3,
        uptime_ms: 9500,
        events: vec![
            WeightEvent { mode: Mode::Failover, reason: "source down".into(), t_ms: 1500, target: 100 },
            WeightEvent { mode: Mode::Failback, reason: "ramping reads back".into(), t_ms: 9000, target: 60 },
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(v: &serde_json::Value) -> Vec<&str> {
        let mut k: Vec<&str> = v.as_object().expect("an object").keys().map(String::as_str).collect();
        k.sort_unstable();
        k
    }

    /// The field names and shapes `mirror ctl status --json` always had (docs/status.md).
    #[test]
    fn serve_status_json_keeps_its_field_names_and_shapes() {
        let v = serde_json::to_value(example()).unwrap();
        assert_eq!(
            keys(&v),
            [
                "events",
                "hedges",
                "intent_extents",
                "lease",
                "mode",
                "reason",
                "replicas",
                "size",
                "uptime_ms",
                "weight_changes",
                "weights"
            ]
        );
        assert_eq!(v["mode"], "Failback");
        assert_eq!(v["weights"], serde_json::json!({"source": 40, "target": 60}));
        assert_eq!(v["hedges"], serde_json::json!({"sent": 5, "won": 4}));
        assert_eq!(
            v["events"][0],
            serde_json::json!({"mode": "Failover", "reason": "source down", "t_ms": 1500, "target": 100})
        );
        let r = &v["replicas"];
        assert_eq!(r.as_array().map(Vec::len), Some(2));
        // Each replica: the router's snapshot (its own test holds its names) flattened, and `node`.
        let snapshot = serde_json::to_value(&example().router.replicas[0].replica).unwrap();
        let mut want = keys(&snapshot);
        want.push("node");
        want.sort_unstable();
        assert_eq!(keys(&r[0]), want);
        assert_eq!((&r[0]["role"], &r[0]["state"]), (&"source".into(), &"resyncing".into()));
        let node_keys =
            ["datapath_score", "health", "heartbeat_age_ms", "reachable", "signals", "sync", "telemetry"];
        assert_eq!(keys(&r[0]["node"]), node_keys);
        assert_eq!(keys(&r[1]["node"]), node_keys, "absent values are null, not left out");
        assert_eq!(
            r[0]["node"]["signals"][0],
            serde_json::json!({"name": "disk_latency_ratio", "score": 0.0, "unit": "x baseline", "value": 14.5})
        );
        assert_eq!(r[0]["node"]["sync"]["state"], "syncing");
        assert_eq!(r[0]["node"]["datapath_score"], 100.0);
        for k in node_keys.iter().filter(|k| **k != "reachable") {
            assert!(r[1]["node"][k].is_null(), "{k}: {}", r[1]["node"]);
        }
        assert_eq!(r[1]["node"]["reachable"], false);
    }

    #[test]
    fn serve_status_reads_back_from_its_json() {
        let text = serde_json::to_string(&example()).unwrap();
        assert_eq!(serde_json::from_str::<ServeStatus>(&text).unwrap(), example());
        // A signal whose value is not a number is written as null and reads back as NaN.
        let mut st = example();
        st.router.replicas[0].node.signals.as_mut().unwrap()[0].value = f64::NAN;
        let v = serde_json::to_value(&st).unwrap();
        assert!(v["replicas"][0]["node"]["signals"][0]["value"].is_null());
        let back: ServeStatus = serde_json::from_value(v).unwrap();
        assert!(back.replicas()[0].node.signals.as_ref().unwrap()[0].value.is_nan());
    }

    #[test]
    fn helpers_read_weights_and_latency() {
        let st = example();
        assert_eq!(st.target_weight(), 60);
        let [s, t] = st.replicas();
        assert_eq!((s.weight(&st), t.weight(&st)), (40, 60));
        assert_eq!((s.latency_us(), t.latency_us()), (900, 700));
    }
}
