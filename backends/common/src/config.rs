//! Service settings: the shared keys of `conf/services.yaml`, one
//! service's section of it, and environment overrides (env wins).
//!
//! ```yaml
//! data_dir: ./data
//! public_url: http://localhost:8000
//! environment: development
//! time_zone: Asia/Jakarta
//! peers: { billing: http://10.0.0.5:8025 }
//! service_keys: { payments: 3q2-... }
//! events:
//!   user.registered: [notifications]
//! services:
//!   users:
//!     server: { listen: 127.0.0.1:8021, workers: 2 }
//!     database: { url: sqlite://data/users.db, max_connections: 8, acquire_timeout: 5s }
//! ```
//!
//! Every problem is reported, each with its key, not only the first
//! ([`ConfigError`]); the CLI prints them and exits 64.
//!
//! Secrets never come from this file: a service's key is
//! `TIERGATE_<SERVICE>_SERVICE_KEY` (or `_FILE`; see
//! [`crate::service_auth`]); a database URL with a password belongs in
//! `TIERGATE_<SERVICE>_DATABASE_URL` (or `_FILE`).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::calendar::BusinessCalendar;
use crate::outbox::{Subscriber, Subscribers};
use crate::secret::Secret;
use crate::service_auth::KeySource;

/// The standard ports of tiergate's services (SPEC §3): where a peer is
/// reached when `peers` does not say otherwise.
pub const STANDARD_PORTS: [(&str, u16); 6] = [
    ("gateway", 8000),
    ("users", 8021),
    ("subscriptions", 8022),
    ("payments", 8023),
    ("notifications", 8024),
    ("billing", 8025),
];

/// Every problem found in the settings, each `key: what is wrong`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub Vec<String>);

impl ConfigError {
    /// One problem.
    pub fn one(message: impl Into<String>) -> Self {
        Self(vec![message.into()])
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.as_slice() {
            [one] => f.write_str(one),
            many => {
                write!(f, "{} errors in the services config:", many.len())?;
                for e in many {
                    write!(f, "\n  - {e}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for ConfigError {}

/// `development` (dev conveniences such as logging verification links and
/// generated keys) or `production`. When neither `TIERGATE_ENV` nor the
/// file says, the command decides: `tiergate up` is development;
/// `tiergate serve`, `migrate` and the service commands are production.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    /// Local development (the `tiergate up` default).
    Development,
    /// Production: no development shortcuts.
    Production,
}

/// The keys every service shares.
#[derive(Debug, Clone)]
pub struct Shared {
    /// Where SQLite files and generated keys live.
    pub data_dir: PathBuf,
    /// The public base URL (the gateway), for links in e-mails.
    pub public_url: String,
    /// Development or production.
    pub environment: Environment,
    /// Subscribers per event type.
    pub events: Subscribers,
    /// Base URL of each service (`http://host:port`), by name.
    pub peers: BTreeMap<String, String>,
    /// Public keys of services, by name (base64url).
    pub service_keys: BTreeMap<String, String>,
    /// The business time zone's calendar.
    pub calendar: BusinessCalendar,
    /// What the users service's access tokens carry.
    pub access_tokens: AccessTokens,
}

/// `access_tokens`: the `iss` and `aud` of the users service's access
/// tokens, which every service checks (the gateway's `auth.issuer` and
/// `auth.audience`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct AccessTokens {
    /// `iss`.
    pub issuer: String,
    /// `aud`.
    pub audience: String,
}

impl Default for AccessTokens {
    fn default() -> Self {
        Self {
            issuer: "tiergate-users".to_owned(),
            audience: "tiergate".to_owned(),
        }
    }
}

/// `services.<name>.server`.
#[derive(Debug, Clone)]
pub struct ServerSection {
    /// Listen address.
    pub listen: SocketAddr,
    /// Actix worker threads.
    pub workers: usize,
    /// Largest JSON body, in bytes.
    pub body_limit: usize,
}

impl ServerSection {
    /// Defaults for a service on `port` (loopback).
    pub fn on_port(port: u16) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], port)),
            ..Self::default()
        }
    }
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            workers: 2,
            body_limit: crate::json::DEFAULT_BODY_LIMIT,
        }
    }
}

