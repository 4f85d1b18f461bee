//! `cargo xtask package [--debug]`: the Debian package `target/package/mirror_VERSION_ARCH.deb`,
//! built with `dpkg-deb` from a staged tree (no cargo-deb: everything it would do is a copy and
//! a control file, and dpkg-dev is on every Debian machine that builds). The tree:
//!
//! | path | from |
//! |---|---|
//! | `/usr/bin/mirror` | the release binary with the eBPF object embedded (`--debug`: the dev build, for the tests) |
//! | `/lib/systemd/system/mirror-{daemon,replica}.service`, `mirror-serve@.service` | `packaging/systemd/` |
//! | `/usr/share/man/man8/mirror*.8.gz` | `mirror-gen` (clap_mangen over `mirror::cli::Cli`) |
//! | `/usr/share/bash-completion/completions/mirror`, `/usr/share/zsh/vendor-completions/_mirror`, `/usr/share/fish/vendor_completions.d/mirror.fish` | `mirror-gen` (clap_complete) |
//! | `/etc/mirror/replica.toml` (a conffile), `/etc/mirror/volumes/` | `packaging/etc/` |
//! | `/usr/share/doc/mirror/` (README, docs, `examples/`, copyright) | the repository |
//! | `/usr/share/mirror/grafana/` | `packaging/grafana/` |
//!
//! Maintainer scripts (`packaging/debian/`) reload systemd and stop the services on removal;
//! they enable nothing. `Depends` comes from `dpkg-shlibdeps`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::{
    build,
    util::{output, root, run},
};

/// Where the package and its staging tree go.
pub(crate) fn out_dir() -> PathBuf {
    root().join("target/package")
}

/// Builds the package; returns its path.
pub(crate) fn package(debug: bool) -> Result<PathBuf> {
    for tool in ["dpkg-deb", "dpkg-shlibdeps", "gzip", "strip"] {
        if crate::util::which(tool).is_none() {
            bail!("{tool} is missing: run `cargo xtask setup` (installs dpkg-dev, binutils, gzip)");
        }
    }
    build::build_ebpf()?;
    let mut args = vec!["build", "-p", "mirror-user"];
    if !debug {
        args.push("--release");
    }
    run(&mut build::cargo(&args))?;
    run(&mut build::cargo(&["build", "-p", "mirror-packaging"]))?;
    let bin = build::mirror_bin(!debug);
    let version = output(&bin, &["--version"])
        .and_then(|v| v.strip_prefix("mirror ").map(str::to_string))
        .context("`mirror --version` did not answer `mirror VERSION`")?;
    let arch = output("dpkg", &["--print-architecture"]).context("dpkg --print-architecture")?;

    let out = out_dir();
    let gen = out.join("gen");
    let stage = out.join("root");
    for d in [&gen, &stage] {
        if d.exists() {
            fs::remove_dir_all(d).with_context(|| format!("removing {}", d.display()))?;
        }
    }
    run(Command::new(root().join("target/debug/mirror-gen")).arg("--out").arg(&gen))?;

    let src = root().join("packaging");
    let usr_bin = stage.join("usr/bin/mirror");
    copy(&bin, &usr_bin, 0o755)?;
    // Debug info stays in the build tree; the embedded eBPF object is data and is kept.
    run(Command::new("strip").arg("--strip-debug").arg(&usr_bin))?;
    for unit in ["mirror-daemon.service", "mirror-replica.service", "mirror-serve@.service"] {
        copy(&src.join("systemd").join(unit), &stage.join("lib/systemd/system").join(unit), 0o644)?;
    }
    let man8 = stage.join("usr/share/man/man8");
    for page in fs::read_dir(gen.join("man"))? {
        let page = page?.path();
        let dst = man8.join(page.file_name().context("a page's name")?);
        copy(&page, &dst, 0o644)?;
        run(Command::new("gzip").args(["-9n"]).arg(&dst))?;
    }
    let comp = gen.join("completions");
    copy(&comp.join("mirror.bash"), &stage.join("usr/share/bash-completion/completions/mirror"), 0o644)?;
    copy(&comp.join("_mirror"), &stage.join("usr/share/zsh/vendor-completions/_mirror"), 0o644)?;
    copy(&comp.join("mirror.fish"), &stage.join("usr/share/fish/vendor_completions.d/mirror.fish"), 0o644)?;
    copy(&src.join("etc/replica.toml"), &stage.join("etc/mirror/replica.toml"), 0o644)?;
    fs::create_dir_all(stage.join("etc/mirror/volumes"))?;
    let doc = stage.join("usr/share/doc/mirror");
    for example in ["replica.toml", "volume.toml"] {
        copy(&src.join("etc").join(example), &doc.join("examples").join(example), 0o644)?;
    }
    copy(&root().join("README.md"), &doc.join("README.md"), 0o644)?;
    for page in fs::read_dir(root().join("docs"))? {
        let page = page?.path();
        if page.extension().is_some_and(|e| e == "md") {
            copy(&page, &doc.join("docs").join(page.file_name().context("a page's name")?), 0o644)?;
        }
    }
    fs::write(doc.join("copyright"), COPYRIGHT)?;
    let grafana = src.join("grafana");
    copy_tree(&grafana, &stage.join("usr/share/mirror/grafana"))?;

    let debian = stage.join("DEBIAN");
    fs::create_dir_all(&debian)?;
    for script in ["postinst", "prerm", "postrm"] {
        copy(&src.join("debian").join(script), &debian.join(script), 0o755)?;
    }
    let conffiles = files_under(&stage, &stage.join("etc"))?;
    fs::write(debian.join("conffiles"), conffiles.iter().map(|f| format!("/{f}\n")).collect::<String>())?;
    let md5 = output(
        "sh",
        &[
            "-c",
            &format!(
                "cd '{}' && find . -type f ! -path './DEBIAN/*' ! -path './etc/*' -printf '%P\\0' | sort -z | xargs -0 md5sum",
                stage.display()
            ),
        ],
    )
    .context("md5sums")?;
    fs::write(debian.join("md5sums"), md5 + "\n")?;
    let control = format!(
        "Package: mirror\nVersion: {version}\nArchitecture: {arch}\nMaintainer: mirror developers <mirror@localhost>\n\
         Installed-Size: {size}\nDepends: {depends}\nRecommends: bpftool\nSuggests: qemu-utils, libnbd-bin\n\
         Section: admin\nPriority: optional\n\
         Description: adaptive block-storage mirroring with predictive failover\n {long}\n",
        size = installed_size(&stage)?,
        depends = shlib_depends(&out, &usr_bin)?,
        long = DESCRIPTION.trim().replace('\n', "\n "),
    );
    fs::write(debian.join("control"), control)?;
    let deb = out.join(format!("mirror_{version}_{arch}.deb"));
    run(Command::new("dpkg-deb").args(["--root-owner-group", "-Zxz", "--build"]).arg(&stage).arg(&deb))?;
    eprintln!("xtask: package: {}", deb.display());
    Ok(deb)
}

