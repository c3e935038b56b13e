//! SQL of invoices, lines, numbers, documents, credit notes, payments and
//! overpayments. Reads a user's request drives take the subject and put
//! it in the `WHERE` clause: another subject's invoice is never fetched.

use sqlx::AnyConnection;

/// A row of `invoices`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct InvoiceRow {
    pub id: String,
    pub number: Option<String>,
    pub status: String,
    pub subject_kind: String,
    pub subject_id: String,
    pub user_id: String,
    pub buyer_name: String,
    pub buyer_email: String,
    pub buyer_legal_name: Option<String>,
    pub buyer_npwp: Option<String>,
    pub buyer_nitku: Option<String>,
    pub buyer_address: Option<String>,
    pub reference: String,
    pub reference_key: String,
    pub request_hash: String,
    pub plan: Option<String>,
    pub cycle: Option<String>,
    pub period_start: Option<i64>,
    pub period_end: Option<i64>,
    pub recurring_price: Option<i64>,
    pub currency: String,
    pub subtotal: i64,
    pub dpp: i64,
    pub ppn: i64,
    pub total: i64,
    pub amount_paid: i64,
    pub amount_refunded: i64,
    pub payment_method: Option<String>,
    pub nsfp: Option<String>,
    pub created_at: i64,
    pub issued_at: Option<i64>,
    pub due_at: Option<i64>,
    pub paid_at: Option<i64>,
    pub voided_at: Option<i64>,
    pub void_reason: Option<String>,
    pub updated_at: i64,
}

/// The columns of `invoices`, in [`InvoiceRow`]'s order.
macro_rules! invoice_columns {
    () => {
        "id, number, status, subject_kind, subject_id, user_id, buyer_name, buyer_email, \
         buyer_legal_name, buyer_npwp, buyer_nitku, buyer_address, reference, reference_key, \
         request_hash, plan, cycle, period_start, period_end, currency, subtotal, dpp, ppn, total, \
         amount_paid, amount_refunded, payment_method, nsfp, created_at, issued_at, due_at, \
         paid_at, voided_at, void_reason, updated_at, recurring_price"
    };
}

macro_rules! select_invoices {
    ($rest:literal) => {
        concat!("SELECT ", invoice_columns!(), " FROM invoices ", $rest)
    };
}

/// A row of `invoice_lines`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LineRow {
    pub position: i32,
    pub description: String,
    pub quantity: i64,
    pub unit_price: i64,
    pub amount: i64,
}

/// `invoices.reference_key` is unique.
pub const REFERENCE_UNIQUE: backend_common::db::Constraint = backend_common::db::Constraint {
    name: "invoices_reference_key",
    sqlite: "invoices.reference_key",
};

/// Inserts an invoice and its lines.
pub async fn insert_invoice(
    c: &mut AnyConnection,
    i: &InvoiceRow,
    lines: &[LineRow],
) -> Result<(), sqlx::Error> {
    sqlx::query(concat!(
        "INSERT INTO invoices (",
        invoice_columns!(),
        ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, \
         $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28, $29, $30, $31, $32, $33, $34, $35, \
         $36)"
    ))
    .bind(&i.id)
    .bind(&i.number)
    .bind(&i.status)
    .bind(&i.subject_kind)
    .bind(&i.subject_id)
    .bind(&i.user_id)
    .bind(&i.buyer_name)
    .bind(&i.buyer_email)
    .bind(&i.buyer_legal_name)
    .bind(&i.buyer_npwp)
    .bind(&i.buyer_nitku)
    .bind(&i.buyer_address)
    .bind(&i.reference)
    .bind(&i.reference_key)
    .bind(&i.request_hash)
    .bind(&i.plan)
    .bind(&i.cycle)
    .bind(i.period_start)
    .bind(i.period_end)
    .bind(&i.currency)
    .bind(i.subtotal)
    .bind(i.dpp)
    .bind(i.ppn)
    .bind(i.total)
    .bind(i.amount_paid)
    .bind(i.amount_refunded)
    .bind(&i.payment_method)
    .bind(&i.nsfp)
    .bind(i.created_at)
    .bind(i.issued_at)
    .bind(i.due_at)
    .bind(i.paid_at)
    .bind(i.voided_at)
    .bind(&i.void_reason)
    .bind(i.updated_at)
    .bind(i.recurring_price)
    .execute(&mut *c)
    .await?;
    for l in lines {
        sqlx::query(
            "INSERT INTO invoice_lines (invoice_id, position, description, quantity, unit_price, \
             amount) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&i.id)
        .bind(l.position)
        .bind(&l.description)
        .bind(l.quantity)
        .bind(l.unit_price)
        .bind(l.amount)
        .execute(&mut *c)
        .await?;
    }
    Ok(())
}

