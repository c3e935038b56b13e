//! Tier changes reach the gateway without waiting for a token refresh: the
//! users service's change feed, long-polled by the gateway, overrides the
//! token's own tier claim in admission. On SQLite and PostgreSQL, with the
//! real users service and a real gateway.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::common::{free_port, gateway_with_env, metric_value, upstream, TestGateway, Upstream};
use crate::orgs::{join, org, person, switch, Person};
use crate::platform::{as_service, both_databases, eventually, Database, Inbox, Running, World};
use crate::users::settings as users_settings;

/// Users on a known port (so it can come back on it), an echo upstream and
/// a gateway polling the feed: FREE 3 a minute, PREMIUM 10, ENTERPRISE 6
/// per organization.
struct Feed {
    world: World,
    inbox: Inbox,
    users_addr: String,
    users: Option<Running>,
    gw: TestGateway,
    _echo: Upstream,
    events: u32,
}

async fn start_users(world: &World, inbox: &Inbox, addr: &str) -> Running {
    let mut s = users_settings(world, inbox.subscribers("notifications")).await;
    s.server.listen = addr.parse().unwrap();
    world.start::<users::UsersService>(s)
}

async fn feed(db: Database) -> Feed {
    let world = World::new(db);
    let inbox = Inbox::start().await;
    let users_addr = format!("127.0.0.1:{}", free_port());
    let users = start_users(&world, &inbox, &users_addr).await;
    let echo = upstream("echo").await;
    let env = world.gateway_env();
    let (u, e) = (&users_addr, echo.addr);
    let gw = gateway_with_env(
        &format!(
            r#"upstreams:
  echo: {{ backends: [{{ address: "{e}" }}] }}
auth:
  jwks: {{ url: "http://{u}/.well-known/jwks.json" }}
  issuer: tiergate-users
  audience: tiergate
rate_limit:
  tiers:
    - {{ name: FREE, per_minute: 3 }}
    - {{ name: PREMIUM, per_minute: 10 }}
    - {{ name: ENTERPRISE, per_minute: 6, limit_by: tenant }}
  anonymous: {{ per_minute: 1000 }}
tier_changes:
  endpoint: "http://{u}/internal/tier-changes"
  wait: 5s
  timeout: 1s
  stale_after: 1s
  max_backoff: 200ms
routes:
  - {{ name: echo, match: {{ path: {{ prefix: /echo }} }}, upstream: echo, auth: required }}
"#
        ),
        &env,
    );
    Feed {
        world,
        inbox,
        users_addr,
        users: Some(users),
        gw,
        _echo: echo,
        events: 0,
    }
}

impl Feed {
    fn users(&self) -> &Running {
        self.users.as_ref().expect("users is running")
    }

    /// Delivers a subscription event for `subject` to users (as the
    /// subscriptions service), applied.
    async fn event(&mut self, kind: &str, subject: Value, tier: &str) {
        self.events += 1;
        let event = json!({"id": format!("evt-{}", self.events), "type": kind, "source": "subscriptions",
            "occurred_at": self.world.clock.now_ms(), "data": {"subject": subject, "tier": tier}});
        let (status, body) = as_service(
            &self.world.keys_of("subscriptions"),
            Method::POST,
            ("users", self.users()),
            "/internal/events",
            Some(event),
        )
        .await;
        assert_eq!(
            (status, body["status"].as_str()),
            (StatusCode::OK, Some("applied")),
            "{body}"
        );
    }

    /// Waits until the gateway holds `n` changes received in all.
    async fn received(&self, n: f64) {
        let admin = self.gw.admin;
        eventually(&format!("{n} tier changes at the gateway"), || async move {
            let got = metric_value(admin, "tiergate_tier_feed_changes_total ")
                .await
                .unwrap_or(0.0);
            (got >= n).then_some(())
        })
        .await;
    }

    /// Waits until the feed is up (1) or set aside (0).
    async fn feed_up(&self, up: bool) {
        let admin = self.gw.admin;
        let want = if up { 1.0 } else { 0.0 };
        eventually(&format!("tiergate_tier_feed_up {want}"), || async move {
            let got = metric_value(admin, "tiergate_tier_feed_up ").await;
            (got == Some(want)).then_some(())
        })
        .await;
    }

    /// One request on `/echo` as `token`: the status, the limit applied
    /// and the tier the upstream was told.
    async fn hit(&self, token: &str) -> (StatusCode, u64, Option<String>) {
        let (status, limit, body) = crate::common::limited_get(&self.gw.url("/echo"), token).await;
        let tier = body["headers"]["x-user-tier"].as_str().map(str::to_owned);
        (status, limit, tier)
    }

    /// `n` requests as `token`, each admitted with `limit`.
    async fn admitted(&self, token: &str, n: usize, limit: u64) {
        for i in 0..n {
            let (status, got, _) = self.hit(token).await;
            assert_eq!((status, got), (StatusCode::OK, limit), "request {i}");
        }
    }

    async fn refused(&self, token: &str, limit: u64) {
        let (status, got, _) = self.hit(token).await;
        assert_eq!((status, got), (StatusCode::TOO_MANY_REQUESTS, limit));
    }
}

