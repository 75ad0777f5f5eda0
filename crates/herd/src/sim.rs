//! `herd sim`: thousands of simulated hosts in one process against a real server, to
//! measure how herd behaves at scale: the server is the real one, the agents run the
//! real sync code, and only the hypervisor is simulated.
//!
//! Each simulated host is the real agent (`herd_agent::Agent::run`) with the `sim`
//! driver, speaking the real protocol over its own mTLS connection. Only what would
//! measure this machine instead of herd is switched off: the agents keep their sync
//! state in memory (no fsync per report per host), sim VMs live in memory and are
//! carried across runs as snapshots in the sim's data dir, and simulated usage
//! counters are off unless asked for.
//!
//! What it measures, through the agents' [`SyncProbe`]:
//! - **sync lag**: for a VM flipped between running and paused as if by its guest, the
//!   time from the flip until the agent holds the server's ack covering the report
//!   that carried it (acks are cumulative, so a later ack counts);
//! - **resync**: when every agent loses its server (the server restarted), the time
//!   from the first disconnect until every agent holds an ack of a full report again;
//! - **failure detection**: with `--kill-hosts`, how long the server takes to mark an
//!   abruptly vanished host down.
//!
//! A flipped VM is not flipped again until a report has carried its change, so every
//! flip is exactly one reported change and `changes_acked` can equal `changes_made`.

use crate::client::Client;
use crate::config;
use crate::Output;
use anyhow::{anyhow, bail, Context, Result};
use herd_agent::agent::unix_ms;
use herd_agent::drivers::sim::{SimConfig, SimDriver};
use herd_agent::{Agent, AgentConfig, AgentError, Driver, SyncProbe};
use herd_proto::wire::VmId;
use herd_proto::VmState;
use herd_server::api::{BatchLaunchRequest, BatchLaunched, HostInfo, JoinTokenView, LaunchRequest};
use parking_lot::Mutex;
use rand::{Rng, SeedableRng};
use reqwest::Method;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

#[derive(clap::Args)]
pub struct SimArgs {
    /// Simulated hosts (agents) to run in this process.
    #[arg(long, default_value_t = 10)]
    pub hosts: usize,
    /// VMs per host; the sim launches what is missing to reach hosts x this.
    #[arg(long, default_value_t = 10)]
    pub vms_per_host: usize,
    /// Percent of all VMs flipped (paused or resumed, as if by their guests) per sync
    /// interval while measuring.
    #[arg(long, default_value_t = 1.0)]
    pub churn: f64,
    /// More churn rates to measure after the first, each for --duration on the same
    /// VMs: sync lag against churn, in one launch.
    #[arg(long, value_delimiter = ',')]
    pub churn_steps: Vec<f64>,
    /// How long to measure: seconds, or a duration like `90s`, `5m`.
    #[arg(long, default_value = "30")]
    pub duration: String,
    #[arg(short, long, value_enum, default_value = "table")]
    pub output: Output,
    /// Where the simulated hosts keep their credentials and VMs, reused across runs
    /// (default: herd's data dir, `sim/`).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// At the end, stop this many agents abruptly and time how long the server takes
    /// to mark their hosts down.
    #[arg(long, default_value_t = 0)]
    pub kill_hosts: usize,
    /// After measuring, keep running until every agent has lost its server and resynced
    /// in full (restart the server meanwhile).
    #[arg(long)]
    pub wait_resync: bool,
    /// How long --wait-resync waits.
    #[arg(long, default_value = "300")]
    pub resync_timeout: String,
    /// Hosts joining or connecting at the same time.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// How long each setup phase (start, launch, boot, the server catching up) may take.
    #[arg(long, default_value = "600")]
    pub setup_timeout: String,
    /// Boot time of simulated VMs.
    #[arg(long, default_value_t = 300)]
    pub boot_ms: u64,
    /// Let simulated VMs report usage counters too (off: only state sync is measured).
    #[arg(long)]
    pub usage: bool,
}

/// Seconds (`30`, `1.5`) or a humantime duration (`90s`, `5m`).
fn parse_duration(what: &str, text: &str) -> Result<Duration> {
    if let Ok(seconds) = text.parse::<f64>() {
        if seconds.is_finite() && seconds >= 0.0 {
            return Ok(Duration::from_secs_f64(seconds));
        }
    }
    humantime::parse_duration(text).map_err(|e| {
        anyhow!("--{what}: {text:?} is not a duration (seconds, or e.g. 90s, 5m): {e}")
    })
}

// ---- what the probes gather ----------------------------------------------------------

/// The figures every host's probe adds to.
struct Shared {
    /// Changes made in `[from, to)` (unix ms) are measured; both `u64::MAX` until the
    /// churn phase starts.
    window_from_ms: AtomicU64,
    window_to_ms: AtomicU64,
    lags_ms: Mutex<Vec<u32>>,
    n_reports: AtomicU64,
    n_report_bytes: AtomicU64,
    n_acks: AtomicU64,
    n_connected: AtomicUsize,
    n_disconnects: AtomicU64,
    interval_ms: AtomicU64,
    /// Hosts not killed: a resync is complete when all of them are back.
    n_alive: AtomicUsize,
    resync: Mutex<ResyncTracker>,
}

impl Shared {
    fn new() -> Shared {
        Shared {
            window_from_ms: AtomicU64::new(u64::MAX),
            window_to_ms: AtomicU64::new(u64::MAX),
            lags_ms: Mutex::new(Vec::new()),
            n_reports: AtomicU64::new(0),
            n_report_bytes: AtomicU64::new(0),
            n_acks: AtomicU64::new(0),
            n_connected: AtomicUsize::new(0),
            n_disconnects: AtomicU64::new(0),
            interval_ms: AtomicU64::new(0),
            n_alive: AtomicUsize::new(0),
            resync: Mutex::new(ResyncTracker::default()),
        }
    }

    fn in_window(&self, changed_at_ms: u64) -> bool {
        changed_at_ms >= self.window_from_ms.load(Ordering::Relaxed)
            && changed_at_ms < self.window_to_ms.load(Ordering::Relaxed)
    }

    fn n_lags(&self) -> usize {
        self.lags_ms.lock().len()
    }
}

