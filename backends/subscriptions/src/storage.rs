//! SQL of subscriptions and changes. Every read a user's request drives
//! names the subject in its `WHERE` clause: another subject's rows are
//! never fetched.

use sqlx::AnyConnection;

/// A row of `subscriptions`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SubscriptionRow {
    pub id: String,
    pub subject_kind: String,
    pub subject_id: String,
    pub user_id: String,
    pub plan: String,
    pub cycle: String,
    pub state: String,
    pub anchor_at: i64,
    pub period_start: i64,
    pub period_end: i64,
    pub cancel_at_period_end: i32,
    pub scheduled_plan: Option<String>,
    pub scheduled_cycle: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A row of `changes`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ChangeRow {
    pub id: String,
    pub subject_kind: String,
    pub subject_id: String,
    pub user_id: String,
    pub kind: String,
    pub plan: String,
    pub cycle: String,
    pub from_plan: Option<String>,
    pub credit: i64,
    pub credit_detail: Option<String>,
    pub lines: String,
    pub status: String,
    pub idem_key: Option<String>,
    pub request_hash: Option<String>,
    pub renewal_key: Option<String>,
    pub invoice_id: Option<String>,
    pub invoice_number: Option<String>,
    pub invoice_total: Option<i64>,
    pub answer: Option<String>,
    pub applied_at: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
    /// A renewal's period start.
    pub period_start: Option<i64>,
}

macro_rules! subscription_columns {
    () => {
        "id, subject_kind, subject_id, user_id, plan, cycle, state, anchor_at, period_start, \
         period_end, cancel_at_period_end, scheduled_plan, scheduled_cycle, created_at, updated_at"
    };
}

macro_rules! change_columns {
    () => {
        "id, subject_kind, subject_id, user_id, kind, plan, cycle, from_plan, credit, \
         credit_detail, lines, status, idem_key, request_hash, renewal_key, invoice_id, \
         invoice_number, invoice_total, answer, applied_at, created_at, updated_at, period_start"
    };
}

/// The subscription of a subject.
pub async fn subscription_of(
    c: &mut AnyConnection,
    kind: &str,
    id: &str,
) -> Result<Option<SubscriptionRow>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        subscription_columns!(),
        " FROM subscriptions WHERE subject_kind = $1 AND subject_id = $2"
    ))
    .bind(kind)
    .bind(id)
    .fetch_optional(c)
    .await
}

/// Inserts `s`; false when the subject has one already.
pub async fn insert_subscription(
    c: &mut AnyConnection,
    s: &SubscriptionRow,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(concat!(
        "INSERT INTO subscriptions (",
        subscription_columns!(),
        ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
         ON CONFLICT (subject_kind, subject_id) DO NOTHING"
    ))
    .bind(&s.id)
    .bind(&s.subject_kind)
    .bind(&s.subject_id)
    .bind(&s.user_id)
    .bind(&s.plan)
    .bind(&s.cycle)
    .bind(&s.state)
    .bind(s.anchor_at)
    .bind(s.period_start)
    .bind(s.period_end)
    .bind(s.cancel_at_period_end)
    .bind(&s.scheduled_plan)
    .bind(&s.scheduled_cycle)
    .bind(s.created_at)
    .bind(s.updated_at)
    .execute(c)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Writes every mutable column of `s` back if its `updated_at` is still
/// `seen`; whether it did.
pub async fn update_subscription(
    c: &mut AnyConnection,
    s: &SubscriptionRow,
    seen: i64,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE subscriptions SET user_id = $1, plan = $2, cycle = $3, state = $4, \
         anchor_at = $5, period_start = $6, period_end = $7, cancel_at_period_end = $8, \
         scheduled_plan = $9, scheduled_cycle = $10, updated_at = $11 \
         WHERE id = $12 AND updated_at = $13",
    )
    .bind(&s.user_id)
    .bind(&s.plan)
    .bind(&s.cycle)
    .bind(&s.state)
    .bind(s.anchor_at)
    .bind(s.period_start)
    .bind(s.period_end)
    .bind(s.cancel_at_period_end)
    .bind(&s.scheduled_plan)
    .bind(&s.scheduled_cycle)
    .bind(s.updated_at)
    .bind(&s.id)
    .bind(seen)
    .execute(c)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Inserts `ch`; false when the subject used its key already.
pub async fn insert_change(c: &mut AnyConnection, ch: &ChangeRow) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(concat!(
        "INSERT INTO changes (",
        change_columns!(),
        ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, \
         $18, $19, $20, $21, $22, $23) ON CONFLICT DO NOTHING"
    ))
    .bind(&ch.id)
    .bind(&ch.subject_kind)
    .bind(&ch.subject_id)
    .bind(&ch.user_id)
    .bind(&ch.kind)
    .bind(&ch.plan)
    .bind(&ch.cycle)
    .bind(&ch.from_plan)
    .bind(ch.credit)
    .bind(&ch.credit_detail)
    .bind(&ch.lines)
    .bind(&ch.status)
    .bind(&ch.idem_key)
    .bind(&ch.request_hash)
    .bind(&ch.renewal_key)
    .bind(&ch.invoice_id)
    .bind(&ch.invoice_number)
    .bind(ch.invoice_total)
    .bind(&ch.answer)
    .bind(ch.applied_at)
    .bind(ch.created_at)
    .bind(ch.updated_at)
    .bind(ch.period_start)
    .execute(c)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// A subject's change made with `key`.
