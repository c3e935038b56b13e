//! Secrets and the settings that come only from the environment.

use std::fmt;

use crate::config::{Config, RedisUrl, RunMode};

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

/// Settings from outside the YAML file: environment variables, and the
/// run mode the command implies.
#[derive(Debug, Clone, Default)]
pub struct Environment {
    /// `TIERGATE_DEV_JWT_SECRET`: enables HS256 tokens (development only).
    pub dev_jwt_secret: Option<Secret>,
    /// `TIERGATE_REDIS_URL`: overrides `rate_limit.redis.url`.
    pub redis_url: Option<RedisUrl>,
    /// `TIERGATE_ADMIN_TOKEN` (or the file `TIERGATE_ADMIN_TOKEN_FILE`
    /// names): the bearer token the admin listener requires.
    pub admin_token: Option<Secret>,
    /// `TIERGATE_GATEWAY_SERVICE_KEY` (or the file
    /// `TIERGATE_GATEWAY_SERVICE_KEY_FILE` names): the gateway's Ed25519
    /// service key (PKCS#8 PEM), which signs its calls to services (the
    /// usage batches).
    pub service_key: Option<Secret>,
    /// The run mode when the config sets no `environment`: production for
    /// `tiergate gateway`, development for `tiergate up`.
    pub default_mode: RunMode,
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
        let admin_token = secret_from_env_or_file("TIERGATE_ADMIN_TOKEN")?;
        let service_key = secret_from_env_or_file("TIERGATE_GATEWAY_SERVICE_KEY")?;
        Ok(Self {
            dev_jwt_secret,
            redis_url,
            admin_token,
            service_key,
            default_mode: RunMode::Production,
        })
    }

    /// The run mode of `config` under this environment.
    pub fn mode(&self, config: &Config) -> RunMode {
        RunMode::of(config, self.default_mode)
    }
}

/// `NAME` from the environment, else the content of the file
/// `NAME_FILE` names (trimmed); empty counts as unset. An unreadable file
/// is an error.
fn secret_from_env_or_file(name: &str) -> Result<Option<Secret>, String> {
    if let Ok(v) = std::env::var(name) {
        if !v.trim().is_empty() {
            return Ok(Some(Secret::new(v.trim().to_owned())));
        }
    }
    let file_var = format!("{name}_FILE");
    match std::env::var(&file_var) {
        Ok(path) if !path.is_empty() => {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("{file_var}: cannot read {path}: {e}"))?;
            let text = text.trim();
            Ok((!text.is_empty()).then(|| Secret::new(text.to_owned())))
        }
        _ => Ok(None),
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
