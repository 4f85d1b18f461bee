//! The replication link's flags, shared by every command that listens or connects for
//! replication (`replica`, `serve`, `sync`, `status`, `resolve`): `--tls DIR` makes every such
//! link of the process TLS 1.3 with the node's certificates; without it links are plaintext,
//! which only loopback addresses may use unless `--insecure-plaintext` says otherwise.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::{
    replication::transport::{PeerAddr, Transport},
    tls::PeerPolicy,
};

/// `--tls DIR`, `--insecure-plaintext`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TransportArgs {
    /// TLS credentials directory (ca-cert.pem, server-*.pem, client-*.pem, as `mirror certs node`
    /// writes it): TLS 1.3 with mutual certificates on every replication link of this process,
    /// loopback included.
    #[arg(long = "tls", value_name = "DIR", env = "MIRROR_TLS_DIR")]
    pub tls: Option<PathBuf>,
    /// Send the volume's data in the clear to and on addresses that are not loopback (without
    /// --tls, a non-loopback replication address is refused).
    #[arg(long, conflicts_with = "tls")]
    pub insecure_plaintext: bool,
    /// `tls` came from the config file (errors name the key, not the flag).
    #[arg(skip)]
    pub from_file: bool,
}

impl TransportArgs {
    /// The flags over a config file's `tls` and `insecure_plaintext`: `--tls` (or
    /// `MIRROR_TLS_DIR`) replaces the file's directory, and `--insecure-plaintext` turns the
    /// file's TLS off for this start; without either flag the file decides.
    #[must_use]
    pub fn over_file(&self, tls: Option<&Path>, insecure_plaintext: bool) -> TransportArgs {
        if self.tls.is_some() || self.insecure_plaintext {
            return self.clone();
        }
        TransportArgs { tls: tls.map(Path::to_path_buf), insecure_plaintext, from_file: tls.is_some() }
    }

    /// A connecting end's transport (the CLI's commands).
    pub fn client(&self) -> Result<Transport> {
        self.load(None)
    }

    /// A node's transport (it listens too): its server accepts the nodes `allow` names, any node
    /// of the CA when empty.
    pub fn node(&self, allow: &[String]) -> Result<Transport> {
        let policy = if allow.is_empty() { PeerPolicy::AnyNode } else { PeerPolicy::Nodes(allow.to_vec()) };
        self.load(Some(policy))
    }

    fn load(&self, allow: Option<PeerPolicy>) -> Result<Transport> {
        let t = Transport::from_flags(self.tls.as_deref(), self.insecure_plaintext, allow);
        match &self.tls {
            Some(dir) if self.from_file => {
                t.with_context(|| format!("tls = {:?} (config)", dir.display().to_string()))
            }
            Some(dir) => t.with_context(|| format!("--tls {}", dir.display())),
            None => Ok(t?),
        }
    }
}

/// Parses `--node`: `HOST:PORT` or `NODE@HOST:PORT`.
pub fn peer(s: &str) -> Result<PeerAddr> {
    PeerAddr::parse(s).map_err(anyhow::Error::msg)
}