pub async fn change_by_key(
    c: &mut AnyConnection,
    kind: &str,
    id: &str,
    key: &str,
) -> Result<Option<ChangeRow>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        change_columns!(),
        " FROM changes WHERE subject_kind = $1 AND subject_id = $2 AND idem_key = $3"
    ))
    .bind(kind)
    .bind(id)
    .bind(key)
    .fetch_optional(c)
    .await
}

/// The change whose invoice is `invoice_id`, or whose id is
/// `reference_id` (an invoice's reference names its change).
pub async fn change_of_invoice(
    c: &mut AnyConnection,
    invoice_id: &str,
    reference_id: &str,
) -> Result<Option<ChangeRow>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        change_columns!(),
        " FROM changes WHERE id = $1 OR invoice_id = $2 ORDER BY id LIMIT 1"
    ))
    .bind(reference_id)
    .bind(invoice_id)
    .fetch_optional(c)
    .await
}

/// The subject's newest change still waiting for its invoice to be paid.
pub async fn pending_change(
    c: &mut AnyConnection,
    kind: &str,
    id: &str,
) -> Result<Option<ChangeRow>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        change_columns!(),
        " FROM changes WHERE subject_kind = $1 AND subject_id = $2 AND kind = 'checkout' \
         AND status = 'pending' ORDER BY created_at DESC, id DESC LIMIT 1"
    ))
    .bind(kind)
    .bind(id)
    .fetch_optional(c)
    .await
}

/// Records change `ch`'s invoice and answer. When it was still
/// `creating` it now waits for the payment and the subject's other
/// waiting checkouts are superseded (true); when a newer checkout
/// superseded it meanwhile, only the invoice is recorded, with the answer
/// `superseded` (false).
pub async fn set_invoiced(
    c: &mut AnyConnection,
    ch: &ChangeRow,
    superseded: &str,
    now: i64,
) -> Result<bool, sqlx::Error> {
    let fresh = sqlx::query(
        "UPDATE changes SET status = 'pending', invoice_id = $1, invoice_number = $2, \
         invoice_total = $3, answer = $4, updated_at = $5 WHERE id = $6 AND status = 'creating'",
    )
    .bind(&ch.invoice_id)
    .bind(&ch.invoice_number)
    .bind(ch.invoice_total)
    .bind(&ch.answer)
    .bind(now)
    .bind(&ch.id)
    .execute(&mut *c)
    .await?
    .rows_affected()
        == 1;
    if !fresh {
        sqlx::query(
            "UPDATE changes SET invoice_id = $1, invoice_number = $2, invoice_total = $3, \
             answer = COALESCE(answer, $4), updated_at = $5 WHERE id = $6",
        )
        .bind(&ch.invoice_id)
        .bind(&ch.invoice_number)
        .bind(ch.invoice_total)
        .bind(superseded)
        .bind(now)
        .bind(&ch.id)
        .execute(c)
        .await?;
        return Ok(false);
    }
    if ch.kind != "checkout" {
        return Ok(true);
    }
    sqlx::query(
        "UPDATE changes SET status = 'superseded', updated_at = $1 WHERE subject_kind = $2 \
         AND subject_id = $3 AND kind = 'checkout' AND status IN ('creating', 'pending') \
         AND id <> $4",
    )
    .bind(now)
    .bind(&ch.subject_kind)
    .bind(&ch.subject_id)
    .bind(&ch.id)
    .execute(c)
    .await?;
    Ok(true)
}

