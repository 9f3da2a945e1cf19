//! MQTT control packets (MQTT 3.1.1 section 3, MQTT 5.0 section 3): framing,
//! decoding and encoding, for protocol levels 3 (3.1), 4 (3.1.1) and 5 (5.0).
//!
//! Owns the packet types. Frame before decode: [`frame`] reads the fixed
//! header without consuming input, says how many bytes are still needed, and
//! refuses an oversize packet before its body is buffered. Decoding checks
//! reserved flags and every field; encoding never fails and never writes half
//! a packet. The client's side (encoding what a client sends, decoding what
//! a server sends), which the broker itself never needs, is in its
//! `client` module.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;

use crate::properties::{Context, MessageProperties, Properties};
use crate::wire::{DecodeError, MAX_REMAINING_LENGTH, Reader, Writer, var_int_len};

mod client;

pub use client::decode_from_server;

/// Protocol levels (CONNECT byte 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    V3_1 = 3,
    V3_1_1 = 4,
    V5 = 5,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum QoS {
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    pub fn from_bits(bits: u8) -> Option<QoS> {
        match bits {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

/// An application message as it travels (topic, payload, flags, properties).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    /// Empty when a v5 client sent only a topic alias.
    pub topic: Arc<str>,
    /// Present iff `qos > 0`.
    pub packet_id: Option<u16>,
    pub properties: MessageProperties,
    pub payload: Payload,
}

/// A message's payload: one copy, shared by every holder (subscribers'
/// queues, the retained store, connection output). A large one is the tail
/// of the very buffer its PUBLISH arrived in ([`decode_owned`]).
#[derive(Clone, Default)]
pub struct Payload {
    bytes: Arc<Vec<u8>>,
    start: usize,
}

impl Payload {
    /// The bytes of `buf` from `start` on, without copying them.
    pub fn tail_of(buf: Vec<u8>, start: usize) -> Payload {
        let start = start.min(buf.len());
        Payload { bytes: Arc::new(buf), start }
    }
}

impl core::ops::Deref for Payload {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.bytes[self.start..]
    }
}

impl From<&[u8]> for Payload {
    fn from(bytes: &[u8]) -> Payload {
        Payload::tail_of(bytes.to_vec(), 0)
    }
}

impl From<Vec<u8>> for Payload {
    fn from(bytes: Vec<u8>) -> Payload {
        Payload::tail_of(bytes, 0)
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Payload) -> bool {
        **self == **other
    }
}

impl Eq for Payload {}

impl core::fmt::Debug for Payload {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.get(..32) {
            Some(head) => write!(f, "{head:?}.. ({} bytes)", self.len()),
            None => write!(f, "{:?}", &**self),
        }
    }
}

/// The will message from CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: QoS,
    pub retain: bool,
    pub properties: Properties,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub version: Version,
    pub clean_start: bool,
    pub keep_alive: u16,
    pub properties: Properties,
    pub client_id: String,
    pub will: Option<Will>,
    pub username: Option<String>,
    pub password: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connack {
    pub session_present: bool,
    /// v5 reason code; for 3.x one of the 0..=5 return codes.
    pub code: u8,
    pub properties: Properties,
}

/// Subscription options (v5 3.8.3.1; for 3.x only the QoS is meaningful).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriptionOptions {
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    /// 0: send retained on subscribe; 1: only if new; 2: never.
    pub retain_handling: u8,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    pub packet_id: u16,
    pub properties: Properties,
    pub filters: Vec<(String, SubscriptionOptions)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    pub packet_id: u16,
    pub properties: Properties,
    pub filters: Vec<String>,
}

/// PUBACK, PUBREC, PUBREL, PUBCOMP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub packet_id: u16,
    pub code: u8,
    pub properties: Properties,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Connect(Box<Connect>),
    Connack(Connack),
    Publish(Publish),
    Puback(Ack),
    Pubrec(Ack),
    Pubrel(Ack),
    Pubcomp(Ack),
    Subscribe(Subscribe),
    Suback { packet_id: u16, properties: Properties, codes: Vec<u8> },
    Unsubscribe(Unsubscribe),
    Unsuback { packet_id: u16, properties: Properties, codes: Vec<u8> },
    Pingreq,
    Pingresp,
    Disconnect { code: u8, properties: Properties },
    Auth { code: u8, properties: Properties },
}

