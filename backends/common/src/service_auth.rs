//! Service-to-service authentication. Each service (and the gateway) has
//! its own Ed25519 key and signs a fresh, short-lived EdDSA token for
//! every call: `iss`/`sub` = the caller, `aud` = the service called,
//! `exp` 60 s after `iat`, a unique `jti`. The called service checks the
//! signature with the caller's public key, the audience, the expiry, that
//! the `jti` was not seen before (a captured token cannot be replayed),
//! and that the route accepts that caller ([`AllowedCallers`]).
//!
//! Where keys come from:
//!
//! * the private key: `TIERGATE_<NAME>_SERVICE_KEY` (PKCS#8 PEM), or the
//!   file `TIERGATE_<NAME>_SERVICE_KEY_FILE` names. In development, when
//!   neither is set, one is generated once into
//!   `<data_dir>/service-keys/<name>.pem` (mode 0600) with its public key
//!   beside it (`<name>.pub`). In production a missing key is a start-up
//!   error: a key generated on each host would make every host disagree.
//! * the key it replaced, when one was rotated:
//!   `TIERGATE_<NAME>_SERVICE_KEY_PREVIOUS[_FILE]`. It signs nothing; the
//!   keys derived from it ([`ServiceKeys::derive_all`]) still open what was
//!   sealed before the rotation (outbox payloads).
//! * the callers' public keys: `service_keys.<name>` in
//!   `conf/services.yaml` (base64url of the 32-byte key, what
//!   `tiergate service-key <name>` prints; public keys are not secrets);
//!   in development only, else `<data_dir>/service-keys/<name>.pub` (how
//!   the services of one host find each other). In production a caller
//!   must be configured: a file dropped into the data directory does not
//!   make a trusted caller.
//!
//! Replays: a token's `jti` is remembered by the process that accepted it
//! until the token has expired, so a captured token is good for one call
//! to that process. Another instance of the same service would accept it
//! once more within its 60 s; every internal route is idempotent (events
//! by id, invoices by reference, reads), so such a replay changes
//! nothing. Keep service traffic on a private network.
//!
//! A user's access token (EdDSA too, but signed by the users service's
//! JWKS key and with audience `tiergate`) has no `aud` of a service and no
//! service key verifies it.

use std::collections::{HashMap, HashSet};
use std::future::{ready, Ready};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use actix_web::{web, FromRequest, HttpRequest};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::SigningKey;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::{write_private, Environment, FileLock};
use crate::error::ApiError;
use crate::secret::Secret;

/// How long a service token is valid.
pub const TTL: Duration = Duration::from_secs(60);
/// Clock skew allowed on `exp`.
const LEEWAY_SECS: u64 = 5;

/// The claims of a service token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceClaims {
    /// The calling service.
    pub iss: String,
    /// Also the calling service.
    pub sub: String,
    /// The service called.
    pub aud: String,
    /// Issued at (Unix seconds).
    pub iat: u64,
    /// Expiry (Unix seconds).
    pub exp: u64,
    /// Unique id: each token is good for one call.
    pub jti: String,
}

/// Where a service's private key comes from.
#[derive(Debug, Clone)]
pub struct KeySource {
    /// The service's name.
    pub name: String,
    /// `TIERGATE_<NAME>_SERVICE_KEY[_FILE]`, when set.
    pub pem: Option<Secret<String>>,
    /// The data directory (development keys live under it).
    pub data_dir: PathBuf,
    /// `TIERGATE_<NAME>_SERVICE_KEY_PREVIOUS[_FILE]`, when set.
    pub previous_pem: Option<Secret<String>>,
    /// Production refuses to generate a key, and trusts only configured
    /// callers.
    pub environment: Environment,
    /// Public keys of other services, by name (base64url).
    pub known: HashMap<String, String>,
}

impl KeySource {
    /// A development key of `name` under `data_dir` (generated on first
    /// use), trusting the callers whose keys are in that directory.
    pub fn development(name: &str, data_dir: &Path) -> Self {
        Self {
            name: name.to_owned(),
            pem: None,
            previous_pem: None,
            data_dir: data_dir.to_owned(),
            environment: Environment::Development,
            known: HashMap::new(),
        }
    }
}