/// Hosts that lost their server, from the first disconnect until each of them holds
/// an ack of a full report again.
#[derive(Default)]
struct ResyncTracker {
    current: Option<Resync>,
    completed: Vec<ResyncDone>,
}

struct Resync {
    started_ms: u64,
    first_reconnect_ms: Option<u64>,
    n_lost: usize,
    n_back: usize,
}

#[derive(Debug, Clone, Serialize)]
struct ResyncDone {
    /// Hosts that lost their server in this episode.
    hosts: usize,
    /// Whether that was every host.
    all_hosts: bool,
    /// From the first disconnect until the last host's full report was acked.
    resync_ms: u64,
    /// From the first reconnect until then.
    from_first_reconnect_ms: Option<u64>,
}

impl ResyncTracker {
    fn host_lost(&mut self, now_ms: u64) {
        let current = self.current.get_or_insert(Resync {
            started_ms: now_ms,
            first_reconnect_ms: None,
            n_lost: 0,
            n_back: 0,
        });
        current.n_lost += 1;
    }

    fn host_connected(&mut self, now_ms: u64) {
        if let Some(current) = &mut self.current {
            current.first_reconnect_ms.get_or_insert(now_ms);
        }
    }

    fn host_back(&mut self, now_ms: u64, n_alive: usize) {
        let Some(current) = &mut self.current else {
            return;
        };
        current.n_back += 1;
        if current.n_back < current.n_lost {
            return;
        }
        self.completed.push(ResyncDone {
            hosts: current.n_lost,
            all_hosts: current.n_lost >= n_alive,
            resync_ms: now_ms.saturating_sub(current.started_ms),
            from_first_reconnect_ms: current
                .first_reconnect_ms
                .map(|at| now_ms.saturating_sub(at)),
        });
        self.current = None;
    }
}

/// One host's view of its own sync, fed by its agent and by the churn.
#[derive(Default)]
struct HostSync {
    epoch: u64,
    /// Reports that carried measured changes, not yet acked: (seq, when each change
    /// was made).
    pending: VecDeque<(u64, Vec<u64>)>,
    /// VMs flipped whose change no report has carried yet: not flipped again until
    /// one has, so that each flip is one reported change.
    in_flight: Vec<VmId>,
    /// Lost its server (in the current resync episode) and not yet back.
    lost: bool,
    /// The full report that will bring it back, once sent.
    full_seq: Option<u64>,
    /// The last report that carried any change (or was full), and the newest ack.
    last_change_seq: u64,
    acked_seq: u64,
    killed: bool,
}

struct HostProbe {
    shared: Arc<Shared>,
    driver: Arc<SimDriver>,
    sync: Mutex<HostSync>,
    /// Told once: the agent connected for the first time, or could not start.
    started: Mutex<Option<oneshot::Sender<Result<(), String>>>>,
}

impl HostProbe {
    fn start_failed(&self, reason: String) {
        if let Some(tx) = self.started.lock().take() {
            let _ = tx.send(Err(reason));
        }
    }

    /// The server has acked every report that changed anything.
    fn caught_up(&self) -> bool {
        let sync = self.sync.lock();
        sync.acked_seq >= sync.last_change_seq
    }

    /// No change in flight and none waiting for an ack.
    fn quiet(&self) -> bool {
        let sync = self.sync.lock();
        sync.in_flight.is_empty() && sync.pending.is_empty()
    }

    /// Flips `vm` unless a flip of it is still unreported; says whether it did.
    fn flip(&self, vm: VmId) -> bool {
        let mut sync = self.sync.lock();
        if sync.in_flight.contains(&vm) {
            return false;
        }
        // Under the lock: a report cannot slip between the flip and its record.
        if self.driver.flip(vm).is_none() {
            return false;
        }
        sync.in_flight.push(vm);
        true
    }
}

impl SyncProbe for HostProbe {
    fn connected(&self, sync_interval_ms: u64) {
        let shared = &self.shared;
        shared
            .interval_ms
            .fetch_max(sync_interval_ms, Ordering::Relaxed);
        shared.n_connected.fetch_add(1, Ordering::Relaxed);
        if self.sync.lock().lost {
            shared.resync.lock().host_connected(unix_ms());
        }
        if let Some(tx) = self.started.lock().take() {
            let _ = tx.send(Ok(()));
        }
    }

    fn disconnected(&self) {
        let shared = &self.shared;
        shared.n_connected.fetch_sub(1, Ordering::Relaxed);
        shared.n_disconnects.fetch_add(1, Ordering::Relaxed);
        let mut sync = self.sync.lock();
        // A full report sent before this disconnect brings nothing back.
        sync.full_seq = None;
        if !sync.lost && !sync.killed {
            sync.lost = true;
            shared.resync.lock().host_lost(unix_ms());
        }
    }

    fn reported(&self, epoch: u64, seq: u64, full: bool, changed: &[VmId], bytes: usize) {
        let shared = &self.shared;
        shared.n_reports.fetch_add(1, Ordering::Relaxed);
        shared
            .n_report_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
        if changed.is_empty() && !full {
            return;
        }
        let mut sync = self.sync.lock();
        if sync.epoch != epoch {
            sync.epoch = epoch;
            sync.pending.clear();
            sync.acked_seq = 0;
        }
        sync.last_change_seq = seq;
        let mut times = Vec::new();
        for vm in changed {
            if let Some(at) = sync.in_flight.iter().position(|v| v == vm) {
                sync.in_flight.swap_remove(at);
            }
            if let Some(changed_at) = self.driver.changed_at_ms(*vm) {
                if shared.in_window(changed_at) {
                    times.push(changed_at);
                }
            }
        }
        if !times.is_empty() {
            sync.pending.push_back((seq, times));
        }
        if full && sync.lost {
            sync.full_seq = Some(seq);
        }
    }

