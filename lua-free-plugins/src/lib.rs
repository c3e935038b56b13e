//! tiergate's plugin API: program the gateway in Rust, configure it in
//! YAML, no Lua.
//!
//! A [`Plugin`] has one hook per phase of a request, mirroring Pingora's
//! (request, request body, upstream request, upstream response, response,
//! log); every hook has a no-op default, so a plugin implements only what it
//! needs. A [`PluginBuilder`] turns the plugin's YAML config into the plugin
//! once, when the config is loaded (unknown keys are rejected there, with
//! their path). A [`Registry`] maps plugin names to builders; the gateway
//! builds one [`Chain`] per route from it and runs the chain's hooks in
//! order.
//!
//! ```yaml
//! plugins:                       # every route, before the route's own
//!   - headers: { response: { set: { x-frame-options: DENY } } }
//! routes:
//!   - name: api
//!     match: { path: { prefix: /api } }
//!     upstream: api
//!     plugins:
//!       - cors: { allow_origins: ["https://app.example.com"] }
//!       - request-size-limit: { max_bytes: 1048576 }
//! ```
//!
//! Order of a request through the gateway: route match → auth → rate limit
//! (the core) → `request` hooks (global plugins, then the route's) → request
//! body → upstream request → upstream response → response → log. A plugin
//! that answers ([`Flow::Respond`]) stops the `request` phase: later plugins'
//! `request` hooks and the upstream are skipped, but every plugin's
//! `response` and `log` hooks still run for the answer.
//!
//! Hooks are synchronous and run on the request's thread: they must not
//! block (no network or disk I/O); they may allocate and take short locks.
#![deny(missing_docs)]

pub mod builtin;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
pub use pingora_http::{RequestHeader, ResponseHeader};
use serde::de::DeserializeOwned;

/// What a `request` or `request_body` hook decided.
#[derive(Debug)]
pub enum Flow {
    /// Go on: the next plugin, then the upstream.
    Continue,
    /// Answer the client with this response; the upstream is not called.
    Respond(Response),
}

/// A response written by a plugin.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: StatusCode,
    /// Headers (`Content-Length` is set by the gateway, except on 1xx, 204
    /// and 304).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Body (may be empty).
    pub body: Bytes,
}

impl Response {
    /// An empty response with `status`.
    pub fn new(status: StatusCode) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    /// A JSON error shaped like the gateway's envelope:
    /// `{"error":{"code":..,"message":..}}`. The gateway sends it with the
    /// `X-Request-Id` header (the body carries no request or trace id).
    pub fn error(status: StatusCode, code: &str, message: &str) -> Self {
        let body = format!(
            r#"{{"error":{{"code":"{}","message":"{}"}}}}"#,
            json_escape(code),
            json_escape(message)
        );
        Self {
            status,
            headers: vec![(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body: Bytes::from(body),
        }
    }

    /// Adds a header.
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }
}

fn json_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// Per-request facts and state shared by a chain's hooks.
#[derive(Debug, Default)]
pub struct PluginCtx {
    /// The client's address after the gateway's `server.trusted_proxies`
    /// (the `X-Forwarded-For` hop the gateway believes).
    pub client_ip: Option<IpAddr>,
    /// The TCP peer's address.
    pub peer_ip: Option<IpAddr>,
    /// The matched route's name.
    pub route: Arc<str>,
    /// The authenticated subject (`sub`), when a token was verified.
    pub subject: Option<String>,
    /// Request body bytes seen so far (counted by the gateway before the
    /// `request_body` hooks run).
    pub body_bytes: u64,
    state: http::Extensions,
}

impl PluginCtx {
    /// A context for a request to `route`.
    pub fn new(route: Arc<str>) -> Self {
        Self {
            route,
            ..Self::default()
        }
    }

    /// State a plugin keeps for this request (one value per type; use a
    /// type private to the plugin).
    pub fn state<T: Send + Sync + Clone + 'static>(&self) -> Option<&T> {
        self.state.get::<T>()
    }

    /// Mutable state, inserted with `T::default()` on first use.
    pub fn state_mut<T: Send + Sync + Clone + Default + 'static>(&mut self) -> &mut T {
        self.state.get_or_insert_default::<T>()
    }

    /// Replaces the state of type `T`.
    pub fn set_state<T: Send + Sync + Clone + 'static>(&mut self, value: T) {
        self.state.insert(value);
    }
}

