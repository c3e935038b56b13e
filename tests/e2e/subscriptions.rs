//! The subscriptions service between users, billing, payments (with the
//! local Midtrans sandbox) and the gateway, on SQLite and PostgreSQL: the
//! plan catalogue, a subject's subscription, a checkout billed once per
//! key, paid by virtual account, the change applied from `invoice.paid`
//! and the tier reaching the users service; an upgrade mid-period credits
//! the unused part of the period.

use backend_common::outbox::{Subscriber, Subscribers};
use payments::sandbox::{self, RunningSandbox, SandboxConfig};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::common::{client, free_port, gateway, TestGateway};
use crate::platform::{as_user, both_databases, eventually, post, Database, Inbox, Running, World};
use crate::users::{claims_of, settings as users_settings, signed_up};

struct Shop {
    world: World,
    inbox: Inbox,
    users: Running,
    billing: Running,
    payments: Running,
    subscriptions: Running,
    twin: Running,
    sandbox: RunningSandbox,
    gw: TestGateway,
    /// Ann's token pair.
    ann: Value,
}

fn subscribers(list: &[(&str, Subscriber)], inbox: &Inbox) -> Subscribers {
    let mut s = Subscribers::new();
    for (kind, to) in list {
        s.entry((*kind).to_owned()).or_default().push(to.clone());
    }
    s.entry("*".to_owned())
        .or_default()
        .push(Subscriber::url(&inbox.url(), "notifications"));
    s
}

async fn shop(db: Database) -> Shop {
    shop_with(db, true).await
}

/// [`shop`]; without `deliver_paid`, billing's `invoice.paid` goes to the
/// inbox only (the test delivers it to subscriptions itself, in the order
/// it wants).
async fn shop_with(db: Database, deliver_paid: bool) -> Shop {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn,pingora_core=off")
        .with_test_writer()
        .try_init();
    let world = World::new(db);
    let inbox = Inbox::start().await;
    let subs_addr = format!("127.0.0.1:{}", free_port());
    let subs_base = format!("http://{subs_addr}");
    let us = users_settings(&world, inbox.subscribers("notifications")).await;
    let users = world.start::<users::UsersService>(us);
    let mut bs = world.settings::<billing::BillingService>(&[]).await;
    bs.shared.peers.insert("users".into(), users.base.clone());
    let paid_to = [(
        "invoice.paid",
        Subscriber::service("subscriptions", &subs_base),
    )];
    bs.shared.events = subscribers(if deliver_paid { &paid_to } else { &[] }, &inbox);
    let billing = world.start::<billing::BillingService>(bs);
    let sandbox = sandbox::start(SandboxConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    })
    .unwrap();
    let payments = world.start::<payments::PaymentsService>(
        crate::payments::payments_settings(&world, Some(&sandbox), &users, &billing, &inbox).await,
    );
    let mut ss = world
        .settings::<subscriptions::SubscriptionsService>(&[(
            "TIERGATE_SUBSCRIPTIONS_LISTEN",
            &subs_addr,
        )])
        .await;
    ss.shared
        .peers
        .insert("billing".into(), billing.base.clone());
    ss.shared.peers.insert("users".into(), users.base.clone());
    ss.shared.events = subscribers(
        &[
            (
                "subscription.activated",
                Subscriber::service("users", &users.base),
            ),
            (
                "subscription.ended",
                Subscriber::service("users", &users.base),
            ),
        ],
        &inbox,
    );
    let twin = world.start::<subscriptions::SubscriptionsService>({
        // A second instance on the same database: its scheduler races
        // the first one's over the same due set.
        let mut t = world
            .settings::<subscriptions::SubscriptionsService>(&[])
            .await;
        t.shared.peers = ss.shared.peers.clone();
        t.shared.events = ss.shared.events.clone();
        t
    });
    let subscriptions = world.start::<subscriptions::SubscriptionsService>(ss);
    let (u, b, p, s) = (
        users.addr(),
        billing.addr(),
        payments.addr(),
        subscriptions.addr(),
    );
    let gw = gateway(&format!(
        r#"upstreams:
  users: {{ backends: [{{ address: "{u}" }}] }}
  billing: {{ backends: [{{ address: "{b}" }}] }}
  payments: {{ backends: [{{ address: "{p}" }}] }}
  subscriptions: {{ backends: [{{ address: "{s}" }}] }}
auth:
  jwks: {{ url: "http://{u}/.well-known/jwks.json" }}
  issuer: tiergate-users
  audience: tiergate
rate_limit:
  tiers:
    - {{ name: FREE, per_minute: 100000 }}
    - {{ name: PREMIUM, per_minute: 100000 }}
    - {{ name: ENTERPRISE, per_minute: 100000 }}
  anonymous: {{ per_minute: 100000 }}
routes:
  - {{ name: plans, match: {{ path: {{ exact: /api/subscriptions/plans }}, methods: [GET] }}, upstream: subscriptions, auth: none }}
  - {{ name: subscriptions, match: {{ path: {{ prefix: /api/subscriptions }} }}, upstream: subscriptions, auth: required }}
  - {{ name: admin-subscriptions, match: {{ path: {{ prefix: /api/admin/subscriptions }} }}, upstream: subscriptions, auth: required, roles: [admin] }}
  - {{ name: payments-webhooks, match: {{ path: {{ prefix: /api/payments/webhooks }}, methods: [POST] }}, upstream: payments, rate_limit: false }}
  - {{ name: payments, match: {{ path: {{ prefix: /api/payments }} }}, upstream: payments, auth: required }}
  - {{ name: billing, match: {{ path: {{ prefix: /api/billing }} }}, upstream: billing, auth: required }}
"#
    ));
    sandbox.set_notify_url(Some(gw.url("/api/payments/webhooks/midtrans")));
    let ann = signed_up(&users.base, &inbox, "ann@example.com").await;
    Shop {
        world,
        inbox,
        users,
        billing,
        payments,
        subscriptions,
        twin,
        sandbox,
        gw,
        ann,
    }
}

