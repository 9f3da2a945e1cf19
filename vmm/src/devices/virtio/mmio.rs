//! The virtio-mmio transport, version 2 (virtio 1.2, section 4.2).
//!
//! Owns the register file a driver sees at the device's MMIO window: feature
//! negotiation, the status state machine, queue set-up and notification, and
//! the window onto the device's config space. Accesses arrive from the vCPU
//! thread as MMIO exits. Bad driver behaviour (wrong access sizes, writes in
//! the wrong state, features never offered, queues outside guest memory) is
//! refused or puts the device in NEEDS_RESET; it never panics.

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{VIRTIO_F_VERSION_1, VirtioDevice, status};
use crate::devices::StopReason;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x554d_4551; // "QEMU" is customary; any value works

/// Register offsets (spec 4.2.2).
pub(crate) mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Offset of the QueueNotify register, for KVM_IOEVENTFD.
pub const QUEUE_NOTIFY_OFFSET: u64 = reg::QUEUE_NOTIFY;

/// One virtio device and its transport registers.
pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    mem: GuestMemoryMmap,
    /// Signalled on a QueueNotify write, one per queue; the device's worker
    /// waits on them (KVM signals them directly when ioeventfds are set up).
    queue_events: Vec<EventFd>,
    queues: Vec<Queue>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    activated: bool,
    notifications: u64,
    /// Times the device refused the driver (NEEDS_RESET).
    refusals: u32,
}

/// How many times a driver may break its device before the VM is stopped.
pub const MAX_REFUSALS: u32 = 16;

