//! HTTP handlers of subscriptions: the plan catalogue (public), the
//! caller's subscription, checkouts, usage reports, the admin's views,
//! and the gateway's usage batches (`/internal/usage`).

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use utoipa::{IntoParams, OpenApi};

use backend_common::error::ErrorEnvelope;
use backend_common::json::{BodyLimit, Json};
use backend_common::service_auth::{AllowedCallers, ServiceCaller};
use backend_common::user_auth::{Admin, AuthUser, Subject};
use backend_common::{ApiError, FieldError};

use crate::core::{
    AdminPage, AdminSubscription, Change, CheckoutRequest, DowngradeRequest, GrantRequest,
    InvoiceRef, Line, PlanList, PlanView, Price, Renewal, Scheduled, SubjectView, SubscriptionView,
    Subscriptions,
};

use crate::usage::{
    Ingested, MemberShare, Quota, Range, RouteCount, TopUser, TopUsers, UsageBatch, UsagePeriod,
    UsageReport, UsageRow, UsageSubject,
};

type Api<T> = Result<T, ApiError>;

/// The largest usage batch accepted (100 000 rows fit).
const USAGE_BODY_LIMIT: usize = 32 * 1024 * 1024;

#[utoipa::path(get, path = "/api/subscriptions/plans", tag = "plans",
    responses((status = 200, description = "the plans, lowest first, with prices before and after PPN", body = PlanList)))]
async fn plans(subs: web::Data<Subscriptions>) -> HttpResponse {
    HttpResponse::Ok().json(subs.plans())
}

#[utoipa::path(get, path = "/api/subscriptions/me", tag = "subscriptions", security(("bearer" = [])),
    responses((status = 200, description = "the subscription of the token's subject (the user, or the active organization); FREE when none", body = SubscriptionView),
        (status = 401, description = "no valid token", body = ErrorEnvelope)))]
async fn me(subs: web::Data<Subscriptions>, user: AuthUser) -> Api<HttpResponse> {
    Ok(HttpResponse::Ok().json(subs.me(&user.0.subject()).await?))
}

#[utoipa::path(post, path = "/api/subscriptions/checkout", tag = "subscriptions", security(("bearer" = [])),
    params(("Idempotency-Key" = String, Header, description = "1-200 characters; the same key and request answers the same, never bills twice")),
    request_body = CheckoutRequest,
    responses((status = 201, description = "the change and its invoice (pay it with POST /api/payments); the credit's arithmetic when a paid plan is replaced", body = Change),
        (status = 200, description = "this key's answer replayed (`Idempotent-Replayed: true`)", body = Change),
        (status = 400, description = "no Idempotency-Key, or a malformed body", body = ErrorEnvelope),
        (status = 401, description = "no valid token", body = ErrorEnvelope),
        (status = 403, description = "an organization's member who is not its owner or admin", body = ErrorEnvelope),
        (status = 409, description = "not above the plan in force", body = ErrorEnvelope),
        (status = 422, description = "an unknown plan or cycle; this key with another request", body = ErrorEnvelope),
        (status = 502, description = "billing failed", body = ErrorEnvelope),
        (status = 503, description = "billing is unavailable: send the same request again", body = ErrorEnvelope)))]
async fn checkout(
    subs: web::Data<Subscriptions>,
    user: AuthUser,
    req: HttpRequest,
    body: Json<CheckoutRequest>,
) -> Api<HttpResponse> {
    let key = backend_common::idempotency_key(&req, "bill twice")?;
    user.0.acts_for_subject("changes its plan")?;
    let answered = subs.checkout(&user.0, &key, &body.0).await?;
    let mut res = HttpResponse::build(answered.status);
    if answered.replayed {
        res.insert_header(("Idempotent-Replayed", "true"));
    }
    Ok(res.content_type("application/json").body(answered.body))
}

