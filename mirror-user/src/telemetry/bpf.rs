//! Loading, attaching and pinning the embedded eBPF object, and reading its maps (live or pinned).

use std::{
    borrow::Borrow,
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Map, MapData, PerCpuArray, PerCpuHashMap},
    programs::{tp_btf::BtfTracePointLinkId, trace_point::TracePointLinkId, BtfTracePoint, TracePoint},
    Btf, Ebpf, EbpfLoader,
};
use mirror_common::{
    blk::{
        BlkRqOffsets, BlkStatsSlot, BLK_SAMPLE_MAX_STRIDE, GLOBAL_BLK_OFFSETS, GLOBAL_BLK_RQ_OFFSETS,
        MAP_BLK_START, MAP_BLK_STATS,
    },
    hist::LatHist,
    mm::{MAP_RECLAIM_START, MAP_RECLAIM_STATS},
    net::{NetTpOffsets, TcpPeerKey, TcpRetrans, GLOBAL_NET_OFFSETS, MAP_TCP_RETRANS},
    sched::{RunqSampling, SchedOffsets, GLOBAL_SCHED_OFFSETS, MAP_RUNQ_HIST, MAP_RUNQ_SAMPLING},
};

use super::{blk::BlkSnapshot, btf, collector::NodeSnapshot, diskstats, procfs, tracefs, TelemetryError};

/// The object built by `cargo xtask build` (empty when the build had none).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mirror-ebpf.o"));

/// True when this binary embeds the eBPF programs.
pub fn has_object() -> bool {
    !OBJECT.is_empty()
}

/// A group of programs measuring one signal; attached together or not at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Block latency, BTF path (one program at completion, keyed by the request).
    BlkRq,
    /// Block latency, classic tracepoints (issue and completion, keyed by device and sector).
    Blk,
    /// Run-queue latency from the scheduler's own `sched_info` stamps (one program per switch).
    Sched,
    /// Run-queue latency, fallback: the programs stamp wakeups themselves (runqlat).
    SchedStamp,
    Reclaim,
    Tcp,
}

impl Signal {
    pub fn name(self) -> &'static str {
        match self {
            Signal::BlkRq => "block latency (BTF, per request)",
            Signal::Blk => "block latency (tracepoints, per device and sector)",
            Signal::Sched => "run-queue latency (sched_info)",
            Signal::SchedStamp => "run-queue latency (wakeup stamps)",
            Signal::Reclaim => "direct reclaim",
            Signal::Tcp => "tcp retransmits",
        }
    }
}

/// How a program attaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A classic tracepoint (`category:name`), record offsets parsed from tracefs.
    TracePoint,
    /// A BTF tracepoint (`tp_btf/name`): raw arguments, no trace record; needs kernel BTF.
    BtfTracePoint,
}

/// A program of the object on one tracepoint: (signal, kind, program name, category, tracepoint).
pub type Tracepoint = (Signal, Kind, &'static str, &'static str, &'static str);

/// Programs in the object and where they attach.
pub const TRACEPOINTS: &[Tracepoint] = &[
    (Signal::BlkRq, Kind::BtfTracePoint, "blk_rq_done", "block", "block_rq_complete"),
    (Signal::Blk, Kind::TracePoint, "blk_rq_issue", "block", "block_rq_issue"),
    (Signal::Blk, Kind::TracePoint, "blk_rq_complete", "block", "block_rq_complete"),
    (Signal::Sched, Kind::BtfTracePoint, "sched_switch_info", "sched", "sched_switch"),
    (Signal::SchedStamp, Kind::BtfTracePoint, "sched_wakeup", "sched", "sched_wakeup"),
    (Signal::SchedStamp, Kind::BtfTracePoint, "sched_wakeup_new", "sched", "sched_wakeup_new"),
    (Signal::SchedStamp, Kind::BtfTracePoint, "sched_switch", "sched", "sched_switch"),
    (Signal::Reclaim, Kind::TracePoint, "reclaim_begin", "vmscan", "mm_vmscan_direct_reclaim_begin"),
    (Signal::Reclaim, Kind::TracePoint, "reclaim_end", "vmscan", "mm_vmscan_direct_reclaim_end"),
    // The same programs on memory-cgroup reclaim: a task over its cgroup's limit stalls the same
    // way (the usual case in containers).
    (Signal::Reclaim, Kind::TracePoint, "reclaim_begin", "vmscan", "mm_vmscan_memcg_reclaim_begin"),
    (Signal::Reclaim, Kind::TracePoint, "reclaim_end", "vmscan", "mm_vmscan_memcg_reclaim_end"),
    (Signal::Tcp, Kind::TracePoint, "tcp_retransmit_skb", "tcp", "tcp_retransmit_skb"),
];

/// Every map the daemon pins, by name (also the pin file name).
pub const PINNED_MAPS: &[&str] = &[
    MAP_BLK_START,
    MAP_BLK_STATS,
    MAP_RUNQ_HIST,
    MAP_RUNQ_SAMPLING,
    MAP_RECLAIM_START,
    MAP_RECLAIM_STATS,
    MAP_TCP_RETRANS,
];

/// The attached programs. Dropping it detaches them and removes the pins.
pub struct Probe {
    ebpf: Ebpf,
    pins: Pins,
    signals: Vec<Signal>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// What is attached, each with its link to detach it again.
    links: Vec<(&'static Tracepoint, Link)>,
    /// What [`Probe::pause`] detached, for [`Probe::resume`] to attach again.
    paused: Vec<&'static Tracepoint>,
    /// Between [`Probe::pause`] and [`Probe::resume`].
    is_paused: bool,
    /// The run-queue programs the duty cycle detached ([`Probe::set_runq_window`]).
    runq_off: Vec<&'static Tracepoint>,
    /// The duty cycle as published in the `runq_sampling` map.
    runq: RunqSampling,
}

/// One attachment of a loaded program.
#[derive(Debug)]
enum Link {
    Tp(TracePointLinkId),
    Btf(BtfTracePointLinkId),
}

impl std::fmt::Debug for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probe")
            .field("pins", &self.pins)
            .field("signals", &self.signals)
            .field("logger", &self.logger.is_some())
            .field("links", &self.links.len())
            .field("paused", &self.paused.len())
            .field("runq", &self.runq)
            .finish()
    }
}

