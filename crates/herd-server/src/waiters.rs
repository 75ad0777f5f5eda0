//! Asks sent to an agent outside its command queue (a console read, a burst, what it
//! hears of other hosts) and the answers coming back: each ask gets a number, the agent
//! answers with it, and only the agent asked (and, for a burst, only about the VM asked)
//! may answer it.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::oneshot;

pub struct Waiters<K, T> {
    waiting: Mutex<HashMap<u64, (K, oneshot::Sender<T>)>>,
    next: AtomicU64,
}

impl<K, T> Default for Waiters<K, T> {
    fn default() -> Self {
        Waiters {
            waiting: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
        }
    }
}

impl<K: PartialEq, T> Waiters<K, T> {
    /// A new ask that only `who` may answer: its number, and where the answer arrives.
    pub fn wait_for(&self, who: K) -> (u64, oneshot::Receiver<T>) {
        let request = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().insert(request, (who, tx));
        (request, rx)
    }

    /// Forgets an ask, answered or not.
    pub fn forget(&self, request: u64) {
        self.waiting.lock().remove(&request);
    }

    /// An answer from `who`; false (and dropped) if nobody asked `who` this.
    pub fn answered(&self, who: K, request: u64, answer: T) -> bool {
        let mut waiting = self.waiting.lock();
        match waiting.get(&request) {
            Some((asked, _)) if *asked == who => {
                if let Some((_, tx)) = waiting.remove(&request) {
                    let _ = tx.send(answer);
                }
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_one_asked_answers_and_only_once() {
        let waiters: Waiters<u8, &str> = Waiters::default();
        let (request, mut rx) = waiters.wait_for(1);
        assert!(!waiters.answered(2, request, "forged"));
        assert!(rx.try_recv().is_err());
        assert!(waiters.answered(1, request, "yes"));
        assert_eq!(rx.try_recv().ok(), Some("yes"));
        assert!(!waiters.answered(1, request, "again"));
        let (other, _rx) = waiters.wait_for(1);
        waiters.forget(other);
        assert!(!waiters.answered(1, other, "late"));
    }
}
