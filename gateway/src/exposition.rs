//! What is read at scrape time: the Prometheus text exposition of the
//! admin listener's `/metrics` (the recorded families of
//! [`crate::metrics::Metrics`], then state read from the live snapshot:
//! backend health and circuits, Redis and JWKS counters) and the status
//! page's `/api/status` document.
//!
//! Kept apart from [`crate::metrics`], which the snapshot holds handles
//! of: this module reads snapshots, so the dependency runs one way.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use prometheus::core::Collector;
use prometheus::TextEncoder;
use serde_json::{json, Value};

use crate::health;
use crate::metrics::Metrics;
use crate::snapshot::Snapshot;
use crate::tier_feed::TierOverrides;
use crate::upstream::breaker::BreakerState;
use crate::upstream::{Backend, Pool};
use crate::usage::Meter;

/// The text exposition: recorded families, then the state read from
/// `snapshot` now.
pub fn render(metrics: &Metrics, snapshot: &Snapshot) -> String {
    let mut out = String::with_capacity(16 * 1024);
    if let Err(e) = TextEncoder::new().encode_utf8(&metrics.registry.gather(), &mut out) {
        tracing::warn!(error = %e, "cannot encode metrics");
    }
    render_state(snapshot, &mut out);
    if snapshot.usage.is_some() {
        render_usage(&metrics.usage, &mut out);
    }
    if snapshot.tier_changes.is_some() {
        render_tier_feed(&metrics.tier_overrides, &mut out);
    }
    out
}

/// The tier change feed's counters.
fn render_tier_feed(o: &TierOverrides, out: &mut String) {
    let s = &o.stats;
    for (name, kind, help, v) in [
        (
            "tiergate_tier_feed_up",
            "gauge",
            "1 while tier changes from the users service are applied in admission; 0 while the feed is stale (tokens' own tiers).",
            u64::from(s.up.load(Ordering::Relaxed)),
        ),
        (
            "tiergate_tier_feed_changes_total",
            "counter",
            "Tier changes received from the users service.",
            s.changes.load(Ordering::Relaxed),
        ),
        (
            "tiergate_tier_feed_failures_total",
            "counter",
            "Polls of the tier change feed that failed.",
            s.failures.load(Ordering::Relaxed),
        ),
        (
            "tiergate_tier_overrides",
            "gauge",
            "Tier changes held (the latest per user and per organization).",
            s.entries.load(Ordering::Relaxed),
        ),
        (
            "tiergate_tier_overrides_applied_total",
            "counter",
            "Requests admitted with a tier change's tier instead of the token's claim.",
            s.applied.load(Ordering::Relaxed),
        ),
        (
            "tiergate_tier_overrides_evicted_total",
            "counter",
            "Tier changes dropped beyond tier_changes.max_entries.",
            s.evicted.load(Ordering::Relaxed),
        ),
    ] {
        Family::new(out, name, kind, help).sample(&[], v);
    }
}

/// The status page's tier feed section.
fn tier_feed_status(o: &TierOverrides, snapshot: &Snapshot) -> Value {
    let Some(settings) = &snapshot.tier_changes else {
        return Value::Null;
    };
    let s = &o.stats;
    let last = s.last_answer_ms.load(Ordering::Relaxed);
    json!({
        "endpoint": settings.endpoint,
        "up": s.up.load(Ordering::Relaxed),
        "overrides": s.entries.load(Ordering::Relaxed),
        "changes": s.changes.load(Ordering::Relaxed),
        "applied": s.applied.load(Ordering::Relaxed),
        "failures": s.failures.load(Ordering::Relaxed),
        "cursor": s.cursor.load(Ordering::Relaxed),
        "last_answer_at": (last > 0).then(|| {
            humantime::format_rfc3339_millis(UNIX_EPOCH + std::time::Duration::from_millis(last))
                .to_string()
        }),
        "last_error": o.last_error(),
    })
}

