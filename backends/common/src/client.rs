//! Calling another service: one client for every service-to-service call.
//! Each call gets a fresh service token for the service called, a timeout,
//! and — when it is safe to send again (a `GET`, or a `POST` with an
//! `Idempotency-Key`) — up to two retries after a connection failure, a
//! timeout or a 502/503/504. The other service's JSON error envelope comes
//! back as a typed [`CallError`].
//!
//! A call that is not safe to repeat and fails after it was sent (a
//! timeout, a dropped connection) has an unknown outcome: the other side
//! may have acted. That is [`CallError::Indeterminate`], answered 502
//! without `Retry-After`, never "unavailable, try again". Calls that move
//! money send an idempotency key.
//!
//! ```no_run
//! # async fn f(client: backend_common::client::ServiceClient) -> Result<(), backend_common::client::CallError> {
//! #[derive(serde::Deserialize)]
//! struct Invoice { total: i64 }
//! let invoice: Invoice = client.get("billing", "/internal/invoices/inv_1").await?;
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::StatusCode;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::ApiError;
use crate::service_auth::ServiceKeys;

/// Why a call to another service did not give the expected answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No answer: the service is down, unreachable, or too slow.
    #[error("{service} is unavailable: {why}")]
    Unavailable {
        /// The service called.
        service: String,
        /// What happened.
        why: String,
    },
    /// It answered with an error (its envelope's code and message).
    #[error("{service} answered {status} {code}: {message}")]
    Refused {
        /// The service called.
        service: String,
        /// HTTP status.
        status: u16,
        /// Its error code (`not_found`, `validation_failed`, ...).
        code: String,
        /// Its message.
        message: String,
    },
    /// The call was sent and may have been acted on, but no answer came
    /// (a timeout, a dropped connection), and it is not safe to repeat.
    #[error("{service} may or may not have acted: {why}")]
    Indeterminate {
        /// The service called.
        service: String,
        /// What happened.
        why: String,
    },
    /// It answered 2xx with a body that is not what was expected.
    #[error("{service} answered something unexpected: {why}")]
    Invalid {
        /// The service called.
        service: String,
        /// What was wrong.
        why: String,
    },
    /// No base URL is known for it.
    #[error("no address is configured for service `{0}`")]
    Unknown(String),
}

impl CallError {
    /// The status the other service answered, when it answered an error.
    pub fn status(&self) -> Option<u16> {
        match self {
            CallError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether it was `not_found` (a 404).
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }
}

impl From<CallError> for ApiError {
    /// What a handler answers when a call it depends on fails: 503 with
    /// `Retry-After` when the other service is unavailable (the call was
    /// not made, or is safe to make again), 502 otherwise — a refusal
    /// (logged, not passed through: it is not the client's to read), an
    /// unexpected answer, or an outcome that is unknown.
    fn from(e: CallError) -> Self {
        match &e {
            CallError::Unavailable { service, .. } => {
                tracing::warn!(error = %e, "a service this request needs is unavailable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "dependency_unavailable",
                    format!("the {service} service is unavailable; try again shortly"),
                )
                .with_retry_after(5)
            }
            _ => {
                tracing::error!(error = %e, "a call to another service failed");
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "dependency_failed",
                    "a service this request needs failed; quote the request id when reporting it",
                )
            }
        }
    }
}

/// The client. Cheap to clone.
#[derive(Clone)]
pub struct ServiceClient {
    http: reqwest::Client,
    keys: ServiceKeys,
    peers: Arc<BTreeMap<String, String>>,
    retries: u32,
}

impl std::fmt::Debug for ServiceClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceClient")
            .field("caller", &self.keys.name())
            .field("peers", &self.peers)
            .finish_non_exhaustive()
    }
}

/// Default per-call timeout.
pub const TIMEOUT: Duration = Duration::from_secs(5);

