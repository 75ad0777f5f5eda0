//! The I/O side of the agent's decisions: it asks the drivers what the [`Core`] needs
//! to know and carries out what it decides (saving, sending, converging, enforcing),
//! for as long as the process lives, across reconnections.

use super::core::{Action, Core, Input};
use super::drivers_view::{DriverWatch, LIST_DEADLINE};
use super::state::{self, SavedState};
use super::transport::error_chain;
use super::GuestEvents;
use crate::backstop::Enforce;
use crate::bursts::book::{room, Shape};
use crate::converge::{next_step, Plan};
use crate::driver::{Driver, DriverError};
use crate::health::HealthBook;
use crate::hostinfo::{self, CpuMeter};
use crate::probe::SyncProbe;
use crate::utility::UtilityState;
use futures_util::{Sink, SinkExt};
use herd_proto::burst::BurstAnswer;
use herd_proto::clock::unix_ms;
use herd_proto::node::NodeReport;
use herd_proto::policy::PolicyAction;
use herd_proto::status::{HostStatus, StatusUpdate};
use herd_proto::wire::{self, AgentMsg, Command, CommandId, HostUtil, VmId, VmUsage};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::{self, Message};
use tracing::warn;

/// A converge task's end: the command, and why it failed if it did.
pub(super) type Converged = (CommandId, Option<String>);

pub(super) struct Session {
    pub(super) core: Core,
    drivers: Vec<Arc<dyn Driver>>,
    /// Each driver as listed and checked, so that a hung one holds nothing up.
    watches: Vec<DriverWatch>,
    pub(super) health: HealthBook,
    /// The utility module's samples, when it runs.
    pub(super) utility: Option<watch::Receiver<UtilityState>>,
    state_path: PathBuf,
    /// See [`super::Agent::with_ephemeral_state`].
    ephemeral_state: bool,
    cpu: CpuMeter,
    /// The converge task in progress per VM, with its generation.
    running: HashMap<VmId, (u64, JoinHandle<()>)>,
    /// Converge tasks report here. It outlives connections, so a command that finishes
    /// while the server is away is acknowledged on the next connection.
    done_tx: mpsc::UnboundedSender<Converged>,
    pub(super) done_rx: mpsc::UnboundedReceiver<Converged>,
    pub(super) guest_events: Option<GuestEvents>,
    pub(super) probe: Option<Arc<dyn SyncProbe>>,
    /// The last connection got as far as hello.
    pub(super) was_connected: bool,
    /// This host's part in live migrations.
    pub(super) migrations: crate::migration::Migrations,
    /// What the agent's side tasks (migrations, round trips) say, sent up as it comes.
    pub(super) outbox: mpsc::UnboundedSender<AgentMsg>,
    pub(super) outbox_rx: mpsc::UnboundedReceiver<AgentMsg>,
    /// This host's part in broadcasts, when it takes transfers.
    pub(super) broadcasts: Option<crate::broadcast::Broadcasts>,
    /// Measures round trips to the neighbours the server names, when it is asked to.
    pub(super) proximity: Option<crate::proximity::Proximity>,
    /// Where a user's asks for bursts go, when a driver here can burst.
    pub(super) bursts: Option<crate::bursts::Bursts>,
    /// The host's bursts, sent whole when they change.
    pub(super) burst_leases: Option<watch::Receiver<herd_proto::burst::BurstReport>>,
    /// Answers to the server's asks.
    pub(super) burst_answers: Option<crate::bursts::Answers>,
    /// What this host knows of the others.
    peers: crate::peers::Peers,
    /// This host's capacity, for the room its status tells the others of.
    pub(super) capacity: herd_proto::wire::Capacity,
    /// The last status sent whole, and the number of the next.
    status_sent: Option<HostStatus>,
    status_seq: u64,
    /// When the last observation was made.
    last_tick: tokio::time::Instant,
    /// An observation asked for out of the interval, held back to keep reports at
    /// least [`MIN_REPORT_GAP`] apart.
    pub(super) report_due: Option<tokio::time::Instant>,
}

