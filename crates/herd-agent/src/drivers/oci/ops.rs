//! The container lifecycle: launching an init, pausing it, ending it. Each operation runs
//! in its own task under the container's operation lock (see [`Inner::run_op`]), so it
//! finishes even if the agent gives up waiting, and never races another on one container.

use super::bundle::{self, BundleSpec};
use super::container::{self, Container, Paths, Phase};
use super::Inner;
use crate::driver::DriverError;
use crate::drivers::{channel, guest_config};
use crate::persist;
use herd_proto::guest::HostMsg;
use herd_proto::wire::{VmId, VmSpec};
use herd_proto::VmState;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::{info, warn};

/// How long a killed init gets to be gone before the driver gives up on it.
const KILL_WAIT: Duration = Duration::from_secs(10);

impl Inner {
    fn hypervisor(id: VmId) -> impl FnOnce(String) -> DriverError {
        move |reason| DriverError::Hypervisor { vm: id, reason }
    }

    /// Makes and launches the container; with `seed`, its writable layer starts as the
    /// snapshot in that directory (a broadcast's copy).
    pub(super) async fn do_create(
        self: Arc<Self>,
        id: VmId,
        spec: VmSpec,
        seed: Option<std::path::PathBuf>,
    ) -> Result<(), DriverError> {
        if self.containers.lock().contains_key(&id) {
            return Ok(());
        }
        // Checked before anything is written: a bad image leaves nothing behind.
        self.image_root(&spec.image).await?;
        let paths = Paths::new(&self.state_dir, id);
        std::fs::create_dir_all(&paths.dir)
            .map_err(DriverError::io("creating the container dir"))?;
        if let Some(seed) = seed {
            if let Err(e) = super::snapshot::unpack(&paths, &seed).await {
                let _ = std::fs::remove_dir_all(&paths.dir);
                return Err(e);
            }
        }
        crate::drivers::save_spec(&paths.spec(), &spec)?;
        let c = Container::fresh(
            id,
            paths,
            spec,
            Phase::Launched,
            Some(herd_proto::clock::unix_ms()),
            VmState::Booting,
        );
        c.save()?;
        self.containers.lock().insert(id, c);
        self.launch_or_fail(id).await
    }

    pub(super) async fn do_start(self: Arc<Self>, id: VmId) -> Result<(), DriverError> {
        let state = self.with(id, |c| Ok(c.observe()))?;
        match state {
            VmState::Running | VmState::Booting => return Ok(()),
            VmState::Stopped | VmState::Error => {}
            state => return Err(DriverError::WrongState { op: "start", state }),
        }
        self.with(id, |c| {
            c.record.phase = Phase::Launched;
            c.record.paused = false;
            c.record.hello_seen = false;
            c.record.exit_code = None;
            c.record.policy_reported = false;
            c.busy = Some(VmState::Booting);
            c.save()
        })?;
        self.launch_or_fail(id).await
    }

    /// Launches, and records a failure as the container's error.
    async fn launch_or_fail(self: &Arc<Self>, id: VmId) -> Result<(), DriverError> {
        let result = self.launch(id).await;
        if result.is_err() {
            // Nothing of a failed launch stays mounted or known to runc.
            let _ = self.runc.delete(&container::runc_name(id)).await;
            if let Ok(paths) = self.with(id, |c| Ok(c.paths.clone())) {
                let _ = container::unmount_root(&paths);
            }
        }
        self.with(id, |c| {
            c.busy = None;
            if let Err(e) = &result {
                c.record.phase = Phase::Failed {
                    reason: crate::agent::error_chain(e),
                };
                c.save()?;
            }
            Ok(())
        })?;
        result
    }

