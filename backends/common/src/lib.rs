//! The shared foundation of tiergate's business services.
//!
//! - [`service`]: a service described once ([`service::Service`]) and
//!   started by the platform, and the CLI registry's [`service::Entry`];
//! - [`app`]: run a service (Actix-web 4) with request ids, metrics, the
//!   JSON error envelope, `/health`, `/metrics` and `/openapi.json`;
//! - [`client`]: calling another service; [`service_auth`]: each
//!   service's own key and the callers an internal route accepts;
//!   [`user_auth`]: the user behind a request, verified by the service;
//! - [`consumer`]: `POST /internal/events` for the events a service
//!   consumes; [`blocking`]: CPU-heavy work, bounded;
//! - [`error`]: the envelope and the validation helper;
//! - [`json`]: a JSON extractor whose failures are 4xx in the envelope;
//! - [`db`]: SQLite or PostgreSQL through one sqlx `Any` code path, with
//!   per-service migrations;
//! - [`outbox`]: the transactional outbox, its dispatcher and the
//!   consumers' dedupe;
//! - [`config`], [`secret`]: settings from file and env, secrets that never
//!   print; [`sealed`]: values encrypted at rest;
//! - [`clock`]: the injectable clock every service reads time from;
//! - [`money`], [`calendar`], [`tax`]: integer rupiah, the business time
//!   zone and period arithmetic, PPN (invoiced by billing, shown for
//!   display by subscriptions).
#![deny(missing_docs)]

pub mod app;
pub mod blocking;
pub mod calendar;
pub mod client;
pub mod clock;
pub mod config;
pub mod consumer;
pub mod db;
pub mod error;
pub mod failpoint;
pub mod json;
pub mod metrics;
pub mod money;
pub mod outbox;
pub mod request_id;
pub mod sealed;
pub mod secret;
pub mod service;
pub mod service_auth;
pub mod standin;
pub mod tax;
#[cfg(test)]
mod test_http;
pub mod user_auth;

pub use error::{ApiError, FieldError, Validator};

/// A random token of `bytes` bytes from the OS entropy source, base64url
/// without padding (verification and refresh tokens, generated secrets).
/// Fails only when the OS has no entropy source.
pub fn random_token(bytes: usize) -> Result<String, getrandom::Error> {
    use base64::Engine;
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf)?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf))
}

/// The request's `Idempotency-Key` header (trimmed, 1 to 200
/// characters), or 400 `idempotency_key_required` saying what a retry
/// without one could do twice (`"bill twice"`, `"charge twice"`).
pub fn idempotency_key(req: &actix_web::HttpRequest, twice: &str) -> Result<String, ApiError> {
    let key = req
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .unwrap_or_default();
    if key.is_empty() || key.len() > 200 {
        return Err(ApiError::bad_request(
            "idempotency_key_required",
            format!(
                "send an Idempotency-Key header (1 to 200 characters) so a retry cannot {twice}"
            ),
        ));
    }
    Ok(key.to_owned())
}

/// A list's `limit` query parameter: 1 to 100, 20 when absent; else 422
/// on `limit`.
pub fn page_limit(limit: Option<i64>) -> Result<i64, ApiError> {
    match limit.unwrap_or(20) {
        l @ 1..=100 => Ok(l),
        _ => Err(ApiError::validation(vec![FieldError::new(
            "limit",
            "must be 1 to 100",
        )])),
    }
}

/// The SHA-256 of a token, hex: how tokens are stored (a database leak
/// does not reveal usable tokens).
pub fn token_hash(token: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(token.as_bytes());
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        out.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
    }
    out
}

/// `a == b` in time that depends only on the lengths (signatures, secret
/// tokens).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}
