//! The payments service (port 8023): invoices paid through Midtrans (Snap
//! and the Core API), verified webhooks, a monotonic state machine,
//! refunds, a janitor for lost notifications, and a local Midtrans
//! sandbox.
//!
//! - [`midtrans`]: the contract as pure functions (auth header, signature,
//!   order ids, amounts, statuses); [`charge`]: each method's charge body
//!   and what the customer needs from the answer; [`client`]: the HTTP
//!   client; [`sandbox`]: the stand-in (`tiergate sandbox`).
//! - [`state`]: the state machine; [`core`]: the logic (the one place a
//!   confirmed status moves a payment); [`storage`]: SQL; [`routes`]: thin
//!   Actix handlers. It runs on the service platform
//!   ([`backend_common::service`]): [`PaymentsService`] is its description.

pub mod charge;
pub mod client;
pub mod config;
pub mod core;
pub mod midtrans;
pub mod routes;
pub mod sandbox;
pub mod state;
pub mod storage;

use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use sqlx::migrate::Migrator;
use utoipa::OpenApi;

use backend_common::config::Settings;
use backend_common::service::{Parts, Platform, Service};

pub use config::PaymentsConfig;

/// Its migrations (`migrations/payments`).
pub static MIGRATOR: Migrator = sqlx::migrate!("../../migrations/payments");

/// Settings of the payments service.
pub type PaymentsSettings = Settings<PaymentsConfig>;

/// The payments service, for the platform and the CLI's registry.
pub struct PaymentsService;

/// How often the janitor looks for payments to re-check.
const JANITOR_EVERY: Duration = Duration::from_secs(30);

impl Service for PaymentsService {
    type Config = PaymentsConfig;
    const NAME: &'static str = "payments";
    const DEFAULT_PORT: u16 = 8023;

    fn migrator() -> &'static Migrator {
        &MIGRATOR
    }

    async fn build(p: &Platform<PaymentsConfig>) -> Result<Parts, String> {
        let cfg = p.settings.service.clone();
        let metrics = core::PaymentMetrics::register(&p.metrics)?;
        let midtrans = match &cfg.midtrans.server_key {
            Some(key) => Some(
                client::Midtrans::new(&cfg.midtrans, key)?
                    .with_latency(metrics.midtrans_latency.clone()),
            ),
            None => {
                tracing::warn!(
                    "payments are disabled: set TIERGATE_MIDTRANS_SERVER_KEY (or _FILE) to take payments"
                );
                None
            }
        };
        let state = match (&midtrans, cfg.midtrans.environment) {
            (None, _) => "disabled".to_owned(),
            (Some(_), env) => format!("{} ({})", env.as_str(), cfg.midtrans.api_base()),
        };
        let payments = Arc::new(core::Payments {
            db: p.db.clone(),
            outbox: p.outbox.clone(),
            clock: p.clock.clone(),
            client: p.client.clone(),
            midtrans,
            metrics,
            config: cfg,
        });
        let data = actix_web::web::Data::from(payments.clone());
        let mut parts = Parts::new(
            routes::PaymentsApi::openapi(),
            Arc::new(move |cfg| {
                cfg.app_data(data.clone());
                routes::configure(cfg);
            }),
        );
        parts.health = vec![("midtrans", state)];
        parts.background = vec![janitor(payments.clone()).boxed_local()];
        let kept = payments.clone();
        parts.housekeeping = Some(Box::new(move || kept.clone().housekeeping().boxed_local()));
        Ok(parts)
    }
}

/// Re-checks payments still waiting, so a lost notification still settles
/// or expires them.
async fn janitor(payments: Arc<core::Payments>) {
    let mut ticker = payments.clock.ticker();
    loop {
        ticker.tick(JANITOR_EVERY).await;
        match payments.janitor_pass().await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(checked = n, "janitor pass"),
            Err(e) => tracing::warn!(error = %e, "janitor pass failed; retried shortly"),
        }
    }
}