/// One service's signing key, and the public keys of the services that
/// call it. Cheap to clone.
#[derive(Clone)]
pub struct ServiceKeys(Arc<Inner>);

struct Inner {
    name: String,
    encoding: EncodingKey,
    public: String,
    /// Derived from the private key: what [`ServiceKeys::derive`] hands out.
    seed: Secret<[u8; 32]>,
    /// The previous key's, for [`ServiceKeys::derive_all`].
    previous_seed: Option<Secret<[u8; 32]>>,
    dir: PathBuf,
    /// Whether callers' keys may be read from the data directory.
    development: bool,
    peers: RwLock<HashMap<String, Option<DecodingKey>>>,
    seen: Mutex<Replay>,
}

impl std::fmt::Debug for ServiceKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceKeys")
            .field("name", &self.0.name)
            .field("public", &self.0.public)
            .field("private", &"[redacted]")
            .finish()
    }
}

/// The directory of development keys.
pub fn key_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("service-keys")
}

impl ServiceKeys {
    /// Loads (or, in development, creates) the key of `source.name`.
    pub fn load(source: &KeySource) -> Result<Self, String> {
        let dir = key_dir(&source.data_dir);
        let sk = match &source.pem {
            Some(pem) => SigningKey::from_pkcs8_pem(pem.expose().trim()).map_err(|e| {
                format!(
                    "TIERGATE_{}_SERVICE_KEY: not an Ed25519 PKCS#8 PEM key: {e}",
                    source.name.to_ascii_uppercase()
                )
            })?,
            None if source.environment == Environment::Production => {
                return Err(format!(
                    "TIERGATE_{upper}_SERVICE_KEY (or TIERGATE_{upper}_SERVICE_KEY_FILE) is not \
                     set: in production every service needs its own key, and every service \
                     calling it its public key (service_keys.{name} in the services config). \
                     `openssl genpkey -algorithm ed25519` makes one.",
                    upper = source.name.to_ascii_uppercase(),
                    name = source.name
                ))
            }
            None => development_key(&dir, &source.name)?,
        };
        let previous_seed = match &source.previous_pem {
            Some(pem) => Some(Secret::new(
                SigningKey::from_pkcs8_pem(pem.expose().trim())
                    .map_err(|e| {
                        format!(
                            "TIERGATE_{}_SERVICE_KEY_PREVIOUS: not an Ed25519 PKCS#8 PEM key: {e}",
                            source.name.to_ascii_uppercase()
                        )
                    })?
                    .to_bytes(),
            )),
            None => None,
        };
        let der = sk
            .to_pkcs8_der()
            .map_err(|e| format!("cannot encode the service key: {e}"))?;
        let public = URL_SAFE_NO_PAD.encode(sk.verifying_key().to_bytes());
        let mut peers = HashMap::new();
        for (name, key) in &source.known {
            peers.insert(name.clone(), Some(decoding_key(name, key)?));
        }
        // A service trusts its own key (a service may call itself, e.g.
        // an outbox event it also consumes).
        peers.insert(
            source.name.clone(),
            Some(decoding_key(&source.name, &public)?),
        );
        Ok(Self(Arc::new(Inner {
            name: source.name.clone(),
            encoding: EncodingKey::from_ed_der(der.as_bytes()),
            public,
            seed: Secret::new(sk.to_bytes()),
            previous_seed,
            dir,
            development: source.environment == Environment::Development,
            peers: RwLock::new(peers),
            seen: Mutex::new(Replay::default()),
        })))
    }

    /// The service's name.
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// Its public key, base64url (what `service_keys.<name>` takes).
    pub fn public_key(&self) -> &str {
        &self.0.public
    }

    /// A 32-byte key derived from the private key for `purpose` (HKDF-SHA256):
    /// encryption at rest, without another secret to manage.
    pub fn derive(&self, purpose: &str) -> [u8; 32] {
        derive_from(self.0.seed.expose(), purpose)
    }

    /// [`ServiceKeys::derive`] from the current key, then from the
    /// previous one when one is set: seal with the first, open with any.
    pub fn derive_all(&self, purpose: &str) -> Vec<[u8; 32]> {
        let mut out = vec![self.derive(purpose)];
        if let Some(previous) = &self.0.previous_seed {
            out.push(derive_from(previous.expose(), purpose));
        }
        out
    }

