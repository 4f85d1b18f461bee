//! The TLS room's error: one enum for loading credentials and for refused handshakes, each
//! variant carrying what the operator needs to mend it (the file, the dates, the names).

use std::{path::PathBuf, time::Duration};

use super::{cert::CertTime, creds::Endpoint};

/// Which certificate an error is about: one of ours (a file) or the one the peer presented.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CertOrigin {
    File(PathBuf),
    Peer,
}

impl std::fmt::Display for CertOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CertOrigin::File(p) => write!(f, "{}", p.display()),
            CertOrigin::Peer => f.write_str("the peer's certificate"),
        }
    }
}

/// Errors of the TLS room: credentials that cannot be used, and handshakes refused either way.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("{path}: missing (a TLS credentials directory holds ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem, client-key.pem; `mirror certs node` writes them)", path = .path.display())]
    MissingFile { path: PathBuf },
    #[error("{path}: cannot read: {source}", path = .path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: no usable PEM {what} in it: {detail}", path = .path.display())]
    Pem { path: PathBuf, what: &'static str, detail: String },
    #[error("{path}: not a valid X.509 certificate: {detail}", path = .path.display())]
    BadCertificate { path: PathBuf, detail: String },
    #[error("{path}: the key is of a kind TLS cannot use here: {detail}", path = .path.display())]
    UnsupportedKey { path: PathBuf, detail: String },
    #[error("{cert}: expired at {not_after} (now {now})")]
    Expired { cert: CertOrigin, not_after: CertTime, now: CertTime },
    #[error("{cert}: not valid before {not_before} (now {now}); check the clocks")]
    NotYetValid { cert: CertOrigin, not_before: CertTime, now: CertTime },
    #[error("{key}: this private key does not belong to the certificate {cert}", key = .key.display(), cert = .cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("{path}: not a CA certificate (no CA basic constraint)", path = .path.display())]
    NotCa { path: PathBuf },
    #[error("{cert}: not signed by the CA in {ca}", ca = .ca.display())]
    NotSignedByCa { cert: CertOrigin, ca: PathBuf },
    #[error("{cert}: not made for a TLS {wanted} (extended key usage); use the {wanted}-cert.pem that `mirror certs node` wrote")]
    WrongPurpose { cert: CertOrigin, wanted: Endpoint },
    #[error("{cert}: names {presented:?}, expected {expected:?}")]
    WrongIdentity { cert: CertOrigin, expected: Vec<String>, presented: Vec<String> },
    #[error("`{name}` cannot be a node name: {detail}")]
    InvalidNodeName { name: String, detail: String },
    #[error("the credentials in {dir} were loaded for a TLS {loaded}, not a {wanted}", dir = .dir.display())]
    WrongEndpoint { dir: PathBuf, loaded: Endpoint, wanted: Endpoint },
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
    #[error("the peer ended the connection with TLS alert {alert:?} (in the handshake: it does not trust our certificate, e.g. another CA, expired, or not the node it expects)")]
    RefusedByPeer { alert: rustls::AlertDescription },
    #[error("the peer does not speak TLS ({detail}); is it a plaintext server or client?")]
    NotTls { detail: String },
    #[error("the peer closed the connection during the TLS handshake")]
    Closed,
    #[error("TLS handshake not finished after {after:?}")]
    Timeout { after: Duration },
    #[error("TLS handshake: {0}")]
    Handshake(rustls::Error),
    #[error("TLS connection broken: {0} (a record corrupted or forged on the way, or a misbehaving peer)")]
    Broken(rustls::Error),
    #[error("TLS: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS configuration: {0}")]
    Config(rustls::Error),
}
