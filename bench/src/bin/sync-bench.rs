//! Delta state sync against full-state reporting, on the real code path.
//!
//! Agents are the real `Reporter`; messages are encoded with the real codec; the server
//! side is the real `apply_report` writing to a real SQLite store with fsync. Counted on
//! the wire, both ways: every state report and usage batch, every ack, and the
//! WebSocket framing (client frames are masked). TCP/IP headers are shown separately.
//!
//! Both modes run on the same cloud, the same VMs and the same random churn:
//! - full: every interval each host sends the full state of every VM and every VM's
//!   usage counters (what a system without deltas must send to keep the same view);
//! - delta: each interval only changed VMs (or a heartbeat); usage every
//!   `--usage-every` intervals and only for counters that moved past a threshold.

use anyhow::{Context, Result};
use clap::Parser;
use herd_bus::EmbeddedBus;
use herd_proto::wire::{self, AgentMsg, HostId, HostUtil, Report, ServerMsg, VmId, VmUsage};
use herd_proto::VmState;
use herd_server::cloud::LaunchSpec;
use herd_server::{ingest, Cloud, ServerConfig};
use herd_sync::{HostView, Reporter, ReporterState};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 100)]
    hosts: usize,
    #[arg(long, default_value_t = 100)]
    vms_per_host: usize,
    /// Fraction of all VMs that change state each interval.
    #[arg(long, default_value_t = 0.01)]
    churn: f64,
    /// Intervals measured per mode.
    #[arg(long, default_value_t = 60)]
    intervals: usize,
    /// Usage is sent every this many intervals in delta mode.
    #[arg(long, default_value_t = 10)]
    usage_every: usize,
    /// Fractions of VMs busy enough that their counters cross the threshold.
    #[arg(long, value_delimiter = ',', default_value = "0,0.1,0.25,1")]
    busy: Vec<f64>,
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Rows as CSV, one per busy fraction and mode, for the "delta vs full sync bytes"
    /// plot.
    #[arg(long)]
    csv: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// Bytes of a WebSocket frame around `len` payload bytes.
fn ws_frame(len: usize, masked: bool) -> usize {
    let ext = if len <= 125 {
        0
    } else if len <= 65535 {
        2
    } else {
        8
    };
    2 + ext + if masked { 4 } else { 0 } + len
}

/// TCP/IP header bytes for a message of `len` bytes (IPv4 + TCP with timestamps).
fn tcp_ip(len: usize) -> usize {
    len.div_ceil(1448).max(1) * 52
}

/// CPU time this thread has used, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

#[derive(Default, Clone, Copy, serde::Serialize)]
struct Tally {
    state_bytes: usize,
    usage_bytes: usize,
    tcp_ip_bytes: usize,
    messages: usize,
    server_cpu_ns: u64,
}

impl Tally {
    fn total(&self) -> usize {
        self.state_bytes + self.usage_bytes
    }
}

struct Host {
    id: HostId,
    vms: Vec<VmId>,
    truth: BTreeMap<VmId, VmState>,
    reporter: Reporter,
    view: HostView,
    usage: BTreeMap<VmId, VmUsage>,
    sent_usage: BTreeMap<VmId, VmUsage>,
}

struct World {
    interval_no: u64,
    cloud: Arc<Cloud>,
    hosts: Vec<Host>,
    rng: StdRng,
    runtime: tokio::runtime::Runtime,
}

