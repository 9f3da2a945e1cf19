//! The broker's state on the VMM's virtio-blk disk: recovery at boot, group
//! commits while serving, compaction, and what happens when the disk fails.
//!
//! Owns the block driver and the log (`mqvisor_broker::store::log`). The
//! MQTT loop asks [`Store::commit`] to make the broker's new records durable
//! before it lets the broker's output go (with `sync` persistence), or at
//! most every interval (`batch`). A failing disk never stops the VM: the
//! broker is told to refuse what would need the disk, and every second a
//! compaction tries to write the whole state afresh.

use alloc::vec::Vec;
use core::mem::ManuallyDrop;
use core::ptr::NonNull;

use mqvisor_boot_abi::{BootInfo, device_kind, persistence};
use mqvisor_broker::broker::Broker;
use mqvisor_broker::store::log::{Disk, IoError, Log, LogError, SECTOR};
use virtio_drivers::device::blk::VirtIOBlk;
use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};

use crate::net::hal::GuestHal;
use crate::{clock, paravirt};

/// Exit code when the state cannot be read back (corrupt, foreign, unreadable).
pub const EXIT_BAD_STATE: u32 = 5;
/// Largest request handed to the device (its limit is 4 MiB).
const MAX_REQUEST: usize = 1 << 20;
/// Sectors in one such request.
const REQUEST_SECTORS: usize = MAX_REQUEST / 512;
/// How often a failed store tries to recover by compacting.
const RETRY_MS: u64 = 1000;

/// The virtio-blk device as the log's [`Disk`]. Requests are synchronous:
/// the driver spins on the used ring while the VMM's block thread works,
/// which costs no exits.
struct BlockDisk {
    /// Never dropped: the driver's drop asks the device to unset its queue
    /// and spins until it has, which a device without queue reset never
    /// does. The disk lives as long as the VM.
    driver: ManuallyDrop<VirtIOBlk<GuestHal, MmioTransport<'static>>>,
    sectors: u64,
}

impl Disk for BlockDisk {
    fn sectors(&self) -> u64 {
        self.sectors
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        for (i, chunk) in buf.chunks_mut(MAX_REQUEST).enumerate() {
            let block = usize::try_from(offset / SECTOR).map_err(|_| IoError)? + i * REQUEST_SECTORS;
            self.driver.read_blocks(block, chunk).map_err(|_| IoError)?;
        }
        Ok(())
    }

    fn write(&mut self, offset: u64, buf: &[u8]) -> Result<(), IoError> {
        for (i, chunk) in buf.chunks(MAX_REQUEST).enumerate() {
            let block = usize::try_from(offset / SECTOR).map_err(|_| IoError)? + i * REQUEST_SECTORS;
            self.driver.write_blocks(block, chunk).map_err(|_| IoError)?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), IoError> {
        self.driver.flush().map_err(|_| IoError)
    }
}

/// Durable state for the broker.
pub struct Store {
    log: Log<BlockDisk>,
    sync: bool,
    batch_ms: u64,
    last_commit: u64,
    /// Set while the disk fails; then the next try is at `retry_at`.
    failed: bool,
    retry_at: u64,
    /// Commits (flushes) done, for the line at compaction.
    commits: u64,
    body: Vec<u8>,
}

fn open_disk(info: &BootInfo) -> Result<Option<BlockDisk>, &'static str> {
    let Some(desc) = info.devices().iter().find(|d| d.kind == device_kind::VIRTIO_BLK) else { return Ok(None) };
    let header = NonNull::new(desc.base as *mut VirtIOHeader).ok_or("virtio-blk device at address 0")?;
    let size = usize::try_from(desc.size).map_err(|_| "virtio-blk window too large")?;
    // SAFETY: the VMM maps a virtio-mmio register window of `size` bytes at
    // `base` (boot-info device list) for the VM's whole life; nothing else
    // in the guest accesses it.
    let transport =
        unsafe { MmioTransport::new(header, size) }.map_err(|_| "virtio-blk window is not a virtio-mmio device")?;
    let driver = VirtIOBlk::new(transport).map_err(|_| "virtio-blk device refused initialisation")?;
    let sectors = driver.capacity();
    Ok(Some(BlockDisk { driver: ManuallyDrop::new(driver), sectors }))
}

impl Store {
    /// Heap the store may need at once: a batch being built (at most 1 MiB,
    /// `log::MAX_BATCH`), the record being encoded, and slack.
    pub const HEAP_RESERVE: u64 = 2 << 20;

