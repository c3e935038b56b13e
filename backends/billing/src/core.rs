//! Billing's logic: invoices (created once per reference, numbered at
//! issue), their state machine, payments recorded against them, credit
//! notes, and the PDFs.
//!
//! The state machine of an invoice ([`Status`]), which never moves back:
//!
//! ```text
//! draft ──issue──▶ open ──paid in full──▶ paid
//!   │                │
//!   └──void──▶ void ◀┘ (an admin, or the caller whose change lapsed)
//! ```
//!
//! A paid invoice is corrected by a credit note, never voided. Money that
//! arrives for a paid or void invoice, or beyond the total, is an
//! overpayment for an admin to refund or credit.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sqlx::AnyConnection;
use tokio::sync::Notify;

use backend_common::blocking::Bounded;
use backend_common::calendar::BusinessCalendar;
use backend_common::client::ServiceClient;
use backend_common::clock::Clock;
use backend_common::db::{on_constraint, Db};
use backend_common::money::Rupiah;
use backend_common::outbox::Outbox;
use backend_common::user_auth::Subject;
use backend_common::{ApiError, FieldError, Validator};

use crate::config::BillingConfig;
use crate::pdf;
use crate::storage::{self, CreditNoteRow, InvoiceRow, LineRow, OverpaymentRow, PaymentRow};
use crate::tax::{Totals, TotalsError};

/// The states of an invoice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Being prepared: no number, not shown to the buyer.
    Draft,
    /// Issued and numbered, awaiting payment.
    Open,
    /// Paid in full.
    Paid,
    /// Cancelled; keeps its number if it had one.
    Void,
}

impl Status {
    /// Its name in the database and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Draft => "draft",
            Status::Open => "open",
            Status::Paid => "paid",
            Status::Void => "void",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "draft" => Status::Draft,
            "open" => Status::Open,
            "paid" => Status::Paid,
            "void" => Status::Void,
            _ => return None,
        })
    }

    /// Whether an invoice may move from `self` to `to`.
    pub fn can_become(self, to: Status) -> bool {
        matches!(
            (self, to),
            (Status::Draft, Status::Open)
                | (Status::Draft, Status::Void)
                | (Status::Open, Status::Paid)
                | (Status::Open, Status::Void)
        )
    }
}

/// A line of a new invoice.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewLine {
    /// What it is, 1–200 characters.
    pub description: String,
    /// How many, 1–1,000,000 (default 1).
    #[serde(default = "one")]
    pub quantity: i64,
    /// Price of one in whole rupiah before PPN; negative for a credit
    /// (a proration credit).
    pub unit_price: i64,
}

fn one() -> i64 {
    1
}

/// `POST /internal/invoices`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewInvoice {
    /// What it bills, e.g. `{"kind": "plan_change", "id": "…"}` or
    /// `{"kind": "renewal", "subscription_id": "…", "period_start": …}`:
    /// the same reference never yields two invoices.
    #[schema(value_type = Object)]
    pub reference: Value,
    /// Who is billed: `{"kind": "user" | "organization", "id": …}`.
    #[schema(value_type = Object)]
    pub subject: Subject,
    /// The person who bought (their name and e-mail go on the invoice).
    pub user_id: String,
    /// The lines, 1–100.
    pub lines: Vec<NewLine>,
    /// The plan it is for (`PREMIUM`), for revenue per plan.
    #[serde(default)]
    pub plan: Option<String>,
    /// `monthly` or `yearly`, for MRR.
    #[serde(default)]
    pub cycle: Option<String>,
    /// The service period it pays for (Unix ms).
    #[serde(default)]
    pub period_start: Option<i64>,
    /// End of that period (Unix ms).
    #[serde(default)]
    pub period_end: Option<i64>,
    /// The plan's price per cycle before PPN, for MRR (a prorated
    /// plan-change invoice names the full price here); default: the sum
    /// of the positive lines.
    #[serde(default)]
    pub recurring_price: Option<i64>,
    /// When it is due (Unix ms); default `due_after` from issue.
    #[serde(default)]
    pub due_at: Option<i64>,
    /// Keep it a draft (no number) until `POST …/issue`.
    #[serde(default)]
    pub draft: bool,
}

/// The buyer as printed.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Buyer {
    /// The person's (or organization's) name.
    pub name: String,
    /// The person's e-mail.
    pub email: String,
    /// The company's legal name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub legal_name: Option<String>,
    /// NPWP, 16 digits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub npwp: Option<String>,
    /// NITKU, 22 digits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nitku: Option<String>,
    /// Address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}

/// A line as stored.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Line {
    /// What it is.
    pub description: String,
    /// How many.
    pub quantity: i64,
    /// Price of one before PPN.
    pub unit_price: i64,
    /// quantity × unit price.
    pub amount: i64,
}

/// A credit note.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct CreditNote {
    /// Id.
    pub id: String,
    /// `CN/2026/000012`.
    pub number: String,
    /// The invoice it credits.
    pub invoice_id: String,
    /// What the buyer gets back, PPN included.
    pub amount: i64,
    /// Its price part.
    pub price: i64,
    /// Its PPN part (reversed in proportion).
    pub ppn: i64,
    /// Why.
    pub reason: String,
    /// Issued, Unix ms.
    pub issued_at: i64,
    /// The PDF.
    pub pdf_url: String,
}

impl From<CreditNoteRow> for CreditNote {
    fn from(n: CreditNoteRow) -> Self {
        Self {
            pdf_url: format!("/api/billing/credit-notes/{}/pdf", n.id),
            id: n.id,
            number: n.number,
            invoice_id: n.invoice_id,
            amount: n.amount,
            price: n.price,
            ppn: n.ppn,
            reason: n.reason,
            issued_at: n.issued_at,
        }
    }
}

