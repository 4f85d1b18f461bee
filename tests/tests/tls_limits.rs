//! Limits before authentication, with real processes: 2,000 connections from another loopback
//! address (127.0.0.2) that never authenticate, each announcing a large message (a 16 MiB
//! protocol frame, or a full-size TLS record) and then sending a byte at a time, against a
//! replica server over TLS that an authenticated router (`mirror serve`, local source, that
//! replica as the remote target) uses meanwhile. The server's resident memory stays under
//! 64 MiB above its idle figure, it starts no thread per connection, and fio through the router
//! runs without an error; the replicas end identical.

use std::{
    path::Path,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use mirror::replication::protocol::MAGIC;
use mirror_tests::{
    env::{mirror_bin, skip, which},
    fs::{file_digest, secret_file, unique_name, TempDir},
    net::free_addr,
    proc::{drain, spawn_until, Kill, Replica, ReplicaLaunch},
    tls::certs,
};
use tokio::io::AsyncWriteExt;

const MIB: usize = 1 << 20;

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// A field of /proc/PID/status (kB for the sizes).
fn proc_status(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(field).and_then(|v| v.split_whitespace().next()?.parse().ok()))
        .unwrap_or(0)
}

/// What the flood saw.
#[derive(Default)]
struct Flood {
    opened: AtomicUsize,
    /// Closed by the server (refused, evicted, timed out).
    closed: AtomicUsize,
    /// Still open when the flood ended.
    held: AtomicUsize,
}

/// Opens `n` connections from 127.0.0.2 to `addr`, each sending the start of a large message and
/// then one byte every 500 ms, until `stop`.
fn flood(addr: std::net::SocketAddr, n: usize, stop: Arc<AtomicBool>, seen: Arc<Flood>) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async move {
        let mut tasks = Vec::new();
        for i in 0..n {
            let (stop, seen) = (stop.clone(), seen.clone());
            tasks.push(tokio::spawn(async move {
                let sock = tokio::net::TcpSocket::new_v4().ok()?;
                sock.bind("127.0.0.2:0".parse().unwrap()).ok()?;
                let mut c = sock.connect(addr).await.ok()?;
                seen.opened.fetch_add(1, Ordering::Relaxed);
                let announce: Vec<u8> = if i % 2 == 0 {
                    // A protocol frame header announcing a 16 MiB payload (magic, kind, id, len,
                    // crc), the length's bytes last so that the header stays incomplete.
                    let mut h = MAGIC.to_le_bytes().to_vec();
                    h.extend([1u8, 0, 0, 0]);
                    h.extend(7u64.to_le_bytes());
                    h.extend((16u32 << 20).to_le_bytes());
                    h.extend([0u8; 4]);
                    h
                } else {
                    // A TLS handshake record announcing 16 KiB (the largest record).
                    vec![0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x00, 0x3f, 0xfc, 0x03, 0x03]
                };
                let mut sent = 0;
                while !stop.load(Ordering::Relaxed) {
                    let b = announce.get(sent).copied().unwrap_or(0x41);
                    if c.write_all(&[b]).await.is_err() {
                        seen.closed.fetch_add(1, Ordering::Relaxed);
                        return Some(());
                    }
                    sent += 1;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                seen.held.fetch_add(1, Ordering::Relaxed);
                Some(())
            }));
            if i % 100 == 99 {
                tokio::task::yield_now().await;
            }
        }
        for t in tasks {
            let _ = t.await;
        }
    });
}

#[test]
fn slow_unauthenticated_connections_cost_little_and_do_not_stop_an_authenticated_router() {
    flood_while_fio_runs(
        "tls_limits::slow_unauthenticated_connections_cost_little_and_do_not_stop_an_authenticated_router",
        true,
    );
}

/// The same on a plaintext (loopback) link, where the frame reader itself sees the 16 MiB
/// announcements: the pre-auth cap refuses them from the header.
#[test]
fn plaintext_slow_unauthenticated_connections_cost_little_too() {
    flood_while_fio_runs("tls_limits::plaintext_slow_unauthenticated_connections_cost_little_too", false);
}

