//! The NBD transmission phase: requests read continuously and checked, run concurrently on
//! the device (bounded by `NbdOptions::max_in_flight` and a byte budget), replies (simple or
//! structured) written by one writer task. A write's payload is read in full before the
//! device sees it.

use std::{future::Future, io, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader},
    sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore},
};

use super::{
    discard, protocol, until_stop,
    wire::{
        errno, CMD_DISC, CMD_FLAG_DF, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLUSH, CMD_READ, CMD_TRIM,
        CMD_WRITE, CMD_WRITE_ZEROES, MAX_STRING, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, REPLY_TYPE_NONE,
        REPLY_TYPE_OFFSET_DATA, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
    },
    Shared,
};
use crate::volume::BlockDev;

/// How long a closing connection waits for its in-flight requests.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Reply payloads up to this size are copied behind their header and sent in one write.
const COALESCE_MAX: usize = 64 << 10;

/// A failed request: the NBD error value and a message for structured replies and logs.
#[derive(Debug)]
struct Failure {
    errno: u32,
    msg: String,
}

fn fail(errno: u32, msg: String) -> Failure {
    Failure { errno, msg }
}

/// Maps a device error to an NBD error value.
pub fn nbd_errno(e: &io::Error) -> u32 {
    if let Some(code) = e.raw_os_error() {
        return match code {
            libc::EPERM | libc::EACCES | libc::EROFS => errno::EPERM,
            libc::EIO => errno::EIO,
            libc::ENOMEM => errno::ENOMEM,
            libc::EINVAL => errno::EINVAL,
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => errno::ENOSPC,
            libc::EOVERFLOW => errno::EOVERFLOW,
            libc::ENOTSUP => errno::ENOTSUP,
            libc::ESHUTDOWN => errno::ESHUTDOWN,
            _ => errno::EIO,
        };
    }
    match e.kind() {
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => errno::EPERM,
        io::ErrorKind::InvalidInput => errno::EINVAL,
        io::ErrorKind::StorageFull | io::ErrorKind::FileTooLarge => errno::ENOSPC,
        io::ErrorKind::OutOfMemory => errno::ENOMEM,
        io::ErrorKind::Unsupported => errno::ENOTSUP,
        _ => errno::EIO,
    }
}

enum Op {
    Read { offset: u64, len: u32 },
    Write { offset: u64, data: Vec<u8>, fua: bool },
    Flush,
    Trim { offset: u64, len: u64, fua: bool },
    Zeroes { offset: u64, len: u64, fua: bool },
}

struct Header {
    magic: u32,
    flags: u16,
    typ: u16,
    cookie: u64,
    offset: u64,
    len: u32,
}

/// Reads a request header; `None` on a clean end of stream before its first byte.
async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<Header>> {
    let mut b = [0u8; 28];
    let mut filled = 0;
    while filled < b.len() {
        let n = r.read(&mut b[filled..]).await?;
        if n == 0 {
            if filled == 0 {
                return Ok(None);
            }
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "client closed mid-request"));
        }
        filled += n;
    }
    let be32 = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().expect("4 bytes"));
    let be64 = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    Ok(Some(Header {
        magic: be32(0),
        flags: u16::from_be_bytes([b[4], b[5]]),
        typ: u16::from_be_bytes([b[6], b[7]]),
        cookie: be64(8),
        offset: be64(16),
        len: be32(24),
    }))
}

fn in_range(size: u64, offset: u64, len: u64) -> bool {
    offset.checked_add(len).is_some_and(|end| end <= size)
}

