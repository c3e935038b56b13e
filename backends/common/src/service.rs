//! A business service, described once ([`Service`]) and started by the
//! platform ([`start`]), which runs what every service has: settings from
//! file and env (every error reported), the database connected and
//! migrated, the service key, the service-to-service client, the outbox
//! and its dispatcher, `POST /internal/events` for the events it consumes,
//! user-token verification, metrics, the hourly housekeeping, a graceful
//! stop. The service supplies its routes, OpenAPI document, consumers and
//! background tasks ([`Parts`]).
//!
//! [`Entry`] is what the CLI's registry lists: one line per service there
//! gives it `tiergate serve <name>`, `migrate`, `up`, `events dead|retry`
//! and `service-key`.

use std::future::Future;
use std::marker::PhantomData;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::LocalBoxFuture;
use futures_util::FutureExt;
use sqlx::migrate::Migrator;

use crate::app::{self, Routes, RunningService, ServiceDef, StartError};
use crate::client::{ServiceClient, TIMEOUT};
use crate::clock::Clock;
use crate::config::{self, ConfigError, Environment, ServiceConfig, Settings};
use crate::consumer::Consumer;
use crate::db::Db;
use crate::metrics::HttpMetrics;
use crate::outbox::{self, DeadDelivery, DispatchSettings, Outbox};
use crate::service_auth::ServiceKeys;
use crate::user_auth::{Jwks, UserTokens};

/// How often the housekeeping runs.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(3600);
/// Consumer dedupe records kept this long; `events retry` leaves older
/// dead deliveries alone unless forced.
pub const DEDUPE_KEPT: Duration = Duration::from_secs(30 * 24 * 3600);

/// What the platform hands a service to build itself with.
pub struct Platform<C> {
    /// Its settings.
    pub settings: Settings<C>,
    /// Its database, migrated.
    pub db: Db,
    /// Its service key.
    pub keys: ServiceKeys,
    /// Calls to other services.
    pub client: ServiceClient,
    /// Its outbox (the dispatcher runs it).
    pub outbox: Outbox,
    /// Its metrics.
    pub metrics: HttpMetrics,
    /// Its clock.
    pub clock: Clock,
}

/// What a service builds: the rest of it.
pub struct Parts {
    /// The OpenAPI document of its own routes.
    pub openapi: utoipa::openapi::OpenApi,
    /// Its routes.
    pub routes: Routes,
    /// The events it consumes, if any (`POST /internal/events`).
    pub consumer: Option<Consumer>,
    /// How user tokens are verified; `None`: against the users service's
    /// JWKS.
    pub user_tokens: Option<Arc<dyn UserTokens>>,
    /// Tasks that run as long as the service.
    pub background: Vec<LocalBoxFuture<'static, ()>>,
    /// Extra hourly housekeeping (purging expired rows).
    pub housekeeping: Option<Box<dyn Fn() -> LocalBoxFuture<'static, ()>>>,
    /// What `/health` says besides the database (`payments: disabled`).
    pub health: Vec<(&'static str, String)>,
}

impl Parts {
    /// Parts with `routes` and `openapi` and nothing else.
    pub fn new(openapi: utoipa::openapi::OpenApi, routes: Routes) -> Self {
        Self {
            openapi,
            routes,
            consumer: None,
            user_tokens: None,
            background: Vec::new(),
            housekeeping: None,
            health: Vec::new(),
        }
    }
}

/// A business service.
pub trait Service: 'static {
    /// Its own section of the services config (`services.<name>`).
    type Config: ServiceConfig + Clone + Send + 'static;
    /// Its name (`services.<name>`, metrics, tokens).
    const NAME: &'static str;
    /// Its standard port.
    const DEFAULT_PORT: u16;
    /// Its migrations (`migrations/<name>`).
    fn migrator() -> &'static Migrator;
    /// Builds its parts, on its own runtime, once the platform is up.
    fn build(platform: &Platform<Self::Config>) -> impl Future<Output = Result<Parts, String>>;
}

/// How to run a service, besides its settings.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The outbox dispatcher's tuning.
    pub dispatch: DispatchSettings,
    /// The clock (tests pass a manual one).
    pub clock: Clock,
}

