//! The worker side of virtio-net: each visit moves frames the guest
//! transmitted into the backend and frames the backend has for the guest
//! into its RX buffers, re-arms notifications, and notices driver resets
//! and broken rings — all under one lock of the transport.
//!
//! Owns the notification policy (see `docs/platform-notes.md`): TX
//! notifications stay off while the ring keeps yielding frames and are
//! re-armed only by a look that finds it empty; RX notifications are armed
//! only when the guest ran out of buffers. Never blocks; waking a parked
//! guest is one eventfd write after frames were handed to it, when the
//! guest asked for it (EVENT_IDX's `used_event`).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::{NetDevice, RX_QUEUE, TX_QUEUE};
use crate::devices::virtio::mmio::MmioTransport;

/// TX chains consumed per visit, so RX gets its turn.
const TX_BATCH: usize = 256;

/// Where the device's frames go and come from: the host end of the link.
pub trait NetBackend {
    /// Frames from the guest are appended here, oldest first.
    fn frames_from_guest(&mut self) -> &mut VecDeque<Vec<u8>>;
    /// Frames for the guest, oldest first; delivered ones are taken off the front.
    fn frames_to_guest(&mut self) -> &mut VecDeque<Vec<u8>>;
}

/// What one visit did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Frames moved (or buffers appeared): visit again before sleeping.
    pub moved: bool,
    /// The device went from active to reset since the last visit.
    pub reset: bool,
    /// The device is active (the driver finished setting it up).
    pub active: bool,
}

/// Drives one virtio-net device for its backend.
pub struct NetEventHandler {
    transport: Arc<Mutex<MmioTransport<NetDevice>>>,
    /// Written after frames are handed to the guest, to end a WAIT.
    wake_guest: Arc<EventFd>,
    was_active: bool,
}

impl NetEventHandler {
    pub fn new(transport: Arc<Mutex<MmioTransport<NetDevice>>>, wake_guest: Arc<EventFd>) -> Self {
        NetEventHandler { transport, wake_guest, was_active: false }
    }

    /// The eventfds KVM signals on QueueNotify writes (RX, TX), for the
    /// worker's reactor.
    pub fn queue_events(&self) -> std::io::Result<(EventFd, EventFd)> {
        let transport = self.transport.lock().map_err(|_| std::io::Error::other("device lock poisoned"))?;
        let event = |i| {
            transport.queue_event(i).ok_or_else(|| std::io::Error::other("no queue event")).and_then(EventFd::try_clone)
        };
        Ok((event(RX_QUEUE)?, event(TX_QUEUE)?))
    }

    /// Frames moved either way so far.
    pub fn frames_moved(&self) -> u64 {
        let Ok(transport) = self.transport.lock() else { return 0 };
        let m = transport.device().metrics();
        [&m.tx_frames, &m.rx_frames].iter().map(|c| c.load(std::sync::atomic::Ordering::Relaxed)).sum()
    }

    /// Counts queue notifications the worker drained from the eventfds.
    pub fn add_notifications(&self, count: u64) {
        if let Ok(mut transport) = self.transport.lock() {
            transport.add_notifications(count);
        }
    }