const CONNECT: u8 = 1;
const CONNACK: u8 = 2;
const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const PUBREC: u8 = 5;
const PUBREL: u8 = 6;
const PUBCOMP: u8 = 7;
const SUBSCRIBE: u8 = 8;
const SUBACK: u8 = 9;
const UNSUBSCRIBE: u8 = 10;
const UNSUBACK: u8 = 11;
const PINGREQ: u8 = 12;
const PINGRESP: u8 = 13;
const DISCONNECT: u8 = 14;
const AUTH: u8 = 15;

/// A complete packet found at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// The first byte (type and flags).
    pub header: u8,
    /// Offset of the body (after the remaining length).
    pub body_start: usize,
    /// Total length of the packet, header included.
    pub len: usize,
}

/// Looks for a complete packet at the start of `buf`. `Ok(None)`: more bytes
/// are needed. A packet longer than `max_packet_size` is refused as soon as
/// its length is known, before its body arrives.
pub fn frame(buf: &[u8], max_packet_size: usize) -> Result<Option<Frame>, DecodeError> {
    let Some((body_start, len)) = announced(buf)? else { return Ok(None) };
    if len > max_packet_size {
        return Err(DecodeError::TooLarge);
    }
    if buf.len() < len {
        return Ok(None);
    }
    Ok(Some(Frame { header: buf[0], body_start, len }))
}

/// The total length of the packet at the start of `buf` once its fixed
/// header is complete, whether or not its body has arrived (so a receiver
/// can make room for it once, not by doubling).
pub fn announced_len(buf: &[u8]) -> Option<usize> {
    announced(buf).ok().flatten().map(|(_, len)| len)
}

/// Offset of the body and total length, once the remaining length is read.
fn announced(buf: &[u8]) -> Result<Option<(usize, usize)>, DecodeError> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut remaining = 0usize;
    let mut at = 1;
    loop {
        let Some(&byte) = buf.get(at) else { return Ok(None) };
        remaining |= usize::from(byte & 0x7f) << (7 * (at - 1));
        at += 1;
        if byte & 0x80 == 0 {
            break;
        }
        if at == 5 {
            return Err(DecodeError::BadVarInt);
        }
    }
    debug_assert!(remaining <= MAX_REMAINING_LENGTH);
    Ok(Some((at, at + remaining)))
}

fn check_flags(header: u8, expected: u8) -> Result<(), DecodeError> {
    if header & 0x0f != expected {
        return Err(DecodeError::Malformed("reserved fixed-header flags"));
    }
    Ok(())
}

fn packet_id(r: &mut Reader) -> Result<u16, DecodeError> {
    let id = r.u16()?;
    if id == 0 {
        return Err(DecodeError::Malformed("packet identifier 0"));
    }
    Ok(id)
}

/// Reads a v5 property list, or nothing before v5.
fn read_properties(r: &mut Reader, version: Version, context: Context) -> Result<Properties, DecodeError> {
    if version == Version::V5 { Properties::decode(r, context) } else { Ok(Properties::default()) }
}

