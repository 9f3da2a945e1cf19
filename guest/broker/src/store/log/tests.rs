//! The state log's tests: a disk in memory that fails and tears writes on
//! demand, and what recovery makes of each kind of damage.

#![allow(clippy::cast_possible_truncation)] // test disks are small

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
