//! Per-backend circuit breaker, lock-free.
//!
//! ```text
//!            N consecutive failures, or failure ratio ≥ R
//!            over the rolling window with ≥ V requests
//!   CLOSED ─────────────────────────────────────────────► OPEN
//!     ▲                                                    │  no traffic for
//!     │ M probes succeed                                   │  `open_for` (doubles
//!     │                                                    ▼  each re-open, to a cap)
//!   HALF-OPEN ◄───────────────── open_for elapsed ─────── OPEN
//!     │  at most M probes in flight
//!     └── a probe fails ──► OPEN (open_for × 2, capped)
//! ```
//!
//! A failure is a connect error, a timeout, or a response status from the
//! configured list (502/503/504 by default). The rolling window is ten
//! buckets, each one `AtomicU64` packing (bucket number, failures, total).

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

static CLOCK_START: LazyLock<Instant> = LazyLock::new(Instant::now);

/// The breakers' clock: nanoseconds since the first call (monotonic).
pub fn now_ns() -> u64 {
    CLOCK_START.elapsed().as_nanos() as u64
}

/// Breaker settings of a pool.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerSettings {
    /// Whether the breaker acts at all.
    pub enabled: bool,
    /// Consecutive failures that open it.
    pub consecutive_failures: u32,
    /// Failure ratio (0..=1] over the window that opens it.
    pub failure_ratio: f64,
    /// Rolling window of the ratio.
    pub window: Duration,
    /// Requests needed in the window before the ratio counts.
    pub min_requests: u32,
    /// First open duration.
    pub open_for: Duration,
    /// Longest open duration (after repeated re-opens).
    pub max_open_for: Duration,
    /// Successful probes that close it (also the most probes in flight).
    pub half_open_probes: u32,
    /// Upstream statuses that count as failures.
    pub failure_statuses: Vec<u16>,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            consecutive_failures: 5,
            failure_ratio: 0.5,
            window: Duration::from_secs(10),
            min_requests: 20,
            open_for: Duration::from_secs(5),
            max_open_for: Duration::from_secs(60),
            half_open_probes: 3,
            failure_statuses: vec![502, 503, 504],
        }
    }
}

/// The breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Traffic flows.
    Closed,
    /// No traffic until the open duration has passed.
    Open,
    /// A few probe requests decide.
    HalfOpen,
}

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;
const BUCKETS: usize = 10;
const COUNT_BITS: u32 = 20;
const COUNT_MAX: u64 = (1 << COUNT_BITS) - 1;
const TAG_MASK: u64 = (1 << 24) - 1;

/// One backend's breaker. Times are nanoseconds on the caller's clock.
#[derive(Debug)]
pub struct Breaker {
    state: AtomicU8,
    consecutive: AtomicU32,
    opened_at: AtomicU64,
    open_for: AtomicU64,
    probes_in_flight: AtomicU32,
    probe_successes: AtomicU32,
    buckets: [AtomicU64; BUCKETS],
}

impl Default for Breaker {
    fn default() -> Self {
        Self {
            state: AtomicU8::new(CLOSED),
            consecutive: AtomicU32::new(0),
            opened_at: AtomicU64::new(0),
            open_for: AtomicU64::new(0),
            probes_in_flight: AtomicU32::new(0),
            probe_successes: AtomicU32::new(0),
            buckets: Default::default(),
        }
    }
}

/// What `acquire` granted: a normal request or a half-open probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    /// Closed breaker.
    Normal,
    /// A half-open probe (its outcome decides).
    Probe,
}

impl Breaker {
    /// The current state.
    pub fn state(&self) -> BreakerState {
        match self.state.load(Ordering::Acquire) {
            OPEN => BreakerState::Open,
            HALF_OPEN => BreakerState::HalfOpen,
            _ => BreakerState::Closed,
        }
    }

