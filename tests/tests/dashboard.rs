//! The packaged Grafana dashboard (`packaging/grafana/`) against a real `mirror serve
//! --metrics`: every PromQL expression in it parses (promql-parser), and every metric name and
//! label its selectors use is one that the running router's `/metrics` exports. The names come
//! from the dashboard's own queries, never from a list kept here.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::BufRead,
    path::Path,
    process::{Command, Stdio},
};

use mirror_tests::{
    env::mirror_bin,
    fs::{secret_file, TempDir},
    net::http_get,
};
use promql_parser::parser::{self, Expr};

const DASHBOARD: &str = "../packaging/grafana/dashboards/mirror.json";

/// Labels Prometheus adds at scrape time, not the exporter.
const TARGET_LABELS: &[&str] = &["instance", "job"];

/// Every string under a key `expr` (panel targets, annotations), and the metric of each
/// `label_values(METRIC, LABEL)` variable query.
fn queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                    ("definition", serde_json::Value::String(s)) if s.starts_with("label_values(") => {
                        let inner = s.trim_start_matches("label_values(").trim_end_matches(')');
                        let (metric, label) = inner.split_once(',').expect("label_values(METRIC, LABEL)");
                        out.push(format!("count by ({}) ({})", label.trim(), metric.trim()));
                    }
                    _ => queries(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| queries(v, out)),
        _ => {}
    }
}

/// Grafana's variables, replaced by what they stand for so the text is PromQL.
fn expand(q: &str) -> String {
    q.replace("$__rate_interval", "1m").replace("$__interval", "1m").replace("$instance", ".*")
}

/// The metric names and label names an expression's selectors use: (metric, labels).
fn selectors(e: &Expr, out: &mut Vec<(String, Vec<String>)>) {
    let mut vs = |v: &parser::VectorSelector| {
        let name = v.name.clone().expect("every selector names its metric");
        let labels = v.matchers.matchers.iter().map(|m| m.name.clone()).filter(|n| n != "__name__").collect();
        out.push((name, labels));
    };
    match e {
        Expr::VectorSelector(v) => vs(v),
        Expr::MatrixSelector(m) => vs(&m.vs),
        Expr::Aggregate(a) => {
            selectors(&a.expr, out);
            if let Some(p) = &a.param {
                selectors(p, out);
            }
        }
        Expr::Unary(u) => selectors(&u.expr, out),
        Expr::Binary(b) => {
            selectors(&b.lhs, out);
            selectors(&b.rhs, out);
        }
        Expr::Paren(p) => selectors(&p.expr, out),
        Expr::Subquery(s) => selectors(&s.expr, out),
        Expr::Call(c) => c.args.args.iter().for_each(|a| selectors(a, out)),
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
    }
}

/// The sample names of a Prometheus / OpenMetrics text and the labels each carries.
fn exported(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut m: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) => line.split_at(i),
            None => continue,
        };
        let labels = m.entry(name.to_string()).or_default();
        if let Some(body) = rest.strip_prefix('{').and_then(|r| r.split_once('}')).map(|(b, _)| b) {
            for pair in body.split(',').filter(|p| !p.is_empty()) {
                labels.insert(pair.split_once('=').map_or(pair, |(k, _)| k).to_string());
            }
        }
    }
    m
}

#[test]
fn every_metric_the_dashboard_queries_is_exported_by_a_running_serve() {
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(DASHBOARD)).unwrap(),
    )
    .unwrap();
    let mut qs = Vec::new();
    queries(&dash, &mut qs);
    assert!(qs.len() >= 10, "the dashboard's queries: {qs:?}");
    let mut used = Vec::new();
    for q in &qs {
        let e = parser::parse(&expand(q)).unwrap_or_else(|err| panic!("{q:?} is not PromQL: {err}"));
        selectors(&e, &mut used);
    }

    // A real router with metrics: two local replicas, the control socket and pins its own.
    let dir = TempDir::new("dashboard");
    let secret = secret_file(&dir.0);
    let d = dir.0.display();
    let mut child = Command::new(mirror_bin())
        .args([
            "serve",
            "--volume",
            "v",
            "--assume-clean",
            "--nbd",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
        ])
        .args(["--source", &format!("local:{d}/a.img:8M"), "--target", &format!("local:{d}/b.img:8M")])
        .args(["--secret-file", &secret.display().to_string(), "--ctl-socket", &format!("{d}/ctl.sock")])
        .args(["--pin-dir", &format!("{d}/pins")])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn mirror serve");
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut metrics = None;
    for _ in 0..3 {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        if let Some(a) = line.trim().strip_prefix("metrics on ") {
            metrics = Some(a.to_string());
            break;
        }
    }
    let addr = metrics.expect("serve announced its metrics address");
    // The health monitor publishes its first score after one interval; scrape once it has.
    let mut text = String::new();
    for _ in 0..50 {
        text = http_get(&addr, "/metrics").unwrap();
        if text.contains("mirror_node_signal_score{") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    let have = exported(&text);

    let mut missing = Vec::new();
    for (name, labels) in &used {
        match have.get(name) {
            None => missing.push(format!("{name} (no such metric)")),
            Some(has) => {
                for l in labels.iter().filter(|l| !TARGET_LABELS.contains(&l.as_str())) {
                    if !has.contains(l) {
                        missing.push(format!("{name}{{{l}}} (no such label; it has {has:?})"));
                    }
                }
            }
        }
    }
    assert!(missing.is_empty(), "the dashboard queries what /metrics does not export: {missing:?}\n{text}");
    let names: BTreeSet<&str> = used.iter().map(|(n, _)| n.as_str()).collect();
    eprintln!("dashboard: {} queries over {} metrics, all exported: {names:?}", qs.len(), names.len());
}
