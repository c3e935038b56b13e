//! HTTP handlers of notifications: the caller's preferences and
//! notifications, Telegram linking and the bots' webhooks, Twilio's
//! delivery reports, and the admins' views (search, resend, bots).

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use utoipa::{IntoParams, OpenApi};

use backend_common::error::ErrorEnvelope;
use backend_common::json::Json;
use backend_common::user_auth::{Admin, AuthUser};
use backend_common::ApiError;

use crate::core::{BotView, Link, LinkCode, NotificationView, Notifications};
use crate::prefs::{Channel, Preferences, QuietHours};
use crate::storage::JobFilter;

type Api<T> = Result<T, ApiError>;

#[utoipa::path(get, path = "/api/notifications/preferences", tag = "preferences", security(("bearer" = [])),
    responses((status = 200, description = "the caller's preferences (defaults where never set)", body = Preferences),
        (status = 401, description = "no valid token", body = ErrorEnvelope)))]
async fn get_preferences(n: web::Data<Notifications>, user: AuthUser) -> Api<HttpResponse> {
    Ok(HttpResponse::Ok().json(n.preferences(&user.0).await?))
}

#[utoipa::path(put, path = "/api/notifications/preferences", tag = "preferences", security(("bearer" = [])),
    request_body = Preferences,
    responses((status = 200, description = "the preferences as stored (the phone in E.164)", body = Preferences),
        (status = 400, description = "a malformed body", body = ErrorEnvelope),
        (status = 401, description = "no valid token", body = ErrorEnvelope),
        (status = 422, description = "a field is invalid (each named)", body = ErrorEnvelope)))]
async fn put_preferences(
    n: web::Data<Notifications>,
    user: AuthUser,
    body: Json<Preferences>,
) -> Api<HttpResponse> {
    Ok(HttpResponse::Ok().json(n.set_preferences(&user.0, &body.0).await?))
}

/// Paging of a list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct Page {
    /// At most this many (1–200, default 50).
    pub limit: Option<i64>,
    /// Only those created before this Unix ms (the last `created_at` of
    /// the previous page).
    pub before: Option<i64>,
}

fn limit(p: Option<i64>) -> Api<i64> {
    match p {
        None => Ok(50),
        Some(l) if (1..=200).contains(&l) => Ok(l),
        Some(_) => Err(ApiError::validation(vec![backend_common::FieldError::new(
            "limit", "1 to 200",
        )])),
    }
}

/// `GET /api/notifications` answer.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct NotificationList {
    /// Newest first.
    pub notifications: Vec<NotificationView>,
}

#[utoipa::path(get, path = "/api/notifications", tag = "notifications", security(("bearer" = [])),
    params(Page),
    responses((status = 200, description = "the caller's recent notifications, newest first", body = NotificationList),
        (status = 400, description = "a malformed query", body = ErrorEnvelope),
        (status = 401, description = "no valid token", body = ErrorEnvelope),
        (status = 422, description = "a bad limit", body = ErrorEnvelope)))]
async fn mine(
    n: web::Data<Notifications>,
    user: AuthUser,
    page: web::Query<Page>,
) -> Api<HttpResponse> {
    let f = JobFilter {
        user_id: Some(&user.user_id),
        before: page.before,
        limit: limit(page.limit)?,
        ..JobFilter::default()
    };
    Ok(HttpResponse::Ok().json(NotificationList {
        notifications: n.list(&f).await?,
    }))
}

/// `POST /api/notifications/telegram/link` body.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LinkRequest {
    /// A registered bot; unset: the active organization's bot, else the
    /// default bot.
    pub bot_id: Option<String>,
}

#[utoipa::path(post, path = "/api/notifications/telegram/link", tag = "telegram", security(("bearer" = [])),
    request_body(content = LinkRequest, description = "optional"),
    responses((status = 201, description = "a one-time code and the deep link that sends `/start <code>` to the bot", body = LinkCode),
        (status = 401, description = "no valid token", body = ErrorEnvelope),
        (status = 404, description = "no such bot", body = ErrorEnvelope),
        (status = 503, description = "no bot configured, or Telegram not reached yet", body = ErrorEnvelope)))]
