//! `tiergate sandbox`: a local stand-in for the Midtrans Snap and Core API
//! endpoints payments uses, following the contract (external-apis.md §1)
//! to the field: string amounts with `.00`, `status_code` strings, GMT+7
//! `transaction_time`s without a zone, HTTP = code for 4xx/5xx and 200 for
//! 200/201/202/407 bodies, 404 for an unknown order or a Snap order whose
//! customer has not chosen a method, 406 for a reused `order_id`, 412 for a
//! change the status does not allow, `Idempotency-Key` replays (successes
//! only, 5 minutes), and signed HTTP notifications.
//!
//! It is what the tests use and what a developer runs offline. It keeps
//! everything in memory and says it is a sandbox in every answer
//! (`X-Tiergate-Sandbox: true`) and log line. A developer (or test) plays
//! the customer and the bank through `POST /sandbox/{order_id}/{action}`
//! (`pay`, `choose`, `settle`, `expire`, `deny`, `cancel`, `fail`) with
//! `?twice=true` (the notification delivered twice) or `?stale=true` (the
//! previous status's notification delivered after the new one: out of
//! order); `POST /sandbox/{order_id}/tamper` makes Midtrans report another
//! amount; `GET /sandbox/requests` lists what it was sent;
//! `POST /sandbox/outage {times}` answers the next calls 503.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::midtrans::{authorization, format_amount, signature, TransactionStatus as T};

/// The sandbox's server key unless told another (`SB-`: a sandbox key).
pub const SANDBOX_SERVER_KEY: &str = "SB-Mid-server-tiergate-local-sandbox";
/// Its client key.
pub const SANDBOX_CLIENT_KEY: &str = "SB-Mid-client-tiergate-local-sandbox";
/// Its standard port.
pub const SANDBOX_PORT: u16 = 8029;
/// Its merchant id.
const MERCHANT_ID: &str = "G000000000";

/// How to run the sandbox.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// The server key it accepts and signs notifications with.
    pub server_key: String,
    /// Where it sends notifications (the payments webhook); none: it
    /// sends none unless a charge says (`X-Override-Notification`).
    pub notify_url: Option<String>,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], SANDBOX_PORT)),
            server_key: SANDBOX_SERVER_KEY.to_owned(),
            notify_url: None,
        }
    }
}

/// One transaction.
#[derive(Debug, Clone)]
struct Txn {
    order_id: String,
    transaction_id: String,
    /// `None`: a Snap order whose customer has not chosen a method yet.
    payment_type: Option<String>,
    gross_amount: i64,
    /// What it reports instead (`tamper`).
    reported_amount: Option<String>,
    currency: String,
    status: T,
    fraud: Option<&'static str>,
    /// Bank of a VA, or the card token's rule (`challenge`, `deny`).
    bank: Option<String>,
    card_rule: Option<String>,
    created_ms: i64,
    expiry_ms: i64,
    settled_ms: Option<i64>,
    refunds: Vec<Value>,
    refunded: i64,
    notify: Option<String>,
}

struct Inner {
    txns: HashMap<String, Txn>,
    /// Idempotency-Key → (HTTP status, body, when).
    replies: HashMap<String, (u16, Value, Instant)>,
    requests: Vec<Value>,
    outage: u32,
}

struct Sandbox {
    inner: Mutex<Inner>,
    key: String,
    authorization: String,
    notify_url: Mutex<Option<String>>,
    base: String,
    http: reqwest::Client,
}

fn now_ms() -> i64 {
    backend_common::clock::system_now_ms()
}

/// `YYYY-MM-DD HH:MM:SS` in GMT+7, as Midtrans writes times.
pub fn wib(ms: i64) -> String {
    let tz = jiff::tz::TimeZone::fixed(jiff::tz::offset(7));
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.to_zoned(tz).strftime("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_default()
}

fn code_of(status: T) -> &'static str {
    match status {
        T::Pending => "201",
        T::Deny | T::Failure => "202",
        T::Expire => "407",
        _ => "200",
    }
}

/// The HTTP status of an answer whose body says `code`: the code itself
/// for 4xx/5xx, 200 for 200/201/202/407 (the contract).
fn http_of(code: &str) -> u16 {
    match code.parse::<u16>() {
        Ok(c) if c >= 400 && c != 407 => c,
        _ => 200,
    }
}

fn answer(code: &str, body: Value) -> HttpResponse {
    let http = http_of(code);
    HttpResponse::build(StatusCode::from_u16(http).unwrap_or(StatusCode::OK))
        .insert_header(("X-Tiergate-Sandbox", "true"))
        .json(body)
}

