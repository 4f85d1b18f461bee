//! Per-volume replication metadata, persistent and crash-safe: generations (who is newer), the
//! tracking flag (degraded or syncing: every write is recorded) and the dirty bitmap (blocks the
//! peer may not have).
//!
//! File layout: two 4 KiB header slots (written alternately, each with a sequence number and a
//! crc32c, so a torn write leaves the other slot valid), then the bitmap, one bit per
//! `block_size` bytes. Bits are set on disk (and fsynced) *before* the write they cover is
//! applied; they are cleared on disk only after the peer has flushed the data.
//!
//! The header also holds the replica's lease record ([`PersistedLease`]: the highest epoch
//! accepted, its holder, TTL, release), so a claimed epoch shares the header's crash safety: a
//! torn write leaves the other slot, with the previous epoch, and the claim being written was not
//! yet acknowledged. Headers of format 1 (`MRMETA01`, before leases) read as epoch 0; every write
//! is format 2 (`MRMETA02`: the lease after the generations, one crc over both).
//!
//! In memory there are two bitmaps: `disk` mirrors the file, `mem` is what is still to be sent.
//! A sync takes a window's bits out of `mem`, sends the blocks, flushes the peer, then clears in
//! `disk` only the bits that no write has set again in `mem` meanwhile.
//!
//! Bitmap pages are written by group commit: a change to `disk` (under the state lock, briefly)
//! stages its page for the open batch; the caller then waits until that batch is durable. One
//! writer at a time (the I/O lock) closes the open batch, writes its pages and syncs the file
//! once, outside the state lock: every change staged while a sync is in flight shares the next
//! one (md's write-intent bitmap batches its bit updates the same way). A caller whose bits were
//! already set by another, not yet durable, waits for the same batch: nobody applies a write
//! before the bits covering it are on disk. The bitmap area is written with zeroes when the file
//! is created, so a sync never allocates (a sync into a hole costs a journal commit: 9x here).

use std::{
    collections::BTreeMap,
    fs::{File, OpenOptions},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Mutex,
    },
};

use crate::lease::{replica::PersistedLease, Epoch, Holder};

/// Format 1: no lease fields.
const MAGIC_V1: &[u8; 8] = b"MRMETA01";
/// Format 2: the lease record after the generations.
const MAGIC: &[u8; 8] = b"MRMETA02";
/// Longest holder name a header keeps (the slot is 4 KiB; two names fit with room to spare).
pub const MAX_HOLDER: usize = 1024;
/// An absent name in the header.
const NO_NAME: u16 = u16::MAX;
const SLOT: u64 = 4096;
const BITMAP_OFF: u64 = 2 * SLOT;
const PAGE: usize = 4096;

/// Number of previous generations each replica remembers.
pub const HISTORY: usize = 4;

/// Data generations of a replica : who is newer, and whether it is mid-sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct GenInfo {
    /// Current generation; 0 = never synced (no data anyone vouches for).
    #[serde(with = "crate::storage::status::hex::u64_16")]
    pub current: u64,
    /// Previous generations, newest first, 0 = empty slot.
    #[serde(with = "crate::storage::status::hex::u64_16_array")]
    pub history: [u64; HISTORY],
    /// False while a sync onto this replica is incomplete: its data is a mix.
    pub consistent: bool,
    /// While inconsistent: the source generation of the interrupted sync.
    #[serde(with = "crate::storage::status::hex::u64_16")]
    pub sync_source: u64,
}

/// Errors at the metadata boundary.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetaError {
    #[error("metadata {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("metadata {path} belongs to a volume of {found} bytes / block {found_bs}, not {size} / {bs}")]
    Mismatch { path: PathBuf, found: u64, found_bs: u32, size: u64, bs: u32 },
    #[error("metadata {0}: no valid header slot (both torn or not a mirror metadata file)")]
    Corrupt(PathBuf),
}

/// The persistent header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaHeader {
    pub seq: u64,
    pub uuid: [u8; 16],
    pub size: u64,
    pub block_size: u32,
    pub gen: GenInfo,
    /// Degraded or syncing: writes are recorded in the dirty bitmap.
    pub tracking: bool,
    /// The lease record: the highest accepted epoch fences every lower one.
    pub lease: PersistedLease,
}

fn put_name(b: &mut Vec<u8>, n: Option<&Holder>) {
    match n {
        Some(h) => {
            let bytes = &h.0.as_bytes()[..h.0.len().min(MAX_HOLDER)];
            b.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
            b.extend_from_slice(bytes);
        }
        None => b.extend_from_slice(&NO_NAME.to_le_bytes()),
    }
}

fn get_name(b: &[u8], at: &mut usize) -> Option<Option<Holder>> {
    let n = u16::from_le_bytes(b.get(*at..*at + 2)?.try_into().ok()?);
    *at += 2;
    if n == NO_NAME {
        return Some(None);
    }
    let s = std::str::from_utf8(b.get(*at..*at + n as usize)?).ok()?;
    *at += n as usize;
    Some(Some(Holder(s.into())))
}