async fn link(
    n: web::Data<Notifications>,
    user: AuthUser,
    body: Option<Json<LinkRequest>>,
) -> Api<HttpResponse> {
    let body = body.map(|b| b.0).unwrap_or_default();
    Ok(HttpResponse::Created().json(n.link_code(&user.0, body.bot_id.as_deref()).await?))
}

/// `GET /api/notifications/telegram/links` answer.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct LinkList {
    /// The bots the caller's chat is linked with.
    pub links: Vec<Link>,
}

#[utoipa::path(get, path = "/api/notifications/telegram/links", tag = "telegram", security(("bearer" = [])),
    responses((status = 200, body = LinkList), (status = 401, description = "no valid token", body = ErrorEnvelope)))]
async fn links(n: web::Data<Notifications>, user: AuthUser) -> Api<HttpResponse> {
    Ok(HttpResponse::Ok().json(LinkList {
        links: n.links(&user.0).await?,
    }))
}

#[utoipa::path(delete, path = "/api/notifications/telegram/links/{bot_id}", tag = "telegram", security(("bearer" = [])),
    params(("bot_id" = String, Path, description = "the bot (`default` for the default bot)")),
    responses((status = 204, description = "unlinked"), (status = 401, description = "no valid token", body = ErrorEnvelope),
        (status = 404, description = "not linked to that bot", body = ErrorEnvelope)))]
async fn unlink(
    n: web::Data<Notifications>,
    user: AuthUser,
    bot: web::Path<String>,
) -> Api<HttpResponse> {
    n.unlink(&user.0, &bot).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// The largest update Telegram sends that we read.
const UPDATE_LIMIT: usize = 1024 * 1024;

#[utoipa::path(post, path = "/api/notifications/telegram/webhook/{bot_id}", tag = "telegram",
    params(("bot_id" = String, Path, description = "the bot"),
        ("X-Telegram-Bot-Api-Secret-Token" = String, Header, description = "the bot's webhook secret")),
    request_body(content = Object, description = "a Telegram Update"),
    responses((status = 200, description = "taken (also an update that is not a command)"),
        (status = 401, description = "no or a wrong secret token", body = ErrorEnvelope),
        (status = 404, description = "no such bot", body = ErrorEnvelope)))]
async fn webhook(
    n: web::Data<Notifications>,
    req: HttpRequest,
    bot: web::Path<String>,
    body: web::Bytes,
) -> Api<HttpResponse> {
    let Some(bot) = n.bots.get(&bot) else {
        return Err(ApiError::not_found("no such bot"));
    };
    let given = req
        .headers()
        .get("x-telegram-bot-api-secret-token")
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    if !backend_common::constant_time_eq(given, bot.secret.as_bytes()) {
        return Err(ApiError::unauthorized(
            "invalid_secret_token",
            "X-Telegram-Bot-Api-Secret-Token is missing or wrong",
        ));
    }
    // An update we cannot read is acknowledged (Telegram would resend it
    // for ever) and logged.
    match serde_json::from_slice::<teloxide::types::Update>(&body) {
        Ok(update) => n.on_update(&bot, &update).await,
        Err(e) => tracing::info!(bot = %bot.username, error = %e, "an update we do not read"),
    }
    Ok(HttpResponse::Ok().json(serde_json::json!({"ok": true})))
}

#[utoipa::path(post, path = "/api/notifications/twilio/status", tag = "sms",
    params(("X-Twilio-Signature" = String, Header, description = "base64 HMAC-SHA1 of the URL and the sorted form")),
    request_body(content = Object, content_type = "application/x-www-form-urlencoded", description = "MessageSid, MessageStatus, ErrorCode, ..."),
    responses((status = 204, description = "taken"),
        (status = 400, description = "not a form", body = ErrorEnvelope),
        (status = 403, description = "no or a wrong signature", body = ErrorEnvelope),
        (status = 503, description = "SMS is not configured", body = ErrorEnvelope)))]
