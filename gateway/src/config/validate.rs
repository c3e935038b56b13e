//! DTO → validated [`Config`]: every check, every error collected.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use lua_free_plugins::{build_chain, Chain, Registry};
use regex::{Regex, RegexBuilder};

use super::access::{self, AuthMode, RateLimitSettings};
use super::dto::{
    AlgorithmDto, BackendDto, CheckTypeDto, ConfigDto, HashOnDto, HealthCheckDto, PathMatchDto,
    RouteDto, TimeoutsDto, UpstreamDto,
};
use super::dto::{AuthModeDto, EnvironmentDto, EscapedSlashesDto, UnderscoresDto};
use super::rules::{valid_name, Errors};
use super::{
    AccessLogSettings, AdminSettings, Algorithm, BackendAddress, BackendSpec, CheckKind, Config,
    DnsSettings, EdgeSettings, EscapedSlashes, HashKey, HealthCheckSpec, HostMatch, LogTarget,
    PathMatch, PathRewrite, PathSettings, RouteSpec, RunMode, ServerSettings, TierChangesSettings,
    Timeouts, UpstreamHost, UpstreamSpec, UsageSettings,
};

/// Most backends one pool may have (after DNS expansion too).
pub(crate) const MAX_BACKENDS: usize = 256;
/// Largest weight of one backend.
pub(crate) const MAX_WEIGHT: u32 = 1000;
/// Compiled-regex size cap, so a config cannot make the gateway eat memory.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

pub(super) fn validate(dto: ConfigDto, registry: &Registry) -> Result<Config, Errors> {
    let mut errors = Errors::new();
    let global = plugins("plugins", &dto.plugins, registry, &mut errors);
    let server = server(&dto, &mut errors);
    let environment = dto.environment.map(|e| match e {
        EnvironmentDto::Production => RunMode::Production,
        EnvironmentDto::Development => RunMode::Development,
    });
    let auth = access::auth(&dto.auth, environment, &mut errors);
    let rate_limit = access::rate_limit(&dto.rate_limit, &mut errors);
    let admin = admin(&dto, &mut errors);
    let dns = dns(&dto, &mut errors);
    let access_log = access_log(&dto, &mut errors);
    let usage = usage(&dto, &mut errors);
    let tier_changes = tier_changes(&dto, &mut errors);
    let upstreams: Vec<UpstreamSpec> = dto
        .upstreams
        .iter()
        .filter_map(|(name, u)| upstream(name, u, &mut errors))
        .collect();
    // Indices follow the file's pool names, valid or not, so a broken pool
    // does not also make every route using it "unknown"; when any pool is
    // invalid no Config is returned, so indices never go stale.
    let pool_index: HashMap<&str, usize> = dto
        .upstreams
        .keys()
        .enumerate()
        .map(|(i, name)| (name.as_str(), i))
        .collect();
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut routes = Vec::with_capacity(dto.routes.len());
    for (i, r) in dto.routes.iter().enumerate() {
        let at = format!("routes[{i}]");
        if let Some(first) = names.insert(r.name.as_str(), i) {
            errors.push((
                format!("{at}.name"),
                format!("duplicate route name `{}` (also routes[{first}])", r.name),
            ));
        }
        let own = plugins(&format!("{at}.plugins"), &r.plugins, registry, &mut errors);
        if let Some(mut route) = route(&at, r, &pool_index, &rate_limit, &mut errors) {
            route.plugins = global.then(&own);
            routes.push(route);
        }
    }
    duplicate_matchers(&dto.routes, &mut errors);
    match server {
        Some(server) if errors.is_empty() => Ok(Config {
            environment,
            server,
            upstreams,
            routes,
            auth,
            rate_limit,
            admin,
            dns,
            access_log,
            usage,
            tier_changes,
            source_sha256: String::new(),
        }),
        _ => Err(errors),
    }
}

/// Builds a plugin list (`at` is its path), collecting each plugin's
/// errors with their path.
fn plugins(
    at: &str,
    list: &serde_yaml_ng::Value,
    registry: &Registry,
    errors: &mut Errors,
) -> Chain {
    match build_chain(registry, list) {
        Ok(chain) => chain,
        Err(found) => {
            errors.extend(found.into_iter().map(|e| {
                let path = if e.path.starts_with('[') {
                    format!("{at}{}", e.path)
                } else {
                    at.to_owned()
                };
                (path, e.message)
            }));
            Chain::default()
        }
    }
}

