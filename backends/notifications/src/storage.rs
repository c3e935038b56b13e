//! SQL of notifications: recipients (preferences and contact), bots,
//! Telegram links and link codes, and the job queue. Every read a user's
//! request drives names the user in its `WHERE` clause.

use sqlx::AnyConnection;

/// A row of `recipients`.
#[derive(Debug, Clone, Default, sqlx::FromRow)]
pub struct RecipientRow {
    pub user_id: String,
    pub email: Option<String>,
    pub name: Option<String>,
    pub locale: Option<String>,
    pub time_zone: Option<String>,
    pub phone: Option<String>,
    pub channels: Option<String>,
    pub categories: Option<String>,
    pub quiet_start: Option<i32>,
    pub quiet_end: Option<i32>,
    pub updated_at: i64,
}

/// A row of `jobs`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct JobRow {
    pub id: String,
    pub event_id: String,
    pub event_type: String,
    pub user_id: Option<String>,
    pub channel: String,
    pub recipient: String,
    pub address: Option<String>,
    pub bot_id: Option<String>,
    pub category: String,
    pub critical: i32,
    pub fallbacks: String,
    pub fallback_of: Option<String>,
    pub payload: String,
    pub ref_id: Option<String>,
    pub status: String,
    pub attempts: i32,
    pub next_at: i64,
    pub claimed_until: Option<i64>,
    pub claimed_by: Option<String>,
    pub last_error: Option<String>,
    pub provider_id: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub sent_at: Option<i64>,
    pub delivered_at: Option<i64>,
}

/// A row of `bots`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct BotRow {
    pub id: String,
    pub telegram_id: i64,
    pub username: String,
    pub token: String,
    pub tenant_id: Option<String>,
    pub created_by: String,
    pub created_at: i64,
}

const JOB_COLUMNS: &str =
    "id, event_id, event_type, user_id, channel, recipient, address, bot_id, \
     category, critical, fallbacks, fallback_of, payload, ref_id, status, attempts, next_at, \
     claimed_until, claimed_by, last_error, provider_id, created_at, updated_at, sent_at, \
     delivered_at";

pub async fn recipient(
    c: &mut AnyConnection,
    user_id: &str,
) -> Result<Option<RecipientRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT user_id, email, name, locale, time_zone, phone, channels, categories, \
         quiet_start, quiet_end, updated_at FROM recipients WHERE user_id = $1",
    )
    .bind(user_id)
    .fetch_optional(c)
    .await
}

/// Inserts or replaces the preferences of `r.user_id` (contact kept).
pub async fn put_preferences(c: &mut AnyConnection, r: &RecipientRow) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO recipients (user_id, locale, time_zone, phone, channels, categories, \
         quiet_start, quiet_end, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
         ON CONFLICT (user_id) DO UPDATE SET locale = excluded.locale, \
         time_zone = excluded.time_zone, phone = excluded.phone, channels = excluded.channels, \
         categories = excluded.categories, quiet_start = excluded.quiet_start, \
         quiet_end = excluded.quiet_end, updated_at = excluded.updated_at",
    )
    .bind(&r.user_id)
    .bind(&r.locale)
    .bind(&r.time_zone)
    .bind(&r.phone)
    .bind(&r.channels)
    .bind(&r.categories)
    .bind(r.quiet_start)
    .bind(r.quiet_end)
    .bind(r.updated_at)
    .execute(c)
    .await?;
    Ok(())
}

/// Records the address (and name) the users service told for `user_id`.
pub async fn put_contact(
    c: &mut AnyConnection,
    user_id: &str,
    email: Option<&str>,
    name: Option<&str>,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO recipients (user_id, email, name, updated_at) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (user_id) DO UPDATE SET email = COALESCE(excluded.email, recipients.email), \
         name = COALESCE(excluded.name, recipients.name)",
    )
    .bind(user_id)
    .bind(email)
    .bind(name)
    .bind(now)
    .execute(c)
    .await?;
    Ok(())
}

