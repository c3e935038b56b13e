//! Bearer-token verification: JWTs checked against the JWKS (EdDSA, RSA,
//! ECDSA) or, for development only, an HS256 secret from the
//! `TIERGATE_DEV_JWT_SECRET` environment variable (never from YAML).
//!
//! A verified token is remembered (bounded cache, until it expires), so a
//! reused token costs a hash, a lookup and a byte comparison of the token.
//! The comparison matters: the cache is keyed by a 64-bit hash, and a hash
//! alone must never be what authenticates someone. A cached token whose
//! key left the JWKS at a refresh is dropped at its next use, so a rotated
//! out (or compromised) key stops working at once, not at token expiry.

pub mod jwks;

use std::hash::BuildHasher;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use http::HeaderValue;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde::Deserialize;

use crate::background::Background;
use crate::config::AuthSettings;
use crate::secret::Secret;
use jwks::Jwks;

/// Longest `sub` kept as is; longer ones are refused.
const MAX_SUBJECT_LEN: usize = 256;

/// Who a verified token says the caller is.
#[derive(Debug)]
pub struct Identity {
    /// `sub`, as the `X-User-Id` header value.
    pub subject: HeaderValue,
    /// The `tier` claim as sent (resolved against the tier table per request).
    pub tier: Option<Box<str>>,
    /// `roles`.
    pub roles: Vec<Box<str>>,
    /// `roles` joined by commas, for `X-User-Roles`.
    pub roles_header: Option<HeaderValue>,
    /// `tenant` (or `tenant_id`), for `X-User-Tenant`.
    pub tenant: Option<HeaderValue>,
    /// Hash of the tenant, the rate limiter's key for tiers limited by
    /// tenant.
    pub tenant_key: Option<u64>,
    /// `exp`, Unix seconds.
    pub expires_at: u64,
    /// `iat`, Unix seconds (0 when the token has none): a tier change
    /// applied after it overrides `tier` ([`crate::tier_feed`]).
    pub issued_at: u64,
    /// Hash of the subject, the rate limiter's key.
    pub key: u64,
}

impl Identity {
    /// Whether the caller has `role`.
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| &**r == role)
    }
}

/// Why a request's credentials were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    /// No bearer token where one is required.
    Missing,
    /// A token that failed verification; the text says why (sent to the
    /// client in `WWW-Authenticate` and the body, so never secret).
    Invalid(&'static str),
}

impl AuthError {
    /// The human explanation.
    pub fn message(&self) -> &'static str {
        match self {
            AuthError::Missing => "a bearer token is required",
            AuthError::Invalid(why) => why,
        }
    }
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    iat: Option<u64>,
    #[serde(default)]
    tier: Option<String>,
    #[serde(default)]
    roles: Option<Roles>,
    #[serde(default, alias = "tenant_id")]
    tenant: Option<String>,
}

/// `roles` as a JSON array or a space-separated string.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Roles {
    List(Vec<String>),
    Spaced(String),
}

struct Cached {
    token: Box<str>,
    identity: Arc<Identity>,
    /// The JWKS key that verified it (`None`: the development secret).
    key: Option<KeyRef>,
}

/// Which JWKS key verified a cached token, and the key set generation it
/// was last seen in.
struct KeyRef {
    kid: Option<Box<str>>,
    alg: Algorithm,
    generation: std::sync::atomic::AtomicU64,
}

