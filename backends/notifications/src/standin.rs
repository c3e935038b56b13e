//! Local stand-ins for the Telegram Bot API and Twilio's Messages API,
//! following the contracts (external-apis.md §2, §3) to the field. What
//! the tests, the benchmarks and a developer offline talk to; everything
//! is kept in memory.
//!
//! **Telegram** (`/bot<token>/<method>`, JSON or multipart bodies as
//! teloxide sends them; `{"ok":true,"result":…}` or `{"ok":false,
//! "error_code","description","parameters"?}` with Telegram's exact
//! descriptions): `getMe`, `sendMessage` (a chat must have written to the
//! bot first, else "chat not found"; text 1–4096; HTML parse mode checked
//! for unknown tags and bare `&`), `getUpdates` (long polling with
//! `offset`/`timeout`; 409 while a webhook is set), `setWebhook` (then
//! updates are POSTed there with `X-Telegram-Bot-Api-Secret-Token`),
//! `deleteWebhook`. Control: `POST /standin/bots {token, username}`,
//! `POST /standin/updates {token, chat_id, text}` (a user writes to the
//! bot), `POST /standin/faults {token, chat_id?, kind, times, retry_after?}`
//! (`retry_after`, `blocked`, `chat_not_found`, `too_long`),
//! `GET /standin/messages`.
//!
//! **Twilio** (`POST /2010-04-01/Accounts/<sid>/Messages.json`, Basic auth,
//! form body; 201 with the message resource, or Twilio's error JSON with
//! its codes): Twilio's magic test numbers fail as documented
//! (`+15005550001` 21211, `+15005550002` 21612, `+15005550003` 21408,
//! `+15005550004` 21610, `+15005550009` 21614), a `StatusCallback` gets a
//! signed `delivered` report (`undelivered` 30003 for `+15005550010`).
//! Control: `POST /standin/faults {kind: "rate_limit", times, retry_after}`,
//! `GET /standin/messages`.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use actix_web::{web, HttpRequest, HttpResponse};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::Notify;

use backend_common::clock::system_now_ms;
use backend_common::standin::Background;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ------------------------------------------------------------- Telegram

#[derive(Debug, Clone)]
struct Fault {
    chat_id: Option<i64>,
    kind: String,
    times: u32,
    retry_after: u32,
}

#[derive(Default)]
struct BotState {
    id: i64,
    username: String,
    /// Chats that wrote to the bot.
    chats: Vec<i64>,
    webhook: Option<(String, Option<String>)>,
    updates: Vec<Value>,
    next_update: i64,
}

#[derive(Default)]
struct TgInner {
    bots: HashMap<String, BotState>,
    faults: Vec<(String, Fault)>,
    messages: Vec<Value>,
    calls: Vec<Value>,
    next_message: i64,
}

struct Telegram {
    inner: Mutex<TgInner>,
    arrived: Notify,
    http: reqwest::Client,
}

fn tg_ok(result: Value) -> HttpResponse {
    HttpResponse::Ok().json(json!({"ok": true, "result": result}))
}

fn tg_err(code: u16, description: &str, retry_after: Option<u32>) -> HttpResponse {
    let mut body = json!({"ok": false, "error_code": code, "description": description});
    if let Some(s) = retry_after {
        body["parameters"] = json!({"retry_after": s});
    }
    HttpResponse::build(
        actix_web::http::StatusCode::from_u16(code)
            .unwrap_or(actix_web::http::StatusCode::BAD_REQUEST),
    )
    .json(body)
}

/// The fields of a multipart/form-data body (text parts only).
fn multipart_fields(content_type: &str, body: &[u8]) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let Some(boundary) = content_type.split("boundary=").nth(1) else {
        return out;
    };
    let boundary = format!("--{}", boundary.trim_matches('"'));
    let text = String::from_utf8_lossy(body);
    for part in text.split(boundary.as_str()) {
        let Some((head, value)) = part.split_once("\r\n\r\n") else {
            continue;
        };
        let Some(name) = head
            .split("name=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
        else {
            continue;
        };
        out.insert(name.to_owned(), value.trim_end_matches("\r\n").to_owned());
    }
    out
}

