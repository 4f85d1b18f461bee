//! A node on a real network: a network namespace of its own, joined to the host's namespace by
//! a veth pair with addresses of the test's own (10.R.N.0/30), so the replication link between
//! a process in the host namespace and one inside is a real link the kernel routes, queues and
//! drops on. [`NodeNs::blackhole`] drops everything on both ends of the link (tc's `blackhole`
//! qdisc, as a partition would: TCP retransmits into the void), [`NodeNs::heal`] removes it;
//! [`NodeNs::netem`] adds delay / jitter / loss where the kernel has `sch_netem` (the host
//! kernel of these machines has not, the VM's has: there it fails and the caller skips).
//! Everything is removed on drop.

use std::{net::Ipv4Addr, process::Command};

use anyhow::{bail, Context, Result};

use crate::net::ip;

/// Runs `tc ARGS`; the error carries its stderr.
pub fn tc(args: &[&str]) -> Result<()> {
    let out = Command::new("tc").args(args).output().context("tc")?;
    if !out.status.success() {
        bail!("tc {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Why namespaces cannot be made here, if they cannot (not root, no iproute2 or tc).
pub fn unavailable() -> Option<String> {
    if !crate::env::is_root() {
        return Some("network namespaces need root".into());
    }
    for tool in ["ip", "tc"] {
        if crate::env::which(tool).is_none() {
            return Some(format!("{tool} is not installed (Debian: iproute2)"));
        }
    }
    None
}

/// A network namespace joined to the host's by a veth pair; deleted on drop.
#[derive(Debug)]
pub struct NodeNs {
    /// The namespace's name (`ip netns exec NAME ...`).
    pub name: String,
    /// The veth end in the host namespace, and the one inside.
    pub host_if: String,
    pub node_if: String,
    /// Addresses of the two ends.
    pub host_ip: Ipv4Addr,
    pub node_ip: Ipv4Addr,
}

impl NodeNs {
    /// Creates namespace `mirror-TAG-PID` with a veth pair (10.250.N.1 on the host side,
    /// 10.250.N.2 inside, N from the pid and `index`), both ends and the namespace's loopback up.
    pub fn new(tag: &str, index: u8) -> Result<NodeNs> {
        let n = ((std::process::id() as usize * 7 + usize::from(index)) % 250) as u8;
        let id = format!("{}{}", std::process::id() % 100_000, index);
        let me = NodeNs {
            name: format!("mirror-{tag}-{id}"),
            host_if: format!("mh{id}"),
            node_if: format!("mn{id}"),
            host_ip: Ipv4Addr::new(10, 250, n, 1),
            node_ip: Ipv4Addr::new(10, 250, n, 2),
        };
        ip(&["netns", "add", &me.name])?;
        // From here on, drop cleans up whatever was made.
        ip(&["link", "add", &me.host_if, "type", "veth", "peer", "name", &me.node_if])?;
        ip(&["link", "set", &me.node_if, "netns", &me.name])?;
        ip(&["addr", "add", &format!("{}/30", me.host_ip), "dev", &me.host_if])?;
        ip(&["link", "set", &me.host_if, "up"])?;
        me.ip_in(&["addr", "add", &format!("{}/30", me.node_ip), "dev", &me.node_if])?;
        me.ip_in(&["link", "set", &me.node_if, "up"])?;
        me.ip_in(&["link", "set", "lo", "up"])?;
        Ok(me)
    }

    /// `ip ARGS` inside the namespace.
    pub fn ip_in(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// The command prefix that runs a program inside the namespace.
    pub fn prefix(&self) -> Vec<String> {
        ["ip", "netns", "exec", &self.name].map(String::from).to_vec()
    }

    /// `tc ARGS` on the host end and on the node end.
    fn tc_both(&self, args: &[&str]) -> Result<()> {
        let mut host = vec!["qdisc"];
        host.extend_from_slice(args);
        let mut h = host.clone();
        h.splice(2..2, ["dev", self.host_if.as_str()]);
        tc(&h)?;
        let mut n = vec!["-n", self.name.as_str()];
        n.extend_from_slice(&host);
        n.splice(4..4, ["dev", self.node_if.as_str()]);
        tc(&n)
    }

    /// Drops every packet on the link, both ways (a partition).
    pub fn blackhole(&self) -> Result<()> {
        self.tc_both(&["replace", "root", "blackhole"])
    }

    /// Adds netem with these parameters (e.g. `["delay", "500us"]`) on both ends.
    pub fn netem(&self, params: &[&str]) -> Result<()> {
        let mut args = vec!["replace", "root", "netem"];
        args.extend_from_slice(params);
        self.tc_both(&args)
    }

    /// Back to the default qdisc on both ends.
    pub fn heal(&self) -> Result<()> {
        self.tc_both(&["del", "root"])
    }
}

impl Drop for NodeNs {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth end inside it, and with it the pair.
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .stderr(std::process::Stdio::null())
            .status();
    }
}
