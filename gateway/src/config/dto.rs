//! The YAML file format: plain serde DTOs, never used past validation.
//!
//! Unknown keys are not rejected by serde here: the loader wraps the
//! deserializer in `serde_ignored` so that *every* unknown key in the file is
//! reported at once with its path, instead of only the first one.
//! Every default lives in this file, next to the field it belongs to.

use std::collections::BTreeMap;
use std::time::Duration;

use schemars::JsonSchema;
use serde::Deserialize;

/// Top level of `tiergate.yaml`.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
#[serde(default)]
pub struct ConfigDto {
    /// `production` or `development`. Unset: `tiergate gateway` runs as
    /// production, `tiergate up` as development. Only development accepts
    /// the HS256 development secret (`TIERGATE_DEV_JWT_SECRET`).
    pub environment: Option<EnvironmentDto>,
    /// Listeners and process tuning.
    pub server: ServerDto,
    /// Upstream pools by name.
    pub upstreams: BTreeMap<String, UpstreamDto>,
    /// Routes, in file order.
    pub routes: Vec<RouteDto>,
    /// JWT verification.
    pub auth: AuthDto,
    /// Tiers and rate limits.
    pub rate_limit: RateLimitDto,
    /// The admin listener.
    pub admin: AdminDto,
    /// How backend host names are resolved.
    pub dns: DnsDto,
    /// The per-request JSON log.
    pub access_log: AccessLogDto,
    /// Usage metering: admitted requests counted per caller and route,
    /// sent in batches to the subscriptions service.
    pub usage: UsageDto,
    /// Tier changes from the users service, applied in admission before
    /// the token's own tier.
    pub tier_changes: TierChangesDto,
    /// Plugins of every route (run before each route's own): a list of
    /// `- name: {config}`; checked by the plugin registry.
    #[schemars(with = "Option<Vec<PluginEntrySchema>>")]
    pub plugins: serde_yaml_ng::Value,
}

/// `environment`.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum EnvironmentDto {
    /// Safe defaults enforced.
    Production,
    /// Development conveniences allowed (the HS256 secret).
    Development,
}

/// `access_log:` — one JSON line per request, written by a background thread.
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
#[serde(default)]
pub struct AccessLogDto {
    /// Whether requests are logged at all.
    pub enabled: bool,
    /// `stdout`, `stderr`, or a file path (appended to, created if missing).
    pub path: String,
    /// Share of requests logged, 0.0 to 1.0.
    pub sample: f64,
    /// Log every 5xx (and every request that got no response) whatever `sample` says.
    pub always_log_errors: bool,
    /// Lines queued for the writer before new ones are dropped.
    pub buffer: usize,
}

impl Default for AccessLogDto {
    fn default() -> Self {
        Self {
            enabled: true,
            path: "stdout".to_owned(),
            sample: 1.0,
            always_log_errors: true,
            buffer: 16 * 1024,
        }
    }
}

/// `usage:` — admitted requests counted per (subject, user, route) in
/// memory and sent in batches to the subscriptions service's
/// `POST /internal/usage`, signed with the gateway's service key
/// (`TIERGATE_GATEWAY_SERVICE_KEY`).
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
#[serde(default)]
pub struct UsageDto {
    /// The `/internal/usage` URL of the subscriptions service; unset: no
    /// metering.
    pub endpoint: Option<String>,
    /// The name of the service called (the tokens' audience).
    pub audience: String,
    /// How often the counts are sent.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub flush_interval: Duration,
    /// Most rows in one batch.
    pub max_batch_rows: usize,
    /// Most rows kept while the service does not answer; beyond, the
    /// oldest batches are dropped (and counted).
    pub max_backlog_rows: usize,
    /// Timeout of one batch's request.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub timeout: Duration,
    /// Longest wait between retries of a failed batch (the wait doubles
    /// from `flush_interval`).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub max_backoff: Duration,
}

