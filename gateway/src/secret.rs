//! Secrets and the settings that come only from the environment.

use std::fmt;

use crate::config::RedisUrl;

/// A secret string: never printed by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// The secret itself, only where it is used.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Settings read from the environment rather than the YAML file.
#[derive(Debug, Clone, Default)]
pub struct Environment {
    /// `TIERGATE_DEV_JWT_SECRET`: enables HS256 tokens (development only).
    pub dev_jwt_secret: Option<Secret>,
    /// `TIERGATE_REDIS_URL`: overrides `rate_limit.redis.url`.
    pub redis_url: Option<RedisUrl>,
}

impl Environment {
    /// Reads the process environment. An invalid `TIERGATE_REDIS_URL` is an
    /// error (silently running with local limits would hide it).
    pub fn from_env() -> Result<Self, String> {
        let dev_jwt_secret = std::env::var("TIERGATE_DEV_JWT_SECRET")
            .ok()
            .filter(|s| !s.is_empty())
            .map(Secret::new);
        let redis_url = match std::env::var("TIERGATE_REDIS_URL") {
            Ok(u) if !u.is_empty() => {
                Some(RedisUrl::parse(&u).map_err(|why| format!("TIERGATE_REDIS_URL: {why}"))?)
            }
            _ => None,
        };
        Ok(Self {
            dev_jwt_secret,
            redis_url,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_secret_is_redacted() {
        let s = Secret::new("hunter2".into());
        assert!(!format!("{s:?} {s}").contains("hunter2"));
        assert_eq!(s.expose(), "hunter2");
    }
}