impl MetaHeader {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(128);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&self.seq.to_le_bytes());
        b.extend_from_slice(&self.uuid);
        b.extend_from_slice(&self.size.to_le_bytes());
        b.extend_from_slice(&self.block_size.to_le_bytes());
        b.extend_from_slice(&self.gen.current.to_le_bytes());
        for h in self.gen.history {
            b.extend_from_slice(&h.to_le_bytes());
        }
        b.push(u8::from(self.gen.consistent));
        b.extend_from_slice(&self.gen.sync_source.to_le_bytes());
        b.push(u8::from(self.tracking));
        let l = &self.lease;
        b.extend_from_slice(&l.accepted.0.to_le_bytes());
        b.extend_from_slice(&l.ttl_ms.to_le_bytes());
        b.push(u8::from(l.released) | (u8::from(l.coordinated) << 1));
        put_name(&mut b, l.holder.as_ref());
        put_name(&mut b, l.handed_to.as_ref());
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<MetaHeader> {
        const BASE: usize = 8 + 8 + 16 + 8 + 4 + 8 + 8 * HISTORY + 1 + 8 + 1;
        if b.len() < BASE + 4 {
            return None;
        }
        let (len, lease) = match &b[..8] {
            m if m == MAGIC_V1 => (BASE, PersistedLease::default()),
            m if m == MAGIC => {
                let mut at = BASE + 17;
                let u64_at = |o: usize| Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?));
                let (accepted, ttl_ms, flags) = (u64_at(BASE)?, u64_at(BASE + 8)?, *b.get(BASE + 16)?);
                let holder = get_name(b, &mut at)?;
                let handed_to = get_name(b, &mut at)?;
                let lease = PersistedLease {
                    accepted: Epoch(accepted),
                    holder,
                    ttl_ms,
                    handed_to,
                    released: flags & 1 != 0,
                    coordinated: flags & 2 != 0,
                };
                (at, lease)
            }
            _ => return None,
        };
        let crc = u32::from_le_bytes(b.get(len..len + 4)?.try_into().ok()?);
        if crc32c::crc32c(&b[..len]) != crc {
            return None;
        }
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8"));
        let mut history = [0u64; HISTORY];
        for (i, h) in history.iter_mut().enumerate() {
            *h = u64_at(52 + 8 * i);
        }
        let after = 52 + 8 * HISTORY;
        Some(MetaHeader {
            seq: u64_at(8),
            uuid: b[16..32].try_into().ok()?,
            size: u64_at(32),
            block_size: u32::from_le_bytes(b[40..44].try_into().ok()?),
            gen: GenInfo {
                current: u64_at(44),
                history,
                consistent: b[after] == 1,
                sync_source: u64_at(after + 1),
            },
            tracking: b[after + 9] == 1,
            lease,
        })
    }
}

/// A fresh random non-zero generation or uuid material.
pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("getrandom");
    u64::from_le_bytes(b).max(1)
}

struct State {
    hdr: MetaHeader,
    disk: Vec<u64>,
    mem: Vec<u64>,
    /// Tracked writes between [`VolumeMeta::begin_write`] and [`VolumeMeta::end_write`].
    inflight: u64,
    /// Bitmap pages changed in `disk` and not yet durable, with the batch each goes with.
    unsynced: BTreeMap<usize, u64>,
    /// The batch changes staged now go with.
    open: u64,
    /// Every batch up to this one is durable.
    durable: u64,
}

impl State {
    /// Stages bitmap page `page` (changed in `disk`) for the open batch.
    fn stage(&mut self, page: usize) {
        self.unsynced.insert(page, self.open);
    }

    /// The batch to wait for before relying on the disk bits of `words`: the latest one a page
    /// of theirs is staged with or being written in (`None`: durable already).
    fn ticket(&self, words: std::ops::Range<usize>) -> Option<u64> {
        if words.is_empty() {
            return None;
        }
        let per_page = PAGE / 8;
        self.unsynced.range(words.start / per_page..=(words.end - 1) / per_page).map(|(_, b)| *b).max()
    }
}

/// The metadata of one volume.
pub struct VolumeMeta {
    path: PathBuf,
    file: File,
    nbits: u64,
    state: Mutex<State>,
    /// Held by the one caller writing a batch of bitmap pages and syncing them (see the module
    /// doc); taken before the state lock, never while holding it.
    io: Mutex<()>,
    /// Bitmap batches written and synced (each one `fdatasync`).
    syncs: AtomicU64,
    /// `hdr.tracking` as of the last header change, stored under the state lock: writes that
    /// find it clear skip the lock (a write while in sync must not wait behind a metadata sync
    /// in flight, such as the activity log's group commit).
    tracking: AtomicBool,
}

impl std::fmt::Debug for VolumeMeta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VolumeMeta({})", self.path.display())
    }
}

fn bit_range(offset: u64, len: u64, bs: u64, nbits: u64) -> std::ops::Range<u64> {
    if len == 0 {
        return 0..0;
    }
    let first = offset / bs;
    let last = (offset + len - 1) / bs;
    first.min(nbits)..(last + 1).min(nbits)
}