/// Verifies tokens for one config.
pub struct Authenticator {
    max_token_bytes: usize,
    leeway: u64,
    /// One validation per allowed algorithm.
    validations: Vec<(Algorithm, Validation)>,
    hmac: Option<DecodingKey>,
    jwks: Option<Arc<Jwks>>,
    cache: quick_cache::sync::Cache<u64, Arc<Cached>>,
    hasher: foldhash::fast::RandomState,
    key_hasher: foldhash::fast::FixedState,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field(
                "algorithms",
                &self.validations.iter().map(|v| v.0).collect::<Vec<_>>(),
            )
            .field("dev_secret", &self.hmac.as_ref().map(|_| "<redacted>"))
            .field("jwks", &self.jwks)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Builds the verifier and starts the JWKS refresh task (if any) on `bg`.
    pub fn new(
        settings: &AuthSettings,
        dev_secret: Option<&Secret>,
        bg: Option<&Background>,
    ) -> Self {
        let validations = settings
            .algorithms
            .iter()
            .map(|&alg| {
                let mut v = Validation::new(alg);
                v.leeway = settings.leeway.as_secs();
                v.validate_nbf = true;
                v.set_required_spec_claims(&["exp", "sub"]);
                if let Some(iss) = &settings.issuer {
                    v.set_issuer(&[iss]);
                    v.required_spec_claims.insert("iss".into());
                }
                match &settings.audience {
                    Some(aud) => {
                        v.set_audience(&[aud]);
                        v.required_spec_claims.insert("aud".into());
                    }
                    None => v.validate_aud = false,
                }
                (alg, v)
            })
            .collect();
        let hmac = match dev_secret {
            Some(s) if settings.algorithms.contains(&Algorithm::HS256) => {
                Some(DecodingKey::from_secret(s.expose().as_bytes()))
            }
            _ => None,
        };
        let jwks = settings.jwks.clone().map(|j| {
            let jwks = Jwks::new(j);
            if let Some(bg) = bg {
                jwks.start(bg);
            }
            jwks
        });
        Self {
            max_token_bytes: settings.max_token_bytes,
            leeway: settings.leeway.as_secs(),
            validations,
            hmac,
            jwks,
            cache: quick_cache::sync::Cache::new(settings.cache_capacity),
            hasher: foldhash::fast::RandomState::default(),
            key_hasher: foldhash::fast::FixedState::with_seed(0x7469_6572_6761_7465),
        }
    }

    /// The JWKS state, when configured.
    pub fn jwks(&self) -> Option<&Arc<Jwks>> {
        self.jwks.as_ref()
    }

    /// The token of an `Authorization: Bearer <token>` header; `None` when
    /// the header is absent or another scheme.
    pub fn bearer(header: Option<&HeaderValue>) -> Option<&[u8]> {
        let v = header?.as_bytes();
        let (scheme, rest) = v.split_at_checked(7)?;
        if !scheme.eq_ignore_ascii_case(b"bearer ") {
            return None;
        }
        Some(rest.trim_ascii())
    }

    /// Verifies `token`, from the cache when it was seen before.
    pub async fn verify(&self, token: &[u8]) -> Result<Arc<Identity>, AuthError> {
        if let Some(identity) = self.cached(token) {
            return Ok(identity);
        }
        if token.len() > self.max_token_bytes {
            return Err(AuthError::Invalid("the token is too large"));
        }
        let Ok(token) = std::str::from_utf8(token) else {
            return Err(AuthError::Invalid("the token is malformed"));
        };
        let mut result = self.verify_once(token);
        if matches!(result, Err(Unverified::UnknownKey)) {
            if let Some(jwks) = &self.jwks {
                if jwks.refetch_for_unknown_kid().await {
                    result = self.verify_once(token);
                }
            }
        }
        let (identity, key) = result.map_err(Unverified::into_error)?;
        self.cache.insert(
            self.hasher.hash_one(token.as_bytes()),
            Arc::new(Cached {
                token: token.into(),
                identity: identity.clone(),
                key,
            }),
        );
        Ok(identity)
    }

    /// The cached identity for `token`, if verified before and not expired.
    pub fn cached(&self, token: &[u8]) -> Option<Arc<Identity>> {
        let hash = self.hasher.hash_one(token);
        let hit = self.cache.get(&hash)?;
        if hit.token.as_bytes() != token {
            return None;
        }
        if unix_now() > hit.identity.expires_at.saturating_add(self.leeway) {
            self.cache.remove(&hash);
            return None;
        }
        if let (Some(key), Some(jwks)) = (&hit.key, &self.jwks) {
            // A refresh replaced the key set: a token whose key left it
            // is verified again (and refused), not served from here.
            let generation = jwks.generation();
            if key.generation.load(Ordering::Relaxed) != generation {
                if jwks.keys().find(key.kid.as_deref(), key.alg).is_none() {
                    self.cache.remove(&hash);
                    return None;
                }
                key.generation.store(generation, Ordering::Relaxed);
            }
        }
        Some(hit.identity.clone())
    }

