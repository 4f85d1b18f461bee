//! Building a mirrored volume from its description: the two replica specs, the secret, weights.

use std::{path::PathBuf, sync::Arc};

use super::{
    error::ReplicaError,
    local::LocalReplica,
    remote::{RemotePool, RemoteReplica},
    replica::{Location, Replica},
    router::{Router, RouterConfig, Weights},
};
use crate::{
    replication::{
        rate::SyncRate,
        server::{Server, ServerConfig},
        transport::{PeerAddr, Transport},
    },
    storage::{
        meta::{plan, SyncPlan},
        GenInfo, VolumeSpec, VolumeStatus,
    },
};

/// Where one replica lives, as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaSpec {
    /// `local:PATH[:SIZE]`: a file or block device of this node.
    Local { path: PathBuf, size: Option<u64> },
    /// `remote:HOST:PORT`: a `mirror replica` server; `remote:NODE@HOST:PORT` accepts only the
    /// node `NODE`'s certificate there (TLS).
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
            PeerAddr::parse(addr)?;
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
    /// When a write stops waiting for a lagging replica (`volume::deadline`).
    pub write_deadline: super::deadline::DeadlineConfig,
    /// The bound of the activity log's hot set (`--al-extents`, `volume::activity`).
    pub al_extents: usize,
    /// This node's health, sent by the embedded servers of local replicas.
    pub node_health: Arc<crate::health::monitor::NodeHealth>,
    /// Start from one replica when the other cannot be reached, although the reachable one's
    /// metadata does not show the other as behind (the operator vouches that the missing one
    /// holds no newer writes; if it does, the split brain is refused when it returns).
    pub allow_degraded: bool,
    /// Two replicas that were never synced are declared identical (the operator's word, like
    /// `mdadm --assume-clean` on zeroed disks) instead of a full initial sync.
    pub assume_clean: bool,
    /// Hold the volume's lease (embedded at the replicas) and write at its epoch; `None`: no
    /// lease, no fencing (a lone router, the router's own tests).
    pub lease: Option<super::lease::LeaseOptions>,
    /// TLS or plaintext, for the embedded servers, the remote pools, heartbeats and sync jobs.
    pub transport: Transport,
}

/// What a replica's metadata says, as its status reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Standing {
    pub gen: GenInfo,
    /// Blocks it has that its peer may lack.
    pub dirty_bits: u64,
    /// Degraded or syncing: it records every write.
    pub tracking: bool,
}

impl From<&VolumeStatus> for Standing {
    fn from(st: &VolumeStatus) -> Standing {
        Standing {
            gen: st.generation,
            dirty_bits: st.dirty_bytes / u64::from(st.block_size.max(1)),
            tracking: st.tracking,
        }
    }
}

/// How a router starts on two reachable replicas (index 0 = source, 1 = target).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartPlan {
    /// Same generation, nothing dirty on either side (or `--assume-clean` on a never-synced
    /// pair): both serve reads.
    InSync,
    /// Replica `stale` lacks writes the other holds (it was away, a sync onto it was cut, or it
    /// was never synced): it serves no reads until the other has resynced it.
    Resync { stale: usize, why: String },
    /// Neither may be brought up to date from the other automatically (split brain).
    Refuse(String),
}

