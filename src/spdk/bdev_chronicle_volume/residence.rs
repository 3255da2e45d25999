//! Where a volume lives: on the app thread ("home"), or on the thread of the one channel
//! that submits its I/O (docs/SPDK.md, "A volume moves to its submitter").
//!
//! A volume lives at home. When the only channel to it is on a thread outside the app
//! thread's reactor (a job of fio's plugin, a poll group on another core), its I/O crosses by
//! the channel's [`Hop`], a message each way per batch. The volume then moves to that thread
//! and takes the channel's I/O in place. Anything else that needs the volume (an RPC, another
//! channel's I/O, hot-remove, delete) calls it home and waits, parked, until it is there.
//!
//! ```text
//!   Home ──(the only channel's hop brings I/O; cool-down over)──► Leaving (the engine drains)
//!     ▲  ◄──(anyone else: the hand-over is called off)────────────┘    │ drained: depart
//!     │                                                                ▼
//!     └──(arrive home; parked callers run)── Returning ◄──(called home, Away (on the
//!                                    (the engine drains there)   or its channel closed)   channel's thread)
//! ```
//!
//! A move is the engine's hand-over (`Volume::begin_handover`): nothing new starts, what is
//! in flight finishes, the device channels are put back on the thread they belong to, and the
//! volume (the whole `VolumeHost`, with everything it owns) travels in one message. Nothing
//! else may hold it meanwhile, which [`send`] checks: the registry holds it only at home, the
//! hop only away, its poller is gone, and no channel keeps even a weak reference (the channel
//! it moves to reaches it through the hop; channels of the app thread's reactor that keep one
//! make it ineligible).

use std::cell::UnsafeCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use slab::Slab;

use super::super::bdev::{BdevIo, IoStatus};
use super::super::device::SpdkDevice;
use super::super::poller::Poller;
use super::super::thread::{self, Doorbell, Message, ThreadHandle};
use super::{
    host_by_id, AtVolume, Entry, Hop, HostState, IoCtx, PendingIo, Registry, VolumeConfig, VolumeHost, HOP_QUEUE_LIMIT,
    REGISTRY,
};
use crate::device::{Channel, Device};
use crate::engine::RestoreId;

/// How long a volume stays home after it came back (or a move was called off) before it
/// leaves again: a caller that keeps asking (a status poll every second) costs a round trip
/// per ask at most, never a volume bouncing between threads.
const COOL_DOWN: Duration = Duration::from_millis(100);

/// Callers parked while the volume is away (host I/Os and RPCs), at most.
const PARKED_LIMIT: usize = HOP_QUEUE_LIMIT;

/// Where a volume is, seen from the thread it is on.
pub(super) enum Residence {
    /// On the app thread; it may leave once SPDK's ticks reach `from`.
    Home { from: u64 },
    /// Leaving for `hop`'s thread: the engine drains; `departing` once the departure message
    /// is sent.
    Leaving { hop: Arc<Hop>, departing: bool },
    /// On `hop`'s thread, taking its channel's I/O in place.
    Away { hop: Arc<Hop> },
    /// Coming home from `hop`'s thread: the engine drains there.
    Returning { hop: Arc<Hop>, departing: bool },
}

impl Residence {
    pub(super) fn home_now() -> Self {
        Residence::Home { from: thread::previous_poll_ended_ticks().saturating_add(thread::ticks_in(COOL_DOWN)) }
    }
}

/// The volume while it lives on a hop's home thread (the channel's), and what the channel and
/// the app thread tell it: set and read on that thread only ([`Hop::resident`]).
pub(crate) struct Resident {
    /// `host` is set: the channel looks there before it queues (one atomic load per I/O).
    here: AtomicBool,
    host: UnsafeCell<Option<Rc<VolumeHost>>>,
    /// The app thread calls the volume home (someone parked there); its next poll starts back.
    called: AtomicBool,
    /// The channel is gone: the volume does not stay (or come) for it.
    closed: AtomicBool,
}

