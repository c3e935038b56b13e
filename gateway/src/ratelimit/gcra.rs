//! Lock-free multi-window token buckets, as GCRA (the generic cell rate
//! algorithm): each window of a key is one `AtomicU64` holding its
//! *theoretical arrival time* (TAT) in nanoseconds. A bucket of `limit`
//! tokens refilled over `period` is equivalent to: each request pushes the
//! TAT forward by `T = period / limit`; a request is admitted while the TAT
//! stays at most `limit × T` ahead of now. So the state of a bucket is one
//! number, and a decision is one compare-and-swap — no lock, no timer, no
//! refill task.
//!
//! A request must pass every window of its policy (minute, hour, day). The
//! windows are committed one by one; when a later commit loses a race, the
//! earlier ones are given their token back and the whole decision is retried,
//! so concurrent requests on one key never overspend any window.
//!
//! Callers keep one state per (key, policy): a user whose token carries a
//! new tier then gets the new tier's full bucket on the very next request
//! (carrying the old state over would measure FREE's debt in PREMIUM's
//! time and block the upgraded user); the old state is evicted once idle.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The most windows one policy may have (minute, hour, day).
pub const MAX_WINDOWS: usize = 3;

/// Attempts before a decision on a heavily contended key gives up and
/// rejects (a reject is always safe; an over-admit is not).
const MAX_RACES: usize = 16;

/// One rate: `limit` requests per `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    limit: u64,
    period: Duration,
    /// Emission interval `T` in ns (≥ 1).
    interval: u64,
    /// Capacity in time: `limit × T` ns.
    tolerance: u64,
}

impl Window {
    /// `limit` requests per `period`; `None` when either is zero (such a
    /// window could never admit anything, which config validation rejects).
    pub fn new(limit: u64, period: Duration) -> Option<Self> {
        let period_ns = u64::try_from(period.as_nanos()).ok()?;
        if limit == 0 || period_ns == 0 {
            return None;
        }
        let interval = (period_ns / limit).max(1);
        Some(Self {
            limit,
            period,
            interval,
            tolerance: interval.saturating_mul(limit),
        })
    }

    /// Requests allowed per period.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// The period.
    pub fn period(&self) -> Duration {
        self.period
    }
}

/// The windows a key must pass, e.g. a tier's minute/hour/day limits.
/// Unlimited windows are simply absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    windows: Vec<Window>,
}

impl Policy {
    /// A policy of up to [`MAX_WINDOWS`] windows (extra ones are ignored).
    pub fn new(mut windows: Vec<Window>) -> Self {
        windows.truncate(MAX_WINDOWS);
        Self { windows }
    }

    /// The windows, in the order given.
    pub fn windows(&self) -> &[Window] {
        &self.windows
    }
}

/// The limiter state of one key: one TAT per window slot.
#[derive(Debug, Default)]
pub struct KeyState {
    tat: [AtomicU64; MAX_WINDOWS],
}

/// Where one window stands after a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowStatus {
    /// The window's position in the policy.
    pub index: usize,
    /// The window's limit.
    pub limit: u64,
    /// Its period.
    pub period: Duration,
    /// Requests still allowed now.
    pub remaining: u64,
    /// Time until the bucket is full again.
    pub reset: Duration,
}

/// The outcome of [`Policy::check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request may proceed (it has been counted if so).
    pub allowed: bool,
    /// When rejected: how long until it would be admitted.
    pub retry_after: Duration,
    /// The window with the fewest requests remaining (the tightest); `None`
    /// for a policy without windows (unlimited).
    pub tightest: Option<WindowStatus>,
}

impl Policy {
    /// How long until a request on `state` would be admitted (zero: now),
    /// without counting anything.
    pub fn wait_time(&self, state: &KeyState, now_ns: u64) -> Duration {
        let mut wait = 0u64;
        for (i, w) in self.windows.iter().enumerate() {
            let next = state.tat[i].load(Ordering::Acquire).max(now_ns) + w.interval;
            wait = wait.max((next - now_ns).saturating_sub(w.tolerance));
        }
        Duration::from_nanos(wait)
    }

