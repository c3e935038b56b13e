//! Config reload without a restart: on SIGHUP, and when the file changes
//! (polled, debounced).
//!
//! A reload reads the file, validates it exactly as `tiergate check-config`
//! does (same parser, same plugin registry), builds a new [`Snapshot`] and
//! swaps it in atomically. Requests in flight keep the snapshot they
//! started with. What did not change is carried over (see [`Reuse`]):
//! unchanged pools keep their health, breaker and discovery state and
//! tasks; an unchanged `rate_limit` keeps its buckets; an unchanged `auth`
//! keeps its JWKS; an unchanged access log keeps its writer (SIGHUP always
//! reopens it, for log rotation). A removed or changed pool is dropped, and
//! its background tasks, which hold it weakly, end.
//!
//! An invalid file changes nothing: every error is logged with its path
//! and line, `tiergate_config_reloads_total{result="error"}` counts it and
//! the last good config keeps serving. Listener addresses, worker threads
//! and the admin listener cannot change without a restart (or a binary
//! upgrade): a reload that changes them applies the rest and says so.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use lua_free_plugins::Registry;
use serde_yaml_ng::Value;

use crate::background::Background;
use crate::config::{self, Config};
use crate::metrics::Metrics;
use crate::secret::Environment;
use crate::snapshot::{Reuse, Snapshot};

/// How often the file is checked for changes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// How long a changed file must stay the same before it is loaded (editors
/// and `kubectl` write in several steps).
pub const DEBOUNCE: Duration = Duration::from_millis(200);

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// SIGHUP: reload even if the file is unchanged, reopen the access log.
    Signal,
    /// The file's content changed.
    FileChange,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Signal => "SIGHUP",
            Trigger::FileChange => "file change",
        }
    }
}

/// The result of one reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The new config is serving.
    Applied {
        /// Its SHA-256.
        sha256: String,
    },
    /// The file is the config already serving (file trigger only).
    Unchanged,
    /// Nothing changed; the errors, one per line.
    Failed(Vec<String>),
}

/// The last config that loaded.
#[derive(Debug)]
struct Good {
    yaml: Value,
    sha256: String,
}

/// Reloads one config file into a gateway's snapshot cell.
pub struct Reloader {
    path: PathBuf,
    registry: Registry,
    env: Environment,
    state: Arc<ArcSwap<Snapshot>>,
    metrics: Arc<Metrics>,
    bg: Background,
    good: Mutex<Good>,
    /// SHA-256 of the last content tried (good or bad): a bad file is not
    /// retried until it changes again.
    tried: Mutex<String>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn yaml_of(text: &str) -> Value {
    serde_yaml_ng::from_str(text).unwrap_or(Value::Null)
}

fn section<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key)
}

impl Reloader {
    /// A reloader of `path`, whose current content is `text` (the config
    /// `state` serves), sharing the server's metrics and background runtime
    /// (`bg` is a spawner view of it).
    pub fn new(
        path: &Path,
        text: &str,
        registry: Registry,
        env: Environment,
        state: Arc<ArcSwap<Snapshot>>,
        metrics: Arc<Metrics>,
        bg: Background,
    ) -> Self {
        let sha256 = config::sha256_hex(text.as_bytes());
        Self {
            path: path.to_owned(),
            registry,
            env,
            state,
            metrics,
            bg,
            tried: Mutex::new(sha256.clone()),
            good: Mutex::new(Good {
                yaml: yaml_of(text),
                sha256,
            }),
        }
    }

