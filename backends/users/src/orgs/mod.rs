//! Organizations (tenants): teams that subscribe and pay as one subject.
//!
//! A verified user creates an organization and becomes its `owner`;
//! owners and `admin`s (the tenant admins) invite people by e-mail, change
//! roles and remove members; every member reads the organization. An
//! access token acts for one organization at a time (`POST
//! /api/auth/switch`): its claims then carry `tenant`, `tenant_role`,
//! `tenant_admin` among the roles for owners and admins, and the
//! organization's tier.
//!
//! Every operation finds the organization through the caller's membership
//! ([`storage::org_for_member`]): someone else's organization is a 404,
//! whatever its id.
//!
//! Layering as elsewhere: [`routes`] → this module → [`storage`].

pub mod routes;
pub mod storage;

use serde::Serialize;

use backend_common::{random_token, token_hash, ApiError, FieldError, Validator};

use crate::core::{normalize_email, TokenPair, Users};
use crate::error::Error;
use storage::{InvitationRow, MemberOrgRow, MemberRow, OrgRow};

/// The roles of a member, most powerful first.
pub const MEMBER_ROLES: [&str; 3] = ["owner", "admin", "member"];
/// The role the users service adds to a token acting for an organization
/// its holder administers (owner or admin).
pub const TENANT_ADMIN: &str = "tenant_admin";

/// The page an invitation link opens.
const INVITATION_PAGE: &str = "accept-invitation";

/// Company details for tax invoices.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct Company {
    /// Legal name (as registered with DJP).
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

/// An organization as a member sees it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Org {
    /// Id.
    pub id: String,
    /// Unique handle.
    pub slug: String,
    /// Display name.
    pub name: String,
    /// Company details for tax invoices.
    pub company: Company,
    /// The organization's tier (of its subscription).
    pub tier: String,
    /// The caller's role in it.
    pub role: String,
    /// Created, Unix ms.
    pub created_at: i64,
}

impl From<MemberOrgRow> for Org {
    fn from(m: MemberOrgRow) -> Self {
        let o = m.org;
        Self {
            id: o.id,
            slug: o.slug,
            name: o.name,
            company: Company {
                legal_name: o.legal_name,
                npwp: o.npwp,
                nitku: o.nitku,
                address: o.address,
            },
            tier: o.tier,
            role: m.role,
            created_at: o.created_at,
        }
    }
}

/// A member as the other members see them.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Member {
    /// The user.
    pub user_id: String,
    /// Their e-mail.
    pub email: String,
    /// Their name.
    pub name: String,
    /// `owner`, `admin` or `member`.
    pub role: String,
    /// Joined, Unix ms.
    pub joined_at: i64,
}

impl From<MemberRow> for Member {
    fn from(m: MemberRow) -> Self {
        Self {
            user_id: m.user_id,
            email: m.email,
            name: m.name,
            role: m.role,
            joined_at: m.created_at,
        }
    }
}

/// A pending invitation as the tenant admins see it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Invitation {
    /// Id.
    pub id: String,
    /// Who is invited.
    pub email: String,
    /// The role they get.
    pub role: String,
    /// Who invited (user id).
    pub invited_by: String,
    /// Created, Unix ms.
    pub created_at: i64,
    /// Expires, Unix ms.
    pub expires_at: i64,
}

impl From<InvitationRow> for Invitation {
    fn from(i: InvitationRow) -> Self {
        Self {
            id: i.id,
            email: i.email,
            role: i.role,
            invited_by: i.invited_by,
            created_at: i.created_at,
            expires_at: i.expires_at,
        }
    }
}

/// What an invitation link shows before it is accepted.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct InvitationPreview {
    /// The organization's name.
    pub organization: String,
    /// The address invited (the account that accepts must have it).
    pub email: String,
    /// The role offered.
    pub role: String,
    /// Who invited (their name).
    pub invited_by: String,
    /// Expires, Unix ms.
    pub expires_at: i64,
}

