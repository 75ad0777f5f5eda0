//! A container's snapshot, for a broadcast: its writable layer as one tar file, taken
//! while the container is frozen (the cgroup freezer, as `pause` does) so that no file
//! in it is half-written, and thawed the moment tar is done. A copy is a new container
//! of the same image whose writable layer starts as that file; its processes start
//! afresh, with the files the original had. (A container's memory would need CRIU's
//! checkpoint, which this driver's probe reports as unusable where it is.)

use super::container::Paths;
use super::migrate::tar;
use super::Inner;
use crate::driver::{DriverError, Snapshot};
use herd_proto::wire::VmId;
use herd_proto::VmState;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// The snapshot's one file.
pub(super) const LAYER: &str = "layer.tar";

impl Inner {
    pub(super) async fn do_snapshot(
        self: Arc<Self>,
        id: VmId,
        dir: PathBuf,
    ) -> Result<Snapshot, DriverError> {
        let state = self.with(id, |c| Ok(c.observe()))?;
        let was_running = match state {
            VmState::Running => true,
            VmState::Paused => false,
            state => {
                return Err(DriverError::WrongState {
                    op: "snapshot",
                    state,
                })
            }
        };
        let upper = self.with(id, |c| Ok(c.paths.upper()))?;
        let frozen = Instant::now();
        if was_running {
            self.clone().do_pause(id, true).await?;
        }
        let file = dir.join(LAYER);
        let taken = tar(&["-cf"], &upper).arg(&file).arg(".").output().await;
        if was_running {
            self.clone().do_pause(id, false).await?;
        }
        let paused_ms = frozen.elapsed().as_millis() as u64;
        let output = taken.map_err(DriverError::io("running tar over the layer"))?;
        if !output.status.success() {
            return Err(DriverError::Hypervisor {
                vm: id,
                reason: format!(
                    "tar could not take the layer: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                ),
            });
        }
        Ok(Snapshot {
            files: vec![LAYER.to_owned()],
            handoff: Vec::new(),
            paused_ms,
        })
    }
}

/// Unpacks a snapshot's layer under a new container's writable layer.
pub(super) async fn unpack(paths: &Paths, from: &Path) -> Result<(), DriverError> {
    let upper = paths.upper();
    std::fs::create_dir_all(&upper).map_err(DriverError::io("creating the container's layer"))?;
    let output = tar(&["-xf"], &upper)
        .arg(from.join(LAYER))
        .output()
        .await
        .map_err(DriverError::io("running tar into the layer"))?;
    if !output.status.success() {
        return Err(DriverError::Invalid(format!(
            "the snapshot's layer does not unpack: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(())
}