impl Shop {
    fn access(&self) -> String {
        self.ann["access_token"].as_str().unwrap().to_owned()
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        as_user(Method::GET, &self.gw.url(""), path, &self.access(), None).await
    }

    async fn post_keyed(&self, path: &str, key: &str, body: Value) -> (StatusCode, Value, bool) {
        crate::platform::post_keyed(&self.gw.url(path), &self.access(), key, &body).await
    }

    /// Pays `invoice` by BCA VA and settles it at the sandbox.
    async fn pay(&self, invoice: &Value, key: &str) {
        let id = invoice["id"].as_str().unwrap();
        pay_in_sandbox(
            &self.gw.url(""),
            &self.access(),
            &self.sandbox,
            id,
            "bca_va",
            key,
        )
        .await;
    }

    /// Checks out PREMIUM monthly (key `c-1`), pays it (`p-1`) and waits
    /// until it is in force: the subscription then.
    async fn premium_paid(&self) -> Value {
        let (_, change, _) = self
            .post_keyed(
                "/api/subscriptions/checkout",
                "c-1",
                json!({"plan": "PREMIUM", "cycle": "monthly"}),
            )
            .await;
        self.pay(&change["invoice"], "p-1").await;
        self.wait_plan("PREMIUM").await
    }

    async fn wait_plan(&self, plan: &str) -> Value {
        self.wait_state(plan, "active").await
    }

    async fn wait_state(&self, plan: &str, state: &str) -> Value {
        eventually(&format!("plan {plan} {state}"), || async {
            let (_, me) = self.get("/api/subscriptions/me").await;
            (me["plan"] == plan && me["state"] == state).then_some(me)
        })
        .await
    }

    /// The renewal invoices issued so far, oldest first.
    fn renewals(&self) -> Vec<Value> {
        self.inbox
            .events()
            .into_iter()
            .filter(|e| {
                e["type"] == "invoice.issued" && e["data"]["reference"]["kind"] == "renewal"
            })
            .map(|e| e["data"].clone())
            .collect()
    }

    async fn wait_renewals(&self, n: usize) -> Value {
        eventually(&format!("{n} renewal invoices"), || async {
            let r = self.renewals();
            (r.len() >= n).then(|| r[n - 1].clone())
        })
        .await
    }

    async fn tier_at_users(&self, tier: &str) {
        // A fresh login each time: the clock may have moved past the
        // first token's expiry.
        eventually(&format!("{tier} at the users service"), || async {
            let (_, pair) = post(
                &self.users.base,
                "/api/auth/login",
                json!({"email": "ann@example.com", "password": crate::users::PASSWORD}),
            )
            .await;
            (claims_of(pair["access_token"].as_str()?)["tier"] == tier).then_some(())
        })
        .await;
    }

    async fn stop(self) {
        self.twin.stop().await;
        self.subscriptions.stop().await;
        self.payments.stop().await;
        self.billing.stop().await;
        self.users.stop().await;
        self.sandbox.stop().await;
    }
}

