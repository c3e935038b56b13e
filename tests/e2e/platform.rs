//! What every service's tests share: a data directory, a database (SQLite,
//! or a fresh PostgreSQL database per service), settings, a start with
//! fast event dispatch and a manual clock, an event inbox, signed service
//! calls and JSON requests. [`both_databases!`] runs one test body on
//! SQLite and on PostgreSQL.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post as axum_post;
use axum::Json;
use backend_common::app::RunningService;
use backend_common::clock::Clock;
use backend_common::config::{Environment, Settings};
pub use backend_common::outbox::DispatchSettings;
use backend_common::outbox::{Subscriber, Subscribers};
use backend_common::service::{self, Options, Service};
use backend_common::service_auth::{KeySource, ServiceKeys};
use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::common::{client, serve};

/// Runs an `async fn name(db: Database)` test on both databases: it
/// becomes `name::on_sqlite` and `name::on_postgres`.
macro_rules! both_databases {
    ($(#[$meta:meta])* async fn $name:ident($db:ident: Database) $body:block) => {
        $(#[$meta])*
        async fn $name($db: $crate::platform::Database) $body

        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn on_sqlite() {
                super::$name($crate::platform::Database::sqlite()).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn on_postgres() {
                super::$name($crate::platform::Database::postgres()).await
            }
        }
    };
}
pub(crate) use both_databases;

/// A directory removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A fresh directory under the system's temp dir.
    pub fn new(prefix: &str) -> Self {
        let d = std::env::temp_dir().join(format!("tg-{prefix}-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&d).unwrap();
        Self(d)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Which database the services of a test use.
pub struct Database {
    postgres: bool,
    /// service → its fresh PostgreSQL database URL.
    created: Mutex<BTreeMap<String, String>>,
}

impl Database {
    pub fn sqlite() -> Self {
        Self {
            postgres: false,
            created: Mutex::default(),
        }
    }

    pub fn postgres() -> Self {
        Self {
            postgres: true,
            created: Mutex::default(),
        }
    }

    /// The database URL of `service` whose data lives in `dir`: its SQLite
    /// file, or a PostgreSQL database created for it on first use.
    pub async fn url_for(&self, service: &str, dir: &Path) -> String {
        if !self.postgres {
            return format!("sqlite://{}", dir.join(format!("{service}.db")).display());
        }
        if let Some(url) = self.created.lock().unwrap().get(service) {
            return url.clone();
        }
        let url = fresh_postgres().await;
        self.created
            .lock()
            .unwrap()
            .insert(service.to_owned(), url.clone());
        url
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let urls: Vec<String> = std::mem::take(self.created.get_mut().unwrap())
            .into_values()
            .collect();
        if urls.is_empty() {
            return;
        }
        // Drop may run inside a runtime: clean up on a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                for url in urls {
                    drop_postgres(&url).await;
                }
            });
        })
        .join();
    }
}

/// A fresh PostgreSQL database; fails with instructions when the server is
/// not running.
async fn fresh_postgres() -> String {
    sqlx::any::install_default_drivers();
    let server = crate::common::postgres_server();
    let admin = sqlx::AnyPool::connect(&format!("{server}/postgres"))
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL must answer at {server} (TIERGATE_TEST_POSTGRES) with trust auth: run the tests with scripts/test, which starts one ({e})"));
    let name = format!("tg_test_{}", uuid::Uuid::now_v7().simple());
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    format!("{server}/{name}")
}

async fn drop_postgres(url: &str) {
    let Some(name) = url.rsplit('/').next() else {
        return;
    };
    let server = crate::common::postgres_server();
    if let Ok(admin) = sqlx::AnyPool::connect(&format!("{server}/postgres")).await {
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&admin)
        .await;
        admin.close().await;
    }
}

/// The outbox tuned for tests: retries within a fraction of a second.
pub fn fast_dispatch() -> DispatchSettings {
    DispatchSettings {
        poll_interval: Duration::from_millis(100),
        base_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_millis(400),
        timeout: Duration::from_secs(2),
        ..DispatchSettings::default()
    }
}

