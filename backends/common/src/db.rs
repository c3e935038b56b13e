//! The database: one code path for SQLite (the embedded default) and
//! PostgreSQL, through sqlx's `Any` driver.
//!
//! Portable SQL only: `$1`-style placeholders numbered in order of first
//! use (SQLite reads `$N` as a named parameter and numbers them in order of
//! appearance), `TEXT` ids, `BIGINT` integers (money in whole rupiah (`money::Rupiah`; the rupiah has no minor unit in use), times
//! in Unix milliseconds), no `RETURNING`-specific or vendor-only syntax.

use std::path::Path;
use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::migrate::Migrator;
use sqlx::AnyPool;
use sqlx::Executor;

use crate::secret::{redact_url, Secret};

/// Which server is behind the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbKind {
    /// An SQLite file.
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

/// Why the database could not be opened or migrated.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The URL is neither `sqlite:` nor `postgres:`.
    #[error("unsupported database URL `{0}` (use sqlite://PATH or postgres://...)")]
    UnsupportedUrl(String),
    /// The directory of an SQLite file could not be created.
    #[error("cannot create {path}: {source}")]
    CreateDir {
        /// The directory.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Connecting failed.
    #[error("cannot connect to {url}: {source}")]
    Connect {
        /// The URL, password masked.
        url: String,
        /// The cause.
        source: sqlx::Error,
    },
    /// A migration failed.
    #[error("migrating {url}: {source}")]
    Migrate {
        /// The URL, password masked.
        url: String,
        /// The cause.
        source: sqlx::migrate::MigrateError,
    },
}

/// A connection pool and the kind of server behind it. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Db {
    pool: AnyPool,
    kind: DbKind,
}

/// The outbox and consumer tables every service has (`migrations/common`).
static COMMON_MIGRATIONS: Migrator = sqlx::migrate!("../../migrations/common");

impl Db {
    /// Opens a pool. An SQLite file and its directory are created when
    /// missing, and the file is switched to WAL so readers never block the
    /// writer. Waits for the database up to the default
    /// `database.acquire_timeout` ([`Db::connect_with`]).
    pub async fn connect(url: &Secret<String>, max_connections: u32) -> Result<Self, DbError> {
        Self::connect_with(url, max_connections, crate::config::DEFAULT_ACQUIRE_TIMEOUT).await
    }

    /// [`Db::connect`], where a query waits up to `acquire_timeout` for a
    /// connection of the pool and, on SQLite, as long again for the write
    /// lock (its busy timeout). Either wait running out is answered 503
    /// `unavailable` (see [`crate::error::ApiError`]'s `From<sqlx::Error>`).
    pub async fn connect_with(
        url: &Secret<String>,
        max_connections: u32,
        acquire_timeout: Duration,
    ) -> Result<Self, DbError> {
        sqlx::any::install_default_drivers();
        let raw = url.expose().as_str();
        let shown = redact_url(raw);
        let (kind, url) = if let Some(path) = raw
            .strip_prefix("sqlite://")
            .or_else(|| raw.strip_prefix("sqlite:"))
        {
            let file = path.split('?').next().unwrap_or(path);
            if file != ":memory:" {
                if let Some(dir) = Path::new(file)
                    .parent()
                    .filter(|d| !d.as_os_str().is_empty())
                {
                    std::fs::create_dir_all(dir).map_err(|source| DbError::CreateDir {
                        path: dir.display().to_string(),
                        source,
                    })?;
                }
            }
            let url = if path.contains("mode=") {
                format!("sqlite://{path}")
            } else if path.contains('?') {
                format!("sqlite://{path}&mode=rwc")
            } else {
                format!("sqlite://{path}?mode=rwc")
            };
            (DbKind::Sqlite, url)
        } else if raw.starts_with("postgres://") || raw.starts_with("postgresql://") {
            (DbKind::Postgres, raw.to_owned())
        } else {
            return Err(DbError::UnsupportedUrl(shown));
        };
        let busy_ms = i32::try_from(acquire_timeout.as_millis()).unwrap_or(i32::MAX);
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(acquire_timeout)
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if kind == DbKind::Sqlite {
                        // How long a write waits for the lock another
                        // connection holds (sqlx's default is 5 s).
                        conn.execute(sqlx::AssertSqlSafe(format!(
                            "PRAGMA busy_timeout = {busy_ms}"
                        )))
                        .await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await
            .map_err(|source| DbError::Connect {
                url: shown.clone(),
                source,
            })?;
        if kind == DbKind::Sqlite {
            pool.execute("PRAGMA journal_mode = WAL")
                .await
                .map_err(|source| DbError::Connect { url: shown, source })?;
        }
        Ok(Self { pool, kind })
    }

    /// Applies the common migrations (outbox, consumed events) and then
    /// the service's own, in version order. Already applied ones are
    /// skipped; an edited applied migration is an error (append-only).
    pub async fn migrate(&self, service: &Migrator) -> Result<(), DbError> {
        let migrations = COMMON_MIGRATIONS
            .iter()
            .chain(service.iter())
            .cloned()
            .collect();
        let migrator = Migrator::with_migrations(migrations);
        migrator
            .run(&self.pool)
            .await
            .map_err(|source| DbError::Migrate {
                url: self.kind_name().to_owned(),
                source,
            })
    }

    /// Begins a transaction that will write. On SQLite it takes the write
    /// lock at once (`BEGIN IMMEDIATE`), waiting for it up to the busy
    /// timeout: a deferred transaction that reads first and writes later
    /// fails at once (`database is locked`) when another connection wrote
    /// meanwhile, which the busy timeout does not cover. On PostgreSQL it
    /// is a plain `BEGIN`. Use it for every transaction that writes.
    pub async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
        match self.kind {
            DbKind::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await,
            DbKind::Postgres => self.pool.begin().await,
        }
    }

