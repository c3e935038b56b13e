//! SQL of the users service (portable across SQLite and PostgreSQL; see
//! `backend_common::db`). Every function takes a connection so that the
//! caller decides the transaction.

use sqlx::AnyConnection;

/// A row of `users`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UserRow {
    /// Id (UUIDv7).
    pub id: String,
    /// Lower-cased e-mail.
    pub email: String,
    /// Display name.
    pub name: String,
    /// Argon2id PHC string.
    pub password_hash: String,
    /// When the e-mail was verified (ms), if it was.
    pub email_verified_at: Option<i64>,
    /// Comma-separated roles.
    pub roles: String,
    /// Current tier.
    pub tier: String,
    /// `occurred_at` of the event that set the tier.
    pub tier_changed_at: i64,
    /// Created (ms).
    pub created_at: i64,
    /// Last changed (ms).
    pub updated_at: i64,
}

impl UserRow {
    /// The roles as a list.
    pub fn role_list(&self) -> Vec<String> {
        self.roles
            .split(',')
            .filter(|r| !r.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

/// The columns of [`UserRow`], as a literal so queries stay `&'static str`.
macro_rules! user_columns {
    () => {
        "id, email, name, password_hash, email_verified_at, roles, tier, tier_changed_at, \
         created_at, updated_at"
    };
}

/// Inserts a user. A duplicate e-mail fails with a unique violation.
pub async fn insert_user(c: &mut AnyConnection, u: &UserRow) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO users (id, email, name, password_hash, email_verified_at, roles, tier, \
         tier_changed_at, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(&u.id)
    .bind(&u.email)
    .bind(&u.name)
    .bind(&u.password_hash)
    .bind(u.email_verified_at)
    .bind(&u.roles)
    .bind(&u.tier)
    .bind(u.tier_changed_at)
    .bind(u.created_at)
    .bind(u.updated_at)
    .execute(c)
    .await
    .map(|_| ())
}

/// The user with this id.
pub async fn user_by_id(c: &mut AnyConnection, id: &str) -> Result<Option<UserRow>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        user_columns!(),
        " FROM users WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(c)
    .await
}

/// The user with this (lower-cased) e-mail.
pub async fn user_by_email(
    c: &mut AnyConnection,
    email: &str,
) -> Result<Option<UserRow>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        user_columns!(),
        " FROM users WHERE email = $1"
    ))
    .bind(email)
    .fetch_optional(c)
    .await
}

/// Users ordered by id (creation time), after the cursor.
pub async fn list_users(
    c: &mut AnyConnection,
    after: &str,
    limit: i64,
) -> Result<Vec<UserRow>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        user_columns!(),
        " FROM users WHERE id > $1 ORDER BY id LIMIT $2"
    ))
    .bind(after)
    .bind(limit)
    .fetch_all(c)
    .await
}

/// Sets one column-group of a user; returns whether the user exists.
pub async fn set_name(
    c: &mut AnyConnection,
    id: &str,
    name: &str,
    now: i64,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query("UPDATE users SET name = $1, updated_at = $2 WHERE id = $3")
        .bind(name)
        .bind(now)
        .bind(id)
        .execute(c)
        .await?;
    Ok(r.rows_affected() == 1)
}

/// Replaces the roles.
pub async fn set_roles(
    c: &mut AnyConnection,
    id: &str,
    roles: &str,
    now: i64,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query("UPDATE users SET roles = $1, updated_at = $2 WHERE id = $3")
        .bind(roles)
        .bind(now)
        .bind(id)
        .execute(c)
        .await?;
    Ok(r.rows_affected() == 1)
}

/// Replaces the password hash.
pub async fn set_password(
    c: &mut AnyConnection,
    id: &str,
    hash: &str,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE users SET password_hash = $1, updated_at = $2 WHERE id = $3")
        .bind(hash)
        .bind(now)
        .bind(id)
        .execute(c)
        .await
        .map(|_| ())
}

/// Marks the e-mail verified (once).
pub async fn mark_verified(c: &mut AnyConnection, id: &str, now: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE users SET email_verified_at = $1, updated_at = $1 WHERE id = $2 AND email_verified_at IS NULL",
    )
    .bind(now)
    .bind(id)
    .execute(c)
    .await
    .map(|_| ())
}

