//! System containers under an OCI runtime (`runc`), with herd-guest as their PID 1.
//!
//! A container is the same guest as a VM, on the host's kernel instead of its own: the
//! image's initrd, unpacked once per image into a read-only root, under a writable layer
//! of its own (overlayfs); herd-guest as init, supervising the workload and enforcing
//! the VM's policies; the same channel protocol, over a unix socket the agent listens on
//! instead of a virtio-serial port. The socket's directory is mounted read-only in the
//! container, so the VM a message is about is the socket it came in on.
//!
//! Each container is one directory, `<state_dir>/<vm-id>/`, holding its spec, the
//! driver's record (launched, stopped, failed; paused; hello seen), the bundle, the
//! writable layer, the channel directory, the console log and the init's pid. runc keeps
//! its own state under `<state_dir>/.runc`. The init is not the agent's child, so the
//! container outlives the agent, and a restarted agent adopts it from the files: the
//! init is alive if its pid is in the container's cgroup.
//!
//! Suspend to disk needs CRIU; where `criu check` fails (it does on this kernel), the
//! driver says so in its probe and refuses `suspend` with that reason.

pub mod bundle;
mod container;
mod migrate;
mod ops;
mod runc;
mod snapshot;

use crate::driver::{
    same_shape, Capabilities, Driver, DriverError, ObservedVm, ProgressSink, Sent, Snapshot,
};
use crate::drivers::channel::Guests;
use crate::drivers::{console, images};
use crate::persist;
use async_trait::async_trait;
use container::{Container, Paths, Phase, Record};
use herd_proto::guest::GuestMsg;
use herd_proto::wire::{HypervisorInfo, VmId, VmSpec, VmUsage};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, OnceCell};
use tracing::{debug, info, warn};

/// The hypervisor type this driver serves.
pub const KIND: &str = "oci";

/// Operator settings of the oci driver.
#[derive(Debug, Clone)]
pub struct OciConfig {
    /// Where images live: `<images_dir>/<name>/{initrd,image.json}` (see herd-image).
    pub images_dir: PathBuf,
    pub runc_binary: PathBuf,
    /// How long a container gets to end on SIGTERM before it is killed.
    pub stop_timeout: Duration,
}

impl OciConfig {
    pub fn new(images_dir: PathBuf) -> OciConfig {
        OciConfig {
            images_dir,
            runc_binary: PathBuf::from("runc"),
            stop_timeout: Duration::from_secs(10),
        }
    }
}

pub(crate) struct Inner {
    state_dir: PathBuf,
    config: OciConfig,
    runc: runc::Runc,
    cgroups: Option<herd_cgroup::Layout>,
    events: crate::agent::GuestEventSender,
    containers: Mutex<BTreeMap<VmId, Container>>,
    op_locks: crate::drivers::op_locks::OpLocks,
    /// Why suspend is unavailable here (`None`: CRIU works), asked once.
    criu: OnceCell<Option<String>>,
}

/// The oci driver. Dropping it leaves every container running; a new driver on the same
/// state dir adopts them.
pub struct OciDriver {
    inner: Arc<Inner>,
}

impl Drop for OciDriver {
    fn drop(&mut self) {
        for container in self.inner.containers.lock().values_mut() {
            if let Some((handle, _)) = container.channel.take() {
                handle.abort();
            }
        }
    }
}

impl Inner {
    fn with<T>(
        &self,
        id: VmId,
        f: impl FnOnce(&mut Container) -> Result<T, DriverError>,
    ) -> Result<T, DriverError> {
        let mut containers = self.containers.lock();
        let container = containers.get_mut(&id).ok_or(DriverError::NoSuchVm(id))?;
        f(container)
    }

    /// The unpacked root of an image, unpacking it on first use.
    async fn image_root(&self, name: &str) -> Result<PathBuf, DriverError> {
        let dir = images::find(&self.config.images_dir, name, &["initrd"])?;
        tokio::task::spawn_blocking(move || herd_image::container_rootfs(&dir))
            .await
            .map_err(|e| DriverError::State(format!("unpacking the image: {e}")))?
            .map_err(|e| DriverError::Invalid(format!("image {name:?}: {e}")))
    }

    async fn criu_problem(&self) -> Option<String> {
        self.criu.get_or_init(runc::criu_problem).await.clone()
    }
}

/// What the guest channel asks of the driver (see `drivers::channel`).
impl Guests for Inner {
    fn wanted(&self, id: VmId, generation: u64) -> bool {
        self.containers.lock().get(&id).is_some_and(|c| {
            c.generation == generation && c.record.phase == Phase::Launched && c.alive()
        })
    }

