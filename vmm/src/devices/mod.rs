//! Devices the VMM emulates for the guest, and the MMIO bus that routes the
//! vCPU's MMIO exits to them. Only virtio over MMIO for now.

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
    fn broken(&self) -> Option<String> {
        None
    }
}

impl<D: VirtioDevice> MmioDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        MmioTransport::read(self, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        MmioTransport::write(self, offset, data);
    }

    fn broken(&self) -> Option<String> {
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
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), String> {
        let unmapped = || format!("guest wrote unmapped guest-physical address {addr:#x}");
        let Some((offset, device)) = self.find(addr, data.len()) else { return Err(unmapped()) };
        let mut device = device.lock().map_err(|_| unmapped())?;
        device.write(offset, data);
        device.broken().map_or(Ok(()), Err)
    }
}