both_databases! {
    /// An upgrade: the very next request with the token issued before it
    /// gets PREMIUM limits (and the upstream is told PREMIUM); the end of
    /// the subscription: the next request with the same token is on FREE
    /// limits again. A token issued after the end carries FREE itself.
    async fn test_the_next_request_with_the_old_token_gets_the_new_tier(db: Database) {
        let mut f = feed(db).await;
        let base = f.users().base.clone();
        let me = person(&base, &f.inbox, "upgrade@example.com").await;
        f.feed_up(true).await;
        f.admitted(&me.access, 3, 3).await;
        f.refused(&me.access, 3).await;

        f.event("subscription.activated", json!({"kind": "user", "id": me.id}), "PREMIUM").await;
        f.received(1.0).await;
        let (status, limit, tier) = f.hit(&me.access).await;
        assert_eq!((status, limit, tier.as_deref()), (StatusCode::OK, 10, Some("PREMIUM")));
        f.admitted(&me.access, 9, 10).await;
        f.refused(&me.access, 10).await;

        f.event("subscription.ended", json!({"kind": "user", "id": me.id}), "FREE").await;
        f.received(2.0).await;
        // FREE's minute was used up before the upgrade.
        f.refused(&me.access, 3).await;
        let fresh = person_login(&f, &me).await;
        f.refused(&fresh, 3).await;
        let applied = metric_value(f.gw.admin, "tiergate_tier_overrides_applied_total ").await;
        assert!(applied.unwrap_or(0.0) >= 12.0, "{applied:?}");
        assert_eq!(metric_value(f.gw.admin, "tiergate_tier_overrides ").await, Some(1.0));
        f.users.take().unwrap().stop().await;
    }
}

/// A new login of `who`: its access token.
async fn person_login(f: &Feed, who: &Person) -> String {
    let (status, pair) =
        crate::users::login(&f.users().base, &who.email, crate::users::PASSWORD).await;
    assert_eq!(status, StatusCode::OK, "{pair}");
    pair["access_token"].as_str().unwrap().to_owned()
}

both_databases! {
    /// An organization upgraded to ENTERPRISE: both members' tokens acting
    /// for it, issued before, draw from one ENTERPRISE budget at once; the
    /// same people's personal tokens keep their own FREE tier.
    async fn test_an_organizations_change_reaches_its_members_tokens(db: Database) {
        let mut f = feed(db).await;
        let base = f.users().base.clone();
        let mut alice = person(&base, &f.inbox, "alice@feed.test").await;
        let mut bob = person(&base, &f.inbox, "bob@feed.test").await;
        let acme = org(&base, &alice, "Acme Feed").await;
        join(&base, &f.inbox, &acme, &alice, &bob, "member").await;
        let personal = bob.access.clone();
        assert_eq!(switch(&base, &mut alice, Some(&acme)).await["tier"], "FREE");
        switch(&base, &mut bob, Some(&acme)).await;
        f.feed_up(true).await;

        f.event("subscription.activated", json!({"kind": "organization", "id": acme}), "ENTERPRISE").await;
        f.received(1.0).await;
        f.admitted(&alice.access, 3, 6).await;
        f.admitted(&bob.access, 3, 6).await;
        f.refused(&alice.access, 6).await;
        f.refused(&bob.access, 6).await;
        let (status, limit, tier) = f.hit(&personal).await;
        assert_eq!((status, limit, tier.as_deref()), (StatusCode::OK, 3, Some("FREE")));
        f.users.take().unwrap().stop().await;
    }
}

both_databases! {
    /// The users service goes down: the gateway keeps serving, and once
    /// the feed is stale it falls back to the tokens' own tiers. A change
    /// applied while the gateway could not hear it (users back on the same
    /// database, the gateway still polling) arrives when the feed resumes,
    /// from where it stopped.
    async fn test_a_dead_feed_falls_back_to_the_tokens_and_resumes(db: Database) {
        let mut f = feed(db).await;
        let base = f.users().base.clone();
        let me = person(&base, &f.inbox, "outage@example.com").await;
        f.event("subscription.activated", json!({"kind": "user", "id": me.id}), "PREMIUM").await;
        f.received(1.0).await;
        f.admitted(&me.access, 2, 10).await;

        f.users.take().unwrap().stop().await;
        f.feed_up(false).await;
        // The token says FREE: that is what holds while nobody can tell.
        let (status, limit, _) = f.hit(&me.access).await;
        assert_eq!((status, limit), (StatusCode::OK, 3));
        let failures = metric_value(f.gw.admin, "tiergate_tier_feed_failures_total ").await;
        assert!(failures.unwrap_or(0.0) >= 1.0, "{failures:?}");

        // Back on the same database and address; a downgrade happens
        // before the gateway's next poll reaches it.
        f.users = Some(start_users(&f.world, &f.inbox, &f.users_addr).await);
        f.event("subscription.ended", json!({"kind": "user", "id": me.id}), "FREE").await;
        f.received(2.0).await;
        f.feed_up(true).await;
        let (status, limit, tier) = f.hit(&me.access).await;
        assert_eq!((status, limit, tier.as_deref()), (StatusCode::OK, 3, Some("FREE")));
        f.event("subscription.activated", json!({"kind": "user", "id": me.id}), "PREMIUM").await;
        f.received(3.0).await;
        let (status, limit, tier) = f.hit(&me.access).await;
        assert_eq!((status, limit, tier.as_deref()), (StatusCode::OK, 10, Some("PREMIUM")));
        f.users.take().unwrap().stop().await;
    }
}
