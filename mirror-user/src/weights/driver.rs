//! The weighting loop of `mirror serve`: the one place where the decision room meets the data
//! path. Every tick it builds one [`Sample`] from
//! - each node's health, carried by heartbeats on a connection of their own (so a busy data path
//!   does not delay them), or this node's own monitor for a local replica;
//! - what the router saw on each replica's data path: a replica marked failed, new errors, and
//!   latency against the replica's own baseline (the worse of node and data-path score counts);
//!
//! feeds it to the pure [`Engine`], and stores the decision in the router's weights (one atomic,
//! read without locks by every read). Every change of weights is logged with its reason and kept
//! in a short event list for `mirror ctl status` and the demo's timeline.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use super::{
    engine::{Decision, Engine, EngineConfig, Mode, Override, Sample},
    policy::{datapath_latency_us, judge, window_parts, DatapathWindow, NodeJudged, Progress},
    status::{NodeStatus, ReplicaStatus, ServeStatus, WeightEvent},
};
use crate::{
    health::{
        baseline::Baseline,
        monitor::{NodeHealth, NodeReport, PartReport},
        score::falloff,
    },
    replication::{protocol::Message, transport::Transport},
    volume::{
        remote::RemotePool,
        replica::{Replica, ReplicaState},
        router::Router,
    },
};
use mirror_common::weights::{
    ReadWeights, MODE_FAILBACK, MODE_FAILOVER, MODE_NORMAL, MODE_PINNED, MODE_PREDICTIVE,
};

/// Settings of the loop.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    pub engine: EngineConfig,
    /// How often a sample is taken and heartbeats are sent.
    pub tick: Duration,
    /// Data-path latency at this multiple of the replica's baseline starts lowering its score...
    pub datapath_ratio_good: f64,
    /// ...and at this multiple it is 0.
    pub datapath_ratio_bad: f64,
    /// Start pinned at this target weight (`--target-weight`), instead of automatic.
    pub initial_pin: Option<u8>,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            engine: EngineConfig::default(),
            tick: Duration::from_millis(100),
            datapath_ratio_good: 2.0,
            datapath_ratio_bad: 20.0,
            initial_pin: None,
        }
    }
}

/// What the loop knows of one node.
#[derive(Debug, Clone, Default)]
struct NodeView {
    /// Latest heartbeat answer: score and report (`None`: not scored yet, or not understood).
    score: Option<u8>,
    report: Option<NodeReport>,
    /// When the latest heartbeat answer arrived.
    seen: Option<Instant>,
    /// The node could not be reached at the last attempt (refused, reset, closed).
    unreachable: bool,
    /// Data-path score from the router's latency figures, 0..=100.
    datapath: Option<f64>,
    /// The data-path scores of the last ticks, for judging the nodes against each other.
    datapath_recent: DatapathWindow,
    /// Baseline of the data-path latency, microseconds (learned only while healthy, anchored:
    /// see [`crate::health::baseline`]).
    baseline: Baseline,
    /// Errors the router had counted at the previous tick (source only).
    errors_seen: u64,
    /// The replica's reads and writes, as the previous ticks saw them complete.
    reads: Progress,
    writes: Progress,
    /// The parts of the reports of the last [`JUDGE_WINDOW`], oldest first, for judging the
    /// nodes against each other part by part ([`window_parts`]).
    recent: VecDeque<(Instant, Vec<PartReport>)>,
}

/// How far back the nodes' reports are judged against each other: a part must be worse on the
/// source for this long (four of the monitor's intervals) before it counts.
const JUDGE_WINDOW: Duration = Duration::from_secs(1);

impl NodeView {
    /// Adds a report's parts to the window and drops what fell out of it.
    fn remember(&mut self, now: Instant, report: Option<&NodeReport>) {
        if let Some(r) = report {
            self.recent.push_back((now, r.parts.clone()));
        }
        while self.recent.front().is_some_and(|(t, _)| now.duration_since(*t) > JUDGE_WINDOW) {
            self.recent.pop_front();
        }
    }
}

#[derive(Debug)]
struct View {
    nodes: [NodeView; 2],
    last: Decision,
    events: VecDeque<WeightEvent>,
    changes: u64,
}

/// The running loop, shared with the control socket and the metrics endpoint.
/// Receives the weights after every tick (the pinned BPF map, for bpftool).
pub type WeightsSink = Box<dyn FnMut(&ReadWeights) + Send>;

