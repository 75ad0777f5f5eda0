//! One connection to the server's bus at a time, for as long as the agent runs: the
//! loop that turns sockets, timers and guest channels into the core's inputs, and the
//! reconnection after a loss, with backoff and jitter so that the thousands of agents
//! of a restarted server do not come back in the same instant.

use super::core::Input;
use super::session::{send_frame, Session};
use super::state::Credentials;
use super::transport::{error_chain, Transport, BUS_READ_BUFFER};
use super::{Agent, GuestEvents};
use crate::probe::SyncProbe;
use crate::utility::UtilityState;
use futures_util::{SinkExt, StreamExt};
use herd_proto::burst::BurstReport;
use herd_proto::clock::unix_ms;
use herd_proto::guest::GuestMsg;
use herd_proto::join::Discovery;
use herd_proto::wire::{self, AgentMsg, ServerMsg, VmId};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tracing::{info, warn};

/// Reconnection backoff after losing the server: doubles from the first to the last.
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// How long after losing the server an agent reconnects with what it discovered
/// before, rather than asking again. A restarted server has ten thousand agents coming
/// back at once: discovering first would double their handshakes. A bus that moved is
/// found once this has passed.
const REUSE_DISCOVERY: Duration = Duration::from_secs(30);

/// Tells the probe when a connection ends, however it ends (an error, the server
/// closing, or the agent's task being dropped).
struct ProbeConnection(Arc<dyn SyncProbe>);

impl Drop for ProbeConnection {
    fn drop(&mut self) {
        self.0.disconnected();
    }
}

/// Resolves once the agent is told to stop (or nobody can tell it any more).
pub(super) async fn stopped(stopping: &mut watch::Receiver<bool>) {
    let _ = stopping.wait_for(|stop| *stop).await;
}

/// Resolves when the utility module has a new sample (never, if it does not run).
async fn utility_changed(utility: &mut Option<watch::Receiver<UtilityState>>) -> Option<()> {
    match utility {
        Some(samples) => samples.changed().await.ok(),
        None => std::future::pending().await,
    }
}

async fn send_node(
    session: &Session,
    tx: &mut (impl futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin),
) -> Result<(), String> {
    send_frame(tx, wire::encode(&AgentMsg::Node(session.node_report()))).await
}

/// Resolves when the leases in force change (never, without bursts).
async fn leases_changed(leases: &mut Option<watch::Receiver<BurstReport>>) -> Option<()> {
    match leases {
        Some(leases) => leases.changed().await.ok(),
        None => std::future::pending().await,
    }
}

async fn next_burst_answer(answers: &mut Option<crate::bursts::Answers>) -> Option<AgentMsg> {
    match answers {
        Some(answers) => answers.recv().await,
        None => std::future::pending().await,
    }
}

async fn send_leases(
    session: &mut Session,
    tx: &mut (impl futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin),
) -> Result<(), String> {
    let Some(leases) = session.burst_leases.as_mut() else {
        return Ok(());
    };
    let report = leases.borrow_and_update().clone();
    send_frame(tx, wire::encode(&AgentMsg::Bursts(report))).await
}

async fn next_guest_event(events: &mut Option<GuestEvents>) -> Option<(VmId, GuestMsg)> {
    match events {
        Some(events) => events.recv().await,
        None => std::future::pending().await,
    }
}

impl Agent {
    /// Holds a connection to the server, reconnecting after a loss with a growing,
    /// jittered backoff, until `stopping` turns true.
    pub(super) async fn serve(
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
                    discovery = transport.discover(creds) => discovery,
                },
            };
            let result = match discovery {
                Ok(discovery) => {
                    let result = connect_and_serve(
                        session,
                        transport,
                        creds,
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

/// One connection: hello, then reports, guest messages, usage and command results up,
/// commands and console requests down, until it fails or the agent stops.
async fn connect_and_serve(
    session: &mut Session,
    transport: &Transport,
    creds: &Credentials,
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
    let connector = transport
        .tls
        .clone()
        .map(tokio_tungstenite::Connector::Rustls);
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
    send_frame(&mut tx, wire::encode(hello)).await?;
    info!(bus = %discovery.bus_url, "connected");
    session.was_connected = true;
    let _probe_connection = session.probe.clone().map(|probe| {
        probe.connected(discovery.sync_interval_ms);
        ProbeConnection(probe)
    });
    session.step(Input::Connected, &mut tx).await?;
    // What the node says of itself, at once: the server forgot it with the connection.
    session.health.take_changed();
    send_node(session, &mut tx).await?;
    // The leases in force, whole: the server forgot them with the connection too.
    send_leases(session, &mut tx).await?;
    session.status_resend();
    let mut sync_interval =
        tokio::time::interval(Duration::from_millis(discovery.sync_interval_ms.max(10)));
    sync_interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut usage_interval =
        tokio::time::interval(Duration::from_millis(discovery.usage_interval_ms.max(10)));
    usage_interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let report_due = session.report_due;
        let inputs = tokio::select! {
            _ = stopped(stopping) => {
                // A clean stop: a close frame ends the session on the server without
                // an error.
                let _ = tx.close().await;
                return Ok(());
            }
            _ = sync_interval.tick() => vec![session.tick().await?],
            _ = tokio::time::sleep_until(report_due.unwrap_or_else(tokio::time::Instant::now)),
                if report_due.is_some() => vec![session.tick().await?],
            Some((vm, msg)) = next_guest_event(&mut session.guest_events) => {
                vec![Input::Guest { vm, msg, now_ms: unix_ms() }]
            }
            Some(()) = utility_changed(&mut session.utility) => {
                send_node(session, &mut tx).await?;
                if let Some(status) = session.next_status().await {
                    send_frame(&mut tx, wire::encode(&AgentMsg::Status(status))).await?;
                }
                continue;
            }
            _ = usage_interval.tick() => vec![Input::Usage {
                usage: session.usage().await,
                now_ms: unix_ms(),
            }],
            Some(()) = leases_changed(&mut session.burst_leases) => {
                send_leases(session, &mut tx).await?;
                continue;
            }
            Some(answer) = next_burst_answer(&mut session.burst_answers) => {
                send_frame(&mut tx, wire::encode(&answer)).await?;
                continue;
            }
            Some(answer) = session.outbox_rx.recv() => {
                send_frame(&mut tx, wire::encode(&answer)).await?;
                continue;
            }
            Some((id, error)) = session.done_rx.recv() => {
                // Commands that ended together are answered together, with one report.
                session.converged(id);
                let mut done = vec![Input::Converged { id, error }];
                while let Ok((id, error)) = session.done_rx.try_recv() {
                    session.converged(id);
                    done.push(Input::Converged { id, error });
                }
                done
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
                    Ok(msg) => vec![Input::Server { msg, now_ms: unix_ms() }],
                    Err(e) => {
                        warn!("undecodable message from server: {e}");
                        continue;
                    }
                }
            }
        };
        session.step_all(inputs, &mut tx).await?;
        if session.health.take_changed() {
            send_node(session, &mut tx).await?;
        }
    }
}
