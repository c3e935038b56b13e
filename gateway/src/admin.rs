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
//!
//! With `TIERGATE_ADMIN_TOKEN` set, every request needs it: as a bearer
//! token (`Authorization: Bearer <token>`, for Prometheus and scripts) or
//! as the password of HTTP Basic authentication (any user name; browsers
//! ask for it when they get the 401). Without a token the listener must be
//! on a loopback address ([`crate::server::check_safety`]).

use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use http::{HeaderValue, StatusCode};
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorType, Result};
use pingora_proxy::{ProxyHttp, Session};

use base64::Engine as _;

use crate::auth::Authenticator;
use crate::exposition;
use crate::health;
use crate::metrics::Metrics;
use crate::request_id::new_request_id;
use crate::respond::{self, ErrorResponse};
use crate::secret::Secret;
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

/// A request without the admin token.
const UNAUTHORIZED: ErrorResponse = ErrorResponse {
    status: StatusCode::UNAUTHORIZED,
    code: "admin_token_required",
    message: "the admin listener needs its token (Authorization: Bearer, or Basic with the token as password)",
};

/// The admin service; reads the same snapshot cell as the proxy.
#[derive(Debug)]
pub struct Admin {
    state: Arc<ArcSwap<Snapshot>>,
    metrics: Arc<Metrics>,
    /// SHA-256 of the token every request must carry, when one is set.
    token_digest: Option<[u8; 32]>,
}

impl Admin {
    /// An admin service over `state` and `metrics`, requiring `token`
    /// when given.
    pub fn new(
        state: Arc<ArcSwap<Snapshot>>,
        metrics: Arc<Metrics>,
        token: Option<&Secret>,
    ) -> Self {
        Self {
            state,
            metrics,
            token_digest: token.map(|t| digest(t.expose().as_bytes())),
        }
    }

    /// Whether `authorization` carries the token (always, without one).
    fn authorized(&self, authorization: Option<&HeaderValue>) -> bool {
        let Some(want) = &self.token_digest else {
            return true;
        };
        let Some(header) = authorization else {
            return false;
        };
        let offered = match header.as_bytes().split_at_checked(6) {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case(b"basic ") => {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(rest.trim_ascii())
                    .unwrap_or_default();
                match decoded.iter().position(|&b| b == b':') {
                    Some(colon) => decoded[colon + 1..].to_vec(),
                    None => return false,
                }
            }
            _ => match Authenticator::bearer(Some(header)) {
                Some(token) => token.to_vec(),
                None => return false,
            },
        };
        // Digests of equal length, compared without an early exit.
        let got = digest(&offered);
        got.iter().zip(want).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

#[async_trait]
impl ProxyHttp for Admin {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn request_filter(&self, session: &mut Session, _ctx: &mut ()) -> Result<bool> {
        let id = new_request_id();
        let snapshot = self.state.load_full();
        crate::proxy::keep_alive(session, &snapshot);
        if !self.authorized(
            session
                .req_header()
                .headers
                .get(http::header::AUTHORIZATION),
        ) {
            let challenge = HeaderValue::from_static("Basic realm=\"tiergate admin\", Bearer");
            UNAUTHORIZED
                .write(session, &id, None, &[("www-authenticate", challenge)])
                .await?;
            return Ok(true);
        }
        let req = session.req_header();
        let get = req.method == http::Method::GET || req.method == http::Method::HEAD;
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
            _ => match health::answer(&snapshot, path, health::View::Admin) {
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
