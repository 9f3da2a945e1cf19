//! The state log on a block device: where records go, how a crash is
//! survived, and how the log is kept bounded. Sans-I/O over [`Disk`], so
//! the guest drives it with virtio-blk and the host checks a file with it.
//!
//! Layout (version [`FORMAT_VERSION`], described in docs/state-format.md):
//! - sectors 0 and 1: two superblock slots; the valid one with the higher
//!   generation names the active region. Generation `g` lives in slot
//!   `g % 2`, so writing a new one never overwrites the current one.
//! - from [`DATA_START`]: two equal regions. The active one holds the log
//!   as batches, each starting on a sector: a 32-byte header (magic,
//!   generation, sequence number, payload length, header checksum), then
//!   records (length, CRC-32C of the body, body), zero-padded to a sector.
//!
//! A batch is one group commit: written, then flushed, before the next is
//! written, so only the last batch can be torn, and a torn batch applies
//! nothing. Recovery reads batches in sequence order until one is missing
//! or bad. If no later batch of the same generation exists within reach of
//! the bad one, it was the torn tail and the log ends there; otherwise the
//! log is corrupt in the middle, which is an error naming the offset.
//!
//! Compaction writes a snapshot of the live state into the other region
//! under the next generation, flushes it, then writes and flushes the new
//! superblock: a crash at any point leaves one complete generation.
//!
//! Never trusts what it reads: every length is bounded before it is used.

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

/// Sector size of the device.
pub const SECTOR: u64 = SECTOR_BYTES as u64;
const SECTOR_BYTES: usize = 512;
/// On-disk format version in the superblock.
pub const FORMAT_VERSION: u32 = 1;
/// Where the regions start: the superblocks, then room to grow the header.
pub const DATA_START: u64 = 1 << 20;
/// Largest batch payload: one group commit or one piece of a snapshot.
pub const MAX_BATCH: usize = 1 << 20;
/// Largest single record (a message at the largest packet size, plus its header).
pub const MAX_RECORD: usize = MAX_BATCH - RECORD_HEADER - BATCH_HEADER;
/// The smallest device the log accepts.
pub const MIN_SECTORS: u64 = (4 << 20) / SECTOR;

const SUPER_MAGIC: &[u8; 8] = b"MQVSTATE";
const BATCH_MAGIC: u32 = 0x4d51_5642; // "MQVB"
const BATCH_HEADER: usize = 32;
const RECORD_HEADER: usize = 8;
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
    /// A batch or record in the middle of the log is damaged.
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
            LogError::Version(v) => write!(f, "state format {v}; this build reads format {FORMAT_VERSION}"),
            LogError::Corrupt { offset, why } => {
                write!(f, "the state log is corrupt at byte {offset}: {why}, and valid records follow it")
            }
            LogError::BadRecord { offset } => {
                write!(f, "a record at byte {offset} has a valid checksum but does not decode")
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

/// CRC-32C (Castagnoli), eight bytes at a time (a restart checks every
/// byte of the log).
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

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3], b[at + 4], b[at + 5], b[at + 6], b[at + 7]])
}

/// The superblock: 8 magic, u32 version, u32 generation, u32 region,
/// u32 reserved, u64 snapshot bytes, u32 CRC-32C of the preceding 32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Superblock {
    generation: u32,
    region: u32,
    snapshot_bytes: u64,
}

