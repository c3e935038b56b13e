//! SQL of payments, the idempotency store, notifications and refunds.
//! Reads a user's request drives take the subject and put it in the
//! `WHERE` clause: another subject's payment is never fetched.

use sqlx::AnyConnection;

use backend_common::db::Constraint;

/// A row of `payments`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PaymentRow {
    pub id: String,
    pub invoice_id: String,
    pub invoice_number: String,
    pub attempt: i32,
    pub order_id: String,
    pub method: String,
    pub channel: Option<String>,
    pub status: String,
    pub amount: i64,
    pub currency: String,
    pub subject_kind: String,
    pub subject_id: String,
    pub user_id: String,
    pub open_invoice: Option<String>,
    pub transaction_id: Option<String>,
    pub fraud_status: Option<String>,
    pub instructions: Option<String>,
    pub request: Option<String>,
    pub status_message: Option<String>,
    pub refunded: i64,
    pub mismatch: i32,
    pub expires_at: Option<i64>,
    pub next_check_at: Option<i64>,
    pub checks: i32,
    pub created_at: i64,
    pub updated_at: i64,
    pub paid_at: Option<i64>,
}

macro_rules! payment_columns {
    () => {
        "id, invoice_id, invoice_number, attempt, order_id, method, channel, status, amount, \
         currency, subject_kind, subject_id, user_id, open_invoice, transaction_id, fraud_status, \
         instructions, request, status_message, refunded, mismatch, expires_at, next_check_at, \
         checks, created_at, updated_at, paid_at"
    };
}

macro_rules! select_payments {
    ($rest:literal) => {
        concat!("SELECT ", payment_columns!(), " FROM payments ", $rest)
    };
}

/// One open payment per invoice.
pub const OPEN_UNIQUE: Constraint = Constraint {
    name: "payments_open_key",
    sqlite: "payments.open_invoice",
};
/// One row per attempt of an invoice.
pub const ATTEMPT_UNIQUE: Constraint = Constraint {
    name: "payments_attempt_key",
    sqlite: "payments.invoice_id, payments.attempt",
};

/// Inserts a payment.
pub async fn insert_payment(c: &mut AnyConnection, p: &PaymentRow) -> Result<(), sqlx::Error> {
    sqlx::query(concat!(
        "INSERT INTO payments (",
        payment_columns!(),
        ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, \
         $18, $19, $20, $21, $22, $23, $24, $25, $26, $27)"
    ))
    .bind(&p.id)
    .bind(&p.invoice_id)
    .bind(&p.invoice_number)
    .bind(p.attempt)
    .bind(&p.order_id)
    .bind(&p.method)
    .bind(&p.channel)
    .bind(&p.status)
    .bind(p.amount)
    .bind(&p.currency)
    .bind(&p.subject_kind)
    .bind(&p.subject_id)
    .bind(&p.user_id)
    .bind(&p.open_invoice)
    .bind(&p.transaction_id)
    .bind(&p.fraud_status)
    .bind(&p.instructions)
    .bind(&p.request)
    .bind(&p.status_message)
    .bind(p.refunded)
    .bind(p.mismatch)
    .bind(p.expires_at)
    .bind(p.next_check_at)
    .bind(p.checks)
    .bind(p.created_at)
    .bind(p.updated_at)
    .bind(p.paid_at)
    .execute(c)
    .await?;
    Ok(())
}

/// Writes every mutable column of `p` back, if its `updated_at` is still
/// `seen` (optimistic: nobody else changed it meanwhile). Returns whether
/// it did.
pub async fn update_payment(
    c: &mut AnyConnection,
    p: &PaymentRow,
    seen: i64,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE payments SET channel = $1, status = $2, open_invoice = $3, transaction_id = $4, \
         fraud_status = $5, instructions = $6, request = $7, status_message = $8, refunded = $9, \
         mismatch = $10, expires_at = $11, next_check_at = $12, checks = $13, updated_at = $14, \
         paid_at = $15 WHERE id = $16 AND updated_at = $17",
    )
    .bind(&p.channel)
    .bind(&p.status)
    .bind(&p.open_invoice)
    .bind(&p.transaction_id)
    .bind(&p.fraud_status)
    .bind(&p.instructions)
    .bind(&p.request)
    .bind(&p.status_message)
    .bind(p.refunded)
    .bind(p.mismatch)
    .bind(p.expires_at)
    .bind(p.next_check_at)
    .bind(p.checks)
    .bind(p.updated_at)
    .bind(p.paid_at)
    .bind(&p.id)
    .bind(seen)
    .execute(c)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// A payment by id.
