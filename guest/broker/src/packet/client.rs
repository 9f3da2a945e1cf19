//! The client's side of MQTT packets: encoding what a client sends
//! (CONNECT, SUBSCRIBE, UNSUBSCRIBE; PINGREQ stays with [`super::encode`]) and
//! decoding what a server sends. The broker never needs either; tests,
//! fuzz targets, benchmarks and the state log's record codec do.
//!
//! Owns nothing of its own: the packet types, framing and field codecs are
//! the parent's ([`super`]), so both sides share one codec.

use alloc::vec::Vec;

use super::{
    CONNACK, CONNECT, Connack, Connect, DISCONNECT, Frame, PINGRESP, PUBACK, PUBCOMP, PUBLISH, PUBREC, PUBREL, Packet,
    SUBACK, SUBSCRIBE, Subscribe, UNSUBACK, UNSUBSCRIBE, Unsubscribe, Version, decode_ack, decode_publish, finish,
};
use crate::properties::{Context, Properties};
use crate::wire::{DecodeError, Reader, Writer};

/// Appends CONNECT `c`, at its own protocol level.
pub(super) fn encode_connect(c: &Connect, out: &mut Vec<u8>) {
    let mut body = Vec::new();
    let (name, level) = match c.version {
        Version::V3_1 => ("MQIsdp", 3),
        Version::V3_1_1 => ("MQTT", 4),
        Version::V5 => ("MQTT", 5),
    };
    body.put_str(name);
    body.put_u8(level);
    let mut flags = u8::from(c.clean_start) << 1;
    if let Some(w) = &c.will {
        flags |= 0x04 | ((w.qos as u8) << 3) | (u8::from(w.retain) << 5);
    }
    flags |= u8::from(c.password.is_some()) << 6 | u8::from(c.username.is_some()) << 7;
    body.put_u8(flags);
    body.put_u16(c.keep_alive);
    let cv5 = c.version == Version::V5;
    if cv5 {
        c.properties.encode(&mut body);
    }
    body.put_str(&c.client_id);
    if let Some(w) = &c.will {
        if cv5 {
            w.properties.encode(&mut body);
        }
        body.put_str(&w.topic);
        body.put_binary(&w.payload);
    }
    if let Some(u) = &c.username {
        body.put_str(u);
    }
    if let Some(p) = &c.password {
        body.put_binary(p);
    }
    finish(out, CONNECT << 4, &body);
}

/// Appends SUBSCRIBE `s` for a server speaking `version`.
pub(super) fn encode_subscribe(s: &Subscribe, version: Version, out: &mut Vec<u8>) {
    let v5 = version == Version::V5;
    let mut body = Vec::new();
    body.put_u16(s.packet_id);
    if v5 {
        s.properties.encode(&mut body);
    }
    for (filter, o) in &s.filters {
        body.put_str(filter);
        body.put_u8(
            o.qos as u8
                | u8::from(o.no_local) << 2
                | u8::from(o.retain_as_published) << 3
                | (o.retain_handling & 3) << 4,
        );
    }
    finish(out, (SUBSCRIBE << 4) | 0b0010, &body);
}

/// Appends UNSUBSCRIBE `u` for a server speaking `version`.
pub(super) fn encode_unsubscribe(u: &Unsubscribe, version: Version, out: &mut Vec<u8>) {
    let v5 = version == Version::V5;
    let mut body = Vec::new();
    body.put_u16(u.packet_id);
    if v5 {
        u.properties.encode(&mut body);
    }
    for filter in &u.filters {
        body.put_str(filter);
    }
    finish(out, (UNSUBSCRIBE << 4) | 0b0010, &body);
}

/// Decodes a server-to-client packet (for clients and tests).
pub fn decode_from_server(frame: Frame, buf: &[u8], version: Version) -> Result<Packet, DecodeError> {
    let body = buf.get(frame.body_start..frame.len).ok_or(DecodeError::Truncated)?;
    let mut r = Reader::new(body);
    let v5 = version == Version::V5;
    Ok(match frame.header >> 4 {
        CONNACK => {
            let session_present = r.u8()? & 1 != 0;
            let code = r.u8()?;
            let properties = if v5 { Properties::decode(&mut r, Context::Connack)? } else { Properties::default() };
            Packet::Connack(Connack { session_present, code, properties })
        }
        PUBLISH => Packet::Publish(decode_publish(frame.header, &mut r, version)?),
        PUBACK => Packet::Puback(decode_ack(&mut r, version)?),
        PUBREC => Packet::Pubrec(decode_ack(&mut r, version)?),
        PUBREL => Packet::Pubrel(decode_ack(&mut r, version)?),
        PUBCOMP => Packet::Pubcomp(decode_ack(&mut r, version)?),
        SUBACK | UNSUBACK => {
            let packet_id = r.u16()?;
            let properties = if v5 { Properties::decode(&mut r, Context::Suback)? } else { Properties::default() };
            let codes = r.rest().to_vec();
            if frame.header >> 4 == SUBACK {
                Packet::Suback { packet_id, properties, codes }
            } else {
                Packet::Unsuback { packet_id, properties, codes }
            }
        }
        PINGRESP => Packet::Pingresp,
        DISCONNECT => {
            let code = if r.is_empty() { 0 } else { r.u8()? };
            let properties = if v5 && !r.is_empty() {
                Properties::decode(&mut r, Context::Disconnect)?
            } else {
                Properties::default()
            };
            Packet::Disconnect { code, properties }
        }
        _ => return Err(DecodeError::Protocol("packet type not sent by servers")),
    })
}
