//! One request's attempts at its pool: which backend each attempt goes to,
//! what that backend's circuit breaker learns of it, and whether a failed
//! attempt may be retried on another backend.
//!
//! The proxy calls in at Pingora's phases: [`Attempts::next`] from
//! `upstream_peer`, [`Attempts::connect_failed`] from `fail_to_connect`,
//! [`Attempts::retry_status`] from `upstream_response_filter`,
//! [`Attempts::broke`] from `error_while_proxy` and [`Attempts::finish`]
//! from `logging`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, RetryType};

use super::breaker::{self, Permit};
use super::select::Tried;
use super::{Backend, HashInput, InflightGuard, Members, Pool};
use crate::config::{RetrySpec, Timeouts};
use crate::metrics::{RequestMetrics, RetryReason};

/// Most attempts (first try + retries) for one request.
pub const MAX_ATTEMPTS: usize = 3;
/// How long an idle pooled upstream connection is kept.
const UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The pool a request goes to, with what recording needs: its index
/// (metrics are per pool index) and the snapshot's metric handles.
#[derive(Clone, Copy)]
pub struct PoolRef<'a> {
    /// The pool.
    pub pool: &'a Pool,
    /// Its index in the snapshot.
    pub index: usize,
    /// The snapshot's metric handles.
    pub metrics: &'a RequestMetrics,
}

/// What decides whether a failed attempt's request can be sent again.
#[derive(Debug, Clone, Copy)]
pub struct Resend {
    /// The method is idempotent.
    pub idempotent: bool,
    /// Pingora's retry buffer did not overflow.
    pub buffer_intact: bool,
    /// The request has no body, or its body is kept for a retry.
    pub body_kept: bool,
    /// Nothing was sent to the client yet.
    pub unanswered: bool,
}

impl Resend {
    /// The same request can go out again on a fresh connection.
    fn again(self) -> bool {
        self.idempotent && self.buffer_intact && self.unanswered
    }
}

/// The upstream side of one request.
#[derive(Debug, Default)]
pub struct Attempts {
    /// The pool's backends as of the first attempt (indices below are
    /// into these).
    members: Option<Arc<Members>>,
    /// Index of the current backend in `members`.
    backend: Option<usize>,
    /// Backends that failed this request; retries avoid them.
    failed: Tried,
    /// Attempts made.
    count: usize,
    /// Counts this request against its current backend.
    inflight: Option<InflightGuard>,
    /// The current backend's breaker permit, until its outcome is recorded.
    permit: Option<Permit>,
    /// Start of the current attempt, until it got a response header or
    /// failed.
    started: Option<Instant>,
    /// Duration of the last finished attempt.
    upstream_time: Option<Duration>,
    /// Retries made because of an upstream error status or an error after
    /// the connection was made.
    status_retries: u32,
    /// When every backend is unhealthy or its circuit open: when one may be
    /// tried again.
    retry_after: Option<Duration>,
}

impl Attempts {
    /// Attempts made so far.
    pub fn count(&self) -> usize {
        self.count
    }

    /// The backend of the current (or last) attempt.
    pub fn backend(&self) -> Option<&Arc<Backend>> {
        self.members.as_ref()?.backends.get(self.backend?)
    }

    /// How long the last finished attempt took.
    pub fn upstream_time(&self) -> Option<Duration> {
        self.upstream_time
    }

    /// When no backend was available: how long until one may be.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// Whether a retry after an error status was made.
    pub fn retried_on_status(&self) -> bool {
        self.status_retries > 0
    }

    /// Whether the current attempt's outcome is still to be told to its
    /// breaker.
    pub fn outcome_pending(&self) -> bool {
        self.permit.is_some()
    }

    fn pool_size(&self) -> usize {
        self.members.as_ref().map_or(0, |m| m.backends.len())
    }

    /// Picks a backend this request has not failed on and builds its peer
    /// with `timeouts`, each capped by `remaining` of the route's total
    /// budget. Backends whose circuit is open or that fail their health
    /// checks are skipped like failed ones; when nothing is left because
    /// of them the error is a 503 and [`Attempts::retry_after`] says when
    /// to come back.
    pub fn next(
        &mut self,
        pool: &Pool,
        hash: Option<HashInput<'_>>,
        timeouts: &Timeouts,
        remaining: Option<Duration>,
    ) -> pingora_error::Result<Box<HttpPeer>> {
        let members = self.members.get_or_insert_with(|| pool.members()).clone();
        if self.count == 0 {
            pool.retry_budget.deposit();
        }
        let now = breaker::now_ns();
        let mut skip = self.failed;
        let mut open_wait: Option<Duration> = None;
        for (i, b) in members.backends.iter().enumerate() {
            if let Err(wait) = b.available(pool, now) {
                skip.insert(i);
                open_wait = Some(open_wait.map_or(wait, |w| w.min(wait)));
            }
        }
        let (i, permit) = loop {
            let Some(i) = members.select(&skip, hash) else {
                if let Some(wait) = open_wait {
                    self.retry_after = Some(wait);
                    return Error::e_explain(
                        ErrorType::HTTPStatus(503),
                        "every backend is unhealthy or its circuit is open",
                    );
                }
                return Error::e_explain(ErrorType::HTTPStatus(503), "every backend failed");
            };
            match members.backends[i].breaker.acquire(&pool.breaker, now) {
                Some(permit) => break (i, permit),
                None => {
                    // Lost the last probe slot to another request.
                    skip.insert(i);
                    open_wait.get_or_insert(Duration::from_millis(100));
                }
            }
        };
        let backend = &members.backends[i];
        let cap = |d: Duration| Some(remaining.map_or(d, |left| d.min(left)));
        let mut peer = Box::new(backend.peer());
        peer.options.connection_timeout = cap(timeouts.connect);
        peer.options.read_timeout = cap(timeouts.read);
        peer.options.write_timeout = cap(timeouts.write);
        peer.options.idle_timeout = Some(UPSTREAM_IDLE_TIMEOUT);
        self.inflight = Some(InflightGuard::new(backend.clone()));
        self.count += 1;
        self.backend = Some(i);
        self.permit = Some(permit);
        self.started = Some(Instant::now());
        Ok(peer)
    }