/// An organization as other services read it (`GET
/// /internal/organizations/{id}`): what an invoice prints and who to tell.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct InternalOrg {
    /// Id.
    pub id: String,
    /// Unique handle.
    pub slug: String,
    /// Display name.
    pub name: String,
    /// Company details for tax invoices.
    pub company: Company,
    /// Current tier.
    pub tier: String,
    /// Owners and admins (who buys, who is told).
    pub admins: Vec<Member>,
}

/// The company fields of a create or change request: `Some("")` clears.
#[derive(Debug, Default, Clone, Copy)]
pub struct CompanyInput<'a> {
    /// Legal name.
    pub legal_name: Option<&'a str>,
    /// NPWP (15 or 16 digits; dots, dashes and spaces ignored).
    pub npwp: Option<&'a str>,
    /// NITKU (22 digits).
    pub nitku: Option<&'a str>,
    /// Address.
    pub address: Option<&'a str>,
}

/// A new organization, or a change to one.
#[derive(Debug, Default, Clone, Copy)]
pub struct OrgInput<'a> {
    /// Display name (required to create).
    pub name: Option<&'a str>,
    /// Handle; derived from the name when absent (create only).
    pub slug: Option<&'a str>,
    /// Company details.
    pub company: CompanyInput<'a>,
}

/// `organizations.slug` is unique.
const SLUG_UNIQUE: backend_common::db::Constraint = backend_common::db::Constraint {
    name: "organizations_slug_key",
    sqlite: "organizations.slug",
};

/// An NPWP as 16 digits: a 15-digit one (the format before 2024) gets its
/// leading 0 (PMK 112/2022). Dots, dashes and spaces are ignored.
pub fn normalize_npwp(raw: &str) -> Result<String, &'static str> {
    let digits: String = raw
        .chars()
        .filter(|c| !matches!(c, '.' | '-' | ' '))
        .collect();
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err("must be digits (dots, dashes and spaces are ignored)");
    }
    match digits.len() {
        15 => Ok(format!("0{digits}")),
        16 => Ok(digits),
        _ => Err("must have 15 or 16 digits"),
    }
}

/// A NITKU: 22 digits, the NPWP's 16 and a 6-digit place of business.
pub fn normalize_nitku(raw: &str, npwp: Option<&str>) -> Result<String, &'static str> {
    let digits: String = raw
        .chars()
        .filter(|c| !matches!(c, '.' | '-' | ' '))
        .collect();
    if digits.len() != 22 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err("must have 22 digits (the NPWP and a 6-digit place of business)");
    }
    if npwp.is_some_and(|n| !digits.starts_with(n)) {
        return Err("must start with the organization's NPWP");
    }
    Ok(digits)
}

/// A slug: 3 to 40 of `a-z 0-9 -`, not starting or ending with `-`.
fn check_slug(slug: &str) -> Result<(), &'static str> {
    let ok = (3..=40).contains(&slug.len())
        && slug
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !slug.starts_with('-')
        && !slug.ends_with('-')
        && !slug.contains("--");
    if ok {
        Ok(())
    } else {
        Err("3 to 40 lower-case letters, digits and single dashes, not at either end")
    }
}

/// A slug made from a name: `PT Maju Jaya!` → `pt-maju-jaya`.
pub fn slug_of(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
        if out.len() >= 36 {
            break;
        }
    }
    let out = out.trim_end_matches('-').to_owned();
    if out.len() < 3 {
        format!("org-{out}").trim_end_matches('-').to_owned()
    } else {
        out
    }
}

/// Checks one optional text field; `Some("")` means clear.
fn text(v: &mut Validator, field: &str, raw: Option<&str>, max: usize) -> Option<Option<String>> {
    let raw = raw?;
    let t = raw.trim();
    if t.chars().count() > max {
        v.fail(field, format!("must be at most {max} characters"));
    }
    if t.chars().any(char::is_control) {
        v.fail(field, "must not contain control characters");
    }
    Some((!t.is_empty()).then(|| t.to_owned()))
}

