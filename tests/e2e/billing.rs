//! The billing service with the users service beside it, on SQLite and
//! PostgreSQL: invoices created once per reference, numbered gaplessly at
//! issue (also under 200 concurrent issues, and when an issue fails after
//! taking its number), PPN, the PDF read back with poppler, payments
//! recorded from payment events (partial, paid, duplicate, overpaid),
//! credit notes, voiding, and isolation between subjects.

use std::process::Command;

use backend_common::calendar::BusinessCalendar;
use backend_common::failpoint::Failpoints;
use backend_common::service_auth::ServiceKeys;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::common::client;
use crate::platform::{as_service, as_user, both_databases, send, Database, Inbox, Running, World};
use crate::users::{settings as users_settings, signed_up};

struct Billing {
    world: World,
    inbox: Inbox,
    users: Running,
    billing: Running,
    subscriptions: ServiceKeys,
    payments: ServiceKeys,
}

async fn start(db: Database, failpoints: &str) -> Billing {
    start_with(db, failpoints, |_| {}).await
}

/// [`start`], with billing's settings changed by `tune` first.
async fn start_with(
    db: Database,
    failpoints: &str,
    tune: impl FnOnce(&mut backend_common::config::Settings<billing::BillingConfig>),
) -> Billing {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_test_writer()
        .try_init();
    let world = World::new(db);
    let inbox = Inbox::start().await;
    let users = world.start::<users::UsersService>(
        users_settings(&world, inbox.subscribers("notifications")).await,
    );
    let mut settings = billing_settings(&world, &inbox, &users, failpoints).await;
    tune(&mut settings);
    let billing = world.start::<billing::BillingService>(settings);
    Billing {
        subscriptions: world.keys_of("subscriptions"),
        payments: world.keys_of("payments"),
        world,
        inbox,
        users,
        billing,
    }
}

async fn billing_settings(
    world: &World,
    inbox: &Inbox,
    users: &Running,
    failpoints: &str,
) -> backend_common::config::Settings<billing::BillingConfig> {
    let mut s = world.settings::<billing::BillingService>(&[]).await;
    s.shared.events = inbox.subscribers("notifications");
    s.shared.peers.insert("users".into(), users.base.clone());
    s.service.failpoints = Failpoints::parse(failpoints).unwrap();
    s
}

impl Billing {
    /// Stops billing and starts it again on the same database.
    async fn restart(self) -> Self {
        let Billing {
            world,
            inbox,
            users,
            billing,
            subscriptions,
            payments,
        } = self;
        billing.stop().await;
        let settings = billing_settings(&world, &inbox, &users, "").await;
        let billing = world.start::<billing::BillingService>(settings);
        Billing {
            world,
            inbox,
            users,
            billing,
            subscriptions,
            payments,
        }
    }

    async fn create(&self, body: Value) -> (StatusCode, Value) {
        as_service(
            &self.subscriptions,
            Method::POST,
            ("billing", &self.billing),
            "/internal/invoices",
            Some(body),
        )
        .await
    }

