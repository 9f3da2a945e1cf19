//! The state log's on-disk structures, byte by byte: the superblock and
//! the batch header (their tables below, and docs/state-format.md), the
//! CRC-32C that guards a superblock and the keyed tag that signs a batch.
//!
//! Owns encoding and decoding them; what they mean (which slot is current,
//! whether a batch extends the chain) is the log's ([`super`]). Decoding
//! never trusts its input: a superblock whose CRC fails is damaged, a
//! header whose tag fails is not a header.

use core::hash::Hasher;

use siphasher::sip::SipHasher24;

use super::{
    BATCH_HEADER, BATCH_MAGIC, FORMAT_VERSION, HEADER_DOMAIN, HEADER_TAGGED, LogError, SECTOR_BYTES, SUPER_MAGIC,
    SUPER_USED,
};

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
pub(super) fn tag(key: &[u8; 16], domain: u8, bytes: &[u8]) -> u64 {
    let mut h = SipHasher24::new_with_key(key);
    h.write_u8(domain);
    h.write(bytes);
    h.finish()
}

pub(super) fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(super) fn le64(b: &[u8], at: usize) -> u64 {
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
pub(super) struct Superblock {
    pub(super) region: u32,
    pub(super) generation: u64,
    pub(super) log_id: u64,
    pub(super) snapshot_bytes: u64,
    pub(super) sectors: u64,
    pub(super) key: [u8; 16],
}

/// What a superblock slot holds.
pub(super) enum Slot {
    Empty,
    Valid(Superblock),
    Damaged,
}

impl Superblock {
    pub(super) fn encode(&self) -> [u8; SECTOR_BYTES] {
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

    pub(super) fn decode(s: &[u8]) -> Result<Slot, LogError> {
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
/// | 36 | u32 flags: [`super::CONTINUES_RECORD`] |
/// | 40 | u64 the previous batch's header tag (0 for sequence 0) |
/// | 48 | u64 payload tag |
/// | 56 | u64 header tag, over bytes 0..56 |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct BatchHeader {
    pub(super) pieces: u32,
    pub(super) generation: u64,
    pub(super) log_id: u64,
    pub(super) seq: u64,
    pub(super) len: usize,
    pub(super) flags: u32,
    pub(super) prev: u64,
    pub(super) payload_tag: u64,
}

impl BatchHeader {
    /// The header's bytes and its tag.
    pub(super) fn encode(&self, key: &[u8; 16]) -> ([u8; BATCH_HEADER], u64) {
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
    pub(super) fn decode(h: &[u8], key: &[u8; 16]) -> Option<(BatchHeader, u64)> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

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