/// The least time between two observations asked for out of the interval (a command
/// done, a guest's hello): bursts of them make one report, not one each.
const MIN_REPORT_GAP: Duration = Duration::from_millis(50);

impl Session {
    pub(super) fn new(
        saved: SavedState,
        drivers: Vec<Arc<dyn Driver>>,
        state_path: PathBuf,
        ephemeral_state: bool,
    ) -> Session {
        let kinds = drivers.iter().map(|d| d.kind().to_owned()).collect();
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let health = HealthBook::new(drivers.iter().map(|d| d.kind()));
        let (outbox, outbox_rx) = mpsc::unbounded_channel();
        let sockets = state_path
            .parent()
            .map_or_else(|| PathBuf::from("."), |dir| dir.join("migrations"));
        let migrations =
            crate::migration::Migrations::new(drivers.clone(), outbox.clone(), sockets);
        Session {
            migrations,
            outbox,
            outbox_rx,
            proximity: None,
            broadcasts: None,
            core: Core::new(saved, kinds, !ephemeral_state),
            watches: drivers.iter().cloned().map(DriverWatch::new).collect(),
            health,
            utility: None,
            drivers,
            state_path,
            ephemeral_state,
            cpu: CpuMeter::default(),
            running: HashMap::new(),
            done_tx,
            done_rx,
            guest_events: None,
            probe: None,
            was_connected: false,
            bursts: None,
            burst_leases: None,
            burst_answers: None,
            peers: Default::default(),
            capacity: Default::default(),
            status_sent: None,
            status_seq: 1,
            last_tick: tokio::time::Instant::now(),
            report_due: None,
        }
    }

    /// Writes the whole state now (an ephemeral agent's start and clean stop).
    pub(super) fn write_state(&mut self) -> Result<(), String> {
        let saved = self.core.snapshot();
        state::write(&self.state_path, &saved, !self.ephemeral_state).inspect_err(|_| {
            self.core.save_failed();
        })
    }

    /// Ends the session for a clean stop: converging stops, and ephemeral state is
    /// written once.
    pub(super) fn stop(&mut self) -> Result<(), String> {
        for (_, (_, handle)) in self.running.drain() {
            handle.abort();
        }
        for watch in &mut self.watches {
            watch.abort();
        }
        if self.ephemeral_state {
            self.write_state()?;
        }
        Ok(())
    }

    /// The interval's observation, as the core's input.
    pub(super) async fn tick(&mut self) -> Result<Input, String> {
        self.last_tick = tokio::time::Instant::now();
        self.report_due = None;
        let mut observed = BTreeMap::new();
        for watch in &mut self.watches {
            for vm in watch.list(&mut self.health).await {
                observed.insert(vm.id, vm.state);
            }
            watch.check(&mut self.health);
        }
        let usage = if self.core.watches_policies() {
            self.usage().await.into_iter().map(|u| (u.vm, u)).collect()
        } else {
            BTreeMap::new()
        };
        let util = HostUtil {
            cpu_permille: self.cpu.sample(),
            mem_used_mib: hostinfo::mem_used_mib(),
            n_vms: observed.len() as u32,
        };
        Ok(Input::Tick {
            observed,
            usage,
            util,
            now_ms: unix_ms(),
        })
    }

    /// Every VM's counters, from the drivers that can tell in time (a hung driver's
    /// VMs miss a sample; their counters are cumulative, so nothing is lost).
    pub(super) async fn usage(&self) -> Vec<VmUsage> {
        let mut all = Vec::new();
        for watch in self.watches.iter().filter(|w| !w.stuck()) {
            if let Ok(Ok(usage)) = tokio::time::timeout(LIST_DEADLINE, watch.driver.usage()).await {
                all.extend(usage);
            }
        }
        all
    }

