//! The state log on a block device: where records go, how a crash is
//! survived, and how the log is kept bounded. Sans-I/O over [`Disk`], so
//! the guest drives it with virtio-blk and the host checks a file with it.
//!
//! Layout (version [`FORMAT_VERSION`], described with the argument for it in
//! docs/state-format.md):
//! - sectors 0 and 1: two superblock slots; the valid one with the higher
//!   generation names the active region, its log's id, the file's geometry
//!   and the file's secret tag key. Generation `g` lives in slot `g % 2`,
//!   so writing a new one never overwrites the current one.
//! - from [`DATA_START`]: two equal regions. The active one holds the log
//!   as batches, each starting on a sector: a 64-byte header, then record
//!   pieces (u32 length with a "continues" bit, then bytes), zero-padded.
//!
//! Client bytes end up inside batches, and regions are reused, so the log
//! is full of bytes a client chose. None of them can become structure: a
//! batch counts only if its header carries a tag (SipHash-2-4 under the
//! file's key, which never leaves the file and the guest) over its header
//! and payload, names the active log's random id and the next sequence
//! number, and carries the tag of the batch before it. Recovery follows
//! that chain from the superblock and stops at the first batch that does
//! not extend it.
//!
//! A batch is one group commit (or one full piece of a larger one):
//! written, then flushed, before the next is written, so only the last
//! batch can be torn, and a torn batch applies nothing. If no genuine
//! later batch of the same log exists within one batch's reach of where
//! the chain stops, that was the torn tail and the log ends there;
//! otherwise the log is corrupt in the middle, which is an error naming
//! the offset.
//!
//! Compaction writes a snapshot of the live state into the other region
//! under the next generation and a fresh log id, flushes it, then writes
//! and flushes the new superblock: a crash at any point leaves one complete
//! generation.
//!
//! Never trusts what it reads: every length is bounded before it is used,
//! and nothing read is applied before its tag is checked.

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

mod format;
#[cfg(test)]
mod tests;

pub use format::crc32c;
use format::{BatchHeader, Slot, Superblock, le32, tag};

/// Sector size of the device.
pub const SECTOR: u64 = SECTOR_BYTES as u64;
const SECTOR_BYTES: usize = 512;
/// On-disk format version in the superblock.
pub const FORMAT_VERSION: u32 = 2;
/// Where the regions start: the superblocks, then room to grow the header.
pub const DATA_START: u64 = 1 << 20;
/// Largest batch payload: one group commit, or one piece of a larger one.
pub const MAX_BATCH: usize = 1 << 20;
/// Largest record: a message at the largest packet MQTT can express
/// (268,435,460 bytes) with room for the record's own fields (a client id
/// of up to 64 KiB, numbers, properties the broker adds). A record larger
/// than a batch is written in pieces over consecutive batches.
pub const MAX_RECORD: usize = crate::broker::MAX_PACKET_SIZE_LIMIT + (1 << 20);
/// The smallest device the log accepts.
pub const MIN_SECTORS: u64 = (4 << 20) / SECTOR;
/// Random bytes [`Log::open`] needs: a new file's key, and the seed of the
/// log ids this run gives the logs it starts.
pub const ENTROPY_BYTES: usize = 32;

const SUPER_MAGIC: &[u8; 8] = b"MQVSTATE";
const SUPER_USED: usize = 64;
const BATCH_MAGIC: u32 = 0x4d51_5642; // "MQVB"
const BATCH_HEADER: usize = 64;
/// Bytes of a batch header its tag covers.
const HEADER_TAGGED: usize = 56;
/// A record piece's u32: its length, and whether the record continues in
/// the next batch.
const PIECE_HEADER: usize = 4;
const PIECE_CONTINUES: u32 = 1 << 31;
/// Batch flag: the first piece continues the previous batch's last record.
const CONTINUES_RECORD: u32 = 1;
/// Domain separation of the two tags a batch carries.
const PAYLOAD_DOMAIN: u8 = 1;
const HEADER_DOMAIN: u8 = 2;
/// A region's log is compacted once it is this large and at least
/// [`COMPACT_RATIO`] times the last snapshot.
const COMPACT_FLOOR: u64 = 4 << 20;
const COMPACT_RATIO: u64 = 4;
/// Bytes read at a time when looking past a bad batch.
const SCAN_CHUNK: usize = 64 << 10;