/// Inserts a job unless one for its (event, channel, recipient) exists.
/// Whether it was inserted.
pub async fn insert_job(c: &mut AnyConnection, j: &JobRow) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "INSERT INTO jobs (id, event_id, event_type, user_id, channel, recipient, address, \
         bot_id, category, critical, fallbacks, fallback_of, payload, ref_id, status, attempts, \
         next_at, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, \
         $12, $13, $14, $15, 0, $16, $17, $17) ON CONFLICT (event_id, channel, recipient) DO NOTHING",
    )
    .bind(&j.id)
    .bind(&j.event_id)
    .bind(&j.event_type)
    .bind(&j.user_id)
    .bind(&j.channel)
    .bind(&j.recipient)
    .bind(&j.address)
    .bind(&j.bot_id)
    .bind(&j.category)
    .bind(j.critical)
    .bind(&j.fallbacks)
    .bind(&j.fallback_of)
    .bind(&j.payload)
    .bind(&j.ref_id)
    .bind(&j.status)
    .bind(j.next_at)
    .bind(j.created_at)
    .execute(c)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// The ids of up to `limit` jobs due at `now`: queued and due, or claimed
/// by a worker whose lease ran out.
pub async fn due_jobs(
    c: &mut AnyConnection,
    now: i64,
    limit: i64,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT id FROM jobs WHERE (status = 'queued' AND next_at <= $1) \
         OR (status = 'sending' AND claimed_until < $1) ORDER BY next_at LIMIT $2",
    )
    .bind(now)
    .bind(limit)
    .fetch_all(c)
    .await
}

/// The earliest `next_at` of a queued job, to sleep until.
pub async fn next_due(c: &mut AnyConnection) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT MIN(next_at) FROM jobs WHERE status = 'queued'")
        .fetch_one(c)
        .await
}

/// Claims job `id` for `worker` until `until`, counting the attempt; the
/// job as claimed, or `None` when another worker took it first.
pub async fn claim(
    c: &mut AnyConnection,
    id: &str,
    worker: &str,
    now: i64,
    until: i64,
) -> Result<Option<JobRow>, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE jobs SET status = 'sending', claimed_by = $1, claimed_until = $2, \
         attempts = attempts + 1, updated_at = $3 WHERE id = $4 AND \
         ((status = 'queued' AND next_at <= $3) OR (status = 'sending' AND claimed_until < $3))",
    )
    .bind(worker)
    .bind(until)
    .bind(now)
    .bind(id)
    .execute(&mut *c)
    .await?;
    if done.rows_affected() != 1 {
        return Ok(None);
    }
    job(c, id).await
}

pub async fn job(c: &mut AnyConnection, id: &str) -> Result<Option<JobRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(c)
    .await
}

/// What an attempt ended in.
pub struct Finish<'a> {
    pub status: &'a str,
    pub next_at: i64,
    pub error: Option<&'a str>,
    pub provider_id: Option<&'a str>,
    pub address: Option<&'a str>,
    pub sent_at: Option<i64>,
}

impl<'a> Finish<'a> {
    /// An attempt that sent nothing: `status` (queued again, failed,
    /// dead) at `next_at`, why, and the address tried.
    pub fn unsent(status: &'a str, next_at: i64, error: &'a str, address: Option<&'a str>) -> Self {
        Self {
            status,
            next_at,
            error: Some(error),
            provider_id: None,
            address,
            sent_at: None,
        }
    }
}

/// Records the end of `worker`'s attempt `attempts` on job `id`; false
/// when the claim was lost (another worker took it over).
pub async fn finish(
    c: &mut AnyConnection,
    id: &str,
    worker: &str,
    attempts: i32,
    f: &Finish<'_>,
    now: i64,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE jobs SET status = $1, next_at = $2, last_error = $3, \
         provider_id = COALESCE($4, provider_id), address = COALESCE($5, address), \
         sent_at = COALESCE($6, sent_at), claimed_by = NULL, claimed_until = NULL, \
         updated_at = $7 WHERE id = $8 AND claimed_by = $9 AND attempts = $10 \
         AND status = 'sending'",
    )
    .bind(f.status)
    .bind(f.next_at)
    .bind(f.error)
    .bind(f.provider_id)
    .bind(f.address)
    .bind(f.sent_at)
    .bind(now)
    .bind(id)
    .bind(worker)
    .bind(attempts)
    .execute(c)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Cancels the queued reminders about `ref_id`.
pub async fn cancel_reminders(
    c: &mut AnyConnection,
    ref_id: &str,
    why: &str,
    now: i64,
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE jobs SET status = 'canceled', last_error = $1, updated_at = $2 \
         WHERE ref_id = $3 AND event_type = 'payment.expiring' AND status = 'queued'",
    )
    .bind(why)
    .bind(now)
    .bind(ref_id)
    .execute(c)
    .await?;
    Ok(done.rows_affected())
}