impl Default for UsageDto {
    fn default() -> Self {
        Self {
            endpoint: None,
            audience: "subscriptions".to_owned(),
            flush_interval: Duration::from_secs(5),
            max_batch_rows: 5_000,
            max_backlog_rows: 500_000,
            timeout: Duration::from_secs(5),
            max_backoff: Duration::from_secs(60),
        }
    }
}

/// `tier_changes:` — a long poll of the users service's
/// `GET /internal/tier-changes` (signed with the gateway's service key):
/// a paid upgrade or a lapse applies on the next request instead of with
/// the next access token.
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
#[serde(default)]
pub struct TierChangesDto {
    /// The `/internal/tier-changes` URL of the users service; unset: the
    /// tokens' own tiers only.
    pub endpoint: Option<String>,
    /// The name of the service called (the tokens' audience).
    pub audience: String,
    /// How long one poll waits for a change (whole seconds, 1s–25s).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub wait: Duration,
    /// Extra time a poll may take beyond `wait` before it counts as failed.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub timeout: Duration,
    /// Overrides are applied until this long after the last good answer;
    /// then the tokens' own tiers, until the feed answers again.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub stale_after: Duration,
    /// How long a change is kept (at least the access tokens' lifetime:
    /// a token issued before an older change has expired).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub retain: Duration,
    /// Most changes held; beyond, the oldest are dropped (and counted).
    pub max_entries: usize,
    /// Longest wait between polls while the feed fails (the wait doubles
    /// from 100ms).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub max_backoff: Duration,
}

