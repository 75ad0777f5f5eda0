//! The server's core: every operation the API offers, as plain methods that never see
//! HTTP or JSON, plus the in-memory state that must not be recomputed per request
//! (capacity accounting for the scheduler, host liveness).
//!
//! **Architecture Invariant:** a VM is placed and its capacity counted under one lock,
//! and the row is durable before the lock is released, so concurrent launches cannot
//! over-commit a host and an acknowledged launch survives a crash.

use crate::auth;
use crate::billing::{self, BillLine};
use crate::group_commit::{CommitError, GroupCommit, Pending};
use crate::store::{
    now_ms, HostRecord, NewEvent, Observation, Store, StoreError, UsageRow, VmBrief, VmFilter,
    VmRecord,
};
use crate::tenancy::Tenancy;
use herd_bus::{Bus, BusError};
use herd_proto::join::{Discovery, JoinRequest, JoinResponse};
use herd_proto::lifecycle::Action;
use herd_proto::policy::{PolicyAction, PolicySpec, RateCard};
use herd_proto::wire::{
    Command, CommandId, GuestReport, HostId, HostUtil, HypervisorInfo, ServerMsg, VmId, VmSpec,
    VmUsage,
};
use herd_proto::VmState;
use herd_sched::{Demand, HostSlot, NoFit, SchedPolicy, Scheduler};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, Notify};
use tracing::{info, warn};
use uuid::Uuid;

/// The longest the liveness check sleeps.
const LIVENESS_TICK: Duration = Duration::from_millis(100);

/// Hosts not yet back after a server start get this many grace periods to reconnect.
const RESTART_GRACE_FACTOR: u32 = 3;

/// How many VMs the reconciler takes from the store at a time.
const RECONCILE_SLICE: usize = 5_000;

/// Hypervisor types a VM spec may name.
pub const HYPERVISORS: [&str; 3] = ["qemu", "oci", "sim"];

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

