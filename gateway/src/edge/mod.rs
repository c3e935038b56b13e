//! The connection layer in front of Pingora's HTTP/1 sessions: what a
//! client may hold and send before a request reaches the proxy.
//!
//! [`Edge`] is the listening service's application. For each connection it
//! takes a slot (per instance, and optionally per client address), then
//! runs Pingora's session loop itself, so that every request head is read
//! through [`head::Guarded`] under the snapshot's [`EdgeSettings`]: size
//! limits (414/431), a head timeout (408), bytes a request line may not
//! carry (400). The body idle and keep-alive timeouts are set on each
//! session. Everything after the head is Pingora's ([`HttpProxy`]).
//!
//! A connection over a cap gets a 503 (`Retry-After: 1`) and is closed.

pub mod head;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use http::StatusCode;
use pingora_core::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::{Stream, ALPN};
use pingora_core::server::ShutdownWatch;
use pingora_proxy::{HttpProxy, ProxyHttp};
use prometheus::{IntCounter, IntGauge};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::EdgeSettings;
use crate::metrics::Metrics;
use crate::request_id::new_request_id;
use crate::respond::ErrorResponse;
use crate::snapshot::Snapshot;
use head::Guarded;

/// Why the connection layer refused a request or a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The request line is longer than `request_line_bytes` (414).
    RequestLineTooLong,
    /// A header line is longer than `header_line_bytes` (431).
    HeaderLineTooLong,
    /// More header lines than `headers` (431).
    TooManyHeaders,
    /// The head is larger than `head_bytes` (431).
    HeadTooLarge,
    /// A control byte or DEL in the request line (400).
    ControlInRequestLine,
    /// A raw byte outside ASCII in the path (400).
    RawNonAsciiPath,
    /// Two `Host` headers (400).
    DuplicateHost,
    /// The head did not arrive within `request_head` (408, or closed
    /// quietly when nothing came).
    HeadTimeout,
    /// Every connection slot of the instance is taken (503).
    Connections,
    /// The client address holds `connections_per_ip` connections (503).
    ConnectionsPerIp,
}

impl Refusal {
    const ALL: [Refusal; 10] = [
        Refusal::RequestLineTooLong,
        Refusal::HeaderLineTooLong,
        Refusal::TooManyHeaders,
        Refusal::HeadTooLarge,
        Refusal::ControlInRequestLine,
        Refusal::RawNonAsciiPath,
        Refusal::DuplicateHost,
        Refusal::HeadTimeout,
        Refusal::Connections,
        Refusal::ConnectionsPerIp,
    ];

    /// The `reason` label of `tiergate_downstream_refused_total`.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::RequestLineTooLong => "request_line_too_long",
            Refusal::HeaderLineTooLong => "header_line_too_long",
            Refusal::TooManyHeaders => "too_many_headers",
            Refusal::HeadTooLarge => "head_too_large",
            Refusal::ControlInRequestLine => "control_in_request_line",
            Refusal::RawNonAsciiPath => "raw_non_ascii_path",
            Refusal::DuplicateHost => "duplicate_host",
            Refusal::HeadTimeout => "head_timeout",
            Refusal::Connections => "connection_limit",
            Refusal::ConnectionsPerIp => "connection_limit_per_ip",
        }
    }

    /// The response the client gets.
    pub fn response(self) -> ErrorResponse {
        let (status, code, message) = match self {
            Refusal::RequestLineTooLong => (
                StatusCode::URI_TOO_LONG,
                "request_line_too_long",
                "the request line (method and target) is too long",
            ),
            Refusal::HeaderLineTooLong => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "header_too_large",
                "a request header is too large",
            ),
            Refusal::TooManyHeaders => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "too_many_headers",
                "the request has too many headers",
            ),
            Refusal::HeadTooLarge => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers_too_large",
                "the request's headers are too large in total",
            ),
            Refusal::ControlInRequestLine => (
                StatusCode::BAD_REQUEST,
                "invalid_request_line",
                "the request line contains a control character",
            ),
            Refusal::RawNonAsciiPath => (
                StatusCode::BAD_REQUEST,
                "invalid_path",
                "the path contains bytes that must be percent-encoded",
            ),
            Refusal::DuplicateHost => (
                StatusCode::BAD_REQUEST,
                "duplicate_header",
                "the request has two Host headers",
            ),
            Refusal::HeadTimeout => (
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                "the request head was not received in time",
            ),
            Refusal::Connections => (
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_connections",
                "the gateway has no free connection slot; retry shortly",
            ),
            Refusal::ConnectionsPerIp => (
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_connections",
                "too many open connections from your address; close some and retry",
            ),
        };
        ErrorResponse {
            status,
            code,
            message,
        }
    }
}

