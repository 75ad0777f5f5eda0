//! Cold migration of a container: it stops on the source, its writable layer goes to
//! the target as a tar stream through the agents' authenticated connection, and it
//! starts there from the same image under that layer. Its files move; its processes
//! start afresh (a new boot, a new hello). A live move needs CRIU's checkpoint, and
//! `criu check` fails on the kernels this runs on (the driver's probe says why).

use super::container::{Container, Paths, Phase};
use super::Inner;
use crate::driver::{DriverError, ProgressSink, Sent};
use herd_proto::migration::TransferProgress;
use herd_proto::wire::{VmId, VmSpec};
use herd_proto::VmState;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{info, warn};

/// How long a started container gets on its target to say hello.
const ARRIVE_WITHIN: Duration = Duration::from_secs(60);

/// What the target needs of the source besides the spec.
#[derive(Debug, Serialize, Deserialize)]
struct Handoff {
    born_unix_ms: Option<u64>,
}

/// The bytes under a directory (files' lengths), for the transfer's progress.
fn bytes_under(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(entry.path()),
                Ok(_) => total += entry.metadata().map(|m| m.len()).unwrap_or(0),
                Err(_) => {}
            }
        }
    }
    total
}

/// `tar` over a container's layer, keeping owners by number and extended attributes
/// (overlayfs records deletions as whiteouts, which tar carries as device files).
pub(super) fn tar(args: &[&str], dir: &Path) -> tokio::process::Command {
    let mut command = tokio::process::Command::new("tar");
    command
        .args(["--numeric-owner", "--xattrs", "--xattrs-include=*", "-C"])
        .arg(dir)
        .args(args)
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

impl Inner {
    pub(super) fn handoff(&self, id: VmId) -> Result<Vec<u8>, DriverError> {
        self.with(id, |c| {
            serde_json::to_vec(&Handoff {
                born_unix_ms: c.record.born_unix_ms,
            })
            .map_err(DriverError::encode("the migration handoff"))
        })
    }

    /// Source: stops the container and writes its layer into `to`. On any failure
    /// the container starts here again.
    pub(super) async fn do_migrate_out(
        self: Arc<Self>,
        id: VmId,
        to: PathBuf,
        progress: ProgressSink,
    ) -> Result<Sent, DriverError> {
        match self.with(id, |c| Ok(c.observe()))? {
            VmState::Running => {}
            state => {
                return Err(DriverError::WrongState {
                    op: "migrate",
                    state,
                })
            }
        }
        let started = Instant::now();
        self.clone().stop_showing(id, VmState::Migrating).await?;
        let upper = self.with(id, |c| Ok(c.paths.upper()))?;
        match send_layer(&upper, &to, &progress).await {
            Ok(bytes) => {
                self.with(id, |c| {
                    c.busy = None;
                    c.record.migrated_out = true;
                    c.save()
                })?;
                let total_ms = started.elapsed().as_millis() as u64;
                info!(%id, bytes, total_ms, "container sent; it waits here, stopped");
                Ok(Sent {
                    // The source's part: from the stop to the last byte sent. The
                    // target's start (to its guest's hello) comes on top.
                    downtime_ms: Some(total_ms),
                    total_ms,
                    transferred_bytes: bytes,
                })
            }
            Err(reason) => {
                warn!(%id, "sending the container failed ({reason}); starting it here again");
                self.with(id, |c| {
                    c.busy = None;
                    c.save()
                })?;
                self.clone().do_start(id).await?;
                Err(DriverError::Hypervisor { vm: id, reason })
            }
        }
    }

    /// Source: the move did not happen; start the container here again.
    pub(super) async fn do_migrate_out_undo(self: Arc<Self>, id: VmId) -> Result<(), DriverError> {
        let sent_away = self.with(id, |c| Ok(c.record.migrated_out))?;
        if sent_away {
            self.with(id, |c| {
                c.record.migrated_out = false;
                c.save()
            })?;
            info!(%id, "container starts here again: its migration was rolled back");
        }
        self.do_start(id).await
    }

    /// Target: makes the container's files and listens for its layer.
    pub(super) async fn do_migrate_in(
        self: Arc<Self>,
        id: VmId,
        spec: VmSpec,
        handoff: Vec<u8>,
    ) -> Result<PathBuf, DriverError> {
        let paths = Paths::new(&self.state_dir, id);
        let socket = paths.dir.join("migrate-in.sock");
        if let Some(c) = self.containers.lock().get(&id) {
            if c.busy == Some(VmState::Migrating) && c.receiving.is_some() {
                return Ok(socket);
            }
            return Err(DriverError::Invalid(format!(
                "VM {id} is already on this host"
            )));
        }
        let handoff: Handoff = serde_json::from_slice(&handoff)
            .map_err(|e| DriverError::Invalid(format!("the source's handoff: {e}")))?;
        self.image_root(&spec.image).await?;
        std::fs::create_dir_all(paths.upper())
            .map_err(DriverError::io("creating the container dir"))?;
        crate::drivers::save_spec(&paths.spec(), &spec)?;
        let _ = std::fs::remove_file(&socket);
        let listener = tokio::net::UnixListener::bind(&socket).map_err(DriverError::io(
            format!("listening on {}", socket.display()),
        ))?;
        let upper = paths.upper();
        let receiving = tokio::spawn(async move {
            let (stream, _) = listener
                .accept()
                .await
                .map_err(|e| format!("accepting the stream: {e}"))?;
            receive_layer(stream, &upper).await
        });
        let mut c = Container::fresh(
            id,
            paths,
            spec,
            Phase::Stopped,
            handoff.born_unix_ms,
            VmState::Migrating,
        );
        c.receiving = Some(receiving);
        c.save()?;
        self.containers.lock().insert(id, c);
        Ok(socket)
    }

    /// Target: once the stream has ended, starts the container under the layer it
    /// brought and waits for its guest's hello.
    pub(super) async fn do_migrate_in_finish(self: Arc<Self>, id: VmId) -> Result<(), DriverError> {
        let receiving = self.with(id, |c| Ok(c.receiving.take()))?;
        let received = match receiving {
            Some(task) => task
                .await
                .map_err(|e| format!("the receiver ended: {e}"))
                .and_then(|r| r),
            None => Err("nothing was received".into()),
        };
        let bytes = match received {
            Ok(bytes) => bytes,
            Err(reason) => {
                self.with(id, |c| {
                    c.busy = None;
                    c.record.phase = Phase::Failed {
                        reason: reason.clone(),
                    };
                    c.save()
                })?;
                return Err(DriverError::Hypervisor { vm: id, reason });
            }
        };
        self.with(id, |c| {
            c.busy = None;
            c.save()
        })?;
        let started = Instant::now();
        self.clone().do_start(id).await?;
        loop {
            match self.with(id, |c| Ok(c.observe()))? {
                VmState::Running => break,
                VmState::Booting if started.elapsed() < ARRIVE_WITHIN => {}
                state => {
                    return Err(DriverError::Hypervisor {
                        vm: id,
                        reason: format!(
                            "the received container is {state} after {} s, not running",
                            started.elapsed().as_secs()
                        ),
                    })
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        info!(%id, bytes, ms = started.elapsed().as_millis() as u64, "received container runs");
        Ok(())
    }
}

/// Writes the layer under `upper` as a tar stream into the socket `to`; returns the
/// bytes sent.
async fn send_layer(upper: &Path, to: &Path, progress: &ProgressSink) -> Result<u64, String> {
    let total = bytes_under(upper);
    let mut stream = tokio::net::UnixStream::connect(to)
        .await
        .map_err(|e| format!("connecting to {}: {e}", to.display()))?;
    let mut child = tar(&["-cf", "-", "."], upper)
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running tar: {e}"))?;
    let mut out = child.stdout.take().ok_or("tar has no stdout")?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut sent = 0u64;
    loop {
        let n = out
            .read(&mut buf)
            .await
            .map_err(|e| format!("reading tar: {e}"))?;
        if n == 0 {
            break;
        }
        stream
            .write_all(&buf[..n])
            .await
            .map_err(|e| format!("the stream broke: {e}"))?;
        sent += n as u64;
        progress.send_replace(TransferProgress {
            transferred_bytes: sent,
            remaining_bytes: total.saturating_sub(sent),
            total_bytes: total.max(sent),
            pass: 1,
            expected_downtime_ms: None,
        });
    }
    let output = child
        .wait_with_output()
        .await
        .map_err(|e| format!("waiting for tar: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "tar failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    stream
        .shutdown()
        .await
        .map_err(|e| format!("closing the stream: {e}"))?;
    Ok(sent)
}

/// Unpacks a tar stream into `upper`; returns the bytes received.
async fn receive_layer(mut stream: tokio::net::UnixStream, upper: &Path) -> Result<u64, String> {
    let mut child = tar(&["-xf", "-"], upper)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("running tar: {e}"))?;
    let mut input = child.stdin.take().ok_or("tar has no stdin")?;
    let copied = tokio::io::copy(&mut stream, &mut input)
        .await
        .map_err(|e| format!("the stream broke: {e}"));
    drop(input);
    let output = child
        .wait_with_output()
        .await
        .map_err(|e| format!("waiting for tar: {e}"))?;
    let bytes = copied?;
    if !output.status.success() {
        return Err(format!(
            "tar could not unpack the layer: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::bytes_under;

    #[test]
    fn a_layers_size_counts_its_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("a/b")).expect("dirs");
        std::fs::write(dir.path().join("a/b/f"), [0u8; 1000]).expect("write");
        std::fs::write(dir.path().join("g"), [0u8; 24]).expect("write");
        assert_eq!(bytes_under(dir.path()), 1024);
        assert_eq!(bytes_under(&dir.path().join("missing")), 0);
    }
}
