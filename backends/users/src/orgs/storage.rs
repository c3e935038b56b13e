//! SQL of organizations, memberships and invitations. Every read that a
//! caller's request drives is scoped by the caller: an organization is
//! found only through the caller's membership (`…_for_member`), so a
//! guessed id of another organization finds nothing (404), never a row
//! filtered out afterwards.

use sqlx::AnyConnection;

/// A row of `organizations`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OrgRow {
    /// Id (UUIDv7).
    pub id: String,
    /// Unique handle (`acme-id`).
    pub slug: String,
    /// Display name.
    pub name: String,
    /// Legal name for tax invoices.
    pub legal_name: Option<String>,
    /// NPWP, 16 digits.
    pub npwp: Option<String>,
    /// NITKU, 22 digits.
    pub nitku: Option<String>,
    /// Address for tax invoices.
    pub address: Option<String>,
    /// Current tier.
    pub tier: String,
    /// `occurred_at` of the event that set the tier.
    pub tier_changed_at: i64,
    /// The user who created it.
    pub created_by: String,
    /// Created (ms).
    pub created_at: i64,
    /// Last changed (ms).
    pub updated_at: i64,
}

/// An organization with the caller's role in it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct MemberOrgRow {
    /// The organization.
    #[sqlx(flatten)]
    pub org: OrgRow,
    /// The caller's role: `owner`, `admin` or `member`.
    pub role: String,
}

macro_rules! org_columns {
    ($p:literal) => {
        concat!(
            $p,
            "id, ",
            $p,
            "slug, ",
            $p,
            "name, ",
            $p,
            "legal_name, ",
            $p,
            "npwp, ",
            $p,
            "nitku, ",
            $p,
            "address, ",
            $p,
            "tier, ",
            $p,
            "tier_changed_at, ",
            $p,
            "created_by, ",
            $p,
            "created_at, ",
            $p,
            "updated_at"
        )
    };
}

/// Inserts an organization. A taken slug fails on `organizations_slug_key`.
pub async fn insert_org(c: &mut AnyConnection, o: &OrgRow) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO organizations (id, slug, name, legal_name, npwp, nitku, address, tier, \
         tier_changed_at, created_by, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    )
    .bind(&o.id)
    .bind(&o.slug)
    .bind(&o.name)
    .bind(&o.legal_name)
    .bind(&o.npwp)
    .bind(&o.nitku)
    .bind(&o.address)
    .bind(&o.tier)
    .bind(o.tier_changed_at)
    .bind(&o.created_by)
    .bind(o.created_at)
    .bind(o.updated_at)
    .execute(c)
    .await
    .map(|_| ())
}

/// The organization `org_id` if `user_id` is one of its members (and it
/// is not dissolved), with that member's role.
pub async fn org_for_member(
    c: &mut AnyConnection,
    org_id: &str,
    user_id: &str,
) -> Result<Option<MemberOrgRow>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        org_columns!("o."),
        ", m.role FROM organizations o JOIN memberships m ON m.org_id = o.id \
         WHERE o.id = $1 AND m.user_id = $2 AND o.deleted_at IS NULL"
    ))
    .bind(org_id)
    .bind(user_id)
    .fetch_optional(c)
    .await
}

/// Every organization `user_id` belongs to, oldest first.
pub async fn orgs_of_member(
    c: &mut AnyConnection,
    user_id: &str,
) -> Result<Vec<MemberOrgRow>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        org_columns!("o."),
        ", m.role FROM organizations o JOIN memberships m ON m.org_id = o.id \
         WHERE m.user_id = $1 AND o.deleted_at IS NULL ORDER BY o.id"
    ))
    .bind(user_id)
    .fetch_all(c)
    .await
}

/// An organization by id, for other services (not dissolved).
pub async fn org_by_id(c: &mut AnyConnection, id: &str) -> Result<Option<OrgRow>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        org_columns!(""),
        " FROM organizations WHERE id = $1 AND deleted_at IS NULL"
    ))
    .bind(id)
    .fetch_optional(c)
    .await
}

