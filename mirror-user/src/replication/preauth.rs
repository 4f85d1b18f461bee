//! The gate in front of authentication: how many connections may be unauthenticated at once,
//! in all and per peer address (an IPv4 address, an IPv6 /64). When a cap is full the *oldest*
//! unauthenticated connection of that scope is evicted to admit the new one: a flood of slow
//! connections cannot starve a legitimate peer, whose handshake takes milliseconds, and the
//! memory they hold is bounded whatever their number.
//!
//! Pure: [`PreAuthGate::admit`] says which connection gets in and which must be closed; the
//! accept loop does the closing and calls [`PreAuthGate::release`] when a connection
//! authenticates or ends. Connections are numbered in arrival order, so the oldest is the
//! lowest number. [`Gate`] is the accept loops' handle on it (the replica server's and the NBD
//! server's): the lock, and the signal that closes an evicted connection.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex},
};

use tokio::sync::oneshot;

/// Unauthenticated connections a replica server holds at most.
pub const MAX_UNAUTHENTICATED: usize = 256;
/// Unauthenticated connections one peer address (IPv4 address, IPv6 /64) holds at most.
pub const MAX_UNAUTHENTICATED_PER_PEER: usize = 16;

/// Where a connection comes from, for the per-peer cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    V4([u8; 4]),
    /// The first 64 bits of the address.
    V6Prefix(u64),
}

