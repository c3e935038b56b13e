//! Upstream pools: backends, their prebuilt peers, and selection.

pub mod breaker;
pub mod select;

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use pingora_core::upstreams::peer::HttpPeer;

use crate::config::validate::MAX_BACKENDS;
use crate::config::{Algorithm, BackendAddress, HashKey, UpstreamSpec};
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
}

impl Backend {
    fn new(addr: SocketAddr, weight: u32) -> Self {
        Self {
            addr,
            addr_text: addr.to_string(),
            weight,
            inflight: AtomicUsize::new(0),
            peer: HttpPeer::new(addr, false, String::new()),
            breaker: breaker::Breaker::default(),
        }
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

/// A pool of backends and its selection state.
#[derive(Debug)]
pub struct Pool {
    /// The pool's name.
    pub name: String,
    /// Its backends.
    pub backends: Vec<Arc<Backend>>,
    /// Their breakers' settings.
    pub breaker: breaker::BreakerSettings,
    /// Caps status-triggered retries to this pool.
    pub retry_budget: RetryBudget,
    weights: Vec<u32>,
    selector: Selector,
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
    /// Builds a pool, resolving host names once (each address of a name
    /// becomes a backend with the entry's weight).
    pub fn build(spec: &UpstreamSpec) -> Result<Self, GatewayError> {
        let mut backends: Vec<Backend> = Vec::new();
        for b in &spec.backends {
            let addrs: Vec<SocketAddr> = match &b.address {
                BackendAddress::Socket(a) => vec![*a],
                BackendAddress::Host { host, port } => {
                    let mut found: Vec<SocketAddr> = (host.as_str(), *port)
                        .to_socket_addrs()
                        .map_err(|e| GatewayError::Resolve {
                            pool: spec.name.clone(),
                            address: b.address.to_string(),
                            reason: e.to_string(),
                        })?
                        .collect();
                    found.sort();
                    found.dedup();
                    found
                }
            };
            for addr in addrs {
                if !backends.iter().any(|x| x.addr == addr) {
                    backends.push(Backend::new(addr, b.weight));
                }
            }
        }
        let mut pool = Self::from_backends(&spec.name, &spec.algorithm, backends)?;
        pool.breaker = spec.breaker.clone();
        pool.retry_budget = RetryBudget::new(spec.retry_budget.0, spec.retry_budget.1);
        Ok(pool)
    }

    /// Builds a pool over already-resolved backends.
    pub fn from_backends(
        name: &str,
        algorithm: &Algorithm,
        backends: Vec<Backend>,
    ) -> Result<Self, GatewayError> {
        if backends.is_empty() || backends.len() > MAX_BACKENDS {
            return Err(GatewayError::PoolSize {
                pool: name.to_owned(),
                count: backends.len(),
            });
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
            name: name.to_owned(),
            backends: backends.into_iter().map(Arc::new).collect(),
            breaker: breaker::BreakerSettings::default(),
            retry_budget: RetryBudget::new(0.2, 10),
            weights,
            selector,
        })
    }

    /// The header a consistent-hash pool hashes on, if any.
    pub fn hash_header(&self) -> Option<&http::HeaderName> {
        match &self.selector {
            Selector::Hash(HashKey::Header(h), _) => Some(h),
            _ => None,
        }
    }

    /// Whether selection needs [`HashInput`].
    pub fn needs_hash_input(&self) -> bool {
        matches!(self.selector, Selector::Hash(..))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(algorithm: Algorithm, weights: &[u32]) -> Pool {
        let backends = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| Backend::new(SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16)), w))
            .collect();
        Pool::from_backends("p", &algorithm, backends).unwrap()
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

    #[test]
    fn test_empty_pool_is_rejected() {
        assert!(Pool::from_backends("p", &Algorithm::RoundRobin, vec![]).is_err());
    }
}
