//! A connection's encoded output waiting for the runner: small packets in
//! one growing buffer (so what one pass produces for a client leaves in as
//! few writes as possible), and large payloads as shared references to the
//! one copy of the message that every subscriber and the retained store
//! hold, never copied per connection.
//!
//! Owns the order of the bytes and what has been taken. Frees what was
//! taken at once: an idle connection holds no buffer.

use alloc::collections::VecDeque;
use alloc::vec::Vec;

use crate::packet::{self, Packet, Payload, Version};

/// Payloads at least this long are referenced, not copied.
const SHARE_FROM: usize = 4096;

/// Taken bytes at the front of the tail past which they are dropped (once
/// they are also at least half of it): see [`Output::consume`].
const COMPACT_FROM: usize = 16 * 1024;

enum Segment {
    Bytes(Vec<u8>),
    Shared(Payload),
}

impl Segment {
    fn as_slice(&self) -> &[u8] {
        match self {
            Segment::Bytes(bytes) => bytes,
            Segment::Shared(bytes) => bytes,
        }
    }
}

#[derive(Default)]
pub(super) struct Output {
    /// Complete segments, oldest first.
    segments: VecDeque<Segment>,
    /// Small packets after the last segment, still growing.
    tail: Vec<u8>,
    /// Bytes already taken of the front (the first segment, or the tail
    /// when there is none).
    taken: usize,
    /// Bytes not yet taken, all together.
    len: usize,
}

impl Output {
    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `packet` encoded for `version`.
    pub(super) fn push(&mut self, packet: &Packet, version: Version) {
        let before = self.tail.len();
        match packet {
            Packet::Publish(p) if p.payload.len() >= SHARE_FROM => {
                packet::encode_publish_head(p, version, &mut self.tail);
                self.len += self.tail.len() - before + p.payload.len();
                let head = core::mem::take(&mut self.tail);
                self.segments.push_back(Segment::Bytes(head));
                self.segments.push_back(Segment::Shared(p.payload.clone()));
            }
            _ => {
                packet::encode(packet, version, &mut self.tail);
                self.len += self.tail.len() - before;
            }
        }
    }

    /// The next bytes to send, in order (empty when there are none).
    pub(super) fn front(&self) -> &[u8] {
        let front = self.segments.front().map_or(&self.tail[..], Segment::as_slice);
        &front[self.taken..]
    }

    /// The runner took `n` bytes of [`Output::front`].
    pub(super) fn consume(&mut self, n: usize) {
        let n = n.min(self.front().len());
        self.taken += n;
        self.len -= n;
        match self.segments.front() {
            Some(front) if self.taken == front.as_slice().len() => {
                self.segments.pop_front();
                self.taken = 0;
            }
            None if self.taken == self.tail.len() => {
                // All sent: give the buffer back.
                self.tail = Vec::new();
                self.taken = 0;
            }
            None if self.taken >= COMPACT_FROM && self.taken * 2 >= self.tail.len() => {
                // A consumer that keeps up only in part (a window at a
                // time) never empties the tail while the broker refills
                // it: without this, the tail would keep every byte ever
                // sent on the connection and grow until the heap ran out.
                // Moving the untaken bytes (no more than were taken) keeps
                // the tail within twice its untaken bytes, amortized O(1).
                self.tail.drain(..self.taken);
                self.taken = 0;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{Publish, QoS};
    use alloc::sync::Arc;
    use alloc::vec;

    fn publish(payload: &[u8]) -> Packet {
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: Arc::from("t"),
            packet_id: None,
            properties: Default::default(),
            payload: Payload::from(payload),
        })
    }

    fn drain(out: &mut Output, step: usize) -> Vec<u8> {
        let mut all = Vec::new();
        while !out.is_empty() {
            let front = out.front();
            let n = front.len().min(step);
            all.extend_from_slice(&front[..n]);
            out.consume(n);
        }
        all
    }

    #[test]
    fn bytes_come_out_as_encoded_and_large_payloads_are_shared() {
        let big = vec![7u8; SHARE_FROM];
        let mut expected = Vec::new();
        let mut out = Output::default();
        for packet in [Packet::Pingresp, publish(b"small"), publish(&big), Packet::Pingresp] {
            packet::encode(&packet, Version::V3_1_1, &mut expected);
            out.push(&packet, Version::V3_1_1);
        }
        assert_eq!(out.len(), expected.len());
        // Two small packets and a head in one buffer, the shared payload,
        // then the last packet growing in the tail.
        assert_eq!(out.segments.len(), 2);
        assert!(matches!(out.segments[1], Segment::Shared(_)));
        assert_eq!(drain(&mut out, 1000), expected);
        assert!(out.segments.is_empty() && out.front().is_empty());
        assert_eq!(out.tail.capacity(), 0, "an emptied output keeps no buffer");
    }

    #[test]
    fn a_consumer_that_never_catches_up_holds_no_more_than_it_is_owed() {
        // The broker refills the output whenever its untaken bytes fall
        // below a bound; the consumer takes part of them each time. The
        // tail must not keep what was taken.
        let mut expected = Vec::new();
        let mut got = Vec::new();
        let mut out = Output::default();
        let mut most = 0;
        for _ in 0..20_000 {
            while out.len() < 8 * 1024 {
                packet::encode(&publish(&[5u8; 100]), Version::V3_1_1, &mut expected);
                out.push(&publish(&[5u8; 100]), Version::V3_1_1);
            }
            let n = out.front().len().min(3000);
            got.extend_from_slice(&out.front()[..n]);
            out.consume(n);
            most = most.max(out.tail.capacity());
        }
        assert!(expected.len() > 50 << 20, "{} bytes went through", expected.len());
        assert!(most <= 64 * 1024, "the tail grew to {most} bytes");
        got.extend(drain(&mut out, 1000));
        assert_eq!(got, expected);
    }

    #[test]
    fn partial_takes_keep_the_order() {
        let mut expected = Vec::new();
        let mut out = Output::default();
        for payload in [&b"a"[..], &[1u8; 5000][..], &b"b"[..]] {
            packet::encode(&publish(payload), Version::V5, &mut expected);
            out.push(&publish(payload), Version::V5);
        }
        assert_eq!(drain(&mut out, 3), expected);
    }
}
