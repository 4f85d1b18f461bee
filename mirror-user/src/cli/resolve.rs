//! `mirror resolve --discard`: ends a split brain by throwing away one replica's data.

use std::path::PathBuf;

use anyhow::Result;

use crate::replication::{auth::load_secret, client::Client, protocol::Message};

/// `mirror resolve` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct ResolveArgs {
    /// The replica whose writes are discarded.
    #[arg(long)]
    pub node: String,
    #[arg(long)]
    pub volume: String,
    #[arg(long, env = "MIRROR_SECRET_FILE")]
    pub secret_file: PathBuf,
    /// Required: confirms that this replica's divergent writes are thrown away.
    #[arg(long, required = true)]
    pub discard: bool,
    #[command(flatten)]
    pub transport: super::transport::TransportArgs,
}

impl ResolveArgs {
    pub fn run(self) -> Result<()> {
        let ResolveArgs { node, volume, secret_file, discard, transport } = self;
        anyhow::ensure!(discard, "--discard is required");
        let (t, to) = (transport.client()?, super::transport::peer(&node)?);
        let mut c = Client::connect_over(&t, &to, &volume, &load_secret(&secret_file)?)?;
        c.call_ok(&Message::ResolveDiscard)?;
        crate::outln!(
            "{volume} on {node}: data discarded; sync onto it from the other replica (a full, digest-compared sync)"
        );
        Ok(())
    }
}