/// How the programs measure (see [`Probe::attach`]).
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    /// Read the clock for every block request, also at high rates, instead of a weighted sample
    /// (`mirror_common::blk`): exact latency sums, maxima and histograms at a higher cost.
    pub exact_block_latency: bool,
    /// Share of each [`Self::runq_period`] the run-queue program (`sched_switch_info`, which
    /// fires on every context switch) is attached, percent, 1..=100 (see
    /// `mirror_common::sched`). The wakeup-stamping fallback is always attached: it must see
    /// the wakeups before the switches it measures.
    pub runq_duty_pct: u32,
    /// Length of the run-queue duty cycle.
    pub runq_period: std::time::Duration,
}

impl Default for ProbeOptions {
    /// Every request timed at low rates, a sample at high rates; the run queue always measured.
    fn default() -> Self {
        Self {
            exact_block_latency: false,
            runq_duty_pct: 100,
            runq_period: std::time::Duration::from_millis(250),
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds (`bpf_ktime_get_ns`'s clock, the same in every process).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Removes the pinned maps when dropped, also when attaching fails half way.
#[derive(Debug)]
struct Pins(Vec<PathBuf>);

impl Drop for Pins {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = fs::remove_file(p);
        }
    }
}

/// A program's own cost from the kernel's BPF statistics (needs stats enabled, see
/// [`enable_run_time_stats`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramStats {
    pub name: &'static str,
    pub run_time_ns: u64,
    pub run_cnt: u64,
    /// Runs the kernel skipped since load because a BPF program was already running on that
    /// CPU (a completion interrupting another run): events not counted (always kept, whether
    /// run-time statistics are on or not).
    pub recursion_misses: u64,
}

/// `bpf_prog_info.recursion_misses` of the program behind `fd` (aya's `ProgramInfo` does not
/// expose it).
fn recursion_misses(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<u64> {
    use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_prog_info};
    use std::os::fd::AsRawFd;
    // SAFETY: both are C structs (a union) of integers: all zeroes is a valid value of each.
    let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.info.bpf_fd = fd.as_raw_fd() as u32;
    attr.info.info_len = std::mem::size_of::<bpf_prog_info>() as u32;
    attr.info.info = (&raw mut info) as u64;
    // SAFETY: BPF_OBJ_GET_INFO_BY_FD reads `attr` (its size passed) and writes at most
    // `info_len` bytes to `info`; both live on this stack frame for the whole call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_OBJ_GET_INFO_BY_FD as libc::c_long,
            &raw mut attr,
            std::mem::size_of::<bpf_attr>(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(info.recursion_misses)
}

/// Turns on the kernel's per-program run-time accounting for as long as the returned fd lives.
pub fn enable_run_time_stats() -> Result<std::os::fd::OwnedFd, TelemetryError> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map_err(|e| TelemetryError::io("BPF_ENABLE_STATS", std::io::Error::other(e.to_string())))
}

fn map_err(name: &str) -> impl Fn(aya::maps::MapError) -> TelemetryError + '_ {
    move |source| TelemetryError::Map { name: name.into(), source }
}

