//! `cargo xtask bench nbd`: fio's nbd engine (libnbd) against
//!   - ours-2local:  `mirror serve` with two local replicas (weights 50/50),
//!   - ours-remote:  `mirror serve` with a local source and a remote target over loopback,
//!   - nbdkit:       nbdkit's file plugin on one file (the reference),
//!   - qemu-nbd:     qemu-nbd on one file;
//!
//! 4 KiB random read / write at queue depth 32 and 128 KiB sequential read / write, rounds
//! alternating the order of the servers, medians reported as ratios against nbdkit. Then, with
//! each replica on a loop device throttled by a cgroup v1 blkio limit, random reads with both
//! replicas (weights 50/50) against one (weight 0): the replicas' bandwidth adds up.
//! With `--baseline-bin PATH` (the `mirror` binary of another commit), its two configurations
//! join the rotation as base-2local and base-remote, and the JSON gains ours / baseline ratios:
//! an A/B of two builds in one run, alternating, on the same files and the same machine load.
//! Then the large-volume case: the local + remote topology on sparse files of `--large-size`
//! (256 GiB) against sparse files of `--size`, 4 KiB random writes at QD32 over the whole
//! volume, alternating, each sample on fresh files (every extent cold at the start): the cost of
//! recording write intent as writes spread over many extents (`randwrite_large_vs_small`,
//! `randwrite_large_iops`). `--only large` runs just that case.
//! Writes target/bench/nbd.json.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use clap::Parser;
use mirror_tests::{
    bench::{fio, rotation, spawn_mirror, wait_port, Job, Samples, JOBS},
    blockdev::LoopDev,
    cgroup::{IoCgroup, IoLimit},
    fs::fill_random,
    net::free_port,
    proc::Kill,
    stats::median,
};

