//! One operation at a time per VM, each in its own task.
//!
//! A driver's operations on one VM must not interleave (a stop racing a start leaves a
//! VM half in each), and one must finish even if its caller gives up on it (the agent
//! aborts a superseded command; a save to disk dropped half-way loses the VM). So every
//! operation runs in a spawned task that first takes the VM's lock.

use crate::driver::DriverError;
use herd_proto::wire::VmId;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

#[derive(Default)]
pub(crate) struct OpLocks(Mutex<HashMap<VmId, Arc<tokio::sync::Mutex<()>>>>);

impl OpLocks {
    /// Runs `op` in its own task once no other operation on `id` runs.
    pub(crate) async fn run<T, Fut>(&self, id: VmId, op: Fut) -> Result<T, DriverError>
    where
        T: Send + 'static,
        Fut: Future<Output = Result<T, DriverError>> + Send + 'static,
    {
        let lock = self.0.lock().entry(id).or_default().clone();
        tokio::spawn(async move {
            let _guard = lock.lock_owned().await;
            op.await
        })
        .await
        .map_err(|e| DriverError::Operation {
            vm: id,
            doing: "an operation".into(),
            source: Box::new(e),
        })?
    }

    /// Drops the lock of a VM that is gone.
    pub(crate) fn forget(&self, id: VmId) {
        self.0.lock().remove(&id);
    }
}
