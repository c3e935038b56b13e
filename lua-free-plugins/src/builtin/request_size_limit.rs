//! `request-size-limit`: refuses request bodies above a size with 413,
//! whether the size is announced (`Content-Length`, refused before
//! anything is sent upstream) or streamed (chunked: refused as soon as the
//! count passes the limit; the upstream request is aborted).
//!
//! ```yaml
//! - request-size-limit: { max_bytes: 1048576 }
//! ```

use http::header::CONTENT_LENGTH;
use http::StatusCode;
use serde::Deserialize;

use crate::{Flow, Plugin, PluginBuilder, PluginCtx, RequestHeader, Response};

/// `request-size-limit` config.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestSizeLimitConfig {
    /// Largest body, in bytes.
    pub max_bytes: u64,
}

/// The `request-size-limit` plugin.
#[derive(Debug)]
pub struct RequestSizeLimit {
    max: u64,
    refusal: Response,
}

impl Plugin for RequestSizeLimit {
    fn name(&self) -> &str {
        Self::NAME
    }

    fn request(&self, req: &mut RequestHeader, _ctx: &mut PluginCtx) -> Flow {
        let announced = req
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        match announced {
            Some(n) if n > self.max => Flow::Respond(self.refusal.clone()),
            _ => Flow::Continue,
        }
    }

    fn request_body(&self, _chunk: Option<&bytes::Bytes>, _end: bool, ctx: &mut PluginCtx) -> Flow {
        if ctx.body_bytes > self.max {
            Flow::Respond(self.refusal.clone())
        } else {
            Flow::Continue
        }
    }
}

impl PluginBuilder for RequestSizeLimit {
    const NAME: &'static str = "request-size-limit";
    type Config = RequestSizeLimitConfig;

    fn build(c: RequestSizeLimitConfig) -> Result<Self, String> {
        Ok(Self {
            max: c.max_bytes,
            refusal: Response::error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                &format!("the request body is larger than {} bytes", c.max_bytes),
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin::test_util::{build, ctx, request};

    #[test]
    fn test_announced_and_streamed_bodies_over_the_limit_are_refused() {
        let p: RequestSizeLimit = build("max_bytes: 10").unwrap();
        let mut c = ctx();
        let mut small = request("POST", "/", &[("content-length", "10")]);
        assert!(matches!(p.request(&mut small, &mut c), Flow::Continue));
        let mut big = request("POST", "/", &[("content-length", "11")]);
        let Flow::Respond(r) = p.request(&mut big, &mut c) else {
            panic!("11 > 10");
        };
        assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
        let chunk = bytes::Bytes::from_static(b"123456");
        c.body_bytes = 6;
        assert!(matches!(
            p.request_body(Some(&chunk), false, &mut c),
            Flow::Continue
        ));
        c.body_bytes = 12;
        assert!(matches!(
            p.request_body(Some(&chunk), false, &mut c),
            Flow::Respond(_)
        ));
    }

    #[test]
    fn test_bad_config_is_refused() {
        for (yaml, needle) in [
            ("{}", "missing field `max_bytes`"),
            ("max_bytes: -5", "invalid value"),
            ("max_bytes: 5\nmax: 6", "unknown field `max`"),
        ] {
            let e = build::<RequestSizeLimit>(yaml).unwrap_err();
            assert!(e.contains(needle), "{yaml}: {e}");
        }
    }
}