/// `services.<name>.server` as written: an omitted key keeps its default
/// (the service's own port for `listen`).
#[derive(Deserialize, Default)]
#[serde(default)]
struct ServerDto {
    listen: Option<SocketAddr>,
    workers: Option<usize>,
    body_limit: Option<usize>,
}

/// `services.<name>.database`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
pub struct DatabaseSection {
    /// `sqlite://PATH` or `postgres://...`; default
    /// `sqlite://<data_dir>/<service>.db`.
    pub url: Option<Secret<String>>,
    /// Pool size (default 8).
    pub max_connections: Option<u32>,
    /// Longest wait for the database (default `5s`): for a connection of
    /// the pool, and on SQLite for its write lock.
    pub acquire_timeout: Option<String>,
}

/// `database.acquire_timeout` when unset.
pub const DEFAULT_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest `database.acquire_timeout`.
const MAX_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(600);

/// What a service runs with, after file and environment.
#[derive(Debug, Clone)]
pub struct Settings<S> {
    /// The service's name.
    pub name: &'static str,
    /// Shared keys.
    pub shared: Shared,
    /// Listener.
    pub server: ServerSection,
    /// Database URL (never logged).
    pub database_url: Secret<String>,
    /// Pool size.
    pub max_connections: u32,
    /// Longest wait for a pooled connection, and on SQLite for the write
    /// lock; past it a request gets 503 `unavailable`.
    pub acquire_timeout: Duration,
    /// `TIERGATE_<NAME>_SERVICE_KEY[_FILE]`.
    pub service_key: Option<Secret<String>>,
    /// `TIERGATE_<NAME>_SERVICE_KEY_PREVIOUS[_FILE]`: the key it replaced,
    /// still used to open outbox payloads sealed before the rotation.
    pub previous_service_key: Option<Secret<String>>,
    /// The service's own section.
    pub service: S,
}

impl<S> Settings<S> {
    /// Where this service's key comes from ([`crate::service_auth`]).
    pub fn key_source(&self) -> KeySource {
        KeySource {
            name: self.name.to_owned(),
            pem: self.service_key.clone(),
            previous_pem: self.previous_service_key.clone(),
            data_dir: self.shared.data_dir.clone(),
            environment: self.shared.environment,
            known: self
                .shared
                .service_keys
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<HashMap<_, _>>(),
        }
    }

    /// The base URL of service `name` (`peers.<name>`, else its standard
    /// port on 127.0.0.1).
    pub fn peer_url(&self, name: &str) -> Option<&str> {
        self.shared.peers.get(name).map(String::as_str)
    }
}

/// A service's own settings section: checked after it is read.
pub trait ServiceConfig: DeserializeOwned + Default {
    /// Reads what only the environment may hold (secrets) into `self`.
    fn read_env(&mut self, _env: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        Ok(())
    }

    /// Every problem with the values, each `services.<name>.<key>: …`.
    fn problems(&self) -> Vec<String> {
        Vec::new()
    }
}

/// The file as written. Unknown keys are collected (every one is
/// reported), not rejected at the first.
#[derive(Deserialize, Default)]
#[serde(default)]
struct FileDto {
    data_dir: Option<PathBuf>,
    public_url: Option<String>,
    environment: Option<Environment>,
    time_zone: Option<String>,
    access_tokens: AccessTokens,
    peers: BTreeMap<String, String>,
    service_keys: BTreeMap<String, String>,
    events: BTreeMap<String, Vec<String>>,
    services: BTreeMap<String, serde_yaml_ng::Value>,
}

/// Deserializes `value` as `T`, adding every key `T` does not know (as
/// `at.key`) to `errors`; a type error is added too, and gives `None`.
fn strict<T: DeserializeOwned>(
    at: &str,
    value: serde_yaml_ng::Value,
    errors: &mut Vec<String>,
) -> Option<T> {
    let mut unknown = Vec::new();
    let result = serde_ignored::deserialize(value, |path| unknown.push(path.to_string()));
    for key in unknown {
        let place = if at.is_empty() {
            key
        } else {
            format!("{at}.{key}")
        };
        errors.push(format!("{place}: unknown key"));
    }
    match result {
        Ok(v) => Some(v),
        Err(e) => {
            let place = if at.is_empty() { "the file" } else { at };
            errors.push(format!("{place}: {e}"));
            None
        }
    }
}

