//! Consuming events: a service declares the event types it handles and a
//! handler for each ([`Consumer::on`]); this module provides
//! `POST /internal/events` for them.
//!
//! Each event type names the services that may produce it, and an event is
//! taken only from the service that produced it: the caller's verified
//! service token must name `event.source`, and `event.source` must be one
//! of the type's producers (else 403), so one service cannot forge
//! another's events.
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
//! | `rejected` | 200 | the handler refused it for good ([`Applied::Rejected`]: bad data, an unknown user), or it claims to have happened more than 5 minutes in the future: it can never be applied, so it is acknowledged and remembered rather than retried for ever; the handler's writes are rolled back |
//! | — | 403 | the caller is not the event's source, or not a producer of its type |
//! | — | 5xx | the handler failed for now (any error it returns: the database, a service it called): rolled back, the producer retries |
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The change was made.
    Applied,
    /// A newer change was already applied; nothing to do.
    Stale,
    /// It can never be applied (bad data, an unknown subject): what the
    /// handler wrote is rolled back and the event is acknowledged.
    Rejected {
        /// A stable code (`unknown_user`, `invalid_event`).
        code: &'static str,
        /// Why, for the log.
        message: String,
    },
}

impl Applied {
    /// [`Applied::Rejected`].
    pub fn rejected(code: &'static str, message: impl Into<String>) -> Self {
        Applied::Rejected {
            code,
            message: message.into(),
        }
    }
}

/// Applies one type of event, inside the transaction that records it.
#[async_trait(?Send)]
pub trait Handler: Send + Sync + 'static {
    /// Applies `event`. An error is a failure for now (rolled back,
    /// retried by the producer); an event that can never apply is
    /// `Ok(Applied::Rejected)`.
    async fn apply(&self, tx: &mut AnyConnection, event: &Event) -> Result<Applied, ApiError>;

    /// Called once `event`'s transaction has committed what
    /// [`Handler::apply`] wrote (`Applied::Applied` only): wake a worker
    /// that reads those rows here, not in `apply` (before the commit it
    /// would find nothing).
    fn committed(&self, _event: &Event) {}
}

/// How far in the future an event's `occurred_at` may be (clock skew
/// between hosts); beyond it the event is rejected, so a bad clock cannot
/// pin state ("newer than anything") for ever.
const FUTURE_SKEW_MS: i64 = 5 * 60 * 1000;

struct Route {
    producers: &'static [&'static str],
    handler: Arc<dyn Handler>,
}

