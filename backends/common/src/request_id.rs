//! Request ids and per-request telemetry: the outermost middleware of every
//! service.
//!
//! The id is the caller's `X-Request-Id` when it is well formed (the
//! gateway always sends one), else a new UUIDv7. It is echoed on the
//! response, carried by the request's `tracing` span, and visible to the
//! error envelope through a task-local (actix runs a request's handler on
//! the task of its middleware).

use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::web;
use tracing::Instrument;

use crate::metrics::HttpMetrics;

/// The request-id header.
pub const HEADER: HeaderName = HeaderName::from_static("x-request-id");

tokio::task_local! {
    static REQUEST_ID: String;
}

/// The id of the request being handled, or `-` outside a request.
pub fn current() -> String {
    REQUEST_ID
        .try_with(Clone::clone)
        .unwrap_or_else(|_| "-".to_owned())
}

/// Whether a caller-supplied id is reused: 1 to 128 characters of
/// `[A-Za-z0-9._:-]`, so it is safe in logs and headers.
pub fn is_acceptable(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// The middleware: id, span, metrics, `X-Request-Id` on the response.
pub async fn middleware(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let id = req
        .headers()
        .get(&HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| is_acceptable(v))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let metrics = req.app_data::<web::Data<HttpMetrics>>().cloned();
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        method = %req.method(),
        path = %req.path(),
    );
    let started = Instant::now();
    let result = REQUEST_ID
        .scope(id.clone(), next.call(req).instrument(span.clone()))
        .await;
    let mut res = result?;
    let status = res.status();
    if let Some(m) = metrics {
        let route = res.request().match_pattern();
        m.observe(
            route.as_deref().unwrap_or("unmatched"),
            res.request().method().as_str(),
            status.as_u16(),
            started.elapsed(),
        );
    }
    if let Ok(value) = HeaderValue::from_str(&id) {
        res.headers_mut().insert(HEADER, value);
    }
    span.in_scope(|| {
        tracing::debug!(
            status = status.as_u16(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "handled"
        );
    });
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_only_safe_ids_are_reused() {
        assert!(is_acceptable("019ab6f2-1c0e-7a3b-9f00-000000000000"));
        assert!(is_acceptable("abc.DEF_1:2"));
        assert!(!is_acceptable(""));
        assert!(!is_acceptable("has space"));
        assert!(!is_acceptable("new\nline"));
        assert!(!is_acceptable(&"a".repeat(129)));
    }

    #[test]
    fn test_current_outside_a_request_is_a_dash() {
        assert_eq!(current(), "-");
    }
}
