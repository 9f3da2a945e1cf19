//! The opening handshake of a WebSocket (RFC 6455 §4.2) for MQTT (MQTT 5
//! §6): reading the HTTP/1.1 upgrade request, and the response to it.
//!
//! What is refused, and how (each response says why in its body and ends
//! with `Connection: close`):
//!
//! | the request | status |
//! |---|---|
//! | larger than the limit before its blank line, or over 64 headers | 431 |
//! | not HTTP/1.1, malformed, no `Host` or two of them | 400 |
//! | a method other than `GET` | 405 (`Allow: GET`) |
//! | a path other than `/mqtt` or `/` (a query is ignored) | 404 |
//! | no `Upgrade: websocket` or no `Connection: upgrade` | 426 (`Upgrade: websocket`) |
//! | `Sec-WebSocket-Version` other than 13 | 426 (`Sec-WebSocket-Version: 13`) |
//! | no valid `Sec-WebSocket-Key` (16 bytes in base64), or two | 400 |
//! | no `mqtt` or `mqttv3.1` among its subprotocols | 400 |
//!
//! A request offering `mqtt` gets `mqtt` (MQTT-6.0.0-4); one offering only
//! `mqttv3.1` (older MQTT.js) gets that. Extensions such as
//! `permessage-deflate` are not taken up.
//!
//! Must never: read past the limit, or answer 101 to a request that fails
//! any check above.

use tungstenite::handshake::derive_accept_key;

/// Headers read at most; more is refused with 431.
const MAX_HEADERS: usize = 64;
/// The paths served: MQTT.js and most clients use `/mqtt`, MQTT.js in some
/// setups `/`.
const PATHS: [&str; 2] = ["/mqtt", "/"];

/// The subprotocol agreed (RFC 6455 §1.9).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subprotocol {
    /// `mqtt`, which MQTT 3.1.1 and 5 name.
    Mqtt,
    /// `mqttv3.1`, which older MQTT.js sends.
    MqttV31,
}

impl Subprotocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Subprotocol::Mqtt => "mqtt",
            Subprotocol::MqttV31 => "mqttv3.1",
        }
    }
}

/// An accepted upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    /// The path asked for (`/mqtt` or `/`), without a query.
    pub path: String,
    /// The `Host` header as sent (a name or an address, perhaps a port).
    pub host: String,
    /// The `Origin` header of a browser, if any.
    pub origin: Option<String>,
    pub subprotocol: Subprotocol,
    accept: String,
}

impl Upgrade {
    /// The host name of the `Host` header, in lower case, without a port:
    /// what a front routing by name compares.
    pub fn host_name(&self) -> String {
        let host = self.host.as_str();
        let name = match host.strip_prefix('[') {
            Some(rest) => rest.split_once(']').map_or(host, |(address, _)| address),
            None => match host.rsplit_once(':') {
                Some((name, port)) if port.bytes().all(|byte| byte.is_ascii_digit()) => name,
                _ => host,
            },
        };
        name.trim_end_matches('.').to_ascii_lowercase()
    }
}

/// A refused request: the status, and the reason in a few words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: &'static str,
    /// A header line the status calls for (RFC 9110 §15.5.6, §15.5.22;
    /// RFC 6455 §4.4), or nothing.
    header: &'static str,
}

impl Refusal {
    const fn new(status: u16, reason: &'static str) -> Self {
        Self { status, reason, header: "" }
    }

    const fn with_header(self, header: &'static str) -> Self {
        Self { header, ..self }
    }
}

/// What the bytes so far are.
#[derive(Debug)]
pub(super) enum Parsed {
    /// No blank line yet, within the limit.
    Incomplete,
    /// The request, and how many bytes it took.
    Complete { len: usize, outcome: Result<Upgrade, Refusal> },
}

/// Reads the upgrade request at the start of `bytes`, refusing one not
/// complete within `limit` bytes.
pub(super) fn parse(bytes: &[u8], limit: usize) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let outcome = match request.parse(bytes) {
        Ok(httparse::Status::Partial) if bytes.len() < limit => return Parsed::Incomplete,
        Ok(httparse::Status::Complete(len)) if len <= limit => {
            return Parsed::Complete { len, outcome: check(&request) };
        }
        Ok(_) | Err(httparse::Error::TooManyHeaders) => Refusal::new(431, "the request headers are too large"),
        Err(_) => Refusal::new(400, "malformed HTTP request"),
    };
    Parsed::Complete { len: bytes.len(), outcome: Err(outcome) }
}

