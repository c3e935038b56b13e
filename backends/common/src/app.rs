//! Running a service: the Actix app every service shares (request ids,
//! metrics, the error envelope for every failure, `/health`, `/metrics`,
//! `/openapi.json`) around the service's own routes, on its own thread and
//! Actix system so that `tiergate up` can run five services beside the
//! gateway in one process.

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use actix_web::body::{BodySize, EitherBody, MessageBody};
use actix_web::dev::{ServerHandle, ServiceRequest, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, App, HttpResponse, HttpServer, ResponseError};
use futures_util::future::LocalBoxFuture;
use serde::Serialize;

use crate::client::ServiceClient;
use crate::clock::Clock;
use crate::config::ServerSection;
use crate::db::Db;
use crate::error::ApiError;
use crate::json::BodyLimit;
use crate::metrics::HttpMetrics;
use crate::request_id;
use crate::service_auth::ServiceKeys;
use crate::user_auth::UserTokens;

/// Registers a service's routes (and its app data).
pub type Routes = Arc<dyn Fn(&mut web::ServiceConfig) + Send + Sync>;

/// A service ready to serve: built inside [`start`]'s runtime, after its
/// database is open and migrated (by [`crate::service::start`]).
pub struct ServiceDef {
    /// Name (metrics label, logs).
    pub name: &'static str,
    /// The OpenAPI document of the service's own routes; the shared routes
    /// and the error schema are added by [`start`].
    pub openapi: utoipa::openapi::OpenApi,
    /// The database (checked by `/health`).
    pub db: Db,
    /// The service's metrics.
    pub metrics: HttpMetrics,
    /// Its service key (signs calls; verifies callers of `/internal` routes).
    pub keys: ServiceKeys,
    /// Its clock.
    pub clock: Clock,
    /// Its client for calls to other services.
    pub client: ServiceClient,
    /// How user access tokens are verified ([`crate::user_auth`]).
    pub user_tokens: Arc<dyn UserTokens>,
    /// The service's routes.
    pub routes: Routes,
    /// Tasks that run as long as the service (the outbox dispatcher).
    pub background: Vec<LocalBoxFuture<'static, ()>>,
    /// What `/health` reports besides the database.
    pub health: Vec<(&'static str, String)>,
}

/// Why a service did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The service's own set-up failed (database, keys, config).
    #[error("{0}")]
    Init(String),
    /// The service thread died during start.
    #[error("the service thread exited during start")]
    Thread,
}

/// A running service. Dropping it stops the service at once; [`stop`]
/// stops it gracefully.
///
/// [`stop`]: RunningService::stop
pub struct RunningService {
    /// The bound address (useful with port 0).
    pub addr: SocketAddr,
    handle: ServerHandle,
    thread: Option<JoinHandle<()>>,
}

impl RunningService {
    /// Stops accepting, lets in-flight requests finish (up to 2 s), and
    /// waits for the service thread to end.
    pub async fn stop(mut self) {
        self.handle.stop(true).await;
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }

    /// Serves until SIGINT (Ctrl-C) or SIGTERM, then stops gracefully as
    /// [`RunningService::stop`] does (used by `tiergate serve`). A service
    /// that stops on its own is an error.
    pub fn run_until_signal(self) -> std::io::Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let mut term = signal(SignalKind::terminate())?;
            let mut int = signal(SignalKind::interrupt())?;
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            let signal = loop {
                tokio::select! {
                    _ = term.recv() => break "SIGTERM",
                    _ = int.recv() => break "SIGINT",
                    _ = tick.tick() => {
                        if self.thread.as_ref().is_none_or(|t| t.is_finished()) {
                            return Err(std::io::Error::other("the service stopped on its own"));
                        }
                    }
                }
            };
            tracing::info!(signal, "stopping: finishing in-flight requests");
            self.stop().await;
            tracing::info!("stopped");
            Ok(())
        })
    }
}

impl Drop for RunningService {
    fn drop(&mut self) {
        if self.thread.is_some() {
            // The command is sent when `stop` is called; the returned
            // future only waits for completion.
            drop(self.handle.stop(false));
        }
    }
}

