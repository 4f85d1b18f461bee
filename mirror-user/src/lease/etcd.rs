//! The lease in etcd (`--lease-store etcd://HOST:PORT[,HOST:PORT...]`), with the maintained
//! `etcd-client` crate (v3 gRPC API).
//!
//! Keys, under `/mirror/volumes/<volume>/`:
//! - `holder`: the active router (`{"holder","epoch","ttl_ms"}`), attached to the holder's etcd
//!   lease, so etcd deletes it when the lease expires or is revoked. A key that exists is a live
//!   lease; its time left is the etcd lease's.
//! - `epoch`: the counter (`{"epoch","current"}`), never leased: the last epoch issued and, while
//!   a holder writes with one replica only, which replica holds every acknowledged write
//!   ([`CurrentMark`], by metadata uuid; absent: both do). Carried over by every campaign and
//!   handover, so it outlives the holder that set it; cleared by the holder after the resync. (An
//!   `outdated` field of earlier builds, which named the replica written without, is not read:
//!   no router ever wrote it and nothing was deployed with it.) Every change of holder is one transaction that requires the
//!   counter unchanged since it was read (`mod_revision`) and raises it, so epochs only grow, and
//!   two campaigners cannot both win.
//! - `standby/<holder>`: a standby's announcement, attached to the standby's own etcd lease.
//!
//! Each router has one etcd lease (its *session*), granted on first use and kept alive by
//! [`LeaseStore::renew`] / [`LeaseStore::renew_standby`]. The holder key and the standby key both
//! hang on it, which is what makes the handover atomic: the active router's handover transaction
//! moves `holder` onto the standby's session lease (and raises the counter, and deletes the
//! announcement) in one step. There is no instant at which nobody holds the key, so a third router
//! cannot slip in, and the standby already keeps the lease alive.
//!
//! The alternative, the active revoking its lease and the standby campaigning, leaves a gap that
//! any campaigner could win, and costs a round trip more.
//!
//! An etcd lease alone does not fence: a holder paused past its TTL wakes up believing it holds
//! it (Jepsen's etcd 3.4.3 analysis shows such a lock held twice). The epoch issued here is what the
//! new holder writes to the replicas; the replicas refuse the old holder from then on.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetResponse, LeaseKeepAliveStream, LeaseKeeper,
    PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::{
    Clock, CurrentMark, Epoch, Held, Holder, LeaseError, LeaseRecord, LeaseState, LeaseStore, Renewal,
    Takeover,
};

/// Where and how to reach etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// `http://host:port` for each member.
    pub endpoints: Vec<String>,
    /// Key prefix (default `/mirror/volumes/`).
    pub prefix: String,
    /// How long one request may take before it counts as unanswered.
    pub request_timeout: Duration,
}

impl EtcdConfig {
    /// Parses `etcd://HOST:PORT[,HOST:PORT...]`.
    pub fn parse(url: &str) -> Result<EtcdConfig, String> {
        let rest = url
            .strip_prefix("etcd://")
            .ok_or_else(|| format!("`{url}`: expected etcd://HOST:PORT[,HOST:PORT...]"))?;
        let endpoints: Vec<String> = rest
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(|e| {
                let (host, port) = e.rsplit_once(':').ok_or_else(|| format!("`{e}`: expected HOST:PORT"))?;
                port.parse::<u16>().map_err(|_| format!("`{e}`: bad port"))?;
                if host.is_empty() {
                    return Err(format!("`{e}`: empty host"));
                }
                Ok(format!("http://{e}"))
            })
            .collect::<Result<_, _>>()?;
        if endpoints.is_empty() {
            return Err(format!("`{url}`: no endpoint"));
        }
        Ok(EtcdConfig {
            endpoints,
            prefix: "/mirror/volumes/".into(),
            request_timeout: Duration::from_secs(1),
        })
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct HolderValue {
    holder: Holder,
    epoch: Epoch,
    ttl_ms: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct EpochValue {
    epoch: Epoch,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    current: Option<CurrentMark>,
}

#[derive(Debug, Serialize, Deserialize)]
struct StandbyValue {
    holder: Holder,
    lease: i64,
}

/// This router's etcd lease and its keep-alive stream.
struct Session {
    id: i64,
    ttl: Duration,
    /// When the last successful grant or keep-alive was sent (the lease runs from no earlier).
    last_sent: Duration,
    stream: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("id", &self.id).field("ttl", &self.ttl).finish_non_exhaustive()
    }
}

/// The etcd lease store for one volume and one router.
pub struct EtcdLeaseStore<C> {
    client: Client,
    cfg: EtcdConfig,
    volume: String,
    me: Holder,
    ttl: Duration,
    clock: C,
    session: Mutex<Option<Session>>,
}

impl<C> std::fmt::Debug for EtcdLeaseStore<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdLeaseStore")
            .field("endpoints", &self.cfg.endpoints)
            .field("volume", &self.volume)
            .field("me", &self.me)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

// gRPC status codes (fixed by the gRPC specification).
const GRPC_CANCELLED: i32 = 1;
const GRPC_DEADLINE_EXCEEDED: i32 = 4;
const GRPC_UNAVAILABLE: i32 = 14;

/// Which failures a request may be repeated after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Reads, keep-alives, grants, revokes: any unavailability.
    Repeatable,
    /// Compare-and-set transactions: only when the request cannot have reached etcd.
    IfNeverSent,
}

/// The request cannot have been applied: no connection to the member, or the member has no
/// leader (etcd refuses before proposing).
fn never_sent(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(st) => {
            i32::from(st.code()) == GRPC_UNAVAILABLE
                && (st.message().contains("connect error") || st.message().contains("no leader"))
        }
        _ => false,
    }
}