// SAFETY: `host` is only touched by `Hop::resident` and `Hop::set_resident`, which assert that
// they run on the hop's home thread, so the `Rc` inside is used by one OS thread at a time
// (SPDK runs a thread on one OS thread at once); the flags are atomics.
unsafe impl Sync for Resident {}
// SAFETY: as above; a `Resident` dropped on another thread with a volume inside leaks it
// (Drop) instead of touching it.
unsafe impl Send for Resident {}

impl Resident {
    pub(crate) fn new() -> Self {
        Resident {
            here: AtomicBool::new(false),
            host: UnsafeCell::new(None),
            called: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        }
    }
}

impl Drop for Resident {
    fn drop(&mut self) {
        if let Some(host) = self.host.get_mut().take() {
            // Only when SPDK stops with the volume away (it is called home before any delete):
            // whichever thread drops the last hop, leaking beats touching another's `Rc`.
            std::mem::forget(host);
        }
    }
}

impl Hop {
    /// The volume, when it lives on this hop's home thread (called there: the channel's
    /// thread, or the volume's own poll).
    pub(super) fn resident(&self) -> Option<Rc<VolumeHost>> {
        if !self.resident.here.load(Ordering::Acquire) {
            return None;
        }
        assert!(self.home.is_current(), "a volume that moved is used on its new thread only");
        // SAFETY: on the home thread (checked), the only one that touches the cell.
        unsafe { (*self.resident.host.get()).clone() }
    }

    fn set_resident(&self, host: Option<Rc<VolumeHost>>) {
        assert!(self.home.is_current(), "a volume that moved is used on its new thread only");
        self.resident.here.store(host.is_some(), Ordering::Release);
        // SAFETY: as in `resident`.
        let previous = unsafe { std::mem::replace(&mut *self.resident.host.get(), host) };
        drop(previous);
    }

    /// The channel of this hop is gone (its thread, as the channel is dropped).
    pub(super) fn channel_closed(&self) {
        self.resident.closed.store(true, Ordering::Release);
        if let Some(host) = self.resident() {
            host.go_home();
        }
    }
}

/// A caller waiting for a volume to come home: it gets the volume, or `None` if it is gone.
type Parked = Box<dyn FnOnce(Option<&Rc<VolumeHost>>)>;

/// What the app thread keeps of a volume that is away.
pub(super) struct Away {
    /// What `write_config_json` reports meanwhile (the volume changes no option away: every
    /// RPC calls it home first).
    pub(super) config: VolumeConfig,
    hop: Arc<Hop>,
    parked: VecDeque<Parked>,
}

impl Registry {
    pub(super) fn away_id(&self, name: &str) -> Option<u64> {
        self.away.iter().find(|(_, away)| away.config.name == name).map(|(id, _)| *id)
    }
}

/// Runs `then` with volume `id` at home: now, or once it is back (called now); `None` if
/// there is no such volume. On the app thread (its OS thread: the registry).
pub(super) fn with_host(id: u64, then: impl FnOnce(Option<&Rc<VolumeHost>>) + 'static) {
    if let Some(host) = host_by_id(id) {
        host.stay_home();
        return then(Some(&host));
    }
    if let Err(then) = park(id, Box::new(then)) {
        then(None);
    }
}

/// As [`with_host`], by the volume's name.
pub(super) fn with_named(name: &str, then: impl FnOnce(Option<&Rc<VolumeHost>>) + 'static) {
    let id = REGISTRY.with(|registry| {
        let registry = registry.borrow();
        registry.by_name.get(name).map(|host| host.id).or_else(|| registry.away_id(name))
    });
    match id {
        Some(id) => with_host(id, then),
        None => then(None),
    }
}

