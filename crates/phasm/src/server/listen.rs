//! Accepting connections without letting clients exhaust the process: a cap on open
//! connections (beyond it new ones wait in the kernel's backlog), a share of it that one
//! client address may not exceed (so one client cannot take every connection), a deadline for
//! each request head (a connection that is silent, or dribbles its headers, is closed —
//! whether new or kept alive between requests) and for each whole request (a body sent a
//! byte at a time gets a 408), and graceful shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tower::ServiceExt;

/// How a server treats its connections.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Most connections open at once (`None`: a quarter of the process's file-descriptor
    /// limit, between 16 and 1024), so the worker's own descriptors are never starved.
    pub max_connections: Option<usize>,
    /// Longest wait for a complete request head, on a new connection or between the requests
    /// of a kept-alive one.
    pub header_read_timeout: Duration,
    /// The largest request head hyper buffers; larger ones are refused by hyper itself.
    /// Heads over [`super::MAX_URI_BYTES`] / [`super::MAX_HEADER_BYTES`] (smaller) get a JSON
    /// error from the API.
    pub max_head_bytes: usize,
    /// Longest time from a request's head to its answer, its body's reading included; a
    /// request still unanswered then gets 408 and its connection is closed.
    pub request_timeout: Duration,
    /// Most connections one client address may hold open (`None`: three quarters of the
    /// cap, so other clients always find room). Connections beyond it are closed at once.
    /// The server's trusted proxies are not limited.
    pub max_connections_per_address: Option<usize>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            max_connections: None,
            header_read_timeout: Duration::from_secs(10),
            max_head_bytes: 256 * 1024,
            request_timeout: Duration::from_secs(30),
            max_connections_per_address: None,
        }
    }
}

impl ServeOptions {
    /// The connections one address may hold in force.
    pub fn per_address_cap(&self) -> usize {
        self.max_connections_per_address.unwrap_or_else(|| {
            let cap = self.connection_cap();
            (cap - cap / 4).max(1)
        })
    }

    /// The connection cap in force.
    pub fn connection_cap(&self) -> usize {
        self.max_connections.unwrap_or_else(|| {
            let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile)
                .current
                .unwrap_or(1024);
            usize::try_from(soft / 4).unwrap_or(1024).clamp(16, 1024)
        })
    }
}

/// Serve `app` on `listener` until `shutdown` completes, then let running requests finish.
///
/// # Errors
/// Never for a single failed accept (logged, retried after a pause, as when the process is
/// out of descriptors); the result is for the listener as a whole.
pub async fn serve_app(
    listener: TcpListener,
    app: Router,
    options: ServeOptions,
    unlimited: Vec<std::net::IpAddr>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(options.connection_cap()));
    let per_address = options.per_address_cap();
    let open = Arc::new(PerAddress::default());
    let (close_tx, close_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        while connections.try_join_next().is_some() {}
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, addr) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of descriptors, or a connection reset before it was accepted: pause
                    // so a full table cannot turn this loop into a spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some(held) = open.take(addr.ip(), per_address, &unlimited) else {
            tracing::debug!(client = %addr.ip(), "closed a connection over the per-address cap");
            drop(stream);
            continue;
        };
        let service = app.clone().map_request(
            move |mut request: axum::http::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(ConnectInfo(addr));
                request.map(axum::body::Body::new)
            },
        );
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(options.header_read_timeout)
            .max_buf_size(options.max_head_bytes.max(8192));
        let mut close = close_rx.clone();
        connections.spawn(async move {
            let _permit = permit;
            let _held = held;
            let connection =
                builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
            tokio::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "a connection ended with an error");
                    }
                }
                _ = close.changed() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
    let _ = close_tx.send(true);
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// Open connections by client address.
#[derive(Debug, Default)]
struct PerAddress {
    open: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
}

/// One connection counted against its address until dropped.
struct Held {
    table: Arc<PerAddress>,
    ip: std::net::IpAddr,
}

impl PerAddress {
    /// Count a connection from `ip`, unless it already holds `cap` (addresses in `unlimited`
    /// are never refused).
    fn take(
        self: &Arc<Self>,
        ip: std::net::IpAddr,
        cap: usize,
        unlimited: &[std::net::IpAddr],
    ) -> Option<Held> {
        let mut open = self.lock();
        let n = open.entry(ip).or_insert(0);
        if *n >= cap && !unlimited.contains(&ip) {
            return None;
        }
        *n += 1;
        Some(Held {
            table: Arc::clone(self),
            ip,
        })
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<std::net::IpAddr, usize>> {
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut open = self.table.lock();
        if let Some(n) = open.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}
