//! `cargo xtask`: the project's build, setup, test and demo driver.

mod bench;
mod build;
mod package;
mod setup;
mod util;
mod vm;

use std::process::{Command, ExitCode};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use util::{is_root, run, run_tally, Tally};

#[derive(Parser, Debug)]
#[command(name = "cargo xtask", about = "Build, set up, test and demo mirror")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Install what the build, tests and benchmarks need (root, Debian; idempotent).
    Setup,
    /// Build the eBPF object, then the userspace binaries that embed it.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Lint, run unit + integration tests on the host, then the VM tests; prints a summary.
    Test {
        /// Skip `cargo fmt --check` and `cargo clippy -D warnings`.
        #[arg(long)]
        no_lint: bool,
        /// Skip the VM tests.
        #[arg(long)]
        no_vm: bool,
    },
    /// Boot the Debian 6.12 kernel with virtme-ng and run the tests that need it (ublk, ...).
    VmTest,
    /// Build the Debian package target/package/mirror_VERSION_ARCH.deb: the release binary
    /// (eBPF embedded), systemd units, man pages, completions, example config, dashboard.
    Package {
        /// Package the dev build instead of the release one (what `cargo xtask test` installs).
        #[arg(long)]
        debug: bool,
    },
    /// Run a benchmark: `resync` (sync/resync vs rsync), `nbd` (router + NBD vs nbdkit and
    /// qemu-nbd), `tls` (TLS vs plaintext on the replication and NBD links), `ebpf` (overhead of the telemetry programs), `failover` (issue 7's scenarios,
    /// adaptive policy vs the seed formula), `ublk` (in the VM: vs md raid1, rublk, loop) or
    /// `sick-node` (issue 15: frozen target, black-holed link, stalling replica) or `handover`
    /// (issue 14: planned handover pause, SIGKILL takeover, stale writes of a fenced router).
    /// Prints a table of ratios and writes target/bench/<name>.json. Arguments after `--` go to
    /// the benchmark driver.
    Bench {
        /// Which benchmark: resync, nbd, tls, ebpf, failover, ublk, sick-node, handover.
        name: String,
        /// ebpf: how to alternate without / with the programs: `windows` (one fio run, the
        /// programs detached and attached every window) or `runs` (a fio run per side, the
        /// daemon started for each "with" run).
        #[arg(long, default_value = "windows", value_parser = ["windows", "runs"])]
        method: String,
        /// ebpf: pairs of windows or runs without / with the programs (default: 80 windows, 8 runs).
        #[arg(long)]
        pairs: Option<usize>,
        /// ebpf: seconds per run (runs), and of the BPF-statistics run.
        #[arg(long, default_value_t = 3)]
        seconds: u64,
        /// ebpf: milliseconds per window (windows).
        #[arg(long, default_value_t = 500)]
        window_ms: u64,
        /// ebpf: fio engine, io_uring or psync.
        #[arg(long, default_value = "io_uring", value_parser = ["io_uring", "psync"])]
        ioengine: String,
        /// ebpf: fio queue depth (psync: 1).
        #[arg(long, default_value_t = 16)]
        iodepth: u32,
        /// ebpf: run the daemon with `--exact-block-latency` (every block request timed, no
        /// sampling), to measure what the sampling saves.
        #[arg(long)]
        exact_latency: bool,
        /// ebpf: the daemon's `--runq-duty` (percent of the time the run-queue program is
        /// attached; the daemon's default when not given), e.g. 100 to measure every switch.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100))]
        runq_duty: Option<u32>,
        /// resync: extra arguments for the driver after `--` (e.g. -- --size 256M --rounds 5).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// The main job on embedded defaults, on this machine.
    Demo {
        /// Seconds of each calm phase of the story (the whole demo takes about 10x this).
        #[arg(long, default_value_t = 6)]
        seconds: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Setup => setup::setup(),
        Cmd::Build { release } => build::build(release),
        Cmd::Test { no_lint, no_vm } => test(no_lint, no_vm),
        Cmd::VmTest => vm_test_only(),
        Cmd::Package { debug } => package::package(debug).map(drop),
        Cmd::Demo { seconds } => demo(seconds),
        Cmd::Bench {
            name,
            method,
            pairs,
            seconds,
            window_ms,
            ioengine,
            iodepth,
            exact_latency,
            runq_duty,
            args,
        } => match name.as_str() {
            "ebpf" => bench::bench(
                &name,
                bench::EbpfOpts {
                    method: if method == "runs" { bench::Method::Runs } else { bench::Method::Windows },
                    pairs: pairs.unwrap_or(if method == "runs" { 8 } else { 80 }),
                    seconds,
                    window: std::time::Duration::from_millis(window_ms),
                    ioengine: if ioengine == "psync" { "psync" } else { "io_uring" },
                    iodepth: if ioengine == "psync" { 1 } else { iodepth },
                    exact_latency,
                    runq_duty,
                },
            ),
            _ => bench_other(&name, &args),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs setup when this machine allows it; otherwise says what will be missing.
fn setup_if_possible() -> Result<()> {
    if setup::can_setup() {
        setup::setup()
    } else {
        eprintln!(
            "xtask: not root on Debian: skipping `cargo xtask setup`; tests needing root, BPF or \
             the VM will say `skipped:`"
        );
        Ok(())
    }
}

/// Mounts tracefs and bpffs for the BPF tests (root only; harmless when already mounted).
pub(crate) fn mount_kernel_fs() {
    if !is_root() {
        return;
    }
    for (fs, path) in [("tracefs", "/sys/kernel/tracing"), ("bpf", "/sys/fs/bpf")] {
        let mounted = std::fs::read_to_string("/proc/mounts")
            .is_ok_and(|m| m.lines().any(|l| l.split_whitespace().nth(1) == Some(path)));
        if !mounted {
            let _ = run(Command::new("mount").args(["-t", fs, fs, path]));
        }
    }
}

fn print_summary(host: Tally, vm: Option<Tally>) -> Tally {
    let mut all = host;
    eprintln!(
        "xtask: host: {} passed, {} failed, {} skipped, {} ignored",
        host.passed.saturating_sub(host.skipped),
        host.failed,
        host.skipped,
        host.ignored
    );
    if let Some(vm) = vm {
        eprintln!(
            "xtask: vm:   {} passed, {} failed, {} skipped, {} ignored",
            vm.passed.saturating_sub(vm.skipped),
            vm.failed,
            vm.skipped,
            vm.ignored
        );
        all.add(vm);
    }
    all
}

fn test(no_lint: bool, no_vm: bool) -> Result<()> {
    setup_if_possible()?;
    build::build(false)?;
    if !no_lint {
        run(&mut build::cargo(&["fmt", "--all", "--check"]))
            .context("formatting differs: run `cargo fmt --all`")?;
        run(&mut build::cargo(&["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
    }
    mount_kernel_fs();
    // The package of the dev build, for tests/tests/package.rs (install, use, remove), where
    // dpkg can install it.
    let deb =
        if is_root() && util::which("dpkg-deb").is_some() { Some(package::package(true)?) } else { None };
    let mut host_tests = build::cargo(&["test", "--workspace", "--no-fail-fast"]);
    host_tests.env("MIRROR_BIN", build::mirror_bin(false));
    if let Some(deb) = &deb {
        host_tests.env("MIRROR_DEB", deb);
    }
    let (host, host_ok) = run_tally(&mut host_tests)?;
    let vm = if no_vm { None } else { Some(vm::vm_test()?) };
    let all = print_summary(host, vm.map(|(t, _)| t));
    let ok = host_ok && vm.is_none_or(|(_, ok)| ok) && all.failed == 0;
    println!(
        "{} passed, {} failed, {} skipped",
        all.passed.saturating_sub(all.skipped),
        all.failed,
        all.skipped
    );
    anyhow::ensure!(ok, "tests failed");
    Ok(())
}

fn vm_test_only() -> Result<()> {
    build::build(false)?;
    let (t, ok) = vm::vm_test()?;
    print_summary(Tally::default(), Some(t));
    println!("{} passed, {} failed, {} skipped", t.passed.saturating_sub(t.skipped), t.failed, t.skipped);
    anyhow::ensure!(ok && t.failed == 0, "VM tests failed");
    Ok(())
}

/// The main job: the whole product on one machine (see tests/src/bin/demo.rs). It needs root
/// (loop devices, a cgroup to slow the source disk, eBPF); without root it says so and shows
/// what an unprivileged node can: its /proc telemetry.
fn demo(phase_seconds: u64) -> Result<()> {
    setup_if_possible()?;
    if !is_root() {
        eprintln!(
            "xtask: demo: the mirrored-volume demo needs root (loop devices, cgroup I/O throttle, \
             eBPF); run `sudo cargo xtask demo`. Meanwhile, this node's /proc telemetry:"
        );
        build::build(false)?;
        let bin = build::mirror_bin(false);
        return run(Command::new(&bin).args(["daemon", "--no-bpf", "--for", "5s"]));
    }
    mount_kernel_fs();
    build::build(true)?;
    run(&mut build::cargo(&["build", "--release", "-p", "mirror-tests", "--bin", "demo"]))?;
    let root = util::root();
    run(Command::new(root.join("target/release/demo"))
        .current_dir(&root)
        .arg("--mirror-bin")
        .arg(build::mirror_bin(true))
        .arg("--out-dir")
        .arg(root.join("target/demo"))
        .arg("--phase-seconds")
        .arg(phase_seconds.to_string()))
}

/// Benchmarks available to `cargo xtask bench`.
const BENCHES: &[&str] = &["resync", "nbd", "tls", "ebpf", "failover", "ublk", "sick-node", "handover"];

fn bench_other(name: &str, args: &[String]) -> Result<()> {
    match name {
        "resync" | "nbd" | "tls" | "failover" | "sick-node" | "handover" => {
            let need = match name {
                "resync" => "rsync",
                "nbd" => "nbdkit",
                "handover" => "etcd",
                _ => "fio",
            };
            if util::which(need).is_none() {
                setup_if_possible()?;
            }
            run(&mut build::cargo(&["build", "--release", "-p", "mirror-user", "-p", "mirror-tests"]))?;
            let root = util::root();
            // Where cargo put the binaries: CARGO_TARGET_DIR when set (a worktree's own).
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map_or_else(|| root.join("target"), |d| root.join(std::path::PathBuf::from(d)));
            std::fs::create_dir_all(root.join("target/bench"))?;
            run(Command::new(target.join(format!("release/bench-{name}")))
                .current_dir(&root)
                .arg("--mirror-bin")
                .arg(target.join("release/mirror"))
                .arg("--out")
                .arg(root.join(format!("target/bench/{name}.json")))
                .args(args))
        }
        "ublk" => vm::bench_ublk(args),
        _ => anyhow::bail!("unknown benchmark {name:?}; available: {}", BENCHES.join(", ")),
    }
}
