//! Usage metering: every admitted request with a caller is counted per
//! (subject, user, route) in memory, and the counts go in batches to the
//! subscriptions service (`POST /internal/usage`), which keeps them as
//! daily aggregates for quota reports.
//!
//! * **Request path** ([`Meter::record`]): one load of the current
//!   window (an `ArcSwap` guard, no reference count touched), one lookup
//!   in a lock-free hash map keyed by borrowed bytes, one atomic add. A
//!   new key allocates once per window.
//! * **Flusher** ([`run`], on the background thread): every
//!   `usage.flush_interval` the window is swapped for an empty one; once
//!   the requests still holding the old one are done with it (its
//!   reference count drops to one), its counts are read: nothing is
//!   counted twice or lost between windows. The rows become batches with
//!   an id (UUIDv7) in a bounded backlog, sent in order with a fresh
//!   service token each; a batch that failed is retried, with the same
//!   id, after a wait that doubles up to `usage.max_backoff`. The
//!   subscriptions service counts a batch id once, so a retry after a
//!   lost answer adds nothing. Beyond `usage.max_backlog_rows` the oldest
//!   batches are dropped and counted (`tiergate_usage_rows_dropped_total`).
//! * A window that straddles midnight is counted on the day it opened:
//!   batches carry the window's start and end.
//! * A graceful stop sends the last window and the backlog
//!   ([`final_flush`]) once the listeners have drained.

use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

use crate::auth::Identity;
use crate::config::UsageSettings;
use crate::secret::Secret;
use crate::snapshot::Snapshot;

/// The gateway's name as a caller of services: its tokens' issuer, the
/// name its public key is known by (`service_keys.gateway`).
pub const SERVICE_NAME: &str = "gateway";

/// A counter's key, owned (stored in the map once per window).
#[derive(Debug, PartialEq, Eq)]
struct Key {
    user: Box<[u8]>,
    tenant: Option<Box<[u8]>>,
    route: Box<str>,
}

/// A counter's key, borrowed from the request (looked up without
/// allocating).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct KeyRef<'a> {
    user: &'a [u8],
    tenant: Option<&'a [u8]>,
    route: &'a str,
}

impl Hash for KeyRef<'_> {
    fn hash<H: Hasher>(&self, h: &mut H) {
        h.write(self.user);
        match self.tenant {
            Some(t) => {
                h.write_u8(1);
                h.write(t);
            }
            None => h.write_u8(0),
        }
        h.write(self.route.as_bytes());
        h.write_usize(self.user.len() ^ (self.route.len() << 16));
    }
}

impl Key {
    fn as_ref(&self) -> KeyRef<'_> {
        KeyRef {
            user: &self.user,
            tenant: self.tenant.as_deref(),
            route: &self.route,
        }
    }
}

impl Hash for Key {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.as_ref().hash(h);
    }
}

impl papaya::Equivalent<Key> for KeyRef<'_> {
    fn equivalent(&self, key: &Key) -> bool {
        *self == key.as_ref()
    }
}

type Counts = papaya::HashMap<Key, AtomicU64, foldhash::fast::RandomState>;

/// The counts since the last flush.
#[derive(Debug)]
struct Window {
    /// Unix milliseconds when it opened.
    opened_ms: u64,
    counts: Counts,
}

impl Window {
    fn new(opened_ms: u64) -> Self {
        Self {
            opened_ms,
            counts: Counts::default(),
        }
    }
}

/// Whose usage a row counts: the active organization of the caller's
/// token, else the caller.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Subject {
    /// `user` or `organization`.
    pub kind: &'static str,
    /// Its id.
    pub id: String,
}

/// One aggregated row of a batch.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Row {
    /// The subject the request counts for.
    pub subject: Subject,
    /// The caller (`sub`).
    pub user_id: String,
    /// The route's name.
    pub route: String,
    /// Admitted requests.
    pub count: u64,
}

