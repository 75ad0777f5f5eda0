//! The oci driver's side of a container's guest channel: what the shared channel task
//! asks about the one container and init it serves.

use super::Inner;
use crate::drivers::channel::GuestHost;
use herd_proto::guest::GuestMsg;
use herd_proto::policy::PolicySpec;
use herd_proto::wire::VmId;
use std::sync::Arc;

pub(super) struct OciGuest {
    pub(super) inner: Arc<Inner>,
    pub(super) id: VmId,
    /// The launch this task belongs to; a restarted container has a new one.
    pub(super) generation: u64,
}

impl GuestHost for OciGuest {
    fn wanted(&self) -> bool {
        self.inner.channel_wanted(self.id, self.generation)
    }

    fn check_hello(&self, vm_id: VmId, token: &str) -> bool {
        self.inner
            .check_hello(self.id, self.generation, vm_id, token)
    }

    fn policy(&self) -> PolicySpec {
        self.inner.guest_policy(self.id)
    }

    fn deliver(&self, msg: GuestMsg) {
        self.inner.guest_message(self.id, self.generation, msg)
    }
}
