//! The `ProxyHttp` implementation: the wiring of Pingora's phases, each
//! calling one module.
//!
//! * `request_filter`: ids ([`crate::request_id`], [`crate::trace`]), the
//!   public health answers ([`crate::health`]), the route
//!   ([`crate::router`]; 404/405 answered here), then
//!   [`crate::guard::admit`]: token, tier/role access, rate limit
//!   (401/403/429 answered here), then the route's plugins;
//! * `upstream_peer`: backend selection ([`crate::upstream::attempt`]);
//! * `fail_to_connect`, `upstream_response_filter`, `error_while_proxy`:
//!   breaker feedback and retries ([`crate::upstream::attempt`]);
//! * `upstream_request_filter`: the request going upstream
//!   ([`crate::forward`]);
//! * `response_filter`: ids and rate-limit headers ([`crate::forward`]);
//! * `fail_to_proxy`: the one place errors become JSON responses
//!   ([`crate::respond`]);
//! * `logging`: breaker feedback, metrics, the access log.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use http::header::HOST;
use http::HeaderValue;
use lua_free_plugins::{LogSummary, PluginCtx, Response as PluginResponse};
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};
use prometheus::IntGauge;

use crate::access_log::Entry;
use crate::config::RouteSpec;
use crate::forward::{self, Caller, Forward};
use crate::guard::{self, Admission};
use crate::health;
use crate::hygiene;
use crate::metrics::Metrics;
use crate::request_id;
use crate::respond::{self, ErrorResponse};
use crate::router::RouteMatch;
use crate::snapshot::Snapshot;
use crate::trace::{TraceContext, TraceIdHex, TRACEPARENT};
use crate::upstream::attempt::{Attempts, PoolRef, Resend};
use crate::upstream::HashInput;

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

/// What is known once a route matched, set together in `request_filter`.
#[derive(Debug)]
struct Routed {
    /// Index of the matched route.
    route: usize,
    /// The client's address (after trusted proxies).
    client: Option<IpAddr>,
    /// Who the request was admitted as, and its rate-limit verdict (also
    /// set for a 403 or 429, to label the refusal).
    admission: Option<Admission>,
    /// End of the route's `total` budget.
    deadline: Option<Instant>,
    /// The request body is kept for a retry.
    body_buffered: bool,
}

/// The route's plugins' per-request state (routes with plugins only).
#[derive(Debug, Default)]
struct Plugins {
    /// Their context.
    ctx: Option<PluginCtx>,
    /// A response a plugin gave while the body streamed in: written by
    /// `fail_to_proxy` instead of an error.
    response: Option<PluginResponse>,
    /// A plugin answered instead of the upstream.
    answered: bool,
}

/// Per-request state.
#[derive(Debug)]
pub struct RequestCtx {
    /// When the request header had been read.
    started: Instant,
    /// Counts the request as in flight.
    _in_flight: InFlight,
    /// `X-Request-Id`, from the client when sane, else a new UUIDv7.
    request_id: Option<HeaderValue>,
    /// Its trace (continued or started in `request_filter`).
    trace: Option<TraceContext>,
    /// The snapshot this request is served with (kept for its lifetime).
    snapshot: Option<Arc<Snapshot>>,
    /// Set once a route matched.
    routed: Option<Routed>,
    /// The upstream attempts.
    attempts: Attempts,
    /// The route's plugins.
    plugins: Plugins,
    /// Code of the error response the gateway wrote, if it wrote one.
    error_code: Option<&'static str>,
}

impl RequestCtx {
    fn request_id(&mut self) -> &HeaderValue {
        self.request_id
            .get_or_insert_with(request_id::new_request_id)
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
        let route = snapshot.routes.get(self.routed.as_ref()?.route)?;
        Some((snapshot, route))
    }