async fn twilio_status(
    n: web::Data<Notifications>,
    req: HttpRequest,
    body: web::Bytes,
) -> Api<HttpResponse> {
    let Some(twilio) = &n.twilio else {
        return Err(ApiError::unavailable("SMS is not configured", 60));
    };
    let params: Vec<(String, String)> = serde_urlencoded::from_bytes(&body)
        .map_err(|_| ApiError::bad_request("invalid_form", "the body is not a form"))?;
    let sig = req
        .headers()
        .get("x-twilio-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !crate::sms::verify(
        twilio.auth_token().expose(),
        &n.status_callback_url(),
        &params,
        sig,
    ) {
        return Err(ApiError::forbidden(
            "invalid_signature",
            "X-Twilio-Signature does not match",
        ));
    }
    let field = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    tracing::debug!(
        sid = field("MessageSid"),
        status = field("MessageStatus"),
        "Twilio delivery report"
    );
    if let (Some(sid), Some(status)) = (field("MessageSid"), field("MessageStatus")) {
        n.twilio_report(sid, status, field("ErrorCode")).await?;
    }
    Ok(HttpResponse::NoContent().finish())
}

/// `GET /api/admin/notifications` query.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct Search {
    /// Only this user's.
    pub user_id: Option<String>,
    /// Only this event type's.
    pub event_type: Option<String>,
    /// Only this event's.
    pub event_id: Option<String>,
    /// Only those in this status (`dead`: the dead letters).
    pub status: Option<String>,
    /// At most this many (1–200, default 50).
    pub limit: Option<i64>,
    /// Only those created before this Unix ms.
    pub before: Option<i64>,
}

#[utoipa::path(get, path = "/api/admin/notifications", tag = "admin", security(("bearer" = [])),
    params(Search),
    responses((status = 200, body = NotificationList),
        (status = 400, description = "a malformed query", body = ErrorEnvelope),
        (status = 401, description = "no valid token", body = ErrorEnvelope),
        (status = 403, description = "not an admin", body = ErrorEnvelope),
        (status = 422, description = "a bad limit", body = ErrorEnvelope)))]
async fn search(
    n: web::Data<Notifications>,
    _admin: Admin,
    q: web::Query<Search>,
) -> Api<HttpResponse> {
    let f = JobFilter {
        user_id: q.user_id.as_deref(),
        event_type: q.event_type.as_deref(),
        event_id: q.event_id.as_deref(),
        status: q.status.as_deref(),
        before: q.before,
        limit: limit(q.limit)?,
    };
    Ok(HttpResponse::Ok().json(NotificationList {
        notifications: n.list(&f).await?,
    }))
}

#[utoipa::path(post, path = "/api/admin/notifications/{id}/resend", tag = "admin", security(("bearer" = [])),
    params(("id" = String, Path, description = "a notification")),
    responses((status = 201, description = "the new notification, queued", body = NotificationView),
        (status = 401, description = "no valid token", body = ErrorEnvelope),
        (status = 403, description = "not an admin", body = ErrorEnvelope),
        (status = 404, description = "no such notification", body = ErrorEnvelope)))]
async fn resend(
    n: web::Data<Notifications>,
    _admin: Admin,
    id: web::Path<String>,
) -> Api<HttpResponse> {
    Ok(HttpResponse::Created().json(n.resend(&id).await?))
}

/// `POST /api/admin/notifications/bots` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BotRequest {
    /// The token from @BotFather; checked with `getMe`, stored sealed,
    /// never returned or logged.
    pub token: String,
}

/// Who administers bots here: an admin (platform bots), or an
/// organization's admin (that organization's bot).
fn bot_scope(user: &backend_common::user_auth::UserClaims) -> Api<Option<String>> {
    if user.has_role("admin") {
        Ok(None)
    } else if user.is_tenant_admin() {
        Ok(user.tenant.clone())
    } else {
        Err(ApiError::forbidden(
            "forbidden",
            "bots are registered by an admin, or by an organization's owner or admin (switch to the organization first)",
        ))
    }
}

