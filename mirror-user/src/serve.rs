//! The lifecycle of `mirror serve`: one mirrored volume behind its frontends, from start to a
//! clean stop. [`run`] keeps this order:
//!
//! 1. open the volume (both replicas, their metadata reconciled before any I/O), start the
//!    weighting loop, mirror its weights into a pinned BPF map when it can, bind the metrics
//!    endpoint, start the control socket;
//! 2. install the stop signal's handlers, *then* bind NBD (TCP, and a Unix socket when asked) and
//!    print the readiness lines (`nbd listening on ADDR`, `metrics on ADDR`): a supervisor may send
//!    SIGTERM as soon as it reads them, and that must reach the clean stop below, never the
//!    default action (killed mid-write);
//! 3. start the ublk device when asked (it prints `ublk device /dev/ublkbN`), serve;
//! 4. on the signal: stop and delete the ublk device, stop accepting NBD clients and drain the
//!    connections, flush both replicas and, only when that succeeded (everything acknowledged is
//!    on both), drop the write intent so the next start needs no resync; then stop the embedded
//!    replica servers.

use std::{future::Future, net::SocketAddr, path::PathBuf};

use crate::{
    control::{Control, HandoverAsk, HandoverReply},
    frontend::{
        nbd::{NbdError, NbdListen, NbdOptions, NbdServer},
        ublk::{self, UblkError, UblkOptions},
    },
    lease::{
        handover::{Action, ActiveEvent, ActiveHandover, ActiveState},
        Clock, MonotonicClock,
    },
    metrics::MetricsSource,
    telemetry::bpf,
    volume::lease::StandbyView,
    volume::open::OpenVolume,
    volume::{open::VolumeConfig, BlockDev},
    weights::driver::{Driver, DriverConfig},
    weights::engine::Override,
};

/// Which block-device frontends serve the volume (`mirror serve --frontend`): `nbd` NBD only,
/// `ublk` also /dev/ublkbN (fail when the kernel has no ublk), `auto` also /dev/ublkbN when the
/// kernel has ublk. NBD is always served. (The variants carry no doc comments: clap would list
/// them under the flag, whose help already says it.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Frontend {
    Nbd,
    Ublk,
    Auto,
}

impl Frontend {
    /// What [`ublk::start_for_serve`] is asked: `Some((required, options))` for a device.
    fn ublk(self, options: UblkOptions) -> Option<(bool, UblkOptions)> {
        match self {
            Frontend::Nbd => None,
            Frontend::Ublk => Some((true, options)),
            Frontend::Auto => Some((false, options)),
        }
    }
}

/// Where `mirror serve` is reached: NBD, the control socket, metrics, the weights map, ublk.
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// NBD on TCP (port 0 picks a free one).
    pub nbd: SocketAddr,
    /// NBD on a Unix socket too.
    pub nbd_unix: Option<PathBuf>,
    pub export: String,
    pub ctl_socket: PathBuf,
    pub metrics: Option<SocketAddr>,
    /// Where the pinned weights map goes (`weights-VOLUME`).
    pub pin_dir: PathBuf,
    pub frontend: Frontend,
    /// The ublk device's settings, when [`Self::frontend`] asks for one.
    pub ublk: UblkOptions,
    /// TLS required on the NBD listeners (`--nbd-tls`).
    pub nbd_tls: Option<crate::tls::TlsServer>,
}

