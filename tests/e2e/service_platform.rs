//! The service platform from a new service's side: `ledger`, a small
//! service written here the way every business service is (a
//! [`Service`] description: its config, migrations, routes, consumer),
//! next to the real users service. It checks what the platform promises
//! each service: user tokens verified against the users service's JWKS,
//! admin-only handlers, calls to other services with typed errors, event
//! consumption with dedupe and rejection, its own constraint errors, its
//! settings' problems reported, the injected clock — on both databases.

use std::future::Future;

use actix_web::{web, HttpResponse};
use async_trait::async_trait;
use backend_common::client::ServiceClient;
use backend_common::clock::Clock;
use backend_common::config::ServiceConfig;
use backend_common::consumer::{Applied, Consumer, Handler};
use backend_common::db::{on_constraint, Constraint, Db};
use backend_common::error::ApiError;
use backend_common::json::Json;
use backend_common::outbox::Event;
use backend_common::service::{Parts, Platform, Service};
use backend_common::service_auth::{AllowedCallers, ServiceCaller};
use backend_common::user_auth::{Admin, AuthUser};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};
use sqlx::migrate::Migrator;
use sqlx::AnyConnection;

use crate::common::{client, free_port};
use crate::platform::{
    as_service, as_user, both_databases, count_rows, eventually, metric, send, subscribers_of,
    Inbox, Running, World,
};
use crate::users::{settings as users_settings, signed_up};

static LEDGER_MIGRATOR: Migrator = sqlx::migrate!("tests/e2e/ledger-migrations");

/// `services.ledger`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
struct LedgerConfig {
    /// Longest note, in characters.
    max_note: usize,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        Self { max_note: 40 }
    }
}

impl ServiceConfig for LedgerConfig {
    fn problems(&self) -> Vec<String> {
        if self.max_note == 0 {
            vec!["services.ledger.max_note: must be at least 1".to_owned()]
        } else {
            Vec::new()
        }
    }
}

/// A service for the platform's tests.
struct Ledger;

impl Service for Ledger {
    type Config = LedgerConfig;
    const NAME: &'static str = "ledger";
    const DEFAULT_PORT: u16 = 8099;

    fn migrator() -> &'static Migrator {
        &LEDGER_MIGRATOR
    }

    fn build(p: &Platform<LedgerConfig>) -> impl Future<Output = Result<Parts, String>> {
        let max_note = p.settings.service.max_note;
        let clock = p.clock.clone();
        async move {
            let mut parts = Parts::new(
                utoipa::openapi::OpenApi::default(),
                std::sync::Arc::new(move |cfg: &mut web::ServiceConfig| {
                    cfg.app_data(web::Data::new(max_note))
                        .route("/api/ledger/me", web::get().to(me))
                        .route("/api/ledger/admin", web::get().to(admin))
                        .route("/api/ledger/notes", web::post().to(add_note))
                        .route("/api/ledger/profile", web::get().to(profile))
                        .route("/api/ledger/self", web::get().to(self_call))
                        .service(
                            web::resource("/internal/ledger/ping")
                                .app_data(AllowedCallers(&["ledger"]))
                                .route(web::get().to(ping)),
                        );
                }),
            );
            parts.consumer =
                Some(Consumer::new("ledger").on("user.registered", &["users"], Members { clock }));
            Ok(parts)
        }
    }
}

async fn me(user: AuthUser) -> HttpResponse {
    HttpResponse::Ok()
        .json(json!({"user_id": user.user_id, "tier": user.tier, "roles": user.roles}))
}

