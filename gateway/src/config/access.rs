//! Validated auth and rate-limit settings (`auth:`, `rate_limit:`, and the
//! per-route `auth` / `min_tier` / `roles`), and their checks.

use std::fmt;
use std::time::Duration;

use jsonwebtoken::Algorithm as JwtAlgorithm;

use super::dto::{AnonymousKeysDto, AuthDto, LimitDto, LimitsDto, RateLimitDto, RedisDto};
use super::rules::{valid_name, Errors};
use super::RunMode;

/// Longest tier name.
const MAX_TIERS: usize = 32;

/// Validated `auth:` section.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// Where public keys come from; `None` = only the development secret.
    pub jwks: Option<JwksSettings>,
    /// Accepted `alg` values (never `none`).
    pub algorithms: Vec<JwtAlgorithm>,
    /// Required issuer.
    pub issuer: Option<String>,
    /// Required audience.
    pub audience: Option<String>,
    /// Clock skew allowed on `exp`/`nbf`.
    pub leeway: Duration,
    /// Longest token accepted.
    pub max_token_bytes: usize,
    /// Verified-token cache size.
    pub cache_capacity: usize,
}

/// Validated `auth.jwks`.
#[derive(Debug, Clone)]
pub struct JwksSettings {
    /// The key set's URL.
    pub url: String,
    /// Periodic refresh.
    pub refresh_interval: Duration,
    /// Least time between fetches caused by unknown `kid`s.
    pub min_refetch_interval: Duration,
    /// Timeout of one fetch.
    pub timeout: Duration,
}

/// Route `auth` mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// Tokens are ignored (and the identity headers stripped).
    None,
    /// A token is verified when present.
    Optional,
    /// A valid token is needed.
    Required,
}

/// Requests allowed per minute, hour and day; `None` = unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    /// Per minute.
    pub per_minute: Option<u64>,
    /// Per hour.
    pub per_hour: Option<u64>,
    /// Per day.
    pub per_day: Option<u64>,
}

impl Limits {
    /// `(name, limit, period)` of each limited window, shortest period
    /// first; the names are those of the `RateLimit-Policy` header.
    pub fn windows(&self) -> impl Iterator<Item = (&'static str, u64, Duration)> {
        [
            ("minute", self.per_minute, 60),
            ("hour", self.per_hour, 3_600),
            ("day", self.per_day, 86_400),
        ]
        .into_iter()
        .filter_map(|(name, limit, secs)| limit.map(|l| (name, l, Duration::from_secs(secs))))
    }
}

/// One tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierSpec {
    /// Name as written (matched case-insensitively against the claim).
    pub name: String,
    /// Its limits.
    pub limits: Limits,
    /// Whose budget its requests draw from.
    pub limit_by: LimitBy,
}

/// Whose budget a tier's requests draw from.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum LimitBy {
    /// Each user's own.
    #[default]
    User,
    /// The organization's the token acts for (its `tenant` claim), shared
    /// by its members; a token without `tenant` draws from its user's.
    Tenant,
}

/// Validated `rate_limit:` section.
#[derive(Debug, Clone)]
pub struct RateLimitSettings {
    /// Tiers, lowest first.
    pub tiers: Vec<TierSpec>,
    /// Index of the tier for a missing or unknown claim.
    pub default_tier: usize,
    /// Limits of anonymous callers (per client IP).
    pub anonymous: Limits,
    /// How anonymous callers are keyed.
    pub anonymous_keys: AnonymousKeys,
    /// Redis settings (`target: None` = local limits only, unless
    /// `TIERGATE_REDIS_URL` is set).
    pub redis: RedisSettings,
}

impl RateLimitSettings {
    /// The tier named `name` (ASCII case-insensitive).
    pub fn tier_index(&self, name: &str) -> Option<usize> {
        self.tiers
            .iter()
            .position(|t| t.name.eq_ignore_ascii_case(name))
    }
}

/// Validated `rate_limit.anonymous_keys`: anonymous callers are keyed by
/// their address, IPv6 ones by a prefix; past `max_tracked` keys, new
/// callers share a bucket per overflow prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnonymousKeys {
    /// Prefix length keying IPv6 callers.
    pub ipv6_prefix: u8,
    /// Most anonymous keys tracked.
    pub max_tracked: usize,
    /// Overflow prefix of IPv4 callers.
    pub overflow_ipv4_prefix: u8,
    /// Overflow prefix of IPv6 callers.
    pub overflow_ipv6_prefix: u8,
}

