//! CPU-heavy work (Argon2 hashing, PDF rendering) on the blocking pool,
//! bounded: at most `permits` jobs run at once (≈ 2 × cores), and at most
//! `queue` more wait, each at most `wait`. Beyond the queue the caller
//! gets a 503 with `Retry-After` at once (and after `wait` in the queue)
//! — a burst of logins costs a bounded amount of memory (Argon2id takes
//! 19 MiB a hash), never an unbounded pile-up.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::error::ApiError;

/// A bounded gate to the blocking pool. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Bounded {
    permits: Arc<Semaphore>,
    waiting: Arc<AtomicUsize>,
    queue: usize,
    wait: Duration,
    what: &'static str,
}

/// Why a job did not run.
#[derive(Debug, thiserror::Error)]
pub enum Saturated {
    /// Every permit is taken and the queue is full (or the wait ran out).
    #[error("too many {0} jobs at once")]
    Busy(&'static str),
    /// The job panicked.
    #[error("a {0} job failed")]
    Failed(&'static str),
}

impl From<Saturated> for ApiError {
    fn from(e: Saturated) -> Self {
        match e {
            Saturated::Busy(_) => {
                ApiError::unavailable("the server is busy; try again in a second", 1)
            }
            Saturated::Failed(_) => ApiError::internal(&e),
        }
    }
}

impl Bounded {
    /// Runs at most `permits` `what` jobs at once, with at most `queue`
    /// waiting up to `wait` each.
    pub fn new(what: &'static str, permits: usize, queue: usize, wait: Duration) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(permits.max(1))),
            waiting: Arc::new(AtomicUsize::new(0)),
            queue,
            wait,
            what,
        }
    }

    /// Two jobs per CPU core, as many waiting, for up to 2 s.
    pub fn per_core(what: &'static str) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::new(what, 2 * cores, 2 * cores, Duration::from_secs(2))
    }

    /// Runs `job` on the blocking pool once a permit is free.
    pub async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Saturated> {
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let place = Waiting::enter(&self.waiting);
                if place.ahead >= self.queue {
                    return Err(Saturated::Busy(self.what));
                }
                // `place` leaves the queue when dropped, also when the
                // caller gives up (a client disconnect drops this future).
                let got =
                    tokio::time::timeout(self.wait, self.permits.clone().acquire_owned()).await;
                drop(place);
                match got {
                    Ok(Ok(p)) => p,
                    _ => return Err(Saturated::Busy(self.what)),
                }
            }
        };
        let result = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            job()
        })
        .await;
        result.map_err(|_| Saturated::Failed(self.what))
    }
}

/// A place in the queue, given back when dropped.
struct Waiting<'a> {
    count: &'a AtomicUsize,
    /// How many were waiting before this one.
    ahead: usize,
}

impl<'a> Waiting<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        let ahead = count.fetch_add(1, Ordering::AcqRel);
        Self { count, ahead }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn test_saturation_is_refused_at_once_beyond_the_queue() {
        let gate = Bounded::new("test", 1, 1, Duration::from_secs(5));
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let (started_tx, mut started_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let running = {
            let gate = gate.clone();
            tokio::spawn(async move {
                gate.run(move || {
                    let _ = started_tx.send(());
                    let _ = release_rx.recv();
                })
                .await
            })
        };
        started_rx.recv().await.unwrap();
        // One may wait...
        let queued = {
            let gate = gate.clone();
            tokio::spawn(async move { gate.run(|| 2).await })
        };
        while gate.waiting.load(Ordering::Acquire) == 0 {
            tokio::task::yield_now().await;
        }
        // ...the next is refused without waiting.
        let refused = gate.run(|| 3).await;
        assert!(matches!(refused, Err(Saturated::Busy("test"))));
        let api: ApiError = refused.unwrap_err().into();
        assert_eq!(api.status().as_u16(), 503);
        // A waiter that gives up (its request was dropped) frees its place.
        queued.abort();
        let _ = queued.await;
        assert_eq!(gate.waiting.load(Ordering::Acquire), 0);
        release_tx.send(()).unwrap();
        assert!(running.await.unwrap().is_ok());
        assert_eq!(gate.run(|| 4).await.unwrap(), 4);
    }
}