async fn admin(Admin(user): Admin) -> HttpResponse {
    HttpResponse::Ok().json(json!({"admin": user.user_id}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewNote {
    note: String,
}

const NOTE_UNIQUE: Constraint = Constraint {
    name: "notes_user_note_key",
    sqlite: "notes.user_id, notes.note",
};
const NOTE_MEMBER: Constraint = Constraint {
    name: "notes_user_id_fkey",
    sqlite: "FOREIGN KEY",
};

async fn add_note(
    user: AuthUser,
    db: web::Data<Db>,
    clock: web::Data<Clock>,
    max_note: web::Data<usize>,
    body: Json<NewNote>,
) -> Result<HttpResponse, ApiError> {
    let note = body.0.note;
    if note.chars().count() > **max_note {
        return Err(ApiError::validation(vec![
            backend_common::error::FieldError::new("note", "too long"),
        ]));
    }
    let inserted =
        sqlx::query("INSERT INTO notes (id, user_id, note, created_at) VALUES ($1, $2, $3, $4)")
            .bind(uuid::Uuid::now_v7().to_string())
            .bind(&user.user_id)
            .bind(&note)
            .bind(clock.now_ms())
            .execute(db.pool())
            .await;
    match inserted {
        Ok(_) => Ok(HttpResponse::Created().json(json!({"note": note}))),
        Err(e) if on_constraint(&e, &NOTE_UNIQUE) => Err(ApiError::conflict(
            "note_exists",
            "you wrote this note before",
        )),
        Err(e) if on_constraint(&e, &NOTE_MEMBER) => Err(ApiError::new(
            actix_web::http::StatusCode::UNPROCESSABLE_ENTITY,
            "not_a_member",
            "only members write notes",
        )),
        Err(e) => Err(e.into()),
    }
}

/// Reads the caller from the users service (which does not accept
/// `ledger` as a caller).
async fn profile(
    user: AuthUser,
    client: web::Data<ServiceClient>,
) -> Result<HttpResponse, ApiError> {
    let found: Value = client
        .get("users", &format!("/internal/users/{}", user.user_id))
        .await?;
    Ok(HttpResponse::Ok().json(found))
}

/// Calls its own internal route through the service client.
async fn self_call(
    _user: AuthUser,
    client: web::Data<ServiceClient>,
) -> Result<HttpResponse, ApiError> {
    let pong: Value = client.get("ledger", "/internal/ledger/ping").await?;
    Ok(HttpResponse::Ok().json(pong))
}

async fn ping(caller: ServiceCaller) -> HttpResponse {
    HttpResponse::Ok().json(json!({"pong": caller.service}))
}

/// `user.registered` → a member; addresses at `blocked.test` can never
/// be members (a rejection).
struct Members {
    clock: Clock,
}

#[async_trait(?Send)]
impl Handler for Members {
    async fn apply(&self, tx: &mut AnyConnection, event: &Event) -> Result<Applied, ApiError> {
        let (Some(user_id), Some(email)) =
            (event.data["user_id"].as_str(), event.data["email"].as_str())
        else {
            return Ok(Applied::rejected(
                "invalid_event",
                "user_id and email are required",
            ));
        };
        if email.ends_with("@blocked.test") {
            return Ok(Applied::rejected(
                "blocked_domain",
                "this domain cannot join",
            ));
        }
        sqlx::query(
            "INSERT INTO members (user_id, email, joined_at) VALUES ($1, $2, $3) \
             ON CONFLICT DO NOTHING",
        )
        .bind(user_id)
        .bind(email)
        .bind(self.clock.now_ms())
        .execute(&mut *tx)
        .await?;
        Ok(Applied::Applied)
    }
}

/// users (its `user.registered` events going to ledger and, like every
/// event, to an inbox) and ledger (its peer `users` where users runs, so
/// it verifies tokens with users' JWKS).
async fn users_and_ledger(world: &World) -> (Running, Running, Inbox) {
    let inbox = Inbox::start().await;
    let ledger_port = free_port();
    let events = subscribers_of(&[
        (
            "user.registered",
            format!("http://127.0.0.1:{ledger_port}/internal/events"),
            "ledger",
        ),
        ("*", inbox.url(), "inbox"),
    ]);
    let users = world.start::<users::UsersService>(users_settings(world, events).await);
    let listen = format!("127.0.0.1:{ledger_port}");
    let mut s = world
        .settings::<Ledger>(&[("TIERGATE_LEDGER_LISTEN", listen.as_str())])
        .await;
    s.shared.peers.insert("users".into(), users.base.clone());
    s.shared
        .peers
        .insert("ledger".into(), format!("http://{listen}"));
    let ledger = world.start::<Ledger>(s);
    (users, ledger, inbox)
}

async fn access_token(users: &Running, inbox: &Inbox, email: &str) -> String {
    signed_up(&users.base, inbox, email).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned()
}

both_databases! {
    async fn test_a_new_service_on_the_platform(db: Database) {
        let world = World::new(db);
        // A day ahead of the system clock: what the services record is
        // the injected clock's time.
        world.clock.advance(std::time::Duration::from_secs(86_400));
        let before = world.clock.now_ms();
        let (users, ledger, inbox) = users_and_ledger(&world).await;
        let base = ledger.base.clone();
        let ann = access_token(&users, &inbox, "ann@example.com").await;
        let ann_id = inbox.wait_for("user.registered", "email", "ann@example.com").await["data"]["user_id"]
            .as_str()
            .unwrap()
            .to_owned();

        // The user, from users' JWKS; no token, a forged one: 401.
        let (status, me) = as_user(Method::GET, &base, "/api/ledger/me", &ann, None).await;
        assert_eq!(status, StatusCode::OK, "{me}");
        assert_eq!(me, json!({"user_id": ann_id, "tier": "FREE", "roles": ["user"]}));
        let (status, body) = send(client().get(format!("{base}/api/ledger/me"))).await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("missing_token")));
        let forged = format!("{}x", &ann[..ann.len() - 1]);
        let (status, body) = as_user(Method::GET, &base, "/api/ledger/me", &forged, None).await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("invalid_token")));
        // X-User-* headers alone prove nothing.
        let (status, _) = send(
            client()
                .get(format!("{base}/api/ledger/me"))
                .header("x-user-id", &ann_id)
                .header("x-user-roles", "admin"),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);

        // Admin-only: a plain user is 403; an admin passes.
        let (status, body) = as_user(Method::GET, &base, "/api/ledger/admin", &ann, None).await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("forbidden")));
        let root = access_token(&users, &inbox, "root@example.com").await;
        let (status, body) = as_user(Method::GET, &base, "/api/ledger/admin", &root, None).await;
        assert_eq!(status, StatusCode::OK, "{body}");

        // users' events made both members, at the injected clock's time.
        let pool = world.pool("ledger").await;
        eventually("two members", || async { (count_rows(&pool, "members").await == 2).then_some(()) }).await;
        let joined: i64 = sqlx::query_scalar("SELECT joined_at FROM members WHERE user_id = $1")
            .bind(&ann_id)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert!(
            (before..=world.clock.now_ms()).contains(&joined),
            "joined at {joined}, by the injected clock from {before}"
        );

        // Its own constraints, each its own error, on both databases.
        let note = |token: String, text: &'static str| {
            let base = base.clone();
            async move { as_user(Method::POST, &base, "/api/ledger/notes", &token, Some(json!({"note": text}))).await }
        };
        assert_eq!(note(ann.clone(), "hello").await.0, StatusCode::CREATED);
        let (status, body) = note(ann.clone(), "hello").await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("note_exists")));
        let (status, body) = note(ann.clone(), "this note is much longer than forty characters").await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("validation_failed")));

        // An event the consumer can never apply is acknowledged as rejected
        // (users does not retry it); its user is no member.
        let eve = access_token(&users, &inbox, "eve@blocked.test").await;
        let rejected = "events_consumed_total{event_type=\"user.registered\",result=\"rejected\",service=\"ledger\"}";
        eventually("the rejection", || async { metric(&base, rejected).await }).await;
        let users_pool = world.pool("users").await;
        eventually("users' deliveries acknowledged", || async {
            (count_rows(&users_pool, "outbox_deliveries").await == 0).then_some(())
        })
        .await;
        users_pool.close().await;
        let (status, body) = note(eve, "hi").await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("not_a_member")));
        // A redelivery is a duplicate.
        let event = inbox.wait_for("user.registered", "email", "ann@example.com").await;
        let (status, body) = as_service(&world.keys_of("users"), Method::POST, ("ledger", &ledger), "/internal/events", Some(event)).await;
        assert_eq!((status, body["status"].as_str()), (StatusCode::OK, Some("duplicate")), "{body}");
        assert_eq!(count_rows(&pool, "processed_events").await, 3);

        // Calls to other services: its own internal route answers it; users
        // refuses ledger (not among its callers): 502 to the client, not
        // users' 403.
        let (status, body) = as_user(Method::GET, &base, "/api/ledger/self", &ann, None).await;
        assert_eq!((status, body), (StatusCode::OK, json!({"pong": "ledger"})));
        let (status, body) = as_user(Method::GET, &base, "/api/ledger/profile", &ann, None).await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::BAD_GATEWAY, Some("dependency_failed")), "{body}");
        // users down: 503 with Retry-After; tokens still verify (the JWKS is kept).
        users.stop().await;
        let r = client().get(format!("{base}/api/ledger/profile")).bearer_auth(&ann).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(r.headers().contains_key("retry-after"));
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "dependency_unavailable");
        let (status, _) = as_user(Method::GET, &base, "/api/ledger/me", &ann, None).await;
        assert_eq!(status, StatusCode::OK);
        pool.close().await;
        ledger.stop().await;
    }
}

