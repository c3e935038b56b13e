//! The payments logic: paying an invoice at Midtrans once however often
//! the request is retried or the process dies, the one place a confirmed
//! Midtrans status moves a payment ([`Payments::apply`]), webhooks,
//! cancellation, refunds, the janitor's check.
//!
//! **Crash safety.** A payment row (state `created`, its `order_id` and
//! the charge body) is committed *before* Midtrans is called, and the
//! charge carries the payment id as its `Idempotency-Key`. A crash after
//! the charge and before our commit leaves `created`: the client's retry
//! (same key) or the janitor asks Midtrans for the order first and adopts
//! what it finds; only an order Midtrans does not know is charged (again).
//! Nothing is ever charged twice under one `order_id`, and a new attempt
//! (a new `order_id`) is made only after the open one is cancelled.

use std::sync::Arc;

use actix_web::http::StatusCode;
use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use backend_common::client::ServiceClient;
use backend_common::clock::Clock;
use backend_common::db::{on_constraint, Db};
use backend_common::outbox::Outbox;
use backend_common::user_auth::{Subject, UserClaims};
use backend_common::{ApiError, FieldError};

use crate::charge::{refundable, Charge, Customer, Instructions, Method};
use crate::client::{Midtrans, MidtransError};
use crate::config::PaymentsConfig;
use crate::midtrans::{self, parse_amount, FraudStatus, TransactionStatus};
use crate::sandbox::wib;
use crate::state::{self, State, Step};
use crate::storage::{self, PaymentRow, RefundRow};

type Api<T> = Result<T, ApiError>;

/// A request holding an idempotency key is presumed dead this long after
/// its Midtrans call would have timed out (a retry then takes over: safe,
/// since a taken-over payment is looked up at Midtrans before any charge).
const LOCK_SLACK_MS: i64 = 2_000;
/// A `created` payment Midtrans does not know is given up after this long
/// (the charge never reached Midtrans).
const RECOVER_AFTER_MS: i64 = 120_000;
/// Answers of `POST /api/payments` are replayed this long.
pub const REQUESTS_KEPT_MS: i64 = 48 * 3600 * 1000;
/// The janitor's re-checks of a payment still waiting, one after another
/// (then every 2h, and once just after it expires).
const CHECKS_MS: [i64; 4] = [60_000, 300_000, 1_800_000, 7_200_000];
/// After the expiry, this long before the janitor expires it at Midtrans.
const EXPIRY_GRACE_MS: i64 = 600_000;

/// The service's counters.
#[derive(Clone)]
pub struct PaymentMetrics {
    /// Webhooks by outcome.
    pub webhooks: IntCounterVec,
    /// Confirmed amounts or currencies that differ from ours.
    pub mismatches: IntCounter,
    /// Moves by target state.
    pub transitions: IntCounterVec,
    /// Midtrans round trips, by operation and outcome.
    pub midtrans_latency: HistogramVec,
}

impl PaymentMetrics {
    /// Registers them with the service's metrics.
    pub fn register(m: &backend_common::metrics::HttpMetrics) -> Result<Self, String> {
        let webhooks = IntCounterVec::new(
            Opts::new(
                "payments_webhooks_total",
                "Midtrans notifications received, by outcome",
            ),
            &["outcome"],
        )
        .map_err(|e| e.to_string())?;
        let mismatches = IntCounter::new(
            "payments_amount_mismatches_total",
            "Payments Midtrans confirmed with another amount or currency (flagged, never settled)",
        )
        .map_err(|e| e.to_string())?;
        let transitions = IntCounterVec::new(
            Opts::new(
                "payments_transitions_total",
                "Payment state changes, by new state",
            ),
            &["state"],
        )
        .map_err(|e| e.to_string())?;
        let midtrans_latency = HistogramVec::new(
            HistogramOpts::new(
                "payments_midtrans_request_seconds",
                "Midtrans API round trips, by operation (charge, snap, status, cancel, expire, refund) and outcome",
            )
            .buckets(vec![
                0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ]),
            &["operation", "outcome"],
        )
        .map_err(|e| e.to_string())?;
        m.register(webhooks.clone()).map_err(|e| e.to_string())?;
        m.register(midtrans_latency.clone())
            .map_err(|e| e.to_string())?;
        m.register(mismatches.clone()).map_err(|e| e.to_string())?;
        m.register(transitions.clone()).map_err(|e| e.to_string())?;
        Ok(Self {
            webhooks,
            mismatches,
            transitions,
            midtrans_latency,
        })
    }
}

/// The payments service's state.
pub struct Payments {
    /// Its database.
    pub db: Db,
    /// Its outbox.
    pub outbox: Outbox,
    /// Its clock.
    pub clock: Clock,
    /// Calls to billing.
    pub client: ServiceClient,
    /// Midtrans; `None` without a server key (payments disabled).
    pub midtrans: Option<Midtrans>,
    /// Its settings.
    pub config: PaymentsConfig,
    /// Its counters.
    pub metrics: PaymentMetrics,
}

/// A payment as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Payment {
    /// Id.
    pub id: String,
    /// The invoice it pays.
    pub invoice_id: String,
    /// Its number.
    pub invoice_number: String,
    /// Midtrans's `order_id`: the invoice number and the attempt.
    pub order_id: String,
    /// 1, 2, … per invoice.
    pub attempt: i32,
    /// The method chosen (`snap`, `bca_va`, …).
    pub method: String,
    /// What Midtrans says was used (`bank_transfer`, `credit_card`, …).
    pub channel: Option<String>,
    /// `created`, `pending`, `challenge`, `captured`, `settled`,
    /// `partially_refunded`, `refunded`, `denied`, `cancelled`, `expired`,
    /// `failed`, `reversed`, …
    pub status: String,
    /// Whole rupiah (the invoice's amount due when it was made).
    pub amount: i64,
    /// `IDR`.
    pub currency: String,
    /// Refunded so far.
    pub refunded: i64,
    /// What the customer needs to pay.
    pub instructions: Instructions,
    /// Until when it can be paid (Unix ms).
    pub expires_at: Option<i64>,
    /// When the money was secured (Unix ms).
    pub paid_at: Option<i64>,
    /// Created (Unix ms).
    pub created_at: i64,
    /// Last change (Unix ms).
    pub updated_at: i64,
    /// Midtrans's last message, for support.
    pub status_message: Option<String>,
    /// Midtrans confirmed another amount or currency: never settled until
    /// resolved by hand.
    pub amount_mismatch: bool,
    /// `sandbox` or `production`: which Midtrans.
    pub environment: String,
}

/// A refund as the API shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Refund {
    /// Id (the `refund_key` sent to Midtrans).
    pub id: String,
    /// The payment.
    pub payment_id: String,
    /// Whole rupiah.
    pub amount: i64,
    /// Why.
    pub reason: String,
    /// `requested`, `done` or `failed`.
    pub status: String,
    /// Recorded by hand (a bank transfer back), not made at Midtrans.
    pub manual: bool,
    /// The bank transfer's reference (manual refunds).
    pub reference: Option<String>,
    /// Midtrans's message.
    pub status_message: Option<String>,
    /// Requested (Unix ms).
    pub created_at: i64,
    /// Done or failed (Unix ms).
    pub completed_at: Option<i64>,
}