/// A delivery report: `provider_id`'s job is `status` (`delivered`, or
/// `failed` with `error`). Only forward: a delivered job stays delivered.
pub async fn report(
    c: &mut AnyConnection,
    provider_id: &str,
    status: &str,
    error: Option<&str>,
    now: i64,
) -> Result<Option<JobRow>, sqlx::Error> {
    let delivered_at = (status == "delivered").then_some(now);
    let done = sqlx::query(
        "UPDATE jobs SET status = $1, last_error = COALESCE($2, last_error), \
         delivered_at = COALESCE($3, delivered_at), updated_at = $4 \
         WHERE provider_id = $5 AND status = 'sent'",
    )
    .bind(status)
    .bind(error)
    .bind(delivered_at)
    .bind(now)
    .bind(provider_id)
    .execute(&mut *c)
    .await?;
    if done.rows_affected() == 0 {
        return Ok(None);
    }
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE provider_id = $1"
    )))
    .bind(provider_id)
    .fetch_optional(c)
    .await
}

/// Keeps a delivery report no sent job took (its job's provider id was
/// not committed when the report came); the first report of a message
/// stands.
pub async fn keep_early_report(
    c: &mut AnyConnection,
    provider_id: &str,
    status: &str,
    error: Option<&str>,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO early_reports (provider_id, status, error, received_at) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (provider_id) DO NOTHING",
    )
    .bind(provider_id)
    .bind(status)
    .bind(error)
    .bind(now)
    .execute(c)
    .await?;
    Ok(())
}

/// Takes the report kept for `provider_id` once its job has recorded
/// that id (committed): (status, error). Atomic: of two takers, one gets
/// it.
pub async fn take_early_report(
    c: &mut AnyConnection,
    provider_id: &str,
) -> Result<Option<(String, Option<String>)>, sqlx::Error> {
    sqlx::query_as(
        "DELETE FROM early_reports WHERE provider_id = $1 \
         AND EXISTS (SELECT 1 FROM jobs WHERE provider_id = $1) RETURNING status, error",
    )
    .bind(provider_id)
    .fetch_optional(c)
    .await
}

/// Forgets early reports no job claimed by `before`.
pub async fn purge_early_reports(c: &mut AnyConnection, before: i64) -> Result<u64, sqlx::Error> {
    let done = sqlx::query("DELETE FROM early_reports WHERE received_at < $1")
        .bind(before)
        .execute(c)
        .await?;
    Ok(done.rows_affected())
}

/// A filter of the job list.
#[derive(Debug, Default)]
pub struct JobFilter<'a> {
    pub user_id: Option<&'a str>,
    pub event_type: Option<&'a str>,
    pub status: Option<&'a str>,
    pub event_id: Option<&'a str>,
    /// Only jobs created before this (paging, newest first).
    pub before: Option<i64>,
    pub limit: i64,
}

/// Jobs matching `f`, newest first.
pub async fn jobs(c: &mut AnyConnection, f: &JobFilter<'_>) -> Result<Vec<JobRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE ($1 IS NULL OR user_id = $1) \
         AND ($2 IS NULL OR event_type = $2) AND ($3 IS NULL OR status = $3) \
         AND ($4 IS NULL OR event_id = $4) AND ($5 IS NULL OR created_at < $5) \
         ORDER BY created_at DESC, id DESC LIMIT $6"
    )))
    .bind(f.user_id)
    .bind(f.event_type)
    .bind(f.status)
    .bind(f.event_id)
    .bind(f.before)
    .bind(f.limit)
    .fetch_all(c)
    .await
}

/// Jobs by status, for metrics and `/health`.
pub async fn job_counts(c: &mut AnyConnection) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as("SELECT status, COUNT(*) FROM jobs GROUP BY status")
        .fetch_all(c)
        .await
}

// --- Telegram

pub async fn insert_bot(c: &mut AnyConnection, b: &BotRow) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO bots (id, telegram_id, username, token, tenant_id, created_by, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&b.id)
    .bind(b.telegram_id)
    .bind(&b.username)
    .bind(&b.token)
    .bind(&b.tenant_id)
    .bind(&b.created_by)
    .bind(b.created_at)
    .execute(c)
    .await?;
    Ok(())
}

