//! The users service: accounts, tokens and events, directly and through
//! the gateway (which verifies its EdDSA tokens through its JWKS). Every
//! test runs on SQLite and on PostgreSQL ([`both_databases!`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::common::{client, free_port, gateway, json_of, text_of, TestGateway};
use crate::platform::{
    as_service, as_user, both_databases, count_rows, eventually, metric, post, send, Database,
    Inbox, Running, World,
};

use users::UsersService;

pub const PASSWORD: &str = "correct horse 9";

/// Settings for a users service in `world` whose events go to `events`:
/// cheap hashing (the bench measures the default), one admin address.
pub async fn settings(
    world: &World,
    events: backend_common::outbox::Subscribers,
) -> users::UsersSettings {
    let mut s = world.settings::<UsersService>(&[]).await;
    s.service.argon2_memory_kib = 8192;
    s.service.argon2_iterations = 1;
    s.service.admin_emails = vec!["root@example.com".to_owned()];
    s.shared.events = events;
    s
}

/// A users service whose events all go to a fresh inbox.
pub async fn with_inbox(db: Database) -> (World, Inbox, Running) {
    let world = World::new(db);
    let inbox = Inbox::start().await;
    let svc = world.start::<UsersService>(settings(&world, inbox.subscribers("inbox")).await);
    (world, inbox, svc)
}

/// A users service with no subscribers.
async fn alone(db: Database) -> (World, Running) {
    let world = World::new(db);
    let svc = world.start::<UsersService>(settings(&world, Default::default()).await);
    (world, svc)
}