/// An invoice by id (any subject: internal and admin reads).
pub async fn invoice(c: &mut AnyConnection, id: &str) -> Result<Option<InvoiceRow>, sqlx::Error> {
    sqlx::query_as(select_invoices!("WHERE id = $1"))
        .bind(id)
        .fetch_optional(c)
        .await
}

/// An issued invoice of one subject (a user's request).
pub async fn invoice_of(
    c: &mut AnyConnection,
    id: &str,
    subject_kind: &str,
    subject_id: &str,
) -> Result<Option<InvoiceRow>, sqlx::Error> {
    sqlx::query_as(select_invoices!(
        "WHERE id = $1 AND subject_kind = $2 AND subject_id = $3 AND status <> 'draft'"
    ))
    .bind(id)
    .bind(subject_kind)
    .bind(subject_id)
    .fetch_optional(c)
    .await
}

/// The invoice created for a reference.
pub async fn invoice_by_reference(
    c: &mut AnyConnection,
    key: &str,
) -> Result<Option<InvoiceRow>, sqlx::Error> {
    sqlx::query_as(select_invoices!("WHERE reference_key = $1"))
        .bind(key)
        .fetch_optional(c)
        .await
}

/// A page of a subject's issued invoices, newest first, after the cursor
/// `(issued_at, id)` when given.
pub async fn invoices_of(
    c: &mut AnyConnection,
    subject_kind: &str,
    subject_id: &str,
    after: Option<(i64, &str)>,
    limit: i64,
) -> Result<Vec<InvoiceRow>, sqlx::Error> {
    let (at, id) = after.unwrap_or((i64::MAX, ""));
    sqlx::query_as(select_invoices!(
        "WHERE subject_kind = $1 AND subject_id = $2 AND status <> 'draft' \
         AND (issued_at < $3 OR (issued_at = $3 AND id < $4) OR $4 = '') \
         ORDER BY issued_at DESC, id DESC LIMIT $5"
    ))
    .bind(subject_kind)
    .bind(subject_id)
    .bind(at)
    .bind(id)
    .bind(limit)
    .fetch_all(c)
    .await
}

/// What an admin searches invoices by; every field optional.
#[derive(Debug, Default, Clone)]
pub struct Search {
    pub status: Option<String>,
    pub subject_id: Option<String>,
    pub number: Option<String>,
    pub email: Option<String>,
}

/// A page of every invoice matching `s`, newest first (by creation).
pub async fn search_invoices(
    c: &mut AnyConnection,
    s: &Search,
    after: Option<(i64, &str)>,
    limit: i64,
) -> Result<Vec<InvoiceRow>, sqlx::Error> {
    let (at, id) = after.unwrap_or((i64::MAX, ""));
    sqlx::query_as(select_invoices!(
        "WHERE ($1 = '' OR status = $1) AND ($2 = '' OR subject_id = $2) \
         AND ($3 = '' OR number = $3) AND ($4 = '' OR buyer_email = $4) \
         AND (created_at < $5 OR (created_at = $5 AND id < $6) OR $6 = '') \
         ORDER BY created_at DESC, id DESC LIMIT $7"
    ))
    .bind(s.status.as_deref().unwrap_or(""))
    .bind(s.subject_id.as_deref().unwrap_or(""))
    .bind(s.number.as_deref().unwrap_or(""))
    .bind(s.email.as_deref().unwrap_or(""))
    .bind(at)
    .bind(id)
    .bind(limit)
    .fetch_all(c)
    .await
}