    /// Mounts the root, writes the bundle and the guest's configuration, listens on the
    /// channel and starts the init.
    async fn launch(self: &Arc<Self>, id: VmId) -> Result<(), DriverError> {
        let (paths, spec, token, born) = self.with(id, |c| {
            Ok((
                c.paths.clone(),
                c.spec.clone(),
                c.record.token.clone(),
                c.record.born_unix_ms,
            ))
        })?;
        let image_root = self.image_root(&spec.image).await?;
        let name = container::runc_name(id);
        // A stale runc record of an earlier run would refuse the name.
        self.runc
            .delete(&name)
            .await
            .map_err(Self::hypervisor(id))?;
        container::mount_root(&paths, &image_root)?;
        let channel_dir = paths.channel_dir();
        std::fs::create_dir_all(&channel_dir)
            .map_err(DriverError::io("creating the channel dir"))?;
        let identity = guest_config::GuestIdentity {
            id,
            spec: &spec,
            token: &token,
            born_unix_ms: born,
            now_unix_ms: herd_proto::clock::unix_ms(),
        };
        let line = format!(
            "{}{} herd.cpus={}\n",
            guest_config::identity(&identity),
            guest_config::clock_and_policy(&identity).map_err(DriverError::Invalid)?,
            spec.vcpus.max(1)
        );
        persist::write_private(&paths.guest_config(), line.as_bytes())
            .map_err(DriverError::io("writing the guest's configuration"))?;
        let cgroup = container::cgroup_path(id);
        let channel_text = channel_dir.display().to_string();
        let config = bundle::config(&BundleSpec {
            name: &spec.name,
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            cgroup: &cgroup,
            channel_dir: &channel_text,
        });
        let config_json =
            serde_json::to_vec_pretty(&config).map_err(DriverError::encode("config.json"))?;
        persist::write_atomic(&paths.bundle().join("config.json"), &config_json)
            .map_err(DriverError::io("writing config.json"))?;
        let generation = self.with(id, |c| {
            c.generation += 1;
            c.burst = (0, 0);
            Ok(c.generation)
        })?;
        let _ = std::fs::remove_file(paths.pid_file());
        let listener = self.bind(&paths)?;
        let started = Instant::now();
        self.runc
            .run(
                &name,
                &paths.bundle(),
                &paths.pid_file(),
                &paths.console(),
                &paths.runc_log(),
            )
            .await
            .map_err(Self::hypervisor(id))?;
        let pid = crate::drivers::procfs::read_pid_file(&paths.pid_file()).ok_or_else(|| {
            DriverError::Hypervisor {
                vm: id,
                reason: format!("runc wrote no pid to {}", paths.pid_file().display()),
            }
        })?;
        info!(%id, pid, ms = started.elapsed().as_millis() as u64, "container started");
        self.with(id, |c| {
            c.pid = Some(pid);
            Ok(())
        })?;
        self.spawn_channel(id, generation, listener);
        Ok(())
    }

    /// A fresh listening socket at the container's channel path.
    fn bind(&self, paths: &Paths) -> Result<tokio::net::UnixListener, DriverError> {
        let socket = paths.guest_socket();
        let _ = std::fs::remove_file(&socket);
        let listener = std::os::unix::net::UnixListener::bind(&socket).map_err(DriverError::io(
            format!("listening on {}", socket.display()),
        ))?;
        listener
            .set_nonblocking(true)
            .map_err(DriverError::io("setting the guest socket non-blocking"))?;
        tokio::net::UnixListener::from_std(listener)
            .map_err(DriverError::io("registering the guest socket"))
    }

    /// Listens for an adopted container's guest again.
    pub(super) fn listen(self: &Arc<Self>, id: VmId, generation: u64) -> Result<(), DriverError> {
        let paths = self.with(id, |c| Ok(c.paths.clone()))?;
        let listener = self.bind(&paths)?;
        self.spawn_channel(id, generation, listener);
        Ok(())
    }

    fn spawn_channel(
        self: &Arc<Self>,
        id: VmId,
        generation: u64,
        listener: tokio::net::UnixListener,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let guest = channel::Guest {
            guests: self.clone(),
            id,
            generation,
        };
        let task = tokio::spawn(channel::run(guest, channel::Listen(listener), id, rx));
        if let Some(c) = self.containers.lock().get_mut(&id) {
            if let Some((old, _)) = c.channel.replace((task.abort_handle(), tx)) {
                old.abort();
            }
            return;
        }
        task.abort();
    }