impl ServiceClient {
    /// A client calling as the owner of `keys`, reaching each service at
    /// its base URL in `peers` (`http://host:port`). Fails only when the
    /// HTTP client cannot be built (no TLS backend).
    pub fn new(
        keys: ServiceKeys,
        peers: BTreeMap<String, String>,
        timeout: Duration,
    ) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| format!("cannot build the service client: {e}"))?;
        Ok(Self {
            http,
            keys,
            peers: Arc::new(peers),
            retries: 2,
        })
    }

    /// `GET <service><path>`, JSON answer. Retried when safe.
    pub async fn get<T: DeserializeOwned>(
        &self,
        service: &str,
        path: &str,
    ) -> Result<T, CallError> {
        let body = self.get_bytes(service, path).await?;
        parse(service, &body)
    }

    /// `GET <service><path>`, the answer's bytes as they are (a PDF).
    /// Retried when safe.
    pub async fn get_bytes(&self, service: &str, path: &str) -> Result<bytes::Bytes, CallError> {
        self.call(service, reqwest::Method::GET, path, None::<&()>, None, true)
            .await
    }

    /// `POST <service><path>` with a JSON body, JSON answer. With an
    /// idempotency key (sent as `Idempotency-Key`) it is retried like a
    /// `GET`; without, it is sent once.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        service: &str,
        path: &str,
        body: &B,
        idempotency_key: Option<&str>,
    ) -> Result<T, CallError> {
        let retry = idempotency_key.is_some();
        let answer = self
            .call(
                service,
                reqwest::Method::POST,
                path,
                Some(body),
                idempotency_key,
                retry,
            )
            .await?;
        parse(service, &answer)
    }

    async fn call<B: Serialize>(
        &self,
        service: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<&B>,
        idempotency_key: Option<&str>,
        retry: bool,
    ) -> Result<bytes::Bytes, CallError> {
        let base = self
            .peers
            .get(service)
            .ok_or_else(|| CallError::Unknown(service.to_owned()))?;
        let url = format!("{base}{path}");
        let attempts = if retry { 1 + self.retries } else { 1 };
        let mut last = None;
        for attempt in 0..attempts {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(100 * 3u64.pow(attempt - 1))).await;
            }
            let mut req = self
                .http
                .request(method.clone(), &url)
                .bearer_auth(self.keys.issue(service))
                .header("x-request-id", crate::request_id::current());
            if let Some(key) = idempotency_key {
                req = req.header("idempotency-key", key);
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            let outcome = match req.send().await {
                // Never reached the other side: safe to call unavailable.
                Err(e) if e.is_connect() || retry => Err(CallError::Unavailable {
                    service: service.to_owned(),
                    why: e.without_url().to_string(),
                }),
                Err(e) => Err(CallError::Indeterminate {
                    service: service.to_owned(),
                    why: e.without_url().to_string(),
                }),
                Ok(r) => decode(service, r, retry).await,
            };
            match outcome {
                Err(e @ CallError::Unavailable { .. }) => last = Some(e),
                Err(
                    e @ CallError::Refused {
                        status: 502..=504, ..
                    },
                ) => last = Some(e),
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| CallError::Unavailable {
            service: service.to_owned(),
            why: "no attempt made".to_owned(),
        }))
    }
}

/// A success's body as `T`.
fn parse<T: DeserializeOwned>(service: &str, body: &[u8]) -> Result<T, CallError> {
    serde_json::from_slice(body).map_err(|e| CallError::Invalid {
        service: service.to_owned(),
        why: e.to_string(),
    })
}

