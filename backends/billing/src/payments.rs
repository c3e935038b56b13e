//! The payment events billing consumes: `payment.settled` records money
//! against an invoice (paid, partial, overpaid), `payment.refunded` a
//! refund. Both are idempotent by payment id, a refund by its `refund_id`
//! when it has one (a payment refunded in parts: a redelivered or re-sent
//! event changes nothing) and tolerate any order (a refund that arrives
//! before its settlement is recorded; an invoice never moves back).

use std::sync::Arc;

use async_trait::async_trait;
use sqlx::AnyConnection;

use backend_common::consumer::{Applied, Handler};
use backend_common::outbox::Event;
use backend_common::ApiError;

use crate::core::{Billing, PaymentOutcome};

/// What the payment events carry.
struct PaymentData<'a> {
    payment_id: &'a str,
    invoice_id: &'a str,
    amount: i64,
    method: Option<&'a str>,
    /// A refund's own id (a payment may be refunded in parts).
    refund_id: Option<&'a str>,
}

fn data_of(event: &Event) -> Result<PaymentData<'_>, Applied> {
    let d = &event.data;
    let (Some(payment_id), Some(invoice_id), Some(amount)) = (
        d["payment_id"].as_str(),
        d["invoice_id"].as_str(),
        d["amount"].as_i64(),
    ) else {
        return Err(Applied::rejected(
            "invalid_event",
            "payment events carry payment_id, invoice_id and an integer amount",
        ));
    };
    if amount <= 0 || payment_id.is_empty() || invoice_id.is_empty() {
        return Err(Applied::rejected(
            "invalid_event",
            "the amount must be positive and the ids non-empty",
        ));
    }
    Ok(PaymentData {
        payment_id,
        invoice_id,
        amount,
        method: d["method"].as_str(),
        refund_id: d["refund_id"].as_str().filter(|r| !r.is_empty()),
    })
}

/// `payment.settled`.
pub struct Settled(pub Arc<Billing>);

#[async_trait(?Send)]
impl Handler for Settled {
    async fn apply(&self, tx: &mut AnyConnection, event: &Event) -> Result<Applied, ApiError> {
        let p = match data_of(event) {
            Ok(p) => p,
            Err(rejected) => return Ok(rejected),
        };
        let outcome = self
            .0
            .record_payment(
                tx,
                p.payment_id,
                p.invoice_id,
                p.amount,
                p.method,
                event.occurred_at,
            )
            .await?;
        Ok(match outcome {
            PaymentOutcome::Duplicate => Applied::Stale,
            _ => Applied::Applied,
        })
    }
}

/// `payment.refunded`.
pub struct Refunded(pub Arc<Billing>);

#[async_trait(?Send)]
impl Handler for Refunded {
    async fn apply(&self, tx: &mut AnyConnection, event: &Event) -> Result<Applied, ApiError> {
        let p = match data_of(event) {
            Ok(p) => p,
            Err(rejected) => return Ok(rejected),
        };
        let fresh = self
            .0
            .record_refund(
                tx,
                p.payment_id,
                p.refund_id,
                p.invoice_id,
                p.amount,
                event.occurred_at,
            )
            .await?;
        Ok(if fresh {
            Applied::Applied
        } else {
            Applied::Stale
        })
    }
}
