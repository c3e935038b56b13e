//! The users service's logic: no Actix types, SQL only through `storage`.

use std::sync::Arc;

use serde::Serialize;

use backend_common::clock::Clock;
use backend_common::config::Environment;
use backend_common::consumer::{Applied, Handler};
use backend_common::db::{on_constraint, Constraint, Db};
use backend_common::outbox::{Event, Outbox};
use backend_common::{random_token, token_hash, ApiError, FieldError, Validator};

use crate::config::UsersConfig;
use crate::error::Error;
use crate::keys::Signer;
use crate::orgs::storage::MemberOrgRow;
use crate::password::{policy_violation, Hasher};
use crate::storage::{self, UserRow};

/// The tiers a subscription can set.
pub const TIERS: [&str; 4] = ["FREE", "BASIC", "PREMIUM", "ENTERPRISE"];
/// The roles a user can have.
pub const ROLES: [&str; 2] = ["user", "admin"];
/// A kind of single-use link sent by e-mail.
struct LinkKind {
    /// `one_time_tokens.purpose`.
    purpose: &'static str,
    /// The page the link opens.
    page: &'static str,
    /// The event that carries it.
    event: &'static str,
    /// The event field holding the URL.
    url_field: &'static str,
    /// Its lifetime.
    ttl: fn(&UsersConfig) -> std::time::Duration,
}

const VERIFY_EMAIL: LinkKind = LinkKind {
    purpose: "verify_email",
    page: "verify-email",
    event: "user.registered",
    url_field: "verification_url",
    ttl: |c| c.verification_ttl,
};

const CHANGE_EMAIL: LinkKind = LinkKind {
    purpose: "verify_email",
    page: "verify-email",
    event: "user.email_change_requested",
    url_field: "verification_url",
    ttl: |c| c.verification_ttl,
};

const RESET_PASSWORD: LinkKind = LinkKind {
    purpose: "reset_password",
    page: "reset-password",
    event: "user.password_reset_requested",
    url_field: "reset_url",
    ttl: |c| c.reset_ttl,
};

/// A verification link is sent again at most this often per account
/// (the endpoint is anonymous: no mail bombing through it).
const RESEND_INTERVAL_MS: i64 = 60_000;

/// One account per e-mail address (`users.email UNIQUE`).
const EMAIL_UNIQUE: Constraint = Constraint {
    name: "users_email_key",
    sqlite: "users.email",
};

/// Everything the handlers need. Shared by all workers.
pub struct Users {
    /// Database.
    pub db: Db,
    /// Access-token keys.
    pub signer: Arc<Signer>,
    /// Password hashing.
    pub hasher: Hasher,
    /// Outbox for `user.*` events.
    pub outbox: Outbox,
    /// Settings.
    pub config: UsersConfig,
    /// Base of links in e-mails.
    pub public_url: String,
    /// Development mode logs verification and reset links.
    pub environment: Environment,
    /// The clock.
    pub clock: Clock,
}

/// A user as the API shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct User {
    /// Id.
    pub id: String,
    /// E-mail (lower-cased).
    pub email: String,
    /// Display name.
    pub name: String,
    /// Whether the e-mail is verified.
    pub email_verified: bool,
    /// Current tier.
    pub tier: String,
    /// Roles.
    pub roles: Vec<String>,
    /// Created, Unix ms.
    pub created_at: i64,
}

impl From<UserRow> for User {
    fn from(u: UserRow) -> Self {
        let roles = u.role_list();
        Self {
            id: u.id,
            email: u.email,
            name: u.name,
            email_verified: u.email_verified_at.is_some(),
            tier: u.tier,
            roles,
            created_at: u.created_at,
        }
    }
}

/// The result of a login or refresh.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TokenPair {
    /// EdDSA JWT for `Authorization: Bearer`.
    pub access_token: String,
    /// Opaque, single-use; exchange at `/api/auth/refresh`.
    pub refresh_token: String,
    /// Always `Bearer`.
    pub token_type: &'static str,
    /// Access-token lifetime in seconds.
    pub expires_in: u64,
}