/// Changes the name and company details.
pub async fn update_org(c: &mut AnyConnection, o: &OrgRow, now: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE organizations SET name = $1, legal_name = $2, npwp = $3, nitku = $4, \
         address = $5, updated_at = $6 WHERE id = $7",
    )
    .bind(&o.name)
    .bind(&o.legal_name)
    .bind(&o.npwp)
    .bind(&o.nitku)
    .bind(&o.address)
    .bind(now)
    .bind(&o.id)
    .execute(c)
    .await
    .map(|_| ())
}

/// Takes the organization's row lock for the rest of the transaction
/// (PostgreSQL; SQLite's write transaction already holds the database):
/// every change to its members, roles, invitations or details starts
/// here, so two of them never decide on the same stale state (two owners
/// demoting each other, a removal racing an acceptance). False when the
/// organization does not exist or is dissolved.
pub async fn lock_org(c: &mut AnyConnection, id: &str) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE organizations SET updated_at = updated_at WHERE id = $1 AND deleted_at IS NULL",
    )
    .bind(id)
    .execute(c)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Dissolves an organization on the FREE tier: its memberships and
/// pending invitations end, the row stays (invoices name it). False when
/// it is already dissolved or has a paid tier (nothing changed).
pub async fn dissolve_org(c: &mut AnyConnection, id: &str, now: i64) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE organizations SET deleted_at = $1, updated_at = $1 \
         WHERE id = $2 AND deleted_at IS NULL AND tier = 'FREE'",
    )
    .bind(now)
    .bind(id)
    .execute(&mut *c)
    .await?;
    if r.rows_affected() != 1 {
        return Ok(false);
    }
    sqlx::query("DELETE FROM memberships WHERE org_id = $1")
        .bind(id)
        .execute(&mut *c)
        .await?;
    sqlx::query(
        "UPDATE invitations SET revoked_at = $1 WHERE org_id = $2 AND accepted_at IS NULL \
         AND declined_at IS NULL AND revoked_at IS NULL",
    )
    .bind(now)
    .bind(id)
    .execute(c)
    .await?;
    Ok(true)
}

/// Whether an organization with this id exists (dissolved or not).
pub async fn org_exists(c: &mut AnyConnection, id: &str) -> Result<bool, sqlx::Error> {
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM organizations WHERE id = $1")
        .bind(id)
        .fetch_one(c)
        .await?;
    Ok(n > 0)
}

/// A member of an organization, with the person's name and address.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct MemberRow {
    /// The user.
    pub user_id: String,
    /// Their e-mail.
    pub email: String,
    /// Their name.
    pub name: String,
    /// `owner`, `admin` or `member`.
    pub role: String,
    /// Joined (ms).
    pub created_at: i64,
}

/// Adds a member. Already a member: a primary-key violation.
pub async fn insert_member(
    c: &mut AnyConnection,
    org_id: &str,
    user_id: &str,
    role: &str,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO memberships (org_id, user_id, role, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $4)",
    )
    .bind(org_id)
    .bind(user_id)
    .bind(role)
    .bind(now)
    .execute(c)
    .await
    .map(|_| ())
}

/// The members of an organization, owners first, then by joining time.
pub async fn members(c: &mut AnyConnection, org_id: &str) -> Result<Vec<MemberRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT m.user_id, u.email, u.name, m.role, m.created_at FROM memberships m \
         JOIN users u ON u.id = m.user_id WHERE m.org_id = $1 \
         ORDER BY CASE m.role WHEN 'owner' THEN 0 WHEN 'admin' THEN 1 ELSE 2 END, m.created_at, m.user_id",
    )
    .bind(org_id)
    .fetch_all(c)
    .await
}

/// One member, if they are one.
pub async fn member(
    c: &mut AnyConnection,
    org_id: &str,
    user_id: &str,
) -> Result<Option<MemberRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT m.user_id, u.email, u.name, m.role, m.created_at FROM memberships m \
         JOIN users u ON u.id = m.user_id WHERE m.org_id = $1 AND m.user_id = $2",
    )
    .bind(org_id)
    .bind(user_id)
    .fetch_optional(c)
    .await
}