impl Default for AnonymousKeys {
    fn default() -> Self {
        let d = AnonymousKeysDto::default();
        Self {
            ipv6_prefix: d.ipv6_prefix,
            max_tracked: d.max_tracked,
            overflow_ipv4_prefix: d.overflow_ipv4_prefix,
            overflow_ipv6_prefix: d.overflow_ipv6_prefix,
        }
    }
}

fn anonymous_keys(k: &AnonymousKeysDto, errors: &mut Errors) -> AnonymousKeys {
    let mut check = |key: &str, ok: bool, what: &str| {
        if !ok {
            errors.push((format!("rate_limit.anonymous_keys.{key}"), what.to_owned()));
        }
    };
    check(
        "ipv6_prefix",
        (16..=128).contains(&k.ipv6_prefix),
        "must be between 16 and 128",
    );
    check(
        "overflow_ipv6_prefix",
        (8..=k.ipv6_prefix.max(8)).contains(&k.overflow_ipv6_prefix),
        "must be between 8 and `ipv6_prefix`",
    );
    check(
        "overflow_ipv4_prefix",
        (8..=32).contains(&k.overflow_ipv4_prefix),
        "must be between 8 and 32",
    );
    check("max_tracked", k.max_tracked >= 1, "must be at least 1");
    AnonymousKeys {
        ipv6_prefix: k.ipv6_prefix,
        max_tracked: k.max_tracked,
        overflow_ipv4_prefix: k.overflow_ipv4_prefix,
        overflow_ipv6_prefix: k.overflow_ipv6_prefix,
    }
}

/// Validated `rate_limit.redis`.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// Where Redis is.
    pub target: Option<RedisTarget>,
    /// Key prefix.
    pub key_prefix: String,
    /// Instances sharing the limits.
    pub expected_instances: u32,
    /// Longest wait of a cold key.
    pub cold_wait: Duration,
    /// Call timeout.
    pub timeout: Duration,
    /// Idle time after which leased tokens are returned.
    pub lease_idle: Duration,
}

/// A Redis server or cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One server.
    Single(RedisUrl),
    /// Cluster seed nodes.
    Cluster(Vec<RedisUrl>),
}

/// A Redis URL; its password never appears in `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(String);

impl RedisUrl {
    /// Checks the scheme (`redis://`; `unix://` and `redis+unix://` too).
    pub fn parse(url: &str) -> Result<Self, String> {
        if url.starts_with("rediss://") {
            return Err("TLS to Redis (`rediss://`) is not supported by this build".into());
        }
        let ok = ["redis://", "unix://", "redis+unix://"]
            .iter()
            .any(|s| url.starts_with(s) && url.len() > s.len());
        if ok {
            Ok(Self(url.to_owned()))
        } else {
            Err("a Redis URL starts with `redis://`".into())
        }
    }

    /// The URL itself, password included: only for connecting.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Hide everything between `://` and the last `@` of the authority.
        let s = &self.0;
        let Some(start) = s.find("://").map(|i| i + 3) else {
            return f.write_str("<redacted>");
        };
        let authority_end = s[start..].find('/').map_or(s.len(), |i| start + i);
        match s[start..authority_end].rfind('@') {
            Some(at) => write!(f, "{}***@{}", &s[..start], &s[start + at + 1..]),
            None => f.write_str(s),
        }
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisUrl({self})")
    }
}