fn not_found() -> Error {
    Error::OrgNotFound
}

fn is_admin(role: &str) -> bool {
    role == "owner" || role == "admin"
}

impl Users {
    /// The caller's membership of `org_id` (404 when none).
    async fn membership(&self, caller: &str, org_id: &str) -> Result<MemberOrgRow, Error> {
        storage::org_for_member(&mut *self.conn().await?, org_id, caller)
            .await?
            .ok_or_else(not_found)
    }

    /// [`Users::membership`] of a tenant admin (403 for a plain member).
    async fn admin_membership(&self, caller: &str, org_id: &str) -> Result<MemberOrgRow, Error> {
        let m = self.membership(caller, org_id).await?;
        if is_admin(&m.role) {
            Ok(m)
        } else {
            Err(Error::NotTenantAdmin)
        }
    }

    /// Locks `org_id` for the rest of `tx` ([`storage::lock_org`]) and
    /// reads the caller's membership under the lock: what a change decides
    /// on is what it commits against.
    async fn locked_membership(
        tx: &mut sqlx::AnyConnection,
        caller: &str,
        org_id: &str,
        admin: bool,
    ) -> Result<MemberOrgRow, Error> {
        if !storage::lock_org(tx, org_id).await? {
            return Err(not_found());
        }
        let m = storage::org_for_member(tx, org_id, caller)
            .await?
            .ok_or_else(not_found)?;
        if admin && !is_admin(&m.role) {
            return Err(Error::NotTenantAdmin);
        }
        Ok(m)
    }

    /// Applies `input` (validated) to `org`.
    fn apply_org_input(org: &mut OrgRow, input: &OrgInput<'_>) -> Result<(), Error> {
        let mut v = Validator::new();
        if let Some(name) = input.name {
            let n = name.trim();
            if n.is_empty() || n.chars().count() > 100 {
                v.fail("name", "must be 1 to 100 characters");
            } else {
                org.name = n.to_owned();
            }
        }
        let c = &input.company;
        if let Some(legal) = text(&mut v, "company.legal_name", c.legal_name, 200) {
            org.legal_name = legal;
        }
        if let Some(address) = text(&mut v, "company.address", c.address, 500) {
            org.address = address;
        }
        match c.npwp.map(str::trim) {
            Some("") => org.npwp = None,
            Some(raw) => match normalize_npwp(raw) {
                Ok(n) => org.npwp = Some(n),
                Err(msg) => {
                    v.fail("company.npwp", msg);
                }
            },
            None => {}
        }
        match c.nitku.map(str::trim) {
            Some("") => org.nitku = None,
            Some(raw) => match normalize_nitku(raw, org.npwp.as_deref()) {
                Ok(n) => org.nitku = Some(n),
                Err(msg) => {
                    v.fail("company.nitku", msg);
                }
            },
            None => {}
        }
        if let Some(nitku) = &org.nitku {
            if org.npwp.as_deref().is_some_and(|n| !nitku.starts_with(n)) {
                v.fail("company.nitku", "must start with the organization's NPWP");
            }
        }
        v.finish().map_err(Error::Invalid)
    }

