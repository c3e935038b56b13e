//! HTTP handlers of billing: the buyer's invoices, the admin's tools, the
//! internal API of subscriptions and payments.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, OpenApi, ToSchema};

use backend_common::error::ErrorEnvelope;
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
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct Page {
    /// Page size, 1-100 (default 20).
    limit: Option<i64>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

fn limit(l: Option<i64>) -> Api<i64> {
    backend_common::page_limit(l)
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

/// A page of invoices.
#[derive(Serialize, ToSchema)]
pub struct InvoicePage {
    /// Newest first.
    pub invoices: Vec<Invoice>,
    /// The `cursor` of the next page; absent on the last.
    pub next_cursor: Option<String>,
}

fn page(invoices: Vec<Invoice>, next_cursor: Option<String>) -> HttpResponse {
    HttpResponse::Ok().json(InvoicePage {
        invoices,
        next_cursor,
    })
}

/// `GET /api/admin/billing/overpayments`.
#[derive(Serialize, ToSchema)]
pub struct OverpaymentList {
    pub overpayments: Vec<crate::storage::OverpaymentRow>,
}

#[utoipa::path(get, path = "/api/billing/invoices", tag = "billing", security(("bearer" = [])),
    params(Page),
    responses((status = 200, description = "the caller's subject's issued invoices, newest first", body = InvoicePage),
        (status = 422, description = "bad limit or cursor", body = ErrorEnvelope)))]
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

#[utoipa::path(get, path = "/api/billing/invoices/{id}", tag = "billing", security(("bearer" = [])),
    params(("id" = String, Path, description = "invoice id")),
    responses((status = 200, body = Invoice),
        (status = 404, description = "no such invoice of the caller's subject", body = ErrorEnvelope)))]
async fn my_invoice(
    billing: web::Data<Billing>,
    user: AuthUser,
    id: web::Path<String>,
) -> Api<HttpResponse> {
    Ok(HttpResponse::Ok().json(billing.get_for(&user.subject(), &id).await?))
}

#[utoipa::path(get, path = "/api/billing/invoices/{id}/pdf", tag = "billing", security(("bearer" = [])),
    params(("id" = String, Path, description = "invoice id")),
    responses((status = 200, description = "the PDF (A4)", content_type = "application/pdf", body = Vec<u8>),
        (status = 404, description = "no such issued invoice of the caller's subject", body = ErrorEnvelope)))]
async fn my_invoice_pdf(
    billing: web::Data<Billing>,
    user: AuthUser,
    id: web::Path<String>,
) -> Api<HttpResponse> {
    Ok(pdf_response(billing.pdf(Some(&user.subject()), &id).await?))
}

#[utoipa::path(get, path = "/api/billing/credit-notes/{id}/pdf", tag = "billing", security(("bearer" = [])),
    params(("id" = String, Path, description = "credit note id")),
    responses((status = 200, description = "the PDF (A4)", content_type = "application/pdf", body = Vec<u8>),
        (status = 404, description = "no such credit note of the caller's subject", body = ErrorEnvelope)))]
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
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct AdminQuery {
    /// `draft`, `open`, `paid` or `void`.
    status: Option<String>,
    /// The billed user's or organization's id.
    subject_id: Option<String>,
    /// An invoice number, exactly.
    number: Option<String>,
    /// The buyer's e-mail.
    email: Option<String>,
    /// Page size, 1-100 (default 20).
    limit: Option<i64>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

#[utoipa::path(get, path = "/api/admin/invoices", tag = "admin", security(("bearer" = [])),
    params(AdminQuery),
    responses((status = 200, description = "every invoice matching, newest first", body = InvoicePage),
        (status = 422, description = "bad limit or cursor", body = ErrorEnvelope)))]
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

#[utoipa::path(get, path = "/api/admin/invoices/{id}", tag = "admin", security(("bearer" = [])),
    params(("id" = String, Path, description = "invoice id")),
    responses((status = 200, body = Invoice), (status = 404, description = "no such invoice", body = ErrorEnvelope)))]
async fn admin_get(
    billing: web::Data<Billing>,
    _admin: Admin,
    id: web::Path<String>,
) -> Api<HttpResponse> {
    Ok(HttpResponse::Ok().json(billing.get(&id).await?))
}

#[utoipa::path(get, path = "/api/admin/invoices/{id}/pdf", tag = "admin", security(("bearer" = [])),
    params(("id" = String, Path, description = "invoice id")),
    responses((status = 200, description = "the PDF (A4)", content_type = "application/pdf", body = Vec<u8>), (status = 404, description = "no such issued invoice", body = ErrorEnvelope)))]
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

fn created(invoice: Invoice, fresh: bool) -> HttpResponse {
    if fresh {
        HttpResponse::Created().json(invoice)
    } else {
        HttpResponse::Ok()
            .insert_header(("Idempotent-Replayed", "true"))
            .json(invoice)
    }
}