fn refusal(code: &str, message: &str) -> HttpResponse {
    answer(
        code,
        json!({"status_code": code, "status_message": message, "id": uuid::Uuid::now_v7().to_string()}),
    )
}

impl Txn {
    fn snapshot(&self, message: &str) -> Value {
        let status = self.status;
        let mut v = json!({
            "status_code": code_of(status),
            "status_message": message,
            "transaction_id": self.transaction_id,
            "order_id": self.order_id,
            "merchant_id": MERCHANT_ID,
            "gross_amount": self.reported_amount.clone().unwrap_or_else(|| format_amount(self.gross_amount)),
            "currency": self.currency,
            "payment_type": self.payment_type,
            "transaction_time": wib(self.created_ms),
            "transaction_status": status.as_str(),
            "fraud_status": self.fraud.unwrap_or("accept"),
            "expiry_time": wib(self.expiry_ms),
        });
        if let Some(s) = self.settled_ms {
            v["settlement_time"] = json!(wib(s));
        }
        match (self.payment_type.as_deref(), self.bank.as_deref()) {
            (Some("bank_transfer"), Some("permata")) => {
                v["permata_va_number"] = json!(va_number(&self.transaction_id, "8562"));
            }
            (Some("bank_transfer"), Some(bank)) => {
                v["va_numbers"] =
                    json!([{"bank": bank, "va_number": va_number(&self.transaction_id, "")}]);
            }
            (Some("echannel"), _) => {
                v["bill_key"] = json!(va_number(&self.transaction_id, "99"));
                v["biller_code"] = json!("70012");
            }
            (Some("credit_card"), _) => {
                v["masked_card"] = json!("48111111-1114");
                v["bank"] = json!("bni");
                v["card_type"] = json!("credit");
                if status != T::Pending {
                    v["approval_code"] = json!("1578569243927");
                }
            }
            (Some("qris"), _) => {
                v["acquirer"] = json!("gopay");
            }
            _ => {}
        }
        if self.refunded > 0 {
            v["refund_amount"] = json!(format_amount(self.refunded));
            v["refunds"] = json!(self.refunds);
        }
        v
    }
}

/// A deterministic number from a transaction id (digits only).
fn va_number(transaction_id: &str, prefix: &str) -> String {
    let digits: String = transaction_id
        .bytes()
        .map(|b| char::from(b'0' + b % 10))
        .take(11)
        .collect();
    format!("{prefix}{digits}")
}

fn allowed_order_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 50
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '~' | '.'))
}

impl Sandbox {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn authorized(&self, req: &HttpRequest) -> bool {
        req.headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                crate::midtrans::constant_time_eq(v.as_bytes(), self.authorization.as_bytes())
            })
    }

    /// Logs the request, checks the key and the outage switch, and replays
    /// a cached answer for a known `Idempotency-Key`.
    fn admit(&self, req: &HttpRequest, body: &Value) -> Result<Option<String>, Box<HttpResponse>> {
        let key = req
            .headers()
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let mut inner = self.lock();
        inner.requests.push(json!({
            "method": req.method().as_str(), "path": req.path(), "body": body,
            "idempotency_key": key,
        }));
        if inner.outage > 0 {
            inner.outage -= 1;
            return Err(Box::new(refusal(
                "503",
                "sandbox outage: Midtrans is unavailable",
            )));
        }
        if !self.authorized(req) {
            return Err(Box::new(refusal(
                "401",
                "Access denied due to unauthorized transaction, please check client or server key",
            )));
        }
        if let Some(k) = &key {
            if let Some((status, body, at)) = inner.replies.get(k) {
                if at.elapsed() < Duration::from_secs(300) {
                    return Err(Box::new(
                        HttpResponse::build(
                            StatusCode::from_u16(*status).unwrap_or(StatusCode::OK),
                        )
                        .insert_header(("X-Tiergate-Sandbox", "true"))
                        .json(body.clone()),
                    ));
                }
            }
        }
        Ok(key)
    }

    /// Caches a successful answer under its key.
    fn remember(&self, key: Option<String>, http: u16, body: &Value) {
        let ok = http < 400
            && body["status_code"]
                .as_str()
                .is_none_or(|c| !crate::midtrans::is_error_code(c));
        if let (Some(k), true) = (key, ok) {
            self.lock()
                .replies
                .insert(k, (http, body.clone(), Instant::now()));
        }
    }

    fn respond(&self, key: Option<String>, code: &str, body: Value) -> HttpResponse {
        self.remember(key, http_of(code), &body);
        answer(code, body)
    }

    /// Sends the notification of `txn` as it is now (and the `stale` one
    /// after it), `twice` if told; returns the HTTP statuses the
    /// receiver answered (0: not reached).
    async fn notify(&self, txn: &Txn, stale: Option<&Txn>, twice: bool) -> Vec<u16> {
        let default = self
            .notify_url
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(url) = txn.notify.clone().or(default) else {
            return Vec::new();
        };
        let mut bodies = vec![self.notification(txn)];
        if twice {
            bodies.push(bodies[0].clone());
        }
        if let Some(s) = stale {
            bodies.push(self.notification(s));
        }
        let mut statuses = Vec::new();
        for body in bodies {
            let status = match self.http.post(&url).json(&body).send().await {
                Ok(r) => r.status().as_u16(),
                Err(e) => {
                    tracing::warn!(sandbox = true, error = %e, "sandbox: notification not delivered");
                    0
                }
            };
            tracing::info!(sandbox = true, order_id = %txn.order_id, status, "sandbox: notification sent");
            statuses.push(status);
        }
        statuses
    }

    fn notification(&self, txn: &Txn) -> Value {
        let mut body = txn.snapshot("midtrans payment notification");
        let sig = signature(
            &txn.order_id,
            body["status_code"].as_str().unwrap_or_default(),
            body["gross_amount"].as_str().unwrap_or_default(),
            &self.key,
        );
        body["signature_key"] = json!(sig);
        body
    }

    /// Expires what is past its expiry (Midtrans does so by itself).
    fn expire_due(&self) -> Vec<Txn> {
        let now = now_ms();
        let mut inner = self.lock();
        let mut expired = Vec::new();
        for t in inner.txns.values_mut() {
            if t.status == T::Pending && t.payment_type.is_some() && now > t.expiry_ms {
                t.status = T::Expire;
                expired.push(t.clone());
            }
        }
        expired
    }
}

