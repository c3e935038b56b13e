//! HTTP handlers of organizations, their members and invitations, and
//! of switching the organization a login acts for.

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use utoipa::{OpenApi, ToSchema};

use backend_common::error::ErrorEnvelope;
use backend_common::json::Json;
use backend_common::service_auth::{AllowedCallers, ServiceCaller};
use backend_common::user_auth::AuthUser;
use backend_common::ApiError;

use super::{CompanyInput, InternalOrg, Invitation, InvitationPreview, Member, Org, OrgInput};
use crate::core::{TokenPair, Users};

type Api<T> = Result<T, ApiError>;

/// Company details for tax invoices; `""` clears a field.
#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct CompanyRequest {
    /// Legal name, at most 200 characters.
    pub legal_name: Option<String>,
    /// NPWP: 15 or 16 digits (dots, dashes, spaces ignored; 15 get a leading 0).
    pub npwp: Option<String>,
    /// NITKU: 22 digits, starting with the NPWP.
    pub nitku: Option<String>,
    /// Address, at most 500 characters.
    pub address: Option<String>,
}

impl CompanyRequest {
    fn input(&self) -> CompanyInput<'_> {
        CompanyInput {
            legal_name: self.legal_name.as_deref(),
            npwp: self.npwp.as_deref(),
            nitku: self.nitku.as_deref(),
            address: self.address.as_deref(),
        }
    }
}

/// `POST /api/orgs`, `PATCH /api/orgs/{id}`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OrgRequest {
    /// Display name, 1–100 characters (required to create).
    pub name: Option<String>,
    /// Handle: 3–40 of `a-z 0-9 -` (create only; derived from the name
    /// when absent).
    pub slug: Option<String>,
    /// Company details.
    pub company: Option<CompanyRequest>,
}

impl OrgRequest {
    fn input(&self) -> OrgInput<'_> {
        OrgInput {
            name: self.name.as_deref(),
            slug: self.slug.as_deref(),
            company: self
                .company
                .as_ref()
                .map(CompanyRequest::input)
                .unwrap_or_default(),
        }
    }
}

/// Create an organization; the caller becomes its owner.
#[utoipa::path(post, path = "/api/orgs", tag = "organizations", security(("bearer" = [])),
    request_body = OrgRequest,
    responses((status = 201, body = Org),
        (status = 401, description = "no or invalid token", body = ErrorEnvelope),
        (status = 409, description = "slug taken", body = ErrorEnvelope),
        (status = 422, description = "invalid fields", body = ErrorEnvelope)))]
async fn create(
    users: web::Data<Users>,
    caller: AuthUser,
    body: Json<OrgRequest>,
) -> Api<HttpResponse> {
    let org = users.create_org(&caller.user_id, body.0.input()).await?;
    Ok(HttpResponse::Created().json(org))
}

/// The caller's organizations.
#[utoipa::path(get, path = "/api/orgs", tag = "organizations", security(("bearer" = [])),
    responses((status = 200, body = [Org]),
        (status = 401, description = "no or invalid token", body = ErrorEnvelope)))]
async fn list(users: web::Data<Users>, caller: AuthUser) -> Api<HttpResponse> {
    Ok(HttpResponse::Ok().json(users.my_orgs(&caller.user_id).await?))
}

/// One of the caller's organizations (404 for any other).
#[utoipa::path(get, path = "/api/orgs/{id}", tag = "organizations", security(("bearer" = [])),
    params(("id" = String, Path, description = "organization id")),
    responses((status = 200, body = Org),
        (status = 401, description = "no or invalid token", body = ErrorEnvelope),
        (status = 404, description = "not one of the caller's organizations", body = ErrorEnvelope)))]
async fn get(
    users: web::Data<Users>,
    caller: AuthUser,
    id: web::Path<String>,
) -> Api<HttpResponse> {
    Ok(HttpResponse::Ok().json(users.org(&caller.user_id, &id).await?))
}

/// Change the name or company details (owners and admins).
#[utoipa::path(patch, path = "/api/orgs/{id}", tag = "organizations", security(("bearer" = [])),
    params(("id" = String, Path, description = "organization id")),
    request_body = OrgRequest,
    responses((status = 200, body = Org),
        (status = 401, description = "no or invalid token", body = ErrorEnvelope),
        (status = 403, description = "not an owner or admin", body = ErrorEnvelope),
        (status = 404, description = "not one of the caller's organizations", body = ErrorEnvelope),
        (status = 422, description = "invalid fields", body = ErrorEnvelope)))]
async fn update(
    users: web::Data<Users>,
    caller: AuthUser,
    id: web::Path<String>,
    body: Json<OrgRequest>,
) -> Api<HttpResponse> {
    Ok(HttpResponse::Ok().json(
        users
            .update_org(&caller.user_id, &id, body.0.input())
            .await?,
    ))
}

