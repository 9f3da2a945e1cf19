//! MQTT 5.0 properties (section 2.2.2): decoding with the per-packet rules
//! (which properties a packet may carry, which may repeat) and encoding.
//!
//! Owns the property identifiers and the [`Properties`] bag. A property that
//! is unknown, not allowed in the packet, or repeated when it may not be is a
//! malformed or protocol error, never silently dropped.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;

use crate::wire::{DecodeError, Reader, Writer, var_int_len};

pub const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
pub const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
pub const CONTENT_TYPE: u8 = 0x03;
pub const RESPONSE_TOPIC: u8 = 0x08;
pub const CORRELATION_DATA: u8 = 0x09;
pub const SUBSCRIPTION_IDENTIFIER: u8 = 0x0b;
pub const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
pub const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
pub const SERVER_KEEP_ALIVE: u8 = 0x13;
pub const AUTHENTICATION_METHOD: u8 = 0x15;
pub const AUTHENTICATION_DATA: u8 = 0x16;
pub const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
pub const WILL_DELAY_INTERVAL: u8 = 0x18;
pub const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
pub const RESPONSE_INFORMATION: u8 = 0x1a;
pub const SERVER_REFERENCE: u8 = 0x1c;
pub const REASON_STRING: u8 = 0x1f;
pub const RECEIVE_MAXIMUM: u8 = 0x21;
pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
pub const TOPIC_ALIAS: u8 = 0x23;
pub const MAXIMUM_QOS: u8 = 0x24;
pub const RETAIN_AVAILABLE: u8 = 0x25;
pub const USER_PROPERTY: u8 = 0x26;
pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
pub const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
pub const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
pub const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2a;

/// Where a property list sits; decides which identifiers are allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context {
    Connect,
    Will,
    Connack,
    Publish,
    Ack,
    Subscribe,
    Suback,
    Unsubscribe,
    Disconnect,
    Auth,
}

fn allowed(context: Context, id: u8) -> bool {
    use Context::*;
    match id {
        PAYLOAD_FORMAT_INDICATOR | MESSAGE_EXPIRY_INTERVAL | CONTENT_TYPE | RESPONSE_TOPIC | CORRELATION_DATA => {
            matches!(context, Publish | Will)
        }
        SUBSCRIPTION_IDENTIFIER => matches!(context, Publish | Subscribe),
        SESSION_EXPIRY_INTERVAL => matches!(context, Connect | Connack | Disconnect),
        ASSIGNED_CLIENT_IDENTIFIER | SERVER_KEEP_ALIVE | RESPONSE_INFORMATION => context == Connack,
        AUTHENTICATION_METHOD | AUTHENTICATION_DATA => matches!(context, Connect | Connack | Auth),
        REQUEST_PROBLEM_INFORMATION | REQUEST_RESPONSE_INFORMATION => context == Connect,
        WILL_DELAY_INTERVAL => context == Will,
        SERVER_REFERENCE => matches!(context, Connack | Disconnect),
        REASON_STRING => matches!(context, Connack | Ack | Suback | Disconnect | Auth),
        RECEIVE_MAXIMUM | TOPIC_ALIAS_MAXIMUM | MAXIMUM_PACKET_SIZE => matches!(context, Connect | Connack),
        TOPIC_ALIAS => context == Publish,
        MAXIMUM_QOS
        | RETAIN_AVAILABLE
        | WILDCARD_SUBSCRIPTION_AVAILABLE
        | SUBSCRIPTION_IDENTIFIER_AVAILABLE
        | SHARED_SUBSCRIPTION_AVAILABLE => context == Connack,
        USER_PROPERTY => matches!(
            context,
            Connect | Will | Connack | Publish | Ack | Subscribe | Suback | Unsubscribe | Disconnect | Auth
        ),
        _ => false,
    }
}

/// Every property a packet can carry; absent ones are `None` / empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties {
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval: Option<u32>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Vec<u8>>,
    pub subscription_identifiers: Vec<u32>,
    pub session_expiry_interval: Option<u32>,
    pub assigned_client_identifier: Option<String>,
    pub server_keep_alive: Option<u16>,
    pub authentication_method: Option<String>,
    pub authentication_data: Option<Vec<u8>>,
    pub request_problem_information: Option<u8>,
    pub will_delay_interval: Option<u32>,
    pub request_response_information: Option<u8>,
    pub response_information: Option<String>,
    pub server_reference: Option<String>,
    pub reason_string: Option<String>,
    pub receive_maximum: Option<u16>,
    pub topic_alias_maximum: Option<u16>,
    pub topic_alias: Option<u16>,
    pub maximum_qos: Option<u8>,
    pub retain_available: Option<u8>,
    pub user_properties: Vec<(String, String)>,
    pub maximum_packet_size: Option<u32>,
    pub wildcard_subscription_available: Option<u8>,
    pub subscription_identifier_available: Option<u8>,
    pub shared_subscription_available: Option<u8>,
}

