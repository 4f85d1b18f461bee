//! Integration tests live in `tests/`; see README. This library holds what the benchmark drivers
//! in `src/bin/` share.

pub mod etcd;
pub mod scenario;
pub mod timeline;

pub mod bench {
    //! Helpers of the benchmark drivers (`bench-resync`, `bench-nbd`).

    use std::{
        io::{Read, Write},
        net::TcpListener,
        path::Path,
        process::Child,
    };

    /// A child process killed and reaped on drop.
    #[derive(Debug)]
    pub struct Kill(pub Child);

    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// A loopback TCP port free at the time of the call.
    pub fn free_port() -> anyhow::Result<u16> {
        Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
    }

    /// The median; NaN for no samples.
    pub fn median(mut v: Vec<f64>) -> f64 {
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        if n == 0 {
            f64::NAN
        } else if !n.is_multiple_of(2) {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    }

    /// Fills `buf` with xorshift64 output, advancing `seed`.
    pub fn xorshift_fill(buf: &mut [u8], seed: &mut u64) {
        for c in buf.chunks_mut(8) {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            let b = seed.to_le_bytes();
            c.copy_from_slice(&b[..c.len()]);
        }
    }

    /// Writes `size` bytes (rounded down to 4 MiB) of xorshift data from `seed` to `path`.
    pub fn fill_random(path: &Path, size: u64, mut seed: u64) -> anyhow::Result<()> {
        let mut f = std::io::BufWriter::with_capacity(8 << 20, std::fs::File::create(path)?);
        let mut buf = vec![0u8; 4 << 20];
        for _ in 0..size / buf.len() as u64 {
            xorshift_fill(&mut buf, &mut seed);
            f.write_all(&buf)?;
        }
        f.flush()?;
        Ok(())
    }

    /// xxh3-128 of a whole file.
    pub fn file_digest(path: &Path) -> anyhow::Result<u128> {
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
}
