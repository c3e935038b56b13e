//! A route's path rewrite (`strip_prefix`, `rewrite.prefix`,
//! `rewrite.regex`), applied to the canonical path on its way upstream.

use http::Uri;

use crate::config::{PathMatch, PathRewrite, RouteSpec};

/// The rewritten path-and-query, or `None` when unchanged.
pub fn rewrite_path(route: &RouteSpec, uri: &Uri) -> Option<String> {
    let path = uri.path();
    let new_path = match &route.rewrite {
        PathRewrite::None => return None,
        PathRewrite::ReplacePrefix(replacement) => {
            let PathMatch::Prefix(prefix) = &route.path else {
                return None;
            };
            let rest = if prefix == "/" {
                path
            } else {
                path.strip_prefix(prefix.as_str()).unwrap_or(path)
            };
            let mut p = String::with_capacity(replacement.len() + rest.len() + 1);
            p.push_str(replacement);
            p.push_str(rest);
            if !p.starts_with('/') {
                p.insert(0, '/');
            }
            p
        }
        PathRewrite::Regex(re, replacement) => {
            let p = re.replace(path, replacement.as_str()).into_owned();
            if p.starts_with('/') {
                p
            } else {
                format!("/{p}")
            }
        }
    };
    Some(match uri.query() {
        Some(q) => format!("{new_path}?{q}"),
        None => new_path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    fn route(extra: &str) -> RouteSpec {
        let src = format!(
            "upstreams:\n  p:\n    backends: [{{address: \"127.0.0.1:1\"}}]\nroutes:\n  - name: r\n    upstream: p\n{extra}"
        );
        parse(&src).unwrap().routes.remove(0)
    }

    #[test]
    fn test_strip_prefix_keeps_rest_and_query() {
        let r = route("    match: {path: {prefix: /api/users}}\n    strip_prefix: true\n");
        let uri: Uri = "/api/users/7?x=1".parse().unwrap();
        assert_eq!(rewrite_path(&r, &uri).as_deref(), Some("/7?x=1"));
        let uri: Uri = "/api/users".parse().unwrap();
        assert_eq!(rewrite_path(&r, &uri).as_deref(), Some("/"));
    }

    #[test]
    fn test_prefix_rewrite_and_regex_rewrite() {
        let r = route("    match: {path: {prefix: /old}}\n    rewrite: {prefix: /new/v2}\n");
        let uri: Uri = "/old/a".parse().unwrap();
        assert_eq!(rewrite_path(&r, &uri).as_deref(), Some("/new/v2/a"));
        let r = route(
            "    match: {path: {regex: \"^/u/([0-9]+)$\"}}\n    rewrite: {regex: {pattern: \"^/u/([0-9]+)$\", replacement: \"/users/$1/profile\"}}\n",
        );
        let uri: Uri = "/u/42".parse().unwrap();
        assert_eq!(rewrite_path(&r, &uri).as_deref(), Some("/users/42/profile"));
    }
}