fn validate_details(body: &Value) -> Result<(String, i64), (String, String)> {
    let details = &body["transaction_details"];
    let Some(order_id) = details["order_id"].as_str() else {
        return Err((
            "400".into(),
            "transaction_details.order_id is required".into(),
        ));
    };
    if !allowed_order_id(order_id) {
        return Err((
            "400".into(),
            "transaction_details.order_id may be 50 characters of A-Z a-z 0-9 - _ ~ .".into(),
        ));
    }
    let Some(amount) = details["gross_amount"].as_i64().filter(|a| *a >= 1) else {
        return Err((
            "400".into(),
            "transaction_details.gross_amount must be an integer of at least 1".into(),
        ));
    };
    if let Some(items) = body["item_details"].as_array() {
        let sum: Option<i64> = items.iter().try_fold(0i64, |acc, i| {
            let p = i["price"].as_i64()?;
            let q = i["quantity"].as_i64()?;
            acc.checked_add(p.checked_mul(q)?)
        });
        if sum != Some(amount) {
            return Err((
                "400".into(),
                "transaction_details.gross_amount is not equal to the sum of item_details".into(),
            ));
        }
    }
    Ok((order_id.to_owned(), amount))
}

fn expiry_of(body: &Value, created: i64) -> i64 {
    let e = if body["custom_expiry"].is_object() {
        &body["custom_expiry"]
    } else {
        &body["expiry"]
    };
    let n = e["expiry_duration"]
        .as_i64()
        .or_else(|| e["duration"].as_i64())
        .unwrap_or(24 * 60);
    let unit = match e["unit"].as_str() {
        Some("second") => 1_000,
        Some("hour") => 3_600_000,
        Some("day") => 86_400_000,
        _ => 60_000,
    };
    created.saturating_add(n.saturating_mul(unit))
}

