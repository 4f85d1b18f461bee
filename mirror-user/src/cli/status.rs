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
}

impl StatusArgs {
    pub fn run(self) -> Result<()> {
        let mut c = Client::connect(&self.node, &self.volume, &load_secret(&self.secret_file)?)?;
        println!("{}", serde_json::to_string_pretty(&c.json(&Message::Status)?)?);
        Ok(())
    }
}
