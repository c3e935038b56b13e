//! `/health` (liveness) and `/health/services` (every pool and backend)
//! on the public listener, as the seed report's commands expect.
//!
//! `/health/services` reports each backend's circuit state and failures.
//! Active health checks do not exist yet, so `health` is `"unchecked"` and
//! `last_check` / `latency_ms` are `null` until they do.

use serde_json::{json, Value};

use crate::snapshot::Snapshot;
use crate::upstream::breaker::BreakerState;

/// Liveness path.
pub const LIVENESS_PATH: &str = "/health";
/// Pools and backends.
pub const SERVICES_PATH: &str = "/health/services";

/// Overall status of the pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overall {
    /// Every backend is usable.
    Ok,
    /// Some backends are not, but every pool has one that is.
    Degraded,
    /// Some pool has no usable backend.
    Down,
}

impl Overall {
    /// The JSON name.
    pub fn as_str(self) -> &'static str {
        match self {
            Overall::Ok => "ok",
            Overall::Degraded => "degraded",
            Overall::Down => "down",
        }
    }

    /// HTTP status: 200 for ok and degraded, 503 for down.
    pub fn http_status(self) -> u16 {
        match self {
            Overall::Down => 503,
            _ => 200,
        }
    }
}

/// The `/health/services` document and its overall status.
pub fn services(snapshot: &Snapshot) -> (Overall, Value) {
    let mut overall = Overall::Ok;
    let mut pools = Vec::with_capacity(snapshot.pools.len());
    for pool in &snapshot.pools {
        let mut usable = 0;
        let backends: Vec<Value> = pool
            .backends
            .iter()
            .map(|b| {
                let state = if pool.breaker.enabled {
                    b.breaker.state()
                } else {
                    BreakerState::Closed
                };
                let circuit = match state {
                    BreakerState::Closed => "closed",
                    BreakerState::Open => "open",
                    BreakerState::HalfOpen => "half_open",
                };
                if state == BreakerState::Closed {
                    usable += 1;
                }
                json!({
                    "address": b.addr_text,
                    "weight": b.weight,
                    "health": "unchecked",
                    "circuit": circuit,
                    "consecutive_failures": b.breaker.consecutive_failures(),
                    "inflight": b.inflight(),
                    "last_check": Value::Null,
                    "latency_ms": Value::Null,
                })
            })
            .collect();
        let status = if usable == pool.backends.len() {
            Overall::Ok
        } else if usable == 0 {
            Overall::Down
        } else {
            Overall::Degraded
        };
        overall = match (overall, status) {
            (Overall::Down, _) | (_, Overall::Down) => Overall::Down,
            (Overall::Degraded, _) | (_, Overall::Degraded) => Overall::Degraded,
            _ => Overall::Ok,
        };
        pools.push(json!({
            "name": pool.name,
            "status": status.as_str(),
            "backends": backends,
        }));
    }
    (
        overall,
        json!({ "status": overall.as_str(), "pools": pools }),
    )
}