/// What `PATCH /api/users/me` asks to change.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProfileChange<'a> {
    /// New display name.
    pub name: Option<&'a str>,
    /// New e-mail address (takes effect once verified).
    pub email: Option<&'a str>,
    /// New password.
    pub password: Option<&'a str>,
    /// The current password (required with `email` or `password`).
    pub current_password: Option<&'a str>,
}

/// A page of users.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UserPage {
    /// The users, oldest first.
    pub items: Vec<User>,
    /// Pass as `after` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_after: Option<String>,
}

fn invalid(e: ApiError) -> Error {
    Error::Invalid(e)
}

pub(crate) fn field_error(field: &str, message: &str) -> Error {
    Error::Invalid(ApiError::validation(vec![FieldError::new(field, message)]))
}

/// Lower-cases and trims; checks the shape (no deliverability check).
pub fn normalize_email(raw: &str) -> Result<String, &'static str> {
    let email = raw.trim().to_ascii_lowercase();
    if email.len() > 254 {
        return Err("must be at most 254 characters");
    }
    let Some((local, domain)) = email.split_once('@') else {
        return Err("must be an email address");
    };
    let ok = !local.is_empty()
        && local.len() <= 64
        && !domain.contains('@')
        && domain.contains('.')
        && domain.split('.').all(|l| !l.is_empty())
        && !email.chars().any(|c| c.is_whitespace() || c.is_control());
    if ok {
        Ok(email)
    } else {
        Err("must be an email address")
    }
}

fn check_name(v: &mut Validator, name: &str) -> String {
    let name = name.trim();
    v.check(!name.is_empty(), "name", "must not be empty")
        .check(
            name.chars().count() <= 100,
            "name",
            "must be at most 100 characters",
        )
        .check(
            !name.chars().any(char::is_control),
            "name",
            "must not contain control characters",
        );
    name.to_owned()
}

impl Users {
    pub(crate) async fn conn(&self) -> Result<sqlx::pool::PoolConnection<sqlx::Any>, Error> {
        Ok(self.db.pool().acquire().await?)
    }

    pub(crate) fn link(&self, page: &str, token: &str) -> String {
        format!("{}/{page}?token={token}", self.public_url)
    }

    /// Registers an account (unverified) and emits `user.registered` with
    /// the verification link.
    pub async fn register(&self, email: &str, password: &str, name: &str) -> Result<User, Error> {
        let mut v = Validator::new();
        let email = match normalize_email(email) {
            Ok(e) => e,
            Err(msg) => {
                v.fail("email", msg);
                String::new()
            }
        };
        if let Some(msg) = policy_violation(password, &email) {
            v.fail("password", msg);
        }
        let name = check_name(&mut v, name);
        v.finish().map_err(invalid)?;
        let hash = self
            .hasher
            .hash(password.to_owned())
            .await?
            .map_err(Error::Internal)?;
        let now = self.clock.now_ms();
        let admin = self
            .config
            .admin_emails
            .iter()
            .any(|a| a.eq_ignore_ascii_case(&email));
        let user = UserRow {
            id: uuid::Uuid::now_v7().to_string(),
            email: email.clone(),
            name,
            password_hash: hash,
            email_verified_at: None,
            roles: if admin { "user,admin" } else { "user" }.to_owned(),
            tier: "FREE".to_owned(),
            tier_changed_at: 0,
            created_at: now,
            updated_at: now,
        };
        let mut tx = self.db.begin_write().await?;
        if let Err(e) = storage::insert_user(&mut tx, &user).await {
            return Err(if on_constraint(&e, &EMAIL_UNIQUE) {
                Error::EmailTaken
            } else {
                e.into()
            });
        }
        self.send_link(tx, &user, &VERIFY_EMAIL, None).await?;
        Ok(user.into())
    }

