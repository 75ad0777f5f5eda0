//! What the server holds of hosts' status messages: the ones heard since the last relay,
//! the latest of each host, and the asks for what a host knows of the others. Apart
//! from the relay so that the cloud can hold it.

use herd_proto::status::{HostStatus, PeerUpdate, PeerView, StatusUpdate};
use herd_proto::wire::HostId;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;

#[derive(Default)]
pub struct Statuses {
    /// Heard since the last relay, in order.
    pending: Mutex<Vec<PeerUpdate>>,
    /// Each host's name (from its hello) and latest figures.
    hosts: Mutex<HashMap<HostId, (String, Option<HostStatus>)>>,
    /// Asks for what a host hears, waiting for it.
    pub waiters: crate::waiters::Waiters<HostId, Vec<PeerView>>,
    /// Bytes of status relayed to agents, for the benchmark.
    pub relayed_bytes: AtomicU64,
}

impl Statuses {
    /// A host said hello under this name.
    pub fn named(&self, host: HostId, hostname: &str) {
        self.hosts
            .lock()
            .entry(host)
            .or_insert_with(|| (String::new(), None))
            .0 = hostname.to_owned();
    }

    /// A host's status, from the connection it came in on: queued for the others, its
    /// name added when the figures are whole.
    pub fn heard(&self, host: HostId, update: StatusUpdate) {
        let hostname = {
            let mut hosts = self.hosts.lock();
            let entry = hosts.entry(host).or_insert_with(|| (String::new(), None));
            if update.status.is_some() {
                entry.1 = update.status;
            }
            update.status.map(|_| entry.0.clone())
        };
        self.pending.lock().push(PeerUpdate {
            host,
            hostname,
            update,
        });
    }

    /// What was heard since the last call.
    pub(super) fn take(&self) -> Vec<PeerUpdate> {
        std::mem::take(&mut *self.pending.lock())
    }

    /// A host's latest figures, as it last sent them whole.
    pub fn latest(&self, host: HostId) -> Option<HostStatus> {
        self.hosts.lock().get(&host).and_then(|(_, s)| *s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herd_proto::status::HostStatus;

    #[test]
    fn a_status_is_the_connections_host_named_by_its_hello() {
        let statuses = Statuses::default();
        let (a, b) = (HostId::from_u128(1), HostId::from_u128(2));
        statuses.named(a, "a");
        let figures = HostStatus {
            cpu_permille: 10,
            ..HostStatus::default()
        };
        statuses.heard(
            a,
            StatusUpdate {
                seq: 1,
                status: Some(figures),
            },
        );
        statuses.heard(
            b,
            StatusUpdate {
                seq: 7,
                status: None,
            },
        );
        let heard = statuses.take();
        assert_eq!(heard[0].host, a);
        assert_eq!(heard[0].hostname.as_deref(), Some("a"), "whole: named");
        assert_eq!(heard[1].hostname, None, "a heartbeat carries no name");
        assert!(statuses.take().is_empty(), "taken once");
        assert_eq!(statuses.latest(a), Some(figures));
        assert_eq!(statuses.latest(b), None);
    }
}
