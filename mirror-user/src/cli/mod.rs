//! The `mirror` command line: one clap definition ([`Cli`]) for the binary, and for the man
//! pages and shell completions generated from it. Each command's arguments live in the module
//! of the code they drive, with that code: [`daemon`], [`top`], [`replica`], [`serve`], [`ublk`],
//! [`ctl`], [`sync`], [`status`], [`resolve`]; [`health`] holds the health-monitor flags that
//! `replica` and `serve` share; [`exit`] the exit statuses and quiet printing. `main.rs` only
//! parses and dispatches.

pub mod ctl;
pub mod daemon;
pub mod exit;
pub mod health;
pub mod replica;
pub mod resolve;
pub mod serve;
pub mod status;
pub mod sync;
pub mod top;
pub mod transport;
pub mod ublk;

use clap::{Parser, Subcommand};

/// The `mirror` binary's command line.
#[derive(Parser, Debug)]
#[command(
    name = "mirror",
    version,
    about = "Adaptive block-storage mirroring with predictive failover",
    long_about = "Adaptive block-storage mirroring with predictive failover.\n\n\
        `mirror daemon` runs on each node (as root): it attaches the eBPF telemetry programs and \
        pins their maps under /sys/fs/bpf/mirror/ (inspect them with `bpftool map dump pinned \
        /sys/fs/bpf/mirror/blk_stats`). `mirror top` shows a running daemon's figures."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The commands; each variant's doc is its one-line help in `mirror --help`.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the node daemon: attach the eBPF programs, pin their maps, show live block latency.
    Daemon(daemon::DaemonArgs),
    /// Show the block latency figures of a running daemon, read from its pinned maps.
    Top(top::TopArgs),
    /// Run a replica server: serve volumes (files or block devices) to authenticated peers over
    /// TCP, and run sync / verify jobs that push this replica's data to a peer.
    Replica(replica::ReplicaArgs),
    /// Serve a mirrored volume to applications over NBD. Reads go to the target with probability
    /// --target-weight/100 (only where it is in sync), writes to both replicas; a replica that
    /// fails is recorded on the survivor, resynced when it returns and put back in service.
    /// Prints `nbd listening on ADDR` when ready.
    Serve(Box<serve::ServeArgs>),
    /// ublk devices: list them, delete one left by a killed daemon.
    Ublk(ublk::UblkArgs),
    /// Talk to a running `mirror serve` over its control socket (root only).
    Ctl(ctl::CtlArgs),
    /// Bring a peer up to date from a replica (`--node` pushes to `--peer`), or verify them.
    /// Shows progress; exits non-zero when refused (split brain, peer newer) or failed.
    Sync(sync::SyncArgs),
    /// Show a replica's volume status (generation, dirty bytes, counters, job).
    Status(status::StatusArgs),
    Certs(crate::tls::certs_cmd::CertsArgs),
    /// Resolve a split brain: discard this replica's data (the next sync onto it is a full one).
    Resolve(resolve::ResolveArgs),
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is called, not when the
/// future is first polled, so a caller that announces readiness after calling it cannot be
/// killed by a signal sent in between. Call it inside the runtime.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
