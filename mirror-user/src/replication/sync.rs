//! Jobs a replica server runs against its peer: sync (initial full sync and resync of the dirty
//! bitmap, one algorithm) and online verify.
//!
//! Sync walks the pending bits window by window. Per window it asks the peer for digests (first
//! per 64 KiB sync block where whole blocks are dirty, then per bitmap block inside the blocks
//! that differ, and directly per bitmap block where only some are dirty), and sends only the
//! pieces whose digests differ: all-zero pieces as WriteZeroes markers, others lz4-compressed
//! when that saves at least 10%. Every few windows the peer flushes and only then are the bits
//! cleared on disk, so an interrupted sync resumes where it stopped.

use std::{
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use super::{
    client::{Client, ClientError},
    protocol::Message,
    rate::{Pacer, SyncRate},
    transport::{PeerAddr, Transport},
};
use crate::storage::{
    job::{JobKind, WireBytes},
    meta::{new_generation, plan, MetaError, SyncPlan},
    store::{digest, is_zero, Digest},
    Job, JobState, StorageError, Volume,
};

/// Size of a sync block: the unit of the first digest comparison.
pub const SYNC_BLOCK: u64 = 64 << 10;
/// Bytes of volume handled per window.
pub const WINDOW: u64 = 4 << 20;
/// Windows between two peer flushes (and bitmap commits).
const COMMIT_EVERY: usize = 8;
/// Largest run sent in one write.
const MAX_RUN: u64 = 1 << 20;

/// Errors of a job.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JobError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("local I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("refused: {0}")]
    Refused(String),
    #[error("cancelled")]
    Cancelled,
    #[error("{0}")]
    Mismatch(String),
}

/// Starts a job on `vol` pushing to `peer`, on a thread of its own: the one entry for jobs a
/// peer asks for (`StartJob`) and for resyncs a router starts from a local replica. `Busy` while
/// a job runs on the volume.
pub fn start_job(
    vol: &Arc<Volume>,
    transport: &Transport,
    secret: Vec<u8>,
    rate: SyncRate,
    kind: JobKind,
    peer: String,
) -> Result<(), StorageError> {
    let job = vol.claim_job(kind, peer.clone())?;
    let (v, j, t) = (vol.clone(), job.clone(), transport.clone());
    match std::thread::Builder::new()
        .name("mirror-job".into())
        .spawn(move || run_job(&v, &t, &peer, &secret, rate, &j))
    {
        Ok(_) => Ok(()),
        Err(e) => {
            // The slot must not stay taken by a job that never ran.
            job.finish(JobState::Failed, Some(format!("spawn job: {e}")));
            Err(StorageError::Spawn(e))
        }
    }
}

/// Runs a job to its end, recording the outcome in `st`.
/// `peer` is `HOST:PORT` or `NODE@HOST:PORT` (see [`PeerAddr`]); the connection takes
/// `transport`.
pub fn run_job(vol: &Volume, transport: &Transport, peer: &str, secret: &[u8], rate: SyncRate, st: &Job) {
    let r = (|| -> Result<JobState, JobError> {
        let to = PeerAddr::parse(peer).map_err(JobError::Refused)?;
        let mut c = Client::connect_over(transport, &to, vol.name(), secret)?;
        if let Some(node) = &c.node {
            tracing::info!(volume = %vol.name(), peer, node = %node, "job connected to its peer over TLS");
        }
        // Fenced like the router it works for: the job writes at the epoch this replica accepted,
        // so a peer that has seen a newer holder refuses it.
        let lease = vol.lease().view();
        if lease.accepted.0 > 0 {
            let holder = lease.holder.map(|h| h.0).unwrap_or_default();
            c.attach(&holder, lease.accepted.0)?;
        }
        let wire = c.conn.wire.clone();
        st.set_wire(WireBytes(Arc::new(move || wire.total())));
        if c.info.size != vol.size() || c.info.block_size != vol.block_size() {
            return Err(JobError::Refused(format!(
                "peer volume is {} bytes / block {}, this one {} / {}",
                c.info.size,
                c.info.block_size,
                vol.size(),
                vol.block_size()
            )));
        }
        let mut pacer = Pacer::new(rate);
        match st.kind {
            JobKind::Sync => sync(vol, &mut c, st, &mut pacer),
            JobKind::Verify => verify(vol, &mut c, st, &mut pacer, false),
            JobKind::VerifyRepair => verify(vol, &mut c, st, &mut pacer, true),
        }
    })();
    match r {
        Ok(s) => {
            st.finish(s, None);
            tracing::info!(volume = %vol.name(), peer, job = ?st.kind, status = ?st.status(), "job finished");
        }
        Err(e) => {
            let state = match e {
                JobError::Refused(_) => JobState::Refused,
                JobError::Cancelled => JobState::Cancelled,
                _ => JobState::Failed,
            };
            tracing::warn!(volume = %vol.name(), peer, job = ?st.kind, "job {state}: {e}");
            st.finish(state, Some(e.to_string()));
        }
    }
}

