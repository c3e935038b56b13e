//! Telegram through teloxide: the bots (the default one from
//! `TIERGATE_TELEGRAM_BOT_TOKEN`, and those admins or tenant admins
//! register, whose tokens are sealed at rest), sending with the errors
//! Telegram gives mapped to retry / permanent / unlink, the updates a bot
//! receives (`/start <code>` links a chat to a user, `/stop` unlinks), by
//! webhook with a per-bot secret token or by long polling, and the rate
//! shaping Telegram asks for (~30 messages a second per bot, ~1 a second
//! per chat).
//!
//! All bots share one HTTP pool (`Bot::with_client`); a `Bot` is an `Arc`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use teloxide::payloads::{GetUpdatesSetters, SendMessageSetters, SetWebhookSetters};
use teloxide::prelude::Requester;
use teloxide::types::{ChatId, ParseMode, Update, UpdateKind};
use teloxide::{ApiError, RequestError};

/// The id of the bot whose token is in the environment.
pub const DEFAULT_BOT: &str = "default";

/// A bot, ready to send.
#[derive(Clone)]
pub struct BotHandle {
    /// Our id (`default`, or a registered bot's UUID).
    pub id: String,
    /// Its `@username`, without the `@`.
    pub username: String,
    /// Telegram's id of it.
    pub telegram_id: i64,
    /// The organization whose bot it is.
    pub tenant_id: Option<String>,
    /// The client.
    pub bot: teloxide::Bot,
    /// What Telegram sends as `X-Telegram-Bot-Api-Secret-Token`.
    pub secret: String,
}

impl std::fmt::Debug for BotHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BotHandle")
            .field("id", &self.id)
            .field("username", &self.username)
            .field("tenant_id", &self.tenant_id)
            .finish_non_exhaustive()
    }
}

/// How a send failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendError {
    /// Telegram asked to wait (429 `retry_after`).
    RetryAfter(Duration),
    /// The user blocked the bot, deleted the chat or the account: unlink.
    Gone(String),
    /// This message can never be sent (empty, too long, bad markup).
    Permanent(String),
    /// The network, Telegram, or our token: retry.
    Transient(String),
    /// The chat became a supergroup with this id: send there.
    Migrated(i64),
}

/// `err` as [`SendError`].
pub fn classify(err: &RequestError) -> SendError {
    match err {
        RequestError::RetryAfter(s) => SendError::RetryAfter(s.duration()),
        RequestError::MigrateToChatId(c) => SendError::Migrated(c.0),
        RequestError::Api(
            e @ (ApiError::BotBlocked
            | ApiError::ChatNotFound
            | ApiError::UserDeactivated
            | ApiError::BotKicked
            | ApiError::BotKickedFromSupergroup
            | ApiError::CantInitiateConversation
            | ApiError::CantTalkWithBots),
        ) => SendError::Gone(e.to_string()),
        RequestError::Api(
            e @ (ApiError::MessageTextIsEmpty
            | ApiError::MessageIsTooLong
            | ApiError::CantParseEntities(_)),
        ) => SendError::Permanent(e.to_string()),
        RequestError::Api(e) => SendError::Transient(format!("Telegram: {e}")),
        RequestError::Network(_) => SendError::Transient(describe(err)),
        RequestError::InvalidJson { source, .. } => {
            SendError::Transient(format!("Telegram's answer is not JSON: {source}"))
        }
        RequestError::Io(e) => SendError::Transient(format!("Telegram: {e}")),
    }
}

/// What a network error was, without its URL (which holds the bot's
/// token: it must never reach a log line).
pub fn network_why(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    match std::error::Error::source(e) {
        Some(cause) => format!("{kind}: {cause}"),
        None => kind.to_owned(),
    }
}

/// `err` for a log line or an answer: never the request's URL (which
/// holds the token).
pub fn describe(err: &RequestError) -> String {
    match err {
        RequestError::Network(e) => format!("Telegram unreachable: {}", network_why(e)),
        other => other.to_string(),
    }
}