impl From<RefundRow> for Refund {
    fn from(r: RefundRow) -> Self {
        Self {
            id: r.id,
            payment_id: r.payment_id,
            amount: r.amount,
            reason: r.reason,
            status: r.status,
            manual: r.manual != 0,
            reference: r.reference,
            status_message: r.status_message,
            created_at: r.created_at,
            completed_at: r.completed_at,
        }
    }
}

/// `POST /api/payments`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPayment {
    /// The invoice to pay (open, the caller's subject's).
    pub invoice_id: String,
    /// `snap`, `credit_card`, `bca_va`, `bni_va`, `bri_va`, `cimb_va`,
    /// `permata_va`, `mandiri_bill`, `gopay`, `shopeepay` or `qris`.
    pub method: String,
    /// `credit_card` only: the token from Midtrans's `GET /v2/token`.
    #[serde(default)]
    pub token_id: Option<String>,
}

/// `POST /api/admin/payments/{id}/refund`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefundRequest {
    /// Whole rupiah, at most what is left unrefunded.
    pub amount: i64,
    /// Why (1–255 characters).
    pub reason: String,
    /// Record a refund made by hand (a bank transfer back: virtual
    /// accounts and bills cannot be refunded at Midtrans).
    #[serde(default)]
    pub manual: bool,
    /// The transfer's reference (manual refunds).
    #[serde(default)]
    pub reference: Option<String>,
}

/// An answer to a request with an idempotency key.
pub struct Answered {
    /// HTTP status.
    pub status: u16,
    /// JSON body.
    pub body: String,
    /// A stored answer replayed.
    pub replayed: bool,
}

/// The invoice as billing's internal API shows it (fields we use).
#[derive(Debug, Clone, Deserialize)]
struct InvoiceView {
    id: String,
    number: Option<String>,
    status: String,
    subject: Subject,
    user_id: String,
    amount_due: i64,
    currency: String,
    buyer: BuyerView,
}

#[derive(Debug, Clone, Deserialize)]
struct BuyerView {
    name: String,
    email: String,
}

/// An event to write with a change.
#[derive(Default)]
struct Ev {
    kind: &'static str,
    amount: i64,
    refund_id: Option<String>,
    reason: Option<String>,
    /// A refund made by hand (a bank transfer), not at Midtrans.
    manual: Option<bool>,
}

impl Ev {
    /// The event's data: what its consumers act on without calling back.
    fn data(&self, p: &PaymentRow) -> Value {
        let mut data = json!({
            "payment_id": p.id, "invoice_id": p.invoice_id, "invoice_number": p.invoice_number,
            "order_id": p.order_id, "amount": self.amount,
            "method": p.channel.clone().unwrap_or_else(|| p.method.clone()),
            "status": p.status, "user_id": p.user_id,
            "subject": {"kind": p.subject_kind, "id": p.subject_id},
        });
        if let Some(r) = &self.refund_id {
            data["refund_id"] = json!(r);
        }
        if let Some(r) = &self.reason {
            data["reason"] = json!(r);
        }
        if let Some(m) = self.manual {
            data["manual"] = json!(m);
        }
        if self.kind == "payment.pending" {
            // How to pay and until when: the customer's instructions
            // (notifications mails them, and reminds before the expiry).
            data["expires_at"] = json!(p.expires_at);
            if let Some(i) = p
                .instructions
                .as_deref()
                .and_then(|s| serde_json::from_str::<crate::charge::Instructions>(s).ok())
            {
                for (k, v) in [
                    ("bank", i.bank),
                    ("va_number", i.va_number),
                    ("bill_key", i.bill_key),
                    ("biller_code", i.biller_code),
                    ("qr_code_url", i.qr_code_url),
                    ("pay_url", i.deeplink_url.or(i.redirect_url)),
                ] {
                    if let Some(v) = v {
                        data[k] = json!(v);
                    }
                }
            }
        }
        data
    }
}

/// What is written in the transaction of a payment's change besides it.
#[derive(Clone, Copy)]
enum Alongside<'a> {
    Nothing,
    /// Refund `id` ends `done` (with Midtrans's message); when it ended
    /// already, nothing changes.
    RefundDone {
        id: &'a str,
        message: Option<&'a str>,
    },
}

/// What a confirmed status did (stored on the notification).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Moved to this state.
    Moved(State),
    /// The state it is in already.
    Duplicate,
    /// Late or backwards: ignored.
    Stale,
    /// Amount or currency differ: flagged.
    Mismatch,
    /// A status we do not know: ignored, re-checked later.
    Unknown,
}

impl Outcome {
    /// As stored.
    pub fn label(&self) -> String {
        match self {
            Self::Moved(s) => format!("moved:{}", s.as_str()),
            Self::Duplicate => "duplicate".into(),
            Self::Stale => "stale".into(),
            Self::Mismatch => "amount_mismatch".into(),
            Self::Unknown => "unknown_status".into(),
        }
    }
}

fn db_err(e: sqlx::Error) -> ApiError {
    ApiError::from(e)
}