/// An invoice's lines in order.
pub async fn lines(c: &mut AnyConnection, invoice_id: &str) -> Result<Vec<LineRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT position, description, quantity, unit_price, amount FROM invoice_lines \
         WHERE invoice_id = $1 ORDER BY position",
    )
    .bind(invoice_id)
    .fetch_all(c)
    .await
}

/// The rows `head IN ($1, …, $n) tail` selects for `ids` (a page is at
/// most 100 invoices). Only numbered placeholders are formatted into the
/// SQL; the ids are bound.
async fn in_list<T>(
    c: &mut AnyConnection,
    head: &'static str,
    tail: &'static str,
    ids: &[&str],
) -> Result<Vec<T>, sqlx::Error>
where
    T: for<'r> sqlx::FromRow<'r, sqlx::any::AnyRow> + Send + Unpin,
{
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let marks: Vec<String> = (1..=ids.len()).map(|i| format!("${i}")).collect();
    let sql = format!("{head} IN ({}) {tail}", marks.join(", "));
    let mut q = sqlx::query_as::<_, T>(sqlx::AssertSqlSafe(sql));
    for id in ids {
        q = q.bind(*id);
    }
    q.fetch_all(c).await
}

/// A line with its invoice.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct InvoiceLine {
    pub invoice_id: String,
    #[sqlx(flatten)]
    pub line: LineRow,
}

/// The lines of several invoices in one query, in order.
pub async fn lines_of_many(
    c: &mut AnyConnection,
    invoice_ids: &[&str],
) -> Result<Vec<InvoiceLine>, sqlx::Error> {
    in_list(
        c,
        "SELECT invoice_id, position, description, quantity, unit_price, amount \
         FROM invoice_lines WHERE invoice_id",
        "ORDER BY invoice_id, position",
        invoice_ids,
    )
    .await
}

/// The credit notes of several invoices in one query, oldest first.
pub async fn credit_notes_of_many(
    c: &mut AnyConnection,
    invoice_ids: &[&str],
) -> Result<Vec<CreditNoteRow>, sqlx::Error> {
    in_list(
        c,
        "SELECT id, number, invoice_id, amount, price, ppn, reason, created_by, issued_at \
         FROM credit_notes WHERE invoice_id",
        "ORDER BY issued_at, id",
        invoice_ids,
    )
    .await
}

/// Takes the invoice's row lock for the rest of the transaction (on
/// PostgreSQL; SQLite's write transaction holds the database). False when
/// there is no such invoice.
pub async fn lock_invoice(c: &mut AnyConnection, id: &str) -> Result<bool, sqlx::Error> {
    let r = sqlx::query("UPDATE invoices SET updated_at = updated_at WHERE id = $1")
        .bind(id)
        .execute(c)
        .await?;
    Ok(r.rows_affected() == 1)
}

/// The next number of `series` in `year`, inside the caller's
/// transaction: the counter row stays locked until it commits, and a
/// rollback gives the number back. The first of a year is 1.
pub async fn next_number(
    c: &mut AnyConnection,
    series: &str,
    year: i32,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO counters (series, year, last) VALUES ($1, $2, 1) \
         ON CONFLICT (series, year) DO UPDATE SET last = counters.last + 1 RETURNING last",
    )
    .bind(series)
    .bind(year)
    .fetch_one(c)
    .await
}