    fn acked(&self, epoch: u64, seq: u64) {
        let shared = &self.shared;
        shared.n_acks.fetch_add(1, Ordering::Relaxed);
        let now = unix_ms();
        let mut lags = Vec::new();
        let mut sync = self.sync.lock();
        if sync.epoch != epoch {
            return;
        }
        sync.acked_seq = sync.acked_seq.max(seq);
        while sync.pending.front().is_some_and(|(sent, _)| *sent <= seq) {
            if let Some((_, times)) = sync.pending.pop_front() {
                lags.extend(
                    times
                        .into_iter()
                        .map(|at| now.saturating_sub(at).min(u64::from(u32::MAX)) as u32),
                );
            }
        }
        if sync.lost && sync.full_seq.is_some_and(|full| full <= seq) {
            sync.lost = false;
            sync.full_seq = None;
            shared
                .resync
                .lock()
                .host_back(now, shared.n_alive.load(Ordering::Relaxed));
        }
        drop(sync);
        if !lags.is_empty() {
            shared.lags_ms.lock().extend(lags);
        }
    }
}

// ---- the fleet of simulated hosts -------------------------------------------------------

struct SimHost {
    index: usize,
    dir: PathBuf,
    host_id: Option<uuid::Uuid>,
    driver: Arc<SimDriver>,
    probe: Arc<HostProbe>,
    task: JoinHandle<Result<(), AgentError>>,
    killed: bool,
}

#[derive(Deserialize)]
struct AgentJson {
    host_id: uuid::Uuid,
}

/// Where a host keeps its sim VMs between runs.
fn snapshot_path(dir: &Path) -> PathBuf {
    dir.join("sim-vms.json")
}

struct Fleet {
    hosts: Vec<SimHost>,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
}

impl Fleet {
    fn alive(&self) -> impl Iterator<Item = &SimHost> {
        self.hosts.iter().filter(|h| !h.killed)
    }

    /// An agent that ended although nobody stopped it means the run is broken.
    fn check_agents(&self) -> Result<()> {
        match self.alive().find(|h| h.task.is_finished()) {
            Some(host) => bail!("the agent of simulated host {} stopped", host.index),
            None => Ok(()),
        }
    }

    async fn states(&self) -> (usize, usize, usize) {
        let (mut n_vms, mut n_running, mut n_paused) = (0, 0, 0);
        for host in self.alive() {
            if let Ok(vms) = host.driver.list().await {
                n_vms += vms.len();
                n_running += vms.iter().filter(|v| v.state == VmState::Running).count();
                n_paused += vms.iter().filter(|v| v.state == VmState::Paused).count();
            }
        }
        (n_vms, n_running, n_paused)
    }

    /// Resumes every paused VM (left by the churn), as if by its guest; returns how many.
    async fn resume_paused(&self) -> usize {
        let mut n = 0;
        for host in self.alive() {
            let Ok(vms) = host.driver.list().await else {
                continue;
            };
            for vm in vms.iter().filter(|v| v.state == VmState::Paused) {
                if host.probe.flip(vm.id) {
                    n += 1;
                }
            }
        }
        n
    }

    fn quiet(&self) -> bool {
        self.alive().all(|h| h.probe.quiet())
    }

    fn n_caught_up(&self) -> usize {
        self.alive().filter(|h| h.probe.caught_up()).count()
    }

    /// Stops every agent (cleanly, so each writes its state) and saves the sim VMs.
    async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        for host in &mut self.hosts {
            if host.task.is_finished() {
                continue;
            }
            if tokio::time::timeout_at(deadline, &mut host.task)
                .await
                .is_err()
            {
                host.task.abort();
            }
        }
        let n_hosts = self.hosts.len();
        let saved = tokio::task::spawn_blocking(move || {
            let mut failed = 0;
            for host in &self.hosts {
                if let Err(e) = host.driver.save_to(&snapshot_path(&host.dir)) {
                    failed += 1;
                    if failed == 1 {
                        eprintln!("herd sim: cannot save the VMs of host {}: {e}", host.index);
                    }
                }
            }
            failed
        })
        .await;
        if let Ok(failed) = saved {
            if failed > 0 {
                eprintln!("herd sim: {failed} of {n_hosts} hosts' VMs were not saved");
            }
        }
    }
}

/// Prints a progress line to stderr at most every few seconds.
struct Progress {
    last: Instant,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            last: Instant::now(),
        }
    }

    fn say(&mut self, line: impl FnOnce() -> String) {
        if self.last.elapsed() >= Duration::from_secs(3) {
            self.last = Instant::now();
            eprintln!("herd sim: {}", line());
        }
    }
}

// ---- the run ---------------------------------------------------------------------------

