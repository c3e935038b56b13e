//! HTTP handlers: extract, call `core`, answer. Request types reject
//! unknown fields (a 422 naming the field), so a typo never passes
//! silently.

use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, OpenApi, ToSchema};

use backend_common::json::Json;
use backend_common::service_auth::{AllowedCallers, ServiceCaller};
use backend_common::user_auth::{Admin, AuthUser};
use backend_common::ApiError;

use crate::core::{ProfileChange, TokenPair, User, UserPage, Users};

type Api<T> = Result<T, ApiError>;

/// `POST /api/auth/register`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// E-mail address (case-insensitive, unique).
    pub email: String,
    /// 10–128 characters, at least one letter and one digit.
    pub password: String,
    /// Display name, 1–100 characters.
    pub name: String,
}

/// Create an account. A verification link is sent (`user.registered`).
#[utoipa::path(post, path = "/api/auth/register", tag = "auth", request_body = RegisterRequest,
    responses((status = 201, body = User),
        (status = 409, description = "email taken", body = backend_common::error::ErrorEnvelope),
        (status = 422, description = "invalid fields", body = backend_common::error::ErrorEnvelope)))]
async fn register(users: web::Data<Users>, body: Json<RegisterRequest>) -> Api<HttpResponse> {
    let b = body.0;
    let user = users.register(&b.email, &b.password, &b.name).await?;
    Ok(HttpResponse::Created().json(user))
}

/// A single-use token from a link.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// The token from the link.
    pub token: String,
}

/// `POST /api/auth/verify-email` answer.
#[derive(Serialize, ToSchema)]
pub struct Verified {
    /// Always true.
    pub email_verified: bool,
}

/// Verify an e-mail address with the token from the link.
#[utoipa::path(post, path = "/api/auth/verify-email", tag = "auth", request_body = TokenRequest,
    responses((status = 200, body = Verified),
        (status = 400, description = "invalid, used or expired token", body = backend_common::error::ErrorEnvelope),
        (status = 409, description = "the new address of a change was taken meanwhile", body = backend_common::error::ErrorEnvelope)))]
async fn verify_email(users: web::Data<Users>, body: Json<TokenRequest>) -> Api<HttpResponse> {
    users.verify_email(&body.0.token).await?;
    Ok(HttpResponse::Ok().json(Verified {
        email_verified: true,
    }))
}

/// `POST /api/auth/verify-email/resend`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResendRequest {
    /// The account's e-mail.
    pub email: String,
}

/// Send the verification link again (at most once a minute per account).
/// Always 202, whether or not the account exists or is already verified.
#[utoipa::path(post, path = "/api/auth/verify-email/resend", tag = "auth", request_body = ResendRequest,
    responses((status = 202, body = Accepted)))]
async fn resend_verification(
    users: web::Data<Users>,
    body: Json<ResendRequest>,
) -> Api<HttpResponse> {
    users.resend_verification(&body.0.email).await?;
    Ok(HttpResponse::Accepted().json(Accepted { status: "accepted" }))
}

/// `POST /api/auth/login`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    /// E-mail.
    pub email: String,
    /// Password.
    pub password: String,
}

/// Log in: an access token and a refresh token.
#[utoipa::path(post, path = "/api/auth/login", tag = "auth", request_body = LoginRequest,
    responses((status = 200, body = TokenPair),
        (status = 401, description = "wrong email or password", body = backend_common::error::ErrorEnvelope),
        (status = 403, description = "email not verified", body = backend_common::error::ErrorEnvelope)))]
async fn login(users: web::Data<Users>, body: Json<LoginRequest>) -> Api<HttpResponse> {
    let pair = users.login(&body.0.email, &body.0.password).await?;
    Ok(HttpResponse::Ok()
        .insert_header(("Cache-Control", "no-store"))
        .json(pair))
}

/// A refresh token.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    /// The refresh token from login or the last refresh.
    pub refresh_token: String,
}

