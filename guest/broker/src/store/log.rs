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
use core::hash::Hasher;

use siphasher::sip::SipHasher24;

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

/// CRC-32C tables for slicing by 8: `TABLES[0]` is the classic byte table,
/// `TABLES[k][b]` the CRC of byte `b` followed by `k` zero bytes.
const CRC_TABLES: [[u32; 256]; 8] = {
    let mut tables = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        #[allow(clippy::cast_possible_truncation)] // i < 256
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { 0x82f6_3b78 ^ (c >> 1) } else { c >> 1 };
            k += 1;
        }
        tables[0][i] = c;
        i += 1;
    }
    let mut t = 1;
    while t < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = tables[t - 1][i];
            tables[t][i] = (prev >> 8) ^ tables[0][(prev & 0xff) as usize];
            i += 1;
        }
        t += 1;
    }
    tables
};

/// CRC-32C (Castagnoli), eight bytes at a time. Guards the superblock
/// against damage; batches are guarded by keyed tags instead.
pub fn crc32c(bytes: &[u8]) -> u32 {
    let t = &CRC_TABLES;
    let mut crc = !0u32;
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let lo = crc ^ u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        crc = t[7][(lo & 0xff) as usize]
            ^ t[6][((lo >> 8) & 0xff) as usize]
            ^ t[5][((lo >> 16) & 0xff) as usize]
            ^ t[4][(lo >> 24) as usize]
            ^ t[3][usize::from(c[4])]
            ^ t[2][usize::from(c[5])]
            ^ t[1][usize::from(c[6])]
            ^ t[0][usize::from(c[7])];
    }
    for &b in chunks.remainder() {
        crc = t[0][((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// SipHash-2-4 of `bytes` under `key`, in `domain`.
fn tag(key: &[u8; 16], domain: u8, bytes: &[u8]) -> u64 {
    let mut h = SipHasher24::new_with_key(key);
    h.write_u8(domain);
    h.write(bytes);
    h.finish()
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3], b[at + 4], b[at + 5], b[at + 6], b[at + 7]])
}

/// The superblock (64 bytes of its sector, then its CRC-32C):
///
/// | offset | field |
/// |---|---|
/// | 0 | magic `MQVSTATE` |
/// | 8 | u32 version |
/// | 12 | u32 active region |
/// | 16 | u64 generation |
/// | 24 | u64 the active log's id |
/// | 32 | u64 bytes of the snapshot that starts the region |
/// | 40 | u64 the device's size in sectors when the file was laid out |
/// | 48 | 16 bytes: the tag key |
/// | 64 | u32 CRC-32C of bytes 0..64 |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Superblock {
    region: u32,
    generation: u64,
    log_id: u64,
    snapshot_bytes: u64,
    sectors: u64,
    key: [u8; 16],
}

/// What a superblock slot holds.
enum Slot {
    Empty,
    Valid(Superblock),
    Damaged,
}

