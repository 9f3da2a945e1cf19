//! The transports with bytes already read from their socket (what
//! `mqvisor serve` hands over), over loopback TCP against real clients:
//! the pre-read bytes are taken first, readiness says so, and the TLS
//! handshakes in flight are bounded.

use std::io::{Read, Write};
use std::sync::Arc;
use std::task::{Context, Waker};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use tokio::net::TcpStream;

use super::ClientTransport;
use super::TcpClient;
use super::tls::{Handshakes, TlsClient};
use super::ws::WsClient;
use crate::net::tls::provider;
use crate::net::websocket::WsLimits;

const HOST: &str = "acme.mqtt.example";

/// A server config and a client config that trusts it.
fn configs() -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![HOST.to_string()]).unwrap().self_signed(&key).unwrap();
    let der = CertificateDer::from(cert.der().to_vec());
    let server = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))
        .unwrap();
    let mut roots = RootCertStore::empty();
    roots.add(der).unwrap();
    let client = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (Arc::new(server), Arc::new(client))
}

/// A connected pair over loopback: the client's blocking socket and the
/// server's, registered with the current runtime.
fn pair() -> (std::net::TcpStream, TcpStream) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (server, _) = listener.accept().unwrap();
    server.set_nonblocking(true).unwrap();
    (client, TcpStream::from_std(server).unwrap())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Readiness now, without waiting.
fn ready_now(client: &dyn ClientTransport) -> bool {
    client.poll_read_ready(&mut Context::from_waker(Waker::noop())).is_ready()
}