    fn check_hello(&self, id: VmId, generation: u64, vm_id: VmId, token: &str) -> bool {
        let mut containers = self.containers.lock();
        let Some(c) = containers.get_mut(&id) else {
            return false;
        };
        if c.generation != generation || vm_id != id || token != c.record.token {
            return false;
        }
        if !c.record.hello_seen {
            c.record.hello_seen = true;
            if let Err(e) = c.save() {
                warn!("{e}");
            }
        }
        true
    }

    fn policy(&self, id: VmId) -> herd_proto::policy::PolicySpec {
        self.with(id, |c| Ok(c.spec.policy)).unwrap_or_default()
    }

    fn deliver(&self, id: VmId, generation: u64, msg: GuestMsg) {
        if let Some(c) = self
            .containers
            .lock()
            .get_mut(&id)
            .filter(|c| c.generation == generation)
        {
            let changed = match &msg {
                GuestMsg::PolicyAction { .. } if !c.record.policy_reported => {
                    c.record.policy_reported = true;
                    true
                }
                GuestMsg::WorkloadExit { code } if c.record.exit_code != Some(*code) => {
                    c.record.exit_code = Some(*code);
                    true
                }
                GuestMsg::Usage { net_rx, net_tx, .. } => {
                    c.guest_net = (*net_rx, *net_tx);
                    false
                }
                _ => false,
            };
            if changed {
                if let Err(e) = c.save() {
                    warn!("{e}");
                }
            }
        }
        if self.events.try_send((id, msg)).is_err() {
            debug!(%id, "guest message dropped: the agent's queue is full");
        }
    }
}

impl OciDriver {
    /// Opens the driver and adopts the containers in `state_dir`. Live inits are left
    /// untouched; the agent listens on their channel sockets again.
    pub fn open(
        state_dir: PathBuf,
        config: OciConfig,
        guest_events: crate::agent::GuestEventSender,
    ) -> Result<OciDriver, DriverError> {
        std::fs::create_dir_all(&state_dir)
            .map_err(DriverError::io("creating the oci state dir"))?;
        let mut containers = BTreeMap::new();
        let entries =
            std::fs::read_dir(&state_dir).map_err(DriverError::io("listing the oci state dir"))?;
        for entry in entries.flatten() {
            let Ok(id) = entry.file_name().to_string_lossy().parse::<VmId>() else {
                continue;
            };
            let paths = Paths::new(&state_dir, id);
            let spec: Option<VmSpec> =
                persist::load_json(&paths.spec()).map_err(DriverError::State)?;
            let record: Option<Record> =
                persist::load_json(&paths.state()).map_err(DriverError::State)?;
            let (Some(spec), Some(record)) = (spec, record) else {
                warn!(%id, "incomplete container dir; removing it");
                let _ = container::unmount_root(&paths);
                let _ = std::fs::remove_dir_all(&paths.dir);
                continue;
            };
            let pid = crate::drivers::procfs::read_pid_file(&paths.pid_file())
                .filter(|pid| container::is_our_init(*pid, id));
            info!(%id, ?pid, phase = ?record.phase, "adopting container");
            // Released again on adoption: a crash may have stopped half-way.
            let ended = record.phase != Phase::Launched;
            containers.insert(
                id,
                Container {
                    id,
                    paths,
                    spec,
                    record,
                    pid,
                    busy: None,
                    guest_net: (0, 0),
                    generation: 0,
                    channel: None,
                    unreported: None,
                    ended,
                    receiving: None,
                    // The agent's bursts task gives it its lease again, if it has one.
                    burst: (0, 0),
                },
            );
        }
        let runc = runc::Runc {
            binary: config.runc_binary.clone(),
            root: state_dir.join(".runc"),
        };
        let inner = Arc::new(Inner {
            state_dir,
            config,
            runc,
            cgroups: herd_cgroup::Layout::detect(),
            events: guest_events,
            containers: Mutex::new(containers),
            op_locks: Default::default(),
            criu: OnceCell::new(),
        });
        let live: Vec<VmId> = inner
            .containers
            .lock()
            .iter()
            .filter(|(_, c)| c.record.phase == Phase::Launched && c.pid.is_some())
            .map(|(id, _)| *id)
            .collect();
        for id in live {
            if let Err(e) = inner.listen(id, 0) {
                warn!(%id, "cannot listen for the adopted container's guest: {e}");
            }
        }
        Ok(OciDriver { inner })
    }

    /// The pid of a container's init, if it has one (for tests and diagnostics).
    pub fn pid(&self, id: VmId) -> Option<i32> {
        self.inner.with(id, |c| Ok(c.pid)).ok().flatten()
    }

