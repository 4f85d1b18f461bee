//! `mirror replica` and `mirror serve` run from their config files, as the packaged services
//! run them (`mirror replica --config /etc/mirror/replica.toml`, `mirror serve --volume NAME
//! --config /etc/mirror/volumes/NAME.toml`): the volume is served where the files say, written
//! and read by a real NBD client by its export name, and the replicas end identical.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use mirror_tests::{
    env::{mirror_bin, skip, which},
    fs::{file_digest, secret_file, TempDir},
    net::{free_addr, http_get},
    proc::{mirror_cli, run_tool, spawn_lines, Kill},
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