/// Checks a request (other than WRITE's payload, already read) and builds its operation.
fn validate<B>(
    shared: &Shared<B>,
    h: &Header,
    structured: bool,
    data: Option<Vec<u8>>,
) -> Result<Op, Failure> {
    let fua = h.flags & CMD_FLAG_FUA != 0;
    let allowed = match h.typ {
        CMD_READ if structured => CMD_FLAG_FUA | CMD_FLAG_DF,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        _ => CMD_FLAG_FUA,
    };
    if h.flags & !allowed != 0 {
        return Err(fail(
            errno::EINVAL,
            format!("command flags {:#x} not valid for command {}", h.flags, h.typ),
        ));
    }
    let (off, len) = (h.offset, u64::from(h.len));
    let writes = matches!(h.typ, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && shared.opts.read_only {
        return Err(fail(errno::EPERM, "the export is read-only".into()));
    }
    let range = |e: u32| {
        if in_range(shared.size, off, len) {
            Ok(())
        } else {
            Err(fail(e, format!("range {off}+{len} exceeds the export size {}", shared.size)))
        }
    };
    match h.typ {
        CMD_READ => {
            if h.len > shared.opts.max_request {
                return Err(fail(
                    errno::EINVAL,
                    format!("read of {len} bytes exceeds the maximum {}", shared.opts.max_request),
                ));
            }
            range(errno::EINVAL)?;
            Ok(Op::Read { offset: off, len: h.len })
        }
        CMD_WRITE => {
            range(errno::ENOSPC)?;
            Ok(Op::Write { offset: off, data: data.unwrap_or_default(), fua })
        }
        CMD_FLUSH => Ok(Op::Flush),
        CMD_TRIM => {
            range(errno::EINVAL)?;
            Ok(Op::Trim { offset: off, len, fua })
        }
        CMD_WRITE_ZEROES => {
            range(errno::ENOSPC)?;
            Ok(Op::Zeroes { offset: off, len, fua })
        }
        t => Err(fail(errno::EINVAL, format!("command {t} is not supported"))),
    }
}

async fn execute<B: BlockDev>(dev: &B, op: Op) -> Result<Option<Vec<u8>>, Failure> {
    let io = |what: &str| {
        let what = what.to_string();
        move |e: io::Error| fail(nbd_errno(&e), format!("{what}: {e}"))
    };
    match op {
        Op::Read { offset, len } => {
            if len == 0 {
                return Ok(Some(Vec::new()));
            }
            let data = dev.read(offset, len).await.map_err(io("read"))?;
            if data.len() != len as usize {
                return Err(fail(
                    errno::EIO,
                    format!("device returned {} bytes for a {len}-byte read", data.len()),
                ));
            }
            Ok(Some(data))
        }
        Op::Write { offset, data, fua } => {
            if data.is_empty() {
                if fua {
                    dev.flush().await.map_err(io("flush"))?;
                }
                return Ok(None);
            }
            dev.write(offset, data, fua).await.map_err(io("write"))?;
            Ok(None)
        }
        Op::Flush => {
            dev.flush().await.map_err(io("flush"))?;
            Ok(None)
        }
        Op::Trim { offset, len, fua } => {
            if len > 0 {
                dev.trim(offset, len).await.map_err(io("trim"))?;
            }
            if fua {
                dev.flush().await.map_err(io("flush"))?;
            }
            Ok(None)
        }
        Op::Zeroes { offset, len, fua } => {
            if len > 0 {
                dev.write_zeroes(offset, len).await.map_err(io("write zeroes"))?;
            }
            if fua {
                dev.flush().await.map_err(io("flush"))?;
            }
            Ok(None)
        }
    }
}

/// Turns a panic while polling the inner future into `Err(())`.
struct CatchUnwind<F>(std::pin::Pin<Box<F>>);

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, ()>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let inner = self.0.as_mut();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(std::task::Poll::Ready(v)) => std::task::Poll::Ready(Ok(v)),
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Err(_) => std::task::Poll::Ready(Err(())),
        }
    }
}

