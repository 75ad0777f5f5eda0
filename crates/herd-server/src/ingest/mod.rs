//! One agent connection: state reports in, commands out.
//!
//! The connection is the embedded bus's transport: the host's durable
//! queue is drained down the same socket its reports come up. Reports are applied
//! through the host's [`HostView`], so only real changes touch the store, and those go
//! behind to the store (`crate::group_commit`): a report is acknowledged once it is
//! the server's view, and many hosts' changes share one transaction. A heartbeat that
//! changes nothing costs no store access at all. Command results are acknowledged to
//! the bus in batches too: an ack lost in a crash only makes the agent see the command
//! again, which it answers as a replay.
//!
//! A connection never stops reading for long: whatever waits for the store (a write
//! past the backlog, a host coming back) reads frames meanwhile, since a frame is what
//! proves the host alive. Otherwise a busy store would get live hosts marked down,
//! and marking them down and up again would only add to its work.
//!
//! **Architecture Invariant:** an agent speaks only for its own host. Every VM named
//! in a report, a usage batch or a command result is checked against the placement
//! map; anything about another host's VM is dropped and counted.

mod reports;

pub use reports::{apply_report, apply_report_behind};

use crate::cloud::{Cloud, CloudError, Metrics};
use crate::group_commit::Pending;
use crate::store::NewEvent;
use axum::extract::ws::{Message, WebSocket};
use herd_proto::wire::{self, AgentMsg, CommandId, HostId, ServerMsg, PROTOCOL_VERSION};
use herd_sync::HostView;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// An unchanged heartbeat is acknowledged only every this many reports.
const ACK_EVERY: u64 = 10;

/// Command results are acknowledged to the bus when this many are held, or every
/// [`ACK_FLUSH`].
const ACK_BATCH: usize = 256;
const ACK_FLUSH: Duration = Duration::from_millis(100);

/// After asking an agent for a full report, deltas that arrive before it (they were in
/// flight) are not answered with another request for this long: under load, asking
/// again for every one of them only adds full reports to the backlog.
const NEED_FULL_QUIET: Duration = Duration::from_secs(5);

/// Frames read ahead while a report waits for the disk.
const MAX_DEFERRED: usize = 64;

/// Commands read from the host's queue at a time.
const DRAIN_PAGE: usize = 256;

/// How long a new connection may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves one agent connection on the ingest runtime (see [`ingest_runtime`]) until it
/// closes or is replaced.
pub async fn serve_agent_apart(cloud: Arc<Cloud>, host: HostId, socket: WebSocket) {
    let served = ingest_runtime().spawn(serve_agent(cloud, host, socket));
    if let Err(e) = served.await {
        warn!(%host, "agent connection task failed: {e}");
    }
}

/// The runtime agent connections are served on, apart from the API's. Ten thousand
/// agents keep the ingest's tasks runnable all the time; an API request (or a TLS
/// handshake) queued on the same workers would wait behind hundreds of them. On
/// runtimes of their own, the operating system shares the cores between the two, and
/// an API request, which wakes a mostly idle runtime, is served at once.
///
/// One per process, made on first use; if it cannot be made, connections are served
/// where they arrive.
fn ingest_runtime() -> tokio::runtime::Handle {
    static INGEST: std::sync::OnceLock<Option<tokio::runtime::Runtime>> =
        std::sync::OnceLock::new();
    let made = INGEST.get_or_init(|| {
        let threads = std::thread::available_parallelism().map_or(2, usize::from);
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("herd-ingest")
            .enable_all()
            .build()
            .map_err(|e| warn!("no separate runtime for agent connections: {e}"))
            .ok()
    });
    made.as_ref()
        .map_or_else(tokio::runtime::Handle::current, |rt| rt.handle().clone())
}