/// A login attempt.
pub async fn login(base: &str, email: &str, password: &str) -> (StatusCode, Value) {
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

async fn get_auth(base: &str, path: &str, token: &str) -> (StatusCode, Value) {
    as_user(Method::GET, base, path, token, None).await
}

async fn patch_me(base: &str, token: &str, body: Value) -> (StatusCode, Value) {
    as_user(Method::PATCH, base, "/api/users/me", token, Some(body)).await
}

pub fn token_of(link: &Value) -> String {
    link.as_str()
        .unwrap()
        .split("token=")
        .nth(1)
        .unwrap()
        .to_owned()
}

/// Registers `email`.
async fn register(base: &str, email: &str) {
    let (status, user) = post(
        base,
        "/api/auth/register",
        json!({"email": email, "password": PASSWORD, "name": "Ann"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{user}");
}

/// Registers, verifies through the event's link, logs in.
pub async fn signed_up(base: &str, inbox: &Inbox, email: &str) -> Value {
    register(base, email).await;
    let event = inbox.wait_for("user.registered", "email", email).await;
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

/// The claims of a JWT (unverified).
pub fn claims_of(token: &str) -> Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap()
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

both_databases! {
    async fn test_account_lifecycle_through_the_gateway(db: Database) {
        let (_world, inbox, svc) = with_inbox(db).await;
        let gw = gateway_for(svc.addr());
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
        let mut claims = claims_of(&access);
        claims["tier"] = "ENTERPRISE".into();
        let forged = b64.encode(claims.to_string());
        parts[1] = &forged;
        let (status, _) = get_auth(&base, "/api/users/me", &parts.join(".")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        // ... and by the service itself, should a request bypass the gateway.
        let direct = &svc.base;
        let (status, body) = get_auth(direct, "/api/users/me", &parts.join(".")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body["error"]["code"], "invalid_token");

        // Admin routes refuse a plain user: at the gateway (role check) and at the service.
        let (status, _) = get_auth(&base, "/api/admin/users", &access).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        let (status, body) = get_auth(direct, "/api/admin/users", &access).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(body["error"]["code"], "forbidden");
        // A user token cannot read another user through the internal API.
        let (status, _) = get_auth(
            direct,
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
        assert_eq!(status, StatusCode::UNAUTHORIZED, "the family is revoked: {body}");

        // Log in again, log out: the refresh token stops working.
        let (_, pair3) = login(&base, "ANN@example.com", PASSWORD).await;
        let r3 = pair3["refresh_token"].as_str().unwrap();
        let (status, _) = post(&base, "/api/auth/logout", json!({"refresh_token": r3})).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
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
        let (status, body) = as_user(
            Method::PATCH,
            &base,
            &format!("/api/admin/users/{ann_id}"),
            admin_token,
            Some(json!({"roles": ["user", "admin"]})),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["roles"], json!(["user", "admin"]));
        let admin_id = page2["items"][0]["id"].as_str().unwrap();
        let (status, _) = as_user(
            Method::PATCH,
            &base,
            &format!("/api/admin/users/{admin_id}"),
            admin_token,
            Some(json!({"roles": ["user"]})),
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "no self-demotion");

        // PATCH /me renames; the JWKS is public.
        let (_, body) = patch_me(&base, admin_token, json!({"name": "  Root  "})).await;
        assert_eq!(body["name"], "Root");
        let jwks: Value = json_of(client().get(format!("{direct}/.well-known/jwks.json"))).await;
        assert_eq!(jwks["keys"][0]["kid"], header.kid.unwrap().as_str());
        // Every delivered event carried a service token for its subscriber.
        let tokens = inbox.tokens();
        assert!(!tokens.is_empty());
        for t in tokens {
            let t = t.expect("a delivery without a token");
            let claims = claims_of(t.strip_prefix("Bearer ").unwrap());
            assert_eq!((claims["iss"].as_str(), claims["aud"].as_str()), (Some("users"), Some("inbox")));
        }
        svc.stop().await;
    }
}

both_databases! {
    /// A second registration of an address is 409 `email_taken` (its own
    /// constraint); `subscription.*` events set the tier once per event id,
    /// later logins carry it, older events do not undo newer ones, and an
    /// event that can never apply is acknowledged as rejected.
    async fn test_conflicts_and_tier_events(db: Database) {
        let (world, inbox, svc) = with_inbox(db).await;
        let base = svc.base.clone();
        let pair = signed_up(&base, &inbox, "tier@example.com").await;
        let (status, body) = post(
            &base,
            "/api/auth/register",
            json!({"email": "TIER@example.com", "password": PASSWORD, "name": "x"}),
        )
        .await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("email_taken")));
        let access = pair["access_token"].as_str().unwrap();
        let (_, me) = get_auth(&base, "/api/users/me", access).await;
        let user_id = me["id"].as_str().unwrap().to_owned();

        let subscriptions = world.keys_of("subscriptions");
        let send_event = |event: Value| {
            let keys = subscriptions.clone();
            let svc = &svc;
            async move { as_service(&keys, Method::POST, ("users", svc), "/internal/events", Some(event)).await }
        };
        let now = world.clock.now_ms();
        let activated = json!({"id": "evt-1", "type": "subscription.activated", "source": "subscriptions",
            "occurred_at": now, "data": {"user_id": user_id, "tier": "PREMIUM", "added_later": true},
            "trace": "producers may add fields"});
        let (status, body) = send_event(activated.clone()).await;
        assert_eq!((status, body["status"].as_str()), (StatusCode::OK, Some("applied")), "{body}");
        let (_, body) = send_event(activated.clone()).await;
        assert_eq!(body["status"], "duplicate");
        // An end that happened before the activation arrives late: stale.
        let stale = json!({"id": "evt-0", "type": "subscription.ended", "source": "subscriptions",
            "occurred_at": now - 60_000, "data": {"user_id": user_id}});
        let (_, body) = send_event(stale).await;
        assert_eq!(body["status"], "stale");
        // An unknown tier or user can never apply: acknowledged, remembered.
        let gold = json!({"id": "evt-2", "type": "subscription.activated", "source": "subscriptions",
            "occurred_at": now, "data": {"user_id": user_id, "tier": "GOLD"}});
        let (status, body) = send_event(gold.clone()).await;
        assert_eq!((status, body["status"].as_str()), (StatusCode::OK, Some("rejected")), "{body}");
        assert!(body["reason"].is_string(), "{body}");
        let (_, body) = send_event(gold).await;
        assert_eq!(body["status"], "duplicate");
        let nobody = json!({"id": "evt-3", "type": "subscription.ended", "source": "subscriptions",
            "occurred_at": now, "data": {"user_id": "no-such-user"}});
        let (_, body) = send_event(nobody).await;
        assert_eq!(body["status"], "rejected");
        // An event dated more than five minutes ahead cannot pin the tier.
        let future = json!({"id": "evt-5", "type": "subscription.ended", "source": "subscriptions",
            "occurred_at": now + 86_400_000, "data": {"user_id": user_id}});
        let (_, body) = send_event(future).await;
        assert_eq!((body["status"].as_str(), body["reason"].as_str()), (Some("rejected"), Some("from_the_future")));
        // A type users does not consume, from its producer.
        let billing = world.keys_of("billing");
        let other = json!({"id": "evt-4", "type": "invoice.issued", "source": "billing",
            "occurred_at": now, "data": {}});
        let (_, body) = as_service(&billing, Method::POST, ("users", &svc), "/internal/events", Some(other.clone())).await;
        assert_eq!(body["status"], "ignored");
        // No service delivers another's events, nor a type it does not produce.
        let (status, body) = send_event(other).await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("wrong_source")));
        let forged = json!({"id": "evt-6", "type": "subscription.activated", "source": "billing",
            "occurred_at": now, "data": {"user_id": user_id, "tier": "ENTERPRISE"}});
        let (status, body) = as_service(&billing, Method::POST, ("users", &svc), "/internal/events", Some(forged)).await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("producer_not_allowed")));
        // Each outcome counted.
        for (kind, outcome, n) in [
            ("subscription.activated", "applied", 1.0),
            ("subscription.activated", "duplicate", 2.0),
            ("subscription.activated", "rejected", 1.0),
            ("subscription.activated", "refused", 1.0),
            ("subscription.ended", "stale", 1.0),
            ("subscription.ended", "rejected", 2.0),
            ("invoice.issued", "ignored", 1.0),
            ("invoice.issued", "refused", 1.0),
        ] {
            let line = format!("events_consumed_total{{event_type=\"{kind}\",result=\"{outcome}\",service=\"users\"}}");
            assert_eq!(metric(&base, &line).await, Some(n), "{line}");
        }

        // Only service tokens: none, a user's access token, a token for
        // another audience, or a replayed token is 401.
        let (status, _) = send(client().post(svc.url("/internal/events")).json(&activated)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, body) = as_user(Method::POST, &base, "/internal/events", access, Some(activated.clone())).await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("invalid_service_token")));
        let for_billing = subscriptions.issue("billing");
        let (status, _) = send(client().post(svc.url("/internal/events")).bearer_auth(&for_billing).json(&activated)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let once = subscriptions.issue("users");
        let (status, _) = send(client().post(svc.url("/internal/events")).bearer_auth(&once).json(&activated)).await;
        assert_eq!(status, StatusCode::OK);
        let (status, body) = send(client().post(svc.url("/internal/events")).bearer_auth(&once).json(&activated)).await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("replayed_service_token")));
        // A service whose key is not known (none in the data directory).
        let elsewhere = crate::platform::TempDir::new("stranger");
        let stranger = backend_common::service_auth::ServiceKeys::load(
            &backend_common::service_auth::KeySource::development("subscriptions", elsewhere.path()),
        )
        .unwrap();
        let (status, _) = as_service(&stranger, Method::POST, ("users", &svc), "/internal/events", Some(activated.clone())).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "a key of the same name but not the one users knows");
        // A route declares its callers: the internal user read refuses the gateway.
        let path = format!("/internal/users/{user_id}");
        let (status, body) = as_service(&world.keys_of("gateway"), Method::GET, ("users", &svc), &path, None).await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("caller_not_allowed")));
        let (status, body) = as_service(&world.keys_of("billing"), Method::GET, ("users", &svc), &path, None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["email"], "tier@example.com");

        // A new login carries the tier.
        let (_, me) = get_auth(&base, "/api/users/me", access).await;
        assert_eq!(me["tier"], "PREMIUM");
        let (_, pair) = login(&base, "tier@example.com", PASSWORD).await;
        let claims = claims_of(pair["access_token"].as_str().unwrap());
        assert_eq!(claims["tier"], "PREMIUM");
        assert_eq!(claims["iss"], "tiergate-users");
        assert_eq!(claims["aud"], "tiergate");
        for claim in ["sub", "roles", "exp", "iat", "jti", "sid"] {
            assert!(!claims[claim].is_null(), "claim {claim} missing: {claims}");
        }
        // The dedupe rows were written with the changes.
        let pool = world.pool("users").await;
        assert_eq!(count_rows(&pool, "processed_events").await, 5, "evt-0 to evt-3 and evt-5, each once");
        pool.close().await;
        svc.stop().await;
    }
}

