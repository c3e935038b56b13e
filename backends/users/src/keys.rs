//! The access-token signing keys: Ed25519, each with a `kid`, published
//! as a JWKS.
//!
//! By default keys are generated on first start into
//! `<data_dir>/users-signing-keys.json` (mode 0600). The newest key signs;
//! after `rotate_signing_key_after` a new one is generated and the
//! previous key stays in the JWKS until every token it signed has expired
//! (its successor's creation + the access-token lifetime + 5 min). A key
//! given by `TIERGATE_USERS_SIGNING_KEY` (PKCS#8 PEM, or `_FILE`) is used
//! as is and never rotated by the service.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::SigningKey;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::Digest;

use backend_common::config::FileLock;
use backend_common::db::now_ms;
use backend_common::secret::Secret;

/// How long a retired key outlives its last possible token.
const RETIRE_MARGIN: Duration = Duration::from_secs(300);

/// A key made by a scheduled rotation is published this long before it
/// signs: every service and gateway has fetched it by then (the services
/// refetch a key set at most every 10 s, the JWKS is cached 60 s), so no
/// token with a key id they do not know yet is ever refused. A forced
/// rotation (`tiergate users rotate-signing-key`: a key may be
/// compromised) signs at once.
const PUBLISH_AHEAD: Duration = Duration::from_secs(300);

/// The claims of an access token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AccessClaims {
    /// The user id.
    pub sub: String,
    /// The user's tier (FREE, BASIC, PREMIUM, ENTERPRISE).
    pub tier: String,
    /// The user's roles (`user`, `admin`).
    pub roles: Vec<String>,
    /// Issuer.
    pub iss: String,
    /// Audience.
    pub aud: String,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// Issued at, Unix seconds.
    pub iat: u64,
    /// Token id.
    pub jti: String,
    /// The login (session) the token belongs to: its refresh-token
    /// family. A password change keeps this session and ends the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
    /// The organization the token acts for (`None`: personally).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The holder's role in it: `owner`, `admin` or `member`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_role: Option<String>,
}

/// The organization a token acts for.
#[derive(Debug, Clone, Copy)]
pub struct Tenant<'a> {
    /// Its id.
    pub id: &'a str,
    /// The holder's role in it.
    pub role: &'a str,
}

#[derive(Serialize, Deserialize)]
struct StoredKey {
    kid: String,
    created_at: i64,
    /// When it starts signing (ms); files from before pre-publishing have
    /// none: at once.
    #[serde(default)]
    active_from: Option<i64>,
    /// The 32-byte Ed25519 seed, base64.
    seed: String,
}

#[derive(Serialize, Deserialize, Default)]
struct KeyFile {
    /// Oldest first; the last one signs.
    keys: Vec<StoredKey>,
}

struct Key {
    kid: String,
    /// When it starts signing (ms).
    active_from: i64,
    encoding: EncodingKey,
    decoding: DecodingKey,
    x: String,
}

impl Key {
    fn from_signing_key(sk: &SigningKey, kid: Option<String>) -> Result<Self, String> {
        let der = sk
            .to_pkcs8_der()
            .map_err(|e| format!("cannot encode the signing key: {e}"))?;
        let public = sk.verifying_key().to_bytes();
        let kid = kid.unwrap_or_else(|| {
            let digest = sha2::Sha256::digest(public);
            URL_SAFE_NO_PAD.encode(&digest[..12])
        });
        Ok(Self {
            kid,
            active_from: 0,
            encoding: EncodingKey::from_ed_der(der.as_bytes()),
            decoding: DecodingKey::from_ed_der(&public),
            x: URL_SAFE_NO_PAD.encode(public),
        })
    }
}

struct Ring {
    /// Oldest first; the newest active one signs.
    keys: Vec<Key>,
    jwks: Arc<str>,
}

impl Ring {
    fn new(keys: Vec<Key>) -> Self {
        let jwks = serde_json::json!({
            "keys": keys.iter().rev().map(|k| serde_json::json!({
                "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig",
                "kid": k.kid, "x": k.x,
            })).collect::<Vec<_>>()
        })
        .to_string()
        .into();
        Self { keys, jwks }
    }

