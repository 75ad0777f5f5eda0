//! Where hosts are relative to each other, and the tree a broadcast follows.
//!
//! Two things say how close two hosts are: the labels an operator gave them (`region`,
//! `zone`, `rack`: a rack's hosts share a switch, a zone's a building) and the round
//! trips their agents measured. Labels are the coarse truth that never flickers;
//! round trips order the hosts within a group, and pick which host of a group talks to
//! the group it hangs from. Everything here is pure: the server feeds it host records
//! and measurements and shows or uses the answer, so the same inputs always give the
//! same tree.

mod labels;
mod neighbours;
mod tree;

pub use labels::{check_labels, LabelError, Labels, Place, MAX_LABELS, PLACE_KEYS};
pub use neighbours::neighbours;
pub use tree::{build, Member, Rtts, Tree, TreeError};

/// A host's id, as everywhere in herd.
pub type HostId = uuid::Uuid;
