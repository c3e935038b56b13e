//! The notifications service (port 8024): every event a customer should
//! hear about reaches them on the channel they chose — Telegram (many
//! bots, [`telegram`]), e-mail ([`email`]) or SMS ([`sms`]) — through one
//! durable queue with retries, provider hints, fallback to the next
//! channel and rate shaping ([`core`]), per the user's preferences and
//! quiet hours ([`prefs`]), in their language ([`templates`]).
//!
//! Layering: [`routes`] (thin Actix handlers) → [`core`] (logic) →
//! [`storage`] (SQL). It runs on the service platform
//! ([`backend_common::service`]): [`NotificationsService`] is its
//! description. [`standin`] holds the Telegram Bot API and Twilio
//! stand-ins the tests, benchmarks and `tiergate up --sandbox` use.

pub mod config;
pub mod core;
pub mod email;
pub mod mailbox;
pub mod phone;
pub mod prefs;
pub mod routes;
pub mod sms;
pub mod standin;
pub mod storage;
pub mod telegram;
pub mod templates;

use std::sync::Arc;

use async_trait::async_trait;
use futures_util::FutureExt;
use sqlx::migrate::Migrator;
use sqlx::AnyConnection;
use utoipa::OpenApi;

use backend_common::config::Settings;
use backend_common::consumer::{Applied, Consumer, Handler};
use backend_common::outbox::Event;
use backend_common::service::{Parts, Platform, Service};
use backend_common::ApiError;

pub use config::NotificationsConfig;

/// Its migrations (`migrations/notifications`).
pub static MIGRATOR: Migrator = sqlx::migrate!("../../migrations/notifications");

/// Settings of the notifications service.
pub type NotificationsSettings = Settings<NotificationsConfig>;

/// Where mails are written without an SMTP server: `email.mail_dir`, else
/// `<data_dir>/mail`.
pub fn mail_dir(config: &NotificationsConfig, data_dir: &std::path::Path) -> std::path::PathBuf {
    config
        .email
        .mail_dir
        .clone()
        .unwrap_or_else(|| data_dir.join("mail"))
}

/// The notifications service, for the platform and the CLI's registry.
pub struct NotificationsService;

/// Every consumed event: its jobs, in the consumer's transaction.
#[derive(Clone)]
struct Plan(Arc<core::Notifications>);

#[async_trait(?Send)]
impl Handler for Plan {
    async fn apply(&self, tx: &mut AnyConnection, event: &Event) -> Result<Applied, ApiError> {
        self.0.plan(tx, event).await
    }

    /// The worker looks at once: the jobs are committed.
    fn committed(&self, _event: &Event) {
        self.0.wake.notify_one();
    }
}

impl Service for NotificationsService {
    type Config = NotificationsConfig;
    const NAME: &'static str = "notifications";
    const DEFAULT_PORT: u16 = 8024;

    fn migrator() -> &'static Migrator {
        &MIGRATOR
    }

    async fn build(p: &Platform<NotificationsConfig>) -> Result<Parts, String> {
        let n = Arc::new(core::Notifications::new(core::Parts {
            db: p.db.clone(),
            clock: p.clock.clone(),
            client: p.client.clone(),
            config: p.settings.service.clone(),
            calendar: p.settings.shared.calendar.clone(),
            public_url: p.settings.shared.public_url.clone(),
            data_dir: p.settings.shared.data_dir.clone(),
            keys: p.keys.clone(),
            metrics: p.metrics.clone(),
        })?);
        n.load_bots().await?;
        let mut consumer = Consumer::new("notifications");
        for (event_type, producers) in core::CONSUMED {
            consumer = consumer.on(event_type, producers, Plan(n.clone()));
        }
        let data = actix_web::web::Data::from(n.clone());
        let mut parts = Parts::new(
            routes::NotificationsApi::openapi(),
            Arc::new(move |cfg| {
                cfg.app_data(data.clone());
                routes::configure(cfg);
            }),
        );
        parts.consumer = Some(consumer);
        parts.health = vec![
            ("email", n.mailer.describe()),
            (
                "telegram",
                match (&n.config.telegram.bot_token, &n.config.telegram.webhook_url) {
                    (None, _) => "no default bot".to_owned(),
                    (Some(_), Some(_)) => "webhook".to_owned(),
                    (Some(_), None) => "long polling".to_owned(),
                },
            ),
            (
                "sms",
                if n.twilio.is_some() {
                    "twilio"
                } else {
                    "disabled"
                }
                .to_owned(),
            ),
        ];
        let purging = n.clone();
        parts.housekeeping = Some(Box::new(move || {
            let n = purging.clone();
            async move {
                match n.purge().await {
                    Ok(0) => {}
                    Ok(k) => tracing::debug!(purged = k, "forgot expired link codes"),
                    Err(e) => tracing::warn!(error = %e, "cannot purge link codes"),
                }
            }
            .boxed_local()
        }));
        tracing::info!(email = %n.mailer.describe(), "notifications ready");
        parts.background = vec![
            n.clone().run_worker().boxed_local(),
            n.run_bots().boxed_local(),
        ];
        Ok(parts)
    }
}