fn server(dto: &ConfigDto, errors: &mut Errors) -> Option<ServerSettings> {
    let s = &dto.server;
    let before = errors.len();
    if s.listen.is_empty() {
        errors.push((
            "server.listen".into(),
            "at least one listener is required".into(),
        ));
    }
    let mut listen = Vec::new();
    for (i, l) in s.listen.iter().enumerate() {
        match l.parse::<SocketAddr>() {
            Ok(a) if listen.contains(&a) => errors.push((
                format!("server.listen[{i}]"),
                format!("duplicate listener `{l}`"),
            )),
            Ok(a) => listen.push(a),
            Err(_) => errors.push((
                format!("server.listen[{i}]"),
                format!("`{l}` is not an `ip:port` address"),
            )),
        }
    }
    if s.upgrade_sock.is_empty() || !s.upgrade_sock.starts_with('/') {
        errors.push((
            "server.upgrade_sock".into(),
            format!("`{}` must be an absolute path", s.upgrade_sock),
        ));
    }
    let threads = match s.threads {
        Some(0) => {
            errors.push(("server.threads".into(), "must be at least 1".into()));
            1
        }
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    if s.upstream_keepalive_pool_size == 0 {
        errors.push((
            "server.upstream_keepalive_pool_size".into(),
            "must be at least 1".into(),
        ));
    }
    let mut trusted_proxies = Vec::new();
    for (i, p) in s.trusted_proxies.iter().enumerate() {
        let net = p
            .parse::<ipnet::IpNet>()
            .or_else(|_| p.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
        match net {
            Ok(n) => trusted_proxies.push(n.trunc()),
            Err(_) => errors.push((
                format!("server.trusted_proxies[{i}]"),
                format!("`{p}` is not an IP address or CIDR (`10.0.0.0/8`)"),
            )),
        }
    }
    let edge = edge(s, errors);
    (errors.len() == before).then_some(ServerSettings {
        listen,
        threads,
        work_stealing: s.work_stealing,
        grace_period: s.grace_period,
        graceful_shutdown_timeout: s.graceful_shutdown_timeout,
        upstream_keepalive_pool_size: s.upstream_keepalive_pool_size,
        trusted_proxies,
        upgrade_sock: s.upgrade_sock.clone().into(),
        edge,
        health_details: s.health_details,
    })
}

/// Largest request head Pingora itself reads (its own cap is 1 MiB).
const MAX_HEAD_BYTES: usize = 1 << 20;
/// Most header lines Pingora's parser takes.
const MAX_HEADERS: usize = 256;

fn edge(s: &super::dto::ServerDto, errors: &mut Errors) -> EdgeSettings {
    let l = &s.limits;
    let t = &s.client_timeouts;
    let mut check = |key: &str, ok: bool, what: String| {
        if !ok {
            errors.push((format!("server.{key}"), what));
        }
    };
    for (key, v) in [
        ("request_line_bytes", l.request_line_bytes),
        ("header_line_bytes", l.header_line_bytes),
    ] {
        check(
            &format!("limits.{key}"),
            (256..=l.head_bytes.max(256)).contains(&v),
            format!(
                "must be between 256 and `head_bytes` ({}), got {v}",
                l.head_bytes
            ),
        );
    }
    check(
        "limits.head_bytes",
        (1024..=MAX_HEAD_BYTES).contains(&l.head_bytes),
        format!(
            "must be between 1024 and {MAX_HEAD_BYTES}, got {}",
            l.head_bytes
        ),
    );
    check(
        "limits.headers",
        (1..=MAX_HEADERS).contains(&l.headers),
        format!("must be between 1 and {MAX_HEADERS}, got {}", l.headers),
    );
    check(
        "limits.connections",
        l.connections >= 1,
        "must be at least 1".into(),
    );
    check(
        "client_timeouts.request_head",
        !t.request_head.is_zero() && t.request_head <= Duration::from_secs(3600),
        "must be greater than 0 and at most 1h".into(),
    );
    check(
        "client_timeouts.body_idle",
        !t.body_idle.is_zero() && t.body_idle <= Duration::from_secs(3600),
        "must be greater than 0 and at most 1h".into(),
    );
    check(
        "client_timeouts.keepalive",
        t.keepalive <= Duration::from_secs(3600),
        "must be at most 1h (0s turns keep-alive off)".into(),
    );
    EdgeSettings {
        request_line_bytes: l.request_line_bytes,
        header_line_bytes: l.header_line_bytes,
        head_bytes: l.head_bytes,
        headers: l.headers,
        connections: l.connections.max(1),
        connections_per_ip: l.connections_per_ip,
        head_timeout: t.request_head,
        body_idle_timeout: t.body_idle,
        // Pingora counts whole seconds; round up so `500ms` is not "off".
        keepalive_secs: t.keepalive.as_secs() + u64::from(t.keepalive.subsec_nanos() > 0),
        path: PathSettings {
            merge_slashes: s.path.merge_slashes,
            escaped_slashes: match s.path.escaped_slashes {
                EscapedSlashesDto::Reject => EscapedSlashes::Reject,
                EscapedSlashesDto::Keep => EscapedSlashes::Keep,
                EscapedSlashesDto::Decode => EscapedSlashes::Decode,
            },
        },
        drop_underscore_headers: s.underscores_in_headers == UnderscoresDto::Drop,
    }
}

fn upstream(name: &str, u: &UpstreamDto, errors: &mut Errors) -> Option<UpstreamSpec> {
    let at = format!("upstreams.{name}");
    let before = errors.len();
    if !valid_name(name) {
        errors.push((
            at.clone(),
            format!("pool name `{name}` must be 1-64 characters of A-Z a-z 0-9 - _"),
        ));
    }
    let algorithm = match (u.algorithm, u.hash_on, &u.hash_header) {
        (AlgorithmDto::ConsistentHash, Some(HashOnDto::Header), Some(h)) => {
            match HeaderName::from_bytes(h.as_bytes()) {
                Ok(h) => Algorithm::ConsistentHash(HashKey::Header(h)),
                Err(_) => {
                    errors.push((
                        format!("{at}.hash_header"),
                        format!("`{h}` is not a valid header name"),
                    ));
                    Algorithm::ConsistentHash(HashKey::ClientIp)
                }
            }
        }
        (AlgorithmDto::ConsistentHash, Some(HashOnDto::Header), None) => {
            errors.push((
                format!("{at}.hash_on"),
                "hash_on: header needs `hash_header: <header name>`".into(),
            ));
            Algorithm::ConsistentHash(HashKey::ClientIp)
        }
        (AlgorithmDto::ConsistentHash, Some(HashOnDto::ClientIp) | None, Some(_)) => {
            errors.push((
                format!("{at}.hash_header"),
                "hash_header only applies with `hash_on: header`".into(),
            ));
            Algorithm::ConsistentHash(HashKey::ClientIp)
        }
        (AlgorithmDto::ConsistentHash, Some(HashOnDto::ClientIp) | None, None) => {
            Algorithm::ConsistentHash(HashKey::ClientIp)
        }
        (other, hash_on, hash_header) if hash_on.is_some() || hash_header.is_some() => {
            let key = if hash_on.is_some() {
                "hash_on"
            } else {
                "hash_header"
            };
            errors.push((
                format!("{at}.{key}"),
                format!(
                    "{key} only applies to algorithm consistent_hash, not {}",
                    algorithm_name(other)
                ),
            ));
            Algorithm::RoundRobin
        }
        (AlgorithmDto::LeastInflight, ..) => Algorithm::LeastInflight,
        (AlgorithmDto::P2c, ..) => Algorithm::PowerOfTwoChoices,
        (AlgorithmDto::RoundRobin, ..) => Algorithm::RoundRobin,
    };
    if u.backends.is_empty() {
        errors.push((
            format!("{at}.backends"),
            "a pool needs at least one backend".into(),
        ));
    }
    if u.backends.len() > MAX_BACKENDS {
        errors.push((
            format!("{at}.backends"),
            format!("a pool may have at most {MAX_BACKENDS} backends"),
        ));
    }
    let mut backends: Vec<BackendSpec> = Vec::with_capacity(u.backends.len());
    for (i, b) in u.backends.iter().enumerate() {
        let at = format!("{at}.backends[{i}]");
        if let Some(spec) = backend(&at, b, errors) {
            if backends.iter().any(|o| o.address == spec.address) {
                errors.push((
                    format!("{at}.address"),
                    format!("duplicate backend `{}` in this pool", b.address),
                ));
            }
            backends.push(spec);
        }
    }
    let breaker = breaker(&at, &u.circuit_breaker, errors);
    let budget = u.retry_budget;
    if !(0.0..=10.0).contains(&budget.ratio) {
        errors.push((
            format!("{at}.retry_budget.ratio"),
            "must be between 0 and 10".into(),
        ));
    }
    let health_check = u
        .health_check
        .as_ref()
        .map(|h| health_check(&format!("{at}.health_check"), h, errors));
    (errors.len() == before).then(|| UpstreamSpec {
        name: name.to_owned(),
        algorithm,
        backends,
        breaker,
        retry_budget: (budget.ratio, budget.burst),
        health_check,
        resolve_interval: u.resolve_interval,
    })
}

/// Longest time between two checks, and longest check.
const MAX_CHECK_INTERVAL: Duration = Duration::from_secs(3600);
/// Largest health-check threshold.
const MAX_THRESHOLD: u32 = 100;

fn health_check(at: &str, h: &HealthCheckDto, errors: &mut Errors) -> HealthCheckSpec {
    let mut check = |key: &str, ok: bool, what: &str| {
        if !ok {
            errors.push((format!("{at}.{key}"), what.to_owned()));
        }
    };
    check(
        "interval",
        h.interval >= Duration::from_millis(100) && h.interval <= MAX_CHECK_INTERVAL,
        "must be between 100ms and 1h",
    );
    check(
        "timeout",
        !h.timeout.is_zero() && h.timeout <= h.interval,
        "must be greater than 0 and at most `interval`",
    );
    for (key, v) in [
        ("healthy_threshold", h.healthy_threshold),
        ("unhealthy_threshold", h.unhealthy_threshold),
    ] {
        check(
            key,
            (1..=MAX_THRESHOLD).contains(&v),
            "must be between 1 and 100",
        );
    }
    let kind = match h.kind {
        CheckTypeDto::Tcp => CheckKind::Tcp,
        CheckTypeDto::Http => {
            let method = match h.method.to_ascii_uppercase().as_str() {
                "GET" => Method::GET,
                "HEAD" => Method::HEAD,
                "OPTIONS" => Method::OPTIONS,
                _ => {
                    errors.push((
                        format!("{at}.method"),
                        format!("`{}` is not GET, HEAD or OPTIONS", h.method),
                    ));
                    Method::GET
                }
            };
            if !h.path.starts_with('/')
                || h.path.len() > 2048
                || !h.path.bytes().all(|b| b.is_ascii_graphic())
            {
                errors.push((
                    format!("{at}.path"),
                    format!(
                        "`{}` must start with `/` and be visible ASCII without spaces",
                        h.path
                    ),
                ));
            }
            if let Some(host) = &h.host {
                if host.is_empty() || !host.bytes().all(|b| b.is_ascii_graphic()) {
                    errors.push((
                        format!("{at}.host"),
                        format!("`{host}` is not a valid Host header"),
                    ));
                }
            }
            if h.expected_statuses.is_empty() {
                errors.push((
                    format!("{at}.expected_statuses"),
                    "at least one status is needed".into(),
                ));
            }
            for (i, code) in h.expected_statuses.iter().enumerate() {
                if !(100..=599).contains(code) {
                    errors.push((
                        format!("{at}.expected_statuses[{i}]"),
                        format!("{code} is not an HTTP status"),
                    ));
                }
            }
            CheckKind::Http {
                method,
                path: h.path.clone(),
                host: h.host.clone(),
                expected_statuses: h.expected_statuses.clone(),
            }
        }
    };
    HealthCheckSpec {
        kind,
        interval: h.interval,
        timeout: h.timeout,
        healthy_threshold: h.healthy_threshold,
        unhealthy_threshold: h.unhealthy_threshold,
    }
}

fn admin(dto: &ConfigDto, errors: &mut Errors) -> AdminSettings {
    let mut listen = Vec::new();
    for (i, l) in dto.admin.listen.iter().enumerate() {
        let at = format!("admin.listen[{i}]");
        match l.parse::<SocketAddr>() {
            Ok(a) if listen.contains(&a) => {
                errors.push((at, format!("duplicate listener `{l}`")));
            }
            Ok(a) if dto.server.listen.iter().any(|p| p.parse() == Ok(a)) => {
                errors.push((at, format!("`{l}` is also a public listener")));
            }
            Ok(a) => listen.push(a),
            Err(_) => errors.push((at, format!("`{l}` is not an `ip:port` address"))),
        }
    }
    AdminSettings { listen }
}

fn access_log(dto: &ConfigDto, errors: &mut Errors) -> AccessLogSettings {
    let a = &dto.access_log;
    let target = match a.path.as_str() {
        "stdout" => LogTarget::Stdout,
        "stderr" => LogTarget::Stderr,
        "" => {
            errors.push((
                "access_log.path".into(),
                "must be `stdout`, `stderr` or a file path".into(),
            ));
            LogTarget::Stdout
        }
        path => LogTarget::File(path.into()),
    };
    if !(0.0..=1.0).contains(&a.sample) {
        errors.push((
            "access_log.sample".into(),
            format!("{} is not between 0.0 and 1.0", a.sample),
        ));
    }
    if a.buffer == 0 || a.buffer > 1_000_000 {
        errors.push((
            "access_log.buffer".into(),
            "must be between 1 and 1000000 lines".into(),
        ));
    }
    AccessLogSettings {
        enabled: a.enabled,
        target,
        sample: a.sample,
        always_log_errors: a.always_log_errors,
        buffer: a.buffer,
    }
}

/// `usage:`; `None` when no endpoint is set (nothing is counted) or a
/// key is invalid.
fn usage(dto: &ConfigDto, errors: &mut Errors) -> Option<UsageSettings> {
    let u = &dto.usage;
    // Every key is checked, set to be used or not.
    let before = errors.len();
    service_endpoint("usage", u.endpoint.as_deref(), &u.audience, errors);
    let second = Duration::from_secs(1);
    durations_within(
        "usage",
        &[
            (
                "flush_interval",
                u.flush_interval,
                second / 10,
                3600 * second,
            ),
            ("timeout", u.timeout, second / 100, 300 * second),
            ("max_backoff", u.max_backoff, second / 10, 3600 * second),
        ],
        errors,
    );
    if !(1..=100_000).contains(&u.max_batch_rows) {
        errors.push((
            "usage.max_batch_rows".into(),
            "must be between 1 and 100000".into(),
        ));
    }
    if u.max_backlog_rows < u.max_batch_rows || u.max_backlog_rows > 100_000_000 {
        errors.push((
            "usage.max_backlog_rows".into(),
            "must be at least max_batch_rows and at most 100000000".into(),
        ));
    }
    let endpoint = u.endpoint.as_ref()?;
    (errors.len() == before).then(|| UsageSettings {
        endpoint: endpoint.clone(),
        audience: u.audience.clone(),
        flush_interval: u.flush_interval,
        max_batch_rows: u.max_batch_rows,
        max_backlog_rows: u.max_backlog_rows,
        timeout: u.timeout,
        max_backoff: u.max_backoff,
    })
}

/// `tier_changes:`; `None` when no endpoint is set (tokens' tiers only)
/// or a key is invalid.
fn tier_changes(dto: &ConfigDto, errors: &mut Errors) -> Option<TierChangesSettings> {
    let t = &dto.tier_changes;
    // Every key is checked, set to be used or not.
    let before = errors.len();
    service_endpoint("tier_changes", t.endpoint.as_deref(), &t.audience, errors);
    let second = Duration::from_secs(1);
    durations_within(
        "tier_changes",
        &[
            ("wait", t.wait, second, 25 * second),
            ("timeout", t.timeout, second / 10, 60 * second),
            ("stale_after", t.stale_after, second, 3600 * second),
            ("retain", t.retain, 60 * second, 24 * 3600 * second),
            ("max_backoff", t.max_backoff, second / 10, 300 * second),
        ],
        errors,
    );
    if t.wait.subsec_nanos() != 0 {
        errors.push(("tier_changes.wait".into(), "must be whole seconds".into()));
    }
    if !(1..=10_000_000).contains(&t.max_entries) {
        errors.push((
            "tier_changes.max_entries".into(),
            "must be between 1 and 10000000".into(),
        ));
    }
    let endpoint = t.endpoint.as_ref()?;
    (errors.len() == before).then(|| TierChangesSettings {
        endpoint: endpoint.clone(),
        audience: t.audience.clone(),
        wait: t.wait,
        timeout: t.timeout,
        stale_after: t.stale_after,
        retain: t.retain,
        max_entries: t.max_entries,
        max_backoff: t.max_backoff,
    })
}

/// `<section>.endpoint` must be an http(s) URL and `<section>.audience` a
/// service name.
fn service_endpoint(section: &str, endpoint: Option<&str>, audience: &str, errors: &mut Errors) {
    if let Some(endpoint) = endpoint {
        let url_ok = (endpoint.starts_with("http://") || endpoint.starts_with("https://"))
            && reqwest::Url::parse(endpoint).is_ok();
        if !url_ok {
            errors.push((
                format!("{section}.endpoint"),
                format!("`{endpoint}` is not an http(s) URL"),
            ));
        }
    }
    let name_ok = !audience.is_empty()
        && audience.len() <= 64
        && audience
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !name_ok {
        errors.push((
            format!("{section}.audience"),
            format!("`{audience}` is not a service name (1-64 of a-z 0-9 - _)"),
        ));
    }
}

/// Each `(key, value, low, high)`: `<section>.<key>` within its bounds.
fn durations_within(
    section: &str,
    checks: &[(&str, Duration, Duration, Duration)],
    errors: &mut Errors,
) {
    for &(key, d, low, high) in checks {
        if d < low || d > high {
            errors.push((
                format!("{section}.{key}"),
                format!(
                    "must be between {} and {}",
                    humantime::format_duration(low),
                    humantime::format_duration(high)
                ),
            ));
        }
    }
}

fn dns(dto: &ConfigDto, errors: &mut Errors) -> DnsSettings {
    let d = &dto.dns;
    let mut nameservers = Vec::new();
    for (i, n) in d.nameservers.iter().enumerate() {
        let addr = n.parse::<SocketAddr>().or_else(|_| {
            n.parse::<std::net::IpAddr>()
                .map(|ip| SocketAddr::new(ip, 53))
        });
        match addr {
            Ok(a) if a.port() != 0 => nameservers.push(a),
            _ => errors.push((
                format!("dns.nameservers[{i}]"),
                format!("`{n}` is not an IP address or `ip:port`"),
            )),
        }
    }
    if d.timeout.is_zero() || d.timeout > Duration::from_secs(60) {
        errors.push((
            "dns.timeout".into(),
            "must be greater than 0 and at most 60s".into(),
        ));
    }
    DnsSettings {
        nameservers,
        timeout: d.timeout,
    }
}

fn breaker(
    at: &str,
    b: &super::dto::BreakerDto,
    errors: &mut Errors,
) -> crate::upstream::breaker::BreakerSettings {
    let at = format!("{at}.circuit_breaker");
    let mut positive = |key: &str, ok: bool, what: &str| {
        if !ok {
            errors.push((format!("{at}.{key}"), what.to_owned()));
        }
    };
    positive(
        "consecutive_failures",
        b.consecutive_failures >= 1,
        "must be at least 1",
    );
    positive(
        "failure_ratio",
        b.failure_ratio > 0.0 && b.failure_ratio <= 1.0,
        "must be greater than 0 and at most 1",
    );
    positive("window", !b.window.is_zero(), "must be greater than 0");
    positive("open_for", !b.open_for.is_zero(), "must be greater than 0");
    positive(
        "max_open_for",
        b.max_open_for >= b.open_for,
        "must be at least `open_for`",
    );
    positive(
        "half_open_probes",
        b.half_open_probes >= 1,
        "must be at least 1",
    );
    for (i, code) in b.failure_statuses.iter().enumerate() {
        if !(100..=599).contains(code) {
            errors.push((
                format!("{at}.failure_statuses[{i}]"),
                format!("{code} is not an HTTP status"),
            ));
        }
    }
    crate::upstream::breaker::BreakerSettings {
        enabled: b.enabled,
        consecutive_failures: b.consecutive_failures,
        failure_ratio: b.failure_ratio,
        window: b.window,
        min_requests: b.min_requests,
        open_for: b.open_for,
        max_open_for: b.max_open_for,
        half_open_probes: b.half_open_probes,
        failure_statuses: b.failure_statuses.clone(),
    }
}

fn algorithm_name(a: AlgorithmDto) -> &'static str {
    match a {
        AlgorithmDto::RoundRobin => "round_robin",
        AlgorithmDto::ConsistentHash => "consistent_hash",
        AlgorithmDto::LeastInflight => "least_inflight",
        AlgorithmDto::P2c => "p2c",
    }
}

fn backend(at: &str, b: &BackendDto, errors: &mut Errors) -> Option<BackendSpec> {
    let before = errors.len();
    if b.weight == 0 || b.weight > MAX_WEIGHT {
        errors.push((
            format!("{at}.weight"),
            format!(
                "weight must be between 1 and {MAX_WEIGHT}, got {}",
                b.weight
            ),
        ));
    }
    let address = match parse_backend_address(&b.address) {
        Ok(a) => Some(a),
        Err(why) => {
            errors.push((format!("{at}.address"), why));
            None
        }
    };
    match address {
        Some(address) if errors.len() == before => Some(BackendSpec {
            address,
            weight: b.weight,
        }),
        _ => None,
    }
}

/// `ip:port`, `[v6]:port` or `host:port`.
pub(crate) fn parse_backend_address(s: &str) -> Result<BackendAddress, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        if a.port() == 0 {
            return Err(format!("`{s}`: port 0 is not allowed"));
        }
        return Ok(BackendAddress::Socket(a));
    }
    let bad = || format!("`{s}` is not `ip:port` or `host:port`");
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if port == 0 {
        return Err(format!("`{s}`: port 0 is not allowed"));
    }
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !host_ok {
        return Err(bad());
    }
    Ok(BackendAddress::Host {
        host: host.to_ascii_lowercase(),
        port,
    })
}