    /// Creates an organization; the caller is its owner.
    pub async fn create_org(&self, caller: &str, input: OrgInput<'_>) -> Result<Org, Error> {
        let now = self.clock.now_ms();
        let mut org = OrgRow {
            id: uuid::Uuid::now_v7().to_string(),
            slug: String::new(),
            name: String::new(),
            legal_name: None,
            npwp: None,
            nitku: None,
            address: None,
            tier: "FREE".to_owned(),
            tier_changed_at: 0,
            created_by: caller.to_owned(),
            created_at: now,
            updated_at: now,
        };
        let mut v = Validator::new();
        if input.name.is_none() {
            v.fail("name", "is required");
        }
        if let Some(slug) = input.slug {
            if let Err(msg) = check_slug(slug) {
                v.fail("slug", msg);
            }
        }
        v.finish().map_err(Error::Invalid)?;
        Self::apply_org_input(&mut org, &input)?;
        let explicit = input.slug.map(str::to_owned);
        let base = explicit.clone().unwrap_or_else(|| slug_of(&org.name));
        // A derived slug that is taken gets a short suffix; an explicit
        // one is the caller's choice: 409.
        for attempt in 0..4 {
            org.slug = if attempt == 0 {
                base.clone()
            } else {
                let suffix = random_token(3)
                    .map_err(|e| Error::Internal(e.to_string()))?
                    .to_ascii_lowercase()
                    .replace(['-', '_'], "x");
                // 35 + "-" + 4 stays within the 40 of a slug.
                let cut = base.get(..35).unwrap_or(&base).trim_end_matches('-');
                format!("{cut}-{suffix}")
            };
            let mut tx = self.db.begin_write().await?;
            if let Err(e) = storage::insert_org(&mut tx, &org).await {
                if backend_common::db::on_constraint(&e, &SLUG_UNIQUE) {
                    if explicit.is_some() {
                        return Err(Error::SlugTaken);
                    }
                    continue;
                }
                return Err(e.into());
            }
            storage::insert_member(&mut tx, &org.id, caller, "owner", now).await?;
            self.outbox
                .enqueue(
                    &mut tx,
                    "organization.created",
                    &serde_json::json!({
                        "user_id": caller, "org_id": org.id, "name": org.name,
                        "subject": {"kind": "organization", "id": org.id},
                    }),
                    now,
                )
                .await?;
            tx.commit().await?;
            self.outbox.notify();
            return Ok(Org::from(MemberOrgRow {
                org,
                role: "owner".to_owned(),
            }));
        }
        Err(Error::SlugTaken)
    }

    /// The organizations the caller belongs to.
    pub async fn my_orgs(&self, caller: &str) -> Result<Vec<Org>, Error> {
        Ok(storage::orgs_of_member(&mut *self.conn().await?, caller)
            .await?
            .into_iter()
            .map(Org::from)
            .collect())
    }

    /// One organization of the caller's.
    pub async fn org(&self, caller: &str, org_id: &str) -> Result<Org, Error> {
        self.membership(caller, org_id).await.map(Org::from)
    }

    /// Changes the name or company details (tenant admins).
    pub async fn update_org(
        &self,
        caller: &str,
        org_id: &str,
        input: OrgInput<'_>,
    ) -> Result<Org, Error> {
        if input.slug.is_some() {
            return Err(Error::Invalid(ApiError::validation(vec![FieldError::new(
                "slug",
                "cannot be changed",
            )])));
        }
        let mut tx = self.db.begin_write().await?;
        let mut m = Self::locked_membership(&mut tx, caller, org_id, true).await?;
        Self::apply_org_input(&mut m.org, &input)?;
        let now = self.clock.now_ms();
        storage::update_org(&mut tx, &m.org, now).await?;
        tx.commit().await?;
        m.org.updated_at = now;
        Ok(Org::from(m))
    }

    /// Dissolves an organization (owners; only without a paid tier: its
    /// subscription is canceled first). Every member's logins acting for
    /// it end.
    pub async fn dissolve_org(&self, caller: &str, org_id: &str) -> Result<(), Error> {
        let mut tx = self.db.begin_write().await?;
        let m = Self::locked_membership(&mut tx, caller, org_id, false).await?;
        if m.role != "owner" {
            return Err(Error::NotOwner);
        }
        let now = self.clock.now_ms();
        // Under the lock the tier read is current; the statement checks it
        // again, so a paid organization is never dissolved.
        if m.org.tier != "FREE" || !storage::dissolve_org(&mut tx, org_id, now).await? {
            return Err(Error::SubscriptionActive);
        }
        storage::revoke_tenant_sessions(&mut tx, org_id, None, now).await?;
        self.outbox
            .enqueue(
                &mut tx,
                "organization.dissolved",
                &serde_json::json!({
                    "user_id": caller, "org_id": org_id,
                    "subject": {"kind": "organization", "id": org_id},
                }),
                now,
            )
            .await?;
        tx.commit().await?;
        self.outbox.notify();
        Ok(())
    }