impl World {
    /// Sends one agent message and the server's answer, counting both.
    fn exchange(
        &mut self,
        host_idx: usize,
        msg: &AgentMsg,
        tally: &mut Tally,
        is_usage: bool,
    ) -> Result<()> {
        let frame = wire::encode(msg);
        let up = ws_frame(frame.len(), true);
        let start = thread_cpu_ns();
        let decoded: AgentMsg = wire::decode(&frame).context("decode")?;
        let host = &mut self.hosts[host_idx];
        let reply = match &decoded {
            // The store writes run on the group commit's writer thread, so the CPU
            // counted here is the ingest's own, without SQLite.
            AgentMsg::Report(report) => self.runtime.block_on(ingest::apply_report(
                &self.cloud,
                host.id,
                &mut host.view,
                report,
            ))?,
            AgentMsg::Usage { sampled_at_ms, vms } => {
                self.runtime
                    .block_on(self.cloud.record_usage(host.id, *sampled_at_ms, vms))?;
                None
            }
            _ => None,
        };
        let reply_frame = reply.as_ref().map(wire::encode);
        tally.server_cpu_ns += thread_cpu_ns() - start;
        if let Some(ServerMsg::NeedFull { reason }) = &reply {
            anyhow::bail!("unexpected full-sync request: {reason}");
        }
        let down = reply_frame
            .as_ref()
            .map(|f| ws_frame(f.len(), false))
            .unwrap_or(0);
        if is_usage {
            tally.usage_bytes += up + down;
        } else {
            tally.state_bytes += up + down;
        }
        tally.tcp_ip_bytes += tcp_ip(up) + if down > 0 { tcp_ip(down) } else { 0 };
        tally.messages += 1 + usize::from(down > 0);
        Ok(())
    }

    /// Changes the state of `n` random VMs (running <-> paused).
    fn churn(&mut self, n: usize) {
        for _ in 0..n {
            let host_idx = self.rng.gen_range(0..self.hosts.len());
            let host = &mut self.hosts[host_idx];
            let vm = host.vms[self.rng.gen_range(0..host.vms.len())];
            let state = host.truth.entry(vm).or_insert(VmState::Running);
            *state = if *state == VmState::Running {
                VmState::Paused
            } else {
                VmState::Running
            };
        }
    }

    /// Advances every VM's counters by one interval; busy VMs cross the thresholds.
    fn advance_usage(&mut self, busy: f64) {
        for host in &mut self.hosts {
            for (idx, vm) in host.vms.iter().enumerate() {
                let is_busy = (idx as f64) < busy * host.vms.len() as f64;
                let usage = host.usage.entry(*vm).or_insert(VmUsage {
                    vm: *vm,
                    mem_kib: 262_144,
                    ..VmUsage::default()
                });
                if is_busy {
                    usage.cpu_ms += 650;
                    usage.net_rx_bytes += 300_000;
                    usage.net_tx_bytes += 150_000;
                    usage.disk_write_bytes += 200_000;
                } else {
                    usage.cpu_ms += 5;
                    usage.net_rx_bytes += 200;
                }
            }
        }
    }

    /// Puts every VM's "last sent" counters at a random point within the threshold
    /// window, as in a system that has run for long: crossings then happen at their
    /// steady-state rate instead of all at once.
    fn steady_usage_phase(&mut self) {
        for host in &mut self.hosts {
            for usage in host.usage.values() {
                let sent = VmUsage {
                    cpu_ms: usage.cpu_ms.saturating_sub(self.rng.gen_range(0..1000)),
                    net_rx_bytes: usage
                        .net_rx_bytes
                        .saturating_sub(self.rng.gen_range(0..1 << 20)),
                    net_tx_bytes: usage
                        .net_tx_bytes
                        .saturating_sub(self.rng.gen_range(0..1 << 20)),
                    disk_write_bytes: usage
                        .disk_write_bytes
                        .saturating_sub(self.rng.gen_range(0..1 << 20)),
                    ..*usage
                };
                host.sent_usage.insert(usage.vm, sent);
            }
        }
    }

