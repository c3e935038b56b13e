//! Who the user is, inside a service: the [`AuthUser`] extractor verifies
//! the caller's access token itself (defence in depth behind the gateway:
//! a service never trusts `X-User-*` alone) and gives `{user_id, tier,
//! roles, tenant}`. [`Admin`] is the same for admin-only handlers, so such
//! a handler says so in its signature.
//!
//! Tokens are checked by a [`UserTokens`] set as app data: the users
//! service checks them against its own signing keys; every other service
//! uses [`Jwks`], which fetches the users service's JWKS, keeps it, and
//! fetches it again (at most every 10 s) when a token names a key it does
//! not know — so a rotated key works at once.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use actix_web::{web, FromRequest, HttpRequest};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::error::ApiError;
use crate::service_auth::bearer;

/// The verified claims of a user's access token.
#[derive(Debug, Clone, Deserialize)]
pub struct UserClaims {
    /// The user id (`sub`).
    #[serde(rename = "sub")]
    pub user_id: String,
    /// Their tier when the token was issued.
    #[serde(default)]
    pub tier: String,
    /// Their roles (`user`, `admin`, `tenant_admin`).
    #[serde(default)]
    pub roles: Vec<String>,
    /// The active organization, when the token acts for one.
    #[serde(default)]
    pub tenant: Option<String>,
    /// The login (session) the token belongs to.
    #[serde(default)]
    pub sid: Option<String>,
}

impl UserClaims {
    /// Whether the user has `role`.
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }
}

/// Verifies user access tokens.
pub trait UserTokens: Send + Sync + 'static {
    /// The claims of a valid token, or why it is not.
    fn verify<'a>(
        &'a self,
        token: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<UserClaims, &'static str>> + 'a>>;
}

/// The caller, proven by a valid access token.
#[derive(Debug, Clone)]
pub struct AuthUser(pub UserClaims);

impl std::ops::Deref for AuthUser {
    type Target = UserClaims;
    fn deref(&self) -> &UserClaims {
        &self.0
    }
}

impl FromRequest for AuthUser {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        let tokens = req.app_data::<web::Data<dyn UserTokens>>().cloned();
        let token = bearer(req).map(str::to_owned);
        Box::pin(async move {
            let Some(tokens) = tokens else {
                return Err(ApiError::internal(&"UserTokens not configured"));
            };
            let Some(token) = token else {
                return Err(ApiError::unauthorized(
                    "missing_token",
                    "a bearer token is required",
                ));
            };
            tokens
                .verify(&token)
                .await
                .map(AuthUser)
                .map_err(|why| ApiError::unauthorized("invalid_token", why))
        })
    }
}

/// A caller with the `admin` role (403 otherwise).
#[derive(Debug, Clone)]
pub struct Admin(pub UserClaims);

impl FromRequest for Admin {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, payload: &mut actix_web::dev::Payload) -> Self::Future {
        let user = AuthUser::from_request(req, payload);
        Box::pin(async move {
            let user = user.await?;
            if user.has_role("admin") {
                Ok(Admin(user.0))
            } else {
                Err(ApiError::forbidden(
                    "forbidden",
                    "this endpoint needs the admin role",
                ))
            }
        })
    }
}

/// Least time between two fetches caused by unknown key ids.
const REFETCH_EVERY: Duration = Duration::from_secs(10);

/// The users service's JWKS, fetched and kept.
pub struct Jwks {
    url: String,
    validation: Validation,
    http: reqwest::Client,
    keys: RwLock<Vec<(Option<String>, DecodingKey)>>,
    last_fetch: Mutex<Option<Instant>>,
    refetch_every: Duration,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwks")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl Jwks {
    /// Tokens of issuer `issuer` for audience `audience`, with the keys
    /// at `url` (fetched on first use, again for an unknown key id at most
    /// every 10 s).
    pub fn new(url: impl Into<String>, issuer: &str, audience: &str) -> Arc<Self> {
        Self::with_refetch_every(url, issuer, audience, REFETCH_EVERY)
    }

    /// [`Jwks::new`] with another least time between fetches.
    pub fn with_refetch_every(
        url: impl Into<String>,
        issuer: &str,
        audience: &str,
        refetch_every: Duration,
    ) -> Arc<Self> {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        validation.leeway = 30;
        Arc::new(Self {
            url: url.into(),
            validation,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()
                .unwrap_or_default(),
            keys: RwLock::new(Vec::new()),
            last_fetch: Mutex::new(None),
            refetch_every,
        })
    }

    fn key(&self, kid: Option<&str>) -> Option<DecodingKey> {
        let keys = self.keys.read().ok()?;
        keys.iter()
            .find(|(k, _)| kid.is_none() || k.as_deref() == kid)
            .map(|(_, key)| key.clone())
    }

    /// Fetches the set again unless that happened less than
    /// `refetch_every` ago. `true` when it did.
    async fn refetch(&self) -> bool {
        {
            let Ok(mut last) = self.last_fetch.lock() else {
                return false;
            };
            if last.is_some_and(|t| t.elapsed() < self.refetch_every) {
                return false;
            }
            *last = Some(Instant::now());
        }
        let fetched = async {
            let set: JwkSet = self
                .http
                .get(&self.url)
                .send()
                .await
                .ok()?
                .error_for_status()
                .ok()?
                .json()
                .await
                .ok()?;
            Some(
                set.keys
                    .iter()
                    .filter_map(|jwk| {
                        DecodingKey::from_jwk(jwk)
                            .ok()
                            .map(|key| (jwk.common.key_id.clone(), key))
                    })
                    .collect::<Vec<_>>(),
            )
        }
        .await;
        match fetched {
            Some(keys) => {
                if let Ok(mut slot) = self.keys.write() {
                    *slot = keys;
                }
                true
            }
            None => {
                tracing::warn!(url = %self.url, "cannot fetch the users service's JWKS");
                false
            }
        }
    }
}