fn check(request: &httparse::Request<'_, '_>) -> Result<Upgrade, Refusal> {
    if request.version != Some(1) {
        return Err(Refusal::new(400, "a WebSocket upgrade needs HTTP/1.1"));
    }
    if request.method != Some("GET") {
        return Err(Refusal::new(405, "a WebSocket upgrade is a GET request").with_header("Allow: GET\r\n"));
    }
    let target = request.path.unwrap_or_default();
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    if !PATHS.contains(&path) {
        return Err(Refusal::new(404, "MQTT over WebSockets is served at /mqtt and /"));
    }
    let headers = Headers(request.headers);
    if !headers.has_token("upgrade", "websocket") || !headers.has_token("connection", "upgrade") {
        return Err(
            Refusal::new(426, "this address serves MQTT over WebSockets only").with_header("Upgrade: websocket\r\n")
        );
    }
    if headers.only("sec-websocket-version")? != Some("13") {
        return Err(
            Refusal::new(426, "only WebSocket version 13 is served").with_header("Sec-WebSocket-Version: 13\r\n")
        );
    }
    let key = headers.only("sec-websocket-key")?.filter(|key| is_websocket_key(key));
    let key = key.ok_or(Refusal::new(400, "no valid Sec-WebSocket-Key"))?;
    let host = headers.only("host")?.ok_or(Refusal::new(400, "no Host header"))?;
    let offered = headers.tokens("sec-websocket-protocol");
    let subprotocol = [Subprotocol::Mqtt, Subprotocol::MqttV31]
        .into_iter()
        .find(|wanted| offered.iter().any(|offer| *offer == wanted.as_str()))
        .ok_or(Refusal::new(400, "no MQTT subprotocol offered (Sec-WebSocket-Protocol: mqtt)"))?;
    Ok(Upgrade {
        path: path.to_string(),
        host: host.to_string(),
        origin: headers.only("origin")?.map(str::to_string),
        subprotocol,
        accept: derive_accept_key(key.as_bytes()),
    })
}

/// Header values by case-insensitive name; values that are not text are
/// refused.
struct Headers<'h, 'b>(&'h [httparse::Header<'b>]);

impl<'b> Headers<'_, 'b> {
    fn values(&self, name: &str) -> impl Iterator<Item = Option<&'b str>> + '_ {
        let name = name.to_string();
        self.0
            .iter()
            .filter(move |header| header.name.eq_ignore_ascii_case(&name))
            .map(|header| std::str::from_utf8(header.value).ok().filter(|value| value.is_ascii()).map(str::trim))
    }

    /// The value of a header that may appear once at most.
    fn only(&self, name: &str) -> Result<Option<&'b str>, Refusal> {
        let mut values = self.values(name);
        let first = values.next();
        if values.next().is_some() || first.is_some_and(|value| value.is_none()) {
            return Err(Refusal::new(400, "a header that must appear once appears twice, or is not text"));
        }
        Ok(first.flatten())
    }

    /// The comma-separated tokens of every header `name`.
    fn tokens(&self, name: &str) -> Vec<&'b str> {
        self.values(name).flatten().flat_map(|value| value.split(',').map(str::trim)).collect()
    }

    fn has_token(&self, name: &str, token: &str) -> bool {
        self.tokens(name).iter().any(|found| found.eq_ignore_ascii_case(token))
    }
}

/// 16 bytes in base64: 22 characters of the alphabet and `==`.
fn is_websocket_key(key: &str) -> bool {
    key.len() == 24
        && key.ends_with("==")
        && key[..22].bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'+' || byte == b'/')
}

/// What a front that routes by `Host` makes of a client's first bytes.
#[derive(Debug)]
pub enum Peeked {
    /// No blank line yet, within the limit.
    Incomplete,
    /// A complete request that would be accepted.
    Upgrade(Upgrade),
    /// A refused request, and the response that says why.
    Refused(Vec<u8>),
}

/// Reads the upgrade request at the start of `bytes` as [`parse`] does,
/// for a front that hands the connection on without answering it.
pub fn peek(bytes: &[u8], limit: usize) -> Peeked {
    match parse(bytes, limit) {
        Parsed::Incomplete => Peeked::Incomplete,
        Parsed::Complete { outcome: Ok(upgrade), .. } => Peeked::Upgrade(upgrade),
        Parsed::Complete { outcome: Err(refusal), .. } => Peeked::Refused(refusal_response(refusal)),
    }
}

/// The response to a request for a host this address serves no tenant
/// for (421, RFC 9110 §15.5.20).
pub fn misdirected_response() -> Vec<u8> {
    refusal_response(Refusal::new(421, "no MQTT service has this host name here"))
}

/// The response to a request for a tenant that cannot be served now (503).
pub fn unavailable_response() -> Vec<u8> {
    refusal_response(Refusal::new(503, "this MQTT service is unavailable"))
}

/// The 101 response that completes the handshake.
pub(super) fn accept_response(upgrade: &Upgrade) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\nSec-WebSocket-Protocol: {}\r\n\r\n",
        upgrade.accept,
        upgrade.subprotocol.as_str()
    )
    .into_bytes()
}

/// The error response to a refused request.
pub(super) fn refusal_response(refusal: Refusal) -> Vec<u8> {
    let phrase = match refusal.status {
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        421 => "Misdirected Request",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let body = format!("{}\n", refusal.reason);
    format!(
        "HTTP/1.1 {} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\
         Connection: close\r\n{}\r\n{body}",
        refusal.status,
        body.len(),
        refusal.header
    )
    .into_bytes()
}
