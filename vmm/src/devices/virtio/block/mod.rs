//! virtio-blk (virtio 1.2, section 5.2) over one host file, in the net
//! device's shape: [`device`] is the device model (request validation and
//! the file I/O it maps to), [`ahead`] the blocks it makes ready past the
//! log's writes, [`metrics`] its counters, [`event_handler`]
//! what one queue notification leads to under one lock, and [`worker`] the
//! thread that runs it, so host I/O never happens on the vCPU thread.
//!
//! Here live what the parts share: the spec's constants. Nothing in this
//! folder trusts the guest: every request is checked for direction, length
//! and sector range before the file is touched.

pub mod ahead;
pub mod device;
pub mod event_handler;
pub mod metrics;
pub mod worker;

pub use device::{BlockDevice, Standby};
pub use event_handler::BlockEventHandler;
pub use metrics::BlockMetrics;
pub use worker::BlockThread;

/// virtio device ID of a block device.
pub const DEVICE_ID: u32 = 2;
/// Feature bit: the device honours FLUSH (5.2.3).
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
/// Sector size the protocol counts in.
pub const SECTOR_SIZE: u64 = 512;
/// Descriptors in the one request queue.
pub const QUEUE_SIZE: u16 = 128;
/// Largest transfer one request may ask for; the guest's log writes less.
pub const MAX_TRANSFER: usize = 4 << 20;
