//! `headers`: add, set or remove request headers (before the request goes
//! upstream) and response headers (before the response goes to the
//! client).
//!
//! ```yaml
//! - headers:
//!     request:
//!       set: { x-api-version: "2" }     # replace (or add)
//!       add: { x-tag: edge }            # append another value
//!       remove: [x-debug]
//!     response:
//!       set: { strict-transport-security: "max-age=63072000" }
//!       remove: [server]
//! ```
//!
//! In each direction `remove` runs first, then `set`, then `add`. Request
//! headers are changed in the `request` phase, so later plugins and the
//! upstream see them. The gateway's own headers are set after that: it
//! replaces `X-Forwarded-Proto`, `X-Forwarded-Host`, `X-User-*` and
//! `X-Request-Id`, and appends the client to `X-Forwarded-For`.

use std::collections::BTreeMap;

use http::{HeaderName, HeaderValue};
use serde::Deserialize;

use super::{header_name, header_pairs};
use crate::{Flow, Plugin, PluginBuilder, PluginCtx, RequestHeader, ResponseHeader};

/// One direction's changes.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderOps {
    /// Replace (or add) these.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Append these (another value when present).
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    /// Remove these.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// `headers` config.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadersConfig {
    /// Changes to the request.
    #[serde(default)]
    pub request: HeaderOps,
    /// Changes to the response.
    #[serde(default)]
    pub response: HeaderOps,
}

#[derive(Debug, Default)]
struct Ops {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

impl Ops {
    fn build(ops: &HeaderOps, what: &str) -> Result<Self, String> {
        Ok(Self {
            set: header_pairs(&ops.set, &format!("{what}.set"))?,
            add: header_pairs(&ops.add, &format!("{what}.add"))?,
            remove: ops
                .remove
                .iter()
                .map(|n| header_name(n, &format!("{what}.remove")))
                .collect::<Result<_, _>>()?,
        })
    }

    fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

/// The `headers` plugin.
#[derive(Debug)]
pub struct Headers {
    request: Ops,
    response: Ops,
}

impl Plugin for Headers {
    fn name(&self) -> &str {
        Self::NAME
    }

    fn request(&self, req: &mut RequestHeader, _ctx: &mut PluginCtx) -> Flow {
        for name in &self.request.remove {
            req.remove_header(name);
        }
        for (name, value) in &self.request.set {
            let _ = req.insert_header(name.clone(), value.clone());
        }
        for (name, value) in &self.request.add {
            let _ = req.append_header(name.clone(), value.clone());
        }
        Flow::Continue
    }

    fn response(&self, _req: &RequestHeader, resp: &mut ResponseHeader, _ctx: &mut PluginCtx) {
        for name in &self.response.remove {
            resp.remove_header(name);
        }
        for (name, value) in &self.response.set {
            let _ = resp.insert_header(name.clone(), value.clone());
        }
        for (name, value) in &self.response.add {
            let _ = resp.append_header(name.clone(), value.clone());
        }
    }
}

impl PluginBuilder for Headers {
    const NAME: &'static str = "headers";
    type Config = HeadersConfig;

    fn build(c: HeadersConfig) -> Result<Self, String> {
        let plugin = Self {
            request: Ops::build(&c.request, "request")?,
            response: Ops::build(&c.response, "response")?,
        };
        if plugin.request.is_empty() && plugin.response.is_empty() {
            return Err("give at least one of request or response set/add/remove".to_owned());
        }
        Ok(plugin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin::test_util::{build, ctx, request};

    #[test]
    fn test_request_and_response_headers_are_changed_in_order() {
        let p: Headers = build(
            "request: { set: { x-v: '2' }, add: { x-tag: b }, remove: [x-debug] }\n\
             response: { set: { x-frame-options: DENY }, add: { x-tag: z }, remove: [server] }\n",
        )
        .unwrap();
        let mut req = request(
            "GET",
            "/",
            &[("x-v", "1"), ("x-tag", "a"), ("x-debug", "on")],
        );
        let mut c = ctx();
        assert!(matches!(p.request(&mut req, &mut c), Flow::Continue));
        assert_eq!(req.headers.get("x-v").unwrap(), "2");
        let tags: Vec<_> = req.headers.get_all("x-tag").iter().collect();
        assert_eq!(tags, ["a", "b"]);
        assert!(req.headers.get("x-debug").is_none());
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.insert_header("server", "leaky/1.0").unwrap();
        p.response(&req, &mut resp, &mut c);
        assert!(resp.headers.get("server").is_none());
        assert_eq!(resp.headers.get("x-frame-options").unwrap(), "DENY");
        assert_eq!(resp.headers.get("x-tag").unwrap(), "z");
    }

    #[test]
    fn test_bad_config_is_refused() {
        for (yaml, needle) in [
            ("{}", "at least one"),
            (
                "request: { set: { 'bad name': x } }",
                "request.set: `bad name`",
            ),
            (
                "response: { add: { x-a: \"line\\nbreak\" } }",
                "not a valid header value",
            ),
            ("request: { rename: {} }", "unknown field `rename`"),
            ("requests: {}", "unknown field `requests`"),
        ] {
            let e = build::<Headers>(yaml).unwrap_err();
            assert!(e.contains(needle), "{yaml}: {e}");
        }
    }
}
