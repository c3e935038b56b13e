//! `cors`: Cross-Origin Resource Sharing. Answers preflight requests itself
//! (`OPTIONS` with `Origin` and `Access-Control-Request-Method`: 204, and
//! the upstream is not called) and adds `Access-Control-Allow-Origin` (and
//! friends) to the responses of allowed origins.
//!
//! ```yaml
//! - cors:
//!     allow_origins: ["https://app.example.com", "https://*.example.org"]  # default ["*"]
//!     allow_methods: [GET, POST]          # default GET, HEAD, POST, PUT, PATCH, DELETE
//!     allow_headers: [authorization, content-type]  # default ["*"]: echo the request's
//!     expose_headers: [x-request-id]      # default none
//!     allow_credentials: true             # default false
//!     max_age: 600                        # seconds a preflight may be cached; default 600
//! ```
//!
//! With `allow_credentials` and a wildcard origin the request's own
//! `Origin` is echoed (browsers refuse `*` with credentials), as Kong and
//! APISIX do. A preflight from an origin that is not allowed gets a 204
//! without CORS headers, so the browser blocks the real request. The
//! gateway runs a route's preflight through its plugins before auth and
//! rate limiting (a browser never sends credentials on a preflight).

use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE,
    ACCESS_CONTROL_REQUEST_HEADERS, ACCESS_CONTROL_REQUEST_METHOD, ORIGIN, VARY,
};
use http::{HeaderValue, Method, StatusCode};
use serde::Deserialize;

use super::{header_name, header_value};
use crate::{Flow, Plugin, PluginBuilder, PluginCtx, RequestHeader, Response, ResponseHeader};

/// `cors` config.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    /// Allowed origins: exact (`https://app.example.com`), a subdomain
    /// wildcard (`https://*.example.com`) or `*`.
    #[serde(default = "any")]
    pub allow_origins: Vec<String>,
    /// Methods a preflight may ask for.
    #[serde(default = "default_methods")]
    pub allow_methods: Vec<String>,
    /// Headers a preflight may ask for; `*` echoes what it asks.
    #[serde(default = "any")]
    pub allow_headers: Vec<String>,
    /// Response headers scripts may read.
    #[serde(default)]
    pub expose_headers: Vec<String>,
    /// Whether cookies and `Authorization` may be sent.
    #[serde(default)]
    pub allow_credentials: bool,
    /// How long a preflight answer may be cached, in seconds.
    #[serde(default = "default_max_age")]
    pub max_age: u32,
}

fn any() -> Vec<String> {
    vec!["*".to_owned()]
}

fn default_methods() -> Vec<String> {
    ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
        .map(str::to_owned)
        .to_vec()
}

fn default_max_age() -> u32 {
    600
}

#[derive(Debug)]
enum OriginRule {
    Any,
    Exact(String),
    /// `scheme://*.domain`: (`scheme://`, `.domain`).
    Subdomains(String, String),
}

impl OriginRule {
    fn matches(&self, origin: &str) -> bool {
        match self {
            OriginRule::Any => true,
            OriginRule::Exact(o) => o.eq_ignore_ascii_case(origin),
            OriginRule::Subdomains(scheme, domain) => {
                let lower = origin.to_ascii_lowercase();
                lower
                    .strip_prefix(scheme.as_str())
                    .and_then(|host| host.strip_suffix(domain.as_str()))
                    .is_some_and(|sub| {
                        !sub.is_empty()
                            && sub
                                .chars()
                                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
                    })
            }
        }
    }
}

/// The `cors` plugin.
#[derive(Debug)]
pub struct Cors {
    origins: Vec<OriginRule>,
    any_origin: bool,
    methods: HeaderValue,
    any_header: bool,
    headers: Option<HeaderValue>,
    expose: Option<HeaderValue>,
    credentials: bool,
    max_age: HeaderValue,
}

/// Per-request: the `Access-Control-Allow-Origin` to send.
#[derive(Debug, Clone)]
struct AllowedOrigin(HeaderValue);

impl Cors {
    /// The `Access-Control-Allow-Origin` value for `origin`, if allowed.
    fn allow_origin(&self, origin: &HeaderValue) -> Option<HeaderValue> {
        let text = origin.to_str().ok()?;
        if !self.origins.iter().any(|r| r.matches(text)) {
            return None;
        }
        Some(if self.any_origin && !self.credentials {
            HeaderValue::from_static("*")
        } else {
            origin.clone()
        })
    }

