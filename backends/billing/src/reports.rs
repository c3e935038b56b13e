//! Reconciliation and revenue: what finance reads.
//!
//! **Reconciliation** of a business day (`Asia/Jakarta` midnight to
//! midnight) lists every payment and refund that occurred that day and
//! every invoice the day touched (issued, paid, voided, paid into, or open
//! past due at the day's end), each marked matched or not, with the
//! mismatches found:
//!
//! - `amount_mismatch`: an invoice's settled payments up to the day's end
//!   add up to something other than its total (partly paid, or paid more
//!   in one go);
//! - `payment_without_invoice`: a payment (or refund) names no invoice of
//!   ours;
//! - `paid_twice`: a settled payment arrived for an invoice already paid
//!   in full;
//! - `payment_to_void_invoice`: money for an invoice voided before it came;
//! - `open_past_due`: an issued invoice still open at the day's end after
//!   its due time.
//!
//! The daily job stores the report of each day once that day is
//! `reconcile_delay` over (late webhooks land first), and sets
//! `billing_reconciliation_mismatches{kind}` to the last closed day's
//! counts.
//!
//! **Revenue** over business days `from..=to`, per month (of the business
//! calendar) or per plan: invoices issued and their amount (void ones
//! apart), PPN invoiced, cash collected and refunded, PPN of the invoices
//! paid, credit notes, and **net** = subtotals invoiced − credit notes'
//! price (revenue net of PPN and credits). **MRR** at a month's end (or at
//! the range's end per plan): for every subject, its latest paid plan
//! invoice whose service period covers that instant counts its recurring
//! price, a yearly one divided by 12 (half up, once per plan); paying
//! subjects are the subjects counted.

use std::collections::{BTreeMap, HashMap, HashSet};

use jiff::civil::Date;
use serde::Serialize;
use utoipa::ToSchema;

use backend_common::calendar::BusinessCalendar;
use backend_common::{ApiError, FieldError};

use crate::core::Billing;
use crate::storage::{self, Coverage, InvoiceRow, PaymentWithInvoice};
use crate::tax::div_round;

/// The mismatch kinds, in the order reports list them.
pub const MISMATCH_KINDS: [&str; 5] = [
    "amount_mismatch",
    "payment_without_invoice",
    "paid_twice",
    "payment_to_void_invoice",
    "open_past_due",
];

/// A payment or refund of the day.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ReconPayment {
    pub payment_id: String,
    /// `settled` or `refunded`.
    pub kind: String,
    pub invoice_id: String,
    pub invoice_number: Option<String>,
    pub amount: i64,
    pub method: Option<String>,
    pub occurred_at: i64,
    /// What billing did with it: `paid`, `partial`, `overpaid`,
    /// `unknown_invoice`, `refund`.
    pub outcome: String,
    pub matched: bool,
}

/// An invoice the day touched.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ReconInvoice {
    pub id: String,
    pub number: Option<String>,
    /// Its status now.
    pub status: String,
    pub total: i64,
    /// Settled payments up to the day's end.
    pub paid_by_day_end: i64,
    pub issued_at: Option<i64>,
    pub due_at: Option<i64>,
    pub paid_at: Option<i64>,
    pub voided_at: Option<i64>,
    pub matched: bool,
}

/// One thing that does not add up.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Mismatch {
    /// One of [`MISMATCH_KINDS`].
    pub kind: String,
    pub invoice_id: Option<String>,
    pub invoice_number: Option<String>,
    pub payment_id: Option<String>,
    /// What the invoice asked (its total).
    pub expected: Option<i64>,
    /// What came.
    pub actual: Option<i64>,
    pub detail: String,
}

/// A day's totals.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct ReconSummary {
    pub payments: usize,
    pub settled: i64,
    pub refunded: i64,
    pub invoices_issued: usize,
    pub invoiced: i64,
    pub matched_payments: usize,
    pub mismatches: usize,
    /// Mismatches per kind (every kind, zeros included).
    pub by_kind: BTreeMap<String, usize>,
}

/// When the daily job closed the day, and what it found then.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Closed {
    pub at: i64,
    pub mismatches: i64,
}

