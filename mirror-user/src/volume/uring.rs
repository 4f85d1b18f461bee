//! Local replica I/O through io_uring: one ring thread per file, requests from async code through
//! a channel, completions back through oneshots. Requests aligned to [`ALIGN`] go to an
//! `O_DIRECT` descriptor from aligned buffers (no double caching); unaligned ones, and files whose
//! filesystem refuses `O_DIRECT`, go to a buffered descriptor on the same ring.
//!
//! All `unsafe` of the local data path lives here: the aligned buffer and the submission of
//! entries whose buffers must outlive the kernel's use of them.

use std::{
    alloc::{alloc_zeroed, dealloc, handle_alloc_error, Layout},
    fs::{File, OpenOptions},
    os::{fd::AsRawFd, unix::fs::OpenOptionsExt},
    path::Path,
    ptr::NonNull,
    sync::{
        atomic::{AtomicU64, AtomicU8, Ordering},
        mpsc,
    },
    time::Instant,
};

use io_uring::{opcode, types, IoUring};

use super::inline;
use tokio::sync::oneshot;

/// Alignment (offset, length, buffer address) of direct I/O.
pub const ALIGN: usize = 4096;
const RING_ENTRIES: u32 = 256;
/// Largest read first tried from the page cache on the calling thread.
const CACHED_READ_MAX: usize = 128 << 10;

/// How [`UringFile::read_cached_into`] reads on the calling thread: `preadv2(RWF_NOWAIT)`, which
/// never waits for a device...
const INLINE_NOWAIT: u8 = 0;
/// ...or, on a filesystem that refuses `RWF_NOWAIT` but keeps its data in memory (tmpfs,
/// ramfs: there is no device to wait for, only a swapped-out page), a plain `pread`, as long as
/// such reads stay fast on average...
const INLINE_MEMORY: u8 = 1;
/// ...or not at all (every read goes to the ring).
const INLINE_NONE: u8 = 2;

/// True when `f`'s filesystem keeps file data in memory only (tmpfs, ramfs).
fn memory_backed(f: &File) -> bool {
    // SAFETY: `st` is a plain C struct that fstatfs fills in; all-zero bytes are a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: the descriptor is open (borrowed from `f`) and `st` is writable for the call.
    if unsafe { libc::fstatfs(f.as_raw_fd(), &raw mut st) } != 0 {
        return false;
    }
    // linux/magic.h; the C type of `f_type` differs between targets, the values fit in 32 bits.
    const TMPFS_MAGIC: u32 = 0x0102_1994;
    const RAMFS_MAGIC: u32 = 0x8584_58f6;
    matches!(st.f_type as u32, TMPFS_MAGIC | RAMFS_MAGIC)
}

/// A heap buffer aligned to [`ALIGN`].
struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: the buffer is uniquely owned heap memory; moving it between threads is like moving a
// Vec<u8>.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let layout = Layout::from_size_align(len.max(ALIGN), ALIGN).expect("valid layout");
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(p).unwrap_or_else(|| handle_alloc_error(layout));
        AlignedBuf { ptr, len, layout }
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr points to at least `len` initialized (zeroed or written) bytes we own.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this very layout, freed once.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

enum Buf {
    Aligned(AlignedBuf),
    Plain(Vec<u8>),
}

impl Buf {
    fn ptr_len(&mut self) -> (*mut u8, u32) {
        match self {
            Buf::Aligned(b) => (b.ptr.as_ptr(), b.len as u32),
            Buf::Plain(v) => (v.as_mut_ptr(), v.len() as u32),
        }
    }
    fn into_vec(self) -> Vec<u8> {
        match self {
            Buf::Aligned(b) => b.as_slice().to_vec(),
            Buf::Plain(v) => v,
        }
    }
}

enum Op {
    Read,
    Write,
    Fsync,
}

type Reply = oneshot::Sender<(std::io::Result<usize>, Buf)>;

struct Req {
    op: Op,
    direct: bool,
    offset: u64,
    buf: Buf,
    reply: Reply,
}

/// A file driven through io_uring.
#[derive(Debug)]
pub struct UringFile {
    tx: mpsc::Sender<Req>,
    /// The `O_DIRECT` descriptor (a duplicate of the ring thread's), for the ublk fast path.
    direct: Option<File>,
    /// The buffered descriptor, for reads served from the page cache without the ring (and the
    /// ublk fast path's unaligned requests).
    cached: File,
    /// How reads are tried on the calling thread (`INLINE_*`): with `RWF_NOWAIT` until the
    /// filesystem says it does not support it (tmpfs, say; then no read pays that failed call
    /// again), then a plain `pread` if the data is in memory, else not at all.
    inline: AtomicU8,
    /// The filesystem keeps the data in memory (tmpfs, ramfs).
    memory: bool,
    /// Mean duration of the plain inline reads (`INLINE_MEMORY`), microseconds, and their count.
    mem_read_ewma_us: AtomicU64,
    mem_reads: AtomicU64,
}

