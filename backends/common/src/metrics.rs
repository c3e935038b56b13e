//! Prometheus metrics of a service, served at `GET /metrics`.

use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// Request and outbox metrics of one service. Cheap to clone.
#[derive(Clone)]
pub struct HttpMetrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    /// Outbox deliveries by result (`delivered`, `failed`).
    pub outbox_deliveries: IntCounterVec,
    /// Outbox deliveries not yet acknowledged (refreshed every 15 s).
    pub outbox_pending: IntGauge,
    /// Outbox deliveries parked as dead (refreshed every 15 s).
    pub outbox_dead: IntGauge,
    /// Deliveries parked as dead, by event type.
    pub outbox_dead_total: IntCounterVec,
    /// Events received by consumers, by result (`applied`, `duplicate`,
    /// `stale`, `ignored`, `rejected`).
    pub events_consumed: IntCounterVec,
}

impl HttpMetrics {
    /// Metrics labelled `service="<name>"`.
    pub fn new(service: &str) -> Self {
        let registry = Registry::new_custom(
            None,
            Some(std::iter::once(("service".to_owned(), service.to_owned())).collect()),
        )
        .unwrap_or_default();
        let requests = IntCounterVec::new(
            Opts::new("http_requests_total", "HTTP requests handled"),
            &["route", "method", "status"],
        )
        .unwrap_or_else(|_| unreachable!("static metric definition"));
        let duration = HistogramVec::new(
            HistogramOpts::new("http_request_duration_seconds", "HTTP request latency").buckets(
                vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ],
            ),
            &["route", "method"],
        )
        .unwrap_or_else(|_| unreachable!("static metric definition"));
        let outbox_deliveries = IntCounterVec::new(
            Opts::new(
                "outbox_deliveries_total",
                "Outbox delivery attempts by result",
            ),
            &["event_type", "result"],
        )
        .unwrap_or_else(|_| unreachable!("static metric definition"));
        let outbox_pending = IntGauge::new(
            "outbox_pending",
            "Outbox deliveries waiting (refreshed every 15 s)",
        )
        .unwrap_or_else(|_| unreachable!("static metric definition"));
        let outbox_dead = IntGauge::new(
            "outbox_dead",
            "Outbox deliveries parked as dead (refreshed every 15 s)",
        )
        .unwrap_or_else(|_| unreachable!("static metric definition"));
        let outbox_dead_total = IntCounterVec::new(
            Opts::new(
                "outbox_dead_total",
                "Outbox deliveries parked as dead, by event type",
            ),
            &["event_type"],
        )
        .unwrap_or_else(|_| unreachable!("static metric definition"));
        let events_consumed = IntCounterVec::new(
            Opts::new("events_consumed_total", "Events received by consumers"),
            &["event_type", "result"],
        )
        .unwrap_or_else(|_| unreachable!("static metric definition"));
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(duration.clone()),
            Box::new(outbox_deliveries.clone()),
            Box::new(outbox_pending.clone()),
            Box::new(outbox_dead.clone()),
            Box::new(outbox_dead_total.clone()),
            Box::new(events_consumed.clone()),
        ] {
            // Registering fresh collectors in a fresh registry cannot clash.
            let _ = registry.register(c);
        }
        Self {
            registry,
            requests,
            duration,
            outbox_deliveries,
            outbox_pending,
            outbox_dead,
            outbox_dead_total,
            events_consumed,
        }
    }

    /// Records one handled request. `route` is the matched pattern
    /// (`/api/admin/users/{id}`), never the raw path.
    pub fn observe(&self, route: &str, method: &str, status: u16, elapsed: Duration) {
        let status = status.to_string();
        self.requests
            .with_label_values(&[route, method, status.as_str()])
            .inc();
        self.duration
            .with_label_values(&[route, method])
            .observe(elapsed.as_secs_f64());
    }

    /// Registers a service's own metric (labelled with the service like
    /// the rest); an error when its name is taken.
    pub fn register(
        &self,
        c: impl prometheus::core::Collector + 'static,
    ) -> Result<(), prometheus::Error> {
        self.registry.register(Box::new(c))
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}