    /// What the node says about itself now: the utility module's latest sample and the
    /// drivers' health.
    /// How often this host and, it assumes, its peers send a status: the utility
    /// module's interval.
    fn status_interval_ms(&self) -> u64 {
        self.utility
            .as_ref()
            .and_then(|u| u.borrow().stats.as_ref().map(|s| u64::from(s.interval_ms)))
            .filter(|ms| *ms > 0)
            .unwrap_or(1_000)
    }

    /// This host's next status for the others (its figures when they moved, else a
    /// heartbeat), or `None` without a utility sample to take them from.
    pub(super) async fn next_status(&mut self) -> Option<StatusUpdate> {
        let stats = self.utility.as_ref()?.borrow().stats.clone()?;
        let mut shapes = BTreeMap::new();
        for driver in &self.drivers {
            for (vm, spec) in driver.running_specs().await {
                shapes.insert(vm, Shape::of(&spec));
            }
        }
        let leases = self
            .burst_leases
            .as_ref()
            .map(|l| l.borrow().in_force.clone())
            .unwrap_or_default();
        let room = room(self.capacity, &shapes, leases.iter().map(|(vm, l)| (vm, l)));
        let status = HostStatus {
            cpu_permille: stats.cpu_permille,
            mem_free_mib: stats.mem_total_mib.saturating_sub(stats.mem_used_mib),
            disk_free_mib: stats.disk.free_mib,
            net_bytes_per_s: stats
                .net
                .iter()
                .map(|n| n.rx_bytes_per_s.saturating_add(n.tx_bytes_per_s))
                .sum(),
            room_cpus: room.cpus,
            room_mib: room.memory_mib,
            bursts: u32::try_from(leases.len()).unwrap_or(u32::MAX),
        };
        let update =
            herd_proto::status::next_update(&status, self.status_sent.as_ref(), self.status_seq);
        self.status_seq += 1;
        if update.status.is_some() {
            self.status_sent = Some(status);
        }
        Some(update)
    }

    /// A new connection: the next status goes whole (the others may have forgotten).
    pub(super) fn status_resend(&mut self) {
        self.status_sent = None;
    }

    pub(super) fn node_report(&self) -> NodeReport {
        let (stats, util_error) = match &self.utility {
            Some(utility) => {
                let state = utility.borrow();
                (state.stats.clone(), state.error.clone())
            }
            None => (
                None,
                Some("the utility module is not run by this agent".into()),
            ),
        };
        NodeReport {
            stats,
            util_error,
            drivers: self.health.statuses(),
        }
    }

    /// Feeds `input` to the core and carries out what it decides; an error ends the
    /// connection.
    pub(super) async fn step(
        &mut self,
        input: Input,
        tx: &mut (impl Sink<Message, Error = tungstenite::Error> + Unpin),
    ) -> Result<(), String> {
        self.step_all(vec![input], tx).await
    }

    /// Feeds the inputs in order; an observation any of them asks for is made once,
    /// after them all, at once or [`MIN_REPORT_GAP`] after the last one.
    pub(super) async fn step_all(
        &mut self,
        inputs: Vec<Input>,
        tx: &mut (impl Sink<Message, Error = tungstenite::Error> + Unpin),
    ) -> Result<(), String> {
        let mut report_now = false;
        for input in inputs {
            for action in self.core.step(input) {
                report_now |= self.carry_out(action, tx).await?;
            }
        }
        while report_now {
            let due = self.last_tick + MIN_REPORT_GAP;
            if tokio::time::Instant::now() < due {
                self.report_due = Some(due);
                return Ok(());
            }
            let input = self.tick().await?;
            report_now = false;
            for action in self.core.step(input) {
                report_now |= self.carry_out(action, tx).await?;
            }
        }
        Ok(())
    }