/// The router behind NBD (`mirror serve`, two local replicas or a local and a remote one)
/// against nbdkit and qemu-nbd, with fio's nbd engine: 4 KiB random and 128 KiB sequential reads
/// and writes, rounds alternating the servers; then random reads over two replicas on throttled
/// loop devices against one. Prints a table of medians and writes them as JSON.
#[derive(Debug, Parser)]
#[command(name = "bench-nbd", args_override_self = true)]
struct Args {
    /// Size of each server's file (suffixes K, M, G).
    #[arg(long, default_value = "512M", value_parser = mirror::parse_size)]
    size: u64,
    /// Rounds; each rotates the order of the servers.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds per fio job.
    #[arg(long, default_value_t = 5)]
    runtime: u64,
    /// The `mirror` binary to measure.
    #[arg(long = "mirror-bin", value_name = "PATH", default_value = "target/release/mirror")]
    mirror: PathBuf,
    /// Another build's `mirror` binary to measure beside ours (A/B in one run, alternating):
    /// adds base-2local and base-remote, and `<job>_vs_baseline` ratios to the JSON.
    #[arg(long = "baseline-bin", value_name = "PATH")]
    baseline: Option<PathBuf>,
    /// Scratch directory for the files (emptied first, removed at the end).
    #[arg(long, default_value_os_t = std::env::temp_dir().join("mirror-bench-nbd"))]
    dir: PathBuf,
    /// Where the JSON results go.
    #[arg(long, default_value = "target/bench/nbd.json")]
    out: PathBuf,
    /// Read bandwidth each replica's loop device is throttled to in the scaling run, per second
    /// (suffixes K, M, G).
    #[arg(long = "throttle", value_name = "BYTES", default_value = "8M", value_parser = mirror::parse_size)]
    throttle_bps: u64,
    /// Size of the large sparse volume of the large-volume case (suffixes K, M, G).
    #[arg(long = "large-size", default_value = "256G", value_parser = mirror::parse_size)]
    large_size: u64,
    /// Run only this case.
    #[arg(long, value_enum)]
    only: Option<Only>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Only {
    /// The large-volume random-write case.
    Large,
}

/// A running NBD server to measure: its processes and URI.
struct Server {
    name: &'static str,
    uri: String,
    _procs: Vec<Kill>,
}

fn serve_ours(
    a: &Args,
    bin: &Path,
    name: &'static str,
    source: &str,
    target: &str,
    weight: u8,
    extra: Vec<Kill>,
) -> Result<Server> {
    let port = free_port()?;
    let args: Vec<String> =
        ["serve", "--volume", "v", "--source", source, "--target", target, "--secret-file"]
            .iter()
            .map(std::string::ToString::to_string)
            .chain([a.dir.join("secret").display().to_string()])
            .chain([
                "--nbd".into(),
                format!("127.0.0.1:{port}"),
                "--target-weight".into(),
                weight.to_string(),
                // Every replica file is a copy of one seed (as for the peers): identical.
                "--assume-clean".into(),
            ])
            .collect();
    let (k, _) = spawn_mirror(bin, &args, "nbd listening on")?;
    let mut procs = extra;
    procs.push(k);
    Ok(Server { name, uri: format!("nbd://127.0.0.1:{port}/"), _procs: procs })
}

fn replica(a: &Args, bin: &Path, path: &Path) -> Result<(Kill, String)> {
    let args: Vec<String> = vec![
        "replica".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--volume".into(),
        format!("v={}", path.display()),
        "--secret-file".into(),
        a.dir.join("secret").display().to_string(),
    ];
    spawn_mirror(bin, &args, "listening on")
}

fn nbdkit(path: &Path) -> Result<Server> {
    let port = free_port()?;
    let k = Kill(
        Command::new("nbdkit")
            .args(["--foreground", "--exit-with-parent", "-i", "127.0.0.1", "-p", &port.to_string(), "file"])
            .arg(format!("file={}", path.display()))
            .stderr(Stdio::null())
            .spawn()
            .context("starting nbdkit")?,
    );
    wait_port(port)?;
    Ok(Server { name: "nbdkit", uri: format!("nbd://127.0.0.1:{port}/"), _procs: vec![k] })
}

fn qemu_nbd(path: &Path) -> Result<Server> {
    let port = free_port()?;
    let k = Kill(
        Command::new("qemu-nbd")
            .args([
                "-f",
                "raw",
                "-b",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "--persistent",
                "--shared=8",
                "-x",
                "",
            ])
            .arg(path)
            .stderr(Stdio::null())
            .spawn()
            .context("starting qemu-nbd")?,
    );
    wait_port(port)?;
    Ok(Server { name: "qemu-nbd", uri: format!("nbd://127.0.0.1:{port}/"), _procs: vec![k] })
}

/// Random-read IOPS of `mirror serve` over two throttled loop devices, at a given target weight.
fn throttled_run(a: &Args, loops: &[LoopDev; 2], weight: u8, cgroup: &IoCgroup) -> Result<f64> {
    let srv = serve_ours(
        a,
        &a.mirror,
        "throttled",
        &format!("local:{}", loops[0].dev.display()),
        &format!("local:{}", loops[1].dev.display()),
        weight,
        vec![],
    )?;
    let pid = srv._procs.last().map(|k| k.0.id()).context("server pid")?;
    cgroup.add(pid).context("moving the server into the throttled cgroup")?;
    fio(&srv.uri, Job { name: "randread", rw: "randread", bs: "4k", depth: 32 }, a.runtime, a.size)
}

/// Random-write IOPS of the local + remote topology on fresh sparse files of `size` bytes
/// (every extent cold at the start; the files and their metadata removed after).
fn fresh_randwrite(a: &Args, size: u64, tag: &str) -> Result<f64> {
    let files = [a.dir.join(format!("{tag}-src.img")), a.dir.join(format!("{tag}-tgt.img"))];
    for f in &files {
        std::fs::File::create(f)?.set_len(size)?;
    }
    let r = (|| {
        let (k, addr) = replica(a, &a.mirror, &files[1])?;
        let srv = serve_ours(
            a,
            &a.mirror,
            "large",
            &format!("local:{}", files[0].display()),
            &format!("remote:{addr}"),
            50,
            vec![k],
        )?;
        fio(&srv.uri, Job { name: "randwrite", rw: "randwrite", bs: "4k", depth: 32 }, a.runtime, size)
    })();
    for f in &files {
        let _ = std::fs::remove_file(mirror::storage::default_meta_path(f));
        let _ = std::fs::remove_file(f);
    }
    r
}

/// The large-volume case: `--large-size` against `--size`, alternating, fresh files each.
fn large_case(a: &Args, json: &mut serde_json::Map<String, serde_json::Value>) -> Result<()> {
    let mut s = Samples::default();
    let (small, large) = ("small", "large");
    for round in 0..a.rounds {
        let order = if round % 2 == 0 { [small, large] } else { [large, small] };
        for which in order {
            let size = if which == large { a.large_size } else { a.size };
            let v = fresh_randwrite(a, size, which)?;
            eprintln!("  round {round} {which:<6} {:>8} MiB randwrite {v:>10.1} IOPS", size >> 20);
            s.push(which, "randwrite", v);
        }
    }
    let ratio = s.ratio(large, small, "randwrite");
    println!(
        "\nlarge volume: randwrite {} MiB {:.1} IOPS, {} MiB {:.1} IOPS (medians of {} rounds x {} s)",
        a.large_size >> 20,
        s.median(large, "randwrite"),
        a.size >> 20,
        s.median(small, "randwrite"),
        a.rounds,
        a.runtime
    );
    println!(
        "randwrite_large_vs_small = {:.3} (per round {:.3}..{:.3}; target >= 0.8)",
        ratio.median, ratio.min, ratio.max
    );
    json.insert("randwrite_large_vs_small".into(), serde_json::json!(ratio.median));
    json.insert("randwrite_large_vs_small_spread".into(), ratio.to_json());
    json.insert("randwrite_large_iops".into(), serde_json::json!(s.median(large, "randwrite")));
    json.insert("randwrite_small_iops".into(), serde_json::json!(s.median(small, "randwrite")));
    json.insert("large_size".into(), serde_json::json!(a.large_size));
    json.insert("large_runs".into(), s.to_json());
    Ok(())
}

fn write_json(a: &Args, json: serde_json::Map<String, serde_json::Value>) -> Result<()> {
    if let Some(p) = a.out.parent() {
        std::fs::create_dir_all(p)?;
    }
    std::fs::write(&a.out, serde_json::to_string_pretty(&serde_json::Value::Object(json))?)?;
    println!("wrote {}", a.out.display());
    Ok(())
}

fn main() -> Result<()> {
    let a = Args::parse();
    for tool in ["fio", "nbdkit", "qemu-nbd", "losetup"] {
        ensure!(
            Command::new(tool).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok(),
            "{tool} is not installed (cargo xtask setup)"
        );
    }
    ensure!(a.mirror.is_file(), "{} not built (cargo build --release)", a.mirror.display());
    if let Some(b) = &a.baseline {
        ensure!(b.is_file(), "--baseline-bin {}: no such file", b.display());
    }
    let _ = std::fs::remove_dir_all(&a.dir);
    std::fs::create_dir_all(&a.dir)?;
    std::fs::write(a.dir.join("secret"), "bench-secret-0123456789abcdef")?;
    if a.only == Some(Only::Large) {
        let mut json = serde_json::Map::new();
        large_case(&a, &mut json)?;
        write_json(&a, json)?;
        let _ = std::fs::remove_dir_all(&a.dir);
        return Ok(());
    }
    let files: Vec<PathBuf> =
        ["a.img", "b.img", "c.img", "d.img", "e.img", "f.img"].iter().map(|f| a.dir.join(f)).collect();
    eprintln!("bench nbd: preparing {} MiB files", a.size >> 20);
    // Every server's file is a copy of the same seed, made the same way: a file written in
    // large buffered writes sits in the page cache in large folios, where a 4 KiB write costs
    // ext4 a walk over the folio's buffer heads (measured: 78% of the server's time went to
    // ext4_block_write_begin when the source replica was the seed itself and nbdkit's a copy).
    let seed = a.dir.join("seed.img");
    fill_random(&seed, a.size, 0x2545_f491_4f6c_dd1d)?;
    for f in &files {
        std::fs::copy(&seed, f)?;
    }
    std::fs::remove_file(&seed)?;

    let mut results = Samples::default();
    // Servers 0-3 always; 4 and 5 (the baseline build's two configurations) with --baseline-bin.
    let servers = if a.baseline.is_some() { 6 } else { 4 };
    for round in 0..a.rounds {
        for which in rotation(round, servers) {
            // Ours on files 0 and 1, the baseline on 4 and 5: each build on files of its own.
            let (bin, name2, name_r, f) = match (which, &a.baseline) {
                (4 | 5, Some(b)) => (b.as_path(), "base-2local", "base-remote", [&files[4], &files[5]]),
                _ => (a.mirror.as_path(), "ours-2local", "ours-remote", [&files[0], &files[1]]),
            };
            let srv = match which {
                0 | 4 => serve_ours(
                    &a,
                    bin,
                    name2,
                    &format!("local:{}", f[0].display()),
                    &format!("local:{}", f[1].display()),
                    50,
                    vec![],
                )?,
                1 | 5 => {
                    let (k, addr) = replica(&a, bin, f[1])?;
                    serve_ours(
                        &a,
                        bin,
                        name_r,
                        &format!("local:{}", f[0].display()),
                        &format!("remote:{addr}"),
                        50,
                        vec![k],
                    )?
                }
                2 => nbdkit(&files[2])?,
                _ => qemu_nbd(&files[3])?,
            };
            for &job in JOBS {
                let v = fio(&srv.uri, job, a.runtime, a.size)?;
                eprintln!("  round {round} {:<12} {:<10} {v:>12.1}", srv.name, job.name);
                results.push(srv.name, job.name, v);
            }
        }
    }

    // Throttled replicas: cgroup read-bandwidth limits on two loop devices (direct I/O to their
    // files, so the throttle sees every read).
    let mut throttled = (Vec::new(), Vec::new());
    let throttle_note;
    match IoCgroup::new("bench-nbd") {
        Ok(cg) => {
            let loops = [LoopDev::attach(&files[0], true)?, LoopDev::attach(&files[1], true)?];
            for l in &loops {
                cg.limit(&l.dev, &[(IoLimit::ReadBps, Some(a.throttle_bps))])?;
            }
            let r = (|| -> Result<()> {
                for round in 0..a.rounds {
                    let (one, two) = if round % 2 == 0 {
                        (throttled_run(&a, &loops, 0, &cg)?, throttled_run(&a, &loops, 50, &cg)?)
                    } else {
                        let two = throttled_run(&a, &loops, 50, &cg)?;
                        (throttled_run(&a, &loops, 0, &cg)?, two)
                    };
                    eprintln!("  throttled round {round}: one replica {one:.1} IOPS, two {two:.1} IOPS");
                    throttled.0.push(one);
                    throttled.1.push(two);
                }
                Ok(())
            })();
            // Their metadata belongs to this run's loop devices, not to the next ones of those names.
            let metas: Vec<PathBuf> =
                loops.iter().map(|l| mirror::storage::default_meta_path(&l.dev)).collect();
            drop(loops);
            for m in metas {
                let _ = std::fs::remove_file(m);
            }
            std::thread::sleep(Duration::from_millis(200));
            drop(cg);
            r?;
            throttle_note =
                format!("each replica a loop device limited to {} MiB/s of reads", a.throttle_bps >> 20);
        }
        Err(why) => {
            throttle_note = format!("skipped: {why:#}");
            eprintln!("{throttle_note}");
        }
    }

    let med = |s: &str, j: &str| results.median(s, j);
    println!(
        "\nbench nbd: {} MiB, {} rounds x {} s per job (medians; IOPS for 4k, MiB/s for 128k)",
        a.size >> 20,
        a.rounds,
        a.runtime
    );
    println!(
        "{:<10} {:>12} {:>12} {:>12} {:>12} {:>10} {:>10}",
        "job", "ours-2local", "ours-remote", "nbdkit", "qemu-nbd", "2local/kit", "remote/kit"
    );
    let mut json = serde_json::Map::new();
    for job in JOBS.iter().map(|j| j.name) {
        let (o, r, k, q) =
            (med("ours-2local", job), med("ours-remote", job), med("nbdkit", job), med("qemu-nbd", job));
        println!("{job:<10} {o:>12.1} {r:>12.1} {k:>12.1} {q:>12.1} {:>10.3} {:>10.3}", o / k, r / k);
        json.insert(format!("{job}_vs_nbdkit"), serde_json::json!(o / k));
        json.insert(format!("{job}_remote_vs_nbdkit"), serde_json::json!(r / k));
        json.insert(format!("{job}_qemu_nbd_vs_nbdkit"), serde_json::json!(q / k));
    }
    if let Some(b) = &a.baseline {
        println!("\nA/B against the baseline build {} (ours / baseline, medians)", b.display());
        println!(
            "{:<10} {:>12} {:>12} {:>12} {:>12}",
            "job", "base-2local", "base-remote", "2local", "remote"
        );
        for job in JOBS.iter().map(|j| j.name) {
            let (o, r) = (med("ours-2local", job), med("ours-remote", job));
            let (bo, br) = (med("base-2local", job), med("base-remote", job));
            println!("{job:<10} {bo:>12.1} {br:>12.1} {:>12.3} {:>12.3}", o / bo, r / br);
            json.insert(format!("{job}_vs_baseline"), serde_json::json!(o / bo));
            json.insert(format!("{job}_remote_vs_baseline"), serde_json::json!(r / br));
        }
        json.insert("baseline_bin".into(), serde_json::json!(b.display().to_string()));
    }
    let scaling = median(throttled.1.clone()) / median(throttled.0.clone());
    println!("throttled_read_scaling = {scaling:.3}  ({throttle_note}; two replicas / one; target >= 1.8)");
    println!("targets: randread_vs_nbdkit >= 1.0, randwrite_vs_nbdkit >= 0.8");
    json.insert(
        "throttled_read_scaling".into(),
        serde_json::json!(if scaling.is_finite() { Some(scaling) } else { None }),
    );
    json.insert("throttle".into(), serde_json::json!(throttle_note));
    json.insert("runs".into(), results.to_json());
    json.insert("throttled_runs".into(), serde_json::json!({"one": throttled.0, "two": throttled.1}));
    for f in &files {
        let _ = std::fs::remove_file(f);
    }
    large_case(&a, &mut json)?;
    write_json(&a, json)?;
    let _ = std::fs::remove_dir_all(&a.dir);
    Ok(())
}