/// Starts a service on its own thread: binds `server.listen`, runs `init`
/// (open the database, migrate, build state) on the service's runtime, and
/// serves. Returns once it is accepting connections, or with the error
/// that stopped it.
pub fn start<F, Fut>(server: ServerSection, init: F) -> Result<RunningService, StartError>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<ServiceDef, StartError>> + 'static,
{
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("service".into())
        .spawn(move || {
            let system = actix_rt::System::new();
            system.block_on(async move {
                let listener = match TcpListener::bind(server.listen) {
                    Ok(l) => l,
                    Err(source) => {
                        let _ = ready_tx.send(Err(StartError::Bind {
                            addr: server.listen,
                            source,
                        }));
                        return;
                    }
                };
                let addr = listener.local_addr().unwrap_or(server.listen);
                let def = match init().await {
                    Ok(d) => d,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let db = def.db.clone();
                let name = def.name;
                let http = match serve(def, listener, &server) {
                    Ok(s) => s,
                    Err(source) => {
                        let _ = ready_tx.send(Err(StartError::Bind { addr, source }));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok((addr, http.handle())));
                tracing::info!(service = name, %addr, "service listening");
                if let Err(e) = http.await {
                    tracing::error!(service = name, error = %e, "service stopped with an error");
                }
                db.close().await;
            });
        })
        .map_err(|_| StartError::Thread)?;
    match ready_rx.recv() {
        Ok(Ok((addr, handle))) => Ok(RunningService {
            addr,
            handle,
            thread: Some(thread),
        }),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => Err(StartError::Thread),
    }
}

fn serve(
    def: ServiceDef,
    listener: TcpListener,
    server: &ServerSection,
) -> std::io::Result<actix_web::dev::Server> {
    let mut openapi = def.openapi;
    openapi.merge(shared_openapi());
    document_shared_errors(&mut openapi);
    let openapi: Arc<str> = serde_json::to_string(&openapi)
        .unwrap_or_else(|_| "{}".into())
        .into();
    for task in def.background {
        actix_rt::spawn(task);
    }
    let db = web::Data::new(def.db);
    let metrics = web::Data::new(def.metrics);
    let keys = web::Data::new(def.keys);
    let clock = web::Data::new(def.clock);
    let client = web::Data::new(def.client);
    let user_tokens: web::Data<dyn UserTokens> = web::Data::from(def.user_tokens);
    let details = web::Data::new(HealthDetails(def.health));
    let routes = def.routes;
    let limit = BodyLimit(server.body_limit);
    let name = def.name;
    Ok(HttpServer::new(move || {
        let routes = routes.clone();
        let openapi = openapi.clone();
        App::new()
            .app_data(db.clone())
            .app_data(metrics.clone())
            .app_data(keys.clone())
            .app_data(clock.clone())
            .app_data(client.clone())
            .app_data(user_tokens.clone())
            .app_data(limit)
            .app_data(web::Data::new(ServiceName(name)))
            .app_data(details.clone())
            .app_data(
                web::PathConfig::default().error_handler(|e, _| {
                    ApiError::not_found(format!("no such resource: {e}")).into()
                }),
            )
            .app_data(web::QueryConfig::default().error_handler(|e, _| {
                ApiError::bad_request("invalid_query", format!("invalid query string: {e}")).into()
            }))
            .wrap(from_fn(envelope_for_empty_errors))
            .wrap(from_fn(request_id::middleware))
            .route("/health", web::get().to(health))
            .route("/metrics", web::get().to(metrics_text))
            .route(
                "/openapi.json",
                web::get().to(move || {
                    let body = openapi.clone();
                    async move {
                        HttpResponse::Ok()
                            .content_type("application/json")
                            .body(body.to_string())
                    }
                }),
            )
            .configure(|c| routes(c))
            .default_service(web::to(|| async {
                Err::<HttpResponse, _>(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "route_not_found",
                    "no route matches this request",
                ))
            }))
    })
    .workers(server.workers.max(1))
    .disable_signals()
    .shutdown_timeout(2)
    .listen(listener)?
    .run())
}

#[derive(Clone, Copy)]
struct ServiceName(&'static str);

/// What `/health` adds.
struct HealthDetails(Vec<(&'static str, String)>);

/// Actix answers some errors itself with an empty body (a method a
/// resource does not allow, for one); give them the envelope too.
async fn envelope_for_empty_errors(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let res = next.call(req).await?;
    let status = res.status();
    if status.as_u16() >= 400
        && matches!(
            res.response().body().size(),
            BodySize::Sized(0) | BodySize::None
        )
    {
        let code = match status {
            StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
            StatusCode::NOT_FOUND => "not_found",
            s if s.is_client_error() => "bad_request",
            _ => "internal",
        };
        let message = status
            .canonical_reason()
            .unwrap_or("error")
            .to_ascii_lowercase();
        let (req, res) = res.into_parts();
        let mut body = ApiError::new(status, code, message).error_response();
        for (k, v) in res.headers() {
            if k == actix_web::http::header::ALLOW {
                body.headers_mut().insert(k.clone(), v.clone());
            }
        }
        return Ok(ServiceResponse::new(req, body).map_into_right_body());
    }
    Ok(res.map_into_left_body())
}

/// `GET /health` body.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Health {
    /// `ok` or `degraded`.
    pub status: &'static str,
    /// The service.
    pub service: &'static str,
    /// `up` or `down`.
    pub database: &'static str,
    /// What else the service reports (payments: `midtrans: disabled`).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    #[schema(value_type = Object)]
    pub details: std::collections::BTreeMap<&'static str, String>,
}

/// The service and its database are up (503 when the database is not).
#[utoipa::path(get, path = "/health", tag = "operations",
    responses((status = 200, body = Health), (status = 503, body = Health)))]
async fn health(
    db: web::Data<Db>,
    name: web::Data<ServiceName>,
    details: web::Data<HealthDetails>,
) -> HttpResponse {
    let up = db.ping().await;
    let body = Health {
        status: if up { "ok" } else { "degraded" },
        service: name.0,
        database: if up { "up" } else { "down" },
        details: details.0.iter().cloned().collect(),
    };
    if up {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

/// Prometheus metrics (text exposition format).
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, content_type = "text/plain", body = String)))]
async fn metrics_text(metrics: web::Data<HttpMetrics>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(metrics.render())
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, content_type = "application/json", body = Object)))]
#[allow(dead_code)]
async fn openapi_doc() {}