fn sync(vol: &Volume, c: &mut Client, st: &Job, pacer: &mut Pacer) -> Result<JobState, JobError> {
    let local = vol.meta().header().gen;
    let p = plan(&local, vol.meta().dirty_bits(), &c.info.gen);
    st.set_plan(format!("{p:?}"));
    match p {
        SyncPlan::Refuse(r) => return Err(JobError::Refused(r)),
        SyncPlan::UpToDate => return Ok(JobState::UpToDate),
        SyncPlan::Full => vol.meta().set_all_dirty()?,
        SyncPlan::Resync => merge_peer_bitmap(vol, c)?,
    }
    let gen = vol
        .meta()
        .update(|h| {
            if h.gen.current == 0 {
                new_generation(&mut h.gen);
            }
            h.tracking = true;
        })?
        .gen;
    tracing::info!(volume = %vol.name(), peer = %c.addr, plan = %st.plan(), dirty_bytes = vol.meta().dirty_bits() * u64::from(vol.block_size()), "sync starting");
    st.set_state(JobState::Syncing);
    c.call_ok(&Message::SyncBegin { source_gen: gen.current })?;
    finish(vol, c, st, pacer, gen.current, gen.history)?;
    Ok(JobState::Done)
}

/// A resync sends the union of both bitmaps (as DRBD does): blocks the peer recorded itself
/// (a router's write intent left on it by a crash, with the write applied there but maybe not
/// here) are sent from this side too, so the two end identical. A peer whose bitmap cannot be
/// fetched in one reply (a volume past 512 GiB) gets every block compared instead.
fn merge_peer_bitmap(vol: &Volume, c: &mut Client) -> Result<(), JobError> {
    match c.call(&Message::GetBitmap) {
        Ok(Message::Data(bits)) => {
            let added = vol.meta().merge_bitmap(&bits)?;
            if added > 0 {
                tracing::info!(volume = %vol.name(), peer = %c.addr, blocks = added, "resync includes the blocks the peer recorded");
            }
            Ok(())
        }
        Ok(Message::Error { message, .. }) | Err(ClientError::Remote { message, .. }) => {
            tracing::warn!(volume = %vol.name(), peer = %c.addr, "peer bitmap unavailable ({message}): comparing every block");
            Ok(vol.meta().set_all_dirty()?)
        }
        Ok(m) => Err(JobError::Client(ClientError::Unexpected(format!("{m:?}")))),
        Err(e) => Err(e.into()),
    }
}

/// Sends what is pending, marks the peer consistent, and leaves tracking mode once nothing is
/// dirty. Writes that keep arriving through the router also reach the peer directly, so each
/// pass is shorter; after a bounded number of passes the job ends with tracking still on (the
/// leftover bits are conservative and the next sync sends them).
fn finish(
    vol: &Volume,
    c: &mut Client,
    st: &Job,
    pacer: &mut Pacer,
    current: u64,
    history: [u64; crate::storage::HISTORY],
) -> Result<(), JobError> {
    for _ in 0..32 {
        sync_pending(vol, c, st, pacer)?;
        c.call_ok(&Message::SyncEnd { current, history })?;
        if vol.meta().end_tracking_if_clean()? {
            return Ok(());
        }
    }
    tracing::warn!(volume = %vol.name(), pending = vol.meta().pending_bits(), "writes keep re-dirtying blocks: ending the sync with tracking on");
    Ok(())
}

/// Sends every pending block, pass after pass, until nothing is pending.
fn sync_pending(vol: &Volume, c: &mut Client, st: &Job, pacer: &mut Pacer) -> Result<(), JobError> {
    let bs = u64::from(vol.block_size());
    let bits_per_window = WINDOW / bs;
    loop {
        let pending = vol.meta().pending_bits();
        if pending == 0 {
            return Ok(());
        }
        st.total_bytes.store(st.done_bytes.load(Ordering::Relaxed) + pending * bs, Ordering::Relaxed);
        let mut uncommitted: Vec<(u64, Vec<bool>)> = Vec::new();
        let mut pos = 0u64;
        while let Some(bit) = vol.meta().next_pending(pos) {
            if st.cancelled() {
                restore_all(vol, &uncommitted);
                return Err(JobError::Cancelled);
            }
            let start = bit / bits_per_window * bits_per_window;
            let bits = vol.meta().take(start, bits_per_window);
            let moved = match sync_window(vol, c, start, &bits, st) {
                Ok(n) => n,
                Err(e) => {
                    vol.meta().restore(start, &bits);
                    restore_all(vol, &uncommitted);
                    return Err(e);
                }
            };
            uncommitted.push((start, bits));
            if uncommitted.len() >= COMMIT_EVERY {
                commit(vol, c, &mut uncommitted)?;
            }
            let wait = pacer.delay(vol.uptime(), moved, vol.app_active(Duration::from_millis(200)));
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
            pos = start + bits_per_window;
        }
        commit(vol, c, &mut uncommitted)?;
    }
}

