//! Client streams over the virtual link: how the VMM and the guest carry
//! many byte streams in virtio-net frames.
//!
//! Both ends are ours and the link is memory: lossless and in order. So a
//! stream needs no TCP (no handshakes, no retransmission, no socket buffers
//! sized for the worst case): a frame is an Ethernet header with
//! [`ETHERTYPE`], then records back to back, each a kind byte, a stream id
//! (u64 LE) and a length or count (u32 LE), then the bytes of a `Data`
//! record. One frame carries records of any number of streams, so a burst
//! for a thousand clients is a handful of frames.
//!
//! Flow control is a window per stream and direction: either side may have
//! [`WINDOW`] bytes of a stream's `Data` unconfirmed by the other side's
//! `Credit` records. The host confirms the guest's bytes once its client
//! socket took them, the guest confirms the client's bytes once its service
//! consumed them; so a client that does not read holds back only its own
//! stream, and one that floods is held back by TCP. Both ends keep the rule
//! with one [`Window`] per stream.
//!
//! Owns the wire format, its encoder and its checked decoder. Never trusts
//! a frame: the host decodes what a possibly hostile guest wrote.

use core::fmt;

/// Local experimental EtherType (IEEE 802 "local experimental 1").
pub const ETHERTYPE: u16 = 0x88B5;
/// Ethernet header: destination MAC, source MAC, EtherType.
pub const ETHERNET_HEADER_LEN: usize = 14;
/// Record header: kind (1), stream (8), length or count (4).
pub const RECORD_HEADER_LEN: usize = 13;
/// Bytes of `Data` either side may send on one stream before the other
/// confirms some with `Credit`. It costs nothing at rest (no buffer is
/// sized by it); 256 KiB keeps one busy stream from waiting on credit (64 KiB
/// cost a third of 1->1 throughput).
pub const WINDOW: u32 = 256 * 1024;

/// A stream's number, chosen by the host and never reused while the VM runs.
pub type StreamId = u64;

const OPEN: u8 = 1;
const DATA: u8 = 2;
const CLOSE: u8 = 3;
const CREDIT: u8 = 4;
const STATS: u8 = 5;
const AUTH: u8 = 6;

/// One record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record<'a> {
    /// Host to guest: a client connected.
    Open(StreamId),
    /// Bytes of the stream, in order.
    Data(StreamId, &'a [u8]),
    /// The sender will send nothing more on the stream. Host to guest: the
    /// client closed its side or failed. Guest to host: send what is queued,
    /// then close the client. Each side sends it once; a side that received
    /// it answers with its own when done (at once, or after the last echo
    /// of a half-closed stream), and the stream is gone when both went.
    Close(StreamId),
    /// This many more bytes of the stream were consumed by the receiver
    /// (host: its client socket took them; guest: its service did), so the
    /// sender may send that many more.
    Credit(StreamId, u32),
    /// Guest to host, now and then: the service's counters ([`ServiceStats`]),
    /// for the operator's metrics. Stream 0; the length counts the bytes.
    Stats(&'a [u8]),
    /// Host to guest: new password and ACL tables for the service, a live
    /// change as `config_blob::write_auth` encodes it (at most
    /// `config_blob::MAX_AUTH_LEN` bytes, so it fits a frame). Stream 0;
    /// the length counts the bytes. The guest checks it as it checks its
    /// boot configuration.
    Auth(&'a [u8]),
}

/// What the guest's service counted, as it reports it in a `Stats` record.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ServiceStats {
    /// PUBLISH packets received from clients.
    pub messages_in: u64,
    /// PUBLISH packets sent to clients.
    pub messages_out: u64,
    /// Not delivered because a queue or a window was full.
    pub messages_dropped: u64,
    /// Refused because memory ran low.
    pub messages_refused: u64,
}

impl ServiceStats {
    /// Encoded length: four u64 LE.
    pub const LEN: usize = 32;

    /// The counters as a `Stats` record carries them.
    pub fn to_bytes(self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        for (i, v) in
            [self.messages_in, self.messages_out, self.messages_dropped, self.messages_refused].into_iter().enumerate()
        {
            out[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// `None` unless `bytes` is exactly one encoding.
    pub fn from_bytes(bytes: &[u8]) -> Option<ServiceStats> {
        if bytes.len() != Self::LEN {
            return None;
        }
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            u64::from_le_bytes(w)
        };
        Some(ServiceStats {
            messages_in: word(0),
            messages_out: word(1),
            messages_dropped: word(2),
            messages_refused: word(3),
        })
    }
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// Shorter than an Ethernet header, or not our EtherType.
    NotStreams,
    /// A record header or its bytes run past the end, at this offset.
    Truncated(usize),
    /// An unknown record kind at this offset.
    UnknownKind(usize, u8),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::NotStreams => f.write_str("not a stream frame"),
            FrameError::Truncated(at) => write!(f, "record at offset {at} runs past the frame"),
            FrameError::UnknownKind(at, kind) => write!(f, "unknown record kind {kind} at offset {at}"),
        }
    }
}

/// Decodes the records of one frame, in order. A bad record ends the
/// iteration with its error; records before it are valid.
pub fn records(frame: &[u8]) -> Result<Records<'_>, FrameError> {
    if frame.len() < ETHERNET_HEADER_LEN || frame[12..14] != ETHERTYPE.to_be_bytes() {
        return Err(FrameError::NotStreams);
    }
    Ok(Records { frame, at: ETHERNET_HEADER_LEN })
}

