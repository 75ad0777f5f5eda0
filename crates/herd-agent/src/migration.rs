//! This host's part in live migrations: receiving a VM (target) or sending one
//! (source), on the server's orders.
//!
//! Orders are level-triggered (see `herd_proto::migration`): the server repeats the
//! order of a migration's phase until it hears the answer, so each order is answered
//! from what this agent did last for that migration, and the work is started only once.
//! After a restart the agent has no memory of a migration, and answers from what its
//! drivers hold: a target that runs the VM says it arrived; a source whose VM is stopped
//! after a completed send says it sent it; anything else failed.

use crate::driver::{Driver, DriverError};
use crate::transfer::{self, PeerTls, Stream};
use herd_proto::broadcast::TransferOpen;
use herd_proto::migration::{
    MigrationId, MigrationOrder, MigrationUpdate, TransferHello, TransferProgress, TransferReply,
};
use herd_proto::wire::{AgentMsg, HostId, VmId, VmSpec};
use herd_proto::VmState;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// How often a running transfer's progress goes to the server.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// One order's work: a migration's attempt (0 for cleaning and resuming, which are
/// about the migration as a whole).
type Job = (MigrationId, u32);

/// A VM this host was told to expect.
#[derive(Clone)]
struct Expected {
    attempt: u32,
    vm: VmId,
    spec: VmSpec,
    source: HostId,
}

#[derive(Default)]
struct Book {
    expected: HashMap<MigrationId, Expected>,
    /// The last answer per migration and attempt, repeated when its order is.
    last: HashMap<Job, MigrationUpdate>,
    tasks: HashMap<Job, JoinHandle<()>>,
}

/// The agent's migrations, shared by the connection loop (orders in, answers out) and
/// the transfer listener (streams in).
#[derive(Clone)]
pub struct Migrations {
    drivers: Vec<Arc<dyn Driver>>,
    answers: mpsc::UnboundedSender<AgentMsg>,
    tls: Option<PeerTls>,
    port: Option<u16>,
    sockets: PathBuf,
    book: Arc<Mutex<Book>>,
}

fn error_text(e: &dyn std::error::Error) -> String {
    crate::agent::error_chain(e)
}

impl Migrations {
    /// Migrations without a transfer listener (an agent joined over plain HTTP): every
    /// order is answered with why not.
    pub fn new(
        drivers: Vec<Arc<dyn Driver>>,
        answers: mpsc::UnboundedSender<AgentMsg>,
        sockets: PathBuf,
    ) -> Migrations {
        Migrations {
            drivers,
            answers,
            tls: None,
            port: None,
            sockets,
            book: Default::default(),
        }
    }

    /// Transfers come in on `port` (the agent's listener routes them here), and go out
    /// with `tls`.
    pub fn listening(&mut self, port: u16, tls: PeerTls) {
        self.port = Some(port);
        self.tls = Some(tls);
    }

    /// The port transfers come in on, when this agent takes any.
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    fn answer(&self, job: Job, vm: VmId, update: MigrationUpdate) {
        if !matches!(update, MigrationUpdate::Progress(_)) {
            self.book.lock().last.insert(job, update.clone());
        }
        let _ = self.answers.send(AgentMsg::Migration {
            migration: job.0,
            attempt: job.1,
            vm,
            update,
        });
    }

    fn failed(&self, job: Job, vm: VmId, reason: String) {
        warn!(migration = %job.0, attempt = job.1, %vm, "migration: {reason}");
        self.answer(job, vm, MigrationUpdate::Failed { reason });
    }

    async fn holder(&self, vm: VmId) -> Option<(Arc<dyn Driver>, VmState)> {
        for driver in &self.drivers {
            if let Ok(Some(state)) = driver.state_of(vm).await {
                return Some((driver.clone(), state));
            }
        }
        None
    }

    fn spawn(&self, job: Job, work: impl std::future::Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(work);
        if let Some(old) = self.book.lock().tasks.insert(job, handle) {
            old.abort();
        }
    }

    fn busy(&self, job: Job) -> bool {
        self.book
            .lock()
            .tasks
            .get(&job)
            .is_some_and(|task| !task.is_finished())
    }

