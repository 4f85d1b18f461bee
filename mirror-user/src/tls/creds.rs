//! A credentials directory in qemu's `tls-creds-x509` layout, so that one directory serves mirror
//! and qemu's clients alike: `ca-cert.pem` (the CA's certificate: whom to trust),
//! `server-cert.pem` + `server-key.pem` (presented when accepting), `client-cert.pem` +
//! `client-key.pem` (presented when connecting). The CA's own key never needs to be there.
//!
//! Loading checks everything a handshake would trip over later, and says which file is wrong:
//! missing or unreadable files, bad PEM, certificates outside their validity at `now`, a key that
//! is not the certificate's, a certificate the CA did not sign or that was made for the other
//! endpoint.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, UnixTime},
    server::ParsedCertificate,
    RootCertStore,
};

use super::{
    cert::{CertInfo, CertTime},
    error::{CertOrigin, TlsError},
    provider,
    verify::cert_error,
};

/// The CA certificate's file name in a credentials directory.
pub const CA_CERT: &str = "ca-cert.pem";
/// The CA key's file name (only in the directory `mirror certs ca` made; nodes do not need it).
pub const CA_KEY: &str = "ca-key.pem";

/// The two ends of a TLS connection; each has its own certificate and key in the directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    /// Accepts connections (a replica server, the NBD export): `server-cert.pem`.
    Server,
    /// Opens connections (the router, sync jobs, the CLI): `client-cert.pem`.
    Client,
}

impl Endpoint {
    pub fn cert_file(self) -> &'static str {
        match self {
            Endpoint::Server => "server-cert.pem",
            Endpoint::Client => "client-cert.pem",
        }
    }

    pub fn key_file(self) -> &'static str {
        match self {
            Endpoint::Server => "server-key.pem",
            Endpoint::Client => "client-key.pem",
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Endpoint::Server => "server",
            Endpoint::Client => "client",
        })
    }
}

/// One endpoint's credentials, checked: the CA to trust, our certificate chain and its key.
#[derive(Debug)]
pub struct Credentials {
    dir: PathBuf,
    endpoint: Endpoint,
    ca_path: PathBuf,
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    info: CertInfo,
}

impl Credentials {
    /// Loads and checks `dir`'s CA and the certificate and key of `endpoint`, at time `now`.
    pub fn load(dir: &Path, endpoint: Endpoint, now: SystemTime) -> Result<Credentials, TlsError> {
        let ca_path = dir.join(CA_CERT);
        let (roots, _) = load_ca(&ca_path, now)?;
        let cert_path = dir.join(endpoint.cert_file());
        let key_path = dir.join(endpoint.key_file());
        let chain = read_certs(&cert_path)?;
        let info = parse_cert(&cert_path, &chain[0])?;
        check_validity(&info, &CertOrigin::File(cert_path.clone()), now)?;
        let key = read_key(&key_path)?;
        check_key(&cert_path, &key_path, &chain, &key)?;
        verify_chain(&chain, &roots, endpoint, now, &CertOrigin::File(cert_path), &ca_path)?;
        Ok(Credentials { dir: dir.to_path_buf(), endpoint, ca_path, roots, chain, key, info })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn endpoint(&self) -> Endpoint {
        self.endpoint
    }

    /// The CA certificate file peers are checked against.
    pub fn ca_path(&self) -> &Path {
        &self.ca_path
    }

    /// Our own certificate.
    pub fn info(&self) -> &CertInfo {
        &self.info
    }

    pub(super) fn roots(&self) -> &Arc<RootCertStore> {
        &self.roots
    }

    pub(super) fn chain(&self) -> Vec<CertificateDer<'static>> {
        self.chain.clone()
    }

    pub(super) fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }
}

/// Reads a whole file; a missing one is [`TlsError::MissingFile`].
pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => TlsError::MissingFile { path: path.to_path_buf() },
        _ => TlsError::Read { path: path.to_path_buf(), source },
    })
}

/// The PEM certificates in `path` (at least one), in file order.
pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_file(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes).collect::<Result<Vec<_>, _>>().map_err(|e| {
        TlsError::Pem { path: path.to_path_buf(), what: "CERTIFICATE", detail: e.to_string() }
    })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            what: "CERTIFICATE",
            detail: "no `BEGIN CERTIFICATE` block".into(),
        });
    }
    Ok(certs)
}

