//! A provider stand-in's HTTP server (the Midtrans sandbox, the Telegram
//! Bot API and Twilio stand-ins): an Actix server with one worker on its
//! own thread and runtime, so it serves whatever runtime its caller (a
//! test, `tiergate up --sandbox`) runs on.

use std::net::{SocketAddr, TcpListener};
use std::thread::JoinHandle;

use actix_web::dev::ServerHandle;
use actix_web::{web, App, HttpServer};

/// A running stand-in server.
pub struct Background {
    /// Its address.
    pub addr: SocketAddr,
    handle: ServerHandle,
    thread: Option<JoinHandle<()>>,
}

impl Background {
    /// `http://addr`.
    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops it.
    pub async fn stop(&mut self) {
        self.handle.stop(true).await;
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }

    /// Serves until the thread ends.
    pub fn wait(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves `configure`'s routes on `listener` from thread `name`; returns
/// once it listens. `started` runs on the server's runtime once it is up
/// (to log, or to spawn the stand-in's own tasks).
pub fn spawn<F, S>(
    name: &str,
    listener: TcpListener,
    configure: F,
    started: S,
) -> std::io::Result<Background>
where
    F: Fn(&mut web::ServiceConfig) + Send + Clone + 'static,
    S: FnOnce(SocketAddr) + Send + 'static,
{
    let addr = listener.local_addr()?;
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let system = actix_web::rt::System::new();
            system.block_on(async move {
                let server = HttpServer::new(move || App::new().configure(configure.clone()))
                    .workers(1)
                    .disable_signals()
                    .shutdown_timeout(1)
                    .listen(listener);
                let server = match server {
                    Ok(s) => s.run(),
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let _ = tx.send(Ok(server.handle()));
                started(addr);
                let _ = server.await;
            });
        })?;
    let handle = rx
        .recv()
        .map_err(|_| std::io::Error::other("the stand-in's thread died"))??;
    Ok(Background {
        addr,
        handle,
        thread: Some(thread),
    })
}
