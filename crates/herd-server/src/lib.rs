//! The herd management server.
//!
//! Control flow: `REST -> Cloud (action) -> Store -> reconciler -> Bus (per-host queue)
//! -> agent -> driver`, and back: `driver -> agent (delta report) -> ingest -> HostView
//! -> Store`. See ARCHITECTURE.md.

pub mod api;
pub mod auth;
pub mod billing;
pub mod cloud;
pub mod ingest;
pub mod store;

pub use cloud::{Cloud, CloudError, ServerConfig};

use herd_bus::EmbeddedBus;
use std::net::SocketAddr;
use std::sync::Arc;
use tracing::info;

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
}

/// Opens the store and the embedded bus in `config.data_dir`.
pub fn open(config: ServerConfig) -> Result<Arc<Cloud>, ServerError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| ServerError::Listen {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })?;
    let bus = EmbeddedBus::open(&config.data_dir.join("bus.db"))?;
    Ok(Arc::new(Cloud::open(config, Box::new(bus))?))
}

/// A bound, not yet serving, server.
pub struct Bound {
    pub cloud: Arc<Cloud>,
    pub listener: tokio::net::TcpListener,
    pub addr: SocketAddr,
}

pub async fn bind(cloud: Arc<Cloud>, addr: SocketAddr) -> Result<Bound, ServerError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Listen { addr, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| ServerError::Listen { addr, source })?;
    Ok(Bound {
        cloud,
        listener,
        addr,
    })
}

impl Bound {
    /// Serves the API and runs the background loops until `shutdown` resolves.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let background = tokio::spawn(self.cloud.clone().run_background());
        let app =
            api::router(self.cloud.clone()).layer(tower_http::trace::TraceLayer::new_for_http());
        info!(addr = %self.addr, "serving");
        let result = axum::serve(self.listener, app)
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(ServerError::Serve);
        background.abort();
        result
    }
}
