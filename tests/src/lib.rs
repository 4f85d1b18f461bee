//! `mirror_tests`: the one support library of the integration tests (`tests/*.rs`), the scenario
//! harness, the benchmark drivers and the demo (`src/bin/`). Each module has one job:
//! - [`bench`]: fio on NBD, `mirror` processes, rotation and samples for the bench drivers;
//! - [`env`]: what this machine can run (root, the VM, tools, the binaries) and the loud `skip`;
//! - [`flood`]: slow unauthenticated clients and /proc figures, for the pre-auth limits' tests;
//! - [`fs`]: scratch directories, unique names, digests and deterministic random data;
//! - [`blockdev`]: loop devices and `dd`;
//! - [`cgroup`]: I/O throttles and memory limits, and commands started inside a cgroup;
//! - [`net`]: free ports and a veth link to a peer that never answers;
//! - [`nbd`]: a small NBD client and a writer of numbered blocks that reconnects to the next router;
//! - [`handover`]: etcd, two replicas, an active and a standby router, for the handover tests and bench;
//! - [`netns`]: a node in a network namespace of its own, its link black-holed or shaped;
//! - [`proc`]: the processes under test (`mirror daemon`, `mirror replica`, the CLI) and the
//!   guards that stop them;
//! - [`tls`]: TLS credentials made by `mirror certs`;
//! - [`etcd`]: a real etcd (one or three members) on 127.0.0.1 for the lease tests;
//! - [`stats`]: figures over samples;
//! - [`sick`]: a served mirrored volume with fio on its export, for the sick-node tests;
//! - [`scenario`]: a two-node mirrored volume with real processes; [`timeline`]: its SVG plot.
//!
//! Test helpers panic with the reason (a test fails on its first unexpected step); the ones the
//! harness and the drivers use return `anyhow::Result`, and the panicking form wraps them.

pub mod bench;
pub mod blockdev;
pub mod cgroup;
pub mod env;
pub mod etcd;
pub mod flood;
pub mod fs;
pub mod handover;
pub mod nbd;
pub mod net;
pub mod netns;
pub mod proc;
pub mod scenario;
pub mod sick;
pub mod stats;
pub mod timeline;
pub mod tls;