impl UserTokens for Jwks {
    fn verify<'a>(
        &'a self,
        token: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<UserClaims, &'static str>> + 'a>> {
        Box::pin(async move {
            let header =
                jsonwebtoken::decode_header(token).map_err(|_| "the token is malformed")?;
            if header.alg != Algorithm::EdDSA {
                return Err("the token is not signed with EdDSA");
            }
            let kid = header.kid.as_deref();
            let key = match self.key(kid) {
                Some(k) => k,
                None => {
                    self.refetch().await;
                    self.key(kid).ok_or("the token's key is unknown")?
                }
            };
            jsonwebtoken::decode::<UserClaims>(token, &key, &self.validation)
                .map(|t| t.claims)
                .map_err(|e| match e.kind() {
                    jsonwebtoken::errors::ErrorKind::ExpiredSignature => "the token has expired",
                    _ => "the token is invalid",
                })
        })
    }
}

#[cfg(test)]
mod tests {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    use ed25519_dalek::pkcs8::EncodePrivateKey;
    use jsonwebtoken::{EncodingKey, Header};

    use super::*;

    /// A JWKS endpoint serving whatever `set` holds.
    async fn jwks_server(set: Arc<Mutex<String>>) -> crate::test_http::Server {
        crate::test_http::serve(move |_, _| (200, set.lock().unwrap().clone())).await
    }

    struct Key {
        kid: &'static str,
        encoding: EncodingKey,
        jwk: serde_json::Value,
    }

    fn key(kid: &'static str, seed: u8) -> Key {
        let sk = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
        let der = sk.to_pkcs8_der().unwrap();
        Key {
            kid,
            encoding: EncodingKey::from_ed_der(der.as_bytes()),
            jwk: serde_json::json!({"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig",
                "kid": kid, "x": URL_SAFE_NO_PAD.encode(sk.verifying_key().to_bytes())}),
        }
    }

    fn set_of(keys: &[&Key]) -> String {
        serde_json::json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()})
            .to_string()
    }

    fn token(k: &Key, claims: serde_json::Value) -> String {
        let mut h = Header::new(Algorithm::EdDSA);
        h.kid = Some(k.kid.to_owned());
        jsonwebtoken::encode(&h, &claims, &k.encoding).unwrap()
    }

    fn claims(aud: &str, exp_in: i64) -> serde_json::Value {
        let now = crate::clock::system_now_ms() / 1000;
        serde_json::json!({"sub": "u1", "tier": "PREMIUM", "roles": ["user", "admin"],
            "iss": "tiergate-users", "aud": aud, "iat": now, "exp": now + exp_in})
    }

    #[tokio::test]
    async fn test_tokens_verify_against_the_jwks_and_a_rotated_key_is_fetched() {
        let (k1, k2) = (key("k1", 1), key("k2", 2));
        let set = Arc::new(Mutex::new(set_of(&[&k1])));
        let server = jwks_server(set.clone()).await;
        let jwks =
            Jwks::with_refetch_every(&server.base, "tiergate-users", "tiergate", Duration::ZERO);
        let c = jwks
            .verify(&token(&k1, claims("tiergate", 60)))
            .await
            .unwrap();
        assert_eq!((c.user_id.as_str(), c.tier.as_str()), ("u1", "PREMIUM"));
        assert!(c.has_role("admin"));
        jwks.verify(&token(&k1, claims("tiergate", 60)))
            .await
            .unwrap();
        assert_eq!(server.hits(), 1, "the set is kept");
        // Rotation: the new key is fetched when a token names it.
        *set.lock().unwrap() = set_of(&[&k2, &k1]);
        jwks.verify(&token(&k2, claims("tiergate", 60)))
            .await
            .unwrap();
        assert_eq!(server.hits(), 2);
        // Refusals, each with its reason.
        let cases = [
            (
                token(&k1, claims("tiergate", -120)),
                "the token has expired",
            ),
            (token(&k1, claims("billing", 60)), "the token is invalid"),
            (
                token(&key("k1", 9), claims("tiergate", 60)),
                "the token is invalid",
            ),
            ("not.a.token".to_owned(), "the token is malformed"),
            (
                jsonwebtoken::encode(
                    &Header::new(Algorithm::HS256),
                    &claims("tiergate", 60),
                    &EncodingKey::from_secret(b"guess"),
                )
                .unwrap(),
                "the token is not signed with EdDSA",
            ),
        ];
        for (t, why) in cases {
            assert_eq!(jwks.verify(&t).await.unwrap_err(), why);
        }
    }

    #[tokio::test]
    async fn test_unknown_key_ids_fetch_at_most_once_per_interval() {
        let k1 = key("k1", 1);
        let server = jwks_server(Arc::new(Mutex::new(set_of(&[&k1])))).await;
        let jwks = Jwks::new(&server.base, "tiergate-users", "tiergate");
        jwks.verify(&token(&k1, claims("tiergate", 60)))
            .await
            .unwrap();
        for _ in 0..20 {
            let e = jwks
                .verify(&token(&key("k9", 9), claims("tiergate", 60)))
                .await;
            assert_eq!(e.unwrap_err(), "the token's key is unknown");
        }
        assert_eq!(
            server.hits(),
            1,
            "a flood of unknown kids is not a flood of fetches"
        );
    }
}