/// An invoice.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Invoice {
    /// Id.
    pub id: String,
    /// `INV/2026/11/000123`; absent on a draft.
    pub number: Option<String>,
    /// `draft`, `open`, `paid` or `void`.
    pub status: String,
    /// Who is billed.
    #[schema(value_type = Object)]
    pub subject: Value,
    /// Who bought.
    pub user_id: String,
    /// The buyer as printed.
    pub buyer: Buyer,
    /// What it bills.
    #[schema(value_type = Object)]
    pub reference: Value,
    /// The plan.
    pub plan: Option<String>,
    /// `monthly` or `yearly`.
    pub cycle: Option<String>,
    /// The period it pays for.
    pub period_start: Option<i64>,
    /// End of that period.
    pub period_end: Option<i64>,
    /// The plan's price per cycle before PPN (MRR counts it).
    pub recurring_price: Option<i64>,
    /// `IDR`.
    pub currency: String,
    /// The lines.
    pub lines: Vec<Line>,
    /// Σ lines, before PPN.
    pub subtotal: i64,
    /// 11/12 of the subtotal.
    pub dpp: i64,
    /// 12% of the DPP.
    pub ppn: i64,
    /// subtotal + PPN.
    pub total: i64,
    /// Received so far.
    pub amount_paid: i64,
    /// What is still owed (0 once paid or void).
    pub amount_due: i64,
    /// Refunded so far.
    pub amount_refunded: i64,
    /// How it was paid.
    pub payment_method: Option<String>,
    /// Credit notes against it.
    pub credit_notes: Vec<CreditNote>,
    /// Created, Unix ms.
    pub created_at: i64,
    /// Issued, Unix ms.
    pub issued_at: Option<i64>,
    /// Due, Unix ms.
    pub due_at: Option<i64>,
    /// Paid, Unix ms.
    pub paid_at: Option<i64>,
    /// Voided, Unix ms.
    pub voided_at: Option<i64>,
    /// Why it was voided.
    pub void_reason: Option<String>,
    /// The PDF (issued invoices).
    pub pdf_url: Option<String>,
}

/// Canonical JSON: object keys sorted at every level, so two spellings
/// of one reference are one key.
fn canonical(v: &Value) -> String {
    fn sort(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<_> = m.keys().collect();
                keys.sort();
                let mut out = serde_json::Map::new();
                for k in keys {
                    out.insert(k.clone(), sort(&m[k]));
                }
                Value::Object(out)
            }
            Value::Array(a) => Value::Array(a.iter().map(sort).collect()),
            other => other.clone(),
        }
    }
    // Keys are inserted in order; with serde_json's preserve_order the
    // map keeps it, without it the map sorts: sorted either way.
    sort(v).to_string()
}

