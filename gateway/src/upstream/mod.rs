//! Upstream pools: backends, their prebuilt peers, and selection.

pub mod attempt;
pub mod breaker;
pub mod check;
pub mod discovery;
pub mod select;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use pingora_core::upstreams::peer::HttpPeer;

use crate::config::validate::MAX_BACKENDS;
use crate::config::{Algorithm, BackendAddress, HashKey, HealthCheckSpec, UpstreamSpec};
use crate::error::GatewayError;
use select::{least_loaded, HashRing, RoundRobin, Tried};

/// One backend address of a pool.
#[derive(Debug)]
pub struct Backend {
    /// Where it is.
    pub addr: SocketAddr,
    /// `addr` rendered once, for `Host: backend` and logs.
    pub addr_text: String,
    /// Relative weight.
    pub weight: u32,
    /// Requests currently sent to it and not finished.
    inflight: AtomicUsize,
    /// A template peer; cloned per request and given the route's timeouts.
    peer: HttpPeer,
    /// Its circuit breaker.
    pub breaker: breaker::Breaker,
    /// Its active health-check results.
    pub health: check::Health,
    /// Its `tiergate_upstream_duration_seconds` histogram, once used.
    pub metric: std::sync::OnceLock<prometheus::Histogram>,
}

impl Backend {
    /// A backend at `addr` (closed circuit, health unknown).
    pub fn new(addr: SocketAddr, weight: u32) -> Self {
        Self {
            addr,
            addr_text: addr.to_string(),
            weight,
            inflight: AtomicUsize::new(0),
            peer: HttpPeer::new(addr, false, String::new()),
            breaker: breaker::Breaker::default(),
            health: check::Health::default(),
            metric: std::sync::OnceLock::new(),
        }
    }

    /// Whether it may be picked now; `Err(wait)` when its circuit is open
    /// (or half-open with every probe slot taken) or it fails its health
    /// checks, with how long that is expected to last.
    pub fn available(&self, pool: &Pool, now_ns: u64) -> Result<(), Duration> {
        if !self.health.routable() {
            let wait = pool
                .health_check
                .as_ref()
                .map_or(Duration::from_secs(1), |h| h.interval);
            return Err(wait);
        }
        self.breaker.available(&pool.breaker, now_ns)
    }

    /// The number of requests in flight to this backend.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    /// A fresh peer for one attempt.
    pub fn peer(&self) -> HttpPeer {
        self.peer.clone()
    }
}

/// A token bucket of retries: every request sent to the pool adds `ratio`
/// of a retry, every retry takes one, and at most `burst` can be saved up.
/// So over any period retries ≤ `ratio` × requests + `burst`.
#[derive(Debug)]
pub struct RetryBudget {
    /// In thousandths of a retry.
    balance: AtomicU64,
    per_request: u64,
    cap: u64,
}

impl RetryBudget {
    /// A full budget.
    pub fn new(ratio: f64, burst: u32) -> Self {
        let cap = u64::from(burst) * 1000;
        Self {
            balance: AtomicU64::new(cap),
            per_request: (ratio * 1000.0).round() as u64,
            cap,
        }
    }

    /// A request was sent: earn `ratio` of a retry.
    pub fn deposit(&self) {
        let _ = self
            .balance
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                (b < self.cap).then(|| (b + self.per_request).min(self.cap))
            });
    }

    /// Takes one retry, if the budget has it.
    pub fn try_withdraw(&self) -> bool {
        self.balance
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| b.checked_sub(1000))
            .is_ok()
    }
}

/// Counts a request against a backend until dropped.
#[derive(Debug)]
pub struct InflightGuard(Arc<Backend>);

impl InflightGuard {
    /// Starts counting.
    pub fn new(backend: Arc<Backend>) -> Self {
        backend.inflight.fetch_add(1, Ordering::Relaxed);
        Self(backend)
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug)]
enum Selector {
    RoundRobin(RoundRobin),
    Hash(HashKey, HashRing),
    LeastInflight(RoundRobin),
    P2c(RoundRobin),
}

/// The backends a pool selects from right now, with their selection state.
/// Replaced as a whole when discovery changes the set; a request keeps the
/// one it started with, so its backend indices stay valid.
#[derive(Debug)]
pub struct Members {
    /// The backends.
    pub backends: Vec<Arc<Backend>>,
    weights: Vec<u32>,
    selector: Selector,
}