/// The bots this instance knows.
pub struct Bots {
    http: reqwest::Client,
    api_url: reqwest::Url,
    secret_key: [u8; 32],
    bots: RwLock<HashMap<String, Arc<BotHandle>>>,
}

impl std::fmt::Debug for Bots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bots").finish_non_exhaustive()
    }
}

impl Bots {
    /// No bots yet; Bot API at `api_url`; webhook secrets derived from
    /// `secret_key`.
    pub fn new(api_url: &str, secret_key: [u8; 32]) -> Result<Self, String> {
        let api_url = reqwest::Url::parse(api_url.trim_end_matches('/'))
            .map_err(|e| format!("telegram.api_url: {e}"))?;
        let http = teloxide::net::default_reqwest_settings()
            .build()
            .map_err(|e| format!("cannot build the Telegram client: {e}"))?;
        Ok(Self {
            http,
            api_url,
            secret_key,
            bots: RwLock::new(HashMap::new()),
        })
    }

    /// A client for `token` (not yet checked).
    pub fn client(&self, token: &str) -> teloxide::Bot {
        teloxide::Bot::with_client(token, self.http.clone()).set_api_url(self.api_url.clone())
    }

    /// The secret token of bot `id`'s webhook: HMAC-SHA256 of the id under
    /// a key derived from the service key (every instance agrees; nothing
    /// stored), base64url (Telegram allows `[A-Za-z0-9_-]`, 1–256).
    pub fn secret_of(&self, id: &str) -> String {
        use base64::Engine as _;
        let Ok(mut mac) = Hmac::<sha2::Sha256>::new_from_slice(&self.secret_key) else {
            return String::new();
        };
        mac.update(id.as_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    }

    /// Checks `token` with `getMe`: the bot's (telegram id, username).
    pub async fn check(&self, token: &str) -> Result<(i64, String), RequestError> {
        let me = self.client(token).get_me().await?;
        let username = me.user.username.clone().unwrap_or_default();
        Ok((i64::try_from(me.user.id.0).unwrap_or(i64::MAX), username))
    }

    /// Adds (or replaces) a bot.
    pub fn insert(
        &self,
        id: &str,
        token: &str,
        telegram_id: i64,
        username: &str,
        tenant_id: Option<String>,
    ) -> Arc<BotHandle> {
        let handle = Arc::new(BotHandle {
            id: id.to_owned(),
            username: username.to_owned(),
            telegram_id,
            tenant_id,
            bot: self.client(token),
            secret: self.secret_of(id),
        });
        if let Ok(mut bots) = self.bots.write() {
            bots.insert(id.to_owned(), handle.clone());
        }
        handle
    }

    /// Forgets a bot.
    pub fn remove(&self, id: &str) {
        if let Ok(mut bots) = self.bots.write() {
            bots.remove(id);
        }
    }

    /// Bot `id`.
    pub fn get(&self, id: &str) -> Option<Arc<BotHandle>> {
        self.bots.read().ok()?.get(id).cloned()
    }

    /// The bot of organization `tenant`, if it registered one.
    pub fn of_tenant(&self, tenant: &str) -> Option<Arc<BotHandle>> {
        self.bots
            .read()
            .ok()?
            .values()
            .find(|b| b.tenant_id.as_deref() == Some(tenant))
            .cloned()
    }

    /// Every bot.
    pub fn all(&self) -> Vec<Arc<BotHandle>> {
        self.bots
            .read()
            .map(|b| b.values().cloned().collect())
            .unwrap_or_default()
    }
}

/// Sends `html` (HTML parse mode) to `chat` as `bot`. Returns the message
/// id.
pub async fn send(bot: &BotHandle, chat: i64, html: &str) -> Result<i64, SendError> {
    bot.bot
        .send_message(ChatId(chat), html)
        .parse_mode(ParseMode::Html)
        .await
        .map(|m| i64::from(m.id.0))
        .map_err(|e| classify(&e))
}

/// Registers `url` as the bot's webhook with its secret token.
pub async fn set_webhook(bot: &BotHandle, url: &str) -> Result<(), String> {
    let url = reqwest::Url::parse(url).map_err(|e| format!("webhook URL: {e}"))?;
    bot.bot
        .set_webhook(url)
        .secret_token(bot.secret.clone())
        .await
        .map(|_| ())
        .map_err(|e| describe(&e))
}

/// What a chat said to a bot that we act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `/start <code>` (the code empty when it was sent bare).
    Start {
        /// The chat.
        chat: i64,
        /// The link code.
        code: String,
    },
    /// `/stop`.
    Stop {
        /// The chat.
        chat: i64,
    },
}