fn decode_connect(r: &mut Reader) -> Result<Connect, DecodeError> {
    let name = r.string()?;
    let level = r.u8()?;
    let version = match (name, level) {
        ("MQIsdp", 3) => Version::V3_1,
        ("MQTT", 4) => Version::V3_1_1,
        ("MQTT", 5) => Version::V5,
        ("MQTT" | "MQIsdp", _) => return Err(DecodeError::UnsupportedProtocol),
        _ => return Err(DecodeError::Protocol("unknown protocol name")),
    };
    let flags = r.u8()?;
    if flags & 0x01 != 0 {
        return Err(DecodeError::Malformed("reserved connect flag"));
    }
    let keep_alive = r.u16()?;
    let properties = read_properties(r, version, Context::Connect)?;
    let client_id = r.owned_string()?;
    let will_flag = flags & 0x04 != 0;
    let will_qos = QoS::from_bits((flags >> 3) & 0x03).ok_or(DecodeError::Malformed("will QoS 3"))?;
    let will_retain = flags & 0x20 != 0;
    if !will_flag && (will_qos != QoS::AtMostOnce || will_retain) {
        return Err(DecodeError::Malformed("will QoS/retain without a will"));
    }
    let will = if will_flag {
        let properties = read_properties(r, version, Context::Will)?;
        let topic = r.owned_string()?;
        let payload = r.binary()?.to_vec();
        Some(Will { topic, payload, qos: will_qos, retain: will_retain, properties })
    } else {
        None
    };
    let has_username = flags & 0x80 != 0;
    let has_password = flags & 0x40 != 0;
    if version != Version::V5 && has_password && !has_username {
        return Err(DecodeError::Malformed("password without user name"));
    }
    let username = if has_username { Some(r.owned_string()?) } else { None };
    let password = if has_password { Some(r.binary()?.to_vec()) } else { None };
    if !r.is_empty() {
        return Err(DecodeError::Malformed("bytes after CONNECT payload"));
    }
    Ok(Connect { version, clean_start: flags & 0x02 != 0, keep_alive, properties, client_id, will, username, password })
}

fn decode_ack(r: &mut Reader, version: Version) -> Result<Ack, DecodeError> {
    let packet_id = packet_id(r)?;
    let (code, properties) = if version == Version::V5 && !r.is_empty() {
        let code = r.u8()?;
        let properties = if r.is_empty() { Properties::default() } else { Properties::decode(r, Context::Ack)? };
        (code, properties)
    } else {
        (0, Properties::default())
    };
    if !r.is_empty() {
        return Err(DecodeError::Malformed("bytes after acknowledgement"));
    }
    Ok(Ack { packet_id, code, properties })
}

fn decode_publish(header: u8, r: &mut Reader, version: Version) -> Result<Publish, DecodeError> {
    let mut publish = decode_publish_head(header, r, version)?;
    publish.payload = Payload::from(r.rest());
    Ok(publish)
}

/// Decodes the complete packet `frame` that is all of `buf`, which it takes:
/// a PUBLISH's payload stays where it is (no copy); anything else decodes
/// as [`decode`] does.
pub fn decode_owned(frame: Frame, buf: Vec<u8>, version: Version) -> Result<Packet, DecodeError> {
    if frame.header >> 4 != PUBLISH || frame.len != buf.len() {
        return decode(frame, &buf, version);
    }
    let mut r = Reader::new(&buf[frame.body_start..frame.len]);
    let mut publish = decode_publish_head(frame.header, &mut r, version)?;
    let payload_start = frame.len - r.remaining();
    publish.payload = Payload::tail_of(buf, payload_start);
    Ok(Packet::Publish(publish))
}

/// A PUBLISH up to its payload; the payload is left empty.
fn decode_publish_head(header: u8, r: &mut Reader, version: Version) -> Result<Publish, DecodeError> {
    let qos = QoS::from_bits((header >> 1) & 0x03).ok_or(DecodeError::Malformed("PUBLISH QoS 3"))?;
    let dup = header & 0x08 != 0;
    if dup && qos == QoS::AtMostOnce {
        return Err(DecodeError::Malformed("DUP set on QoS 0"));
    }
    let topic: Arc<str> = Arc::from(r.string()?);
    let packet_id = if qos == QoS::AtMostOnce { None } else { Some(packet_id(r)?) };
    let properties = read_properties(r, version, Context::Publish)?;
    let properties = properties.into();
    Ok(Publish { dup, qos, retain: header & 0x01 != 0, topic, packet_id, properties, payload: Payload::default() })
}

