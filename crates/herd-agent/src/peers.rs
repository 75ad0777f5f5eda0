//! What this host knows of the others: the latest status each sent through the bus,
//! and when it last said anything. Pure; the session feeds it and asks it.
//!
//! A heartbeat (a status without figures) keeps a host fresh and its figures as they
//! were; a host silent for two status intervals is stale, and one silent for much
//! longer (it left, or its link stays cut) is forgotten, so the table is as big as the
//! hosts that speak.

use herd_proto::status::{HostStatus, PeerUpdate, PeerView, STALE_AFTER_INTERVALS};
use std::collections::BTreeMap;
use uuid::Uuid;

/// A host silent this many intervals is forgotten.
const FORGET_AFTER_INTERVALS: u64 = 300;

#[derive(Debug, Clone)]
struct Peer {
    hostname: String,
    seq: u64,
    heard_ms: u64,
    status: Option<HostStatus>,
}

#[derive(Debug, Default)]
pub struct Peers {
    peers: BTreeMap<Uuid, Peer>,
}

impl Peers {
    /// Takes a batch the bus relayed at `now_ms`. A status older than the one held (a
    /// lower sequence number after a reordering) changes nothing; a lower number after
    /// a restart of that host comes with its figures and starts over.
    pub fn heard(&mut self, updates: Vec<PeerUpdate>, now_ms: u64) {
        for PeerUpdate {
            host,
            hostname,
            update,
        } in updates
        {
            let peer = self.peers.entry(host).or_insert_with(|| Peer {
                hostname: hostname.clone().unwrap_or_default(),
                seq: 0,
                heard_ms: now_ms,
                status: None,
            });
            if update.seq <= peer.seq && update.status.is_none() {
                continue;
            }
            peer.seq = update.seq;
            peer.heard_ms = now_ms;
            if let Some(status) = update.status {
                peer.status = Some(status);
            }
            if let Some(name) = hostname {
                peer.hostname = name;
            }
        }
    }

    /// Every host heard from, with its age at `now_ms`, stale past two intervals.
    pub fn view(&mut self, now_ms: u64, interval_ms: u64) -> Vec<PeerView> {
        let forget = interval_ms.saturating_mul(FORGET_AFTER_INTERVALS);
        self.peers
            .retain(|_, p| now_ms.saturating_sub(p.heard_ms) < forget);
        self.peers
            .iter()
            .map(|(host, p)| {
                let age_ms = now_ms.saturating_sub(p.heard_ms);
                PeerView {
                    host: *host,
                    hostname: p.hostname.clone(),
                    age_ms,
                    stale: age_ms > interval_ms.saturating_mul(STALE_AFTER_INTERVALS),
                    seq: p.seq,
                    status: p.status,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herd_proto::status::StatusUpdate;

    fn update(host: u128, seq: u64, cpu: Option<u16>) -> PeerUpdate {
        PeerUpdate {
            host: Uuid::from_u128(host),
            hostname: cpu.map(|_| format!("h{host}")),
            update: StatusUpdate {
                seq,
                status: cpu.map(|cpu_permille| HostStatus {
                    cpu_permille,
                    ..HostStatus::default()
                }),
            },
        }
    }

    #[test]
    fn heartbeats_keep_a_host_fresh_and_silence_makes_it_stale() {
        let mut peers = Peers::default();
        peers.heard(vec![update(1, 1, Some(100)), update(2, 1, Some(200))], 0);
        peers.heard(vec![update(1, 2, None)], 1_500);
        let view = peers.view(2_500, 1_000);
        assert_eq!(view.len(), 2);
        assert!(!view[0].stale && view[0].age_ms == 1_000, "{view:?}");
        assert_eq!(view[0].status.map(|s| s.cpu_permille), Some(100), "kept");
        assert_eq!(view[0].hostname, "h1");
        assert!(view[1].stale, "two intervals silent: {view:?}");
        // A reordered old heartbeat is not news; a restarted host's figures are.
        peers.heard(vec![update(1, 1, None)], 3_000);
        assert_eq!(peers.view(3_000, 1_000)[0].age_ms, 1_500);
        peers.heard(vec![update(1, 1, Some(900))], 3_100);
        assert_eq!(
            peers.view(3_100, 1_000)[0].status.map(|s| s.cpu_permille),
            Some(900)
        );
        // Long silent: forgotten.
        assert_eq!(peers.view(400_000, 1_000).len(), 0);
    }
}
