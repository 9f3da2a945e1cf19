//! virtio-net (virtio 1.2, section 5.1), in Firecracker's device shape:
//! [`device`] is the device model (queues, descriptor validation, config
//! space), [`metrics`] its counters, [`event_handler`] the worker side that
//! moves frames between the device and a [`NetBackend`] under one lock.
//!
//! Here live what the parts share: the spec's constants. Nothing in this
//! folder trusts the guest.

pub mod device;
pub mod event_handler;
pub mod metrics;

pub use device::NetDevice;
pub use event_handler::{NetBackend, NetEventHandler, Progress};
pub use metrics::NetMetrics;

/// virtio device ID of a network card.
pub const DEVICE_ID: u32 = 1;
/// Feature bit: the device has a MAC address in config space (5.1.3).
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// Size of `virtio_net_hdr` with VIRTIO_F_VERSION_1 (5.1.6).
pub const NET_HDR_LEN: usize = 12;
/// Queue indices.
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
/// Descriptors per queue.
pub const QUEUE_SIZE: u16 = 256;
/// Ethernet header length.
const ETH_HDR_LEN: usize = 14;

pub use crate::devices::virtio::RingFault;