    /// Sends the verification link again to an unverified account, at most
    /// once a minute. The caller answers 202 whatever happens here, so the
    /// endpoint reveals nothing about accounts.
    pub async fn resend_verification(&self, email: &str) -> Result<(), Error> {
        let Ok(email) = normalize_email(email) else {
            return Ok(());
        };
        let mut conn = self.conn().await?;
        let Some(user) = storage::user_by_email(&mut conn, &email).await? else {
            return Ok(());
        };
        if user.email_verified_at.is_some() {
            return Ok(());
        }
        let last = storage::last_one_time(&mut conn, &user.id, VERIFY_EMAIL.purpose).await?;
        drop(conn);
        if last.is_some_and(|t| self.clock.now_ms() - t < RESEND_INTERVAL_MS) {
            tracing::info!(user_id = %user.id, "verification link not resent: one was sent less than a minute ago");
            return Ok(());
        }
        let tx = self.db.begin_write().await?;
        self.send_link(tx, &user, &VERIFY_EMAIL, None).await
    }

    /// Stores a single-use token for `user` and emits the event carrying
    /// its link, in `tx`, then commits (notifications mails it).
    /// `new_email`: the link confirms
    /// a change to this address and goes there.
    async fn send_link(
        &self,
        mut tx: sqlx::Transaction<'static, sqlx::Any>,
        user: &UserRow,
        kind: &LinkKind,
        new_email: Option<&str>,
    ) -> Result<(), Error> {
        let now = self.clock.now_ms();
        let token = random_token(32).map_err(|e| Error::Internal(e.to_string()))?;
        let ttl = (kind.ttl)(&self.config);
        let expires_at = now + i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let hash = token_hash(&token);
        let one_time = storage::NewOneTime {
            hash: &hash,
            user_id: &user.id,
            purpose: kind.purpose,
            email: new_email,
            expires_at,
            now,
        };
        storage::insert_one_time(&mut tx, &one_time).await?;
        let link = self.link(kind.page, &token);
        let to = new_email.unwrap_or(&user.email);
        let mut data = serde_json::json!({
            "user_id": user.id, "email": to, "name": user.name, "expires_at": expires_at,
            "subject": {"kind": "user", "id": user.id},
        });
        if new_email.is_some() {
            data["old_email"] = serde_json::Value::String(user.email.clone());
        }
        data[kind.url_field] = serde_json::Value::String(link.clone());
        self.outbox.enqueue(&mut tx, kind.event, &data, now).await?;
        tx.commit().await?;
        self.outbox.notify();
        Ok(())
    }

    /// Verifies an e-mail with the single-use token from the link: the
    /// registration address, or the new one of an address change (which
    /// then takes effect, and `user.email_changed` tells the old address).
    pub async fn verify_email(&self, token: &str) -> Result<(), Error> {
        let now = self.clock.now_ms();
        let mut tx = self.db.begin_write().await?;
        let (user_id, new_email) =
            storage::use_one_time(&mut tx, &token_hash(token), VERIFY_EMAIL.purpose, now)
                .await?
                .ok_or(Error::InvalidOneTimeToken)?;
        let Some(new_email) = new_email else {
            storage::mark_verified(&mut tx, &user_id, now).await?;
            tx.commit().await?;
            return Ok(());
        };
        let user = storage::user_by_id(&mut tx, &user_id)
            .await?
            .ok_or(Error::InvalidOneTimeToken)?;
        if let Err(e) = storage::set_email(&mut tx, &user_id, &new_email, now).await {
            return Err(if on_constraint(&e, &EMAIL_UNIQUE) {
                Error::EmailTaken
            } else {
                e.into()
            });
        }
        let data = serde_json::json!({
            "user_id": user.id, "name": user.name, "email": new_email, "old_email": user.email,
        });
        self.outbox
            .enqueue(&mut tx, "user.email_changed", &data, now)
            .await?;
        tx.commit().await?;
        self.outbox.notify();
        Ok(())
    }