/// Marks a draft issued with its number and dates; false when it was no
/// longer a draft.
pub async fn set_issued(
    c: &mut AnyConnection,
    id: &str,
    number: &str,
    issued_at: i64,
    due_at: i64,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE invoices SET status = 'open', number = $1, issued_at = $2, due_at = $3, \
         updated_at = $2 WHERE id = $4 AND status = 'draft'",
    )
    .bind(number)
    .bind(issued_at)
    .bind(due_at)
    .bind(id)
    .execute(c)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Records money received on an open invoice; `paid` closes it.
pub async fn set_payment(
    c: &mut AnyConnection,
    id: &str,
    amount_paid: i64,
    paid: Option<(i64, Option<&str>)>,
    now: i64,
) -> Result<bool, sqlx::Error> {
    let r = match paid {
        Some((paid_at, method)) => {
            sqlx::query(
                "UPDATE invoices SET status = 'paid', amount_paid = $1, paid_at = $2, \
                 payment_method = $3, updated_at = $4 WHERE id = $5 AND status = 'open'",
            )
            .bind(amount_paid)
            .bind(paid_at)
            .bind(method)
            .bind(now)
            .bind(id)
            .execute(c)
            .await?
        }
        None => {
            sqlx::query(
                "UPDATE invoices SET amount_paid = $1, updated_at = $2 \
                 WHERE id = $3 AND status = 'open'",
            )
            .bind(amount_paid)
            .bind(now)
            .bind(id)
            .execute(c)
            .await?
        }
    };
    Ok(r.rows_affected() == 1)
}

/// Adds a refund to an invoice's refunded amount.
pub async fn add_refund(
    c: &mut AnyConnection,
    id: &str,
    amount: i64,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE invoices SET amount_refunded = amount_refunded + $1, updated_at = $2 WHERE id = $3",
    )
    .bind(amount)
    .bind(now)
    .bind(id)
    .execute(c)
    .await
    .map(|_| ())
}

/// Voids a draft or open invoice; false when it was in neither state.
pub async fn set_void(
    c: &mut AnyConnection,
    id: &str,
    reason: &str,
    now: i64,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE invoices SET status = 'void', voided_at = $1, void_reason = $2, updated_at = $1 \
         WHERE id = $3 AND status IN ('draft', 'open')",
    )
    .bind(now)
    .bind(reason)
    .bind(id)
    .execute(c)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Records the invoice's Faktur Pajak serial (NSFP) on an open or paid
/// invoice; false when it is in neither state.
pub async fn set_nsfp(
    c: &mut AnyConnection,
    id: &str,
    nsfp: &str,
    now: i64,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE invoices SET nsfp = $1, updated_at = $2 WHERE id = $3 AND status IN ('open', 'paid')",
    )
    .bind(nsfp)
    .bind(now)
    .bind(id)
    .execute(c)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// A payment as billing recorded it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PaymentRow {
    pub payment_id: String,
    pub kind: String,
    pub invoice_id: String,
    pub amount: i64,
    pub method: Option<String>,
    pub occurred_at: i64,
    pub recorded_at: i64,
    pub outcome: String,
}

/// Records a payment or refund once; false when this (payment, kind) was
/// recorded before.
pub async fn insert_payment(c: &mut AnyConnection, p: &PaymentRow) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "INSERT INTO payments (payment_id, kind, invoice_id, amount, method, occurred_at, \
         recorded_at, outcome) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
         ON CONFLICT (payment_id, kind) DO NOTHING",
    )
    .bind(&p.payment_id)
    .bind(&p.kind)
    .bind(&p.invoice_id)
    .bind(p.amount)
    .bind(&p.method)
    .bind(p.occurred_at)
    .bind(p.recorded_at)
    .bind(&p.outcome)
    .execute(c)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// The payments recorded against an invoice, oldest first.
pub async fn payments_of(
    c: &mut AnyConnection,
    invoice_id: &str,
) -> Result<Vec<PaymentRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT payment_id, kind, invoice_id, amount, method, occurred_at, recorded_at, outcome \
         FROM payments WHERE invoice_id = $1 ORDER BY occurred_at, payment_id",
    )
    .bind(invoice_id)
    .fetch_all(c)
    .await
}

