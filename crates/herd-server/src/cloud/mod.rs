//! The server's core: every operation the API offers, as plain methods that never see
//! HTTP or JSON, plus the in-memory state that must not be recomputed per request
//! (capacity accounting for the scheduler, host liveness).
//!
//! **Architecture Invariant:** a VM is placed and its capacity counted under one lock,
//! and the row is durable before the lock is released, so concurrent launches cannot
//! over-commit a host and an acknowledged launch survives a crash.

mod console;
mod guests;
mod hosts;
mod identity;
mod liveness;
mod metering;
mod placement;
mod reconcile;
mod sessions;
pub mod tenancy;
pub(crate) mod validate;
mod vms;

use liveness::LIVENESS_TICK;
use placement::{slot_of, Placement};
pub(crate) use validate::valid_name;

use crate::group_commit::{CommitError, GroupCommit};
use crate::store::{HostRecord, Store, StoreError, VmRecord};
use herd_bus::{Bus, BusError};
use herd_proto::node::NodeReport;
use herd_proto::policy::PolicySpec;
use herd_proto::wire::{HostId, HostUtil, ServerMsg, VmId, VmSpec, VmUsage};
use herd_proto::VmState;
use herd_sched::SchedPolicy;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tenancy::Tenancy;
use tokio::sync::{mpsc, Notify};
use tracing::warn;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    /// The URL agents and clients reach this server at, for discovery.
    pub public_url: String,
    pub sync_interval: Duration,
    pub usage_interval: Duration,
    /// A host that sends nothing for this long is marked down.
    pub host_grace: Duration,
    pub sched: SchedPolicy,
    /// Hypervisor type for a launch that names none.
    pub default_hypervisor: String,
    /// The hypervisor types the agents of this build have drivers for, accepted while
    /// no host is known yet (a launch right after the first start waits for its host).
    /// Once hosts are known, a VM may name only a type some host offers.
    pub hypervisor_kinds: Vec<String>,
    pub default_image: String,
    /// Serve plain HTTP instead of HTTPS: no CA, no agent certificates, tokens alone.
    /// Only for loopback (the CLI refuses it elsewhere).
    pub insecure_http: bool,
}

