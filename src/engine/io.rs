//! The I/O hub: a volume's four device channels, submission with back-pressure, and routing of
//! completions either to the hot path (host reads and writes, by owner) or to control-path
//! futures (format, recovery, marker, sort) waiting on a tag.
//!
//! Control-path operations are `async fn`s polled by [`Executor`] from the volume's poll loop:
//! they never block, so the same code runs inside an SPDK poller. The hot path does not use
//! futures; its state machines live in `write.rs`.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use slab::Slab;

use crate::device::{
    Channel, Completion, DeviceGeometry, IoBuffers, IoError, Operation, SharedBuffers, SubmitError, Tag,
};

/// The four devices of a volume (ARCHITECTURE §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Base = 0,
    Journal = 1,
    Backup = 2,
    History = 3,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Base, Role::Journal, Role::Backup, Role::History];

    pub fn name(self) -> &'static str {
        match self {
            Role::Base => "base",
            Role::Journal => "journal",
            Role::Backup => "backup",
            Role::History => "history",
        }
    }
}

/// Operations queued behind a full device queue, per device, are bounded by the callers'
/// own in-flight limits; this is a safety net that turns a runaway into a loud failure.
const RETRY_QUEUE_LIMIT: usize = 1 << 16;

/// Who waits for a control-path operation in flight (host-path operations carry their owner
/// in the tag: [`HostOwner`]).
enum Waiter {
    /// A control-path future: the completion waits here until the future takes it (boxed:
    /// the slab's entries stay small).
    Control(Option<Box<Completion>>),
    /// A control-path future that was dropped: the completion is discarded.
    Abandoned,
}

/// Tags of host-path operations have this bit set and carry their owner in the rest
/// ([`HostOwner`]); every other tag is a slot of `outstanding`.
const HOST_TAG: Tag = 1 << 63;

/// The owner of a host-path operation (a host write's journal or base write, a host read),
/// carried in the operation's tag itself: no table to insert into at submission and to look
/// up and remove from at completion, twice per host write.
pub(crate) trait HostOwner: Copy {
    /// At most 63 bits.
    fn to_bits(self) -> u64;
    fn from_bits(bits: u64) -> Self;
}

impl HostOwner for () {
    fn to_bits(self) -> u64 {
        0
    }

    fn from_bits(_: u64) -> Self {}
}

pub(crate) struct IoHub<O> {
    channels: Vec<Box<dyn Channel>>,
    retry: [VecDeque<(Tag, Operation)>; 4],
    /// Control-path operations in flight, by tag (the slab key). One keeps its slot until its
    /// future takes the completion, so a tag is never reused while someone may still ask for
    /// it.
    outstanding: Slab<Waiter>,
    /// Host-path operations submitted and not yet routed (they have no slot in `outstanding`).
    host_in_flight: usize,
    host_done: VecDeque<(O, Completion)>,
    scratch: Vec<Completion>,
}

impl<O: HostOwner> IoHub<O> {
    /// `channels` in [`Role`] order.
    pub(crate) fn new(channels: Vec<Box<dyn Channel>>) -> Self {
        assert_eq!(channels.len(), 4, "a volume has four devices");
        IoHub {
            channels,
            retry: Default::default(),
            outstanding: Slab::with_capacity(1024),
            host_in_flight: 0,
            host_done: VecDeque::new(),
            scratch: Vec::with_capacity(256),
        }
    }

    /// A hub without devices, as a placeholder while the real one is taken apart.
    pub(crate) fn new_empty() -> Self {
        IoHub {
            channels: Vec::new(),
            retry: Default::default(),
            outstanding: Slab::new(),
            host_in_flight: 0,
            host_done: VecDeque::new(),
            scratch: Vec::new(),
        }
    }

    /// The channels back, once nothing is in flight on them.
    pub(crate) fn into_channels(self) -> Vec<Box<dyn Channel>> {
        assert!(
            self.outstanding.is_empty() && self.host_in_flight == 0,
            "channels are given back with operations in flight"
        );
        self.channels
    }

