//! The heartbeat state machine as pure functions: what a worker's liveness becomes, given its
//! state, when it was last heard from and the time now. No I/O and no clock: the registry reads
//! the clock, applies the answer to its session and does the effects (persist, requeue, logs,
//! metrics).
//!
//! ```text
//! ACTIVE   --silent > heartbeat_timeout------------> SUSPECT
//! ACTIVE   --silent > 3x heartbeat_timeout---------> DEAD
//! SUSPECT  --silent > 3x heartbeat_timeout---------> DEAD
//! SUSPECT  --heartbeat-----------------------------> ACTIVE
//! DRAINING --silent > 3x heartbeat_timeout---------> DEAD
//! DRAINING --idle and silent > heartbeat_timeout---> DEAD (it left: not a failure)
//! DEAD     --dead for > cleanup_interval-----------> forgotten
//! ```
//!
//! Idle means the worker holds no task and has no task stream: it deregistered, finished what it
//! held and hung up.
//!
//! A DEAD worker's heartbeat is refused: it must register again. Nothing but a heartbeat moves a
//! worker back towards ACTIVE, and the timer alone only ever moves it forward.

use std::time::{Duration, Instant};

use crate::domain::WorkerState;

/// The timings the machine runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Silence after which an ACTIVE worker is SUSPECT, and an idle DRAINING one has left.
    pub heartbeat: Duration,
    /// How long a DEAD session stays listed before it is forgotten.
    pub cleanup: Duration,
}

impl Timeouts {
    /// Silence after which a worker is DEAD: three missed heartbeat timeouts, so one slow
    /// heartbeat (a long GC pause, a congested link) costs a SUSPECT mark, not the worker's tasks.
    pub fn dead_after(&self) -> Duration {
        self.heartbeat.saturating_mul(3)
    }
}

/// A worker as the machine sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    pub state: WorkerState,
    /// When it was last heard from (its registration or latest heartbeat).
    pub last_heartbeat: Instant,
    /// When it was declared DEAD; `None` while it is not.
    pub dead_since: Option<Instant>,
    /// It holds no task and has no task stream.
    pub idle: bool,
}

/// What one look at a worker decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Nothing changes.
    Stay,
    /// ACTIVE -> SUSPECT: it missed its heartbeat. It is offered no work until it is heard from.
    Suspect,
    /// -> DEAD: no heartbeat for 3x the heartbeat timeout. Its tasks go back to the queue.
    Dead,
    /// DRAINING -> DEAD: it deregistered, holds nothing, closed its stream and went quiet for one
    /// heartbeat timeout. A clean stop, not a failure.
    Left,
    /// DEAD for longer than the cleanup interval: forget the session.
    Forget,
}

impl Transition {
    /// The state the worker moves to; `None` when it stays or is forgotten.
    pub fn to(self) -> Option<WorkerState> {
        match self {
            Transition::Stay | Transition::Forget => None,
            Transition::Suspect => Some(WorkerState::Suspect),
            Transition::Dead | Transition::Left => Some(WorkerState::Dead),
        }
    }
}

/// The timer's decision for one worker at `now`. Depends only on the time elapsed since
/// `last_heartbeat` (and since `dead_since`), never on the instants themselves; a heartbeat
/// stamped after `now` counts as no silence at all.
pub fn next_state(worker: &Observed, now: Instant, timeouts: &Timeouts) -> Transition {
    let silent = now.saturating_duration_since(worker.last_heartbeat);
    match worker.state {
        WorkerState::Draining if worker.idle && silent > timeouts.heartbeat => Transition::Left,
        WorkerState::Active | WorkerState::Suspect | WorkerState::Draining
            if silent > timeouts.dead_after() =>
        {
            Transition::Dead
        }
        WorkerState::Active if silent > timeouts.heartbeat => Transition::Suspect,
        WorkerState::Dead
            if worker.dead_since.is_some_and(|d| now.saturating_duration_since(d) > timeouts.cleanup) =>
        {
            Transition::Forget
        }
        _ => Transition::Stay,
    }
}

/// What a heartbeat does to a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heartbeat {
    /// The worker is DEAD: the heartbeat is refused and it must register again.
    Refused,
    /// SUSPECT -> ACTIVE: it is offered work again.
    Revived,
    /// Recorded; the state stays (ACTIVE, or DRAINING while it finishes what it holds).
    Noted,
}

impl Heartbeat {
    /// The state after the heartbeat; `None` when it was refused.
    pub fn state_after(self, from: WorkerState) -> Option<WorkerState> {
        match self {
            Heartbeat::Refused => None,
            Heartbeat::Revived => Some(WorkerState::Active),
            Heartbeat::Noted => Some(from),
        }
    }
}