/// Reads settings for `service` from `file` (optional) and the
/// environment (`env(name)`, so tests can pass a map). `default_port` is
/// the service's standard port; `default_environment` applies when
/// neither `TIERGATE_ENV` nor the file names one.
pub fn load<S: ServiceConfig>(
    service: &'static str,
    default_port: u16,
    file: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
    default_environment: Environment,
) -> Result<Settings<S>, ConfigError> {
    let mut errors = Vec::new();
    let dto: FileDto = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| ConfigError::one(format!("{}: {e}", path.display())))?;
            let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text)
                .map_err(|e| ConfigError::one(format!("{}: {e}", path.display())))?;
            let value = match value {
                serde_yaml_ng::Value::Null => serde_yaml_ng::Value::Mapping(Default::default()),
                v => v,
            };
            strict("", value, &mut errors).unwrap_or_default()
        }
        None => FileDto::default(),
    };
    let section = dto
        .services
        .get(service)
        .cloned()
        .unwrap_or(serde_yaml_ng::Value::Null);
    let mut map = match section {
        serde_yaml_ng::Value::Mapping(m) => m,
        serde_yaml_ng::Value::Null => serde_yaml_ng::Mapping::new(),
        _ => {
            errors.push(format!("services.{service}: must be a mapping"));
            serde_yaml_ng::Mapping::new()
        }
    };
    let mut take = |key: &str| {
        map.remove(key)
            .unwrap_or(serde_yaml_ng::Value::Mapping(Default::default()))
    };
    let server_dto: ServerDto = strict(
        &format!("services.{service}.server"),
        take("server"),
        &mut errors,
    )
    .unwrap_or_default();
    let database: DatabaseSection = strict(
        &format!("services.{service}.database"),
        take("database"),
        &mut errors,
    )
    .unwrap_or_default();
    let mut own: S = strict(
        &format!("services.{service}"),
        serde_yaml_ng::Value::Mapping(map),
        &mut errors,
    )
    .unwrap_or_default();
    let upper = service.to_ascii_uppercase();
    let data_dir = env("TIERGATE_DATA_DIR")
        .map(PathBuf::from)
        .or(dto.data_dir)
        .unwrap_or_else(|| PathBuf::from("data"));
    let public_url = env("TIERGATE_PUBLIC_URL")
        .or(dto.public_url)
        .unwrap_or_else(|| "http://localhost:8000".to_owned());
    if !(public_url.starts_with("http://") || public_url.starts_with("https://")) {
        errors.push(format!("public_url: `{public_url}` is not an http(s) URL"));
    }
    let environment = match env("TIERGATE_ENV").as_deref() {
        Some("production") => Environment::Production,
        Some("development") => Environment::Development,
        Some(other) => {
            errors.push(format!(
                "TIERGATE_ENV: `{other}` is neither development nor production"
            ));
            default_environment
        }
        None => dto.environment.unwrap_or(default_environment),
    };
    let zone = env("TIERGATE_TIME_ZONE")
        .or(dto.time_zone)
        .unwrap_or_else(|| crate::calendar::DEFAULT_ZONE.to_owned());
    let calendar = BusinessCalendar::new(&zone).unwrap_or_else(|e| {
        errors.push(format!("time_zone: {e}"));
        BusinessCalendar::jakarta()
    });
    let peers = peers(&dto.peers, env, &mut errors);
    let events = subscribers(&dto.events, &peers, &mut errors);
    let server = ServerSection {
        listen: match env(&format!("TIERGATE_{upper}_LISTEN")) {
            Some(listen) => listen.parse().unwrap_or_else(|e| {
                errors.push(format!("TIERGATE_{upper}_LISTEN: `{listen}`: {e}"));
                SocketAddr::from(([127, 0, 0, 1], default_port))
            }),
            None => server_dto
                .listen
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], default_port))),
        },
        workers: server_dto.workers.unwrap_or(2),
        body_limit: server_dto
            .body_limit
            .unwrap_or(crate::json::DEFAULT_BODY_LIMIT),
    };
    if server.workers == 0 {
        errors.push(format!(
            "services.{service}.server.workers: must be at least 1"
        ));
    }
    if server.body_limit < 1024 {
        errors.push(format!(
            "services.{service}.server.body_limit: must be at least 1024 bytes"
        ));
    }
    let mut secret = |name: &str| match secret_from(env, name) {
        Ok(v) => v,
        Err(e) => {
            errors.extend(e.0);
            None
        }
    };
    let env_url = secret(&format!("TIERGATE_{upper}_DATABASE_URL"));
    let service_key = secret(&format!("TIERGATE_{upper}_SERVICE_KEY"));
    let previous_service_key = secret(&format!("TIERGATE_{upper}_SERVICE_KEY_PREVIOUS"));
    let database_url = env_url.or(database.url).unwrap_or_else(|| {
        Secret::new(format!(
            "sqlite://{}",
            data_dir.join(format!("{service}.db")).display()
        ))
    });
    let max_connections = database.max_connections.unwrap_or(8);
    if max_connections == 0 {
        errors.push(format!(
            "services.{service}.database.max_connections: must be at least 1"
        ));
    }
    let acquire_timeout = match database.acquire_timeout.as_deref() {
        None => DEFAULT_ACQUIRE_TIMEOUT,
        Some(text) => match parse_duration(text) {
            Some(d) if !d.is_zero() && d <= MAX_ACQUIRE_TIMEOUT => d,
            _ => {
                errors.push(format!(
                    "services.{service}.database.acquire_timeout: `{text}` is not a duration from 1ms to 10m (`5s`, `500ms`, `1m`)"
                ));
                DEFAULT_ACQUIRE_TIMEOUT
            }
        },
    };
    if let Err(e) = own.read_env(env) {
        errors.extend(e.0);
    }
    errors.extend(own.problems());
    if !errors.is_empty() {
        return Err(ConfigError(errors));
    }
    Ok(Settings {
        name: service,
        shared: Shared {
            data_dir,
            public_url: public_url.trim_end_matches('/').to_owned(),
            environment,
            events,
            peers,
            service_keys: dto.service_keys,
            calendar,
            access_tokens: dto.access_tokens,
        },
        server,
        database_url,
        max_connections,
        acquire_timeout,
        service_key,
        previous_service_key,
        service: own,
    })
}

