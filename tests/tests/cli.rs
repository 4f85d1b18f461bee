//! The `mirror` binary as an operator meets it: help, bad input, the /proc fallback, no daemon.

use std::process::Command;

use mirror_tests::{
    env::{is_root, mirror_bin, skip, which},
    fs::TempDir,
};

fn mirror(args: &[&str]) -> std::process::Output {
    let bin = mirror_bin();
    assert!(bin.is_file(), "{} not built (cargo build / cargo xtask build)", bin.display());
    Command::new(bin).args(args).output().expect("run mirror")
}

#[test]
fn help_explains_the_commands() {
    let out = mirror(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for word in ["daemon", "top", "bpftool"] {
        assert!(text.contains(word), "--help lacks {word}:\n{text}");
    }
    let out = mirror(&["daemon", "--help"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("--pin-dir"));
}

#[test]
fn bad_duration_is_a_clear_error() {
    let out = mirror(&["daemon", "--interval", "soon"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--interval") && err.contains("examples"), "{err}");
}

#[test]
fn daemon_falls_back_to_procfs_and_stops_on_time() {
    let out = mirror(&["daemon", "--no-bpf", "--interval", "100ms", "--for", "350ms"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.matches("node telemetry (procfs").count() >= 3, "{text}");
    assert!(text.contains("DEVICE") && text.contains("INFL"), "{text}");
}

/// Not root: the daemon still starts on /proc and says why, once.
#[test]
fn daemon_without_privileges_falls_back_once_and_clearly() {
    const T: &str = "cli::daemon_without_privileges_falls_back_once_and_clearly";
    if !is_root() {
        // Already unprivileged: run it directly.
    } else if which("setpriv").is_none() {
        return skip(T, "BPF", "setpriv (util-linux) not installed");
    }
    let mut cmd = if is_root() {
        let mut c = std::process::Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]).arg(mirror_bin());
        c
    } else {
        std::process::Command::new(mirror_bin())
    };
    let out = cmd
        .args(["daemon", "--interval", "100ms", "--for", "250ms"])
        .args(["--pin-dir", "/nonexistent/mirror-test"])
        .env("RUST_LOG", "info")
        .output()
        .expect("run mirror daemon");
    let err = String::from_utf8_lossy(&out.stderr);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{err}");
    assert_eq!(err.matches("falling back to").count(), 1, "{err}");
    assert!(
        err.contains("/proc/diskstats") && err.contains("/proc/pressure") && err.contains("/proc/net/snmp"),
        "{err}"
    );
    assert!(text.contains("node telemetry (procfs"), "{text}");
    // /proc/pressure and /proc/net/snmp feed the view in fallback too.
    assert!(text.contains("tcp retrans"), "{text}");
}

#[test]
fn top_without_a_daemon_says_so() {
    let dir = TempDir::new("nopin");
    let out = mirror(&["top", "--count", "1", "--pin-dir", &dir.0.display().to_string()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("mirror daemon"), "{err}");
}

#[test]
fn daemon_prints_prometheus_text() {
    let out = mirror(&["daemon", "--no-bpf", "--prometheus", "--interval", "100ms", "--for", "150ms"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("# TYPE mirror_blk_iops gauge"), "{text}");
    assert!(text.contains("mirror_tcp_retrans_total_per_s "), "{text}");
}
