//! What the driver knows of one container: its files, its persisted record, and what
//! it reads from the host (the init's pid, its cgroup, its console). A container's state
//! is decided here, from an operation in flight, the record and the live init.

use crate::driver::DriverError;
use crate::drivers::channel;
use crate::drivers::console::{console_tail, policy_action_from_console, policy_powered_off};
use crate::drivers::procfs;
use crate::persist;
use herd_proto::guest::{GuestMsg, HostMsg};
use herd_proto::wire::{VmId, VmSpec};
use herd_proto::VmState;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tokio::sync::mpsc;
use tracing::warn;

/// The files of one container, all under `<state_dir>/<vm-id>/`.
#[derive(Debug, Clone)]
pub(super) struct Paths {
    pub(super) dir: PathBuf,
}

impl Paths {
    pub(super) fn new(state_dir: &Path, id: VmId) -> Paths {
        Paths {
            dir: state_dir.join(id.to_string()),
        }
    }
    pub(super) fn spec(&self) -> PathBuf {
        self.dir.join("spec.json")
    }
    pub(super) fn state(&self) -> PathBuf {
        self.dir.join("state.json")
    }
    /// The OCI bundle: `config.json` and `rootfs/`, the overlay's mount point.
    pub(super) fn bundle(&self) -> PathBuf {
        self.dir.join("bundle")
    }
    pub(super) fn rootfs(&self) -> PathBuf {
        self.bundle().join("rootfs")
    }
    /// The container's writable layer, and the overlay's work dir beside it.
    pub(super) fn upper(&self) -> PathBuf {
        self.dir.join("upper")
    }
    pub(super) fn work(&self) -> PathBuf {
        self.dir.join("work")
    }
    /// Mounted read-only at /run/herd inside: the guest socket and the config line.
    pub(super) fn channel_dir(&self) -> PathBuf {
        self.dir.join("chan")
    }
    pub(super) fn guest_socket(&self) -> PathBuf {
        self.channel_dir().join("guest.sock")
    }
    pub(super) fn guest_config(&self) -> PathBuf {
        self.channel_dir().join("config")
    }
    pub(super) fn console(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    pub(super) fn pid_file(&self) -> PathBuf {
        self.dir.join("init.pid")
    }
    pub(super) fn runc_log(&self) -> PathBuf {
        self.dir.join("runc.log")
    }
}

/// The name runc knows a container by, and its cgroup path.
pub(super) fn runc_name(id: VmId) -> String {
    format!("herd-{id}")
}

/// The cgroup every container's cgroup is made under.
pub(super) const CGROUP_PARENT: &str = "/herd";

pub(super) fn cgroup_path(id: VmId) -> String {
    format!("{CGROUP_PARENT}/{id}")
}

/// What the driver decided last; persisted in `state.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Phase {
    /// An init process should be alive.
    Launched,
    Stopped,
    Failed {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Record {
    pub(super) token: String,
    pub(super) phase: Phase,
    pub(super) paused: bool,
    /// The current init's herd-guest said hello with the right token.
    pub(super) hello_seen: bool,
    pub(super) exit_code: Option<i32>,
    /// When the container was created (unix ms); its lifespan counts from it.
    pub(super) born_unix_ms: Option<u64>,
    /// The guest's policy action of the current run reached the agent.
    pub(super) policy_reported: bool,
    /// Stopped and sent to another host; it stays until the migration is committed
    /// (then it goes) or rolled back (then it starts here again).
    #[serde(default)]
    pub(super) migrated_out: bool,
}

pub(super) struct Container {
    pub(super) id: VmId,
    pub(super) paths: Paths,
    pub(super) spec: VmSpec,
    pub(super) record: Record,
    pub(super) pid: Option<i32>,
    pub(super) busy: Option<VmState>,
    pub(super) guest_net: (u64, u64),
    /// Bumped on every launch, so a channel task of an old init knows it is obsolete.
    pub(super) generation: u64,
    pub(super) channel: Option<(tokio::task::AbortHandle, mpsc::UnboundedSender<HostMsg>)>,
    /// A policy action the guest took with nobody listening, read back from its console.
    pub(super) unreported: Option<GuestMsg>,
    /// The init ended on its own; what it held on the host (runc state, mount) is still
    /// to be released.
    pub(super) ended: bool,
    /// A migration's receiver writing the container's layer, until its stream ends.
    pub(super) receiving: Option<tokio::task::JoinHandle<Result<u64, String>>>,
    /// The burst in force (vCPUs, MiB above the spec's shape). Not saved: the agent's
    /// bursts task gives a restarted driver its leases again.
    pub(super) burst: (u32, u64),
}

impl Container {
    /// A container new to this host (made here, or arriving by a migration): a new
    /// guest credential, nothing running, `busy` shown until its first operation ends.
    pub(super) fn fresh(
        id: VmId,
        paths: Paths,
        spec: VmSpec,
        phase: Phase,
        born_unix_ms: Option<u64>,
        busy: VmState,
    ) -> Container {
        Container {
            id,
            paths,
            spec,
            record: Record {
                token: crate::drivers::guest_config::new_token(),
                phase,
                paused: false,
                hello_seen: false,
                exit_code: None,
                born_unix_ms,
                policy_reported: false,
                migrated_out: false,
            },
            pid: None,
            busy: Some(busy),
            guest_net: (0, 0),
            generation: 0,
            channel: None,
            unreported: None,
            ended: false,
            receiving: None,
            burst: (0, 0),
        }
    }

    pub(super) fn save(&self) -> Result<(), DriverError> {
        let bytes = serde_json::to_vec_pretty(&self.record)
            .map_err(DriverError::encode("the container's state"))?;
        persist::write_atomic(&self.paths.state(), &bytes).map_err(DriverError::io(format!(
            "saving {}",
            self.paths.state().display()
        )))
    }

    pub(super) fn alive(&self) -> bool {
        self.pid.is_some_and(|pid| is_our_init(pid, self.id))
    }

    /// Settles the persisted phase against the init and returns the state to show.
    pub(super) fn observe(&mut self) -> VmState {
        if let Some(busy) = self.busy {
            return busy;
        }
        match &self.record.phase {
            Phase::Stopped if self.record.migrated_out => VmState::Migrating,
            Phase::Stopped => VmState::Stopped,
            Phase::Failed { .. } => VmState::Error,
            Phase::Launched if self.alive() => {
                if self.record.paused {
                    VmState::Paused
                } else if self.record.hello_seen {
                    VmState::Running
                } else {
                    VmState::Booting
                }
            }
            Phase::Launched => {
                // The init is gone without us ending it: a workload that exited, or a
                // policy that stopped the container, is a stop; anything else a failure.
                let console = self.paths.console();
                self.record.phase = match self.record.exit_code {
                    Some(_) => Phase::Stopped,
                    None if policy_powered_off(&console) => {
                        if !self.record.policy_reported {
                            self.unreported = policy_action_from_console(&console)
                                .filter(|msg| channel::policy_allows(&self.spec.policy, msg))
                                .map(channel::clamp);
                            self.record.policy_reported = true;
                        }
                        Phase::Stopped
                    }
                    None => Phase::Failed {
                        reason: format!(
                            "the container's init exited unexpectedly; console ends with: {}",
                            console_tail(&console)
                        ),
                    },
                };
                self.record.paused = false;
                self.pid = None;
                self.ended = true;
                if let Some((handle, _)) = self.channel.take() {
                    handle.abort();
                }
                if let Err(e) = self.save() {
                    warn!("{e}");
                }
                self.observe()
            }
        }
    }
}

/// True if `pid` is a live (not zombie) process in the container's cgroup. A pid file
/// outlives its process and pids are reused; the cgroup names the container. The init
/// is not our child (runc leaves it to PID 1, which reaps slowly): a zombie is gone.
pub(super) fn is_our_init(pid: i32, id: VmId) -> bool {
    procfs::is_running(pid)
        && std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .is_ok_and(|cgroups| cgroups.contains(&cgroup_path(id)))
}

/// Mounts the container's root: the image's unpacked root, read-only, under its own
/// writable layer. A root left mounted by an earlier launch is mounted again.
pub(super) fn mount_root(paths: &Paths, image_root: &Path) -> Result<(), DriverError> {
    unmount_root(paths)?;
    for dir in [paths.upper(), paths.work(), paths.rootfs()] {
        std::fs::create_dir_all(&dir)
            .map_err(DriverError::io(format!("creating {}", dir.display())))?;
    }
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        image_root.display(),
        paths.upper().display(),
        paths.work().display()
    );
    nix::mount::mount(
        Some("overlay"),
        &paths.rootfs(),
        Some("overlay"),
        nix::mount::MsFlags::empty(),
        Some(options.as_str()),
    )
    .map_err(|e| DriverError::Io {
        context: format!(
            "mounting the container root at {}",
            paths.rootfs().display()
        ),
        source: e.into(),
    })
}

/// Unmounts the container's root if it is mounted.
pub(super) fn unmount_root(paths: &Paths) -> Result<(), DriverError> {
    let rootfs = paths.rootfs();
    loop {
        match nix::mount::umount2(&rootfs, nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) => continue,
            Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => return Ok(()),
            Err(e) => {
                return Err(DriverError::Io {
                    context: format!("unmounting {}", rootfs.display()),
                    source: e.into(),
                })
            }
        }
    }
}