/// A refusal as it goes on the wire: status line, JSON envelope with a new
/// request id, `Connection: close`.
pub(crate) fn refusal_bytes(why: Refusal) -> Vec<u8> {
    let r = why.response();
    let id = new_request_id();
    let body = r.body(id.to_str().unwrap_or(""), None);
    let retry = if r.status == StatusCode::SERVICE_UNAVAILABLE {
        "retry-after: 1\r\n"
    } else {
        ""
    };
    let mut out = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\ncache-control: no-store\r\nconnection: close\r\nx-request-id: {}\r\n{retry}\r\n",
        r.status.as_u16(),
        r.status.canonical_reason().unwrap_or(""),
        body.len(),
        id.to_str().unwrap_or(""),
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

/// The connection layer's counters: refusals by reason, open connections.
#[derive(Debug)]
pub struct EdgeCounters {
    refused: [IntCounter; Refusal::ALL.len()],
    open: IntGauge,
    accepted: IntCounter,
}

impl EdgeCounters {
    /// Handles into `metrics` for the listener named `listener`.
    pub fn new(metrics: &Metrics, listener: &str) -> Self {
        Self {
            refused: Refusal::ALL
                .map(|r| metrics.downstream_refused.with_label_values(&[r.label()])),
            open: metrics.downstream_open.with_label_values(&[listener]),
            accepted: metrics.downstream_accepted.with_label_values(&[listener]),
        }
    }

    /// Counts a refusal.
    pub fn refused(&self, why: Refusal) {
        self.refused[why as usize].inc();
    }
}

/// Open connections, per instance and per client address.
#[derive(Debug, Default)]
struct Slots {
    open: AtomicUsize,
    per_ip: Mutex<HashMap<[u8; 16], usize>>,
}

/// One connection's slot; given back when dropped.
struct Slot<'a> {
    slots: &'a Slots,
    ip: Option<[u8; 16]>,
}

impl Slots {
    /// Takes a slot for a connection from `ip`, unless a cap is reached.
    fn take(&self, ip: Option<IpAddr>, limits: &EdgeSettings) -> Result<Slot<'_>, Refusal> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= limits.connections {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::Connections);
        }
        let mut slot = Slot {
            slots: self,
            ip: None,
        };
        if let (Some(ip), n @ 1..) = (ip, limits.connections_per_ip) {
            let key = ip_slot_key(ip);
            let mut map = match self.per_ip.lock() {
                Ok(m) => m,
                Err(poisoned) => poisoned.into_inner(),
            };
            let held = map.entry(key).or_insert(0);
            if *held >= n {
                return Err(Refusal::ConnectionsPerIp);
            }
            *held += 1;
            slot.ip = Some(key);
        }
        Ok(slot)
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.slots.open.fetch_sub(1, Ordering::AcqRel);
        if let Some(key) = self.ip {
            let mut map = match self.slots.per_ip.lock() {
                Ok(m) => m,
                Err(poisoned) => poisoned.into_inner(),
            };
            if let Some(held) = map.get_mut(&key) {
                *held -= 1;
                if *held == 0 {
                    map.remove(&key);
                }
            }
        }
    }
}

