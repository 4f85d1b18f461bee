//! What a certificate says, parsed once (x509-parser): subject, issuer, names, validity,
//! purposes. The handshake uses the names as the peer's identity; `mirror certs show` prints the
//! rest.

use std::{
    net::IpAddr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use x509_parser::{certificate::X509Certificate, extensions::GeneralName};

/// A point in time as certificates state it (whole seconds), shown in RFC 3339.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct CertTime(pub SystemTime);

impl CertTime {
    /// From seconds since the Unix epoch (negative: before it).
    pub fn from_unix(secs: i64) -> CertTime {
        let t = if secs >= 0 {
            UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
        } else {
            UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
        };
        CertTime(t)
    }

    /// Now, to the second.
    pub fn at(t: SystemTime) -> CertTime {
        let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CertTime(UNIX_EPOCH + Duration::from_secs(secs))
    }

    pub(super) fn from_rustls(t: rustls::pki_types::UnixTime) -> CertTime {
        CertTime(UNIX_EPOCH + Duration::from_secs(t.as_secs()))
    }
}

impl std::fmt::Display for CertTime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", humantime::format_rfc3339_seconds(self.0))
    }
}

impl serde::Serialize for CertTime {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// What the TLS handshake may use a certificate for (its extended key usage).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Purpose {
    ServerAuth,
    ClientAuth,
}

impl std::fmt::Display for Purpose {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Purpose::ServerAuth => "server_auth",
            Purpose::ClientAuth => "client_auth",
        })
    }
}

/// The parts of an X.509 certificate mirror looks at.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CertInfo {
    /// The subject's distinguished name, e.g. `CN=node-a`.
    pub subject: String,
    pub issuer: String,
    /// The subject's common name, when it has one.
    pub common_name: Option<String>,
    /// DNS names in the subject alternative name extension.
    pub dns_names: Vec<String>,
    /// IP addresses in the subject alternative name extension.
    pub ip_addresses: Vec<IpAddr>,
    pub not_before: CertTime,
    pub not_after: CertTime,
    pub is_ca: bool,
    /// Extended key usages; empty when the certificate has none (any use).
    pub purposes: Vec<Purpose>,
    /// The serial number, hex.
    pub serial: String,
}

impl CertInfo {
    /// Parses a DER certificate; the error is the parser's message.
    pub fn parse(der: &[u8]) -> Result<CertInfo, String> {
        let (rest, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
        if !rest.is_empty() {
            return Err(format!("{} bytes after the certificate", rest.len()));
        }
        Self::of(&cert)
    }

    fn of(cert: &X509Certificate<'_>) -> Result<CertInfo, String> {
        let common_name =
            cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::to_string);
        let (mut dns_names, mut ip_addresses) = (Vec::new(), Vec::new());
        if let Some(san) = cert.subject_alternative_name().map_err(|e| e.to_string())? {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(n) => dns_names.push((*n).to_string()),
                    GeneralName::IPAddress(b) => {
                        if let Ok(v4) = <[u8; 4]>::try_from(*b) {
                            ip_addresses.push(IpAddr::from(v4));
                        } else if let Ok(v6) = <[u8; 16]>::try_from(*b) {
                            ip_addresses.push(IpAddr::from(v6));
                        }
                    }
                    _ => {}
                }
            }
        }
        let mut purposes = Vec::new();
        if let Some(eku) = cert.extended_key_usage().map_err(|e| e.to_string())? {
            if eku.value.server_auth || eku.value.any {
                purposes.push(Purpose::ServerAuth);
            }
            if eku.value.client_auth || eku.value.any {
                purposes.push(Purpose::ClientAuth);
            }
        }
        let validity = cert.validity();
        Ok(CertInfo {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            common_name,
            dns_names,
            ip_addresses,
            not_before: CertTime::from_unix(validity.not_before.timestamp()),
            not_after: CertTime::from_unix(validity.not_after.timestamp()),
            is_ca: cert.is_ca(),
            purposes,
            serial: cert.raw_serial_as_string(),
        })
    }

    /// The names a peer may be known by: the common name and the DNS names, each once.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for n in self.common_name.iter().chain(&self.dns_names) {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
        names
    }

    /// The node this certificate belongs to: its common name, else its first DNS name.
    pub fn node_name(&self) -> Option<&str> {
        self.common_name.as_deref().or(self.dns_names.first().map(String::as_str))
    }

    /// Whether the certificate names `name` (common name or DNS name, ASCII case ignored).
    pub fn names_node(&self, name: &str) -> bool {
        self.names().iter().any(|n| n.eq_ignore_ascii_case(name))
    }
}
