//! The holder's side of a lease: when to renew, and the moment it must consider itself fenced.
//! Pure: every call takes `now` (the holder's monotonic clock).
//!
//! The rule that makes takeover safe: **a holder stops acknowledging writes before anyone else can
//! be granted the lease.** The store (etcd's leader, or a replica in the embedded mode) starts a
//! lease's TTL when it *receives* a grant or renewal; the holder counts from when it *sent* the
//! request, which is earlier. The two clocks may run at different rates, so the holder shortens
//! the TTL by a [`Margin`]:
//!
//! `safe = ttl * (1 - rate) / (1 + rate) - stall`
//!
//! - `rate` bounds how far any clock's rate may stray from real time (both ways). If the store's
//!   clock runs fast by `rate`, its TTL ends after `ttl / (1 + rate)` of real time; if the holder's
//!   runs slow by `rate`, `safe` of its time is `safe / (1 - rate)` of real time. The factor makes
//!   the second no longer than the first. The default, 1000 ppm, is twice what the kernel lets NTP
//!   slew `CLOCK_MONOTONIC` (500 ppm) plus the tolerance of a common crystal (100 ppm), rounded up;
//!   a machine whose clock is worse is broken for leases and must not use them.
//! - `stall` covers what the check cannot see: the holder checks [`Tenure::check`] before it
//!   acknowledges a write, and a pause between the check and the reply leaving (scheduling, a page
//!   fault, a short stop) must end before the lease does. The default is a fifth of the TTL, 400 ms
//!   for the 2 s TTL, far above scheduling noise and still leaving renewal room.
//!
//! Renewal runs every third of the TTL, so two renewals in a row may fail without the holder
//! fencing itself. With the defaults a 2 s lease is safe for 1.596 s after each renewal was sent,
//! and renewed every 0.667 s. A longer pause than `stall` between check and reply is not covered
//! by time; it is covered by the epoch at the replicas, which refuses the stale holder's writes once
//! a new holder has claimed its epoch there (see the room's doc).

use std::time::Duration;

use super::{Epoch, LeaseMode};

/// The safety margin a holder takes off the TTL.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Margin {
    /// Bound on how far a clock's rate may differ from real time (0.001 = 1000 ppm).
    pub rate: f64,
    /// The longest pause between the validity check and the acknowledgement leaving.
    pub stall: Duration,
}

impl Margin {
    /// The default margin for a TTL: 1000 ppm and a fifth of the TTL.
    pub fn for_ttl(ttl: Duration) -> Margin {
        Margin { rate: 1e-3, stall: ttl / 5 }
    }

    /// How long after sending a grant or renewal the holder may still acknowledge writes.
    pub fn safe_window(&self, ttl: Duration) -> Duration {
        let factor = (1.0 - self.rate) / (1.0 + self.rate);
        Duration::from_secs_f64(ttl.as_secs_f64() * factor).saturating_sub(self.stall)
    }
}

/// Settings of a tenure.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TenureConfig {
    pub ttl: Duration,
    /// Time between renewals after a success.
    pub renew_every: Duration,
    /// Time between retries after a failed renewal.
    pub retry_every: Duration,
    pub margin: Margin,
}

impl TenureConfig {
    /// The defaults for a TTL: renew every third, retry every tenth, [`Margin::for_ttl`].
    pub fn for_ttl(ttl: Duration) -> TenureConfig {
        TenureConfig { ttl, renew_every: ttl / 3, retry_every: ttl / 10, margin: Margin::for_ttl(ttl) }
    }
}

/// A change of the holder's mode, with its reason (for the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseEvent {
    pub mode: LeaseMode,
    pub epoch: Epoch,
    pub reason: String,
}

/// Why a holder may not acknowledge a write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("epoch {epoch}: not the active holder ({mode:?}): {reason}")]
pub struct NotActive {
    pub epoch: Epoch,
    pub mode: LeaseMode,
    pub reason: String,
}

/// One holder's time with the lease.
#[derive(Debug, Clone, PartialEq)]
pub struct Tenure {
    cfg: TenureConfig,
    epoch: Epoch,
    mode: LeaseMode,
    /// Writes may be acknowledged strictly before this instant.
    valid_until: Duration,
    next_renew: Duration,
    /// Send time of the renewal in flight, if any.
    in_flight: Option<Duration>,
    reason: String,
}

impl Tenure {
    /// Starts a tenure for a lease whose grant was sent at `sent_at`.
    pub fn begin(cfg: TenureConfig, epoch: Epoch, sent_at: Duration) -> Tenure {
        Tenure {
            cfg,
            epoch,
            mode: LeaseMode::Active,
            valid_until: sent_at + cfg.margin.safe_window(cfg.ttl),
            next_renew: sent_at + cfg.renew_every,
            in_flight: None,
            reason: format!("took the lease at epoch {epoch}"),
        }
    }