    /// Nothing submitted that has not been reaped, nothing waiting to be resubmitted: the
    /// channels hold no operation of the volume (completions reaped and not yet taken by their
    /// futures wait here, in the hub, and stay).
    pub(crate) fn devices_idle(&self) -> bool {
        self.host_in_flight == 0
            && self.retry.iter().all(VecDeque::is_empty)
            && self.outstanding.iter().all(|(_, waiter)| matches!(waiter, Waiter::Control(Some(_))))
            && self.channels.iter().all(|channel| channel.in_flight() == 0)
    }

    /// The channels out, once [`devices_idle`](Self::devices_idle); the hub has none until
    /// [`put_channels`](Self::put_channels).
    pub(crate) fn take_channels(&mut self) -> Vec<Box<dyn Channel>> {
        assert!(self.devices_idle(), "channels are taken with operations in flight");
        assert_eq!(self.channels.len(), 4, "the channels are taken once");
        std::mem::take(&mut self.channels)
    }

    /// Channels in again after [`take_channels`](Self::take_channels), in [`Role`] order.
    pub(crate) fn put_channels(&mut self, channels: Vec<Box<dyn Channel>>) {
        assert!(self.channels.is_empty(), "the hub still has its channels");
        assert_eq!(channels.len(), 4, "a volume has four devices");
        self.channels = channels;
    }

    pub(crate) fn geometry(&self, role: Role) -> DeviceGeometry {
        self.channels[role as usize].geometry()
    }

    pub(crate) fn device_name(&self, role: Role) -> &str {
        self.channels[role as usize].name()
    }

    pub(crate) fn alloc(&self, role: Role, len: usize) -> crate::device::DmaBuf {
        self.channels[role as usize].alloc(len)
    }

    /// Submits `operation`; its completion goes to `owner` (hot path) or, with `None`, waits
    /// for a control-path future holding the returned tag.
    pub(crate) fn submit(&mut self, role: Role, operation: Operation, owner: Option<O>) -> Tag {
        let tag = match owner {
            Some(owner) => {
                let bits = owner.to_bits();
                debug_assert_eq!(bits & HOST_TAG, 0, "an owner fits in 63 bits");
                self.host_in_flight += 1;
                HOST_TAG | bits
            }
            None => self.outstanding.insert(Waiter::Control(None)) as Tag,
        };
        let queue = &mut self.retry[role as usize];
        if !queue.is_empty() {
            // Keep submission order per device: nothing overtakes a queued operation.
            assert!(queue.len() < RETRY_QUEUE_LIMIT, "retry queue of the {} device overflowed", role.name());
            queue.push_back((tag, operation));
            return tag;
        }
        self.try_submit(role, tag, operation);
        tag
    }

    #[inline]
    fn try_submit(&mut self, role: Role, tag: Tag, operation: Operation) -> bool {
        let kind = operation.kind();
        match self.channels[role as usize].submit(tag, operation) {
            Ok(()) => true,
            Err(SubmitError::QueueFull(operation)) => {
                self.retry[role as usize].push_front((tag, *operation));
                false
            }
            Err(SubmitError::Invalid(error)) => {
                self.route(Completion {
                    tag,
                    kind,
                    result: Err(Box::new(error)),
                    payload: crate::device::Payload::None,
                });
                true
            }
        }
    }

    /// Resubmits queued operations, reaps completions from every channel and routes them.
    /// Returns the number of completions reaped.
    pub(crate) fn poll(&mut self) -> usize {
        for role in Role::ALL {
            while let Some((tag, operation)) = self.retry[role as usize].pop_front() {
                if !self.try_submit(role, tag, operation) {
                    break;
                }
            }
        }
        let mut reaped = 0;
        for index in 0..self.channels.len() {
            let mut scratch = std::mem::take(&mut self.scratch);
            reaped += self.channels[index].poll(&mut scratch);
            for completion in scratch.drain(..) {
                self.route(completion);
            }
            self.scratch = scratch;
        }
        reaped
    }

    #[inline]
    fn route(&mut self, completion: Completion) {
        if completion.tag & HOST_TAG != 0 {
            debug_assert!(self.host_in_flight > 0, "a host completion without a submission");
            self.host_in_flight -= 1;
            return self.host_done.push_back((O::from_bits(completion.tag & !HOST_TAG), completion));
        }
        let key = completion.tag as usize;
        match self.outstanding.get_mut(key).expect("every completion has a submitter") {
            Waiter::Control(slot) => {
                debug_assert!(slot.is_none(), "an operation completes once");
                *slot = Some(Box::new(completion));
            }
            Waiter::Abandoned => {
                self.outstanding.remove(key);
            }
        }
    }

