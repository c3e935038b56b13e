//! Configuration: the YAML file is read into DTOs ([`dto`]), then validated
//! into the typed [`Config`] below. Nothing else in the gateway sees YAML.
//!
//! Validation never stops at the first problem: [`parse`] returns every error
//! it finds, each with its path in the file (`routes[2].upstream`) and line.

mod access;
pub mod dto;
mod lines;
mod rules;
pub(crate) mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use regex::Regex;

pub use access::{
    AnonymousKeys, AuthMode, AuthSettings, JwksSettings, LimitBy, Limits, RateLimitSettings,
    RedisSettings, RedisTarget, RedisUrl, TierSpec,
};
use lines::{join_key, LineMap};
use lua_free_plugins::{Chain, Registry};

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Where in the file: `routes[2].match.path.regex`; empty for the whole file.
    pub path: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// What is wrong, for a human.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = if self.path.is_empty() {
            "<file>"
        } else {
            &self.path
        };
        match self.line {
            Some(line) => write!(f, "{path} (line {line}): {}", self.message),
            None => write!(f, "{path}: {}", self.message),
        }
    }
}

/// Every problem found in a config file (never empty).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(f, "{n} error{} in config:", if n == 1 { "" } else { "s" })?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// `environment`, when the file sets it (else the command decides:
    /// `gateway` is production, `up` development).
    pub environment: Option<RunMode>,
    /// Listeners and runtime tuning.
    pub server: ServerSettings,
    /// Upstream pools, sorted by name.
    pub upstreams: Vec<UpstreamSpec>,
    /// Routes in file order.
    pub routes: Vec<RouteSpec>,
    /// Token verification.
    pub auth: AuthSettings,
    /// Tiers and limits.
    pub rate_limit: RateLimitSettings,
    /// The admin listener.
    pub admin: AdminSettings,
    /// How backend host names are resolved.
    pub dns: DnsSettings,
    /// The access log.
    pub access_log: AccessLogSettings,
    /// Usage metering, when `usage.endpoint` is set.
    pub usage: Option<UsageSettings>,
    /// The tier change feed, when `tier_changes.endpoint` is set.
    pub tier_changes: Option<TierChangesSettings>,
    /// SHA-256 of the config text (hex), as `sha256sum` prints it.
    pub source_sha256: String,
}

/// Production or development.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RunMode {
    /// Safe defaults enforced: no HS256 development secret.
    #[default]
    Production,
    /// The HS256 development secret may be used.
    Development,
}

impl RunMode {
    /// The config's `environment`, else `default` (the command's).
    pub fn of(config: &Config, default: RunMode) -> RunMode {
        config.environment.unwrap_or(default)
    }
}

/// Request hygiene at the edge: sizes and times beyond which the
/// connection layer refuses a request or a connection, and how the router
/// normalises paths and headers. Lives in the snapshot: a reload applies
/// it (to new connections; open ones keep theirs until they close).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EdgeSettings {
    /// Longest request line (414 beyond).
    pub request_line_bytes: usize,
    /// Longest header line (431 beyond).
    pub header_line_bytes: usize,
    /// Largest request head, request line included (431 beyond).
    pub head_bytes: usize,
    /// Most header lines (431 beyond).
    pub headers: usize,
    /// Most open client connections.
    pub connections: usize,
    /// Most open connections per client address (IPv6 per /64); 0: off.
    pub connections_per_ip: usize,
    /// Longest time to receive a request head.
    pub head_timeout: Duration,
    /// Longest wait between two reads of a request body.
    pub body_idle_timeout: Duration,
    /// Idle keep-alive time, whole seconds (0: no keep-alive).
    pub keepalive_secs: u64,
    /// Path normalisation.
    pub path: PathSettings,
    /// Whether header names with `_` are dropped.
    pub drop_underscore_headers: bool,
}