fn route(
    at: &str,
    r: &RouteDto,
    pools: &HashMap<&str, usize>,
    limits: &RateLimitSettings,
    errors: &mut Errors,
) -> Option<RouteSpec> {
    let before = errors.len();
    if !valid_name(&r.name) {
        errors.push((
            format!("{at}.name"),
            format!(
                "route name `{}` must be 1-64 characters of A-Z a-z 0-9 - _",
                r.name
            ),
        ));
    }
    let upstream = pools.get(r.upstream.as_str()).copied();
    if upstream.is_none() {
        let known: Vec<&str> = {
            let mut k: Vec<&str> = pools.keys().copied().collect();
            k.sort_unstable();
            k
        };
        errors.push((
            format!("{at}.upstream"),
            format!(
                "unknown upstream `{}` (defined: {})",
                r.upstream,
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            ),
        ));
    }
    let hosts = r
        .matcher
        .hosts
        .iter()
        .enumerate()
        .filter_map(|(i, h)| match host_match(h) {
            Ok(h) => Some(h),
            Err(why) => {
                errors.push((format!("{at}.match.hosts[{i}]"), why));
                None
            }
        })
        .collect();
    let path = path_match(at, r.matcher.path.as_ref(), errors);
    let mut methods = Vec::new();
    for (i, m) in r.matcher.methods.iter().enumerate() {
        match Method::from_bytes(m.to_ascii_uppercase().as_bytes()) {
            Ok(m) if !methods.contains(&m) => methods.push(m),
            Ok(_) => errors.push((
                format!("{at}.match.methods[{i}]"),
                format!("duplicate method `{m}`"),
            )),
            Err(_) => errors.push((
                format!("{at}.match.methods[{i}]"),
                format!("`{m}` is not an HTTP method"),
            )),
        }
    }
    let headers = match_headers(at, &r.matcher.headers, errors);
    let rewrite = rewrite(at, r, path.as_ref(), errors);
    let upstream_host = match r.upstream_host.as_deref() {
        None | Some("preserve") => UpstreamHost::Preserve,
        Some("backend") => UpstreamHost::Backend,
        Some(v) => match HeaderValue::from_str(v) {
            Ok(value) if !v.is_empty() && !v.contains(char::is_whitespace) => {
                UpstreamHost::Set(value)
            }
            _ => {
                errors.push((
                    format!("{at}.upstream_host"),
                    format!("`{v}` is not a valid Host header value"),
                ));
                UpstreamHost::Preserve
            }
        },
    };
    let timeouts = timeouts(at, &r.timeouts, errors);
    for (i, code) in r.retry.on_statuses.iter().enumerate() {
        if !(500..=599).contains(code) {
            errors.push((
                format!("{at}.retry.on_statuses[{i}]"),
                format!("{code}: only 5xx statuses can be retried"),
            ));
        }
    }
    if r.retry.attempts > 5 {
        errors.push((format!("{at}.retry.attempts"), "at most 5".into()));
    }
    let auth = match r.auth {
        AuthModeDto::None => AuthMode::None,
        AuthModeDto::Optional => AuthMode::Optional,
        AuthModeDto::Required => AuthMode::Required,
    };
    let min_tier = r
        .min_tier
        .as_ref()
        .and_then(|t| match limits.tier_index(t) {
            Some(i) => Some(i),
            None => {
                let known: Vec<&str> = limits.tiers.iter().map(|t| t.name.as_str()).collect();
                errors.push((
                    format!("{at}.min_tier"),
                    format!("unknown tier `{t}` (defined: {})", known.join(", ")),
                ));
                None
            }
        });
    if auth == AuthMode::None && (r.min_tier.is_some() || !r.roles.is_empty()) {
        errors.push((
            format!("{at}.auth"),
            "`min_tier` and `roles` need `auth: required` or `auth: optional`".into(),
        ));
    }
    for (i, role) in r.roles.iter().enumerate() {
        if !valid_name(role) {
            errors.push((
                format!("{at}.roles[{i}]"),
                format!("role `{role}` must be 1-64 characters of A-Z a-z 0-9 - _"),
            ));
        }
    }
    if errors.len() != before {
        return None;
    }
    Some(RouteSpec {
        name: r.name.clone(),
        hosts,
        path: path?,
        methods,
        headers,
        upstream: upstream?,
        rewrite,
        upstream_host,
        timeouts,
        retry: super::RetrySpec {
            attempts: r.retry.attempts,
            on_statuses: r.retry.on_statuses.clone(),
        },
        auth,
        min_tier,
        roles: r.roles.clone(),
        rate_limit: r.rate_limit,
        plugins: Chain::default(),
        label: r.name.as_str().into(),
    })
}