    /// A new shape: a live container's cgroup limits change at once; a stopped one
    /// gets them at its next start (its `config.json` is made from the spec then).
    pub(super) async fn do_reshape(
        self: Arc<Self>,
        id: VmId,
        vcpus: u32,
        memory_mib: u64,
    ) -> Result<(), DriverError> {
        let (state, burst) = self.with(id, |c| Ok((c.observe(), c.burst)))?;
        if matches!(state, VmState::Running | VmState::Paused | VmState::Booting) {
            // A burst in force stays on top of the new shape.
            let (quota, period, memory) = bundle::limits(
                vcpus.saturating_add(burst.0),
                memory_mib.saturating_add(burst.1),
            );
            self.runc
                .update(&container::runc_name(id), quota, period, memory)
                .await
                .map_err(Self::hypervisor(id))?;
        }
        self.with(id, |c| {
            crate::drivers::reshape_spec(&mut c.spec, &c.paths.spec(), vcpus, memory_mib)
        })?;
        info!(%id, vcpus, memory_mib, "container resized");
        Ok(())
    }

    /// Gives a live container a burst above its shape, or (0, 0) its shape alone.
    pub(super) async fn do_burst(
        self: Arc<Self>,
        id: VmId,
        cpus: u32,
        memory_mib: u64,
    ) -> Result<(), DriverError> {
        let (state, vcpus, shape_mib) =
            self.with(id, |c| Ok((c.observe(), c.spec.vcpus, c.spec.memory_mib)))?;
        if !matches!(state, VmState::Running | VmState::Paused | VmState::Booting) {
            return Err(DriverError::WrongState { op: "burst", state });
        }
        let (quota, period, memory) = bundle::limits(
            vcpus.saturating_add(cpus),
            shape_mib.saturating_add(memory_mib),
        );
        self.runc
            .update(&container::runc_name(id), quota, period, memory)
            .await
            .map_err(Self::hypervisor(id))?;
        self.with(id, |c| {
            c.burst = (cpus, memory_mib);
            Ok(())
        })?;
        info!(%id, cpus, memory_mib, "container burst set");
        Ok(())
    }

    /// Pauses (freezes the cgroup) or resumes (thaws it).
    pub(super) async fn do_pause(
        self: Arc<Self>,
        id: VmId,
        pause: bool,
    ) -> Result<(), DriverError> {
        let state = self.with(id, |c| Ok(c.observe()))?;
        let name = container::runc_name(id);
        match (pause, state) {
            (true, VmState::Paused) | (false, VmState::Running | VmState::Booting) => Ok(()),
            (true, VmState::Running | VmState::Booting) => {
                self.runc.pause(&name).await.map_err(Self::hypervisor(id))?;
                self.with(id, |c| {
                    c.record.paused = true;
                    c.save()
                })
            }
            (false, VmState::Paused) => {
                self.runc
                    .resume(&name)
                    .await
                    .map_err(Self::hypervisor(id))?;
                self.with(id, |c| {
                    c.record.paused = false;
                    c.save()
                })
            }
            (pause, state) => Err(DriverError::WrongState {
                op: if pause { "pause" } else { "resume" },
                state,
            }),
        }
    }

    /// Asks the guest to power off and the init to end (SIGTERM), kills it after the
    /// grace, and removes its runc state and mount.
    pub(super) async fn do_stop(self: Arc<Self>, id: VmId) -> Result<(), DriverError> {
        self.stop_showing(id, VmState::Stopping).await
    }

