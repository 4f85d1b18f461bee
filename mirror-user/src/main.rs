//! `mirror`: the node daemon and its CLI. Parses the command line ([`mirror::cli::Cli`]) and
//! hands each command to its module in [`mirror::cli`]; nothing else lives here. An error is
//! printed and ends the process with its status ([`mirror::cli::exit`]).

use std::process::ExitCode;

use clap::Parser;
use mirror::cli::{exit, Cli, Command};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:?}");
            ExitCode::from(exit::status_of(&e).code())
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command {
        Command::Daemon(a) => rt.block_on(a.run()),
        Command::Top(a) => rt.block_on(a.run()),
        Command::Replica(a) => a.run(&rt),
        Command::Serve(a) => rt.block_on(a.run()),
        Command::Ublk(a) => a.run(),
        Command::Ctl(a) => rt.block_on(a.run()),
        Command::Sync(a) => a.run(),
        Command::Status(a) => a.run(),
        Command::Resolve(a) => a.run(),
        Command::Certs(a) => Ok(a.run()?),
    }
}
