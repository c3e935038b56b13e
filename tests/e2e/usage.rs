//! Usage metering end to end, on SQLite and PostgreSQL: the gateway
//! counts admitted requests per caller and route and flushes them to the
//! subscriptions service, which reports them per day against the plan's
//! quota. N requests appear as exactly N, also when the subscriptions
//! service is down in the middle (the gateway keeps a backlog and
//! retries the same batch ids) and comes back on the same database.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::common::{free_port, gateway_with_env, metric_value, upstream, TestGateway, Upstream};
use crate::platform::{as_service, as_user, both_databases, eventually, Inbox, Running, World};
use crate::users::{claims_of, settings as users_settings, signed_up};

struct Metered {
    world: World,
    subs_addr: String,
    subscriptions: Option<Running>,
    gw: TestGateway,
    users: Running,
    inbox: Inbox,
    _api: Upstream,
}

async fn start_subscriptions(world: &World, addr: &str, users: &Running) -> Running {
    let mut ss = world
        .settings::<subscriptions::SubscriptionsService>(&[("TIERGATE_SUBSCRIPTIONS_LISTEN", addr)])
        .await;
    ss.shared.peers.insert("users".into(), users.base.clone());
    world.start::<subscriptions::SubscriptionsService>(ss)
}

async fn metered(db: crate::platform::Database) -> Metered {
    metered_every(db, "100ms").await
}

/// [`metered`] with the gateway flushing every `flush_interval`.
async fn metered_every(db: crate::platform::Database, flush_interval: &str) -> Metered {
    let world = World::new(db);
    let inbox = Inbox::start().await;
    let users = world.start::<users::UsersService>(
        users_settings(&world, inbox.subscribers("notifications")).await,
    );
    let subs_addr = format!("127.0.0.1:{}", free_port());
    let subscriptions = start_subscriptions(&world, &subs_addr, &users).await;
    let api = upstream("api").await;
    let env = world.gateway_env();
    let (u, s, a) = (users.addr(), &subs_addr, api.addr);
    let gw = gateway_with_env(
        &format!(
            r#"upstreams:
  users: {{ backends: [{{ address: "{u}" }}] }}
  subscriptions: {{ backends: [{{ address: "{s}" }}] }}
  api: {{ backends: [{{ address: "{a}" }}] }}
auth:
  jwks: {{ url: "http://{u}/.well-known/jwks.json" }}
  issuer: tiergate-users
  audience: tiergate
rate_limit:
  tiers:
    - {{ name: FREE, per_minute: 100000 }}
  anonymous: {{ per_minute: 100000 }}
usage:
  endpoint: "http://{s}/internal/usage"
  flush_interval: {flush_interval}
  max_backoff: 400ms
  timeout: 2s
routes:
  - {{ name: usage, match: {{ path: {{ exact: /api/subscriptions/usage }} }}, upstream: subscriptions, auth: required }}
  - {{ name: admin-subscriptions, match: {{ path: {{ prefix: /api/admin/subscriptions }} }}, upstream: subscriptions, auth: required, roles: [admin] }}
  - {{ name: quotes, match: {{ path: {{ prefix: /quotes }} }}, upstream: api, auth: required }}
  - {{ name: public, match: {{ path: {{ prefix: /public }} }}, upstream: api, auth: none }}
"#
        ),
        &env,
    );
    Metered {
        world,
        subs_addr,
        subscriptions: Some(subscriptions),
        gw,
        users,
        inbox,
        _api: api,
    }
}

impl Metered {
    async fn hit(&self, token: &str, path: &str, n: usize) {
        for _ in 0..n {
            let (status, body) = as_user(Method::GET, &self.gw.url(""), path, token, None).await;
            assert_eq!(status, StatusCode::OK, "{path}: {body}");
        }
    }