impl Probe {
    /// Loads the object, attaches the tracepoints, then pins the maps under `pin_dir`
    /// (replacing stale pins of a previous run). Block latency is required; the other signals are attached
    /// when their tracepoints exist here, each missing one is said once. Needs root; mounts
    /// tracefs and bpffs when they are missing.
    pub fn attach(pin_dir: &Path, opts: &ProbeOptions) -> Result<Self, TelemetryError> {
        object_and_root()?;
        let root = tracefs::ensure_tracefs()?;
        tracefs::ensure_bpffs()?;
        let blk = tracefs::blk_offsets(&root)?;
        // MIRROR_BLK_CLASSIC=1 forces the fallback path (tests, comparisons).
        let rq = if std::env::var("MIRROR_BLK_CLASSIC").is_ok_and(|v| v == "1") {
            BlkRqOffsets::default()
        } else {
            let mut rq = blk_rq_offsets();
            if opts.exact_block_latency {
                rq.max_stride = 1;
            }
            rq
        };
        let mut signals = vec![if rq.valid != 0 { Signal::BlkRq } else { Signal::Blk }];
        let btf = match Btf::from_sys_fs() {
            Ok(b) => Some(b),
            Err(e) => {
                tracing::warn!("run-queue latency not measured: no kernel BTF ({e})");
                None
            }
        };
        let mut sched = if btf.is_some() { sched_offsets() } else { SchedOffsets::default() };
        // MIRROR_RUNQ_STAMP=1 forces the stamping fallback (tests, comparisons).
        if std::env::var("MIRROR_RUNQ_STAMP").is_ok_and(|v| v == "1") {
            sched.info_valid = 0;
        }
        if sched.info_valid != 0 {
            signals.push(Signal::Sched);
        } else if sched.valid != 0 {
            signals.push(Signal::SchedStamp);
        } else if btf.is_some() {
            tracing::warn!("run-queue latency not measured: kernel BTF lacks task_struct.pid");
        }
        let reclaim_tps = TRACEPOINTS
            .iter()
            .filter(|t| t.0 == Signal::Reclaim)
            .all(|t| tracefs::has_tracepoint(&root, t.3, t.4));
        if reclaim_tps {
            signals.push(Signal::Reclaim);
        } else {
            tracing::warn!("direct-reclaim stalls not measured: no vmscan tracepoints here");
        }
        let net = match tracefs::net_offsets(&root) {
            Ok(o) => {
                signals.push(Signal::Tcp);
                o
            }
            Err(e) => {
                tracing::warn!("tcp retransmits not measured: {e}");
                NetTpOffsets::default()
            }
        };

        fs::create_dir_all(pin_dir)
            .map_err(|e| TelemetryError::io(format!("create {}", pin_dir.display()), e))?;
        let pins: Vec<PathBuf> = PINNED_MAPS.iter().map(|m| pin_dir.join(m)).collect();
        for p in &pins {
            match fs::remove_file(p) {
                Ok(()) => tracing::info!(pin = %p.display(), "removed stale pin of a previous run"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(TelemetryError::io(format!("remove {}", p.display()), e)),
            }
        }

        let mut loader = EbpfLoader::new();
        loader
            .override_global(GLOBAL_BLK_OFFSETS, &blk, true)
            .override_global(GLOBAL_BLK_RQ_OFFSETS, &rq, true)
            .override_global(GLOBAL_SCHED_OFFSETS, &sched, true)
            .override_global(GLOBAL_NET_OFFSETS, &net, true);
        let pins = Pins(pins);
        let mut ebpf = loader.load(OBJECT)?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!("eBPF-side diagnostics (aya-log) unavailable: {e}");
                None
            }
        };
        // Block latency is required; another signal whose programs the kernel refuses (an old
        // kernel's tracepoint arguments, say) is dropped with one warning, the rest stays.
        let mut links = Vec::new();
        for signal in signals.clone() {
            let attached = attach_signal(&mut ebpf, signal, btf.as_ref(), &mut links);
            if let Err(e) = attached {
                if signal == Signal::Blk {
                    return Err(e);
                }
                unload_signal(&mut ebpf, signal);
                signals.retain(|s| *s != signal);
                if signal == Signal::BlkRq {
                    tracing::warn!("{e}: block latency from the classic tracepoints instead");
                    attach_signal(&mut ebpf, Signal::Blk, btf.as_ref(), &mut links)?;
                    signals.insert(0, Signal::Blk);
                } else if signal == Signal::Sched && sched.valid != 0 {
                    tracing::warn!("{e}: run-queue latency from wakeup stamps instead");
                    match attach_signal(&mut ebpf, Signal::SchedStamp, btf.as_ref(), &mut links) {
                        Ok(()) => signals.push(Signal::SchedStamp),
                        Err(e) => {
                            unload_signal(&mut ebpf, Signal::SchedStamp);
                            tracing::warn!("{} not measured: {e}", Signal::SchedStamp.name());
                        }
                    }
                } else {
                    tracing::warn!("{} not measured: {e}", signal.name());
                }
            }
        }
        // Pinned only now, so a pin's presence means the programs are attached (tests and tools
        // wait for it).
        for (name, pin) in PINNED_MAPS.iter().zip(&pins.0) {
            let map = ebpf.map(name).ok_or(TelemetryError::MissingMap(name))?;
            map.pin(pin).map_err(|e| {
                TelemetryError::io(
                    format!("pin map {name} at {}", pin.display()),
                    std::io::Error::other(e.to_string()),
                )
            })?;
        }
        let names: Vec<&str> = signals.iter().map(|s| s.name()).collect();
        tracing::info!(pin_dir = %pin_dir.display(), "eBPF programs attached: {}", names.join(", "));
        // Attachments of a signal that was dropped went with its programs' unload.
        links.retain(|(t, _)| signals.contains(&t.0));
        let cycled = signals.contains(&Signal::Sched);
        let runq = RunqSampling {
            on_ns: 0,
            on_since_ns: 0,
            duty_pct: if cycled { opts.runq_duty_pct.clamp(1, 100) } else { 100 },
            period_ms: opts.runq_period.as_millis().clamp(1, u128::from(u32::MAX)) as u32,
        };
        let mut probe = Probe {
            ebpf,
            pins,
            signals,
            logger,
            links,
            paused: Vec::new(),
            is_paused: false,
            runq_off: Vec::new(),
            runq,
        };
        probe.publish_runq()?;
        Ok(probe)
    }

    /// The run-queue duty cycle, `(attached, period)`, when the run-queue program is attached
    /// for a part of each period only (`None`: always attached, or not at all).
    pub fn runq_cycle(&self) -> Option<(std::time::Duration, std::time::Duration)> {
        let r = &self.runq;
        (self.signals.contains(&Signal::Sched) && r.duty_pct < 100).then(|| {
            let period = std::time::Duration::from_millis(u64::from(r.period_ms));
            (period * r.duty_pct / 100, period)
        })
    }

    /// Opens (attaches the run-queue program) or closes (detaches it) a window of the duty
    /// cycle, and publishes the attached time in `runq_sampling`. While paused it only
    /// remembers a close, for [`Probe::resume`] to leave the program detached.
    pub fn set_runq_window(&mut self, open: bool) -> Result<(), TelemetryError> {
        if open {
            if self.is_paused {
                self.paused.append(&mut self.runq_off);
                return Ok(());
            }
            while let Some(t) = self.runq_off.pop() {
                match link(&mut self.ebpf, t) {
                    Ok(l) => self.links.push((t, l)),
                    Err(e) => {
                        self.runq_off.push(t);
                        self.publish_runq()?;
                        return Err(e);
                    }
                }
            }
        } else {
            let (off, keep): (Vec<_>, Vec<_>) =
                std::mem::take(&mut self.paused).into_iter().partition(|t| t.0 == Signal::Sched);
            self.paused = keep;
            self.runq_off.extend(off);
            let mut i = 0;
            while i < self.links.len() {
                if self.links[i].0 .0 == Signal::Sched {
                    let (t, l) = self.links.swap_remove(i);
                    self.runq_off.push(t);
                    unlink(&mut self.ebpf, t, l)?;
                } else {
                    i += 1;
                }
            }
        }
        self.publish_runq()
    }

    /// Writes the run-queue programs' attached time to `runq_sampling`: a window opens when
    /// one is attached and closes when none is.
    fn publish_runq(&mut self) -> Result<(), TelemetryError> {
        let attached = self.links.iter().any(|(t, _)| matches!(t.0, Signal::Sched | Signal::SchedStamp));
        let now = monotonic_ns();
        let r = &mut self.runq;
        match (attached, r.on_since_ns != 0) {
            (true, false) => r.on_since_ns = now.max(1),
            (false, true) => {
                r.on_ns += now.saturating_sub(r.on_since_ns);
                r.on_since_ns = 0;
            }
            _ => {}
        }
        let v = *r;
        let map =
            self.ebpf.map_mut(MAP_RUNQ_SAMPLING).ok_or(TelemetryError::MissingMap(MAP_RUNQ_SAMPLING))?;
        let mut arr: aya::maps::Array<&mut MapData, RunqSampling> =
            aya::maps::Array::try_from(map).map_err(map_err(MAP_RUNQ_SAMPLING))?;
        arr.set(0, v, 0).map_err(map_err(MAP_RUNQ_SAMPLING))
    }

    /// Detaches every program, keeping them loaded and the maps (and their pins) as they are;
    /// [`Probe::resume`] attaches them again. Lets `cargo xtask bench ebpf` alternate with and
    /// without the programs within one fio run. A no-op when already paused.
    pub fn pause(&mut self) -> Result<(), TelemetryError> {
        self.is_paused = true;
        while let Some((t, link)) = self.links.pop() {
            self.paused.push(t);
            unlink(&mut self.ebpf, t, link)?;
        }
        self.publish_runq()
    }

    /// Attaches the programs [`Probe::pause`] detached. A no-op when not paused.
    pub fn resume(&mut self) -> Result<(), TelemetryError> {
        while let Some(t) = self.paused.pop() {
            match link(&mut self.ebpf, t) {
                Ok(l) => self.links.push((t, l)),
                Err(e) => {
                    self.paused.push(t);
                    self.publish_runq()?;
                    return Err(e);
                }
            }
        }
        self.is_paused = false;
        self.publish_runq()
    }

    /// Signals whose programs are attached.
    pub fn signals(&self) -> &[Signal] {
        &self.signals
    }

    /// Cumulative figures of every attached signal (plus PSI and the node's TCP counter).
    pub fn snapshot(&self) -> Result<NodeSnapshot, TelemetryError> {
        read_maps(
            &|name| {
                let m = self.ebpf.map(name).ok_or(TelemetryError::MissingMap(name))?;
                Ok(MapRef::Borrowed(m))
            },
            &self.signals,
        )
    }

    /// Forwards the programs' aya-log records to the daemon's log.
    pub fn flush_logs(&mut self) {
        if let Some(l) = &mut self.logger {
            l.flush();
        }
    }

    /// The kernel's run-time statistics of each attached program, and its recursion misses.
    pub fn program_stats(&self) -> Vec<ProgramStats> {
        let mut seen = Vec::new();
        TRACEPOINTS
            .iter()
            .filter(|t| self.signals.contains(&t.0))
            .filter(|t| {
                // A program attached to several tracepoints is listed once.
                let first = !seen.contains(&t.2);
                seen.push(t.2);
                first
            })
            .filter_map(|&(_, kind, name, _, _)| {
                use std::os::fd::AsFd;
                let prog = self.ebpf.program(name)?;
                let (info, misses) = match kind {
                    Kind::TracePoint => {
                        let p = <&TracePoint>::try_from(prog).ok()?;
                        (p.info().ok()?, recursion_misses(p.fd().ok()?.as_fd()).ok()?)
                    }
                    Kind::BtfTracePoint => {
                        let p = <&BtfTracePoint>::try_from(prog).ok()?;
                        (p.info().ok()?, recursion_misses(p.fd().ok()?.as_fd()).ok()?)
                    }
                };
                Some(ProgramStats {
                    name,
                    run_time_ns: info.run_time().as_nanos() as u64,
                    run_cnt: info.run_count(),
                    recursion_misses: misses,
                })
            })
            .collect()
    }

    /// Where the maps are pinned.
    pub fn pins(&self) -> &[PathBuf] {
        &self.pins.0
    }
}

