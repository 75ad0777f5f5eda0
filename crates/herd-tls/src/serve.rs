//! HTTPS for an axum router: one TLS handshake per connection, the verified client
//! certificate's host id in every request, HTTP/1.1 with upgrades (the agent bus is a
//! WebSocket).

use crate::ca::host_id_of;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceExt;
use tracing::debug;
use uuid::Uuid;

/// A client that has not finished its TLS handshake by then is dropped, so a slow or
/// silent client cannot hold a task forever.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a client may take to send a request head (or stay idle between requests).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(120);

/// How long shutdown waits for requests in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The connection's verified client certificate, in every request's extensions:
/// `host` is the host id an agent certificate speaks for; `None` without a client
/// certificate (operators use bearer tokens alone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCert {
    pub host: Option<Uuid>,
}

/// Serves `router` over TLS on `listener` until `shutdown` resolves, then lets requests
/// in flight finish for a few seconds. Failed handshakes are logged at debug and do
/// not stop the server. Each request also carries `ConnectInfo<SocketAddr>`.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    // Connection tasks hold `closing_rx`; dropping `stop_tx` tells them to finish.
    let (stop_tx, stop_rx) = watch::channel(());
    let (closing_tx, closing_rx) = watch::channel(());
    tokio::pin!(shutdown);
    loop {
        let (tcp, remote) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    debug!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let router = router.clone();
        let mut stop_rx = stop_rx.clone();
        let closing_rx = closing_rx.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    debug!(%remote, "TLS handshake failed: {e}");
                    return;
                }
                Err(_) => {
                    debug!(%remote, "TLS handshake timed out");
                    return;
                }
            };
            let peer = PeerCert {
                host: tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|certs| certs.first())
                    .and_then(|cert| host_id_of(cert)),
            };
            let service =
                hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
                    request.extensions_mut().insert(peer);
                    request.extensions_mut().insert(ConnectInfo(remote));
                    router.clone().oneshot(request)
                });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            // A request head must arrive within HEADER_READ_TIMEOUT. hyper also counts an
            // idle keep-alive connection against it, so it is longer than reqwest's pool
            // idle timeout (90 s): clients drop idle connections before the server does.
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
            tokio::pin!(connection);
            let mut stopping = false;
            loop {
                tokio::select! {
                    result = connection.as_mut() => {
                        if let Err(e) = result {
                            debug!(%remote, "connection ended: {e}");
                        }
                        break;
                    }
                    _ = stop_rx.changed(), if !stopping => {
                        stopping = true;
                        connection.as_mut().graceful_shutdown();
                    }
                }
            }
            drop(closing_rx);
        });
    }
    drop(listener);
    drop(stop_tx);
    drop(closing_rx);
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, closing_tx.closed()).await;
    Ok(())
}