    /// The directory holding a container's files.
    pub fn container_dir(&self, id: VmId) -> PathBuf {
        Paths::new(&self.inner.state_dir, id).dir
    }

    /// The name runc knows a container by.
    pub fn runc_name(id: VmId) -> String {
        container::runc_name(id)
    }

    /// The workload exit code the guest reported, if any.
    pub fn exit_code(&self, id: VmId) -> Option<i32> {
        self.inner
            .with(id, |c| Ok(c.record.exit_code))
            .ok()
            .flatten()
    }

    /// Why a container is in `error`, if it is.
    pub fn failure(&self, id: VmId) -> Option<String> {
        self.inner
            .with(id, |c| match &c.record.phase {
                Phase::Failed { reason } => Ok(Some(reason.clone())),
                _ => Ok(None),
            })
            .ok()
            .flatten()
    }
}

#[async_trait]
impl Driver for OciDriver {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            resize: true,
            burst: true,
            ..Capabilities::default()
        }
    }

    async fn running_specs(&self) -> Vec<(VmId, VmSpec)> {
        self.inner
            .containers
            .lock()
            .values()
            .filter(|c| c.record.phase == Phase::Launched && c.alive())
            .map(|c| (c.id, c.spec.clone()))
            .collect()
    }

    async fn burst(&self, id: VmId, cpus: u32, memory_mib: u64) -> Result<(), DriverError> {
        self.inner
            .run_op(id, move |inner| async move {
                inner.do_burst(id, cpus, memory_mib).await
            })
            .await
    }

    fn tell_guest(&self, id: VmId, msg: herd_proto::guest::HostMsg) {
        if let Some(c) = self.inner.containers.lock().get(&id) {
            if let Some((_, tx)) = &c.channel {
                let _ = tx.send(msg);
            }
        }
    }

    fn footprint(&self) -> Option<herd_util::Footprint> {
        Some(herd_util::Footprint::Cgroup {
            path: container::CGROUP_PARENT.into(),
        })
    }

    async fn probe(&self) -> Result<HypervisorInfo, DriverError> {
        let unavailable = |reason: String| DriverError::Unavailable { kind: KIND, reason };
        let version = self
            .inner
            .runc
            .version()
            .await
            .map_err(|e| unavailable(format!("{e} (apt-get install runc)")))?;
        if !nix::unistd::geteuid().is_root() {
            return Err(unavailable(
                "containers need the agent to run as root".into(),
            ));
        }
        let cgroups = self
            .inner
            .cgroups
            .as_ref()
            .ok_or_else(|| unavailable("no cgroup hierarchy is mounted".into()))?;
        let images = images::available(&self.inner.config.images_dir, KIND)?;
        let suspend = match self.inner.criu_problem().await {
            None => "suspend: criu ok but not supported by herd yet".to_string(),
            Some(reason) => {
                HypervisorInfo::suspend_unsupported_note(&format!("criu check: {reason}"))
            }
        };
        Ok(HypervisorInfo {
            kind: KIND.into(),
            detail: format!(
                "runc {version}, {}, {suspend}, images: {}",
                cgroups.name(),
                images.join(",")
            ),
        })
    }

    async fn list(&self) -> Result<Vec<ObservedVm>, DriverError> {
        let mut containers = self.inner.containers.lock();
        let mut observed = Vec::with_capacity(containers.len());
        let mut ended = Vec::new();
        for (id, c) in containers.iter_mut() {
            let state = c.observe();
            if let Some(msg) = c.unreported.take() {
                if let Err(mpsc::error::TrySendError::Full((_, msg))) =
                    self.inner.events.try_send((*id, msg))
                {
                    c.unreported = Some(msg);
                }
            }
            if std::mem::take(&mut c.ended) {
                ended.push(*id);
            }
            observed.push(ObservedVm { id: *id, state });
        }
        drop(containers);
        for id in ended {
            let inner = self.inner.clone();
            tokio::spawn(async move {
                let result = inner
                    .run_op(
                        id,
                        move |inner| async move { inner.release_ended(id).await },
                    )
                    .await;
                if let Err(e) = result {
                    warn!(%id, "releasing an ended container: {e}");
                }
            });
        }
        Ok(observed)
    }

    async fn usage(&self) -> Result<Vec<VmUsage>, DriverError> {
        let Some(layout) = &self.inner.cgroups else {
            return Ok(Vec::new());
        };
        let containers = self.inner.containers.lock();
        Ok(containers
            .iter()
            .filter(|(_, c)| c.pid.is_some())
            .filter_map(|(id, c)| {
                let counters = layout.read(&container::cgroup_path(*id))?;
                Some(VmUsage {
                    vm: *id,
                    cpu_ms: counters.cpu_ns / 1_000_000,
                    mem_kib: counters.memory_bytes / 1024,
                    net_rx_bytes: c.guest_net.0,
                    net_tx_bytes: c.guest_net.1,
                    disk_read_bytes: counters.io_read_bytes,
                    disk_write_bytes: counters.io_write_bytes,
                })
            })
            .collect())
    }

    async fn create(&self, id: VmId, spec: &VmSpec) -> Result<(), DriverError> {
        let spec = spec.clone();
        self.inner
            .run_op(id, move |inner| async move {
                inner.do_create(id, spec, None).await
            })
            .await
    }

    async fn snapshot(&self, id: VmId, dir: &std::path::Path) -> Result<Snapshot, DriverError> {
        let dir = dir.to_owned();
        self.inner
            .run_op(id, move |inner| inner.do_snapshot(id, dir))
            .await
    }

    async fn create_from(
        &self,
        id: VmId,
        spec: &VmSpec,
        dir: &std::path::Path,
        _handoff: &[u8],
    ) -> Result<(), DriverError> {
        let (spec, dir) = (spec.clone(), dir.to_owned());
        self.inner
            .run_op(id, move |inner| async move {
                inner.do_create(id, spec, Some(dir)).await
            })
            .await
    }

    async fn migration_handoff(&self, id: VmId) -> Result<Vec<u8>, DriverError> {
        self.inner.handoff(id)
    }

    /// Cold: the container stops here and starts on the target (see `migrate`); the
    /// downtime limit does not apply.
    async fn migrate_out(
        &self,
        id: VmId,
        to: &std::path::Path,
        _max_downtime_ms: u64,
        progress: ProgressSink,
    ) -> Result<Sent, DriverError> {
        let to = to.to_owned();
        self.inner
            .run_op(id, move |inner| inner.do_migrate_out(id, to, progress))
            .await
    }

    async fn migrate_out_undo(&self, id: VmId) -> Result<(), DriverError> {
        self.inner
            .run_op(id, move |inner| inner.do_migrate_out_undo(id))
            .await
    }

    async fn migrate_in(
        &self,
        id: VmId,
        spec: &VmSpec,
        handoff: &[u8],
    ) -> Result<PathBuf, DriverError> {
        let (spec, handoff) = (spec.clone(), handoff.to_vec());
        self.inner
            .run_op(id, move |inner| inner.do_migrate_in(id, spec, handoff))
            .await
    }

    async fn migrate_in_finish(&self, id: VmId) -> Result<(), DriverError> {
        self.inner
            .run_op(id, move |inner| inner.do_migrate_in_finish(id))
            .await
    }

    async fn reshape(&self, id: VmId, spec: &VmSpec) -> Result<bool, DriverError> {
        if self.inner.with(id, |c| Ok(same_shape(&c.spec, spec)))? {
            return Ok(false);
        }
        let (vcpus, memory_mib) = (spec.vcpus, spec.memory_mib);
        self.inner
            .run_op(id, move |inner| async move {
                inner.do_reshape(id, vcpus, memory_mib).await
            })
            .await?;
        Ok(true)
    }

    async fn start(&self, id: VmId) -> Result<(), DriverError> {
        self.inner
            .run_op(id, move |inner| async move { inner.do_start(id).await })
            .await
    }

    async fn pause(&self, id: VmId) -> Result<(), DriverError> {
        self.inner
            .run_op(
                id,
                move |inner| async move { inner.do_pause(id, true).await },
            )
            .await
    }

    async fn resume(&self, id: VmId) -> Result<(), DriverError> {
        self.inner
            .run_op(
                id,
                move |inner| async move { inner.do_pause(id, false).await },
            )
            .await
    }

    async fn suspend(&self, id: VmId) -> Result<(), DriverError> {
        self.inner.with(id, |_| Ok(()))?;
        let reason = self
            .inner
            .criu_problem()
            .await
            .unwrap_or_else(|| "checkpointing containers is not built yet".into());
        Err(DriverError::Invalid(format!(
            "suspend: unsupported for containers on this host (criu check: {reason})"
        )))
    }

    async fn stop(&self, id: VmId) -> Result<(), DriverError> {
        self.inner
            .run_op(id, move |inner| async move { inner.do_stop(id).await })
            .await
    }

    async fn terminate(&self, id: VmId) -> Result<(), DriverError> {
        self.inner
            .run_op(id, move |inner| async move { inner.do_terminate(id).await })
            .await?;
        self.inner.op_locks.forget(id);
        Ok(())
    }

    async fn console(&self, id: VmId, max_bytes: usize) -> Result<Vec<u8>, DriverError> {
        console::of_vm(&self.container_dir(id), id, max_bytes)
    }
}