    /// Carries out one action; `true` if the core asked to report now.
    async fn carry_out(
        &mut self,
        action: Action,
        tx: &mut (impl Sink<Message, Error = tungstenite::Error> + Unpin),
    ) -> Result<bool, String> {
        match action {
            Action::Save(saved) => {
                state::write(&self.state_path, &saved, true).inspect_err(|_| {
                    self.core.save_failed();
                })?;
            }
            Action::Enforce(e) => self.enforce(&e).await,
            Action::Report { report, changed } => {
                let (epoch, seq, full) = (report.epoch, report.seq, report.is_full());
                let frame = wire::encode(&AgentMsg::Report(report));
                if let Some(probe) = &self.probe {
                    probe.reported(epoch, seq, full, &changed, frame.len());
                }
                send_frame(tx, frame).await?;
            }
            Action::Send(msg) => send_frame(tx, wire::encode(&msg)).await?,
            Action::Converge(command) => self.converge(*command),
            Action::ReportNow => return Ok(true),
            Action::Console {
                request,
                vm,
                max_bytes,
            } => {
                let result = self.console(vm, max_bytes).await;
                send_frame(tx, wire::encode(&AgentMsg::Console { request, result })).await?;
            }
            Action::Acked { epoch, seq } => {
                if let Some(probe) = &self.probe {
                    probe.acked(epoch, seq);
                }
            }
            Action::Migration(order) => self.migrations.order(*order),
            Action::Peers(updates) => self.peers.heard(updates, unix_ms()),
            Action::PeersRequest { request } => {
                let peers = self.peers.view(unix_ms(), self.status_interval_ms());
                send_frame(tx, wire::encode(&AgentMsg::Peers { request, peers })).await?;
            }
            Action::Broadcast(order) => match &self.broadcasts {
                Some(broadcasts) => broadcasts.order(*order),
                None => {
                    let msg = AgentMsg::Broadcast {
                        broadcast: order.broadcast(),
                        update: herd_proto::broadcast::BroadcastUpdate::Failed {
                            reason: "this host joined over plain HTTP and takes no transfers"
                                .into(),
                        },
                    };
                    send_frame(tx, wire::encode(&msg)).await?;
                }
            },
            Action::Neighbours(list) => {
                if let Some(proximity) = &self.proximity {
                    proximity.neighbours(list);
                }
            }
            Action::Burst { request, vm, ask } => {
                let asked = self.bursts.as_ref().is_some_and(|bursts| {
                    bursts.ask(vm, ask, crate::bursts::Asker::Server { request })
                });
                if !asked {
                    let reason = match self.bursts {
                        Some(_) => "the host is busy with other asks; try again",
                        None => "no driver on this host can burst",
                    };
                    let answer = BurstAnswer::Denied {
                        reason: reason.into(),
                    };
                    let msg = AgentMsg::BurstAnswer {
                        request,
                        vm,
                        answer,
                    };
                    send_frame(tx, wire::encode(&msg)).await?;
                }
            }
            Action::Disconnect(reason) => return Err(reason),
        }
        Ok(false)
    }

    /// A converge task ended: forget its handle, unless a newer one replaced it.
    pub(super) fn converged(&mut self, id: CommandId) {
        if self
            .running
            .get(&id.vm)
            .is_some_and(|(generation, _)| *generation == id.generation)
        {
            self.running.remove(&id.vm);
        }
    }

    fn converge(&mut self, command: Command) {
        let Some(driver) = self
            .drivers
            .iter()
            .find(|d| d.kind() == command.spec.hypervisor)
            .cloned()
        else {
            // The core checked the kind; a driver cannot vanish.
            return;
        };
        let id = command.id;
        let done = self.done_tx.clone();
        let broadcasts = self.broadcasts.clone();
        let handle = tokio::spawn(async move {
            let result = converge(driver.as_ref(), &command, broadcasts.as_ref()).await;
            if let Err(e) = &result {
                warn!(command = %command.id, "command failed: {e}");
            }
            let _ = done.send((command.id, result.err()));
        });
        if let Some((_, old)) = self.running.insert(id.vm, (id.generation, handle)) {
            old.abort();
        }
    }

