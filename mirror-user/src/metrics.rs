//! The Prometheus endpoint of `mirror serve` (`--metrics ADDR`, `GET /metrics`): read weights,
//! engine mode, each node's health and signals, the router's per-replica counters, its hedged
//! reads and sync progress, the lease (mode, epoch, time left), encoded with `prometheus-client` from a status snapshot taken at scrape time. The
//! Grafana dashboard `packaging/grafana/mirror.json` queries these names (a test holds it to
//! them).

use std::{net::SocketAddr, sync::Arc};

use http_body_util::Full;
use hyper::{body::Bytes, server::conn::http1, service::service_fn, Request, Response};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{
    lease::LeaseMode,
    volume::lease::{StandbyStatus, StandbyView},
    volume::replica::{ReplicaSnapshot, ReplicaState},
    weights::{driver::Driver, status::ServeStatus},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReplicaLabel {
    replica: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SignalLabel {
    replica: String,
    signal: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabel {
    mode: String,
}

type GaugeF = Gauge<f64, std::sync::atomic::AtomicU64>;
type Counters = Family<ReplicaLabel, Counter<u64>>;
/// One counter of a replica's snapshot.
type Field = fn(&ReplicaSnapshot) -> u64;

/// Encodes a status snapshot (as [`Driver::status`] makes it) in the Prometheus text format.
pub fn encode_status(st: &ServeStatus) -> String {
    let mut reg = Registry::with_prefix("mirror");
    let weight = Family::<ReplicaLabel, Gauge>::default();
    reg.register("read_weight", "Share of reads sent to the replica, percent", weight.clone());
    let mode = Family::<ModeLabel, Gauge>::default();
    reg.register("engine_mode", "Weighting engine mode (1 = current)", mode.clone());
    let changes = Counter::<u64>::default();
    reg.register("weight_changes", "Changes of the read weights since start", changes.clone());
    let health = Family::<ReplicaLabel, Gauge>::default();
    reg.register("node_health", "Node health score 0-100 from its heartbeat", health.clone());
    let up = Family::<ReplicaLabel, Gauge>::default();
    reg.register("node_reachable", "1 when the node answers heartbeats", up.clone());
    let in_sync = Family::<ReplicaLabel, Gauge>::default();
    reg.register("replica_in_sync", "1 when the replica holds every block", in_sync.clone());
    let sig_value = Family::<SignalLabel, GaugeF>::default();
    reg.register(
        "node_signal_value",
        "Health signal value (unit in the signal name's docs)",
        sig_value.clone(),
    );
    let sig_score = Family::<SignalLabel, GaugeF>::default();
    reg.register("node_signal_score", "Health signal sub-score 0-100", sig_score.clone());
    let counters: Vec<(Field, Counters)> = [
        ("reads", "Reads served by the replica", (|r| r.reads) as Field),
        ("writes", "Writes completed by the replica", |r| r.writes),
        ("read_bytes", "Bytes read from the replica", |r| r.read_bytes),
        ("write_bytes", "Bytes written to the replica", |r| r.write_bytes),
        ("errors", "I/O errors of the replica", |r| r.errors),
        ("timeouts", "Reads that missed their deadline on the replica", |r| r.timeouts),
        ("retries", "Reads retried on the other replica", |r| r.retries),
    ]
    .into_iter()
    .map(|(name, help, field)| {
        let f = Family::<ReplicaLabel, Counter<u64>>::default();
        reg.register(format!("replica_{name}"), help, f.clone());
        (field, f)
    })
    .collect();
    let sync_done = Family::<ReplicaLabel, Gauge>::default();
    reg.register(
        "replica_sync_done_bytes",
        "Bytes the current or last sync onto the replica has examined (0: none since start)",
        sync_done.clone(),
    );
    let sync_total = Family::<ReplicaLabel, Gauge>::default();
    reg.register(
        "replica_sync_total_bytes",
        "Bytes the current or last sync onto the replica has to examine (0: none since start)",
        sync_total.clone(),
    );
    let latency = Family::<ReplicaLabel, GaugeF>::default();
    reg.register(
        "replica_latency_seconds",
        "Data-path latency (EWMA of reads and writes, the larger)",
        latency.clone(),
    );

    let lease_mode = Family::<ModeLabel, Gauge>::default();
    reg.register(
        "lease_mode",
        "Lease mode of this router: active, standby, fenced (1 = current)",
        lease_mode.clone(),
    );
    let lease_epoch = Gauge::<i64>::default();
    reg.register("lease_epoch", "Fencing epoch this router writes at (0: no lease)", lease_epoch.clone());
    let lease_left = GaugeF::default();
    reg.register(
        "lease_time_left_seconds",
        "Time this router may still acknowledge writes without another renewal",
        lease_left.clone(),
    );
    if let Some(lease) = &st.router.lease {
        for each in LeaseMode::ALL {
            lease_mode
                .get_or_create(&ModeLabel { mode: each.as_str().into() })
                .set(i64::from(lease.mode == each));
        }
        lease_epoch.set(i64::try_from(lease.epoch.0).unwrap_or(i64::MAX));
        lease_left.set(lease.time_left_ms as f64 / 1e3);
    }

    let hedges_sent = Counter::<u64>::default();
    reg.register(
        "read_hedges_sent",
        "Reads sent to the other replica too after the first was slow",
        hedges_sent.clone(),
    );
    let hedges_won = Counter::<u64>::default();
    reg.register("read_hedges_won", "Hedged reads the other replica answered first", hedges_won.clone());
    hedges_sent.inc_by(st.router.hedges.sent);
    hedges_won.inc_by(st.router.hedges.won);

    let w = &st.router.weights;
    mode.get_or_create(&ModeLabel { mode: format!("{:?}", st.mode).to_lowercase() }).set(1);
    changes.inc_by(st.weight_changes);
    for r in st.replicas() {
        let (snap, node) = (&r.replica, &r.node);
        let l = ReplicaLabel { replica: snap.role.clone() };
        weight.get_or_create(&l).set(i64::from(if snap.role == "target" {
            w.target
        } else {
            100 - w.target
        }));
        if let Some(h) = node.health {
            health.get_or_create(&l).set(i64::from(h));
        }
        up.get_or_create(&l).set(i64::from(node.reachable));
        in_sync.get_or_create(&l).set(i64::from(snap.state == ReplicaState::InSync));
        for (k, f) in &counters {
            f.get_or_create(&l).inc_by(k(snap));
        }
        let (done, total) = node.sync.as_ref().map_or((0, 0), |j| (j.done_bytes, j.total_bytes));
        sync_done.get_or_create(&l).set(i64::try_from(done).unwrap_or(i64::MAX));
        sync_total.get_or_create(&l).set(i64::try_from(total).unwrap_or(i64::MAX));
        latency.get_or_create(&l).set(r.latency_us() as f64 / 1e6);
        for s in node.signals.iter().flatten() {
            let sl = SignalLabel { replica: snap.role.clone(), signal: s.name.clone() };
            sig_value.get_or_create(&sl).set(s.value);
            sig_score.get_or_create(&sl).set(s.score);
        }
    }
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &reg);
    out
}

/// A standby's metrics while it waits for the lease: its lease mode (`standby`), the epoch of the
/// active router it waits on, and how long it has waited.
pub fn encode_standby(st: &StandbyStatus) -> String {
    let mut reg = Registry::with_prefix("mirror");
    let lease_mode = Family::<ModeLabel, Gauge>::default();
    reg.register(
        "lease_mode",
        "Lease mode of this router: active, standby, fenced (1 = current)",
        lease_mode.clone(),
    );
    for each in LeaseMode::ALL {
        lease_mode
            .get_or_create(&ModeLabel { mode: each.as_str().into() })
            .set(i64::from(st.lease.mode == each));
    }
    let lease_epoch = Gauge::<i64>::default();
    reg.register(
        "lease_epoch",
        "Fencing epoch of the active router this standby waits on",
        lease_epoch.clone(),
    );
    lease_epoch.set(i64::try_from(st.lease.epoch.0).unwrap_or(i64::MAX));
    let lease_left = GaugeF::default();
    reg.register(
        "lease_time_left_seconds",
        "Time this router may still acknowledge writes without another renewal (0 on a standby)",
        lease_left.clone(),
    );
    let active_left = GaugeF::default();
    reg.register(
        "lease_active_time_left_seconds",
        "How long the active router's lease runs without a renewal, as the standby last read it",
        active_left.clone(),
    );
    active_left.set(st.active.as_ref().map_or(0.0, |a| a.time_left_ms as f64 / 1e3));
    let waiting = GaugeF::default();
    reg.register("standby_waiting_seconds", "How long this router has stood by", waiting.clone());
    waiting.set(st.waiting_ms as f64 / 1e3);
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &reg);
    out
}

/// What the metrics endpoint reports: the serving router's status, or, before it serves (a
/// standby waiting for the lease), the standby's.
#[derive(Debug)]
pub struct MetricsSource {
    driver: std::sync::OnceLock<Arc<Driver>>,
    standby: Option<StandbyView>,
}

impl MetricsSource {
    pub fn serving(driver: Arc<Driver>) -> Arc<MetricsSource> {
        let m = MetricsSource { driver: std::sync::OnceLock::new(), standby: None };
        let _ = m.driver.set(driver);
        Arc::new(m)
    }

    pub fn standing_by(view: StandbyView) -> Arc<MetricsSource> {
        Arc::new(MetricsSource { driver: std::sync::OnceLock::new(), standby: Some(view) })
    }

    /// The router serves from here (a second call changes nothing).
    pub fn serve_now(&self, driver: Arc<Driver>) {
        let _ = self.driver.set(driver);
    }

    async fn encode(&self) -> String {
        match (self.driver.get(), &self.standby) {
            (Some(d), _) => encode_status(&d.status().await),
            (None, Some(v)) => encode_standby(&v.status(std::time::Instant::now())),
            (None, None) => "# EOF\n".into(),
        }
    }
}

/// Serves `GET /metrics` on `addr` until the task is dropped; returns the bound address.
pub async fn serve(source: Arc<MetricsSource>, addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let d = source.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let d = d.clone();
                    async move {
                        let resp = if req.uri().path() == "/metrics" {
                            let body = d.encode().await;
                            Response::builder()
                                .header(
                                    "content-type",
                                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                )
                                .body(Full::new(Bytes::from(body)))
                        } else {
                            Response::builder().status(404).body(Full::new(Bytes::from("see /metrics\n")))
                        };
                        resp
                    }
                });
                if let Err(e) = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await {
                    tracing::debug!("metrics connection: {e}");
                }
            });
        }
    });
    Ok(local)
}