fn hex_sha256(s: &str) -> String {
    let digest = Sha256::digest(s.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn field(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::validation(vec![FieldError::new(field, message)])
}

fn not_found() -> ApiError {
    ApiError::not_found("no such invoice")
}

fn totals_error(e: TotalsError) -> ApiError {
    field("lines", e.to_string())
}

/// The user as the users service returns it.
#[derive(Deserialize)]
struct UserDto {
    email: String,
    name: String,
}

/// The organization as the users service returns it.
#[derive(Deserialize)]
struct OrgDto {
    name: String,
    #[serde(default)]
    company: CompanyDto,
}

#[derive(Deserialize, Default)]
struct CompanyDto {
    legal_name: Option<String>,
    npwp: Option<String>,
    nitku: Option<String>,
    address: Option<String>,
}

/// What a recorded payment did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentOutcome {
    /// It paid the invoice in full.
    Paid,
    /// The invoice stays open with less owed.
    Partial,
    /// Money beyond what the invoice asked: an overpayment to resolve.
    Overpaid,
    /// No such invoice here (reconciliation lists it).
    UnknownInvoice,
    /// Recorded before: nothing changed.
    Duplicate,
}

/// The billing service.
pub struct Billing {
    /// Its database.
    pub db: Db,
    /// Its outbox.
    pub outbox: Outbox,
    /// Its clock.
    pub clock: Clock,
    /// The business calendar.
    pub calendar: BusinessCalendar,
    /// Calls to users.
    pub client: ServiceClient,
    /// `services.billing`.
    pub config: BillingConfig,
    /// Where PDFs are rendered.
    pub renderers: Bounded,
    /// Wakes the document renderer.
    pub render_wake: Arc<Notify>,
}

impl Billing {
    async fn conn(&self) -> Result<sqlx::pool::PoolConnection<sqlx::Any>, ApiError> {
        Ok(self.db.pool().acquire().await?)
    }

    fn validate(&self, new: &NewInvoice) -> Result<(), ApiError> {
        let mut v = Validator::new();
        match new.reference.get("kind").and_then(Value::as_str) {
            Some(k) if !k.is_empty() && k.len() <= 40 => {}
            _ => {
                v.fail("reference", "must be an object with a string `kind`");
            }
        }
        if !new.reference.is_object() || canonical(&new.reference).len() > 1000 {
            v.fail("reference", "must be an object of at most 1000 characters");
        }
        if new.subject.id().is_empty() || new.subject.id().len() > 100 {
            v.fail("subject.id", "must be 1 to 100 characters");
        }
        if new.user_id.is_empty() || new.user_id.len() > 100 {
            v.fail("user_id", "must be 1 to 100 characters");
        }
        if new.lines.is_empty() || new.lines.len() > 100 {
            v.fail("lines", "must have 1 to 100 lines");
        }
        for (i, l) in new.lines.iter().enumerate() {
            let d = l.description.trim();
            if d.is_empty() || d.chars().count() > 200 || d.chars().any(char::is_control) {
                v.fail(
                    &format!("lines[{i}].description"),
                    "must be 1 to 200 characters, no control characters",
                );
            }
            if !(1..=1_000_000).contains(&l.quantity) {
                v.fail(&format!("lines[{i}].quantity"), "must be 1 to 1000000");
            }
            if l.unit_price.unsigned_abs() > 1_000_000_000_000 {
                v.fail(
                    &format!("lines[{i}].unit_price"),
                    "must be within ±Rp 1.000.000.000.000",
                );
            }
        }
        if let Some(c) = &new.cycle {
            if c != "monthly" && c != "yearly" {
                v.fail("cycle", "must be monthly or yearly");
            }
        }
        if let Some(p) = &new.plan {
            if p.is_empty() || p.len() > 40 {
                v.fail("plan", "must be 1 to 40 characters");
            }
        }
        if new
            .recurring_price
            .is_some_and(|p| !(0..=1_000_000_000_000).contains(&p))
        {
            v.fail("recurring_price", "must be 0 to Rp 1.000.000.000.000");
        }
        if let (Some(s), Some(e)) = (new.period_start, new.period_end) {
            if e <= s {
                v.fail("period_end", "must be after period_start");
            }
        }
        v.finish()
    }

    /// The buyer of `new`, from the users service.
    async fn buyer(&self, new: &NewInvoice) -> Result<Buyer, ApiError> {
        let user: UserDto = match self
            .client
            .get("users", &format!("/internal/users/{}", new.user_id))
            .await
        {
            Ok(u) => u,
            Err(e) if e.is_not_found() => return Err(field("user_id", "no such user")),
            Err(e) => return Err(e.into()),
        };
        let mut buyer = Buyer {
            name: user.name,
            email: user.email,
            legal_name: None,
            npwp: None,
            nitku: None,
            address: None,
        };
        if let Subject::Organization(org_id) = &new.subject {
            let org: OrgDto = match self
                .client
                .get("users", &format!("/internal/organizations/{org_id}"))
                .await
            {
                Ok(o) => o,
                Err(e) if e.is_not_found() => {
                    return Err(field("subject.id", "no such organization"))
                }
                Err(e) => return Err(e.into()),
            };
            buyer.name = format!("{} (u.p. {})", org.name, buyer.name);
            buyer.legal_name = org.company.legal_name;
            buyer.npwp = org.company.npwp;
            buyer.nitku = org.company.nitku;
            buyer.address = org.company.address;
        }
        Ok(buyer)
    }

    /// Creates (and unless `draft`, issues) the invoice of `new.reference`;
    /// `(invoice, created)`. The same reference with the same request is
    /// the same invoice (`created` false); with a different request, 409.
    pub async fn create(&self, new: &NewInvoice) -> Result<(Invoice, bool), ApiError> {
        self.validate(new)?;
        let reference_key = canonical(&new.reference);
        let request = serde_json::to_value(new).map_err(|e| ApiError::internal(&e))?;
        let request_hash = hex_sha256(&canonical(&request));
        if let Some(found) =
            storage::invoice_by_reference(&mut *self.conn().await?, &reference_key).await?
        {
            return self.replay(found, &request_hash).await;
        }
        let lines: Vec<LineRow> = new
            .lines
            .iter()
            .enumerate()
            .map(|(i, l)| LineRow {
                position: i32::try_from(i).unwrap_or(i32::MAX),
                description: l.description.trim().to_owned(),
                quantity: l.quantity,
                unit_price: l.unit_price,
                amount: l.quantity.saturating_mul(l.unit_price),
            })
            .collect();
        let totals = Totals::of_lines(
            new.lines.iter().map(|l| (l.quantity, l.unit_price)),
            self.config.seller.pkp,
        )
        .map_err(totals_error)?;
        let buyer = self.buyer(new).await?;
        let now = self.clock.now_ms();
        let mut row = InvoiceRow {
            id: uuid::Uuid::now_v7().to_string(),
            number: None,
            status: Status::Draft.as_str().to_owned(),
            subject_kind: new.subject.kind().to_owned(),
            subject_id: new.subject.id().to_owned(),
            user_id: new.user_id.clone(),
            buyer_name: buyer.name,
            buyer_email: buyer.email,
            buyer_legal_name: buyer.legal_name,
            buyer_npwp: buyer.npwp,
            buyer_nitku: buyer.nitku,
            buyer_address: buyer.address,
            reference: new.reference.to_string(),
            reference_key: reference_key.clone(),
            request_hash: request_hash.clone(),
            plan: new.plan.clone(),
            cycle: new.cycle.clone(),
            period_start: new.period_start,
            period_end: new.period_end,
            recurring_price: new.plan.as_ref().map(|_| {
                new.recurring_price.unwrap_or_else(|| {
                    lines
                        .iter()
                        .map(|l| l.amount.max(0))
                        .fold(0, i64::saturating_add)
                })
            }),
            currency: "IDR".to_owned(),
            subtotal: totals.subtotal,
            dpp: totals.dpp,
            ppn: totals.ppn,
            total: totals.total,
            amount_paid: 0,
            amount_refunded: 0,
            payment_method: None,
            nsfp: None,
            created_at: now,
            issued_at: None,
            due_at: new.due_at,
            paid_at: None,
            voided_at: None,
            void_reason: None,
            updated_at: now,
        };
        let mut tx = self.db.begin_write().await?;
        if let Err(e) = storage::insert_invoice(&mut tx, &row, &lines).await {
            drop(tx);
            if on_constraint(&e, &storage::REFERENCE_UNIQUE) {
                // A concurrent call with this reference won.
                let found = storage::invoice_by_reference(&mut *self.conn().await?, &reference_key)
                    .await?
                    .ok_or_else(not_found)?;
                return self.replay(found, &request_hash).await;
            }
            return Err(e.into());
        }
        if !new.draft {
            self.issue_in(&mut tx, &mut row).await?;
        }
        tx.commit().await?;
        // Committed but not answered: a retry must find this invoice.
        self.config.failpoints.hit("create.after_commit")?;
        self.after_commit(!new.draft);
        Ok((self.view(row).await?, true))
    }

    async fn replay(&self, found: InvoiceRow, hash: &str) -> Result<(Invoice, bool), ApiError> {
        if found.request_hash != hash {
            return Err(ApiError::conflict(
                "reference_conflict",
                "an invoice with this reference exists with different contents",
            ));
        }
        Ok((self.view(found).await?, false))
    }

    fn after_commit(&self, issued: bool) {
        self.outbox.notify();
        if issued {
            self.render_wake.notify_one();
        }
    }

    /// Numbers and opens a draft inside `tx`: the number comes from the
    /// year's counter, taken in this transaction, so a rollback gives it
    /// back and numbers stay gapless.
    async fn issue_in(&self, tx: &mut AnyConnection, row: &mut InvoiceRow) -> Result<(), ApiError> {
        let now = self.clock.now_ms();
        let date = self
            .calendar
            .date(now)
            .map_err(|e| ApiError::internal(&e))?;
        let seq =
            storage::next_number(tx, &self.config.invoice_prefix, i32::from(date.year())).await?;
        self.config.failpoints.hit("issue.after_number")?;
        let number = format!(
            "{}/{:04}/{:02}/{:06}",
            self.config.invoice_prefix,
            date.year(),
            date.month(),
            seq
        );
        let due_after = i64::try_from(self.config.due_after.as_millis()).unwrap_or(i64::MAX);
        let due = row.due_at.unwrap_or(now.saturating_add(due_after));
        if !storage::set_issued(tx, &row.id, &number, now, due).await? {
            return Err(ApiError::conflict(
                "not_draft",
                "only a draft invoice can be issued",
            ));
        }
        row.number = Some(number.clone());
        row.status = Status::Open.as_str().to_owned();
        row.issued_at = Some(now);
        row.due_at = Some(due);
        row.updated_at = now;
        self.outbox
            .enqueue(tx, "invoice.issued", &self.event_data(row, json!({})), now)
            .await?;
        self.config.failpoints.hit("issue.before_commit")?;
        Ok(())
    }

    fn event_data(&self, row: &InvoiceRow, extra: Value) -> Value {
        let mut data = json!({
            "user_id": row.user_id,
            "subject": {"kind": row.subject_kind, "id": row.subject_id},
            "invoice_id": row.id,
            "number": row.number,
            "status": row.status,
            "subtotal": row.subtotal,
            "ppn": row.ppn,
            "total": row.total,
            "due_at": row.due_at,
            "plan": row.plan,
            "reference": serde_json::from_str::<Value>(&row.reference).unwrap_or(Value::Null),
            "email": row.buyer_email,
        });
        if let (Value::Object(d), Value::Object(e)) = (&mut data, extra) {
            d.extend(e);
        }
        data
    }

    /// Issues a draft.
    pub async fn issue(&self, id: &str) -> Result<Invoice, ApiError> {
        let mut tx = self.db.begin_write().await?;
        if !storage::lock_invoice(&mut tx, id).await? {
            return Err(not_found());
        }
        let mut row = storage::invoice(&mut tx, id).await?.ok_or_else(not_found)?;
        if row.status != Status::Draft.as_str() {
            return Err(ApiError::conflict(
                "not_draft",
                "only a draft invoice can be issued",
            ));
        }
        self.issue_in(&mut tx, &mut row).await?;
        tx.commit().await?;
        self.after_commit(true);
        self.view(row).await
    }

    /// Voids a draft or open invoice (it keeps its number).
    pub async fn void(&self, id: &str, reason: &str) -> Result<Invoice, ApiError> {
        let reason = reason.trim();
        if reason.is_empty() || reason.chars().count() > 500 {
            return Err(field("reason", "must be 1 to 500 characters"));
        }
        let now = self.clock.now_ms();
        let mut tx = self.db.begin_write().await?;
        if !storage::lock_invoice(&mut tx, id).await? {
            return Err(not_found());
        }
        let mut row = storage::invoice(&mut tx, id).await?.ok_or_else(not_found)?;
        let from = Status::parse(&row.status).ok_or_else(not_found)?;
        if from == Status::Void && row.void_reason.as_deref() == Some(reason) {
            // Voiding twice with the same reason is the same request.
            drop(tx);
            return self.view(row).await;
        }
        if !from.can_become(Status::Void) || !storage::set_void(&mut tx, id, reason, now).await? {
            return Err(ApiError::conflict(
                "cannot_void",
                "only a draft or open invoice can be voided; credit a paid one",
            ));
        }
        let was_issued = from == Status::Open;
        row.status = Status::Void.as_str().to_owned();
        row.voided_at = Some(now);
        row.void_reason = Some(reason.to_owned());
        if was_issued {
            self.outbox
                .enqueue(
                    &mut tx,
                    "invoice.voided",
                    &self.event_data(&row, json!({"reason": reason})),
                    now,
                )
                .await?;
        }
        tx.commit().await?;
        self.after_commit(was_issued);
        self.view(row).await
    }

    /// Records the Faktur Pajak serial DJP's Coretax gave the invoice
    /// (admins). The same serial again is a no-op; another replaces it
    /// only with `replace` (a replacement Faktur Pajak).
    pub async fn set_nsfp(&self, id: &str, nsfp: &str, replace: bool) -> Result<Invoice, ApiError> {
        let nsfp = parse_nsfp(nsfp).ok_or_else(|| {
            field(
                "nsfp",
                "must be the 17 digits of a Faktur Pajak serial: transaction code 01-10, status, serial",
            )
        })?;
        if !self.config.seller.pkp {
            return Err(ApiError::conflict(
                "not_pkp",
                "the seller is not a PKP (services.billing.seller.pkp): its invoices have no Faktur Pajak",
            ));
        }
        let now = self.clock.now_ms();
        let mut tx = self.db.begin_write().await?;
        if !storage::lock_invoice(&mut tx, id).await? {
            return Err(not_found());
        }
        let mut row = storage::invoice(&mut tx, id).await?.ok_or_else(not_found)?;
        match row.nsfp.as_deref() {
            Some(same) if same == nsfp => {
                drop(tx);
                return self.view(row).await;
            }
            Some(_) if !replace => return Err(ApiError::conflict(
                "nsfp_set",
                "the invoice has another NSFP; send `replace: true` for a replacement Faktur Pajak",
            )),
            _ => {}
        }
        if !storage::set_nsfp(&mut tx, id, &nsfp, now).await? {
            return Err(ApiError::conflict(
                "not_issued",
                "only an open or paid invoice takes a Faktur Pajak serial",
            ));
        }
        tx.commit().await?;
        self.render_wake.notify_one();
        row.nsfp = Some(nsfp);
        row.updated_at = now;
        self.view(row).await
    }

    /// Records a settled payment of `amount` against `invoice_id`, once per
    /// `payment_id`, inside the consumer's transaction.
    #[allow(clippy::too_many_arguments)]
    pub async fn record_payment(
        &self,
        tx: &mut AnyConnection,
        payment_id: &str,
        invoice_id: &str,
        amount: i64,
        method: Option<&str>,
        occurred_at: i64,
    ) -> Result<PaymentOutcome, ApiError> {
        let now = self.clock.now_ms();
        let found = if storage::lock_invoice(tx, invoice_id).await? {
            storage::invoice(tx, invoice_id).await?
        } else {
            None
        };
        let mut payment = PaymentRow {
            payment_id: payment_id.to_owned(),
            kind: "settled".to_owned(),
            invoice_id: invoice_id.to_owned(),
            amount,
            method: method.map(str::to_owned),
            occurred_at,
            recorded_at: now,
            outcome: String::new(),
        };
        let Some(mut row) = found else {
            payment.outcome = "unknown_invoice".to_owned();
            return Ok(if storage::insert_payment(tx, &payment).await? {
                tracing::warn!(payment_id, invoice_id, "a payment names no invoice of ours");
                PaymentOutcome::UnknownInvoice
            } else {
                PaymentOutcome::Duplicate
            });
        };
        let status = Status::parse(&row.status).unwrap_or(Status::Void);
        let paid = row.amount_paid.saturating_add(amount);
        let (outcome, over) = match status {
            Status::Open => {
                if paid >= row.total {
                    (PaymentOutcome::Paid, paid - row.total)
                } else {
                    (PaymentOutcome::Partial, 0)
                }
            }
            // A second payment of a paid invoice, or money for a void or
            // draft one: all of it is to be given back.
            _ => (PaymentOutcome::Overpaid, amount),
        };
        payment.outcome = match (outcome, over) {
            (PaymentOutcome::Paid, 0) => "paid",
            (PaymentOutcome::Paid, _) | (PaymentOutcome::Overpaid, _) => "overpaid",
            _ => "partial",
        }
        .to_owned();
        if !storage::insert_payment(tx, &payment).await? {
            return Ok(PaymentOutcome::Duplicate);
        }
        if status == Status::Open {
            let closes = outcome == PaymentOutcome::Paid;
            let paid_at = occurred_at.min(now);
            let stored = if closes {
                storage::set_payment(tx, &row.id, paid, Some((paid_at, method)), now).await?
            } else {
                storage::set_payment(tx, &row.id, paid, None, now).await?
            };
            if !stored {
                return Err(ApiError::internal(&"the invoice changed under its lock"));
            }
            if closes {
                row.status = Status::Paid.as_str().to_owned();
                row.amount_paid = paid;
                row.paid_at = Some(paid_at);
                row.payment_method = method.map(str::to_owned);
                self.outbox
                    .enqueue(
                        tx,
                        "invoice.paid",
                        &self.event_data(
                            &row,
                            json!({"amount_paid": paid, "paid_at": paid_at,
                                   "payment_id": payment_id, "method": method}),
                        ),
                        now,
                    )
                    .await?;
            }
        }
        if over > 0 {
            storage::insert_overpayment(
                tx,
                &OverpaymentRow {
                    id: uuid::Uuid::now_v7().to_string(),
                    invoice_id: row.id.clone(),
                    payment_id: payment_id.to_owned(),
                    amount: over,
                    status: "open".to_owned(),
                    note: Some(format!(
                        "received while the invoice was {}",
                        status.as_str()
                    )),
                    created_at: now,
                    resolved_at: None,
                },
            )
            .await?;
            tracing::warn!(
                payment_id,
                invoice_id,
                amount = over,
                "overpayment recorded"
            );
        }
        self.config.failpoints.hit("payment.before_commit")?;
        self.render_wake.notify_one();
        Ok(if over > 0 {
            PaymentOutcome::Overpaid
        } else {
            outcome
        })
    }

    /// Records a refund once per `payment_id`; the invoice's state stays
    /// (a refund does not un-pay it; a credit note corrects the books),
    /// and an open overpayment of that payment is marked refunded.
    pub async fn record_refund(
        &self,
        tx: &mut AnyConnection,
        payment_id: &str,
        refund_id: Option<&str>,
        invoice_id: &str,
        amount: i64,
        occurred_at: i64,
    ) -> Result<bool, ApiError> {
        let now = self.clock.now_ms();
        let payment = PaymentRow {
            // Each refund once: by its own id when the payment is refunded
            // in parts.
            payment_id: refund_id.unwrap_or(payment_id).to_owned(),
            kind: "refunded".to_owned(),
            invoice_id: invoice_id.to_owned(),
            amount,
            method: None,
            occurred_at,
            recorded_at: now,
            outcome: "refund".to_owned(),
        };
        if !storage::insert_payment(tx, &payment).await? {
            return Ok(false);
        }
        storage::add_refund(tx, invoice_id, amount, now).await?;
        storage::resolve_overpayment(tx, payment_id, "refunded", None, now).await?;
        Ok(true)
    }

    /// Issues a credit note against a paid invoice: gapless number of its
    /// own series, PPN reversed in proportion. Credits never exceed the
    /// invoice's total.
    pub async fn credit(
        &self,
        invoice_id: &str,
        amount: i64,
        reason: &str,
        by: &str,
    ) -> Result<CreditNote, ApiError> {
        let reason = reason.trim();
        let mut v = Validator::new();
        v.check(amount > 0, "amount", "must be at least Rp 1");
        v.check(
            !reason.is_empty() && reason.chars().count() <= 500,
            "reason",
            "must be 1 to 500 characters",
        );
        v.finish()?;
        let now = self.clock.now_ms();
        let mut tx = self.db.begin_write().await?;
        if !storage::lock_invoice(&mut tx, invoice_id).await? {
            return Err(not_found());
        }
        let row = storage::invoice(&mut tx, invoice_id)
            .await?
            .ok_or_else(not_found)?;
        if row.status != Status::Paid.as_str() {
            return Err(ApiError::conflict(
                "not_paid",
                "credit notes are issued against paid invoices; void an open one",
            ));
        }
        let credited: i64 = storage::credit_notes_of(&mut tx, invoice_id)
            .await?
            .iter()
            .map(|n| n.amount)
            .sum();
        if credited.saturating_add(amount) > row.total {
            return Err(field(
                "amount",
                format!(
                    "at most {} is left to credit on this invoice",
                    Rupiah(row.total - credited)
                ),
            ));
        }
        let totals = Totals {
            subtotal: row.subtotal,
            dpp: row.dpp,
            ppn: row.ppn,
            total: row.total,
        };
        let (price, ppn) = totals.credit(amount);
        let date = self
            .calendar
            .date(now)
            .map_err(|e| ApiError::internal(&e))?;
        let seq = storage::next_number(
            &mut tx,
            &self.config.credit_note_prefix,
            i32::from(date.year()),
        )
        .await?;
        let note = CreditNoteRow {
            id: uuid::Uuid::now_v7().to_string(),
            number: format!(
                "{}/{:04}/{:06}",
                self.config.credit_note_prefix,
                date.year(),
                seq
            ),
            invoice_id: invoice_id.to_owned(),
            amount,
            price,
            ppn,
            reason: reason.to_owned(),
            created_by: by.to_owned(),
            issued_at: now,
        };
        storage::insert_credit_note(&mut tx, &note).await?;
        self.outbox
            .enqueue(
                &mut tx,
                "credit_note.issued",
                &self.event_data(
                    &row,
                    json!({"credit_note_id": note.id, "credit_note_number": note.number,
                           "amount": amount, "credit_ppn": ppn, "reason": reason}),
                ),
                now,
            )
            .await?;
        tx.commit().await?;
        self.outbox.notify();
        // The note is committed: a failure to render its PDF now must not
        // answer an error (a retry would credit twice). The download
        // renders it when it is missing.
        if let Err(e) = self.store_credit_note_pdf(&row, &note).await {
            tracing::warn!(credit_note = %note.id, error = %e,
                "credit-note PDF not rendered now; it is rendered at download");
        }
        Ok(CreditNote::from(note))
    }

    /// The full view of an invoice row.
    pub async fn view(&self, row: InvoiceRow) -> Result<Invoice, ApiError> {
        self.views(vec![row])
            .await?
            .pop()
            .ok_or_else(|| ApiError::internal(&"a view went missing"))
    }

    /// The full views of `rows`, in their order: two queries for the
    /// whole page (lines, credit notes), not two per invoice.
    pub async fn views(&self, rows: Vec<InvoiceRow>) -> Result<Vec<Invoice>, ApiError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn().await?;
        let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        let mut lines: HashMap<String, Vec<Line>> = HashMap::new();
        for storage::InvoiceLine {
            invoice_id,
            line: l,
        } in storage::lines_of_many(&mut conn, &ids).await?
        {
            lines.entry(invoice_id).or_default().push(Line {
                description: l.description,
                quantity: l.quantity,
                unit_price: l.unit_price,
                amount: l.amount,
            });
        }
        let mut notes: HashMap<String, Vec<CreditNote>> = HashMap::new();
        for n in storage::credit_notes_of_many(&mut conn, &ids).await? {
            notes
                .entry(n.invoice_id.clone())
                .or_default()
                .push(CreditNote::from(n));
        }
        Ok(rows
            .into_iter()
            .map(|row| {
                let lines = lines.remove(&row.id).unwrap_or_default();
                let notes = notes.remove(&row.id).unwrap_or_default();
                Self::view_of(row, lines, notes)
            })
            .collect())
    }

    fn view_of(row: InvoiceRow, lines: Vec<Line>, credit_notes: Vec<CreditNote>) -> Invoice {
        let done = row.status == "paid" || row.status == "void";
        Invoice {
            pdf_url: (row.status != "draft")
                .then(|| format!("/api/billing/invoices/{}/pdf", row.id)),
            subject: json!({"kind": row.subject_kind, "id": row.subject_id}),
            reference: serde_json::from_str(&row.reference).unwrap_or(Value::Null),
            amount_due: if done {
                0
            } else {
                (row.total - row.amount_paid).max(0)
            },
            buyer: Buyer {
                name: row.buyer_name,
                email: row.buyer_email,
                legal_name: row.buyer_legal_name,
                npwp: row.buyer_npwp,
                nitku: row.buyer_nitku,
                address: row.buyer_address,
            },
            lines,
            credit_notes,
            id: row.id,
            number: row.number,
            status: row.status,
            user_id: row.user_id,
            plan: row.plan,
            cycle: row.cycle,
            period_start: row.period_start,
            period_end: row.period_end,
            recurring_price: row.recurring_price,
            currency: row.currency,
            subtotal: row.subtotal,
            dpp: row.dpp,
            ppn: row.ppn,
            total: row.total,
            amount_paid: row.amount_paid,
            amount_refunded: row.amount_refunded,
            payment_method: row.payment_method,
            created_at: row.created_at,
            issued_at: row.issued_at,
            due_at: row.due_at,
            paid_at: row.paid_at,
            voided_at: row.voided_at,
            void_reason: row.void_reason,
        }
    }

    /// An invoice by id (internal and admin).
    pub async fn get(&self, id: &str) -> Result<Invoice, ApiError> {
        let row = storage::invoice(&mut *self.conn().await?, id)
            .await?
            .ok_or_else(not_found)?;
        self.view(row).await
    }

    /// One of `subject`'s issued invoices (404 for anyone else's).
    pub async fn get_for(&self, subject: &Subject, id: &str) -> Result<Invoice, ApiError> {
        let row = storage::invoice_of(&mut *self.conn().await?, id, subject.kind(), subject.id())
            .await?
            .ok_or_else(not_found)?;
        self.view(row).await
    }

    /// A page of `subject`'s invoices, newest first, and the next cursor.
    pub async fn list_for(
        &self,
        subject: &Subject,
        cursor: Option<&str>,
        limit: i64,
    ) -> Result<(Vec<Invoice>, Option<String>), ApiError> {
        let after = parse_cursor(cursor)?;
        let rows = storage::invoices_of(
            &mut *self.conn().await?,
            subject.kind(),
            subject.id(),
            after.as_ref().map(|(t, id)| (*t, id.as_str())),
            limit,
        )
        .await?;
        self.page(rows, limit, |r| r.issued_at.unwrap_or(0)).await
    }

    /// A page of every invoice matching `search` (admins).
    pub async fn search(
        &self,
        search: &storage::Search,
        cursor: Option<&str>,
        limit: i64,
    ) -> Result<(Vec<Invoice>, Option<String>), ApiError> {
        let after = parse_cursor(cursor)?;
        let rows = storage::search_invoices(
            &mut *self.conn().await?,
            search,
            after.as_ref().map(|(t, id)| (*t, id.as_str())),
            limit,
        )
        .await?;
        self.page(rows, limit, |r| r.created_at).await
    }

    /// The views of a page of rows and, when the page is full, the cursor
    /// after its last row (`at`: the time the page is ordered by).
    async fn page(
        &self,
        rows: Vec<InvoiceRow>,
        limit: i64,
        at: impl Fn(&InvoiceRow) -> i64,
    ) -> Result<(Vec<Invoice>, Option<String>), ApiError> {
        let next = (rows.len() as i64 == limit)
            .then(|| rows.last().map(|r| cursor_of(at(r), &r.id)))
            .flatten();
        Ok((self.views(rows).await?, next))
    }

    /// The open overpayments (and resolved ones after them).
    pub async fn overpayments(&self) -> Result<Vec<OverpaymentRow>, ApiError> {
        Ok(storage::overpayments(&mut *self.conn().await?, false).await?)
    }

    /// Marks an overpayment refunded or credited.
    pub async fn resolve_overpayment(
        &self,
        id: &str,
        status: &str,
        note: Option<&str>,
    ) -> Result<(), ApiError> {
        if status != "refunded" && status != "credited" {
            return Err(field("status", "must be refunded or credited"));
        }
        let done = storage::resolve_overpayment(
            &mut *self.conn().await?,
            id,
            status,
            note,
            self.clock.now_ms(),
        )
        .await?;
        if done {
            Ok(())
        } else {
            Err(ApiError::not_found("no open overpayment with this id"))
        }
    }

    // ---- documents ----

    fn sheet_of(&self, row: &InvoiceRow, lines: &[LineRow]) -> pdf::Sheet {
        let date = |ms: Option<i64>| {
            ms.and_then(|ms| self.calendar.date(ms).ok())
                .map(BusinessCalendar::format_id)
                .unwrap_or_default()
        };
        let seller = &self.config.seller;
        let mut seller_lines = vec![seller.name.clone()];
        seller_lines.extend(seller.address.lines().map(str::to_owned));
        seller_lines.push(format!("NPWP {}", seller.npwp));
        seller_lines.push(seller.email.clone());
        let mut buyer = vec![row
            .buyer_legal_name
            .clone()
            .unwrap_or_else(|| row.buyer_name.clone())];
        if row.buyer_legal_name.is_some() {
            buyer.push(row.buyer_name.clone());
        }
        if let Some(a) = &row.buyer_address {
            buyer.extend(a.lines().map(str::to_owned));
        }
        if let Some(n) = &row.buyer_npwp {
            buyer.push(format!("NPWP {n}"));
        }
        if let Some(n) = &row.buyer_nitku {
            buyer.push(format!("NITKU {n}"));
        }
        buyer.push(row.buyer_email.clone());
        let (status, stamp) = match row.status.as_str() {
            "paid" => ("Lunas", pdf::Stamp::Paid),
            "void" => ("Dibatalkan", pdf::Stamp::Void),
            _ => ("Belum dibayar", pdf::Stamp::None),
        };
        let mut facts = vec![
            (
                "Nomor faktur".to_owned(),
                row.number.clone().unwrap_or_default(),
            ),
            ("Tanggal terbit".to_owned(), date(row.issued_at)),
            ("Jatuh tempo".to_owned(), date(row.due_at)),
            ("Status".to_owned(), status.to_owned()),
        ];
        if row.status == "paid" {
            facts.push(("Tanggal bayar".to_owned(), date(row.paid_at)));
            if let Some(m) = &row.payment_method {
                facts.push(("Metode".to_owned(), method_name(m)));
            }
        }
        let rows = lines
            .iter()
            .map(|l| pdf::Row {
                description: l.description.clone(),
                quantity: l.quantity.to_string(),
                unit_price: Rupiah(l.unit_price).to_string(),
                amount: Rupiah(l.amount).to_string(),
            })
            .collect();
        let mut totals = vec![("Subtotal".to_owned(), Rupiah(row.subtotal).to_string())];
        if self.config.seller.pkp {
            totals.push(("DPP (11/12)".to_owned(), Rupiah(row.dpp).to_string()));
            totals.push(("PPN 12%".to_owned(), Rupiah(row.ppn).to_string()));
        }
        totals.push(("Total".to_owned(), Rupiah(row.total).to_string()));
        let mut notes = vec![format!(
            "PPN 12% atas DPP nilai lain 11/12 dari harga jual (PMK 131/2024), dibulatkan per faktur."
        )];
        if let Some(n) = &row.nsfp {
            notes.push(format!("Nomor Seri Faktur Pajak: {n}"));
        }
        if row.status == "paid" && row.total > METERAI_ABOVE {
            notes.push(
                "Bea meterai Rp 10.000 terutang atas tanda terima di atas Rp 5.000.000 \
                 (UU 10/2020); e-Meterai dibubuhkan terpisah."
                    .to_owned(),
            );
        }
        if row.status == "void" {
            notes.push(format!(
                "Faktur ini dibatalkan: {}",
                row.void_reason.clone().unwrap_or_default()
            ));
        }
        notes.push("Dokumen ini dibuat secara elektronik dan sah tanpa tanda tangan.".to_owned());
        pdf::Sheet {
            title: "FAKTUR".to_owned(),
            seller: seller_lines,
            buyer,
            facts,
            rows,
            totals,
            notes,
            stamp,
            pdf_title: row.number.clone().unwrap_or_default(),
        }
    }

    async fn render(&self, sheet: pdf::Sheet) -> Result<Vec<u8>, ApiError> {
        self.renderers
            .run(move || pdf::render(&sheet))
            .await?
            .map_err(|e| ApiError::internal(&e))
    }

    async fn render_credit_note(
        &self,
        row: &InvoiceRow,
        note: &CreditNoteRow,
    ) -> Result<Vec<u8>, ApiError> {
        let mut sheet = self.sheet_of(row, &[]);
        sheet.title = "NOTA KREDIT".to_owned();
        sheet.stamp = pdf::Stamp::None;
        sheet.pdf_title = note.number.clone();
        let issued = self
            .calendar
            .date(note.issued_at)
            .map(BusinessCalendar::format_id)
            .unwrap_or_default();
        sheet.facts = vec![
            ("Nomor nota kredit".to_owned(), note.number.clone()),
            ("Tanggal".to_owned(), issued),
            (
                "Atas faktur".to_owned(),
                row.number.clone().unwrap_or_default(),
            ),
        ];
        sheet.rows = vec![pdf::Row {
            description: note.reason.clone(),
            quantity: "1".to_owned(),
            unit_price: Rupiah(-note.price).to_string(),
            amount: Rupiah(-note.price).to_string(),
        }];
        sheet.totals = vec![
            ("Harga".to_owned(), Rupiah(-note.price).to_string()),
            ("PPN dikembalikan".to_owned(), Rupiah(-note.ppn).to_string()),
            ("Total kredit".to_owned(), Rupiah(-note.amount).to_string()),
        ];
        sheet.notes = vec![
            "PPN dikembalikan sebanding dengan bagian faktur yang dikreditkan.".to_owned(),
            "Dokumen ini dibuat secara elektronik dan sah tanpa tanda tangan.".to_owned(),
        ];
        self.render(sheet).await
    }

    /// Renders a credit note's PDF and stores it.
    async fn store_credit_note_pdf(
        &self,
        row: &InvoiceRow,
        note: &CreditNoteRow,
    ) -> Result<Vec<u8>, ApiError> {
        let pdf = self.render_credit_note(row, note).await?;
        storage::put_document(
            &mut *self.conn().await?,
            &note.id,
            "credit_note",
            "issued",
            &pdf,
            self.clock.now_ms(),
        )
        .await?;
        Ok(pdf)
    }

    /// Renders an invoice's PDF as it stands and stores it.
    async fn render_invoice(&self, id: &str) -> Result<Option<(String, Vec<u8>)>, ApiError> {
        let mut conn = self.conn().await?;
        let Some(row) = storage::invoice(&mut conn, id).await? else {
            return Ok(None);
        };
        if row.status == "draft" {
            return Ok(None);
        }
        let lines = storage::lines(&mut conn, id).await?;
        drop(conn);
        let pdf = self.render(self.sheet_of(&row, &lines)).await?;
        storage::put_document(
            &mut *self.conn().await?,
            id,
            "invoice",
            &document_state(&row),
            &pdf,
            self.clock.now_ms(),
        )
        .await?;
        Ok(Some((row.number.unwrap_or_default(), pdf)))
    }

    /// The PDF of one of `subject`'s invoices (any subject with `None`):
    /// `(file name, bytes)`. Rendered at issue and at payment by the
    /// renderer; rendered here when that has not happened yet.
    pub async fn pdf(
        &self,
        subject: Option<&Subject>,
        id: &str,
    ) -> Result<(String, Vec<u8>), ApiError> {
        let mut conn = self.conn().await?;
        let row = match subject {
            Some(s) => storage::invoice_of(&mut conn, id, s.kind(), s.id()).await?,
            None => storage::invoice(&mut conn, id).await?,
        }
        .ok_or_else(not_found)?;
        if row.status == "draft" {
            return Err(ApiError::conflict(
                "not_issued",
                "a draft has no PDF; issue it first",
            ));
        }
        let number = row.number.clone().unwrap_or_default();
        if let Some((state, bytes)) = storage::document(&mut conn, id).await? {
            if state == document_state(&row) {
                return Ok((file_name(&number), bytes));
            }
        }
        drop(conn);
        let (number, bytes) = self.render_invoice(id).await?.ok_or_else(not_found)?;
        Ok((file_name(&number), bytes))
    }

    /// The PDF of a credit note of `subject`'s (any with `None`).
    pub async fn credit_note_pdf(
        &self,
        subject: Option<&Subject>,
        id: &str,
    ) -> Result<(String, Vec<u8>), ApiError> {
        let mut conn = self.conn().await?;
        let note = storage::credit_note(&mut conn, id)
            .await?
            .ok_or_else(|| ApiError::not_found("no such credit note"))?;
        let row = match subject {
            Some(s) => storage::invoice_of(&mut conn, &note.invoice_id, s.kind(), s.id()).await?,
            None => storage::invoice(&mut conn, &note.invoice_id).await?,
        }
        .ok_or_else(|| ApiError::not_found("no such credit note"))?;
        if let Some((_, bytes)) = storage::document(&mut conn, id).await? {
            return Ok((file_name(&note.number), bytes));
        }
        drop(conn);
        let pdf = self.store_credit_note_pdf(&row, &note).await?;
        Ok((file_name(&note.number), pdf))
    }

    /// Renders every invoice whose stored PDF is missing or out of date
    /// (after an issue, a payment, a void); runs until stopped.
    pub async fn renderer(self: Arc<Self>) {
        let mut ticker = self.clock.ticker();
        loop {
            match self.render_pending().await {
                Ok(n) if n > 0 => tracing::debug!(rendered = n, "invoice PDFs rendered"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "rendering invoice PDFs failed; retrying"),
            }
            tokio::select! {
                _ = self.render_wake.notified() => {}
                _ = ticker.tick(std::time::Duration::from_secs(30)) => {}
            }
        }
    }

    async fn render_pending(&self) -> Result<usize, ApiError> {
        let mut n = 0;
        loop {
            let ids = storage::stale_documents(&mut *self.conn().await?, 20).await?;
            if ids.is_empty() {
                return Ok(n);
            }
            for id in &ids {
                self.render_invoice(id).await?;
                n += 1;
            }
        }
    }
}