/// A loaded program of the object as its concrete type.
fn prog_mut<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, TelemetryError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(TelemetryError::MissingProgram(name))?;
    prog.try_into().map_err(|source| TelemetryError::Program { name, source })
}

/// Loads (once) and attaches every program of `signal`, recording the attachments in `links`.
/// A BTF program without kernel BTF is neither loaded nor attached.
fn attach_signal(
    ebpf: &mut Ebpf,
    signal: Signal,
    btf: Option<&Btf>,
    links: &mut Vec<(&'static Tracepoint, Link)>,
) -> Result<(), TelemetryError> {
    for t in TRACEPOINTS.iter().filter(|t| t.0 == signal) {
        if load(ebpf, t, btf)? {
            links.push((t, link(ebpf, t)?));
        }
    }
    Ok(())
}

/// Detaches and unloads the programs of `signal` that were loaded (best effort).
fn unload_signal(ebpf: &mut Ebpf, signal: Signal) {
    for &(_, kind, name, _, _) in TRACEPOINTS.iter().filter(|t| t.0 == signal) {
        unload(ebpf, kind, name);
    }
}

/// Loads the program of `t` unless it is loaded already (a program attached to several
/// tracepoints is loaded once); false for a BTF program when the kernel has no BTF.
fn load(
    ebpf: &mut Ebpf,
    &(_, kind, name, _, tp): &Tracepoint,
    btf: Option<&Btf>,
) -> Result<bool, TelemetryError> {
    let err = |source| TelemetryError::Program { name, source };
    match (kind, btf) {
        (Kind::TracePoint, _) => match prog_mut::<TracePoint>(ebpf, name)?.load() {
            Ok(()) | Err(aya::programs::ProgramError::AlreadyLoaded) => Ok(true),
            Err(e) => Err(err(e)),
        },
        (Kind::BtfTracePoint, Some(btf)) => {
            prog_mut::<BtfTracePoint>(ebpf, name)?.load(tp, btf).map_err(err)?;
            Ok(true)
        }
        (Kind::BtfTracePoint, None) => Ok(false),
    }
}

/// Attaches the (loaded) program of `t` to its tracepoint.
fn link(ebpf: &mut Ebpf, &(_, kind, name, category, tp): &Tracepoint) -> Result<Link, TelemetryError> {
    let err = |source| TelemetryError::Program { name, source };
    Ok(match kind {
        Kind::TracePoint => Link::Tp(prog_mut::<TracePoint>(ebpf, name)?.attach(category, tp).map_err(err)?),
        Kind::BtfTracePoint => Link::Btf(prog_mut::<BtfTracePoint>(ebpf, name)?.attach().map_err(err)?),
    })
}

/// Detaches one attachment of the program of `t`.
fn unlink(ebpf: &mut Ebpf, &(_, _, name, _, _): &Tracepoint, l: Link) -> Result<(), TelemetryError> {
    let r = match l {
        Link::Tp(id) => prog_mut::<TracePoint>(ebpf, name)?.detach(id),
        Link::Btf(id) => prog_mut::<BtfTracePoint>(ebpf, name)?.detach(id),
    };
    r.map_err(|source| TelemetryError::Program { name, source })
}

/// Detaches and unloads a program if it was loaded (best effort).
fn unload(ebpf: &mut Ebpf, kind: Kind, name: &str) {
    let Some(prog) = ebpf.program_mut(name) else {
        return;
    };
    let _ = match kind {
        Kind::TracePoint => <&mut TracePoint>::try_from(prog).map(aya::programs::TracePoint::unload),
        Kind::BtfTracePoint => <&mut BtfTracePoint>::try_from(prog).map(aya::programs::BtfTracePoint::unload),
    };
}

/// `struct request` member offsets from the kernel's BTF for the `blk_rq_done` program, or
/// `valid == 0` when a member is missing (the classic tracepoints are used then).
pub fn blk_rq_offsets() -> BlkRqOffsets {
    let Some(b) = btf::Btf::from_sys_fs() else {
        return BlkRqOffsets::default();
    };
    // The program loads each member directly (the verifier checks it against the same BTF), so
    // only the size matters.
    let get = |s: &str, m: &str, size: u32| b.member(s, m).filter(|f| f.size == size);
    let (Some(q), Some(part), Some(bd_dev), Some(flags), Some(start), Some(disk), Some(major), Some(minor)) = (
        get("request", "q", 8),
        get("request", "part", 8),
        get("block_device", "bd_dev", 4),
        get("request", "cmd_flags", 4),
        get("request", "start_time_ns", 8),
        get("request_queue", "disk", 8),
        get("gendisk", "major", 4),
        get("gendisk", "first_minor", 4),
    ) else {
        tracing::info!("kernel BTF lacks a struct request member the BTF block program reads");
        return BlkRqOffsets::default();
    };
    BlkRqOffsets {
        rq_q: q.offset,
        rq_part: part.offset,
        bdev_dev: bd_dev.offset,
        rq_cmd_flags: flags.offset,
        rq_start_time_ns: start.offset,
        q_disk: disk.offset,
        disk_major: major.offset,
        disk_first_minor: minor.offset,
        valid: 1,
        max_stride: BLK_SAMPLE_MAX_STRIDE,
    }
}

/// The member offsets of the run-queue programs from the kernel's BTF (see [`SchedOffsets`]):
/// `info_valid == 0` when the scheduler's `sched_info` stamps or the path to the run-queue clock
/// are missing (no `CONFIG_SCHED_INFO` or `CONFIG_FAIR_GROUP_SCHED`), `valid == 0` when even
/// `task_struct.pid` is.
pub fn sched_offsets() -> SchedOffsets {
    let Some(b) = btf::Btf::from_sys_fs() else {
        return SchedOffsets::default();
    };
    let get =
        |s: &str, m: &str, size: Option<u32>| b.member(s, m).filter(|f| size.is_none_or(|n| f.size == n));
    let mut o = SchedOffsets::default();
    if let Some(pid) = get("task_struct", "pid", Some(4)) {
        o.task_pid = pid.offset;
        o.valid = 1;
    }
    if let (Some(info), Some(queued), Some(se), Some(cfs_rq), Some(rq), Some(clock)) = (
        get("task_struct", "sched_info", None),
        get("sched_info", "last_queued", Some(8)),
        get("task_struct", "se", None),
        get("sched_entity", "cfs_rq", Some(8)),
        get("cfs_rq", "rq", Some(8)),
        get("rq", "clock", Some(8)),
    ) {
        o.task_last_queued = info.offset + queued.offset;
        o.task_cfs_rq = se.offset + cfs_rq.offset;
        o.cfs_rq_rq = rq.offset;
        o.rq_clock = clock.offset;
        o.info_valid = 1;
    } else {
        tracing::info!("kernel BTF lacks a member the sched_info run-queue program reads");
    }
    o
}

/// A map of the live object, or one opened from its pin.
enum MapRef<'a> {
    Borrowed(&'a Map),
    Owned(Map),
}

impl MapRef<'_> {
    fn map(&self) -> &Map {
        match self {
            MapRef::Borrowed(m) => m,
            MapRef::Owned(m) => m,
        }
    }
}

