//! Service settings: the shared keys of `conf/services.yaml`, one
//! service's section of it, and environment overrides (env wins).
//!
//! ```yaml
//! data_dir: ./data
//! public_url: http://localhost:8000
//! environment: development
//! events:
//!   user.registered: [http://127.0.0.1:8024/internal/events]
//! services:
//!   users:
//!     server: { listen: 127.0.0.1:8021, workers: 2 }
//!     database: { url: sqlite://data/users.db, max_connections: 8 }
//! ```
//!
//! Secrets never come from this file: the service secret is
//! `TIERGATE_SERVICE_SECRET` (or `_FILE`), else a random one generated in
//! the data directory on first start; a database URL with a password
//! belongs in `TIERGATE_<SERVICE>_DATABASE_URL` (or `_FILE`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::outbox::Subscribers;
use crate::secret::Secret;

/// A settings error: the key's path and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// `development` (dev conveniences such as logging verification links) or
/// `production`. When neither `TIERGATE_ENV` nor the file says, the
/// command decides: `tiergate up` is development; `tiergate serve`,
/// `migrate` and `rotate-signing-key` are production.
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
    /// Subscriber URLs per event type.
    pub events: Subscribers,
    /// The secret service tokens are signed with.
    pub service_secret: Secret<String>,
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
#[serde(deny_unknown_fields)]
struct ServerDto {
    listen: Option<SocketAddr>,
    workers: Option<usize>,
    body_limit: Option<usize>,
}

impl ServerDto {
    fn resolve(self, default_port: u16) -> ServerSection {
        let d = ServerSection::on_port(default_port);
        ServerSection {
            listen: self.listen.unwrap_or(d.listen),
            workers: self.workers.unwrap_or(d.workers),
            body_limit: self.body_limit.unwrap_or(d.body_limit),
        }
    }
}

/// `services.<name>.database`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSection {
    /// `sqlite://PATH` or `postgres://...`; default
    /// `sqlite://<data_dir>/<service>.db`.
    pub url: Option<Secret<String>>,
    /// Pool size (default 8).
    pub max_connections: Option<u32>,
}

