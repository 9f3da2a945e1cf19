//! Reading ClientHellos of a real rustls client, whole, in pieces and in
//! 1-byte records, and refusing what is not one.

use super::super::hello::{ClientHelloInfo, DEFAULT_MAX_CLIENT_HELLO, HelloPeek, peek_client_hello};
use super::{Alpn, Client, Dir, HOST, ServerTls, ca, exchange, handshake, server_files};

/// A real client's first flight.
fn client_hello(client: Client<'_>) -> Vec<u8> {
    let mut client = client.connect();
    let mut bytes = Vec::new();
    while client.wants_write() {
        client.write_tls(&mut bytes).unwrap();
    }
    bytes
}

#[test]
fn hello_gives_the_server_name_and_alpn_of_a_real_client_in_any_pieces() {
    let ca = ca("hello CA");
    let hello = client_hello(Client { alpn: &[b"mqtt", b"x-other"], ..Client::new(&ca) });
    let expected = HelloPeek::Hello(ClientHelloInfo {
        server_name: Some(HOST.to_string()),
        alpn: vec![b"mqtt".to_vec(), b"x-other".to_vec()],
        len: hello.len(),
    });
    // Byte by byte, as a client writing 1-byte pieces would arrive.
    for end in 0..hello.len() {
        assert_eq!(peek_client_hello(&hello[..end], DEFAULT_MAX_CLIENT_HELLO).unwrap(), HelloPeek::NeedMore, "{end}");
    }
    assert_eq!(peek_client_hello(&hello, DEFAULT_MAX_CLIENT_HELLO).unwrap(), expected);
    // What follows the ClientHello is left alone.
    let mut more = hello.clone();
    more.extend_from_slice(&[0x14, 0x03, 0x03, 0x00, 0x01, 0x01]);
    assert_eq!(peek_client_hello(&more, DEFAULT_MAX_CLIENT_HELLO).unwrap(), expected);

    let no_sni = client_hello(Client { sni: false, alpn: &[], ..Client::new(&ca) });
    let HelloPeek::Hello(info) = peek_client_hello(&no_sni, DEFAULT_MAX_CLIENT_HELLO).unwrap() else { panic!() };
    assert_eq!((info.server_name, info.alpn), (None, vec![]));
}

#[test]
fn hello_split_into_one_byte_records_is_read_and_the_handshake_completes_after() {
    let dir = Dir::new("records");
    let ca = ca("records CA");
    let tls = ServerTls::load(server_files(&dir, &ca, Alpn::Mqtt)).unwrap();
    let mut client = Client::new(&ca).connect();
    let mut flight = Vec::new();
    while client.wants_write() {
        client.write_tls(&mut flight).unwrap();
    }
    // The same ClientHello, one handshake byte per record.
    let mut split = Vec::new();
    for &byte in &flight[5..] {
        split.extend_from_slice(&[flight[0], flight[1], flight[2], 0x00, 0x01, byte]);
    }
    for end in 0..split.len() {
        assert_eq!(peek_client_hello(&split[..end], DEFAULT_MAX_CLIENT_HELLO).unwrap(), HelloPeek::NeedMore);
    }
    let HelloPeek::Hello(info) = peek_client_hello(&split, DEFAULT_MAX_CLIENT_HELLO).unwrap() else { panic!() };
    assert_eq!(info.server_name.as_deref(), Some(HOST));
    // The front hands these very bytes on; the tenant's process finishes.
    let mut server = tls.new_connection().unwrap();
    let mut rest = &split[..];
    while !rest.is_empty() {
        server.read_tls(&mut rest).unwrap();
        server.process_new_packets().unwrap();
    }
    handshake(&mut client, &mut server).unwrap();
    exchange(&mut client, &mut server);
}

#[test]
fn hello_refuses_garbage_and_oversize_and_tells_other_protocols_apart() {
    let ca = ca("refusals CA");
    let hello = client_hello(Client::new(&ca));
    assert_eq!(peek_client_hello(b"\x10\x10\x00\x04MQTT\x04\x02\x00\x3c", 100).unwrap(), HelloPeek::NotTls);
    assert_eq!(peek_client_hello(b"GET /mqtt HTTP/1.1\r\n", 100).unwrap(), HelloPeek::NotTls);
    let refusals: [(&[u8], usize, &str); 7] = [
        (b"\x16\x02", 100, "record version"),
        (b"\x16\x03\x01\x00\x00", 100, "record length"),
        (b"\x16\x03\x01\x40\x01", 100_000, "record length"),
        (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", 100, "not a ClientHello"),
        (b"\x16\x03\x01\x00\x04\x01\x00\x00\x00", 100, "refused"),
        (b"\x16\x03\x01\x00\x01\x01\x15", 100, "not a handshake record"),
        (&hello[..40], 30, "larger than 30 bytes"),
    ];
    for (bytes, limit, problem) in refusals {
        let error = peek_client_hello(bytes, limit).unwrap_err();
        assert!(error.to_string().contains(problem), "{error} (expected: {problem})");
    }
    // A length that would pass the limit is refused before its bytes come.
    let error = peek_client_hello(&hello[..9], hello.len() - 1).unwrap_err();
    assert!(error.to_string().contains("larger than"), "{error}");
    assert!(matches!(peek_client_hello(&hello, hello.len()), Ok(HelloPeek::Hello(_))));
    let alert = peek_client_hello(b"\x16\x03\x01\x00\x00", 100).unwrap_err().alert();
    assert_eq!(alert, [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 50]);
}
