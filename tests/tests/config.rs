//! `mirror replica` and `mirror serve` run from their config files, as the packaged services
//! run them (`mirror replica --config /etc/mirror/replica.toml`, `mirror serve --volume NAME
//! --config /etc/mirror/volumes/NAME.toml`): the volume is served where the files say, written
//! and read by a real NBD client by its export name, and the replicas end identical. TLS on both
//! links from the files' `tls` and `nbd_tls` keys; a file listening beyond loopback without them
//! (or with credentials not there yet) stops the command naming the key.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use mirror_tests::{
    env::{mirror_bin, skip, which},
    fs::{file_digest, secret_file, TempDir},
    net::{free_addr, http_get},
    proc::{captured, mirror_cli, run_tool, spawn_lines, Kill},
    tls::pki,
};

/// Starts `mirror ARGS` and returns it with the first `n` lines of its stdout.
fn start(args: &[&str], n: usize) -> (Kill, Vec<String>) {
    let mut cmd = Command::new(mirror_bin());
    cmd.args(args).env("RUST_LOG", "warn").env_remove("MIRROR_SECRET_FILE");
    spawn_lines(&mut cmd, n).unwrap()
}

fn write(path: &Path, text: &str) -> String {
    std::fs::write(path, text).unwrap();
    path.display().to_string()
}

