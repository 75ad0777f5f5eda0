//! Console reads: a request travels to the agent outside the command queue, and its
//! answer comes back to whoever asked, checked against the host that had to answer.

use super::{Cloud, CloudError};
use herd_proto::wire::{HostId, ServerMsg};
use std::time::Duration;
use tokio::sync::mpsc;

impl Cloud {
    /// The last `max_bytes` of a VM's serial console, fetched from its host.
    pub async fn console(&self, id: &str, max_bytes: u32) -> Result<Vec<u8>, CloudError> {
        let vm = self.vm(id)?;
        let unreachable = |why: String| CloudError::Conflict {
            code: "host_unreachable",
            message: why,
        };
        let Some(host) = vm.host else {
            return Err(CloudError::Conflict {
                code: "not_placed",
                message: format!("VM {} is not on a host yet", vm.name),
            });
        };
        let sender = self
            .outbox
            .lock()
            .get(&host)
            .map(|(_, sender)| sender.clone())
            .ok_or_else(|| unreachable(format!("the host of VM {} is not connected", vm.name)))?;
        let (request, rx) = self.console_waiters.wait_for(host);
        let sent = sender.send(ServerMsg::ConsoleRequest {
            request,
            vm: vm.id,
            max_bytes,
        });
        if sent.is_err() {
            self.console_waiters.forget(request);
            return Err(unreachable("the host disconnected".into()));
        }
        let answer = tokio::time::timeout(Duration::from_secs(10), rx).await;
        self.console_waiters.forget(request);
        match answer {
            Ok(Ok(Ok(bytes))) => Ok(bytes),
            Ok(Ok(Err(e))) => Err(unreachable(format!(
                "the host could not read the console: {e}"
            ))),
            Ok(Err(_)) => Err(unreachable("the host disconnected".into())),
            Err(_) => Err(unreachable("the host did not answer within 10 s".into())),
        }
    }

    /// Sends a message to a connected agent outside the command queue; `false` if the
    /// agent is not connected.
    pub(crate) fn send_to_agent(&self, host: HostId, msg: ServerMsg) -> bool {
        let sender = self
            .outbox
            .lock()
            .get(&host)
            .map(|(_, sender)| sender.clone());
        sender.is_some_and(|sender| sender.send(msg).is_ok())
    }

    /// Every host with an agent connected now.
    pub(crate) fn connected_hosts(&self) -> Vec<HostId> {
        self.outbox.lock().keys().copied().collect()
    }

    /// Registers a connected agent's session for out-of-queue messages.
    pub fn open_outbox(&self, host: HostId, session: u64) -> mpsc::UnboundedReceiver<ServerMsg> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.outbox.lock().insert(host, (session, tx));
        rx
    }

    pub fn close_outbox(&self, host: HostId, session: u64) {
        let mut outbox = self.outbox.lock();
        if outbox
            .get(&host)
            .is_some_and(|(current, _)| *current == session)
        {
            outbox.remove(&host);
        }
    }

    /// An agent's answer to a console request; only the host asked may answer.
    pub fn console_answer(
        &self,
        host: HostId,
        request: u64,
        result: Result<Vec<u8>, String>,
    ) -> bool {
        self.console_waiters.answered(host, request, result)
    }
}
