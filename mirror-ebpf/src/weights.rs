//! The router's read weights, written by `mirror serve` (userspace) and pinned for bpftool; no
//! program writes it. Layout: `mirror_common::weights`.

use aya_ebpf::{btf_maps::Array, macros::btf_map};
use mirror_common::weights::ReadWeights;

#[btf_map(name = "read_weights")]
static READ_WEIGHTS: Array<ReadWeights, 1> = Array::new();
