//! Types shared between the mirror eBPF programs (`mirror-ebpf`) and userspace (`mirror-user`).
//!
//! Everything here is `no_std`, `#[repr(C)]`, free of implicit padding (bytemuck `Pod` proves it at
//! compile time) and guarded by size/alignment asserts, because the same bytes are read by the
//! kernel-side program, by the userspace collector and by `bpftool` through BTF.
#![no_std]

pub mod blk;
pub mod hist;
pub mod mm;
pub mod net;
pub mod sched;
pub mod weights;

/// Directory under bpffs where the daemon pins its maps.
pub const PIN_DIR: &str = "/sys/fs/bpf/mirror";

/// Bytes of a tracepoint record the programs copy at once (one `bpf_probe_read_kernel` per
/// event instead of one per field); every field they read must end within it. Userspace checks
/// that when it parses the formats.
pub const TP_RECORD_PREFIX: usize = 128;

/// `floor(log2(v))` for `v > 0`, and 0 for `v == 0`, written without loops or `ctlz` so the BPF
/// backend and verifier accept it.
#[inline(always)]
pub const fn log2_u64(mut v: u64) -> u32 {
    let mut r: u32 = 0;
    if v >= 1 << 32 {
        v >>= 32;
        r += 32;
    }
    if v >= 1 << 16 {
        v >>= 16;
        r += 16;
    }
    if v >= 1 << 8 {
        v >>= 8;
        r += 8;
    }
    if v >= 1 << 4 {
        v >>= 4;
        r += 4;
    }
    if v >= 1 << 2 {
        v >>= 2;
        r += 2;
    }
    if v >= 1 << 1 {
        r += 1;
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log2_matches_std() {
        assert_eq!(log2_u64(0), 0);
        for v in [1u64, 2, 3, 4, 5, 7, 8, 1023, 1024, 1025, u64::from(u32::MAX), 1 << 40, u64::MAX] {
            assert_eq!(log2_u64(v), v.ilog2(), "v={v}");
        }
    }
}
