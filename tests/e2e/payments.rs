//! The payments service between billing, the gateway and the local
//! Midtrans sandbox, on SQLite and PostgreSQL: paying an invoice by every
//! method (each charge body as the contract has it), one charge per
//! idempotency key (also two at once), one open payment per invoice,
//! signed webhooks confirmed with Midtrans (forged, duplicated, reordered
//! and amount-mismatched ones change nothing), the janitor settling and
//! expiring payments whose notification was lost, card fraud challenges,
//! refunds once per key (and the manual refund of a virtual account), a
//! process killed after the charge, and payments without a key.

use backend_common::outbox::{Subscriber, Subscribers};
use backend_common::service_auth::ServiceKeys;
use payments::sandbox::{
    self, RunningSandbox, SandboxConfig, SANDBOX_CLIENT_KEY, SANDBOX_SERVER_KEY,
};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::common::{client, gateway, TestGateway};
use crate::platform::{
    as_service, as_user, both_databases, count_rows, eventually, metric, Database, Inbox, Running,
    World,
};
use crate::users::{settings as users_settings, signed_up};

struct Shop {
    world: World,
    inbox: Inbox,
    users: Running,
    billing: Running,
    payments: Running,
    sandbox: RunningSandbox,
    gw: TestGateway,
    subscriptions: ServiceKeys,
    ann: String,
    root: String,
}

fn access_of(pair: &Value) -> String {
    pair["access_token"].as_str().unwrap().to_owned()
}

fn id_of(access: &str) -> String {
    crate::users::claims_of(access)["sub"]
        .as_str()
        .unwrap()
        .to_owned()
}

pub(crate) fn midtrans_env(sandbox: &RunningSandbox) -> Vec<(&'static str, String)> {
    vec![
        (
            "TIERGATE_MIDTRANS_SERVER_KEY",
            SANDBOX_SERVER_KEY.to_owned(),
        ),
        (
            "TIERGATE_MIDTRANS_CLIENT_KEY",
            SANDBOX_CLIENT_KEY.to_owned(),
        ),
        ("TIERGATE_MIDTRANS_API_URL", sandbox.base()),
        ("TIERGATE_MIDTRANS_SNAP_URL", sandbox.base()),
    ]
}

/// Payments' events: settlements and refunds to billing, everything to
/// the inbox (playing notifications).
fn payment_events(billing: &Running, inbox: &Inbox) -> Subscribers {
    let mut s = Subscribers::new();
    for kind in ["payment.settled", "payment.refunded"] {
        s.entry(kind.to_owned())
            .or_default()
            .push(Subscriber::service("billing", &billing.base));
    }
    s.entry("*".to_owned())
        .or_default()
        .push(Subscriber::url(&inbox.url(), "notifications"));
    s
}

pub(crate) async fn payments_settings(
    world: &World,
    sandbox: Option<&RunningSandbox>,
    users: &Running,
    billing: &Running,
    inbox: &Inbox,
) -> payments::PaymentsSettings {
    let env: Vec<(&str, String)> = sandbox.map(midtrans_env).unwrap_or_default();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut s = world.settings::<payments::PaymentsService>(&env).await;
    s.shared
        .peers
        .insert("billing".into(), billing.base.clone());
    s.shared.peers.insert("users".into(), users.base.clone());
    s.shared.events = payment_events(billing, inbox);
    s
}

fn shop_gateway(users: &Running, billing: &Running, payments: &Running) -> TestGateway {
    let (u, b, p) = (users.addr(), billing.addr(), payments.addr());
    gateway(&format!(
        r#"upstreams:
  users: {{ backends: [{{ address: "{u}" }}] }}
  billing: {{ backends: [{{ address: "{b}" }}] }}
  payments: {{ backends: [{{ address: "{p}" }}] }}
auth:
  jwks: {{ url: "http://{u}/.well-known/jwks.json" }}
  issuer: tiergate-users
  audience: tiergate
rate_limit:
  tiers:
    - {{ name: FREE, per_minute: 100000 }}
  anonymous: {{ per_minute: 100000 }}
routes:
  - {{ name: payments-webhooks, match: {{ path: {{ prefix: /api/payments/webhooks }}, methods: [POST] }}, upstream: payments, rate_limit: false }}
  - {{ name: admin-payments, match: {{ path: {{ prefix: /api/admin/payments }} }}, upstream: payments, auth: required, roles: [admin] }}
  - {{ name: payments, match: {{ path: {{ prefix: /api/payments }} }}, upstream: payments, auth: required }}
  - {{ name: billing, match: {{ path: {{ prefix: /api/billing }} }}, upstream: billing, auth: required }}
"#
    ))
}

