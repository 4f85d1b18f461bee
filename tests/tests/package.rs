//! The Debian package of `cargo xtask package` as an operator meets it: it installs with
//! `dpkg -i`, `mirror --version` answers, `man -w` finds every command's page, the shell
//! completions are where Debian's shells look (and bash's completes a subcommand), the systemd
//! units pass `systemd-analyze verify`, the units' own ExecStart lines run a replica server and
//! a volume from the packaged layout (the operator's config in /etc/mirror) under the units'
//! capability bounding sets, and `dpkg -r` / `dpkg --purge` leave nothing but the configuration
//! the operator wrote or changed.
//!
//! It installs into the real system, so it runs only as root, with a package to install
//! (`MIRROR_DEB`, which `cargo xtask test` sets, or `target/package/*.deb`), and never where a
//! `mirror` package is already installed. Without a package it says `skipped:` (CI builds one,
//! so there it runs).

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use mirror_tests::{
    env::{is_root, skip, which},
    fs::TempDir,
    net::free_port,
    proc::{captured, output, spawn_lines, Kill},
};

const T: &str = "package::the_package_installs_serves_from_etc_mirror_and_removes_cleanly";

fn sh(cmd: &mut Command) -> (bool, String, String) {
    captured(cmd).unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

/// Stdout of a command that must succeed.
fn ok(cmd: &mut Command) -> String {
    output(cmd).unwrap_or_else(|e| panic!("{e:#}"))
}

/// The package to test: `MIRROR_DEB`, or the newest `target/package/mirror_*.deb`.
fn deb() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MIRROR_DEB") {
        return Some(PathBuf::from(p));
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/package");
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
}

fn installed() -> bool {
    sh(Command::new("dpkg-query").args(["-W", "-f=${db:Status-Status}", "mirror"])).1 == "installed"
}

/// The value of `Key=` in a unit file (the first one).
fn unit_key(unit: &str, key: &str) -> String {
    let text = std::fs::read_to_string(Path::new("/lib/systemd/system").join(unit)).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{unit} has no {key}="))
        .to_string()
}

/// A unit's ExecStart for instance `instance`, as argv, run with the unit's
/// CapabilityBoundingSet and NoNewPrivileges (setpriv), the nearest this machine comes to the
/// unit's sandbox without systemd as PID 1.
fn unit_command(unit: &str, instance: &str) -> Command {
    let exec = unit_key(unit, "ExecStart").replace("%i", instance);
    let caps: Vec<String> = unit_key(unit, "CapabilityBoundingSet")
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let mut cmd = Command::new("setpriv");
    cmd.arg("--no-new-privs")
        .arg(format!("--bounding-set=-all,{}", caps.join(",")))
        .arg("--")
        .args(exec.split_whitespace());
    cmd
}

/// Starts `cmd` and reads `n` lines of its stdout.
fn start(mut cmd: Command, n: usize) -> (Kill, Vec<String>) {
    spawn_lines(cmd.env("RUST_LOG", "warn"), n).unwrap()
}

/// SIGTERM, as systemd stops a unit; whether it exited successfully.
fn stop(p: &mut Kill) -> bool {
    ok(Command::new("kill").args(["-TERM", &p.0.id().to_string()]));
    p.0.wait().unwrap().success()
}

/// What an operator put in /etc/mirror and /var/lib/mirror for the test; removed on drop
/// (after the package, which must have left it).
struct OperatorFiles(Vec<PathBuf>);

impl Drop for OperatorFiles {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
        for d in ["/etc/mirror/volumes", "/etc/mirror/tls", "/etc/mirror"] {
            let _ = std::fs::remove_dir(d);
        }
        if installed() {
            let _ = Command::new("dpkg").args(["--purge", "mirror"]).status();
        }
    }
}