/// One reply on its way to the writer task, with the permits of its request (released once it
/// is written, so that queued replies count against the in-flight and byte limits).
struct Reply {
    hdr: Vec<u8>,
    payload: Option<Vec<u8>>,
    _permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

/// Encodes the reply to one request: header (with small payloads appended) and a large payload.
fn encode_reply(
    structured: bool,
    cookie: u64,
    offset: u64,
    res: Result<Option<Vec<u8>>, Failure>,
) -> (Vec<u8>, Option<Vec<u8>>) {
    let mut hdr = Vec::with_capacity(32);
    let mut payload: Option<Vec<u8>> = None;
    let chunk = |hdr: &mut Vec<u8>, typ: u16, len: usize| {
        hdr.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        hdr.extend_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
        hdr.extend_from_slice(&typ.to_be_bytes());
        hdr.extend_from_slice(&cookie.to_be_bytes());
        hdr.extend_from_slice(&(len as u32).to_be_bytes());
    };
    match res {
        Ok(data) if structured => match data {
            Some(d) if !d.is_empty() => {
                chunk(&mut hdr, REPLY_TYPE_OFFSET_DATA, 8 + d.len());
                hdr.extend_from_slice(&offset.to_be_bytes());
                payload = Some(d);
            }
            _ => chunk(&mut hdr, REPLY_TYPE_NONE, 0),
        },
        Ok(data) => {
            hdr.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
            hdr.extend_from_slice(&0u32.to_be_bytes());
            hdr.extend_from_slice(&cookie.to_be_bytes());
            payload = data;
        }
        Err(f) if structured => {
            let mut msg = f.msg.as_str();
            while msg.len() > MAX_STRING {
                let mut end = MAX_STRING;
                while !msg.is_char_boundary(end) {
                    end -= 1;
                }
                msg = &msg[..end];
            }
            chunk(&mut hdr, REPLY_TYPE_ERROR, 6 + msg.len());
            hdr.extend_from_slice(&f.errno.to_be_bytes());
            hdr.extend_from_slice(&(msg.len() as u16).to_be_bytes());
            hdr.extend_from_slice(msg.as_bytes());
        }
        Err(f) => {
            hdr.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
            hdr.extend_from_slice(&f.errno.to_be_bytes());
            hdr.extend_from_slice(&cookie.to_be_bytes());
        }
    }
    if let Some(p) = payload.take_if(|p| p.len() <= COALESCE_MAX) {
        hdr.extend_from_slice(&p);
    }
    (hdr, payload)
}

/// The one writer of a connection: writes replies as they come, batching whatever is queued
/// into one buffer flush. Ends when every sender is gone (then shuts the stream down) or on a
/// write error.
async fn writer_task<W: AsyncWrite + Unpin>(w: W, mut rx: mpsc::Receiver<Reply>) -> io::Result<()> {
    let mut w = tokio::io::BufWriter::with_capacity(256 << 10, w);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(r) = next {
            w.write_all(&r.hdr).await?;
            if let Some(p) = &r.payload {
                w.write_all(p).await?;
            }
            next = rx.try_recv().ok();
        }
        w.flush().await?;
    }
    w.shutdown().await
}

/// Runs a request on the reader's task as far as it goes without waiting: a request the device
/// completes at once (a page-cache read, a small buffered write done inline) costs no task and
/// no handoff between workers. Only a request that would wait becomes a task of its own (polled
/// again there; its futures re-register their wakers), so a slow request never holds up the
/// reading of the next ones.
fn run_or_spawn<F: Future<Output = ()> + Send + 'static>(mut request: std::pin::Pin<Box<F>>) {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    // A panic outside the device (which `CatchUnwind` already covers) would otherwise end the
    // reader; as a task of its own it would only have lost this reply.
    let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| request.as_mut().poll(&mut cx)));
    match polled {
        Ok(std::task::Poll::Ready(())) => {}
        Ok(std::task::Poll::Pending) => {
            tokio::spawn(request);
        }
        Err(_) => tracing::error!("NBD: a request panicked outside the device; its reply is lost"),
    }
}

