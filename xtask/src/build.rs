//! `cargo xtask build`: the eBPF object (Debian's precompiled core, or nightly + rust-src), then
//! the userspace workspace that embeds it.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Result};

use crate::util::{output, root, run};

const BPF_TARGET: &str = "bpfel-unknown-none";

/// How the eBPF object gets built on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// /usr/bin/rustc (Debian's rustc-web) with libstd-rust-web-dev-bpf's precompiled core.
    DebianCore,
    /// rustup nightly with rust-src: -Z build-std=core.
    NightlyBuildStd,
}

fn debian_core_available() -> bool {
    Path::new("/usr/bin/rustc").is_file()
        && Path::new("/usr/bin/cargo").is_file()
        && std::fs::read_dir(format!("/usr/lib/rustlib/{BPF_TARGET}/lib")).is_ok_and(|d| {
            d.filter_map(std::result::Result::ok)
                .any(|e| e.file_name().to_string_lossy().starts_with("libcore-"))
        })
}

fn nightly_rust_src_available() -> bool {
    output("rustup", &["run", "nightly", "rustc", "--print", "sysroot"])
        .is_some_and(|s| Path::new(&s).join("lib/rustlib/src/rust/library/core").is_dir())
}

fn pick_route() -> Result<Route> {
    if output("bpf-linker", &["--version"]).is_none() {
        bail!("bpf-linker is not installed: run `cargo xtask setup` (as root)");
    }
    if debian_core_available() {
        Ok(Route::DebianCore)
    } else if nightly_rust_src_available() {
        Ok(Route::NightlyBuildStd)
    } else {
        bail!(
            "no way to build for {BPF_TARGET}: install Debian's rustc-web + libstd-rust-web-dev-bpf \
             (`cargo xtask setup`) or a nightly toolchain with rust-src"
        )
    }
}

/// Path of the built eBPF object.
pub(crate) fn ebpf_object() -> PathBuf {
    root().join("target/ebpf").join(BPF_TARGET).join("release/mirror")
}

/// A cargo command stripped of the outer cargo's environment, so the inner build uses the
/// compiler we choose and not the one `cargo xtask` runs under.
fn clean_cargo(program: &str) -> Command {
    let mut cmd = Command::new(program);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        let keep = k == "CARGO_HOME" || k == "CARGO_TERM_COLOR";
        if (!keep && k.starts_with("CARGO_"))
            || [
                "CARGO",
                "RUSTC",
                "RUSTC_WRAPPER",
                "RUSTFLAGS",
                "RUSTDOC",
                "RUSTUP_TOOLCHAIN",
                "RUSTC_BOOTSTRAP",
            ]
            .contains(&k.as_ref())
        {
            cmd.env_remove(k.as_ref());
        }
    }
    cmd
}

pub(crate) fn build_ebpf() -> Result<PathBuf> {
    let route = pick_route()?;
    let dir = root().join("mirror-ebpf");
    let target_dir = root().join("target/ebpf");
    let rustflags = "-C debuginfo=2 -C link-arg=--btf";
    let mut cmd = match route {
        Route::DebianCore => {
            eprintln!("xtask: eBPF route: Debian's rustc-web with the precompiled core for {BPF_TARGET}");
            let mut c = clean_cargo("/usr/bin/cargo");
            c.env("RUSTC", "/usr/bin/rustc").env("RUSTC_BOOTSTRAP", "1");
            c.arg("build");
            c
        }
        Route::NightlyBuildStd => {
            eprintln!("xtask: eBPF route: rustup nightly with rust-src (-Z build-std=core)");
            let mut c = clean_cargo("rustup");
            c.args(["run", "nightly", "cargo", "build", "-Z", "build-std=core"]);
            c
        }
    };
    cmd.current_dir(&dir)
        .env("RUSTFLAGS", rustflags)
        .args(["--release", "--locked", "--target", BPF_TARGET, "--target-dir"])
        .arg(&target_dir);
    run(&mut cmd)?;
    let obj = ebpf_object();
    if !obj.is_file() {
        bail!("the eBPF build succeeded but {} is missing", obj.display());
    }
    Ok(obj)
}

/// A cargo command for the userspace workspace, told where the eBPF object is.
pub(crate) fn cargo(args: &[&str]) -> Command {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut c = Command::new(cargo);
    c.current_dir(root()).env("MIRROR_EBPF_OBJ", ebpf_object()).args(args);
    c
}

pub(crate) fn build(release: bool) -> Result<()> {
    build_ebpf()?;
    let mut args = vec!["build", "--workspace"];
    if release {
        args.push("--release");
    }
    run(&mut cargo(&args))
}

/// The userspace `mirror` binary of a profile.
pub(crate) fn mirror_bin(release: bool) -> PathBuf {
    root().join("target").join(if release { "release" } else { "debug" }).join("mirror")
}