/// Whose tier [`set_tier`] sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TierOf {
    /// A user's (`users`).
    User,
    /// An organization's (`organizations`).
    Organization,
}

/// What [`set_tier`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TierSet {
    /// The tier changed (and a row was added to the change feed).
    Changed,
    /// The event was newer but named the tier the subject has already.
    Same,
    /// Nothing: a later event set it already, or no such subject.
    Stale,
}

impl TierOf {
    /// Its name in events and in the change feed.
    pub fn kind(self) -> &'static str {
        match self {
            TierOf::User => "user",
            TierOf::Organization => "organization",
        }
    }
}

/// Sets the tier of a user or an organization from a subscription event
/// that happened at `occurred_at`, unless a later event already set it.
/// A change of tier is also recorded in the change feed
/// ([`record_tier_change`]) in the same transaction.
pub async fn set_tier(
    c: &mut AnyConnection,
    of: TierOf,
    id: &str,
    tier: &str,
    occurred_at: i64,
    now: i64,
) -> Result<TierSet, sqlx::Error> {
    // Two statements instead of reading the old tier first: each takes the
    // row's lock, so two events for one subject cannot both see the old
    // tier on PostgreSQL.
    let (change, same) = match of {
        TierOf::User => (
            "UPDATE users SET tier = $1, tier_changed_at = $2, updated_at = $3 \
             WHERE id = $4 AND tier_changed_at <= $2 AND tier <> $1",
            "UPDATE users SET tier_changed_at = $2, updated_at = $3 \
             WHERE id = $4 AND tier_changed_at <= $2 AND tier = $1",
        ),
        TierOf::Organization => (
            "UPDATE organizations SET tier = $1, tier_changed_at = $2, updated_at = $3 \
             WHERE id = $4 AND tier_changed_at <= $2 AND tier <> $1",
            "UPDATE organizations SET tier_changed_at = $2, updated_at = $3 \
             WHERE id = $4 AND tier_changed_at <= $2 AND tier = $1",
        ),
    };
    let run = |sql: &'static str| {
        sqlx::query(sql)
            .bind(tier)
            .bind(occurred_at)
            .bind(now)
            .bind(id)
    };
    let changed = run(change).execute(&mut *c).await?;
    if changed.rows_affected() == 1 {
        // The system's time, not the service clock's: it is compared with
        // the `iat` of access tokens, which are signed on the system's.
        let applied_at = backend_common::clock::system_now_ms();
        record_tier_change(c, of, id, tier, applied_at).await?;
        return Ok(TierSet::Changed);
    }
    let same = run(same).execute(&mut *c).await?;
    Ok(if same.rows_affected() == 1 {
        TierSet::Same
    } else {
        TierSet::Stale
    })
}

/// Appends a change to the tier change feed. The counter's row stays
/// locked until the caller commits, so numbers commit in order.
async fn record_tier_change(
    c: &mut AnyConnection,
    of: TierOf,
    id: &str,
    tier: &str,
    now: i64,
) -> Result<(), sqlx::Error> {
    let seq: i64 = sqlx::query_scalar(
        "UPDATE tier_change_counter SET last = last + 1 WHERE id = 1 RETURNING last",
    )
    .fetch_one(&mut *c)
    .await?;
    sqlx::query(
        "INSERT INTO tier_changes (seq, subject_kind, subject_id, tier, applied_at) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(seq)
    .bind(of.kind())
    .bind(id)
    .bind(tier)
    .bind(now)
    .execute(c)
    .await?;
    Ok(())
}

/// One row of the tier change feed.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TierChangeRow {
    /// Its number (commit order).
    pub seq: i64,
    /// `user` or `organization`.
    pub subject_kind: String,
    /// The user's or organization's id.
    pub subject_id: String,
    /// The new tier.
    pub tier: String,
    /// When it was applied (ms).
    pub applied_at: i64,
}