/// The decision for a heartbeat from a worker in `state`.
pub fn on_heartbeat(state: WorkerState) -> Heartbeat {
    match state {
        WorkerState::Dead => Heartbeat::Refused,
        WorkerState::Suspect => Heartbeat::Revived,
        WorkerState::Active | WorkerState::Draining => Heartbeat::Noted,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn timeouts() -> Timeouts {
        Timeouts { heartbeat: 10 * SECOND, cleanup: 30 * SECOND }
    }

    fn observed(state: WorkerState, last_heartbeat: Instant) -> Observed {
        let dead_since = (state == WorkerState::Dead).then_some(last_heartbeat);
        Observed { state, last_heartbeat, dead_since, idle: false }
    }

    /// The decision for a worker in `state`, silent for `silent`.
    fn after(state: WorkerState, silent: Duration) -> Transition {
        let t0 = Instant::now();
        next_state(&observed(state, t0), t0 + silent, &timeouts())
    }

    #[test]
    fn an_active_worker_is_suspect_after_one_timeout_and_dead_after_three() {
        use WorkerState::Active;
        assert_eq!(after(Active, Duration::ZERO), Transition::Stay);
        assert_eq!(after(Active, 10 * SECOND), Transition::Stay, "a timeout is exceeded, not reached");
        assert_eq!(after(Active, 11 * SECOND), Transition::Suspect);
        assert_eq!(after(Active, 30 * SECOND), Transition::Suspect);
        assert_eq!(after(Active, 31 * SECOND), Transition::Dead, "straight to DEAD when checks were late");
    }

    #[test]
    fn a_suspect_worker_is_dead_after_three_timeouts() {
        use WorkerState::Suspect;
        assert_eq!(after(Suspect, 11 * SECOND), Transition::Stay);
        assert_eq!(after(Suspect, 30 * SECOND), Transition::Stay);
        assert_eq!(after(Suspect, 31 * SECOND), Transition::Dead);
    }

    #[test]
    fn a_draining_worker_is_never_suspect_and_leaves_early_only_when_idle() {
        let t0 = Instant::now();
        let busy = observed(WorkerState::Draining, t0);
        let idle = Observed { idle: true, ..busy };
        assert_eq!(next_state(&busy, t0 + 11 * SECOND, &timeouts()), Transition::Stay);
        assert_eq!(next_state(&busy, t0 + 31 * SECOND, &timeouts()), Transition::Dead);
        assert_eq!(next_state(&idle, t0 + 10 * SECOND, &timeouts()), Transition::Stay);
        assert_eq!(next_state(&idle, t0 + 11 * SECOND, &timeouts()), Transition::Left);
        assert_eq!(next_state(&idle, t0 + 31 * SECOND, &timeouts()), Transition::Left);
    }

    #[test]
    fn idle_matters_only_to_a_draining_worker() {
        let t0 = Instant::now();
        for state in [WorkerState::Active, WorkerState::Suspect] {
            let o = Observed { idle: true, ..observed(state, t0) };
            assert_eq!(next_state(&o, t0 + 11 * SECOND, &timeouts()), after(state, 11 * SECOND));
        }
    }

    #[test]
    fn a_dead_worker_is_forgotten_after_the_cleanup_interval() {
        use WorkerState::Dead;
        assert_eq!(after(Dead, 30 * SECOND), Transition::Stay);
        assert_eq!(after(Dead, 31 * SECOND), Transition::Forget);
        let t0 = Instant::now();
        let never_marked = Observed { dead_since: None, ..observed(Dead, t0) };
        assert_eq!(next_state(&never_marked, t0 + 3600 * SECOND, &timeouts()), Transition::Stay);
    }

    #[test]
    fn a_heartbeat_stamped_after_now_is_no_silence() {
        let t0 = Instant::now();
        let o = observed(WorkerState::Active, t0 + 5 * SECOND);
        assert_eq!(next_state(&o, t0, &timeouts()), Transition::Stay);
    }

    #[test]
    fn heartbeats() {
        assert_eq!(on_heartbeat(WorkerState::Active), Heartbeat::Noted);
        assert_eq!(on_heartbeat(WorkerState::Suspect), Heartbeat::Revived);
        assert_eq!(on_heartbeat(WorkerState::Draining), Heartbeat::Noted);
        assert_eq!(on_heartbeat(WorkerState::Dead), Heartbeat::Refused);
        assert_eq!(Heartbeat::Revived.state_after(WorkerState::Suspect), Some(WorkerState::Active));
        assert_eq!(Heartbeat::Noted.state_after(WorkerState::Draining), Some(WorkerState::Draining));
        assert_eq!(Heartbeat::Refused.state_after(WorkerState::Dead), None);
    }

    // Property tests. Times are milliseconds from one base instant.

    fn any_state() -> impl Strategy<Value = WorkerState> {
        prop::sample::select(WorkerState::ALL.to_vec())
    }

    fn any_timeouts() -> impl Strategy<Value = Timeouts> {
        (1u64..5_000, 0u64..20_000).prop_map(|(hb, cleanup)| Timeouts {
            heartbeat: Duration::from_millis(hb),
            cleanup: Duration::from_millis(cleanup),
        })
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// How far along the machine a decision is: the timer never moves a worker back.
    fn rank(t: Transition) -> u8 {
        match t {
            Transition::Stay => 0,
            Transition::Suspect => 1,
            Transition::Dead | Transition::Left => 2,
            Transition::Forget => 3,
        }
    }

    /// One event a worker's session sees: a timer check or a heartbeat, some time after the
    /// previous event.
    #[derive(Debug, Clone, Copy)]
    enum Event {
        Check(u64),
        Beat(u64),
    }

    fn any_events() -> impl Strategy<Value = Vec<Event>> {
        let event = prop_oneof![
            3 => (0u64..20_000).prop_map(Event::Check),
            1 => (0u64..20_000).prop_map(Event::Beat),
        ];
        prop::collection::vec(event, 0..40)
    }

    proptest! {
        /// No worker is SUSPECT or DEAD before one heartbeat timeout of silence.
        #[test]
        fn nothing_happens_within_one_timeout(
            state in any_state(), idle in any::<bool>(), timeouts in any_timeouts(), frac in 0.0f64..=1.0,
        ) {
            prop_assume!(state != WorkerState::Dead);
            let t0 = Instant::now();
            let o = Observed { state, last_heartbeat: t0, dead_since: None, idle };
            let now = t0 + timeouts.heartbeat.mul_f64(frac);
            prop_assert_eq!(next_state(&o, now, &timeouts), Transition::Stay);
        }

        /// Never DEAD before 3x the heartbeat timeout of silence, except a DRAINING worker that
        /// holds nothing and closed its stream, which has left after one.
        #[test]
        fn never_dead_before_three_timeouts_unless_it_left(
            state in any_state(), idle in any::<bool>(), timeouts in any_timeouts(), silent in 0u64..30_000,
        ) {
            let t0 = Instant::now();
            let o = Observed { state, last_heartbeat: t0, dead_since: None, idle };
            let silent = ms(silent);
            match next_state(&o, t0 + silent, &timeouts) {
                Transition::Dead => prop_assert!(silent > timeouts.heartbeat * 3),
                Transition::Left => {
                    prop_assert!(state == WorkerState::Draining && idle);
                    prop_assert!(silent > timeouts.heartbeat);
                }
                Transition::Suspect => {
                    prop_assert_eq!(state, WorkerState::Active);
                    prop_assert!(silent > timeouts.heartbeat && silent <= timeouts.heartbeat * 3);
                }
                Transition::Stay | Transition::Forget => {}
            }
        }

        /// After 3x the heartbeat timeout of silence every live worker is DEAD (or has left).
        #[test]
        fn always_dead_after_three_timeouts(
            state in any_state(), idle in any::<bool>(), timeouts in any_timeouts(), extra in 1u64..30_000,
        ) {
            prop_assume!(state != WorkerState::Dead);
            let t0 = Instant::now();
            let o = Observed { state, last_heartbeat: t0, dead_since: None, idle };
            let t = next_state(&o, t0 + timeouts.heartbeat * 3 + ms(extra), &timeouts);
            prop_assert_eq!(t.to(), Some(WorkerState::Dead));
            prop_assert_eq!(t == Transition::Left, state == WorkerState::Draining && idle);
        }

        /// The decision depends only on elapsed time: shifting every instant by the same amount
        /// changes nothing.
        #[test]
        fn only_elapsed_time_matters(
            state in any_state(), idle in any::<bool>(), timeouts in any_timeouts(),
            silent in 0u64..30_000, dead_for in 0u64..30_000, shift in 0u64..1_000_000,
        ) {
            let t0 = Instant::now();
            let at = |base: Instant| {
                let now = base + ms(30_000);
                let o = Observed {
                    state,
                    last_heartbeat: now - ms(silent),
                    dead_since: (state == WorkerState::Dead).then(|| now - ms(dead_for)),
                    idle,
                };
                next_state(&o, now, &timeouts)
            };
            prop_assert_eq!(at(t0), at(t0 + ms(shift)));
        }

        /// Without a heartbeat, later never means a less advanced decision.
        #[test]
        fn monotone_in_time_without_a_heartbeat(
            state in any_state(), idle in any::<bool>(), timeouts in any_timeouts(),
            a in 0u64..30_000, b in 0u64..30_000,
        ) {
            let (early, late) = (a.min(b), a.max(b));
            let t0 = Instant::now();
            let o = Observed { state, last_heartbeat: t0, dead_since: (state == WorkerState::Dead).then_some(t0), idle };
            let (x, y) = (next_state(&o, t0 + ms(early), &timeouts), next_state(&o, t0 + ms(late), &timeouts));
            prop_assert!(rank(x) <= rank(y), "{:?} at {} ms, then {:?} at {} ms", x, early, y, late);
        }

        /// DEAD is terminal: the timer only ever forgets a DEAD worker, after the cleanup
        /// interval, and a heartbeat cannot bring it back.
        #[test]
        fn dead_is_terminal(
            idle in any::<bool>(), timeouts in any_timeouts(), silent in 0u64..100_000, dead_for in 0u64..100_000,
        ) {
            let now = Instant::now() + ms(100_000);
            let o = Observed {
                state: WorkerState::Dead,
                last_heartbeat: now - ms(silent),
                dead_since: Some(now - ms(dead_for)),
                idle,
            };
            let t = next_state(&o, now, &timeouts);
            prop_assert_eq!(t.to(), None);
            prop_assert_eq!(t == Transition::Forget, ms(dead_for) > timeouts.cleanup);
            prop_assert_eq!(on_heartbeat(WorkerState::Dead), Heartbeat::Refused);
        }

        /// A heartbeat always brings a SUSPECT worker back to ACTIVE, whatever the silence before
        /// it, and the timer leaves it ACTIVE for the next heartbeat timeout.
        #[test]
        fn a_heartbeat_brings_a_suspect_worker_back(
            timeouts in any_timeouts(), frac in 0.0f64..=1.0,
        ) {
            let beat = on_heartbeat(WorkerState::Suspect);
            prop_assert_eq!(beat, Heartbeat::Revived);
            let state = beat.state_after(WorkerState::Suspect).unwrap();
            prop_assert_eq!(state, WorkerState::Active);
            let t0 = Instant::now();
            let o = Observed { state, last_heartbeat: t0, dead_since: None, idle: false };
            prop_assert_eq!(next_state(&o, t0 + timeouts.heartbeat.mul_f64(frac), &timeouts), Transition::Stay);
        }

        /// Driving one session through random checks and heartbeats, as the registry does, only
        /// ever takes the machine's edges: the timer moves forward, only a heartbeat moves back
        /// (SUSPECT -> ACTIVE), DRAINING never becomes SUSPECT, and nothing leaves DEAD but
        /// being forgotten.
        #[test]
        fn a_session_only_takes_the_machines_edges(
            start in prop::sample::select(vec![WorkerState::Active, WorkerState::Draining]),
            idle in any::<bool>(), timeouts in any_timeouts(), events in any_events(),
        ) {
            let mut now = Instant::now();
            let mut w = Observed { state: start, last_heartbeat: now, dead_since: None, idle };
            for event in events {
                let from = w.state;
                match event {
                    Event::Check(dt) => {
                        now += ms(dt);
                        let t = next_state(&w, now, &timeouts);
                        if t == Transition::Forget {
                            prop_assert_eq!(from, WorkerState::Dead);
                            break;
                        }
                        if let Some(to) = t.to() {
                            let edge = (from, to);
                            prop_assert!(
                                matches!(
                                    edge,
                                    (WorkerState::Active, WorkerState::Suspect)
                                        | (WorkerState::Active | WorkerState::Suspect | WorkerState::Draining, WorkerState::Dead)
                                ),
                                "timer edge {:?}", edge
                            );
                            w.state = to;
                            if to == WorkerState::Dead {
                                w.dead_since = Some(now);
                            }
                        }
                    }
                    Event::Beat(dt) => {
                        now += ms(dt);
                        match on_heartbeat(from) {
                            Heartbeat::Refused => prop_assert_eq!(from, WorkerState::Dead),
                            beat => {
                                w.last_heartbeat = now;
                                w.state = beat.state_after(from).unwrap();
                                prop_assert!(
                                    w.state == from || (from, w.state) == (WorkerState::Suspect, WorkerState::Active),
                                    "heartbeat edge {:?} -> {:?}", from, w.state
                                );
                            }
                        }
                    }
                }
                // What the state says about the silence since the last heartbeat.
                let silent = now.saturating_duration_since(w.last_heartbeat);
                match w.state {
                    WorkerState::Suspect => prop_assert!(silent > timeouts.heartbeat),
                    WorkerState::Dead => prop_assert!(silent > timeouts.heartbeat),
                    WorkerState::Active | WorkerState::Draining => {}
                }
                prop_assert!(w.state != WorkerState::Draining || start == WorkerState::Draining);
            }
        }
    }
}
