//! The control socket of `mirror serve`: a Unix socket only root may use (mode 0600, and the
//! peer's uid is checked), one JSON request per line, one JSON reply per line.
//!
//! Requests ([`Request`]): `{"cmd":"status"}`, `{"cmd":"weights_set","for_s":S,"target":N}`
//! (`for_s` may be `null` or left out), `{"cmd":"weights_auto"}`, `{"cmd":"failover"}`,
//! `{"cmd":"failback"}`. They reach the weighting engine as operator overrides.
//! `{"cmd":"handover","to":NODE}` (`to` may be `null` or left out) goes to the serve loop, which
//! runs the planned handover and answers `{"handover":{"epoch":N,"paused_ms":M,"steps":[..],
//! "successor":".."},"ok":true}` once the lease has left (or refuses, serving on).
//!
//! Replies ([`Reply`]): `{"ok":true,"status":{..}}` to `status` (a [`ServeStatus`]; on a standby
//! still waiting for the lease, `{"ok":true,"standby":{..}}`, a [`StandbyStatus`]),
//! `{"mode":"Pinned","ok":true,"reason":"..","target":N}` to the others (the decision they led to),
//! `{"error":"..","ok":false}` when refused. Both sides use these types; the JSON text is only
//! made and read at the socket.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};

use crate::{
    volume::lease::{StandbyStatus, StandbyView},
    weights::{
        driver::Driver,
        engine::{Decision, Mode, Override},
        status::ServeStatus,
    },
};

/// Default path of the control socket.
pub const DEFAULT_SOCKET: &str = "/run/mirror/ctl.sock";

/// A request on the control socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Request {
    /// Weights, mode, per-replica state, node health and signals, sync progress, events.
    Status,
    /// Pin the target's share of reads (0..=100), for `for_s` seconds or until `weights_auto`.
    WeightsSet {
        #[serde(default)]
        for_s: Option<f64>,
        target: u64,
    },
    /// Return to automatic weights.
    WeightsAuto,
    /// Send every read to the target (it must be in sync).
    Failover,
    /// Ramp reads back to the source now (it must be in sync).
    Failback,
    /// Planned handover: shift reads to the other node, quiesce writes, flush both replicas,
    /// hand the lease to the standby router (`to`: its node or `node/instance`; `null`: the one
    /// announced) and stop serving. The reply comes when the lease has left, or the handover was
    /// given up (and service resumed).
    Handover {
        #[serde(default)]
        to: Option<String>,
    },
}

/// The outcome of a planned handover.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HandoverReply {
    /// The router that holds the lease now.
    pub successor: String,
    /// The epoch handed to it.
    pub epoch: u64,
    /// How long writes were held (quiesce to the lease leaving), ms.
    pub paused_ms: u64,
    /// The steps, as logged.
    pub steps: Vec<String>,
}

/// A handover request as the serve loop receives it: the successor asked for, and where the
/// outcome goes.
pub type HandoverAsk = (Option<String>, tokio::sync::oneshot::Sender<Result<HandoverReply, String>>);

/// The decision a weights command led to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeightsReply {
    /// The target's share of reads, percent.
    pub target: u8,
    pub mode: Mode,
    pub reason: String,
}

impl From<Decision> for WeightsReply {
    fn from(d: Decision) -> Self {
        WeightsReply { target: d.target_weight, mode: d.mode, reason: d.reason }
    }
}

/// A reply on the control socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(into = "WireReply", try_from = "WireReply")]
pub enum Reply {
    /// The status of `mirror serve` (`mirror ctl status --json` prints it).
    Status(Box<ServeStatus>),
    Weights(WeightsReply),
    Handover(HandoverReply),
    /// The status of a standby router waiting for the lease (it serves nothing yet).
    Standby(Box<StandbyStatus>),
    /// Refused, with why.
    Error(String),
}

/// A reply as its JSON text spells it: `ok` and the fields of one kind of reply, in the order
/// they always had on the wire (sorted).
#[derive(Serialize, Deserialize)]
struct WireReply {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    handover: Option<HandoverReply>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mode: Option<Mode>,
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    standby: Option<Box<StandbyStatus>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    status: Option<Box<ServeStatus>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    target: Option<u8>,
}

