//! Joining once: a one-time token and a CSR buy this host its id, its agent token and,
//! over HTTPS, a certificate from the server's CA. What the join yields is written
//! before anything else depends on it, the credentials file last, so that its presence
//! means "joined" even after a kill -9 halfway through.

use super::state::Credentials;
use super::transport::{error_chain, Transport};
use super::{Agent, AgentError};
use crate::persist;
use herd_proto::join::{JoinRequest, JoinResponse};
use std::path::PathBuf;
use tracing::info;

impl Agent {
    pub(super) fn credentials_path(&self) -> PathBuf {
        self.config.data_dir.join("agent.json")
    }

    fn tls_paths(&self) -> [PathBuf; 3] {
        let dir = &self.config.data_dir;
        [
            dir.join("agent.key"),
            dir.join("agent.pem"),
            dir.join("ca.pem"),
        ]
    }

    /// The key, certificate and CA saved at a join over HTTPS.
    pub(super) fn tls_files(&self) -> Result<[String; 3], AgentError> {
        let [key, cert, ca] = self.tls_paths().map(|path| {
            std::fs::read_to_string(&path).map_err(|e| {
                AgentError::State(format!(
                    "{}: {e} (this host joined over HTTPS and needs its key, certificate \
                     and CA; join again with a new token and an empty data dir)",
                    path.display()
                ))
            })
        });
        Ok([key?, cert?, ca?])
    }

    /// How to reach the server with these credentials: over HTTPS with the key,
    /// certificate and CA saved at join.
    pub(super) fn transport(&self, creds: &Credentials) -> Result<Transport, AgentError> {
        if !creds.server_url.starts_with("https://") {
            return Transport::plain();
        }
        let [key, cert, ca] = self.tls_files()?;
        let config = herd_tls::client_config(&ca, Some((&cert, &key)))?;
        Transport::tls(config)
    }

    /// The CA to trust for a first join over HTTPS: given, or taken from the server's
    /// handshake if it matches the pinned fingerprint.
    async fn ca_for_join(&self, url: &str) -> Result<String, AgentError> {
        if let Some(pem) = &self.config.ca_pem {
            return Ok(pem.clone());
        }
        let Some(fingerprint) = &self.config.ca_fingerprint else {
            return Err(AgentError::Join {
                url: url.to_owned(),
                reason: "the server speaks HTTPS but no CA is pinned: pass --ca-fingerprint \
                         (`herd host join-token` prints it) or --ca with the server's ca.pem"
                    .into(),
            });
        };
        let pem = herd_tls::fetch_pinned_ca(url, fingerprint).await?;
        info!(fingerprint = %herd_tls::normalize_fingerprint(fingerprint)?, "pinned the server's CA");
        Ok(pem)
    }

    /// Joins with the one-time token if this host has no credentials yet.
    pub(super) async fn credentials(&self) -> Result<Credentials, AgentError> {
        std::fs::create_dir_all(&self.config.data_dir)
            .map_err(|e| AgentError::State(format!("creating data dir: {e}")))?;
        if let Some(mut creds) = persist::load_json::<Credentials>(&self.credentials_path())
            .map_err(AgentError::State)?
        {
            // A server named now is where the server is now (`herd up` on another
            // address, a server moved): the host keeps its identity and follows it.
            if let Some(url) = &self.config.server_url {
                let url = url.trim_end_matches('/');
                if url != creds.server_url {
                    info!(was = %creds.server_url, now = %url, "the server is at a new address");
                    creds.server_url = url.to_owned();
                    self.save_credentials(&creds)?;
                }
            }
            return Ok(creds);
        }
        let (Some(url), Some(token)) = (&self.config.server_url, &self.config.join_token) else {
            return Err(AgentError::NotJoined);
        };
        let url = url.trim_end_matches('/').to_owned();
        let join_err = |reason: String| AgentError::Join {
            url: url.clone(),
            reason,
        };
        let ca_pem = if url.starts_with("https://") {
            Some(self.ca_for_join(&url).await?)
        } else {
            None
        };
        let transport = match &ca_pem {
            Some(ca) => Transport::tls(herd_tls::client_config(ca, None)?)?,
            None => Transport::plain()?,
        };
        let (key_pem, csr_pem) = herd_tls::agent_key_and_csr()?;
        let response = transport
            .http
            .post(format!("{url}/v1/agent/join"))
            .json(&JoinRequest {
                join_token: token.clone(),
                hostname: self.config.hostname.clone(),
                csr_pem,
                labels: self.config.labels.clone(),
            })
            .send()
            .await
            .map_err(|e| join_err(error_chain(&e)))?;
        if !response.status().is_success() {
            let status = response.status();
            let body = response.text().await.unwrap_or_default();
            return Err(join_err(format!("{status}: {body}")));
        }
        let joined: JoinResponse = response.json().await.map_err(|e| join_err(e.to_string()))?;
        if let Some(ca_pem) = &ca_pem {
            let Some(cert_pem) = &joined.certificate_pem else {
                return Err(join_err("the server issued no certificate".into()));
            };
            // The server's word on its CA must be the CA this connection was verified
            // with; anything else is a confused or hostile server.
            let named = joined.ca_pem.as_deref().map(herd_tls::fingerprint_of_pem);
            if !matches!(named, Some(Ok(named)) if named == herd_tls::fingerprint_of_pem(ca_pem)?) {
                return Err(join_err(
                    "the server named a CA other than the one it was verified with".into(),
                ));
            }
            let [key_path, cert_path, ca_path] = self.tls_paths();
            let save = |path: &PathBuf, bytes: &str, private: bool| {
                let written = if private {
                    persist::write_private(path, bytes.as_bytes())
                } else {
                    persist::write_atomic(path, bytes.as_bytes())
                };
                written.map_err(|e| AgentError::State(format!("saving {}: {e}", path.display())))
            };
            save(&key_path, &key_pem, true)?;
            save(&cert_path, cert_pem, false)?;
            save(&ca_path, ca_pem, false)?;
        }
        let creds = Credentials {
            server_url: url,
            host_id: joined.host_id,
            agent_token: joined.agent_token,
        };
        // Last: its presence means "joined".
        self.save_credentials(&creds)?;
        info!(host = %creds.host_id, "joined");
        Ok(creds)
    }

    /// Writes the credentials owner-only (they hold the agent token), whole or not at all.
    fn save_credentials(&self, creds: &Credentials) -> Result<(), AgentError> {
        let bytes = serde_json::to_vec_pretty(creds)
            .map_err(|e| AgentError::State(format!("encoding credentials: {e}")))?;
        persist::write_private(&self.credentials_path(), &bytes)
            .map_err(|e| AgentError::State(format!("saving credentials: {e}")))
    }
}
