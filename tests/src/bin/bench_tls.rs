//! `cargo xtask bench tls`: what TLS costs on the two links of the local + remote topology
//! (`mirror serve` with a local source and a `mirror replica` target over loopback, weights
//! 50/50), measured with fio's nbd engine (libnbd, which speaks `nbds://` with X.509; its credentials in `$HOME/.pki/libnbd`):
//!   - plain:     replication link and NBD link in plaintext;
//!   - repl-tls:  the replication link over mutual TLS 1.3 (`--tls`), NBD in plaintext;
//!   - nbd-tls:   NBD over STARTTLS (`--nbd-tls`), the replication link in plaintext;
//!   - both-tls:  both links over TLS (what a deployment beyond loopback runs).
//!
//! 4 KiB random read / write at queue depth 32 and 128 KiB sequential read / write, each
//! configuration started afresh per round, the order rotated every round. Ratios are medians
//! over the rounds, with the lowest and highest ratio of one round's pair as the spread.
//! Writes target/bench/tls.json: `<job>_tls_vs_plain` (replication link), `nbd_<job>_tls_vs_plain`
//! (NBD link), `both_<job>_tls_vs_plain`, and every sample.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{ensure, Context, Result};
use clap::Parser;
use mirror_tests::{
    bench::{fio_in, rotation, spawn_mirror, Samples, JOBS},
    fs::fill_random,
    net::free_port,
    proc::Kill,
};

/// TLS against plaintext on the replication link and on the NBD link, local + remote topology,
/// fio's nbd engine, rounds alternating the configurations. Prints a table of ratios and
/// writes them as JSON.
#[derive(Debug, Parser)]
#[command(name = "bench-tls", args_override_self = true)]
struct Args {
    /// Size of each replica's file (suffixes K, M, G).
    #[arg(long, default_value = "256M", value_parser = mirror::parse_size)]
    size: u64,
    /// Rounds; each rotates the order of the configurations.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds per fio job.
    #[arg(long, default_value_t = 5)]
    runtime: u64,
    /// The `mirror` binary to measure.
    #[arg(long = "mirror-bin", value_name = "PATH", default_value = "target/release/mirror")]
    mirror: PathBuf,
    /// Scratch directory for the files and credentials (emptied first, removed at the end).
    #[arg(long, default_value_os_t = std::env::temp_dir().join("mirror-bench-tls"))]
    dir: PathBuf,
    /// Where the JSON results go.
    #[arg(long, default_value = "target/bench/tls.json")]
    out: PathBuf,
    /// Only these jobs (comma-separated names: randread, randwrite, seqread, seqwrite).
    #[arg(long, value_delimiter = ',')]
    jobs: Vec<String>,
    /// Seconds to hold each started configuration before its jobs (to attach `perf record -p`
    /// to the router, whose pid is printed).
    #[arg(long, default_value_t = 0)]
    hold: u64,
}

/// A configuration: its name, TLS on the replication link, TLS on the NBD link.
const CONFIGS: &[(&str, bool, bool)] =
    &[("plain", false, false), ("repl-tls", true, false), ("nbd-tls", false, true), ("both-tls", true, true)];

/// The key prefix of each TLS configuration's ratios against `plain`.
const PREFIX: &[(&str, &str)] = &[("repl-tls", ""), ("nbd-tls", "nbd_"), ("both-tls", "both_")];

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// A running local + remote volume behind NBD: its processes and the URI fio opens.
struct Volume {
    uri: String,
    /// For NBD over TLS: the HOME fio runs with (libnbd's credentials in `.pki/libnbd`).
    home: Option<PathBuf>,
    _procs: Vec<Kill>,
}

