//! The one JSON error envelope of every service:
//! `{"error":{"code","message","request_id","fields"?}}`.
//!
//! Services keep their own error enum (with one `status`/`code` match) and
//! convert it into [`ApiError`], which is the only type that renders an
//! error response. Extractor failures (malformed JSON, a bad path or query
//! parameter, a body over the limit) are routed here too by
//! [`crate::app`], so a client's mistake is always a 4xx in this shape.

use std::borrow::Cow;
use std::fmt;

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

use crate::request_id;

/// One invalid input field: its JSON path (`email`, `items[2].qty`) and
/// what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct FieldError {
    /// The field's path in the request body.
    pub field: String,
    /// A message a user can act on.
    pub message: String,
}

impl FieldError {
    /// A field error.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// An error response: status, a stable machine-readable code, a message
/// for humans and, for validation errors, the fields at fault.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: Cow<'static, str>,
    fields: Vec<FieldError>,
    retry_after: Option<u64>,
}

impl ApiError {
    /// An error with this status, code and message.
    pub fn new(
        status: StatusCode,
        code: &'static str,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            fields: Vec::new(),
            retry_after: None,
        }
    }

    /// 422 `validation_failed` with the fields at fault.
    pub fn validation(fields: Vec<FieldError>) -> Self {
        let mut e = Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "the request has invalid fields",
        );
        e.fields = fields;
        e
    }

    /// 400 with a code and message (a request that cannot be understood).
    pub fn bad_request(code: &'static str, message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 401 with a code and message.
    pub fn unauthorized(code: &'static str, message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code, message)
    }

    /// 403 with a code and message.
    pub fn forbidden(code: &'static str, message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::FORBIDDEN, code, message)
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 409 with a code and message.
    pub fn conflict(code: &'static str, message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    /// 500 `internal`. The cause is logged here, with the request id, and
    /// never shown to the client.
    pub fn internal(cause: &dyn fmt::Display) -> Self {
        tracing::error!(request_id = %request_id::current(), error = %cause, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; quote the request id when reporting it",
        )
    }

    /// 503 `unavailable`, with a `Retry-After` in seconds.
    pub fn unavailable(message: impl Into<Cow<'static, str>>, retry_after: u64) -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message);
        e.retry_after = Some(retry_after);
        e
    }

    /// The stable error code.
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The same error with a `Retry-After` of `secs` seconds.
    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    /// The `Retry-After` it is answered with, if any.
    pub fn retry_after(&self) -> Option<u64> {
        self.retry_after
    }

    /// The fields at fault (empty unless a validation error).
    pub fn fields(&self) -> &[FieldError] {
        &self.fields
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => {
                tracing::warn!(request_id = %request_id::current(), error = %e, "database unavailable");
                Self::unavailable("the database is unavailable", 1)
            }
            // A lock another connection held for longer than the busy
            // timeout: the database is busy, the request is not wrong.
            ref busy if crate::db::is_busy(busy) => {
                tracing::warn!(request_id = %request_id::current(), error = %e, "database busy");
                Self::unavailable("the database is busy", 1)
            }
            other => Self::internal(&other),
        }
    }
}

/// The envelope's shape, for OpenAPI documents.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorEnvelope {
    /// The error.
    pub error: ErrorBody,
}

/// The body of the envelope.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// Stable, machine-readable code (`validation_failed`, `not_found`, ...).
    pub code: String,
    /// What went wrong, for humans.
    pub message: String,
    /// The request id (the `X-Request-Id` header), for support.
    pub request_id: String,
    /// Present on validation errors: each field at fault.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fields: Option<Vec<FieldError>>,
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let body = ErrorEnvelope {
            error: ErrorBody {
                code: self.code.to_owned(),
                message: self.message.to_string(),
                request_id: request_id::current(),
                fields: (!self.fields.is_empty()).then(|| self.fields.clone()),
            },
        };
        let mut response = HttpResponse::build(self.status);
        if let Some(secs) = self.retry_after {
            response.insert_header(("Retry-After", secs.to_string()));
        }
        response.json(body)
    }
}

/// Checks done by request types' `validate` methods, collecting every
/// problem instead of stopping at the first.
#[derive(Debug, Default)]
pub struct Validator {
    fields: Vec<FieldError>,
}

impl Validator {
    /// An empty validator.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `message` against `field` when `ok` is false.
    pub fn check(&mut self, ok: bool, field: &str, message: impl Into<String>) -> &mut Self {
        if !ok {
            self.fields.push(FieldError::new(field, message));
        }
        self
    }

    /// Records a problem unconditionally.
    pub fn fail(&mut self, field: &str, message: impl Into<String>) -> &mut Self {
        self.fields.push(FieldError::new(field, message));
        self
    }

    /// `Ok` when nothing was recorded, else a 422 with every field.
    pub fn finish(&mut self) -> Result<(), ApiError> {
        if self.fields.is_empty() {
            Ok(())
        } else {
            Err(ApiError::validation(std::mem::take(&mut self.fields)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_validator_reports_every_field() {
        let mut v = Validator::new();
        v.check(false, "email", "required")
            .check(true, "name", "never")
            .check(false, "password", "too short");
        let e = v.finish().unwrap_err();
        assert_eq!(e.status_code(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(e.fields().len(), 2);
        assert_eq!(e.fields()[1].field, "password");
        assert!(Validator::new().finish().is_ok());
    }

    #[test]
    fn test_internal_error_hides_the_cause() {
        let e = ApiError::internal(&"connection string postgres://secret");
        assert_eq!(e.status_code(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!e.to_string().contains("secret"));
    }
}