impl Superblock {
    fn encode(&self) -> [u8; SECTOR_BYTES] {
        let mut s = [0u8; SECTOR_BYTES];
        s[..8].copy_from_slice(SUPER_MAGIC);
        s[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        s[12..16].copy_from_slice(&self.region.to_le_bytes());
        s[16..24].copy_from_slice(&self.generation.to_le_bytes());
        s[24..32].copy_from_slice(&self.log_id.to_le_bytes());
        s[32..40].copy_from_slice(&self.snapshot_bytes.to_le_bytes());
        s[40..48].copy_from_slice(&self.sectors.to_le_bytes());
        s[48..64].copy_from_slice(&self.key);
        let crc = crc32c(&s[..SUPER_USED]);
        s[SUPER_USED..SUPER_USED + 4].copy_from_slice(&crc.to_le_bytes());
        s
    }

    fn decode(s: &[u8]) -> Result<Slot, LogError> {
        if s.iter().all(|&b| b == 0) {
            return Ok(Slot::Empty);
        }
        if &s[..8] != SUPER_MAGIC {
            return Ok(Slot::Damaged);
        }
        let version = le32(s, 8);
        // Format 1 kept its CRC at 32, over the 32 bytes before it.
        let intact = |used: usize| crc32c(&s[..used]) == le32(s, used);
        if version != FORMAT_VERSION && (intact(SUPER_USED) || (version == 1 && intact(32))) {
            return Err(LogError::Version(version));
        }
        if version != FORMAT_VERSION || !intact(SUPER_USED) {
            return Ok(Slot::Damaged);
        }
        let mut key = [0u8; 16];
        key.copy_from_slice(&s[48..64]);
        Ok(Slot::Valid(Superblock {
            region: le32(s, 12),
            generation: le64(s, 16),
            log_id: le64(s, 24),
            snapshot_bytes: le64(s, 32),
            sectors: le64(s, 40),
            key,
        }))
    }
}

/// A batch header (64 bytes):
///
/// | offset | field |
/// |---|---|
/// | 0 | u32 magic |
/// | 4 | u32 record pieces |
/// | 8 | u64 generation |
/// | 16 | u64 log id |
/// | 24 | u64 sequence number, from 0 in each log |
/// | 32 | u32 payload length |
/// | 36 | u32 flags: [`CONTINUES_RECORD`] |
/// | 40 | u64 the previous batch's header tag (0 for sequence 0) |
/// | 48 | u64 payload tag |
/// | 56 | u64 header tag, over bytes 0..56 |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BatchHeader {
    pieces: u32,
    generation: u64,
    log_id: u64,
    seq: u64,
    len: usize,
    flags: u32,
    prev: u64,
    payload_tag: u64,
}

impl BatchHeader {
    /// The header's bytes and its tag.
    fn encode(&self, key: &[u8; 16]) -> ([u8; BATCH_HEADER], u64) {
        let mut h = [0u8; BATCH_HEADER];
        h[..4].copy_from_slice(&BATCH_MAGIC.to_le_bytes());
        h[4..8].copy_from_slice(&self.pieces.to_le_bytes());
        h[8..16].copy_from_slice(&self.generation.to_le_bytes());
        h[16..24].copy_from_slice(&self.log_id.to_le_bytes());
        h[24..32].copy_from_slice(&self.seq.to_le_bytes());
        h[32..36].copy_from_slice(&u32::try_from(self.len).unwrap_or(u32::MAX).to_le_bytes());
        h[36..40].copy_from_slice(&self.flags.to_le_bytes());
        h[40..48].copy_from_slice(&self.prev.to_le_bytes());
        h[48..56].copy_from_slice(&self.payload_tag.to_le_bytes());
        let header_tag = tag(key, HEADER_DOMAIN, &h[..HEADER_TAGGED]);
        h[56..64].copy_from_slice(&header_tag.to_le_bytes());
        (h, header_tag)
    }