impl VolumeMeta {
    /// Opens the metadata at `path`, creating it (generation 0, clean, consistent=false) when
    /// absent. An existing file must describe a volume of the same size and block size.
    pub fn open(path: &Path, size: u64, block_size: u32) -> Result<Self, MetaError> {
        let io = |source| MetaError::Io { path: path.to_path_buf(), source };
        let nbits = size.div_ceil(u64::from(block_size));
        let words = nbits.div_ceil(64) as usize;
        let exists = path.exists();
        let file =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(io)?;
        let hdr = if exists && file.metadata().map_err(io)?.len() >= BITMAP_OFF {
            let mut a = vec![0u8; SLOT as usize];
            let mut b = vec![0u8; SLOT as usize];
            file.read_exact_at(&mut a, 0).map_err(io)?;
            file.read_exact_at(&mut b, SLOT).map_err(io)?;
            let hdr = match (MetaHeader::decode(&a), MetaHeader::decode(&b)) {
                (Some(x), Some(y)) => {
                    if x.seq >= y.seq {
                        x
                    } else {
                        y
                    }
                }
                (Some(x), None) | (None, Some(x)) => x,
                (None, None) => return Err(MetaError::Corrupt(path.to_path_buf())),
            };
            if hdr.size != size || hdr.block_size != block_size {
                return Err(MetaError::Mismatch {
                    path: path.to_path_buf(),
                    found: hdr.size,
                    found_bs: hdr.block_size,
                    size,
                    bs: block_size,
                });
            }
            hdr
        } else {
            let mut uuid = [0u8; 16];
            getrandom::fill(&mut uuid).expect("getrandom");
            MetaHeader {
                seq: 0,
                uuid,
                size,
                block_size,
                gen: GenInfo { current: 0, history: [0; HISTORY], consistent: false, sync_source: 0 },
                tracking: false,
                lease: PersistedLease::default(),
            }
        };
        let bitmap_bytes = (words * 8).div_ceil(PAGE) * PAGE;
        file.set_len(BITMAP_OFF + bitmap_bytes as u64).map_err(io)?;
        let mut raw = vec![0u8; words * 8];
        file.read_exact_at(&mut raw, BITMAP_OFF).map_err(io)?;
        let mut disk: Vec<u64> =
            raw.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8"))).collect();
        // Bits past the end of the volume are never valid.
        if !nbits.is_multiple_of(64) {
            if let Some(last) = disk.last_mut() {
                *last &= (1u64 << (nbits % 64)) - 1;
            }
        }
        let meta = VolumeMeta {
            path: path.to_path_buf(),
            file,
            nbits,
            tracking: AtomicBool::new(hdr.tracking),
            state: Mutex::new(State {
                hdr: hdr.clone(),
                mem: disk.clone(),
                disk,
                inflight: 0,
                unsynced: BTreeMap::new(),
                open: 1,
                durable: 0,
            }),
            io: Mutex::new(()),
            syncs: AtomicU64::new(0),
        };
        if !exists {
            // Real zeroes, not a hole: a sync of a bitmap page must not allocate.
            let zero = vec![0u8; 1 << 20];
            let mut off = 0usize;
            while off < bitmap_bytes {
                let n = zero.len().min(bitmap_bytes - off);
                meta.file.write_all_at(&zero[..n], BITMAP_OFF + off as u64).map_err(io)?;
                off += n;
            }
            meta.update(|_| {})?;
        }
        Ok(meta)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn io(&self, source: std::io::Error) -> MetaError {
        MetaError::Io { path: self.path.clone(), source }
    }

    /// Number of bitmap bits (blocks).
    pub fn nbits(&self) -> u64 {
        self.nbits
    }

    /// Bitmap batches written so far (each one metadata sync).
    pub fn bitmap_syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// Whether writes are being recorded (degraded or syncing), without copying the header.
    pub fn tracking(&self) -> bool {
        self.tracking.load(Ordering::Acquire)
    }

    pub fn header(&self) -> MetaHeader {
        self.lock().hdr.clone()
    }

    fn write_header(&self, st: &mut State) -> Result<(), MetaError> {
        self.tracking.store(st.hdr.tracking, Ordering::Release);
        st.hdr.seq += 1;
        let slot = (st.hdr.seq % 2) * SLOT;
        self.file.write_all_at(&st.hdr.encode(), slot).map_err(|e| self.io(e))?;
        self.file.sync_data().map_err(|e| self.io(e))
    }

    /// Changes the header and makes the change durable before returning.
    pub fn update(&self, f: impl FnOnce(&mut MetaHeader)) -> Result<MetaHeader, MetaError> {
        let mut st = self.lock();
        f(&mut st.hdr);
        self.write_header(&mut st)?;
        Ok(st.hdr.clone())
    }

    /// Stages the pages of `words` (changed in `disk`) and returns the batch that makes them
    /// durable, for [`Self::persist`] once the state lock is dropped.
    fn stage_words(st: &mut State, words: std::ops::Range<usize>) -> Option<u64> {
        if words.is_empty() {
            return None;
        }
        let per_page = PAGE / 8;
        for page in words.start / per_page..=(words.end - 1) / per_page {
            st.stage(page);
        }
        st.ticket(words)
    }

    /// Waits until batch `ticket` is durable: writes it if nobody else has (the group commit of
    /// the module doc). Takes the I/O lock, then the state lock only to close the batch and copy
    /// its pages; the writes and the sync run with neither the state lock held nor a writer of
    /// hot data waiting. A failed batch's pages go with the next one.
    fn persist(&self, ticket: Option<u64>) -> Result<(), MetaError> {
        let Some(ticket) = ticket else { return Ok(()) };
        let _io = self.io.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (id, pages) = {
            let mut st = self.lock();
            if st.durable >= ticket {
                return Ok(());
            }
            let id = st.open;
            st.open += 1;
            let per_page = PAGE / 8;
            let pages: Vec<(usize, Vec<u8>)> = st
                .unsynced
                .iter()
                .filter(|(_, b)| **b == id)
                .map(|(&page, _)| {
                    let lo = page * per_page;
                    let hi = ((page + 1) * per_page).min(st.disk.len());
                    (page, st.disk[lo..hi].iter().flat_map(|w| w.to_le_bytes()).collect())
                })
                .collect();
            (id, pages)
        };
        let res = pages
            .iter()
            .try_for_each(|(page, bytes)| self.file.write_all_at(bytes, BITMAP_OFF + (page * PAGE) as u64))
            .and_then(|()| self.file.sync_data());
        self.syncs.fetch_add(1, Ordering::Relaxed);
        let mut st = self.lock();
        match res {
            Ok(()) => {
                st.durable = st.durable.max(id);
                for (page, _) in &pages {
                    if st.unsynced.get(page) == Some(&id) {
                        st.unsynced.remove(page);
                    }
                }
                Ok(())
            }
            Err(e) => {
                for (page, _) in &pages {
                    if st.unsynced.get(page) == Some(&id) {
                        st.stage(*page);
                    }
                }
                Err(self.io(e))
            }
        }
    }

    /// The words of bit range `r`, each with the mask of its bits in `r` (a 4 MiB extent at 4
    /// KiB blocks is 16 words).
    fn words_of(r: std::ops::Range<u64>) -> impl Iterator<Item = (usize, u64)> {
        ((r.start / 64) as usize..r.end.div_ceil(64) as usize).map(move |w| {
            let lo = (w as u64 * 64).max(r.start);
            let hi = (w as u64 * 64 + 64).min(r.end);
            (w, if hi - lo == 64 { u64::MAX } else { ((1u64 << (hi - lo)) - 1) << (lo % 64) })
        })
    }

    /// Sets the bits `r` in memory and in `st.disk`, a word at a time; calls `changed` with each
    /// word whose disk value changed.
    fn set_range(st: &mut State, r: std::ops::Range<u64>, mut changed: impl FnMut(usize)) {
        for (w, m) in Self::words_of(r) {
            st.mem[w] |= m;
            if st.disk[w] & m != m {
                st.disk[w] |= m;
                changed(w);
            }
        }
    }

    /// Clears the bits `r` in memory and in `st.disk`, a word at a time; true when a disk bit
    /// was set.
    fn clear_range(st: &mut State, r: std::ops::Range<u64>) -> bool {
        let mut changed = false;
        for (w, m) in Self::words_of(r) {
            st.mem[w] &= !m;
            if st.disk[w] & m != 0 {
                st.disk[w] &= !m;
                changed = true;
            }
        }
        changed
    }

    /// Sets the range's bits in memory and in `disk`, staging what changed. Caller holds the
    /// lock; returns whether a bit changed and the batch to [`Self::persist`] (also when the
    /// bits were set already by a caller whose batch is not durable yet).
    fn set_bits(&self, st: &mut State, offset: u64, len: u64) -> (bool, Option<u64>) {
        let bs = u64::from(st.hdr.block_size);
        let r = bit_range(offset, len, bs, self.nbits);
        let per_page = PAGE / 8;
        let mut changed = false;
        let mut staged = Vec::new();
        Self::set_range(st, r.clone(), |w| {
            changed = true;
            if staged.last() != Some(&(w / per_page)) {
                staged.push(w / per_page);
            }
        });
        for page in staged {
            st.stage(page);
        }
        let words = (r.start / 64) as usize..(r.end.div_ceil(64)) as usize;
        (changed, st.ticket(words))
    }

    /// Records `[offset, offset+len)` as not on the peer: set in memory and durably on disk before
    /// returning (write intent). Returns whether any bit was newly set on disk.
    pub fn mark_dirty(&self, offset: u64, len: u64) -> Result<bool, MetaError> {
        let (changed, ticket) = {
            let mut st = self.lock();
            self.set_bits(&mut st, offset, len)
        };
        self.persist(ticket)?;
        Ok(changed)
    }

    /// The router's write intent (activity log): records `[offset, offset+len)` durably as
    /// possibly differing on the peer, without entering tracking or changing generations. A
    /// router that dies with writes in flight leaves these bits; the next start resyncs them.
    /// Returns whether any bit was newly set.
    pub fn mark_intent(&self, offset: u64, len: u64) -> Result<bool, MetaError> {
        self.mark_dirty(offset, len)
    }

    /// [`Self::mark_intent`] for many ranges at once, with one durable write: every changed
    /// bitmap page is written, then the file is synced once (the activity log's group commit).
    /// Returns whether any bit was newly set.
    pub fn mark_intents(&self, ranges: &[(u64, u64)]) -> Result<bool, MetaError> {
        let (changed, ticket) = {
            let mut st = self.lock();
            let mut changed = false;
            let mut ticket = None;
            for &(offset, len) in ranges {
                let (c, t) = self.set_bits(&mut st, offset, len);
                changed |= c;
                ticket = ticket.max(t);
            }
            (changed, ticket)
        };
        self.persist(ticket)?;
        Ok(changed)
    }

    /// Drops the write intent of `[offset, offset+len)` once the router has flushed both
    /// replicas after its last write there: clears the range's bits in memory and on disk,
    /// durably. Not while tracking (degraded or syncing), when the bits are the record of what
    /// the peer lacks: returns false then and clears nothing.
    pub fn clear_intent(&self, offset: u64, len: u64) -> Result<bool, MetaError> {
        self.clear_intents(&[(offset, len)])
    }

    /// [`Self::clear_intent`] of many ranges with one durable write (the activity log drops or
    /// evicts extents in batches).
    pub fn clear_intents(&self, ranges: &[(u64, u64)]) -> Result<bool, MetaError> {
        let ticket = {
            let mut st = self.lock();
            if st.hdr.tracking {
                return Ok(false);
            }
            let bs = u64::from(st.hdr.block_size);
            let mut ticket = None;
            for &(offset, len) in ranges {
                let r = bit_range(offset, len, bs, self.nbits);
                let changed = Self::clear_range(&mut st, r.clone());
                let words = (r.start / 64) as usize..(r.end.div_ceil(64)) as usize;
                let t = if changed { Self::stage_words(&mut st, words) } else { st.ticket(words) };
                ticket = ticket.max(t);
            }
            ticket
        };
        self.persist(ticket)?;
        Ok(true)
    }

    /// ORs a peer's bitmap (as [`Self::bitmap_bytes`] gives it) into this one, durably: the
    /// blocks the peer recorded as possibly differing (its write intent) are resent too.
    /// Returns how many bits were newly set.
    pub fn merge_bitmap(&self, bytes: &[u8]) -> Result<u64, MetaError> {
        let (newly, ticket) = self.merge_bits(bytes);
        self.persist(ticket)?;
        Ok(newly)
    }

    fn merge_bits(&self, bytes: &[u8]) -> (u64, Option<u64>) {
        let mut st = self.lock();
        let mut newly = 0u64;
        let (mut lo, mut hi) = (usize::MAX, 0usize);
        for (w, chunk) in bytes.chunks(8).enumerate().take(st.disk.len()) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            let mut v = u64::from_le_bytes(b);
            if w + 1 == st.disk.len() && !self.nbits.is_multiple_of(64) {
                v &= (1u64 << (self.nbits % 64)) - 1;
            }
            st.mem[w] |= v;
            let add = v & !st.disk[w];
            if add != 0 {
                st.disk[w] |= add;
                newly += u64::from(add.count_ones());
                lo = lo.min(w);
                hi = hi.max(w + 1);
            }
        }
        (newly, if lo < hi { Self::stage_words(&mut st, lo..hi) } else { None })
    }

