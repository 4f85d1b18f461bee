//! The node's plain facts for the health score, read with `sysinfo` (and sysfs for the
//! interface drops `sysinfo` does not count): free space of the filesystem holding the replica,
//! memory available, errors and drops on the interface towards the peer, the load average and
//! the CPU count. [`FactReader::read`] is the only I/O; what it returns is
//! [`NodeFacts`](super::score::NodeFacts), scored by the pure [`super::score`].
//!
//! - The replica's filesystem is the mounted filesystem with the longest mount point that
//!   prefixes the replica's canonical path; a replica on a block device (`/dev/...`) has none.
//! - The interface towards the peer is the one holding the local address the kernel picks for
//!   the peer (a connected UDP socket sends nothing); without a peer, every interface counts.

use std::{
    net::{IpAddr, UdpSocket},
    path::{Path, PathBuf},
    time::Instant,
};

use sysinfo::{DiskRefreshKind, Disks, MemoryRefreshKind, Networks, System};

use super::score::{FsFacts, LinkFacts, LoadFacts, MemFacts, NodeFacts};

/// Reads the facts each interval; keeps the previous interface counters for rates.
#[derive(Debug)]
pub struct FactReader {
    replica: Option<PathBuf>,
    peer: Option<IpAddr>,
    system: Option<System>,
    disks: Option<Disks>,
    networks: Option<Networks>,
    /// Interface errors plus drops (cumulative) at the previous read, and when.
    last_link: Option<(String, u64, Instant)>,
    cpus: usize,
}

/// The interface holding `local` among `(name, addresses)`.
pub fn iface_with_addr<'a>(
    ifaces: impl IntoIterator<Item = (&'a str, Vec<IpAddr>)>,
    local: IpAddr,
) -> Option<&'a str> {
    ifaces.into_iter().find(|(_, addrs)| addrs.contains(&local)).map(|(n, _)| n)
}

/// The mount point among `mounts` that holds `path`: the longest that prefixes it.
pub fn mount_of<'a>(mounts: impl IntoIterator<Item = &'a Path>, path: &Path) -> Option<&'a Path> {
    mounts.into_iter().filter(|m| path.starts_with(m)).max_by_key(|m| m.as_os_str().len())
}

/// The local address the kernel routes to `peer` from.
fn local_addr_towards(peer: IpAddr) -> Option<IpAddr> {
    let bind: IpAddr = if peer.is_ipv4() { [0, 0, 0, 0].into() } else { [0u16; 8].into() };
    let s = UdpSocket::bind((bind, 0)).ok()?;
    s.connect((peer, 9)).ok()?;
    Some(s.local_addr().ok()?.ip())
}

/// Receive and transmit drops of an interface (sysfs; `sysinfo` counts errors, not drops).
fn drops(iface: &str) -> u64 {
    ["rx_dropped", "tx_dropped"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(format!("/sys/class/net/{iface}/statistics/{f}")).ok())
        .filter_map(|t| t.trim().parse::<u64>().ok())
        .sum()
}

