//! The subscriptions service (port 8022): plans in rupiah
//! (`services.subscriptions.plans`), each subject's subscription and its
//! periods in the business calendar ([`periods`]), the lifecycle's state
//! machine ([`state`]), checkouts billed through the billing service with
//! the unused part of a paid period credited, and the change applied when
//! `invoice.paid` arrives (`subscription.activated`, which the users
//! service turns into the subject's tier), and the usage the gateway
//! meters ([`usage`]: daily aggregates, reports against the plan's
//! quota).
//!
//! Layering: [`routes`] (thin Actix handlers) → [`core`] (logic) →
//! [`storage`] (SQL). It runs on the service platform
//! ([`backend_common::service`]): [`SubscriptionsService`] is its
//! description.

pub mod config;
pub mod core;
pub mod periods;
pub mod routes;
pub mod state;
pub mod storage;
pub mod tiers;
pub mod usage;

use std::sync::Arc;
use std::time::Duration;

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

pub use config::SubscriptionsConfig;

/// Its migrations (`migrations/subscriptions`).
pub static MIGRATOR: Migrator = sqlx::migrate!("../../migrations/subscriptions");

/// Settings of the subscriptions service.
pub type SubscriptionsSettings = Settings<SubscriptionsConfig>;

/// The subscriptions service, for the platform and the CLI's registry.
pub struct SubscriptionsService;

/// `invoice.paid` from billing.
struct InvoicePaid(Arc<core::Subscriptions>);

#[async_trait(?Send)]
impl Handler for InvoicePaid {
    async fn apply(&self, tx: &mut AnyConnection, event: &Event) -> Result<Applied, ApiError> {
        self.0.invoice_paid(tx, event).await
    }
}

impl Service for SubscriptionsService {
    type Config = SubscriptionsConfig;
    const NAME: &'static str = "subscriptions";
    const DEFAULT_PORT: u16 = 8022;

    fn migrator() -> &'static Migrator {
        &MIGRATOR
    }

    async fn build(p: &Platform<SubscriptionsConfig>) -> Result<Parts, String> {
        let subs = Arc::new(core::Subscriptions {
            db: p.db.clone(),
            outbox: p.outbox.clone(),
            clock: p.clock.clone(),
            calendar: p.settings.shared.calendar.clone(),
            client: p.client.clone(),
            config: p.settings.service.clone(),
            tiers: tiers::TierTable::new(&p.settings.service.gateway_config),
        });
        let consumer = Consumer::new("subscriptions").on(
            "invoice.paid",
            &["billing"],
            InvoicePaid(subs.clone()),
        );
        let data = actix_web::web::Data::from(subs.clone());
        let mut parts = Parts::new(
            routes::SubscriptionsApi::openapi(),
            Arc::new(move |cfg| {
                cfg.app_data(data.clone());
                routes::configure(cfg);
            }),
        );
        parts.consumer = Some(consumer);
        let purging = subs.clone();
        parts.housekeeping = Some(Box::new(move || {
            let subs = purging.clone();
            async move {
                match subs.purge_usage_batches().await {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(purged = n, "forgot old usage batch ids"),
                    Err(e) => tracing::warn!(error = %e, "cannot purge usage batch ids"),
                }
            }
            .boxed_local()
        }));
        parts.background = vec![scheduler(subs).boxed_local()];
        Ok(parts)
    }
}

/// How often the lifecycle scheduler looks for renewals and ended
/// periods.
const SCHEDULE_EVERY: Duration = Duration::from_secs(30);

/// Renewals, past-due and expiry, on the service's clock: a pass at
/// start (what came due while no instance ran, or what a crash left
/// half-done), then one every [`SCHEDULE_EVERY`].
async fn scheduler(subs: Arc<core::Subscriptions>) {
    let mut ticker = subs.clock.ticker();
    let mut first = true;
    loop {
        if !first {
            ticker.tick(SCHEDULE_EVERY).await;
        }
        match subs.scheduler_pass(first).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(done = n, "scheduler pass"),
            Err(e) => tracing::warn!(error = %e, "scheduler pass failed; retried shortly"),
        }
        first = false;
    }
}