/// A service's settings problems are all reported with their keys: its
/// own section's and the shared ones.
#[test]
fn test_every_settings_problem_of_a_service_is_reported() {
    let dir = crate::platform::TempDir::new("ledger-config");
    let file = dir.path().join("services.yaml");
    std::fs::write(
        &file,
        "peers: { users: not-a-url }\nservices:\n  ledger:\n    max_note: 0\n    colour: blue\n    database: { max_connections: 0 }\n",
    )
    .unwrap();
    let err = backend_common::config::load::<LedgerConfig>(
        Ledger::NAME,
        Ledger::DEFAULT_PORT,
        Some(&file),
        &|_| None,
        backend_common::config::Environment::Development,
    )
    .unwrap_err();
    let text = err.to_string();
    for expected in [
        "services.ledger.max_note: must be at least 1",
        "services.ledger.colour: unknown key",
        "peers.users",
        "services.ledger.database.max_connections",
    ] {
        assert!(text.contains(expected), "{expected} missing from:\n{text}");
    }
    assert!(err.0.len() >= 4, "{err:?}");
}

/// The shipped `conf/services.yaml` is every default written out: loading
/// it changes nothing but `events`, which wires every event each service
/// consumes to it (so `tiergate up` runs the whole loop).
#[test]
fn test_shipped_services_config_is_the_defaults() {
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/services.yaml");
    let load = |file: Option<&std::path::Path>| {
        backend_common::config::load::<users::UsersConfig>(
            "users",
            8021,
            file,
            &|_| None,
            backend_common::config::Environment::Development,
        )
        .unwrap_or_else(|e| panic!("{e}"))
    };
    let mut shipped = load(Some(std::path::Path::new(file)));
    let defaults = load(None);
    let wired = |event: &str, service: &str| {
        shipped
            .shared
            .events
            .get(event)
            .is_some_and(|subs| subs.iter().any(|s| s.key == service))
    };
    let consumers: Vec<(&str, &str)> = notifications::core::CONSUMED
        .iter()
        .map(|(e, _)| (*e, "notifications"))
        .chain([
            ("subscription.activated", "users"),
            ("subscription.renewed", "users"),
            ("subscription.ended", "users"),
            ("invoice.paid", "subscriptions"),
            ("payment.settled", "billing"),
            ("payment.refunded", "billing"),
        ])
        .collect();
    for (event, service) in consumers {
        assert!(wired(event, service), "{event} is not wired to {service}");
    }
    assert!(defaults.shared.events.is_empty());
    shipped.shared.events = defaults.shared.events.clone();
    assert_eq!(format!("{shipped:?}"), format!("{defaults:?}"));
}