/// The ids of the deliveries in `inbox`, each with how often it came.
fn deliveries_per_id(inbox: &Inbox) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for e in inbox.events() {
        *seen
            .entry(e["id"].as_str().unwrap().to_owned())
            .or_insert(0) += 1;
    }
    seen
}

both_databases! {
    /// At-least-once delivery: a subscriber that is down gets the event when
    /// it comes back, and an event committed just before the producer dies
    /// is delivered after its restart. Payloads at rest are sealed (the
    /// links in them are secrets); delivered events are deleted.
    async fn test_outbox_delivers_after_subscriber_outage_and_producer_restart(db: Database) {
        let world = World::new(db);
        let sub_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let events = crate::platform::subscribers_of(&[("*", format!("http://{sub_addr}/events"), "inbox")]);
        // Subscriber down; register; the producer dies right after the commit.
        let svc = world.start::<UsersService>(settings(&world, events.clone()).await);
        register(&svc.base, "late@example.com").await;
        drop(svc);
        let pool = world.pool("users").await;
        let payloads: Vec<String> = sqlx::query_scalar("SELECT payload FROM outbox_events")
            .fetch_all(&pool)
            .await
            .unwrap();
        assert_eq!(payloads.len(), 1);
        assert!(
            payloads.iter().all(|p| p.starts_with("enc1:") && !p.contains("token=") && !p.contains("late@")),
            "payloads are sealed at rest: {payloads:?}"
        );
        // Restarted producer, subscriber still down for a while, then up.
        let svc = world.start::<UsersService>(settings(&world, events).await);
        register(&svc.base, "down@example.com").await;
        let failed = "outbox_deliveries_total{event_type=\"user.registered\",result=\"failed\",service=\"users\"}";
        eventually("a failed delivery attempt", || async { metric(&svc.base, failed).await }).await;
        let inbox = Inbox::start_on(Some(sub_addr)).await;
        // Retries fall due as the clock moves.
        eventually("both events delivered", || async {
            world.clock.advance(Duration::from_millis(500));
            (inbox.count(|e| e["type"] == "user.registered") >= 2).then_some(())
        })
        .await;
        inbox.wait_for("user.registered", "email", "late@example.com").await;
        inbox.wait_for("user.registered", "email", "down@example.com").await;
        // Each event reached the subscriber exactly once once it was up.
        let seen = deliveries_per_id(&inbox);
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert!(seen.values().all(|&n| n == 1), "{seen:?}");
        // Acknowledged events are deleted (their links must not stay at rest).
        eventually("delivered events deleted", || async {
            (count_rows(&pool, "outbox_events").await == 0).then_some(())
        })
        .await;
        assert_eq!(count_rows(&pool, "outbox_deliveries").await, 0);
        pool.close().await;
        svc.stop().await;
    }
}

both_databases! {
    /// Several instances of the producer share one outbox: every delivery
    /// is claimed by one of them, so the subscriber gets each event once.
    async fn test_instances_sharing_an_outbox_send_each_event_once(db: Database) {
        let world = World::new(db);
        let inbox = Inbox::start().await;
        let a = world.start::<UsersService>(settings(&world, inbox.subscribers("inbox")).await);
        let b = world.start::<UsersService>(settings(&world, inbox.subscribers("inbox")).await);
        let mut emails = Vec::new();
        for i in 0..12 {
            let email = format!("many{i}@example.com");
            let svc = if i % 2 == 0 { &a } else { &b };
            register(&svc.base, &email).await;
            emails.push(email);
        }
        for email in &emails {
            inbox.wait_for("user.registered", "email", email).await;
        }
        let pool = world.pool("users").await;
        eventually("every delivery acknowledged", || async {
            (count_rows(&pool, "outbox_deliveries").await == 0).then_some(())
        })
        .await;
        let seen = deliveries_per_id(&inbox);
        assert_eq!(seen.len(), 12, "{seen:?}");
        assert!(seen.values().all(|&n| n == 1), "an event was sent twice: {seen:?}");
        pool.close().await;
        a.stop().await;
        b.stop().await;
    }
}

