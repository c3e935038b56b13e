//! Responses the gateway writes itself: the one JSON error envelope
//! `{"error":{"code","message","request_id","trace_id"}}` (`trace_id` only
//! on the proxy listener, where requests belong to a trace).

use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use lua_free_plugins::{Chain, PluginCtx, Response as PluginResponse};
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::ResponseHeader;
use pingora_proxy::Session;

use crate::request_id::X_REQUEST_ID;

/// A gateway-made error response.
#[derive(Debug, Clone)]
pub struct ErrorResponse {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code, e.g. `route_not_found`.
    pub code: &'static str,
    /// Human-readable explanation.
    pub message: &'static str,
}

impl ErrorResponse {
    /// Builds the JSON body; `trace_id` is included when known.
    pub fn body(&self, request_id: &str, trace_id: Option<&str>) -> Bytes {
        let mut v = serde_json::json!({
            "error": {
                "code": self.code,
                "message": self.message,
                "request_id": request_id,
            }
        });
        if let Some(t) = trace_id {
            v["error"]["trace_id"] = t.into();
        }
        Bytes::from(v.to_string())
    }

    /// Writes the whole response to the client.
    pub async fn write(
        &self,
        session: &mut Session,
        request_id: &HeaderValue,
        trace_id: Option<&str>,
        extra: &[(&'static str, HeaderValue)],
    ) -> Result<()> {
        let body = self.body(request_id.to_str().unwrap_or(""), trace_id);
        write_json(session, self.status, request_id, body, extra).await
    }
}

/// No route for this host and path.
pub const NOT_FOUND: ErrorResponse = ErrorResponse {
    status: StatusCode::NOT_FOUND,
    code: "route_not_found",
    message: "no route matches this request",
};

/// A route matches the path but not the method.
pub const METHOD_NOT_ALLOWED: ErrorResponse = ErrorResponse {
    status: StatusCode::METHOD_NOT_ALLOWED,
    code: "method_not_allowed",
    message: "this path does not accept this method; see the Allow header",
};

/// The upstream could not be reached or broke the exchange.
pub const BAD_GATEWAY: ErrorResponse = ErrorResponse {
    status: StatusCode::BAD_GATEWAY,
    code: "upstream_unavailable",
    message: "the upstream service could not be reached",
};

/// The upstream sent an invalid response.
pub const BAD_UPSTREAM_RESPONSE: ErrorResponse = ErrorResponse {
    status: StatusCode::BAD_GATEWAY,
    code: "upstream_bad_response",
    message: "the upstream service sent an invalid response",
};

/// The upstream did not answer in time.
pub const GATEWAY_TIMEOUT: ErrorResponse = ErrorResponse {
    status: StatusCode::GATEWAY_TIMEOUT,
    code: "upstream_timeout",
    message: "the upstream service did not answer in time",
};

/// Every backend of the pool was tried.
pub const NO_BACKEND: ErrorResponse = ErrorResponse {
    status: StatusCode::SERVICE_UNAVAILABLE,
    code: "no_backend_available",
    message: "no backend of this upstream is available",
};

/// The request was malformed.
pub const BAD_REQUEST: ErrorResponse = ErrorResponse {
    status: StatusCode::BAD_REQUEST,
    code: "bad_request",
    message: "the request could not be parsed",
};

/// The client was too slow sending its request.
pub const REQUEST_TIMEOUT: ErrorResponse = ErrorResponse {
    status: StatusCode::REQUEST_TIMEOUT,
    code: "request_timeout",
    message: "the request was not received in time",
};

/// A bug or resource problem inside the gateway.
pub const INTERNAL: ErrorResponse = ErrorResponse {
    status: StatusCode::INTERNAL_SERVER_ERROR,
    code: "internal_error",
    message: "the gateway failed to handle this request",
};

/// Maps a Pingora error to the response the client gets; `None` when the
/// client is gone and nothing can be written.
pub fn error_response(e: &Error) -> Option<ErrorResponse> {
    use ErrorType as T;
    Some(match e.etype() {
        T::HTTPStatus(400) => BAD_REQUEST,
        T::HTTPStatus(408) => REQUEST_TIMEOUT,
        T::HTTPStatus(502) => BAD_GATEWAY,
        T::HTTPStatus(503) => NO_BACKEND,
        T::HTTPStatus(504) => GATEWAY_TIMEOUT,
        T::HTTPStatus(code) => match StatusCode::from_u16(*code) {
            Ok(status) if status.is_client_error() => ErrorResponse {
                status,
                ..BAD_REQUEST
            },
            _ => INTERNAL,
        },
        etype => match e.esource() {
            ErrorSource::Upstream => match etype {
                T::ConnectTimedout | T::ReadTimedout | T::WriteTimedout => GATEWAY_TIMEOUT,
                T::InvalidHTTPHeader | T::H1Error | T::H2Error | T::InvalidH2 => {
                    BAD_UPSTREAM_RESPONSE
                }
                _ => BAD_GATEWAY,
            },
            ErrorSource::Downstream => match etype {
                T::ReadError | T::WriteError | T::ConnectionClosed => return None,
                T::ReadTimedout => REQUEST_TIMEOUT,
                _ => BAD_REQUEST,
            },
            ErrorSource::Internal | ErrorSource::Unset => match etype {
                T::ConnectTimedout => GATEWAY_TIMEOUT,
                T::ConnectRefused | T::ConnectNoRoute | T::ConnectError => BAD_GATEWAY,
                _ => INTERNAL,
            },
        },
    })
}

/// Writes a JSON response the gateway produced itself: status, JSON
/// content type, length, request id, `Cache-Control: no-store`, plus `extra`
/// headers; no body for `HEAD`.
pub async fn write_json(
    session: &mut Session,
    status: StatusCode,
    request_id: &HeaderValue,
    body: Bytes,
    extra: &[(&'static str, HeaderValue)],
) -> Result<()> {
    write(session, status, "application/json", request_id, body, extra).await
}

/// [`write_json`] with another content type.
pub async fn write(
    session: &mut Session,
    status: StatusCode,
    content_type: &'static str,
    request_id: &HeaderValue,
    body: Bytes,
    extra: &[(&'static str, HeaderValue)],
) -> Result<()> {
    let mut h = ResponseHeader::build(status, Some(4 + extra.len()))?;
    h.insert_header("content-type", content_type)?;
    h.insert_header("content-length", body.len().to_string())?;
    h.insert_header("cache-control", "no-store")?;
    h.insert_header("x-request-id", request_id.clone())?;
    for (name, value) in extra {
        h.insert_header(*name, value.clone())?;
    }
    let head_only = session.req_header().method == http::Method::HEAD;
    session
        .write_response_header(Box::new(h), head_only)
        .await?;
    if !head_only {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

/// Writes a plugin's response, after the chain's `response` hooks (with
/// `Content-Length` and the request id).
pub async fn write_plugin_response(
    session: &mut Session,
    request_id: &HeaderValue,
    chain: &Chain,
    resp: PluginResponse,
    p: &mut PluginCtx,
) -> Result<()> {
    let mut h = ResponseHeader::build(resp.status, Some(resp.headers.len() + 2))?;
    for (name, value) in resp.headers {
        h.append_header(name, value)?;
    }
    // No Content-Length on statuses that cannot have a body (RFC 9110).
    if !matches!(resp.status.as_u16(), 100..=199 | 204 | 304) {
        h.insert_header(http::header::CONTENT_LENGTH, resp.body.len())?;
    }
    h.insert_header(X_REQUEST_ID.clone(), request_id.clone())?;
    chain.response(session.req_header(), &mut h, p);
    let head_only = session.req_header().method == http::Method::HEAD || resp.body.is_empty();
    session
        .write_response_header(Box::new(h), head_only)
        .await?;
    if !head_only {
        session.write_response_body(Some(resp.body), true).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_errors_map_to_statuses() {
        let status = |e: Box<Error>| error_response(&e).map(|r| r.status.as_u16());
        let mut refused = Error::new(ErrorType::ConnectRefused);
        refused.esource = ErrorSource::Upstream;
        assert_eq!(status(refused), Some(502));
        let mut slow = Error::new(ErrorType::ReadTimedout);
        slow.esource = ErrorSource::Upstream;
        assert_eq!(status(slow), Some(504));
        let mut gone = Error::new(ErrorType::ConnectionClosed);
        gone.esource = ErrorSource::Downstream;
        assert_eq!(status(gone), None);
        assert_eq!(status(Error::new(ErrorType::HTTPStatus(503))), Some(503));
    }
}