/// Reads a service's settings: `file` (optional) and the process
/// environment; `environment` applies when neither says.
pub fn settings<S: Service>(
    file: Option<&Path>,
    environment: Environment,
) -> Result<Settings<S::Config>, ConfigError> {
    config::load(
        S::NAME,
        S::DEFAULT_PORT,
        file,
        &config::process_env,
        environment,
    )
}

/// Applies the service's migrations (and the common ones) and returns.
pub async fn migrate<S: Service>(settings: &Settings<S::Config>) -> Result<(), String> {
    let db = Db::connect(&settings.database_url, 1)
        .await
        .map_err(|e| e.to_string())?;
    let result = db.migrate(S::migrator()).await.map_err(|e| e.to_string());
    db.close().await;
    result
}

/// Starts service `S` and returns once it accepts connections.
pub fn start<S: Service>(
    settings: Settings<S::Config>,
    options: Options,
) -> Result<RunningService, StartError> {
    let keys = ServiceKeys::load(&settings.key_source()).map_err(StartError::Init)?;
    let server = settings.server.clone();
    app::start(server, move || async move {
        let init = StartError::Init;
        let db = Db::connect_with(
            &settings.database_url,
            settings.max_connections,
            settings.acquire_timeout,
        )
        .await
        .map_err(|e| init(e.to_string()))?;
        db.migrate(S::migrator())
            .await
            .map_err(|e| init(e.to_string()))?;
        let metrics = HttpMetrics::new(S::NAME);
        let clock = options.clock.clone();
        let outbox = Outbox::new(S::NAME, settings.shared.events.clone(), &keys);
        let client = ServiceClient::new(keys.clone(), settings.shared.peers.clone(), TIMEOUT)
            .map_err(init)?;
        let jwks_url = format!(
            "{}/.well-known/jwks.json",
            settings
                .peer_url("users")
                .unwrap_or("http://127.0.0.1:8021")
        );
        let default_tokens: Arc<dyn UserTokens> = Jwks::new(
            jwks_url,
            &settings.shared.access_tokens.issuer,
            &settings.shared.access_tokens.audience,
        )
        .map_err(init)?;
        let platform = Platform {
            settings,
            db: db.clone(),
            keys: keys.clone(),
            client: client.clone(),
            outbox: outbox.clone(),
            metrics: metrics.clone(),
            clock: clock.clone(),
        };
        let parts = S::build(&platform).await.map_err(init)?;
        let mut background = parts.background;
        background.push(
            outbox
                .clone()
                .dispatch(
                    db.clone(),
                    keys.clone(),
                    metrics.clone(),
                    options.dispatch.clone(),
                    clock.clone(),
                )
                .boxed_local(),
        );
        background.push(housekeeping(db.clone(), clock.clone(), parts.housekeeping).boxed_local());
        let (routes, mut openapi) = (parts.routes, parts.openapi);
        // `/internal/events` is served, and documented, only by a service
        // that consumes events.
        let routes: Routes = match parts.consumer {
            Some(consumer) => {
                let consumer = consumer.waking(outbox.clone());
                openapi.merge(<crate::consumer::ConsumerApi as utoipa::OpenApi>::openapi());
                Arc::new(move |cfg| {
                    consumer.clone().configure(cfg);
                    routes(cfg);
                })
            }
            None => routes,
        };
        Ok(ServiceDef {
            name: S::NAME,
            openapi,
            db,
            metrics,
            keys,
            clock,
            client,
            user_tokens: parts.user_tokens.unwrap_or(default_tokens),
            routes,
            background,
            health: parts.health,
        })
    })
}

/// The hourly housekeeping: delivered events and old dedupe records, then
/// the service's own.
async fn housekeeping(
    db: Db,
    clock: Clock,
    own: Option<Box<dyn Fn() -> LocalBoxFuture<'static, ()>>>,
) {
    let mut ticker = clock.ticker();
    loop {
        match outbox::purge(&db, DEDUPE_KEPT, clock.now_ms()).await {
            Ok(n) => tracing::debug!(rows = n, "purged delivered events and old dedupe records"),
            Err(e) => tracing::warn!(error = %e, "outbox housekeeping failed"),
        }
        if let Some(own) = &own {
            own().await;
        }
        ticker.tick(HOUSEKEEPING_EVERY).await;
    }
}