both_databases! {
    /// A subscriber that refuses an event for good (a 4xx) gets it parked
    /// as dead: counted, listed by `tiergate events dead`, sent again by
    /// `tiergate events retry`. A subscriber that hangs does not hold up
    /// another one.
    async fn test_dead_deliveries_and_independent_subscribers(db: Database) {
        let world = World::new(db);
        let refusing = Inbox::start().await;
        refusing.answer(400);
        let healthy = Inbox::start().await;
        // A subscriber that accepts the connection and never answers.
        let hanging = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hanging_url = format!("http://{}/events", hanging.local_addr().unwrap());
        let events = crate::platform::subscribers_of(&[
            ("user.registered", refusing.url(), "notifications"),
            ("user.registered", hanging_url, "billing"),
            ("user.registered", healthy.url(), "subscriptions"),
        ]);
        let s = settings(&world, events).await;
        let database_url = s.database_url.expose().clone();
        // A delivery waits up to a minute for an answer: the healthy
        // subscriber getting its events meanwhile shows the loops apart.
        let patient = crate::platform::DispatchSettings {
            timeout: Duration::from_secs(60),
            ..crate::platform::fast_dispatch()
        };
        let svc = world.start_with::<UsersService>(s, patient);
        for i in 0..3 {
            register(&svc.base, &format!("dead{i}@example.com")).await;
        }
        for i in 0..3 {
            healthy.wait_for("user.registered", "email", &format!("dead{i}@example.com")).await;
        }
        // The gauges are refreshed every 15 s, or when the clock moves.
        let dead_gauge = "outbox_dead{service=\"users\"}";
        eventually("three dead deliveries", || async {
            world.clock.advance(Duration::from_millis(1));
            (metric(&svc.base, dead_gauge).await == Some(3.0)).then_some(())
        })
        .await;
        let dead_total = "outbox_dead_total{event_type=\"user.registered\",service=\"users\"}";
        assert_eq!(metric(&svc.base, dead_total).await, Some(3.0));
        let cli = |args: &[&str]| {
            std::process::Command::new(env!("CARGO_BIN_EXE_tiergate"))
                .args(args)
                .env("TIERGATE_DATA_DIR", world.dir.path())
                .env("TIERGATE_USERS_DATABASE_URL", &database_url)
                .current_dir(world.dir.path())
                .output()
                .unwrap()
        };
        let out = cli(&["events", "dead", "--service", "users"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let listing = String::from_utf8_lossy(&out.stdout).to_string();
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines.len(), 3, "{listing}");
        assert!(lines.iter().all(|l| l.contains("user.registered") && l.contains(&refusing.url()) && l.contains("400")), "{listing}");
        // Retry one event, then the rest, once the subscriber accepts.
        refusing.answer(200);
        let first_id = lines[0].split('\t').nth(1).unwrap().to_owned();
        let out = cli(&["events", "retry", "--service", "users", "--event", &first_id]);
        assert!(String::from_utf8_lossy(&out.stdout).contains("users: 1 deliveries queued again"), "{out:?}");
        eventually("the retried delivery", || async {
            (refusing.events().iter().any(|e| e["id"] == first_id.as_str())).then_some(())
        })
        .await;
        let out = cli(&["events", "retry", "--service", "users"]);
        assert!(String::from_utf8_lossy(&out.stdout).contains("users: 2 deliveries queued again"), "{out:?}");
        eventually("every retried delivery", || async {
            (refusing.events().len() == 3).then_some(())
        })
        .await;
        eventually("no dead deliveries", || async {
            world.clock.advance(Duration::from_millis(1));
            (metric(&svc.base, dead_gauge).await == Some(0.0)).then_some(())
        })
        .await;
        let out = cli(&["events", "dead"]);
        assert_eq!(String::from_utf8_lossy(&out.stdout), "", "nothing listed");
        drop(hanging);
        svc.stop().await;
    }
}

/// The PKCS#8 PEM of a fresh development key (made in a directory of its
/// own, so no service of `world` knows it yet).
fn fresh_key_pem() -> backend_common::secret::Secret<String> {
    let elsewhere = crate::platform::TempDir::new("key");
    backend_common::service_auth::ServiceKeys::load(
        &backend_common::service_auth::KeySource::development("users", elsewhere.path()),
    )
    .unwrap();
    let pem = std::fs::read_to_string(elsewhere.path().join("service-keys/users.pem")).unwrap();
    backend_common::secret::Secret::new(pem)
}

both_databases! {
    /// A queued event survives a rotation of its service's key when the old
    /// key is given as the previous one; without it the delivery is parked
    /// as dead (never lost: the payload stays) and `events retry` sends it
    /// once the previous key is set. A subscriber removed from `events`
    /// gets its queued deliveries parked as dead, not pending for ever.
    async fn test_queued_events_survive_a_service_key_rotation(db: Database) {
        let world = World::new(db);
        let sub_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let events = crate::platform::subscribers_of(&[("*", format!("http://{sub_addr}/events"), "inbox")]);
        let old_key = backend_common::secret::Secret::new(
            std::fs::read_to_string({
                world.keys_of("users");
                world.dir.path().join("service-keys/users.pem")
            })
            .unwrap(),
        );
        let new_key = fresh_key_pem();
        let start = |key: backend_common::secret::Secret<String>,
                     previous: Option<backend_common::secret::Secret<String>>,
                     events: backend_common::outbox::Subscribers| {
            let world = &world;
            async move {
                let mut s = settings(world, events).await;
                s.service_key = Some(key);
                s.previous_service_key = previous;
                world.start::<UsersService>(s)
            }
        };
        // Queued under the old key while the subscriber is down.
        let svc = start(old_key.clone(), None, events.clone()).await;
        register(&svc.base, "rotate@example.com").await;
        svc.stop().await;
        // The new key alone cannot open it: parked as dead. (The stopped
        // instance may have claimed the delivery: its claim runs out as the
        // clock moves.)
        let svc = start(new_key.clone(), None, events.clone()).await;
        let dead = "outbox_dead{service=\"users\"}";
        eventually("the sealed delivery parked", || async {
            world.clock.advance(Duration::from_secs(5));
            (metric(&svc.base, dead).await == Some(1.0)).then_some(())
        })
        .await;
        svc.stop().await;
        let database_url = world.db.url_for("users", world.dir.path()).await;
        let out = tiergate_in(&world, &database_url, &["events", "dead"]).output().unwrap();
        let listing = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(listing.contains("sealed payload") && listing.contains("SERVICE_KEY_PREVIOUS"), "{listing}");
        // With the previous key: retried, opened, delivered.
        let svc = start(new_key.clone(), Some(old_key), events.clone()).await;
        let out = tiergate_in(&world, &database_url, &["events", "retry"]).output().unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains("users: 1 deliveries queued again"), "{out:?}");
        let inbox = Inbox::start_on(Some(sub_addr)).await;
        eventually("the event delivered", || async {
            world.clock.advance(Duration::from_millis(200));
            (inbox.count(|e| e["data"]["email"] == "rotate@example.com") == 1).then_some(())
        })
        .await;
        // A subscriber dropped from the config: its queued deliveries are
        // parked, not left pending.
        register(&svc.base, "orphan@example.com").await;
        inbox.wait_for("user.registered", "email", "orphan@example.com").await;
        svc.stop().await;
        drop(inbox);
        let svc = start(new_key.clone(), None, events.clone()).await;
        register(&svc.base, "queued@example.com").await;
        svc.stop().await;
        let svc = start(new_key, None, Default::default()).await;
        eventually("the orphaned delivery parked", || async {
            world.clock.advance(Duration::from_millis(1));
            (metric(&svc.base, dead).await == Some(1.0)).then_some(())
        })
        .await;
        let out = tiergate_in(&world, &database_url, &["events", "dead"]).output().unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains("no longer configured"), "{out:?}");
        svc.stop().await;
    }
}

