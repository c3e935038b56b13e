//! The whole business loop as one product: the five services read the
//! shipped `conf/services.yaml` (every event wired as shipped, the shipped
//! plans and prices), the gateway runs the shipped `conf/tiergate.yaml`
//! (the shipped tiers, routes, usage and the tier change feed), payments
//! talk to the Midtrans sandbox, mails go to the development mailbox. Only
//! the addresses are this test's. On SQLite and PostgreSQL.

use std::path::PathBuf;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use notifications::mailbox::{self, Filter, Mail};
use payments::sandbox::{self, RunningSandbox, SandboxConfig};

use crate::common::{client, free_port, gateway_with_env, TestGateway};
use crate::platform::{
    as_user, both_databases, eventually, post, post_keyed, Database, Running, World,
};

const PASSWORD: &str = "correct horse 9";
const DAY: i64 = 86_400_000;

/// The five services' names, in the order of their standard ports
/// (users 8021 … billing 8025).
const NAMES: [&str; 5] = [
    "users",
    "subscriptions",
    "payments",
    "notifications",
    "billing",
];

/// How this run starts each service: the shipped file, its address, and
/// the variables that point every service at the others and payments at
/// the sandbox. A service started again comes back on the same address
/// and database.
struct Launch {
    file: PathBuf,
    addrs: Vec<(&'static str, String)>,
    vars: Vec<(String, String)>,
}

impl Launch {
    fn addr(&self, name: &str) -> &str {
        &self.addrs.iter().find(|(n, _)| *n == name).unwrap().1
    }

    async fn start(&self, world: &World, name: &str) -> Running {
        let mut owned = self.vars.clone();
        owned.push((
            format!("TIERGATE_{}_LISTEN", name.to_uppercase()),
            self.addr(name).to_owned(),
        ));
        let env: Vec<(&str, &str)> = owned
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let file = Some(self.file.as_path());
        match name {
            "users" => {
                let mut us = world.settings_from::<users::UsersService>(file, &env).await;
                us.service.argon2_memory_kib = 8192;
                us.service.argon2_iterations = 1;
                // The clock jumps a month ahead while tokens are signed on the
                // system's time: a rotation on the moved clock would retire
                // keys the system's time still signs with. Rotation is
                // tested on its own (users::keys tests).
                us.service.rotate_signing_key_after = std::time::Duration::from_secs(365 * 86_400);
                world.start::<users::UsersService>(us)
            }
            "billing" => world.start::<billing::BillingService>(
                world
                    .settings_from::<billing::BillingService>(file, &env)
                    .await,
            ),
            "payments" => world.start::<payments::PaymentsService>(
                world
                    .settings_from::<payments::PaymentsService>(file, &env)
                    .await,
            ),
            "subscriptions" => world.start::<subscriptions::SubscriptionsService>(
                world
                    .settings_from::<subscriptions::SubscriptionsService>(file, &env)
                    .await,
            ),
            "notifications" => {
                let mut ns = world
                    .settings_from::<notifications::NotificationsService>(file, &env)
                    .await;
                ns.service.queue.backoff = std::time::Duration::from_millis(100);
                ns.service.queue.max_backoff = std::time::Duration::from_millis(400);
                world.start::<notifications::NotificationsService>(ns)
            }
            other => panic!("no service {other}"),
        }
    }
}

/// Everything of one run.
struct Product {
    world: World,
    launch: Launch,
    running: Vec<(&'static str, Option<Running>)>,
    sandbox: RunningSandbox,
    gw: TestGateway,
}

/// The shipped gateway config below its listeners, with this run's
/// addresses for the standard ports.
fn shipped_gateway(launch: &Launch) -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    let text = std::fs::read_to_string(format!("{root}/conf/tiergate.yaml")).unwrap();
    let mut body = text[text
        .find("\nupstreams:")
        .expect("the shipped config has upstreams")..]
        .to_owned();
    for (port, name) in ["8021", "8022", "8023", "8024", "8025"].iter().zip(NAMES) {
        body = body.replace(&format!("127.0.0.1:{port}"), launch.addr(name));
    }
    body
}

async fn product(db: Database) -> Product {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn,pingora_core=off")
        .with_test_writer()
        .try_init();
    let world = World::new(db);
    let sandbox = sandbox::start(SandboxConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    })
    .unwrap();
    let addrs: Vec<(&'static str, String)> = NAMES
        .iter()
        .map(|n| (*n, format!("127.0.0.1:{}", free_port())))
        .collect();
    let mut vars: Vec<(String, String)> = addrs
        .iter()
        .map(|(n, a)| {
            (
                format!("TIERGATE_{}_URL", n.to_uppercase()),
                format!("http://{a}"),
            )
        })
        .collect();
    vars.extend(
        crate::payments::midtrans_env(&sandbox)
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v)),
    );
    let launch = Launch {
        file: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/conf/services.yaml")),
        addrs,
        vars,
    };
    let mut running = Vec::new();
    for name in NAMES {
        running.push((name, Some(launch.start(&world, name).await)));
    }
    let gw = gateway_with_env(&shipped_gateway(&launch), &world.gateway_env());
    sandbox.set_notify_url(Some(gw.url("/api/payments/webhooks/midtrans")));
    Product {
        world,
        launch,
        running,
        sandbox,
        gw,
    }
}

