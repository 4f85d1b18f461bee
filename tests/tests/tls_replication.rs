//! The replication link over TLS 1.3 with mutual certificates, with real processes: a router
//! (`mirror serve`, a local source and a remote target) and `mirror replica` servers holding
//! credentials `mirror certs` made. Data passes qemu-io's pattern verify and a resync runs over
//! TLS; each kind of refused peer (another CA, an expired certificate, the wrong node name, a
//! plaintext client on the TLS port) is refused with a log line naming the reason, and nothing
//! of the volume is read or written; plaintext on an address that is not loopback needs the
//! insecure flag. A man in the middle flipping one bit after the handshake gets the connection
//! torn down with no write applied; the router serves from the survivor and resyncs the target
//! once the path heals.

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

use mirror::{
    replication::{
        client::{Client, ClientError},
        transport::{PeerAddr, Transport},
    },
    tls::issue::{new_ca, new_node, Issued, NodeSpec, Validity},
};
use mirror_tests::{
    env::{mirror_bin, skip, which},
    fs::{file_digest, secret_file, unique_name, TempDir},
    net::free_addr,
    proc::{drain, mirror_cli, qemu_io, spawn_until, wait_clean, Kill, Replica, ReplicaLaunch},
    tls::{pki, trust_too},
};

const MIB: usize = 1 << 20;

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// A replica server on loopback with `--tls dir` and `extra`, its log (RUST_LOG=info) in `log`.
fn tls_replica(img: &Path, secret: &Path, dir: &Path, log: &Path, extra: &[&str]) -> Replica {
    let mut args: Vec<String> =
        ["replica", "--listen", "127.0.0.1:0", "--secret-file", &s(secret), "--tls", &s(dir)]
            .iter()
            .map(std::string::ToString::to_string)
            .collect();
    args.extend(["--volume".into(), format!("v={}", img.display())]);
    args.extend(extra.iter().map(std::string::ToString::to_string));
    let mut launch = ReplicaLaunch::new(mirror_bin(), args);
    launch.log = Some(log.to_path_buf());
    launch.rust_log = Some("info".into());
    Replica::launch(launch, img).unwrap_or_else(|e| panic!("{e:#}"))
}

/// `text` without its ANSI colour sequences.
fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ ... letter
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Waits (10 s) until `log` holds a line with every one of `words`; returns that line.
fn log_line(log: &Path, words: &[&str]) -> String {
    log_line_within(log, words, 10)
}