    /// The members of one of the caller's organizations.
    pub async fn members(&self, caller: &str, org_id: &str) -> Result<Vec<Member>, Error> {
        self.membership(caller, org_id).await?;
        Ok(storage::members(&mut *self.conn().await?, org_id)
            .await?
            .into_iter()
            .map(Member::from)
            .collect())
    }

    async fn member(&self, org_id: &str, user_id: &str) -> Result<Member, Error> {
        storage::member(&mut *self.conn().await?, org_id, user_id)
            .await?
            .map(Member::from)
            .ok_or(Error::MemberNotFound)
    }

    /// Changes a member's role. Tenant admins set `admin` or `member` on
    /// non-owners; only an owner makes or unmakes an owner, and the last
    /// owner keeps the role. A member who stops being a tenant admin has
    /// their pending invitations revoked; their next token (refresh)
    /// carries the new role.
    pub async fn set_member_role(
        &self,
        caller: &str,
        org_id: &str,
        user_id: &str,
        role: &str,
    ) -> Result<Member, Error> {
        if !MEMBER_ROLES.contains(&role) {
            return Err(Error::Invalid(ApiError::validation(vec![FieldError::new(
                "role",
                "must be one of owner, admin, member",
            )])));
        }
        let now = self.clock.now_ms();
        let mut tx = self.db.begin_write().await?;
        let me = Self::locked_membership(&mut tx, caller, org_id, true).await?;
        let current = storage::member_role(&mut tx, org_id, user_id)
            .await?
            .ok_or(Error::MemberNotFound)?;
        if (current == "owner" || role == "owner") && me.role != "owner" {
            return Err(Error::NotOwner);
        }
        if current == "owner" && role != "owner" && storage::owner_count(&mut tx, org_id).await? < 2
        {
            return Err(Error::LastOwner);
        }
        storage::set_member_role(&mut tx, org_id, user_id, role, now).await?;
        if is_admin(&current) && !is_admin(role) {
            storage::revoke_invitations(&mut tx, org_id, storage::Pending::From(user_id), now)
                .await?;
        }
        tx.commit().await?;
        self.member(org_id, user_id).await
    }

    /// Removes a member (tenant admins; an owner only by an owner, and
    /// never the last). Their logins acting for the organization end.
    pub async fn remove_member(
        &self,
        caller: &str,
        org_id: &str,
        user_id: &str,
    ) -> Result<(), Error> {
        let now = self.clock.now_ms();
        let mut tx = self.db.begin_write().await?;
        let me = Self::locked_membership(&mut tx, caller, org_id, caller != user_id).await?;
        let role = storage::member_role(&mut tx, org_id, user_id)
            .await?
            .ok_or(Error::MemberNotFound)?;
        if role == "owner" {
            if me.role != "owner" {
                return Err(Error::NotOwner);
            }
            if storage::owner_count(&mut tx, org_id).await? < 2 {
                return Err(Error::LastOwner);
            }
        }
        storage::delete_member(&mut tx, org_id, user_id).await?;
        storage::revoke_tenant_sessions(&mut tx, org_id, Some(user_id), now).await?;
        storage::revoke_invitations(&mut tx, org_id, storage::Pending::From(user_id), now).await?;
        self.outbox
            .enqueue(
                &mut tx,
                "organization.member_removed",
                &serde_json::json!({
                    "user_id": caller, "org_id": org_id, "member_id": user_id,
                    "left": caller == user_id,
                    "subject": {"kind": "organization", "id": org_id},
                }),
                now,
            )
            .await?;
        tx.commit().await?;
        self.outbox.notify();
        Ok(())
    }