#[test]
fn the_package_installs_serves_from_etc_mirror_and_removes_cleanly() {
    if !is_root() {
        return skip(T, "PACKAGE", "dpkg -i needs root");
    }
    for tool in ["dpkg", "systemd-analyze", "man", "setpriv", "bash"] {
        if which(tool).is_none() {
            return skip(T, "PACKAGE", &format!("{tool} is missing (cargo xtask setup)"));
        }
    }
    let Some(deb) = deb() else {
        return skip(T, "PACKAGE", "no package: run `cargo xtask package` (`cargo xtask test` builds one)");
    };
    if installed() {
        return skip(T, "PACKAGE", "a mirror package is installed here; the test would replace and purge it");
    }
    let t0 = Instant::now();
    let files = OperatorFiles(
        vec![
            "/etc/mirror/secret".into(),
            "/etc/mirror/volumes/pkgtest.toml".into(),
            "/var/lib/mirror/pkgtest-a.img".into(),
            "/var/lib/mirror/pkgtest-a.img.meta".into(),
            "/var/lib/mirror/pkgtest-b.img".into(),
            "/var/lib/mirror/pkgtest-b.img.meta".into(),
            "/run/mirror/pkgtest.sock".into(),
        ]
        .into_iter()
        .chain(
            ["ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem"]
                .iter()
                .map(|f| Path::new("/etc/mirror/tls").join(f)),
        )
        .collect(),
    );

    // Install.
    let info = ok(Command::new("dpkg-deb").arg("--field").arg(&deb).args(["Package", "Version", "Depends"]));
    assert!(info.contains("Package: mirror") && info.contains("libc6"), "{info}");
    ok(Command::new("dpkg").arg("-i").arg(&deb));
    assert!(installed());
    let version = ok(Command::new("/usr/bin/mirror").arg("--version"));
    let want = info.lines().find_map(|l| l.strip_prefix("Version: ")).unwrap();
    assert_eq!(version.trim(), format!("mirror {want}"));

    // Man pages: one per command, found by man.
    let pkg_files = ok(Command::new("dpkg").args(["-L", "mirror"]));
    for page in
        ["mirror", "mirror-serve", "mirror-replica", "mirror-daemon", "mirror-ctl", "mirror-ctl-status"]
    {
        let path = ok(Command::new("man").args(["-w", page]));
        assert_eq!(path.trim(), format!("/usr/share/man/man8/{page}.8.gz"), "man -w {page}");
    }
    let serve_page = ok(Command::new("man").args(["-P", "cat", "mirror-serve"]).env("MANWIDTH", "100"));
    for section in ["SYNOPSIS", "--config", "EXIT STATUS", "FILES", "/etc/mirror/volumes/NAME.toml"] {
        assert!(serve_page.contains(section), "mirror-serve(8) lacks {section}:\n{serve_page}");
    }

    // Completions where Debian's shells look; bash's completes a subcommand and a flag.
    for p in [
        "/usr/share/bash-completion/completions/mirror",
        "/usr/share/zsh/vendor-completions/_mirror",
        "/usr/share/fish/vendor_completions.d/mirror.fish",
    ] {
        assert!(pkg_files.lines().any(|l| l == p), "{p} not in the package");
        assert!(std::fs::read_to_string(p).unwrap().contains("serve"), "{p}");
    }
    let complete = |words: &str| {
        ok(Command::new("bash").arg("-c").arg(format!(
            "source /usr/share/bash-completion/completions/mirror; COMP_WORDS=({words}); \
             COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); COMP_LINE='{words}'; COMP_POINT=${{#COMP_LINE}}; \
             _mirror mirror; printf '%s\\n' \"${{COMPREPLY[@]}}\""
        )))
    };
    assert!(complete("mirror se").lines().any(|l| l == "serve"), "bash completion of `mirror se`");
    assert!(complete("mirror serve --conf").lines().any(|l| l == "--config"), "bash completion of --conf");

    // The units: clean under systemd-analyze verify (it also checks that ExecStart and the
    // Documentation= man pages exist).
    for unit in ["mirror-daemon.service", "mirror-replica.service", "mirror-serve@vol0.service"] {
        let (good, out, err) =
            sh(Command::new("systemd-analyze").arg("verify").arg(format!("/lib/systemd/system/{unit}")));
        assert!(good && err.trim().is_empty(), "systemd-analyze verify {unit}: {out}{err}");
    }

    // As an operator sets up a node from the README: the secret, a volume in the packaged
    // replica.toml (a conffile, now changed), a volume file for mirror-serve@pkgtest.
    std::fs::write("/etc/mirror/secret", "pkgtest-secret-0123456789abcdef\n").unwrap();
    // The examples carry `tls = "/etc/mirror/tls"`: this node's credentials (docs/tls.md), its
    // CA kept off the node.
    let ca = TempDir::new("pkgtest-ca");
    let ca_dir = ca.0.join("ca").display().to_string();
    ok(Command::new("/usr/bin/mirror").args(["certs", "ca", "--dir", &ca_dir]));
    ok(Command::new("/usr/bin/mirror").args([
        "certs",
        "node",
        "--ca",
        &ca_dir,
        "--name",
        "pkgtest",
        "--ip",
        "127.0.0.1",
        "--dir",
        "/etc/mirror/tls",
    ]));
    let port = || free_port().expect("a free port");
    let (rport, nbd, metrics) = (port(), port(), port());
    let replica_toml = std::fs::read_to_string("/etc/mirror/replica.toml").unwrap();
    assert!(replica_toml.contains("secret_file = \"/etc/mirror/secret\""), "{replica_toml}");
    let changed = replica_toml
        .replace("listen = \"0.0.0.0:7700\"", &format!("listen = \"127.0.0.1:{rport}\""))
        + "\n[[volume]]\nname = \"pkgtest\"\npath = \"/var/lib/mirror/pkgtest-b.img\"\nsize = \"16M\"\n";
    std::fs::write("/etc/mirror/replica.toml", &changed).unwrap();
    let example = std::fs::read_to_string("/usr/share/doc/mirror/examples/volume.toml").unwrap();
    let volume = example
        .replace("local:/var/lib/mirror/vol0.img:10G", "local:/var/lib/mirror/pkgtest-a.img:16M")
        .replace("remote:10.0.0.2:7700", &format!("remote:127.0.0.1:{rport}"))
        .replace("source_listen = \"0.0.0.0:7700\"", "source_listen = \"127.0.0.1:0\"")
        .replace("nbd = \"127.0.0.1:10809\"", &format!("nbd = \"127.0.0.1:{nbd}\""))
        .replace("ctl_socket = \"/run/mirror/ctl.sock\"", "ctl_socket = \"/run/mirror/pkgtest.sock\"")
        .replace("metrics = \"127.0.0.1:9187\"", &format!("metrics = \"127.0.0.1:{metrics}\""));
    assert!(volume.contains(&format!("127.0.0.1:{nbd}")), "the example's keys moved: {example}");
    std::fs::write("/etc/mirror/volumes/pkgtest.toml", volume).unwrap();

    // The units' ExecStart lines, by hand (no systemd as PID 1 here), with their capabilities.
    let (mut replica, lines) = start(unit_command("mirror-replica.service", ""), 1);
    assert_eq!(lines[0], format!("listening on 127.0.0.1:{rport}"));
    let (mut serve, mut lines) = start(unit_command("mirror-serve@.service", "pkgtest"), 2);
    lines.sort();
    assert_eq!(
        lines,
        [format!("metrics on 127.0.0.1:{metrics}"), format!("nbd listening on 127.0.0.1:{nbd}")]
    );
    let deadline = Instant::now() + Duration::from_mins(1);
    loop {
        let st = ok(Command::new("/usr/bin/mirror").args([
            "ctl",
            "--socket",
            "/run/mirror/pkgtest.sock",
            "--json",
            "status",
        ]));
        let st: serde_json::Value = serde_json::from_str(&st).unwrap();
        if st["replicas"].as_array().unwrap().iter().all(|r| r["state"] == "in-sync") {
            break;
        }
        assert!(Instant::now() < deadline, "never in sync: {st}");
        std::thread::sleep(Duration::from_millis(200));
    }
    if which("qemu-io").is_some() {
        let uri = format!("nbd://127.0.0.1:{nbd}/pkgtest");
        ok(Command::new("qemu-io").args([
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0x77 0 1M",
            "-c",
            "read -P 0x77 0 1M",
        ]));
    }
    assert!(stop(&mut serve), "serve stopped uncleanly");
    assert!(stop(&mut replica), "replica stopped uncleanly");
    {
        // The daemon's unit, with a pin directory of its own and a deadline.
        let pins = format!("/sys/fs/bpf/mirror-pkgtest-{}", std::process::id());
        let mut cmd = unit_command("mirror-daemon.service", "");
        cmd.args(["--pin-dir", &pins, "--for", "1s"]);
        let (mut daemon, lines) = start(cmd, 1);
        assert!(lines[0].starts_with("ready: block statistics from"), "{lines:?}");
        assert!(daemon.0.wait().unwrap().success());
        let _ = std::fs::remove_dir_all(&pins);
    }

    // Remove: the package's files go; its changed conffile and the operator's files stay.
    ok(Command::new("dpkg").args(["-r", "mirror"]));
    let conffiles: Vec<&str> = vec!["/etc/mirror/replica.toml"];
    for f in pkg_files.lines().filter(|f| Path::new(f).is_file() || !Path::new(f).exists()) {
        if !conffiles.contains(&f) {
            assert!(!Path::new(f).exists(), "{f} left after dpkg -r");
        }
    }
    assert!(!Path::new("/usr/bin/mirror").exists());
    assert!(!sh(Command::new("man").args(["-w", "mirror-serve"])).0, "the man page outlived the package");
    assert_eq!(
        std::fs::read_to_string("/etc/mirror/replica.toml").unwrap(),
        changed,
        "dpkg -r keeps conffiles"
    );
    // Purge: the conffile goes too; what the operator wrote stays, and so does replica data.
    ok(Command::new("dpkg").args(["--purge", "mirror"]));
    assert!(!installed() && !Path::new("/etc/mirror/replica.toml").exists());
    for f in files.0.iter().filter(|f| !f.starts_with("/run")) {
        assert!(f.exists(), "{} (the operator's) removed by the package", f.display());
    }
    let left: Vec<String> = pkg_files
        .lines()
        .filter(|f| Path::new(f).exists() && !Path::new(f).is_dir())
        .map(str::to_string)
        .collect();
    assert!(left.is_empty(), "left after purge: {left:?}");
    eprintln!("package: installed, used and removed in {:.1} s", t0.elapsed().as_secs_f64());
}
