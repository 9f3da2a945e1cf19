//! Raw MQTT packets for the end-to-end tests: exact bytes, so a test says
//! what a client sends and sees what the broker answers, byte for byte.

use std::io::Read;
use std::net::TcpStream;

/// Appends an MQTT remaining length.
pub fn remaining_length(mut len: usize, out: &mut Vec<u8>) {
    loop {
        let byte = u8::try_from(len % 128).unwrap();
        len /= 128;
        out.push(if len > 0 { byte | 0x80 } else { byte });
        if len == 0 {
            break;
        }
    }
}

fn put_str(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&u16::try_from(bytes.len()).unwrap().to_be_bytes());
    out.extend_from_slice(bytes);
}

/// A CONNECT at protocol `level` (4: 3.1.1, 5: 5.0), keep-alive 0.
pub fn connect_as(level: u8, client_id: &str, clean: bool, username: Option<&str>, password: Option<&[u8]>) -> Vec<u8> {
    let mut body = Vec::new();
    put_str(&mut body, b"MQTT");
    body.push(level);
    let flags = u8::from(clean) << 1 | u8::from(password.is_some()) << 6 | u8::from(username.is_some()) << 7;
    body.extend_from_slice(&[flags, 0, 0]);
    if level == 5 {
        body.push(0); // no properties
    }
    put_str(&mut body, client_id.as_bytes());
    if let Some(user) = username {
        put_str(&mut body, user.as_bytes());
    }
    if let Some(password) = password {
        put_str(&mut body, password);
    }
    let mut packet = vec![0x10];
    remaining_length(body.len(), &mut packet);
    packet.extend_from_slice(&body);
    packet
}

/// A v3.1.1 CONNECT with a clean session, keep-alive 0 and `client_id`.
pub fn connect_packet(client_id: &str) -> Vec<u8> {
    connect_as(4, client_id, true, None, None)
}

/// A v3.1.1 PUBLISH; `packet_id` is required above QoS 0.
pub fn publish(topic: &str, payload: &[u8], qos: u8, packet_id: u16, retain: bool) -> Vec<u8> {
    let mut body = Vec::new();
    put_str(&mut body, topic.as_bytes());
    if qos > 0 {
        body.extend_from_slice(&packet_id.to_be_bytes());
    }
    body.extend_from_slice(payload);
    let mut packet = vec![0x30 | qos << 1 | u8::from(retain)];
    remaining_length(body.len(), &mut packet);
    packet.extend_from_slice(&body);
    packet
}

/// A v5 PUBLISH without properties; `packet_id` is required above QoS 0.
pub fn publish_v5(topic: &str, payload: &[u8], qos: u8, packet_id: u16, retain: bool) -> Vec<u8> {
    let mut body = Vec::new();
    put_str(&mut body, topic.as_bytes());
    if qos > 0 {
        body.extend_from_slice(&packet_id.to_be_bytes());
    }
    body.push(0); // no properties
    body.extend_from_slice(payload);
    let mut packet = vec![0x30 | qos << 1 | u8::from(retain)];
    remaining_length(body.len(), &mut packet);
    packet.extend_from_slice(&body);
    packet
}

/// The reason code of a v5 PUBACK body (absent: success).
pub fn puback_code(body: &[u8]) -> u8 {
    body.get(2).copied().unwrap_or(0)
}

/// A v3.1.1 SUBSCRIBE to one filter.
pub fn subscribe(filter: &str, qos: u8, packet_id: u16) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    put_str(&mut body, filter.as_bytes());
    body.push(qos);
    let mut packet = vec![0x82];
    remaining_length(body.len(), &mut packet);
    packet.extend_from_slice(&body);
    packet
}

/// Reads one MQTT packet: its first byte and its body.
pub fn read_packet(stream: &mut TcpStream) -> (u8, Vec<u8>) {
    try_read_packet(stream).expect("reading a packet")
}

/// Reads one MQTT packet from any stream (TCP, TLS, WebSocket), or the
/// error that ended the connection.
pub fn try_read_packet(stream: &mut impl Read) -> std::io::Result<(u8, Vec<u8>)> {
    let mut first = [0u8; 1];
    stream.read_exact(&mut first)?;
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte)?;
        len |= usize::from(byte[0] & 0x7f) << shift;
        shift += 7;
        if byte[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body)?;
    Ok((first[0], body))
}