/// What `POST /internal/usage` receives.
#[derive(Debug, Clone, Serialize)]
pub struct Batch {
    /// Unique per batch; a retry sends the same id.
    pub batch_id: String,
    /// The gateway's service name.
    pub source: String,
    /// Start of the window counted (RFC 3339, UTC).
    pub from: String,
    /// Its end.
    pub to: String,
    /// The counts.
    pub rows: Vec<Row>,
}

/// Counters of the meter, read by `/metrics` and the status page.
#[derive(Debug, Default)]
pub struct UsageStats {
    /// Requests counted (added when a window is read).
    pub requests: AtomicU64,
    /// Rows the service accepted (duplicates included).
    pub rows_sent: AtomicU64,
    /// Rows dropped: backlog full, or a batch the service refused.
    pub rows_dropped: AtomicU64,
    /// Rows waiting to be sent.
    pub backlog_rows: AtomicU64,
    /// Batches accepted.
    pub batches_accepted: AtomicU64,
    /// Batches the service had already counted (a retry).
    pub batches_duplicate: AtomicU64,
    /// Attempts that failed and will be retried.
    pub batches_failed: AtomicU64,
    /// Batches the service refused as malformed (dropped).
    pub batches_rejected: AtomicU64,
    /// Unix milliseconds of the last accepted batch; 0: none yet.
    pub last_sent_ms: AtomicU64,
}

/// The process's usage meter; kept across reloads.
#[derive(Debug)]
pub struct Meter {
    window: ArcSwap<Window>,
    backlog: Mutex<VecDeque<Batch>>,
    last_error: Mutex<Option<String>>,
    /// Its counters.
    pub stats: UsageStats,
}

impl Default for Meter {
    fn default() -> Self {
        Self::new()
    }
}

impl Meter {
    /// An empty meter.
    pub fn new() -> Self {
        Self {
            window: ArcSwap::from_pointee(Window::new(now_ms())),
            backlog: Mutex::new(VecDeque::new()),
            last_error: Mutex::new(None),
            stats: UsageStats::default(),
        }
    }

    /// Counts one admitted request of `caller` on `route`.
    pub fn record(&self, caller: &Identity, route: &str) {
        self.count(
            caller.subject.as_bytes(),
            caller.tenant.as_ref().map(|t| t.as_bytes()),
            route,
        );
    }

    /// Counts one request of `user` (in `tenant`, when set) on `route`.
    pub fn count(&self, user: &[u8], tenant: Option<&[u8]>, route: &str) {
        let window = self.window.load();
        let counts = window.counts.pin();
        let key = KeyRef {
            user,
            tenant,
            route,
        };
        match counts.get(&key) {
            Some(n) => n.fetch_add(1, Ordering::Relaxed),
            None => counts
                .get_or_insert_with(
                    Key {
                        user: user.into(),
                        tenant: tenant.map(Into::into),
                        route: route.into(),
                    },
                    || AtomicU64::new(0),
                )
                .fetch_add(1, Ordering::Relaxed),
        };
    }

    /// Closes the current window and returns its rows (with the window's
    /// start), once no request is still counting into it.
    pub async fn rotate(&self, now_ms: u64) -> (u64, Vec<Row>) {
        let old = self.window.swap(Arc::new(Window::new(now_ms)));
        // `swap` turned every outstanding guard of `old` into a counted
        // reference: when only ours is left, every add into it is done.
        while Arc::strong_count(&old) > 1 {
            tokio::task::yield_now().await;
        }
        let counts = old.counts.pin();
        let mut rows = Vec::with_capacity(counts.len());
        let mut total = 0u64;
        for (key, n) in counts.iter() {
            let n = n.load(Ordering::Acquire);
            if n == 0 {
                continue;
            }
            total += n;
            let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
            rows.push(Row {
                subject: match &key.tenant {
                    Some(t) => Subject {
                        kind: "organization",
                        id: text(t),
                    },
                    None => Subject {
                        kind: "user",
                        id: text(&key.user),
                    },
                },
                user_id: text(&key.user),
                route: key.route.to_string(),
                count: n,
            });
        }
        self.stats.requests.fetch_add(total, Ordering::Relaxed);
        (old.opened_ms, rows)
    }

