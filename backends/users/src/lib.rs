//! The users service (port 8021): registration with e-mail verification,
//! login (Argon2id), EdDSA access tokens with a `kid` and a JWKS, rotating
//! refresh tokens with reuse detection, password reset, profiles, roles,
//! and the user's tier kept in step with subscription events.
//!
//! Layering: [`routes`] (thin Actix handlers) → [`core`] (logic) →
//! [`storage`] (SQL).
#![deny(missing_docs)]

pub mod config;
pub mod core;
pub mod error;
pub mod keys;
pub mod password;
pub mod routes;
pub mod storage;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use sqlx::migrate::Migrator;
use utoipa::OpenApi;

use backend_common::app::{self, RunningService, ServiceDef, StartError};
use backend_common::config::{self as settings, ConfigError, Environment, Settings};
use backend_common::db::{now_ms, Db, DbError};
use backend_common::metrics::HttpMetrics;
use backend_common::outbox::{DispatchSettings, Outbox};
use backend_common::service_auth::ServiceTokens;

pub use config::UsersConfig;

/// The service's name.
pub const NAME: &str = "users";
/// Its standard port.
pub const DEFAULT_PORT: u16 = 8021;
/// Its migrations (`migrations/users`).
pub static MIGRATOR: Migrator = sqlx::migrate!("../../migrations/users");

/// Settings of the users service.
pub type UsersSettings = Settings<UsersConfig>;

/// Reads settings from `file` (optional) and the process environment;
/// `environment` applies when neither names one.
pub fn load_settings(
    file: Option<&Path>,
    environment: Environment,
) -> Result<UsersSettings, ConfigError> {
    let mut s: UsersSettings = settings::load(
        NAME,
        DEFAULT_PORT,
        file,
        &settings::process_env,
        environment,
    )?;
    s.service.signing_key =
        settings::secret_from(&settings::process_env, "TIERGATE_USERS_SIGNING_KEY")?;
    s.service.validate().map_err(ConfigError)?;
    Ok(s)
}

/// Applies the migrations and returns.
pub async fn migrate(settings: &UsersSettings) -> Result<(), DbError> {
    let db = Db::connect(&settings.database_url, 1).await?;
    let result = db.migrate(&MIGRATOR).await;
    db.close().await;
    result
}

/// Forces a signing-key rotation in the data directory (`tiergate
/// rotate-signing-key`): a new key signs from now on, in every process
/// sharing the directory within a minute (they re-read the key file), and
/// the previous key stays published until its tokens expire. Returns the
/// published key ids, newest first.
pub fn rotate_signing_key(settings: &UsersSettings) -> Result<Vec<String>, String> {
    let cfg = &settings.service;
    if cfg.signing_key.is_some() {
        return Err(
            "TIERGATE_USERS_SIGNING_KEY is set: that key is managed outside tiergate; \
             replace it there"
                .to_owned(),
        );
    }
    let signer = signer(settings)?;
    signer.maintain(now_ms(), true)?;
    Ok(signer.kids())
}

fn signer(settings: &UsersSettings) -> Result<keys::Signer, String> {
    let cfg = &settings.service;
    keys::Signer::load(
        &settings.shared.data_dir,
        cfg.signing_key.clone(),
        cfg.access_token_ttl,
        cfg.rotate_signing_key_after,
        &cfg.issuer,
        &cfg.audience,
    )
}

/// How often used and expired tokens are purged.
const PURGE_INTERVAL: Duration = Duration::from_secs(3600);

/// Starts the service (migrating its database first) and returns once it
/// accepts connections.
pub fn start(settings: UsersSettings) -> Result<RunningService, StartError> {
    start_with(settings, DispatchSettings::default())
}

/// [`start`] with explicit outbox dispatch settings (tests use short
/// backoffs).
pub fn start_with(
    settings: UsersSettings,
    dispatch: DispatchSettings,
) -> Result<RunningService, StartError> {
    settings.service.validate().map_err(StartError::Init)?;
    let server = settings.server.clone();
    app::start(server, move || async move {
        let init = |e: String| StartError::Init(e);
        let db = Db::connect(&settings.database_url, settings.max_connections)
            .await
            .map_err(|e| init(e.to_string()))?;
        db.migrate(&MIGRATOR)
            .await
            .map_err(|e| init(e.to_string()))?;
        let cfg = settings.service.clone();
        let signer = Arc::new(signer(&settings).map_err(init)?);
        // A key older than the rotation period is replaced at start.
        signer.maintain(now_ms(), false).map_err(init)?;
        let hasher =
            password::Hasher::new(cfg.argon2_memory_kib, cfg.argon2_iterations).map_err(init)?;
        let tokens = ServiceTokens::new(NAME, &settings.shared.service_secret).map_err(init)?;
        let metrics = HttpMetrics::new(NAME);
        let outbox = Outbox::new(NAME, settings.shared.events.clone());
        let users = actix_web::web::Data::new(core::Users {
            db: db.clone(),
            signer: signer.clone(),
            hasher,
            outbox: outbox.clone(),
            config: cfg,
            public_url: settings.shared.public_url.clone(),
            environment: settings.shared.environment,
            metrics: metrics.clone(),
        });
        let purger = users.clone();
        let purge = async move {
            let mut tick = tokio::time::interval(PURGE_INTERVAL);
            loop {
                tick.tick().await;
                match purger.purge().await {
                    Ok(n) => tracing::debug!(rows = n, "purged used and expired tokens"),
                    Err(e) => tracing::warn!(error = %e, "purging expired tokens failed"),
                }
            }
        }
        .boxed_local();
        let dispatcher = outbox
            .dispatch(db.clone(), tokens.clone(), metrics.clone(), dispatch)
            .boxed_local();
        let key_maintenance = async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                if let Err(e) = signer.maintain(now_ms(), false) {
                    tracing::error!(error = %e, "signing-key maintenance failed");
                }
            }
        }
        .boxed_local();
        Ok(ServiceDef {
            name: NAME,
            openapi: routes::UsersApi::openapi(),
            db,
            metrics,
            tokens,
            routes: Arc::new(move |cfg| {
                cfg.app_data(users.clone());
                routes::configure(cfg);
            }),
            background: vec![dispatcher, key_maintenance, purge],
        })
    })
}
