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

mod connection;
mod core;
mod drivers_view;
mod join;
mod session;
mod state;
mod transfers;
mod transport;

use crate::driver::{Driver, DriverError};
use crate::hostinfo;
use crate::probe::SyncProbe;
use crate::utility::{self, UtilityConfig};
use herd_proto::guest::GuestMsg;
use herd_proto::wire::{self, AgentMsg, Capacity, VmId, PROTOCOL_VERSION};
use session::Session;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

pub use herd_proto::clock::unix_ms;
pub use transport::error_chain;

/// How long a stopping agent waits for its connection to close politely.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

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
    /// The TCP port other agents send live migrations to; 0 picks a free one (the
    /// server learns it from the hello).
    pub transfer_port: u16,
    /// The host's labels at join (`rack`, `zone`, `region` place it).
    pub labels: std::collections::BTreeMap<String, String>,
    /// Whether to measure round trips to the neighbours the server names (not in
    /// `herd sim`, whose thousands of agents share one machine).
    pub round_trips: bool,
}

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

/// Passes guest messages on to the session, except asks for bursts, which go to `bursts`:
/// those are this host's to answer, with or without a server.
fn route_guest_events(mut events: GuestEvents, bursts: crate::bursts::Bursts) -> GuestEvents {
    let (tx, out) = guest_event_channel();
    tokio::spawn(async move {
        while let Some((vm, msg)) = events.recv().await {
            match msg {
                GuestMsg::Burst { ask } => {
                    bursts.ask(vm, ask, crate::bursts::Asker::Guest);
                }
                msg => {
                    if tx.send((vm, msg)).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    out
}

pub struct Agent {
    config: AgentConfig,
    drivers: Vec<Arc<dyn Driver>>,
    guest_events: Option<GuestEvents>,
    ephemeral_state: bool,
    probe: Option<Arc<dyn SyncProbe>>,
    utility: Option<UtilityConfig>,
}

impl Agent {
    pub fn new(config: AgentConfig, drivers: Vec<Arc<dyn Driver>>) -> Agent {
        Agent {
            config,
            drivers,
            guest_events: None,
            ephemeral_state: false,
            probe: None,
            utility: None,
        }
    }

    /// Runs the node's utility module beside the agent and relays its samples (see
    /// [`crate::utility`]).
    pub fn with_utility(mut self, config: UtilityConfig) -> Agent {
        self.utility = Some(config);
        self
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

    fn state_path(&self) -> PathBuf {
        self.config.data_dir.join("state.json")
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
                Err(e) => warn!(kind = driver.kind(), "driver unusable: {}", error_chain(&e)),
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
        let saved = state::load(&self.state_path()).map_err(AgentError::State)?;
        let mut session = Session::new(
            saved,
            self.drivers.clone(),
            self.state_path(),
            self.ephemeral_state,
        );
        let capacity = self.capacity();
        session.capacity = capacity;
        let mut guest_events = self.guest_events.take();
        if self.drivers.iter().any(|d| d.capabilities().burst) {
            let (bursts, answers) =
                crate::bursts::start(self.drivers.clone(), capacity, self.config.data_dir.clone());
            guest_events = guest_events.map(|events| route_guest_events(events, bursts.clone()));
            session.burst_leases = Some(bursts.leases());
            session.burst_answers = Some(answers);
            session.bursts = Some(bursts);
        }
        session.guest_events = guest_events;
        session.probe = self.probe.clone();
        let transfers = self.listen_for_transfers(&creds, &mut session).await?;
        if transfers.is_some() && self.config.round_trips {
            session.proximity = Some(crate::proximity::Proximity::start(session.outbox.clone()));
        }
        let utility = self.utility.clone().map(|config| {
            let sources = self
                .drivers
                .iter()
                .filter_map(|d| {
                    Some(herd_util::Source {
                        kind: d.kind().into(),
                        footprint: d.footprint()?,
                    })
                })
                .collect();
            utility::start(config, self.config.data_dir.clone(), sources)
        });
        session.utility = utility.as_ref().map(|(samples, _)| samples.clone());
        if self.ephemeral_state {
            // Once now, so that the new epoch is on disk even if this process dies.
            session.write_state().map_err(AgentError::State)?;
        }
        let hello = AgentMsg::Hello {
            protocol: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            hostname: self.config.hostname.clone(),
            capacity,
            hypervisors,
            transfer_port: session.migrations.port(),
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
        if let Some((_, supervisor)) = utility {
            // Its child is killed with it.
            supervisor.abort();
        }
        if let Some(transfers) = transfers {
            transfers.abort();
        }
        session.stop().map_err(AgentError::State)
    }
}
