//! The long-running subcommands: `up`, `server`, `agent`.

use crate::config::{self, ClientConfig};
use crate::images;
use crate::{AccelArg, AgentArgs, ServerArgs, StrategyArg, UpArgs};
use anyhow::{anyhow, bail, Context, Result};
use herd_agent::drivers::oci::{OciConfig, OciDriver};
use herd_agent::drivers::qemu::launch::Accel;
use herd_agent::drivers::qemu::{AccelChoice, QemuConfig, QemuDriver};
use herd_agent::drivers::sim::{SimConfig, SimDriver};
use herd_agent::utility::UtilityConfig;
use herd_agent::{Agent, AgentConfig, Driver, GuestEvents};
use herd_sched::{SchedPolicy, Strategy};
use herd_server::ServerConfig;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::warn;

fn init_logging() {
    init_logging_with("info,tower_http=warn");
}

/// Logs to stderr, filtered by `HERD_LOG`, else by `default_filter`.
pub(crate) fn init_logging_with(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HERD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// A shutdown signal (Ctrl-C or SIGTERM) that any number of tasks can wait for.
fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let terminated = async {
            match term.as_mut() {
                Some(term) => {
                    term.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminated => {}
        }
        let _ = tx.send(true);
    });
    rx
}

fn on_shutdown(
    rx: &watch::Receiver<bool>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let mut rx = rx.clone();
    async move {
        let _ = rx.wait_for(|stop| *stop).await;
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// How drivers are set up on this host.
pub struct DriverSetup<'a> {
    pub names: &'a [String],
    pub agent_dir: &'a Path,
    /// Holds `images/` (and the kernel package cache).
    pub image_dir: &'a Path,
    pub accel: AccelArg,
    pub reprobe_kvm: bool,
    pub sim_boot_ms: u64,
}

/// The agent's drivers, and the channel its guest modules speak on.
pub struct Drivers {
    pub list: Vec<Arc<dyn Driver>>,
    pub guest_events: Option<GuestEvents>,
}

fn installed(binary: &str) -> bool {
    std::process::Command::new(binary)
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success())
}

/// The drivers named; by default the real ones that work here (qemu, and oci when runc
/// is installed). `sim` is never chosen by default: simulated VMs are for tests and
/// scale runs.
fn build_drivers(setup: &DriverSetup<'_>) -> Result<Drivers> {
    let names: Vec<String> = if setup.names.is_empty() {
        let mut found = Vec::new();
        if installed("qemu-system-x86_64") {
            found.push("qemu".to_string());
        }
        if installed("runc") {
            found.push("oci".to_string());
        }
        if found.is_empty() {
            bail!(
                "no hypervisor here: neither qemu-system-x86_64 nor runc is installed (run \
                 scripts/up, or apt-get install qemu-system-x86 runc), or pass --drivers sim \
                 for simulated VMs"
            );
        }
        found
    } else {
        setup.names.to_vec()
    };
    // One queue for what every driver's guests say: the agent drains one.
    let (guest_tx, guest_rx) = herd_agent::agent::guest_event_channel();
    let mut drivers = Drivers {
        list: Vec::new(),
        guest_events: None,
    };
    for name in names {
        match name.as_str() {
            "qemu" => {
                images::ensure_image(setup.image_dir, "default")?;
                let mut config = QemuConfig::new(herd_image::images_dir(setup.image_dir));
                config.accel = match setup.accel {
                    AccelArg::Auto => AccelChoice::Auto,
                    AccelArg::Tcg => AccelChoice::Force(Accel::Tcg),
                    AccelArg::Kvm => AccelChoice::Force(Accel::Kvm),
                };
                config.reprobe = setup.reprobe_kvm;
                drivers.list.push(Arc::new(QemuDriver::open(
                    setup.agent_dir.join("qemu"),
                    config,
                    guest_tx.clone(),
                )?));
            }
            "oci" => {
                images::ensure_image(setup.image_dir, "default")?;
                let config = OciConfig::new(herd_image::images_dir(setup.image_dir));
                drivers.list.push(Arc::new(OciDriver::open(
                    setup.agent_dir.join("oci"),
                    config,
                    guest_tx.clone(),
                )?));
            }
            "sim" => drivers.list.push(Arc::new(SimDriver::open(
                setup.agent_dir.join("sim"),
                SimConfig {
                    boot_ms: setup.sim_boot_ms,
                    ..SimConfig::default()
                },
            )?)),
            other => bail!("unknown driver {other:?}; drivers are: qemu, oci, sim"),
        }
    }
    if drivers.list.iter().any(|d| d.kind() != "sim") {
        drivers.guest_events = Some(guest_rx);
    }
    Ok(drivers)
}

