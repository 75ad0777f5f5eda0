//! Round trips to the neighbours the server names, for the proximity tree.
//!
//! A probe is a TCP connect to the neighbour's transfer listener: the handshake's
//! SYN/SYN-ACK is one round trip through both kernels, without TLS or the neighbour's
//! agent in the way, and the listener is there anyway. The best of a few probes
//! counts (a probe can only be slowed by queues, never sped up). Round trips change
//! slowly, so they are measured again only every few minutes and when the list
//! changes; the server keeps the last ones.

use herd_proto::proximity::{Neighbour, RoundTrip, MAX_NEIGHBOURS};
use herd_proto::wire::AgentMsg;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Probes per neighbour per measurement.
const PROBES: usize = 3;
/// A probe that takes longer counts as lost.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the round trips are measured again when nothing changed.
const MEASURE_EVERY: Duration = Duration::from_secs(180);
/// How long a new list waits for the next (a burst of joins makes one measurement).
const SETTLE: Duration = Duration::from_millis(200);

/// Where the server's lists of neighbours go.
#[derive(Clone)]
pub struct Proximity {
    neighbours: watch::Sender<Vec<Neighbour>>,
}

impl Proximity {
    /// Measures in a task of its own (ended when every handle is dropped), sending
    /// each measurement on `out`.
    pub fn start(out: mpsc::UnboundedSender<AgentMsg>) -> Proximity {
        let (neighbours, rx) = watch::channel(Vec::new());
        tokio::spawn(measure(rx, out));
        Proximity { neighbours }
    }

    /// The server's new list (it replaces the last; past the bound it is cut).
    pub fn neighbours(&self, mut list: Vec<Neighbour>) {
        list.truncate(MAX_NEIGHBOURS);
        self.neighbours.send_if_modified(|old| {
            let changed = *old != list;
            *old = list;
            changed
        });
    }
}

async fn measure(mut list: watch::Receiver<Vec<Neighbour>>, out: mpsc::UnboundedSender<AgentMsg>) {
    loop {
        tokio::select! {
            changed = list.changed() => {
                if changed.is_err() {
                    return;
                }
                tokio::time::sleep(SETTLE).await;
            }
            _ = tokio::time::sleep(MEASURE_EVERY) => {}
        }
        let neighbours = list.borrow_and_update().clone();
        if neighbours.is_empty() {
            continue;
        }
        let trips = futures_util::future::join_all(neighbours.iter().map(probe)).await;
        if out.send(AgentMsg::RoundTrips(trips)).is_err() {
            return;
        }
    }
}

/// The best of [`PROBES`] connects to `n`, one after the other.
async fn probe(n: &Neighbour) -> RoundTrip {
    let mut best: Option<Duration> = None;
    for _ in 0..PROBES {
        let start = Instant::now();
        let connected =
            tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(&n.addr)).await;
        if let Ok(Ok(_stream)) = connected {
            let took = start.elapsed();
            best = Some(best.map_or(took, |b| b.min(took)));
        }
    }
    RoundTrip {
        host: n.host,
        rtt_us: best.map(|d| d.as_micros().clamp(1, u128::from(u32::MAX)) as u32),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn a_listener_is_measured_and_a_closed_port_is_lost() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = listener.local_addr().unwrap().to_string();
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let proximity = Proximity::start(tx);
        let a = uuid::Uuid::from_u128(1);
        let b = uuid::Uuid::from_u128(2);
        proximity.neighbours(vec![
            Neighbour {
                host: a,
                addr: open,
            },
            Neighbour {
                host: b,
                addr: closed,
            },
        ]);
        let Some(AgentMsg::RoundTrips(trips)) = rx.recv().await else {
            panic!("no measurement");
        };
        assert_eq!(trips.len(), 2);
        assert_eq!(trips[0].host, a);
        assert!(trips[0].rtt_us.is_some_and(|us| us < 1_000_000));
        assert_eq!(
            trips[1],
            RoundTrip {
                host: b,
                rtt_us: None
            }
        );
        drop(listener);
    }
}