fn override_url(req: &HttpRequest) -> Option<String> {
    req.headers()
        .get("x-override-notification")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

async fn charge(sb: web::Data<Sandbox>, req: HttpRequest, body: web::Bytes) -> HttpResponse {
    let body: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(_) => {
            return refusal(
                "413",
                "The request cannot be processed due to malformed syntax",
            )
        }
    };
    let key = match sb.admit(&req, &body) {
        Ok(k) => k,
        Err(r) => return *r,
    };
    let (order_id, amount) = match validate_details(&body) {
        Ok(x) => x,
        Err((code, m)) => {
            return answer(
                &code,
                json!({"status_code": code, "status_message": "One or more parameters in the payload is invalid.",
                       "validation_messages": [m], "id": uuid::Uuid::now_v7().to_string()}),
            )
        }
    };
    let payment_type = body["payment_type"].as_str().unwrap_or_default().to_owned();
    let (bank, card_rule, three_ds) = match payment_type.as_str() {
        "bank_transfer" => match body["bank_transfer"]["bank"].as_str() {
            Some(b @ ("bca" | "bni" | "bri" | "cimb" | "permata")) => {
                (Some(b.to_owned()), None, false)
            }
            _ => {
                return refusal(
                    "400",
                    "bank_transfer.bank must be one of bca, bni, bri, cimb, permata",
                )
            }
        },
        "credit_card" => {
            let Some(token) = body["credit_card"]["token_id"]
                .as_str()
                .filter(|t| !t.is_empty())
            else {
                return refusal("411", "Token id is missing, invalid, or timed out");
            };
            let rule = ["challenge", "deny"]
                .into_iter()
                .find(|r| token.starts_with(r))
                .map(str::to_owned);
            (
                None,
                rule,
                body["credit_card"]["authentication"].as_bool() == Some(true),
            )
        }
        "echannel" => {
            if body["echannel"]["bill_info1"].as_str().is_none()
                || body["echannel"]["bill_info2"].as_str().is_none()
            {
                return refusal(
                    "400",
                    "echannel.bill_info1 and echannel.bill_info2 are required",
                );
            }
            (None, None, false)
        }
        "gopay" | "shopeepay" | "qris" => (None, None, false),
        "" => return refusal("400", "payment_type is required"),
        _ => return refusal("402", "Merchant doesn't have access for this payment type"),
    };
    let created = now_ms();
    let status = match (payment_type.as_str(), three_ds, card_rule.as_deref()) {
        ("credit_card", _, Some("deny")) => T::Deny,
        ("credit_card", false, _) => T::Capture,
        _ => T::Pending,
    };
    let txn = Txn {
        order_id: order_id.clone(),
        transaction_id: uuid::Uuid::new_v4().to_string(),
        payment_type: Some(payment_type.clone()),
        gross_amount: amount,
        reported_amount: None,
        currency: "IDR".into(),
        status,
        fraud: match (status, card_rule.as_deref()) {
            (T::Deny, _) => Some("deny"),
            (T::Capture, Some("challenge")) => Some("challenge"),
            _ => None,
        },
        bank,
        card_rule,
        created_ms: created,
        expiry_ms: expiry_of(&body, created),
        settled_ms: None,
        refunds: Vec::new(),
        refunded: 0,
        notify: override_url(&req),
    };
    {
        let mut inner = sb.lock();
        if inner.txns.contains_key(&order_id) {
            drop(inner);
            return refusal(
                "406",
                "The request could not be completed due to a conflict with the current state of the target resource, please try again",
            );
        }
        inner.txns.insert(order_id.clone(), txn.clone());
    }
    let message = match payment_type.as_str() {
        "bank_transfer" => "Success, Bank Transfer transaction is created",
        "echannel" => "OK, Mandiri Bill transaction is successful",
        "credit_card" if status == T::Pending => "OK, Credit Card 3DS transaction is successful",
        "credit_card" if status == T::Deny => {
            "Deny by Bank [CIMB] with code [05] and message [Do not honour]"
        }
        "credit_card" => "Success, Credit Card transaction is successful",
        "gopay" => "GoPay transaction is created",
        "shopeepay" => "ShopeePay transaction is created",
        _ => "QRIS transaction is created",
    };
    let mut out = txn.snapshot(message);
    let base = &sb.base;
    let tid = &txn.transaction_id;
    match payment_type.as_str() {
        "credit_card" if status == T::Pending => {
            out["redirect_url"] = json!(format!("{base}/v2/token/rba/redirect/{tid}"));
        }
        "gopay" => {
            out["actions"] = json!([
                {"name": "generate-qr-code", "method": "GET", "url": format!("{base}/v2/gopay/{tid}/qr-code")},
                {"name": "deeplink-redirect", "method": "GET", "url": format!("{base}/gopay/partner/app/payment-pin?id={tid}")},
                {"name": "get-status", "method": "GET", "url": format!("{base}/v2/{tid}/status")},
                {"name": "cancel", "method": "POST", "url": format!("{base}/v2/{tid}/cancel")}
            ]);
        }
        "shopeepay" => {
            out["actions"] = json!([{"name": "deeplink-redirect", "method": "GET",
                "url": format!("{base}/shopeepay/deeplink?reference={tid}")}]);
        }
        "qris" => {
            out["qr_string"] = json!(format!("00020101021126610014COM.GO-JEK.WWW0118{tid}"));
            out["actions"] = json!([{"name": "generate-qr-code", "method": "GET",
                "url": format!("{base}/v2/qris/{tid}/qr-code")}]);
        }
        _ => {}
    }
    tracing::info!(sandbox = true, %order_id, payment_type, status = status.as_str(), "sandbox: charge");
    sb.respond(key, code_of(status), out)
}

