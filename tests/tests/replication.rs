//! The replication manager with real processes on loopback: `mirror replica` servers and the
//! `mirror sync` CLI. Every scenario ends with the two backing files identical (by digest) or
//! with the documented refusal.

use std::{
    fs::OpenOptions,
    os::unix::fs::FileExt,
    path::Path,
    time::{Duration, Instant},
};

use mirror::replication::{client::Client, protocol::Message};
use mirror_tests::{
    fs::{file_digest, random_bytes, secret_file, TempDir},
    proc::{mirror_cli, sync_ok, Replica},
};

const MIB: u64 = 1 << 20;

fn write_file(path: &Path, data: &[u8]) {
    std::fs::write(path, data).expect("write backing file");
}

/// `mirror sync` from `node` to `peer`, returning the final JSON status.
fn sync(node: &Replica, peer: &Replica, secret: &Path, extra: &[&str]) -> (bool, serde_json::Value, String) {
    let mut args = vec!["sync", "--node", &node.addr, "--peer", &peer.addr, "--volume", "v", "--json"];
    let s = secret.display().to_string();
    args.extend(["--secret-file", &s]);
    args.extend(extra);
    let (ok, out, err) = mirror_cli(&args);
    let json =
        out.lines().last().and_then(|l| serde_json::from_str(l).ok()).unwrap_or(serde_json::Value::Null);
    (ok, json, err)
}

fn u(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("no {k} in {v}"))
}

fn client(r: &Replica, secret: &Path) -> Client {
    let secret = mirror::replication::auth::load_secret(secret).expect("secret");
    Client::connect(&r.addr, "v", &secret).expect("connect")
}

#[test]
fn initial_sync_of_a_mostly_identical_volume_moves_only_the_differences() {
    let dir = TempDir::new("repl-initial");
    let secret = secret_file(&dir.0);
    let size = 256 * MIB;
    let src = random_bytes(size as usize, 7);
    let mut dst = src.clone();
    // The target already holds 90% of it: every 10th 64 KiB block differs.
    let mut changed = 0u64;
    for b in (0..size / 65536).step_by(10) {
        let o = (b * 65536) as usize;
        dst[o..o + 65536].copy_from_slice(&random_bytes(65536, b + 1000));
        changed += 65536;
    }
    // A stretch of zeroes on the source travels as markers, not data.
    let zero_at = 100 * MIB as usize + 4096;
    let mut src = src;
    src[zero_at..zero_at + 4 * MIB as usize].fill(0);
    write_file(&dir.0.join("s.img"), &src);
    write_file(&dir.0.join("t.img"), &dst);
    drop((src, dst));
    let s = Replica::start(&dir.0.join("s.img"), &secret, None, &[]);
    let t = Replica::start(&dir.0.join("t.img"), &secret, None, &[]);

    let (ok, st, err) = sync(&s, &t, &secret, &[]);
    assert!(ok, "sync failed: {err} {st}");
    assert_eq!(st["plan"], "Full", "{st}");
    assert_eq!(u(&st, "done_bytes"), size, "every block examined");
    let moved = u(&st, "changed_bytes");
    assert!(
        moved >= changed && moved <= changed + 4 * MIB + 65536,
        "changed {moved}, expected about {changed}"
    );
    let wire = u(&st, "wire_bytes");
    assert!(wire < moved + moved / 20, "wire {wire} for {moved} changed bytes");
    assert!(wire < size / 8, "wire {wire} is not a small fraction of {size}");
    assert_eq!(file_digest(&dir.0.join("s.img")), file_digest(&dir.0.join("t.img")));

    // Again: nothing to do, nothing on the wire but the handshake.
    let (ok, st, _) = sync(&s, &t, &secret, &[]);
    assert!(ok);
    assert_eq!(st["state"], "up-to-date", "{st}");
}