    /// A fresh token for one call to `audience`.
    pub fn issue(&self, audience: &str) -> String {
        let now = unix_now();
        let claims = ServiceClaims {
            iss: self.0.name.clone(),
            sub: self.0.name.clone(),
            aud: audience.to_owned(),
            iat: now,
            exp: now + TTL.as_secs(),
            jti: uuid::Uuid::now_v7().to_string(),
        };
        // EdDSA with an in-memory key cannot fail to sign.
        jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &self.0.encoding)
            .unwrap_or_default()
    }

    /// The claims of a valid token for this service from one of `allowed`
    /// (`*` allows any service whose key is known); 401 for a bad or
    /// replayed token, 403 for a valid one from a service the route does
    /// not accept.
    pub fn verify(&self, token: &str, allowed: &[&str]) -> Result<ServiceClaims, ApiError> {
        let invalid = || {
            ApiError::unauthorized(
                "invalid_service_token",
                "this endpoint accepts only a valid service token",
            )
        };
        // The issuer names the key to check the signature with; it is
        // believed only once that signature verifies.
        let unverified: ServiceClaims = jsonwebtoken::dangerous::insecure_decode(token)
            .map_err(|_| invalid())?
            .claims;
        let key = self.peer_key(&unverified.iss).ok_or_else(|| {
            tracing::debug!(caller = %unverified.iss, "service token from a service whose public key is unknown");
            invalid()
        })?;
        let mut v = Validation::new(Algorithm::EdDSA);
        v.set_audience(&[self.0.name.as_str()]);
        v.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
        v.leeway = LEEWAY_SECS;
        let claims = jsonwebtoken::decode::<ServiceClaims>(token, &key, &v)
            .map_err(|_| invalid())?
            .claims;
        // Issued in the future (a caller's clock ahead, or a forged
        // lifetime) would outlive the replay window: refused.
        if claims.sub != claims.iss
            || claims.exp > claims.iat.saturating_add(TTL.as_secs() + LEEWAY_SECS)
            || claims.iat > unix_now().saturating_add(LEEWAY_SECS)
        {
            return Err(invalid());
        }
        if !allowed.iter().any(|a| *a == "*" || *a == claims.iss) {
            return Err(ApiError::forbidden(
                "caller_not_allowed",
                format!("this endpoint does not accept calls from `{}`", claims.iss),
            ));
        }
        let fresh = match self.0.seen.lock() {
            Ok(mut seen) => seen.insert(&claims.jti),
            Err(poisoned) => poisoned.into_inner().insert(&claims.jti),
        };
        if !fresh {
            return Err(ApiError::unauthorized(
                "replayed_service_token",
                "this service token was used before",
            ));
        }
        Ok(claims)
    }

    /// The public key of `service`: configured, or its development `.pub`
    /// under the data directory (looked up once, then remembered).
    fn peer_key(&self, service: &str) -> Option<DecodingKey> {
        if let Ok(peers) = self.0.peers.read() {
            if let Some(known) = peers.get(service) {
                return known.clone();
            }
        }
        if !self.0.development || !valid_service_name(service) {
            return None;
        }
        let key = std::fs::read_to_string(self.0.dir.join(format!("{service}.pub")))
            .ok()
            .and_then(|k| decoding_key(service, k.trim()).ok());
        // Only found keys are remembered: a service started later on this
        // host writes its key, and the next call finds it.
        if key.is_some() {
            if let Ok(mut peers) = self.0.peers.write() {
                peers.insert(service.to_owned(), key.clone());
            }
        }
        key
    }
}

fn derive_from(seed: &[u8; 32], purpose: &str) -> [u8; 32] {
    let hk = hkdf::Hkdf::<sha2::Sha256>::new(Some(b"tiergate"), seed);
    let mut out = [0u8; 32];
    // 32 bytes is within HKDF-SHA256's output limit.
    let _ = hk.expand(purpose.as_bytes(), &mut out);
    out
}

fn valid_service_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn decoding_key(name: &str, b64: &str) -> Result<DecodingKey, String> {
    let raw = URL_SAFE_NO_PAD
        .decode(b64.trim())
        .map_err(|e| format!("service_keys.{name}: not base64url: {e}"))?;
    if raw.len() != 32 {
        return Err(format!(
            "service_keys.{name}: an Ed25519 public key is 32 bytes, got {}",
            raw.len()
        ));
    }
    Ok(DecodingKey::from_ed_der(&raw))
}