async fn snap(sb: web::Data<Sandbox>, req: HttpRequest, body: web::Bytes) -> HttpResponse {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let key = match sb.admit(&req, &body) {
        Ok(k) => k,
        Err(r) if r.status() == StatusCode::UNAUTHORIZED => {
            return HttpResponse::Unauthorized().json(json!({"error_messages": [
                "Access denied, please check client or server key",
                "Visit https://snap-docs.midtrans.com/#request-headers for more details"]}))
        }
        Err(r) => return *r,
    };
    let (order_id, amount) = match validate_details(&body) {
        Ok(x) => x,
        Err((_, m)) => return HttpResponse::BadRequest().json(json!({"error_messages": [m]})),
    };
    let created = now_ms();
    let token = uuid::Uuid::new_v4().to_string();
    {
        let mut inner = sb.lock();
        if inner.txns.contains_key(&order_id) {
            return HttpResponse::BadRequest()
                .json(json!({"error_messages": ["transaction_details.order_id sudah digunakan"]}));
        }
        inner.txns.insert(
            order_id.clone(),
            Txn {
                order_id: order_id.clone(),
                transaction_id: uuid::Uuid::new_v4().to_string(),
                payment_type: None,
                gross_amount: amount,
                reported_amount: None,
                currency: "IDR".into(),
                status: T::Pending,
                fraud: None,
                bank: None,
                card_rule: None,
                created_ms: created,
                expiry_ms: expiry_of(&body, created),
                settled_ms: None,
                refunds: Vec::new(),
                refunded: 0,
                notify: override_url(&req),
            },
        );
    }
    let out =
        json!({"token": token, "redirect_url": format!("{}/snap/v4/redirection/{token}", sb.base)});
    sb.remember(key, 201, &out);
    tracing::info!(sandbox = true, %order_id, "sandbox: snap transaction");
    HttpResponse::Created()
        .insert_header(("X-Tiergate-Sandbox", "true"))
        .json(out)
}

async fn status(sb: web::Data<Sandbox>, req: HttpRequest, id: web::Path<String>) -> HttpResponse {
    if let Err(r) = sb.admit(&req, &Value::Null) {
        return *r;
    }
    for t in sb.expire_due() {
        let sb = sb.clone();
        actix_web::rt::spawn(async move {
            sb.notify(&t, None, false).await;
        });
    }
    let found = {
        let inner = sb.lock();
        inner
            .txns
            .values()
            .find(|t| t.order_id == *id || t.transaction_id == *id)
            .filter(|t| t.payment_type.is_some())
            .cloned()
    };
    match found {
        Some(t) => answer(
            code_of(t.status),
            t.snapshot("Success, transaction is found"),
        ),
        None => refusal("404", "Transaction doesn't exist."),
    }
}

/// `POST /v2/{id}/{cancel|expire|approve|deny|refund}`.
async fn modify(
    sb: web::Data<Sandbox>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
    body: web::Bytes,
) -> HttpResponse {
    let (id, action) = path.into_inner();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let key = match sb.admit(&req, &body) {
        Ok(k) => k,
        Err(r) => return *r,
    };
    let result = {
        let mut inner = sb.lock();
        let Some(t) = inner
            .txns
            .values_mut()
            .find(|t| (t.order_id == id || t.transaction_id == id) && t.payment_type.is_some())
        else {
            return refusal("404", "Transaction doesn't exist.");
        };
        let before = t.clone();
        let outcome = apply_merchant(t, &action, &body);
        outcome.map(|(code, message, extra)| (before, t.clone(), code, message, extra))
    };
    match result {
        Err((code, message)) => refusal(code, message),
        Ok((before, after, code, message, extra)) => {
            let mut out = after.snapshot(message);
            out["status_code"] = json!(code);
            if let Value::Object(extra) = extra {
                for (k, v) in extra {
                    out[k] = v;
                }
            }
            if before.status != after.status
                || before.refunded != after.refunded
                || before.fraud != after.fraud
            {
                let sb2 = sb.clone();
                actix_web::rt::spawn(async move {
                    sb2.notify(&after, None, false).await;
                });
            }
            sb.respond(key, code, out)
        }
    }
}

