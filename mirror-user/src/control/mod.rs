//! The control socket of `mirror serve`: a Unix socket only root may use (mode 0600, and the
//! peer's uid is checked), one JSON request per line, one JSON reply per line.
//!
//! Requests: `{"cmd":"status"}`, `{"cmd":"weights_set","target":N,"for_s":S?}`,
//! `{"cmd":"weights_auto"}`.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};

use crate::volume::router::Router;

/// Default path of the control socket.
pub const DEFAULT_SOCKET: &str = "/run/mirror/ctl.sock";

/// What the control socket changes: the router, and the weight `auto` returns to.
#[derive(Debug)]
pub struct Control {
    pub router: Arc<Router>,
    /// The automatic target weight (until the weighting engine drives it).
    pub auto_target: u8,
    pin_generation: std::sync::atomic::AtomicU64,
}

impl Control {
    pub fn new(router: Arc<Router>, auto_target: u8) -> Arc<Control> {
        Arc::new(Control { router, auto_target, pin_generation: Default::default() })
    }

    /// Handles one request.
    pub async fn handle(self: &Arc<Self>, req: &serde_json::Value) -> serde_json::Value {
        use std::sync::atomic::Ordering;
        match req["cmd"].as_str() {
            Some("status") => serde_json::json!({"ok": true, "status": self.router.status_json()}),
            Some("weights_set") => {
                let Some(t) = req["target"].as_u64().filter(|t| *t <= 100) else {
                    return serde_json::json!({"ok": false, "error": "target must be 0..=100"});
                };
                let generation = self.pin_generation.fetch_add(1, Ordering::SeqCst) + 1;
                self.router.weights.set_target(t as u8);
                tracing::info!(target = t, for_s = ?req["for_s"].as_f64(), "weights pinned by the operator");
                if let Some(secs) = req["for_s"].as_f64().filter(|s| *s > 0.0) {
                    let me = self.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
                        // Only if no newer command replaced this pin.
                        if me.pin_generation.load(Ordering::SeqCst) == generation {
                            me.router.weights.set_target(me.auto_target);
                            tracing::info!(
                                target = me.auto_target,
                                "operator pin expired: automatic weights"
                            );
                        }
                    });
                }
                serde_json::json!({"ok": true, "target": t})
            }
            Some("weights_auto") => {
                self.pin_generation.fetch_add(1, Ordering::SeqCst);
                self.router.weights.set_target(self.auto_target);
                tracing::info!(target = self.auto_target, "operator returned to automatic weights");
                serde_json::json!({"ok": true, "target": self.auto_target})
            }
            _ => serde_json::json!({"ok": false, "error": format!("unknown request {req}")}),
        }
    }
}

/// Serves the control socket at `path` (replacing a stale socket file) until the task is
/// dropped.
pub async fn serve(ctl: Arc<Control>, path: PathBuf) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() && UnixStream::connect(&path).await.is_err() {
        std::fs::remove_file(&path)?;
    }
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    tracing::info!(socket = %path.display(), "control socket ready");
    loop {
        let (stream, _) = listener.accept().await?;
        let uid = stream.peer_cred().map(|c| c.uid()).unwrap_or(u32::MAX);
        let ctl = ctl.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let reply = if uid != 0 {
                    serde_json::json!({"ok": false, "error": "the control socket is for root only"})
                } else {
                    match serde_json::from_str::<serde_json::Value>(&line) {
                        Ok(req) => ctl.handle(&req).await,
                        Err(e) => serde_json::json!({"ok": false, "error": format!("bad request: {e}")}),
                    }
                };
                if w.write_all(format!("{reply}\n").as_bytes()).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// Client side: sends one request, returns the reply.
pub async fn request(path: &Path, req: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
    let stream = UnixStream::connect(path).await.map_err(|e| {
        anyhow::anyhow!("cannot reach {}: {e} (is `mirror serve` running, and are you root?)", path.display())
    })?;
    let (r, mut w) = stream.into_split();
    w.write_all(format!("{req}\n").as_bytes()).await?;
    let mut lines = BufReader::new(r).lines();
    let line = lines.next_line().await?.ok_or_else(|| anyhow::anyhow!("no reply from {}", path.display()))?;
    let reply: serde_json::Value = serde_json::from_str(&line)?;
    if reply["ok"] != true {
        anyhow::bail!("{}", reply["error"].as_str().unwrap_or("request failed"));
    }
    Ok(reply)
}
