//! The planned handover (soft migration) as two state machines, one per router. Pure: the
//! serve loop performs each [`Action`], feeds back what happened as an event with `now`, and logs
//! every step's reason.
//!
//! Active router (`mirror ctl handover`):
//! 1. **shift reads** to the standby's node (no pause: reads keep flowing, now from the replica
//!    that is about to become the source, so its cache is warm);
//! 2. **quiesce**: admit no new writes, wait for the ones in flight (the pause starts here);
//! 3. **flush** both replicas (every acknowledged write is durable on both);
//! 4. **hand the lease** to the standby (one store operation: etcd moves the key, the embedded
//!    store releases naming the successor);
//! 5. **stop**: close the clients' connections (they reconnect to the standby) and exit.
//!
//! A failure before step 4 resumes service (the lease was never given away). An unknown outcome
//! of step 4 (the store did not answer) is neither: the router stays quiesced, asks the store
//! again, and stops if the lease is no longer its own or its safe window closes first.
//!
//! Standby router (`mirror serve --standby`): watches the lease; when it is handed to it, or when
//! it expires (the active router died), it **takes** it, **raises the epoch** on the replicas it
//! reaches (from here the old router's writes are refused), and **becomes active** with roles
//! swapped (its local replica is the new source). The pause a client sees ends when the standby
//! serves and the client has reconnected.

use std::time::Duration;

use super::{Epoch, Holder, LeaseError, LeaseRecord, LeaseState};

/// Steps of the active router's handover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActiveState {
    ShiftingReads,
    Quiescing,
    Flushing,
    Handing,
    /// The store did not say whether the handover happened.
    Confirming,
    /// Handed over: serve no more.
    Done {
        epoch: Epoch,
    },
    /// Given up before the lease left: serve on.
    Aborted {
        reason: String,
    },
}

/// What the serve loop does next for the active side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    ShiftReads,
    Quiesce,
    Flush,
    HandLease {
        to: Holder,
    },
    /// Read the store again to learn where the lease is.
    ReadLease,
    /// Close the clients' connections and stop serving.
    Stop {
        reason: String,
    },
    /// Admit writes again and serve on as the active router.
    Resume {
        reason: String,
    },
    /// Take the lease (standby).
    Campaign,
    /// Raise the epoch on the replicas (standby, after taking).
    RaiseEpoch {
        epoch: Epoch,
    },
    /// Serve as the active router; `swap_roles`: the local replica becomes the source.
    BecomeActive {
        epoch: Epoch,
        swap_roles: bool,
    },
    /// Nothing to do until the next event or `until`.
    Wait {
        until: Option<Duration>,
    },
}

/// What happened, fed back into the active side.
#[derive(Debug)]
pub enum ActiveEvent {
    ReadsShifted,
    Quiesced,
    Flushed(Result<(), String>),
    /// The store's answer to the handover (Ok: the epoch the successor holds). An indeterminate
    /// error ([`LeaseError::is_indeterminate`]: no answer) is neither success nor failure.
    Handed(Result<Epoch, LeaseError>),
    /// The store's state after [`Action::ReadLease`].
    LeaseRead(Result<LeaseState, LeaseError>),
    /// The holder's safe window closed ([`super::tenure::Tenure::check`] failed).
    WindowClosed,
}

/// The active router's handover.
#[derive(Debug, Clone)]
pub struct ActiveHandover {
    to: Holder,
    me: Holder,
    state: ActiveState,
    started: Duration,
    /// When writes stopped being admitted.
    quiesced_at: Option<Duration>,
    reason: String,
}

impl ActiveHandover {
    /// Starts a handover from `me` to `to` at `now`.
    pub fn start(now: Duration, me: Holder, to: Holder) -> (ActiveHandover, Action) {
        let reason = format!("handover to {to} requested");
        (
            ActiveHandover {
                to,
                me,
                state: ActiveState::ShiftingReads,
                started: now,
                quiesced_at: None,
                reason,
            },
            Action::ShiftReads,
        )
    }

    pub fn state(&self) -> &ActiveState {
        &self.state
    }

    /// The successor.
    pub fn to(&self) -> &Holder {
        &self.to
    }

    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// How long writes have been held at `now` (the pause the clients see, so far).
    pub fn paused_for(&self, now: Duration) -> Duration {
        self.quiesced_at.map_or(Duration::ZERO, |t| now.saturating_sub(t))
    }

    pub fn elapsed(&self, now: Duration) -> Duration {
        now.saturating_sub(self.started)
    }

    fn abort(&mut self, reason: String) -> Action {
        self.reason = format!("handover to {} aborted: {reason}; serving on", self.to);
        self.state = ActiveState::Aborted { reason };
        Action::Resume { reason: self.reason.clone() }
    }