/// An overpayment to resolve (a row, and as the admin API shows it).
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize, utoipa::ToSchema)]
#[schema(as = Overpayment)]
pub struct OverpaymentRow {
    pub id: String,
    pub invoice_id: String,
    pub payment_id: String,
    /// What came beyond the invoice's total (whole rupiah).
    pub amount: i64,
    /// `open`, `refunded` or `credited`.
    pub status: String,
    pub note: Option<String>,
    pub created_at: i64,
    pub resolved_at: Option<i64>,
}

/// Records an overpayment (once per payment).
pub async fn insert_overpayment(
    c: &mut AnyConnection,
    o: &OverpaymentRow,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO overpayments (id, invoice_id, payment_id, amount, status, note, created_at) \
         VALUES ($1, $2, $3, $4, 'open', $5, $6) ON CONFLICT (payment_id) DO NOTHING",
    )
    .bind(&o.id)
    .bind(&o.invoice_id)
    .bind(&o.payment_id)
    .bind(o.amount)
    .bind(&o.note)
    .bind(o.created_at)
    .execute(c)
    .await
    .map(|_| ())
}

/// Overpayments, open ones first, newest first.
pub async fn overpayments(
    c: &mut AnyConnection,
    only_open: bool,
) -> Result<Vec<OverpaymentRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, invoice_id, payment_id, amount, status, note, created_at, resolved_at \
         FROM overpayments WHERE ($1 = 0 OR status = 'open') \
         ORDER BY CASE status WHEN 'open' THEN 0 ELSE 1 END, created_at DESC, id DESC LIMIT 500",
    )
    .bind(i64::from(only_open))
    .fetch_all(c)
    .await
}

/// Resolves an open overpayment; false when there is no open one.
pub async fn resolve_overpayment(
    c: &mut AnyConnection,
    id: &str,
    status: &str,
    note: Option<&str>,
    now: i64,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE overpayments SET status = $1, note = COALESCE($2, note), resolved_at = $3 \
         WHERE (id = $4 OR payment_id = $4) AND status = 'open'",
    )
    .bind(status)
    .bind(note)
    .bind(now)
    .bind(id)
    .execute(c)
    .await?;
    Ok(r.rows_affected() >= 1)
}

/// A row of `credit_notes`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CreditNoteRow {
    pub id: String,
    pub number: String,
    pub invoice_id: String,
    pub amount: i64,
    pub price: i64,
    pub ppn: i64,
    pub reason: String,
    pub created_by: String,
    pub issued_at: i64,
}

/// Inserts a credit note.
pub async fn insert_credit_note(
    c: &mut AnyConnection,
    n: &CreditNoteRow,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO credit_notes (id, number, invoice_id, amount, price, ppn, reason, \
         created_by, issued_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(&n.id)
    .bind(&n.number)
    .bind(&n.invoice_id)
    .bind(n.amount)
    .bind(n.price)
    .bind(n.ppn)
    .bind(&n.reason)
    .bind(&n.created_by)
    .bind(n.issued_at)
    .execute(c)
    .await
    .map(|_| ())
}

/// The credit notes of an invoice, oldest first.
pub async fn credit_notes_of(
    c: &mut AnyConnection,
    invoice_id: &str,
) -> Result<Vec<CreditNoteRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, number, invoice_id, amount, price, ppn, reason, created_by, issued_at \
         FROM credit_notes WHERE invoice_id = $1 ORDER BY issued_at, id",
    )
    .bind(invoice_id)
    .fetch_all(c)
    .await
}

/// A credit note by id.
pub async fn credit_note(
    c: &mut AnyConnection,
    id: &str,
) -> Result<Option<CreditNoteRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, number, invoice_id, amount, price, ppn, reason, created_by, issued_at \
         FROM credit_notes WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(c)
    .await
}