type Modified = Result<(&'static str, &'static str, Value), (&'static str, &'static str)>;

/// What a merchant's call does to a transaction.
fn apply_merchant(t: &mut Txn, action: &str, body: &Value) -> Modified {
    const CANNOT: (&str, &str) = (
        "412",
        "Merchant cannot modify the status of the transaction",
    );
    match (action, t.status) {
        ("cancel", T::Pending | T::Capture | T::Authorize) => {
            t.status = T::Cancel;
            Ok(("200", "Success, transaction is canceled", Value::Null))
        }
        ("expire", T::Pending) => {
            t.status = T::Expire;
            Ok(("407", "Success, transaction has expired", Value::Null))
        }
        ("approve", T::Capture) if t.fraud == Some("challenge") => {
            t.fraud = Some("accept");
            Ok(("200", "Success, transaction is approved", Value::Null))
        }
        ("deny", T::Capture) if t.fraud == Some("challenge") => {
            t.status = T::Deny;
            t.fraud = Some("deny");
            Ok(("200", "Success, transaction is denied", Value::Null))
        }
        ("refund" | "refund/online/direct", T::Settlement | T::PartialRefund) => {
            if !crate::charge::refundable(t.payment_type.as_deref().unwrap_or_default()) {
                return Err(CANNOT);
            }
            let refund_key = body["refund_key"].as_str().unwrap_or_default().to_owned();
            if let Some(done) = t
                .refunds
                .iter()
                .find(|r| !refund_key.is_empty() && r["refund_key"] == refund_key.as_str())
            {
                // The same refund_key again: the same refund.
                return Ok((
                    "200",
                    "Success, refund request is approved",
                    json!({"refund_chargeback_id": done["refund_chargeback_id"], "refund_key": refund_key,
                           "refund_amount": done["refund_amount"]}),
                ));
            }
            let left = t.gross_amount - t.refunded;
            let amount = body["amount"].as_i64().unwrap_or(left);
            if amount < 1 || amount > left {
                return Err(("412", "Refund amount is more than the remaining amount"));
            }
            t.refunded += amount;
            t.status = if t.refunded == t.gross_amount {
                T::Refund
            } else {
                T::PartialRefund
            };
            let id = t.refunds.len() + 1;
            let refund = json!({"refund_chargeback_id": id, "refund_amount": format_amount(amount),
                "created_at": wib(now_ms()), "reason": body["reason"], "refund_key": refund_key});
            t.refunds.push(refund);
            Ok((
                "200",
                "Success, refund request is approved",
                json!({"refund_chargeback_id": id, "refund_amount": format_amount(amount), "refund_key": refund_key}),
            ))
        }
        ("cancel" | "expire" | "approve" | "deny" | "refund" | "refund/online/direct", _) => {
            Err(CANNOT)
        }
        _ => Err(("404", "The requested resource is not found")),
    }
}

#[derive(Deserialize)]
struct ControlQuery {
    /// Deliver the notification twice.
    #[serde(default)]
    twice: bool,
    /// Deliver the previous status's notification after the new one.
    #[serde(default)]
    stale: bool,
    /// For a Snap order: the method the customer picks (`bca_va`, ...).
    method: Option<String>,
}