/// Exchange a refresh token for a new pair (the old one stops working;
/// presenting it again revokes the whole login).
#[utoipa::path(post, path = "/api/auth/refresh", tag = "auth", request_body = RefreshRequest,
    responses((status = 200, body = TokenPair),
        (status = 401, description = "invalid, expired, revoked or reused", body = backend_common::error::ErrorEnvelope)))]
async fn refresh(users: web::Data<Users>, body: Json<RefreshRequest>) -> Api<HttpResponse> {
    let pair = users.refresh(&body.0.refresh_token).await?;
    Ok(HttpResponse::Ok()
        .insert_header(("Cache-Control", "no-store"))
        .json(pair))
}

/// End a login (every refresh token descended from it).
#[utoipa::path(post, path = "/api/auth/logout", tag = "auth", request_body = RefreshRequest,
    responses((status = 204, description = "logged out (also for an unknown token)")))]
async fn logout(users: web::Data<Users>, body: Json<RefreshRequest>) -> Api<HttpResponse> {
    users.logout(&body.0.refresh_token).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// `POST /api/auth/password/forgot`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForgotRequest {
    /// The account's e-mail.
    pub email: String,
}

/// `202 Accepted` body.
#[derive(Serialize, ToSchema)]
pub struct Accepted {
    /// Always `accepted`.
    pub status: &'static str,
}

/// Ask for a password-reset link. Always 202, whether or not the account
/// exists.
#[utoipa::path(post, path = "/api/auth/password/forgot", tag = "auth", request_body = ForgotRequest,
    responses((status = 202, body = Accepted)))]
async fn forgot_password(users: web::Data<Users>, body: Json<ForgotRequest>) -> Api<HttpResponse> {
    users.forgot_password(&body.0.email).await?;
    Ok(HttpResponse::Accepted().json(Accepted { status: "accepted" }))
}

/// `POST /api/auth/password/reset`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetRequest {
    /// The token from the reset link.
    pub token: String,
    /// The new password (same policy as registration).
    pub password: String,
}

/// Set a new password with a reset token; every session is logged out.
#[utoipa::path(post, path = "/api/auth/password/reset", tag = "auth", request_body = ResetRequest,
    responses((status = 204, description = "password changed"),
        (status = 400, description = "invalid, used or expired token", body = backend_common::error::ErrorEnvelope),
        (status = 422, description = "password policy", body = backend_common::error::ErrorEnvelope)))]
async fn reset_password(users: web::Data<Users>, body: Json<ResetRequest>) -> Api<HttpResponse> {
    users
        .reset_password(&body.0.token, &body.0.password)
        .await?;
    Ok(HttpResponse::NoContent().finish())
}

/// The caller's profile.
#[utoipa::path(get, path = "/api/users/me", tag = "users", security(("bearer" = [])),
    responses((status = 200, body = User),
        (status = 401, description = "no or invalid token", body = backend_common::error::ErrorEnvelope)))]
async fn me(users: web::Data<Users>, caller: AuthUser) -> Api<HttpResponse> {
    Ok(HttpResponse::Ok().json(users.get(&caller.user_id).await?))
}

/// `PATCH /api/users/me`: any of `name`, `email`, `password`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateMeRequest {
    /// New display name.
    pub name: Option<String>,
    /// New e-mail: a link goes to it, and the change takes effect when the
    /// link is used (`POST /api/auth/verify-email`).
    pub email: Option<String>,
    /// New password (same policy as registration); every other session
    /// is logged out.
    pub password: Option<String>,
    /// The current password, required with `email` or `password`.
    pub current_password: Option<String>,
}