impl Default for TierChangesDto {
    fn default() -> Self {
        Self {
            endpoint: None,
            audience: "users".to_owned(),
            wait: Duration::from_secs(20),
            timeout: Duration::from_secs(5),
            stale_after: Duration::from_secs(30),
            retain: Duration::from_secs(3600),
            max_entries: 100_000,
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// `admin:` — the operator listener (`/health/services`).
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
#[serde(default)]
pub struct AdminDto {
    /// Admin listener addresses (`ip:port`); empty turns it off.
    pub listen: Vec<String>,
}

impl Default for AdminDto {
    fn default() -> Self {
        Self {
            listen: vec!["127.0.0.1:8090".to_owned()],
        }
    }
}

/// `dns:` — the resolver for backend host names.
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
#[serde(default)]
pub struct DnsDto {
    /// DNS servers (`ip` or `ip:port`) asked directly; empty means the
    /// system resolver (`/etc/hosts`, `/etc/resolv.conf`).
    pub nameservers: Vec<String>,
    /// How long one resolution may take.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub timeout: Duration,
}

impl Default for DnsDto {
    fn default() -> Self {
        Self {
            nameservers: Vec::new(),
            timeout: Duration::from_secs(2),
        }
    }
}

/// `server:` — listeners and Pingora runtime tuning.
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
#[serde(default)]
pub struct ServerDto {
    /// Public listener addresses (`ip:port`).
    pub listen: Vec<String>,
    /// Worker threads; `None` means one per CPU core.
    pub threads: Option<usize>,
    /// Pingora's work-stealing runtime (slower for proxying on few cores).
    pub work_stealing: bool,
    /// After SIGTERM/SIGINT (or the hand-off of a SIGQUIT upgrade) the
    /// listeners close; in-flight requests get this long (whole seconds,
    /// rounded up) before the runtimes stop.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub grace_period: Duration,
    /// How long the runtimes get to stop after the grace period (whole
    /// seconds, rounded up).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub graceful_shutdown_timeout: Duration,
    /// Idle upstream connections kept for reuse, per worker thread.
    pub upstream_keepalive_pool_size: usize,
    /// Peers (IPs or CIDRs) whose `X-Forwarded-For` is believed when
    /// working out the client's address.
    pub trusted_proxies: Vec<String>,
    /// Unix socket through which a binary upgrade hands the listening
    /// sockets to the new process (`tiergate gateway --upgrade`, then
    /// SIGQUIT to the old one).
    pub upgrade_sock: String,
    /// Sizes of request heads, and connection counts, beyond which
    /// requests and connections are refused.
    pub limits: LimitsOfServerDto,
    /// How long clients may take.
    pub client_timeouts: ClientTimeoutsDto,
    /// How request paths are normalised before routing.
    pub path: PathDto,
    /// Request headers whose name contains `_`: `drop` (default; nginx's
    /// `underscores_in_headers off`) or `allow`.
    pub underscores_in_headers: UnderscoresDto,
    /// Whether the public listener's `/health/services` shows the full
    /// document (backend addresses, errors, config hash); otherwise it shows
    /// each pool's status and counts only, and the details are on the
    /// admin listener.
    pub health_details: bool,
}

/// `server.limits`.
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
#[serde(default)]
pub struct LimitsOfServerDto {
    /// Longest request line (method, target, version); longer: 414.
    pub request_line_bytes: usize,
    /// Longest single header line; longer: 431.
    pub header_line_bytes: usize,
    /// Largest request head (request line and every header); larger: 431.
    pub head_bytes: usize,
    /// Most header lines; more: 431.
    pub headers: usize,
    /// Most open client connections of this instance; beyond, new ones get
    /// a 503 and are closed.
    pub connections: usize,
    /// Most open connections from one client address (IPv6: per /64);
    /// 0 turns the cap off.
    pub connections_per_ip: usize,
}

impl Default for LimitsOfServerDto {
    fn default() -> Self {
        Self {
            request_line_bytes: 8 * 1024,
            header_line_bytes: 8 * 1024,
            head_bytes: 32 * 1024,
            headers: 100,
            connections: 10_000,
            connections_per_ip: 0,
        }
    }
}

/// `server.client_timeouts`.
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
#[serde(default)]
pub struct ClientTimeoutsDto {
    /// Longest time to receive a whole request head, from its first byte
    /// (from the connection's start for its first request); then 408 and
    /// the connection is closed.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub request_head: Duration,
    /// Longest wait for the next piece of a request body; then 408.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub body_idle: Duration,
    /// How long an idle keep-alive connection is kept open (whole seconds;
    /// `0s` turns keep-alive off).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub keepalive: Duration,
}

impl Default for ClientTimeoutsDto {
    fn default() -> Self {
        Self {
            request_head: Duration::from_secs(10),
            body_idle: Duration::from_secs(60),
            keepalive: Duration::from_secs(60),
        }
    }
}

/// `server.path`.
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
#[serde(default)]
pub struct PathDto {
    /// Merge repeated slashes (`//a///b` → `/a/b`).
    pub merge_slashes: bool,
    /// `%2F`, `%5C` and a raw `\` in a path: `reject` (400, default),
    /// `keep` (forwarded encoded, inside one segment) or `decode` (turned
    /// into `/` before normalising).
    pub escaped_slashes: EscapedSlashesDto,
}

impl Default for PathDto {
    fn default() -> Self {
        Self {
            merge_slashes: true,
            escaped_slashes: EscapedSlashesDto::Reject,
        }
    }
}

/// `server.path.escaped_slashes`.
#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum EscapedSlashesDto {
    /// Answer 400.
    #[default]
    Reject,
    /// Forward them encoded.
    Keep,
    /// Decode them to `/`.
    Decode,
}

/// `server.underscores_in_headers`.
#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum UnderscoresDto {
    /// Remove such headers before routing (many frameworks fold `X_User_Tier`
    /// and `X-User-Tier` into one variable).
    #[default]
    Drop,
    /// Keep them (identity headers are stripped in either spelling).
    Allow,
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
            trusted_proxies: Vec::new(),
            upgrade_sock: "/tmp/tiergate-upgrade.sock".to_owned(),
            limits: LimitsOfServerDto::default(),
            client_timeouts: ClientTimeoutsDto::default(),
            path: PathDto::default(),
            underscores_in_headers: UnderscoresDto::default(),
            health_details: false,
        }
    }
}