fn log_line_within(log: &Path, words: &[&str], secs: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let text = plain(&std::fs::read_to_string(log).unwrap_or_default());
        if let Some(l) = text.lines().find(|l| words.iter().all(|w| l.contains(w))) {
            return l.to_string();
        }
        assert!(Instant::now() < deadline, "no line with {words:?} in {}:\n{text}", log.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `mirror serve`, killed on drop, its log in `log`.
struct Serve {
    _child: Kill,
    nbd: String,
}

fn serve(args: &[String], log: &Path) -> Serve {
    let ctl = std::env::temp_dir().join(format!("{}.sock", unique_name("tls-serve")));
    let f = std::fs::File::create(log).expect("serve log");
    let (child, nbd, out) = spawn_until(
        Command::new(mirror_bin())
            .arg("serve")
            .args(args)
            .args(["--ctl-socket", &s(&ctl), "--nbd", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .stderr(Stdio::from(f)),
        "nbd listening on ",
    )
    .unwrap_or_else(|e| panic!("{e:#} (see {})", log.display()));
    drain(out);
    Serve { _child: Kill(child), nbd }
}

/// A scratch directory with a secret, a CA and nodes `a` (the router) and `b` (the target),
/// and zeroed images `s.img` and `t.img` of 16 MiB.
struct Nodes {
    dir: TempDir,
    secret: PathBuf,
    a: PathBuf,
    b: PathBuf,
}

impl Nodes {
    fn new(tag: &str) -> Nodes {
        let dir = TempDir::new(tag);
        let secret = secret_file(&dir.0);
        pki(&dir.0, "ca", &["node-a", "node-b"]);
        let (a, b) = (dir.0.join("node-a"), dir.0.join("node-b"));
        for f in ["s.img", "t.img"] {
            std::fs::write(dir.0.join(f), vec![0u8; 16 * MIB]).unwrap();
        }
        Nodes { dir, secret, a, b }
    }
}

/// `mirror serve` flags: the local source `dir/s.img` served at `source_listen`, the target
/// `node-b` at `target`, TLS with the credentials in `tls`, both files taken as in sync.
fn router_args(dir: &Path, secret: &Path, target: &str, tls: &Path, source_listen: &str) -> Vec<String> {
    let source = format!("local:{}", dir.join("s.img").display());
    let target = format!("remote:node-b@{target}");
    [
        "--volume",
        "v",
        "--source",
        &source,
        "--target",
        &target,
        "--secret-file",
        &s(secret),
        "--tls",
        &s(tls),
        "--source-listen",
        source_listen,
        "--assume-clean",
        "--target-weight",
        "50",
    ]
    .iter()
    .map(std::string::ToString::to_string)
    .collect()
}

#[test]
fn router_and_replica_over_tls_pass_a_qemu_io_verify_and_resync_over_tls() {
    const T: &str = "tls_replication::router_and_replica_over_tls_pass_a_qemu_io_verify_and_resync_over_tls";
    if which("qemu-io").is_none() {
        return skip(T, "NBD", "qemu-io is not installed (cargo xtask setup)");
    }
    let Nodes { dir, secret, a, b } = Nodes::new("tls-repl");
    let rlog = dir.0.join("replica.log");
    // The target accepts node-a only.
    let mut t = tls_replica(&dir.0.join("t.img"), &secret, &b, &rlog, &["--tls-allow", "node-a"]);
    let source_listen = free_addr();
    let args = router_args(&dir.0, &secret, &t.addr, &a, &source_listen);
    let slog = dir.0.join("serve.log");
    let srv = serve(&args, &slog);
    let line = log_line(&rlog, &["peer authenticated", "node=node-a"]);
    println!("replica: {line}");
    let line = log_line(&slog, &["remote replica connected over TLS", "node=node-b"]);
    println!("router: {line}");

    qemu_io(
        &srv.nbd,
        &["write -P 0xa5 0 4M", "write -P 0x5a 8M 1M", "read -P 0xa5 0 4M", "read -P 0x5a 8M 1M"],
    );
    // The target away: writes recorded on the source, then resynced over TLS by the source's
    // job (the embedded server connects to the target as node-a).
    t.kill();
    qemu_io(&srv.nbd, &["write -P 0x3c 2M 2M", "read -P 0x3c 2M 2M"]);
    t.restart();
    wait_clean(&source_listen, &secret, &["--tls", &s(&a)]);
    log_line(&slog, &["job connected to its peer over TLS", "node=node-b"]);
    qemu_io(&srv.nbd, &["read -P 0xa5 0 2M", "read -P 0x3c 2M 2M", "read -P 0x5a 8M 1M", "read -P 0 9M 1M"]);
    // The operator's CLI over TLS: a verify job from the source to the pinned target.
    let peer = format!("node-b@{}", t.addr);
    let (ok, out, err) = mirror_cli(&[
        "sync",
        "--verify",
        "--json",
        "--node",
        &source_listen,
        "--peer",
        &peer,
        "--volume",
        "v",
        "--secret-file",
        &s(&secret),
        "--tls",
        &s(&a),
    ]);
    assert!(ok, "mirror sync --verify over TLS: {out}{err}");
    let job: serde_json::Value = serde_json::from_str(&out).expect("job JSON");
    println!("verify over TLS: {}", job["state"]);
    assert_eq!(job["state"], "done", "{out}");
    drop(srv);
    assert_eq!(file_digest(&dir.0.join("s.img")), file_digest(&dir.0.join("t.img")), "replicas differ");
}

/// Writes node `name`'s credentials from `ca` (its key read from `ca_dir`) with `validity`.
fn node_with(ca_dir: &Path, root: &Path, name: &str, validity: Validity) -> PathBuf {
    let ca = Issued {
        cert_pem: std::fs::read_to_string(ca_dir.join("ca-cert.pem")).unwrap(),
        key_pem: std::fs::read_to_string(ca_dir.join("ca-key.pem")).unwrap(),
    };
    let spec = NodeSpec { name: name.into(), ips: vec![], dns: vec![] };
    let certs = new_node(&ca, &spec, validity).expect("issue");
    let d = root.join(name);
    std::fs::create_dir_all(&d).unwrap();
    for (f, c) in [
        ("ca-cert.pem", &ca.cert_pem),
        ("server-cert.pem", &certs.server.cert_pem),
        ("server-key.pem", &certs.server.key_pem),
        ("client-cert.pem", &certs.client.cert_pem),
        ("client-key.pem", &certs.client.key_pem),
    ] {
        std::fs::write(d.join(f), c).unwrap();
    }
    d
}

#[test]
fn refused_peers_are_logged_with_the_reason_and_touch_nothing() {
    let dir = TempDir::new("tls-refuse");
    let secret = secret_file(&dir.0);
    let key = std::fs::read(&secret).unwrap();
    let key = key.trim_ascii();
    let day = Duration::from_hours(24);
    let now = SystemTime::now();
    // A CA valid from a month ago (so that a certificate it issued can be loaded as of a past
    // day), written in `mirror certs`' layout.
    let ca = dir.0.join("ca");
    let issued =
        new_ca(&unique_name("test CA"), Validity { not_before: now - 30 * day, not_after: now + 30 * day })
            .expect("CA");
    std::fs::create_dir_all(&ca).unwrap();
    std::fs::write(ca.join("ca-cert.pem"), &issued.cert_pem).unwrap();
    std::fs::write(ca.join("ca-key.pem"), &issued.key_pem).unwrap();
    for n in ["node-a", "node-b", "node-x"] {
        node_with(&ca, &dir.0, n, Validity::days_from(now - day, 10));
    }
    // A node of another CA that trusts ours too: its certificate is what gets it refused.
    pki(&dir.0, "other-ca", &["stranger"]);
    trust_too(&dir.0.join("stranger"), &[&ca]);
    let _old = node_with(&ca, &dir.0, "old", Validity { not_before: now - 10 * day, not_after: now - day });
    let img = dir.0.join("v.img");
    std::fs::write(&img, mirror_tests::fs::random_bytes(4 * MIB, 7)).unwrap();
    let before = file_digest(&img);
    let log = dir.0.join("replica.log");
    let r = tls_replica(
        &img,
        &secret,
        &dir.0.join("node-b"),
        &log,
        &["--tls-allow", "node-a", "--tls-allow", "old"],
    );
    let peer = |p: &str| PeerAddr::parse(&p.replace("ADDR", &r.addr)).unwrap();
    let client = |d: &str, at: SystemTime| Transport::tls_client(&dir.0.join(d), at).expect("credentials");
    let attempt = |t: &Transport, p: &PeerAddr| -> ClientError {
        let e = Client::connect_over(t, p, "v", key).expect_err("must be refused");
        println!("client: {e}");
        e
    };
    // Allowed and valid: served (the reference that the others fail for their reason only).
    let mut ok =
        Client::connect_over(&client("node-a", now), &peer("node-b@ADDR"), "v", key).expect("node-a");
    assert_eq!(ok.node.as_deref(), Some("node-b"));
    assert_eq!(ok.read(0, 4096).unwrap().len(), 4096);
    drop(ok);

    // Another CA.
    let e = attempt(&client("stranger", now), &peer("ADDR"));
    assert!(e.to_string().contains("alert"), "{e}");
    println!("replica: {}", log_line(&log, &["refused peer=", "not signed by the CA"]));
    // Expired (loaded as of two days ago, when it was valid; the server checks today).
    let e = attempt(&client("old", now - 2 * day), &peer("ADDR"));
    assert!(e.to_string().contains("alert"), "{e}");
    println!("replica: {}", log_line(&log, &["refused peer=", "expired at"]));
    // A node of the CA the server does not allow.
    let e = attempt(&client("node-x", now), &peer("ADDR"));
    assert!(e.to_string().contains("alert"), "{e}");
    println!("replica: {}", log_line(&log, &["refused peer=", "node-x", "expected"]));
    // The client expects another node there: refused on the client's side.
    let e = attempt(&client("node-a", now), &peer("node-c@ADDR"));
    assert!(e.to_string().contains("expected [\"node-c\"]"), "{e}");
    println!("replica: {}", log_line(&log, &["refused peer=", "alert"]));
    // Plaintext client on the TLS port.
    let e = attempt(&Transport::default(), &peer("ADDR"));
    assert!(matches!(e, ClientError::Conn(_)), "{e}");
    println!("replica: {}", log_line(&log, &["refused peer=", "does not speak TLS"]));

    let text = plain(&std::fs::read_to_string(&log).unwrap());
    assert_eq!(text.matches("peer authenticated").count(), 1, "only node-a authenticated:\n{text}");
    drop(r);
    assert_eq!(file_digest(&img), before, "the volume changed");
}

#[test]
fn plaintext_beyond_loopback_needs_the_insecure_flag() {
    let dir = TempDir::new("tls-plain");
    let secret = secret_file(&dir.0);
    let img = format!("v={}:1M", dir.0.join("v.img").display());
    let base = ["replica", "--listen", "0.0.0.0:0", "--volume", &img, "--secret-file", &s(&secret)];
    let (ok, _, err) = mirror_cli(&base);
    assert!(!ok, "a plaintext listener on 0.0.0.0 started");
    assert!(err.contains("is not a loopback address") && err.contains("--insecure-plaintext"), "{err}");
    // With the flag it starts (and announces its address).
    let args = base.iter().chain(&["--insecure-plaintext"]).map(std::string::ToString::to_string).collect();
    let mut launch = ReplicaLaunch::new(mirror_bin(), args);
    launch.rust_log = Some("warn".into());
    let r = Replica::launch(launch, &dir.0.join("v.img")).expect("starts with --insecure-plaintext");
    assert!(r.addr.starts_with("0.0.0.0:"), "{}", r.addr);
    // A client refuses plaintext to an address that is not loopback before dialling it.
    let e = Client::connect_over(&Transport::default(), &PeerAddr::any("192.0.2.1:7700"), "v", b"x")
        .expect_err("refused");
    assert!(e.to_string().contains("is not a loopback address"), "{e}");
}

/// A man in the middle on loopback between the router and its target: it forwards bytes both
/// ways and, when armed, flips one bit of the next large chunk from the router (a write's TLS
/// records) and then refuses new connections until opened again.
struct Mitm {
    addr: String,
    armed: Arc<AtomicBool>,
    blocked: Arc<AtomicBool>,
    flipped: Arc<AtomicUsize>,
}

impl Mitm {
    fn start(to: String) -> Mitm {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = l.local_addr().unwrap().to_string();
        let (armed, blocked, flipped) = (Arc::default(), Arc::<AtomicBool>::default(), Arc::default());
        let m = Mitm { addr, armed, blocked, flipped };
        let (a, b, f) = (m.armed.clone(), m.blocked.clone(), m.flipped.clone());
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(c) = c else { continue };
                if b.load(Ordering::SeqCst) {
                    continue; // dropped: closed
                }
                let Ok(s) = TcpStream::connect(&to) else { continue };
                let (c2, s2) = (c.try_clone().unwrap(), s.try_clone().unwrap());
                let (a, b, f) = (a.clone(), b.clone(), f.clone());
                std::thread::spawn(move || pump(c, s, Some((a, b, f))));
                std::thread::spawn(move || pump(s2, c2, None));
            }
        });
        m
    }
}

type Flip = (Arc<AtomicBool>, Arc<AtomicBool>, Arc<AtomicUsize>);

/// Copies `from` to `to` until either ends; with `flip`, flips a bit of the first chunk of 4 KiB
/// or more read while armed.
fn pump(mut from: TcpStream, mut to: TcpStream, flip: Option<Flip>) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some((armed, blocked, flipped)) = &flip {
            if n >= 4096 && armed.compare_exchange(true, false, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
                blocked.store(true, Ordering::SeqCst);
                buf[n / 2] ^= 0x10;
                flipped.fetch_add(1, Ordering::SeqCst);
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

#[test]
fn a_byte_flipped_on_the_way_tears_the_link_down_applies_nothing_and_the_target_resyncs_later() {
    const T: &str = "tls_replication::a_byte_flipped_on_the_way_tears_the_link_down_applies_nothing_and_the_target_resyncs_later";
    if which("qemu-io").is_none() {
        return skip(T, "NBD", "qemu-io is not installed (cargo xtask setup)");
    }
    let Nodes { dir, secret, a, b } = Nodes::new("tls-mitm");
    let rlog = dir.0.join("replica.log");
    let t = tls_replica(&dir.0.join("t.img"), &secret, &b, &rlog, &[]);
    let mitm = Mitm::start(t.addr.clone());
    let source_listen = free_addr();
    let args = router_args(&dir.0, &secret, &mitm.addr, &a, &source_listen);
    let slog = dir.0.join("serve.log");
    let srv = serve(&args, &slog);
    qemu_io(&srv.nbd, &["write -P 0xa1 0 1M", "read -P 0xa1 0 1M"]);

    // One bit flipped in the TLS records of a 64 KiB write on its way to the target.
    mitm.armed.store(true, Ordering::SeqCst);
    qemu_io(&srv.nbd, &["write -P 0xb2 512k 64k"]);
    assert_eq!(mitm.flipped.load(Ordering::SeqCst), 1, "the proxy flipped nothing");
    println!("replica: {}", log_line(&rlog, &["closing connection", "TLS connection broken"]));
    println!("router: {}", log_line(&slog, &["replica failed", "target"]));
    // The target did not apply it (nor anything after: the proxy refuses the reconnects).
    let t_now = std::fs::read(dir.0.join("t.img")).unwrap();
    assert!(t_now[512 << 10..576 << 10].iter().all(|&x| x == 0xa1), "the corrupted write reached the target");
    // The router serves from the survivor meanwhile.
    qemu_io(&srv.nbd, &["read -P 0xb2 512k 64k", "write -P 0xc3 2M 1M", "read -P 0xc3 2M 1M"]);

    // The path heals: the target is reconnected and resynced over TLS.
    mitm.blocked.store(false, Ordering::SeqCst);
    println!("router: {}", log_line_within(&slog, &["replica resynced and back in service"], 60));
    wait_clean(&source_listen, &secret, &["--tls", &s(&a)]);
    qemu_io(&srv.nbd, &["read -P 0xa1 0 512k", "read -P 0xb2 512k 64k", "read -P 0xc3 2M 1M"]);
    drop(srv);
    assert_eq!(file_digest(&dir.0.join("s.img")), file_digest(&dir.0.join("t.img")), "replicas differ");
}
