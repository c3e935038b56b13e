//! Starting the gateway: a Pingora server with the tiergate proxy service.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};

use lua_free_plugins::Registry;
use tokio::sync::Notify;

use pingora_core::services::listening::Service;
use pingora_proxy::{HttpProxy, ProxyHttp};

use crate::admin::Admin;
use crate::background::Background;
use crate::config::{Config, RunMode};
use crate::edge::Edge;
use crate::error::GatewayError;
use crate::metrics::Metrics;
use crate::proxy::Gateway;
use crate::reload::Reloader;
use crate::secret::Environment;
use crate::snapshot::Snapshot;

/// A built, not yet running gateway.
pub struct GatewayServer {
    server: Server,
    background: Background,
    state: Arc<ArcSwap<Snapshot>>,
    listen: Vec<SocketAddr>,
    admin: Vec<SocketAddr>,
    env: Environment,
    metrics: Arc<Metrics>,
    reloader: Option<Arc<Reloader>>,
    signer: Option<Arc<crate::usage::Signer>>,
}

impl std::fmt::Debug for GatewayServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayServer")
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

impl GatewayServer {
    /// Compiles the config and prepares the Pingora server, with secrets
    /// and overrides from the process environment ([`Environment`]). Fails
    /// when a listener address cannot be bound or a backend name does not
    /// resolve.
    pub fn build(config: &Config) -> Result<Self, GatewayError> {
        let env = Environment::from_env().map_err(GatewayError::Server)?;
        Self::build_with_env(config, &env)
    }

    /// [`GatewayServer::build`] with an explicit environment.
    pub fn build_with_env(config: &Config, env: &Environment) -> Result<Self, GatewayError> {
        Self::build_with(config, env, false)
    }

    /// [`GatewayServer::build_with_env`]; with `upgrade`, the listening
    /// sockets are taken over from the running gateway (binary upgrade):
    /// start this one, then send SIGQUIT to the old one, which hands its
    /// sockets over `server.upgrade_sock` and drains.
    pub fn build_with(
        config: &Config,
        env: &Environment,
        upgrade: bool,
    ) -> Result<Self, GatewayError> {
        check_safety(config, env).map_err(GatewayError::Unsafe)?;
        let background = Background::start().map_err(|e| {
            GatewayError::Server(format!("cannot start the background thread: {e}"))
        })?;
        let metrics = Metrics::new()
            .map_err(|e| GatewayError::Server(format!("cannot register metrics: {e}")))?;
        let snapshot = Snapshot::build(config, env, Some(&background), &metrics)?;
        let signer = match &env.service_key {
            Some(pem) => Some(Arc::new(
                crate::usage::Signer::from_pem(pem).map_err(GatewayError::Unsafe)?,
            )),
            None => None,
        };
        for addr in config.server.listen.iter().chain(&config.admin.listen) {
            if upgrade {
                // The old process holds them; they come over the socket.
                break;
            }
            // Pingora binds later and exits on failure; check now so the
            // operator gets a clear error instead.
            std::net::TcpListener::bind(addr)
                .map_err(|e| GatewayError::Server(format!("cannot listen on {addr}: {e}")))?;
        }
        let s = &config.server;
        let conf = ServerConf {
            threads: s.threads,
            work_stealing: s.work_stealing,
            // Pingora counts whole seconds; round up so `500ms` is not 0.
            grace_period_seconds: Some(ceil_secs(s.grace_period)),
            graceful_shutdown_timeout_seconds: Some(ceil_secs(s.graceful_shutdown_timeout)),
            upstream_keepalive_pool_size: s.upstream_keepalive_pool_size,
            upgrade_sock: s.upgrade_sock.to_string_lossy().into_owned(),
            ..ServerConf::default()
        };
        let opt = Opt {
            upgrade,
            ..Opt::default()
        };
        let mut server = Server::new_with_opt_and_conf(Some(opt), conf);
        server.bootstrap();
        let state = Arc::new(ArcSwap::from_pointee(snapshot));
        // The usage flusher follows the live config: a reload may turn
        // metering on or off, or change its endpoint.
        background.spawn(crate::usage::run(
            metrics.usage.clone(),
            state.clone(),
            signer.clone(),
        ));
        // So does the tier change feed.
        background.spawn(crate::tier_feed::run(
            metrics.tier_overrides.clone(),
            state.clone(),
            signer.clone(),
        ));
        let mut service = edge_service(
            &server,
            Gateway::new(state.clone(), metrics.clone()),
            &state,
            &metrics,
            "proxy",
        );
        for addr in &s.listen {
            service.add_tcp(&addr.to_string());
        }
        server.add_service(service);
        if !config.admin.listen.is_empty() {
            let mut admin = edge_service(
                &server,
                Admin::new(state.clone(), metrics.clone(), env.admin_token.as_ref()),
                &state,
                &metrics,
                "admin",
            );
            // Operator traffic: one thread is plenty.
            admin.threads = Some(1);
            for addr in &config.admin.listen {
                admin.add_tcp(&addr.to_string());
            }
            server.add_service(admin);
        }
        Ok(Self {
            server,
            background,
            state,
            listen: s.listen.clone(),
            admin: config.admin.listen.clone(),
            env: env.clone(),
            metrics,
            reloader: None,
            signer,
        })
    }

