//! Bursts on this host: grants of CPU and memory above a VM's shape for a while, decided,
//! applied and taken back here.
//!
//! The host grants from its own room (what no VM's shape or lease holds, see
//! [`book`]), so a guest that asks gets its answer without a round trip to the server,
//! and a lease ends on time because this task ends it: the server may be down or
//! unreachable at the expiry, and the VM still returns to its shape. The leases in force
//! are in `bursts.json` in the agent's data dir, written before an answer goes out, so a
//! restarted agent still ends the leases its predecessor granted, at once if their time
//! passed while it was down.
//!
//! This task runs beside the connection to the server, not inside it: asks come from
//! guests (the agent routes them here before anything else sees them) and from the
//! server (a user's `herd vm burst`), answers go back the way they came, and the server
//! hears the leases in force whenever they change and on every new connection.

pub mod book;

use crate::driver::Driver;
use crate::persist;
use book::{Book, Shape};
use herd_proto::burst::{BurstAnswer, BurstAsk, BurstLease, BurstReport};
use herd_proto::clock::unix_ms;
use herd_proto::guest::HostMsg;
use herd_proto::wire::{AgentMsg, Capacity, VmId};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

/// How many asks wait for the task at most; a guest's ask past it is dropped (the guest
/// hears nothing and may ask again), a server's is answered as busy.
const ASK_BACKLOG: usize = 256;
/// While leases are in force, how often the task checks that their VMs still run.
const CHECK_EVERY: Duration = Duration::from_secs(5);
/// How soon an end that failed (the driver refused) is tried again.
const RETRY_END: Duration = Duration::from_secs(1);

/// Who asked, and so where the answer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asker {
    /// The VM's own guest module, over its channel.
    Guest,
    /// A user, through the server; `request` names the answer.
    Server { request: u64 },
}

struct Ask {
    vm: VmId,
    ask: BurstAsk,
    asker: Asker,
}

/// Where asks go; cheap to clone.
#[derive(Clone)]
pub struct Bursts {
    asks: mpsc::Sender<Ask>,
    leases: watch::Receiver<BurstReport>,
}

/// What the task tells the server's connection: answers to the server's asks.
pub type Answers = mpsc::UnboundedReceiver<AgentMsg>;

impl Bursts {
    /// Asks for a burst; false if too many asks wait already.
    pub fn ask(&self, vm: VmId, ask: BurstAsk, asker: Asker) -> bool {
        self.asks.try_send(Ask { vm, ask, asker }).is_ok()
    }

    /// The leases in force and lately ended, and a way to hear when they change.
    pub fn leases(&self) -> watch::Receiver<BurstReport> {
        self.leases.clone()
    }
}

/// Starts the task for `drivers` on a host of `capacity`, keeping its book in
/// `data_dir`. It ends when every [`Bursts`] handle is dropped.
pub fn start(
    drivers: Vec<Arc<dyn Driver>>,
    capacity: Capacity,
    data_dir: PathBuf,
) -> (Bursts, Answers) {
    let path = data_dir.join("bursts.json");
    let book = match persist::load_json::<Book>(&path) {
        Ok(book) => book.unwrap_or_default(),
        Err(e) => {
            // The VMs keep whatever they were given; the next asks start a new book.
            warn!("bursts: {e}; starting with no leases");
            Book::default()
        }
    };
    let (asks_tx, asks) = mpsc::channel(ASK_BACKLOG);
    let (leases_tx, leases) = watch::channel(report(&book));
    let (answers_tx, answers) = mpsc::unbounded_channel();
    let task = Task {
        drivers,
        capacity,
        path,
        book,
        leases: leases_tx,
        answers: answers_tx,
    };
    tokio::spawn(task.run(asks));
    (
        Bursts {
            asks: asks_tx,
            leases,
        },
        answers,
    )
}

fn in_force(book: &Book) -> Vec<(VmId, BurstLease)> {
    book.leases.iter().map(|(vm, l)| (*vm, *l)).collect()
}

fn report(book: &Book) -> BurstReport {
    BurstReport {
        in_force: in_force(book),
        ended: book.ended.clone(),
    }
}

/// The VMs running on this host, by driver.
#[derive(Default)]
struct Running {
    shapes: BTreeMap<VmId, Shape>,
    /// Index into `Task::drivers`.
    owners: BTreeMap<VmId, usize>,
}

struct Task {
    drivers: Vec<Arc<dyn Driver>>,
    capacity: Capacity,
    path: PathBuf,
    book: Book,
    leases: watch::Sender<BurstReport>,
    answers: mpsc::UnboundedSender<AgentMsg>,
}

