//! Queue notifications as VIRTIO_F_RING_EVENT_IDX means them: a transport
//! over the MMIO one that lets a notification through only when the new
//! buffers cross the device's `avail_event` (the spec's `vring_need_event`,
//! virtio 1.2 §2.7.10).
//!
//! `virtio-drivers` 0.13 decides with `avail_idx >= avail_event + 1`, so a
//! device that leaves `avail_event` behind to say "no more for now" (as ours
//! does while it works through a queue) is notified for every buffer: a
//! VM exit per frame sent and per RX buffer given back. This transport
//! checks again, correctly, before the exit. Owns the last index notified
//! per queue; never suppresses a notification the device asked for.
//!
//! The other way round, the device wakes a parked guest only when its used
//! index crosses the driver's `used_event` ([`RxWake`]): while the guest
//! looks for frames itself it asks not to be woken, so frames it takes
//! while looking leave no wake-up behind to end its next park at once.

use alloc::rc::Rc;
use core::cell::Cell;
use core::sync::atomic::{Ordering, fence};

use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{PhysAddr, Result};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// Feature bit of VIRTIO_F_RING_EVENT_IDX.
const RING_EVENT_IDX: u64 = 1 << 29;
/// Queues tracked (virtio-net: RX and TX).
const QUEUES: usize = 2;
/// The queue whose used buffers wake the guest (virtio-net's RX).
const RX_QUEUE: usize = 0;

/// Where a queue's indices live in guest memory.
#[derive(Clone, Copy)]
struct Rings {
    /// `idx` of the driver area (the avail ring).
    avail_idx: usize,
    /// `avail_event` at the end of the device area (the used ring).
    avail_event: usize,
    /// The avail index when the device was last considered for a notification.
    checked: u16,
}

/// The MMIO transport, with notifications filtered (see the module doc).
pub struct EventIdxTransport<T> {
    inner: T,
    event_idx: bool,
    rings: [Option<Rings>; QUEUES],
    rx_wake: RxWake,
}

impl<T: Transport> EventIdxTransport<T> {
    /// The transport, and the handle that asks for RX wake-ups or not once
    /// the driver has set its queues up.
    pub fn new(inner: T) -> (Self, RxWake) {
        let rx_wake = RxWake(Rc::new(Cell::new(None)));
        (EventIdxTransport { inner, event_idx: false, rings: [None; QUEUES], rx_wake: rx_wake.clone() }, rx_wake)
    }
}

/// Where the RX queue's `used_event` (in the avail ring) and used `idx`
/// live.
#[derive(Clone, Copy)]
struct RxIndices {
    used_event: usize,
    used_idx: usize,
}

/// Whether the device wakes the guest for the next RX frame. Without
/// EVENT_IDX (or before the queue is set up) the device always wakes it,
/// and both calls do nothing.
#[derive(Clone)]
pub struct RxWake(Rc<Cell<Option<RxIndices>>>);

impl RxWake {
    /// Asks not to be woken for frames that come from now on (the guest
    /// looks for them itself). The driver asks again with each frame it
    /// takes; [`RxWake::arm`] must come before any park.
    pub fn quiet(&self) {
        let Some(at) = self.0.get() else { return };
        // SAFETY: both addresses lie in the RX queue's rings, which the
        // driver allocated (identity-mapped, 2-byte aligned) and keeps until
        // `queue_unset`; the device writes the used index, hence volatile.
        unsafe {
            let used = core::ptr::read_volatile(at.used_idx as *const u16);
            // An index already passed: the device's next ones never cross it.
            core::ptr::write_volatile(at.used_event as *mut u16, used.wrapping_sub(1));
        }
    }