/// A duration as the file writes it: `5s`, `500ms`, `1m 30s` (or ISO
/// 8601, `PT5S`); `None` when it is not one, or negative.
fn parse_duration(text: &str) -> Option<Duration> {
    let d: jiff::SignedDuration = text.trim().parse().ok()?;
    Duration::try_from(d).ok()
}

/// Every service's base URL: `peers` from the file over the standard
/// ports, `TIERGATE_<NAME>_URL` over both.
fn peers(
    file: &BTreeMap<String, String>,
    env: &dyn Fn(&str) -> Option<String>,
    errors: &mut Vec<String>,
) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = STANDARD_PORTS
        .iter()
        .map(|(name, port)| ((*name).to_owned(), format!("http://127.0.0.1:{port}")))
        .collect();
    for (name, url) in file {
        out.insert(name.clone(), url.clone());
    }
    let names: Vec<String> = out.keys().cloned().collect();
    for name in names {
        if let Some(url) = env(&format!("TIERGATE_{}_URL", name.to_ascii_uppercase())) {
            out.insert(name, url);
        }
    }
    for (name, url) in &mut out {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            errors.push(format!("peers.{name}: `{url}` is not an http(s) URL"));
        }
        *url = url.trim_end_matches('/').to_owned();
    }
    out
}