    /// Exchanges e-mail and password for a token pair.
    pub async fn login(&self, email: &str, password: &str) -> Result<TokenPair, Error> {
        let email = normalize_email(email).unwrap_or_default();
        let user = if email.is_empty() {
            None
        } else {
            storage::user_by_email(&mut *self.conn().await?, &email).await?
        };
        let hash = user.as_ref().map(|u| u.password_hash.clone());
        if !self.hasher.verify(password.to_owned(), hash).await? {
            return Err(Error::InvalidCredentials);
        }
        let user = user.ok_or(Error::InvalidCredentials)?;
        if user.email_verified_at.is_none() {
            return Err(Error::EmailNotVerified);
        }
        let mut tx = self.db.begin_write().await?;
        let family = uuid::Uuid::now_v7().to_string();
        let pair = self.new_pair(&mut tx, &user, &family, None).await?;
        tx.commit().await?;
        Ok(pair)
    }

    /// A new token pair of `family` for `user`, acting for `tenant` (an
    /// organization and the user's role in it) or personally: the access
    /// token carries the organization's tier, and `tenant_admin` among
    /// the roles of its owners and admins.
    async fn new_pair(
        &self,
        tx: &mut sqlx::AnyConnection,
        user: &UserRow,
        family: &str,
        tenant: Option<&MemberOrgRow>,
    ) -> Result<TokenPair, Error> {
        let now = self.clock.now_ms();
        let refresh = random_token(32).map_err(|e| Error::Internal(e.to_string()))?;
        let ttl = i64::try_from(self.config.refresh_token_ttl.as_millis()).unwrap_or(i64::MAX);
        storage::insert_refresh(
            tx,
            &storage::NewRefresh {
                id: &uuid::Uuid::now_v7().to_string(),
                user_id: &user.id,
                family_id: family,
                hash: &token_hash(&refresh),
                tenant: tenant.map(|t| t.org.id.as_str()),
                now,
                expires_at: now.saturating_add(ttl),
            },
        )
        .await?;
        let mut roles = user.role_list();
        let (tier, acting) = match tenant {
            Some(t) => {
                if t.role == "owner" || t.role == "admin" {
                    roles.push(crate::orgs::TENANT_ADMIN.to_owned());
                }
                (
                    t.org.tier.as_str(),
                    Some(crate::keys::Tenant {
                        id: &t.org.id,
                        role: &t.role,
                    }),
                )
            }
            None => (user.tier.as_str(), None),
        };
        let access = self
            .signer
            .issue(&user.id, tier, &roles, Some(family), acting)
            .map_err(Error::Internal)?;
        Ok(TokenPair {
            access_token: access,
            refresh_token: refresh,
            token_type: "Bearer",
            expires_in: self.signer.access_ttl().as_secs(),
        })
    }

    /// Rotates a refresh token. A token already rotated is a reuse (a
    /// stolen copy, or the thief's): the whole family is revoked. The new
    /// pair acts for the same organization (or personally) as the old one.
    pub async fn refresh(&self, token: &str) -> Result<TokenPair, Error> {
        self.rotate(token, None).await
    }

    /// [`Users::refresh`], acting from now on for `switch_to` when given
    /// (`Some(None)`: personally).
    pub(crate) async fn rotate(
        &self,
        token: &str,
        switch_to: Option<Option<&str>>,
    ) -> Result<TokenPair, Error> {
        let now = self.clock.now_ms();
        let mut tx = self.db.begin_write().await?;
        let row = storage::refresh_by_hash(&mut tx, &token_hash(token))
            .await?
            .ok_or(Error::InvalidRefreshToken)?;
        if row.revoked_at.is_some() {
            return Err(Error::InvalidRefreshToken);
        }
        if row.rotated_at.is_some() || !storage::mark_rotated(&mut tx, &row.id, now).await? {
            storage::revoke_family(&mut tx, &row.family_id, now).await?;
            tx.commit().await?;
            tracing::warn!(user_id = %row.user_id, family = %row.family_id, "refresh token reused; family revoked");
            return Err(Error::RefreshTokenReused);
        }
        if row.expires_at <= now {
            return Err(Error::InvalidRefreshToken);
        }
        let user = storage::user_by_id(&mut tx, &row.user_id)
            .await?
            .ok_or(Error::InvalidRefreshToken)?;
        let tenant = match switch_to {
            Some(target) => self.tenant_of(&mut tx, &user.id, target).await?,
            // The login's organization, if the user still belongs to it
            // (leaving or removal revokes the family; this is the race).
            None => self
                .tenant_of(&mut tx, &user.id, row.tenant.as_deref())
                .await
                .map_err(|e| match e {
                    Error::OrgNotFound => Error::InvalidRefreshToken,
                    other => other,
                })?,
        };
        let pair = self
            .new_pair(&mut tx, &user, &row.family_id, tenant.as_ref())
            .await?;
        tx.commit().await?;
        Ok(pair)
    }