/// Serves one agent connection until it closes or is replaced.
pub async fn serve_agent(cloud: Arc<Cloud>, host: HostId, mut socket: WebSocket) {
    let hello = tokio::time::timeout(HELLO_TIMEOUT, socket.recv()).await;
    let Ok(Some(Ok(Message::Binary(frame)))) = hello else {
        warn!(%host, "agent connection closed before hello");
        return;
    };
    let session = match wire::decode::<AgentMsg>(&frame) {
        Ok(AgentMsg::Hello {
            protocol,
            agent_version,
            hostname,
            capacity,
            hypervisors,
            transfer_port,
        }) => {
            if protocol != PROTOCOL_VERSION {
                let reason = format!(
                    "agent speaks protocol {protocol}, this server speaks {PROTOCOL_VERSION}"
                );
                let _ = send(&mut socket, &ServerMsg::Refused { reason }).await;
                return;
            }
            match crate::blocking(|| {
                cloud.host_hello(
                    host,
                    &hostname,
                    &hypervisors,
                    capacity.cpus,
                    capacity.memory_mib,
                    &agent_version,
                )
            }) {
                Ok(session) => {
                    cloud.statuses.named(host, &hostname);
                    cloud.topology.hello(host, transfer_port);
                    session
                }
                Err(e) => {
                    warn!(%host, hostname, "agent session refused: {e}");
                    cloud.audit_system(
                        &format!("host:{host}"),
                        "agent hello",
                        &format!("/v1/agent/bus ({hostname})"),
                        409,
                        "host_connected",
                    );
                    let reason = e.to_string();
                    let _ = send(&mut socket, &ServerMsg::Refused { reason }).await;
                    return;
                }
            }
        }
        Ok(_) => {
            let reason = "the first message must be hello".to_owned();
            let _ = send(&mut socket, &ServerMsg::Refused { reason }).await;
            return;
        }
        Err(e) => {
            warn!(%host, "undecodable hello: {e}");
            return;
        }
    };
    info!(%host, session, "agent connected");
    let result = session_loop(&cloud, host, session, &mut socket).await;
    cloud.host_disconnected(host, session);
    match result {
        Ok(()) => info!(%host, session, "agent connection ended"),
        Err(e) => warn!(%host, session, "agent connection ended: {e}"),
    }
}

async fn send(socket: &mut WebSocket, msg: &ServerMsg) -> Result<(), String> {
    socket
        .send(Message::Binary(wire::encode(msg).into()))
        .await
        .map_err(|e| e.to_string())
}

/// The host's VMs as the server knows them: the store, with the changes still on
/// their way there laid over it.
fn seed_view(cloud: &Cloud, host: HostId) -> HostView {
    let mut seeded: BTreeMap<_, _> = cloud.store.vms_on(host).into_iter().collect();
    seeded.extend(cloud.commits.observed_on(host));
    seeded.retain(|_, state| crate::cloud::reported_by_host(*state));
    HostView::from_store(seeded)
}

async fn session_loop(
    cloud: &Arc<Cloud>,
    host: HostId,
    session: u64,
    socket: &mut WebSocket,
) -> Result<(), String> {
    let mut view = seed_view(cloud, host);
    send(
        socket,
        &ServerMsg::Welcome {
            sync_interval_ms: cloud.config.sync_interval.as_millis() as u64,
            usage_interval_ms: cloud.config.usage_interval.as_millis() as u64,
        },
    )
    .await?;
    let mut queued = cloud.bus.subscribe(host);
    let mut outbox = cloud.open_outbox(host, session);
    let result = drain_and_serve(
        cloud,
        host,
        session,
        socket,
        &mut view,
        &mut queued,
        &mut outbox,
    )
    .await;
    cloud.close_outbox(host, session);
    cloud.bursts.host_gone(host);
    result
}

