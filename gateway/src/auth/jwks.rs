//! The JSON Web Key Set: parsed keys, and the task that keeps them fresh.
//!
//! The set is fetched at start, every `refresh_interval`, and when a token
//! names a `kid` we do not know (at most once per `min_refetch_interval`).
//! A failed fetch keeps the last good set; an empty set is retried every
//! `min_refetch_interval` instead of waiting for the long refresh.

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use jsonwebtoken::jwk::{JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use tokio::sync::{watch, Notify};

use crate::config::JwksSettings;

/// Largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 1 << 20;

/// One usable public key.
pub struct Key {
    kid: Option<String>,
    /// The `alg` the JWK pins, if any.
    alg: Option<Algorithm>,
    family: AlgorithmFamily,
    key: DecodingKey,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

/// The current public keys.
#[derive(Debug, Default)]
pub struct KeySet {
    keys: Vec<Key>,
}

impl KeySet {
    /// Parses a JWKS document; keys that cannot verify signatures (bad
    /// material, `use: enc`, symmetric keys) are skipped.
    pub fn parse(body: &[u8]) -> Result<Self, String> {
        let set: JwkSet = serde_json::from_slice(body).map_err(|e| format!("not a JWKS: {e}"))?;
        let mut keys = Vec::new();
        for jwk in &set.keys {
            if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
                continue;
            }
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                tracing::warn!(kid = ?jwk.common.key_id, "JWKS: skipping a key that cannot be used");
                continue;
            };
            let family = key.family();
            if family == AlgorithmFamily::Hmac {
                // Shared secrets never come from a public key set.
                continue;
            }
            let alg = jwk
                .common
                .key_algorithm
                .and_then(|a| Algorithm::from_str(&a.to_string()).ok());
            keys.push(Key {
                kid: jwk.common.key_id.clone(),
                alg,
                family,
                key,
            });
        }
        Ok(Self { keys })
    }

    /// The key for a token with this `kid` and `alg`: same family, and the
    /// same `alg` when the JWK pins one. A token without `kid` is accepted
    /// only when exactly one key fits.
    pub fn find(&self, kid: Option<&str>, alg: Algorithm) -> Option<&DecodingKey> {
        let fits = |k: &&Key| k.family == alg.family() && k.alg.is_none_or(|a| a == alg);
        match kid {
            Some(kid) => self
                .keys
                .iter()
                .filter(fits)
                .find(|k| k.kid.as_deref() == Some(kid))
                .map(|k| &k.key),
            None => {
                let mut it = self.keys.iter().filter(fits);
                match (it.next(), it.next()) {
                    (Some(k), None) => Some(&k.key),
                    _ => None,
                }
            }
        }
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Shared between the verifier and the refresh task.
#[derive(Debug)]
pub struct Jwks {
    settings: JwksSettings,
    keys: ArcSwap<KeySet>,
    /// Wakes the task for an early fetch.
    wake: Arc<Notify>,
    /// Bumped after every fetch attempt, successful or not.
    fetched: watch::Sender<u64>,
    /// A fetch is running.
    fetching: AtomicBool,
    /// `started` offset (ms) of the last fetch triggered by an unknown kid.
    last_demand_ms: AtomicU64,
    started: Instant,
    /// Bumped each time the key set is replaced.
    generation: AtomicU64,
    /// Fetches that failed / succeeded (for metrics).
    pub failures: AtomicU64,
    /// Successful fetches.
    pub refreshes: AtomicU64,
}

impl Jwks {
    /// A key set with nothing fetched yet.
    pub fn new(settings: JwksSettings) -> Arc<Self> {
        Arc::new(Self {
            settings,
            keys: ArcSwap::from_pointee(KeySet::default()),
            wake: Arc::new(Notify::new()),
            fetched: watch::channel(0).0,
            fetching: AtomicBool::new(false),
            last_demand_ms: AtomicU64::new(u64::MAX),
            started: Instant::now(),
            generation: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            refreshes: AtomicU64::new(0),
        })
    }

    /// The current keys.
    pub fn keys(&self) -> arc_swap::Guard<Arc<KeySet>> {
        self.keys.load()
    }

    /// Replaces the key set (what a successful fetch does; also for tests
    /// and benches that have no JWKS server).
    pub fn replace_keys(&self, set: KeySet) {
        self.keys.store(Arc::new(set));
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// How many times the key set was replaced (cached tokens remember the
    /// generation their key was last seen in).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Starts the refresh task; it ends when the last `Arc<Jwks>` is gone.
    pub fn start(self: &Arc<Self>, bg: &crate::background::Background) {
        let weak = Arc::downgrade(self);
        let timeout = self.settings.timeout;
        bg.spawn(async move {
            let client = match reqwest::Client::builder()
                .timeout(timeout)
                .redirect(reqwest::redirect::Policy::limited(3))
                .build()
            {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "JWKS: cannot build an HTTP client");
                    return;
                }
            };
            refresh_loop(weak, client).await;
        });
    }

    /// Called for a token whose `kid` is unknown: asks for a fetch (unless
    /// one ran less than `min_refetch_interval` ago) and waits for it, at
    /// most the fetch timeout. Returns whether a fetch completed.
    pub async fn refetch_for_unknown_kid(&self) -> bool {
        let mut rx = self.fetched.subscribe();
        rx.mark_unchanged();
        if !self.fetching.load(Ordering::Acquire) {
            let now = self.started.elapsed().as_millis() as u64;
            let min = self.settings.min_refetch_interval.as_millis() as u64;
            let last = self.last_demand_ms.load(Ordering::Acquire);
            let allowed = last == u64::MAX || now.saturating_sub(last) >= min;
            if !allowed
                || self
                    .last_demand_ms
                    .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
                    .is_err()
            {
                return false;
            }
            self.wake.notify_one();
        }
        tokio::time::timeout(
            self.settings.timeout + Duration::from_millis(100),
            rx.changed(),
        )
        .await
        .is_ok_and(|r| r.is_ok())
    }

    async fn fetch(&self, client: &reqwest::Client) -> Result<KeySet, String> {
        let mut response = client
            .get(&self.settings.url)
            .header("accept", "application/json")
            .send()
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("HTTP {}", response.status()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| format!("reading body: {e}"))?
        {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(format!("larger than {MAX_JWKS_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        KeySet::parse(&body)
    }
}

async fn refresh_loop(weak: Weak<Jwks>, client: reqwest::Client) {
    let mut healthy = true;
    loop {
        let Some(jwks) = weak.upgrade() else { return };
        jwks.fetching.store(true, Ordering::Release);
        let result = jwks.fetch(&client).await;
        jwks.fetching.store(false, Ordering::Release);
        match result {
            Ok(set) if !set.is_empty() => {
                if !healthy {
                    tracing::info!(url = %jwks.settings.url, keys = set.len(), "JWKS: fetched again");
                }
                tracing::debug!(keys = set.len(), "JWKS refreshed");
                healthy = true;
                jwks.replace_keys(set);
                jwks.refreshes.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) | Err(_) => {
                let why = match result {
                    Err(e) => e,
                    Ok(_) => "the set has no usable keys".to_owned(),
                };
                jwks.failures.fetch_add(1, Ordering::Relaxed);
                if healthy && jwks.keys().is_empty() {
                    tracing::warn!(url = %jwks.settings.url, error = %why,
                        "JWKS: fetch failed and no keys yet; tokens are refused until a fetch succeeds");
                } else if healthy {
                    tracing::warn!(url = %jwks.settings.url, error = %why,
                        "JWKS: fetch failed; keeping the last good keys");
                }
                healthy = false;
            }
        }
        jwks.fetched.send_modify(|n| *n += 1);
        let wait = if jwks.keys().is_empty() {
            jwks.settings.min_refetch_interval
        } else {
            jwks.settings.refresh_interval
        };
        // Sleep holding only the wake-up, so a dropped key set ends the task.
        let wake = jwks.wake.clone();
        drop(jwks);
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED_JWK: &str = r#"{"keys":[
        {"kty":"OKP","crv":"Ed25519","kid":"ed1","alg":"EdDSA","use":"sig",
         "x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
        {"kty":"oct","kid":"sym","k":"c2VjcmV0"},
        {"kty":"OKP","crv":"Ed25519","kid":"enc","use":"enc",
         "x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
    ]}"#;

    #[test]
    fn test_parse_keeps_signature_keys_only() {
        let set = KeySet::parse(ED_JWK.as_bytes()).unwrap();
        assert_eq!(set.len(), 1);
        assert!(set.find(Some("ed1"), Algorithm::EdDSA).is_some());
        // Wrong family for this key, unknown kid, symmetric key: no match.
        assert!(set.find(Some("ed1"), Algorithm::RS256).is_none());
        assert!(set.find(Some("nope"), Algorithm::EdDSA).is_none());
        assert!(set.find(Some("sym"), Algorithm::HS256).is_none());
        // A single fitting key also serves tokens without kid.
        assert!(set.find(None, Algorithm::EdDSA).is_some());
        assert!(KeySet::parse(b"{}").is_err());
    }
}