/// Iterator over a frame's records.
pub struct Records<'a> {
    frame: &'a [u8],
    at: usize,
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<Record<'a>, FrameError>;

    fn next(&mut self) -> Option<Self::Item> {
        let start = self.at;
        let rest = self.frame.get(start..)?;
        if rest.is_empty() {
            return None;
        }
        let Some(header) = rest.get(..RECORD_HEADER_LEN) else {
            self.at = self.frame.len();
            return Some(Err(FrameError::Truncated(start)));
        };
        let kind = header[0];
        let mut id = [0; 8];
        id.copy_from_slice(&header[1..9]);
        let id = StreamId::from_le_bytes(id);
        let mut value = [0; 4];
        value.copy_from_slice(&header[9..13]);
        let value = u32::from_le_bytes(value);
        self.at = start + RECORD_HEADER_LEN;
        let record = match kind {
            OPEN => Record::Open(id),
            CLOSE => Record::Close(id),
            CREDIT => Record::Credit(id, value),
            DATA | STATS | AUTH => {
                let len = value as usize;
                let Some(bytes) = rest.get(RECORD_HEADER_LEN..RECORD_HEADER_LEN + len) else {
                    self.at = self.frame.len();
                    return Some(Err(FrameError::Truncated(start)));
                };
                self.at += len;
                match kind {
                    DATA => Record::Data(id, bytes),
                    STATS => Record::Stats(bytes),
                    _ => Record::Auth(bytes),
                }
            }
            other => {
                self.at = self.frame.len();
                return Some(Err(FrameError::UnknownKind(start, other)));
            }
        };
        Some(Ok(record))
    }
}