    /// The key that signs at `now_ms`: the newest active one, else (none
    /// active yet) the oldest.
    fn signing(&self, now_ms: i64) -> Option<&Key> {
        self.keys
            .iter()
            .rev()
            .find(|k| k.active_from <= now_ms)
            .or_else(|| self.keys.first())
    }
}

enum Source {
    /// Generated and rotated in this file.
    File(PathBuf),
    /// Given by the operator.
    Fixed,
}

/// Signs and verifies access tokens. Shared by all workers.
pub struct Signer {
    ring: RwLock<Arc<Ring>>,
    /// When the key file was last re-read for an unknown `kid` (ms).
    last_reread: std::sync::atomic::AtomicI64,
    source: Source,
    access_ttl: Duration,
    rotate_after: Duration,
    issuer: String,
    audience: String,
    validation: Validation,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("keys", &"[redacted]")
            .finish()
    }
}

impl Signer {
    /// Loads (or generates) the keys.
    pub fn load(
        data_dir: &Path,
        given: Option<Secret<String>>,
        access_ttl: Duration,
        rotate_after: Duration,
        issuer: &str,
        audience: &str,
    ) -> Result<Self, String> {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_audience(&[audience]);
        validation.set_issuer(&[issuer]);
        validation.set_required_spec_claims(&["exp", "sub", "aud", "iss"]);
        validation.leeway = 5;
        let (source, keys) = match given {
            Some(pem) => {
                let sk = SigningKey::from_pkcs8_pem(pem.expose().trim()).map_err(|e| {
                    format!("TIERGATE_USERS_SIGNING_KEY: not an Ed25519 PKCS#8 PEM key: {e}")
                })?;
                (Source::Fixed, vec![Key::from_signing_key(&sk, None)?])
            }
            None => {
                let path = data_dir.join("users-signing-keys.json");
                let keys = load_or_create(&path)?;
                (Source::File(path), keys)
            }
        };
        Ok(Self {
            ring: RwLock::new(Arc::new(Ring::new(keys))),
            last_reread: std::sync::atomic::AtomicI64::new(0),
            source,
            access_ttl,
            rotate_after,
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            validation,
        })
    }

    fn ring(&self) -> Arc<Ring> {
        match self.ring.read() {
            Ok(r) => r.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The access-token lifetime.
    pub fn access_ttl(&self) -> Duration {
        self.access_ttl
    }

    /// A signed access token for this subject, tier, roles and session,
    /// acting for `tenant` when given.
    pub fn issue(
        &self,
        sub: &str,
        tier: &str,
        roles: &[String],
        sid: Option<&str>,
        tenant: Option<Tenant<'_>>,
    ) -> Result<String, String> {
        self.issue_at(now_ms(), sub, tier, roles, sid, tenant)
    }

    /// [`Signer::issue`] at `now_ms`.
    fn issue_at(
        &self,
        now_ms: i64,
        sub: &str,
        tier: &str,
        roles: &[String],
        sid: Option<&str>,
        tenant: Option<Tenant<'_>>,
    ) -> Result<String, String> {
        let ring = self.ring();
        let key = ring.signing(now_ms).ok_or("no signing key")?;
        let now = now_ms.max(0) as u64 / 1000;
        let claims = AccessClaims {
            sub: sub.to_owned(),
            tier: tier.to_owned(),
            roles: roles.to_vec(),
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            iat: now,
            exp: now + self.access_ttl.as_secs(),
            jti: uuid::Uuid::now_v7().to_string(),
            sid: sid.map(str::to_owned),
            tenant: tenant.map(|t| t.id.to_owned()),
            tenant_role: tenant.map(|t| t.role.to_owned()),
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(key.kid.clone());
        jsonwebtoken::encode(&header, &claims, &key.encoding).map_err(|e| e.to_string())
    }

    /// The claims of a valid access token signed by a key in the ring.
    pub fn verify(&self, token: &str) -> Result<AccessClaims, &'static str> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| "the token is malformed")?;
        if header.alg != Algorithm::EdDSA {
            return Err("the token is not signed with EdDSA");
        }
        let kid = header.kid.as_deref().ok_or("the token has no key id")?;
        let mut ring = self.ring();
        if !ring.keys.iter().any(|k| k.kid == kid) && self.reread() {
            // Another process sharing the data directory may have rotated
            // a moment ago: its tokens verify here at once.
            ring = self.ring();
        }
        let key = ring
            .keys
            .iter()
            .find(|k| k.kid == kid)
            .ok_or("the token's key is unknown or retired")?;
        jsonwebtoken::decode::<AccessClaims>(token, &key.decoding, &self.validation)
            .map(|t| t.claims)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => "the token has expired",
                _ => "the token is invalid",
            })
    }