    pub fn mode(&self) -> LeaseMode {
        self.mode
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The last reason the mode changed.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// Time the holder may still acknowledge writes without another renewal.
    pub fn time_left(&self, now: Duration) -> Duration {
        match self.mode {
            LeaseMode::Active => self.valid_until.saturating_sub(now),
            _ => Duration::ZERO,
        }
    }

    /// When the next renewal is due (None once not active).
    pub fn next_renewal(&self) -> Option<Duration> {
        (self.mode == LeaseMode::Active && self.in_flight.is_none()).then_some(self.next_renew)
    }

    /// True when a renewal should be sent at `now`.
    pub fn renew_due(&self, now: Duration) -> bool {
        self.next_renewal().is_some_and(|t| now >= t)
    }

    /// A renewal leaves at `now`.
    pub fn renew_sent(&mut self, now: Duration) {
        self.in_flight = Some(now);
    }

    /// The store granted `ttl` for the renewal sent at `sent_at`.
    pub fn renewed(&mut self, now: Duration, sent_at: Duration, ttl: Duration) {
        if self.in_flight == Some(sent_at) {
            self.in_flight = None;
        }
        if self.mode != LeaseMode::Active {
            return;
        }
        // A late answer cannot revive a tenure whose window closed: `check` fences at that instant
        // and fencing is final.
        if now >= self.valid_until {
            self.fence(format!(
                "renewal answered after the safe window closed ({:?} late)",
                now.checked_sub(self.valid_until).unwrap()
            ));
            return;
        }
        let cfg = TenureConfig { ttl, ..self.cfg };
        self.valid_until = self.valid_until.max(sent_at + cfg.margin.safe_window(ttl));
        self.next_renew = sent_at + self.cfg.renew_every;
    }

    /// The renewal sent at `sent_at` failed; retry soon. Returns the fencing event if the window
    /// has closed meanwhile.
    pub fn renew_failed(&mut self, now: Duration, sent_at: Duration, why: &str) -> Option<LeaseEvent> {
        if self.in_flight == Some(sent_at) {
            self.in_flight = None;
        }
        self.next_renew = now + self.cfg.retry_every;
        self.reason = format!("renewal failed: {why}");
        self.check(now).err().map(|_| self.event())
    }

    /// May a write be acknowledged at `now`? Fences (for good) once the safe window has closed.
    pub fn check(&mut self, now: Duration) -> Result<(), NotActive> {
        if self.mode == LeaseMode::Active && now >= self.valid_until {
            let why = format!(
                "no renewal within the safe window ({:.3} s of the {:.1} s TTL; last: {})",
                self.cfg.margin.safe_window(self.cfg.ttl).as_secs_f64(),
                self.cfg.ttl.as_secs_f64(),
                self.reason
            );
            self.fence(why);
        }
        match self.mode {
            LeaseMode::Active => Ok(()),
            mode => Err(NotActive { epoch: self.epoch, mode, reason: self.reason.clone() }),
        }
    }

    /// Fences the holder for good (a replica answered fenced, the store says the lease is gone).
    pub fn fence(&mut self, reason: String) -> LeaseEvent {
        if self.mode != LeaseMode::Fenced {
            self.mode = LeaseMode::Fenced;
            self.reason = reason;
        }
        self.event()
    }

    /// The holder handed the lease over and becomes a standby.
    pub fn step_down(&mut self, reason: String) -> LeaseEvent {
        if self.mode == LeaseMode::Active {
            self.mode = LeaseMode::Standby;
            self.reason = reason;
        }
        self.event()
    }

    fn event(&self) -> LeaseEvent {
        LeaseEvent { mode: self.mode, epoch: self.epoch, reason: self.reason.clone() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(2);

    fn s(x: f64) -> Duration {
        Duration::from_secs_f64(x)
    }

    #[test]
    fn the_default_margin_for_a_2s_ttl() {
        let m = Margin::for_ttl(TTL);
        let w = m.safe_window(TTL).as_secs_f64();
        assert!((w - (2.0 * 0.999 / 1.001 - 0.4)).abs() < 1e-9, "{w}");
        assert!(w > 2.0 * TenureConfig::for_ttl(TTL).renew_every.as_secs_f64(), "two renewals may fail");
        // A zero-length window when the stall eats the TTL, never an underflow.
        assert_eq!(Margin { rate: 1e-3, stall: TTL }.safe_window(TTL), Duration::ZERO);
    }

    /// Real time against two clocks whose rates are off by the margin's bound in the worst
    /// directions: the store's runs fast, the holder's slow. For every network delay and renewal
    /// pattern, the holder's last acknowledgement (its fencing instant plus the worst stall) comes
    /// before the store lets the lease go.
    #[test]
    fn the_holder_stops_before_the_store_expires_under_skewed_clock_rates() {
        let margin = Margin::for_ttl(TTL);
        let cfg = TenureConfig::for_ttl(TTL);
        for rate_used in [0.0, margin.rate / 2.0, margin.rate] {
            let holder_clock = |real: f64| real * (1.0 - rate_used); // slow
            let holder_to_real = |local: f64| local / (1.0 - rate_used);
            let store_ttl_real = TTL.as_secs_f64() / (1.0 + rate_used); // fast store: TTL ends early
            for delay in [0.0, 0.001, 0.05, 0.3] {
                for renewals in 0..4 {
                    // The grant leaves at real 10 s, then `renewals` renewals every renew_every of
                    // the holder's time; each reaches the store `delay` later; then silence.
                    let sent_real = 10.0;
                    let mut t = Tenure::begin(cfg, Epoch(1), s(holder_clock(sent_real)));
                    let mut last_recv_real = sent_real + delay;
                    let mut local = holder_clock(sent_real);
                    for _ in 0..renewals {
                        local += cfg.renew_every.as_secs_f64();
                        t.renew_sent(s(local));
                        let recv_real = holder_to_real(local) + delay;
                        last_recv_real = recv_real;
                        let answer_local = holder_clock(recv_real + delay);
                        t.renewed(s(answer_local), s(local), TTL);
                    }
                    let store_expiry_real = last_recv_real + store_ttl_real;
                    // Find the fencing instant on the holder's clock, in 1 ms steps.
                    let mut probe = local;
                    while t.check(s(probe)).is_ok() {
                        probe += 0.001;
                    }
                    let last_ack_real = holder_to_real(probe) + margin.stall.as_secs_f64();
                    assert!(
                        last_ack_real <= store_expiry_real + 1e-3,
                        "rate {rate_used} delay {delay} renewals {renewals}: last ack {last_ack_real} \
                         after the store's expiry {store_expiry_real}"
                    );
                }
            }
        }
    }

    /// The margin is what makes it safe: a clock drifting past the bound breaks the rule, which
    /// is why the bound is a stated assumption and not a detail.
    #[test]
    fn without_the_rate_term_a_fast_store_expires_first() {
        let margin = Margin { rate: 0.0, stall: Duration::ZERO };
        let cfg = TenureConfig { margin, ..TenureConfig::for_ttl(TTL) };
        let rate = 0.01;
        let mut t = Tenure::begin(cfg, Epoch(1), s(0.0));
        let store_expiry_real = TTL.as_secs_f64() / (1.0 + rate);
        let fence_local =
            (0..100_000).map(|i| f64::from(i) * 0.001).find(|x| t.check(s(*x)).is_err()).unwrap();
        assert!(fence_local / (1.0 - rate) > store_expiry_real);
    }

    #[test]
    fn renewals_extend_and_silence_fences_for_good() {
        let cfg = TenureConfig::for_ttl(TTL);
        let safe = cfg.margin.safe_window(TTL);
        let mut t = Tenure::begin(cfg, Epoch(7), s(0.0));
        assert!(!t.renew_due(s(0.5)));
        assert!(t.renew_due(cfg.renew_every));
        t.renew_sent(s(0.7));
        assert_eq!(t.next_renewal(), None, "one renewal in flight at a time");
        t.renewed(s(0.72), s(0.7), TTL);
        assert_eq!(t.time_left(s(0.72)), (s(0.7) + safe).checked_sub(s(0.72)).unwrap());
        // Two failures: still active, retries every tenth of the TTL.
        t.renew_sent(s(1.4));
        assert_eq!(t.renew_failed(s(1.45), s(1.4), "etcd unreachable"), None);
        assert!(t.renew_due(s(1.65)));
        assert!(t.check((s(0.7) + safe).checked_sub(s(0.001)).unwrap()).is_ok());
        // The window closes: fenced, and a late success does not revive it.
        let ev = t.renew_failed(s(0.7) + safe, s(1.65), "etcd unreachable").expect("fenced");
        assert_eq!(ev.mode, LeaseMode::Fenced);
        assert!(ev.reason.contains("safe window"), "{}", ev.reason);
        t.renewed(s(2.4), s(2.3), TTL);
        assert_eq!(t.mode(), LeaseMode::Fenced);
        assert!(t.check(s(2.4)).is_err());
        assert_eq!(t.next_renewal(), None);
    }

    #[test]
    fn an_answer_after_the_window_closed_fences_even_without_a_check_in_between() {
        let cfg = TenureConfig::for_ttl(TTL);
        let mut t = Tenure::begin(cfg, Epoch(1), s(0.0));
        t.renew_sent(s(0.6));
        // The process was stopped for 3 s between sending and hearing back.
        t.renewed(s(3.6), s(0.6), TTL);
        assert_eq!(t.mode(), LeaseMode::Fenced);
    }

    #[test]
    fn a_fenced_error_or_a_handover_ends_the_tenure() {
        let cfg = TenureConfig::for_ttl(TTL);
        let mut t = Tenure::begin(cfg, Epoch(3), s(0.0));
        let ev = t.fence("replica b: fenced: epoch 3 below 4".into());
        assert_eq!((ev.mode, ev.epoch), (LeaseMode::Fenced, Epoch(3)));
        assert_eq!(t.check(s(0.1)).unwrap_err().mode, LeaseMode::Fenced);
        let mut u = Tenure::begin(cfg, Epoch(3), s(0.0));
        assert_eq!(u.step_down("handed to b/2".into()).mode, LeaseMode::Standby);
        assert!(u.check(s(0.1)).is_err());
        assert_eq!(u.time_left(s(0.1)), Duration::ZERO);
    }
}
