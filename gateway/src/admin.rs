//! The admin listener (default `127.0.0.1:8090`): operator endpoints kept
//! off the public port. Today `/health` and `/health/services`; any other
//! path is a 404 in the usual JSON envelope. It never proxies.

use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorType, Result};
use pingora_proxy::{ProxyHttp, Session};

use crate::health;
use crate::proxy::new_request_id;
use crate::respond::{self, ErrorResponse};
use crate::snapshot::Snapshot;

/// Not an admin endpoint.
const NOT_FOUND: ErrorResponse = ErrorResponse {
    status: http::StatusCode::NOT_FOUND,
    code: "not_found",
    message: "the admin listener serves GET /health and GET /health/services",
};

/// The admin service; reads the same snapshot cell as the proxy.
#[derive(Debug)]
pub struct Admin {
    state: Arc<ArcSwap<Snapshot>>,
}

impl Admin {
    /// An admin service over `state`.
    pub fn new(state: Arc<ArcSwap<Snapshot>>) -> Self {
        Self { state }
    }
}

#[async_trait]
impl ProxyHttp for Admin {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn request_filter(&self, session: &mut Session, _ctx: &mut ()) -> Result<bool> {
        let id = new_request_id();
        let req = session.req_header();
        let get = req.method == http::Method::GET || req.method == http::Method::HEAD;
        let snapshot = self.state.load_full();
        match health::answer(&snapshot, req.uri.path()).filter(|_| get) {
            Some((status, doc)) => {
                respond::write_json(session, status, &id, doc.to_string().into(), &[]).await?;
            }
            None => NOT_FOUND.write(session, &id, &[]).await?,
        }
        Ok(true)
    }

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Error::e_explain(ErrorType::InternalError, "the admin listener never proxies")
    }
}