async fn shop(db: Database) -> Shop {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_test_writer()
        .try_init();
    let world = World::new(db);
    let inbox = Inbox::start().await;
    let users = world.start::<users::UsersService>(
        users_settings(&world, inbox.subscribers("notifications")).await,
    );
    let mut bs = world.settings::<billing::BillingService>(&[]).await;
    bs.shared.peers.insert("users".into(), users.base.clone());
    bs.shared.events = inbox.subscribers("notifications");
    let billing = world.start::<billing::BillingService>(bs);
    let sandbox = sandbox::start(SandboxConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    })
    .unwrap();
    let payments = world.start::<payments::PaymentsService>(
        payments_settings(&world, Some(&sandbox), &users, &billing, &inbox).await,
    );
    let gw = shop_gateway(&users, &billing, &payments);
    sandbox.set_notify_url(Some(gw.url("/api/payments/webhooks/midtrans")));
    let ann = access_of(&signed_up(&users.base, &inbox, "ann@example.com").await);
    let root = access_of(&signed_up(&users.base, &inbox, "root@example.com").await);
    Shop {
        subscriptions: world.keys_of("subscriptions"),
        world,
        inbox,
        users,
        billing,
        payments,
        sandbox,
        gw,
        ann,
        root,
    }
}

impl Shop {
    /// An open invoice of `access`'s user for Rp 249.000 + PPN = 276.390.
    async fn invoice(&self, access: &str, reference: &str) -> Value {
        let user = id_of(access);
        let (status, inv) = as_service(&self.subscriptions, Method::POST, ("billing", &self.billing), "/internal/invoices",
            Some(json!({"reference": {"kind": "plan_change", "id": reference},
                "subject": {"kind": "user", "id": user}, "user_id": user, "plan": "PREMIUM", "cycle": "monthly",
                "lines": [{"description": "PREMIUM, bulanan", "unit_price": 249_000}]}))).await;
        assert_eq!(status, StatusCode::CREATED, "{inv}");
        assert_eq!(inv["total"], 276_390);
        inv
    }

    /// `POST /api/payments` through the gateway.
    async fn pay(&self, access: &str, key: &str, body: Value) -> (StatusCode, Value, bool) {
        crate::platform::post_keyed(&self.gw.url("/api/payments"), access, key, &body).await
    }

    async fn get(&self, access: &str, path: &str) -> (StatusCode, Value) {
        as_user(Method::GET, &self.gw.url(""), path, access, None).await
    }

    /// The sandbox acting as the customer or bank.
    async fn act(&self, order_id: &str, action: &str, twice: bool, stale: bool) -> Value {
        sandbox::act(&self.sandbox.base(), order_id, action, twice, stale, None)
            .await
            .unwrap()
    }

