//! Backends given as `host:port`: resolved when the pool is built, then
//! again every `resolve_interval` on the background runtime. Each address
//! becomes a backend with the entry's weight; a backend whose address
//! vanished leaves the selection at once and drains (requests already on it
//! finish). A failed resolution keeps that name's last good addresses and
//! is reported in `/health/services`.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;

use super::Pool;
use crate::config::DnsSettings;

/// How names are resolved.
#[derive(Debug, Clone)]
pub struct Resolver {
    /// Servers asked directly; empty for the system resolver.
    nameservers: Arc<[SocketAddr]>,
    timeout: Duration,
}

impl Resolver {
    /// From the `dns:` settings.
    pub fn new(dns: &DnsSettings) -> Self {
        Self {
            nameservers: dns.nameservers.clone().into(),
            timeout: dns.timeout,
        }
    }

    /// Resolves `host` (sorted, deduplicated addresses with `port`).
    pub async fn lookup(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
        let found = if self.nameservers.is_empty() {
            let fut = tokio::net::lookup_host((host.to_owned(), port));
            match tokio::time::timeout(self.timeout, fut).await {
                Ok(Ok(addrs)) => addrs.collect::<Vec<_>>(),
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => return Err(format!("no answer within {:?}", self.timeout)),
            }
        } else {
            self.lookup_servers(host, port).await?
        };
        tidy(found)
    }

    /// [`Resolver::lookup`] from synchronous code (building a pool). With
    /// name servers configured it runs on a short-lived runtime of its own
    /// thread, as the caller may be inside (and must not block) another.
    pub fn lookup_blocking(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
        if self.nameservers.is_empty() {
            return tidy(
                (host, port)
                    .to_socket_addrs()
                    .map_err(|e| e.to_string())?
                    .collect(),
            );
        }
        let this = self.clone();
        let host = host.to_owned();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(this.lookup(&host, port))
        })
        .join()
        .map_err(|_| "the resolver thread panicked".to_owned())?
    }

    async fn lookup_servers(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
        let servers = self
            .nameservers
            .iter()
            .map(|s| {
                let mut udp = ConnectionConfig::udp();
                udp.port = s.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = s.port();
                NameServerConfig::new(s.ip(), true, vec![udp, tcp])
            })
            .collect();
        // A fresh resolver per lookup: its connections live on the runtime
        // that made them, and lookups are rare (once per interval per name).
        let mut builder = hickory_resolver::Resolver::builder_with_config(
            ResolverConfig::from_name_servers(servers),
            TokioRuntimeProvider::default(),
        );
        let opts = builder.options_mut();
        opts.timeout = self.timeout;
        opts.attempts = 1;
        opts.cache_size = 0;
        opts.use_hosts_file = ResolveHosts::Never;
        let resolver = builder.build().map_err(|e| e.to_string())?;
        let fut = resolver.lookup_ip(host);
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(ips)) => Ok(ips.iter().map(|ip| SocketAddr::new(ip, port)).collect()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
        }
    }
}

fn tidy(mut found: Vec<SocketAddr>) -> Result<Vec<SocketAddr>, String> {
    found.sort();
    found.dedup();
    if found.is_empty() {
        return Err("no addresses".into());
    }
    Ok(found)
}

/// One `host:port` backend entry and what it last resolved to.
#[derive(Debug, Clone)]
pub struct NameEntry {
    /// The host name.
    pub host: String,
    /// The port.
    pub port: u16,
    /// The entry's weight, given to each address.
    pub weight: u32,
    /// The last good addresses.
    pub addrs: Vec<SocketAddr>,
    /// Unix ms of the last good resolution.
    pub resolved_at_ms: u64,
    /// Why the last resolution failed, if it did (the addresses are then
    /// the last good ones).
    pub error: Option<String>,
}

/// The names of a pool; written by its discovery task.
#[derive(Debug, Default)]
pub struct Discovery {
    /// Its `host:port` entries.
    pub entries: Mutex<Vec<NameEntry>>,
    /// Re-resolution period (zero: never).
    pub interval: Duration,
}

impl Discovery {
    /// A copy of the entries, for reports.
    pub fn snapshot(&self) -> Vec<NameEntry> {
        self.entries.lock().map(|e| e.clone()).unwrap_or_default()
    }
}

/// Resolves the names of `pool` every interval until the pool is gone.
pub async fn run(pool: Weak<Pool>, resolver: Resolver, interval: Duration) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(names) = pool
            .upgrade()
            .map(|p| p.discovery.snapshot())
            .filter(|n| !n.is_empty())
        else {
            return;
        };
        let mut results = Vec::with_capacity(names.len());
        for n in &names {
            results.push(resolver.lookup(&n.host, n.port).await);
        }
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let now = super::check::unix_ms();
        if let Ok(mut entries) = pool.discovery.entries.lock() {
            for (entry, result) in entries.iter_mut().zip(results) {
                match result {
                    Ok(addrs) => {
                        entry.addrs = addrs;
                        entry.resolved_at_ms = now;
                        entry.error = None;
                    }
                    Err(e) => {
                        if entry.error.is_none() {
                            tracing::warn!(pool = %pool.name, host = %entry.host, error = %e,
                                "cannot resolve backend name; keeping its last good addresses");
                        }
                        entry.error = Some(e);
                    }
                }
            }
        }
        pool.refresh_members();
    }
}
