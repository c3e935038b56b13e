//! The YAML file format: plain serde DTOs, never used past validation.
//!
//! Unknown keys are not rejected by serde here: the loader wraps the
//! deserializer in `serde_ignored` so that *every* unknown key in the file is
//! reported at once with its path, instead of only the first one.
//! Every default lives in this file, next to the field it belongs to.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

/// Top level of `tiergate.yaml`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ConfigDto {
    /// Listeners and process tuning.
    pub server: ServerDto,
    /// Upstream pools by name.
    pub upstreams: BTreeMap<String, UpstreamDto>,
    /// Routes, in file order.
    pub routes: Vec<RouteDto>,
}

/// `server:` — listeners and Pingora runtime tuning.
#[derive(Debug, Deserialize)]
#[serde(default)]
pub struct ServerDto {
    /// Public listener addresses (`ip:port`).
    pub listen: Vec<String>,
    /// Worker threads; `None` means one per CPU core.
    pub threads: Option<usize>,
    /// Pingora's work-stealing runtime (slower for proxying on few cores).
    pub work_stealing: bool,
    /// After SIGTERM/SIGINT the listeners close at once; in-flight requests
    /// get this long (whole seconds, rounded up) before the runtimes stop.
    #[serde(with = "humantime_serde")]
    pub grace_period: Duration,
    /// How long the runtimes get to stop after the grace period (whole
    /// seconds, rounded up).
    #[serde(with = "humantime_serde")]
    pub graceful_shutdown_timeout: Duration,
    /// Idle upstream connections kept for reuse, per worker thread.
    pub upstream_keepalive_pool_size: usize,
}

impl Default for ServerDto {
    fn default() -> Self {
        Self {
            listen: vec!["0.0.0.0:8000".to_owned()],
            threads: None,
            work_stealing: false,
            grace_period: Duration::from_secs(1),
            graceful_shutdown_timeout: Duration::from_secs(1),
            upstream_keepalive_pool_size: 256,
        }
    }
}

/// `upstreams.<name>:` — one pool of backends.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct UpstreamDto {
    /// Load-balancing algorithm.
    pub algorithm: AlgorithmDto,
    /// What `consistent_hash` hashes on.
    pub hash_on: Option<HashOnDto>,
    /// The header for `hash_on: header`.
    pub hash_header: Option<String>,
    /// The backends.
    pub backends: Vec<BackendDto>,
}

/// `upstreams.<name>.algorithm`.
#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AlgorithmDto {
    /// Smooth weighted round robin.
    #[default]
    RoundRobin,
    /// Weighted consistent hashing (ketama ring).
    ConsistentHash,
    /// Fewest in-flight requests relative to weight.
    LeastInflight,
    /// Power of two (weighted) random choices, fewer in-flight wins.
    P2c,
}

/// `upstreams.<name>.hash_on`.
#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HashOnDto {
    /// The client's IP address.
    #[default]
    ClientIp,
    /// The value of the header named by `hash_header` (falls back to the
    /// client IP when the request lacks it).
    Header,
}

/// `upstreams.<name>.backends[i]`.
#[derive(Debug, Deserialize)]
pub struct BackendDto {
    /// `ip:port` or `host:port`.
    pub address: String,
    /// Relative share of traffic, 1..=1000.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

/// `routes[i]`.
#[derive(Debug, Deserialize)]
pub struct RouteDto {
    /// Unique name, used in error messages (and in metrics once they exist).
    pub name: String,
    /// What requests this route takes.
    #[serde(rename = "match")]
    pub matcher: MatchDto,
    /// Name of the upstream pool.
    pub upstream: String,
    /// Remove the matched prefix before proxying (prefix routes only).
    #[serde(default)]
    pub strip_prefix: bool,
    /// Rewrite the path before proxying.
    #[serde(default)]
    pub rewrite: Option<RewriteDto>,
    /// The `Host` header sent upstream: `preserve` (default), `backend`,
    /// or any other value to send literally.
    #[serde(default)]
    pub upstream_host: Option<String>,
    /// Upstream timeouts.
    #[serde(default)]
    pub timeouts: TimeoutsDto,
}

/// `routes[i].match`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct MatchDto {
    /// Host names (exact or `*.suffix`); empty matches any host.
    pub hosts: Vec<String>,
    /// Path matcher; absent matches every path.
    pub path: Option<PathMatchDto>,
    /// Methods; empty matches any method.
    pub methods: Vec<String>,
    /// Headers that must be present with exactly this value.
    pub headers: BTreeMap<String, String>,
}

/// `routes[i].match.path`: exactly one of the three.
#[derive(Debug, Default, Deserialize, Clone)]
#[serde(default)]
pub struct PathMatchDto {
    /// The whole path equals this.
    pub exact: Option<String>,
    /// The path starts with these segments.
    pub prefix: Option<String>,
    /// The path matches this regular expression.
    pub regex: Option<String>,
}

/// `routes[i].rewrite`: exactly one of the two.
#[derive(Debug, Default, Deserialize, Clone)]
#[serde(default)]
pub struct RewriteDto {
    /// Replace the matched prefix with this one.
    pub prefix: Option<String>,
    /// Regex replacement over the path.
    pub regex: Option<RegexRewriteDto>,
}

/// `routes[i].rewrite.regex`.
#[derive(Debug, Deserialize, Clone)]
pub struct RegexRewriteDto {
    /// The pattern, applied to the path.
    pub pattern: String,
    /// The replacement (`$1`, `${name}`).
    pub replacement: String,
}

/// `routes[i].timeouts`.
#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(default)]
pub struct TimeoutsDto {
    /// TCP connect timeout per attempt.
    #[serde(with = "humantime_serde")]
    pub connect: Duration,
    /// Longest wait for each read from the upstream (headers or body).
    #[serde(with = "humantime_serde")]
    pub read: Duration,
    /// Longest wait for each write to the upstream.
    #[serde(with = "humantime_serde")]
    pub write: Duration,
    /// Budget for all attempts together; caps each attempt's timeouts.
    #[serde(with = "humantime_serde")]
    pub total: Option<Duration>,
}

impl Default for TimeoutsDto {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(3),
            read: Duration::from_secs(60),
            write: Duration::from_secs(60),
            total: None,
        }
    }
}