/// The body of a successful answer `r`, or the error it says. `safe`: the
/// call may be repeated, so an answer cut off is "unavailable" rather than
/// "indeterminate".
async fn decode(
    service: &str,
    r: reqwest::Response,
    safe: bool,
) -> Result<bytes::Bytes, CallError> {
    let status = r.status();
    let bytes = r.bytes().await.map_err(|e| {
        let why = format!("reading the answer: {}", e.without_url());
        if safe {
            CallError::Unavailable {
                service: service.to_owned(),
                why,
            }
        } else {
            CallError::Indeterminate {
                service: service.to_owned(),
                why,
            }
        }
    })?;
    if status.is_success() {
        return Ok(bytes);
    }
    let envelope: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let text = |k: &str| envelope["error"][k].as_str().unwrap_or_default().to_owned();
    Err(CallError::Refused {
        service: service.to_owned(),
        status: status.as_u16(),
        code: text("code"),
        message: text("message"),
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::service_auth::KeySource;

    fn keys(dir: &std::path::Path) -> ServiceKeys {
        ServiceKeys::load(&KeySource::development("billing", dir)).unwrap()
    }

    fn temp() -> PathBuf {
        std::env::temp_dir().join(format!("tg-client-{}", uuid::Uuid::now_v7()))
    }

    fn client_for(dir: &std::path::Path, base: &str) -> ServiceClient {
        let peers = BTreeMap::from([("users".to_owned(), base.to_owned())]);
        ServiceClient::new(keys(dir), peers, Duration::from_millis(500)).unwrap()
    }

    #[tokio::test]
    async fn test_safe_calls_are_retried_and_errors_are_typed() {
        let dir = temp();
        // 503, 503, then the answer.
        let server = crate::test_http::serve(|_, n| match n {
            0 | 1 => (
                503,
                r#"{"error":{"code":"busy","message":"later"}}"#.to_owned(),
            ),
            _ => (200, r#"{"id":"u1"}"#.to_owned()),
        })
        .await;
        let c = client_for(&dir, &server.base);
        let got: serde_json::Value = c.get("users", "/internal/users/u1").await.unwrap();
        assert_eq!(got["id"], "u1");
        assert_eq!(server.hits(), 3);

        // A POST without an idempotency key is sent once; with one, retried.
        let server = crate::test_http::serve(|_, _| {
            (
                503,
                r#"{"error":{"code":"busy","message":"later"}}"#.to_owned(),
            )
        })
        .await;
        let c = client_for(&dir, &server.base);
        let e = c
            .post::<_, serde_json::Value>("users", "/x", &serde_json::json!({}), None)
            .await
            .unwrap_err();
        assert_eq!(server.hits(), 1);
        assert_eq!(e.status(), Some(503));
        let _ = c
            .post::<_, serde_json::Value>("users", "/x", &serde_json::json!({}), Some("k-1"))
            .await;
        assert_eq!(server.hits(), 4);

        // Refusals keep the other side's code; they are not retried.
        let server = crate::test_http::serve(|line, _| {
            assert!(line.starts_with("GET /internal/users/nobody "), "{line}");
            (
                404,
                r#"{"error":{"code":"not_found","message":"no such user"}}"#.to_owned(),
            )
        })
        .await;
        let c = client_for(&dir, &server.base);
        let e = c
            .get::<serde_json::Value>("users", "/internal/users/nobody")
            .await
            .unwrap_err();
        assert!(e.is_not_found());
        assert!(
            matches!(&e, CallError::Refused { code, message, .. } if code == "not_found" && message == "no such user"),
            "{e:?}"
        );
        assert_eq!(server.hits(), 1);
        assert_eq!(ApiError::from(e).status().as_u16(), 502);

        // A 2xx that is not the expected shape, an unknown service, nobody
        // listening.
        let server = crate::test_http::serve(|_, _| (200, "[1,2]".to_owned())).await;
        let c = client_for(&dir, &server.base);
        #[derive(Debug, serde::Deserialize)]
        struct User {
            #[allow(dead_code)]
            id: String,
        }
        let e = c.get::<User>("users", "/u").await.unwrap_err();
        assert!(matches!(e, CallError::Invalid { .. }), "{e:?}");
        let e = c.get::<User>("ledger", "/u").await.unwrap_err();
        assert!(matches!(e, CallError::Unknown(_)), "{e:?}");
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", l.local_addr().unwrap())
        };
        let e = client_for(&dir, &closed)
            .get::<User>("users", "/u")
            .await
            .unwrap_err();
        assert!(matches!(e, CallError::Unavailable { .. }), "{e:?}");
        let api = ApiError::from(e);
        assert_eq!(api.status().as_u16(), 503);

        // A peer that takes the request and never answers: a POST without
        // a key may have been acted on (502, no invitation to retry); a GET
        // is retried, then unavailable (503).
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent_base = format!("http://{}", silent.local_addr().unwrap());
        let c = client_for(&dir, &silent_base);
        let e = c
            .post::<_, serde_json::Value>("users", "/charge", &serde_json::json!({}), None)
            .await
            .unwrap_err();
        assert!(matches!(e, CallError::Indeterminate { .. }), "{e:?}");
        let api = ApiError::from(e);
        assert_eq!(api.status().as_u16(), 502);
        assert!(api.retry_after().is_none());
        let e = c.get::<User>("users", "/u").await.unwrap_err();
        assert!(matches!(e, CallError::Unavailable { .. }), "{e:?}");
        drop(silent);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn test_each_call_carries_a_fresh_token_for_the_service_called() {
        let dir = temp();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let server = {
            let seen = seen.clone();
            crate::test_http::serve(move |line, _| {
                seen.lock().unwrap().push(line.to_owned());
                (200, "{}".to_owned())
            })
            .await
        };
        let c = client_for(&dir, &server.base);
        for _ in 0..2 {
            let _: serde_json::Value = c.get("users", "/a").await.unwrap();
        }
        assert_eq!(seen.lock().unwrap().len(), 2);
        // The tokens themselves: verified by the callee's keys.
        let callee = ServiceKeys::load(&KeySource::development("users", &dir)).unwrap();
        let caller = keys(&dir);
        let (t1, t2) = (caller.issue("users"), caller.issue("users"));
        assert_ne!(t1, t2);
        assert_eq!(callee.verify(&t1, &["billing"]).unwrap().sub, "billing");
        assert!(
            callee.verify(&t1, &["billing"]).is_err(),
            "a token is good for one call"
        );
        assert!(
            callee.verify(&t2, &["payments"]).is_err(),
            "not a caller of this route"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
