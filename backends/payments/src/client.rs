//! The Midtrans HTTP client: Core API (`/v2/charge`, status, cancel,
//! expire, refund) and Snap (`/snap/v1/transactions`), as the contract
//! says (external-apis.md §1): Basic auth with the server key, JSON both
//! ways, an error when the body's `status_code` is ≥ 401 and not 407 or
//! the HTTP status is ≥ 400, answers parsed leniently (Midtrans adds
//! fields). Calls that are safe to repeat (a `GET`, a `POST` with an
//! `Idempotency-Key`) are retried after a connection failure, a 5xx or a
//! 202 (the first request with that key still running).

use std::time::{Duration, Instant};

use prometheus::HistogramVec;
use serde_json::Value;

use backend_common::secret::Secret;

use crate::config::MidtransConfig;
use crate::midtrans::{authorization, is_error_code};

/// Why a Midtrans call gave no usable answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MidtransError {
    /// Midtrans answered an error: its `status_code` and `status_message`
    /// (or `error_messages`) kept for support.
    #[error("Midtrans refused ({http}, status_code {status_code}): {message}")]
    Refused {
        /// HTTP status.
        http: u16,
        /// The body's `status_code` (the HTTP status when it has none).
        status_code: String,
        /// `status_message`, `validation_messages` or `error_messages`.
        message: String,
    },
    /// Not reached, or 5xx after the retries: nothing is known to have
    /// happened; safe to try again with the same key.
    #[error("Midtrans is unavailable: {0}")]
    Unavailable(String),
    /// 2xx with a body that is not what the contract says.
    #[error("Midtrans answered something unexpected: {0}")]
    Invalid(String),
}

impl MidtransError {
    /// The body's `status_code` of a refusal.
    pub fn status_code(&self) -> Option<&str> {
        match self {
            Self::Refused { status_code, .. } => Some(status_code),
            _ => None,
        }
    }
}

/// A Snap transaction: what Snap.js needs.
#[derive(Debug, Clone)]
pub struct SnapToken {
    /// For `snap.pay(token)`.
    pub token: String,
    /// The hosted payment page (opaque).
    pub redirect_url: String,
}

/// The client. Cheap to clone.
#[derive(Clone)]
pub struct Midtrans {
    http: reqwest::Client,
    api: String,
    snap: String,
    authorization: Secret<String>,
    /// Seconds per HTTP exchange, by operation and outcome.
    latency: Option<HistogramVec>,
}

impl std::fmt::Debug for Midtrans {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Midtrans")
            .field("api", &self.api)
            .field("snap", &self.snap)
            .field("authorization", &self.authorization)
            .finish()
    }
}

/// Pauses between retries of a repeatable call.
const RETRY_PAUSES: [Duration; 2] = [Duration::from_millis(200), Duration::from_millis(800)];

/// A `status_message`-like text of an answer body.
fn message_of(body: &Value) -> String {
    if let Some(m) = body["status_message"].as_str() {
        let extra = body["validation_messages"]
            .as_array()
            .map(|v| {
                v.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join("; ")
            })
            .filter(|s| !s.is_empty());
        return match extra {
            Some(e) => format!("{m} ({e})"),
            None => m.to_owned(),
        };
    }
    if let Some(list) = body["error_messages"].as_array() {
        return list
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join("; ");
    }
    "no message".to_owned()
}