/// What a service runs with, after file and environment.
#[derive(Debug, Clone)]
pub struct Settings<S> {
    /// Shared keys.
    pub shared: Shared,
    /// Listener.
    pub server: ServerSection,
    /// Database URL (never logged).
    pub database_url: Secret<String>,
    /// Pool size.
    pub max_connections: u32,
    /// The service's own section.
    pub service: S,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct FileDto {
    data_dir: Option<PathBuf>,
    public_url: Option<String>,
    environment: Option<Environment>,
    events: BTreeMap<String, Vec<String>>,
    services: BTreeMap<String, serde_yaml_ng::Value>,
}

/// The section of one service: `server`, `database` and its own keys.
struct SectionDto<S> {
    server: ServerDto,
    database: DatabaseSection,
    own: S,
}

/// Splits `services.<name>` into `server`, `database` and the rest, each
/// deserialized on its own so that unknown keys are rejected everywhere
/// (serde's `flatten` would let them through).
fn section<S: DeserializeOwned>(
    service: &str,
    value: &serde_yaml_ng::Value,
) -> Result<SectionDto<S>, ConfigError> {
    let mut map = match value {
        serde_yaml_ng::Value::Mapping(m) => m.clone(),
        serde_yaml_ng::Value::Null => serde_yaml_ng::Mapping::new(),
        _ => {
            return Err(ConfigError(format!(
                "services.{service}: must be a mapping"
            )))
        }
    };
    let server = map
        .get("server")
        .cloned()
        .map(serde_yaml_ng::from_value::<ServerDto>)
        .transpose()
        .map_err(|e| ConfigError(format!("services.{service}.server: {e}")))?
        .unwrap_or_default();
    let database = map
        .get("database")
        .cloned()
        .map(serde_yaml_ng::from_value::<DatabaseSection>)
        .transpose()
        .map_err(|e| ConfigError(format!("services.{service}.database: {e}")))?
        .unwrap_or_default();
    map.remove("server");
    map.remove("database");
    let own = serde_yaml_ng::from_value(serde_yaml_ng::Value::Mapping(map))
        .map_err(|e| ConfigError(format!("services.{service}: {e}")))?;
    Ok(SectionDto {
        server,
        database,
        own,
    })
}

/// Reads settings for `service` from `file` (optional) and the
/// environment (`env(name)`, so tests can pass a map). `default_port` is
/// the service's standard port; `default_environment` applies when
/// neither `TIERGATE_ENV` nor the file names one.
pub fn load<S: DeserializeOwned + Default>(
    service: &str,
    default_port: u16,
    file: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
    default_environment: Environment,
) -> Result<Settings<S>, ConfigError> {
    let dto: FileDto = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
            serde_yaml_ng::from_str(&text)
                .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?
        }
        None => FileDto::default(),
    };
    let section: SectionDto<S> = match dto.services.get(service) {
        Some(value) => section(service, value)?,
        None => SectionDto {
            server: ServerDto::default(),
            database: DatabaseSection::default(),
            own: S::default(),
        },
    };
    let upper = service.to_ascii_uppercase();
    let data_dir = env("TIERGATE_DATA_DIR")
        .map(PathBuf::from)
        .or(dto.data_dir)
        .unwrap_or_else(|| PathBuf::from("data"));
    let public_url = env("TIERGATE_PUBLIC_URL")
        .or(dto.public_url)
        .unwrap_or_else(|| "http://localhost:8000".to_owned());
    let environment = match env("TIERGATE_ENV").as_deref() {
        Some("production") => Environment::Production,
        Some("development") => Environment::Development,
        Some(other) => {
            return Err(ConfigError(format!(
                "TIERGATE_ENV: `{other}` is neither development nor production"
            )))
        }
        None => dto.environment.unwrap_or(default_environment),
    };
    check_subscribers(&dto.events)?;
    let mut server = section.server.resolve(default_port);
    if let Some(listen) = env(&format!("TIERGATE_{upper}_LISTEN")) {
        server.listen = listen
            .parse()
            .map_err(|e| ConfigError(format!("TIERGATE_{upper}_LISTEN: `{listen}`: {e}")))?;
    }
    let env_url = secret_from(env, &format!("TIERGATE_{upper}_DATABASE_URL"))?;
    let database_url = env_url.or(section.database.url).unwrap_or_else(|| {
        Secret::new(format!(
            "sqlite://{}",
            data_dir.join(format!("{service}.db")).display()
        ))
    });
    let service_secret = match secret_from(env, "TIERGATE_SERVICE_SECRET")? {
        Some(s) => s,
        None => generated_secret(&data_dir)?,
    };
    Ok(Settings {
        shared: Shared {
            data_dir,
            public_url: public_url.trim_end_matches('/').to_owned(),
            environment,
            events: dto.events,
            service_secret,
        },
        server,
        database_url,
        max_connections: section.database.max_connections.unwrap_or(8),
        service: section.own,
    })
}

/// Rejects a subscriber URL that is not http(s), or that repeats under one
/// event type (a typo that would deliver every event twice).
fn check_subscribers(events: &Subscribers) -> Result<(), ConfigError> {
    for (event_type, urls) in events {
        for (i, url) in urls.iter().enumerate() {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(ConfigError(format!(
                    "events.{event_type}[{i}]: `{url}` is not an http(s) URL"
                )));
            }
            if urls[..i].contains(url) {
                return Err(ConfigError(format!(
                    "events.{event_type}[{i}]: `{url}` is listed twice"
                )));
            }
        }
    }
    Ok(())
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
            .map_err(|e| ConfigError(format!("{name}_FILE: cannot read {path}: {e}"))),
        None => Ok(None),
    }
}