fn start_agent(config: AgentConfig, drivers: Drivers, util_interval_ms: u64) -> Agent {
    let mut agent = Agent::new(config, drivers.list);
    if let Some(events) = drivers.guest_events {
        agent = agent.with_guest_events(events);
    }
    if util_interval_ms == 0 {
        return agent;
    }
    // Installed and built side by side with `herd`.
    match std::env::current_exe().map(|exe| exe.with_file_name("herd-util")) {
        Ok(program) if program.is_file() => agent.with_utility(UtilityConfig {
            program,
            interval: Duration::from_millis(util_interval_ms),
        }),
        Ok(program) => {
            warn!(
                "no utility module at {} (scripts/up installs it beside herd): this host's \
                 node figures are not reported",
                program.display()
            );
            agent
        }
        Err(e) => {
            warn!("cannot find the utility module: {e}");
            agent
        }
    }
}

fn server_config(args: &ServerArgs, data_dir: PathBuf) -> Result<ServerConfig> {
    // Plain HTTP carries tokens in the clear and lets agents in on tokens alone: only
    // where nobody else can listen.
    if args.insecure_http && !args.listen.ip().is_loopback() {
        bail!(
            "--insecure-http serves plain HTTP and is allowed only on a loopback address \
             (127.0.0.1, ::1); {} is not one: drop --insecure-http to serve HTTPS",
            args.listen
        );
    }
    let scheme = if args.insecure_http { "http" } else { "https" };
    let public_url = args
        .public_url
        .clone()
        .unwrap_or_else(|| format!("{scheme}://{}", args.listen));
    if !public_url.starts_with(&format!("{scheme}://")) {
        bail!(
            "--public-url must start with {scheme}:// (the server speaks {}; \
             --insecure-http switches to plain HTTP on loopback)",
            if args.insecure_http {
                "plain HTTP"
            } else {
                "HTTPS"
            }
        );
    }
    if !(args.host_grace_s > 0.0 && args.host_grace_s.is_finite()) {
        bail!("--host-grace-s must be a positive number of seconds");
    }
    if args.sync_interval_ms == 0 || args.usage_interval_ms == 0 {
        bail!("intervals must be at least 1 ms");
    }
    if !(args.cpu_overcommit > 0.0 && args.memory_overcommit > 0.0) {
        bail!("over-commit ratios must be positive");
    }
    let mut config = ServerConfig::new(data_dir, public_url);
    config.hypervisor_kinds = herd_agent::drivers::KINDS.map(str::to_owned).to_vec();
    config.sync_interval = Duration::from_millis(args.sync_interval_ms);
    config.usage_interval = Duration::from_millis(args.usage_interval_ms);
    config.host_grace = Duration::from_secs_f64(args.host_grace_s);
    config.sched = SchedPolicy {
        cpu_overcommit: args.cpu_overcommit,
        memory_overcommit: args.memory_overcommit,
        strategy: match args.strategy {
            StrategyArg::Spread => Strategy::Spread,
            StrategyArg::Binpack => Strategy::Binpack,
        },
    };
    config.default_hypervisor = args.default_hypervisor.clone();
    config.insecure_http = args.insecure_http;
    Ok(config)
}

/// Returns the admin token, creating it on first start and keeping it (owner-only) in
/// the data dir so that `herd up` can always rewrite the client config.
fn admin_token(cloud: &herd_server::Cloud, data_dir: &Path) -> Result<(String, bool)> {
    let path = data_dir.join("admin.token");
    if let Some(token) = cloud.ensure_admin_token()? {
        config::write_private(&path, token.as_bytes())?;
        return Ok((token, true));
    }
    let token = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "an admin token exists but {} is missing; create a new one",
            path.display()
        )
    })?;
    Ok((token.trim().to_owned(), false))
}

