//! MQTT over WebSockets, server side (MQTT 5 §6, RFC 6455), as a sans-I/O
//! adapter between a client's socket and the broker's byte stream.
//!
//! Owns one client's WebSocket: the HTTP upgrade ([`handshake`], where the
//! refusals and their status codes are listed), then the frames, read with
//! tungstenite's codec. Bytes from the client go in through
//! [`WsServer::receive`]; the MQTT bytes they carry come out of
//! [`WsServer::to_broker`], whatever frames they came in (a packet may span
//! frames, a frame may hold several packets: MQTT-6.0.0-2). MQTT bytes from
//! the broker go in through [`WsServer::send`], each call one binary frame;
//! what the client must be sent (the 101 or the refusal, frames, pongs,
//! closes) comes out of [`WsServer::to_client`].
//!
//! The call order, for a poll loop over a nonblocking socket: after each
//! read from the client, `receive`, then write out `to_client` and
//! `to_broker` as far as the socket and the stream take them, calling
//! `consume_*` with what was taken; stop reading the client while
//! `to_broker` or `to_client` is long (that is the backpressure: nothing
//! here drops bytes, and a client may send pings without reading a pong).
//! Once [`WsServer::state`] is `Closing` or `Closed`, nothing more goes to
//! the broker; write out `to_client`, then close the socket (`Closed`), or
//! give the client a moment to answer the close (`Closing`).
//!
//! Bounds: the upgrade request is at most [`WsLimits::max_request`] bytes; a
//! frame whose header announces more than [`WsLimits::max_frame`] bytes is
//! refused before its payload is buffered (close 1009), and so is a
//! fragmented message past [`WsLimits::max_message`]. A text frame is
//! refused with close 1003 (MQTT-6.0.0-1), other protocol errors with 1002,
//! invalid UTF-8 in a close reason with 1007. An idle connection holds a
//! 4 KiB read buffer and this struct.
//!
//! Must never: do I/O or read a clock, pass a text frame's bytes to the
//! broker, pass anything after the first error, or answer a client's
//! frames before the upgrade is accepted. `mqvisor run`'s WebSocket
//! listeners use it through `net::transport::ws`.

pub mod handshake;
#[cfg(test)]
mod tests;

use std::io::{self, Read, Write};

use tungstenite::error::{CapacityError, Error as WsLibError, ProtocolError};
use tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tungstenite::protocol::frame::{CloseFrame, FrameHeader};
use tungstenite::protocol::{Message, Role, WebSocketConfig, WebSocketContext};

pub use handshake::{Refusal, Subprotocol, Upgrade};

/// Room a frame has beyond the largest packet: a client may put small
/// packets in the same frame as a large one.
const FRAME_SLACK: usize = 64 * 1024;
/// Read buffer of an open WebSocket, grown for a large frame only while it
/// arrives.
const READ_BUFFER: usize = 4 * 1024;
/// The upgrade request is parsed on every read until it is this long (to
/// refuse at once what is not HTTP), then only at a blank line.
const EAGER_PARSE: usize = 16;
/// A buffer emptied with more capacity than this gives it back.
const KEEP_CAPACITY: usize = 64 * 1024;

/// How much one client may make this adapter hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WsLimits {
    /// The upgrade request, up to its blank line.
    pub max_request: usize,
    /// One frame's payload (also the most a frame in flight can reserve).
    pub max_frame: usize,
    /// One message's payload, its fragments together.
    pub max_message: usize,
}

impl WsLimits {
    /// Limits for a broker taking packets of up to `max_packet` bytes:
    /// frames and messages of one such packet and some more, and a 16 KiB
    /// request (browsers send cookies).
    pub const fn for_max_packet(max_packet: usize) -> Self {
        let frame = max_packet.saturating_add(FRAME_SLACK);
        Self { max_request: 16 * 1024, max_frame: frame, max_message: frame }
    }
}

impl Default for WsLimits {
    /// For the broker's default 1 MiB packets.
    fn default() -> Self {
        Self::for_max_packet(1 << 20)
    }
}

/// Where a connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WsState {
    /// Reading the upgrade request.
    Handshake,
    /// Upgraded: MQTT bytes flow both ways.
    Open,
    /// A close was sent (an error, or [`WsServer::close`]); the client's
    /// answer is awaited, and nothing goes to the broker.
    Closing,
    /// Done: the close handshake completed, or the upgrade was refused.
    Closed,
}

/// Why a connection ended; each is also what the client was sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    #[error("upgrade refused with HTTP {}: {}", .0.status, .0.reason)]
    Refused(Refusal),
    #[error("a text frame (MQTT over WebSockets is binary frames only)")]
    TextFrame,
    #[error("a frame or message over {limit} bytes")]
    TooLarge { limit: usize },
    #[error("text that is not UTF-8 in a close frame")]
    InvalidUtf8,
    #[error("WebSocket protocol error: {0}")]
    Protocol(ProtocolError),
    #[error("the WebSocket is not open")]
    NotOpen,
    /// Nothing the codec reports beside the above can happen with the
    /// buffers here; if it does, it ends the connection too.
    #[error("WebSocket codec failure")]
    Codec,
}