    /// Before applying a write: while tracking, records its range durably and counts it in
    /// flight. Returns whether the write is tracked (then [`Self::end_write`] must follow).
    pub fn begin_write(&self, offset: u64, len: u64) -> Result<bool, MetaError> {
        // Linearized at the flag's store: a write that finds it clear is one that took the lock
        // just before tracking began (it is not recorded either way; the router records it).
        if !self.tracking.load(Ordering::Acquire) {
            return Ok(false);
        }
        let ticket = {
            let mut st = self.lock();
            if !st.hdr.tracking {
                return Ok(false);
            }
            st.inflight += 1;
            self.set_bits(&mut st, offset, len).1
        };
        // Counted in flight already: `end_write` follows even when this fails.
        self.persist(ticket).map(|()| true)
    }

    /// After a tracked write was applied (or failed): sets its bits again, because a sync may
    /// have taken them, read the old data and committed them while the write was in flight.
    pub fn end_write(&self, offset: u64, len: u64) -> Result<(), MetaError> {
        let ticket = {
            let mut st = self.lock();
            let ticket = self.set_bits(&mut st, offset, len).1;
            st.inflight = st.inflight.saturating_sub(1);
            ticket
        };
        self.persist(ticket)
    }

    /// Marks the whole volume dirty (full sync), durably.
    pub fn set_all_dirty(&self) -> Result<(), MetaError> {
        let size = self.lock().hdr.size;
        self.mark_dirty(0, size)?;
        Ok(())
    }

