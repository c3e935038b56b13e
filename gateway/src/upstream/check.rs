//! Active health checks: each pool with a `health_check` gets one task on
//! the background runtime that checks all its backends in parallel every
//! `interval`, and stops when the pool is dropped (a reload removed it).
//!
//! Each backend's state machine:
//!
//! ```text
//!            first pass                    healthy_threshold passes in a row
//!   unknown ───────────► healthy ◄──────────────────────────────┐
//!      │                    │                                    │
//!      │ first failure      │ unhealthy_threshold failures       │
//!      ▼                    ▼ in a row                           │
//!   unhealthy ◄─────────────┘                                    │
//!      └─────────────────────────────────────────────────────────┘
//! ```
//!
//! `unknown` (never checked yet) is routable: the first round runs as soon
//! as the pool is built, and until it answers, connect failures are retried
//! on another backend and count against the breaker as usual. A backend
//! that becomes healthy again also ends its breaker's open period, so
//! half-open probes start at once.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::Pool;
use crate::config::{CheckKind, HealthCheckSpec};

/// A backend's health as the checks see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthState {
    /// Not checked yet, or the pool has no health check (routable).
    Unknown,
    /// Passing.
    Healthy,
    /// Failing: gets no traffic.
    Unhealthy,
}

impl HealthState {
    /// The JSON name.
    pub fn as_str(self) -> &'static str {
        match self {
            HealthState::Unknown => "unknown",
            HealthState::Healthy => "healthy",
            HealthState::Unhealthy => "unhealthy",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => HealthState::Healthy,
            2 => HealthState::Unhealthy,
            _ => HealthState::Unknown,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            HealthState::Unknown => 0,
            HealthState::Healthy => 1,
            HealthState::Unhealthy => 2,
        }
    }
}

/// `latency_us` before any check passed.
const NO_LATENCY: u64 = u64::MAX;

/// One backend's check results. Written only by its pool's check task.
#[derive(Debug)]
pub struct Health {
    state: AtomicU8,
    passes: AtomicU32,
    failures: AtomicU32,
    /// Unix milliseconds of the last check; 0 before the first.
    last_check_ms: AtomicU64,
    /// Microseconds the last passing check took; [`NO_LATENCY`] before one.
    latency_us: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            state: AtomicU8::new(0),
            passes: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            last_check_ms: AtomicU64::new(0),
            latency_us: AtomicU64::new(NO_LATENCY),
            last_error: Mutex::new(None),
        }
    }
}

/// The next state after a check, given the streak counts *including* it.
fn next_state(
    state: HealthState,
    passed: bool,
    passes: u32,
    failures: u32,
    spec: &HealthCheckSpec,
) -> HealthState {
    match (state, passed) {
        (HealthState::Unknown, true) => HealthState::Healthy,
        (HealthState::Unknown, false) => HealthState::Unhealthy,
        (HealthState::Healthy, false) if failures >= spec.unhealthy_threshold => {
            HealthState::Unhealthy
        }
        (HealthState::Unhealthy, true) if passes >= spec.healthy_threshold => HealthState::Healthy,
        (s, _) => s,
    }
}