impl WsError {
    /// The close code sent for it (RFC 6455 §7.4.1), if a close was sent.
    pub fn close_code(&self) -> Option<u16> {
        let code = match self {
            WsError::Refused(_) | WsError::NotOpen => return None,
            WsError::TextFrame => CloseCode::Unsupported,
            WsError::TooLarge { .. } => CloseCode::Size,
            WsError::InvalidUtf8 => CloseCode::Invalid,
            WsError::Protocol(_) => CloseCode::Protocol,
            WsError::Codec => CloseCode::Error,
        };
        Some(code.into())
    }
}

/// One client's WebSocket; see the module docs for the call order.
#[derive(Debug)]
pub struct WsServer {
    limits: WsLimits,
    phase: Phase,
    upgrade: Option<Upgrade>,
    to_broker: Outbox,
    to_client: Outbox,
}

#[derive(Debug)]
enum Phase {
    /// The request so far (at most `max_request` bytes).
    Request(Vec<u8>),
    /// Upgraded; `closing` once a close has been sent.
    Frames {
        codec: Box<WebSocketContext>,
        closing: bool,
    },
    Closed,
}

impl WsServer {
    pub fn new(limits: WsLimits) -> Self {
        Self {
            limits,
            phase: Phase::Request(Vec::new()),
            upgrade: None,
            to_broker: Outbox::default(),
            to_client: Outbox::default(),
        }
    }

    pub fn state(&self) -> WsState {
        match self.phase {
            Phase::Request(_) => WsState::Handshake,
            Phase::Frames { closing: false, .. } => WsState::Open,
            Phase::Frames { closing: true, .. } => WsState::Closing,
            Phase::Closed => WsState::Closed,
        }
    }

    /// The accepted upgrade request (path, host, subprotocol), once open.
    pub fn upgrade(&self) -> Option<&Upgrade> {
        self.upgrade.as_ref()
    }

    /// Takes bytes the client sent. An error ends the connection: what the
    /// client is to be told is in [`to_client`](Self::to_client), and
    /// nothing more goes to the broker.
    pub fn receive(&mut self, mut bytes: &[u8]) -> Result<(), WsError> {
        if let Phase::Request(request) = &mut self.phase {
            let room = self.limits.max_request.saturating_sub(request.len());
            let take = bytes.len().min(room);
            let searched_from = request.len().saturating_sub(3);
            request.extend_from_slice(&bytes[..take]);
            // Parse the first bytes (what is not HTTP is refused at once),
            // then only once a blank line may have arrived: a request
            // written a byte at a time costs linear time.
            let blank_line = request[searched_from..].windows(2).any(|pair| pair == b"\n\n")
                || request[searched_from..].windows(3).any(|triple| triple == b"\n\r\n");
            let full = request.len() >= self.limits.max_request;
            if !blank_line && !full && searched_from >= EAGER_PARSE {
                return Ok(());
            }
            let (len, outcome) = match handshake::parse(request, self.limits.max_request) {
                handshake::Parsed::Incomplete => return Ok(()),
                handshake::Parsed::Complete { len, outcome } => (len, outcome),
            };
            let upgrade = match outcome {
                Ok(upgrade) => upgrade,
                Err(refusal) => {
                    self.to_client.push(&handshake::refusal_response(refusal));
                    self.phase = Phase::Closed;
                    return Err(WsError::Refused(refusal));
                }
            };
            // Frames may follow the request in the same read.
            let mut early = request.split_off(len);
            early.extend_from_slice(&bytes[take..]);
            bytes = &[];
            self.to_client.push(&handshake::accept_response(&upgrade));
            self.upgrade = Some(upgrade);
            let config = WebSocketConfig::default()
                .read_buffer_size(READ_BUFFER)
                .write_buffer_size(0)
                .max_frame_size(Some(self.limits.max_frame))
                .max_message_size(Some(self.limits.max_message));
            let codec = WebSocketContext::from_partially_read(early, Role::Server, Some(config));
            self.phase = Phase::Frames { codec: Box::new(codec), closing: false };
        }
        self.read_frames(bytes)
    }

    /// Frames MQTT bytes from the broker as one binary frame to the client.
    pub fn send(&mut self, mqtt: &[u8]) -> Result<(), WsError> {
        if self.state() != WsState::Open {
            return Err(WsError::NotOpen);
        }
        if mqtt.is_empty() {
            return Ok(());
        }
        let header = FrameHeader { opcode: OpCode::Data(Data::Binary), ..FrameHeader::default() };
        let len = u64::try_from(mqtt.len()).map_err(|_| WsError::Codec)?;
        header.format(len, &mut self.to_client.bytes).map_err(|_| WsError::Codec)?;
        self.to_client.push(mqtt);
        Ok(())
    }

