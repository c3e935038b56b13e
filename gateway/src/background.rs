//! The gateway's own background runtime: one thread running a current-thread
//! tokio runtime for JWKS fetches, Redis lease traffic and housekeeping.
//!
//! Why not Pingora's runtimes: Pingora runs one runtime per worker thread
//! and a client such as `redis` spawns its connection driver on whichever
//! runtime first used it, so a connection shared by all workers would live
//! on (and stall with) one of them. Here every network client the hot path
//! talks to lives on this one thread; request handlers only touch atomics
//! and send messages to it.

use std::future::Future;
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// A running background runtime; stops (and joins its thread) on drop.
#[derive(Debug)]
pub struct Background {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Background {
    /// Starts the runtime thread.
    pub fn start() -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("tiergate-bg")
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("tiergate-bg".into())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
                // Pending tasks are dropped with the runtime.
                runtime.shutdown_background();
            })?;
        Ok(Self {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Spawns a task on the background runtime.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.handle.spawn(task);
    }

    /// A view that spawns on the same runtime but does not own it:
    /// dropping it stops nothing (for the config reloader).
    pub fn spawner(&self) -> Background {
        Background {
            handle: self.handle.clone(),
            stop: None,
            thread: None,
        }
    }

    /// The runtime's handle.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}