pub struct Driver {
    router: Arc<Router>,
    cfg: DriverConfig,
    epoch: Instant,
    engine: Mutex<Engine>,
    local_health: Arc<NodeHealth>,
    view: Mutex<View>,
    sink: Mutex<Option<WeightsSink>>,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver").field("router", &self.router).field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

/// How many weight changes `status` keeps.
const EVENTS_KEPT: usize = 256;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Driver {
    /// Starts the loop and the heartbeat tasks on the current tokio runtime.
    pub fn start(router: Arc<Router>, cfg: DriverConfig, local_health: Arc<NodeHealth>) -> Arc<Driver> {
        let mut engine = Engine::new(cfg.engine);
        let epoch = Instant::now();
        let first = match cfg.initial_pin {
            Some(t) => engine.command(Duration::ZERO, Override::Pin { target: t, until: None }),
            None => Decision {
                target_weight: engine.weight(),
                mode: engine.mode(),
                changed: false,
                reason: "start".into(),
            },
        };
        router.weights.set_target(first.target_weight);
        let d = Arc::new(Driver {
            router,
            cfg,
            epoch,
            engine: Mutex::new(engine),
            local_health,
            view: Mutex::new(View {
                nodes: Default::default(),
                last: first.clone(),
                events: VecDeque::new(),
                changes: 0,
            }),
            sink: Mutex::new(None),
        });
        d.record(&first);
        for i in 0..2 {
            if let Some(r) = d.router.replicas[i].as_remote() {
                let (addr, volume, secret) =
                    (r.addr().to_string(), r.volume().to_string(), r.secret().to_vec());
                let transport = r.transport().clone();
                tokio::spawn(heartbeats(Arc::downgrade(&d), i, transport, addr, volume, secret));
            }
        }
        let weak = Arc::downgrade(&d);
        let every = d.cfg.tick;
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_tick = Instant::now();
            loop {
                ticker.tick().await;
                let Some(d) = weak.upgrade() else { return };
                d.tick_once(last_tick);
                last_tick = Instant::now();
            }
        });
        d
    }

    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// One sample, one decision. `since` is the previous tick: heartbeats answered after it
    /// count as this tick's.
    fn tick_once(&self, since: Instant) {
        let sample = {
            let mut v = lock(&self.view);
            // Judge nothing before both nodes were heard once (their health is relative to each
            // other), unless one stays silent past twice the heartbeat timeout.
            let heard = |i: usize| self.router.replicas[i].is_local() || v.nodes[i].seen.is_some();
            if !(heard(0) && heard(1)) && self.epoch.elapsed() < 2 * self.cfg.engine.heartbeat_timeout {
                return;
            }
            // How late this tick came: a stall of this process (or of the machine) delays the
            // replicas' answers and the tick alike.
            let late = since.elapsed().saturating_sub(self.cfg.tick);
            for i in 0..2 {
                self.observe_datapath(i, &mut v.nodes[i], late);
            }
            // The source's health counts only when its heartbeat answered since the last tick
            // (the engine times out missing ones); the target's, which the source is judged
            // against, stays valid for the heartbeat timeout.
            let timeout = self.cfg.engine.heartbeat_timeout;
            let health = |i: usize, n: &NodeView| -> Option<f64> {
                let fresh = |t: &Instant| if i == 0 { *t >= since } else { t.elapsed() <= timeout };
                let node = if self.router.replicas[i].is_local() {
                    Some(f64::from(self.local_health.score()))
                } else {
                    n.seen.filter(fresh).and(n.score).map(f64::from)
                };
                node.map(|h| n.datapath.map_or(h, |d| h.min(d)))
            };
            // The reports the nodes' health is composed of, for judging them part by part over
            // the window.
            let local_report = self.local_health.node_report();
            let now = Instant::now();
            for i in 0..2 {
                let report = if self.router.replicas[i].is_local() {
                    local_report.clone()
                } else {
                    v.nodes[i].seen.filter(|t| *t >= since).and(v.nodes[i].report.clone())
                };
                v.nodes[i].remember(now, report.as_ref());
            }
            let src = &self.router.replicas[0];
            let new_errors = v.nodes[0].take_new_errors(src);
            let n0 = &v.nodes[0];
            let (source_health, target_health) = (health(0, n0), health(1, &v.nodes[1]));
            let windows = [0, 1].map(|i| window_parts(v.nodes[i].recent.iter().map(|(_, p)| &p[..])));
            let margin = |i: usize| {
                let r = if self.router.replicas[i].is_local() {
                    local_report.as_ref()
                } else {
                    v.nodes[i].report.as_ref()
                };
                r.map_or(0.0, |r| r.margin)
            };
            let judged = |i: usize, h: f64| NodeJudged {
                score: h,
                best: &windows[i].0,
                worst: &windows[i].1,
                margin: margin(i),
                datapath: v.nodes[i].datapath_recent.mean(),
            };
            let source_relative = source_health.map(|h| {
                let t = target_health.map(|t| judged(1, t));
                judge(&judged(0, h), t.as_ref())
            });
            Sample {
                source_health,
                target_health,
                source_relative,
                source_errors: src.state() == ReplicaState::Failed || n0.unreachable || new_errors,
                source_in_sync: src.state() == ReplicaState::InSync,
            }
        };
        let d = lock(&self.engine).tick(self.now(), sample);
        self.apply(d);
    }

    /// Updates a node's data-path score from the router's latency figures: the mean latency of
    /// its completions, or the age of the oldest request it holds when it completed nothing
    /// since the last tick ([`datapath_latency_us`]; `late`: how late this tick came).
    fn observe_datapath(&self, i: usize, n: &mut NodeView, late: Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        let r = &self.router.replicas[i];
        let s = &r.stats;
        let now = self.now();
        let read = n.reads.observe(now, s.reads.load(Relaxed));
        let wrote = n.writes.observe(now, s.writes.load(Relaxed));
        // Each kind's mean only while that kind completes: the read mean of a replica that
        // gets no reads is the figure of its worst moment (when the reads left it).
        let mean = n
            .reads
            .fresh_mean_us(now, s.read_lat_ewma_us.load(Relaxed))
            .max(n.writes.fresh_mean_us(now, s.write_lat_ewma_us.load(Relaxed)));
        let lat = datapath_latency_us(mean, r.oldest_in_flight(Instant::now()), read || wrote, late);
        if lat == 0 {
            // Nothing completed lately and nothing waits: no evidence either way.
            n.datapath = None;
            n.datapath_recent.push(now, None);
            return;
        }
        // Against a baseline of at least 50 us, learned only while the latency is normal.
        let ratio = n.baseline.observe(now, lat as f64, 50.0);
        n.datapath = Some(falloff(ratio, self.cfg.datapath_ratio_good, self.cfg.datapath_ratio_bad));
        n.datapath_recent.push(now, n.datapath);
    }

    /// Where the weights go after every tick, besides the router.
    pub fn set_sink(&self, sink: WeightsSink) {
        *lock(&self.sink) = Some(sink);
    }

    /// Stores a decision in the router and the sink and, when it changed something, logs it.
    fn apply(&self, d: Decision) {
        self.router.weights.set_target(d.target_weight);
        if d.changed {
            self.record(&d);
        }
        let rw = {
            let mut v = lock(&self.view);
            let health = |i: usize| {
                if self.router.replicas[i].is_local() {
                    u32::from(self.local_health.score())
                } else {
                    v.nodes[i].score.filter(|_| !v.nodes[i].unreachable).map_or(u32::MAX, u32::from)
                }
            };
            let rw = ReadWeights {
                source: 100 - u32::from(d.target_weight),
                target: u32::from(d.target_weight),
                mode: match d.mode {
                    Mode::Normal => MODE_NORMAL,
                    Mode::Predictive => MODE_PREDICTIVE,
                    Mode::Failover => MODE_FAILOVER,
                    Mode::Failback => MODE_FAILBACK,
                    Mode::Pinned => MODE_PINNED,
                },
                source_health: health(0),
                target_health: health(1),
                changes: v.changes,
                ..Default::default()
            };
            v.last = d;
            rw
        };
        if let Some(sink) = lock(&self.sink).as_mut() {
            sink(&rw);
        }
    }

    fn record(&self, d: &Decision) {
        tracing::info!(
            source = 100 - d.target_weight,
            target = d.target_weight,
            mode = ?d.mode,
            reason = %d.reason,
            "weights changed"
        );
        let mut v = lock(&self.view);
        v.changes += 1;
        let ev = WeightEvent {
            mode: d.mode,
            reason: d.reason.clone(),
            t_ms: self.now().as_millis() as u64,
            target: d.target_weight,
        };
        if v.events.len() == EVENTS_KEPT {
            v.events.pop_front();
        }
        v.events.push_back(ev);
    }

    /// Applies an operator command. Forcing a failover onto a target that is not in sync, or a
    /// failback onto a source that is not, is refused (reads would not go there anyway).
    pub fn command(&self, o: Override) -> Result<Decision, String> {
        let [src, tgt] = &self.router.replicas;
        match o {
            Override::ForceFailover if tgt.state() != ReplicaState::InSync => {
                return Err(format!(
                    "the target is {}; failing over to it would leave no replica in sync to read",
                    tgt.state()
                ))
            }
            Override::ForceFailback if src.state() != ReplicaState::InSync => {
                return Err(format!("the source is {}; failback starts once it is resynced", src.state()))
            }
            _ => {}
        }
        let d = lock(&self.engine).command(self.now(), o);
        tracing::info!(?o, "operator command");
        let mut d2 = d.clone();
        d2.changed = true;
        self.apply(d2);
        Ok(d)
    }

    /// Pins the target's weight, optionally for a while (then automatic again).
    pub fn pin(&self, target: u8, for_: Option<Duration>) -> Result<Decision, String> {
        let until = for_.map(|f| self.now() + f);
        self.command(Override::Pin { target, until })
    }

    /// Status for `mirror ctl status` and metrics: the router's, plus mode, reason, per-node
    /// health and signals, sync progress, and the recent weight changes.
    pub async fn status(&self) -> ServeStatus {
        let router = self.router.status();
        let (nodes, last, events, changes) = {
            let v = lock(&self.view);
            (v.nodes.clone(), v.last.clone(), v.events.iter().cloned().collect::<Vec<_>>(), v.changes)
        };
        let mut sync = [None, None];
        for (i, slot) in sync.iter_mut().enumerate() {
            let r = &self.router.replicas[i];
            if r.state() != ReplicaState::InSync {
                // The survivor runs the resync job: its progress is this replica's.
                let survivor = &self.router.replicas[1 - i];
                if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_millis(500), survivor.status()).await {
                    *slot = s.job;
                }
            }
        }
        let router = router.map_replicas(|i, replica| {
            let n = &nodes[i];
            let local = self.router.replicas[i].is_local();
            let (health, report) = if local {
                (Some(self.local_health.score()), self.local_health.node_report())
            } else {
                (n.score, n.report.clone())
            };
            let (signals, telemetry) = report.map(|r| (r.signals, r.telemetry)).unzip();
            let node = NodeStatus {
                health,
                signals,
                telemetry,
                heartbeat_age_ms: if local {
                    Some(0)
                } else {
                    n.seen.map(|t| t.elapsed().as_millis() as u64)
                },
                reachable: local || !n.unreachable,
                datapath_score: n.datapath.map(f64::round),
                sync: sync[i].take(),
            };
            ReplicaStatus { replica, node }
        });
        ServeStatus {
            router,
            mode: last.mode,
            reason: last.reason,
            weight_changes: changes,
            uptime_ms: self.now().as_millis() as u64,
            events,
        }
    }

    /// The engine's current mode.
    pub fn mode(&self) -> Mode {
        lock(&self.view).last.mode
    }
}

