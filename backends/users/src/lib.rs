//! The users service (port 8021): registration with e-mail verification,
//! login (Argon2id), EdDSA access tokens with a `kid` and a JWKS, rotating
//! refresh tokens with reuse detection, password reset, profiles, roles,
//! organizations (teams with members, invitations and a tenant admin;
//! [`orgs`]), and the tier of each user and organization kept in step with
//! subscription events.
//!
//! Layering: [`routes`] (thin Actix handlers) → [`core`] (logic) →
//! [`storage`] (SQL). It runs on the service platform
//! ([`backend_common::service`]): [`UsersService`] is its description.
#![deny(missing_docs)]

pub mod config;
pub mod core;
pub mod error;
pub mod keys;
pub mod orgs;
pub mod pages;
pub mod password;
pub mod routes;
pub mod storage;
pub mod tier_feed;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use sqlx::migrate::Migrator;
use utoipa::OpenApi;

use backend_common::config::Settings;
use backend_common::consumer::Consumer;
use backend_common::service::{Parts, Platform, Service};
use backend_common::user_auth::{Refused, UserClaims, UserTokens};

pub use config::UsersConfig;

/// Its migrations (`migrations/users`).
pub static MIGRATOR: Migrator = sqlx::migrate!("../../migrations/users");

/// Settings of the users service.
pub type UsersSettings = Settings<UsersConfig>;

/// The users service, for the platform and the CLI's registry.
pub struct UsersService;

impl Service for UsersService {
    type Config = UsersConfig;
    const NAME: &'static str = "users";
    const DEFAULT_PORT: u16 = 8021;

    fn migrator() -> &'static Migrator {
        &MIGRATOR
    }

    async fn build(p: &Platform<UsersConfig>) -> Result<Parts, String> {
        let settings = &p.settings;
        let cfg = settings.service.clone();
        let signer = Arc::new(signer(settings)?);
        // A key older than the rotation period is replaced at start.
        signer.maintain(p.clock.now_ms(), false)?;
        let hasher = password::Hasher::new(cfg.argon2_memory_kib, cfg.argon2_iterations)?;
        let users = actix_web::web::Data::new(core::Users {
            db: p.db.clone(),
            signer: signer.clone(),
            hasher,
            outbox: p.outbox.clone(),
            config: cfg,
            public_url: settings.shared.public_url.clone(),
            environment: settings.shared.environment,
            clock: p.clock.clone(),
        });
        let key_maintenance = {
            let (signer, clock) = (signer.clone(), p.clock.clone());
            async move {
                let mut ticker = clock.ticker();
                loop {
                    ticker.tick(Duration::from_secs(60)).await;
                    if let Err(e) = signer.maintain(clock.now_ms(), false) {
                        tracing::error!(error = %e, "signing-key maintenance failed");
                    }
                }
            }
            .boxed_local()
        };
        let purger = users.clone();
        let changed = Arc::new(tier_feed::Changed::default());
        let tier_events = |ended| core::TierEvents {
            ended,
            clock: p.clock.clone(),
            changed: changed.clone(),
        };
        let consumer = Consumer::new("users")
            .on(
                "subscription.activated",
                &["subscriptions"],
                tier_events(false),
            )
            .on(
                "subscription.renewed",
                &["subscriptions"],
                tier_events(false),
            )
            .on("subscription.ended", &["subscriptions"], tier_events(true));
        let routes_users = users.clone();
        let mut openapi = routes::UsersApi::openapi();
        openapi.merge(orgs::routes::OrgsApi::openapi());
        let mut parts = Parts::new(
            openapi,
            Arc::new(move |cfg| {
                cfg.app_data(routes_users.clone())
                    .app_data(actix_web::web::Data::from(changed.clone()));
                routes::configure(cfg);
                orgs::routes::configure(cfg);
                pages::configure(cfg);
            }),
        );
        parts.consumer = Some(consumer);
        parts.user_tokens = Some(Arc::new(OwnTokens(signer)));
        parts.background = vec![key_maintenance];
        parts.housekeeping = Some(Box::new(move || {
            let purger = purger.clone();
            async move {
                match purger.purge().await {
                    Ok(n) => tracing::debug!(rows = n, "purged used and expired tokens"),
                    Err(e) => tracing::warn!(error = %e, "purging expired tokens failed"),
                }
            }
            .boxed_local()
        }));
        Ok(parts)
    }
}

/// The users service checks access tokens against its own keys.
struct OwnTokens(Arc<keys::Signer>);

impl UserTokens for OwnTokens {
    fn verify<'a>(
        &'a self,
        token: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<UserClaims, Refused>> + 'a>> {
        let claims = self
            .0
            .verify(token)
            .map_err(Refused::Invalid)
            .map(|c| UserClaims {
                user_id: c.sub,
                tier: c.tier,
                roles: c.roles,
                tenant: c.tenant,
                tenant_role: c.tenant_role,
                sid: c.sid,
            });
        Box::pin(std::future::ready(claims))
    }
}

/// Forces a signing-key rotation in the data directory (`tiergate users
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
    signer.maintain(backend_common::clock::system_now_ms(), true)?;
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
