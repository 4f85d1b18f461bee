//! TCP retransmits per remote address from `tcp:tcp_retransmit_skb` (rare: a few per second on a
//! sick link). Layout and semantics of the map: `mirror_common::net`.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    btf_maps::PerCpuHashMap,
    macros::{btf_map, tracepoint},
    programs::TracePointContext,
};
use aya_log_ebpf::warn;
use mirror_common::net::{NetTpOffsets, TcpPeerKey, TcpRetrans, AF_INET, AF_INET6, TCP_RETRANS_ENTRIES};

use crate::record::Record;

/// Tracepoint field offsets, filled in by userspace before load (see `NetTpOffsets`).
#[unsafe(no_mangle)]
static NET_OFFSETS: NetTpOffsets = NetTpOffsets { family: 0, daddr: 0, daddr_v6: 0, valid: 0 };

#[btf_map(name = "tcp_retrans")]
static TCP_RETRANS: PerCpuHashMap<TcpPeerKey, TcpRetrans, { TCP_RETRANS_ENTRIES as usize }> =
    PerCpuHashMap::new();

#[tracepoint(category = "tcp", name = "tcp_retransmit_skb")]
pub fn tcp_retransmit_skb(ctx: TracePointContext) -> u32 {
    let _ = try_retransmit(&ctx);
    0
}

#[inline(always)]
fn try_retransmit(ctx: &TracePointContext) -> Result<(), i64> {
    // SAFETY: a plain read of a static; volatile so the compiler does not constant-fold the
    // zero initializer that userspace rewrites in .rodata before load.
    let off = unsafe { core::ptr::read_volatile(&NET_OFFSETS) };
    if off.valid == 0 {
        return Ok(());
    }
    let rec = Record::read(ctx).ok_or(-1i64)?;
    let family = u32::from(rec.u16(off.family));
    let mut key = TcpPeerKey { family, addr: [0; 16] };
    if family == AF_INET {
        let a = rec.bytes::<4>(off.daddr);
        key.addr[..4].copy_from_slice(&a);
    } else if family == AF_INET6 {
        key.addr = rec.bytes::<16>(off.daddr_v6);
    }
    let value = match TCP_RETRANS.get_ptr_mut(&key) {
        Some(p) => p,
        None => {
            let zero = TcpRetrans { retransmits: 0 };
            if TCP_RETRANS.insert(&key, &zero, u64::from(BPF_NOEXIST)).is_err()
                && TCP_RETRANS.get_ptr(&key).is_none()
            {
                warn!(ctx, "tcp_retrans full: retransmit to a new peer not counted");
                return Ok(());
            }
            TCP_RETRANS.get_ptr_mut(&key).ok_or(-1i64)?
        }
    };
    // SAFETY: this CPU's copy of a per-CPU hash value; see sched.rs.
    unsafe { (*value).retransmits += 1 };
    Ok(())
}