/// Parks `then` until volume `id` is home, and calls it home; given back if the volume is
/// not away (or too many wait already).
fn park(id: u64, then: Parked) -> Result<(), Parked> {
    REGISTRY.with(|registry| {
        let mut registry = registry.borrow_mut();
        let Some(away) = registry.away.get_mut(&id) else { return Err(then) };
        if away.parked.len() >= PARKED_LIMIT {
            spdk_error!("chronicle: {}: {PARKED_LIMIT} callers wait for it to come home; refusing", away.config.name);
            return Err(then);
        }
        away.parked.push_back(then);
        // Read by the volume's next poll there (no message: nothing to allocate, nothing to
        // refuse).
        away.hop.resident.called.store(true, Ordering::Release);
        Ok(())
    })
}

/// A host I/O of a channel on the app thread's reactor for volume `volume`, which is not home:
/// it waits there for the volume (or fails if there is none).
pub(super) fn park_io(volume: u64, io: BdevIo<IoCtx>, restore: Option<RestoreId>, entry: Entry) {
    let then: Parked = Box::new(move |host| match host {
        Some(host) => super::submit_in_place(host, io, restore, entry),
        None => io.complete(IoStatus::Failed),
    });
    if let Err(then) = park(volume, then) {
        then(None);
    }
}

/// The doorbell of `hop` rang on the app thread and its volume is not home.
pub(super) fn rang_away(hop: Arc<Hop>) -> Result<(), Arc<Hop>> {
    let own =
        REGISTRY.with(|registry| registry.borrow().away.get(&hop.volume).map(|away| Arc::ptr_eq(&away.hop, &hop)));
    match own {
        None => Err(hop),
        // What the volume's channel queued before the volume arrived (it takes that queue as it
        // arrives; this doorbell may come after): the doorbell follows the volume.
        Some(true) if !hop.resident.called.load(Ordering::Acquire) => {
            let home = hop.home;
            if let Err((_, hop)) = home.ring::<AtResident>(hop) {
                park_arrival(hop);
            }
            Ok(())
        }
        Some(_) => {
            park_arrival(hop);
            Ok(())
        }
    }
}

fn park_arrival(hop: Arc<Hop>) {
    let volume = hop.volume;
    let then: Parked = Box::new(move |host| match host {
        Some(host) => host.arrive(&hop),
        None => super::fail_arrivals(hop),
    });
    if let Err(then) = park(volume, then) {
        then(None);
    }
}

/// A hop's doorbell forwarded to the thread its volume moved to.
enum AtResident {}

impl Doorbell for AtResident {
    type Target = Hop;
    fn rang(hop: Arc<Hop>) {
        match hop.resident() {
            Some(host) => host.arrive(&hop),
            // On its way home meanwhile: the doorbell follows it.
            None => {
                let owner = hop.owner;
                if let Err((_, hop)) = owner.ring::<AtVolume>(hop) {
                    // Rung again by the channel's next I/O.
                    hop.to_volume.ring_failed();
                }
            }
        }
    }
}

/// The volume in one message to another thread (or to its own, to leave a poll first).
struct Moving {
    host: Rc<VolumeHost>,
    step: Step,
}

enum Step {
    /// On its own thread, outside the poller: leave now.
    Depart,
    /// On the thread it moved to.
    Arrive,
}

// SAFETY: a `Moving` sent to another thread holds the only reference to the volume's host
// (`send` checks: one strong reference, no weak one), and through it everything the volume
// owns: the engine's state (`Rc`s shared only inside it), its pending host I/Os (detached, or
// `BdevIo`s of the thread it goes to), its descriptors (SPDK lets any thread take channels of
// a descriptor; `BdevDesc` closes on its opener by message). Its device channels and poller
// were dropped on the thread they belong to before it left. A `Depart` runs on the thread
// that sent it.
unsafe impl Send for Moving {}

impl Message for Moving {
    fn run(self) {
        match self.step {
            Step::Depart => self.host.depart(),
            Step::Arrive => self.host.arrive_here(),
        }
    }
}