/// Feed rows after `after` (by number), at most `limit`.
pub async fn tier_changes_after(
    c: &mut AnyConnection,
    after: i64,
    limit: i64,
) -> Result<Vec<TierChangeRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT seq, subject_kind, subject_id, tier, applied_at FROM tier_changes \
         WHERE seq > $1 ORDER BY seq LIMIT $2",
    )
    .bind(after)
    .bind(limit)
    .fetch_all(c)
    .await
}

/// Feed rows applied at or after `since` (ms), at most `limit`, oldest
/// first.
pub async fn tier_changes_since(
    c: &mut AnyConnection,
    since: i64,
    limit: i64,
) -> Result<Vec<TierChangeRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT seq, subject_kind, subject_id, tier, applied_at FROM tier_changes \
         WHERE applied_at >= $1 ORDER BY seq LIMIT $2",
    )
    .bind(since)
    .bind(limit)
    .fetch_all(c)
    .await
}

/// The number of the last committed feed row (0: none yet).
pub async fn last_tier_change(c: &mut AnyConnection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT last FROM tier_change_counter WHERE id = 1")
        .fetch_one(c)
        .await
}

/// Deletes feed rows applied before `before` (ms).
pub async fn purge_tier_changes(c: &mut AnyConnection, before: i64) -> Result<u64, sqlx::Error> {
    let r = sqlx::query("DELETE FROM tier_changes WHERE applied_at < $1")
        .bind(before)
        .execute(c)
        .await?;
    Ok(r.rows_affected())
}

/// A new one-time token (stored as its hash).
pub struct NewOneTime<'a> {
    /// SHA-256 of the token.
    pub hash: &'a str,
    /// Its user.
    pub user_id: &'a str,
    /// `verify_email` or `reset_password`.
    pub purpose: &'a str,
    /// For an e-mail change: the new address.
    pub email: Option<&'a str>,
    /// Expiry (ms).
    pub expires_at: i64,
    /// Now (ms).
    pub now: i64,
}

/// Stores a one-time token (its hash).
pub async fn insert_one_time(c: &mut AnyConnection, t: &NewOneTime<'_>) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO one_time_tokens (token_hash, user_id, purpose, email, expires_at, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(t.hash)
    .bind(t.user_id)
    .bind(t.purpose)
    .bind(t.email)
    .bind(t.expires_at)
    .bind(t.now)
    .execute(c)
    .await
    .map(|_| ())
}

/// When the user's newest token for `purpose` was created, if any.
pub async fn last_one_time(
    c: &mut AnyConnection,
    user_id: &str,
    purpose: &str,
) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT MAX(created_at) FROM one_time_tokens WHERE user_id = $1 AND purpose = $2",
    )
    .bind(user_id)
    .bind(purpose)
    .fetch_one(c)
    .await
}

/// Uses a one-time token: marks it used if it is unused, unexpired and for
/// `purpose`, and returns its user and, for an e-mail change, the new
/// address. Atomic: two concurrent uses cannot both succeed.
pub async fn use_one_time(
    c: &mut AnyConnection,
    hash: &str,
    purpose: &str,
    now: i64,
) -> Result<Option<(String, Option<String>)>, sqlx::Error> {
    let used = sqlx::query(
        "UPDATE one_time_tokens SET used_at = $1 WHERE token_hash = $2 AND purpose = $3 \
         AND used_at IS NULL AND expires_at > $1",
    )
    .bind(now)
    .bind(hash)
    .bind(purpose)
    .execute(&mut *c)
    .await?;
    if used.rows_affected() != 1 {
        return Ok(None);
    }
    sqlx::query_as("SELECT user_id, email FROM one_time_tokens WHERE token_hash = $1")
        .bind(hash)
        .fetch_optional(c)
        .await
}

/// Switches the address (verified by the link sent to it). A unique
/// violation means another account took it meanwhile.
pub async fn set_email(
    c: &mut AnyConnection,
    id: &str,
    email: &str,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE users SET email = $1, email_verified_at = $2, updated_at = $2 WHERE id = $3",
    )
    .bind(email)
    .bind(now)
    .bind(id)
    .execute(c)
    .await
    .map(|_| ())
}

