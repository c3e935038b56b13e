//! Admission of a routed request, in order: who is calling (bearer token
//! per the route's `auth` mode), may they use this route (`min_tier`,
//! `roles`), and are they within their tier's limits. Also the rate-limit
//! headers these steps add to responses.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, StatusCode};
use ipnet::IpNet;

use crate::auth::{AuthError, Authenticator, Identity};
use crate::config::{AuthMode, LimitBy, RouteSpec};
use crate::forward::X_FORWARDED_FOR;
use crate::ratelimit::Verdict;
use crate::respond::ErrorResponse;
use crate::snapshot::Snapshot;

/// Who the request was admitted as.
#[derive(Debug, Default)]
pub struct Admission {
    /// The verified caller; `None` = anonymous.
    pub identity: Option<Arc<Identity>>,
    /// The caller's class in the limiter (tier index, or anonymous).
    pub class: usize,
    /// The rate-limit decision, when the route is limited.
    pub verdict: Option<Verdict>,
}

/// A refusal: the response and its extra headers.
#[derive(Debug)]
pub struct Denial {
    /// Status, code, message.
    pub response: ErrorResponse,
    /// Headers such as `WWW-Authenticate` or `Retry-After`.
    pub headers: Vec<(&'static str, HeaderValue)>,
    /// What was known of the caller when refused (identity and class for
    /// a 403, also the verdict for a 429); `None` for a 401.
    pub admission: Option<Admission>,
}

/// The client's address: the peer, or — when the peer is a trusted proxy —
/// the right-most address in `X-Forwarded-For` that is not a trusted proxy.
pub fn client_ip(peer: Option<IpAddr>, headers: &HeaderMap, trusted: &[IpNet]) -> Option<IpAddr> {
    let peer = peer?;
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if trusted.is_empty() || !is_trusted(&peer) {
        return Some(peer);
    }
    let mut candidate = peer;
    // Right to left: each proxy appends the address it saw.
    let all: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .collect();
    for hop in all.iter().rev() {
        match hop.trim().parse::<IpAddr>() {
            Ok(ip) if is_trusted(&ip) => candidate = ip,
            Ok(ip) => return Some(ip),
            // Garbage: stop believing anything further left.
            Err(_) => return Some(candidate),
        }
    }
    Some(candidate)
}

/// Runs authentication, tier/role access and rate limiting for `route`.
pub async fn admit(
    snapshot: &Snapshot,
    route: &RouteSpec,
    headers: &HeaderMap,
    client: Option<IpAddr>,
) -> Result<Admission, Denial> {
    let limiter = &snapshot.limiter;
    let ip_key = || limiter.anonymous_key(client).key;
    let identity = match route.auth {
        AuthMode::None => None,
        AuthMode::Optional | AuthMode::Required => {
            match Authenticator::bearer(headers.get(http::header::AUTHORIZATION)) {
                Some(token) => Some(match snapshot.auth.cached(token) {
                    Some(id) => id,
                    None => verify_new_token(snapshot, token, ip_key()).await?,
                }),
                None if route.auth == AuthMode::Required => {
                    return Err(unauthorized(AuthError::Missing))
                }
                None => None,
            }
        }
    };
    let class = match &identity {
        // A tier change newer than the token wins over its claim.
        Some(id) => snapshot
            .overrides
            .as_deref()
            .and_then(|o| o.resolve(id, |tier| limiter.tier_of(Some(tier))))
            .unwrap_or_else(|| limiter.tier_of(id.tier.as_deref())),
        None => limiter.anonymous(),
    };
    if route.min_tier.is_some() || !route.roles.is_empty() {
        let Some(id) = &identity else {
            return Err(unauthorized(AuthError::Missing));
        };
        let refused = |code, message| Denial {
            response: ErrorResponse {
                status: StatusCode::FORBIDDEN,
                code,
                message,
            },
            headers: Vec::new(),
            admission: Some(Admission {
                identity: Some(id.clone()),
                class,
                verdict: None,
            }),
        };
        if route.min_tier.is_some_and(|min| class < min) {
            return Err(refused(
                "insufficient_tier",
                "your subscription tier does not include this endpoint",
            ));
        }
        if !route.roles.is_empty() && !route.roles.iter().any(|r| id.has_role(r)) {
            return Err(refused(
                "insufficient_role",
                "this endpoint needs a role you do not have",
            ));
        }
    }
    let mut by_tenant = false;
    let verdict = if route.rate_limit {
        let verdict = match &identity {
            Some(id) => match (&id.tenant, id.tenant_key) {
                // The organization's one budget, shared by its members.
                (Some(tenant), Some(key)) if limiter.class(class).limit_by == LimitBy::Tenant => {
                    by_tenant = true;
                    let tenant = tenant.as_bytes();
                    limiter
                        .check(class, key, || {
                            format!("t:{}", String::from_utf8_lossy(tenant))
                        })
                        .await
                }
                _ => {
                    let sub = id.subject.as_bytes();
                    limiter
                        .check(class, id.key, || {
                            format!("u:{}", String::from_utf8_lossy(sub))
                        })
                        .await
                }
            },
            None => {
                let anon = limiter.anonymous_key(client);
                limiter.check(class, anon.key, || anon.redis_id()).await
            }
        };
        if let Some(v) = &verdict {
            if !v.allowed {
                let mut headers = Vec::with_capacity(6);
                rate_headers(snapshot, class, v, |name, value| {
                    headers.push((name, value))
                });
                headers.push((
                    "retry-after",
                    HeaderValue::from(ceil_secs(v.retry_after).max(1)),
                ));
                return Err(Denial {
                    response: ErrorResponse {
                        status: StatusCode::TOO_MANY_REQUESTS,
                        code: "rate_limited",
                        message: if by_tenant {
                            "too many requests: your organization's shared budget for its tier \
                             is used up; see Retry-After"
                        } else {
                            "too many requests for your tier; see Retry-After"
                        },
                    },
                    headers,
                    admission: Some(Admission {
                        identity,
                        class,
                        verdict,
                    }),
                });
            }
        }
        verdict
    } else {
        None
    };
    if let (Some(meter), Some(id)) = (snapshot.meter.as_deref(), identity.as_deref()) {
        // Admitted with a caller: counted for usage reports.
        meter.record(id, &route.name);
    }
    Ok(Admission {
        identity,
        class,
        verdict,
    })
}

/// Verifies a token not in the cache. A client whose recent tokens failed
/// more often than the anonymous limits allow gets 429 without the
/// (expensive) signature check.
async fn verify_new_token(
    snapshot: &Snapshot,
    token: &[u8],
    ip_key: u64,
) -> Result<Arc<Identity>, Denial> {
    if let Err(wait) = snapshot.limiter.verification_allowed(ip_key) {
        return Err(Denial {
            response: ErrorResponse {
                status: StatusCode::TOO_MANY_REQUESTS,
                code: "too_many_invalid_tokens",
                message: "too many invalid tokens from this address; see Retry-After",
            },
            headers: vec![("retry-after", HeaderValue::from(ceil_secs(wait).max(1)))],
            admission: None,
        });
    }
    snapshot.auth.verify(token).await.map_err(|e| {
        snapshot.limiter.record_failed_verification(ip_key);
        unauthorized(e)
    })
}

fn unauthorized(e: AuthError) -> Denial {
    let (code, challenge) = match e {
        AuthError::Missing => (
            "missing_token",
            HeaderValue::from_static("Bearer realm=\"tiergate\""),
        ),
        AuthError::Invalid(why) => (
            "invalid_token",
            HeaderValue::from_str(&format!(
                "Bearer realm=\"tiergate\", error=\"invalid_token\", error_description=\"{why}\""
            ))
            .unwrap_or_else(|_| HeaderValue::from_static("Bearer error=\"invalid_token\"")),
        ),
    };
    Denial {
        response: ErrorResponse {
            status: StatusCode::UNAUTHORIZED,
            code,
            message: e.message(),
        },
        headers: vec![("www-authenticate", challenge)],
        admission: None,
    }
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// `X-RateLimit-*` and the IETF draft `RateLimit-Policy` / `RateLimit`,
/// handed to `emit` one by one (no list is built: this runs for every
/// limited response).
pub fn rate_headers(
    snapshot: &Snapshot,
    class: usize,
    v: &Verdict,
    mut emit: impl FnMut(&'static str, HeaderValue),
) {
    let policy = snapshot.limiter.class(class);
    let reset = ceil_secs(v.reset);
    emit("x-ratelimit-limit", HeaderValue::from(v.limit));
    emit("x-ratelimit-remaining", HeaderValue::from(v.remaining));
    emit("x-ratelimit-reset", HeaderValue::from(reset));
    if let Some(p) = &policy.policy_header {
        emit("ratelimit-policy", p.clone());
    }
    let name = policy
        .window_names
        .get(v.window)
        .copied()
        .unwrap_or("minute");
    let mut n = itoa::Buffer::new();
    let mut value = String::with_capacity(name.len() + 32);
    value.push('"');
    value.push_str(name);
    value.push_str("\";r=");
    value.push_str(n.format(v.remaining));
    value.push_str(";t=");
    value.push_str(n.format(reset));
    if let Ok(value) = HeaderValue::from_maybe_shared(bytes::Bytes::from(value)) {
        emit("ratelimit", value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_client_ip_believes_only_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let mut h = HeaderMap::new();
        h.insert(
            &X_FORWARDED_FOR,
            HeaderValue::from_static("1.1.1.1, 203.0.113.9, 10.0.0.7"),
        );
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let stranger: IpAddr = "198.51.100.1".parse().unwrap();
        // Through a trusted proxy: the right-most untrusted hop.
        assert_eq!(
            client_ip(Some(proxy), &h, &trusted),
            Some("203.0.113.9".parse().unwrap())
        );
        // Anyone else's X-Forwarded-For is ignored.
        assert_eq!(client_ip(Some(stranger), &h, &trusted), Some(stranger));
        assert_eq!(client_ip(Some(proxy), &h, &[]), Some(proxy));
        // Garbage stops the walk at the last trusted hop.
        h.insert(&X_FORWARDED_FOR, HeaderValue::from_static("junk, 10.0.0.9"));
        assert_eq!(
            client_ip(Some(proxy), &h, &trusted),
            Some("10.0.0.9".parse().unwrap())
        );
    }
}