pub async fn payment(c: &mut AnyConnection, id: &str) -> Result<Option<PaymentRow>, sqlx::Error> {
    sqlx::query_as(select_payments!("WHERE id = $1"))
        .bind(id)
        .fetch_optional(c)
        .await
}

/// A payment by id, if it is `subject`'s.
pub async fn payment_of(
    c: &mut AnyConnection,
    kind: &str,
    subject: &str,
    id: &str,
) -> Result<Option<PaymentRow>, sqlx::Error> {
    sqlx::query_as(select_payments!(
        "WHERE id = $1 AND subject_kind = $2 AND subject_id = $3"
    ))
    .bind(id)
    .bind(kind)
    .bind(subject)
    .fetch_optional(c)
    .await
}

/// A payment by Midtrans order id.
pub async fn by_order(
    c: &mut AnyConnection,
    order_id: &str,
) -> Result<Option<PaymentRow>, sqlx::Error> {
    sqlx::query_as(select_payments!("WHERE order_id = $1"))
        .bind(order_id)
        .fetch_optional(c)
        .await
}

/// The open payment of an invoice.
pub async fn open_of(
    c: &mut AnyConnection,
    invoice_id: &str,
) -> Result<Option<PaymentRow>, sqlx::Error> {
    sqlx::query_as(select_payments!("WHERE open_invoice = $1"))
        .bind(invoice_id)
        .fetch_optional(c)
        .await
}

/// The highest attempt of an invoice (0: none).
pub async fn last_attempt(c: &mut AnyConnection, invoice_id: &str) -> Result<i32, sqlx::Error> {
    let n: Option<i32> =
        sqlx::query_scalar("SELECT MAX(attempt) FROM payments WHERE invoice_id = $1")
            .bind(invoice_id)
            .fetch_one(c)
            .await?;
    Ok(n.unwrap_or(0))
}

/// `subject`'s payments (of one invoice, or all), newest first.
pub async fn list_of(
    c: &mut AnyConnection,
    kind: &str,
    subject: &str,
    invoice_id: Option<&str>,
    limit: i64,
) -> Result<Vec<PaymentRow>, sqlx::Error> {
    match invoice_id {
        Some(inv) => {
            sqlx::query_as(select_payments!(
                "WHERE subject_kind = $1 AND subject_id = $2 AND invoice_id = $3 \
             ORDER BY created_at DESC, attempt DESC LIMIT $4"
            ))
            .bind(kind)
            .bind(subject)
            .bind(inv)
            .bind(limit)
            .fetch_all(c)
            .await
        }
        None => {
            sqlx::query_as(select_payments!(
            "WHERE subject_kind = $1 AND subject_id = $2 ORDER BY created_at DESC, attempt DESC \
             LIMIT $3"
        ))
            .bind(kind)
            .bind(subject)
            .bind(limit)
            .fetch_all(c)
            .await
        }
    }
}

/// Every payment of an invoice (admin), newest first.
pub async fn of_invoice(
    c: &mut AnyConnection,
    invoice_id: &str,
) -> Result<Vec<PaymentRow>, sqlx::Error> {
    sqlx::query_as(select_payments!(
        "WHERE invoice_id = $1 ORDER BY attempt DESC LIMIT 100"
    ))
    .bind(invoice_id)
    .fetch_all(c)
    .await
}

/// Ids and check times of payments due a check, oldest due first.
pub async fn due(
    c: &mut AnyConnection,
    now: i64,
    limit: i64,
) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, next_check_at FROM payments WHERE next_check_at <= $1 \
         ORDER BY next_check_at LIMIT $2",
    )
    .bind(now)
    .bind(limit)
    .fetch_all(c)
    .await
}