    /// Ends the login a refresh token belongs to (its whole family).
    /// Unknown tokens are ignored: logout always succeeds.
    pub async fn logout(&self, token: &str) -> Result<(), Error> {
        let mut conn = self.conn().await?;
        if let Some(row) = storage::refresh_by_hash(&mut conn, &token_hash(token)).await? {
            storage::revoke_family(&mut conn, &row.family_id, self.clock.now_ms()).await?;
        }
        Ok(())
    }

    /// Starts a password reset: for a known e-mail, stores a single-use
    /// token and emits `user.password_reset_requested`. The caller answers
    /// 202 either way, so the endpoint does not reveal accounts.
    pub async fn forgot_password(&self, email: &str) -> Result<(), Error> {
        let Ok(email) = normalize_email(email) else {
            return Ok(());
        };
        let Some(user) = storage::user_by_email(&mut *self.conn().await?, &email).await? else {
            return Ok(());
        };
        let tx = self.db.begin_write().await?;
        self.send_link(tx, &user, &RESET_PASSWORD, None).await
    }

    /// Sets a new password with a reset token; revokes every refresh token
    /// of the account.
    pub async fn reset_password(&self, token: &str, password: &str) -> Result<(), Error> {
        let mut v = Validator::new();
        if let Some(msg) = policy_violation(password, "") {
            v.fail("password", msg);
        }
        v.finish().map_err(invalid)?;
        let hash = self
            .hasher
            .hash(password.to_owned())
            .await?
            .map_err(Error::Internal)?;
        let now = self.clock.now_ms();
        let mut tx = self.db.begin_write().await?;
        let (user_id, _) =
            storage::use_one_time(&mut tx, &token_hash(token), RESET_PASSWORD.purpose, now)
                .await?
                .ok_or(Error::InvalidOneTimeToken)?;
        storage::set_password(&mut tx, &user_id, &hash, now).await?;
        storage::revoke_user(&mut tx, &user_id, None, now).await?;
        tx.commit().await?;
        Ok(())
    }

    /// A user by id.
    pub async fn get(&self, id: &str) -> Result<User, Error> {
        storage::user_by_id(&mut *self.conn().await?, id)
            .await?
            .map(User::from)
            .ok_or(Error::UserNotFound)
    }

    /// Changes the caller's profile: the name at once; the password (the
    /// current one required; every other session is logged out); the
    /// e-mail (the current password required; a link goes to the new
    /// address and the change takes effect when it is used).
    pub async fn update_me(
        &self,
        id: &str,
        session: Option<&str>,
        change: ProfileChange<'_>,
    ) -> Result<User, Error> {
        let mut v = Validator::new();
        if change.name.is_none() && change.email.is_none() && change.password.is_none() {
            v.fail("name", "give at least one of name, email, password");
        }
        let name = change.name.map(|n| check_name(&mut v, n));
        let email = match change.email.map(normalize_email) {
            Some(Ok(e)) => Some(e),
            Some(Err(msg)) => {
                v.fail("email", msg);
                None
            }
            None => None,
        };
        let user = storage::user_by_id(&mut *self.conn().await?, id)
            .await?
            .ok_or(Error::UserNotFound)?;
        if let Some(p) = change.password {
            if let Some(msg) = policy_violation(p, email.as_deref().unwrap_or(&user.email)) {
                v.fail("password", msg);
            }
        }
        let sensitive = change.email.is_some() || change.password.is_some();
        if sensitive && change.current_password.is_none() {
            v.fail(
                "current_password",
                "is required to change the email or password",
            );
        }
        v.finish().map_err(invalid)?;
        if let Some(current) = change.current_password {
            if !self
                .hasher
                .verify(current.to_owned(), Some(user.password_hash.clone()))
                .await?
            {
                return Err(Error::WrongPassword);
            }
        }
        let email = email.filter(|e| *e != user.email);
        if let Some(e) = &email {
            if storage::email_taken(&mut *self.conn().await?, e).await? {
                return Err(Error::EmailTaken);
            }
        }
        let hash = match change.password {
            Some(p) => Some(
                self.hasher
                    .hash(p.to_owned())
                    .await?
                    .map_err(Error::Internal)?,
            ),
            None => None,
        };
        let now = self.clock.now_ms();
        let mut tx = self.db.begin_write().await?;
        if let Some(name) = &name {
            storage::set_name(&mut tx, id, name, now).await?;
        }
        if let Some(hash) = &hash {
            storage::set_password(&mut tx, id, hash, now).await?;
            storage::revoke_user(&mut tx, id, session, now).await?;
        }
        match &email {
            Some(e) => self.send_link(tx, &user, &CHANGE_EMAIL, Some(e)).await?,
            None => tx.commit().await?,
        }
        self.get(id).await
    }