    async fn payment(&self, kind: &str, id: &str, invoice: &str, amount: i64) -> Value {
        let event = json!({"id": uuid::Uuid::now_v7().to_string(), "type": kind, "source": "payments",
            "occurred_at": self.world.clock.now_ms(),
            "data": {"payment_id": id, "invoice_id": invoice, "amount": amount, "method": "bca_va",
                     "user_id": "u", "subject": {"kind": "user", "id": "u"}}});
        let (status, body) = as_service(
            &self.payments,
            Method::POST,
            ("billing", &self.billing),
            "/internal/events",
            Some(event),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    async fn invoice(&self, id: &str) -> Value {
        let (status, body) = as_service(
            &self.payments,
            Method::GET,
            ("billing", &self.billing),
            &format!("/internal/invoices/{id}"),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    async fn stop(self) {
        self.billing.stop().await;
        self.users.stop().await;
    }
}

fn user_of(pair: &Value) -> (String, String) {
    let access = pair["access_token"].as_str().unwrap().to_owned();
    let id = crate::users::claims_of(&access)["sub"]
        .as_str()
        .unwrap()
        .to_owned();
    (id, access)
}

fn renewal(user: &str, period_start: i64) -> Value {
    json!({
        "reference": {"kind": "renewal", "subscription_id": "sub-1", "period_start": period_start},
        "subject": {"kind": "user", "id": user},
        "user_id": user,
        "plan": "BASIC", "cycle": "monthly",
        "lines": [
            {"description": "BASIC, bulanan", "quantity": 1, "unit_price": 249_000},
            {"description": "Kredit sisa periode PREMIUM", "quantity": 1, "unit_price": -66_400}
        ]
    })
}

/// The text of a PDF (poppler's `pdftotext`).
pub(crate) fn pdf_text(world: &World, pdf: &[u8]) -> String {
    let path = world
        .dir
        .path()
        .join(format!("{}.pdf", uuid::Uuid::now_v7()));
    std::fs::write(&path, pdf).unwrap();
    let out = Command::new("pdftotext")
        .args(["-layout"])
        .arg(&path)
        .arg("-")
        .output()
        .expect("pdftotext (poppler-utils) is installed by scripts/test");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Renders page 1 to PNG (`pdftoppm`) and counts the pixels that are not
/// white.
fn inked_pixels(world: &World, pdf: &[u8]) -> usize {
    let dir = world.dir.path().join("pages");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("invoice.pdf");
    std::fs::write(&path, pdf).unwrap();
    let out = Command::new("pdftoppm")
        .args(["-f", "1", "-l", "1", "-r", "40", "-gray"])
        .arg(&path)
        .arg(dir.join("page"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pgm = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(Result::ok)
        .find(|e| e.file_name().to_string_lossy().starts_with("page"))
        .unwrap()
        .path();
    let bytes = std::fs::read(pgm).unwrap();
    // P5 header: magic, width, height, max value, then one byte a pixel.
    let mut fields = 0;
    let mut at = 0;
    while fields < 4 {
        while bytes[at].is_ascii_whitespace() {
            at += 1;
        }
        while !bytes[at].is_ascii_whitespace() {
            at += 1;
        }
        fields += 1;
    }
    bytes[at + 1..].iter().filter(|&&b| b < 200).count()
}

pub(crate) async fn get_pdf(base: &str, path: &str, token: &str) -> (StatusCode, String, Vec<u8>) {
    let r = client()
        .get(format!("{base}{path}"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let kind = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, kind, r.bytes().await.unwrap().to_vec())
}

both_databases! {
    /// An invoice from a renewal: created once per reference, numbered at
    /// issue, PPN on 11/12, a PDF with the number, totals and buyer; paid
    /// by payment events (partial, full, duplicate, overpaid); credited;
    /// never voided once paid; invisible to another subject.
    async fn test_an_invoice_from_creation_to_credit_note(db: Database) {
        let b = start(db, "").await;
        let (ann, ann_token) = user_of(&signed_up(&b.users.base, &b.inbox, "ann@example.com").await);
        let (_, bob_token) = user_of(&signed_up(&b.users.base, &b.inbox, "bob@example.com").await);
        let (_, root_token) = user_of(&signed_up(&b.users.base, &b.inbox, "root@example.com").await);
        let period = b.world.clock.now_ms();

        let (status, inv) = b.create(renewal(&ann, period)).await;
        assert_eq!(status, StatusCode::CREATED, "{inv}");
        // 249.000 − 66.400 = 182.600; DPP round(182.600 × 11/12) = 167.383;
        // PPN round(167.383 × 12%) = 20.086; total 202.686.
        assert_eq!((inv["subtotal"].as_i64(), inv["dpp"].as_i64(), inv["ppn"].as_i64(), inv["total"].as_i64()),
            (Some(182_600), Some(167_383), Some(20_086), Some(202_686)), "{inv}");
        let date = BusinessCalendar::jakarta().date(inv["issued_at"].as_i64().unwrap()).unwrap();
        let number = format!("INV/{:04}/{:02}/000001", date.year(), date.month());
        assert_eq!(inv["number"], number.as_str());
        assert_eq!((inv["status"].as_str(), inv["amount_due"].as_i64()), (Some("open"), Some(202_686)));
        assert_eq!((inv["buyer"]["email"].as_str(), inv["buyer"]["name"].as_str()), (Some("ann@example.com"), Some("Ann")));
        let id = inv["id"].as_str().unwrap().to_owned();
        let issued = b.inbox.wait_for("invoice.issued", "invoice_id", &id).await;
        assert_eq!((issued["data"]["number"].as_str(), issued["data"]["total"].as_i64()), (Some(number.as_str()), Some(202_686)));
        assert_eq!(issued["data"]["subject"], json!({"kind": "user", "id": ann}));
        assert_eq!(issued["data"]["reference"]["kind"], "renewal");

        // The same reference: the same invoice; other contents: 409; a
        // caller that may not create invoices: 403.
        let (status, again) = b.create(renewal(&ann, period)).await;
        assert_eq!((status, again["id"].as_str()), (StatusCode::OK, Some(id.as_str())));
        let mut changed = renewal(&ann, period);
        changed["lines"][0]["unit_price"] = json!(1);
        let (status, body) = b.create(changed).await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("reference_conflict")));
        let (status, _) = as_service(&b.payments, Method::POST, ("billing", &b.billing), "/internal/invoices", Some(renewal(&ann, period + 1))).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        let mut bad = renewal(&ann, period + 2);
        bad["lines"] = json!([{"description": "x", "unit_price": -5}]);
        let (status, body) = b.create(bad).await;
        assert_eq!((status, body["error"]["fields"][0]["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("lines")));

        // The buyer's list and PDF; another subject sees nothing.
        let base = &b.billing.base;
        let (status, mine) = as_user(Method::GET, base, "/api/billing/invoices", &ann_token, None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(mine["invoices"].as_array().unwrap().len(), 1, "{mine}");
        let (_, theirs) = as_user(Method::GET, base, "/api/billing/invoices", &bob_token, None).await;
        assert_eq!(theirs["invoices"], json!([]));
        for path in [format!("/api/billing/invoices/{id}"), format!("/api/billing/invoices/{id}/pdf")] {
            let (status, _) = as_user(Method::GET, base, &path, &bob_token, None).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        }
        let (status, kind, pdf) = get_pdf(base, &format!("/api/billing/invoices/{id}/pdf"), &ann_token).await;
        assert_eq!((status, kind.as_str()), (StatusCode::OK, "application/pdf"));
        let text = pdf_text(&b.world, &pdf);
        for want in [number.as_str(), "Rp 182.600", "Rp 167.383", "Rp 20.086", "Rp 202.686", "ann@example.com", "Ann", "Belum dibayar", "PPN 12%"] {
            assert!(text.contains(want), "{want} missing from the PDF:\n{text}");
        }
        assert!(!text.contains("LUNAS"));
        assert!(inked_pixels(&b.world, &pdf) > 500, "page 1 is not blank");
        let (_, _, again) = get_pdf(base, &format!("/api/billing/invoices/{id}/pdf"), &ann_token).await;
        assert_eq!(again, pdf, "the same invoice, the same bytes");

        // Payments: partial, then the rest; a redelivery changes nothing;
        // a second payment of a paid invoice is an overpayment.
        assert_eq!(b.payment("payment.settled", "pay-1", &id, 100_000).await["status"], "applied");
        let partial = b.invoice(&id).await;
        assert_eq!((partial["status"].as_str(), partial["amount_paid"].as_i64(), partial["amount_due"].as_i64()),
            (Some("open"), Some(100_000), Some(102_686)));
        assert_eq!(b.payment("payment.settled", "pay-2", &id, 102_686).await["status"], "applied");
        assert_eq!(b.payment("payment.settled", "pay-2", &id, 102_686).await["status"], "stale", "the same payment, re-sent");
        let paid = b.invoice(&id).await;
        assert_eq!((paid["status"].as_str(), paid["amount_due"].as_i64(), paid["payment_method"].as_str()),
            (Some("paid"), Some(0), Some("bca_va")));
        let event = b.inbox.wait_for("invoice.paid", "invoice_id", &id).await;
        assert_eq!(event["data"]["amount_paid"], 202_686);
        b.payment("payment.settled", "pay-3", &id, 202_686).await;
        let (status, over) = as_user(Method::GET, base, "/api/admin/billing/overpayments", &root_token, None).await;
        assert_eq!(status, StatusCode::OK, "{over}");
        assert_eq!((over["overpayments"][0]["payment_id"].as_str(), over["overpayments"][0]["amount"].as_i64()),
            (Some("pay-3"), Some(202_686)));
        let paid_events = b.inbox.events().into_iter().filter(|e| e["type"] == "invoice.paid" && e["data"]["invoice_id"] == id.as_str()).count();
        assert_eq!(paid_events, 1, "never two invoice.paid for one invoice");
        // A refund of the overpayment resolves it.
        b.payment("payment.refunded", "pay-3", &id, 202_686).await;
        let (_, over) = as_user(Method::GET, base, "/api/admin/billing/overpayments", &root_token, None).await;
        assert_eq!(over["overpayments"][0]["status"], "refunded");
        // A payment of an invoice billing does not know is kept for
        // reconciliation, not lost.
        assert_eq!(b.payment("payment.settled", "pay-x", "no-such-invoice", 5).await["status"], "applied");

        let (status, kind, pdf) = get_pdf(base, &format!("/api/billing/invoices/{id}/pdf"), &ann_token).await;
        assert_eq!((status, kind.as_str()), (StatusCode::OK, "application/pdf"));
        let text = pdf_text(&b.world, &pdf);
        for want in ["LUNAS", "Lunas", "BCA Virtual Account"] {
            assert!(text.contains(want), "{want} missing from the paid PDF:\n{text}");
        }

        // The Faktur Pajak serial from Coretax: validated, printed, set once
        // (a replacement says so).
        let nsfp = format!("/api/admin/invoices/{id}/nsfp");
        let (status, body) = as_user(Method::POST, base, &nsfp, &root_token, Some(json!({"nsfp": "123"}))).await;
        assert_eq!((status, body["error"]["fields"][0]["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("nsfp")));
        let (status, body) = as_user(Method::POST, base, &nsfp, &root_token, Some(json!({"nsfp": "040.025-00000000123"}))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let (status, _) = as_user(Method::POST, base, &nsfp, &root_token, Some(json!({"nsfp": "04002500000000123"}))).await;
        assert_eq!(status, StatusCode::OK, "the same serial again");
        let (status, body) = as_user(Method::POST, base, &nsfp, &root_token, Some(json!({"nsfp": "04012500000000124"}))).await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("nsfp_set")));
        let (_, _, pdf) = get_pdf(base, &format!("/api/billing/invoices/{id}/pdf"), &ann_token).await;
        let text = pdf_text(&b.world, &pdf);
        assert!(text.contains("Nomor Seri Faktur Pajak: 04002500000000123"), "{text}");
        assert!(!text.contains("Bea meterai"), "Rp 202.686 owes no stamp duty");

        // A paid invoice is credited, not voided.
        let (status, body) = as_user(Method::POST, base, &format!("/api/admin/invoices/{id}/void"), &root_token, Some(json!({"reason": "x"}))).await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("cannot_void")));
        let (status, note) = as_user(Method::POST, base, &format!("/api/admin/invoices/{id}/credit-notes"), &root_token,
            Some(json!({"amount": 101_343, "reason": "Goodwill: gangguan layanan"}))).await;
        assert_eq!(status, StatusCode::CREATED, "{note}");
        assert_eq!(note["number"], format!("CN/{:04}/000001", date.year()).as_str());
        // Half the total: PPN reversed in proportion, round(20.086 / 2).
        assert_eq!((note["ppn"].as_i64(), note["price"].as_i64()), (Some(10_043), Some(91_300)));
        let (status, body) = as_user(Method::POST, base, &format!("/api/admin/invoices/{id}/credit-notes"), &root_token,
            Some(json!({"amount": 101_344, "reason": "too much"}))).await;
        assert_eq!((status, body["error"]["fields"][0]["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("amount")));
        b.inbox.wait_for("credit_note.issued", "invoice_id", &id).await;
        let (status, _, pdf) = get_pdf(base, note["pdf_url"].as_str().unwrap(), &ann_token).await;
        assert_eq!(status, StatusCode::OK);
        let text = pdf_text(&b.world, &pdf);
        assert!(text.contains("NOTA KREDIT") && text.contains(note["number"].as_str().unwrap()) && text.contains("-Rp 101.343"), "{text}");
        let (status, _, _) = get_pdf(base, note["pdf_url"].as_str().unwrap(), &bob_token).await;
        assert_eq!(status, StatusCode::NOT_FOUND);

        // A manual invoice by an admin: the Idempotency-Key is its
        // reference; 60 lines run onto a second page.
        let lines: Vec<Value> = (1..=60).map(|i| json!({"description": format!("Konsultasi integrasi, sesi {i}"), "unit_price": 150_000})).collect();
        let manual = json!({"subject": {"kind": "user", "id": ann}, "user_id": ann, "lines": lines});
        let (status, body) = as_user(Method::POST, base, "/api/admin/invoices", &root_token, Some(manual.clone())).await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("idempotency_key_required")));
        let r = client().post(format!("{base}/api/admin/invoices")).bearer_auth(&root_token)
            .header("Idempotency-Key", "manual-1").json(&manual).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        let long: Value = r.json().await.unwrap();
        assert_eq!(long["total"], 9_000_000 + 990_000);
        let (_, _, pdf) = get_pdf(base, &format!("/api/admin/invoices/{}/pdf", long["id"].as_str().unwrap()), &root_token).await;
        let path = b.world.dir.path().join("long.pdf");
        std::fs::write(&path, &pdf).unwrap();
        let info = String::from_utf8(Command::new("pdfinfo").arg(&path).output().unwrap().stdout).unwrap();
        let pages: u32 = info.lines().find_map(|l| l.strip_prefix("Pages:")).unwrap().trim().parse().unwrap();
        assert!(pages >= 2, "{info}");
        // Paid, its receipt is over Rp 5.000.000: stamp duty is noted.
        b.payment("payment.settled", "pay-long", long["id"].as_str().unwrap(), 9_990_000).await;
        let (_, _, pdf) = get_pdf(base, &format!("/api/admin/invoices/{}/pdf", long["id"].as_str().unwrap()), &root_token).await;
        let text = pdf_text(&b.world, &pdf);
        assert!(text.contains("LUNAS") && text.contains("Bea meterai Rp 10.000"), "{text}");
        let (status, _) = as_user(Method::GET, base, "/api/admin/invoices", &ann_token, None).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "admins only");
        b.stop().await;
    }
}

both_databases! {
    /// Numbers are gapless and unique under 200 concurrent issues, and an
    /// issue that fails after taking its number gives it back.
    async fn test_numbers_have_no_gap_under_concurrency_and_failure(db: Database) {
        // The 200 issues queue on one lock (the year's counter; on SQLite
        // the write lock), so the last waits for all the others: on a
        // loaded machine longer than the default 5 s for a connection (or
        // for SQLite's lock), which answers 503. A patient pool keeps the
        // point of the test: every one of the 200 is served, none is lost.
        let b = start_with(db, "issue.after_number=error*1", |s| {
            s.acquire_timeout = std::time::Duration::from_secs(60);
        })
        .await;
        let (ann, _) = user_of(&signed_up(&b.users.base, &b.inbox, "ann@example.com").await);
        let new = |i: i64| json!({
            "reference": {"kind": "plan_change", "id": format!("chg-{i}")},
            "subject": {"kind": "user", "id": ann}, "user_id": ann,
            "lines": [{"description": "PREMIUM", "unit_price": 499_000}]
        });
        // The first issue fails after taking number 1: rolled back.
        let (status, _) = b.create(new(0)).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        // 200 drafts (created a few at a time: creating reads the buyer
        // from users), then 200 issues at once.
        use futures_util::StreamExt;
        let drafts: Vec<String> = futures_util::stream::iter(1..=200)
            .map(|i| {
                let mut body = new(i);
                body["draft"] = json!(true);
                b.create(body)
            })
            .buffer_unordered(8)
            .map(|(status, inv)| {
                assert_eq!(status, StatusCode::CREATED, "{inv}");
                assert!(inv["number"].is_null(), "a draft has no number: {inv}");
                inv["id"].as_str().unwrap().to_owned()
            })
            .collect()
            .await;
        // Every request is made (token signed, client built) before the
        // burst: made inside it, each one's connection would wait, already
        // open, while the others were made, and billing answers a head
        // that is not in within 5 s with 408.
        let c = client();
        let requests: Vec<_> = drafts.iter().map(|id| {
            c.post(b.billing.url(&format!("/internal/invoices/{id}/issue")))
                .bearer_auth(b.subscriptions.issue("billing"))
        }).collect();
        let results = futures_util::future::join_all(requests.into_iter().map(send)).await;
        let mut seqs: Vec<u32> = results.iter().map(|(status, inv)| {
            assert_eq!(*status, StatusCode::OK, "{inv}");
            inv["number"].as_str().unwrap().rsplit('/').next().unwrap().parse().unwrap()
        }).collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=200).collect::<Vec<u32>>(), "exactly 1..200, no gap, no duplicate");
        // The failed one, retried, takes the next number.
        let (status, inv) = b.create(new(0)).await;
        assert_eq!(status, StatusCode::CREATED);
        assert!(inv["number"].as_str().unwrap().ends_with("/000201"), "{inv}");
        b.stop().await;
    }
}

/// `{reference, subject, user, lines}` for one line of `price`.
fn one_line(user: &str, id: &str, price: i64) -> Value {
    json!({
        "reference": {"kind": "test", "id": id},
        "subject": {"kind": "user", "id": user},
        "user_id": user,
        "lines": [{"description": format!("Layanan {id}"), "unit_price": price}]
    })
}

both_databases! {
    /// One business day of payments reconciled (exact, partial, paid
    /// twice, no invoice; open past due a week later), closed by the daily
    /// job into its table and metric; revenue per month and per plan with
    /// MRR, as JSON and CSV.
    async fn test_reconciliation_and_revenue(db: Database) {
        let b = start(db, "").await;
        // 10 March 2030, 10:00 WIB: the whole test stays on one business day.
        b.world.clock.set(1_899_342_000_000);
        let t0 = b.world.clock.now_ms();
        let (ann, _) = user_of(&signed_up(&b.users.base, &b.inbox, "ann@example.com").await);
        let (bob, bob_token) = user_of(&signed_up(&b.users.base, &b.inbox, "bob@example.com").await);
        let (_, root) = user_of(&signed_up(&b.users.base, &b.inbox, "root@example.com").await);
        let base = &b.billing.base;
        let day = 30 * 24 * 3600 * 1000_i64;

        let created = |(status, body): (StatusCode, Value)| {
            assert_eq!(status, StatusCode::CREATED, "{body}");
            body["id"].as_str().unwrap().to_owned()
        };
        // A: BASIC monthly (recurring 249.000), total 202.686, paid exactly.
        let mut a = renewal(&ann, t0);
        a["period_end"] = json!(t0 + day);
        a["period_start"] = json!(t0);
        let a = created(b.create(a).await);
        // B: 111.000, half paid. C: 222.000, paid twice.
        let bb = created(b.create(one_line(&ann, "b", 100_000)).await);
        let c = created(b.create(one_line(&ann, "c", 200_000)).await);
        // F: Bob's PREMIUM yearly, 2.763.900, paid.
        let f = created(b.create(json!({
            "reference": {"kind": "renewal", "subscription_id": "sub-bob", "period_start": t0},
            "subject": {"kind": "user", "id": bob}, "user_id": bob,
            "plan": "PREMIUM", "cycle": "yearly", "period_start": t0, "period_end": t0 + 12 * day,
            "lines": [{"description": "PREMIUM, tahunan", "unit_price": 2_490_000}]
        })).await);
        b.payment("payment.settled", "p-a", &a, 202_686).await;
        b.payment("payment.settled", "p-b", &bb, 50_000).await;
        b.payment("payment.settled", "p-c1", &c, 222_000).await;
        b.payment("payment.settled", "p-c2", &c, 222_000).await;
        b.payment("payment.settled", "p-f", &f, 2_763_900).await;
        b.payment("payment.settled", "p-d", "no-such-invoice", 5_000).await;
        b.payment("payment.refunded", "p-a", &a, 10_000).await;
        let (status, note) = as_user(Method::POST, base, &format!("/api/admin/invoices/{a}/credit-notes"), &root,
            Some(json!({"amount": 101_343, "reason": "Goodwill"}))).await;
        assert_eq!(status, StatusCode::CREATED, "{note}");

        // The day's reconciliation.
        let (status, r) = as_user(Method::GET, base, "/api/admin/billing/reconciliation?date=2030-03-10", &root, None).await;
        assert_eq!(status, StatusCode::OK, "{r}");
        assert_eq!((r["date"].as_str(), r["zone"].as_str()), (Some("2030-03-10"), Some("Asia/Jakarta")));
        let kinds: Vec<Value> = r["mismatches"].as_array().unwrap().iter()
            .map(|m| json!([m["kind"], m["invoice_id"], m["payment_id"], m["expected"], m["actual"]]))
            .collect();
        assert_eq!(kinds.len(), 3, "{kinds:?}");
        for want in [json!(["payment_without_invoice", "no-such-invoice", "p-d", null, 5_000]),
                     json!(["amount_mismatch", bb, null, 111_000, 50_000]),
                     json!(["paid_twice", c, "p-c2", 222_000, 444_000])] {
            assert!(kinds.contains(&want), "{want} not in {kinds:?}");
        }
        let s = &r["summary"];
        assert_eq!((s["payments"].as_i64(), s["settled"].as_i64(), s["refunded"].as_i64(), s["matched_payments"].as_i64()),
            (Some(7), Some(3_465_586), Some(10_000), Some(3)), "{s}");
        assert_eq!((s["invoices_issued"].as_i64(), s["invoiced"].as_i64(), s["mismatches"].as_i64()), (Some(4), Some(3_299_586), Some(3)));
        assert_eq!(s["by_kind"], json!({"amount_mismatch": 1, "open_past_due": 0, "paid_twice": 1,
            "payment_to_void_invoice": 0, "payment_without_invoice": 1}));
        let matched: Vec<(&str, bool)> = r["payments"].as_array().unwrap().iter()
            .map(|p| (p["payment_id"].as_str().unwrap(), p["matched"].as_bool().unwrap())).collect();
        assert!(matched.contains(&("p-a", true)) && matched.contains(&("p-f", true)) && matched.contains(&("p-b", false)), "{matched:?}");
        assert_eq!(r["invoices"].as_array().unwrap().len(), 4);
        assert!(r["closed"].is_null(), "the day is not over");

        // A week on, B (due after 7 days) is open past due.
        let (_, later) = as_user(Method::GET, base, "/api/admin/billing/reconciliation?date=2030-03-18", &root, None).await;
        let kinds: Vec<(&str, &str)> = later["mismatches"].as_array().unwrap().iter()
            .map(|m| (m["kind"].as_str().unwrap(), m["invoice_id"].as_str().unwrap())).collect();
        assert_eq!(kinds, vec![("open_past_due", bb.as_str())]);
        assert_eq!(later["payments"], json!([]));

        // Revenue per month: one month, MRR 249.000 + 2.490.000 / 12.
        let (status, rev) = as_user(Method::GET, base, "/api/admin/billing/revenue?from=2030-03-01&to=2030-03-10&group=month", &root, None).await;
        assert_eq!(status, StatusCode::OK, "{rev}");
        let want = json!({"group": "2030-03", "invoices": 4, "invoiced": 3_299_586, "ppn_invoiced": 326_986,
            "voided": 0, "collected": 3_465_586, "refunded": 10_000, "ppn_collected": 315_986, "credit_notes": 1,
            "credited": 101_343, "ppn_credited": 10_043, "net": 2_881_300, "mrr": 456_500, "paying_subjects": 2});
        assert_eq!(rev["rows"], json!([want]), "{rev}");
        assert_eq!(rev["total"]["net"], 2_881_300);
        // Per plan.
        let (_, rev) = as_user(Method::GET, base, "/api/admin/billing/revenue?from=2030-03-01&to=2030-03-10&group=plan", &root, None).await;
        let rows: Vec<(&str, i64, i64, i64, i64, i64)> = rev["rows"].as_array().unwrap().iter()
            .map(|r| (r["group"].as_str().unwrap(), r["invoices"].as_i64().unwrap(), r["collected"].as_i64().unwrap(),
                      r["net"].as_i64().unwrap(), r["mrr"].as_i64().unwrap(), r["paying_subjects"].as_i64().unwrap()))
            .collect();
        assert_eq!(rows, vec![
            ("BASIC", 1, 202_686, 91_300, 249_000, 1),
            ("PREMIUM", 1, 2_763_900, 2_490_000, 207_500, 1),
            ("none", 2, 499_000, 300_000, 0, 0),
        ]);
        assert_eq!(rev["mrr_at_end"], json!([{"plan": "BASIC", "mrr": 249_000, "paying_subjects": 1},
            {"plan": "PREMIUM", "mrr": 207_500, "paying_subjects": 1}]));
        // As CSV.
        let r = client().get(format!("{base}/api/admin/billing/revenue?from=2030-03-01&to=2030-03-10"))
            .bearer_auth(&root).header("Accept", "text/csv").send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["content-type"], "text/csv; charset=utf-8");
        let csv = r.text().await.unwrap();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines, vec![
            "group,invoices,invoiced,ppn_invoiced,voided,collected,refunded,ppn_collected,credit_notes,credited,ppn_credited,net,mrr,paying_subjects",
            "2030-03,4,3299586,326986,0,3465586,10000,315986,1,101343,10043,2881300,456500,2",
            "total,4,3299586,326986,0,3465586,10000,315986,1,101343,10043,2881300,456500,2",
        ]);

        // Client mistakes are 422; non-admins 403.
        for (path, field) in [("/api/admin/billing/reconciliation?date=2030-3-1", "date"),
                              ("/api/admin/billing/revenue?from=2030-03-10&to=2030-03-01", "to"),
                              ("/api/admin/billing/revenue?group=week", "group")] {
            let (status, body) = as_user(Method::GET, base, path, &root, None).await;
            assert_eq!((status, body["error"]["fields"][0]["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some(field)), "{path}: {body}");
        }
        let (status, _) = as_user(Method::GET, base, "/api/admin/billing/revenue", &bob_token, None).await;
        assert_eq!(status, StatusCode::FORBIDDEN);

        // The day ends; an hour later the daily job closes it.
        b.world.clock.advance(std::time::Duration::from_secs(26 * 3600));
        let closed = crate::platform::eventually("the day closed", || async {
            let (_, r) = as_user(Method::GET, base, "/api/admin/billing/reconciliation?date=2030-03-10", &root, None).await;
            (!r["closed"].is_null()).then(|| r["closed"].clone())
        }).await;
        assert_eq!(closed["mismatches"], 3);
        let stored: i64 = sqlx::query_scalar("SELECT mismatches FROM reconciliations WHERE day = '2030-03-10'")
            .fetch_one(&b.world.pool("billing").await).await.unwrap();
        assert_eq!(stored, 3);
        for (kind, n) in [("paid_twice", 1.0), ("amount_mismatch", 1.0), ("open_past_due", 0.0)] {
            let line = format!("billing_reconciliation_mismatches{{kind=\"{kind}\"");
            let value = crate::platform::eventually("the gauge", || async {
                crate::platform::metric(base, &line).await.filter(|v| *v == n)
            }).await;
            assert_eq!(value, n, "{kind}");
        }
        // Restarted, the gauge shows the last closed day again.
        let b = b.restart().await;
        let base = &b.billing.base;
        crate::platform::eventually("the gauge after a restart", || async {
            crate::platform::metric(base, "billing_reconciliation_mismatches{kind=\"paid_twice\"").await.filter(|v| *v == 1.0)
        }).await;
        b.stop().await;
    }
}

/// `tiergate serve billing` in its own process against this world's
/// database and users service, with `failpoints`.
async fn serve_billing(
    world: &World,
    users: &Running,
    inbox: &Inbox,
    listen: &str,
    failpoints: &str,
) -> std::process::Child {
    let config = format!(
        "events:\n  invoice.issued: [\"{0}\"]\n  invoice.paid: [\"{0}\"]\n",
        inbox.url()
    );
    let env = [
        (
            "TIERGATE_BILLING_DATABASE_URL",
            world.db.url_for("billing", world.dir.path()).await,
        ),
        ("TIERGATE_USERS_URL", users.base.clone()),
        ("TIERGATE_BILLING_FAILPOINTS", failpoints.to_owned()),
    ];
    crate::platform::serve_process(world, "billing", &config, listen, &env).await
}

both_databases! {
    /// The process dies inside the issuing transaction (after the number
    /// and the event were written, before the commit): nothing is kept,
    /// and the retry takes number 1. It dies after the commit, before the
    /// answer: the retry gets the same invoice, never a second one. It
    /// dies recording a payment: the redelivered event pays it once.
    async fn test_a_crash_at_each_dangerous_line_loses_nothing_and_bills_nothing_twice(db: Database) {
        let world = World::new(db);
        let inbox = Inbox::start().await;
        let users = world.start::<users::UsersService>(users_settings(&world, inbox.subscribers("notifications")).await);
        let (ann, _) = user_of(&signed_up(&users.base, &inbox, "ann@example.com").await);
        let subscriptions = world.keys_of("subscriptions");
        let listen = format!("127.0.0.1:{}", crate::common::free_port());
        let url = format!("http://{listen}/internal/invoices");
        let create = |body: Value| client().post(&url).bearer_auth(subscriptions.issue("billing")).json(&body).send();
        let exits = |mut child: std::process::Child| {
            let status = child.wait().unwrap();
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(status.signal(), Some(6), "aborted at the fail point: {status}");
        };

        let child = serve_billing(&world, &users, &inbox, &listen, "issue.before_commit=abort").await;
        // The process made and migrated the database.
        let pool = world.pool("billing").await;
        let count = |sql: &'static str| {
            let pool = pool.clone();
            async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(&pool).await.unwrap() }
        };
        assert!(create(renewal(&ann, 1)).await.is_err(), "the process died mid-request");
        exits(child);
        assert_eq!(count("SELECT COUNT(*) FROM invoices").await, 0);
        assert_eq!(count("SELECT COUNT(*) FROM outbox_events").await, 0, "no event of an invoice that never was");
        assert_eq!(count("SELECT COUNT(*) FROM counters WHERE last > 0").await, 0, "the number was given back");

        let child = serve_billing(&world, &users, &inbox, &listen, "create.after_commit=abort").await;
        assert!(create(renewal(&ann, 1)).await.is_err(), "the process died before answering");
        exits(child);
        assert_eq!(count("SELECT COUNT(*) FROM invoices").await, 1, "committed");

        let mut child = serve_billing(&world, &users, &inbox, &listen, "").await;
        let r = create(renewal(&ann, 1)).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "the retry finds the committed invoice");
        assert_eq!(r.headers()["idempotent-replayed"], "true");
        let inv: Value = r.json().await.unwrap();
        assert!(inv["number"].as_str().unwrap().ends_with("/000001"), "{inv}");
        let r = create(renewal(&ann, 2)).await.unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        let next: Value = r.json().await.unwrap();
        assert!(next["number"].as_str().unwrap().ends_with("/000002"), "{next}");
        assert_eq!(count("SELECT COUNT(*) FROM invoices").await, 2);
        // Both events delivered, once each: the one committed just before
        // the crash included.
        for id in [&inv["id"], &next["id"]] {
            inbox.wait_for("invoice.issued", "invoice_id", id.as_str().unwrap()).await;
        }
        assert_eq!(inbox.count(|e| e["type"] == "invoice.issued"), 2);
        // The PDF of the invoice committed just before the crash is
        // rendered by the restarted process.
        crate::platform::eventually("the PDF rendered after the restart", || async {
            (count("SELECT COUNT(*) FROM documents").await == 2).then_some(())
        })
        .await;
        child.kill().unwrap();
        child.wait().unwrap();

        // It dies while recording a payment: the payment is not kept, the
        // redelivered event pays the invoice once.
        let payments = world.keys_of("payments");
        let id = inv["id"].as_str().unwrap();
        let event = json!({"id": uuid::Uuid::now_v7().to_string(), "type": "payment.settled", "source": "payments",
            "occurred_at": world.clock.now_ms(),
            "data": {"payment_id": "pay-1", "invoice_id": id, "amount": inv["total"], "method": "qris",
                     "user_id": ann, "subject": {"kind": "user", "id": ann}}});
        let deliver = || client().post(format!("http://{listen}/internal/events")).bearer_auth(payments.issue("billing")).json(&event).send();
        let child = serve_billing(&world, &users, &inbox, &listen, "payment.before_commit=abort").await;
        assert!(deliver().await.is_err(), "the process died mid-event");
        exits(child);
        assert_eq!(count("SELECT COUNT(*) FROM payments").await, 0);
        let mut child = serve_billing(&world, &users, &inbox, &listen, "").await;
        let r = deliver().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.json::<Value>().await.unwrap()["status"], "applied");
        let again: Value = deliver().await.unwrap().json().await.unwrap();
        assert_ne!(again["status"], "applied", "{again}");
        inbox.wait_for("invoice.paid", "invoice_id", id).await;
        assert_eq!(count("SELECT COUNT(*) FROM payments").await, 1);
        assert_eq!(inbox.count(|e| e["type"] == "invoice.paid"), 1, "paid once");
        child.kill().unwrap();
        child.wait().unwrap();
        users.stop().await;
    }
}

both_databases! {
    /// schemathesis, generating requests from billing's `/openapi.json`
    /// with an admin's token, finds no 5xx, no undocumented status, no
    /// response that breaks its schema.
    async fn test_openapi_contract_holds_under_schemathesis(db: Database) {
        let b = start(db, "").await;
        let (_, root) = user_of(&signed_up(&b.users.base, &b.inbox, "root@example.com").await);
        let url = b.billing.url("/openapi.json");
        let out = crate::users::run_schemathesis(&url, &[&format!("Authorization: Bearer {root}")]).await;
        assert!(out.0, "schemathesis found failures:\n{}", out.1);
        b.stop().await;
    }
}