/// The parameters of a Bot API call: JSON, form, or multipart.
fn params(req: &HttpRequest, body: &[u8]) -> Value {
    let ct = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if ct.starts_with("multipart/form-data") {
        let fields = multipart_fields(ct, body);
        return Value::Object(
            fields
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect(),
        );
    }
    if ct.starts_with("application/x-www-form-urlencoded") {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(body).unwrap_or_default();
        return Value::Object(
            pairs
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect(),
        );
    }
    serde_json::from_slice(body).unwrap_or_else(|_| json!({}))
}

/// Telegram's HTML parse mode, checked as strictly as Telegram does for
/// what matters here: only its tags, and `&` only in an entity.
fn html_problem(text: &str) -> Option<String> {
    const TAGS: &[&str] = &[
        "b",
        "strong",
        "i",
        "em",
        "u",
        "ins",
        "s",
        "strike",
        "del",
        "a",
        "code",
        "pre",
        "tg-spoiler",
        "span",
        "blockquote",
        "tg-emoji",
    ];
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'<' => {
                let end = text[i..].find('>')?;
                let inner = text[i + 1..i + end].trim_start_matches('/');
                let name = inner
                    .split(|c: char| c.is_whitespace())
                    .next()
                    .unwrap_or("");
                if !TAGS.contains(&name) {
                    return Some(format!(
                        "Unsupported start tag \"{name}\" at byte offset {i}"
                    ));
                }
                i += end + 1;
            }
            b'&' => {
                let rest = &text[i..];
                let ok = ["&lt;", "&gt;", "&amp;", "&quot;"]
                    .iter()
                    .any(|e| rest.starts_with(e))
                    || (rest.starts_with("&#") && rest.find(';').is_some_and(|e| e > 2));
                if !ok {
                    return Some(format!("Character entity expected at byte offset {i}"));
                }
                i += 1;
            }
            _ => i += 1,
        }
    }
    None
}

/// The documented spelling of a Bot API method named in any case.
fn canonical_method(name: &str) -> String {
    const METHODS: [&str; 5] = [
        "getMe",
        "sendMessage",
        "setWebhook",
        "deleteWebhook",
        "getUpdates",
    ];
    METHODS
        .iter()
        .find(|m| m.eq_ignore_ascii_case(name))
        .map_or_else(|| name.to_owned(), |m| (*m).to_owned())
}

async fn tg_method(
    tg: web::Data<Telegram>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
    body: web::Bytes,
) -> HttpResponse {
    let (token, method) = path.into_inner();
    // Bot API method names are case-insensitive (teloxide sends `GetMe`,
    // `SendMessage`): recorded and matched by their documented spelling.
    let method = canonical_method(&method);
    let Some(token) = token.strip_prefix("bot").map(str::to_owned) else {
        return tg_err(404, "Not Found", None);
    };
    let p = params(&req, &body);
    lock(&tg.inner)
        .calls
        .push(json!({"token_id": token.split(':').next(), "method": method, "params": p, "at_ms": system_now_ms()}));
    if !lock(&tg.inner).bots.contains_key(&token) {
        return tg_err(401, "Unauthorized", None);
    }
    match method.as_str() {
        "getMe" => {
            let inner = lock(&tg.inner);
            let Some(b) = inner.bots.get(&token) else {
                return tg_err(401, "Unauthorized", None);
            };
            tg_ok(
                json!({"id": b.id, "is_bot": true, "first_name": b.username, "username": b.username,
                "can_join_groups": true, "can_read_all_group_messages": false,
                "supports_inline_queries": false, "can_connect_to_business": false,
                "has_main_web_app": false}),
            )
        }
        "sendMessage" => send_message(&tg, &token, &p),
        "setWebhook" => {
            let url = p["url"].as_str().unwrap_or_default().to_owned();
            let secret = p["secret_token"].as_str().map(str::to_owned);
            if let Some(s) = &secret {
                if s.is_empty()
                    || s.len() > 256
                    || !s
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                {
                    return tg_err(
                        400,
                        "Bad Request: secret token contains unallowed characters",
                        None,
                    );
                }
            }
            let mut inner = lock(&tg.inner);
            if let Some(b) = inner.bots.get_mut(&token) {
                b.webhook = (!url.is_empty()).then_some((url, secret));
            }
            tg_ok(json!(true))
        }
        "deleteWebhook" => {
            if let Some(b) = lock(&tg.inner).bots.get_mut(&token) {
                b.webhook = None;
            }
            tg_ok(json!(true))
        }
        "getUpdates" => get_updates(&tg, &token, &p).await,
        _ => tg_err(404, "Not Found: method not found", None),
    }
}