/// How request paths are normalised (see [`crate::router::canonical`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathSettings {
    /// Merge repeated slashes.
    pub merge_slashes: bool,
    /// `%2F`, `%5C` and a raw `\`.
    pub escaped_slashes: EscapedSlashes,
}

impl Default for PathSettings {
    fn default() -> Self {
        Self {
            merge_slashes: true,
            escaped_slashes: EscapedSlashes::Reject,
        }
    }
}

/// What to do with `%2F`, `%5C` and a raw `\` in a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EscapedSlashes {
    /// 400: a backend that decodes them would see other segments than
    /// routing did.
    #[default]
    Reject,
    /// Forward them encoded (`%2F`, `%5C`), inside one segment.
    Keep,
    /// Decode them to `/` before the path is normalised.
    Decode,
}

/// The access log.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessLogSettings {
    /// Whether requests are logged.
    pub enabled: bool,
    /// Where lines go.
    pub target: LogTarget,
    /// Share of requests logged.
    pub sample: f64,
    /// 5xx and response-less requests are always logged.
    pub always_log_errors: bool,
    /// Queue length before lines are dropped.
    pub buffer: usize,
}

/// `usage:`, validated: where and how often the usage counts go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageSettings {
    /// The subscriptions service's `/internal/usage` URL.
    pub endpoint: String,
    /// Their audience.
    pub audience: String,
    /// How often counts are sent.
    pub flush_interval: Duration,
    /// Most rows per batch.
    pub max_batch_rows: usize,
    /// Most rows kept unsent.
    pub max_backlog_rows: usize,
    /// Timeout of one batch's request.
    pub timeout: Duration,
    /// Longest wait between retries.
    pub max_backoff: Duration,
}

/// `tier_changes:`, validated: the users service's tier change feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierChangesSettings {
    /// The users service's `/internal/tier-changes` URL.
    pub endpoint: String,
    /// Its audience.
    pub audience: String,
    /// How long one poll waits for a change.
    pub wait: Duration,
    /// Extra time beyond `wait` before a poll fails.
    pub timeout: Duration,
    /// Overrides apply until this long after the last good answer.
    pub stale_after: Duration,
    /// How long a change is kept.
    pub retain: Duration,
    /// Most changes held.
    pub max_entries: usize,
    /// Longest wait between failed polls.
    pub max_backoff: Duration,
}

/// Where the access log goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogTarget {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
    /// A file, appended to.
    File(std::path::PathBuf),
}

/// The admin listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminSettings {
    /// Its addresses; empty when off.
    pub listen: Vec<SocketAddr>,
}

/// The resolver of backend host names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSettings {
    /// Servers asked directly; empty for the system resolver.
    pub nameservers: Vec<SocketAddr>,
    /// Longest time one resolution may take.
    pub timeout: Duration,
}

/// A pool's active health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckSpec {
    /// What a check does.
    pub kind: CheckKind,
    /// Time between two checks of a backend.
    pub interval: Duration,
    /// Longest time one check may take.
    pub timeout: Duration,
    /// Consecutive passes that make a backend healthy.
    pub healthy_threshold: u32,
    /// Consecutive failures that make a backend unhealthy.
    pub unhealthy_threshold: u32,
}

/// What a health check does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// Connect only.
    Tcp,
    /// Send one HTTP/1.1 request and read the status line.
    Http {
        /// Request method.
        method: Method,
        /// Request path (with query, if any).
        path: String,
        /// `Host` header; the backend's `ip:port` when `None`.
        host: Option<String>,
        /// Statuses that pass.
        expected_statuses: Vec<u16>,
    },
}