/// Dissolve an organization (owners; its subscription canceled first).
#[utoipa::path(delete, path = "/api/orgs/{id}", tag = "organizations", security(("bearer" = [])),
    params(("id" = String, Path, description = "organization id")),
    responses((status = 204, description = "dissolved"),
        (status = 401, description = "no or invalid token", body = ErrorEnvelope),
        (status = 403, description = "not an owner", body = ErrorEnvelope),
        (status = 404, description = "not one of the caller's organizations", body = ErrorEnvelope),
        (status = 409, description = "a paid subscription is active", body = ErrorEnvelope)))]
async fn dissolve(
    users: web::Data<Users>,
    caller: AuthUser,
    id: web::Path<String>,
) -> Api<HttpResponse> {
    users.dissolve_org(&caller.user_id, &id).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// The members (any member reads them).
#[utoipa::path(get, path = "/api/orgs/{id}/members", tag = "organizations", security(("bearer" = [])),
    params(("id" = String, Path, description = "organization id")),
    responses((status = 200, body = [Member]),
        (status = 401, description = "no or invalid token", body = ErrorEnvelope),
        (status = 404, description = "not one of the caller's organizations", body = ErrorEnvelope)))]
async fn members(
    users: web::Data<Users>,
    caller: AuthUser,
    id: web::Path<String>,
) -> Api<HttpResponse> {
    Ok(HttpResponse::Ok().json(users.members(&caller.user_id, &id).await?))
}

/// `PATCH /api/orgs/{id}/members/{user_id}`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RoleRequest {
    /// `owner`, `admin` or `member`.
    pub role: String,
}

/// Change a member's role (owners and admins; owners only by owners).
#[utoipa::path(patch, path = "/api/orgs/{id}/members/{user_id}", tag = "organizations",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "organization id"),
        ("user_id" = String, Path, description = "member's user id")),
    request_body = RoleRequest,
    responses((status = 200, body = Member),
        (status = 401, description = "no or invalid token", body = ErrorEnvelope),
        (status = 403, description = "not allowed to give or take this role", body = ErrorEnvelope),
        (status = 404, description = "no such organization or member", body = ErrorEnvelope),
        (status = 409, description = "it would leave no owner", body = ErrorEnvelope),
        (status = 422, description = "invalid role", body = ErrorEnvelope)))]
async fn set_role(
    users: web::Data<Users>,
    caller: AuthUser,
    path: web::Path<(String, String)>,
    body: Json<RoleRequest>,
) -> Api<HttpResponse> {
    let (org, member) = path.into_inner();
    Ok(HttpResponse::Ok().json(
        users
            .set_member_role(&caller.user_id, &org, &member, &body.0.role)
            .await?,
    ))
}

/// Remove a member (owners and admins; an owner only by an owner, never
/// the last). Their logins acting for the organization end.
#[utoipa::path(delete, path = "/api/orgs/{id}/members/{user_id}", tag = "organizations",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "organization id"),
        ("user_id" = String, Path, description = "member's user id")),
    responses((status = 204, description = "removed"),
        (status = 401, description = "no or invalid token", body = ErrorEnvelope),
        (status = 403, description = "not allowed", body = ErrorEnvelope),
        (status = 404, description = "no such organization or member", body = ErrorEnvelope),
        (status = 409, description = "the last owner", body = ErrorEnvelope)))]
async fn remove(
    users: web::Data<Users>,
    caller: AuthUser,
    path: web::Path<(String, String)>,
) -> Api<HttpResponse> {
    let (org, member) = path.into_inner();
    users.remove_member(&caller.user_id, &org, &member).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// Leave an organization (the last owner cannot).
#[utoipa::path(post, path = "/api/orgs/{id}/leave", tag = "organizations", security(("bearer" = [])),
    params(("id" = String, Path, description = "organization id")),
    responses((status = 204, description = "left"),
        (status = 401, description = "no or invalid token", body = ErrorEnvelope),
        (status = 404, description = "not one of the caller's organizations", body = ErrorEnvelope),
        (status = 409, description = "the last owner", body = ErrorEnvelope)))]
async fn leave(
    users: web::Data<Users>,
    caller: AuthUser,
    id: web::Path<String>,
) -> Api<HttpResponse> {
    users
        .remove_member(&caller.user_id, &id, &caller.user_id)
        .await?;
    Ok(HttpResponse::NoContent().finish())
}

/// `POST /api/orgs/{id}/transfer`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TransferRequest {
    /// The member who becomes an owner; the caller becomes an admin.
    pub user_id: String,
}