impl ServerConfig {
    pub fn new(data_dir: PathBuf, public_url: String) -> ServerConfig {
        ServerConfig {
            data_dir,
            public_url,
            sync_interval: Duration::from_secs(1),
            usage_interval: Duration::from_secs(10),
            host_grace: Duration::from_secs(10),
            sched: SchedPolicy::default(),
            default_hypervisor: "qemu".into(),
            hypervisor_kinds: Vec::new(),
            default_image: "default".into(),
            insecure_http: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    #[error("no {kind} with id {id:?}")]
    NotFound { kind: &'static str, id: String },
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    #[error("missing or invalid credentials")]
    Unauthorized,
    #[error("this credential may not do that")]
    Forbidden,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Commit(#[from] CommitError),
}

pub(crate) fn invalid(field: &'static str, message: impl Into<String>) -> CloudError {
    CloudError::Invalid {
        field,
        message: message.into(),
    }
}

/// A launch request after parsing, before validation.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub name: String,
    pub project: Option<String>,
    pub hypervisor: Option<String>,
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u64>,
    pub image: Option<String>,
    pub command: Vec<String>,
    pub policy: PolicySpec,
    pub keep_running: bool,
    /// The data disk's size in MiB; none by default.
    pub disk_mib: Option<u64>,
}

/// Live facts about a host that change every interval and are not worth a disk write.
#[derive(Debug, Clone)]
pub struct HostLive {
    pub last_seen: Instant,
    pub util: HostUtil,
    pub down: bool,
    /// The host was marked down while its connection stayed open: its next report
    /// must be a full one.
    pub needs_resync: bool,
    /// Bumped by each new connection; an older connection that sees a newer number
    /// ends itself.
    pub session: u64,
    pub connected: bool,
    /// The node's last word about itself (utility sample, drivers' health) on this
    /// connection, and when it came.
    pub node: Option<(Instant, NodeReport)>,
}

/// A host as the API shows it: its record, live facts and what is promised on it.
#[derive(Debug, Clone)]
pub struct HostStatus {
    pub record: HostRecord,
    pub live: Option<HostLive>,
    pub allocated_vcpus: u64,
    pub allocated_memory_mib: u64,
}

/// What the server knows of a VM's guest module, from its relayed reports.
#[derive(Debug, Clone, Default)]
pub struct GuestInfo {
    pub version: Option<String>,
    pub hello_at_ms: Option<i64>,
    pub last_report_at_ms: i64,
    pub uptime_ms: Option<u64>,
    pub workload_running: Option<bool>,
    pub guest_rss_kib: Option<u64>,
    pub exit_code: Option<i32>,
    pub last_error: Option<String>,
    /// (rule, text, fraction of the limit in thousandths, seconds left).
    pub policy_progress: Vec<(String, String, u32, Option<u64>)>,
}

/// Counters exported at /metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    pub reports_delta: AtomicU64,
    pub reports_full: AtomicU64,
    pub report_bytes: AtomicU64,
    pub full_requests: AtomicU64,
    pub vm_state_changes: AtomicU64,
    pub commands_published: AtomicU64,
    pub command_errors: AtomicU64,
    pub rejected_reports: AtomicU64,
    pub api_requests: AtomicU64,
    pub hosts_marked_down: AtomicU64,
    pub agent_discoveries: AtomicU64,
}

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

pub struct Cloud {
    pub config: ServerConfig,
    pub(crate) store: Arc<Store>,
    /// Agents' reports and usage, written in shared transactions.
    pub commits: GroupCommit,
    pub bus: Box<dyn Bus>,
    /// The CA that signs agent certificates at join; `None` when serving plain HTTP.
    /// Set by `herd_server::open`.
    pub ca: Option<std::sync::Arc<herd_tls::Ca>>,
    pub tenancy: Tenancy,
    placement: Mutex<Placement>,
    live: Mutex<HashMap<HostId, HostLive>>,
    usage: Mutex<HashMap<VmId, (VmUsage, i64)>>,
    guests: Mutex<HashMap<VmId, GuestInfo>>,
    /// Why each pending VM could not be placed, so the event is written once.
    pending_reasons: Mutex<HashMap<VmId, String>>,
    pub reconcile_now: Notify,
    pub metrics: Metrics,
    /// Messages for each connected agent, outside the command queue (console requests).
    outbox: Mutex<HashMap<HostId, (u64, mpsc::UnboundedSender<ServerMsg>)>>,
    /// Console requests awaiting their agent's answer: which host must answer, and where.
    console_waiters: crate::waiters::Waiters<HostId, Result<Vec<u8>, String>>,
    /// Live migrations in progress (the coordinator is the `migration` module).
    pub migrations: crate::migration::book::Migrations,
    /// Resizes waiting for their host (the coordinator is the `resize` module).
    pub resizes: crate::resize::book::Resizes,
    /// Bursts in force and asks waiting for their host (the `bursts` module).
    pub bursts: crate::bursts::book::Bursts,
    /// Hosts' status messages, relayed to the others (the `status` module).
    pub statuses: crate::status::book::Statuses,
    /// Broadcasts in progress (the coordinator is the `broadcast` module).
    pub broadcasts: crate::broadcast::book::Broadcasts,
    /// Where agents are reached and how close they are (the `topology` module).
    pub topology: crate::topology::book::Topology,
    /// Jobs past their deadline (the coordinator is the `jobs` module).
    pub jobs: crate::jobs::book::Jobs,
}

impl Cloud {
    pub fn open(config: ServerConfig, bus: Box<dyn Bus>) -> Result<Cloud, CloudError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|e| {
            invalid(
                "data_dir",
                format!("cannot create {}: {e}", config.data_dir.display()),
            )
        })?;
        let store = Arc::new(Store::open(&config.data_dir.join("herd.db"))?);
        let tenancy = Tenancy::load(&store)?;
        let sched_policy = config.sched;
        let cloud = Cloud {
            config,
            commits: GroupCommit::new(store.clone()),
            store,
            bus,
            ca: None,
            tenancy,
            placement: Mutex::new(Placement::new(sched_policy)),
            live: Mutex::new(HashMap::new()),
            usage: Mutex::new(HashMap::new()),
            guests: Mutex::new(HashMap::new()),
            pending_reasons: Mutex::new(HashMap::new()),
            reconcile_now: Notify::new(),
            metrics: Metrics::default(),
            outbox: Mutex::new(HashMap::new()),
            console_waiters: Default::default(),
            migrations: Default::default(),
            resizes: Default::default(),
            bursts: Default::default(),
            statuses: Default::default(),
            topology: Default::default(),
            broadcasts: Default::default(),
            jobs: Default::default(),
        };
        cloud.rebuild()?;
        cloud.restore_migrations()?;
        cloud.restore_broadcasts()?;
        cloud.restore_jobs()?;
        cloud.restore_resizes()?;
        Ok(cloud)
    }