/// One test's world: a data directory, a database choice and a clock,
/// shared by the services the test starts.
pub struct World {
    pub dir: TempDir,
    pub db: Database,
    /// Runs with the system clock and jumps ahead when the test says
    /// (`clock.advance`): retries still come due by themselves.
    pub clock: Clock,
}

impl World {
    pub fn new(db: Database) -> Self {
        sqlx::any::install_default_drivers();
        Self {
            dir: TempDir::new("svc"),
            db,
            clock: Clock::shifted(),
        }
    }

    /// Settings for service `S` in this world: a free port on loopback,
    /// development mode, its database, no event subscribers; `env` adds
    /// or overrides variables.
    pub async fn settings<S: Service>(&self, env: &[(&str, &str)]) -> Settings<S::Config> {
        self.settings_from::<S>(None, env).await
    }

    /// [`World::settings`] read from the services config `file` (the
    /// variables still win over it, as they do in production).
    pub async fn settings_from<S: Service>(
        &self,
        file: Option<&Path>,
        env: &[(&str, &str)],
    ) -> Settings<S::Config> {
        let upper = S::NAME.to_ascii_uppercase();
        let mut vars: HashMap<String, String> = HashMap::new();
        vars.insert(
            "TIERGATE_DATA_DIR".into(),
            self.dir.path().display().to_string(),
        );
        vars.insert(format!("TIERGATE_{upper}_LISTEN"), "127.0.0.1:0".into());
        vars.insert(
            format!("TIERGATE_{upper}_DATABASE_URL"),
            self.db.url_for(S::NAME, self.dir.path()).await,
        );
        for (k, v) in env {
            vars.insert((*k).to_owned(), (*v).to_owned());
        }
        backend_common::config::load::<S::Config>(
            S::NAME,
            S::DEFAULT_PORT,
            file,
            &|k| vars.get(k).cloned(),
            Environment::Development,
        )
        .unwrap_or_else(|e| panic!("settings of {}: {e}", S::NAME))
    }

    /// Starts `S` with `settings`, fast dispatch and this world's clock.
    pub fn start<S: Service>(&self, settings: Settings<S::Config>) -> Running {
        self.start_with::<S>(settings, fast_dispatch())
    }

    /// Starts `S` with `settings`, `dispatch` and this world's clock.
    pub fn start_with<S: Service>(
        &self,
        settings: Settings<S::Config>,
        dispatch: DispatchSettings,
    ) -> Running {
        let svc = service::start::<S>(
            settings,
            Options {
                dispatch,
                clock: self.clock.clone(),
            },
        )
        .unwrap_or_else(|e| panic!("{} did not start: {e}", S::NAME));
        Running {
            base: format!("http://{}", svc.addr),
            svc,
        }
    }

    /// The service key of `name` (a caller the test plays), created in
    /// this world's data directory so the services find its public half.
    pub fn keys_of(&self, name: &str) -> ServiceKeys {
        ServiceKeys::load(&KeySource::development(name, self.dir.path())).unwrap()
    }

    /// A gateway environment with the gateway's service key of this world
    /// (where its services find the public half).
    pub fn gateway_env(&self) -> gateway::secret::Environment {
        self.keys_of("gateway");
        let pem =
            std::fs::read_to_string(self.dir.path().join("service-keys/gateway.pem")).unwrap();
        gateway::secret::Environment {
            service_key: Some(gateway::secret::Secret::new(pem)),
            ..Default::default()
        }
    }

    /// A pool on `service`'s database, to look at its rows.
    pub async fn pool(&self, service: &str) -> sqlx::AnyPool {
        let url = self.db.url_for(service, self.dir.path()).await;
        sqlx::AnyPool::connect(&url).await.unwrap()
    }
}

