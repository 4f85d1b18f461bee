//! How a process's replication links are secured: [`Transport`] is TLS 1.3 with the node's
//! certificates (`--tls DIR`), or plaintext, which only loopback addresses may use unless the
//! operator says `--insecure-plaintext`. [`PeerAddr`] is a peer as the operator names it:
//! `HOST:PORT`, or `NODE@HOST:PORT` to accept only the node `NODE` there.
//!
//! Under TLS every connection of the process takes it, loopback included: replica servers
//! accept with `server-cert.pem` and ask clients for theirs (any node of the CA, or the
//! `--tls-allow` list), clients (the router's pools, heartbeats, sync jobs, the CLI) present
//! `client-cert.pem` and check the server's (any node of the CA, or the pinned `NODE`). The
//! shared secret's challenge-response still runs inside TLS, bound to the session
//! (`replication::auth`).

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use crate::tls::{
    check_node_name, ClientAuth, Credentials, Endpoint, PeerPolicy, TlsClient, TlsError, TlsServer,
};

/// A replication peer as the operator names it: `HOST:PORT`, or `NODE@HOST:PORT` when the
/// certificate there must name `NODE` (TLS only; on a plaintext link nobody proves a name).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerAddr {
    /// The node the peer's certificate must name, if pinned.
    pub node: Option<String>,
    /// Where it is dialled: `HOST:PORT`.
    pub addr: String,
}

impl PeerAddr {
    /// `addr` with no node pinned.
    pub fn any(addr: impl Into<String>) -> PeerAddr {
        PeerAddr { node: None, addr: addr.into() }
    }

    /// Parses `HOST:PORT` or `NODE@HOST:PORT` (the node a DNS name, the port present).
    pub fn parse(s: &str) -> Result<PeerAddr, String> {
        let (node, addr) = match s.split_once('@') {
            Some((n, a)) => {
                check_node_name(n).map_err(|e| format!("`{s}`: {e}"))?;
                (Some(n.to_string()), a)
            }
            None => (None, s),
        };
        let port = addr.rsplit_once(':').map(|(_, p)| p);
        if port.is_none_or(|p| p.parse::<u16>().is_err()) {
            return Err(format!("`{s}`: expected HOST:PORT or NODE@HOST:PORT"));
        }
        Ok(PeerAddr { node, addr: addr.to_string() })
    }

    /// The TLS policy for this peer's certificate.
    pub fn policy(&self) -> PeerPolicy {
        match &self.node {
            Some(n) => PeerPolicy::Nodes(vec![n.clone()]),
            None => PeerPolicy::AnyNode,
        }
    }
}

impl std::str::FromStr for PeerAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<PeerAddr, String> {
        PeerAddr::parse(s)
    }
}

impl std::fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.node {
            Some(n) => write!(f, "{n}@{}", self.addr),
            None => f.write_str(&self.addr),
        }
    }
}

/// A plaintext link to or on an address that is not loopback, without the operator's
/// `--insecure-plaintext`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{addr}` is not a loopback address: give `--tls DIR` (`tls` in --config), or `--insecure-plaintext` to send the volume's data in the clear")]
pub struct PlaintextRefused {
    pub addr: SocketAddr,
}

/// Loopback, for the plaintext rule: 127/8, ::1, and IPv4-mapped 127/8.
pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

/// A node's TLS credentials for the replication link, loaded and checked once.
#[derive(Debug)]
pub struct NodeTls {
    dir: PathBuf,
    /// Our node name (from `client-cert.pem`).
    node: String,
    client_creds: Credentials,
    /// A client accepting any node of the CA (the common case, built once).
    any: TlsClient,
    /// The accepting end, when the process listens.
    server: Option<TlsServer>,
}

impl NodeTls {
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// How replication connections are made and accepted.
#[derive(Debug, Clone)]
pub enum Transport {
    /// Plaintext, the frames authenticated by the shared secret only: loopback addresses only,
    /// unless `insecure` (`--insecure-plaintext`).
    Plain { insecure: bool },
    /// TLS 1.3 with mutual certificates, on every address.
    Tls(Arc<NodeTls>),
}

impl Default for Transport {
    /// Plaintext on loopback only.
    fn default() -> Self {
        Transport::Plain { insecure: false }
    }
}

impl Transport {
    /// A client's transport (the CLI): `dir`'s client credentials, checked at `now`.
    pub fn tls_client(dir: &Path, now: SystemTime) -> Result<Transport, TlsError> {
        Self::load(dir, None, now)
    }

    /// A node's transport (a replica server, `mirror serve`): client and server credentials
    /// from `dir`, checked at `now`; the server accepts clients `allow` admits.
    pub fn tls_node(dir: &Path, allow: PeerPolicy, now: SystemTime) -> Result<Transport, TlsError> {
        Self::load(dir, Some(allow), now)
    }