fn restore_all(vol: &Volume, windows: &[(u64, Vec<bool>)]) {
    for (s, b) in windows {
        vol.meta().restore(*s, b);
    }
}

fn commit(vol: &Volume, c: &mut Client, windows: &mut Vec<(u64, Vec<bool>)>) -> Result<(), JobError> {
    if windows.is_empty() {
        return Ok(());
    }
    if let Err(e) = c.call_ok(&Message::Flush) {
        restore_all(vol, windows);
        return Err(e.into());
    }
    for (s, b) in windows.drain(..) {
        vol.meta().commit(s, &b)?;
    }
    Ok(())
}

/// Extents `(offset, len)` merged where adjacent, each at most `max` long.
fn merge(pieces: &[(u64, u64)], max: u64) -> Vec<(u64, u32)> {
    let mut out: Vec<(u64, u32)> = Vec::new();
    for &(o, l) in pieces {
        if let Some(last) = out.last_mut() {
            if last.0 + u64::from(last.1) == o && u64::from(last.1) + l <= max {
                last.1 += l as u32;
                continue;
            }
        }
        out.push((o, l as u32));
    }
    out
}

fn remote_digests(c: &mut Client, grain: u64, pieces: &[(u64, u64)]) -> Result<Vec<Digest>, JobError> {
    let extents = merge(pieces, WINDOW);
    match c.call(&Message::Digests { grain: grain as u32, extents })? {
        Message::DigestList(d) => Ok(d),
        m => Err(ClientError::Unexpected(format!("{m:?}")).into()),
    }
}

fn local_digests(vol: &Volume, grain: u64, pieces: &[(u64, u64)]) -> Result<Vec<Digest>, JobError> {
    let mut out = Vec::new();
    for &(o, l) in pieces {
        vol.store().digests(o, l, grain as u32, &mut out)?;
    }
    Ok(out)
}

/// The pieces whose digests differ between this replica and the peer, at `grain`.
fn differing(
    vol: &Volume,
    c: &mut Client,
    grain: u64,
    pieces: &[(u64, u64)],
) -> Result<Vec<(u64, u64)>, JobError> {
    let remote = remote_digests(c, grain, pieces)?;
    let local = local_digests(vol, grain, pieces)?;
    if remote.len() != local.len() || local.len() != pieces.len() {
        return Err(ClientError::Unexpected("digest count mismatch".into()).into());
    }
    Ok(pieces.iter().zip(local.iter().zip(&remote)).filter(|(_, (l, r))| l != r).map(|(p, _)| *p).collect())
}

/// Pieces of `grain` size covering `pieces` (which are multiples of grain, but the last piece of
/// the volume may be short).
fn split(pieces: &[(u64, u64)], grain: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(o, l) in pieces {
        let mut x = o;
        while x < o + l {
            let n = grain.min(o + l - x);
            out.push((x, n));
            x += n;
        }
    }
    out
}

/// Compares one window with the peer and sends what differs. Returns the local bytes examined.
fn sync_window(
    vol: &Volume,
    c: &mut Client,
    start_bit: u64,
    bits: &[bool],
    st: &Job,
) -> Result<u64, JobError> {
    let bs = u64::from(vol.block_size());
    let size = vol.size();
    let per_block = (SYNC_BLOCK / bs).max(1) as usize;
    let mut coarse: Vec<(u64, u64)> = Vec::new();
    let mut fine: Vec<(u64, u64)> = Vec::new();
    for (i, chunk) in bits.chunks(per_block).enumerate() {
        let off = (start_bit + (i * per_block) as u64) * bs;
        if off >= size {
            break;
        }
        if chunk.iter().all(|b| *b) && chunk.len() == per_block {
            coarse.push((off, SYNC_BLOCK.min(size - off)));
        } else {
            for (j, _) in chunk.iter().enumerate().filter(|(_, b)| **b) {
                let o = off + j as u64 * bs;
                if o < size {
                    fine.push((o, bs.min(size - o)));
                }
            }
        }
    }
    let examined: u64 = coarse.iter().chain(&fine).map(|p| p.1).sum();
    if !coarse.is_empty() {
        let differing = differing(vol, c, SYNC_BLOCK, &coarse)?;
        if bs == SYNC_BLOCK {
            send_pieces(vol, c, &differing, st)?;
        } else {
            fine.extend(split(&differing, bs));
        }
    }
    if !fine.is_empty() {
        fine.sort_unstable();
        let differing = differing(vol, c, bs, &fine)?;
        send_pieces(vol, c, &differing, st)?;
    }
    st.done_bytes.fetch_add(examined, Ordering::Relaxed);
    Ok(examined)
}