/// Starts the replica on `files[1]` and the router on `files[0]` with it as the remote target.
fn volume(a: &Args, files: &[PathBuf; 2], repl_tls: bool, nbd_tls: bool) -> Result<Volume> {
    let secret = s(&a.dir.join("secret"));
    let (router_dir, replica_dir) = (s(&a.dir.join("router")), s(&a.dir.join("replica")));
    let mut args: Vec<String> = ["replica", "--listen", "127.0.0.1:0", "--secret-file", &secret]
        .iter()
        .map(std::string::ToString::to_string)
        .collect();
    args.extend(["--volume".into(), format!("v={}", files[1].display())]);
    if repl_tls {
        args.extend(["--tls".into(), replica_dir]);
    }
    let (replica, addr) = spawn_mirror(&a.mirror, &args, "listening on")?;

    let port = free_port()?;
    let mut args: Vec<String> = vec![
        "serve".into(),
        "--volume".into(),
        "v".into(),
        "--source".into(),
        format!("local:{}", files[0].display()),
        "--target".into(),
        format!("remote:{addr}"),
        "--secret-file".into(),
        secret,
        "--nbd".into(),
        format!("127.0.0.1:{port}"),
        "--target-weight".into(),
        "50".into(),
        // Both files are copies of one seed: identical.
        "--assume-clean".into(),
    ];
    if repl_tls {
        args.extend(["--tls".into(), router_dir.clone()]);
    }
    if nbd_tls {
        args.extend(["--nbd-tls".into(), router_dir]);
    }
    let (router, _) = spawn_mirror(&a.mirror, &args, "nbd listening on")?;
    // libnbd reads ca-cert.pem (and offers client-cert.pem) from $HOME/.pki/libnbd.
    let (uri, home) = if nbd_tls {
        (format!("nbds://127.0.0.1:{port}/"), Some(a.dir.join("client-home")))
    } else {
        (format!("nbd://127.0.0.1:{port}/"), None)
    };
    Ok(Volume { uri, home, _procs: vec![router, replica] })
}