    fn preflight(&self, req: &RequestHeader, origin: &HeaderValue) -> Response {
        let mut resp = Response::new(StatusCode::NO_CONTENT)
            .with_header(VARY, HeaderValue::from_static("Origin"));
        let Some(allowed) = self.allow_origin(origin) else {
            return resp;
        };
        resp.headers.push((ACCESS_CONTROL_ALLOW_ORIGIN, allowed));
        resp.headers
            .push((ACCESS_CONTROL_ALLOW_METHODS, self.methods.clone()));
        let asked = req.headers.get(ACCESS_CONTROL_REQUEST_HEADERS);
        let headers = if self.any_header {
            asked.cloned()
        } else {
            self.headers.clone()
        };
        if let Some(h) = headers {
            resp.headers.push((ACCESS_CONTROL_ALLOW_HEADERS, h));
        }
        if self.credentials {
            resp.headers.push((
                ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            ));
        }
        resp.headers
            .push((ACCESS_CONTROL_MAX_AGE, self.max_age.clone()));
        resp
    }
}

/// Whether `req` is a CORS preflight.
pub fn is_preflight(req: &RequestHeader) -> bool {
    req.method == Method::OPTIONS
        && req.headers.contains_key(ORIGIN)
        && req.headers.contains_key(ACCESS_CONTROL_REQUEST_METHOD)
}

impl Plugin for Cors {
    fn name(&self) -> &str {
        Self::NAME
    }

    fn answers_before_auth(&self, req: &RequestHeader) -> bool {
        is_preflight(req)
    }

    fn request(&self, req: &mut RequestHeader, ctx: &mut PluginCtx) -> Flow {
        let Some(origin) = req.headers.get(ORIGIN) else {
            return Flow::Continue;
        };
        if is_preflight(req) {
            return Flow::Respond(self.preflight(req, origin));
        }
        if let Some(allowed) = self.allow_origin(origin) {
            ctx.set_state(AllowedOrigin(allowed));
        }
        Flow::Continue
    }