    /// Deletes used and expired one-time and refresh tokens (hourly; the
    /// platform purges delivered events and old dedupe records).
    pub async fn purge(&self) -> Result<u64, Error> {
        let now = self.clock.now_ms();
        let mut conn = self.conn().await?;
        let tokens = storage::purge_expired(&mut conn, now).await?;
        let invitations = crate::orgs::storage::purge_invitations(&mut conn, now).await?;
        drop(conn);
        let changes = self.purge_tier_changes().await?;
        Ok(tokens + invitations + changes)
    }

    /// A page of users (admin).
    pub async fn list(&self, after: Option<&str>, limit: Option<i64>) -> Result<UserPage, Error> {
        let limit = limit.unwrap_or(50);
        if !(1..=200).contains(&limit) {
            return Err(field_error("limit", "must be between 1 and 200"));
        }
        let rows =
            storage::list_users(&mut *self.conn().await?, after.unwrap_or(""), limit).await?;
        let next_after = (rows.len() as i64 == limit)
            .then(|| rows.last().map(|u| u.id.clone()))
            .flatten();
        Ok(UserPage {
            items: rows.into_iter().map(User::from).collect(),
            next_after,
        })
    }

    /// Replaces a user's roles (admin). An admin cannot drop their own
    /// admin role (no lock-out by accident).
    pub async fn set_roles(&self, actor: &str, id: &str, roles: &[String]) -> Result<User, Error> {
        let mut v = Validator::new();
        for (i, r) in roles.iter().enumerate() {
            v.check(
                ROLES.contains(&r.as_str()),
                &format!("roles[{i}]"),
                "must be `user` or `admin`",
            );
        }
        v.check(
            roles.iter().any(|r| r == "user"),
            "roles",
            "must include `user`",
        );
        v.check(
            actor != id || roles.iter().any(|r| r == "admin"),
            "roles",
            "you cannot remove your own admin role",
        );
        v.finish().map_err(invalid)?;
        let mut list: Vec<&str> = ROLES
            .iter()
            .copied()
            .filter(|r| roles.iter().any(|x| x == r))
            .collect();
        list.dedup();
        if !storage::set_roles(
            &mut *self.conn().await?,
            id,
            &list.join(","),
            self.clock.now_ms(),
        )
        .await?
        {
            return Err(Error::UserNotFound);
        }
        self.get(id).await
    }
}

/// `subscription.activated` (the event's tier) and `subscription.ended`
/// (FREE) set the tier of the event's subject — `data.subject: {kind:
/// "user" | "organization", id}`, or `data.user_id` in events from before
/// subjects — unless a later change was applied already (events arrive in
/// any order). An unknown subject or a tier that does not exist is
/// refused for good.
pub struct TierEvents {
    /// `subscription.ended`: back to FREE.
    pub ended: bool,
    /// The clock.
    pub clock: Clock,
    /// Wakes the tier change feed's waiting polls.
    pub changed: Arc<crate::tier_feed::Changed>,
}