/// What the customer or the bank does: `POST /sandbox/{order_id}/{action}`.
async fn control(
    sb: web::Data<Sandbox>,
    path: web::Path<(String, String)>,
    q: web::Query<ControlQuery>,
) -> HttpResponse {
    let (order_id, action) = path.into_inner();
    let outcome = {
        let mut inner = sb.lock();
        let Some(t) = inner.txns.get_mut(&order_id) else {
            return HttpResponse::NotFound().json(
                json!({"sandbox": true, "error": format!("no order {order_id} in the sandbox")}),
            );
        };
        let before = t.clone();
        if t.payment_type.is_none() {
            // A Snap order: the customer picks a method first.
            let (payment_type, bank) = match q.method.as_deref().unwrap_or("bca_va") {
                "credit_card" => ("credit_card", None),
                "mandiri_bill" => ("echannel", None),
                m @ ("gopay" | "shopeepay" | "qris") => (m, None),
                m => ("bank_transfer", Some(m.trim_end_matches("_va").to_owned())),
            };
            t.payment_type = Some(payment_type.to_owned());
            t.bank = bank;
        }
        let now = now_ms();
        let card = t.payment_type.as_deref() == Some("credit_card");
        let reversible = matches!(
            (t.payment_type.as_deref(), t.bank.as_deref()),
            (Some("echannel"), _) | (Some("bank_transfer"), Some("permata"))
        );
        let moved = match (action.as_str(), t.status) {
            ("choose", T::Pending) => true,
            ("pay", T::Pending) if card => {
                t.status = T::Capture;
                t.fraud = Some(if t.card_rule.as_deref() == Some("challenge") {
                    "challenge"
                } else {
                    "accept"
                });
                true
            }
            ("pay", T::Pending) | ("settle", T::Capture) => {
                t.status = T::Settlement;
                t.settled_ms = Some(now);
                true
            }
            ("expire", T::Pending) => {
                t.status = T::Expire;
                true
            }
            ("deny", T::Pending) => {
                t.status = T::Deny;
                true
            }
            ("deny", T::Settlement) if reversible => {
                t.status = T::Deny;
                true
            }
            ("cancel", T::Pending | T::Capture) => {
                t.status = T::Cancel;
                true
            }
            ("fail", T::Pending) => {
                t.status = T::Failure;
                true
            }
            ("notify", _) => true,
            _ => false,
        };
        moved.then(|| (before, t.clone()))
    };
    let Some((before, after)) = outcome else {
        return HttpResponse::Conflict().json(json!({"sandbox": true,
            "error": format!("`{action}` does not apply to order {order_id} now")}));
    };
    let stale = q
        .stale
        .then_some(&before)
        .filter(|b| b.payment_type.is_some());
    let deliveries = sb.notify(&after, stale, q.twice).await;
    HttpResponse::Ok().json(json!({"sandbox": true, "order_id": order_id,
        "transaction_status": after.status.as_str(), "deliveries": deliveries}))
}

#[derive(Deserialize)]
struct Tamper {
    gross_amount: Option<String>,
    currency: Option<String>,
}

/// `POST /sandbox/{order_id}/tamper`: Midtrans reports another amount or
/// currency from now on (what a mismatch looks like).
async fn tamper(
    sb: web::Data<Sandbox>,
    id: web::Path<String>,
    body: web::Json<Tamper>,
) -> HttpResponse {
    let mut inner = sb.lock();
    let Some(t) = inner.txns.get_mut(id.as_str()) else {
        return HttpResponse::NotFound().json(json!({"sandbox": true, "error": "no such order"}));
    };
    if let Some(a) = &body.gross_amount {
        t.reported_amount = Some(a.clone());
    }
    if let Some(c) = &body.currency {
        t.currency = c.clone();
    }
    HttpResponse::Ok().json(json!({"sandbox": true}))
}

#[derive(Deserialize)]
struct Outage {
    times: u32,
}

/// `POST /sandbox/outage {times}`: the next `times` API calls answer 503.
async fn outage(sb: web::Data<Sandbox>, body: web::Json<Outage>) -> HttpResponse {
    sb.lock().outage = body.times;
    HttpResponse::Ok().json(json!({"sandbox": true}))
}

/// `GET /sandbox/requests`: every API call received, oldest first.
async fn requests(sb: web::Data<Sandbox>) -> HttpResponse {
    HttpResponse::Ok().json(json!({"sandbox": true, "requests": sb.lock().requests}))
}

/// The Snap page (`redirect_url`) and the other links it hands out: a
/// page that says what it is.
async fn page() -> HttpResponse {
    HttpResponse::Ok()
        .insert_header(("X-Tiergate-Sandbox", "true"))
        .content_type("text/html; charset=utf-8")
        .body(
            "<!doctype html><title>tiergate Midtrans sandbox</title>\
             <p>tiergate's local Midtrans <b>sandbox</b>: no money moves. \
             Pay with <code>tiergate sandbox pay ORDER_ID</code>.</p>",
        )
}

/// Acts in a running sandbox at `base` (`tiergate sandbox pay …`): its
/// answer, or why not.
pub async fn act(
    base: &str,
    order_id: &str,
    action: &str,
    twice: bool,
    stale: bool,
    method: Option<&str>,
) -> Result<Value, String> {
    let mut url = format!("{base}/sandbox/{order_id}/{action}?twice={twice}&stale={stale}");
    if let Some(m) = method {
        url.push_str("&method=");
        url.push_str(m);
    }
    let resp = reqwest::Client::new()
        .post(&url)
        .send()
        .await
        .map_err(|e| format!("the sandbox at {base} did not answer (is `tiergate sandbox` or `tiergate up --sandbox` running?): {e}"))?;
    let ok = resp.status().is_success();
    let body: Value = resp
        .json()
        .await
        .map_err(|e| format!("the sandbox answered no JSON: {e}"))?;
    if ok {
        Ok(body)
    } else {
        Err(body["error"]
            .as_str()
            .unwrap_or("the sandbox refused")
            .to_owned())
    }
}

