//! Reports waiting for a host: a bounded queue of encoded frames.
//!
//! While no host is connected the guest keeps the last [`MAX_QUEUED`] reports that matter
//! later (policy warnings and actions, workload exits, errors), drops the oldest beyond
//! that and counts them; periodic ones (usage, progress, status) are not kept, the next
//! one replaces them. The queue is flushed, in order, after the next host `Hello`.

use std::collections::VecDeque;

pub const MAX_QUEUED: usize = 256;

#[derive(Debug, Default)]
pub struct Outbox {
    queue: VecDeque<Vec<u8>>,
    /// Frames dropped because the queue was full, since the last flush.
    pub dropped: u64,
}

impl Outbox {
    pub fn push(&mut self, frame: Vec<u8>) {
        if self.queue.len() >= MAX_QUEUED {
            self.queue.pop_front();
            self.dropped += 1;
        }
        self.queue.push_back(frame);
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Writes queued frames with `write` (which returns false if the frame could not be
    /// sent) until one fails; returns how many were sent.
    pub fn flush(&mut self, mut write: impl FnMut(&[u8]) -> bool) -> usize {
        let mut sent = 0;
        while let Some(frame) = self.queue.front() {
            if !write(frame) {
                break;
            }
            self.queue.pop_front();
            sent += 1;
        }
        sent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_and_counts_the_dropped() {
        let mut o = Outbox::default();
        for i in 0..(MAX_QUEUED + 10) {
            o.push(vec![(i % 256) as u8, (i / 256) as u8]);
        }
        assert_eq!(o.len(), MAX_QUEUED);
        assert_eq!(o.dropped, 10);
        let mut got = Vec::new();
        // The host goes away after 5 frames: the rest stay, in order.
        assert_eq!(
            o.flush(|f| {
                got.push(f.to_vec());
                got.len() <= 5
            }),
            5
        );
        assert_eq!(got[0], vec![10, 0]);
        assert_eq!(o.len(), MAX_QUEUED - 5);
        assert_eq!(o.flush(|_| true), MAX_QUEUED - 5);
        assert!(o.is_empty());
    }
}
