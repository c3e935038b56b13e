//! The notifications service end to end: the users service and
//! notifications on ephemeral ports, a real SMTP server (Python's
//! aiosmtpd, writing a Maildir), and the Telegram Bot API and Twilio
//! stand-ins that follow the real contracts. Events come from the real
//! users service, or are delivered as the producing service would (signed
//! with its key).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use notifications::standin::{TelegramStandin, TwilioStandin};
use notifications::NotificationsService;

use crate::common::{client, free_port};
use crate::platform::both_databases;
use crate::platform::{
    as_service, as_user, count_rows, eventually, post, serve_process, subscribers_of, Database,
    Running, World,
};
use crate::users::{settings as users_settings, token_of, PASSWORD};

const BOT_TOKEN: &str = "7001:AAH-tiergate-test-bot";
const TWILIO_SID: &str = "AC00000000000000000000000000000001";
const TWILIO_TOKEN: &str = "twilio-auth-token-test";

/// aiosmtpd on a port, delivering into a Maildir.
pub struct Smtp {
    child: Child,
    pub port: u16,
    dir: PathBuf,
}

impl Drop for Smtp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Smtp {
    /// A server on `port` writing to `dir`; returns once it accepts.
    pub async fn start_on(port: u16, dir: &Path) -> Self {
        let child = Command::new("python3")
            .args(["-m", "aiosmtpd", "-n", "-l"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["-c", "aiosmtpd.handlers.Mailbox"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 -m aiosmtpd (pip install aiosmtpd)");
        eventually("aiosmtpd listening", || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(|_| ())
        })
        .await;
        Self {
            child,
            port,
            dir: dir.to_owned(),
        }
    }

    pub async fn start(dir: &Path) -> Self {
        Self::start_on(free_port(), dir).await
    }

    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    /// Every mail received, raw.
    pub fn mails(&self) -> Vec<String> {
        mails_in(&self.dir)
    }

    /// Waits for a mail to `to` whose text contains `needle`.
    pub async fn wait_for(&self, to: &str, needle: &str) -> String {
        eventually(&format!("a mail to {to} with {needle}"), || async {
            self.mails()
                .into_iter()
                .find(|m| m.contains(&format!("X-RcptTo: {to}")) && decoded(m).contains(needle))
        })
        .await
    }
}

fn mails_in(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for sub in ["new", "cur"] {
        if let Ok(entries) = std::fs::read_dir(dir.join(sub)) {
            for e in entries.flatten() {
                if let Ok(t) = std::fs::read_to_string(e.path()) {
                    out.push(t);
                }
            }
        }
    }
    out
}

/// A mail with its quoted-printable soft breaks undone (enough to find
/// words and links in it).
fn decoded(mail: &str) -> String {
    mail.replace("=\r\n", "")
        .replace("=\n", "")
        .replace("=3D", "=")
}

/// The verification link in a mail.
fn link_in(mail: &str, page: &str) -> String {
    let text = decoded(mail);
    let start = text
        .find(&format!("/{page}?token="))
        .expect("a link in the mail");
    let rest = &text[start..];
    let end = rest
        .find(|c: char| c.is_whitespace() || c == '"' || c == '<')
        .unwrap_or(rest.len());
    format!("http://x{}", &rest[..end])
}

/// The services and stand-ins of one test.
struct Post {
    world: World,
    users: Running,
    billing: Option<Running>,
    n: Running,
    smtp: Smtp,
    tg: TelegramStandin,
    tw: TwilioStandin,
    /// Ann's access token and id.
    ann: String,
    ann_id: String,
}

impl Post {
    async fn prefs(&self, body: Value) -> Value {
        let (status, p) = as_user(
            Method::PUT,
            &self.n.base,
            "/api/notifications/preferences",
            &self.ann,
            Some(body),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{p}");
        p
    }

    /// Ann's notifications, newest first.
    async fn mine(&self) -> Vec<Value> {
        let (status, body) = as_user(
            Method::GET,
            &self.n.base,
            "/api/notifications",
            &self.ann,
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["notifications"].as_array().unwrap().clone()
    }

    /// Waits for Ann's notification of `event_type` on `channel` to be in
    /// `status`.
    async fn wait_status(&self, event_type: &str, channel: &str, status: &str) -> Value {
        eventually(&format!("{event_type} over {channel} {status}"), || async {
            self.mine().await.into_iter().find(|j| {
                j["event_type"] == event_type && j["channel"] == channel && j["status"] == status
            })
        })
        .await
    }

    /// Delivers an event as `source` would; the consumer's answer.
    async fn event(&self, source: &str, id: &str, event_type: &str, data: Value) -> Value {
        let event = json!({"id": id, "type": event_type, "source": source,
            "occurred_at": backend_common::clock::system_now_ms(), "data": data});
        let keys = self.world.keys_of(source);
        let (status, body) = as_service(
            &keys,
            Method::POST,
            ("notifications", &self.n),
            "/internal/events",
            Some(event),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    /// A `subscription.*` event for Ann.
    async fn subscription(&self, id: &str, event_type: &str) -> Value {
        let data = json!({"user_id": self.ann_id, "subject": {"kind": "user", "id": self.ann_id},
            "subscription_id": "s-1", "tier": "PREMIUM", "plan": "PREMIUM",
            "period_start": backend_common::clock::system_now_ms(),
            "period_end": backend_common::clock::system_now_ms() + 30 * 86_400_000i64});
        self.event("subscriptions", id, event_type, data).await
    }

    /// Links Ann's chat `chat` with the default bot through `/start`.
    async fn link_telegram(&self, chat: i64) {
        // 503 until the bot answered getMe (at start, in the background).
        let link = eventually("a link code", || async {
            let (status, link) = as_user(
                Method::POST,
                &self.n.base,
                "/api/notifications/telegram/link",
                &self.ann,
                None,
            )
            .await;
            (status == StatusCode::CREATED).then_some(link)
        })
        .await;
        let code = link["code"].as_str().unwrap();
        assert_eq!(
            link["deep_link"],
            format!("https://t.me/TiergateBot?start={code}")
        );
        self.tg
            .user_writes(BOT_TOKEN, chat, &format!("/start {code}"))
            .await;
        eventually("the chat linked", || async {
            let (_, links) = as_user(
                Method::GET,
                &self.n.base,
                "/api/notifications/telegram/links",
                &self.ann,
                None,
            )
            .await;
            (links["links"].as_array()?.len() == 1).then_some(())
        })
        .await;
    }

    /// Telegram messages to `chat`.
    fn telegram_to(&self, chat: i64) -> Vec<Value> {
        self.tg
            .messages()
            .into_iter()
            .filter(|m| m["chat_id"] == chat)
            .collect()
    }
}

/// Users and notifications (Telegram by long polling unless `webhook`),
/// Ann signed up through the verification mail notifications sent.
async fn post_office(db: Database, webhook: bool) -> Post {
    open_post_office(db, webhook, false).await
}

/// [`post_office`] with the billing service too, its events going to
/// notifications, which reads invoices' PDFs from it.
async fn post_office_with_billing(db: Database) -> Post {
    open_post_office(db, false, true).await
}

async fn open_post_office(db: Database, webhook: bool, with_billing: bool) -> Post {
    let world = World::new(db);
    let smtp = Smtp::start(&world.dir.path().join("maildir")).await;
    let tg = TelegramStandin::start("127.0.0.1:0".parse().unwrap()).unwrap();
    tg.add_bot(BOT_TOKEN, "TiergateBot");
    let tw =
        TwilioStandin::start("127.0.0.1:0".parse().unwrap(), TWILIO_SID, TWILIO_TOKEN).unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let base = format!("http://{listen}");
    let events = subscribers_of(&[("*", format!("{base}/internal/events"), "notifications")]);
    let users = world.start::<users::UsersService>(users_settings(&world, events.clone()).await);
    let billing = if with_billing {
        let mut bs = world.settings::<billing::BillingService>(&[]).await;
        bs.shared.peers.insert("users".into(), users.base.clone());
        bs.shared.events = events;
        Some(world.start::<billing::BillingService>(bs))
    } else {
        None
    };
    let (smtp_url, tg_url, tw_url) = (smtp.url(), tg.base(), tw.base());
    let mut env = vec![
        ("TIERGATE_NOTIFICATIONS_LISTEN", listen.as_str()),
        ("TIERGATE_SMTP_URL", smtp_url.as_str()),
        ("TIERGATE_TELEGRAM_API_URL", tg_url.as_str()),
        ("TIERGATE_TELEGRAM_BOT_TOKEN", BOT_TOKEN),
        ("TIERGATE_TWILIO_API_URL", tw_url.as_str()),
        ("TIERGATE_TWILIO_ACCOUNT_SID", TWILIO_SID),
        ("TIERGATE_TWILIO_AUTH_TOKEN", TWILIO_TOKEN),
        ("TIERGATE_TWILIO_FROM", "+15005550006"),
        ("TIERGATE_PUBLIC_URL", base.as_str()),
    ];
    if webhook {
        env.push(("TIERGATE_TELEGRAM_WEBHOOK_URL", base.as_str()));
    }
    let mut s = world.settings::<NotificationsService>(&env).await;
    s.shared.peers.insert("users".into(), users.base.clone());
    if let Some(b) = &billing {
        s.shared.peers.insert("billing".into(), b.base.clone());
    }
    s.service.queue.backoff = Duration::from_millis(100);
    s.service.queue.max_backoff = Duration::from_millis(400);
    let n = world.start::<NotificationsService>(s);
    // Ann signs up: the verification link comes from the mail.
    let (ann_id, pair) = sign_up(&users.base, &smtp, "ann@example.com").await;
    Post {
        ann: pair["access_token"].as_str().unwrap().to_owned(),
        ann_id,
        world,
        users,
        billing,
        n,
        smtp,
        tg,
        tw,
    }
}

/// Registers `email`, verifies it with the link of the mail notifications
/// sent, logs in: the user's id and token pair.
async fn sign_up(users: &str, smtp: &Smtp, email: &str) -> (String, Value) {
    let (status, user) = post(
        users,
        "/api/auth/register",
        json!({"email": email, "password": PASSWORD, "name": "Ann <Tester>"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{user}");
    let mail = smtp.wait_for(email, "/verify-email?token=").await;
    let link = link_in(&mail, "verify-email");
    let (status, body) = post(
        users,
        "/api/auth/verify-email",
        json!({"token": token_of(&json!(link))}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, pair) = post(
        users,
        "/api/auth/login",
        json!({"email": email, "password": PASSWORD}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{pair}");
    (user["id"].as_str().unwrap().to_owned(), pair)
}

both_databases! {
    /// Registration: the users service's event becomes a real mail over
    /// SMTP (multipart, Indonesian by default, the name escaped in HTML),
    /// whose link verifies the address; the notification is listed as
    /// sent.
    async fn test_the_verification_mail_arrives_over_smtp_and_its_link_verifies(db: Database) {
        let p = post_office(db, false).await;
        let mail = p.smtp.mails().into_iter().find(|m| m.contains("X-RcptTo: ann@example.com")).unwrap();
        assert!(mail.contains("Subject: Verifikasi alamat e-mail Anda"), "{mail}");
        assert!(mail.contains("multipart/alternative") && mail.contains("text/plain") && mail.contains("text/html"));
        let text = decoded(&mail);
        assert!(text.contains("Halo Ann <Tester>,"), "the text part is verbatim");
        assert!(text.contains("Ann &lt;Tester&gt;"), "the HTML part escapes");
        assert!(text.contains("Message-ID: <"));
        let jobs = p.mine().await;
        assert_eq!(jobs.len(), 1, "{jobs:?}");
        assert_eq!(jobs[0]["event_type"], "user.registered");
        assert_eq!(jobs[0]["channel"], "email");
        assert_eq!(jobs[0]["status"], "sent");
        // English when Ann says so: a reset link now comes in English.
        let prefs = p.prefs(json!({"locale": "en", "time_zone": "Asia/Jakarta", "phone": null,
            "channels": ["email"], "categories": {}, "quiet_hours": null})).await;
        assert_eq!(prefs["locale"], "en");
        let (status, _) = post(&p.users.base, "/api/auth/password/forgot", json!({"email": "ann@example.com"})).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        let reset = p.smtp.wait_for("ann@example.com", "/reset-password?token=").await;
        assert!(reset.contains("Subject: Reset your password"), "{reset}");
    }
}

both_databases! {
    /// Telegram: linked through `/start <code>` delivered by webhook (with
    /// the bot's secret token; a forged update is refused), a message in
    /// HTML parse mode; then the user blocks the bot: the chat is unlinked
    /// and the message falls back to e-mail, recorded on the job.
    async fn test_telegram_link_message_block_and_fallback_to_email(db: Database) {
        let p = post_office(db, true).await;
        let hook = eventually("the webhook set", || async { p.tg.webhook_of(BOT_TOKEN) }).await;
        assert!(hook.ends_with("/api/notifications/telegram/webhook/default"), "{hook}");
        // A forged update (no secret) is refused and links nothing.
        let r = client().post(&hook).json(&json!({"update_id": 1, "message": {"message_id": 1, "date": 1,
            "chat": {"id": 9, "type": "private", "first_name": "x"}, "text": "/start forged"}})).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        p.link_telegram(4242).await;
        let reply = p.telegram_to(4242);
        assert!(reply.last().unwrap()["text"].as_str().unwrap().contains("Terhubung"), "{reply:?}");
        p.prefs(json!({"locale": "id", "time_zone": "Asia/Jakarta", "phone": null,
            "channels": ["telegram", "email"], "categories": {}, "quiet_hours": null})).await;
        p.subscription("e-act-1", "subscription.activated").await;
        p.wait_status("subscription.activated", "telegram", "sent").await;
        let msg = p.telegram_to(4242).into_iter().find(|m| m["text"].as_str().unwrap().contains("PREMIUM")).unwrap();
        assert_eq!(msg["parse_mode"], "HTML");
        assert!(msg["text"].as_str().unwrap().contains("<b>PREMIUM</b>"), "{msg}");
        // Blocked: unlinked, and the message goes by e-mail.
        p.tg.fault(BOT_TOKEN, Some(4242), "blocked", 1, 0);
        p.subscription("e-due-1", "subscription.past_due").await;
        let failed = p.wait_status("subscription.past_due", "telegram", "failed").await;
        assert!(failed["last_error"].as_str().unwrap().contains("blocked"), "{failed}");
        let mailed = p.wait_status("subscription.past_due", "email", "sent").await;
        assert_eq!(mailed["fallback_of"], failed["id"]);
        p.smtp.wait_for("ann@example.com", "belum dibayar").await;
        let (_, links) = as_user(Method::GET, &p.n.base, "/api/notifications/telegram/links", &p.ann, None).await;
        assert_eq!(links["links"], json!([]), "blocked: unlinked");
        assert_eq!(crate::platform::metric(&p.n.base, "notifications_fallbacks_total{from=\"telegram\",to=\"email\",service=\"notifications\"}").await, Some(1.0));
        // The next message goes straight to e-mail: Telegram can no longer reach Ann.
        p.subscription("e-end-1", "subscription.ended").await;
        p.wait_status("subscription.ended", "email", "sent").await;
        assert!(p.mine().await.iter().all(|j| !(j["event_type"] == "subscription.ended" && j["channel"] == "telegram")));
    }
}

both_databases! {
    /// SMS: an Indonesian number normalised to E.164, sent to Twilio with
    /// Basic auth and a status callback whose signed report makes the
    /// notification `delivered`; a 429 with `Retry-After` is retried; an
    /// unsubscribed number (21610) is not retried and falls back to
    /// e-mail; a forged report is refused.
    async fn test_sms_through_twilio_delivery_report_429_and_a_permanent_error(db: Database) {
        let p = post_office(db, false).await;
        let prefs = p.prefs(json!({"locale": "id", "time_zone": "Asia/Jakarta", "phone": "0812-3456-7890",
            "channels": ["sms", "email"], "categories": {}, "quiet_hours": null})).await;
        assert_eq!(prefs["phone"], "+6281234567890");
        p.subscription("e-sms-1", "subscription.activated").await;
        let delivered = p.wait_status("subscription.activated", "sms", "delivered").await;
        assert!(delivered["delivered_at"].as_i64().is_some());
        let sent = p.tw.messages();
        assert_eq!(sent[0]["to"], "+6281234567890");
        assert_eq!(sent[0]["from"], "+15005550006");
        assert!(sent[0]["body"].as_str().unwrap().contains("PREMIUM"));
        assert_eq!(sent[0]["status_callback"], format!("{}/api/notifications/twilio/status", p.n.base));
        // A forged delivery report.
        let r = client().post(p.n.url("/api/notifications/twilio/status"))
            .header("x-twilio-signature", "bm9wZQ==")
            .form(&[("MessageSid", "SM1"), ("MessageStatus", "failed")]).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        // 429 then success, its delivery report arriving before Twilio's
        // answer to the send (the service does not know the SID yet).
        p.tw.report_first(true);
        p.tw.rate_limit(1, 1);
        p.subscription("e-sms-2", "subscription.past_due").await;
        let j = p.wait_status("subscription.past_due", "sms", "delivered").await;
        assert_eq!(j["attempts"], 2, "{j}");
        assert!(p.tw.messages().iter().any(|m| m["rejected"] == 20429));
        // Unsubscribed (Twilio's magic number): failed for good, then e-mail.
        p.prefs(json!({"locale": "id", "time_zone": "Asia/Jakarta", "phone": "+15005550004",
            "channels": ["sms", "email"], "categories": {}, "quiet_hours": null})).await;
        p.subscription("e-sms-3", "subscription.ended").await;
        let failed = p.wait_status("subscription.ended", "sms", "failed").await;
        assert_eq!(failed["attempts"], 1);
        assert!(failed["last_error"].as_str().unwrap().contains("21610"), "{failed}");
        p.wait_status("subscription.ended", "email", "sent").await;
        // A bad phone number is refused with its field named.
        let (status, body) = as_user(Method::PUT, &p.n.base, "/api/notifications/preferences", &p.ann, Some(json!({
            "locale": "xx", "time_zone": "Mars/Olympus", "phone": "12ab", "channels": [], "categories": {"spam": {}}, "quiet_hours": null}))).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        let fields: Vec<&str> = body["error"]["fields"].as_array().unwrap().iter().map(|f| f["field"].as_str().unwrap()).collect();
        for f in ["locale", "time_zone", "phone", "channels", "categories.spam"] {
            assert!(fields.contains(&f), "{f} in {fields:?}");
        }
    }
}

/// 429 with `retry_after`: the next attempt waits the seconds Telegram
/// said (measured at the stand-in), not the queue's own backoff (100 ms
/// here); Telegram by long polling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_telegram_retry_after_is_honoured() {
    let p = post_office(Database::sqlite(), false).await;
    p.link_telegram(77).await;
    p.prefs(
        json!({"locale": "en", "time_zone": "Asia/Jakarta", "phone": null,
        "channels": ["telegram", "email"], "categories": {}, "quiet_hours": null}),
    )
    .await;
    p.tg.fault(BOT_TOKEN, Some(77), "retry_after", 1, 2);
    p.subscription("e-ra-1", "subscription.activated").await;
    let sent = p
        .wait_status("subscription.activated", "telegram", "sent")
        .await;
    assert_eq!(sent["attempts"], 2);
    let calls = p.tg.calls();
    let refused = calls.iter().find(|c| c["fault"] == "retry_after").unwrap()["at_ms"]
        .as_i64()
        .unwrap();
    let msg = p
        .telegram_to(77)
        .into_iter()
        .find(|m| m["text"].as_str().unwrap().contains("active"))
        .unwrap();
    let waited = msg["at_ms"].as_i64().unwrap() - refused;
    assert!(
        waited >= 2000,
        "retried after {waited} ms, not the 2 s Telegram asked"
    );
    println!("retry_after 2 s honoured: the retry came {waited} ms after the 429");
}

/// The same event delivered again and again (and concurrently) sends one
/// message: the consumer dedupes by event id, the queue by (event,
/// channel, recipient).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_redelivered_event_sends_one_message() {
    let p = post_office(Database::sqlite(), false).await;
    let sends = (0..4).map(|_| p.subscription("e-dup-1", "subscription.activated"));
    let answers = futures_util::future::join_all(sends).await;
    let applied = answers.iter().filter(|a| a["status"] == "applied").count();
    assert_eq!(applied, 1, "{answers:?}");
    p.wait_status("subscription.activated", "email", "sent")
        .await;
    p.subscription("e-dup-1", "subscription.activated").await;
    let jobs = p.mine().await;
    assert_eq!(
        jobs.iter().filter(|j| j["event_id"] == "e-dup-1").count(),
        1,
        "{jobs:?}"
    );
    eventually("the one mail", || async {
        (p.smtp
            .mails()
            .iter()
            .filter(|m| decoded(m).contains("PREMIUM"))
            .count()
            == 1)
            .then_some(())
    })
    .await;
}

/// Quiet hours hold a billing message until they end (in the user's
/// zone); a critical one (a password reset) goes at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_quiet_hours_hold_billing_messages_but_not_a_password_reset() {
    let p = post_office(Database::sqlite(), false).await;
    let now = jiff::Timestamp::from_millisecond(p.world.clock.now_ms())
        .unwrap()
        .to_zoned(jiff::tz::TimeZone::get("Asia/Tokyo").unwrap());
    let hm = |z: &jiff::Zoned| format!("{:02}:{:02}", z.hour(), z.minute());
    let start = now
        .checked_sub(jiff::SignedDuration::from_mins(60))
        .unwrap();
    let end = now
        .checked_add(jiff::SignedDuration::from_mins(120))
        .unwrap();
    p.prefs(
        json!({"locale": "id", "time_zone": "Asia/Tokyo", "phone": null, "channels": ["email"],
        "categories": {}, "quiet_hours": {"start": hm(&start), "end": hm(&end)}}),
    )
    .await;
    p.subscription("e-q-1", "subscription.activated").await;
    let (status, _) = post(
        &p.users.base,
        "/api/auth/password/forgot",
        json!({"email": "ann@example.com"}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    p.wait_status("user.password_reset_requested", "email", "sent")
        .await;
    let held = p
        .mine()
        .await
        .into_iter()
        .find(|j| j["event_type"] == "subscription.activated")
        .unwrap();
    assert_eq!(held["status"], "queued", "{held}");
    // Held until the quiet hours end: `end`, at the start of its minute.
    let end_ms = end
        .with()
        .second(0)
        .subsec_nanosecond(0)
        .build()
        .unwrap()
        .timestamp()
        .as_millisecond();
    assert_eq!(held["next_at"].as_i64().unwrap(), end_ms, "{held}");
    // Two hours on, it goes.
    p.world.clock.advance(Duration::from_secs(2 * 3600 + 60));
    p.wait_status("subscription.activated", "email", "sent")
        .await;
}

/// The service killed (SIGKILL) with 100 jobs queued while the SMTP server
/// is down: after a restart, with the server up, each of the 100 mails
/// arrives exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_killed_with_100_queued_jobs_delivers_each_exactly_once() {
    let world = World::new(Database::sqlite());
    let smtp_port = free_port();
    let listen = format!("127.0.0.1:{}", free_port());
    let config = "services:\n  notifications:\n    queue: { backoff: 200ms, max_backoff: 1s, concurrency: 8, lease: 5s }\n";
    let env = [("TIERGATE_SMTP_URL", format!("smtp://127.0.0.1:{smtp_port}"))];
    let mut child = serve_process(&world, "notifications", config, &listen, &env).await;
    let users = world.keys_of("users");
    for i in 0..100 {
        let event = json!({"id": format!("e-kill-{i:03}"), "type": "user.registered", "source": "users",
            "occurred_at": backend_common::clock::system_now_ms(),
            "data": {"user_id": format!("u-{i}"), "email": format!("user{i}@example.com"), "name": format!("User {i}"),
                "verification_url": format!("http://localhost:8000/verify-email?token=t{i}"), "expires_at": 1}});
        let r = client()
            .post(format!("http://{listen}/internal/events"))
            .bearer_auth(users.issue("notifications"))
            .json(&event)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    let pool = world.pool("notifications").await;
    assert_eq!(count_rows(&pool, "jobs").await, 100);
    eventually("every job tried once (the SMTP server is down)", || async {
        let tried: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM jobs WHERE attempts > 0")
            .fetch_one(&pool)
            .await
            .ok()?;
        (tried == 100).then_some(())
    })
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    let smtp = Smtp::start_on(smtp_port, &world.dir.path().join("maildir")).await;
    let mut child = serve_process(&world, "notifications", config, &listen, &env).await;
    eventually("all 100 sent", || async {
        let sent: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM jobs WHERE status = 'sent'")
            .fetch_one(&pool)
            .await
            .ok()?;
        (sent == 100).then_some(())
    })
    .await;
    let mails = smtp.mails();
    assert_eq!(mails.len(), 100, "each mail exactly once");
    let ids: HashSet<String> = mails
        .iter()
        .map(|m| {
            m.lines()
                .find(|l| l.starts_with("Message-ID:"))
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 100);
    let to: HashSet<String> = mails
        .iter()
        .map(|m| {
            m.lines()
                .find(|l| l.starts_with("X-RcptTo:"))
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(to.len(), 100);
    child.kill().unwrap();
    child.wait().unwrap();
}

both_databases! {
    /// `invoice.issued` from the billing service itself: notifications
    /// reads the invoice's PDF from billing and the mail over SMTP carries
    /// it (read back with pdftotext: the same number and total as the
    /// mail), the amounts in rupiah.
    async fn test_an_issued_invoice_is_mailed_with_its_pdf(db: Database) {
        let p = post_office_with_billing(db).await;
        let billing = p.billing.as_ref().unwrap();
        let body = json!({
            "reference": {"kind": "test", "n": 1},
            "subject": {"kind": "user", "id": p.ann_id},
            "user_id": p.ann_id,
            "plan": "PREMIUM", "cycle": "monthly",
            "lines": [{"description": "PREMIUM, bulanan", "quantity": 1, "unit_price": 249_000}]
        });
        let (status, invoice) = as_service(
            &p.world.keys_of("subscriptions"),
            Method::POST,
            ("billing", billing),
            "/internal/invoices",
            Some(body),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{invoice}");
        let number = invoice["number"].as_str().unwrap();
        let total = invoice["total"].as_i64().unwrap();
        let rupiah = backend_common::money::Rupiah(total).to_string();
        let mail = p.smtp.wait_for("ann@example.com", number).await;
        assert!(decoded(&mail).contains(&rupiah), "{rupiah} in {mail}");
        let pdf = attachment(&mail, &format!("{}.pdf", number.replace('/', "-")));
        assert!(pdf.starts_with(b"%PDF-"));
        let text = crate::billing::pdf_text(&p.world, &pdf);
        assert!(text.contains(number), "{text}");
        let job = p.wait_status("invoice.issued", "email", "sent").await;
        assert_eq!(job["attempts"], 1, "{job}");
    }
}

/// The bytes of the attachment `name` in the raw mail `raw` (its base64
/// body: after its headers, up to the boundary).
fn attachment(raw: &str, name: &str) -> Vec<u8> {
    use base64::Engine as _;
    let at = raw
        .find(&format!("filename=\"{name}\""))
        .unwrap_or_else(|| panic!("no attachment {name} in {raw}"));
    let body_start = at
        + raw[at..]
            .find("\n\n")
            .or_else(|| raw[at..].find("\r\n\r\n"))
            .unwrap();
    let body_end = body_start + raw[body_start..].find("\n--").unwrap();
    let b64: String = raw[body_start..body_end]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
}

/// A 5 MB attachment goes through lettre to a real SMTP server intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_5_mb_pdf_attachment_arrives_intact() {
    use sha2::Digest as _;
    let dir = crate::platform::TempDir::new("smtp-big");
    let smtp = Smtp::start(&dir.path().join("maildir")).await;
    let mailer = notifications::email::Mailer::smtp(
        "tiergate <billing@tiergate.example>",
        &smtp.url(),
        Duration::from_secs(60),
    )
    .unwrap();
    let mut pdf = b"%PDF-1.7\n".to_vec();
    pdf.extend((0..5 * 1024 * 1024).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8));
    let message = notifications::templates::Rendered {
        subject: "Tagihan INV/2026/12/000001".into(),
        text: "Terlampir.".into(),
        html: "<p>Terlampir.</p>".into(),
        telegram: String::new(),
    };
    let file = notifications::email::File {
        name: "INV-2026-12-000001.pdf".into(),
        content_type: "application/pdf".into(),
        bytes: pdf.clone(),
    };
    let mail = mailer
        .build("job-big", "siti@example.id", &message, &[file])
        .unwrap();
    mailer.send("job-big", mail).await.unwrap();
    let raw = eventually("the mail", || async { smtp.mails().into_iter().next() }).await;
    let got = attachment(&raw, "INV-2026-12-000001.pdf");
    assert_eq!(got.len(), pdf.len());
    assert_eq!(sha2::Sha256::digest(&got), sha2::Sha256::digest(&pdf));
}

/// schemathesis, generating requests from notifications' `/openapi.json`
/// with an admin's token, finds no 5xx, no undocumented status, no
/// response that breaks its schema.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_openapi_contract_holds_under_schemathesis() {
    let p = post_office(Database::sqlite(), false).await;
    let (_, root) = sign_up(&p.users.base, &p.smtp, "root@example.com").await;
    let token = root["access_token"].as_str().unwrap();
    let out = crate::users::run_schemathesis(
        &p.n.url("/openapi.json"),
        &[&format!("Authorization: Bearer {token}")],
    )
    .await;
    assert!(out.0, "schemathesis found failures:\n{}", out.1);
}
