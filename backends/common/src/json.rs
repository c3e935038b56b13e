//! A JSON body extractor whose every failure is a 4xx in the envelope:
//! 415 for another content type, 413 over the body limit, 400 for
//! malformed JSON, 422 (with the field's path) for a well-formed body of
//! the wrong shape: a missing or unknown field, a wrong type.

use actix_web::dev::Payload;
use actix_web::http::{header, StatusCode};
use actix_web::{FromRequest, HttpRequest};
use futures_util::future::LocalBoxFuture;
use futures_util::StreamExt;
use serde::de::DeserializeOwned;

use crate::error::{ApiError, FieldError};

/// The largest JSON body accepted, in bytes (an app-data value; 64 KiB
/// when absent).
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);

/// Default [`BodyLimit`].
pub const DEFAULT_BODY_LIMIT: usize = 64 * 1024;

/// A JSON request body of type `T`.
#[derive(Debug)]
pub struct Json<T>(pub T);

impl<T: DeserializeOwned + 'static> FromRequest for Json<T> {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let limit = req
            .app_data::<BodyLimit>()
            .map_or(DEFAULT_BODY_LIMIT, |l| l.0);
        let content_type_ok = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            })
            .is_some_and(|m| m == "application/json" || m.ends_with("+json"));
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        let mut payload = payload.take();
        Box::pin(async move {
            if !content_type_ok {
                return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_media_type",
                    "the body must be JSON (Content-Type: application/json)",
                ));
            }
            let too_large = || {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!("the body is larger than {limit} bytes"),
                )
            };
            if declared.is_some_and(|n| n > limit) {
                return Err(too_large());
            }
            let mut body = Vec::with_capacity(declared.unwrap_or(0));
            while let Some(chunk) = payload.next().await {
                let chunk = chunk.map_err(|e| {
                    ApiError::bad_request(
                        "unreadable_body",
                        format!("the body could not be read: {e}"),
                    )
                })?;
                if body.len() + chunk.len() > limit {
                    return Err(too_large());
                }
                body.extend_from_slice(&chunk);
            }
            parse(&body).map(Json)
        })
    }
}

/// Parses a JSON body, turning serde's errors into the envelope's.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "malformed_json",
            "a JSON body is required",
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    match serde_path_to_error::deserialize::<_, T>(&mut *de) {
        Ok(v) => match de.end() {
            Ok(()) => Ok(v),
            Err(e) => Err(ApiError::bad_request(
                "malformed_json",
                format!("the body is not valid JSON: {e}"),
            )),
        },
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if inner.is_data() {
                let message = strip_position(&inner.to_string());
                let field = if path == "." {
                    quoted_name(&message).unwrap_or_default()
                } else if let Some(name) =
                    quoted_name(&message).filter(|_| message.starts_with("missing field"))
                {
                    format!("{path}.{name}")
                } else {
                    path
                };
                let message = message
                    .split(", expected one of")
                    .next()
                    .unwrap_or(&message)
                    .to_owned();
                Err(ApiError::validation(vec![FieldError::new(field, message)]))
            } else {
                Err(ApiError::bad_request(
                    "malformed_json",
                    format!("the body is not valid JSON: {}", inner),
                ))
            }
        }
    }
}

/// serde_json appends " at line L column C"; the field path says more.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

/// The first name between backticks (`missing field `email``).
fn quoted_name(message: &str) -> Option<String> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(message[start..start + len].to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        email: String,
        inner: Option<Inner>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        n: u32,
    }

    fn field_of(body: &str) -> (String, String) {
        let e = parse::<Body>(body.as_bytes()).unwrap_err();
        assert_eq!(e.code(), "validation_failed", "{body}");
        let f = &e.fields()[0];
        (f.field.clone(), f.message.clone())
    }

    #[test]
    fn test_shape_errors_name_the_field() {
        assert_eq!(field_of(r#"{}"#).0, "email");
        assert_eq!(field_of(r#"{"email":5}"#).0, "email");
        let (field, message) = field_of(r#"{"email":"a","extra":1}"#);
        assert_eq!(field, "extra");
        assert!(message.starts_with("unknown field `extra`"), "{message}");
        assert_eq!(field_of(r#"{"email":"a","inner":{"n":"x"}}"#).0, "inner.n");
        assert_eq!(field_of(r#"{"email":"a","inner":{}}"#).0, "inner.n");
        // The wrong top-level type is a shape error too.
        let _ = field_of(r#"[1]"#);
    }

    #[test]
    fn test_syntax_errors_are_400() {
        for body in ["{", "not json", "", "  ", r#"{"email":"a"} trailing"#] {
            let e = parse::<Body>(body.as_bytes()).unwrap_err();
            assert_eq!(e.code(), "malformed_json", "{body:?}");
        }
    }
}