/// `upstreams.<name>:` — one pool of backends.
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
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
    /// Per-backend circuit breaker.
    pub circuit_breaker: BreakerDto,
    /// Cap on status-triggered retries to this pool.
    pub retry_budget: RetryBudgetDto,
    /// Active health checks; none when absent.
    pub health_check: Option<HealthCheckDto>,
    /// How often `host:port` backends are resolved again (`0s`: never).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub resolve_interval: Duration,
}

/// `upstreams.<name>.health_check`.
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
#[serde(default)]
pub struct HealthCheckDto {
    /// `http` or `tcp` (connect only).
    #[serde(rename = "type")]
    pub kind: CheckTypeDto,
    /// HTTP method of the check.
    pub method: String,
    /// HTTP path of the check.
    pub path: String,
    /// `Host` header of the check; the backend's address when absent.
    pub host: Option<String>,
    /// Statuses that count as healthy.
    pub expected_statuses: Vec<u16>,
    /// Time between two checks of a backend.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub interval: Duration,
    /// How long one check may take.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub timeout: Duration,
    /// Consecutive passes that make an unhealthy backend healthy.
    pub healthy_threshold: u32,
    /// Consecutive failures that make a healthy backend unhealthy.
    pub unhealthy_threshold: u32,
}

impl Default for HealthCheckDto {
    fn default() -> Self {
        Self {
            kind: CheckTypeDto::Http,
            method: "GET".to_owned(),
            path: "/health".to_owned(),
            host: None,
            expected_statuses: vec![200],
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        }
    }
}

/// `upstreams.<name>.health_check.type`.
#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CheckTypeDto {
    /// An HTTP request; healthy when the status is expected.
    #[default]
    Http,
    /// A TCP connect; healthy when it succeeds.
    Tcp,
}

impl Default for UpstreamDto {
    fn default() -> Self {
        Self {
            algorithm: AlgorithmDto::default(),
            hash_on: None,
            hash_header: None,
            backends: Vec::new(),
            circuit_breaker: BreakerDto::default(),
            retry_budget: RetryBudgetDto::default(),
            health_check: None,
            resolve_interval: Duration::from_secs(30),
        }
    }
}

/// `upstreams.<name>.circuit_breaker`.
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
#[serde(default)]
pub struct BreakerDto {
    /// Whether the breaker acts.
    pub enabled: bool,
    /// Consecutive failures that open it.
    pub consecutive_failures: u32,
    /// Failure ratio over `window` that opens it (0 < r ≤ 1).
    pub failure_ratio: f64,
    /// The rolling window of the ratio.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub window: Duration,
    /// Requests needed in the window before the ratio counts.
    pub min_requests: u32,
    /// How long it stays open the first time.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub open_for: Duration,
    /// Longest open time (it doubles on each failed probe round).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub max_open_for: Duration,
    /// Successful probes that close it (also the most probes at once).
    pub half_open_probes: u32,
    /// Upstream statuses counted as failures.
    pub failure_statuses: Vec<u16>,
}

impl Default for BreakerDto {
    fn default() -> Self {
        let d = crate::upstream::breaker::BreakerSettings::default();
        Self {
            enabled: d.enabled,
            consecutive_failures: d.consecutive_failures,
            failure_ratio: d.failure_ratio,
            window: d.window,
            min_requests: d.min_requests,
            open_for: d.open_for,
            max_open_for: d.max_open_for,
            half_open_probes: d.half_open_probes,
            failure_statuses: d.failure_statuses,
        }
    }
}