/// Reads what `client` has, as the proxy does: after read readiness,
/// until `want` bytes came; fails after a few seconds.
async fn read_some(client: &dyn ClientTransport, want: usize) -> Vec<u8> {
    let mut got = Vec::new();
    let read = async {
        while got.len() < want {
            std::future::poll_fn(|cx| client.poll_read_ready(cx)).await.unwrap();
            let mut buf = [0u8; 4096];
            match client.try_read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("read failed: {e}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read).await.expect("the client's bytes came");
    got
}

/// The ClientHello a client sends first (what the daemon read).
fn client_hello(client: &mut ClientConnection) -> Vec<u8> {
    let mut hello = Vec::new();
    while client.wants_write() {
        client.write_tls(&mut hello).unwrap();
    }
    hello
}

#[test]
fn a_tls_client_with_its_client_hello_already_read_completes_and_frees_its_slot() {
    let (server_config, client_config) = configs();
    let handshakes = Handshakes::new(4);
    let runtime = runtime();
    runtime.block_on(async {
        let (mut socket, server_socket) = pair();
        let mut conn = ClientConnection::new(client_config, ServerName::try_from(HOST).unwrap()).unwrap();
        let hello = client_hello(&mut conn);
        let slot = handshakes.start();
        let client =
            TlsClient::new(server_socket, ServerConnection::new(server_config).unwrap(), None, slot, &hello).unwrap();
        assert_eq!(handshakes.in_flight(), 1);
        // The client waits for the server's answer and sends nothing: only
        // the answers waiting make the server read-ready, and its read
        // sends them.
        let peer = std::thread::spawn(move || {
            let mut tls = rustls::Stream::new(&mut conn, &mut socket);
            tls.write_all(b"ping").unwrap();
            let mut pong = [0u8; 4];
            tls.read_exact(&mut pong).unwrap();
            pong
        });
        assert_eq!(read_some(&client, 4).await, b"ping");
        assert_eq!(handshakes.in_flight(), 0, "a completed handshake frees its slot");
        assert_eq!(client.try_write(b"pong").unwrap(), 4);
        assert_eq!(&tokio::task::spawn_blocking(move || peer.join().unwrap()).await.unwrap(), b"pong");
    });
}

#[test]
fn bytes_that_are_no_tls_or_too_many_drop_the_client_and_its_slot() {
    let (server_config, _) = configs();
    let handshakes = Handshakes::new(4);
    let runtime = runtime();
    runtime.block_on(async {
        let new = |bytes: &[u8]| {
            let (_peer, socket) = pair();
            let conn = ServerConnection::new(server_config.clone()).unwrap();
            TlsClient::new(socket, conn, None, handshakes.start(), bytes).map(|_| ())
        };
        assert!(new(b"CONNECT, not TLS").is_err());
        // A record header announcing a huge handshake, and far more bytes
        // than rustls buffers before it answers.
        let mut flood = vec![0x16, 0x03, 0x01, 0x40, 0x00];
        flood.resize(256 * 1024, 0x01);
        assert!(new(&flood).is_err());
        assert_eq!(handshakes.in_flight(), 0);
    });
}

#[test]
fn a_client_goes_and_its_slot_comes_back_and_none_is_given_past_the_bound() {
    let (server_config, client_config) = configs();
    let handshakes = Handshakes::new(2);
    let runtime = runtime();
    runtime.block_on(async {
        let first = handshakes.start().unwrap();
        let second = handshakes.start().unwrap();
        assert!(handshakes.start().is_none(), "no third handshake at once");
        drop(first);
        let (_peer, socket) = pair();
        let mut conn = ClientConnection::new(client_config, ServerName::try_from(HOST).unwrap()).unwrap();
        let hello = client_hello(&mut conn);
        let server = ServerConnection::new(server_config).unwrap();
        let client = TlsClient::new(socket, server, None, handshakes.start(), &hello).unwrap();
        assert!(handshakes.start().is_none());
        drop(client);
        drop(second);
        assert_eq!(handshakes.in_flight(), 0);
    });
}

/// A masked binary frame of `payload` as a client sends it.
fn client_frame(payload: &[u8]) -> Vec<u8> {
    let mask = [1u8, 2, 3, 4];
    let mut frame = vec![0x82, 0x80 | u8::try_from(payload.len()).unwrap()];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

const UPGRADE: &str = "GET /mqtt HTTP/1.1\r\nHost: acme.mqtt.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                       Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
                       Sec-WebSocket-Protocol: mqtt\r\n\r\n";

#[test]
fn a_websocket_client_with_its_upgrade_already_read_is_ready_at_once() {
    let runtime = runtime();
    runtime.block_on(async {
        let (mut socket, server_socket) = pair();
        let connect = [0x10, 0x02, 0x00, 0x00];
        let received = [UPGRADE.as_bytes(), &client_frame(&connect)].concat();
        let inner = Box::new(TcpClient::new(server_socket));
        let client = WsClient::with_received(inner, WsLimits::default(), &received).unwrap();
        // The MQTT bytes are here already: ready without any I/O.
        assert!(ready_now(&client));
        assert_eq!(read_some(&client, connect.len()).await, connect);
        // The 101 went out with that read, or goes with the next.
        let mut answer = tokio::task::spawn_blocking(move || {
            let mut answer = [0u8; 12];
            socket.read_exact(&mut answer).unwrap();
            (answer, socket)
        });
        let pump = async {
            loop {
                // Reads send what waits; nothing more comes from the client.
                let _ = client.try_read(&mut [0u8; 64]);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        let (answer, _socket) = tokio::select! {
            answer = &mut answer => answer.unwrap(),
            () = pump => unreachable!(),
        };
        assert_eq!(&answer, b"HTTP/1.1 101");

        // An upgrade only (nothing unframed yet): ready once the 101 can go.
        let (_peer, server_socket) = pair();
        let inner = Box::new(TcpClient::new(server_socket));
        let client = WsClient::with_received(inner, WsLimits::default(), UPGRADE.as_bytes()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), std::future::poll_fn(|cx| client.poll_read_ready(cx)))
            .await
            .expect("read-ready while the 101 waits")
            .unwrap();
    });
}

#[test]
fn more_than_an_upgrade_and_a_read_drops_the_websocket_client() {
    let runtime = runtime();
    runtime.block_on(async {
        let (_peer, server_socket) = pair();
        let limits = WsLimits::default();
        let received = vec![b'G'; limits.max_request + 64 * 1024];
        assert!(WsClient::with_received(Box::new(TcpClient::new(server_socket)), limits, &received).is_err());
    });
}

#[test]
fn a_short_tcp_read_ends_the_readiness_and_the_next_bytes_bring_it_back() {
    runtime().block_on(async {
        let (mut socket, server_socket) = pair();
        let client = TcpClient::new(server_socket);
        socket.write_all(b"first").unwrap();
        assert_eq!(read_some(&client, 5).await, b"first");
        // The read was shorter than its buffer: the socket is empty, and
        // the transport knows it without asking the kernel again.
        assert!(!ready_now(&client));
        let mut buf = [0u8; 64];
        assert_eq!(client.try_read(&mut buf).unwrap_err().kind(), std::io::ErrorKind::WouldBlock);
        // Bytes that come later make it ready again (no wake-up is lost).
        socket.write_all(b"second").unwrap();
        assert_eq!(read_some(&client, 6).await, b"second");
        // A read that fills its buffer says nothing of what is left.
        socket.write_all(&[7u8; 100]).unwrap();
        std::future::poll_fn(|cx| client.poll_read_ready(cx)).await.unwrap();
        let mut small = [0u8; 10];
        while client.try_read(&mut small).is_err() {
            std::future::poll_fn(|cx| client.poll_read_ready(cx)).await.unwrap();
        }
        assert!(ready_now(&client));
        assert_eq!(read_some(&client, 90).await, vec![7u8; 90]);
    });
}