    /// Carries out (or answers again) one order from the server.
    pub fn order(&self, order: MigrationOrder) {
        let (migration, vm) = (order.migration(), order.vm());
        let job = (migration, order.attempt());
        let last = self.book.lock().last.get(&job).cloned();
        match order {
            MigrationOrder::Expect { spec, source, .. } => {
                if let Some(last) = last {
                    return self.answer(job, vm, last);
                }
                if self.busy(job) {
                    return;
                }
                let Some(port) = self.port else {
                    return self.failed(
                        job,
                        vm,
                        "this host takes no transfers: it joined over plain HTTP".into(),
                    );
                };
                let me = self.clone();
                self.spawn(job, async move {
                    match me.holder(vm).await {
                        Some((_, VmState::Running)) => me.answer(job, vm, MigrationUpdate::Arrived),
                        Some((_, state)) => me.failed(
                            job,
                            vm,
                            format!("this host holds the VM {state}, not as an expected arrival"),
                        ),
                        None => {
                            me.book.lock().expected.insert(
                                migration,
                                Expected {
                                    attempt: job.1,
                                    vm,
                                    spec: *spec,
                                    source,
                                },
                            );
                            me.answer(job, vm, MigrationUpdate::Expecting { port });
                        }
                    }
                });
            }
            MigrationOrder::Send {
                target,
                addr,
                max_downtime_ms,
                ..
            } => {
                if let Some(last) = last {
                    return self.answer(job, vm, last);
                }
                if self.busy(job) {
                    return;
                }
                let me = self.clone();
                self.spawn(job, async move {
                    let result = me.send(job, vm, target, &addr, max_downtime_ms).await;
                    match result {
                        Ok(update) => me.answer(job, vm, update),
                        Err(reason) => me.failed(job, vm, reason),
                    }
                });
            }
            MigrationOrder::Abort { .. } | MigrationOrder::Release { .. } => {
                let released = matches!(order, MigrationOrder::Release { .. });
                if matches!(
                    last,
                    Some(MigrationUpdate::Aborted | MigrationUpdate::Released)
                ) {
                    return self.answer(job, vm, last.unwrap_or(MigrationUpdate::Aborted));
                }
                self.book.lock().expected.remove(&migration);
                let me = self.clone();
                self.spawn(job, async move {
                    let result = match me.holder(vm).await {
                        Some((driver, _)) => driver.terminate(vm).await,
                        None => Ok(()),
                    };
                    match result {
                        Ok(()) => {
                            info!(%migration, %vm, released, "this host's copy of the VM is gone");
                            me.answer(
                                job,
                                vm,
                                if released {
                                    MigrationUpdate::Released
                                } else {
                                    MigrationUpdate::Aborted
                                },
                            );
                        }
                        Err(e) => me.failed(job, vm, error_text(&e)),
                    }
                });
            }
            MigrationOrder::Resume { .. } => {
                if last == Some(MigrationUpdate::Resumed) {
                    return self.answer(job, vm, MigrationUpdate::Resumed);
                }
                let me = self.clone();
                // Ends a send still in flight: the stream breaks and the hypervisor
                // goes on running the VM here.
                self.spawn(job, async move {
                    let result = match me.holder(vm).await {
                        Some((driver, _)) => driver.migrate_out_undo(vm).await,
                        None => Err(DriverError::NoSuchVm(vm)),
                    };
                    match result {
                        Ok(()) => me.answer(job, vm, MigrationUpdate::Resumed),
                        Err(e) => me.failed(job, vm, error_text(&e)),
                    }
                });
            }
        }
    }

