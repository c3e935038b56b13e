//! The compiled route table.
//!
//! Built once per config snapshot; matching a request does no parsing and no
//! allocation on the success path. Precedence, most specific first:
//!
//! 1. **host**: an exact host, then `*.` wildcards (longest suffix first),
//!    then routes without `hosts`;
//! 2. within a host: an **exact** path, then **regex** paths (file order),
//!    then the **longest prefix** (prefixes match whole segments:
//!    `/api/users` takes `/api/users` and `/api/users/7`, not `/api/usersx`);
//! 3. among routes with the same host and path: file order, skipping routes
//!    whose `methods` or `headers` do not match.
//!
//! A request whose host and path match some route but whose method matches
//! none gets [`RouteMatch::MethodNotAllowed`] with the methods that would.
//!
//! Matching runs on the request's canonical path ([`canonical`]), and a
//! route's rewrite ([`rewrite`]) applies to that path on its way upstream.

pub mod canonical;
pub mod rewrite;

use std::collections::HashMap;

use foldhash::fast::RandomState;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use regex::{Regex, RegexSet};

use crate::config::{HostMatch, PathMatch, RouteSpec};

type Map<K, V> = HashMap<K, V, RandomState>;

/// The outcome of matching a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteMatch {
    /// Index of the chosen route in the config's route list.
    Found(usize),
    /// Host and path matched, the method did not; the allowed methods.
    MethodNotAllowed(Vec<Method>),
    /// Nothing matched.
    NotFound,
}

/// Per-route checks that are not part of the table's keys.
#[derive(Debug)]
struct Filter {
    methods: Vec<Method>,
    headers: Vec<(HeaderName, HeaderValue)>,
}

/// Route table for one host group.
#[derive(Debug, Default)]
struct PathTable {
    exact: Map<Box<str>, Vec<u32>>,
    regex: Vec<(Regex, u32)>,
    /// All of `regex` in one automaton: one scan rejects a path that none
    /// of them match, instead of one scan per regex.
    regex_set: Option<RegexSet>,
    prefix: PrefixNode,
}

/// One path segment of the prefix trie.
#[derive(Debug, Default)]
struct PrefixNode {
    children: Map<Box<str>, PrefixNode>,
    routes: Vec<u32>,
}

/// The compiled table; see the module docs for precedence.
#[derive(Debug, Default)]
pub struct Router {
    exact_hosts: Map<Box<str>, PathTable>,
    /// (suffix with leading dot, table), longest suffix first.
    wildcard_hosts: Vec<(Box<str>, PathTable)>,
    any_host: PathTable,
    filters: Vec<Filter>,
}

impl Router {
    /// Compiles the routes (already validated).
    pub fn new(routes: &[RouteSpec]) -> Self {
        let mut router = Router::default();
        for (i, r) in routes.iter().enumerate() {
            let id = i as u32;
            router.filters.push(Filter {
                methods: r.methods.clone(),
                headers: r.headers.clone(),
            });
            if r.hosts.is_empty() {
                router.any_host.insert(&r.path, id);
            }
            for h in &r.hosts {
                let table = match h {
                    HostMatch::Exact(host) => {
                        router.exact_hosts.entry(host.as_str().into()).or_default()
                    }
                    HostMatch::Wildcard(suffix) => {
                        match router
                            .wildcard_hosts
                            .iter()
                            .position(|(s, _)| **s == **suffix)
                        {
                            Some(pos) => &mut router.wildcard_hosts[pos].1,
                            None => {
                                router
                                    .wildcard_hosts
                                    .push((suffix.as_str().into(), PathTable::default()));
                                let last = router.wildcard_hosts.len() - 1;
                                &mut router.wildcard_hosts[last].1
                            }
                        }
                    }
                };
                table.insert(&r.path, id);
            }
        }
        router
            .wildcard_hosts
            .sort_by_key(|(suffix, _)| std::cmp::Reverse(suffix.len()));
        router.any_host.build_regex_set();
        for table in router.exact_hosts.values_mut() {
            table.build_regex_set();
        }
        for (_, table) in &mut router.wildcard_hosts {
            table.build_regex_set();
        }
        router
    }