/// `GET /api/admin/billing/reconciliation?date=`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Reconciliation {
    /// The business day, `YYYY-MM-DD`.
    pub date: String,
    pub zone: String,
    /// Its first instant (Unix ms).
    pub from: i64,
    /// The next day's first instant.
    pub to: i64,
    pub payments: Vec<ReconPayment>,
    pub invoices: Vec<ReconInvoice>,
    pub mismatches: Vec<Mismatch>,
    pub summary: ReconSummary,
    /// The daily job's stored copy, once the day is closed.
    pub closed: Option<Closed>,
}

/// One row of a revenue report.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct RevenueRow {
    /// `2026-11` (per month) or the plan (`none`: invoices of no plan).
    pub group: String,
    /// Invoices issued (void ones apart).
    pub invoices: i64,
    /// Their totals, PPN included.
    pub invoiced: i64,
    /// Their PPN.
    pub ppn_invoiced: i64,
    /// Invoices issued then voided since.
    pub voided: i64,
    /// Cash settled.
    pub collected: i64,
    /// Cash refunded.
    pub refunded: i64,
    /// PPN of the invoices paid.
    pub ppn_collected: i64,
    /// Credit notes issued.
    pub credit_notes: i64,
    /// Their amounts, PPN included.
    pub credited: i64,
    /// Their PPN.
    pub ppn_credited: i64,
    /// Subtotals invoiced − credit notes' price: revenue net of PPN.
    pub net: i64,
    /// MRR at the month's end (per month) or the range's end (per plan).
    pub mrr: i64,
    /// Subjects paying a plan then.
    pub paying_subjects: i64,
}

impl RevenueRow {
    fn add(&mut self, o: &RevenueRow) {
        self.invoices += o.invoices;
        self.invoiced += o.invoiced;
        self.ppn_invoiced += o.ppn_invoiced;
        self.voided += o.voided;
        self.collected += o.collected;
        self.refunded += o.refunded;
        self.ppn_collected += o.ppn_collected;
        self.credit_notes += o.credit_notes;
        self.credited += o.credited;
        self.ppn_credited += o.ppn_credited;
        self.net += o.net;
    }

    /// The CSV header, in field order.
    pub const CSV_HEADER: &'static str = "group,invoices,invoiced,ppn_invoiced,voided,collected,\
        refunded,ppn_collected,credit_notes,credited,ppn_credited,net,mrr,paying_subjects";

    /// One CSV line: the group quoted when it needs to be, and a leading
    /// `=`, `+`, `-`, `@` (a formula to a spreadsheet) neutralised with `'`.
    pub fn csv(&self) -> String {
        let mut group = self.group.clone();
        if group.starts_with(['=', '+', '-', '@', '\t', '\r']) {
            group.insert(0, '\'');
        }
        if group.contains([',', '"', '\n', '\r']) {
            group = format!("\"{}\"", group.replace('"', "\"\""));
        }
        format!(
            "{group},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            self.invoices,
            self.invoiced,
            self.ppn_invoiced,
            self.voided,
            self.collected,
            self.refunded,
            self.ppn_collected,
            self.credit_notes,
            self.credited,
            self.ppn_credited,
            self.net,
            self.mrr,
            self.paying_subjects
        )
    }
}

/// MRR at one instant, per plan.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct MrrPlan {
    pub plan: String,
    pub mrr: i64,
    pub paying_subjects: i64,
}

/// `GET /api/admin/billing/revenue`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Revenue {
    pub from: String,
    pub to: String,
    /// `month` or `plan`.
    pub group: String,
    pub zone: String,
    pub rows: Vec<RevenueRow>,
    /// The rows added up (MRR: at the range's end).
    pub total: RevenueRow,
    /// MRR per plan at the range's end.
    pub mrr_at_end: Vec<MrrPlan>,
}

impl Revenue {
    /// The report as CSV: the rows, then `total`.
    pub fn csv(&self) -> String {
        let mut out = String::with_capacity(64 * (self.rows.len() + 2));
        out.push_str(RevenueRow::CSV_HEADER);
        out.push_str("\r\n");
        for r in self.rows.iter().chain(std::iter::once(&self.total)) {
            out.push_str(&r.csv());
            out.push_str("\r\n");
        }
        out
    }
}

