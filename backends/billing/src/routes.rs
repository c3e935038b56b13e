//! HTTP handlers of billing: the buyer's invoices, the admin's tools, the
//! internal API of subscriptions and payments.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::json;
use utoipa::{OpenApi, ToSchema};

use backend_common::json::Json;
use backend_common::service_auth::{AllowedCallers, ServiceCaller};
use backend_common::user_auth::{Admin, AuthUser};
use backend_common::ApiError;

use crate::core::{Billing, CreditNote, Invoice, NewInvoice, NewLine};
use crate::reports;
use crate::storage::Search;

type Api<T> = Result<T, ApiError>;

/// Who creates invoices: subscriptions (checkout, renewals).
const CREATORS: &[&str] = &["subscriptions"];
/// Who reads one: payments (the amount due), subscriptions, notifications
/// (the PDF to attach).
const READERS: &[&str] = &["payments", "subscriptions", "notifications"];

/// `?limit=&cursor=`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Page {
    limit: Option<i64>,
    cursor: Option<String>,
}

fn limit(l: Option<i64>) -> Api<i64> {
    match l.unwrap_or(20) {
        l @ 1..=100 => Ok(l),
        _ => Err(ApiError::validation(vec![backend_common::FieldError::new(
            "limit",
            "must be 1 to 100",
        )])),
    }
}

fn pdf_response((name, bytes): (String, Vec<u8>)) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/pdf")
        .insert_header((
            header::CONTENT_DISPOSITION,
            format!("inline; filename=\"{name}\""),
        ))
        .insert_header((header::CACHE_CONTROL, "private, no-cache"))
        .body(bytes)
}

fn page(invoices: Vec<Invoice>, next: Option<String>) -> HttpResponse {
    HttpResponse::Ok().json(json!({"invoices": invoices, "next_cursor": next}))
}

async fn my_invoices(
    billing: web::Data<Billing>,
    user: AuthUser,
    q: web::Query<Page>,
) -> Api<HttpResponse> {
    let (invoices, next) = billing
        .list_for(&user.subject(), q.cursor.as_deref(), limit(q.limit)?)
        .await?;
    Ok(page(invoices, next))
}

async fn my_invoice(
    billing: web::Data<Billing>,
    user: AuthUser,
    id: web::Path<String>,
) -> Api<HttpResponse> {
    Ok(HttpResponse::Ok().json(billing.get_for(&user.subject(), &id).await?))
}

async fn my_invoice_pdf(
    billing: web::Data<Billing>,
    user: AuthUser,
    id: web::Path<String>,
) -> Api<HttpResponse> {
    Ok(pdf_response(billing.pdf(Some(&user.subject()), &id).await?))
}

async fn my_credit_note_pdf(
    billing: web::Data<Billing>,
    user: AuthUser,
    id: web::Path<String>,
) -> Api<HttpResponse> {
    Ok(pdf_response(
        billing.credit_note_pdf(Some(&user.subject()), &id).await?,
    ))
}

/// `GET /api/admin/invoices` query.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminQuery {
    status: Option<String>,
    subject_id: Option<String>,
    number: Option<String>,
    email: Option<String>,
    limit: Option<i64>,
    cursor: Option<String>,
}

async fn admin_list(
    billing: web::Data<Billing>,
    _admin: Admin,
    q: web::Query<AdminQuery>,
) -> Api<HttpResponse> {
    let q = q.into_inner();
    let search = Search {
        status: q.status,
        subject_id: q.subject_id,
        number: q.number,
        email: q.email.map(|e| e.to_lowercase()),
    };
    let (invoices, next) = billing
        .search(&search, q.cursor.as_deref(), limit(q.limit)?)
        .await?;
    Ok(page(invoices, next))
}

async fn admin_get(
    billing: web::Data<Billing>,
    _admin: Admin,
    id: web::Path<String>,
) -> Api<HttpResponse> {
    Ok(HttpResponse::Ok().json(billing.get(&id).await?))
}

async fn admin_pdf(
    billing: web::Data<Billing>,
    _admin: Admin,
    id: web::Path<String>,
) -> Api<HttpResponse> {
    Ok(pdf_response(billing.pdf(None, &id).await?))
}

/// `POST /api/admin/invoices`: a manual invoice; the `Idempotency-Key`
/// header is its reference (`{"kind": "manual", "key": …}`).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ManualInvoice {
    /// Who is billed.
    #[schema(value_type = Object)]
    pub subject: backend_common::user_auth::Subject,
    /// The person billed (name and e-mail printed).
    pub user_id: String,
    /// The lines.
    pub lines: Vec<NewLine>,
    /// Due (Unix ms).
    #[serde(default)]
    pub due_at: Option<i64>,
    /// Keep it a draft.
    #[serde(default)]
    pub draft: bool,
}

fn idempotency_key(req: &HttpRequest) -> Api<String> {
    let key = req
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .unwrap_or_default();
    if key.is_empty() || key.len() > 200 {
        return Err(ApiError::bad_request(
            "idempotency_key_required",
            "send an Idempotency-Key header (1 to 200 characters) so a retry cannot bill twice",
        ));
    }
    Ok(key.to_owned())
}

