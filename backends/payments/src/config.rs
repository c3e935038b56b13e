//! The payments service's own section of `conf/services.yaml`
//! (`services.payments`, beside `server` and `database`), and the Midtrans
//! keys, which come from the environment only.

use std::time::Duration;

use backend_common::config::{secret_from, ConfigError, ServiceConfig};
use backend_common::failpoint::Failpoints;
use backend_common::secret::Secret;
use serde::Deserialize;

/// Which Midtrans: its sandbox (test money) or production.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MidtransEnvironment {
    /// `api.sandbox.midtrans.com`, keys `SB-Mid-…`.
    Sandbox,
    /// `api.midtrans.com`, keys `Mid-…`.
    Production,
}

impl MidtransEnvironment {
    /// As written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sandbox => "sandbox",
            Self::Production => "production",
        }
    }
}

/// `services.payments.midtrans`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MidtransConfig {
    /// `sandbox` (default) or `production`.
    pub environment: MidtransEnvironment,
    /// The Core API base URL; unset: the environment's. Env:
    /// `TIERGATE_MIDTRANS_API_URL` (`tiergate up --sandbox` points it at
    /// the local sandbox).
    pub api_url: Option<String>,
    /// The Snap base URL; unset: the environment's. Env:
    /// `TIERGATE_MIDTRANS_SNAP_URL`.
    pub snap_url: Option<String>,
    /// Per-call timeout.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// The server key, from `TIERGATE_MIDTRANS_SERVER_KEY` or `_FILE`
    /// only. Without it payments are disabled.
    #[serde(skip)]
    pub server_key: Option<Secret<String>>,
    /// The client key (public, for Snap.js and card tokens), from
    /// `TIERGATE_MIDTRANS_CLIENT_KEY` or `_FILE`.
    #[serde(skip)]
    pub client_key: Option<Secret<String>>,
}

impl Default for MidtransConfig {
    fn default() -> Self {
        Self {
            environment: MidtransEnvironment::Sandbox,
            api_url: None,
            snap_url: None,
            timeout: Duration::from_secs(20),
            server_key: None,
            client_key: None,
        }
    }
}

impl MidtransConfig {
    /// The Core API base URL in use.
    pub fn api_base(&self) -> &str {
        self.api_url
            .as_deref()
            .unwrap_or(match self.environment {
                MidtransEnvironment::Sandbox => "https://api.sandbox.midtrans.com",
                MidtransEnvironment::Production => "https://api.midtrans.com",
            })
            .trim_end_matches('/')
    }

    /// The Snap base URL in use.
    pub fn snap_base(&self) -> &str {
        self.snap_url
            .as_deref()
            .unwrap_or(match self.environment {
                MidtransEnvironment::Sandbox => "https://app.sandbox.midtrans.com",
                MidtransEnvironment::Production => "https://app.midtrans.com",
            })
            .trim_end_matches('/')
    }

    /// Snap.js for the frontend.
    pub fn snap_js(&self) -> String {
        format!("{}/snap/snap.js", self.snap_base())
    }
}

/// `services.payments.*` (every key optional).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct PaymentsConfig {
    /// Midtrans.
    pub midtrans: MidtransConfig,
    /// How long a virtual account, bill or Snap link can be paid (sent
    /// as `custom_expiry` / `expiry`; default 24h).
    #[serde(with = "humantime_serde")]
    pub expiry: Duration,
    /// The same for GoPay, ShopeePay and QRIS (default 15m).
    #[serde(with = "humantime_serde")]
    pub wallet_expiry: Duration,
    /// Payments the janitor re-checks per pass (default 50).
    pub janitor_batch: u32,
    /// Where Snap sends the customer back after paying (`callbacks.finish`).
    pub finish_url: Option<String>,
    /// Fail points for crash tests, from `TIERGATE_PAYMENTS_FAILPOINTS`
    /// only ([`backend_common::failpoint`]).
    #[serde(skip)]
    pub failpoints: Failpoints,
}