fn host_match(h: &str) -> Result<HostMatch, String> {
    let lower = h.to_ascii_lowercase();
    let (wild, rest) = match lower.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, lower.as_str()),
    };
    let ok = !rest.is_empty()
        && rest.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if !ok {
        return Err(format!(
            "`{h}` is not a host name or a `*.suffix` wildcard (no ports, `*` only as the first label)"
        ));
    }
    Ok(if wild {
        HostMatch::Wildcard(format!(".{rest}"))
    } else {
        HostMatch::Exact(lower)
    })
}

/// The one path matcher a DTO sets: (kind, value); `None` when absent.
fn path_kind<'a>(
    at: &str,
    p: Option<&'a PathMatchDto>,
    errors: &mut Errors,
) -> Option<(&'static str, &'a str)> {
    let p = p?;
    let set: Vec<(&'static str, &'a str)> = [
        ("exact", p.exact.as_deref()),
        ("prefix", p.prefix.as_deref()),
        ("regex", p.regex.as_deref()),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.map(|v| (k, v)))
    .collect();
    if set.len() != 1 {
        errors.push((
            format!("{at}.match.path"),
            "set exactly one of `exact`, `prefix` or `regex`".into(),
        ));
        return None;
    }
    set.first().copied()
}

fn path_match(at: &str, p: Option<&PathMatchDto>, errors: &mut Errors) -> Option<PathMatch> {
    if p.is_none() {
        return Some(PathMatch::Prefix("/".to_owned()));
    }
    let (kind, s) = path_kind(at, p, errors)?;
    if kind != "regex" && (!s.starts_with('/') || s.contains(['?', '#'])) {
        errors.push((
            format!("{at}.match.path.{kind}"),
            format!("`{s}` must start with `/` and contain no `?` or `#`"),
        ));
        return None;
    }
    match kind {
        "exact" => Some(PathMatch::Exact(s.to_owned())),
        "prefix" => Some(PathMatch::Prefix(normalize_prefix(s))),
        _ => match compile_regex(s) {
            Ok(re) => Some(PathMatch::Regex(re)),
            Err(why) => {
                errors.push((format!("{at}.match.path.regex"), why));
                None
            }
        },
    }
}

