//! What the NBD benchmark drivers share (`bench_nbd`, `bench_tls`): fio's nbd engine and its
//! four jobs, starting `mirror` processes, the rotation of the configurations per round, and
//! samples kept per (configuration, job) with their medians and spread.

use std::{collections::BTreeMap, path::Path, process::Command, time::Duration};

use anyhow::{bail, ensure, Context, Result};

use crate::{
    proc::{drain, spawn_until, Kill},
    stats::median,
};

/// A fio job: name, `--rw`, `--bs`, `--iodepth`.
#[derive(Clone, Copy, Debug)]
pub struct Job {
    pub name: &'static str,
    pub rw: &'static str,
    pub bs: &'static str,
    pub depth: u32,
}

impl Job {
    /// 4 KiB jobs are measured in IOPS, the others in MiB/s.
    pub fn unit(&self) -> &'static str {
        if self.bs == "4k" {
            "IOPS"
        } else {
            "MiB/s"
        }
    }
}

/// 4 KiB random read / write at queue depth 32, 128 KiB sequential read / write at 8.
pub const JOBS: &[Job] = &[
    Job { name: "randread", rw: "randread", bs: "4k", depth: 32 },
    Job { name: "randwrite", rw: "randwrite", bs: "4k", depth: 32 },
    Job { name: "seqread", rw: "read", bs: "128k", depth: 8 },
    Job { name: "seqwrite", rw: "write", bs: "128k", depth: 8 },
];

/// Runs fio's nbd engine (libnbd) against `uri`; returns IOPS for 4 KiB jobs and MiB/s for
/// the others.
pub fn fio(uri: &str, job: Job, runtime: u64, size: u64) -> Result<f64> {
    fio_in(uri, job, runtime, size, None)
}

/// [`fio`] with `HOME` set to `home`: for `nbds://` URIs, where libnbd reads its X.509
/// credentials from `$HOME/.pki/libnbd/` (fio's engine may not pass `tls-certificates=DIR`:
/// libnbd refuses local file access from a URI unless the program allows it).
pub fn fio_in(uri: &str, job: Job, runtime: u64, size: u64, home: Option<&Path>) -> Result<f64> {
    let mut cmd = Command::new("fio");
    if let Some(h) = home {
        cmd.env("HOME", h);
    }
    let out = cmd
        .args([
            "--name=bench",
            "--ioengine=nbd",
            "--output-format=json",
            "--time_based",
            "--norandommap",
            "--randrepeat=0",
        ])
        .arg(format!("--uri={uri}"))
        .arg(format!("--rw={}", job.rw))
        .arg(format!("--bs={}", job.bs))
        .arg(format!("--iodepth={}", job.depth))
        .arg(format!("--runtime={runtime}"))
        .arg(format!("--size={size}"))
        .output()
        .context("running fio")?;
    ensure!(out.status.success(), "fio {} on {uri}: {}", job.rw, String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let start = text.find('{').context("fio printed no json")?;
    let js: serde_json::Value = serde_json::from_str(&text[start..]).context("fio json")?;
    let j = &js["jobs"][0];
    let side = if job.rw.contains("read") { &j["read"] } else { &j["write"] };
    ensure!(j["error"].as_i64() == Some(0), "fio reported error {} on {uri}", j["error"]);
    Ok(if job.bs == "4k" {
        side["iops"].as_f64().context("iops")?
    } else {
        side["bw"].as_f64().context("bw")? / 1024.0
    })
}

/// Waits until something accepts TCP connections on 127.0.0.1:`port`.
pub fn wait_port(port: u16) -> Result<()> {
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listens on port {port}")
}

/// Spawns a `mirror` process (RUST_LOG=error) and waits for the stdout line starting with
/// `prefix`; returns the rest of that line. Its stdout keeps being drained.
pub fn spawn_mirror(bin: &Path, args: &[String], prefix: &str) -> Result<(Kill, String)> {
    let (child, rest, out) = spawn_until(Command::new(bin).args(args).env("RUST_LOG", "error"), prefix)
        .with_context(|| format!("starting {}", bin.display()))?;
    drain(out);
    Ok((Kill(child), rest))
}

/// The order of `n` configurations in round `round`: rotated by one each round, so none is
/// always first (or always after the same neighbour) while the machine's load drifts.
pub fn rotation(round: usize, n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.rotate_left(round % n.max(1));
    order
}

/// Samples per (configuration, job), one per round, in round order.
#[derive(Debug, Default)]
pub struct Samples(BTreeMap<(String, String), Vec<f64>>);

impl Samples {
    pub fn push(&mut self, config: &str, job: &str, v: f64) {
        self.0.entry((config.to_string(), job.to_string())).or_default().push(v);
    }

    pub fn get(&self, config: &str, job: &str) -> &[f64] {
        self.0.get(&(config.to_string(), job.to_string())).map_or(&[], Vec::as_slice)
    }

    /// The median of a (configuration, job); NaN without samples.
    pub fn median(&self, config: &str, job: &str) -> f64 {
        median(self.get(config, job).to_vec())
    }

    /// `a` / `b` of a job: the ratio of the medians, and the lowest and highest ratio of one
    /// round's pair (both measured in that round, close in time).
    pub fn ratio(&self, a: &str, b: &str, job: &str) -> Ratio {
        let (xa, xb) = (self.get(a, job), self.get(b, job));
        let per_round: Vec<f64> = xa.iter().zip(xb).map(|(x, y)| x / y).collect();
        Ratio {
            median: self.median(a, job) / self.median(b, job),
            min: per_round.iter().copied().fold(f64::INFINITY, f64::min),
            max: per_round.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            per_round,
        }
    }

    /// Every series as `"config/job": [samples]`, for the JSON.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!(self
            .0
            .iter()
            .map(|((c, j), v)| (format!("{c}/{j}"), v.clone()))
            .collect::<BTreeMap<_, _>>())
    }
}

/// A ratio of two configurations' medians, with the spread of the per-round ratios.
#[derive(Debug)]
pub struct Ratio {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub per_round: Vec<f64>,
}

impl Ratio {
    /// `{"median", "min", "max", "per_round"}` (null for what is not finite).
    pub fn to_json(&self) -> serde_json::Value {
        let f = |x: f64| if x.is_finite() { serde_json::json!(x) } else { serde_json::Value::Null };
        serde_json::json!({
            "median": f(self.median),
            "min": f(self.min),
            "max": f(self.max),
            "per_round": self.per_round.iter().map(|&x| f(x)).collect::<Vec<_>>(),
        })
    }
}