/// Resolves each subscriber: a service name delivers to that peer's
/// `/internal/events` (its token's audience is the name); a URL is used
/// as written. A subscriber may not repeat under one type (it would get
/// every event twice).
fn subscribers(
    events: &BTreeMap<String, Vec<String>>,
    peers: &BTreeMap<String, String>,
    errors: &mut Vec<String>,
) -> Subscribers {
    let mut out = Subscribers::new();
    for (event_type, entries) in events {
        let mut list = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            if entries[..i].contains(entry) {
                errors.push(format!(
                    "events.{event_type}[{i}]: `{entry}` is listed twice"
                ));
                continue;
            }
            if entry.starts_with("http://") || entry.starts_with("https://") {
                // A URL under a peer's base is that peer (its audience).
                let audience = peers
                    .iter()
                    .find(|(_, base)| entry.starts_with(base.as_str()))
                    .map_or_else(|| "external".to_owned(), |(name, _)| name.clone());
                list.push(Subscriber::url(entry, &audience));
            } else if let Some(base) = peers.get(entry) {
                list.push(Subscriber::service(entry, base));
            } else {
                errors.push(format!(
                    "events.{event_type}[{i}]: `{entry}` is neither a service ({}) nor an http(s) URL",
                    peers.keys().cloned().collect::<Vec<_>>().join(", ")
                ));
            }
        }
        out.insert(event_type.clone(), list);
    }
    out
}

/// The process environment, for [`load`].
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// A secret from `env`: `name` itself, else the file named by
/// `name_FILE` (trailing newline trimmed, as Docker and Kubernetes secrets
/// are written). `Ok(None)` when neither is set.
pub fn secret_from(
    env: &dyn Fn(&str) -> Option<String>,
    name: &str,
) -> Result<Option<Secret<String>>, ConfigError> {
    if let Some(v) = env(name) {
        return Ok(Some(Secret::new(v)));
    }
    match env(&format!("{name}_FILE")) {
        Some(path) => std::fs::read_to_string(&path)
            .map(|t| Some(Secret::new(t.trim_end_matches(['\n', '\r']).to_owned())))
            .map_err(|e| ConfigError::one(format!("{name}_FILE: cannot read {path}: {e}"))),
        None => Ok(None),
    }
}

/// An exclusive advisory lock (`flock`) on `<path>.lock`, held until
/// dropped: processes sharing a data directory take it around a
/// read-modify-write of `path`, so none of them loses another's write.
#[derive(Debug)]
pub struct FileLock(std::fs::File);

impl FileLock {
    /// Blocks until the lock is held.
    pub fn acquire(path: &Path) -> std::io::Result<Self> {
        let mut name = path.as_os_str().to_owned();
        name.push(".lock");
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(PathBuf::from(name))?;
        file.lock()?;
        Ok(Self(file))
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

/// Writes a file readable only by its owner (keys, secrets), atomically:
/// a concurrent reader sees the old file or the whole new one.
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut f = options.open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(default)]
    struct Own {
        token_ttl_secs: u64,
    }

    impl ServiceConfig for Own {
        fn problems(&self) -> Vec<String> {
            (self.token_ttl_secs > 100)
                .then(|| "services.users.token_ttl_secs: at most 100".to_owned())
                .into_iter()
                .collect()
        }
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn load_dev(file: &Path) -> Result<Settings<Own>, ConfigError> {
        load("users", 8021, Some(file), &no_env, Environment::Development)
    }