fn send_message(tg: &Telegram, token: &str, p: &Value) -> HttpResponse {
    let chat = p["chat_id"]
        .as_i64()
        .or_else(|| p["chat_id"].as_str().and_then(|s| s.parse().ok()));
    let Some(chat) = chat else {
        return tg_err(400, "Bad Request: chat not found", None);
    };
    let text = p["text"].as_str().unwrap_or_default().to_owned();
    let mut inner = lock(&tg.inner);
    if let Some(i) = inner
        .faults
        .iter()
        .position(|(t, f)| t == token && f.chat_id.is_none_or(|c| c == chat) && f.times > 0)
    {
        let f = &mut inner.faults[i].1;
        f.times -= 1;
        let f = f.clone();
        inner.faults.retain(|(_, f)| f.times > 0);
        inner
            .calls
            .push(json!({"fault": f.kind, "chat_id": chat, "at_ms": system_now_ms()}));
        return match f.kind.as_str() {
            "retry_after" => tg_err(
                429,
                &format!("Too Many Requests: retry after {}", f.retry_after),
                Some(f.retry_after),
            ),
            "blocked" => tg_err(403, "Forbidden: bot was blocked by the user", None),
            "chat_not_found" => tg_err(400, "Bad Request: chat not found", None),
            _ => tg_err(400, "Bad Request: message is too long", None),
        };
    }
    let Some(bot) = inner.bots.get(token) else {
        return tg_err(401, "Unauthorized", None);
    };
    if !bot.chats.contains(&chat) {
        return tg_err(400, "Bad Request: chat not found", None);
    }
    let bot_username = bot.username.clone();
    if text.trim().is_empty() {
        return tg_err(400, "Bad Request: message text is empty", None);
    }
    if text.chars().count() > 4096 {
        return tg_err(400, "Bad Request: message is too long", None);
    }
    let parse_mode = p["parse_mode"].as_str().map(str::to_owned);
    if parse_mode.as_deref() == Some("HTML") {
        if let Some(problem) = html_problem(&text) {
            return tg_err(
                400,
                &format!("Bad Request: can't parse entities: {problem}"),
                None,
            );
        }
    }
    inner.next_message += 1;
    let id = inner.next_message;
    let date = system_now_ms() / 1000;
    inner
        .messages
        .push(json!({"bot": bot_username, "chat_id": chat, "text": text,
        "parse_mode": parse_mode, "message_id": id, "at_ms": system_now_ms()}));
    tg_ok(json!({"message_id": id, "date": date,
        "chat": {"id": chat, "type": "private", "first_name": "User"}, "text": text}))
}

async fn get_updates(tg: &Telegram, token: &str, p: &Value) -> HttpResponse {
    let offset = p["offset"].as_i64().unwrap_or(0);
    let timeout = p["timeout"].as_u64().unwrap_or(0).min(50);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
    loop {
        let arrived = tg.arrived.notified();
        {
            let mut inner = lock(&tg.inner);
            let Some(b) = inner.bots.get_mut(token) else {
                return tg_err(401, "Unauthorized", None);
            };
            if b.webhook.is_some() {
                return tg_err(409, "Conflict: can't use getUpdates method while webhook is active; use deleteWebhook to delete the webhook first", None);
            }
            // Confirmed updates are forgotten.
            b.updates
                .retain(|u| u["update_id"].as_i64().unwrap_or(0) >= offset);
            if !b.updates.is_empty() {
                return tg_ok(Value::Array(b.updates.clone()));
            }
        }
        if tokio::time::timeout_at(deadline, arrived).await.is_err() {
            return tg_ok(json!([]));
        }
    }
}