impl Members {
    /// Selection over `backends` (1..=MAX_BACKENDS of them).
    pub fn new(algorithm: &Algorithm, backends: Vec<Arc<Backend>>) -> Result<Self, String> {
        if backends.is_empty() || backends.len() > MAX_BACKENDS {
            return Err(format!(
                "a pool needs 1 to {MAX_BACKENDS} backends, got {}",
                backends.len()
            ));
        }
        let weights: Vec<u32> = backends.iter().map(|b| b.weight).collect();
        let selector = match algorithm {
            Algorithm::RoundRobin => Selector::RoundRobin(RoundRobin::new(&weights)),
            Algorithm::PowerOfTwoChoices => Selector::P2c(RoundRobin::new(&weights)),
            Algorithm::LeastInflight => Selector::LeastInflight(RoundRobin::new(&weights)),
            Algorithm::ConsistentHash(key) => {
                let ids: Vec<String> = backends.iter().map(|b| b.addr_text.clone()).collect();
                Selector::Hash(key.clone(), HashRing::new(&ids, &weights))
            }
        };
        Ok(Self {
            backends,
            weights,
            selector,
        })
    }

    /// Picks a backend not in `tried`; `None` when all were tried.
    pub fn select(&self, tried: &Tried, hash: Option<HashInput<'_>>) -> Option<usize> {
        match &self.selector {
            Selector::RoundRobin(rr) => rr.pick(tried),
            Selector::Hash(key, ring) => {
                let input = hash.unwrap_or(HashInput {
                    header: None,
                    client_ip: &[],
                });
                let bytes = match key {
                    HashKey::Header(_) => input.header.unwrap_or(input.client_ip),
                    HashKey::ClientIp => input.client_ip,
                };
                ring.pick(bytes, tried)
            }
            Selector::LeastInflight(rr) => {
                let start = rr.pick(&Tried::default()).unwrap_or(0);
                least_loaded(|i| self.backends[i].inflight(), &self.weights, tried, start)
            }
            Selector::P2c(rr) => {
                let a = rr.random(tried)?;
                let mut without_a = *tried;
                without_a.insert(a);
                let Some(b) = rr.random(&without_a) else {
                    return Some(a);
                };
                // Fewer in-flight per unit of weight wins; ties keep the
                // first (weighted) draw.
                let la = self.backends[a].inflight() as u64 * u64::from(self.weights[b]);
                let lb = self.backends[b].inflight() as u64 * u64::from(self.weights[a]);
                Some(if lb < la { b } else { a })
            }
        }
    }
}

/// A pool of backends and its selection state.
#[derive(Debug)]
pub struct Pool {
    /// The pool's name.
    pub name: String,
    /// Their breakers' settings.
    pub breaker: breaker::BreakerSettings,
    /// Caps status-triggered retries to this pool.
    pub retry_budget: RetryBudget,
    /// The active health check, when configured.
    pub health_check: Option<Arc<HealthCheckSpec>>,
    /// Backends given by host name.
    pub discovery: discovery::Discovery,
    algorithm: Algorithm,
    /// Backends given as `ip:port`, with their weights.
    fixed: Vec<(SocketAddr, u32)>,
    members: ArcSwap<Members>,
    /// Backends discovery removed that may still have requests in flight.
    draining: Mutex<Vec<Arc<Backend>>>,
}

/// What a hash-based pool needs from the request.
#[derive(Debug, Clone, Copy)]
pub struct HashInput<'a> {
    /// The configured header's value, if any.
    pub header: Option<&'a [u8]>,
    /// The client's IP, as bytes.
    pub client_ip: &'a [u8],
}

