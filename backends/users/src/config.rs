//! The users service's own section of `conf/services.yaml`
//! (`services.users`, beside `server` and `database`).

use std::time::Duration;

use backend_common::config::{ConfigError, ServiceConfig};
use serde::Deserialize;

/// `services.users.*` (every key optional).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct UsersConfig {
    /// Access-token lifetime (default 15m).
    #[serde(with = "humantime_serde")]
    pub access_token_ttl: Duration,
    /// Refresh-token lifetime (default 30 days).
    #[serde(with = "humantime_serde")]
    pub refresh_token_ttl: Duration,
    /// E-mail verification link lifetime (default 24h).
    #[serde(with = "humantime_serde")]
    pub verification_ttl: Duration,
    /// Password-reset link lifetime (default 1h).
    #[serde(with = "humantime_serde")]
    pub reset_ttl: Duration,
    /// Lifetime of an organization invitation link.
    #[serde(with = "humantime_serde")]
    pub invitation_ttl: Duration,
    /// `iss` of access tokens (the gateway's `auth.issuer`).
    pub issuer: String,
    /// `aud` of access tokens (the gateway's `auth.audience`).
    pub audience: String,
    /// A generated signing key is replaced after this long (default 30
    /// days); the old one stays in the JWKS until its tokens expired.
    #[serde(with = "humantime_serde")]
    pub rotate_signing_key_after: Duration,
    /// Argon2id memory cost in KiB (default 19456, OWASP's minimum).
    pub argon2_memory_kib: u32,
    /// Argon2id iterations (default 2).
    pub argon2_iterations: u32,
    /// Accounts registered with these e-mails get the `admin` role.
    pub admin_emails: Vec<String>,
    /// An operator-provided signing key (PKCS#8 PEM) from
    /// `TIERGATE_USERS_SIGNING_KEY` or `_FILE`; never from the file.
    #[serde(skip)]
    pub signing_key: Option<backend_common::secret::Secret<String>>,
}

impl Default for UsersConfig {
    fn default() -> Self {
        Self {
            access_token_ttl: Duration::from_secs(15 * 60),
            refresh_token_ttl: Duration::from_secs(30 * 24 * 3600),
            verification_ttl: Duration::from_secs(24 * 3600),
            reset_ttl: Duration::from_secs(3600),
            invitation_ttl: Duration::from_secs(7 * 24 * 3600),
            issuer: "tiergate-users".to_owned(),
            audience: "tiergate".to_owned(),
            rotate_signing_key_after: Duration::from_secs(30 * 24 * 3600),
            argon2_memory_kib: 19 * 1024,
            argon2_iterations: 2,
            admin_emails: Vec::new(),
            signing_key: None,
        }
    }
}

impl ServiceConfig for UsersConfig {
    fn read_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        self.signing_key = backend_common::config::secret_from(env, "TIERGATE_USERS_SIGNING_KEY")?;
        Ok(())
    }

    fn problems(&self) -> Vec<String> {
        let mut errors = Vec::new();
        let mut check = |ok: bool, what: &str| {
            if !ok {
                errors.push(format!("services.users.{what}"));
            }
        };
        check(
            self.access_token_ttl >= Duration::from_secs(30),
            "access_token_ttl: must be at least 30s",
        );
        check(
            self.refresh_token_ttl > self.access_token_ttl,
            "refresh_token_ttl: must be longer than access_token_ttl",
        );
        check(
            self.invitation_ttl >= Duration::from_secs(3600),
            "invitation_ttl: must be at least 1h",
        );
        check(
            self.rotate_signing_key_after >= Duration::from_secs(3600),
            "rotate_signing_key_after: must be at least 1h",
        );
        check(
            self.argon2_memory_kib >= 8 * 1024,
            "argon2_memory_kib: must be at least 8192",
        );
        check(
            self.argon2_iterations >= 1,
            "argon2_iterations: must be at least 1",
        );
        check(
            !self.issuer.is_empty() && !self.audience.is_empty(),
            "issuer: issuer and audience must not be empty",
        );
        errors
    }
}