    fn interval(
        &mut self,
        full: bool,
        n_churn: usize,
        busy: f64,
        send_usage: bool,
        tally: &mut Tally,
    ) -> Result<()> {
        self.interval_no += 1;
        self.churn(n_churn);
        self.advance_usage(busy);
        for host_idx in 0..self.hosts.len() {
            let host = &mut self.hosts[host_idx];
            let util = HostUtil {
                cpu_permille: 400 + (host_idx % 200) as u16,
                mem_used_mib: 12_000 + host_idx as u64,
                n_vms: host.truth.len() as u32,
            };
            if full {
                host.reporter.request_full();
            }
            let report: Report = host.reporter.tick(&host.truth, util, vec![]);
            self.exchange(host_idx, &AgentMsg::Report(report), tally, false)?;
            let host = &mut self.hosts[host_idx];
            let usage: Vec<VmUsage> = if full {
                host.usage.values().copied().collect()
            } else if send_usage {
                let moved: Vec<VmUsage> = host
                    .usage
                    .values()
                    .filter(|u| {
                        let last = host.sent_usage.get(&u.vm).copied().unwrap_or_default();
                        u.cpu_ms - last.cpu_ms >= 1000
                            || u.net_rx_bytes - last.net_rx_bytes >= 1 << 20
                            || u.net_tx_bytes - last.net_tx_bytes >= 1 << 20
                            || u.disk_write_bytes - last.disk_write_bytes >= 1 << 20
                    })
                    .copied()
                    .collect();
                for u in &moved {
                    host.sent_usage.insert(u.vm, *u);
                }
                moved
            } else {
                vec![]
            };
            if !usage.is_empty() {
                let sampled_at_ms = 1_700_000_000_000 + self.interval_no * 1000;
                self.exchange(
                    host_idx,
                    &AgentMsg::Usage {
                        sampled_at_ms,
                        vms: usage,
                    },
                    tally,
                    true,
                )?;
            }
        }
        Ok(())
    }
}