impl From<Reply> for WireReply {
    fn from(r: Reply) -> Self {
        let none = WireReply {
            error: None,
            handover: None,
            mode: None,
            ok: true,
            reason: None,
            standby: None,
            status: None,
            target: None,
        };
        match r {
            Reply::Status(s) => WireReply { status: Some(s), ..none },
            Reply::Weights(w) => {
                WireReply { mode: Some(w.mode), reason: Some(w.reason), target: Some(w.target), ..none }
            }
            Reply::Handover(h) => WireReply { handover: Some(h), ..none },
            Reply::Standby(s) => WireReply { standby: Some(s), ..none },
            Reply::Error(e) => WireReply { error: Some(e), ok: false, ..none },
        }
    }
}

impl TryFrom<WireReply> for Reply {
    type Error = String;

    fn try_from(w: WireReply) -> Result<Self, String> {
        match w {
            WireReply { ok: false, error, .. } => {
                Ok(Reply::Error(error.unwrap_or_else(|| "request failed".into())))
            }
            WireReply { status: Some(s), .. } => Ok(Reply::Status(s)),
            WireReply { handover: Some(h), .. } => Ok(Reply::Handover(h)),
            WireReply { standby: Some(s), .. } => Ok(Reply::Standby(s)),
            WireReply { mode: Some(mode), reason: Some(reason), target: Some(target), .. } => {
                Ok(Reply::Weights(WeightsReply { target, mode, reason }))
            }
            _ => Err("a reply with neither a status nor a decision".into()),
        }
    }
}

/// Errors of the client side ([`request`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    #[error("cannot reach {}: {source} (is `mirror serve` running, and are you root?)", path.display())]
    Unreachable { path: PathBuf, source: std::io::Error },
    #[error("control socket {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("no reply from {}", path.display())]
    NoReply { path: PathBuf },
    #[error("reply from {} not understood: {source}", path.display())]
    BadReply { path: PathBuf, source: serde_json::Error },
    /// The server refused the request (`"ok":false`); its words.
    #[error("{0}")]
    Refused(String),
    #[error("unexpected reply {0:?}")]
    Unexpected(Box<Reply>),
}

impl Reply {
    /// The status, or what was answered instead.
    pub fn into_status(self) -> Result<ServeStatus, ControlError> {
        match self {
            Reply::Status(s) => Ok(*s),
            r => Err(ControlError::Unexpected(Box::new(r))),
        }
    }

    /// The handover's outcome, or what was answered instead.
    pub fn into_handover(self) -> Result<HandoverReply, ControlError> {
        match self {
            Reply::Handover(h) => Ok(h),
            r => Err(ControlError::Unexpected(Box::new(r))),
        }
    }

    /// The decision, or what was answered instead.
    pub fn into_weights(self) -> Result<WeightsReply, ControlError> {
        match self {
            Reply::Weights(w) => Ok(w),
            r => Err(ControlError::Unexpected(Box::new(r))),
        }
    }
}

/// What the control socket drives: the weighting loop, once the router serves; before that (a
/// standby waiting for the lease), the standby's view.
#[derive(Debug)]
pub struct Control {
    serving: std::sync::OnceLock<Serving>,
    standby: Option<StandbyView>,
}

#[derive(Debug)]
struct Serving {
    driver: Arc<Driver>,
    /// Where handover requests go (the serve loop); `None`: this router cannot hand over.
    handover: Option<tokio::sync::mpsc::Sender<HandoverAsk>>,
}

impl Control {
    pub fn new(driver: Arc<Driver>) -> Arc<Control> {
        let c = Control { serving: std::sync::OnceLock::new(), standby: None };
        c.serve_now(driver, None);
        Arc::new(c)
    }

    /// With handovers going to the serve loop.
    pub fn with_handover(driver: Arc<Driver>, tx: tokio::sync::mpsc::Sender<HandoverAsk>) -> Arc<Control> {
        let c = Control { serving: std::sync::OnceLock::new(), standby: None };
        c.serve_now(driver, Some(tx));
        Arc::new(c)
    }