/// `/api/` → `/api`; `/` stays.
fn normalize_prefix(s: &str) -> String {
    let trimmed = s.trim_end_matches('/');
    if trimmed.is_empty() {
        "/".to_owned()
    } else {
        trimmed.to_owned()
    }
}

fn compile_regex(s: &str) -> Result<Regex, String> {
    RegexBuilder::new(s)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| format!("invalid regex: {}", e.to_string().replace('\n', " ")))
}

fn match_headers(
    at: &str,
    headers: &BTreeMap<String, String>,
    errors: &mut Errors,
) -> Vec<(HeaderName, HeaderValue)> {
    let mut out = Vec::new();
    for (name, value) in headers {
        let n = HeaderName::from_bytes(name.as_bytes());
        let v = HeaderValue::from_str(value);
        match (n, v) {
            (Ok(n), Ok(v)) => out.push((n, v)),
            (Err(_), _) => errors.push((
                format!("{at}.match.headers.{name}"),
                format!("`{name}` is not a valid header name"),
            )),
            (_, Err(_)) => errors.push((
                format!("{at}.match.headers.{name}"),
                format!("`{value}` is not a valid header value"),
            )),
        }
    }
    out
}

fn rewrite(at: &str, r: &RouteDto, path: Option<&PathMatch>, errors: &mut Errors) -> PathRewrite {
    let is_prefix = matches!(path, Some(PathMatch::Prefix(_)));
    let Some(rw) = &r.rewrite else {
        if !r.strip_prefix {
            return PathRewrite::None;
        }
        if !is_prefix {
            errors.push((
                format!("{at}.strip_prefix"),
                "strip_prefix needs a `match.path.prefix`".into(),
            ));
        }
        return PathRewrite::ReplacePrefix(String::new());
    };
    if r.strip_prefix {
        errors.push((
            format!("{at}.strip_prefix"),
            "use either strip_prefix or rewrite, not both".into(),
        ));
        return PathRewrite::None;
    }
    match (&rw.prefix, &rw.regex) {
        (Some(p), None) => {
            if !is_prefix {
                errors.push((
                    format!("{at}.rewrite.prefix"),
                    "a prefix rewrite needs a `match.path.prefix`".into(),
                ));
            }
            if !p.starts_with('/') || p.contains(['?', '#']) {
                errors.push((
                    format!("{at}.rewrite.prefix"),
                    format!("`{p}` must start with `/` and contain no `?` or `#`"),
                ));
            }
            PathRewrite::ReplacePrefix(p.trim_end_matches('/').to_owned())
        }
        (None, Some(re)) => match compile_regex(&re.pattern) {
            Ok(compiled) => PathRewrite::Regex(compiled, re.replacement.clone()),
            Err(why) => {
                errors.push((format!("{at}.rewrite.regex.pattern"), why));
                PathRewrite::None
            }
        },
        _ => {
            errors.push((
                format!("{at}.rewrite"),
                "set exactly one of `prefix` or `regex`".into(),
            ));
            PathRewrite::None
        }
    }
}

