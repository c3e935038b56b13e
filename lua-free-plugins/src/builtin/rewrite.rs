//! `rewrite`: rewrites the request path with a regex and its captures
//! (the query string is kept), and optionally the `Host` header, before
//! the request is proxied.
//!
//! ```yaml
//! - rewrite:
//!     regex: "^/v1/users/(?P<id>[0-9]+)$"
//!     replacement: "/internal/accounts/${id}"
//!     host: accounts.internal      # optional
//! ```
//!
//! A path the regex does not match is left alone. The replacement uses
//! the regex crate's syntax: `$1`, `${1}`, `${name}`, `$$` for a dollar;
//! a group the regex does not have is a config error. A result that does
//! not start with `/` gets one. The route's own `strip_prefix` and
//! `rewrite` keys apply when the request goes upstream, so this plugin sees
//! (and rewrites) the client's path, and they then apply to its result.

use http::uri::PathAndQuery;
use http::HeaderValue;
use regex::Regex;
use serde::Deserialize;

use super::{check_replacement, header_value};
use crate::{Flow, Plugin, PluginBuilder, PluginCtx, RequestHeader};

/// `rewrite` config.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewriteConfig {
    /// Matched against the path (without the query).
    pub regex: String,
    /// The new path.
    pub replacement: String,
    /// A new `Host` header.
    #[serde(default)]
    pub host: Option<String>,
}

/// The `rewrite` plugin.
#[derive(Debug)]
pub struct Rewrite {
    regex: Regex,
    replacement: String,
    host: Option<HeaderValue>,
}

impl Rewrite {
    /// The rewritten path and query, or `None` when the path does not match.
    pub fn rewrite(&self, path: &str, query: Option<&str>) -> Option<String> {
        if !self.regex.is_match(path) {
            return None;
        }
        let new = self.regex.replace(path, self.replacement.as_str());
        let mut out = String::with_capacity(new.len() + query.map_or(0, |q| q.len() + 2));
        if !new.starts_with('/') {
            out.push('/');
        }
        out.push_str(&new);
        if let Some(q) = query {
            out.push('?');
            out.push_str(q);
        }
        Some(out)
    }
}

impl Plugin for Rewrite {
    fn name(&self) -> &str {
        Self::NAME
    }

    fn request(&self, req: &mut RequestHeader, _ctx: &mut PluginCtx) -> Flow {
        let Some(new) = self.rewrite(req.uri.path(), req.uri.query()) else {
            return Flow::Continue;
        };
        if let Ok(pq) = new.parse::<PathAndQuery>() {
            let mut parts = req.uri.clone().into_parts();
            parts.path_and_query = Some(pq);
            if let Ok(uri) = http::Uri::from_parts(parts) {
                req.set_uri(uri);
            }
        }
        if let Some(host) = &self.host {
            let _ = req.insert_header(http::header::HOST, host.clone());
        }
        Flow::Continue
    }
}

impl PluginBuilder for Rewrite {
    const NAME: &'static str = "rewrite";
    type Config = RewriteConfig;

    fn build(c: RewriteConfig) -> Result<Self, String> {
        let regex = Regex::new(&c.regex).map_err(|e| format!("regex: {e}"))?;
        check_replacement(&regex, &c.replacement).map_err(|e| format!("replacement: {e}"))?;
        let host = c
            .host
            .as_deref()
            .map(|h| header_value(h, "host", "host"))
            .transpose()?;
        Ok(Self {
            regex,
            replacement: c.replacement,
            host,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin::test_util::{build, ctx, request};

    #[test]
    fn test_path_is_rewritten_with_captures_and_query_kept() {
        let p: Rewrite = build(
            "regex: '^/v1/users/(?P<id>[0-9]+)/(.*)$'\nreplacement: 'internal/${id}/$2'\nhost: accounts.internal\n",
        )
        .unwrap();
        let mut req = request(
            "GET",
            "/v1/users/42/avatar?size=2",
            &[("host", "api.example.com")],
        );
        assert!(matches!(p.request(&mut req, &mut ctx()), Flow::Continue));
        assert_eq!(req.uri.path(), "/internal/42/avatar");
        assert_eq!(req.uri.query(), Some("size=2"));
        assert_eq!(req.headers.get("host").unwrap(), "accounts.internal");
        let mut other = request("GET", "/v2/users/42", &[("host", "api.example.com")]);
        p.request(&mut other, &mut ctx());
        assert_eq!(other.uri.path(), "/v2/users/42");
        assert_eq!(other.headers.get("host").unwrap(), "api.example.com");
    }

    #[test]
    fn test_bad_config_is_refused() {
        for (yaml, needle) in [
            ("regex: '('\nreplacement: /", "regex:"),
            ("regex: '^/(a)$'\nreplacement: /$2", "group `2`"),
            ("regex: '^/$'", "missing field `replacement`"),
            (
                "regex: '^/$'\nreplacement: /\nhost: \"a\\nb\"",
                "not a valid header value",
            ),
            (
                "regex: '^/$'\nreplacement: /\nheaders: {}",
                "unknown field `headers`",
            ),
        ] {
            let e = build::<Rewrite>(yaml).unwrap_err();
            assert!(e.contains(needle), "{yaml}: {e}");
        }
    }
}