/// How revenue is grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    Month,
    Plan,
}

impl Group {
    /// `month` or `plan`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "month" => Some(Self::Month),
            "plan" => Some(Self::Plan),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Month => "month",
            Self::Plan => "plan",
        }
    }
}

fn field(name: &str, message: &str) -> ApiError {
    ApiError::validation(vec![FieldError::new(name, message)])
}

/// A `YYYY-MM-DD` business date.
pub fn parse_date(name: &str, s: &str) -> Result<Date, ApiError> {
    let valid = s.len() == 10 && s.as_bytes()[4] == b'-' && s.as_bytes()[7] == b'-';
    valid
        .then(|| s.parse::<Date>().ok())
        .flatten()
        .filter(|d| (2000..=2999).contains(&d.year()))
        .ok_or_else(|| field(name, "must be a date YYYY-MM-DD (years 2000 to 2999)"))
}

fn cal_error(e: impl std::fmt::Display) -> ApiError {
    ApiError::internal(&e.to_string())
}

/// `[start of date, start of the next day)` in the business zone.
fn day_window(cal: &BusinessCalendar, date: Date) -> Result<(i64, i64), ApiError> {
    let next = date.tomorrow().map_err(cal_error)?;
    Ok((
        cal.start_of_day(date).map_err(cal_error)?,
        cal.start_of_day(next).map_err(cal_error)?,
    ))
}

fn month_key(cal: &BusinessCalendar, ms: i64) -> String {
    cal.date(ms)
        .map(|d| format!("{:04}-{:02}", d.year(), d.month()))
        .unwrap_or_default()
}

fn row_of(rows: &mut BTreeMap<String, RevenueRow>, k: String) -> &mut RevenueRow {
    rows.entry(k.clone()).or_insert_with(|| RevenueRow {
        group: k,
        ..RevenueRow::default()
    })
}

fn plan_key(plan: Option<&str>) -> String {
    plan.unwrap_or("none").to_owned()
}

/// MRR per plan at instant `at` from the coverage rows: per subject its
/// latest invoice covering `at` (by period start, then issue).
fn mrr_at(coverage: &[Coverage], at: i64) -> BTreeMap<String, (i64, i64)> {
    let mut latest: HashMap<(&str, &str), &Coverage> = HashMap::new();
    for c in coverage {
        if c.period_start <= at && at < c.period_end {
            let key = (c.subject_kind.as_str(), c.subject_id.as_str());
            // Rows come ordered by subject, period start, issue: the last
            // one covering `at` wins.
            latest.insert(key, c);
        }
    }
    // plan → (Σ monthly prices, Σ yearly prices, subjects)
    let mut sums: BTreeMap<String, (i128, i128, i64)> = BTreeMap::new();
    for c in latest.values() {
        let e = sums.entry(c.plan.clone()).or_default();
        let price = i128::from(c.recurring_price.unwrap_or(0).max(0));
        if c.cycle.as_deref() == Some("yearly") {
            e.1 += price;
        } else {
            e.0 += price;
        }
        e.2 += 1;
    }
    sums.into_iter()
        .map(|(plan, (monthly, yearly, n))| {
            let mrr = monthly + div_round(yearly, 12);
            (plan, (i64::try_from(mrr).unwrap_or(i64::MAX), n))
        })
        .collect()
}

impl Billing {
    /// Today in the business zone.
    pub fn today(&self) -> Result<Date, ApiError> {
        self.calendar.date(self.clock.now_ms()).map_err(cal_error)
    }

    /// The reconciliation of business day `date`, computed now, with the
    /// daily job's stored copy when the day is closed.
    pub async fn reconciliation(&self, date: Date) -> Result<Reconciliation, ApiError> {
        let mut report = self.reconcile(date).await?;
        let day = date.to_string();
        let mut conn = self.db.pool().acquire().await?;
        report.closed = storage::reconciliation(&mut conn, &day)
            .await?
            .map(|(_, mismatches, at)| Closed { at, mismatches });
        Ok(report)
    }