/// Claims a due check: moves `next_check_at` from `seen` to `until`, so
/// another instance's janitor skips it. Returns whether this one got it.
pub async fn claim_check(
    c: &mut AnyConnection,
    id: &str,
    seen: i64,
    until: i64,
) -> Result<bool, sqlx::Error> {
    let r =
        sqlx::query("UPDATE payments SET next_check_at = $1 WHERE id = $2 AND next_check_at = $3")
            .bind(until)
            .bind(id)
            .bind(seen)
            .execute(c)
            .await?;
    Ok(r.rows_affected() == 1)
}

/// Makes a payment the janitor still watches due a check now (a
/// notification that could not be confirmed).
pub async fn check_now(c: &mut AnyConnection, id: &str, now: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE payments SET next_check_at = $1 WHERE id = $2 AND next_check_at IS NOT NULL",
    )
    .bind(now)
    .bind(id)
    .execute(c)
    .await?;
    Ok(())
}

/// A row of `payment_requests`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RequestRow {
    pub request_hash: String,
    pub payment_id: Option<String>,
    pub status_code: Option<i32>,
    pub response: Option<String>,
    pub locked_until: i64,
}

/// Takes `(scope, key)` for a new request; `false` when it exists.
pub async fn insert_request(
    c: &mut AnyConnection,
    scope: &str,
    key: &str,
    hash: &str,
    locked_until: i64,
    now: i64,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "INSERT INTO payment_requests (scope, idem_key, request_hash, locked_until, created_at) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (scope, idem_key) DO NOTHING",
    )
    .bind(scope)
    .bind(key)
    .bind(hash)
    .bind(locked_until)
    .bind(now)
    .execute(c)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// The request of `(scope, key)`.
pub async fn request(
    c: &mut AnyConnection,
    scope: &str,
    key: &str,
) -> Result<Option<RequestRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT request_hash, payment_id, status_code, response, locked_until \
         FROM payment_requests WHERE scope = $1 AND idem_key = $2",
    )
    .bind(scope)
    .bind(key)
    .fetch_optional(c)
    .await
}

/// Takes over a request whose holder's lock is `seen` (expired).
pub async fn relock_request(
    c: &mut AnyConnection,
    scope: &str,
    key: &str,
    seen: i64,
    until: i64,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE payment_requests SET locked_until = $1 \
         WHERE scope = $2 AND idem_key = $3 AND locked_until = $4 AND response IS NULL",
    )
    .bind(until)
    .bind(scope)
    .bind(key)
    .bind(seen)
    .execute(c)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Links the request to its payment.
pub async fn link_request(
    c: &mut AnyConnection,
    scope: &str,
    key: &str,
    payment_id: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE payment_requests SET payment_id = $1 WHERE scope = $2 AND idem_key = $3")
        .bind(payment_id)
        .bind(scope)
        .bind(key)
        .execute(c)
        .await?;
    Ok(())
}

/// Stores the final answer (replayed from now on), or with `None` only
/// releases the lock (a retry may resume at once).
pub async fn finish_request(
    c: &mut AnyConnection,
    scope: &str,
    key: &str,
    answer: Option<(u16, &str)>,
) -> Result<(), sqlx::Error> {
    match answer {
        Some((status, body)) => {
            sqlx::query(
                "UPDATE payment_requests SET status_code = $1, response = $2, locked_until = 0 \
                 WHERE scope = $3 AND idem_key = $4",
            )
            .bind(i32::from(status))
            .bind(body)
            .bind(scope)
            .bind(key)
            .execute(c)
            .await?;
        }
        None => {
            sqlx::query(
                "UPDATE payment_requests SET locked_until = 0 WHERE scope = $1 AND idem_key = $2",
            )
            .bind(scope)
            .bind(key)
            .execute(c)
            .await?;
        }
    }
    Ok(())
}

/// Forgets answers older than `before`.
pub async fn purge_requests(c: &mut AnyConnection, before: i64) -> Result<u64, sqlx::Error> {
    Ok(
        sqlx::query("DELETE FROM payment_requests WHERE created_at < $1")
            .bind(before)
            .execute(c)
            .await?
            .rows_affected(),
    )
}

