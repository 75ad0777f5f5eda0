//! How the agent reaches its server once joined: over HTTPS, clients that trust only
//! the server's CA and present this host's certificate, for HTTP and the bus alike.

use super::state::Credentials;
use super::AgentError;
use herd_proto::join::Discovery;
use std::sync::Arc;

#[derive(Clone)]
pub(super) struct Transport {
    pub(super) http: reqwest::Client,
    pub(super) tls: Option<Arc<herd_tls::rustls::ClientConfig>>,
}

/// The bus carries small frames (reports, acks, commands); tungstenite's default
/// 128 KiB read buffer, zero-filled per connection, would be most of an agent's memory
/// when thousands run in one process. Larger frames still fit: the buffer grows.
pub(super) const BUS_READ_BUFFER: usize = 8 * 1024;

/// The agent's HTTP client. It makes one request (discovery) before a connection to the
/// bus, and not even that on a quick reconnect, so an idle pooled connection would only
/// hold a socket on both ends until it times out.
fn http_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder().pool_max_idle_per_host(0)
}

impl Transport {
    pub(super) fn plain() -> Result<Transport, AgentError> {
        let http = http_builder()
            .build()
            .map_err(|e| AgentError::State(format!("building the HTTP client: {e}")))?;
        Ok(Transport { http, tls: None })
    }

    pub(super) fn tls(config: herd_tls::rustls::ClientConfig) -> Result<Transport, AgentError> {
        let http = http_builder()
            .use_preconfigured_tls(config.clone())
            .build()
            .map_err(|e| AgentError::State(format!("building the HTTPS client: {e}")))?;
        Ok(Transport {
            http,
            tls: Some(Arc::new(config)),
        })
    }

    /// Asks the server where its bus is and how often to sync.
    pub(super) async fn discover(&self, creds: &Credentials) -> Result<Discovery, String> {
        let response = self
            .http
            .get(format!("{}/v1/agent/discovery", creds.server_url))
            .bearer_auth(&creds.agent_token)
            .send()
            .await
            .map_err(|e| error_chain(&e))?;
        if !response.status().is_success() {
            return Err(format!("discovery answered {}", response.status()));
        }
        response.json().await.map_err(|e| e.to_string())
    }
}

/// An error with its causes, for a log line: reqwest's own message hides why a
/// connection failed (a certificate refused, say).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(next) = cause {
        text.push_str(": ");
        text.push_str(&next.to_string());
        cause = next.source();
    }
    text
}