type Opener<'a> = dyn Fn(&'static str) -> Result<MapRef<'a>, TelemetryError> + 'a;

fn read_maps(open: &Opener<'_>, signals: &[Signal]) -> Result<NodeSnapshot, TelemetryError> {
    let mut snap = NodeSnapshot {
        psi: procfs::read_psi(),
        retrans_total: procfs::read_tcp_retrans().ok(),
        ..Default::default()
    };
    {
        let m = open(MAP_BLK_STATS)?;
        let map: PerCpuArray<&MapData, BlkStatsSlot> =
            PerCpuArray::try_from(m.map()).map_err(map_err(MAP_BLK_STATS))?;
        snap.blk = sum_blk(&map)?;
    }
    // The kernel's own in-flight counters: exact, and free for the programs.
    snap.inflight = diskstats::read_all()?.1;
    if signals.contains(&Signal::Sched) || signals.contains(&Signal::SchedStamp) {
        let m = open(MAP_RUNQ_HIST)?;
        snap.runq = Some(sum_hist(m.map(), MAP_RUNQ_HIST)?);
        // The attached time of the duty cycle (absent: an older daemon, always attached).
        if let Ok(m) = open(MAP_RUNQ_SAMPLING) {
            let arr: aya::maps::Array<&MapData, RunqSampling> =
                aya::maps::Array::try_from(m.map()).map_err(map_err(MAP_RUNQ_SAMPLING))?;
            let v = arr.get(&0, 0).map_err(map_err(MAP_RUNQ_SAMPLING))?;
            if v.duty_pct != 0 {
                snap.runq_on_ns = Some(v.on_ns_at(monotonic_ns()));
            }
        }
    }
    if signals.contains(&Signal::Reclaim) {
        let m = open(MAP_RECLAIM_STATS)?;
        snap.reclaim = Some(sum_hist(m.map(), MAP_RECLAIM_STATS)?);
    }
    if signals.contains(&Signal::Tcp) {
        let m = open(MAP_TCP_RETRANS)?;
        let map: PerCpuHashMap<&MapData, TcpPeerKey, TcpRetrans> =
            PerCpuHashMap::try_from(m.map()).map_err(map_err(MAP_TCP_RETRANS))?;
        let mut peers = BTreeMap::new();
        for item in &map {
            let (k, vals) = item.map_err(map_err(MAP_TCP_RETRANS))?;
            *peers.entry(k).or_insert(0) += vals.iter().map(|v| v.retransmits).sum::<u64>();
        }
        snap.retrans = Some(peers);
    }
    Ok(snap)
}

