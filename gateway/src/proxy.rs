//! The `ProxyHttp` implementation: wires Pingora's phases to the router and
//! pools. Phase by phase:
//!
//! * `request_filter`: request id, route match (404/405 answered here),
//!   then [`crate::guard::admit`]: token, tier/role access, rate limit
//!   (401/403/429 answered here);
//! * `upstream_peer`: backend selection, per-route timeouts;
//! * `fail_to_connect`: connect failures retried on another backend;
//! * `upstream_request_filter`: path rewrite, `Host`, forwarding headers,
//!   identity headers (client-sent copies always removed first);
//! * `response_filter`: `X-Request-Id` and rate-limit headers;
//! * `fail_to_proxy`: the one place errors become JSON responses;
//! * `logging`: breaker feedback, metrics, the access log.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus::IntGauge;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use http::header::HOST;
use http::{HeaderValue, Uri};
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, Result, RetryType};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use bytes::Bytes;
use lua_free_plugins::{Chain, LogSummary, PluginCtx, Response as PluginResponse};

use crate::access_log::{self, Entry};
use crate::config::{PathMatch, PathRewrite, RouteSpec, UpstreamHost};
use crate::guard::{self, Admission, X_USER_ID, X_USER_ROLES, X_USER_TENANT, X_USER_TIER};
use crate::health;
use crate::metrics::{Metrics, RetryReason};
use crate::respond::{self, ErrorResponse};
use crate::router::RouteMatch;
use crate::snapshot::Snapshot;
use crate::trace::{TraceContext, TraceIdHex, TRACEPARENT};
use crate::upstream::breaker::{self, Permit};
use crate::upstream::select::Tried;
use crate::upstream::{Backend, HashInput, InflightGuard, Members};

/// Most attempts (first try + retries) for one request.
const MAX_ATTEMPTS: usize = 3;
/// How long an idle pooled upstream connection is kept.
const UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest client-supplied `X-Request-Id` we pass on unchanged.
const MAX_REQUEST_ID_LEN: usize = 128;

static X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: http::HeaderName = http::HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: http::HeaderName = http::HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: http::HeaderName = http::HeaderName::from_static("x-forwarded-host");

/// The gateway's proxy logic; cheap to clone, shares the snapshot cell.
#[derive(Debug, Clone)]
pub struct Gateway {
    state: Arc<ArcSwap<Snapshot>>,
    metrics: Arc<Metrics>,
}

impl Gateway {
    /// A proxy reading routes and pools from `state`, counting in `metrics`.
    pub fn new(state: Arc<ArcSwap<Snapshot>>, metrics: Arc<Metrics>) -> Self {
        Self { state, metrics }
    }
}

/// Counts a request in `tiergate_requests_in_flight` while it lives.
#[derive(Debug)]
struct InFlight(IntGauge);