    /// Asks to be woken by the next frame. The caller looks for frames
    /// once more afterwards: one the device added before it saw this wish
    /// woke no one.
    pub fn arm(&self) {
        let Some(at) = self.0.get() else { return };
        // SAFETY: as in `quiet`.
        unsafe {
            let used = core::ptr::read_volatile(at.used_idx as *const u16);
            core::ptr::write_volatile(at.used_event as *mut u16, used);
        }
        // The wish is published before the caller reads the index again.
        fence(Ordering::SeqCst);
    }
}

/// True when moving the avail index from `old` to `new` passes `event`
/// (all modulo 2^16).
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

impl<T: Transport> Transport for EventIdxTransport<T> {
    fn device_type(&self) -> DeviceType {
        self.inner.device_type()
    }

    fn read_device_features(&mut self) -> u64 {
        self.inner.read_device_features()
    }

    fn write_driver_features(&mut self, driver_features: u64) {
        self.event_idx = driver_features & RING_EVENT_IDX != 0;
        self.inner.write_driver_features(driver_features);
    }

    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.inner.max_queue_size(queue)
    }

    fn notify(&mut self, queue: u16) {
        let rings = self.rings.get_mut(usize::from(queue)).and_then(Option::as_mut);
        let (true, Some(rings)) = (self.event_idx, rings) else {
            return self.inner.notify(queue);
        };
        // The new index is published before the device's wish is read.
        fence(Ordering::SeqCst);
        // SAFETY: both addresses lie in the queue's rings, which the driver
        // allocated (identity-mapped, 2-byte aligned) and keeps until
        // `queue_unset`; the device writes `avail_event`, hence volatile.
        let (new, event) = unsafe {
            (
                core::ptr::read_volatile(rings.avail_idx as *const u16),
                core::ptr::read_volatile(rings.avail_event as *const u16),
            )
        };
        let old = core::mem::replace(&mut rings.checked, new);
        if need_event(event, new, old) {
            self.inner.notify(queue);
        }
    }

    fn get_status(&self) -> DeviceStatus {
        self.inner.get_status()
    }

    fn set_status(&mut self, status: DeviceStatus) {
        self.inner.set_status(status);
    }

    fn set_guest_page_size(&mut self, guest_page_size: u32) {
        self.inner.set_guest_page_size(guest_page_size);
    }

    fn requires_legacy_layout(&self) -> bool {
        self.inner.requires_legacy_layout()
    }

    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        // The avail ring: flags, idx, ring[size], used_event (u16 each);
        // the used ring: flags, idx (u16), ring[size] of 8 bytes, avail_event.
        let (Ok(driver), Ok(device), Ok(entries)) =
            (usize::try_from(driver_area), usize::try_from(device_area), usize::try_from(size))
        else {
            return self.inner.queue_set(queue, size, descriptors, driver_area, device_area);
        };
        if let Some(slot) = self.rings.get_mut(usize::from(queue)) {
            *slot = Some(Rings { avail_idx: driver + 2, avail_event: device + 4 + 8 * entries, checked: 0 });
        }
        self.inner.queue_set(queue, size, descriptors, driver_area, device_area);
        if usize::from(queue) == RX_QUEUE && self.event_idx {
            self.rx_wake.0.set(Some(RxIndices { used_event: driver + 4 + 2 * entries, used_idx: device + 2 }));
        }
    }

    fn queue_unset(&mut self, queue: u16) {
        if let Some(slot) = self.rings.get_mut(usize::from(queue)) {
            *slot = None;
        }
        if usize::from(queue) == RX_QUEUE {
            self.rx_wake.0.set(None);
        }
        self.inner.queue_unset(queue);
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        self.inner.queue_used(queue)
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        self.inner.ack_interrupt()
    }

    fn read_config_generation(&self) -> u32 {
        self.inner.read_config_generation()
    }

    fn read_config_space<V: FromBytes + IntoBytes>(&self, offset: usize) -> Result<V> {
        self.inner.read_config_space(offset)
    }

    fn write_config_space<V: IntoBytes + Immutable>(&mut self, offset: usize, value: V) -> Result<()> {
        self.inner.write_config_space(offset, value)
    }
}