impl Superblock {
    fn encode(&self) -> [u8; SECTOR_BYTES] {
        let mut s = [0u8; SECTOR_BYTES];
        s[..8].copy_from_slice(SUPER_MAGIC);
        s[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        s[12..16].copy_from_slice(&self.generation.to_le_bytes());
        s[16..20].copy_from_slice(&self.region.to_le_bytes());
        s[24..32].copy_from_slice(&self.snapshot_bytes.to_le_bytes());
        let crc = crc32c(&s[..32]);
        s[32..36].copy_from_slice(&crc.to_le_bytes());
        s
    }

    /// `Ok(None)` for a slot that is not a valid superblock.
    fn decode(s: &[u8]) -> Result<Option<Superblock>, LogError> {
        if &s[..8] != SUPER_MAGIC || crc32c(&s[..32]) != le32(s, 32) {
            return Ok(None);
        }
        let version = le32(s, 8);
        if version != FORMAT_VERSION {
            return Err(LogError::Version(version));
        }
        let region = le32(s, 16);
        if region > 1 {
            return Ok(None);
        }
        Ok(Some(Superblock { generation: le32(s, 12), region, snapshot_bytes: le64(s, 24) }))
    }
}

/// A batch header: u32 magic, u32 generation, u64 sequence, u32 payload
/// length, u32 record count, u32 reserved, u32 CRC-32C of the preceding 28.
fn batch_header(generation: u32, seq: u64, len: usize, count: u32) -> [u8; BATCH_HEADER] {
    let mut h = [0u8; BATCH_HEADER];
    h[..4].copy_from_slice(&BATCH_MAGIC.to_le_bytes());
    h[4..8].copy_from_slice(&generation.to_le_bytes());
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[16..20].copy_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
    h[20..24].copy_from_slice(&count.to_le_bytes());
    let crc = crc32c(&h[..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

/// (sequence, payload length, record count) of a valid header of `generation`.
fn read_batch_header(h: &[u8], generation: u32) -> Option<(u64, usize, u32)> {
    if le32(h, 0) != BATCH_MAGIC || crc32c(&h[..28]) != le32(h, 28) || le32(h, 4) != generation {
        return None;
    }
    let len = le32(h, 16) as usize;
    (len <= MAX_BATCH).then(|| (le64(h, 8), len, le32(h, 20)))
}

/// What recovery found where it expected the next batch.
enum Batch {
    /// Whole and checked: its records are `payload[records]`.
    Valid { records: core::ops::Range<usize>, count: u32, padded: u64 },
    /// Its header is ours but the batch is damaged (or torn).
    Bad(&'static str),
    /// No batch of this generation and sequence number.
    Missing,
}

/// The log on a disk: appends group commits, compacts, recovers.
pub struct Log<D: Disk> {
    disk: D,
    region_size: u64,
    generation: u32,
    region: u32,
    /// Where the next batch goes, relative to the region's start.
    end: u64,
    next_seq: u64,
    snapshot_bytes: u64,
    /// The batch being filled (header room first).
    batch: Vec<u8>,
    batch_records: u32,
}

/// What [`Log::open`] found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recovered {
    pub records: u64,
    pub bytes: u64,
    /// A torn last batch was dropped.
    pub torn_tail: bool,
    /// The disk had no state yet.
    pub fresh: bool,
}

impl<D: Disk> Log<D> {
    /// Opens the log on `disk`, passing every record body to `apply` in
    /// order. A fresh (all-zero) disk gets a superblock.
    pub fn open(mut disk: D, mut apply: impl FnMut(&[u8]) -> bool) -> Result<(Log<D>, Recovered), LogError> {
        let sectors = disk.sectors();
        if sectors < MIN_SECTORS {
            return Err(LogError::TooSmall(sectors));
        }
        let region_size = ((sectors * SECTOR - DATA_START) / 2) / SECTOR * SECTOR;
        let mut head = vec![0u8; 2 * SECTOR_BYTES];
        disk.read(0, &mut head)?;
        let slots = [Superblock::decode(&head[..512])?, Superblock::decode(&head[512..])?];
        let current = slots.iter().flatten().max_by_key(|s| s.generation).copied();
        let mut log = Log {
            disk,
            region_size,
            generation: 0,
            region: 0,
            end: 0,
            next_seq: 0,
            snapshot_bytes: 0,
            batch: Vec::new(),
            batch_records: 0,
        };
        let Some(current) = current else {
            if head.iter().any(|&b| b != 0) {
                return Err(LogError::NotAStateFile);
            }
            log.write_superblock()?;
            return Ok((log, Recovered { fresh: true, ..Recovered::default() }));
        };
        log.generation = current.generation;
        log.region = current.region;
        log.snapshot_bytes = current.snapshot_bytes;
        let recovered = log.replay(&mut apply)?;
        Ok((log, recovered))
    }

    fn region_start(&self, region: u32) -> u64 {
        DATA_START + u64::from(region) * self.region_size
    }

    fn replay(&mut self, apply: &mut impl FnMut(&[u8]) -> bool) -> Result<Recovered, LogError> {
        let start = self.region_start(self.region);
        let mut found = Recovered::default();
        let mut header = [0u8; SECTOR_BYTES];
        let mut payload = Vec::new();
        while self.end + SECTOR <= self.region_size {
            let at = start + self.end;
            let bad = match self.read_batch(at, &mut header, &mut payload)? {
                Batch::Valid { records, count, padded } => {
                    for_each_record(&payload[records], |offset, body| {
                        if apply(body) {
                            Ok(())
                        } else {
                            Err(LogError::BadRecord { offset: at + (BATCH_HEADER + offset) as u64 })
                        }
                    })?;
                    found.records += u64::from(count);
                    found.bytes += padded;
                    self.end += padded;
                    self.next_seq += 1;
                    continue;
                }
                Batch::Bad(why) => Some(why),
                Batch::Missing => None,
            };
            // The log ends here, unless a later batch shows this was the middle.
            if self.later_batch_exists(at)? {
                return Err(LogError::Corrupt { offset: at, why: bad.unwrap_or("a batch header is damaged") });
            }
            found.torn_tail = bad.is_some() || self.header_is_ours(&header);
            break;
        }
        Ok(found)
    }

    /// Reads the batch at `at` (its first sector into `header`, all of it
    /// into `payload`) and checks it.
    fn read_batch(
        &mut self,
        at: u64,
        header: &mut [u8; SECTOR_BYTES],
        payload: &mut Vec<u8>,
    ) -> Result<Batch, LogError> {
        self.disk.read(at, header)?;
        // Zeros, an older generation's batch, or a torn header.
        let Some((_, len, count)) = read_batch_header(header, self.generation).filter(|h| h.0 == self.next_seq) else {
            return Ok(Batch::Missing);
        };
        let padded = ((BATCH_HEADER + len) as u64).next_multiple_of(SECTOR);
        if self.end + padded > self.region_size {
            return Ok(Batch::Bad("a batch runs past its region"));
        }
        payload.resize(usize::try_from(padded).map_err(|_| LogError::Full)?, 0);
        payload[..SECTOR_BYTES].copy_from_slice(header);
        if padded > SECTOR {
            self.disk.read(at + SECTOR, &mut payload[SECTOR_BYTES..])?;
        }
        let records = BATCH_HEADER..BATCH_HEADER + len;
        Ok(match check_records(&payload[records.clone()], count) {
            Ok(()) => Batch::Valid { records, count, padded },
            Err(why) => Batch::Bad(why),
        })
    }

    /// Whether `header` looks like a batch of this generation (a torn one).
    fn header_is_ours(&self, header: &[u8]) -> bool {
        le32(header, 0) == BATCH_MAGIC && le32(header, 4) == self.generation
    }

    /// Whether a valid batch of this generation with a later sequence
    /// number starts within one batch's reach after `at`.
    fn later_batch_exists(&mut self, at: u64) -> Result<bool, LogError> {
        let region_end = self.region_start(self.region) + self.region_size;
        let reach = (at + ((BATCH_HEADER + MAX_BATCH) as u64).next_multiple_of(SECTOR) + SECTOR).min(region_end);
        // Read in small pieces: a VM's memory, once touched, stays touched.
        let mut window = vec![0u8; SCAN_CHUNK];
        let mut from = at + SECTOR;
        while from < reach {
            let len = usize::try_from(reach - from).map_or(SCAN_CHUNK, |left| left.min(SCAN_CHUNK));
            self.disk.read(from, &mut window[..len])?;
            let later = window[..len].chunks_exact(SECTOR_BYTES).any(|sector| {
                read_batch_header(sector, self.generation).is_some_and(|(seq, _, _)| seq > self.next_seq)
            });
            if later {
                return Ok(true);
            }
            from += len as u64;
        }
        Ok(false)
    }

    fn write_superblock(&mut self) -> Result<(), LogError> {
        let block =
            Superblock { generation: self.generation, region: self.region, snapshot_bytes: self.snapshot_bytes };
        let slot = u64::from(self.generation % 2) * SECTOR;
        self.disk.write(slot, &block.encode())?;
        self.disk.flush()?;
        Ok(())
    }

    /// Adds a record body to the batch being built. A batch that would
    /// pass [`MAX_BATCH`] is written first (not flushed).
    pub fn push(&mut self, body: &[u8]) -> Result<(), LogError> {
        if body.len() > MAX_RECORD {
            return Err(LogError::Full);
        }
        if self.batch.len() + RECORD_HEADER + body.len() > BATCH_HEADER + MAX_BATCH {
            self.write_batch()?;
        }
        if self.batch.is_empty() {
            self.batch.resize(BATCH_HEADER, 0);
        }
        self.batch.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_le_bytes());
        self.batch.extend_from_slice(&crc32c(body).to_le_bytes());
        self.batch.extend_from_slice(body);
        self.batch_records += 1;
        Ok(())
    }

    /// Writes the batch being built (if any) at the end of the log.
    fn write_batch(&mut self) -> Result<(), LogError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let len = self.batch.len() - BATCH_HEADER;
        let header = batch_header(self.generation, self.next_seq, len, self.batch_records);
        self.batch[..BATCH_HEADER].copy_from_slice(&header);
        let padded = (self.batch.len() as u64).next_multiple_of(SECTOR);
        if self.end + padded > self.region_size {
            return Err(LogError::Full);
        }
        self.batch.resize(usize::try_from(padded).map_err(|_| LogError::Full)?, 0);
        let at = self.region_start(self.region) + self.end;
        let result = self.disk.write(at, &self.batch);
        self.batch.clear();
        self.batch_records = 0;
        result?;
        self.end += padded;
        self.next_seq += 1;
        Ok(())
    }

    /// Writes what was pushed and makes it durable: one group commit.
    pub fn commit(&mut self) -> Result<(), LogError> {
        self.write_batch()?;
        self.disk.flush()?;
        Ok(())
    }

    /// Drops records pushed but not committed (a failed commit's, before
    /// compaction writes them again as part of the snapshot).
    pub fn discard_pending(&mut self) {
        self.batch.clear();
        self.batch_records = 0;
    }

    /// Whether the log has grown enough past the last snapshot, or close
    /// enough to its region's end, that the next commit should compact.
    pub fn wants_compaction(&self) -> bool {
        let threshold = COMPACT_FLOOR.max(self.snapshot_bytes.saturating_mul(COMPACT_RATIO));
        self.end >= threshold.min(self.region_size / 2)
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

    /// Replaces the log with a snapshot: `snapshot` pushes every live
    /// record through the closure it is given. Until the new superblock is
    /// durable, the old generation stays the one recovery reads.
    pub fn compact(
        &mut self,
        snapshot: impl FnOnce(&mut dyn FnMut(&[u8]) -> Result<(), LogError>) -> Result<(), LogError>,
    ) -> Result<(), LogError> {
        self.discard_pending();
        let (old_generation, old_region, old_end, old_seq) = (self.generation, self.region, self.end, self.next_seq);
        self.generation = self.generation.wrapping_add(1);
        self.region ^= 1;
        self.end = 0;
        self.next_seq = 0;
        let result = snapshot(&mut |body| self.push(body)).and_then(|()| self.commit());
        let result = result.and_then(|()| {
            self.snapshot_bytes = self.end;
            self.write_superblock()
        });
        if result.is_err() {
            // The old generation is still the valid one on disk.
            self.discard_pending();
            (self.generation, self.region, self.end, self.next_seq) = (old_generation, old_region, old_end, old_seq);
        }
        result
    }

    pub fn disk(&mut self) -> &mut D {
        &mut self.disk
    }
}

/// Walks the records of a batch payload: `(offset in payload, body)`.
fn for_each_record(payload: &[u8], mut f: impl FnMut(usize, &[u8]) -> Result<(), LogError>) -> Result<(), LogError> {
    let mut at = 0;
    while at < payload.len() {
        let len = le32(payload, at) as usize;
        f(at, &payload[at + RECORD_HEADER..at + RECORD_HEADER + len])?;
        at += RECORD_HEADER + len;
    }
    Ok(())
}

/// Checks every record's length and checksum, and the count.
fn check_records(payload: &[u8], count: u32) -> Result<(), &'static str> {
    let mut at = 0usize;
    let mut seen = 0u32;
    while at < payload.len() {
        if payload.len() - at < RECORD_HEADER {
            return Err("a record header is cut");
        }
        let len = le32(payload, at) as usize;
        let body = payload.get(at + RECORD_HEADER..at + RECORD_HEADER + len).ok_or("a record runs past its batch")?;
        if crc32c(body) != le32(payload, at + 4) {
            return Err("a record's checksum does not match");
        }
        at += RECORD_HEADER + len;
        seen += 1;
    }
    if seen != count { Err("a batch holds fewer records than its header says") } else { Ok(()) }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // test disks are small
mod tests {
    use super::*;
    use alloc::vec::Vec;

    /// A disk in memory that can tear its last write or fail when told.
    struct MemDisk {
        bytes: Vec<u8>,
        fail_writes: bool,
    }

    impl MemDisk {
        fn new(mib: usize) -> MemDisk {
            MemDisk { bytes: vec![0; mib << 20], fail_writes: false }
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
            Ok(())
        }
        fn flush(&mut self) -> Result<(), IoError> {
            Ok(())
        }
    }

    fn records(disk: &mut MemDisk) -> Result<(Vec<Vec<u8>>, Recovered), LogError> {
        let mut seen = Vec::new();
        let (_, recovered) = Log::open(disk, |body| {
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
        let (mut log, _) = Log::open(disk, |_| true).unwrap();
        for b in 0..batches {
            for r in 0..per_batch {
                log.push(&body(b * per_batch + r)).unwrap();
            }
            log.commit().unwrap();
        }
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

    /// The byte offset of batch `n` (each batch of `per_batch` records).
    fn batch_offset(disk: &mut MemDisk, n: usize) -> usize {
        let mut at = DATA_START as usize;
        for _ in 0..n {
            let len = le32(&disk.bytes, at + 16) as usize;
            at += (BATCH_HEADER + len).next_multiple_of(SECTOR_BYTES);
        }
        at
    }

    #[test]
    fn a_torn_last_batch_is_dropped_whole_and_the_log_goes_on() {
        let mut disk = MemDisk::new(8);
        write_batches(&mut disk, 5, 10);
        let last = batch_offset(&mut disk, 4);
        // Tear the last batch: its second sector never reached the disk.
        disk.bytes[last + 600] ^= 0xff;
        let (seen, recovered) = records(&mut disk).unwrap();
        assert_eq!(seen, (0..40).map(body).collect::<Vec<_>>());
        assert!(recovered.torn_tail);
        // Appending after recovery overwrites the torn batch.
        {
            let (mut log, _) = Log::open(&mut disk, |_| true).unwrap();
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
        let second = batch_offset(&mut disk, 1);
        disk.bytes[second + 100] ^= 0x01;
        match records(&mut disk) {
            Err(LogError::Corrupt { offset, .. }) => assert_eq!(offset, second as u64),
            other => panic!("{other:?}"),
        }
        // A damaged header in the middle, too.
        let mut disk = MemDisk::new(8);
        write_batches(&mut disk, 5, 10);
        let third = batch_offset(&mut disk, 2);
        disk.bytes[third + 3] ^= 0x01;
        assert!(matches!(records(&mut disk), Err(LogError::Corrupt { offset, .. }) if offset == third as u64));
    }

    #[test]
    fn compaction_switches_generation_and_region_atomically() {
        let mut disk = MemDisk::new(8);
        {
            let (mut log, _) = Log::open(&mut disk, |_| true).unwrap();
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
            let (mut log, _) = Log::open(&mut disk, |_| true).unwrap();
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
            let (mut log, _) = Log::open(&mut disk, |_| true).unwrap();
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
        let (mut log, _) = Log::open(&mut disk, |_| true).unwrap();
        log.push(b"x").unwrap();
        assert_eq!(log.commit(), Err(LogError::Io));
    }

    #[test]
    fn foreign_files_and_small_disks_are_refused() {
        let mut disk = MemDisk::new(8);
        disk.bytes[10] = 1;
        assert_eq!(records(&mut disk).unwrap_err(), LogError::NotAStateFile);
        let mut small = MemDisk { bytes: vec![0; 1 << 20], fail_writes: false };
        assert!(matches!(records(&mut small), Err(LogError::TooSmall(_))));
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
}