/// The etcd lease's TTL: whole seconds, at least one.
fn ttl_secs(ttl: Duration) -> i64 {
    (ttl.as_millis().div_ceil(1000) as i64).max(1)
}

impl<C: Clock> EtcdLeaseStore<C> {
    /// Connects (lazily: members that are down are tried again later by the client).
    pub async fn connect(
        cfg: EtcdConfig,
        volume: &str,
        me: Holder,
        ttl: Duration,
        clock: C,
    ) -> Result<EtcdLeaseStore<C>, LeaseError> {
        let opts = ConnectOptions::new()
            .with_timeout(cfg.request_timeout)
            .with_connect_timeout(cfg.request_timeout)
            .with_require_leader(true);
        let client =
            tokio::time::timeout(cfg.request_timeout * 2, Client::connect(&cfg.endpoints, Some(opts)))
                .await
                .map_err(|_| LeaseError::EtcdTimeout { op: "connect", timeout: cfg.request_timeout * 2 })?
                .map_err(|source| LeaseError::Etcd { op: "connect", source })?;
        Ok(EtcdLeaseStore { client, cfg, volume: volume.into(), me, ttl, clock, session: Mutex::new(None) })
    }

    fn key(&self, what: &str) -> String {
        format!("{}{}/{what}", self.cfg.prefix, self.volume)
    }

    fn standby_key(&self, who: &Holder) -> String {
        self.key(&format!("standby/{who}"))
    }

    /// The standby routers announced for this volume ([`LeaseStore::stand_by`]), whose
    /// announcements are alive.
    pub async fn standbys(&self) -> Result<Vec<Holder>, LeaseError> {
        let prefix = self.key("standby/");
        let got = self
            .call_retry("list standbys", Retry::Repeatable, |mut c| {
                let prefix = prefix.clone();
                async move { c.get(prefix, Some(etcd_client::GetOptions::new().with_prefix())).await }
            })
            .await?;
        got.kvs()
            .iter()
            .map(|kv| {
                serde_json::from_slice::<StandbyValue>(kv.value())
                    .map(|v| v.holder)
                    .map_err(|e| self.corrupt(&prefix, e))
            })
            .collect()
    }