fn decode_subscribe(r: &mut Reader, version: Version) -> Result<Subscribe, DecodeError> {
    let packet_id = packet_id(r)?;
    let properties = read_properties(r, version, Context::Subscribe)?;
    let mut filters = Vec::new();
    while !r.is_empty() {
        let filter = r.owned_string()?;
        let bits = r.u8()?;
        let reserved = if version == Version::V5 { 0xc0 } else { 0xfc };
        if bits & reserved != 0 {
            return Err(DecodeError::Malformed("reserved subscription option bits"));
        }
        let qos = QoS::from_bits(bits & 0x03).ok_or(DecodeError::Malformed("subscription QoS 3"))?;
        let retain_handling = (bits >> 4) & 0x03;
        if retain_handling == 3 {
            return Err(DecodeError::Protocol("retain handling 3"));
        }
        let options = SubscriptionOptions {
            qos,
            no_local: bits & 0x04 != 0,
            retain_as_published: bits & 0x08 != 0,
            retain_handling,
        };
        filters.push((filter, options));
    }
    if filters.is_empty() {
        return Err(DecodeError::Protocol("SUBSCRIBE without filters"));
    }
    Ok(Subscribe { packet_id, properties, filters })
}

fn decode_unsubscribe(r: &mut Reader, version: Version) -> Result<Unsubscribe, DecodeError> {
    let packet_id = packet_id(r)?;
    let properties = read_properties(r, version, Context::Unsubscribe)?;
    let mut filters = Vec::new();
    while !r.is_empty() {
        filters.push(r.owned_string()?);
    }
    if filters.is_empty() {
        return Err(DecodeError::Protocol("UNSUBSCRIBE without filters"));
    }
    Ok(Unsubscribe { packet_id, properties, filters })
}

/// Decodes a client-to-server packet. `version` is the session's protocol
/// level (CONNECT carries its own).
pub fn decode(frame: Frame, buf: &[u8], version: Version) -> Result<Packet, DecodeError> {
    let body = buf.get(frame.body_start..frame.len).ok_or(DecodeError::Truncated)?;
    let mut r = Reader::new(body);
    let header = frame.header;
    let packet = match header >> 4 {
        CONNECT => {
            check_flags(header, 0)?;
            Packet::Connect(Box::new(decode_connect(&mut r)?))
        }
        PUBLISH => Packet::Publish(decode_publish(header, &mut r, version)?),
        PUBACK => {
            check_flags(header, 0)?;
            Packet::Puback(decode_ack(&mut r, version)?)
        }
        PUBREC => {
            check_flags(header, 0)?;
            Packet::Pubrec(decode_ack(&mut r, version)?)
        }
        PUBREL => {
            check_flags(header, 0b0010)?;
            Packet::Pubrel(decode_ack(&mut r, version)?)
        }
        PUBCOMP => {
            check_flags(header, 0)?;
            Packet::Pubcomp(decode_ack(&mut r, version)?)
        }
        SUBSCRIBE => {
            check_flags(header, 0b0010)?;
            Packet::Subscribe(decode_subscribe(&mut r, version)?)
        }
        UNSUBSCRIBE => {
            check_flags(header, 0b0010)?;
            Packet::Unsubscribe(decode_unsubscribe(&mut r, version)?)
        }
        PINGREQ => {
            check_flags(header, 0)?;
            if !r.is_empty() {
                return Err(DecodeError::Malformed("PINGREQ with a body"));
            }
            Packet::Pingreq
        }
        DISCONNECT => {
            check_flags(header, 0)?;
            let (code, properties) = if version == Version::V5 && !r.is_empty() {
                let code = r.u8()?;
                let props =
                    if r.is_empty() { Properties::default() } else { Properties::decode(&mut r, Context::Disconnect)? };
                (code, props)
            } else {
                (0, Properties::default())
            };
            if !r.is_empty() {
                return Err(DecodeError::Malformed("bytes after DISCONNECT"));
            }
            Packet::Disconnect { code, properties }
        }
        AUTH if version == Version::V5 => {
            check_flags(header, 0)?;
            let (code, properties) = if r.is_empty() {
                (0, Properties::default())
            } else {
                let code = r.u8()?;
                (code, if r.is_empty() { Properties::default() } else { Properties::decode(&mut r, Context::Auth)? })
            };
            Packet::Auth { code, properties }
        }
        // Server-to-client types, type 0, or AUTH before v5.
        _ => return Err(DecodeError::Protocol("packet type not allowed from a client")),
    };
    Ok(packet)
}

