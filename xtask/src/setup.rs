//! `cargo xtask setup`: installs, idempotently and as root on Debian, what the build, the tests
//! and the benchmarks need. Each step checks first and says what it installs.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::util::{is_root, output, run, which};

/// Debian packages: (package, why).
const PACKAGES: &[(&str, &str)] = &[
    ("rustc-web", "Debian's rustc 1.96 (eBPF build with the precompiled core)"),
    ("cargo-web", "Debian's cargo for the eBPF build"),
    ("libstd-rust-web-dev-bpf", "precompiled core for bpfel-unknown-none"),
    ("llvm-22-dev", "LLVM for bpf-linker"),
    ("libclang-dev", "bindgen (libublk)"),
    ("clang", "bindgen (libublk)"),
    ("bpftool", "inspecting pinned maps, BPF tests"),
    ("fio", "workloads and benchmarks"),
    ("kmod", "depmod/modprobe for the VM kernel"),
    ("qemu-utils", "qemu-img, qemu-io, qemu-nbd"),
    ("libnbd-bin", "nbdinfo, nbdcopy"),
    ("nbdkit", "reference NBD server for benchmarks"),
    ("rsync", "resync benchmark peer"),
    ("e2fsprogs", "mkfs.ext4 / fsck in tests"),
    ("mdadm", "md raid1 benchmark peer"),
    ("util-linux", "losetup"),
    ("python3-pip", "installing virtme-ng"),
    ("busybox-static", "the VM's initramfs (virtme-ng 1.4x builds one with busybox)"),
    ("etcd-server", "the lease store of the etcd mode, started by the lease tests"),
    ("etcd-client", "etcdctl, for looking at the lease keys by hand"),
    ("protobuf-compiler", "protoc for the etcd-client crate's build"),
    ("dpkg-dev", "dpkg-shlibdeps for `cargo xtask package`"),
    ("binutils", "strip for `cargo xtask package`"),
    ("systemd", "systemd-analyze verify of the packaged units"),
    ("man-db", "man -w, finding the packaged man pages"),
    ("bash-completion", "the packaged bash completion, tried in the package test"),
    ("libprotobuf-dev", "protobuf's well-known .proto files, imported by etcd's"),
];

/// The virtme-ng release the VM tests are proven with (newer ones may change the guest's boot).
const VIRTME_NG: &str = "virtme-ng==1.42";

/// Where the VM kernel is cached (virtme-ng hides /var/cache inside the guest).
pub(crate) const VM_DIR: &str = "/opt/mirror-vm";

const MANUAL: &str = "\
Manual steps (Debian 12 as root; see ../shared/ENVIRONMENT.md):
  1. apt-get install rustc-web cargo-web libstd-rust-web-dev-bpf llvm-22-dev libclang-dev clang \\
       bpftool fio kmod qemu-utils libnbd-bin nbdkit rsync e2fsprogs mdadm python3-pip \\
       busybox-static etcd-server etcd-client protobuf-compiler libprotobuf-dev dpkg-dev binutils \\
       systemd man-db bash-completion
     and qemu-system-x86 (from bookworm-backports when qemu-utils comes from there)
  2. LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --no-default-features --features llvm-22
  3. pip install virtme-ng==1.42
  4. apt-get download linux-image-6.12.*-amd64 && dpkg -x it into /opt/mirror-vm/<version>,
     then link /lib/modules/<version> to its lib/modules/<version> and run depmod <version>";

/// Returns Ok(false) with an explanation when this machine cannot be set up automatically.
pub(crate) fn can_setup() -> bool {
    is_root() && Path::new("/etc/debian_version").exists()
}

pub(crate) fn setup() -> Result<()> {
    if !Path::new("/etc/debian_version").exists() {
        bail!("`cargo xtask setup` installs with apt and needs Debian.\n{MANUAL}");
    }
    if !is_root() {
        bail!("`cargo xtask setup` installs system packages and needs root.\n{MANUAL}");
    }
    apt_packages()?;
    bpf_linker()?;
    virtme_ng()?;
    vm_kernel()?;
    eprintln!("xtask: setup complete");
    Ok(())
}

