//! The one interface between the agent and a hypervisor type.
//!
//! The agent never branches on the kind of driver: it observes states through `list`,
//! reads counters through `usage`, and converges a VM toward a target with the
//! operations below. Operations are idempotent where they can be (terminating a VM that
//! is gone succeeds), because commands may be replayed after an agent restart.

use async_trait::async_trait;
use herd_proto::migration::TransferProgress;
use herd_proto::wire::{HypervisorInfo, VmId, VmSpec, VmUsage};
use herd_proto::VmState;
use std::path::{Path, PathBuf};

/// Why a driver operation failed. Causes are kept as sources, so a log line or a
/// command's error (printed with its chain) says what the hypervisor said.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("{kind} driver is not usable on this host: {reason}")]
    Unavailable { kind: &'static str, reason: String },
    #[error("VM {0} is not on this host")]
    NoSuchVm(VmId),
    #[error("cannot {op} a VM that is {state}")]
    WrongState { op: &'static str, state: VmState },
    /// The request names something the driver cannot use (an image it lacks, say).
    #[error("{0}")]
    Invalid(String),
    #[error("VM {vm}: {doing} failed")]
    Operation {
        vm: VmId,
        doing: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The hypervisor process misbehaved, in its own words where it gave any.
    #[error("VM {vm}: {reason}")]
    Hypervisor { vm: VmId, reason: String },
    #[error("VM {vm}: {doing} took longer than {after:?}")]
    Timeout {
        vm: VmId,
        doing: &'static str,
        after: std::time::Duration,
    },
    #[error("encoding {what}")]
    Encode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// The driver's own files on this host cannot be read.
    #[error("driver state: {0}")]
    State(String),
    #[error("I/O error while {context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl DriverError {
    pub fn encode(what: &'static str) -> impl FnOnce(serde_json::Error) -> DriverError {
        move |source| DriverError::Encode { what, source }
    }

    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> DriverError {
        let context = context.into();
        move |source| DriverError::Io { context, source }
    }
}

/// A VM as the driver sees it now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObservedVm {
    pub id: VmId,
    pub state: VmState,
}

/// What a driver can do beyond the lifecycle every driver has. The agent and the
/// conformance kit ask instead of assuming; a driver says `true` only for what it has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// `suspend` saves the VM's memory to disk and ends its process; `resume` restores
    /// it, so the workload outlives the process.
    pub suspend_to_disk: bool,
    /// A running VM's state can be written to a file and restored from it elsewhere.
    pub snapshot: bool,
    /// A running VM can move to another host of the same type.
    pub live_migrate: bool,
    /// vCPUs and memory of a running VM change at once; without it
    /// [`Driver::reshape`] stops the VM so that its next boot has the new shape.
    pub resize: bool,
    /// A running VM can get more CPU time and memory for a while ([`Driver::burst`]).
    pub burst: bool,
}

/// What a source's hypervisor says once it has sent a VM away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    /// How long the VM was stopped for the switch-over.
    pub downtime_ms: Option<u64>,
    pub total_ms: u64,
    pub transferred_bytes: u64,
}

/// A snapshot a driver took for a broadcast, in the directory it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Its files in that directory, by plain name, in the order they are sent.
    pub files: Vec<String>,
    /// What a copy's driver needs besides the files (opaque to the agent).
    pub handoff: Vec<u8>,
    /// How long the VM was paused while it was taken.
    pub paused_ms: u64,
}

/// Where a live migration's progress goes while it runs.
pub type ProgressSink = tokio::sync::watch::Sender<TransferProgress>;

/// Whether two specs give a VM the same shape (what [`Driver::reshape`] changes).
pub fn same_shape(a: &VmSpec, b: &VmSpec) -> bool {
    a.vcpus == b.vcpus && a.memory_mib == b.memory_mib
}

fn cannot_migrate(kind: &str) -> DriverError {
    DriverError::Invalid(format!("{kind} VMs cannot migrate live"))
}

#[async_trait]
pub trait Driver: Send + Sync {
    /// The hypervisor type this driver serves, as used in VM specs (`qemu`, `sim`).
    fn kind(&self) -> &'static str;

    /// What this driver can do beyond the common lifecycle.
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    /// Checks that the driver can run VMs here and says how it is configured.
    async fn probe(&self) -> Result<HypervisorInfo, DriverError>;

    /// Where the utility module finds this driver's guests from outside (their
    /// processes or their parent cgroup), to measure what they cost the host.
    fn footprint(&self) -> Option<herd_util::Footprint> {
        None
    }

    /// Checks that the driver still reaches its guests (not only its own records): an
    /// error says which guest does not answer. The agent runs it now and then, in a task
    /// of its own, so a check that hangs marks the driver unresponsive and holds up
    /// nothing else; a [`DriverError::Timeout`] means unresponsive, any other error
    /// failing.
    async fn check(&self) -> Result<(), DriverError> {
        Ok(())
    }

    /// Every VM the driver holds, including ones that survived an agent restart.
    async fn list(&self) -> Result<Vec<ObservedVm>, DriverError>;

    /// The state of one VM, `None` if the driver does not hold it. Drivers that can
    /// answer without listing every VM should: converging a VM asks this often.
    async fn state_of(&self, id: VmId) -> Result<Option<VmState>, DriverError> {
        Ok(self
            .list()
            .await?
            .into_iter()
            .find(|observed| observed.id == id)
            .map(|observed| observed.state))
    }

    /// Resource counters of every VM that has any.
    async fn usage(&self) -> Result<Vec<VmUsage>, DriverError>;