    async fn report(&self, token: &str, query: &str) -> Value {
        let (status, body) = as_user(
            Method::GET,
            &self.gw.url(""),
            &format!("/api/subscriptions/usage{query}"),
            token,
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    /// Requests on `route` in the caller's report, once it reaches `want`.
    async fn wait_for_route(&self, token: &str, route: &str, want: i64) -> Value {
        eventually(&format!("{want} requests on {route}"), || async {
            let r = self.report(token, "").await;
            (route_count(&r, route) == want).then_some(r)
        })
        .await
    }

    async fn stop(mut self) {
        if let Some(s) = self.subscriptions.take() {
            s.stop().await;
        }
        self.users.stop().await;
    }
}

fn route_count(report: &Value, route: &str) -> i64 {
    report["routes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["route"] == route)
        .and_then(|r| r["requests"].as_i64())
        .unwrap_or(0)
}

both_databases! {
    /// N requests through the gateway are N in the report: not an
    /// anonymous one, not one of another caller; across a subscriptions
    /// outage nothing is lost and nothing is counted twice.
    async fn test_metered_requests_are_counted_exactly_once_across_a_restart(db: Database) {
        let mut m = metered(db).await;
        let ann = signed_up(&m.users.base, &m.inbox, "ann@example.com").await;
        let ann = ann["access_token"].as_str().unwrap().to_owned();
        let bob = signed_up(&m.users.base, &m.inbox, "bob@example.com").await;
        let bob = bob["access_token"].as_str().unwrap().to_owned();
        m.hit(&ann, "/quotes/IDX", 30).await;
        m.hit(&bob, "/quotes/BBCA", 4).await;
        for _ in 0..5 {
            let r = crate::common::client().get(m.gw.url("/public/x")).send().await.unwrap();
            assert_eq!(r.status(), StatusCode::OK);
        }
        let report = m.wait_for_route(&ann, "quotes", 30).await;
        assert_eq!(report["subject"]["kind"], "user", "{report}");
        assert_eq!(report["subject"]["id"], claims_of(&ann)["sub"], "{report}");
        assert_eq!(report["time_zone"], "Asia/Jakarta");
        let periods = report["periods"].as_array().unwrap();
        assert_eq!(periods.len(), 1, "one business day: {report}");
        // FREE includes 10 000 requests a month.
        let quota = &report["quota"];
        assert_eq!((quota["plan"].as_str(), quota["allowance"].as_i64()), (Some("FREE"), Some(10_000)), "{report}");
        let used = quota["used"].as_i64().unwrap();
        assert_eq!(used, report["total"].as_i64().unwrap(), "{report}");
        assert_eq!(quota["remaining"].as_i64().unwrap(), 10_000 - used);
        assert!(quota["projected"].as_i64().unwrap() >= used, "{report}");
        m.wait_for_route(&bob, "quotes", 4).await;

        // The service goes away: the gateway keeps counting and holds the
        // batches it cannot deliver.
        m.subscriptions.take().unwrap().stop().await;
        m.hit(&ann, "/quotes/IDX", 25).await;
        eventually("a failed delivery", || async {
            let failed = metric_value(m.gw.admin, "tiergate_usage_batches_total{outcome=\"failed\"}").await;
            failed.filter(|f| *f >= 1.0)
        })
        .await;
        let status: Value = crate::common::client().get(m.gw.admin_url("/api/status")).send().await.unwrap().json().await.unwrap();
        assert!(status["usage"]["backlog_rows"].as_u64().unwrap() >= 1, "{status}");
        assert!(status["usage"]["last_error"].is_string(), "{status}");

        // Back on the same database: the backlog arrives, once.
        m.subscriptions = Some(start_subscriptions(&m.world, &m.subs_addr, &m.users).await);
        m.wait_for_route(&ann, "quotes", 55).await;
        // Batches go in order: once one more request shows up, no
        // earlier batch can still be counted again.
        m.hit(&ann, "/quotes/IDX", 1).await;
        let report = m.wait_for_route(&ann, "quotes", 56).await;
        assert_eq!(route_count(&m.report(&bob, "").await, "quotes"), 4);
        let dropped = metric_value(m.gw.admin, "tiergate_usage_rows_dropped_total").await;
        assert_eq!(dropped, Some(0.0));
        let month = m.report(&ann, "?granularity=month").await;
        assert_eq!(month["periods"].as_array().unwrap().len(), 1, "{month}");
        assert_eq!(month["total"], report["total"]);
        m.stop().await;
    }
}

both_databases! {
    /// The ingest endpoint counts a batch id once, takes only the
    /// gateway's token, and refuses malformed rows; admins read any
    /// user's report and the heaviest users.
    async fn test_usage_batches_are_idempotent_and_admins_see_everyone(db: Database) {
        let m = metered(db).await;
        let subs = m.subscriptions.as_ref().unwrap();
        let gateway_keys = m.world.keys_of("gateway");
        let batch = json!({
            "batch_id": "0193a1b2-0000-7000-8000-000000000001",
            "source": "gateway",
            // 23:59:59 WIB on 1 December: counted on the 1st.
            "from": "2026-12-01T16:59:59Z",
            "to": "2026-12-01T17:00:04Z",
            "rows": [
                {"subject": {"kind": "organization", "id": "org-1"}, "user_id": "u-1", "route": "quotes", "count": 70},
                {"subject": {"kind": "organization", "id": "org-1"}, "user_id": "u-2", "route": "quotes", "count": 30},
                {"subject": {"kind": "user", "id": "u-3"}, "user_id": "u-3", "route": "quotes", "count": 500}
            ]
        });
        let (status, first) = as_service(&gateway_keys, Method::POST, ("subscriptions", subs), "/internal/usage", Some(batch.clone())).await;
        assert_eq!(status, StatusCode::OK, "{first}");
        assert_eq!((first["duplicate"].as_bool(), first["requests"].as_i64(), first["day"].as_str()), (Some(false), Some(600), Some("2026-12-01")), "{first}");
        let (status, again) = as_service(&gateway_keys, Method::POST, ("subscriptions", subs), "/internal/usage", Some(batch.clone())).await;
        assert_eq!((status, again["duplicate"].as_bool()), (StatusCode::OK, Some(true)), "{again}");
        // Only the gateway sends usage.
        let billing_keys = m.world.keys_of("billing");
        let (status, e) = as_service(&billing_keys, Method::POST, ("subscriptions", subs), "/internal/usage", Some(batch.clone())).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{e}");
        let (status, e) = crate::platform::post(&subs.base, "/internal/usage", batch.clone()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{e}");
        for bad in [
            json!({"batch_id": "b-2", "from": "2026-12-01T00:00:00Z", "to": "2026-12-01T00:00:05Z", "rows": []}),
            json!({"batch_id": "b-3", "from": "yesterday", "to": "2026-12-01T00:00:05Z", "rows": [{"subject": {"kind": "user", "id": "u"}, "user_id": "u", "route": "r", "count": 1}]}),
            json!({"batch_id": "b-4", "from": "2026-12-01T00:00:00Z", "to": "2026-12-01T00:00:05Z", "rows": [{"subject": {"kind": "team", "id": "u"}, "user_id": "u", "route": "r", "count": 1}]}),
            json!({"batch_id": "b-5", "from": "2026-12-01T00:00:00Z", "to": "2026-12-01T00:00:05Z", "rows": [{"subject": {"kind": "user", "id": "u"}, "user_id": "u", "route": "r", "count": 0}]}),
        ] {
            let (status, e) = as_service(&gateway_keys, Method::POST, ("subscriptions", subs), "/internal/usage", Some(bad.clone())).await;
            assert!(status == StatusCode::UNPROCESSABLE_ENTITY || status == StatusCode::BAD_REQUEST, "{bad}: {status} {e}");
        }

        let root = signed_up(&m.users.base, &m.inbox, "root@example.com").await;
        let root = root["access_token"].as_str().unwrap().to_owned();
        let admin = |path: &str| {
            let (gw, root, path) = (m.gw.url(""), root.clone(), path.to_owned());
            async move { as_user(Method::GET, &gw, &path, &root, None).await }
        };
        let range = "from=2026-12-01&to=2026-12-01";
        let (status, org) = admin(&format!("/api/admin/subscriptions/usage?organization_id=org-1&{range}")).await;
        assert_eq!(status, StatusCode::OK, "{org}");
        assert_eq!(org["total"], 100, "the duplicate added nothing: {org}");
        let shares: Vec<(String, i64, f64)> = org["members"].as_array().unwrap().iter()
            .map(|s| (s["user_id"].as_str().unwrap().to_owned(), s["requests"].as_i64().unwrap(), s["share_percent"].as_f64().unwrap()))
            .collect();
        assert_eq!(shares, [("u-1".to_owned(), 70, 70.0), ("u-2".to_owned(), 30, 30.0)]);
        let (status, top) = admin(&format!("/api/admin/subscriptions/usage/top?{range}&limit=2")).await;
        assert_eq!(status, StatusCode::OK, "{top}");
        let users: Vec<(&str, i64)> = top["users"].as_array().unwrap().iter()
            .map(|u| (u["user_id"].as_str().unwrap(), u["requests"].as_i64().unwrap()))
            .collect();
        assert_eq!(users, [("u-3", 500), ("u-1", 70)]);
        for bad in [
            "/api/admin/subscriptions/usage",
            "/api/admin/subscriptions/usage?user_id=a&organization_id=b",
            "/api/admin/subscriptions/usage?user_id=u-3&from=2026-12-09&to=2026-12-01",
            "/api/admin/subscriptions/usage?user_id=u-3&granularity=week",
            "/api/admin/subscriptions/usage/top?limit=0",
        ] {
            let (status, e) = admin(bad).await;
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {e}");
        }
        // Not for a user who is not an admin.
        let ann = signed_up(&m.users.base, &m.inbox, "ann@example.com").await;
        let (status, _) = as_user(Method::GET, &m.gw.url(""), "/api/admin/subscriptions/usage/top", ann["access_token"].as_str().unwrap(), None).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        m.stop().await;
    }
}

both_databases! {
    /// A gateway stopping gracefully sends the window it was counting
    /// (here an hour long: nothing else would have sent it).
    async fn test_a_graceful_stop_sends_the_last_window(db: Database) {
        let mut m = metered_every(db, "1h").await;
        let ann = signed_up(&m.users.base, &m.inbox, "ann@example.com").await;
        let ann = ann["access_token"].as_str().unwrap().to_owned();
        m.hit(&ann, "/quotes/IDX", 7).await;
        let subs = m.subscriptions.take().unwrap();
        m.gw.shutdown();
        let (status, report) = as_user(Method::GET, &subs.base, "/api/subscriptions/usage", &ann, None).await;
        assert_eq!(status, StatusCode::OK, "{report}");
        assert_eq!(route_count(&report, "quotes"), 7, "{report}");
        subs.stop().await;
        m.users.stop().await;
    }
}

/// `tiergate service-key gateway` prints the public half of the gateway's
/// key (what the subscriptions service needs as `service_keys.gateway`);
/// in production without a key it says which variable to set.
#[test]
fn test_service_key_gateway_prints_the_public_half_or_names_the_variable() {
    use backend_common::service_auth::{KeySource, ServiceKeys};
    let dir = crate::platform::TempDir::new("gw-key-cmd");
    let keys = ServiceKeys::load(&KeySource::development("gateway", dir.path())).unwrap();
    let run = |key_file: Option<&std::path::Path>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tiergate"));
        cmd.args(["service-key", "gateway"])
            .env("TIERGATE_DATA_DIR", dir.path())
            .env_remove("TIERGATE_GATEWAY_SERVICE_KEY")
            .env_remove("TIERGATE_GATEWAY_SERVICE_KEY_FILE")
            .current_dir(dir.path());
        if let Some(f) = key_file {
            cmd.env("TIERGATE_GATEWAY_SERVICE_KEY_FILE", f);
        }
        cmd.output().unwrap()
    };
    let out = run(Some(&dir.path().join("service-keys/gateway.pem")));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        keys.public_key()
    );
    let out = run(None);
    assert_eq!(out.status.code(), Some(70));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("TIERGATE_GATEWAY_SERVICE_KEY"), "{stderr}");
}