/// A stored PDF and the state it shows.
pub async fn document(
    c: &mut AnyConnection,
    owner_id: &str,
) -> Result<Option<(String, Vec<u8>)>, sqlx::Error> {
    sqlx::query_as("SELECT state, pdf FROM documents WHERE owner_id = $1")
        .bind(owner_id)
        .fetch_optional(c)
        .await
}

/// Stores (or replaces) a PDF.
pub async fn put_document(
    c: &mut AnyConnection,
    owner_id: &str,
    kind: &str,
    state: &str,
    pdf: &[u8],
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO documents (owner_id, kind, state, pdf, rendered_at) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (owner_id) DO UPDATE SET state = excluded.state, pdf = excluded.pdf, \
         rendered_at = excluded.rendered_at",
    )
    .bind(owner_id)
    .bind(kind)
    .bind(state)
    .bind(pdf)
    .bind(now)
    .execute(c)
    .await
    .map(|_| ())
}

/// Invoices whose stored PDF is missing or shows an older state (at most
/// `limit`): what the renderer does next.
pub async fn stale_documents(
    c: &mut AnyConnection,
    limit: i64,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT i.id FROM invoices i LEFT JOIN documents d ON d.owner_id = i.id \
         WHERE i.status <> 'draft' AND (d.owner_id IS NULL OR d.state <> i.status || \
         CASE WHEN i.nsfp IS NULL THEN '' ELSE '+nsfp' END) \
         ORDER BY i.updated_at LIMIT $1",
    )
    .bind(limit)
    .fetch_all(c)
    .await
}

// ---- Reports: reconciliation and revenue. ----

/// The rows `sql` selects with `$1` = `from` and `$2` = `to`.
pub async fn between<T>(
    c: &mut AnyConnection,
    sql: &'static str,
    from: i64,
    to: i64,
) -> Result<Vec<T>, sqlx::Error>
where
    T: for<'r> sqlx::FromRow<'r, sqlx::any::AnyRow> + Send + Unpin,
{
    sqlx::query_as(sql).bind(from).bind(to).fetch_all(c).await
}

/// A payment with what its invoice says (nothing when it names none).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PaymentWithInvoice {
    #[sqlx(flatten)]
    pub payment: PaymentRow,
    pub number: Option<String>,
    pub total: Option<i64>,
    pub plan: Option<String>,
    pub found: Option<String>,
}

/// Payments and refunds that occurred in `[from, to)`, oldest first.
/// Rows of [`PaymentWithInvoice`]; run with [`between`].
pub const PAYMENTS_BETWEEN: &str =
    "SELECT p.payment_id, p.kind, p.invoice_id, p.amount, p.method, p.occurred_at, \
             p.recorded_at, p.outcome, i.number, i.total, i.plan, i.id AS found \
             FROM payments p LEFT JOIN invoices i ON i.id = p.invoice_id \
             WHERE p.occurred_at >= $1 AND p.occurred_at < $2 \
             ORDER BY p.occurred_at, p.payment_id, p.kind";

/// Every settled payment before `to` of the invoices that had a payment
/// in `[from, to)`, by invoice then in order of occurrence.
/// Rows of [`PaymentRow`]; run with [`between`].
pub const SETTLED_HISTORY: &str =
    "SELECT payment_id, kind, invoice_id, amount, method, occurred_at, recorded_at, outcome \
             FROM payments WHERE kind = 'settled' AND occurred_at < $2 AND invoice_id IN \
             (SELECT invoice_id FROM payments WHERE occurred_at >= $1 AND occurred_at < $2) \
             ORDER BY invoice_id, occurred_at, recorded_at, payment_id";