    fn response(&self, _req: &RequestHeader, resp: &mut ResponseHeader, ctx: &mut PluginCtx) {
        let Some(AllowedOrigin(origin)) = ctx.state::<AllowedOrigin>().cloned() else {
            return;
        };
        let star = origin.as_bytes() == b"*";
        let _ = resp.insert_header(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        if !star {
            let _ = resp.append_header(VARY, HeaderValue::from_static("Origin"));
        }
        if self.credentials {
            let _ = resp.insert_header(
                ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if let Some(expose) = &self.expose {
            let _ = resp.insert_header(ACCESS_CONTROL_EXPOSE_HEADERS, expose.clone());
        }
    }
}

fn join(items: &[String], what: &str) -> Result<Option<HeaderValue>, String> {
    if items.is_empty() {
        return Ok(None);
    }
    for h in items {
        header_name(h, what)?;
    }
    header_value(&items.join(", "), what, what).map(Some)
}

impl PluginBuilder for Cors {
    const NAME: &'static str = "cors";
    type Config = CorsConfig;

    fn build(c: CorsConfig) -> Result<Self, String> {
        if c.allow_origins.is_empty() {
            return Err("allow_origins: give at least one origin (or `*`)".to_owned());
        }
        let mut origins = Vec::with_capacity(c.allow_origins.len());
        for o in &c.allow_origins {
            let o = o.trim_end_matches('/');
            origins.push(if o == "*" {
                OriginRule::Any
            } else {
                let Some((scheme, host)) = o.split_once("://") else {
                    return Err(format!(
                        "allow_origins: `{o}` is not `*` or an origin like https://app.example.com"
                    ));
                };
                if host.is_empty() || host.contains('/') {
                    return Err(format!("allow_origins: `{o}` must be scheme://host[:port]"));
                }
                match host.strip_prefix('*') {
                    Some(domain) if domain.starts_with('.') && domain.len() > 1 => {
                        OriginRule::Subdomains(
                            format!("{}://", scheme.to_ascii_lowercase()),
                            domain.to_ascii_lowercase(),
                        )
                    }
                    Some(_) => {
                        return Err(format!(
                            "allow_origins: in `{o}` a wildcard must be a whole leading label (`*.example.com`)"
                        ))
                    }
                    None if host.contains('*') => {
                        return Err(format!(
                            "allow_origins: in `{o}` a wildcard must be a whole leading label (`*.example.com`)"
                        ))
                    }
                    None => OriginRule::Exact(o.to_owned()),
                }
            });
        }
        let mut methods = Vec::with_capacity(c.allow_methods.len());
        for m in &c.allow_methods {
            let m = m.to_ascii_uppercase();
            Method::from_bytes(m.as_bytes())
                .map_err(|_| format!("allow_methods: `{m}` is not a method"))?;
            methods.push(m);
        }
        let methods =
            join(&methods, "allow_methods")?.ok_or("allow_methods: give at least one method")?;
        let any_header = c.allow_headers.iter().any(|h| h == "*");
        let headers = if any_header {
            None
        } else {
            join(&c.allow_headers, "allow_headers")?
        };
        Ok(Self {
            any_origin: origins.iter().any(|r| matches!(r, OriginRule::Any)),
            origins,
            methods,
            any_header,
            headers,
            expose: join(&c.expose_headers, "expose_headers")?,
            credentials: c.allow_credentials,
            max_age: HeaderValue::from(c.max_age),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin::test_util::{build, ctx, request};

    fn preflight(origin: &str) -> RequestHeader {
        request(
            "OPTIONS",
            "/api/x",
            &[
                ("origin", origin),
                ("access-control-request-method", "PUT"),
                ("access-control-request-headers", "x-custom, content-type"),
            ],
        )
    }

    fn header<'a>(r: &'a Response, name: &str) -> Option<&'a str> {
        r.headers
            .iter()
            .find(|(k, _)| k.as_str() == name)
            .and_then(|(_, v)| v.to_str().ok())
    }

    #[test]
    fn test_preflight_is_answered_for_allowed_origins_only() {
        let p: Cors = build(
            "allow_origins: [https://app.example.com, 'https://*.example.org']\n\
             allow_methods: [get, put]\nallow_headers: [content-type]\nmax_age: 60\n",
        )
        .unwrap();
        let mut req = preflight("https://app.example.com");
        assert!(p.answers_before_auth(&req));
        let Flow::Respond(r) = p.request(&mut req, &mut ctx()) else {
            panic!("a preflight is answered");
        };
        assert_eq!(r.status, StatusCode::NO_CONTENT);
        assert_eq!(
            header(&r, "access-control-allow-origin"),
            Some("https://app.example.com")
        );
        assert_eq!(header(&r, "access-control-allow-methods"), Some("GET, PUT"));
        assert_eq!(
            header(&r, "access-control-allow-headers"),
            Some("content-type")
        );
        assert_eq!(header(&r, "access-control-max-age"), Some("60"));
        let Flow::Respond(r) = p.request(&mut preflight("https://a.b.example.org"), &mut ctx())
        else {
            panic!("a preflight is answered");
        };
        assert!(header(&r, "access-control-allow-origin").is_some());
        for bad in [
            "https://evil.com",
            "https://example.org",
            "http://app.example.com",
        ] {
            let Flow::Respond(r) = p.request(&mut preflight(bad), &mut ctx()) else {
                panic!("answered even when refused");
            };
            assert_eq!(header(&r, "access-control-allow-origin"), None, "{bad}");
        }
    }

    #[test]
    fn test_simple_requests_get_headers_and_credentials_echo_the_origin() {
        let p: Cors = build("allow_credentials: true\nexpose_headers: [x-request-id]\n").unwrap();
        let mut req = request("GET", "/x", &[("origin", "https://any.site")]);
        let mut c = ctx();
        assert!(matches!(p.request(&mut req, &mut c), Flow::Continue));
        let mut resp = ResponseHeader::build(200, None).unwrap();
        p.response(&req, &mut resp, &mut c);
        let h = |n: &str| resp.headers.get(n).and_then(|v| v.to_str().ok());
        assert_eq!(h("access-control-allow-origin"), Some("https://any.site"));
        assert_eq!(h("access-control-allow-credentials"), Some("true"));
        assert_eq!(h("access-control-expose-headers"), Some("x-request-id"));
        assert_eq!(h("vary"), Some("Origin"));
        // Wildcard without credentials: `*`; the preflight echoes asked headers.
        let p: Cors = build("{}").unwrap();
        let Flow::Respond(r) = p.request(&mut preflight("https://x.io"), &mut ctx()) else {
            panic!()
        };
        assert_eq!(header(&r, "access-control-allow-origin"), Some("*"));
        assert_eq!(
            header(&r, "access-control-allow-headers"),
            Some("x-custom, content-type")
        );
        // No Origin: nothing added.
        let mut req = request("GET", "/x", &[]);
        let mut c = ctx();
        p.request(&mut req, &mut c);
        let mut resp = ResponseHeader::build(200, None).unwrap();
        p.response(&req, &mut resp, &mut c);
        assert!(resp.headers.get("access-control-allow-origin").is_none());
    }

    #[test]
    fn test_bad_config_is_refused() {
        for (yaml, needle) in [
            ("allow_origins: []", "at least one"),
            ("allow_origins: [app.example.com]", "not `*` or an origin"),
            (
                "allow_origins: ['https://a*.example.com']",
                "whole leading label",
            ),
            ("allow_methods: ['GE T']", "not a method"),
            ("allow_headers: ['bad header']", "not a valid header name"),
            ("allow_origin: ['*']", "unknown field"),
            ("max_age: -1", "invalid value"),
        ] {
            let e = build::<Cors>(yaml).unwrap_err();
            assert!(e.contains(needle), "{yaml}: {e}");
        }
    }
}
