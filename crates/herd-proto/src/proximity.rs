//! How close hosts are to each other, measured by the hosts themselves: the server
//! names each host's neighbours (where their transfer listeners are) and each host
//! says how long a round trip to each took. The server builds the proximity tree from
//! that and the hosts' labels.

use crate::spec::HostId;
use serde::{Deserialize, Serialize};

/// Most neighbours a host is asked to measure: its rack, zone and region come first,
/// so the tree has what it needs without N² probes.
pub const MAX_NEIGHBOURS: usize = 16;

/// A host to measure, and where its agent listens for transfers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Neighbour {
    pub host: HostId,
    pub addr: String,
}

/// One host's round trip to a neighbour, the best of a few probes; `None` when none
/// got through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundTrip {
    pub host: HostId,
    pub rtt_us: Option<u32>,
}