#[derive(Debug, Serialize)]
struct Percentiles {
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

impl Percentiles {
    fn of(sorted: &[u32], scale: f64) -> Option<Percentiles> {
        let at = |q: f64| {
            let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
            f64::from(sorted[rank - 1]) * scale
        };
        let max = *sorted.last()?;
        Some(Percentiles {
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: f64::from(max) * scale,
        })
    }
}

#[derive(Debug, Serialize)]
struct Kill {
    host: uuid::Uuid,
    detect_ms: Option<u64>,
}

/// Lag measured at one of `--churn-steps`.
#[derive(Debug, Serialize)]
struct ChurnStep {
    churn_pct: f64,
    changes_made: u64,
    changes_acked: usize,
    lag_ms: Option<Percentiles>,
}

/// The lags measured since the last call, sorted.
fn take_lags(shared: &Shared) -> Vec<u32> {
    let mut lags = std::mem::take(&mut *shared.lags_ms.lock());
    lags.sort_unstable();
    lags
}

#[derive(Debug, Serialize)]
struct SimReport {
    hosts: usize,
    vms_per_host: usize,
    /// Sim VMs held by the hosts when measuring began.
    vms: usize,
    churn_pct: f64,
    interval_ms: u64,
    duration_s: f64,
    hosts_joined: usize,
    start_s: f64,
    vms_launched: usize,
    launch_s: f64,
    boot_s: f64,
    /// Until the server had acked every report before measuring began.
    settle_s: f64,
    changes_made: u64,
    changes_acked: usize,
    lag_ms: Option<Percentiles>,
    lag_intervals: Option<Percentiles>,
    /// Further churn rates, measured after the first (`--churn-steps`).
    churn_steps: Vec<ChurnStep>,
    reports_per_s: f64,
    report_bytes_per_s: f64,
    acks_per_s: f64,
    /// Reports and acks.
    messages_per_s: f64,
    disconnects: u64,
    /// The last resync after every host lost its server.
    resync: Option<ResyncDone>,
    resync_ms: Option<u64>,
    partial_resyncs: usize,
    kills: Vec<Kill>,
    kill_detect_max_ms: Option<u64>,
    kill_detect_mean_ms: Option<f64>,
    rss_mib: f64,
    peak_rss_mib: f64,
    cpu_s: f64,
    /// CPU of this process while measuring, in percent of one core.
    cpu_pct_measuring: f64,
}

/// RSS, peak RSS (MiB) and CPU time (s) of this process, from /proc.
fn process_stats() -> (f64, f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command (which may hold spaces): utime and stime are the 14th
    // and 15th fields overall, in clock ticks (100 per second on Linux).
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |n: usize| fields.get(n).and_then(|v| v.parse::<f64>().ok());
    let cpu_s = ticks(11).unwrap_or(0.0) / 100.0 + ticks(12).unwrap_or(0.0) / 100.0;
    (kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0, cpu_s)
}

pub async fn sim(args: SimArgs) -> Result<()> {
    // Thousands of agents each saying "connected" or "connection lost" drown the sim's
    // own lines; HERD_LOG brings them back.
    crate::run::init_logging_with("warn,herd_agent=error");
    if args.hosts == 0 || args.vms_per_host == 0 {
        bail!("--hosts and --vms-per-host must be at least 1");
    }
    if std::iter::once(&args.churn)
        .chain(&args.churn_steps)
        .any(|pct| !(0.0..=100.0).contains(pct))
    {
        bail!("--churn and --churn-steps are percentages: 0 to 100");
    }
    if args.kill_hosts > args.hosts {
        bail!("--kill-hosts cannot exceed --hosts");
    }
    let duration = parse_duration("duration", &args.duration)?;
    let setup_timeout = parse_duration("setup-timeout", &args.setup_timeout)?;
    let resync_timeout = parse_duration("resync-timeout", &args.resync_timeout)?;
    let resolved = config::resolve()?;
    let api = Arc::new(Client::new(
        resolved.url.clone(),
        resolved.token.clone(),
        resolved.ca_pem.as_deref(),
    )?);
    // Reachable, and the token is an admin's: everything below needs both.
    let _: Vec<HostInfo> = api
        .get("/v1/hosts")
        .await
        .context("herd sim needs the server and an admin token")?;
    let root = args
        .dir
        .clone()
        .unwrap_or_else(|| config::default_data_dir().join("sim"));
    std::fs::create_dir_all(root.join("hosts"))
        .with_context(|| format!("cannot create {}", root.display()))?;

    let (stop, _) = watch::channel(false);
    let mut fleet = Fleet {
        hosts: Vec::with_capacity(args.hosts),
        shared: Arc::new(Shared::new()),
        stop,
    };
    let run = Run {
        args: &args,
        api: &api,
        url: &resolved.url,
        ca_pem: resolved.ca_pem.as_deref(),
        root: &root,
        duration,
        setup_timeout,
        resync_timeout,
    };
    let result = run.run(&mut fleet).await;
    eprintln!("herd sim: stopping {} agents", fleet.hosts.len());
    fleet.shutdown().await;
    let report = result?;
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Table => print_report(&report),
    }
    Ok(())
}

struct Run<'a> {
    args: &'a SimArgs,
    api: &'a Arc<Client>,
    url: &'a str,
    ca_pem: Option<&'a str>,
    root: &'a Path,
    duration: Duration,
    setup_timeout: Duration,
    resync_timeout: Duration,
}