/// Transfer ownership to another member (owners).
#[utoipa::path(post, path = "/api/orgs/{id}/transfer", tag = "organizations", security(("bearer" = [])),
    params(("id" = String, Path, description = "organization id")),
    request_body = TransferRequest,
    responses((status = 200, description = "the members after the transfer", body = [Member]),
        (status = 401, description = "no or invalid token", body = ErrorEnvelope),
        (status = 403, description = "not an owner", body = ErrorEnvelope),
        (status = 404, description = "no such organization or member", body = ErrorEnvelope),
        (status = 422, description = "invalid fields", body = ErrorEnvelope)))]
async fn transfer(
    users: web::Data<Users>,
    caller: AuthUser,
    id: web::Path<String>,
    body: Json<TransferRequest>,
) -> Api<HttpResponse> {
    Ok(HttpResponse::Ok().json(
        users
            .transfer_ownership(&caller.user_id, &id, &body.0.user_id)
            .await?,
    ))
}

/// `POST /api/orgs/{id}/invitations`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InviteRequest {
    /// Who to invite.
    pub email: String,
    /// `member` (default) or `admin`.
    #[serde(default = "member")]
    pub role: String,
}

fn member() -> String {
    "member".to_owned()
}

/// Invite someone by e-mail (owners and admins): a single-use link in an
/// `organization.invitation_created` event; replaces a pending invitation
/// of the same address.
#[utoipa::path(post, path = "/api/orgs/{id}/invitations", tag = "organizations",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "organization id")),
    request_body = InviteRequest,
    responses((status = 201, body = Invitation),
        (status = 401, description = "no or invalid token", body = ErrorEnvelope),
        (status = 403, description = "not an owner or admin", body = ErrorEnvelope),
        (status = 404, description = "not one of the caller's organizations", body = ErrorEnvelope),
        (status = 409, description = "already a member", body = ErrorEnvelope),
        (status = 422, description = "invalid fields", body = ErrorEnvelope)))]
async fn invite(
    users: web::Data<Users>,
    caller: AuthUser,
    id: web::Path<String>,
    body: Json<InviteRequest>,
) -> Api<HttpResponse> {
    let b = &body.0;
    let inv = users
        .invite(&caller.user_id, &id, &b.email, &b.role)
        .await?;
    Ok(HttpResponse::Created().json(inv))
}

/// The pending invitations (owners and admins).
#[utoipa::path(get, path = "/api/orgs/{id}/invitations", tag = "organizations",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "organization id")),
    responses((status = 200, body = [Invitation]),
        (status = 401, description = "no or invalid token", body = ErrorEnvelope),
        (status = 403, description = "not an owner or admin", body = ErrorEnvelope),
        (status = 404, description = "not one of the caller's organizations", body = ErrorEnvelope)))]
async fn invitations(
    users: web::Data<Users>,
    caller: AuthUser,
    id: web::Path<String>,
) -> Api<HttpResponse> {
    Ok(HttpResponse::Ok().json(users.invitations(&caller.user_id, &id).await?))
}

/// Revoke a pending invitation (owners and admins).
#[utoipa::path(delete, path = "/api/orgs/{id}/invitations/{invitation_id}", tag = "organizations",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "organization id"),
        ("invitation_id" = String, Path, description = "invitation id")),
    responses((status = 204, description = "revoked"),
        (status = 401, description = "no or invalid token", body = ErrorEnvelope),
        (status = 403, description = "not an owner or admin", body = ErrorEnvelope),
        (status = 404, description = "no such organization or pending invitation", body = ErrorEnvelope)))]
async fn revoke(
    users: web::Data<Users>,
    caller: AuthUser,
    path: web::Path<(String, String)>,
) -> Api<HttpResponse> {
    let (org, inv) = path.into_inner();
    users.revoke_invitation(&caller.user_id, &org, &inv).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// The token of an invitation link.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InvitationToken {
    /// From the link's `token=`.
    pub token: String,
}

/// What an invitation offers (the token suffices; no account needed).
#[utoipa::path(post, path = "/api/orgs/invitations/preview", tag = "organizations",
    request_body = InvitationToken,
    responses((status = 200, body = InvitationPreview),
        (status = 400, description = "invalid, used or expired invitation", body = ErrorEnvelope)))]
async fn preview(users: web::Data<Users>, body: Json<InvitationToken>) -> Api<HttpResponse> {
    Ok(HttpResponse::Ok().json(users.preview_invitation(&body.0.token).await?))
}

/// Accept an invitation as the caller (whose address must be the one
/// invited).
#[utoipa::path(post, path = "/api/orgs/invitations/accept", tag = "organizations",
    security(("bearer" = [])),
    request_body = InvitationToken,
    responses((status = 200, description = "the organization joined", body = Org),
        (status = 400, description = "invalid, used or expired invitation", body = ErrorEnvelope),
        (status = 401, description = "no or invalid token", body = ErrorEnvelope),
        (status = 403, description = "for another e-mail address", body = ErrorEnvelope)))]