/// What a stored invoice PDF shows: its status, and whether the NSFP is
/// printed (`paid+nsfp`); a stored PDF of another state is re-rendered.
fn document_state(row: &InvoiceRow) -> String {
    if row.nsfp.is_some() {
        format!("{}+nsfp", row.status)
    } else {
        row.status.clone()
    }
}

/// Stamp duty (bea meterai, UU 10/2020) is owed on a receipt of more
/// than this.
const METERAI_ABOVE: i64 = 5_000_000;

/// A 17-digit NSFP (2 transaction code, 2 status, 13 serial), separators
/// `.`, `-` and spaces allowed and dropped.
fn parse_nsfp(s: &str) -> Option<String> {
    let digits: String = s
        .chars()
        .filter(|c| !matches!(c, '.' | '-' | ' '))
        .collect();
    let code = digits.get(..2)?.parse::<u8>().ok()?;
    (digits.len() == 17 && digits.bytes().all(|b| b.is_ascii_digit()) && (1..=10).contains(&code))
        .then_some(digits)
}

/// `INV/2026/11/000123` → `INV-2026-11-000123.pdf`.
fn file_name(number: &str) -> String {
    format!("{}.pdf", number.replace('/', "-"))
}

/// A payment method as printed.
fn method_name(m: &str) -> String {
    match m {
        "credit_card" => "Kartu kredit".to_owned(),
        "bca_va" => "BCA Virtual Account".to_owned(),
        "bni_va" => "BNI Virtual Account".to_owned(),
        "bri_va" => "BRI Virtual Account".to_owned(),
        "cimb_va" => "CIMB Niaga Virtual Account".to_owned(),
        "permata_va" => "Permata Virtual Account".to_owned(),
        "mandiri_bill" => "Mandiri Bill Payment".to_owned(),
        "gopay" => "GoPay".to_owned(),
        "shopeepay" => "ShopeePay".to_owned(),
        "qris" => "QRIS".to_owned(),
        other => other.to_owned(),
    }
}