#[cfg(test)]
mod tests {
    use crate::{
        lease::{Epoch, Holder, LeaseMode},
        volume::{fence::LeaseStatus, replica::ReplicaState},
        weights::{engine::Mode, status::example},
    };

    #[test]
    fn encodes_weights_health_signals_and_counters() {
        let mut st = example();
        st.mode = Mode::Failover;
        st.router.weights.source = 0;
        st.router.weights.target = 100;
        let [source, target] = &mut st.router.replicas;
        source.replica.state = ReplicaState::Failed;
        (source.replica.reads, source.replica.writes, source.node.health) = (10, 20, Some(12));
        target.node.sync = source.node.sync.take();
        let job = target.node.sync.as_mut().unwrap();
        (job.done_bytes, job.total_bytes) = (1024, 4096);
        st.router.hedges.sent = 5;
        st.router.hedges.won = 4;
        st.router.lease = Some(LeaseStatus {
            store: "embedded".into(),
            mode: LeaseMode::Fenced,
            holder: Holder("n/1".into()),
            epoch: Epoch(4),
            ttl_ms: 2000,
            time_left_ms: 0,
            reason: "a replica refused a write".into(),
        });
        let text = super::encode_status(&st);
        for want in [
            "mirror_read_weight{replica=\"target\"} 100",
            "mirror_read_weight{replica=\"source\"} 0",
            "mirror_engine_mode{mode=\"failover\"} 1",
            "mirror_node_health{replica=\"source\"} 12",
            "mirror_node_reachable{replica=\"target\"} 0",
            "mirror_replica_in_sync{replica=\"source\"} 0",
            "mirror_replica_in_sync{replica=\"target\"} 1",
            "mirror_replica_reads_total{replica=\"source\"} 10",
            "mirror_replica_writes_total{replica=\"source\"} 20",
            "mirror_replica_read_bytes_total{replica=\"source\"} 50565120",
            "mirror_replica_errors_total{replica=\"source\"} 1",
            "mirror_replica_retries_total{replica=\"source\"} 2",
            "mirror_weight_changes_total 3",
            "mirror_read_hedges_sent_total 5",
            "mirror_read_hedges_won_total 4",
            "mirror_node_signal_value{replica=\"source\",signal=\"disk_latency_ratio\"} 14.5",
            "mirror_node_signal_score{replica=\"source\",signal=\"disk_latency_ratio\"} 0.0",
            "mirror_replica_latency_seconds{replica=\"source\"} 0.0009",
            "mirror_replica_sync_done_bytes{replica=\"target\"} 1024",
            "mirror_replica_sync_total_bytes{replica=\"target\"} 4096",
            "mirror_replica_sync_total_bytes{replica=\"source\"} 0",
            "mirror_lease_mode{mode=\"fenced\"} 1",
            "mirror_lease_mode{mode=\"active\"} 0",
            "mirror_lease_epoch 4",
            "mirror_lease_time_left_seconds 0.0",
            "# EOF",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        assert!(!text.contains("mirror_node_health{replica=\"target\"}"), "no score yet, no sample:\n{text}");
    }

    #[test]
    fn a_standby_shows_its_mode_and_what_it_waits_on() {
        let view = crate::volume::lease::StandbyView::new(
            "v",
            Holder::new("nodeB", "1"),
            std::time::Duration::from_secs(2),
        );
        let text = super::encode_standby(&view.status(std::time::Instant::now()));
        for want in [
            "mirror_lease_mode{mode=\"standby\"} 1",
            "mirror_lease_mode{mode=\"active\"} 0",
            "mirror_lease_epoch 0",
            "mirror_lease_time_left_seconds 0.0",
            "mirror_lease_active_time_left_seconds 0.0",
            "mirror_standby_waiting_seconds",
            "# EOF",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }
}
