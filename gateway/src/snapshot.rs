//! The immutable runtime state built from one config: compiled routes and
//! pools. Requests read it through an `ArcSwap`; a reload builds a new one and
//! swaps it in, and each request keeps the snapshot it started with.

use std::sync::Arc;

use crate::config::{Config, RouteSpec};
use crate::error::GatewayError;
use crate::router::Router;
use crate::upstream::Pool;

/// One compiled config.
#[derive(Debug)]
pub struct Snapshot {
    /// The route table.
    pub router: Router,
    /// Routes, indexed like the router's matches.
    pub routes: Vec<RouteSpec>,
    /// Pools, indexed by [`RouteSpec::upstream`].
    pub pools: Vec<Arc<Pool>>,
}

impl Snapshot {
    /// Compiles a validated config (resolving backend host names).
    pub fn build(config: &Config) -> Result<Self, GatewayError> {
        let pools = config
            .upstreams
            .iter()
            .map(|u| Pool::build(u).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            router: Router::new(&config.routes),
            routes: config.routes.clone(),
            pools,
        })
    }
}