/// The development key of `name` under `dir`: read, or generated once
/// (under a lock, so services starting together agree).
fn development_key(dir: &Path, name: &str) -> Result<SigningKey, String> {
    let pem_path = dir.join(format!("{name}.pem"));
    let err = |e: std::io::Error| format!("{}: {e}", pem_path.display());
    let read = |p: &Path| -> Option<Result<SigningKey, String>> {
        let text = std::fs::read_to_string(p).ok()?;
        Some(
            SigningKey::from_pkcs8_pem(text.trim())
                .map_err(|e| format!("{}: not an Ed25519 PKCS#8 key: {e}", p.display())),
        )
    };
    if let Some(key) = read(&pem_path) {
        return key;
    }
    std::fs::create_dir_all(dir).map_err(err)?;
    let _lock = FileLock::acquire(&pem_path).map_err(err)?;
    if let Some(key) = read(&pem_path) {
        return key;
    }
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| format!("no entropy for a service key: {e}"))?;
    let sk = SigningKey::from_bytes(&seed);
    let pem = sk
        .to_pkcs8_pem(Default::default())
        .map_err(|e| format!("cannot encode the service key: {e}"))?;
    write_private(&pem_path, pem.as_bytes()).map_err(err)?;
    let public = URL_SAFE_NO_PAD.encode(sk.verifying_key().to_bytes());
    std::fs::write(dir.join(format!("{name}.pub")), format!("{public}\n")).map_err(err)?;
    tracing::info!(service = name, path = %pem_path.display(), "generated a development service key");
    Ok(sk)
}

/// Token ids seen recently, in two generations of one window each, so an
/// id is remembered at least one window: a token's whole life (its `iat`
/// at most `LEEWAY` ahead, its `exp` at most `TTL + LEEWAY` after `iat`,
/// accepted `LEEWAY` past `exp`). Memory is bounded by the calls of two
/// windows.
#[derive(Default)]
struct Replay {
    current: HashSet<String>,
    previous: HashSet<String>,
    since: Option<Instant>,
}

impl Replay {
    /// `false` when `jti` was seen before.
    fn insert(&mut self, jti: &str) -> bool {
        let now = Instant::now();
        let window = TTL + Duration::from_secs(3 * LEEWAY_SECS);
        match self.since {
            Some(t) if now.duration_since(t) < window => {}
            _ => {
                self.previous = std::mem::take(&mut self.current);
                self.since = Some(now);
            }
        }
        if self.previous.contains(jti) {
            return false;
        }
        self.current.insert(jti.to_owned())
    }
}

/// The services a route accepts calls from (`*`: any known service), set
/// on the route as app data: `web::resource(path).app_data(AllowedCallers(&["subscriptions"]))`.
/// A route without it accepts no service ([`ServiceCaller`] fails closed).
#[derive(Debug, Clone, Copy)]
pub struct AllowedCallers(pub &'static [&'static str]);

/// The service that called an internal route, proven by its token.
#[derive(Debug, Clone)]
pub struct ServiceCaller {
    /// The calling service's name.
    pub service: String,
}

impl FromRequest for ServiceCaller {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        let Some(keys) = req.app_data::<web::Data<ServiceKeys>>() else {
            return ready(Err(ApiError::internal(&"ServiceKeys not configured")));
        };
        let allowed = req.app_data::<AllowedCallers>().map_or(&[][..], |a| a.0);
        let Some(token) = bearer(req) else {
            return ready(Err(ApiError::unauthorized(
                "missing_service_token",
                "this endpoint needs a service token",
            )));
        };
        ready(
            keys.verify(token, allowed)
                .map(|c| ServiceCaller { service: c.sub }),
        )
    }
}