    /// A standby's control socket while it waits for the lease: `status` answers its view
    /// ([`Reply::Standby`]), everything else is refused until [`Self::serve_now`].
    pub fn standing_by(view: StandbyView) -> Arc<Control> {
        Arc::new(Control { serving: std::sync::OnceLock::new(), standby: Some(view) })
    }

    /// The router serves from here: requests drive `driver` (a second call changes nothing).
    pub fn serve_now(&self, driver: Arc<Driver>, handover: Option<tokio::sync::mpsc::Sender<HandoverAsk>>) {
        let _ = self.serving.set(Serving { driver, handover });
    }

    /// Handles one request.
    pub async fn handle(self: &Arc<Self>, req: &Request) -> Reply {
        let Some(serving) = self.serving.get() else {
            return match (req, &self.standby) {
                (Request::Status, Some(v)) => Reply::Standby(Box::new(v.status(std::time::Instant::now()))),
                (_, Some(v)) => {
                    let st = v.status(std::time::Instant::now());
                    let active = st.active.map_or_else(|| "nobody yet".to_string(), |a| a.holder.to_string());
                    Reply::Error(format!(
                        "this router is a standby for volume {} (the active router: {active}): it serves \
                         nothing until it holds the lease; ask the active router",
                        st.volume
                    ))
                }
                (_, None) => Reply::Error("the router is starting".into()),
            };
        };
        serving.handle(req).await
    }
}

impl Serving {
    async fn handle(&self, req: &Request) -> Reply {
        let reply = |r: Result<Decision, String>| match r {
            Ok(d) => Reply::Weights(d.into()),
            Err(e) => Reply::Error(e),
        };
        match *req {
            Request::Handover { ref to } => {
                let Some(tx) = &self.handover else {
                    return Reply::Error("this router holds no lease: nothing to hand over".into());
                };
                let (done, rx) = tokio::sync::oneshot::channel();
                if tx.send((to.clone(), done)).await.is_err() {
                    return Reply::Error("the router is stopping".into());
                }
                match rx.await {
                    Ok(Ok(h)) => Reply::Handover(h),
                    Ok(Err(e)) => Reply::Error(e),
                    Err(_) => Reply::Error("the router stopped before the handover finished".into()),
                }
            }
            Request::Status => Reply::Status(Box::new(self.driver.status().await)),
            Request::WeightsSet { target, for_s } => {
                let Some(t) = u8::try_from(target).ok().filter(|t| *t <= 100) else {
                    return Reply::Error("target must be 0..=100".into());
                };
                let for_ = match for_s {
                    Some(s) if s > 0.0 && s.is_finite() => Some(Duration::from_secs_f64(s)),
                    Some(_) => return Reply::Error("for_s must be > 0".into()),
                    None => None,
                };
                reply(self.driver.pin(t, for_))
            }
            Request::WeightsAuto => reply(self.driver.command(Override::Auto)),
            Request::Failover => reply(self.driver.command(Override::ForceFailover)),
            Request::Failback => reply(self.driver.command(Override::ForceFailback)),
        }
    }
}

/// The request in one line of the socket, or the reply that refuses it.
fn decode_request(line: &str) -> Result<Request, Reply> {
    serde_json::from_str(line).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => Reply::Error(format!("unknown request {line}: {e}")),
        _ => Reply::Error(format!("bad request: {e}")),
    })
}

/// One reply as a line of the socket, its keys sorted at every level (as the text always was).
fn encode_reply(reply: &Reply) -> String {
    // Strings, numbers and structs of them always serialize.
    let mut line = serde_json::to_value(reply).and_then(|v| serde_json::to_string(&v)).unwrap_or_else(|e| {
        serde_json::to_string(&Reply::Error(format!("reply not encodable: {e}"))).unwrap_or_default()
    });
    line.push('\n');
    line
}