    /// Ends the current attempt's clock (once) and records its duration
    /// for its backend.
    pub fn end(&mut self, pool: PoolRef<'_>) {
        let Some(start) = self.started.take() else {
            return;
        };
        let took = start.elapsed();
        self.upstream_time = Some(took);
        if let Some(b) = self.backend() {
            pool.metrics
                .upstream(&pool.pool.name, b, took.as_secs_f64());
        }
    }

    /// Tells the current backend's breaker how its attempt went (once).
    fn record(&mut self, pool: &Pool, failed: bool) {
        let Some(permit) = self.permit.take() else {
            return;
        };
        if let Some(b) = self.backend() {
            b.breaker
                .record(&pool.breaker, permit, failed, breaker::now_ns());
        }
    }

    /// The connection could not be made: a failure of the backend, retried
    /// on another one while any is left (`true`).
    pub fn connect_failed(&mut self, pool: PoolRef<'_>) -> bool {
        self.end(pool);
        if let Some(i) = self.backend {
            self.failed.insert(i);
        }
        self.record(pool.pool, true);
        let retry = self.count < MAX_ATTEMPTS && self.failed.len() < self.pool_size();
        if retry {
            pool.metrics.retry(pool.index, RetryReason::Connect);
        }
        retry
    }

    /// The upstream answered `status`. When it is one the route retries
    /// and [`Attempts::book_retry`] allows it, the attempt counts as a
    /// failure and `true` says: retry on another backend.
    pub fn retry_status(
        &mut self,
        pool: PoolRef<'_>,
        retry: &RetrySpec,
        resend: Resend,
        status: u16,
    ) -> bool {
        self.end(pool);
        if !self.book_retry(pool.pool, retry, resend, status) {
            return false;
        }
        pool.metrics.retry(pool.index, RetryReason::Status);
        self.record(pool.pool, true);
        true
    }

    /// The exchange broke after the connection was made (reset, read
    /// timeout, bad response): counted against the backend's breaker and
    /// retried like the status it becomes (`status`: 502 or 504) as long
    /// as the request can be resent. A stale pooled connection is retried
    /// as Pingora does, without blaming the backend. `true`: retry.
    pub fn broke(
        &mut self,
        pool: PoolRef<'_>,
        e: &Error,
        retry: &RetrySpec,
        resend: Resend,
        client_reused: bool,
        status: u16,
    ) -> bool {
        self.end(pool);
        if matches!(e.retry, RetryType::ReusedOnly) && client_reused && resend.again() {
            self.record(pool.pool, false);
            pool.metrics.retry(pool.index, RetryReason::StaleConnection);
            return true;
        }
        self.record(pool.pool, upstream_failure(e));
        let retry = resend.again() && self.book_retry(pool.pool, retry, resend, status);
        if retry {
            pool.metrics.retry(pool.index, RetryReason::Error);
        }
        retry
    }

    /// The request is over: the last attempt's clock stops and its breaker
    /// learns the outcome (`e`, else whether the response status is one of
    /// the pool's `failure_statuses`).
    pub fn finish(&mut self, pool: PoolRef<'_>, e: Option<&Error>, status: Option<u16>) {
        self.end(pool);
        if self.permit.is_none() {
            return;
        }
        let failed = match e {
            Some(e) => upstream_failure(e),
            None => status.is_some_and(|s| pool.pool.breaker.failure_statuses.contains(&s)),
        };
        self.record(pool.pool, failed);
    }

    /// Whether the current attempt, which would answer `status`, may be
    /// retried on another backend: the status is in the route's
    /// `retry.on_statuses`, its `attempts` are not used up, the request can
    /// be resent, an untried backend is left and the pool's retry budget
    /// has a token. When it may, the retry is booked (backend marked tried,
    /// budget spent).
    fn book_retry(&mut self, pool: &Pool, retry: &RetrySpec, resend: Resend, status: u16) -> bool {
        if !retry.on_statuses.contains(&status)
            || self.status_retries >= retry.attempts
            || !resend.idempotent
            || !resend.buffer_intact
            || !resend.body_kept
        {
            return false;
        }
        let mut tried = self.failed;
        if let Some(i) = self.backend {
            tried.insert(i);
        }
        if tried.len() >= self.pool_size() || !pool.retry_budget.try_withdraw() {
            return false;
        }
        self.failed = tried;
        self.status_retries += 1;
        true
    }
}

/// Whether an error is the upstream's fault (counts against its breaker).
pub fn upstream_failure(e: &Error) -> bool {
    use ErrorType as T;
    *e.esource() == ErrorSource::Upstream
        || matches!(
            e.etype(),
            T::ConnectTimedout
                | T::ConnectRefused
                | T::ConnectNoRoute
                | T::ConnectError
                | T::ReadTimedout
                | T::WriteTimedout
        )
}