/// Validated `server:` section.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Public listeners.
    pub listen: Vec<SocketAddr>,
    /// Worker threads (≥ 1).
    pub threads: usize,
    /// Use Pingora's work-stealing runtime.
    pub work_stealing: bool,
    /// Accepting period after SIGTERM.
    pub grace_period: Duration,
    /// Time in-flight requests get after the grace period.
    pub graceful_shutdown_timeout: Duration,
    /// Idle upstream connections kept per thread.
    pub upstream_keepalive_pool_size: usize,
    /// Proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The binary-upgrade socket.
    pub upgrade_sock: std::path::PathBuf,
    /// Request hygiene.
    pub edge: EdgeSettings,
    /// The public `/health/services` shows the full document.
    pub health_details: bool,
}

/// A validated upstream pool.
#[derive(Debug, Clone)]
pub struct UpstreamSpec {
    /// The pool's name.
    pub name: String,
    /// How a backend is chosen.
    pub algorithm: Algorithm,
    /// Backends as written (host names are resolved when the pool is built).
    pub backends: Vec<BackendSpec>,
    /// Circuit breaker of each backend.
    pub breaker: crate::upstream::breaker::BreakerSettings,
    /// Status-triggered retries allowed per request (ratio) and at once (burst).
    pub retry_budget: (f64, u32),
    /// Active health checks, when configured.
    pub health_check: Option<HealthCheckSpec>,
    /// How often host names are resolved again; zero for never.
    pub resolve_interval: Duration,
}

/// A route's retry policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrySpec {
    /// Most retries after an error status.
    pub attempts: u32,
    /// Statuses retried.
    pub on_statuses: Vec<u16>,
}

/// Backend selection algorithm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Algorithm {
    /// Smooth weighted round robin; weights exact over every cycle.
    RoundRobin,
    /// Weighted consistent hashing on the given key.
    ConsistentHash(HashKey),
    /// Fewest in-flight requests per unit of weight.
    LeastInflight,
    /// Two weighted random picks, fewer in-flight requests wins.
    PowerOfTwoChoices,
}

/// What consistent hashing hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// A request header's value; requests without it hash on the client IP.
    Header(HeaderName),
    /// The client IP.
    ClientIp,
}

/// A backend entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    /// Where it is.
    pub address: BackendAddress,
    /// Relative weight, 1..=1000.
    pub weight: u32,
}

/// A backend's address as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendAddress {
    /// A literal socket address.
    Socket(SocketAddr),
    /// A host name and port; every address it resolves to is a backend.
    Host {
        /// DNS name.
        host: String,
        /// TCP port.
        port: u16,
    },
}

impl fmt::Display for BackendAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendAddress::Socket(a) => write!(f, "{a}"),
            BackendAddress::Host { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// A validated route.
#[derive(Debug, Clone)]
pub struct RouteSpec {
    /// Unique name.
    pub name: String,
    /// Host matchers; empty = any host.
    pub hosts: Vec<HostMatch>,
    /// Path matcher.
    pub path: PathMatch,
    /// Allowed methods; empty = any.
    pub methods: Vec<Method>,
    /// Required headers with exact values.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Index into [`Config::upstreams`].
    pub upstream: usize,
    /// Path rewrite before proxying.
    pub rewrite: PathRewrite,
    /// `Host` header sent upstream.
    pub upstream_host: UpstreamHost,
    /// Upstream timeouts.
    pub timeouts: Timeouts,
    /// Retries on upstream statuses (idempotent requests only).
    pub retry: RetrySpec,
    /// Token requirement.
    pub auth: AuthMode,
    /// Lowest tier allowed (index into `rate_limit.tiers`).
    pub min_tier: Option<usize>,
    /// Roles of which the caller needs one (empty = no role needed).
    pub roles: Vec<String>,
    /// Whether requests count against the caller's limits.
    pub rate_limit: bool,
    /// The plugins run for its requests: the global ones, then its own.
    pub plugins: Chain,
    /// Its name, shared with the plugins' per-request context.
    pub label: std::sync::Arc<str>,
}

/// Host matcher, lower-cased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    /// Exactly this host.
    Exact(String),
    /// Any host ending with this suffix (stored with its leading dot: `.example.com`).
    Wildcard(String),
}

