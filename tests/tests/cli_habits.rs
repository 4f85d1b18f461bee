//! The CLI's habits against a real `mirror serve`: every command that prints state has
//! `--json`; output into a pipe whose reader went away ends quietly with status 0
//! (`mirror ctl status --json | head`); `mirror ctl status --watch` updates live, a line per
//! update into a pipe and a redrawn screen on a terminal; the exit statuses are the documented
//! ones (0 ok, 1 error, 2 usage, 3 verify found differences).

use std::{
    io::BufRead,
    os::unix::fs::FileExt,
    process::{Command, Stdio},
    time::Duration,
};

use mirror_tests::{
    env::{mirror_bin, skip, which},
    fs::{random_bytes, secret_file, TempDir},
    net::free_addr,
    proc::{drain, mirror_cli, spawn_until, terminate, Kill, Replica},
};

/// A router over two local replicas taken as identical, with its control socket and the
/// source's replica server at known places.
struct Router {
    _dir: TempDir,
    _serve: Kill,
    ctl: String,
    source_listen: String,
    secret: String,
}

fn router(tag: &str) -> Router {
    let dir = TempDir::new(tag);
    let secret = secret_file(&dir.0).display().to_string();
    let d = dir.0.display().to_string();
    let ctl = format!("{d}/ctl.sock");
    let source_listen = free_addr();
    let (child, _, out) = spawn_until(
        Command::new(mirror_bin())
            .args(["serve", "--volume", "v", "--assume-clean", "--nbd", "127.0.0.1:0"])
            .args(["--source", &format!("local:{d}/a.img:8M"), "--target", &format!("local:{d}/b.img:8M")])
            .args(["--secret-file", &secret, "--ctl-socket", &ctl, "--pin-dir", &format!("{d}/pins")])
            .args(["--source-listen", &source_listen])
            .env("RUST_LOG", "warn"),
        "nbd listening on ",
    )
    .expect("mirror serve starts");
    drain(out);
    Router { _dir: dir, _serve: Kill(child), ctl, source_listen, secret }
}

/// `mirror ARGS` with stdout piped; returns the child.
fn piped(args: &[&str]) -> std::process::Child {
    Command::new(mirror_bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mirror")
}

fn stderr_of(child: std::process::Child) -> (Option<i32>, String) {
    let out = child.wait_with_output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn output_into_a_closed_pipe_ends_quietly_with_status_0() {
    let r = router("habits-pipe");
    // The reader is gone before anything is written, as `| head` is after its lines.
    let mut child = piped(&["ctl", "--socket", &r.ctl, "status", "--json"]);
    drop(child.stdout.take());
    let (code, err) = stderr_of(child);
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains("panicked") && !err.contains("Broken pipe"), "{err}");

    // `--watch | head -1`: the first line is read, then the reader goes away.
    let mut child = piped(&["ctl", "--socket", &r.ctl, "status", "--watch", "--interval", "100ms"]);
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.contains("source 100% target 0%"), "{line}");
    drop(out);
    let (code, err) = stderr_of(child);
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn watch_prints_a_line_per_update_into_a_pipe_and_a_screen_on_a_terminal() {
    let r = router("habits-watch");
    let lines = |extra: &[&str]| -> Vec<String> {
        let mut args = vec!["ctl", "--socket", &r.ctl, "status", "--watch", "--interval", "200ms"];
        args.extend_from_slice(extra);
        let mut child = piped(&args);
        std::thread::sleep(Duration::from_millis(1100));
        // Ctrl-C ends the watch cleanly.
        let killed = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
        assert!(killed.success());
        let status = terminate(&mut child, Duration::from_secs(5)).expect("the watch ends on SIGINT");
        assert!(status.success(), "{status}");
        let mut text = String::new();
        std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut text).unwrap();
        text.lines().map(str::to_string).collect()
    };
    let plain = lines(&[]);
    assert!((3..=8).contains(&plain.len()), "a line per 200 ms update for 1.1 s: {plain:?}");
    for l in &plain {
        assert!(
            l.contains("source 100% target 0% mode ")
                && l.contains("| source health ")
                && l.contains(" in-sync sync - lat ")
                && l.contains("| target health "),
            "{l}"
        );
    }
    let json = lines(&["--json"]);
    assert!(json.len() >= 3, "{json:?}");
    for l in &json {
        let st: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"));
        assert_eq!(st["weights"]["target"], 0, "{st}");
    }

    // On a terminal (script(1) gives it one): the screen is cleared and redrawn each update.
    const T: &str = "cli_habits::watch_prints_a_line_per_update_into_a_pipe_and_a_screen_on_a_terminal";
    if which("script").is_none() {
        return skip(T, "NBD", "script (util-linux) is not installed: no terminal to try the screen on");
    }
    let cmd = format!(
        "timeout -s INT 1.1 {} ctl --socket {} status --watch --interval 200ms",
        mirror_bin().display(),
        r.ctl
    );
    let out =
        Command::new("script").args(["-qfec", &cmd, "/dev/null"]).env("RUST_LOG", "warn").output().unwrap();
    let screen = String::from_utf8_lossy(&out.stdout);
    let redraws = screen.matches("\x1b[H\x1b[2J").count();
    assert!((3..=8).contains(&redraws), "{redraws} redraws: {screen}");
    assert!(
        screen.contains("source 100% ####################   target   0% ...................."),
        "{screen}"
    );
    assert!(screen.contains("REPLICA HEALTH") && screen.contains("mirror ctl status --watch"), "{screen}");
}