/// The events a service consumes. Built at start-up; cheap to clone.
#[derive(Clone)]
pub struct Consumer {
    name: &'static str,
    handlers: HashMap<&'static str, Arc<Route>>,
    /// The service's outbox, woken after each applied event: what the
    /// handler published goes out now, not at the next poll.
    outbox: Option<crate::outbox::Outbox>,
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
            outbox: None,
        }
    }

    /// Wakes `outbox`'s dispatcher after each applied event (the platform
    /// sets the service's own).
    pub fn waking(mut self, outbox: crate::outbox::Outbox) -> Self {
        self.outbox = Some(outbox);
        self
    }

    /// Handles events of `event_type` produced by one of `producers` (the
    /// services that emit that type) with `handler`.
    pub fn on(
        mut self,
        event_type: &'static str,
        producers: &'static [&'static str],
        handler: impl Handler,
    ) -> Self {
        self.handlers.insert(
            event_type,
            Arc::new(Route {
                producers,
                handler: Arc::new(handler),
            }),
        );
        self
    }

    /// The types it handles.
    pub fn event_types(&self) -> Vec<&'static str> {
        let mut t: Vec<_> = self.handlers.keys().copied().collect();
        t.sort_unstable();
        t
    }

    /// Receives one event from the service `caller` (see the module docs).
    pub async fn receive(
        &self,
        db: &Db,
        clock: &Clock,
        metrics: &HttpMetrics,
        caller: &str,
        event: &Event,
    ) -> Result<Consumed, ApiError> {
        let outcome = self.outcome(db, clock, caller, event).await;
        let label = match &outcome {
            Ok(c) => c.status,
            Err(e) if e.status().as_u16() == 403 => "refused",
            Err(_) => "failed",
        };
        metrics
            .events_consumed
            .with_label_values(&[event.event_type.as_str(), label])
            .inc();
        outcome
    }

    async fn outcome(
        &self,
        db: &Db,
        clock: &Clock,
        caller: &str,
        event: &Event,
    ) -> Result<Consumed, ApiError> {
        let status = |status| Consumed {
            status,
            reason: None,
        };
        if caller != event.source {
            return Err(ApiError::forbidden(
                "wrong_source",
                format!(
                    "`{caller}` delivered an event whose source is `{}`: a service delivers only its own events",
                    event.source
                ),
            ));
        }
        let Some(route) = self.handlers.get(event.event_type.as_str()) else {
            return Ok(status("ignored"));
        };
        if !route.producers.contains(&event.source.as_str()) {
            return Err(ApiError::forbidden(
                "producer_not_allowed",
                format!(
                    "`{}` does not produce `{}` events",
                    event.source, event.event_type
                ),
            ));
        }
        let now = clock.now_ms();
        let mut tx = db.begin_write().await.map_err(ApiError::from)?;
        if !consume_once(&mut tx, self.name, event, now)
            .await
            .map_err(ApiError::from)?
        {
            return Ok(status("duplicate"));
        }
        let applied = if event.occurred_at > now.saturating_add(FUTURE_SKEW_MS) {
            Applied::rejected(
                "from_the_future",
                format!(
                    "occurred_at {} is ahead of this service's clock",
                    event.occurred_at
                ),
            )
        } else {
            route.handler.apply(&mut tx, event).await?
        };
        match applied {
            Applied::Applied => {
                tx.commit().await.map_err(ApiError::from)?;
                route.handler.committed(event);
                if let Some(outbox) = &self.outbox {
                    outbox.notify();
                }
                Ok(status("applied"))
            }
            Applied::Stale => {
                tx.commit().await.map_err(ApiError::from)?;
                Ok(status("stale"))
            }
            Applied::Rejected { code, message } => {
                // Undo what the handler did; keep the event as seen.
                drop(tx);
                let mut tx = db.begin_write().await.map_err(ApiError::from)?;
                if !consume_once(&mut tx, self.name, event, now)
                    .await
                    .map_err(ApiError::from)?
                {
                    // A concurrent delivery of the same event got there first.
                    return Ok(status("duplicate"));
                }
                tx.commit().await.map_err(ApiError::from)?;
                tracing::warn!(consumer = self.name, event_id = %event.id,
                    event_type = %event.event_type, reason = code, message,
                    "event rejected: it can never be applied");
                Ok(Consumed {
                    status: "rejected",
                    reason: Some(code),
                })
            }
        }
    }

    /// Registers `POST /internal/events` (any service whose key is known
    /// may call it; each event type's producers are checked per event).
    pub fn configure(self, cfg: &mut web::ServiceConfig) {
        cfg.app_data(web::Data::new(self)).service(
            web::resource("/internal/events")
                .app_data(AllowedCallers(&["*"]))
                .route(web::post().to(receive_event)),
        );
    }
}

/// Receive an event (service token of its producer only). Idempotent by
/// event id; see the consumer's outcomes.
#[utoipa::path(post, path = "/internal/events", tag = "internal", security(("service" = [])),
    request_body = Event,
    responses((status = 200, body = Consumed),
        (status = 401, description = "not a service token", body = crate::error::ErrorEnvelope),
        (status = 403, description = "the caller is not the event's producer", body = crate::error::ErrorEnvelope)))]
pub(crate) async fn receive_event(
    consumer: web::Data<Consumer>,
    db: web::Data<Db>,
    clock: web::Data<Clock>,
    metrics: web::Data<HttpMetrics>,
    caller: ServiceCaller,
    body: Json<Event>,
) -> Result<HttpResponse, ApiError> {
    let consumed = consumer
        .receive(&db, &clock, &metrics, &caller.service, &body.0)
        .await?;
    Ok(HttpResponse::Ok().json(consumed))
}

/// The OpenAPI operations this module adds.
#[derive(utoipa::OpenApi)]
#[openapi(paths(receive_event), components(schemas(Consumed, Event)))]
pub struct ConsumerApi;