/// Binds the control socket at `path` (replacing a stale socket file): clients may connect
/// from the moment this returns, so `mirror serve` binds it before it says it is ready.
pub async fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() && UnixStream::connect(path).await.is_err() {
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    tracing::info!(socket = %path.display(), "control socket ready");
    Ok(listener)
}

/// Answers the requests of a bound control socket ([`bind`]) until the task is dropped.
pub async fn serve(ctl: Arc<Control>, listener: UnixListener) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let uid = stream.peer_cred().map_or(u32::MAX, |c| c.uid());
        let ctl = ctl.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let reply = if uid != 0 {
                    Reply::Error("the control socket is for root only".into())
                } else {
                    match decode_request(&line) {
                        Ok(req) => ctl.handle(&req).await,
                        Err(refused) => refused,
                    }
                };
                if w.write_all(encode_reply(&reply).as_bytes()).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// Client side: sends one request, returns the reply; a refusal (`"ok":false`) is
/// [`ControlError::Refused`].
pub async fn request(path: &Path, req: &Request) -> Result<Reply, ControlError> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|source| ControlError::Unreachable { path: path.into(), source })?;
    let io = |source| ControlError::Io { path: path.into(), source };
    let (r, mut w) = stream.into_split();
    // A request of strings and numbers always serializes.
    let mut line = serde_json::to_string(req).unwrap_or_default();
    line.push('\n');
    w.write_all(line.as_bytes()).await.map_err(io)?;
    let mut lines = BufReader::new(r).lines();
    let line =
        lines.next_line().await.map_err(io)?.ok_or_else(|| ControlError::NoReply { path: path.into() })?;
    match serde_json::from_str(&line) {
        Ok(Reply::Error(e)) => Err(ControlError::Refused(e)),
        Ok(reply) => Ok(reply),
        Err(source) => Err(ControlError::BadReply { path: path.into(), source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::status::example;

    /// The requests as `mirror ctl` always sent them (`serde_json::json!`, keys sorted).
    #[test]
    fn requests_keep_their_wire_text() {
        let text = |r: &Request| serde_json::to_string(r).unwrap();
        assert_eq!(text(&Request::Status), r#"{"cmd":"status"}"#);
        assert_eq!(
            text(&Request::WeightsSet { for_s: Some(600.0), target: 30 }),
            r#"{"cmd":"weights_set","for_s":600.0,"target":30}"#
        );
        assert_eq!(
            text(&Request::WeightsSet { for_s: None, target: 100 }),
            r#"{"cmd":"weights_set","for_s":null,"target":100}"#
        );
        assert_eq!(text(&Request::WeightsAuto), r#"{"cmd":"weights_auto"}"#);
        assert_eq!(text(&Request::Failover), r#"{"cmd":"failover"}"#);
        assert_eq!(text(&Request::Failback), r#"{"cmd":"failback"}"#);
    }

    #[test]
    fn requests_decode_as_the_server_always_read_them() {
        assert_eq!(decode_request(r#"{"cmd":"status"}"#), Ok(Request::Status));
        // `for_s` may be left out, and any key order goes.
        assert_eq!(
            decode_request(r#"{"target":5,"cmd":"weights_set"}"#),
            Ok(Request::WeightsSet { for_s: None, target: 5 })
        );
        assert_eq!(
            decode_request(r#"{"cmd":"weights_set","target":5,"for_s":1}"#),
            Ok(Request::WeightsSet { for_s: Some(1.0), target: 5 })
        );
        let refused = |line: &str| match decode_request(line) {
            Err(Reply::Error(e)) => e,
            r => panic!("{line}: {r:?}"),
        };
        assert!(refused(r#"{"cmd":"reboot"}"#).starts_with(r#"unknown request {"cmd":"reboot"}"#));
        assert!(refused(r#"{"cmd":"weights_set"}"#).contains("target"));
        assert!(refused("status").starts_with("bad request: "));
    }

    #[test]
    fn replies_keep_their_wire_text() {
        let text = |r: Reply| encode_reply(&r);
        assert_eq!(
            text(Reply::Weights(WeightsReply { target: 30, mode: Mode::Pinned, reason: "operator".into() })),
            "{\"mode\":\"Pinned\",\"ok\":true,\"reason\":\"operator\",\"target\":30}\n"
        );
        assert_eq!(text(Reply::Error("no".into())), "{\"error\":\"no\",\"ok\":false}\n");
        // The status with its keys sorted at every level, as when it was built as a JSON value.
        let st = text(Reply::Status(Box::new(example())));
        let sorted = serde_json::to_value(example()).unwrap().to_string();
        assert_eq!(st, format!("{{\"ok\":true,\"status\":{sorted}}}\n"));
        assert!(st.starts_with("{\"ok\":true,\"status\":{\"events\":[{\"mode\":\"Failover\","), "{st}");
    }

    #[test]
    fn the_handover_request_and_reply_keep_their_wire_text() {
        assert_eq!(
            serde_json::to_string(&Request::Handover { to: Some("nodeB".into()) }).unwrap(),
            r#"{"cmd":"handover","to":"nodeB"}"#
        );
        assert_eq!(decode_request(r#"{"cmd":"handover"}"#), Ok(Request::Handover { to: None }));
        let h = HandoverReply { successor: "b/1".into(), epoch: 8, paused_ms: 20, steps: vec!["x".into()] };
        let line = encode_reply(&Reply::Handover(h.clone()));
        assert_eq!(
            line,
            "{\"handover\":{\"epoch\":8,\"paused_ms\":20,\"steps\":[\"x\"],\"successor\":\"b/1\"},\"ok\":true}\n"
        );
        assert_eq!(serde_json::from_str::<Reply>(&line).unwrap(), Reply::Handover(h));
    }

    #[test]
    fn replies_decode_to_their_kind() {
        let reply = |line: &str| serde_json::from_str::<Reply>(line);
        assert_eq!(
            reply(r#"{"ok":true,"target":100,"mode":"Failover","reason":"operator failover"}"#).unwrap(),
            Reply::Weights(WeightsReply {
                target: 100,
                mode: Mode::Failover,
                reason: "operator failover".into()
            })
        );
        let st = encode_reply(&Reply::Status(Box::new(example())));
        assert_eq!(reply(&st).unwrap(), Reply::Status(Box::new(example())));
        assert!(reply(r#"{"ok":true,"status":{"mode":"Normal"}}"#).is_err(), "a status lacking its fields");
        assert_eq!(reply(r#"{"ok":false,"error":"why"}"#).unwrap(), Reply::Error("why".into()));
        assert_eq!(reply(r#"{"ok":false}"#).unwrap(), Reply::Error("request failed".into()));
        assert!(reply(r#"{"ok":true}"#).is_err());
        assert!(reply(r#"{"ok":true,"target":1,"mode":"Sideways","reason":""}"#).is_err());
    }

    /// A standby waiting for the lease answers `status` with what it waits on, and refuses the
    /// rest naming the active router.
    #[tokio::test]
    async fn a_standby_answers_status_with_its_view_and_refuses_the_rest() {
        use crate::lease::{Epoch, Holder, LeaseMode};
        let view = StandbyView::new("v", Holder::new("nodeB", "1"), Duration::from_secs(2));
        let ctl = Control::standing_by(view);
        let Reply::Standby(st) = ctl.handle(&Request::Status).await else { panic!("not a standby reply") };
        assert_eq!((st.volume.as_str(), st.lease.mode, st.lease.epoch), ("v", LeaseMode::Standby, Epoch(0)));
        assert_eq!((st.lease.ttl_ms, st.active.clone()), (2000, None));
        let line = encode_reply(&Reply::Standby(st.clone()));
        assert!(line.starts_with(r#"{"ok":true,"standby":{"active":null,"lease":{"epoch":0,"#), "{line}");
        assert_eq!(serde_json::from_str::<Reply>(&line).unwrap(), Reply::Standby(st));
        let Reply::Error(e) = ctl.handle(&Request::Failover).await else {
            panic!("a standby took a command")
        };
        assert!(e.contains("is a standby for volume v"), "{e}");
    }
}