    /// Decides one request for `state` at `now_ns` (any monotonic clock in
    /// nanoseconds, the same for every call on this state) and, when it is
    /// admitted, counts it in every window.
    pub fn check(&self, state: &KeyState, now_ns: u64) -> Decision {
        if self.windows.is_empty() {
            return Decision {
                allowed: true,
                retry_after: Duration::ZERO,
                tightest: None,
            };
        }
        for _ in 0..MAX_RACES {
            let mut observed = [0u64; MAX_WINDOWS];
            let mut proposed = [0u64; MAX_WINDOWS];
            let mut retry_after = 0u64;
            for (i, w) in self.windows.iter().enumerate() {
                let tat = state.tat[i].load(Ordering::Acquire);
                let start = tat.max(now_ns);
                let next = start.saturating_add(w.interval);
                observed[i] = tat;
                proposed[i] = next;
                if next - now_ns > w.tolerance {
                    // Admitted once the TAT has fallen back to tolerance - T.
                    retry_after = retry_after.max(next - now_ns - w.tolerance);
                }
            }
            if retry_after > 0 {
                return Decision {
                    allowed: false,
                    retry_after: Duration::from_nanos(retry_after),
                    tightest: self.tightest(&observed, now_ns),
                };
            }
            if self.commit(state, &observed, &proposed) {
                return Decision {
                    allowed: true,
                    retry_after: Duration::ZERO,
                    tightest: self.tightest(&proposed, now_ns),
                };
            }
        }
        // Lost every race: the key is hammered concurrently. Rejecting is
        // safe; it cannot overspend.
        let w = &self.windows[0];
        Decision {
            allowed: false,
            retry_after: Duration::from_nanos(w.interval),
            tightest: None,
        }
    }

