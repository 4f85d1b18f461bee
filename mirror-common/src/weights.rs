//! The router's current read weights, mirrored by `mirror serve` into a pinned BPF array so that
//! operators (and other BPF programs) can read them:
//! `bpftool map dump pinned /sys/fs/bpf/mirror/weights-VOLUME`.
//!
//! Map `read_weights` (array, one [`ReadWeights`] at index 0), written by userspace only.

use bytemuck::{Pod, Zeroable};

/// Name of the map in the eBPF object.
pub const MAP_READ_WEIGHTS: &str = "read_weights";

/// Engine modes as stored in [`ReadWeights::mode`].
pub const MODE_NORMAL: u32 = 0;
pub const MODE_PREDICTIVE: u32 = 1;
pub const MODE_FAILOVER: u32 = 2;
pub const MODE_FAILBACK: u32 = 3;
pub const MODE_PINNED: u32 = 4;

/// The read weights of one volume.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ReadWeights {
    /// Percent of reads sent to the source; `source + target == 100`.
    pub source: u32,
    pub target: u32,
    /// `MODE_*`.
    pub mode: u32,
    /// Node health scores 0..=100 (`u32::MAX`: unknown).
    pub source_health: u32,
    pub target_health: u32,
    pub _pad: u32,
    /// Changes of the weights since `mirror serve` started.
    pub changes: u64,
    /// When these weights were set, CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns's clock).
    pub updated_ns: u64,
}

const _: () = {
    assert!(core::mem::size_of::<ReadWeights>() == 40);
    assert!(core::mem::align_of::<ReadWeights>() == 8);
};

#[cfg(feature = "user")]
// SAFETY: #[repr(C)], no padding (bytemuck's Pod derive checks it), every bit pattern valid.
unsafe impl aya::Pod for ReadWeights {}