/// Decides how to start from the two replicas' metadata. Pure.
pub fn start_plan(s: &Standing, t: &Standing, assume_clean: bool) -> StartPlan {
    // Fresh metadata: no generation, no interrupted sync, nothing recorded.
    let never = |x: &Standing| x.gen.current == 0 && x.gen.sync_source == 0 && x.dirty_bits == 0;
    if never(s) && never(t) {
        return if assume_clean {
            StartPlan::InSync
        } else {
            StartPlan::Resync {
                stale: 1,
                why: "the replicas were never synced: initial full sync from the source (compares \
                      every block, sends what differs; `--assume-clean` skips it for replicas \
                      known identical)"
                    .into(),
            }
        };
    }
    let from_s = plan(&s.gen, s.dirty_bits, &t.gen);
    let from_t = plan(&t.gen, t.dirty_bits, &s.gen);
    let pushes = |p: &SyncPlan| matches!(p, SyncPlan::Resync | SyncPlan::Full);
    match (&from_s, &from_t) {
        (SyncPlan::UpToDate, SyncPlan::UpToDate) => StartPlan::InSync,
        // Both record blocks at the same generation: write intent of routers that died (a side
        // that went on alone would have started a generation of its own). A resync from the
        // source sends the union of both bitmaps, which leaves them identical.
        (SyncPlan::Resync, SyncPlan::Resync) if s.gen.current == t.gen.current => StartPlan::Resync {
            stale: 1,
            why: format!(
                "both replicas record blocks written when a router stopped uncleanly (source {}, \
                 target {}): resync of their union from the source",
                s.dirty_bits, t.dirty_bits
            ),
        },
        (p, _) if pushes(p) => StartPlan::Resync { stale: 1, why: resync_why(t, &from_s, "source") },
        (_, p) if pushes(p) => StartPlan::Resync { stale: 0, why: resync_why(s, &from_t, "target") },
        (SyncPlan::Refuse(a), SyncPlan::Refuse(_)) => StartPlan::Refuse(a.clone()),
        (SyncPlan::Refuse(a), _) | (_, SyncPlan::Refuse(a)) => StartPlan::Refuse(a.clone()),
        _ => StartPlan::InSync,
    }
}

fn resync_why(stale: &Standing, p: &SyncPlan, from: &str) -> String {
    match p {
        SyncPlan::Full => format!("it holds no generation the {from} vouches for: full sync from the {from}"),
        _ if !stale.gen.consistent => format!("a sync onto it was cut short: resuming it from the {from}"),
        _ => format!("it is behind the {from} (missed writes while away): resync from the {from}"),
    }
}

/// An open mirrored volume: the router, the embedded servers of local replicas, and the lease.
#[derive(Debug)]
pub struct OpenVolume {
    pub router: Arc<Router>,
    pub local_servers: Vec<Server>,
    pub lease: Option<super::lease::Keeper>,
}

/// Opens both replicas (connecting remote ones), checks they describe the same volume, decides
/// from their metadata whether they are in sync ([`start_plan`]: a stale or never-synced one
/// serves no reads until resynced; a split brain is refused), starts without an unreachable
/// replica when that is safe (or allowed), and starts the router's supervisor. Must run inside a
/// tokio runtime.
pub async fn open(cfg: &VolumeConfig) -> anyhow::Result<OpenVolume> {
    let mut local_servers = Vec::new();
    let mut replicas = Vec::new();
    let mut sizes = Vec::new();
    let mut missing: Option<(usize, String)> = None;
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
                    transport: cfg.transport.clone(),
                })?;
                let vol = server.volume(&cfg.name).expect("the server serves the volume it was given");
                sizes.push(vol.size());
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
                let addr = local_servers.last().map(|s| s.addr.to_string()).unwrap_or_default();
                Location::Local(LocalReplica::new(vol, addr, uring).with_transport(cfg.transport.clone()))
            }
            ReplicaSpec::Remote { addr } => {
                // Not attached yet: the lease is taken below, and attaches the pool then.
                let pool = match RemotePool::connect_over(
                    &cfg.transport,
                    addr,
                    &cfg.name,
                    &cfg.secret,
                    cfg.conns,
                    None,
                )
                .await
                {
                    Ok((pool, size)) => {
                        sizes.push(size);
                        Some(pool)
                    }
                    // Refusals (wrong secret, volume, version) are configuration errors; an
                    // unreachable node may be started without (below).
                    Err(e) if missing.is_none() && e.is_unreachable() => {
                        missing = Some((i, format!("{role} replica {e}")));
                        None
                    }
                    Err(e) => anyhow::bail!("{role} replica {addr}: {e}"),
                };
                Location::Remote(
                    RemoteReplica::new(addr, &cfg.name, &cfg.secret, cfg.conns, pool)
                        .with_transport(cfg.transport.clone()),
                )
            }
        };
        replicas.push(Replica::new(role, loc, 4096));
    }
    anyhow::ensure!(
        sizes.len() < 2 || sizes[0] == sizes[1],
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
        RouterConfig {
            secret: cfg.secret.clone(),
            rate: cfg.rate,
            write_deadline: cfg.write_deadline,
            al_extents: cfg.al_extents,
            ..Default::default()
        },
    );
    let lease = match &cfg.lease {
        Some(l) if matches!(l.backend, super::lease::LeaseBackend::Etcd(_)) => {
            // etcd decides a take without one replica (`lease::take`: no mark, or the reachable
            // one marked as holding every acknowledged write), unless the operator forces it.
            let o = super::lease::LeaseOptions { force: l.force || cfg.allow_degraded, ..l.clone() };
            Some(super::lease::take(&router, &cfg.name, &o).await?)
        }
        Some(l) => {
            // Without one replica the lease is taken on the rule of starting degraded (the
            // operator's `--degraded` / `--force`, or a survivor that knows the other is behind);
            // otherwise `reconcile` refuses below, before any write.
            let force = match &missing {
                Some((i, _)) => {
                    let survivor = router.replicas[1 - i].status().await.is_ok_and(|s| s.tracking);
                    l.force || cfg.allow_degraded || survivor
                }
                None => false,
            };
            if missing.is_none() || force {
                let o = super::lease::LeaseOptions { force, ..l.clone() };
                Some(super::lease::take(&router, &cfg.name, &o).await?)
            } else {
                None
            }
        }
        None => None,
    };
    if lease.is_some() && missing.is_none() {
        // A standby took the lease long after it connected: a replica may have gone since.
        missing = gone_since(&router).await;
    }
    reconcile(&router, missing, cfg, lease.as_ref()).await?;
    anyhow::ensure!(cfg.lease.is_none() || lease.is_some(), "volume {}: the lease was not taken", cfg.name);
    // Started in sync: a mark a previous holder left in the lease store is stale now.
    router.clear_mark_if_in_sync().await;
    router.spawn_supervisor();
    Ok(OpenVolume { router, local_servers, lease })
}