/// The bearer token of a request, if any.
pub fn bearer(req: &HttpRequest) -> Option<&str> {
    let value = req.headers().get(actix_web::http::header::AUTHORIZATION)?;
    let value = value.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller_pem_for_rotation() -> String {
        SigningKey::from_bytes(&[5u8; 32])
            .to_pkcs8_pem(Default::default())
            .unwrap()
            .to_string()
    }

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("tg-keys-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn keys(name: &str, data_dir: &Path) -> ServiceKeys {
        ServiceKeys::load(&KeySource::development(name, data_dir)).unwrap()
    }

    #[test]
    fn test_tokens_verify_for_their_audience_and_allowed_callers_once() {
        let d = dir();
        let subs = keys("subscriptions", &d);
        let billing = keys("billing", &d);
        let token = subs.issue("billing");
        // Another instance of billing on the same host loads the same key.
        assert_eq!(keys("billing", &d).public_key(), billing.public_key());
        let claims = billing.verify(&token, &["subscriptions"]).unwrap();
        assert_eq!(claims.sub, "subscriptions");
        let replay = billing.verify(&token, &["subscriptions"]).unwrap_err();
        assert_eq!(replay.code(), "replayed_service_token");
        let other = subs.issue("billing");
        assert_eq!(
            billing.verify(&other, &["payments"]).unwrap_err().code(),
            "caller_not_allowed"
        );
        assert!(billing.verify(&subs.issue("billing"), &["*"]).is_ok());
        // A token for another audience, or signed by an unknown key.
        let for_users = subs.issue("users");
        assert_eq!(
            billing.verify(&for_users, &["*"]).unwrap_err().code(),
            "invalid_service_token"
        );
        let stranger = keys("subscriptions", &dir());
        assert_eq!(
            billing
                .verify(&stranger.issue("billing"), &["*"])
                .unwrap_err()
                .code(),
            "invalid_service_token",
            "same name, other key"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn test_production_needs_a_configured_key_and_takes_known_public_keys() {
        let d = dir();
        let production =
            |name: &str, pem: Option<String>, known: HashMap<String, String>| KeySource {
                pem: pem.map(Secret::new),
                environment: Environment::Production,
                known,
                ..KeySource::development(name, &d)
            };
        let missing = ServiceKeys::load(&production("billing", None, HashMap::new())).unwrap_err();
        assert!(
            missing.contains("TIERGATE_BILLING_SERVICE_KEY"),
            "{missing}"
        );
        assert!(
            !key_dir(&d).join("billing.pem").exists(),
            "nothing generated"
        );
        let pem = SigningKey::from_bytes(&[9u8; 32])
            .to_pkcs8_pem(Default::default())
            .unwrap()
            .to_string();
        let caller = SigningKey::from_bytes(&[3u8; 32]);
        let caller_pem = caller.to_pkcs8_pem(Default::default()).unwrap().to_string();
        let payments =
            ServiceKeys::load(&production("payments", Some(caller_pem), HashMap::new())).unwrap();
        let billing = ServiceKeys::load(&production(
            "billing",
            Some(pem.clone()),
            HashMap::from([("payments".to_owned(), payments.public_key().to_owned())]),
        ))
        .unwrap();
        assert!(billing
            .verify(&payments.issue("billing"), &["payments"])
            .is_ok());
        // In production a key file in the data directory makes no caller.
        let dev_users = keys("users", &d);
        assert!(key_dir(&d).join("users.pub").exists());
        assert_eq!(
            billing
                .verify(&dev_users.issue("billing"), &["*"])
                .unwrap_err()
                .code(),
            "invalid_service_token"
        );
        // A token issued in the future is refused (it would outlive the
        // replay window).
        let now = unix_now();
        let early = ServiceClaims {
            iss: "payments".into(),
            sub: "payments".into(),
            aud: "billing".into(),
            iat: now + 600,
            exp: now + 660,
            jti: "j-1".into(),
        };
        let forged =
            jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &early, &payments.0.encoding)
                .unwrap();
        assert!(billing.verify(&forged, &["payments"]).is_err());
        // The previous key still derives what it derived.
        let rotated = ServiceKeys::load(&KeySource {
            previous_pem: Some(Secret::new(pem)),
            ..production("billing", Some(caller_pem_for_rotation()), HashMap::new())
        })
        .unwrap();
        let all = rotated.derive_all("outbox");
        assert_eq!(all.len(), 2);
        assert_eq!(all[1], billing.derive("outbox"));
        assert_ne!(all[0], all[1]);
        assert!(!format!("{billing:?}").contains("PRIVATE"));
        assert!(!format!("{rotated:?}").contains("PRIVATE"));
        assert_ne!(billing.derive("outbox"), billing.derive("other"));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
