//! `tiergate`: the command line. Thin by design: parse arguments, load the
//! config, hand over to the `gateway` crate.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use backend_common::config::Environment;
use clap::{Parser, Subcommand};
use gateway::config::{self, Config, ConfigErrors, LoadError, RunMode};
use gateway::error::GatewayError;
use gateway::server::GatewayServer;
use lua_free_plugins::Registry;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The default config, used by `tiergate up` when `conf/tiergate.yaml` is absent.
const DEFAULT_CONFIG: &str = include_str!("../conf/tiergate.yaml");
/// Where `up` looks for its config first.
const DEFAULT_CONFIG_PATH: &str = "conf/tiergate.yaml";

/// Exit code for an invalid config (EX_USAGE, as linkerd does).
const EXIT_BAD_CONFIG: u8 = 64;
/// Exit code for a config that cannot be read (EX_NOINPUT).
const EXIT_NO_INPUT: u8 = 66;
/// Exit code when the server cannot start (EX_SOFTWARE).
const EXIT_START_FAILED: u8 = 70;

#[derive(Debug, Parser)]
#[command(
    name = "tiergate",
    version,
    about = "A Pingora-based programmable edge gateway"
)]
struct Cli {
    /// Log format of the gateway's own logs: `json` (default for `gateway`,
    /// the production mode) or `text` (default for `up` and `check-config`).
    /// Also `TIERGATE_LOG_FORMAT`.
    #[arg(long, global = true, env = "TIERGATE_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

/// How the gateway's own log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// One JSON object per line (for log shippers).
    Json,
    /// Human-readable lines.
    Text,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run everything: the business services (conf/services.yaml, else
    /// defaults: SQLite under ./data) and the gateway with conf/tiergate.yaml
    /// (or the built-in default).
    Up {
        /// Config file; defaults to conf/tiergate.yaml, else the built-in default.
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Run only the gateway.
    Gateway {
        /// Config file.
        #[arg(short, long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Binary upgrade: take the listening sockets over from the running
        /// gateway (then send it SIGQUIT) instead of binding them.
        #[arg(long)]
        upgrade: bool,
    },
    /// Validate a config file offline and report every error with its path and line.
    CheckConfig {
        /// Config file.
        file: PathBuf,
    },
    /// Print the JSON Schema of the gateway config (conf/tiergate.schema.json).
    ConfigSchema,
    /// Run one business service alone (production: one process per service).
    Serve {
        /// The service.
        #[arg(value_enum)]
        service: Service,
        /// Services config; defaults to conf/services.yaml when present.
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Apply every service's database migrations, then exit.
    Migrate {
        /// Services config; defaults to conf/services.yaml when present.
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Generate a new access-token signing key in the data directory now.
    /// Running users services sign with it within a minute; the previous
    /// key stays in the JWKS until its tokens have expired.
    RotateSigningKey {
        /// Services config; defaults to conf/services.yaml when present.
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
}

/// The business services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Service {
    /// Accounts and tokens (port 8021).
    Users,
}

/// Where `serve`, `migrate` and `up` look for the services config.
const DEFAULT_SERVICES_PATH: &str = "conf/services.yaml";

fn services_file(explicit: Option<PathBuf>) -> Option<PathBuf> {
    explicit.or_else(|| {
        let p = PathBuf::from(DEFAULT_SERVICES_PATH);
        p.exists().then_some(p)
    })
}

fn users_settings(
    file: Option<&Path>,
    environment: Environment,
) -> Result<users::UsersSettings, ExitCode> {
    users::load_settings(file, environment).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(EXIT_BAD_CONFIG)
    })
}

/// Starts the business services in this process (for `up`).
fn start_services(
    file: Option<&Path>,
) -> Result<Vec<backend_common::app::RunningService>, ExitCode> {
    let settings = users_settings(file, Environment::Development)?;
    let running = users::start(settings).map_err(|e| {
        eprintln!("error: users service: {e}");
        ExitCode::from(EXIT_START_FAILED)
    })?;
    tracing::info!(addr = %running.addr, "users service running");
    Ok(vec![running])
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let production = matches!(cli.command, Command::Gateway { .. } | Command::Serve { .. });
    init_logging(cli.log_format.unwrap_or(if production {
        LogFormat::Json
    } else {
        LogFormat::Text
    }));
    match cli.command {
        Command::Serve { service, config } => {
            let file = services_file(config);
            match service {
                Service::Users => match users_settings(file.as_deref(), Environment::Production) {
                    Ok(settings) => match users::start(settings) {
                        Ok(running) => match running.run_until_signal() {
                            Ok(()) => ExitCode::SUCCESS,
                            Err(e) => {
                                eprintln!("error: users service: {e}");
                                ExitCode::from(EXIT_START_FAILED)
                            }
                        },
                        Err(e) => {
                            eprintln!("error: users service: {e}");
                            ExitCode::from(EXIT_START_FAILED)
                        }
                    },
                    Err(code) => code,
                },
            }
        }
        Command::RotateSigningKey { config } => {
            let file = services_file(config);
            let settings = match users_settings(file.as_deref(), Environment::Production) {
                Ok(s) => s,
                Err(code) => return code,
            };
            match users::rotate_signing_key(&settings) {
                Ok(kids) => {
                    println!(
                        "users: signing key {} is active; published: {}",
                        kids.first().map(String::as_str).unwrap_or(""),
                        kids.join(", ")
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: users: {e}");
                    ExitCode::from(EXIT_START_FAILED)
                }
            }
        }
        Command::Migrate { config } => {
            let file = services_file(config);
            let settings = match users_settings(file.as_deref(), Environment::Production) {
                Ok(s) => s,
                Err(code) => return code,
            };
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(EXIT_START_FAILED);
                }
            };
            match runtime.block_on(users::migrate(&settings)) {
                Ok(()) => {
                    println!("users: migrations applied");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: users: {e}");
                    ExitCode::from(EXIT_START_FAILED)
                }
            }
        }
        Command::Up { config } => {
            let _services = match start_services(services_file(None).as_deref()) {
                Ok(s) => s,
                Err(code) => return code,
            };
            let loaded = match &config {
                Some(path) => load(path),
                None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
                    load(Path::new(DEFAULT_CONFIG_PATH))
                }
                None => {
                    tracing::info!(
                        "{DEFAULT_CONFIG_PATH} not found; using the built-in default config"
                    );
                    config::parse(DEFAULT_CONFIG).map_err(|e| report(&e))
                }
            };
            let watched = config.or_else(|| {
                let p = PathBuf::from(DEFAULT_CONFIG_PATH);
                p.exists().then_some(p)
            });
            match loaded {
                Ok(config) => serve(&config, watched.as_deref(), false, RunMode::Development),
                Err(code) => code,
            }
        }
        Command::Gateway {
            config: path,
            upgrade,
        } => match load(&path) {
            Ok(config) => serve(&config, Some(&path), upgrade, RunMode::Production),
            Err(code) => code,
        },
        Command::ConfigSchema => {
            print!("{}", config::json_schema());
            ExitCode::SUCCESS
        }
        Command::CheckConfig { file } => match load(&file) {
            Ok(config) => {
                println!(
                    "{}: ok ({} routes, {} upstreams)",
                    file.display(),
                    config.routes.len(),
                    config.upstreams.len()
                );
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
    }
}

fn load(path: &Path) -> Result<Config, ExitCode> {
    config::load_file(path).map_err(|e| match e {
        LoadError::Unreadable { .. } => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_NO_INPUT)
        }
        LoadError::Invalid(errors) => {
            eprintln!("{}:", path.display());
            report(&errors)
        }
    })
}

