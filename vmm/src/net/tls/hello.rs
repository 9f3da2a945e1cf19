//! Reading a TLS ClientHello from a connection's first bytes, without a
//! handshake: for a front that picks a tenant by SNI and hands the raw
//! socket, with the bytes it read, to the process that owns the tenant's key.
//!
//! Owns: telling TLS from anything else by the first byte, the TLS record
//! layer (RFC 8446 §5.1) as far as the end of the first handshake message,
//! the size bound, and the parse of that message by rustls' [`Acceptor`],
//! from which the server name (SNI, RFC 6066 §3) and the ALPN ids are taken.
//!
//! Must never: consume or change the caller's bytes (they go on, whole, to
//! the process that completes the handshake), answer the handshake, buffer
//! past the limit, or panic on any input. The caller keeps the bytes and
//! calls again with more; this function holds no state, and its cost is
//! linear in the bytes given.

use rustls::server::Acceptor;

/// A ClientHello larger than this is refused unless the caller says
/// otherwise. Browsers with post-quantum key shares send about 2 KiB.
pub const DEFAULT_MAX_CLIENT_HELLO: usize = 16 * 1024;

/// Record header: content type, legacy version (2), length (2).
const RECORD_HEADER: usize = 5;
/// Largest plaintext record payload (RFC 8446 §5.1: 2^14).
const MAX_RECORD_PAYLOAD: usize = 1 << 14;
const CONTENT_TYPE_HANDSHAKE: u8 = 0x16;
const CONTENT_TYPE_ALERT: u8 = 0x15;
/// Handshake header: message type (1), length (3).
const HANDSHAKE_HEADER: usize = 4;
const HANDSHAKE_CLIENT_HELLO: u8 = 0x01;

/// What the first bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HelloPeek {
    /// Not TLS: the first byte is not a handshake record's (an MQTT
    /// CONNECT starts with 0x10, an HTTP request with a letter).
    NotTls,
    /// A TLS ClientHello so far: read more and call again.
    NeedMore,
    /// A complete ClientHello.
    Hello(ClientHelloInfo),
}

/// What a ClientHello asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHelloInfo {
    /// The DNS name the client asked for, in lower case; `None` without
    /// SNI (or with an IP address, which SNI cannot carry).
    pub server_name: Option<String>,
    /// The ALPN ids offered, in the client's order (empty: no ALPN).
    pub alpn: Vec<Vec<u8>>,
    /// How many of the bytes given hold the ClientHello's records.
    pub len: usize,
}

/// Why the first bytes are refused.
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    #[error("TLS ClientHello larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("not a TLS ClientHello: {0}")]
    Malformed(&'static str),
    #[error("TLS ClientHello refused: {0}")]
    Refused(rustls::Error),
}

impl HelloError {
    /// The fatal alert record to send before closing: `decode_error` for
    /// bytes that are no ClientHello, `handshake_failure` otherwise.
    pub fn alert(&self) -> [u8; 7] {
        match self {
            HelloError::Malformed(_) => alert_record(rustls::AlertDescription::DecodeError),
            HelloError::TooLarge { .. } | HelloError::Refused(_) => {
                alert_record(rustls::AlertDescription::HandshakeFailure)
            }
        }
    }
}

/// A fatal alert as a plaintext record (RFC 8446 §6), as sent before any
/// key is agreed: for example `UnrecognisedName` for a server name no
/// tenant has.
pub fn alert_record(description: rustls::AlertDescription) -> [u8; 7] {
    const FATAL: u8 = 2;
    [CONTENT_TYPE_ALERT, 0x03, 0x03, 0x00, 0x02, FATAL, u8::from(description)]
}

/// Reads the ClientHello at the start of `first`, the bytes a client sent
/// so far, refusing one that takes more than `limit` bytes of records.
pub fn peek_client_hello(first: &[u8], limit: usize) -> Result<HelloPeek, HelloError> {
    match first.first() {
        None => return Ok(HelloPeek::NeedMore),
        Some(&CONTENT_TYPE_HANDSHAKE) => {}
        Some(_) => return Ok(HelloPeek::NotTls),
    }
    let Some(len) = hello_records_len(first, limit)? else {
        return Ok(HelloPeek::NeedMore);
    };
    let mut acceptor = Acceptor::default();
    let mut records = &first[..len];
    while !records.is_empty() {
        acceptor.read_tls(&mut records).map_err(|_| HelloError::Malformed("records rustls cannot take"))?;
    }
    let accepted = match acceptor.accept() {
        Ok(Some(accepted)) => accepted,
        Ok(None) => return Err(HelloError::Malformed("the handshake message does not end where its length says")),
        Err((error, _alert)) => return Err(HelloError::Refused(error)),
    };
    let hello = accepted.client_hello();
    Ok(HelloPeek::Hello(ClientHelloInfo {
        server_name: hello.server_name().map(str::to_ascii_lowercase),
        alpn: hello.alpn().map(|ids| ids.map(<[u8]>::to_vec).collect()).unwrap_or_default(),
        len,
    }))
}

/// The length of the records that hold the first handshake message, once
/// they are all in `bytes`; `None` while more are needed. Checks the
/// record headers and that the message is a ClientHello within `limit`.
fn hello_records_len(bytes: &[u8], limit: usize) -> Result<Option<usize>, HelloError> {
    let mut at = 0;
    // The handshake header, which may itself be split across records.
    let mut header = [0u8; HANDSHAKE_HEADER];
    let mut header_len = 0;
    // Handshake bytes seen, and how many the message takes once known.
    let mut seen = 0;
    let mut needed = None;
    loop {
        let record = &bytes[at..];
        if let Some(&kind) = record.first()
            && kind != CONTENT_TYPE_HANDSHAKE
        {
            return Err(HelloError::Malformed("a record that is not a handshake record before the ClientHello ends"));
        }
        if let Some(&major) = record.get(1)
            && major != 0x03
        {
            return Err(HelloError::Malformed("a record version other than 3.x"));
        }
        if record.len() < RECORD_HEADER {
            return if at + RECORD_HEADER > limit { Err(HelloError::TooLarge { limit }) } else { Ok(None) };
        }
        let payload_len = usize::from(u16::from_be_bytes([record[3], record[4]]));
        if payload_len == 0 || payload_len > MAX_RECORD_PAYLOAD {
            return Err(HelloError::Malformed("a record length of 0 or over 2^14"));
        }
        let end = at + RECORD_HEADER + payload_len;
        if end > limit {
            return Err(HelloError::TooLarge { limit });
        }
        let payload = &record[RECORD_HEADER..record.len().min(RECORD_HEADER + payload_len)];
        let from_payload = (HANDSHAKE_HEADER - header_len).min(payload.len());
        header[header_len..header_len + from_payload].copy_from_slice(&payload[..from_payload]);
        header_len += from_payload;
        if needed.is_none() && header_len == HANDSHAKE_HEADER {
            if header[0] != HANDSHAKE_CLIENT_HELLO {
                return Err(HelloError::Malformed("the first handshake message is not a ClientHello"));
            }
            let body = usize::from(header[1]) << 16 | usize::from(header[2]) << 8 | usize::from(header[3]);
            if HANDSHAKE_HEADER + body > limit {
                return Err(HelloError::TooLarge { limit });
            }
            needed = Some(HANDSHAKE_HEADER + body);
        }
        seen += payload.len();
        if payload.len() < payload_len {
            return Ok(None);
        }
        if needed.is_some_and(|needed| seen >= needed) {
            return Ok(Some(end));
        }
        at = end;
    }
}