impl VolumeHost {
    /// Whether the volume may move to the thread of `hop`, the only channel to it.
    fn may_leave(&self, hop: &Hop) -> bool {
        self.config.borrow().follow_submitter
            && hop.restore.is_none()
            && !hop.resident.closed.load(Ordering::Acquire)
            && self.registered.get()
            && self.channels.load(Ordering::Acquire) == 1
            && matches!(*self.state.borrow(), HostState::Running(_))
            && self.destruct.borrow().is_none()
            && self.removed.borrow().is_none()
            && self.waiters.borrow().is_empty()
            && self.markers.borrow().is_empty()
            && self.maintenance.borrow().is_empty()
            && self.compressions.borrow().is_empty()
            && self.restore_opens.borrow().is_empty()
            && self.restores.borrow().is_empty()
            && self.rollbacks.load(Ordering::Acquire) == 0
            // Nothing of a channel here: every I/O held came by a hop.
            && self.pending.borrow().len() == self.remote_held.get()
    }

    /// `hop` brought I/O home: the volume starts leaving for its thread if it may.
    pub(super) fn consider_leaving(&self, hop: &Arc<Hop>) {
        let Residence::Home { from } = *self.residence.borrow() else { return };
        if thread::previous_poll_ended_ticks() < from || !self.may_leave(hop) {
            return;
        }
        if self.running(|volume| volume.begin_handover()).is_ok_and(|begun| begun.is_ok()) {
            *self.residence.borrow_mut() = Residence::Leaving { hop: hop.clone(), departing: false };
        }
    }

    /// Someone else needs the volume at home: a move that has not left yet is called off.
    pub(super) fn stay_home(&self) {
        if !matches!(*self.residence.borrow(), Residence::Leaving { .. }) {
            return;
        }
        // Draining still (the departure checks again before it releases anything).
        let _ = self.running(|volume| volume.cancel_handover());
        *self.residence.borrow_mut() = Residence::home_now();
    }

    /// Whether a host I/O from `io`'s way calls a move off (anything but the leaving hop's).
    pub(super) fn stays_for(&self, io: &PendingIo) {
        let other = match (&*self.residence.borrow(), io) {
            (Residence::Leaving { hop, .. }, PendingIo::Remote(_, slot)) => hop.slot.load(Ordering::Relaxed) != *slot,
            (Residence::Leaving { .. }, _) => true,
            _ => false,
        };
        if other {
            self.stay_home();
        }
    }

    /// One poll's part of a move: away, a call home starts the return; leaving or returning,
    /// a drained engine departs (by a message to this thread, outside the poller, which the
    /// departure drops). Whether anything happened.
    pub(super) fn advance_residence(self: &Rc<Self>) -> bool {
        let called = match &*self.residence.borrow() {
            Residence::Home { .. } => return false,
            Residence::Away { hop } if !hop.resident.called.load(Ordering::Acquire) => return false,
            Residence::Away { .. } => true,
            Residence::Leaving { departing: true, .. } | Residence::Returning { departing: true, .. } => return false,
            Residence::Leaving { .. } | Residence::Returning { .. } => false,
        };
        if called {
            self.go_home();
            return true;
        }
        let ready = matches!(&*self.state.borrow(), HostState::Running(volume) if volume.handover_ready());
        if !ready {
            return false;
        }
        let here = thread::Thread::current().expect("a volume polls on an SPDK thread").handle();
        if here.send(Moving { host: self.clone(), step: Step::Depart }).is_ok() {
            match &mut *self.residence.borrow_mut() {
                Residence::Leaving { departing, .. } | Residence::Returning { departing, .. } => *departing = true,
                _ => unreachable!("checked above"),
            }
        }
        true
    }

    /// Away, on the channel's thread: starts back home (called, or the channel closed).
    pub(super) fn go_home(&self) {
        let hop = match &*self.residence.borrow() {
            Residence::Away { hop } => hop.clone(),
            _ => return,
        };
        if let Err(error) = flatten(self.running(|volume| volume.begin_handover())) {
            spdk_error!("chronicle: {}: cannot start home: {error}", self.config.borrow().name);
            return;
        }
        // From now on the channel's I/O goes by the hop again, to wait at home.
        hop.set_resident(None);
        *self.residence.borrow_mut() = Residence::Returning { hop, departing: false };
    }

