//! How a host becomes known: join tokens, the discovery document an agent reads
//! before it joins, and the join itself (host record plus certificate).

use super::{invalid, Cloud, CloudError};
use crate::auth;
use crate::store::now_ms;
use herd_proto::join::{Discovery, JoinRequest, JoinResponse};
use std::time::Duration;
use tracing::{info, warn};
use uuid::Uuid;

impl Cloud {
    pub fn create_join_token(&self, ttl: Duration) -> Result<(String, i64), CloudError> {
        let token = auth::new_token("join");
        let expires = now_ms() + ttl.as_millis() as i64;
        self.store
            .insert_token(&auth::hash_token(&token), "join", "join", Some(expires))?;
        Ok((token, expires))
    }

    pub fn discovery(&self) -> Discovery {
        let base = self.config.public_url.trim_end_matches('/');
        let ws = if let Some(rest) = base.strip_prefix("https://") {
            format!("wss://{rest}")
        } else if let Some(rest) = base.strip_prefix("http://") {
            format!("ws://{rest}")
        } else {
            base.to_owned()
        };
        Discovery {
            server_version: env!("CARGO_PKG_VERSION").to_owned(),
            bus_url: format!("{ws}/v1/agent/bus"),
            image_store_url: format!("{base}/v1/images"),
            sync_interval_ms: self.config.sync_interval.as_millis() as u64,
            usage_interval_ms: self.config.usage_interval.as_millis() as u64,
        }
    }

    pub fn join(&self, request: &JoinRequest) -> Result<JoinResponse, CloudError> {
        let hostname = request.hostname.trim();
        if hostname.is_empty() || hostname.len() > 253 {
            return Err(invalid("hostname", "must be 1 to 253 characters"));
        }
        herd_topology::check_labels(&request.labels)
            .map_err(|e| invalid("labels", e.to_string()))?;
        let host = Uuid::new_v4();
        // The certificate is issued before the token is spent, so a bad CSR does not
        // burn the token. Without a CA (plain HTTP) there is nothing to issue.
        let certificate_pem = match &self.ca {
            Some(ca) => Some(ca.sign_agent_csr(&request.csr_pem, host).map_err(|e| {
                let source = std::error::Error::source(&e).map(|s| format!(": {s}"));
                invalid("csr_pem", format!("{e}{}", source.unwrap_or_default()))
            })?),
            None => None,
        };
        let agent_token = auth::new_token("agt");
        let joined = self.store.join_host(
            &auth::hash_token(&request.join_token),
            host,
            hostname,
            &auth::hash_token(&agent_token),
            &request.labels,
        )?;
        if !joined {
            warn!(
                hostname,
                "join refused: unknown, used or expired join token"
            );
            return Err(CloudError::Unauthorized);
        }
        info!(%host, hostname, "host joined");
        Ok(JoinResponse {
            host_id: host,
            agent_token,
            certificate_pem,
            ca_pem: self.ca.as_ref().map(|ca| ca.pem().to_owned()),
            discovery: self.discovery(),
        })
    }
}