impl FactReader {
    /// `replica`: the replica's path (a file, or a device); `peer`: the other node.
    pub fn new(replica: Option<&Path>, peer: Option<IpAddr>) -> FactReader {
        let replica = replica.map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()));
        let on_fs = replica.as_ref().filter(|p| !p.starts_with("/dev")).cloned();
        let disks = on_fs.as_ref().and_then(|_| {
            Disks::new_with_refreshed_list_specifics(DiskRefreshKind::nothing().with_storage())
                .map_err(|e| tracing::warn!("health: no filesystem figures ({e})"))
                .ok()
        });
        FactReader {
            replica: on_fs,
            peer,
            system: System::new().map_err(|e| tracing::warn!("health: no memory figures ({e})")).ok(),
            disks,
            networks: Networks::new_with_refreshed_list()
                .map_err(|e| tracing::warn!("health: no interface figures ({e})"))
                .ok(),
            last_link: None,
            cpus: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        }
    }

    /// The facts now.
    pub fn read(&mut self) -> NodeFacts {
        NodeFacts { fs: self.fs(), memory: self.memory(), link: self.link(), load: self.load() }
    }

    fn fs(&mut self) -> Option<FsFacts> {
        let (path, disks) = (self.replica.as_ref()?, self.disks.as_mut()?);
        // New mounts appear (and old ones go) between reads: the list is refreshed each time.
        disks.refresh_specifics(true, DiskRefreshKind::nothing().with_storage());
        let mount = mount_of(disks.iter().map(sysinfo::Disk::mount_point), path)?.to_path_buf();
        let d = disks.iter().find(|d| d.mount_point() == mount)?;
        Some(FsFacts { mount, free_bytes: d.available_space(), total_bytes: d.total_space() })
    }

    fn memory(&mut self) -> Option<MemFacts> {
        let s = self.system.as_mut()?;
        s.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        Some(MemFacts { available_bytes: s.available_memory(), total_bytes: s.total_memory() })
    }

    fn load(&self) -> Option<LoadFacts> {
        let l = System::load_average().ok()?;
        Some(LoadFacts { load1: l.one, cpus: self.cpus })
    }

    fn link(&mut self) -> Option<LinkFacts> {
        let nets = self.networks.as_mut()?;
        nets.refresh(true);
        let towards = self.peer.and_then(local_addr_towards);
        let (name, errors) = if let Some(local) = towards {
            let name = iface_with_addr(
                nets.iter().filter_map(|(n, d)| {
                    Some((n.to_str()?, d.ip_networks().iter().map(|i| i.addr).collect()))
                }),
                local,
            )?
            .to_string();
            let d = nets.iter().find(|(n, _)| n.to_str() == Some(&name))?.1;
            let total = d.total_errors_on_received() + d.total_errors_on_transmitted() + drops(&name);
            (name, total)
        } else {
            let total = nets
                .iter()
                .map(|(n, d)| {
                    d.total_errors_on_received()
                        + d.total_errors_on_transmitted()
                        + n.to_str().map_or(0, drops)
                })
                .sum();
            ("all".to_string(), total)
        };
        let now = Instant::now();
        let rate = match self.last_link.replace((name.clone(), errors, now)) {
            Some((prev, before, t)) if prev == name && errors >= before => {
                (errors - before) as f64 / now.duration_since(t).as_secs_f64().max(1e-3)
            }
            // The first read, or another interface now: no rate yet.
            _ => return None,
        };
        Some(LinkFacts { iface: name, errors_per_s: rate })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_mount_point_holds_the_replica() {
        let mounts = [Path::new("/"), Path::new("/var"), Path::new("/var/lib/mirror"), Path::new("/var/l")];
        assert_eq!(mount_of(mounts, Path::new("/var/lib/mirror/v.img")), Some(Path::new("/var/lib/mirror")));
        assert_eq!(mount_of(mounts, Path::new("/var/lib/other")), Some(Path::new("/var")));
        assert_eq!(mount_of([Path::new("/srv")], Path::new("/var/x")), None);
    }

    #[test]
    fn the_interface_is_found_by_the_local_address() {
        let lo: IpAddr = [127, 0, 0, 1].into();
        let eth: IpAddr = [10, 0, 0, 1].into();
        let ifaces = || vec![("lo", vec![lo]), ("eth0", vec![eth])];
        assert_eq!(iface_with_addr(ifaces(), eth), Some("eth0"));
        assert_eq!(iface_with_addr(ifaces(), [10, 0, 0, 9].into()), None);
        assert_eq!(local_addr_towards(lo), Some(lo), "loopback routes from loopback");
    }

    #[test]
    fn this_node_has_memory_load_and_a_filesystem_under_a_file() {
        let dir = std::env::temp_dir();
        let file = dir.join(format!("facts-{}", std::process::id()));
        std::fs::write(&file, b"x").unwrap();
        let mut r = FactReader::new(Some(&file), Some([127, 0, 0, 1].into()));
        let f = r.read();
        std::fs::remove_file(&file).unwrap();
        let m = f.memory.expect("memory");
        assert!(m.total_bytes > 0 && m.available_bytes <= m.total_bytes, "{m:?}");
        assert!(f.load.expect("load").cpus >= 1);
        let fs = f.fs.expect("the temp dir's filesystem");
        assert!(fs.total_bytes > 0 && fs.free_bytes <= fs.total_bytes, "{fs:?}");
        assert!(f.link.is_none(), "no rate at the first read");
        let link = r.read().link.expect("a rate at the second read");
        assert_eq!(link.iface, "lo");
        // A device has no filesystem of its own to fill.
        assert!(FactReader::new(Some(Path::new("/dev/null")), None).read().fs.is_none());
    }
}