/// The command in `update`, if any. Only private chats link.
pub fn command(update: &Update) -> Option<Command> {
    let UpdateKind::Message(m) = &update.kind else {
        return None;
    };
    if !m.chat.is_private() {
        return None;
    }
    let text = m.text()?.trim();
    let (cmd, rest) = text.split_once(char::is_whitespace).unwrap_or((text, ""));
    // `/start@BotName` is how commands read in groups; accept it.
    let cmd = cmd.split('@').next().unwrap_or(cmd);
    match cmd {
        "/start" => Some(Command::Start {
            chat: m.chat.id.0,
            code: rest.trim().to_owned(),
        }),
        "/stop" => Some(Command::Stop { chat: m.chat.id.0 }),
        _ => None,
    }
}

/// One bot's long polling: `deleteWebhook`, then `getUpdates` (10 s
/// timeout) until the bot is removed; each update goes to `on_update`.
pub async fn poll<F, Fut>(bots: Arc<Bots>, id: String, on_update: F)
where
    F: Fn(Arc<BotHandle>, Update) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut offset: Option<i32> = None;
    let mut deleted = false;
    let mut backoff = Duration::from_secs(1);
    loop {
        let Some(bot) = bots.get(&id) else {
            return;
        };
        if !deleted {
            match bot.bot.delete_webhook().await {
                Ok(_) => deleted = true,
                Err(e) => {
                    tracing::warn!(bot = %bot.username, error = %describe(&e), "deleteWebhook failed; polling waits");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                    continue;
                }
            }
        }
        let mut req = bot.bot.get_updates().timeout(10);
        if let Some(o) = offset {
            req = req.offset(o);
        }
        match req.await {
            Ok(updates) => {
                backoff = Duration::from_secs(1);
                for u in updates {
                    offset = Some(i32::try_from(u.id.0).unwrap_or(i32::MAX).saturating_add(1));
                    on_update(bot.clone(), u).await;
                }
            }
            Err(e) => {
                let wait = match classify(&e) {
                    SendError::RetryAfter(d) => d,
                    _ => backoff,
                };
                tracing::warn!(bot = %bot.username, error = %describe(&e), "getUpdates failed");
                tokio::time::sleep(wait).await;
                backoff = (backoff * 2).min(Duration::from_secs(60));
            }
        }
    }
}

/// Rate shaping: the least time between two sends under one key (a bot,
/// a chat), per instance. [`Shaper::reserve`] books the next free slot
/// and says how long to wait for it.
#[derive(Debug, Default)]
pub struct Shaper {
    next: Mutex<HashMap<String, Instant>>,
}