/// Writes fixed header + `body`.
fn finish(out: &mut Vec<u8>, header: u8, body: &[u8]) {
    out.push(header);
    // Bodies are bounded by the maximum packet size we enforce (< 2^28).
    out.put_var_int(u32::try_from(body.len()).unwrap_or(u32::MAX));
    out.extend_from_slice(body);
}

fn encode_ack(out: &mut Vec<u8>, header: u8, ack: &Ack, version: Version) {
    let mut body = Vec::with_capacity(4);
    body.put_u16(ack.packet_id);
    if version == Version::V5 && (ack.code != 0 || ack.properties != Properties::default()) {
        body.put_u8(ack.code);
        if ack.properties != Properties::default() {
            ack.properties.encode(&mut body);
        }
    }
    finish(out, header, &body);
}

/// Size of the encoded PUBLISH, to check against a client's maximum packet size.
pub fn publish_len(publish: &Publish, version: Version) -> usize {
    let props = if version == Version::V5 { publish.properties.encoded_len() } else { 0 };
    let body =
        2 + publish.topic.len() + if publish.packet_id.is_some() { 2 } else { 0 } + props + publish.payload.len();
    1 + var_int_len(u32::try_from(body).unwrap_or(u32::MAX)) + body
}

/// Appends a PUBLISH encoded for a client speaking `version`, all but its
/// payload: the payload's bytes follow as they are, so a runner can send one
/// shared copy of them to every subscriber.
pub fn encode_publish_head(p: &Publish, version: Version, out: &mut Vec<u8>) {
    let header = (PUBLISH << 4) | (u8::from(p.dup) << 3) | ((p.qos as u8) << 1) | u8::from(p.retain);
    let mut head = Vec::with_capacity(p.topic.len() + 16);
    head.put_str(&p.topic);
    if let Some(id) = p.packet_id {
        head.put_u16(id);
    }
    if version == Version::V5 {
        p.properties.encode(&mut head);
    }
    out.push(header);
    // Packets are bounded by the maximum packet size we enforce (< 2^28).
    out.put_var_int(u32::try_from(head.len() + p.payload.len()).unwrap_or(u32::MAX));
    out.extend_from_slice(&head);
}