pub async fn up(args: UpArgs) -> Result<()> {
    init_logging();
    let data_dir = args.data_dir.unwrap_or_else(config::default_data_dir);
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let agent_dir = data_dir.join("agent");
    let image_dir = args.image_dir.clone().unwrap_or_else(|| data_dir.clone());
    let drivers = build_drivers(&DriverSetup {
        names: &args.drivers,
        agent_dir: &agent_dir,
        image_dir: &image_dir,
        accel: args.accel,
        reprobe_kvm: args.reprobe_kvm,
        sim_boot_ms: 300,
    })?;
    let server_args = ServerArgs {
        data_dir: None,
        listen: args.listen,
        public_url: None,
        insecure_http: args.insecure_http,
        sync_interval_ms: 1000,
        usage_interval_ms: 10_000,
        host_grace_s: 10.0,
        cpu_overcommit: 4.0,
        memory_overcommit: 1.0,
        strategy: StrategyArg::Spread,
        default_hypervisor: drivers
            .list
            .first()
            .map(|d| d.kind().to_owned())
            .unwrap_or_else(|| "qemu".into()),
    };
    let server_config = server_config(&server_args, data_dir.join("server"))?;
    let public_url = server_config.public_url.clone();
    let cloud = herd_server::open(server_config)?;
    let (token, _) = admin_token(&cloud, &data_dir)?;
    let bound = herd_server::bind(cloud.clone(), args.listen)
        .await
        .map_err(|e| anyhow!("{e}: is herd already up? (use --listen to pick another address)"))?;
    // The client config pins this server's CA, and the local agent is handed it
    // directly: the whole HTTPS and mTLS path runs even on one machine.
    let ca_pem = cloud.ca.as_ref().map(|ca| ca.pem().to_owned());
    let config_path = config::save(&ClientConfig {
        url: Some(public_url.clone()),
        token: Some(token),
        ca_pem: ca_pem.clone(),
    })?;

    let join_token = if agent_dir.join("agent.json").exists() {
        None
    } else {
        Some(cloud.create_join_token(Duration::from_secs(600))?.0)
    };
    let agent = start_agent(
        AgentConfig {
            server_url: Some(public_url.clone()),
            join_token,
            data_dir: agent_dir,
            hostname: hostname(),
            cpus: None,
            memory_mib: None,
            ca_pem,
            ca_fingerprint: None,
            transfer_port: 0,
            labels: Default::default(),
            round_trips: true,
        },
        drivers,
        args.util_interval_ms,
    );
    let stop = shutdown_signal();
    let agent_task = tokio::spawn(agent.run(on_shutdown(&stop)));
    let serving = tokio::spawn(bound.serve(on_shutdown(&stop)));
    // Say "up" once the local host can take VMs, not before.
    eprintln!("waiting for the local agent to join (probing hypervisors)...");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !cloud
        .hosts()
        .map(|hosts| {
            hosts
                .iter()
                .any(|h| h.record.up && h.live.as_ref().is_some_and(|l| l.connected))
        })
        .unwrap_or(false)
    {
        if agent_task.is_finished() || serving.is_finished() || std::time::Instant::now() > deadline
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if agent_task.is_finished() {
        // The local agent could not start (no usable driver, say): that is herd up failing.
        match agent_task.await {
            Ok(Err(e)) => return Err(e).context("the local agent stopped"),
            Err(e) => bail!("agent task failed: {e}"),
            Ok(Ok(())) => return Ok(()),
        }
    }
    eprintln!("herd is up at {public_url}");
    eprintln!("  data:          {}", data_dir.display());
    eprintln!("  client config: {}", config_path.display());
    eprintln!("  try:           herd vm launch web && herd vm ls");
    match serving.await {
        Ok(result) => result?,
        Err(e) => bail!("server task failed: {e}"),
    }
    match agent_task.await {
        Ok(result) => result?,
        Err(e) => bail!("agent task failed: {e}"),
    }
    Ok(())
}

pub async fn server(args: ServerArgs) -> Result<()> {
    init_logging();
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| config::default_data_dir().join("server"));
    let config = server_config(&args, data_dir.clone())?;
    let public_url = config.public_url.clone();
    let cloud = herd_server::open(config)?;
    let (token, created) = admin_token(&cloud, &data_dir)?;
    if created {
        eprintln!(
            "admin token (also in {}): {token}",
            data_dir.join("admin.token").display()
        );
    }
    let fingerprint = cloud.ca.as_ref().map(|ca| ca.fingerprint());
    let bound = herd_server::bind(cloud, args.listen).await?;
    eprintln!(
        "herd server listening on {} (public URL {public_url})",
        bound.addr
    );
    match fingerprint {
        Some(fingerprint) => eprintln!(
            "CA fingerprint (agents join with --ca-fingerprint; clients pin {}): {fingerprint}",
            data_dir.join("ca.pem").display()
        ),
        None => eprintln!("serving plain HTTP (--insecure-http): tokens travel in the clear"),
    }
    let stop = shutdown_signal();
    bound.serve(on_shutdown(&stop)).await?;
    Ok(())
}

pub async fn agent(args: AgentArgs) -> Result<()> {
    init_logging();
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| config::default_data_dir().join("agent"));
    let image_dir = args
        .image_dir
        .clone()
        .unwrap_or_else(config::default_data_dir);
    let drivers = build_drivers(&DriverSetup {
        names: &args.drivers,
        agent_dir: &data_dir,
        image_dir: &image_dir,
        accel: args.accel,
        reprobe_kvm: args.reprobe_kvm,
        sim_boot_ms: args.sim_boot_ms,
    })?;
    let ca_pem = match &args.ca {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("--ca: cannot read {}", path.display()))?,
        ),
        None => None,
    };
    let agent = start_agent(
        AgentConfig {
            server_url: args.join.clone(),
            join_token: args.token.clone(),
            data_dir,
            hostname: args.hostname.clone().unwrap_or_else(hostname),
            cpus: args.cpus,
            memory_mib: args.memory_mib,
            ca_pem,
            ca_fingerprint: args.ca_fingerprint.clone(),
            transfer_port: args.transfer_port,
            labels: args.labels.iter().cloned().collect(),
            round_trips: true,
        },
        drivers,
        args.util_interval_ms,
    );
    let stop = shutdown_signal();
    agent.run(on_shutdown(&stop)).await?;
    Ok(())
}