impl Midtrans {
    /// A client for `config` with `server_key`. Fails only when the HTTP
    /// client cannot be built.
    pub fn new(config: &MidtransConfig, server_key: &Secret<String>) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| format!("cannot build the Midtrans client: {e}"))?;
        Ok(Self {
            http,
            api: config.api_base().to_owned(),
            snap: config.snap_base().to_owned(),
            authorization: Secret::new(authorization(server_key.expose())),
            latency: None,
        })
    }

    /// Records each exchange's time in `latency` (labels `operation`,
    /// `outcome`).
    pub fn with_latency(mut self, latency: HistogramVec) -> Self {
        self.latency = Some(latency);
        self
    }

    /// `POST /v2/charge`.
    pub async fn charge(
        &self,
        body: &Value,
        idempotency_key: &str,
    ) -> Result<Value, MidtransError> {
        let url = format!("{}/v2/charge", self.api);
        self.call(
            reqwest::Method::POST,
            url,
            Some(body),
            Some(idempotency_key),
        )
        .await
    }

    /// `POST /snap/v1/transactions` (HTTP 201 `{token, redirect_url}`).
    pub async fn snap(
        &self,
        body: &Value,
        idempotency_key: &str,
    ) -> Result<SnapToken, MidtransError> {
        let url = format!("{}/snap/v1/transactions", self.snap);
        let answer = self
            .call(
                reqwest::Method::POST,
                url,
                Some(body),
                Some(idempotency_key),
            )
            .await?;
        match (answer["token"].as_str(), answer["redirect_url"].as_str()) {
            (Some(t), Some(r)) if !t.is_empty() => Ok(SnapToken {
                token: t.to_owned(),
                redirect_url: r.to_owned(),
            }),
            _ => Err(MidtransError::Invalid(
                "a Snap answer without token and redirect_url".into(),
            )),
        }
    }

    /// `GET /v2/{order_id}/status`: `None` when Midtrans has no such
    /// transaction (404; a Snap order before the customer chose a method).
    pub async fn status(&self, order_id: &str) -> Result<Option<Value>, MidtransError> {
        let url = format!("{}/v2/{order_id}/status", self.api);
        match self.call(reqwest::Method::GET, url, None, None).await {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.status_code() == Some("404") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `POST /v2/{order_id}/cancel`.
    pub async fn cancel(
        &self,
        order_id: &str,
        idempotency_key: &str,
    ) -> Result<Value, MidtransError> {
        let url = format!("{}/v2/{order_id}/cancel", self.api);
        self.call(reqwest::Method::POST, url, None, Some(idempotency_key))
            .await
    }

    /// `POST /v2/{order_id}/expire` (answers `status_code` 407: success).
    pub async fn expire(
        &self,
        order_id: &str,
        idempotency_key: &str,
    ) -> Result<Value, MidtransError> {
        let url = format!("{}/v2/{order_id}/expire", self.api);
        self.call(reqwest::Method::POST, url, None, Some(idempotency_key))
            .await
    }

    /// `POST /v2/{order_id}/refund {refund_key, amount, reason}`.
    pub async fn refund(
        &self,
        order_id: &str,
        refund_key: &str,
        amount: i64,
        reason: &str,
    ) -> Result<Value, MidtransError> {
        let url = format!("{}/v2/{order_id}/refund", self.api);
        let body =
            serde_json::json!({"refund_key": refund_key, "amount": amount, "reason": reason});
        self.call(reqwest::Method::POST, url, Some(&body), Some(refund_key))
            .await
    }

    async fn call(
        &self,
        method: reqwest::Method,
        url: String,
        body: Option<&Value>,
        idempotency_key: Option<&str>,
    ) -> Result<Value, MidtransError> {
        let repeatable = method == reqwest::Method::GET || idempotency_key.is_some();
        let mut pauses = RETRY_PAUSES.iter();
        loop {
            let started = Instant::now();
            let outcome = self.once(&method, &url, body, idempotency_key).await;
            if let Some(h) = &self.latency {
                let result = match &outcome {
                    Ok(_) => "ok",
                    Err(MidtransError::Refused { .. }) => "refused",
                    Err(MidtransError::Unavailable(_)) => "unavailable",
                    Err(MidtransError::Invalid(_)) => "invalid",
                };
                h.with_label_values(&[operation_of(&url), result])
                    .observe(started.elapsed().as_secs_f64());
            }
            let again = matches!(&outcome, Err(MidtransError::Unavailable(_))) && repeatable;
            match (again, pauses.next()) {
                (true, Some(pause)) => tokio::time::sleep(*pause).await,
                _ => return outcome,
            }
        }
    }

    async fn once(
        &self,
        method: &reqwest::Method,
        url: &str,
        body: Option<&Value>,
        idempotency_key: Option<&str>,
    ) -> Result<Value, MidtransError> {
        let mut req = self
            .http
            .request(method.clone(), url)
            .header("accept", "application/json")
            .header("content-type", "application/json")
            .header("authorization", self.authorization.expose().as_str());
        if let Some(key) = idempotency_key {
            req = req.header("idempotency-key", key);
        }
        if let Some(b) = body {
            req = req.body(b.to_string());
        } else if method == reqwest::Method::POST {
            req = req.body("{}");
        }
        let resp = req.send().await.map_err(|e| {
            // A timeout after sending is as unknown as a 5xx: the call is
            // only repeated with its idempotency key (or as a GET).
            MidtransError::Unavailable(format!("{method} {}: {e}", path_of(url)))
        })?;
        let http = resp.status().as_u16();
        let text = resp
            .text()
            .await
            .map_err(|e| MidtransError::Unavailable(format!("reading the answer: {e}")))?;
        if http == 202 && text.trim().is_empty() || http >= 500 {
            return Err(MidtransError::Unavailable(format!(
                "{method} {} answered HTTP {http}",
                path_of(url)
            )));
        }
        let value: Value = serde_json::from_str(&text).map_err(|e| {
            if http >= 400 {
                MidtransError::Refused {
                    http,
                    status_code: http.to_string(),
                    message: format!("HTTP {http} without a JSON body"),
                }
            } else {
                MidtransError::Invalid(format!("not JSON: {e}"))
            }
        })?;
        let code = value["status_code"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| http.to_string());
        // Snap answers 201 with no status_code; Core answers always carry
        // one.
        let code_error = value.get("status_code").is_some() && is_error_code(&code);
        if http >= 400 || code_error {
            if code.starts_with('5') {
                return Err(MidtransError::Unavailable(format!(
                    "status_code {code}: {}",
                    message_of(&value)
                )));
            }
            return Err(MidtransError::Refused {
                http,
                status_code: code,
                message: message_of(&value),
            });
        }
        Ok(value)
    }
}

/// The operation a Midtrans URL names (a metric label: never the order).
fn operation_of(url: &str) -> &'static str {
    match url.rsplit('/').next() {
        Some("charge") => "charge",
        Some("transactions") => "snap",
        Some("status") => "status",
        Some("cancel") => "cancel",
        Some("expire") => "expire",
        Some("refund" | "direct") => "refund",
        _ => "other",
    }
}

