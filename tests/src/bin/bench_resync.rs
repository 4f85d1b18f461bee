//! `cargo xtask bench resync`: bytes on the wire and time of (a) a first sync of identical
//! volumes and (b) a resync after 1% of the volume was rewritten at random 4 KiB offsets, each
//! side by side with `rsync --inplace --no-whole-file` over loopback (an rsync daemon on
//! 127.0.0.1) on the same files in the same run. Rounds alternate which tool goes first; the
//! table and `target/bench/resync.json` report medians.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use clap::Parser;
use mirror::replication::{client::Client, protocol::Message};
use mirror_tests::{
    fs::{fill_random, try_file_digest, xorshift_fill, xorshift_next},
    net::free_port,
    proc::{spawn_until, Kill},
    stats::median,
};

/// Bytes on the wire and time of `mirror sync` against `rsync --inplace --no-whole-file` over
/// loopback: (a) a first sync of identical volumes, (b) a resync after 1% of the volume was
/// rewritten at random 4 KiB offsets. Prints a table of medians and writes them as JSON.
#[derive(Debug, Parser)]
#[command(name = "bench-resync", args_override_self = true)]
struct Args {
    /// Volume size (a multiple of 4 KiB, at least 16 MiB; suffixes K, M, G).
    #[arg(long, default_value = "1G", value_parser = mirror::parse_size)]
    size: u64,
    /// Rounds per case; they alternate which tool goes first.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The `mirror` binary to measure.
    #[arg(long = "mirror-bin", value_name = "PATH", default_value = "target/release/mirror")]
    mirror: PathBuf,
    /// Scratch directory for the volumes (emptied first, removed at the end).
    #[arg(long, default_value_os_t = std::env::temp_dir().join("mirror-bench-resync"))]
    dir: PathBuf,
    /// Where the JSON results go.
    #[arg(long, default_value = "target/bench/resync.json")]
    out: PathBuf,
}

fn parse_args() -> Result<Args> {
    let a = Args::parse();
    ensure!(
        a.size >= 16 << 20 && a.size.is_multiple_of(4096),
        "--size must be a multiple of 4 KiB, at least 16 MiB"
    );
    Ok(a)
}

fn start_replica(a: &Args, path: &Path, secret: &Path) -> Result<(Kill, String)> {
    let (child, addr, _) = spawn_until(
        Command::new(&a.mirror)
            .args(["replica", "--listen", "127.0.0.1:0", "--sync-max-rate", "0", "--volume"])
            .arg(format!("v={}", path.display()))
            .arg("--secret-file")
            .arg(secret)
            .env("RUST_LOG", "error"),
        "listening on ",
    )
    .with_context(|| format!("starting {}", a.mirror.display()))?;
    Ok((Kill(child), addr))
}

/// One measured transfer.
#[derive(Debug, Clone, Copy)]
struct Run {
    wire: u64,
    secs: f64,
}

fn ours(a: &Args, s: &str, t: &str, secret: &Path) -> Result<Run> {
    let out = Command::new(&a.mirror)
        .args(["sync", "--json", "--node", s, "--peer", t, "--volume", "v", "--secret-file"])
        .arg(secret)
        .env("RUST_LOG", "warn")
        .output()?;
    ensure!(out.status.success(), "mirror sync failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let js: serde_json::Value =
        serde_json::from_str(text.lines().last().unwrap_or("")).context("sync json")?;
    Ok(Run {
        wire: js["wire_bytes"].as_u64().context("wire_bytes")?,
        secs: js["elapsed_s"].as_f64().context("elapsed_s")?,
    })
}

fn rsync(port: u16, src: &Path, dst_name: &str) -> Result<Run> {
    let t0 = Instant::now();
    let out = Command::new("rsync")
        .args(["-I", "--inplace", "--no-whole-file", "--stats"])
        .arg(src)
        .arg(format!("rsync://127.0.0.1:{port}/bench/{dst_name}"))
        .output()
        .context("running rsync")?;
    let secs = t0.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "rsync failed: {text} {}", String::from_utf8_lossy(&out.stderr));
    let num = |key: &str| -> Result<u64> {
        let line = text
            .lines()
            .find(|l| l.starts_with(key))
            .with_context(|| format!("rsync --stats has no {key}"))?;
        let digits: String = line[key.len()..]
            .chars()
            .take_while(|c| !c.is_alphabetic())
            .filter(char::is_ascii_digit)
            .collect();
        Ok(digits.parse()?)
    };
    Ok(Run { wire: num("Total bytes sent:")? + num("Total bytes received:")?, secs })
}