/// A key of at most 36 characters (Midtrans's cap) derived from `parts`.
fn derived_key(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    h.finalize()
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// When the janitor should next look at a payment in `state` that has
/// been checked `checks` times, now `now`, payable until `expires_at`.
pub fn next_check(state: State, checks: i32, now: i64, expires_at: Option<i64>) -> Option<i64> {
    if !matches!(
        state,
        State::Created | State::Pending | State::Authorized | State::Challenge | State::Captured
    ) {
        return None;
    }
    let i = usize::try_from(checks.max(0))
        .unwrap_or(0)
        .min(CHECKS_MS.len() - 1);
    let mut at = now + CHECKS_MS[i];
    if let Some(exp) = expires_at {
        // Once just after the expiry, so an expired payment is seen as such
        // within a minute.
        let just_after = exp + 60_000;
        if now < just_after && at > just_after {
            at = just_after;
        }
    }
    Some(at)
}

/// The events a move from `from` to `to` writes.
fn events_for(from: State, to: State, p: &PaymentRow) -> Vec<Ev> {
    let ev = |kind, amount| Ev {
        kind,
        amount,
        ..Ev::default()
    };
    let mut out = Vec::new();
    if from == State::Created && to == State::Pending {
        out.push(ev("payment.pending", p.amount));
    }
    if to.is_paid() && !from.is_paid() {
        out.push(ev("payment.settled", p.amount));
    }
    match to {
        State::Expired => out.push(ev("payment.expired", p.amount)),
        State::Denied | State::Cancelled | State::Failed if !from.is_paid() => {
            out.push(ev("payment.failed", p.amount));
        }
        // Money that came in and went back out: a card cancelled after
        // capture, a settled VA or bill the bank reversed, a chargeback.
        State::Cancelled | State::Reversed | State::ChargedBack if from.is_paid() => {
            let left = p.amount - p.refunded;
            if left > 0 {
                out.push(Ev {
                    kind: "payment.refunded",
                    amount: left,
                    refund_id: Some(format!("{}:{}", p.id, to.as_str())),
                    reason: Some(to.as_str().to_owned()),
                    manual: None,
                });
            }
        }
        _ => {}
    }
    out
}

fn parse_state(s: &str) -> Api<State> {
    State::parse(s).ok_or_else(|| ApiError::internal(&format!("unknown payment state {s}")))
}

impl Payments {
    fn midtrans(&self) -> Api<&Midtrans> {
        self.midtrans.as_ref().ok_or_else(disabled)
    }

    /// `sandbox` or `production`.
    pub fn environment(&self) -> &'static str {
        self.config.midtrans.environment.as_str()
    }

    /// The API view of a row.
    pub fn view(&self, p: &PaymentRow) -> Payment {
        let mut instructions: Instructions = p
            .instructions
            .as_deref()
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or_default();
        if State::parse(&p.status).is_some_and(|s| s.is_terminal() || s.is_paid()) {
            // Nothing left to pay with.
            instructions = Instructions::default();
        }
        Payment {
            id: p.id.clone(),
            invoice_id: p.invoice_id.clone(),
            invoice_number: p.invoice_number.clone(),
            order_id: p.order_id.clone(),
            attempt: p.attempt,
            method: p.method.clone(),
            channel: p.channel.clone(),
            status: p.status.clone(),
            amount: p.amount,
            currency: p.currency.clone(),
            refunded: p.refunded,
            instructions,
            expires_at: p.expires_at,
            paid_at: p.paid_at,
            created_at: p.created_at,
            updated_at: p.updated_at,
            status_message: p.status_message.clone(),
            amount_mismatch: p.mismatch != 0,
            environment: self.environment().to_owned(),
        }
    }

    fn midtrans_failed(&self, e: &MidtransError) -> ApiError {
        tracing::warn!(error = %e, "a Midtrans call failed");
        match e {
            MidtransError::Refused {
                status_code,
                message,
                ..
            } if status_code == "401" => {
                tracing::error!(%message, "Midtrans refused the server key");
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "midtrans_failed",
                    "Midtrans refused our credentials; quote the request id when reporting it",
                )
            }
            MidtransError::Refused { message, .. } => ApiError::new(
                StatusCode::BAD_GATEWAY,
                "midtrans_failed",
                format!("Midtrans answered: {message}"),
            ),
            _ => ApiError::new(
                StatusCode::BAD_GATEWAY,
                "midtrans_unavailable",
                "Midtrans did not answer; send the same request again (same Idempotency-Key) \
                 to continue",
            )
            .with_retry_after(5),
        }
    }

    // ---- paying an invoice ------------------------------------------------

    /// `POST /api/payments`: pays `req.invoice_id` once per `key`.
    pub async fn create(&self, user: &UserClaims, key: &str, req: &NewPayment) -> Api<Answered> {
        let mid = self.midtrans()?;
        let Some(method) = Method::parse(&req.method) else {
            return Err(ApiError::validation(vec![FieldError::new(
                "method",
                "must be one of snap, credit_card, bca_va, bni_va, bri_va, cimb_va, permata_va, \
                 mandiri_bill, gopay, shopeepay, qris",
            )]));
        };
        method
            .check_token(req.token_id.as_deref())
            .map_err(|e| ApiError::validation(vec![FieldError::new("token_id", e.to_string())]))?;
        if req.invoice_id.is_empty()
            || req.invoice_id.len() > 64
            || !req
                .invoice_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(ApiError::not_found("no such invoice"));
        }
        let subject = user.subject();
        let scope = format!("{}:{}", subject.kind(), subject.id());
        let hash = {
            let canon = serde_json::to_string(req).map_err(|e| ApiError::internal(&e))?;
            backend_common::token_hash(&canon)
        };
        let now = self.clock.now_ms();
        let lock_ms = i64::try_from(self.config.midtrans.timeout.as_millis())
            .unwrap_or(i64::MAX / 4)
            + LOCK_SLACK_MS;
        let mut c = self.db.pool().acquire().await.map_err(db_err)?;
        let mut resumed = None;
        if !storage::insert_request(&mut c, &scope, key, &hash, now + lock_ms, now)
            .await
            .map_err(db_err)?
        {
            let row = storage::request(&mut c, &scope, key)
                .await
                .map_err(db_err)?
                .ok_or_else(|| ApiError::internal(&"an idempotency key vanished"))?;
            if row.request_hash != hash {
                return Err(ApiError::conflict(
                    "idempotency_key_reused",
                    "this Idempotency-Key was sent with another request; use a new key",
                ));
            }
            if let (Some(status), Some(body)) = (row.status_code, row.response) {
                return Ok(Answered {
                    status: u16::try_from(status).unwrap_or(200),
                    body,
                    replayed: true,
                });
            }
            if row.locked_until > now
                || !storage::relock_request(&mut c, &scope, key, row.locked_until, now + lock_ms)
                    .await
                    .map_err(db_err)?
            {
                return Err(ApiError::conflict(
                    "request_in_progress",
                    "a request with this Idempotency-Key is in progress; retry shortly",
                )
                .with_retry_after(1));
            }
            resumed = Some(row.payment_id);
        }
        drop(c);
        let outcome = match resumed {
            Some(Some(payment_id)) => self.resume(mid, &payment_id).await.map(|p| (201, p)),
            _ => self.start(mid, user, &scope, key, method, req).await,
        };
        let mut c = self.db.pool().acquire().await.map_err(db_err)?;
        match outcome {
            Ok((status, p)) => {
                let body =
                    serde_json::to_string(&self.view(&p)).map_err(|e| ApiError::internal(&e))?;
                // A payment still `created` (Midtrans did not answer) is not
                // final: a retry resumes it.
                let answer = (p.status != "created").then_some((status, body.as_str()));
                storage::finish_request(&mut c, &scope, key, answer)
                    .await
                    .map_err(db_err)?;
                Ok(Answered {
                    status,
                    body,
                    replayed: false,
                })
            }
            Err(e) => {
                storage::finish_request(&mut c, &scope, key, None)
                    .await
                    .map_err(db_err)?;
                Err(e)
            }
        }
    }

    async fn invoice(&self, id: &str, subject: &Subject) -> Api<InvoiceView> {
        let invoice: InvoiceView = self
            .client
            .get("billing", &format!("/internal/invoices/{id}"))
            .await
            .map_err(|e| {
                if e.is_not_found() {
                    ApiError::not_found("no such invoice")
                } else {
                    e.into()
                }
            })?;
        if invoice.subject != *subject {
            return Err(ApiError::not_found("no such invoice"));
        }
        if invoice.status != "open" || invoice.amount_due <= 0 {
            return Err(ApiError::conflict(
                "invoice_not_payable",
                format!("this invoice is {} and cannot be paid", invoice.status),
            ));
        }
        Ok(invoice)
    }

    /// A new attempt (after cancelling an open one of another method).
    async fn start(
        &self,
        mid: &Midtrans,
        user: &UserClaims,
        scope: &str,
        key: &str,
        method: Method,
        req: &NewPayment,
    ) -> Api<(u16, PaymentRow)> {
        let invoice = self.invoice(&req.invoice_id, &user.subject()).await?;
        let number = invoice
            .number
            .clone()
            .ok_or_else(|| ApiError::internal(&"an open invoice without a number"))?;
        for _ in 0..4 {
            let now = self.clock.now_ms();
            let mut tx = self.db.begin_write().await.map_err(db_err)?;
            if let Some(open) = storage::open_of(&mut tx, &invoice.id)
                .await
                .map_err(db_err)?
            {
                let reusable = open.method == method.as_str()
                    && open.status == "pending"
                    && open.expires_at.is_none_or(|e| e > now)
                    && req.token_id.is_none();
                if reusable {
                    // The same method again: the same payment (the VA
                    // number the customer may already have).
                    storage::link_request(&mut tx, scope, key, &open.id)
                        .await
                        .map_err(db_err)?;
                    tx.commit().await.map_err(db_err)?;
                    return Ok((200, open));
                }
                drop(tx);
                self.cancel_open(mid, &open).await?;
                continue;
            }
            let attempt = storage::last_attempt(&mut tx, &invoice.id)
                .await
                .map_err(db_err)?
                + 1;
            let order_id = midtrans::order_id(&number, u32::try_from(attempt).unwrap_or(1))
                .map_err(|e| ApiError::internal(&e))?;
            let expiry = if method.is_wallet() {
                self.config.wallet_expiry
            } else {
                self.config.expiry
            };
            let minutes = (expiry.as_secs() / 60).max(1);
            let order_time = format!("{} +0700", wib(now));
            let charge = Charge {
                method,
                order_id: &order_id,
                gross_amount: invoice.amount_due,
                invoice_number: &number,
                customer: Some(Customer {
                    first_name: invoice.buyer.name.chars().take(255).collect(),
                    email: invoice.buyer.email.clone(),
                }),
                token_id: req.token_id.as_deref(),
                expiry_minutes: minutes,
                order_time: &order_time,
                finish_url: self.config.finish_url.as_deref(),
            };
            let body = if method == Method::Snap {
                charge.snap_body()
            } else {
                charge.core_body().map_err(|e| {
                    ApiError::validation(vec![FieldError::new("token_id", e.to_string())])
                })?
            };
            let subject = user.subject();
            let row = PaymentRow {
                id: uuid::Uuid::now_v7().to_string(),
                invoice_id: invoice.id.clone(),
                invoice_number: number.clone(),
                attempt,
                order_id,
                method: method.as_str().to_owned(),
                channel: None,
                status: State::Created.as_str().to_owned(),
                amount: invoice.amount_due,
                currency: invoice.currency.clone(),
                subject_kind: subject.kind().to_owned(),
                subject_id: subject.id().to_owned(),
                user_id: invoice.user_id.clone(),
                open_invoice: Some(invoice.id.clone()),
                transaction_id: None,
                fraud_status: None,
                instructions: None,
                request: Some(body.to_string()),
                status_message: None,
                refunded: 0,
                mismatch: 0,
                expires_at: Some(now + i64::try_from(minutes * 60_000).unwrap_or(i64::MAX / 2)),
                next_check_at: Some(now + RECOVER_AFTER_MS),
                checks: 0,
                created_at: now,
                updated_at: now,
                paid_at: None,
            };
            match storage::insert_payment(&mut tx, &row).await {
                Ok(()) => {}
                Err(e)
                    if on_constraint(&e, &storage::OPEN_UNIQUE)
                        || on_constraint(&e, &storage::ATTEMPT_UNIQUE) =>
                {
                    // Another request opened one meanwhile: look again.
                    continue;
                }
                Err(e) => return Err(db_err(e)),
            }
            storage::link_request(&mut tx, scope, key, &row.id)
                .await
                .map_err(db_err)?;
            self.config.failpoints.hit("create.before_commit")?;
            tx.commit().await.map_err(db_err)?;
            return self.charge(mid, row, false).await.map(|p| (201, p));
        }
        Err(ApiError::conflict(
            "payment_in_progress",
            "another payment of this invoice is being made; retry shortly",
        )
        .with_retry_after(1))
    }

    /// A `created` payment after a crash or a Midtrans failure: adopt what
    /// Midtrans has, or charge it.
    async fn resume(&self, mid: &Midtrans, id: &str) -> Api<PaymentRow> {
        let mut c = self.db.pool().acquire().await.map_err(db_err)?;
        let p = storage::payment(&mut c, id)
            .await
            .map_err(db_err)?
            .ok_or_else(|| ApiError::internal(&"a linked payment vanished"))?;
        drop(c);
        if p.status != State::Created.as_str() {
            return Ok(p);
        }
        self.charge(mid, p, true).await
    }

    /// Sends the charge of a `created` payment (asking Midtrans first when
    /// it may have been sent before).
    async fn charge(&self, mid: &Midtrans, p: PaymentRow, resumed: bool) -> Api<PaymentRow> {
        let snap = p.method == Method::Snap.as_str();
        if resumed && !snap {
            match mid.status(&p.order_id).await {
                Ok(Some(answer)) => return self.apply(&p.id, &answer).await.map(|(p, _)| p),
                Ok(None) => {}
                Err(e) => return Err(self.midtrans_failed(&e)),
            }
        }
        let body: Value = p
            .request
            .as_deref()
            .and_then(|s| serde_json::from_str(s).ok())
            .ok_or_else(|| ApiError::internal(&"a created payment without its request"))?;
        if snap {
            return match mid.snap(&body, &p.id).await {
                Ok(token) => {
                    self.config.failpoints.hit("charge.after_midtrans")?;
                    let instructions = Instructions {
                        token: Some(token.token),
                        redirect_url: Some(token.redirect_url),
                        ..Instructions::default()
                    };
                    self.mutate(&p.id, |row, _| {
                        row.instructions = serde_json::to_string(&instructions).ok();
                        row.request = None;
                        Ok(Some(State::Pending))
                    })
                    .await
                }
                Err(MidtransError::Refused { message, .. }) => {
                    self.fail_created(&p.id, &message).await?;
                    Err(ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "payment_refused",
                        format!("Midtrans refused the payment: {message}"),
                    ))
                }
                Err(e) => Err(self.midtrans_failed(&e)),
            };
        }
        match mid.charge(&body, &p.id).await {
            Ok(answer) => {
                self.config.failpoints.hit("charge.after_midtrans")?;
                self.apply(&p.id, &answer).await.map(|(p, _)| p)
            }
            Err(MidtransError::Refused { status_code, .. }) if status_code == "406" => {
                // The order exists at Midtrans: ours, charged before.
                match mid.status(&p.order_id).await {
                    Ok(Some(answer)) => self.apply(&p.id, &answer).await.map(|(p, _)| p),
                    Ok(None) => Err(ApiError::internal(
                        &"Midtrans says the order exists and does not know it",
                    )),
                    Err(e) => Err(self.midtrans_failed(&e)),
                }
            }
            Err(MidtransError::Refused {
                status_code,
                message,
                ..
            }) if status_code != "401" => {
                self.fail_created(&p.id, &message).await?;
                Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "payment_refused",
                    format!("Midtrans refused the payment ({status_code}): {message}"),
                ))
            }
            Err(e) => Err(self.midtrans_failed(&e)),
        }
    }

    /// A `created` payment Midtrans refused or never saw: failed.
    async fn fail_created(&self, id: &str, message: &str) -> Api<PaymentRow> {
        let message = message.to_owned();
        self.mutate(id, move |row, state| {
            if state != State::Created {
                return Ok(None);
            }
            row.status_message = Some(message.clone());
            Ok(Some(State::Failed))
        })
        .await
    }

    // ---- the one place a payment changes ----------------------------------

    /// Changes payment `id` in one transaction: `f` edits the row and names
    /// the state to move to (checked against the state machine); the
    /// events of the move are written with it. Retried when another writer
    /// changed the row meanwhile.
    async fn mutate(
        &self,
        id: &str,
        mut f: impl FnMut(&mut PaymentRow, State) -> Api<Option<State>>,
    ) -> Api<PaymentRow> {
        self.mutate_with(id, Alongside::Nothing, |row, from| {
            let to = f(row, from)?;
            Ok((to, Vec::new()))
        })
        .await
        .map(|(p, _)| p)
    }

    /// [`Payments::mutate`] where `f` also names events, and `alongside`
    /// is written in the same transaction.
    async fn mutate_with(
        &self,
        id: &str,
        alongside: Alongside<'_>,
        mut f: impl FnMut(&mut PaymentRow, State) -> Api<(Option<State>, Vec<Ev>)>,
    ) -> Api<(PaymentRow, Option<State>)> {
        for _ in 0..5 {
            let now = self.clock.now_ms();
            let mut tx = self.db.begin_write().await.map_err(db_err)?;
            let mut p = storage::payment(&mut tx, id)
                .await
                .map_err(db_err)?
                .ok_or_else(|| ApiError::not_found("no such payment"))?;
            if let Alongside::RefundDone {
                id: refund,
                message,
            } = alongside
            {
                if !storage::finish_refund(&mut tx, refund, "done", message, now)
                    .await
                    .map_err(db_err)?
                {
                    // Recorded by another request: the payment has it.
                    return Ok((p, None));
                }
            }
            let seen = p.updated_at;
            let from = parse_state(&p.status)?;
            let (to, mut events) = f(&mut p, from)?;
            let moved = to.filter(|t| *t != from);
            if let Some(to) = moved {
                events.splice(0..0, events_for(from, to, &p));
                p.status = to.as_str().to_owned();
                if to.is_paid() && p.paid_at.is_none() {
                    p.paid_at = Some(now);
                }
                if !matches!(to, State::Pending | State::Authorized | State::Challenge) {
                    p.open_invoice = None;
                }
                if to == State::Pending || to.is_paid() || to.is_terminal() {
                    p.request = None;
                }
            }
            let state = parse_state(&p.status)?;
            if p.mismatch == 0 {
                p.next_check_at = next_check(state, p.checks, now, p.expires_at);
            }
            p.updated_at = now.max(seen + 1);
            if !storage::update_payment(&mut tx, &p, seen)
                .await
                .map_err(db_err)?
            {
                continue;
            }
            for e in &events {
                self.outbox
                    .enqueue(&mut tx, e.kind, &e.data(&p), now)
                    .await
                    .map_err(db_err)?;
            }
            self.config.failpoints.hit("apply.before_commit")?;
            tx.commit().await.map_err(db_err)?;
            if let Some(to) = moved {
                self.metrics
                    .transitions
                    .with_label_values(&[to.as_str()])
                    .inc();
                tracing::info!(payment = %p.id, order_id = %p.order_id, from = from.as_str(),
                    to = to.as_str(), "payment moved");
            }
            if !events.is_empty() {
                self.outbox.notify();
            }
            return Ok((p, moved));
        }
        Err(ApiError::conflict(
            "payment_busy",
            "this payment is being changed; retry shortly",
        )
        .with_retry_after(1))
    }

    /// Applies a status Midtrans answered (charge, status, cancel, expire,
    /// refund) to payment `id`: the amount and currency must be ours, then
    /// the state machine decides.
    pub async fn apply(&self, id: &str, answer: &Value) -> Api<(PaymentRow, Outcome)> {
        let status = answer["transaction_status"]
            .as_str()
            .and_then(TransactionStatus::parse);
        let fraud = answer["fraud_status"].as_str().and_then(FraudStatus::parse);
        // Refunds we asked for (done or still in flight) are ours to
        // report; only what Midtrans refunded beyond them is new.
        let in_flight = {
            let mut c = self.db.pool().acquire().await.map_err(db_err)?;
            storage::refunds_in_flight(&mut c, id)
                .await
                .map_err(db_err)?
        };
        let mut outcome = Outcome::Unknown;
        let mut newly_mismatched = false;
        let (row, _) = self
            .mutate_with(id, Alongside::Nothing, |p, from| {
                newly_mismatched = false;
                let amount = answer["gross_amount"].as_str().and_then(parse_amount);
                let currency_ok = answer["currency"].as_str().is_none_or(|c| c == p.currency);
                let order_ok = answer["order_id"].as_str().is_none_or(|o| o == p.order_id);
                if amount != Some(p.amount) || !currency_ok || !order_ok {
                    outcome = Outcome::Mismatch;
                    if p.mismatch == 0 {
                        newly_mismatched = true;
                    }
                    p.mismatch = 1;
                    p.next_check_at = None;
                    p.status_message = Some(format!(
                        "amount mismatch: Midtrans reports {} {} for order {}; we expect {} {}",
                        answer["gross_amount"].as_str().unwrap_or("?"),
                        answer["currency"].as_str().unwrap_or("?"),
                        answer["order_id"].as_str().unwrap_or("?"),
                        midtrans::format_amount(p.amount),
                        p.currency
                    ));
                    return Ok((None, Vec::new()));
                }
                let Some(status) = status else {
                    outcome = Outcome::Unknown;
                    return Ok((None, Vec::new()));
                };
                if let Some(t) = answer["transaction_id"].as_str() {
                    p.transaction_id = Some(t.to_owned());
                }
                if let Some(t) = answer["payment_type"].as_str() {
                    p.channel = Some(t.to_owned());
                }
                if let Some(m) = answer["status_message"].as_str() {
                    p.status_message = Some(m.chars().take(500).collect());
                }
                if let Some(f) = answer["fraud_status"].as_str() {
                    p.fraud_status = Some(f.to_owned());
                }
                let old: Instructions = p
                    .instructions
                    .as_deref()
                    .and_then(|s| serde_json::from_str(s).ok())
                    .unwrap_or_default();
                let merged = old.merged(Instructions::from_answer(answer));
                if !merged.is_empty() {
                    p.instructions = serde_json::to_string(&merged).ok();
                }
                // Refunds made elsewhere (the Midtrans dashboard): the
                // confirmed total beyond what we recorded.
                let mut events = Vec::new();
                if let Some(total) = answer["refund_amount"].as_str().and_then(parse_amount) {
                    let covered = p.refunded + in_flight;
                    if total > covered && total <= p.amount {
                        events.push(Ev {
                            kind: "payment.refunded",
                            amount: total - covered,
                            refund_id: Some(format!("{}:midtrans:{total}", p.id)),
                            reason: Some("refunded at Midtrans".to_owned()),
                            manual: None,
                        });
                        p.refunded += total - covered;
                    }
                }
                let step = state::step(from, status, fraud);
                outcome = match step {
                    Step::Move(to) => Outcome::Moved(to),
                    Step::Same => Outcome::Duplicate,
                    Step::Stale => Outcome::Stale,
                };
                Ok((
                    match step {
                        Step::Move(to) => Some(to),
                        _ => None,
                    },
                    events,
                ))
            })
            .await?;
        if newly_mismatched {
            self.metrics.mismatches.inc();
            tracing::error!(payment = %row.id, order_id = %row.order_id,
                message = row.status_message.as_deref().unwrap_or_default(),
                "Midtrans confirmed another amount or currency: the payment is flagged, not settled");
        }
        Ok((row, outcome))
    }

    // ---- webhooks ---------------------------------------------------------

    /// `POST /api/payments/webhooks/midtrans`: verified, stored, confirmed
    /// with Midtrans, applied. Returns the outcome label.
    pub async fn webhook(&self, raw: &[u8]) -> Api<String> {
        let count = |o: &str| self.metrics.webhooks.with_label_values(&[o]).inc();
        let Ok(Value::Object(mut body)) = serde_json::from_slice::<Value>(raw) else {
            count("malformed");
            return Err(ApiError::bad_request(
                "invalid_notification",
                "a Midtrans notification is a JSON object",
            ));
        };
        let field = |k: &str| body.get(k).and_then(Value::as_str).map(str::to_owned);
        let (Some(order_id), Some(code), Some(gross), Some(sig)) = (
            field("order_id"),
            field("status_code"),
            field("gross_amount"),
            field("signature_key"),
        ) else {
            count("forged");
            return Err(ApiError::unauthorized(
                "invalid_signature",
                "signature_key, order_id, status_code and gross_amount are required",
            ));
        };
        let Some(key) = self.config.midtrans.server_key.as_ref() else {
            return Err(disabled());
        };
        if !midtrans::signature_valid(&sig, &order_id, &code, &gross, key.expose()) {
            count("forged");
            tracing::warn!(%order_id, "a Midtrans notification with a bad signature: refused");
            return Err(ApiError::unauthorized(
                "invalid_signature",
                "the signature_key does not match",
            ));
        }
        let mid = self.midtrans()?;
        let status = field("transaction_status");
        body.remove("signature_key");
        let now = self.clock.now_ms();
        let nid = uuid::Uuid::now_v7().to_string();
        let mut c = self.db.pool().acquire().await.map_err(db_err)?;
        let stored = Value::Object(body).to_string();
        storage::insert_notification(&mut c, &nid, &order_id, status.as_deref(), &stored, now)
            .await
            .map_err(db_err)?;
        let Some(p) = storage::by_order(&mut c, &order_id).await.map_err(db_err)? else {
            storage::notification_outcome(&mut c, &nid, "unknown_order")
                .await
                .map_err(db_err)?;
            count("unknown_order");
            return Ok("unknown_order".into());
        };
        drop(c);
        // Act on what Midtrans confirms, never on the body.
        let outcome = match mid.status(&order_id).await {
            Ok(Some(answer)) => self.apply(&p.id, &answer).await?.1.label(),
            Ok(None) => "not_at_midtrans".to_owned(),
            Err(e) => {
                tracing::warn!(error = %e, %order_id, "cannot confirm a notification now; the janitor will");
                let mut c = self.db.pool().acquire().await.map_err(db_err)?;
                storage::check_now(&mut c, &p.id, now)
                    .await
                    .map_err(db_err)?;
                "unconfirmed".to_owned()
            }
        };
        let mut c = self.db.pool().acquire().await.map_err(db_err)?;
        storage::notification_outcome(&mut c, &nid, &outcome)
            .await
            .map_err(db_err)?;
        count(outcome.split(':').next().unwrap_or("moved"));
        Ok(outcome)
    }

    // ---- cancelling -------------------------------------------------------

    /// Cancels an open payment at Midtrans (then here).
    async fn cancel_open(&self, mid: &Midtrans, p: &PaymentRow) -> Api<PaymentRow> {
        let key = derived_key(&[&p.id, "cancel"]);
        match mid.cancel(&p.order_id, &key).await {
            Ok(answer) => {
                let (row, _) = self.apply(&p.id, &answer).await?;
                Ok(row)
            }
            Err(e) if e.status_code() == Some("404") => {
                // Midtrans has no transaction: a Snap order whose customer
                // never chose a method, or a charge that never arrived.
                self.mutate(&p.id, |row, state| {
                    row.status_message = Some("cancelled before Midtrans had a transaction".into());
                    Ok(
                        matches!(state, State::Created | State::Pending)
                            .then_some(State::Cancelled),
                    )
                })
                .await
            }
            Err(e) if e.status_code() == Some("412") => {
                // It moved on meanwhile (paid, expired): take that.
                match mid.status(&p.order_id).await {
                    Ok(Some(answer)) => Ok(self.apply(&p.id, &answer).await?.0),
                    Ok(None) => Err(ApiError::internal(&"Midtrans lost a transaction")),
                    Err(e) => Err(self.midtrans_failed(&e)),
                }
            }
            Err(e) => Err(self.midtrans_failed(&e)),
        }
    }

    /// `POST /api/payments/{id}/cancel`: a pending payment of the caller's.
    pub async fn cancel(&self, subject: &Subject, id: &str) -> Api<PaymentRow> {
        let mid = self.midtrans()?;
        let mut c = self.db.pool().acquire().await.map_err(db_err)?;
        let p = storage::payment_of(&mut c, subject.kind(), subject.id(), id)
            .await
            .map_err(db_err)?
            .ok_or_else(|| ApiError::not_found("no such payment"))?;
        drop(c);
        if p.status == State::Cancelled.as_str() {
            return Ok(p);
        }
        if !matches!(parse_state(&p.status)?, State::Created | State::Pending) {
            return Err(ApiError::conflict(
                "not_cancellable",
                format!(
                    "only a pending payment can be cancelled; this one is {}",
                    p.status
                ),
            ));
        }
        let row = self.cancel_open(mid, &p).await?;
        if row.status != State::Cancelled.as_str() {
            return Err(ApiError::conflict(
                "not_cancellable",
                format!("the payment is {} now and cannot be cancelled", row.status),
            ));
        }
        Ok(row)
    }

    // ---- reading ----------------------------------------------------------

    /// One of `subject`'s payments.
    pub async fn get_for(&self, subject: &Subject, id: &str) -> Api<PaymentRow> {
        let mut c = self.db.pool().acquire().await.map_err(db_err)?;
        storage::payment_of(&mut c, subject.kind(), subject.id(), id)
            .await
            .map_err(db_err)?
            .ok_or_else(|| ApiError::not_found("no such payment"))
    }

    /// `subject`'s payments, newest first.
    pub async fn list_for(
        &self,
        subject: &Subject,
        invoice_id: Option<&str>,
    ) -> Api<Vec<PaymentRow>> {
        let mut c = self.db.pool().acquire().await.map_err(db_err)?;
        storage::list_of(&mut c, subject.kind(), subject.id(), invoice_id, 100)
            .await
            .map_err(db_err)
    }

    /// Any payment, with its refunds and notifications (admin).
    pub async fn admin_get(&self, id: &str) -> Api<(PaymentRow, Vec<RefundRow>, Vec<Value>)> {
        let mut c = self.db.pool().acquire().await.map_err(db_err)?;
        let p = storage::payment(&mut c, id)
            .await
            .map_err(db_err)?
            .ok_or_else(|| ApiError::not_found("no such payment"))?;
        let refunds = storage::refunds_of(&mut c, id).await.map_err(db_err)?;
        let notes = storage::notifications_of(&mut c, &p.order_id)
            .await
            .map_err(db_err)?
            .into_iter()
            .map(|n| {
                json!({"id": n.id, "transaction_status": n.transaction_status, "outcome": n.outcome,
                       "received_at": n.received_at,
                       "body": serde_json::from_str::<Value>(&n.body).unwrap_or(Value::Null)})
            })
            .collect();
        Ok((p, refunds, notes))
    }

    /// Every payment of an invoice (admin).
    pub async fn admin_list(&self, invoice_id: &str) -> Api<Vec<PaymentRow>> {
        let mut c = self.db.pool().acquire().await.map_err(db_err)?;
        storage::of_invoice(&mut c, invoice_id)
            .await
            .map_err(db_err)
    }

    // ---- refunds ----------------------------------------------------------

    /// `POST /api/admin/payments/{id}/refund`: once per `key`.
    pub async fn refund(
        &self,
        by: &str,
        id: &str,
        key: &str,
        req: &RefundRequest,
    ) -> Api<(bool, Refund)> {
        let reason = req.reason.trim();
        let mut v = backend_common::Validator::new();
        v.check(req.amount >= 1, "amount", "must be at least Rp 1");
        v.check(
            (1..=255).contains(&reason.chars().count()),
            "reason",
            "1 to 255 characters",
        );
        v.check(
            req.reference
                .as_deref()
                .is_none_or(|r| r.chars().count() <= 100),
            "reference",
            "at most 100 characters",
        );
        v.check(
            req.manual || req.reference.is_none(),
            "reference",
            "only for a manual refund",
        );
        v.finish()?;
        let now = self.clock.now_ms();
        let mut c = self.db.pool().acquire().await.map_err(db_err)?;
        let p = storage::payment(&mut c, id)
            .await
            .map_err(db_err)?
            .ok_or_else(|| ApiError::not_found("no such payment"))?;
        if let Some(r) = storage::refund_by_key(&mut c, id, key)
            .await
            .map_err(db_err)?
        {
            if r.amount != req.amount || (r.manual != 0) != req.manual {
                return Err(ApiError::conflict(
                    "idempotency_key_reused",
                    "this Idempotency-Key was sent with another refund; use a new key",
                ));
            }
            drop(c);
            return match r.status.as_str() {
                "done" => Ok((false, r.into())),
                "failed" => Err(refund_refused(r.status_message.as_deref())),
                // Requested and not recorded (a crash, or a request still
                // running): finish it.
                _ if r.manual != 0 => self.record_refund(r, None).await.map(|r| (false, r)),
                _ => self.refund_at_midtrans(&p, r).await.map(|r| (false, r)),
            };
        }
        let state = parse_state(&p.status)?;
        let channel = p.channel.clone().unwrap_or_else(|| p.method.clone());
        if !state.is_paid() || matches!(state, State::Refunded | State::ChargedBack) {
            return Err(ApiError::conflict(
                "not_refundable",
                format!("a {} payment has nothing to refund", p.status),
            ));
        }
        let in_flight = storage::refunds_in_flight(&mut c, id)
            .await
            .map_err(db_err)?;
        let left = p.amount - p.refunded - in_flight;
        if req.amount > left {
            return Err(ApiError::validation(vec![FieldError::new(
                "amount",
                format!("at most Rp {left} is left to refund"),
            )]));
        }
        if !req.manual {
            if !refundable(&channel) {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "manual_refund_required",
                    format!(
                        "Midtrans cannot refund {channel} payments: send the money back by bank \
                         transfer, then record it here with \"manual\": true and the transfer's \
                         reference"
                    ),
                ));
            }
            if state != State::Settled
                && state != State::PartiallyRefunded
                && req.amount != p.amount
            {
                return Err(ApiError::conflict(
                    "not_settled",
                    "before settlement only the whole payment can be given back (it is cancelled \
                     at Midtrans); refund part of it once it has settled",
                ));
            }
        }
        drop(c);
        let row = RefundRow {
            id: uuid::Uuid::now_v7().to_string(),
            payment_id: id.to_owned(),
            idem_key: key.to_owned(),
            amount: req.amount,
            reason: reason.to_owned(),
            status: "requested".to_owned(),
            manual: i32::from(req.manual),
            reference: req.reference.clone(),
            status_message: None,
            by_user: by.to_owned(),
            created_at: now,
            completed_at: None,
        };
        let mut c = self.db.pool().acquire().await.map_err(db_err)?;
        if !storage::insert_refund(&mut c, &row).await.map_err(db_err)? {
            return Err(ApiError::conflict(
                "request_in_progress",
                "a refund with this Idempotency-Key is in progress; retry shortly",
            )
            .with_retry_after(1));
        }
        drop(c);
        if req.manual {
            return self.record_refund(row, None).await.map(|r| (true, r));
        }
        self.refund_at_midtrans(&p, row).await.map(|r| (true, r))
    }

    async fn refund_at_midtrans(&self, p: &PaymentRow, r: RefundRow) -> Api<Refund> {
        let mid = self.midtrans()?;
        let state = parse_state(&p.status)?;
        let answer = if matches!(state, State::Settled | State::PartiallyRefunded) {
            mid.refund(&p.order_id, &r.id, r.amount, &r.reason).await
        } else {
            mid.cancel(&p.order_id, &r.id).await
        };
        match answer {
            Ok(a) => {
                self.config.failpoints.hit("refund.after_midtrans")?;
                self.record_refund(r, Some(&a)).await
            }
            Err(MidtransError::Refused {
                message,
                status_code,
                ..
            }) if status_code != "401" => {
                let mut c = self.db.pool().acquire().await.map_err(db_err)?;
                storage::finish_refund(
                    &mut c,
                    &r.id,
                    "failed",
                    Some(&message),
                    self.clock.now_ms(),
                )
                .await
                .map_err(db_err)?;
                Err(refund_refused(Some(&message)))
            }
            Err(e) => Err(self.midtrans_failed(&e)),
        }
    }

    /// Records refund `r` (still `requested`) done — at Midtrans
    /// (`answer`) or by hand — with the payment's new state and
    /// `payment.refunded`, in one transaction; once, however many
    /// requests record it at the same time.
    async fn record_refund(&self, r: RefundRow, answer: Option<&Value>) -> Api<Refund> {
        let status = answer
            .and_then(|a| a["transaction_status"].as_str())
            .and_then(TransactionStatus::parse);
        let message = answer.and_then(|a| a["status_message"].as_str());
        let alongside = Alongside::RefundDone { id: &r.id, message };
        self.mutate_with(&r.payment_id, alongside, |p, from| {
            p.refunded = (p.refunded + r.amount).min(p.amount);
            let seen = match status {
                Some(TransactionStatus::Cancel) => TransactionStatus::Cancel,
                _ if p.refunded >= p.amount => TransactionStatus::Refund,
                _ => TransactionStatus::PartialRefund,
            };
            let to = match state::step(from, seen, None) {
                Step::Move(t) => Some(t),
                _ => None,
            };
            let event = Ev {
                kind: "payment.refunded",
                amount: r.amount,
                refund_id: Some(r.id.clone()),
                reason: Some(r.reason.clone()),
                manual: Some(r.manual != 0),
            };
            Ok((to, vec![event]))
        })
        .await?;
        let mut c = self.db.pool().acquire().await.map_err(db_err)?;
        storage::refund_by_key(&mut c, &r.payment_id, &r.idem_key)
            .await
            .map_err(db_err)?
            .map(Refund::from)
            .ok_or_else(|| ApiError::internal(&"a refund vanished"))
    }

    // ---- the janitor ------------------------------------------------------

    /// One pass: re-checks up to `janitor_batch` payments due a check.
    /// Each is claimed first (safe with several instances). Returns how
    /// many it checked.
    pub async fn janitor_pass(&self) -> Api<usize> {
        let Some(mid) = self.midtrans.as_ref() else {
            return Ok(0);
        };
        let now = self.clock.now_ms();
        let mut c = self.db.pool().acquire().await.map_err(db_err)?;
        let due = storage::due(&mut c, now, i64::from(self.config.janitor_batch))
            .await
            .map_err(db_err)?;
        let mut checked = 0;
        for (id, seen) in due {
            // Hold it for a minute while this instance asks Midtrans.
            if !storage::claim_check(&mut c, &id, seen, now + 60_000)
                .await
                .map_err(db_err)?
            {
                continue;
            }
            checked += 1;
            if let Err(e) = self.check(mid, &id).await {
                tracing::warn!(payment = %id, error = %e, "janitor check failed; retried later");
            }
        }
        Ok(checked)
    }

    async fn check(&self, mid: &Midtrans, id: &str) -> Api<()> {
        let mut c = self.db.pool().acquire().await.map_err(db_err)?;
        let p = storage::payment(&mut c, id)
            .await
            .map_err(db_err)?
            .ok_or_else(|| ApiError::not_found("no such payment"))?;
        drop(c);
        let now = self.clock.now_ms();
        let bump = |row: &mut PaymentRow| row.checks = row.checks.saturating_add(1);
        let past_expiry = p.expires_at.is_some_and(|e| now > e + EXPIRY_GRACE_MS);
        match mid.status(&p.order_id).await {
            Ok(Some(answer)) => {
                let (row, _) = self.apply(&p.id, &answer).await?;
                if row.status == State::Pending.as_str() && past_expiry {
                    // Midtrans should have expired it: make it so.
                    let key = derived_key(&[&p.id, "expire"]);
                    match mid.expire(&p.order_id, &key).await {
                        Ok(a) => {
                            self.apply(&p.id, &a).await?;
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot expire a payment at Midtrans"),
                    }
                }
                self.mutate(&p.id, |row, _| {
                    bump(row);
                    Ok(None)
                })
                .await?;
            }
            Ok(None) => {
                let snap = p.method == Method::Snap.as_str();
                let never_charged = !snap && now - p.created_at > RECOVER_AFTER_MS;
                self.mutate(&p.id, |row, state| {
                    bump(row);
                    Ok(match state {
                        State::Created if never_charged => {
                            row.status_message = Some("the charge never reached Midtrans".into());
                            Some(State::Failed)
                        }
                        State::Created | State::Pending if snap && past_expiry => {
                            Some(State::Expired)
                        }
                        _ => None,
                    })
                })
                .await?;
            }
            Err(e) => {
                tracing::warn!(payment = %p.id, error = %e, "janitor: Midtrans did not answer");
                self.mutate(&p.id, |row, _| {
                    bump(row);
                    Ok(None)
                })
                .await?;
            }
        }
        Ok(())
    }

    /// Hourly: forgets replayable answers older than 48h.
    pub async fn housekeeping(self: Arc<Self>) {
        let before = self.clock.now_ms() - REQUESTS_KEPT_MS;
        match self.db.pool().acquire().await {
            Ok(mut c) => {
                if let Err(e) = storage::purge_requests(&mut c, before).await {
                    tracing::warn!(error = %e, "cannot purge old idempotency keys");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot purge old idempotency keys"),
        }
    }
}

/// 503 `payments_disabled`.
fn disabled() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "payments_disabled",
        "payments are disabled: no Midtrans server key is configured \
         (TIERGATE_MIDTRANS_SERVER_KEY or _FILE)",
    )
}

