//! Peer certificate checks during the handshake: the chain must lead to the volume's CA (webpki,
//! through rustls), the certificate must be made for its end (server or client), and, when the
//! caller names the node it expects, the certificate must name it. Refusals are mapped to
//! [`TlsError`] variants that carry the reason's data.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{
        danger::{ClientCertVerified, ClientCertVerifier},
        ParsedCertificate, WebPkiClientVerifier,
    },
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, InvalidMessage, OtherError,
    RootCertStore, SignatureScheme,
};

use super::{
    cert::{CertInfo, CertTime},
    creds::Endpoint,
    error::{CertOrigin, TlsError},
};

/// Which peers a handshake accepts, beyond "signed by our CA".
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PeerPolicy {
    /// Any certificate the CA signed for the right end; its identity is returned, not checked.
    AnyNode,
    /// The certificate must name one of these nodes (common name or DNS name, ASCII case
    /// ignored); an empty list accepts nobody.
    Nodes(Vec<String>),
}

impl PeerPolicy {
    /// Only the node `name` (checked to be a valid DNS name, the form node names take).
    pub fn node(name: &str) -> Result<PeerPolicy, TlsError> {
        check_node_name(name)?;
        Ok(PeerPolicy::Nodes(vec![name.to_string()]))
    }

    fn check(&self, ee: &CertificateDer<'_>) -> Result<(), Error> {
        let PeerPolicy::Nodes(expected) = self else { return Ok(()) };
        let info =
            CertInfo::parse(ee).map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if expected.iter().any(|n| info.names_node(n)) {
            return Ok(());
        }
        Err(Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(IdentityMismatch {
            expected: expected.clone(),
            presented: info.names(),
        })))))
    }
}

/// Whether a server asks its clients for a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientAuth {
    /// Clients must present a certificate the CA signed, accepted by the policy.
    Required(PeerPolicy),
    /// No client certificate is asked for (an NBD export without `--nbd-tls-verify-peer`).
    NotRequested,
}

/// Node names are DNS names (they go into the certificate's subject alternative name).
pub fn check_node_name(name: &str) -> Result<(), TlsError> {
    let invalid = |detail: &str| TlsError::InvalidNodeName { name: name.into(), detail: detail.into() };
    if name.parse::<std::net::IpAddr>().is_ok() {
        return Err(invalid("an IP address; name the node and add its address with --ip"));
    }
    ServerName::try_from(name).map_err(|_| invalid("letters, digits, `-` and `.` only, as a DNS name"))?;
    Ok(())
}

/// A name check that failed inside the verifier, carried out through rustls's `Other` error.
#[derive(Debug, Clone, thiserror::Error)]
#[error("certificate names {presented:?}, expected {expected:?}")]
struct IdentityMismatch {
    expected: Vec<String>,
    presented: Vec<String>,
}

/// Maps a rustls certificate error about `origin` (made for `wanted`) to a [`TlsError`].
pub(super) fn cert_error(e: Error, origin: CertOrigin, ca: &Path, wanted: Endpoint) -> TlsError {
    let Error::InvalidCertificate(ce) = e else { return TlsError::Handshake(e) };
    match ce {
        CertificateError::ExpiredContext { time, not_after } => TlsError::Expired {
            cert: origin,
            not_after: CertTime::from_rustls(not_after),
            now: CertTime::from_rustls(time),
        },
        CertificateError::NotValidYetContext { time, not_before } => TlsError::NotYetValid {
            cert: origin,
            not_before: CertTime::from_rustls(not_before),
            now: CertTime::from_rustls(time),
        },
        CertificateError::UnknownIssuer | CertificateError::BadSignature => {
            TlsError::NotSignedByCa { cert: origin, ca: ca.to_path_buf() }
        }
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            TlsError::WrongPurpose { cert: origin, wanted }
        }
        CertificateError::NotValidForNameContext { expected, presented } => TlsError::WrongIdentity {
            cert: origin,
            expected: vec![expected.to_str().into_owned()],
            presented,
        },
        CertificateError::Other(OtherError(inner)) => match inner.downcast_ref::<IdentityMismatch>() {
            Some(m) => TlsError::WrongIdentity {
                cert: origin,
                expected: m.expected.clone(),
                presented: m.presented.clone(),
            },
            None => {
                TlsError::Handshake(Error::InvalidCertificate(CertificateError::Other(OtherError(inner))))
            }
        },
        ce => TlsError::Handshake(Error::InvalidCertificate(ce)),
    }
}

/// Explains an I/O error from a TLS stream (the handshake or a later read): rustls errors become
/// the [`TlsError`] that names the reason; `peer_end` is the end the peer plays.
pub(super) fn explain(e: std::io::Error, ca: &Path, peer_end: Endpoint, handshaking: bool) -> TlsError {
    use std::io::ErrorKind;
    if e.get_ref()
        .is_some_and(<dyn std::error::Error + std::marker::Send + std::marker::Sync + 'static>::is::<Error>)
    {
        let inner = e.into_inner().expect("checked above").downcast::<Error>().expect("checked above");
        return match *inner {
            Error::AlertReceived(alert) => TlsError::RefusedByPeer { alert },
            Error::NoCertificatesPresented => TlsError::NoPeerCertificate,
            Error::InvalidMessage(
                m @ (InvalidMessage::InvalidContentType
                | InvalidMessage::UnknownProtocolVersion
                | InvalidMessage::MessageTooLarge),
            ) if handshaking => TlsError::NotTls { detail: format!("{m:?}") },
            e if handshaking => cert_error(e, CertOrigin::Peer, ca, peer_end),
            e => TlsError::Broken(e),
        };
    }
    match e.kind() {
        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
            if handshaking =>
        {
            TlsError::Closed
        }
        _ => TlsError::Io(e),
    }
}

/// Checks servers' certificates for a client: our CA, server purpose, the policy.
#[derive(Debug)]
pub(super) struct NodeServerVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    policy: PeerPolicy,
}

impl NodeServerVerifier {
    pub(super) fn new(roots: Arc<RootCertStore>, provider: Arc<CryptoProvider>, policy: PeerPolicy) -> Self {
        NodeServerVerifier { roots, provider, policy }
    }
}

impl ServerCertVerifier for NodeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        // The name check is the policy's (node names), not the dialled host's: nodes are reached
        // by address, and the address may change while the node stays the same.
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        self.policy.check(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Checks clients' certificates for a server: webpki's client verifier (our CA, client purpose),
/// then the policy.
#[derive(Debug)]
pub(super) struct NodeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    policy: PeerPolicy,
}

impl NodeClientVerifier {
    pub(super) fn new(
        roots: Arc<RootCertStore>,
        provider: Arc<CryptoProvider>,
        policy: PeerPolicy,
        ca: &Path,
    ) -> Result<Self, TlsError> {
        let inner = WebPkiClientVerifier::builder_with_provider(roots, provider).build().map_err(|e| {
            TlsError::BadCertificate { path: PathBuf::from(ca), detail: format!("as trust anchors: {e}") }
        })?;
        Ok(NodeClientVerifier { inner, policy })
    }
}

impl ClientCertVerifier for NodeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        self.policy.check(end_entity)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