/// `upstreams.<name>.algorithm`.
#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq, Eq, JsonSchema)]
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
#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq, Eq, JsonSchema)]
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
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
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
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
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
    /// Retries of idempotent requests on upstream error statuses.
    #[serde(default)]
    pub retry: RetryDto,
    /// Whether a bearer token is needed: `none` (default), `optional`, `required`.
    #[serde(default)]
    pub auth: AuthModeDto,
    /// Lowest tier allowed (by order in `rate_limit.tiers`).
    #[serde(default)]
    pub min_tier: Option<String>,
    /// The caller needs at least one of these roles.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Count requests to this route against the caller's limits.
    #[serde(default = "default_true")]
    pub rate_limit: bool,
    /// The route's plugins, in order: a list of `- name: {config}`.
    #[serde(default)]
    #[schemars(with = "Option<Vec<PluginEntrySchema>>")]
    pub plugins: serde_yaml_ng::Value,
}

fn default_true() -> bool {
    true
}

/// `routes[i].retry`.
#[derive(Debug, Deserialize, Clone, JsonSchema)]
#[schemars(deny_unknown_fields)]
#[serde(default)]
pub struct RetryDto {
    /// Retries after an upstream answered one of `on_statuses` (0 = never).
    pub attempts: u32,
    /// Upstream statuses that are retried on another backend.
    pub on_statuses: Vec<u16>,
}

impl Default for RetryDto {
    fn default() -> Self {
        Self {
            attempts: 1,
            on_statuses: vec![502, 503, 504],
        }
    }
}

/// `upstreams.<name>.retry_budget`.
#[derive(Debug, Deserialize, Clone, Copy, JsonSchema)]
#[schemars(deny_unknown_fields)]
#[serde(default)]
pub struct RetryBudgetDto {
    /// Retries allowed per request sent to the pool (0.2 = 20% extra load).
    pub ratio: f64,
    /// Retries that may be spent at once (the budget's cap).
    pub burst: u32,
}

impl Default for RetryBudgetDto {
    fn default() -> Self {
        Self {
            ratio: 0.2,
            burst: 10,
        }
    }
}

/// `routes[i].auth`.
#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AuthModeDto {
    /// Tokens are not looked at; callers are anonymous (limited by IP).
    #[default]
    None,
    /// A valid token identifies the caller; no token means anonymous; an
    /// invalid token is refused.
    Optional,
    /// A valid token is needed.
    Required,
}

/// `auth:` — how bearer tokens are verified.
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
#[serde(default)]
pub struct AuthDto {
    /// Where the public keys come from (EdDSA, RS256, ...).
    pub jwks: Option<JwksDto>,
    /// Accepted `alg` values. `HS256` must be listed here to be accepted,
    /// and then works only with `environment: development` and the
    /// `TIERGATE_DEV_JWT_SECRET` environment variable set.
    pub algorithms: Vec<String>,
    /// Required `iss` claim, when set.
    pub issuer: Option<String>,
    /// Required `aud` claim (one of the token's audiences), when set.
    pub audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf` (whole seconds).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub leeway: Duration,
    /// Longer tokens are refused without being parsed.
    pub max_token_bytes: usize,
    /// Verified tokens remembered (each until it expires).
    pub cache_capacity: usize,
}

impl Default for AuthDto {
    fn default() -> Self {
        Self {
            jwks: None,
            algorithms: vec!["EdDSA".into(), "RS256".into()],
            issuer: None,
            audience: None,
            leeway: Duration::from_secs(30),
            max_token_bytes: 8192,
            cache_capacity: 65_536,
        }
    }
}

/// `auth.jwks`.
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct JwksDto {
    /// `http://` or `https://` URL of the JSON Web Key Set.
    pub url: String,
    /// How often the set is fetched again.
    #[serde(default = "default_jwks_refresh", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub refresh_interval: Duration,
    /// A token with an unknown `kid` triggers a fetch at most this often.
    #[serde(default = "default_jwks_refetch", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub min_refetch_interval: Duration,
    /// Timeout of one fetch.
    #[serde(default = "default_jwks_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub timeout: Duration,
}

fn default_jwks_refresh() -> Duration {
    Duration::from_secs(300)
}

fn default_jwks_refetch() -> Duration {
    Duration::from_secs(10)
}

fn default_jwks_timeout() -> Duration {
    Duration::from_secs(2)
}

