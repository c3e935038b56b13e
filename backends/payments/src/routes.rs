//! HTTP handlers of payments: the payer's payments, Midtrans's webhook,
//! the admin's view and refunds.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, OpenApi, ToSchema};

use backend_common::error::ErrorEnvelope;
use backend_common::json::Json;
use backend_common::user_auth::{Admin, AuthUser};
use backend_common::ApiError;

use crate::core::{views, NewPayment, Payment, Payments, Refund, RefundRequest};

type Api<T> = Result<T, ApiError>;

#[utoipa::path(post, path = "/api/payments", tag = "payments", security(("bearer" = [])),
    params(("Idempotency-Key" = String, Header, description = "1-200 characters; a retry with it never charges twice (answers are kept 48h)")),
    request_body = NewPayment,
    responses((status = 201, description = "the payment, with what the customer needs to pay", body = Payment),
        (status = 200, description = "the same method's open payment of this invoice, or this key's answer replayed (`Idempotent-Replayed: true`)", body = Payment),
        (status = 400, description = "no Idempotency-Key", body = ErrorEnvelope),
        (status = 404, description = "no such invoice of the caller's subject", body = ErrorEnvelope),
        (status = 409, description = "the invoice is paid or void; this key with another request; the same key in progress", body = ErrorEnvelope),
        (status = 422, description = "a bad method or token; Midtrans refused the charge (its message kept)", body = ErrorEnvelope),
        (status = 502, description = "Midtrans did not answer: send the same request again", body = ErrorEnvelope),
        (status = 503, description = "payments are disabled (no Midtrans key), or billing is unavailable", body = ErrorEnvelope)))]
async fn create(
    payments: web::Data<Payments>,
    user: AuthUser,
    req: HttpRequest,
    body: Json<NewPayment>,
) -> Api<HttpResponse> {
    let key = backend_common::idempotency_key(&req, "charge twice")?;
    user.0.acts_for_subject("pays its invoices")?;
    let answered = payments.create(&user.0, &key, &body.0).await?;
    let mut res = HttpResponse::build(
        actix_web::http::StatusCode::from_u16(answered.status)
            .unwrap_or(actix_web::http::StatusCode::OK),
    );
    if answered.replayed {
        res.insert_header(("Idempotent-Replayed", "true"));
    }
    Ok(res.content_type("application/json").body(answered.body))
}

/// `?invoice_id=`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// Only this invoice's payments.
    invoice_id: Option<String>,
}

/// A list of payments.
#[derive(Serialize, ToSchema)]
pub struct PaymentList {
    /// Newest first (at most 100).
    pub payments: Vec<Payment>,
}

#[utoipa::path(get, path = "/api/payments", tag = "payments", security(("bearer" = [])),
    params(ListQuery),
    responses((status = 200, description = "the caller's subject's payments, newest first", body = PaymentList)))]
async fn list(
    payments: web::Data<Payments>,
    user: AuthUser,
    q: web::Query<ListQuery>,
) -> Api<HttpResponse> {
    let rows = payments
        .list_for(&user.subject(), q.invoice_id.as_deref())
        .await?;
    Ok(HttpResponse::Ok().json(PaymentList {
        payments: views(&payments, &rows),
    }))
}

#[utoipa::path(get, path = "/api/payments/{id}", tag = "payments", security(("bearer" = [])),
    params(("id" = String, Path, description = "payment id")),
    responses((status = 200, body = Payment),
        (status = 404, description = "no such payment of the caller's subject", body = ErrorEnvelope)))]
async fn get(
    payments: web::Data<Payments>,
    user: AuthUser,
    id: web::Path<String>,
) -> Api<HttpResponse> {
    let p = payments.get_for(&user.subject(), &id).await?;
    Ok(HttpResponse::Ok().json(payments.view(&p)))
}