impl Task {
    async fn run(mut self, mut asks: mpsc::Receiver<Ask>) {
        // What a predecessor granted: end what is due, give the rest again (a VM that
        // restarted meanwhile came back in its shape).
        let mut next_check = self.end_due().await;
        let running = self.running().await;
        for (vm, lease) in in_force(&self.book) {
            if let Err(e) = self.apply(&running, vm, Some(lease)).await {
                warn!(%vm, "bursts: giving back a lease after a restart: {e}");
            }
        }
        loop {
            tokio::select! {
                ask = asks.recv() => match ask {
                    Some(ask) => self.answer(ask).await,
                    None => return,
                },
                _ = tokio::time::sleep_until(next_check) => {}
            }
            next_check = self.end_due().await;
        }
    }

    /// Every running VM's shape and limits, and which driver runs it.
    async fn running(&self) -> Running {
        let mut running = Running::default();
        for (i, driver) in self.drivers.iter().enumerate() {
            for (vm, spec) in driver.running_specs().await {
                running.shapes.insert(vm, Shape::of(&spec));
                running.owners.insert(vm, i);
            }
        }
        running
    }

    /// The driver that runs `vm`, if it runs.
    fn owner(&self, running: &Running, vm: VmId) -> Option<&Arc<dyn Driver>> {
        running.owners.get(&vm).and_then(|i| self.drivers.get(*i))
    }

    /// Gives `vm` its lease on top of its shape, or (`None`) its shape alone.
    async fn apply(
        &self,
        running: &Running,
        vm: VmId,
        lease: Option<BurstLease>,
    ) -> Result<(), String> {
        let Some(driver) = self.owner(running, vm) else {
            // Not running: nothing holds the lease's CPU or memory.
            return Ok(());
        };
        let (cpus, memory_mib) = lease.map(|l| (l.cpus, l.memory_mib)).unwrap_or((0, 0));
        driver
            .burst(vm, cpus, memory_mib)
            .await
            .map_err(|e| e.to_string())
    }

    async fn answer(&mut self, Ask { vm, ask, asker }: Ask) {
        let running = self.running().await;
        self.book.forget_gone(&running.shapes);
        let before = self.book.leases.get(&vm).copied();
        let now = unix_ms();
        let decision = self
            .book
            .decide(vm, ask, self.capacity, &running.shapes, now);
        let mut answer = decision.answer;
        if let Some(lease) = decision.apply {
            // Saved before it is applied: an agent that dies in between still ends it.
            self.save().await;
            match self.apply(&running, vm, Some(lease)).await {
                Ok(()) => {
                    info!(
                        %vm, cpus = lease.cpus, memory_mib = lease.memory_mib,
                        seconds = lease.seconds_left(now), ?asker, "burst granted"
                    );
                    self.publish();
                }
                Err(e) => {
                    self.book.undo(vm, before);
                    // What the VM had before stands: give it back if the failure
                    // left it half-changed.
                    let _ = self.apply(&running, vm, before).await;
                    self.save().await;
                    answer = BurstAnswer::Denied {
                        reason: format!("the host could not apply it: {e}"),
                    };
                }
            }
        }
        match asker {
            Asker::Guest => {
                if let Some(driver) = self.owner(&running, vm) {
                    driver.tell_guest(vm, HostMsg::Burst { answer });
                }
            }
            Asker::Server { request } => {
                let _ = self.answers.send(AgentMsg::BurstAnswer {
                    request,
                    vm,
                    answer,
                });
            }
        }
    }

    /// Ends every lease that is due; returns when to look again.
    async fn end_due(&mut self) -> tokio::time::Instant {
        let far = tokio::time::Instant::now() + Duration::from_secs(3600);
        if self.book.leases.is_empty() {
            return far;
        }
        let running = self.running().await;
        let now = unix_ms();
        let mut failed = false;
        let mut ended = false;
        for vm in self.book.due(&running.shapes, now) {
            match self.apply(&running, vm, None).await {
                Ok(()) => {
                    let late_ms = self
                        .book
                        .leases
                        .get(&vm)
                        .map(|l| now.saturating_sub(l.expires_ms));
                    self.book.finish(vm, now);
                    info!(%vm, ?late_ms, "burst ended");
                    ended = true;
                }
                Err(e) => {
                    warn!(%vm, "bursts: ending a lease: {e}; trying again");
                    failed = true;
                }
            }
        }
        if ended {
            self.save().await;
            self.publish();
        }
        let Some(next) = self.book.next_expiry() else {
            return far;
        };
        let mut wait = CHECK_EVERY.min(Duration::from_millis(next.saturating_sub(unix_ms())));
        if failed {
            wait = wait.min(RETRY_END);
        }
        tokio::time::Instant::now() + wait
    }

    /// Tells the server's connection what is in force.
    fn publish(&self) {
        self.leases.send_replace(report(&self.book));
    }

    /// Writes the book to disk.
    async fn save(&self) {
        let path = self.path.clone();
        match serde_json::to_vec(&self.book) {
            Ok(bytes) => {
                let written =
                    tokio::task::spawn_blocking(move || persist::write_atomic(&path, &bytes)).await;
                if !matches!(written, Ok(Ok(()))) {
                    warn!("bursts: cannot save {}", self.path.display());
                }
            }
            Err(e) => warn!("bursts: encoding the book: {e}"),
        }
    }
}
