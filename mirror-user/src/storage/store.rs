//! A replica's backing store: a file or a block device, read and written at offsets, with
//! per-block digests (xxh3-128) for sync and verify.

use std::{
    fs::{File, OpenOptions},
    io::{Seek, SeekFrom},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
};

/// A 128-bit block digest.
pub type Digest = [u8; 16];

/// Digest of a block's bytes.
pub fn digest(data: &[u8]) -> Digest {
    xxhash_rust::xxh3::xxh3_128(data).to_le_bytes()
}

/// True when every byte is zero.
pub fn is_zero(data: &[u8]) -> bool {
    let chunks = data.chunks_exact(8);
    let tail = chunks.remainder();
    chunks.map(|c| u64::from_ne_bytes(c.try_into().expect("8 bytes"))).all(|w| w == 0)
        && tail.iter().all(|&b| b == 0)
}

/// Alignment of O_DIRECT offsets, lengths and buffers (covers 512- and 4096-byte sectors).
const DIRECT_ALIGN: usize = 4096;

/// The backing file or device of a replica.
#[derive(Debug)]
pub struct Store {
    file: File,
    /// The same file opened with O_DIRECT (see [`Store::set_direct_io`]): aligned reads and
    /// writes bypass this node's page cache, so they take as long as the disk does.
    direct: Option<File>,
    size: u64,
    path: PathBuf,
}

/// A zeroed buffer of `len` bytes aligned to [`DIRECT_ALIGN`]: the aligned window of a larger
/// vector (no unsafe allocation needed).
struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let raw = vec![0u8; len + DIRECT_ALIGN];
        let start = raw.as_ptr().align_offset(DIRECT_ALIGN);
        AlignedBuf { raw, start, len }
    }
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

impl Store {
    /// Opens `path`; creates a sparse file of `create_size` bytes when it does not exist. The
    /// size of an existing file or device is its current size.
    pub fn open(path: &Path, create_size: Option<u64>) -> std::io::Result<Store> {
        let exists = path.exists();
        if !exists && create_size.is_none() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{} does not exist (give a size to create it)", path.display()),
            ));
        }
        let mut file =
            OpenOptions::new().read(true).write(true).create(!exists).truncate(false).open(path)?;
        if !exists {
            file.set_len(create_size.unwrap_or(0))?;
        }
        let size = file.seek(SeekFrom::End(0))?;
        if size == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} is empty", path.display()),
            ));
        }
        Ok(Store { file, direct: None, size, path: path.to_path_buf() })
    }

    /// Opens a second descriptor with O_DIRECT for aligned I/O (unaligned I/O keeps using the
    /// page cache; the kernel keeps the two coherent: direct reads write back dirty cached pages
    /// of their range first, direct writes invalidate them).
    pub fn set_direct_io(&mut self) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(&self.path)?;
        self.direct = Some(f);
        Ok(())
    }

    fn direct_for(&self, len: usize, offset: u64) -> Option<&File> {
        self.direct.as_ref().filter(|_| {
            len > 0
                && len.is_multiple_of(DIRECT_ALIGN)
                && offset.is_multiple_of(DIRECT_ALIGN as u64)
                && len <= 8 << 20
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if let Some(f) = self.direct_for(buf.len(), offset) {
            let mut b = AlignedBuf::new(buf.len());
            f.read_exact_at(b.as_mut(), offset)?;
            buf.copy_from_slice(b.as_mut());
            return Ok(());
        }
        self.file.read_exact_at(buf, offset)
    }

    pub fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        if let Some(f) = self.direct_for(data.len(), offset) {
            let mut b = AlignedBuf::new(data.len());
            b.as_mut().copy_from_slice(data);
            return f.write_all_at(b.as_mut(), offset);
        }
        self.file.write_all_at(data, offset)
    }

    /// Makes completed writes durable.
    pub fn flush(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// Writes zeroes over a range (also the semantics of trim: both replicas must read back the
    /// same bytes afterwards).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = CHUNK.min(len - done);
            self.write_at(&zeros[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }

    /// Digests of `[offset, offset+len)` cut into `grain`-sized pieces (the last may be short).
    pub fn digests(&self, offset: u64, len: u64, grain: u32, out: &mut Vec<Digest>) -> std::io::Result<()> {
        let grain = u64::from(grain);
        let mut buf = vec![0u8; grain as usize];
        let mut o = offset;
        while o < offset + len {
            let n = grain.min(offset + len - o) as usize;
            self.read_at(&mut buf[..n], o)?;
            out.push(digest(&buf[..n]));
            o += n as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection_and_digests() {
        assert!(is_zero(&[0u8; 4097]));
        let mut v = vec![0u8; 4097];
        v[4096] = 1;
        assert!(!is_zero(&v));
        assert!(!is_zero(&v[1..]));
        assert_ne!(digest(&[0; 16]), digest(&[0; 17]));
    }

    #[test]
    fn store_round_trip() {
        let p = std::env::temp_dir().join(format!("mirror-store-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        assert!(Store::open(&p, None).is_err());
        let s = Store::open(&p, Some(1 << 20)).unwrap();
        assert_eq!(s.size(), 1 << 20);
        s.write_at(&[7u8; 8192], 4096).unwrap();
        let mut d = Vec::new();
        s.digests(0, 3 * 4096, 4096, &mut d).unwrap();
        assert_eq!(d.len(), 3);
        assert_eq!(d[1], digest(&[7u8; 4096]));
        s.write_zeroes(4096, 4096).unwrap();
        let mut b = [1u8; 4096];
        s.read_at(&mut b, 4096).unwrap();
        assert!(is_zero(&b));
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn direct_io_round_trip_with_unaligned_fallback() {
        let p = std::env::temp_dir().join(format!("mirror-store-direct-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        let mut s = Store::open(&p, Some(1 << 20)).unwrap();
        if let Err(e) = s.set_direct_io() {
            // tmpfs has no O_DIRECT.
            eprintln!("skipped: O_DIRECT unsupported on {}: {e}", p.display());
            let _ = std::fs::remove_file(&p);
            return;
        }
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        s.write_at(&data, 8192).unwrap(); // direct
        s.write_at(&[9u8; 100], 8192 + 10).unwrap(); // buffered, inside the direct range
        let mut back = vec![0u8; 8192];
        s.read_at(&mut back, 8192).unwrap(); // direct
        let mut want = data.clone();
        want[10..110].fill(9);
        assert_eq!(back, want, "direct read sees the buffered write");
        let mut small = [0u8; 3];
        s.read_at(&mut small, 8192 + 9).unwrap(); // buffered
        assert_eq!(small, [want[9], 9, 9]);
        let _ = std::fs::remove_file(&p);
    }
}
