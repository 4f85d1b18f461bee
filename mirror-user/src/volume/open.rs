//! Building a mirrored volume from its description: the two replica specs, the secret, weights.

use std::{
    path::PathBuf,
    sync::{Arc, RwLock},
};

use super::{
    remote::RemotePool,
    replica::{Location, Replica},
    router::{Router, RouterConfig, Weights},
};
use crate::replication::{
    rate::SyncRate,
    server::{Server, ServerConfig, VolumeSpec},
};

/// Where one replica lives, as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaSpec {
    /// `local:PATH[:SIZE]`: a file or block device of this node.
    Local { path: PathBuf, size: Option<u64> },
    /// `remote:HOST:PORT`: a `mirror replica` server.
    Remote { addr: String },
}

impl ReplicaSpec {
    pub fn parse(s: &str) -> Result<ReplicaSpec, String> {
        if let Some(rest) = s.strip_prefix("local:") {
            let (path, size) = match rest.rsplit_once(':') {
                Some((p, sz)) if !sz.contains('/') => (p, Some(crate::parse_size(sz)?)),
                _ => (rest, None),
            };
            if path.is_empty() {
                return Err(format!("`{s}`: local:PATH[:SIZE] needs a path"));
            }
            Ok(ReplicaSpec::Local { path: path.into(), size })
        } else if let Some(addr) = s.strip_prefix("remote:") {
            if !addr.contains(':') {
                return Err(format!("`{s}`: remote:HOST:PORT needs a port"));
            }
            Ok(ReplicaSpec::Remote { addr: addr.into() })
        } else {
            Err(format!("`{s}`: a replica is local:PATH[:SIZE] or remote:HOST:PORT"))
        }
    }
}

/// Everything needed to open a mirrored volume.
#[derive(Debug, Clone)]
pub struct VolumeConfig {
    pub name: String,
    pub source: ReplicaSpec,
    pub target: ReplicaSpec,
    pub secret: Vec<u8>,
    /// Where the embedded replica servers of local replicas (source, target) listen; peers
    /// resync them there.
    pub local_listen: [String; 2],
    pub target_weight: u8,
    pub conns: usize,
    pub rate: SyncRate,
    /// This node's health, sent by the embedded servers of local replicas.
    pub node_health: Arc<crate::health::monitor::NodeHealth>,
}

/// An open mirrored volume: the router, and the embedded servers of local replicas.
#[derive(Debug)]
pub struct OpenVolume {
    pub router: Arc<Router>,
    pub local_servers: Vec<Server>,
}

/// Opens both replicas (connecting remote ones), checks they describe the same volume, and
/// starts the router's supervisor. Must run inside a tokio runtime.
pub async fn open(cfg: &VolumeConfig) -> anyhow::Result<OpenVolume> {
    let mut local_servers = Vec::new();
    let mut replicas = Vec::new();
    let mut sizes = Vec::new();
    for (i, (role, spec)) in [("source", &cfg.source), ("target", &cfg.target)].into_iter().enumerate() {
        let loc = match spec {
            ReplicaSpec::Local { path, size } => {
                let server = Server::start(ServerConfig {
                    listen: cfg.local_listen[i].clone(),
                    volumes: vec![VolumeSpec {
                        name: cfg.name.clone(),
                        path: path.clone(),
                        size: *size,
                        meta: None,
                        block_size: 4096,
                        direct_io: false,
                    }],
                    secret: cfg.secret.clone(),
                    rate: cfg.rate,
                    health: cfg.node_health.clone(),
                })?;
                let vol = server.volume(&cfg.name).expect("the server serves the volume it was given");
                sizes.push(vol.store.size());
                tracing::info!(role, addr = %server.addr, "local replica served to its peer");
                local_servers.push(server);
                // Buffered: the embedded replica server and sync jobs read this file through the
                // page cache, and mixing that with O_DIRECT writes can leave stale pages.
                let uring = match super::uring::UringFile::open(path, false) {
                    Ok(u) => {
                        tracing::info!(role, direct = u.is_direct(), "local replica data path: io_uring");
                        Some(Arc::new(u))
                    }
                    Err(e) => {
                        tracing::warn!(
                            role,
                            "io_uring unavailable ({e}): local replica on the blocking pool"
                        );
                        None
                    }
                };
                Location::Local {
                    vol,
                    addr: local_servers.last().map(|s| s.addr.to_string()).unwrap_or_default(),
                    uring,
                }
            }
            ReplicaSpec::Remote { addr } => {
                let (pool, size) = RemotePool::connect(addr, &cfg.name, &cfg.secret, cfg.conns)
                    .await
                    .map_err(|e| anyhow::anyhow!("{role} replica {addr}: {e}"))?;
                sizes.push(size);
                Location::Remote {
                    addr: addr.clone(),
                    volume: cfg.name.clone(),
                    secret: cfg.secret.clone(),
                    conns: cfg.conns,
                    pool: RwLock::new(Some(Arc::new(pool))),
                }
            }
        };
        replicas.push(Replica::new(role, loc, 4096));
    }
    anyhow::ensure!(
        sizes[0] == sizes[1],
        "the replicas differ in size: source {} bytes, target {} bytes",
        sizes[0],
        sizes[1]
    );
    let target = replicas.pop().expect("two replicas");
    let source = replicas.pop().expect("two replicas");
    let router = Router::new(
        source,
        target,
        sizes[0],
        Weights::new(cfg.target_weight),
        RouterConfig { secret: cfg.secret.clone(), rate: cfg.rate, ..Default::default() },
    );
    router.spawn_supervisor();
    Ok(OpenVolume { router, local_servers })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        assert_eq!(
            ReplicaSpec::parse("local:/var/a.img:1G"),
            Ok(ReplicaSpec::Local { path: "/var/a.img".into(), size: Some(1 << 30) })
        );
        assert_eq!(
            ReplicaSpec::parse("local:/dev/vdb"),
            Ok(ReplicaSpec::Local { path: "/dev/vdb".into(), size: None })
        );
        assert_eq!(
            ReplicaSpec::parse("remote:10.0.0.2:7700"),
            Ok(ReplicaSpec::Remote { addr: "10.0.0.2:7700".into() })
        );
        assert!(ReplicaSpec::parse("remote:host").is_err());
        assert!(ReplicaSpec::parse("/x").unwrap_err().contains("local:PATH"));
    }
}
