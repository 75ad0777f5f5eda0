//! Hosts as the API shows them: record, live facts and what is promised on each.

use super::placement::Placement;
use super::{Cloud, CloudError, HostLive, HostStatus};
use crate::map::{self, MapScope, ResourceMap};
use crate::store::HostRecord;
use herd_proto::wire::HostId;
use std::collections::HashMap;
use uuid::Uuid;

impl Cloud {
    pub fn hosts(&self) -> Result<Vec<HostStatus>, CloudError> {
        let hosts = self.store.hosts()?;
        let live = self.live.lock();
        let placement = self.placement.lock();
        Ok(hosts
            .into_iter()
            .map(|host| self.status_of(host, &live, &placement))
            .collect())
    }

    pub fn host(&self, id: &str) -> Result<HostStatus, CloudError> {
        let not_found = || CloudError::NotFound {
            kind: "host",
            id: id.to_owned(),
        };
        let uuid: Uuid = id.parse().map_err(|_| not_found())?;
        let host = self.store.host(uuid)?.ok_or_else(not_found)?;
        Ok(self.status_of(host, &self.live.lock(), &self.placement.lock()))
    }

    /// Whether `host` is down (or unknown) as the liveness check sees it now.
    pub(crate) fn host_down_now(&self, host: HostId) -> bool {
        self.live.lock().get(&host).is_none_or(|live| live.down)
    }

    /// The live resource map as `scope` may see it.
    pub fn resource_map(&self, scope: &MapScope) -> Result<ResourceMap, CloudError> {
        let hosts = self.hosts()?;
        let allocations = match scope {
            MapScope::Cloud => self.store.allocations(None),
            MapScope::Projects(projects) => projects
                .iter()
                .flat_map(|p| self.store.allocations(Some(p)))
                .collect(),
        };
        Ok(map::build(
            &hosts,
            &allocations,
            &self.config.sched,
            scope,
            std::time::Instant::now(),
        ))
    }

    /// A host's record with what the server knows now: liveness is judged in memory
    /// and reaches the store behind the reports before it, so memory has the word.
    fn status_of(
        &self,
        mut record: HostRecord,
        live: &HashMap<HostId, HostLive>,
        placement: &Placement,
    ) -> HostStatus {
        let used = placement
            .sched
            .host(record.id)
            .map(|slot| (slot.used_vcpus, slot.used_memory_mib))
            .unwrap_or((0, 0));
        let live = live.get(&record.id).cloned();
        if let Some(live) = &live {
            record.up = !live.down;
        }
        HostStatus {
            record,
            live,
            allocated_vcpus: used.0,
            allocated_memory_mib: used.1,
        }
    }
}