    /// The source's part: hand over, stream, report.
    async fn send(
        &self,
        job: Job,
        vm: VmId,
        target: HostId,
        addr: &str,
        max_downtime_ms: u64,
    ) -> Result<MigrationUpdate, String> {
        let Some(tls) = &self.tls else {
            return Err("this host sends no transfers: it joined over plain HTTP".into());
        };
        let (driver, state) = match self.holder(vm).await {
            Some(held) => held,
            None => return Err("the VM is not on this host".into()),
        };
        if state == VmState::Migrating {
            // Sent before this agent restarted: the hypervisor stopped it after sending.
            return Ok(MigrationUpdate::Sent {
                downtime_ms: None,
                total_ms: 0,
                transferred_bytes: 0,
            });
        }
        let handoff = driver
            .migration_handoff(vm)
            .await
            .map_err(|e| error_text(&e))?;
        let mut stream = transfer::dial(tls, addr, target)
            .await
            .map_err(|e| error_text(&e))?;
        transfer::write_frame(
            &mut stream,
            &TransferOpen::Migration(TransferHello {
                migration: job.0,
                attempt: job.1,
                vm,
                handoff,
            }),
        )
        .await
        .map_err(|e| error_text(&e))?;
        match transfer::read_frame::<TransferReply>(&mut stream)
            .await
            .map_err(|e| error_text(&e))?
        {
            TransferReply::Ready => {}
            TransferReply::Refused { reason } => {
                return Err(format!("the target refused the transfer: {reason}"))
            }
        }
        std::fs::create_dir_all(&self.sockets)
            .map_err(|e| format!("creating {}: {e}", self.sockets.display()))?;
        let socket = self
            .sockets
            .join(format!("{}-{}.sock", job.0.simple(), job.1));
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket)
            .map_err(|e| format!("listening on {}: {e}", socket.display()))?;
        // QEMU writes into the socket; the relay carries it to the target as it comes.
        let relay = tokio::spawn(async move {
            let (mut local, _) = listener.accept().await?;
            let copied = tokio::io::copy_bidirectional(&mut local, &mut stream).await;
            use tokio::io::AsyncWriteExt;
            let _ = stream.shutdown().await;
            copied
        });
        let (progress_tx, mut progress_rx) =
            tokio::sync::watch::channel(TransferProgress::default());
        let sending = driver.migrate_out(vm, &socket, max_downtime_ms, progress_tx);
        tokio::pin!(sending);
        let mut tick = tokio::time::interval(PROGRESS_EVERY);
        let result = loop {
            tokio::select! {
                result = &mut sending => break result,
                _ = tick.tick() => {
                    let now = *progress_rx.borrow_and_update();
                    if now != TransferProgress::default() {
                        self.answer(job, vm, MigrationUpdate::Progress(now));
                    }
                }
            }
        };
        let result = match result {
            Ok(sent) => {
                // Everything QEMU wrote must reach the target before the answer goes.
                match tokio::time::timeout(Duration::from_secs(60), relay).await {
                    Ok(Ok(Ok(_))) => Ok(MigrationUpdate::Sent {
                        downtime_ms: sent.downtime_ms,
                        total_ms: sent.total_ms,
                        transferred_bytes: sent.transferred_bytes,
                    }),
                    // The target may still have it all; the server asks it.
                    other => {
                        warn!(migration = %job.0, "relay ended badly after the send: {other:?}");
                        Ok(MigrationUpdate::Sent {
                            downtime_ms: sent.downtime_ms,
                            total_ms: sent.total_ms,
                            transferred_bytes: sent.transferred_bytes,
                        })
                    }
                }
            }
            Err(e) => {
                relay.abort();
                Err(error_text(&e))
            }
        };
        let _ = std::fs::remove_file(&socket);
        result
    }

    /// The target's part, for one connection from another agent.
    /// A peer's connection, after its first frame named a migration.
    pub async fn receive(&self, peer: HostId, mut stream: Stream, hello: TransferHello) {
        let (migration, vm) = (hello.migration, hello.vm);
        let job = (migration, hello.attempt);
        let expected = self.book.lock().expected.get(&migration).cloned();
        let Some(expected) = expected else {
            return refuse(
                &mut stream,
                peer,
                migration,
                "no such migration is expected here".into(),
            )
            .await;
        };
        if expected.source != peer || expected.vm != vm || expected.attempt != hello.attempt {
            return refuse(
                &mut stream,
                peer,
                migration,
                format!(
                    "migration {migration} is expected from host {} with VM {} (attempt {})",
                    expected.source, expected.vm, expected.attempt
                ),
            )
            .await;
        }
        let Some(driver) = self
            .drivers
            .iter()
            .find(|d| d.kind() == expected.spec.hypervisor)
            .cloned()
        else {
            return refuse(
                &mut stream,
                peer,
                migration,
                format!("no {} driver here", expected.spec.hypervisor),
            )
            .await;
        };
        let socket = match driver.migrate_in(vm, &expected.spec, &hello.handoff).await {
            Ok(socket) => socket,
            Err(e) => {
                let reason = error_text(&e);
                self.failed(job, vm, reason.clone());
                return refuse(&mut stream, peer, migration, reason).await;
            }
        };
        let mut local = None;
        for _ in 0..250 {
            if let Ok(connected) = UnixStream::connect(&socket).await {
                local = Some(connected);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let Some(mut local) = local else {
            let reason = format!(
                "the receiving hypervisor does not listen on {}",
                socket.display()
            );
            self.failed(job, vm, reason.clone());
            return refuse(&mut stream, peer, migration, reason).await;
        };
        if let Err(e) = transfer::write_frame(&mut stream, &TransferReply::Ready).await {
            return self.failed(job, vm, error_text(&e));
        }
        info!(%migration, %vm, %peer, "receiving VM");
        if let Err(e) = tokio::io::copy_bidirectional(&mut stream, &mut local).await {
            // A stream cut short: the receiving QEMU ends by itself; the server's abort
            // removes what is left.
            return self.failed(job, vm, format!("the stream broke: {e}"));
        }
        match driver.migrate_in_finish(vm).await {
            Ok(()) => {
                self.book.lock().expected.remove(&migration);
                info!(%migration, %vm, "VM arrived");
                self.answer(job, vm, MigrationUpdate::Arrived);
            }
            Err(e) => self.failed(job, vm, error_text(&e)),
        }
    }
}

async fn refuse(stream: &mut Stream, peer: HostId, migration: MigrationId, reason: String) {
    warn!(%peer, %migration, "transfer refused: {reason}");
    let _ = transfer::write_frame(stream, &TransferReply::Refused { reason }).await;
}