    /// Re-reads the key file, at most once a second (an unknown `kid`
    /// must not make every request read a file). Returns whether the ring
    /// changed.
    fn reread(&self) -> bool {
        use std::sync::atomic::Ordering;
        let Source::File(path) = &self.source else {
            return false;
        };
        let now = now_ms();
        let last = self.last_reread.load(Ordering::Relaxed);
        if now - last < 1000
            || self
                .last_reread
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return false;
        }
        let Ok(Some(file)) = read_file(path) else {
            return false;
        };
        self.install(&file).unwrap_or(false)
    }

    /// Makes `file`'s keys the ring unless they already are. Returns
    /// whether the ring changed.
    fn install(&self, file: &KeyFile) -> Result<bool, String> {
        let wanted: Vec<&str> = file.keys.iter().map(|k| k.kid.as_str()).collect();
        let ring = self.ring();
        let current: Vec<&str> = ring.keys.iter().map(|k| k.kid.as_str()).collect();
        if wanted == current {
            return Ok(false);
        }
        let keys = file
            .keys
            .iter()
            .map(to_key)
            .collect::<Result<Vec<_>, _>>()?;
        match self.ring.write() {
            Ok(mut r) => *r = Arc::new(Ring::new(keys)),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(Ring::new(keys)),
        }
        Ok(true)
    }

    /// The JWKS document.
    pub fn jwks(&self) -> Arc<str> {
        self.ring().jwks.clone()
    }

    /// The key ids in the JWKS, newest first.
    pub fn kids(&self) -> Vec<String> {
        self.ring()
            .keys
            .iter()
            .rev()
            .map(|k| k.kid.clone())
            .collect()
    }

    /// Rotation and pruning, run periodically: re-reads the key file (so a
    /// rotation by another process or `tiergate` command is picked up),
    /// generates a new key when the newest is older than the rotation
    /// period (or `force`), and drops retired keys whose tokens have all
    /// expired. Returns whether the ring changed.
    pub fn maintain(&self, now: i64, force: bool) -> Result<bool, String> {
        let Source::File(path) = &self.source else {
            return Ok(false);
        };
        // Every process sharing the data directory rotates under the same
        // lock and re-reads first, so none overwrites another's new key.
        let _lock = lock(path)?;
        let mut file = read_file(path)?.unwrap_or_default();
        let before: Vec<String> = file.keys.iter().map(|k| k.kid.clone()).collect();
        let newest = file.keys.last().map_or(i64::MIN, |k| k.created_at);
        let period = i64::try_from(self.rotate_after.as_millis()).unwrap_or(i64::MAX);
        if force || file.keys.is_empty() {
            file.keys.push(generate(now, now)?);
        } else if now.saturating_sub(newest) >= period {
            let ahead = i64::try_from(PUBLISH_AHEAD.as_millis()).unwrap_or(i64::MAX);
            file.keys.push(generate(now, now.saturating_add(ahead))?);
        }
        let keep_after =
            i64::try_from((self.access_ttl + RETIRE_MARGIN).as_millis()).unwrap_or(i64::MAX);
        // A key retires when its successor starts signing; it stays
        // published while the tokens it signed may be valid.
        let successors: Vec<i64> = file
            .keys
            .iter()
            .skip(1)
            .map(|k| k.active_from.unwrap_or(k.created_at))
            .collect();
        let mut index = 0;
        file.keys.retain(|_| {
            let keep = successors
                .get(index)
                .is_none_or(|&retired_at| now.saturating_sub(retired_at) < keep_after);
            index += 1;
            keep
        });
        let after: Vec<String> = file.keys.iter().map(|k| k.kid.clone()).collect();
        if after != before {
            write_file(path, &file)?;
            tracing::info!(
                active = after.last().map(String::as_str).unwrap_or(""),
                published = after.len(),
                "signing keys rotated"
            );
        }
        self.install(&file)
    }
}

