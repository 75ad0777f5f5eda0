//! Request and response bodies of broadcasts and of the jobs they duplicate, apart
//! from the rest of the API's bodies (`types`) to keep each file to one subject.

use super::rfc3339;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// A request to spread a VM's snapshot to other hosts of its type.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BroadcastRequest {
    /// `all` (the default): every other host of the VM's type that is up; or
    /// `KEY=VALUE`: those with that label.
    #[serde(default)]
    pub to: Option<String>,
    /// Every host that receives the snapshot starts a copy of the VM from it (a new
    /// VM, named after the VM and the host, in the same project).
    #[serde(default)]
    pub start: bool,
    /// Children per host in the tree the snapshot goes down (1 to 64); 1, the default,
    /// is a chain, which reaches the rate of one link whatever the number of hosts.
    #[serde(default)]
    pub fanout: Option<usize>,
}

/// One host's part in a broadcast.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BroadcastHostView {
    pub host: Uuid,
    pub parent: Option<Uuid>,
    /// waiting, receiving, done or failed.
    pub phase: String,
    /// Chunks it holds, checked against their hashes.
    pub chunks: u32,
    /// Chunks that failed their hash and came again.
    pub refetched: u32,
    pub reason: Option<String>,
    /// The copy started from the snapshot there.
    pub copy: Option<Uuid>,
    /// From the snapshot's capture to the last chunk here.
    pub ms_after_capture: Option<i64>,
}

/// A broadcast, as it stands.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BroadcastView {
    pub id: Uuid,
    pub vm: Uuid,
    pub source: Uuid,
    /// capturing, spreading, ended (the snapshots are kept a while, then forgotten),
    /// forgotten or failed.
    pub phase: String,
    pub reason: Option<String>,
    pub start: bool,
    pub size_bytes: Option<u64>,
    pub chunks: Option<u32>,
    /// How long the VM was paused while its snapshot was taken.
    pub paused_ms: Option<u64>,
    /// Every receiving host in the tree's order.
    pub hosts: Vec<BroadcastHostView>,
    pub created_at: String,
    pub ended_at: Option<String>,
}

impl BroadcastView {
    pub fn of(b: &crate::broadcast::plan::Broadcast) -> BroadcastView {
        BroadcastView {
            id: b.id,
            vm: b.vm,
            source: b.source,
            phase: snake(&b.phase),
            reason: b.reason.clone(),
            start: b.start,
            size_bytes: b.manifest.as_ref().map(|m| m.total_bytes()),
            chunks: b.manifest.as_ref().map(|m| m.chunks()),
            paused_ms: b.paused_ms,
            hosts: b
                .tree
                .iter()
                .filter_map(|h| {
                    let part = b.hosts.get(&h.host)?;
                    Some(BroadcastHostView {
                        host: h.host,
                        parent: h.parent,
                        phase: snake(&part.phase),
                        chunks: part.chunks,
                        refetched: part.refetched,
                        reason: part.reason.clone(),
                        copy: part.copy.filter(|c| !c.is_nil()),
                        ms_after_capture: part
                            .done_at_ms
                            .zip(b.captured_at_ms)
                            .map(|(done, captured)| done - captured),
                    })
                })
                .collect(),
            created_at: rfc3339(b.created_at_ms),
            ended_at: b.ended_at_ms.map(rfc3339),
        }
    }
}

/// A VM's broadcasts, newest first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BroadcastList {
    pub items: Vec<BroadcastView>,
}

/// An enum's name as serde writes it (snake case).
fn snake<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// A job that missed its deadline: duplicated, then decided by the first runner (the
/// original or a copy) whose workload finished.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobView {
    /// The broadcast its copies came from; absent if it could not be duplicated.
    pub broadcast: Option<Uuid>,
    /// Why it was not duplicated.
    pub reason: Option<String>,
    /// Copies asked; 0 is one on every other host.
    pub copies_asked: u32,
    pub duplicated_at: String,
    /// The runner that finished first: its result is the job's.
    pub winner: Option<Uuid>,
    pub exit_code: Option<i32>,
    pub decided_at: Option<String>,
    /// Every other runner has been told to end.
    pub settled: bool,
}

impl JobView {
    pub fn of(job: &crate::jobs::plan::Job) -> JobView {
        JobView {
            broadcast: job.broadcast,
            reason: job.reason.clone(),
            copies_asked: job.copies_asked,
            duplicated_at: rfc3339(job.duplicated_at_ms),
            winner: job.result.map(|r| r.vm),
            exit_code: job.result.map(|r| r.exit_code),
            decided_at: job.result.map(|r| rfc3339(r.at_ms)),
            settled: job.settled,
        }
    }
}