/// Builds one frame in a caller's buffer.
pub struct FrameWriter<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl<'a> FrameWriter<'a> {
    /// Starts a frame from `src` to `dst` in `buf` (at least an Ethernet
    /// header plus one record header long, or nothing fits).
    pub fn new(buf: &'a mut [u8], dst: [u8; 6], src: [u8; 6]) -> FrameWriter<'a> {
        let mut writer = FrameWriter { buf, len: 0 };
        if writer.buf.len() >= ETHERNET_HEADER_LEN {
            writer.buf[..6].copy_from_slice(&dst);
            writer.buf[6..12].copy_from_slice(&src);
            writer.buf[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
            writer.len = ETHERNET_HEADER_LEN;
        }
        writer
    }

    /// Continues a frame of which `len` bytes are already written.
    pub fn resume(buf: &'a mut [u8], len: usize) -> FrameWriter<'a> {
        let len = len.min(buf.len());
        FrameWriter { buf, len }
    }

    /// Bytes written so far, Ethernet header included.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no record has been written.
    pub fn is_empty(&self) -> bool {
        self.len <= ETHERNET_HEADER_LEN
    }

    /// Room for `Data` bytes in one more record.
    pub fn data_room(&self) -> usize {
        self.buf.len().saturating_sub(self.len + RECORD_HEADER_LEN).min(u32::MAX as usize)
    }

    fn header(&mut self, kind: u8, id: StreamId, value: u32) -> bool {
        let Some(header) = self.buf.get_mut(self.len..self.len + RECORD_HEADER_LEN) else { return false };
        header[0] = kind;
        header[1..9].copy_from_slice(&id.to_le_bytes());
        header[9..13].copy_from_slice(&value.to_le_bytes());
        self.len += RECORD_HEADER_LEN;
        true
    }

    /// Writes `Open`, `Close`, `Credit`, `Stats` or `Auth` (or a whole
    /// `Data`); false if it does not fit.
    pub fn control(&mut self, record: Record<'_>) -> bool {
        match record {
            Record::Open(id) => self.header(OPEN, id, 0),
            Record::Close(id) => self.header(CLOSE, id, 0),
            Record::Credit(id, n) => self.header(CREDIT, id, n),
            Record::Data(id, bytes) => self.data(id, bytes) == bytes.len(),
            Record::Stats(bytes) | Record::Auth(bytes) => {
                if self.data_room() < bytes.len() {
                    return false;
                }
                let kind = if matches!(record, Record::Stats(_)) { STATS } else { AUTH };
                self.header(kind, 0, len_u32(bytes.len()));
                self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
                self.len += bytes.len();
                true
            }
        }
    }

    /// Writes as many of `bytes` as fit as one `Data` record; returns how
    /// many (0 when there is no room, and for empty `bytes`).
    pub fn data(&mut self, id: StreamId, bytes: &[u8]) -> usize {
        let take = bytes.len().min(self.data_room());
        if take == 0 {
            return 0;
        }
        self.header(DATA, id, len_u32(take));
        self.buf[self.len..self.len + take].copy_from_slice(&bytes[..take]);
        self.len += take;
        take
    }

    /// Reserves room for a `Data` record of up to `max` bytes that the caller
    /// fills in place (for example straight from a socket read); the returned
    /// slice is the room, and [`FrameWriter::commit_data`] records how much
    /// was filled.
    pub fn data_slot(&mut self, max: usize) -> &mut [u8] {
        let take = max.min(self.data_room());
        let start = self.len + RECORD_HEADER_LEN;
        &mut self.buf[start..start + take]
    }

    /// Completes the record begun with [`FrameWriter::data_slot`] with the
    /// first `filled` bytes of the slot (0: no record).
    pub fn commit_data(&mut self, id: StreamId, filled: usize) {
        let filled = filled.min(self.data_room());
        if filled > 0 {
            self.header(DATA, id, len_u32(filled));
            self.len += filled;
        }
    }
}

/// One stream's flow control, kept alike at both ends: the rule of
/// [`WINDOW`] and `Credit` written once.
///
/// Each end sends within the window the other gave it ([`Window::send_room`],
/// [`Window::sent`], [`Window::credited`]), holds the other to the window
/// it gave ([`Window::received`]), and gives credit back for what its reader
/// consumed ([`Window::consumed`]) in halves of the window: one record per
/// half window, and the sender never waits for bytes already consumed (it
/// stops only with a whole window outstanding, half of which is then on its
/// way). Nothing the peer says moves a window past [`WINDOW`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Bytes this end may still send.
    send: u32,
    /// Bytes the peer may still send.
    receive: u32,
    /// Bytes received and consumed, not yet credited back.
    owed: u32,
}

impl Default for Window {
    fn default() -> Self {
        Window { send: WINDOW, receive: WINDOW, owed: 0 }
    }
}

impl Window {
    /// Bytes this end may send now.
    pub fn send_room(&self) -> usize {
        self.send as usize
    }

    /// `n` bytes were sent.
    pub fn sent(&mut self, n: usize) {
        self.send = self.send.saturating_sub(clamp_u32(n));
    }

    /// The peer confirmed `n` more bytes (never past the window, whatever it says).
    pub fn credited(&mut self, n: u32) {
        self.send = self.send.saturating_add(n).min(WINDOW);
    }

    /// `n` bytes arrived from the peer: returns how many of them lay within
    /// the window it was given. Bytes past it break the protocol; the
    /// receiver drops them.
    pub fn received(&mut self, n: usize) -> usize {
        let allowed = clamp_u32(n).min(self.receive);
        self.receive -= allowed;
        allowed as usize
    }

    /// `n` received bytes were consumed (taken by their reader, or
    /// discarded); returns the credit to give back now, if one is due.
    pub fn consumed(&mut self, n: usize) -> Option<u32> {
        self.owed = self.owed.saturating_add(clamp_u32(n));
        if self.owed < WINDOW / 2 {
            return None;
        }
        let credit = core::mem::take(&mut self.owed);
        self.receive = self.receive.saturating_add(credit).min(WINDOW);
        Some(credit)
    }
}

/// A byte count as a u32 (counts above 4 GiB never occur: every count here
/// is below a frame or a window).
fn clamp_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// A `Data` length: never above `data_room()`, which is capped at u32::MAX.
fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use alloc::vec::Vec;

    fn all(frame: &[u8]) -> Vec<Result<Record<'_>, FrameError>> {
        records(frame).unwrap().collect()
    }

    #[test]
    fn records_round_trip_in_order() {
        let mut buf = [0u8; 160];
        let mut w = FrameWriter::new(&mut buf, [1; 6], [2; 6]);
        assert!(w.is_empty());
        assert!(w.control(Record::Open(7)));
        assert_eq!(w.data(7, b"hello"), 5);
        assert!(w.control(Record::Credit(9, 4096)));
        assert!(w.control(Record::Close(u64::MAX)));
        let stats = ServiceStats { messages_in: 1, messages_out: 2, messages_dropped: 3, messages_refused: 4 };
        assert!(w.control(Record::Stats(&stats.to_bytes())));
        assert!(w.control(Record::Auth(b"\x01auth")));
        let len = w.len();
        assert_eq!(
            all(&buf[..len]),
            vec![
                Ok(Record::Open(7)),
                Ok(Record::Data(7, b"hello")),
                Ok(Record::Credit(9, 4096)),
                Ok(Record::Close(u64::MAX)),
                Ok(Record::Stats(&stats.to_bytes())),
                Ok(Record::Auth(b"\x01auth"))
            ]
        );
        assert_eq!(ServiceStats::from_bytes(&stats.to_bytes()), Some(stats));
        assert_eq!(ServiceStats::from_bytes(&[0; 31]), None);
        assert_eq!(&buf[..6], &[1; 6]);
    }

