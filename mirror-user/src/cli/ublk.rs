//! `mirror ublk list|del`: the kernel's ublk devices, and deleting one a killed daemon left.

use anyhow::Result;

use crate::frontend::ublk;

/// `mirror ublk` subcommands.
#[derive(clap::Args, Debug, Clone)]
pub struct UblkArgs {
    #[command(subcommand)]
    pub cmd: UblkCmd,
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum UblkCmd {
    /// One line per device: id, state, queues, depth, block device.
    List {
        /// A JSON array instead, an object per device (`id`, `block_device`, `state`,
        /// `queues`, `depth`, `pid`; `error` in their place when the device cannot be read).
        #[arg(long)]
        json: bool,
    },
    /// Delete device N (stop it first when live).
    Del { id: i32 },
}

impl UblkArgs {
    pub fn run(self) -> Result<()> {
        match self.cmd {
            UblkCmd::List { json: true } => {
                crate::outln!("{}", serde_json::to_string_pretty(&ublk::list()?)?);
            }
            UblkCmd::List { json: false } => {
                for d in ublk::list()? {
                    crate::outln!("{d}");
                }
            }
            UblkCmd::Del { id } => {
                ublk::delete(id)?;
                crate::outln!("ublk device {id} deleted");
            }
        }
        Ok(())
    }
}
