//! What the agent must not forget across a kill -9, beyond its credentials: where its
//! sync stands, which commands it has applied, and the policies it backstops. It is
//! written whole before any report that depends on it, so the server is never told
//! something the disk does not hold.

use crate::backstop::Backstop;
use crate::persist;
use herd_proto::wire::{HostId, VmId};
use herd_sync::ReporterState;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct SavedState {
    pub reporter: ReporterState,
    /// The newest desired-state generation applied per VM: a command at or below it is
    /// a replay and is acknowledged without acting again.
    pub applied: BTreeMap<VmId, u64>,
    /// Policies the agent enforces as a backstop.
    #[serde(default)]
    pub backstop: Backstop,
}

/// Reads the saved state; a host that never ran has none and starts from the default.
pub(crate) fn load(path: &Path) -> Result<SavedState, String> {
    Ok(persist::load_json(path)?.unwrap_or_default())
}

/// Writes the state whole; `durable` also syncs it (see [`persist::write_unsynced`]
/// for why a scale run may not).
pub(crate) fn write(path: &Path, state: &SavedState, durable: bool) -> Result<(), String> {
    let bytes = serde_json::to_vec(state).map_err(|e| e.to_string())?;
    let written = if durable {
        persist::write_atomic(path, &bytes)
    } else {
        persist::write_unsynced(path, &bytes)
    };
    written.map_err(|e| format!("saving {}: {e}", path.display()))
}

/// What the join bought this host, in `agent.json`: its presence means "joined".
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Credentials {
    pub(super) server_url: String,
    pub(super) host_id: HostId,
    pub(super) agent_token: String,
}
