//! Prometheus metrics, served as text on the admin listener's `/metrics`.
//!
//! Two kinds:
//!
//! * **Recorded on the request path** with the `prometheus` crate: request
//!   counts and durations, upstream durations, rate-limit decisions,
//!   retries, in-flight requests. A labelled metric's handle is looked up
//!   once (the crate's label map takes a read lock) and then kept in a cell
//!   of the snapshot ([`RequestMetrics`]) or of the backend, so a request
//!   only does atomic adds: no lock, no hashing, no allocation.
//! * **Read at scrape time** from the live snapshot: backend health and
//!   circuit state, Redis and JWKS counters that their owners keep as plain
//!   atomics ([`crate::exposition`]). Nothing on the request path pays for
//!   them.
//!
//! This module reads no snapshot: snapshots hold its handles.
//!
//! Every label value comes from the config (route, pool and tier names,
//! backend addresses) or a fixed set (method, status class, outcome):
//! never a user id or a raw path.

use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use http::Method;
use prometheus::core::Collector;
use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

use crate::ratelimit::DecisionSource;
use crate::upstream::Backend;

/// Request duration buckets (seconds): 0.5 ms to 10 s.
const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Method label values; anything else is `OTHER`.
const METHODS: [&str; 10] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE", "OTHER",
];
/// Status class label values; `none` = the client left before a response.
const STATUS_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "none"];
/// Rate-limit decision sources.
const SOURCES: [&str; 3] = ["local", "redis", "fallback"];
/// Route label of requests no route matched (404/405, `/health` on the
/// public listener).
pub const UNMATCHED: &str = "unmatched";

/// Why an upstream attempt was retried.
#[derive(Debug, Clone, Copy)]
pub enum RetryReason {
    /// The connection could not be made.
    Connect = 0,
    /// The upstream answered a status listed in `retry.on_statuses`.
    Status = 1,
    /// The exchange broke after connecting (reset, timeout).
    Error = 2,
    /// A pooled keep-alive connection had been closed by the upstream.
    StaleConnection = 3,
}

const RETRY_REASONS: [&str; 4] = ["connect", "status", "error", "stale_connection"];