    /// Matches a request. `host` is the `Host` header or URI authority, in
    /// any case, with or without a port.
    pub fn find(&self, host: &str, path: &str, method: &Method, headers: &HeaderMap) -> RouteMatch {
        let mut buf = [0u8; 256];
        let host = normalize_host(host, &mut buf);
        let found = self.search(host, path, |id| {
            let f = &self.filters[id as usize];
            (f.methods.is_empty() || f.methods.contains(method)) && headers_match(f, headers)
        });
        if let Some(id) = found {
            return RouteMatch::Found(id as usize);
        }
        // Slow path, errors only: would another method have matched?
        let mut allowed: Vec<Method> = Vec::new();
        self.search(host, path, |id| {
            let f = &self.filters[id as usize];
            if headers_match(f, headers) {
                for m in &f.methods {
                    if !allowed.contains(m) {
                        allowed.push(m.clone());
                    }
                }
            }
            false
        });
        if allowed.is_empty() {
            RouteMatch::NotFound
        } else {
            RouteMatch::MethodNotAllowed(allowed)
        }
    }

    fn search(&self, host: &str, path: &str, mut check: impl FnMut(u32) -> bool) -> Option<u32> {
        if let Some(table) = self.exact_hosts.get(host) {
            if let Some(id) = table.find(path, &mut check) {
                return Some(id);
            }
        }
        for (suffix, table) in &self.wildcard_hosts {
            if host.len() > suffix.len() && host.ends_with(&**suffix) {
                if let Some(id) = table.find(path, &mut check) {
                    return Some(id);
                }
            }
        }
        self.any_host.find(path, &mut check)
    }
}

impl PathTable {
    fn build_regex_set(&mut self) {
        if self.regex.is_empty() {
            return;
        }
        // Every pattern compiled alone at validation, so the set compiles
        // too; if it ever did not, matching falls back to one by one.
        self.regex_set = RegexSet::new(self.regex.iter().map(|(re, _)| re.as_str())).ok();
    }

    fn insert(&mut self, path: &PathMatch, id: u32) {
        match path {
            PathMatch::Exact(p) => self.exact.entry(p.as_str().into()).or_default().push(id),
            PathMatch::Regex(re) => self.regex.push((re.clone(), id)),
            PathMatch::Prefix(p) => {
                let mut node = &mut self.prefix;
                for seg in segments(p) {
                    node = node.children.entry(seg.into()).or_default();
                }
                node.routes.push(id);
            }
        }
    }

    fn find(&self, path: &str, check: &mut impl FnMut(u32) -> bool) -> Option<u32> {
        if let Some(ids) = self.exact.get(path) {
            if let Some(id) = ids.iter().copied().find(|&id| check(id)) {
                return Some(id);
            }
        }
        match &self.regex_set {
            // Fast reject first; only a hit pays for the list of matches.
            Some(set) if set.is_match(path) => {
                for i in set.matches(path).iter() {
                    if let Some(&(_, id)) = self.regex.get(i) {
                        if check(id) {
                            return Some(id);
                        }
                    }
                }
            }
            Some(_) => {}
            None => {
                for (re, id) in &self.regex {
                    if re.is_match(path) && check(*id) {
                        return Some(*id);
                    }
                }
            }
        }
        self.prefix.find(segments(path), check)
    }
}

impl PrefixNode {
    /// Deepest match first: descend as far as the segments go, then try the
    /// routes of each node on the way back up.
    fn find<'p>(
        &self,
        mut segs: impl Iterator<Item = &'p str>,
        check: &mut impl FnMut(u32) -> bool,
    ) -> Option<u32> {
        if let Some(seg) = segs.next() {
            if let Some(child) = self.children.get(seg) {
                if let Some(id) = child.find(segs, check) {
                    return Some(id);
                }
            }
        }
        self.routes.iter().copied().find(|&id| check(id))
    }
}

