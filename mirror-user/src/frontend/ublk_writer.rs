//! The second writer of a ublk queue: a thread that does the fast path's buffered `pwrite`s
//! for one replica while the queue thread does the other replica's, so a dual write costs about
//! one write instead of two in a row (what md raid1 gets from its two loop workers).
//!
//! The queue thread hands a job over ([`Writer::submit`]) before it writes the other replica
//! itself; the writer thread writes it and posts `(tag, ok)` to a list whose eventfd the queue's
//! io_uring polls; the queue thread takes the results ([`Writer::take_done`]) and commits the
//! request once both replicas have it. The job points into the tag's ublk io buffer, which the
//! kernel leaves alone until that commit. [`Writer::stop`] finishes what was handed over and
//! joins the thread, so nothing points into the buffers after it returns.

use std::{
    collections::VecDeque,
    os::fd::RawFd,
    sync::{Arc, Condvar, Mutex},
    thread::JoinHandle,
};

use super::ublk::Mailbox;

/// One buffered write of `len` bytes at `ptr` to `fd` at `offset`, for request `tag`.
#[derive(Debug)]
pub(crate) struct Job {
    pub tag: u16,
    pub fd: RawFd,
    pub ptr: *const u8,
    pub len: usize,
    pub offset: u64,
}

// SAFETY: `ptr` points into a ublk io buffer that stays allocated and unmodified until the
// queue thread has taken this job's result (it commits the request only then, and joins the
// writer before the buffers are freed), so the writer thread may read it; `fd` is a replica's
// descriptor, open for as long as the volume, which outlives the queue.
unsafe impl Send for Job {}

#[derive(Default)]
struct Jobs {
    queue: VecDeque<Job>,
    stop: bool,
    /// The writer thread waits on the condvar (a submit must wake it).
    idle: bool,
}

struct Shared {
    jobs: Mutex<Jobs>,
    cv: Condvar,
    /// Results, `(tag, ok)`.
    done: Mailbox<(u16, bool)>,
}

/// The writer thread of one ublk queue.
pub(crate) struct Writer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    pub(super) fn start(qid: u16) -> std::io::Result<Writer> {
        let shared =
            Arc::new(Shared { jobs: Mutex::new(Jobs::default()), cv: Condvar::new(), done: Mailbox::new()? });
        let s = shared.clone();
        let thread = std::thread::Builder::new().name(format!("mirror-ublk-w{qid}")).spawn(move || {
            let (n, failed) = run(&s);
            tracing::debug!(qid, writes = n, failed, "ublk writer thread done");
        })?;
        Ok(Writer { shared, thread: Some(thread) })
    }

    /// The eventfd that counts posted results (poll it for `POLLIN`).
    pub(super) fn efd(&self) -> &std::fs::File {
        self.shared.done.efd()
    }

    pub(super) fn submit(&self, job: Job) {
        let wake = {
            let mut j = self.shared.jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            j.queue.push_back(job);
            j.idle
        };
        if wake {
            self.shared.cv.notify_one();
        }
    }

    /// The results posted since the last call: `(tag, ok)`.
    pub(super) fn take_done(&self) -> Vec<(u16, bool)> {
        self.shared.done.take()
    }

    /// Writes what was handed over and joins the thread.
    pub(super) fn stop(self) {
        drop(self);
    }
}

impl Drop for Writer {
    /// As [`Writer::stop`]: nothing points into the io buffers once this returns.
    fn drop(&mut self) {
        self.shared.jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner).stop = true;
        self.shared.cv.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The writer thread's loop until stopped: how many jobs it wrote, how many failed.
fn run(s: &Shared) -> (u64, u64) {
    let (mut n, mut failed) = (0, 0);
    loop {
        let job = {
            let mut j = s.jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            loop {
                if let Some(job) = j.queue.pop_front() {
                    break job;
                }
                if j.stop {
                    return (n, failed);
                }
                j.idle = true;
                j = s.cv.wait(j).unwrap_or_else(std::sync::PoisonError::into_inner);
                j.idle = false;
            }
        };
        let ok = write_all(&job);
        n += 1;
        failed += u64::from(!ok);
        s.done.post((job.tag, ok));
    }
}

fn write_all(job: &Job) -> bool {
    let mut done = 0usize;
    while done < job.len {
        let Ok(off) = libc::off_t::try_from(job.offset + done as u64) else { return false };
        // SAFETY: `job.ptr .. job.ptr + job.len` is readable for as long as the job is not
        // reported done (see `Job`), and `fd` is open.
        let n = unsafe { libc::pwrite(job.fd, job.ptr.add(done).cast(), job.len - done, off) };
        if n < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            tracing::debug!(
                tag = job.tag,
                offset = job.offset,
                "ublk writer: pwrite failed: {}",
                std::io::Error::last_os_error()
            );
            return false;
        }
        if n == 0 {
            return false;
        }
        done += n as usize;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn jobs_are_written_and_reported_and_stop_finishes_them() {
        let p = std::env::temp_dir().join(format!("mirror-ublk-writer-{}", std::process::id()));
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(1 << 20).unwrap();
        let w = Writer::start(0).unwrap();
        let bufs: Vec<Vec<u8>> = (0..64u8).map(|i| vec![i ^ 0x5a; 4096]).collect();
        for (i, b) in bufs.iter().enumerate() {
            w.submit(Job {
                tag: i as u16,
                fd: f.as_raw_fd(),
                ptr: b.as_ptr(),
                len: b.len(),
                offset: i as u64 * 8192,
            });
        }
        // A write past what the descriptor allows fails and is reported so.
        let ro = std::fs::File::open(&p).unwrap();
        w.submit(Job { tag: 999, fd: ro.as_raw_fd(), ptr: bufs[0].as_ptr(), len: 4096, offset: 0 });
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while got.len() < 65 && std::time::Instant::now() < deadline {
            got.extend(w.take_done());
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        w.stop();
        got.sort_unstable();
        assert_eq!(got.len(), 65, "every job reported once");
        assert!(got[..64].iter().enumerate().all(|(i, &(t, ok))| t == i as u16 && ok));
        assert_eq!(got[64], (999, false), "a failed pwrite is reported failed");
        let back = std::fs::read(&p).unwrap();
        for (i, b) in bufs.iter().enumerate() {
            assert_eq!(&back[i * 8192..i * 8192 + 4096], &b[..], "job {i} on the file");
        }
        let _ = std::fs::remove_file(&p);
    }
}
