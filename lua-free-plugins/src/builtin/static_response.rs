//! `static-response`: answers every request of the route itself, without
//! the upstream: maintenance mode, a mock, a fixed `robots.txt`.
//!
//! ```yaml
//! - static-response:
//!     status: 503                                   # default 200
//!     headers: { retry-after: "600" }
//!     content_type: application/json                # default text/plain; charset=utf-8
//!     body: '{"error":{"code":"maintenance","message":"back at 14:00 UTC"}}'
//! ```

use std::collections::BTreeMap;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use serde::Deserialize;

use super::{header_pairs, header_value, status_in};
use crate::{Flow, Plugin, PluginBuilder, PluginCtx, RequestHeader, Response};

/// `static-response` config.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticResponseConfig {
    /// Status (200–599; default 200).
    #[serde(default = "ok")]
    pub status: u16,
    /// Extra headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// `Content-Type` of the body.
    #[serde(default)]
    pub content_type: Option<String>,
    /// The body (default empty).
    #[serde(default)]
    pub body: String,
}

fn ok() -> u16 {
    200
}

/// The `static-response` plugin.
#[derive(Debug)]
pub struct StaticResponse {
    response: Response,
}

impl Plugin for StaticResponse {
    fn name(&self) -> &str {
        Self::NAME
    }

    fn request(&self, _req: &mut RequestHeader, _ctx: &mut PluginCtx) -> Flow {
        Flow::Respond(self.response.clone())
    }
}

impl PluginBuilder for StaticResponse {
    const NAME: &'static str = "static-response";
    type Config = StaticResponseConfig;

    fn build(c: StaticResponseConfig) -> Result<Self, String> {
        let status = status_in(c.status, 200..=599, "status")?;
        let mut headers = header_pairs(&c.headers, "headers")?;
        if headers.iter().any(|(k, _)| k == CONTENT_TYPE) && c.content_type.is_some() {
            return Err(
                "give the content type once: `content_type` or headers.content-type".to_owned(),
            );
        }
        if !headers.iter().any(|(k, _)| k == CONTENT_TYPE) && !c.body.is_empty() {
            let ct = c
                .content_type
                .as_deref()
                .unwrap_or("text/plain; charset=utf-8");
            headers.push((
                CONTENT_TYPE,
                header_value(ct, "content_type", "content_type")?,
            ));
        }
        if headers
            .iter()
            .any(|(k, _)| k == http::header::CONTENT_LENGTH || k == http::header::TRANSFER_ENCODING)
        {
            return Err("headers: the gateway sets content-length itself".to_owned());
        }
        Ok(Self {
            response: Response {
                status,
                headers,
                body: Bytes::from(c.body),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin::test_util::{build, ctx, request};

    #[test]
    fn test_every_request_gets_the_configured_response() {
        let p: StaticResponse = build(
            "status: 503\nheaders: { retry-after: '600' }\ncontent_type: application/json\nbody: '{\"down\":true}'\n",
        )
        .unwrap();
        let Flow::Respond(r) = p.request(&mut request("POST", "/any", &[]), &mut ctx()) else {
            panic!("always answers");
        };
        assert_eq!(r.status.as_u16(), 503);
        assert_eq!(&r.body[..], b"{\"down\":true}");
        let h: Vec<(String, String)> = r
            .headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
            .collect();
        assert!(h.contains(&("retry-after".into(), "600".into())));
        assert!(h.contains(&("content-type".into(), "application/json".into())));
        let empty: StaticResponse = build("status: 204").unwrap();
        let Flow::Respond(r) = empty.request(&mut request("GET", "/", &[]), &mut ctx()) else {
            panic!()
        };
        assert!(r.headers.is_empty() && r.body.is_empty());
    }

    #[test]
    fn test_bad_config_is_refused() {
        for (yaml, needle) in [
            ("status: 99", "status: 99"),
            ("status: 700", "status: 700"),
            (
                "headers: { content-length: '3' }\nbody: abc",
                "content-length",
            ),
            (
                "headers: { content-type: a/b }\ncontent_type: c/d\nbody: x",
                "once",
            ),
            ("bodyy: x", "unknown field `bodyy`"),
        ] {
            let e = build::<StaticResponse>(yaml).unwrap_err();
            assert!(e.contains(needle), "{yaml}: {e}");
        }
    }
}