    /// The watched file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn fail(&self, errors: Vec<String>) -> Outcome {
        self.metrics.record_reload(false);
        tracing::error!(
            path = %self.path.display(),
            errors = ?errors,
            "config reload failed; the previous config keeps serving"
        );
        Outcome::Failed(errors)
    }

    /// Reads, validates and applies the file (blocking: DNS resolution of
    /// backends; run it off the async threads).
    pub fn reload(&self, trigger: Trigger) -> Outcome {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) => return self.fail(vec![format!("cannot read {}: {e}", self.path.display())]),
        };
        let sha256 = config::sha256_hex(text.as_bytes());
        if let Ok(mut tried) = self.tried.lock() {
            tried.clone_from(&sha256);
        }
        let mut good = match self.good.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if trigger == Trigger::FileChange && good.sha256 == sha256 {
            return Outcome::Unchanged;
        }
        let config: Config = match config::parse_with(&text, &self.registry) {
            Ok(c) => c,
            Err(errors) => return self.fail(errors.0.iter().map(ToString::to_string).collect()),
        };
        if let Err(why) = crate::server::check_safety(&config, &self.env) {
            return self.fail(vec![why]);
        }
        let yaml = yaml_of(&text);
        let old = self.state.load_full();
        let same = |key: &str| section(&good.yaml, key) == section(&yaml, key);
        let dns_same = same("dns");
        let pools = config
            .upstreams
            .iter()
            .filter(|u| {
                let path = |v: &Value| v.get("upstreams").and_then(|m| m.get(&u.name)).cloned();
                dns_same && path(&good.yaml) == path(&yaml)
            })
            .map(|u| u.name.clone())
            .collect();
        let reuse = Reuse {
            old: Some(&old),
            pools,
            limiter: same("rate_limit"),
            auth: same("auth"),
            access_log: same("access_log") && trigger != Trigger::Signal,
        };
        let kept = reuse.pools.len();
        let snapshot =
            match Snapshot::rebuild(&config, &self.env, Some(&self.bg), &self.metrics, reuse) {
                Ok(s) => s,
                Err(e) => return self.fail(vec![e.to_string()]),
            };
        // What of `server` lives in the snapshot applies; the rest of
        // `server`, and `admin`, need a restart.
        let restart_only = |v: &Value| {
            let mut server = section(v, "server").cloned();
            if let Some(Value::Mapping(m)) = server.as_mut() {
                for key in RELOADABLE_SERVER_KEYS {
                    m.remove(key);
                }
            }
            server
        };
        let mut restart: Vec<&str> = Vec::new();
        if restart_only(&good.yaml) != restart_only(&yaml) {
            restart.push("server");
        }
        if !same("admin") {
            restart.push("admin");
        }
        self.state.store(Arc::new(snapshot));
        self.metrics.record_reload(true);
        *good = Good {
            yaml,
            sha256: sha256.clone(),
        };
        tracing::info!(
            path = %self.path.display(),
            trigger = trigger.as_str(),
            sha256 = %sha256,
            routes = config.routes.len(),
            upstreams = config.upstreams.len(),
            pools_kept = kept,
            "config reloaded"
        );
        if !restart.is_empty() {
            tracing::warn!(
                sections = ?restart,
                "config reloaded, but listener addresses, worker threads and the admin listener \
                 change only on a restart or binary upgrade"
            );
        }
        Outcome::Applied { sha256 }
    }

    /// Whether the file's content differs from the last content tried.
    fn changed_since_tried(&self, sha256: &str) -> bool {
        self.tried.lock().map_or(true, |t| *t != sha256)
    }
}

/// `server` keys a reload applies (they live in the snapshot; connection
/// limits and timeouts apply to connections opened after the reload).
const RELOADABLE_SERVER_KEYS: [&str; 6] = [
    "trusted_proxies",
    "limits",
    "client_timeouts",
    "path",
    "underscores_in_headers",
    "health_details",
];

/// Runs `reloader` until the runtime stops: reloads on SIGHUP at once, and
/// when the file's content changed and then stayed the same for
/// [`DEBOUNCE`].
pub async fn watch(reloader: Arc<Reloader>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => {
            // Logged once the handler is installed: from here a SIGHUP
            // reloads instead of ending the process.
            tracing::info!(path = %reloader.path.display(), "reloading the config on change and on SIGHUP");
            Some(s)
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGHUP; reloads follow file changes only");
            None
        }
    };
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen: Option<(SystemTime, u64)> = None;
    let mut pending: Option<(String, Instant)> = None;
    loop {
        let trigger = tokio::select! {
            Some(()) = async {
                match hup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            } => Trigger::Signal,
            _ = tick.tick() => {
                // Cheap check first: only read and hash when the file's
                // modification time or size moved (or a change is pending).
                let meta = std::fs::metadata(&reloader.path)
                    .ok()
                    .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
                if meta == seen && pending.is_none() {
                    continue;
                }
                seen = meta;
                let Ok(bytes) = std::fs::read(&reloader.path) else {
                    continue;
                };
                let sha = config::sha256_hex(&bytes);
                if !reloader.changed_since_tried(&sha) {
                    pending = None;
                    continue;
                }
                match &pending {
                    Some((p, since)) if *p == sha && since.elapsed() >= DEBOUNCE => {
                        pending = None;
                        Trigger::FileChange
                    }
                    Some((p, _)) if *p == sha => continue,
                    _ => {
                        pending = Some((sha, Instant::now()));
                        continue;
                    }
                }
            }
        };
        let r = reloader.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || r.reload(trigger)).await {
            tracing::error!(error = %e, "config reload task failed");
        }
    }
}
