//! The gateway's tier table, read from its config file
//! (`services.subscriptions.gateway_config`) with the gateway's own parser,
//! so the limits `GET /plans` shows are the ones the gateway enforces. The
//! file is read again when its modification time changes (the gateway
//! reloads it the same way).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::Serialize;
use utoipa::ToSchema;

/// A tier's limits; `null` = unlimited in that window.
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq, Eq)]
pub struct TierLimits {
    /// Requests per minute.
    pub per_minute: Option<u64>,
    /// Requests per hour.
    pub per_hour: Option<u64>,
    /// Requests per day.
    pub per_day: Option<u64>,
    /// `user` (each member their own budget) or `tenant` (an organization's
    /// members share one).
    pub limit_by: &'static str,
}

#[derive(Debug, Default)]
struct Cached {
    modified: Option<SystemTime>,
    tiers: Vec<(String, TierLimits)>,
}

/// The tier table of one gateway config file.
#[derive(Debug)]
pub struct TierTable {
    path: PathBuf,
    cached: Mutex<Option<Cached>>,
}

impl TierTable {
    /// The table in `path` (read on first use).
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            cached: Mutex::new(None),
        }
    }

    /// The limits of `tier` (case-insensitive); `None` when the file
    /// cannot be read or has no such tier.
    pub fn limits(&self, tier: &str) -> Option<TierLimits> {
        let modified = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        let mut cached = match self.cached.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        let stale = cached
            .as_ref()
            .is_none_or(|c| c.modified != modified || modified.is_none());
        if stale {
            *cached = Some(Cached {
                modified,
                tiers: self.read(),
            });
        }
        cached
            .as_ref()?
            .tiers
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(tier))
            .map(|(_, l)| l.clone())
    }

    fn read(&self) -> Vec<(String, TierLimits)> {
        match gateway::config::load_file(&self.path) {
            Ok(config) => config
                .rate_limit
                .tiers
                .into_iter()
                .map(|t| {
                    let limits = TierLimits {
                        per_minute: t.limits.per_minute,
                        per_hour: t.limits.per_hour,
                        per_day: t.limits.per_day,
                        limit_by: match t.limit_by {
                            gateway::config::LimitBy::User => "user",
                            gateway::config::LimitBy::Tenant => "tenant",
                        },
                    };
                    (t.name, limits)
                })
                .collect(),
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e,
                    "cannot read the gateway's tier table; plans are listed without limits");
                Vec::new()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_limits_come_from_the_shipped_gateway_config() {
        let table = TierTable::new(Path::new("../../conf/tiergate.yaml"));
        let free = table.limits("free").unwrap();
        assert_eq!(
            (free.per_minute, free.per_hour, free.per_day, free.limit_by),
            (Some(10), Some(100), Some(1000), "user")
        );
        let enterprise = table.limits("ENTERPRISE").unwrap();
        assert_eq!((enterprise.per_day, enterprise.limit_by), (None, "tenant"));
        assert!(table.limits("GOLD").is_none());
        let missing = TierTable::new(Path::new("/nonexistent/tiergate.yaml"));
        assert!(missing.limits("FREE").is_none());
    }
}