/// The service secret of a single-host install: generated once into
/// `<data_dir>/service.secret` (mode 0600), shared by every service
/// that uses the same data directory.
fn generated_secret(data_dir: &Path) -> Result<Secret<String>, ConfigError> {
    let path = data_dir.join("service.secret");
    let err = |e: std::io::Error| ConfigError(format!("{}: {e}", path.display()));
    if let Ok(text) = std::fs::read_to_string(&path) {
        return Ok(Secret::new(text.trim().to_owned()));
    }
    std::fs::create_dir_all(data_dir).map_err(err)?;
    // Two services starting at once must end up with the same secret.
    let _lock = FileLock::acquire(&path).map_err(err)?;
    if let Ok(text) = std::fs::read_to_string(&path) {
        return Ok(Secret::new(text.trim().to_owned()));
    }
    let secret = crate::random_token(32)
        .map_err(|e| ConfigError(format!("cannot generate a service secret: {e}")))?;
    write_private(&path, secret.as_bytes()).map_err(err)?;
    tracing::info!(path = %path.display(), "generated a service secret");
    Ok(Secret::new(secret))
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
    #[serde(deny_unknown_fields, default)]
    struct Own {
        token_ttl_secs: u64,
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
                "data_dir: {}\nevents:\n  a.b: [http://x/e]\nservices:\n  users:\n    server: {{ listen: 127.0.0.1:9001 }}\n    token_ttl_secs: 7\n",
                dir.display()
            ),
        )
        .unwrap();
        let s = load_dev(&file).unwrap();
        assert_eq!(s.server.listen.port(), 9001);
        assert_eq!(s.service.token_ttl_secs, 7);
        assert_eq!(s.shared.events["a.b"], ["http://x/e"]);
        assert!(s.database_url.expose().ends_with("users.db"));
        assert!(s.shared.service_secret.expose().len() >= 32);
        let env = |k: &str| match k {
            "TIERGATE_USERS_LISTEN" => Some("127.0.0.1:9002".to_owned()),
            "TIERGATE_USERS_DATABASE_URL" => Some("postgres://u:p@h/db".to_owned()),
            _ => None,
        };
        let s: Settings<Own> =
            load("users", 8021, Some(&file), &env, Environment::Development).unwrap();
        assert_eq!(s.server.listen.port(), 9002);
        assert_eq!(s.database_url.expose(), "postgres://u:p@h/db");
        assert!(!format!("{s:?}").contains("u:p@"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_unknown_keys_are_rejected_with_their_place() {
        let (dir, file) = temp_config();
        std::fs::write(&file, "services:\n  users:\n    server: { lisen: x }\n").unwrap();
        let e = load_dev(&file).unwrap_err();
        assert!(
            e.0.contains("services.users") && e.0.contains("lisen"),
            "{e}"
        );
        std::fs::write(&file, "services:\n  users:\n    token_ttl_sec: 1\n").unwrap();
        let e = load_dev(&file).unwrap_err();
        assert!(
            e.0.contains("services.users") && e.0.contains("token_ttl_sec"),
            "{e}"
        );
        std::fs::write(&file, "data_dri: x\n").unwrap();
        let e = load_dev(&file).unwrap_err();
        assert!(e.0.contains("data_dri"), "{e}");
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

    #[test]
    fn test_repeated_or_malformed_subscriber_urls_are_rejected() {
        let (dir, file) = temp_config();
        for (yaml, expect) in [
            (
                "events:\n  a.b: [http://x/e, http://x/e]\n",
                "events.a.b[1]",
            ),
            ("events:\n  a.b: [x/e]\n", "events.a.b[0]"),
        ] {
            std::fs::write(&file, format!("data_dir: {}\n{yaml}", dir.display())).unwrap();
            let e = load_dev(&file).unwrap_err();
            assert!(e.0.contains(expect), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_concurrent_first_starts_agree_on_one_generated_secret() {
        let dir = std::env::temp_dir().join(format!("tg-cfg-{}", uuid::Uuid::now_v7()));
        let secrets: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| generated_secret(&dir).unwrap().expose().clone()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(secrets.iter().all(|x| x == &secrets[0]), "{secrets:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