fn sum_hist(map: &Map, name: &'static str) -> Result<LatHist, TelemetryError> {
    let arr: PerCpuArray<&MapData, LatHist> = PerCpuArray::try_from(map).map_err(map_err(name))?;
    let vals = arr.get(&0, 0).map_err(map_err(name))?;
    let mut total = LatHist::default();
    for v in vals.iter() {
        total.accumulate(v);
    }
    Ok(total)
}

fn sum_blk<T: Borrow<MapData>>(map: &PerCpuArray<T, BlkStatsSlot>) -> Result<BlkSnapshot, TelemetryError> {
    let mut snap = BlkSnapshot::new();
    // Every CPU's used slots, summed by the (device, op) each names (CPUs may place one in
    // different slots).
    for item in map.iter() {
        let values = item.map_err(map_err(MAP_BLK_STATS))?;
        for v in values.iter().filter(|v| v.stats.ios != 0) {
            snap.entry(v.key).or_default().accumulate(&v.stats);
        }
    }
    Ok(snap)
}

fn open_pinned(pin_dir: &Path, name: &'static str) -> Result<Map, TelemetryError> {
    let path = pin_dir.join(name);
    if !path.exists() {
        return Err(TelemetryError::NotPinned(path));
    }
    let err = |source| TelemetryError::Map { name: path.display().to_string(), source };
    let data = MapData::from_pin(&path).map_err(err)?;
    Map::from_map_data(data).map_err(err)
}