impl Properties {
    /// No property at all (what [`Properties::default`] gives), as a constant.
    pub const NONE: Properties = Properties {
        payload_format_indicator: None,
        message_expiry_interval: None,
        content_type: None,
        response_topic: None,
        correlation_data: None,
        subscription_identifiers: Vec::new(),
        session_expiry_interval: None,
        assigned_client_identifier: None,
        server_keep_alive: None,
        authentication_method: None,
        authentication_data: None,
        request_problem_information: None,
        will_delay_interval: None,
        request_response_information: None,
        response_information: None,
        server_reference: None,
        reason_string: None,
        receive_maximum: None,
        topic_alias_maximum: None,
        topic_alias: None,
        maximum_qos: None,
        retain_available: None,
        user_properties: Vec::new(),
        maximum_packet_size: None,
        wildcard_subscription_available: None,
        subscription_identifier_available: None,
        shared_subscription_available: None,
    };
}

/// An application message's properties. Most messages have none, and then
/// this is one null pointer instead of a struct of some 300 bytes that
/// every queue entry, retained message and move would carry. Reads go
/// through `Deref`; a write asks for [`MessageProperties::make_mut`], so
/// clearing a field that is already empty allocates nothing.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct MessageProperties(Option<Box<Properties>>);

/// What an empty [`MessageProperties`] reads as.
static NO_PROPERTIES: Properties = Properties::NONE;

impl MessageProperties {
    /// The properties, to change them (allocated on first use).
    pub fn make_mut(&mut self) -> &mut Properties {
        self.0.get_or_insert_with(Box::default)
    }

    pub fn into_inner(self) -> Properties {
        self.0.map(|p| *p).unwrap_or_default()
    }
}

impl core::ops::Deref for MessageProperties {
    type Target = Properties;

    fn deref(&self) -> &Properties {
        self.0.as_deref().unwrap_or(&NO_PROPERTIES)
    }
}

impl From<Properties> for MessageProperties {
    fn from(properties: Properties) -> Self {
        if properties == Properties::NONE {
            MessageProperties(None)
        } else {
            MessageProperties(Some(Box::new(properties)))
        }
    }
}

impl core::fmt::Debug for MessageProperties {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        (**self).fmt(f)
    }
}

fn once<T>(slot: &mut Option<T>, value: T) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(DecodeError::Protocol("property repeated"));
    }
    *slot = Some(value);
    Ok(())
}

fn flag(value: u8) -> Result<u8, DecodeError> {
    if value > 1 {
        return Err(DecodeError::Protocol("property must be 0 or 1"));
    }
    Ok(value)
}