/// A remote replica whose connections broke since they were made, and that cannot be reached
/// again now (the first such; both gone is for `reconcile` to refuse).
async fn gone_since(router: &Router) -> Option<(usize, String)> {
    for (i, r) in router.replicas.iter().enumerate() {
        if r.is_local() || !r.connection_broken() {
            continue;
        }
        match r.connect().await {
            Ok(_) => {}
            Err(e) if e.is_unreachable() => return Some((i, format!("{} replica {e}", r.role))),
            Err(e) => return Some((i, format!("{} replica: {e}", r.role))),
        }
    }
    None
}

/// Brings the router's view of the replicas in line with their metadata before any I/O. Without
/// one replica, the survivor serves alone only if its metadata is consistent and there is
/// evidence that it holds every acknowledged write: it tracks (it knows the other is behind), the
/// operator said so (`--degraded`, `--force`), or, in the etcd mode, the lease store's verdict
/// (no mark, or the survivor is the one marked current: [`super::lease::Keeper::vouches_alone`]).
async fn reconcile(
    router: &Router,
    missing: Option<(usize, String)>,
    cfg: &VolumeConfig,
    lease: Option<&super::lease::Keeper>,
) -> anyhow::Result<()> {
    let role = |i: usize| router.replicas[i].role;
    let standing = |st: Result<VolumeStatus, ReplicaError>, i: usize| -> anyhow::Result<Standing> {
        let st = st.map_err(|e| anyhow::anyhow!("{} replica status: {e}", role(i)))?;
        Ok(Standing::from(&st))
    };
    if let Some((i, why)) = missing {
        let s = 1 - i;
        let survivor = standing(router.replicas[s].status().await, s)?;
        anyhow::ensure!(
            survivor.gen.consistent,
            "{why}, and the {} replica is inconsistent (a sync onto it was cut short): it cannot \
             serve alone; bring the {} back",
            role(s),
            role(i)
        );
        let forced = cfg.allow_degraded || cfg.lease.as_ref().is_some_and(|l| l.force);
        let etcd = matches!(lease, Some(super::lease::Keeper::Etcd(_)));
        if etcd && !forced {
            // etcd's word, not the survivor's tracking: a survivor that tracks may still lack
            // writes the other took later (marked in etcd).
            let verdict = match lease {
                Some(k) => k.vouches_alone(&router.replicas[s], &router.replicas[i]).await,
                None => Ok(()),
            };
            if let Err(e) = verdict {
                anyhow::bail!("{why}, and {e}");
            }
            tracing::info!("{why}: the lease store vouches for the {} replica alone", role(s));
        } else if !survivor.tracking && !cfg.allow_degraded {
            anyhow::bail!(
                "{why}. The {} replica's metadata does not show the {} as behind, so the {} may hold \
                 writes the {} lacks (made through another router). Bring it back, or start with \
                 `--degraded` to serve from the {} alone: its writes are recorded and resynced when \
                 the {} returns (a {} with writes of its own is then refused as split brain, never \
                 overwritten)",
                role(s),
                role(i),
                role(i),
                role(s),
                role(s),
                role(i),
                role(i)
            );
        }
        tracing::warn!(
            "{why}: serving from the {} replica alone; it records every write for the resync",
            role(s)
        );
        router.start_without(i, &why).await?;
        return Ok(());
    }
    let (s, t) = tokio::join!(router.replicas[0].status(), router.replicas[1].status());
    let (s, t) = (standing(s, 0)?, standing(t, 1)?);
    match start_plan(&s, &t, cfg.assume_clean) {
        StartPlan::InSync => {
            if cfg.assume_clean && s.gen.current == 0 {
                tracing::warn!("--assume-clean: the never-synced replicas are taken as identical");
            }
            Ok(())
        }
        StartPlan::Resync { stale, why } => {
            tracing::warn!(
                replica = role(stale),
                "the {} replica serves no reads until resynced: {why}",
                role(stale)
            );
            router
                .start_resync(stale)
                .await
                .map_err(|e| anyhow::anyhow!("starting the resync of the {} replica: {e}", role(stale)))
        }
        StartPlan::Refuse(why) => anyhow::bail!("refusing to serve the volume: {why}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn standing(current: u64, history: &[u64], dirty_bits: u64) -> Standing {
        let mut h = [0u64; crate::storage::HISTORY];
        h[..history.len()].copy_from_slice(history);
        Standing {
            // Fresh metadata (generation 0) is not "consistent": nobody vouches for its data.
            gen: GenInfo { current, history: h, consistent: current != 0, sync_source: 0 },
            dirty_bits,
            tracking: dirty_bits > 0,
        }
    }

    #[test]
    fn start_plans_from_metadata() {
        let fresh = standing(0, &[], 0);
        // Never synced: a full initial sync onto the target, unless declared identical.
        assert!(matches!(start_plan(&fresh, &fresh, false), StartPlan::Resync { stale: 1, .. }));
        assert_eq!(start_plan(&fresh, &fresh, true), StartPlan::InSync);
        // In sync.
        let g = standing(7, &[3], 0);
        assert_eq!(start_plan(&g, &g, false), StartPlan::InSync);
        // The source went on alone (new generation 9 after 7, writes recorded): the target is
        // stale, whatever --assume-clean says.
        let s = standing(9, &[7, 3], 12);
        assert!(matches!(start_plan(&s, &g, true), StartPlan::Resync { stale: 1, .. }));
        // The target went on alone: the source is the stale one.
        assert!(matches!(start_plan(&g, &s, false), StartPlan::Resync { stale: 0, .. }));
        // A sync onto the target was cut short: resume it.
        let mut cut = g.clone();
        cut.gen.consistent = false;
        cut.gen.sync_source = 9;
        assert!(matches!(start_plan(&s, &cut, false), StartPlan::Resync { stale: 1, .. }));
        // Same generation, bits on the source only: write intent left by a router that died.
        let d = standing(7, &[3], 4);
        assert!(matches!(start_plan(&d, &g, false), StartPlan::Resync { stale: 1, .. }));
        // ... on the target only (roles swapped since): the source is resynced from it.
        assert!(matches!(start_plan(&g, &d, false), StartPlan::Resync { stale: 0, .. }));
        // Both went on alone: split brain.
        let other = standing(11, &[7, 3], 5);
        assert!(matches!(start_plan(&s, &other, false), StartPlan::Refuse(m) if m.contains("split brain")));
        // Same generation, bits on both: the union from the source.
        assert!(matches!(start_plan(&d, &d, false), StartPlan::Resync { stale: 1, .. }));
        // A replica with data nobody vouches for (discarded) gets a full sync.
        assert!(matches!(start_plan(&g, &fresh, false), StartPlan::Resync { stale: 1, .. }));
    }

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