both_databases! {
    /// The hourly housekeeping purges used and expired tokens (and keeps
    /// live ones) as the clock moves.
    async fn test_used_and_expired_tokens_are_purged(db: Database) {
        let (world, inbox, svc) = with_inbox(db).await;
        let base = svc.base.clone();
        signed_up(&base, &inbox, "purge@example.com").await;
        let (status, _) = post(&base, "/api/auth/password/forgot", json!({"email": "purge@example.com"})).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        let pool = world.pool("users").await;
        assert_eq!(count_rows(&pool, "one_time_tokens").await, 2);
        // The housekeeping runs hourly, and whenever the manual clock moves.
        // Half an hour on: the used verification link goes; the live reset
        // link and the live refresh token stay.
        world.clock.advance(Duration::from_secs(1800));
        eventually("the used link purged", || async {
            (count_rows(&pool, "one_time_tokens").await == 1).then_some(())
        })
        .await;
        assert_eq!(count_rows(&pool, "refresh_tokens").await, 1);
        // A month and a day later everything has expired.
        world.clock.advance(Duration::from_secs(31 * 86_400));
        eventually("everything expired purged", || async {
            (count_rows(&pool, "one_time_tokens").await == 0 && count_rows(&pool, "refresh_tokens").await == 0)
                .then_some(())
        })
        .await;
        pool.close().await;
        svc.stop().await;
    }
}

/// path, content type, body, status, error code, field at fault.
type BadCase = (
    &'static str,
    &'static str,
    Vec<u8>,
    u16,
    &'static str,
    Option<&'static str>,
);

fn bad_cases() -> Vec<BadCase> {
    vec![
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
            "/internal/events",
            "application/json",
            br#"{"id":"x"}"#.to_vec(),
            401,
            "missing_service_token",
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
    ]
}

both_databases! {
    /// Every kind of bad input is a 4xx in the error envelope, never a 500.
    async fn test_bad_input_gets_clear_4xx_envelopes(db: Database) {
        let (_world, _inbox, svc) = with_inbox(db).await;
        let base = svc.base.clone();
        for (path, ct, body, status, code, field) in bad_cases() {
            let r = client()
                .post(format!("{base}{path}"))
                .header("content-type", ct)
                .header("x-request-id", "req-123")
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), status, "{path} {code}");
            assert_eq!(r.headers()["x-request-id"], "req-123");
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["error"]["code"], code, "{path}: {v}");
            assert_eq!(v["error"]["request_id"], "req-123");
            assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
            if let Some(field) = field {
                let fields = v["error"]["fields"].as_array().unwrap();
                assert!(fields.iter().any(|f| f["field"] == field), "{path}: {v}");
            }
        }
        // Policy errors name every field at once.
        let (_, v) = post(&base, "/api/auth/register", json!({"email": "nope", "password": "short", "name": " "})).await;
        let fields: Vec<&str> = v["error"]["fields"].as_array().unwrap().iter().map(|f| f["field"].as_str().unwrap()).collect();
        assert_eq!(fields, ["email", "password", "name"]);
        // Unverified login is a clear 403; forgot is 202 whether or not the account exists.
        register(&base, "new@example.com").await;
        let (status, v) = login(&base, "new@example.com", PASSWORD).await;
        assert_eq!((status, v["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("email_not_verified")));
        let (status, _) = login(&base, "new@example.com", "wrong password 1").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "a wrong password does not reveal the account state");
        for email in ["new@example.com", "ghost@example.com", "not-an-email"] {
            let (status, _) = post(&base, "/api/auth/password/forgot", json!({"email": email})).await;
            assert_eq!(status, StatusCode::ACCEPTED);
        }
        // Query, path and auth errors.
        let (status, _) = get_auth(&base, "/api/admin/users?limit=abc", "x").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (_, v) = send(client().get(format!("{base}/api/users/me")).header("authorization", "Basic abc")).await;
        assert_eq!(v["error"]["code"], "missing_token");
        let (status, v) = send(client().delete(format!("{base}/api/users/me"))).await;
        assert!(status.is_client_error());
        assert!(v["error"]["code"].is_string(), "{v}");
        let r = client().get(format!("{base}/api/users/me")).header("x-big", "x".repeat(40_000)).send().await.unwrap();
        assert!(r.status().is_client_error(), "huge header: {}", r.status());
        // The pages answer HTML whatever the query.
        for q in ["", "?token=", "?token=%ZZ", "?token=a&token=b"] {
            let r = client().get(format!("{base}/verify-email{q}")).send().await.unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
        }
        // Nothing above was a server error.
        let metrics = text_of(client().get(format!("{base}/metrics"))).await;
        assert!(!metrics.contains("status=\"500\""), "{metrics}");
        svc.stop().await;
    }
}