fn created(invoice: Invoice, fresh: bool) -> HttpResponse {
    if fresh {
        HttpResponse::Created().json(invoice)
    } else {
        HttpResponse::Ok()
            .insert_header(("Idempotent-Replayed", "true"))
            .json(invoice)
    }
}

async fn admin_create(
    billing: web::Data<Billing>,
    _admin: Admin,
    req: HttpRequest,
    body: Json<ManualInvoice>,
) -> Api<HttpResponse> {
    let key = idempotency_key(&req)?;
    let m = body.0;
    let new = NewInvoice {
        reference: json!({"kind": "manual", "key": key}),
        subject: m.subject,
        user_id: m.user_id,
        lines: m.lines,
        plan: None,
        cycle: None,
        period_start: None,
        period_end: None,
        recurring_price: None,
        due_at: m.due_at,
        draft: m.draft,
    };
    let (invoice, fresh) = billing.create(&new).await?;
    Ok(created(invoice, fresh))
}

async fn admin_issue(
    billing: web::Data<Billing>,
    _admin: Admin,
    id: web::Path<String>,
) -> Api<HttpResponse> {
    Ok(HttpResponse::Ok().json(billing.issue(&id).await?))
}

/// `POST …/void`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VoidRequest {
    /// Why, 1–500 characters.
    pub reason: String,
}

async fn admin_void(
    billing: web::Data<Billing>,
    _admin: Admin,
    id: web::Path<String>,
    body: Json<VoidRequest>,
) -> Api<HttpResponse> {
    Ok(HttpResponse::Ok().json(billing.void(&id, &body.0.reason).await?))
}

/// `POST /api/admin/invoices/{id}/credit-notes`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreditRequest {
    /// What the buyer gets back, PPN included, whole rupiah.
    pub amount: i64,
    /// Why, 1–500 characters.
    pub reason: String,
}

async fn admin_credit(
    billing: web::Data<Billing>,
    Admin(admin): Admin,
    id: web::Path<String>,
    body: Json<CreditRequest>,
) -> Api<HttpResponse> {
    let note: CreditNote = billing
        .credit(&id, body.0.amount, &body.0.reason, &admin.user_id)
        .await?;
    Ok(HttpResponse::Created().json(note))
}

async fn admin_credit_note_pdf(
    billing: web::Data<Billing>,
    _admin: Admin,
    id: web::Path<String>,
) -> Api<HttpResponse> {
    Ok(pdf_response(billing.credit_note_pdf(None, &id).await?))
}

async fn admin_overpayments(billing: web::Data<Billing>, _admin: Admin) -> Api<HttpResponse> {
    let list: Vec<_> = billing
        .overpayments()
        .await?
        .into_iter()
        .map(|o| {
            json!({"id": o.id, "invoice_id": o.invoice_id, "payment_id": o.payment_id,
                   "amount": o.amount, "status": o.status, "note": o.note,
                   "created_at": o.created_at, "resolved_at": o.resolved_at})
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({"overpayments": list})))
}

/// `POST /api/admin/billing/overpayments/{id}`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResolveRequest {
    /// `refunded` or `credited`.
    pub status: String,
    /// What was done.
    #[serde(default)]
    pub note: Option<String>,
}

async fn admin_resolve(
    billing: web::Data<Billing>,
    _admin: Admin,
    id: web::Path<String>,
    body: Json<ResolveRequest>,
) -> Api<HttpResponse> {
    billing
        .resolve_overpayment(&id, &body.0.status, body.0.note.as_deref())
        .await?;
    Ok(HttpResponse::NoContent().finish())
}

/// `GET /api/admin/billing/reconciliation?date=YYYY-MM-DD` (default:
/// yesterday in the business zone).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReconQuery {
    date: Option<String>,
}

async fn admin_reconciliation(
    billing: web::Data<Billing>,
    _admin: Admin,
    q: web::Query<ReconQuery>,
) -> Api<HttpResponse> {
    let date = match &q.date {
        Some(d) => reports::parse_date("date", d)?,
        None => billing
            .today()?
            .yesterday()
            .map_err(|e| ApiError::internal(&e))?,
    };
    Ok(HttpResponse::Ok().json(billing.reconciliation(date).await?))
}

/// `GET /api/admin/billing/revenue?from=&to=&group=month|plan` (default:
/// this month so far, per month).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevenueQuery {
    from: Option<String>,
    to: Option<String>,
    group: Option<String>,
}

fn wants_csv(req: &HttpRequest) -> bool {
    req.headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.split(';').next().unwrap_or("").trim() == "text/csv")
        })
}