impl InFlight {
    fn new(gauge: &IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Per-request state.
#[derive(Debug)]
pub struct RequestCtx {
    /// When the request header had been read.
    started: Instant,
    /// Counts the request as in flight.
    _in_flight: InFlight,
    /// Its trace (continued or started in `request_filter`).
    trace: Option<TraceContext>,
    /// The client's address (after trusted proxies), once routed.
    client: Option<IpAddr>,
    /// Start of the current upstream attempt, until it got a response
    /// header or failed.
    attempt_started: Option<Instant>,
    /// Duration of the last finished upstream attempt.
    upstream_time: Option<Duration>,
    /// Code of the error response the gateway wrote, if it wrote one.
    error_code: Option<&'static str>,
    /// The snapshot this request was routed with (kept for its lifetime).
    snapshot: Option<Arc<Snapshot>>,
    /// Index of the matched route.
    route: Option<usize>,
    /// `X-Request-Id`, from the client when sane, else a new UUIDv7.
    request_id: Option<HeaderValue>,
    /// Backends that refused a connection; retries avoid them.
    failed: Tried,
    /// Attempts made.
    attempts: usize,
    /// Counts this request against its current backend.
    inflight: Option<InflightGuard>,
    /// The pool's backends as of the first attempt (indices below are
    /// into these).
    members: Option<Arc<Members>>,
    /// Index of the current backend in `members`.
    backend: Option<usize>,
    /// End of the route's `total` budget.
    deadline: Option<Instant>,
    /// Who the request was admitted as, and its rate-limit verdict.
    admission: Option<Admission>,
    /// The current backend's breaker permit, until its outcome is recorded.
    permit: Option<Permit>,
    /// When every backend is unhealthy or its circuit open: when one may
    /// be tried again.
    retry_after: Option<Duration>,
    /// Retries made because of an upstream error status or an error after
    /// the upstream connection was made.
    status_retries: u32,
    /// The request body is kept for a retry.
    body_buffered: bool,
    /// The route's plugins' per-request context (routes with plugins only).
    plugins: Option<PluginCtx>,
    /// A response a plugin gave while the body streamed in: written by
    /// `fail_to_proxy` instead of an error.
    plugin_response: Option<PluginResponse>,
    /// A plugin answered instead of the upstream.
    answered_by_plugin: bool,
}

impl RequestCtx {
    fn request_id(&mut self) -> &HeaderValue {
        self.request_id.get_or_insert_with(new_request_id)
    }

    /// The trace id as text, for bodies and logs.
    fn trace_id(&self) -> Option<TraceIdHex> {
        self.trace.as_ref().map(TraceContext::trace_id_hex)
    }

    /// The request id as text, once assigned.
    fn request_id_str(&self) -> Option<&str> {
        self.request_id.as_ref().and_then(|v| v.to_str().ok())
    }

    fn route(&self) -> Option<(&Snapshot, &RouteSpec)> {
        let snapshot = self.snapshot.as_deref()?;
        let route = snapshot.routes.get(self.route?)?;
        Some((snapshot, route))
    }

    /// The backend of the current attempt.
    fn current_backend(&self) -> Option<&Arc<Backend>> {
        self.members.as_ref()?.backends.get(self.backend?)
    }

    /// How many backends this request can choose from.
    fn pool_size(&self) -> usize {
        self.members.as_ref().map_or(0, |m| m.backends.len())
    }
}

/// A new UUIDv7 request id. Not `Uuid::now_v7()`: that takes a global mutex
/// per call; uniqueness here comes from 74 random bits per millisecond.
pub fn new_request_id() -> HeaderValue {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut random = [0u8; 10];
    fastrand::fill(&mut random);
    let id = uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid();
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let text = id.hyphenated().encode_lower(&mut buf);
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// Client ids are kept if short and made of visible ASCII without quotes or
/// backslashes (they end up in JSON and logs).
fn acceptable_request_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_REQUEST_ID_LEN
        && b.iter()
            .all(|&c| c.is_ascii_graphic() && c != b'"' && c != b'\\')
}

fn client_ip(session: &Session) -> Option<IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}

/// The rewritten path-and-query, or `None` when unchanged.
fn rewrite_path(route: &RouteSpec, uri: &Uri) -> Option<String> {
    let path = uri.path();
    let new_path = match &route.rewrite {
        PathRewrite::None => return None,
        PathRewrite::ReplacePrefix(replacement) => {
            let PathMatch::Prefix(prefix) = &route.path else {
                return None;
            };
            let rest = if prefix == "/" {
                path
            } else {
                path.strip_prefix(prefix.as_str()).unwrap_or(path)
            };
            let mut p = String::with_capacity(replacement.len() + rest.len() + 1);
            p.push_str(replacement);
            p.push_str(rest);
            if !p.starts_with('/') {
                p.insert(0, '/');
            }
            p
        }
        PathRewrite::Regex(re, replacement) => {
            let p = re.replace(path, replacement.as_str()).into_owned();
            if p.starts_with('/') {
                p
            } else {
                format!("/{p}")
            }
        }
    };
    Some(match uri.query() {
        Some(q) => format!("{new_path}?{q}"),
        None => new_path,
    })
}

/// Whether a request carries a body (a length above 0, or chunked).
fn request_has_body(headers: &http::HeaderMap) -> bool {
    headers.contains_key(http::header::TRANSFER_ENCODING)
        || headers
            .get(http::header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
}

/// Records the current attempt's outcome with its backend's breaker (once).
fn record_outcome(ctx: &mut RequestCtx, failed: bool) {
    let Some(permit) = ctx.permit.take() else {
        return;
    };
    let pool = ctx.route().and_then(|(s, r)| s.pools.get(r.upstream));
    if let (Some(pool), Some(b)) = (pool, ctx.current_backend()) {
        b.breaker
            .record(&pool.breaker, permit, failed, breaker::now_ns());
    }
}

/// Ends the current upstream attempt's clock (once) and records its
/// duration for its backend.
fn end_attempt(ctx: &mut RequestCtx) {
    let Some(start) = ctx.attempt_started.take() else {
        return;
    };
    let took = start.elapsed();
    ctx.upstream_time = Some(took);
    if let (Some((snapshot, route)), Some(b)) = (ctx.route(), ctx.current_backend()) {
        if let Some(pool) = snapshot.pools.get(route.upstream) {
            snapshot.metrics.upstream(&pool.name, b, took.as_secs_f64());
        }
    }
}

/// Counts a retry of the current request's pool.
fn count_retry(ctx: &RequestCtx, reason: RetryReason) {
    if let Some((snapshot, route)) = ctx.route() {
        snapshot.metrics.retry(route.upstream, reason);
    }
}

/// Whether the current attempt, which would answer `status`, may be
/// retried on another backend: the status is in the route's
/// `retry.on_statuses`, its `attempts` are not used up, the method is
/// idempotent, the body can be resent (none, or all of it kept), an untried
/// backend is left and the pool's retry budget has a token. When it may,
/// the retry is booked (backend marked tried, budget spent).
fn book_retry(session: &Session, ctx: &mut RequestCtx, status: u16) -> bool {
    let Some((snapshot, route)) = ctx.route() else {
        return false;
    };
    let req = session.req_header();
    if !route.retry.on_statuses.contains(&status)
        || ctx.status_retries >= route.retry.attempts
        || !req.method.is_idempotent()
        || session.retry_buffer_truncated()
        || (request_has_body(&req.headers) && !ctx.body_buffered)
    {
        return false;
    }
    let Some(pool) = snapshot.pools.get(route.upstream) else {
        return false;
    };
    let mut tried = ctx.failed;
    if let Some(i) = ctx.backend {
        tried.insert(i);
    }
    if tried.len() >= ctx.pool_size() || !pool.retry_budget.try_withdraw() {
        return false;
    }
    ctx.failed = tried;
    ctx.status_retries += 1;
    true
}

/// Whether an error is the upstream's fault (counts against its breaker).
fn upstream_failure(e: &Error) -> bool {
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

/// Maps a Pingora error to the response the client gets; `None` when the
/// client is gone and nothing can be written.
fn error_response(e: &Error) -> Option<ErrorResponse> {
    use ErrorType as T;
    Some(match e.etype() {
        T::HTTPStatus(400) => respond::BAD_REQUEST,
        T::HTTPStatus(408) => respond::REQUEST_TIMEOUT,
        T::HTTPStatus(502) => respond::BAD_GATEWAY,
        T::HTTPStatus(503) => respond::NO_BACKEND,
        T::HTTPStatus(504) => respond::GATEWAY_TIMEOUT,
        T::HTTPStatus(code) => match http::StatusCode::from_u16(*code) {
            Ok(status) if status.is_client_error() => ErrorResponse {
                status,
                ..respond::BAD_REQUEST
            },
            _ => respond::INTERNAL,
        },
        etype => match e.esource() {
            ErrorSource::Upstream => match etype {
                T::ConnectTimedout | T::ReadTimedout | T::WriteTimedout => respond::GATEWAY_TIMEOUT,
                T::InvalidHTTPHeader | T::H1Error | T::H2Error | T::InvalidH2 => {
                    respond::BAD_UPSTREAM_RESPONSE
                }
                _ => respond::BAD_GATEWAY,
            },
            ErrorSource::Downstream => match etype {
                T::ReadError | T::WriteError | T::ConnectionClosed => return None,
                T::ReadTimedout => respond::REQUEST_TIMEOUT,
                _ => respond::BAD_REQUEST,
            },
            ErrorSource::Internal | ErrorSource::Unset => match etype {
                T::ConnectTimedout => respond::GATEWAY_TIMEOUT,
                T::ConnectRefused | T::ConnectNoRoute | T::ConnectError => respond::BAD_GATEWAY,
                _ => respond::INTERNAL,
            },
        },
    })
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            started: Instant::now(),
            _in_flight: InFlight::new(&self.metrics.in_flight),
            trace: None,
            client: None,
            attempt_started: None,
            upstream_time: None,
            error_code: None,
            snapshot: None,
            route: None,
            request_id: None,
            failed: Tried::default(),
            attempts: 0,
            inflight: None,
            backend: None,
            deadline: None,
            admission: None,
            permit: None,
            retry_after: None,
            status_retries: 0,
            body_buffered: false,
            members: None,
            plugins: None,
            plugin_response: None,
            answered_by_plugin: false,
        }
    }

    /// Assigns the request id, the trace and the route; answers 404/405
    /// and refusals itself (`Ok(true)` = response already sent).
    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let req = session.req_header();
        ctx.request_id = Some(match req.headers.get(&X_REQUEST_ID) {
            Some(v) if acceptable_request_id(v) => v.clone(),
            _ => new_request_id(),
        });
        ctx.trace = Some(TraceContext::continue_or_start(
            req.headers.get(&TRACEPARENT),
        ));
        let snapshot = self.state.load_full();
        ctx.snapshot = Some(snapshot.clone());
        if req.method == http::Method::GET || req.method == http::Method::HEAD {
            if let Some((status, doc)) = health::answer(&snapshot, req.uri.path()) {
                let id = ctx.request_id().clone();
                respond::write_json(session, status, &id, doc.to_string().into(), &[]).await?;
                return Ok(true);
            }
        }
        let req = session.req_header();
        let host = req
            .headers
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri.host())
            .unwrap_or("");
        match snapshot
            .router
            .find(host, req.uri.path(), &req.method, &req.headers)
        {
            RouteMatch::Found(i) => {
                let Some(route) = snapshot.routes.get(i) else {
                    return Error::e_explain(ErrorType::InternalError, "route index out of range");
                };
                let client =
                    guard::client_ip(client_ip(session), &req.headers, &snapshot.trusted_proxies);
                ctx.client = client;
                ctx.route = Some(i);
                let has_body = request_has_body(&req.headers);
                let idempotent = req.method.is_idempotent();
                // A request a plugin answers without a caller (a CORS
                // preflight) skips auth and rate limiting.
                let before_auth =
                    !route.plugins.is_empty() && route.plugins.answers_before_auth(req);
                if before_auth {
                    ctx.admission = Some(Admission {
                        identity: None,
                        class: snapshot.limiter.anonymous(),
                        verdict: None,
                    });
                } else if admit(session, ctx, &snapshot, route, client).await? {
                    return Ok(true);
                }
                if idempotent && has_body && route.retry.attempts > 0 {
                    // Keep (up to 64 KiB of) the body so a retry can resend it;
                    // a longer body is never retried.
                    session.enable_retry_buffering();
                    ctx.body_buffered = true;
                }
                ctx.deadline = route.timeouts.total.map(|t| Instant::now() + t);
                if route.plugins.is_empty() {
                    return Ok(false);
                }
                let mut p = PluginCtx::new(route.label.clone());
                p.client_ip = client;
                p.peer_ip = client_ip(session);
                p.subject = ctx
                    .admission
                    .as_ref()
                    .and_then(|a| a.identity.as_ref())
                    .and_then(|id| id.subject.to_str().ok())
                    .map(str::to_owned);
                let answer = route.plugins.request(session.req_header_mut(), &mut p);
                let Some(resp) = answer else {
                    ctx.plugins = Some(p);
                    if before_auth {
                        // It was to be answered without a caller, but no
                        // plugin did: admit it like any other request.
                        return admit(session, ctx, &snapshot, route, client).await;
                    }
                    return Ok(false);
                };
                ctx.answered_by_plugin = true;
                let id = ctx.request_id().clone();
                let written =
                    write_plugin_response(session, &id, &route.plugins, resp, &mut p).await;
                ctx.plugins = Some(p);
                written.map(|()| true)
            }
            RouteMatch::NotFound => refuse(session, ctx, &respond::NOT_FOUND, &[]).await,
            RouteMatch::MethodNotAllowed(methods) => {
                let allow: Vec<&str> = methods.iter().map(|m| m.as_str()).collect();
                let allow = HeaderValue::from_str(&allow.join(", "))
                    .unwrap_or_else(|_| HeaderValue::from_static(""));
                refuse(
                    session,
                    ctx,
                    &respond::METHOD_NOT_ALLOWED,
                    &[("allow", allow)],
                )
                .await
            }
        }
    }

    /// Picks a backend the request has not failed on, with the route's
    /// timeouts capped by what is left of its `total` budget.
    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        if ctx.members.is_none() {
            ctx.members = ctx
                .route()
                .and_then(|(s, r)| s.pools.get(r.upstream))
                .map(|p| p.members());
        }
        let (Some((snapshot, route)), Some(members)) = (ctx.route(), ctx.members.as_deref()) else {
            return Error::e_explain(ErrorType::InternalError, "upstream_peer without a route");
        };
        let Some(pool) = snapshot.pools.get(route.upstream) else {
            return Error::e_explain(ErrorType::InternalError, "route points to no pool");
        };
        let remaining = match ctx.deadline {
            Some(deadline) => match deadline.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => Some(left),
                _ => return Error::e_explain(ErrorType::HTTPStatus(504), "total timeout spent"),
            },
            None => None,
        };
        let ip_bytes;
        let hash = if pool.needs_hash_input() {
            ip_bytes = match client_ip(session) {
                Some(IpAddr::V4(v4)) => v4.to_ipv6_mapped().octets(),
                Some(IpAddr::V6(v6)) => v6.octets(),
                None => [0; 16],
            };
            let header = pool
                .hash_header()
                .and_then(|h| session.req_header().headers.get(h))
                .map(|v| v.as_bytes());
            Some(HashInput {
                header,
                client_ip: &ip_bytes,
            })
        } else {
            None
        };
        if ctx.attempts == 0 {
            pool.retry_budget.deposit();
        }
        // Backends whose circuit is open or that fail their health checks
        // are skipped like failed ones; when nothing is left because of
        // them, answer 503 at once.
        let now = breaker::now_ns();
        let mut skip = ctx.failed;
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
                    ctx.retry_after = Some(wait);
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
        peer.options.connection_timeout = cap(route.timeouts.connect);
        peer.options.read_timeout = cap(route.timeouts.read);
        peer.options.write_timeout = cap(route.timeouts.write);
        peer.options.idle_timeout = Some(UPSTREAM_IDLE_TIMEOUT);
        let guard = InflightGuard::new(backend.clone());
        ctx.attempts += 1;
        ctx.backend = Some(i);
        ctx.inflight = Some(guard);
        ctx.permit = Some(permit);
        ctx.attempt_started = Some(Instant::now());
        Ok(peer)
    }

    /// Connect failures are retried on another backend while any is left.
    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        end_attempt(ctx);
        if let Some(i) = ctx.backend {
            ctx.failed.insert(i);
        }
        record_outcome(ctx, true);
        if ctx.attempts < MAX_ATTEMPTS && ctx.failed.len() < ctx.pool_size() {
            e.set_retry(true);
            count_retry(ctx, RetryReason::Connect);
        }
        e
    }

    /// Path rewrite, `Host`, `X-Forwarded-*`, `X-Request-Id` and
    /// `traceparent`.
    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let client = client_ip(session);
        with_plain_headers(upstream, |parts| edit_upstream_request(parts, ctx, client))?;
        if let Some(mut p) = ctx.plugins.take() {
            // A new attempt: Pingora sends the (buffered) body again.
            p.body_bytes = 0;
            if let Some((_, route)) = ctx.route() {
                route.plugins.upstream_request(upstream, &mut p);
            }
            ctx.plugins = Some(p);
        }
        Ok(())
    }

    /// Counts the body for the plugins and runs their `request_body`
    /// hooks; a plugin's answer aborts the request (`fail_to_proxy`
    /// writes it).
    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let Some(mut p) = ctx.plugins.take() else {
            return Ok(());
        };
        p.body_bytes += body.as_ref().map_or(0, |b| b.len() as u64);
        let answer = ctx.route().and_then(|(_, route)| {
            route
                .plugins
                .request_body(body.as_ref(), end_of_stream, &mut p)
        });
        ctx.plugins = Some(p);
        match answer {
            Some(resp) => {
                let status = resp.status.as_u16();
                ctx.plugin_response = Some(resp);
                Error::e_explain(ErrorType::HTTPStatus(status), "request refused by a plugin")
            }
            None => Ok(()),
        }
    }

    /// An upstream status listed in the route's `retry.on_statuses` is
    /// retried on another backend (by failing this attempt with a retryable
    /// error) when [`book_retry`] allows it. Otherwise the response goes to
    /// the client as is.
    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        end_attempt(ctx);
        let status = upstream.status.as_u16();
        if !book_retry(session, ctx, status) {
            if let Some(mut p) = ctx.plugins.take() {
                if let Some((_, route)) = ctx.route() {
                    route.plugins.upstream_response(upstream, &mut p);
                }
                ctx.plugins = Some(p);
            }
            return Ok(());
        }
        count_retry(ctx, RetryReason::Status);
        record_outcome(ctx, true);
        let mut e = Error::explain(
            ErrorType::HTTPStatus(status),
            "upstream error status; retrying on another backend",
        );
        e.set_retry(true);
        Err(e)
    }

    /// An error after the upstream connection was made (reset, read
    /// timeout, bad response) counts against the backend's breaker and is
    /// retried on another backend like the status it becomes (502 or 504),
    /// as long as nothing was sent to the client yet. A stale pooled
    /// connection is retried as Pingora does (not the backend's fault).
    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        if matches!(e.etype(), ErrorType::HTTPStatus(_)) && e.retry() {
            // A status retry `upstream_response_filter` already booked.
            return e;
        }
        if ctx.plugin_response.is_some() {
            // A plugin refused the request: answer, never retry.
            let mut e = e;
            e.set_retry(false);
            return e;
        }
        end_attempt(ctx);
        let mut e = e.more_context(format!("Peer: {peer}"));
        let resendable = session.req_header().method.is_idempotent()
            && !session.retry_buffer_truncated()
            && session.response_written().is_none();
        if matches!(e.retry, RetryType::ReusedOnly) && client_reused && resendable {
            record_outcome(ctx, false);
            count_retry(ctx, RetryReason::StaleConnection);
            e.set_retry(true);
            return e;
        }
        record_outcome(ctx, upstream_failure(&e));
        let status = error_response(&e).map_or(502, |r| r.status.as_u16());
        let retry = resendable && book_retry(session, ctx, status);
        if retry {
            count_retry(ctx, RetryReason::Error);
        }
        e.set_retry(retry);
        e
    }

    /// Pingora's error log lines about a request carry its request and
    /// trace ids, so they can be matched with the access log and the
    /// client's error body.
    fn request_summary(&self, session: &Session, ctx: &RequestCtx) -> String {
        format!(
            "{}, request_id: {}, trace_id: {}",
            session.as_ref().request_summary(),
            ctx.request_id_str().unwrap_or("-"),
            ctx.trace_id().unwrap_or(TraceIdHex::NONE).as_str(),
        )
    }

    /// Our own status-triggered retries are expected: no warning per retry.
    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        ctx: &RequestCtx,
        error: &Error,
        _context: pingora_proxy::ProxyWarnLogContext,
    ) -> bool {
        ctx.status_retries > 0 && matches!(error.etype(), ErrorType::HTTPStatus(_))
    }

    /// Returns the request id to the client.
    async fn response_filter(
        &self,
        session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let id = ctx.request_id().clone();
        let empty = http::Response::new(()).into_parts().0;
        let mut parts: http::response::Parts =
            std::mem::replace(response, ResponseHeader::from(empty)).into();
        let h = &mut parts.headers;
        h.reserve(6);
        h.insert(X_REQUEST_ID.clone(), id);
        if let (
            Some(snapshot),
            Some(Admission {
                verdict: Some(v),
                class,
                ..
            }),
        ) = (&ctx.snapshot, &ctx.admission)
        {
            guard::rate_headers(snapshot, *class, v, |name, value| {
                h.insert(http::HeaderName::from_static(name), value);
            });
        }
        *response = ResponseHeader::from(parts);
        if let Some(mut p) = ctx.plugins.take() {
            if let Some((_, route)) = ctx.route() {
                route
                    .plugins
                    .response(session.req_header(), response, &mut p);
            }
            ctx.plugins = Some(p);
        }
        Ok(())
    }

    /// Feeds the outcome of the last attempt to its backend's breaker, then
    /// records the request's metrics and access-log line.
    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        end_attempt(ctx);
        if ctx.permit.is_some() {
            breaker_feedback(session, e, ctx);
        }
        observe(session, ctx);
        if let Some(mut p) = ctx.plugins.take() {
            let summary = LogSummary {
                status: session.response_written().map_or(0, |r| r.status.as_u16()),
                duration: ctx.started.elapsed(),
                answered_by_plugin: ctx.answered_by_plugin,
            };
            if let Some((_, route)) = ctx.route() {
                route.plugins.log(&summary, &mut p);
            }
        }
    }

    /// The one place errors become responses (JSON envelope, request id).
    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        if let (Some(resp), None) = (ctx.plugin_response.take(), session.response_written()) {
            // A plugin refused the request while its body streamed in.
            session.set_keepalive(None);
            ctx.answered_by_plugin = true;
            let status = resp.status.as_u16();
            let id = ctx.request_id().clone();
            if let (Some(mut p), Some(chain)) = (
                ctx.plugins.take(),
                ctx.route().map(|(_, r)| r.plugins.clone()),
            ) {
                if let Err(write_err) =
                    write_plugin_response(session, &id, &chain, resp, &mut p).await
                {
                    tracing::debug!(error = %write_err, "could not send a plugin's response");
                }
                ctx.plugins = Some(p);
            }
            return FailToProxy {
                error_code: status,
                can_reuse_downstream: false,
            };
        }
        let response = error_response(e);
        let code = match response {
            Some(r) if session.response_written().is_none() => {
                // Pingora closes the connection after a proxy failure; say
                // so, or clients reuse it and see a reset.
                session.set_keepalive(None);
                ctx.error_code = Some(r.code);
                let id = ctx.request_id().clone();
                let trace = ctx.trace_id();
                let mut extra = Vec::new();
                if let Some(wait) = ctx.retry_after.filter(|_| r.status.as_u16() == 503) {
                    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                    extra.push(("retry-after", HeaderValue::from(secs.max(1))));
                }
                let trace = trace.as_ref().map(TraceIdHex::as_str);
                if let Err(write_err) = r.write(session, &id, trace, &extra).await {
                    tracing::debug!(error = %write_err, "could not send error response");
                }
                r.status.as_u16()
            }
            Some(r) => r.status.as_u16(),
            None => 0,
        };
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }
}