impl Default for PaymentsConfig {
    fn default() -> Self {
        Self {
            midtrans: MidtransConfig::default(),
            expiry: Duration::from_secs(24 * 3600),
            wallet_expiry: Duration::from_secs(15 * 60),
            janitor_batch: 50,
            finish_url: None,
            failpoints: Failpoints::default(),
        }
    }
}

fn is_http_url(u: &str) -> bool {
    (u.starts_with("http://") || u.starts_with("https://")) && u.len() > "https://".len()
}

impl ServiceConfig for PaymentsConfig {
    fn read_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        let m = &mut self.midtrans;
        match secret_from(env, "TIERGATE_MIDTRANS_SERVER_KEY") {
            Ok(k) => m.server_key = k.filter(|k| !k.expose().trim().is_empty()),
            Err(e) => errors.extend(e.0),
        }
        match secret_from(env, "TIERGATE_MIDTRANS_CLIENT_KEY") {
            Ok(k) => m.client_key = k.filter(|k| !k.expose().trim().is_empty()),
            Err(e) => errors.extend(e.0),
        }
        if let Some(u) = env("TIERGATE_MIDTRANS_API_URL") {
            m.api_url = Some(u);
        }
        if let Some(u) = env("TIERGATE_MIDTRANS_SNAP_URL") {
            m.snap_url = Some(u);
        }
        if let Some(e) = env("TIERGATE_MIDTRANS_ENVIRONMENT") {
            match e.as_str() {
                "sandbox" => m.environment = MidtransEnvironment::Sandbox,
                "production" => m.environment = MidtransEnvironment::Production,
                other => errors.push(format!(
                    "TIERGATE_MIDTRANS_ENVIRONMENT: `{other}` is neither sandbox nor production"
                )),
            }
        }
        if let Some(spec) = env("TIERGATE_PAYMENTS_FAILPOINTS") {
            match Failpoints::parse(&spec) {
                Ok(f) => self.failpoints = f,
                Err(e) => errors.push(format!("TIERGATE_PAYMENTS_FAILPOINTS: {e}")),
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError(errors))
        }
    }

    fn problems(&self) -> Vec<String> {
        let mut errors = Vec::new();
        let mut check = |ok: bool, what: &str| {
            if !ok {
                errors.push(format!("services.payments.{what}"));
            }
        };
        let m = &self.midtrans;
        for (url, key) in [(&m.api_url, "api_url"), (&m.snap_url, "snap_url")] {
            if let Some(u) = url {
                check(
                    is_http_url(u),
                    &format!("midtrans.{key}: an http(s) URL (`{u}`)"),
                );
            }
        }
        check(
            (Duration::from_secs(1)..=Duration::from_secs(120)).contains(&m.timeout),
            "midtrans.timeout: 1s to 2m",
        );
        // A sandbox key against production (or the reverse) is refused by
        // Midtrans with 401 on every call: say so at start instead.
        if let Some(k) = &m.server_key {
            let sandbox_key = k.expose().starts_with("SB-");
            check(
                sandbox_key == (m.environment == MidtransEnvironment::Sandbox),
                &format!(
                    "midtrans.environment: `{}` does not match the server key \
                     (sandbox keys start with SB-Mid-server-, production ones with Mid-server-)",
                    m.environment.as_str()
                ),
            );
        }
        check(
            (Duration::from_secs(60)..=Duration::from_secs(60 * 24 * 3600)).contains(&self.expiry),
            "expiry: 1m to 60 days",
        );
        check(
            (Duration::from_secs(60)..=Duration::from_secs(24 * 3600))
                .contains(&self.wallet_expiry),
            "wallet_expiry: 1m to 24h",
        );
        check(
            (1..=1000).contains(&self.janitor_batch),
            "janitor_batch: 1 to 1000",
        );
        if let Some(u) = &self.finish_url {
            check(is_http_url(u), "finish_url: an http(s) URL");
        }
        errors
    }
}