impl Properties {
    /// Reads a property length and the properties it covers.
    pub fn decode(reader: &mut Reader, context: Context) -> Result<Properties, DecodeError> {
        let len = reader.var_int()? as usize;
        let mut r = Reader::new(reader.take(len)?);
        let mut p = Properties::default();
        while !r.is_empty() {
            // Identifiers are variable byte integers, but all defined ones fit in one byte.
            let id = r.var_int()?;
            let id = u8::try_from(id).map_err(|_| DecodeError::Malformed("unknown property"))?;
            if !allowed(context, id) {
                return Err(DecodeError::Malformed("property not allowed in this packet"));
            }
            match id {
                PAYLOAD_FORMAT_INDICATOR => once(&mut p.payload_format_indicator, flag(r.u8()?)?)?,
                MESSAGE_EXPIRY_INTERVAL => once(&mut p.message_expiry_interval, r.u32()?)?,
                CONTENT_TYPE => once(&mut p.content_type, r.owned_string()?)?,
                RESPONSE_TOPIC => once(&mut p.response_topic, r.owned_string()?)?,
                CORRELATION_DATA => once(&mut p.correlation_data, r.binary()?.to_vec())?,
                SUBSCRIPTION_IDENTIFIER => {
                    let v = r.var_int()?;
                    if v == 0 {
                        return Err(DecodeError::Protocol("subscription identifier 0"));
                    }
                    if context == Context::Subscribe && !p.subscription_identifiers.is_empty() {
                        return Err(DecodeError::Protocol("property repeated"));
                    }
                    p.subscription_identifiers.push(v);
                }
                SESSION_EXPIRY_INTERVAL => once(&mut p.session_expiry_interval, r.u32()?)?,
                ASSIGNED_CLIENT_IDENTIFIER => once(&mut p.assigned_client_identifier, r.owned_string()?)?,
                SERVER_KEEP_ALIVE => once(&mut p.server_keep_alive, r.u16()?)?,
                AUTHENTICATION_METHOD => once(&mut p.authentication_method, r.owned_string()?)?,
                AUTHENTICATION_DATA => once(&mut p.authentication_data, r.binary()?.to_vec())?,
                REQUEST_PROBLEM_INFORMATION => once(&mut p.request_problem_information, flag(r.u8()?)?)?,
                WILL_DELAY_INTERVAL => once(&mut p.will_delay_interval, r.u32()?)?,
                REQUEST_RESPONSE_INFORMATION => once(&mut p.request_response_information, flag(r.u8()?)?)?,
                RESPONSE_INFORMATION => once(&mut p.response_information, r.owned_string()?)?,
                SERVER_REFERENCE => once(&mut p.server_reference, r.owned_string()?)?,
                REASON_STRING => once(&mut p.reason_string, r.owned_string()?)?,
                RECEIVE_MAXIMUM => {
                    let v = r.u16()?;
                    if v == 0 {
                        return Err(DecodeError::Protocol("receive maximum 0"));
                    }
                    once(&mut p.receive_maximum, v)?
                }
                TOPIC_ALIAS_MAXIMUM => once(&mut p.topic_alias_maximum, r.u16()?)?,
                TOPIC_ALIAS => once(&mut p.topic_alias, r.u16()?)?,
                MAXIMUM_QOS => once(&mut p.maximum_qos, flag(r.u8()?)?)?,
                RETAIN_AVAILABLE => once(&mut p.retain_available, flag(r.u8()?)?)?,
                USER_PROPERTY => {
                    let key = r.owned_string()?;
                    let value = r.owned_string()?;
                    p.user_properties.push((key, value));
                }
                MAXIMUM_PACKET_SIZE => {
                    let v = r.u32()?;
                    if v == 0 {
                        return Err(DecodeError::Protocol("maximum packet size 0"));
                    }
                    once(&mut p.maximum_packet_size, v)?
                }
                WILDCARD_SUBSCRIPTION_AVAILABLE => once(&mut p.wildcard_subscription_available, flag(r.u8()?)?)?,
                SUBSCRIPTION_IDENTIFIER_AVAILABLE => once(&mut p.subscription_identifier_available, flag(r.u8()?)?)?,
                SHARED_SUBSCRIPTION_AVAILABLE => once(&mut p.shared_subscription_available, flag(r.u8()?)?)?,
                _ => return Err(DecodeError::Malformed("unknown property")),
            }
        }
        Ok(p)
    }

    /// The property list without its length prefix.
    fn body(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let byte = |out: &mut Vec<u8>, id: u8, v: Option<u8>| {
            if let Some(v) = v {
                out.put_u8(id);
                out.put_u8(v);
            }
        };
        let short = |out: &mut Vec<u8>, id: u8, v: Option<u16>| {
            if let Some(v) = v {
                out.put_u8(id);
                out.put_u16(v);
            }
        };
        let long = |out: &mut Vec<u8>, id: u8, v: Option<u32>| {
            if let Some(v) = v {
                out.put_u8(id);
                out.put_u32(v);
            }
        };
        let text = |out: &mut Vec<u8>, id: u8, v: &Option<String>| {
            if let Some(v) = v {
                out.put_u8(id);
                out.put_str(v);
            }
        };
        let bin = |out: &mut Vec<u8>, id: u8, v: &Option<Vec<u8>>| {
            if let Some(v) = v {
                out.put_u8(id);
                out.put_binary(v);
            }
        };
        byte(&mut out, PAYLOAD_FORMAT_INDICATOR, self.payload_format_indicator);
        long(&mut out, MESSAGE_EXPIRY_INTERVAL, self.message_expiry_interval);
        text(&mut out, CONTENT_TYPE, &self.content_type);
        text(&mut out, RESPONSE_TOPIC, &self.response_topic);
        bin(&mut out, CORRELATION_DATA, &self.correlation_data);
        for id in &self.subscription_identifiers {
            out.put_u8(SUBSCRIPTION_IDENTIFIER);
            out.put_var_int(*id);
        }
        long(&mut out, SESSION_EXPIRY_INTERVAL, self.session_expiry_interval);
        text(&mut out, ASSIGNED_CLIENT_IDENTIFIER, &self.assigned_client_identifier);
        short(&mut out, SERVER_KEEP_ALIVE, self.server_keep_alive);
        text(&mut out, AUTHENTICATION_METHOD, &self.authentication_method);
        bin(&mut out, AUTHENTICATION_DATA, &self.authentication_data);
        byte(&mut out, REQUEST_PROBLEM_INFORMATION, self.request_problem_information);
        long(&mut out, WILL_DELAY_INTERVAL, self.will_delay_interval);
        byte(&mut out, REQUEST_RESPONSE_INFORMATION, self.request_response_information);
        text(&mut out, RESPONSE_INFORMATION, &self.response_information);
        text(&mut out, SERVER_REFERENCE, &self.server_reference);
        text(&mut out, REASON_STRING, &self.reason_string);
        short(&mut out, RECEIVE_MAXIMUM, self.receive_maximum);
        short(&mut out, TOPIC_ALIAS_MAXIMUM, self.topic_alias_maximum);
        short(&mut out, TOPIC_ALIAS, self.topic_alias);
        byte(&mut out, MAXIMUM_QOS, self.maximum_qos);
        byte(&mut out, RETAIN_AVAILABLE, self.retain_available);
        for (key, value) in &self.user_properties {
            out.put_u8(USER_PROPERTY);
            out.put_str(key);
            out.put_str(value);
        }
        long(&mut out, MAXIMUM_PACKET_SIZE, self.maximum_packet_size);
        byte(&mut out, WILDCARD_SUBSCRIPTION_AVAILABLE, self.wildcard_subscription_available);
        byte(&mut out, SUBSCRIPTION_IDENTIFIER_AVAILABLE, self.subscription_identifier_available);
        byte(&mut out, SHARED_SUBSCRIPTION_AVAILABLE, self.shared_subscription_available);
        out
    }