    /// Full verification without the cache and without refetching the key
    /// set (what a first-seen token costs).
    pub fn verify_uncached(&self, token: &str) -> Result<Arc<Identity>, AuthError> {
        self.verify_once(token)
            .map(|(id, _)| id)
            .map_err(Unverified::into_error)
    }

    fn verify_once(&self, token: &str) -> Result<(Arc<Identity>, Option<KeyRef>), Unverified> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| reject(e.kind()))?;
        let Some((_, validation)) = self.validations.iter().find(|(a, _)| *a == header.alg) else {
            return Err(reject(&ErrorKind::InvalidAlgorithm));
        };
        let keys;
        let mut key_ref = None;
        let key = if header.alg.family() == AlgorithmFamily::Hmac {
            self.hmac
                .as_ref()
                .ok_or(Unverified::Rejected(AuthError::Invalid(
                    "HS256 tokens are not accepted (no development secret is set)",
                )))?
        } else {
            let Some(jwks) = &self.jwks else {
                return Err(Unverified::Rejected(AuthError::Invalid(
                    "no key set is configured for this algorithm",
                )));
            };
            let generation = jwks.generation();
            keys = jwks.keys();
            key_ref = Some(KeyRef {
                kid: header.kid.as_deref().map(Into::into),
                alg: header.alg,
                generation: std::sync::atomic::AtomicU64::new(generation),
            });
            keys.find(header.kid.as_deref(), header.alg)
                .ok_or(Unverified::UnknownKey)?
        };
        let data =
            jsonwebtoken::decode::<Claims>(token, key, validation).map_err(|e| reject(e.kind()))?;
        let identity = self
            .identity(data.claims)
            .map(Arc::new)
            .map_err(Unverified::Rejected)?;
        Ok((identity, key_ref))
    }

    fn identity(&self, c: Claims) -> Result<Identity, AuthError> {
        if c.sub.is_empty() || c.sub.len() > MAX_SUBJECT_LEN {
            return Err(AuthError::Invalid(
                "the token's subject is empty or too long",
            ));
        }
        let subject = HeaderValue::from_str(&c.sub)
            .map_err(|_| AuthError::Invalid("the token's subject is not printable"))?;
        let roles: Vec<Box<str>> = match c.roles {
            None => Vec::new(),
            Some(Roles::List(v)) => v.into_iter().map(Into::into).collect(),
            Some(Roles::Spaced(s)) => s.split_whitespace().map(Into::into).collect(),
        };
        // Roles that could not travel in a header are dropped, not trusted.
        let roles: Vec<Box<str>> = roles
            .into_iter()
            .filter(|r| {
                !r.is_empty()
                    && r.len() <= 64
                    && r.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_:.".contains(&b))
            })
            .collect();
        let roles_header = (!roles.is_empty())
            .then(|| HeaderValue::from_str(&roles.join(",")).ok())
            .flatten();
        // A tenant that could not travel in a header is dropped, not
        // trusted (its members then draw from their own budgets).
        let tenant = c
            .tenant
            .filter(|t| !t.is_empty() && t.len() <= MAX_SUBJECT_LEN)
            .and_then(|t| HeaderValue::from_str(&t).ok());
        let tenant_key = tenant.as_ref().map(|t| {
            let mut input = Vec::with_capacity(t.len() + 2);
            input.extend_from_slice(b"t:");
            input.extend_from_slice(t.as_bytes());
            self.key_hasher.hash_one(&input)
        });
        let mut key_input = Vec::with_capacity(c.sub.len() + 2);
        key_input.extend_from_slice(b"u:");
        key_input.extend_from_slice(c.sub.as_bytes());
        Ok(Identity {
            subject,
            tier: c.tier.map(Into::into),
            roles,
            roles_header,
            tenant,
            tenant_key,
            expires_at: c.exp,
            issued_at: c.iat.unwrap_or(0),
            key: self.key_hasher.hash_one(&key_input),
        })
    }
}

enum Unverified {
    UnknownKey,
    Rejected(AuthError),
}