    /// Clears both bitmaps (a discarded replica starts over), durably.
    pub fn clear_all(&self) -> Result<(), MetaError> {
        let ticket = {
            let mut st = self.lock();
            st.disk.iter_mut().for_each(|w| *w = 0);
            st.mem.iter_mut().for_each(|w| *w = 0);
            let n = st.disk.len();
            Self::stage_words(&mut st, 0..n)
        };
        self.persist(ticket)
    }

    /// Takes the still-to-send bits of `[start, start+count)` out of the in-memory bitmap and
    /// returns them (one bool per bit). The disk bits stay set until [`Self::commit`].
    pub fn take(&self, start: u64, count: u64) -> Vec<bool> {
        let mut st = self.lock();
        let end = (start + count).min(self.nbits);
        (start..end)
            .map(|bit| {
                let (w, m) = ((bit / 64) as usize, 1u64 << (bit % 64));
                let set = st.mem[w] & m != 0;
                st.mem[w] &= !m;
                set
            })
            .collect()
    }

    /// Puts taken bits back (the window failed to sync).
    pub fn restore(&self, start: u64, bits: &[bool]) {
        let mut st = self.lock();
        for (i, &b) in bits.iter().enumerate() {
            if b {
                let bit = start + i as u64;
                st.mem[(bit / 64) as usize] |= 1u64 << (bit % 64);
            }
        }
    }

    /// After the peer flushed a taken window: clears on disk the taken bits that were not set
    /// again in memory by a write since [`Self::take`], durably.
    pub fn commit(&self, start: u64, bits: &[bool]) -> Result<(), MetaError> {
        let ticket = self.clear_taken(start, bits);
        self.persist(ticket)
    }

    fn clear_taken(&self, start: u64, bits: &[bool]) -> Option<u64> {
        let mut st = self.lock();
        let mut lo = usize::MAX;
        let mut hi = 0usize;
        for (i, &b) in bits.iter().enumerate() {
            if !b {
                continue;
            }
            let bit = start + i as u64;
            let (w, m) = ((bit / 64) as usize, 1u64 << (bit % 64));
            if st.mem[w] & m == 0 && st.disk[w] & m != 0 {
                st.disk[w] &= !m;
                lo = lo.min(w);
                hi = hi.max(w + 1);
            }
        }
        if lo < hi {
            Self::stage_words(&mut st, lo..hi)
        } else {
            None
        }
    }

    /// Leaves tracking mode if, atomically with respect to [`Self::mark_dirty`], nothing is dirty
    /// or pending. Returns whether it did.
    pub fn end_tracking_if_clean(&self) -> Result<bool, MetaError> {
        let mut st = self.lock();
        if st.inflight > 0 || st.mem.iter().chain(&st.disk).any(|w| *w != 0) {
            return Ok(false);
        }
        st.hdr.tracking = false;
        self.write_header(&mut st)?;
        Ok(true)
    }

    /// Bits still to send (in memory).
    pub fn pending_bits(&self) -> u64 {
        self.lock().mem.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Bits set on disk (not yet confirmed on the peer).
    pub fn dirty_bits(&self) -> u64 {
        self.lock().disk.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// First bit at or after `from` that is still to send.
    pub fn next_pending(&self, from: u64) -> Option<u64> {
        let st = self.lock();
        let mut w = (from / 64) as usize;
        let mut word = st.mem.get(w)? & (!0u64 << (from % 64));
        loop {
            if word != 0 {
                let bit = w as u64 * 64 + u64::from(word.trailing_zeros());
                return (bit < self.nbits).then_some(bit);
            }
            w += 1;
            word = *st.mem.get(w)?;
        }
    }

    /// True when no block of `[offset, offset+len)` is dirty: the peer has all of it.
    pub fn is_clean(&self, offset: u64, len: u64) -> bool {
        let st = self.lock();
        let bs = u64::from(st.hdr.block_size);
        bit_range(offset, len, bs, self.nbits).all(|bit| {
            let (w, m) = ((bit / 64) as usize, 1u64 << (bit % 64));
            (st.mem[w] | st.disk[w]) & m == 0
        })
    }

    /// The on-disk bitmap bytes (little-endian words), for status and the router.
    pub fn bitmap_bytes(&self) -> Vec<u8> {
        let st = self.lock();
        st.disk.iter().zip(&st.mem).flat_map(|(d, m)| (d | m).to_le_bytes()).collect()
    }
}

/// What a sync source should do, given its generations and the peer's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncPlan {
    /// Same generation, nothing dirty: nothing to send.
    UpToDate,
    /// The peer is an ancestor (or an interrupted sync from us): send the dirty bitmap.
    Resync,
    /// The peer has no generation (new or discarded): compare every block.
    Full,
    /// Not safe to push: the reason, for the operator.
    Refuse(String),
}

fn lineage(g: &GenInfo) -> impl Iterator<Item = u64> + '_ {
    std::iter::once(g.current).chain(g.history.iter().copied()).filter(|&x| x != 0)
}