/// Reads the maps pinned by a running daemon under `pin_dir` (signals whose maps are absent are
/// left out).
pub fn read_pinned_all(pin_dir: &Path) -> Result<NodeSnapshot, TelemetryError> {
    let mut signals = vec![Signal::Blk];
    for (s, m) in
        [(Signal::Sched, MAP_RUNQ_HIST), (Signal::Reclaim, MAP_RECLAIM_STATS), (Signal::Tcp, MAP_TCP_RETRANS)]
    {
        if pin_dir.join(m).exists() {
            signals.push(s);
        }
    }
    read_maps(&|name| open_pinned(pin_dir, name).map(MapRef::Owned), &signals)
}

/// Reads the block statistics map pinned by a running daemon under `pin_dir`.
pub fn read_pinned(pin_dir: &Path) -> Result<BlkSnapshot, TelemetryError> {
    let map = open_pinned(pin_dir, MAP_BLK_STATS)?;
    let map: PerCpuArray<&MapData, BlkStatsSlot> =
        PerCpuArray::try_from(&map).map_err(map_err(MAP_BLK_STATS))?;
    sum_blk(&map)
}

/// Loading the object needs it built in, and root.
fn object_and_root() -> Result<(), TelemetryError> {
    if !has_object() {
        return Err(TelemetryError::NoObject);
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if uid != 0 {
        return Err(TelemetryError::NotRoot(uid));
    }
    Ok(())
}

/// The pinned read-weights map of one volume (see `mirror_common::weights`): created from the
/// eBPF object without attaching any program, pinned at `pin`, removed on drop.
pub struct WeightsMap {
    map: aya::maps::Array<MapData, mirror_common::weights::ReadWeights>,
    _pins: Pins,
    /// Keeps the object's other maps (created with it) alive no longer than this.
    _ebpf: Ebpf,
}

impl std::fmt::Debug for WeightsMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WeightsMap({:?})", self._pins.0)
    }
}

