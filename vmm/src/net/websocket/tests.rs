//! The adapter against a real tungstenite client, driven in memory, and
//! against hand-made frames for what a polite client never sends.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::rc::Rc;

use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::HandshakeError;
use tungstenite::protocol::frame::Frame;
use tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tungstenite::{Error, Message, WebSocket};

use super::{Subprotocol, WsError, WsLimits, WsServer, WsState};

/// The bytes in flight each way between the client and the adapter.
#[derive(Default)]
struct Wire {
    to_server: Vec<u8>,
    to_client: Vec<u8>,
}

/// The client's socket.
struct ClientEnd(Rc<RefCell<Wire>>);

impl Read for ClientEnd {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut wire = self.0.borrow_mut();
        if wire.to_client.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(wire.to_client.len());
        buf[..n].copy_from_slice(&wire.to_client[..n]);
        wire.to_client.drain(..n);
        Ok(n)
    }
}

impl Write for ClientEnd {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.borrow_mut().to_server.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A tungstenite client and the adapter, with what reached the broker.
struct Pair {
    wire: Rc<RefCell<Wire>>,
    client: WebSocket<ClientEnd>,
    server: WsServer,
    broker: Vec<u8>,
}

impl Pair {
    /// Moves the client's bytes through the adapter (in `piece`-sized
    /// reads) and the adapter's answers back; the first error is returned.
    fn deliver(&mut self, piece: usize) -> Result<(), WsError> {
        let bytes = std::mem::take(&mut self.wire.borrow_mut().to_server);
        let mut result = Ok(());
        for chunk in bytes.chunks(piece.max(1)) {
            if let Err(error) = self.server.receive(chunk) {
                result = Err(error);
                break;
            }
        }
        self.drain();
        result
    }

    /// Takes what the adapter has for the broker and the client.
    fn drain(&mut self) {
        let for_broker = self.server.to_broker().to_vec();
        self.server.consume_to_broker(for_broker.len());
        self.broker.extend_from_slice(&for_broker);
        let for_client = self.server.to_client().to_vec();
        self.server.consume_to_client(for_client.len());
        self.wire.borrow_mut().to_client.extend_from_slice(&for_client);
    }

    fn send(&mut self, message: Message) {
        self.client.send(message).unwrap();
    }

    /// The client's next message, if one has arrived.
    fn read(&mut self) -> Option<Message> {
        match self.client.read() {
            Ok(message) => Some(message),
            Err(Error::Io(error)) if error.kind() == io::ErrorKind::WouldBlock => None,
            Err(error) => panic!("client: {error}"),
        }
    }
}

/// Connects a tungstenite client offering `subprotocols` at `uri`,
/// delivering its bytes in `piece`-sized reads.
fn connect(uri: &str, subprotocols: &str, limits: WsLimits, piece: usize) -> Result<Pair, Box<(Error, WsServer)>> {
    let wire = Rc::new(RefCell::new(Wire::default()));
    let mut request = uri.into_client_request().unwrap();
    if !subprotocols.is_empty() {
        request.headers_mut().insert("Sec-WebSocket-Protocol", subprotocols.parse().unwrap());
    }
    let mut server = WsServer::new(limits);
    let mut attempt = tungstenite::client(request, ClientEnd(wire.clone()));
    loop {
        match attempt {
            Ok((client, _response)) => return Ok(Pair { wire, client, server, broker: Vec::new() }),
            Err(HandshakeError::Failure(error)) => return Err(Box::new((error, server))),
            Err(HandshakeError::Interrupted(mid)) => {
                let request = std::mem::take(&mut wire.borrow_mut().to_server);
                for chunk in request.chunks(piece) {
                    let _ = server.receive(chunk);
                }
                let answer = server.to_client().to_vec();
                server.consume_to_client(answer.len());
                wire.borrow_mut().to_client.extend_from_slice(&answer);
                attempt = mid.handshake();
            }
        }
    }
}

fn connected(uri: &str, subprotocols: &str, limits: WsLimits, piece: usize) -> Pair {
    connect(uri, subprotocols, limits, piece).unwrap_or_else(|failed| panic!("{uri}: {}", failed.0))
}

fn open(piece: usize) -> Pair {
    connected("ws://Acme.Example:8080/mqtt", "mqtt", WsLimits::default(), piece)
}

/// A client frame as sent on the wire: masked unless `mask` is `None`.
fn frame(first: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut bytes = vec![first];
    let masked = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        len @ 0..=125 => bytes.push(masked | u8::try_from(len).unwrap()),
        len @ 126..=0xffff => {
            bytes.push(masked | 126);
            bytes.extend_from_slice(&u16::try_from(len).unwrap().to_be_bytes());
        }
        len => {
            bytes.push(masked | 127);
            bytes.extend_from_slice(&u64::try_from(len).unwrap().to_be_bytes());
        }
    }
    if let Some(mask) = mask {
        bytes.extend_from_slice(&mask);
        bytes.extend(payload.iter().enumerate().map(|(i, byte)| byte ^ mask[i % 4]));
    } else {
        bytes.extend_from_slice(payload);
    }
    bytes
}