#[test]
fn target_killed_mid_sync_resumes_without_recopying_finished_ranges() {
    let dir = TempDir::new("repl-kill");
    let secret = secret_file(&dir.0);
    let size = 256 * MIB;
    write_file(&dir.0.join("s.img"), &random_bytes(size as usize, 11));
    // The target starts empty (a new sparse file).
    let s = Replica::start(&dir.0.join("s.img"), &secret, None, &["--sync-max-rate", "48M"]);
    let t_spec = format!("{}:{size}", dir.0.join("t.img").display());
    let mut t = Replica::start(Path::new(&t_spec), &secret, None, &[]);
    t.path = dir.0.join("t.img");
    let s_addr = s.addr.clone();

    sync_ok(&s_addr, &t.addr, &secret, &["--no-wait"]);
    // Let it get part way (48 MiB/s: ~5 s for everything), then kill the target.
    let mut c = client(&s, &secret);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let js = c.json(&Message::JobStatus).expect("job status");
        if u(&js, "done_bytes") >= 64 * MIB {
            break;
        }
        assert!(Instant::now() < deadline, "sync made no progress: {js}");
        std::thread::sleep(Duration::from_millis(50));
    }
    t.kill();
    let js = loop {
        let js = c.json(&Message::JobStatus).expect("job status");
        if js["state"] != "syncing" {
            break js;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(js["state"], "failed", "the job notices the dead peer: {js}");
    let first_done = u(&js, "done_bytes");
    assert!(first_done < size, "killed before the end");

    t.restart();
    let (ok, st, err) = sync(&s, &t, &secret, &[]);
    assert!(ok, "resume failed: {err} {st}");
    assert_eq!(st["plan"], "Resync", "an interrupted sync resumes: {st}");
    let second = u(&st, "done_bytes");
    // Committed ranges (flushed on the target) are not examined again; at most the windows
    // since the last commit (8 x 4 MiB) are.
    assert!(
        second <= size - first_done + 32 * MIB + 4 * MIB,
        "resume examined {second} bytes after {first_done} were done"
    );
    assert!(second < size, "resume recopied everything");
    assert_eq!(file_digest(&dir.0.join("s.img")), file_digest(&dir.0.join("t.img")));
}

#[test]
fn degraded_writes_are_tracked_and_resynced_alone() {
    let dir = TempDir::new("repl-degraded");
    let secret = secret_file(&dir.0);
    let size = 64 * MIB;
    write_file(&dir.0.join("s.img"), &random_bytes(size as usize, 21));
    write_file(&dir.0.join("t.img"), &vec![0u8; size as usize]);
    let s = Replica::start(&dir.0.join("s.img"), &secret, None, &[]);
    let mut t = Replica::start(&dir.0.join("t.img"), &secret, None, &[]);
    let (ok, st, err) = sync(&s, &t, &secret, &[]);
    assert!(ok, "{err} {st}");

    // The target dies; the router marks the survivor degraded and keeps writing to it.
    t.kill();
    let mut c = client(&s, &secret);
    c.call_ok(&Message::MarkDirty { offset: 0, len: 0 }).expect("degrade");
    let mut written = 0u64;
    for i in 0..300u64 {
        let off = (i * 7919 % (size / 4096)) * 4096;
        c.write(off, random_bytes(4096, 500 + i)).expect("degraded write");
        written += 4096;
    }
    let status = c.json(&Message::Status).expect("status");
    assert_eq!(status["tracking"], true);
    assert!(u(&status, "dirty_bytes") >= 4096 && u(&status, "dirty_bytes") <= written, "{status}");

    // The survivor restarts too (crash-safety of the bitmap), then the target returns.
    drop(c);
    let mut s = s;
    s.kill();
    s.restart();
    t.restart();
    let (ok, st, err) = sync(&s, &t, &secret, &[]);
    assert!(ok, "{err} {st}");
    assert_eq!(st["plan"], "Resync", "{st}");
    assert!(u(&st, "done_bytes") <= written, "only dirty blocks examined: {st}");
    let wire = u(&st, "wire_bytes");
    assert!(wire as f64 <= 1.2 * u(&st, "changed_bytes") as f64, "wire {wire}: {st}");
    assert_eq!(file_digest(&dir.0.join("s.img")), file_digest(&dir.0.join("t.img")));
    let status = client(&s, &secret).json(&Message::Status).expect("status");
    assert_eq!(status["tracking"], false, "{status}");
    assert_eq!(u(&status, "dirty_bytes"), 0, "{status}");
}

#[test]
fn split_brain_is_refused_until_the_operator_discards_a_side() {
    let dir = TempDir::new("repl-split");
    let secret = secret_file(&dir.0);
    let size = 16 * MIB;
    write_file(&dir.0.join("s.img"), &random_bytes(size as usize, 31));
    write_file(&dir.0.join("t.img"), &random_bytes(size as usize, 31));
    let s = Replica::start(&dir.0.join("s.img"), &secret, None, &[]);
    let t = Replica::start(&dir.0.join("t.img"), &secret, None, &[]);
    let (ok, st, err) = sync(&s, &t, &secret, &[]);
    assert!(ok, "{err} {st}");
    assert_eq!(u(&st, "changed_bytes"), 0, "identical files: nothing to send");

    // Partition: each side believes the other is gone and takes writes.
    for (r, seed) in [(&s, 1u64), (&t, 2u64)] {
        let mut c = client(r, &secret);
        c.call_ok(&Message::MarkDirty { offset: 0, len: 0 }).expect("degrade");
        c.write(8192, random_bytes(4096, seed)).expect("write");
    }
    for (a, b) in [(&s, &t), (&t, &s)] {
        let (ok, st, err) = sync(a, b, &secret, &[]);
        assert!(!ok, "split brain must be refused: {st}");
        assert_eq!(st["state"], "refused", "{st}");
        assert!(err.contains("split brain") && err.contains("mirror resolve"), "the refusal explains: {err}");
    }
    assert_ne!(
        file_digest(&dir.0.join("s.img")),
        file_digest(&dir.0.join("t.img")),
        "nothing was overwritten"
    );

    // The operator keeps the source's writes.
    let sec = secret.display().to_string();
    let (ok, out, err) =
        mirror_cli(&["resolve", "--node", &t.addr, "--volume", "v", "--secret-file", &sec, "--discard"]);
    assert!(ok, "{out} {err}");
    let (ok, st, err) = sync(&s, &t, &secret, &[]);
    assert!(ok, "{err} {st}");
    assert_eq!(st["plan"], "Full", "{st}");
    assert_eq!(file_digest(&dir.0.join("s.img")), file_digest(&dir.0.join("t.img")));
}

#[test]
fn verify_finds_a_corrupted_block_and_repair_fixes_it() {
    let dir = TempDir::new("repl-verify");
    let secret = secret_file(&dir.0);
    let size = 32 * MIB;
    write_file(&dir.0.join("s.img"), &random_bytes(size as usize, 41));
    write_file(&dir.0.join("t.img"), &vec![0u8; size as usize]);
    let s = Replica::start(&dir.0.join("s.img"), &secret, None, &[]);
    let t = Replica::start(&dir.0.join("t.img"), &secret, None, &[]);
    let (ok, st, err) = sync(&s, &t, &secret, &[]);
    assert!(ok, "{err} {st}");
    let (ok, _, err) = sync(&s, &t, &secret, &["--verify"]);
    assert!(ok, "clean volumes verify clean: {err}");

    // Silent corruption of one 4 KiB block on the target's disk.
    let bad = 5 * MIB + 3 * 4096;
    OpenOptions::new()
        .write(true)
        .open(dir.0.join("t.img"))
        .unwrap()
        .write_all_at(&[0x5a; 4096], bad)
        .unwrap();
    let (ok, st, err) = sync(&s, &t, &secret, &["--verify"]);
    assert!(!ok, "verify must fail on a mismatch");
    assert_eq!(st["mismatches"], serde_json::json!([[bad, 4096]]), "{st}");
    assert!(err.contains("mismatching"), "{err}");
    assert_ne!(
        file_digest(&dir.0.join("s.img")),
        file_digest(&dir.0.join("t.img")),
        "verify alone changes nothing"
    );

    let (ok, st, err) = sync(&s, &t, &secret, &["--verify", "--repair"]);
    assert!(ok, "{err} {st}");
    assert_eq!(st["state"], "repaired", "{st}");
    assert_eq!(u(&st, "changed_bytes"), 4096, "{st}");
    assert_eq!(file_digest(&dir.0.join("s.img")), file_digest(&dir.0.join("t.img")));
}

#[test]
fn sync_while_the_volume_is_live_converges() {
    let dir = TempDir::new("repl-live");
    let secret = secret_file(&dir.0);
    let size = 64 * MIB;
    write_file(&dir.0.join("s.img"), &random_bytes(size as usize, 51));
    write_file(&dir.0.join("t.img"), &vec![0u8; size as usize]);
    // Slow the sync down so that application writes interleave with it for seconds.
    let s = Replica::start(
        &dir.0.join("s.img"),
        &secret,
        None,
        &["--sync-min-rate", "12M", "--sync-max-rate", "12M"],
    );
    let t = Replica::start(&dir.0.join("t.img"), &secret, None, &[]);
    sync_ok(&s.addr, &t.addr, &secret, &["--no-wait"]);

    // A router: every write goes to both replicas, while the sync copies underneath.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (sa, ta, sp, st2) = (s.addr.clone(), t.addr.clone(), secret.clone(), stop.clone());
    let writer = std::thread::spawn(move || {
        let key = mirror::replication::auth::load_secret(&sp).unwrap();
        let mut cs = Client::connect(&sa, "v", &key).unwrap();
        let mut ct = Client::connect(&ta, "v", &key).unwrap();
        let mut n = 0u64;
        while !st2.load(std::sync::atomic::Ordering::SeqCst) {
            let off = (n * 104_729 % (size / 4096)) * 4096;
            let data = random_bytes(4096, 9000 + n);
            cs.write(off, data.clone()).unwrap();
            ct.write(off, data).unwrap();
            n += 1;
            std::thread::sleep(Duration::from_millis(2));
        }
        n
    });
    let mut c = client(&s, &secret);
    let st = loop {
        let js = c.json(&Message::JobStatus).unwrap();
        if !matches!(js["state"].as_str(), Some("connecting" | "syncing")) {
            break js;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let writes = writer.join().unwrap();
    assert_eq!(st["state"], "done", "{st}");
    assert!(writes > 100, "the writer ran during the sync ({writes} writes)");
    assert_eq!(
        file_digest(&dir.0.join("s.img")),
        file_digest(&dir.0.join("t.img")),
        "after {writes} live writes"
    );
    let status = c.json(&Message::Status).unwrap();
    assert_eq!(status["tracking"], false, "{status}");
}
