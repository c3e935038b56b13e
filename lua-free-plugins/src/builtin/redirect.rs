//! `redirect`: answers with a redirect instead of proxying.
//!
//! ```yaml
//! - redirect:
//!     regex: "^/docs/(.*)$"                         # optional
//!     to: "https://docs.example.com/$1"
//!     status: 301                                   # 301, 302 (default), 303, 307, 308
//!     keep_query: true                              # default true
//! ```
//!
//! Without `regex` every request of the route is redirected to `to`. With
//! it, only paths it matches are (others go on to the upstream), and `to`
//! may use its captures (`$1`, `${name}`; `$$` for a dollar). The query
//! string is appended unless `keep_query: false`.

use http::header::LOCATION;
use http::HeaderValue;
use regex::Regex;
use serde::Deserialize;

use super::{check_replacement, status_in};
use crate::{Flow, Plugin, PluginBuilder, PluginCtx, RequestHeader, Response};

/// `redirect` config.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedirectConfig {
    /// Matched against the path; only matching requests are redirected.
    #[serde(default)]
    pub regex: Option<String>,
    /// The location, with the regex's captures.
    pub to: String,
    /// 301, 302, 303, 307 or 308.
    #[serde(default = "found")]
    pub status: u16,
    /// Append the request's query string.
    #[serde(default = "yes")]
    pub keep_query: bool,
}

fn found() -> u16 {
    302
}

fn yes() -> bool {
    true
}

/// The `redirect` plugin.
#[derive(Debug)]
pub struct Redirect {
    regex: Option<Regex>,
    to: String,
    status: http::StatusCode,
    keep_query: bool,
}

impl Redirect {
    /// Where `path?query` goes, or `None` when the regex does not match.
    pub fn location(&self, path: &str, query: Option<&str>) -> Option<String> {
        let mut to = match &self.regex {
            Some(re) => {
                let caps = re.captures(path)?;
                let mut out = String::new();
                caps.expand(&self.to, &mut out);
                out
            }
            None => self.to.clone(),
        };
        if let (true, Some(q)) = (self.keep_query, query) {
            to.push(if to.contains('?') { '&' } else { '?' });
            to.push_str(q);
        }
        Some(to)
    }
}

impl Plugin for Redirect {
    fn name(&self) -> &str {
        Self::NAME
    }

    fn request(&self, req: &mut RequestHeader, _ctx: &mut PluginCtx) -> Flow {
        let Some(to) = self.location(req.uri.path(), req.uri.query()) else {
            return Flow::Continue;
        };
        match HeaderValue::from_str(&to) {
            Ok(location) => {
                Flow::Respond(Response::new(self.status).with_header(LOCATION, location))
            }
            // Captures of a strange path made an invalid header: do not redirect.
            Err(_) => Flow::Continue,
        }
    }
}

impl PluginBuilder for Redirect {
    const NAME: &'static str = "redirect";
    type Config = RedirectConfig;

    fn build(c: RedirectConfig) -> Result<Self, String> {
        let status = status_in(c.status, 301..=308, "status")?;
        if !matches!(c.status, 301 | 302 | 303 | 307 | 308) {
            return Err(format!(
                "status: {} is not 301, 302, 303, 307 or 308",
                c.status
            ));
        }
        if c.to.is_empty() {
            return Err("to: must not be empty".to_owned());
        }
        let regex = match &c.regex {
            Some(r) => {
                let re = Regex::new(r).map_err(|e| format!("regex: {e}"))?;
                check_replacement(&re, &c.to).map_err(|e| format!("to: {e}"))?;
                Some(re)
            }
            None => None,
        };
        if regex.is_none() {
            HeaderValue::from_str(&c.to)
                .map_err(|_| "to: not a valid Location value".to_owned())?;
        }
        Ok(Self {
            regex,
            to: c.to,
            status,
            keep_query: c.keep_query,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin::test_util::{build, ctx, request};

    fn location(p: &Redirect, path: &str) -> Option<(u16, String)> {
        match p.request(&mut request("GET", path, &[]), &mut ctx()) {
            Flow::Respond(r) => Some((
                r.status.as_u16(),
                r.headers[0].1.to_str().unwrap().to_owned(),
            )),
            Flow::Continue => None,
        }
    }

    #[test]
    fn test_redirects_with_captures_and_query() {
        let p: Redirect = build(
            "regex: '^/docs/(?P<page>.*)$'\nto: 'https://docs.example.com/${page}'\nstatus: 301\n",
        )
        .unwrap();
        assert_eq!(
            location(&p, "/docs/a/b?x=1"),
            Some((301, "https://docs.example.com/a/b?x=1".into()))
        );
        assert_eq!(location(&p, "/api/x"), None);
        let all: Redirect =
            build("to: 'https://new.example.com/?from=old'\nkeep_query: true").unwrap();
        assert_eq!(
            location(&all, "/anything?q=2"),
            Some((302, "https://new.example.com/?from=old&q=2".into()))
        );
        let bare: Redirect = build("to: /home\nkeep_query: false").unwrap();
        assert_eq!(location(&bare, "/x?q=1"), Some((302, "/home".into())));
    }

    #[test]
    fn test_bad_config_is_refused() {
        for (yaml, needle) in [
            ("to: /x\nstatus: 304", "status: 304"),
            ("to: /x\nstatus: 200", "status: 200"),
            ("to: ''", "must not be empty"),
            ("regex: '^/(a)$'\nto: /$3", "group `3`"),
            ("regex: '['\nto: /", "regex:"),
            ("status: 301", "missing field `to`"),
            ("to: /x\nkeep: true", "unknown field `keep`"),
        ] {
            let e = build::<Redirect>(yaml).unwrap_err();
            assert!(e.contains(needle), "{yaml}: {e}");
        }
    }
}