pub(super) fn auth(a: &AuthDto, environment: Option<RunMode>, errors: &mut Errors) -> AuthSettings {
    let mut algorithms = Vec::new();
    for (i, name) in a.algorithms.iter().enumerate() {
        let at = format!("auth.algorithms[{i}]");
        match parse_algorithm(name) {
            Ok(alg) if algorithms.contains(&alg) => {
                errors.push((at, format!("duplicate algorithm `{name}`")));
            }
            Ok(alg) => algorithms.push(alg),
            Err(why) => errors.push((at, why)),
        }
    }
    if a.algorithms.is_empty() {
        errors.push((
            "auth.algorithms".into(),
            "at least one algorithm is required".into(),
        ));
    }
    let jwks = a.jwks.as_ref().map(|j| {
        let url_ok = (j.url.starts_with("http://") || j.url.starts_with("https://"))
            && reqwest::Url::parse(&j.url).is_ok();
        if !url_ok {
            errors.push((
                "auth.jwks.url".into(),
                format!("`{}` is not an http(s) URL", j.url),
            ));
        }
        for (key, d) in [
            ("refresh_interval", j.refresh_interval),
            ("min_refetch_interval", j.min_refetch_interval),
            ("timeout", j.timeout),
        ] {
            if d.is_zero() {
                errors.push((format!("auth.jwks.{key}"), "must be greater than 0".into()));
            }
        }
        JwksSettings {
            url: j.url.clone(),
            refresh_interval: j.refresh_interval,
            min_refetch_interval: j.min_refetch_interval,
            timeout: j.timeout,
        }
    });
    for (key, value) in [("issuer", &a.issuer), ("audience", &a.audience)] {
        match value.as_deref() {
            Some("") => errors.push((format!("auth.{key}"), "must not be empty".into())),
            // Any key set's tokens would do otherwise: a token minted by
            // the same identity provider for another service, say.
            None if a.jwks.is_some() => errors.push((
                format!("auth.{key}"),
                format!(
                    "is required with `auth.jwks` (the `{}` claim tokens must carry)",
                    &key[..3]
                ),
            )),
            _ => {}
        }
    }
    if let Some(i) = algorithms.iter().position(|a| *a == JwtAlgorithm::HS256) {
        if environment == Some(RunMode::Production) {
            errors.push((
                format!("auth.algorithms[{i}]"),
                "HS256 (the development secret) needs `environment: development`".into(),
            ));
        }
    }
    if a.max_token_bytes < 64 {
        errors.push(("auth.max_token_bytes".into(), "must be at least 64".into()));
    }
    if a.cache_capacity == 0 {
        errors.push(("auth.cache_capacity".into(), "must be at least 1".into()));
    }
    AuthSettings {
        jwks,
        algorithms,
        issuer: a.issuer.clone(),
        audience: a.audience.clone(),
        leeway: a.leeway,
        max_token_bytes: a.max_token_bytes,
        cache_capacity: a.cache_capacity,
    }
}

fn parse_algorithm(name: &str) -> Result<JwtAlgorithm, String> {
    use JwtAlgorithm as A;
    Ok(match name {
        "EdDSA" => A::EdDSA,
        "RS256" => A::RS256,
        "RS384" => A::RS384,
        "RS512" => A::RS512,
        "PS256" => A::PS256,
        "PS384" => A::PS384,
        "PS512" => A::PS512,
        "ES256" => A::ES256,
        "ES384" => A::ES384,
        "HS256" => A::HS256,
        "none" | "None" | "NONE" => {
            return Err("`none` (unsigned tokens) is never accepted".into());
        }
        other => {
            return Err(format!(
                "unknown algorithm `{other}` (EdDSA, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, HS256)"
            ))
        }
    })
}

pub(super) fn rate_limit(r: &RateLimitDto, errors: &mut Errors) -> RateLimitSettings {
    let mut tiers: Vec<TierSpec> = Vec::new();
    if r.tiers.is_empty() {
        errors.push((
            "rate_limit.tiers".into(),
            "at least one tier is required".into(),
        ));
    }
    if r.tiers.len() > MAX_TIERS {
        errors.push((
            "rate_limit.tiers".into(),
            format!("at most {MAX_TIERS} tiers"),
        ));
    }
    for (i, t) in r.tiers.iter().enumerate() {
        let at = format!("rate_limit.tiers[{i}]");
        if !valid_name(&t.name) {
            errors.push((
                format!("{at}.name"),
                format!(
                    "tier name `{}` must be 1-64 characters of A-Z a-z 0-9 - _",
                    t.name
                ),
            ));
        }
        if let Some(j) = tiers
            .iter()
            .position(|o| o.name.eq_ignore_ascii_case(&t.name))
        {
            errors.push((
                format!("{at}.name"),
                format!("duplicate tier `{}` (also rate_limit.tiers[{j}])", t.name),
            ));
        }
        let limits = limits(
            &at,
            &LimitsDto {
                per_minute: t.per_minute,
                per_hour: t.per_hour,
                per_day: t.per_day,
            },
            errors,
        );
        tiers.push(TierSpec {
            name: t.name.clone(),
            limits,
            limit_by: match t.limit_by {
                super::dto::LimitByDto::User => LimitBy::User,
                super::dto::LimitByDto::Tenant => LimitBy::Tenant,
            },
        });
    }
    let default_tier = match &r.default_tier {
        Some(name) => tiers
            .iter()
            .position(|t| t.name.eq_ignore_ascii_case(name))
            .unwrap_or_else(|| {
                errors.push((
                    "rate_limit.default_tier".into(),
                    format!("unknown tier `{name}`"),
                ));
                0
            }),
        None => tiers
            .iter()
            .position(|t| t.name.eq_ignore_ascii_case("FREE"))
            .unwrap_or(0),
    };
    let anonymous = limits("rate_limit.anonymous", &r.anonymous, errors);
    let anonymous_keys = anonymous_keys(&r.anonymous_keys, errors);
    let redis = redis(r.redis.as_ref(), errors);
    RateLimitSettings {
        tiers,
        default_tier,
        anonymous,
        anonymous_keys,
        redis,
    }
}