    /// The pool.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// The kind of server.
    pub fn kind(&self) -> DbKind {
        self.kind
    }

    fn kind_name(&self) -> &'static str {
        match self.kind {
            DbKind::Sqlite => "sqlite",
            DbKind::Postgres => "postgres",
        }
    }

    /// Whether the database answers a trivial query within a second.
    pub async fn ping(&self) -> bool {
        matches!(
            tokio::time::timeout(Duration::from_secs(1), self.pool.execute("SELECT 1")).await,
            Ok(Ok(_))
        )
    }

    /// Closes the pool, waiting for connections in use to be returned.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// A unique or foreign-key constraint as each database reports its
/// violation: PostgreSQL by the constraint's name, SQLite by
/// `table.column[, table.column]` for a unique one (it names no foreign
/// key: `FOREIGN KEY`).
#[derive(Debug, Clone, Copy)]
pub struct Constraint {
    /// The constraint's (or unique index's) name, for PostgreSQL.
    pub name: &'static str,
    /// What SQLite names after `constraint failed: `.
    pub sqlite: &'static str,
}

/// Whether `e` is a violation of `constraint`, so each unique or
/// foreign-key violation can map to its own 409 or 422 (sqlx's examples'
/// `on_constraint`).
pub fn on_constraint(e: &sqlx::Error, constraint: &Constraint) -> bool {
    let Some(db) = e.as_database_error() else {
        return false;
    };
    if db.constraint() == Some(constraint.name) {
        return true;
    }
    db.message()
        .split_once("constraint failed: ")
        .is_some_and(|(_, what)| what.trim() == constraint.sqlite)
        || (constraint.sqlite == "FOREIGN KEY"
            && db.message().contains("FOREIGN KEY constraint failed"))
}

/// Whether a query failed on a unique constraint (a duplicate email, an
/// event already consumed): the caller turns it into a 409 or a no-op.
pub fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.is_unique_violation())
}

/// Whether a query failed because the database was busy, not because of
/// the query: SQLite's write lock still held by another connection when the
/// busy timeout ran out (`SQLITE_BUSY`, `database is locked`; or
/// `SQLITE_LOCKED`), PostgreSQL's `lock_not_available` (a `lock_timeout`
/// ran out). Worth retrying: a request answers it 503 `unavailable`.
pub fn is_busy(e: &sqlx::Error) -> bool {
    let Some(db) = e.as_database_error() else {
        return false;
    };
    let code = db.code();
    if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
        // Primary result codes SQLITE_BUSY (5) and SQLITE_LOCKED (6), with
        // their extended codes (`SQLITE_BUSY_SNAPSHOT` = 517, ...).
        return code
            .and_then(|c| c.parse::<i32>().ok())
            .is_some_and(|c| matches!(c & 0xff, 5 | 6));
    }
    db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
        .is_some()
        && code.as_deref() == Some("55P03")
}

/// Now, in Unix milliseconds: the time type of every table. Services read
/// the time from their [`crate::clock::Clock`]; this is for tools.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn test_a_write_lock_held_past_the_busy_timeout_is_busy_and_unavailable() {
        let dir = std::env::temp_dir().join(format!("tg-db-{}", uuid::Uuid::now_v7()));
        let url = Secret::new(format!("sqlite://{}", dir.join("t.db").display()));
        let db = Db::connect_with(&url, 2, Duration::from_millis(200))
            .await
            .unwrap();
        let held = db.begin_write().await.unwrap();
        let e = db.begin_write().await.unwrap_err();
        assert!(is_busy(&e), "{e}");
        let api = crate::error::ApiError::from(e);
        assert_eq!(
            (api.status().as_u16(), api.code(), api.retry_after()),
            (503, "unavailable", Some(1))
        );
        drop(held);
        // Once the lock is free, a write goes through.
        db.begin_write().await.unwrap().commit().await.unwrap();
        assert!(!is_busy(&sqlx::Error::RowNotFound));
        db.close().await;
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