    async fn reconcile(&self, date: Date) -> Result<Reconciliation, ApiError> {
        let (from, to) = day_window(&self.calendar, date)?;
        let mut conn = self.db.pool().acquire().await?;
        let payments = storage::between::<storage::PaymentWithInvoice>(
            &mut conn,
            storage::PAYMENTS_BETWEEN,
            from,
            to,
        )
        .await?;
        let history =
            storage::between::<storage::PaymentRow>(&mut conn, storage::SETTLED_HISTORY, from, to)
                .await?;
        let invoices =
            storage::between::<storage::InvoiceRow>(&mut conn, storage::INVOICES_OF_DAY, from, to)
                .await?;
        drop(conn);

        let by_id: HashMap<&str, &InvoiceRow> =
            invoices.iter().map(|i| (i.id.as_str(), i)).collect();
        let mut mismatches: Vec<Mismatch> = Vec::new();
        let mismatch = |kind: &str, inv: Option<&InvoiceRow>, p: Option<&str>| Mismatch {
            kind: kind.to_owned(),
            invoice_id: inv.map(|i| i.id.clone()),
            invoice_number: inv.and_then(|i| i.number.clone()),
            payment_id: p.map(str::to_owned),
            expected: inv.map(|i| i.total),
            actual: None,
            detail: String::new(),
        };

        // Payments naming no invoice.
        for p in payments.iter().filter(|p| p.found.is_none()) {
            let mut m = mismatch("payment_without_invoice", None, Some(&p.payment.payment_id));
            m.invoice_id = Some(p.payment.invoice_id.clone());
            m.actual = Some(p.payment.amount);
            m.detail = format!(
                "a {} payment names invoice `{}`, which billing does not know",
                p.payment.kind, p.payment.invoice_id
            );
            mismatches.push(m);
        }

        // Each invoice paid into that day: its settled history in order.
        let mut paid_by_end: HashMap<&str, i64> = HashMap::new();
        let mut flagged: HashSet<&str> = HashSet::new();
        for payments_of in history.chunk_by(|a, b| a.invoice_id == b.invoice_id) {
            let id = payments_of[0].invoice_id.as_str();
            let Some(inv) = by_id.get(id).copied() else {
                continue;
            };
            let mut sum: i64 = 0;
            for p in payments_of {
                let in_day = p.occurred_at >= from;
                if in_day && inv.voided_at.is_some_and(|v| v <= p.recorded_at) {
                    let mut m = mismatch("payment_to_void_invoice", Some(inv), Some(&p.payment_id));
                    m.actual = Some(p.amount);
                    m.detail = "money came for an invoice voided before it".to_owned();
                    mismatches.push(m);
                    flagged.insert(id);
                } else if in_day && sum >= inv.total {
                    let mut m = mismatch("paid_twice", Some(inv), Some(&p.payment_id));
                    m.actual = Some(sum.saturating_add(p.amount));
                    m.detail = format!(
                        "a further payment of {} after the invoice was paid in full",
                        p.amount
                    );
                    mismatches.push(m);
                    flagged.insert(id);
                }
                sum = sum.saturating_add(p.amount);
            }
            paid_by_end.insert(id, sum);
            if !flagged.contains(id) && sum != inv.total {
                let mut m = mismatch("amount_mismatch", Some(inv), None);
                m.actual = Some(sum);
                m.detail = if sum < inv.total {
                    format!("{} of {} paid by the day's end", sum, inv.total)
                } else {
                    format!("{} paid against a total of {}", sum, inv.total)
                };
                mismatches.push(m);
            }
        }

        // Open past due at the day's end.
        for inv in &invoices {
            let open_at_end = inv.status != "draft"
                && inv.issued_at.is_some_and(|t| t < to)
                && inv.due_at.is_some_and(|t| t < to)
                && inv.paid_at.is_none_or(|t| t >= to)
                && inv.voided_at.is_none_or(|t| t >= to);
            if open_at_end {
                let mut m = mismatch("open_past_due", Some(inv), None);
                m.actual = Some(paid_by_end.get(inv.id.as_str()).copied().unwrap_or(0));
                m.detail = "still open after its due time".to_owned();
                mismatches.push(m);
            }
        }

        let bad_invoices: HashSet<&str> = mismatches
            .iter()
            .filter_map(|m| m.invoice_id.as_deref())
            .collect();
        let bad_payments: HashSet<&str> = mismatches
            .iter()
            .filter_map(|m| m.payment_id.as_deref())
            .collect();
        let payments: Vec<ReconPayment> = payments
            .into_iter()
            .map(
                |PaymentWithInvoice {
                     payment: p,
                     number,
                     found,
                     ..
                 }| ReconPayment {
                    matched: found.is_some()
                        && !bad_payments.contains(p.payment_id.as_str())
                        && !bad_invoices.contains(p.invoice_id.as_str()),
                    payment_id: p.payment_id,
                    kind: p.kind,
                    invoice_id: p.invoice_id,
                    invoice_number: number,
                    amount: p.amount,
                    method: p.method,
                    occurred_at: p.occurred_at,
                    outcome: p.outcome,
                },
            )
            .collect();
        let mut summary = ReconSummary {
            payments: payments.len(),
            mismatches: mismatches.len(),
            by_kind: MISMATCH_KINDS
                .iter()
                .map(|k| ((*k).to_owned(), 0))
                .collect(),
            ..ReconSummary::default()
        };
        for p in &payments {
            match p.kind.as_str() {
                "settled" => summary.settled += p.amount,
                _ => summary.refunded += p.amount,
            }
            summary.matched_payments += usize::from(p.matched);
        }
        for m in &mismatches {
            *summary.by_kind.entry(m.kind.clone()).or_default() += 1;
        }
        let invoices: Vec<ReconInvoice> = invoices
            .iter()
            .map(|inv| {
                let issued_today = inv.issued_at.is_some_and(|t| t >= from && t < to);
                if issued_today && inv.status != "void" {
                    summary.invoices_issued += 1;
                    summary.invoiced += inv.total;
                }
                ReconInvoice {
                    id: inv.id.clone(),
                    number: inv.number.clone(),
                    status: inv.status.clone(),
                    total: inv.total,
                    paid_by_day_end: paid_by_end.get(inv.id.as_str()).copied().unwrap_or(
                        if inv.paid_at.is_some_and(|t| t < to) {
                            inv.amount_paid
                        } else {
                            0
                        },
                    ),
                    issued_at: inv.issued_at,
                    due_at: inv.due_at,
                    paid_at: inv.paid_at,
                    voided_at: inv.voided_at,
                    matched: !bad_invoices.contains(inv.id.as_str()),
                }
            })
            .collect();
        Ok(Reconciliation {
            date: date.to_string(),
            zone: self.calendar.zone_name().to_owned(),
            from,
            to,
            payments,
            invoices,
            mismatches,
            summary,
            closed: None,
        })
    }