    /// Consecutive failures seen.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive.load(Ordering::Relaxed)
    }

    /// Whether a request may be sent now (without taking a probe slot):
    /// `Err(wait)` while open.
    pub fn available(&self, s: &BreakerSettings, now: u64) -> Result<(), Duration> {
        if !s.enabled {
            return Ok(());
        }
        match self.state.load(Ordering::Acquire) {
            OPEN => {
                let until =
                    self.opened_at.load(Ordering::Acquire) + self.open_for.load(Ordering::Acquire);
                if now >= until {
                    Ok(())
                } else {
                    Err(Duration::from_nanos(until - now))
                }
            }
            HALF_OPEN => {
                if self.probes_in_flight.load(Ordering::Acquire) < s.half_open_probes {
                    Ok(())
                } else {
                    Err(Duration::from_millis(100))
                }
            }
            _ => Ok(()),
        }
    }

    /// Takes the right to send a request: always when closed; a probe slot
    /// when half-open (an open breaker whose time is up turns half-open
    /// here). `None` when no request may be sent.
    pub fn acquire(&self, s: &BreakerSettings, now: u64) -> Option<Permit> {
        if !s.enabled {
            return Some(Permit::Normal);
        }
        loop {
            match self.state.load(Ordering::Acquire) {
                CLOSED => return Some(Permit::Normal),
                OPEN => {
                    self.available(s, now).ok()?;
                    if self
                        .state
                        .compare_exchange(OPEN, HALF_OPEN, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    {
                        self.probes_in_flight.store(0, Ordering::Release);
                        self.probe_successes.store(0, Ordering::Release);
                    }
                }
                _ => {
                    let taken = self
                        .probes_in_flight
                        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                            (p < s.half_open_probes).then_some(p + 1)
                        })
                        .is_ok();
                    return taken.then_some(Permit::Probe);
                }
            }
        }
    }

    /// Records the outcome of a request sent under `permit`.
    pub fn record(&self, s: &BreakerSettings, permit: Permit, failed: bool, now: u64) {
        if !s.enabled {
            return;
        }
        if permit == Permit::Probe {
            self.probes_in_flight.fetch_sub(1, Ordering::AcqRel);
            if self.state.load(Ordering::Acquire) != HALF_OPEN {
                return;
            }
            if failed {
                self.reopen(s, now, true);
            } else if self.probe_successes.fetch_add(1, Ordering::AcqRel) + 1 >= s.half_open_probes
                && self
                    .state
                    .compare_exchange(HALF_OPEN, CLOSED, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                self.consecutive.store(0, Ordering::Release);
                self.open_for.store(0, Ordering::Release);
                for b in &self.buckets {
                    b.store(0, Ordering::Release);
                }
            }
            return;
        }
        let (failures, total) = self.count(s, failed, now);
        if !failed {
            self.consecutive.store(0, Ordering::Release);
            return;
        }
        let consecutive = self.consecutive.fetch_add(1, Ordering::AcqRel) + 1;
        let ratio_tripped = total >= u64::from(s.min_requests)
            && total > 0
            && failures as f64 / total as f64 >= s.failure_ratio;
        if consecutive >= s.consecutive_failures || ratio_tripped {
            self.reopen(s, now, false);
        }
    }

    /// Closed → open, or half-open → open with a doubled duration.
    fn reopen(&self, s: &BreakerSettings, now: u64, from_half_open: bool) {
        let from = if from_half_open { HALF_OPEN } else { CLOSED };
        if self
            .state
            .compare_exchange(from, OPEN, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        let base = s.open_for.as_nanos() as u64;
        let max = s.max_open_for.as_nanos() as u64;
        let previous = self.open_for.load(Ordering::Acquire);
        let next = if from_half_open && previous > 0 {
            previous.saturating_mul(2).min(max)
        } else {
            base.min(max)
        };
        self.open_for.store(next, Ordering::Release);
        self.opened_at.store(now, Ordering::Release);
    }

    /// Adds one outcome to the rolling window; returns (failures, total)
    /// over the window.
    fn count(&self, s: &BreakerSettings, failed: bool, now: u64) -> (u64, u64) {
        let width = (s.window.as_nanos() as u64 / BUCKETS as u64).max(1);
        let epoch = now / width;
        let tag = epoch & TAG_MASK;
        let slot = &self.buckets[(epoch % BUCKETS as u64) as usize];
        let _ = slot.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            let (t, f, n) = unpack(v);
            let (f, n) = if t == tag { (f, n) } else { (0, 0) };
            Some(pack(
                tag,
                (f + u64::from(failed)).min(COUNT_MAX),
                (n + 1).min(COUNT_MAX),
            ))
        });
        self.buckets.iter().fold((0, 0), |(f_sum, n_sum), b| {
            let (t, f, n) = unpack(b.load(Ordering::Acquire));
            let age = tag.wrapping_sub(t) & TAG_MASK;
            if age < BUCKETS as u64 {
                (f_sum + f, n_sum + n)
            } else {
                (f_sum, n_sum)
            }
        })
    }

    /// Ends an open period now, so the next requests are half-open probes
    /// (a backend that passed its health checks again after failing them).
    /// The back-off starts over: a failed probe reopens for `open_for`.
    pub fn end_open_period(&self, now: u64) {
        if self.state.load(Ordering::Acquire) == OPEN {
            self.open_for.store(0, Ordering::Release);
            self.opened_at.store(now, Ordering::Release);
        }
    }

    /// Until when it stays open (for `Retry-After`), if open.
    pub fn open_remaining(&self, now: u64) -> Option<Duration> {
        (self.state.load(Ordering::Acquire) == OPEN).then(|| {
            let until =
                self.opened_at.load(Ordering::Acquire) + self.open_for.load(Ordering::Acquire);
            Duration::from_nanos(until.saturating_sub(now))
        })
    }
}

