//! `nbd_file --file PATH [--size N] (--tcp ADDR | --unix PATH) [--name NAME] [--read-only]`:
//! serves one file over NBD with `FileDev` (a test and baseline tool). Prints
//! `listening on ADDR` once bound, then serves until SIGINT / SIGTERM.

use std::{io::Write, path::PathBuf, sync::Arc};

use anyhow::{bail, Context, Result};
use mirror::{
    frontend::nbd::{NbdListen, NbdOptions, NbdServer},
    volume::file::FileDev,
};

const USAGE: &str =
    "usage: nbd_file --file PATH [--size N] (--tcp ADDR | --unix PATH) [--name NAME] [--read-only]";

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut file: Option<PathBuf> = None;
    let mut size = None;
    let mut listen = None;
    let mut opts = NbdOptions::default();
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        if k == "--read-only" {
            opts.read_only = true;
            continue;
        }
        if k == "--help" || k == "-h" {
            println!("{USAGE}");
            return Ok(());
        }
        let v = it.next().with_context(|| format!("{k} needs a value\n{USAGE}"))?;
        match k.as_str() {
            "--file" => file = Some(v.into()),
            "--size" => size = Some(mirror::parse_size(&v).map_err(anyhow::Error::msg)?),
            "--tcp" => listen = Some(NbdListen::Tcp(v.parse().with_context(|| format!("--tcp {v}"))?)),
            "--unix" => listen = Some(NbdListen::Unix(v.into())),
            "--name" => opts.export_name = v,
            _ => bail!("unknown flag {k}\n{USAGE}"),
        }
    }
    let (Some(file), Some(listen)) = (file, listen) else {
        bail!("--file and --tcp or --unix are required\n{USAGE}")
    };
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