/// Path matcher.
#[derive(Debug, Clone)]
pub enum PathMatch {
    /// The path equals this.
    Exact(String),
    /// The path's leading segments equal these (`/` matches everything).
    Prefix(String),
    /// The path matches this regex.
    Regex(Regex),
}

/// How the path is changed before proxying.
#[derive(Debug, Clone)]
pub enum PathRewrite {
    /// Unchanged.
    None,
    /// Replace the matched prefix with this string (empty = strip it).
    ReplacePrefix(String),
    /// Regex replacement over the path.
    Regex(Regex, String),
}

/// The `Host` header sent upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamHost {
    /// The client's `Host`.
    Preserve,
    /// The chosen backend's `ip:port`.
    Backend,
    /// A fixed value.
    Set(HeaderValue),
}

/// Upstream timeouts of a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connect, per attempt.
    pub connect: Duration,
    /// Each read from the upstream.
    pub read: Duration,
    /// Each write to the upstream.
    pub write: Duration,
    /// Budget of all attempts together.
    pub total: Option<Duration>,
}

/// Why a config file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read (missing, permissions, a directory...).
    #[error("cannot read {}: {source}", path.display())]
    Unreadable {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file was read and is invalid.
    #[error("{0}")]
    Invalid(#[from] ConfigErrors),
}

/// Reads and validates a config file (built-in plugins).
pub fn load_file(path: &Path) -> Result<Config, LoadError> {
    load_file_with(path, &Registry::with_builtins())
}

/// [`load_file`] with the plugins of `registry`.
pub fn load_file_with(path: &Path, registry: &Registry) -> Result<Config, LoadError> {
    let src = std::fs::read_to_string(path).map_err(|source| LoadError::Unreadable {
        path: path.to_owned(),
        source,
    })?;
    Ok(parse_with(&src, registry)?)
}

/// Parses and validates config text (built-in plugins), returning every
/// error found.
pub fn parse(src: &str) -> Result<Config, ConfigErrors> {
    parse_with(src, &Registry::with_builtins())
}

/// [`parse`] with the plugins of `registry`: each plugin's config is
/// checked, and the plugin built, here.
pub fn parse_with(src: &str, registry: &Registry) -> Result<Config, ConfigErrors> {
    if src.trim().is_empty() {
        return Err(ConfigErrors(vec![ConfigError {
            path: String::new(),
            line: None,
            message: "the config file is empty".to_owned(),
        }]));
    }
    let lines = LineMap::build(src);
    let mut errors = Vec::new();
    let mut unknown = Vec::new();
    let mut track = serde_path_to_error::Track::new();
    let result = {
        let de = serde_yaml_ng::Deserializer::from_str(src);
        let de = serde_path_to_error::Deserializer::new(de, &mut track);
        serde_ignored::deserialize(de, |path| unknown.push(ignored_path(&path)))
    };
    for path in unknown {
        let (parent, key) = match path.rfind('.') {
            Some(cut) => (&path[..cut], &path[cut + 1..]),
            None => ("", path.as_str()),
        };
        let at = if parent.is_empty() {
            "the top level"
        } else {
            parent
        };
        let message = format!("unknown key `{key}` in {at}");
        errors.push(ConfigError {
            line: lines.line_of(&path),
            path,
            message,
        });
    }
    let dto: dto::ConfigDto = match result {
        Ok(dto) => dto,
        Err(e) => {
            let path = tracked_path(&track.path());
            let line = e.location().map(|l| l.line()).or(lines.line_of(&path));
            // serde_yaml_ng prefixes the path itself; we print it separately.
            let text = e.to_string();
            let text = text
                .strip_prefix(&format!("{path}: "))
                .unwrap_or(&text)
                .to_owned();
            errors.push(ConfigError {
                path,
                line,
                message: strip_location(&text),
            });
            return Err(ConfigErrors(errors));
        }
    };
    match validate::validate(dto, registry) {
        Ok(mut config) if errors.is_empty() => {
            config.source_sha256 = sha256_hex(src.as_bytes());
            Ok(config)
        }
        Ok(_) => Err(ConfigErrors(errors)),
        Err(found) => {
            errors.extend(found.into_iter().map(|(path, message)| ConfigError {
                line: lines.line_of(&path),
                path,
                message,
            }));
            Err(ConfigErrors(errors))
        }
    }
}

/// The JSON Schema of the config file, generated from the types the file
/// is read into (`conf/tiergate.schema.json` is this, kept in sync by a
/// test; `tiergate config-schema` prints it). Editors with the YAML
/// language server complete and check keys with it.
pub fn json_schema() -> String {
    let mut schema = schemars::schema_for!(dto::ConfigDto);
    schema.insert(
        "title".to_owned(),
        serde_json::Value::String("tiergate gateway config (conf/tiergate.yaml)".to_owned()),
    );
    let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
    text.push('\n');
    text
}

/// Lower-case hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(bytes);
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// `serde_ignored`'s path rendered in our `a.b[0].c` notation.
fn ignored_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path as P;
    match path {
        P::Root => String::new(),
        P::Seq { parent, index } => format!("{}[{index}]", ignored_path(parent)),
        P::Map { parent, key } => join_key(&ignored_path(parent), key),
        P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
            ignored_path(parent)
        }
    }
}

