//! What a request must look like before it is routed, applied once in
//! `request_filter` so that routing, policy, plugins, metrics and the
//! upstream all see the same request:
//!
//! * the path in its canonical form ([`crate::router::canonical`]);
//! * exactly one `Host` (an HTTP/1.1 request needs one, RFC 9112 §3.2)
//!   made of authority characters, and at most one `Authorization`:
//!   two would let the gateway and a backend read different ones;
//! * no header whose name contains `_` (`underscores_in_headers: drop`):
//!   frameworks that map headers to variables fold `X_User_Tier` and
//!   `X-User-Tier` together.
//!
//! Client-sent identity headers (`x-user-*`, either spelling) are removed
//! on the way upstream ([`crate::forward`]), whatever this module allows.

use http::header::{AUTHORIZATION, HOST};
use http::{HeaderMap, HeaderName, StatusCode, Uri, Version};
use pingora_http::RequestHeader;

use crate::config::EdgeSettings;
use crate::respond::ErrorResponse;
use crate::router::canonical::{canonical, BadPath};

/// Why a request was refused before routing (each a 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadRequest {
    /// The path cannot be made canonical.
    Path(BadPath),
    /// Two `Host` headers.
    DuplicateHost,
    /// Two `Authorization` headers.
    DuplicateAuthorization,
    /// An HTTP/1.1 request without `Host`.
    MissingHost,
    /// A `Host` that is not an authority.
    BadHost,
}

impl BadRequest {
    /// The 400 the client gets.
    pub fn response(self) -> ErrorResponse {
        let (code, message) = match self {
            BadRequest::Path(why) => ("invalid_path", why.message()),
            BadRequest::DuplicateHost => ("duplicate_header", "the request has two Host headers"),
            BadRequest::DuplicateAuthorization => (
                "duplicate_header",
                "the request has two Authorization headers",
            ),
            BadRequest::MissingHost => ("missing_host", "an HTTP/1.1 request needs a Host header"),
            BadRequest::BadHost => (
                "invalid_host",
                "the Host header is not a host name or address",
            ),
        };
        ErrorResponse {
            status: StatusCode::BAD_REQUEST,
            code,
            message,
        }
    }
}

/// Checks and normalises `req` in place (see the module docs).
pub fn prepare(req: &mut RequestHeader, edge: &EdgeSettings) -> Result<(), BadRequest> {
    check_headers(&req.headers, req.version, req.uri.host().is_some())?;
    if edge.drop_underscore_headers && req.headers.keys().any(has_underscore) {
        let names: Vec<HeaderName> = req
            .headers
            .keys()
            .filter(|n| has_underscore(n))
            .cloned()
            .collect();
        for name in names {
            req.remove_header(&name);
        }
    }
    let path = canonical(req.uri.path(), edge.path).map_err(BadRequest::Path)?;
    if let std::borrow::Cow::Owned(path) = path {
        let pq = match req.uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
        let uri = Uri::builder()
            .path_and_query(pq)
            .build()
            .map_err(|_| BadRequest::Path(BadPath::InvalidByte))?;
        req.set_uri(uri);
    }
    Ok(())
}

fn has_underscore(name: &HeaderName) -> bool {
    name.as_str().contains('_')
}

fn check_headers(h: &HeaderMap, version: Version, absolute_form: bool) -> Result<(), BadRequest> {
    let mut hosts = h.get_all(HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => return Err(BadRequest::DuplicateHost),
        (Some(host), None) => {
            if !valid_authority(host.as_bytes()) {
                return Err(BadRequest::BadHost);
            }
        }
        (None, _) if version == Version::HTTP_11 && !absolute_form => {
            return Err(BadRequest::MissingHost)
        }
        (None, _) => {}
    }
    if h.get_all(AUTHORIZATION).iter().nth(1).is_some() {
        return Err(BadRequest::DuplicateAuthorization);
    }
    Ok(())
}

/// `host[:port]` (RFC 3986 authority without userinfo): reg-name
/// characters, an IPv6 literal in brackets, digits after a colon.
fn valid_authority(b: &[u8]) -> bool {
    !b.is_empty()
        && b.len() <= 255
        && b.iter().all(|&c| {
            c.is_ascii_alphanumeric()
                || matches!(
                    c,
                    b'-' | b'.'
                        | b'_'
                        | b'~'
                        | b':'
                        | b'['
                        | b']'
                        | b'%'
                        | b'!'
                        | b'$'
                        | b'&'
                        | b'\''
                        | b'('
                        | b')'
                        | b'*'
                        | b'+'
                        | b','
                        | b';'
                        | b'='
                )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge() -> EdgeSettings {
        crate::config::parse(
            "upstreams: {p: {backends: [{address: \"127.0.0.1:1\"}]}}\nroutes: [{name: r, match: {}, upstream: p}]\n",
        )
        .unwrap()
        .server
        .edge
    }

    fn req(path: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", path.as_bytes(), None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    #[test]
    fn test_requests_are_normalised_or_refused() {
        let e = edge();
        let mut r = req(
            "/a/../b%41?x=%2e",
            &[("host", "h"), ("x_user_tier", "ENTERPRISE")],
        );
        prepare(&mut r, &e).unwrap();
        assert_eq!(r.uri.to_string(), "/bA?x=%2e", "the query is left alone");
        assert!(r.headers.get("x_user_tier").is_none());
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], BadRequest);
        let cases: &[Case] = &[
            (
                "/",
                &[("host", "a"), ("host", "b")],
                BadRequest::DuplicateHost,
            ),
            (
                "/",
                &[
                    ("host", "a"),
                    ("authorization", "x"),
                    ("authorization", "y"),
                ],
                BadRequest::DuplicateAuthorization,
            ),
            ("/", &[], BadRequest::MissingHost),
            ("/", &[("host", "a/b")], BadRequest::BadHost),
            ("/", &[("host", "a@b")], BadRequest::BadHost),
            (
                "/..",
                &[("host", "a")],
                BadRequest::Path(BadPath::AboveRoot),
            ),
        ];
        for (path, headers, want) in cases {
            let mut r = req(path, headers);
            assert_eq!(prepare(&mut r, &e), Err(*want), "{path} {headers:?}");
        }
        let mut ok = req("/", &[("host", "[::1]:8000")]);
        assert_eq!(prepare(&mut ok, &e), Ok(()));
        let mut old = req("/", &[]);
        old.set_version(Version::HTTP_10);
        assert_eq!(prepare(&mut old, &e), Ok(()), "HTTP/1.0 may omit Host");
    }
}