#[derive(Deserialize)]
struct NewBot {
    token: String,
    username: String,
}

async fn tg_add_bot(tg: web::Data<Telegram>, body: web::Json<NewBot>) -> HttpResponse {
    let id = body
        .token
        .split(':')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    lock(&tg.inner).bots.insert(
        body.token.clone(),
        BotState {
            id,
            username: body.username.clone(),
            next_update: 1,
            ..BotState::default()
        },
    );
    HttpResponse::Created().json(json!({"id": id}))
}

#[derive(Deserialize)]
struct UserWrites {
    token: String,
    chat_id: i64,
    text: String,
    #[serde(default)]
    first_name: Option<String>,
}

async fn tg_update(tg: web::Data<Telegram>, body: web::Json<UserWrites>) -> HttpResponse {
    match user_writes(&tg, body.into_inner()).await {
        Some(v) => HttpResponse::Ok().json(v),
        None => HttpResponse::NotFound().json(json!({"error": "no such bot"})),
    }
}

/// A user writes `w.text` to the bot: the update goes to its webhook, or
/// waits for `getUpdates`. `None`: no such bot.
async fn user_writes(tg: &Telegram, w: UserWrites) -> Option<Value> {
    let (update, webhook) = {
        let mut inner = lock(&tg.inner);
        let b = inner.bots.get_mut(&w.token)?;
        if !b.chats.contains(&w.chat_id) {
            b.chats.push(w.chat_id);
        }
        let id = b.next_update;
        b.next_update += 1;
        let name = w.first_name.clone().unwrap_or_else(|| "User".to_owned());
        let update = json!({"update_id": id, "message": {"message_id": id, "date": system_now_ms() / 1000,
            "chat": {"id": w.chat_id, "type": "private", "first_name": name},
            "from": {"id": w.chat_id, "is_bot": false, "first_name": name},
            "text": w.text}});
        if b.webhook.is_none() {
            b.updates.push(update.clone());
        }
        (update, b.webhook.clone())
    };
    tg.arrived.notify_waiters();
    if let Some((url, secret)) = webhook {
        let mut req = tg.http.post(&url).json(&update);
        if let Some(s) = secret {
            req = req.header("X-Telegram-Bot-Api-Secret-Token", s);
        }
        let status = match req.send().await {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        };
        return Some(json!({"delivered": "webhook", "status": status, "update": update}));
    }
    Some(json!({"delivered": "queued", "update": update}))
}

#[derive(Deserialize)]
struct NewFault {
    #[serde(default)]
    token: String,
    chat_id: Option<i64>,
    kind: String,
    #[serde(default = "one")]
    times: u32,
    #[serde(default)]
    retry_after: u32,
}

fn one() -> u32 {
    1
}

async fn tg_fault(tg: web::Data<Telegram>, body: web::Json<NewFault>) -> HttpResponse {
    let f = Fault {
        chat_id: body.chat_id,
        kind: body.kind.clone(),
        times: body.times,
        retry_after: body.retry_after,
    };
    lock(&tg.inner).faults.push((body.token.clone(), f));
    HttpResponse::NoContent().finish()
}

async fn tg_messages(tg: web::Data<Telegram>) -> HttpResponse {
    let inner = lock(&tg.inner);
    HttpResponse::Ok().json(json!({"messages": inner.messages, "calls": inner.calls}))
}

/// A running Telegram stand-in.
pub struct TelegramStandin {
    server: Background,
    state: web::Data<Telegram>,
}

