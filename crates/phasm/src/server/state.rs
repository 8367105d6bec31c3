//! What the API serves ([`ServerState`]: the store, the machines, the clock, the limits and
//! the access rules every handler reads) and who asks ([`Client`]: the address a request came
//! from, behind trusted proxies).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::HeaderMap;

use super::auth;
use crate::clock::Clock;
use crate::engine::Limits;
use crate::machine::Config;
use crate::store::Store;

/// What the API serves.
pub struct ServerState {
    /// Where instances live.
    pub store: Arc<dyn Store>,
    /// The machines.
    pub config: Arc<Config>,
    /// The time.
    pub clock: Arc<dyn Clock>,
    /// Limits on contexts.
    pub limits: Limits,
    /// When set, every request must carry `Authorization: Bearer TOKEN`.
    pub token: Option<String>,
    /// The installed Prometheus recorder, when `GET /metrics` is enabled.
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// Wrong tokens by client address (a burst is refused for a while).
    pub throttle: auth::Throttle,
    /// The `Host` names served (any port); others get 421. `None`: any (a listener reachable
    /// only through names the operator controls, behind a token).
    pub allowed_hosts: Option<Vec<String>>,
    /// Proxies whose `X-Forwarded-For` names the client (the throttle of wrong tokens is
    /// then kept per forwarded address). Empty: the connection's address is the client's,
    /// and `X-Forwarded-For` is ignored.
    pub trusted_proxies: Vec<IpAddr>,
}

/// The address a request came from: the connection's, or — when that is one of
/// [`ServerState::trusted_proxies`] — the address the proxies forwarded (the last one in
/// `X-Forwarded-For` that is not itself a trusted proxy). Unspecified when the server was
/// not started by [`serve`](super::serve), e.g. a router used directly in a test.
#[derive(Debug, Clone, Copy)]
pub struct Client(pub IpAddr);

impl FromRequestParts<Arc<ServerState>> for Client {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &Arc<ServerState>,
    ) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0.ip());
        Ok(Client(client_address(
            peer,
            &parts.headers,
            &state.trusted_proxies,
        )))
    }
}

/// The client's address: `peer`, or, when `peer` is a trusted proxy, the nearest address in
/// `X-Forwarded-For` (read from the right, each proxy appending) that is not a trusted proxy.
/// A header that does not parse leaves the last trusted address as the client.
pub fn client_address(peer: IpAddr, headers: &HeaderMap, trusted: &[IpAddr]) -> IpAddr {
    if !trusted.contains(&peer) {
        return peer;
    }
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let mut client = peer;
    for hop in hops.into_iter().rev() {
        match hop.parse::<IpAddr>() {
            Ok(ip) => {
                client = ip;
                if !trusted.contains(&ip) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    client
}

impl std::fmt::Debug for ServerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerState").finish_non_exhaustive()
    }
}
