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
    /// The holder's role in it (`owner`, `admin`, `member`).
    #[serde(default)]
    pub tenant_role: Option<String>,
    /// The login (session) the token belongs to.
    #[serde(default)]
    pub sid: Option<String>,
}

impl UserClaims {
    /// Whether the user has `role`.
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }

    /// Who the request acts for: the active organization, else the user.
    /// Everything a service keeps for someone belongs to a subject, and
    /// its storage layer scopes every query by this value.
    pub fn subject(&self) -> Subject {
        match &self.tenant {
            Some(org) => Subject::Organization(org.clone()),
            None => Subject::User(self.user_id.clone()),
        }
    }

    /// Whether the token acts for an organization its holder administers
    /// (owner or admin): only they change what the organization owns.
    pub fn is_tenant_admin(&self) -> bool {
        self.tenant.is_some() && self.has_role("tenant_admin")
    }

    /// Members read what an organization owns; only its owner or admin
    /// (`tenant_admin`) acts on it (MONEY.md): 403
    /// `tenant_admin_required`, saying the organization's admin `does` it,
    /// for a member. A personal token acts for its user.
    pub fn acts_for_subject(&self, does: &str) -> Result<(), ApiError> {
        if self.tenant.is_some() && !self.is_tenant_admin() {
            return Err(ApiError::forbidden(
                "tenant_admin_required",
                format!("only an owner or admin of the organization {does}"),
            ));
        }
        Ok(())
    }
}

/// Who owns a resource: a user (a personal account) or an organization.
/// Serialized as `{"kind": "user" | "organization", "id": …}`, as events
/// carry it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, Deserialize)]
#[serde(tag = "kind", content = "id", rename_all = "lowercase")]
pub enum Subject {
    /// A user.
    User(String),
    /// An organization.
    Organization(String),
}

impl Subject {
    /// `user` or `organization`.
    pub fn kind(&self) -> &'static str {
        match self {
            Subject::User(_) => "user",
            Subject::Organization(_) => "organization",
        }
    }

    /// The user's or organization's id.
    pub fn id(&self) -> &str {
        match self {
            Subject::User(id) | Subject::Organization(id) => id,
        }
    }
}

/// Why a token was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The token is not valid (401, with the reason).
    Invalid(&'static str),
    /// It cannot be checked now: the keys cannot be fetched (503).
    Unavailable,
}

/// Verifies user access tokens.
pub trait UserTokens: Send + Sync + 'static {
    /// The claims of a valid token, or why it is not accepted.
    fn verify<'a>(
        &'a self,
        token: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<UserClaims, Refused>> + 'a>>;
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
                .map_err(|r| match r {
                    Refused::Invalid(why) => ApiError::unauthorized("invalid_token", why),
                    Refused::Unavailable => ApiError::unavailable(
                        "access tokens cannot be checked right now (the users service's keys \
                     cannot be fetched); try again shortly",
                        1,
                    ),
                })
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
/// Least time between two fetches after a failed one.
const RETRY_FAILED_EVERY: Duration = Duration::from_secs(1);

/// The users service's JWKS, fetched and kept.
pub struct Jwks {
    url: String,
    validation: Validation,
    http: reqwest::Client,
    keys: RwLock<Vec<(Option<String>, DecodingKey)>>,
    /// When the set was last fetched, and whether that worked.
    last_fetch: Mutex<Option<(Instant, bool)>>,
    /// Held while fetching: a request that needs the keys while another
    /// fetches them waits for that fetch instead of failing.
    fetching: tokio::sync::Mutex<()>,
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
    /// every 10 s, or every second while fetching fails). Fails only when
    /// the HTTP client cannot be built.
    pub fn new(url: impl Into<String>, issuer: &str, audience: &str) -> Result<Arc<Self>, String> {
        Self::with_refetch_every(url, issuer, audience, REFETCH_EVERY)
    }