impl TelegramStandin {
    /// Starts one on `listen` (port 0: any).
    pub fn start(listen: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen)?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(std::io::Error::other)?;
        let state = web::Data::new(Telegram {
            inner: Mutex::new(TgInner::default()),
            arrived: Notify::new(),
            http,
        });
        let shared = state.clone();
        let server = backend_common::standin::spawn(
            "telegram-standin",
            listener,
            move |cfg| {
                cfg.app_data(state.clone())
                    .app_data(web::PayloadConfig::new(16 << 20))
                    .app_data(web::JsonConfig::default().limit(1 << 20))
                    .route("/standin/bots", web::post().to(tg_add_bot))
                    .route("/standin/updates", web::post().to(tg_update))
                    .route("/standin/faults", web::post().to(tg_fault))
                    .route("/standin/messages", web::get().to(tg_messages))
                    .route("/{token}/{method}", web::post().to(tg_method));
            },
            |addr| tracing::info!(%addr, "Telegram Bot API stand-in listening"),
        )?;
        Ok(Self {
            server,
            state: shared,
        })
    }

    /// `http://addr`: the Bot API base URL.
    pub fn base(&self) -> String {
        self.server.base()
    }

    /// Adds a bot (`<id>:<secret>` token).
    pub fn add_bot(&self, token: &str, username: &str) {
        let id = token
            .split(':')
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1);
        lock(&self.state.inner).bots.insert(
            token.to_owned(),
            BotState {
                id,
                username: username.to_owned(),
                next_update: 1,
                ..BotState::default()
            },
        );
    }

    /// The messages bots sent, oldest first.
    pub fn messages(&self) -> Vec<Value> {
        lock(&self.state.inner).messages.clone()
    }

    /// Every Bot API call (and answered fault), oldest first.
    pub fn calls(&self) -> Vec<Value> {
        lock(&self.state.inner).calls.clone()
    }

    /// A user (chat `chat_id`) writes `text` to the bot `token`; what
    /// became of the update (`delivered`: `webhook` with the webhook's
    /// `status`, or `queued` for `getUpdates`).
    pub async fn user_writes(&self, token: &str, chat_id: i64, text: &str) -> Value {
        let w = UserWrites {
            token: token.to_owned(),
            chat_id,
            text: text.to_owned(),
            first_name: None,
        };
        user_writes(&self.state, w).await.unwrap_or(Value::Null)
    }

    /// The next `times` sends of bot `token` (to `chat_id`, or any chat)
    /// answer with fault `kind` (`retry_after` with `retry_after` seconds,
    /// `blocked`, `chat_not_found`, `too_long`).
    pub fn fault(
        &self,
        token: &str,
        chat_id: Option<i64>,
        kind: &str,
        times: u32,
        retry_after: u32,
    ) {
        let f = Fault {
            chat_id,
            kind: kind.to_owned(),
            times,
            retry_after,
        };
        lock(&self.state.inner).faults.push((token.to_owned(), f));
    }

    /// Whether a bot has a webhook set.
    pub fn webhook_of(&self, token: &str) -> Option<String> {
        lock(&self.state.inner)
            .bots
            .get(token)?
            .webhook
            .as_ref()
            .map(|(u, _)| u.clone())
    }

    /// Stops it.
    pub async fn stop(mut self) {
        self.server.stop().await;
    }
}

// --------------------------------------------------------------- Twilio

#[derive(Default)]
struct TwInner {
    messages: Vec<Value>,
    rate_limited: u32,
    retry_after: u32,
    next: u64,
    /// Delivery reports sent before the message's `201` answer (as a fast
    /// carrier can make Twilio do), not after.
    report_first: bool,
}

struct TwilioState {
    sid: String,
    token: String,
    inner: Mutex<TwInner>,
    http: reqwest::Client,
}

fn tw_err(status: u16, code: i64, message: &str) -> HttpResponse {
    HttpResponse::build(
        actix_web::http::StatusCode::from_u16(status)
            .unwrap_or(actix_web::http::StatusCode::BAD_REQUEST),
    )
    .json(json!({"code": code, "message": message,
            "more_info": format!("https://www.twilio.com/docs/errors/{code}"), "status": status}))
}

fn rfc2822(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.strftime("%a, %d %b %Y %H:%M:%S +0000").to_string())
        .unwrap_or_default()
}

