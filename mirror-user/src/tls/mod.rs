//! TLS for mirror's links: X.509 credentials in qemu's `tls-creds-x509` directory layout
//! ([`Credentials`]), TLS 1.3 endpoints with mutual certificates ([`TlsServer`],
//! [`TlsClient`]) that return the peer's verified node name ([`PeerIdentity`]), and issuing
//! certificates for a volume's nodes ([`issue`], the `mirror certs` command in [`certs_cmd`]).
//!
//! Trust is per CA: a peer is accepted when its certificate leads to the directory's
//! `ca-cert.pem`, is made for its end (server or client), lies within its validity, and, when
//! the caller names the node it expects ([`PeerPolicy::Nodes`]), names that node. Every refusal
//! is a [`TlsError`] that says which of these failed and with what data.
//!
//! Crypto provider: aws-lc-rs, rustls's default (ring's provider is deprecated in rustls 0.23.48):
//! it offers the post-quantum hybrid key exchange X25519MLKEM768 first, so recorded replication
//! traffic stays private against a later quantum computer, and falls back to X25519 with peers
//! that lack it (gnutls 3.7, qemu's); its C part builds with the `cc` builder, no cmake. Only TLS
//! 1.3 is offered. `docs/tls.md` describes how the replication link,
//! the NBD export and the limits before authentication use this room.

mod cert;
pub mod certs_cmd;
mod creds;
mod endpoint;
mod error;
pub mod issue;
mod verify;

#[cfg(test)]
mod tests;

use std::sync::Arc;

pub use cert::{CertInfo, CertTime, Purpose};
pub use creds::{Credentials, Endpoint, CA_CERT, CA_KEY};
pub use endpoint::{PeerIdentity, TlsClient, TlsServer, HANDSHAKE_TIMEOUT};
pub use error::{CertOrigin, TlsError};
pub use verify::{check_node_name, ClientAuth, PeerPolicy};

/// The crypto provider every configuration here is built with.
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}