/// Sends the given pieces (merged into runs) from the local store, pipelined.
fn send_pieces(vol: &Volume, c: &mut Client, pieces: &[(u64, u64)], st: &Job) -> Result<(), JobError> {
    let runs = merge(pieces, MAX_RUN);
    let mut sent = 0usize;
    for &(off, len) in &runs {
        let mut buf = vec![0u8; len as usize];
        vol.store().read_at(&mut buf, off)?;
        st.changed_bytes.fetch_add(u64::from(len), Ordering::Relaxed);
        let msg = if is_zero(&buf) {
            Message::WriteZeroes { offset: off, len }
        } else {
            let z = lz4_flex::block::compress(&buf);
            if z.len() < buf.len() / 10 * 9 {
                st.data_bytes.fetch_add(z.len() as u64, Ordering::Relaxed);
                Message::WriteLz4 { offset: off, raw_len: len, data: z }
            } else {
                st.data_bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
                Message::Write { offset: off, data: buf }
            }
        };
        c.send(0, &msg)?;
        sent += 1;
    }
    for _ in 0..sent {
        match c.recv()?.1 {
            Message::Ok => {}
            m => return Err(ClientError::Unexpected(format!("{m:?}")).into()),
        }
    }
    Ok(())
}

/// Compares the whole volume with the peer by digests; reports mismatching ranges; with
/// `repair`, marks them dirty and resyncs them (this replica's data wins).
fn verify(
    vol: &Volume,
    c: &mut Client,
    st: &Job,
    pacer: &mut Pacer,
    repair: bool,
) -> Result<JobState, JobError> {
    let size = vol.size();
    let bs = u64::from(vol.block_size());
    st.total_bytes.store(size, Ordering::Relaxed);
    st.set_state(JobState::Verifying);
    let mut found: Vec<(u64, u64)> = Vec::new();
    let mut off = 0u64;
    while off < size {
        if st.cancelled() {
            return Err(JobError::Cancelled);
        }
        let len = WINDOW.min(size - off);
        let blocks = split(&[(off, len)], SYNC_BLOCK);
        let suspects = differing(vol, c, SYNC_BLOCK, &blocks)?;
        if !suspects.is_empty() {
            // A write in flight to both replicas can differ for an instant: look again after a
            // moment, at bitmap-block grain, and report only what still differs.
            std::thread::sleep(Duration::from_millis(50));
            let pieces = split(&suspects, bs);
            for p in differing(vol, c, bs, &pieces)? {
                match found.last_mut() {
                    Some(last) if last.0 + last.1 == p.0 => last.1 += p.1,
                    _ => found.push(p),
                }
            }
            st.set_mismatches(found.clone());
        }
        st.done_bytes.fetch_add(len, Ordering::Relaxed);
        let wait = pacer.delay(vol.uptime(), len, vol.app_active(Duration::from_millis(200)));
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
        off += len;
    }
    let total: u64 = found.iter().map(|r| r.1).sum();
    if found.is_empty() {
        return Ok(JobState::Done);
    }
    tracing::warn!(volume = %vol.name(), peer = %c.addr, ranges = found.len(), bytes = total, "verify found mismatching ranges: {found:?}");
    if !repair {
        return Ok(JobState::DoneMismatches);
    }
    st.set_state(JobState::Repairing);
    vol.meta().update(|h| h.tracking = true)?;
    for &(o, l) in &found {
        vol.meta().mark_dirty(o, l)?;
    }
    let gen = vol.meta().header().gen;
    c.call_ok(&Message::SyncBegin { source_gen: gen.current })?;
    finish(vol, c, st, pacer, gen.current, gen.history)?;
    Ok(JobState::Repaired)
}

/// Digest of a local range, for tests and tools comparing replicas.
pub fn range_digest(vol: &Volume, offset: u64, len: u64) -> std::io::Result<Digest> {
    let mut buf = vec![0u8; len as usize];
    vol.store().read_at(&mut buf, offset)?;
    Ok(digest(&buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_joins_adjacent_up_to_max() {
        let p = [(0, 4096), (4096, 4096), (12288, 4096), (16384, 4096)];
        assert_eq!(merge(&p, 8192), vec![(0, 8192), (12288, 8192)]);
        assert_eq!(merge(&p, 4096), vec![(0, 4096), (4096, 4096), (12288, 4096), (16384, 4096)]);
    }

    #[test]
    fn split_cuts_at_grain_with_short_tail() {
        assert_eq!(split(&[(0, 10_000)], 4096), vec![(0, 4096), (4096, 4096), (8192, 1808)]);
    }
}