/// The usage meter's counters.
fn render_usage(meter: &Meter, out: &mut String) {
    let s = &meter.stats;
    for (name, kind, help, v) in [
        (
            "tiergate_usage_requests_total",
            "counter",
            "Admitted requests with a caller counted for usage (added as each window closes).",
            &s.requests,
        ),
        (
            "tiergate_usage_rows_sent_total",
            "counter",
            "Usage rows the subscriptions service accepted.",
            &s.rows_sent,
        ),
        (
            "tiergate_usage_rows_dropped_total",
            "counter",
            "Usage rows dropped: the backlog was full, or the service refused a batch as malformed.",
            &s.rows_dropped,
        ),
        (
            "tiergate_usage_backlog_rows",
            "gauge",
            "Usage rows waiting to be sent.",
            &s.backlog_rows,
        ),
    ] {
        Family::new(out, name, kind, help).sample(&[], v.load(Ordering::Relaxed));
    }
    let mut f = Family::new(
        out,
        "tiergate_usage_batches_total",
        "counter",
        "Usage batch deliveries by outcome: accepted, duplicate (counted before), failed (retried), rejected (dropped).",
    );
    for (outcome, v) in [
        ("accepted", &s.batches_accepted),
        ("duplicate", &s.batches_duplicate),
        ("failed", &s.batches_failed),
        ("rejected", &s.batches_rejected),
    ] {
        f.sample(&[("outcome", outcome)], v.load(Ordering::Relaxed));
    }
}

/// The status page's usage section.
fn usage_status(meter: &Meter, snapshot: &Snapshot) -> Value {
    let Some(settings) = &snapshot.usage else {
        return Value::Null;
    };
    let s = &meter.stats;
    let last = s.last_sent_ms.load(Ordering::Relaxed);
    json!({
        "endpoint": settings.endpoint,
        "flush_interval_seconds": settings.flush_interval.as_secs_f64(),
        "requests": s.requests.load(Ordering::Relaxed),
        "rows_sent": s.rows_sent.load(Ordering::Relaxed),
        "rows_dropped": s.rows_dropped.load(Ordering::Relaxed),
        "backlog_rows": s.backlog_rows.load(Ordering::Relaxed),
        "batches_failed": s.batches_failed.load(Ordering::Relaxed),
        "last_sent_at": (last > 0).then(|| {
            humantime::format_rfc3339_millis(UNIX_EPOCH + std::time::Duration::from_millis(last))
                .to_string()
        }),
        "last_error": meter.last_error(),
    })
}