impl WeightsMap {
    /// Creates and pins the map (replacing a stale pin). Needs root and bpffs.
    pub fn create(pin: &Path) -> Result<WeightsMap, TelemetryError> {
        use mirror_common::weights::MAP_READ_WEIGHTS;
        object_and_root()?;
        tracefs::ensure_bpffs()?;
        if let Some(dir) = pin.parent() {
            fs::create_dir_all(dir)
                .map_err(|e| TelemetryError::io(format!("create {}", dir.display()), e))?;
        }
        // A stale pin of a previous (killed) run.
        let _ = fs::remove_file(pin);
        let mut ebpf = EbpfLoader::new().allow_unsupported_maps().load(OBJECT)?;
        let map = ebpf.take_map(MAP_READ_WEIGHTS).ok_or(TelemetryError::MissingMap(MAP_READ_WEIGHTS))?;
        map.pin(pin).map_err(|e| {
            TelemetryError::io(format!("pin {}", pin.display()), std::io::Error::other(e.to_string()))
        })?;
        let pins = Pins(vec![pin.to_path_buf()]);
        let map: aya::maps::Array<MapData, mirror_common::weights::ReadWeights> =
            aya::maps::Array::try_from(map).map_err(map_err(MAP_READ_WEIGHTS))?;
        Ok(WeightsMap { map, _pins: pins, _ebpf: ebpf })
    }

    /// Stores the current weights, stamped with CLOCK_MONOTONIC (bpf_ktime_get_ns's clock).
    pub fn set(&mut self, w: &mirror_common::weights::ReadWeights) -> Result<(), TelemetryError> {
        let w = mirror_common::weights::ReadWeights { updated_ns: monotonic_ns(), ..*w };
        self.map.set(0, w, 0).map_err(map_err(mirror_common::weights::MAP_READ_WEIGHTS))
    }
}