/// Why a CLI command on a service failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// Its settings are invalid (exit 64).
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// It could not start or the command failed (exit 70).
    #[error("{0}")]
    Failed(String),
}

/// A service as the CLI's registry lists it (object-safe; see [`Entry`]).
pub trait Registered: Sync {
    /// Its name.
    fn name(&self) -> &'static str;
    /// Starts it (`serve`, `up`).
    fn start(&self, file: Option<&Path>, env: Environment) -> Result<RunningService, CommandError>;
    /// Applies its migrations.
    fn migrate(&self, file: Option<&Path>, env: Environment) -> Result<(), CommandError>;
    /// Its dead event deliveries.
    fn dead_events(
        &self,
        file: Option<&Path>,
        env: Environment,
    ) -> Result<Vec<DeadDelivery>, CommandError>;
    /// Puts dead deliveries back (one event's, or all): those of events
    /// younger than [`DEDUPE_KEPT`], or every one with `force`.
    fn retry_events(
        &self,
        file: Option<&Path>,
        env: Environment,
        event_id: Option<&str>,
        force: bool,
    ) -> Result<outbox::Retried, CommandError>;
    /// Its service key's public half (creating a development key).
    fn service_key(&self, file: Option<&Path>, env: Environment) -> Result<String, CommandError>;
}

/// The registry entry of service `S`: `Entry::<Users>::NEW`.
pub struct Entry<S>(PhantomData<fn() -> S>);

impl<S> Entry<S> {
    /// The entry.
    pub const NEW: Self = Entry(PhantomData);
}

fn on_db<T>(
    settings: &Settings<impl Sized>,
    f: impl AsyncFnOnce(&Db) -> Result<T, sqlx::Error>,
) -> Result<T, CommandError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CommandError::Failed(e.to_string()))?;
    runtime.block_on(async {
        let db = Db::connect(&settings.database_url, 1)
            .await
            .map_err(|e| CommandError::Failed(e.to_string()))?;
        let out = f(&db)
            .await
            .map_err(|e| CommandError::Failed(e.to_string()));
        db.close().await;
        out
    })
}

impl<S: Service> Registered for Entry<S> {
    fn name(&self) -> &'static str {
        S::NAME
    }

    fn start(&self, file: Option<&Path>, env: Environment) -> Result<RunningService, CommandError> {
        let s = settings::<S>(file, env)?;
        start::<S>(s, Options::default()).map_err(|e| CommandError::Failed(e.to_string()))
    }

    fn migrate(&self, file: Option<&Path>, env: Environment) -> Result<(), CommandError> {
        let s = settings::<S>(file, env)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| CommandError::Failed(e.to_string()))?;
        runtime
            .block_on(migrate::<S>(&s))
            .map_err(CommandError::Failed)
    }

    fn dead_events(
        &self,
        file: Option<&Path>,
        env: Environment,
    ) -> Result<Vec<DeadDelivery>, CommandError> {
        let s = settings::<S>(file, env)?;
        on_db(&s, async |db| outbox::dead(db).await)
    }

    fn retry_events(
        &self,
        file: Option<&Path>,
        env: Environment,
        event_id: Option<&str>,
        force: bool,
    ) -> Result<outbox::Retried, CommandError> {
        let s = settings::<S>(file, env)?;
        let since = if force {
            i64::MIN
        } else {
            let kept = i64::try_from(DEDUPE_KEPT.as_millis()).unwrap_or(i64::MAX);
            crate::clock::system_now_ms().saturating_sub(kept)
        };
        on_db(&s, async |db| outbox::retry(db, event_id, since).await)
    }

    fn service_key(&self, file: Option<&Path>, env: Environment) -> Result<String, CommandError> {
        let s = settings::<S>(file, env)?;
        ServiceKeys::load(&s.key_source())
            .map(|k| k.public_key().to_owned())
            .map_err(CommandError::Failed)
    }
}