    /// One visit: TX frames to the backend, backend frames to RX.
    pub fn process(&mut self, backend: &mut impl NetBackend) -> Progress {
        // A poisoned lock means the vCPU thread panicked: nothing to drive.
        let Ok(mut transport) = self.transport.lock() else { return Progress::default() };
        let active = transport.is_activated();
        let reset = self.was_active && !active;
        let mut progress = Progress { moved: active != self.was_active, reset, active };
        self.was_active = active;
        if reset {
            // Frames in flight either way belong to a driver that is gone.
            backend.frames_from_guest().clear();
            backend.frames_to_guest().clear();
        }
        if !active {
            return progress;
        }
        let device = transport.device_mut();
        let tx = device.pop_tx_frames(backend.frames_from_guest(), TX_BATCH).and_then(|n| {
            // Only a look that finds nothing re-arms (true: frames slipped in).
            if n == 0 { device.enable_notification(TX_QUEUE) } else { Ok(true) }
        });
        let rx = tx.and_then(|tx_moved| {
            let n = if backend.frames_to_guest().is_empty() {
                0
            } else {
                device.push_rx_frames(backend.frames_to_guest())?
            };
            let wake = n > 0 && device.rx_needs_wake()?;
            let more_buffers = if backend.frames_to_guest().is_empty() {
                false
            } else {
                // Out of guest buffers with frames left: ask to be told when
                // the guest adds some (true: it already did).
                device.enable_notification(RX_QUEUE)?
            };
            Ok((tx_moved, n > 0, wake, more_buffers))
        });
        match rx {
            Ok((tx_moved, delivered, wake, more_buffers)) => {
                progress.moved |= tx_moved || delivered || more_buffers;
                drop(transport);
                if wake {
                    let _ = self.wake_guest.write(1);
                }
            }
            Err(fault) => {
                if device.last_fault().is_none() {
                    // Once: a guest that keeps breaking rings is counted, not logged.
                    eprintln!("mqvisor: virtio-net: {fault}; the device needs a reset");
                }
                device.record_fault(fault);
                transport.set_needs_reset();
            }
        }
        progress
    }
}

#[cfg(test)]
mod tests {
    //! A driver that sets the device up properly, then lies about its ring.

    use super::*;
    use crate::devices::virtio::mmio::reg;
    use crate::devices::virtio::net::NetMetrics;
    use crate::devices::virtio::{VIRTIO_F_VERSION_1, status};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    const QUEUE_NUM: u32 = 16;
    /// Per queue: descriptors, avail ring, used ring, each on its own page.
    const QUEUE_AREAS: [u64; 2] = [0x1_0000, 0x2_0000];
    /// Offset of `idx` in the avail ring (after `flags`).
    const AVAIL_IDX: u64 = 2;

    struct Link(VecDeque<Vec<u8>>, VecDeque<Vec<u8>>);

    impl NetBackend for Link {
        fn frames_from_guest(&mut self) -> &mut VecDeque<Vec<u8>> {
            &mut self.0
        }
        fn frames_to_guest(&mut self) -> &mut VecDeque<Vec<u8>> {
            &mut self.1
        }
    }

    fn write(t: &mut MmioTransport<NetDevice>, register: u64, value: u32) {
        t.write(register, &value.to_le_bytes());
    }

    /// An activated device over 1 MiB of guest memory.
    fn activated() -> (Arc<Mutex<MmioTransport<NetDevice>>>, GuestMemoryMmap) {
        activated_with(0)
    }

    /// The same, with `features` (of the low 32) negotiated too.
    fn activated_with(features: u32) -> (Arc<Mutex<MmioTransport<NetDevice>>>, GuestMemoryMmap) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut t = MmioTransport::new(NetDevice::new([2, 0, 0, 0, 0, 1], 2048), mem.clone()).unwrap();
        let ad = status::ACKNOWLEDGE | status::DRIVER;
        write(&mut t, reg::STATUS, ad);
        write(&mut t, reg::DRIVER_FEATURES_SEL, 0);
        write(&mut t, reg::DRIVER_FEATURES, features);
        write(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        write(&mut t, reg::DRIVER_FEATURES, u32::try_from(VIRTIO_F_VERSION_1 >> 32).unwrap());
        write(&mut t, reg::STATUS, ad | status::FEATURES_OK);
        for (queue, base) in QUEUE_AREAS.into_iter().enumerate() {
            write(&mut t, reg::QUEUE_SEL, u32::try_from(queue).unwrap());
            write(&mut t, reg::QUEUE_NUM, QUEUE_NUM);
            for (register, at) in [
                (reg::QUEUE_DESC_LOW, base),
                (reg::QUEUE_DRIVER_LOW, base + 0x1000),
                (reg::QUEUE_DEVICE_LOW, base + 0x2000),
            ] {
                write(&mut t, register, u32::try_from(at).unwrap());
            }
            write(&mut t, reg::QUEUE_READY, 1);
        }
        write(&mut t, reg::STATUS, ad | status::FEATURES_OK | status::DRIVER_OK);
        assert!(t.is_activated(), "status {:#x}", t.status());
        (Arc::new(Mutex::new(t)), mem)
    }