#[utoipa::path(post, path = "/api/admin/invoices", tag = "admin", security(("bearer" = [])),
    params(("Idempotency-Key" = String, Header, description = "1-200 characters: the invoice's reference")),
    request_body = ManualInvoice,
    responses((status = 201, description = "created (and issued unless a draft)", body = Invoice),
        (status = 200, description = "the invoice of this key, replayed", body = Invoice),
        (status = 400, description = "no Idempotency-Key", body = ErrorEnvelope),
        (status = 409, description = "this key with other contents", body = ErrorEnvelope),
        (status = 502, description = "the users service failed", body = ErrorEnvelope)))]
async fn admin_create(
    billing: web::Data<Billing>,
    _admin: Admin,
    req: HttpRequest,
    body: Json<ManualInvoice>,
) -> Api<HttpResponse> {
    let key = backend_common::idempotency_key(&req, "bill twice")?;
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

#[utoipa::path(post, path = "/api/admin/invoices/{id}/issue", tag = "admin", security(("bearer" = [])),
    params(("id" = String, Path, description = "invoice id")),
    responses((status = 200, description = "numbered and open", body = Invoice),
        (status = 404, description = "no such invoice", body = ErrorEnvelope),
        (status = 409, description = "not a draft", body = ErrorEnvelope)))]
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

#[utoipa::path(post, path = "/api/admin/invoices/{id}/void", tag = "admin", security(("bearer" = [])),
    params(("id" = String, Path, description = "invoice id")), request_body = VoidRequest,
    responses((status = 200, description = "void (it keeps its number)", body = Invoice),
        (status = 404, description = "no such invoice", body = ErrorEnvelope),
        (status = 409, description = "paid, or voided for another reason", body = ErrorEnvelope)))]
async fn admin_void(
    billing: web::Data<Billing>,
    _admin: Admin,
    id: web::Path<String>,
    body: Json<VoidRequest>,
) -> Api<HttpResponse> {
    Ok(HttpResponse::Ok().json(billing.void(&id, &body.0.reason).await?))
}

/// `POST /api/admin/invoices/{id}/nsfp`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NsfpRequest {
    /// The Faktur Pajak serial from DJP Coretax: 17 digits (2 transaction
    /// code, 2 status, 13 serial); `.`, `-` and spaces are dropped.
    pub nsfp: String,
    /// Replace another serial already recorded (a replacement Faktur
    /// Pajak).
    #[serde(default)]
    pub replace: bool,
}

#[utoipa::path(post, path = "/api/admin/invoices/{id}/nsfp", tag = "admin", security(("bearer" = [])),
    params(("id" = String, Path, description = "invoice id")), request_body = NsfpRequest,
    responses((status = 200, description = "recorded; the PDF is rendered again with it", body = Invoice),
        (status = 404, description = "no such invoice", body = ErrorEnvelope),
        (status = 409, description = "a draft or void invoice, another serial recorded, or the seller is no PKP", body = ErrorEnvelope)))]
async fn admin_nsfp(
    billing: web::Data<Billing>,
    _admin: Admin,
    id: web::Path<String>,
    body: Json<NsfpRequest>,
) -> Api<HttpResponse> {
    let b = body.0;
    Ok(HttpResponse::Ok().json(billing.set_nsfp(&id, &b.nsfp, b.replace).await?))
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

#[utoipa::path(post, path = "/api/admin/invoices/{id}/credit-notes", tag = "admin", security(("bearer" = [])),
    params(("id" = String, Path, description = "invoice id")), request_body = CreditRequest,
    responses((status = 201, body = CreditNote),
        (status = 404, description = "no such invoice", body = ErrorEnvelope),
        (status = 409, description = "not paid", body = ErrorEnvelope)))]
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

#[utoipa::path(get, path = "/api/admin/credit-notes/{id}/pdf", tag = "admin", security(("bearer" = [])),
    params(("id" = String, Path, description = "credit note id")),
    responses((status = 200, description = "the PDF (A4)", content_type = "application/pdf", body = Vec<u8>), (status = 404, description = "no such credit note", body = ErrorEnvelope)))]
async fn admin_credit_note_pdf(
    billing: web::Data<Billing>,
    _admin: Admin,
    id: web::Path<String>,
) -> Api<HttpResponse> {
    Ok(pdf_response(billing.credit_note_pdf(None, &id).await?))
}

#[utoipa::path(get, path = "/api/admin/billing/overpayments", tag = "admin", security(("bearer" = [])),
    responses((status = 200, description = "open overpayments first", body = OverpaymentList)))]
async fn admin_overpayments(billing: web::Data<Billing>, _admin: Admin) -> Api<HttpResponse> {
    let list = billing.overpayments().await?;
    Ok(HttpResponse::Ok().json(OverpaymentList { overpayments: list }))
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

#[utoipa::path(post, path = "/api/admin/billing/overpayments/{id}", tag = "admin", security(("bearer" = [])),
    params(("id" = String, Path, description = "overpayment id")), request_body = ResolveRequest,
    responses((status = 204, description = "resolved"),
        (status = 404, description = "no such open overpayment", body = ErrorEnvelope)))]
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
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ReconQuery {
    /// The business day, `YYYY-MM-DD` (default: yesterday).
    date: Option<String>,
}