both_databases! {
    /// A reset link sets a new password once and logs every session out.
    async fn test_password_reset_is_single_use_and_revokes_sessions(db: Database) {
        let (_world, inbox, svc) = with_inbox(db).await;
        let base = svc.base.clone();
        let pair = signed_up(&base, &inbox, "reset@example.com").await;
        let (status, _) = post(&base, "/api/auth/password/forgot", json!({"email": "Reset@Example.com"})).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        let event = inbox.wait_for("user.password_reset_requested", "email", "reset@example.com").await;
        let token = token_of(&event["data"]["reset_url"]);
        let new_password = "battery staple 42";
        let (status, _) = post(&base, "/api/auth/password/reset", json!({"token": token, "password": new_password})).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (status, _) = post(&base, "/api/auth/password/reset", json!({"token": token, "password": new_password})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "single use");
        assert_eq!(refresh_status(&base, &pair["refresh_token"]).await, StatusCode::UNAUTHORIZED, "sessions revoked");
        let (status, _) = login(&base, "reset@example.com", PASSWORD).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _) = login(&base, "reset@example.com", new_password).await;
        assert_eq!(status, StatusCode::OK);
        // The verification link was single-use too.
        let registered = inbox.wait_for("user.registered", "email", "reset@example.com").await;
        let (status, _) = post(&base, "/api/auth/verify-email", json!({"token": token_of(&registered["data"]["verification_url"])})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        svc.stop().await;
    }
}

/// The verification links issued to `email` at or after `since` (each is
/// written with its `user.registered` event, in one transaction; the
/// housekeeping purges only used or expired ones).
async fn links_since(pool: &sqlx::AnyPool, email: &str, since: i64) -> i64 {
    sqlx::query_scalar(
        "SELECT COUNT(*) FROM one_time_tokens t JOIN users u ON u.id = t.user_id \
         WHERE u.email = $1 AND t.purpose = 'verify_email' AND t.created_at >= $2",
    )
    .bind(email)
    .bind(since)
    .fetch_one(pool)
    .await
    .unwrap()
}

both_databases! {
    /// Resending the verification link (throttled, silent about accounts),
    /// changing the password (the other sessions end, this one stays) and
    /// the e-mail (effective once the new address is verified).
    async fn test_resent_verification_and_profile_changes(db: Database) {
        let (world, inbox, svc) = with_inbox(db).await;
        let base = svc.base.clone();
        let pool = world.pool("users").await;
        let email = "late@example.com";
        let t0 = world.clock.now_ms();
        register(&base, email).await;
        let first = inbox.wait_for("user.registered", "email", email).await;
        let resend = |email: &'static str| {
            let base = base.clone();
            async move {
                let (status, body) = post(&base, "/api/auth/verify-email/resend", json!({"email": email})).await;
                assert_eq!(status, StatusCode::ACCEPTED, "{body}");
            }
        };
        // Within a minute of the last link: accepted, no new link.
        resend("LATE@example.com").await;
        assert_eq!(links_since(&pool, email, t0).await, 1);
        // A minute later: a new link, and its event.
        world.clock.advance(Duration::from_secs(61));
        let t1 = world.clock.now_ms();
        resend(email).await;
        assert_eq!(links_since(&pool, email, t1).await, 1);
        eventually("the second link", || async {
            (inbox.count(|e| e["type"] == "user.registered" && e["data"]["email"] == email) == 2).then_some(())
        })
        .await;
        let second = inbox.wait_for("user.registered", "email", email).await;
        assert_ne!(first["data"]["verification_url"], second["data"]["verification_url"]);
        let (status, _) = post(&base, "/api/auth/verify-email", json!({"token": token_of(&second["data"]["verification_url"])})).await;
        assert_eq!(status, StatusCode::OK);
        // Verified or unknown accounts: accepted, no link.
        world.clock.advance(Duration::from_secs(61));
        let t2 = world.clock.now_ms();
        resend(email).await;
        resend("nobody@example.com").await;
        assert_eq!(links_since(&pool, email, t2).await, 0);
        assert_eq!(count_rows(&pool, "users").await, 1);

        // Password change: the current password is required and checked.
        let (_, here) = login(&base, email, PASSWORD).await;
        let (_, elsewhere) = login(&base, email, PASSWORD).await;
        let token = here["access_token"].as_str().unwrap().to_owned();
        let new_password = "new password 77";
        let (status, body) = patch_me(&base, &token, json!({"password": new_password})).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(body["error"]["fields"][0]["field"], "current_password");
        let (status, body) = patch_me(&base, &token, json!({"password": new_password, "current_password": "wrong guess 1"})).await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("wrong_password")));
        let (status, body) = patch_me(&base, &token, json!({"password": "short", "current_password": PASSWORD})).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(body["error"]["fields"][0]["field"], "password");
        let (status, body) = patch_me(&base, &token, json!({"password": new_password, "current_password": PASSWORD})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        // This session keeps working; the other login is over.
        assert_eq!(refresh_status(&base, &elsewhere["refresh_token"]).await, StatusCode::UNAUTHORIZED);
        assert_eq!(refresh_status(&base, &here["refresh_token"]).await, StatusCode::OK);
        assert_eq!(login(&base, email, PASSWORD).await.0, StatusCode::UNAUTHORIZED);
        assert_eq!(login(&base, email, new_password).await.0, StatusCode::OK);

        // E-mail change: refused for a taken address; else a link to the new
        // address, and the change only when it is used.
        register(&base, "taken@example.com").await;
        let (status, body) = patch_me(&base, &token, json!({"email": "Taken@example.com", "current_password": new_password})).await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        let (status, body) = patch_me(&base, &token, json!({"email": "New@Example.com", "current_password": new_password, "name": "Renamed"})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["email"], email, "not before the new address is verified");
        assert_eq!(body["name"], "Renamed");
        let requested = inbox.wait_for("user.email_change_requested", "email", "new@example.com").await;
        assert_eq!(requested["data"]["old_email"], email);
        let link = token_of(&requested["data"]["verification_url"]);
        let (status, _) = post(&base, "/api/auth/verify-email", json!({"token": link})).await;
        assert_eq!(status, StatusCode::OK);
        let changed = inbox.wait_for("user.email_changed", "email", "new@example.com").await;
        assert_eq!(changed["data"]["old_email"], email);
        let (_, me) = get_auth(&base, "/api/users/me", &token).await;
        assert_eq!((me["email"].as_str(), me["email_verified"].as_bool()), (Some("new@example.com"), Some(true)));
        assert_eq!(login(&base, "new@example.com", new_password).await.0, StatusCode::OK);
        assert_eq!(login(&base, email, new_password).await.0, StatusCode::UNAUTHORIZED);
        let (status, _) = post(&base, "/api/auth/verify-email", json!({"token": link})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "single use");
        // Nothing to change is a clear 422.
        let (status, body) = patch_me(&base, &token, json!({})).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        pool.close().await;
        svc.stop().await;
    }
}