/// The invoices a day's reconciliation looks at: issued, paid or voided
/// in `[from, to)`, paid into then, or open past due at `to`.
/// Rows of [`InvoiceRow`]; run with [`between`].
pub const INVOICES_OF_DAY: &str = select_invoices!(
    "WHERE (issued_at >= $1 AND issued_at < $2) OR (paid_at >= $1 AND paid_at < $2) \
         OR (voided_at >= $1 AND voided_at < $2) \
         OR (status <> 'draft' AND issued_at < $2 AND due_at < $2 \
             AND (paid_at IS NULL OR paid_at >= $2) AND (voided_at IS NULL OR voided_at >= $2)) \
         OR id IN (SELECT invoice_id FROM payments WHERE occurred_at >= $1 AND occurred_at < $2) \
         ORDER BY issued_at, id"
);

/// Invoices issued or paid in `[from, to)`.
/// Rows of [`InvoiceRow`]; run with [`between`].
pub const INVOICES_ISSUED_OR_PAID: &str = select_invoices!(
    "WHERE (issued_at >= $1 AND issued_at < $2) OR (paid_at >= $1 AND paid_at < $2) \
         ORDER BY issued_at, id"
);

/// A credit note with its invoice's plan.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CreditNoteWithPlan {
    #[sqlx(flatten)]
    pub note: CreditNoteRow,
    pub plan: Option<String>,
}

/// Credit notes issued in `[from, to)`.
/// Rows of [`CreditNoteWithPlan`]; run with [`between`].
pub const CREDIT_NOTES_BETWEEN: &str =
    "SELECT n.id, n.number, n.invoice_id, n.amount, n.price, n.ppn, n.reason, n.created_by, \
             n.issued_at, i.plan FROM credit_notes n JOIN invoices i ON i.id = n.invoice_id \
             WHERE n.issued_at >= $1 AND n.issued_at < $2 ORDER BY n.issued_at, n.id";

/// A paid plan invoice whose service period covers an instant.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Coverage {
    pub subject_kind: String,
    pub subject_id: String,
    pub plan: String,
    pub cycle: Option<String>,
    pub recurring_price: Option<i64>,
    pub period_start: i64,
    pub period_end: i64,
    pub issued_at: Option<i64>,
    pub id: String,
}

/// The paid plan invoices whose period covers any of `[from, to)`: what
/// MRR at an instant in that span is made of.
/// Rows of [`Coverage`]; run with [`between`].
pub const COVERAGE_BETWEEN: &str =
    "SELECT subject_kind, subject_id, plan, cycle, recurring_price, period_start, period_end, \
             issued_at, id FROM invoices WHERE status = 'paid' AND plan IS NOT NULL \
             AND period_start IS NOT NULL AND period_end IS NOT NULL \
             AND period_start < $2 AND period_end > $1 \
             ORDER BY subject_kind, subject_id, period_start, issued_at, id";

/// Stores a day's reconciliation once (the first writer wins: two
/// instances closing the same day store one report).
pub async fn insert_reconciliation(
    c: &mut AnyConnection,
    day: &str,
    report: &str,
    mismatches: i64,
    now: i64,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "INSERT INTO reconciliations (day, report, mismatches, created_at) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (day) DO NOTHING",
    )
    .bind(day)
    .bind(report)
    .bind(mismatches)
    .bind(now)
    .execute(c)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// A stored reconciliation: `(report, mismatches, created_at)`.
pub async fn reconciliation(
    c: &mut AnyConnection,
    day: &str,
) -> Result<Option<(String, i64, i64)>, sqlx::Error> {
    sqlx::query_as("SELECT report, mismatches, created_at FROM reconciliations WHERE day = $1")
        .bind(day)
        .fetch_optional(c)
        .await
}

/// The latest stored reconciliation's report.
pub async fn last_reconciliation(c: &mut AnyConnection) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT report FROM reconciliations ORDER BY day DESC LIMIT 1")
        .fetch_optional(c)
        .await
}

/// The days at or after `since` that have a stored reconciliation.
pub async fn reconciled_days(
    c: &mut AnyConnection,
    since: &str,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT day FROM reconciliations WHERE day >= $1 ORDER BY day")
        .bind(since)
        .fetch_all(c)
        .await
}