impl Unverified {
    fn into_error(self) -> AuthError {
        match self {
            Unverified::Rejected(e) => e,
            Unverified::UnknownKey => AuthError::Invalid("the token's key id is unknown"),
        }
    }
}

fn reject(kind: &ErrorKind) -> Unverified {
    Unverified::Rejected(AuthError::Invalid(match kind {
        ErrorKind::ExpiredSignature => "the token has expired",
        ErrorKind::ImmatureSignature => "the token is not valid yet",
        ErrorKind::InvalidIssuer => "the token's issuer is not accepted",
        ErrorKind::InvalidAudience => "the token's audience is not accepted",
        ErrorKind::InvalidSignature => "the token's signature is invalid",
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
            "the token's algorithm is not accepted"
        }
        ErrorKind::MissingRequiredClaim(_) => "the token lacks a required claim",
        ErrorKind::InvalidClaimFormat(_) => "the token has a malformed claim",
        _ => "the token is malformed",
    }))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    fn settings() -> AuthSettings {
        let c = crate::config::parse(
            "upstreams: {p: {backends: [{address: \"127.0.0.1:1\"}]}}\nroutes: [{name: r, match: {}, upstream: p}]\nauth: {issuer: iss, audience: aud, algorithms: [EdDSA, HS256]}\n",
        )
        .unwrap();
        c.auth
    }

    fn token(claims: serde_json::Value, secret: &str) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn run<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn test_bearer_parsing() {
        let v = HeaderValue::from_static("bearer  abc ");
        assert_eq!(Authenticator::bearer(Some(&v)), Some(&b"abc"[..]));
        let v = HeaderValue::from_static("Basic abc");
        assert_eq!(Authenticator::bearer(Some(&v)), None);
        assert_eq!(Authenticator::bearer(None), None);
    }

    #[test]
    fn test_hs256_claims_cache_and_rejections() {
        let secret = Secret::new("dev-secret".into());
        let auth = Authenticator::new(&settings(), Some(&secret), None);
        let exp = unix_now() + 600;
        let good = token(
            serde_json::json!({"sub": "u1", "exp": exp, "iss": "iss", "aud": "aud",
                "tier": "premium", "roles": ["user", "admin"], "tenant": "acme"}),
            "dev-secret",
        );
        let id = run(auth.verify(good.as_bytes())).unwrap();
        assert_eq!(id.subject, "u1");
        assert_eq!(id.tier.as_deref(), Some("premium"));
        assert_eq!(id.roles_header.as_ref().unwrap(), "user,admin");
        assert_eq!(id.tenant.as_ref().unwrap(), "acme");
        assert!(auth.cached(good.as_bytes()).is_some());

        let wrong_secret = token(
            serde_json::json!({"sub": "u1", "exp": exp, "iss": "iss", "aud": "aud"}),
            "other",
        );
        assert_eq!(
            run(auth.verify(wrong_secret.as_bytes())).unwrap_err(),
            AuthError::Invalid("the token's signature is invalid")
        );
        let expired = token(
            serde_json::json!({"sub": "u1", "exp": unix_now() - 3600, "iss": "iss", "aud": "aud"}),
            "dev-secret",
        );
        assert_eq!(
            run(auth.verify(expired.as_bytes())).unwrap_err(),
            AuthError::Invalid("the token has expired")
        );
        let wrong_aud = token(
            serde_json::json!({"sub": "u1", "exp": exp, "iss": "iss", "aud": "x"}),
            "dev-secret",
        );
        assert!(run(auth.verify(wrong_aud.as_bytes())).is_err());
        let no_sub = token(
            serde_json::json!({"exp": exp, "iss": "iss", "aud": "aud"}),
            "dev-secret",
        );
        assert!(run(auth.verify(no_sub.as_bytes())).is_err());
        assert!(run(auth.verify(b"a.b.c")).is_err());
    }

    #[test]
    fn test_hs256_refused_without_dev_secret() {
        let auth = Authenticator::new(&settings(), None, None);
        let t = token(
            serde_json::json!({"sub": "u1", "exp": unix_now() + 60, "iss": "iss", "aud": "aud"}),
            "anything",
        );
        assert!(run(auth.verify(t.as_bytes())).is_err());
    }
}