#[utoipa::path(post, path = "/api/subscriptions/downgrade", tag = "subscriptions", security(("bearer" = [])),
    request_body = DowngradeRequest,
    responses((status = 200, description = "the subscription, the lower plan scheduled for the period's end (it replaces a cancellation)", body = SubscriptionView),
        (status = 400, description = "a malformed body", body = ErrorEnvelope),
        (status = 401, description = "no valid token", body = ErrorEnvelope),
        (status = 403, description = "an organization's member who is not its owner or admin", body = ErrorEnvelope),
        (status = 409, description = "no paid plan in force, or not below it", body = ErrorEnvelope),
        (status = 422, description = "an unknown plan, or FREE (cancel instead)", body = ErrorEnvelope)))]
async fn downgrade(
    subs: web::Data<Subscriptions>,
    user: AuthUser,
    body: Json<DowngradeRequest>,
) -> Api<HttpResponse> {
    user.0.acts_for_subject("changes its plan")?;
    Ok(HttpResponse::Ok().json(subs.downgrade(&user.0.subject(), &body.0).await?))
}

#[utoipa::path(post, path = "/api/subscriptions/cancel", tag = "subscriptions", security(("bearer" = [])),
    responses((status = 200, description = "the subscription, ending at the period's end (`cancel_at_period_end`); the plan stays until then", body = SubscriptionView),
        (status = 401, description = "no valid token", body = ErrorEnvelope),
        (status = 403, description = "an organization's member who is not its owner or admin", body = ErrorEnvelope),
        (status = 409, description = "no paid plan in force", body = ErrorEnvelope)))]
async fn cancel(subs: web::Data<Subscriptions>, user: AuthUser) -> Api<HttpResponse> {
    user.0.acts_for_subject("cancels its plan")?;
    Ok(HttpResponse::Ok().json(subs.cancel(&user.0.subject()).await?))
}

#[utoipa::path(post, path = "/api/subscriptions/resume", tag = "subscriptions", security(("bearer" = [])),
    responses((status = 200, description = "the subscription, renewing as before (the cancellation or scheduled downgrade undone)", body = SubscriptionView),
        (status = 401, description = "no valid token", body = ErrorEnvelope),
        (status = 403, description = "an organization's member who is not its owner or admin", body = ErrorEnvelope),
        (status = 409, description = "no paid plan in force, or nothing to undo", body = ErrorEnvelope)))]
async fn resume(subs: web::Data<Subscriptions>, user: AuthUser) -> Api<HttpResponse> {
    user.0.acts_for_subject("changes its plan")?;
    Ok(HttpResponse::Ok().json(subs.resume(&user.0.subject()).await?))
}

/// `?state=&plan=&limit=&cursor=`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct AdminQuery {
    /// Only in this state (`pending`, `active`, `past_due`, `canceled`,
    /// `expired`).
    state: Option<String>,
    /// Only on this plan.
    plan: Option<String>,
    /// Page size, 1-100 (default 20).
    limit: Option<i64>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

#[utoipa::path(get, path = "/api/admin/subscriptions", tag = "admin", security(("bearer" = [])),
    params(AdminQuery),
    responses((status = 200, description = "subscriptions newest first", body = AdminPage),
        (status = 401, description = "no valid token", body = ErrorEnvelope),
        (status = 403, description = "not an admin", body = ErrorEnvelope),
        (status = 422, description = "a bad state or limit", body = ErrorEnvelope)))]
async fn admin_list(
    subs: web::Data<Subscriptions>,
    _admin: Admin,
    q: web::Query<AdminQuery>,
) -> Api<HttpResponse> {
    let limit = backend_common::page_limit(q.limit)?;
    let page = subs
        .admin_list(
            q.state.as_deref(),
            q.plan.as_deref(),
            q.cursor.as_deref(),
            limit,
        )
        .await?;
    Ok(HttpResponse::Ok().json(page))
}

#[utoipa::path(post, path = "/api/admin/subscriptions/{user_id}/grant", tag = "admin", security(("bearer" = [])),
    params(("user_id" = String, Path, description = "the user given the plan (personally)")),
    request_body = GrantRequest,
    responses((status = 200, description = "the user's subscription: the plan until `until`, no invoice", body = SubscriptionView),
        (status = 401, description = "no valid token", body = ErrorEnvelope),
        (status = 403, description = "not an admin", body = ErrorEnvelope),
        (status = 404, description = "no such user", body = ErrorEnvelope),
        (status = 422, description = "not a paid plan, or `until` not in the next 5 years", body = ErrorEnvelope),
        (status = 503, description = "the users service is unavailable", body = ErrorEnvelope)))]