    /// Makes `to` (a member) an owner and the caller (an owner) an admin.
    pub async fn transfer_ownership(
        &self,
        caller: &str,
        org_id: &str,
        to: &str,
    ) -> Result<Vec<Member>, Error> {
        let now = self.clock.now_ms();
        let mut tx = self.db.begin_write().await?;
        let me = Self::locked_membership(&mut tx, caller, org_id, false).await?;
        if me.role != "owner" {
            return Err(Error::NotOwner);
        }
        if to == caller {
            return Err(Error::Invalid(ApiError::validation(vec![FieldError::new(
                "user_id",
                "is you: give another member",
            )])));
        }
        if !storage::set_member_role(&mut tx, org_id, to, "owner", now).await? {
            return Err(Error::MemberNotFound);
        }
        storage::set_member_role(&mut tx, org_id, caller, "admin", now).await?;
        tx.commit().await?;
        self.members(caller, org_id).await
    }

    /// Invites `email` as `role` (tenant admins): a single-use link, valid
    /// `invitation_ttl`, in an `organization.invitation_created` event. A
    /// pending invitation of the same address is replaced.
    pub async fn invite(
        &self,
        caller: &str,
        org_id: &str,
        email: &str,
        role: &str,
    ) -> Result<Invitation, Error> {
        let mut v = Validator::new();
        let email = match normalize_email(email) {
            Ok(e) => Some(e),
            Err(msg) => {
                v.fail("email", msg);
                None
            }
        };
        if role != "admin" && role != "member" {
            v.fail(
                "role",
                "must be admin or member (make an owner by changing a role)",
            );
        }
        v.finish().map_err(Error::Invalid)?;
        let email = email.unwrap_or_default();
        let now = self.clock.now_ms();
        let mut tx = self.db.begin_write().await?;
        let me = Self::locked_membership(&mut tx, caller, org_id, true).await?;
        if let Some(user) = crate::storage::user_by_email(&mut tx, &email).await? {
            if storage::member_role(&mut tx, org_id, &user.id)
                .await?
                .is_some()
            {
                return Err(Error::AlreadyMember);
            }
        }
        storage::revoke_invitations(&mut tx, org_id, storage::Pending::To(&email), now).await?;
        let token = random_token(32).map_err(|e| Error::Internal(e.to_string()))?;
        let ttl = i64::try_from(self.config.invitation_ttl.as_millis()).unwrap_or(i64::MAX);
        let row = InvitationRow {
            id: uuid::Uuid::now_v7().to_string(),
            org_id: org_id.to_owned(),
            email: email.clone(),
            role: role.to_owned(),
            invited_by: caller.to_owned(),
            created_at: now,
            expires_at: now.saturating_add(ttl),
            accepted_at: None,
            declined_at: None,
            revoked_at: None,
        };
        storage::insert_invitation(&mut tx, &row, &token_hash(&token)).await?;
        let inviter = crate::storage::user_by_id(&mut tx, caller)
            .await?
            .map(|u| u.name)
            .unwrap_or_default();
        let link = self.link(INVITATION_PAGE, &token);
        self.outbox
            .enqueue(
                &mut tx,
                "organization.invitation_created",
                &serde_json::json!({
                    "user_id": caller, "org_id": org_id, "organization": me.org.name,
                    "email": email, "role": role, "invited_by": inviter,
                    "accept_url": link, "expires_at": row.expires_at,
                    "subject": {"kind": "organization", "id": org_id},
                }),
                now,
            )
            .await?;
        tx.commit().await?;
        self.outbox.notify();
        Ok(Invitation::from(row))
    }

    /// The pending invitations of an organization (tenant admins).
    pub async fn invitations(&self, caller: &str, org_id: &str) -> Result<Vec<Invitation>, Error> {
        self.admin_membership(caller, org_id).await?;
        Ok(
            storage::pending_invitations(&mut *self.conn().await?, org_id, self.clock.now_ms())
                .await?
                .into_iter()
                .map(Invitation::from)
                .collect(),
        )
    }