#[derive(utoipa::OpenApi)]
#[openapi(
    paths(health, metrics_text, openapi_doc),
    components(schemas(
        crate::error::ErrorEnvelope,
        crate::error::ErrorBody,
        crate::error::FieldError,
        Health
    ))
)]
struct SharedApi;

/// Adds the errors every operation can answer (from [`crate::json`], the
/// path and query extractors and the database) to each operation that
/// does not document them itself, so the document lists every status a
/// client can see.
fn document_shared_errors(openapi: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
    let envelope = |description: &str| {
        RefOr::T(
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorEnvelope")))
                        .build(),
                )
                .build(),
        )
    };
    for item in openapi.paths.paths.values_mut() {
        let ops = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ];
        for op in ops.into_iter().flatten() {
            let mut codes: Vec<(&str, &str)> = vec![("503", "the database is unavailable")];
            if op.request_body.is_some() {
                codes.extend([
                    ("400", "malformed JSON"),
                    ("413", "body over the size limit"),
                    ("415", "not a JSON body"),
                    ("422", "invalid or unknown fields"),
                ]);
            }
            if op.parameters.as_ref().is_some_and(|p| !p.is_empty()) {
                codes.push(("400", "invalid query string"));
            }
            if op.security.as_ref().is_some_and(|s| !s.is_empty()) {
                codes.push(("401", "no or invalid token"));
                let tags = op.tags.as_deref().unwrap_or_default();
                if tags.iter().any(|t| t == "admin" || t == "internal") {
                    codes.push(("403", "not an admin, or a service not allowed here"));
                }
            }
            for (code, description) in codes {
                op.responses
                    .responses
                    .entry(code.to_owned())
                    .or_insert_with(|| envelope(description));
            }
        }
    }
}

/// The shared document: the operations of every service and the two
/// security schemes operations name, `bearer` (a user's access token)
/// and `service` (a service token).
fn shared_openapi() -> utoipa::openapi::OpenApi {
    use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
    let mut doc = <SharedApi as utoipa::OpenApi>::openapi();
    let components = doc.components.get_or_insert_with(Default::default);
    for (name, format) in [
        ("bearer", "JWT (EdDSA access token)"),
        ("service", "JWT (EdDSA service token, one key per service)"),
    ] {
        components.add_security_scheme(
            name,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format(format)
                    .build(),
            ),
        );
    }
    doc
}
