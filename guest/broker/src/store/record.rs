//! The records of the state log: one per change of durable broker state,
//! and the same records, one per live item, in a compacted snapshot.
//!
//! Owns the encoding of each record's body (framing and checksums are
//! [`super::log`]'s). Messages, wills and subscriptions are stored as the
//! MQTT 5 packets that carry them, so one checked codec reads both the
//! network and the disk. Decoding treats the bytes as untrusted: a record
//! that does not parse is an error, never a panic.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;

use crate::packet::{self, Packet, Publish, QoS, Subscribe, SubscriptionOptions, Version, Will};
use crate::properties::Properties;
use crate::wire::{DecodeError, Reader, Writer};

/// Record kinds (the first byte of a body). Numbers are part of the format.
mod kind {
    pub const RETAIN: u8 = 1;
    pub const RETAIN_GONE: u8 = 2;
    pub const SESSION: u8 = 3;
    pub const SESSION_GONE: u8 = 4;
    pub const SUBSCRIBE: u8 = 5;
    pub const UNSUBSCRIBE: u8 = 6;
    pub const MESSAGE: u8 = 7;
    pub const RELEASED: u8 = 8;
    pub const DONE: u8 = 9;
    pub const INCOMING: u8 = 10;
    pub const INCOMING_DONE: u8 = 11;
}

/// A durable session's header: what a CONNECT set and a DISCONNECT may change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    pub client_id: String,
    pub version: Version,
    /// Seconds the session outlives its connection; u32::MAX: forever.
    pub expiry: u32,
    /// When it lost its connection (Unix ms), so its expiry and its will's
    /// delay count from then across restarts; `None` while connected.
    pub disconnected_at: Option<u64>,
    pub username: Option<String>,
    pub will: Option<Will>,
}

/// One change of durable state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A retained message set for its topic; `expires_at` in broker time (ms).
    Retain {
        publish: Publish,
        expires_at: Option<u64>,
    },
    RetainGone {
        topic: String,
    },
    /// A durable session created or changed (boxed: its will makes it the
    /// largest record by far).
    Session(Box<SessionRecord>),
    /// A session ended: everything under its client id is gone.
    SessionGone {
        client_id: String,
    },
    Subscribe {
        client_id: String,
        filter: String,
        options: SubscriptionOptions,
        identifier: Option<u32>,
    },
    Unsubscribe {
        client_id: String,
        filter: String,
    },
    /// A QoS 1/2 message queued for a durable session, numbered `seq`.
    Message {
        client_id: String,
        seq: u64,
        expires_at: Option<u64>,
        publish: Publish,
    },
    /// The subscriber answered PUBREC: PUBREL is owed, not the message.
    Released {
        client_id: String,
        seq: u64,
    },
    /// The message is delivered (or dropped): forget it.
    Done {
        client_id: String,
        seq: u64,
    },
    /// An incoming QoS 2 message was accepted under `packet_id`.
    Incoming {
        client_id: String,
        packet_id: u16,
    },
    /// Its PUBREL arrived: the id is free again.
    IncomingDone {
        client_id: String,
        packet_id: u16,
    },
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn get_u64(r: &mut Reader) -> Result<u64, DecodeError> {
    let b = r.take(8)?;
    Ok(u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
}

/// An embedded MQTT 5 packet: u32 length, then the packet.
fn put_packet(out: &mut Vec<u8>, packet: &Packet) {
    let mut bytes = Vec::new();
    packet::encode(packet, Version::V5, &mut bytes);
    out.put_u32(u32::try_from(bytes.len()).unwrap_or(u32::MAX));
    out.extend_from_slice(&bytes);
}

fn get_packet(r: &mut Reader, server_side: bool) -> Result<Packet, DecodeError> {
    let len = r.u32()? as usize;
    let bytes = r.take(len)?;
    let frame = packet::frame(bytes, bytes.len())?.ok_or(DecodeError::Truncated)?;
    if frame.len != bytes.len() {
        return Err(DecodeError::Malformed("record packet length"));
    }
    if server_side {
        packet::decode_from_server(frame, bytes, Version::V5)
    } else {
        packet::decode(frame, bytes, Version::V5)
    }
}

/// Messages are stored with packet id 1 when they have one: the real id
/// is assigned at delivery.
fn put_publish(out: &mut Vec<u8>, p: &Publish) {
    let mut p = p.clone();
    p.packet_id = (p.qos != QoS::AtMostOnce).then_some(1);
    if p.properties.topic_alias.is_some() {
        p.properties.make_mut().topic_alias = None;
    }
    put_packet(out, &Packet::Publish(p));
}

fn get_publish(r: &mut Reader) -> Result<Publish, DecodeError> {
    match get_packet(r, true)? {
        Packet::Publish(p) => Ok(p),
        _ => Err(DecodeError::Malformed("record: expected a PUBLISH")),
    }
}

/// A time (Unix ms), or none: `u64::MAX`.
fn put_time(out: &mut Vec<u8>, at: Option<u64>) {
    put_u64(out, at.unwrap_or(u64::MAX));
}

fn get_time(r: &mut Reader) -> Result<Option<u64>, DecodeError> {
    get_u64(r).map(|t| (t != u64::MAX).then_some(t))
}

fn put_option_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => {
            out.put_u8(1);
            out.put_str(s);
        }
        None => out.put_u8(0),
    }
}