#[allow(clippy::too_many_arguments)]
async fn drain_and_serve(
    cloud: &Arc<Cloud>,
    host: HostId,
    session: u64,
    socket: &mut WebSocket,
    view: &mut HostView,
    queued: &mut herd_bus::Subscription,
    outbox: &mut tokio::sync::mpsc::UnboundedReceiver<ServerMsg>,
) -> Result<(), String> {
    let mut sent_up_to = 0u64;
    let mut check = tokio::time::interval(Duration::from_secs(1));
    let mut acks = tokio::time::interval(ACK_FLUSH);
    let mut owed = Owed::default();
    // The queue is read when something was queued (and once at the start), not after
    // every report: ten thousand hosts reporting each second would otherwise be ten
    // thousand queue reads a second that find nothing.
    let mut queued_since_drain = true;
    loop {
        // Drain whatever is queued for this host.
        while std::mem::take(&mut queued_since_drain) {
            let queued = cloud
                .bus
                .pending(host, sent_up_to, DRAIN_PAGE)
                .await
                .map_err(|e| e.to_string())?;
            // A full page may have more behind it.
            queued_since_drain = queued.len() == DRAIN_PAGE;
            for item in queued {
                sent_up_to = item.seq;
                send(socket, &ServerMsg::Command(Box::new(item.command))).await?;
            }
        }
        if owed.acks.len() >= ACK_BATCH {
            flush_acks(cloud, host, &mut owed.acks);
        }
        owed.check_written()?;
        tokio::select! {
            _ = queued.queued() => queued_since_drain = true,
            Some(msg) = outbox.recv() => send(socket, &msg).await?,
            _ = acks.tick(), if !owed.acks.is_empty() => flush_acks(cloud, host, &mut owed.acks),
            _ = check.tick() => {
                if !cloud.session_current(host, session) {
                    return Err("replaced by a newer connection".into());
                }
            }
            frame = socket.recv() => {
                let frame = match frame {
                    None => return Ok(()),
                    Some(Err(e)) => return Err(e.to_string()),
                    Some(Ok(Message::Binary(frame))) => frame,
                    Some(Ok(Message::Close(_))) => return Ok(()),
                    Some(Ok(_)) => continue,
                };
                on_frame(cloud, host, session, view, socket, &mut owed, &frame).await?;
            }
        }
        // Frames read while a report waited for the disk, in order.
        while let Some(frame) = owed.deferred.pop_front() {
            on_frame(cloud, host, session, view, socket, &mut owed, &frame).await?;
        }
    }
}

/// What a connection still owes: bus acks for commands the agent finished, written in
/// batches, and whether a full report was asked for lately (deltas already in flight
/// are not answered with another request).
#[derive(Default)]
struct Owed {
    acks: Vec<CommandId>,
    asked_full_at: Option<tokio::time::Instant>,
    /// Changes handed to the write-behind and not yet known to be on disk. If one
    /// fails, the session ends: the agent reconnects and its full report brings the
    /// store up to date again.
    unwritten: Vec<Pending>,
    /// Frames that arrived while a write waited for the disk, not yet handled.
    deferred: VecDeque<axum::body::Bytes>,
}

impl Owed {
    /// Forgets writes that reached the disk; fails if one did not.
    fn check_written(&mut self) -> Result<(), String> {
        let mut failed = None;
        self.unwritten
            .retain_mut(|pending| match pending.poll_written() {
                None => true,
                Some(Ok(())) => false,
                Some(Err(e)) => {
                    failed = Some(e);
                    false
                }
            });
        match failed {
            Some(e) => Err(format!("reported changes could not be stored: {e}")),
            None => Ok(()),
        }
    }
}

/// Waits until a handed-over write is on disk, reading on meanwhile (see
/// [`wait_reading`]).
async fn wait_for_disk(
    cloud: &Cloud,
    host: HostId,
    session: u64,
    socket: &mut WebSocket,
    deferred: &mut VecDeque<axum::body::Bytes>,
    written: Pending,
) -> Result<(), String> {
    let durable = async { written.durable().await.map_err(|e| e.to_string()) };
    wait_reading(cloud, host, session, socket, deferred, durable).await
}