    /// Drained, outside the poller, on the thread the volume leaves: puts back what belongs to
    /// this thread and sends the volume on.
    fn depart(self: Rc<Self>) {
        let (hop, home) = match &*self.residence.borrow() {
            Residence::Leaving { hop, departing: true } => (hop.clone(), true),
            Residence::Returning { hop, departing: true } => (hop.clone(), false),
            // Called off meanwhile.
            _ => return,
        };
        if home && !self.may_leave(&hop) {
            return self.stay_home();
        }
        match flatten(self.running(|volume| volume.release_channels())) {
            Ok(channels) => drop(channels),
            Err(error) => {
                spdk_error!("chronicle: {}: cannot move: {error}", self.config.borrow().name);
                return self.stay_home();
            }
        }
        if !home {
            // The channel's I/O the volume holds completes back here, by the hop.
            self.pending_by_hop(&hop);
        }
        drop(self.poller.borrow_mut().take());
        if home {
            let id = self.id;
            let config = self.config.borrow().clone();
            REGISTRY.with(|registry| {
                let mut registry = registry.borrow_mut();
                registry.by_id.remove(&id);
                registry.by_name.remove(&config.name);
                registry.away.insert(id, Away { config, hop: hop.clone(), parked: VecDeque::new() });
            });
            *self.residence.borrow_mut() = Residence::Away { hop: hop.clone() };
        }
        let to = if home { hop.home } else { hop.owner };
        if let Err(host) = send(self, to) {
            spdk_error!("chronicle: {}: cannot move (no message memory); staying", host.config.borrow().name);
            host.settle_back(home, &hop);
        }
    }

    /// Before the volume leaves the channel's thread: its I/Os taken in place become the
    /// hop's, completed back here by message like any other thread's.
    fn pending_by_hop(&self, hop: &Arc<Hop>) {
        let slot = self.adopt(hop);
        let pending = std::mem::take(&mut *self.pending.borrow_mut());
        let mut moved = 0;
        let pending: Slab<PendingIo> = pending
            .into_iter()
            .map(|(tag, io)| match io {
                PendingIo::Local(io) => {
                    moved += 1;
                    (tag, PendingIo::Remote(io.detach(), slot))
                }
                other => (tag, other),
            })
            .collect();
        *self.pending.borrow_mut() = pending;
        self.hops.borrow_mut()[slot].held += moved;
        self.remote_held.set(self.remote_held.get() + moved);
    }

    /// The move failed to leave: the volume takes this thread's channels again and stays.
    fn settle_back(self: Rc<Self>, home: bool, hop: &Arc<Hop>) {
        if home {
            REGISTRY.with(|registry| {
                let mut registry = registry.borrow_mut();
                registry.away.remove(&self.id);
                registry.by_id.insert(self.id, self.clone());
                registry.by_name.insert(self.config.borrow().name.clone(), self.clone());
            });
            *self.residence.borrow_mut() = Residence::home_now();
        } else {
            hop.set_resident(Some(self.clone()));
            *self.residence.borrow_mut() = Residence::Away { hop: hop.clone() };
        }
        if let Err(error) = self.settle() {
            spdk_error!("chronicle: {}: stuck without device channels: {error}", self.config.borrow().name);
        }
    }

    /// Takes this thread's channels to the four devices and polls here.
    fn settle(self: &Rc<Self>) -> Result<(), String> {
        let channels: Result<Vec<Box<dyn Channel>>, _> =
            self.descs.borrow().iter().map(|desc| SpdkDevice::new(desc.clone()).open_channel()).collect();
        let channels = channels.map_err(|error| error.to_string())?;
        flatten(self.running(|volume| volume.adopt_channels(channels).map_err(|(error, _channels)| error)))?;
        let host = self.clone();
        let name = format!("chronicle_{}", self.config.borrow().name);
        let poller = Poller::register(&name, Duration::ZERO, move || host.poll()).map_err(|errno| errno.to_string())?;
        *self.poller.borrow_mut() = Some(poller);
        Ok(())
    }

