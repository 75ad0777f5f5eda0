//! The herd management server.
//!
//! Control flow: `REST -> Cloud (action) -> Store -> reconciler -> Bus (per-host queue)
//! -> agent -> driver`, and back: `driver -> agent (delta report) -> ingest -> HostView
//! -> Store`. See ARCHITECTURE.md.

pub mod access;
pub mod api;
pub mod auth;
pub mod billing;
pub mod broadcast;
pub mod bursts;
pub mod cloud;
pub mod group_commit;
pub mod ingest;
pub mod jobs;
pub mod map;
pub mod migration;
pub mod resize;
pub mod status;
pub mod store;
pub mod topology;
pub mod waiters;
pub mod web;

pub use cloud::{Cloud, CloudError, ServerConfig};

/// Runs a blocking store call from async code without stalling the worker's other
/// tasks: on a multi-threaded runtime tokio hands them to another thread meanwhile. A
/// 2-core server has two async workers serving thousands of agent connections; one
/// commit's fsync on each would stop them all, and late heartbeats look like dead
/// hosts. Elsewhere (a current-thread runtime in tests, or no runtime) it just runs.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|handle| handle.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

use herd_bus::EmbeddedBus;
use std::net::SocketAddr;
use std::sync::Arc;
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Cloud(#[from] CloudError),
    #[error("cannot open the command queue")]
    Bus(#[from] herd_bus::BusError),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("server stopped with an I/O error")]
    Serve(#[source] std::io::Error),
    #[error("TLS setup")]
    Tls(#[from] herd_tls::TlsError),
}

/// Opens the store and the embedded bus in `config.data_dir`, and the CA there (made
/// on first start) unless the server is to speak plain HTTP.
pub fn open(config: ServerConfig) -> Result<Arc<Cloud>, ServerError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| ServerError::Listen {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })?;
    let ca = if config.insecure_http {
        None
    } else {
        Some(Arc::new(herd_tls::Ca::load_or_create(&config.data_dir)?))
    };
    let bus = EmbeddedBus::open(&config.data_dir.join("bus.db"))?;
    let mut cloud = Cloud::open(config, Box::new(bus))?;
    cloud.ca = ca;
    Ok(Arc::new(cloud))
}

/// The host of a URL (`https://host:port/...`), without brackets or port.
fn url_host(url: &str) -> Option<&str> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split_once(']').map(|(host, _)| host);
    }
    let host = authority.split(':').next()?;
    (!host.is_empty()).then_some(host)
}

/// Everything the server answers over HTTP: the REST API and the web UI.
pub fn app(cloud: Arc<Cloud>) -> axum::Router {
    api::router(cloud.clone()).merge(web::router(cloud))
}

/// A bound, not yet serving, server.
pub struct Bound {
    pub cloud: Arc<Cloud>,
    pub listener: tokio::net::TcpListener,
    pub addr: SocketAddr,
    /// HTTPS with the server's certificate, or `None` for plain HTTP.
    pub tls: Option<Arc<herd_tls::rustls::ServerConfig>>,
}

/// Connections the kernel holds for the server to accept (capped by
/// `net.core.somaxconn`). After a restart every agent connects again at once: with
/// the usual 128, ten thousand of them overflow the queue, the kernel drops their
/// SYNs, and each waits a second or more to try again.
const LISTEN_BACKLOG: u32 = 8192;

fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    // As std's bind does on Unix: a restarted server takes its port back at once.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

pub async fn bind(cloud: Arc<Cloud>, addr: SocketAddr) -> Result<Bound, ServerError> {
    let listener = listen(addr).map_err(|source| ServerError::Listen { addr, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| ServerError::Listen { addr, source })?;
    let tls = match &cloud.ca {
        None => None,
        Some(ca) => {
            // The certificate names what clients dial: the public URL's host, and the
            // listen address unless it is a wildcard (localhost and the hostname are
            // always in).
            let mut names: Vec<String> = url_host(&cloud.config.public_url)
                .map(str::to_owned)
                .into_iter()
                .collect();
            if !addr.ip().is_unspecified() {
                names.push(addr.ip().to_string());
            }
            let identity = ca.server_identity(&cloud.config.data_dir, &names)?;
            Some(herd_tls::server_config(&identity, ca)?)
        }
    };
    Ok(Bound {
        cloud,
        listener,
        addr,
        tls,
    })
}

impl Bound {
    /// Serves the API and runs the background loops until `shutdown` resolves.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let background = tokio::spawn(self.cloud.clone().run_background());
        let app = app(self.cloud.clone()).layer(tower_http::trace::TraceLayer::new_for_http());
        let result = match self.tls {
            Some(tls) => {
                info!(addr = %self.addr, "serving HTTPS");
                herd_tls::serve(self.listener, tls, app, shutdown)
                    .await
                    .map_err(ServerError::Serve)
            }
            None => {
                warn!(addr = %self.addr, "serving plain HTTP: agents are trusted on their tokens alone");
                // ConnectInfo as herd_tls::serve gives it, so handlers see the same.
                let app = app.into_make_service_with_connect_info::<SocketAddr>();
                axum::serve(self.listener, app)
                    .with_graceful_shutdown(shutdown)
                    .await
                    .map_err(ServerError::Serve)
            }
        };
        background.abort();
        result
    }
}

#[cfg(test)]
mod tests {
    use super::url_host;

    #[test]
    fn url_host_takes_the_host_only() {
        assert_eq!(url_host("https://h.example:7070/x"), Some("h.example"));
        assert_eq!(url_host("https://[::1]:7070"), Some("::1"));
        assert_eq!(url_host("http://10.0.0.5"), Some("10.0.0.5"));
        assert_eq!(url_host("https://"), None);
    }
}