    /// Builds and boots a new VM. Returns once it is booting; it reaches `running` on
    /// its own, which `list` shows.
    async fn create(&self, id: VmId, spec: &VmSpec) -> Result<(), DriverError>;

    /// Boots a stopped VM again.
    async fn start(&self, id: VmId) -> Result<(), DriverError>;

    /// Gives the VM the vCPUs and memory of `spec` when they differ from its own: at
    /// once where the hypervisor can ([`Capabilities::resize`]), else by stopping the
    /// VM so that its next boot has them (the converge that asked starts it again).
    /// Returns whether anything changed.
    async fn reshape(&self, id: VmId, spec: &VmSpec) -> Result<bool, DriverError>;

    async fn pause(&self, id: VmId) -> Result<(), DriverError>;

    /// Resumes a paused VM, or restores a suspended one from its image.
    async fn resume(&self, id: VmId) -> Result<(), DriverError>;

    /// Saves the VM's memory to disk and ends its process.
    async fn suspend(&self, id: VmId) -> Result<(), DriverError>;

    /// Asks the guest to power off, and forces it after a timeout.
    async fn stop(&self, id: VmId) -> Result<(), DriverError>;

    /// Ends the VM and removes every file it had. Succeeds if it is already gone.
    async fn terminate(&self, id: VmId) -> Result<(), DriverError>;

    /// The last `max_bytes` of the VM's serial console.
    async fn console(&self, id: VmId, max_bytes: usize) -> Result<Vec<u8>, DriverError>;

    /// The specs of the VMs whose process runs now (not stopped, not suspended): the
    /// shapes and burst limits a burst is decided from.
    async fn running_specs(&self) -> Vec<(VmId, VmSpec)> {
        Vec::new()
    }

    /// Gives a running VM `cpus` vCPUs' worth of CPU time and `memory_mib` of memory
    /// above its spec's shape (a burst), at once; `(0, 0)` gives it its shape alone.
    /// Only a driver with [`Capabilities::burst`] can.
    async fn burst(&self, id: VmId, _cpus: u32, _memory_mib: u64) -> Result<(), DriverError> {
        let _ = id;
        Err(DriverError::Invalid(format!(
            "{} VMs cannot burst",
            self.kind()
        )))
    }

    /// Sends a message to a VM's guest module, if its channel is open; dropped if not.
    fn tell_guest(&self, _id: VmId, _msg: herd_proto::guest::HostMsg) {}

    /// A broadcast's snapshot of a running or paused VM into `dir`: a running VM is
    /// paused only while it is taken, and runs again after.
    async fn snapshot(&self, _id: VmId, _dir: &Path) -> Result<Snapshot, DriverError> {
        Err(DriverError::Invalid(format!(
            "the {} driver takes no snapshots",
            self.kind()
        )))
    }

    /// Makes `id` as a copy of another host's VM from its snapshot (the files in
    /// `dir`, the source driver's handoff) and starts it, as [`Driver::create`] does.
    async fn create_from(
        &self,
        _id: VmId,
        _spec: &VmSpec,
        _dir: &Path,
        _handoff: &[u8],
    ) -> Result<(), DriverError> {
        Err(DriverError::Invalid(format!(
            "the {} driver makes no VMs from snapshots",
            self.kind()
        )))
    }

    /// Live migration, source side: what the target's driver needs to go on with the
    /// VM (its guest's credential and the like), opaque to the agent.
    async fn migration_handoff(&self, _id: VmId) -> Result<Vec<u8>, DriverError> {
        Err(cannot_migrate(self.kind()))
    }

    /// Source side: sends the running VM's state into the unix socket `to`, which the
    /// agent listens on, and returns once the hypervisor sent everything and stopped
    /// the VM here. The VM stays, stopped, until [`Driver::terminate`] (the target
    /// runs it) or [`Driver::migrate_out_undo`] (it does not). If the stream breaks,
    /// the VM goes on running here and this fails.
    async fn migrate_out(
        &self,
        _id: VmId,
        _to: &Path,
        _max_downtime_ms: u64,
        _progress: ProgressSink,
    ) -> Result<Sent, DriverError> {
        Err(cannot_migrate(self.kind()))
    }

    /// Source side: the migration did not happen; run the VM here again. Succeeds if
    /// it runs already.
    async fn migrate_out_undo(&self, _id: VmId) -> Result<(), DriverError> {
        Err(cannot_migrate(self.kind()))
    }

    /// Target side: prepares to receive the VM from another host's driver, from
    /// `spec` and the source's handoff; returns the unix socket the stream goes into.
    /// Asked again for the same VM while it waits, it answers the same socket.
    async fn migrate_in(
        &self,
        _id: VmId,
        _spec: &VmSpec,
        _handoff: &[u8],
    ) -> Result<PathBuf, DriverError> {
        Err(cannot_migrate(self.kind()))
    }

    /// Target side, once the stream has ended: waits until the received VM runs.
    async fn migrate_in_finish(&self, _id: VmId) -> Result<(), DriverError> {
        Err(cannot_migrate(self.kind()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_keeps_what_the_hypervisor_said() {
        let vm = VmId::from_u128(7);
        let error = DriverError::Operation {
            vm,
            doing: "suspending".into(),
            source: Box::new(std::io::Error::other("no space left on device")),
        };
        assert_eq!(
            crate::agent::error_chain(&error),
            format!("VM {vm}: suspending failed: no space left on device")
        );
    }
}
