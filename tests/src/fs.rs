//! Files of the tests: scratch directories removed on drop, names unique to a process and a
//! moment, the digest two replicas are compared by, and deterministic random data (xorshift64,
//! fast enough for hundreds of MiB).

use std::{
    io::{Read, Write},
    path::{Path, PathBuf},
};

/// The sub-second nanoseconds of now: with the process id, keeps the names one process makes
/// apart.
pub fn nanos() -> u32 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos())
}

/// `mirror-{tag}-{pid}-{nanos}`: a name for a scratch directory, a cgroup, a pin directory or a
/// socket that no other test (of this or another run) uses.
pub fn unique_name(tag: &str) -> String {
    format!("mirror-{tag}-{}-{}", std::process::id(), nanos())
}

/// A unique scratch directory under the system's temporary directory, removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates it; panics when it cannot.
    pub fn new(tag: &str) -> Self {
        Self::create(tag).expect("create temp dir")
    }

    pub fn create(tag: &str) -> std::io::Result<Self> {
        let p = std::env::temp_dir().join(unique_name(tag));
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Leaves the directory in place (for a post-mortem) and returns its path.
    pub fn keep(mut self) -> PathBuf {
        let p = std::mem::take(&mut self.0);
        std::mem::forget(self);
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A secret file in `dir` (`dir/secret`), for the replicas and the CLI.
pub fn secret_file(dir: &Path) -> PathBuf {
    let p = dir.join("secret");
    std::fs::write(&p, b"test-secret-0123456789abcdef\n").expect("write secret");
    p
}

/// xxh3-128 of a whole file, read in 4 MiB pieces; panics when the file cannot be read.
pub fn file_digest(path: &Path) -> u128 {
    try_file_digest(path).unwrap_or_else(|e| panic!("digest of {}: {e}", path.display()))
}

/// xxh3-128 of a whole file, read in 4 MiB pieces.
pub fn try_file_digest(path: &Path) -> std::io::Result<u128> {
    let mut f = std::fs::File::open(path)?;
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(h.digest128());
        }
        h.update(&buf[..n]);
    }
}

/// One step of xorshift64: advances `state` and returns it.
pub fn xorshift_next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Fills `buf` with xorshift64 output (one step per 8 bytes, little-endian), advancing `seed`.
pub fn xorshift_fill(buf: &mut [u8], seed: &mut u64) {
    for c in buf.chunks_mut(8) {
        let b = xorshift_next(seed).to_le_bytes();
        c.copy_from_slice(&b[..c.len()]);
    }
}

/// `len` deterministic pseudo-random bytes from `seed` (xorshift64 from `seed | 1`).
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    xorshift_fill(&mut v, &mut (seed | 1));
    v
}

/// Writes `size` bytes (rounded down to 4 MiB) of xorshift data from `seed` to `path`.
pub fn fill_random(path: &Path, size: u64, mut seed: u64) -> std::io::Result<()> {
    let mut f = std::io::BufWriter::with_capacity(8 << 20, std::fs::File::create(path)?);
    let mut buf = vec![0u8; 4 << 20];
    for _ in 0..size / buf.len() as u64 {
        xorshift_fill(&mut buf, &mut seed);
        f.write_all(&buf)?;
    }
    f.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one generator gives what the two copies it replaced gave: `random_bytes` as the
    /// integration tests' word-by-word loop, `xorshift_fill` as the benches' chunked fill.
    #[test]
    fn random_bytes_and_fill_agree_with_the_word_by_word_generator() {
        let words = |len: usize, seed: u64| {
            let mut x = seed | 1;
            let mut v = Vec::new();
            while v.len() < len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                v.extend_from_slice(&x.to_le_bytes());
            }
            v.truncate(len);
            v
        };
        for len in [0, 1, 7, 8, 9, 4096, 4099] {
            assert_eq!(random_bytes(len, 7), words(len, 7), "len {len}");
        }
        let mut buf = vec![0u8; 20];
        let mut seed = 7u64;
        xorshift_fill(&mut buf, &mut seed);
        assert_eq!(buf, words(20, 7));
        // Three words (the last one partly used) advance the seed three steps.
        let mut s = 7;
        for _ in 0..3 {
            xorshift_next(&mut s);
        }
        assert_eq!(seed, s);
    }
}