    /// Revokes a pending invitation (tenant admins).
    pub async fn revoke_invitation(
        &self,
        caller: &str,
        org_id: &str,
        id: &str,
    ) -> Result<(), Error> {
        let mut tx = self.db.begin_write().await?;
        Self::locked_membership(&mut tx, caller, org_id, true).await?;
        let n = storage::revoke_invitations(
            &mut tx,
            org_id,
            storage::Pending::Id(id),
            self.clock.now_ms(),
        )
        .await?;
        if n == 0 {
            return Err(Error::InvitationNotFound);
        }
        tx.commit().await?;
        Ok(())
    }

    /// The usable invitation behind `token`, with its organization.
    async fn usable_invitation(&self, token: &str) -> Result<(InvitationRow, OrgRow), Error> {
        let mut conn = self.conn().await?;
        let inv = storage::invitation_by_hash(&mut conn, &token_hash(token))
            .await?
            .ok_or(Error::InvalidInvitation)?;
        let usable = inv.accepted_at.is_none()
            && inv.declined_at.is_none()
            && inv.revoked_at.is_none()
            && inv.expires_at > self.clock.now_ms();
        if !usable {
            return Err(Error::InvalidInvitation);
        }
        let org = storage::org_by_id(&mut conn, &inv.org_id)
            .await?
            .ok_or(Error::InvalidInvitation)?;
        Ok((inv, org))
    }

    /// What an invitation link offers (no account needed: the token is
    /// the secret).
    pub async fn preview_invitation(&self, token: &str) -> Result<InvitationPreview, Error> {
        let (inv, org) = self.usable_invitation(token).await?;
        let inviter = crate::storage::user_by_id(&mut *self.conn().await?, &inv.invited_by)
            .await?
            .map(|u| u.name)
            .unwrap_or_default();
        Ok(InvitationPreview {
            organization: org.name,
            email: inv.email,
            role: inv.role,
            invited_by: inviter,
            expires_at: inv.expires_at,
        })
    }

    /// Accepts an invitation as the caller, whose (verified) address must
    /// be the one invited, while whoever sent it is still a tenant admin.
    /// A link works once: a second use is refused (`invalid_invitation`).
    pub async fn accept_invitation(&self, caller: &str, token: &str) -> Result<Org, Error> {
        let (inv, org) = self.usable_invitation(token).await?;
        let me = crate::storage::user_by_id(&mut *self.conn().await?, caller)
            .await?
            .ok_or(Error::UserNotFound)?;
        if me.email != inv.email {
            return Err(Error::InvitationForAnotherAddress);
        }
        let now = self.clock.now_ms();
        let mut tx = self.db.begin_write().await?;
        if !storage::lock_org(&mut tx, &org.id).await? {
            return Err(Error::InvalidInvitation);
        }
        let inviter = storage::member_role(&mut tx, &org.id, &inv.invited_by).await?;
        if !inviter.as_deref().is_some_and(is_admin) {
            return Err(Error::InvalidInvitation);
        }
        if !storage::close_invitation(&mut tx, &inv.id, true, now).await? {
            return Err(Error::InvalidInvitation);
        }
        if storage::member_role(&mut tx, &org.id, caller)
            .await?
            .is_none()
        {
            storage::insert_member(&mut tx, &org.id, caller, &inv.role, now).await?;
            self.outbox
                .enqueue(
                    &mut tx,
                    "organization.member_added",
                    &serde_json::json!({
                        "user_id": caller, "org_id": org.id, "role": inv.role,
                        "invited_by": inv.invited_by,
                        "subject": {"kind": "organization", "id": org.id},
                    }),
                    now,
                )
                .await?;
        }
        tx.commit().await?;
        self.outbox.notify();
        self.org(caller, &org.id).await
    }