fn timeouts(at: &str, t: &TimeoutsDto, errors: &mut Errors) -> Timeouts {
    let mut check = |name: &str, d: Duration| {
        if d.is_zero() {
            errors.push((
                format!("{at}.timeouts.{name}"),
                "must be greater than zero".into(),
            ));
        }
    };
    check("connect", t.connect);
    check("read", t.read);
    check("write", t.write);
    if let Some(total) = t.total {
        check("total", total);
    }
    Timeouts {
        connect: t.connect,
        read: t.read,
        write: t.write,
        total: t.total,
    }
}

/// Two routes with the same matcher: the second could never be chosen.
fn duplicate_matchers(routes: &[RouteDto], errors: &mut Errors) {
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, r) in routes.iter().enumerate() {
        let m = &r.matcher;
        let mut hosts: Vec<String> = m.hosts.iter().map(|h| h.to_ascii_lowercase()).collect();
        hosts.sort();
        let mut methods: Vec<String> = m.methods.iter().map(|x| x.to_ascii_uppercase()).collect();
        methods.sort();
        let path = match path_kind("", m.path.as_ref(), &mut Vec::new()) {
            None if m.path.is_some() => continue, // reported elsewhere
            None => "prefix:/".to_owned(),
            Some(("prefix", p)) => format!("prefix:{}", normalize_prefix(p)),
            Some((kind, p)) => format!("{kind}:{p}"),
        };
        let headers: BTreeMap<String, &String> = m
            .headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect();
        let key = format!("{hosts:?}|{path}|{methods:?}|{headers:?}");
        if let Some(first) = seen.insert(key, i) {
            errors.push((
                format!("routes[{i}].match"),
                format!(
                    "same match as routes[{first}] (`{}`): this route could never be chosen",
                    routes[first].name
                ),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_backend_addresses() {
        assert!(matches!(
            parse_backend_address("127.0.0.1:80"),
            Ok(BackendAddress::Socket(_))
        ));
        assert!(matches!(
            parse_backend_address("[::1]:80"),
            Ok(BackendAddress::Socket(_))
        ));
        assert_eq!(
            parse_backend_address("Users.internal:8021"),
            Ok(BackendAddress::Host {
                host: "users.internal".into(),
                port: 8021
            })
        );
        for bad in [
            "127.0.0.1",
            "127.0.0.1:0",
            "host:99999",
            ":80",
            "a b:80",
            "-x.com:1",
            "",
        ] {
            assert!(parse_backend_address(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn test_host_matchers() {
        assert_eq!(
            host_match("API.example.com"),
            Ok(HostMatch::Exact("api.example.com".into()))
        );
        assert_eq!(
            host_match("*.example.com"),
            Ok(HostMatch::Wildcard(".example.com".into()))
        );
        for bad in ["*", "a.*.com", "example.com:80", "", "*."] {
            assert!(host_match(bad).is_err(), "{bad} accepted");
        }
    }
}