/// Change the caller's profile.
#[utoipa::path(patch, path = "/api/users/me", tag = "users", security(("bearer" = [])),
    request_body = UpdateMeRequest,
    responses((status = 200, description = "changed (a new e-mail only once verified)", body = User),
        (status = 401, description = "no or invalid token", body = backend_common::error::ErrorEnvelope),
        (status = 403, description = "wrong current password", body = backend_common::error::ErrorEnvelope),
        (status = 409, description = "email taken", body = backend_common::error::ErrorEnvelope),
        (status = 422, description = "invalid fields", body = backend_common::error::ErrorEnvelope)))]
async fn update_me(
    users: web::Data<Users>,
    caller: AuthUser,
    body: Json<UpdateMeRequest>,
) -> Api<HttpResponse> {
    let b = &body.0;
    let change = ProfileChange {
        name: b.name.as_deref(),
        email: b.email.as_deref(),
        password: b.password.as_deref(),
        current_password: b.current_password.as_deref(),
    };
    let user = users
        .update_me(&caller.user_id, caller.sid.as_deref(), change)
        .await?;
    Ok(HttpResponse::Ok().json(user))
}

/// Paging of `GET /api/admin/users`.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// `next_after` of the previous page.
    pub after: Option<String>,
    /// Page size, 1–200 (default 50).
    pub limit: Option<i64>,
}

/// List users (role `admin`).
#[utoipa::path(get, path = "/api/admin/users", tag = "admin", security(("bearer" = [])),
    params(ListQuery),
    responses((status = 200, body = UserPage),
        (status = 401, description = "no or invalid token", body = backend_common::error::ErrorEnvelope),
        (status = 403, description = "not an admin", body = backend_common::error::ErrorEnvelope)))]
async fn list_users(
    users: web::Data<Users>,
    _admin: Admin,
    query: web::Query<ListQuery>,
) -> Api<HttpResponse> {
    let q = query.into_inner();
    Ok(HttpResponse::Ok().json(users.list(q.after.as_deref(), q.limit).await?))
}

/// `PATCH /api/admin/users/{id}`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetRolesRequest {
    /// The complete role list: `user`, optionally `admin`.
    pub roles: Vec<String>,
}

/// Replace a user's roles (role `admin`).
#[utoipa::path(patch, path = "/api/admin/users/{id}", tag = "admin", security(("bearer" = [])),
    params(("id" = String, Path, description = "user id")),
    request_body = SetRolesRequest,
    responses((status = 200, body = User),
        (status = 401, description = "no or invalid token", body = backend_common::error::ErrorEnvelope),
        (status = 403, description = "not an admin", body = backend_common::error::ErrorEnvelope),
        (status = 404, description = "no such user", body = backend_common::error::ErrorEnvelope),
        (status = 422, description = "invalid roles", body = backend_common::error::ErrorEnvelope)))]
async fn set_roles(
    users: web::Data<Users>,
    admin: Admin,
    id: web::Path<String>,
    body: Json<SetRolesRequest>,
) -> Api<HttpResponse> {
    Ok(HttpResponse::Ok().json(
        users
            .set_roles(&admin.0.user_id, &id, &body.0.roles)
            .await?,
    ))
}

/// The public keys access tokens are signed with (RFC 7517).
#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "auth",
    responses((status = 200, description = "JWK set", content_type = "application/json", body = Object)))]
async fn jwks(users: web::Data<Users>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .insert_header(("Cache-Control", "public, max-age=60"))
        .body(users.signer.jwks().to_string())
}

/// A user, for other services (service token only).
#[utoipa::path(get, path = "/internal/users/{id}", tag = "internal", security(("service" = [])),
    params(("id" = String, Path, description = "user id")),
    responses((status = 200, body = User),
        (status = 401, description = "not a service token", body = backend_common::error::ErrorEnvelope),
        (status = 404, description = "no such user", body = backend_common::error::ErrorEnvelope)))]
async fn internal_user(
    users: web::Data<Users>,
    _caller: ServiceCaller,
    id: web::Path<String>,
) -> Api<HttpResponse> {
    Ok(HttpResponse::Ok().json(users.get(&id).await?))
}

