//! The users service's errors: one enum, one mapping to the envelope.

use backend_common::ApiError;

/// Everything a users endpoint can refuse or fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Input failed validation (already carries the fields).
    #[error("validation failed")]
    Invalid(ApiError),
    /// The e-mail is already registered.
    #[error("email taken")]
    EmailTaken,
    /// Unknown e-mail or wrong password (indistinguishable on purpose).
    #[error("invalid credentials")]
    InvalidCredentials,
    /// The account has not verified its e-mail yet.
    #[error("email not verified")]
    EmailNotVerified,
    /// The current password given to change the e-mail or password is wrong.
    #[error("wrong current password")]
    WrongPassword,
    /// A verification or reset token that is unknown, used or expired.
    #[error("invalid one-time token")]
    InvalidOneTimeToken,
    /// A refresh token that is unknown, expired or revoked.
    #[error("invalid refresh token")]
    InvalidRefreshToken,
    /// A rotated refresh token presented again: its family is revoked.
    #[error("refresh token reused")]
    RefreshTokenReused,
    /// No or an invalid access token.
    #[error("unauthenticated: {0}")]
    Unauthenticated(&'static str),
    /// The caller lacks the role.
    #[error("forbidden")]
    Forbidden,
    /// No such user.
    #[error("user not found")]
    UserNotFound,
    /// No such organization among the caller's (also: someone else's).
    #[error("organization not found")]
    OrgNotFound,
    /// No such member of the organization.
    #[error("member not found")]
    MemberNotFound,
    /// No such pending invitation.
    #[error("invitation not found")]
    InvitationNotFound,
    /// The caller is a member, not an owner or admin.
    #[error("not a tenant admin")]
    NotTenantAdmin,
    /// Only an owner may do this.
    #[error("not an owner")]
    NotOwner,
    /// The organization would be left without an owner.
    #[error("last owner")]
    LastOwner,
    /// The slug belongs to another organization.
    #[error("slug taken")]
    SlugTaken,
    /// The person is a member already.
    #[error("already a member")]
    AlreadyMember,
    /// An invitation that is unknown, used, declined, revoked or expired.
    #[error("invalid invitation")]
    InvalidInvitation,
    /// The invitation is for another e-mail address than the caller's.
    #[error("invitation for another address")]
    InvitationForAnotherAddress,
    /// The organization still has a paid tier.
    #[error("subscription active")]
    SubscriptionActive,
    /// The database failed.
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    /// Too many password hashes at once.
    #[error(transparent)]
    Busy(#[from] backend_common::blocking::Saturated),
    /// Anything else on the server side (hashing, key material).
    #[error("{0}")]
    Internal(String),
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e {
            Error::Invalid(api) => api,
            Error::EmailTaken => {
                ApiError::conflict("email_taken", "an account with this email already exists")
            }
            Error::InvalidCredentials => {
                ApiError::unauthorized("invalid_credentials", "wrong email or password")
            }
            Error::EmailNotVerified => ApiError::forbidden(
                "email_not_verified",
                "verify your email address before logging in (see the link we sent)",
            ),
            Error::WrongPassword => {
                ApiError::forbidden("wrong_password", "the current password is wrong")
            }
            Error::InvalidOneTimeToken => ApiError::bad_request(
                "invalid_token",
                "this link is invalid, already used or expired",
            ),
            Error::InvalidRefreshToken => ApiError::unauthorized(
                "invalid_refresh_token",
                "the refresh token is invalid, expired or revoked; log in again",
            ),
            Error::RefreshTokenReused => ApiError::unauthorized(
                "refresh_token_reused",
                "this refresh token was already used; every session of this login is revoked",
            ),
            Error::Unauthenticated(why) => ApiError::unauthorized("invalid_token", why),
            Error::Forbidden => {
                ApiError::forbidden("forbidden", "this endpoint needs the admin role")
            }
            Error::UserNotFound => ApiError::not_found("no such user"),
            Error::OrgNotFound => ApiError::not_found("no such organization"),
            Error::MemberNotFound => ApiError::not_found("no such member of this organization"),
            Error::InvitationNotFound => ApiError::not_found("no such pending invitation"),
            Error::NotTenantAdmin => ApiError::forbidden(
                "not_tenant_admin",
                "only the organization's owners and admins can do this",
            ),
            Error::NotOwner => {
                ApiError::forbidden("not_owner", "only an owner of the organization can do this")
            }
            Error::LastOwner => ApiError::conflict(
                "last_owner",
                "the organization needs an owner: make another member an owner first",
            ),
            Error::SlugTaken => {
                ApiError::conflict("slug_taken", "another organization has this slug")
            }
            Error::AlreadyMember => {
                ApiError::conflict("already_member", "this person is a member already")
            }
            Error::InvalidInvitation => ApiError::bad_request(
                "invalid_invitation",
                "this invitation is invalid, already used, declined, revoked or expired",
            ),
            Error::InvitationForAnotherAddress => ApiError::forbidden(
                "invitation_for_another_address",
                "this invitation is for another e-mail address: log in with the invited account",
            ),
            Error::SubscriptionActive => ApiError::conflict(
                "subscription_active",
                "the organization has a paid subscription: cancel it before dissolving",
            ),
            Error::Db(e) => ApiError::from(e),
            Error::Busy(e) => ApiError::from(e),
            Error::Internal(msg) => ApiError::internal(&msg),
        }
    }
}