    /// Reloads the config from `path` (whose content `config` was parsed
    /// from, with `registry`) on SIGHUP and when the file changes; see
    /// [`crate::reload`]. Fails when the file cannot be read.
    pub fn watch(mut self, path: &Path, registry: Registry) -> Result<Self, GatewayError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| GatewayError::Server(format!("cannot read {}: {e}", path.display())))?;
        self.reloader = Some(Arc::new(Reloader::new(
            path,
            &text,
            registry,
            self.env.clone(),
            self.state.clone(),
            self.metrics.clone(),
            self.background.spawner(),
        )));
        Ok(self)
    }

    /// The reloader, when [`GatewayServer::watch`] set one up.
    pub fn reloader(&self) -> Option<Arc<Reloader>> {
        self.reloader.clone()
    }

    fn start_watching(&self) {
        match &self.reloader {
            Some(r) => self.background.spawn(crate::reload::watch(r.clone())),
            // Without a file SIGHUP must still not kill the process.
            None => self.background.spawn(async {
                use tokio::signal::unix::{signal, SignalKind};
                if let Ok(mut hup) = signal(SignalKind::hangup()) {
                    while hup.recv().await.is_some() {
                        tracing::warn!("SIGHUP: no config file to reload (built-in config)");
                    }
                }
            }),
        }
    }

    /// The snapshot cell requests read (a reload stores a new snapshot here).
    pub fn state(&self) -> Arc<ArcSwap<Snapshot>> {
        self.state.clone()
    }

    /// Runs until SIGINT or SIGTERM (graceful: stop accepting, let
    /// in-flight requests finish for `grace_period`, then stop) or SIGQUIT
    /// (hand the listeners to a new `--upgrade` process, then drain the
    /// same way). SIGHUP reloads the config (see [`GatewayServer::watch`]).
    pub fn run(self) {
        tracing::info!(listen = ?self.listen, admin = ?self.admin, "tiergate gateway listening");
        self.start_watching();
        let background = self.background;
        self.server.run(RunArgs {
            shutdown_signal: Box::new(SignalShutdown),
        });
        crate::usage::final_flush(
            background.handle(),
            &self.metrics.usage,
            &self.state,
            self.signer.as_deref(),
        );
    }

    /// Runs on a background thread until [`RunningGateway::shutdown`].
    pub fn spawn(self) -> RunningGateway {
        if self.reloader.is_some() {
            self.start_watching();
        }
        let notify = Arc::new(Notify::new());
        let watch = NotifyShutdown(notify.clone());
        let listen = self.listen.clone();
        let state = self.state.clone();
        let server = self.server;
        let background = self.background;
        let (metrics, signer, cell) = (self.metrics, self.signer, self.state);
        let thread = std::thread::spawn(move || {
            server.run(RunArgs {
                shutdown_signal: Box::new(watch),
            });
            crate::usage::final_flush(
                background.handle(),
                &metrics.usage,
                &cell,
                signer.as_deref(),
            );
            drop(background);
        });
        RunningGateway {
            notify,
            thread: Some(thread),
            listen,
            state,
        }
    }
}