async fn tw_create(
    tw: web::Data<TwilioState>,
    req: HttpRequest,
    sid: web::Path<String>,
    body: web::Bytes,
) -> HttpResponse {
    let want = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", tw.sid, tw.token))
    );
    let given = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if *sid != tw.sid || given != want {
        return tw_err(401, 20003, "Authenticate");
    }
    let form: Vec<(String, String)> = serde_urlencoded::from_bytes(&body).unwrap_or_default();
    let field = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    {
        let mut inner = lock(&tw.inner);
        if inner.rate_limited > 0 {
            inner.rate_limited -= 1;
            let after = inner.retry_after;
            inner
                .messages
                .push(json!({"rejected": 20429, "at_ms": system_now_ms()}));
            let mut res = tw_err(429, 20429, "Too Many Requests");
            if let Ok(v) = actix_web::http::header::HeaderValue::from_str(&after.to_string()) {
                res.headers_mut()
                    .insert(actix_web::http::header::RETRY_AFTER, v);
            }
            return res;
        }
    }
    let Some(to) = field("To") else {
        return tw_err(400, 21604, "A 'To' phone number is required.");
    };
    let from = field("From");
    let service = field("MessagingServiceSid");
    if from.is_none() && service.is_none() {
        return tw_err(400, 21603, "A 'From' phone number is required.");
    }
    let body_text = field("Body").unwrap_or_default();
    if body_text.is_empty() {
        return tw_err(400, 21602, "Message body is required.");
    }
    if body_text.chars().count() > 1600 {
        return tw_err(
            400,
            21617,
            "The concatenated message body exceeds the 1600 character limit.",
        );
    }
    let magic = [
        ("+15005550001", 21211, "The 'To' number +15005550001 is not a valid phone number."),
        ("+15005550002", 21612, "The 'To' phone number is not currently reachable via SMS."),
        ("+15005550003", 21408, "Permission to send an SMS has not been enabled for the region indicated by the 'To' number."),
        ("+15005550004", 21610, "Attempt to send to unsubscribed recipient"),
        ("+15005550009", 21614, "'To' number is not a valid mobile number"),
    ];
    if let Some((_, code, msg)) = magic.iter().find(|(n, _, _)| *n == to) {
        return tw_err(400, *code, msg);
    }
    let valid = to.starts_with('+')
        && (9..=16).contains(&to.len())
        && to[1..].bytes().all(|b| b.is_ascii_digit());
    if !valid {
        return tw_err(
            400,
            21211,
            &format!("The 'To' number {to} is not a valid phone number."),
        );
    }
    let now = system_now_ms();
    let msid = {
        let mut inner = lock(&tw.inner);
        inner.next += 1;
        format!("SM{:032x}", inner.next)
    };
    let resource = json!({"account_sid": tw.sid, "api_version": "2010-04-01", "body": body_text,
        "date_created": rfc2822(now), "date_sent": null, "date_updated": rfc2822(now),
        "direction": "outbound-api", "error_code": null, "error_message": null,
        "from": from, "messaging_service_sid": service, "num_media": "0",
        "num_segments": body_text.chars().count().div_ceil(153).max(1).to_string(),
        "price": null, "price_unit": null, "sid": msid, "status": "queued",
        "subresource_uris": {"media": format!("/2010-04-01/Accounts/{}/Messages/{msid}/Media.json", tw.sid)},
        "to": to, "uri": format!("/2010-04-01/Accounts/{}/Messages/{msid}.json", tw.sid)});
    lock(&tw.inner).messages.push(
        json!({"sid": msid, "to": to, "from": from, "body": body_text,
        "status_callback": field("StatusCallback"), "at_ms": now}),
    );
    if let Some(cb) = field("StatusCallback") {
        let (status, error) = if to == "+15005550010" {
            ("undelivered", Some("30003"))
        } else {
            ("delivered", None)
        };
        let mut params: Vec<(String, String)> = vec![
            ("MessageSid".into(), msid.clone()),
            ("MessageStatus".into(), status.into()),
            ("AccountSid".into(), tw.sid.clone()),
            ("To".into(), to.clone()),
            ("From".into(), from.clone().unwrap_or_default()),
            ("ApiVersion".into(), "2010-04-01".into()),
        ];
        if let Some(e) = error {
            params.push(("ErrorCode".into(), e.into()));
        }
        let sig = crate::sms::signature(&tw.token, &cb, &params);
        let http = tw.http.clone();
        let report = async move {
            let _ = http
                .post(&cb)
                .header("X-Twilio-Signature", sig)
                .form(&params)
                .send()
                .await;
        };
        if lock(&tw.inner).report_first {
            report.await;
        } else {
            actix_web::rt::spawn(report);
        }
    }
    HttpResponse::Created().json(resource)
}

