//! virtio devices (virtio 1.2): the MMIO transport and the devices behind it.
//!
//! The transport ([`mmio`]) owns the register file and the status state
//! machine; a device ([`net`], [`block`]) owns its queues once the driver
//! activates it, and [`storm`] tells a driver that notifies in a loop from
//! one that works.
//! Nothing here trusts the guest: queue addresses are checked against guest
//! memory before activation and every descriptor chain is validated before
//! its buffers are touched.

pub mod block;
pub mod mmio;
pub mod net;
pub mod storm;

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

/// The driver broke the virtqueue protocol (for example an avail index that
/// runs past the ring); the device must be reset.
#[derive(Debug, thiserror::Error)]
#[error("virtqueue {queue} is broken: {error}")]
pub struct RingFault {
    pub queue: usize,
    #[source]
    pub error: virtio_queue::Error,
}

/// Answers a read of a device's config space (`config`) at `offset`;
/// bytes past its end read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|at| config.get(at))
            .copied()
            .unwrap_or(0);
    }
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

/// Descriptors for the device models' unit tests.
#[cfg(test)]
pub(crate) mod test_descriptors {
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;

    /// Flag: the chain goes on at `next`.
    pub const NEXT: u16 = 1;
    /// Flag: the device writes this buffer.
    pub const WRITE: u16 = 2;

    pub fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }
}
