//! The Prometheus endpoint of `mirror serve` (`--metrics ADDR`, `GET /metrics`): read weights,
//! engine mode, each node's health and signals, the router's per-replica counters and sync
//! progress, the lease (mode, epoch, time left), encoded with `prometheus-client` from a status snapshot taken at scrape time. The
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

use crate::weights::driver::Driver;

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

/// Encodes a status snapshot (as `Driver::status_json` makes it) in the Prometheus text format.
pub fn encode_status(st: &serde_json::Value) -> String {
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
    let counters: Vec<(&str, Counters)> = [
        ("reads", "Reads served by the replica"),
        ("writes", "Writes completed by the replica"),
        ("read_bytes", "Bytes read from the replica"),
        ("write_bytes", "Bytes written to the replica"),
        ("errors", "I/O errors of the replica"),
        ("timeouts", "Reads that missed their deadline on the replica"),
        ("retries", "Reads retried on the other replica"),
    ]
    .into_iter()
    .map(|(k, help)| {
        let f = Family::<ReplicaLabel, Counter<u64>>::default();
        reg.register(format!("replica_{k}"), help, f.clone());
        (k, f)
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
    let lease = &st["lease"];
    if let Some(m) = lease["mode"].as_str() {
        for each in ["active", "standby", "fenced"] {
            lease_mode.get_or_create(&ModeLabel { mode: each.into() }).set(i64::from(m == each));
        }
        lease_epoch.set(lease["epoch"].as_i64().unwrap_or(0));
        lease_left.set(lease["time_left_ms"].as_f64().unwrap_or(0.0) / 1e3);
    }

    let w_target = st["weights"]["target"].as_i64().unwrap_or(0);
    if let Some(m) = st["mode"].as_str() {
        mode.get_or_create(&ModeLabel { mode: m.to_lowercase() }).set(1);
    }
    changes.inc_by(st["weight_changes"].as_u64().unwrap_or(0));
    for r in st["replicas"].as_array().into_iter().flatten() {
        let role = r["role"].as_str().unwrap_or("?").to_string();
        let l = ReplicaLabel { replica: role.clone() };
        weight.get_or_create(&l).set(if role == "target" { w_target } else { 100 - w_target });
        if let Some(h) = r["node"]["health"].as_i64() {
            health.get_or_create(&l).set(h);
        }
        up.get_or_create(&l).set(i64::from(r["node"]["reachable"] != false));
        in_sync.get_or_create(&l).set(i64::from(r["state"] == "in-sync"));
        for (k, f) in &counters {
            f.get_or_create(&l).inc_by(r[*k].as_u64().unwrap_or(0));
        }
        let job = &r["node"]["sync"];
        sync_done.get_or_create(&l).set(job["done_bytes"].as_i64().unwrap_or(0));
        sync_total.get_or_create(&l).set(job["total_bytes"].as_i64().unwrap_or(0));
        let lat =
            r["read_latency_us"].as_f64().unwrap_or(0.0).max(r["write_latency_us"].as_f64().unwrap_or(0.0));
        latency.get_or_create(&l).set(lat / 1e6);
        for s in r["node"]["signals"].as_array().into_iter().flatten() {
            let sl =
                SignalLabel { replica: role.clone(), signal: s["name"].as_str().unwrap_or("?").to_string() };
            sig_value.get_or_create(&sl).set(s["value"].as_f64().unwrap_or(f64::NAN));
            sig_score.get_or_create(&sl).set(s["score"].as_f64().unwrap_or(f64::NAN));
        }
    }
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &reg);
    out
}

/// Serves `GET /metrics` on `addr` until the task is dropped; returns the bound address.
pub async fn serve(driver: Arc<Driver>, addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let d = driver.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let d = d.clone();
                    async move {
                        let resp = if req.uri().path() == "/metrics" {
                            let body = encode_status(&d.status_json().await);
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
    #[test]
    fn encodes_weights_health_signals_and_counters() {
        let st = serde_json::json!({
            "mode": "Failover", "weight_changes": 3,
            "weights": {"source": 0, "target": 100},
            "replicas": [
                {"role": "source", "state": "failed", "reads": 10, "writes": 20, "read_bytes": 40960,
                 "write_bytes": 81920, "errors": 1, "timeouts": 0, "retries": 2,
                 "read_latency_us": 150, "write_latency_us": 900,
                 "node": {"health": 12, "reachable": true, "signals": [
                     {"name": "disk_latency_ratio", "value": 14.5, "unit": "x baseline", "score": 0.0}]}},
                {"role": "target", "state": "in-sync", "reads": 7, "writes": 20,
                 "node": {"health": 97, "reachable": true, "signals": [],
                          "sync": {"state": "syncing", "done_bytes": 1024, "total_bytes": 4096}}},
            ],
            "lease": {"store": "embedded", "mode": "fenced", "holder": "n/1", "epoch": 4, "ttl_ms": 2000,
                      "time_left_ms": 0, "reason": "a replica refused a write"},
        });
        let text = super::encode_status(&st);
        for want in [
            "mirror_read_weight{replica=\"target\"} 100",
            "mirror_read_weight{replica=\"source\"} 0",
            "mirror_engine_mode{mode=\"failover\"} 1",
            "mirror_node_health{replica=\"source\"} 12",
            "mirror_replica_in_sync{replica=\"source\"} 0",
            "mirror_replica_reads_total{replica=\"source\"} 10",
            "mirror_replica_errors_total{replica=\"source\"} 1",
            "mirror_weight_changes_total 3",
            "mirror_node_signal_value{replica=\"source\",signal=\"disk_latency_ratio\"} 14.5",
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
    }
}