    /// Runs the reconciler and the liveness check until the process ends.
    pub async fn run_background(self: std::sync::Arc<Self>) {
        {
            // The grace after a start counts from when agents can reach the server,
            // not from when the store was opened.
            let now = Instant::now();
            for live in self.live.lock().values_mut().filter(|l| l.session == 0) {
                live.last_seen = now;
            }
        }
        tokio::spawn(self.clone().drive_migrations());
        tokio::spawn(self.clone().drive_resizes());
        tokio::spawn(self.clone().relay_statuses());
        tokio::spawn(self.clone().tell_neighbours());
        tokio::spawn(self.clone().drive_broadcasts());
        tokio::spawn(self.clone().drive_jobs());
        let cloud = self.clone();
        tokio::spawn(async move {
            loop {
                let next_deadline = cloud.check_liveness(Instant::now()).unwrap_or_else(|e| {
                    warn!("liveness check failed: {e}");
                    None
                });
                // Wake at the next host's deadline, not on a coarse tick, so a dead host
                // is marked down within its grace period (and at most every 100 ms: new
                // hosts and hosts coming back move the deadline).
                let now = Instant::now();
                let wake = next_deadline
                    .unwrap_or(now + LIVENESS_TICK)
                    .clamp(now + Duration::from_millis(1), now + LIVENESS_TICK);
                tokio::time::sleep_until(wake.into()).await;
            }
        });
        loop {
            if let Err(e) = self.reconcile_once().await {
                warn!("reconcile failed: {e}");
            }
            tokio::select! {
                _ = self.reconcile_now.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(1000)) => {}
            }
        }
    }

    /// Rebuilds capacity accounting and liveness from the store after a start.
    fn rebuild(&self) -> Result<(), CloudError> {
        let hosts = self.store.hosts()?;
        let placed = self.store.placed_shares();
        let mut placement = self.placement.lock();
        let mut live = self.live.lock();
        let now = Instant::now();
        placement.restore(hosts.iter().map(slot_of).collect(), placed);
        for host in hosts {
            // Hosts get a longer grace after a server restart to reconnect (see
            // `check_liveness`).
            live.insert(
                host.id,
                HostLive {
                    last_seen: now,
                    util: HostUtil::default(),
                    down: !host.up,
                    needs_resync: false,
                    session: 0,
                    connected: false,
                    node: None,
                },
            );
        }
        Ok(())
    }
}

/// Whether a VM in this state is on its host, as the host reports it (not waiting for
/// a host, nor gone from one): the states a host's view starts from and a host-down
/// mark turns into `unknown`.
pub(crate) fn reported_by_host(state: VmState) -> bool {
    !matches!(
        state,
        VmState::Pending | VmState::Scheduled | VmState::Terminated | VmState::Purged
    )
}

impl Cloud {
    /// What a VM's host is told it should be: its record, with its project's burst
    /// limits as they are now.
    pub fn spec_of(&self, vm: &VmRecord) -> VmSpec {
        let mut spec = shape_of(vm);
        spec.burst = self.tenancy.burst_limits(&vm.project);
        spec
    }
}

/// A VM's spec from its record alone (placement needs only its shape).
pub fn shape_of(vm: &VmRecord) -> VmSpec {
    VmSpec {
        name: vm.name.clone(),
        hypervisor: vm.hypervisor.clone(),
        vcpus: vm.vcpus,
        memory_mib: vm.memory_mib,
        image: vm.image.clone(),
        command: vm.command.clone(),
        policy: vm.policy,
        keep_running: vm.keep_running,
        disk_mib: vm.disk_mib,
        burst: herd_proto::burst::BurstLimits::default(),
        seed: vm.seed,
    }
}
