//! The users service: accounts, tokens and events, directly and through
//! the gateway (which verifies its EdDSA tokens through its JWKS), on
//! SQLite and on PostgreSQL.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post as axum_post;
use axum::Json;
use backend_common::app::RunningService;
use backend_common::outbox::{DispatchSettings, Subscribers};
use backend_common::secret::Secret;
use backend_common::service_auth::ServiceTokens;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::{client, free_port, gateway, json_of, serve, text_of, TestGateway};

const SECRET: &str = "test-service-secret-0123456789abcdef";
const PASSWORD: &str = "correct horse 9";

/// A fresh data directory.
fn temp_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("tg-users-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Settings for a users service on a free port with its data in `dir`.
fn settings(
    dir: &std::path::Path,
    db_url: Option<&str>,
    events: Subscribers,
) -> users::UsersSettings {
    let dir = dir.display().to_string();
    let db_url = db_url.map(str::to_owned);
    let env = move |k: &str| match k {
        "TIERGATE_DATA_DIR" => Some(dir.clone()),
        "TIERGATE_USERS_LISTEN" => Some("127.0.0.1:0".to_owned()),
        "TIERGATE_SERVICE_SECRET" => Some(SECRET.to_owned()),
        "TIERGATE_USERS_DATABASE_URL" => db_url.clone(),
        _ => None,
    };
    let mut s = backend_common::config::load::<users::UsersConfig>(
        "users",
        8021,
        None,
        &env,
        backend_common::config::Environment::Development,
    )
    .unwrap();
    // Cheaper hashing keeps the suite fast; the bench measures the default.
    s.service.argon2_memory_kib = 8192;
    s.service.argon2_iterations = 1;
    s.service.admin_emails = vec!["root@example.com".to_owned()];
    s.shared.events = events;
    s
}

fn fast_dispatch() -> DispatchSettings {
    DispatchSettings {
        poll_interval: Duration::from_millis(100),
        base_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_millis(400),
        timeout: Duration::from_secs(2),
    }
}

fn start(s: users::UsersSettings) -> RunningService {
    users::start_with(s, fast_dispatch()).unwrap()
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
    let name = url.rsplit('/').next().unwrap().to_owned();
    let server = crate::common::postgres_server();
    if let Ok(admin) = sqlx::AnyPool::connect(&format!("{server}/postgres")).await {
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&admin)
        .await;
    }
}

/// A subscriber that records every event it is sent (and the token).
#[derive(Clone, Default)]
struct Inbox(Arc<Mutex<Vec<Received>>>);

/// An event and the `Authorization` header it came with.
type Received = (Value, Option<String>);

/// path, content type, body, status, error code, field at fault.
type BadCase = (
    &'static str,
    &'static str,
    Vec<u8>,
    u16,
    &'static str,
    Option<&'static str>,
);