fn main() -> Result<()> {
    let a = parse_args()?;
    ensure!(
        Command::new("rsync").arg("--version").output().is_ok(),
        "rsync is not installed (cargo xtask setup)"
    );
    ensure!(a.mirror.is_file(), "{} not built (cargo build --release)", a.mirror.display());
    let _ = std::fs::remove_dir_all(&a.dir);
    std::fs::create_dir_all(&a.dir)?;
    let secret = a.dir.join("secret");
    std::fs::write(&secret, "bench-secret-0123456789abcdef")?;
    let (sp, tp, rp) = (a.dir.join("s.img"), a.dir.join("t.img"), a.dir.join("r.img"));
    eprintln!("bench resync: creating {} MiB of random data", a.size >> 20);
    fill_random(&sp, a.size, 0x9e37_79b9_7f4a_7c15)?;
    std::fs::copy(&sp, &tp)?;
    std::fs::copy(&sp, &rp)?;

    let port = free_port()?;
    let conf = a.dir.join("rsyncd.conf");
    std::fs::write(
        &conf,
        format!(
            "use chroot = false\n[bench]\npath = {}\nread only = false\nuid = root\ngid = root\n",
            a.dir.display()
        ),
    )?;
    let _rsyncd = Kill(
        Command::new("rsync")
            .args(["--daemon", "--no-detach", "--address=127.0.0.1"])
            .arg(format!("--port={port}"))
            .arg(format!("--config={}", conf.display()))
            .stderr(Stdio::null())
            .spawn()
            .context("starting rsync --daemon")?,
    );
    let (_s, s_addr) = start_replica(&a, &sp, &secret)?;
    let (_t, t_addr) = start_replica(&a, &tp, &secret)?;
    std::thread::sleep(Duration::from_millis(300));
    let key = secret.clone();
    let key = mirror::replication::auth::load_secret(&key)?;

    // (a) identical volumes: a first (full, digest-compared) sync, and rsync on identical files.
    let (mut a_ours, mut a_rsync) = (Vec::new(), Vec::new());
    for round in 0..a.rounds {
        if round > 0 {
            // Forget the target's generation: the next sync is a full comparison again.
            Client::connect(&t_addr, "v", &key)?.call_ok(&Message::ResolveDiscard)?;
        }
        let first_ours = round % 2 == 0;
        if !first_ours {
            a_rsync.push(rsync(port, &sp, "r.img")?);
        }
        a_ours.push(ours(&a, &s_addr, &t_addr, &secret)?);
        if first_ours {
            a_rsync.push(rsync(port, &sp, "r.img")?);
        }
        eprintln!("  (a) round {round}: ours {:?}, rsync {:?}", a_ours[round], a_rsync[round]);
    }

    // (b) 1% rewritten at random 4 KiB offsets while the target is away.
    let blocks = a.size / 4096;
    let n = (a.size / 100 / 4096) as usize;
    let (mut b_ours, mut b_rsync, mut changed) = (Vec::new(), Vec::new(), Vec::new());
    let mut seed = 42u64;
    for round in 0..a.rounds {
        let mut c = Client::connect(&s_addr, "v", &key)?;
        c.call_ok(&Message::MarkDirty { offset: 0, len: 0 })?;
        let mut offsets = std::collections::BTreeSet::new();
        while offsets.len() < n {
            offsets.insert(xorshift_next(&mut seed) % blocks * 4096);
        }
        let mut buf = vec![0u8; 4096];
        for &o in &offsets {
            xorshift_fill(&mut buf, &mut seed);
            c.write(o, buf.clone())?;
        }
        c.call_ok(&Message::Flush)?;
        drop(c);
        changed.push(n as u64 * 4096);
        std::thread::sleep(Duration::from_millis(300));
        let first_ours = round % 2 == 0;
        if !first_ours {
            b_rsync.push(rsync(port, &sp, "r.img")?);
        }
        b_ours.push(ours(&a, &s_addr, &t_addr, &secret)?);
        if first_ours {
            b_rsync.push(rsync(port, &sp, "r.img")?);
        }
        eprintln!(
            "  (b) round {round}: changed {} B, ours {:?}, rsync {:?}",
            n * 4096,
            b_ours[round],
            b_rsync[round]
        );
    }
    let ds = try_file_digest(&sp)?;
    ensure!(ds == try_file_digest(&tp)?, "our target differs from the source after the runs");
    ensure!(ds == try_file_digest(&rp)?, "rsync's copy differs from the source after the runs");

    let med = |v: &[Run], f: fn(&Run) -> f64| median(v.iter().map(f).collect());
    let w = |r: &Run| r.wire as f64;
    let t = |r: &Run| r.secs;
    let size = a.size as f64;
    let changed_med = median(changed.iter().map(|c| *c as f64).collect());
    let identical_frac = med(&a_ours, w) / size;
    let resync_wire_over_changed = med(&b_ours, w) / changed_med;
    let resync_wire_vs_rsync = med(&b_ours, w) / med(&b_rsync, w);
    let resync_time_vs_rsync = med(&b_ours, t) / med(&b_rsync, t);

    println!("\nbench resync: {} MiB volume, {} rounds (medians; alternating order)", a.size >> 20, a.rounds);
    println!(
        "{:<34} {:>14} {:>14} {:>10} {:>10} {:>9}",
        "case", "ours wire B", "rsync wire B", "ours s", "rsync s", "ratio"
    );
    println!(
        "{:<34} {:>14.0} {:>14.0} {:>10.3} {:>10.3} {:>9.4}",
        "(a) identical, first sync",
        med(&a_ours, w),
        med(&a_rsync, w),
        med(&a_ours, t),
        med(&a_rsync, t),
        med(&a_ours, w) / med(&a_rsync, w)
    );
    println!(
        "{:<34} {:>14.0} {:>14.0} {:>10.3} {:>10.3} {:>9.4}",
        "(b) 1% rewritten at 4 KiB",
        med(&b_ours, w),
        med(&b_rsync, w),
        med(&b_ours, t),
        med(&b_rsync, t),
        resync_wire_vs_rsync
    );
    println!("identical_sync_wire_fraction = {identical_frac:.6}   (target < 0.01)");
    println!("resync_wire_over_changed     = {resync_wire_over_changed:.4}   (target <= 1.2)");
    println!("resync_wire_vs_rsync         = {resync_wire_vs_rsync:.4}   (target < 1)");
    println!("resync_time_vs_rsync         = {resync_time_vs_rsync:.4}   (target < 1)");

    let runs = |v: &[Run]| {
        v.iter().map(|r| serde_json::json!({"wire_bytes": r.wire, "seconds": r.secs})).collect::<Vec<_>>()
    };
    let json = serde_json::json!({
        "volume_bytes": a.size,
        "rounds": a.rounds,
        "identical_sync_wire_fraction": identical_frac,
        "resync_wire_over_changed": resync_wire_over_changed,
        "resync_wire_vs_rsync": resync_wire_vs_rsync,
        "resync_time_vs_rsync": resync_time_vs_rsync,
        "changed_bytes": changed,
        "runs": {
            "identical": {"ours": runs(&a_ours), "rsync": runs(&a_rsync)},
            "resync": {"ours": runs(&b_ours), "rsync": runs(&b_rsync)},
        },
    });
    if let Some(p) = a.out.parent() {
        std::fs::create_dir_all(p)?;
    }
    std::fs::write(&a.out, serde_json::to_string_pretty(&json)?)?;
    println!("wrote {}", a.out.display());
    let _ = std::fs::remove_dir_all(&a.dir);
    Ok(())
}
