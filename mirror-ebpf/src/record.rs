//! One copy of a tracepoint record's first [`TP_RECORD_PREFIX`] bytes per event, then field
//! reads at the offsets userspace parsed from tracefs. One helper call instead of one per field:
//! these programs run on every block request and every context switch.

use aya_ebpf::{helpers::bpf_probe_read_kernel, programs::TracePointContext, EbpfContext};
use mirror_common::TP_RECORD_PREFIX;

/// The copied prefix of a record.
#[repr(C, align(8))]
pub struct Record([u8; TP_RECORD_PREFIX]);

const _: () = assert!(TP_RECORD_PREFIX.is_power_of_two());

impl Record {
    /// Copies the record's prefix. Records shorter than the prefix are followed by the rest of
    /// the per-CPU trace buffer, which the copy may read but the programs never interpret.
    #[inline(always)]
    pub fn read(ctx: &TracePointContext) -> Option<Record> {
        // SAFETY: bpf_probe_read_kernel never faults; a failed copy returns an error.
        unsafe { bpf_probe_read_kernel(ctx.as_ptr() as *const Record).ok() }
    }

    /// `N` bytes at `off`, or zeros when they do not fit in the prefix (userspace rejects such
    /// offsets before load, so that branch is never taken).
    #[inline(always)]
    pub fn bytes<const N: usize>(&self, off: u32) -> [u8; N] {
        // The mask is a no-op for valid offsets; it bounds the index for the verifier.
        let o = off as usize & (TP_RECORD_PREFIX - 1);
        let mut out = [0u8; N];
        if o + N <= TP_RECORD_PREFIX {
            let mut i = 0;
            while i < N {
                out[i] = self.0[o + i];
                i += 1;
            }
        }
        out
    }

    #[inline(always)]
    pub fn u16(&self, off: u32) -> u16 {
        u16::from_ne_bytes(self.bytes::<2>(off))
    }

    #[inline(always)]
    pub fn u32(&self, off: u32) -> u32 {
        u32::from_ne_bytes(self.bytes::<4>(off))
    }

    #[inline(always)]
    pub fn u64(&self, off: u32) -> u64 {
        u64::from_ne_bytes(self.bytes::<8>(off))
    }
}
