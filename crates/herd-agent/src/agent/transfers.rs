//! The agent's listener for other agents' transfers, and the first frame that says
//! whether a connection is a migration's or a broadcast's.

use super::session::Session;
use super::transport::error_chain;
use super::{state, Agent, AgentError};
use herd_proto::wire::HostId;
use tracing::{info, warn};

impl Agent {
    /// Over HTTPS, listens for other agents' transfers (live migrations, broadcasts), with this
    /// host's certificate; over plain HTTP there is nothing to authenticate them with.
    pub(super) async fn listen_for_transfers(
        &self,
        creds: &state::Credentials,
        session: &mut Session,
    ) -> Result<Option<tokio::task::JoinHandle<()>>, AgentError> {
        if !creds.server_url.starts_with("https://") {
            return Ok(None);
        }
        let [key, cert, ca] = self.tls_files()?;
        let tls = crate::transfer::PeerTls::from_pem(&key, &cert, &ca)?;
        let addr = std::net::SocketAddr::from(([0, 0, 0, 0], self.config.transfer_port));
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| AgentError::State(format!("listening for transfers on {addr}: {e}")))?;
        let port = listener
            .local_addr()
            .map_err(|e| AgentError::State(format!("listening for transfers: {e}")))?
            .port();
        session.migrations.listening(port, tls.clone());
        let broadcasts = crate::broadcast::Broadcasts::new(
            creds.host_id,
            self.config.data_dir.join("broadcasts"),
            self.drivers.clone(),
            Some(tls.clone()),
            session.outbox.clone(),
        );
        session.broadcasts = Some(broadcasts.clone());
        let migrations = session.migrations.clone();
        let handle = tokio::spawn(crate::transfer::serve(
            listener,
            tls,
            move |peer, stream| {
                route_transfer(peer, stream, migrations.clone(), broadcasts.clone())
            },
        ));
        info!(port, "listening for transfers from other hosts");
        Ok(Some(handle))
    }
}

/// Hands a transfer connection to the migration or broadcast it names in its first
/// frame.
async fn route_transfer(
    peer: HostId,
    mut stream: crate::transfer::Stream,
    migrations: crate::migration::Migrations,
    broadcasts: crate::broadcast::Broadcasts,
) {
    use herd_proto::broadcast::TransferOpen;
    match crate::transfer::read_frame::<TransferOpen>(&mut stream).await {
        Ok(TransferOpen::Migration(hello)) => migrations.receive(peer, stream, hello).await,
        Ok(TransferOpen::Broadcast { broadcast }) => {
            broadcasts.receive(peer, stream, broadcast).await
        }
        Err(e) => warn!(%peer, "a transfer without a valid first frame: {}", error_chain(&e)),
    }
}