fn installed(pkg: &str) -> bool {
    output("dpkg-query", &["-W", "-f=${db:Status-Status}", pkg]).as_deref() == Some("installed")
}

fn codename() -> Option<String> {
    let text = fs::read_to_string("/etc/os-release").ok()?;
    text.lines().find_map(|l| l.strip_prefix("VERSION_CODENAME=").map(|v| v.trim_matches('"').to_string()))
}

fn apt_install(args: &[&str]) -> Result<()> {
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "--no-install-recommends"])
        .args(args))
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&(&str, &str)> = PACKAGES.iter().filter(|(p, _)| !installed(p)).collect();
    let need_qemu = !installed("qemu-system-x86");
    if missing.is_empty() && !need_qemu {
        eprintln!("xtask: Debian packages: all present");
        return Ok(());
    }
    for (p, why) in &missing {
        eprintln!("xtask: installing {p} ({why})");
    }
    // qemu-utils on these machines comes from bookworm-backports; qemu-system-x86 must match it.
    let backports = codename().map(|c| format!("{c}-backports"));
    if let Some(bp) = &backports {
        let list = Path::new("/etc/apt/sources.list.d/mirror-backports.list");
        let known =
            output("grep", &["-rqs", bp.as_str(), "/etc/apt/sources.list", "/etc/apt/sources.list.d"])
                .is_some();
        if !known {
            eprintln!("xtask: adding {bp} to apt sources ({})", list.display());
            fs::write(list, format!("deb http://deb.debian.org/debian {bp} main\n"))?;
        }
    }
    run(Command::new("apt-get").args(["update", "-q"]))?;
    if !missing.is_empty() {
        let names: Vec<&str> = missing.iter().map(|(p, _)| *p).collect();
        apt_install(&names)?;
    }
    if need_qemu {
        eprintln!("xtask: installing qemu-system-x86 (boots the VM for ublk tests)");
        let qemu_utils_bp =
            output("dpkg-query", &["-W", "-f=${Version}", "qemu-utils"]).is_some_and(|v| v.contains("bpo"));
        match (&backports, qemu_utils_bp) {
            (Some(bp), true) => apt_install(&["-t", bp, "qemu-system-x86"])?,
            _ => apt_install(&["qemu-system-x86"])?,
        }
    }
    Ok(())
}

fn bpf_linker() -> Result<()> {
    if let Some(v) = output("bpf-linker", &["--version"]) {
        eprintln!("xtask: bpf-linker present ({v})");
        return Ok(());
    }
    eprintln!("xtask: installing bpf-linker 0.13 against Debian's LLVM 22 (a few minutes)");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo).env("LLVM_PREFIX", "/usr/lib/llvm-22").args([
        "install",
        "bpf-linker",
        "--version",
        "^0.13",
        "--locked",
        "--no-default-features",
        "--features",
        "llvm-22",
    ]))
}

/// Path of the `vng` launcher, if installed.
pub(crate) fn vng() -> Option<PathBuf> {
    which("vng").or_else(|| {
        let scripts = output("python3", &["-c", "import sysconfig; print(sysconfig.get_path('scripts'))"])?;
        let p = Path::new(&scripts).join("vng");
        p.is_file().then_some(p)
    })
}

fn virtme_ng() -> Result<()> {
    if let Some(p) = vng() {
        eprintln!("xtask: virtme-ng present ({})", p.display());
        return Ok(());
    }
    eprintln!("xtask: installing {VIRTME_NG} from PyPI (runs the VM tests)");
    run(Command::new("python3").args(["-m", "pip", "install", "-q", "--break-system-packages", VIRTME_NG]))
        .or_else(|_| run(Command::new("python3").args(["-m", "pip", "install", "-q", VIRTME_NG])))?;
    if vng().is_none() {
        bail!("virtme-ng installed but `vng` is not on PATH");
    }
    Ok(())
}