    fn load(dir: &Path, server: Option<PeerPolicy>, now: SystemTime) -> Result<Transport, TlsError> {
        let client_creds = Credentials::load(dir, Endpoint::Client, now)?;
        let any = TlsClient::new(&client_creds, PeerPolicy::AnyNode)?;
        let node = client_creds.info().node_name().unwrap_or_default().to_string();
        let server = match server {
            Some(allow) => Some(TlsServer::from_dir(dir, ClientAuth::Required(allow), now)?),
            None => None,
        };
        Ok(Transport::Tls(Arc::new(NodeTls { dir: dir.to_path_buf(), node, client_creds, any, server })))
    }

    /// From the flags: `--tls DIR` (a node when `allow` is given) or plaintext
    /// (`--insecure-plaintext` allowing it beyond loopback).
    pub fn from_flags(
        tls: Option<&Path>,
        insecure_plaintext: bool,
        allow: Option<PeerPolicy>,
    ) -> Result<Transport, TlsError> {
        match tls {
            Some(dir) => Self::load(dir, allow, SystemTime::now()),
            None => Ok(Transport::Plain { insecure: insecure_plaintext }),
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Transport::Tls(_))
    }

    /// Our node name, under TLS.
    pub fn node(&self) -> Option<&str> {
        match self {
            Transport::Tls(t) => Some(&t.node),
            Transport::Plain { .. } => None,
        }
    }

    /// The TLS client for `peer` (its policy pinned to its node, if named); `None` in plaintext.
    pub fn client_for(&self, peer: &PeerAddr) -> Result<Option<TlsClient>, TlsError> {
        match self {
            Transport::Plain { .. } => Ok(None),
            Transport::Tls(t) => match &peer.node {
                None => Ok(Some(t.any.clone())),
                Some(_) => Ok(Some(TlsClient::new(&t.client_creds, peer.policy())?)),
            },
        }
    }

    /// The accepting end, under TLS (`None` in plaintext, or for a client-only transport).
    pub fn server(&self) -> Option<&TlsServer> {
        match self {
            Transport::Tls(t) => t.server.as_ref(),
            Transport::Plain { .. } => None,
        }
    }

    /// Whether plaintext may be used with `addr` (always under TLS: it is not plaintext).
    pub fn check(&self, addr: SocketAddr) -> Result<(), PlaintextRefused> {
        match self {
            Transport::Plain { insecure: false } if !is_loopback(addr.ip()) => Err(PlaintextRefused { addr }),
            _ => Ok(()),
        }
    }

    /// How this transport shows in logs: `tls (node NAME)` or `plaintext`.
    pub fn describe(&self) -> String {
        match self {
            Transport::Tls(t) => format!("tls (node {}, {})", t.node, t.dir.display()),
            Transport::Plain { insecure: true } => "plaintext (--insecure-plaintext)".into(),
            Transport::Plain { insecure: false } => "plaintext (loopback only)".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse_with_and_without_a_node() {
        assert_eq!(PeerAddr::parse("10.0.0.2:7700"), Ok(PeerAddr::any("10.0.0.2:7700")));
        let p = PeerAddr::parse("node-b@10.0.0.2:7700").unwrap();
        assert_eq!((p.node.as_deref(), p.addr.as_str()), (Some("node-b"), "10.0.0.2:7700"));
        assert_eq!(p.to_string(), "node-b@10.0.0.2:7700");
        assert_eq!(p.policy(), PeerPolicy::Nodes(vec!["node-b".into()]));
        assert_eq!(PeerAddr::parse("[::1]:7700").unwrap().addr, "[::1]:7700");
        assert_eq!(PeerAddr::parse("host.example:1").unwrap().addr, "host.example:1");
        for bad in ["10.0.0.2", "node@10.0.0.2", "no de@h:1", "1.2.3.4@h:1", "h:port"] {
            assert!(PeerAddr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn plaintext_is_for_loopback_unless_insecure() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let plain = Transport::default();
        assert!(plain.check(a("127.0.0.1:7700")).is_ok());
        assert!(plain.check(a("127.0.0.2:7700")).is_ok());
        assert!(plain.check(a("[::1]:7700")).is_ok());
        assert!(plain.check(a("[::ffff:127.0.0.1]:7700")).is_ok());
        let e = plain.check(a("10.0.0.2:7700")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "`10.0.0.2:7700` is not a loopback address: give `--tls DIR` (`tls` in --config), or `--insecure-plaintext` to send the volume's data in the clear"
        );
        assert!(plain.check(a("0.0.0.0:7700")).is_err(), "a wildcard listener reaches the network");
        assert!(Transport::Plain { insecure: true }.check(a("10.0.0.2:7700")).is_ok());
    }
}