/// One member's role, if they are one.
pub async fn member_role(
    c: &mut AnyConnection,
    org_id: &str,
    user_id: &str,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT role FROM memberships WHERE org_id = $1 AND user_id = $2")
        .bind(org_id)
        .bind(user_id)
        .fetch_optional(c)
        .await
}

/// How many owners an organization has.
pub async fn owner_count(c: &mut AnyConnection, org_id: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT COUNT(*) FROM memberships WHERE org_id = $1 AND role = 'owner'")
        .bind(org_id)
        .fetch_one(c)
        .await
}

/// Sets a member's role; whether they are a member.
pub async fn set_member_role(
    c: &mut AnyConnection,
    org_id: &str,
    user_id: &str,
    role: &str,
    now: i64,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE memberships SET role = $1, updated_at = $2 WHERE org_id = $3 AND user_id = $4",
    )
    .bind(role)
    .bind(now)
    .bind(org_id)
    .bind(user_id)
    .execute(c)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Removes a member; whether they were one.
pub async fn delete_member(
    c: &mut AnyConnection,
    org_id: &str,
    user_id: &str,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query("DELETE FROM memberships WHERE org_id = $1 AND user_id = $2")
        .bind(org_id)
        .bind(user_id)
        .execute(c)
        .await?;
    Ok(r.rows_affected() == 1)
}

/// Ends the logins that act for `org_id` — of `user_id` (leaving,
/// removal), or of everyone (dissolution): each refresh family whose
/// current token acts for the organization is revoked whole, so its
/// refresh tokens stop working at once and an old token of the family
/// stays refused too. Returns how many tokens it revoked.
pub async fn revoke_tenant_sessions(
    c: &mut AnyConnection,
    org_id: &str,
    user_id: Option<&str>,
    now: i64,
) -> Result<u64, sqlx::Error> {
    let r = match user_id {
        Some(user_id) => {
            sqlx::query(
                "UPDATE refresh_tokens SET revoked_at = $1 WHERE revoked_at IS NULL \
                 AND family_id IN (SELECT family_id FROM refresh_tokens WHERE tenant = $2 \
                 AND user_id = $3 AND rotated_at IS NULL AND revoked_at IS NULL)",
            )
            .bind(now)
            .bind(org_id)
            .bind(user_id)
            .execute(c)
            .await?
        }
        None => {
            sqlx::query(
                "UPDATE refresh_tokens SET revoked_at = $1 WHERE revoked_at IS NULL \
                 AND family_id IN (SELECT family_id FROM refresh_tokens WHERE tenant = $2 \
                 AND rotated_at IS NULL AND revoked_at IS NULL)",
            )
            .bind(now)
            .bind(org_id)
            .execute(c)
            .await?
        }
    };
    Ok(r.rows_affected())
}

/// A row of `invitations`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct InvitationRow {
    /// Id.
    pub id: String,
    /// The organization.
    pub org_id: String,
    /// Who is invited (lower-cased).
    pub email: String,
    /// The role they get: `admin` or `member`.
    pub role: String,
    /// Who invited.
    pub invited_by: String,
    /// Created (ms).
    pub created_at: i64,
    /// Expires (ms).
    pub expires_at: i64,
    /// Accepted (ms).
    pub accepted_at: Option<i64>,
    /// Declined (ms).
    pub declined_at: Option<i64>,
    /// Revoked (ms).
    pub revoked_at: Option<i64>,
}

macro_rules! invitation_columns {
    () => {
        "id, org_id, email, role, invited_by, created_at, expires_at, accepted_at, declined_at, \
         revoked_at"
    };
}