fn limits(at: &str, l: &LimitsDto, errors: &mut Errors) -> Limits {
    let mut one = |key: &str, v: LimitDto| match v {
        LimitDto::Unlimited => None,
        LimitDto::Count(0) => {
            errors.push((
                format!("{at}.{key}"),
                "must be at least 1 (or `unlimited`)".into(),
            ));
            None
        }
        LimitDto::Count(n) => Some(n),
    };
    Limits {
        per_minute: one("per_minute", l.per_minute),
        per_hour: one("per_hour", l.per_hour),
        per_day: one("per_day", l.per_day),
    }
}

fn redis(r: Option<&RedisDto>, errors: &mut Errors) -> RedisSettings {
    let default = RedisDto::default();
    let r = r.unwrap_or(&default);
    let mut url = |at: String, u: &str| match RedisUrl::parse(u) {
        Ok(u) => Some(u),
        Err(why) => {
            errors.push((at, why));
            None
        }
    };
    let target = match (&r.url, r.cluster.as_slice()) {
        (Some(_), [_, ..]) => {
            errors.push((
                "rate_limit.redis".into(),
                "give either `url` or `cluster`, not both".into(),
            ));
            None
        }
        (Some(u), []) => url("rate_limit.redis.url".into(), u).map(RedisTarget::Single),
        (None, []) => None,
        (None, nodes) => {
            let urls: Vec<RedisUrl> = nodes
                .iter()
                .enumerate()
                .filter_map(|(i, u)| url(format!("rate_limit.redis.cluster[{i}]"), u))
                .collect();
            (urls.len() == nodes.len()).then_some(RedisTarget::Cluster(urls))
        }
    };
    if r.key_prefix.len() > 64 || r.key_prefix.contains(['{', '}']) {
        errors.push((
            "rate_limit.redis.key_prefix".into(),
            "at most 64 bytes, without `{` or `}` (they mark cluster hash tags)".into(),
        ));
    }
    if r.expected_instances == 0 {
        errors.push((
            "rate_limit.redis.expected_instances".into(),
            "must be at least 1".into(),
        ));
    }
    if r.timeout.is_zero() {
        errors.push((
            "rate_limit.redis.timeout".into(),
            "must be greater than 0".into(),
        ));
    }
    if r.lease_idle.is_zero() {
        errors.push((
            "rate_limit.redis.lease_idle".into(),
            "must be greater than 0".into(),
        ));
    }
    RedisSettings {
        target,
        key_prefix: r.key_prefix.clone(),
        expected_instances: r.expected_instances.max(1),
        cold_wait: r.cold_wait,
        timeout: r.timeout,
        lease_idle: r.lease_idle,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_redis_url_password_is_redacted() {
        let u = RedisUrl::parse("redis://user:s3cret@cache:6379/0").unwrap();
        assert_eq!(u.to_string(), "redis://***@cache:6379/0");
        assert!(!format!("{u:?}").contains("s3cret"));
        let plain = RedisUrl::parse("redis://127.0.0.1:6379").unwrap();
        assert_eq!(plain.to_string(), "redis://127.0.0.1:6379");
        assert!(RedisUrl::parse("http://x").is_err());
        assert!(RedisUrl::parse("rediss://x").is_err());
    }

    #[test]
    fn test_limits_windows_skip_unlimited() {
        let l = Limits {
            per_minute: Some(10),
            per_hour: None,
            per_day: Some(1000),
        };
        let w: Vec<_> = l.windows().collect();
        assert_eq!(
            w,
            [
                ("minute", 10, Duration::from_secs(60)),
                ("day", 1000, Duration::from_secs(86_400))
            ]
        );
    }
}