/// What stops `mirror serve` from starting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// Opening the volume: a replica, its metadata, or the reconciliation of both.
    #[error(transparent)]
    Open(anyhow::Error),
    #[error("metrics endpoint {addr}")]
    Metrics { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Nbd(#[from] NbdError),
    #[error(transparent)]
    Ublk(#[from] UblkError),
    /// The router was fenced (a newer lease holder exists, or its lease ran out) and stopped.
    #[error("fenced: {0}")]
    Fenced(String),
}

/// Binds the control socket and answers it with `control` from a task of its own; false when
/// it could not be bound (logged: `mirror serve` runs on without it).
async fn serve_control(control: std::sync::Arc<Control>, socket: &std::path::Path) -> bool {
    match crate::control::bind(socket).await {
        Ok(listener) => {
            let socket = socket.to_path_buf();
            tokio::spawn(async move {
                if let Err(e) = crate::control::serve(control, listener).await {
                    tracing::warn!(socket = %socket.display(), "control socket failed: {e}");
                }
            });
            true
        }
        Err(e) => {
            tracing::warn!(socket = %socket.display(), "control socket unavailable: {e}");
            false
        }
    }
}

/// Serves the volume until the future of `stop_signal` resolves, then stops in the order of the
/// module docs. `stop_signal` is called once, right before the frontends bind (the handlers it
/// installs must be in place before any readiness line is printed).
pub async fn run<S, F>(
    volume: VolumeConfig,
    driver: DriverConfig,
    ep: Endpoints,
    stop_signal: S,
) -> Result<(), ServeError>
where
    S: FnOnce() -> F,
    F: Future<Output = ()>,
{
    let Endpoints { nbd, nbd_unix, export, ctl_socket, metrics, pin_dir, frontend, ublk, nbd_tls } = ep;
    // A standby waits for the lease inside `open`, for as long as the active router lives; its
    // control socket answers meanwhile (`ctl status`: what it waits on), and serves the router
    // once it holds the lease.
    let mut volume = volume;
    let standby = volume.lease.as_mut().filter(|l| l.standby).map(|l| {
        let view = StandbyView::new(&volume.name, l.holder.clone(), l.ttl);
        l.standby_view = Some(view.clone());
        (Control::standing_by(view.clone()), MetricsSource::standing_by(view))
    });
    let early = match &standby {
        Some((control, _)) => Some(serve_control(control.clone(), &ctl_socket).await),
        None => None,
    };
    let early_metrics = match (&standby, metrics) {
        (Some((_, source)), Some(addr)) => Some(
            crate::metrics::serve(source.clone(), addr)
                .await
                .map_err(|source| ServeError::Metrics { addr, source })?,
        ),
        _ => None,
    };
    let vol = crate::volume::open::open(&volume).await.map_err(ServeError::Open)?;
    let driver = Driver::start(vol.router.clone(), driver, volume.node_health.clone());
    mirror_weights_in_bpf(&driver, &pin_dir.join(format!("weights-{}", volume.name)));
    let metrics_addr = match (&standby, early_metrics, metrics) {
        // The standby's endpoint, bound before the wait, reports the router from here.
        (Some((_, source)), Some(bound), _) => {
            source.serve_now(driver.clone());
            Some(bound)
        }
        (_, _, Some(addr)) => Some(
            crate::metrics::serve(MetricsSource::serving(driver.clone()), addr)
                .await
                .map_err(|source| ServeError::Metrics { addr, source })?,
        ),
        _ => None,
    };
    let (handover_tx, mut handover_rx) = tokio::sync::mpsc::channel::<HandoverAsk>(1);
    match (standby.map(|(control, _)| control), early) {
        // The standby's socket, bound before the wait, serves the router from here.
        (Some(control), Some(true)) => control.serve_now(driver.clone(), Some(handover_tx)),
        // Bound here, before the readiness lines: `mirror ctl` right after them finds it.
        _ => {
            serve_control(Control::with_handover(driver.clone(), handover_tx), &ctl_socket).await;
        }
    }
    let opts = NbdOptions {
        export_name: export,
        description: Some(format!("mirror volume {}", volume.name)),
        tls: nbd_tls,
        ..Default::default()
    };
    // Before "listening" is printed: a supervisor may send SIGTERM as soon as it reads it.
    let stop = stop_signal();
    let tcp = NbdServer::bind(vol.router.clone(), NbdListen::Tcp(nbd), opts.clone()).await?;
    let unix = match nbd_unix {
        Some(p) => Some(NbdServer::bind(vol.router.clone(), NbdListen::Unix(p), opts).await?),
        None => None,
    };
    crate::announce(format_args!("nbd listening on {}", tcp.local_addr()));
    if let Some(m) = metrics_addr {
        crate::announce(format_args!("metrics on {m}"));
    }
    if let Some(u) = &unix {
        crate::announce(format_args!("nbd listening on {}", u.local_addr()));
    }
    let ublk = ublk::start_for_serve(vol.router.clone(), frontend.ublk(ublk))?;
    tracing::info!(volume = %volume.name, size = vol.router.size(), "serving");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let unix_task = unix.map(|u| tokio::spawn(u.run(stopped(stop_rx.clone()))));
    let tcp_task = tokio::spawn(tcp.run(stopped(stop_rx)));
    tokio::pin!(stop);
    let mut handed = None;
    let fenced = loop {
        tokio::select! {
            () = &mut stop => break None,
            () = vol.router.lease.fenced_wait() => break vol.router.lease.fenced().map(str::to_string),
            Some((to, done)) = handover_rx.recv() => {
                let (outcome, stopping) = hand_over(&vol, &driver, to.as_deref()).await;
                let _ = done.send(outcome.clone());
                if stopping {
                    handed = Some(outcome);
                    break None;
                }
            }
        }
    };
    match (&fenced, &handed) {
        (None, None) => tracing::info!("signal received: draining NBD connections, flushing both replicas"),
        (Some(why), _) => tracing::error!("fenced ({why}): closing the NBD connections and stopping"),
        (None, Some(Ok(h))) => tracing::info!(
            successor = %h.successor, epoch = h.epoch,
            "handed over to {} (epoch {}) after holding writes {} ms: closing the NBD connections (clients reconnect to the new router) and stopping",
            h.successor, h.epoch, h.paused_ms
        ),
        (None, Some(Err(why))) => tracing::error!("{why}: closing the NBD connections and stopping"),
    }
    if let Some(h) = &handed {
        // The writes held at the gate are refused (ESHUTDOWN, never acknowledged): their clients
        // re-issue them to the new router. Before the drain, which waits for them.
        let why = match h {
            Ok(h) => format!("handed over to {} (epoch {})", h.successor, h.epoch),
            Err(e) => e.clone(),
        };
        vol.router.lease.retire(why);
    }
    ublk::stop_for_serve(ublk).await;
    let _ = stop_tx.send(true);
    let _ = tcp_task.await;
    if let Some(t) = unix_task {
        let _ = t.await;
    }
    if let Some(outcome) = handed {
        // The successor owns the replicas now (the write intent was dropped after the flush).
        for s in &vol.local_servers {
            s.shutdown();
        }
        return outcome.map(|_| ()).map_err(ServeError::Fenced);
    }
    if let Some(why) = fenced {
        // Nothing more is written: the new holder owns the replicas (and their write intent).
        for s in &vol.local_servers {
            s.shutdown();
        }
        return Err(ServeError::Fenced(why));
    }
    match vol.router.flush().await {
        // Everything written is on both: the write intent goes (the next start needs no resync).
        Ok(()) => {
            vol.router.close_intents().await;
            if let Some(k) = &vol.lease {
                k.release().await;
            }
        }
        Err(e) => tracing::error!("final flush failed: {e}"),
    }
    for s in &vol.local_servers {
        s.shutdown();
    }
    Ok(())
}

/// Drives the active side of a planned handover (`lease::handover`): shift reads to the other
/// node, quiesce writes, flush both replicas (and drop the write intent: the successor starts in
/// sync), hand the lease to the standby. Returns the outcome and whether serving must stop
/// (the lease left, or its fate could not be settled); a refusal before the lease left resumes
/// service (`false`).
async fn hand_over(
    vol: &OpenVolume,
    driver: &Driver,
    to: Option<&str>,
) -> (Result<HandoverReply, String>, bool) {
    let Some(keeper) = &vol.lease else {
        return (Err("this router holds no lease (--lease-store none): nothing to hand over".into()), false);
    };
    let successor = match keeper.successor(to).await {
        Ok(s) => s,
        Err(e) => return (Err(format!("handover refused: {e}")), false),
    };
    let clock = MonotonicClock::new();
    let (mut m, mut act) = ActiveHandover::start(clock.now(), keeper.held().holder.clone(), successor);
    let mut steps = vec![m.reason().to_string()];
    tracing::info!("handover: {}", m.reason());
    loop {
        let ev = match act {
            Action::ShiftReads => match driver.pin(100, None) {
                Ok(d) => {
                    steps.push(format!("reads shifted to the target: {}", d.reason));
                    ActiveEvent::ReadsShifted
                }
                Err(e) => {
                    return (
                        Err(format!("handover refused: reads cannot move to the other node: {e}")),
                        false,
                    )
                }
            },
            Action::Quiesce => {
                vol.router.lease.quiesce().await;
                steps.push("writes quiesced".into());
                ActiveEvent::Quiesced
            }
            Action::Flush => {
                let r = vol.router.flush().await.map_err(|e| e.to_string());
                if r.is_ok() {
                    vol.router.close_intents().await;
                    steps.push("both replicas flushed".into());
                }
                ActiveEvent::Flushed(r)
            }
            Action::HandLease { ref to } => ActiveEvent::Handed(keeper.hand_over(to).await),
            Action::ReadLease => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                ActiveEvent::LeaseRead(keeper.current().await)
            }
            Action::Stop { reason } => {
                tracing::info!("handover: {reason}");
                steps.push(reason.clone());
                let paused_ms = m.paused_for(clock.now()).as_millis() as u64;
                return match m.state() {
                    ActiveState::Done { epoch } if epoch.0 > 0 => (
                        Ok(HandoverReply { successor: to_string_of(&m), epoch: epoch.0, paused_ms, steps }),
                        true,
                    ),
                    _ => (Err(reason), true),
                };
            }
            Action::Resume { reason } => {
                vol.router.lease.resume();
                let _ = driver.command(Override::Auto);
                tracing::warn!("handover: {reason}");
                return (Err(reason), false);
            }
            other => return (Err(format!("handover: unexpected step {other:?}")), true),
        };
        act = m.on(clock.now(), ev);
        tracing::info!("handover: {:?}: {}", m.state(), m.reason());
    }
}

/// The successor a handover names.
fn to_string_of(m: &ActiveHandover) -> String {
    m.to().to_string()
}

/// Mirrors the read weights after every tick into a BPF map pinned at `pin` (for bpftool); only
/// logs when that is not possible here.
fn mirror_weights_in_bpf(driver: &Driver, pin: &std::path::Path) {
    match bpf::WeightsMap::create(pin) {
        Ok(mut m) => {
            tracing::info!("read weights mirrored in BPF: bpftool map dump pinned {}", pin.display());
            let mut warned = false;
            driver.set_sink(Box::new(move |w| {
                if let Err(e) = m.set(w) {
                    if !std::mem::replace(&mut warned, true) {
                        tracing::warn!("updating the pinned weights map failed: {e}");
                    }
                }
            }));
        }
        Err(e) => tracing::info!("read weights not mirrored into a pinned BPF map: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::Frontend;
    use crate::frontend::ublk::UblkOptions;

    #[test]
    fn the_frontend_decides_whether_ublk_is_required() {
        let o = UblkOptions::default();
        assert!(Frontend::Nbd.ublk(o.clone()).is_none());
        assert_eq!(Frontend::Ublk.ublk(o.clone()).map(|(r, _)| r), Some(true));
        assert_eq!(Frontend::Auto.ublk(o).map(|(r, _)| r), Some(false));
    }
}