#[utoipa::path(post, path = "/api/admin/notifications/bots", tag = "admin", security(("bearer" = [])),
    request_body = BotRequest,
    responses((status = 201, description = "registered: a platform bot (admins) or the active organization's bot (its admin)", body = BotView),
        (status = 401, description = "no valid token", body = ErrorEnvelope),
        (status = 403, description = "neither an admin nor an organization's admin", body = ErrorEnvelope),
        (status = 409, description = "that bot is registered already", body = ErrorEnvelope),
        (status = 422, description = "Telegram refused the token", body = ErrorEnvelope),
        (status = 503, description = "Telegram cannot be reached", body = ErrorEnvelope)))]
async fn register_bot(
    n: web::Data<Notifications>,
    user: AuthUser,
    body: Json<BotRequest>,
) -> Api<HttpResponse> {
    let scope = bot_scope(&user.0)?;
    let for_tenant = scope.is_some();
    Ok(HttpResponse::Created().json(n.register_bot(&user.0, &body.0.token, for_tenant).await?))
}

/// `GET /api/admin/notifications/bots` answer.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct BotList {
    /// The bots the caller administers.
    pub bots: Vec<BotView>,
}

#[utoipa::path(get, path = "/api/admin/notifications/bots", tag = "admin", security(("bearer" = [])),
    responses((status = 200, body = BotList),
        (status = 401, description = "no valid token", body = ErrorEnvelope),
        (status = 403, description = "neither an admin nor an organization's admin", body = ErrorEnvelope)))]
async fn list_bots(n: web::Data<Notifications>, user: AuthUser) -> Api<HttpResponse> {
    let scope = bot_scope(&user.0)?;
    Ok(HttpResponse::Ok().json(BotList {
        bots: n.list_bots(scope.as_deref()).await?,
    }))
}

#[utoipa::path(delete, path = "/api/admin/notifications/bots/{id}", tag = "admin", security(("bearer" = [])),
    params(("id" = String, Path, description = "a registered bot")),
    responses((status = 204, description = "removed, with its links"),
        (status = 401, description = "no valid token", body = ErrorEnvelope),
        (status = 403, description = "neither an admin nor an organization's admin", body = ErrorEnvelope),
        (status = 404, description = "no such bot (of the caller's)", body = ErrorEnvelope)))]
async fn delete_bot(
    n: web::Data<Notifications>,
    user: AuthUser,
    id: web::Path<String>,
) -> Api<HttpResponse> {
    let scope = bot_scope(&user.0)?;
    n.delete_bot(&id, scope.as_deref()).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// Registers the routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/api/notifications/preferences")
            .route(web::get().to(get_preferences))
            .route(web::put().to(put_preferences)),
    )
    .route("/api/notifications", web::get().to(mine))
    .route("/api/notifications/telegram/link", web::post().to(link))
    .route("/api/notifications/telegram/links", web::get().to(links))
    .route(
        "/api/notifications/telegram/links/{bot_id}",
        web::delete().to(unlink),
    )
    .service(
        web::resource("/api/notifications/telegram/webhook/{bot_id}")
            .app_data(web::PayloadConfig::new(UPDATE_LIMIT))
            .route(web::post().to(webhook)),
    )
    .route(
        "/api/notifications/twilio/status",
        web::post().to(twilio_status),
    )
    .route("/api/admin/notifications", web::get().to(search))
    .route(
        "/api/admin/notifications/{id}/resend",
        web::post().to(resend),
    )
    .service(
        web::resource("/api/admin/notifications/bots")
            .route(web::get().to(list_bots))
            .route(web::post().to(register_bot)),
    )
    .route(
        "/api/admin/notifications/bots/{id}",
        web::delete().to(delete_bot),
    );
}

/// The notifications service's OpenAPI document.
#[derive(OpenApi)]
#[openapi(
    info(title = "tiergate notifications", description = "Telegram (many bots), e-mail and SMS behind one durable queue; preferences; templates; fallback"),
    paths(get_preferences, put_preferences, mine, link, links, unlink, webhook, twilio_status, search, resend, register_bot, list_bots, delete_bot),
    components(schemas(Preferences, QuietHours, Channel, NotificationList, NotificationView, LinkRequest, LinkCode, LinkList, Link, BotRequest, BotList, BotView)),
    tags((name = "preferences"), (name = "notifications"), (name = "telegram"), (name = "sms"), (name = "admin"))
)]
pub struct NotificationsApi;
