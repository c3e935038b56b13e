//! An example third-party plugin, `api-key`: callers identify themselves
//! with a static API key; the key is checked, removed, and the consumer's
//! name goes upstream instead. Shows every part of a plugin: a config type
//! with unknown keys rejected, checks at build time, a `request` hook that
//! answers (401) or changes the request, per-request state, a `response`
//! hook and a `log` hook.
//!
//! ```yaml
//! - api-key:
//!     header: x-api-key            # default
//!     consumers: { mobile-app: "k-2f9c1e", partner-a: "k-77d0aa" }
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use lua_free_plugins::{
    Flow, LogSummary, Plugin, PluginBuilder, PluginCtx, RequestHeader, Response, ResponseHeader,
};
use serde::Deserialize;

/// `api-key` config.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// The header carrying the key.
    #[serde(default = "default_header")]
    pub header: String,
    /// Consumer name → key.
    pub consumers: BTreeMap<String, String>,
}

fn default_header() -> String {
    "x-api-key".to_owned()
}

/// The consumer a request was identified as (per-request state).
#[derive(Debug, Clone)]
struct Consumer(usize);

/// The `api-key` plugin.
#[derive(Debug)]
pub struct ApiKey {
    header: http::HeaderName,
    consumers: Vec<(String, http::HeaderValue, Vec<u8>)>,
    /// Requests answered per consumer (by the `log` hook).
    served: Vec<AtomicU64>,
}

impl ApiKey {
    /// Requests served so far for `consumer`.
    pub fn served(&self, consumer: &str) -> u64 {
        self.consumers
            .iter()
            .position(|(name, _, _)| name == consumer)
            .map_or(0, |i| self.served[i].load(Ordering::Relaxed))
    }

    /// Compares every key in constant time per length, so timing does not
    /// tell which prefix matched.
    fn find(&self, presented: &[u8]) -> Option<usize> {
        let mut found = None;
        for (i, (_, _, key)) in self.consumers.iter().enumerate() {
            let same = key.len() == presented.len()
                && key
                    .iter()
                    .zip(presented)
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0;
            if same {
                found = Some(i);
            }
        }
        found
    }
}

impl Plugin for ApiKey {
    fn name(&self) -> &str {
        Self::NAME
    }

    fn request(&self, req: &mut RequestHeader, ctx: &mut PluginCtx) -> Flow {
        let found = req
            .headers
            .get(&self.header)
            .and_then(|v| self.find(v.as_bytes()));
        let Some(i) = found else {
            return Flow::Respond(
                Response::error(
                    http::StatusCode::UNAUTHORIZED,
                    "invalid_api_key",
                    "a valid API key is required",
                )
                .with_header(
                    http::header::WWW_AUTHENTICATE,
                    http::HeaderValue::from_static("ApiKey"),
                ),
            );
        };
        // The key stays here; the upstream learns who called.
        req.remove_header(&self.header);
        let _ = req.insert_header("x-consumer", self.consumers[i].1.clone());
        ctx.set_state(Consumer(i));
        Flow::Continue
    }

    fn response(&self, _req: &RequestHeader, resp: &mut ResponseHeader, ctx: &mut PluginCtx) {
        if let Some(Consumer(i)) = ctx.state::<Consumer>() {
            let _ = resp.insert_header("x-consumer", self.consumers[*i].1.clone());
        }
    }

    fn log(&self, summary: &LogSummary, ctx: &mut PluginCtx) {
        if let (Some(Consumer(i)), false) = (ctx.state::<Consumer>(), summary.status == 0) {
            self.served[*i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl PluginBuilder for ApiKey {
    const NAME: &'static str = "api-key";
    type Config = ApiKeyConfig;

    fn build(c: ApiKeyConfig) -> Result<Self, String> {
        let header = http::HeaderName::from_bytes(c.header.as_bytes())
            .map_err(|_| format!("header: `{}` is not a header name", c.header))?;
        if c.consumers.is_empty() {
            return Err("consumers: give at least one `name: key`".to_owned());
        }
        let mut consumers = Vec::with_capacity(c.consumers.len());
        for (name, key) in c.consumers {
            if key.len() < 6 {
                return Err(format!(
                    "consumers.{name}: a key needs at least 6 characters"
                ));
            }
            let value = http::HeaderValue::from_str(&name)
                .map_err(|_| format!("consumers: `{name}` cannot be sent as a header"))?;
            consumers.push((name, value, key.into_bytes()));
        }
        let served = consumers.iter().map(|_| AtomicU64::new(0)).collect();
        Ok(Self {
            header,
            consumers,
            served,
        })
    }
}
