//! The host end of one VM's guest channel.
//!
//! QEMU listens on the VM's `guest.sock` (a virtio-serial port inside the guest); this
//! task connects, greets the guest, and reads its frames until the connection ends, then
//! connects again for as long as the same QEMU process lives. Connecting from the agent
//! side means a restarted agent, or a QEMU restored from a suspend image, needs nothing
//! but a new connection.
//!
//! Everything read here is untrusted: frames are size-limited by the decoder, the rate
//! of messages is capped, and nothing counts before a `Hello` with the VM's token.

use super::Inner;
use herd_proto::guest::{encode_frame, FrameDecoder, GuestMsg, HostMsg};
use herd_proto::wire::VmId;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// More messages than this per second and the connection is dropped for a while.
const MAX_MSGS_PER_SEC: u32 = 200;

pub(super) async fn run(
    inner: Arc<Inner>,
    id: VmId,
    generation: u64,
    mut host_msgs: mpsc::UnboundedReceiver<HostMsg>,
) {
    loop {
        let Some(path) = inner.channel_target(id, generation) else {
            debug!(%id, generation, "guest channel task ends");
            return;
        };
        let mut stream = match UnixStream::connect(&path).await {
            Ok(s) => s,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(hello) = encode_frame(&HostMsg::Hello) else {
            return;
        };
        if stream.write_all(&hello).await.is_err() {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        let penalty = serve(&inner, id, generation, &mut stream, &mut host_msgs).await;
        tokio::time::sleep(penalty).await;
    }
}

/// Serves one connection; returns how long to wait before the next one.
async fn serve(
    inner: &Arc<Inner>,
    id: VmId,
    generation: u64,
    stream: &mut UnixStream,
    host_msgs: &mut mpsc::UnboundedReceiver<HostMsg>,
) -> Duration {
    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; 8192];
    let mut authenticated = false;
    let mut window = Instant::now();
    let mut n_in_window = 0u32;
    loop {
        tokio::select! {
            read = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)) => {
                let n = match read {
                    // Quiet for a while: make sure this task is still wanted.
                    Err(_) => {
                        if inner.channel_target(id, generation).is_none() {
                            return Duration::ZERO;
                        }
                        continue;
                    }
                    Ok(Ok(0)) | Ok(Err(_)) => return Duration::from_millis(200),
                    Ok(Ok(n)) => n,
                };
                let msgs = match decoder.feed::<GuestMsg>(&buf[..n]) {
                    Ok(msgs) => msgs,
                    Err(e) => {
                        warn!(%id, "guest channel: {e}; reconnecting");
                        return Duration::from_secs(1);
                    }
                };
                for msg in msgs {
                    if window.elapsed() >= Duration::from_secs(1) {
                        window = Instant::now();
                        n_in_window = 0;
                    }
                    n_in_window += 1;
                    if n_in_window > MAX_MSGS_PER_SEC {
                        warn!(%id, "guest sends too many messages; dropping its channel for a while");
                        return Duration::from_secs(2);
                    }
                    if let GuestMsg::Hello { vm_id, management_token, .. } = &msg {
                        if !inner.check_hello(id, generation, *vm_id, management_token) {
                            warn!(%id, "guest channel: hello with a wrong id or token");
                            return Duration::from_secs(2);
                        }
                        authenticated = true;
                        // The host's clock answers every guest greeting, fresh (a frame
                        // queued before the guest reads its port would be seconds old): a
                        // guest restored from a suspend image, or booted from a
                        // whole-second RTC, sets its clock from it, so its time rules
                        // count the time it spent suspended.
                        let unix_ms = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map(|d| d.as_millis() as u64)
                            .unwrap_or(0);
                        if let Ok(frame) = encode_frame(&HostMsg::Time { unix_ms }) {
                            if stream.write_all(&frame).await.is_err() {
                                return Duration::from_millis(200);
                            }
                        }
                    }
                    if !authenticated {
                        continue;
                    }
                    inner.guest_message(id, generation, msg);
                }
            }
            Some(msg) = host_msgs.recv() => {
                if let Ok(frame) = encode_frame(&msg) {
                    if stream.write_all(&frame).await.is_err() {
                        return Duration::from_millis(200);
                    }
                }
            }
        }
    }
}