fn generate(now: i64, active_from: i64) -> Result<StoredKey, String> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| format!("cannot generate a key: {e}"))?;
    let sk = SigningKey::from_bytes(&seed);
    let key = Key::from_signing_key(&sk, None)?;
    Ok(StoredKey {
        kid: key.kid,
        created_at: now,
        active_from: Some(active_from),
        seed: STANDARD.encode(seed),
    })
}

fn to_key(stored: &StoredKey) -> Result<Key, String> {
    let seed: [u8; 32] = STANDARD
        .decode(&stored.seed)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| {
            format!(
                "signing key {}: the seed is not 32 bytes of base64",
                stored.kid
            )
        })?;
    let mut key = Key::from_signing_key(&SigningKey::from_bytes(&seed), Some(stored.kid.clone()))?;
    key.active_from = stored.active_from.unwrap_or(stored.created_at);
    Ok(key)
}

fn read_file(path: &Path) -> Result<Option<KeyFile>, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

fn write_file(path: &Path, file: &KeyFile) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let text = serde_json::to_vec_pretty(file).map_err(|e| e.to_string())?;
    backend_common::config::write_private(path, &text)
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn lock(path: &Path) -> Result<FileLock, String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    FileLock::acquire(path).map_err(|e| format!("{}.lock: {e}", path.display()))
}