/// Decides how `local` (the would-be source) may bring `peer` up to date. Pure.
pub fn plan(local: &GenInfo, local_dirty_bits: u64, peer: &GenInfo) -> SyncPlan {
    // An interrupted sync from our lineage resumes from our bitmap (also onto a new replica).
    if !peer.consistent && peer.sync_source != 0 && lineage(local).any(|g| g == peer.sync_source) {
        return SyncPlan::Resync;
    }
    if peer.current == 0 {
        return SyncPlan::Full;
    }
    if local.current == 0 {
        return SyncPlan::Refuse(format!(
            "this replica was never synced but the peer holds generation {:#x}: push from the peer \
             instead (or `mirror resolve --discard` the peer to overwrite it)",
            peer.current
        ));
    }
    if !peer.consistent {
        return if lineage(local).any(|g| g == peer.sync_source) { SyncPlan::Resync } else { SyncPlan::Full };
    }
    if peer.current == local.current {
        return if local_dirty_bits == 0 { SyncPlan::UpToDate } else { SyncPlan::Resync };
    }
    if local.history.contains(&peer.current) {
        return SyncPlan::Resync;
    }
    if peer.history.contains(&local.current) {
        return SyncPlan::Refuse(format!(
            "the peer is newer: its generation {:#x} descends from ours ({:#x}); sync from the \
             peer to this replica instead",
            peer.current, local.current
        ));
    }
    SyncPlan::Refuse(format!(
        "split brain: both replicas were written independently (local generation {:#x}, history \
         {:x?}; peer generation {:#x}, history {:x?}). Automatic resync refused. Choose the side \
         whose writes are discarded and run `mirror resolve --node <that node> --volume <name> \
         --discard`, then sync from the other side",
        local.current, local.history, peer.current, peer.history
    ))
}