impl UringFile {
    /// Opens `path` for io_uring I/O; with `want_direct`, also an `O_DIRECT` descriptor when the
    /// filesystem allows. Only ask for direct I/O when nothing else reads or writes the file
    /// through the page cache: a buffered read racing a direct write can leave a stale page.
    pub fn open(path: &Path, want_direct: bool) -> std::io::Result<UringFile> {
        let buffered = OpenOptions::new().read(true).write(true).open(path)?;
        let direct = if want_direct {
            OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(path).ok()
        } else {
            None
        };
        let ring = IoUring::new(RING_ENTRIES)?;
        let (tx, rx) = mpsc::channel::<Req>();
        let direct_dup = direct.as_ref().map(File::try_clone).transpose()?;
        let cached = buffered.try_clone()?;
        std::thread::Builder::new()
            .name("mirror-uring".into())
            .spawn(move || ring_loop(ring, buffered, direct, rx))?;
        let memory = memory_backed(&cached);
        Ok(UringFile {
            tx,
            direct: direct_dup,
            cached,
            inline: AtomicU8::new(INLINE_NOWAIT),
            memory,
            mem_read_ewma_us: AtomicU64::new(0),
            mem_reads: AtomicU64::new(0),
        })
    }

    /// True when aligned requests bypass the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// The descriptor a request of `len` bytes at `offset` from an [`ALIGN`]-aligned buffer uses:
    /// the `O_DIRECT` one when the file has it and the request is aligned, else the buffered one
    /// (the same choice as [`UringFile::read`] and [`UringFile::write`]). Valid while `self` is.
    pub fn fd_for(&self, offset: u64, len: usize) -> std::os::fd::RawFd {
        match &self.direct {
            Some(d) if self.aligned(offset, len) => d.as_raw_fd(),
            _ => self.cached.as_raw_fd(),
        }
    }

    /// A buffered `pwrite` of all of `data` on the calling thread.
    pub fn write_cached(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.cached, data, offset)
    }

    fn aligned(&self, offset: u64, len: usize) -> bool {
        self.direct.is_some() && len > 0 && offset.is_multiple_of(ALIGN as u64) && len.is_multiple_of(ALIGN)
    }

    async fn submit(&self, op: Op, direct: bool, offset: u64, buf: Buf) -> std::io::Result<(usize, Buf)> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Req { op, direct, offset, buf, reply })
            .map_err(|_| std::io::Error::other("io_uring thread gone"))?;
        let (r, buf) = rx.await.map_err(|_| std::io::Error::other("io_uring thread gone"))?;
        Ok((r?, buf))
    }

    /// Reads the range right here if the page cache holds all of it (`preadv2` with
    /// `RWF_NOWAIT` never waits for the disk); `None` otherwise (also on errors and short reads:
    /// the ring then does the read and reports them).
    fn read_cached(&self, offset: u64, len: usize) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.read_cached_into(offset, &mut buf).then_some(buf)
    }

    /// [`UringFile::read`]'s page-cache attempt into the caller's buffer: true when all of `buf`
    /// was read (never on a file with `O_DIRECT`, whose data the page cache may not hold). A
    /// read that might wait for a device is never done here: with `RWF_NOWAIT` the kernel says
    /// so; on tmpfs or ramfs, which refuse `RWF_NOWAIT`, the data is in memory (a plain `pread`
    /// can wait only for a swapped-out page) and such reads are done here while they stay fast
    /// on average, like the inline writes.
    pub fn read_cached_into(&self, offset: u64, buf: &mut [u8]) -> bool {
        let Ok(off) = libc::off_t::try_from(offset) else { return false };
        if buf.is_empty() || self.direct.is_some() {
            return false;
        }
        let iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        let n = match self.inline.load(Ordering::Relaxed) {
            INLINE_NOWAIT => {
                // SAFETY: `iov` describes the writable bytes of `buf`, which outlives this
                // synchronous call; the descriptor is open for as long as `self`.
                let n = unsafe {
                    libc::preadv2(self.cached.as_raw_fd(), &raw const iov, 1, off, libc::RWF_NOWAIT)
                };
                if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EOPNOTSUPP) {
                    let (next, how) = if self.memory {
                        (INLINE_MEMORY, "memory-backed: reads are plain preads on the calling thread")
                    } else {
                        (INLINE_NONE, "every read goes through io_uring")
                    };
                    self.inline.store(next, Ordering::Relaxed);
                    tracing::debug!("no RWF_NOWAIT reads on this filesystem; {how}");
                }
                n
            }
            INLINE_MEMORY => {
                let k = self.mem_reads.fetch_add(1, Ordering::Relaxed);
                // Slow on average (swapping): the ring takes them, one in `inline::PROBE` aside.
                if inline::too_slow(&self.mem_read_ewma_us, k) {
                    return false;
                }
                let t = Instant::now();
                // SAFETY: as above.
                let n = unsafe { libc::preadv2(self.cached.as_raw_fd(), &raw const iov, 1, off, 0) };
                inline::ewma(&self.mem_read_ewma_us, t.elapsed().as_micros() as u64);
                n
            }
            _ => return false,
        };
        usize::try_from(n).ok() == Some(buf.len())
    }

    pub async fn read(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        if len > 0 && len <= CACHED_READ_MAX && self.direct.is_none() {
            if let Some(b) = self.read_cached(offset, len) {
                return Ok(b);
            }
        }
        let direct = self.aligned(offset, len);
        let buf = if direct { Buf::Aligned(AlignedBuf::new(len)) } else { Buf::Plain(vec![0u8; len]) };
        let (n, buf) = self.submit(Op::Read, direct, offset, buf).await?;
        if n != len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("short read: {n} of {len} bytes at {offset}"),
            ));
        }
        Ok(buf.into_vec())
    }

    /// Writes all of `data` at `offset`. A short write goes on with the rest, so a filesystem
    /// that ran out of space reports it (ENOSPC) instead of a count.
    pub async fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut done = 0;
        while done < data.len() {
            let (off, rest) = (offset + done as u64, &data[done..]);
            let direct = self.aligned(off, rest.len());
            let buf = if direct {
                let mut b = AlignedBuf::new(rest.len());
                b.as_mut_slice().copy_from_slice(rest);
                Buf::Aligned(b)
            } else {
                Buf::Plain(rest.to_vec())
            };
            let (n, _) = self.submit(Op::Write, direct, off, buf).await?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::WriteZero,
                    format!("wrote nothing of {} bytes at {off}", rest.len()),
                ));
            }
            done += n;
        }
        Ok(())
    }

    /// fdatasync through the ring.
    pub async fn fsync(&self) -> std::io::Result<()> {
        self.submit(Op::Fsync, false, 0, Buf::Plain(Vec::new())).await.map(|_| ())
    }
}

