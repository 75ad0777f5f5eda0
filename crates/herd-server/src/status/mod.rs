//! Status messages between hosts: each agent's status, heard on its connection, is
//! relayed to every other connected agent in one batch per interval.
//!
//! The server is the bus here (the embedded one; a NATS engine would carry the same
//! subject): it stamps each status with the host whose connection it came in on, so a
//! host cannot speak for another, and adds nothing of its own. Hosts decide from what
//! they hear; the server reads the same figures for `herd host status`.

pub mod book;

use crate::cloud::{Cloud, CloudError};
use herd_proto::status::PeerView;
use herd_proto::wire::ServerMsg;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// How often the statuses heard are relayed.
const RELAY_EVERY: Duration = Duration::from_millis(250);
/// How long an ask for what a host knows waits for it.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

impl Cloud {
    /// Relays what hosts said to every other connected host, until the process ends.
    pub async fn relay_statuses(self: Arc<Self>) {
        let mut tick = tokio::time::interval(RELAY_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let heard = self.statuses.take();
            if heard.is_empty() {
                continue;
            }
            for host in self.connected_hosts() {
                let theirs: Vec<_> = heard.iter().filter(|u| u.host != host).cloned().collect();
                if theirs.is_empty() {
                    continue;
                }
                let msg = ServerMsg::Peers(theirs);
                let bytes = herd_proto::wire::encode(&msg).len() as u64;
                if self.send_to_agent(host, msg) {
                    self.statuses
                        .relayed_bytes
                        .fetch_add(bytes, Ordering::Relaxed);
                }
            }
        }
    }

    /// What `id`'s agent knows of the other hosts, asked of it now.
    pub async fn host_peers(&self, id: &str) -> Result<Vec<PeerView>, CloudError> {
        let host = self.host(id)?.record;
        let unreachable = |message: String| CloudError::Conflict {
            code: "host_unreachable",
            message,
        };
        let (request, rx) = self.statuses.waiters.wait_for(host.id);
        if !self.send_to_agent(host.id, ServerMsg::PeersRequest { request }) {
            self.statuses.waiters.forget(request);
            return Err(unreachable(format!(
                "host {} is not connected",
                host.hostname
            )));
        }
        let answer = tokio::time::timeout(ANSWER_WITHIN, rx).await;
        self.statuses.waiters.forget(request);
        match answer {
            Ok(Ok(peers)) => Ok(peers),
            Ok(Err(_)) => Err(unreachable(format!("host {} disconnected", host.hostname))),
            Err(_) => Err(unreachable(format!(
                "host {} did not answer within {} s",
                host.hostname,
                ANSWER_WITHIN.as_secs()
            ))),
        }
    }
}
