//! The agent's life: join once, discover, configure, then hold one connection to the
//! server's bus for as long as the process lives.
//!
//! Everything the agent must not forget across a kill -9 is in small files in its data
//! dir: its credentials (`agent.json`; over HTTPS also its key `agent.key`, its
//! certificate `agent.pem` and the server's CA `ca.pem`) and its sync state
//! (`state.json`: epoch, last reported VM states, the newest command generation applied
//! per VM). VMs live in their drivers and outlive the agent; on start it re-adopts them
//! by listing them.
//!
//! Trust: over HTTPS the agent trusts only the server's CA. Before its first join it
//! has that CA from the caller (`ca_pem`, e.g. `herd up`) or takes it from the server's
//! handshake only if it matches the pinned fingerprint (`ca_fingerprint`). It joins
//! with a CSR and from then on presents the certificate issued for its host id on every
//! connection (mTLS) besides its token.
//!
//! Scale runs (`herd sim`) run thousands of agents in one process through this same
//! code, with two switches: [`Agent::with_ephemeral_state`] keeps the sync state in
//! memory instead of syncing it to disk every report, and [`Agent::with_probe`] lets
//! the harness see reports, acks and connections as they happen.

use crate::backstop::{Backstop, Enforce};
use crate::converge::{next_step, Plan};
use crate::driver::{Driver, DriverError};
use crate::hostinfo::{self, CpuMeter};
use crate::persist;
use crate::probe::SyncProbe;
use futures_util::{SinkExt, StreamExt};
use herd_proto::guest::GuestMsg;
use herd_proto::join::{Discovery, JoinRequest, JoinResponse};
use herd_proto::policy::PolicyAction;
use herd_proto::wire::{
    self, AgentMsg, Capacity, Command, CommandId, GuestReport, HostId, HostUtil, ServerMsg, VmId,
    VmUsage, PROTOCOL_VERSION,
};
use herd_proto::VmState;
use herd_sync::{events_of, Diff, Reporter, ReporterState};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tracing::{debug, info, warn};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot join {url}: {reason}")]
    Join { url: String, reason: String },
    #[error("this host has no credentials yet: run with --join URL --token T")]
    NotJoined,
    #[error("no usable driver on this host (tried {tried})")]
    NoDriver { tried: String },
    #[error("agent state: {0}")]
    State(String),
    #[error("TLS")]
    Tls(#[from] herd_tls::TlsError),
    #[error(transparent)]
    Driver(#[from] DriverError),
}

/// How the agent is told to run.
#[derive(Clone)]
pub struct AgentConfig {
    /// The server URL; needed on first join, remembered afterwards.
    pub server_url: Option<String>,
    pub join_token: Option<String>,
    pub data_dir: PathBuf,
    pub hostname: String,
    /// Capacity to offer; `None` fields are read from /proc.
    pub cpus: Option<u32>,
    pub memory_mib: Option<u64>,
    /// The server's CA (PEM), when the caller already trusts it (`herd up`, `--ca`).
    pub ca_pem: Option<String>,
    /// The SHA-256 fingerprint of the server's CA, pinned for the first join over
    /// HTTPS when `ca_pem` is not given.
    pub ca_fingerprint: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Credentials {
    server_url: String,
    host_id: HostId,
    agent_token: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct SavedState {
    reporter: ReporterState,
    /// The newest desired-state generation applied per VM: a command at or below it is
    /// a replay and is acknowledged without acting again.
    applied: BTreeMap<VmId, u64>,
    /// Policies the agent enforces as a backstop.
    #[serde(default)]
    backstop: Backstop,
}

/// Usage counters are sent when one moved at least this much since last sent.
const USAGE_CPU_MS_STEP: u64 = 1_000;
const USAGE_BYTES_STEP: u64 = 1 << 20;
const USAGE_MEM_KIB_STEP: u64 = 16 * 1024;

/// Messages from guest modules, named by the VM whose channel they came in on.
pub type GuestEvents = mpsc::Receiver<(VmId, GuestMsg)>;
pub type GuestEventSender = mpsc::Sender<(VmId, GuestMsg)>;

/// Guest messages held while the agent cannot pass them on (no server, a slow one).
/// Bounded, so that guests cannot grow the agent while nobody drains the queue; the
/// drivers drop status chatter past it and retry what matters.
pub const GUEST_EVENT_BACKLOG: usize = 4096;

/// The queue from the drivers' guest channels to the agent.
pub fn guest_event_channel() -> (GuestEventSender, GuestEvents) {
    mpsc::channel(GUEST_EVENT_BACKLOG)
}

/// How the agent reaches its server once joined: over HTTPS, a client that trusts only
/// the server's CA and presents this host's certificate, for HTTP and the bus alike.
#[derive(Clone)]
struct Transport {
    http: reqwest::Client,
    tls: Option<Arc<herd_tls::rustls::ClientConfig>>,
}

/// The bus carries small frames (reports, acks, commands); tungstenite's default
/// 128 KiB read buffer, zero-filled per connection, would be most of an agent's memory
/// when thousands run in one process. Larger frames still fit: the buffer grows.
const BUS_READ_BUFFER: usize = 8 * 1024;

/// The agent's HTTP client. It makes one request (discovery) before a connection to the
/// bus, and not even that on a quick reconnect, so an idle pooled connection would only
/// hold a socket on both ends until it times out.
fn http_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder().pool_max_idle_per_host(0)
}

impl Transport {
    fn plain() -> Result<Transport, AgentError> {
        let http = http_builder()
            .build()
            .map_err(|e| AgentError::State(format!("building the HTTP client: {e}")))?;
        Ok(Transport { http, tls: None })
    }

    fn tls(config: herd_tls::rustls::ClientConfig) -> Result<Transport, AgentError> {
        let http = http_builder()
            .use_preconfigured_tls(config.clone())
            .build()
            .map_err(|e| AgentError::State(format!("building the HTTPS client: {e}")))?;
        Ok(Transport {
            http,
            tls: Some(Arc::new(config)),
        })
    }
}

pub struct Agent {
    config: AgentConfig,
    drivers: Vec<Arc<dyn Driver>>,
    guest_events: Option<GuestEvents>,
    ephemeral_state: bool,
    probe: Option<Arc<dyn SyncProbe>>,
}

impl Agent {
    pub fn new(config: AgentConfig, drivers: Vec<Arc<dyn Driver>>) -> Agent {
        Agent {
            config,
            drivers,
            guest_events: None,
            ephemeral_state: false,
            probe: None,
        }
    }

    /// Keeps the sync state (`state.json`) in memory: it is written, without fsync,
    /// only when the agent starts (so epochs still increase across runs) and when it
    /// stops cleanly, instead of durably before every report. For sim scale runs only:
    /// after a crash the agent compares its VMs with an older last report. The
    /// credentials from the join are written durably as always.
    pub fn with_ephemeral_state(mut self, ephemeral: bool) -> Agent {
        self.ephemeral_state = ephemeral;
        self
    }

    /// Tells `probe` about connections, reports and acks (see [`SyncProbe`]).
    pub fn with_probe(mut self, probe: Arc<dyn SyncProbe>) -> Agent {
        self.probe = Some(probe);
        self
    }

    /// Relays what guest modules say to the server.
    pub fn with_guest_events(mut self, events: GuestEvents) -> Agent {
        self.guest_events = Some(events);
        self
    }

    fn credentials_path(&self) -> PathBuf {
        self.config.data_dir.join("agent.json")
    }

    fn state_path(&self) -> PathBuf {
        self.config.data_dir.join("state.json")
    }

    fn tls_paths(&self) -> [PathBuf; 3] {
        let dir = &self.config.data_dir;
        [
            dir.join("agent.key"),
            dir.join("agent.pem"),
            dir.join("ca.pem"),
        ]
    }

    /// How to reach the server with these credentials: over HTTPS with the key,
    /// certificate and CA saved at join.
    fn transport(&self, creds: &Credentials) -> Result<Transport, AgentError> {
        if !creds.server_url.starts_with("https://") {
            return Transport::plain();
        }
        let [key, cert, ca] = self.tls_paths().map(|path| {
            std::fs::read_to_string(&path).map_err(|e| {
                AgentError::State(format!(
                    "{}: {e} (this host joined over HTTPS and needs its key, certificate \
                     and CA; join again with a new token and an empty data dir)",
                    path.display()
                ))
            })
        });
        let config = herd_tls::client_config(&ca?, Some((&cert?, &key?)))?;
        Transport::tls(config)
    }

    /// The CA to trust for a first join over HTTPS: given, or taken from the server's
    /// handshake if it matches the pinned fingerprint.
    async fn ca_for_join(&self, url: &str) -> Result<String, AgentError> {
        if let Some(pem) = &self.config.ca_pem {
            return Ok(pem.clone());
        }
        let Some(fingerprint) = &self.config.ca_fingerprint else {
            return Err(AgentError::Join {
                url: url.to_owned(),
                reason: "the server speaks HTTPS but no CA is pinned: pass --ca-fingerprint \
                         (`herd host join-token` prints it) or --ca with the server's ca.pem"
                    .into(),
            });
        };
        let pem = herd_tls::fetch_pinned_ca(url, fingerprint).await?;
        info!(fingerprint = %herd_tls::normalize_fingerprint(fingerprint)?, "pinned the server's CA");
        Ok(pem)
    }

    /// Joins with the one-time token if this host has no credentials yet.
    async fn credentials(&self) -> Result<Credentials, AgentError> {
        std::fs::create_dir_all(&self.config.data_dir)
            .map_err(|e| AgentError::State(format!("creating data dir: {e}")))?;
        if let Some(creds) = persist::load_json::<Credentials>(&self.credentials_path())
            .map_err(AgentError::State)?
        {
            return Ok(creds);
        }
        let (Some(url), Some(token)) = (&self.config.server_url, &self.config.join_token) else {
            return Err(AgentError::NotJoined);
        };
        let url = url.trim_end_matches('/').to_owned();
        let join_err = |reason: String| AgentError::Join {
            url: url.clone(),
            reason,
        };
        let ca_pem = if url.starts_with("https://") {
            Some(self.ca_for_join(&url).await?)
        } else {
            None
        };
        let transport = match &ca_pem {
            Some(ca) => Transport::tls(herd_tls::client_config(ca, None)?)?,
            None => Transport::plain()?,
        };
        let (key_pem, csr_pem) = herd_tls::agent_key_and_csr()?;
        let response = transport
            .http
            .post(format!("{url}/v1/agent/join"))
            .json(&JoinRequest {
                join_token: token.clone(),
                hostname: self.config.hostname.clone(),
                csr_pem,
            })
            .send()
            .await
            .map_err(|e| join_err(error_chain(&e)))?;
        if !response.status().is_success() {
            let status = response.status();
            let body = response.text().await.unwrap_or_default();
            return Err(join_err(format!("{status}: {body}")));
        }
        let joined: JoinResponse = response.json().await.map_err(|e| join_err(e.to_string()))?;
        if let Some(ca_pem) = &ca_pem {
            let Some(cert_pem) = &joined.certificate_pem else {
                return Err(join_err("the server issued no certificate".into()));
            };
            // The server's word on its CA must be the CA this connection was verified
            // with; anything else is a confused or hostile server.
            let named = joined.ca_pem.as_deref().map(herd_tls::fingerprint_of_pem);
            if !matches!(named, Some(Ok(named)) if named == herd_tls::fingerprint_of_pem(ca_pem)?) {
                return Err(join_err(
                    "the server named a CA other than the one it was verified with".into(),
                ));
            }
            let [key_path, cert_path, ca_path] = self.tls_paths();
            let save = |path: &PathBuf, bytes: &str, private: bool| {
                let written = if private {
                    persist::write_private(path, bytes.as_bytes())
                } else {
                    persist::write_atomic(path, bytes.as_bytes())
                };
                written.map_err(|e| AgentError::State(format!("saving {}: {e}", path.display())))
            };
            save(&key_path, &key_pem, true)?;
            save(&cert_path, cert_pem, false)?;
            save(&ca_path, ca_pem, false)?;
        }
        let creds = Credentials {
            server_url: url,
            host_id: joined.host_id,
            agent_token: joined.agent_token,
        };
        let bytes = serde_json::to_vec_pretty(&creds)
            .map_err(|e| AgentError::State(format!("encoding credentials: {e}")))?;
        // Last, and owner-only (it holds the agent token): its presence means "joined".
        persist::write_private(&self.credentials_path(), &bytes)
            .map_err(|e| AgentError::State(format!("saving credentials: {e}")))?;
        info!(host = %creds.host_id, "joined");
        Ok(creds)
    }

    async fn discover(
        &self,
        transport: &Transport,
        creds: &Credentials,
    ) -> Result<Discovery, String> {
        let response = transport
            .http
            .get(format!("{}/v1/agent/discovery", creds.server_url))
            .bearer_auth(&creds.agent_token)
            .send()
            .await
            .map_err(|e| error_chain(&e))?;
        if !response.status().is_success() {
            return Err(format!("discovery answered {}", response.status()));
        }
        response.json().await.map_err(|e| e.to_string())
    }

    /// Probes every driver and keeps the usable ones.
    async fn configure(&mut self) -> Result<Vec<wire::HypervisorInfo>, AgentError> {
        let mut usable = Vec::new();
        let mut infos = Vec::new();
        let mut tried = Vec::new();
        for driver in &self.drivers {
            tried.push(driver.kind());
            match driver.probe().await {
                Ok(info) => {
                    info!(kind = driver.kind(), detail = %info.detail, "driver ready");
                    infos.push(info);
                    usable.push(driver.clone());
                }
                Err(e) => warn!(kind = driver.kind(), "driver unusable: {e}"),
            }
        }
        if usable.is_empty() {
            return Err(AgentError::NoDriver {
                tried: tried.join(", "),
            });
        }
        self.drivers = usable;
        Ok(infos)
    }

    fn capacity(&self) -> Capacity {
        match (self.config.cpus, self.config.memory_mib) {
            (Some(cpus), Some(memory_mib)) => Capacity { cpus, memory_mib },
            (cpus, memory_mib) => {
                let probed = hostinfo::capacity();
                Capacity {
                    cpus: cpus.unwrap_or(probed.cpus),
                    memory_mib: memory_mib.unwrap_or(probed.memory_mib),
                }
            }
        }
    }

    /// Runs until `shutdown` resolves, then closes its connection politely. Connection
    /// losses are retried forever.
    pub async fn run(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), AgentError> {
        let creds = self.credentials().await?;
        let transport = self.transport(&creds)?;
        let hypervisors = self.configure().await?;
        let saved: SavedState = persist::load_json(&self.state_path())
            .map_err(AgentError::State)?
            .unwrap_or_default();
        let mut session = Session {
            reporter: Reporter::start(saved.reporter),
            applied: saved.applied,
            backstop: saved.backstop,
            last_guest_word: HashMap::new(),
            drivers: self.drivers.clone(),
            state_path: self.state_path(),
            cpu: CpuMeter::default(),
            usage_sent: HashMap::new(),
            running: HashMap::new(),
            guest_events: self.guest_events.take(),
            ephemeral_state: self.ephemeral_state,
            state_dirty: true,
            saved_epoch: None,
            probe: self.probe.clone(),
            was_connected: false,
        };
        if self.ephemeral_state {
            // Once now, so that the new epoch is on disk even if this process dies.
            session.write_state().map_err(AgentError::State)?;
        }
        let capacity = self.capacity();
        let hello = AgentMsg::Hello {
            protocol: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            hostname: self.config.hostname.clone(),
            capacity,
            hypervisors,
        };
        let (stopping_tx, stopping) = watch::channel(false);
        {
            let serving = self.serve(&mut session, &transport, &creds, &hello, stopping);
            tokio::pin!(serving);
            tokio::select! {
                _ = shutdown => {
                    let _ = stopping_tx.send(true);
                    // The connection closes politely, so the server ends the session
                    // without an error; a slow server does not hold the stop up.
                    let _ = tokio::time::timeout(CLOSE_TIMEOUT, &mut serving).await;
                }
                _ = &mut serving => {}
            }
        }
        session.stop()
    }

    /// Holds a connection to the server, reconnecting after a loss with a growing,
    /// jittered backoff, until `stopping` turns true.
    async fn serve(
        &self,
        session: &mut Session,
        transport: &Transport,
        creds: &Credentials,
        hello: &AgentMsg,
        mut stopping: watch::Receiver<bool>,
    ) {
        let mut backoff = MIN_BACKOFF;
        // The discovery of the last connection that came up, and until when it is used
        // again rather than discovering anew.
        let mut known: Option<(Discovery, tokio::time::Instant)> = None;
        loop {
            let discovery = match &known {
                Some((discovery, until)) if tokio::time::Instant::now() < *until => {
                    Ok(discovery.clone())
                }
                _ => tokio::select! {
                    _ = stopped(&mut stopping) => return,
                    discovery = self.discover(transport, creds) => discovery,
                },
            };
            let result = match discovery {
                Ok(discovery) => {
                    let result = session
                        .connect_and_serve(
                            creds,
                            transport.tls.clone(),
                            &discovery,
                            hello,
                            &mut stopping,
                        )
                        .await;
                    if session.was_connected {
                        known = Some((discovery, tokio::time::Instant::now() + REUSE_DISCOVERY));
                    }
                    result
                }
                Err(e) => Err(e),
            };
            let error = match result {
                Ok(()) => return,
                Err(error) => error,
            };
            // A connection that was up starts the backoff over.
            if std::mem::take(&mut session.was_connected) {
                backoff = MIN_BACKOFF;
            }
            // Jittered, so that the many agents of one server that went away do not
            // all come back in the same instant.
            let wait = backoff + backoff.mul_f64(rand::random::<f64>() / 2.0);
            warn!("connection to server lost: {error}; retrying in {wait:?}");
            tokio::select! {
                _ = stopped(&mut stopping) => return,
                _ = tokio::time::sleep(wait) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

/// Reconnection backoff after losing the server: doubles from the first to the last.
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// How long after losing the server an agent reconnects with what it discovered
/// before, rather than asking again. A restarted server has ten thousand agents coming
/// back at once: discovering first would double their handshakes. A bus that moved is
/// found once this has passed.
const REUSE_DISCOVERY: Duration = Duration::from_secs(30);

/// How long a stopping agent waits for its connection to close politely.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// What lives across reconnections within one agent process.
struct Session {
    reporter: Reporter,
    applied: BTreeMap<VmId, u64>,
    backstop: Backstop,
    /// When each VM's guest last said anything (unix ms).
    last_guest_word: HashMap<VmId, u64>,
    drivers: Vec<Arc<dyn Driver>>,
    state_path: PathBuf,
    cpu: CpuMeter,
    usage_sent: HashMap<VmId, VmUsage>,
    /// The converge task in progress per VM; a newer command replaces an older one.
    running: HashMap<VmId, (u64, JoinHandle<()>)>,
    guest_events: Option<GuestEvents>,
    /// See [`Agent::with_ephemeral_state`].
    ephemeral_state: bool,
    /// Something `state.json` holds may differ from memory (a command was accepted or
    /// applied, or the last write failed).
    state_dirty: bool,
    /// The epoch last written to `state.json`.
    saved_epoch: Option<u64>,
    probe: Option<Arc<dyn SyncProbe>>,
    /// The last connection got as far as hello.
    was_connected: bool,
}

/// Tells the probe when a connection ends, however it ends (an error, the server
/// closing, or the agent's task being dropped).
struct ProbeConnection(Arc<dyn SyncProbe>);

impl Drop for ProbeConnection {
    fn drop(&mut self) {
        self.0.disconnected();
    }
}

/// An error with its causes, for a log line: reqwest's own message hides why a
/// connection failed (a certificate refused, say).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(next) = cause {
        text.push_str(": ");
        text.push_str(&next.to_string());
        cause = next.source();
    }
    text
}

pub use herd_proto::clock::unix_ms;

/// Resolves once the agent is told to stop (or nobody can tell it any more).
async fn stopped(stopping: &mut watch::Receiver<bool>) {
    let _ = stopping.wait_for(|stop| *stop).await;
}

async fn next_guest_event(events: &mut Option<GuestEvents>) -> Option<(VmId, GuestMsg)> {
    match events {
        Some(events) => events.recv().await,
        None => std::future::pending().await,
    }
}

impl Session {
    fn abort_all(&mut self) {
        for (_, (_, handle)) in self.running.drain() {
            handle.abort();
        }
    }

    /// Ends the session for a clean stop: converging stops, and ephemeral state is
    /// written once.
    fn stop(&mut self) -> Result<(), AgentError> {
        self.abort_all();
        if self.ephemeral_state {
            self.write_state().map_err(AgentError::State)?;
        }
        Ok(())
    }

    /// Persists the sync state if anything in it changed (durably, before the report
    /// that depends on it is sent), unless it is kept in memory.
    fn save(&mut self) -> Result<(), String> {
        if self.ephemeral_state || !self.state_dirty {
            return Ok(());
        }
        self.write_state()
    }

    fn write_state(&mut self) -> Result<(), String> {
        self.state_dirty = true;
        let saved = SavedState {
            reporter: self.reporter.state(),
            applied: self.applied.clone(),
            backstop: self.backstop.clone(),
        };
        let bytes = serde_json::to_vec(&saved).map_err(|e| e.to_string())?;
        let written = if self.ephemeral_state {
            persist::write_unsynced(&self.state_path, &bytes)
        } else {
            persist::write_atomic(&self.state_path, &bytes)
        };
        written.map_err(|e| e.to_string())?;
        self.state_dirty = false;
        self.saved_epoch = Some(saved.reporter.epoch);
        Ok(())
    }

    async fn observe(&self) -> Result<BTreeMap<VmId, VmState>, DriverError> {
        let mut observed = BTreeMap::new();
        for driver in &self.drivers {
            for vm in driver.list().await? {
                observed.insert(vm.id, vm.state);
            }
        }
        Ok(observed)
    }

    /// Counters that moved past their threshold since they were last sent.
    async fn usage_delta(&mut self) -> Vec<VmUsage> {
        let mut moved = Vec::new();
        for driver in &self.drivers {
            let Ok(all) = driver.usage().await else {
                continue;
            };
            for usage in all {
                let send = match self.usage_sent.get(&usage.vm) {
                    None => {
                        usage
                            != VmUsage {
                                vm: usage.vm,
                                ..VmUsage::default()
                            }
                    }
                    Some(last) => {
                        usage.cpu_ms.abs_diff(last.cpu_ms) >= USAGE_CPU_MS_STEP
                            || usage.mem_kib.abs_diff(last.mem_kib) >= USAGE_MEM_KIB_STEP
                            || usage.net_rx_bytes.abs_diff(last.net_rx_bytes) >= USAGE_BYTES_STEP
                            || usage.net_tx_bytes.abs_diff(last.net_tx_bytes) >= USAGE_BYTES_STEP
                            || usage.disk_read_bytes.abs_diff(last.disk_read_bytes)
                                >= USAGE_BYTES_STEP
                            || usage.disk_write_bytes.abs_diff(last.disk_write_bytes)
                                >= USAGE_BYTES_STEP
                    }
                };
                if send {
                    self.usage_sent.insert(usage.vm, usage);
                    moved.push(usage);
                }
            }
        }
        moved
    }

    /// The tail of a VM's serial console, from whichever driver holds it.
    async fn console(&self, vm: VmId, max_bytes: usize) -> Result<Vec<u8>, String> {
        for driver in &self.drivers {
            match driver.console(vm, max_bytes.min(1 << 20)).await {
                Err(DriverError::NoSuchVm(_)) => continue,
                other => return other.map_err(|e| e.to_string()),
            }
        }
        Err(format!("VM {vm} is not on this host"))
    }

    fn driver_for(&self, kind: &str) -> Option<Arc<dyn Driver>> {
        self.drivers.iter().find(|d| d.kind() == kind).cloned()
    }

    async fn connect_and_serve(
        &mut self,
        creds: &Credentials,
        tls: Option<Arc<herd_tls::rustls::ClientConfig>>,
        discovery: &Discovery,
        hello: &AgentMsg,
        stopping: &mut watch::Receiver<bool>,
    ) -> Result<(), String> {
        let mut request = discovery
            .bus_url
            .as_str()
            .into_client_request()
            .map_err(|e| e.to_string())?;
        let bearer = format!("Bearer {}", creds.agent_token)
            .parse()
            .map_err(|_| "agent token is not a valid header value".to_owned())?;
        request.headers_mut().insert("authorization", bearer);
        // Over HTTPS the bus presents this host's certificate too: the server takes the
        // token only with it.
        let connector = tls.map(tokio_tungstenite::Connector::Rustls);
        let ws_config = WebSocketConfig::default().read_buffer_size(BUS_READ_BUFFER);
        let connecting = tokio_tungstenite::connect_async_tls_with_config(
            request,
            Some(ws_config),
            false,
            connector,
        );
        let (socket, _) = tokio::select! {
            _ = stopped(stopping) => return Ok(()),
            connected = connecting => connected.map_err(|e| {
                format!("connecting to {}: {}", discovery.bus_url, error_chain(&e))
            })?,
        };
        let (mut tx, mut rx) = socket.split();
        tx.send(Message::Binary(wire::encode(hello).into()))
            .await
            .map_err(|e| e.to_string())?;
        info!(bus = %discovery.bus_url, "connected");
        self.was_connected = true;
        let _probe_connection = self.probe.clone().map(|probe| {
            probe.connected(discovery.sync_interval_ms);
            ProbeConnection(probe)
        });

        // A new connection starts with a full report: the server may have restarted.
        self.reporter.request_full();
        let mut sync_interval =
            tokio::time::interval(Duration::from_millis(discovery.sync_interval_ms.max(10)));
        sync_interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut usage_interval =
            tokio::time::interval(Duration::from_millis(discovery.usage_interval_ms.max(10)));
        usage_interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(CommandId, Option<String>)>();

        loop {
            tokio::select! {
                _ = stopped(stopping) => {
                    // A clean stop: a close frame ends the session on the server
                    // without an error.
                    let _ = tx.close().await;
                    return Ok(());
                }
                _ = sync_interval.tick() => self.report(&mut tx).await?,
                Some((vm, msg)) = next_guest_event(&mut self.guest_events) => {
                    self.last_guest_word.insert(vm, unix_ms());
                    let Some(report) = msg.to_report() else { continue };
                    // A hello makes the VM running, an exit stops it: report the
                    // change now instead of at the next interval.
                    let changes_state = matches!(report, GuestReport::Hello { .. });
                    tx.send(Message::Binary(wire::encode(&AgentMsg::Guest { vm, report }).into()))
                        .await
                        .map_err(|e| e.to_string())?;
                    if changes_state {
                        self.report(&mut tx).await?;
                    }
                }
                _ = usage_interval.tick() => {
                    let usage = self.usage_delta().await;
                    if !usage.is_empty() {
                        let sampled_at_ms = unix_ms();
                        let msg = AgentMsg::Usage { sampled_at_ms, vms: usage };
                        tx.send(Message::Binary(wire::encode(&msg).into()))
                            .await
                            .map_err(|e| e.to_string())?;
                    }
                }
                Some((id, error)) = done_rx.recv() => {
                    if let Some((generation, _)) = self.running.get(&id.vm) {
                        if *generation == id.generation {
                            self.running.remove(&id.vm);
                        }
                    }
                    if error.is_none() {
                        let newest = self.applied.entry(id.vm).or_insert(0);
                        *newest = (*newest).max(id.generation);
                        self.state_dirty = true;
                        self.save()?;
                    }
                    tx.send(Message::Binary(wire::encode(&AgentMsg::CommandDone { id, error }).into()))
                        .await
                        .map_err(|e| e.to_string())?;
                }
                frame = rx.next() => {
                    let frame = match frame {
                        None => return Err("server closed the connection".into()),
                        Some(Err(e)) => return Err(e.to_string()),
                        Some(Ok(frame)) => frame,
                    };
                    let bytes = match frame {
                        Message::Binary(bytes) => bytes,
                        Message::Close(_) => return Err("server closed the connection".into()),
                        _ => continue,
                    };
                    match wire::decode::<ServerMsg>(&bytes) {
                        Err(e) => warn!("undecodable message from server: {e}"),
                        Ok(ServerMsg::Welcome { .. }) => {}
                        Ok(ServerMsg::Ack { epoch, seq }) => {
                            self.reporter.on_ack(epoch, seq);
                            if let Some(probe) = &self.probe {
                                probe.acked(epoch, seq);
                            }
                        }
                        Ok(ServerMsg::NeedFull { reason }) => {
                            debug!("server asks for a full report: {reason}");
                            self.reporter.request_full();
                        }
                        Ok(ServerMsg::Refused { reason }) => {
                            return Err(format!("server refused this agent: {reason}"));
                        }
                        Ok(ServerMsg::Command(command)) => self.accept(*command, &done_tx),
                        Ok(ServerMsg::ConsoleRequest { request, vm, max_bytes }) => {
                            let result = self.console(vm, max_bytes as usize).await;
                            tx.send(Message::Binary(wire::encode(&AgentMsg::Console { request, result }).into()))
                                .await
                                .map_err(|e| e.to_string())?;
                        }
                    }
                }
            }
        }
    }

    /// Observes every driver, checks the changes against the lifecycle flow, and sends
    /// this interval's report (a delta, a heartbeat, or a full report if asked).
    async fn report(
        &mut self,
        tx: &mut (impl futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error>
                  + Unpin),
    ) -> Result<(), String> {
        let observed = self.observe().await.map_err(|e| e.to_string())?;
        // One comparison with the last report serves the report, the flow check and
        // the saved state.
        let diff = Diff::between(self.reporter.last_reported(), &observed);
        // What this report changes in the saved state: nothing, for most heartbeats.
        if !diff.is_empty() || self.saved_epoch != Some(self.reporter.epoch()) {
            self.state_dirty = true;
        }
        let changed: Vec<VmId> = match &self.probe {
            Some(_) => diff.changed.iter().map(|change| change.vm).collect(),
            None => Vec::new(),
        };
        // Every change is checked against the flow; the server derives the normal
        // events from the same table, so only anomalies are sent.
        let events: Vec<_> = events_of(&diff.changed)
            .into_iter()
            .filter(|e| e.event.is_none())
            .collect();
        for event in &events {
            warn!(vm = %event.vm, "{}", event.message.as_deref().unwrap_or("unexpected change"));
        }
        let util = HostUtil {
            cpu_permille: self.cpu.sample(),
            mem_used_mib: hostinfo::mem_used_mib(),
            n_vms: observed.len() as u32,
        };
        // The backstop's evaluators move every round while it watches any VM.
        if !self.backstop.vms.is_empty() {
            self.state_dirty = true;
        }
        let enforced = self.backstop_round(&observed).await;
        let report = self.reporter.tick_with(observed, &diff, util, events);
        // Persist before sending: a crash after the send cannot leave the disk behind
        // what the server was told.
        self.save()?;
        let (epoch, seq, full) = (report.epoch, report.seq, report.is_full());
        let frame = wire::encode(&AgentMsg::Report(report));
        if let Some(probe) = &self.probe {
            probe.reported(epoch, seq, full, &changed, frame.len());
        }
        tx.send(Message::Binary(frame.into()))
            .await
            .map_err(|e| e.to_string())?;
        for e in enforced {
            let msg = AgentMsg::PolicyEnforced {
                vm: e.vm,
                rule: e.rule,
                action: e.action,
                reason: e.reason,
            };
            tx.send(Message::Binary(wire::encode(&msg).into()))
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Evaluates the backstop on host-side measurements and carries out what it
    /// decides, with or without a server.
    async fn backstop_round(&mut self, observed: &BTreeMap<VmId, VmState>) -> Vec<Enforce> {
        self.backstop.vms.retain(|vm, _| observed.contains_key(vm));
        if self.backstop.vms.is_empty() {
            return Vec::new();
        }
        let mut usage = BTreeMap::new();
        for driver in &self.drivers {
            if let Ok(all) = driver.usage().await {
                usage.extend(all.into_iter().map(|u| (u.vm, u)));
            }
        }
        let running: BTreeMap<VmId, Option<u64>> = observed
            .iter()
            .filter(|(_, state)| **state == VmState::Running)
            .map(|(vm, _)| (*vm, self.last_guest_word.get(vm).copied()))
            .collect();
        let decided = self.backstop.round(unix_ms(), &usage, &running);
        for e in &decided {
            warn!(vm = %e.vm, rule = %e.rule, "backstop enforces {:?}: {}", e.action, e.reason);
            for driver in &self.drivers {
                let result = match e.action {
                    PolicyAction::Notify => Ok(()),
                    PolicyAction::Suspend => driver.suspend(e.vm).await,
                    PolicyAction::Stop => driver.stop(e.vm).await,
                    PolicyAction::Terminate => driver.terminate(e.vm).await,
                };
                match result {
                    Err(DriverError::NoSuchVm(_)) => continue,
                    Err(err) => warn!(vm = %e.vm, "backstop could not act: {err}"),
                    Ok(()) => {}
                }
                break;
            }
        }
        decided
    }

    /// Starts converging a VM for a command, unless the command is a replay.
    fn accept(
        &mut self,
        command: Command,
        done: &mpsc::UnboundedSender<(CommandId, Option<String>)>,
    ) {
        let id = command.id;
        // The backstop may start or stop watching the VM below.
        self.state_dirty = true;
        let applied = self.applied.get(&id.vm).copied().unwrap_or(0);
        if id.generation <= applied {
            debug!(command = %id, "replayed command, already applied");
            let _ = done.send((id, None));
            return;
        }
        if let Some((generation, handle)) = self.running.get(&id.vm) {
            if *generation >= id.generation {
                return;
            }
            handle.abort();
        }
        if command.target == VmState::Terminated {
            self.backstop.forget(id.vm);
        } else {
            self.backstop.watch(
                id.vm,
                command.spec.policy,
                command.spec.vcpus,
                command.spec.memory_mib,
                unix_ms(),
            );
        }
        let Some(driver) = self.driver_for(&command.spec.hypervisor) else {
            let _ = done.send((
                id,
                Some(format!(
                    "hypervisor type {:?} is not available on this host",
                    command.spec.hypervisor
                )),
            ));
            return;
        };
        let done = done.clone();
        let handle = tokio::spawn(async move {
            let result = converge(driver.as_ref(), &command).await;
            if let Err(e) = &result {
                warn!(command = %command.id, "command failed: {e}");
            }
            let _ = done.send((command.id, result.err()));
        });
        self.running.insert(id.vm, (id.generation, handle));
    }
}

/// Drives one VM to the command's target, one driver operation at a time.
async fn converge(driver: &dyn Driver, command: &Command) -> Result<(), String> {
    let vm = command.id.vm;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    let mut n_conflicts = 0;
    loop {
        if tokio::time::Instant::now() > deadline {
            return Err(format!("VM did not reach {} in time", command.target));
        }
        let current = driver.state_of(vm).await.map_err(|e| e.to_string())?;
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
            Plan::Create => driver.create(vm, &command.spec).await,
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
            Err(e) => return Err(e.to_string()),
        }
    }
}
