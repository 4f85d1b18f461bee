//! Issuing certificates (rcgen, ECDSA P-256): a CA, and for each node a server and a client
//! certificate signed by it, with the extensions qemu's `tls-creds-x509` sanity check asks for
//! (CA: basic constraint CA, key usage certificate and CRL signing; node: digital signature and
//! key encipherment, extended key usage TLS server / TLS client, as qemu's documented certtool
//! templates have them).
//!
//! A node's certificates carry its name as common name and DNS name: that is the identity the
//! handshake reports and checks. The server certificate also names the addresses and host names
//! clients dial (`--ip`, `--dns`): qemu's and libnbd's clients check those like a browser does.

use std::{
    net::IpAddr,
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};

use super::{error::TlsError, verify::check_node_name};

/// How far a new certificate's validity starts in the past, so that a peer whose clock is a
/// little behind accepts it at once.
pub const BACKDATE: Duration = Duration::from_hours(1);

/// A certificate's validity period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Validity {
    /// From [`BACKDATE`] before `now` until `days` days after `now`.
    pub fn days_from(now: SystemTime, days: u32) -> Validity {
        Validity {
            not_before: now - BACKDATE,
            not_after: now + Duration::from_secs(u64::from(days) * 86_400),
        }
    }
}

/// A certificate and its private key, PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// What goes into a node's certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    /// The node's name (a DNS name): its identity.
    pub name: String,
    /// Addresses clients reach the node's servers at.
    pub ips: Vec<IpAddr>,
    /// Further host names clients reach the node's servers by.
    pub dns: Vec<String>,
}

/// A node's two certificates.
#[derive(Debug, Clone)]
pub struct NodeCerts {
    pub server: Issued,
    pub client: Issued,
}

/// Errors issuing certificates.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IssueError {
    #[error(transparent)]
    Name(#[from] TlsError),
    #[error("the CA certificate or key cannot be used for signing: {0}")]
    Ca(rcgen::Error),
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

fn params(common_name: &str, validity: Validity) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    p.distinguished_name = dn;
    p.not_before = validity.not_before.into();
    p.not_after = validity.not_after.into();
    p
}

/// A new self-signed CA named `name`.
pub fn new_ca(name: &str, validity: Validity) -> Result<Issued, IssueError> {
    let key = KeyPair::generate()?;
    let mut p = params(name, validity);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = p.self_signed(&key)?;
    Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// A node's server and client certificates, signed by the CA given as PEM.
pub fn new_node(ca: &Issued, spec: &NodeSpec, validity: Validity) -> Result<NodeCerts, IssueError> {
    check_node_name(&spec.name)?;
    for d in &spec.dns {
        check_node_name(d)?;
    }
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(IssueError::Ca)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key).map_err(IssueError::Ca)?;
    let dns = |n: &str| -> Result<SanType, IssueError> { Ok(SanType::DnsName(n.try_into()?)) };
    let leaf = |purpose: ExtendedKeyUsagePurpose, sans: Vec<SanType>| -> Result<Issued, IssueError> {
        let key = KeyPair::generate()?;
        let mut p = params(&spec.name, validity);
        p.subject_alt_names = sans;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        p.extended_key_usages = vec![purpose];
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(&key, &issuer)?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    };
    let mut server_sans = vec![dns(&spec.name)?];
    for d in spec.dns.iter().filter(|d| **d != spec.name) {
        server_sans.push(dns(d)?);
    }
    server_sans.extend(spec.ips.iter().map(|ip| SanType::IpAddress(*ip)));
    Ok(NodeCerts {
        server: leaf(ExtendedKeyUsagePurpose::ServerAuth, server_sans)?,
        client: leaf(ExtendedKeyUsagePurpose::ClientAuth, vec![dns(&spec.name)?])?,
    })
}
