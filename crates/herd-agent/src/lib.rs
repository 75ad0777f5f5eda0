//! The herd agent: one per host.
//!
//! It joins the cloud once with a one-time token, discovers from that one URL where its
//! bus is and how often to sync, configures itself from the drivers that work here and
//! the host's /proc, then holds one connection to the server: state reports go up (only
//! what changed since the last one), commands come down from its durable per-host queue.
//!
//! Drivers sit behind [`driver::Driver`]; the agent never branches on the hypervisor type.

pub mod agent;
pub mod backstop;
pub mod broadcast;
pub mod bursts;
pub mod conformance;
pub mod converge;
pub mod driver;
pub mod drivers;
pub mod health;
pub mod hostinfo;
pub mod migration;
pub mod peers;
pub mod persist;
pub mod probe;
pub mod proximity;
pub mod transfer;
pub mod utility;

pub use agent::{Agent, AgentConfig, AgentError, GuestEvents};
pub use driver::{Capabilities, Driver, DriverError, ObservedVm};
pub use probe::SyncProbe;