/// `mirror certs`: a CA and the directories of the router, the replica and the NBD client.
fn pki(a: &Args) -> Result<()> {
    let certs = |args: &[String]| -> Result<()> {
        let out = Command::new(&a.mirror).arg("certs").args(args).stdout(Stdio::null()).output()?;
        ensure!(out.status.success(), "mirror certs {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    };
    let ca = s(&a.dir.join("ca"));
    certs(&["ca".into(), "--dir".into(), ca.clone()])?;
    for n in ["router", "replica", "client"] {
        certs(&[
            "node".into(),
            "--ca".into(),
            ca.clone(),
            "--name".into(),
            n.into(),
            "--ip".into(),
            "127.0.0.1".into(),
            "--dir".into(),
            s(&a.dir.join(n)),
        ])?;
    }
    // The NBD client's credentials where libnbd looks without a tls-certificates parameter.
    let libnbd = a.dir.join("client-home/.pki/libnbd");
    std::fs::create_dir_all(&libnbd)?;
    for f in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
        std::fs::copy(a.dir.join("client").join(f), libnbd.join(f))?;
    }
    Ok(())
}

fn main() -> Result<()> {
    let a = Args::parse();
    ensure!(
        Command::new("fio").arg("--version").stdout(Stdio::null()).status().is_ok(),
        "fio is not installed (cargo xtask setup)"
    );
    ensure!(a.mirror.is_file(), "{} not built (cargo build --release)", a.mirror.display());
    let jobs: Vec<_> =
        JOBS.iter().copied().filter(|j| a.jobs.is_empty() || a.jobs.iter().any(|n| n == j.name)).collect();
    ensure!(!jobs.is_empty(), "--jobs {:?}: no such job", a.jobs);
    let _ = std::fs::remove_dir_all(&a.dir);
    std::fs::create_dir_all(&a.dir)?;
    std::fs::write(a.dir.join("secret"), "bench-secret-0123456789abcdef")?;
    pki(&a).context("making the credentials")?;
    eprintln!("bench tls: preparing {} MiB files", a.size >> 20);
    // Copies of one seed, written the same way (see bench_nbd: the page cache's folios of a
    // file written in large buffered writes cost 4 KiB writes alike on both sides).
    let seed = a.dir.join("seed.img");
    fill_random(&seed, a.size, 0x9e37_79b9_7f4a_7c15)?;
    let files = [a.dir.join("a.img"), a.dir.join("b.img")];
    for f in &files {
        std::fs::copy(&seed, f)?;
    }
    std::fs::remove_file(&seed)?;

    let mut samples = Samples::default();
    for round in 0..a.rounds {
        for which in rotation(round, CONFIGS.len()) {
            let (name, repl_tls, nbd_tls) = CONFIGS[which];
            let vol = volume(&a, &files, repl_tls, nbd_tls).with_context(|| format!("starting {name}"))?;
            if a.hold > 0 {
                eprintln!(
                    "  {name}: router pid {}, replica pid {}",
                    vol._procs[0].0.id(),
                    vol._procs[1].0.id()
                );
                std::thread::sleep(std::time::Duration::from_secs(a.hold));
            }
            for &job in &jobs {
                let v = fio_in(&vol.uri, job, a.runtime, a.size, vol.home.as_deref())
                    .with_context(|| format!("{name} {}", job.name))?;
                eprintln!("  round {round} {name:<9} {:<10} {v:>10.1} {}", job.name, job.unit());
                samples.push(name, job.name, v);
            }
        }
    }

    println!(
        "\nbench tls: local + remote over loopback, {} MiB, {} rounds x {} s per job \
         (medians; IOPS for 4k, MiB/s for 128k; ratio [lowest, highest of one round])",
        a.size >> 20,
        a.rounds,
        a.runtime
    );
    println!(
        "{:<10} {:>10} {:>10} {:>10} {:>10}   {:<22} {:<22} {:<22}",
        "job", "plain", "repl-tls", "nbd-tls", "both-tls", "repl/plain", "nbd/plain", "both/plain"
    );
    let mut json = serde_json::Map::new();
    let mut missed = Vec::new();
    for job in &jobs {
        let m: Vec<f64> = CONFIGS.iter().map(|(c, ..)| samples.median(c, job.name)).collect();
        let mut cells = Vec::new();
        for &(config, prefix) in PREFIX {
            let r = samples.ratio(config, "plain", job.name);
            cells.push(format!("{:.3} [{:.3}, {:.3}]", r.median, r.min, r.max));
            let key = format!("{prefix}{}_tls_vs_plain", job.name);
            let target = if job.bs == "4k" { 0.90 } else { 0.75 };
            if r.median < target {
                missed.push(format!("{key} = {:.3} < {target}", r.median));
            }
            json.insert(key.clone(), serde_json::json!(r.median));
            json.insert(format!("{key}_spread"), r.to_json());
        }
        println!(
            "{:<10} {:>10.1} {:>10.1} {:>10.1} {:>10.1}   {:<22} {:<22} {:<22}",
            job.name, m[0], m[1], m[2], m[3], cells[0], cells[1], cells[2]
        );
    }
    println!("targets: >= 0.90 for 4 KiB, >= 0.75 for 128 KiB sequential");
    for m in &missed {
        println!("missed: {m}");
    }
    json.insert(
        "setup".into(),
        serde_json::json!({
            "size_mib": a.size >> 20, "rounds": a.rounds, "runtime_s": a.runtime,
            "topology": "serve local source + remote replica on 127.0.0.1, target weight 50",
            "client": "fio --ioengine=nbd (libnbd; nbds:// with tls-certificates for NBD TLS)",
        }),
    );
    json.insert("missed".into(), serde_json::json!(missed));
    json.insert("runs".into(), samples.to_json());
    if let Some(p) = a.out.parent() {
        std::fs::create_dir_all(p)?;
    }
    std::fs::write(&a.out, serde_json::to_string_pretty(&serde_json::Value::Object(json))?)?;
    println!("wrote {}", a.out.display());
    let _ = std::fs::remove_dir_all(&a.dir);
    Ok(())
}
