//! `cargo xtask vm-test`: runs the VM test binaries inside the Debian 6.12 kernel under
//! virtme-ng (TCG), where ublk_drv, loop, nbd and netem are loadable.

use std::{io::BufRead, path::PathBuf, process::Stdio};

use anyhow::{bail, ensure, Context, Result};

use crate::{
    build, setup,
    util::{root, run_tally, Tally},
};

/// Test targets of the `mirror-tests` crate that run inside the VM.
const VM_TARGETS: &[&str] = &["vm", "bpf_blk", "telemetry", "ublk", "storage_errors"];

fn required() -> bool {
    std::env::var_os("MIRROR_REQUIRE_VM").is_some_and(|v| v == "1")
}

/// Builds the VM test binaries and returns their paths.
fn test_executables() -> Result<Vec<PathBuf>> {
    let mut cmd = build::cargo(&["test", "-p", "mirror-tests", "--no-run", "--message-format=json"]);
    let mut child = cmd.stdout(Stdio::piped()).spawn().context("cargo test --no-run")?;
    let mut exes = Vec::new();
    for line in std::io::BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if v["reason"] != "compiler-artifact" {
            continue;
        }
        let name = v["target"]["name"].as_str().unwrap_or("");
        if let (true, Some(exe)) = (VM_TARGETS.contains(&name), v["executable"].as_str()) {
            exes.push(PathBuf::from(exe));
        }
    }
    if !child.wait()?.success() {
        bail!("building the VM test binaries failed");
    }
    if exes.len() != VM_TARGETS.len() {
        bail!("expected test binaries {VM_TARGETS:?}, found {exes:?}");
    }
    Ok(exes)
}

fn skip(why: &str) -> Result<(Tally, bool)> {
    if required() {
        bail!("VM tests required (MIRROR_REQUIRE_VM=1) but cannot run: {why}");
    }
    eprintln!("skipped: vm-test: {why}");
    Ok((Tally { skipped: 1, passed: 1, ..Default::default() }, true))
}

pub(crate) fn vm_test() -> Result<(Tally, bool)> {
    let Some(vng) = setup::vng() else {
        return skip("virtme-ng (vng) is not installed: run `cargo xtask setup` as root");
    };
    let Some((version, vmlinuz)) = setup::vm_kernel_installed() else {
        return skip("the Debian 6.12 VM kernel is not set up: run `cargo xtask setup` as root");
    };
    if crate::util::which("qemu-system-x86_64").is_none() {
        return skip("qemu-system-x86_64 is not installed: run `cargo xtask setup` as root");
    }
    let exes = test_executables()?;
    let mut script = String::from(
        "set -u; modprobe ublk_drv; modprobe loop; \
         mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf; \
         mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing; \
         export MIRROR_IN_VM=1; ",
    );
    script.push_str(&format!("export MIRROR_BIN={}; ", build::mirror_bin(false).display()));
    for var in ["MIRROR_REQUIRE_BPF", "MIRROR_REQUIRE_VM", "RUST_BACKTRACE"] {
        if let Ok(v) = std::env::var(var) {
            script.push_str(&format!("export {var}={v}; "));
        }
    }
    script.push_str("echo \"vm: kernel $(uname -r), $(nproc) cpus\"; rc=0; ");
    for exe in &exes {
        script.push_str(&format!("{} --test-threads=1 || rc=1; ", exe.display()));
    }
    script.push_str("exit $rc");
    eprintln!("xtask: booting {version} under virtme-ng (TCG, ~15-30 s)");
    let mut cmd = std::process::Command::new(vng);
    cmd.current_dir(root())
        .arg("-r")
        .arg(&vmlinuz)
        .args(["--disable-kvm", "--force-9p", "--memory", "2G", "--cpus", "2", "--exec"])
        .arg(&script);
    let (tally, ok) = run_tally(&mut cmd)?;
    if tally.passed == 0 && tally.failed == 0 {
        // The guest never reached the tests (virtme-ng failed to boot it, e.g. without busybox
        // for its initramfs): that is a failure, not an empty success.
        eprintln!("xtask: vm-test: the VM ran no test (see virtme-ng's output above)");
        return Ok((tally, false));
    }
    Ok((tally, ok))
}

/// `cargo xtask bench ublk`: builds the release binaries, makes sure rublk is installed, and runs
/// `bench-ublk` inside the VM (ublk, loop and raid1 load there); it writes target/bench/ublk.json.
pub(crate) fn bench_ublk(args: &[String]) -> Result<()> {
    let Some(vng) = setup::vng() else {
        bail!("virtme-ng (vng) is not installed: run `cargo xtask setup` as root");
    };
    let Some((version, vmlinuz)) = setup::vm_kernel_installed() else {
        bail!("the Debian 6.12 VM kernel is not set up: run `cargo xtask setup` as root");
    };
    let root = root();
    crate::util::run(&mut build::cargo(&["build", "--release", "-p", "mirror-user", "-p", "mirror-tests"]))?;
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    let rublk = home.join("bin/rublk");
    if !rublk.is_file() {
        eprintln!("xtask: installing rublk (the reference ublk server) with cargo install");
        crate::util::run(std::process::Command::new("cargo").args([
            "install",
            "rublk",
            "--no-default-features",
        ]))?;
    }
    let out_dir = root.join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    // The guest's PATH lacks ~/.cargo/bin: everything by full path.
    let mut script = format!(
        "set -u; {} --mirror-bin {} --rublk {} --out {}",
        root.join("target/release/bench-ublk").display(),
        root.join("target/release/mirror").display(),
        rublk.display(),
        out_dir.join("ublk.json").display()
    );
    for a in args {
        script.push_str(&format!(" '{}'", a.replace('\'', "")));
    }
    eprintln!("xtask: booting {version} under virtme-ng (TCG) for the ublk benchmark");
    let mut cmd = std::process::Command::new(vng);
    cmd.current_dir(&root)
        .arg("-r")
        .arg(&vmlinuz)
        .args(["--disable-kvm", "--force-9p", "--memory", "5G", "--cpus", "2", "--rwdir"])
        .arg(&out_dir)
        .arg("--exec")
        .arg(&script);
    crate::util::run(&mut cmd)?;
    ensure!(
        out_dir.join("ublk.json").is_file(),
        "the benchmark wrote no {}",
        out_dir.join("ublk.json").display()
    );
    Ok(())
}