    /// Closes the window and queues its rows as batches for `settings`.
    pub async fn close_window(&self, settings: &UsageSettings) {
        let now = now_ms();
        let (from, rows) = self.rotate(now).await;
        if rows.is_empty() {
            return;
        }
        let batches = batches(rows, settings, from, now);
        self.enqueue(batches, settings.max_backlog_rows);
    }

    /// Adds batches to the backlog, dropping the oldest beyond `max_rows`.
    fn enqueue(&self, batches: Vec<Batch>, max_rows: usize) {
        let mut backlog = lock(&self.backlog);
        for b in batches {
            backlog.push_back(b);
        }
        let mut held: usize = backlog.iter().map(|b| b.rows.len()).sum();
        while held > max_rows {
            let Some(dropped) = backlog.pop_front() else {
                break;
            };
            held -= dropped.rows.len();
            self.stats
                .rows_dropped
                .fetch_add(dropped.rows.len() as u64, Ordering::Relaxed);
            tracing::warn!(
                batch = %dropped.batch_id,
                rows = dropped.rows.len(),
                "usage backlog full; the oldest batch is dropped"
            );
        }
        self.stats
            .backlog_rows
            .store(held as u64, Ordering::Relaxed);
    }

    /// The oldest unsent batch.
    fn front(&self) -> Option<Batch> {
        lock(&self.backlog).front().cloned()
    }

    /// Removes the batch `id` from the front of the backlog (it was sent,
    /// or refused for good).
    fn pop(&self, id: &str) {
        let mut backlog = lock(&self.backlog);
        if backlog.front().is_some_and(|b| b.batch_id == id) {
            backlog.pop_front();
        }
        let held: usize = backlog.iter().map(|b| b.rows.len()).sum();
        self.stats
            .backlog_rows
            .store(held as u64, Ordering::Relaxed);
    }

    /// Why the last attempt failed, while it is the latest outcome.
    pub fn last_error(&self) -> Option<String> {
        lock(&self.last_error).clone()
    }

    fn set_error(&self, error: Option<String>) {
        *lock(&self.last_error) = error;
    }
}

/// The guard of `m`, also when a panicking holder poisoned it.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Splits rows into batches of at most `settings.max_batch_rows`.
fn batches(rows: Vec<Row>, settings: &UsageSettings, from_ms: u64, to_ms: u64) -> Vec<Batch> {
    let (from, to) = (rfc3339(from_ms), rfc3339(to_ms));
    let size = settings.max_batch_rows.max(1);
    let mut out = Vec::with_capacity(rows.len().div_ceil(size));
    let mut rows = rows.into_iter().peekable();
    while rows.peek().is_some() {
        out.push(Batch {
            batch_id: uuid::Uuid::now_v7().to_string(),
            source: SERVICE_NAME.to_owned(),
            from: from.clone(),
            to: to.clone(),
            rows: rows.by_ref().take(size).collect(),
        });
    }
    out
}

/// The HTTP client of a background task calling a service; `None` (and
/// logged with `without`, what then does not happen) when none can be
/// built.
pub(crate) fn service_client(without: &str) -> Option<reqwest::Client> {
    match reqwest::Client::builder()
        .pool_idle_timeout(Duration::from_secs(90))
        .build()
    {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::error!(error = %e, "cannot build an HTTP client; {without}");
            None
        }
    }
}