fn refund_refused(message: Option<&str>) -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "refund_refused",
        format!(
            "Midtrans refused the refund: {}",
            message.unwrap_or("no message")
        ),
    )
}

/// A helper for routes: a payment's view.
pub fn views(p: &Payments, rows: &[PaymentRow]) -> Vec<Payment> {
    rows.iter().map(|r| p.view(r)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_checks_grow_then_land_just_after_expiry() {
        let now = 1_000_000;
        let far = Some(now + 10 * 24 * 3_600_000);
        let at = |checks| next_check(State::Pending, checks, now, far).unwrap() - now;
        assert_eq!(
            [at(0), at(1), at(2), at(3), at(9)],
            [60_000, 300_000, 1_800_000, 7_200_000, 7_200_000]
        );
        // Expiring in 10 minutes: the 30-minute check comes just after.
        let soon = Some(now + 600_000);
        assert_eq!(
            next_check(State::Pending, 2, now, soon),
            Some(now + 660_000)
        );
        assert_eq!(next_check(State::Pending, 0, now, soon), Some(now + 60_000));
        for s in [
            State::Settled,
            State::Expired,
            State::Refunded,
            State::Reversed,
        ] {
            assert_eq!(next_check(s, 0, now, far), None, "{s:?}");
        }
        assert!(next_check(State::Created, 0, now, None).is_some());
    }

    #[test]
    fn test_derived_keys_fit_midtrans() {
        let k = derived_key(&["0193f0e8-7d2c-7bb1-9f0a-1c2d3e4f5a6b", "cancel"]);
        assert_eq!(k.len(), 32);
        assert_ne!(
            k,
            derived_key(&["0193f0e8-7d2c-7bb1-9f0a-1c2d3e4f5a6b", "expire"])
        );
    }

    fn row(amount: i64, refunded: i64) -> PaymentRow {
        PaymentRow {
            id: "p".into(),
            invoice_id: "i".into(),
            invoice_number: "INV/2026/11/000001".into(),
            attempt: 1,
            order_id: "INV-2026-11-000001-1".into(),
            method: "bca_va".into(),
            channel: None,
            status: "pending".into(),
            amount,
            currency: "IDR".into(),
            subject_kind: "user".into(),
            subject_id: "u".into(),
            user_id: "u".into(),
            open_invoice: None,
            transaction_id: None,
            fraud_status: None,
            instructions: None,
            request: None,
            status_message: None,
            refunded,
            mismatch: 0,
            expires_at: None,
            next_check_at: None,
            checks: 0,
            created_at: 0,
            updated_at: 0,
            paid_at: None,
        }
    }

    /// Which events each kind of move writes.
    #[test]
    fn test_events_of_moves() {
        let kinds = |from, to, p: &PaymentRow| {
            events_for(from, to, p)
                .into_iter()
                .map(|e| (e.kind, e.amount))
                .collect::<Vec<_>>()
        };
        let p = row(100_000, 0);
        use State as S;
        for (from, to, want) in [
            (S::Created, S::Pending, vec![("payment.pending", 100_000)]),
            (S::Pending, S::Settled, vec![("payment.settled", 100_000)]),
            (S::Created, S::Settled, vec![("payment.settled", 100_000)]),
            (S::Pending, S::Captured, vec![("payment.settled", 100_000)]),
            (S::Captured, S::Settled, vec![]),
            (
                S::Challenge,
                S::Captured,
                vec![("payment.settled", 100_000)],
            ),
            (S::Pending, S::Challenge, vec![]),
            (S::Pending, S::Expired, vec![("payment.expired", 100_000)]),
            (S::Pending, S::Denied, vec![("payment.failed", 100_000)]),
            (S::Challenge, S::Denied, vec![("payment.failed", 100_000)]),
            (S::Pending, S::Cancelled, vec![("payment.failed", 100_000)]),
            (S::Created, S::Failed, vec![("payment.failed", 100_000)]),
            (
                S::Captured,
                S::Cancelled,
                vec![("payment.refunded", 100_000)],
            ),
            (S::Settled, S::Reversed, vec![("payment.refunded", 100_000)]),
            (
                S::Settled,
                S::ChargedBack,
                vec![("payment.refunded", 100_000)],
            ),
            (S::Settled, S::Refunded, vec![]),
        ] {
            assert_eq!(kinds(from, to, &p), want, "{from:?} → {to:?}");
        }
        // A reversal after a partial refund gives back only the rest.
        assert_eq!(
            kinds(S::PartiallyRefunded, S::ChargedBack, &row(100_000, 30_000)),
            vec![("payment.refunded", 70_000)]
        );
    }
}