async fn admin_grant(
    subs: web::Data<Subscriptions>,
    admin: Admin,
    user_id: web::Path<String>,
    body: Json<GrantRequest>,
) -> Api<HttpResponse> {
    Ok(HttpResponse::Ok().json(subs.grant(&admin.0, &user_id, &body.0).await?))
}

#[utoipa::path(post, path = "/internal/usage", tag = "internal", security(("service" = [])),
    request_body = UsageBatch,
    responses((status = 200, description = "the batch counted, or `duplicate: true` when its id was counted before (nothing added)", body = Ingested),
        (status = 400, description = "a malformed body", body = ErrorEnvelope),
        (status = 401, description = "no valid service token", body = ErrorEnvelope),
        (status = 403, description = "a service other than the gateway", body = ErrorEnvelope),
        (status = 413, description = "a body over 32 MiB", body = ErrorEnvelope),
        (status = 422, description = "a bad row", body = ErrorEnvelope)))]
async fn internal_usage(
    subs: web::Data<Subscriptions>,
    caller: ServiceCaller,
    body: Json<UsageBatch>,
) -> Api<HttpResponse> {
    Ok(HttpResponse::Ok().json(subs.ingest_usage(&caller.service, &body.0).await?))
}

/// A report's range.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct UsageQuery {
    /// First day, `YYYY-MM-DD` in the business time zone (default: the
    /// first of this month).
    from: Option<String>,
    /// Last day, inclusive (default: today).
    to: Option<String>,
    /// `day` (default) or `month`.
    granularity: Option<String>,
}

impl UsageQuery {
    fn range(&self) -> Range {
        Range {
            from: self.from.clone(),
            to: self.to.clone(),
            granularity: self.granularity.clone(),
        }
    }
}

#[utoipa::path(get, path = "/api/subscriptions/usage", tag = "usage", security(("bearer" = [])),
    params(UsageQuery),
    responses((status = 200, description = "the requests of the token's subject per route and day (or month), an organization's members' shares (only your own unless you are its owner or admin), the monthly quota used, left and projected", body = UsageReport),
        (status = 401, description = "no valid token", body = ErrorEnvelope),
        (status = 422, description = "a bad date, range or granularity", body = ErrorEnvelope)))]
async fn usage(
    subs: web::Data<Subscriptions>,
    user: AuthUser,
    q: web::Query<UsageQuery>,
) -> Api<HttpResponse> {
    let subject = user.0.subject();
    let only_member =
        (user.0.tenant.is_some() && !user.0.is_tenant_admin()).then_some(user.0.user_id.as_str());
    let report = subs.usage_report(&subject, &q.range(), only_member).await?;
    Ok(HttpResponse::Ok().json(report))
}

/// Whose usage an admin reads, and the range.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct AdminUsageQuery {
    /// A user's personal usage.
    user_id: Option<String>,
    /// An organization's usage (with every member's share).
    organization_id: Option<String>,
    /// First day, `YYYY-MM-DD` (default: the first of this month).
    from: Option<String>,
    /// Last day, inclusive (default: today).
    to: Option<String>,
    /// `day` (default) or `month`.
    granularity: Option<String>,
}

#[utoipa::path(get, path = "/api/admin/subscriptions/usage", tag = "admin", security(("bearer" = [])),
    params(AdminUsageQuery),
    responses((status = 200, description = "the usage report of the user or organization named", body = UsageReport),
        (status = 401, description = "no valid token", body = ErrorEnvelope),
        (status = 403, description = "not an admin", body = ErrorEnvelope),
        (status = 422, description = "not exactly one of user_id and organization_id; a bad date, range or granularity", body = ErrorEnvelope)))]