pub async fn bots(c: &mut AnyConnection) -> Result<Vec<BotRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, telegram_id, username, token, tenant_id, created_by, created_at FROM bots \
         ORDER BY created_at",
    )
    .fetch_all(c)
    .await
}

pub async fn delete_bot(c: &mut AnyConnection, id: &str) -> Result<bool, sqlx::Error> {
    sqlx::query("DELETE FROM telegram_links WHERE bot_id = $1")
        .bind(id)
        .execute(&mut *c)
        .await?;
    let done = sqlx::query("DELETE FROM bots WHERE id = $1")
        .bind(id)
        .execute(c)
        .await?;
    Ok(done.rows_affected() == 1)
}

pub async fn insert_link_code(
    c: &mut AnyConnection,
    code_hash: &str,
    bot_id: &str,
    user_id: &str,
    expires_at: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO link_codes (code_hash, bot_id, user_id, expires_at) VALUES ($1, $2, $3, $4)",
    )
    .bind(code_hash)
    .bind(bot_id)
    .bind(user_id)
    .bind(expires_at)
    .execute(c)
    .await?;
    Ok(())
}

/// Uses link code `code_hash` of `bot_id` once: its user, when it was
/// unused and unexpired.
pub async fn use_link_code(
    c: &mut AnyConnection,
    code_hash: &str,
    bot_id: &str,
    now: i64,
) -> Result<Option<String>, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE link_codes SET used_at = $1 WHERE code_hash = $2 AND bot_id = $3 \
         AND used_at IS NULL AND expires_at > $1",
    )
    .bind(now)
    .bind(code_hash)
    .bind(bot_id)
    .execute(&mut *c)
    .await?;
    if done.rows_affected() != 1 {
        return Ok(None);
    }
    sqlx::query_scalar("SELECT user_id FROM link_codes WHERE code_hash = $1")
        .bind(code_hash)
        .fetch_optional(c)
        .await
}

/// Forgets codes expired before `before`.
pub async fn purge_link_codes(c: &mut AnyConnection, before: i64) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query("DELETE FROM link_codes WHERE expires_at < $1")
        .bind(before)
        .execute(c)
        .await?
        .rows_affected())
}

/// Links `user_id`'s chat with `bot_id` (replacing an older chat).
pub async fn link(
    c: &mut AnyConnection,
    bot_id: &str,
    user_id: &str,
    chat_id: i64,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO telegram_links (bot_id, user_id, chat_id, linked_at) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (bot_id, user_id) DO UPDATE SET chat_id = excluded.chat_id, \
         linked_at = excluded.linked_at",
    )
    .bind(bot_id)
    .bind(user_id)
    .bind(chat_id)
    .bind(now)
    .execute(c)
    .await?;
    Ok(())
}

/// Unlinks chat `chat_id` from `bot_id` (every user it was linked to).
pub async fn unlink_chat(
    c: &mut AnyConnection,
    bot_id: &str,
    chat_id: i64,
) -> Result<u64, sqlx::Error> {
    Ok(
        sqlx::query("DELETE FROM telegram_links WHERE bot_id = $1 AND chat_id = $2")
            .bind(bot_id)
            .bind(chat_id)
            .execute(c)
            .await?
            .rows_affected(),
    )
}

/// Unlinks `user_id` from `bot_id`.
pub async fn unlink_user(
    c: &mut AnyConnection,
    bot_id: &str,
    user_id: &str,
) -> Result<bool, sqlx::Error> {
    Ok(
        sqlx::query("DELETE FROM telegram_links WHERE bot_id = $1 AND user_id = $2")
            .bind(bot_id)
            .bind(user_id)
            .execute(c)
            .await?
            .rows_affected()
            == 1,
    )
}

/// `user_id`'s chat with `bot_id`.
pub async fn chat_of(
    c: &mut AnyConnection,
    bot_id: &str,
    user_id: &str,
) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT chat_id FROM telegram_links WHERE bot_id = $1 AND user_id = $2")
        .bind(bot_id)
        .bind(user_id)
        .fetch_optional(c)
        .await
}

/// `user_id`'s links: (bot id, linked at).
pub async fn links_of(
    c: &mut AnyConnection,
    user_id: &str,
) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT bot_id, linked_at FROM telegram_links WHERE user_id = $1 ORDER BY bot_id",
    )
    .bind(user_id)
    .fetch_all(c)
    .await
}