/// An address as the per-address cap counts it: IPv4 (and IPv4-mapped)
/// whole, IPv6 by its /64.
fn ip_slot_key(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_ipv6_mapped().octets(),
            None => {
                let mut o = v6.octets();
                o[8..].fill(0);
                o
            }
        },
    }
}

/// The listening service's application: slots, guarded heads, then
/// Pingora's proxy for each request.
pub struct Edge<SV> {
    proxy: Arc<HttpProxy<SV>>,
    state: Arc<ArcSwap<Snapshot>>,
    counters: Arc<EdgeCounters>,
    slots: Slots,
}

impl<SV> Edge<SV> {
    /// `proxy` (modules initialised) behind the connection layer, reading
    /// its limits from `state` for each new connection; counted in
    /// `metrics` as `listener`.
    pub fn new(
        proxy: HttpProxy<SV>,
        state: Arc<ArcSwap<Snapshot>>,
        metrics: &Metrics,
        listener: &str,
    ) -> Self {
        Self {
            proxy: Arc::new(proxy),
            state,
            counters: Arc::new(EdgeCounters::new(metrics, listener)),
            slots: Slots::default(),
        }
    }
}

#[async_trait]
impl<SV> ServerApp for Edge<SV>
where
    SV: ProxyHttp + Send + Sync + 'static,
    SV::CTX: Send + Sync,
{
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let limits = self.state.load().edge;
        self.counters.accepted.inc();
        let peer = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        let _slot = match self.slots.take(peer, &limits) {
            Ok(slot) => slot,
            Err(why) => {
                self.counters.refused(why);
                refuse_connection(&mut stream, why).await;
                return None;
            }
        };
        let _open = OpenConnection::new(&self.counters.open);
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            // HTTP/2 frames its own headers; Pingora's h2 server applies
            // its limits.
            return self.proxy.process_new(stream, shutdown).await;
        }
        let mut stream: Stream = Box::new(Guarded::new(stream, limits, self.counters.clone()));
        let mut settings: Option<HttpPersistentSettings> = None;
        loop {
            let mut session = ServerSession::new_http1(stream);
            match settings.take() {
                Some(s) => s.apply_to_session(&mut session),
                None => {
                    let keepalive = (limits.keepalive_secs > 0 && !*shutdown.borrow())
                        .then_some(limits.keepalive_secs);
                    session.set_keepalive(keepalive);
                    session.set_keepalive_reuses_remaining(
                        self.proxy
                            .server_options()
                            .and_then(|o| o.keepalive_request_limit),
                    );
                }
            }
            // Between reads of a request body.
            session.set_read_timeout(Some(limits.body_idle_timeout));
            let reused = self.proxy.process_new_http(session, shutdown).await?;
            let (next, persistent) = reused.consume();
            let mut guarded = next.into_any().downcast::<Guarded>().ok()?;
            guarded.next_request();
            stream = guarded;
            settings = persistent;
        }
    }

    async fn cleanup(&self) {
        self.proxy.http_cleanup().await;
    }
}

/// Counts a connection in `tiergate_downstream_connections` while it lives.
struct OpenConnection<'a>(&'a IntGauge);

impl<'a> OpenConnection<'a> {
    fn new(gauge: &'a IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Longest a refused connection is drained before it is closed.
const REFUSED_LINGER: Duration = Duration::from_millis(500);

/// Writes the refusal, closes our side, and reads what the client sends
/// for a moment, so the close does not reset the connection before the
/// client read the answer.
async fn refuse_connection(stream: &mut Stream, why: Refusal) {
    let bytes = refusal_bytes(why);
    if stream.write_all(&bytes).await.is_err() || stream.flush().await.is_err() {
        return;
    }
    let _ = AsyncWriteExt::shutdown(stream).await;
    let drain = async {
        let mut scratch = [0u8; 4096];
        let mut total = 0;
        while let Ok(n @ 1..) = stream.read(&mut scratch).await {
            total += n;
            if total > 1 << 20 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(REFUSED_LINGER, drain).await;
}