    /// Appends the length-prefixed property list.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let body = self.body();
        // A property list is bounded by the packet size, far below 2^28.
        out.put_var_int(u32::try_from(body.len()).unwrap_or(u32::MAX));
        out.extend_from_slice(&body);
    }

    /// Bytes `encode` writes.
    pub fn encoded_len(&self) -> usize {
        let len = self.body().len();
        var_int_len(u32::try_from(len).unwrap_or(u32::MAX)) + len
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn round_trip(p: &Properties, context: Context) -> Properties {
        let mut out = Vec::new();
        p.encode(&mut out);
        assert_eq!(out.len(), p.encoded_len());
        let mut r = Reader::new(&out);
        let back = Properties::decode(&mut r, context).unwrap();
        assert!(r.is_empty());
        back
    }

    #[test]
    fn publish_properties_round_trip() {
        let p = Properties {
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(60),
            content_type: Some("text/plain".into()),
            response_topic: Some("reply/here".into()),
            correlation_data: Some(vec![1, 2, 3]),
            subscription_identifiers: vec![7, 300],
            topic_alias: Some(4),
            user_properties: vec![("a".into(), "1".into()), ("a".into(), "2".into())],
            ..Properties::default()
        };
        assert_eq!(round_trip(&p, Context::Publish), p);
    }

    #[test]
    fn properties_outside_their_packet_are_malformed() {
        let p = Properties { topic_alias: Some(1), ..Properties::default() };
        let mut out = Vec::new();
        p.encode(&mut out);
        assert!(matches!(Properties::decode(&mut Reader::new(&out), Context::Connect), Err(DecodeError::Malformed(_))));
    }

    #[test]
    fn repeated_and_unknown_properties_are_refused() {
        let twice = [6, MESSAGE_EXPIRY_INTERVAL, 0, 0, 0, 1, MESSAGE_EXPIRY_INTERVAL];
        assert!(Properties::decode(&mut Reader::new(&twice), Context::Publish).is_err());
        let unknown = [2, 0x7f, 0];
        assert!(matches!(
            Properties::decode(&mut Reader::new(&unknown), Context::Publish),
            Err(DecodeError::Malformed(_))
        ));
        let overlong = [9, PAYLOAD_FORMAT_INDICATOR, 1];
        assert_eq!(Properties::decode(&mut Reader::new(&overlong), Context::Publish), Err(DecodeError::Truncated));
    }

    #[test]
    fn zero_values_that_the_spec_forbids_are_protocol_errors() {
        for bytes in [[3u8, RECEIVE_MAXIMUM, 0, 0], [3, TOPIC_ALIAS_MAXIMUM, 0, 0]] {
            let ctx = Context::Connect;
            let result = Properties::decode(&mut Reader::new(&bytes), ctx);
            if bytes[1] == RECEIVE_MAXIMUM {
                assert!(matches!(result, Err(DecodeError::Protocol(_))));
            } else {
                assert_eq!(result.unwrap().topic_alias_maximum, Some(0));
            }
        }
    }
}