/// A new period started from a payment: the subject's renewals still
/// waiting (for periods that will not come) are superseded, except `keep`.
pub async fn supersede_renewals(
    c: &mut AnyConnection,
    kind: &str,
    id: &str,
    keep: &str,
    now: i64,
) -> Result<u64, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE changes SET status = 'superseded', updated_at = $1 WHERE subject_kind = $2 \
         AND subject_id = $3 AND kind = 'renewal' AND status IN ('creating', 'pending') \
         AND id <> $4",
    )
    .bind(now)
    .bind(kind)
    .bind(id)
    .bind(keep)
    .execute(c)
    .await?;
    Ok(r.rows_affected())
}

/// Superseded changes whose invoice was not voided yet (at most
/// `limit`): their invoice id and change id.
pub async fn superseded_open(
    c: &mut AnyConnection,
    limit: i64,
) -> Result<Vec<(String, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, invoice_id FROM changes WHERE status = 'superseded' \
         AND invoice_id IS NOT NULL AND invoice_settled_at IS NULL ORDER BY updated_at LIMIT $1",
    )
    .bind(limit)
    .fetch_all(c)
    .await
}

/// Records that change `id`'s invoice is voided (or was found paid).
pub async fn mark_invoice_settled(
    c: &mut AnyConnection,
    id: &str,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE changes SET invoice_settled_at = $1 WHERE id = $2")
        .bind(now)
        .bind(id)
        .execute(c)
        .await?;
    Ok(())
}

/// Marks change `id` paid but not applied (left for a refund).
pub async fn mark_unapplied(c: &mut AnyConnection, id: &str, now: i64) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE changes SET status = 'unapplied', updated_at = $1 WHERE id = $2")
        .bind(now)
        .bind(id)
        .execute(c)
        .await?;
    Ok(())
}

/// Marks change `id` applied; false when it was applied already.
pub async fn mark_applied(c: &mut AnyConnection, id: &str, now: i64) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE changes SET status = 'applied', applied_at = $1, updated_at = $1 \
         WHERE id = $2 AND status <> 'applied'",
    )
    .bind(now)
    .bind(id)
    .execute(c)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Active subscriptions, renewing, whose period ends by `until` and whose
/// next period has no renewal yet (at most `limit`).
pub async fn due_renewals(
    c: &mut AnyConnection,
    until: i64,
    limit: i64,
) -> Result<Vec<SubscriptionRow>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        subscription_columns!(),
        " FROM subscriptions s WHERE state = 'active' AND cancel_at_period_end = 0 \
         AND period_end <= $1 AND NOT EXISTS (SELECT 1 FROM changes c \
         WHERE c.renewal_key = s.id || ':' || CAST(s.period_end AS TEXT)) \
         ORDER BY period_end LIMIT $2"
    ))
    .bind(until)
    .bind(limit)
    .fetch_all(c)
    .await
}

/// Renewals whose invoice was not made (billing down, or a crash), made
/// before `before` (at most `limit`).
pub async fn uninvoiced(
    c: &mut AnyConnection,
    before: i64,
    limit: i64,
) -> Result<Vec<ChangeRow>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        change_columns!(),
        " FROM changes WHERE kind = 'renewal' AND status = 'creating' AND created_at <= $1 \
         ORDER BY created_at LIMIT $2"
    ))
    .bind(before)
    .bind(limit)
    .fetch_all(c)
    .await
}

/// Subscriptions in `state` whose period ended by `until` (at most
/// `limit`).
pub async fn ended(
    c: &mut AnyConnection,
    state: &str,
    until: i64,
    limit: i64,
) -> Result<Vec<SubscriptionRow>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        subscription_columns!(),
        " FROM subscriptions WHERE state = $1 AND period_end <= $2 ORDER BY period_end LIMIT $3"
    ))
    .bind(state)
    .bind(until)
    .bind(limit)
    .fetch_all(c)
    .await
}

