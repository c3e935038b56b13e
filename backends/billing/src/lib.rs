//! The billing service (port 8025): invoices numbered without gaps at
//! issue (`INV/2026/11/000123`), PPN on a DPP of 11/12 ([`tax`]), A4 PDF
//! invoices and credit notes with embedded fonts ([`pdf`]), payments
//! recorded against invoices from payment events ([`payments`]),
//! overpayments to resolve.
//!
//! Layering: [`routes`] (thin Actix handlers) → [`core`] (logic) →
//! [`storage`] (SQL). It runs on the service platform
//! ([`backend_common::service`]): [`BillingService`] is its description.

pub mod config;
pub mod core;
pub mod payments;
pub mod pdf;
pub mod routes;
pub mod storage;
pub mod tax;

use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use sqlx::migrate::Migrator;
use utoipa::OpenApi;

use backend_common::blocking::Bounded;
use backend_common::config::Settings;
use backend_common::consumer::Consumer;
use backend_common::service::{Parts, Platform, Service};

pub use config::BillingConfig;

/// Its migrations (`migrations/billing`).
pub static MIGRATOR: Migrator = sqlx::migrate!("../../migrations/billing");

/// Settings of the billing service.
pub type BillingSettings = Settings<BillingConfig>;

/// The billing service, for the platform and the CLI's registry.
pub struct BillingService;

impl Service for BillingService {
    type Config = BillingConfig;
    const NAME: &'static str = "billing";
    const DEFAULT_PORT: u16 = 8025;

    fn migrator() -> &'static Migrator {
        &MIGRATOR
    }

    async fn build(p: &Platform<BillingConfig>) -> Result<Parts, String> {
        let cfg = p.settings.service.clone();
        let billing = Arc::new(core::Billing {
            db: p.db.clone(),
            outbox: p.outbox.clone(),
            clock: p.clock.clone(),
            calendar: p.settings.shared.calendar.clone(),
            client: p.client.clone(),
            renderers: Bounded::new(
                "pdf rendering",
                cfg.render_threads,
                64,
                Duration::from_secs(10),
            ),
            config: cfg,
            render_wake: Arc::default(),
        });
        let consumer = Consumer::new("billing")
            .on(
                "payment.settled",
                &["payments"],
                payments::Settled(billing.clone()),
            )
            .on(
                "payment.refunded",
                &["payments"],
                payments::Refunded(billing.clone()),
            );
        let data = actix_web::web::Data::from(billing.clone());
        let mut parts = Parts::new(
            routes::BillingApi::openapi(),
            Arc::new(move |cfg| {
                cfg.app_data(data.clone());
                routes::configure(cfg);
            }),
        );
        parts.consumer = Some(consumer);
        parts.background = vec![billing.renderer().boxed_local()];
        Ok(parts)
    }
}
