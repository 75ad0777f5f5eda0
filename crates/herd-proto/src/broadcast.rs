//! What the server and the agents say to spread one VM's snapshot to many hosts.
//!
//! The server plans (which hosts, in which tree) and keeps the record; the hosts move
//! the bytes among themselves. The source host takes the snapshot and cuts it into
//! chunks of one size, each with its BLAKE3 hash, in a [`Manifest`] that goes to every
//! receiver through the server: a receiver checks every chunk against the hashes the
//! server gave it, never against what a peer says, so a bad link or a bad peer can
//! cost a chunk again but never a corrupted snapshot. Every host holds a prefix of the
//! chunks (it takes them in order) and forwards each to its children as soon as it has
//! checked it, so the stream is pipelined down the tree.
//!
//! Orders are level-triggered, as migration orders are: the server repeats the order
//! of a broadcast's current phase until it is answered, and an agent answers a
//! repeated order from what it has.

pub use crate::spec::BroadcastId;
use crate::spec::{HostId, VmId};
use serde::{Deserialize, Serialize};
#[cfg(test)]
use uuid::Uuid;

/// Largest chunk count of a snapshot: its hashes must fit one frame.
pub const MAX_CHUNKS: usize = 4096;
/// The chunk size a snapshot is cut into, unless it is so big that this would make
/// more than [`MAX_CHUNKS`]: small enough that a tree fills fast (each level waits
/// for one chunk), large enough that hashing and framing cost little.
pub const CHUNK_BYTES: u64 = 1 << 20;
/// Files in one snapshot, at most.
pub const MAX_FILES: usize = 16;

/// One file of a snapshot, as the driver that took it named it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotFile {
    pub name: String,
    pub size: u64,
}

/// A snapshot as every receiver checks it: its files, laid end to end and cut into
/// chunks of `chunk_bytes` (the last one shorter), and each chunk's BLAKE3 hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub broadcast: BroadcastId,
    pub vm: VmId,
    pub hypervisor: String,
    pub files: Vec<SnapshotFile>,
    pub chunk_bytes: u64,
    pub hashes: Vec<[u8; 32]>,
    /// What the source's driver keeps about the VM that a copy needs (opaque).
    pub handoff: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("a snapshot file name {0:?} is not a plain name")]
    FileName(String),
    #[error("{0} files, over the limit of {MAX_FILES}")]
    TooManyFiles(usize),
    #[error("{hashes} hashes for {bytes} bytes in chunks of {chunk_bytes}")]
    Chunks {
        hashes: usize,
        bytes: u64,
        chunk_bytes: u64,
    },
}

/// The chunk size for a snapshot of `bytes`.
pub fn chunk_bytes_for(bytes: u64) -> u64 {
    let mut chunk = CHUNK_BYTES;
    while bytes.div_ceil(chunk) > MAX_CHUNKS as u64 {
        chunk *= 2;
    }
    chunk
}

impl Manifest {
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    pub fn chunks(&self) -> u32 {
        self.hashes.len() as u32
    }

    /// Where chunk `i` starts in the snapshot, and how long it is.
    pub fn chunk_span(&self, i: u32) -> (u64, u64) {
        let start = u64::from(i) * self.chunk_bytes;
        let len = self
            .total_bytes()
            .saturating_sub(start)
            .min(self.chunk_bytes);
        (start, len)
    }

    /// Whether the manifest is one a receiver can take: plain file names (they become
    /// paths), and one hash per chunk.
    pub fn check(&self) -> Result<(), ManifestError> {
        if self.files.len() > MAX_FILES {
            return Err(ManifestError::TooManyFiles(self.files.len()));
        }
        for f in &self.files {
            let plain = !f.name.is_empty()
                && f.name.len() <= 64
                && f.name != "."
                && f.name != ".."
                && f.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
            if !plain {
                return Err(ManifestError::FileName(f.name.clone()));
            }
        }
        let bytes = self.total_bytes();
        let wanted = if self.chunk_bytes == 0 {
            None
        } else {
            Some(bytes.div_ceil(self.chunk_bytes))
        };
        if wanted != Some(self.hashes.len() as u64) || self.hashes.len() > MAX_CHUNKS {
            return Err(ManifestError::Chunks {
                hashes: self.hashes.len(),
                bytes,
                chunk_bytes: self.chunk_bytes,
            });
        }
        Ok(())
    }
}