fn setup(args: &Args, dir: &std::path::Path) -> Result<World> {
    let mut config = ServerConfig::new(dir.to_path_buf(), "http://127.0.0.1:1".into());
    config.default_hypervisor = "sim".into();
    let bus = EmbeddedBus::open(&dir.join("bus.db"))?;
    let cloud = Arc::new(Cloud::open(config, Box::new(bus))?);
    let mut hosts = Vec::new();
    let info = [herd_proto::wire::HypervisorInfo {
        kind: "sim".into(),
        detail: "bench".into(),
    }];
    for n in 0..args.hosts {
        let (token, _) = cloud.create_join_token(std::time::Duration::from_secs(60))?;
        let joined = cloud.join(&herd_proto::join::JoinRequest {
            join_token: token,
            hostname: format!("host-{n}"),
            csr_pem: String::new(),
            labels: Default::default(),
        })?;
        cloud.host_hello(
            joined.host_id,
            &format!("host-{n}"),
            &info,
            1000,
            1 << 30,
            "bench",
        )?;
        hosts.push(Host {
            id: joined.host_id,
            vms: vec![],
            truth: BTreeMap::new(),
            reporter: Reporter::start(ReporterState::default()),
            view: HostView::new(),
            usage: BTreeMap::new(),
            sent_usage: BTreeMap::new(),
        });
    }
    let index: BTreeMap<HostId, usize> = hosts.iter().enumerate().map(|(i, h)| (h.id, i)).collect();
    for n in 0..args.hosts * args.vms_per_host {
        let vm = cloud.launch(LaunchSpec {
            name: format!("vm-{n}"),
            project: None,
            hypervisor: Some("sim".into()),
            vcpus: Some(1),
            memory_mib: Some(256),
            image: None,
            command: vec![],
            policy: Default::default(),
            keep_running: false,
            disk_mib: None,
        })?;
        let host = vm.host.context("every VM must be placed")?;
        let idx = index[&host];
        hosts[idx].vms.push(vm.id);
        hosts[idx].truth.insert(vm.id, VmState::Running);
    }
    let mut world = World {
        interval_no: 0,
        cloud,
        hosts,
        rng: StdRng::seed_from_u64(args.seed),
        runtime: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("tokio runtime")?,
    };
    // The first report of every agent is a full one; not counted.
    let mut warmup = Tally::default();
    world.interval(true, 0, 0.0, false, &mut warmup)?;
    Ok(world)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let n_vms = args.hosts * args.vms_per_host;
    let n_churn = ((n_vms as f64) * args.churn).round() as usize;
    eprintln!("setting up {} hosts and {n_vms} VMs...", args.hosts);
    let mut world = setup(&args, dir.path())?;
    println!(
        "{} hosts, {n_vms} VMs, {n_churn} state changes per interval ({:.1}% churn), {} intervals per mode",
        args.hosts,
        args.churn * 100.0,
        args.intervals
    );
    println!(
        "delta: usage every {} intervals, only counters past 1 CPU-s / 1 MiB; full: state and usage of every VM every interval",
        args.usage_every
    );
    println!("bytes are per interval, all hosts, both directions, with WebSocket framing; CPU is server-side\n");
    println!(
        "{:>6}  {:>12} {:>12} {:>8}  {:>11} {:>11} {:>8}  {:>12} {:>12} {:>8}",
        "busy",
        "full B",
        "delta B",
        "ratio",
        "full+TCP B",
        "delta+TCP",
        "ratio",
        "full CPU ms",
        "delta CPU",
        "ratio"
    );
    let mut rows = Vec::new();
    let mut csv = String::from(
        "hosts,vms,churn_pct,busy_pct,mode,bytes_per_interval,state_bytes_per_interval,\
         usage_bytes_per_interval,with_tcp_ip_bytes_per_interval,server_cpu_ms_per_interval\n",
    );
    for &busy in &args.busy {
        let mut full = Tally::default();
        let mut delta = Tally::default();
        for _ in 0..args.intervals {
            world.interval(true, n_churn, busy, false, &mut full)?;
        }
        world.steady_usage_phase();
        for i in 0..args.intervals {
            world.interval(
                false,
                n_churn,
                busy,
                (i + 1) % args.usage_every == 0,
                &mut delta,
            )?;
        }
        let per = |x: usize| x as f64 / args.intervals as f64;
        let cpu = |t: &Tally| t.server_cpu_ns as f64 / 1e6 / args.intervals as f64;
        let row = serde_json::json!({
            "busy_fraction": busy,
            "full_bytes_per_interval": per(full.total()),
            "delta_bytes_per_interval": per(delta.total()),
            "bytes_ratio": per(full.total()) / per(delta.total()),
            "full_state_only_bytes": per(full.state_bytes),
            "delta_state_only_bytes": per(delta.state_bytes),
            "state_only_ratio": per(full.state_bytes) / per(delta.state_bytes),
            "full_with_tcp_ip": per(full.total() + full.tcp_ip_bytes),
            "delta_with_tcp_ip": per(delta.total() + delta.tcp_ip_bytes),
            "full_server_cpu_ms": cpu(&full),
            "delta_server_cpu_ms": cpu(&delta),
            "cpu_ratio": cpu(&full) / cpu(&delta),
        });
        println!(
            "{:>5.0}%  {:>12.0} {:>12.0} {:>7.1}x  {:>11.0} {:>11.0} {:>7.1}x  {:>12.2} {:>12.2} {:>7.1}x",
            busy * 100.0,
            per(full.total()),
            per(delta.total()),
            per(full.total()) / per(delta.total()),
            per(full.total() + full.tcp_ip_bytes),
            per(delta.total() + delta.tcp_ip_bytes),
            per(full.total() + full.tcp_ip_bytes) / per(delta.total() + delta.tcp_ip_bytes),
            cpu(&full),
            cpu(&delta),
            cpu(&full) / cpu(&delta),
        );
        rows.push(row);
        for (mode, tally) in [("full", &full), ("delta", &delta)] {
            csv.push_str(&format!(
                "{},{n_vms},{},{},{mode},{:.0},{:.0},{:.0},{:.0},{:.3}\n",
                args.hosts,
                args.churn * 100.0,
                busy * 100.0,
                per(tally.total()),
                per(tally.state_bytes),
                per(tally.usage_bytes),
                per(tally.total() + tally.tcp_ip_bytes),
                cpu(tally),
            ));
        }
    }
    let state_only: Vec<String> = rows
        .iter()
        .map(|r| format!("{:.1}x", r["state_only_ratio"].as_f64().unwrap_or(0.0)))
        .collect();
    println!(
        "\nstate channel alone (no usage), full vs delta bytes: {}",
        state_only.join(", ")
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&rows)?)?;
    }
    if let Some(path) = &args.csv {
        std::fs::write(path, csv)?;
    }
    Ok(())
}