    /// Reads the state back into `broker` and starts its journal; `None`
    /// when the VM has no state disk. A state that cannot be read ends the
    /// VM with one line naming what and where.
    pub fn open(info: &BootInfo, broker: &mut Broker, now: u64) -> Option<Store> {
        if info.persistence == persistence::OFF {
            return None;
        }
        let disk = match open_disk(info) {
            Ok(disk) => disk?,
            Err(why) => paravirt::exit(EXIT_BAD_STATE, why.as_bytes()),
        };
        let started = clock::now();
        let opened = Log::open(disk, &info.entropy, |body| broker.restore(body, now));
        let (mut log, found) = match opened {
            Ok(opened) => opened,
            Err(e) => {
                let why = alloc::format!("state: {e}");
                paravirt::exit(EXIT_BAD_STATE, why.as_bytes())
            }
        };
        broker.finish_restore(now);
        broker.enable_journal();
        let (sessions, retained) = broker.durable_counts();
        let took_us = clock::now().ns_since(started) / 1000;
        if found.fresh {
            crate::println!("state: a new state disk of {} MiB", (log.disk().sectors * SECTOR) >> 20);
        } else {
            crate::println!(
                "state: recovered {} records ({} KiB) in {} ms: {} sessions, {} retained messages{}",
                found.records,
                found.bytes >> 10,
                took_us / 1000,
                sessions,
                retained,
                if found.torn_tail { "; a torn last batch (never acknowledged) was dropped" } else { "" }
            );
        }
        Some(Store {
            log,
            sync: info.persistence == persistence::SYNC,
            batch_ms: u64::from(info.persistence_batch_ms.max(1)),
            last_commit: now,
            failed: false,
            retry_at: 0,
            commits: 0,
            body: Vec::new(),
        })
    }

    /// Makes the broker's new records durable when the mode says so: with
    /// `sync` before any output that depends on them (call before letting
    /// the broker's output go), with `batch` once the interval has passed.
    /// Returns true if it wrote.
    pub fn commit(&mut self, broker: &mut Broker, now: u64) -> bool {
        if self.failed {
            // The retry writes the whole state, so the journal is not kept.
            drop(broker.take_journal());
            if now >= self.retry_at {
                self.compact(broker, now);
            }
            return false;
        }
        if !broker.journal_pending() && !self.log.has_pending() {
            return false;
        }
        let mut urgent = false;
        for record in broker.take_journal() {
            urgent |= record.gates_output();
            self.body.clear();
            record.encode(&mut self.body);
            if let Err(e) = self.log.push(&self.body) {
                return self.recover(broker, now, &e);
            }
        }
        // Records nothing waits for (a delivery's end) ride with the next
        // commit, or go at the interval: half the flushes of a QoS 1 stream.
        let due = (self.sync && urgent) || now >= self.last_commit + self.batch_ms;
        if !due {
            return false;
        }
        self.last_commit = now;
        match self.log.commit() {
            Ok(()) => {
                self.commits += 1;
                if self.log.wants_compaction() {
                    self.compact(broker, now);
                }
                true
            }
            Err(e) => self.recover(broker, now, &e),
        }
    }

    /// When [`Store::commit`] wants to run next without new records (the
    /// batch interval, or a retry after a failure).
    pub fn next_deadline(&self, broker: &Broker) -> Option<u64> {
        if self.failed {
            Some(self.retry_at)
        } else if broker.journal_pending() || self.log.has_pending() {
            Some(self.last_commit + self.batch_ms)
        } else {
            None
        }
    }

    /// A failed push or commit: the records pushed since the last commit
    /// may not be on disk. A compaction writes the whole state instead;
    /// if that fails too, the broker refuses what needs the disk, and with
    /// `sync` the acknowledgements waiting for those records are withdrawn.
    fn recover(&mut self, broker: &mut Broker, now: u64, error: &LogError) -> bool {
        crate::println!("state: writing the log failed ({error}); compacting to recover");
        let recovered = self.compact(broker, now);
        if !recovered && self.sync {
            let ended = broker.withdraw_output(now);
            crate::println!("state: {ended} clients with acknowledgements not on disk were disconnected");
        }
        recovered
    }

    fn compact(&mut self, broker: &mut Broker, now: u64) -> bool {
        // The journal's changes are in the broker's state, so in the snapshot.
        drop(broker.take_journal());
        let before = self.log.len();
        let body = &mut self.body;
        let result = self.log.compact(|push| {
            broker.snapshot(&mut |record| {
                body.clear();
                record.encode(body);
                push(body)
            })
        });
        match result {
            Ok(()) => {
                if self.failed {
                    crate::println!("state: the state disk works again; publishes are accepted");
                } else {
                    crate::println!(
                        "state: compacted the log from {} KiB to {} KiB after {} commits",
                        before >> 10,
                        self.log.len() >> 10,
                        self.commits
                    );
                }
                self.failed = false;
                broker.set_store_failed(false);
                true
            }
            Err(e) => {
                if !self.failed {
                    crate::println!(
                        "state: the state disk is failing ({e}); refusing publishes that need it, serving the rest"
                    );
                }
                self.failed = true;
                self.retry_at = now + RETRY_MS;
                broker.set_store_failed(true);
                false
            }
        }
    }
}
