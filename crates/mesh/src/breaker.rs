//! A circuit breaker for one upstream instance: closed (calls flow), open
//! (calls fail fast; the instance is ejected), half-open (one probe call
//! decides). It opens after `consecutive` failures in a row, or when at
//! least half of the last `window` calls failed (with `min_calls` seen).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

/// When a breaker opens and for how long.
#[derive(Debug, Clone, Copy)]
pub struct BreakerSettings {
    /// Failures in a row that open it.
    pub consecutive: u32,
    /// Outcomes remembered for the failure rate.
    pub window: usize,
    /// Outcomes needed before the failure rate counts.
    pub min_calls: usize,
    /// How long it stays open before a probe is let through.
    pub open_for: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            consecutive: 3,
            window: 20,
            min_calls: 10,
            open_for: Duration::from_secs(5),
        }
    }
}

#[derive(Debug)]
struct Inner {
    state: BreakerState,
    consecutive: u32,
    window: VecDeque<bool>,
    opened_at: Instant,
    probing: bool,
}

#[derive(Debug)]
pub struct Breaker {
    settings: BreakerSettings,
    inner: Mutex<Inner>,
}

impl Breaker {
    pub fn new(settings: BreakerSettings) -> Self {
        Self {
            settings,
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                consecutive: 0,
                window: VecDeque::with_capacity(settings.window),
                opened_at: Instant::now(),
                probing: false,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The state, with an open breaker whose time is up shown half-open.
    pub fn state(&self) -> BreakerState {
        self.state_at(Instant::now())
    }

    /// [`Breaker::state`] at `now`.
    pub fn state_at(&self, now: Instant) -> BreakerState {
        let inner = self.lock();
        match inner.state {
            BreakerState::Open if self.time_up(&inner, now) => BreakerState::HalfOpen,
            s => s,
        }
    }

    /// Whether a call could be let through now (without claiming the probe).
    pub fn available(&self) -> bool {
        let inner = self.lock();
        match inner.state {
            BreakerState::Closed => true,
            BreakerState::HalfOpen => !inner.probing,
            BreakerState::Open => self.time_up(&inner, Instant::now()),
        }
    }

    fn time_up(&self, inner: &Inner, now: Instant) -> bool {
        now.saturating_duration_since(inner.opened_at) >= self.settings.open_for
    }

    /// Claims the right to make a call: always when closed; when half-open
    /// (or open with its time up) only the one probe at a time.
    pub fn try_acquire(&self) -> bool {
        self.try_acquire_at(Instant::now())
    }

    /// [`Breaker::try_acquire`] at `now`.
    pub fn try_acquire_at(&self, now: Instant) -> bool {
        let mut inner = self.lock();
        match inner.state {
            BreakerState::Closed => true,
            BreakerState::Open if !self.time_up(&inner, now) => false,
            BreakerState::Open | BreakerState::HalfOpen => {
                if inner.probing {
                    return false;
                }
                inner.state = BreakerState::HalfOpen;
                inner.probing = true;
                true
            }
        }
    }

    /// Records a call's outcome. While open, outcomes of calls that began
    /// before it opened are ignored: only the probe decides.
    pub fn record(&self, ok: bool) {
        self.record_at(ok, Instant::now());
    }

    /// [`Breaker::record`] at `now`.
    pub fn record_at(&self, ok: bool, now: Instant) {
        let mut inner = self.lock();
        if inner.state == BreakerState::Open {
            return;
        }
        if inner.window.len() == self.settings.window {
            inner.window.pop_front();
        }
        inner.window.push_back(ok);
        if ok {
            inner.consecutive = 0;
            if inner.state != BreakerState::Closed {
                inner.state = BreakerState::Closed;
                inner.probing = false;
                inner.window.clear();
            }
            return;
        }
        inner.consecutive += 1;
        let failures = inner.window.iter().filter(|ok| !**ok).count();
        let rate_tripped =
            inner.window.len() >= self.settings.min_calls && failures * 2 >= inner.window.len();
        let trip = match inner.state {
            BreakerState::HalfOpen => true,
            BreakerState::Closed => {
                inner.consecutive >= self.settings.consecutive.max(1) || rate_tripped
            }
            BreakerState::Open => false,
        };
        if trip {
            inner.state = BreakerState::Open;
            inner.opened_at = now;
            inner.probing = false;
        }
    }

    /// An out-of-band sign of life (a passed health check): an open
    /// breaker lets its probe through now instead of waiting out its time.
    pub fn healthy_again(&self) {
        let mut inner = self.lock();
        if inner.state == BreakerState::Open {
            inner.state = BreakerState::HalfOpen;
            inner.probing = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(open_ms: u64) -> Breaker {
        Breaker::new(BreakerSettings {
            open_for: Duration::from_millis(open_ms),
            ..BreakerSettings::default()
        })
    }

    #[test]
    fn opens_after_consecutive_failures_and_probes_once() {
        let b = breaker(30);
        b.record(false);
        b.record(false);
        assert_eq!(b.state(), BreakerState::Closed);
        b.record(false);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.try_acquire());
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.try_acquire(), "the probe");
        assert!(!b.try_acquire(), "only one probe at a time");
        b.record(false);
        assert_eq!(b.state(), BreakerState::Open, "a failed probe reopens");
        std::thread::sleep(Duration::from_millis(40));
        assert!(b.try_acquire());
        b.record(true);
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.try_acquire() && b.try_acquire());
    }

    #[test]
    fn opens_on_failure_rate() {
        let b = breaker(1000);
        for i in 0..20 {
            b.record(i % 2 == 0);
        }
        assert_eq!(b.state(), BreakerState::Open);
        b.healthy_again();
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.try_acquire());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Op {
            Acquire,
            Ok,
            Fail,
            Wait(u64),
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                3 => Just(Op::Acquire),
                2 => Just(Op::Ok),
                3 => Just(Op::Fail),
                1 => (0u64..120).prop_map(Op::Wait),
            ]
        }