/// `rate_limit:` — the tier table, the anonymous class and Redis.
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
#[serde(default)]
pub struct RateLimitDto {
    /// Tiers from lowest to highest (the order `min_tier` compares by).
    pub tiers: Vec<TierDto>,
    /// The tier of tokens whose `tier` claim is missing or unknown
    /// (default: `FREE` when defined, else the first tier).
    pub default_tier: Option<String>,
    /// Limits of callers without a token, per client IP.
    pub anonymous: LimitsDto,
    /// How anonymous callers are keyed.
    pub anonymous_keys: AnonymousKeysDto,
    /// Shared limits across gateway instances.
    pub redis: Option<RedisDto>,
}

/// `rate_limit.anonymous_keys`.
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
#[serde(default)]
pub struct AnonymousKeysDto {
    /// IPv6 clients share a bucket per prefix of this length (a client
    /// usually holds a whole /64, so per address would let it rotate).
    pub ipv6_prefix: u8,
    /// Most anonymous keys tracked at once. Beyond, a client not yet
    /// tracked shares a bucket per overflow prefix.
    pub max_tracked: usize,
    /// The overflow prefix of IPv4 clients.
    pub overflow_ipv4_prefix: u8,
    /// The overflow prefix of IPv6 clients.
    pub overflow_ipv6_prefix: u8,
}

impl Default for AnonymousKeysDto {
    fn default() -> Self {
        Self {
            ipv6_prefix: 64,
            max_tracked: 100_000,
            overflow_ipv4_prefix: 24,
            overflow_ipv6_prefix: 48,
        }
    }
}

impl Default for RateLimitDto {
    fn default() -> Self {
        let tier = |name: &str, m, h, d: LimitDto, limit_by| TierDto {
            name: name.to_owned(),
            per_minute: LimitDto::Count(m),
            per_hour: LimitDto::Count(h),
            per_day: d,
            limit_by,
        };
        let (user, tenant) = (LimitByDto::User, LimitByDto::Tenant);
        Self {
            tiers: vec![
                tier("FREE", 10, 100, LimitDto::Count(1_000), user),
                tier("BASIC", 50, 1_000, LimitDto::Count(10_000), user),
                tier("PREMIUM", 200, 5_000, LimitDto::Count(50_000), user),
                // A team on ENTERPRISE shares one budget.
                tier("ENTERPRISE", 1_000, 25_000, LimitDto::Unlimited, tenant),
            ],
            default_tier: None,
            anonymous: LimitsDto::default(),
            anonymous_keys: AnonymousKeysDto::default(),
            redis: None,
        }
    }
}

/// `rate_limit.tiers[i]`.
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct TierDto {
    /// Name, as carried in the token's `tier` claim (case-insensitive).
    pub name: String,
    /// Requests per minute.
    #[serde(default)]
    pub per_minute: LimitDto,
    /// Requests per hour.
    #[serde(default)]
    pub per_hour: LimitDto,
    /// Requests per day.
    #[serde(default)]
    pub per_day: LimitDto,
    /// Whose budget a request draws from: `user` (each user their own) or
    /// `tenant` (every member of the organization the token acts for
    /// shares one; a token without `tenant` draws from its user's).
    #[serde(default)]
    pub limit_by: LimitByDto,
}

/// `rate_limit.tiers[i].limit_by`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LimitByDto {
    /// One budget per user.
    #[default]
    User,
    /// One budget per organization (the token's `tenant` claim).
    Tenant,
}

/// `rate_limit.anonymous`.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
#[serde(default)]
pub struct LimitsDto {
    /// Requests per minute.
    pub per_minute: LimitDto,
    /// Requests per hour.
    pub per_hour: LimitDto,
    /// Requests per day.
    pub per_day: LimitDto,
}

/// A count, or `unlimited` (also the default when the key is absent).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum LimitDto {
    /// No limit in this window.
    #[default]
    Unlimited,
    /// At most this many requests per window.
    Count(u64),
}