const MASK: Option<[u8; 4]> = Some([0x11, 0x22, 0x33, 0x44]);
const CONNECT: &[u8] = b"\x10\x10\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x00\x00";

#[test]
fn upgrade_then_mqtt_both_ways_in_any_pieces() {
    for piece in [1, 7, 4096] {
        let mut pair = open(piece);
        assert_eq!(pair.server.state(), WsState::Open);
        let upgrade = pair.server.upgrade().unwrap();
        assert_eq!((upgrade.path.as_str(), upgrade.subprotocol), ("/mqtt", Subprotocol::Mqtt));
        assert_eq!((upgrade.host.as_str(), upgrade.host_name()), ("Acme.Example:8080", "acme.example".to_string()));

        pair.send(Message::binary(CONNECT));
        pair.deliver(piece).unwrap();
        assert_eq!(pair.broker, CONNECT);
        pair.server.send(b"\x20\x03\x00\x00\x00").unwrap();
        pair.drain();
        assert_eq!(pair.read(), Some(Message::binary(&b"\x20\x03\x00\x00\x00"[..])));
        // A large packet: a 2-byte and an 8-byte length in the frame header.
        for len in [300, 70_000] {
            let packet = vec![0x5a; len];
            pair.server.send(&packet).unwrap();
            pair.drain();
            assert_eq!(pair.read(), Some(Message::binary(packet)));
        }
    }
}

#[test]
fn both_subprotocols_and_both_paths() {
    for (uri, offered, agreed) in [
        ("ws://h/mqtt", "mqtt", Subprotocol::Mqtt),
        ("ws://h/", "mqttv3.1", Subprotocol::MqttV31),
        ("ws://h/mqtt?client=x", "mqttv3.1, mqtt", Subprotocol::Mqtt),
        ("ws://h/", "wamp, mqtt", Subprotocol::Mqtt),
    ] {
        let pair = connected(uri, offered, WsLimits::default(), 64);
        assert_eq!(pair.server.upgrade().unwrap().subprotocol, agreed, "{uri} {offered}");
    }
}

#[test]
fn packets_span_frames_and_frames_hold_several_packets() {
    let mut pair = open(4096);
    let publish = b"\x30\x0a\x00\x03a/bhello";
    let stream: Vec<u8> = [CONNECT, publish, publish, b"\xc0\x00"].concat();
    // Split at arbitrary points: mid-packet, several packets in one frame.
    let cuts = [3, 17, 40, stream.len()];
    let mut from = 0;
    for to in cuts {
        pair.send(Message::binary(stream[from..to].to_vec()));
        from = to;
    }
    // And one message in three fragments.
    pair.client.write(Message::Frame(Frame::message(&publish[..4], OpCode::Data(Data::Binary), false))).unwrap();
    pair.client.write(Message::Frame(Frame::message(&publish[4..9], OpCode::Data(Data::Continue), false))).unwrap();
    pair.client.write(Message::Frame(Frame::message(&publish[9..], OpCode::Data(Data::Continue), true))).unwrap();
    pair.client.flush().unwrap();
    pair.deliver(5).unwrap();
    assert_eq!(pair.broker, [&stream[..], publish].concat());
}

