//! The worker side of virtio-blk: each visit serves every request the
//! guest made available and re-arms notifications until none slipped in,
//! all under one lock of the transport; a broken ring puts the device in
//! NEEDS_RESET.
//!
//! Owns what one queue notification leads to. Never blocks but on the
//! file I/O of the requests it serves (`fdatasync` for a FLUSH); the
//! worker thread ([`super::worker`]) owns waiting, the notification storm
//! check and waking the guest.

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::BlockDevice;
use crate::devices::virtio::mmio::MmioTransport;

/// Drives one virtio-blk device.
pub struct BlockEventHandler {
    transport: Arc<Mutex<MmioTransport<BlockDevice>>>,
}

impl BlockEventHandler {
    pub fn new(transport: Arc<Mutex<MmioTransport<BlockDevice>>>) -> Self {
        BlockEventHandler { transport }
    }

    /// The eventfd KVM signals on a QueueNotify write, for the worker to
    /// wait on.
    pub fn queue_event(&self) -> std::io::Result<EventFd> {
        let transport = self.transport.lock().map_err(|_| std::io::Error::other("device lock poisoned"))?;
        transport.queue_event(0).ok_or_else(|| std::io::Error::other("no queue event"))?.try_clone()
    }

    /// One visit after `notifications` queue notifications: returns how
    /// many requests were served, or `None` once the device's lock is
    /// poisoned (another thread panicked holding it).
    pub fn visit(&self, notifications: u64) -> Option<usize> {
        let mut transport = self.transport.lock().ok()?;
        transport.add_notifications(notifications);
        Some(serve_all(&mut transport))
    }

    /// Makes the next chunk past the guest's last write ready; true if
    /// there was one (`BlockDevice::prepare_ahead`), `None` once the lock is
    /// poisoned.
    pub fn prepare_ahead(&self) -> Option<bool> {
        Some(self.transport.lock().ok()?.device_mut().prepare_ahead())
    }
}

/// Serves every request available, re-arming notifications until none
/// slipped in; a broken ring puts the device in NEEDS_RESET. Returns how
/// many were served.
fn serve_all(t: &mut MmioTransport<BlockDevice>) -> usize {
    let mut served = 0;
    let device = t.device_mut();
    let fault = loop {
        match device.process_queue() {
            // Requests may slip in while notifications were off.
            Ok(0) => match device.enable_notification() {
                Ok(true) => {}
                Ok(false) => return served,
                Err(fault) => break fault,
            },
            Ok(n) => served += n,
            Err(fault) => break fault,
        }
    };
    eprintln!("mqvisor: virtio-blk: {fault}; the device needs a reset");
    t.set_needs_reset();
    served
}