fn report(errors: &ConfigErrors) -> ExitCode {
    eprint!("{errors}");
    ExitCode::from(EXIT_BAD_CONFIG)
}

/// Runs the gateway; with `file`, reloads it on change and on SIGHUP; with
/// `upgrade`, takes the listeners over from the running gateway. `mode`
/// applies unless the config sets `environment`.
fn serve(config: &Config, file: Option<&Path>, upgrade: bool, mode: RunMode) -> ExitCode {
    let env = match gateway::secret::Environment::from_env() {
        Ok(env) => gateway::secret::Environment {
            default_mode: mode,
            ..env
        },
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_START_FAILED);
        }
    };
    let built = GatewayServer::build_with(config, &env, upgrade).and_then(|server| match file {
        Some(path) => server.watch(path, Registry::with_builtins()),
        None => Ok(server),
    });
    match built {
        Ok(server) => {
            server.run();
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(match e {
                GatewayError::Config(_) | GatewayError::Load(_) | GatewayError::Unsafe(_) => {
                    EXIT_BAD_CONFIG
                }
                GatewayError::Resolve { .. }
                | GatewayError::PoolSize { .. }
                | GatewayError::Server(_) => EXIT_START_FAILED,
            })
        }
    }
}

/// The default log filter (`RUST_LOG` replaces it). Pingora logs an
/// ERROR "failed to acquire reusable stream" when two requests race for one
/// pooled upstream connection; it then opens a new one, so nothing failed.
/// That module logs nothing else at error level, so it is silenced; its
/// submodules (connect errors and the like) keep the default level.
const DEFAULT_LOG_FILTER: &str = "info,pingora_core::connectors=off,\
     pingora_core::connectors::http=info,pingora_core::connectors::l4=info,\
     pingora_core::connectors::offload=info";

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
        LogFormat::Text => builder.init(),
    }
}