impl Shaper {
    /// Books a send under `key` spaced `interval` from the previous one;
    /// the wait until it may go (zero with a zero interval).
    pub fn reserve(&self, key: &str, interval: Duration) -> Duration {
        if interval.is_zero() {
            return Duration::ZERO;
        }
        let now = Instant::now();
        let Ok(mut next) = self.next.lock() else {
            return Duration::ZERO;
        };
        if next.len() > 100_000 {
            next.retain(|_, t| *t > now);
        }
        let slot = next.get(key).copied().filter(|t| *t > now).unwrap_or(now);
        next.insert(key.to_owned(), slot + interval);
        slot - now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As the webhook reads it: from bytes.
    fn update(json: serde_json::Value) -> Update {
        serde_json::from_slice(json.to_string().as_bytes()).unwrap()
    }

    fn message(chat_type: &str, text: &str) -> Update {
        update(serde_json::json!({
            "update_id": 7,
            "message": {"message_id": 1, "date": 1_700_000_000,
                "chat": if chat_type == "private" {
                    serde_json::json!({"id": 42, "type": "private", "first_name": "Siti"})
                } else {
                    serde_json::json!({"id": -42, "type": chat_type, "title": "g"})
                },
                "from": {"id": 42, "is_bot": false, "first_name": "Siti"},
                "text": text}
        }))
    }

    #[test]
    fn test_commands() {
        assert_eq!(
            command(&message("private", "/start abc_DEF-1")),
            Some(Command::Start {
                chat: 42,
                code: "abc_DEF-1".into()
            })
        );
        assert_eq!(
            command(&message("private", "/start")),
            Some(Command::Start {
                chat: 42,
                code: String::new()
            })
        );
        assert_eq!(
            command(&message("private", "/start@TiergateBot  xyz ")),
            Some(Command::Start {
                chat: 42,
                code: "xyz".into()
            })
        );
        assert_eq!(
            command(&message("private", "/stop")),
            Some(Command::Stop { chat: 42 })
        );
        assert_eq!(command(&message("private", "hello")), None);
        assert_eq!(command(&message("group", "/start abc")), None);
    }

    #[test]
    fn test_errors_map_to_what_the_queue_does() {
        use teloxide::types::Seconds;
        assert_eq!(
            classify(&RequestError::RetryAfter(Seconds::from_seconds(5))),
            SendError::RetryAfter(Duration::from_secs(5))
        );
        assert!(matches!(
            classify(&RequestError::Api(ApiError::BotBlocked)),
            SendError::Gone(_)
        ));
        assert!(matches!(
            classify(&RequestError::Api(ApiError::ChatNotFound)),
            SendError::Gone(_)
        ));
        assert!(matches!(
            classify(&RequestError::Api(ApiError::MessageIsTooLong)),
            SendError::Permanent(_)
        ));
        assert!(matches!(
            classify(&RequestError::Api(ApiError::InvalidToken)),
            SendError::Transient(_)
        ));
        assert!(matches!(
            classify(&RequestError::Api(ApiError::Unknown("x".into()))),
            SendError::Transient(_)
        ));
    }

    #[test]
    fn test_shaper_spaces_sends_per_key() {
        let s = Shaper::default();
        let i = Duration::from_millis(100);
        assert_eq!(s.reserve("chat:1", i), Duration::ZERO);
        let w = s.reserve("chat:1", i);
        assert!(w > Duration::from_millis(50) && w <= i, "{w:?}");
        let w3 = s.reserve("chat:1", i);
        assert!(w3 > Duration::from_millis(150), "{w3:?}");
        assert_eq!(s.reserve("chat:2", i), Duration::ZERO);
        assert_eq!(s.reserve("chat:1", Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn test_webhook_secrets_are_stable_and_allowed_by_telegram() {
        let a = Bots::new("http://127.0.0.1:1", [7; 32]).unwrap();
        let b = Bots::new("http://127.0.0.1:1", [7; 32]).unwrap();
        let c = Bots::new("http://127.0.0.1:1", [8; 32]).unwrap();
        let s = a.secret_of("default");
        assert_eq!(s, b.secret_of("default"));
        assert_ne!(s, c.secret_of("default"));
        assert_ne!(s, a.secret_of("other"));
        assert!((1..=256).contains(&s.len()));
        assert!(s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'));
    }
}