impl<D: VirtioDevice> MmioTransport<D> {
    /// A transport in reset state for `device`.
    pub fn new(device: D, mem: GuestMemoryMmap) -> std::io::Result<Self> {
        let sizes = device.queue_max_sizes().to_vec();
        let queues = sizes
            .iter()
            .map(|&max| Queue::new(max).map_err(|e| std::io::Error::other(format!("queue size {max}: {e}"))))
            .collect::<Result<_, _>>()?;
        let queue_events =
            sizes.iter().map(|_| EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)).collect::<Result<_, _>>()?;
        Ok(MmioTransport {
            device,
            mem,
            queue_events,
            queues,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            activated: false,
            notifications: 0,
            refusals: 0,
        })
    }

    /// The device behind the transport.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device behind the transport.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// Counts notifications the worker drained from the queue eventfds.
    pub fn add_notifications(&mut self, count: u64) {
        self.notifications = self.notifications.saturating_add(count);
    }

    /// Queue notifications seen so far (each one an exit into the host kernel).
    pub fn notifications(&self) -> u64 {
        self.notifications
    }

    /// The eventfd signalled when the driver notifies queue `index`.
    pub fn queue_event(&self, index: usize) -> Option<&EventFd> {
        self.queue_events.get(index)
    }

    /// True once the driver has set DRIVER_OK and the device accepted its queues.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The device found the driver misbehaving: stop and ask for a reset.
    pub fn set_needs_reset(&mut self) {
        self.refuse();
        if self.activated {
            self.activated = false;
            self.device.reset();
        }
    }

    /// Puts the device in NEEDS_RESET and counts it.
    fn refuse(&mut self) {
        self.status |= status::DEVICE_NEEDS_RESET;
        self.refusals = self.refusals.saturating_add(1);
    }

    /// Why the VM should be stopped, once its driver has broken the device
    /// [`MAX_REFUSALS`] times: a real driver never does it once, and one that
    /// sets the device up and breaks it in a loop costs the host an exit
    /// for every register it writes, which its neighbours feel.
    pub fn broken(&self) -> Option<StopReason> {
        (self.refusals >= MAX_REFUSALS)
            .then(|| StopReason::DriverBroke { device_type: self.device.device_type(), refusals: self.refusals })
    }

    /// Current device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        // Writes to queue registers are only meaningful before DRIVER_OK.
        if self.status & status::DRIVER_OK != 0 {
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
        }
        self.activated = false;
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        for queue in &mut self.queues {
            queue.reset();
        }
    }

    /// Handles a driver read of `data.len()` bytes at `offset` in the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        // Registers below the config space are 32 bits wide (spec 4.2.2.2).
        let value = if data.len() == 4 {
            match offset {
                reg::MAGIC_VALUE => MAGIC_VALUE,
                reg::VERSION => VERSION,
                reg::DEVICE_ID => self.device.device_type(),
                reg::VENDOR_ID => VENDOR_ID,
                reg::DEVICE_FEATURES => match self.device_features_sel {
                    0 => low(self.device.offered_features()),
                    1 => high(self.device.offered_features()),
                    _ => 0,
                },
                reg::QUEUE_NUM_MAX => self.queues.get(self.queue_sel as usize).map_or(0, |q| u32::from(q.max_size())),
                reg::QUEUE_READY => self.queues.get(self.queue_sel as usize).map_or(0, |q| u32::from(q.ready())),
                // No interrupts: the guest polls.
                reg::INTERRUPT_STATUS => 0,
                reg::STATUS => self.status,
                reg::CONFIG_GENERATION => 0,
                _ => 0,
            }
        } else {
            0
        };
        let bytes = value.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    /// Handles a driver write of `data` at `offset` in the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            // No writable config fields are offered; ignore.
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return; // Wrong access width: ignored, as the spec allows.
        };
        let value = u32::from_le_bytes(bytes);
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            // Features are frozen once FEATURES_OK is set.
            reg::DRIVER_FEATURES if self.status & status::FEATURES_OK == 0 => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
                1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32),
                _ => {}
            },
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM => {
                if let (Some(queue), Ok(size)) = (self.selected_queue(), u16::try_from(value)) {
                    queue.set_size(size);
                }
            }
            reg::QUEUE_READY => {
                if let Some(queue) = self.selected_queue() {
                    queue.set_ready(value == 1);
                }
            }
            reg::QUEUE_DESC_LOW => self.selected_queue().map_or((), |q| q.set_desc_table_address(Some(value), None)),
            reg::QUEUE_DESC_HIGH => self.selected_queue().map_or((), |q| q.set_desc_table_address(None, Some(value))),
            reg::QUEUE_DRIVER_LOW => self.selected_queue().map_or((), |q| q.set_avail_ring_address(Some(value), None)),
            reg::QUEUE_DRIVER_HIGH => self.selected_queue().map_or((), |q| q.set_avail_ring_address(None, Some(value))),
            reg::QUEUE_DEVICE_LOW => self.selected_queue().map_or((), |q| q.set_used_ring_address(Some(value), None)),
            reg::QUEUE_DEVICE_HIGH => self.selected_queue().map_or((), |q| q.set_used_ring_address(None, Some(value))),
            reg::QUEUE_NOTIFY => {
                // Reached only when KVM could not take the write itself.
                if let Some(event) = self.queue_events.get(value as usize) {
                    let _ = event.write(1);
                }
            }
            reg::INTERRUPT_ACK => {}
            reg::STATUS => self.write_status(value),
            _ => {}
        }
    }

    /// The status state machine (spec 2.1, 3.1.1): 0 resets; otherwise a
    /// write may only add bits, in the order ACKNOWLEDGE, DRIVER, FEATURES_OK,
    /// DRIVER_OK (several at once is fine). FEATURES_OK is withheld when the
    /// driver asked for features never offered or is not a virtio 1.x driver;
    /// DRIVER_OK activates the device. Anything else is ignored.
    fn write_status(&mut self, value: u32) {
        const ORDER: [u32; 4] = [status::ACKNOWLEDGE, status::DRIVER, status::FEATURES_OK, status::DRIVER_OK];
        if value == 0 {
            self.reset();
            return;
        }
        if value & self.status != self.status {
            return; // Clearing bits other than by reset is not allowed.
        }
        if value & status::FAILED != 0 {
            self.status |= status::FAILED;
            return;
        }
        let known = ORDER.iter().fold(0, |acc, bit| acc | bit) | status::DEVICE_NEEDS_RESET;
        let in_order =
            ORDER.iter().enumerate().all(|(i, bit)| value & bit == 0 || ORDER[..i].iter().all(|b| value & b != 0));
        if value & !known != 0 || !in_order {
            return;
        }
        let added = value & !self.status;
        if added & status::FEATURES_OK != 0 {
            let offered = self.device.offered_features();
            if self.driver_features & !offered != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                // Leave FEATURES_OK clear: the driver reads status back and gives up.
                self.status |= value & (status::ACKNOWLEDGE | status::DRIVER);
                return;
            }
        }
        if added & status::DRIVER_OK != 0 {
            self.status = value & !status::DRIVER_OK;
            self.activate(value);
            return;
        }
        self.status = value;
    }

    fn activate(&mut self, value: u32) {
        let ready = self.queues.iter().all(|q| q.ready() && q.is_valid(&self.mem));
        if !ready {
            self.refuse();
            return;
        }
        let Some(queues) = self.queues.iter().map(clone_queue).collect::<Option<Vec<_>>>() else {
            self.refuse();
            return;
        };
        match self.device.activate(queues, self.driver_features, self.mem.clone()) {
            Ok(()) => {
                self.status = value;
                self.activated = true;
                // Let the worker look at the queues at once.
                for event in &self.queue_events {
                    let _ = event.write(1);
                }
            }
            Err(_) => self.refuse(),
        }
    }
}

/// A fresh `Queue` configured like `queue` (the transport keeps its copy so
/// that a reset can re-read the registers).
fn clone_queue(queue: &Queue) -> Option<Queue> {
    let mut copy = Queue::new(queue.max_size()).ok()?;
    copy.set_size(queue.size());
    copy.set_desc_table_address(Some(low(queue.desc_table())), Some(high(queue.desc_table())));
    copy.set_avail_ring_address(Some(low(queue.avail_ring())), Some(high(queue.avail_ring())));
    copy.set_used_ring_address(Some(low(queue.used_ring())), Some(high(queue.used_ring())));
    copy.set_ready(queue.ready());
    Some(copy)
}

