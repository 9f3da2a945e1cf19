//! Devices the VMM emulates for the guest, and the MMIO bus that routes the
//! vCPU's MMIO exits to them. Only virtio over MMIO for now.
//!
//! Also owns why a device gives up on its guest ([`StopReason`]) and where
//! its thread says so ([`GiveUp`]), which the vCPU's supervisor reads.

pub mod virtio;

use std::sync::{Arc, Mutex};

use virtio::VirtioDevice;
use virtio::mmio::MmioTransport;

/// Something that answers MMIO accesses inside its window.
pub trait MmioDevice: Send {
    /// A read of `data.len()` bytes at `offset` in the window.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A write of `data` at `offset` in the window.
    fn write(&mut self, offset: u64, data: &[u8]);
    /// Why the VM must stop, once the device has given up on its guest.
    fn broken(&self) -> Option<StopReason> {
        None
    }
}

/// Why a device gave up on its guest: the VM is stopped, as crashed, with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StopReason {
    /// The driver broke its device (NEEDS_RESET) this many times; see
    /// `MmioTransport::broken`.
    #[error("the guest broke its virtio device (type {device_type}) {refusals} times; stopping it")]
    DriverBroke { device_type: u32, refusals: u32 },
    /// The driver notified a queue far more often than there was work, for
    /// a whole second; see `virtio::storm`.
    #[error(
        "the guest notified its {device} device {notifications} times in under a second with {done} {work} to \
         move; stopping it"
    )]
    NotifyStorm {
        /// The device ("network", "block").
        device: &'static str,
        notifications: u64,
        /// Units of work done meanwhile, and what one is called ("frames").
        done: u64,
        work: &'static str,
    },
    /// The fence deadline of a tenant's process in a fleet passed (see
    /// `net::fence`): its node may have lost the tenant.
    #[error(
        "fenced: this node's lease was not renewed in time, so another node may own the tenant now; no client is \
         served past the deadline"
    )]
    Fenced,
}

/// Where a VM's device threads say why the VM must stop: the first reason
/// given stands, and the vCPU's supervisor stops the VM with it.
#[derive(Debug, Clone, Default)]
pub struct GiveUp(Arc<Mutex<Option<StopReason>>>);

impl GiveUp {
    /// Asks for the VM to stop for `reason`, unless a reason was given first.
    pub fn give_up(&self, reason: StopReason) {
        if let Ok(mut given) = self.0.lock() {
            given.get_or_insert(reason);
        }
        crate::vcpu::ring_supervisor();
    }

    /// The reason given, if any.
    pub fn reason(&self) -> Option<StopReason> {
        self.0.lock().ok().and_then(|given| *given)
    }
}

/// Why the bus refused a guest's write: the VM stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// No device covers the whole access.
    #[error("guest wrote unmapped guest-physical address {addr:#x}")]
    Unmapped { addr: u64 },
    /// The device written gave up on the guest.
    #[error(transparent)]
    Device(#[from] StopReason),
}

impl<D: VirtioDevice> MmioDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        MmioTransport::read(self, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        MmioTransport::write(self, offset, data);
    }

    fn broken(&self) -> Option<StopReason> {
        MmioTransport::broken(self)
    }
}

type SharedDevice = Arc<Mutex<dyn MmioDevice>>;

/// Device windows by guest-physical address.
#[derive(Default, Clone)]
pub struct MmioBus {
    windows: Vec<(u64, u64, SharedDevice)>,
}

impl MmioBus {
    /// Adds `device` at `[base, base + size)`.
    pub fn insert(&mut self, base: u64, size: u64, device: Arc<Mutex<dyn MmioDevice>>) {
        self.windows.push((base, size, device));
    }

    fn find(&self, addr: u64, len: usize) -> Option<(u64, &Arc<Mutex<dyn MmioDevice>>)> {
        self.windows.iter().find_map(|(base, size, device)| {
            let offset = addr.checked_sub(*base)?;
            (offset.checked_add(len as u64)? <= *size).then_some((offset, device))
        })
    }

    /// Routes a read; false if no device covers the whole access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some((offset, device)) = self.find(addr, data.len()) else { return false };
        // A poisoned lock means another thread panicked: treat as no device.
        device.lock().map(|mut d| d.read(offset, data)).is_ok()
    }

    /// Routes a write; `Err` with the reason the VM must stop when no
    /// device covers the whole access, or when its device gave up on the
    /// guest (see `MmioTransport::broken`).
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), BusError> {
        let unmapped = BusError::Unmapped { addr };
        let Some((offset, device)) = self.find(addr, data.len()) else { return Err(unmapped) };
        let mut device = device.lock().map_err(|_| unmapped)?;
        device.write(offset, data);
        device.broken().map_or(Ok(()), |reason| Err(BusError::Device(reason)))
    }
}
