//! Header edits on the way through: the request going upstream (path
//! rewrite, `Host`, identity headers, `X-Forwarded-*`, ids) and the
//! response going back (ids, rate-limit headers).

use std::net::IpAddr;

use http::header::HOST;
use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use pingora_error::{Error, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};

use crate::access_log;
use crate::auth::Identity;
use crate::config::{RouteSpec, UpstreamHost};
use crate::request_id::X_REQUEST_ID;
use crate::router::rewrite::rewrite_path;
use crate::trace::{TraceContext, TRACEPARENT};
use crate::upstream::Backend;

/// `X-User-Id`.
pub static X_USER_ID: HeaderName = HeaderName::from_static("x-user-id");
/// `X-User-Tier`.
pub static X_USER_TIER: HeaderName = HeaderName::from_static("x-user-tier");
/// `X-User-Roles`.
pub static X_USER_ROLES: HeaderName = HeaderName::from_static("x-user-roles");
/// `X-User-Tenant`.
pub static X_USER_TENANT: HeaderName = HeaderName::from_static("x-user-tenant");
/// `X-Forwarded-For`.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Who the request was admitted as, for the identity headers.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    /// The verified token's claims.
    pub identity: &'a Identity,
    /// The tier the limiter resolved, as `X-User-Tier`.
    pub tier: &'a HeaderValue,
}

/// What the upstream request is built from.
#[derive(Debug, Clone, Copy)]
pub struct Forward<'a> {
    /// `X-Request-Id`.
    pub request_id: &'a HeaderValue,
    /// The request's trace, for `traceparent`.
    pub trace: Option<&'a TraceContext>,
    /// The matched route; `None` sends the request on unchanged but for
    /// the ids and the stripped identity headers.
    pub route: Option<&'a RouteSpec>,
    /// The verified caller, if any.
    pub caller: Option<Caller<'a>>,
    /// The backend of this attempt (for `upstream_host: backend`).
    pub backend: Option<&'a Backend>,
    /// The TCP peer.
    pub peer: Option<IpAddr>,
    /// The peer is one of `server.trusted_proxies`: its `X-Forwarded-*`
    /// headers are kept and extended rather than replaced.
    pub peer_trusted: bool,
}

/// Applies [`upstream_request`] to Pingora's header type.
pub fn edit_upstream(upstream: &mut RequestHeader, forward: &Forward<'_>) -> Result<()> {
    with_plain_headers(upstream, |parts| upstream_request(parts, forward))
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
pub fn upstream_request(parts: &mut http::request::Parts, f: &Forward<'_>) -> Result<()> {
    let h = &mut parts.headers;
    h.reserve(10);
    h.insert(X_REQUEST_ID.clone(), f.request_id.clone());
    if let Some(trace) = f.trace {
        h.insert(TRACEPARENT.clone(), trace.header());
    }
    strip_identity(h);
    let Some(route) = f.route else {
        return Ok(());
    };
    if let Some(Caller { identity, tier }) = f.caller {
        h.insert(X_USER_ID.clone(), identity.subject.clone());
        h.insert(X_USER_TIER.clone(), tier.clone());
        if let Some(roles) = &identity.roles_header {
            h.insert(X_USER_ROLES.clone(), roles.clone());
        }
        if let Some(tenant) = &identity.tenant {
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
            if let Some(b) = f.backend {
                let host = HeaderValue::from_str(&b.addr_text)
                    .map_err(|e| Error::because(ErrorType::InternalError, "backend host", e))?;
                h.insert(HOST, host);
            }
        }
        UpstreamHost::Set(v) => {
            h.insert(HOST, v.clone());
        }
    }
    // What a client says about earlier hops is believed only from a
    // trusted proxy; anyone else's is replaced by what we saw.
    let keep = |h: &HeaderMap, name: &HeaderName| f.peer_trusted && h.contains_key(name);
    if !keep(h, &X_FORWARDED_HOST) {
        match original_host {
            Some(host) => h.insert(X_FORWARDED_HOST.clone(), host),
            None => h.remove(&X_FORWARDED_HOST),
        };
    }
    if !keep(h, &X_FORWARDED_PROTO) {
        h.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    }
    if let Some(ip) = f.peer {
        let prior = h
            .get(&X_FORWARDED_FOR)
            .and_then(|v| v.to_str().ok())
            .filter(|p| f.peer_trusted && !p.is_empty());
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

/// Client-sent identity headers are never believed: every name starting
/// with `x-user-` or `x_user_` goes, also ones the gateway does not set
/// itself (`X-User-Email`). One scan of the names finds none in the usual
/// case.
fn strip_identity(h: &mut HeaderMap) {
    if !h.keys().any(is_identity) {
        return;
    }
    let names: Vec<HeaderName> = h.keys().filter(|n| is_identity(n)).cloned().collect();
    for name in names {
        h.remove(name);
    }
}

fn is_identity(name: &HeaderName) -> bool {
    let n = name.as_str().as_bytes();
    n.len() > 7
        && n[0] == b'x'
        && (n[1] == b'-' || n[1] == b'_')
        && &n[2..6] == b"user"
        && (n[6] == b'-' || n[6] == b'_')
}

/// `X-Request-Id` and the `rate` headers (from `rate_headers`, which hands
/// each to its callback) on the response going to the client.
pub fn response(
    response: &mut ResponseHeader,
    request_id: &HeaderValue,
    rate_headers: impl FnOnce(&mut dyn FnMut(&'static str, HeaderValue)),
) {
    let empty = http::Response::new(()).into_parts().0;
    let mut parts: http::response::Parts =
        std::mem::replace(response, ResponseHeader::from(empty)).into();
    let h = &mut parts.headers;
    h.reserve(6);
    h.insert(X_REQUEST_ID.clone(), request_id.clone());
    rate_headers(&mut |name, value| {
        h.insert(HeaderName::from_static(name), value);
    });
    *response = ResponseHeader::from(parts);
}