/// Appends `packet` encoded for a client speaking `version`.
pub fn encode(packet: &Packet, version: Version, out: &mut Vec<u8>) {
    let v5 = version == Version::V5;
    match packet {
        Packet::Connack(c) => {
            let mut body = Vec::new();
            body.put_u8(u8::from(c.session_present));
            body.put_u8(c.code);
            if v5 {
                c.properties.encode(&mut body);
            }
            finish(out, CONNACK << 4, &body);
        }
        Packet::Publish(p) => {
            encode_publish_head(p, version, out);
            out.extend_from_slice(&p.payload);
        }
        Packet::Puback(a) => encode_ack(out, PUBACK << 4, a, version),
        Packet::Pubrec(a) => encode_ack(out, PUBREC << 4, a, version),
        Packet::Pubrel(a) => encode_ack(out, (PUBREL << 4) | 0b0010, a, version),
        Packet::Pubcomp(a) => encode_ack(out, PUBCOMP << 4, a, version),
        Packet::Suback { packet_id, properties, codes } | Packet::Unsuback { packet_id, properties, codes } => {
            let kind = if matches!(packet, Packet::Suback { .. }) { SUBACK } else { UNSUBACK };
            let mut body = Vec::new();
            body.put_u16(*packet_id);
            if v5 {
                properties.encode(&mut body);
            }
            // A 3.x UNSUBACK has no payload.
            if v5 || kind == SUBACK {
                body.extend_from_slice(codes);
            }
            finish(out, kind << 4, &body);
        }
        Packet::Pingresp => finish(out, PINGRESP << 4, &[]),
        Packet::Disconnect { code, properties } => {
            let mut body = Vec::new();
            if v5 {
                body.put_u8(*code);
                properties.encode(&mut body);
            }
            finish(out, DISCONNECT << 4, &body);
        }
        Packet::Auth { code, properties } => {
            let mut body = Vec::new();
            body.put_u8(*code);
            properties.encode(&mut body);
            finish(out, AUTH << 4, &body);
        }
        // Client-to-server packets: encoded only by tests and load
        // generators (`client`).
        Packet::Connect(c) => client::encode_connect(c, out),
        Packet::Subscribe(s) => client::encode_subscribe(s, version, out),
        Packet::Unsubscribe(u) => client::encode_unsubscribe(u, version, out),
        Packet::Pingreq => finish(out, PINGREQ << 4, &[]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn decode_one(bytes: &[u8], version: Version) -> Result<Packet, DecodeError> {
        let frame = frame(bytes, 1 << 20)?.ok_or(DecodeError::Truncated)?;
        assert_eq!(frame.len, bytes.len());
        decode(frame, bytes, version)
    }

    #[test]
    fn framing_waits_for_whole_packets_and_refuses_oversize_early() {
        assert_eq!(frame(&[], 100), Ok(None));
        assert_eq!(frame(&[0x30], 100), Ok(None));
        assert_eq!(frame(&[0x30, 0x80], 100), Ok(None));
        assert_eq!(frame(&[0x30, 3, 0, 1], 100), Ok(None));
        assert_eq!(frame(&[0x30, 2, 0, 0], 100), Ok(Some(Frame { header: 0x30, body_start: 2, len: 4 })));
        // 200 bytes announced, limit 100: refused from the first two bytes.
        assert_eq!(frame(&[0x30, 0xc8, 0x01], 100), Err(DecodeError::TooLarge));
        assert_eq!(frame(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], usize::MAX), Err(DecodeError::BadVarInt));
    }

    #[test]
    fn golden_connect_3_1_1() {
        // CONNECT "MQTT" 4, clean session, keep alive 60, client id "c1".
        let bytes = [0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 2, b'c', b'1'];
        let Packet::Connect(c) = decode_one(&bytes, Version::V3_1_1).unwrap() else { panic!() };
        assert_eq!((c.version, c.clean_start, c.keep_alive, c.client_id.as_str()), (Version::V3_1_1, true, 60, "c1"));
        let mut out = Vec::new();
        encode(&Packet::Connect(c), Version::V3_1_1, &mut out);
        assert_eq!(out, bytes);
    }

    #[test]
    fn connect_3_1_and_unknown_levels() {
        let mut v31 = vec![0x10, 16, 0, 6];
        v31.extend_from_slice(b"MQIsdp");
        v31.extend_from_slice(&[3, 0x02, 0, 10, 0, 2, b'a', b'b']);
        let Ok(Packet::Connect(c)) = decode_one(&v31, Version::V3_1_1) else { panic!("3.1 CONNECT refused") };
        assert_eq!(c.version, Version::V3_1);
        let v6 = [0x10, 10, 0, 4, b'M', b'Q', b'T', b'T', 6, 0x02, 0, 10];
        assert_eq!(decode_one(&v6, Version::V3_1_1), Err(DecodeError::UnsupportedProtocol));
    }

    #[test]
    fn reserved_bits_are_malformed() {
        // CONNECT reserved flag.
        let bytes = [0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x03, 0, 60, 0, 0];
        assert!(matches!(decode_one(&bytes, Version::V3_1_1), Err(DecodeError::Malformed(_))));
        // SUBSCRIBE with flags 0000 instead of 0010.
        let bytes = [0x80, 6, 0, 1, 0, 1, b'a', 0];
        assert!(matches!(decode_one(&bytes, Version::V3_1_1), Err(DecodeError::Malformed(_))));
        // PUBLISH QoS 3.
        let bytes = [0x36, 5, 0, 1, b'a', 0, 1];
        assert!(matches!(decode_one(&bytes, Version::V3_1_1), Err(DecodeError::Malformed(_))));
        // PINGREQ flags.
        assert!(decode_one(&[0xc1, 0], Version::V3_1_1).is_err());
    }

    #[test]
    fn publish_round_trips_in_every_version() {
        for version in [Version::V3_1, Version::V3_1_1, Version::V5] {
            let mut properties = Properties::default();
            if version == Version::V5 {
                properties.content_type = Some("text/plain".into());
                properties.user_properties.push(("k".into(), "v".into()));
            }
            let publish = Publish {
                dup: true,
                qos: QoS::ExactlyOnce,
                retain: true,
                topic: Arc::from("a/b"),
                packet_id: Some(7),
                properties: properties.into(),
                payload: Payload::from(&b"hello"[..]),
            };
            let mut out = Vec::new();
            encode(&Packet::Publish(publish.clone()), version, &mut out);
            assert_eq!(out.len(), publish_len(&publish, version));
            assert_eq!(decode_one(&out, version), Ok(Packet::Publish(publish)));
        }
    }

    #[test]
    fn subscribe_options_decode_per_version() {
        // v5 options: QoS 1, no local, retain as published, retain handling 2.
        let bytes = [0x82, 8, 0, 9, 0, 0, 1, b't', 0b0010_1101, 0][..9].to_vec();
        let mut bytes = bytes;
        bytes[1] = 7;
        let Packet::Subscribe(s) = decode_one(&bytes, Version::V5).unwrap() else { panic!() };
        let o = s.filters[0].1;
        assert_eq!((o.qos, o.no_local, o.retain_as_published, o.retain_handling), (QoS::AtLeastOnce, true, true, 2));
        // The same byte is malformed in 3.1.1, where only the QoS bits exist.
        let v311 = [0x82, 6, 0, 9, 0, 1, b't', 0b0010_1101];
        assert!(matches!(decode_one(&v311, Version::V3_1_1), Err(DecodeError::Malformed(_))));
    }

    #[test]
    fn truncated_packets_never_panic() {
        let mut full = Vec::new();
        let connect = Connect {
            version: Version::V5,
            clean_start: false,
            keep_alive: 30,
            properties: Properties { session_expiry_interval: Some(60), ..Properties::default() },
            client_id: "client".into(),
            will: Some(Will {
                topic: "will/t".into(),
                payload: vec![1, 2],
                qos: QoS::AtLeastOnce,
                retain: true,
                properties: Properties::default(),
            }),
            username: Some("u".into()),
            password: Some(vec![9]),
        };
        encode(&Packet::Connect(Box::new(connect.clone())), Version::V5, &mut full);
        assert_eq!(decode_one(&full, Version::V5), Ok(Packet::Connect(Box::new(connect))));
        for cut in 2..full.len() {
            // Claim the truncated body is complete: every prefix must fail cleanly.
            let mut bytes = full[..cut].to_vec();
            bytes[1] = u8::try_from(cut - 2).unwrap();
            assert!(decode_one(&bytes, Version::V5).is_err(), "prefix {cut} decoded");
        }
    }

    #[test]
    fn server_packets_from_a_client_are_refused() {
        assert!(matches!(decode_one(&[0x20, 2, 0, 0], Version::V3_1_1), Err(DecodeError::Protocol(_))));
        assert!(matches!(decode_one(&[0xd0, 0], Version::V3_1_1), Err(DecodeError::Protocol(_))));
        assert!(matches!(decode_one(&[0xf0, 0], Version::V3_1_1), Err(DecodeError::Protocol(_))));
    }
}