    /// A request, tried again (within three request timeouts) while etcd is unavailable in a way
    /// that `retry` allows: any way for requests that may be repeated, only "never sent" (no
    /// connection, no leader) for compare-and-set transactions, whose repetition after a lost
    /// answer would misreport their outcome.
    async fn call_retry<T, Fut>(
        &self,
        op: &'static str,
        retry: Retry,
        mut f: impl FnMut(Client) -> Fut,
    ) -> Result<T, LeaseError>
    where
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = tokio::time::Instant::now() + self.cfg.request_timeout * 3;
        loop {
            let err = match self.call(op, f(self.client.clone())).await {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let again = match (&err, retry) {
                (LeaseError::Etcd { source, .. }, _) if never_sent(source) => true,
                (LeaseError::Etcd { source: etcd_client::Error::GRpcStatus(st), .. }, Retry::Repeatable) => {
                    [GRPC_UNAVAILABLE, GRPC_CANCELLED, GRPC_DEADLINE_EXCEEDED].contains(&i32::from(st.code()))
                }
                (LeaseError::EtcdTimeout { .. }, Retry::Repeatable) => true,
                _ => false,
            };
            if !again || tokio::time::Instant::now() >= deadline {
                return Err(err);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// One attempt with the configured timeout.
    async fn call<T>(
        &self,
        op: &'static str,
        f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, LeaseError> {
        match tokio::time::timeout(self.cfg.request_timeout, f).await {
            Ok(r) => r.map_err(|source| LeaseError::Etcd { op, source }),
            Err(_) => Err(LeaseError::EtcdTimeout { op, timeout: self.cfg.request_timeout }),
        }
    }

    /// A compare-and-set transaction.
    async fn txn(&self, op: &'static str, txn: Txn) -> Result<etcd_client::TxnResponse, LeaseError> {
        self.call_retry(op, Retry::IfNeverSent, |mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
        .await
    }

    async fn revoke(&self, id: i64) -> Result<(), LeaseError> {
        self.call_retry("lease revoke", Retry::Repeatable, |mut c| async move { c.lease_revoke(id).await })
            .await
            .map(|_| ())
    }

    fn corrupt(&self, key: &str, e: impl std::fmt::Display) -> LeaseError {
        LeaseError::Corrupt { key: key.into(), reason: e.to_string() }
    }

    /// The session lease: (id, ttl, last sent, just granted), granting one if there is none.
    async fn session_id(&self) -> Result<(i64, Duration, Duration, bool), LeaseError> {
        let mut s = self.session.lock().await;
        if let Some(s) = s.as_ref() {
            return Ok((s.id, s.ttl, s.last_sent, false));
        }
        let sent = self.clock.now();
        let secs = ttl_secs(self.ttl);
        let g =
            self.call_retry("lease grant", Retry::Repeatable, |mut c| async move {
                c.lease_grant(secs, None).await
            })
            .await?;
        let ttl = Duration::from_secs(g.ttl().max(1) as u64);
        *s = Some(Session { id: g.id(), ttl, last_sent: sent, stream: None });
        Ok((g.id(), ttl, sent, true))
    }

    /// One keep-alive round trip on the session lease: (sent_at, ttl granted). A broken stream (its
    /// member went away) is replaced within the call: opening a stream is a keep-alive too.
    async fn keep_alive(&self, id: i64) -> Result<(Duration, Duration), LeaseError> {
        let mut guard = self.session.lock().await;
        let Some(s) = guard.as_mut().filter(|s| s.id == id) else {
            return Err(LeaseError::Lost {
                volume: self.volume.clone(),
                epoch: Epoch(0),
                reason: format!("etcd lease {id:x} is not this router's session"),
            });
        };
        let mut sent = self.clock.now();
        let mut ttl = match s.stream.as_mut() {
            Some((keeper, stream)) => {
                let round = async {
                    keeper.keep_alive().await?;
                    stream.message().await
                };
                match self.call("keep-alive", round).await {
                    Ok(Some(resp)) => Ok(resp.ttl()),
                    Ok(None) => Err(LeaseError::EtcdTimeout {
                        op: "keep-alive (stream closed)",
                        timeout: Duration::ZERO,
                    }),
                    Err(e) => Err(e),
                }
            }
            None => {
                Err(LeaseError::EtcdTimeout { op: "keep-alive (no stream yet)", timeout: Duration::ZERO })
            }
        };
        if ttl.is_err() {
            // A fresh stream: a late answer on the old one must not be taken for a new request's.
            s.stream = None;
            sent = self.clock.now();
            ttl =
                match self
                    .call_retry("keep-alive", Retry::Repeatable, |mut c| async move {
                        c.lease_keep_alive(id).await
                    })
                    .await
                {
                    Ok(pair) => {
                        s.stream = Some(pair);
                        Ok(s.ttl.as_secs() as i64)
                    }
                    Err(LeaseError::Etcd { source: etcd_client::Error::LeaseKeepAliveError(m), .. }) => {
                        Err(LeaseError::Lost {
                            volume: self.volume.clone(),
                            epoch: Epoch(0),
                            reason: format!("etcd: {m}"),
                        })
                    }
                    Err(e) => Err(e),
                };
        }
        match ttl {
            Ok(t) if t > 0 => {
                s.last_sent = sent;
                Ok((sent, Duration::from_secs(t as u64)))
            }
            Ok(_) => {
                *guard = None;
                Err(LeaseError::Lost {
                    volume: self.volume.clone(),
                    epoch: Epoch(0),
                    reason: "etcd: the lease expired".into(),
                })
            }
            Err(e) => {
                s.stream = None;
                if matches!(e, LeaseError::Lost { .. }) {
                    *guard = None;
                }
                Err(e)
            }
        }
    }

    /// Holder and counter read in one transaction (one revision).
    async fn read(&self) -> Result<(LeaseState, Option<i64>, i64), LeaseError> {
        let (hk, ek) = (self.key("holder"), self.key("epoch"));
        let txn = Txn::new().and_then([TxnOp::get(hk.clone(), None), TxnOp::get(ek.clone(), None)]);
        let resp = self
            .call_retry("read", Retry::Repeatable, |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        let revision = resp.header().map_or(0, etcd_client::ResponseHeader::revision);
        let gets: Vec<GetResponse> = resp
            .op_responses()
            .into_iter()
            .filter_map(|r| match r {
                TxnOpResponse::Get(g) => Some(g),
                _ => None,
            })
            .collect();
        let [holder, epoch] = gets.as_slice() else {
            return Err(self.corrupt(&hk, "read transaction answered without both gets"));
        };
        let (counter, mod_rev) = match epoch.kvs().first() {
            Some(kv) => (
                serde_json::from_slice::<EpochValue>(kv.value()).map_err(|e| self.corrupt(&ek, e))?,
                kv.mod_revision(),
            ),
            None => (EpochValue::default(), 0),
        };
        let (record, lease) = match holder.kvs().first() {
            Some(kv) => {
                let v: HolderValue = serde_json::from_slice(kv.value()).map_err(|e| self.corrupt(&hk, e))?;
                let lease = kv.lease();
                let left = self
                    .call_retry("lease time-to-live", Retry::Repeatable, |mut c| async move {
                        c.lease_time_to_live(lease, None).await
                    })
                    .await?
                    .ttl();
                let now = self.clock.now();
                let rec = LeaseRecord {
                    volume: self.volume.clone(),
                    holder: v.holder,
                    epoch: v.epoch,
                    ttl: Duration::from_millis(v.ttl_ms),
                    expires_at: now + Duration::from_secs(left.max(0) as u64),
                    handed_to: None,
                };
                (Some(rec), Some(kv.lease()))
            }
            None => (None, None),
        };
        let state =
            LeaseState { record, last_epoch: counter.epoch, current: counter.current, revision: mod_rev };
        Ok((state, lease, revision))
    }

    fn holder_value(&self, holder: &Holder, epoch: Epoch, ttl: Duration) -> String {
        serde_json::to_string(&HolderValue { holder: holder.clone(), epoch, ttl_ms: ttl.as_millis() as u64 })
            .unwrap_or_default()
    }

    fn epoch_value(epoch: Epoch, current: Option<CurrentMark>) -> String {
        serde_json::to_string(&EpochValue { epoch, current }).unwrap_or_default()
    }

    /// Sets the counter's `current` while `held` is the holder. Idempotent: a mark already in
    /// place is not written again (which also settles an earlier attempt whose answer was lost).
    async fn set_current(&self, held: &Held, mark: Option<CurrentMark>) -> Result<(), LeaseError> {
        let lost = || LeaseError::Lost {
            volume: self.volume.clone(),
            epoch: held.epoch,
            reason: "the holder key is no longer on this router's etcd lease".into(),
        };
        for _ in 0..3 {
            let (state, lease, _) = self.read().await?;
            if lease != Some(held.token) {
                return Err(lost());
            }
            if state.current == mark {
                return Ok(());
            }
            let (hk, ek) = (self.key("holder"), self.key("epoch"));
            let txn = Txn::new()
                .when([
                    Compare::lease(hk, CompareOp::Equal, held.token),
                    Compare::mod_revision(ek.clone(), CompareOp::Equal, state.revision),
                ])
                .and_then([TxnOp::put(ek, Self::epoch_value(state.last_epoch, mark), None)]);
            if self.txn("mark current replica", txn).await?.succeeded() {
                return Ok(());
            }
        }
        Err(LeaseError::Changed { volume: self.volume.clone() })
    }
}

impl<C: Clock> LeaseStore for EtcdLeaseStore<C> {
    fn volume(&self) -> &str {
        &self.volume
    }

    fn me(&self) -> &Holder {
        &self.me
    }

    async fn current(&self) -> Result<LeaseState, LeaseError> {
        Ok(self.read().await?.0)
    }

    async fn stand_by(&self) -> Result<(), LeaseError> {
        let (id, ..) = self.session_id().await?;
        let v =
            serde_json::to_string(&StandbyValue { holder: self.me.clone(), lease: id }).unwrap_or_default();
        let key = self.standby_key(&self.me);
        self.call_retry("announce standby", Retry::Repeatable, |mut c| {
            let (key, v) = (key.clone(), v.clone());
            async move { c.put(key, v, Some(PutOptions::new().with_lease(id))).await }
        })
        .await?;
        Ok(())
    }

    async fn renew_standby(&self) -> Result<(), LeaseError> {
        let (id, ..) = self.session_id().await?;
        self.keep_alive(id).await.map(|_| ())
    }

    async fn campaign(&self, seen: &LeaseState, how: &Takeover) -> Result<Held, LeaseError> {
        if how.epoch <= seen.last_epoch {
            return Err(LeaseError::EpochTooLow {
                volume: self.volume.clone(),
                epoch: how.epoch,
                floor: seen.last_epoch,
            });
        }
        // The tenure counts from the last keep-alive that was answered: an old session (a standby
        // whose keep-alives went unanswered for a while) is renewed first, so the holder starts
        // with a whole safe window, or learns that the session is gone and takes a new one.
        let (id, ttl, sent_at) = match self.session_id().await? {
            (id, ttl, sent, true) => (id, ttl, sent),
            (id, ttl, _, false) => match self.keep_alive(id).await {
                Ok((sent, _)) => (id, ttl, sent),
                Err(LeaseError::Lost { .. }) => {
                    let (id, ttl, sent, _) = self.session_id().await?;
                    (id, ttl, sent)
                }
                Err(e) => return Err(e),
            },
        };
        let (hk, ek) = (self.key("holder"), self.key("epoch"));
        let handed_to_me = seen.record.as_ref().is_some_and(|r| r.holder == self.me);
        let holder_free_or_mine = if handed_to_me {
            Compare::lease(hk.clone(), CompareOp::Equal, id)
        } else {
            Compare::create_revision(hk.clone(), CompareOp::Equal, 0)
        };
        let txn = Txn::new()
            .when([holder_free_or_mine, Compare::mod_revision(ek.clone(), CompareOp::Equal, seen.revision)])
            .and_then([
                TxnOp::put(
                    hk,
                    self.holder_value(&self.me, how.epoch, ttl),
                    Some(PutOptions::new().with_lease(id)),
                ),
                TxnOp::put(ek, Self::epoch_value(how.epoch, seen.current), None),
                TxnOp::delete(self.standby_key(&self.me), None),
            ]);
        if self.txn("campaign", txn).await?.succeeded() {
            return Ok(Held {
                volume: self.volume.clone(),
                holder: self.me.clone(),
                epoch: how.epoch,
                ttl,
                sent_at,
                token: id,
            });
        }
        // Lost the race: say to whom, if anyone holds it now.
        let (now_state, _, _) = self.read().await?;
        match now_state.record {
            Some(r) if r.holder != self.me => Err(LeaseError::Held {
                volume: self.volume.clone(),
                time_left: r.time_left(self.clock.now()),
                holder: r.holder,
                epoch: r.epoch,
            }),
            _ => Err(LeaseError::Changed { volume: self.volume.clone() }),
        }
    }

    async fn renew(&self, held: &Held) -> Result<Renewal, LeaseError> {
        match self.keep_alive(held.token).await {
            Ok((sent_at, ttl)) => Ok(Renewal { sent_at, ttl }),
            Err(LeaseError::Lost { reason, .. }) => {
                Err(LeaseError::Lost { volume: self.volume.clone(), epoch: held.epoch, reason })
            }
            Err(e) => Err(e),
        }
    }

    async fn mark_current(&self, held: &Held, mark: CurrentMark) -> Result<(), LeaseError> {
        self.set_current(held, Some(mark)).await
    }

    async fn clear_current(&self, held: &Held) -> Result<(), LeaseError> {
        self.set_current(held, None).await
    }

    async fn hand_over(&self, held: &Held, to: &Holder) -> Result<Epoch, LeaseError> {
        let refused =
            |reason: String| LeaseError::Handover { volume: self.volume.clone(), to: to.clone(), reason };
        let sk = self.standby_key(to);
        let key = sk.clone();
        let got = self
            .call_retry("read standby", Retry::Repeatable, |mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
            .await?;
        let Some(kv) = got.kvs().first() else {
            return Err(refused(format!("no standby {to} is announced")));
        };
        let standby: StandbyValue = serde_json::from_slice(kv.value()).map_err(|e| self.corrupt(&sk, e))?;
        let (state, _, _) = self.read().await?;
        let epoch = state.last_epoch.max(held.epoch).next();
        let (hk, ek) = (self.key("holder"), self.key("epoch"));
        let txn = Txn::new()
            .when([
                Compare::lease(hk.clone(), CompareOp::Equal, held.token),
                Compare::mod_revision(ek.clone(), CompareOp::Equal, state.revision),
                Compare::lease(sk.clone(), CompareOp::Equal, standby.lease),
            ])
            .and_then([
                TxnOp::put(
                    hk,
                    self.holder_value(to, epoch, held.ttl),
                    Some(PutOptions::new().with_lease(standby.lease)),
                ),
                TxnOp::put(ek, Self::epoch_value(epoch, state.current), None),
                TxnOp::delete(sk, None),
            ]);
        if !self.txn("hand over", txn).await?.succeeded() {
            return Err(refused("the holder key, the counter or the standby changed meanwhile".into()));
        }
        // Nothing hangs on our session any more; revoking it is tidy, not needed.
        let _ = self.revoke(held.token).await;
        *self.session.lock().await = None;
        Ok(epoch)
    }

    async fn release(&self, held: &Held) -> Result<(), LeaseError> {
        self.revoke(held.token).await?;
        let mut s = self.session.lock().await;
        if s.as_ref().is_some_and(|s| s.id == held.token) {
            *s = None;
        }
        Ok(())
    }

    async fn wait_change(
        &self,
        seen: Option<&LeaseRecord>,
        timeout: Duration,
    ) -> Result<LeaseState, LeaseError> {
        let same = |a: Option<&LeaseRecord>, b: Option<&LeaseRecord>| {
            a.map(|r| (&r.holder, r.epoch)) == b.map(|r| (&r.holder, r.epoch))
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let (state, _, revision) = self.read().await?;
        if !same(state.record.as_ref(), seen) {
            return Ok(state);
        }
        let key = self.key("holder");
        let mut stream = self
            .call_retry("watch", Retry::Repeatable, |mut c| {
                let key = key.clone();
                async move { c.watch(key, Some(WatchOptions::new().with_start_revision(revision + 1))).await }
            })
            .await?;
        let changed = async {
            loop {
                match stream.message().await {
                    Ok(Some(resp)) => {
                        if resp.canceled()
                            || resp
                                .events()
                                .iter()
                                .any(|e| matches!(e.event_type(), EventType::Delete | EventType::Put))
                        {
                            return;
                        }
                    }
                    // The stream broke (a member went away): read again.
                    Ok(None) | Err(_) => return,
                }
            }
        };
        let _ = tokio::time::timeout_at(deadline, changed).await;
        Ok(self.read().await?.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let c = EtcdConfig::parse("etcd://127.0.0.1:2379,10.0.0.2:2379").unwrap();
        assert_eq!(c.endpoints, ["http://127.0.0.1:2379", "http://10.0.0.2:2379"]);
        assert!(EtcdConfig::parse("http://127.0.0.1:2379").is_err());
        assert!(EtcdConfig::parse("etcd://").is_err());
        assert!(EtcdConfig::parse("etcd://host").is_err());
        assert!(EtcdConfig::parse("etcd://:2379").is_err());
        assert!(EtcdConfig::parse("etcd://h:99999").is_err());
    }

    #[test]
    fn ttls_round_up_to_whole_seconds() {
        assert_eq!(ttl_secs(Duration::from_millis(1500)), 2);
        assert_eq!(ttl_secs(Duration::from_secs(2)), 2);
        assert_eq!(ttl_secs(Duration::ZERO), 1);
    }
}
