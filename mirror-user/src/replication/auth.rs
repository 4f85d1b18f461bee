//! Peer authentication: both sides prove knowledge of the shared secret with HMAC-SHA256 over
//! both nonces and the volume name (mutual challenge-response; the secret never travels).
//!
//! On a TLS link the proofs also cover the session's exporter value (RFC 8446 section 7.5,
//! label [`EXPORTER_LABEL`], the volume name as context), so a proof is valid on its own TLS
//! session only: a peer holding any certificate of the CA cannot relay the challenge between a
//! real client and a real server (two sessions) and pass for a node of a volume whose secret it
//! does not know. The secret stays a second factor beside the certificates: it authorizes per
//! volume, where a CA usually spans a cluster. Plaintext proofs are those of before TLS.
//!
//! Until `Welcome`, frames are capped at [`PRE_AUTH_MAX_PAYLOAD`] at both ends.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::protocol::NONCE_LEN;

type HmacSha256 = Hmac<Sha256>;

/// Smallest accepted secret.
pub const MIN_SECRET: usize = 16;

/// Largest frame payload either end accepts before the handshake is over (a `Hello` is a volume
/// name and a nonce, `Auth` a MAC, `Welcome` a MAC and the volume's description, a refusal a
/// few hundred bytes of text).
pub const PRE_AUTH_MAX_PAYLOAD: u32 = 4096;

/// The TLS exporter label the proofs are bound with.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-mirror-auth";

/// What binds the proofs to a TLS session: the exporter value of [`EXPORTER_LABEL`] with the
/// volume name as context. `None` on a plaintext link.
pub type Binding = Option<[u8; 32]>;

pub fn nonce() -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n).expect("getrandom");
    n
}

/// The MAC over the role, both nonces (fixed length), the binding (fixed length, and a role of
/// its own so that a bound and an unbound proof never share a message) and the volume name.
fn mac(
    secret: &[u8],
    role: &str,
    first: &[u8],
    second: &[u8],
    volume: &str,
    binding: &Binding,
) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    m.update(role.as_bytes());
    if binding.is_some() {
        m.update(b"-tls");
    }
    m.update(first);
    m.update(second);
    if let Some(b) = binding {
        m.update(b);
    }
    m.update(volume.as_bytes());
    m
}

/// The nonces and what they are bound to, as both ends see them after `Hello` and `Challenge`.
#[derive(Debug, Clone)]
pub struct Exchange<'a> {
    pub server_nonce: &'a [u8],
    pub client_nonce: &'a [u8],
    pub volume: &'a str,
    pub binding: Binding,
}

impl Exchange<'_> {
    /// The client's proof: over the server's nonce, then its own.
    pub fn client_proof(&self, secret: &[u8]) -> [u8; 32] {
        self.client_mac(secret).finalize().into_bytes().into()
    }

    /// The server's proof: over the client's nonce, then its own (a different message, so a
    /// proof cannot be reflected back).
    pub fn server_proof(&self, secret: &[u8]) -> [u8; 32] {
        self.server_mac(secret).finalize().into_bytes().into()
    }

    /// Constant-time check of a client's proof.
    pub fn verify_client(&self, secret: &[u8], proof: &[u8]) -> bool {
        self.client_mac(secret).verify_slice(proof).is_ok()
    }

    /// Constant-time check of a server's proof.
    pub fn verify_server(&self, secret: &[u8], proof: &[u8]) -> bool {
        self.server_mac(secret).verify_slice(proof).is_ok()
    }

    fn client_mac(&self, secret: &[u8]) -> HmacSha256 {
        mac(secret, "mirror-client", self.server_nonce, self.client_nonce, self.volume, &self.binding)
    }

    fn server_mac(&self, secret: &[u8]) -> HmacSha256 {
        mac(secret, "mirror-server", self.client_nonce, self.server_nonce, self.volume, &self.binding)
    }
}

/// The binding of a TLS session (either end's rustls connection) for `volume`.
pub fn binding<D>(conn: &rustls::ConnectionCommon<D>, volume: &str) -> Result<[u8; 32], rustls::Error> {
    conn.export_keying_material([0u8; 32], EXPORTER_LABEL, Some(volume.as_bytes()))
}

/// Reads a secret file (raw bytes; surrounding whitespace trimmed), with clear errors.
pub fn load_secret(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    let raw =
        std::fs::read(path).map_err(|e| anyhow::anyhow!("reading secret file {}: {e}", path.display()))?;
    let trimmed = raw.trim_ascii().to_vec();
    anyhow::ensure!(
        trimmed.len() >= MIN_SECRET,
        "secret file {} holds {} bytes; at least {MIN_SECRET} are required (e.g. `head -c 32 /dev/urandom | base64 > {}`)",
        path.display(),
        trimmed.len(),
        path.display()
    );
    Ok(trimmed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"secret-secret-secret";

    fn ex<'a>(s: &'a [u8], c: &'a [u8], volume: &'a str, binding: Binding) -> Exchange<'a> {
        Exchange { server_nonce: s, client_nonce: c, volume, binding }
    }

    #[test]
    fn proofs_verify_only_with_the_same_secret_nonces_and_volume() {
        let (s, c) = (nonce(), nonce());
        let p = ex(&s, &c, "vol", None).client_proof(SECRET);
        assert!(ex(&s, &c, "vol", None).verify_client(SECRET, &p));
        assert!(!ex(&s, &c, "vol", None).verify_client(b"other-secret-secret!", &p));
        assert!(!ex(&s, &c, "vol2", None).verify_client(SECRET, &p));
        assert!(!ex(&c, &s, "vol", None).verify_client(SECRET, &p));
        // A client proof is not a valid server proof (no reflection).
        assert!(!ex(&s, &c, "vol", None).verify_server(SECRET, &p));
        let sp = ex(&s, &c, "vol", None).server_proof(SECRET);
        assert!(ex(&s, &c, "vol", None).verify_server(SECRET, &sp));
    }

    #[test]
    fn plaintext_proofs_are_those_of_before_tls() {
        // HMAC-SHA256(secret, "mirror-client" | server nonce | client nonce | volume), as the
        // protocol had it before the binding: the same secret files and peers keep working.
        let (s, c) = ([1u8; 32], [2u8; 32]);
        let mut m = HmacSha256::new_from_slice(SECRET).unwrap();
        for part in [&b"mirror-client"[..], &s, &c, b"vol"] {
            m.update(part);
        }
        let expected: [u8; 32] = m.finalize().into_bytes().into();
        assert_eq!(ex(&s, &c, "vol", None).client_proof(SECRET), expected);
    }

    #[test]
    fn a_bound_proof_holds_on_its_session_only() {
        let (s, c) = (nonce(), nonce());
        let (one, other) = (Some([7u8; 32]), Some([8u8; 32]));
        let p = ex(&s, &c, "vol", one).client_proof(SECRET);
        assert!(ex(&s, &c, "vol", one).verify_client(SECRET, &p));
        assert!(!ex(&s, &c, "vol", other).verify_client(SECRET, &p), "relayed to another session");
        assert!(!ex(&s, &c, "vol", None).verify_client(SECRET, &p), "replayed on plaintext");
        let unbound = ex(&s, &c, "vol", None).client_proof(SECRET);
        assert!(!ex(&s, &c, "vol", one).verify_client(SECRET, &unbound));
    }
}
