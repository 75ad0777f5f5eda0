//! A qemu VM's snapshot, for a broadcast: its migration stream written to a file, with
//! its data disk's blocks in the same stream when it has one (as a live migration
//! sends them). QEMU pre-copies while the guest runs and stops it only for the last
//! pass, as a migration's switch-over; the guest runs again the moment the stream is
//! complete. A copy is a new VM started with `-incoming`, as a migration's target is,
//! fed the file instead of a socket: it continues from the instant of the snapshot,
//! its memory and disk as they were, with the original's guest credential (its module
//! greets the copy's host as the same boot).

use super::Inner;
use crate::driver::{DriverError, Snapshot};
use herd_proto::migration::TransferProgress;
use herd_proto::wire::VmId;
use herd_proto::VmState;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

/// The snapshot's one file.
pub(super) const STATE: &str = "state";
/// The most the guest may be stopped for the last pass.
const MAX_PAUSE_MS: u64 = 300;
/// How often the stream's progress is read: the guest runs again at most this long
/// after the stream is complete.
const POLL: Duration = Duration::from_millis(10);

impl Inner {
    pub(super) async fn do_snapshot(
        self: Arc<Self>,
        id: VmId,
        dir: PathBuf,
    ) -> Result<Snapshot, DriverError> {
        let was = self.with_vm(id, |vm| Ok(vm.observe()))?;
        if !matches!(was, VmState::Running | VmState::Paused) {
            return Err(DriverError::WrongState {
                op: "snapshot",
                state: was,
            });
        }
        let file = dir.join(STATE);
        let path = file.display().to_string();
        if path.contains('\'') {
            return Err(DriverError::Invalid(format!(
                "a snapshot path with a quote in it: {path}"
            )));
        }
        // QEMU runs the command with /bin/sh; the path is its own argument, quoted.
        let uri = format!("exec:cat > '{path}'");
        let (progress, _) = tokio::sync::watch::channel(TransferProgress::default());
        let sent = self
            .send_state(id, &uri, MAX_PAUSE_MS, &progress, POLL)
            .await?;
        let completed = Instant::now();
        if was == VmState::Running {
            // Stopped for the last pass; `cont` also takes the disk back from the
            // finished stream.
            self.qmp_run(id, "cont", None).await?;
        }
        let resumed_after = completed.elapsed().as_millis() as u64;
        Ok(Snapshot {
            files: vec![STATE.to_owned()],
            handoff: self.handoff(id)?,
            paused_ms: sent.downtime_ms.unwrap_or(0) + resumed_after,
        })
    }

    /// A copy: started as a migration's target, fed the snapshot's stream from its
    /// file, then waited for until it runs.
    pub(super) async fn feed_copy(
        &self,
        id: VmId,
        socket: &Path,
        dir: &Path,
    ) -> Result<(), DriverError> {
        let mut stream = None;
        for _ in 0..250 {
            if let Ok(connected) = tokio::net::UnixStream::connect(socket).await {
                stream = Some(connected);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let Some(mut stream) = stream else {
            return Err(DriverError::Hypervisor {
                vm: id,
                reason: format!("the copy's qemu never listened on {}", socket.display()),
            });
        };
        let mut file = tokio::fs::File::open(dir.join(STATE))
            .await
            .map_err(DriverError::io("opening the snapshot"))?;
        tokio::io::copy(&mut file, &mut stream)
            .await
            .map_err(DriverError::io("feeding the snapshot to the copy's qemu"))?;
        stream
            .shutdown()
            .await
            .map_err(DriverError::io("ending the snapshot's stream"))?;
        Ok(())
    }
}