    /// A header this file's key signed, with its tag; `None` for anything
    /// else (zeros, client bytes, damage).
    fn decode(h: &[u8], key: &[u8; 16]) -> Option<(BatchHeader, u64)> {
        if le32(h, 0) != BATCH_MAGIC {
            return None;
        }
        let header_tag = le64(h, HEADER_TAGGED);
        if tag(key, HEADER_DOMAIN, &h[..HEADER_TAGGED]) != header_tag {
            return None;
        }
        let header = BatchHeader {
            pieces: le32(h, 4),
            generation: le64(h, 8),
            log_id: le64(h, 16),
            seq: le64(h, 24),
            len: le32(h, 32) as usize,
            flags: le32(h, 36),
            prev: le64(h, 40),
            payload_tag: le64(h, 48),
        };
        Some((header, header_tag))
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

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // test disks are small
mod tests {
    use super::*;
    use alloc::vec::Vec;

    /// A disk in memory that fails writes when told, and remembers the
    /// writes since the last flush so that a test can tear them.
    struct MemDisk {
        bytes: Vec<u8>,
        fail_writes: bool,
        /// (offset, length) of each write since the last flush.
        unflushed: Vec<(usize, usize)>,
    }

    impl MemDisk {
        fn new(mib: usize) -> MemDisk {
            MemDisk { bytes: vec![0; mib << 20], fail_writes: false, unflushed: Vec::new() }
        }
    }

    impl Disk for &mut MemDisk {
        fn sectors(&self) -> u64 {
            self.bytes.len() as u64 / SECTOR
        }
        fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
            assert!(offset.is_multiple_of(SECTOR) && (buf.len() as u64).is_multiple_of(SECTOR), "whole sectors only");
            let at = offset as usize;
            buf.copy_from_slice(self.bytes.get(at..at + buf.len()).ok_or(IoError)?);
            Ok(())
        }
        fn write(&mut self, offset: u64, buf: &[u8]) -> Result<(), IoError> {
            assert!(offset.is_multiple_of(SECTOR) && (buf.len() as u64).is_multiple_of(SECTOR), "whole sectors only");
            if self.fail_writes {
                return Err(IoError);
            }
            let at = offset as usize;
            self.bytes.get_mut(at..at + buf.len()).ok_or(IoError)?.copy_from_slice(buf);
            self.unflushed.push((at, buf.len()));
            Ok(())
        }
        fn flush(&mut self) -> Result<(), IoError> {
            self.unflushed.clear();
            Ok(())
        }
    }

    const ENTROPY: [u8; ENTROPY_BYTES] = [7; ENTROPY_BYTES];

    fn open(disk: &mut MemDisk) -> Log<&mut MemDisk> {
        Log::open(disk, &ENTROPY, |_| true).unwrap().0
    }

    fn records(disk: &mut MemDisk) -> Result<(Vec<Vec<u8>>, Recovered), LogError> {
        let mut seen = Vec::new();
        let (_, recovered) = Log::open(disk, &ENTROPY, |body| {
            seen.push(body.to_vec());
            true
        })?;
        Ok((seen, recovered))
    }

    fn body(i: u32) -> Vec<u8> {
        let mut b = i.to_le_bytes().to_vec();
        b.resize(10 + (i as usize % 300), i as u8);
        b
    }

    fn write_batches(disk: &mut MemDisk, batches: u32, per_batch: u32) {
        let mut log = open(disk);
        for b in 0..batches {
            for r in 0..per_batch {
                log.push(&body(b * per_batch + r)).unwrap();
            }
            log.commit().unwrap();
        }
    }

    /// The byte offsets of the batches of the active log, in order.
    fn batch_offsets(disk: &mut MemDisk) -> Vec<usize> {
        let log = open(disk);
        let mut at = (DATA_START + u64::from(log.region) * log.region_size) as usize;
        let (key, log_id) = (log.key, log.log_id);
        let mut offsets = Vec::new();
        while let Some((h, _)) = BatchHeader::decode(&disk.bytes[at..at + SECTOR_BYTES], &key) {
            if h.log_id != log_id || h.seq != offsets.len() as u64 {
                break;
            }
            offsets.push(at);
            at += (BATCH_HEADER + h.len).next_multiple_of(SECTOR_BYTES);
        }
        offsets
    }

    #[test]
    fn committed_records_come_back_in_order() {
        let mut disk = MemDisk::new(8);
        assert!(records(&mut disk).unwrap().1.fresh);
        write_batches(&mut disk, 20, 7);
        let (seen, recovered) = records(&mut disk).unwrap();
        assert_eq!(seen, (0..140).map(body).collect::<Vec<_>>());
        assert!(!recovered.torn_tail && !recovered.fresh);
    }

    #[test]
    fn a_torn_last_batch_is_dropped_whole_and_the_log_goes_on() {
        let mut disk = MemDisk::new(8);
        write_batches(&mut disk, 5, 10);
        let last = batch_offsets(&mut disk)[4];
        // Tear the last batch: its second sector never reached the disk.
        disk.bytes[last + 600] ^= 0xff;
        let (seen, recovered) = records(&mut disk).unwrap();
        assert_eq!(seen, (0..40).map(body).collect::<Vec<_>>());
        assert!(recovered.torn_tail);
        // Appending after recovery overwrites the torn batch.
        {
            let mut log = open(&mut disk);
            log.push(b"after").unwrap();
            log.commit().unwrap();
        }
        let (seen, _) = records(&mut disk).unwrap();
        assert_eq!(seen.len(), 41);
        assert_eq!(seen[40], b"after");
    }

    #[test]
    fn damage_in_the_middle_is_an_error_naming_the_offset() {
        let mut disk = MemDisk::new(8);
        write_batches(&mut disk, 5, 10);
        let second = batch_offsets(&mut disk)[1];
        disk.bytes[second + 100] ^= 0x01;
        match records(&mut disk) {
            Err(LogError::Corrupt { offset, .. }) => assert_eq!(offset, second as u64),
            other => panic!("{other:?}"),
        }
        // A damaged header in the middle, too.
        let mut disk = MemDisk::new(8);
        write_batches(&mut disk, 5, 10);
        let third = batch_offsets(&mut disk)[2];
        disk.bytes[third + 3] ^= 0x01;
        assert!(matches!(records(&mut disk), Err(LogError::Corrupt { offset, .. }) if offset == third as u64));
    }

    #[test]
    fn compaction_switches_generation_and_region_atomically() {
        let mut disk = MemDisk::new(8);
        {
            let mut log = open(&mut disk);
            for i in 0..50 {
                log.push(&body(i)).unwrap();
                log.commit().unwrap();
            }
            log.compact(|push| push(b"snapshot-1").and_then(|()| push(b"snapshot-2"))).unwrap();
            log.push(b"after").unwrap();
            log.commit().unwrap();
        }
        let (seen, _) = records(&mut disk).unwrap();
        assert_eq!(seen, [b"snapshot-1".to_vec(), b"snapshot-2".to_vec(), b"after".to_vec()]);
        // A compaction that fails half-way leaves the previous generation.
        {
            let mut log = open(&mut disk);
            let failed = log.compact(|push| {
                push(b"partial")?;
                Err(LogError::Io)
            });
            assert!(failed.is_err());
        }
        let (seen, _) = records(&mut disk).unwrap();
        assert_eq!(seen.len(), 3);
    }

    #[test]
    fn a_full_region_and_failed_writes_are_errors_not_panics() {
        let mut disk = MemDisk::new(4);
        {
            let mut log = open(&mut disk);
            let big = vec![7u8; 100_000];
            let mut result = Ok(());
            for _ in 0..100 {
                result = log.push(&big).and_then(|()| log.commit());
                if result.is_err() {
                    break;
                }
            }
            assert_eq!(result, Err(LogError::Full));
        }
        disk.fail_writes = true;
        let mut log = open(&mut disk);
        log.push(b"x").unwrap();
        assert_eq!(log.commit(), Err(LogError::Io));
    }

    #[test]
    fn foreign_files_and_small_disks_are_refused() {
        let mut disk = MemDisk::new(8);
        disk.bytes[10] = 1;
        assert_eq!(records(&mut disk).unwrap_err(), LogError::NotAStateFile);
        let mut small = MemDisk { bytes: vec![0; 1 << 20], fail_writes: false, unflushed: Vec::new() };
        assert!(matches!(records(&mut small), Err(LogError::TooSmall(_))));
    }

    #[test]
    fn a_format_1_file_is_refused_by_its_version() {
        let mut disk = MemDisk::new(8);
        disk.bytes[..8].copy_from_slice(SUPER_MAGIC);
        disk.bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
        let crc = crc32c(&disk.bytes[..32]);
        disk.bytes[32..36].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(records(&mut disk).unwrap_err(), LogError::Version(1));
    }

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        // Every length around the 8-byte steps agrees with the bytewise form.
        let bytewise = |bytes: &[u8]| {
            let mut crc = !0u32;
            for &b in bytes {
                crc = CRC_TABLES[0][((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
            }
            !crc
        };
        let data: Vec<u8> = (0..100u8).map(|i| i.wrapping_mul(37)).collect();
        for len in 0..data.len() {
            assert_eq!(crc32c(&data[..len]), bytewise(&data[..len]), "length {len}");
        }
    }

    // --- Records larger than a batch (issue: one large message must not
    // disable durability) ---

    #[test]
    fn records_larger_than_a_batch_span_batches_and_come_back_whole() {
        let mut disk = MemDisk::new(16);
        let big: Vec<u8> = (0..(3 * MAX_BATCH + 12_345)).map(|i| (i * 7 % 251) as u8).collect();
        {
            let mut log = open(&mut disk);
            log.push(b"before").unwrap();
            log.push(&big).unwrap();
            log.push(b"after").unwrap();
            log.commit().unwrap();
            // And inside a snapshot.
            log.compact(|push| push(&big).and_then(|()| push(b"small"))).unwrap();
            log.push(b"last").unwrap();
            log.commit().unwrap();
        }
        let (seen, recovered) = records(&mut disk).unwrap();
        assert_eq!(seen, [big.clone(), b"small".to_vec(), b"last".to_vec()]);
        assert!(!recovered.torn_tail);
    }

    #[test]
    fn a_record_whose_last_piece_never_reached_the_disk_is_dropped() {
        let mut disk = MemDisk::new(16);
        let big = vec![9u8; 2 * MAX_BATCH + 100];
        {
            let mut log = open(&mut disk);
            log.push(b"committed").unwrap();
            log.commit().unwrap();
            log.push(&big).unwrap();
            // The crash comes before the commit that writes the last piece.
        }
        let (seen, recovered) = records(&mut disk).unwrap();
        assert_eq!(seen, [b"committed".to_vec()]);
        assert!(recovered.torn_tail);
        // The log goes on after it.
        {
            let mut log = open(&mut disk);
            log.push(b"next").unwrap();
            log.commit().unwrap();
        }
        assert_eq!(records(&mut disk).unwrap().0, [b"committed".to_vec(), b"next".to_vec()]);
    }

    // --- Geometry and superblocks ---

    fn compacted_disk() -> MemDisk {
        let mut disk = MemDisk::new(8);
        let mut log = open(&mut disk);
        log.push(b"old").unwrap();
        log.commit().unwrap();
        log.compact(|push| push(b"snap")).unwrap();
        log.push(b"new").unwrap();
        log.commit().unwrap();
        drop(log);
        disk
    }

    #[test]
    fn a_resized_file_is_refused_not_read_as_empty() {
        for mib in [4, 7, 9, 64] {
            let mut disk = compacted_disk();
            disk.bytes.resize(mib << 20, 0);
            assert_eq!(
                records(&mut disk).unwrap_err(),
                LogError::Resized { laid_out: 8 << 20, now: (mib as u64) << 20 },
                "resized to {mib} MiB"
            );
        }
    }

    #[test]
    fn a_damaged_newest_superblock_is_an_error_not_a_rollback() {
        // Generation 1 is current, in slot 1; its log is in region 1.
        let mut disk = compacted_disk();
        disk.bytes[512 + 20] ^= 0x10;
        assert!(matches!(records(&mut disk), Err(LogError::Corrupt { offset: 512, .. })));
        // Zeroed is damaged too: both slots are written when the file is made.
        let mut disk = compacted_disk();
        disk.bytes[512..1024].fill(0);
        assert!(matches!(records(&mut disk), Err(LogError::Corrupt { offset: 512, .. })));
        // Damage to the older slot costs nothing.
        let mut disk = compacted_disk();
        disk.bytes[20] ^= 0x10;
        assert_eq!(records(&mut disk).unwrap().0, [b"snap".to_vec(), b"new".to_vec()]);
        let mut disk = compacted_disk();
        disk.bytes[..512].fill(0);
        assert_eq!(records(&mut disk).unwrap().0, [b"snap".to_vec(), b"new".to_vec()]);
    }

    #[test]
    fn a_crash_in_the_first_compaction_is_not_taken_for_damage() {
        // The snapshot of generation 1 is on disk, its superblock is not.
        let mut disk = MemDisk::new(8);
        {
            let mut log = open(&mut disk);
            log.push(b"kept").unwrap();
            log.commit().unwrap();
            log.generation += 1;
            log.region ^= 1;
            log.log_id = log.new_log_id();
            log.end = 0;
            log.next_seq = 0;
            log.prev_tag = 0;
            log.push(b"snapshot never named").unwrap();
            log.commit().unwrap();
        }
        assert_eq!(records(&mut disk).unwrap().0, [b"kept".to_vec()]);
    }

    #[test]
    fn a_damaged_snapshot_is_an_error_even_with_nothing_after_it() {
        let mut disk = MemDisk::new(8);
        {
            let mut log = open(&mut disk);
            log.compact(|push| push(b"one").and_then(|()| push(b"two"))).unwrap();
        }
        let first = batch_offsets(&mut disk)[0];
        disk.bytes[first + 70] ^= 1;
        assert!(matches!(records(&mut disk), Err(LogError::Corrupt { offset, .. }) if offset == first as u64));
        disk.bytes[first + 70] ^= 1;
        disk.bytes[first..first + 512].fill(0);
        assert!(matches!(records(&mut disk), Err(LogError::Corrupt { offset, .. }) if offset == first as u64));
    }

    #[test]
    fn damage_longer_than_a_batch_in_the_middle_is_an_error() {
        let mut disk = MemDisk::new(16);
        // About 3.5 MiB of small batches: below the point of compaction.
        write_batches(&mut disk, 1200, 10);
        let batches = batch_offsets(&mut disk);
        let from = batches[300];
        disk.bytes[from..from + (1 << 20) + 100 * 1024].fill(0);
        assert!(matches!(records(&mut disk), Err(LogError::Corrupt { offset, .. }) if offset == from as u64));
        // And two damaged headers in a row.
        let mut disk = MemDisk::new(16);
        write_batches(&mut disk, 1200, 10);
        disk.bytes[batches[500] + 30] ^= 1;
        disk.bytes[batches[501] + 30] ^= 1;
        assert!(matches!(records(&mut disk), Err(LogError::Corrupt { offset, .. }) if offset == batches[500] as u64));
    }

    // --- Client bytes never become log structure ---

    /// A batch as a stranger would forge it: every field right (even the
    /// log id and chain, which a stranger cannot see), tagged under a key
    /// that is not the file's.
    fn forged_batch(log: &Log<&mut MemDisk>, key: &[u8; 16], seq: u64, prev: u64, record: &[u8]) -> Vec<u8> {
        let mut payload = (record.len() as u32).to_le_bytes().to_vec();
        payload.extend_from_slice(record);
        let header = BatchHeader {
            pieces: 1,
            generation: log.generation,
            log_id: log.log_id,
            seq,
            len: payload.len(),
            flags: 0,
            prev,
            payload_tag: tag(key, PAYLOAD_DOMAIN, &payload),
        };
        let mut batch = header.encode(key).0.to_vec();
        batch.extend_from_slice(&payload);
        batch.resize(batch.len().next_multiple_of(SECTOR_BYTES), 0);
        batch
    }

    #[test]
    fn forged_batches_in_stale_space_are_never_replayed() {
        for (key, seq_far) in [([0u8; 16], false), ([1u8; 16], true), ([0x5a; 16], false)] {
            let mut disk = MemDisk::new(8);
            write_batches(&mut disk, 3, 4);
            let log = open(&mut disk);
            let end = (DATA_START + u64::from(log.region) * log.region_size + log.end) as usize;
            let region_end = (DATA_START + u64::from(log.region + 1) * log.region_size) as usize;
            // Fill every sector after the log with forged batches, each
            // right for its place but for the key.
            let mut at = end;
            let mut seq = log.next_seq;
            let mut prev = log.prev_tag;
            let mut forged = Vec::new();
            while at + 4 * SECTOR_BYTES < region_end.min(end + (3 << 20)) {
                let s = if seq_far { 1_000_000 + seq } else { seq };
                let batch = forged_batch(&log, &key, s, prev, b"\x01forged retained message");
                prev = BatchHeader::decode(&batch, &key).unwrap().1;
                forged.push((at, batch));
                at += SECTOR_BYTES;
                seq += 1;
            }
            drop(log);
            for (at, batch) in forged {
                disk.bytes[at..at + batch.len()].copy_from_slice(&batch);
            }
            let (seen, recovered) = records(&mut disk).unwrap();
            assert_eq!(seen, (0..12).map(body).collect::<Vec<_>>(), "key {key:?}");
            assert!(!recovered.torn_tail);
        }
    }

    #[test]
    fn genuine_batches_of_an_older_log_in_a_reused_region_are_never_replayed() {
        let mut disk = MemDisk::new(8);
        {
            let mut log = open(&mut disk);
            // A long log in region 0 ...
            for i in 0..200 {
                log.push(&body(i)).unwrap();
                log.commit().unwrap();
            }
            // ... then two compactions bring a short log back to region 0.
            log.compact(|push| push(b"first")).unwrap();
            log.compact(|push| push(b"second")).unwrap();
            assert_eq!(log.region, 0);
        }
        assert_eq!(records(&mut disk).unwrap().0, [b"second".to_vec()]);
        // Even if the torn tail of the new log overlays the old one.
        {
            let mut log = open(&mut disk);
            log.push(b"torn").unwrap();
            log.commit().unwrap();
        }
        let last = *batch_offsets(&mut disk).last().unwrap();
        disk.bytes[last + 70] ^= 1;
        let (seen, recovered) = records(&mut disk).unwrap();
        assert_eq!(seen, [b"second".to_vec()]);
        assert!(recovered.torn_tail);
    }

    /// xorshift64: deterministic pseudo-random numbers for the property tests.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> usize {
            (self.next() % n) as usize
        }
    }

    /// A record body as a hostile client would shape it: its payload bytes
    /// hold forged batch headers and pieces at every offset it can reach,
    /// copied from what a stranger can know (the format), under keys that
    /// are not the file's.
    fn hostile_body(rng: &mut Rng, log: &Log<&mut MemDisk>) -> Vec<u8> {
        let len = match rng.below(10) {
            0 => rng.below(3 * MAX_BATCH as u64),
            1..=3 => rng.below(20_000),
            _ => rng.below(600),
        };
        let mut body = vec![0u8; len];
        let mut key = [0u8; 16];
        key[..8].copy_from_slice(&rng.next().to_le_bytes());
        let seq = log.next_seq + rng.below(4) as u64;
        let forged = forged_batch(log, &key, seq, rng.next(), b"\x01forged");
        let mut at = rng.below(64);
        while at < len {
            let n = forged.len().min(len - at);
            body[at..at + n].copy_from_slice(&forged[..n]);
            at += SECTOR_BYTES / (1 + rng.below(4));
        }
        body
    }

    /// Random pushes, commits, compactions and crashes (reopening the disk
    /// with the writes since the last flush torn at a random sector), with
    /// bodies full of forged structure: recovery gives back every committed
    /// record, in order, then at most a prefix of the uncommitted ones, and
    /// never anything else.
    #[test]
    fn hostile_bodies_and_crashes_recover_exactly_what_was_written() {
        for seed in 1..=12u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut disk = MemDisk::new(12);
            // What a reopen must give back, and what it may add after it.
            let mut committed: Vec<Vec<u8>> = Vec::new();
            let mut pending: Vec<Vec<u8>> = Vec::new();
            for _round in 0..6 {
                {
                    let mut log = open(&mut disk);
                    for _ in 0..(20 + rng.below(60)) {
                        // A failure leaves a log that takes nothing more: the crash follows.
                        let ok = match rng.below(20) {
                            0 => {
                                let live: Vec<Vec<u8>> = committed.iter().chain(&pending).cloned().collect();
                                let ok = log.compact(|push| live.iter().try_for_each(|r| push(r))).is_ok();
                                if ok {
                                    committed = live;
                                    pending.clear();
                                }
                                ok
                            }
                            1..=5 => {
                                let ok = log.commit().is_ok();
                                if ok {
                                    committed.append(&mut pending);
                                }
                                ok
                            }
                            _ => {
                                let body = hostile_body(&mut rng, &log);
                                let ok = log.push(&body).is_ok();
                                if ok {
                                    pending.push(body);
                                }
                                ok
                            }
                        };
                        if !ok {
                            break;
                        }
                    }
                    // Sometimes the crash comes between a commit's write and its flush.
                    if rng.below(2) == 0 {
                        let _ = log.write_batch();
                    }
                }
                // The crash: writes since the last flush land up to a random sector.
                let unflushed = core::mem::take(&mut disk.unflushed);
                if let Some(&(at, len)) = unflushed.last() {
                    let keep = rng.below((len / SECTOR_BYTES) as u64 + 1) * SECTOR_BYTES;
                    let garbage = rng.next() as u8;
                    disk.bytes[at + keep..at + len].fill(garbage);
                }
                let (seen, _) = records(&mut disk).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
                assert!(seen.len() >= committed.len(), "seed {seed}: committed records lost");
                assert_eq!(seen[..committed.len()], committed[..], "seed {seed}");
                let extra = &seen[committed.len()..];
                assert_eq!(extra, &pending[..extra.len()], "seed {seed}: only pushed records come back");
                committed = seen;
                pending.clear();
            }
        }
    }
}