fn get_option_string(r: &mut Reader) -> Result<Option<String>, DecodeError> {
    match r.u8()? {
        0 => Ok(None),
        1 => r.owned_string().map(Some),
        _ => Err(DecodeError::Malformed("record: bad option tag")),
    }
}

fn version_byte(v: Version) -> u8 {
    match v {
        Version::V3_1 => 3,
        Version::V3_1_1 => 4,
        Version::V5 => 5,
    }
}

impl Record {
    /// Whether output that follows this change must wait until it is on
    /// disk. Only a delivery's end need not: if it is lost, a QoS 1 message
    /// comes again (allowed), and a QoS 2 one was already released, so
    /// PUBREL comes again, not the message. Everything else guards an
    /// acknowledgement: PUBACK/PUBREC of a message, SUBACK, a resumed
    /// session's CONNACK, PUBREL after PUBREC (or the subscriber would get
    /// the message twice), PUBCOMP after PUBREL (or a reused id would be
    /// taken for a duplicate and its message lost).
    pub fn gates_output(&self) -> bool {
        !matches!(self, Record::Done { .. })
    }

    /// Appends the record's body to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Record::Retain { publish, expires_at } => {
                out.put_u8(kind::RETAIN);
                put_time(out, *expires_at);
                put_publish(out, publish);
            }
            Record::RetainGone { topic } => {
                out.put_u8(kind::RETAIN_GONE);
                out.put_str(topic);
            }
            Record::Session(s) => {
                out.put_u8(kind::SESSION);
                out.put_str(&s.client_id);
                out.put_u8(version_byte(s.version));
                out.put_u32(s.expiry);
                put_time(out, s.disconnected_at);
                put_option_str(out, s.username.as_deref());
                match &s.will {
                    Some(w) => {
                        out.put_u8(1);
                        out.put_u32(w.properties.will_delay_interval.unwrap_or(0));
                        let mut properties = w.properties.clone();
                        properties.will_delay_interval = None;
                        let publish = Publish {
                            dup: false,
                            qos: w.qos,
                            retain: w.retain,
                            topic: w.topic.as_str().into(),
                            packet_id: None,
                            properties: properties.into(),
                            payload: w.payload.as_slice().into(),
                        };
                        put_publish(out, &publish);
                    }
                    None => out.put_u8(0),
                }
            }
            Record::SessionGone { client_id } => {
                out.put_u8(kind::SESSION_GONE);
                out.put_str(client_id);
            }
            Record::Subscribe { client_id, filter, options, identifier } => {
                out.put_u8(kind::SUBSCRIBE);
                out.put_str(client_id);
                let properties = Properties {
                    subscription_identifiers: identifier.iter().copied().collect(),
                    ..Properties::default()
                };
                let s = Subscribe { packet_id: 1, properties, filters: alloc::vec![(filter.clone(), *options)] };
                put_packet(out, &Packet::Subscribe(s));
            }
            Record::Unsubscribe { client_id, filter } => {
                out.put_u8(kind::UNSUBSCRIBE);
                out.put_str(client_id);
                out.put_str(filter);
            }
            Record::Message { client_id, seq, expires_at, publish } => {
                out.put_u8(kind::MESSAGE);
                out.put_str(client_id);
                put_u64(out, *seq);
                put_time(out, *expires_at);
                put_publish(out, publish);
            }
            Record::Released { client_id, seq } | Record::Done { client_id, seq } => {
                out.put_u8(if matches!(self, Record::Released { .. }) { kind::RELEASED } else { kind::DONE });
                out.put_str(client_id);
                put_u64(out, *seq);
            }
            Record::Incoming { client_id, packet_id } | Record::IncomingDone { client_id, packet_id } => {
                out.put_u8(if matches!(self, Record::Incoming { .. }) { kind::INCOMING } else { kind::INCOMING_DONE });
                out.put_str(client_id);
                out.put_u16(*packet_id);
            }
        }
    }

    /// Decodes one record body (all of `body`).
    pub fn decode(body: &[u8]) -> Result<Record, DecodeError> {
        let mut r = Reader::new(body);
        let record = match r.u8()? {
            kind::RETAIN => {
                let expires_at = get_time(&mut r)?;
                Record::Retain { expires_at, publish: get_publish(&mut r)? }
            }
            kind::RETAIN_GONE => Record::RetainGone { topic: r.owned_string()? },
            kind::SESSION => {
                let client_id = r.owned_string()?;
                let version = match r.u8()? {
                    3 => Version::V3_1,
                    4 => Version::V3_1_1,
                    5 => Version::V5,
                    _ => return Err(DecodeError::Malformed("record: protocol version")),
                };
                let expiry = r.u32()?;
                let disconnected_at = get_time(&mut r)?;
                let username = get_option_string(&mut r)?;
                let will = match r.u8()? {
                    0 => None,
                    1 => {
                        let delay = r.u32()?;
                        let p = get_publish(&mut r)?;
                        let mut properties = p.properties.into_inner();
                        properties.will_delay_interval = (delay > 0).then_some(delay);
                        Some(Will {
                            topic: String::from(&*p.topic),
                            payload: p.payload.to_vec(),
                            qos: p.qos,
                            retain: p.retain,
                            properties,
                        })
                    }
                    _ => return Err(DecodeError::Malformed("record: bad will tag")),
                };
                Record::Session(Box::new(SessionRecord { client_id, version, expiry, disconnected_at, username, will }))
            }
            kind::SESSION_GONE => Record::SessionGone { client_id: r.owned_string()? },
            kind::SUBSCRIBE => {
                let client_id = r.owned_string()?;
                let Packet::Subscribe(mut s) = get_packet(&mut r, false)? else {
                    return Err(DecodeError::Malformed("record: expected a SUBSCRIBE"));
                };
                let (filter, options) = s.filters.pop().ok_or(DecodeError::Malformed("record: no filter"))?;
                let identifier = s.properties.subscription_identifiers.first().copied();
                Record::Subscribe { client_id, filter, options, identifier }
            }
            kind::UNSUBSCRIBE => Record::Unsubscribe { client_id: r.owned_string()?, filter: r.owned_string()? },
            kind::MESSAGE => {
                let client_id = r.owned_string()?;
                let seq = get_u64(&mut r)?;
                let expires_at = get_time(&mut r)?;
                Record::Message { client_id, seq, expires_at, publish: get_publish(&mut r)? }
            }
            kind::RELEASED => Record::Released { client_id: r.owned_string()?, seq: get_u64(&mut r)? },
            kind::DONE => Record::Done { client_id: r.owned_string()?, seq: get_u64(&mut r)? },
            kind::INCOMING => Record::Incoming { client_id: r.owned_string()?, packet_id: r.u16()? },
            kind::INCOMING_DONE => Record::IncomingDone { client_id: r.owned_string()?, packet_id: r.u16()? },
            _ => return Err(DecodeError::Malformed("record: unknown kind")),
        };
        if !r.is_empty() {
            return Err(DecodeError::Malformed("record: trailing bytes"));
        }
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::Payload;

    fn publish(qos: QoS) -> Publish {
        Publish {
            dup: false,
            qos,
            retain: true,
            topic: "a/b".into(),
            packet_id: (qos != QoS::AtMostOnce).then_some(1),
            properties: Properties { message_expiry_interval: Some(60), ..Properties::default() }.into(),
            payload: Payload::from(&b"hello"[..]),
        }
    }

    #[test]
    fn every_kind_round_trips() {
        let will = Will {
            topic: "will/t".into(),
            payload: b"bye".to_vec(),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Properties { will_delay_interval: Some(5), ..Properties::default() },
        };
        let options = SubscriptionOptions {
            qos: QoS::ExactlyOnce,
            no_local: true,
            retain_as_published: true,
            retain_handling: 2,
        };
        let c = || String::from("client-1");
        let records = [
            Record::Retain { publish: publish(QoS::AtLeastOnce), expires_at: Some(123) },
            Record::Retain { publish: publish(QoS::AtMostOnce), expires_at: None },
            Record::RetainGone { topic: "a/b".into() },
            Record::Session(Box::new(SessionRecord {
                client_id: c(),
                version: Version::V5,
                expiry: u32::MAX,
                disconnected_at: None,
                username: Some("u".into()),
                will: Some(will),
            })),
            Record::Session(Box::new(SessionRecord {
                client_id: c(),
                version: Version::V3_1_1,
                expiry: 7,
                disconnected_at: Some(1_700_000_000_000),
                username: None,
                will: None,
            })),
            Record::SessionGone { client_id: c() },
            Record::Subscribe { client_id: c(), filter: "$share/g/x/#".into(), options, identifier: Some(9) },
            Record::Unsubscribe { client_id: c(), filter: "x/#".into() },
            Record::Message { client_id: c(), seq: 1 << 40, expires_at: None, publish: publish(QoS::ExactlyOnce) },
            Record::Released { client_id: c(), seq: 3 },
            Record::Done { client_id: c(), seq: 4 },
            Record::Incoming { client_id: c(), packet_id: 65535 },
            Record::IncomingDone { client_id: c(), packet_id: 1 },
        ];
        for record in records {
            let mut body = Vec::new();
            record.encode(&mut body);
            assert_eq!(Record::decode(&body), Ok(record.clone()), "{record:?}");
            // Every cut of a body is refused, never misread.
            for cut in 0..body.len() {
                assert!(Record::decode(&body[..cut]).is_err(), "{record:?} cut at {cut}");
            }
        }
    }

    #[test]
    fn a_session_record_keeps_when_its_connection_was_lost() {
        let record = |disconnected_at| {
            Record::Session(Box::new(SessionRecord {
                client_id: "c".into(),
                version: Version::V5,
                expiry: 60,
                disconnected_at,
                username: None,
                will: None,
            }))
        };
        let mut body = Vec::new();
        record(Some(0x0102_0304_0506_0708)).encode(&mut body);
        // Kind, client id, level, expiry, lost connection at (Unix ms), no
        // user name, no will.
        let expected = [3, 0, 1, b'c', 5, 0, 0, 0, 60, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0];
        assert_eq!(body, expected);
        body.clear();
        record(None).encode(&mut body);
        assert_eq!(body[9..17], [0xff; 8], "still connected: none");
        assert_eq!(Record::decode(&body), Ok(record(None)));
    }

    #[test]
    fn unknown_kinds_and_trailing_bytes_are_refused() {
        assert!(Record::decode(&[0]).is_err());
        assert!(Record::decode(&[200, 1, 2]).is_err());
        let mut body = Vec::new();
        Record::Done { client_id: "c".into(), seq: 1 }.encode(&mut body);
        body.push(0);
        assert!(Record::decode(&body).is_err());
    }
}