    /// The broker ended the connection: a normal close (1000) to the client,
    /// or, before the upgrade, nothing.
    pub fn close(&mut self) {
        match &mut self.phase {
            Phase::Request(_) => self.phase = Phase::Closed,
            Phase::Frames { closing: false, .. } => self.fail(CloseCode::Normal, ""),
            Phase::Frames { closing: true, .. } | Phase::Closed => {}
        }
    }

    /// Bytes for the client's socket.
    pub fn to_client(&self) -> &[u8] {
        self.to_client.pending()
    }

    /// `n` bytes of [`to_client`](Self::to_client) were written.
    pub fn consume_to_client(&mut self, n: usize) {
        self.to_client.consume(n);
    }

    /// MQTT bytes for the broker.
    pub fn to_broker(&self) -> &[u8] {
        self.to_broker.pending()
    }

    /// `n` bytes of [`to_broker`](Self::to_broker) were passed on.
    pub fn consume_to_broker(&mut self, n: usize) {
        self.to_broker.consume(n);
    }

    /// Runs the codec over `input` until it needs more.
    fn read_frames(&mut self, input: &[u8]) -> Result<(), WsError> {
        let Phase::Frames { codec, closing } = &mut self.phase else { return Ok(()) };
        let mut pipe = Pipe { input, output: &mut self.to_client.bytes };
        let failure = loop {
            match codec.read(&mut pipe) {
                Ok(Message::Binary(data)) if !*closing => self.to_broker.push(&data),
                Ok(Message::Text(_)) if !*closing => break Some(WsError::TextFrame),
                // Pings are answered by the codec; a close is answered by it
                // too, and the next read reports the end.
                Ok(_) => {}
                Err(WsLibError::Io(error)) if error.kind() == io::ErrorKind::WouldBlock => break None,
                Err(WsLibError::ConnectionClosed | WsLibError::AlreadyClosed) => {
                    self.phase = Phase::Closed;
                    return Ok(());
                }
                Err(WsLibError::Capacity(CapacityError::MessageTooLong { max_size, .. })) => {
                    break Some(WsError::TooLarge { limit: max_size });
                }
                Err(WsLibError::Utf8(_)) => break Some(WsError::InvalidUtf8),
                Err(WsLibError::Protocol(error)) => break Some(WsError::Protocol(error)),
                Err(_) => break Some(WsError::Codec),
            }
        };
        match failure {
            None => {
                // Answers queued by the last read (a pong, a close) go out.
                if let Err(WsLibError::ConnectionClosed | WsLibError::AlreadyClosed) = codec.flush(&mut pipe) {
                    self.phase = Phase::Closed;
                }
                Ok(())
            }
            Some(_) if *closing => {
                // Already closing: the client's last bytes do not matter.
                self.phase = Phase::Closed;
                Ok(())
            }
            Some(error) => {
                let code = error.close_code().map_or(CloseCode::Protocol, CloseCode::from);
                self.fail(code, close_reason(&error));
                Err(error)
            }
        }
    }

    /// Sends a close with `code` and stops passing bytes to the broker.
    fn fail(&mut self, code: CloseCode, reason: &'static str) {
        let Phase::Frames { codec, closing } = &mut self.phase else { return };
        let mut pipe = Pipe { input: &[], output: &mut self.to_client.bytes };
        let frame = CloseFrame { code, reason: reason.into() };
        *closing = true;
        if let Err(WsLibError::ConnectionClosed | WsLibError::AlreadyClosed) = codec.close(&mut pipe, Some(frame)) {
            self.phase = Phase::Closed;
        }
    }
}

/// The reason sent in a close frame: a few words (at most 123 bytes).
fn close_reason(error: &WsError) -> &'static str {
    match error {
        WsError::TextFrame => "MQTT over WebSockets takes binary frames only",
        WsError::TooLarge { .. } => "frame too large",
        WsError::InvalidUtf8 => "invalid UTF-8",
        WsError::Protocol(_) => "protocol error",
        WsError::Codec => "internal error",
        WsError::Refused(_) | WsError::NotOpen => "",
    }
}

/// The codec's view of the connection: reads what was just received (then
/// "would block"), writes into the bytes for the client.
struct Pipe<'a> {
    input: &'a [u8],
    output: &'a mut Vec<u8>,
}

impl Read for Pipe<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.input.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.input.read(buf)
    }
}

impl Write for Pipe<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Bytes waiting to be taken from the front.
#[derive(Debug, Default)]
struct Outbox {
    bytes: Vec<u8>,
    start: usize,
}

impl Outbox {
    fn pending(&self) -> &[u8] {
        &self.bytes[self.start..]
    }

    fn push(&mut self, more: &[u8]) {
        self.bytes.extend_from_slice(more);
    }

    fn consume(&mut self, n: usize) {
        self.start = self.start.saturating_add(n).min(self.bytes.len());
        if self.start == self.bytes.len() {
            if self.bytes.capacity() > KEEP_CAPACITY {
                self.bytes = Vec::new();
            } else {
                self.bytes.clear();
            }
            self.start = 0;
        } else if self.start > KEEP_CAPACITY && self.start > self.bytes.len() / 2 {
            self.bytes.drain(..self.start);
            self.start = 0;
        }
    }
}
