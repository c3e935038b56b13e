//! The admin listener (default `127.0.0.1:8090`): operator endpoints kept
//! off the public port. It never proxies.
//!
//! * `GET /` — the status page (one self-contained HTML file, no external
//!   resources), which polls
//! * `GET /api/status` — pools, backends, per-route and per-tier counts,
//!   rate limiter and Redis state, as JSON;
//! * `GET /metrics` — Prometheus text exposition;
//! * `GET /health`, `GET /health/services` — as on the public listener.
//!
//! Anything else is a 404 in the usual JSON envelope.

use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use http::{HeaderValue, StatusCode};
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorType, Result};
use pingora_proxy::{ProxyHttp, Session};

use crate::exposition;
use crate::health;
use crate::metrics::Metrics;
use crate::request_id::new_request_id;
use crate::respond::{self, ErrorResponse};
use crate::snapshot::Snapshot;

/// The status page.
const STATUS_PAGE: &str = include_str!("status.html");
/// The page may run its own inline script and talk to this origin only.
const PAGE_CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; \
     style-src 'unsafe-inline'; connect-src 'self'; img-src data:; \
     base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Not an admin endpoint.
const NOT_FOUND: ErrorResponse = ErrorResponse {
    status: StatusCode::NOT_FOUND,
    code: "not_found",
    message: "the admin listener serves GET /, /api/status, /metrics, /health and /health/services",
};

/// The admin service; reads the same snapshot cell as the proxy.
#[derive(Debug)]
pub struct Admin {
    state: Arc<ArcSwap<Snapshot>>,
    metrics: Arc<Metrics>,
}

impl Admin {
    /// An admin service over `state` and `metrics`.
    pub fn new(state: Arc<ArcSwap<Snapshot>>, metrics: Arc<Metrics>) -> Self {
        Self { state, metrics }
    }
}

#[async_trait]
impl ProxyHttp for Admin {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn request_filter(&self, session: &mut Session, _ctx: &mut ()) -> Result<bool> {
        let id = new_request_id();
        let req = session.req_header();
        let get = req.method == http::Method::GET || req.method == http::Method::HEAD;
        let snapshot = self.state.load_full();
        let path = req.uri.path();
        if !get {
            NOT_FOUND.write(session, &id, None, &[]).await?;
            return Ok(true);
        }
        match path {
            "/" => {
                let csp = HeaderValue::from_static(PAGE_CSP);
                let extra = [
                    ("content-security-policy", csp),
                    (
                        "x-content-type-options",
                        HeaderValue::from_static("nosniff"),
                    ),
                ];
                respond::write(
                    session,
                    StatusCode::OK,
                    "text/html; charset=utf-8",
                    &id,
                    STATUS_PAGE.into(),
                    &extra,
                )
                .await?;
            }
            "/metrics" => {
                let body = exposition::render(&self.metrics, &snapshot);
                respond::write(
                    session,
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    &id,
                    body.into(),
                    &[],
                )
                .await?;
            }
            "/api/status" => {
                let doc = exposition::status(&self.metrics, &snapshot);
                respond::write_json(session, StatusCode::OK, &id, doc.to_string().into(), &[])
                    .await?;
            }
            _ => match health::answer(&snapshot, path) {
                Some((status, doc)) => {
                    respond::write_json(session, status, &id, doc.to_string().into(), &[]).await?;
                }
                None => NOT_FOUND.write(session, &id, None, &[]).await?,
            },
        }
        Ok(true)
    }

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Error::e_explain(ErrorType::InternalError, "the admin listener never proxies")
    }
}