/// The path of a URL, for logs (no host, no query).
fn path_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let path = rest.find('/').map_or("/", |i| &rest[i..]);
    path.split('?').next().unwrap_or(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn test_operations_of_urls_never_carry_the_order() {
        let api = "https://api.sandbox.midtrans.com";
        for (url, op) in [
            (format!("{api}/v2/charge"), "charge"),
            (format!("{api}/snap/v1/transactions"), "snap"),
            (format!("{api}/v2/INV-2026-12-000001-1/status"), "status"),
            (format!("{api}/v2/INV-2026-12-000001-1/cancel"), "cancel"),
            (format!("{api}/v2/INV-2026-12-000001-1/expire"), "expire"),
            (format!("{api}/v2/INV-2026-12-000001-1/refund"), "refund"),
            (
                format!("{api}/v2/INV-2026-12-000001-1/refund/online/direct"),
                "refund",
            ),
            (format!("{api}/v2/INV-2026-12-000001-1"), "other"),
        ] {
            assert_eq!(operation_of(&url), op, "{url}");
        }
    }

    #[test]
    fn test_messages_of_answers() {
        assert_eq!(
            message_of(&json!({"status_code": "400", "status_message": "One or more parameters in the payload is invalid.",
                "validation_messages": ["transaction_details.gross_amount is required"]})),
            "One or more parameters in the payload is invalid. (transaction_details.gross_amount is required)"
        );
        assert_eq!(
            message_of(
                &json!({"error_messages": ["transaction_details.gross_amount is not equal to the sum of item_details", "x"]})
            ),
            "transaction_details.gross_amount is not equal to the sum of item_details; x"
        );
        assert_eq!(message_of(&json!({})), "no message");
        assert_eq!(
            path_of("https://api.sandbox.midtrans.com/v2/INV-1/status?x=1"),
            "/v2/INV-1/status"
        );
    }
}
