//! NBD with STARTTLS against clients nobody here wrote: `mirror serve --nbd-tls DIR
//! --nbd-tls-verify-peer` (two local replicas) is written and read by qemu-io with
//! `tls-creds-x509`, and read by nbdinfo and nbdcopy with `nbds://`; a client that does not start
//! TLS is refused (NBD_REP_ERR_TLS_REQD), and so is one whose certificate another CA signed.

use std::{
    path::Path,
    process::{Command, Output, Stdio},
};

use mirror_tests::{
    env::{mirror_bin, skip, which},
    fs::{file_digest, secret_file, unique_name, TempDir},
    proc::{drain, mirror_cli, spawn_until, Kill},
    tls::{certs, trust_too},
};

const SIZE: usize = 16 << 20;

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().expect("run client")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn qemu_io(dir: &Path, nbd: &str, cmds: &[&str]) -> Output {
    let (host, port) = nbd.rsplit_once(':').expect("HOST:PORT");
    let mut c = Command::new("qemu-io");
    c.args(["--object", &format!("tls-creds-x509,id=tls0,dir={},endpoint=client", s(dir))])
        .args(["--image-opts", &format!("driver=nbd,host={host},port={port},export=v,tls-creds=tls0")]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    run(&mut c)
}

#[test]
fn nbd_starttls_serves_qemu_and_libnbd_clients_and_refuses_the_others() {
    const T: &str = "tls_nbd::nbd_starttls_serves_qemu_and_libnbd_clients_and_refuses_the_others";
    if let Some(tool) = ["qemu-io", "nbdinfo", "nbdcopy"].into_iter().find(|t| which(t).is_none()) {
        return skip(T, "NBD", &format!("{tool} is not installed (cargo xtask setup)"));
    }
    let dir = TempDir::new("tls-nbd");
    let secret = secret_file(&dir.0);
    let (ca, node, other, stranger) =
        (dir.0.join("ca"), dir.0.join("node-a"), dir.0.join("other-ca"), dir.0.join("stranger"));
    certs(&["ca", "--dir", &s(&ca)]);
    certs(&["node", "--ca", &s(&ca), "--name", "node-a", "--ip", "127.0.0.1", "--dir", &s(&node)]);
    certs(&["ca", "--dir", &s(&other)]);
    certs(&["node", "--ca", &s(&other), "--name", "stranger", "--dir", &s(&stranger)]);
    // The stranger trusts our CA too: its own certificate is what gets it refused.
    trust_too(&stranger, &[&ca]);
    for f in ["s.img", "t.img"] {
        std::fs::write(dir.0.join(f), vec![0u8; SIZE]).unwrap();
    }
    let ctl = std::env::temp_dir().join(format!("{}.sock", unique_name("tls-nbd")));
    let log = dir.0.join("serve.log");
    let (child, nbd, out) = spawn_until(
        Command::new(mirror_bin())
            .args(["serve", "--volume", "v", "--secret-file", &s(&secret), "--assume-clean"])
            .args(["--source", &format!("local:{}", dir.0.join("s.img").display())])
            .args(["--target", &format!("local:{}", dir.0.join("t.img").display())])
            .args(["--nbd-tls", &s(&node), "--nbd-tls-verify-peer"])
            .args(["--ctl-socket", &s(&ctl), "--nbd", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(&log).unwrap()),
        "nbd listening on ",
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    drain(out);
    let srv = Kill(child);

    // qemu-io through TLS with its client certificate.
    let o = qemu_io(&node, &nbd, &["write -P 0xa5 1M 256k", "read -P 0xa5 1M 256k", "write -P 0x5a 8M 64k"]);
    assert!(o.status.success() && !text(&o).contains("Pattern verification failed"), "qemu-io: {}", text(&o));
    assert!(!text(&o).contains("failed"), "qemu-io: {}", text(&o));
    // libnbd: nbds:// with the same directory.
    let uri = format!("nbds://{nbd}/v?tls-certificates={}", s(&node));
    let o = run(Command::new("nbdinfo").arg(&uri));
    let info = text(&o);
    assert!(
        o.status.success() && info.contains("with TLS") && info.contains(&format!("export-size: {SIZE}")),
        "nbdinfo: {info}"
    );
    let copy = dir.0.join("copy.img");
    let o = run(Command::new("nbdcopy").arg(&uri).arg(&copy));
    assert!(o.status.success(), "nbdcopy: {}", text(&o));
    assert_eq!(
        file_digest(&copy),
        file_digest(&dir.0.join("s.img")),
        "nbdcopy's copy differs from the volume"
    );

    // Without TLS: refused (TLS required), nothing read.
    let o = run(Command::new("qemu-io").args(["-f", "raw", &format!("nbd://{nbd}/v"), "-c", "read 0 4k"]));
    println!("plaintext qemu-io: {}", text(&o).trim());
    assert!(!text(&o).contains("read 4096/4096"), "a plaintext client read data: {}", text(&o));
    let o = run(Command::new("nbdinfo").arg(format!("nbd://{nbd}/v")));
    println!("plaintext nbdinfo: {}", text(&o).trim());
    assert!(!o.status.success(), "plaintext nbdinfo: {}", text(&o));
    // Another CA's client certificate: refused.
    let o = qemu_io(&stranger, &nbd, &["read 0 4k"]);
    println!("stranger qemu-io: {}", text(&o).trim());
    assert!(!text(&o).contains("read 4096/4096"), "the stranger read data: {}", text(&o));
    let o = run(Command::new("nbdinfo").arg(format!("nbds://{nbd}/v?tls-certificates={}", s(&stranger))));
    assert!(!o.status.success(), "stranger nbdinfo: {}", text(&o));
    drop(srv);
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("TLS established") && log.contains("node-a"), "{log}");
    // gnutls presents no certificate when none of its own is of a CA the server names.
    assert!(
        log.contains("NBD refused peer=")
            && (log.contains("presented no certificate") || log.contains("not signed by the CA")),
        "the stranger's refusal is not logged:\n{log}"
    );
    assert_eq!(file_digest(&dir.0.join("s.img")), file_digest(&dir.0.join("t.img")), "replicas differ");
}

#[test]
fn nbd_beyond_loopback_needs_tls_or_the_insecure_flag() {
    let dir = TempDir::new("tls-nbd-plain");
    let secret = secret_file(&dir.0);
    let (ok, _, err) = mirror_cli(&[
        "serve",
        "--volume",
        "v",
        "--secret-file",
        &s(&secret),
        "--source",
        &format!("local:{}:1M", dir.0.join("s.img").display()),
        "--target",
        &format!("local:{}:1M", dir.0.join("t.img").display()),
        "--nbd",
        "0.0.0.0:0",
    ]);
    assert!(!ok, "NBD on 0.0.0.0 without TLS started");
    assert!(err.contains("not a loopback address") && err.contains("--nbd-insecure-plaintext"), "{err}");
}