/// Subscriptions newest first, after `cursor` (an id), optionally in
/// `state` and on `plan` (at most `limit`).
pub async fn list(
    c: &mut AnyConnection,
    state: Option<&str>,
    plan: Option<&str>,
    cursor: Option<&str>,
    limit: i64,
) -> Result<Vec<SubscriptionRow>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        subscription_columns!(),
        " FROM subscriptions WHERE ($1 IS NULL OR state = $1) AND ($2 IS NULL OR plan = $2) \
         AND ($3 IS NULL OR id < $3) ORDER BY id DESC LIMIT $4"
    ))
    .bind(state)
    .bind(plan)
    .bind(cursor)
    .bind(limit)
    .fetch_all(c)
    .await
}

// Usage the gateway metered.

/// One (subject, day, user, route) sum to add.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageAdd {
    pub subject_kind: String,
    pub subject_id: String,
    pub day: String,
    pub user_id: String,
    pub route: String,
    pub requests: i64,
}

/// Remembers batch `id`; false when it was counted before.
pub async fn claim_batch(
    c: &mut AnyConnection,
    id: &str,
    source: &str,
    rows: i64,
    requests: i64,
    now: i64,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "INSERT INTO usage_batches (batch_id, source, row_count, requests, received_at) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (batch_id) DO NOTHING",
    )
    .bind(id)
    .bind(source)
    .bind(rows)
    .bind(requests)
    .bind(now)
    .execute(c)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Rows per `INSERT` (6 parameters each, well under every bind limit).
const USAGE_ROWS_PER_STATEMENT: usize = 200;

/// Adds each sum to its day's row (`adds` has one entry per key).
pub async fn add_usage(c: &mut AnyConnection, adds: &[UsageAdd]) -> Result<(), sqlx::Error> {
    for chunk in adds.chunks(USAGE_ROWS_PER_STATEMENT) {
        let mut sql = String::from(
            "INSERT INTO usage_daily (subject_kind, subject_id, day, user_id, route, requests) VALUES ",
        );
        for i in 0..chunk.len() {
            let p = i * 6;
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!(
                "(${}, ${}, ${}, ${}, ${}, ${})",
                p + 1,
                p + 2,
                p + 3,
                p + 4,
                p + 5,
                p + 6
            ));
        }
        sql.push_str(
            " ON CONFLICT (subject_kind, subject_id, day, user_id, route) \
             DO UPDATE SET requests = usage_daily.requests + excluded.requests",
        );
        // Only numbered placeholders are interpolated; every value is bound.
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for a in chunk {
            q = q
                .bind(&a.subject_kind)
                .bind(&a.subject_id)
                .bind(&a.day)
                .bind(&a.user_id)
                .bind(&a.route)
                .bind(a.requests);
        }
        q.execute(&mut *c).await?;
    }
    Ok(())
}

/// A subject's usage from day `from` to day `to` (inclusive), one row per
/// day, user and route.
pub async fn usage_of(
    c: &mut AnyConnection,
    kind: &str,
    id: &str,
    from: &str,
    to: &str,
) -> Result<Vec<(String, String, String, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT day, user_id, route, requests FROM usage_daily \
         WHERE subject_kind = $1 AND subject_id = $2 AND day >= $3 AND day <= $4 \
         ORDER BY day, user_id, route",
    )
    .bind(kind)
    .bind(id)
    .bind(from)
    .bind(to)
    .fetch_all(c)
    .await
}

/// The `limit` users with the most requests from day `from` to day `to`,
/// over every subject.
pub async fn top_users(
    c: &mut AnyConnection,
    from: &str,
    to: &str,
    limit: i64,
) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT user_id, CAST(SUM(requests) AS BIGINT) AS total FROM usage_daily \
         WHERE day >= $1 AND day <= $2 GROUP BY user_id ORDER BY total DESC, user_id LIMIT $3",
    )
    .bind(from)
    .bind(to)
    .bind(limit)
    .fetch_all(c)
    .await
}

/// Forgets batch ids received before `before` (a retry older than that
/// would be counted again).
pub async fn purge_batches(c: &mut AnyConnection, before: i64) -> Result<u64, sqlx::Error> {
    let r = sqlx::query("DELETE FROM usage_batches WHERE received_at < $1")
        .bind(before)
        .execute(c)
        .await?;
    Ok(r.rows_affected())
}