    /// Carries out what the backstop decided, with or without a server.
    async fn enforce(&self, e: &Enforce) {
        for driver in &self.drivers {
            let result = match e.action {
                PolicyAction::Notify => Ok(()),
                PolicyAction::Suspend => driver.suspend(e.vm).await,
                PolicyAction::Stop => driver.stop(e.vm).await,
                PolicyAction::Terminate => driver.terminate(e.vm).await,
            };
            match result {
                Err(DriverError::NoSuchVm(_)) => continue,
                Err(err) => warn!(vm = %e.vm, "backstop could not act: {}", error_chain(&err)),
                Ok(()) => {}
            }
            break;
        }
    }

    /// The tail of a VM's serial console, from whichever driver holds it.
    async fn console(&self, vm: VmId, max_bytes: usize) -> Result<Vec<u8>, String> {
        for driver in &self.drivers {
            match driver.console(vm, max_bytes.min(1 << 20)).await {
                Err(DriverError::NoSuchVm(_)) => continue,
                other => return other.map_err(|e| error_chain(&e)),
            }
        }
        Err(format!("VM {vm} is not on this host"))
    }
}

pub(super) async fn send_frame(
    tx: &mut (impl Sink<Message, Error = tungstenite::Error> + Unpin),
    frame: Vec<u8>,
) -> Result<(), String> {
    tx.send(Message::Binary(frame.into()))
        .await
        .map_err(|e| e.to_string())
}

/// Drives one VM to the command's target, one driver operation at a time.
async fn converge(
    driver: &dyn Driver,
    command: &Command,
    broadcasts: Option<&crate::broadcast::Broadcasts>,
) -> Result<(), String> {
    let vm = command.id.vm;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    let mut n_conflicts = 0;
    // A new shape first (a resize): the VM goes on toward its target in it.
    let held = driver.state_of(vm).await.map_err(|e| error_chain(&e))?;
    if held.is_some()
        && !matches!(
            command.target,
            herd_proto::VmState::Terminated | herd_proto::VmState::Purged
        )
    {
        driver
            .reshape(vm, &command.spec)
            .await
            .map_err(|e| error_chain(&e))?;
    }
    loop {
        if tokio::time::Instant::now() > deadline {
            return Err(format!("VM did not reach {} in time", command.target));
        }
        let current = driver.state_of(vm).await.map_err(|e| error_chain(&e))?;
        let plan = next_step(current, command.target);
        let result = match plan {
            Plan::Done => return Ok(()),
            Plan::Impossible => {
                return Err(format!(
                    "no way from {} to {}",
                    current.map(|s| s.as_str()).unwrap_or("absent"),
                    command.target
                ))
            }
            Plan::Wait => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Plan::Create => match (command.spec.seed, broadcasts) {
                (Some(seed), Some(broadcasts)) => {
                    let dir = broadcasts.dir_of(seed);
                    match crate::broadcast::held::Held::manifest_in(&dir) {
                        Some(manifest) => {
                            driver
                                .create_from(vm, &command.spec, &dir, &manifest.handoff)
                                .await
                        }
                        None => Err(DriverError::Invalid(format!(
                            "the snapshot of broadcast {seed} is not on this host"
                        ))),
                    }
                }
                (Some(seed), None) => Err(DriverError::Invalid(format!(
                    "a copy of broadcast {seed} needs a host that takes transfers"
                ))),
                (None, _) => driver.create(vm, &command.spec).await,
            },
            Plan::Start => driver.start(vm).await,
            Plan::Pause => driver.pause(vm).await,
            Plan::Resume => driver.resume(vm).await,
            Plan::Suspend => driver.suspend(vm).await,
            Plan::Stop => driver.stop(vm).await,
            Plan::Terminate => driver.terminate(vm).await,
        };
        match result {
            Ok(()) => {}
            // The VM moved between our look and our action; look again.
            Err(DriverError::WrongState { .. }) if n_conflicts < 20 => {
                n_conflicts += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(error_chain(&e)),
        }
    }
}
