//! virtio devices (virtio 1.2): the MMIO transport and the devices behind it.
//!
//! The transport ([`mmio`]) owns the register file and the status state
//! machine; a device ([`net`]) owns its queues once the driver activates it.
//! Nothing here trusts the guest: queue addresses are checked against guest
//! memory before activation and every descriptor chain is validated before
//! its buffers are touched.

pub mod block;
pub mod mmio;
pub mod net;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

/// Feature bit: the device complies with virtio 1.0+ (spec 6).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Feature bit: `used_event` / `avail_event` notification suppression (2.7.10).
pub const VIRTIO_F_RING_EVENT_IDX: u64 = 1 << 29;

/// Device status bits (spec 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;
}

/// Why a device refused to activate.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ActivateError {
    #[error("the driver set up {got} queues, the device needs {want}")]
    QueueCount { got: usize, want: usize },
    #[error("queue {0} is not ready or does not fit in guest memory")]
    BadQueue(usize),
}

/// A device behind the MMIO transport.
pub trait VirtioDevice: Send {
    /// The virtio device ID (spec 5).
    fn device_type(&self) -> u32;
    /// Features the device offers.
    fn offered_features(&self) -> u64;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads device-specific configuration; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Takes the queues the driver set up, with the negotiated features.
    fn activate(&mut self, queues: Vec<Queue>, features: u64, mem: GuestMemoryMmap) -> Result<(), ActivateError>;
    /// Drops the queues: the driver reset the device.
    fn reset(&mut self);
}