impl JsonSchema for LimitDto {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Limit".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A count, or `unlimited` (also the default when the key is absent).",
            "oneOf": [
                { "type": "integer", "minimum": 0 },
                { "const": "unlimited" }
            ]
        })
    }
}

/// One entry of a `plugins` list, for the JSON Schema only: a mapping
/// with one key, the plugin's name, whose value is its config (checked by
/// the plugin when the config is loaded; see docs/PLUGINS.md).
pub struct PluginEntrySchema;

impl JsonSchema for PluginEntrySchema {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "PluginEntry".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "`- name: {config}`: the plugin's name (cors, headers, ip-restriction, request-size-limit, rewrite, static-response, redirect, or a registered one) and its config; see docs/PLUGINS.md.",
            "type": "object",
            "minProperties": 1,
            "maxProperties": 1
        })
    }
}

impl<'de> Deserialize<'de> for LimitDto {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = LimitDto;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a non-negative number or `unlimited`")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<LimitDto, E> {
                Ok(LimitDto::Count(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<LimitDto, E> {
                u64::try_from(v)
                    .map(LimitDto::Count)
                    .map_err(|_| E::custom("a limit cannot be negative"))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<LimitDto, E> {
                if v == "unlimited" {
                    Ok(LimitDto::Unlimited)
                } else {
                    Err(E::custom(format!(
                        "expected a number or `unlimited`, found `{v}`"
                    )))
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// `rate_limit.redis`.
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
#[serde(default)]
pub struct RedisDto {
    /// `redis://[user:password@]host:port[/db]`; the `TIERGATE_REDIS_URL`
    /// environment variable overrides it.
    pub url: Option<String>,
    /// Redis Cluster seed node URLs (instead of `url`).
    pub cluster: Vec<String>,
    /// Prefix of every key the gateway writes.
    pub key_prefix: String,
    /// Gateway instances sharing the limits; when Redis is unreachable each
    /// instance admits `limit / expected_instances`.
    pub expected_instances: u32,
    /// Longest a request for a key with no leased tokens waits on Redis
    /// before deciding locally.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub cold_wait: Duration,
    /// A Redis call slower than this counts as a failure.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub timeout: Duration,
    /// Leased tokens unused this long go back to Redis.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub lease_idle: Duration,
}

impl Default for RedisDto {
    fn default() -> Self {
        Self {
            url: None,
            cluster: Vec::new(),
            key_prefix: "tiergate:rl:".to_owned(),
            expected_instances: 1,
            cold_wait: Duration::from_millis(5),
            timeout: Duration::from_millis(100),
            lease_idle: Duration::from_secs(2),
        }
    }
}

/// `routes[i].match`.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
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
#[derive(Debug, Default, Deserialize, Clone, JsonSchema)]
#[schemars(deny_unknown_fields)]
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
#[derive(Debug, Default, Deserialize, Clone, JsonSchema)]
#[schemars(deny_unknown_fields)]
#[serde(default)]
pub struct RewriteDto {
    /// Replace the matched prefix with this one.
    pub prefix: Option<String>,
    /// Regex replacement over the path.
    pub regex: Option<RegexRewriteDto>,
}

/// `routes[i].rewrite.regex`.
#[derive(Debug, Deserialize, Clone, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RegexRewriteDto {
    /// The pattern, applied to the path.
    pub pattern: String,
    /// The replacement (`$1`, `${name}`).
    pub replacement: String,
}

/// `routes[i].timeouts`.
#[derive(Debug, Deserialize, Clone, Copy, JsonSchema)]
#[schemars(deny_unknown_fields)]
#[serde(default)]
pub struct TimeoutsDto {
    /// TCP connect timeout per attempt.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub connect: Duration,
    /// Longest wait for each read from the upstream (headers or body).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub read: Duration,
    /// Longest wait for each write to the upstream.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub write: Duration,
    /// Budget for all attempts together; caps each attempt's timeouts.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "Option<String>")]
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
