//! A real etcd for the lease tests: Debian's `etcd` (package `etcd-server`) on 127.0.0.1 with free
//! ports and a temporary data directory, one member or a cluster; started, waited on until healthy
//! (a leader elected), members killed on request, and everything stopped and removed on drop.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::net::http_get;

/// One member: its URLs, its directory (data and log), its process while it runs.
#[derive(Debug)]
pub struct Member {
    pub name: String,
    pub client_url: String,
    pub peer_url: String,
    pub dir: PathBuf,
    child: Option<Child>,
}

impl Member {
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// The member's log (its stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
    }

    fn addr(&self) -> &str {
        self.client_url.trim_start_matches("http://")
    }
}

/// A running etcd cluster of one or more members.
#[derive(Debug)]
pub struct Etcd {
    pub members: Vec<Member>,
    root: PathBuf,
}

/// The `etcd` binary, if installed.
pub fn binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file())
}

impl Etcd {
    /// Starts `n` members and waits until the cluster is healthy.
    pub fn start(n: usize) -> Result<Etcd> {
        let bin = binary().context("etcd is not installed (Debian: etcd-server; `cargo xtask setup`)")?;
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.subsec_nanos();
        let root = std::env::temp_dir().join(format!("mirror-etcd-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&root)?;
        let mut members = Vec::new();
        for i in 0..n {
            members.push(Member {
                name: format!("m{i}"),
                client_url: format!("http://127.0.0.1:{}", crate::net::free_port()?),
                peer_url: format!("http://127.0.0.1:{}", crate::net::free_port()?),
                dir: root.join(format!("m{i}")),
                child: None,
            });
        }
        let cluster: Vec<String> = members.iter().map(|m| format!("{}={}", m.name, m.peer_url)).collect();
        let cluster = cluster.join(",");
        let mut etcd = Etcd { members, root };
        for m in &mut etcd.members {
            std::fs::create_dir_all(&m.dir)?;
            let log = std::fs::File::create(m.dir.join("etcd.log"))?;
            let child = Command::new(&bin)
                .args(["--name", &m.name])
                .arg("--data-dir")
                .arg(m.dir.join("data"))
                .args(["--listen-client-urls", &m.client_url, "--advertise-client-urls", &m.client_url])
                .args(["--listen-peer-urls", &m.peer_url, "--initial-advertise-peer-urls", &m.peer_url])
                .args(["--initial-cluster", &cluster, "--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", &format!("mirror-test-{nanos}")])
                // etcd's defaults (100 ms heartbeat, 1 s election): the shortest lease etcd grants
                // is 1.5 s, so the tests' 2 s TTL is honoured as asked.
                .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .with_context(|| format!("start {}", bin.display()))?;
            m.child = Some(child);
        }
        etcd.wait_healthy(Duration::from_secs(20))?;
        Ok(etcd)
    }

    /// `http://127.0.0.1:PORT` of every member (running or not).
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// The `--lease-store` URL: `etcd://127.0.0.1:P1,127.0.0.1:P2,...`.
    pub fn url(&self) -> String {
        let addrs: Vec<&str> = self.members.iter().map(Member::addr).collect();
        format!("etcd://{}", addrs.join(","))
    }

    /// Waits until every running member reports healthy (which needs an elected leader).
    pub fn wait_healthy(&mut self, limit: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            for m in &mut self.members {
                if let Some(c) = m.child.as_mut() {
                    if let Some(st) = c.try_wait()? {
                        bail!("etcd member {} exited ({st}):\n{}", m.name, m.log());
                    }
                }
            }
            let healthy = self
                .members
                .iter()
                .filter(|m| m.running())
                .all(|m| http_get(m.addr(), "/health").is_ok_and(|r| r.contains("\"health\":\"true\"")));
            if healthy {
                return Ok(());
            }
            if start.elapsed() > limit {
                let logs: Vec<String> =
                    self.members.iter().map(|m| format!("{}:\n{}", m.name, m.log())).collect();
                bail!("etcd not healthy after {limit:?}:\n{}", logs.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The index of the member that is the leader now, if one is.
    pub fn leader(&self) -> Option<usize> {
        self.members.iter().position(|m| {
            m.running()
                && http_get(m.addr(), "/metrics")
                    .is_ok_and(|r| r.lines().any(|l| l.trim() == "etcd_server_is_leader 1"))
        })
    }

    /// SIGKILLs member `i` (its data stays until drop).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}