/// The cached VM kernel: (version, vmlinuz path), if set up.
pub(crate) fn vm_kernel_installed() -> Option<(String, PathBuf)> {
    let current = Path::new(VM_DIR).join("current");
    let version = fs::read_to_string(current.join("VERSION")).ok()?.trim().to_string();
    let vmlinuz = current.join("boot").join(format!("vmlinuz-{version}"));
    let modules = Path::new("/lib/modules").join(&version);
    (vmlinuz.is_file() && modules.join("modules.dep").is_file()).then_some((version, vmlinuz))
}

/// Picks the newest `linux-image-6.12.N+debXX-amd64[-unsigned]` that apt offers.
fn pick_kernel_package() -> Result<String> {
    let list =
        output("apt-cache", &["search", "--names-only", r"^linux-image-6\.12\.[0-9]+\+deb[0-9]+-amd64"])
            .context("apt-cache search")?;
    let mut best: Option<(u32, String)> = None;
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix("linux-image-6.12.") else {
            continue;
        };
        let (patch, tail) = rest.split_once('+').unwrap_or((rest, ""));
        let flavour_ok = tail.ends_with("-amd64") || tail.ends_with("-amd64-unsigned");
        let Ok(patch) = patch.parse::<u32>() else {
            continue;
        };
        if flavour_ok && !tail.contains("-rt-") && best.as_ref().is_none_or(|(b, _)| patch > *b) {
            best = Some((patch, name.to_string()));
        }
    }
    best.map(|(_, n)| n).context("apt offers no linux-image-6.12.*-amd64 package (run apt-get update?)")
}

fn vm_kernel() -> Result<()> {
    if let Some((v, _)) = vm_kernel_installed() {
        eprintln!("xtask: VM kernel present ({v} in {VM_DIR})");
        return Ok(());
    }
    let pkg = if let Ok(p) = pick_kernel_package() {
        p
    } else {
        run(Command::new("apt-get").args(["update", "-q"]))?;
        pick_kernel_package()?
    };
    eprintln!("xtask: fetching {pkg} for the VM tests (ublk_drv, loop, nbd modules), cached in {VM_DIR}");
    let dl = Path::new(VM_DIR).join("download");
    fs::create_dir_all(&dl)?;
    run(Command::new("apt-get").current_dir(&dl).args(["download", &pkg]))?;
    let deb = fs::read_dir(&dl)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb") && p.to_string_lossy().contains(&pkg))
        .context("downloaded .deb not found")?;
    let stage = Path::new(VM_DIR).join("stage");
    let _ = fs::remove_dir_all(&stage);
    run(Command::new("dpkg").arg("-x").arg(&deb).arg(&stage))?;
    let version = fs::read_dir(stage.join("lib/modules"))
        .or_else(|_| fs::read_dir(stage.join("usr/lib/modules")))?
        .filter_map(std::result::Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .context("the kernel package has no lib/modules/<version>")?;
    let dir = Path::new(VM_DIR).join(&version);
    let _ = fs::remove_dir_all(&dir);
    fs::rename(&stage, &dir)?;
    fs::write(dir.join("VERSION"), format!("{version}\n"))?;
    let modules_src = [dir.join("lib/modules").join(&version), dir.join("usr/lib/modules").join(&version)]
        .into_iter()
        .find(|p| p.is_dir())
        .context("modules directory missing")?;
    fs::create_dir_all("/lib/modules")?;
    let link = Path::new("/lib/modules").join(&version);
    if link.symlink_metadata().is_ok() {
        fs::remove_file(&link).or_else(|_| fs::remove_dir_all(&link))?;
    }
    symlink(&modules_src, &link)?;
    run(Command::new("depmod").arg(&version))?;
    let current = Path::new(VM_DIR).join("current");
    let _ = fs::remove_file(&current);
    symlink(&dir, &current)?;
    let _ = fs::remove_file(&deb);
    eprintln!("xtask: VM kernel {version} ready");
    Ok(())
}