fn cursor_of(at: i64, id: &str) -> String {
    format!("{at}_{id}")
}

fn parse_cursor(cursor: Option<&str>) -> Result<Option<(i64, String)>, ApiError> {
    let Some(c) = cursor.filter(|c| !c.is_empty()) else {
        return Ok(None);
    };
    let bad = || field("cursor", "is not a cursor this API gave");
    let (at, id) = c.split_once('_').ok_or_else(bad)?;
    let at = at.parse::<i64>().map_err(|_| bad())?;
    if id.is_empty() || id.len() > 64 {
        return Err(bad());
    }
    Ok(Some((at, id.to_owned())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_the_state_machine_never_moves_back() {
        use Status::*;
        let all = [Draft, Open, Paid, Void];
        let allowed = [(Draft, Open), (Draft, Void), (Open, Paid), (Open, Void)];
        for from in all {
            for to in all {
                assert_eq!(
                    from.can_become(to),
                    allowed.contains(&(from, to)),
                    "{from:?} → {to:?}"
                );
            }
            assert_eq!(Status::parse(from.as_str()), Some(from));
        }
        assert_eq!(Status::parse("refunded"), None);
    }

    #[test]
    fn test_references_are_canonical() {
        let a: Value =
            serde_json::from_str(r#"{"kind":"renewal","b":{"y":1,"x":2},"a":1}"#).unwrap();
        let b: Value =
            serde_json::from_str(r#"{"a":1,"b":{"x":2,"y":1},"kind":"renewal"}"#).unwrap();
        assert_eq!(canonical(&a), canonical(&b));
        assert_eq!(
            canonical(&a),
            r#"{"a":1,"b":{"x":2,"y":1},"kind":"renewal"}"#
        );
    }

    #[test]
    fn test_nsfp_serials() {
        for (input, want) in [
            ("04002500000000123", Some("04002500000000123")),
            ("040.025-00000000123", Some("04002500000000123")),
            ("04 00 2500000000123", Some("04002500000000123")),
            ("01002500000000123", Some("01002500000000123")),
            ("10002500000000123", Some("10002500000000123")),
            ("00002500000000123", None),
            ("11002500000000123", None),
            ("0400250000000012", None),
            ("040025000000001234", None),
            ("04002500000000x23", None),
            ("٠٤002500000000123", None),
            ("", None),
        ] {
            assert_eq!(parse_nsfp(input).as_deref(), want, "{input:?}");
        }
    }

    #[test]
    fn test_cursors_and_file_names() {
        assert_eq!(
            parse_cursor(Some("12_abc")).unwrap(),
            Some((12, "abc".to_owned()))
        );
        assert_eq!(parse_cursor(None).unwrap(), None);
        for bad in ["x_abc", "12", "12_"] {
            assert!(parse_cursor(Some(bad)).is_err(), "{bad}");
        }
        assert_eq!(file_name("INV/2026/11/000123"), "INV-2026-11-000123.pdf");
    }
}