/// Shifts `current` into the history and starts a new generation (entering degraded mode, or
/// first sync of a never-synced source).
pub fn new_generation(g: &mut GenInfo) {
    if g.current != 0 {
        g.history.rotate_right(1);
        g.history[0] = g.current;
    }
    g.current = random_u64();
    g.consistent = true;
    g.sync_source = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::storage::TempFile;

    fn tmp(tag: &str) -> TempFile {
        TempFile::new(&format!("meta-{tag}"))
    }

    #[test]
    fn write_intent_marks_and_clears_without_tracking_and_merges() {
        let t = tmp("intent");
        let m = VolumeMeta::open(&t.0, 1 << 20, 4096).unwrap();
        assert!(m.mark_intent(8192, 8192).unwrap());
        assert!(!m.header().tracking, "intent is not degraded tracking");
        assert_eq!(m.dirty_bits(), 2);
        drop(m);
        // Durable: a crashed router's intent survives.
        let m = VolumeMeta::open(&t.0, 1 << 20, 4096).unwrap();
        assert_eq!(m.dirty_bits(), 2);
        assert!(m.clear_intent(0, 1 << 20).unwrap());
        assert_eq!((m.dirty_bits(), m.pending_bits()), (0, 0));
        // While tracking the bits are the record of what the peer lacks: kept.
        m.mark_intent(0, 4096).unwrap();
        m.update(|h| h.tracking = true).unwrap();
        assert!(!m.clear_intent(0, 4096).unwrap());
        assert_eq!(m.dirty_bits(), 1);
        // A peer's bitmap ORed in.
        let t2 = tmp("intent-peer");
        let peer = VolumeMeta::open(&t2.0, 1 << 20, 4096).unwrap();
        peer.mark_intent(4096 * 10, 4096 * 3).unwrap();
        peer.mark_intent(0, 4096).unwrap();
        assert_eq!(m.merge_bitmap(&peer.bitmap_bytes()).unwrap(), 3, "bit 0 was set already");
        assert_eq!(m.dirty_bits(), 4);
        assert!(!m.is_clean(4096 * 12, 1) && m.is_clean(4096 * 13, 4096));
    }

    #[test]
    fn intents_of_many_ranges_are_one_durable_write() {
        let t = tmp("intents");
        // 1 GiB at 4 KiB blocks: 32 KiB of bitmap, eight pages.
        let m = VolumeMeta::open(&t.0, 1 << 30, 4096).unwrap();
        let far = (1u64 << 30) - (4 << 20);
        assert!(m.mark_intents(&[(0, 4 << 20), (far, 4 << 20), (8 << 20, 4096)]).unwrap());
        assert!(!m.mark_intents(&[(0, 4096)]).unwrap(), "already set");
        assert!(!m.mark_intents(&[]).unwrap());
        // Bits 4158..4162: across a word boundary, partial words on both sides.
        let odd = (16 << 20) + 4096 * 62;
        assert!(m.mark_intents(&[(odd, 4096 * 4)]).unwrap());
        drop(m);
        let m = VolumeMeta::open(&t.0, 1 << 30, 4096).unwrap();
        assert_eq!(m.dirty_bits(), 1024 + 1024 + 1 + 4, "every range durable, pages far apart too");
        assert!(m.is_clean(odd - 4096, 4096) && !m.is_clean(odd, 4096));
        assert!(!m.is_clean(odd + 4096 * 3, 4096) && m.is_clean(odd + 4096 * 4, 4096));
        assert!(!m.header().tracking, "intent is not degraded tracking");
    }

    /// Waits (bounded) until `n` bitmap pages are staged and not yet durable.
    fn wait_staged(m: &VolumeMeta, n: usize) {
        let t0 = std::time::Instant::now();
        while m.lock().unsynced.len() < n {
            assert!(t0.elapsed() < std::time::Duration::from_secs(20), "writers never staged");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn writers_staged_while_a_sync_is_in_flight_share_one() {
        let t = tmp("group");
        // 1 GiB at 4 KiB blocks: eight bitmap pages; one writer per page.
        let m = std::sync::Arc::new(VolumeMeta::open(&t.0, 1 << 30, 4096).unwrap());
        m.update(|h| h.tracking = true).unwrap();
        let before = m.bitmap_syncs();
        // A batch in flight: the I/O lock held, as a writer syncing holds it.
        let io = m.io.lock().unwrap();
        let writers: Vec<_> = (0..8u64)
            .map(|i| {
                let m = m.clone();
                std::thread::spawn(move || m.begin_write(i * (128 << 20), 4096).unwrap())
            })
            .collect();
        wait_staged(&m, 8);
        assert_eq!(m.bitmap_syncs(), before, "nothing synced while the batch before is in flight");
        drop(io);
        for w in writers {
            assert!(w.join().unwrap(), "tracked");
        }
        assert_eq!(m.bitmap_syncs(), before + 1, "eight writers, eight pages, one sync");
        drop(m);
        let m = VolumeMeta::open(&t.0, 1 << 30, 4096).unwrap();
        assert_eq!(m.dirty_bits(), 8, "every writer's bit durable");
    }

    #[test]
    fn a_writer_whose_bits_another_set_waits_for_their_batch() {
        let t = tmp("samebits");
        let m = std::sync::Arc::new(VolumeMeta::open(&t.0, 1 << 20, 4096).unwrap());
        m.update(|h| h.tracking = true).unwrap();
        let io = m.io.lock().unwrap();
        let a = {
            let m = m.clone();
            std::thread::spawn(move || m.mark_dirty(0, 4096).unwrap())
        };
        wait_staged(&m, 1);
        // B writes the same block: its bit is set in memory already, not yet on disk.
        let (tx, rx) = std::sync::mpsc::channel();
        let b = {
            let m = m.clone();
            std::thread::spawn(move || {
                let tracked = m.begin_write(0, 4096).unwrap();
                tx.send(()).unwrap();
                tracked
            })
        };
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(300)).is_err(),
            "B went on before the bit covering its write was durable"
        );
        drop(io);
        assert!(a.join().unwrap(), "A set the bit");
        assert!(b.join().unwrap());
        assert_eq!(m.lock().unsynced.len(), 0);
    }

    #[test]
    fn a_new_bitmap_is_written_not_a_hole() {
        let t = tmp("zeroed");
        let m = VolumeMeta::open(&t.0, 1 << 30, 4096).unwrap();
        drop(m);
        let md = std::fs::metadata(&t.0).unwrap();
        use std::os::unix::fs::MetadataExt;
        // The header slot written so far + 32 KiB of bitmap, all allocated.
        assert!(md.blocks() * 512 >= SLOT + 32768, "{} bytes allocated", md.blocks() * 512);
    }

    #[test]
    fn creates_persists_and_reloads() {
        let t = tmp("reload");
        let m = VolumeMeta::open(&t.0, 1 << 20, 4096).unwrap();
        assert_eq!(m.nbits(), 256);
        assert!(!m.mark_dirty(0, 0).unwrap());
        assert!(m.mark_dirty(4096 * 3 + 1, 4096).unwrap()); // bits 3 and 4
        assert!(!m.mark_dirty(4096 * 3, 10).unwrap(), "already set");
        let g = m
            .update(|h| {
                new_generation(&mut h.gen);
                h.tracking = true;
            })
            .unwrap();
        drop(m);
        let m = VolumeMeta::open(&t.0, 1 << 20, 4096).unwrap();
        assert_eq!(m.header().gen, g.gen);
        assert!(m.header().tracking);
        assert_eq!(m.dirty_bits(), 2);
        assert!(!m.is_clean(4096 * 4, 1));
        assert!(m.is_clean(0, 4096 * 3));
    }

    #[test]
    fn the_lease_record_persists_and_a_format_1_header_reads_as_epoch_0() {
        let t = tmp("lease");
        let m = VolumeMeta::open(&t.0, 1 << 20, 4096).unwrap();
        assert_eq!(m.header().lease, PersistedLease::default());
        let lease = PersistedLease {
            accepted: Epoch(7),
            holder: Some(Holder("node1/abc".into())),
            ttl_ms: 2000,
            handed_to: Some(Holder("node2/def".into())),
            released: true,
            coordinated: true,
        };
        m.update(|h| h.lease = lease.clone()).unwrap();
        let gen = m.update(|h| h.gen.current = 5).unwrap().gen;
        drop(m);
        let m = VolumeMeta::open(&t.0, 1 << 20, 4096).unwrap();
        assert_eq!((m.header().lease, m.header().gen), (lease, gen));
        // A torn newest slot falls back to the previous one, lease and all.
        let before = m.update(|h| h.lease.accepted = Epoch(8)).unwrap();
        let newest = m.update(|h| h.lease.accepted = Epoch(9)).unwrap();
        drop(m);
        let f = OpenOptions::new().write(true).open(&t.0).unwrap();
        f.write_all_at(&[0xee; 4], (newest.seq % 2) * SLOT + 120).unwrap();
        let m = VolumeMeta::open(&t.0, 1 << 20, 4096).unwrap();
        assert_eq!(m.header().lease.accepted, before.lease.accepted);
        // A header written before leases existed (format 1) reads as never leased.
        let mut old = m.header();
        old.seq += 10;
        let mut v1 = old.encode();
        let base = v1.len() - 4 - (8 + 8 + 1 + 2 + 9 + 2 + 9);
        v1.truncate(base);
        v1[..8].copy_from_slice(MAGIC_V1);
        let crc = crc32c::crc32c(&v1);
        v1.extend_from_slice(&crc.to_le_bytes());
        drop(m);
        let f = OpenOptions::new().write(true).open(&t.0).unwrap();
        f.write_all_at(&v1, (old.seq % 2) * SLOT).unwrap();
        let m = VolumeMeta::open(&t.0, 1 << 20, 4096).unwrap();
        assert_eq!((m.header().seq, m.header().lease.accepted), (old.seq, Epoch(0)));
        assert_eq!(m.header().gen, old.gen);
    }

    #[test]
    fn size_mismatch_is_refused() {
        let t = tmp("mismatch");
        VolumeMeta::open(&t.0, 1 << 20, 4096).unwrap();
        let e = VolumeMeta::open(&t.0, 2 << 20, 4096).unwrap_err().to_string();
        assert!(e.contains("belongs to a volume"), "{e}");
    }

    #[test]
    fn torn_newest_slot_falls_back_to_the_other() {
        let t = tmp("torn");
        let m = VolumeMeta::open(&t.0, 1 << 20, 4096).unwrap();
        let first = m.update(|h| h.gen.current = 11).unwrap();
        let second = m.update(|h| h.gen.current = 22).unwrap();
        drop(m);
        // Corrupt the slot holding the newest header.
        let f = OpenOptions::new().write(true).open(&t.0).unwrap();
        f.write_all_at(&[0xff; 16], (second.seq % 2) * SLOT + 20).unwrap();
        let m = VolumeMeta::open(&t.0, 1 << 20, 4096).unwrap();
        assert_eq!(m.header().gen.current, first.gen.current);
    }

    #[test]
    fn take_commit_keeps_bits_rewritten_meanwhile() {
        let t = tmp("commit");
        let m = VolumeMeta::open(&t.0, 1 << 20, 4096).unwrap();
        m.mark_dirty(0, 4096 * 8).unwrap();
        let taken = m.take(0, 8);
        assert_eq!(taken.iter().filter(|b| **b).count(), 8);
        assert_eq!(m.pending_bits(), 0);
        m.mark_dirty(4096 * 2, 1).unwrap(); // a write lands during the window
        m.commit(0, &taken).unwrap();
        // A tracked write in flight across a take/commit is re-marked when it completes.
        m.update(|h| h.tracking = true).unwrap();
        assert!(m.begin_write(4096 * 5, 10).unwrap());
        let t5 = m.take(5, 1);
        m.commit(5, &t5).unwrap();
        assert!(!m.end_tracking_if_clean().unwrap(), "not while a write is in flight");
        m.end_write(4096 * 5, 10).unwrap();
        assert!(!m.is_clean(4096 * 5, 1), "re-marked after the write");
        let t5 = m.take(5, 1);
        m.commit(5, &t5).unwrap();
        assert_eq!(m.dirty_bits(), 1, "the rewritten block stays dirty");
        assert_eq!(m.next_pending(0), Some(2));
        let taken = m.take(0, 8);
        m.restore(0, &taken);
        assert_eq!(m.pending_bits(), 1, "restore puts bits back");
    }

    #[test]
    fn plans() {
        let g = |current, history: [u64; 4]| GenInfo { current, history, consistent: true, sync_source: 0 };
        assert_eq!(plan(&g(5, [0; 4]), 0, &g(0, [0; 4])), SyncPlan::Full);
        assert_eq!(plan(&g(5, [0; 4]), 0, &g(5, [0; 4])), SyncPlan::UpToDate);
        assert_eq!(plan(&g(5, [0; 4]), 3, &g(5, [0; 4])), SyncPlan::Resync);
        assert_eq!(plan(&g(6, [5, 0, 0, 0]), 3, &g(5, [0; 4])), SyncPlan::Resync);
        assert!(
            matches!(plan(&g(5, [0; 4]), 0, &g(6, [5, 0, 0, 0])), SyncPlan::Refuse(r) if r.contains("newer"))
        );
        assert!(
            matches!(plan(&g(7, [5, 0, 0, 0]), 0, &g(6, [5, 0, 0, 0])), SyncPlan::Refuse(r) if r.contains("split brain"))
        );
        assert!(matches!(plan(&g(0, [0; 4]), 0, &g(6, [0; 4])), SyncPlan::Refuse(_)));
        let interrupted = GenInfo { current: 0, history: [0; 4], consistent: false, sync_source: 0 };
        assert_eq!(plan(&g(5, [0; 4]), 9, &interrupted), SyncPlan::Full);
        let resumable = GenInfo { current: 4, history: [0; 4], consistent: false, sync_source: 5 };
        assert_eq!(plan(&g(5, [0; 4]), 9, &resumable), SyncPlan::Resync);
        let new_interrupted = GenInfo { current: 0, history: [0; 4], consistent: false, sync_source: 5 };
        assert_eq!(plan(&g(6, [5, 0, 0, 0]), 9, &new_interrupted), SyncPlan::Resync);
        let other = GenInfo { current: 4, history: [0; 4], consistent: false, sync_source: 99 };
        assert_eq!(plan(&g(5, [0; 4]), 9, &other), SyncPlan::Full);
    }

    #[test]
    fn new_generation_shifts_history() {
        let mut g = GenInfo { current: 1, history: [2, 3, 4, 5], consistent: false, sync_source: 9 };
        new_generation(&mut g);
        assert_ne!(g.current, 1);
        assert_eq!(g.history, [1, 2, 3, 4]);
        assert!(g.consistent);
    }
}