/// A running sandbox.
pub struct RunningSandbox {
    /// Its address.
    pub addr: SocketAddr,
    server: backend_common::standin::Background,
    sandbox: web::Data<Sandbox>,
}

impl RunningSandbox {
    /// Sends notifications to `url` from now on (`None`: none, as if they
    /// were lost).
    pub fn set_notify_url(&self, url: Option<String>) {
        *self
            .sandbox
            .notify_url
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = url;
    }

    /// `http://addr`.
    pub fn base(&self) -> String {
        self.server.base()
    }

    /// Stops it.
    pub async fn stop(mut self) {
        self.server.stop().await;
    }

    /// Serves until the thread ends (`tiergate sandbox`).
    pub fn wait(mut self) {
        self.server.wait();
    }
}

/// Starts the sandbox on its own thread; returns once it listens.
pub fn start(config: SandboxConfig) -> std::io::Result<RunningSandbox> {
    let listener = TcpListener::bind(config.listen)?;
    let addr = listener.local_addr()?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .map_err(std::io::Error::other)?;
    let sandbox = web::Data::new(Sandbox {
        inner: Mutex::new(Inner {
            txns: HashMap::new(),
            replies: HashMap::new(),
            requests: Vec::new(),
            outage: 0,
        }),
        authorization: authorization(&config.server_key),
        key: config.server_key,
        notify_url: Mutex::new(config.notify_url),
        base: format!("http://{addr}"),
        http,
    });
    let shared = sandbox.clone();
    let server = backend_common::standin::spawn(
        "midtrans-sandbox",
        listener,
        move |cfg| {
            cfg.app_data(sandbox.clone())
                .app_data(web::PayloadConfig::new(1 << 20))
                .route("/v2/charge", web::post().to(charge))
                .route("/v2/{id}/status", web::get().to(status))
                .route(
                    "/v2/{id}/{action:cancel|expire|approve|deny|refund|refund/online/direct}",
                    web::post().to(modify),
                )
                .route("/snap/v1/transactions", web::post().to(snap))
                .route("/sandbox/requests", web::get().to(requests))
                .route("/sandbox/outage", web::post().to(outage))
                .route("/sandbox/{order_id}/tamper", web::post().to(tamper))
                .route("/sandbox/{order_id}/{action}", web::post().to(control))
                .default_service(web::get().to(page));
        },
        move |addr| {
            tracing::warn!(sandbox = true, %addr, "the local Midtrans SANDBOX is listening: no real money moves");
        },
    )?;
    Ok(RunningSandbox {
        addr,
        server,
        sandbox: shared,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_times_are_gmt_plus_7_without_a_zone() {
        // 2026-11-01T03:04:05Z is 10:04:05 in Jakarta.
        assert_eq!(wib(1_793_502_245_000), "2026-11-01 10:04:05");
    }

    #[test]
    fn test_body_codes_and_http_statuses() {
        assert_eq!(code_of(T::Pending), "201");
        assert_eq!(code_of(T::Expire), "407");
        assert_eq!(code_of(T::Deny), "202");
        assert_eq!(answer("407", Value::Null).status(), StatusCode::OK);
        assert_eq!(answer("201", Value::Null).status(), StatusCode::OK);
        assert_eq!(
            answer("406", Value::Null).status(),
            StatusCode::NOT_ACCEPTABLE
        );
        assert_eq!(
            answer("412", Value::Null).status(),
            StatusCode::PRECONDITION_FAILED
        );
    }

    #[test]
    fn test_order_ids_and_item_sums_are_checked() {
        assert!(validate_details(&json!({"transaction_details": {"order_id": "INV-2026-11-000123-1", "gross_amount": 10}})).is_ok());
        for bad in [
            json!({"transaction_details": {"order_id": "INV/2026", "gross_amount": 10}}),
            json!({"transaction_details": {"order_id": "x".repeat(51), "gross_amount": 10}}),
            json!({"transaction_details": {"order_id": "a", "gross_amount": 10.5}}),
            json!({"transaction_details": {"order_id": "a", "gross_amount": "10"}}),
            json!({"transaction_details": {"order_id": "a", "gross_amount": 10},
                   "item_details": [{"price": 9, "quantity": 1}]}),
        ] {
            assert!(validate_details(&bad).is_err(), "{bad}");
        }
    }
}
