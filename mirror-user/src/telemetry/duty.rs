//! The run-queue duty cycle's schedule (`mirror daemon --runq-duty N --runq-period P`): the
//! run-queue latency program fires on every context switch, so the daemon keeps it attached for
//! `on = P * N / 100` of every period `P` only ([`crate::telemetry::bpf::Probe::set_runq_window`]
//! does the attaching and publishes the attached time, which turns counts into rates).
//!
//! This is the decision part, pure and with time passed in (a [`Duration`] since the daemon's
//! clock started), so it can be tested in simulated time:
//! - windows open at `start + k * period`: the deadlines are kept, not recomputed from when the
//!   loop got round to it, so an opening that came due while the loop was busy takes effect at
//!   once and the next one is still on time;
//! - each window stays open `on` from when it *really* opened (after the attach; on a loaded node
//!   the daemon itself waits for a CPU), so the attached time per period stays `on`;
//! - far behind (the loop stalled for more than a period), the schedule starts afresh at the
//!   late opening rather than catching up with a burst of short windows.

use std::time::Duration;

/// When the run-queue window opens and closes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DutyCycle {
    on: Duration,
    period: Duration,
    /// Scheduled start of the current period.
    period_start: Duration,
    /// When the current window really opened (the attach done).
    opened_at: Duration,
    open: bool,
}

impl DutyCycle {
    /// A cycle whose first window is open from `now` (the program is attached when the daemon
    /// starts). `on` is clamped to `period`.
    pub fn new(on: Duration, period: Duration, now: Duration) -> DutyCycle {
        DutyCycle { on: on.min(period), period, period_start: now, opened_at: now, open: true }
    }

    /// Whether the window is open (the program attached).
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// When the window is next due to change: `on` after it really opened while open, the start
    /// of the next period while closed. May lie in the past (then the change is due at once).
    pub fn next_change(&self) -> Duration {
        if self.open {
            self.opened_at + self.on
        } else {
            self.period_start + self.period
        }
    }

    /// The change that [`Self::next_change`] announced is being made at `now`: returns whether
    /// the window is open from here on. Call [`Self::changed`] once the attach or detach is done.
    pub fn change(&mut self, now: Duration) -> bool {
        self.open = !self.open;
        if self.open {
            self.period_start += self.period;
            // Far behind (the loop stalled): start afresh rather than catch up.
            if self.period_start + self.period < now {
                self.period_start = now;
            }
        }
        self.open
    }

    /// The attach or detach that [`Self::change`] asked for finished at `now`: an open window
    /// counts its `on` from here.
    pub fn changed(&mut self, now: Duration) {
        self.opened_at = now;
    }
}

#[cfg(test)]
mod tests {
    use super::DutyCycle;
    use std::time::Duration;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Runs the daemon's loop in simulated time for `until`: every change is made `late(k)` after
    /// it came due and its attach or detach takes `cost`. Returns the windows as (opened, closed).
    fn simulate(
        cycle: &mut DutyCycle,
        until: Duration,
        late: impl Fn(usize) -> Duration,
        cost: Duration,
    ) -> Vec<(Duration, Duration)> {
        let mut now = Duration::ZERO;
        let mut windows = Vec::new();
        let mut opened = now;
        for k in 0.. {
            now = now.max(cycle.next_change()) + late(k);
            if now >= until {
                break;
            }
            let open = cycle.change(now);
            now += cost;
            cycle.changed(now);
            if open {
                opened = now;
            } else {
                windows.push((opened, now));
            }
        }
        windows
    }

    #[test]
    fn on_time_windows_open_every_period_for_their_share() {
        let mut c = DutyCycle::new(ms(50), ms(250), ms(0));
        assert!(c.is_open());
        assert_eq!(c.next_change(), ms(50));
        assert!(!c.change(ms(50)));
        c.changed(ms(50));
        assert_eq!(c.next_change(), ms(250));
        assert!(c.change(ms(250)));
        c.changed(ms(250));
        assert_eq!(c.next_change(), ms(300));
        let w = simulate(&mut DutyCycle::new(ms(50), ms(250), ms(0)), ms(1000), |_| ms(0), ms(0));
        assert_eq!(w, [(ms(0), ms(50)), (ms(250), ms(300)), (ms(500), ms(550)), (ms(750), ms(800))]);
    }

    #[test]
    fn a_late_opening_keeps_its_whole_window_and_the_next_one_stays_on_time() {
        let mut c = DutyCycle::new(ms(50), ms(250), ms(0));
        c.change(ms(50));
        c.changed(ms(50));
        // The opening due at 250 is made at 280, and the attach takes 5 ms.
        assert!(c.change(ms(280)));
        c.changed(ms(285));
        assert_eq!(c.next_change(), ms(335), "open `on` from when it really opened");
        assert!(!c.change(ms(335)));
        c.changed(ms(336));
        assert_eq!(c.next_change(), ms(500), "the schedule keeps its deadlines");
    }

    #[test]
    fn after_a_stall_the_schedule_starts_afresh() {
        let mut c = DutyCycle::new(ms(50), ms(250), ms(0));
        c.change(ms(50));
        c.changed(ms(50));
        // The loop stalled until 900: the opening due at 250 is made then, and the period counts
        // from there instead of opening windows at 500 and 750 in a burst.
        assert!(c.change(ms(900)));
        c.changed(ms(900));
        assert!(!c.change(ms(950)));
        c.changed(ms(950));
        assert_eq!(c.next_change(), ms(1150));
    }

    #[test]
    fn attached_share_holds_when_every_change_is_late_and_slow() {
        // 20% of 250 ms; each change made 0..9 ms late, each attach / detach taking 1 ms.
        let mut c = DutyCycle::new(ms(50), ms(250), ms(0));
        let w = simulate(&mut c, Duration::from_secs(100), |k| ms((k as u64 * 7) % 10), ms(1));
        assert_eq!(w.len(), 400, "one window per period");
        let attached: Duration = w.iter().map(|(o, c)| (*c).checked_sub(*o).unwrap()).sum();
        let share = attached.as_secs_f64() / 100.0;
        // Each window: 50 ms from its real opening, plus the close's lateness and detach.
        assert!((0.20..0.25).contains(&share), "attached {share:.3} of the time");
        for pair in w.windows(2) {
            let gap = pair[1].0.checked_sub(pair[0].0).unwrap();
            assert!(gap >= ms(240) && gap <= ms(260), "windows {pair:?} not a period apart");
        }
    }

    #[test]
    fn on_is_at_most_the_period() {
        let c = DutyCycle::new(ms(300), ms(250), ms(10));
        assert_eq!(c.next_change(), ms(260));
    }
}