/// A gateway environment with a fresh service key of its own (configs
/// with `usage` need one), generated as `tiergate up` does.
pub fn gateway_key_env() -> gateway::secret::Environment {
    let dir = TempDir::new("gw-key");
    ServiceKeys::load(&KeySource::development("gateway", dir.path())).unwrap();
    let pem = std::fs::read_to_string(dir.path().join("service-keys/gateway.pem")).unwrap();
    gateway::secret::Environment {
        service_key: Some(gateway::secret::Secret::new(pem)),
        ..Default::default()
    }
}

/// A started service.
pub struct Running {
    pub svc: RunningService,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
}

impl Running {
    pub fn addr(&self) -> SocketAddr {
        self.svc.addr
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn stop(self) {
        self.svc.stop().await;
    }
}

/// The status and JSON body (`null` when there is none) of `req`.
pub async fn send(req: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let r = req.send().await.unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// `POST base+path` with a JSON body.
pub async fn post(base: &str, path: &str, body: Value) -> (StatusCode, Value) {
    send(client().post(format!("{base}{path}")).json(&body)).await
}

/// `method base+path` as a user (bearer `token`), with an optional body.
pub async fn as_user(
    method: Method,
    base: &str,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = client()
        .request(method, format!("{base}{path}"))
        .bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    send(req).await
}

/// `POST url` with `body`, a bearer `token` and an `Idempotency-Key`:
/// the status, the JSON answer, and whether it was replayed
/// (`Idempotent-Replayed`).
pub async fn post_keyed(
    url: &str,
    token: &str,
    key: &str,
    body: &Value,
) -> (StatusCode, Value, bool) {
    let r = client()
        .post(url)
        .bearer_auth(token)
        .header("idempotency-key", key)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let replayed = r.headers().get("idempotent-replayed").is_some();
    (status, r.json().await.unwrap_or(Value::Null), replayed)
}

/// `method` on `service`'s `path` signed as the service `keys` belongs to.
pub async fn as_service(
    keys: &ServiceKeys,
    method: Method,
    service: (&str, &Running),
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let (name, running) = service;
    let mut req = client()
        .request(method, running.url(path))
        .bearer_auth(keys.issue(name));
    if let Some(b) = body {
        req = req.json(&b);
    }
    send(req).await
}

/// The rows of `table` (test tables are small).
pub async fn count_rows(db: &sqlx::AnyPool, table: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
        .fetch_one(db)
        .await
        .unwrap()
}

/// Polls `check` until it gives `Some`, failing with `what` after 15 s.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// An event subscriber that records every delivery and the
/// `Authorization` header it came with, answering `status` (200 unless
/// changed).
#[derive(Clone)]
pub struct Inbox {
    received: Deliveries,
    answer: Arc<Mutex<u16>>,
    pub addr: SocketAddr,
    _task: Arc<AbortOnDrop>,
}

/// The events an inbox received, each with its `Authorization` header.
type Deliveries = Arc<Mutex<Vec<(Value, Option<String>)>>>;

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Inbox {
    /// An inbox on a free port.
    pub async fn start() -> Self {
        Self::start_on(None).await
    }

    /// An inbox on `addr` (a subscriber that comes up late), or a free port.
    pub async fn start_on(addr: Option<SocketAddr>) -> Self {
        let received: Deliveries = Arc::default();
        let answer = Arc::new(Mutex::new(200u16));
        let state = (received.clone(), answer.clone());
        type St = (Deliveries, Arc<Mutex<u16>>);
        let app = axum::Router::new()
            .route(
                "/events",
                axum_post(
                    |State((received, answer)): State<St>,
                     headers: HeaderMap,
                     Json(event): Json<Value>| async move {
                        let token = headers
                            .get("authorization")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned);
                        let status = *answer.lock().unwrap();
                        if status < 300 {
                            received.lock().unwrap().push((event, token));
                        }
                        (
                            axum::http::StatusCode::from_u16(status).unwrap(),
                            axum::Json(serde_json::json!({"status": "applied"})),
                        )
                    },
                ),
            )
            .with_state(state);
        let (addr, task) = match addr {
            None => serve(app).await,
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
                let task = tokio::spawn(async move {
                    axum::serve(listener, app).await.unwrap();
                });
                (addr, task)
            }
        };
        Self {
            received,
            answer,
            addr,
            _task: Arc::new(AbortOnDrop(task)),
        }
    }