/// `serde_path_to_error`'s path rendered in our notation.
fn tracked_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } => out = join_key(&out, key),
            Segment::Enum { variant } => out = join_key(&out, variant),
            Segment::Unknown => {}
        }
    }
    out
}

/// serde_yaml appends " at line L column C"; we print the line ourselves.
fn strip_location(message: &str) -> String {
    match message.find(" at line ") {
        Some(cut) => message[..cut].to_owned(),
        None => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "
upstreams:
  users:
    backends:
      - address: 127.0.0.1:8021
routes:
  - name: users
    match:
      path: { prefix: /api/users }
    upstream: users
";

    fn errors(src: &str) -> Vec<ConfigError> {
        match parse(src) {
            Ok(_) => panic!("expected errors"),
            Err(ConfigErrors(e)) => e,
        }
    }

    #[test]
    fn test_minimal_config_is_valid_with_defaults() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.server.listen, vec!["0.0.0.0:8000".parse().unwrap()]);
        assert!(config.server.threads >= 1);
        assert_eq!(config.upstreams[0].algorithm, Algorithm::RoundRobin);
        assert_eq!(config.routes[0].timeouts.connect, Duration::from_secs(3));
    }

    #[test]
    fn test_every_unknown_key_is_reported_with_its_line() {
        let src = MINIMAL
            .replace("  users:\n", "  users:\n    colour: red\n")
            .replace("    upstream: users", "    upstream: users\n    retries: 3");
        let e = errors(&src);
        let paths: Vec<_> = e.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["upstreams.users.colour", "routes[0].retries"]);
        assert_eq!(e[0].line, Some(4));
        assert!(e[1].message.contains("unknown key `retries`"));
    }

    #[test]
    fn test_type_error_names_path_and_line() {
        let src = MINIMAL.replace(
            "address: 127.0.0.1:8021",
            "address: 127.0.0.1:8021\n        weight: heavy",
        );
        let e = errors(&src);
        assert_eq!(e[0].path, "upstreams.users.backends[0].weight");
        assert_eq!(e[0].line, Some(6));
    }

    #[test]
    fn test_empty_file_is_an_error() {
        assert_eq!(errors("  \n")[0].message, "the config file is empty");
    }

    #[test]
    fn test_syntax_error_has_a_line() {
        let e = errors("routes:\n  - name: [unclosed\n");
        assert!(e[0].line.is_some());
    }
}