async fn accept(
    users: web::Data<Users>,
    caller: AuthUser,
    body: Json<InvitationToken>,
) -> Api<HttpResponse> {
    Ok(HttpResponse::Ok().json(
        users
            .accept_invitation(&caller.user_id, &body.0.token)
            .await?,
    ))
}

/// Decline an invitation (the token suffices).
#[utoipa::path(post, path = "/api/orgs/invitations/decline", tag = "organizations",
    request_body = InvitationToken,
    responses((status = 204, description = "declined"),
        (status = 400, description = "invalid, used or expired invitation", body = ErrorEnvelope)))]
async fn decline(users: web::Data<Users>, body: Json<InvitationToken>) -> Api<HttpResponse> {
    users.decline_invitation(&body.0.token).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// `POST /api/auth/switch`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SwitchRequest {
    /// The login's current refresh token (it is rotated).
    pub refresh_token: String,
    /// An organization of the caller's, or `null` to act personally.
    pub tenant: Option<String>,
}

/// Switch the organization a login acts for (or back to personal): the
/// refresh token is rotated and the new access token carries `tenant`,
/// `tenant_role`, `tenant_admin` for owners and admins, and the
/// organization's tier. Refreshes keep the choice.
#[utoipa::path(post, path = "/api/auth/switch", tag = "auth", request_body = SwitchRequest,
    responses((status = 200, body = TokenPair),
        (status = 401, description = "invalid or reused refresh token", body = ErrorEnvelope),
        (status = 404, description = "not one of the user's organizations", body = ErrorEnvelope)))]
async fn switch(users: web::Data<Users>, body: Json<SwitchRequest>) -> Api<HttpResponse> {
    let b = &body.0;
    Ok(HttpResponse::Ok().json(users.switch(&b.refresh_token, b.tenant.as_deref()).await?))
}

/// An organization, for other services: company details and its owners
/// and admins.
#[utoipa::path(get, path = "/internal/organizations/{id}", tag = "internal", security(("service" = [])),
    params(("id" = String, Path, description = "organization id")),
    responses((status = 200, body = InternalOrg),
        (status = 401, description = "not a service token", body = ErrorEnvelope),
        (status = 404, description = "no such organization", body = ErrorEnvelope)))]
async fn internal_org(
    users: web::Data<Users>,
    _caller: ServiceCaller,
    id: web::Path<String>,
) -> Api<HttpResponse> {
    Ok(HttpResponse::Ok().json(users.internal_org(&id).await?))
}

/// The services that read organizations: billing prints the buyer,
/// notifications tells the admins, subscriptions and payments check the
/// subject.
const INTERNAL_ORG_CALLERS: &[&str] = &["billing", "notifications", "subscriptions", "payments"];

/// Registers the routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/api/auth/switch", web::post().to(switch))
        .route("/api/orgs/invitations/preview", web::post().to(preview))
        .route("/api/orgs/invitations/accept", web::post().to(accept))
        .route("/api/orgs/invitations/decline", web::post().to(decline))
        .service(
            web::resource("/api/orgs")
                .route(web::get().to(list))
                .route(web::post().to(create)),
        )
        .service(
            web::resource("/api/orgs/{id}")
                .route(web::get().to(get))
                .route(web::patch().to(update))
                .route(web::delete().to(dissolve)),
        )
        .route("/api/orgs/{id}/members", web::get().to(members))
        .service(
            web::resource("/api/orgs/{id}/members/{user_id}")
                .route(web::patch().to(set_role))
                .route(web::delete().to(remove)),
        )
        .route("/api/orgs/{id}/leave", web::post().to(leave))
        .route("/api/orgs/{id}/transfer", web::post().to(transfer))
        .service(
            web::resource("/api/orgs/{id}/invitations")
                .route(web::get().to(invitations))
                .route(web::post().to(invite)),
        )
        .route(
            "/api/orgs/{id}/invitations/{invitation_id}",
            web::delete().to(revoke),
        )
        .service(
            web::resource("/internal/organizations/{id}")
                .app_data(AllowedCallers(INTERNAL_ORG_CALLERS))
                .route(web::get().to(internal_org)),
        );
}

/// The organizations part of the users service's OpenAPI document.
#[derive(OpenApi)]
#[openapi(
    paths(
        create,
        list,
        get,
        update,
        dissolve,
        members,
        set_role,
        remove,
        leave,
        transfer,
        invite,
        invitations,
        revoke,
        preview,
        accept,
        decline,
        switch,
        internal_org
    ),
    components(schemas(
        OrgRequest,
        CompanyRequest,
        RoleRequest,
        TransferRequest,
        InviteRequest,
        InvitationToken,
        SwitchRequest,
        Org,
        super::Company,
        Member,
        Invitation,
        InvitationPreview,
        InternalOrg
    ))
)]
pub struct OrgsApi;