#[test]
fn frames_in_the_same_read_as_the_request_are_kept() {
    let mut server = WsServer::new(WsLimits::default());
    let request = "GET /mqtt HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
                   Sec-WebSocket-Protocol: mqtt\r\n\r\n";
    let bytes = [request.as_bytes(), &frame(0x82, CONNECT, MASK)].concat();
    server.receive(&bytes).unwrap();
    let response = String::from_utf8(server.to_client().to_vec()).unwrap();
    // The accept key of RFC 6455 §1.3's example.
    assert!(response.starts_with("HTTP/1.1 101 Switching Protocols\r\n"), "{response}");
    assert!(response.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"), "{response}");
    assert!(response.contains("Sec-WebSocket-Protocol: mqtt\r\n"), "{response}");
    assert_eq!(server.to_broker(), CONNECT);
}

/// The adapter's answer to `request`, which it must refuse.
fn refusal(request: &str, limits: WsLimits) -> (WsError, String) {
    let mut server = WsServer::new(limits);
    let error = server.receive(request.as_bytes()).unwrap_err();
    assert_eq!(server.state(), WsState::Closed);
    assert!(server.to_broker().is_empty());
    (error, String::from_utf8(server.to_client().to_vec()).unwrap())
}

#[test]
fn each_bad_upgrade_gets_its_http_error() {
    let good = [
        "Host: h",
        "Upgrade: websocket",
        "Connection: keep-alive, Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Protocol: mqtt",
    ];
    let with = |line: &str, drop: &str, extra: &str| -> String {
        let headers: Vec<&str> =
            good.iter().copied().filter(|header| !header.starts_with(drop) || drop.is_empty()).collect();
        format!("{line}\r\n{}\r\n{extra}\r\n", headers.join("\r\n"))
    };
    let big = format!("X-Big: {}\r\n", "a".repeat(2000));
    let many: String = (0..80).map(|i| format!("X-{i}: 1\r\n")).collect();
    let cases = [
        (with("GET /other HTTP/1.1", "", ""), 404, ""),
        (with("POST /mqtt HTTP/1.1", "", ""), 405, "Allow: GET\r\n"),
        (with("GET /mqtt HTTP/1.0", "", ""), 400, ""),
        (with("GET /mqtt HTTP/1.1", "Upgrade", ""), 426, "Upgrade: websocket\r\n"),
        (with("GET /mqtt HTTP/1.1", "Connection", ""), 426, "Upgrade: websocket\r\n"),
        (
            with("GET /mqtt HTTP/1.1", "Sec-WebSocket-Version", "Sec-WebSocket-Version: 8\r\n"),
            426,
            "Sec-WebSocket-Version: 13\r\n",
        ),
        (with("GET /mqtt HTTP/1.1", "Sec-WebSocket-Key", "Sec-WebSocket-Key: short\r\n"), 400, ""),
        (with("GET /mqtt HTTP/1.1", "Sec-WebSocket-Key", ""), 400, ""),
        (with("GET /mqtt HTTP/1.1", "Sec-WebSocket-Protocol", "Sec-WebSocket-Protocol: wamp, mqttv5\r\n"), 400, ""),
        (with("GET /mqtt HTTP/1.1", "Sec-WebSocket-Protocol", ""), 400, ""),
        (with("GET /mqtt HTTP/1.1", "Host", ""), 400, ""),
        (with("GET /mqtt HTTP/1.1", "", "Host: other\r\n"), 400, ""),
        (with("GET /mqtt HTTP/1.1", "", &big), 431, ""),
        (with("GET /mqtt HTTP/1.1", "", &many), 431, ""),
        // MQTT, or TLS, sent to a WebSocket port: refused at once.
        ("\x10\x10\x00\x04MQTT\x05\x02\x00\x3c".to_string(), 400, ""),
        ("\x16\x03\x01\x00\x7f\x01".to_string(), 400, ""),
    ];
    let limits = WsLimits { max_request: 1024, ..WsLimits::default() };
    for (request, status, header) in cases {
        let (error, response) = refusal(&request, limits);
        let WsError::Refused(refused) = error else { unreachable!() };
        assert_eq!(refused.status, status, "{request:?} got {response}");
        assert!(response.starts_with(&format!("HTTP/1.1 {status} ")), "{response}");
        assert!(response.contains("Connection: close\r\n") && response.contains(header), "{response}");
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}\r\n", body.len())), "{response}");
        assert_eq!(body, format!("{}\n", refused.reason));
    }
    // A request that never ends is refused once it reaches the limit.
    let mut server = WsServer::new(limits);
    let mut result = Ok(());
    for _ in 0..1024 {
        result = server.receive(b"a");
        if result.is_err() {
            break;
        }
    }
    assert!(matches!(result, Err(WsError::Refused(refused)) if refused.status == 431), "{result:?}");
}

#[test]
fn a_real_client_sees_the_refusal() {
    let Err(failed) = connect("ws://h/nope", "mqtt", WsLimits::default(), 64) else { panic!() };
    let (error, server) = *failed;
    assert!(matches!(&error, Error::Http(response) if response.status() == 404), "{error}");
    assert_eq!(server.state(), WsState::Closed);
    let Err(failed) = connect("ws://h/mqtt", "", WsLimits::default(), 64) else { panic!() };
    let (error, _) = *failed;
    assert!(matches!(&error, Error::Http(response) if response.status() == 400), "{error}");
}

/// The close frame the client got.
fn close_code(pair: &mut Pair) -> Option<CloseCode> {
    loop {
        match pair.read() {
            Some(Message::Close(frame)) => return frame.map(|frame| frame.code),
            Some(_) => {}
            None => return None,
        }
    }
}