/// Unix milliseconds now.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Unix milliseconds as RFC 3339 UTC (`2026-12-02T17:00:00.000Z`).
fn rfc3339(ms: u64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

/// Signs the gateway's service tokens (EdDSA, as the services expect:
/// `iss` = `sub` = the gateway's name, `aud` = the service called, 60 s,
/// a unique `jti`).
pub struct Signer {
    key: EncodingKey,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(<redacted>)")
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
    jti: String,
}

impl Signer {
    /// From the PKCS#8 PEM of an Ed25519 key.
    pub fn from_pem(pem: &Secret) -> Result<Self, String> {
        use base64::Engine as _;
        let bad = |why: &str| {
            format!("TIERGATE_GATEWAY_SERVICE_KEY: not an Ed25519 PKCS#8 PEM key: {why}")
        };
        let text = pem.expose().trim();
        let body = text
            .strip_prefix("-----BEGIN PRIVATE KEY-----")
            .and_then(|t| t.strip_suffix("-----END PRIVATE KEY-----"))
            .ok_or_else(|| bad("no PRIVATE KEY block"))?;
        let b64: String = body.split_whitespace().collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| bad("its body is not base64"))?;
        // PKCS#8 of Ed25519: the algorithm identifier 1.3.101.112.
        const ED25519_OID: [u8; 5] = [0x06, 0x03, 0x2b, 0x65, 0x70];
        if !der.windows(ED25519_OID.len()).any(|w| w == ED25519_OID) {
            return Err(bad("not an Ed25519 key"));
        }
        Ok(Self {
            key: EncodingKey::from_ed_der(&der),
        })
    }

    /// A fresh token from `issuer` for one call to `audience`.
    pub fn token(&self, issuer: &str, audience: &str) -> Result<String, String> {
        let iat = now_ms() / 1000;
        let claims = Claims {
            iss: issuer,
            sub: issuer,
            aud: audience,
            iat,
            exp: iat + 60,
            jti: uuid::Uuid::now_v7().to_string(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &self.key)
            .map_err(|e| format!("cannot sign a service token: {e}"))
    }
}

/// How one batch's delivery ended.
#[derive(Debug, PartialEq, Eq)]
enum Sent {
    /// Counted now.
    Accepted,
    /// Counted before (a retry whose first answer was lost).
    Duplicate,
    /// Refused for good (malformed): dropped.
    Rejected(String),
    /// Not delivered: retried later.
    Failed(String),
}

async fn send(
    client: &reqwest::Client,
    settings: &UsageSettings,
    signer: &Signer,
    batch: &Batch,
) -> Sent {
    let token = match signer.token(SERVICE_NAME, &settings.audience) {
        Ok(t) => t,
        Err(e) => return Sent::Failed(e),
    };
    let answer = client
        .post(&settings.endpoint)
        .bearer_auth(token)
        .timeout(settings.timeout)
        .json(batch)
        .send()
        .await;
    let resp = match answer {
        Ok(r) => r,
        Err(e) => return Sent::Failed(format!("{}: {e}", settings.endpoint)),
    };
    let status = resp.status();
    if status.is_success() {
        let duplicate = resp
            .json::<serde_json::Value>()
            .await
            .ok()
            .and_then(|v| v.get("duplicate").and_then(serde_json::Value::as_bool))
            .unwrap_or(false);
        return if duplicate {
            Sent::Duplicate
        } else {
            Sent::Accepted
        };
    }
    let body = resp.text().await.unwrap_or_default();
    let why = format!("{}: {status}: {}", settings.endpoint, body.trim());
    // 400/413/422: this batch can never be accepted. Anything else (a 401
    // while the service does not know the gateway's key yet, a 5xx, a
    // 429) may pass later.
    if matches!(status.as_u16(), 400 | 413 | 422) {
        Sent::Rejected(why)
    } else {
        Sent::Failed(why)
    }
}

/// Sends the backlog in order until it is empty or a batch fails.
/// `Ok(())` when nothing is left to retry.
async fn drain(
    meter: &Meter,
    client: &reqwest::Client,
    settings: &UsageSettings,
    signer: &Signer,
) -> Result<(), ()> {
    let stats = &meter.stats;
    while let Some(batch) = meter.front() {
        let rows = batch.rows.len() as u64;
        match send(client, settings, signer, &batch).await {
            outcome @ (Sent::Accepted | Sent::Duplicate) => {
                let counter = if outcome == Sent::Accepted {
                    &stats.batches_accepted
                } else {
                    &stats.batches_duplicate
                };
                counter.fetch_add(1, Ordering::Relaxed);
                stats.rows_sent.fetch_add(rows, Ordering::Relaxed);
                stats.last_sent_ms.store(now_ms(), Ordering::Relaxed);
                meter.pop(&batch.batch_id);
                meter.set_error(None);
            }
            Sent::Rejected(why) => {
                tracing::error!(batch = %batch.batch_id, rows, error = %why, "usage batch refused; dropped");
                stats.batches_rejected.fetch_add(1, Ordering::Relaxed);
                stats.rows_dropped.fetch_add(rows, Ordering::Relaxed);
                meter.pop(&batch.batch_id);
                meter.set_error(Some(why));
            }
            Sent::Failed(why) => {
                tracing::warn!(batch = %batch.batch_id, rows, error = %why, "usage batch not delivered; retried later");
                stats.batches_failed.fetch_add(1, Ordering::Relaxed);
                meter.set_error(Some(why));
                return Err(());
            }
        }
    }
    Ok(())
}

/// At a graceful stop, once no request is left: closes the last window and
/// sends what is held, within `usage.timeout`. Run from outside the
/// background runtime (`handle` is its handle; its thread still runs).
pub fn final_flush(
    handle: &tokio::runtime::Handle,
    meter: &Meter,
    state: &ArcSwap<Snapshot>,
    signer: Option<&Signer>,
) {
    let (Some(settings), Some(signer)) = (state.load().usage.clone(), signer) else {
        return;
    };
    let Ok(client) = reqwest::Client::builder().build() else {
        return;
    };
    handle.block_on(async {
        meter.close_window(&settings).await;
        let sent =
            tokio::time::timeout(settings.timeout, drain(meter, &client, &settings, signer)).await;
        let held = meter.stats.backlog_rows.load(Ordering::Relaxed);
        match sent {
            Ok(Ok(())) => tracing::info!("usage: the last counts were sent"),
            _ => tracing::warn!(
                rows = held,
                "usage: stopping with counts not sent; they are lost"
            ),
        }
    });
}

/// The flusher: closes a window every `usage.flush_interval` of the live
/// config and sends the backlog, backing off while the service fails.
/// Runs until the background runtime stops.
pub async fn run(meter: Arc<Meter>, state: Arc<ArcSwap<Snapshot>>, signer: Option<Arc<Signer>>) {
    let Some(client) = service_client("usage metering: nothing is sent") else {
        return;
    };
    let mut wait: Option<Duration> = None;
    let mut retry_at = tokio::time::Instant::now();
    loop {
        let settings = state.load().usage.clone();
        let interval = settings
            .as_ref()
            .map_or(Duration::from_secs(1), |s| s.flush_interval);
        tokio::time::sleep(interval).await;
        let Some(settings) = settings else {
            continue;
        };
        meter.close_window(&settings).await;
        let Some(signer) = signer.as_deref() else {
            continue;
        };
        if tokio::time::Instant::now() < retry_at {
            continue;
        }
        match drain(&meter, &client, &settings, signer).await {
            Ok(()) => wait = None,
            Err(()) => {
                let next = wait.map_or(settings.flush_interval, |w| w * 2);
                let next = next.min(settings.max_backoff);
                wait = Some(next);
                retry_at = tokio::time::Instant::now() + next;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(max_batch_rows: usize, max_backlog_rows: usize) -> UsageSettings {
        UsageSettings {
            endpoint: "http://127.0.0.1:1/internal/usage".into(),
            audience: "subscriptions".into(),
            flush_interval: Duration::from_secs(1),
            max_batch_rows,
            max_backlog_rows,
            timeout: Duration::from_secs(1),
            max_backoff: Duration::from_secs(4),
        }
    }

    fn total(rows: &[Row]) -> u64 {
        rows.iter().map(|r| r.count).sum()
    }

    #[tokio::test]
    async fn test_counts_are_per_subject_user_and_route() {
        let m = Meter::new();
        for _ in 0..3 {
            m.count(b"ann", None, "api");
        }
        m.count(b"ann", Some(b"acme"), "api");
        m.count(b"ann", None, "billing");
        m.count(b"bob", Some(b"acme"), "api");
        let (_, mut rows) = m.rotate(now_ms()).await;
        rows.sort_by(|a, b| {
            (&a.subject.id, &a.user_id, &a.route).cmp(&(&b.subject.id, &b.user_id, &b.route))
        });
        let seen: Vec<(&str, &str, &str, &str, u64)> = rows
            .iter()
            .map(|r| {
                (
                    r.subject.kind,
                    r.subject.id.as_str(),
                    r.user_id.as_str(),
                    r.route.as_str(),
                    r.count,
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("organization", "acme", "ann", "api", 1),
                ("organization", "acme", "bob", "api", 1),
                ("user", "ann", "ann", "api", 3),
                ("user", "ann", "ann", "billing", 1),
            ]
        );
        let (_, empty) = m.rotate(now_ms()).await;
        assert!(empty.is_empty(), "a window is read once");
        assert_eq!(m.stats.requests.load(Ordering::Relaxed), 6);
    }

    #[test]
    fn test_nothing_is_lost_or_doubled_while_windows_rotate_under_load() {
        let m = Arc::new(Meter::new());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let threads = 4;
        let per_thread = 200_000u64;
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let m = m.clone();
                std::thread::spawn(move || {
                    let user = format!("user-{}", t % 2);
                    for i in 0..per_thread {
                        let route = if i % 3 == 0 { "a" } else { "b" };
                        m.count(user.as_bytes(), None, route);
                    }
                })
            })
            .collect();
        let mut counted = 0;
        while workers.iter().any(|w| !w.is_finished()) {
            counted += total(&rt.block_on(m.rotate(now_ms())).1);
        }
        for w in workers {
            w.join().unwrap();
        }
        counted += total(&rt.block_on(m.rotate(now_ms())).1);
        assert_eq!(counted, threads * per_thread);
    }

    fn batch(id: &str, rows: usize) -> Batch {
        Batch {
            batch_id: id.into(),
            source: "gateway".into(),
            from: String::new(),
            to: String::new(),
            rows: (0..rows)
                .map(|i| Row {
                    subject: Subject {
                        kind: "user",
                        id: format!("u{i}"),
                    },
                    user_id: format!("u{i}"),
                    route: "api".into(),
                    count: 1,
                })
                .collect(),
        }
    }

    #[test]
    fn test_a_full_backlog_drops_the_oldest_batches_and_counts_their_rows() {
        let m = Meter::new();
        m.enqueue(vec![batch("a", 3), batch("b", 3)], 8);
        assert_eq!(m.stats.backlog_rows.load(Ordering::Relaxed), 6);
        m.enqueue(vec![batch("c", 3)], 8);
        assert_eq!(m.front().unwrap().batch_id, "b");
        assert_eq!(m.stats.rows_dropped.load(Ordering::Relaxed), 3);
        assert_eq!(m.stats.backlog_rows.load(Ordering::Relaxed), 6);
        m.pop("c");
        assert_eq!(m.front().unwrap().batch_id, "b", "only the front is popped");
        m.pop("b");
        assert_eq!(m.front().unwrap().batch_id, "c");
    }

    #[test]
    fn test_rows_are_split_into_batches_of_the_configured_size() {
        let rows = batch("x", 7).rows;
        let out = batches(rows, &settings(3, 100), 0, 5_000);
        let sizes: Vec<usize> = out.iter().map(|b| b.rows.len()).collect();
        assert_eq!(sizes, [3, 3, 1]);
        assert_eq!(out[0].from, "1970-01-01T00:00:00.000Z");
        assert_eq!(out[0].to, "1970-01-01T00:00:05.000Z");
        let mut ids: Vec<&str> = out.iter().map(|b| b.batch_id.as_str()).collect();
        ids.dedup();
        assert_eq!(ids.len(), 3, "each batch has its own id");
    }

    #[test]
    fn test_the_signer_keeps_its_key_out_of_debug() {
        // A PKCS#8 Ed25519 key (RFC 8410 §10.3's example).
        let pem = Secret::new(
            "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC\n-----END PRIVATE KEY-----\n"
                .into(),
        );
        let s = Signer::from_pem(&pem).unwrap();
        assert!(!format!("{s:?}").contains("MC4C"));
        let token = s.token("gateway", "subscriptions").unwrap();
        assert_eq!(token.split('.').count(), 3);
        assert!(Signer::from_pem(&Secret::new("not a key".into())).is_err());
    }
}