impl Health {
    /// The current state.
    pub fn state(&self) -> HealthState {
        HealthState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Whether the backend may get traffic.
    pub fn routable(&self) -> bool {
        self.state() != HealthState::Unhealthy
    }

    /// Consecutive failed checks.
    pub fn failures(&self) -> u32 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Unix milliseconds of the last check, if any.
    pub fn last_check_ms(&self) -> Option<u64> {
        Some(self.last_check_ms.load(Ordering::Relaxed)).filter(|&t| t > 0)
    }

    /// How long the last passing check took, in milliseconds; `None`
    /// until one passed.
    pub fn latency_ms(&self) -> Option<f64> {
        let us = self.latency_us.load(Ordering::Relaxed);
        (us != NO_LATENCY).then(|| us as f64 / 1000.0)
    }

    /// Why the last check failed, if it did.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    /// Records one check; returns the new state when it changed.
    pub fn record(
        &self,
        spec: &HealthCheckSpec,
        outcome: Result<Duration, String>,
    ) -> Option<HealthState> {
        let passed = outcome.is_ok();
        let (passes, failures) = if passed {
            self.failures.store(0, Ordering::Relaxed);
            (self.passes.fetch_add(1, Ordering::Relaxed) + 1, 0)
        } else {
            self.passes.store(0, Ordering::Relaxed);
            (0, self.failures.fetch_add(1, Ordering::Relaxed) + 1)
        };
        self.last_check_ms.store(unix_ms(), Ordering::Relaxed);
        let error = match outcome {
            Ok(took) => {
                let us = u64::try_from(took.as_micros()).unwrap_or(NO_LATENCY - 1);
                self.latency_us
                    .store(us.min(NO_LATENCY - 1), Ordering::Relaxed);
                None
            }
            Err(e) => Some(e),
        };
        if let Ok(mut slot) = self.last_error.lock() {
            *slot = error;
        }
        let before = self.state();
        let after = next_state(before, passed, passes, failures, spec);
        self.state.store(after.to_u8(), Ordering::Release);
        (after != before).then_some(after)
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Checks one backend once: `Ok(time taken)` or why it failed.
pub async fn probe(addr: SocketAddr, spec: &HealthCheckSpec) -> Result<Duration, String> {
    let start = Instant::now();
    match tokio::time::timeout(spec.timeout, probe_inner(addr, &spec.kind)).await {
        Ok(Ok(())) => Ok(start.elapsed()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("no answer within {:?}", spec.timeout)),
    }
}

/// Longest status line read from a checked backend.
const MAX_STATUS_LINE: usize = 1024;

async fn probe_inner(addr: SocketAddr, kind: &CheckKind) -> Result<(), String> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let CheckKind::Http {
        method,
        path,
        host,
        expected_statuses,
    } = kind
    else {
        return Ok(());
    };
    let host = host.clone().unwrap_or_else(|| addr.to_string());
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: tiergate-health-check\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    let line_end = loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("connection closed before a status line".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
            break i;
        }
        if buf.len() > MAX_STATUS_LINE {
            return Err("no HTTP status line".into());
        }
    };
    let status = parse_status_line(&buf[..line_end]).ok_or("no HTTP status line")?;
    if expected_statuses.contains(&status) {
        Ok(())
    } else {
        Err(format!("status {status}"))
    }
}

/// `HTTP/1.x NNN ...` → NNN.
fn parse_status_line(line: &[u8]) -> Option<u16> {
    let rest = line.strip_prefix(b"HTTP/1.")?;
    let code = rest.get(2..5)?;
    if rest.get(1) != Some(&b' ') || !code.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(code).ok()?.parse().ok()
}

/// Checks every backend of `pool` each `interval` until the pool is gone.
pub async fn run(pool: Weak<Pool>, spec: Arc<HealthCheckSpec>) {
    let mut tick = tokio::time::interval(spec.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (name, members) = match pool.upgrade() {
            Some(p) => (p.name.clone(), p.members()),
            None => return,
        };
        let mut round = tokio::task::JoinSet::new();
        for b in members.backends.iter().cloned() {
            let spec = spec.clone();
            round.spawn(async move {
                let outcome = probe(b.addr, &spec).await;
                (b, outcome)
            });
        }
        while let Some(Ok((b, outcome))) = round.join_next().await {
            let why = outcome.as_ref().err().cloned();
            match b.health.record(&spec, outcome) {
                Some(HealthState::Unhealthy) => tracing::warn!(
                    pool = %name, backend = %b.addr_text, error = why.as_deref().unwrap_or(""),
                    "backend failed its health checks: no traffic until it passes again"
                ),
                Some(HealthState::Healthy) => {
                    // Back from a failure: let probes decide at once rather
                    // than wait out an open circuit.
                    b.breaker.end_open_period(super::breaker::now_ns());
                    tracing::info!(
                        pool = %name, backend = %b.addr_text, "backend passes its health checks"
                    );
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> HealthCheckSpec {
        HealthCheckSpec {
            kind: CheckKind::Tcp,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        }
    }

    fn fail() -> Result<Duration, String> {
        Err("refused".into())
    }

    #[test]
    fn test_first_check_decides_then_thresholds_apply() {
        let s = spec();
        let h = Health::default();
        assert_eq!(h.state(), HealthState::Unknown);
        assert!(h.routable());
        assert_eq!(h.record(&s, fail()), Some(HealthState::Unhealthy));
        assert_eq!(h.latency_ms(), None, "no check passed yet");
        assert!(!h.routable());
        // One pass is not enough to come back: healthy_threshold is 2.
        assert_eq!(h.record(&s, Ok(Duration::from_millis(1))), None);
        assert_eq!(h.state(), HealthState::Unhealthy);
        assert_eq!(
            h.record(&s, Ok(Duration::from_millis(2))),
            Some(HealthState::Healthy)
        );
        assert_eq!(h.latency_ms(), Some(2.0));
        // Two failures, a pass, three failures: only the last run counts.
        h.record(&s, fail());
        h.record(&s, fail());
        h.record(&s, Ok(Duration::ZERO));
        assert_eq!(h.record(&s, fail()), None);
        assert_eq!(h.record(&s, fail()), None);
        assert_eq!(h.failures(), 2);
        assert_eq!(h.record(&s, fail()), Some(HealthState::Unhealthy));
        assert_eq!(h.last_error().as_deref(), Some("refused"));
        assert!(h.last_check_ms().is_some());
    }

    #[test]
    fn test_first_pass_makes_an_unknown_backend_healthy() {
        let h = Health::default();
        assert_eq!(
            h.record(&spec(), Ok(Duration::ZERO)),
            Some(HealthState::Healthy)
        );
        assert_eq!(h.last_error(), None);
    }

    #[test]
    fn test_status_line_parsing() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK"), Some(200));
        assert_eq!(parse_status_line(b"HTTP/1.0 503"), Some(503));
        assert_eq!(parse_status_line(b"HTTP/1.1 20"), None);
        assert_eq!(parse_status_line(b"HTTP/2 200"), None);
        assert_eq!(parse_status_line(b"SSH-2.0-OpenSSH"), None);
        assert_eq!(parse_status_line(b"HTTP/1.1 2x0 OK"), None);
    }
}