    fn done(&mut self, epoch: Epoch, how: &str) -> Action {
        self.reason = format!("lease handed to {} (epoch {epoch}){how}; stopping", self.to);
        self.state = ActiveState::Done { epoch };
        Action::Stop { reason: self.reason.clone() }
    }

    /// Feeds an event; returns the next action.
    pub fn on(&mut self, now: Duration, ev: ActiveEvent) -> Action {
        use ActiveEvent as E;
        use ActiveState as S;
        match (&self.state, ev) {
            (S::Done { .. } | S::Aborted { .. }, _) => Action::Wait { until: None },
            (_, E::WindowClosed) => {
                // Before the lease left or while its fate is unknown, a closed window is a lost
                // lease: stop, never resume.
                self.reason =
                    format!("handover to {}: the safe window closed first; stopping fenced", self.to);
                self.state = S::Done { epoch: Epoch(0) };
                Action::Stop { reason: self.reason.clone() }
            }
            (S::ShiftingReads, E::ReadsShifted) => {
                self.state = S::Quiescing;
                self.quiesced_at = Some(now);
                Action::Quiesce
            }
            (S::Quiescing, E::Quiesced) => {
                self.state = S::Flushing;
                Action::Flush
            }
            (S::Flushing, E::Flushed(Ok(()))) => {
                self.state = S::Handing;
                Action::HandLease { to: self.to.clone() }
            }
            (S::Flushing, E::Flushed(Err(e))) => self.abort(format!("flush failed: {e}")),
            (S::Handing, E::Handed(Ok(epoch))) => self.done(epoch, ""),
            (S::Handing, E::Handed(Err(e @ LeaseError::Lost { .. }))) => {
                // Partly handed (the embedded store released one replica): not ours to resume.
                self.reason = format!("handover to {}: {e}; stopping fenced", self.to);
                self.state = S::Done { epoch: Epoch(0) };
                Action::Stop { reason: self.reason.clone() }
            }
            (S::Handing, E::Handed(Err(e))) if e.is_indeterminate() => {
                self.reason = format!("handover to {}: no answer ({e}); asking the store", self.to);
                self.state = S::Confirming;
                Action::ReadLease
            }
            (S::Handing, E::Handed(Err(e))) => self.abort(e.to_string()),
            (S::Confirming, E::LeaseRead(Ok(st))) => match st.record {
                Some(LeaseRecord { holder, epoch, .. }) if holder == self.to => {
                    self.done(epoch, " (confirmed)")
                }
                Some(LeaseRecord { handed_to: Some(h), epoch, .. }) if h == self.to => {
                    self.done(epoch, " (confirmed)")
                }
                Some(LeaseRecord { ref holder, handed_to: None, .. }) if *holder == self.me => {
                    self.abort("the store still names this router".into())
                }
                other => {
                    // Someone else, or nobody: the lease is not ours any more.
                    let who = other.map_or("nobody".to_string(), |r| r.holder.to_string());
                    self.reason = format!("handover to {}: the lease is now {who}'s; stopping", self.to);
                    self.state = S::Done { epoch: Epoch(0) };
                    Action::Stop { reason: self.reason.clone() }
                }
            },
            (S::Confirming, E::LeaseRead(Err(_))) => Action::ReadLease,
            (state, ev) => {
                // An event that does not belong to this step: a bug in the caller, never a reason
                // to move on. Stay, and say so.
                self.reason = format!("handover: ignored {ev:?} in {state:?}");
                Action::Wait { until: None }
            }
        }
    }
}

/// The standby router's states.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StandbyState {
    Watching,
    Taking,
    RaisingEpoch { epoch: Epoch },
    Active { epoch: Epoch },
}

/// What happened, fed back into the standby side.
#[derive(Debug)]
pub enum StandbyEvent {
    /// The store's state (from a watch or a read).
    Seen(LeaseState),
    /// The campaign's outcome.
    Took(Result<Epoch, LeaseError>),
    /// The epoch was written to the replicas it could reach (Err: to none).
    EpochRaised(Result<(), String>),
}

/// The standby router.
#[derive(Debug, Clone)]
pub struct Standby {
    me: Holder,
    state: StandbyState,
    reason: String,
}

impl Standby {
    pub fn new(me: Holder) -> Standby {
        Standby { me, state: StandbyState::Watching, reason: "standing by".into() }
    }