/// Stores a notification as received.
pub async fn insert_notification(
    c: &mut AnyConnection,
    id: &str,
    order_id: &str,
    status: Option<&str>,
    body: &str,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO notifications (id, order_id, transaction_status, body, outcome, received_at) \
         VALUES ($1, $2, $3, $4, 'received', $5)",
    )
    .bind(id)
    .bind(order_id)
    .bind(status)
    .bind(body)
    .bind(now)
    .execute(c)
    .await?;
    Ok(())
}

/// Records what a notification did.
pub async fn notification_outcome(
    c: &mut AnyConnection,
    id: &str,
    outcome: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE notifications SET outcome = $1 WHERE id = $2")
        .bind(outcome)
        .bind(id)
        .execute(c)
        .await?;
    Ok(())
}

/// A stored notification.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct NotificationRow {
    pub id: String,
    pub transaction_status: Option<String>,
    pub body: String,
    pub outcome: String,
    pub received_at: i64,
}

/// The notifications of an order, oldest first.
pub async fn notifications_of(
    c: &mut AnyConnection,
    order_id: &str,
) -> Result<Vec<NotificationRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, transaction_status, body, outcome, received_at FROM notifications \
         WHERE order_id = $1 ORDER BY received_at, id LIMIT 200",
    )
    .bind(order_id)
    .fetch_all(c)
    .await
}

/// A row of `refunds`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RefundRow {
    pub id: String,
    pub payment_id: String,
    pub idem_key: String,
    pub amount: i64,
    pub reason: String,
    pub status: String,
    pub manual: i32,
    pub reference: Option<String>,
    pub status_message: Option<String>,
    pub by_user: String,
    pub created_at: i64,
    pub completed_at: Option<i64>,
}

macro_rules! refund_columns {
    () => {
        "id, payment_id, idem_key, amount, reason, status, manual, reference, status_message, \
         by_user, created_at, completed_at"
    };
}

/// Inserts a refund unless its key exists; `false` when it does.
pub async fn insert_refund(c: &mut AnyConnection, r: &RefundRow) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(concat!(
        "INSERT INTO refunds (",
        refund_columns!(),
        ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
         ON CONFLICT (payment_id, idem_key) DO NOTHING"
    ))
    .bind(&r.id)
    .bind(&r.payment_id)
    .bind(&r.idem_key)
    .bind(r.amount)
    .bind(&r.reason)
    .bind(&r.status)
    .bind(r.manual)
    .bind(&r.reference)
    .bind(&r.status_message)
    .bind(&r.by_user)
    .bind(r.created_at)
    .bind(r.completed_at)
    .execute(c)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// The refund of `(payment, key)`.
pub async fn refund_by_key(
    c: &mut AnyConnection,
    payment_id: &str,
    key: &str,
) -> Result<Option<RefundRow>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        refund_columns!(),
        " FROM refunds WHERE payment_id = $1 AND idem_key = $2"
    ))
    .bind(payment_id)
    .bind(key)
    .fetch_optional(c)
    .await
}

/// The refunds of a payment, oldest first.
pub async fn refunds_of(
    c: &mut AnyConnection,
    payment_id: &str,
) -> Result<Vec<RefundRow>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        refund_columns!(),
        " FROM refunds WHERE payment_id = $1 ORDER BY created_at, id"
    ))
    .bind(payment_id)
    .fetch_all(c)
    .await
}

/// Records the end of a refund still `requested`; false when it ended
/// already (another request recorded it meanwhile).
pub async fn finish_refund(
    c: &mut AnyConnection,
    id: &str,
    status: &str,
    message: Option<&str>,
    now: i64,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE refunds SET status = $1, status_message = $2, completed_at = $3 \
         WHERE id = $4 AND status = 'requested'",
    )
    .bind(status)
    .bind(message)
    .bind(now)
    .bind(id)
    .execute(c)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// The sum of a payment's refunds asked of Midtrans and not yet recorded
/// (`payments.refunded` holds the rest).
pub async fn refunds_in_flight(
    c: &mut AnyConnection,
    payment_id: &str,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM refunds \
         WHERE payment_id = $1 AND status = 'requested'",
    )
    .bind(payment_id)
    .fetch_one(c)
    .await
}
