//! The immutable runtime state built from one config: compiled routes,
//! pools, the token verifier and the rate limiter. Requests read it through
//! an `ArcSwap`; a reload builds a new one and swaps it in, and each request
//! keeps the snapshot it started with.

use std::sync::Arc;
use std::time::SystemTime;

use crate::access_log::AccessLog;
use crate::auth::Authenticator;
use crate::background::Background;
use crate::config::{Config, RouteSpec};
use crate::error::GatewayError;
use crate::metrics::{Metrics, RequestMetrics};
use crate::ratelimit::RateLimiter;
use crate::router::Router;
use crate::secret::Environment;
use crate::upstream::discovery::{self, Resolver};
use crate::upstream::{check, Pool};

/// One compiled config.
#[derive(Debug)]
pub struct Snapshot {
    /// The route table.
    pub router: Router,
    /// Routes, indexed like the router's matches.
    pub routes: Vec<RouteSpec>,
    /// Pools, indexed by [`RouteSpec::upstream`].
    pub pools: Vec<Arc<Pool>>,
    /// Bearer-token verification.
    pub auth: Arc<Authenticator>,
    /// Tiers and rate limits.
    pub limiter: Arc<RateLimiter>,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Request hygiene: limits, timeouts, path and header normalisation.
    pub edge: crate::config::EdgeSettings,
    /// The public `/health/services` shows the full document.
    pub health_details: bool,
    /// Metric handles for these routes, tiers and pools.
    pub metrics: RequestMetrics,
    /// The access log, when enabled.
    pub access_log: Option<Arc<AccessLog>>,
    /// `usage:`, when metering is on.
    pub usage: Option<crate::config::UsageSettings>,
    /// The meter admitted requests are counted in, when metering is on.
    pub meter: Option<Arc<crate::usage::Meter>>,
    /// `tier_changes:`, when the feed is on.
    pub tier_changes: Option<crate::config::TierChangesSettings>,
    /// The tier overrides admission applies, when the feed is on.
    pub overrides: Option<Arc<crate::tier_feed::TierOverrides>>,
    /// SHA-256 of the config text this snapshot was built from.
    pub config_sha256: String,
    /// When it was built.
    pub loaded_at: SystemTime,
}

/// What a reload keeps from the snapshot it replaces, because its config
/// did not change: pools (by name; with their health, breaker and
/// discovery state and tasks), the rate limiter (its buckets), the token
/// verifier (its JWKS and cache) and the access log writer.
#[derive(Debug, Default)]
pub struct Reuse<'a> {
    /// The snapshot being replaced.
    pub old: Option<&'a Snapshot>,
    /// Names of the pools whose config is unchanged.
    pub pools: Vec<String>,
    /// `rate_limit` is unchanged.
    pub limiter: bool,
    /// `auth` is unchanged.
    pub auth: bool,
    /// `access_log` is unchanged (and no reopen was asked for).
    pub access_log: bool,
}

impl Snapshot {
    /// Compiles a validated config (resolving backend host names). Tasks
    /// (JWKS refresh, Redis leases, key eviction, health checks, DNS
    /// re-resolution) run on `bg`; without it
    /// nothing runs in the background (tests of the pure parts). Requests
    /// are counted in `metrics`, which outlives snapshots.
    pub fn build(
        config: &Config,
        env: &Environment,
        bg: Option<&Background>,
        metrics: &Arc<Metrics>,
    ) -> Result<Self, GatewayError> {
        Self::rebuild(config, env, bg, metrics, Reuse::default())
    }

    /// [`Snapshot::build`] for a reload: what `reuse` names is taken from
    /// the old snapshot instead of being built (and started) again.
    pub fn rebuild(
        config: &Config,
        env: &Environment,
        bg: Option<&Background>,
        metrics: &Arc<Metrics>,
        reuse: Reuse<'_>,
    ) -> Result<Self, GatewayError> {
        let resolver = Resolver::new(&config.dns);
        let kept = |name: &str| -> Option<Arc<Pool>> {
            let old = reuse.old?;
            if !reuse.pools.iter().any(|p| p == name) {
                return None;
            }
            old.pools.iter().find(|p| p.name == name).cloned()
        };
        let mut pools = Vec::with_capacity(config.upstreams.len());
        let mut fresh = Vec::new();
        for u in &config.upstreams {
            match kept(&u.name) {
                Some(pool) => pools.push(pool),
                None => {
                    let pool = Arc::new(Pool::build(u, &resolver)?);
                    fresh.push(pool.clone());
                    pools.push(pool);
                }
            }
        }
        if let Some(bg) = bg {
            for pool in &fresh {
                // The tasks hold the pool weakly: they end when a reload
                // drops it.
                if let Some(spec) = &pool.health_check {
                    bg.spawn(check::run(Arc::downgrade(pool), spec.clone()));
                }
                let interval = pool.discovery.interval;
                if !interval.is_zero() && !pool.discovery.snapshot().is_empty() {
                    bg.spawn(discovery::run(
                        Arc::downgrade(pool),
                        resolver.clone(),
                        interval,
                    ));
                }
            }
        }
        let old = reuse.old;
        let access_log = match (&config.access_log, old) {
            (a, Some(old)) if a.enabled && reuse.access_log && old.access_log.is_some() => {
                old.access_log.clone()
            }
            (a, _) if a.enabled => Some(Arc::new(
                AccessLog::open(a, metrics.access_log_dropped.clone()).map_err(|e| {
                    GatewayError::Server(format!("access_log: cannot open {:?}: {e}", a.target))
                })?,
            )),
            _ => None,
        };
        let limiter = match old {
            Some(old) if reuse.limiter => old.limiter.clone(),
            _ => RateLimiter::after_reload(
                &config.rate_limit,
                env.redis_url.as_ref(),
                bg,
                old.map(|o| &*o.limiter),
            ),
        };
        let auth = match old {
            Some(old) if reuse.auth => old.auth.clone(),
            _ => Arc::new(Authenticator::new(
                &config.auth,
                env.dev_jwt_secret
                    .as_ref()
                    .filter(|_| env.mode(config) == crate::config::RunMode::Development),
                bg,
            )),
        };
        let route_names: Vec<&str> = config.routes.iter().map(|r| r.name.as_str()).collect();
        let tiers: Vec<&str> = (0..=limiter.anonymous())
            .map(|c| limiter.class(c).name.as_str())
            .collect();
        let pool_names: Vec<&str> = pools.iter().map(|p| p.name.as_str()).collect();
        let meter = config.usage.as_ref().map(|_| metrics.usage.clone());
        let overrides = config
            .tier_changes
            .as_ref()
            .map(|_| metrics.tier_overrides.clone());
        let metrics = RequestMetrics::new(metrics.clone(), &route_names, &tiers, &pool_names);
        Ok(Self {
            router: Router::new(&config.routes),
            routes: config.routes.clone(),
            pools,
            auth,
            limiter,
            trusted_proxies: config.server.trusted_proxies.clone(),
            edge: config.server.edge,
            health_details: config.server.health_details,
            metrics,
            access_log,
            usage: config.usage.clone(),
            tier_changes: config.tier_changes.clone(),
            overrides,
            meter,
            config_sha256: config.source_sha256.clone(),
            loaded_at: SystemTime::now(),
        })
    }
}