#[utoipa::path(post, path = "/api/payments/{id}/cancel", tag = "payments", security(("bearer" = [])),
    params(("id" = String, Path, description = "payment id")),
    responses((status = 200, description = "cancelled at Midtrans", body = Payment),
        (status = 404, description = "no such payment of the caller's subject", body = ErrorEnvelope),
        (status = 409, description = "not pending (paid, expired, …)", body = ErrorEnvelope),
        (status = 502, description = "Midtrans did not answer", body = ErrorEnvelope)))]
async fn cancel(
    payments: web::Data<Payments>,
    user: AuthUser,
    id: web::Path<String>,
) -> Api<HttpResponse> {
    user.0.acts_for_subject("cancels its payments")?;
    let p = payments.cancel(&user.subject(), &id).await?;
    Ok(HttpResponse::Ok().json(payments.view(&p)))
}

/// `GET /api/payments/config`: what the frontend needs.
#[derive(Serialize, ToSchema)]
pub struct FrontendConfig {
    /// Whether payments can be made (a server key is configured).
    pub enabled: bool,
    /// `sandbox` or `production`.
    pub environment: String,
    /// Midtrans's client key (public) for Snap.js and card tokens.
    pub client_key: Option<String>,
    /// Snap.js for this environment.
    pub snap_js_url: String,
    /// Card tokens: `GET {api_url}/v2/token?client_key=…`.
    pub api_url: String,
}

#[utoipa::path(get, path = "/api/payments/config", tag = "payments", security(("bearer" = [])),
    responses((status = 200, body = FrontendConfig)))]
async fn frontend_config(payments: web::Data<Payments>, _user: AuthUser) -> HttpResponse {
    let m = &payments.config.midtrans;
    HttpResponse::Ok().json(FrontendConfig {
        enabled: payments.midtrans.is_some(),
        environment: m.environment.as_str().to_owned(),
        client_key: m.client_key.as_ref().map(|k| k.expose().clone()),
        snap_js_url: m.snap_js(),
        api_url: m.api_base().to_owned(),
    })
}

/// What the webhook answers.
#[derive(Serialize, ToSchema)]
pub struct WebhookAnswer {
    /// `ok`.
    pub status: &'static str,
    /// What it did: `moved:settled`, `duplicate`, `stale`,
    /// `amount_mismatch`, `unknown_order`, `unconfirmed`, …
    pub outcome: String,
}

#[utoipa::path(post, path = "/api/payments/webhooks/midtrans", tag = "webhooks",
    request_body(content = Object, description = "a Midtrans HTTP notification"),
    responses((status = 200, description = "verified and stored; acted on what Midtrans confirms", body = WebhookAnswer),
        (status = 400, description = "not a JSON object", body = ErrorEnvelope),
        (status = 401, description = "a missing or bad signature_key: nothing changes", body = ErrorEnvelope),
        (status = 503, description = "payments are disabled", body = ErrorEnvelope)))]
async fn webhook(payments: web::Data<Payments>, body: web::Bytes) -> Api<HttpResponse> {
    let outcome = payments.webhook(&body).await?;
    Ok(HttpResponse::Ok().json(WebhookAnswer {
        status: "ok",
        outcome,
    }))
}

/// `GET /api/admin/payments?invoice_id=`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct AdminQuery {
    /// The invoice whose payments to list.
    invoice_id: String,
}

#[utoipa::path(get, path = "/api/admin/payments", tag = "admin", security(("bearer" = [])),
    params(AdminQuery),
    responses((status = 200, description = "every attempt to pay the invoice, newest first", body = PaymentList)))]
async fn admin_list(
    payments: web::Data<Payments>,
    _admin: Admin,
    q: web::Query<AdminQuery>,
) -> Api<HttpResponse> {
    let rows = payments.admin_list(&q.invoice_id).await?;
    Ok(HttpResponse::Ok().json(PaymentList {
        payments: views(&payments, &rows),
    }))
}