    /// Declines an invitation (the token suffices).
    pub async fn decline_invitation(&self, token: &str) -> Result<(), Error> {
        let (inv, _) = self.usable_invitation(token).await?;
        if !storage::close_invitation(
            &mut *self.conn().await?,
            &inv.id,
            false,
            self.clock.now_ms(),
        )
        .await?
        {
            return Err(Error::InvalidInvitation);
        }
        Ok(())
    }

    /// An organization for another service: company details and admins.
    pub async fn internal_org(&self, org_id: &str) -> Result<InternalOrg, Error> {
        let mut conn = self.conn().await?;
        let org = storage::org_by_id(&mut conn, org_id)
            .await?
            .ok_or(Error::OrgNotFound)?;
        let admins = storage::members(&mut conn, org_id)
            .await?
            .into_iter()
            .filter(|m| is_admin(&m.role))
            .map(Member::from)
            .collect();
        Ok(InternalOrg {
            id: org.id,
            slug: org.slug,
            name: org.name,
            company: Company {
                legal_name: org.legal_name,
                npwp: org.npwp,
                nitku: org.nitku,
                address: org.address,
            },
            tier: org.tier,
            admins,
        })
    }

    /// Switches the login of `refresh_token` to act for `tenant` (an
    /// organization of the user's) or, with `None`, for the user alone: the
    /// token is rotated like a refresh and the new pair carries the
    /// organization's claims and tier.
    pub async fn switch(
        &self,
        refresh_token: &str,
        tenant: Option<&str>,
    ) -> Result<TokenPair, Error> {
        self.rotate(refresh_token, Some(tenant)).await
    }

    /// The caller's membership of `tenant`, for a token acting for it:
    /// `None` when the login is personal; an error when they are no longer
    /// a member.
    pub(crate) async fn tenant_of(
        &self,
        conn: &mut sqlx::AnyConnection,
        user_id: &str,
        tenant: Option<&str>,
    ) -> Result<Option<MemberOrgRow>, Error> {
        match tenant {
            None => Ok(None),
            Some(org_id) => storage::org_for_member(conn, org_id, user_id)
                .await?
                .map(Some)
                .ok_or(Error::OrgNotFound),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_npwp_and_nitku_are_normalised_and_checked() {
        let cases: [(&str, Result<&str, ()>); 6] = [
            ("01.234.567.8-901.000", Ok("0012345678901000")),
            ("0012345678901000", Ok("0012345678901000")),
            ("3171 0123 4567 8901", Ok("3171012345678901")),
            ("1234", Err(())),
            ("01.234.567.8-901.00A", Err(())),
            ("12345678901234567", Err(())),
        ];
        for (raw, want) in cases {
            assert_eq!(
                normalize_npwp(raw).map_err(|_| ()),
                want.map(str::to_owned),
                "{raw}"
            );
        }
        assert_eq!(
            normalize_nitku("0012345678901000-000000", Some("0012345678901000")).unwrap(),
            "0012345678901000000000"
        );
        assert!(normalize_nitku("0012345678901000000000", Some("3171012345678901")).is_err());
        assert!(normalize_nitku("001234567890100000000", None).is_err());
    }

    #[test]
    fn test_slugs() {
        for (name, slug) in [
            ("PT Maju Jaya!", "pt-maju-jaya"),
            ("  Toko  Sinar -- Abadi ", "toko-sinar-abadi"),
            ("Ä", "org"),
            ("ab", "org-ab"),
            (
                "Kopi Kenangan Nusantara Sejahtera Bersama Tbk",
                "kopi-kenangan-nusantara-sejahtera-be",
            ),
        ] {
            assert_eq!(slug_of(name), slug, "{name}");
            assert!(check_slug(&slug_of(name)).is_ok(), "{name}");
        }
        for bad in ["ab", "-abc", "abc-", "a--b", "ABC", "a_b", &"x".repeat(41)] {
            assert!(check_slug(bad).is_err(), "{bad}");
        }
    }
}