    #[test]
    fn a_guest_is_woken_for_frames_only_when_its_used_event_asks() {
        use crate::devices::virtio::VIRTIO_F_RING_EVENT_IDX;
        let (transport, mem) = activated_with(u32::try_from(VIRTIO_F_RING_EVENT_IDX).unwrap());
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut handler = NetEventHandler::new(transport, wake.clone());
        let rx = QUEUE_AREAS[0];
        let used_event = GuestAddress(rx + 0x1000 + 4 + 2 * u64::from(QUEUE_NUM));
        // RX buffers 0..4, each a page, writable by the device.
        for i in 0..4u64 {
            let desc = rx + 16 * i;
            mem.write_obj(0x8_0000 + 0x1000 * i, GuestAddress(desc)).unwrap();
            mem.write_obj(0x1000u32, GuestAddress(desc + 8)).unwrap();
            mem.write_obj(2u16, GuestAddress(desc + 12)).unwrap(); // VIRTQ_DESC_F_WRITE
            mem.write_obj(u16::try_from(i).unwrap(), GuestAddress(rx + 0x1000 + 4 + 2 * i)).unwrap();
        }
        mem.write_obj(4u16, GuestAddress(rx + 0x1000 + AVAIL_IDX)).unwrap();
        let mut link = Link(VecDeque::new(), VecDeque::new());
        let mut deliver = |handler: &mut NetEventHandler| {
            link.1.push_back(vec![0u8; 60]);
            assert!(handler.process(&mut link).moved && link.1.is_empty());
            wake.read().is_ok()
        };
        // The driver took nothing yet and waits for entry 0: woken.
        mem.write_obj(0u16, used_event).unwrap();
        assert!(deliver(&mut handler), "a parked guest is woken");
        // It looks for frames itself (an index already passed): not woken.
        mem.write_obj(u16::MAX, used_event).unwrap();
        assert!(!deliver(&mut handler), "a guest that looks is not woken");
        assert!(!deliver(&mut handler));
        // It parks, asking for the next entry (3): woken again.
        mem.write_obj(3u16, used_event).unwrap();
        assert!(deliver(&mut handler), "a guest that parks again is woken");
    }

    #[test]
    fn a_broken_ring_is_counted_kept_and_resets_the_device() {
        let (transport, mem) = activated();
        let mut handler = NetEventHandler::new(transport.clone(), Arc::new(EventFd::new(0).unwrap()));
        let mut link = Link(VecDeque::new(), VecDeque::from([vec![0u8; 60]]));
        let first = handler.process(&mut link);
        assert!(first.active && !first.reset);
        // The driver claims 100 new TX buffers in a 16-entry ring.
        mem.write_obj(100u16, GuestAddress(QUEUE_AREAS[1] + 0x1000 + AVAIL_IDX)).unwrap();
        let faulted = handler.process(&mut link);
        assert!(!faulted.moved);
        {
            let mut t = transport.lock().unwrap();
            assert!(!t.is_activated());
            assert_eq!(t.status() & status::DEVICE_NEEDS_RESET, status::DEVICE_NEEDS_RESET);
            assert_eq!(NetMetrics::get(&t.device().metrics().ring_faults), 1);
            let fault = t.device_mut().take_last_fault().expect("the fault is kept for the report");
            assert_eq!(fault.queue, TX_QUEUE);
            assert!(fault.to_string().contains("virtqueue 1 is broken"), "{fault}");
        }
        let after = handler.process(&mut link);
        assert!(after.reset && !after.active, "the backend learns of the reset");
        assert!(link.1.is_empty(), "frames for a reset driver are dropped");
    }
}