/// A block device, in bytes at sector-aligned offsets.
pub trait Disk {
    /// Capacity in sectors.
    fn sectors(&self) -> u64;
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), IoError>;
    fn write(&mut self, offset: u64, buf: &[u8]) -> Result<(), IoError>;
    /// Makes every completed write durable.
    fn flush(&mut self) -> Result<(), IoError>;
}

/// The device failed a request (full disk, file-size limit, I/O error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoError;

/// Why the state cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogError {
    /// The device failed.
    Io,
    /// The device is smaller than [`MIN_SECTORS`].
    TooSmall(u64),
    /// The first sector is neither a state superblock nor empty.
    NotAStateFile,
    /// A format version this build does not read.
    Version(u32),
    /// The device is not the size the state was laid out for (bytes).
    Resized { laid_out: u64, now: u64 },
    /// A batch or record in the middle of the log, or the current
    /// superblock, is damaged.
    Corrupt { offset: u64, why: &'static str },
    /// A record in a valid batch does not decode.
    BadRecord { offset: u64 },
    /// The live state does not fit in a region.
    Full,
}

impl fmt::Display for LogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LogError::Io => write!(f, "the state disk failed a request"),
            LogError::TooSmall(sectors) => {
                write!(f, "the state disk has {} KiB; at least {} KiB are needed", sectors / 2, MIN_SECTORS / 2)
            }
            LogError::NotAStateFile => write!(f, "the state file does not start with a state superblock"),
            LogError::Version(1) => write!(
                f,
                "state format 1 (its batches can be forged by client payloads); this build reads format \
                 {FORMAT_VERSION} only: start from an empty state file"
            ),
            LogError::Version(v) => write!(f, "state format {v}; this build reads format {FORMAT_VERSION}"),
            LogError::Resized { laid_out, now } => write!(
                f,
                "the state file is {now} bytes but its log was laid out for {laid_out} bytes (was it resized?); \
                 restore its size with: truncate -s {laid_out} PATH"
            ),
            LogError::Corrupt { offset, why } => write!(f, "the state log is corrupt at byte {offset}: {why}"),
            LogError::BadRecord { offset } => {
                write!(f, "a record at byte {offset} has a valid tag but does not decode")
            }
            LogError::Full => write!(f, "the live state does not fit in the state file"),
        }
    }
}

impl From<IoError> for LogError {
    fn from(_: IoError) -> Self {
        LogError::Io
    }
}

/// What recovery found where it expected the next batch.
enum Batch {
    /// Genuine, next in the chain, whole: its pieces are `payload[pieces]`.
    Valid { pieces: core::ops::Range<usize>, continues_record: bool, padded: u64, tag: u64 },
    /// Genuine and next in the chain, but damaged (or torn).
    Bad(&'static str),
    /// Nothing that extends the chain.
    Missing,
}

/// The log on a disk: appends group commits, compacts, recovers.
pub struct Log<D: Disk> {
    disk: D,
    key: [u8; 16],
    /// Seeds the ids of logs this run starts (one per compaction).
    id_seed: [u8; 16],
    ids_made: u64,
    sectors: u64,
    region_size: u64,
    generation: u64,
    region: u32,
    log_id: u64,
    /// Where the next batch goes, relative to the region's start.
    end: u64,
    next_seq: u64,
    /// The header tag of the last batch in the log (0 before the first).
    prev_tag: u64,
    snapshot_bytes: u64,
    /// The batch being filled (header room first).
    batch: Vec<u8>,
    batch_pieces: u32,
    /// The batch being filled begins with the rest of the last batch's
    /// last record.
    batch_continues: bool,
    /// A write failed, or records were dropped unwritten: what is on disk
    /// may end inside a record, so nothing may follow it in this log. Only
    /// a compaction (a new log) goes on.
    broken: bool,
}

/// What [`Log::open`] found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recovered {
    pub records: u64,
    pub bytes: u64,
    /// A torn last batch (or the start of a record whose end never
    /// reached the disk) was dropped.
    pub torn_tail: bool,
    /// The disk had no state yet.
    pub fresh: bool,
}

