//! `mirror status`: one replica's volume status as its server reports it (JSON).

use std::path::PathBuf;

use anyhow::Result;

use crate::replication::{auth::load_secret, client::Client, protocol::Message};

/// `mirror status` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct StatusArgs {
    #[arg(long)]
    pub node: String,
    #[arg(long)]
    pub volume: String,
    #[arg(long, env = "MIRROR_SECRET_FILE")]
    pub secret_file: PathBuf,
    /// Print JSON. (The status is always printed as JSON; the flag is accepted so that a
    /// script can pass `--json` to every command that prints state.)
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub transport: super::transport::TransportArgs,
}

impl StatusArgs {
    pub fn run(self) -> Result<()> {
        let (t, node) = (self.transport.client()?, super::transport::peer(&self.node)?);
        let mut c = Client::connect_over(&t, &node, &self.volume, &load_secret(&self.secret_file)?)?;
        crate::outln!("{}", serde_json::to_string_pretty(&c.json(&Message::Status)?)?);
        Ok(())
    }
}