fn ring_loop(mut ring: IoUring, buffered: File, direct: Option<File>, rx: mpsc::Receiver<Req>) {
    let mut slots: Vec<Option<(Buf, Reply)>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut in_flight = 0usize;
    let mut backlog: std::collections::VecDeque<Req> = Default::default();
    loop {
        if in_flight == 0 && backlog.is_empty() {
            match rx.recv() {
                Ok(r) => backlog.push_back(r),
                Err(_) => return,
            }
        }
        while let Ok(r) = rx.try_recv() {
            backlog.push_back(r);
        }
        while in_flight < RING_ENTRIES as usize {
            let Some(mut r) = backlog.pop_front() else { break };
            let fd = match (&direct, r.direct) {
                (Some(d), true) => types::Fd(d.as_raw_fd()),
                _ => types::Fd(buffered.as_raw_fd()),
            };
            let (ptr, len) = r.buf.ptr_len();
            let entry = match r.op {
                Op::Read => opcode::Read::new(fd, ptr, len).offset(r.offset).build(),
                Op::Write => opcode::Write::new(fd, ptr, len).offset(r.offset).build(),
                Op::Fsync => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
            };
            let slot = free.pop().unwrap_or_else(|| {
                slots.push(None);
                slots.len() - 1
            });
            let entry = entry.user_data(slot as u64);
            // The buffer moves into the slot and stays there, at the same heap address, until its
            // completion is reaped below.
            slots[slot] = Some((r.buf, r.reply));
            // SAFETY: the entry's buffer (if any) is owned by `slots[slot]` and neither moved nor
            // freed before the kernel posts this entry's completion; the fds outlive the ring
            // loop. The queue has room: in_flight < RING_ENTRIES and every submission is flushed
            // by submit_and_wait before the next round.
            let pushed = unsafe { ring.submission().push(&entry) };
            if pushed.is_err() {
                let (buf, reply) = slots[slot].take().expect("just stored");
                free.push(slot);
                let _ = reply.send((Err(std::io::Error::other("io_uring submission queue full")), buf));
                continue;
            }
            in_flight += 1;
        }
        if let Err(e) = ring.submit_and_wait(1) {
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!("io_uring submit failed: {e}");
        }
        let done: Vec<(u64, i32)> = ring.completion().map(|c| (c.user_data(), c.result())).collect();
        for (slot, res) in done {
            let slot = slot as usize;
            if let Some((buf, reply)) = slots.get_mut(slot).and_then(Option::take) {
                in_flight -= 1;
                free.push(slot);
                let r = if res < 0 { Err(std::io::Error::from_raw_os_error(-res)) } else { Ok(res as usize) };
                let _ = reply.send((r, buf));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn aligned_and_unaligned_io_round_trip() {
        let p = std::env::temp_dir().join(format!("mirror-uring-{}", std::process::id()));
        std::fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
        let f = UringFile::open(&p, true).unwrap();
        assert!(f.is_direct(), "ext4 allows O_DIRECT");
        let data: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
        f.write(4096, &data).await.unwrap();
        assert_eq!(f.read(4096, 8192).await.unwrap(), data);
        // Unaligned: buffered descriptor, same file, coherent with the direct one.
        f.write(4096 + 100, &[0xaa; 300]).await.unwrap();
        let back = f.read(4096, 8192).await.unwrap();
        assert_eq!(&back[100..400], &[0xaa; 300][..]);
        assert_eq!(&back[..100], &data[..100]);
        f.fsync().await.unwrap();
        // Many at once.
        let f = std::sync::Arc::new(f);
        let mut tasks = Vec::new();
        for i in 0..64u64 {
            let f = f.clone();
            tasks.push(tokio::spawn(async move { f.write(i * 4096, &[i as u8; 4096]).await }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        for i in 0..64u64 {
            assert_eq!(f.read(i * 4096, 4096).await.unwrap(), vec![i as u8; 4096]);
        }
        assert!(f.read(1 << 20, 4096).await.is_err(), "read past the end is short");
        let _ = std::fs::remove_file(&p);
    }

    /// tmpfs refuses `RWF_NOWAIT`: the first cached read says so (and falls to the ring), the
    /// next ones are plain `pread`s on the calling thread, with the right bytes; a file on a
    /// device-backed filesystem never reads that way (only with `RWF_NOWAIT`).
    #[test]
    fn memory_backed_files_are_read_inline_after_rwf_nowait_is_refused() {
        let shm = std::path::Path::new("/dev/shm");
        let p = shm.join(format!("mirror-uring-shm-{}", std::process::id()));
        if std::fs::write(&p, b"").is_err() {
            eprintln!("skipped: no writable /dev/shm (tmpfs) here");
            return;
        }
        let data: Vec<u8> = (0..16384u32).map(|i| (i * 13 + 5) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let f = UringFile::open(&p, false).unwrap();
        assert!(f.memory, "/dev/shm is tmpfs");
        let mut buf = vec![0u8; 4096];
        let first = f.read_cached_into(4096, &mut buf);
        if first {
            // Newer kernels serve RWF_NOWAIT reads from tmpfs: then that is what runs.
            assert_eq!(buf, data[4096..8192]);
            assert_eq!(f.inline.load(Ordering::Relaxed), INLINE_NOWAIT);
            eprintln!("note: this kernel reads tmpfs with RWF_NOWAIT; the plain-pread mode is tested forced");
            f.inline.store(INLINE_MEMORY, Ordering::Relaxed);
        } else {
            assert_eq!(f.inline.load(Ordering::Relaxed), INLINE_MEMORY, "tmpfs refused RWF_NOWAIT");
        }
        buf.fill(0);
        assert!(f.read_cached_into(8192, &mut buf), "a plain pread from memory");
        assert_eq!(buf, data[8192..12288]);
        assert!(!f.read_cached_into(16384, &mut buf), "past the end: short, not done inline");
        assert_eq!(f.mem_reads.load(Ordering::Relaxed), 2);
        // Slow on average (swapping): the ring takes them, but one in inline::PROBE measures.
        f.mem_read_ewma_us.store(inline::SLOW_US * 10, Ordering::Relaxed);
        let inline: usize = (0..inline::PROBE).map(|_| usize::from(f.read_cached_into(0, &mut buf))).sum();
        assert_eq!(inline, 1, "one probe read in {}", inline::PROBE);
        assert!(
            f.mem_read_ewma_us.load(Ordering::Relaxed) < inline::SLOW_US * 10,
            "the probe updated the mean"
        );
        let _ = std::fs::remove_file(&p);

        let q = std::env::temp_dir().join(format!("mirror-uring-disk-{}", std::process::id()));
        std::fs::write(&q, &data).unwrap();
        let g = UringFile::open(&q, false).unwrap();
        if g.memory {
            eprintln!("skipped (second half): the temporary directory is memory-backed here");
        } else {
            let _ = g.read_cached_into(0, &mut buf);
            assert_ne!(
                g.inline.load(Ordering::Relaxed),
                INLINE_MEMORY,
                "a disk filesystem never reads plain inline"
            );
            assert_eq!(g.mem_reads.load(Ordering::Relaxed), 0);
        }
        let _ = std::fs::remove_file(&q);
    }
}