    /// A fresh directory and the path of a config file in it.
    fn temp_config() -> (PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!("tg-cfg-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("services.yaml");
        (dir, file)
    }

    #[test]
    fn test_file_and_env_combine_and_env_wins() {
        let (dir, file) = temp_config();
        std::fs::write(
            &file,
            format!(
                "data_dir: {}\nevents:\n  a.b: [http://x/e, billing]\nservices:\n  users:\n    server: {{ listen: 127.0.0.1:9001 }}\n    token_ttl_secs: 7\n",
                dir.display()
            ),
        )
        .unwrap();
        let s = load_dev(&file).unwrap();
        assert_eq!(s.server.listen.port(), 9001);
        assert_eq!(s.service.token_ttl_secs, 7);
        assert_eq!(s.shared.events["a.b"][0].url, "http://x/e");
        assert_eq!(
            s.shared.events["a.b"][1],
            Subscriber::service("billing", "http://127.0.0.1:8025")
        );
        assert!(s.database_url.expose().ends_with("users.db"));
        assert_eq!(s.shared.calendar.zone_name(), "Asia/Jakarta");
        let env = |k: &str| match k {
            "TIERGATE_USERS_LISTEN" => Some("127.0.0.1:9002".to_owned()),
            "TIERGATE_USERS_DATABASE_URL" => Some("postgres://u:p@h/db".to_owned()),
            "TIERGATE_BILLING_URL" => Some("http://b.internal:9/".to_owned()),
            _ => None,
        };
        let s: Settings<Own> =
            load("users", 8021, Some(&file), &env, Environment::Development).unwrap();
        assert_eq!(s.server.listen.port(), 9002);
        assert_eq!(s.database_url.expose(), "postgres://u:p@h/db");
        assert_eq!(s.peer_url("billing"), Some("http://b.internal:9"));
        assert_eq!(
            s.shared.events["a.b"][1].url,
            "http://b.internal:9/internal/events"
        );
        assert!(!format!("{s:?}").contains("u:p@"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_database_acquire_timeout_is_a_duration_with_a_default() {
        let (dir, file) = temp_config();
        let with = |database: &str| {
            std::fs::write(
                &file,
                format!(
                    "data_dir: {}\nservices:\n  users:\n    database: {database}\n",
                    dir.display()
                ),
            )
            .unwrap();
            load_dev(&file)
        };
        assert_eq!(with("{}").unwrap().acquire_timeout, DEFAULT_ACQUIRE_TIMEOUT);
        assert_eq!(
            with("{ acquire_timeout: 30s }").unwrap().acquire_timeout,
            Duration::from_secs(30)
        );
        assert_eq!(
            with("{ acquire_timeout: 1m 30s }").unwrap().acquire_timeout,
            Duration::from_secs(90)
        );
        assert_eq!(
            with("{ acquire_timeout: 250ms }").unwrap().acquire_timeout,
            Duration::from_millis(250)
        );
        for bad in ["0s", "-5s", "11m", "soon"] {
            let e = with(&format!("{{ acquire_timeout: \"{bad}\" }}")).unwrap_err();
            assert!(
                e.0.iter().any(|m| m.starts_with(&format!(
                    "services.users.database.acquire_timeout: `{bad}` is not a duration"
                ))),
                "{e}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_every_problem_is_reported_with_its_key() {
        let (dir, file) = temp_config();
        std::fs::write(
            &file,
            "data_dri: x\ntime_zone: Mars/Olympus\npeers: { billing: ftp://b }\nevents:\n  a.b: [nobody, http://x/e, http://x/e]\nservices:\n  users:\n    server: { lisen: x, workers: 0 }\n    token_ttl_sec: 1\n    token_ttl_secs: 500\n",
        )
        .unwrap();
        let env = |k: &str| (k == "TIERGATE_ENV").then(|| "staging".to_owned());
        let e =
            load::<Own>("users", 8021, Some(&file), &env, Environment::Development).unwrap_err();
        for expected in [
            "data_dri: unknown key",
            "services.users.server.lisen: unknown key",
            "services.users.token_ttl_sec: unknown key",
            "services.users.server.workers: must be at least 1",
            "services.users.token_ttl_secs: at most 100",
            "TIERGATE_ENV: `staging`",
            "time_zone: unknown time zone `Mars/Olympus`",
            "peers.billing: `ftp://b` is not an http(s) URL",
            "events.a.b[0]: `nobody` is neither a service",
            "events.a.b[2]: `http://x/e` is listed twice",
        ] {
            assert!(
                e.0.iter().any(|m| m.starts_with(expected)),
                "missing `{expected}` in {e}"
            );
        }
        assert!(
            e.to_string()
                .starts_with("10 errors in the services config:"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_partial_server_section_keeps_the_service_port_and_environment_default() {
        let (dir, file) = temp_config();
        std::fs::write(
            &file,
            format!(
                "data_dir: {}\nservices:\n  users:\n    server: {{ workers: 3 }}\n",
                dir.display()
            ),
        )
        .unwrap();
        let s: Settings<Own> =
            load("users", 8021, Some(&file), &no_env, Environment::Production).unwrap();
        assert_eq!(s.server.listen, SocketAddr::from(([127, 0, 0, 1], 8021)));
        assert_eq!(s.server.workers, 3);
        assert_eq!(s.shared.environment, Environment::Production);
        let dev = |k: &str| (k == "TIERGATE_ENV").then(|| "development".to_owned());
        let s: Settings<Own> =
            load("users", 8021, Some(&file), &dev, Environment::Production).unwrap();
        assert_eq!(s.shared.environment, Environment::Development);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
