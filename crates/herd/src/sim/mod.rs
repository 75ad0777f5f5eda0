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

mod args;
mod fleet;
mod measure;
mod probe;
mod report;
mod setup;
mod stats;

pub use args::SimArgs;

use crate::client::Client;
use crate::config;
use crate::Output;
use anyhow::{bail, Context, Result};
use args::parse_duration;
use fleet::Fleet;
use herd_server::api::HostInfo;
use probe::{take_lags, Shared};
use report::{print_report, ChurnStep, SimReport};
use stats::{process_stats, Percentiles};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

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
}