/// Whether an account uses this (lower-cased) address.
pub async fn email_taken(c: &mut AnyConnection, email: &str) -> Result<bool, sqlx::Error> {
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users WHERE email = $1")
        .bind(email)
        .fetch_one(c)
        .await?;
    Ok(n > 0)
}

/// Deletes what can no longer be used: one-time tokens used or expired,
/// refresh tokens expired (a reuse of one is then an unknown token,
/// refused just the same). Returns the number of rows deleted.
pub async fn purge_expired(c: &mut AnyConnection, now: i64) -> Result<u64, sqlx::Error> {
    let tokens =
        sqlx::query("DELETE FROM one_time_tokens WHERE used_at IS NOT NULL OR expires_at <= $1")
            .bind(now)
            .execute(&mut *c)
            .await?;
    let refresh = sqlx::query("DELETE FROM refresh_tokens WHERE expires_at <= $1")
        .bind(now)
        .execute(c)
        .await?;
    Ok(tokens.rows_affected() + refresh.rows_affected())
}

/// A row of `refresh_tokens`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RefreshRow {
    /// Id.
    pub id: String,
    /// Owner.
    pub user_id: String,
    /// The login this token descends from.
    pub family_id: String,
    /// Expiry (ms).
    pub expires_at: i64,
    /// When it was exchanged for a new one.
    pub rotated_at: Option<i64>,
    /// When its family was revoked.
    pub revoked_at: Option<i64>,
    /// The organization its login acts for (`None`: personally).
    pub tenant: Option<String>,
}

/// A refresh token to store.
pub struct NewRefresh<'a> {
    /// Id.
    pub id: &'a str,
    /// Owner.
    pub user_id: &'a str,
    /// Its login.
    pub family_id: &'a str,
    /// SHA-256 of the token.
    pub hash: &'a str,
    /// The organization the login acts for.
    pub tenant: Option<&'a str>,
    /// Created (ms).
    pub now: i64,
    /// Expires (ms).
    pub expires_at: i64,
}

/// Stores a refresh token (its hash).
pub async fn insert_refresh(c: &mut AnyConnection, r: &NewRefresh<'_>) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO refresh_tokens (id, user_id, family_id, token_hash, created_at, expires_at, \
         tenant) VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(r.id)
    .bind(r.user_id)
    .bind(r.family_id)
    .bind(r.hash)
    .bind(r.now)
    .bind(r.expires_at)
    .bind(r.tenant)
    .execute(c)
    .await
    .map(|_| ())
}

/// The refresh token with this hash.
pub async fn refresh_by_hash(
    c: &mut AnyConnection,
    hash: &str,
) -> Result<Option<RefreshRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, user_id, family_id, expires_at, rotated_at, revoked_at, tenant \
         FROM refresh_tokens WHERE token_hash = $1",
    )
    .bind(hash)
    .fetch_optional(c)
    .await
}

/// Marks a token rotated; false when it already was (a concurrent use).
pub async fn mark_rotated(c: &mut AnyConnection, id: &str, now: i64) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE refresh_tokens SET rotated_at = $1 WHERE id = $2 AND rotated_at IS NULL AND revoked_at IS NULL",
    )
    .bind(now)
    .bind(id)
    .execute(c)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Revokes every token of a family.
pub async fn revoke_family(
    c: &mut AnyConnection,
    family_id: &str,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE refresh_tokens SET revoked_at = $1 WHERE family_id = $2 AND revoked_at IS NULL",
    )
    .bind(now)
    .bind(family_id)
    .execute(c)
    .await
    .map(|_| ())
}

/// Revokes every refresh token of a user (password reset), except those
/// of the login `keep` (a password change keeps the caller's session).
pub async fn revoke_user(
    c: &mut AnyConnection,
    user_id: &str,
    keep: Option<&str>,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE refresh_tokens SET revoked_at = $1 WHERE user_id = $2 AND revoked_at IS NULL \
         AND family_id <> $3",
    )
    .bind(now)
    .bind(user_id)
    .bind(keep.unwrap_or(""))
    .execute(c)
    .await
    .map(|_| ())
}
