//! The proximity tree of the hosts: labels set at join or by an admin, round trips
//! the agents measure to the neighbours named here, and the tree `herd_topology`
//! builds from both, for `herd topology` and for broadcasts.
//!
//! The tree is built when asked, from the hosts up at that moment, so it is always the
//! tree of the current fleet: a host that joins or leaves changes the next answer. The
//! neighbours each host measures are named again when a host connects or a label
//! changes, and checked every few seconds; a host is told only when its list changed.

pub mod book;

use crate::cloud::{invalid, Cloud, CloudError};
use herd_proto::proximity::{Neighbour, MAX_NEIGHBOURS};
use herd_proto::wire::{HostId, ServerMsg};
use herd_topology::{Labels, Member, Place};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tracing::warn;
use uuid::Uuid;

/// How often the neighbour lists are checked when nothing asked for it.
const CHECK_EVERY: Duration = Duration::from_secs(10);
/// A connection waits this long for others (a restart's wave makes one pass).
const SETTLE: Duration = Duration::from_millis(500);
/// The widest tree `herd topology` draws.
pub const MAX_FANOUT: usize = 64;

/// The proximity tree as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TopologyView {
    pub root: Uuid,
    pub fanout: usize,
    /// Every host that is up, in the order it joined the tree (the root first): each
    /// rack, zone and region is one run of it.
    pub hosts: Vec<TopologyHost>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TopologyHost {
    pub id: Uuid,
    pub hostname: String,
    pub region: String,
    pub zone: String,
    pub rack: String,
    pub parent: Option<Uuid>,
    pub depth: usize,
    /// The measured round trip to its parent, if either measured it.
    pub rtt_to_parent_us: Option<u32>,
}

/// A label change: what to set, then what to remove.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LabelChange {
    #[serde(default)]
    pub set: Labels,
    #[serde(default)]
    pub remove: Vec<String>,
}

fn member(id: HostId, labels: &Labels) -> Member {
    Member {
        id,
        place: Place::of(labels),
    }
}

impl Cloud {
    /// Names each connected host's neighbours, whenever a host connects and every few
    /// seconds, until the process ends.
    pub async fn tell_neighbours(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = self.topology.joined.notified() => tokio::time::sleep(SETTLE).await,
                _ = tokio::time::sleep(CHECK_EVERY) => {}
            }
            let cloud = self.clone();
            let told = tokio::task::spawn_blocking(move || cloud.tell_neighbours_once()).await;
            match told {
                Ok(Err(e)) => warn!("naming hosts' neighbours: {e}"),
                Err(e) => warn!("naming hosts' neighbours: {e}"),
                Ok(Ok(())) => {}
            }
        }
    }

    fn tell_neighbours_once(&self) -> Result<(), CloudError> {
        let connected: HashSet<HostId> = self.connected_hosts().into_iter().collect();
        let hosts = self.store.hosts()?;
        let addrs: HashMap<HostId, String> = hosts
            .iter()
            .filter(|h| connected.contains(&h.id))
            .filter_map(|h| Some((h.id, self.topology.transfer_addr(h.id)?.to_string())))
            .collect();
        let members: Vec<Member> = hosts
            .iter()
            .filter(|h| addrs.contains_key(&h.id))
            .map(|h| member(h.id, &h.labels))
            .collect();
        for (host, ids) in herd_topology::neighbours(&members, MAX_NEIGHBOURS) {
            let list: Vec<Neighbour> = ids
                .into_iter()
                .filter_map(|id| {
                    Some(Neighbour {
                        host: id,
                        addr: addrs.get(&id)?.clone(),
                    })
                })
                .collect();
            if self.topology.told.lock().get(&host) == Some(&list) {
                continue;
            }
            if self.send_to_agent(host, ServerMsg::Neighbours(list.clone())) {
                self.topology.told.lock().insert(host, list);
            }
        }
        Ok(())
    }

    /// Sets and removes labels of a host; answers its labels after the change.
    pub fn label_host(&self, id: &str, change: &LabelChange) -> Result<Labels, CloudError> {
        let mut host = self.host(id)?.record;
        for key in &change.remove {
            if !change.set.contains_key(key) {
                host.labels.remove(key);
            }
        }
        host.labels
            .extend(change.set.iter().map(|(k, v)| (k.clone(), v.clone())));
        herd_topology::check_labels(&host.labels).map_err(|e| invalid("labels", e.to_string()))?;
        if !self.store.set_host_labels(host.id, &host.labels)? {
            return Err(CloudError::NotFound {
                kind: "host",
                id: id.to_owned(),
            });
        }
        self.topology.joined.notify_one();
        Ok(host.labels)
    }

    /// The proximity tree of the hosts up now, from `root` (the first up host by
    /// name when none is given), at most `fanout` children each.
    pub fn topology_tree(
        &self,
        root: Option<&str>,
        fanout: usize,
    ) -> Result<TopologyView, CloudError> {
        if !(1..=MAX_FANOUT).contains(&fanout) {
            return Err(invalid(
                "fanout",
                format!("must be between 1 and {MAX_FANOUT}"),
            ));
        }
        let up: Vec<_> = self
            .hosts()?
            .into_iter()
            .map(|h| h.record)
            .filter(|h| h.up)
            .collect();
        let root = match root {
            Some(id) => {
                let host = self.host(id)?.record;
                if !host.up {
                    return Err(CloudError::Conflict {
                        code: "host_down",
                        message: format!(
                            "host {} is down; a tree grows from a host that is up",
                            host.hostname
                        ),
                    });
                }
                host.id
            }
            None => match up.first() {
                Some(host) => host.id,
                None => {
                    return Err(CloudError::Conflict {
                        code: "no_hosts",
                        message: "no host is up".into(),
                    })
                }
            },
        };
        let members: Vec<Member> = up.iter().map(|h| member(h.id, &h.labels)).collect();
        let rtts = self.topology.rtts();
        let tree = herd_topology::build(&members, &rtts, root, fanout)
            .map_err(|e| invalid("root", e.to_string()))?;
        let by_id: HashMap<HostId, &crate::store::HostRecord> =
            up.iter().map(|h| (h.id, h)).collect();
        let hosts = tree
            .order
            .iter()
            .filter_map(|id| {
                let record = by_id.get(id)?;
                let place = Place::of(&record.labels);
                let parent = tree.parent.get(id).copied();
                Some(TopologyHost {
                    id: *id,
                    hostname: record.hostname.clone(),
                    region: place.region,
                    zone: place.zone,
                    rack: place.rack,
                    parent,
                    depth: tree.depth(*id),
                    rtt_to_parent_us: parent.and_then(|p| rtts.get(p, *id)),
                })
            })
            .collect();
        Ok(TopologyView {
            root,
            fanout,
            hosts,
        })
    }
}