impl<D: Disk> Log<D> {
    /// Opens the log on `disk`, passing every record body to `apply` in
    /// order. A fresh (all-zero) disk gets a superblock, with a key taken
    /// from `entropy` (which must be fresh randomness: it also seeds the
    /// ids of the logs this run starts).
    pub fn open(
        mut disk: D,
        entropy: &[u8; ENTROPY_BYTES],
        mut apply: impl FnMut(&[u8]) -> bool,
    ) -> Result<(Log<D>, Recovered), LogError> {
        let sectors = disk.sectors();
        if sectors < MIN_SECTORS {
            return Err(LogError::TooSmall(sectors));
        }
        let mut head = vec![0u8; 2 * SECTOR_BYTES];
        disk.read(0, &mut head)?;
        let slots = [Superblock::decode(&head[..SECTOR_BYTES])?, Superblock::decode(&head[SECTOR_BYTES..])?];
        let current = slots
            .iter()
            .filter_map(|slot| match slot {
                Slot::Valid(s) => Some(*s),
                _ => None,
            })
            .max_by_key(|s| s.generation);
        let mut log = Log {
            disk,
            key: [0; 16],
            id_seed: [0; 16],
            ids_made: 0,
            sectors,
            region_size: Self::region_size_for(sectors),
            generation: 0,
            region: 0,
            log_id: 0,
            end: 0,
            next_seq: 0,
            prev_tag: 0,
            snapshot_bytes: 0,
            batch: Vec::new(),
            batch_pieces: 0,
            batch_continues: false,
            broken: false,
        };
        log.id_seed.copy_from_slice(&entropy[16..]);
        let Some(current) = current else {
            if head.iter().any(|&b| b != 0) {
                return Err(LogError::NotAStateFile);
            }
            log.key.copy_from_slice(&entropy[..16]);
            log.log_id = log.new_log_id();
            // Both slots, so that from now on a slot that is not a valid
            // superblock is damage (a zeroed sector included), never "unused".
            log.write_superblock_to(1)?;
            log.write_superblock()?;
            return Ok((log, Recovered { fresh: true, ..Recovered::default() }));
        };
        if current.sectors != sectors {
            return Err(LogError::Resized { laid_out: current.sectors * SECTOR, now: sectors * SECTOR });
        }
        if current.region > 1 {
            let offset = (current.generation % 2) * SECTOR;
            return Err(LogError::Corrupt { offset, why: "the superblock names a region that does not exist" });
        }
        log.key = current.key;
        log.generation = current.generation;
        log.region = current.region;
        log.log_id = current.log_id;
        log.snapshot_bytes = current.snapshot_bytes;
        // The other slot held the next generation's superblock if it is not
        // a valid one (damaged, or zeroed: both slots are written when the
        // file is made) and the other region starts with that generation's
        // log: going back to this one would silently undo what came after.
        let other_slot = (current.generation + 1) % 2;
        if !matches!(slots[usize::from(other_slot == 1)], Slot::Valid(_)) && log.newer_log_in(current.region ^ 1)? {
            let why = "the newest superblock is damaged (a newer generation's log follows it)";
            return Err(LogError::Corrupt { offset: other_slot * SECTOR, why });
        }
        let recovered = log.replay(&mut apply)?;
        Ok((log, recovered))
    }

    fn region_size_for(sectors: u64) -> u64 {
        ((sectors * SECTOR - DATA_START) / 2) / SECTOR * SECTOR
    }

    fn region_start(&self, region: u32) -> u64 {
        DATA_START + u64::from(region) * self.region_size
    }

    /// A fresh random log id: logs never share one, so no batch of one log
    /// (a failed compaction's, an older generation's) can pass for another's.
    fn new_log_id(&mut self) -> u64 {
        self.ids_made += 1;
        tag(&self.id_seed, 0, &self.ids_made.to_le_bytes())
    }

    /// Whether `region` starts with a genuine batch of a later generation.
    fn newer_log_in(&mut self, region: u32) -> Result<bool, LogError> {
        let mut header = [0u8; SECTOR_BYTES];
        self.disk.read(self.region_start(region), &mut header)?;
        Ok(BatchHeader::decode(&header, &self.key).is_some_and(|(h, _)| h.generation > self.generation))
    }