/// A host of a broadcast's tree, where its agent takes transfers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeHost {
    pub host: HostId,
    pub addr: String,
    /// Its parent in the tree (`None` for the source).
    pub parent: Option<HostId>,
}

/// The server's orders for one broadcast.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BroadcastOrder {
    /// To the source host: take a snapshot of `vm` (pausing it only while it is taken)
    /// and cut it into chunks. Answered with [`BroadcastUpdate::Captured`].
    Capture { broadcast: BroadcastId, vm: VmId },
    /// To every host of the tree, the source included: the snapshot to hold and the
    /// whole tree, so that a host whose child dies sends to that child's children
    /// itself. Answered with progress, then [`BroadcastUpdate::Done`].
    Spread {
        manifest: Box<Manifest>,
        tree: Vec<TreeHost>,
    },
    /// The broadcast is over (or abandoned): drop what is held of it, once every copy
    /// made from it has started. Answered with [`BroadcastUpdate::Forgotten`].
    Forget { broadcast: BroadcastId },
}

impl BroadcastOrder {
    pub fn broadcast(&self) -> BroadcastId {
        match self {
            BroadcastOrder::Capture { broadcast, .. } | BroadcastOrder::Forget { broadcast } => {
                *broadcast
            }
            BroadcastOrder::Spread { manifest, .. } => manifest.broadcast,
        }
    }
}

/// A host's answers about one broadcast.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BroadcastUpdate {
    /// The source took the snapshot; the VM ran again after `paused_ms`.
    Captured {
        manifest: Box<Manifest>,
        paused_ms: u64,
    },
    /// This host holds and has checked the first `chunks` chunks; `refetched` chunks
    /// failed their hash and came again.
    Progress {
        chunks: u32,
        refetched: u32,
    },
    /// This host holds the whole snapshot, checked, and sent what its children needed.
    Done {
        chunks: u32,
        refetched: u32,
    },
    /// This host cannot take part (why).
    Failed {
        reason: String,
    },
    Forgotten,
}

/// The first frame of a transfer connection between agents: which kind of transfer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransferOpen {
    Migration(crate::migration::TransferHello),
    /// A parent's stream of a broadcast's chunks.
    Broadcast {
        broadcast: BroadcastId,
    },
}

/// A receiver's answer to [`TransferOpen::Broadcast`]: the chunks to send from (it
/// holds every one before), or why not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BroadcastReply {
    From { chunk: u32 },
    Refused { reason: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(sizes: &[u64], chunk_bytes: u64, hashes: usize) -> Manifest {
        Manifest {
            broadcast: Uuid::from_u128(1),
            vm: Uuid::from_u128(2),
            hypervisor: "oci".into(),
            files: sizes
                .iter()
                .enumerate()
                .map(|(i, &size)| SnapshotFile {
                    name: format!("f{i}"),
                    size,
                })
                .collect(),
            chunk_bytes,
            hashes: vec![[0; 32]; hashes],
            handoff: Vec::new(),
        }
    }

    #[test]
    fn chunks_span_the_files_end_to_end_and_the_last_is_shorter() {
        let m = manifest(&[1500, 600], 1024, 3);
        assert_eq!(m.check(), Ok(()));
        assert_eq!(m.chunk_span(0), (0, 1024));
        assert_eq!(m.chunk_span(2), (2048, 52));
        assert_eq!(m.chunks(), 3);
        assert_eq!(manifest(&[], 1024, 0).check(), Ok(()));
    }

    #[test]
    fn bad_manifests_are_refused_with_the_reason() {
        assert!(matches!(
            manifest(&[1500], 1024, 1).check(),
            Err(ManifestError::Chunks { .. })
        ));
        assert!(matches!(
            manifest(&[1500], 0, 0).check(),
            Err(ManifestError::Chunks { .. })
        ));
        let mut m = manifest(&[10], 1024, 1);
        m.files[0].name = "../etc".into();
        assert!(matches!(m.check(), Err(ManifestError::FileName(_))));
        let m = manifest(&[1; 17], 1024, 1);
        assert!(matches!(m.check(), Err(ManifestError::TooManyFiles(17))));
    }

    #[test]
    fn big_snapshots_get_bigger_chunks_within_the_count() {
        assert_eq!(chunk_bytes_for(256 << 20), 1 << 20);
        let huge = 64u64 << 30;
        let chunk = chunk_bytes_for(huge);
        assert!(huge.div_ceil(chunk) <= MAX_CHUNKS as u64);
        assert_eq!(chunk, 16 << 20);
    }
}