    /// Answer every later delivery with `status` (not recording it unless
    /// it is a 2xx).
    pub fn answer(&self, status: u16) {
        *self.answer.lock().unwrap() = status;
    }

    pub fn url(&self) -> String {
        format!("http://{}/events", self.addr)
    }

    /// This inbox as the subscriber of every event type (its audience is
    /// `audience`, the service it plays).
    pub fn subscribers(&self, audience: &str) -> Subscribers {
        subscribers_of(&[("*", self.url(), audience)])
    }

    /// Every delivered event, in arrival order.
    pub fn events(&self) -> Vec<Value> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .map(|(e, _)| e.clone())
            .collect()
    }

    /// The `Authorization` headers of the deliveries.
    pub fn tokens(&self) -> Vec<Option<String>> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .map(|(_, t)| t.clone())
            .collect()
    }

    /// Deliveries matching `pred`.
    pub fn count(&self, pred: impl Fn(&Value) -> bool) -> usize {
        self.events().iter().filter(|e| pred(e)).count()
    }

    /// Waits for a delivery of type `kind` whose `data.<field>` is `value`.
    pub async fn wait_for(&self, kind: &str, field: &str, value: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let found = self
                .events()
                .into_iter()
                .rfind(|e| e["type"] == kind && e["data"][field] == value);
            if let Some(e) = found {
                return e;
            }
            assert!(
                Instant::now() < deadline,
                "no {kind} event with {field} = {value}: {:?}",
                self.events()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// Subscribers from `(event type, url, audience)` triples.
pub fn subscribers_of(entries: &[(&str, String, &str)]) -> Subscribers {
    let mut s = Subscribers::new();
    for (kind, url, audience) in entries {
        s.entry((*kind).to_owned())
            .or_default()
            .push(Subscriber::url(url, audience));
    }
    s
}

/// The value of the Prometheus sample that starts with `line_start` on
/// `base/metrics`, if present.
pub async fn metric(base: &str, line_start: &str) -> Option<f64> {
    let text = crate::common::text_of(client().get(format!("{base}/metrics"))).await;
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// `tiergate serve <service> -c <data dir>/services.yaml` (the file holding
/// `config`) in its own process, in development mode, on `listen`, with
/// this world's data directory and `env`; returns once `/health` answers.
pub async fn serve_process(
    world: &World,
    service: &str,
    config: &str,
    listen: &str,
    env: &[(&str, String)],
) -> std::process::Child {
    let child = serve_command(world, service, config, listen, env)
        .spawn()
        .unwrap();
    let health = format!("http://{listen}/health");
    eventually(&format!("{service} up"), || async {
        let r = client().get(&health).send().await.ok()?;
        (r.status() == StatusCode::OK).then_some(())
    })
    .await;
    child
}

/// The command [`serve_process`] runs (for a process expected to die
/// before it answers).
pub fn serve_command(
    world: &World,
    service: &str,
    config: &str,
    listen: &str,
    env: &[(&str, String)],
) -> std::process::Command {
    let file = world.dir.path().join("services.yaml");
    std::fs::write(&file, config).unwrap();
    let upper = service.to_ascii_uppercase();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tiergate"));
    cmd.args(["serve", service, "-c"])
        .arg(&file)
        .env("TIERGATE_ENV", "development")
        .env("TIERGATE_DATA_DIR", world.dir.path())
        .env(format!("TIERGATE_{upper}_LISTEN"), listen)
        .env("RUST_LOG", "warn")
        .current_dir(world.dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}
