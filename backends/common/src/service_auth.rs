//! Service-to-service authentication: short-lived HS256 JWTs signed with
//! the secret every service shares (`TIERGATE_SERVICE_SECRET`). Internal
//! routes (`/internal/...`) take the [`ServiceCaller`] extractor and so
//! accept nothing else: a user's access token (EdDSA, audience
//! `tiergate`) fails here.

use std::future::{ready, Ready};
use std::time::Duration;

use actix_web::{web, FromRequest, HttpRequest};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::secret::Secret;

/// The audience of every service token.
pub const AUDIENCE: &str = "tiergate-internal";
/// How long a service token is valid.
pub const TTL: Duration = Duration::from_secs(60);
/// The shortest secret accepted, in bytes.
pub const MIN_SECRET_LEN: usize = 32;

/// The claims of a service token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceClaims {
    /// The calling service.
    pub iss: String,
    /// Also the calling service.
    pub sub: String,
    /// Always [`AUDIENCE`].
    pub aud: String,
    /// Issued at (Unix seconds).
    pub iat: u64,
    /// Expiry (Unix seconds).
    pub exp: u64,
    /// Unique id.
    pub jti: String,
}

/// Issues and verifies service tokens for one service. Cheap to clone.
#[derive(Clone)]
pub struct ServiceTokens {
    name: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for ServiceTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceTokens")
            .field("name", &self.name)
            .field("secret", &"[redacted]")
            .finish()
    }
}

impl ServiceTokens {
    /// Tokens issued as `service`. The secret must be at least
    /// [`MIN_SECRET_LEN`] bytes.
    pub fn new(service: &str, secret: &Secret<String>) -> Result<Self, String> {
        let key = secret.expose().as_bytes();
        if key.len() < MIN_SECRET_LEN {
            return Err(format!(
                "the service secret must be at least {MIN_SECRET_LEN} bytes, got {}",
                key.len()
            ));
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
        validation.leeway = 5;
        Ok(Self {
            name: service.to_owned(),
            encoding: EncodingKey::from_secret(key),
            decoding: DecodingKey::from_secret(key),
            validation,
        })
    }

    /// A fresh token for one call.
    pub fn issue(&self) -> String {
        let now = unix_now();
        let claims = ServiceClaims {
            iss: self.name.clone(),
            sub: self.name.clone(),
            aud: AUDIENCE.to_owned(),
            iat: now,
            exp: now + TTL.as_secs(),
            jti: uuid::Uuid::now_v7().to_string(),
        };
        // HS256 with an in-memory key cannot fail to sign.
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .unwrap_or_default()
    }

    /// The claims of a valid service token; 401 otherwise.
    pub fn verify(&self, token: &str) -> Result<ServiceClaims, ApiError> {
        jsonwebtoken::decode::<ServiceClaims>(token, &self.decoding, &self.validation)
            .map(|t| t.claims)
            .map_err(|_| {
                ApiError::unauthorized(
                    "invalid_service_token",
                    "this endpoint accepts only a valid service token",
                )
            })
    }
}

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
        let Some(tokens) = req.app_data::<web::Data<ServiceTokens>>() else {
            return ready(Err(ApiError::internal(&"ServiceTokens not configured")));
        };
        let Some(token) = bearer(req) else {
            return ready(Err(ApiError::unauthorized(
                "missing_service_token",
                "this endpoint needs a service token",
            )));
        };
        ready(
            tokens
                .verify(token)
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

    fn secret(s: &str) -> Secret<String> {
        Secret::new(s.to_owned())
    }

    #[test]
    fn test_a_token_verifies_with_the_same_secret_only() {
        let a = ServiceTokens::new("users", &secret(&"a".repeat(32))).unwrap();
        let b = ServiceTokens::new("billing", &secret(&"b".repeat(32))).unwrap();
        let token = a.issue();
        assert_eq!(a.verify(&token).unwrap().sub, "users");
        assert_eq!(
            b.verify(&token).unwrap_err().code(),
            "invalid_service_token"
        );
    }

    #[test]
    fn test_short_secret_is_rejected() {
        assert!(ServiceTokens::new("users", &secret("short")).is_err());
    }

    #[test]
    fn test_expired_or_wrong_audience_token_is_rejected() {
        let s = secret(&"k".repeat(40));
        let tokens = ServiceTokens::new("users", &s).unwrap();
        let key = EncodingKey::from_secret(s.expose().as_bytes());
        let now = unix_now();
        let mut claims = ServiceClaims {
            iss: "x".into(),
            sub: "x".into(),
            aud: AUDIENCE.into(),
            iat: now - 600,
            exp: now - 300,
            jti: "j".into(),
        };
        let expired = jsonwebtoken::encode(&Header::default(), &claims, &key).unwrap();
        assert!(tokens.verify(&expired).is_err());
        claims.exp = now + 60;
        claims.aud = "tiergate".into();
        let user_aud = jsonwebtoken::encode(&Header::default(), &claims, &key).unwrap();
        assert!(tokens.verify(&user_aud).is_err());
    }
}
