//! TLS credentials for the tests, made by the binary (`mirror certs`): a CA and node
//! directories in qemu's `tls-creds-x509` layout, and a stranger's directory that trusts ours.

use std::path::{Path, PathBuf};

use crate::proc::mirror_cli;

/// `mirror certs ARGS`; panics unless it succeeds.
pub fn certs(args: &[&str]) {
    let (ok, _, err) = mirror_cli(&[&["certs"], args].concat());
    assert!(ok, "mirror certs {args:?}: {err}");
}

/// A CA in `root/ca` and the directories `root/NODE` of `nodes` (server certificates for
/// 127.0.0.1); returns the CA's directory.
pub fn pki(root: &Path, ca: &str, nodes: &[&str]) -> PathBuf {
    let ca_dir = root.join(ca);
    let ca_arg = ca_dir.display().to_string();
    certs(&["ca", "--dir", &ca_arg]);
    for n in nodes {
        let dir = root.join(n).display().to_string();
        certs(&["node", "--ca", &ca_arg, "--name", n, "--ip", "127.0.0.1", "--dir", &dir]);
    }
    ca_dir
}

/// Makes node directory `dir` trust the CAs of `ca_dirs` besides its own, so that its own
/// certificate is what a peer refuses it for.
pub fn trust_too(dir: &Path, ca_dirs: &[&Path]) {
    let mut bundle = std::fs::read(dir.join("ca-cert.pem")).expect("read CA");
    for ca in ca_dirs {
        bundle.extend(std::fs::read(ca.join("ca-cert.pem")).expect("read CA"));
    }
    std::fs::write(dir.join("ca-cert.pem"), bundle).expect("write CA bundle");
}