#[derive(Deserialize)]
struct TwFault {
    times: u32,
    #[serde(default)]
    retry_after: u32,
}

async fn tw_fault(tw: web::Data<TwilioState>, body: web::Json<TwFault>) -> HttpResponse {
    let mut inner = lock(&tw.inner);
    inner.rate_limited = body.times;
    inner.retry_after = body.retry_after;
    HttpResponse::NoContent().finish()
}

async fn tw_messages(tw: web::Data<TwilioState>) -> HttpResponse {
    HttpResponse::Ok().json(json!({"messages": lock(&tw.inner).messages}))
}

/// A running Twilio stand-in.
pub struct TwilioStandin {
    server: Background,
    state: web::Data<TwilioState>,
}

impl TwilioStandin {
    /// Starts one on `listen` for account `sid` with `auth_token`.
    pub fn start(listen: SocketAddr, sid: &str, auth_token: &str) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen)?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(std::io::Error::other)?;
        let state = web::Data::new(TwilioState {
            sid: sid.to_owned(),
            token: auth_token.to_owned(),
            inner: Mutex::new(TwInner::default()),
            http,
        });
        let shared = state.clone();
        let server = backend_common::standin::spawn(
            "twilio-standin",
            listener,
            move |cfg| {
                cfg.app_data(state.clone())
                    .route(
                        "/2010-04-01/Accounts/{sid}/Messages.json",
                        web::post().to(tw_create),
                    )
                    .route("/standin/faults", web::post().to(tw_fault))
                    .route("/standin/messages", web::get().to(tw_messages));
            },
            |addr| tracing::info!(%addr, "Twilio stand-in listening"),
        )?;
        Ok(Self {
            server,
            state: shared,
        })
    }

    /// `http://addr`: the REST base URL.
    pub fn base(&self) -> String {
        self.server.base()
    }

    /// The next `times` sends answer 429 (20429) with `Retry-After`.
    pub fn rate_limit(&self, times: u32, retry_after: u32) {
        let mut inner = lock(&self.state.inner);
        inner.rate_limited = times;
        inner.retry_after = retry_after;
    }

    /// Whether each delivery report is sent (and answered) before the
    /// message's own answer: the report reaches the service before it
    /// knows the message's SID.
    pub fn report_first(&self, on: bool) {
        lock(&self.state.inner).report_first = on;
    }

    /// What it was sent (and the 429s it answered), oldest first.
    pub fn messages(&self) -> Vec<Value> {
        lock(&self.state.inner).messages.clone()
    }

    /// Stops it.
    pub async fn stop(mut self) {
        self.server.stop().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_html_check_is_telegrams() {
        assert_eq!(
            html_problem("<b>Lunas</b> &amp; <a href=\"x\">ok</a> &lt;3 &#128512;"),
            None
        );
        assert!(html_problem("<Admin>").is_some());
        assert!(html_problem("Siti & Co").is_some());
        assert!(html_problem("<div>x</div>").is_some());
    }

    #[test]
    fn test_multipart_fields() {
        let body = b"--XyZ\r\nContent-Disposition: form-data; name=\"url\"\r\n\r\nhttps://a/b\r\n--XyZ\r\nContent-Disposition: form-data; name=\"secret_token\"\r\n\r\nabc_1\r\n--XyZ--\r\n";
        let f = multipart_fields("multipart/form-data; boundary=XyZ", body);
        assert_eq!(f.get("url").map(String::as_str), Some("https://a/b"));
        assert_eq!(f.get("secret_token").map(String::as_str), Some("abc_1"));
    }
}