async fn admin_revenue(
    billing: web::Data<Billing>,
    _admin: Admin,
    req: HttpRequest,
    q: web::Query<RevenueQuery>,
) -> Api<HttpResponse> {
    let today = billing.today()?;
    let to = match &q.to {
        Some(d) => reports::parse_date("to", d)?,
        None => today,
    };
    let from = match &q.from {
        Some(d) => reports::parse_date("from", d)?,
        None => to.first_of_month(),
    };
    let group = match q.group.as_deref() {
        None => reports::Group::Month,
        Some(g) => reports::Group::parse(g).ok_or_else(|| {
            ApiError::validation(vec![backend_common::FieldError::new(
                "group",
                "must be month or plan",
            )])
        })?,
    };
    let report = billing.revenue(from, to, group).await?;
    if wants_csv(&req) {
        return Ok(HttpResponse::Ok()
            .content_type("text/csv; charset=utf-8")
            .insert_header((
                header::CONTENT_DISPOSITION,
                format!(
                    "attachment; filename=\"revenue-{}-{}-{}.csv\"",
                    report.group, report.from, report.to
                ),
            ))
            .body(report.csv()));
    }
    Ok(HttpResponse::Ok().json(report))
}

async fn internal_create(
    billing: web::Data<Billing>,
    _caller: ServiceCaller,
    body: Json<NewInvoice>,
) -> Api<HttpResponse> {
    let (invoice, fresh) = billing.create(&body.0).await?;
    Ok(created(invoice, fresh))
}

async fn internal_get(
    billing: web::Data<Billing>,
    _caller: ServiceCaller,
    id: web::Path<String>,
) -> Api<HttpResponse> {
    Ok(HttpResponse::Ok().json(billing.get(&id).await?))
}

async fn internal_pdf(
    billing: web::Data<Billing>,
    _caller: ServiceCaller,
    id: web::Path<String>,
) -> Api<HttpResponse> {
    Ok(pdf_response(billing.pdf(None, &id).await?))
}

async fn internal_issue(
    billing: web::Data<Billing>,
    _caller: ServiceCaller,
    id: web::Path<String>,
) -> Api<HttpResponse> {
    Ok(HttpResponse::Ok().json(billing.issue(&id).await?))
}

async fn internal_void(
    billing: web::Data<Billing>,
    _caller: ServiceCaller,
    id: web::Path<String>,
    body: Json<VoidRequest>,
) -> Api<HttpResponse> {
    Ok(HttpResponse::Ok().json(billing.void(&id, &body.0.reason).await?))
}

/// The OpenAPI document's shared schemas.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "tiergate billing",
        description = "Invoices with gapless numbers and PPN, PDFs, credit notes, payments against invoices."
    ),
    components(schemas(
        Invoice,
        CreditNote,
        NewInvoice,
        NewLine,
        ManualInvoice,
        VoidRequest,
        CreditRequest,
        ResolveRequest,
        crate::core::Buyer,
        crate::core::Line
    ))
)]
pub struct BillingApi;

/// Registers the routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/api/billing/invoices", web::get().to(my_invoices))
        .route("/api/billing/invoices/{id}", web::get().to(my_invoice))
        .route(
            "/api/billing/invoices/{id}/pdf",
            web::get().to(my_invoice_pdf),
        )
        .route(
            "/api/billing/credit-notes/{id}/pdf",
            web::get().to(my_credit_note_pdf),
        )
        .service(
            web::resource("/api/admin/invoices")
                .route(web::get().to(admin_list))
                .route(web::post().to(admin_create)),
        )
        .route("/api/admin/invoices/{id}", web::get().to(admin_get))
        .route("/api/admin/invoices/{id}/pdf", web::get().to(admin_pdf))
        .route(
            "/api/admin/invoices/{id}/issue",
            web::post().to(admin_issue),
        )
        .route("/api/admin/invoices/{id}/void", web::post().to(admin_void))
        .route(
            "/api/admin/invoices/{id}/credit-notes",
            web::post().to(admin_credit),
        )
        .route(
            "/api/admin/credit-notes/{id}/pdf",
            web::get().to(admin_credit_note_pdf),
        )
        .route(
            "/api/admin/billing/overpayments",
            web::get().to(admin_overpayments),
        )
        .route(
            "/api/admin/billing/overpayments/{id}",
            web::post().to(admin_resolve),
        )
        .route(
            "/api/admin/billing/reconciliation",
            web::get().to(admin_reconciliation),
        )
        .route("/api/admin/billing/revenue", web::get().to(admin_revenue))
        .service(
            web::resource("/internal/invoices")
                .app_data(AllowedCallers(CREATORS))
                .route(web::post().to(internal_create)),
        )
        .service(
            web::resource("/internal/invoices/{id}")
                .app_data(AllowedCallers(READERS))
                .route(web::get().to(internal_get)),
        )
        .service(
            web::resource("/internal/invoices/{id}/pdf")
                .app_data(AllowedCallers(READERS))
                .route(web::get().to(internal_pdf)),
        )
        .service(
            web::resource("/internal/invoices/{id}/issue")
                .app_data(AllowedCallers(CREATORS))
                .route(web::post().to(internal_issue)),
        )
        .service(
            web::resource("/internal/invoices/{id}/void")
                .app_data(AllowedCallers(CREATORS))
                .route(web::post().to(internal_void)),
        );
}