    fn replay(&mut self, apply: &mut impl FnMut(&[u8]) -> bool) -> Result<Recovered, LogError> {
        let start = self.region_start(self.region);
        let mut found = Recovered::default();
        let mut header = [0u8; SECTOR_BYTES];
        let mut payload = Vec::new();
        // A record whose pieces span batches, gathered so far.
        let mut spanning: Vec<u8> = Vec::new();
        while self.end + SECTOR <= self.region_size {
            let at = start + self.end;
            let bad = match self.read_batch(at, &mut header, &mut payload)? {
                Batch::Valid { pieces, continues_record, padded, tag } => {
                    if !continues_record {
                        // A record begun before a crash, never finished: the
                        // log went on after it, and nothing waited for it.
                        found.torn_tail |= !spanning.is_empty();
                        spanning.clear();
                    } else if spanning.is_empty() {
                        let why = "a batch continues a record that no batch began";
                        return Err(LogError::Corrupt { offset: at, why });
                    }
                    for_each_piece(&payload[pieces], |offset, bytes, continues| {
                        let whole = if continues || !spanning.is_empty() {
                            if spanning.len() + bytes.len() > MAX_RECORD {
                                let why = "a record is longer than any record mqvisor writes";
                                return Err(LogError::Corrupt { offset: at, why });
                            }
                            spanning.extend_from_slice(bytes);
                            if continues {
                                return Ok(());
                            }
                            &spanning[..]
                        } else {
                            bytes
                        };
                        if !apply(whole) {
                            return Err(LogError::BadRecord { offset: at + (BATCH_HEADER + offset) as u64 });
                        }
                        found.records += 1;
                        spanning.clear();
                        Ok(())
                    })?;
                    found.bytes += padded;
                    self.end += padded;
                    self.next_seq += 1;
                    self.prev_tag = tag;
                    continue;
                }
                Batch::Bad(why) => Some(why),
                Batch::Missing => None,
            };
            // The log ends here, unless a later batch shows this was the middle.
            if self.later_batch_exists(at)? {
                return Err(LogError::Corrupt {
                    offset: at,
                    why: bad.unwrap_or("a batch is missing, and later batches of the log follow it"),
                });
            }
            found.torn_tail = bad.is_some();
            break;
        }
        // The snapshot was flushed before the superblock naming it was
        // written: if the log stops inside it, that is damage, not a tail.
        if self.end < self.snapshot_bytes {
            let at = start + self.end;
            return Err(LogError::Corrupt { offset: at, why: "the snapshot the superblock names is damaged" });
        }
        // The rest of a record never reached the disk: nothing waited on it.
        found.torn_tail |= !spanning.is_empty();
        Ok(found)
    }

    /// Reads the batch at `at` (its first sector into `header`, all of it
    /// into `payload`) and checks it against the chain.
    fn read_batch(
        &mut self,
        at: u64,
        header: &mut [u8; SECTOR_BYTES],
        payload: &mut Vec<u8>,
    ) -> Result<Batch, LogError> {
        self.disk.read(at, header)?;
        let Some((h, header_tag)) = BatchHeader::decode(header, &self.key) else {
            return Ok(Batch::Missing);
        };
        if h.log_id != self.log_id || h.seq != self.next_seq || h.prev != self.prev_tag {
            return Ok(Batch::Missing);
        }
        if h.len > MAX_BATCH {
            return Ok(Batch::Bad("a batch is longer than any batch mqvisor writes"));
        }
        let padded = ((BATCH_HEADER + h.len) as u64).next_multiple_of(SECTOR);
        if self.end + padded > self.region_size {
            return Ok(Batch::Bad("a batch runs past its region"));
        }
        payload.resize(usize::try_from(padded).map_err(|_| LogError::Full)?, 0);
        payload[..SECTOR_BYTES].copy_from_slice(header);
        if padded > SECTOR {
            self.disk.read(at + SECTOR, &mut payload[SECTOR_BYTES..])?;
        }
        let pieces = BATCH_HEADER..BATCH_HEADER + h.len;
        if tag(&self.key, PAYLOAD_DOMAIN, &payload[pieces.clone()]) != h.payload_tag {
            return Ok(Batch::Bad("a batch's contents do not match its tag (torn or damaged)"));
        }
        Ok(match check_pieces(&payload[pieces.clone()], h.pieces) {
            Ok(()) => {
                Batch::Valid { pieces, continues_record: h.flags & CONTINUES_RECORD != 0, padded, tag: header_tag }
            }
            Err(why) => Batch::Bad(why),
        })
    }