/// `tiergate` with `args`, in `world`'s data directory on its users
/// database, without the variables a developer's shell may have set.
fn tiergate_in(world: &World, database_url: &str, args: &[&str]) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_tiergate"));
    c.args(args)
        .env("TIERGATE_DATA_DIR", world.dir.path())
        .env("TIERGATE_USERS_DATABASE_URL", database_url)
        .env_remove("TIERGATE_ENV")
        .env_remove("TIERGATE_USERS_SERVICE_KEY")
        .env_remove("TIERGATE_USERS_SERVICE_KEY_FILE")
        .env_remove("TIERGATE_USERS_SIGNING_KEY")
        .current_dir(world.dir.path());
    c
}

both_databases! {
    /// `tiergate serve users` runs in production mode unless told otherwise:
    /// it refuses to start without its own service key, logs no links, and
    /// stops gracefully on SIGTERM.
    async fn test_serve_runs_in_production_mode_and_stops_on_sigterm(db: Database) {
        let world = World::new(db);
        let database_url = world.db.url_for("users", world.dir.path()).await;
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        // No key: a clear start-up error, not a key made up on this host.
        let out = tiergate_in(&world, &database_url, &["serve", "users"])
            .env("TIERGATE_USERS_LISTEN", &listen)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(70));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("TIERGATE_USERS_SERVICE_KEY"), "{stderr}");
        assert!(!world.dir.path().join("service-keys/users.pem").exists(), "no key generated in production");
        // With a key from a file (one made elsewhere).
        let elsewhere = World::new(Database::sqlite());
        elsewhere.keys_of("users");
        let key_file = elsewhere.dir.path().join("service-keys/users.pem");
        let mut child = tiergate_in(&world, &database_url, &["serve", "users"])
            .env("TIERGATE_USERS_LISTEN", &listen)
            .env("TIERGATE_USERS_SERVICE_KEY_FILE", &key_file)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let base = format!("http://{listen}");
        eventually("the service up", || async {
            let r = client().get(format!("{base}/health")).send().await.ok()?;
            (r.status() == StatusCode::OK).then_some(())
        })
        .await;
        register(&base, "prod@example.com").await;
        let kill = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
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
        assert!(stderr.contains("SIGTERM") && stderr.contains("\"stopped\""), "{stderr}");
        assert!(!stderr.contains("token="), "a link was logged: {stderr}");
        assert!(!stderr.contains("PRIVATE KEY"), "the key was logged: {stderr}");
    }
}

both_databases! {
    /// `tiergate users rotate-signing-key` (and its old spelling): a new key
    /// signs, the old one stays published.
    async fn test_rotate_signing_key_command_keeps_the_old_key_published(db: Database) {
        let (world, svc) = alone(db).await;
        let database_url = world.db.url_for("users", world.dir.path()).await;
        let jwks_url = svc.url("/.well-known/jwks.json");
        let before: Value = json_of(client().get(&jwks_url)).await;
        let old_kid = before["keys"][0]["kid"].as_str().unwrap().to_owned();
        svc.stop().await;
        let mut kids_seen = vec![old_kid.clone()];
        for args in [&["users", "rotate-signing-key"][..], &["rotate-signing-key"][..]] {
            let out = tiergate_in(&world, &database_url, args).output().unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout).to_string();
            assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
            let previous = kids_seen.last().unwrap().clone();
            assert!(stdout.contains(&format!(", {previous}")), "{stdout}");
            let active = stdout.split("signing key ").nth(1).unwrap().split(' ').next().unwrap().to_owned();
            assert!(!kids_seen.contains(&active), "{stdout}");
            kids_seen.push(active);
        }
        let svc = world.start::<UsersService>(settings(&world, Default::default()).await);
        let after: Value = json_of(client().get(svc.url("/.well-known/jwks.json"))).await;
        let kids: Vec<&str> = after["keys"].as_array().unwrap().iter().map(|k| k["kid"].as_str().unwrap()).collect();
        assert_eq!(kids, [kids_seen[2].as_str(), kids_seen[1].as_str(), kids_seen[0].as_str()], "{after}");
        svc.stop().await;
    }
}