    pub fn state(&self) -> &StandbyState {
        &self.state
    }

    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// Feeds an event; returns the next action.
    pub fn on(&mut self, now: Duration, ev: StandbyEvent) -> Action {
        use StandbyEvent as E;
        use StandbyState as S;
        match (&self.state, ev) {
            (S::Watching, E::Seen(st)) => match &st.record {
                Some(r) if r.handed_to.as_ref() == Some(&self.me) || (r.holder == self.me) => {
                    self.reason = format!("{} handed the lease to this router", r.holder);
                    self.state = S::Taking;
                    Action::Campaign
                }
                Some(r) if r.live(now) => {
                    self.reason = format!("{} holds the lease (epoch {})", r.holder, r.epoch);
                    Action::Wait { until: Some(r.expires_at) }
                }
                Some(r) => {
                    self.reason = format!("the lease of {} expired", r.holder);
                    self.state = S::Taking;
                    Action::Campaign
                }
                None => {
                    self.reason = "nobody holds the lease".into();
                    self.state = S::Taking;
                    Action::Campaign
                }
            },
            (S::Taking, E::Took(Ok(epoch))) => {
                self.state = S::RaisingEpoch { epoch };
                Action::RaiseEpoch { epoch }
            }
            (S::Taking, E::Took(Err(e))) => {
                self.reason = format!("could not take the lease: {e}");
                self.state = S::Watching;
                Action::Wait { until: None }
            }
            (S::RaisingEpoch { epoch }, E::EpochRaised(Ok(()))) => {
                let epoch = *epoch;
                self.reason = format!("epoch {epoch} on the replicas; active with roles swapped");
                self.state = S::Active { epoch };
                Action::BecomeActive { epoch, swap_roles: true }
            }
            (S::RaisingEpoch { epoch }, E::EpochRaised(Err(e))) => {
                // Holding the lease without the epoch at a replica is useless: retry, the lease's
                // renewal keeps it meanwhile.
                let epoch = *epoch;
                self.reason = format!("raising epoch {epoch}: {e}; retrying");
                Action::RaiseEpoch { epoch }
            }
            (state, ev) => {
                self.reason = format!("standby: ignored {ev:?} in {state:?}");
                Action::Wait { until: None }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: f64) -> Duration {
        Duration::from_secs_f64(x)
    }

    fn h(n: &str) -> Holder {
        Holder(n.into())
    }

    fn record(holder: &str, epoch: u64, expires_at: f64, handed_to: Option<&str>) -> LeaseState {
        LeaseState {
            record: Some(LeaseRecord {
                volume: "v".into(),
                holder: h(holder),
                epoch: Epoch(epoch),
                ttl: s(2.0),
                expires_at: s(expires_at),
                handed_to: handed_to.map(h),
            }),
            last_epoch: Epoch(epoch),
            ..Default::default()
        }
    }

    #[test]
    fn the_active_side_runs_the_steps_in_order_and_stops() {
        let (mut a, act) = ActiveHandover::start(s(0.0), h("a/1"), h("b/1"));
        assert_eq!(act, Action::ShiftReads);
        assert_eq!(a.paused_for(s(0.1)), Duration::ZERO, "reads shift without a pause");
        assert_eq!(a.on(s(0.2), ActiveEvent::ReadsShifted), Action::Quiesce);
        assert_eq!(a.on(s(0.25), ActiveEvent::Quiesced), Action::Flush);
        assert_eq!(a.on(s(0.3), ActiveEvent::Flushed(Ok(()))), Action::HandLease { to: h("b/1") });
        let act = a.on(s(0.32), ActiveEvent::Handed(Ok(Epoch(8))));
        assert!(
            matches!(act, Action::Stop { ref reason } if reason.contains("b/1") && reason.contains("epoch 8")),
            "{act:?}"
        );
        assert_eq!(a.state(), &ActiveState::Done { epoch: Epoch(8) });
        assert_eq!(a.paused_for(s(0.32)), s(0.12));
        // Nothing moves it afterwards.
        assert_eq!(a.on(s(0.4), ActiveEvent::Flushed(Ok(()))), Action::Wait { until: None });
    }

    #[test]
    fn failures_before_the_lease_leaves_resume_service() {
        let (mut a, _) = ActiveHandover::start(s(0.0), h("a/1"), h("b/1"));
        a.on(s(0.1), ActiveEvent::ReadsShifted);
        a.on(s(0.1), ActiveEvent::Quiesced);
        let act = a.on(s(0.2), ActiveEvent::Flushed(Err("replica b: EIO".into())));
        assert!(matches!(act, Action::Resume { ref reason } if reason.contains("EIO")), "{act:?}");
        let (mut a, _) = ActiveHandover::start(s(0.0), h("a/1"), h("b/1"));
        a.on(s(0.1), ActiveEvent::ReadsShifted);
        a.on(s(0.1), ActiveEvent::Quiesced);
        a.on(s(0.2), ActiveEvent::Flushed(Ok(())));
        let refused =
            LeaseError::Handover { volume: "v".into(), to: h("b/1"), reason: "no standby b/1".into() };
        assert!(matches!(a.on(s(0.3), ActiveEvent::Handed(Err(refused))), Action::Resume { .. }));
        assert!(matches!(a.state(), ActiveState::Aborted { .. }));
    }

    #[test]
    fn an_unknown_outcome_is_confirmed_never_guessed() {
        let start = || {
            let (mut a, _) = ActiveHandover::start(s(0.0), h("a/1"), h("b/1"));
            a.on(s(0.1), ActiveEvent::ReadsShifted);
            a.on(s(0.1), ActiveEvent::Quiesced);
            a.on(s(0.2), ActiveEvent::Flushed(Ok(())));
            let lost_answer = LeaseError::EtcdTimeout { op: "hand over", timeout: s(1.0) };
            assert_eq!(a.on(s(0.3), ActiveEvent::Handed(Err(lost_answer))), Action::ReadLease);
            a
        };
        // It happened: stop.
        let mut a = start();
        assert!(matches!(
            a.on(s(0.4), ActiveEvent::LeaseRead(Ok(record("b/1", 9, 2.4, None)))),
            Action::Stop { .. }
        ));
        // It did not: serve on.
        let mut a = start();
        assert!(matches!(
            a.on(s(0.4), ActiveEvent::LeaseRead(Ok(record("a/1", 8, 2.4, None)))),
            Action::Resume { .. }
        ));
        // The store does not answer: ask again, and stop (not resume) when the window closes.
        let mut a = start();
        let err = LeaseError::EtcdTimeout { op: "get", timeout: s(1.0) };
        assert_eq!(a.on(s(0.5), ActiveEvent::LeaseRead(Err(err))), Action::ReadLease);
        assert!(matches!(a.on(s(1.6), ActiveEvent::WindowClosed), Action::Stop { .. }));
        // Someone else took it meanwhile: stop.
        let mut a = start();
        assert!(matches!(
            a.on(s(0.4), ActiveEvent::LeaseRead(Ok(record("c/1", 9, 2.4, None)))),
            Action::Stop { .. }
        ));
    }

    #[test]
    fn a_window_closing_mid_handover_stops_without_resuming() {
        let (mut a, _) = ActiveHandover::start(s(0.0), h("a/1"), h("b/1"));
        a.on(s(0.1), ActiveEvent::ReadsShifted);
        assert!(matches!(a.on(s(2.0), ActiveEvent::WindowClosed), Action::Stop { .. }));
    }

    #[test]
    fn the_standby_takes_a_handed_lease_raises_the_epoch_and_becomes_active_swapped() {
        let mut sb = Standby::new(h("b/1"));
        assert_eq!(
            sb.on(s(0.0), StandbyEvent::Seen(record("a/1", 7, 2.0, None))),
            Action::Wait { until: Some(s(2.0)) }
        );
        assert_eq!(sb.on(s(0.5), StandbyEvent::Seen(record("a/1", 7, 2.5, Some("b/1")))), Action::Campaign);
        assert_eq!(sb.on(s(0.52), StandbyEvent::Took(Ok(Epoch(8)))), Action::RaiseEpoch { epoch: Epoch(8) });
        assert_eq!(
            sb.on(s(0.53), StandbyEvent::EpochRaised(Err("replica a: timeout".into()))),
            Action::RaiseEpoch { epoch: Epoch(8) }
        );
        assert_eq!(
            sb.on(s(0.56), StandbyEvent::EpochRaised(Ok(()))),
            Action::BecomeActive { epoch: Epoch(8), swap_roles: true }
        );
        assert_eq!(sb.state(), &StandbyState::Active { epoch: Epoch(8) });
    }

    #[test]
    fn the_standby_takes_over_an_expired_lease_and_watches_on_after_a_lost_race() {
        let mut sb = Standby::new(h("b/1"));
        assert_eq!(sb.on(s(3.0), StandbyEvent::Seen(record("a/1", 7, 2.0, None))), Action::Campaign);
        assert!(sb.reason().contains("expired"));
        let lost = LeaseError::Changed { volume: "v".into() };
        assert_eq!(sb.on(s(3.1), StandbyEvent::Took(Err(lost))), Action::Wait { until: None });
        assert_eq!(sb.state(), &StandbyState::Watching);
        assert_eq!(sb.on(s(3.2), StandbyEvent::Seen(LeaseState::default())), Action::Campaign);
    }
}
