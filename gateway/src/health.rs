//! `/health` (liveness) and `/health/services` (every pool and backend),
//! as the seed report's commands expect. The admin listener answers the
//! whole document; the public listener a summary (each pool's status and
//! backend counts) unless `server.health_details` opts in, since backend
//! addresses, errors and the config hash tell an attacker about the inside.
//!
//! `/health/services` reports each pool's backends: address, weight,
//! health-check state (`unchecked` without a health check, else `unknown`
//! until the first check, `healthy` or `unhealthy`), circuit state,
//! consecutive failures, the last check's time, latency and error, and
//! backends draining after discovery removed them. Pools with `host:port`
//! backends also list each name's addresses, when it last resolved and why
//! the last resolution failed. `config` names the config serving: its
//! SHA-256 (as `sha256sum` prints it for the file) and when it was
//! loaded. The admin listener serves the same document.

use serde_json::{json, Value};

use std::time::{Duration, UNIX_EPOCH};

use crate::snapshot::Snapshot;
use crate::upstream::breaker::BreakerState;
use crate::upstream::{Backend, Pool};

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

/// Who is asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// The admin listener: the whole document.
    Admin,
    /// The public listener: the whole document only with `details`
    /// (`server.health_details`), else each pool's status and counts.
    Public {
        /// `server.health_details`.
        details: bool,
    },
}

/// The answer to a GET/HEAD of `path` if it is one of the health paths:
/// its HTTP status and JSON document.
pub fn answer(snapshot: &Snapshot, path: &str, view: View) -> Option<(http::StatusCode, Value)> {
    let (status, doc) = match path {
        LIVENESS_PATH => (200, json!({"status": "ok"})),
        SERVICES_PATH => {
            let (overall, doc) = services(snapshot);
            let doc = match view {
                View::Admin | View::Public { details: true } => doc,
                View::Public { details: false } => summary(&doc),
            };
            (overall.http_status(), doc)
        }
        _ => return None,
    };
    Some((
        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK),
        doc,
    ))
}

/// The public listener's `/`: what this is and where to look.
pub fn info() -> Value {
    json!({
        "name": "tiergate",
        "version": env!("CARGO_PKG_VERSION"),
        "links": {
            "health": LIVENESS_PATH,
            "services": SERVICES_PATH,
        },
    })
}

/// The public view of the services document: overall and per-pool status
/// and backend counts; no addresses, errors or config hash.
fn summary(doc: &Value) -> Value {
    let pools: Vec<Value> = doc["pools"]
        .as_array()
        .map(|pools| {
            pools
                .iter()
                .map(|p| {
                    let backends = p["backends"].as_array();
                    let current = backends.map_or(0, |b| {
                        b.iter()
                            .filter(|b| b["draining"] != Value::Bool(true))
                            .count()
                    });
                    let up = backends.map_or(0, |b| {
                        b.iter()
                            .filter(|b| {
                                b["draining"] != Value::Bool(true)
                                    && b["circuit"] == "closed"
                                    && b["health"] != "unhealthy"
                            })
                            .count()
                    });
                    json!({
                        "name": p["name"],
                        "status": p["status"],
                        "backends": current,
                        "backends_up": up,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    json!({"status": doc["status"], "pools": pools})
}

/// The `/health/services` document and its overall status.
pub fn services(snapshot: &Snapshot) -> (Overall, Value) {
    let mut overall = Overall::Ok;
    let mut pools = Vec::with_capacity(snapshot.pools.len());
    for pool in &snapshot.pools {
        let members = pool.members();
        let mut usable = 0;
        let backends: Vec<Value> = members
            .backends
            .iter()
            .map(|b| {
                let (doc, ok) = backend(pool, b, false);
                usable += usize::from(ok);
                doc
            })
            .chain(pool.draining().iter().map(|b| backend(pool, b, true).0))
            .collect();
        let status = if usable == members.backends.len() {
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
        let mut doc = json!({
            "name": pool.name,
            "status": status.as_str(),
            "backends": backends,
        });
        let names = pool.discovery.snapshot();
        if !names.is_empty() {
            doc["names"] = names
                .iter()
                .map(|n| {
                    json!({
                        "name": format!("{}:{}", n.host, n.port),
                        "addresses": n.addrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
                        "resolved_at": timestamp(Some(n.resolved_at_ms)),
                        "error": n.error,
                    })
                })
                .collect();
        }
        pools.push(doc);
    }
    (
        overall,
        json!({
            "status": overall.as_str(),
            "config": {
                "sha256": snapshot.config_sha256,
                "loaded_at": humantime::format_rfc3339_millis(snapshot.loaded_at).to_string(),
            },
            "pools": pools,
        }),
    )
}

/// One backend's entry, and whether it takes traffic normally.
fn backend(pool: &Pool, b: &Backend, draining: bool) -> (Value, bool) {
    let state = circuit(pool, b);
    let circuit = match state {
        BreakerState::Closed => "closed",
        BreakerState::Open => "open",
        BreakerState::HalfOpen => "half_open",
    };
    let health = if pool.health_check.is_some() {
        b.health.state().as_str()
    } else {
        "unchecked"
    };
    let ok = state == BreakerState::Closed && b.health.routable();
    let doc = json!({
        "address": b.addr_text,
        "weight": b.weight,
        "health": health,
        "circuit": circuit,
        "consecutive_failures": b.breaker.consecutive_failures(),
        "failed_checks": b.health.failures(),
        "last_check": timestamp(b.health.last_check_ms()),
        "latency_ms": b.health.latency_ms(),
        "last_error": b.health.last_error(),
        "inflight": b.inflight(),
        "draining": draining,
    });
    (doc, ok)
}

/// A backend's circuit state (always closed when the pool has no breaker).
pub fn circuit(pool: &Pool, b: &Backend) -> BreakerState {
    if pool.breaker.enabled {
        b.breaker.state()
    } else {
        BreakerState::Closed
    }
}

/// Unix milliseconds as RFC 3339 (UTC, milliseconds), or null.
fn timestamp(ms: Option<u64>) -> Value {
    match ms {
        Some(ms) if ms > 0 => {
            let t = UNIX_EPOCH + Duration::from_millis(ms);
            Value::String(humantime::format_rfc3339_millis(t).to_string())
        }
        _ => Value::Null,
    }
}