#[test]
fn every_command_that_prints_state_has_json() {
    let r = router("habits-json");
    let json = |args: &[&str]| -> serde_json::Value {
        let (ok, out, err) = mirror_cli(args);
        assert!(ok, "{args:?}: {err}");
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{args:?} printed {out:?}: {e}"))
    };
    let st = json(&["ctl", "--socket", &r.ctl, "status", "--json"]);
    assert_eq!(st["replicas"].as_array().map(Vec::len), Some(2), "{st}");
    let d = json(&["ctl", "--socket", &r.ctl, "--json", "weights", "set", "--target", "30"]);
    assert_eq!((d["target"].as_u64(), d["mode"].as_str()), (Some(30), Some("Pinned")), "{d}");
    let d = json(&["ctl", "--socket", &r.ctl, "--json", "failover"]);
    assert_eq!(d["target"], 100, "{d}");
    let d = json(&["ctl", "--socket", &r.ctl, "--json", "failback"]);
    assert!(d["mode"].is_string() && d["reason"].is_string(), "{d}");
    let d = json(&["ctl", "--socket", &r.ctl, "--json", "weights", "auto"]);
    assert!(d["target"].is_u64(), "{d}");
    let st =
        json(&["status", "--node", &r.source_listen, "--volume", "v", "--secret-file", &r.secret, "--json"]);
    assert!(st["block_size"].is_u64(), "{st}");
    // The daemon and top print one JSON object per interval.
    let (ok, out, err) =
        mirror_cli(&["daemon", "--no-bpf", "--json", "--interval", "100ms", "--for", "350ms"]);
    assert!(ok, "{err}");
    let mut lines = out.lines();
    assert!(lines.next().is_some_and(|l| l.starts_with("ready: ")), "the readiness line first: {out}");
    let samples: Vec<serde_json::Value> = lines.map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(samples.len() >= 3, "{out}");
    assert!(samples.iter().all(|s| s["source"] == "procfs" && s["devices"].is_array()), "{out}");
}

#[test]
fn exit_statuses_are_the_documented_ones() {
    let code = |args: &[&str]| Command::new(mirror_bin()).args(args).output().unwrap().status.code();
    assert_eq!(code(&["--version"]), Some(0));
    assert_eq!(code(&["serve", "--no-such-flag"]), Some(2), "clap's usage error");
    assert_eq!(code(&["ctl", "weights", "set", "--target", "101"]), Some(2), "a value out of range");
    assert_eq!(code(&["ctl", "--socket", "/nonexistent/ctl.sock", "status"]), Some(1), "unreachable");

    // verify that finds a difference: 3 (an error running it stays 1).
    let dir = TempDir::new("habits-verify");
    let secret = secret_file(&dir.0);
    let data = random_bytes(8 << 20, 7);
    for f in ["s.img", "t.img"] {
        std::fs::write(dir.0.join(f), &data).unwrap();
    }
    let s = Replica::start(&dir.0.join("s.img"), &secret, None, &[]);
    let t = Replica::start(&dir.0.join("t.img"), &secret, None, &[]);
    let sec = secret.display().to_string();
    let sync = |extra: &[&str]| {
        let mut args =
            vec!["sync", "--node", &s.addr, "--peer", &t.addr, "--volume", "v", "--secret-file", &sec];
        args.extend_from_slice(extra);
        let out = Command::new(mirror_bin()).args(&args).env("RUST_LOG", "warn").output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    assert_eq!(sync(&[]).0, Some(0));
    assert_eq!(sync(&["--verify"]).0, Some(0), "identical replicas verify clean");
    let f = std::fs::OpenOptions::new().write(true).open(dir.0.join("t.img")).unwrap();
    f.write_all_at(&[0x5a; 4096], 1 << 20).unwrap();
    f.sync_all().unwrap();
    let (c, err) = sync(&["--verify"]);
    assert_eq!(c, Some(3), "{err}");
    assert!(err.contains("verify found 1 mismatching range(s)"), "{err}");
}
