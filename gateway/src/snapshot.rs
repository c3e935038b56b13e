//! The immutable runtime state built from one config: compiled routes,
//! pools, the token verifier and the rate limiter. Requests read it through
//! an `ArcSwap`; a reload builds a new one and swaps it in, and each request
//! keeps the snapshot it started with.

use std::sync::Arc;

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
    pub auth: Authenticator,
    /// Tiers and rate limits.
    pub limiter: Arc<RateLimiter>,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Metric handles for these routes, tiers and pools.
    pub metrics: RequestMetrics,
    /// The access log, when enabled.
    pub access_log: Option<AccessLog>,
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
        let resolver = Resolver::new(&config.dns);
        let pools = config
            .upstreams
            .iter()
            .map(|u| Pool::build(u, &resolver).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(bg) = bg {
            for pool in &pools {
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
        let access_log = match &config.access_log {
            a if a.enabled => Some(
                AccessLog::open(a, metrics.access_log_dropped.clone()).map_err(|e| {
                    GatewayError::Server(format!("access_log: cannot open {:?}: {e}", a.target))
                })?,
            ),
            _ => None,
        };
        let limiter = RateLimiter::new(&config.rate_limit, env.redis_url.as_ref(), bg);
        let route_names: Vec<&str> = config.routes.iter().map(|r| r.name.as_str()).collect();
        let tiers: Vec<&str> = (0..=limiter.anonymous())
            .map(|c| limiter.class(c).name.as_str())
            .collect();
        let pool_names: Vec<&str> = pools.iter().map(|p| p.name.as_str()).collect();
        let metrics = RequestMetrics::new(metrics.clone(), &route_names, &tiers, &pool_names);
        Ok(Self {
            router: Router::new(&config.routes),
            routes: config.routes.clone(),
            pools,
            auth: Authenticator::new(&config.auth, env.dev_jwt_secret.as_ref(), bg),
            limiter,
            trusted_proxies: config.server.trusted_proxies.clone(),
            metrics,
            access_log,
        })
    }
}