/// Whose tier an event sets.
#[derive(Debug, PartialEq, Eq)]
enum Subject<'a> {
    User(&'a str),
    Organization(&'a str),
}

/// The subject an event names, or why it names none.
fn subject_of(data: &serde_json::Value) -> Result<Subject<'_>, String> {
    match data.get("subject") {
        Some(s) => {
            let id = s.get("id").and_then(|v| v.as_str()).unwrap_or("");
            if id.is_empty() {
                return Err("data.subject.id is required".to_owned());
            }
            match s.get("kind").and_then(|v| v.as_str()) {
                Some("user") => Ok(Subject::User(id)),
                Some("organization") => Ok(Subject::Organization(id)),
                other => Err(format!(
                    "data.subject.kind {other:?} is neither user nor organization"
                )),
            }
        }
        None => data
            .get("user_id")
            .and_then(|u| u.as_str())
            .map(Subject::User)
            .ok_or_else(|| "data.subject or data.user_id is required".to_owned()),
    }
}

#[async_trait::async_trait(?Send)]
impl Handler for TierEvents {
    async fn apply(
        &self,
        tx: &mut sqlx::AnyConnection,
        event: &Event,
    ) -> Result<Applied, ApiError> {
        let tier = if self.ended {
            "FREE"
        } else {
            let claimed = event
                .data
                .get("tier")
                .and_then(|t| t.as_str())
                .unwrap_or("")
                .to_ascii_uppercase();
            match TIERS.iter().find(|t| **t == claimed) {
                Some(t) => *t,
                None => {
                    return Ok(Applied::rejected(
                        "unknown_tier",
                        format!("data.tier `{claimed}` is not one of {}", TIERS.join(", ")),
                    ))
                }
            }
        };
        let subject = match subject_of(&event.data) {
            Ok(s) => s,
            Err(why) => return Ok(Applied::rejected("invalid_event", why)),
        };
        let now = self.clock.now_ms();
        let (of, id) = match subject {
            Subject::User(id) => (storage::TierOf::User, id),
            Subject::Organization(id) => (storage::TierOf::Organization, id),
        };
        let set = storage::set_tier(tx, of, id, tier, event.occurred_at, now).await?;
        if set != storage::TierSet::Stale {
            return Ok(Applied::Applied);
        }
        let exists = match of {
            storage::TierOf::User => storage::user_by_id(tx, id).await?.is_some(),
            storage::TierOf::Organization => crate::orgs::storage::org_exists(tx, id).await?,
        };
        if !exists {
            Ok(Applied::rejected(
                "unknown_subject",
                "the event names a user or organization that does not exist",
            ))
        } else {
            Ok(Applied::Stale)
        }
    }

    fn committed(&self, _event: &Event) {
        self.changed.notify();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_the_subject_of_a_tier_event() {
        use serde_json::json;
        let cases = [
            (json!({"user_id": "u1"}), Ok(Subject::User("u1"))),
            (
                json!({"user_id": "u1", "subject": {"kind": "organization", "id": "o1"}}),
                Ok(Subject::Organization("o1")),
            ),
            (
                json!({"subject": {"kind": "user", "id": "u2"}}),
                Ok(Subject::User("u2")),
            ),
            (json!({"subject": {"kind": "team", "id": "t"}}), Err(())),
            (json!({"subject": {"kind": "user"}}), Err(())),
            (json!({}), Err(())),
        ];
        for (data, want) in cases {
            assert_eq!(subject_of(&data).map_err(|_| ()), want, "{data}");
        }
    }

    #[test]
    fn test_normalize_email() {
        assert_eq!(
            normalize_email("  Ann@Example.COM ").unwrap(),
            "ann@example.com"
        );
        for bad in [
            "", "ann", "ann@", "@x.io", "a@b", "a@@b.io", "a b@c.io", "a@b..io", "a@.io",
        ] {
            assert!(normalize_email(bad).is_err(), "{bad}");
        }
        assert!(normalize_email(&format!("{}@x.io", "a".repeat(65))).is_err());
    }
}