const DESCRIPTION: &str = "
A volume lives on two nodes: every write goes to both, every read goes to one of
them by weight, and the weights follow each node's health (block latency,
run-queue latency, memory reclaim, network retransmits, application probes,
measured with eBPF). Reads shift away from a degrading node before it fails;
a node that returns is resynced and traffic shifts back gradually.
.
This package holds the mirror binary, systemd units for the node daemon
(mirror-daemon), the replica server (mirror-replica) and one router per volume
(mirror-serve@NAME), man pages, shell completions, example configuration and a
Grafana dashboard for the Prometheus metrics.";

const COPYRIGHT: &str = "\
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: mirror

Files: *
Copyright: the mirror developers
License: MIT or Apache-2.0
 On Debian systems the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
";

/// Copies a file, making its directory, and sets its mode.
fn copy(from: &Path, to: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::copy(from, to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Copies a directory tree of regular files (mode 0644).
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    for e in fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let p = e?.path();
        let dst = to.join(p.file_name().context("a name")?);
        if p.is_dir() {
            copy_tree(&p, &dst)?;
        } else {
            copy(&p, &dst, 0o644)?;
        }
    }
    Ok(())
}

/// The files under `dir`, as paths relative to `stage`, sorted.
fn files_under(stage: &Path, dir: &Path) -> Result<Vec<String>> {
    let mut v = Vec::new();
    if dir.is_dir() {
        for e in fs::read_dir(dir)? {
            let p = e?.path();
            if p.is_dir() {
                v.extend(files_under(stage, &p)?);
            } else {
                v.push(p.strip_prefix(stage)?.display().to_string());
            }
        }
    }
    v.sort();
    Ok(v)
}

/// Installed-Size: KiB of the tree, as dpkg-gencontrol counts it (`du -sk`, without DEBIAN).
fn installed_size(stage: &Path) -> Result<u64> {
    let kib = output("du", &["-sk", "--exclude=DEBIAN", &stage.display().to_string()])
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .context("du -sk")?;
    Ok(kib)
}

/// The libraries the binary links, as Debian packages with versions (`dpkg-shlibdeps`, which
/// wants a `debian/control` around it).
fn shlib_depends(out: &Path, bin: &Path) -> Result<String> {
    let dir = out.join("shlibdeps");
    fs::create_dir_all(dir.join("debian"))?;
    fs::write(dir.join("debian/control"), "Source: mirror\n\nPackage: mirror\nArchitecture: any\n")?;
    let o = Command::new("dpkg-shlibdeps")
        .current_dir(&dir)
        .args(["-O", "--warnings=0", "-e"])
        .arg(bin)
        .output()
        .context("dpkg-shlibdeps")?;
    if !o.status.success() {
        bail!("dpkg-shlibdeps: {}", String::from_utf8_lossy(&o.stderr));
    }
    let text = String::from_utf8_lossy(&o.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .map(str::to_string)
        .context("dpkg-shlibdeps printed no shlibs:Depends")
}
