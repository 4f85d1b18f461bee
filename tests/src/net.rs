//! The network of the tests: free loopback ports, and links made with iproute2 (a veth pair
//! whose far end never answers), deleted on drop.

use std::{
    net::{Ipv4Addr, TcpListener},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

/// A loopback TCP port free at the time of the call.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The body of a plain HTTP/1.0 `GET path` on `addr` (a metrics endpoint); an error unless
/// the status is 200.
pub fn http_get(addr: &str, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if head.split_whitespace().nth(1) != Some("200") {
        bail!("GET http://{addr}{path}: {head}");
    }
    Ok(body.to_string())
}

/// `127.0.0.1:PORT` with a port free at the time of the call; panics when there is none.
pub fn free_addr() -> String {
    format!("127.0.0.1:{}", free_port().expect("a free loopback port"))
}

/// Runs `ip ARGS`; the error carries its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("ip")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// A veth pair with an address on one end and a fake neighbour behind it: SYNs to the neighbour
/// go out and are never answered, so the kernel retransmits them. Deleted on drop.
#[derive(Debug)]
pub struct SilentPeer {
    link: String,
    pub peer: Ipv4Addr,
}

impl SilentPeer {
    pub fn new() -> Result<Self> {
        let n = std::process::id() % 10_000;
        let link = format!("mtel{n}");
        let peer = Ipv4Addr::new(10, 254, (n % 250) as u8, 2);
        let local = format!("10.254.{}.1/30", n % 250);
        if Command::new("ip").arg("-V").output().is_err() {
            bail!("iproute2 (ip) not installed");
        }
        let _ = Command::new("modprobe").arg("veth").stderr(Stdio::null()).status();
        ip(&["link", "add", &link, "type", "veth", "peer", "name", &format!("{link}p")])?;
        let me = SilentPeer { link, peer };
        ip(&["addr", "add", &local, "dev", &me.link])?;
        ip(&["link", "set", &me.link, "up"])?;
        ip(&[
            "neigh",
            "add",
            &peer.to_string(),
            "lladdr",
            "02:00:00:00:00:01",
            "dev",
            &me.link,
            "nud",
            "permanent",
        ])?;
        Ok(me)
    }
}

impl Drop for SilentPeer {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.link]).status();
    }
}