#[utoipa::path(get, path = "/api/admin/billing/reconciliation", tag = "admin", security(("bearer" = [])),
    params(ReconQuery),
    responses((status = 200, body = reports::Reconciliation),
        (status = 422, description = "not a date", body = ErrorEnvelope)))]
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
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct RevenueQuery {
    /// First business day, `YYYY-MM-DD` (default: the first of `to`'s month).
    from: Option<String>,
    /// Last business day, included (default: today).
    to: Option<String>,
    /// `month` (default) or `plan`.
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

#[utoipa::path(get, path = "/api/admin/billing/revenue", tag = "admin", security(("bearer" = [])),
    params(RevenueQuery),
    responses((status = 200, description = "JSON, or CSV with `Accept: text/csv`",
            content((reports::Revenue = "application/json"), (String = "text/csv"))),
        (status = 422, description = "bad dates or group", body = ErrorEnvelope)))]
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

#[utoipa::path(post, path = "/internal/invoices", tag = "internal", security(("service" = [])),
    request_body = NewInvoice,
    responses((status = 201, description = "created (and issued unless a draft)", body = Invoice),
        (status = 200, description = "the invoice of this reference, replayed", body = Invoice),
        (status = 409, description = "this reference with other contents", body = ErrorEnvelope),
        (status = 502, description = "the users service failed", body = ErrorEnvelope)))]
async fn internal_create(
    billing: web::Data<Billing>,
    _caller: ServiceCaller,
    body: Json<NewInvoice>,
) -> Api<HttpResponse> {
    let (invoice, fresh) = billing.create(&body.0).await?;
    Ok(created(invoice, fresh))
}

#[utoipa::path(get, path = "/internal/invoices/{id}", tag = "internal", security(("service" = [])),
    params(("id" = String, Path, description = "invoice id")),
    responses((status = 200, body = Invoice), (status = 404, description = "no such invoice", body = ErrorEnvelope)))]
async fn internal_get(
    billing: web::Data<Billing>,
    _caller: ServiceCaller,
    id: web::Path<String>,
) -> Api<HttpResponse> {
    Ok(HttpResponse::Ok().json(billing.get(&id).await?))
}

#[utoipa::path(get, path = "/internal/invoices/{id}/pdf", tag = "internal", security(("service" = [])),
    params(("id" = String, Path, description = "invoice id")),
    responses((status = 200, description = "the PDF (A4)", content_type = "application/pdf", body = Vec<u8>), (status = 404, description = "no such issued invoice", body = ErrorEnvelope)))]
async fn internal_pdf(
    billing: web::Data<Billing>,
    _caller: ServiceCaller,
    id: web::Path<String>,
) -> Api<HttpResponse> {
    Ok(pdf_response(billing.pdf(None, &id).await?))
}

#[utoipa::path(post, path = "/internal/invoices/{id}/issue", tag = "internal", security(("service" = [])),
    params(("id" = String, Path, description = "invoice id")),
    responses((status = 200, body = Invoice),
        (status = 404, description = "no such invoice", body = ErrorEnvelope),
        (status = 409, description = "not a draft", body = ErrorEnvelope)))]
async fn internal_issue(
    billing: web::Data<Billing>,
    _caller: ServiceCaller,
    id: web::Path<String>,
) -> Api<HttpResponse> {
    Ok(HttpResponse::Ok().json(billing.issue(&id).await?))
}

#[utoipa::path(post, path = "/internal/invoices/{id}/void", tag = "internal", security(("service" = [])),
    params(("id" = String, Path, description = "invoice id")), request_body = VoidRequest,
    responses((status = 200, body = Invoice),
        (status = 404, description = "no such invoice", body = ErrorEnvelope),
        (status = 409, description = "paid, or voided for another reason", body = ErrorEnvelope)))]
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
        description = "Invoices with gapless numbers and PPN, PDFs, credit notes, payments against invoices, reconciliation and revenue."
    ),
    paths(
        my_invoices,
        my_invoice,
        my_invoice_pdf,
        my_credit_note_pdf,
        admin_list,
        admin_create,
        admin_get,
        admin_pdf,
        admin_issue,
        admin_void,
        admin_nsfp,
        admin_credit,
        admin_credit_note_pdf,
        admin_overpayments,
        admin_resolve,
        admin_reconciliation,
        admin_revenue,
        internal_create,
        internal_get,
        internal_pdf,
        internal_issue,
        internal_void
    ),
    components(schemas(
        InvoicePage,
        crate::storage::OverpaymentRow,
        OverpaymentList,
        reports::Reconciliation,
        reports::Revenue,
        Invoice,
        CreditNote,
        NewInvoice,
        NewLine,
        ManualInvoice,
        VoidRequest,
        NsfpRequest,
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
        .route("/api/admin/invoices/{id}/nsfp", web::post().to(admin_nsfp))
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