    /// [`Jwks::new`] with another least time between fetches.
    pub fn with_refetch_every(
        url: impl Into<String>,
        issuer: &str,
        audience: &str,
        refetch_every: Duration,
    ) -> Result<Arc<Self>, String> {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        validation.leeway = 30;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| format!("cannot build the JWKS client: {e}"))?;
        Ok(Arc::new(Self {
            url: url.into(),
            validation,
            http,
            keys: RwLock::new(Vec::new()),
            last_fetch: Mutex::new(None),
            fetching: tokio::sync::Mutex::new(()),
            refetch_every,
        }))
    }

    fn key(&self, kid: Option<&str>) -> Option<DecodingKey> {
        let keys = self.keys.read().ok()?;
        keys.iter()
            .find(|(k, _)| kid.is_none() || k.as_deref() == kid)
            .map(|(_, key)| key.clone())
    }

    /// Whether the last fetch worked (`false` before the first).
    fn last_fetch_ok(&self) -> bool {
        self.last_fetch
            .lock()
            .map(|l| l.is_some_and(|(_, ok)| ok))
            .unwrap_or(false)
    }

    /// Fetches the set again unless that happened less than
    /// `refetch_every` ago (a second, when it failed). `true` when it did.
    async fn refetch(&self) -> bool {
        let _one_at_a_time = self.fetching.lock().await;
        {
            let Ok(last) = self.last_fetch.lock() else {
                return false;
            };
            let wait = |ok: bool| {
                if ok {
                    self.refetch_every
                } else {
                    RETRY_FAILED_EVERY.min(self.refetch_every)
                }
            };
            if last.is_some_and(|(t, ok)| t.elapsed() < wait(ok)) {
                return false;
            }
        }
        // Recorded once it ends: a fetch abandoned midway (its request
        // dropped by a client that went away) counts as neither, so the
        // next request fetches again instead of being told the keys
        // cannot be fetched.
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
                if let Ok(mut last) = self.last_fetch.lock() {
                    *last = Some((Instant::now(), true));
                }
                true
            }
            None => {
                tracing::warn!(url = %self.url, "cannot fetch the users service's JWKS");
                if let Ok(mut last) = self.last_fetch.lock() {
                    *last = Some((Instant::now(), false));
                }
                false
            }
        }
    }
}

impl UserTokens for Jwks {
    fn verify<'a>(
        &'a self,
        token: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<UserClaims, Refused>> + 'a>> {
        Box::pin(async move {
            let header = jsonwebtoken::decode_header(token)
                .map_err(|_| Refused::Invalid("the token is malformed"))?;
            if header.alg != Algorithm::EdDSA {
                return Err(Refused::Invalid("the token is not signed with EdDSA"));
            }
            let kid = header.kid.as_deref();
            let key = match self.key(kid) {
                Some(k) => k,
                None => {
                    self.refetch().await;
                    match self.key(kid) {
                        Some(k) => k,
                        // The keys could not be fetched: not the token's fault.
                        None if !self.last_fetch_ok() => return Err(Refused::Unavailable),
                        None => return Err(Refused::Invalid("the token's key is unknown")),
                    }
                }
            };
            jsonwebtoken::decode::<UserClaims>(token, &key, &self.validation)
                .map(|t| t.claims)
                .map_err(|e| {
                    Refused::Invalid(match e.kind() {
                        jsonwebtoken::errors::ErrorKind::ExpiredSignature => {
                            "the token has expired"
                        }
                        _ => "the token is invalid",
                    })
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
            Jwks::with_refetch_every(&server.base, "tiergate-users", "tiergate", Duration::ZERO)
                .unwrap();
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
            assert_eq!(jwks.verify(&t).await.unwrap_err(), Refused::Invalid(why));
        }
    }

    #[tokio::test]
    async fn test_unknown_key_ids_fetch_at_most_once_per_interval() {
        let k1 = key("k1", 1);
        let server = jwks_server(Arc::new(Mutex::new(set_of(&[&k1])))).await;
        let jwks = Jwks::new(&server.base, "tiergate-users", "tiergate").unwrap();
        jwks.verify(&token(&k1, claims("tiergate", 60)))
            .await
            .unwrap();
        for _ in 0..20 {
            let e = jwks
                .verify(&token(&key("k9", 9), claims("tiergate", 60)))
                .await;
            assert_eq!(
                e.unwrap_err(),
                Refused::Invalid("the token's key is unknown")
            );
        }
        assert_eq!(
            server.hits(),
            1,
            "a flood of unknown kids is not a flood of fetches"
        );
    }

    #[tokio::test]
    async fn test_keys_that_cannot_be_fetched_are_unavailable_not_invalid() {
        let k1 = key("k1", 1);
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", l.local_addr().unwrap())
        };
        let jwks = Jwks::new(&closed, "tiergate-users", "tiergate").unwrap();
        let t = token(&k1, claims("tiergate", 60));
        assert_eq!(jwks.verify(&t).await.unwrap_err(), Refused::Unavailable);
        // A malformed token is still the token's fault.
        assert_eq!(
            jwks.verify("nope").await.unwrap_err(),
            Refused::Invalid("the token is malformed")
        );
    }
}