/// What the `log` hook is told about the finished request.
#[derive(Debug, Clone, Copy)]
pub struct LogSummary {
    /// Status sent to the client (0 when none was).
    pub status: u16,
    /// Total time in the gateway.
    pub duration: std::time::Duration,
    /// Whether a plugin answered instead of the upstream.
    pub answered_by_plugin: bool,
}

/// A gateway plugin. Every hook has a no-op default.
///
/// Hooks run for requests on the routes whose chain holds the plugin, in
/// chain order, on the request's thread: no blocking I/O.
pub trait Plugin: Send + Sync + std::fmt::Debug + 'static {
    /// The name it is configured under (`cors`, `my-plugin`).
    fn name(&self) -> &str;

    /// Whether the plugin answers `req` itself without needing to know the
    /// caller (a CORS preflight, which browsers send without
    /// credentials). For such a request the gateway skips auth and rate
    /// limiting and runs the chain's `request` hooks at once.
    fn answers_before_auth(&self, _req: &RequestHeader) -> bool {
        false
    }

    /// After route match, auth and rate limiting, before the upstream is
    /// chosen. May change the request (path, headers) before it is
    /// proxied. Return [`Flow::Respond`] to answer instead of the
    /// upstream: later plugins' `request` hooks do not run.
    fn request(&self, _req: &mut RequestHeader, _ctx: &mut PluginCtx) -> Flow {
        Flow::Continue
    }

    /// Each piece of the request body as it streams in (`chunk` is `None`
    /// at the end of a body with no final piece; `ctx.body_bytes` counts
    /// everything so far). Return [`Flow::Respond`] to abort the request
    /// with that response (the upstream's answer, if any, is discarded).
    fn request_body(&self, _chunk: Option<&Bytes>, _end: bool, _ctx: &mut PluginCtx) -> Flow {
        Flow::Continue
    }

    /// The request as it is about to go upstream, after the gateway set
    /// `Host`, forwarding and identity headers. Runs once per attempt
    /// (again on a retry).
    fn upstream_request(&self, _req: &mut RequestHeader, _ctx: &mut PluginCtx) {}

    /// The upstream's response header as received, before the gateway adds
    /// its own headers.
    fn upstream_response(&self, _resp: &mut ResponseHeader, _ctx: &mut PluginCtx) {}

    /// The response header about to be sent to the client, from the
    /// upstream or from a plugin, after the gateway added its headers.
    /// `req` is the client's request (as changed by `request` hooks).
    fn response(&self, _req: &RequestHeader, _resp: &mut ResponseHeader, _ctx: &mut PluginCtx) {}

    /// After the response was sent (or the request failed).
    fn log(&self, _summary: &LogSummary, _ctx: &mut PluginCtx) {}
}

/// Builds a plugin from its YAML config, once, when the config is loaded.
pub trait PluginBuilder: Plugin + Sized {
    /// The name the plugin is configured under.
    const NAME: &'static str;
    /// Its config (use `#[serde(deny_unknown_fields)]`).
    type Config: DeserializeOwned;

    /// Checks the config beyond its shape and builds the plugin. The error
    /// is shown to the operator with the plugin's path in the file.
    fn build(config: Self::Config) -> Result<Self, String>;
}

/// A config error of one plugin: where inside its config, and what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", if path.is_empty() { String::new() } else { format!("{path}: ") })]
pub struct PluginError {
    /// Path inside the plugin's config (`allow_origins[1]`), or empty.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl PluginError {
    fn whole(message: impl Into<String>) -> Self {
        Self {
            path: String::new(),
            message: message.into(),
        }
    }
}

/// Deserializes `value` into `T`, reporting the path of the first error.
/// A missing config (`~`) is read as an empty mapping.
pub fn from_yaml<T: DeserializeOwned>(value: &serde_yaml_ng::Value) -> Result<T, PluginError> {
    let value = match value {
        serde_yaml_ng::Value::Null => serde_yaml_ng::Value::Mapping(Default::default()),
        v => v.clone(),
    };
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        PluginError {
            path: if path == "." { String::new() } else { path },
            message: e.into_inner().to_string(),
        }
    })
}

type BuildFn = dyn Fn(&serde_yaml_ng::Value) -> Result<Arc<dyn Plugin>, PluginError> + Send + Sync;