/// Waits for `work`, which waits for the store, reading on meanwhile: a frame that
/// arrives proves the host alive (the server is what is slow, and a backlog must not
/// get hosts marked down, which would only add to it), and is kept for later, in
/// order. A host that really went silent is marked down as usual.
async fn wait_reading<T>(
    cloud: &Cloud,
    host: HostId,
    session: u64,
    socket: &mut WebSocket,
    deferred: &mut VecDeque<axum::body::Bytes>,
    work: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, String> {
    tokio::pin!(work);
    loop {
        tokio::select! {
            result = &mut work => return result,
            // Past this many, stop reading: TCP holds the rest.
            frame = socket.recv(), if deferred.len() < MAX_DEFERRED => match frame {
                None | Some(Ok(Message::Close(_))) => {
                    return Err("connection closed while the server was busy".into())
                }
                Some(Err(e)) => return Err(e.to_string()),
                Some(Ok(Message::Binary(frame))) => {
                    cloud.host_heard(host, session);
                    deferred.push_back(frame);
                }
                Some(Ok(_)) => {}
            },
        }
    }
}

/// Hands the commands the agent finished to the bus, which drops them from the host's
/// queue. Not waited for: the bus writes everyone's acks together, behind whatever
/// else it is writing, and a connection that waited would stop reading its host's
/// reports meanwhile. An ack lost in a crash only makes the agent see its command
/// again, which it answers as a replay.
fn flush_acks(cloud: &Arc<Cloud>, host: HostId, done: &mut Vec<CommandId>) {
    let ids = std::mem::take(done);
    let cloud = cloud.clone();
    tokio::spawn(async move {
        if let Err(e) = cloud.bus.ack(host, &ids).await {
            warn!(%host, "finished commands not dropped from the queue: {e}");
        }
    });
}

/// Handles one frame from the agent, read now or read ahead while the connection
/// waited.
async fn on_frame(
    cloud: &Arc<Cloud>,
    host: HostId,
    session: u64,
    view: &mut HostView,
    socket: &mut WebSocket,
    owed: &mut Owed,
    frame: &[u8],
) -> Result<(), String> {
    cloud
        .metrics
        .report_bytes
        .fetch_add(frame.len() as u64, Ordering::Relaxed);
    let msg = match wire::decode::<AgentMsg>(frame) {
        Ok(msg) => msg,
        Err(e) => {
            Metrics::inc(&cloud.metrics.rejected_reports);
            return Err(format!("undecodable message: {e}"));
        }
    };
    match msg {
        AgentMsg::Hello { .. } => Err("hello sent twice".into()),
        AgentMsg::Report(report) => {
            let (current, resync) = cloud.host_seen(host, session, report.util);
            if !current {
                return Err("replaced by a newer connection".into());
            }
            if resync {
                // The host was marked down while this connection stayed open: the store
                // says `unknown` for its VMs, so start over from the store and a full
                // report.
                let back = {
                    let cloud = cloud.clone();
                    async move {
                        tokio::task::spawn_blocking(move || {
                            cloud.host_back(host)?;
                            Ok::<_, CloudError>(seed_view(&cloud, host))
                        })
                        .await
                        .map_err(|e| e.to_string())?
                        .map_err(|e| e.to_string())
                    }
                };
                *view =
                    wait_reading(cloud, host, session, socket, &mut owed.deferred, back).await?;
            }
            if report.is_full() {
                owed.asked_full_at = None;
            }
            let (reply, written) =
                apply_report_behind(cloud, host, view, &report).map_err(|e| e.to_string())?;
            match written {
                // The store is behind by more than the backlog allows: wait for it.
                Some(written) if written.must_wait => {
                    wait_for_disk(cloud, host, session, socket, &mut owed.deferred, written)
                        .await?;
                }
                Some(written) => owed.unwritten.push(written),
                None => {}
            }
            match reply {
                Some(ServerMsg::NeedFull { .. })
                    if owed
                        .asked_full_at
                        .is_some_and(|at| at.elapsed() < NEED_FULL_QUIET) =>
                {
                    Ok(())
                }
                Some(reply) => {
                    if matches!(reply, ServerMsg::NeedFull { .. }) {
                        owed.asked_full_at = Some(tokio::time::Instant::now());
                    }
                    send(socket, &reply).await
                }
                None => Ok(()),
            }
        }
        AgentMsg::Usage { sampled_at_ms, vms } => {
            cloud.host_heard(host, session);
            let (n_rejected, written) = cloud.hand_over_usage(host, sampled_at_ms, &vms);
            // No agent sends a sample twice: it is received when it is on disk.
            wait_for_disk(cloud, host, session, socket, &mut owed.deferred, written).await?;
            if n_rejected > 0 {
                warn!(%host, n_rejected, "usage for VMs not on this host dropped");
                Metrics::inc(&cloud.metrics.rejected_reports);
            }
            Ok(())
        }
        AgentMsg::Console { request, result } => {
            if !cloud.console_answer(host, request, result) {
                warn!(%host, request, "console answer nobody asked this host for; dropped");
                Metrics::inc(&cloud.metrics.rejected_reports);
            }
            Ok(())
        }
        AgentMsg::PolicyEnforced {
            vm,
            rule,
            action,
            reason,
        } => {
            cloud.host_heard(host, session);
            if !crate::blocking(|| cloud.record_backstop(host, vm, &rule, action, &reason))
                .map_err(|e| e.to_string())?
            {
                warn!(%host, %vm, "backstop report for a VM not on this host dropped");
                Metrics::inc(&cloud.metrics.rejected_reports);
            }
            Ok(())
        }
        AgentMsg::Guest { vm, report } => {
            cloud.host_heard(host, session);
            if !crate::blocking(|| cloud.record_guest(host, vm, &report))
                .map_err(|e| e.to_string())?
            {
                warn!(%host, %vm, "guest report for a VM not on this host dropped");
                Metrics::inc(&cloud.metrics.rejected_reports);
            }
            Ok(())
        }
        AgentMsg::Migration {
            migration,
            attempt,
            vm,
            update,
        } => {
            cloud.host_heard(host, session);
            crate::blocking(|| cloud.migration_update(host, migration, attempt, vm, update))
                .map_err(|e| e.to_string())
        }
        AgentMsg::BurstAnswer {
            request,
            vm,
            answer,
        } => {
            cloud.host_heard(host, session);
            if !cloud.bursts.waiters.answered((host, vm), request, answer) {
                warn!(%host, request, "burst answer nobody asked this host for; dropped");
                Metrics::inc(&cloud.metrics.rejected_reports);
            }
            Ok(())
        }
        AgentMsg::Bursts(report) => {
            cloud.host_heard(host, session);
            let (in_force, refused) = cloud
                .bursts
                .reported(host, report.in_force, |vm| cloud.vm_on_host(vm, host));
            // An ended lease of a VM no longer here counts only if this host reported
            // it in force before (the store checks): a host bills only its own VMs.
            let ended: Vec<_> = report
                .ended
                .into_iter()
                .map(|(vm, lease, at)| (vm, lease, at, cloud.vm_on_host(vm, host)))
                .collect();
            crate::blocking(|| cloud.store.record_bursts(host, &in_force, &ended))
                .map_err(|e| e.to_string())?;
            if refused > 0 {
                warn!(%host, refused, "burst leases of VMs not on this host dropped");
                Metrics::inc(&cloud.metrics.rejected_reports);
            }
            Ok(())
        }
        AgentMsg::Status(update) => {
            cloud.host_heard(host, session);
            cloud.statuses.heard(host, update);
            Ok(())
        }
        AgentMsg::Peers { request, peers } => {
            if !cloud.statuses.waiters.answered(host, request, peers) {
                warn!(%host, request, "peers answer nobody asked this host for; dropped");
                Metrics::inc(&cloud.metrics.rejected_reports);
            }
            Ok(())
        }
        AgentMsg::Broadcast { broadcast, update } => {
            cloud.host_heard(host, session);
            crate::blocking(|| cloud.broadcast_update(host, broadcast, update));
            Ok(())
        }
        AgentMsg::RoundTrips(trips) => {
            if trips.len() > herd_proto::proximity::MAX_NEIGHBOURS {
                return Err(format!(
                    "{} round trips, over the {} neighbours a host is given",
                    trips.len(),
                    herd_proto::proximity::MAX_NEIGHBOURS
                ));
            }
            cloud.topology.measured(host, &trips);
            Ok(())
        }
        AgentMsg::Node(report) => {
            if !cloud.host_node(host, session, report) {
                return Err("replaced by a newer connection".into());
            }
            Ok(())
        }
        AgentMsg::CommandDone { id, error } => {
            cloud.host_heard(host, session);
            // Placed here (in memory), or else ask the store: a VM that ended is no
            // longer placed, and its last command's result still counts.
            let on_host = cloud.vm_on_host_now(id.vm, host)
                || match cloud.vm_brief(id.vm).map_err(|e| e.to_string())? {
                    None => return Ok(()),
                    Some(vm) => vm.host == Some(host),
                };
            if !on_host {
                warn!(%host, command = %id, "result for a VM not on this host dropped");
                Metrics::inc(&cloud.metrics.rejected_reports);
                return Ok(());
            }
            owed.acks.push(id);
            if cloud.resizes.awaits(id.vm, id.generation) {
                crate::blocking(|| cloud.resize_applied(id.vm, id.generation, error.as_deref()));
            }
            if let Some(error) = error {
                Metrics::inc(&cloud.metrics.command_errors);
                let Some(vm) = cloud.vm_brief(id.vm).map_err(|e| e.to_string())? else {
                    return Ok(());
                };
                crate::blocking(|| {
                    cloud.store.set_error(
                        id.vm,
                        &error,
                        &NewEvent {
                            vm: Some(id.vm),
                            host: Some(host),
                            kind: "vm.error",
                            message: format!("could not reach {}: {error}", vm.desired),
                            ..NewEvent::default()
                        },
                    )
                })
                .map_err(|e| e.to_string())?;
            }
            Ok(())
        }
    }
}