impl Inbox {
    fn events(&self) -> Vec<Value> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(e, _)| e.clone())
            .collect()
    }

    /// Waits for an event of `kind` about `email`.
    async fn wait_for(&self, kind: &str, email: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let found = self
                .events()
                .into_iter()
                .find(|e| e["type"] == kind && e["data"]["email"] == email);
            if let Some(e) = found {
                return e;
            }
            assert!(
                Instant::now() < deadline,
                "no {kind} event for {email}: {:?}",
                self.events()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn inbox_on(addr: Option<SocketAddr>) -> (Inbox, SocketAddr, tokio::task::JoinHandle<()>) {
    let inbox = Inbox::default();
    let app = axum::Router::new()
        .route(
            "/events",
            axum_post(|State(inbox): State<Inbox>, headers: HeaderMap, Json(event): Json<Value>| async move {
                let token = headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                inbox.0.lock().unwrap().push((event, token));
                "ok"
            }),
        )
        .with_state(inbox.clone());
    let (addr, handle) = match addr {
        None => serve(app).await,
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
            let handle = tokio::spawn(async move {
                axum::serve(listener, app).await.unwrap();
            });
            (addr, handle)
        }
    };
    (inbox, addr, handle)
}

/// A users service (on `db_url`, else SQLite) whose events all go to a
/// fresh inbox.
async fn with_inbox(
    db_url: Option<&str>,
) -> (Inbox, RunningService, PathBuf, tokio::task::JoinHandle<()>) {
    let (inbox, inbox_addr, handle) = inbox_on(None).await;
    let dir = temp_dir();
    let svc = start(settings(
        &dir,
        db_url,
        subscribers(&format!("http://{inbox_addr}/events")),
    ));
    (inbox, svc, dir, handle)
}

fn subscribers(url: &str) -> Subscribers {
    let mut s = Subscribers::new();
    s.insert("*".to_owned(), vec![url.to_owned()]);
    s
}

async fn post(base: &str, path: &str, body: Value) -> (StatusCode, Value) {
    let r = client()
        .post(format!("{base}{path}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn get_auth(base: &str, path: &str, token: &str) -> (StatusCode, Value) {
    let r = client()
        .get(format!("{base}{path}"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// A login attempt.
async fn login(base: &str, email: &str, password: &str) -> (StatusCode, Value) {
    post(
        base,
        "/api/auth/login",
        json!({"email": email, "password": password}),
    )
    .await
}

/// The status of a refresh with `token`.
async fn refresh_status(base: &str, token: &Value) -> StatusCode {
    post(base, "/api/auth/refresh", json!({ "refresh_token": token }))
        .await
        .0
}

fn token_of(link: &Value) -> String {
    link.as_str()
        .unwrap()
        .split("token=")
        .nth(1)
        .unwrap()
        .to_owned()
}

/// Registers, verifies through the event's link, logs in.
async fn signed_up(base: &str, inbox: &Inbox, email: &str) -> Value {
    let (status, user) = post(
        base,
        "/api/auth/register",
        json!({"email": email, "password": PASSWORD, "name": "Ann"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{user}");
    let event = inbox.wait_for("user.registered", email).await;
    let (status, body) = post(
        base,
        "/api/auth/verify-email",
        json!({"token": token_of(&event["data"]["verification_url"])}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, pair) = login(base, email, PASSWORD).await;
    assert_eq!(status, StatusCode::OK, "{pair}");
    pair
}

fn gateway_for(users: SocketAddr) -> TestGateway {
    gateway(&format!(
        r#"upstreams:
  users: {{ backends: [{{ address: "{users}" }}] }}
auth:
  jwks: {{ url: "http://{users}/.well-known/jwks.json" }}
  issuer: tiergate-users
  audience: tiergate
rate_limit:
  tiers:
    - {{ name: FREE, per_minute: 10, per_hour: 100, per_day: 1000 }}
    - {{ name: PREMIUM, per_minute: 200, per_hour: 5000, per_day: 50000 }}
  anonymous: {{ per_minute: 1000, per_hour: 10000, per_day: 100000 }}
routes:
  - {{ name: auth, match: {{ path: {{ prefix: /api/auth }} }}, upstream: users }}
  - {{ name: users, match: {{ path: {{ prefix: /api/users }} }}, upstream: users, auth: required }}
  - {{ name: admin, match: {{ path: {{ prefix: /api/admin }} }}, upstream: users, auth: required, roles: [admin] }}
"#
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_account_lifecycle_through_the_gateway() {
    let (inbox, svc, dir, _h) = with_inbox(None).await;
    let gw = gateway_for(svc.addr);
    let base = gw.url("");

    let pair = signed_up(&base, &inbox, "ann@example.com").await;
    assert_eq!(pair["token_type"], "Bearer");
    assert_eq!(pair["expires_in"], 900);
    let access = pair["access_token"].as_str().unwrap().to_owned();
    let header = jsonwebtoken::decode_header(&access).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::EdDSA);
    assert!(header.kid.is_some());

    // A FREE-tier token: 10 requests a minute, the 11th is refused.
    for i in 0..10 {
        let (status, me) = get_auth(&base, "/api/users/me", &access).await;
        assert_eq!(status, StatusCode::OK, "request {i}: {me}");
        assert_eq!(me["email"], "ann@example.com");
        assert_eq!(me["tier"], "FREE");
    }
    let (status, body) = get_auth(&base, "/api/users/me", &access).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");

    // A tampered token (tier raised) is refused by the gateway.
    let mut parts: Vec<&str> = access.split('.').collect();
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut claims: Value = serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
    claims["tier"] = "ENTERPRISE".into();
    let forged = b64.encode(claims.to_string());
    parts[1] = &forged;
    let (status, _) = get_auth(&base, "/api/users/me", &parts.join(".")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // ... and by the service itself, should a request bypass the gateway.
    let direct = format!("http://{}", svc.addr);
    let (status, body) = get_auth(&direct, "/api/users/me", &parts.join(".")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["code"], "invalid_token");

    // Admin routes refuse a plain user: at the gateway (role check) and at the service.
    let (status, _) = get_auth(&base, "/api/admin/users", &access).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = get_auth(&direct, "/api/admin/users", &access).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body["error"]["code"], "forbidden");
    // A user token cannot read another user through the internal API.
    let (status, _) = get_auth(
        &direct,
        &format!("/internal/users/{}", claims["sub"].as_str().unwrap()),
        &access,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Refresh rotates; the old refresh token presented again revokes the family.
    let r1 = pair["refresh_token"].as_str().unwrap();
    let (status, pair2) = post(&base, "/api/auth/refresh", json!({"refresh_token": r1})).await;
    assert_eq!(status, StatusCode::OK, "{pair2}");
    let r2 = pair2["refresh_token"].as_str().unwrap();
    assert_ne!(r1, r2);
    let (status, body) = post(&base, "/api/auth/refresh", json!({"refresh_token": r1})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["code"], "refresh_token_reused");
    let (status, body) = post(&base, "/api/auth/refresh", json!({"refresh_token": r2})).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "the family is revoked: {body}"
    );

    // Log in again, log out: the refresh token stops working.
    let (_, pair3) = login(&base, "ANN@example.com", PASSWORD).await;
    let r3 = pair3["refresh_token"].as_str().unwrap();
    let r = client()
        .post(format!("{base}/api/auth/logout"))
        .json(&json!({"refresh_token": r3}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let (status, _) = post(&base, "/api/auth/refresh", json!({"refresh_token": r3})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // An admin (by configured e-mail) lists users and grants roles.
    let admin = signed_up(&base, &inbox, "root@example.com").await;
    let admin_token = admin["access_token"].as_str().unwrap();
    let (status, page) = get_auth(&base, "/api/admin/users?limit=1", admin_token).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    let (_, page2) = get_auth(
        &base,
        &format!(
            "/api/admin/users?limit=5&after={}",
            page["next_after"].as_str().unwrap()
        ),
        admin_token,
    )
    .await;
    assert_eq!(page2["items"][0]["email"], "root@example.com");
    let ann_id = page["items"][0]["id"].as_str().unwrap();
    let r = client()
        .patch(format!("{base}/api/admin/users/{ann_id}"))
        .bearer_auth(admin_token)
        .json(&json!({"roles": ["user", "admin"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.json::<Value>().await.unwrap()["roles"],
        json!(["user", "admin"])
    );
    let admin_id = page2["items"][0]["id"].as_str().unwrap();
    let r = client()
        .patch(format!("{base}/api/admin/users/{admin_id}"))
        .bearer_auth(admin_token)
        .json(&json!({"roles": ["user"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "no self-demotion"
    );

    // PATCH /me renames; the JWKS is public through the gateway's users upstream.
    let r = client()
        .patch(format!("{base}/api/users/me"))
        .bearer_auth(admin_token)
        .json(&json!({"name": "  Root  "}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["name"], "Root");
    let jwks: Value = json_of(client().get(format!("{direct}/.well-known/jwks.json"))).await;
    assert_eq!(jwks["keys"][0]["kid"], header.kid.unwrap().as_str());
    // Every delivered event carried a service token.
    assert!(inbox
        .0
        .lock()
        .unwrap()
        .iter()
        .all(|(_, t)| t.as_deref().is_some_and(|t| t.starts_with("Bearer "))));
    svc.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// The same flows on PostgreSQL: one code path for both databases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_accounts_tokens_and_tier_events_on_postgres() {
    let url = fresh_postgres().await;
    let (inbox, svc, dir, _h) = with_inbox(Some(&url)).await;
    let base = format!("http://{}", svc.addr);
    let pair = signed_up(&base, &inbox, "pg@example.com").await;
    let (status, body) = post(
        &base,
        "/api/auth/register",
        json!({"email": "PG@example.com", "password": PASSWORD, "name": "x"}),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "email_taken");
    let r1 = pair["refresh_token"].as_str().unwrap();
    let (status, _) = post(&base, "/api/auth/refresh", json!({"refresh_token": r1})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = post(&base, "/api/auth/refresh", json!({"refresh_token": r1})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("refresh_token_reused"))
    );
    tier_events_apply_once(&base, pair["access_token"].as_str().unwrap()).await;
    svc.stop().await;
    drop_postgres(&url).await;
    let _ = std::fs::remove_dir_all(dir);
}

/// `subscription.*` events set the tier once per event id; later logins
/// carry it; older events do not undo newer ones.
async fn tier_events_apply_once(base: &str, access: &str) {
    let (_, me) = get_auth(base, "/api/users/me", access).await;
    let user_id = me["id"].as_str().unwrap().to_owned();
    let tokens = ServiceTokens::new("subscriptions", &Secret::new(SECRET.to_owned())).unwrap();
    let send = |event: Value, token: Option<String>| {
        let mut req = client()
            .post(format!("{base}/internal/events"))
            .json(&event);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        async move {
            let r = req.send().await.unwrap();
            let status = r.status();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let now = backend_common::db::now_ms();
    let activated = json!({"id": "evt-1", "type": "subscription.activated", "source": "subscriptions",
        "occurred_at": now, "data": {"user_id": user_id, "tier": "PREMIUM"}});
    let (status, body) = send(activated.clone(), Some(tokens.issue())).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("applied")),
        "{body}"
    );
    let (_, body) = send(activated.clone(), Some(tokens.issue())).await;
    assert_eq!(body["status"], "duplicate");
    // An end that happened before the activation arrives late: ignored.
    let stale = json!({"id": "evt-0", "type": "subscription.ended", "source": "subscriptions",
        "occurred_at": now - 60_000, "data": {"user_id": user_id}});
    let (_, body) = send(stale, Some(tokens.issue())).await;
    assert_eq!(body["status"], "stale");
    // Only service tokens: none, or a user's access token, is 401.
    let (status, _) = send(activated.clone(), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, body) = send(activated.clone(), Some(access.to_owned())).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_service_token"))
    );
    let (status, body) = send(json!({"id": "evt-2", "type": "subscription.activated", "source": "s", "occurred_at": now, "data": {"user_id": user_id, "tier": "GOLD"}}), Some(tokens.issue())).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    // A new login carries the tier.
    let (_, me) = get_auth(base, "/api/users/me", access).await;
    assert_eq!(me["tier"], "PREMIUM");
    let email = me["email"].as_str().unwrap();
    let (_, pair) = login(base, email, PASSWORD).await;
    let claims: Value = {
        use base64::Engine;
        let payload = pair["access_token"]
            .as_str()
            .unwrap()
            .split('.')
            .nth(1)
            .unwrap();
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .unwrap(),
        )
        .unwrap()
    };
    assert_eq!(claims["tier"], "PREMIUM");
    assert_eq!(claims["iss"], "tiergate-users");
    assert_eq!(claims["aud"], "tiergate");
    for claim in ["sub", "roles", "exp", "iat", "jti", "sid"] {
        assert!(!claims[claim].is_null(), "claim {claim} missing: {claims}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_tier_events_on_sqlite() {
    let (inbox, svc, dir, _h) = with_inbox(None).await;
    let base = format!("http://{}", svc.addr);
    let pair = signed_up(&base, &inbox, "tier@example.com").await;
    tier_events_apply_once(&base, pair["access_token"].as_str().unwrap()).await;
    svc.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// At-least-once delivery: a subscriber that is down gets the event when
/// it comes back, and an event committed just before the producer dies is
/// delivered after its restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_outbox_delivers_after_subscriber_outage_and_producer_restart() {
    let port = free_port();
    let sub_addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let dir = temp_dir();
    let url = format!("http://{sub_addr}/events");
    // Subscriber down; register; the producer dies right after the commit.
    let svc = start(settings(&dir, None, subscribers(&url)));
    let base = format!("http://{}", svc.addr);
    let (status, _) = post(
        &base,
        "/api/auth/register",
        json!({"email": "late@example.com", "password": PASSWORD, "name": "L"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    drop(svc);
    // Restarted producer, subscriber still down for a while, then up.
    let svc = start(settings(&dir, None, subscribers(&url)));
    let base = format!("http://{}", svc.addr);
    let (status, _) = post(
        &base,
        "/api/auth/register",
        json!({"email": "down@example.com", "password": PASSWORD, "name": "D"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let metrics = text_of(client().get(format!("{base}/metrics"))).await;
    assert!(metrics.contains("outbox_deliveries_total{event_type=\"user.registered\",result=\"failed\",service=\"users\"}"), "{metrics}");
    let (inbox, _, _h) = inbox_on(Some(sub_addr)).await;
    inbox.wait_for("user.registered", "late@example.com").await;
    inbox.wait_for("user.registered", "down@example.com").await;
    // Each event id once per subscriber when acknowledged (at least once; no duplicates here).
    let ids: Vec<Value> = inbox.events().iter().map(|e| e["id"].clone()).collect();
    let mut unique = ids.clone();
    unique.dedup();
    assert_eq!(ids.len(), unique.len());
    // Acknowledged events are deleted (their links must not stay at rest).
    let db = sqlite_of(&dir).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while count_rows(&db, "outbox_events").await > 0 {
        assert!(Instant::now() < deadline, "delivered events were kept");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(count_rows(&db, "outbox_deliveries").await, 0);
    db.close().await;
    svc.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// The users database of a service whose data is in `dir`.
async fn sqlite_of(dir: &std::path::Path) -> sqlx::AnyPool {
    sqlx::any::install_default_drivers();
    sqlx::AnyPool::connect(&format!("sqlite://{}", dir.join("users.db").display()))
        .await
        .unwrap()
}

async fn count_rows(db: &sqlx::AnyPool, table: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
        .fetch_one(db)
        .await
        .unwrap()
}

/// Used and expired tokens are purged; live ones stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_used_and_expired_tokens_are_purged() {
    let (inbox, svc, dir, _h) = with_inbox(None).await;
    let base = format!("http://{}", svc.addr);
    signed_up(&base, &inbox, "purge@example.com").await;
    let (status, _) = post(
        &base,
        "/api/auth/password/forgot",
        json!({"email": "purge@example.com"}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let db = sqlite_of(&dir).await;
    assert_eq!(count_rows(&db, "one_time_tokens").await, 2);
    let mut conn = db.acquire().await.unwrap();
    let now = backend_common::db::now_ms();
    // The used verification link goes; the live reset link and the live
    // refresh token stay.
    let purged = users::storage::purge_expired(&mut conn, now).await.unwrap();
    assert_eq!(purged, 1);
    assert_eq!(count_rows(&db, "one_time_tokens").await, 1);
    assert_eq!(count_rows(&db, "refresh_tokens").await, 1);
    // A month and a day later everything has expired.
    let later = now + 31 * 86_400_000;
    let purged = users::storage::purge_expired(&mut conn, later)
        .await
        .unwrap();
    assert_eq!(purged, 2);
    drop(conn);
    db.close().await;
    svc.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// Every kind of bad input is a 4xx in the error envelope, never a 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_bad_input_gets_clear_4xx_envelopes() {
    let (inbox, svc, dir, _h) = with_inbox(None).await;
    let base = format!("http://{}", svc.addr);
    let raw = |path: &str, content_type: &str, body: Vec<u8>| {
        client()
            .post(format!("{base}{path}"))
            .header("content-type", content_type)
            .header("x-request-id", "req-123")
            .body(body)
    };
    let cases: Vec<BadCase> = vec![
        (
            "/api/auth/register",
            "application/json",
            br#"{"email":"a@b.io","name":"A"}"#.to_vec(),
            422,
            "validation_failed",
            Some("password"),
        ),
        (
            "/api/auth/register",
            "application/json",
            br#"{"email":5,"password":"x","name":"A"}"#.to_vec(),
            422,
            "validation_failed",
            Some("email"),
        ),
        (
            "/api/auth/register",
            "application/json",
            br#"{"email":"a@b.io","password":"correct horse 9","name":"A","admin":true}"#.to_vec(),
            422,
            "validation_failed",
            Some("admin"),
        ),
        (
            "/api/auth/register",
            "application/json",
            br#"{"email":"nope","password":"short","name":""}"#.to_vec(),
            422,
            "validation_failed",
            Some("email"),
        ),
        (
            "/api/auth/register",
            "application/json",
            b"{not json".to_vec(),
            400,
            "malformed_json",
            None,
        ),
        (
            "/api/auth/register",
            "application/json",
            Vec::new(),
            400,
            "malformed_json",
            None,
        ),
        (
            "/api/auth/register",
            "text/plain",
            b"hello".to_vec(),
            415,
            "unsupported_media_type",
            None,
        ),
        (
            "/api/auth/register",
            "application/json",
            format!(
                r#"{{"email":"a@b.io","password":"p","name":"{}"}}"#,
                "x".repeat(70_000)
            )
            .into_bytes(),
            413,
            "payload_too_large",
            None,
        ),
        (
            "/api/auth/login",
            "application/json",
            br#"{"email":"nobody@example.com","password":"whatever123"}"#.to_vec(),
            401,
            "invalid_credentials",
            None,
        ),
        (
            "/api/auth/login",
            "application/json",
            br#"[]"#.to_vec(),
            422,
            "validation_failed",
            None,
        ),
        (
            "/api/auth/verify-email",
            "application/json",
            br#"{"token":"forged"}"#.to_vec(),
            400,
            "invalid_token",
            None,
        ),
        (
            "/api/auth/password/reset",
            "application/json",
            br#"{"token":"forged","password":"correct horse 9"}"#.to_vec(),
            400,
            "invalid_token",
            None,
        ),
        (
            "/api/auth/password/reset",
            "application/json",
            br#"{"token":"forged","password":"weak"}"#.to_vec(),
            422,
            "validation_failed",
            Some("password"),
        ),
        (
            "/api/auth/refresh",
            "application/json",
            br#"{"refresh_token":"forged"}"#.to_vec(),
            401,
            "invalid_refresh_token",
            None,
        ),
        (
            "/nope",
            "application/json",
            b"{}".to_vec(),
            404,
            "route_not_found",
            None,
        ),
    ];
    for (path, ct, body, status, code, field) in cases {
        let r = raw(path, ct, body).send().await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{path} {code}");
        assert_eq!(r.headers()["x-request-id"], "req-123");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], code, "{path}: {v}");
        assert_eq!(v["error"]["request_id"], "req-123");
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
        if let Some(field) = field {
            let fields = v["error"]["fields"].as_array().unwrap();
            assert!(fields.iter().any(|f| f["field"] == field), "{path}: {v}");
        }
    }
    // Policy errors name every field at once.
    let (_, v) = post(
        &base,
        "/api/auth/register",
        json!({"email": "nope", "password": "short", "name": " "}),
    )
    .await;
    let fields: Vec<&str> = v["error"]["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["email", "password", "name"]);
    // Unverified login is a clear 403; forgot is 202 whether or not the account exists.
    post(
        &base,
        "/api/auth/register",
        json!({"email": "new@example.com", "password": PASSWORD, "name": "N"}),
    )
    .await;
    let (status, v) = login(&base, "new@example.com", PASSWORD).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("email_not_verified"))
    );
    let (status, _) = login(&base, "new@example.com", "wrong password 1").await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "a wrong password does not reveal the account state"
    );
    for email in ["new@example.com", "ghost@example.com", "not-an-email"] {
        let (status, _) = post(&base, "/api/auth/password/forgot", json!({"email": email})).await;
        assert_eq!(status, StatusCode::ACCEPTED);
    }
    // Query, path and auth errors.
    let r = client()
        .get(format!("{base}/api/admin/users?limit=abc"))
        .bearer_auth("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = client()
        .get(format!("{base}/api/users/me"))
        .header("authorization", "Basic abc")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "missing_token"
    );
    let r = client()
        .delete(format!("{base}/api/users/me"))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_client_error());
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["code"].is_string(), "{v}");
    let r = client()
        .get(format!("{base}/api/users/me"))
        .header("x-big", "x".repeat(40_000))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_client_error(), "huge header: {}", r.status());
    // Nothing above was a server error.
    let metrics = text_of(client().get(format!("{base}/metrics"))).await;
    assert!(!metrics.contains("status=\"500\""), "{metrics}");
    let _ = inbox;
    svc.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// A reset link sets a new password once and logs every session out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_password_reset_is_single_use_and_revokes_sessions() {
    let (inbox, svc, dir, _h) = with_inbox(None).await;
    let base = format!("http://{}", svc.addr);
    let pair = signed_up(&base, &inbox, "reset@example.com").await;
    let (status, _) = post(
        &base,
        "/api/auth/password/forgot",
        json!({"email": "Reset@Example.com"}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let event = inbox
        .wait_for("user.password_reset_requested", "reset@example.com")
        .await;
    let token = token_of(&event["data"]["reset_url"]);
    let new_password = "battery staple 42";
    let r = client()
        .post(format!("{base}/api/auth/password/reset"))
        .json(&json!({"token": token, "password": new_password}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let (status, _) = post(
        &base,
        "/api/auth/password/reset",
        json!({"token": token, "password": new_password}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "single use");
    assert_eq!(
        refresh_status(&base, &pair["refresh_token"]).await,
        StatusCode::UNAUTHORIZED,
        "sessions revoked"
    );
    let (status, _) = login(&base, "reset@example.com", PASSWORD).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = login(&base, "reset@example.com", new_password).await;
    assert_eq!(status, StatusCode::OK);
    // The verification link was single-use too.
    let registered = inbox.wait_for("user.registered", "reset@example.com").await;
    let (status, _) = post(
        &base,
        "/api/auth/verify-email",
        json!({"token": token_of(&registered["data"]["verification_url"])}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    svc.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

async fn patch_me(base: &str, token: &str, body: Value) -> (StatusCode, Value) {
    let r = client()
        .patch(format!("{base}/api/users/me"))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn count_of(inbox: &Inbox, kind: &str, email: &str) -> usize {
    inbox
        .events()
        .iter()
        .filter(|e| e["type"] == kind && e["data"]["email"] == email)
        .count()
}

/// Resending the verification link (throttled, silent about accounts),
/// changing the password (the other sessions end, this one stays) and the
/// e-mail (effective once the new address is verified).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_resent_verification_and_profile_changes() {
    let (inbox, svc, dir, _h) = with_inbox(None).await;
    let base = format!("http://{}", svc.addr);
    let email = "late@example.com";
    let (status, _) = post(
        &base,
        "/api/auth/register",
        json!({"email": email, "password": PASSWORD, "name": "Late"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let first = inbox.wait_for("user.registered", email).await;
    let resend = |email: &'static str| {
        let base = base.clone();
        async move {
            let (status, body) = post(
                &base,
                "/api/auth/verify-email/resend",
                json!({"email": email}),
            )
            .await;
            assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        }
    };
    // Within a minute of the last link: accepted, nothing sent.
    resend("LATE@example.com").await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(count_of(&inbox, "user.registered", email), 1);
    // A minute later (the link's creation moved back): a new link.
    let db = sqlite_of(&dir).await;
    sqlx::query("UPDATE one_time_tokens SET created_at = created_at - 61000")
        .execute(&db)
        .await
        .unwrap();
    db.close().await;
    resend(email).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while count_of(&inbox, "user.registered", email) < 2 {
        assert!(Instant::now() < deadline, "no second link");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let second = inbox
        .events()
        .into_iter()
        .rfind(|e| e["type"] == "user.registered" && e["data"]["email"] == email)
        .unwrap();
    assert_ne!(
        first["data"]["verification_url"],
        second["data"]["verification_url"]
    );
    let (status, _) = post(
        &base,
        "/api/auth/verify-email",
        json!({"token": token_of(&second["data"]["verification_url"])}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // Verified or unknown accounts: accepted, nothing sent.
    resend(email).await;
    resend("nobody@example.com").await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(count_of(&inbox, "user.registered", email), 2);
    assert_eq!(count_of(&inbox, "user.registered", "nobody@example.com"), 0);

    // Password change: the current password is required and checked.
    let (_, here) = login(&base, email, PASSWORD).await;
    let (_, elsewhere) = login(&base, email, PASSWORD).await;
    let token = here["access_token"].as_str().unwrap().to_owned();
    let new_password = "new password 77";
    let (status, body) = patch_me(&base, &token, json!({"password": new_password})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["error"]["fields"][0]["field"], "current_password");
    let (status, body) = patch_me(
        &base,
        &token,
        json!({"password": new_password, "current_password": "wrong guess 1"}),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body["error"]["code"], "wrong_password");
    let (status, body) = patch_me(
        &base,
        &token,
        json!({"password": "short", "current_password": PASSWORD}),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["error"]["fields"][0]["field"], "password");
    let (status, body) = patch_me(
        &base,
        &token,
        json!({"password": new_password, "current_password": PASSWORD}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // This session keeps working; the other login is over.
    assert_eq!(
        refresh_status(&base, &elsewhere["refresh_token"]).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        refresh_status(&base, &here["refresh_token"]).await,
        StatusCode::OK
    );
    assert_eq!(
        login(&base, email, PASSWORD).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(login(&base, email, new_password).await.0, StatusCode::OK);

    // E-mail change: refused for a taken address; else a link to the new
    // address, and the change only when it is used.
    let (status, _) = post(
        &base,
        "/api/auth/register",
        json!({"email": "taken@example.com", "password": PASSWORD, "name": "T"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, body) = patch_me(
        &base,
        &token,
        json!({"email": "Taken@example.com", "current_password": new_password}),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, body) = patch_me(
        &base,
        &token,
        json!({"email": "New@Example.com", "current_password": new_password, "name": "Renamed"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["email"], email,
        "not before the new address is verified"
    );
    assert_eq!(body["name"], "Renamed");
    let requested = inbox
        .wait_for("user.email_change_requested", "new@example.com")
        .await;
    assert_eq!(requested["data"]["old_email"], email);
    let link = token_of(&requested["data"]["verification_url"]);
    let (status, _) = post(&base, "/api/auth/verify-email", json!({"token": link})).await;
    assert_eq!(status, StatusCode::OK);
    let changed = inbox
        .wait_for("user.email_changed", "new@example.com")
        .await;
    assert_eq!(changed["data"]["old_email"], email);
    let (_, me) = get_auth(&base, "/api/users/me", &token).await;
    assert_eq!(
        (me["email"].as_str(), me["email_verified"].as_bool()),
        (Some("new@example.com"), Some(true))
    );
    assert_eq!(
        login(&base, "new@example.com", new_password).await.0,
        StatusCode::OK
    );
    assert_eq!(
        login(&base, email, new_password).await.0,
        StatusCode::UNAUTHORIZED
    );
    let (status, _) = post(&base, "/api/auth/verify-email", json!({"token": link})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "single use");
    // Nothing to change is a clear 422.
    let (status, body) = patch_me(&base, &token, json!({})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    svc.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// `tiergate serve users` runs in production mode unless told otherwise
/// (no links in the log) and stops gracefully on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_serve_runs_in_production_mode_and_stops_on_sigterm() {
    let dir = temp_dir();
    let port = free_port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tiergate"))
        .args(["serve", "users"])
        .env("TIERGATE_DATA_DIR", &dir)
        .env("TIERGATE_SERVICE_SECRET", SECRET)
        .env("TIERGATE_USERS_LISTEN", format!("127.0.0.1:{port}"))
        .env_remove("TIERGATE_ENV")
        .env_remove("TIERGATE_USERS_DATABASE_URL")
        .current_dir(&dir)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = client().get(format!("{base}/health")).send().await {
            if r.status() == StatusCode::OK {
                break;
            }
        }
        assert!(Instant::now() < deadline, "the service did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, _) = post(
        &base,
        "/api/auth/register",
        json!({"email": "prod@example.com", "password": PASSWORD, "name": "P"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "no exit within 10 s of SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(
        stderr.contains("SIGTERM") && stderr.contains("\"stopped\""),
        "{stderr}"
    );
    assert!(!stderr.contains("token="), "a link was logged: {stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

/// `tiergate rotate-signing-key`: a new key signs, the old one stays
/// published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_rotate_signing_key_command_keeps_the_old_key_published() {
    let dir = temp_dir();
    let svc = start(settings(&dir, None, Subscribers::new()));
    let jwks_url = format!("http://{}/.well-known/jwks.json", svc.addr);
    let before: Value = json_of(client().get(&jwks_url)).await;
    let old_kid = before["keys"][0]["kid"].as_str().unwrap().to_owned();
    svc.stop().await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tiergate"))
        .arg("rotate-signing-key")
        .env("TIERGATE_DATA_DIR", &dir)
        .env("TIERGATE_SERVICE_SECRET", SECRET)
        .env_remove("TIERGATE_USERS_SIGNING_KEY")
        .current_dir(&dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(&format!(", {old_kid}")), "{stdout}");
    let svc = start(settings(&dir, None, Subscribers::new()));
    let after: Value =
        json_of(client().get(format!("http://{}/.well-known/jwks.json", svc.addr))).await;
    let kids: Vec<&str> = after["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert_eq!(kids.len(), 2, "{after}");
    assert_eq!(kids[1], old_kid);
    assert!(
        stdout.contains(&format!("signing key {} is active", kids[0])),
        "{stdout}"
    );
    svc.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// `/health`, `/metrics` and `/openapi.json` on every service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_operational_endpoints() {
    let dir = temp_dir();
    let svc = start(settings(&dir, None, Subscribers::new()));
    let base = format!("http://{}", svc.addr);
    let (status, health) = crate::common::get_json(&client(), &format!("{base}/health")).await;
    assert_eq!(status, 200);
    assert_eq!(
        health,
        json!({"status": "ok", "service": "users", "database": "up"})
    );
    let (status, doc) = crate::common::get_json(&client(), &format!("{base}/openapi.json")).await;
    assert_eq!(status, 200);
    for path in [
        "/api/auth/register",
        "/api/auth/login",
        "/api/users/me",
        "/api/admin/users/{id}",
        "/.well-known/jwks.json",
        "/internal/events",
        "/health",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} missing from the OpenAPI document"
        );
    }
    assert!(doc["components"]["schemas"]["ErrorEnvelope"].is_object());
    let metrics = text_of(client().get(format!("{base}/metrics"))).await;
    assert!(metrics.contains("http_requests_total{method=\"GET\",route=\"/health\",status=\"200\",service=\"users\"} 1"), "{metrics}");
    // A second service on the same data directory shares the signing key.
    let other = start(settings(&dir, None, Subscribers::new()));
    let jwks_a: Value = json_of(client().get(format!("{base}/.well-known/jwks.json"))).await;
    let jwks_b: Value =
        json_of(client().get(format!("http://{}/.well-known/jwks.json", other.addr))).await;
    assert_eq!(jwks_a, jwks_b);
    other.stop().await;
    svc.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// `tiergate migrate` creates the database and can run again; a bad
/// services config is exit code 64 with the key's place.
#[test]
fn test_migrate_command_is_idempotent_and_rejects_bad_config() {
    let dir = temp_dir();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tiergate"))
            .args(args)
            .env("TIERGATE_DATA_DIR", &dir)
            .env("TIERGATE_SERVICE_SECRET", SECRET)
            .env_remove("TIERGATE_USERS_DATABASE_URL")
            .current_dir(&dir)
            .output()
            .unwrap()
    };
    for _ in 0..2 {
        let out = run(&["migrate"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("users: migrations applied"));
    }
    assert!(dir.join("users.db").exists());
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, "services:\n  users:\n    acess_token_ttl: 5m\n").unwrap();
    let out = run(&["migrate", "-c", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("services.users") && stderr.contains("acess_token_ttl"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// The schemathesis version the contract test runs (from PyPI).
const SCHEMATHESIS: &str = "schemathesis==4.32.5";

/// The `st` command, installing schemathesis with pip when it is missing.
fn schemathesis() -> std::path::PathBuf {
    let found = std::process::Command::new("st").arg("--version").output();
    if !found.is_ok_and(|o| o.status.success()) {
        let pip = std::process::Command::new("python3")
            .args(["-m", "pip", "install", "-q", SCHEMATHESIS])
            .status();
        assert!(
            pip.is_ok_and(|s| s.success()),
            "schemathesis is needed: `python3 -m pip install {SCHEMATHESIS}`"
        );
    }
    std::path::PathBuf::from("st")
}

/// schemathesis, generating requests from `/openapi.json`, finds no 5xx,
/// no undocumented status, no response that breaks its schema.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_openapi_contract_holds_under_schemathesis() {
    let st = schemathesis();
    let dir = temp_dir();
    let svc = start(settings(&dir, None, Subscribers::new()));
    let url = format!("http://{}/openapi.json", svc.addr);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(st)
            .args([
                "run",
                &url,
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
                "--max-examples",
                "25",
                "--seed",
                "1",
                "--no-color",
            ])
            .current_dir(std::env::temp_dir())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found failures:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("passed"), "{stdout}");
    svc.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}