impl Pool {
    /// Builds a pool, resolving host names with `resolver` (each address
    /// of a name becomes a backend with the entry's weight). A name that
    /// does not resolve now is an error.
    pub fn build(
        spec: &UpstreamSpec,
        resolver: &discovery::Resolver,
    ) -> Result<Self, GatewayError> {
        let mut fixed = Vec::new();
        let mut names = Vec::new();
        let now = check::unix_ms();
        for b in &spec.backends {
            match &b.address {
                BackendAddress::Socket(a) => fixed.push((*a, b.weight)),
                BackendAddress::Host { host, port } => {
                    let addrs = resolver.lookup_blocking(host, *port).map_err(|reason| {
                        GatewayError::Resolve {
                            pool: spec.name.clone(),
                            address: b.address.to_string(),
                            reason,
                        }
                    })?;
                    names.push(discovery::NameEntry {
                        host: host.clone(),
                        port: *port,
                        weight: b.weight,
                        addrs,
                        resolved_at_ms: now,
                        error: None,
                    });
                }
            }
        }
        let wanted = wanted_backends(&fixed, &names);
        let backends = wanted
            .into_iter()
            .map(|(a, w)| Arc::new(Backend::new(a, w)))
            .collect();
        let members =
            Members::new(&spec.algorithm, backends).map_err(|_| GatewayError::PoolSize {
                pool: spec.name.clone(),
                count: fixed.len() + names.iter().map(|n| n.addrs.len()).sum::<usize>(),
            })?;
        Ok(Self {
            name: spec.name.clone(),
            breaker: spec.breaker.clone(),
            retry_budget: RetryBudget::new(spec.retry_budget.0, spec.retry_budget.1),
            health_check: spec.health_check.clone().map(Arc::new),
            discovery: discovery::Discovery {
                entries: Mutex::new(names),
                interval: spec.resolve_interval,
            },
            algorithm: spec.algorithm.clone(),
            fixed,
            members: ArcSwap::from_pointee(members),
            draining: Mutex::new(Vec::new()),
        })
    }

    /// The backends to select from now.
    pub fn members(&self) -> Arc<Members> {
        self.members.load_full()
    }

    /// Backends removed by discovery that still finish requests.
    pub fn draining(&self) -> Vec<Arc<Backend>> {
        self.draining.lock().map(|d| d.clone()).unwrap_or_default()
    }

    /// Rebuilds the members from the fixed backends and the names' last
    /// good addresses. Backends that stay keep their state (breaker,
    /// health, in-flight count); new ones start unknown; gone ones drain.
    pub fn refresh_members(&self) {
        let names = self.discovery.snapshot();
        let wanted = wanted_backends(&self.fixed, &names);
        let current = self.members();
        let same = current.backends.len() == wanted.len()
            && current
                .backends
                .iter()
                .zip(&wanted)
                .all(|(b, (a, w))| b.addr == *a && b.weight == *w);
        let Ok(mut draining) = self.draining.lock() else {
            return;
        };
        draining.retain(|b| b.inflight() > 0);
        if same {
            return;
        }
        let backends: Vec<Arc<Backend>> = wanted
            .iter()
            .map(|(a, w)| {
                current
                    .backends
                    .iter()
                    .find(|b| b.addr == *a && b.weight == *w)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Backend::new(*a, *w)))
            })
            .collect();
        let next = match Members::new(&self.algorithm, backends) {
            Ok(m) => m,
            Err(why) => {
                tracing::warn!(pool = %self.name, error = %why, "keeping the current backends");
                return;
            }
        };
        for old in current.backends.iter() {
            if !next.backends.iter().any(|b| Arc::ptr_eq(b, old)) && old.inflight() > 0 {
                draining.push(old.clone());
            }
        }
        tracing::info!(pool = %self.name,
            backends = ?next.backends.iter().map(|b| b.addr_text.as_str()).collect::<Vec<_>>(),
            "backend set changed");
        self.members.store(Arc::new(next));
    }

    /// The header a consistent-hash pool hashes on, if any.
    pub fn hash_header(&self) -> Option<&http::HeaderName> {
        match &self.algorithm {
            Algorithm::ConsistentHash(HashKey::Header(h)) => Some(h),
            _ => None,
        }
    }

    /// Whether selection needs [`HashInput`].
    pub fn needs_hash_input(&self) -> bool {
        matches!(self.algorithm, Algorithm::ConsistentHash(_))
    }
}