pub(super) async fn transmission<B, R, W>(
    shared: Arc<Shared<B>>,
    mut r: BufReader<R>,
    w: W,
    structured: bool,
    mut stop: watch::Receiver<bool>,
) -> io::Result<()>
where
    B: BlockDev,
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let max_in_flight = shared.opts.max_in_flight;
    // Every queued reply holds a slot, so sends never wait.
    let (tx, rx) = mpsc::channel::<Reply>(max_in_flight);
    let mut writer = tokio::spawn(writer_task(w, rx));
    let slots = Arc::new(Semaphore::new(max_in_flight));
    let budget = Arc::new(Semaphore::new(shared.byte_budget as usize));
    let result: io::Result<()> = loop {
        let slot = slots.clone().acquire_owned().await.expect("semaphore never closed");
        let h = tokio::select! {
            biased;
            () = until_stop(&mut stop) => break Ok(()),
            h = read_header(&mut r) => h,
        };
        let h = match h {
            Ok(Some(h)) => h,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        if h.magic != REQUEST_MAGIC {
            break Err(protocol(format!("bad request magic {:#010x}", h.magic)));
        }
        if h.typ == CMD_DISC {
            break Ok(());
        }
        let max = shared.opts.max_request;
        let sized = matches!(h.typ, CMD_READ | CMD_WRITE) && h.len <= max;
        // Bytes held in memory by this request (payload or read buffer).
        let held = if sized { h.len } else { 0 };
        let bytes = budget.clone().acquire_many_owned(held).await.expect("semaphore never closed");
        let mut data = None;
        if h.typ == CMD_WRITE {
            if h.len > max {
                // The payload cannot be accepted; skip it so the stream stays in sync (it is
                // at most 4 GiB, read and thrown away in small pieces).
                let skipped = tokio::select! {
                    biased;
                    () = until_stop(&mut stop) => break Ok(()),
                    s = discard(&mut r, u64::from(h.len)) => s,
                };
                if let Err(e) = skipped {
                    break Err(e);
                }
                let f = fail(errno::EINVAL, format!("write of {} bytes exceeds the maximum {max}", h.len));
                let (hdr, payload) = encode_reply(structured, h.cookie, h.offset, Err(f));
                if tx.send(Reply { hdr, payload, _permits: (slot, bytes) }).await.is_err() {
                    break Err(io::Error::new(io::ErrorKind::BrokenPipe, "cannot send replies"));
                }
                continue;
            }
            let mut buf = vec![0u8; h.len as usize];
            let got = tokio::select! {
                biased;
                () = until_stop(&mut stop) => break Ok(()),
                g = r.read_exact(&mut buf) => g,
            };
            if let Err(e) = got {
                break Err(io::Error::new(
                    e.kind(),
                    format!("client closed during a {}-byte write payload (nothing written): {e}", h.len),
                ));
            }
            data = Some(buf);
        }
        let op = validate(&shared, &h, structured, data);
        let shared = shared.clone();
        let tx = tx.clone();
        let request = Box::pin(async move {
            let res = match op {
                Ok(op) => {
                    // A panicking device fails this request with EIO instead of leaving it
                    // unanswered.
                    let res = match CatchUnwind(Box::pin(execute(&*shared.dev, op))).await {
                        Ok(res) => res,
                        Err(()) => Err(fail(errno::EIO, "the device panicked".into())),
                    };
                    if let Err(f) = &res {
                        let (t, o, l) = (h.typ, h.offset, h.len);
                        tracing::warn!("NBD: command {t} at {o}+{l}: {} (errno {})", f.msg, f.errno);
                    }
                    res
                }
                Err(f) => {
                    let (t, o, l) = (h.typ, h.offset, h.len);
                    tracing::debug!("NBD: refused command {t} at {o}+{l}: {} (errno {})", f.msg, f.errno);
                    Err(f)
                }
            };
            let (hdr, payload) = encode_reply(structured, h.cookie, h.offset, res);
            // A closed channel means the writer failed (client gone); the permits drop with it.
            let _ = tx.send(Reply { hdr, payload, _permits: (slot, bytes) }).await;
        });
        run_or_spawn(request);
    };
    drop(tx);
    // Let the requests already read finish and their replies go out, then close. A client
    // that stopped reading replies cannot hold a server shutdown forever.
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, slots.acquire_many(max_in_flight as u32)).await;
    if drained.is_err() {
        tracing::warn!("NBD: replies still pending after {DRAIN_TIMEOUT:?}; closing anyway");
        writer.abort();
        return result;
    }
    // All replies are written (or the writer failed); the writer now shuts the stream down.
    match tokio::time::timeout(DRAIN_TIMEOUT, &mut writer).await {
        Ok(Ok(Err(e))) if result.is_ok() => Err(e),
        Ok(_) => result,
        Err(_) => {
            writer.abort();
            result
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_mapping() {
        let raw = |e| nbd_errno(&io::Error::from_raw_os_error(e));
        assert_eq!(raw(libc::ENOSPC), errno::ENOSPC);
        assert_eq!(raw(libc::EDQUOT), errno::ENOSPC);
        assert_eq!(raw(libc::EROFS), errno::EPERM);
        assert_eq!(raw(libc::EINVAL), errno::EINVAL);
        assert_eq!(raw(libc::ECONNREFUSED), errno::EIO);
        assert_eq!(nbd_errno(&io::Error::new(io::ErrorKind::InvalidInput, "x")), errno::EINVAL);
        assert_eq!(nbd_errno(&io::Error::other("replica gone")), errno::EIO);
    }
}