impl Product {
    fn base(&self) -> String {
        self.gw.url("")
    }

    /// The running service `name`.
    fn svc(&self, name: &str) -> &Running {
        self.running
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, r)| r.as_ref())
            .unwrap_or_else(|| panic!("{name} is not running"))
    }

    /// Stops service `name` (graceful: what it has committed stays).
    async fn stop_service(&mut self, name: &str) {
        let slot = self.running.iter_mut().find(|(n, _)| *n == name).unwrap();
        slot.1.take().expect("it was running").stop().await;
    }

    /// Starts service `name` again, on its address and database.
    async fn start_service(&mut self, name: &str) {
        let svc = self.launch.start(&self.world, name).await;
        let slot = self.running.iter_mut().find(|(n, _)| *n == name).unwrap();
        slot.1 = Some(svc);
    }

    /// The newest mail to `to` whose subject has `subject`, once written.
    async fn mail(&self, to: &str, subject: &str) -> Mail {
        let dir = self.world.dir.path().join("mail");
        let filter = Filter {
            to: Some(to.to_owned()),
            subject: Some(subject.to_owned()),
        };
        eventually(&format!("a mail to {to}: {subject}"), || {
            let (dir, filter) = (dir.clone(), filter.clone());
            async move { mailbox::newest(&dir, &filter).ok().flatten() }
        })
        .await
    }

    /// A fresh access token of `email` (the services check expiry on the
    /// test's clock, which jumps ahead).
    async fn login(&self, email: &str) -> String {
        let (status, pair) = post(
            &self.base(),
            "/api/auth/login",
            json!({"email": email, "password": PASSWORD}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{pair}");
        pair["access_token"].as_str().unwrap().to_owned()
    }

    /// Registers `email` through the gateway, verifies it with the link of
    /// its mail, logs in: the access token.
    async fn customer(&self, email: &str, name: &str) -> String {
        let (status, body) = post(
            &self.base(),
            "/api/auth/register",
            json!({"email": email, "password": PASSWORD, "name": name}),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let mail = self.mail(email, "Verifikasi").await;
        let link = mail.link().expect("a verification link").to_owned();
        let token = link.split("token=").nth(1).unwrap();
        let (status, body) = post(
            &self.base(),
            "/api/auth/verify-email",
            json!({"token": token}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        self.login(email).await
    }

    /// A fresh access token of `email` acting for organization `org`.
    async fn acting_for(&self, email: &str, org: &str) -> String {
        let (_, pair) = post(
            &self.base(),
            "/api/auth/login",
            json!({"email": email, "password": PASSWORD}),
        )
        .await;
        let (status, pair) = post(
            &self.base(),
            "/api/auth/switch",
            json!({"refresh_token": pair["refresh_token"], "tenant": org}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{pair}");
        pair["access_token"].as_str().unwrap().to_owned()
    }

    async fn get(&self, token: &str, path: &str) -> Value {
        let (status, body) = as_user(Method::GET, &self.base(), path, token, None).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        body
    }

    /// One request on the API as `token`: its status and the limit it was
    /// admitted under.
    async fn hit(&self, token: &str) -> (StatusCode, u64) {
        let (status, limit, _) =
            crate::common::limited_get(&self.gw.url("/api/users/me"), token).await;
        (status, limit)
    }

    /// Requests until the first 429: how many were admitted before it,
    /// and the limit it named.
    async fn until_refused(&self, token: &str, at_most: usize) -> (usize, u64) {
        for n in 0..at_most {
            let (status, limit) = self.hit(token).await;
            if status == StatusCode::TOO_MANY_REQUESTS {
                return (n, limit);
            }
            assert_eq!(status, StatusCode::OK);
        }
        panic!("no 429 within {at_most} requests");
    }

    /// Waits until requests as `token` are admitted under `limit`.
    async fn limited_at(&self, token: &str, limit: u64) {
        eventually(&format!("requests limited at {limit}/min"), || async move {
            (self.hit(token).await.1 == limit).then_some(())
        })
        .await;
    }

    /// Pays `invoice` at the sandbox by `method` (`bca_va`, `qris`).
    async fn pay(&self, token: &str, invoice: &str, method: &str, key: &str) -> Value {
        crate::subscriptions::pay_in_sandbox(
            &self.base(),
            token,
            &self.sandbox,
            invoice,
            method,
            key,
        )
        .await
    }

    /// The caller's subscription once `check` holds for it.
    async fn subscription_when(
        &self,
        token: &str,
        what: &str,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        eventually(what, || async {
            let me = self.get(token, "/api/subscriptions/me").await;
            check(&me).then_some(me)
        })
        .await
    }

    /// The next renewal invoice of the caller, once issued (the clock set
    /// into its notice period).
    async fn renewal_invoice(&self, token: &str, not: &[String]) -> Value {
        eventually("a renewal invoice", || async {
            let list = self.get(token, "/api/billing/invoices").await;
            list["invoices"].as_array().and_then(|a| {
                a.iter()
                    .find(|i| i["status"] == "open" && !not.iter().any(|n| i["id"] == n.as_str()))
                    .cloned()
            })
        })
        .await
    }

    /// How many mails to `to` have `subject` in theirs.
    fn mails(&self, to: &str, subject: &str) -> usize {
        let filter = Filter {
            to: Some(to.to_owned()),
            subject: Some(subject.to_owned()),
        };
        mailbox::all(&self.world.dir.path().join("mail"), &filter)
            .unwrap()
            .len()
    }

    /// `email` signs up and checks out PREMIUM monthly; the BCA VA payment
    /// is made, not yet paid: (the token from before paying, the invoice
    /// id, the payment).
    async fn checked_out(&self, email: &str) -> (String, String, Value) {
        let token = self.customer(email, "Sari").await;
        let (invoice, payment) = self.checkout(&token).await;
        (token, invoice, payment)
    }

    /// `token`'s caller checks out PREMIUM monthly and makes the BCA VA
    /// payment, not yet paid: the invoice id and the payment.
    async fn checkout(&self, token: &str) -> (String, Value) {
        let (status, change, _) = post_keyed(
            &self.gw.url("/api/subscriptions/checkout"),
            token,
            "c-1",
            &json!({"plan": "PREMIUM", "cycle": "monthly"}),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{change}");
        let invoice = change["invoice"]["id"].as_str().unwrap().to_owned();
        let (status, payment, _) = post_keyed(
            &self.gw.url("/api/payments"),
            token,
            "p-1",
            &json!({"invoice_id": invoice, "method": "bca_va"}),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{payment}");
        (invoice, payment)
    }

    /// The customer pays `payment` at the sandbox.
    async fn settle(&self, payment: &Value) -> Value {
        crate::subscriptions::pay_at_sandbox(&self.sandbox, payment).await
    }

    /// The clean run's end state, read from every service: the payment
    /// settled, the invoice paid, the subscription active on PREMIUM, the
    /// tier PREMIUM at users, and the gateway admitting `old` (the token
    /// from before the payment) on PREMIUM's limits.
    async fn premium_everywhere(&self, email: &str, old: &str, invoice: &str, payment: &Value) {
        let now = self.login(email).await;
        let pid = payment["id"].as_str().unwrap();
        eventually("the payment settled", || async {
            (self.get(&now, &format!("/api/payments/{pid}")).await["status"] == "settled")
                .then_some(())
        })
        .await;
        eventually("the invoice paid", || async {
            (self
                .get(&now, &format!("/api/billing/invoices/{invoice}"))
                .await["status"]
                == "paid")
                .then_some(())
        })
        .await;
        self.subscription_when(&now, "PREMIUM active", |me| {
            me["state"] == "active" && me["plan"] == "PREMIUM"
        })
        .await;
        eventually("PREMIUM at users", || async {
            let (_, me) = as_user(
                Method::GET,
                &self.svc("users").base,
                "/api/users/me",
                &now,
                None,
            )
            .await;
            (me["tier"] == "PREMIUM").then_some(())
        })
        .await;
        self.limited_at(old, 200).await;
    }

    async fn stop(self) {
        drop(self.gw);
        for (_, r) in self.running.into_iter().rev() {
            if let Some(r) = r {
                r.stop().await;
            }
        }
        drop(self.sandbox);
    }
}

both_databases! {
    /// Register → verify from the mail → FREE (10 a minute) → checkout
    /// PREMIUM monthly → pay by BCA VA in the sandbox → active, PREMIUM at
    /// users and at the gateway on the token from before the payment → the
    /// paid invoice's PDF (number, PPN, total) and the confirmation mail →
    /// the renewal invoice and its mail three days before the period ends
    /// → unpaid: past_due after the end, PREMIUM limits still → the grace
    /// ends: expired, FREE limits on the next request, the ended mail.
    async fn test_register_pay_renew_lapse(db: Database) {
        let p = product(db).await;
        let ann = p.customer("ann@example.com", "Ann").await;
        assert_eq!(p.until_refused(&ann, 20).await, (10, 10), "FREE: 10 a minute");

        let plans: Value = client().get(p.gw.url("/api/subscriptions/plans")).send().await.unwrap().json().await.unwrap();
        let premium = plans["plans"].as_array().unwrap().iter().find(|x| x["name"] == "PREMIUM").unwrap().clone();
        assert_eq!(premium["prices"][0]["total"], 276_390, "{premium}");
        let (status, change, _) = post_keyed(&p.gw.url("/api/subscriptions/checkout"), &ann, "c-1",
            &json!({"plan": "PREMIUM", "cycle": "monthly"})).await;
        assert_eq!(status, StatusCode::CREATED, "{change}");
        let invoice = change["invoice"]["id"].as_str().unwrap().to_owned();
        let number = change["invoice"]["number"].as_str().unwrap().to_owned();
        p.pay(&ann, &invoice, "bca_va", "p-1").await;

        let me = p.subscription_when(&ann, "PREMIUM active", |me| me["state"] == "active" && me["plan"] == "PREMIUM").await;
        // At the users service itself: through the gateway FREE's minute is spent.
        eventually("PREMIUM at users", || async {
            let (_, me) = as_user(Method::GET, &p.svc("users").base, "/api/users/me", &ann, None).await;
            (me["tier"] == "PREMIUM").then_some(())
        })
        .await;
        p.limited_at(&ann, 200).await;
        let (admitted, limit) = p.until_refused(&ann, 400).await;
        assert!(admitted >= 199 && limit == 200, "PREMIUM: 200 a minute on the same token ({admitted}, {limit})");

        let paid = p.get(&ann, &format!("/api/billing/invoices/{invoice}")).await;
        assert_eq!((paid["status"].as_str(), paid["total"].as_i64(), paid["ppn"].as_i64()), (Some("paid"), Some(276_390), Some(27_390)), "{paid}");
        let pdf = client().get(p.gw.url(&format!("/api/billing/invoices/{invoice}/pdf"))).bearer_auth(&ann).send().await.unwrap().bytes().await.unwrap();
        let text = crate::billing::pdf_text(&p.world, &pdf);
        for want in [number.as_str(), "PPN 12%", "Rp 27.390", "Rp 276.390", "Lunas"] {
            assert!(text.contains(want), "{want} not in the PDF:\n{text}");
        }
        let receipt = p.mail("ann@example.com", "Pembayaran diterima").await;
        assert!(receipt.subject.contains(&number), "{}", receipt.subject);
        assert_eq!(receipt.attachments.len(), 1, "{:?}", receipt.attachments);
        p.mail("ann@example.com", "PREMIUM sudah aktif").await;

        // The renewal: invoiced three days before the period ends.
        let end = me["period_end"].as_i64().unwrap();
        // `ann` stays the token from before the payment, for the gateway;
        // the services, on the moved clock, get a fresh one.
        p.world.clock.set(end - 3 * DAY + 60_000);
        let now = p.login("ann@example.com").await;
        let renewal = p.renewal_invoice(&now, std::slice::from_ref(&invoice)).await;
        let renewal_number = renewal["number"].as_str().unwrap().to_owned();
        p.mail("ann@example.com", &format!("Tagihan {renewal_number}")).await;

        // Not paid: past due after the end, the tier kept.
        p.world.clock.set(end + 1_000);
        let now = p.login("ann@example.com").await;
        p.subscription_when(&now, "past_due", |me| me["state"] == "past_due").await;
        p.mail("ann@example.com", "belum dibayar").await;
        assert_eq!(p.hit(&ann).await.1, 200, "past due keeps PREMIUM's limits");

        // The grace (3 days, shipped) ends: expired, FREE on the next request.
        p.world.clock.set(end + 3 * DAY + 1_000);
        let now = p.login("ann@example.com").await;
        p.subscription_when(&now, "expired", |me| me["state"] == "expired").await;
        p.limited_at(&ann, 10).await;
        p.mail("ann@example.com", "telah berakhir").await;
        p.stop().await;
    }
}

both_databases! {
    /// The second run: the renewal is paid by QRIS before the period ends;
    /// the next period starts where the last one ended, the tier never
    /// leaves PREMIUM at users or at the gateway.
    async fn test_a_renewal_paid_by_qris_stays_premium(db: Database) {
        let p = product(db).await;
        let ann = p.customer("budi@example.com", "Budi").await;
        let (status, change, _) = post_keyed(&p.gw.url("/api/subscriptions/checkout"), &ann, "c-1",
            &json!({"plan": "PREMIUM", "cycle": "monthly"})).await;
        assert_eq!(status, StatusCode::CREATED, "{change}");
        let invoice = change["invoice"]["id"].as_str().unwrap().to_owned();
        p.pay(&ann, &invoice, "bca_va", "p-1").await;
        let me = p.subscription_when(&ann, "PREMIUM active", |me| me["state"] == "active").await;
        p.limited_at(&ann, 200).await;

        let end = me["period_end"].as_i64().unwrap();
        p.world.clock.set(end - 3 * DAY + 60_000);
        let now = p.login("budi@example.com").await;
        let renewal = p.renewal_invoice(&now, std::slice::from_ref(&invoice)).await;
        let renewal_id = renewal["id"].as_str().unwrap().to_owned();
        let payment = p.pay(&now, &renewal_id, "qris", "p-2").await;
        assert_eq!(payment["method"], "qris", "{payment}");
        let renewed = p.subscription_when(&now, "the next period", |me| me["period_start"] == end).await;
        assert_eq!((renewed["state"].as_str(), renewed["plan"].as_str()), (Some("active"), Some("PREMIUM")), "{renewed}");
        let paid = p.get(&now, &format!("/api/billing/invoices/{renewal_id}")).await;
        assert_eq!(paid["status"], "paid", "{paid}");

        // Past the first period's end: still PREMIUM everywhere.
        p.world.clock.set(end + 1_000);
        let now = p.login("budi@example.com").await;
        let me = p.get(&now, "/api/subscriptions/me").await;
        assert_eq!((me["state"].as_str(), me["tier"].as_str()), (Some("active"), Some("PREMIUM")), "{me}");
        let (_, at_users) = as_user(Method::GET, &p.svc("users").base, "/api/users/me", &now, None).await;
        assert_eq!(at_users["tier"], "PREMIUM", "{at_users}");
        assert_eq!(p.hit(&ann).await.1, 200);
        p.stop().await;
    }
}

both_databases! {
    /// The third run, for a team: the owner of an organization (with its
    /// NPWP) checks out ENTERPRISE acting for it and pays; the invoice is
    /// the company's, and both members' tokens acting for the organization
    /// draw from one ENTERPRISE budget of 1000 a minute: once the team has
    /// spent it, either member gets the 429 that names the shared budget.
    async fn test_a_team_on_enterprise_shares_one_budget(db: Database) {
        let p = product(db).await;
        let owner = p.customer("owner@acme.test", "Owner").await;
        let member = p.customer("member@acme.test", "Member").await;
        let (status, org, _) = post_keyed(&p.gw.url("/api/orgs"), &owner, "o-1", &json!({"name": "Acme Indonesia",
            "company": {"legal_name": "PT Acme Indonesia", "npwp": "01.234.567.8-901.000", "address": "Jl. Sudirman 1, Jakarta"}})).await;
        assert_eq!(status, StatusCode::CREATED, "{org}");
        let acme = org["id"].as_str().unwrap().to_owned();
        let (status, body, _) = post_keyed(&p.gw.url(&format!("/api/orgs/{acme}/invitations")), &owner, "i-1",
            &json!({"email": "member@acme.test", "role": "member"})).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let invitation = p.mail("member@acme.test", "diundang").await;
        let link = invitation.link().expect("an invitation link").to_owned();
        let (status, body, _) = post_keyed(&p.gw.url("/api/orgs/invitations/accept"), &member, "a-1",
            &json!({"token": link.split("token=").nth(1).unwrap()})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        // Both act for the organization (a refresh token switches).
        let (owner_t, member_t) = (p.acting_for("owner@acme.test", &acme).await, p.acting_for("member@acme.test", &acme).await);

        let (status, change, _) = post_keyed(&p.gw.url("/api/subscriptions/checkout"), &owner_t, "c-1",
            &json!({"plan": "ENTERPRISE", "cycle": "monthly"})).await;
        assert_eq!(status, StatusCode::CREATED, "{change}");
        let invoice = change["invoice"]["id"].as_str().unwrap().to_owned();
        p.pay(&owner_t, &invoice, "bca_va", "p-1").await;
        p.subscription_when(&owner_t, "ENTERPRISE active", |me| me["state"] == "active" && me["plan"] == "ENTERPRISE").await;
        p.limited_at(&member_t, 1000).await;

        let pdf = client().get(p.gw.url(&format!("/api/billing/invoices/{invoice}/pdf"))).bearer_auth(&member_t)
            .send().await.unwrap().bytes().await.unwrap();
        let text = crate::billing::pdf_text(&p.world, &pdf);
        // The NPWP as the 16-digit form the tax office uses now.
        for want in ["PT Acme Indonesia", "NPWP 0012345678901000", "Rp 2.218.890"] {
            assert!(text.contains(want), "{want} not in the PDF:\n{text}");
        }

        // The two spend one budget, four connections each, until refused.
        let mut spenders = tokio::task::JoinSet::new();
        for i in 0..8 {
            let token = if i % 2 == 0 { owner_t.clone() } else { member_t.clone() };
            let url = p.gw.url("/api/users/me");
            spenders.spawn(async move {
                let c = client();
                let mut admitted = 0usize;
                loop {
                    let r = c.get(&url).bearer_auth(&token).send().await.unwrap();
                    if r.status() == StatusCode::TOO_MANY_REQUESTS {
                        return (admitted, r.json::<Value>().await.unwrap());
                    }
                    assert_eq!(r.status(), StatusCode::OK);
                    admitted += 1;
                    assert!(admitted < 2000, "no 429 after {admitted} requests");
                }
            });
        }
        let mut admitted = 0;
        let mut refused = Value::Null;
        while let Some(r) = spenders.join_next().await {
            let (n, body) = r.unwrap();
            admitted += n;
            refused = body;
        }
        assert!(admitted >= 999, "the team's budget is 1000 a minute; {admitted} admitted");
        // Two budgets of their own would have let about 2000 through.
        assert!(admitted < 1500, "one budget for the team; {admitted} admitted");
        assert!(refused["error"]["message"].as_str().unwrap().contains("organization"), "{refused}");
        p.stop().await;
    }
}

both_databases! {
    /// Billing is down while the payment settles: the payment is settled
    /// at payments, nothing else moves; billing comes back, marks the
    /// invoice paid from the queued event, and the subscription activates
    /// then: the clean run's end state.
    async fn test_billing_down_while_the_payment_settles(db: Database) {
        let mut p = product(db).await;
        let (old, invoice, payment) = p.checked_out("sari@example.com").await;
        p.stop_service("billing").await;
        p.settle(&payment).await;
        let now = p.login("sari@example.com").await;
        let pid = payment["id"].as_str().unwrap();
        eventually("the payment settled", || async {
            (p.get(&now, &format!("/api/payments/{pid}")).await["status"] == "settled").then_some(())
        })
        .await;
        assert_eq!(p.get(&now, "/api/subscriptions/me").await["state"], "pending");
        p.start_service("billing").await;
        p.premium_everywhere("sari@example.com", &old, &invoice, &payment).await;
        p.stop().await;
    }
}

both_databases! {
    /// Users is down while the subscription activates: the subscription is
    /// active, the tier waits; users comes back, applies it from the queued
    /// event, and the gateway's feed brings it to the old token.
    async fn test_users_down_while_the_subscription_activates(db: Database) {
        let mut p = product(db).await;
        let (old, invoice, payment) = p.checked_out("sari@example.com").await;
        let now = p.login("sari@example.com").await;
        p.stop_service("users").await;
        p.settle(&payment).await;
        p.subscription_when(&now, "active while users is down", |me| me["state"] == "active").await;
        p.start_service("users").await;
        p.premium_everywhere("sari@example.com", &old, &invoice, &payment).await;
        p.stop().await;
    }
}

both_databases! {
    /// Notifications is down for the whole run after the sign-up: the loop
    /// ends as it does clean, and when notifications comes back every
    /// message of the run arrives, once each.
    async fn test_notifications_down_for_the_whole_run(db: Database) {
        let mut p = product(db).await;
        let token = p.customer("sari@example.com", "Sari").await;
        p.stop_service("notifications").await;
        let (invoice, payment) = p.checkout(&token).await;
        let number = payment["invoice_number"].as_str().unwrap().to_owned();
        p.settle(&payment).await;
        p.premium_everywhere("sari@example.com", &token, &invoice, &payment).await;
        assert_eq!(p.mails("sari@example.com", &number), 0, "nothing sent while it is down");

        p.start_service("notifications").await;
        let subjects = [format!("Tagihan {number}"), format!("Cara membayar {number}"),
            format!("Pembayaran diterima: {number}"), "PREMIUM sudah aktif".to_owned()];
        for subject in &subjects {
            p.mail("sari@example.com", subject).await;
        }
        for subject in &subjects {
            assert_eq!(p.mails("sari@example.com", subject), 1, "{subject}: once");
        }
        p.stop().await;
    }
}

both_databases! {
    /// The Midtrans notification never arrives: the payments janitor asks
    /// Midtrans a minute later, settles the payment, and the loop ends as
    /// it does clean.
    async fn test_the_janitor_settles_a_payment_whose_webhook_never_came(db: Database) {
        let p = product(db).await;
        let (old, invoice, payment) = p.checked_out("sari@example.com").await;
        p.sandbox.set_notify_url(None);
        assert_eq!(p.settle(&payment).await["deliveries"], json!([]));
        p.world.clock.advance(std::time::Duration::from_secs(61));
        p.premium_everywhere("sari@example.com", &old, &invoice, &payment).await;
        p.stop().await;
    }
}

both_databases! {
    /// The payments process is killed right after the sandbox settles:
    /// `tiergate serve payments` (a real process on payments' address and
    /// database) aborts while applying Midtrans's notification, before its
    /// commit, so nothing of it is kept and the notification failed. Payments
    /// comes back; the janitor asks Midtrans a minute later and settles it;
    /// the loop ends as it does clean, billed once.
    async fn test_payments_killed_right_after_the_sandbox_settles(db: Database) {
        let mut p = product(db).await;
        let (old, invoice, payment) = p.checked_out("sari@example.com").await;
        // The same service as a process of its own, told to die at its
        // next state change: the notification's.
        p.stop_service("payments").await;
        let mut env: Vec<(&str, String)> = p.launch.vars.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let url = p.world.db.url_for("payments", p.world.dir.path()).await;
        env.push(("TIERGATE_PAYMENTS_DATABASE_URL", url));
        env.push(("TIERGATE_PAYMENTS_FAILPOINTS", "apply.before_commit=abort".to_owned()));
        let shipped = std::fs::read_to_string(&p.launch.file).unwrap();
        let addr = p.launch.addr("payments").to_owned();
        let mut child = crate::platform::serve_process(&p.world, "payments", &shipped, &addr, &env).await;

        let answer = p.settle(&payment).await;
        assert_ne!(answer["deliveries"], json!([200]), "the notification was not taken: {answer}");
        let status = eventually("the payments process dead", || {
            let s = child.try_wait().unwrap();
            async move { s }
        })
        .await;
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(6), "aborted at the fail point: {status}");

        p.start_service("payments").await;
        let now = p.login("sari@example.com").await;
        let pid = payment["id"].as_str().unwrap();
        assert_eq!(p.get(&now, &format!("/api/payments/{pid}")).await["status"], "pending", "nothing of the dead apply was kept");
        p.world.clock.advance(std::time::Duration::from_secs(61));
        p.premium_everywhere("sari@example.com", &old, &invoice, &payment).await;
        let invoices = p.get(&now, "/api/billing/invoices").await;
        assert_eq!(invoices["invoices"].as_array().unwrap().len(), 1, "billed once: {invoices}");
        p.stop().await;
    }
}