/// Writes one of the gateway's own error responses (with the request and
/// trace ids) and records its code. `Ok(true)`: the response is sent.
async fn refuse(
    session: &mut Session,
    ctx: &mut RequestCtx,
    response: &ErrorResponse,
    headers: &[(&'static str, HeaderValue)],
) -> Result<bool> {
    ctx.error_code = Some(response.code);
    let id = ctx.request_id().clone();
    let trace = ctx.trace_id();
    response
        .write(
            session,
            &id,
            trace.as_ref().map(TraceIdHex::as_str),
            headers,
        )
        .await?;
    Ok(true)
}

/// Token, tier and role access, rate limit ([`guard::admit`]); the
/// admission goes into `ctx`. `Ok(true)` when refused (the refusal is
/// sent).
async fn admit(
    session: &mut Session,
    ctx: &mut RequestCtx,
    snapshot: &Snapshot,
    route: &RouteSpec,
    client: Option<IpAddr>,
) -> Result<bool> {
    match guard::admit(snapshot, route, &session.req_header().headers, client).await {
        Ok(admission) => {
            ctx.admission = Some(admission);
            Ok(false)
        }
        Err(denial) => {
            ctx.admission = denial.admission;
            refuse(session, ctx, &denial.response, &denial.headers).await
        }
    }
}

/// Writes a plugin's response, after the chain's `response` hooks (with
/// `Content-Length` and the request id).
async fn write_plugin_response(
    session: &mut Session,
    request_id: &HeaderValue,
    chain: &Chain,
    resp: PluginResponse,
    p: &mut PluginCtx,
) -> Result<()> {
    let mut h = ResponseHeader::build(resp.status, Some(resp.headers.len() + 2))?;
    for (name, value) in resp.headers {
        h.append_header(name, value)?;
    }
    // No Content-Length on statuses that cannot have a body (RFC 9110).
    if !matches!(resp.status.as_u16(), 100..=199 | 204 | 304) {
        h.insert_header(http::header::CONTENT_LENGTH, resp.body.len())?;
    }
    h.insert_header(X_REQUEST_ID.clone(), request_id.clone())?;
    chain.response(session.req_header(), &mut h, p);
    let head_only = session.req_header().method == http::Method::HEAD || resp.body.is_empty();
    session
        .write_response_header(Box::new(h), head_only)
        .await?;
    if !head_only {
        session.write_response_body(Some(resp.body), true).await?;
    }
    Ok(())
}

/// Runs `edit` on the request's `http` parts, taken out of Pingora's
/// header type and put back without its case-preserving name map.
///
/// Pingora's own insert parses and allocates each name and writes it to
/// two maps, sized to the parsed headers so they also grow: ~1.3 k
/// instructions per header, and the proxy adds up to nine. Direct
/// `HeaderMap` inserts with static names cost a tenth of that (callgrind,
/// docs/BENCHMARKS.md). The price: header names go upstream in lower case
/// (standard ones title-cased), which HTTP allows and Envoy does too.
fn with_plain_headers(
    upstream: &mut RequestHeader,
    edit: impl FnOnce(&mut http::request::Parts) -> Result<()>,
) -> Result<()> {
    let empty = http::Request::new(()).into_parts().0;
    let mut parts: http::request::Parts =
        std::mem::replace(upstream, RequestHeader::from(empty)).into();
    let result = edit(&mut parts);
    *upstream = RequestHeader::from(parts);
    result
}

/// Path rewrite, `Host`, identity headers, `X-Forwarded-*`, `X-Request-Id`
/// and `traceparent` on the request going upstream.
fn edit_upstream_request(
    parts: &mut http::request::Parts,
    ctx: &mut RequestCtx,
    client: Option<IpAddr>,
) -> Result<()> {
    let id = ctx.request_id().clone();
    let h = &mut parts.headers;
    h.reserve(10);
    h.insert(X_REQUEST_ID.clone(), id);
    if let Some(trace) = &ctx.trace {
        h.insert(TRACEPARENT.clone(), trace.header());
    }
    // Client-sent identity headers are never believed. One scan of the
    // names first, instead of four lookups.
    if h.keys().any(|k| k.as_str().starts_with("x-user-")) {
        for name in [&X_USER_ID, &X_USER_TIER, &X_USER_ROLES, &X_USER_TENANT] {
            h.remove(name);
        }
    }
    let Some((snapshot, route)) = ctx.route() else {
        return Ok(());
    };
    if let Some(Admission {
        identity: Some(id),
        class,
        ..
    }) = &ctx.admission
    {
        h.insert(X_USER_ID.clone(), id.subject.clone());
        h.insert(
            X_USER_TIER.clone(),
            snapshot.limiter.class(*class).tier_header.clone(),
        );
        if let Some(roles) = &id.roles_header {
            h.insert(X_USER_ROLES.clone(), roles.clone());
        }
        if let Some(tenant) = &id.tenant {
            h.insert(X_USER_TENANT.clone(), tenant.clone());
        }
    }
    if let Some(pq) = rewrite_path(route, &parts.uri) {
        parts.uri = Uri::builder()
            .path_and_query(pq)
            .build()
            .map_err(|e| Error::because(ErrorType::InternalError, "rewritten path", e))?;
    }
    let h = &mut parts.headers;
    let original_host = h.get(HOST).cloned();
    match &route.upstream_host {
        UpstreamHost::Preserve => {}
        UpstreamHost::Backend => {
            if let Some(b) = ctx.current_backend() {
                let host = HeaderValue::from_str(&b.addr_text)
                    .map_err(|e| Error::because(ErrorType::InternalError, "backend host", e))?;
                h.insert(HOST, host);
            }
        }
        UpstreamHost::Set(v) => {
            h.insert(HOST, v.clone());
        }
    }
    if let Some(host) = original_host {
        h.insert(X_FORWARDED_HOST.clone(), host);
    }
    h.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    if let Some(ip) = client {
        let prior = h
            .get(&X_FORWARDED_FOR)
            .and_then(|v| v.to_str().ok())
            .filter(|p| !p.is_empty());
        let mut xff = String::with_capacity(prior.map_or(0, |p| p.len() + 2) + 39);
        if let Some(prior) = prior {
            xff.push_str(prior);
            xff.push_str(", ");
        }
        access_log::push_ip(&mut xff, ip);
        let xff = HeaderValue::from_maybe_shared(bytes::Bytes::from(xff))
            .map_err(|e| Error::because(ErrorType::InternalError, "X-Forwarded-For", e))?;
        h.insert(X_FORWARDED_FOR.clone(), xff);
    }
    Ok(())
}

/// The breaker's view of a finished attempt: a Pingora error counts when
/// it is the upstream's fault, a response when its status is one of the
/// pool's `failure_statuses`.
fn breaker_feedback(session: &Session, e: Option<&Error>, ctx: &mut RequestCtx) {
    let failed = match e {
        Some(e) => upstream_failure(e),
        None => {
            let status = session.response_written().map(|r| r.status.as_u16());
            let statuses = ctx
                .route()
                .and_then(|(s, r)| s.pools.get(r.upstream))
                .map(|p| p.breaker.failure_statuses.as_slice())
                .unwrap_or_default();
            status.is_some_and(|s| statuses.contains(&s))
        }
    };
    record_outcome(ctx, failed);
}

/// Records a finished request: request and rate-limit metrics, and its
/// access-log line when the log wants it.
fn observe(session: &Session, ctx: &RequestCtx) {
    let Some(snapshot) = ctx.snapshot.as_deref() else {
        return;
    };
    let took = ctx.started.elapsed();
    let status = session.response_written().map_or(0, |r| r.status.as_u16());
    let req = session.req_header();
    let (class, verdict) = match &ctx.admission {
        Some(a) => (a.class, a.verdict.as_ref()),
        None => (snapshot.limiter.anonymous(), None),
    };
    let m = &snapshot.metrics;
    m.request(ctx.route, &req.method, status, class, took.as_secs_f64());
    if let Some(v) = verdict {
        m.rate_limit(ctx.route, class, v.allowed, v.source);
    }
    let Some(log) = snapshot.access_log.as_ref().filter(|l| l.wants(status)) else {
        return;
    };
    let route = ctx.route.and_then(|i| snapshot.routes.get(i));
    let trace = ctx.trace_id().unwrap_or(TraceIdHex::NONE);
    let identity = ctx.admission.as_ref().and_then(|a| a.identity.as_deref());
    log.log(&Entry {
        time: SystemTime::now(),
        request_id: ctx.request_id_str().unwrap_or(""),
        trace_id: trace.as_str(),
        client_ip: ctx.client.or_else(|| client_ip(session)),
        method: req.method.as_str(),
        path: req.uri.path(),
        route: route.map(|r| r.name.as_str()),
        upstream: route
            .and_then(|r| snapshot.pools.get(r.upstream))
            .map(|p| p.name.as_str()),
        backend: ctx.current_backend().map(|b| b.addr_text.as_str()),
        status,
        bytes: session.body_bytes_sent(),
        duration_ms: took.as_secs_f64() * 1e3,
        upstream_ms: ctx.upstream_time.map(|d| d.as_secs_f64() * 1e3),
        attempts: ctx.attempts,
        user_id: identity.and_then(|i| i.subject.to_str().ok()),
        tier: snapshot.limiter.class(class).name.as_str(),
        rate_limit: verdict.map(|v| if v.allowed { "allowed" } else { "rejected" }),
        error: ctx.error_code,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    fn route(extra: &str) -> RouteSpec {
        let src = format!(
            "upstreams:\n  p:\n    backends: [{{address: \"127.0.0.1:1\"}}]\nroutes:\n  - name: r\n    upstream: p\n{extra}"
        );
        parse(&src).unwrap().routes.remove(0)
    }

    #[test]
    fn test_strip_prefix_keeps_rest_and_query() {
        let r = route("    match: {path: {prefix: /api/users}}\n    strip_prefix: true\n");
        let uri: Uri = "/api/users/7?x=1".parse().unwrap();
        assert_eq!(rewrite_path(&r, &uri).as_deref(), Some("/7?x=1"));
        let uri: Uri = "/api/users".parse().unwrap();
        assert_eq!(rewrite_path(&r, &uri).as_deref(), Some("/"));
    }

    #[test]
    fn test_prefix_rewrite_and_regex_rewrite() {
        let r = route("    match: {path: {prefix: /old}}\n    rewrite: {prefix: /new/v2}\n");
        let uri: Uri = "/old/a".parse().unwrap();
        assert_eq!(rewrite_path(&r, &uri).as_deref(), Some("/new/v2/a"));
        let r = route(
            "    match: {path: {regex: \"^/u/([0-9]+)$\"}}\n    rewrite: {regex: {pattern: \"^/u/([0-9]+)$\", replacement: \"/users/$1/profile\"}}\n",
        );
        let uri: Uri = "/u/42".parse().unwrap();
        assert_eq!(rewrite_path(&r, &uri).as_deref(), Some("/users/42/profile"));
    }

    #[test]
    fn test_request_id_is_uuidv7_and_client_ids_are_checked() {
        let id = new_request_id();
        let parsed = uuid::Uuid::parse_str(id.to_str().unwrap()).unwrap();
        assert_eq!(parsed.get_version_num(), 7);
        assert_ne!(new_request_id(), id);
        assert!(acceptable_request_id(&HeaderValue::from_static("abc-123")));
        assert!(!acceptable_request_id(&HeaderValue::from_static("a\"b")));
        assert!(!acceptable_request_id(&HeaderValue::from_static("a b")));
        let long = "x".repeat(MAX_REQUEST_ID_LEN + 1);
        assert!(!acceptable_request_id(
            &HeaderValue::from_str(&long).unwrap()
        ));
    }

    #[test]
    fn test_errors_map_to_statuses() {
        let status = |e: Box<Error>| error_response(&e).map(|r| r.status.as_u16());
        let mut refused = Error::new(ErrorType::ConnectRefused);
        refused.esource = ErrorSource::Upstream;
        assert_eq!(status(refused), Some(502));
        let mut slow = Error::new(ErrorType::ReadTimedout);
        slow.esource = ErrorSource::Upstream;
        assert_eq!(status(slow), Some(504));
        let mut gone = Error::new(ErrorType::ConnectionClosed);
        gone.esource = ErrorSource::Downstream;
        assert_eq!(status(gone), None);
        assert_eq!(status(Error::new(ErrorType::HTTPStatus(503))), Some(503));
    }
}