fn flood_while_fio_runs(test: &str, tls: bool) {
    if which("fio").is_none() {
        return skip(test, "NBD", "fio is not installed (cargo xtask setup)");
    }
    let dir = TempDir::new("tls-limits");
    let secret = secret_file(&dir.0);
    let ca = dir.0.join("ca");
    certs(&["ca", "--dir", &s(&ca)]);
    for n in ["node-a", "node-b"] {
        certs(&["node", "--ca", &s(&ca), "--name", n, "--dir", &s(&dir.0.join(n))]);
    }
    for f in ["s.img", "t.img"] {
        std::fs::write(dir.0.join(f), vec![0u8; 32 * MIB]).unwrap();
    }
    let t_img = dir.0.join("t.img");
    let (tls_b, tls_a) =
        (["--tls".to_string(), s(&dir.0.join("node-b"))], ["--tls".to_string(), s(&dir.0.join("node-a"))]);
    let (tls_b, tls_a): (&[String], &[String]) = if tls { (&tls_b, &tls_a) } else { (&[], &[]) };
    let args = ["replica", "--listen", "127.0.0.1:0", "--secret-file", &s(&secret)]
        .iter()
        .map(std::string::ToString::to_string)
        .chain(tls_b.iter().cloned())
        .chain(["--volume".into(), format!("v={}", t_img.display())])
        .collect();
    let mut launch = ReplicaLaunch::new(mirror_bin(), args);
    launch.rust_log = Some("error".into());
    let t = Replica::launch(launch, &t_img).unwrap_or_else(|e| panic!("{e:#}"));

    let ctl = std::env::temp_dir().join(format!("{}.sock", unique_name("tls-limits")));
    let (child, nbd, out) = spawn_until(
        Command::new(mirror_bin())
            .args(["serve", "--volume", "v", "--secret-file", &s(&secret), "--assume-clean"])
            .args(["--source", &format!("local:{}", dir.0.join("s.img").display())])
            .args(["--target", &format!("remote:{}{}", if tls { "node-b@" } else { "" }, t.addr)])
            .args(tls_a)
            .args(["--source-listen", &free_addr()])
            .args(["--target-weight", "50", "--ctl-socket", &s(&ctl), "--nbd", "127.0.0.1:0"])
            .env("RUST_LOG", "error"),
        "nbd listening on ",
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    drain(out);
    let srv = Kill(child);

    std::thread::sleep(Duration::from_secs(1));
    let pid = t.pid();
    let (idle_rss, idle_threads) = (proc_status(pid, "VmRSS:"), proc_status(pid, "Threads:"));

    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Flood::default());
    let addr = t.addr.parse().unwrap();
    let flooder = {
        let (stop, seen) = (stop.clone(), seen.clone());
        std::thread::spawn(move || flood(addr, 2000, stop, seen))
    };
    std::thread::sleep(Duration::from_secs(2));
    let fio = Command::new("fio")
        .args(["--name=through-the-flood", "--ioengine=nbd", "--rw=randrw", "--bs=4k", "--iodepth=16"])
        .args(["--size=32M", "--time_based", "--runtime=12", "--randrepeat=0"])
        .arg(format!("--uri=nbd://{nbd}/"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run fio");
    let (mut max_rss, mut max_threads) = (idle_rss, idle_threads);
    let until = Instant::now() + Duration::from_secs(14);
    while Instant::now() < until {
        max_rss = max_rss.max(proc_status(pid, "VmRSS:"));
        max_threads = max_threads.max(proc_status(pid, "Threads:"));
        std::thread::sleep(Duration::from_millis(100));
    }
    let fio = fio.wait_with_output().expect("fio");
    stop.store(true, Ordering::Relaxed);
    flooder.join().expect("flood thread");
    let text = format!("{}{}", String::from_utf8_lossy(&fio.stdout), String::from_utf8_lossy(&fio.stderr));
    let (opened, closed, held) = (
        seen.opened.load(Ordering::Relaxed),
        seen.closed.load(Ordering::Relaxed),
        seen.held.load(Ordering::Relaxed),
    );
    println!(
        "replica RSS idle {idle_rss} kB, max {max_rss} kB (+{} kB); threads idle {idle_threads}, max {max_threads}; \
         flood: {opened} opened, {closed} closed by the server, {held} still open at the end",
        max_rss - idle_rss
    );
    let summary: Vec<&str> = text.lines().filter(|l| l.contains("IOPS") || l.contains("err=")).collect();
    println!("fio: {}", summary.join(" | "));
    assert!(fio.status.success(), "fio failed:\n{text}");
    assert!(text.contains("err= 0") && !text.contains("error="), "fio reported errors:\n{text}");
    assert_eq!(opened, 2000, "the flood could not open its connections");
    assert!(closed > 0, "the server closed none of the flood's connections");
    assert!(max_rss - idle_rss < 64 << 10, "replica RSS grew by {} kB", max_rss - idle_rss);
    assert!(max_threads <= idle_threads + 8, "threads: idle {idle_threads}, max {max_threads}");
    drop(srv);
    drop(t);
    assert_eq!(file_digest(&dir.0.join("s.img")), file_digest(&t_img), "replicas differ");
}