    /// Whether a genuine batch of this log with a later sequence number
    /// starts after `at`, up to where the log can have grown: the point at
    /// which the store compacts, plus one batch (and at least one batch
    /// past `at`). Batches are flushed one by one, so one exists only if the
    /// batch at `at` was once whole.
    fn later_batch_exists(&mut self, at: u64) -> Result<bool, LogError> {
        let start = self.region_start(self.region);
        let batch = ((BATCH_HEADER + MAX_BATCH) as u64).next_multiple_of(SECTOR) + SECTOR;
        let reach = (at + batch).max(start + self.compaction_threshold() + batch).min(start + self.region_size);
        // Read in small pieces: a VM's memory, once touched, stays touched.
        let mut window = vec![0u8; SCAN_CHUNK];
        let mut from = at + SECTOR;
        while from < reach {
            let len = usize::try_from(reach - from).map_or(SCAN_CHUNK, |left| left.min(SCAN_CHUNK));
            self.disk.read(from, &mut window[..len])?;
            let later = window[..len].chunks_exact(SECTOR_BYTES).any(|sector| {
                BatchHeader::decode(sector, &self.key)
                    .is_some_and(|(h, _)| h.log_id == self.log_id && h.seq > self.next_seq)
            });
            if later {
                return Ok(true);
            }
            from += len as u64;
        }
        Ok(false)
    }

    fn write_superblock(&mut self) -> Result<(), LogError> {
        self.write_superblock_to(self.generation % 2)
    }

    fn write_superblock_to(&mut self, slot: u64) -> Result<(), LogError> {
        let block = Superblock {
            region: self.region,
            generation: self.generation,
            log_id: self.log_id,
            snapshot_bytes: self.snapshot_bytes,
            sectors: self.sectors,
            key: self.key,
        };
        self.disk.write(slot * SECTOR, &block.encode())?;
        self.disk.flush()?;
        Ok(())
    }

    /// Adds a record body to the batch being built. A record that does not
    /// fit goes in pieces: each batch it fills is written and flushed, so a
    /// batch is on disk before any later one is written.
    pub fn push(&mut self, body: &[u8]) -> Result<(), LogError> {
        if body.len() > MAX_RECORD {
            return Err(LogError::Full);
        }
        if self.broken {
            return Err(LogError::Io);
        }
        let pushed = self.push_pieces(body);
        self.broken = pushed.is_err();
        pushed
    }

    fn push_pieces(&mut self, body: &[u8]) -> Result<(), LogError> {
        let mut rest = body;
        loop {
            if self.batch.is_empty() {
                self.batch.resize(BATCH_HEADER, 0);
            }
            let Some(room) = (BATCH_HEADER + MAX_BATCH).checked_sub(self.batch.len() + PIECE_HEADER) else {
                self.write_full_batch()?;
                continue;
            };
            if room == 0 && !rest.is_empty() {
                self.write_full_batch()?;
                continue;
            }
            let piece = rest.len().min(room);
            let continues = piece < rest.len();
            let word = u32::try_from(piece).unwrap_or(u32::MAX) | if continues { PIECE_CONTINUES } else { 0 };
            self.batch.extend_from_slice(&word.to_le_bytes());
            self.batch.extend_from_slice(&rest[..piece]);
            self.batch_pieces += 1;
            rest = &rest[piece..];
            if !continues {
                return Ok(());
            }
            self.write_full_batch()?;
            self.batch_continues = true;
        }
    }

    fn write_full_batch(&mut self) -> Result<(), LogError> {
        self.write_batch()?;
        Ok(self.disk.flush()?)
    }

    /// Writes the batch being built (if any) at the end of the log.
    fn write_batch(&mut self) -> Result<(), LogError> {
        if self.broken {
            return Err(LogError::Io);
        }
        if self.batch.is_empty() {
            return Ok(());
        }
        let len = self.batch.len() - BATCH_HEADER;
        let header = BatchHeader {
            pieces: self.batch_pieces,
            generation: self.generation,
            log_id: self.log_id,
            seq: self.next_seq,
            len,
            flags: if self.batch_continues { CONTINUES_RECORD } else { 0 },
            prev: self.prev_tag,
            payload_tag: tag(&self.key, PAYLOAD_DOMAIN, &self.batch[BATCH_HEADER..]),
        };
        let (bytes, header_tag) = header.encode(&self.key);
        self.batch[..BATCH_HEADER].copy_from_slice(&bytes);
        let padded = (self.batch.len() as u64).next_multiple_of(SECTOR);
        if self.end + padded > self.region_size {
            return Err(LogError::Full);
        }
        self.batch.resize(usize::try_from(padded).map_err(|_| LogError::Full)?, 0);
        let at = self.region_start(self.region) + self.end;
        let result = self.disk.write(at, &self.batch);
        self.batch.clear();
        self.batch_pieces = 0;
        self.batch_continues = false;
        result?;
        self.end += padded;
        self.next_seq += 1;
        self.prev_tag = header_tag;
        Ok(())
    }

