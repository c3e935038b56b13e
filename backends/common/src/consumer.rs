//! Consuming events: a service declares the event types it handles and a
//! handler for each ([`Consumer::on`]); this module provides
//! `POST /internal/events` for them.
//!
//! For each delivered event, in one transaction: the event id is recorded
//! for this consumer (a redelivery is answered `duplicate` and changes
//! nothing), then the handler applies it. The answer tells the producer
//! what happened; every 2xx acknowledges:
//!
//! | outcome | status | when |
//! |---|---|---|
//! | `applied` | 200 | the handler applied it |
//! | `stale` | 200 | the handler found it older than what it already applied (events arrive in any order) |
//! | `duplicate` | 200 | this event id was consumed before |
//! | `ignored` | 200 | this service does not consume this type |
//! | `rejected` | 200 | the handler refused it for good (a 4xx: bad data, an unknown user): it can never be applied, so it is acknowledged and remembered rather than retried for ever |
//! | — | 5xx | the handler failed for now (the database): rolled back, the producer retries |
//!
//! Each outcome is counted in `events_consumed_total{event_type, result}`.

use std::collections::HashMap;
use std::sync::Arc;

use actix_web::{web, HttpResponse};
use async_trait::async_trait;
use serde::Serialize;
use sqlx::AnyConnection;

use crate::clock::Clock;
use crate::db::Db;
use crate::error::ApiError;
use crate::json::Json;
use crate::metrics::HttpMetrics;
use crate::outbox::{consume_once, Event};
use crate::service_auth::{AllowedCallers, ServiceCaller};

/// What a handler did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The change was made.
    Applied,
    /// A newer change was already applied; nothing to do.
    Stale,
}

/// Applies one type of event, inside the transaction that records it.
#[async_trait(?Send)]
pub trait Handler: Send + Sync + 'static {
    /// Applies `event`. A 4xx error rejects it for good; any other error
    /// is a failure for now (rolled back, retried by the producer).
    async fn apply(&self, tx: &mut AnyConnection, event: &Event) -> Result<Applied, ApiError>;
}

/// The events a service consumes. Built at start-up; cheap to clone.
#[derive(Clone)]
pub struct Consumer {
    name: &'static str,
    handlers: HashMap<&'static str, Arc<dyn Handler>>,
}

/// `POST /internal/events` answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Consumed {
    /// `applied`, `stale`, `duplicate`, `ignored` or `rejected`.
    pub status: &'static str,
    /// For `rejected`: the handler's error code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
}

impl Consumer {
    /// A consumer named `name` (the dedupe key: one service, one name).
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            handlers: HashMap::new(),
        }
    }

    /// Handles events of `event_type` with `handler`.
    pub fn on(mut self, event_type: &'static str, handler: impl Handler) -> Self {
        self.handlers.insert(event_type, Arc::new(handler));
        self
    }

    /// The types it handles.
    pub fn event_types(&self) -> Vec<&'static str> {
        let mut t: Vec<_> = self.handlers.keys().copied().collect();
        t.sort_unstable();
        t
    }

    /// Receives one event (see the module docs).
    pub async fn receive(
        &self,
        db: &Db,
        clock: &Clock,
        metrics: &HttpMetrics,
        event: &Event,
    ) -> Result<Consumed, ApiError> {
        let outcome = self.outcome(db, clock, event).await;
        let label = match &outcome {
            Ok(c) => c.status,
            Err(_) => "failed",
        };
        metrics
            .events_consumed
            .with_label_values(&[event.event_type.as_str(), label])
            .inc();
        outcome
    }

    async fn outcome(&self, db: &Db, clock: &Clock, event: &Event) -> Result<Consumed, ApiError> {
        let status = |status| Consumed {
            status,
            reason: None,
        };
        let Some(handler) = self.handlers.get(event.event_type.as_str()) else {
            return Ok(status("ignored"));
        };
        let now = clock.now_ms();
        let mut tx = db.pool().begin().await.map_err(ApiError::from)?;
        if !consume_once(&mut tx, self.name, event, now)
            .await
            .map_err(ApiError::from)?
        {
            return Ok(status("duplicate"));
        }
        match handler.apply(&mut tx, event).await {
            Ok(applied) => {
                tx.commit().await.map_err(ApiError::from)?;
                Ok(status(match applied {
                    Applied::Applied => "applied",
                    Applied::Stale => "stale",
                }))
            }
            Err(e) if e.status().is_client_error() => {
                // Undo what the handler did, keep the event as seen.
                drop(tx);
                let mut tx = db.pool().begin().await.map_err(ApiError::from)?;
                consume_once(&mut tx, self.name, event, now)
                    .await
                    .map_err(ApiError::from)?;
                tx.commit().await.map_err(ApiError::from)?;
                tracing::warn!(consumer = self.name, event_id = %event.id,
                    event_type = %event.event_type, reason = e.code(), error = %e,
                    "event rejected: it can never be applied");
                Ok(Consumed {
                    status: "rejected",
                    reason: Some(e.code()),
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Registers `POST /internal/events` (any service may deliver events).
    pub fn configure(self, cfg: &mut web::ServiceConfig) {
        cfg.app_data(web::Data::new(self)).service(
            web::resource("/internal/events")
                .app_data(AllowedCallers(&["*"]))
                .route(web::post().to(receive_event)),
        );
    }
}

/// Receive an event (service token only). Idempotent by event id; see
/// the consumer's outcomes.
#[utoipa::path(post, path = "/internal/events", tag = "internal", security(("service" = [])),
    request_body = Event,
    responses((status = 200, body = Consumed),
        (status = 401, description = "not a service token", body = crate::error::ErrorEnvelope)))]
pub(crate) async fn receive_event(
    consumer: web::Data<Consumer>,
    db: web::Data<Db>,
    clock: web::Data<Clock>,
    metrics: web::Data<HttpMetrics>,
    _caller: ServiceCaller,
    body: Json<Event>,
) -> Result<HttpResponse, ApiError> {
    let consumed = consumer.receive(&db, &clock, &metrics, &body.0).await?;
    Ok(HttpResponse::Ok().json(consumed))
}

/// The OpenAPI operations this module adds.
#[derive(utoipa::OpenApi)]
#[openapi(paths(receive_event), components(schemas(Consumed, Event)))]
pub struct ConsumerApi;
