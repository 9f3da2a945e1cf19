//! MQTT data representations (MQTT 5.0 section 1.5, same in 3.1.1): integers,
//! variable byte integers, UTF-8 strings, binary data.
//!
//! Owns a bounds-checked reader over one packet's bytes and the matching
//! writers. Reading never panics and never reads past the packet: every
//! shortfall is `DecodeError::Truncated`, every rule break its own variant.

use alloc::string::String;
use alloc::vec::Vec;

/// Why bytes are not a valid MQTT packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// The packet ends before a field does.
    Truncated,
    /// A variable byte integer longer than 4 bytes (1.5.5).
    BadVarInt,
    /// A string that is not well-formed UTF-8 or contains U+0000 (1.5.4).
    BadUtf8,
    /// Reserved bits or flags set, or a field with an impossible value.
    Malformed(&'static str),
    /// Well-formed, but not allowed here (a protocol error, 4.13).
    Protocol(&'static str),
    /// An unknown packet type or a protocol level we do not speak.
    UnsupportedProtocol,
    /// Larger than the configured maximum packet size.
    TooLarge,
}

/// The largest remaining length the format can express (1.5.5).
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;

/// A cursor over the bytes of one packet.
pub struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes }
    }

    pub fn remaining(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.bytes.len() {
            return Err(DecodeError::Truncated);
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    pub fn rest(&mut self) -> &'a [u8] {
        core::mem::take(&mut self.bytes)
    }

    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn var_int(&mut self) -> Result<u32, DecodeError> {
        let mut value = 0u32;
        for i in 0..4 {
            let byte = self.u8()?;
            value |= u32::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::BadVarInt)
    }

    pub fn binary(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }

    pub fn string(&mut self) -> Result<&'a str, DecodeError> {
        let raw = self.binary()?;
        let text = core::str::from_utf8(raw).map_err(|_| DecodeError::BadUtf8)?;
        if text.contains('\0') {
            return Err(DecodeError::BadUtf8);
        }
        Ok(text)
    }

    pub fn owned_string(&mut self) -> Result<String, DecodeError> {
        self.string().map(String::from)
    }
}

/// Appends MQTT encodings to a byte vector.
pub trait Writer {
    fn put_u8(&mut self, v: u8);
    fn put_u16(&mut self, v: u16);
    fn put_u32(&mut self, v: u32);
    fn put_var_int(&mut self, v: u32);
    /// A length-prefixed byte string; callers guarantee `len <= 65535`
    /// (decoded fields and validated topics always are), longer is cut.
    fn put_binary(&mut self, v: &[u8]);
    fn put_str(&mut self, v: &str) {
        self.put_binary(v.as_bytes());
    }
}

impl Writer for Vec<u8> {
    fn put_u8(&mut self, v: u8) {
        self.push(v);
    }
    fn put_u16(&mut self, v: u16) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_u32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_var_int(&mut self, mut v: u32) {
        loop {
            let mut byte = (v & 0x7f) as u8;
            v >>= 7;
            if v > 0 {
                byte |= 0x80;
            }
            self.push(byte);
            if v == 0 {
                break;
            }
        }
    }
    fn put_binary(&mut self, v: &[u8]) {
        let len = u16::try_from(v.len()).unwrap_or(u16::MAX);
        self.put_u16(len);
        self.extend_from_slice(&v[..usize::from(len)]);
    }
}

/// Bytes `put_var_int(v)` writes.
pub fn var_int_len(v: u32) -> usize {
    match v {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn var_int_golden_bytes() {
        for (value, bytes) in [
            (0u32, vec![0x00]),
            (127, vec![0x7f]),
            (128, vec![0x80, 0x01]),
            (16_383, vec![0xff, 0x7f]),
            (16_384, vec![0x80, 0x80, 0x01]),
            (2_097_151, vec![0xff, 0xff, 0x7f]),
            (2_097_152, vec![0x80, 0x80, 0x80, 0x01]),
            (268_435_455, vec![0xff, 0xff, 0xff, 0x7f]),
        ] {
            let mut out = Vec::new();
            out.put_var_int(value);
            assert_eq!(out, bytes, "{value}");
            assert_eq!(var_int_len(value), bytes.len());
            assert_eq!(Reader::new(&bytes).var_int(), Ok(value));
        }
    }

    #[test]
    fn a_five_byte_var_int_is_refused() {
        assert_eq!(Reader::new(&[0x80, 0x80, 0x80, 0x80, 0x01]).var_int(), Err(DecodeError::BadVarInt));
        assert_eq!(Reader::new(&[0x80, 0x80]).var_int(), Err(DecodeError::Truncated));
    }

    #[test]
    fn strings_must_be_utf8_without_nul() {
        assert_eq!(Reader::new(&[0, 2, b'h', b'i']).string(), Ok("hi"));
        assert_eq!(Reader::new(&[0, 2, 0xc3, 0x28]).string(), Err(DecodeError::BadUtf8));
        assert_eq!(Reader::new(&[0, 1, 0]).string(), Err(DecodeError::BadUtf8));
        assert_eq!(Reader::new(&[0, 5, b'h']).string(), Err(DecodeError::Truncated));
    }
}