    /// The mismatches per kind of the latest stored day, if any (what the
    /// gauge shows after a restart until the next day closes).
    pub async fn last_closed_counts(&self) -> Result<Option<BTreeMap<String, usize>>, ApiError> {
        let mut conn = self.db.pool().acquire().await?;
        let Some(text) = storage::last_reconciliation(&mut conn).await? else {
            return Ok(None);
        };
        let report: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ApiError::internal(&e))?;
        Ok(serde_json::from_value(report["summary"]["by_kind"].clone()).ok())
    }

    /// Closes every business day of the last week that is over by
    /// `reconcile_delay` and has no stored report; returns the last
    /// closed day's report, if this call closed one.
    pub async fn close_days(&self) -> Result<Option<Reconciliation>, ApiError> {
        let now = self.clock.now_ms();
        let delay = i64::try_from(self.config.reconcile_delay.as_millis()).unwrap_or(i64::MAX);
        // The last day whose end is `delay` ago.
        let last = self
            .calendar
            .date(now.saturating_sub(delay))
            .map_err(cal_error)?
            .yesterday()
            .map_err(cal_error)?;
        let first = last
            .checked_sub(jiff::Span::new().days(6))
            .map_err(cal_error)?;
        let mut conn = self.db.pool().acquire().await?;
        let done: HashSet<String> = storage::reconciled_days(&mut conn, &first.to_string())
            .await?
            .into_iter()
            .collect();
        drop(conn);
        let mut closed = None;
        let mut day = first;
        while day <= last {
            if !done.contains(&day.to_string()) {
                let report = self.reconcile(day).await?;
                let text = serde_json::to_string(&report).map_err(|e| ApiError::internal(&e))?;
                let mut conn = self.db.pool().acquire().await?;
                let n = i64::try_from(report.mismatches.len()).unwrap_or(i64::MAX);
                if storage::insert_reconciliation(&mut conn, &report.date, &text, n, now).await? {
                    tracing::info!(
                        day = %report.date,
                        payments = report.summary.payments,
                        mismatches = n,
                        "reconciliation closed"
                    );
                }
                closed = Some(report);
            }
            day = day.tomorrow().map_err(cal_error)?;
        }
        Ok(closed)
    }

    /// The revenue report over business days `from..=to`.
    pub async fn revenue(&self, from: Date, to: Date, group: Group) -> Result<Revenue, ApiError> {
        if to < from {
            return Err(field("to", "must not be before `from`"));
        }
        if from.until(to).map_err(cal_error)?.get_days() > 3700 {
            return Err(field("to", "a report spans at most ten years"));
        }
        let cal = &self.calendar;
        let start = cal.start_of_day(from).map_err(cal_error)?;
        let end = day_window(cal, to)?.1;
        let mut conn = self.db.pool().acquire().await?;
        let invoices = storage::between::<storage::InvoiceRow>(
            &mut conn,
            storage::INVOICES_ISSUED_OR_PAID,
            start,
            end,
        )
        .await?;
        let payments = storage::between::<storage::PaymentWithInvoice>(
            &mut conn,
            storage::PAYMENTS_BETWEEN,
            start,
            end,
        )
        .await?;
        let notes = storage::between::<storage::CreditNoteWithPlan>(
            &mut conn,
            storage::CREDIT_NOTES_BETWEEN,
            start,
            end,
        )
        .await?;
        let coverage =
            storage::between::<storage::Coverage>(&mut conn, storage::COVERAGE_BETWEEN, start, end)
                .await?;
        drop(conn);
        let in_range = |t: &i64| (start..end).contains(t);
        let key_of = |at: i64, plan: Option<&str>| match group {
            Group::Month => month_key(cal, at),
            Group::Plan => plan_key(plan),
        };
        let mut rows: BTreeMap<String, RevenueRow> = BTreeMap::new();
        if group == Group::Month {
            let mut d = from.first_of_month();
            while d <= to {
                let k = format!("{:04}-{:02}", d.year(), d.month());
                rows.insert(
                    k.clone(),
                    RevenueRow {
                        group: k,
                        ..RevenueRow::default()
                    },
                );
                d = d
                    .checked_add(jiff::Span::new().months(1))
                    .map_err(cal_error)?;
            }
        }
        for inv in &invoices {
            if let Some(at) = inv.issued_at.filter(in_range) {
                let r = row_of(&mut rows, key_of(at, inv.plan.as_deref()));
                if inv.status == "void" {
                    r.voided += 1;
                } else {
                    r.invoices += 1;
                    r.invoiced += inv.total;
                    r.ppn_invoiced += inv.ppn;
                    r.net += inv.subtotal;
                }
            }
            if let Some(at) = inv.paid_at.filter(in_range) {
                row_of(&mut rows, key_of(at, inv.plan.as_deref())).ppn_collected += inv.ppn;
            }
        }
        for p in &payments {
            let r = row_of(&mut rows, key_of(p.payment.occurred_at, p.plan.as_deref()));
            if p.payment.kind == "settled" {
                r.collected += p.payment.amount;
            } else {
                r.refunded += p.payment.amount;
            }
        }
        for n in &notes {
            let r = row_of(&mut rows, key_of(n.note.issued_at, n.plan.as_deref()));
            r.credit_notes += 1;
            r.credited += n.note.amount;
            r.ppn_credited += n.note.ppn;
            r.net -= n.note.price;
        }

        let range_end = end - 1;
        let at_end = mrr_at(&coverage, range_end);
        let mut rows: Vec<RevenueRow> = rows.into_values().collect();
        for r in &mut rows {
            match group {
                Group::Month => {
                    // The month's last instant, or the range's end.
                    let month_end = format!("{}-01", r.group)
                        .parse::<Date>()
                        .ok()
                        .and_then(|d| d.last_of_month().tomorrow().ok())
                        .and_then(|d| cal.start_of_day(d).ok())
                        .map_or(range_end, |t| (t - 1).min(range_end));
                    let m = mrr_at(&coverage, month_end);
                    r.mrr = m.values().map(|v| v.0).sum();
                    r.paying_subjects = m.values().map(|v| v.1).sum();
                }
                Group::Plan => {
                    if let Some((mrr, n)) = at_end.get(&r.group) {
                        r.mrr = *mrr;
                        r.paying_subjects = *n;
                    }
                }
            }
        }
        if group == Group::Plan {
            for (plan, (mrr, n)) in &at_end {
                if !rows.iter().any(|r| &r.group == plan) {
                    rows.push(RevenueRow {
                        group: plan.clone(),
                        mrr: *mrr,
                        paying_subjects: *n,
                        ..RevenueRow::default()
                    });
                }
            }
            rows.sort_by(|a, b| a.group.cmp(&b.group));
        }
        let mut total = RevenueRow {
            group: "total".to_owned(),
            mrr: at_end.values().map(|v| v.0).sum(),
            paying_subjects: at_end.values().map(|v| v.1).sum(),
            ..RevenueRow::default()
        };
        for r in &rows {
            total.add(r);
        }
        Ok(Revenue {
            from: from.to_string(),
            to: to.to_string(),
            group: group.as_str().to_owned(),
            zone: cal.zone_name().to_owned(),
            rows,
            total,
            mrr_at_end: at_end
                .into_iter()
                .map(|(plan, (mrr, paying_subjects))| MrrPlan {
                    plan,
                    mrr,
                    paying_subjects,
                })
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_csv_cells_are_quoted_and_never_formulas() {
        let row = |g: &str| RevenueRow {
            group: g.to_owned(),
            invoices: 1,
            ..RevenueRow::default()
        };
        assert_eq!(row("BASIC").csv(), "BASIC,1,0,0,0,0,0,0,0,0,0,0,0,0");
        assert!(row("=HYPERLINK(1)").csv().starts_with("'=HYPERLINK(1),1,"));
        assert!(row("a,b").csv().starts_with("\"a,b\",1,"));
        assert!(row("say \"hi\"").csv().starts_with("\"say \"\"hi\"\"\",1,"));
        assert!(row("-1,x").csv().starts_with("\"'-1,x\",1,"));
        assert_eq!(
            RevenueRow::CSV_HEADER.split(',').count(),
            row("x").csv().split(',').count()
        );
    }

    #[test]
    fn test_mrr_takes_each_subjects_latest_cover_and_a_twelfth_of_yearly() {
        let cover =
            |subject: &str, plan: &str, cycle: &str, price: i64, start: i64, end: i64| Coverage {
                subject_kind: "user".to_owned(),
                subject_id: subject.to_owned(),
                plan: plan.to_owned(),
                cycle: Some(cycle.to_owned()),
                recurring_price: Some(price),
                period_start: start,
                period_end: end,
                issued_at: Some(start),
                id: format!("{subject}-{start}"),
            };
        let rows = vec![
            // a: BASIC, then upgraded to PREMIUM mid-period: PREMIUM counts.
            cover("a", "BASIC", "monthly", 99_000, 0, 100),
            cover("a", "PREMIUM", "monthly", 249_000, 50, 100),
            // b, c: yearly PREMIUM, 12 × 207.500 and a price with a remainder.
            cover("b", "PREMIUM", "yearly", 2_490_000, 0, 1_000),
            cover("c", "PREMIUM", "yearly", 1_000_001, 0, 1_000),
            // d: ended before the instant.
            cover("d", "BASIC", "monthly", 99_000, 0, 60),
        ];
        let m = mrr_at(&rows, 75);
        // PREMIUM: 249.000 + round((2.490.000 + 1.000.001) / 12) = 249.000 + 290.833.
        assert_eq!(m.get("PREMIUM"), Some(&(249_000 + 290_833, 3)));
        assert_eq!(m.get("BASIC"), None);
        let m = mrr_at(&rows, 10);
        assert_eq!(m.get("BASIC"), Some(&(99_000 + 99_000, 2)));
    }
}