    /// The matched route, its pool, and the attempts at it.
    fn upstream(&mut self) -> Option<(&RouteSpec, PoolRef<'_>, &mut Attempts)> {
        let snapshot = self.snapshot.as_deref()?;
        let route = snapshot.routes.get(self.routed.as_ref()?.route)?;
        let pool = snapshot.pools.get(route.upstream)?;
        let pool = PoolRef {
            pool,
            index: route.upstream,
            metrics: &snapshot.metrics,
        };
        Some((route, pool, &mut self.attempts))
    }

    fn admission(&self) -> Option<&Admission> {
        self.routed.as_ref()?.admission.as_ref()
    }
}

/// Bounds the connection's idle time after this request by
/// `client_timeouts.keepalive` (Pingora's HTTP/1.1 default, set when the
/// request was read, is to wait for the next request forever). A client's
/// `Connection: close` still closes it.
pub fn keep_alive(session: &mut Session, snapshot: &Snapshot) {
    let secs = snapshot.edge.keepalive_secs;
    session.set_keepalive((secs > 0).then_some(secs));
}

fn client_ip(session: &Session) -> Option<IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}

/// Whether a request carries a body (a length above 0, or chunked).
fn request_has_body(headers: &http::HeaderMap) -> bool {
    headers.contains_key(http::header::TRANSFER_ENCODING)
        || headers
            .get(http::header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
}

/// Whether this request could be sent upstream again.
fn resend(session: &Session, ctx: &RequestCtx) -> Resend {
    let req = session.req_header();
    Resend {
        idempotent: req.method.is_idempotent(),
        buffer_intact: !session.retry_buffer_truncated(),
        body_kept: !request_has_body(&req.headers)
            || ctx.routed.as_ref().is_some_and(|r| r.body_buffered),
        unanswered: session.response_written().is_none(),
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            started: Instant::now(),
            _in_flight: InFlight::new(&self.metrics.in_flight),
            request_id: None,
            trace: None,
            snapshot: None,
            routed: None,
            attempts: Attempts::default(),
            plugins: Plugins::default(),
            error_code: None,
        }
    }

    /// Assigns the request id, the trace and the route; answers 404/405
    /// and refusals itself (`Ok(true)` = response already sent).
    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let req = session.req_header();
        ctx.request_id = Some(request_id::of_request(&req.headers));
        ctx.trace = Some(TraceContext::continue_or_start(
            req.headers.get(&TRACEPARENT),
        ));
        let snapshot = self.state.load_full();
        ctx.snapshot = Some(snapshot.clone());
        keep_alive(session, &snapshot);
        if let Err(bad) = hygiene::prepare(session.req_header_mut(), &snapshot.edge) {
            return refuse(session, ctx, &bad.response(), &[]).await;
        }
        let req = session.req_header();
        let get = req.method == http::Method::GET || req.method == http::Method::HEAD;
        if get {
            let view = health::View::Public {
                details: snapshot.health_details,
            };
            if let Some((status, doc)) = health::answer(&snapshot, req.uri.path(), view) {
                let id = ctx.request_id().clone();
                respond::write_json(session, status, &id, doc.to_string().into(), &[]).await?;
                return Ok(true);
            }
        }
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
                ctx.routed = Some(Routed {
                    route: i,
                    client,
                    admission: None,
                    deadline: None,
                    body_buffered: false,
                });
                admit_and_run_plugins(session, ctx, &snapshot, route, client).await
            }
            RouteMatch::NotFound if get && req.uri.path() == "/" => {
                // The gateway's own landing document, unless a route
                // takes `/`.
                let id = ctx.request_id().clone();
                let doc = health::info().to_string();
                respond::write_json(session, http::StatusCode::OK, &id, doc.into(), &[]).await?;
                Ok(true)
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
        let deadline = ctx.routed.as_ref().and_then(|r| r.deadline);
        let Some((route, pool, attempts)) = ctx.upstream() else {
            return Error::e_explain(ErrorType::InternalError, "upstream_peer without a route");
        };
        let remaining = match deadline {
            Some(deadline) => match deadline.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => Some(left),
                _ => return Error::e_explain(ErrorType::HTTPStatus(504), "total timeout spent"),
            },
            None => None,
        };
        let ip_bytes;
        let hash = if pool.pool.needs_hash_input() {
            ip_bytes = match client_ip(session) {
                Some(IpAddr::V4(v4)) => v4.to_ipv6_mapped().octets(),
                Some(IpAddr::V6(v6)) => v6.octets(),
                None => [0; 16],
            };
            let header = pool
                .pool
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
        attempts.next(pool.pool, hash, &route.timeouts, remaining)
    }

    /// Connect failures are retried on another backend while any is left.
    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if let Some((_, pool, attempts)) = ctx.upstream() {
            if attempts.connect_failed(pool) {
                e.set_retry(true);
            }
        }
        e
    }

    /// The request going upstream ([`forward::upstream_request`]), then
    /// the plugins' `upstream_request` hooks.
    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let id = ctx.request_id().clone();
        let snapshot = ctx.snapshot.as_deref();
        let route = ctx.route().map(|(_, r)| r);
        let caller = match (snapshot, ctx.admission()) {
            (
                Some(s),
                Some(Admission {
                    identity: Some(identity),
                    class,
                    ..
                }),
            ) => Some(Caller {
                identity,
                tier: &s.limiter.class(*class).tier_header,
            }),
            _ => None,
        };
        let peer = client_ip(session);
        let forward = Forward {
            request_id: &id,
            trace: ctx.trace.as_ref(),
            route,
            caller,
            backend: ctx.attempts.backend().map(|b| &**b),
            peer,
            peer_trusted: match (snapshot, peer) {
                (Some(s), Some(ip)) => s.trusted_proxies.iter().any(|n| n.contains(&ip)),
                _ => false,
            },
        };
        forward::edit_upstream(upstream, &forward)?;
        if let Some(mut p) = ctx.plugins.ctx.take() {
            // A new attempt: Pingora sends the (buffered) body again.
            p.body_bytes = 0;
            if let Some((_, route)) = ctx.route() {
                route.plugins.upstream_request(upstream, &mut p);
            }
            ctx.plugins.ctx = Some(p);
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
        let Some(mut p) = ctx.plugins.ctx.take() else {
            return Ok(());
        };
        p.body_bytes += body.as_ref().map_or(0, |b| b.len() as u64);
        let answer = ctx.route().and_then(|(_, route)| {
            route
                .plugins
                .request_body(body.as_ref(), end_of_stream, &mut p)
        });
        ctx.plugins.ctx = Some(p);
        match answer {
            Some(resp) => {
                let status = resp.status.as_u16();
                ctx.plugins.response = Some(resp);
                Error::e_explain(ErrorType::HTTPStatus(status), "request refused by a plugin")
            }
            None => Ok(()),
        }
    }

    /// An upstream status listed in the route's `retry.on_statuses` is
    /// retried on another backend (by failing this attempt with a retryable
    /// error) when the attempts allow it. Otherwise the response goes to
    /// the client as is.
    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let status = upstream.status.as_u16();
        let resend = resend(session, ctx);
        let retry = match ctx.upstream() {
            Some((route, pool, attempts)) => {
                attempts.retry_status(pool, &route.retry, resend, status)
            }
            None => false,
        };
        if !retry {
            if let Some(mut p) = ctx.plugins.ctx.take() {
                if let Some((_, route)) = ctx.route() {
                    route.plugins.upstream_response(upstream, &mut p);
                }
                ctx.plugins.ctx = Some(p);
            }
            return Ok(());
        }
        let mut e = Error::explain(
            ErrorType::HTTPStatus(status),
            "upstream error status; retrying on another backend",
        );
        e.set_retry(true);
        Err(e)
    }

    /// An error after the upstream connection was made: see
    /// [`Attempts::broke`]. Nothing is retried once the client got bytes.
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
        if ctx.plugins.response.is_some() {
            // A plugin refused the request: answer, never retry.
            let mut e = e;
            e.set_retry(false);
            return e;
        }
        let mut e = e.more_context(format!("Peer: {peer}"));
        let resend = resend(session, ctx);
        let status = respond::error_response(&e).map_or(502, |r| r.status.as_u16());
        let retry = match ctx.upstream() {
            Some((route, pool, attempts)) => {
                attempts.broke(pool, &e, &route.retry, resend, client_reused, status)
            }
            None => false,
        };
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
        ctx.attempts.retried_on_status() && matches!(error.etype(), ErrorType::HTTPStatus(_))
    }

    /// Returns the request id and the rate-limit headers to the client,
    /// then runs the plugins' `response` hooks.
    async fn response_filter(
        &self,
        session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let id = ctx.request_id().clone();
        forward::response(response, &id, |emit| {
            if let (
                Some(snapshot),
                Some(Admission {
                    verdict: Some(v),
                    class,
                    ..
                }),
            ) = (ctx.snapshot.as_deref(), ctx.admission())
            {
                guard::rate_headers(snapshot, *class, v, emit);
            }
        });
        if let Some(mut p) = ctx.plugins.ctx.take() {
            if let Some((_, route)) = ctx.route() {
                route
                    .plugins
                    .response(session.req_header(), response, &mut p);
            }
            ctx.plugins.ctx = Some(p);
        }
        Ok(())
    }

    /// Feeds the outcome of the last attempt to its backend's breaker, then
    /// records the request's metrics and access-log line.
    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        let status = session.response_written().map(|r| r.status.as_u16());
        if let Some((_, pool, attempts)) = ctx.upstream() {
            attempts.finish(pool, e, status);
        }
        observe(session, ctx);
        if let Some(mut p) = ctx.plugins.ctx.take() {
            let summary = LogSummary {
                status: status.unwrap_or(0),
                duration: ctx.started.elapsed(),
                answered_by_plugin: ctx.plugins.answered,
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
        if let (Some(resp), None) = (ctx.plugins.response.take(), session.response_written()) {
            // A plugin refused the request while its body streamed in.
            session.set_keepalive(None);
            ctx.plugins.answered = true;
            let status = resp.status.as_u16();
            let id = ctx.request_id().clone();
            if let (Some(mut p), Some(chain)) = (
                ctx.plugins.ctx.take(),
                ctx.route().map(|(_, r)| r.plugins.clone()),
            ) {
                if let Err(write_err) =
                    respond::write_plugin_response(session, &id, &chain, resp, &mut p).await
                {
                    tracing::debug!(error = %write_err, "could not send a plugin's response");
                }
                ctx.plugins.ctx = Some(p);
            }
            return FailToProxy {
                error_code: status,
                can_reuse_downstream: false,
            };
        }
        if e.etype() == &ErrorType::ReadTimedout && e.esource() == &ErrorSource::Downstream {
            self.metrics.body_timeouts.inc();
        }
        let response = respond::error_response(e);
        let code = match response {
            Some(r) if session.response_written().is_none() => {
                // Pingora closes the connection after a proxy failure; say
                // so, or clients reuse it and see a reset.
                session.set_keepalive(None);
                ctx.error_code = Some(r.code);
                let id = ctx.request_id().clone();
                let trace = ctx.trace_id();
                let mut extra = Vec::new();
                if let Some(wait) = ctx
                    .attempts
                    .retry_after()
                    .filter(|_| r.status.as_u16() == 503)
                {
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

/// Token, tier and role access and rate limit ([`admit`]), the retry
/// buffer and the deadline, then the route's `request` plugin hooks.
/// `Ok(true)` when the request was answered (a refusal, or a plugin's
/// answer).
async fn admit_and_run_plugins(
    session: &mut Session,
    ctx: &mut RequestCtx,
    snapshot: &Snapshot,
    route: &RouteSpec,
    client: Option<IpAddr>,
) -> Result<bool> {
    let req = session.req_header();
    let has_body = request_has_body(&req.headers);
    let idempotent = req.method.is_idempotent();
    // A request a plugin answers without a caller (a CORS preflight)
    // skips auth and rate limiting.
    let before_auth = !route.plugins.is_empty() && route.plugins.answers_before_auth(req);
    if before_auth {
        set_admission(
            ctx,
            Admission {
                identity: None,
                class: snapshot.limiter.anonymous(),
                verdict: None,
            },
        );
    } else if admit(session, ctx, snapshot, route, client).await? {
        return Ok(true);
    }
    if let Some(routed) = ctx.routed.as_mut() {
        if idempotent && has_body && route.retry.attempts > 0 {
            // Keep (up to 64 KiB of) the body so a retry can resend it; a
            // longer body is never retried.
            session.enable_retry_buffering();
            routed.body_buffered = true;
        }
        routed.deadline = route.timeouts.total.map(|t| Instant::now() + t);
    }
    if route.plugins.is_empty() {
        return Ok(false);
    }
    let mut p = PluginCtx::new(route.label.clone());
    p.client_ip = client;
    p.peer_ip = client_ip(session);
    p.subject = ctx
        .admission()
        .and_then(|a| a.identity.as_ref())
        .and_then(|id| id.subject.to_str().ok())
        .map(str::to_owned);
    let answer = route.plugins.request(session.req_header_mut(), &mut p);
    let Some(resp) = answer else {
        ctx.plugins.ctx = Some(p);
        if before_auth {
            // It was to be answered without a caller, but no plugin did:
            // admit it like any other request.
            return admit(session, ctx, snapshot, route, client).await;
        }
        return Ok(false);
    };
    ctx.plugins.answered = true;
    let id = ctx.request_id().clone();
    let written = respond::write_plugin_response(session, &id, &route.plugins, resp, &mut p).await;
    ctx.plugins.ctx = Some(p);
    written.map(|()| true)
}

fn set_admission(ctx: &mut RequestCtx, admission: Admission) {
    if let Some(routed) = ctx.routed.as_mut() {
        routed.admission = Some(admission);
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
            set_admission(ctx, admission);
            Ok(false)
        }
        Err(denial) => {
            if let Some(admission) = denial.admission {
                set_admission(ctx, admission);
            }
            refuse(session, ctx, &denial.response, &denial.headers).await
        }
    }
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
    let route_index = ctx.routed.as_ref().map(|r| r.route);
    let (class, verdict) = match ctx.admission() {
        Some(a) => (a.class, a.verdict.as_ref()),
        None => (snapshot.limiter.anonymous(), None),
    };
    let m = &snapshot.metrics;
    m.request(route_index, &req.method, status, class, took.as_secs_f64());
    if let Some(v) = verdict {
        m.rate_limit(route_index, class, v.allowed, v.source);
    }
    let Some(log) = snapshot.access_log.as_ref().filter(|l| l.wants(status)) else {
        return;
    };
    let route = route_index.and_then(|i| snapshot.routes.get(i));
    let trace = ctx.trace_id().unwrap_or(TraceIdHex::NONE);
    let identity = ctx.admission().and_then(|a| a.identity.as_deref());
    log.log(&Entry {
        time: SystemTime::now(),
        request_id: ctx.request_id_str().unwrap_or(""),
        trace_id: trace.as_str(),
        client_ip: ctx
            .routed
            .as_ref()
            .and_then(|r| r.client)
            .or_else(|| client_ip(session)),
        method: req.method.as_str(),
        path: req.uri.path(),
        route: route.map(|r| r.name.as_str()),
        upstream: route
            .and_then(|r| snapshot.pools.get(r.upstream))
            .map(|p| p.name.as_str()),
        backend: ctx.attempts.backend().map(|b| b.addr_text.as_str()),
        status,
        bytes: session.body_bytes_sent(),
        duration_ms: took.as_secs_f64() * 1e3,
        upstream_ms: ctx.attempts.upstream_time().map(|d| d.as_secs_f64() * 1e3),
        attempts: ctx.attempts.count(),
        user_id: identity.and_then(|i| i.subject.to_str().ok()),
        tier: snapshot.limiter.class(class).name.as_str(),
        rate_limit: verdict.map(|v| if v.allowed { "allowed" } else { "rejected" }),
        error: ctx.error_code,
    });
}