    /// Stops the container, showing `shown` meanwhile; a migration keeps showing
    /// `Migrating` after it (its caller decides what the container is then).
    pub(super) async fn stop_showing(
        self: Arc<Self>,
        id: VmId,
        shown: VmState,
    ) -> Result<(), DriverError> {
        let (paused, sender) = self
            .with(id, |c| {
                let state = c.observe();
                match state {
                    VmState::Stopped => return Ok(None),
                    VmState::Running | VmState::Paused | VmState::Booting => {}
                    state => return Err(DriverError::WrongState { op: "stop", state }),
                }
                c.busy = Some(shown);
                Ok(Some((
                    c.record.paused,
                    c.channel.as_ref().map(|(_, tx)| tx.clone()),
                )))
            })?
            .unzip();
        let Some(paused) = paused else {
            // Already stopped (by its workload, say): only the cleanup is left.
            return self.release(id).await;
        };
        let name = container::runc_name(id);
        if paused {
            let _ = self.runc.resume(&name).await;
        }
        if let Some(tx) = sender.flatten() {
            let _ = tx.send(HostMsg::PowerOff);
        }
        let _ = self.runc.kill(&name, "TERM").await;
        let result = self.wait_gone(id, self.config.stop_timeout).await;
        let released = self.release(id).await;
        self.with(id, |c| {
            c.busy = (shown == VmState::Migrating).then_some(shown);
            c.record.phase = Phase::Stopped;
            c.record.paused = false;
            c.record.hello_seen = false;
            c.save()
        })?;
        result.and(released)
    }

    /// Waits for the init to end, killing it once `grace` is spent.
    async fn wait_gone(&self, id: VmId, grace: Duration) -> Result<(), DriverError> {
        let (pid, name) = self.with(id, |c| Ok((c.pid, container::runc_name(id))))?;
        let Some(pid) = pid else { return Ok(()) };
        let started = Instant::now();
        let mut killed = false;
        while container::is_our_init(pid, id) {
            if !killed && started.elapsed() >= grace {
                if !grace.is_zero() {
                    warn!(%id, "container did not end in {grace:?}; killing it");
                }
                let _ = self.runc.kill(&name, "KILL").await;
                killed = true;
            }
            if started.elapsed() >= grace + KILL_WAIT {
                return Err(DriverError::Hypervisor {
                    vm: id,
                    reason: format!("the container's init {pid} does not die"),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.with(id, |c| {
            c.pid = None;
            if let Some((handle, _)) = c.channel.take() {
                handle.abort();
            }
            Ok(())
        })
    }

    /// Releases a container whose init ended on its own, unless it was launched again
    /// meanwhile.
    pub(super) async fn release_ended(self: Arc<Self>, id: VmId) -> Result<(), DriverError> {
        let ended = self.with(id, |c| {
            Ok(c.busy.is_none() && c.record.phase != Phase::Launched)
        })?;
        if ended {
            self.release(id).await?;
        }
        Ok(())
    }

    /// Removes what a stopped container holds on the host: runc's state, its cgroups,
    /// its root mount. Its files (the writable layer) stay for the next start.
    async fn release(&self, id: VmId) -> Result<(), DriverError> {
        self.runc
            .delete(&container::runc_name(id))
            .await
            .map_err(Self::hypervisor(id))?;
        let paths = Paths::new(&self.state_dir, id);
        container::unmount_root(&paths)
    }

    pub(super) async fn do_terminate(self: Arc<Self>, id: VmId) -> Result<(), DriverError> {
        let paths = Paths::new(&self.state_dir, id);
        if self.containers.lock().contains_key(&id) {
            self.wait_gone(id, Duration::ZERO).await?;
        }
        // Also for one the driver does not know: files may be left by a crash mid-create.
        self.release(id).await?;
        if let Some(c) = self.containers.lock().remove(&id) {
            if let Some((handle, _)) = c.channel {
                handle.abort();
            }
            if let Some(receiving) = c.receiving {
                receiving.abort();
            }
        }
        if paths.dir.exists() {
            std::fs::remove_dir_all(&paths.dir)
                .map_err(DriverError::io("removing the container dir"))?;
        }
        Ok(())
    }

    /// Runs an operation under the VM's operation lock (see `drivers::op_locks`).
    pub(super) async fn run_op<T, F, Fut>(
        self: &Arc<Self>,
        id: VmId,
        op: F,
    ) -> Result<T, DriverError>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Inner>) -> Fut,
        Fut: std::future::Future<Output = Result<T, DriverError>> + Send + 'static,
    {
        self.op_locks.run(id, op(self.clone())).await
    }
}