/// The admin status page's data: pools and backends, cumulative
/// request, error (5xx) and 429 counts per route and per tier, the
/// rate limiter and Redis. The page turns counts into rates.
pub fn status(metrics: &Metrics, snapshot: &Snapshot) -> Value {
    #[derive(Default)]
    struct Counts {
        requests: u64,
        errors: u64,
        rate_limited: u64,
    }
    let mut routes: Vec<(String, Counts)> = snapshot
        .routes
        .iter()
        .map(|r| (r.name.clone(), Counts::default()))
        .collect();
    let mut tiers: Vec<(String, Counts)> = (0..=snapshot.limiter.anonymous())
        .map(|c| (snapshot.limiter.class(c).name.clone(), Counts::default()))
        .collect();
    let mut total = Counts::default();
    let find = |list: &mut Vec<(String, Counts)>, name: &str| -> usize {
        match list.iter().position(|(n, _)| n == name) {
            Some(i) => i,
            None => {
                list.push((name.to_owned(), Counts::default()));
                list.len() - 1
            }
        }
    };
    for family in metrics.requests.collect() {
        for m in family.get_metric() {
            let label = |name| label_of(m, name);
            let n = m.get_counter().get_value() as u64;
            let errors = if label("status_class") == "5xx" { n } else { 0 };
            let r = find(&mut routes, label("route"));
            let t = find(&mut tiers, label("tier"));
            for c in [&mut routes[r].1, &mut tiers[t].1, &mut total] {
                c.requests += n;
                c.errors += errors;
            }
        }
    }
    let (mut allowed, mut rejected, mut fallback) = (0, 0, 0);
    for family in metrics.ratelimit.collect() {
        for m in family.get_metric() {
            let label = |name| label_of(m, name);
            let n = m.get_counter().get_value() as u64;
            if label("source") == "fallback" {
                fallback += n;
            }
            if label("outcome") == "rejected" {
                rejected += n;
                let r = find(&mut routes, label("route"));
                let t = find(&mut tiers, label("tier"));
                routes[r].1.rate_limited += n;
                tiers[t].1.rate_limited += n;
            } else {
                allowed += n;
            }
        }
    }
    total.rate_limited = rejected;
    let upstream_of = |name: &str| {
        snapshot
            .routes
            .iter()
            .find(|r| r.name == name)
            .and_then(|r| snapshot.pools.get(r.upstream))
            .map(|p| p.name.clone())
    };
    let rows = |list: Vec<(String, Counts)>, with_upstream: bool| -> Vec<Value> {
        list.into_iter()
            .map(|(name, c)| {
                let mut row = json!({
                    "name": name,
                    "requests": c.requests,
                    "errors": c.errors,
                    "rate_limited": c.rate_limited,
                });
                if with_upstream {
                    row["upstream"] = json!(upstream_of(&name));
                }
                row
            })
            .collect()
    };
    let redis = snapshot.limiter.shared().map(|s| {
        json!({
            "target": s.target_name(),
            "up": s.is_up(),
            "calls": s.stats.calls.load(Ordering::Relaxed),
            "errors": s.stats.errors.load(Ordering::Relaxed),
            "outages": s.stats.outages.load(Ordering::Relaxed),
        })
    });
    let (overall, services) = health::services(snapshot);
    let loaded =
        UNIX_EPOCH + std::time::Duration::from_secs_f64(metrics.last_reload.get().max(0.0));
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": metrics.started.elapsed().as_secs_f64(),
        "config_loaded_at": humantime::format_rfc3339_millis(loaded).to_string(),
        "status": overall.as_str(),
        "requests": {
            "total": total.requests,
            "errors": total.errors,
            "rate_limited": total.rate_limited,
            "in_flight": metrics.in_flight.get(),
        },
        "routes": rows(routes, true),
        "tiers": rows(tiers, false),
        "rate_limit": {
            "allowed": allowed,
            "rejected": rejected,
            "fallback": fallback,
            "tracked_keys": snapshot.limiter.tracked_keys(),
            "redis": redis,
        },
        "pools": services["pools"].clone(),
        "usage": usage_status(&metrics.usage, snapshot),
        "tier_changes": tier_feed_status(&metrics.tier_overrides, snapshot),
    })
}

/// A sample's value of label `name` ("" when absent).
fn label_of<'a>(m: &'a prometheus::proto::Metric, name: &str) -> &'a str {
    m.get_label()
        .iter()
        .find(|l| l.name() == name)
        .map_or("", |l| l.value())
}

