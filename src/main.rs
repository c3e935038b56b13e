//! `tiergate`: the command line. Thin by design: parse arguments, load the
//! config, hand over to the `gateway` crate or to the services in the
//! registry ([`SERVICES`]).

mod startup;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use backend_common::config::Environment;
use backend_common::service::{CommandError, Entry, Registered};
use clap::{Parser, Subcommand};
use gateway::config::{self, Config, ConfigErrors, LoadError, RunMode};
use gateway::error::GatewayError;
use gateway::server::GatewayServer;
use lua_free_plugins::Registry;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Every business service: `serve <name>`, `migrate`, `up`, `events` and
/// `service-key` find them here. Adding a service is one line.
static SERVICES: &[&dyn Registered] = &[
    &Entry::<users::UsersService>::NEW,
    &Entry::<subscriptions::SubscriptionsService>::NEW,
    &Entry::<payments::PaymentsService>::NEW,
    &Entry::<billing::BillingService>::NEW,
    &Entry::<notifications::NotificationsService>::NEW,
];

/// The default config, used by `tiergate up` when `conf/tiergate.yaml` is absent.
const DEFAULT_CONFIG: &str = include_str!("../conf/tiergate.yaml");
/// Where `up` looks for its config first.
const DEFAULT_CONFIG_PATH: &str = "conf/tiergate.yaml";
/// Where `serve`, `migrate` and `up` look for the services config.
const DEFAULT_SERVICES_PATH: &str = "conf/services.yaml";

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
    about = "A Pingora-based programmable edge gateway and the business services behind it"
)]
struct Cli {
    /// Log format of the process's own logs: `json` (default for `gateway`
    /// and `serve`, the production modes) or `text` (default otherwise).
    /// Also `TIERGATE_LOG_FORMAT`.
    #[arg(long, global = true, env = "TIERGATE_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

/// How the process's own log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// One JSON object per line (for log shippers).
    Json,
    /// Human-readable lines.
    Text,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run everything: every business service (conf/services.yaml, else
    /// defaults: SQLite under ./data), then the gateway with
    /// conf/tiergate.yaml (or the built-in default).
    Up {
        /// Gateway config; defaults to conf/tiergate.yaml, else the built-in default.
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Services config; defaults to conf/services.yaml when present.
        #[arg(short, long)]
        services: Option<PathBuf>,
        /// Also start the local Midtrans sandbox (127.0.0.1:8029) and point
        /// payments at it with the sandbox's key: pay offline with
        /// `tiergate sandbox pay <order_id>`.
        #[arg(long)]
        sandbox: bool,
    },
    /// The local Midtrans sandbox: run it, or act in it as the customer
    /// or the bank would (never in production).
    Sandbox {
        /// Where it listens (running it) or where it runs (the actions).
        #[arg(long, default_value = "127.0.0.1:8029")]
        listen: String,
        /// Where it sends notifications; default the gateway's
        /// `<TIERGATE_PUBLIC_URL or http://127.0.0.1:8000>/api/payments/webhooks/midtrans`.
        #[arg(long)]
        notify: Option<String>,
        #[command(subcommand)]
        action: Option<SandboxAction>,
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
    /// Validate a gateway config file offline and report every error with its path and line.
    CheckConfig {
        /// Config file.
        file: PathBuf,
    },
    /// Print the JSON Schema of the gateway config (conf/tiergate.schema.json).
    ConfigSchema,
    /// Run one business service alone (production: one process per service).
    Serve {
        /// The service (see `tiergate services`).
        service: String,
        /// Services config; defaults to conf/services.yaml when present.
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Apply the database migrations of every service (or those named), then exit.
    Migrate {
        /// Only these services.
        services: Vec<String>,
        /// Services config; defaults to conf/services.yaml when present.
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// List the business services.
    Services,
    /// Print a service's public service key (for `service_keys.<name>` on
    /// the services that it calls); in development the key is generated
    /// under the data directory when missing.
    ServiceKey {
        /// The service.
        service: String,
        /// Services config; defaults to conf/services.yaml when present.
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Event deliveries parked as dead: list them, or send them again.
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
    /// Print the newest mail of the development mailbox (the `.eml` files
    /// written under `<data_dir>/mail` when no SMTP server is set),
    /// decoded; waits for one to arrive.
    Mail {
        /// Only a mail to this address.
        #[arg(long)]
        to: Option<String>,
        /// Only a mail whose subject contains this.
        #[arg(long)]
        subject: Option<String>,
        /// Print only its first link.
        #[arg(long)]
        link: bool,
        /// Seconds to wait for a matching mail.
        #[arg(long, default_value_t = 10)]
        wait: u64,
        /// Services config; defaults to conf/services.yaml when present.
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// The users service's own commands.
    Users {
        #[command(subcommand)]
        command: UsersCommand,
    },
    /// Same as `tiergate users rotate-signing-key` (the old spelling).
    #[command(hide = true)]
    RotateSigningKey {
        /// Services config; defaults to conf/services.yaml when present.
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum EventsCommand {
    /// List every dead delivery of every service (or of one).
    Dead {
        /// Only this service.
        #[arg(long)]
        service: Option<String>,
        /// Services config; defaults to conf/services.yaml when present.
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Put dead deliveries back in the queue (due now, attempts reset).
    /// Events older than 30 days are left dead unless `--force`: their
    /// consumers may no longer remember having applied them.
    Retry {
        /// Only this event.
        #[arg(long)]
        event: Option<String>,
        /// Also events older than 30 days.
        #[arg(long)]
        force: bool,
        /// Only this service.
        #[arg(long)]
        service: Option<String>,
        /// Services config; defaults to conf/services.yaml when present.
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum SandboxAction {
    /// The customer pays a pending payment (a card passes 3-D Secure).
    Pay(SandboxOrder),
    /// A captured card payment settles.
    Settle(SandboxOrder),
    /// The payment expires unpaid.
    Expire(SandboxOrder),
    /// The bank denies it (also a settled Permata VA or Mandiri bill: the
    /// reversal).
    Deny(SandboxOrder),
    /// Midtrans cancels it.
    Cancel(SandboxOrder),
}

#[derive(Debug, clap::Args)]
struct SandboxOrder {
    /// The order (`INV-2026-11-000123-1`).
    order_id: String,
    /// Deliver the notification twice.
    #[arg(long)]
    twice: bool,
    /// Then deliver the previous status's notification: out of order.
    #[arg(long)]
    out_of_order: bool,
    /// For a Snap order: the method the customer picks (default bca_va).
    #[arg(long)]
    method: Option<String>,
}

#[derive(Debug, Subcommand)]
enum UsersCommand {
    /// Generate a new access-token signing key in the data directory now.
    /// Running users services sign with it within a minute; the previous
    /// key stays in the JWKS until its tokens have expired.
    RotateSigningKey {
        /// Services config; defaults to conf/services.yaml when present.
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
}

fn services_file(explicit: Option<PathBuf>) -> Option<PathBuf> {
    explicit.or_else(|| {
        let p = PathBuf::from(DEFAULT_SERVICES_PATH);
        p.exists().then_some(p)
    })
}

/// The registered service named `name`, or an error listing them.
fn service(name: &str) -> Result<&'static dyn Registered, ExitCode> {
    SERVICES
        .iter()
        .copied()
        .find(|s| s.name() == name)
        .ok_or_else(|| {
            let names: Vec<&str> = SERVICES.iter().map(|s| s.name()).collect();
            eprintln!(
                "error: no service `{name}` (services: {})",
                names.join(", ")
            );
            ExitCode::from(EXIT_BAD_CONFIG)
        })
}

/// The services named, or all of them.
fn selected(names: &[String]) -> Result<Vec<&'static dyn Registered>, ExitCode> {
    if names.is_empty() {
        return Ok(SERVICES.to_vec());
    }
    names.iter().map(|n| service(n)).collect()
}

/// A service command's error as the process exit code (64 for settings).
fn failed(service: &str, e: CommandError) -> ExitCode {
    match e {
        CommandError::Config(c) => {
            eprintln!("error: {service}: {c}");
            ExitCode::from(EXIT_BAD_CONFIG)
        }
        CommandError::Failed(why) => {
            eprintln!("error: {service}: {why}");
            ExitCode::from(EXIT_START_FAILED)
        }
    }
}

/// Starts every business service in this process (for `up`).
fn start_services(
    file: Option<&Path>,
) -> Result<Vec<backend_common::app::RunningService>, ExitCode> {
    let mut running = Vec::new();
    for s in SERVICES {
        let r = s
            .start(file, Environment::Development)
            .map_err(|e| failed(s.name(), e))?;
        tracing::info!(service = s.name(), addr = %r.addr, "service running");
        running.push(r);
    }
    Ok(running)
}

/// The name the gateway's service key goes by.
const GATEWAY_KEY_NAME: &str = gateway::usage::SERVICE_NAME;

/// The gateway's service key: `TIERGATE_GATEWAY_SERVICE_KEY[_FILE]`, else
/// (development only) one generated once under the services' data
/// directory, whose path comes back too.
fn gateway_key(
    file: Option<&Path>,
    env: Environment,
) -> Result<(backend_common::service_auth::ServiceKeys, Option<PathBuf>), CommandError> {
    use backend_common::config as cfg;
    use backend_common::service_auth::{key_dir, KeySource, ServiceKeys};
    let pem = cfg::secret_from(&cfg::process_env, "TIERGATE_GATEWAY_SERVICE_KEY")
        .map_err(CommandError::Config)?;
    // The data directory is the one every service of this config shares.
    let settings = cfg::load::<subscriptions::SubscriptionsConfig>(
        "subscriptions",
        8022,
        file,
        &cfg::process_env,
        env,
    )
    .map_err(CommandError::Config)?;
    let data_dir = settings.shared.data_dir;
    let generated = pem
        .is_none()
        .then(|| key_dir(&data_dir).join("gateway.pem"));
    let source = KeySource {
        pem,
        environment: env,
        ..KeySource::development(GATEWAY_KEY_NAME, &data_dir)
    };
    let keys = ServiceKeys::load(&source).map_err(CommandError::Failed)?;
    Ok((keys, generated))
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
        Command::Serve {
            service: name,
            config,
        } => {
            let file = services_file(config);
            let s = match service(&name) {
                Ok(s) => s,
                Err(code) => return code,
            };
            match s.start(file.as_deref(), Environment::Production) {
                Ok(running) => match running.run_until_signal() {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("error: {name}: {e}");
                        ExitCode::from(EXIT_START_FAILED)
                    }
                },
                Err(e) => failed(&name, e),
            }
        }
        Command::Migrate { services, config } => {
            let file = services_file(config);
            let chosen = match selected(&services) {
                Ok(c) => c,
                Err(code) => return code,
            };
            for s in chosen {
                if let Err(e) = s.migrate(file.as_deref(), Environment::Production) {
                    return failed(s.name(), e);
                }
                println!("{}: migrations applied", s.name());
            }
            ExitCode::SUCCESS
        }
        Command::Services => {
            for s in SERVICES {
                println!("{}", s.name());
            }
            ExitCode::SUCCESS
        }
        Command::ServiceKey {
            service: name,
            config,
        } => {
            let file = services_file(config);
            if name == GATEWAY_KEY_NAME {
                return match gateway_key(file.as_deref(), Environment::Production) {
                    Ok((keys, _)) => {
                        println!("{}", keys.public_key());
                        ExitCode::SUCCESS
                    }
                    Err(e) => failed(GATEWAY_KEY_NAME, e),
                };
            }
            let s = match service(&name) {
                Ok(s) => s,
                Err(code) => return code,
            };
            match s.service_key(file.as_deref(), Environment::Production) {
                Ok(public) => {
                    println!("{public}");
                    ExitCode::SUCCESS
                }
                Err(e) => failed(&name, e),
            }
        }
        Command::Events { command } => events(command),
        Command::Mail {
            to,
            subject,
            link,
            wait,
            config,
        } => mail(
            services_file(config),
            notifications::mailbox::Filter { to, subject },
            link,
            wait,
        ),
        Command::Users {
            command: UsersCommand::RotateSigningKey { config },
        }
        | Command::RotateSigningKey { config } => rotate_signing_key(services_file(config)),
        Command::Sandbox {
            listen,
            notify,
            action,
        } => sandbox(&listen, notify, action),
        Command::Up {
            config,
            services,
            sandbox,
        } => {
            let _sandbox = match sandbox.then(|| start_sandbox("127.0.0.1:8029", None)) {
                Some(Ok(s)) => {
                    // Payments talks to it with its key (read when payments
                    // starts, just below).
                    std::env::set_var(
                        "TIERGATE_MIDTRANS_SERVER_KEY",
                        payments::sandbox::SANDBOX_SERVER_KEY,
                    );
                    std::env::set_var(
                        "TIERGATE_MIDTRANS_CLIENT_KEY",
                        payments::sandbox::SANDBOX_CLIENT_KEY,
                    );
                    std::env::set_var("TIERGATE_MIDTRANS_ENVIRONMENT", "sandbox");
                    std::env::set_var("TIERGATE_MIDTRANS_API_URL", s.base());
                    std::env::set_var("TIERGATE_MIDTRANS_SNAP_URL", s.base());
                    Some(s)
                }
                Some(Err(code)) => return code,
                None => None,
            };
            let services = services_file(services);
            let _services = match start_services(services.as_deref()) {
                Ok(s) => s,
                Err(code) => return code,
            };
            let sandbox_addr = _sandbox.as_ref().map(|s| s.addr);
            // The gateway signs its usage batches with its own key: a
            // development one beside the services' keys, which the
            // subscriptions service finds there on the first batch.
            match gateway_key(services.as_deref(), Environment::Development) {
                Ok((_, Some(pem))) => {
                    std::env::set_var("TIERGATE_GATEWAY_SERVICE_KEY_FILE", pem);
                }
                Ok((_, None)) => {}
                Err(e) => return failed(GATEWAY_KEY_NAME, e),
            }
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
                Ok(config) => {
                    let table = startup::Startup {
                        services: SERVICES
                            .iter()
                            .map(|s| s.name())
                            .zip(_services.iter().map(|r| r.addr))
                            .collect(),
                        sandbox: sandbox_addr,
                        gateway: config.server.listen.clone(),
                        admin: config.admin.listen.clone(),
                    };
                    // Printed once the gateway answers (it starts below).
                    std::thread::spawn(move || println!("{}", table.render_when_up()));
                    serve(&config, watched.as_deref(), false, RunMode::Development)
                }
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

fn events(command: EventsCommand) -> ExitCode {
    let (only, config) = match &command {
        EventsCommand::Dead { service, config }
        | EventsCommand::Retry {
            service, config, ..
        } => (service.clone(), config.clone()),
    };
    let file = services_file(config);
    let chosen = match selected(&only.into_iter().collect::<Vec<_>>()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    for s in chosen {
        match &command {
            EventsCommand::Dead { .. } => {
                match s.dead_events(file.as_deref(), Environment::Production) {
                    Ok(list) => {
                        for d in list {
                            println!(
                                "{}\t{}\t{}\t{}\t{} attempts\t{}",
                                s.name(),
                                d.event_id,
                                d.event_type,
                                d.subscriber,
                                d.attempts,
                                d.last_error.unwrap_or_default()
                            );
                        }
                    }
                    Err(e) => return failed(s.name(), e),
                }
            }
            EventsCommand::Retry { event, force, .. } => {
                match s.retry_events(
                    file.as_deref(),
                    Environment::Production,
                    event.as_deref(),
                    *force,
                ) {
                    Ok(r) => {
                        println!("{}: {} deliveries queued again", s.name(), r.queued);
                        if r.too_old > 0 {
                            println!(
                                "{}: {} older than 30 days left dead: their consumers may have \
                                 forgotten them (--force sends them anyway)",
                                s.name(),
                                r.too_old
                            );
                        }
                    }
                    Err(e) => return failed(s.name(), e),
                }
            }
        }
    }
    ExitCode::SUCCESS
}

/// The sandbox's notification target unless told: the gateway's public
/// webhook route, as Midtrans would call it.
fn default_notify_url() -> String {
    let public = std::env::var("TIERGATE_PUBLIC_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "http://127.0.0.1:8000".to_owned());
    format!(
        "{}/api/payments/webhooks/midtrans",
        public.trim_end_matches('/')
    )
}

fn start_sandbox(
    listen: &str,
    notify: Option<String>,
) -> Result<payments::sandbox::RunningSandbox, ExitCode> {
    if std::env::var("TIERGATE_ENV").as_deref() == Ok("production") {
        eprintln!("error: the Midtrans sandbox never runs in production (TIERGATE_ENV=production)");
        return Err(ExitCode::from(EXIT_BAD_CONFIG));
    }
    let Ok(addr) = listen.parse() else {
        eprintln!("error: --listen: `{listen}` is not an address (127.0.0.1:8029)");
        return Err(ExitCode::from(EXIT_BAD_CONFIG));
    };
    let config = payments::sandbox::SandboxConfig {
        listen: addr,
        notify_url: Some(notify.unwrap_or_else(default_notify_url)),
        ..Default::default()
    };
    let notify_url = config.notify_url.clone().unwrap_or_default();
    match payments::sandbox::start(config) {
        Ok(s) => {
            tracing::warn!(sandbox = true, addr = %s.addr, notify = %notify_url,
                "Midtrans SANDBOX running: no real money moves; pay with `tiergate sandbox pay <order_id>`");
            Ok(s)
        }
        Err(e) => {
            eprintln!("error: the Midtrans sandbox cannot listen on {listen}: {e}");
            Err(ExitCode::from(EXIT_START_FAILED))
        }
    }
}

/// `tiergate sandbox [action]`.
fn sandbox(listen: &str, notify: Option<String>, action: Option<SandboxAction>) -> ExitCode {
    let Some(action) = action else {
        return match start_sandbox(listen, notify) {
            Ok(s) => {
                s.wait();
                ExitCode::SUCCESS
            }
            Err(code) => code,
        };
    };
    let (name, order) = match &action {
        SandboxAction::Pay(o) => ("pay", o),
        SandboxAction::Settle(o) => ("settle", o),
        SandboxAction::Expire(o) => ("expire", o),
        SandboxAction::Deny(o) => ("deny", o),
        SandboxAction::Cancel(o) => ("cancel", o),
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
    let outcome = runtime.block_on(payments::sandbox::act(
        &format!("http://{listen}"),
        &order.order_id,
        name,
        order.twice,
        order.out_of_order,
        order.method.as_deref(),
    ));
    match outcome {
        Ok(answer) => {
            println!("{answer}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_START_FAILED)
        }
    }
}

/// `tiergate mail`.
fn mail(
    file: Option<PathBuf>,
    filter: notifications::mailbox::Filter,
    link: bool,
    wait: u64,
) -> ExitCode {
    let settings = match backend_common::service::settings::<notifications::NotificationsService>(
        file.as_deref(),
        Environment::Development,
    ) {
        Ok(s) => s,
        Err(e) => return failed("notifications", CommandError::Config(e)),
    };
    let dir = notifications::mail_dir(&settings.service, &settings.shared.data_dir);
    let found =
        notifications::mailbox::wait_for(&dir, &filter, std::time::Duration::from_secs(wait));
    match found {
        Ok(Some(m)) if link => match m.link() {
            Some(l) => {
                println!("{l}");
                ExitCode::SUCCESS
            }
            None => {
                eprintln!("error: {} has no link", m.path.display());
                ExitCode::FAILURE
            }
        },
        Ok(Some(m)) => {
            println!(
                "To: {}\nSubject: {}\nFile: {}",
                m.to,
                m.subject,
                m.path.display()
            );
            if !m.attachments.is_empty() {
                println!("Attachments: {}", m.attachments.join(", "));
            }
            println!("\n{}", m.text.trim_end());
            ExitCode::SUCCESS
        }
        Ok(None) => {
            eprintln!(
                "error: no such mail in {} after {wait} s (is `tiergate up` running without \
                 TIERGATE_SMTP_URL?)",
                dir.display()
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn rotate_signing_key(file: Option<PathBuf>) -> ExitCode {
    let settings = match backend_common::service::settings::<users::UsersService>(
        file.as_deref(),
        Environment::Production,
    ) {
        Ok(s) => s,
        Err(e) => return failed("users", CommandError::Config(e)),
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
        Err(e) => failed("users", CommandError::Failed(e)),
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
