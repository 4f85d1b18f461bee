//! The control socket of `mirror serve`: a Unix socket only root may use (mode 0600, and the
//! peer's uid is checked), one JSON request per line, one JSON reply per line.
//!
//! Requests: `{"cmd":"status"}`, `{"cmd":"weights_set","target":N,"for_s":S?}`,
//! `{"cmd":"weights_auto"}`, `{"cmd":"failover"}`, `{"cmd":"failback"}`. They reach the weighting
//! engine as operator overrides.

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

use crate::weights::{driver::Driver, engine::Override};

/// Default path of the control socket.
pub const DEFAULT_SOCKET: &str = "/run/mirror/ctl.sock";

/// What the control socket drives: the weighting loop.
#[derive(Debug)]
pub struct Control {
    pub driver: Arc<Driver>,
}

impl Control {
    pub fn new(driver: Arc<Driver>) -> Arc<Control> {
        Arc::new(Control { driver })
    }

    /// Handles one request.
    pub async fn handle(self: &Arc<Self>, req: &serde_json::Value) -> serde_json::Value {
        let reply = |r: Result<crate::weights::engine::Decision, String>| match r {
            Ok(d) => {
                serde_json::json!({"ok": true, "target": d.target_weight, "mode": format!("{:?}", d.mode), "reason": d.reason})
            }
            Err(e) => serde_json::json!({"ok": false, "error": e}),
        };
        match req["cmd"].as_str() {
            Some("status") => serde_json::json!({"ok": true, "status": self.driver.status_json().await}),
            Some("weights_set") => {
                let Some(t) = req["target"].as_u64().filter(|t| *t <= 100) else {
                    return serde_json::json!({"ok": false, "error": "target must be 0..=100"});
                };
                let for_ = match req["for_s"].as_f64() {
                    Some(s) if s > 0.0 && s.is_finite() => Some(Duration::from_secs_f64(s)),
                    Some(_) => return serde_json::json!({"ok": false, "error": "for_s must be > 0"}),
                    None => None,
                };
                reply(self.driver.pin(t as u8, for_))
            }
            Some("weights_auto") => reply(self.driver.command(Override::Auto)),
            Some("failover") => reply(self.driver.command(Override::ForceFailover)),
            Some("failback") => reply(self.driver.command(Override::ForceFailback)),
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