/// Fixed backends, then each name's addresses, first occurrence of an
/// address wins, at most [`MAX_BACKENDS`].
fn wanted_backends(
    fixed: &[(SocketAddr, u32)],
    names: &[discovery::NameEntry],
) -> Vec<(SocketAddr, u32)> {
    let mut out: Vec<(SocketAddr, u32)> = Vec::with_capacity(fixed.len());
    let all = fixed.iter().copied().chain(
        names
            .iter()
            .flat_map(|n| n.addrs.iter().map(move |a| (*a, n.weight))),
    );
    for (a, w) in all {
        if out.len() < MAX_BACKENDS && !out.iter().any(|(x, _)| *x == a) {
            out.push((a, w));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(algorithm: Algorithm, weights: &[u32]) -> Members {
        let backends = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                Arc::new(Backend::new(
                    SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16)),
                    w,
                ))
            })
            .collect();
        Members::new(&algorithm, backends).unwrap()
    }

    #[test]
    fn test_least_inflight_prefers_idle_backend() {
        let p = pool(Algorithm::LeastInflight, &[1, 1]);
        let _busy = InflightGuard::new(p.backends[0].clone());
        for _ in 0..10 {
            assert_eq!(p.select(&Tried::default(), None), Some(1));
        }
    }

    #[test]
    fn test_p2c_spreads_by_weight_when_idle() {
        let p = pool(Algorithm::PowerOfTwoChoices, &[3, 1]);
        let mut counts = [0; 2];
        for _ in 0..4000 {
            counts[p.select(&Tried::default(), None).unwrap()] += 1;
        }
        // Idle pool: ties keep the first weighted draw, so ~3:1.
        assert!(counts[0] > 2500 && counts[1] > 500, "{counts:?}");
    }

    #[test]
    fn test_hash_falls_back_to_client_ip_without_header() {
        let p = pool(
            Algorithm::ConsistentHash(HashKey::Header(http::HeaderName::from_static("x-user"))),
            &[1, 1, 1],
        );
        let ip = b"10.1.2.3";
        let by_ip = p.select(
            &Tried::default(),
            Some(HashInput {
                header: None,
                client_ip: ip,
            }),
        );
        for _ in 0..5 {
            assert_eq!(
                p.select(
                    &Tried::default(),
                    Some(HashInput {
                        header: None,
                        client_ip: ip
                    })
                ),
                by_ip
            );
        }
    }

    fn set_addrs(pool: &Pool, addrs: &[&str]) {
        let mut entries = pool.discovery.entries.lock().unwrap();
        entries[0].addrs = addrs.iter().map(|a| a.parse().unwrap()).collect();
    }

    fn addrs(m: &Members) -> Vec<String> {
        m.backends.iter().map(|b| b.addr_text.clone()).collect()
    }

    #[test]
    fn test_refresh_keeps_surviving_backends_and_drains_removed_ones() {
        let spec = UpstreamSpec {
            name: "p".into(),
            algorithm: Algorithm::RoundRobin,
            backends: vec![crate::config::BackendSpec {
                address: BackendAddress::Host {
                    host: "localhost".into(),
                    port: 9,
                },
                weight: 2,
            }],
            breaker: breaker::BreakerSettings::default(),
            retry_budget: (0.2, 10),
            health_check: None,
            resolve_interval: Duration::from_secs(1),
        };
        let resolver = discovery::Resolver::new(&crate::config::DnsSettings {
            nameservers: vec![],
            timeout: Duration::from_secs(1),
        });
        let pool = Pool::build(&spec, &resolver).unwrap();
        let first = pool.members();
        assert_eq!(addrs(&first), ["127.0.0.1:9"]);
        let busy = InflightGuard::new(first.backends[0].clone());

        set_addrs(&pool, &["127.0.0.1:9", "127.0.0.2:9"]);
        pool.refresh_members();
        let second = pool.members();
        assert_eq!(addrs(&second), ["127.0.0.1:9", "127.0.0.2:9"]);
        assert!(Arc::ptr_eq(&second.backends[0], &first.backends[0]));
        assert!(second.backends.iter().all(|b| b.weight == 2));

        set_addrs(&pool, &["127.0.0.2:9"]);
        pool.refresh_members();
        let third = pool.members();
        assert_eq!(addrs(&third), ["127.0.0.2:9"]);
        assert!(Arc::ptr_eq(&third.backends[0], &second.backends[1]));
        let draining = pool.draining();
        assert_eq!(draining.len(), 1);
        assert_eq!(draining[0].addr_text, "127.0.0.1:9");

        // Drained once its last request finished.
        drop(busy);
        pool.refresh_members();
        assert!(pool.draining().is_empty());
        assert!(Arc::ptr_eq(&pool.members(), &third), "unchanged set");
    }

    #[test]
    fn test_empty_pool_is_rejected() {
        assert!(Members::new(&Algorithm::RoundRobin, vec![]).is_err());
    }
}
