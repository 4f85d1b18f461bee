//! `mirror certs` output against TLS stacks nobody here wrote: qemu-nbd and nbdkit serve a file
//! with the node directory `mirror certs node` made, and qemu-io, qemu-img, nbdinfo and nbdcopy
//! read and write it through TLS with client certificates (gnutls checks the chain, the
//! purposes, the key usage and the address in the server certificate). A client holding a
//! certificate of another CA is refused. The CLI's own checks (`show`, no overwriting) run on the
//! binary.

use std::{
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use mirror_tests::env::skip;
use mirror_tests::env::which;
use mirror_tests::fs::file_digest;
use mirror_tests::fs::random_bytes;
use mirror_tests::fs::TempDir;
use mirror_tests::proc::mirror_cli;

const SIZE: usize = 8 << 20;

fn missing(test: &str, tools: &[&str]) -> bool {
    match tools.iter().find(|t| which(t).is_none()) {
        Some(tool) => {
            skip(test, "NBD", &format!("{tool} is not installed (Debian: qemu-utils, libnbd-bin, nbdkit)"));
            true
        }
        None => false,
    }
}

fn certs(args: &[&str]) -> String {
    let (ok, out, err) = mirror_cli(&[&["certs"], args].concat());
    assert!(ok, "mirror certs {args:?}: {err}");
    out
}

/// A CA in `root/ca` and node-a's credentials in `root/node-a` (server certificate for
/// 127.0.0.1), made by the binary.
fn node_dir(root: &Path) -> PathBuf {
    let (ca, node) = (root.join("ca"), root.join("node-a"));
    certs(&["ca", "--dir", &s(&ca)]);
    certs(&["node", "--ca", &s(&ca), "--name", "node-a", "--ip", "127.0.0.1", "--dir", &s(&node)]);
    node
}

/// Credentials of another CA that trust ours too: their certificate must be what gets them
/// refused (gnutls checks a client's own certificate against its CA file before it connects).
fn stranger_dir(root: &Path, ours: &Path) -> PathBuf {
    let (ca, node) = (root.join("other-ca"), root.join("stranger"));
    certs(&["ca", "--dir", &s(&ca)]);
    certs(&["node", "--ca", &s(&ca), "--name", "node-b", "--dir", &s(&node)]);
    let bundle = [std::fs::read(ca.join("ca-cert.pem")), std::fs::read(ours.join("ca-cert.pem"))]
        .map(|r| r.expect("read CA"))
        .concat();
    std::fs::write(node.join("ca-cert.pem"), bundle).expect("write CA bundle");
    node
}

fn s(p: &Path) -> String {
    p.to_str().expect("utf-8 path").to_string()
}

/// A TLS NBD server process on 127.0.0.1, killed on drop.
struct NbdServer {
    child: Child,
    port: u16,
}

impl NbdServer {
    /// Starts `argv(port)` on a free port and waits until it accepts connections (a port taken
    /// meanwhile makes the server exit: another port is tried).
    fn start(argv: impl Fn(u16) -> Command) -> NbdServer {
        for _ in 0..5 {
            let port =
                TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
            let mut child = argv(port).stdout(Stdio::null()).spawn().expect("spawn NBD server");
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return NbdServer { child, port };
                }
                if child.try_wait().expect("wait").is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("the NBD server did not start");
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().expect("run client")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn qemu_client(dir: &Path, port: u16) -> [String; 4] {
    [
        "--object".into(),
        format!("tls-creds-x509,id=tls0,dir={},endpoint=client", s(dir)),
        "--image-opts".into(),
        format!("driver=nbd,host=127.0.0.1,port={port},export=exp,tls-creds=tls0"),
    ]
}

#[test]
fn qemu_nbd_serves_with_mirror_certs_to_qemu_and_libnbd_clients() {
    const T: &str = "qemu_nbd_serves_with_mirror_certs_to_qemu_and_libnbd_clients";
    if missing(T, &["qemu-nbd", "qemu-io", "qemu-img", "nbdinfo", "nbdcopy"]) {
        return;
    }
    let root = TempDir::new("tls-qemu");
    let node = node_dir(&root.0);
    let disk = root.0.join("disk.img");
    std::fs::write(&disk, random_bytes(SIZE, 7)).expect("write disk");
    let server = NbdServer::start(|port| {
        let mut c = Command::new("qemu-nbd");
        c.args(["--object", &format!("tls-creds-x509,id=tls0,dir={},endpoint=server", s(&node))])
            .args(["--tls-creds", "tls0", "-f", "raw", "-b", "127.0.0.1", "-x", "exp", "-t", "-p"])
            .arg(port.to_string())
            .arg(&disk);
        c
    });

    // qemu-io writes a pattern through TLS and reads it back; the file holds it.
    let o = run(Command::new("qemu-io").args(qemu_client(&node, server.port)).args([
        "-c",
        "write -P 0xa5 1M 64k",
        "-c",
        "read -P 0xa5 1M 64k",
    ]));
    assert!(o.status.success() && !text(&o).contains("Pattern verification failed"), "qemu-io: {}", text(&o));
    let file = std::fs::read(&disk).expect("read disk");
    assert!(file[1 << 20..(1 << 20) + (64 << 10)].iter().all(|&b| b == 0xa5), "the write did not land");

    // qemu-img reads the whole image through TLS.
    let copy = root.0.join("qemu-img.img");
    let o = run(Command::new("qemu-img")
        .arg("convert")
        .args(qemu_client(&node, server.port))
        .args(["-O", "raw"])
        .arg(&copy));
    assert!(o.status.success(), "qemu-img convert: {}", text(&o));
    assert_eq!(file_digest(&copy), file_digest(&disk));

    // libnbd: nbds:// with the same directory.
    let uri = format!("nbds://127.0.0.1:{}/exp?tls-certificates={}", server.port, s(&node));
    let o = run(Command::new("nbdinfo").arg(&uri));
    assert!(o.status.success(), "nbdinfo: {}", text(&o));
    let info = text(&o);
    assert!(info.contains("with TLS") && info.contains(&format!("export-size: {SIZE}")), "nbdinfo: {info}");
    let copy = root.0.join("nbdcopy.img");
    let o = run(Command::new("nbdcopy").arg(&uri).arg(&copy));
    assert!(o.status.success(), "nbdcopy: {}", text(&o));
    assert_eq!(file_digest(&copy), file_digest(&disk));

    // A client whose certificate another CA signed gets nothing.
    let stranger = stranger_dir(&root.0, &node);
    let o = run(Command::new("qemu-io").args(qemu_client(&stranger, server.port)).args(["-c", "read 0 4k"]));
    assert!(!o.status.success() || text(&o).contains("Could not open"), "qemu-io (stranger): {}", text(&o));
    assert!(!text(&o).contains("read 4096/4096"), "qemu-io (stranger) read data: {}", text(&o));
    let uri = format!("nbds://127.0.0.1:{}/exp?tls-certificates={}", server.port, s(&stranger));
    let o = run(Command::new("nbdinfo").arg(&uri));
    assert!(!o.status.success(), "nbdinfo (stranger): {}", text(&o));
}

#[test]
fn nbdkit_serves_with_mirror_certs_and_verifies_peers() {
    const T: &str = "nbdkit_serves_with_mirror_certs_and_verifies_peers";
    if missing(T, &["nbdkit", "nbdcopy", "nbdinfo"]) {
        return;
    }
    let root = TempDir::new("tls-nbdkit");
    let node = node_dir(&root.0);
    let disk = root.0.join("disk.img");
    std::fs::write(&disk, random_bytes(SIZE, 11)).expect("write disk");
    let server = NbdServer::start(|port| {
        let mut c = Command::new("nbdkit");
        c.args(["--foreground", "--exit-with-parent", "-i", "127.0.0.1", "-p", &port.to_string()])
            .args(["--tls=require", &format!("--tls-certificates={}", s(&node)), "--tls-verify-peer"])
            .arg("file")
            .arg(&disk);
        c
    });
    let uri = format!("nbds://127.0.0.1:{}/?tls-certificates={}", server.port, s(&node));
    let copy = root.0.join("copy.img");
    let o = run(Command::new("nbdcopy").arg(&uri).arg(&copy));
    assert!(o.status.success(), "nbdcopy: {}", text(&o));
    assert_eq!(file_digest(&copy), file_digest(&disk));
    let stranger = stranger_dir(&root.0, &node);
    let uri = format!("nbds://127.0.0.1:{}/?tls-certificates={}", server.port, s(&stranger));
    let o = run(Command::new("nbdinfo").arg(&uri));
    assert!(!o.status.success(), "nbdinfo (stranger): {}", text(&o));
}

#[test]
fn certs_cli_keeps_keys_and_shows_problems() {
    // The long help survives the registration (a doc comment on the variant would replace it).
    let help = certs(&["--help"]);
    assert!(help.contains("tls-creds-x509") && help.contains("mirror certs ca --dir"), "{help}");
    let root = TempDir::new("tls-cli");
    let node = node_dir(&root.0);
    let shown = certs(&["show", "--dir", &s(&node)]);
    assert!(shown.contains("CN=node-a") && shown.contains("IP:127.0.0.1"), "{shown}");
    let json: serde_json::Value =
        serde_json::from_str(&certs(&["show", "--dir", &s(&node), "--json"])).expect("show --json");
    assert_eq!(json["usable"], true);
    assert_eq!(json["server"]["cert"]["common_name"], "node-a");

    // Issuing again into the same directory is refused and the keys stay.
    let key = std::fs::read(node.join("server-key.pem")).expect("key");
    let ca = s(&root.0.join("ca"));
    let again = ["certs", "node", "--ca", &ca, "--name", "node-a", "--dir", &s(&node)];
    let (ok, _, err) = mirror_cli(&again);
    assert!(!ok && err.contains("--force"), "{err}");
    assert_eq!(std::fs::read(node.join("server-key.pem")).expect("key"), key);

    // A swapped key and a missing CA file: show names them and fails.
    std::fs::copy(node.join("client-key.pem"), node.join("server-key.pem")).expect("copy");
    let (ok, out, _) = mirror_cli(&["certs", "show", "--dir", &s(&node)]);
    assert!(!ok && out.contains("does not belong to the certificate"), "{out}");
    std::fs::remove_file(node.join("ca-cert.pem")).expect("remove");
    let (ok, out, _) = mirror_cli(&["certs", "show", "--dir", &s(&node)]);
    assert!(!ok && out.contains(&format!("{}: missing", s(&node.join("ca-cert.pem")))), "{out}");
}