fn pack(tag: u64, failures: u64, total: u64) -> u64 {
    (tag << (2 * COUNT_BITS)) | (failures << COUNT_BITS) | total
}

fn unpack(v: u64) -> (u64, u64, u64) {
    (
        v >> (2 * COUNT_BITS),
        (v >> COUNT_BITS) & COUNT_MAX,
        v & COUNT_MAX,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn settings() -> BreakerSettings {
        BreakerSettings {
            open_for: Duration::from_millis(100),
            max_open_for: Duration::from_millis(400),
            ..BreakerSettings::default()
        }
    }

    fn send(b: &Breaker, s: &BreakerSettings, failed: bool, now: u64) -> Option<Permit> {
        let p = b.acquire(s, now)?;
        b.record(s, p, failed, now);
        Some(p)
    }

    #[test]
    fn test_consecutive_failures_open_then_probes_close() {
        let s = settings();
        let b = Breaker::default();
        for i in 0..4 {
            send(&b, &s, true, i * MS);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        send(&b, &s, true, 5 * MS);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.acquire(&s, 50 * MS).is_none(), "no traffic while open");
        assert_eq!(b.available(&s, 50 * MS), Err(Duration::from_millis(55)));
        // After open_for: half-open, at most 3 probes at once.
        let probes: Vec<_> = (0..4).map(|_| b.acquire(&s, 106 * MS)).collect();
        assert_eq!(
            probes.iter().filter(|p| **p == Some(Permit::Probe)).count(),
            3
        );
        assert_eq!(probes[3], None);
        for _ in 0..3 {
            b.record(&s, Permit::Probe, false, 110 * MS);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.consecutive_failures(), 0);
    }

    #[test]
    fn test_failed_probe_reopens_with_doubling_capped_duration() {
        let s = settings();
        let b = Breaker::default();
        for i in 0..5 {
            send(&b, &s, true, i * MS);
        }
        let mut now = 4 * MS;
        for expected in [200, 400, 400] {
            now += 1_000 * MS;
            assert_eq!(send(&b, &s, true, now), Some(Permit::Probe));
            assert_eq!(b.state(), BreakerState::Open);
            assert_eq!(b.open_remaining(now), Some(Duration::from_millis(expected)));
        }
    }

    #[test]
    fn test_failure_ratio_over_window_needs_minimum_volume() {
        let s = BreakerSettings {
            consecutive_failures: 1000,
            ..settings()
        };
        let b = Breaker::default();
        // Alternate: 50% failures but never 5 in a row; opens at 20 requests.
        for i in 0..19u64 {
            send(&b, &s, i % 2 == 0, i * MS);
            assert_eq!(b.state(), BreakerState::Closed, "request {i}");
        }
        send(&b, &s, true, 19 * MS);
        assert_eq!(b.state(), BreakerState::Open);
        // Old outcomes fall out of the window.
        let b = Breaker::default();
        for i in 0..10u64 {
            send(&b, &s, true, i * MS);
            send(&b, &s, false, i * MS);
            send(&b, &s, false, i * MS);
        }
        assert_eq!(
            b.state(),
            BreakerState::Closed,
            "a third failing is under 50%"
        );
        for i in 0..10u64 {
            send(&b, &s, false, 20_000 * MS + i * MS);
        }
        send(&b, &s, true, 20_000 * MS + 20 * MS);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn test_ending_the_open_period_starts_probes_at_once() {
        let s = settings();
        let b = Breaker::default();
        for i in 0..5 {
            send(&b, &s, true, i * MS);
        }
        assert!(b.available(&s, 10 * MS).is_err());
        // Early in the process's clock too (now < open_for).
        b.end_open_period(10 * MS);
        assert_eq!(b.available(&s, 10 * MS), Ok(()));
        assert_eq!(b.acquire(&s, 10 * MS), Some(Permit::Probe));
        // A failed probe reopens for the base duration, not a doubled one.
        b.record(&s, Permit::Probe, true, 20 * MS);
        assert_eq!(b.available(&s, 20 * MS), Err(Duration::from_millis(100)));
        // A closed breaker is left alone.
        let closed = Breaker::default();
        closed.end_open_period(5 * MS);
        assert_eq!(closed.state(), BreakerState::Closed);
    }

    /// What `tests/e2e/resilience.rs` sees through the gateway, exactly:
    /// 3 consecutive failures open for 400 ms; nothing passes meanwhile; one
    /// probe, failing, reopens for 800 ms before a second is granted; after
    /// that two good probes close it.
    #[test]
    fn test_sequential_traffic_sees_exactly_the_threshold_then_single_probes() {
        let s = BreakerSettings {
            consecutive_failures: 3,
            open_for: Duration::from_millis(400),
            half_open_probes: 2,
            ..BreakerSettings::default()
        };
        let b = Breaker::default();
        let mut passed = 0;
        for i in 0..40u64 {
            if send(&b, &s, true, i * MS).is_some() {
                passed += 1;
            }
        }
        assert_eq!(passed, 3, "only the threshold's requests reach it");
        assert_eq!(b.state(), BreakerState::Open);
        let opened = 2 * MS;
        let probe_at = opened + 450 * MS;
        assert_eq!(send(&b, &s, true, probe_at), Some(Permit::Probe));
        assert_eq!(
            b.acquire(&s, probe_at),
            None,
            "the failed probe reopened it"
        );
        assert_eq!(b.open_remaining(probe_at), Some(Duration::from_millis(800)));
        assert_eq!(b.acquire(&s, probe_at + 799 * MS), None);
        let later = probe_at + 850 * MS;
        assert_eq!(send(&b, &s, false, later), Some(Permit::Probe));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(send(&b, &s, false, later), Some(Permit::Probe));
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(send(&b, &s, false, later), Some(Permit::Normal));
    }

    #[test]
    fn test_disabled_breaker_never_opens() {
        let s = BreakerSettings {
            enabled: false,
            ..settings()
        };
        let b = Breaker::default();
        for i in 0..100 {
            assert_eq!(send(&b, &s, true, i * MS), Some(Permit::Normal));
        }
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
