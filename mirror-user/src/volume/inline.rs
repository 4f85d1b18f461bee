//! The rules for I/O done on the calling thread ("inline") instead of being handed to a ring or
//! a pool: whole pages of a bounded size, and only while such I/O stays fast on average. Shared
//! by the inline writes of [`super::replica`] and the memory-backed reads of [`super::uring`].

use std::sync::atomic::{AtomicU64, Ordering};

/// Inline I/O slower than this on average (microseconds) goes to the ring or the pool...
pub const SLOW_US: u64 = 500;
/// ...except one attempt in this many, which measures again whether it became fast.
pub const PROBE: u64 = 256;

/// Folds a sample into an exponentially weighted mean (7/8 old; 0 means no sample yet).
pub fn ewma(a: &AtomicU64, sample_us: u64) {
    let old = a.load(Ordering::Relaxed);
    let new = if old == 0 { sample_us } else { (old * 7 + sample_us) / 8 };
    a.store(new.max(1), Ordering::Relaxed);
}

/// True when attempt number `n` should not run inline: slow on average and not a probe.
pub fn too_slow(mean_us: &AtomicU64, n: u64) -> bool {
    mean_us.load(Ordering::Relaxed) > SLOW_US && !n.is_multiple_of(PROBE)
}

/// True for `len` bytes at `offset` in whole pages of `page` bytes, at most `max` bytes (no
/// read of an uncached page first for a write).
pub fn whole_pages(offset: u64, len: usize, page: u64, max: usize) -> bool {
    len > 0 && len <= max && offset.is_multiple_of(page) && (len as u64).is_multiple_of(page)
}