    pub(crate) fn next_host_completion(&mut self) -> Option<(O, Completion)> {
        self.host_done.pop_front()
    }

    fn take_control(&mut self, tag: Tag) -> Option<Completion> {
        let key = tag as usize;
        match self.outstanding.get(key) {
            Some(Waiter::Control(Some(_))) => match self.outstanding.remove(key) {
                Waiter::Control(completion) => completion.map(|completion| *completion),
                _ => unreachable!(),
            },
            _ => None,
        }
    }

    /// A control future was dropped before taking its completion.
    fn abandon(&mut self, tag: Tag) {
        let key = tag as usize;
        match self.outstanding.get_mut(key) {
            Some(Waiter::Control(Some(_))) => {
                self.outstanding.remove(key);
            }
            Some(waiter @ Waiter::Control(None)) => *waiter = Waiter::Abandoned,
            _ => {}
        }
    }
}

pub(crate) type Hub<O> = Rc<RefCell<IoHub<O>>>;

/// Waits for the completion of `tag`.
pub(crate) struct IoFuture<O: HostOwner> {
    hub: Hub<O>,
    tag: Tag,
    done: bool,
}

impl<O: HostOwner> Future for IoFuture<O> {
    type Output = Completion;

    fn poll(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Completion> {
        let taken = self.hub.borrow_mut().take_control(self.tag);
        match taken {
            Some(completion) => {
                self.done = true;
                Poll::Ready(completion)
            }
            None => Poll::Pending,
        }
    }
}

impl<O: HostOwner> Drop for IoFuture<O> {
    fn drop(&mut self) {
        if !self.done {
            // Dropped before its completion came (a task ended early): let the slot go when it
            // does. The hub is never borrowed while a future is dropped (executor, block_on).
            if let Ok(mut hub) = self.hub.try_borrow_mut() {
                hub.abandon(self.tag);
            }
        }
    }
}

/// Control-path I/O helpers over a hub. Offsets are device blocks unless named `_bytes`.
pub(crate) struct ControlIo<O> {
    pub(crate) hub: Hub<O>,
}

impl<O> Clone for ControlIo<O> {
    fn clone(&self) -> Self {
        ControlIo { hub: self.hub.clone() }
    }
}

impl<O: HostOwner> ControlIo<O> {
    pub(crate) fn submit(&self, role: Role, operation: Operation) -> IoFuture<O> {
        let tag = self.hub.borrow_mut().submit(role, operation, None);
        IoFuture { hub: self.hub.clone(), tag, done: false }
    }

    pub(crate) fn block_size(&self, role: Role) -> u64 {
        u64::from(self.hub.borrow().geometry(role).block_size)
    }

    pub(crate) fn alloc(&self, role: Role, len: usize) -> crate::device::DmaBuf {
        self.hub.borrow().alloc(role, len)
    }

    pub(crate) async fn read(&self, role: Role, offset_blocks: u64, len: usize) -> Result<IoBuffers, IoError> {
        let buffers = IoBuffers::single(self.alloc(role, len));
        let completion = self.submit(role, Operation::Read { offset_blocks, buffers }).await;
        completion.result.map_err(|error| *error)?;
        match completion.payload {
            crate::device::Payload::Read(buffers) => Ok(buffers),
            other => unreachable!("a read completes with its buffers, got {other:?}"),
        }
    }

    pub(crate) async fn read_bytes(&self, role: Role, offset_bytes: u64, len: usize) -> Result<Vec<u8>, IoError> {
        let block = self.block_size(role);
        debug_assert_eq!(offset_bytes % block, 0, "metadata is block aligned");
        Ok(self.read(role, offset_bytes / block, len).await?.to_vec())
    }

    /// Submits at once (not on first poll), so writes created together run together.
    pub(crate) fn write(
        &self,
        role: Role,
        offset_blocks: u64,
        buffers: SharedBuffers,
        fua: bool,
    ) -> impl Future<Output = Result<(), IoError>> {
        let future = self.submit(role, Operation::Write { offset_blocks, buffers, fua });
        async move { future.await.result.map_err(|error| *error) }
    }