/// Path segments after the leading `/`; `/` itself has none.
fn segments(path: &str) -> impl Iterator<Item = &str> {
    let p = path.strip_prefix('/').unwrap_or(path);
    p.split('/').take_while(|s| !s.is_empty())
}

fn headers_match(f: &Filter, headers: &HeaderMap) -> bool {
    f.headers
        .iter()
        .all(|(name, value)| headers.get_all(name).iter().any(|v| v == value))
}

/// Lower-cases and strips the port, into `buf` when a copy is needed.
fn normalize_host<'a>(host: &'a str, buf: &'a mut [u8; 256]) -> &'a str {
    let host = if let Some(rest) = host.strip_prefix('[') {
        // `[v6]:port`: drop the port, keep the brackets. No route can name
        // an IPv6 literal host, so this only has to not mangle the port cut.
        match rest.find(']') {
            Some(end) => &host[..end + 2],
            None => host,
        }
    } else {
        match host.rfind(':') {
            Some(cut) => &host[..cut],
            None => host,
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if !host.bytes().any(|b| b.is_ascii_uppercase()) || host.len() > buf.len() {
        return host;
    }
    let out = &mut buf[..host.len()];
    out.copy_from_slice(host.as_bytes());
    out.make_ascii_lowercase();
    // Only ASCII bytes changed, so this is still valid UTF-8.
    std::str::from_utf8(out).unwrap_or(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    fn router(yaml_routes: &str) -> (Router, Vec<String>) {
        let src = format!(
            "upstreams:\n  p:\n    backends: [{{address: \"127.0.0.1:1\"}}]\nroutes:\n{yaml_routes}"
        );
        let config = parse(&src).unwrap();
        let names = config.routes.iter().map(|r| r.name.clone()).collect();
        (Router::new(&config.routes), names)
    }

    fn name(r: &(Router, Vec<String>), host: &str, path: &str, method: Method) -> String {
        match r.0.find(host, path, &method, &HeaderMap::new()) {
            RouteMatch::Found(i) => r.1[i].clone(),
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn test_segments() {
        assert_eq!(segments("/").count(), 0);
        assert_eq!(segments("/a/b").collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(segments("/a//b").collect::<Vec<_>>(), ["a"]);
        assert_eq!(segments("/a/b/").collect::<Vec<_>>(), ["a", "b"]);
    }

    #[test]
    fn test_prefix_is_segment_aware_and_longest_wins() {
        let r = router(
            "  - {name: api, match: {path: {prefix: /api}}, upstream: p}\n  - {name: users, match: {path: {prefix: /api/users/}}, upstream: p}\n",
        );
        assert_eq!(name(&r, "h", "/api/users", Method::GET), "users");
        assert_eq!(name(&r, "h", "/api/users/7/x", Method::GET), "users");
        assert_eq!(name(&r, "h", "/api/usersx", Method::GET), "api");
        assert_eq!(name(&r, "h", "/api", Method::GET), "api");
        assert_eq!(name(&r, "h", "/apix", Method::GET), "NotFound");
        assert_eq!(name(&r, "h", "/", Method::GET), "NotFound");
    }

    #[test]
    fn test_host_port_and_case_are_ignored() {
        let r = router("  - {name: a, match: {hosts: [api.example.com]}, upstream: p}\n");
        assert_eq!(name(&r, "API.Example.com:8000", "/x", Method::GET), "a");
        assert_eq!(name(&r, "api.example.com.", "/x", Method::GET), "a");
        assert_eq!(name(&r, "other.com", "/x", Method::GET), "NotFound");
    }

    #[test]
    fn test_method_not_allowed_lists_methods() {
        let r = router(
            "  - {name: a, match: {path: {exact: /x}, methods: [get]}, upstream: p}\n  - {name: b, match: {path: {exact: /x}, methods: [POST, get]}, upstream: p}\n",
        );
        assert_eq!(name(&r, "h", "/x", Method::POST), "b");
        assert_eq!(
            r.0.find("h", "/x", &Method::DELETE, &HeaderMap::new()),
            RouteMatch::MethodNotAllowed(vec![Method::GET, Method::POST])
        );
    }
}