/// The PEM private key in `path` (PKCS#8, PKCS#1 or SEC1).
pub(crate) fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read_file(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::Pem {
        path: path.to_path_buf(),
        what: "PRIVATE KEY",
        detail: e.to_string(),
    })
}

pub(crate) fn parse_cert(path: &Path, der: &CertificateDer<'_>) -> Result<CertInfo, TlsError> {
    CertInfo::parse(der).map_err(|detail| TlsError::BadCertificate { path: path.to_path_buf(), detail })
}

/// Refuses a certificate outside its validity period at `now`.
pub(crate) fn check_validity(info: &CertInfo, origin: &CertOrigin, now: SystemTime) -> Result<(), TlsError> {
    let now = CertTime::at(now);
    if now > info.not_after {
        return Err(TlsError::Expired { cert: origin.clone(), not_after: info.not_after, now });
    }
    if now < info.not_before {
        return Err(TlsError::NotYetValid { cert: origin.clone(), not_before: info.not_before, now });
    }
    Ok(())
}

/// The CA file as trust anchors, each certificate checked to be a CA (validity is the caller's:
/// `mirror certs show` reports an expired CA and still checks what it signed).
pub(crate) fn read_ca(path: &Path) -> Result<(Arc<RootCertStore>, Vec<CertInfo>), TlsError> {
    let certs = read_certs(path)?;
    let mut roots = RootCertStore::empty();
    let mut infos = Vec::new();
    for der in certs {
        let info = parse_cert(path, &der)?;
        if !info.is_ca {
            return Err(TlsError::NotCa { path: path.to_path_buf() });
        }
        roots
            .add(der)
            .map_err(|e| TlsError::BadCertificate { path: path.to_path_buf(), detail: e.to_string() })?;
        infos.push(info);
    }
    Ok((Arc::new(roots), infos))
}

/// The CA file as trust anchors, every certificate in it valid at `now`.
pub(crate) fn load_ca(path: &Path, now: SystemTime) -> Result<(Arc<RootCertStore>, Vec<CertInfo>), TlsError> {
    let (roots, infos) = read_ca(path)?;
    for info in &infos {
        check_validity(info, &CertOrigin::File(path.to_path_buf()), now)?;
    }
    Ok((roots, infos))
}

/// Refuses a key that is not the one the certificate `chain[0]` was issued for.
pub(crate) fn check_key(
    cert_path: &Path,
    key_path: &Path,
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
) -> Result<(), TlsError> {
    let signing = provider()
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| TlsError::UnsupportedKey { path: key_path.to_path_buf(), detail: e.to_string() })?;
    match rustls::sign::CertifiedKey::new(chain.to_vec(), signing).keys_match() {
        Ok(()) => Ok(()),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(TlsError::KeyMismatch { cert: cert_path.to_path_buf(), key: key_path.to_path_buf() })
        }
        // The key's public half is unknown to the provider: the handshake will tell.
        Err(rustls::Error::InconsistentKeys(_)) => Ok(()),
        Err(e) => Err(TlsError::BadCertificate { path: cert_path.to_path_buf(), detail: e.to_string() }),
    }
}

/// Checks that `chain` leads to one of `roots` and was made for `endpoint`, at `now`.
pub(crate) fn verify_chain(
    chain: &[CertificateDer<'static>],
    roots: &Arc<RootCertStore>,
    endpoint: Endpoint,
    now: SystemTime,
    origin: &CertOrigin,
    ca_path: &Path,
) -> Result<(), TlsError> {
    let now_unix = UnixTime::since_unix_epoch(now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default());
    let provider = provider();
    let (ee, intermediates) = (&chain[0], &chain[1..]);
    let result = match endpoint {
        Endpoint::Server => ParsedCertificate::try_from(ee).and_then(|parsed| {
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &parsed,
                roots,
                intermediates,
                now_unix,
                provider.signature_verification_algorithms.all,
            )
        }),
        Endpoint::Client => {
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider)
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))
                .and_then(|v| v.verify_client_cert(ee, intermediates, now_unix).map(|_| ()))
        }
    };
    result.map_err(|e| cert_error(e, origin.clone(), ca_path, endpoint))
}