/// Plugin builders by name.
#[derive(Clone)]
pub struct Registry {
    builders: BTreeMap<String, Arc<BuildFn>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.builders.keys()).finish()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::with_builtins()
    }
}

impl Registry {
    /// A registry without any plugin.
    pub fn empty() -> Self {
        Self {
            builders: BTreeMap::new(),
        }
    }

    /// The built-in plugins: `cors`, `headers`, `ip-restriction`,
    /// `request-size-limit`, `rewrite`, `static-response`, `redirect`.
    pub fn with_builtins() -> Self {
        let mut r = Self::empty();
        r.register::<builtin::cors::Cors>();
        r.register::<builtin::headers::Headers>();
        r.register::<builtin::ip_restriction::IpRestriction>();
        r.register::<builtin::request_size_limit::RequestSizeLimit>();
        r.register::<builtin::rewrite::Rewrite>();
        r.register::<builtin::static_response::StaticResponse>();
        r.register::<builtin::redirect::Redirect>();
        r
    }

    /// Registers `P` under [`PluginBuilder::NAME`] (replacing a plugin of
    /// that name).
    pub fn register<P: PluginBuilder>(&mut self) {
        self.builders.insert(
            P::NAME.to_owned(),
            Arc::new(|value| {
                let config = from_yaml::<P::Config>(value)?;
                let plugin = P::build(config).map_err(PluginError::whole)?;
                Ok(Arc::new(plugin) as Arc<dyn Plugin>)
            }),
        );
    }

    /// The registered names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.builders.keys().map(String::as_str)
    }

    /// Builds plugin `name` from its config.
    pub fn build(
        &self,
        name: &str,
        config: &serde_yaml_ng::Value,
    ) -> Result<Arc<dyn Plugin>, PluginError> {
        match self.builders.get(name) {
            Some(build) => build(config),
            None => Err(PluginError::whole(format!(
                "unknown plugin `{name}`; known: {}",
                self.names().collect::<Vec<_>>().join(", ")
            ))),
        }
    }
}

/// The plugins of one route, in order. Cheap to clone.
#[derive(Clone, Default)]
pub struct Chain {
    plugins: Arc<[Arc<dyn Plugin>]>,
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.plugins.iter().map(|p| p.name()))
            .finish()
    }
}

impl Chain {
    /// A chain of these plugins, run in this order.
    pub fn new(plugins: Vec<Arc<dyn Plugin>>) -> Self {
        Self {
            plugins: plugins.into(),
        }
    }

    /// Whether there is nothing to run.
    pub fn is_empty(&self) -> bool {
        self.plugins.is_empty()
    }

    /// The plugins' names, in order.
    pub fn names(&self) -> Vec<&str> {
        self.plugins.iter().map(|p| p.name()).collect()
    }

    /// Whether a plugin of the chain answers `req` before auth (see
    /// [`Plugin::answers_before_auth`]).
    pub fn answers_before_auth(&self, req: &RequestHeader) -> bool {
        self.plugins.iter().any(|p| p.answers_before_auth(req))
    }

    /// Runs the `request` hooks; the first [`Flow::Respond`] wins.
    pub fn request(&self, req: &mut RequestHeader, ctx: &mut PluginCtx) -> Option<Response> {
        for p in self.plugins.iter() {
            if let Flow::Respond(r) = p.request(req, ctx) {
                return Some(r);
            }
        }
        None
    }

    /// Runs the `request_body` hooks; the first [`Flow::Respond`] wins.
    pub fn request_body(
        &self,
        chunk: Option<&Bytes>,
        end: bool,
        ctx: &mut PluginCtx,
    ) -> Option<Response> {
        for p in self.plugins.iter() {
            if let Flow::Respond(r) = p.request_body(chunk, end, ctx) {
                return Some(r);
            }
        }
        None
    }

    /// Runs the `upstream_request` hooks.
    pub fn upstream_request(&self, req: &mut RequestHeader, ctx: &mut PluginCtx) {
        for p in self.plugins.iter() {
            p.upstream_request(req, ctx);
        }
    }

    /// Runs the `upstream_response` hooks.
    pub fn upstream_response(&self, resp: &mut ResponseHeader, ctx: &mut PluginCtx) {
        for p in self.plugins.iter() {
            p.upstream_response(resp, ctx);
        }
    }