    /// Swaps in every proposed TAT, or none: a lost race undoes the windows
    /// already committed (each gets back exactly the one token it gave).
    fn commit(&self, state: &KeyState, observed: &[u64], proposed: &[u64]) -> bool {
        for i in 0..self.windows.len() {
            let won = state.tat[i]
                .compare_exchange(
                    observed[i],
                    proposed[i],
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok();
            if !won {
                for (j, earlier) in self.windows.iter().enumerate().take(i) {
                    state.tat[j].fetch_sub(earlier.interval, Ordering::AcqRel);
                }
                return false;
            }
        }
        true
    }

    fn tightest(&self, tats: &[u64], now_ns: u64) -> Option<WindowStatus> {
        self.windows
            .iter()
            .zip(tats)
            .enumerate()
            .map(|(index, (w, &tat))| {
                let debt = tat.saturating_sub(now_ns);
                WindowStatus {
                    index,
                    limit: w.limit,
                    period: w.period,
                    remaining: w.tolerance.saturating_sub(debt) / w.interval,
                    reset: Duration::from_nanos(debt),
                }
            })
            .min_by_key(|s| s.remaining)
    }
}

impl KeyState {
    /// Whether every window is full again at `now_ns`: such a key holds no
    /// information and can be evicted (a fresh state is identical).
    pub fn is_idle(&self, now_ns: u64) -> bool {
        self.tat.iter().all(|t| t.load(Ordering::Relaxed) <= now_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn free_tier() -> Policy {
        Policy::new(vec![
            Window::new(10, Duration::from_secs(60)).unwrap(),
            Window::new(100, Duration::from_secs(3600)).unwrap(),
            Window::new(1000, Duration::from_secs(86400)).unwrap(),
        ])
    }

    #[test]
    fn test_eleventh_request_in_a_minute_is_rejected() {
        let p = free_tier();
        let s = KeyState::default();
        let now = 1_000 * SEC;
        for i in 0..10 {
            let d = p.check(&s, now);
            assert!(d.allowed, "request {i}");
            assert_eq!(d.tightest.unwrap().remaining, 9 - i);
        }
        let d = p.check(&s, now);
        assert!(!d.allowed);
        // One token comes back every 6 s.
        assert_eq!(d.retry_after, Duration::from_secs(6));
        assert_eq!(d.tightest.unwrap().limit, 10);
        assert_eq!(d.tightest.unwrap().remaining, 0);
        assert!(!p.check(&s, now + 6 * SEC - 1).allowed);
        assert!(p.check(&s, now + 6 * SEC).allowed);
    }

    #[test]
    fn test_rejected_requests_are_not_counted() {
        let p = Policy::new(vec![Window::new(2, Duration::from_secs(10)).unwrap()]);
        let s = KeyState::default();
        let now = 50 * SEC;
        assert!(p.check(&s, now).allowed);
        assert!(p.check(&s, now).allowed);
        for _ in 0..100 {
            assert!(!p.check(&s, now).allowed);
        }
        // Exactly one interval later exactly one more is allowed.
        assert!(p.check(&s, now + 5 * SEC).allowed);
        assert!(!p.check(&s, now + 5 * SEC).allowed);
    }

    #[test]
    fn test_hour_window_binds_after_minutes_refill() {
        let p = free_tier();
        let s = KeyState::default();
        let mut now = 10 * SEC;
        let mut admitted = 0;
        // One request every 6 s never trips the minute window; the hour
        // window (100) must stop it.
        for _ in 0..200 {
            if p.check(&s, now).allowed {
                admitted += 1;
            }
            now += 6 * SEC;
        }
        // 200 × 6 s = 20 min: 100 burst + 20 min of refill at 100/h ≈ 33.
        assert_eq!(admitted, 133);
    }

    #[test]
    fn test_one_state_per_policy_gives_an_upgrade_its_full_bucket() {
        let free = free_tier();
        let premium = Policy::new(vec![
            Window::new(200, Duration::from_secs(60)).unwrap(),
            Window::new(5000, Duration::from_secs(3600)).unwrap(),
            Window::new(50000, Duration::from_secs(86400)).unwrap(),
        ]);
        let (free_state, premium_state) = (KeyState::default(), KeyState::default());
        let now = 7 * SEC;
        for _ in 0..10 {
            assert!(free.check(&free_state, now).allowed);
        }
        assert!(!free.check(&free_state, now).allowed);
        let d = premium.check(&premium_state, now);
        assert!(d.allowed);
        assert_eq!(d.tightest.unwrap().limit, 200);
        assert_eq!(d.tightest.unwrap().remaining, 199);
        // Reusing FREE's state would have blocked the upgrade: its 60 s of
        // debt fills PREMIUM's whole minute window.
        assert!(!premium.check(&free_state, now).allowed);
    }

    #[test]
    fn test_idle_key_is_evictable_once_full_again() {
        let p = free_tier();
        let s = KeyState::default();
        assert!(s.is_idle(0));
        assert!(p.check(&s, 100 * SEC).allowed);
        assert!(!s.is_idle(100 * SEC));
        // The day window refills one token in 86.4 s.
        assert!(!s.is_idle(100 * SEC + 86 * SEC));
        assert!(s.is_idle(100 * SEC + 87 * SEC));
    }

    #[test]
    fn test_unlimited_policy_always_admits() {
        let p = Policy::default();
        let s = KeyState::default();
        for _ in 0..1000 {
            assert!(p.check(&s, 0).allowed);
        }
        assert!(Window::new(0, Duration::from_secs(1)).is_none());
        assert!(Window::new(5, Duration::ZERO).is_none());
    }

    #[test]
    fn test_concurrent_requests_never_overspend() {
        let p = std::sync::Arc::new(Policy::new(vec![
            Window::new(1000, Duration::from_secs(60)).unwrap(),
            Window::new(1500, Duration::from_secs(3600)).unwrap(),
        ]));
        let s = std::sync::Arc::new(KeyState::default());
        let now = 3600 * SEC;
        let admitted = std::sync::Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (p, s, admitted) = (p.clone(), s.clone(), admitted.clone());
                std::thread::spawn(move || {
                    for _ in 0..2000 {
                        if p.check(&s, now).allowed {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // At one instant, exactly the minute window's capacity; never more.
        let n = admitted.load(Ordering::Relaxed);
        assert!(n <= 1000, "admitted {n}");
        assert!(n >= 990, "admitted {n}: too many lost races");
    }
}