    /// Writes `bytes` (a whole number of device blocks) at a block-aligned byte offset.
    pub(crate) async fn write_bytes(
        &self,
        role: Role,
        offset_bytes: u64,
        bytes: &[u8],
        fua: bool,
    ) -> Result<(), IoError> {
        let block = self.block_size(role);
        debug_assert_eq!(offset_bytes % block, 0, "metadata is block aligned");
        let mut buffer = self.alloc(role, bytes.len());
        buffer.as_mut_slice().copy_from_slice(bytes);
        self.write(role, offset_bytes / block, std::sync::Arc::new(IoBuffers::single(buffer)), fua).await
    }

    /// Submits at once (not on first poll).
    pub(crate) fn flush(&self, role: Role) -> impl Future<Output = Result<(), IoError>> {
        let future = self.submit(role, Operation::Flush);
        async move { future.await.result.map_err(|error| *error) }
    }

    pub(crate) async fn write_zeroes(&self, role: Role, offset_blocks: u64, num_blocks: u64) -> Result<(), IoError> {
        self.submit(role, Operation::WriteZeroes { offset_blocks, num_blocks }).await.result.map_err(|error| *error)
    }
}

/// Runs futures to completion concurrently, at most `limit` at a time, in order of creation;
/// returns the first error, after every started future has finished.
pub(crate) async fn run_bounded<F, T, E>(futures: impl IntoIterator<Item = F>, limit: usize) -> Result<Vec<T>, E>
where
    F: Future<Output = Result<T, E>>,
{
    assert!(limit > 0);
    let mut pending = futures.into_iter().enumerate();
    let mut running: Vec<(usize, Pin<Box<F>>)> = Vec::with_capacity(limit);
    let mut results: Vec<Option<T>> = Vec::new();
    let mut first_error: Option<E> = None;
    let mut exhausted = false;
    std::future::poll_fn(|cx| loop {
        while !exhausted && running.len() < limit && first_error.is_none() {
            match pending.next() {
                Some((index, future)) => {
                    if results.len() <= index {
                        results.resize_with(index + 1, || None);
                    }
                    running.push((index, Box::pin(future)));
                }
                None => exhausted = true,
            }
        }
        let before = running.len();
        running.retain_mut(|(index, future)| match future.as_mut().poll(cx) {
            Poll::Ready(Ok(value)) => {
                results[*index] = Some(value);
                false
            }
            Poll::Ready(Err(error)) => {
                first_error.get_or_insert(error);
                false
            }
            Poll::Pending => true,
        });
        if running.is_empty() && (exhausted || first_error.is_some()) {
            return Poll::Ready(());
        }
        if running.len() == before {
            return Poll::Pending;
        }
    })
    .await;
    match first_error {
        Some(error) => Err(error),
        None => Ok(results.into_iter().map(|r| r.expect("every future finished")).collect()),
    }
}

/// A set of control-path tasks polled from the owner's loop. Tasks make progress only when
/// polled; their I/O completions arrive through the hub in between.
#[derive(Default)]
pub(crate) struct Executor {
    tasks: Vec<Pin<Box<dyn Future<Output = ()>>>>,
}

impl Executor {
    pub(crate) fn spawn(&mut self, task: impl Future<Output = ()> + 'static) {
        self.tasks.push(Box::pin(task));
    }

    /// Polls every task once; returns how many are still running.
    pub(crate) fn poll(&mut self) -> usize {
        let mut context = Context::from_waker(Waker::noop());
        self.tasks.retain_mut(|task| task.as_mut().poll(&mut context).is_pending());
        self.tasks.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }
}

/// Drives one future to completion by polling it and the hub in turn: for offline tools and
/// tests, never inside an SPDK reactor.
pub(crate) fn block_on<O: HostOwner, T>(hub: &Hub<O>, future: impl Future<Output = T>) -> T {
    let mut future = std::pin::pin!(future);
    let mut context = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(value) = future.as_mut().poll(&mut context) {
            return value;
        }
        if hub.borrow_mut().poll() == 0 {
            std::hint::spin_loop();
        }
    }
}