    #[test]
    fn data_takes_what_fits_and_control_refuses_when_full() {
        let mut buf = [0u8; ETHERNET_HEADER_LEN + RECORD_HEADER_LEN + 3];
        let mut w = FrameWriter::new(&mut buf, [0; 6], [0; 6]);
        assert_eq!(w.data(1, b"abcdef"), 3);
        assert_eq!(w.data(1, b"def"), 0);
        assert!(!w.control(Record::Close(1)));
        assert!(!w.control(Record::Auth(b"too long for the room left")));
        let len = w.len();
        assert_eq!(all(&buf[..len]), vec![Ok(Record::Data(1, b"abc"))]);
    }

    #[test]
    fn a_slot_filled_in_place_becomes_a_record() {
        let mut buf = [0u8; 64];
        let mut w = FrameWriter::new(&mut buf, [0; 6], [0; 6]);
        let slot = w.data_slot(4);
        assert_eq!(slot.len(), 4);
        slot[..2].copy_from_slice(b"hi");
        w.commit_data(3, 2);
        w.data_slot(10);
        w.commit_data(4, 0);
        let len = w.len();
        let mut w = FrameWriter::resume(&mut buf, len);
        assert!(w.control(Record::Close(3)));
        let len = w.len();
        assert_eq!(all(&buf[..len]), vec![Ok(Record::Data(3, b"hi")), Ok(Record::Close(3))]);
    }

    #[test]
    fn a_window_stops_the_sender_until_credit_comes_and_never_grows_past_its_size() {
        let mut w = Window::default();
        assert_eq!(w.send_room(), WINDOW as usize);
        w.sent(WINDOW as usize - 10);
        assert_eq!(w.send_room(), 10);
        w.sent(20);
        assert_eq!(w.send_room(), 0);
        w.credited(100);
        assert_eq!(w.send_room(), 100);
        // A peer that credits more than it was sent gets a window, no more.
        w.credited(u32::MAX);
        assert_eq!(w.send_room(), WINDOW as usize);
    }

    #[test]
    fn a_receiver_credits_in_halves_and_drops_what_lies_past_the_window() {
        let half = (WINDOW / 2) as usize;
        let mut w = Window::default();
        assert_eq!(w.received(half - 1), half - 1);
        assert_eq!(w.consumed(half - 1), None);
        assert_eq!(w.received(half), half);
        // One byte short of the whole window, and more than that is sent.
        assert_eq!(w.received(10), 1);
        assert_eq!(w.received(10), 0);
        // The first half consumed: its credit reopens that much.
        assert_eq!(w.consumed(1), Some(WINDOW / 2));
        assert_eq!(w.received(WINDOW as usize), half);
        assert_eq!(w.consumed(half + 1), Some(WINDOW / 2 + 1));
        assert_eq!(w.consumed(0), None);
    }

    #[test]
    fn hostile_frames_are_refused_with_the_offset() {
        assert_eq!(records(&[0u8; 13]).err(), Some(FrameError::NotStreams));
        let mut frame = vec![0u8; 14];
        frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        assert_eq!(records(&frame).err(), Some(FrameError::NotStreams));
        frame[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
        assert!(all(&frame).is_empty());
        // A header cut short.
        let mut cut = frame.clone();
        cut.extend_from_slice(&[CLOSE, 1, 2]);
        assert_eq!(all(&cut), vec![Err(FrameError::Truncated(14))]);
        // A length near 4 GiB.
        let mut long = frame.clone();
        long.push(DATA);
        long.extend_from_slice(&1u64.to_le_bytes());
        long.extend_from_slice(&u32::MAX.to_le_bytes());
        long.extend_from_slice(b"xy");
        assert_eq!(all(&long), vec![Err(FrameError::Truncated(14))]);
        // An unknown kind after a good record.
        let mut unknown = frame.clone();
        unknown.push(OPEN);
        unknown.extend_from_slice(&[0; 12]);
        unknown.push(0xEE);
        unknown.extend_from_slice(&[0; 12]);
        assert_eq!(all(&unknown), vec![Ok(Record::Open(0)), Err(FrameError::UnknownKind(27, 0xEE))]);
    }
}