/// A payment with its refunds and every notification received.
#[derive(Serialize, ToSchema)]
pub struct PaymentDetail {
    /// The payment.
    pub payment: Payment,
    /// Its refunds.
    pub refunds: Vec<Refund>,
    /// Its notifications as received (signature left out), with what each did.
    #[schema(value_type = Vec<Object>)]
    pub notifications: Vec<serde_json::Value>,
}

#[utoipa::path(get, path = "/api/admin/payments/{id}", tag = "admin", security(("bearer" = [])),
    params(("id" = String, Path, description = "payment id")),
    responses((status = 200, body = PaymentDetail),
        (status = 404, description = "no such payment", body = ErrorEnvelope)))]
async fn admin_get(
    payments: web::Data<Payments>,
    _admin: Admin,
    id: web::Path<String>,
) -> Api<HttpResponse> {
    let (p, refunds, notifications) = payments.admin_get(&id).await?;
    Ok(HttpResponse::Ok().json(PaymentDetail {
        payment: payments.view(&p),
        refunds: refunds.into_iter().map(Refund::from).collect(),
        notifications,
    }))
}

#[utoipa::path(post, path = "/api/admin/payments/{id}/refund", tag = "admin", security(("bearer" = [])),
    params(("id" = String, Path, description = "payment id"),
        ("Idempotency-Key" = String, Header, description = "1-200 characters; the same key never refunds twice")),
    request_body = RefundRequest,
    responses((status = 201, description = "refunded (at Midtrans, or recorded as a manual bank refund)", body = Refund),
        (status = 200, description = "this key's refund, replayed", body = Refund),
        (status = 404, description = "no such payment", body = ErrorEnvelope),
        (status = 409, description = "nothing to refund; part of an unsettled card payment; this key with another refund", body = ErrorEnvelope),
        (status = 422, description = "more than is left; a virtual account or bill (manual_refund_required); Midtrans refused", body = ErrorEnvelope),
        (status = 502, description = "Midtrans did not answer: send the same request again", body = ErrorEnvelope)))]
async fn admin_refund(
    payments: web::Data<Payments>,
    admin: Admin,
    req: HttpRequest,
    id: web::Path<String>,
    body: Json<RefundRequest>,
) -> Api<HttpResponse> {
    let key = backend_common::idempotency_key(&req, "refund twice")?;
    let (fresh, refund) = payments
        .refund(&admin.0.user_id, &id, &key, &body.0)
        .await?;
    Ok(if fresh {
        HttpResponse::Created().json(refund)
    } else {
        HttpResponse::Ok()
            .insert_header(("Idempotent-Replayed", "true"))
            .json(refund)
    })
}

/// The OpenAPI document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "tiergate payments",
        description = "Payments through Midtrans (Snap and Core API): attempts, verified webhooks, an order-safe state machine, refunds."
    ),
    paths(
        create,
        list,
        get,
        cancel,
        frontend_config,
        webhook,
        admin_list,
        admin_get,
        admin_refund
    ),
    components(schemas(
        Payment,
        PaymentList,
        PaymentDetail,
        NewPayment,
        Refund,
        RefundRequest,
        FrontendConfig,
        WebhookAnswer,
        crate::charge::Instructions
    ))
)]
pub struct PaymentsApi;

/// Registers the routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/api/payments")
            .route(web::get().to(list))
            .route(web::post().to(create)),
    )
    .route("/api/payments/config", web::get().to(frontend_config))
    .route("/api/payments/webhooks/midtrans", web::post().to(webhook))
    .route("/api/payments/{id}", web::get().to(get))
    .route("/api/payments/{id}/cancel", web::post().to(cancel))
    .route("/api/admin/payments", web::get().to(admin_list))
    .route("/api/admin/payments/{id}", web::get().to(admin_get))
    .route(
        "/api/admin/payments/{id}/refund",
        web::post().to(admin_refund),
    );
}
