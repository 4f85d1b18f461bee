//! Peer authentication: both sides prove knowledge of the shared secret with HMAC-SHA256 over
//! both nonces and the volume name (mutual challenge-response; the secret never travels).

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::protocol::NONCE_LEN;

type HmacSha256 = Hmac<Sha256>;

/// Smallest accepted secret.
pub const MIN_SECRET: usize = 16;

pub fn nonce() -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n).expect("getrandom");
    n
}

fn mac(secret: &[u8], role: &[u8], first: &[u8], second: &[u8], volume: &str) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    m.update(role);
    m.update(first);
    m.update(second);
    m.update(volume.as_bytes());
    m
}

/// The client's proof: over the server's nonce, then its own.
pub fn client_proof(secret: &[u8], server_nonce: &[u8], client_nonce: &[u8], volume: &str) -> [u8; 32] {
    mac(secret, b"mirror-client", server_nonce, client_nonce, volume).finalize().into_bytes().into()
}

/// The server's proof: over the client's nonce, then its own (a different message, so a proof
/// cannot be reflected back).
pub fn server_proof(secret: &[u8], server_nonce: &[u8], client_nonce: &[u8], volume: &str) -> [u8; 32] {
    mac(secret, b"mirror-server", client_nonce, server_nonce, volume).finalize().into_bytes().into()
}

/// Constant-time check of a client's proof.
pub fn verify_client(
    secret: &[u8],
    server_nonce: &[u8],
    client_nonce: &[u8],
    volume: &str,
    proof: &[u8],
) -> bool {
    mac(secret, b"mirror-client", server_nonce, client_nonce, volume).verify_slice(proof).is_ok()
}

/// Constant-time check of a server's proof.
pub fn verify_server(
    secret: &[u8],
    server_nonce: &[u8],
    client_nonce: &[u8],
    volume: &str,
    proof: &[u8],
) -> bool {
    mac(secret, b"mirror-server", client_nonce, server_nonce, volume).verify_slice(proof).is_ok()
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

    #[test]
    fn proofs_verify_only_with_the_same_secret_nonces_and_volume() {
        let (s, c) = (nonce(), nonce());
        let p = client_proof(b"secret-secret-secret", &s, &c, "vol");
        assert!(verify_client(b"secret-secret-secret", &s, &c, "vol", &p));
        assert!(!verify_client(b"other-secret-secret!", &s, &c, "vol", &p));
        assert!(!verify_client(b"secret-secret-secret", &s, &c, "vol2", &p));
        assert!(!verify_client(b"secret-secret-secret", &c, &s, "vol", &p));
        // A client proof is not a valid server proof (no reflection).
        assert!(!verify_server(b"secret-secret-secret", &s, &c, "vol", &p));
        let sp = server_proof(b"secret-secret-secret", &s, &c, "vol");
        assert!(verify_server(b"secret-secret-secret", &s, &c, "vol", &sp));
    }
}
