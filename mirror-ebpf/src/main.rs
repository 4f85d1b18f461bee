//! mirror's eBPF programs. One module per signal; maps are BTF-defined so `bpftool map dump`
//! prints field names once userspace pins them under `/sys/fs/bpf/mirror/`.
#![no_std]
#![no_main]

mod blk;
mod mm;
mod net;
mod record;
mod sched;
mod weights;

/// The programs read tracepoint records with `bpf_probe_read_kernel`, which is GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: BPF programs cannot unwind or abort; the verifier rejects any reachable path to
    // here, so every panic site must be proven unreachable at load time.
    unsafe { core::hint::unreachable_unchecked() }
}
