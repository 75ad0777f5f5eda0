//! What the server holds in memory for the proximity tree: where each connected agent
//! is reached, the round trips the agents measured, and the neighbours each was last
//! told. Nothing here is stored: after a restart the agents connect again and measure
//! again within a few seconds.

use herd_proto::proximity::{Neighbour, RoundTrip};
use herd_proto::wire::HostId;
use herd_topology::Rtts;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use tokio::sync::Notify;

#[derive(Default)]
pub struct Topology {
    /// The address each agent's bus connection comes from, and the port it takes
    /// transfers on (from its hello).
    addrs: Mutex<HashMap<HostId, (IpAddr, Option<u16>)>>,
    rtts: Mutex<Rtts>,
    /// The neighbours each host was told on its current connection.
    pub(super) told: Mutex<HashMap<HostId, Vec<Neighbour>>>,
    /// A host connected: its neighbours (and theirs) are due.
    pub(super) joined: Notify,
}

impl Topology {
    /// Remembers where an agent's bus connection comes from: other agents reach it
    /// there (migrations, broadcasts, probes).
    pub fn connected_from(&self, host: HostId, ip: IpAddr) {
        self.addrs.lock().entry(host).or_insert((ip, None)).0 = ip;
    }

    /// The agent said hello on a new connection, taking transfers on `port`.
    pub fn hello(&self, host: HostId, port: Option<u16>) {
        if let Some(entry) = self.addrs.lock().get_mut(&host) {
            entry.1 = port;
        }
        self.told.lock().remove(&host);
        self.joined.notify_one();
    }

    pub fn ip(&self, host: HostId) -> Option<IpAddr> {
        self.addrs.lock().get(&host).map(|(ip, _)| *ip)
    }

    /// Where `host`'s agent takes transfers, if it does.
    pub fn transfer_addr(&self, host: HostId) -> Option<SocketAddr> {
        let (ip, port) = *self.addrs.lock().get(&host)?;
        Some(SocketAddr::new(ip, port?))
    }

    /// `host`'s round trips, measured now; a lost one forgets the pair's figure. Only
    /// trips to the neighbours it was told count: a host cannot pull the tree out of
    /// shape by claiming to be close to hosts it never measured.
    pub fn measured(&self, host: HostId, trips: &[RoundTrip]) {
        let told = self.told.lock();
        let Some(neighbours) = told.get(&host) else {
            return;
        };
        let mut rtts = self.rtts.lock();
        for trip in trips {
            if !neighbours.iter().any(|n| n.host == trip.host) {
                continue;
            }
            match trip.rtt_us {
                Some(us) => rtts.insert(host, trip.host, us),
                None => rtts.remove(host, trip.host),
            }
        }
    }

    pub fn rtts(&self) -> Rtts {
        self.rtts.lock().clone()
    }
}