both_databases! {
    /// Ann, on FREE, reads the plans without a token, checks out PREMIUM
    /// (a retry replays, another body with the key is refused), pays the
    /// invoice by virtual account; `invoice.paid` activates PREMIUM for a
    /// month and the users service gives her the PREMIUM tier. Then she
    /// upgrades to ENTERPRISE mid-period: the unused part of PREMIUM is
    /// credited on the invoice, with its arithmetic.
    async fn test_checkout_pay_and_the_tier_follows(db: Database) {
        let s = shop(db).await;
        let plans: Value = client().get(s.gw.url("/api/subscriptions/plans")).send().await.unwrap().json().await.unwrap();
        let names: Vec<&str> = plans["plans"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["FREE", "BASIC", "PREMIUM", "ENTERPRISE"]);
        let premium = &plans["plans"][2]["prices"][0];
        assert_eq!((premium["cycle"].as_str(), premium["price"].as_i64(), premium["ppn"].as_i64(), premium["total"].as_i64()),
            (Some("monthly"), Some(249_000), Some(27_390), Some(276_390)), "{plans}");
        // Limits from the tier table the shipped gateway config enforces.
        let limits = &plans["plans"][2]["limits"];
        assert_eq!((limits["per_minute"].as_u64(), limits["per_day"].as_u64(), limits["limit_by"].as_str()), (Some(200), Some(50_000), Some("user")), "{plans}");
        assert!(plans["plans"][3]["limits"]["per_day"].is_null(), "ENTERPRISE is unlimited per day: {plans}");

        let (status, me) = s.get("/api/subscriptions/me").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!((me["plan"].as_str(), me["state"].as_str(), me["tier"].as_str()), (Some("FREE"), Some("free"), Some("FREE")), "{me}");
        assert_eq!(me["time_zone"], "Asia/Jakarta");

        let (status, e, _) = s.post_keyed("/api/subscriptions/checkout", "c-0", json!({"plan": "GOLD", "cycle": "monthly"})).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
        let (status, e, _) = s.post_keyed("/api/subscriptions/checkout", "c-0", json!({"plan": "FREE", "cycle": "monthly"})).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
        let r = client().post(s.gw.url("/api/subscriptions/checkout")).bearer_auth(s.access())
            .json(&json!({"plan": "PREMIUM", "cycle": "monthly"})).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "no Idempotency-Key");

        let body = json!({"plan": "PREMIUM", "cycle": "monthly"});
        let (status, change, replayed) = s.post_keyed("/api/subscriptions/checkout", "c-1", body.clone()).await;
        assert_eq!((status, replayed), (StatusCode::CREATED, false), "{change}");
        assert_eq!((change["plan"].as_str(), change["status"].as_str(), change["invoice"]["total"].as_i64()),
            (Some("PREMIUM"), Some("pending"), Some(276_390)), "{change}");
        assert!(change["credit"].is_null(), "nothing to credit from FREE: {change}");
        let (status, again, replayed) = s.post_keyed("/api/subscriptions/checkout", "c-1", body.clone()).await;
        assert_eq!((status, replayed), (StatusCode::OK, true));
        assert_eq!(again, change, "the same key: the same answer");
        let (status, e, _) = s.post_keyed("/api/subscriptions/checkout", "c-1", json!({"plan": "BASIC", "cycle": "monthly"})).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "the key with another body: {e}");
        let (_, me) = s.get("/api/subscriptions/me").await;
        assert_eq!((me["plan"].as_str(), me["state"].as_str()), (Some("FREE"), Some("pending")), "{me}");
        assert_eq!(me["pending_change"]["id"], change["id"], "{me}");
        let (_, inv) = s.get(&format!("/api/billing/invoices/{}", change["invoice"]["id"].as_str().unwrap())).await;
        assert_eq!((inv["reference"]["kind"].as_str(), inv["reference"]["id"].as_str()), (Some("plan_change"), change["id"].as_str()), "{inv}");

        s.pay(&change["invoice"], "p-1").await;
        let paid = s.inbox.wait_for("invoice.paid", "invoice_id", change["invoice"]["id"].as_str().unwrap()).await;
        let me = s.wait_plan("PREMIUM").await;
        // The same payment told again (a new event id: billing re-sent it)
        // and a late copy with an older paid_at change nothing.
        for (n, paid_at) in [(1, paid["data"]["paid_at"].clone()), (2, json!(me["period_start"].as_i64().unwrap() - 86_400_000))] {
            let mut copy = paid.clone();
            copy["id"] = json!(uuid::Uuid::now_v7().to_string());
            copy["data"]["paid_at"] = paid_at;
            let r = client().post(s.subscriptions.url("/internal/events"))
                .bearer_auth(s.world.keys_of("billing").issue("subscriptions")).json(&copy).send().await.unwrap();
            assert_eq!(r.status(), StatusCode::OK, "copy {n}");
            let answer: Value = r.json().await.unwrap();
            assert_ne!(answer["status"], "applied", "copy {n}: {answer}");
        }
        let (_, again) = s.get("/api/subscriptions/me").await;
        assert_eq!((&again["period_start"], &again["period_end"]), (&me["period_start"], &me["period_end"]), "{again}");
        assert_eq!((me["tier"].as_str(), me["cycle"].as_str(), me["cancel_at_period_end"].as_bool()),
            (Some("PREMIUM"), Some("monthly"), Some(false)), "{me}");
        assert!(me["pending_change"].is_null(), "{me}");
        let (start, end) = (me["period_start"].as_i64().unwrap(), me["period_end"].as_i64().unwrap());
        let days = (end - start) / 86_400_000;
        assert!((28..=31).contains(&days), "a month: {me}");
        assert!(me["period_end_local"].as_str().unwrap().ends_with("+07:00"), "{me}");
        assert_eq!((me["next_renewal"]["at"].as_i64(), me["next_renewal"]["total"].as_i64()), (Some(end), Some(276_390)), "{me}");
        s.inbox.wait_for("subscription.activated", "subscription_id", me["id"].as_str().unwrap()).await;

        // The users service gives her the PREMIUM tier: a refreshed token carries it.
        eventually("PREMIUM at the users service", || async {
            let (_, u) = as_user(Method::GET, &s.users.base, "/api/users/me", &s.access(), None).await;
            (u["tier"] == "PREMIUM").then_some(())
        }).await;
        let (status, pair) = post(&s.users.base, "/api/auth/refresh", json!({"refresh_token": s.ann["refresh_token"]})).await;
        assert_eq!(status, StatusCode::OK, "{pair}");
        assert_eq!(claims_of(pair["access_token"].as_str().unwrap())["tier"], "PREMIUM");

        // PREMIUM again is not an upgrade; ENTERPRISE is, with PREMIUM's
        // unused part credited.
        let (status, e, _) = s.post_keyed("/api/subscriptions/checkout", "c-2", body.clone()).await;
        assert_eq!(status, StatusCode::CONFLICT, "{e}");
        assert_eq!(e["error"]["code"], "not_an_upgrade");
        let (status, up, _) = s.post_keyed("/api/subscriptions/checkout", "c-3", json!({"plan": "ENTERPRISE", "cycle": "monthly"})).await;
        assert_eq!(status, StatusCode::CREATED, "{up}");
        let credit = &up["credit"];
        assert_eq!((credit["plan"].as_str(), credit["price"].as_i64()), (Some("PREMIUM"), Some(249_000)), "{up}");
        let (used, whole, amount) = (credit["unused_seconds"].as_i64().unwrap(), credit["period_seconds"].as_i64().unwrap(), credit["amount"].as_i64().unwrap());
        assert_eq!(amount, (249_000_i128 * used as i128 / whole as i128) as i64, "{credit}");
        assert!(amount > 240_000, "almost all of the month is left: {credit}");
        assert_eq!(credit["formula"], format!("floor(249000 × {used} / {whole}) = {amount}"));
        let lines = up["lines"].as_array().unwrap();
        assert_eq!((lines[0]["unit_price"].as_i64(), lines[1]["unit_price"].as_i64()), (Some(1_999_000), Some(-amount)), "{up}");
        let subtotal = 1_999_000 - amount;
        let ppn = ((subtotal * 11 + 6) / 12 * 12 + 50) / 100;
        assert_eq!(up["invoice"]["total"].as_i64(), Some(subtotal + ppn), "{up}");
        let (_, me) = s.get("/api/subscriptions/me").await;
        assert_eq!((me["plan"].as_str(), me["pending_change"]["plan"].as_str()), (Some("PREMIUM"), Some("ENTERPRISE")), "PREMIUM until paid: {me}");
        s.pay(&up["invoice"], "p-2").await;
        let me = s.wait_plan("ENTERPRISE").await;
        assert_eq!(me["tier"], "ENTERPRISE");
        s.inbox.wait_for("subscription.activated", "change_id", up["id"].as_str().unwrap()).await;
        assert_eq!(s.inbox.count(|e| e["type"] == "subscription.activated"), 2, "once per paid change");
        s.stop().await;
    }
}