fn load_or_create(path: &Path) -> Result<Vec<Key>, String> {
    let _lock = lock(path)?;
    let mut file = read_file(path)?.unwrap_or_default();
    if file.keys.is_empty() {
        let now = now_ms();
        file.keys.push(generate(now, now)?);
        write_file(path, &file)?;
        tracing::info!(path = %path.display(), "generated an access-token signing key");
    }
    file.keys.iter().map(to_key).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    fn signer(dir: &Path) -> Signer {
        Signer::load(
            dir,
            None,
            Duration::from_secs(900),
            Duration::from_secs(3600),
            "tiergate-users",
            "tiergate",
        )
        .unwrap()
    }

    fn tmp() -> PathBuf {
        let d = std::env::temp_dir().join(format!("tg-keys-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn test_key_is_generated_once_and_kept_across_restarts() {
        let dir = tmp();
        let a = signer(&dir);
        let b = signer(&dir);
        assert_eq!(a.kids(), b.kids());
        let token = a
            .issue("u1", "FREE", &["user".into()], Some("s1"), None)
            .unwrap();
        let claims = b.verify(&token).unwrap();
        assert_eq!((claims.sub.as_str(), claims.tier.as_str()), ("u1", "FREE"));
        assert_eq!(claims.sid.as_deref(), Some("s1"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join("users-signing-keys.json"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn test_rotation_keeps_the_old_key_until_its_tokens_expire() {
        let dir = tmp();
        let s = signer(&dir);
        let old_kid = s.kids()[0].clone();
        let old_token = s.issue("u1", "FREE", &[], None, None).unwrap();
        let t0 = now_ms();
        // Not due yet: nothing changes.
        assert!(!s.maintain(t0, false).unwrap());
        // Due: a new key is published; it signs five minutes later, once
        // every service has fetched it; the old one stays published.
        let rotated = t0 + 61 * MIN;
        assert!(s.maintain(rotated, false).unwrap());
        let kids = s.kids();
        assert_eq!(kids.len(), 2);
        assert_eq!(kids[1], old_kid);
        assert!(s.verify(&old_token).is_ok());
        let kid_at = |at: i64| {
            let t = s.issue_at(at, "u1", "FREE", &[], None, None).unwrap();
            jsonwebtoken::decode_header(&t).unwrap().kid.unwrap()
        };
        assert_eq!(kid_at(rotated), old_kid, "published ahead, not signing yet");
        assert_eq!(kid_at(rotated + 5 * MIN - 1), old_kid);
        assert_eq!(
            kid_at(rotated + 5 * MIN),
            kids[0],
            "signing once published long enough"
        );
        // 15 min access TTL + 5 min margin after the new key took over:
        // pruned.
        assert!(!s.maintain(rotated + 5 * MIN + 19 * MIN, false).unwrap());
        assert!(s.maintain(rotated + 5 * MIN + 21 * MIN, false).unwrap());
        assert_eq!(s.kids(), [kids[0].clone()]);
        assert_eq!(
            s.verify(&old_token).unwrap_err(),
            "the token's key is unknown or retired"
        );
        // JWKS shape.
        let jwks: serde_json::Value = serde_json::from_str(&s.jwks()).unwrap();
        assert_eq!(jwks["keys"][0]["kty"], "OKP");
        assert_eq!(jwks["keys"][0]["crv"], "Ed25519");
        assert_eq!(jwks["keys"][0]["kid"], kids[0].as_str());
    }

    #[test]
    fn test_concurrent_forced_rotations_in_one_data_dir_lose_no_key() {
        let dir = tmp();
        let signers: Vec<Signer> = (0..4).map(|_| signer(&dir)).collect();
        let t0 = now_ms();
        std::thread::scope(|scope| {
            for s in &signers {
                scope.spawn(move || s.maintain(t0, true).unwrap());
            }
        });
        // A token signed with a key this process has not loaded yet
        // verifies at once (the file is re-read for an unknown kid).
        let newest = signer(&dir);
        let token = newest.issue("u1", "FREE", &[], None, None).unwrap();
        assert!(signers[0].verify(&token).is_ok());
        // Four rotations, each kept: the first key and four successors.
        for s in &signers {
            s.maintain(t0, false).unwrap();
            assert_eq!(s.kids().len(), 5, "{:?}", s.kids());
        }
        // Whichever key a process signs with, every other one verifies it.
        for a in &signers {
            let token = a.issue("u1", "FREE", &[], None, None).unwrap();
            for b in &signers {
                assert!(b.verify(&token).is_ok());
            }
        }
    }

    #[test]
    fn test_tampered_or_foreign_tokens_are_rejected() {
        let dir = tmp();
        let s = signer(&dir);
        let other = signer(&tmp());
        let token = s.issue("u1", "FREE", &[], None, None).unwrap();
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        let mut claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&parts[1]).unwrap()).unwrap();
        claims["tier"] = "ENTERPRISE".into();
        parts[1] = URL_SAFE_NO_PAD.encode(claims.to_string());
        assert_eq!(
            s.verify(&parts.join(".")).unwrap_err(),
            "the token is invalid"
        );
        assert!(other.verify(&token).is_err());
        assert!(s.verify("not.a.token").is_err());
        let hs = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"sub":"x"}),
            &EncodingKey::from_secret(b"k"),
        )
        .unwrap();
        assert_eq!(
            s.verify(&hs).unwrap_err(),
            "the token is not signed with EdDSA"
        );
    }

    #[test]
    fn test_a_given_pem_key_is_used_and_not_rotated() {
        let sk = SigningKey::from_bytes(&[7u8; 32]);
        let pem = sk.to_pkcs8_pem(Default::default()).unwrap();
        let s = Signer::load(
            &tmp(),
            Some(Secret::new(pem.to_string())),
            Duration::from_secs(900),
            Duration::from_secs(3600),
            "i",
            "a",
        )
        .unwrap();
        let token = s.issue("u", "FREE", &[], None, None).unwrap();
        assert!(s.verify(&token).is_ok());
        assert!(!s.maintain(now_ms() + 1_000 * MIN, true).unwrap());
        assert!(Signer::load(
            &tmp(),
            Some(Secret::new("junk".into())),
            Duration::from_secs(900),
            Duration::from_secs(3600),
            "i",
            "a"
        )
        .is_err());
    }
}