async fn admin_usage(
    subs: web::Data<Subscriptions>,
    _admin: Admin,
    q: web::Query<AdminUsageQuery>,
) -> Api<HttpResponse> {
    let q = q.into_inner();
    let subject = match (q.user_id, q.organization_id) {
        (Some(u), None) if !u.is_empty() => Subject::User(u),
        (None, Some(o)) if !o.is_empty() => Subject::Organization(o),
        _ => {
            return Err(ApiError::validation(vec![FieldError::new(
                "user_id",
                "give exactly one of user_id and organization_id",
            )]))
        }
    };
    let range = Range {
        from: q.from,
        to: q.to,
        granularity: q.granularity,
    };
    Ok(HttpResponse::Ok().json(subs.usage_report(&subject, &range, None).await?))
}

/// The range and size of a top-N.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct TopQuery {
    /// First day, `YYYY-MM-DD` (default: the first of this month).
    from: Option<String>,
    /// Last day, inclusive (default: today).
    to: Option<String>,
    /// How many users, 1-100 (default 20).
    limit: Option<i64>,
}

#[utoipa::path(get, path = "/api/admin/subscriptions/usage/top", tag = "admin", security(("bearer" = [])),
    params(TopQuery),
    responses((status = 200, description = "the users with the most requests in the range, most first", body = TopUsers),
        (status = 401, description = "no valid token", body = ErrorEnvelope),
        (status = 403, description = "not an admin", body = ErrorEnvelope),
        (status = 422, description = "a bad date, range or limit", body = ErrorEnvelope)))]
async fn admin_top(
    subs: web::Data<Subscriptions>,
    _admin: Admin,
    q: web::Query<TopQuery>,
) -> Api<HttpResponse> {
    let limit = backend_common::page_limit(q.limit)?;
    let range = Range {
        from: q.from.clone(),
        to: q.to.clone(),
        granularity: None,
    };
    Ok(HttpResponse::Ok().json(subs.top_users(&range, limit).await?))
}

/// The OpenAPI document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "tiergate subscriptions",
        description = "Plans in rupiah, each subject's subscription, checkouts billed through the billing service."
    ),
    paths(
        plans,
        me,
        checkout,
        downgrade,
        cancel,
        resume,
        admin_list,
        admin_grant,
        usage,
        admin_usage,
        admin_top,
        internal_usage
    ),
    components(schemas(
        PlanList,
        PlanView,
        Price,
        SubscriptionView,
        SubjectView,
        Renewal,
        Change,
        Line,
        InvoiceRef,
        CheckoutRequest,
        DowngradeRequest,
        GrantRequest,
        AdminPage,
        AdminSubscription,
        Scheduled,
        UsageReport,
        UsagePeriod,
        RouteCount,
        MemberShare,
        Quota,
        TopUsers,
        TopUser,
        UsageBatch,
        UsageRow,
        UsageSubject,
        Ingested,
        crate::tiers::TierLimits,
        crate::config::Cycle
    ))
)]
pub struct SubscriptionsApi;

/// Registers the routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/api/subscriptions/plans", web::get().to(plans))
        .route("/api/subscriptions/me", web::get().to(me))
        .route("/api/subscriptions/checkout", web::post().to(checkout))
        .route("/api/subscriptions/downgrade", web::post().to(downgrade))
        .route("/api/subscriptions/cancel", web::post().to(cancel))
        .route("/api/subscriptions/resume", web::post().to(resume))
        .route("/api/subscriptions/usage", web::get().to(usage))
        .route("/api/admin/subscriptions", web::get().to(admin_list))
        .route("/api/admin/subscriptions/usage", web::get().to(admin_usage))
        .route(
            "/api/admin/subscriptions/usage/top",
            web::get().to(admin_top),
        )
        .service(
            web::resource("/internal/usage")
                .app_data(AllowedCallers(&["gateway"]))
                .app_data(BodyLimit(USAGE_BODY_LIMIT))
                .route(web::post().to(internal_usage)),
        )
        .route(
            "/api/admin/subscriptions/{user_id}/grant",
            web::post().to(admin_grant),
        );
}