#[test]
fn a_volume_is_served_from_its_config_file() {
    const T: &str = "config::a_volume_is_served_from_its_config_file";
    for tool in ["qemu-io", "nbdinfo"] {
        if which(tool).is_none() {
            return skip(T, "NBD", &format!("{tool} is not installed (cargo xtask setup)"));
        }
    }
    let dir = TempDir::new("config-serve");
    let d = dir.0.display();
    let secret = secret_file(&dir.0);
    let replica_toml = write(
        &dir.0.join("replica.toml"),
        &format!(
            "listen = \"127.0.0.1:0\"\nsecret_file = \"{}\"\n[[volume]]\nname = \"vol0\"\npath = \"{d}/b.img\"\nsize = \"32M\"\n[monitor]\npin_dir = \"{d}/pins\"\n",
            secret.display()
        ),
    );
    let (_replica, lines) = start(&["replica", "--config", &replica_toml], 1);
    let replica_addr = lines[0].strip_prefix("listening on ").unwrap_or_else(|| panic!("{lines:?}"));

    let nbd = free_addr();
    let metrics = free_addr();
    let ctl = format!("{d}/ctl.sock");
    let volume_toml = write(
        &dir.0.join("vol0.toml"),
        &format!(
            r#"
            source = "local:{d}/a.img:32M"
            target = "remote:{replica_addr}"
            secret_file = "{secret}"
            nbd = "{nbd}"
            nbd_unix = "{d}/vol0.nbd"
            ctl_socket = "{ctl}"
            metrics = "{metrics}"
            [engine]
            failback_hold = "2s"
            [monitor]
            interval = "100ms"
            pin_dir = "{d}/pins"
            "#,
            secret = secret.display()
        ),
    );
    // As mirror-serve@vol0.service runs it: the volume's name from the instance, the rest from
    // the file.
    let (serve, mut lines) = start(&["serve", "--volume", "vol0", "--config", &volume_toml], 3);
    lines.sort();
    let mut want = [
        format!("nbd listening on {nbd}"),
        format!("nbd listening on {d}/vol0.nbd"),
        format!("metrics on {metrics}"),
    ];
    want.sort();
    assert_eq!(lines, want, "the endpoints the file names");

    // The export is named after the volume (and is the default export).
    let info = run_tool(Command::new("nbdinfo").arg(format!("nbd://{nbd}/vol0")));
    assert!(info.contains("export=\"vol0\"") && info.contains("33554432"), "{info}");
    let unix = format!("nbd+unix:///vol0?socket={d}/vol0.nbd");
    run_tool(Command::new("qemu-io").args(["-f", "raw", &unix, "-c", "write -P 0x5a 1M 2M"]));
    run_tool(Command::new("qemu-io").args(["-f", "raw", &format!("nbd://{nbd}/vol0")]).args([
        "-c",
        "read -P 0x5a 1M 2M",
        "-c",
        "read -P 0 0 1M",
    ]));

    // The control socket and the metrics are where the file put them.
    let deadline = Instant::now() + Duration::from_mins(1);
    loop {
        let (ok, out, err) = mirror_cli(&["ctl", "--socket", &ctl, "status", "--json"]);
        assert!(ok, "{err}");
        let st: serde_json::Value = serde_json::from_str(&out).unwrap();
        if st["replicas"].as_array().unwrap().iter().all(|r| r["state"] == "in-sync") {
            break;
        }
        assert!(Instant::now() < deadline, "the target never got in sync: {st}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let scrape = http_get(&metrics, "/metrics").unwrap();
    assert!(scrape.contains("mirror_replica_in_sync{replica=\"target\"} 1"), "{scrape}");

    // A clean stop flushes both; the replicas hold the same bytes.
    let pid = serve.0.id().to_string();
    run_tool(Command::new("kill").args(["-TERM", &pid]));
    let mut serve = serve;
    let status = serve.0.wait().unwrap();
    assert!(status.success(), "serve exited with {status}");
    assert_eq!(file_digest(&dir.0.join("a.img")), file_digest(&dir.0.join("b.img")), "replicas differ");
}

#[test]
fn a_bad_config_file_stops_serve_naming_the_key() {
    let dir = TempDir::new("config-bad");
    for (text, words) in [
        ("source = \"local:/tmp/x\"\nnbd_port = 10809\n", &["nbd_port", "unknown field"][..]),
        ("source = \"local:/tmp/x\"\n[engine]\nramp = \"later\"\n", &["ramp", "examples"]),
    ] {
        let f = write(&dir.0.join("bad.toml"), text);
        let out = Command::new(mirror_bin())
            .args(["serve", "--volume", "v", "--config", &f])
            .env_remove("MIRROR_SECRET_FILE")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "a config error is a usage error: {err}");
        assert!(err.contains(&f), "the file is named: {err}");
        for w in words {
            assert!(err.contains(w), "{w:?} not in {err}");
        }
    }
    let out = Command::new(mirror_bin())
        .args(["serve", "--volume", "v", "--config", &format!("{}/missing.toml", dir.0.display())])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml"));
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn tls_is_turned_on_from_the_config_files() {
    const T: &str = "config::tls_is_turned_on_from_the_config_files";
    if which("nbdinfo").is_none() {
        return skip(T, "NBD", "nbdinfo is not installed (cargo xtask setup)");
    }
    let dir = TempDir::new("config-tls");
    let d = dir.0.display();
    let secret = secret_file(&dir.0);
    pki(&dir.0, "ca", &["replica", "router"]);
    let replica_toml = write(
        &dir.0.join("replica.toml"),
        &format!(
            "listen = \"127.0.0.1:0\"\nsecret_file = \"{}\"\ntls = \"{d}/replica\"\ntls_allow = [\"router\"]\n[[volume]]\nname = \"vol0\"\npath = \"{d}/b.img\"\nsize = \"16M\"\n[monitor]\npin_dir = \"{d}/pins\"\n",
            secret.display()
        ),
    );
    // The replica's log, to see the router authenticated by its certificate.
    let log = dir.0.join("replica.log");
    let mut cmd = Command::new(mirror_bin());
    cmd.args(["replica", "--config", &replica_toml])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env_remove("MIRROR_SECRET_FILE")
        .env_remove("MIRROR_TLS_DIR")
        .stderr(std::fs::File::create(&log).unwrap());
    let (_replica, lines) = spawn_lines(&mut cmd, 1).unwrap();
    let replica_addr = lines[0].strip_prefix("listening on ").unwrap_or_else(|| panic!("{lines:?}"));

    let nbd = free_addr();
    let ctl = format!("{d}/ctl.sock");
    let volume_toml = write(
        &dir.0.join("vol0.toml"),
        &format!(
            "source = \"local:{d}/a.img:16M\"\ntarget = \"remote:{replica_addr}\"\nsecret_file = \"{}\"\ntls = \"{d}/router\"\nnbd = \"{nbd}\"\nnbd_tls = \"{d}/router\"\nctl_socket = \"{ctl}\"\n[monitor]\npin_dir = \"{d}/pins\"\n",
            secret.display()
        ),
    );
    let (_serve, lines) = start(&["serve", "--volume", "vol0", "--config", &volume_toml], 1);
    assert_eq!(lines, [format!("nbd listening on {nbd}")]);

    // NBD: TLS required, as the file says; a client with the CA's credentials gets the export.
    let (plain_ok, _, err) = captured(Command::new("nbdinfo").arg(format!("nbd://{nbd}/vol0"))).unwrap();
    assert!(!plain_ok, "a plaintext NBD client was served");
    println!("plaintext nbdinfo: {}", err.trim());
    let info =
        run_tool(Command::new("nbdinfo").arg(format!("nbds://{nbd}/vol0?tls-certificates={d}/router")));
    assert!(info.contains("export=\"vol0\"") && info.contains("16777216"), "{info}");

    // Replication: the router reached the TLS-only replica server, authenticated as `router`.
    let deadline = Instant::now() + Duration::from_mins(1);
    loop {
        let (ok, out, err) = mirror_cli(&["ctl", "--socket", &ctl, "status", "--json"]);
        assert!(ok, "{err}");
        let st: serde_json::Value = serde_json::from_str(&out).unwrap();
        if st["replicas"].as_array().unwrap().iter().all(|r| r["state"] == "in-sync") {
            break;
        }
        assert!(Instant::now() < deadline, "the target never got in sync: {st}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let line = text.lines().find(|l| l.contains("peer authenticated") && l.contains("router"));
    assert!(line.is_some(), "no TLS authentication of the router in the replica's log:\n{text}");
}

#[test]
fn a_config_file_listening_beyond_loopback_needs_tls_or_says_so() {
    let dir = TempDir::new("config-tls-bad");
    let d = dir.0.display();
    let secret = secret_file(&dir.0);
    let volume = format!("[[volume]]\nname = \"vol0\"\npath = \"{d}/b.img\"\nsize = \"1M\"\n");
    let replica = |name: &str, keys: &str| {
        let f = write(
            &dir.0.join(name),
            &format!("listen = \"0.0.0.0:0\"\nsecret_file = \"{}\"\n{keys}{volume}", secret.display()),
        );
        Command::new(mirror_bin())
            .args(["replica", "--config", &f])
            .env_remove("MIRROR_SECRET_FILE")
            .env_remove("MIRROR_TLS_DIR")
            .output()
            .unwrap()
    };
    // No TLS on 0.0.0.0: refused, naming the key that turns it on.
    let out = replica("plain.toml", "");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("not a loopback address") && err.contains("`tls` in --config"), "{err}");
    // The packaged example's directory before `mirror certs` filled it: the key and what is missing.
    let out = replica("missing.toml", &format!("tls = \"{d}/no-such-dir\"\n"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("tls = ") && err.contains("(config)") && err.contains("no-such-dir"), "{err}");
    println!("missing credentials: {}", err.trim());
    // Serve: NBD on 0.0.0.0 without nbd_tls.
    let f = write(
        &dir.0.join("vol0.toml"),
        &format!(
            "source = \"local:{d}/a.img:1M\"\ntarget = \"local:{d}/c.img:1M\"\nsecret_file = \"{}\"\nnbd = \"0.0.0.0:0\"\nctl_socket = \"{d}/ctl.sock\"\n",
            secret.display()
        ),
    );
    let out = Command::new(mirror_bin())
        .args(["serve", "--volume", "vol0", "--config", &f])
        .env_remove("MIRROR_SECRET_FILE")
        .env_remove("MIRROR_TLS_DIR")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("`nbd_tls` in --config") && err.contains("nbd_insecure_plaintext"), "{err}");
}