/// The process's metrics; one per gateway server, kept across reloads.
pub struct Metrics {
    pub(crate) registry: Registry,
    pub(crate) requests: IntCounterVec,
    duration: HistogramVec,
    upstream: HistogramVec,
    retries: IntCounterVec,
    pub(crate) ratelimit: IntCounterVec,
    reloads: IntCounterVec,
    pub(crate) last_reload: Gauge,
    /// Requests being handled by the proxy.
    pub in_flight: IntGauge,
    /// Access-log lines dropped because the writer fell behind.
    pub access_log_dropped: IntCounter,
    /// Requests and connections the connection layer refused, by reason.
    pub downstream_refused: IntCounterVec,
    /// Request bodies that stalled past `client_timeouts.body_idle`.
    pub body_timeouts: IntCounter,
    /// Open client connections, by listener (`proxy`, `admin`).
    pub downstream_open: IntGaugeVec,
    /// Client connections accepted, by listener.
    pub downstream_accepted: IntCounterVec,
    /// The usage meter (process-wide like every counter here, so a reload
    /// loses no counts); its figures are exposed at scrape time.
    pub usage: Arc<crate::usage::Meter>,
    /// The tier overrides from the users service's feed (process-wide, so
    /// a reload keeps them).
    pub tier_overrides: Arc<crate::tier_feed::TierOverrides>,
    pub(crate) started: Instant,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Registers every metric family.
    pub fn new() -> Result<Arc<Self>, prometheus::Error> {
        let registry = Registry::new();
        let request_labels = ["route", "method", "status_class", "tier"];
        let requests = IntCounterVec::new(
            Opts::new(
                "tiergate_requests_total",
                "Requests handled, by route, method, status class and tier.",
            ),
            &request_labels,
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "tiergate_request_duration_seconds",
                "Time from the request header to the end of the response, by route, method, status class and tier.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &request_labels,
        )?;
        let upstream = HistogramVec::new(
            HistogramOpts::new(
                "tiergate_upstream_duration_seconds",
                "Per upstream attempt: from picking the backend until its response header arrived or the attempt failed.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["upstream", "backend"],
        )?;
        let retries = IntCounterVec::new(
            Opts::new(
                "tiergate_upstream_retries_total",
                "Upstream attempts retried on another backend, by reason.",
            ),
            &["upstream", "reason"],
        )?;
        let ratelimit = IntCounterVec::new(
            Opts::new(
                "tiergate_ratelimit_decisions_total",
                "Rate-limit decisions by route, tier, outcome (allowed, rejected) and source (local, redis, fallback).",
            ),
            &["route", "tier", "outcome", "source"],
        )?;
        let reloads = IntCounterVec::new(
            Opts::new(
                "tiergate_config_reloads_total",
                "Config reloads by result (success, error).",
            ),
            &["result"],
        )?;
        let last_reload = Gauge::new(
            "tiergate_config_last_reload_success_timestamp_seconds",
            "When the active config was loaded (Unix seconds).",
        )?;
        let in_flight = IntGauge::new(
            "tiergate_requests_in_flight",
            "Requests the proxy is handling now.",
        )?;
        let access_log_dropped = IntCounter::new(
            "tiergate_access_log_dropped_total",
            "Access-log lines dropped because the writer could not keep up.",
        )?;
        let downstream_refused = IntCounterVec::new(
            Opts::new(
                "tiergate_downstream_refused_total",
                "Requests and connections refused before routing, by reason (sizes, timeouts, bytes, connection caps).",
            ),
            &["reason"],
        )?;
        let body_timeouts = downstream_refused.with_label_values(&["body_timeout"]);
        let downstream_open = IntGaugeVec::new(
            Opts::new(
                "tiergate_downstream_connections",
                "Open client connections, by listener (proxy, admin).",
            ),
            &["listener"],
        )?;
        let downstream_accepted = IntCounterVec::new(
            Opts::new(
                "tiergate_downstream_connections_total",
                "Client connections accepted (refused ones too), by listener.",
            ),
            &["listener"],
        )?;
        let build = IntGauge::with_opts(
            Opts::new("tiergate_build_info", "Build information; always 1.")
                .const_label("version", env!("CARGO_PKG_VERSION")),
        )?;
        build.set(1);
        for result in ["success", "error"] {
            reloads.with_label_values(&[result]);
        }
        last_reload.set(unix_secs());
        let collectors: [Box<dyn Collector>; 13] = [
            Box::new(downstream_refused.clone()),
            Box::new(downstream_open.clone()),
            Box::new(downstream_accepted.clone()),
            Box::new(requests.clone()),
            Box::new(duration.clone()),
            Box::new(upstream.clone()),
            Box::new(retries.clone()),
            Box::new(ratelimit.clone()),
            Box::new(reloads.clone()),
            Box::new(last_reload.clone()),
            Box::new(in_flight.clone()),
            Box::new(access_log_dropped.clone()),
            Box::new(build),
        ];
        for c in collectors {
            registry.register(c)?;
        }
        Ok(Arc::new(Self {
            registry,
            requests,
            duration,
            upstream,
            retries,
            ratelimit,
            reloads,
            last_reload,
            in_flight,
            access_log_dropped,
            downstream_refused,
            body_timeouts,
            downstream_open,
            downstream_accepted,
            usage: Arc::new(crate::usage::Meter::new()),
            tier_overrides: Arc::new(crate::tier_feed::TierOverrides::new()),
            started: Instant::now(),
        }))
    }

    /// Counts a config reload; a good one also sets the load timestamp.
    pub fn record_reload(&self, ok: bool) {
        let result = if ok { "success" } else { "error" };
        self.reloads.with_label_values(&[result]).inc();
        if ok {
            self.last_reload.set(unix_secs());
        }
    }
}

fn unix_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Index of a method's label value.
fn method_index(m: &Method) -> usize {
    match *m {
        Method::GET => 0,
        Method::HEAD => 1,
        Method::POST => 2,
        Method::PUT => 3,
        Method::DELETE => 4,
        Method::PATCH => 5,
        Method::OPTIONS => 6,
        Method::CONNECT => 7,
        Method::TRACE => 8,
        _ => 9,
    }
}

/// Index of a status's class label value (0 = no response).
fn status_index(status: u16) -> usize {
    match status / 100 {
        c @ 1..=5 => usize::from(c - 1),
        _ => 5,
    }
}

/// A request counter and its duration histogram, for one label set.
struct RequestCell {
    count: IntCounter,
    duration: Histogram,
}

/// The cells of one route, allocated on its first request.
struct RouteCells {
    name: String,
    requests: OnceLock<Box<[OnceLock<RequestCell>]>>,
    ratelimit: OnceLock<Box<[OnceLock<IntCounter>]>>,
}

/// Per-snapshot handles into [`Metrics`], indexed by route, tier and the
/// fixed label sets: recording is a few array lookups and atomic adds.
pub struct RequestMetrics {
    metrics: Arc<Metrics>,
    /// One per route, then one for [`UNMATCHED`].
    routes: Box<[RouteCells]>,
    tiers: Box<[String]>,
    /// Per pool, per [`RetryReason`].
    retries: Box<[[IntCounter; 4]]>,
}

impl std::fmt::Debug for RequestMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestMetrics")
            .field("routes", &self.routes.len())
            .finish_non_exhaustive()
    }
}

