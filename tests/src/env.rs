//! What this machine can run and where the binaries are: root, the VM, tools on `PATH`, the
//! `mirror` binary, the eBPF prerequisites; and [`skip`], the loud way a test says it cannot run.

use std::{
    io::Write,
    path::{Path, PathBuf},
};

/// Says loudly that a test cannot run here, or fails it when the environment demands that it
/// runs (`MIRROR_REQUIRE_<WHAT>=1`, set by CI). Writes straight to stderr, which libtest does not
/// capture, so the line shows even for a passing test.
pub fn skip(test: &str, require: &str, why: &str) {
    let var = format!("MIRROR_REQUIRE_{require}");
    assert!(
        !std::env::var(&var).is_ok_and(|v| v == "1"),
        "{test}: cannot run ({why}) but {var}=1 requires it"
    );
    let _ = writeln!(std::io::stderr(), "skipped: {test}: {why}");
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// For tests that only make sense inside the VM: true when they should return now. Outside the
/// VM they say so (not a failure even in CI: `cargo xtask vm-test` runs them, and fails itself
/// when MIRROR_REQUIRE_VM=1 and the VM cannot boot).
pub fn not_in_vm(test: &str) -> bool {
    if in_vm() {
        return false;
    }
    let _ = writeln!(std::io::stderr(), "skipped: {test}: runs only inside `cargo xtask vm-test`");
    true
}

/// Inside `cargo xtask vm-test` (it sets MIRROR_IN_VM=1).
pub fn in_vm() -> bool {
    std::env::var("MIRROR_IN_VM").is_ok_and(|v| v == "1")
}

/// The `mirror` binary: $MIRROR_BIN (set by `cargo xtask test`) or target/debug/mirror.
pub fn mirror_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MIRROR_BIN") {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/mirror")
}

/// `name` on `PATH`, if it is there.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

/// Why tests that attach the eBPF programs through a real `mirror daemon` cannot run here, if
/// they cannot: root, a binary built with the eBPF object, kernel BTF.
pub fn bpf_unavailable() -> Option<String> {
    if !is_root() {
        return Some("needs root (CAP_BPF, CAP_PERFMON) to attach eBPF programs".into());
    }
    if !mirror_bin().is_file() {
        return Some(format!("{} not built: run `cargo xtask build`", mirror_bin().display()));
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Some("kernel has no BTF (/sys/kernel/btf/vmlinux)".into());
    }
    None
}