impl Scope {
    pub fn of(ip: IpAddr) -> Scope {
        match ip {
            IpAddr::V4(v4) => Scope::V4(v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Scope::V4(v4.octets()),
                None => Scope::V6Prefix((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

/// What [`PreAuthGate::admit`] decided: the new connection's number, and the connections to
/// close to make room for it (oldest first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    pub id: u64,
    pub evict: Vec<u64>,
}

/// The unauthenticated connections of one server.
#[derive(Debug)]
pub struct PreAuthGate {
    max_total: usize,
    max_per_scope: usize,
    next: u64,
    open: BTreeMap<u64, Scope>,
    per_scope: HashMap<Scope, usize>,
}

impl Default for PreAuthGate {
    fn default() -> Self {
        PreAuthGate::new(MAX_UNAUTHENTICATED, MAX_UNAUTHENTICATED_PER_PEER)
    }
}

impl PreAuthGate {
    /// A gate holding at most `max_total` connections, `max_per_scope` per peer scope (each at
    /// least 1).
    pub fn new(max_total: usize, max_per_scope: usize) -> PreAuthGate {
        PreAuthGate {
            max_total: max_total.max(1),
            max_per_scope: max_per_scope.max(1),
            next: 0,
            open: BTreeMap::new(),
            per_scope: HashMap::new(),
        }
    }

    /// Admits a connection from `ip`, evicting the oldest of its scope when the scope is full,
    /// and then the oldest of all when the server is.
    pub fn admit(&mut self, ip: IpAddr) -> Admission {
        let scope = Scope::of(ip);
        let mut evict = Vec::new();
        if self.per_scope.get(&scope).copied().unwrap_or(0) >= self.max_per_scope {
            if let Some(id) = self.open.iter().find(|(_, s)| **s == scope).map(|(id, _)| *id) {
                self.release(id);
                evict.push(id);
            }
        }
        if self.open.len() >= self.max_total {
            if let Some(id) = self.open.keys().next().copied() {
                self.release(id);
                evict.push(id);
            }
        }
        let id = self.next;
        self.next += 1;
        self.open.insert(id, scope);
        *self.per_scope.entry(scope).or_default() += 1;
        Admission { id, evict }
    }

    /// The connection `id` authenticated, ended or was evicted (a second release is a no-op).
    pub fn release(&mut self, id: u64) {
        if let Some(scope) = self.open.remove(&id) {
            match self.per_scope.get_mut(&scope) {
                Some(n) if *n > 1 => *n -= 1,
                _ => {
                    self.per_scope.remove(&scope);
                }
            }
        }
    }

    /// Unauthenticated connections held.
    pub fn len(&self) -> usize {
        self.open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// Unauthenticated connections held from `ip`'s scope.
    pub fn count(&self, ip: IpAddr) -> usize {
        self.per_scope.get(&Scope::of(ip)).copied().unwrap_or(0)
    }
}

// The accept loops' side (the replica server's, the NBD server's): the gate behind a lock,
// with a signal per admitted connection that closes it when evicted.

/// The [`PreAuthGate`] and how to close the connections it evicts.
#[derive(Default)]
pub(crate) struct Gate {
    gate: PreAuthGate,
    evict: HashMap<u64, oneshot::Sender<()>>,
}

/// An admitted connection: its number, and the signal that it was evicted.
pub(crate) struct Ticket {
    pub(crate) id: u64,
    pub(crate) evicted: oneshot::Receiver<()>,
    pub(crate) gate: Arc<Mutex<Gate>>,
}

/// Releases a connection's place in the gate (on authentication or end).
pub(crate) struct Release {
    pub(crate) id: u64,
    pub(crate) gate: Arc<Mutex<Gate>>,
}

impl Drop for Release {
    fn drop(&mut self) {
        let mut g = self.gate.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        g.gate.release(self.id);
        g.evict.remove(&self.id);
    }
}

impl Gate {
    /// Admits a connection from `ip`, closing those the gate evicts; how many it evicted.
    pub(crate) fn admit(gate: &Arc<Mutex<Gate>>, ip: IpAddr) -> (Ticket, usize) {
        let mut g = gate.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let a = g.gate.admit(ip);
        for id in &a.evict {
            if let Some(tx) = g.evict.remove(id) {
                let _ = tx.send(());
            }
        }
        let (tx, evicted) = oneshot::channel();
        g.evict.insert(a.id, tx);
        (Ticket { id: a.id, evicted, gate: gate.clone() }, a.evict.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_full_peer_scope_evicts_its_own_oldest_and_spares_the_others() {
        let mut g = PreAuthGate::new(10, 3);
        let router = g.admit(ip("127.0.0.1"));
        let flood: Vec<u64> = (0..3).map(|_| g.admit(ip("127.0.0.2")).id).collect();
        assert_eq!(g.count(ip("127.0.0.2")), 3);
        // The fourth from the flooding address evicts the flood's oldest, not the router.
        let a = g.admit(ip("127.0.0.2"));
        assert_eq!(a.evict, vec![flood[0]]);
        assert_eq!((g.count(ip("127.0.0.2")), g.count(ip("127.0.0.1")), g.len()), (3, 1, 4));
        for _ in 0..100 {
            assert!(!g.admit(ip("127.0.0.2")).evict.contains(&router.id));
        }
        assert_eq!(g.len(), 4);
        g.release(router.id);
        g.release(router.id);
        assert_eq!((g.count(ip("127.0.0.1")), g.len()), (0, 3));
    }

    #[test]
    fn a_full_server_evicts_the_oldest_of_all() {
        let mut g = PreAuthGate::new(4, 4);
        let ids: Vec<u64> = (1..=4).map(|i| g.admit(ip(&format!("10.0.0.{i}"))).id).collect();
        let a = g.admit(ip("10.0.0.9"));
        assert_eq!(a.evict, vec![ids[0]]);
        assert_eq!(g.len(), 4);
        assert_eq!(g.count(ip("10.0.0.1")), 0);
        // Released connections make room without evicting.
        g.release(ids[1]);
        assert!(g.admit(ip("10.0.0.10")).evict.is_empty());
    }

    #[test]
    fn ipv6_peers_share_a_scope_per_64_and_mapped_ipv4_is_ipv4() {
        assert_eq!(Scope::of(ip("2001:db8::1")), Scope::of(ip("2001:db8::ffff:2")));
        assert_ne!(Scope::of(ip("2001:db8::1")), Scope::of(ip("2001:db8:0:1::1")));
        assert_eq!(Scope::of(ip("::ffff:10.0.0.1")), Scope::of(ip("10.0.0.1")));
        let mut g = PreAuthGate::new(100, 2);
        g.admit(ip("2001:db8::1"));
        g.admit(ip("2001:db8::2"));
        assert_eq!(g.admit(ip("2001:db8::3")).evict.len(), 1);
    }
}