impl RequestMetrics {
    /// Cells for these routes, tiers (class names, anonymous last) and pools.
    pub fn new(metrics: Arc<Metrics>, routes: &[&str], tiers: &[&str], pools: &[&str]) -> Self {
        let routes = routes
            .iter()
            .copied()
            .chain([UNMATCHED])
            .map(|name| RouteCells {
                name: name.to_owned(),
                requests: OnceLock::new(),
                ratelimit: OnceLock::new(),
            })
            .collect();
        let retries = pools
            .iter()
            .map(|p| {
                std::array::from_fn(|i| metrics.retries.with_label_values(&[*p, RETRY_REASONS[i]]))
            })
            .collect();
        Self {
            metrics,
            routes,
            tiers: tiers.iter().map(|t| (*t).to_owned()).collect(),
            retries,
        }
    }

    /// The process-wide metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn route(&self, route: Option<usize>) -> &RouteCells {
        let last = self.routes.len() - 1;
        &self.routes[route.unwrap_or(last).min(last)]
    }

    fn tier(&self, class: usize) -> (usize, &str) {
        let class = class.min(self.tiers.len().saturating_sub(1));
        (
            class,
            self.tiers.get(class).map_or("anonymous", String::as_str),
        )
    }

    /// Records one finished request (`status` 0 = no response was sent).
    pub fn request(
        &self,
        route: Option<usize>,
        method: &Method,
        status: u16,
        class: usize,
        seconds: f64,
    ) {
        let cells = self.route(route);
        let (class, tier) = self.tier(class);
        let (m, s) = (method_index(method), status_index(status));
        let all = cells.requests.get_or_init(|| {
            (0..METHODS.len() * STATUS_CLASSES.len() * self.tiers.len().max(1))
                .map(|_| OnceLock::new())
                .collect()
        });
        let i = (m * STATUS_CLASSES.len() + s) * self.tiers.len().max(1) + class;
        let Some(cell) = all.get(i) else {
            return;
        };
        let cell = cell.get_or_init(|| {
            let labels = [cells.name.as_str(), METHODS[m], STATUS_CLASSES[s], tier];
            RequestCell {
                count: self.metrics.requests.with_label_values(&labels),
                duration: self.metrics.duration.with_label_values(&labels),
            }
        });
        cell.count.inc();
        cell.duration.observe(seconds);
    }

    /// Records one rate-limit decision.
    pub fn rate_limit(
        &self,
        route: Option<usize>,
        class: usize,
        allowed: bool,
        source: DecisionSource,
    ) {
        let cells = self.route(route);
        let (class, tier) = self.tier(class);
        let o = usize::from(!allowed);
        let src = match source {
            DecisionSource::Local => 0,
            DecisionSource::Leased => 1,
            DecisionSource::Fallback => 2,
        };
        let all = cells.ratelimit.get_or_init(|| {
            (0..2 * SOURCES.len() * self.tiers.len().max(1))
                .map(|_| OnceLock::new())
                .collect()
        });
        let i = (o * SOURCES.len() + src) * self.tiers.len().max(1) + class;
        if let Some(cell) = all.get(i) {
            cell.get_or_init(|| {
                let outcome = if allowed { "allowed" } else { "rejected" };
                self.metrics.ratelimit.with_label_values(&[
                    cells.name.as_str(),
                    tier,
                    outcome,
                    SOURCES[src],
                ])
            })
            .inc();
        }
    }

    /// Records a retry on pool `pool`.
    pub fn retry(&self, pool: usize, reason: RetryReason) {
        if let Some(r) = self.retries.get(pool) {
            r[reason as usize].inc();
        }
    }

    /// Records an upstream attempt's duration on `backend` of `pool`.
    pub fn upstream(&self, pool: &str, backend: &Backend, seconds: f64) {
        backend
            .metric
            .get_or_init(|| {
                self.metrics
                    .upstream
                    .with_label_values(&[pool, &backend.addr_text])
            })
            .observe(seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_label_indices_cover_every_value() {
        assert_eq!(status_index(0), 5);
        assert_eq!(status_index(101), 0);
        assert_eq!(status_index(204), 1);
        assert_eq!(status_index(429), 3);
        assert_eq!(status_index(599), 4);
        assert_eq!(status_index(600), 5);
        assert_eq!(METHODS[method_index(&Method::PATCH)], "PATCH");
        let odd = Method::from_bytes(b"PROPFIND").unwrap();
        assert_eq!(METHODS[method_index(&odd)], "OTHER");
    }

    #[test]
    fn test_recorded_requests_appear_with_their_labels() {
        let metrics = Metrics::new().unwrap();
        let rm = RequestMetrics::new(metrics.clone(), &["users"], &["FREE", "anonymous"], &["p"]);
        for _ in 0..3 {
            rm.request(Some(0), &Method::GET, 200, 0, 0.002);
        }
        rm.request(None, &Method::POST, 404, 1, 0.0001);
        rm.request(Some(0), &Method::GET, 0, 7, 0.0001);
        rm.rate_limit(Some(0), 0, false, DecisionSource::Leased);
        rm.retry(0, RetryReason::Status);
        let text = {
            let mut out = String::new();
            prometheus::TextEncoder::new()
                .encode_utf8(&metrics.registry.gather(), &mut out)
                .unwrap();
            out
        };
        for line in [
            "tiergate_requests_total{method=\"GET\",route=\"users\",status_class=\"2xx\",tier=\"FREE\"} 3",
            "tiergate_requests_total{method=\"POST\",route=\"unmatched\",status_class=\"4xx\",tier=\"anonymous\"} 1",
            // An out-of-range class is clamped to the last (anonymous).
            "tiergate_requests_total{method=\"GET\",route=\"users\",status_class=\"none\",tier=\"anonymous\"} 1",
            "tiergate_request_duration_seconds_bucket{method=\"GET\",route=\"users\",status_class=\"2xx\",tier=\"FREE\",le=\"0.0025\"} 3",
            "tiergate_ratelimit_decisions_total{outcome=\"rejected\",route=\"users\",source=\"redis\",tier=\"FREE\"} 1",
            "tiergate_upstream_retries_total{reason=\"status\",upstream=\"p\"} 1",
            "tiergate_config_reloads_total{result=\"error\"} 0",
            "# TYPE tiergate_build_info gauge",
        ] {
            assert!(text.contains(line), "missing `{line}` in\n{text}");
        }
    }
}