impl Run<'_> {
    async fn run(&self, fleet: &mut Fleet) -> Result<SimReport> {
        let args = self.args;
        let n_want = args.hosts * args.vms_per_host;

        let started = Instant::now();
        let hosts_joined = self.start_hosts(fleet).await?;
        self.wait_hosts_up(fleet).await?;
        let start_s = started.elapsed().as_secs_f64();
        let interval_ms = fleet.shared.interval_ms.load(Ordering::Relaxed).max(1);
        eprintln!(
            "herd sim: {} hosts up in {start_s:.1} s ({hosts_joined} joined now); sync interval {interval_ms} ms",
            args.hosts
        );

        // Commands queued for these hosts before may still be arriving; let them.
        tokio::time::sleep(Duration::from_millis(2 * interval_ms)).await;
        let n_resumed = fleet.resume_paused().await;
        if n_resumed > 0 {
            eprintln!("herd sim: resumed {n_resumed} VMs left paused by an earlier run");
        }
        let (n_held, _, _) = fleet.states().await;
        let started = Instant::now();
        let vms_launched = n_want.saturating_sub(n_held);
        if n_held > n_want {
            eprintln!(
                "herd sim: the hosts already hold {n_held} VMs, more than {n_want}; launching none"
            );
        }
        self.launch(vms_launched).await?;
        let launch_s = started.elapsed().as_secs_f64();
        let started = Instant::now();
        let n_vms = self.wait_running(fleet, n_want.max(n_held)).await?;
        let boot_s = started.elapsed().as_secs_f64();
        // Measure the steady state, not the tail of the launch.
        let started = Instant::now();
        self.wait_caught_up(fleet).await?;
        self.wait_server_settled().await?;
        let settle_s = started.elapsed().as_secs_f64();

        // Measure.
        let (n_changes, window) = self.churn(fleet, interval_ms, args.churn).await?;
        let lags = take_lags(&fleet.shared);
        let seconds = window.seconds.max(0.001);
        let per_s = |n: u64| n as f64 / seconds;
        let mut churn_steps = Vec::new();
        for &churn_pct in &args.churn_steps {
            let (changes_made, _) = self.churn(fleet, interval_ms, churn_pct).await?;
            let lags = take_lags(&fleet.shared);
            churn_steps.push(ChurnStep {
                churn_pct,
                changes_made,
                changes_acked: lags.len(),
                lag_ms: Percentiles::of(&lags, 1.0),
            });
        }

        if args.wait_resync {
            self.wait_resync(fleet).await?;
        }
        // Leave every VM running, as launched, and the server knowing it.
        let n_resumed = fleet.resume_paused().await;
        self.wait_quiet(fleet, interval_ms, "resumed VMs").await;
        if n_resumed > 0 {
            eprintln!("herd sim: resumed the {n_resumed} VMs the churn left paused");
        }

        // Timed on a settled server, as the churn phases are: right after the resume
        // the store is still writing a third of the fleet's states, the writer takes a
        // core, and the ingest reads a dead host's last frames late, which the
        // detection time would count.
        self.wait_server_settled().await?;
        let kills = self.kill_hosts(fleet).await?;
        let detected: Vec<u64> = kills.iter().filter_map(|k| k.detect_ms).collect();
        let (completed, partial_resyncs) = {
            let tracker = fleet.shared.resync.lock();
            (
                tracker
                    .completed
                    .iter()
                    .rev()
                    .find(|r| r.all_hosts)
                    .cloned(),
                tracker.completed.iter().filter(|r| !r.all_hosts).count(),
            )
        };
        let (rss_mib, peak_rss_mib, cpu_s) = process_stats();
        Ok(SimReport {
            hosts: args.hosts,
            vms_per_host: args.vms_per_host,
            vms: n_vms,
            churn_pct: args.churn,
            interval_ms,
            duration_s: window.seconds,
            hosts_joined,
            start_s,
            vms_launched,
            launch_s,
            boot_s,
            settle_s,
            changes_made: n_changes,
            changes_acked: lags.len(),
            lag_ms: Percentiles::of(&lags, 1.0),
            lag_intervals: Percentiles::of(&lags, 1.0 / interval_ms as f64),
            churn_steps,
            reports_per_s: per_s(window.reports),
            report_bytes_per_s: per_s(window.report_bytes),
            acks_per_s: per_s(window.acks),
            messages_per_s: per_s(window.reports + window.acks),
            disconnects: fleet.shared.n_disconnects.load(Ordering::Relaxed),
            resync_ms: completed.as_ref().map(|r| r.resync_ms),
            resync: completed,
            partial_resyncs,
            kill_detect_max_ms: detected.iter().max().copied(),
            kill_detect_mean_ms: (!detected.is_empty())
                .then(|| detected.iter().sum::<u64>() as f64 / detected.len() as f64),
            kills,
            rss_mib,
            peak_rss_mib,
            cpu_s,
            cpu_pct_measuring: window.cpu_s / seconds * 100.0,
        })
    }

    /// Joins the hosts that have not joined yet and starts every agent, a bounded
    /// number at a time, each until it has connected. Returns how many joined now.
    async fn start_hosts(&self, fleet: &mut Fleet) -> Result<usize> {
        let args = self.args;
        let permits = Arc::new(Semaphore::new(args.concurrency.max(1)));
        let mut waiting: JoinSet<Result<()>> = JoinSet::new();
        let mut progress = Progress::new();
        let mut n_connected = 0;
        let mut n_joined = 0;
        let deadline = Instant::now() + self.setup_timeout;
        for index in 0..args.hosts {
            let permit = permits
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| anyhow!("the start queue closed"))?;
            while let Some(done) = waiting.try_join_next() {
                done.map_err(|e| anyhow!("start task failed: {e}"))??;
                n_connected += 1;
            }
            if Instant::now() > deadline {
                bail!("starting the hosts took longer than --setup-timeout");
            }
            let (host, started, joined) = self.start_host(fleet, index).await?;
            n_joined += usize::from(joined);
            fleet.hosts.push(host);
            waiting.spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(Duration::from_secs(120), started).await {
                    Ok(Ok(Ok(()))) => Ok(()),
                    Ok(Ok(Err(reason))) => Err(anyhow!("simulated host {index}: {reason}")),
                    Ok(Err(_)) => Err(anyhow!("simulated host {index}: its agent stopped")),
                    Err(_) => Err(anyhow!(
                        "simulated host {index} did not connect within 120 s (is the server overloaded?)"
                    )),
                }
            });
            progress.say(|| format!("started {n_connected}/{} hosts", args.hosts));
        }
        while let Some(done) = waiting.join_next().await {
            done.map_err(|e| anyhow!("start task failed: {e}"))??;
            n_connected += 1;
            progress.say(|| format!("started {n_connected}/{} hosts", args.hosts));
        }
        for host in &mut fleet.hosts {
            let path = host.dir.join("agent.json");
            let text =
                std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            let creds: AgentJson = serde_json::from_slice(&text)
                .with_context(|| format!("{} is not an agent's credentials", path.display()))?;
            host.host_id = Some(creds.host_id);
        }
        fleet
            .shared
            .n_alive
            .store(fleet.hosts.len(), Ordering::Relaxed);
        Ok(n_joined)
    }

    /// Starts one host's agent; returns it, the signal of its first connection, and
    /// whether it joined now.
    async fn start_host(
        &self,
        fleet: &Fleet,
        index: usize,
    ) -> Result<(SimHost, oneshot::Receiver<Result<(), String>>, bool)> {
        let args = self.args;
        let dir = self.root.join("hosts").join(index.to_string());
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let join_token = if dir.join("agent.json").exists() {
            None
        } else {
            let view: JoinTokenView = self
                .api
                .call(
                    Method::POST,
                    "/v1/join-tokens",
                    Some(&serde_json::json!({ "ttl_seconds": 3600 })),
                )
                .await
                .context("creating a join token")?;
            Some(view.token)
        };
        let joined = join_token.is_some();
        let driver = Arc::new(
            SimDriver::restore(
                &snapshot_path(&dir),
                SimConfig {
                    boot_ms: args.boot_ms,
                    usage: args.usage,
                    ..SimConfig::default()
                },
            )
            .with_context(|| format!("simulated host {index}"))?,
        );
        let (started_tx, started_rx) = oneshot::channel();
        let probe = Arc::new(HostProbe {
            shared: fleet.shared.clone(),
            driver: driver.clone(),
            sync: Mutex::new(HostSync::default()),
            started: Mutex::new(Some(started_tx)),
        });
        let per_host = args.vms_per_host as u64;
        let agent = Agent::new(
            AgentConfig {
                server_url: Some(self.url.to_owned()),
                join_token,
                data_dir: dir.clone(),
                hostname: format!("sim-{index}"),
                // Room for the VMs asked for at 1 vCPU and 64 MiB each, twice over
                // (the server over-commits CPUs, not memory, by default).
                cpus: Some((2 * per_host).min(u64::from(u32::MAX)) as u32),
                memory_mib: Some(per_host * 64 * 2),
                ca_pem: self.ca_pem.map(str::to_owned),
                ca_fingerprint: None,
            },
            vec![driver.clone() as Arc<dyn Driver>],
        )
        .with_ephemeral_state(true)
        .with_probe(probe.clone());
        let mut stop = fleet.stop.subscribe();
        let failed = probe.clone();
        let task = tokio::spawn(async move {
            let result = agent
                .run(async move {
                    let _ = stop.wait_for(|stop| *stop).await;
                })
                .await;
            if let Err(e) = &result {
                failed.start_failed(herd_agent::agent::error_chain(e));
            }
            result
        });
        Ok((
            SimHost {
                index,
                dir,
                host_id: None,
                driver,
                probe,
                task,
                killed: false,
            },
            started_rx,
            joined,
        ))
    }

    /// Waits until the server lists every simulated host as up and connected.
    async fn wait_hosts_up(&self, fleet: &Fleet) -> Result<()> {
        let deadline = Instant::now() + self.setup_timeout;
        let mut progress = Progress::new();
        loop {
            fleet.check_agents()?;
            let listed: Vec<HostInfo> = self.api.get("/v1/hosts").await?;
            let up: HashMap<uuid::Uuid, bool> = listed
                .iter()
                .map(|h| (h.id, h.state == "up" && h.connected))
                .collect();
            let n_up = fleet
                .hosts
                .iter()
                .filter(|h| h.host_id.is_some_and(|id| up.get(&id) == Some(&true)))
                .count();
            if n_up == fleet.hosts.len() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "only {n_up} of {} hosts are up on the server after --setup-timeout",
                    fleet.hosts.len()
                );
            }
            progress.say(|| format!("{n_up}/{} hosts up on the server", fleet.hosts.len()));
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Launches `n` sim VMs in batches of up to 1,000 (a few batches at a time).
    async fn launch(&self, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        const BATCH: usize = 1000;
        const IN_PARALLEL: usize = 4;
        // Names only have to differ from earlier runs' in the same project.
        let run_tag = unix_ms() / 1000;
        let mut batches = (0..n.div_ceil(BATCH))
            .map(|b| (b + 1, BATCH.min(n - b * BATCH)))
            .peekable();
        let mut running: JoinSet<Result<usize>> = JoinSet::new();
        let mut n_launched = 0;
        let mut progress = Progress::new();
        let deadline = Instant::now() + self.setup_timeout;
        loop {
            while running.len() < IN_PARALLEL {
                let Some((batch_no, count)) = batches.next() else {
                    break;
                };
                let api = self.api.clone();
                let request = BatchLaunchRequest {
                    count: count as u32,
                    vm: LaunchRequest {
                        name: format!("sim-{run_tag}-b{batch_no}"),
                        project: Some("default".into()),
                        hypervisor: Some("sim".into()),
                        vcpus: Some(1),
                        memory_mib: Some(64),
                        image: None,
                        command: None,
                        policy: None,
                        keep_running: None,
                    },
                };
                running.spawn(async move {
                    let launched: BatchLaunched = api
                        .call(Method::POST, "/v1/vms/batch", Some(&request))
                        .await
                        .with_context(|| format!("launching {} ({count} VMs)", request.vm.name))?;
                    Ok(launched.ids.len())
                });
            }
            let Some(done) = running.join_next().await else {
                return Ok(());
            };
            n_launched += done.map_err(|e| anyhow!("launch task failed: {e}"))??;
            if Instant::now() > deadline {
                bail!("launching took longer than --setup-timeout ({n_launched}/{n} launched)");
            }
            progress.say(|| format!("launched {n_launched}/{n} VMs"));
        }
    }

    /// Waits until the hosts hold `n_want` VMs running; returns how many they hold.
    async fn wait_running(&self, fleet: &Fleet, n_want: usize) -> Result<usize> {
        let deadline = Instant::now() + self.setup_timeout;
        let mut progress = Progress::new();
        loop {
            fleet.check_agents()?;
            let (n_vms, n_running, _) = fleet.states().await;
            if n_running >= n_want {
                return Ok(n_vms);
            }
            if Instant::now() > deadline {
                bail!(
                    "only {n_running} of {n_want} VMs run on the simulated hosts after \
                     --setup-timeout (are there enough hosts for them? pending VMs wait for room)"
                );
            }
            progress.say(|| format!("{n_running}/{n_want} VMs running ({n_vms} on the hosts)"));
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Waits until the server has acked every report that changed anything.
    async fn wait_caught_up(&self, fleet: &Fleet) -> Result<()> {
        let deadline = Instant::now() + self.setup_timeout;
        let mut progress = Progress::new();
        loop {
            fleet.check_agents()?;
            let n_caught_up = fleet.n_caught_up();
            if n_caught_up == fleet.hosts.len() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the server had not acked every host's reports after --setup-timeout \
                     ({n_caught_up}/{} caught up)",
                    fleet.hosts.len()
                );
            }
            progress.say(|| {
                format!(
                    "waiting for the server to catch up: {n_caught_up}/{} hosts acked",
                    fleet.hosts.len()
                )
            });
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the server has written behind everything its agents reported (its
    /// `herd_store_unwritten_states` gauge is zero), so that a churn phase measures
    /// the steady state and not the tail of the launch: the last boots of a million
    /// VMs are still being written when their agents have been acknowledged. Gives up
    /// (and says so) after a minute; a server without the gauge is not waited for.
    async fn wait_server_settled(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut progress = Progress::new();
        loop {
            let (_, body) = self.api.call_status(Method::GET, "/metrics").await?;
            let text = String::from_utf8_lossy(&body);
            let Some(unwritten) = text.lines().find_map(|line| {
                line.strip_prefix("herd_store_unwritten_states ")
                    .and_then(|n| n.trim().parse::<u64>().ok())
            }) else {
                return Ok(());
            };
            if unwritten == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                eprintln!(
                    "herd sim: the server still has {unwritten} states to write after 60 s; \
                     measuring anyway"
                );
                return Ok(());
            }
            progress.say(|| format!("waiting for the server to write {unwritten} states"));
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Flips `churn` percent of all VMs per interval for `--duration`, spread evenly
    /// over the interval and uniformly over the VMs, then waits until the flips are
    /// acked. Returns the number of flips and what the window saw.
    async fn churn(&self, fleet: &Fleet, interval_ms: u64, churn: f64) -> Result<(u64, Window)> {
        let shared = &fleet.shared;
        // Every VM once, indexed: the k-th VM overall is in the host whose prefix
        // count passes k.
        let mut vms: Vec<(usize, Vec<VmId>)> = Vec::new();
        let mut prefix = Vec::new();
        let mut n_total = 0;
        for (at, host) in fleet.hosts.iter().enumerate() {
            let held: Vec<VmId> = host
                .driver
                .list()
                .await
                .map_err(|e| anyhow!("listing sim VMs: {e}"))?
                .into_iter()
                .map(|v| v.id)
                .collect();
            n_total += held.len();
            prefix.push(n_total);
            vms.push((at, held));
        }
        let slice = Duration::from_millis((interval_ms / 10).max(10));
        let per_ms = n_total as f64 * churn / 100.0 / interval_ms as f64;
        let mut rng = rand::rngs::StdRng::from_entropy();
        let mut tick = tokio::time::interval(slice);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut progress = Progress::new();

        eprintln!(
            "herd sim: measuring for {:.0} s: {:.1}% of {n_total} VMs flipped per {interval_ms} ms interval",
            self.duration.as_secs_f64(),
            churn
        );
        let from = Window::start(shared);
        let started = Instant::now();
        let mut n_flips: u64 = 0;
        let mut n_busy: u64 = 0;
        while started.elapsed() < self.duration {
            tick.tick().await;
            fleet.check_agents()?;
            let owed = (started.elapsed().as_millis() as f64 * per_ms) as u64;
            let mut attempts = 0;
            while n_flips < owed && n_total > 0 && attempts < 4 * (owed - n_flips) + 16 {
                attempts += 1;
                let k = rng.gen_range(0..n_total);
                let at = prefix.partition_point(|&end| end <= k);
                let (host_at, held) = &vms[at];
                let first = if at == 0 { 0 } else { prefix[at - 1] };
                let vm = held[k - first];
                if fleet.hosts[*host_at].probe.flip(vm) {
                    n_flips += 1;
                } else {
                    n_busy += 1;
                }
            }
            progress.say(|| {
                format!(
                    "{:.0} s: {n_flips} changes made, {} acked, {} hosts connected",
                    started.elapsed().as_secs_f64(),
                    shared.n_lags(),
                    shared.n_connected.load(Ordering::Relaxed)
                )
            });
        }
        let window = from.end(shared);
        if n_busy > 0 {
            tracing::debug!(
                n_busy,
                "picks skipped: the VM's last flip was not reported yet"
            );
        }
        // Flips after this are not measured; the sleep keeps them out of the window's
        // last millisecond.
        shared.window_to_ms.store(unix_ms() + 1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(5)).await;
        self.wait_quiet(fleet, interval_ms, "the last changes to be acked")
            .await;
        Ok((n_flips, window))
    }

    /// Waits (a bounded time) until no change is in flight or unacked on any host.
    async fn wait_quiet(&self, fleet: &Fleet, interval_ms: u64, what: &str) {
        let limit = Duration::from_millis(20 * interval_ms).max(Duration::from_secs(20));
        let deadline = Instant::now() + limit;
        while !fleet.quiet() {
            if Instant::now() > deadline {
                eprintln!("herd sim: gave up waiting for {what} after {limit:?}");
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_resync(&self, fleet: &Fleet) -> Result<()> {
        let n_before = fleet.shared.resync.lock().completed.len();
        eprintln!(
            "herd sim: waiting up to {:.0} s for every host to lose its server and resync \
             (restart the server now)",
            self.resync_timeout.as_secs_f64()
        );
        let deadline = Instant::now() + self.resync_timeout;
        let mut progress = Progress::new();
        loop {
            {
                let tracker = fleet.shared.resync.lock();
                if tracker.completed[n_before..].iter().any(|r| r.all_hosts) {
                    return Ok(());
                }
            }
            fleet.check_agents()?;
            if Instant::now() > deadline {
                bail!("no full resync within --resync-timeout: did every host lose its server?");
            }
            progress.say(|| {
                let tracker = fleet.shared.resync.lock();
                match &tracker.current {
                    Some(r) => format!(
                        "resync: {} hosts lost their server, {} back",
                        r.n_lost, r.n_back
                    ),
                    None => format!(
                        "waiting for the server to go away ({} hosts connected)",
                        fleet.shared.n_connected.load(Ordering::Relaxed)
                    ),
                }
            });
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Aborts `--kill-hosts` agents (their sockets drop without a word) and polls the
    /// server until it marks each host down.
    async fn kill_hosts(&self, fleet: &mut Fleet) -> Result<Vec<Kill>> {
        let n_kill = self.args.kill_hosts;
        if n_kill == 0 {
            return Ok(Vec::new());
        }
        let n_hosts = fleet.hosts.len();
        let mut victims = Vec::new();
        for k in 0..n_kill {
            let host = &mut fleet.hosts[k * n_hosts / n_kill];
            host.probe.sync.lock().killed = true;
            host.killed = true;
            host.task.abort();
            if let Some(id) = host.host_id {
                victims.push(id);
            }
        }
        let killed_at = Instant::now();
        fleet.shared.n_alive.fetch_sub(n_kill, Ordering::Relaxed);
        eprintln!("herd sim: killed {n_kill} agents; waiting for the server to notice");
        let mut detected: HashMap<uuid::Uuid, u64> = HashMap::new();
        let deadline = killed_at + self.setup_timeout;
        while detected.len() < victims.len() && Instant::now() < deadline {
            let polls =
                victims
                    .iter()
                    .filter(|id| !detected.contains_key(id))
                    .map(|id| async move {
                        let view: Result<HostInfo> = self.api.get(&format!("/v1/hosts/{id}")).await;
                        (*id, view)
                    });
            for (id, view) in futures_util::future::join_all(polls).await {
                if view?.state == "down" {
                    detected.insert(id, killed_at.elapsed().as_millis() as u64);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(victims
            .into_iter()
            .map(|host| Kill {
                host,
                detect_ms: detected.get(&host).copied(),
            })
            .collect())
    }
}

/// Counters at the start of the measuring window, and their growth over it.
struct Window {
    seconds: f64,
    reports: u64,
    report_bytes: u64,
    acks: u64,
    cpu_s: f64,
}

struct WindowStart {
    at: Instant,
    reports: u64,
    report_bytes: u64,
    acks: u64,
    cpu_s: f64,
}

impl Window {
    fn start(shared: &Shared) -> WindowStart {
        // Open-ended until `churn` closes it; an earlier phase may have closed it.
        shared.window_to_ms.store(u64::MAX, Ordering::Relaxed);
        shared.window_from_ms.store(unix_ms(), Ordering::Relaxed);
        WindowStart {
            at: Instant::now(),
            reports: shared.n_reports.load(Ordering::Relaxed),
            report_bytes: shared.n_report_bytes.load(Ordering::Relaxed),
            acks: shared.n_acks.load(Ordering::Relaxed),
            cpu_s: process_stats().2,
        }
    }
}

impl WindowStart {
    fn end(self, shared: &Shared) -> Window {
        Window {
            seconds: self.at.elapsed().as_secs_f64(),
            reports: shared.n_reports.load(Ordering::Relaxed) - self.reports,
            report_bytes: shared.n_report_bytes.load(Ordering::Relaxed) - self.report_bytes,
            acks: shared.n_acks.load(Ordering::Relaxed) - self.acks,
            cpu_s: process_stats().2 - self.cpu_s,
        }
    }
}

fn print_report(r: &SimReport) {
    println!(
        "hosts           {} ({} joined this run, all up in {:.1} s)",
        r.hosts, r.hosts_joined, r.start_s
    );
    println!(
        "VMs             {} ({} launched in {:.1} s, all running {:.1} s later, acked {:.1} s later)",
        r.vms, r.vms_launched, r.launch_s, r.boot_s, r.settle_s
    );
    println!(
        "churn           {}% per {} ms interval for {:.1} s",
        r.churn_pct, r.interval_ms, r.duration_s
    );
    println!(
        "changes         {} made, {} acked",
        r.changes_made, r.changes_acked
    );
    match (&r.lag_ms, &r.lag_intervals) {
        (Some(ms), Some(iv)) => println!(
            "sync lag (ms)   p50 {:.0}  p90 {:.0}  p99 {:.0}  max {:.0}  ({:.2} / {:.2} / {:.2} / {:.2} intervals)",
            ms.p50, ms.p90, ms.p99, ms.max, iv.p50, iv.p90, iv.p99, iv.max
        ),
        _ => println!("sync lag        no changes measured"),
    }
    for step in &r.churn_steps {
        match &step.lag_ms {
            Some(ms) => println!(
                "  at {:>5}%     p50 {:.0}  p99 {:.0}  max {:.0} ms ({} made, {} acked)",
                step.churn_pct, ms.p50, ms.p99, ms.max, step.changes_made, step.changes_acked
            ),
            None => println!("  at {:>5}%     no changes measured", step.churn_pct),
        }
    }
    println!(
        "traffic         {:.0} reports/s ({:.0} B/s), {:.0} acks/s",
        r.reports_per_s, r.report_bytes_per_s, r.acks_per_s
    );
    println!("disconnects     {}", r.disconnects);
    match &r.resync {
        Some(resync) => println!(
            "resync          {} hosts in {} ms ({} ms from the first reconnect); {} partial",
            resync.hosts,
            resync.resync_ms,
            resync
                .from_first_reconnect_ms
                .map(|ms| ms.to_string())
                .unwrap_or_else(|| "-".into()),
            r.partial_resyncs
        ),
        None if r.partial_resyncs > 0 => {
            println!(
                "resync          {} partial, none of every host",
                r.partial_resyncs
            )
        }
        None => {}
    }
    if !r.kills.is_empty() {
        let missed = r.kills.iter().filter(|k| k.detect_ms.is_none()).count();
        println!(
            "killed hosts    {} marked down after max {} ms, mean {} ms{}",
            r.kills.len(),
            r.kill_detect_max_ms
                .map(|ms| ms.to_string())
                .unwrap_or_else(|| "-".into()),
            r.kill_detect_mean_ms
                .map(|ms| format!("{ms:.0}"))
                .unwrap_or_else(|| "-".into()),
            if missed > 0 {
                format!(" ({missed} never)")
            } else {
                String::new()
            }
        );
    }
    println!(
        "this process    RSS {:.0} MiB (peak {:.0}), CPU {:.1} s, {:.0}% of a core while measuring",
        r.rss_mib, r.peak_rss_mib, r.cpu_s, r.cpu_pct_measuring
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let lags: Vec<u32> = (1..=100).collect();
        let p = Percentiles::of(&lags, 1.0).expect("some");
        assert_eq!((p.p50, p.p90, p.p99, p.max), (50.0, 90.0, 99.0, 100.0));
        assert!(Percentiles::of(&[], 1.0).is_none());
        let one = Percentiles::of(&[7], 0.5).expect("one");
        assert_eq!((one.p50, one.max), (3.5, 3.5));
    }

    #[test]
    fn a_resync_completes_when_every_lost_host_is_back() {
        let mut tracker = ResyncTracker::default();
        tracker.host_lost(1_000);
        tracker.host_lost(1_001);
        tracker.host_connected(1_500);
        tracker.host_back(1_600, 2);
        assert!(tracker.completed.is_empty());
        tracker.host_back(1_900, 2);
        let done = &tracker.completed[0];
        assert!(done.all_hosts);
        assert_eq!(
            (done.resync_ms, done.from_first_reconnect_ms),
            (900, Some(400))
        );
        // One of three hosts: partial.
        tracker.host_lost(5_000);
        tracker.host_back(5_100, 3);
        assert!(!tracker.completed[1].all_hosts);
    }

    #[test]
    fn durations_are_seconds_or_humantime() {
        assert_eq!(parse_duration("d", "5").expect("5"), Duration::from_secs(5));
        assert_eq!(
            parse_duration("d", "2m").expect("2m"),
            Duration::from_secs(120)
        );
        assert!(parse_duration("d", "soon").is_err());
    }
}
