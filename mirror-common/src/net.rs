//! Network: TCP retransmits per remote address, from the `tcp:tcp_retransmit_skb` tracepoint.
//!
//! Map `tcp_retrans` (per-CPU hash, [`TcpPeerKey`] -> [`TcpRetrans`]): cumulative.

use bytemuck::{Pod, Zeroable};

/// Name (and pin name) of the retransmit map.
pub const MAP_TCP_RETRANS: &str = "tcp_retrans";
/// Name of the global holding the tracepoint field offsets.
pub const GLOBAL_NET_OFFSETS: &str = "NET_OFFSETS";
/// Capacity of the retransmit map (distinct peers).
pub const TCP_RETRANS_ENTRIES: u32 = 1024;

pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;

/// Offsets of the fields read in the `tcp_retransmit_skb` record, parsed from tracefs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct NetTpOffsets {
    pub family: u32,
    pub daddr: u32,
    pub daddr_v6: u32,
    pub valid: u32,
}

/// A remote peer: address family and address (IPv4 in the first 4 bytes, the rest zero). The
/// remote port is left out on purpose: connections the peer opens to us come from changing ports.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct TcpPeerKey {
    /// `AF_INET` (2) or `AF_INET6` (10).
    pub family: u32,
    pub addr: [u8; 16],
}

/// Retransmitted segments towards one peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TcpRetrans {
    pub retransmits: u64,
}

const _: () = {
    assert!(core::mem::size_of::<NetTpOffsets>() == 16);
    assert!(core::mem::size_of::<TcpPeerKey>() == 20);
    assert!(core::mem::size_of::<TcpRetrans>() == 8);
};

#[cfg(feature = "user")]
mod user {
    use super::{NetTpOffsets, TcpPeerKey, TcpRetrans, AF_INET, AF_INET6};

    // SAFETY: each type is #[repr(C)], has no padding (bytemuck's Pod derive checks it) and every
    // bit pattern is valid.
    unsafe impl aya::Pod for NetTpOffsets {}
    // SAFETY: as above.
    unsafe impl aya::Pod for TcpPeerKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for TcpRetrans {}

    impl TcpPeerKey {
        /// The peer's address.
        pub fn ip(&self) -> Option<core::net::IpAddr> {
            match self.family {
                AF_INET => {
                    Some(core::net::IpAddr::from([self.addr[0], self.addr[1], self.addr[2], self.addr[3]]))
                }
                AF_INET6 => Some(core::net::IpAddr::from(self.addr)),
                _ => None,
            }
        }
    }
}