impl NodeView {
    /// True when the router counted errors on this replica since the last call.
    fn take_new_errors(&mut self, r: &Replica) -> bool {
        let now = r.stats.errors.load(std::sync::atomic::Ordering::Relaxed);
        now > std::mem::replace(&mut self.errors_seen, now)
    }
}

/// Sends heartbeats to replica `i` every tick on a connection of their own, reconnecting when it
/// breaks, and stores the answers in the driver's view.
async fn heartbeats(
    d: std::sync::Weak<Driver>,
    i: usize,
    transport: Transport,
    addr: String,
    volume: String,
    secret: Vec<u8>,
) {
    let mut pool: Option<RemotePool> = None;
    let mut seq = 0u64;
    loop {
        let Some(drv) = d.upgrade() else { return };
        let every = drv.cfg.tick;
        let timeout = drv.cfg.engine.heartbeat_timeout;
        drop(drv);
        let started = Instant::now();
        if pool.as_ref().is_none_or(super::super::volume::remote::RemotePool::is_broken) {
            pool = tokio::time::timeout(
                timeout,
                RemotePool::connect_over(&transport, &addr, &volume, &secret, 1, None),
            )
            .await
            .ok()
            .and_then(std::result::Result::ok)
            .map(|(p, _)| p);
        }
        let answer = match &pool {
            Some(p) => {
                seq += 1;
                match tokio::time::timeout(timeout, p.call(Message::Heartbeat { seq, health: 0 }, 0)).await {
                    Ok(Ok(Message::HeartbeatAck { health, report, .. })) => Ok(Some((health, report))),
                    Ok(Ok(m)) => {
                        tracing::debug!("unexpected heartbeat reply {m:?}");
                        Ok(None)
                    }
                    Ok(Err(_)) => Err(()),
                    // Slow, not gone: the engine's heartbeat timeout decides.
                    Err(_) => Ok(None),
                }
            }
            None => Err(()),
        };
        let Some(drv) = d.upgrade() else { return };
        {
            let mut v = lock(&drv.view);
            let n = &mut v.nodes[i];
            match answer {
                Ok(Some((health, report))) => {
                    n.score = Some(health);
                    // The protocol edge: decoded once, here.
                    n.report = NodeReport::from_wire(&report);
                    n.seen = Some(Instant::now());
                    n.unreachable = false;
                }
                Ok(None) => {}
                Err(()) => {
                    if !n.unreachable {
                        tracing::warn!(replica = drv.router.replicas[i].role, %addr, "node unreachable (heartbeat)");
                    }
                    n.unreachable = true;
                    pool = None;
                }
            }
        }
        drop(drv);
        tokio::time::sleep(every.saturating_sub(started.elapsed())).await;
    }
}