both_databases! {
    /// With PREMIUM paid: cancel then resume, a downgrade scheduled for
    /// the period's end (and shown as the next renewal's price), a
    /// cancellation replacing it, and an upgrade in the same period
    /// clearing what was scheduled. Without a paid plan there is nothing
    /// to cancel.
    async fn test_cancel_resume_downgrade_and_upgrade_in_one_period(db: Database) {
        let s = shop(db).await;
        let (status, e, _) = s.post_keyed("/api/subscriptions/cancel", "-", json!({})).await;
        assert_eq!((status, e["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("no_paid_subscription")), "{e}");
        let me = s.premium_paid().await;
        let end = me["period_end"].as_i64().unwrap();

        let (status, me, _) = s.post_keyed("/api/subscriptions/cancel", "-", json!({})).await;
        assert_eq!(status, StatusCode::OK, "{me}");
        assert_eq!((me["plan"].as_str(), me["cancel_at_period_end"].as_bool(), me["next_renewal"].is_null()), (Some("PREMIUM"), Some(true), true), "{me}");
        let (status, me, _) = s.post_keyed("/api/subscriptions/resume", "-", json!({})).await;
        assert_eq!(status, StatusCode::OK, "{me}");
        assert_eq!((me["cancel_at_period_end"].as_bool(), me["next_renewal"]["price"].as_i64()), (Some(false), Some(249_000)), "{me}");
        let (status, e, _) = s.post_keyed("/api/subscriptions/resume", "-", json!({})).await;
        assert_eq!((status, e["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("nothing_to_resume")), "{e}");

        for (body, want) in [
            (json!({"plan": "ENTERPRISE"}), StatusCode::CONFLICT),
            (json!({"plan": "PREMIUM"}), StatusCode::CONFLICT),
            (json!({"plan": "FREE"}), StatusCode::UNPROCESSABLE_ENTITY),
            (json!({"plan": "GOLD"}), StatusCode::UNPROCESSABLE_ENTITY),
            (json!({"plan": "BASIC", "cycle": "weekly"}), StatusCode::UNPROCESSABLE_ENTITY),
        ] {
            let (status, e, _) = s.post_keyed("/api/subscriptions/downgrade", "-", body.clone()).await;
            assert_eq!(status, want, "{body}: {e}");
        }
        let (status, me, _) = s.post_keyed("/api/subscriptions/downgrade", "-", json!({"plan": "BASIC"})).await;
        assert_eq!(status, StatusCode::OK, "{me}");
        assert_eq!((me["plan"].as_str(), me["scheduled_change"]["plan"].as_str(), me["scheduled_change"]["cycle"].as_str(), me["scheduled_change"]["at"].as_i64()),
            (Some("PREMIUM"), Some("BASIC"), Some("monthly"), Some(end)), "{me}");
        assert_eq!((me["next_renewal"]["price"].as_i64(), me["next_renewal"]["total"].as_i64()), (Some(99_000), Some(109_890)), "{me}");
        let (_, me, _) = s.post_keyed("/api/subscriptions/cancel", "-", json!({})).await;
        assert!(me["scheduled_change"].is_null() && me["cancel_at_period_end"] == true, "a cancellation replaces the downgrade: {me}");
        let (_, me, _) = s.post_keyed("/api/subscriptions/downgrade", "-", json!({"plan": "BASIC", "cycle": "yearly"})).await;
        assert_eq!((me["scheduled_change"]["cycle"].as_str(), me["cancel_at_period_end"].as_bool()), (Some("yearly"), Some(false)), "and back: {me}");

        // An upgrade in the same period: what was scheduled is gone.
        let (status, up, _) = s.post_keyed("/api/subscriptions/checkout", "c-2", json!({"plan": "ENTERPRISE", "cycle": "monthly"})).await;
        assert_eq!(status, StatusCode::CREATED, "{up}");
        s.pay(&up["invoice"], "p-2").await;
        let me = s.wait_plan("ENTERPRISE").await;
        assert!(me["scheduled_change"].is_null() && me["cancel_at_period_end"] == false, "{me}");
        assert_eq!(me["next_renewal"]["price"].as_i64(), Some(1_999_000), "{me}");
        s.stop().await;
    }
}

/// Users and billing (its events to an inbox) for a subscriptions process
/// the test runs itself, and Ann's access token.
async fn users_and_billing(db: Database) -> (World, Inbox, Running, Running, String) {
    let world = World::new(db);
    let inbox = Inbox::start().await;
    let users = world.start::<users::UsersService>(
        users_settings(&world, inbox.subscribers("notifications")).await,
    );
    let mut bs = world.settings::<billing::BillingService>(&[]).await;
    bs.shared.peers.insert("users".into(), users.base.clone());
    bs.shared.events = inbox.subscribers("notifications");
    let billing = world.start::<billing::BillingService>(bs);
    let ann = signed_up(&users.base, &inbox, "ann@example.com").await;
    let access = ann["access_token"].as_str().unwrap().to_owned();
    (world, inbox, users, billing, access)
}

/// Delivers `event` to `to`'s `/internal/events` signed with `keys`.
async fn deliver_as(keys: &backend_common::service_auth::ServiceKeys, to: &Running, event: &Value) {
    let (status, body) = crate::platform::as_service(
        keys,
        Method::POST,
        ("subscriptions", to),
        "/internal/events",
        Some(event.clone()),
    )
    .await;
    assert!(status.is_success(), "{status} {body}");
}

both_databases! {
    /// Two checkouts both paid (the older before its invoice was voided),
    /// their `invoice.paid` delivered in reverse order and then again:
    /// PREMIUM is applied once, the older BASIC payment, arriving after a
    /// higher plan took effect, is left unapplied for a refund, and the
    /// redeliveries change nothing.
    async fn test_reversed_and_repeated_invoice_paid(db: Database) {
        let s = shop_with(db, false).await;
        let (_, basic, _) = s.post_keyed("/api/subscriptions/checkout", "c-1", json!({"plan": "BASIC", "cycle": "monthly"})).await;
        let (_, premium, _) = s.post_keyed("/api/subscriptions/checkout", "c-2", json!({"plan": "PREMIUM", "cycle": "monthly"})).await;
        s.pay(&basic["invoice"], "p-1").await;
        s.pay(&premium["invoice"], "p-2").await;
        let basic_paid = s.inbox.wait_for("invoice.paid", "invoice_id", basic["invoice"]["id"].as_str().unwrap()).await;
        let premium_paid = s.inbox.wait_for("invoice.paid", "invoice_id", premium["invoice"]["id"].as_str().unwrap()).await;
        let billing = s.world.keys_of("billing");
        deliver_as(&billing, &s.subscriptions, &premium_paid).await;
        s.wait_plan("PREMIUM").await;
        for event in [&basic_paid, &premium_paid, &basic_paid] {
            deliver_as(&billing, &s.subscriptions, event).await;
        }
        let (_, me) = s.get("/api/subscriptions/me").await;
        assert_eq!((me["plan"].as_str(), me["state"].as_str()), (Some("PREMIUM"), Some("active")), "{me}");
        let pool = s.world.pool("subscriptions").await;
        let statuses: Vec<(String, String)> = sqlx::query_as("SELECT plan, status FROM changes ORDER BY created_at")
            .fetch_all(&pool)
            .await
            .unwrap();
        assert_eq!(statuses, [("BASIC".to_owned(), "unapplied".to_owned()), ("PREMIUM".to_owned(), "applied".to_owned())]);
        let activated = s.inbox.count(|e| e["type"] == "subscription.activated");
        assert_eq!(activated, 1, "one activation");
        pool.close().await;
        s.stop().await;
    }
}

both_databases! {
    /// A checkout replaced by a newer one before it was paid: its invoice
    /// is voided at billing, so only the newer one can be paid.
    async fn test_a_replaced_checkouts_invoice_is_voided(db: Database) {
        let s = shop(db).await;
        let (_, basic, _) = s.post_keyed("/api/subscriptions/checkout", "c-1", json!({"plan": "BASIC", "cycle": "monthly"})).await;
        let (status, premium, _) = s.post_keyed("/api/subscriptions/checkout", "c-2", json!({"plan": "PREMIUM", "cycle": "monthly"})).await;
        assert_eq!(status, StatusCode::CREATED, "{premium}");
        let old = basic["invoice"]["id"].as_str().unwrap().to_owned();
        // The next scheduler pass (the clock moving wakes it).
        s.world.clock.advance(std::time::Duration::from_secs(1));
        let voided = s.inbox.wait_for("invoice.voided", "invoice_id", &old).await;
        assert_eq!(voided["data"]["reason"], "replaced by a newer plan change", "{voided}");
        let (status, e, _) = s.post_keyed("/api/payments", "p-1", json!({"invoice_id": old, "method": "bca_va"})).await;
        assert!(status.is_client_error(), "a void invoice cannot be paid: {status} {e}");
        s.pay(&premium["invoice"], "p-2").await;
        s.wait_plan("PREMIUM").await;
        s.world.clock.advance(std::time::Duration::from_secs(1));
        let (_, list) = s.get("/api/billing/invoices").await;
        let statuses: Vec<(&str, &str)> = list["invoices"].as_array().unwrap().iter()
            .map(|i| (i["id"].as_str().unwrap(), i["status"].as_str().unwrap()))
            .collect();
        assert!(statuses.contains(&(old.as_str(), "void")), "{list}");
        assert_eq!(statuses.iter().filter(|(_, st)| *st == "void").count(), 1, "the paid one stays: {list}");
        s.stop().await;
    }
}

both_databases! {
    /// An upgrade in the last second of a period whose renewal is already
    /// invoiced: the credit for one unused second rounds down to 0, the
    /// new plan's period starts at its payment, and the old plan's
    /// renewal invoice is voided (nobody is to pay for a period that will
    /// not come).
    async fn test_an_upgrade_in_the_last_second_replaces_the_renewal(db: Database) {
        let s = shop(db).await;
        let day = 86_400_000_i64;
        let me = s.premium_paid().await;
        let end = me["period_end"].as_i64().unwrap();
        s.world.clock.set(end - 3 * day + 60_000);
        let renewal = s.wait_renewals(1).await;
        s.world.clock.set(end - 1_000);
        let (status, up, _) = s.post_keyed("/api/subscriptions/checkout", "c-2", json!({"plan": "ENTERPRISE", "cycle": "monthly"})).await;
        assert_eq!(status, StatusCode::CREATED, "{up}");
        assert_eq!(up["credit"]["amount"].as_i64(), Some(0), "one second of PREMIUM: {up}");
        // The world's clock runs on from where it was set.
        assert!(up["credit"]["unused_seconds"].as_i64().unwrap() <= 1, "{up}");
        s.pay(&up["invoice"], "p-2").await;
        let me = s.wait_plan("ENTERPRISE").await;
        assert!(me["period_start"].as_i64().unwrap() >= end - 1_000, "from the payment: {me}");
        s.world.clock.advance(std::time::Duration::from_secs(1));
        s.inbox.wait_for("invoice.voided", "invoice_id", renewal["invoice_id"].as_str().unwrap()).await;
        s.tier_at_users("ENTERPRISE").await;
        s.stop().await;
    }
}

both_databases! {
    /// Time moves on (the world's clock), with two instances' schedulers
    /// racing over the same subscriptions: three days before the period
    /// ends one renewal invoice is issued (due when the next period
    /// begins); paid, the next period runs from where the last ended. The
    /// next renewal goes unpaid: at the period's end `past_due` (PREMIUM
    /// kept), three days later `expired` (FREE at the users service). Paid
    /// late, it starts again for a full period from the payment. Canceled,
    /// it ends at the period's end with no renewal issued.
    async fn test_renewals_grace_expiry_and_cancellation(db: Database) {
        let s = shop(db).await;
        let day = 86_400_000_i64;
        let me = s.premium_paid().await;
        let (anchor, end) = (me["period_start"].as_i64().unwrap(), me["period_end"].as_i64().unwrap());

        s.world.clock.set(end - 3 * day + 60_000);
        let r1 = s.wait_renewals(1).await;
        assert_eq!((r1["total"].as_i64(), r1["due_at"].as_i64(), r1["plan"].as_str()), (Some(276_390), Some(end), Some("PREMIUM")), "{r1}");
        s.pay(&json!({"id": r1["invoice_id"]}), "p-2").await;
        let me = eventually("the next period", || async {
            let (_, me) = s.get("/api/subscriptions/me").await;
            (me["period_start"] == end).then_some(me)
        }).await;
        let end2 = me["period_end"].as_i64().unwrap();
        assert!((28..=31).contains(&((end2 - end) / day)), "{me}");
        assert_eq!(me["state"], "active");
        s.inbox.wait_for("subscription.renewed", "subscription_id", me["id"].as_str().unwrap()).await;
        // The anchor's local time of day is kept.
        assert_eq!((end2 - anchor) % day, 0, "{me}");

        // Unpaid: past_due at the period's end (tier kept), expired when the grace ends.
        s.world.clock.set(end2 - 3 * day + 60_000);
        let r2 = s.wait_renewals(2).await;
        s.world.clock.set(end2 + 1_000);
        let me = s.wait_state("PREMIUM", "past_due").await;
        assert_eq!(me["tier"], "PREMIUM", "{me}");
        s.inbox.wait_for("subscription.past_due", "subscription_id", me["id"].as_str().unwrap()).await;
        s.world.clock.set(end2 + 3 * day + 1_000);
        let me = s.wait_state("FREE", "expired").await;
        assert!(me["next_renewal"].is_null(), "{me}");
        s.tier_at_users("FREE").await;
        assert_eq!(s.renewals().len(), 2, "one renewal invoice per period, however many schedulers: {:?}", s.renewals());

        // Paid late: a full period from the payment.
        s.pay(&json!({"id": r2["invoice_id"]}), "p-3").await;
        let me = s.wait_plan("PREMIUM").await;
        let start3 = me["period_start"].as_i64().unwrap();
        assert!(start3 > end2 + 3 * day, "from the payment, not the lapsed period: {me}");
        s.tier_at_users("PREMIUM").await;

        // Canceled: no renewal, canceled and FREE at the period's end.
        let (status, me, _) = s.post_keyed("/api/subscriptions/cancel", "-", json!({})).await;
        assert_eq!(status, StatusCode::OK, "{me}");
        let end3 = me["period_end"].as_i64().unwrap();
        s.world.clock.set(end3 + 1_000);
        let me = s.wait_state("FREE", "canceled").await;
        s.inbox.wait_for("subscription.canceled", "subscription_id", me["id"].as_str().unwrap()).await;
        s.tier_at_users("FREE").await;
        assert_eq!(s.renewals().len(), 2, "no renewal for a canceled subscription");
        s.stop().await;
    }
}

both_databases! {
    /// An admin lists subscriptions (by state, a page at a time) and
    /// gives a user a plan without an invoice until a date; it ends then
    /// as a cancellation does. Nobody else may.
    async fn test_admins_list_and_grant(db: Database) {
        let s = shop(db).await;
        let root = signed_up(&s.users.base, &s.inbox, "root@example.com").await;
        let root = root["access_token"].as_str().unwrap().to_owned();
        let ann_id = claims_of(&s.access())["sub"].as_str().unwrap().to_owned();
        let (_, change, _) = s.post_keyed("/api/subscriptions/checkout", "c-1", json!({"plan": "PREMIUM", "cycle": "monthly"})).await;
        assert_eq!(change["status"], "pending", "{change}");
        let admin = |path: String| {
            let (gw, root) = (s.gw.url(""), root.clone());
            async move { as_user(Method::GET, &gw, &path, &root, None).await }
        };
        let (status, page) = admin("/api/admin/subscriptions".into()).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let list = page["subscriptions"].as_array().unwrap();
        assert_eq!((list.len(), list[0]["state"].as_str(), list[0]["subject"]["id"].as_str()), (1, Some("pending"), Some(ann_id.as_str())), "{page}");
        assert!(page["next_cursor"].is_null());
        let (_, page) = admin("/api/admin/subscriptions?state=active".into()).await;
        assert_eq!(page["subscriptions"].as_array().unwrap().len(), 0, "{page}");
        for bad in ["?state=gone", "?limit=0", "?limit=101", "?colour=red"] {
            let (status, e) = admin(format!("/api/admin/subscriptions{bad}")).await;
            assert!(status == StatusCode::UNPROCESSABLE_ENTITY || status == StatusCode::BAD_REQUEST, "{bad}: {status} {e}");
        }
        let (status, _) = s.get("/api/admin/subscriptions").await;
        assert_eq!(status, StatusCode::FORBIDDEN, "not for a customer");

        let until = s.world.clock.now_ms() + 10 * 86_400_000;
        let grant = |who: String, user: String, body: Value| {
            let url = s.gw.url(&format!("/api/admin/subscriptions/{user}/grant"));
            async move { crate::platform::send(client().post(url).bearer_auth(who).json(&body)).await }
        };
        let (status, _) = grant(s.access(), ann_id.clone(), json!({"plan": "BASIC", "until": until})).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        for (body, want) in [
            (json!({"plan": "FREE", "until": until}), StatusCode::UNPROCESSABLE_ENTITY),
            (json!({"plan": "BASIC", "until": 1}), StatusCode::UNPROCESSABLE_ENTITY),
        ] {
            let (status, e) = grant(root.clone(), ann_id.clone(), body.clone()).await;
            assert_eq!(status, want, "{body}: {e}");
        }
        let (status, _) = grant(root.clone(), uuid::Uuid::now_v7().to_string(), json!({"plan": "BASIC", "until": until})).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "no such user");
        let (status, me) = grant(root.clone(), ann_id.clone(), json!({"plan": "BASIC", "until": until})).await;
        assert_eq!(status, StatusCode::OK, "{me}");
        assert_eq!((me["plan"].as_str(), me["state"].as_str(), me["period_end"].as_i64(), me["cancel_at_period_end"].as_bool()),
            (Some("BASIC"), Some("active"), Some(until), Some(true)), "{me}");
        s.tier_at_users("BASIC").await;
        s.world.clock.set(until + 1_000);
        s.wait_state("FREE", "canceled").await;
        s.tier_at_users("FREE").await;
        s.stop().await;
    }
}

both_databases! {
    /// schemathesis, generating requests from subscriptions'
    /// `/openapi.json` with a user's token, finds no 5xx, no undocumented
    /// status, no response that breaks its schema.
    async fn test_openapi_contract_holds_under_schemathesis(db: Database) {
        let s = shop(db).await;
        let url = s.subscriptions.url("/openapi.json");
        let out = crate::users::run_schemathesis(&url, &[&format!("Authorization: Bearer {}", s.access())]).await;
        assert!(out.0, "schemathesis found failures:\n{}", out.1);
        s.stop().await;
    }
}

both_databases! {
    /// The subscriptions process dies after billing made a checkout's
    /// invoice and before the change recorded it: the retry with the same
    /// key gets that invoice (billing answers one per reference), never a
    /// second one.
    async fn test_killed_after_the_invoice_bills_once(db: Database) {
        let (world, inbox, users, billing, access) = users_and_billing(db).await;
        let listen = format!("127.0.0.1:{}", free_port());
        let serve = |failpoints: &'static str| {
            let (world, users, billing, listen) = (&world, &users, &billing, &listen);
            async move {
                let env = [
                    ("TIERGATE_SUBSCRIPTIONS_DATABASE_URL", world.db.url_for("subscriptions", world.dir.path()).await),
                    ("TIERGATE_USERS_URL", users.base.clone()),
                    ("TIERGATE_BILLING_URL", billing.base.clone()),
                    ("TIERGATE_SUBSCRIPTIONS_FAILPOINTS", failpoints.to_owned()),
                ];
                crate::platform::serve_process(world, "subscriptions", "events: {}\n", listen, &env).await
            }
        };
        let url = format!("http://{listen}/api/subscriptions/checkout");
        let body = json!({"plan": "PREMIUM", "cycle": "monthly"});
        let mut child = serve("checkout.after_invoice=abort").await;
        let r = client().post(&url).bearer_auth(&access).header("idempotency-key", "k-1").json(&body).send().await;
        assert!(r.is_err(), "the process died mid-request: {r:?}");
        let status = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
        assert!(!status.success(), "{status}");
        let issued = inbox.wait_for("invoice.issued", "plan", "PREMIUM").await;

        let mut child = serve("").await;
        let (status, change, replayed) = crate::platform::post_keyed(&url, &access, "k-1", &body).await;
        assert_eq!((status, replayed), (StatusCode::CREATED, false), "{change}");
        assert_eq!(change["invoice"]["id"], issued["data"]["invoice_id"], "the invoice made before the crash: {change}");
        let (status, again, replayed) = crate::platform::post_keyed(&url, &access, "k-1", &body).await;
        assert_eq!((status, replayed, &again), (StatusCode::OK, true, &change));
        let (_, list) = as_user(Method::GET, &billing.base, "/api/billing/invoices", &access, None).await;
        assert_eq!(list["invoices"].as_array().unwrap().len(), 1, "one invoice: {list}");
        child.kill().unwrap();
        child.wait().unwrap();
        billing.stop().await;
        users.stop().await;
    }
}

both_databases! {
    /// The process dies after a period's renewal was recorded and before
    /// billing was asked for its invoice: the next start's scheduler pass
    /// invoices that renewal, once, and makes no second one.
    async fn test_killed_after_the_renewal_is_recorded_bills_once(db: Database) {
        const DAY: i64 = 24 * 3600 * 1000;
        let (world, _inbox, users, billing, access) = users_and_billing(db).await;
        let ann_id = claims_of(&access)["sub"].as_str().unwrap().to_owned();
        // The database, migrated; then Ann's PREMIUM month, paid 29 days
        // ago: its renewal is due (3 days' lead).
        let ss = world.settings::<subscriptions::SubscriptionsService>(&[]).await;
        world.start::<subscriptions::SubscriptionsService>(ss).stop().await;
        let calendar = backend_common::calendar::BusinessCalendar::jakarta();
        let now = backend_common::db::now_ms();
        let anchor = now - 29 * DAY;
        let end = calendar.add_months(anchor, 1).unwrap();
        let pool = world.pool("subscriptions").await;
        sqlx::query(
            "INSERT INTO subscriptions (id, subject_kind, subject_id, user_id, plan, cycle, state, anchor_at, \
             period_start, period_end, cancel_at_period_end, created_at, updated_at) \
             VALUES ('sub-1', 'user', $1, $1, 'PREMIUM', 'monthly', 'active', $2, $2, $3, 0, $2, $2)",
        )
        .bind(&ann_id)
        .bind(anchor)
        .bind(end)
        .execute(&pool)
        .await
        .unwrap();
        let listen = format!("127.0.0.1:{}", free_port());
        let env = |failpoints: &str| {
            vec![
                ("TIERGATE_USERS_URL", users.base.clone()),
                ("TIERGATE_BILLING_URL", billing.base.clone()),
                ("TIERGATE_SUBSCRIPTIONS_FAILPOINTS", failpoints.to_owned()),
            ]
        };
        let db_url = world.db.url_for("subscriptions", world.dir.path()).await;
        let with_db = |mut e: Vec<(&'static str, String)>| {
            e.push(("TIERGATE_SUBSCRIPTIONS_DATABASE_URL", db_url.clone()));
            e
        };
        let mut child = crate::platform::serve_command(&world, "subscriptions", "events: {}\n", &listen, &with_db(env("renewal.after_change=abort")))
            .spawn()
            .unwrap();
        let status = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
        assert!(!status.success(), "the start-up pass died at the fail point: {status}");
        let renewals = || {
            let pool = pool.clone();
            async move {
                sqlx::query_as::<_, (String, Option<String>)>("SELECT status, invoice_id FROM changes WHERE kind = 'renewal'")
                    .fetch_all(&pool)
                    .await
                    .unwrap()
            }
        };
        let before = renewals().await;
        assert_eq!(before.len(), 1, "{before:?}");
        assert_eq!(before[0], ("creating".to_owned(), None), "recorded, not yet billed");

        let mut child = crate::platform::serve_process(&world, "subscriptions", "events: {}\n", &listen, &with_db(env(""))).await;
        let invoiced = eventually("the renewal invoiced", || async {
            let r = renewals().await;
            (r.len() == 1 && r[0].1.is_some()).then_some(r)
        })
        .await;
        assert_eq!(invoiced[0].0, "pending", "{invoiced:?}");
        let (_, list) = as_user(Method::GET, &billing.base, "/api/billing/invoices", &access, None).await;
        let invoices = list["invoices"].as_array().unwrap();
        assert_eq!(invoices.len(), 1, "one invoice for the period: {list}");
        assert_eq!(Some(invoices[0]["id"].as_str().unwrap()), invoiced[0].1.as_deref());
        child.kill().unwrap();
        child.wait().unwrap();
        pool.close().await;
        billing.stop().await;
        users.stop().await;
    }
}

/// Pays invoice `id` through the gateway at `base` as `token`, by
/// `method` (`bca_va`, `qris`) with idempotency key `key`, and pays it at
/// the sandbox as the customer would: the payment.
pub(crate) async fn pay_in_sandbox(
    base: &str,
    token: &str,
    sandbox: &RunningSandbox,
    id: &str,
    method: &str,
    key: &str,
) -> Value {
    let (status, payment, _) = crate::platform::post_keyed(
        &format!("{base}/api/payments"),
        token,
        key,
        &json!({"invoice_id": id, "method": method}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{payment}");
    pay_at_sandbox(sandbox, &payment).await;
    payment
}

/// The customer pays `payment` at the sandbox: the sandbox's answer.
pub(crate) async fn pay_at_sandbox(sandbox: &RunningSandbox, payment: &Value) -> Value {
    sandbox::act(
        &sandbox.base(),
        payment["order_id"].as_str().unwrap(),
        "pay",
        false,
        false,
        None,
    )
    .await
    .unwrap()
}
