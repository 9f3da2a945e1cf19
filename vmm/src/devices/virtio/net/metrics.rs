//! Counters of the virtio-net device, bumped at every frame moved and at
//! every drop and failure point; readable from any thread while the device
//! runs (`mqvisor run --stats` prints them).

use std::sync::atomic::{AtomicU64, Ordering};

/// The device's counters.
#[derive(Debug, Default)]
pub struct NetMetrics {
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// TX chains refused: wrong direction, too long, too short, bad address.
    pub tx_malformed: AtomicU64,
    /// RX chains refused: wrong direction, bad address.
    pub rx_malformed: AtomicU64,
    /// Frames dropped because the guest's RX buffer was too small.
    pub rx_too_big: AtomicU64,
    /// Times the driver broke the ring protocol (device needs reset).
    pub ring_faults: AtomicU64,
}

impl NetMetrics {
    pub(super) fn bump(counter: &AtomicU64, by: u64) {
        counter.fetch_add(by, Ordering::Relaxed);
    }

    /// A counter's current value.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