    /// Arrived on the thread it was sent to.
    fn arrive_here(self: Rc<Self>) {
        let (hop, away) = match &*self.residence.borrow() {
            Residence::Away { hop } => (hop.clone(), true),
            Residence::Returning { hop, .. } => (hop.clone(), false),
            _ => unreachable!("a volume travels away or home"),
        };
        if !away {
            return self.arrive_home(hop);
        }
        let closed = hop.resident.closed.load(Ordering::Acquire);
        let settled = if closed { Err("its channel closed meanwhile".to_string()) } else { self.settle() };
        if let Err(why) = settled {
            // Straight back, channels still released: home adopts its own.
            spdk_info!(super::bdev_chronicle::LOG, "chronicle: {}: not staying: {why}", self.config.borrow().name);
            *self.residence.borrow_mut() = Residence::Returning { hop: hop.clone(), departing: true };
            if let Err(host) = send(self, hop.owner) {
                spdk_error!("chronicle: {}: cannot go home (no message memory)", host.config.borrow().name);
                host.settle_back(false, &hop);
            }
            return;
        }
        self.counters.borrow_mut().moves += 1;
        spdk_info!(
            super::bdev_chronicle::LOG,
            "chronicle: {} moved to thread {} (its only channel's)",
            self.config.borrow().name,
            thread::Thread::current().map(|thread| thread.name()).unwrap_or_default()
        );
        hop.set_resident(Some(self.clone()));
        // What the channel queued while the volume travelled.
        self.arrive(&hop);
    }

    fn arrive_home(self: Rc<Self>, hop: Arc<Hop>) {
        let parked = REGISTRY.with(|registry| {
            let mut registry = registry.borrow_mut();
            registry.by_id.insert(self.id, self.clone());
            registry.by_name.insert(self.config.borrow().name.clone(), self.clone());
            registry.away.remove(&self.id).map(|away| away.parked).unwrap_or_default()
        });
        hop.resident.called.store(false, Ordering::Release);
        self.counters.borrow_mut().returns += 1;
        *self.residence.borrow_mut() = Residence::home_now();
        if let Err(error) = self.settle() {
            spdk_error!("chronicle: {}: back home without device channels: {error}", self.config.borrow().name);
        }
        // What the channel queued on the way (it may be parked too: taking it twice is fine).
        self.arrive(&hop);
        for then in parked {
            then(Some(&self));
        }
    }
}

/// A request to the running engine, its two ways to fail as one message.
fn flatten<T>(result: Result<Result<T, impl std::fmt::Display>, impl std::fmt::Display>) -> Result<T, String> {
    match result {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(error.to_string()),
        Err(error) => Err(error.to_string()),
    }
}

/// Sends `host` to `to` in a message (it arrives there); given back if it is not the only
/// reference or SPDK has no message memory.
fn send(host: Rc<VolumeHost>, to: ThreadHandle) -> Result<(), Rc<VolumeHost>> {
    if Rc::strong_count(&host) != 1 || Rc::weak_count(&host) != 0 {
        spdk_error!(
            "chronicle: {}: still referenced here ({} strong, {} weak); not moving",
            host.config.borrow().name,
            Rc::strong_count(&host),
            Rc::weak_count(&host)
        );
        return Err(host);
    }
    to.send(Moving { host, step: Step::Arrive }).map_err(|(_, moving)| moving.host)
}

/// Volumes away when the application stops (none: deleting a volume calls it home): their
/// parked callers are answered.
pub(super) fn clear_away(registry: &mut Registry) -> Vec<Parked> {
    registry.away.drain().flat_map(|(_, away)| away.parked).collect()
}