    /// Writes what was pushed and makes it durable: one group commit.
    /// After a failure the log takes nothing more: compact.
    pub fn commit(&mut self) -> Result<(), LogError> {
        let committed = self.write_batch().and_then(|()| Ok(self.disk.flush()?));
        self.broken |= committed.is_err();
        committed
    }

    /// Drops records pushed but not written. What is on disk may then end
    /// inside a record, so the log takes nothing more until compacted.
    fn discard_pending(&mut self) {
        if !self.batch.is_empty() {
            self.broken = true;
        }
        self.batch.clear();
        self.batch_pieces = 0;
        self.batch_continues = false;
    }

    /// Whether the log has grown enough past the last snapshot, or close
    /// enough to its region's end, that the next commit should compact.
    pub fn wants_compaction(&self) -> bool {
        self.end >= self.compaction_threshold()
    }

    /// The log's length at which the next commit compacts it.
    fn compaction_threshold(&self) -> u64 {
        COMPACT_FLOOR.max(self.snapshot_bytes.saturating_mul(COMPACT_RATIO)).min(self.region_size / 2)
    }

    /// Whether records were pushed and not committed.
    pub fn has_pending(&self) -> bool {
        !self.batch.is_empty()
    }

    /// Bytes of the active region in use.
    pub fn len(&self) -> u64 {
        self.end
    }

    pub fn is_empty(&self) -> bool {
        self.end == 0
    }

    /// Where the active region lies on the device, in bytes.
    pub fn active_region(&self) -> core::ops::Range<u64> {
        let start = self.region_start(self.region);
        start..start + self.region_size
    }

    /// Replaces the log with a snapshot: `snapshot` pushes every live
    /// record through the closure it is given. Until the new superblock is
    /// durable, the old generation stays the one recovery reads.
    pub fn compact(
        &mut self,
        snapshot: impl FnOnce(&mut dyn FnMut(&[u8]) -> Result<(), LogError>) -> Result<(), LogError>,
    ) -> Result<(), LogError> {
        self.discard_pending();
        let old = (self.generation, self.region, self.log_id, self.end, self.next_seq, self.prev_tag);
        self.generation += 1;
        self.region ^= 1;
        self.log_id = self.new_log_id();
        self.end = 0;
        self.next_seq = 0;
        self.prev_tag = 0;
        self.broken = false;
        let result = snapshot(&mut |body| self.push(body)).and_then(|()| self.commit());
        let result = result.and_then(|()| {
            self.snapshot_bytes = self.end;
            self.write_superblock()
        });
        if result.is_err() {
            // The old generation is still the valid one on disk, but what it
            // was to be followed by is gone: only another compaction goes on.
            self.discard_pending();
            (self.generation, self.region, self.log_id, self.end, self.next_seq, self.prev_tag) = old;
            self.broken = true;
        }
        result
    }

    pub fn disk(&mut self) -> &mut D {
        &mut self.disk
    }
}

/// Walks the pieces of a checked batch payload: `(offset in payload,
/// bytes, whether the record continues in the next batch)`.
fn for_each_piece(
    payload: &[u8],
    mut f: impl FnMut(usize, &[u8], bool) -> Result<(), LogError>,
) -> Result<(), LogError> {
    let mut at = 0;
    while at < payload.len() {
        let word = le32(payload, at);
        let len = (word & !PIECE_CONTINUES) as usize;
        f(at, &payload[at + PIECE_HEADER..at + PIECE_HEADER + len], word & PIECE_CONTINUES != 0)?;
        at += PIECE_HEADER + len;
    }
    Ok(())
}

/// Checks that the pieces fill the payload exactly, that their number is
/// the header's, and that only the last one continues.
fn check_pieces(payload: &[u8], count: u32) -> Result<(), &'static str> {
    let mut at = 0usize;
    let mut seen = 0u32;
    while at < payload.len() {
        if payload.len() - at < PIECE_HEADER {
            return Err("a record header is cut");
        }
        let word = le32(payload, at);
        let len = (word & !PIECE_CONTINUES) as usize;
        if payload.len() - at - PIECE_HEADER < len {
            return Err("a record runs past its batch");
        }
        at += PIECE_HEADER + len;
        if word & PIECE_CONTINUES != 0 && at != payload.len() {
            return Err("a record continues before the end of its batch");
        }
        seen += 1;
    }
    if seen != count { Err("a batch holds fewer records than its header says") } else { Ok(()) }
}
