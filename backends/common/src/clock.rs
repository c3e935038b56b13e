//! The one place services read the time from. Production uses the system
//! clock; tests use a manual clock they move forward, so renewals,
//! expiries, grace periods and backoffs can be tested without sleeping:
//! either one that stands still until moved ([`Clock::manual`]) or one
//! that runs with the system clock and can jump ahead ([`Clock::shifted`],
//! for end-to-end tests where retries must still come due by themselves).
//!
//! Background tasks wait with [`Clock::tick`]: a real interval, cut short
//! whenever a manual clock is moved, so a test that advances the clock by
//! a month sees the scheduler act at once.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

/// A clock: Unix milliseconds, now. Cheap to clone.
#[derive(Clone)]
pub struct Clock(Arc<Inner>);

enum Inner {
    System,
    /// `value` is the time, or with `follows` the offset from the system
    /// clock.
    Manual {
        value: AtomicI64,
        follows: bool,
        /// Counts moves: a [`Ticker`] sees every move, also one made
        /// while its task was busy.
        moved: watch::Sender<u64>,
    },
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &*self.0 {
            Inner::System => f.write_str("Clock::System"),
            Inner::Manual { follows, .. } => {
                let kind = if *follows { "Shifted" } else { "Manual" };
                write!(f, "Clock::{kind}({})", self.now_ms())
            }
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::system()
    }
}

/// The system clock's Unix milliseconds.
pub fn system_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self(Arc::new(Inner::System))
    }

    /// A clock that stands at `start_ms` until moved.
    pub fn manual(start_ms: i64) -> Self {
        Self(Arc::new(Inner::Manual {
            value: AtomicI64::new(start_ms),
            follows: false,
            moved: watch::Sender::new(0),
        }))
    }

    /// A clock that runs with the system clock and can be moved ahead of
    /// it ([`Clock::advance`]).
    pub fn shifted() -> Self {
        Self(Arc::new(Inner::Manual {
            value: AtomicI64::new(0),
            follows: true,
            moved: watch::Sender::new(0),
        }))
    }

    /// A manual clock starting at the system's time now.
    pub fn manual_now() -> Self {
        Self::manual(system_now_ms())
    }

    /// Unix milliseconds.
    pub fn now_ms(&self) -> i64 {
        match &*self.0 {
            Inner::System => system_now_ms(),
            Inner::Manual { value, follows, .. } => {
                let v = value.load(Ordering::Acquire);
                if *follows {
                    system_now_ms().saturating_add(v)
                } else {
                    v
                }
            }
        }
    }

    /// Whether this is a manual clock.
    pub fn is_manual(&self) -> bool {
        matches!(&*self.0, Inner::Manual { .. })
    }

    /// Moves a manual clock forward by `by` (and wakes [`Clock::tick`]
    /// waiters). `false` (and nothing happens) on the system clock.
    pub fn advance(&self, by: Duration) -> bool {
        let by = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        match &*self.0 {
            Inner::System => false,
            Inner::Manual { value, moved, .. } => {
                let _ = value.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                    Some(v.saturating_add(by))
                });
                moved.send_modify(|n| *n = n.wrapping_add(1));
                true
            }
        }
    }

    /// Sets a manual clock to `ms` (it never moves backwards: an earlier
    /// time is ignored). `false` on the system clock.
    pub fn set(&self, ms: i64) -> bool {
        match &*self.0 {
            Inner::System => false,
            Inner::Manual {
                value,
                follows,
                moved,
            } => {
                let target = if *follows {
                    ms.saturating_sub(system_now_ms())
                } else {
                    ms
                };
                value.fetch_max(target, Ordering::AcqRel);
                moved.send_modify(|n| *n = n.wrapping_add(1));
                true
            }
        }
    }

    /// Waits `interval` of real time, or less when a manual clock is
    /// moved meanwhile. A loop waits on a [`Ticker`] instead, which also
    /// sees a move made while the loop was busy.
    pub async fn tick(&self, interval: Duration) {
        self.ticker().tick(interval).await;
    }

    /// A waiter for a periodic task: [`Ticker::tick`] returns after its
    /// interval, or at once when a manual clock moved since the last one.
    pub fn ticker(&self) -> Ticker {
        Ticker {
            moves: match &*self.0 {
                Inner::System => None,
                Inner::Manual { moved, .. } => Some(moved.subscribe()),
            },
        }
    }
}

/// See [`Clock::ticker`].
pub struct Ticker {
    moves: Option<watch::Receiver<u64>>,
}

impl Ticker {
    /// Waits `interval` of real time, or less when the (manual) clock has
    /// moved since this ticker last returned.
    pub async fn tick(&mut self, interval: Duration) {
        match &mut self.moves {
            None => tokio::time::sleep(interval).await,
            Some(rx) => {
                if let Ok(Ok(())) = tokio::time::timeout(interval, rx.changed()).await {
                    rx.borrow_and_update();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_manual_clock_moves_only_forward() {
        let c = Clock::manual(1_000);
        assert_eq!(c.now_ms(), 1_000);
        assert!(c.advance(Duration::from_secs(2)));
        assert_eq!(c.now_ms(), 3_000);
        c.set(500);
        assert_eq!(c.now_ms(), 3_000, "never backwards");
        let shifted = Clock::shifted();
        let before = system_now_ms();
        assert!(shifted.advance(Duration::from_secs(3600)));
        let t = shifted.now_ms();
        assert!(t >= before + 3_600_000 && t < system_now_ms() + 3_600_000 + 1_000);
        shifted.set(before);
        assert!(shifted.now_ms() >= t, "never backwards");
        assert!(format!("{shifted:?}").starts_with("Clock::Shifted("));
        let system = Clock::system();
        assert!(!system.advance(Duration::from_secs(1)));
        assert!((system.now_ms() - system_now_ms()).abs() < 1_000);
    }

    #[tokio::test]
    async fn test_a_ticker_sees_a_move_made_while_it_was_busy() {
        let c = Clock::manual(0);
        let mut ticker = c.ticker();
        c.advance(Duration::from_secs(1));
        // Not waiting when the clock moved: the next tick returns at once.
        tokio::time::timeout(
            Duration::from_secs(10),
            ticker.tick(Duration::from_secs(3600)),
        )
        .await
        .expect("the move was seen");
        // Seen once: the following tick waits its interval.
        assert!(tokio::time::timeout(
            Duration::from_millis(50),
            ticker.tick(Duration::from_secs(3600))
        )
        .await
        .is_err());
    }

    #[tokio::test]
    async fn test_tick_returns_early_when_a_manual_clock_moves() {
        let c = Clock::manual(0);
        let waiter = {
            let c = c.clone();
            tokio::spawn(async move { c.tick(Duration::from_secs(3600)).await })
        };
        // The waiter may not be registered yet: keep moving until it ends.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !waiter.is_finished() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "tick did not return"
            );
            c.advance(Duration::from_secs(1));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
