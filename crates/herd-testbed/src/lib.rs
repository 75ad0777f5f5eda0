//! Several herd hosts on one machine, for the tests and benchmarks of what crosses a
//! network (migration, broadcast, bursts, faults): each host a network namespace with
//! a veth into a bridge, its link shaped or cut with `tc` and `ip`, one `herd agent`
//! in each and one `herd server` on the bridge.
//!
//! [`plan`] decides names, addresses and commands (pure); [`net`] makes them and
//! removes them, even after a test that was killed; [`cluster`] runs herd on them.

pub mod cluster;
pub mod guests;
pub mod net;
pub mod plan;

pub use cluster::{Cluster, ClusterConfig};
pub use guests::end_containers;
pub use net::Testbed;
pub use plan::Shape;

#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    #[error("the testbed makes network namespaces and veths: run it as root")]
    NotRoot,
    #[error("{0}")]
    Plan(String),
    #[error("every one of the {0} testbed slots is in use")]
    NoSlot(u8),
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("not on this machine: {0}")]
    Unsupported(String),
    #[error("{0}")]
    Herd(String),
}