        proptest! {
            /// Whatever happens: a closed breaker lets every call through;
            /// an open one none until its time is up; a half-open one one
            /// probe at a time; it opens only on a failure, after
            /// `consecutive` failures in a row at the latest; the probe's
            /// outcome decides (success closes, failure reopens).
            #[test]
            fn the_state_machine_holds(ops in proptest::collection::vec(op(), 1..300)) {
                let settings = BreakerSettings {
                    consecutive: 3,
                    window: 20,
                    min_calls: 10,
                    open_for: Duration::from_millis(100),
                };
                let b = Breaker::new(settings);
                let mut now = Instant::now();
                let mut opened_at: Option<Instant> = None;
                let mut in_a_row = 0u32;
                let mut probe_out = false;
                for op in ops {
                    let before = b.state_at(now);
                    match op {
                        Op::Wait(ms) => now += Duration::from_millis(ms),
                        Op::Acquire => {
                            let got = b.try_acquire_at(now);
                            match before {
                                BreakerState::Closed => prop_assert!(got),
                                BreakerState::Open => prop_assert!(!got),
                                BreakerState::HalfOpen => {
                                    prop_assert_eq!(got, !probe_out);
                                    if got {
                                        probe_out = true;
                                    }
                                }
                            }
                        }
                        Op::Ok | Op::Fail => {
                            let ok = matches!(op, Op::Ok);
                            b.record_at(ok, now);
                            let after = b.state_at(now);
                            in_a_row = if ok { 0 } else { in_a_row + 1 };
                            match before {
                                BreakerState::Open => prop_assert_eq!(after, BreakerState::Open),
                                BreakerState::HalfOpen if probe_out => {
                                    prop_assert_eq!(after, if ok { BreakerState::Closed } else { BreakerState::Open });
                                    probe_out = false;
                                }
                                BreakerState::HalfOpen => {}
                                BreakerState::Closed => {
                                    if ok {
                                        prop_assert_eq!(after, BreakerState::Closed);
                                    } else if in_a_row >= settings.consecutive {
                                        prop_assert_eq!(after, BreakerState::Open);
                                    }
                                }
                            }
                            if after == BreakerState::Open && before != BreakerState::Open {
                                prop_assert!(!ok, "only a failure opens it");
                                opened_at = Some(now);
                                in_a_row = 0;
                            }
                            if after == BreakerState::Closed && before != BreakerState::Closed {
                                in_a_row = 0;
                            }
                        }
                    }
                    // An open breaker stays open for its whole time.
                    if let Some(at) = opened_at
                        && now.duration_since(at) < settings.open_for
                        && b.state_at(now) != BreakerState::Closed
                    {
                        prop_assert_eq!(b.state_at(now), BreakerState::Open);
                    }
                }
            }
        }
    }
}
