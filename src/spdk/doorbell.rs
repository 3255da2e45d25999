//! A bounded queue between two SPDK threads with a doorbell: the producer pushes items and
//! sends one message (rings) only when no doorbell message is outstanding; the consumer,
//! when that message runs, takes everything queued at once. A burst of host I/Os crosses
//! threads in one message each way instead of one per I/O.
//!
//! The queue and the doorbell flag sit under one `Mutex` (uncontended when both threads share
//! a core, as in bdevperf; a few nanoseconds across cores), so "the doorbell is rung" always
//! means "a message will take what is queued": [`take_all`](DoorbellQueue::take_all) re-arms
//! and empties in one critical section, and an item pushed after it rings again.
//!
//! Pure std, no SPDK: the module sends the messages. Unit-tested here and, without the
//! `spdk` feature, through `tests/spdk_doorbell.rs`.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard, PoisonError};

/// A bounded queue with a doorbell flag (see the module documentation).
pub struct DoorbellQueue<T> {
    inner: Mutex<Inner<T>>,
    limit: usize,
}

struct Inner<T> {
    items: VecDeque<T>,
    /// A doorbell message is on its way (or its sending failed and nobody retried yet: see
    /// [`DoorbellQueue::ring_failed`]).
    rung: bool,
}

impl<T> DoorbellQueue<T> {
    /// An empty queue that holds at most `limit` items.
    pub fn new(limit: usize) -> Self {
        assert!(limit > 0, "a doorbell queue holds at least one item");
        DoorbellQueue { inner: Mutex::new(Inner { items: VecDeque::new(), rung: false }), limit }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<T>> {
        // A panic aborts the process in release; in tests the data stay consistent (every
        // critical section below is a few plain moves), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `item`. `Ok(true)`: no doorbell was outstanding, the caller must ring now (and
    /// call [`ring_failed`](Self::ring_failed) if it cannot). `Err(item)`: the queue is full.
    pub fn push(&self, item: T) -> Result<bool, T> {
        let mut inner = self.lock();
        if inner.items.len() >= self.limit {
            return Err(item);
        }
        inner.items.push_back(item);
        Ok(!std::mem::replace(&mut inner.rung, true))
    }

    /// Moves the items of `batch` in, oldest first, as many as fit (the rest stay in `batch`).
    /// `true`: items are queued and no doorbell is outstanding, the caller must ring now — also
    /// for an empty `batch` when an earlier ring failed.
    pub fn push_all(&self, batch: &mut Vec<T>) -> bool {
        let mut inner = self.lock();
        let room = self.limit.saturating_sub(inner.items.len()).min(batch.len());
        inner.items.extend(batch.drain(..room));
        if inner.rung || inner.items.is_empty() {
            return false;
        }
        inner.rung = true;
        true
    }

    /// The doorbell message runs: takes every queued item into `into` (which must be empty;
    /// the queue keeps `into`'s old allocation, so steady traffic allocates nothing) and
    /// re-arms the doorbell.
    pub fn take_all(&self, into: &mut VecDeque<T>) {
        debug_assert!(into.is_empty(), "take_all into a non-empty batch");
        let mut inner = self.lock();
        inner.rung = false;
        std::mem::swap(&mut inner.items, into);
    }

    /// The doorbell message could not be sent: none is outstanding. The items stay queued for
    /// the next ring (a later push or push_all says when).
    pub fn ring_failed(&self) {
        self.lock().rung = false;
    }

    pub fn len(&self) -> usize {
        self.lock().items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::DoorbellQueue;
    use std::collections::VecDeque;
    use std::sync::mpsc;
    use std::sync::Arc;

    #[test]
    fn one_ring_per_burst_and_again_after_take() {
        let queue = DoorbellQueue::new(8);
        assert_eq!(queue.push(1), Ok(true), "the first item rings");
        assert_eq!(queue.push(2), Ok(false), "a doorbell is outstanding");
        assert_eq!(queue.push(3), Ok(false));
        let mut batch = VecDeque::new();
        queue.take_all(&mut batch);
        assert_eq!(batch, [1, 2, 3]);
        assert!(queue.is_empty());
        assert_eq!(queue.push(4), Ok(true), "after the message ran, the next item rings again");
    }

    #[test]
    fn full_queue_gives_the_item_back() {
        let queue = DoorbellQueue::new(2);
        assert_eq!(queue.push('a'), Ok(true));
        assert_eq!(queue.push('b'), Ok(false));
        assert_eq!(queue.push('c'), Err('c'));
        assert_eq!(queue.len(), 2);
        let mut leftover = vec!['c', 'd'];
        assert!(!queue.push_all(&mut leftover), "still rung");
        assert_eq!(leftover, ['c', 'd'], "nothing fits");
    }

    #[test]
    fn push_all_moves_what_fits_and_rings_once() {
        let queue = DoorbellQueue::new(3);
        let mut batch = vec![1, 2];
        assert!(queue.push_all(&mut batch));
        assert!(batch.is_empty());
        let mut more = vec![3, 4, 5];
        assert!(!queue.push_all(&mut more), "rung already");
        assert_eq!(more, [4, 5], "one fitted, the rest wait with the caller");
        let mut taken = VecDeque::new();
        queue.take_all(&mut taken);
        assert_eq!(taken, [1, 2, 3]);
        assert!(!queue.push_all(&mut Vec::new()), "nothing queued: nothing to ring");
    }

    #[test]
    fn a_failed_ring_is_retried_by_the_next_push() {
        let queue = DoorbellQueue::new(4);
        assert_eq!(queue.push(1), Ok(true));
        queue.ring_failed();
        assert_eq!(queue.len(), 1, "the item stays queued");
        assert!(queue.push_all(&mut Vec::new()), "an empty push_all rings for what is queued");
        queue.ring_failed();
        assert_eq!(queue.push(2), Ok(true), "a push rings for everything queued");
        let mut taken = VecDeque::new();
        queue.take_all(&mut taken);
        assert_eq!(taken, [1, 2]);
    }

    #[test]
    fn take_all_reuses_the_callers_allocation() {
        let queue = DoorbellQueue::new(64);
        let mut batch: VecDeque<u32> = VecDeque::with_capacity(32);
        let capacity = batch.capacity();
        queue.push(1).unwrap();
        queue.take_all(&mut batch);
        batch.clear();
        // The queue now holds the caller's old buffer: 32 pushes need no allocation.
        for i in 0..capacity as u32 {
            queue.push(i).unwrap();
        }
        queue.take_all(&mut batch);
        assert_eq!(batch.len(), capacity);
        assert!(batch.capacity() >= capacity);
    }

    /// Two threads, as the module uses it: every item pushed is taken exactly once, in order,
    /// and a message is sent only when none is outstanding (the consumer never sees a ring
    /// without a message to answer it, nor items left behind with no message coming).
    #[test]
    fn across_threads_every_item_arrives_once_in_order() {
        const ITEMS: u64 = 20_000;
        let queue = Arc::new(DoorbellQueue::new(256));
        let (ring, doorbell) = mpsc::channel::<()>();
        let consumer = {
            let queue = queue.clone();
            std::thread::spawn(move || {
                let (mut seen, mut messages, mut batch) = (Vec::new(), 0u64, VecDeque::new());
                while (seen.len() as u64) < ITEMS {
                    doorbell.recv().expect("a message for every ring");
                    messages += 1;
                    queue.take_all(&mut batch);
                    seen.extend(batch.drain(..));
                }
                (seen, messages)
            })
        };
        let mut rings = 0u64;
        for i in 0..ITEMS {
            let mut item = i;
            loop {
                match queue.push(item) {
                    Ok(true) => {
                        rings += 1;
                        ring.send(()).unwrap();
                        break;
                    }
                    Ok(false) => break,
                    // Full: the bdev layer would retry later; here, yield and retry.
                    Err(back) => {
                        item = back;
                        std::thread::yield_now();
                    }
                }
            }
        }
        let (seen, messages) = consumer.join().unwrap();
        assert_eq!(seen, (0..ITEMS).collect::<Vec<_>>());
        assert!(messages <= rings, "{messages} messages for {rings} rings");
        assert!(rings <= ITEMS);
        assert!(queue.is_empty());
    }
}