fn invalid(field: &'static str, message: impl Into<String>) -> CloudError {
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

/// Where an agent's console answer goes.
type ConsoleReply = oneshot::Sender<Result<Vec<u8>, String>>;

/// Capacity accounting, under one lock: the scheduler's host index (which counts what
/// each host holds) and where each VM holds its share.
struct Placement {
    sched: Scheduler,
    vms: HashMap<VmId, (HostId, u32, u64)>,
}

impl Placement {
    fn holds(&self, vm: VmId, host: HostId) -> bool {
        self.vms
            .get(&vm)
            .is_some_and(|(placed, _, _)| *placed == host)
    }

    fn new(policy: SchedPolicy) -> Placement {
        Placement {
            sched: Scheduler::new(policy),
            vms: HashMap::new(),
        }
    }

    fn add(&mut self, vm: VmId, host: HostId, vcpus: u32, memory_mib: u64) {
        if self.vms.insert(vm, (host, vcpus, memory_mib)).is_none() {
            self.sched.reserve(host, vcpus, memory_mib);
        }
    }

    /// Counts what is already placed, at start: each host enters the scheduler's index
    /// once with its totals, instead of being re-sorted in it once per VM (a million
    /// re-sorts were half of a restart at a million VMs).
    fn restore(&mut self, hosts: Vec<HostSlot>, shares: Vec<(VmId, HostId, u32, u64)>) {
        let mut used: HashMap<HostId, (u64, u64)> = HashMap::with_capacity(hosts.len());
        self.vms.reserve(shares.len());
        for (vm, host, vcpus, memory_mib) in shares {
            if self.vms.insert(vm, (host, vcpus, memory_mib)).is_none() {
                let total = used.entry(host).or_default();
                total.0 = total.0.saturating_add(u64::from(vcpus));
                total.1 = total.1.saturating_add(memory_mib);
            }
        }
        for mut slot in hosts {
            if let Some((vcpus, memory_mib)) = used.get(&slot.id) {
                slot.used_vcpus = slot.used_vcpus.saturating_add(*vcpus);
                slot.used_memory_mib = slot.used_memory_mib.saturating_add(*memory_mib);
            }
            self.sched.upsert_host(slot);
        }
    }

    fn release(&mut self, vm: VmId) {
        if let Some((host, vcpus, memory_mib)) = self.vms.remove(&vm) {
            self.sched.release(host, vcpus, memory_mib);
        }
    }

    /// The host a VM would go to: filter and weigh over the index, nothing counted.
    fn choose(&self, spec: &VmSpec) -> Result<HostId, NoFit> {
        self.sched.place(&Demand {
            hypervisor: spec.hypervisor.clone(),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
        })
    }
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
    pub store: Arc<Store>,
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
    console_waiters: Mutex<HashMap<u64, (HostId, ConsoleReply)>>,
    next_request: AtomicU64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded maps are rebuilt from the store on restart and every writer leaves
    // them consistent between statements, so a poisoned lock is safe to keep using.
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

pub(crate) fn valid_name(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 63
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !text.starts_with('-')
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
            console_waiters: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(1),
        };
        cloud.rebuild()?;
        Ok(cloud)
    }

    /// Rebuilds capacity accounting and liveness from the store after a start.
    fn rebuild(&self) -> Result<(), CloudError> {
        let hosts = self.store.hosts()?;
        let placed = self.store.placed_shares();
        let mut placement = lock(&self.placement);
        let mut live = lock(&self.live);
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
                },
            );
        }
        Ok(())
    }

    // ---- identity -------------------------------------------------------------------

    pub fn create_join_token(&self, ttl: Duration) -> Result<(String, i64), CloudError> {
        let token = auth::new_token("join");
        let expires = now_ms() + ttl.as_millis() as i64;
        self.store
            .insert_token(&auth::hash_token(&token), "join", "join", Some(expires))?;
        Ok((token, expires))
    }

    pub fn discovery(&self) -> Discovery {
        let base = self.config.public_url.trim_end_matches('/');
        let ws = if let Some(rest) = base.strip_prefix("https://") {
            format!("wss://{rest}")
        } else if let Some(rest) = base.strip_prefix("http://") {
            format!("ws://{rest}")
        } else {
            base.to_owned()
        };
        Discovery {
            server_version: env!("CARGO_PKG_VERSION").to_owned(),
            bus_url: format!("{ws}/v1/agent/bus"),
            image_store_url: format!("{base}/v1/images"),
            sync_interval_ms: self.config.sync_interval.as_millis() as u64,
            usage_interval_ms: self.config.usage_interval.as_millis() as u64,
        }
    }

    pub fn join(&self, request: &JoinRequest) -> Result<JoinResponse, CloudError> {
        let hostname = request.hostname.trim();
        if hostname.is_empty() || hostname.len() > 253 {
            return Err(invalid("hostname", "must be 1 to 253 characters"));
        }
        let host = Uuid::new_v4();
        // The certificate is issued before the token is spent, so a bad CSR does not
        // burn the token. Without a CA (plain HTTP) there is nothing to issue.
        let certificate_pem = match &self.ca {
            Some(ca) => Some(ca.sign_agent_csr(&request.csr_pem, host).map_err(|e| {
                let source = std::error::Error::source(&e).map(|s| format!(": {s}"));
                invalid("csr_pem", format!("{e}{}", source.unwrap_or_default()))
            })?),
            None => None,
        };
        let agent_token = auth::new_token("agt");
        let joined = self.store.join_host(
            &auth::hash_token(&request.join_token),
            host,
            hostname,
            &auth::hash_token(&agent_token),
        )?;
        if !joined {
            warn!(
                hostname,
                "join refused: unknown, used or expired join token"
            );
            return Err(CloudError::Unauthorized);
        }
        info!(%host, hostname, "host joined");
        Ok(JoinResponse {
            host_id: host,
            agent_token,
            certificate_pem,
            ca_pem: self.ca.as_ref().map(|ca| ca.pem().to_owned()),
            discovery: self.discovery(),
        })
    }

    // ---- VMs ------------------------------------------------------------------------

    fn validate_launch(&self, spec: LaunchSpec) -> Result<(String, VmSpec), CloudError> {
        if !valid_name(&spec.name) {
            return Err(invalid(
                "name",
                "must be 1 to 63 characters of a-z, 0-9 and '-', not starting with '-'",
            ));
        }
        let project = spec.project.unwrap_or_else(|| "default".into());
        if !valid_name(&project) {
            return Err(invalid(
                "project",
                "must be 1 to 63 characters of a-z, 0-9 and '-'",
            ));
        }
        let hypervisor = spec
            .hypervisor
            .unwrap_or_else(|| self.config.default_hypervisor.clone());
        if !HYPERVISORS.contains(&hypervisor.as_str()) {
            return Err(invalid(
                "hypervisor",
                format!("must be one of {}", HYPERVISORS.join(", ")),
            ));
        }
        let vcpus = spec.vcpus.unwrap_or(1);
        if !(1..=256).contains(&vcpus) {
            return Err(invalid("vcpus", "must be between 1 and 256"));
        }
        let memory_mib = spec.memory_mib.unwrap_or(256);
        if !(16..=1 << 20).contains(&memory_mib) {
            return Err(invalid(
                "memory_mib",
                "must be between 16 and 1048576 (1 TiB)",
            ));
        }
        let image = spec
            .image
            .unwrap_or_else(|| self.config.default_image.clone());
        if image.is_empty()
            || image.len() > 128
            || !image
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(invalid(
                "image",
                "must be 1 to 128 characters of A-Z, a-z, 0-9, '.', '_' and '-'",
            ));
        }
        if spec.command.len() > 64
            || spec.command.iter().map(|arg| arg.len()).sum::<usize>() > 16 * 1024
        {
            return Err(invalid(
                "command",
                "at most 64 arguments and 16 KiB in total",
            ));
        }
        let policy = self.validate_policy(&project, spec.policy)?;
        Ok((
            project,
            VmSpec {
                name: spec.name,
                hypervisor,
                vcpus,
                memory_mib,
                image,
                command: spec.command,
                policy,
                keep_running: spec.keep_running,
            },
        ))
    }

    /// Checks a policy for values that cannot be meant, and prices a cost cap that came
    /// without rates with the project's rate card.
    fn validate_policy(
        &self,
        project: &str,
        mut policy: PolicySpec,
    ) -> Result<PolicySpec, CloudError> {
        const YEAR_S: u64 = 366 * 86_400;
        let warn_ok = |warn: Option<u64>, field: &'static str| match warn {
            Some(0) => Err(invalid(
                field,
                "a warning must come before the action (> 0)",
            )),
            _ => Ok(()),
        };
        if let Some(lifespan) = &policy.lifespan {
            if lifespan.max_seconds.is_none() && lifespan.end_at.is_none() {
                return Err(invalid("policy.lifespan", "give max_seconds or end_at"));
            }
            if lifespan
                .max_seconds
                .is_some_and(|s| s == 0 || s > 100 * YEAR_S)
            {
                return Err(invalid(
                    "policy.lifespan.max_seconds",
                    "must be 1 s to 100 years",
                ));
            }
            warn_ok(lifespan.enforce.warn, "policy.lifespan.enforce.warn")?;
        }
        if let Some(idle) = &policy.idle {
            if idle.for_seconds == 0 || idle.for_seconds > YEAR_S {
                return Err(invalid("policy.idle.for_seconds", "must be 1 s to a year"));
            }
        }
        if let Some(overuse) = &policy.overuse {
            if overuse.cpu_above_permille.is_none()
                && overuse.mem_above_mib.is_none()
                && overuse.net_above_bps.is_none()
            {
                return Err(invalid(
                    "policy.overuse",
                    "give a CPU, memory or network threshold",
                ));
            }
            if overuse.for_seconds == 0 || overuse.for_seconds > YEAR_S {
                return Err(invalid(
                    "policy.overuse.for_seconds",
                    "must be 1 s to a year",
                ));
            }
        }
        if let Some(budget) = &policy.budget {
            if budget.cpu_seconds.is_none()
                && budget.mem_gib_hours_milli.is_none()
                && budget.net_bytes.is_none()
            {
                return Err(invalid(
                    "policy.budget",
                    "give a CPU, memory or network budget",
                ));
            }
            if budget.enforce.warn.is_some_and(|w| w == 0 || w >= 1000) {
                return Err(invalid(
                    "policy.budget.enforce.warn",
                    "thousandths of the budget, 1 to 999",
                ));
            }
        }
        if let Some(cap) = &mut policy.cost_cap {
            if cap.max_micros == 0 {
                return Err(invalid("policy.cost_cap.max_micros", "must be more than 0"));
            }
            if cap.enforce.warn.is_some_and(|w| w == 0 || w >= 1000) {
                return Err(invalid(
                    "policy.cost_cap.enforce.warn",
                    "thousandths of the cap, 1 to 999",
                ));
            }
            if cap.rates == RateCard::default() {
                cap.rates = self.rate_card(project)?.ok_or_else(|| {
                    invalid(
                        "policy.cost_cap",
                        format!("project {project:?} has no rate card to price a cost cap; an admin sets one with `herd rate-card set`"),
                    )
                })?;
            }
        }
        if let Some(errors) = &policy.errors {
            if errors.max_restarts > 1000 {
                return Err(invalid("policy.errors.max_restarts", "at most 1000"));
            }
        }
        if let Some(activation) = &policy.activation {
            if activation.start_at.is_none() && activation.after_vm.is_none() {
                return Err(invalid("policy.activation", "give start_at or after_vm"));
            }
        }
        Ok(policy)
    }

    /// Why a pending VM may not be placed yet, if its activation has not come.
    fn activation_wait(&self, vm: &VmRecord) -> Result<Option<String>, CloudError> {
        let Some(activation) = vm.policy.activation else {
            return Ok(None);
        };
        if let Some(start_at) = activation.start_at {
            if (now_ms() / 1000) < start_at as i64 {
                return Ok(Some(format!("waiting for its start time ({start_at})")));
            }
        }
        if let Some(after) = activation.after_vm {
            let completed = match self.store.vm(after)? {
                // Gone, or ended: the awaited VM has completed.
                None => true,
                Some(other) => {
                    matches!(other.observed, VmState::Stopped | VmState::Terminated)
                        || self.guest(after).is_some_and(|g| g.exit_code.is_some())
                }
            };
            if !completed {
                return Ok(Some(format!("waiting for VM {after} to complete")));
            }
        }
        Ok(None)
    }

    /// Tries to place a VM; on success the capacity is already counted.
    fn try_place(&self, vm: VmId, spec: &VmSpec) -> Result<HostId, String> {
        let mut placement = lock(&self.placement);
        let host = placement.choose(spec).map_err(|e| e.to_string())?;
        placement.add(vm, host, spec.vcpus, spec.memory_mib);
        Ok(host)
    }

    pub fn launch(&self, spec: LaunchSpec) -> Result<VmRecord, CloudError> {
        let mut launched = self.launch_batch(spec, None)?;
        launched
            .pop()
            .ok_or_else(|| invalid("count", "nothing launched"))
    }

    /// Most VMs one batch launch may create.
    pub const MAX_BATCH: u32 = 1000;

    /// Launches one VM, or with `count` that many alike, named `{name}-1` to
    /// `{name}-{count}`: validated, quota-checked, placed one by one (each an honest
    /// filter and weigh with its capacity counted) and inserted in one transaction, all
    /// or none.
    pub fn launch_batch(
        &self,
        spec: LaunchSpec,
        count: Option<u32>,
    ) -> Result<Vec<VmRecord>, CloudError> {
        let names: Vec<String> = match count {
            None => vec![spec.name.clone()],
            Some(n) if (1..=Self::MAX_BATCH).contains(&n) => {
                let names: Vec<String> = (1..=n).map(|i| format!("{}-{i}", spec.name)).collect();
                if names.iter().any(|name| !valid_name(name)) {
                    return Err(invalid(
                        "name",
                        format!(
                            "{:?} with a suffix up to -{n} must be at most 63 characters of \
                             a-z, 0-9 and '-'",
                            spec.name
                        ),
                    ));
                }
                names
            }
            Some(_) => {
                return Err(invalid(
                    "count",
                    format!("must be between 1 and {}", Self::MAX_BATCH),
                ))
            }
        };
        let (project, spec) = self.validate_launch(spec)?;
        let now = now_ms();
        let n = names.len() as u64;
        // Hold the placement lock across the quota check and the insert, so that the
        // capacity and quota counted here and the durable rows appear together.
        let mut placement = lock(&self.placement);
        self.check_quota(&project, n, spec.vcpus, spec.memory_mib)?;
        let activation_pending = spec.policy.activation.is_some();
        let mut rows = Vec::with_capacity(names.len());
        for name in names {
            let id = Uuid::now_v7();
            let choice = if activation_pending {
                // Placed by the reconciler once its activation comes.
                Err("waiting for its activation".to_owned())
            } else {
                placement.choose(&spec).map_err(|e| e.to_string())
            };
            let (host, observed, message) = match choice {
                Ok(host) => (
                    Some(host),
                    VmState::Scheduled,
                    format!("launched; scheduled on host {host}"),
                ),
                Err(why) => (None, VmState::Pending, format!("launched; {why}")),
            };
            // Counted now, so the next VM of the batch sees this one's share.
            if let Some(host) = host {
                placement.add(id, host, spec.vcpus, spec.memory_mib);
            }
            let record = VmRecord {
                id,
                name,
                project: project.clone(),
                hypervisor: spec.hypervisor.clone(),
                vcpus: spec.vcpus,
                memory_mib: spec.memory_mib,
                image: spec.image.clone(),
                command: spec.command.clone(),
                policy: spec.policy,
                keep_running: spec.keep_running,
                host,
                desired: VmState::Running,
                generation: 1,
                issued_generation: 0,
                observed,
                observed_at_ms: now,
                last_error: None,
                deleting: false,
                created_at_ms: now,
                updated_at_ms: now,
            };
            let event = NewEvent {
                vm: Some(id),
                host,
                kind: "vm.launched",
                from: None,
                to: Some(observed),
                message,
            };
            rows.push((record, event));
        }
        if let Err(e) = self.store.insert_vms(&rows) {
            for (record, _) in &rows {
                placement.release(record.id);
            }
            return Err(e.into());
        }
        drop(placement);
        self.reconcile_now.notify_one();
        Ok(rows.into_iter().map(|(record, _)| record).collect())
    }

    pub fn vm(&self, id: &str) -> Result<VmRecord, CloudError> {
        let not_found = || CloudError::NotFound {
            kind: "VM",
            id: id.to_owned(),
        };
        let uuid: Uuid = id.parse().map_err(|_| not_found())?;
        let vm = self.store.vm(uuid)?.ok_or_else(not_found)?;
        Ok(self.current(vm))
    }

    /// A page of VMs. Each shows its newest observed state; a filter on the state
    /// matches what the store holds, which trails the newest reports by the
    /// write-behind's backlog (normally well under a second).
    pub fn list_vms(&self, filter: &VmFilter) -> Result<Vec<VmRecord>, CloudError> {
        let page = self.store.list_vms(filter)?;
        Ok(page.into_iter().map(|vm| self.current(vm)).collect())
    }

    pub fn act(&self, id: &str, action: Action) -> Result<VmRecord, CloudError> {
        let vm = self.vm(id)?;
        if vm.deleting {
            return Err(CloudError::Conflict {
                code: "vm_deleting",
                message: format!("VM {} is being deleted", vm.name),
            });
        }
        let target = action.target();
        if vm.desired == target {
            return Ok(vm);
        }
        if !action.allowed_in(vm.observed) {
            return Err(CloudError::Conflict {
                code: "invalid_transition",
                message: format!(
                    "cannot {action} VM {}: it is {} (see the lifecycle state flow)",
                    vm.name, vm.observed
                ),
            });
        }
        self.store.set_desired(
            vm.id,
            target,
            false,
            &NewEvent {
                vm: Some(vm.id),
                host: vm.host,
                kind: "vm.action",
                message: format!("{action} requested: desired state {target}"),
                ..NewEvent::default()
            },
        )?;
        self.reconcile_now.notify_one();
        self.vm(id)
    }

    /// Deletes a VM: terminates it on its host, then drops the record. Returns `None`
    /// when the record is gone already (the VM was never on a host).
    pub fn delete(&self, id: &str) -> Result<Option<VmRecord>, CloudError> {
        let vm = self.vm(id)?;
        if vm.host.is_none() || vm.observed.is_final() {
            self.store.observe(&[Observation {
                vm: vm.id,
                state: VmState::Purged,
                purge: true,
                events: vec![NewEvent {
                    vm: Some(vm.id),
                    host: vm.host,
                    kind: "vm.purged",
                    from: Some(vm.observed),
                    to: Some(VmState::Purged),
                    message: "deleted".into(),
                }],
            }])?;
            lock(&self.placement).release(vm.id);
            return Ok(None);
        }
        self.store.set_desired(
            vm.id,
            VmState::Terminated,
            true,
            &NewEvent {
                vm: Some(vm.id),
                host: vm.host,
                kind: "vm.action",
                message: "delete requested: terminate, then purge".into(),
                ..NewEvent::default()
            },
        )?;
        self.reconcile_now.notify_one();
        Ok(Some(self.vm(id)?))
    }

    pub fn guest(&self, id: VmId) -> Option<GuestInfo> {
        lock(&self.guests).get(&id).cloned()
    }

    /// Records a guest report relayed by the VM's host. Returns false if the VM is not
    /// placed on that host (the report is dropped).
    pub fn record_guest(
        &self,
        host: HostId,
        vm: VmId,
        report: &GuestReport,
    ) -> Result<bool, CloudError> {
        if !self.vm_on_host(vm, host) {
            return Ok(false);
        }
        if let GuestReport::PolicyAction { action, rule, .. } = report {
            if !self.policy_allows(vm, *action)? {
                warn!(%vm, %host, rule, action = action.as_str(), "guest claimed an action its policy does not have; ignored");
                return Ok(false);
            }
        }
        let now = now_ms();
        let event = {
            let mut guests = lock(&self.guests);
            let info = guests.entry(vm).or_default();
            info.last_report_at_ms = now;
            match report {
                GuestReport::Hello { guest_version } => {
                    // A guest greets at boot and again when its host greets it: one
                    // event per boot is enough.
                    let repeated = info
                        .hello_at_ms
                        .is_some_and(|at| now.saturating_sub(at) < 10_000);
                    *info = GuestInfo {
                        version: Some(guest_version.clone()),
                        hello_at_ms: Some(now),
                        last_report_at_ms: now,
                        ..GuestInfo::default()
                    };
                    (!repeated).then(|| {
                        (
                            "vm.guest",
                            format!("guest module {guest_version} said hello"),
                        )
                    })
                }
                GuestReport::Status {
                    uptime_ms,
                    workload_running,
                    guest_rss_kib,
                } => {
                    info.uptime_ms = Some(*uptime_ms);
                    info.workload_running = Some(*workload_running);
                    info.guest_rss_kib = Some(*guest_rss_kib);
                    None
                }
                GuestReport::WorkloadExit { code } => {
                    info.exit_code = Some(*code);
                    info.workload_running = Some(false);
                    Some((
                        "vm.workload_exit",
                        format!("workload exited with code {code}"),
                    ))
                }
                GuestReport::Error { message } => {
                    info.last_error = Some(message.clone());
                    Some(("vm.guest_error", format!("guest reports: {message}")))
                }
                GuestReport::PolicyWarning { rule, message } => {
                    Some(("vm.policy_warning", format!("{rule}: {message}")))
                }
                GuestReport::PolicyAction {
                    rule,
                    action,
                    reason,
                } => Some((
                    "vm.policy_action",
                    format!("{rule}: {} ({reason}), by the guest", action.as_str()),
                )),
                GuestReport::PolicyProgress { items } => {
                    info.policy_progress = items.clone();
                    None
                }
            }
        };
        if let Some((kind, message)) = event {
            self.store.append_event(&NewEvent {
                vm: Some(vm),
                host: Some(host),
                kind,
                message,
                ..NewEvent::default()
            })?;
        }
        if let GuestReport::PolicyAction { rule, action, .. } = report {
            self.policy_desired(vm, *action, &format!("policy {rule} (guest)"))?;
        }
        Ok(true)
    }

    /// The agent's backstop enforced a policy on one of its VMs.
    pub fn record_backstop(
        &self,
        host: HostId,
        vm: VmId,
        rule: &str,
        action: PolicyAction,
        reason: &str,
    ) -> Result<bool, CloudError> {
        if !self.vm_on_host(vm, host) || !self.policy_allows(vm, action)? {
            return Ok(false);
        }
        self.store.append_event(&NewEvent {
            vm: Some(vm),
            host: Some(host),
            kind: "vm.policy_action",
            message: format!(
                "{rule}: {} ({reason}), by the host's backstop",
                action.as_str()
            ),
            ..NewEvent::default()
        })?;
        self.policy_desired(vm, action, &format!("policy {rule} (host backstop)"))?;
        Ok(true)
    }

    fn policy_allows(&self, vm: VmId, action: PolicyAction) -> Result<bool, CloudError> {
        Ok(self
            .store
            .vm(vm)?
            .is_some_and(|record| record.policy.allows(action)))
    }

    /// Makes a policy action the VM's desired state, so the reconciler carries it out
    /// and a later restart does not undo it.
    fn policy_desired(&self, vm: VmId, action: PolicyAction, why: &str) -> Result<(), CloudError> {
        let target = match action {
            PolicyAction::Notify => return Ok(()),
            PolicyAction::Suspend => VmState::Suspended,
            PolicyAction::Stop => VmState::Stopped,
            PolicyAction::Terminate => VmState::Terminated,
        };
        let Some(record) = self.store.vm(vm)? else {
            return Ok(());
        };
        if record.desired == target || record.desired == VmState::Terminated {
            return Ok(());
        }
        self.store.set_desired(
            vm,
            target,
            false,
            &NewEvent {
                vm: Some(vm),
                host: record.host,
                kind: "vm.action",
                message: format!("{why}: desired state {target}"),
                ..NewEvent::default()
            },
        )?;
        self.reconcile_now.notify_one();
        Ok(())
    }

    pub fn vm_usage(&self, id: VmId) -> Option<(VmUsage, i64)> {
        lock(&self.usage).get(&id).copied()
    }

    // ---- hosts ----------------------------------------------------------------------

    pub fn hosts(&self) -> Result<Vec<HostStatus>, CloudError> {
        let hosts = self.store.hosts()?;
        let live = lock(&self.live);
        let placement = lock(&self.placement);
        Ok(hosts
            .into_iter()
            .map(|host| self.status_of(host, &live, &placement))
            .collect())
    }

    pub fn host(&self, id: &str) -> Result<HostStatus, CloudError> {
        let not_found = || CloudError::NotFound {
            kind: "host",
            id: id.to_owned(),
        };
        let uuid: Uuid = id.parse().map_err(|_| not_found())?;
        let host = self.store.host(uuid)?.ok_or_else(not_found)?;
        Ok(self.status_of(host, &lock(&self.live), &lock(&self.placement)))
    }

    /// A host's record with what the server knows now: liveness is judged in memory
    /// and reaches the store behind the reports before it, so memory has the word.
    fn status_of(
        &self,
        mut record: HostRecord,
        live: &HashMap<HostId, HostLive>,
        placement: &Placement,
    ) -> HostStatus {
        let used = placement
            .sched
            .host(record.id)
            .map(|slot| (slot.used_vcpus, slot.used_memory_mib))
            .unwrap_or((0, 0));
        let live = live.get(&record.id).cloned();
        if let Some(live) = &live {
            record.up = !live.down;
        }
        HostStatus {
            record,
            live,
            allocated_vcpus: used.0,
            allocated_memory_mib: used.1,
        }
    }

    /// The last `max_bytes` of a VM's serial console, fetched from its host.
    pub async fn console(&self, id: &str, max_bytes: u32) -> Result<Vec<u8>, CloudError> {
        let vm = self.vm(id)?;
        let unreachable = |why: String| CloudError::Conflict {
            code: "host_unreachable",
            message: why,
        };
        let Some(host) = vm.host else {
            return Err(CloudError::Conflict {
                code: "not_placed",
                message: format!("VM {} is not on a host yet", vm.name),
            });
        };
        let sender = lock(&self.outbox)
            .get(&host)
            .map(|(_, sender)| sender.clone())
            .ok_or_else(|| unreachable(format!("the host of VM {} is not connected", vm.name)))?;
        let request = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.console_waiters).insert(request, (host, tx));
        let sent = sender.send(ServerMsg::ConsoleRequest {
            request,
            vm: vm.id,
            max_bytes,
        });
        if sent.is_err() {
            lock(&self.console_waiters).remove(&request);
            return Err(unreachable("the host disconnected".into()));
        }
        let answer = tokio::time::timeout(Duration::from_secs(10), rx).await;
        lock(&self.console_waiters).remove(&request);
        match answer {
            Ok(Ok(Ok(bytes))) => Ok(bytes),
            Ok(Ok(Err(e))) => Err(unreachable(format!(
                "the host could not read the console: {e}"
            ))),
            Ok(Err(_)) => Err(unreachable("the host disconnected".into())),
            Err(_) => Err(unreachable("the host did not answer within 10 s".into())),
        }
    }

    /// Registers a connected agent's session for out-of-queue messages.
    pub fn open_outbox(&self, host: HostId, session: u64) -> mpsc::UnboundedReceiver<ServerMsg> {
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.outbox).insert(host, (session, tx));
        rx
    }

    pub fn close_outbox(&self, host: HostId, session: u64) {
        let mut outbox = lock(&self.outbox);
        if outbox
            .get(&host)
            .is_some_and(|(current, _)| *current == session)
        {
            outbox.remove(&host);
        }
    }

    /// An agent's answer to a console request; only the host asked may answer.
    pub fn console_answer(
        &self,
        host: HostId,
        request: u64,
        result: Result<Vec<u8>, String>,
    ) -> bool {
        let mut waiters = lock(&self.console_waiters);
        match waiters.get(&request) {
            Some((asked, _)) if *asked == host => {
                if let Some((_, tx)) = waiters.remove(&request) {
                    let _ = tx.send(result);
                }
                true
            }
            _ => false,
        }
    }

    // ---- agent side: called by the bus session ---------------------------------------

    /// A host said hello: record it, mark it up, open a new session. Returns the
    /// session number.
    pub fn host_hello(
        &self,
        host: HostId,
        hostname: &str,
        hypervisors: &[HypervisorInfo],
        cpus: u32,
        memory_mib: u64,
        agent_version: &str,
    ) -> Result<u64, CloudError> {
        // A second live session for one host is either a stolen credential or a
        // confused agent; neither may take over the host's VMs. A session that has
        // gone quiet for a few intervals is presumed dead and may be replaced, so an
        // agent whose old connection broke without a close gets back in.
        let quiet_after = (self.config.sync_interval * 3).min(self.config.host_grace);
        if let Some(live) = lock(&self.live).get_mut(&host) {
            if live.connected && live.last_seen.elapsed() < quiet_after {
                return Err(CloudError::Conflict {
                    code: "host_connected",
                    message: format!(
                        "host {host} already has a live agent session (seen {} ms ago)",
                        live.last_seen.elapsed().as_millis()
                    ),
                });
            }
            // The hello is a word from the host: no host-down mark may be queued
            // while the store records it up (see `GroupCommit::host_up`).
            live.last_seen = Instant::now();
        }
        self.commits.host_up(host);
        let came_back =
            self.store
                .host_hello(host, hostname, hypervisors, cpus, memory_mib, agent_version)?;
        {
            let mut placement = lock(&self.placement);
            // Keep what the host holds; take its new size and hypervisors.
            let mut slot = placement.sched.host(host).cloned().unwrap_or(HostSlot {
                id: host,
                up: true,
                hypervisors: vec![],
                cpus: 0,
                memory_mib: 0,
                used_vcpus: 0,
                used_memory_mib: 0,
            });
            slot.up = true;
            slot.cpus = cpus;
            slot.memory_mib = memory_mib;
            slot.hypervisors = hypervisors.iter().map(|h| h.kind.clone()).collect();
            placement.sched.upsert_host(slot);
        }
        let session = {
            let mut live = lock(&self.live);
            let entry = live.entry(host).or_insert_with(|| HostLive {
                last_seen: Instant::now(),
                util: HostUtil::default(),
                down: false,
                needs_resync: false,
                session: 0,
                connected: false,
            });
            entry.last_seen = Instant::now();
            entry.down = false;
            entry.needs_resync = false;
            entry.connected = true;
            entry.session += 1;
            entry.session
        };
        if came_back {
            info!(%host, hostname, "host is up");
        }
        // Pending VMs may fit now.
        self.reconcile_now.notify_one();
        Ok(session)
    }

    /// Records that a host was heard from. Returns false if `session` was replaced by
    /// a newer connection, and whether the host must resync (it had been marked down).
    pub fn host_seen(&self, host: HostId, session: u64, util: Option<HostUtil>) -> (bool, bool) {
        let mut live = lock(&self.live);
        let Some(entry) = live.get_mut(&host) else {
            return (false, false);
        };
        if entry.session != session {
            return (false, false);
        }
        entry.last_seen = Instant::now();
        if let Some(util) = util {
            entry.util = util;
        }
        let resync = std::mem::take(&mut entry.needs_resync);
        (true, resync)
    }

    /// Records that a host was heard from, without taking its resync flag: for a frame
    /// read ahead, which is handled (and sees the flag) later.
    pub fn host_heard(&self, host: HostId, session: u64) {
        if let Some(entry) = lock(&self.live).get_mut(&host) {
            if entry.session == session {
                entry.last_seen = Instant::now();
            }
        }
    }

    /// Whether `session` is still the host's newest connection.
    pub fn session_current(&self, host: HostId, session: u64) -> bool {
        lock(&self.live)
            .get(&host)
            .is_some_and(|entry| entry.session == session)
    }

    pub fn host_disconnected(&self, host: HostId, session: u64) {
        if let Some(entry) = lock(&self.live).get_mut(&host) {
            if entry.session == session {
                entry.connected = false;
            }
        }
    }

    /// Marks the host up again after it had been marked down with its connection open.
    pub fn host_back(&self, host: HostId) -> Result<(), CloudError> {
        let Some(record) = self.store.host(host)? else {
            return Ok(());
        };
        self.commits.host_up(host);
        self.store.host_hello(
            host,
            &record.hostname,
            &record.hypervisors,
            record.cpus,
            record.memory_mib,
            record.agent_version.as_deref().unwrap_or(""),
        )?;
        lock(&self.placement).sched.set_up(host, true);
        if let Some(entry) = lock(&self.live).get_mut(&host) {
            entry.down = false;
        }
        Ok(())
    }

    /// What the ingest checks a reported VM against, with a reported state that is
    /// still on its way to the store laid over it.
    pub fn vm_brief(&self, vm: VmId) -> Result<Option<VmBrief>, CloudError> {
        let Some(mut brief) = self.store.vm_brief(vm)? else {
            return Ok(None);
        };
        if let Some(observed) = self.commits.observed(vm) {
            brief.observed = observed;
        }
        Ok(Some(brief))
    }

    /// Lays what is still on its way to the store over a record read from it, so the
    /// API shows what the server knows now: a newer reported state, or `unknown` for a
    /// VM whose host was just marked down (as the store will say once the mark is
    /// written).
    pub fn current(&self, mut vm: VmRecord) -> VmRecord {
        if let Some(observed) = self.commits.observed(vm.id) {
            vm.observed = observed;
        }
        let host_down = vm
            .host
            .is_some_and(|host| lock(&self.live).get(&host).is_some_and(|live| live.down));
        if host_down && reported_by_host(vm.observed) {
            vm.observed = VmState::Unknown;
        }
        vm
    }

    /// Whether the VM is placed on this host, if the placement map is free to look at:
    /// `false` also when a launch holds it while writing its batch, and the ingest,
    /// which asks for every reported change, then asks the store instead of waiting.
    pub fn vm_on_host_now(&self, vm: VmId, host: HostId) -> bool {
        let placement = match self.placement.try_lock() {
            Ok(placement) => placement,
            Err(std::sync::TryLockError::Poisoned(poison)) => poison.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return false,
        };
        placement.holds(vm, host)
    }

    /// Whether the VM is currently placed on this host (node restriction).
    pub fn vm_on_host(&self, vm: VmId, host: HostId) -> bool {
        lock(&self.placement).holds(vm, host)
    }

    pub fn release(&self, vm: VmId) {
        lock(&self.placement).release(vm);
        lock(&self.usage).remove(&vm);
        lock(&self.guests).remove(&vm);
    }

    /// Meters a usage batch from a host: stored once per (VM, instant), so a
    /// retransmitted batch changes nothing. Returns how many entries were dropped
    /// because their VM is not placed on that host.
    pub async fn record_usage(
        &self,
        host: HostId,
        sampled_at_ms: u64,
        usage: &[VmUsage],
    ) -> Result<usize, CloudError> {
        let (n_rejected, written) = self.hand_over_usage(host, sampled_at_ms, usage);
        written.durable().await?;
        Ok(n_rejected)
    }

    /// Like [`Cloud::record_usage`], returning at once: the samples are on disk when
    /// the returned handle resolves.
    pub fn hand_over_usage(
        &self,
        host: HostId,
        sampled_at_ms: u64,
        usage: &[VmUsage],
    ) -> (usize, Pending) {
        let now = now_ms();
        let mut n_rejected = 0;
        let mut rows = Vec::with_capacity(usage.len());
        {
            let placement = lock(&self.placement);
            let mut table = lock(&self.usage);
            for entry in usage {
                if placement
                    .vms
                    .get(&entry.vm)
                    .is_some_and(|(placed, _, _)| *placed == host)
                {
                    table.insert(entry.vm, (*entry, now));
                    rows.push((
                        entry.vm,
                        UsageRow {
                            sampled_at_ms: sampled_at_ms as i64,
                            cpu_ms: entry.cpu_ms,
                            mem_kib: entry.mem_kib,
                            net_bytes: entry.net_rx_bytes.saturating_add(entry.net_tx_bytes),
                            disk_bytes: entry
                                .disk_read_bytes
                                .saturating_add(entry.disk_write_bytes),
                        },
                    ));
                } else {
                    n_rejected += 1;
                }
            }
        }
        (n_rejected, self.commits.hand_over(None, Vec::new(), rows))
    }

    // ---- billing --------------------------------------------------------------------

    pub fn set_rate_card(&self, project: &str, card: &RateCard) -> Result<(), CloudError> {
        self.project(project)?;
        if card.peak_start_hour > 24 || card.peak_end_hour > 24 {
            return Err(invalid("peak_start_hour", "peak hours are 0 to 24 (UTC)"));
        }
        let json = serde_json::to_string(card).map_err(|e| invalid("rate card", e.to_string()))?;
        self.store.set_rate_card(project, &json)?;
        Ok(())
    }

    pub fn rate_card(&self, project: &str) -> Result<Option<RateCard>, CloudError> {
        self.store
            .rate_card(project)?
            .map(|json| {
                serde_json::from_str(&json)
                    .map_err(|e| CloudError::Store(StoreError::Corrupt(format!("rate card: {e}"))))
            })
            .transpose()
    }

    /// Every VM's charges over `[from_ms, to_ms)`, priced by its project's rate card.
    /// VMs of projects without a rate card cost nothing (their usage still shows).
    pub fn bill(
        &self,
        project: Option<&str>,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<BillLine>, CloudError> {
        let to_ms = to_ms.min(now_ms());
        let mut cards: HashMap<String, RateCard> = HashMap::new();
        let mut lines = Vec::new();
        for vm in self.store.ledger(project)? {
            if !cards.contains_key(&vm.project) {
                let card = self.rate_card(&vm.project)?.unwrap_or_default();
                cards.insert(vm.project.clone(), card);
            }
            let rates = cards.get(&vm.project).copied().unwrap_or_default();
            let history = self.store.state_history(vm.vm)?;
            let samples = self.store.usage_samples(vm.vm, to_ms)?;
            let line = billing::bill_vm(&rates, &vm, &history, &samples, from_ms, to_ms);
            if line.billed_ms > 0 || line.cpu_ms > 0 || line.net_bytes > 0 {
                lines.push(line);
            }
        }
        Ok(lines)
    }

    // ---- background work ------------------------------------------------------------

    /// Time-based policies the server can judge by itself: a VM past its lifespan is
    /// given its action as desired state, a little after the guest should have acted.
    /// This also keeps a queued "run" command from reviving a VM whose lifespan ended
    /// while nobody was listening: the new generation supersedes it in the queue.
    fn enforce_lifespans(&self) -> Result<(), CloudError> {
        const GRACE_MS: i64 = 5_000;
        let now = now_ms();
        for vm in self.store.vms_with_lifespan()? {
            let Some(lifespan) = vm.policy.lifespan else {
                continue;
            };
            let by_duration = lifespan.max_seconds.map(|s| {
                vm.created_at_ms
                    .saturating_add((s as i64).saturating_mul(1000))
            });
            let by_time = lifespan.end_at.map(|t| (t as i64).saturating_mul(1000));
            let Some(deadline) = by_duration.into_iter().chain(by_time).min() else {
                continue;
            };
            if now >= deadline.saturating_add(GRACE_MS) {
                self.policy_desired(vm.id, lifespan.enforce.action, "policy lifespan (server)")?;
            }
        }
        Ok(())
    }

    /// One pass of the reconciler: enforce lifespans, place pending VMs, send commands
    /// for desired states not yet sent. Works in slices of [`RECONCILE_SLICE`] VMs, each
    /// slice's commands queued and recorded in one write each.
    pub async fn reconcile_once(&self) -> Result<(), CloudError> {
        crate::blocking(|| self.enforce_lifespans())?;
        let mut after = None;
        loop {
            let slice = crate::blocking(|| self.store.vms_needing_work(after, RECONCILE_SLICE))?;
            let Some(last) = slice.last() else {
                return Ok(());
            };
            after = Some(last.id);
            let full = slice.len() == RECONCILE_SLICE;
            let commands = crate::blocking(|| -> Result<_, CloudError> {
                let mut commands = Vec::new();
                for vm in slice {
                    match vm.host {
                        None => {
                            if let Some(host) = self.place_pending(&vm)? {
                                commands.push((host, vm));
                            }
                        }
                        Some(host) => commands.push((host, vm)),
                    }
                }
                Ok(commands)
            })?;
            self.publish(&commands).await?;
            if !full {
                return Ok(());
            }
        }
    }

    /// Places a VM that has no host yet, if it may and can be; or ends it, if it was
    /// terminated first. Returns its new host.
    fn place_pending(&self, vm: &VmRecord) -> Result<Option<HostId>, CloudError> {
        if vm.desired == VmState::Terminated {
            self.store.observe(&[Observation {
                vm: vm.id,
                state: VmState::Terminated,
                purge: vm.deleting,
                events: vec![NewEvent {
                    vm: Some(vm.id),
                    kind: "vm.state",
                    from: Some(vm.observed),
                    to: Some(VmState::Terminated),
                    message: "terminated before it was placed".into(),
                    ..NewEvent::default()
                }],
            }])?;
            lock(&self.pending_reasons).remove(&vm.id);
            return Ok(None);
        }
        let why = match self.activation_wait(vm)? {
            Some(why) => why,
            None => match self.try_place(vm.id, &spec_of(vm)) {
                Ok(host) => {
                    if let Err(e) = self.store.assign_host(
                        vm.id,
                        host,
                        &NewEvent {
                            vm: Some(vm.id),
                            host: Some(host),
                            kind: "vm.state",
                            from: Some(VmState::Pending),
                            to: Some(VmState::Scheduled),
                            message: format!("scheduled on host {host}"),
                        },
                    ) {
                        self.release(vm.id);
                        return Err(e.into());
                    }
                    lock(&self.pending_reasons).remove(&vm.id);
                    return Ok(Some(host));
                }
                Err(reason) => format!("waiting for capacity: {reason}"),
            },
        };
        // Say why once, not every pass.
        let mut reasons = lock(&self.pending_reasons);
        if reasons.get(&vm.id) != Some(&why) {
            reasons.insert(vm.id, why.clone());
            drop(reasons);
            self.store.append_event(&NewEvent {
                vm: Some(vm.id),
                kind: "vm.pending",
                message: why,
                ..NewEvent::default()
            })?;
        }
        Ok(None)
    }

    /// Queues each VM's command for its desired state on its host, then records them
    /// as queued.
    async fn publish(&self, vms: &[(HostId, VmRecord)]) -> Result<(), CloudError> {
        if vms.is_empty() {
            return Ok(());
        }
        let commands: Vec<(HostId, Command)> = vms
            .iter()
            .map(|(host, vm)| {
                let command = Command {
                    id: CommandId {
                        vm: vm.id,
                        generation: vm.generation,
                    },
                    spec: spec_of(vm),
                    target: vm.desired,
                };
                (*host, command)
            })
            .collect();
        // Queue first, then record; a crash in between re-queues the same ids, which
        // the bus keeps once.
        self.bus.publish(&commands).await?;
        let issued: Vec<(VmId, u64)> = vms.iter().map(|(_, vm)| (vm.id, vm.generation)).collect();
        crate::blocking(|| self.store.mark_issued(&issued))?;
        self.metrics
            .commands_published
            .fetch_add(commands.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Marks hosts down whose last word is older than the grace period. Returns when
    /// the next host that is still up falls due if nobody hears from it.
    pub fn check_liveness(&self) -> Result<Option<Instant>, CloudError> {
        let grace = self.config.host_grace;
        let now = Instant::now();
        let mut overdue = Vec::new();
        let mut next_deadline: Option<Instant> = None;
        for (id, live) in lock(&self.live).iter().filter(|(_, live)| !live.down) {
            // Not heard from since this server started: every agent reconnects at
            // once after a restart, which takes a while for thousands of them, and
            // marking the late ones down would only add to the work.
            let grace = if live.session == 0 {
                grace * RESTART_GRACE_FACTOR
            } else {
                grace
            };
            let deadline = live.last_seen + grace;
            if deadline <= now {
                overdue.push((*id, grace));
            } else {
                next_deadline = Some(next_deadline.map_or(deadline, |next| next.min(deadline)));
            }
        }
        for (host, grace) in overdue {
            // Written in order with the reports before it; the writer logs it.
            let why = format!("no report for {} s", grace.as_secs_f64());
            drop(self.commits.host_down(host, why));
            lock(&self.placement).sched.set_up(host, false);
            if let Some(live) = lock(&self.live).get_mut(&host) {
                live.down = true;
                live.needs_resync = true;
            }
            Metrics::inc(&self.metrics.hosts_marked_down);
        }
        Ok(next_deadline)
    }

    /// Runs the reconciler and the liveness check until the process ends.
    pub async fn run_background(self: std::sync::Arc<Self>) {
        {
            // The grace after a start counts from when agents can reach the server,
            // not from when the store was opened.
            let now = Instant::now();
            for live in lock(&self.live).values_mut().filter(|l| l.session == 0) {
                live.last_seen = now;
            }
        }
        let cloud = self.clone();
        tokio::spawn(async move {
            loop {
                let next_deadline = cloud.check_liveness().unwrap_or_else(|e| {
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

pub fn spec_of(vm: &VmRecord) -> VmSpec {
    VmSpec {
        name: vm.name.clone(),
        hypervisor: vm.hypervisor.clone(),
        vcpus: vm.vcpus,
        memory_mib: vm.memory_mib,
        image: vm.image.clone(),
        command: vm.command.clone(),
        policy: vm.policy,
        keep_running: vm.keep_running,
    }
}

fn slot_of(host: &HostRecord) -> HostSlot {
    HostSlot {
        id: host.id,
        up: host.up,
        hypervisors: host.hypervisors.iter().map(|h| h.kind.clone()).collect(),
        cpus: host.cpus,
        memory_mib: host.memory_mib,
        used_vcpus: 0,
        used_memory_mib: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restoring_at_start_counts_as_placing_one_by_one() {
        let host = |n: u128, cpus: u32| HostSlot {
            id: HostId::from_u128(n),
            up: true,
            hypervisors: vec!["sim".into()],
            cpus,
            memory_mib: 4096,
            used_vcpus: 0,
            used_memory_mib: 0,
        };
        let hosts = vec![host(1, 8), host(2, 4)];
        let share = |vm: u128, host: u128, vcpus: u32, memory_mib: u64| {
            (
                VmId::from_u128(vm),
                HostId::from_u128(host),
                vcpus,
                memory_mib,
            )
        };
        let shares = vec![
            share(10, 1, 2, 512),
            share(11, 1, 1, 256),
            share(12, 2, 4, 1024),
            // Listed twice: held once.
            share(10, 1, 2, 512),
        ];
        let mut restored = Placement::new(SchedPolicy::default());
        restored.restore(hosts.clone(), shares.clone());
        let mut placed = Placement::new(SchedPolicy::default());
        for slot in hosts {
            placed.sched.upsert_host(slot);
        }
        for (vm, host, vcpus, memory_mib) in shares {
            placed.add(vm, host, vcpus, memory_mib);
        }
        for id in [1, 2] {
            let id = HostId::from_u128(id);
            assert_eq!(restored.sched.host(id), placed.sched.host(id));
        }
        assert_eq!(restored.vms, placed.vms);
        assert_eq!(
            restored
                .sched
                .host(HostId::from_u128(1))
                .map(|slot| slot.used_vcpus),
            Some(3)
        );
        let demand = Demand {
            hypervisor: "sim".into(),
            vcpus: 2,
            memory_mib: 256,
        };
        assert_eq!(restored.sched.place(&demand), placed.sched.place(&demand));
    }
}