#[test]
fn a_text_frame_closes_with_1003_and_nothing_after_it_reaches_the_broker() {
    let mut pair = open(4096);
    pair.send(Message::binary(CONNECT));
    pair.send(Message::text("\u{10}hello"));
    pair.send(Message::binary(CONNECT));
    assert_eq!(pair.deliver(4096), Err(WsError::TextFrame));
    assert_eq!(pair.broker, CONNECT);
    assert_eq!(pair.server.state(), WsState::Closing);
    assert_eq!(close_code(&mut pair), Some(CloseCode::Unsupported));
    assert_eq!(pair.server.send(b"\x20\x02\x00\x00"), Err(WsError::NotOpen));
    // The client answers the close; the adapter is done.
    pair.client.flush().unwrap();
    pair.deliver(4096).unwrap();
    assert_eq!(pair.server.state(), WsState::Closed);
    assert_eq!(pair.broker, CONNECT);
}

#[test]
fn oversize_frames_and_messages_are_refused_before_their_bytes_come() {
    let limits = WsLimits { max_request: 4096, max_frame: 1024, max_message: 1500 };
    let mut pair = connected("ws://h/mqtt", "mqtt", limits, 4096);
    // The header of a 2,000-byte frame alone is refused with 1009.
    let header = &frame(0x82, &[0; 2000], MASK)[..8];
    assert_eq!(pair.server.receive(header), Err(WsError::TooLarge { limit: 1024 }));
    pair.drain();
    assert_eq!(close_code(&mut pair), Some(CloseCode::Size));

    let mut pair = connected("ws://h/mqtt", "mqtt", limits, 4096);
    let fragments = [frame(0x02, &[1; 1000], MASK), frame(0x00, &[2; 1000], MASK)].concat();
    assert_eq!(pair.server.receive(&fragments), Err(WsError::TooLarge { limit: 1500 }));
    assert!(pair.server.to_broker().is_empty());
}

#[test]
fn protocol_errors_close_with_1002() {
    let cases: [(&str, Vec<u8>); 4] = [
        ("unmasked", frame(0x82, CONNECT, None)),
        ("reserved opcode", frame(0x83, b"x", MASK)),
        ("continuation without a start", frame(0x80, b"x", MASK)),
        ("fragmented ping", frame(0x09, b"x", MASK)),
    ];
    for (what, bytes) in cases {
        let mut pair = open(4096);
        let error = pair.server.receive(&bytes).unwrap_err();
        assert!(matches!(error, WsError::Protocol(_)), "{what}: {error}");
        assert_eq!(error.close_code(), Some(1002));
        pair.drain();
        assert_eq!(close_code(&mut pair), Some(CloseCode::Protocol), "{what}");
        assert!(pair.broker.is_empty(), "{what}");
    }
}

#[test]
fn pings_are_answered_and_closes_end_the_connection() {
    let mut pair = open(4096);
    pair.send(Message::Ping(b"are you there".to_vec().into()));
    pair.deliver(3).unwrap();
    assert_eq!(pair.read(), Some(Message::Pong(b"are you there".to_vec().into())));
    pair.send(Message::Pong(b"unasked".to_vec().into()));
    pair.deliver(4096).unwrap();
    assert!(pair.broker.is_empty());

    // The client closes: the adapter answers and is done.
    pair.client.close(None).unwrap();
    pair.deliver(4096).unwrap();
    assert_eq!(pair.server.state(), WsState::Closed);
    assert!(matches!(pair.client.read(), Ok(Message::Close(_)) | Err(Error::ConnectionClosed)));

    // The broker ends it: close 1000, then done once the client answers.
    let mut pair = open(4096);
    pair.server.close();
    pair.drain();
    assert_eq!(pair.server.state(), WsState::Closing);
    assert_eq!(close_code(&mut pair), Some(CloseCode::Normal));
    pair.client.flush().unwrap();
    pair.deliver(4096).unwrap();
    assert_eq!(pair.server.state(), WsState::Closed);
}

#[test]
fn nothing_is_sent_before_the_upgrade_and_buffers_are_handed_back() {
    let mut server = WsServer::new(WsLimits::default());
    assert_eq!(server.send(CONNECT), Err(WsError::NotOpen));
    server.close();
    assert_eq!(server.state(), WsState::Closed);
    assert_eq!(server.receive(b"GET / HTTP/1.1\r\n\r\n"), Ok(()));
    assert!(server.to_client().is_empty());

    let mut pair = open(4096);
    let big = vec![7; 200_000];
    pair.server.send(&big).unwrap();
    let pending = pair.server.to_client().len();
    pair.server.consume_to_client(pending - 10);
    assert_eq!(pair.server.to_client(), &[7; 10]);
    pair.server.consume_to_client(10);
    assert!(pair.server.to_client().is_empty());
    assert_eq!(pair.server.to_client.bytes.capacity(), 0, "a large buffer is freed once written");
}