/// Stores an invitation (its token only as a hash).
pub async fn insert_invitation(
    c: &mut AnyConnection,
    i: &InvitationRow,
    token_hash: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO invitations (id, org_id, email, role, token_hash, invited_by, created_at, \
         expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(&i.id)
    .bind(&i.org_id)
    .bind(&i.email)
    .bind(&i.role)
    .bind(token_hash)
    .bind(&i.invited_by)
    .bind(i.created_at)
    .bind(i.expires_at)
    .execute(c)
    .await
    .map(|_| ())
}

/// The invitation with this token hash.
pub async fn invitation_by_hash(
    c: &mut AnyConnection,
    hash: &str,
) -> Result<Option<InvitationRow>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        invitation_columns!(),
        " FROM invitations WHERE token_hash = $1"
    ))
    .bind(hash)
    .fetch_optional(c)
    .await
}

/// The pending invitations of an organization, newest first.
pub async fn pending_invitations(
    c: &mut AnyConnection,
    org_id: &str,
    now: i64,
) -> Result<Vec<InvitationRow>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        invitation_columns!(),
        " FROM invitations WHERE org_id = $1 AND accepted_at IS NULL AND declined_at IS NULL \
         AND revoked_at IS NULL AND expires_at > $2 ORDER BY created_at DESC, id DESC"
    ))
    .bind(org_id)
    .bind(now)
    .fetch_all(c)
    .await
}

/// Which pending invitations [`revoke_invitations`] revokes.
#[derive(Debug, Clone, Copy)]
pub enum Pending<'a> {
    /// Those of one address (a new invitation replaces them).
    To(&'a str),
    /// One, by id.
    Id(&'a str),
    /// Those a member sent (they are no longer a tenant admin).
    From(&'a str),
}

/// Revokes pending invitations of `org_id`; how many.
pub async fn revoke_invitations(
    c: &mut AnyConnection,
    org_id: &str,
    which: Pending<'_>,
    now: i64,
) -> Result<u64, sqlx::Error> {
    let (sql, value) = match which {
        Pending::To(email) => (
            "UPDATE invitations SET revoked_at = $1 WHERE org_id = $2 AND accepted_at IS NULL \
             AND declined_at IS NULL AND revoked_at IS NULL AND email = $3",
            email,
        ),
        Pending::Id(id) => (
            "UPDATE invitations SET revoked_at = $1 WHERE org_id = $2 AND accepted_at IS NULL \
             AND declined_at IS NULL AND revoked_at IS NULL AND id = $3",
            id,
        ),
        Pending::From(user_id) => (
            "UPDATE invitations SET revoked_at = $1 WHERE org_id = $2 AND accepted_at IS NULL \
             AND declined_at IS NULL AND revoked_at IS NULL AND invited_by = $3",
            user_id,
        ),
    };
    let r = sqlx::query(sql)
        .bind(now)
        .bind(org_id)
        .bind(value)
        .execute(c)
        .await?;
    Ok(r.rows_affected())
}

/// Marks an invitation accepted or declined, once: false when it was
/// already used, revoked or has expired (a concurrent use).
pub async fn close_invitation(
    c: &mut AnyConnection,
    id: &str,
    accepted: bool,
    now: i64,
) -> Result<bool, sqlx::Error> {
    let sql = if accepted {
        "UPDATE invitations SET accepted_at = $1 WHERE id = $2 AND accepted_at IS NULL \
         AND declined_at IS NULL AND revoked_at IS NULL AND expires_at > $1"
    } else {
        "UPDATE invitations SET declined_at = $1 WHERE id = $2 AND accepted_at IS NULL \
         AND declined_at IS NULL AND revoked_at IS NULL AND expires_at > $1"
    };
    let r = sqlx::query(sql).bind(now).bind(id).execute(c).await?;
    Ok(r.rows_affected() == 1)
}

/// Deletes invitations that can no longer be used, a day after they
/// stopped being usable (kept that long so their link says why it fails).
pub async fn purge_invitations(c: &mut AnyConnection, now: i64) -> Result<u64, sqlx::Error> {
    let day = 86_400_000;
    let r = sqlx::query(
        "DELETE FROM invitations WHERE expires_at <= $1 \
         OR accepted_at <= $1 OR declined_at <= $1 OR revoked_at <= $1",
    )
    .bind(now - day)
    .execute(c)
    .await?;
    Ok(r.rows_affected())
}