/// Refuses what would run unsafely: the HS256 development secret outside
/// development (anyone who learns it can mint tokens of any tier), and an
/// admin listener on a non-loopback address without `TIERGATE_ADMIN_TOKEN`
/// (the admin listener shows backend addresses and errors). A reload
/// checks the same.
pub fn check_safety(config: &Config, env: &Environment) -> Result<(), String> {
    if env.dev_jwt_secret.is_some() && env.mode(config) == RunMode::Production {
        return Err(
            "TIERGATE_DEV_JWT_SECRET is set, but this gateway runs in production \
             mode, where anyone who knows the development secret could mint tokens of any tier. \
             Unset it, or set `environment: development` in the config for a development gateway."
                .into(),
        );
    }
    // What the gateway signs with its service key, and who checks it.
    for (on, key, what, service) in [
        (
            config.usage.is_some(),
            "usage.endpoint",
            "usage batches",
            "subscriptions",
        ),
        (
            config.tier_changes.is_some(),
            "tier_changes.endpoint",
            "polls",
            "users",
        ),
    ] {
        if on && env.service_key.is_none() {
            return Err(format!(
                "{key} is set, but the gateway has no service key to sign its \
                 {what} with. Set TIERGATE_GATEWAY_SERVICE_KEY (or \
                 TIERGATE_GATEWAY_SERVICE_KEY_FILE) to an Ed25519 PKCS#8 PEM key \
                 (`openssl genpkey -algorithm ed25519`) and give its public key to the \
                 {service} service as service_keys.gateway, or remove {key}."
            ));
        }
    }
    if env.admin_token.is_none() {
        if let Some(addr) = config.admin.listen.iter().find(|a| !a.ip().is_loopback()) {
            return Err(format!(
                "admin.listen has {addr}, which is not a loopback address, and no admin token is \
                 set. Set TIERGATE_ADMIN_TOKEN (or TIERGATE_ADMIN_TOKEN_FILE) so the admin \
                 listener requires it, or listen on 127.0.0.1."
            ));
        }
    }
    Ok(())
}

/// A listening service running `inner` behind the connection layer
/// ([`Edge`]), named `tiergate <name>` and counted as listener `name`.
fn edge_service<SV>(
    server: &Server,
    inner: SV,
    state: &Arc<ArcSwap<Snapshot>>,
    metrics: &Metrics,
    name: &str,
) -> Service<Edge<SV>>
where
    SV: ProxyHttp + Send + Sync + 'static,
    SV::CTX: Send + Sync,
{
    let mut proxy = HttpProxy::new(inner, server.configuration.clone());
    proxy.handle_init_modules();
    Service::new(
        format!("tiergate {name}"),
        Edge::new(proxy, state.clone(), metrics, name),
    )
}

fn ceil_secs(d: std::time::Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

// Never `ShutdownSignal::FastShutdown`: with Pingora 0.9.1's no-steal
// runtime it shuts the runtimes down under live accept loops, which then spin
// on "Tokio context is being shutdown" errors forever and the process never
// exits. A graceful terminate stops the accept loops first.
struct NotifyShutdown(Arc<Notify>);

#[async_trait]
impl ShutdownSignalWatch for NotifyShutdown {
    async fn recv(&self) -> ShutdownSignal {
        self.0.notified().await;
        ShutdownSignal::GracefulTerminate
    }
}

/// SIGINT and SIGTERM: graceful terminate. SIGQUIT: binary upgrade — hand
/// the listening sockets to the new process waiting on
/// `server.upgrade_sock` (`tiergate gateway --upgrade`), keep serving for
/// 5 s while it starts accepting, then drain and stop.
struct SignalShutdown;

#[async_trait]
impl ShutdownSignalWatch for SignalShutdown {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut quit), Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::quit()),
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers; stopping");
            return ShutdownSignal::GracefulTerminate;
        };
        tokio::select! {
            _ = quit.recv() => {
                tracing::info!("SIGQUIT: handing the listeners to the new process, then draining");
                ShutdownSignal::GracefulUpgrade
            }
            _ = term.recv() => {
                tracing::info!("SIGTERM: stopping gracefully");
                ShutdownSignal::GracefulTerminate
            }
            _ = int.recv() => {
                tracing::info!("SIGINT: stopping gracefully");
                ShutdownSignal::GracefulTerminate
            }
        }
    }
}

/// A gateway running in this process; stops when shut down or dropped.
pub struct RunningGateway {
    notify: Arc<Notify>,
    thread: Option<JoinHandle<()>>,
    /// Its listeners.
    pub listen: Vec<SocketAddr>,
    /// Its snapshot cell.
    pub state: Arc<ArcSwap<Snapshot>>,
}

impl std::fmt::Debug for RunningGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningGateway")
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

impl RunningGateway {
    /// Stops the server and waits for its threads.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.notify.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for RunningGateway {
    fn drop(&mut self) {
        self.stop();
    }
}
