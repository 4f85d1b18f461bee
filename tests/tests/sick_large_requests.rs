//! Requests larger than the replication protocol's MAX_IO (8 MiB) through the NBD export (it
//! advertises 32 MiB): qemu-io writes, reads back and zeroes 32 MiB in one request each against
//! a local source and a remote target; the router splits them, both replicas hold the data.

use std::time::Duration;

use mirror_tests::{
    env::{skip, which},
    proc::run_tool,
    sick::{Mirror, MirrorOpts},
};

fn qemu_io(m: &Mirror, cmds: &[&str]) -> String {
    let mut cmd = std::process::Command::new("qemu-io");
    cmd.args(["-f", "raw", &m.uri()]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    let text = run_tool(&mut cmd);
    assert!(
        !text.contains("Pattern verification failed") && !text.contains("failed"),
        "{cmds:?}:\n{text}\n{}",
        m.serve_log()
    );
    text
}

#[test]
fn requests_of_32_mib_reach_a_remote_replica_split() {
    const T: &str = "sick_large_requests::requests_of_32_mib_reach_a_remote_replica_split";
    if which("qemu-io").is_none() {
        return skip(T, "NBD", "qemu-io is not installed (cargo xtask setup)");
    }
    // Reads weighted to the remote target, so the 32 MiB reads go there.
    let o = MirrorOpts { size: 96 << 20, target_weight: 100, ..Default::default() };
    let m = Mirror::start("sick-large", &o).unwrap_or_else(|e| panic!("{e:#}"));
    let out = qemu_io(
        &m,
        &["write -P 0xab 1M 32M", "read -P 0xab 1M 32M", "write -z 40M 32M", "read -P 0 40M 32M"],
    );
    assert!(out.contains("wrote 33554432/33554432 bytes at offset 1048576"), "{out}");
    assert!(out.contains("read 33554432/33554432 bytes at offset 1048576"), "{out}");
    assert!(out.contains("read 33554432/33554432 bytes at offset 41943040"), "{out}");
    // No replica was failed on the way: the remote one took every piece.
    let reps = m.replicas().unwrap();
    assert!(reps.iter().all(|r| r["state"] == "in-sync" && r["errors"] == 0), "{reps:?}");
    assert!(reps[1]["reads"].as_u64().unwrap() >= 4, "the reads did not reach the target: {reps:?}");
    qemu_io(&m, &["flush"]);
    std::thread::sleep(Duration::from_millis(100));
    drop(m.serve);
    let (s, t) = (m.dir.0.join("s.img"), m.dir.0.join("t.img"));
    let (s, t) = (std::fs::read(s).unwrap(), std::fs::read(t).unwrap());
    assert!(s[1 << 20..33 << 20].iter().all(|&b| b == 0xab), "the source lacks the 32 MiB write");
    assert!(s == t, "the replicas differ");
}