/// Appends the families read from the snapshot at scrape time.
fn render_state(snapshot: &Snapshot, out: &mut String) {
    let mut healthy = Family::new(out, "tiergate_backend_healthy", "gauge",
        "1 when the backend takes traffic per its health checks (unchecked and not yet checked count as 1).");
    for (pool, b) in backends(snapshot) {
        healthy.sample(
            &[("upstream", &pool.name), ("backend", &b.addr_text)],
            u64::from(b.health.routable()),
        );
    }
    let mut circuit = Family::new(
        out,
        "tiergate_backend_circuit_state",
        "gauge",
        "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
    );
    for (pool, b) in backends(snapshot) {
        let state = match health::circuit(pool, &b) {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        };
        circuit.sample(
            &[("upstream", &pool.name), ("backend", &b.addr_text)],
            state,
        );
    }
    let mut inflight = Family::new(
        out,
        "tiergate_backend_in_flight",
        "gauge",
        "Requests sent to the backend and not finished.",
    );
    for (pool, b) in backends(snapshot) {
        inflight.sample(
            &[("upstream", &pool.name), ("backend", &b.addr_text)],
            b.inflight() as u64,
        );
    }
    Family::new(
        out,
        "tiergate_ratelimit_tracked_keys",
        "gauge",
        "Callers with rate-limit state in memory.",
    )
    .sample(&[], snapshot.limiter.tracked_keys() as u64);
    if let Some(s) = snapshot.limiter.shared() {
        Family::new(
            out,
            "tiergate_redis_up",
            "gauge",
            "1 while Redis decides limits, 0 while the local fallback does.",
        )
        .sample(&[], u64::from(s.is_up()));
        let stats = &s.stats;
        for (name, help, v) in [
            (
                "tiergate_redis_calls_total",
                "Lease calls made to Redis.",
                &stats.calls,
            ),
            (
                "tiergate_redis_errors_total",
                "Lease calls to Redis that failed.",
                &stats.errors,
            ),
            (
                "tiergate_redis_outages_total",
                "Times Redis became unreachable.",
                &stats.outages,
            ),
            (
                "tiergate_redis_timeouts_total",
                "Lease calls that got no answer within the timeout (sent again with the next call).",
                &stats.timeouts,
            ),
            (
                "tiergate_redis_replays_total",
                "Answers Redis gave again for a call whose first answer was lost.",
                &stats.replays,
            ),
        ] {
            Family::new(out, name, "counter", help).sample(&[], v.load(Ordering::Relaxed));
        }
    }
    if let Some(jwks) = snapshot.auth.jwks() {
        let mut f = Family::new(
            out,
            "tiergate_jwks_refreshes_total",
            "counter",
            "JWKS fetches by result.",
        );
        f.sample(
            &[("result", "success")],
            jwks.refreshes.load(Ordering::Relaxed),
        );
        f.sample(
            &[("result", "failure")],
            jwks.failures.load(Ordering::Relaxed),
        );
        Family::new(
            out,
            "tiergate_jwks_keys",
            "gauge",
            "Usable keys in the current JWKS.",
        )
        .sample(&[], jwks.keys().len() as u64);
    }
}

/// Every current and draining backend with its pool.
fn backends(snapshot: &Snapshot) -> impl Iterator<Item = (&Pool, Arc<Backend>)> {
    snapshot.pools.iter().flat_map(|pool| {
        let members = pool.members();
        let all: Vec<Arc<Backend>> = members
            .backends
            .iter()
            .cloned()
            .chain(pool.draining())
            .collect();
        all.into_iter().map(move |b| (pool.as_ref(), b))
    })
}

/// One family of the text format being written.
struct Family<'a> {
    out: &'a mut String,
    name: &'static str,
}

impl<'a> Family<'a> {
    fn new(out: &'a mut String, name: &'static str, kind: &str, help: &str) -> Self {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        Self { out, name }
    }

    fn sample(&mut self, labels: &[(&str, &str)], value: u64) {
        self.out.push_str(self.name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"");
                for c in v.chars() {
                    match c {
                        '\\' => self.out.push_str("\\\\"),
                        '"' => self.out.push_str("\\\""),
                        '\n' => self.out.push_str("\\n"),
                        c => self.out.push(c),
                    }
                }
                self.out.push('"');
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_state_lines_escape_label_values() {
        let mut out = String::new();
        Family::new(&mut out, "x", "gauge", "h").sample(&[("a", "q\"\\\n")], 1);
        assert!(out.ends_with("x{a=\"q\\\"\\\\\\n\"} 1\n"), "{out}");
    }
}