    /// Runs the `response` hooks.
    pub fn response(&self, req: &RequestHeader, resp: &mut ResponseHeader, ctx: &mut PluginCtx) {
        for p in self.plugins.iter() {
            p.response(req, resp, ctx);
        }
    }

    /// Runs the `log` hooks.
    pub fn log(&self, summary: &LogSummary, ctx: &mut PluginCtx) {
        for p in self.plugins.iter() {
            p.log(summary, ctx);
        }
    }

    /// `self` followed by `other`.
    pub fn then(&self, other: &Chain) -> Chain {
        if other.is_empty() {
            return self.clone();
        }
        if self.is_empty() {
            return other.clone();
        }
        Chain {
            plugins: self
                .plugins
                .iter()
                .chain(other.plugins.iter())
                .cloned()
                .collect(),
        }
    }
}

/// Builds a chain from a YAML list of single-key mappings
/// (`[{cors: {...}}, {headers: {...}}]`). Errors carry their path
/// relative to the list (`[1].headers.response.set`).
pub fn build_chain(
    registry: &Registry,
    list: &serde_yaml_ng::Value,
) -> Result<Chain, Vec<PluginError>> {
    let items = match list {
        serde_yaml_ng::Value::Null => return Ok(Chain::default()),
        serde_yaml_ng::Value::Sequence(items) => items,
        _ => {
            return Err(vec![PluginError::whole(
                "must be a list of `- name: {config}` entries",
            )])
        }
    };
    let mut plugins = Vec::with_capacity(items.len());
    let mut errors = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let entry = match item {
            serde_yaml_ng::Value::Mapping(m) if m.len() == 1 => m.iter().next(),
            _ => None,
        };
        let Some((name, config)) = entry else {
            errors.push(PluginError {
                path: format!("[{i}]"),
                message: "must be a mapping with one key, the plugin's name: `- cors: {...}`"
                    .to_owned(),
            });
            continue;
        };
        let Some(name) = name.as_str() else {
            errors.push(PluginError {
                path: format!("[{i}]"),
                message: "the plugin's name must be a string".to_owned(),
            });
            continue;
        };
        match registry.build(name, config) {
            Ok(p) => plugins.push(p),
            Err(e) => errors.push(PluginError {
                path: if e.path.is_empty() {
                    format!("[{i}].{name}")
                } else {
                    format!("[{i}].{name}.{}", e.path)
                },
                message: e.message,
            }),
        }
    }
    if errors.is_empty() {
        Ok(Chain::new(plugins))
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(s: &str) -> serde_yaml_ng::Value {
        serde_yaml_ng::from_str(s).unwrap()
    }

    #[test]
    fn test_chain_errors_name_their_path_and_unknown_plugins() {
        let r = Registry::with_builtins();
        let errs = build_chain(
            &r,
            &yaml("- cors: { allow_origin: ['*'] }\n- nope: {}\n- {a: 1, b: 2}\n"),
        )
        .unwrap_err();
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(errs[0].path.starts_with("[0].cors"), "{errs:?}");
        assert!(errs[0].message.contains("allow_origin"), "{errs:?}");
        assert_eq!(errs[1].path, "[1].nope");
        assert!(errs[1].message.contains("unknown plugin `nope`"));
        assert!(errs[1].message.contains("static-response"));
        assert_eq!(errs[2].path, "[2]");
    }

    #[test]
    fn test_first_respond_wins_and_later_request_hooks_are_skipped() {
        let r = Registry::with_builtins();
        let chain = build_chain(
            &r,
            &yaml(
                "- static-response: { status: 503, body: down }\n\
                 - redirect: { to: /elsewhere }\n",
            ),
        )
        .unwrap();
        assert_eq!(chain.names(), ["static-response", "redirect"]);
        let mut req = RequestHeader::build("GET", b"/x", None).unwrap();
        let mut ctx = PluginCtx::new("r".into());
        let resp = chain.request(&mut req, &mut ctx).unwrap();
        assert_eq!(resp.status, StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn test_error_body_is_valid_json() {
        let r = Response::error(StatusCode::FORBIDDEN, "x", "a \"quoted\"\nline");
        let text = std::str::from_utf8(&r.body).unwrap();
        assert_eq!(
            text,
            r#"{"error":{"code":"x","message":"a \"quoted\"\u000aline"}}"#
        );
    }
}
