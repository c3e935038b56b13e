//! The billing service (port 8025): invoices numbered without gaps at
//! issue (`INV/2026/11/000123`), PPN on a DPP of 11/12 ([`tax`]), A4 PDF
//! invoices and credit notes with embedded fonts ([`pdf`]), payments
//! recorded against invoices from payment events ([`payments`]),
//! overpayments to resolve, the daily reconciliation and revenue reports
//! ([`reports`]).
//!
//! Layering: [`routes`] (thin Actix handlers) → [`core`] (logic) →
//! [`storage`] (SQL). It runs on the service platform
//! ([`backend_common::service`]): [`BillingService`] is its description.

pub mod config;
pub mod core;
pub mod payments;
pub mod pdf;
pub mod reports;
pub mod routes;
pub mod storage;
pub use backend_common::tax;

use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use prometheus::{IntGaugeVec, Opts};
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
        let mismatches = IntGaugeVec::new(
            Opts::new(
                "billing_reconciliation_mismatches",
                "Mismatches of the last business day the daily reconciliation closed, by kind",
            ),
            &["kind"],
        )
        .map_err(|e| e.to_string())?;
        p.metrics
            .register(mismatches.clone())
            .map_err(|e| e.to_string())?;
        parts.background = vec![
            billing.clone().renderer().boxed_local(),
            reconciler(billing, mismatches).boxed_local(),
        ];
        Ok(parts)
    }
}

/// How often the reconciler looks for a day to close.
const RECONCILE_EVERY: Duration = Duration::from_secs(300);

/// The daily reconciliation: closes each finished business day once and
/// sets the mismatch gauge to the last closed day's counts.
async fn reconciler(billing: Arc<core::Billing>, gauge: IntGaugeVec) {
    let set = |counts: &std::collections::BTreeMap<String, usize>| {
        for (kind, n) in counts {
            gauge
                .with_label_values(&[kind.as_str()])
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
    };
    // After a restart the gauge shows the last day closed before it.
    match billing.last_closed_counts().await {
        Ok(Some(counts)) => set(&counts),
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the last reconciliation"),
    }
    let mut ticker = billing.clock.ticker();
    loop {
        match billing.close_days().await {
            Ok(Some(report)) => set(&report.summary.by_kind),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "reconciliation failed; retried shortly"),
        }
        ticker.tick(RECONCILE_EVERY).await;
    }
}
