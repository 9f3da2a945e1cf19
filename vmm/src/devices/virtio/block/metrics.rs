//! Counters of the virtio-blk device, bumped at every request served and
//! at every refusal and failure point; readable from any thread while the
//! device runs (`mqvisor run --stats` prints them).

use std::sync::atomic::{AtomicU64, Ordering};

/// The device's counters.
#[derive(Debug, Default)]
pub struct BlockMetrics {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    /// Requests refused for breaking the protocol (direction, length, range, loops).
    pub malformed: AtomicU64,
    /// Requests the host file failed (full disk, file-size limit, I/O error).
    pub io_errors: AtomicU64,
    /// Times the driver broke the ring protocol (device needs reset).
    pub ring_faults: AtomicU64,
    /// 1 while every write reaches a standby whose copy is whole, else 0.
    pub standby_whole: AtomicU64,
    /// Writes made durable on the standby too.
    pub standby_writes: AtomicU64,
    /// Times the connection to a standby failed.
    pub standby_losses: AtomicU64,
}

impl BlockMetrics {
    /// A counter's current value.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub(super) fn set(counter: &AtomicU64, value: u64) {
        counter.store(value, Ordering::Relaxed);
    }

    pub(super) fn bump(counter: &AtomicU64, by: u64) {
        counter.fetch_add(by, Ordering::Relaxed);
    }
}