fn low(value: u64) -> u32 {
    (value & 0xffff_ffff) as u32
}

fn high(value: u64) -> u32 {
    (value >> 32) as u32
}

#[cfg(test)]
mod tests {
    //! A driver that misbehaves, register by register.

    use super::*;
    use crate::devices::virtio::VIRTIO_F_RING_EVENT_IDX;
    use crate::devices::virtio::net::NetDevice;
    use vm_memory::GuestAddress;

    fn transport() -> MmioTransport<NetDevice> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        MmioTransport::new(NetDevice::new([2, 0, 0, 0, 0, 1], 2048), mem).unwrap()
    }

    fn write(t: &mut MmioTransport<NetDevice>, reg: u64, value: u32) {
        t.write(reg, &value.to_le_bytes());
    }

    fn driver_features(t: &mut MmioTransport<NetDevice>, features: u64) {
        write(t, reg::DRIVER_FEATURES_SEL, 0);
        write(t, reg::DRIVER_FEATURES, low(features));
        write(t, reg::DRIVER_FEATURES_SEL, 1);
        write(t, reg::DRIVER_FEATURES, high(features));
    }

    const AD: u32 = status::ACKNOWLEDGE | status::DRIVER;

    #[test]
    fn the_register_file_identifies_a_version_2_net_device() {
        let mut t = transport();
        let mut v = [0u8; 4];
        t.read(reg::MAGIC_VALUE, &mut v);
        assert_eq!(u32::from_le_bytes(v), MAGIC_VALUE);
        t.read(reg::VERSION, &mut v);
        assert_eq!(u32::from_le_bytes(v), 2);
        t.read(reg::DEVICE_ID, &mut v);
        assert_eq!(u32::from_le_bytes(v), 1);
    }

    #[test]
    fn features_never_offered_or_a_legacy_driver_withhold_features_ok() {
        for features in [VIRTIO_F_VERSION_1 | (1 << 0), VIRTIO_F_RING_EVENT_IDX] {
            let mut t = transport();
            write(&mut t, reg::STATUS, AD);
            driver_features(&mut t, features);
            write(&mut t, reg::STATUS, AD | status::FEATURES_OK);
            assert_eq!(t.status(), AD, "features {features:#x}");
        }
        let mut t = transport();
        write(&mut t, reg::STATUS, AD);
        driver_features(&mut t, VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX);
        write(&mut t, reg::STATUS, AD | status::FEATURES_OK);
        assert_eq!(t.status(), AD | status::FEATURES_OK);
    }

    #[test]
    fn status_bits_out_of_order_cleared_or_unknown_are_ignored() {
        let mut t = transport();
        write(&mut t, reg::STATUS, status::DRIVER); // DRIVER before ACKNOWLEDGE
        assert_eq!(t.status(), 0);
        write(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER_OK); // skips steps
        assert_eq!(t.status(), 0);
        write(&mut t, reg::STATUS, AD);
        write(&mut t, reg::STATUS, status::ACKNOWLEDGE); // clears DRIVER
        assert_eq!(t.status(), AD);
        write(&mut t, reg::STATUS, AD | 0x200); // unknown bit
        assert_eq!(t.status(), AD);
        // A 2-byte access to a 32-bit register is ignored.
        t.write(reg::STATUS, &[0, 0]);
        assert_eq!(t.status(), AD);
        write(&mut t, reg::STATUS, 0); // reset
        assert_eq!(t.status(), 0);
    }

    #[test]
    fn driver_ok_with_queues_not_set_up_needs_reset() {
        let mut t = transport();
        write(&mut t, reg::STATUS, AD);
        driver_features(&mut t, VIRTIO_F_VERSION_1);
        write(&mut t, reg::STATUS, AD | status::FEATURES_OK);
        write(&mut t, reg::STATUS, AD | status::FEATURES_OK | status::DRIVER_OK);
        assert!(!t.is_activated());
        assert_eq!(t.status() & status::DEVICE_NEEDS_RESET, status::DEVICE_NEEDS_RESET);
        assert_eq!(t.status() & status::DRIVER_OK, 0);
    }

    #[test]
    fn a_driver_that_breaks_the_device_again_and_again_is_given_up_on() {
        let mut t = transport();
        for attempt in 1..=MAX_REFUSALS {
            assert!(t.broken().is_none(), "given up after {} refusals", attempt - 1);
            write(&mut t, reg::STATUS, 0);
            write(&mut t, reg::STATUS, AD);
            driver_features(&mut t, VIRTIO_F_VERSION_1);
            write(&mut t, reg::STATUS, AD | status::FEATURES_OK);
            write(&mut t, reg::STATUS, AD | status::FEATURES_OK | status::DRIVER_OK);
        }
        let reason = t.broken().expect("given up");
        assert_eq!(reason, StopReason::DriverBroke { device_type: 1, refusals: MAX_REFUSALS });
        assert!(reason.to_string().contains("broke its virtio device (type 1) 16 times"), "{reason}");
    }
}
