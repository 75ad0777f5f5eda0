//! Types every herd process agrees on: the VM lifecycle state flow and the agent wire
//! protocol.
//!
//! This crate has no I/O (beyond one read of the wall clock, `clock::unix_ms`) and no
//! async runtime so that the agent, the server, the guest module and the benchmarks can
//! all link it, and so that the lifecycle table can be
//! tested exhaustively on its own. It is the only place the state flow is written down;
//! everything else (API validation, agent transition checks, docs) is derived from it.

pub mod broadcast;
pub mod burst;
pub mod clock;
pub mod guest;
pub mod join;
pub mod lifecycle;
pub mod migration;
pub mod node;
pub mod policy;
pub mod proximity;
pub mod spec;
pub mod status;
pub mod wire;

pub use lifecycle::{Event, VmState};