/// `GET /internal/tier-changes`.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct TierChangesQuery {
    /// The `next` of the previous answer; unset: every change an access
    /// token still valid may predate.
    pub after: Option<i64>,
    /// Seconds to wait for a change when there is none yet, 0–25
    /// (default 0).
    pub wait: Option<u64>,
}

/// Tier changes of users and organizations in commit order, as a long
/// poll (the gateway, service token only).
#[utoipa::path(get, path = "/internal/tier-changes", tag = "internal", security(("service" = [])),
    params(TierChangesQuery),
    responses((status = 200, body = crate::tier_feed::TierChanges),
        (status = 401, description = "not a service token", body = backend_common::error::ErrorEnvelope),
        (status = 422, description = "a bad parameter", body = backend_common::error::ErrorEnvelope)))]
async fn tier_changes(
    users: web::Data<Users>,
    changed: web::Data<crate::tier_feed::Changed>,
    _caller: ServiceCaller,
    query: web::Query<TierChangesQuery>,
) -> Api<HttpResponse> {
    let q = query.into_inner();
    let wait = std::time::Duration::from_secs(q.wait.unwrap_or(0));
    if wait > crate::tier_feed::MAX_WAIT {
        return Err(crate::core::field_error("wait", "must be between 0 and 25").into());
    }
    let changed = changed.into_inner();
    Ok(HttpResponse::Ok().json(users.tier_changes(&changed, q.after, wait).await?))
}

/// The services that read users (`GET /internal/users/{id}`): billing
/// prints the buyer, notifications finds the address and locale.
const INTERNAL_USER_CALLERS: &[&str] = &["billing", "notifications", "subscriptions", "payments"];

/// Registers the routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/api/auth/register", web::post().to(register))
        .route("/api/auth/verify-email", web::post().to(verify_email))
        .route(
            "/api/auth/verify-email/resend",
            web::post().to(resend_verification),
        )
        .route("/api/auth/login", web::post().to(login))
        .route("/api/auth/refresh", web::post().to(refresh))
        .route("/api/auth/logout", web::post().to(logout))
        .route("/api/auth/password/forgot", web::post().to(forgot_password))
        .route("/api/auth/password/reset", web::post().to(reset_password))
        .service(
            web::resource("/api/users/me")
                .route(web::get().to(me))
                .route(web::patch().to(update_me)),
        )
        .route("/api/admin/users", web::get().to(list_users))
        .route("/api/admin/users/{id}", web::patch().to(set_roles))
        .route("/.well-known/jwks.json", web::get().to(jwks))
        .service(
            web::resource("/internal/users/{id}")
                .app_data(AllowedCallers(INTERNAL_USER_CALLERS))
                .route(web::get().to(internal_user)),
        )
        .service(
            web::resource("/internal/tier-changes")
                .app_data(AllowedCallers(&["gateway"]))
                .route(web::get().to(tier_changes)),
        );
}

/// The users service's OpenAPI document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "tiergate users service",
        description = "Accounts, access tokens (EdDSA, JWKS), refresh-token rotation."
    ),
    paths(
        register,
        verify_email,
        resend_verification,
        login,
        refresh,
        logout,
        forgot_password,
        reset_password,
        me,
        update_me,
        list_users,
        set_roles,
        jwks,
        internal_user,
        tier_changes
    ),
    components(schemas(
        RegisterRequest,
        TokenRequest,
        Verified,
        ResendRequest,
        LoginRequest,
        RefreshRequest,
        ForgotRequest,
        Accepted,
        ResetRequest,
        UpdateMeRequest,
        SetRolesRequest,
        User,
        UserPage,
        TokenPair,
        crate::tier_feed::TierChanges,
        crate::tier_feed::TierChange,
        crate::tier_feed::ChangedSubject
    ))
)]
pub struct UsersApi;
