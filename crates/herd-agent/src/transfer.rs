//! Connections between agents, for moving a VM's state from one host to another.
//!
//! Both ends present the certificate their host got from the cloud's CA at join and
//! accept only certificates from that CA, and the dialling side checks that the peer
//! is the host it meant (by the certificate's host name), so a transfer is between two
//! joined hosts the server named, never a stranger. A connection starts with one small
//! length-prefixed frame each way (what is sent, and whether the receiver takes it),
//! then carries the raw stream.

use herd_proto::migration::MAX_TRANSFER_FRAME;
use herd_proto::wire::HostId;
use rustls::pki_types::ServerName;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

/// How long a peer may take to connect, finish its handshake or send its first frame.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("connecting to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS with {0}")]
    Tls(String, #[source] std::io::Error),
    #[error("{0} took longer than {HANDSHAKE_TIMEOUT:?}")]
    Timeout(&'static str),
    #[error("a frame of {0} bytes, over the limit of {MAX_TRANSFER_FRAME}")]
    TooLarge(usize),
    #[error("malformed frame")]
    Malformed(#[source] herd_proto::wire::DecodeError),
    #[error("the peer's certificate names no host")]
    Anonymous,
    #[error("I/O on the transfer")]
    Io(#[from] std::io::Error),
}

/// This agent's TLS for talking to other agents: as a server (incoming transfers) and
/// as a client (outgoing ones).
#[derive(Clone)]
pub struct PeerTls {
    pub server: Arc<rustls::ServerConfig>,
    pub client: Arc<rustls::ClientConfig>,
}

impl PeerTls {
    /// From the key, certificate and CA the agent saved at join.
    pub fn from_pem(key: &str, cert: &str, ca: &str) -> Result<PeerTls, herd_tls::TlsError> {
        let identity = herd_tls::Identity::from_pem(cert, key)?;
        Ok(PeerTls {
            server: herd_tls::peer_server_config(&identity, ca)?,
            client: Arc::new(herd_tls::client_config(ca, Some((cert, key)))?),
        })
    }
}

/// A transfer connection, either way.
pub type Stream = tokio_rustls::TlsStream<TcpStream>;

/// Writes one frame: its length (4 bytes, big-endian), then the message.
pub async fn write_frame<T: Serialize>(
    stream: &mut (impl AsyncWrite + Unpin),
    msg: &T,
) -> Result<(), TransferError> {
    let bytes = herd_proto::wire::encode(msg);
    if bytes.len() > MAX_TRANSFER_FRAME {
        return Err(TransferError::TooLarge(bytes.len()));
    }
    stream
        .write_all(&(bytes.len() as u32).to_be_bytes())
        .await?;
    stream.write_all(&bytes).await?;
    stream.flush().await?;
    Ok(())
}

/// Reads one frame, refusing one over the limit before reading it.
pub async fn read_frame<T: DeserializeOwned>(
    stream: &mut (impl AsyncRead + Unpin),
) -> Result<T, TransferError> {
    let read = async {
        let mut len = [0u8; 4];
        stream.read_exact(&mut len).await?;
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_TRANSFER_FRAME {
            return Err(TransferError::TooLarge(len));
        }
        let mut bytes = vec![0u8; len];
        stream.read_exact(&mut bytes).await?;
        herd_proto::wire::decode(&bytes).map_err(TransferError::Malformed)
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, read)
        .await
        .map_err(|_| TransferError::Timeout("reading the peer's first frame"))?
}

/// Dials the agent of `host` at `addr`; the peer must prove it is that host.
pub async fn dial(tls: &PeerTls, addr: &str, host: HostId) -> Result<Stream, TransferError> {
    let connect = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| TransferError::Connect {
                addr: addr.to_owned(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(herd_tls::peer_name(host))
            .map_err(|e| TransferError::Tls(addr.to_owned(), std::io::Error::other(e)))?;
        let stream = tokio_rustls::TlsConnector::from(tls.client.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| TransferError::Tls(addr.to_owned(), e))?;
        Ok(tokio_rustls::TlsStream::Client(stream))
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, connect)
        .await
        .map_err(|_| TransferError::Timeout("connecting to the peer"))?
}

/// Accepts transfer connections until the task is dropped, handing each, with the
/// host its certificate speaks for, to `handle` in a task of its own.
pub async fn serve<F, Fut>(listener: TcpListener, tls: PeerTls, handle: F)
where
    F: Fn(HostId, Stream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server.clone());
    let handle = Arc::new(handle);
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(pair) => pair,
            Err(e) => {
                debug!("transfer accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let handle = handle.clone();
        tokio::spawn(async move {
            let accepted = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
            let stream = match accepted {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => return debug!(%remote, "transfer handshake failed: {e}"),
                Err(_) => return debug!(%remote, "transfer handshake timed out"),
            };
            let host = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .and_then(|cert| herd_tls::host_id_of(cert));
            let Some(host) = host else {
                return debug!(%remote, "{}", TransferError::Anonymous);
            };
            handle(host, tokio_rustls::TlsStream::Server(stream)).await;
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use herd_proto::migration::{TransferHello, TransferReply};

    #[tokio::test]
    async fn frames_round_trip_and_oversized_ones_are_refused_unread() {
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        let hello = TransferHello {
            migration: uuid::Uuid::from_u128(1),
            attempt: 1,
            vm: uuid::Uuid::from_u128(2),
            handoff: vec![7; 100],
        };
        write_frame(&mut a, &hello).await.unwrap();
        assert_eq!(read_frame::<TransferHello>(&mut b).await.unwrap(), hello);
        a.write_all(&(u32::MAX).to_be_bytes()).await.unwrap();
        assert!(matches!(
            read_frame::<TransferReply>(&mut b).await,
            Err(TransferError::TooLarge(_))
        ));
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(&3u32.to_be_bytes()).await.unwrap();
        a.write_all(&[9, 9, 9]).await.unwrap();
        assert!(matches!(
            read_frame::<TransferReply>(&mut b).await,
            Err(TransferError::Malformed(_))
        ));
    }
}