both_databases! {
    /// `/health`, `/metrics` and `/openapi.json` on every service.
    async fn test_operational_endpoints(db: Database) {
        let (world, svc) = alone(db).await;
        let base = svc.base.clone();
        let (status, health) = crate::common::get_json(&client(), &format!("{base}/health")).await;
        assert_eq!(status, 200);
        assert_eq!(health, json!({"status": "ok", "service": "users", "database": "up"}));
        let (status, doc) = crate::common::get_json(&client(), &format!("{base}/openapi.json")).await;
        assert_eq!(status, 200);
        for path in [
            "/api/auth/register",
            "/api/auth/login",
            "/api/users/me",
            "/api/admin/users/{id}",
            "/.well-known/jwks.json",
            "/internal/events",
            "/internal/users/{id}",
            "/api/orgs",
            "/api/orgs/{id}/members/{user_id}",
            "/api/orgs/invitations/accept",
            "/api/auth/switch",
            "/internal/organizations/{id}",
            "/health",
        ] {
            assert!(doc["paths"][path].is_object(), "{path} missing from the OpenAPI document");
        }
        assert!(doc["components"]["schemas"]["ErrorEnvelope"].is_object());
        let metrics = text_of(client().get(format!("{base}/metrics"))).await;
        assert!(metrics.contains("http_requests_total{method=\"GET\",route=\"/health\",status=\"200\",service=\"users\"} 1"), "{metrics}");
        // A second instance on the same data directory and database shares
        // the signing key.
        let other = world.start::<UsersService>(settings(&world, Default::default()).await);
        let jwks_a: Value = json_of(client().get(format!("{base}/.well-known/jwks.json"))).await;
        let jwks_b: Value = json_of(client().get(other.url("/.well-known/jwks.json"))).await;
        assert_eq!(jwks_a, jwks_b);
        other.stop().await;
        svc.stop().await;
    }
}

both_databases! {
    /// `tiergate migrate` migrates every service and can run again; a bad
    /// services config is exit code 64 with every bad key's place.
    async fn test_migrate_command_is_idempotent_and_rejects_bad_config(db: Database) {
        let world = World::new(db);
        let database_url = world.db.url_for("users", world.dir.path()).await;
        for _ in 0..2 {
            let out = tiergate_in(&world, &database_url, &["migrate"]).output().unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            assert!(String::from_utf8_lossy(&out.stdout).contains("users: migrations applied"));
        }
        let pool = world.pool("users").await;
        assert_eq!(count_rows(&pool, "users").await, 0);
        pool.close().await;
        let bad = world.dir.path().join("bad.yaml");
        std::fs::write(
            &bad,
            "time_zone: Mars/Olympus\nevents:\n  user.registered: [nobody]\nservices:\n  users:\n    acess_token_ttl: 5m\n    server: { workers: 0 }\n",
        )
        .unwrap();
        let out = tiergate_in(&world, &database_url, &["migrate", "-c", bad.to_str().unwrap()]).output().unwrap();
        assert_eq!(out.status.code(), Some(64));
        let stderr = String::from_utf8_lossy(&out.stderr);
        for expected in ["services.users.acess_token_ttl", "time_zone", "events.user.registered[0]", "services.users.server.workers"] {
            assert!(stderr.contains(expected), "{expected} not reported: {stderr}");
        }
        // `up` reads its services file from `-s` and stops before the gateway.
        let out = tiergate_in(&world, &database_url, &["up", "-s", bad.to_str().unwrap()]).output().unwrap();
        assert_eq!(out.status.code(), Some(64));
        assert!(String::from_utf8_lossy(&out.stderr).contains("services.users.acess_token_ttl"));
        let out = tiergate_in(&world, &database_url, &["migrate", "ledger"]).output().unwrap();
        assert_eq!(out.status.code(), Some(64), "an unknown service");
        assert!(String::from_utf8_lossy(&out.stderr).contains("users"), "names the known services");
    }
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
            "schemathesis is needed: `python3 -m pip install {SCHEMATHESIS}` (scripts/test installs it)"
        );
    }
    std::path::PathBuf::from("st")
}

/// Runs schemathesis against the OpenAPI document at `url` with extra
/// request headers; `(passed, its output)`.
pub async fn run_schemathesis(url: &str, headers: &[&str]) -> (bool, String) {
    let st = schemathesis();
    let mut args: Vec<String> = [
        "run",
        url,
        "--checks",
        "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
        "--max-examples",
        "25",
        "--seed",
        "1",
        "--no-color",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    for h in headers {
        args.extend(["--header".to_owned(), (*h).to_owned()]);
    }
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(st)
            .args(&args)
            .current_dir(std::env::temp_dir())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let text = format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    (out.status.success() && stdout.contains("passed"), text)
}

both_databases! {
    /// schemathesis, generating requests from `/openapi.json`, finds no 5xx,
    /// no undocumented status, no response that breaks its schema.
    async fn test_openapi_contract_holds_under_schemathesis(db: Database) {
        let (_world, svc) = alone(db).await;
        let (passed, out) = run_schemathesis(&svc.url("/openapi.json"), &[]).await;
        assert!(passed, "schemathesis found failures:\n{out}");
        svc.stop().await;
    }
}