    /// Every API call the sandbox received to a path ending in `suffix`.
    async fn midtrans_calls(&self, suffix: &str) -> Vec<Value> {
        let r: Value = client()
            .get(format!("{}/sandbox/requests", self.sandbox.base()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        r["requests"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|q| q["path"].as_str().unwrap().ends_with(suffix))
            .cloned()
            .collect()
    }

    async fn wait_status(&self, access: &str, id: &str, want: &str) -> Value {
        eventually(&format!("payment {id} {want}"), || async {
            let (_, p) = self.get(access, &format!("/api/payments/{id}")).await;
            (p["status"] == want).then_some(p)
        })
        .await
    }

    async fn invoice_status(&self, id: &str) -> Value {
        let (status, inv) = as_service(
            &self.world.keys_of("payments"),
            Method::GET,
            ("billing", &self.billing),
            &format!("/internal/invoices/{id}"),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        inv
    }

    /// A notification signed with the sandbox's key.
    fn signed(&self, mut body: Value) -> Value {
        let sig = payments::midtrans::signature(
            body["order_id"].as_str().unwrap(),
            body["status_code"].as_str().unwrap(),
            body["gross_amount"].as_str().unwrap(),
            SANDBOX_SERVER_KEY,
        );
        body["signature_key"] = json!(sig);
        body
    }

    async fn webhook(&self, body: &Value) -> (StatusCode, Value) {
        crate::platform::send(
            client()
                .post(self.gw.url("/api/payments/webhooks/midtrans"))
                .json(body),
        )
        .await
    }

    async fn stop(self) {
        self.payments.stop().await;
        self.billing.stop().await;
        self.users.stop().await;
        self.sandbox.stop().await;
    }
}

both_databases! {
    /// A customer pays an invoice by BCA virtual account through the
    /// gateway: the VA number comes back, a retry replays it, the
    /// customer pays, the notification (twice, then a stale `pending`)
    /// settles it once, billing marks the invoice paid; another user sees
    /// none of it.
    async fn test_an_invoice_paid_by_virtual_account(db: Database) {
        let s = shop(db).await;
        let inv = s.invoice(&s.ann, "ann-1").await;
        let inv_id = inv["id"].as_str().unwrap();
        let body = json!({"invoice_id": inv_id, "method": "bca_va"});
        let (status, p, replayed) = s.pay(&s.ann, "k-1", body.clone()).await;
        assert_eq!(status, StatusCode::CREATED, "{p}");
        assert!(!replayed);
        assert_eq!((p["status"].as_str(), p["amount"].as_i64(), p["currency"].as_str()), (Some("pending"), Some(276_390), Some("IDR")), "{p}");
        assert_eq!(p["instructions"]["bank"], "bca", "{p}");
        assert!(p["instructions"]["va_number"].as_str().unwrap().len() >= 10, "{p}");
        assert!(p["expires_at"].as_i64().unwrap() > s.world.clock.now_ms(), "{p}");
        assert_eq!(p["environment"], "sandbox");
        let number = inv["number"].as_str().unwrap();
        let order_id = p["order_id"].as_str().unwrap().to_owned();
        assert_eq!(order_id, format!("{}-1", number.replace('/', "-")));

        // The charge, field by field.
        let charges = s.midtrans_calls("/v2/charge").await;
        assert_eq!(charges.len(), 1);
        let c = &charges[0]["body"];
        assert_eq!(c["payment_type"], "bank_transfer");
        assert_eq!(c["bank_transfer"], json!({"bank": "bca"}));
        assert_eq!(c["transaction_details"], json!({"order_id": order_id, "gross_amount": 276_390}));
        assert_eq!(c["customer_details"]["email"], "ann@example.com");
        assert_eq!(charges[0]["idempotency_key"], p["id"], "the payment id is Midtrans's Idempotency-Key");

        // A retry replays; the key with another body is refused; another
        // key for the same method gets the same open payment.
        let (status, again, replayed) = s.pay(&s.ann, "k-1", body.clone()).await;
        assert_eq!((status, replayed), (StatusCode::CREATED, true));
        assert_eq!(again, p);
        let (status, e, _) = s.pay(&s.ann, "k-1", json!({"invoice_id": inv_id, "method": "qris"})).await;
        assert_eq!(status, StatusCode::CONFLICT, "{e}");
        assert_eq!(e["error"]["code"], "idempotency_key_reused");
        let (status, same, _) = s.pay(&s.ann, "k-2", body.clone()).await;
        assert_eq!(status, StatusCode::OK, "{same}");
        assert_eq!(same["id"], p["id"]);
        assert_eq!(s.midtrans_calls("/v2/charge").await.len(), 1, "no second charge");
        let (status, e, _) = s.pay(&s.ann, "", body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{e}");

        // The customer pays; the notification arrives twice, then a late
        // `pending`.
        let paid = s.act(&order_id, "pay", true, true).await;
        assert_eq!(paid["deliveries"], json!([200, 200, 200]), "{paid}");
        let id = p["id"].as_str().unwrap();
        let settled = s.wait_status(&s.ann, id, "settled").await;
        assert!(settled["paid_at"].as_i64().is_some());
        assert_eq!(settled["instructions"], json!({}), "nothing left to pay with");
        s.inbox.wait_for("payment.settled", "payment_id", id).await;
        eventually("the invoice paid", || async {
            let inv = s.invoice_status(inv_id).await;
            (inv["status"] == "paid").then_some(())
        }).await;
        assert_eq!(s.inbox.count(|e| e["type"] == "payment.settled"), 1, "settled once");
        assert_eq!(s.inbox.count(|e| e["type"] == "payment.pending"), 1);
        let (status, detail) = s.get(&s.root, &format!("/api/admin/payments/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{detail}");
        let outcomes: Vec<&str> = detail["notifications"].as_array().unwrap().iter().map(|n| n["outcome"].as_str().unwrap()).collect();
        // The late `pending` is confirmed as what Midtrans says now
        // (settlement): nothing moves.
        assert_eq!(outcomes, ["moved:settled", "duplicate", "duplicate"], "{detail}");
        assert_eq!(detail["notifications"][2]["transaction_status"], "pending");
        assert!(detail["notifications"][0]["body"].get("signature_key").is_none(), "the signature is not stored");
        assert_eq!(detail["notifications"][0]["body"]["va_numbers"][0]["bank"], "bca", "stored raw");

        // Paid: no more payments of it.
        let (status, e, _) = s.pay(&s.ann, "k-3", json!({"invoice_id": inv_id, "method": "qris"})).await;
        assert_eq!(status, StatusCode::CONFLICT, "{e}");
        assert_eq!(e["error"]["code"], "invoice_not_payable");

        // Another user: 404 for the payment and the invoice, an empty list.
        let bob = access_of(&signed_up(&s.users.base, &s.inbox, "bob@example.com").await);
        let (status, _) = s.get(&bob, &format!("/api/payments/{id}")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, list) = s.get(&bob, &format!("/api/payments?invoice_id={inv_id}")).await;
        assert_eq!((status, list["payments"].as_array().unwrap().len()), (StatusCode::OK, 0));
        let (status, _) = as_user(Method::POST, &s.gw.url(""), &format!("/api/payments/{id}/cancel"), &bob, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, e, _) = s.pay(&bob, "b-1", body.clone()).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "another subject's invoice: {e}");
        let (status, _) = s.get(&bob, &format!("/api/admin/payments/{id}")).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        let (_, mine) = s.get(&s.ann, &format!("/api/payments?invoice_id={inv_id}")).await;
        assert_eq!(mine["payments"][0]["id"], p["id"]);

        // What the frontend needs.
        let (status, cfg) = s.get(&s.ann, "/api/payments/config").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!((cfg["enabled"].as_bool(), cfg["environment"].as_str(), cfg["client_key"].as_str()),
            (Some(true), Some("sandbox"), Some(SANDBOX_CLIENT_KEY)));
        assert!(cfg["snap_js_url"].as_str().unwrap().ends_with("/snap/snap.js"));
        let health: Value = client().get(s.payments.url("/health")).send().await.unwrap().json().await.unwrap();
        assert!(health["details"]["midtrans"].as_str().unwrap().starts_with("sandbox"), "{health}");
        s.stop().await;
    }
}

/// Every method answers what its customer needs, from the charge the
/// contract describes; choosing another method cancels the open one at
/// Midtrans first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_every_method_answers_what_the_customer_needs() {
    let s = shop(Database::sqlite()).await;
    let table: &[(&str, &str, &[&str])] = &[
        ("bni_va", "bank_transfer", &["bank", "va_number"]),
        ("bri_va", "bank_transfer", &["bank", "va_number"]),
        ("cimb_va", "bank_transfer", &["bank", "va_number"]),
        ("permata_va", "bank_transfer", &["bank", "va_number"]),
        ("mandiri_bill", "echannel", &["bill_key", "biller_code"]),
        ("gopay", "gopay", &["qr_code_url", "deeplink_url"]),
        ("shopeepay", "shopeepay", &["deeplink_url"]),
        ("qris", "qris", &["qr_string", "qr_code_url"]),
        ("credit_card", "credit_card", &["redirect_url"]),
        ("snap", "", &["token", "redirect_url"]),
    ];
    for (i, (method, payment_type, fields)) in table.iter().enumerate() {
        let inv = s.invoice(&s.ann, &format!("m-{i}")).await;
        let mut body = json!({"invoice_id": inv["id"], "method": method});
        if *method == "credit_card" {
            body["token_id"] = json!("481111-1114-token");
        }
        let (status, p, _) = s.pay(&s.ann, &format!("m-{i}"), body).await;
        assert_eq!(status, StatusCode::CREATED, "{method}: {p}");
        assert_eq!(p["status"], "pending", "{method}: {p}");
        for f in *fields {
            assert!(
                p["instructions"][f].as_str().is_some_and(|v| !v.is_empty()),
                "{method}: {f} missing in {p}"
            );
        }
        if *method == "permata_va" {
            assert_eq!(p["instructions"]["bank"], "permata");
        }
        if *method == "mandiri_bill" {
            assert_eq!(p["instructions"]["biller_code"], "70012");
        }
        if *method == "snap" {
            let snaps = s.midtrans_calls("/snap/v1/transactions").await;
            assert_eq!(snaps.len(), 1);
            assert_eq!(
                snaps[0]["body"]["transaction_details"]["gross_amount"],
                276_390
            );
            continue;
        }
        let charges = s.midtrans_calls("/v2/charge").await;
        let c = &charges.last().unwrap()["body"];
        assert_eq!(c["payment_type"], *payment_type, "{method}");
        assert_eq!(c["transaction_details"]["order_id"], p["order_id"]);
        if *method == "credit_card" {
            assert_eq!(
                c["credit_card"],
                json!({"token_id": "481111-1114-token", "authentication": true})
            );
        }
    }
    let (status, e, _) = s
        .pay(
            &s.ann,
            "bad-1",
            json!({"invoice_id": "x", "method": "paypal"}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    let inv = s.invoice(&s.ann, "switch").await;
    let (status, e, _) = s
        .pay(
            &s.ann,
            "bad-2",
            json!({"invoice_id": inv["id"], "method": "credit_card"}),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "a card without its token: {e}"
    );
    let (status, e, _) = s
        .pay(
            &s.ann,
            "bad-3",
            json!({"invoice_id": inv["id"], "method": "bca_va", "amount": 1}),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "the amount is never the client's: {e}"
    );

    // One open payment per invoice: QRIS after BCA cancels BCA first.
    let (_, first, _) = s
        .pay(
            &s.ann,
            "sw-1",
            json!({"invoice_id": inv["id"], "method": "bca_va"}),
        )
        .await;
    let (status, second, _) = s
        .pay(
            &s.ann,
            "sw-2",
            json!({"invoice_id": inv["id"], "method": "qris"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{second}");
    assert!(
        second["order_id"].as_str().unwrap().ends_with("-2"),
        "{second}"
    );
    let cancels = s
        .midtrans_calls(&format!(
            "/v2/{}/cancel",
            first["order_id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(cancels.len(), 1, "the first attempt cancelled at Midtrans");
    let (_, list) = s
        .get(
            &s.ann,
            &format!("/api/payments?invoice_id={}", inv["id"].as_str().unwrap()),
        )
        .await;
    let statuses: Vec<&str> = list["payments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["pending", "cancelled"], "{list}");
    // The customer cancels the second; cancelling again is a no-op; a
    // cancelled payment cannot be paid at the sandbox either.
    let path = format!("/api/payments/{}/cancel", second["id"].as_str().unwrap());
    let (status, c) = as_user(Method::POST, &s.gw.url(""), &path, &s.ann, None).await;
    assert_eq!(
        (status, c["status"].as_str()),
        (StatusCode::OK, Some("cancelled")),
        "{c}"
    );
    let (status, _) = as_user(Method::POST, &s.gw.url(""), &path, &s.ann, None).await;
    assert_eq!(status, StatusCode::OK);
    s.inbox
        .wait_for(
            "payment.failed",
            "payment_id",
            second["id"].as_str().unwrap(),
        )
        .await;
    s.stop().await;
}

both_databases! {
    /// Forged, unsigned, malformed and unknown notifications; a validly
    /// signed body that claims what Midtrans does not confirm; Midtrans
    /// confirming another amount: none of them settles anything.
    async fn test_notifications_that_must_not_settle(db: Database) {
        let s = shop(db).await;
        let inv = s.invoice(&s.ann, "n-1").await;
        let (_, p, _) = s.pay(&s.ann, "n-1", json!({"invoice_id": inv["id"], "method": "bni_va"})).await;
        let (id, order_id) = (p["id"].as_str().unwrap(), p["order_id"].as_str().unwrap());
        let claim = json!({"order_id": order_id, "status_code": "200", "gross_amount": "276390.00",
            "transaction_status": "settlement", "fraud_status": "accept", "payment_type": "bank_transfer",
            "currency": "IDR", "transaction_id": "t", "transaction_time": "2026-11-01 10:00:00", "status_message": "x", "merchant_id": "G"});
        let pool = s.world.pool("payments").await;

        let mut forged = claim.clone();
        forged["signature_key"] = json!("0".repeat(128));
        for (body, want) in [(forged, 401), (claim.clone(), 401), (json!([1, 2]), 400), (json!("x"), 400)] {
            let (status, e) = s.webhook(&body).await;
            assert_eq!(status.as_u16(), want, "{body}: {e}");
        }
        let r = client().post(s.gw.url("/api/payments/webhooks/midtrans")).body("{not json").send().await.unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert_eq!(count_rows(&pool, "notifications").await, 0, "nothing stored from a forgery");
        // Signed with the key but for an order we never made: stored, 200.
        let mut unknown = claim.clone();
        unknown["order_id"] = json!("INV-1999-01-000001-1");
        let (status, a) = s.webhook(&s.signed(unknown)).await;
        assert_eq!((status, a["outcome"].as_str()), (StatusCode::OK, Some("unknown_order")), "{a}");
        // Signed, but Midtrans says it is still pending: nothing moves.
        let (status, a) = s.webhook(&s.signed(claim.clone())).await;
        assert_eq!((status, a["outcome"].as_str()), (StatusCode::OK, Some("duplicate")), "acts on the confirmed status: {a}");
        let (_, now) = s.get(&s.ann, &format!("/api/payments/{id}")).await;
        assert_eq!(now["status"], "pending");
        assert_eq!(metric(&s.payments.base, "payments_webhooks_total{outcome=\"forged\"").await, Some(2.0));

        // Midtrans confirms another amount: flagged, counted, never settled.
        let r = client().post(format!("{}/sandbox/{order_id}/tamper", s.sandbox.base())).json(&json!({"gross_amount": "1000.00"})).send().await.unwrap();
        assert!(r.status().is_success());
        let paid = s.act(order_id, "pay", false, false).await;
        assert_eq!(paid["deliveries"], json!([200]));
        let (_, flagged) = s.get(&s.ann, &format!("/api/payments/{id}")).await;
        assert_eq!((flagged["status"].as_str(), flagged["amount_mismatch"].as_bool()), (Some("pending"), Some(true)), "{flagged}");
        assert!(flagged["status_message"].as_str().unwrap().contains("1000.00"), "{flagged}");
        assert_eq!(metric(&s.payments.base, "payments_amount_mismatches_total").await, Some(1.0));
        assert_eq!(s.inbox.count(|e| e["type"] == "payment.settled"), 0);
        assert_eq!(s.invoice_status(inv["id"].as_str().unwrap()).await["status"], "open");
        s.stop().await;
    }
}

/// No notification arrives (the sandbox sends none): the janitor asks
/// Midtrans and settles one payment, expires another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_the_janitor_settles_and_expires_what_no_notification_told() {
    let s = shop(Database::sqlite()).await;
    s.sandbox.set_notify_url(None);
    let a = s.invoice(&s.ann, "j-1").await;
    let b = s.invoice(&s.ann, "j-2").await;
    let (_, pa, _) = s
        .pay(
            &s.ann,
            "j-1",
            json!({"invoice_id": a["id"], "method": "bri_va"}),
        )
        .await;
    let (_, pb, _) = s
        .pay(
            &s.ann,
            "j-2",
            json!({"invoice_id": b["id"], "method": "gopay"}),
        )
        .await;
    assert_eq!(
        s.act(pa["order_id"].as_str().unwrap(), "pay", false, false)
            .await["deliveries"],
        json!([])
    );
    s.act(pb["order_id"].as_str().unwrap(), "expire", false, false)
        .await;
    // Nothing moved yet: no notification came.
    let (_, still) = s
        .get(
            &s.ann,
            &format!("/api/payments/{}", pa["id"].as_str().unwrap()),
        )
        .await;
    assert_eq!(still["status"], "pending");
    // A minute later the janitor's first re-check finds both.
    s.world.clock.advance(std::time::Duration::from_secs(61));
    s.wait_status(&s.ann, pa["id"].as_str().unwrap(), "settled")
        .await;
    s.wait_status(&s.ann, pb["id"].as_str().unwrap(), "expired")
        .await;
    s.inbox
        .wait_for("payment.settled", "payment_id", pa["id"].as_str().unwrap())
        .await;
    s.inbox
        .wait_for("payment.expired", "payment_id", pb["id"].as_str().unwrap())
        .await;
    eventually("invoice paid", || async {
        (s.invoice_status(a["id"].as_str().unwrap()).await["status"] == "paid").then_some(())
    })
    .await;
    s.stop().await;
}

both_databases! {
    /// A card held for fraud review waits; approved, it settles; refunds
    /// happen once per key, in parts, and billing records each; a virtual
    /// account needs a manual refund; a Permata payment the bank reverses
    /// gives the money back.
    async fn test_cards_refunds_and_reversals(db: Database) {
        let s = shop(db).await;
        let inv = s.invoice(&s.ann, "c-1").await;
        let (status, p, _) = s.pay(&s.ann, "c-1", json!({"invoice_id": inv["id"], "method": "credit_card", "token_id": "challenge-4811"})).await;
        assert_eq!(status, StatusCode::CREATED, "{p}");
        assert!(p["instructions"]["redirect_url"].as_str().is_some(), "3-D Secure: {p}");
        let (id, order_id) = (p["id"].as_str().unwrap().to_owned(), p["order_id"].as_str().unwrap().to_owned());
        s.act(&order_id, "pay", false, false).await;
        s.wait_status(&s.ann, &id, "challenge").await;
        assert_eq!(s.inbox.count(|e| e["type"] == "payment.settled"), 0, "a challenged card is not paid");
        // The merchant approves in the Midtrans dashboard.
        let r = client().post(format!("{}/v2/{order_id}/approve", s.sandbox.base()))
            .header("authorization", payments::midtrans::authorization(SANDBOX_SERVER_KEY)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        s.wait_status(&s.ann, &id, "captured").await;
        s.inbox.wait_for("payment.settled", "payment_id", &id).await;
        s.act(&order_id, "settle", false, false).await;
        s.wait_status(&s.ann, &id, "settled").await;

        let refund = |key: &'static str, amount: i64| {
            let (url, root, id) = (s.gw.url(&format!("/api/admin/payments/{id}/refund")), s.root.clone(), id.clone());
            async move {
                let _ = id;
                crate::platform::send(client().post(url).bearer_auth(root).header("idempotency-key", key)
                    .json(&json!({"amount": amount, "reason": "pelanggan minta"}))).await
            }
        };
        // Twice at once with one key: one refund, counted once.
        let ((s1, a1), (s2, a2)) = tokio::join!(refund("r-1", 76_390), refund("r-1", 76_390));
        let mut statuses = [s1.as_u16(), s2.as_u16()];
        statuses.sort_unstable();
        assert!(matches!(statuses, [200, 201] | [201, 409]), "{statuses:?}: {a1} {a2}");
        let r1 = if s1 == StatusCode::CREATED { a1 } else { a2 };
        assert_eq!(r1["status"], "done", "{r1}");
        let (status, again) = refund("r-1", 76_390).await;
        assert_eq!((status, &again["id"]), (StatusCode::OK, &r1["id"]), "the same key: the same refund");
        let (status, e) = refund("r-2", 200_001).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "more than is left: {e}");
        let (status, r2) = refund("r-3", 200_000).await;
        assert_eq!(status, StatusCode::CREATED, "{r2}");
        // The racing retry may ask Midtrans again, with the same
        // refund_key (Midtrans refunds once per key): two refunds there.
        let mut keys: Vec<String> = s.midtrans_calls(&format!("/v2/{order_id}/refund")).await.iter()
            .map(|q| q["body"]["refund_key"].as_str().unwrap().to_owned()).collect();
        keys.dedup();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), 2, "two refunds at Midtrans: {keys:?}");
        let done = s.wait_status(&s.ann, &id, "refunded").await;
        assert_eq!(done["refunded"], 276_390);
        eventually("billing records both refunds", || async {
            let inv = s.invoice_status(inv["id"].as_str().unwrap()).await;
            (inv["amount_refunded"] == 276_390).then_some(())
        }).await;
        assert_eq!(s.inbox.count(|e| e["type"] == "payment.refunded"), 2, "one event per refund, none from their notifications");
        let (status, e) = refund("r-4", 1).await;
        assert_eq!(status, StatusCode::CONFLICT, "nothing left: {e}");

        // A virtual account: Midtrans cannot refund it; recorded by hand.
        let inv2 = s.invoice(&s.ann, "c-2").await;
        let (_, va, _) = s.pay(&s.ann, "c-2", json!({"invoice_id": inv2["id"], "method": "bca_va"})).await;
        s.act(va["order_id"].as_str().unwrap(), "pay", false, false).await;
        let va_id = va["id"].as_str().unwrap();
        s.wait_status(&s.ann, va_id, "settled").await;
        let url = s.gw.url(&format!("/api/admin/payments/{va_id}/refund"));
        let (status, e) = crate::platform::send(client().post(&url).bearer_auth(&s.root).header("idempotency-key", "v-1")
            .json(&json!({"amount": 10_000, "reason": "salah bayar"}))).await;
        assert_eq!((status, e["error"]["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("manual_refund_required")), "{e}");
        let (status, m) = crate::platform::send(client().post(&url).bearer_auth(&s.root).header("idempotency-key", "v-2")
            .json(&json!({"amount": 10_000, "reason": "salah bayar", "manual": true, "reference": "BCA-TRF-991"}))).await;
        assert_eq!(status, StatusCode::CREATED, "{m}");
        assert_eq!((m["manual"].as_bool(), m["reference"].as_str()), (Some(true), Some("BCA-TRF-991")));
        s.wait_status(&s.ann, va_id, "partially_refunded").await;

        // Permata settles, then the bank reverses it: the money goes back.
        let inv3 = s.invoice(&s.ann, "c-3").await;
        let (_, pv, _) = s.pay(&s.ann, "c-3", json!({"invoice_id": inv3["id"], "method": "permata_va"})).await;
        let pv_order = pv["order_id"].as_str().unwrap();
        s.act(pv_order, "pay", false, false).await;
        s.wait_status(&s.ann, pv["id"].as_str().unwrap(), "settled").await;
        s.act(pv_order, "deny", false, false).await;
        s.wait_status(&s.ann, pv["id"].as_str().unwrap(), "reversed").await;
        let ev = s.inbox.wait_for("payment.refunded", "payment_id", pv["id"].as_str().unwrap()).await;
        assert_eq!((ev["data"]["amount"].as_i64(), ev["data"]["reason"].as_str()), (Some(276_390), Some("reversed")), "{ev}");
        s.stop().await;
    }
}

both_databases! {
    /// Two `POST /api/payments` with one key at the same moment, and ten
    /// with ten keys: one charge at Midtrans.
    async fn test_concurrent_payments_charge_once(db: Database) {
        let s = shop(db).await;
        let inv = s.invoice(&s.ann, "cc-1").await;
        let body = json!({"invoice_id": inv["id"], "method": "cimb_va"});
        let (a, b) = tokio::join!(s.pay(&s.ann, "same", body.clone()), s.pay(&s.ann, "same", body.clone()));
        let mut statuses = [a.0.as_u16(), b.0.as_u16()];
        statuses.sort_unstable();
        assert!(matches!(statuses, [201, 201] | [201, 409]), "{statuses:?} {} {}", a.1, b.1);
        let keys: Vec<String> = (0..10).map(|i| format!("many-{i}")).collect();
        let many = futures_util::future::join_all(keys.iter().map(|k| s.pay(&s.ann, k, body.clone()))).await;
        let mut ids: Vec<&Value> = [&a, &b].into_iter().chain(&many).filter(|r| r.0.is_success()).map(|r| &r.1["id"]).collect();
        for (status, p, _) in &many {
            assert!(status.is_success() || *status == StatusCode::CONFLICT, "{status} {p}");
        }
        ids.dedup();
        assert_eq!(ids.len(), 1, "one payment: {ids:?}");
        assert_eq!(s.midtrans_calls("/v2/charge").await.len(), 1, "one charge");
        s.stop().await;
    }
}

/// `tiergate serve payments` in its own process.
async fn serve_payments(s: &Shop, listen: &str, failpoints: &str) -> std::process::Child {
    // A short Midtrans timeout: a retry takes a dead request's key over
    // 3 s after it began.
    let config = format!(
        "events:\n  \"*\": [\"{}\"]\nservices:\n  payments:\n    midtrans: {{ timeout: 1s }}\n",
        s.inbox.url()
    );
    let mut env = vec![
        (
            "TIERGATE_PAYMENTS_DATABASE_URL",
            s.world.db.url_for("payments2", s.world.dir.path()).await,
        ),
        ("TIERGATE_BILLING_URL", s.billing.base.clone()),
        ("TIERGATE_USERS_URL", s.users.base.clone()),
        ("TIERGATE_PAYMENTS_FAILPOINTS", failpoints.to_owned()),
    ];
    env.extend(midtrans_env(&s.sandbox));
    crate::platform::serve_process(&s.world, "payments", &config, listen, &env).await
}

both_databases! {
    /// The process dies right after Midtrans accepted the charge, before
    /// our commit: the retry with the same key finds the order at Midtrans
    /// and adopts it (no second charge); the customer pays; it settles.
    async fn test_killed_after_the_charge_charges_once(db: Database) {
        let s = shop(db).await;
        let inv = s.invoice(&s.ann, "k-1").await;
        let listen = format!("127.0.0.1:{}", crate::common::free_port());
        let url = format!("http://{listen}/api/payments");
        let body = json!({"invoice_id": inv["id"], "method": "bca_va"});
        let pay = || client().post(&url).bearer_auth(&s.ann).header("idempotency-key", "crash-1").json(&body).send();
        let mut child = serve_payments(&s, &listen, "charge.after_midtrans=abort").await;
        assert!(pay().await.is_err(), "the process died mid-request");
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(6), "aborted at the fail point: {status}");
        assert_eq!(s.midtrans_calls("/v2/charge").await.len(), 1, "Midtrans was charged");

        let mut child = serve_payments(&s, &listen, "").await;
        // The dead request held the key; once its hold lapses the retry
        // takes over.
        let r = eventually("the key taken over", || async {
            let r = pay().await.unwrap();
            (r.status() != StatusCode::CONFLICT).then_some(r)
        }).await;
        assert_eq!(r.status(), StatusCode::CREATED);
        let p: Value = r.json().await.unwrap();
        assert_eq!(p["status"], "pending", "{p}");
        assert!(p["instructions"]["va_number"].as_str().is_some(), "the VA number recovered from Midtrans: {p}");
        assert!(p["order_id"].as_str().unwrap().ends_with("-1"), "the same order: {p}");
        assert_eq!(s.midtrans_calls("/v2/charge").await.len(), 1, "no second charge");
        assert_eq!(s.midtrans_calls(&format!("/v2/{}/status", p["order_id"].as_str().unwrap())).await.len(), 1, "looked up first");
        s.sandbox.set_notify_url(Some(format!("http://{listen}/api/payments/webhooks/midtrans")));
        s.act(p["order_id"].as_str().unwrap(), "pay", false, false).await;
        let got = format!("http://{listen}/api/payments/{}", p["id"].as_str().unwrap());
        eventually("settled", || async {
            let v: Value = client().get(&got).bearer_auth(&s.ann).send().await.ok()?.json().await.ok()?;
            (v["status"] == "settled").then_some(())
        }).await;
        child.kill().unwrap();
        child.wait().unwrap();
        s.stop().await;
    }
}

/// Without a server key: the service runs, says payments are disabled,
/// and refuses to charge or to take notifications.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_without_a_key_payments_are_disabled() {
    let world = World::new(Database::sqlite());
    let inbox = Inbox::start().await;
    let users = world.start::<users::UsersService>(
        users_settings(&world, inbox.subscribers("notifications")).await,
    );
    let billing = world
        .start::<billing::BillingService>(world.settings::<billing::BillingService>(&[]).await);
    let p = world.start::<payments::PaymentsService>(
        payments_settings(&world, None, &users, &billing, &inbox).await,
    );
    let health: Value = client()
        .get(p.url("/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (
            health["status"].as_str(),
            health["details"]["midtrans"].as_str()
        ),
        (Some("ok"), Some("disabled")),
        "{health}"
    );
    let ann = access_of(&signed_up(&users.base, &inbox, "ann@example.com").await);
    let r = client()
        .post(p.url("/api/payments"))
        .bearer_auth(&ann)
        .header("idempotency-key", "x")
        .json(&json!({"invoice_id": "i", "method": "bca_va"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "payments_disabled");
    let r = client().post(p.url("/api/payments/webhooks/midtrans"))
        .json(&json!({"order_id": "a", "status_code": "200", "gross_amount": "1.00", "signature_key": "x"})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let (status, cfg) = as_user(Method::GET, &p.base, "/api/payments/config", &ann, None).await;
    assert_eq!(
        (status, cfg["enabled"].as_bool()),
        (StatusCode::OK, Some(false))
    );
    p.stop().await;
    billing.stop().await;
    users.stop().await;
}

both_databases! {
    /// schemathesis, generating requests from payments' `/openapi.json`
    /// with an admin's token (a payment of theirs pending, so ids exist),
    /// finds no 5xx, no undocumented status, no response that breaks its
    /// schema — webhooks included.
    async fn test_openapi_contract_holds_under_schemathesis(db: Database) {
        let s = shop(db).await;
        let inv = s.invoice(&s.root, "schemathesis").await;
        let (status, paid, _) = s.pay(&s.root, "k-1", json!({"invoice_id": inv["id"], "method": "qris"})).await;
        assert_eq!(status, StatusCode::CREATED, "{paid}");
        let url = s.payments.url("/openapi.json");
        let out = crate::users::run_schemathesis(&url, &[&format!("Authorization: Bearer {}", s.root)]).await;
        assert!(out.0, "schemathesis found failures:\n{}", out.1);
        s.stop().await;
    }
}
