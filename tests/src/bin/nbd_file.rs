//! `nbd_file --file PATH [--size N] (--tcp ADDR | --unix PATH) [--name NAME] [--read-only]`:
//! serves one file over NBD with `FileDev` (a test and baseline tool). Prints
//! `listening on ADDR` once bound, then serves until SIGINT / SIGTERM. `--help` explains.

use std::{io::Write, path::PathBuf, sync::Arc};

use anyhow::{Context, Result};
use clap::Parser;
use mirror::{
    frontend::nbd::{NbdListen, NbdOptions, NbdServer},
    volume::file::FileDev,
};

/// Serves one file over NBD with `FileDev` (a test and baseline tool). Prints `listening on ADDR`
/// once bound, then serves until SIGINT / SIGTERM.
#[derive(Debug, Parser)]
#[command(name = "nbd_file")]
#[command(group = clap::ArgGroup::new("listen").required(true).args(["tcp", "unix"]))]
struct Args {
    /// The file to serve.
    #[arg(long)]
    file: PathBuf,
    /// Size of a file that does not exist yet: it is created sparse with this size (suffixes K,
    /// M, G). An existing file is served with its own size.
    #[arg(long, value_parser = mirror::parse_size)]
    size: Option<u64>,
    /// Listen on this TCP address (e.g. 127.0.0.1:10809; port 0: any free port).
    #[arg(long, value_name = "ADDR")]
    tcp: Option<std::net::SocketAddr>,
    /// Listen on this Unix socket.
    #[arg(long, value_name = "PATH")]
    unix: Option<PathBuf>,
    /// The export's name (clients may also ask for the default export "").
    #[arg(long, default_value_t = NbdOptions::default().export_name)]
    name: String,
    /// Refuse writes, trims and write-zeroes (EPERM).
    #[arg(long)]
    read_only: bool,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let a = Args::parse();
    let opts = NbdOptions { export_name: a.name, read_only: a.read_only, ..NbdOptions::default() };
    let listen = match (a.tcp, a.unix) {
        (Some(addr), _) => NbdListen::Tcp(addr),
        (None, Some(path)) => NbdListen::Unix(path),
        (None, None) => unreachable!("clap requires --tcp or --unix"),
    };
    let file = a.file;
    let size = a.size;
    let dev = FileDev::open(&file, size).with_context(|| format!("open {}", file.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let server = NbdServer::bind(Arc::new(dev), listen, opts).await?;
        println!("listening on {}", server.local_addr());
        std::io::stdout().flush()?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        server
            .run(async move {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            })
            .await?;
        Ok(())
    })
}
