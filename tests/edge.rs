//! The edge of `mqvisor run`: MQTT over TLS with real clients
//! (mosquitto_pub/mosquitto_sub `--cafile`, TLS 1.2 and 1.3; paho-mqtt),
//! a CA and certificates made in the test with `openssl`; mutual TLS; a
//! TLS-only VM (`--listen none`); and clients speaking the wrong protocol
//! on each port, refused without disturbing the others.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::pki::{OPENSSL, OPENSSL_PROBE, Pki};
use common::{kvm_available, mqvisor, tool_available};

const MOSQUITTO: &str = "mosquitto_pub/mosquitto_sub (apt-get install mosquitto-clients)";
const MOSQUITTO_PROBE: &str = "command -v mosquitto_pub && command -v mosquitto_sub";
const PAHO: &str = "Python paho-mqtt (pip install paho-mqtt)";
const PAHO_PROBE: &str = "python3 -c 'import paho.mqtt'";

const PLAIN: &str = "mqvisor: tenant VM listening on ";
const TLS: &str = "mqvisor: tenant VM listening for MQTT over TLS on ";
const WS: &str = "mqvisor: tenant VM listening for MQTT over WebSockets on ";
const WSS: &str = "mqvisor: tenant VM listening for MQTT over secure WebSockets on ";

/// A running `mqvisor run` with its plain and TLS addresses.
struct Vm {
    child: Child,
    plain: Option<SocketAddr>,
    tls: SocketAddr,
    ws: Option<SocketAddr>,
    wss: Option<SocketAddr>,
    /// Its stderr lines after the listening ones, as they come.
    log: Arc<Mutex<Vec<String>>>,
}

impl Vm {
    /// `mqvisor run ARGS`, waiting for the TLS listener's line (and the
    /// plain one, unless `--listen none`).
    fn start(args: &[&str]) -> Vm {
        let mut child =
            mqvisor().arg("run").args(args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("mqvisor");
        let plain_expected = !args.windows(2).any(|w| w == ["--listen", "none"]);
        let ws_expected = args.contains(&"--listen-ws");
        let wss_expected = args.contains(&"--listen-wss");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let (mut plain, mut tls, mut ws, mut wss) = (None, None, None, None);
        while tls.is_none()
            || (plain_expected && plain.is_none())
            || (ws_expected && ws.is_none())
            || (wss_expected && wss.is_none())
        {
            let line = lines.next().expect("mqvisor ended before listening").unwrap();
            for (marker, slot) in [(PLAIN, &mut plain), (TLS, &mut tls), (WS, &mut ws), (WSS, &mut wss)] {
                if let Some(addr) = line.strip_prefix(marker) {
                    *slot = Some(addr.parse().unwrap());
                }
            }
        }
        // Keep reading stderr, so the VM never blocks on it.
        let log = Arc::new(Mutex::new(Vec::new()));
        let keep = log.clone();
        thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                keep.lock().unwrap().push(line);
            }
        });
        Vm { child, plain, tls: tls.unwrap(), ws, wss, log }
    }

    /// Waits up to 10 s for a stderr line containing `needle`.
    fn wait_for_line(&self, needle: &str) -> String {
        for _ in 0..200 {
            if let Some(line) = self.log.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return line.clone();
            }
            thread::sleep(Duration::from_millis(50));
        }
        panic!("no line with {needle:?} in {:?}", self.log.lock().unwrap());
    }

    fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) with our own child's pid and a valid signal.
        unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // SAFETY: kill(2) with our own child's pid and a valid signal.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// mosquitto_pub of one message over TLS 1.3 trusting `ca`: did it succeed?
fn publish_trusting(addr: SocketAddr, ca: &str) -> bool {
    let port = addr.port().to_string();
    let out = Command::new("mosquitto_pub")
        .args(["-h", "localhost", "-p", &port, "--cafile", ca, "-t", "reload/x", "-m", "new", "-q", "1"])
        .output()
        .unwrap();
    out.status.success()
}

fn tls_args<'a>(pki: &'a Pki, extra: &[&'a str]) -> Vec<String> {
    let mut args: Vec<String> = ["--listen-tls", "127.0.0.1:0", "--tls-cert", "", "--tls-key", "", "--timeout", "120"]
        .iter()
        .map(ToString::to_string)
        .collect();
    args[3] = pki.path("server.pem");
    args[5] = pki.path("server.key");
    if !extra.contains(&"--listen") {
        args.extend(["--listen".to_string(), "127.0.0.1:0".to_string()]);
    }
    args.extend(extra.iter().map(ToString::to_string));
    args
}

fn start(args: &[String]) -> Vm {
    Vm::start(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// mosquitto_sub for 3 messages on `topic` over TLS, then mosquitto_pub
/// of 3 over TLS: the subscriber gets them all, in order.
fn mosquitto_tls_round_trip(addr: SocketAddr, pki: &Pki, tls_version: &str, client: &[String]) {
    let port = addr.port().to_string();
    let ca = pki.path("ca.pem");
    let topic = format!("tls/{tls_version}");
    let common = |cmd: &mut Command| {
        cmd.args(["-h", "localhost", "-p", &port, "--cafile", &ca, "--tls-version", tls_version, "-q", "1"])
            .args(client);
    };
    let mut sub = Command::new("mosquitto_sub");
    common(&mut sub);
    let sub = sub.args(["-t", "tls/#", "-C", "3", "-W", "20", "-v"]).stdout(Stdio::piped()).spawn().unwrap();
    thread::sleep(Duration::from_millis(500));
    for i in 0..3 {
        let mut publish = Command::new("mosquitto_pub");
        common(&mut publish);
        let out = publish.args(["-t", &topic, "-m", &format!("m{i}")]).output().unwrap();
        assert!(out.status.success(), "mosquitto_pub over {tls_version}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let out = sub.wait_with_output().unwrap();
    let got = String::from_utf8_lossy(&out.stdout);
    let expected: Vec<String> = (0..3).map(|i| format!("{topic} m{i}")).collect();
    assert_eq!(got.lines().collect::<Vec<_>>(), expected, "over {tls_version}");
}

/// A CONNECT (MQTT 3.1.1, clean session, keep-alive 30 s) for `client_id`.
fn connect_packet(client_id: &str) -> Vec<u8> {
    let id = client_id.as_bytes();
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 30];
    body.extend_from_slice(&u16::try_from(id.len()).unwrap().to_be_bytes());
    body.extend_from_slice(id);
    let mut packet = vec![0x10, u8::try_from(body.len()).unwrap()];
    packet.extend_from_slice(&body);
    packet
}

/// Plain MQTT: CONNECT, and the CONNACK (accepted) back.
fn plain_connack(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    stream.write_all(&connect_packet("plain")).unwrap();
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack).unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0]);
    stream
}

/// What the server sends back to `bytes`, until it closes (or 10 s pass).
fn answer_to(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(bytes).unwrap();
    let mut got = Vec::new();
    let _ = stream.read_to_end(&mut got);
    got
}

fn tools(test: &str) -> bool {
    kvm_available(test)
        && tool_available(test, OPENSSL, OPENSSL_PROBE)
        && tool_available(test, MOSQUITTO, MOSQUITTO_PROBE)
}

#[test]
fn mosquitto_clients_publish_and_subscribe_over_tls_1_2_and_1_3() {
    if !tools("mosquitto_clients_publish_and_subscribe_over_tls_1_2_and_1_3") {
        return;
    }
    let pki = Pki::make("mosquitto");
    let vm = start(&tls_args(&pki, &[]));
    for version in ["tlsv1.3", "tlsv1.2"] {
        mosquitto_tls_round_trip(vm.tls, &pki, version, &[]);
    }
    // The plain listener serves beside it.
    drop(plain_connack(vm.plain.unwrap()));
}

#[test]
fn the_wrong_protocol_on_either_port_is_refused_and_nobody_else_notices() {
    if !tools("the_wrong_protocol_on_either_port_is_refused_and_nobody_else_notices") {
        return;
    }
    let pki = Pki::make("wrong");
    let vm = start(&tls_args(&pki, &[]));
    let mut bystander = plain_connack(vm.plain.unwrap());

    // Plain MQTT on the TLS port: a TLS alert, then the close; no CONNACK.
    let got = answer_to(vm.tls, &connect_packet("lost"));
    assert!(got.is_empty() || got[0] == 0x15, "plain MQTT on the TLS port got {got:02x?}");
    // A TLS ClientHello on the plain port: no CONNACK either (the broker
    // closes a connection whose first packet is no CONNECT).
    let out = Command::new("sh")
        .args(["-c", &format!("openssl s_client -connect {} </dev/null", vm.plain.unwrap())])
        .output()
        .unwrap();
    assert!(!out.status.success() || !String::from_utf8_lossy(&out.stdout).contains("Verify return code: 0"));

    // The bystander is still served: a PINGREQ gets its PINGRESP.
    bystander.write_all(&[0xc0, 0]).unwrap();
    let mut pong = [0u8; 2];
    bystander.read_exact(&mut pong).unwrap();
    assert_eq!(pong, [0xd0, 0]);
    // And TLS clients still are.
    mosquitto_tls_round_trip(vm.tls, &pki, "tlsv1.3", &[]);
}

#[test]
fn tls_only_with_listen_none() {
    if !tools("tls_only_with_listen_none") {
        return;
    }
    let pki = Pki::make("only");
    let vm = start(&tls_args(&pki, &["--listen", "none"]));
    assert!(vm.plain.is_none());
    mosquitto_tls_round_trip(vm.tls, &pki, "tlsv1.3", &[]);
    // --listen none without a TLS listener is refused at start.
    let out: Output = mqvisor().args(["run", "--listen", "none"]).output().unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--listen none"), "{out:?}");
}

#[test]
fn mutual_tls_accepts_a_client_certificate_and_refuses_a_missing_one() {
    if !tools("mutual_tls_accepts_a_client_certificate_and_refuses_a_missing_one") {
        return;
    }
    let pki = Pki::make("mtls");
    let ca = pki.path("ca.pem");
    let vm = start(&tls_args(&pki, &["--tls-client-ca", &ca]));
    let client = ["--cert".to_string(), pki.path("client.pem"), "--key".to_string(), pki.path("client.key")];
    mosquitto_tls_round_trip(vm.tls, &pki, "tlsv1.3", &client);
    mosquitto_tls_round_trip(vm.tls, &pki, "tlsv1.2", &client);
    // Without a certificate: refused.
    let port = vm.tls.port().to_string();
    let out = Command::new("mosquitto_pub")
        .args(["-h", "localhost", "-p", &port, "--cafile", &ca, "-t", "x", "-m", "y", "-q", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a client without a certificate was served");
}

#[test]
fn settings_come_from_the_config_file_and_bad_files_are_named() {
    if !tools("settings_come_from_the_config_file_and_bad_files_are_named") {
        return;
    }
    let pki = Pki::make("config");
    let config = pki.dir.join("run.toml");
    std::fs::write(
        &config,
        "listen_tls = \"127.0.0.1:0\"\ntls_cert = \"server.pem\"\ntls_key = \"server.key\"\nmax_connections = 50\n",
    )
    .unwrap();
    let vm = Vm::start(&["--listen", "127.0.0.1:0", "--config", config.to_str().unwrap(), "--timeout", "60"]);
    mosquitto_tls_round_trip(vm.tls, &pki, "tlsv1.3", &[]);
    drop(vm);
    // A key that is not the certificate's: one line naming it, exit 125.
    let other_key = std::path::PathBuf::from(pki.path("client.key"));
    let out = mqvisor()
        .args(["run", "--listen-tls", "127.0.0.1:0", "--tls-cert", &pki.path("server.pem"), "--tls-key"])
        .arg(&other_key)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("client.key") && err.contains("does not match"), "{err}");
}

#[test]
fn paho_over_tls() {
    if !tools("paho_over_tls") || !tool_available("paho_over_tls", PAHO, PAHO_PROBE) {
        return;
    }
    let pki = Pki::make("paho");
    let vm = start(&tls_args(&pki, &[]));
    let script = r#"
import sys, ssl, threading
import paho.mqtt.client as mqtt
port, ca = int(sys.argv[1]), sys.argv[2]
got = threading.Event()
def on_message(c, u, m):
    if m.payload == b"over tls":
        got.set()
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
c.tls_set(ca_certs=ca)
c.on_message = on_message
c.connect("localhost", port)
c.loop_start()
c.subscribe("paho/tls", qos=1)[0]
import time; time.sleep(0.5)
c.publish("paho/tls", b"over tls", qos=1).wait_for_publish(10)
ok = got.wait(10)
c.disconnect(); c.loop_stop()
print("ok" if ok else "no message")
sys.exit(0 if ok else 1)
"#;
    let out =
        Command::new("python3").args(["-c", script, &vm.tls.port().to_string(), &pki.path("ca.pem")]).output().unwrap();
    assert!(
        out.status.success(),
        "paho over TLS: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn sighup_reads_the_certificate_again_and_keeps_clients_and_a_bad_file_changes_nothing() {
    if !tools("sighup_reads_the_certificate_again_and_keeps_clients_and_a_bad_file_changes_nothing") {
        return;
    }
    let old = Pki::make("reload-old");
    let new = Pki::make("reload-new");
    // The VM reads its files from a folder of its own, rewritten below.
    let live = Pki::make("reload-live");
    for file in ["server.pem", "server.key"] {
        std::fs::copy(old.path(file), live.path(file)).unwrap();
    }
    let vm = start(&tls_args(&live, &[]));
    assert!(publish_trusting(vm.tls, &old.path("ca.pem")));
    // A subscriber connected under the old certificate.
    let port = vm.tls.port().to_string();
    let sub = Command::new("mosquitto_sub")
        .args(["-h", "localhost", "-p", &port, "--cafile", &old.path("ca.pem"), "-t", "reload/#", "-C", "2"])
        .args(["-W", "30", "-q", "1"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(500));

    // Rotated: new handshakes get the new certificate; the subscriber stays.
    for file in ["server.pem", "server.key"] {
        std::fs::copy(new.path(file), live.path(file)).unwrap();
    }
    vm.signal(libc::SIGHUP);
    vm.wait_for_line("read again");
    assert!(publish_trusting(vm.tls, &new.path("ca.pem")), "the new certificate is not served");
    assert!(!publish_trusting(vm.tls, &old.path("ca.pem")), "the old certificate is still served");

    // A bad file: one line, and the certificate in force stays.
    std::fs::write(live.path("server.pem"), "not a certificate\n").unwrap();
    vm.signal(libc::SIGHUP);
    let line = vm.wait_for_line("kept");
    assert!(line.contains("server.pem"), "{line}");
    assert!(publish_trusting(vm.tls, &new.path("ca.pem")), "a bad file changed the certificate in force");
    let out = sub.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().collect::<Vec<_>>(), ["new", "new"]);
}

/// paho-mqtt over WebSockets to `port` (with TLS trusting `ca`, if given):
/// subscribe, publish QoS 1, see its own message.
fn paho_ws(port: u16, ca: Option<&str>, path: &str) -> Output {
    let script = r#"
import sys, threading, time
import paho.mqtt.client as mqtt
port, path, ca = int(sys.argv[1]), sys.argv[2], sys.argv[3]
got = threading.Event()
def on_message(c, u, m):
    if m.payload == b"over websockets":
        got.set()
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, transport="websockets", protocol=mqtt.MQTTv311)
c.ws_set_options(path=path)
if ca:
    c.tls_set(ca_certs=ca)
c.on_message = on_message
c.connect("localhost", port)
c.loop_start()
c.subscribe("paho/ws", qos=1)
time.sleep(0.5)
big = c.publish("paho/ws/big", b"x" * 200000, qos=1)
c.publish("paho/ws", b"over websockets", qos=1).wait_for_publish(10)
big.wait_for_publish(10)
ok = got.wait(10)
c.disconnect(); c.loop_stop()
print("ok" if ok else "no message")
sys.exit(0 if ok else 1)
"#;
    Command::new("python3").args(["-c", script, &port.to_string(), path, ca.unwrap_or("")]).output().unwrap()
}

#[test]
fn paho_over_websockets_and_secure_websockets_and_a_wrong_path_is_refused() {
    let test = "paho_over_websockets_and_secure_websockets_and_a_wrong_path_is_refused";
    if !tools(test) || !tool_available(test, PAHO, PAHO_PROBE) {
        return;
    }
    let pki = Pki::make("ws");
    let vm = start(&tls_args(&pki, &["--listen-ws", "127.0.0.1:0", "--listen-wss", "127.0.0.1:0"]));
    let (ws, wss) = (vm.ws.unwrap(), vm.wss.unwrap());
    for (port, ca, path) in
        [(ws.port(), None, "/mqtt"), (ws.port(), None, "/"), (wss.port(), Some(pki.path("ca.pem")), "/mqtt")]
    {
        let out = paho_ws(port, ca.as_deref(), path);
        assert!(
            out.status.success(),
            "paho over websockets (port {port}, path {path}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Another path: a clear HTTP error, then the close.
    let request = "GET /other HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
                   Sec-WebSocket-Protocol: mqtt\r\n\r\n";
    let got = String::from_utf8_lossy(&answer_to(ws, request.as_bytes())).into_owned();
    assert!(got.starts_with("HTTP/1.1 404"), "{got}");
    // Plain MQTT on the WebSocket port: an HTTP error, no CONNACK.
    let got = answer_to(ws, &connect_packet("lost"));
    assert!(got.starts_with(b"HTTP/1.1 4"), "{:?}", String::from_utf8_lossy(&got));
    // The TLS and plain listeners still serve.
    mosquitto_tls_round_trip(vm.tls, &pki, "tlsv1.3", &[]);
    drop(plain_connack(vm.plain.unwrap()));
}

#[test]
fn the_client_certificate_s_common_name_becomes_the_user_name() {
    if !tools("the_client_certificate_s_common_name_becomes_the_user_name") {
        return;
    }
    let pki = Pki::make("identity");
    // alice (the client certificate's CN) may use alice/#; nobody else anything.
    std::fs::write(pki.dir.join("acl"), "user alice\ntopic readwrite alice/#\n").unwrap();
    let (ca, acl) = (pki.path("ca.pem"), pki.path("acl"));
    let vm = start(&tls_args(&pki, &["--tls-client-ca", &ca, "--tls-identity-as-user", "--acl-file", &acl]));
    let port = vm.tls.port().to_string();
    let (cert, key) = (pki.path("client.pem"), pki.path("client.key"));
    // The user name the client gives (mallory) is replaced by alice.
    let client = |cmd: &mut Command| {
        cmd.args(["-h", "localhost", "-p", &port, "--cafile", &ca, "--cert", &cert, "--key", &key])
            .args(["-u", "mallory", "-P", "secret", "-q", "1"]);
    };
    let mut sub = Command::new("mosquitto_sub");
    client(&mut sub);
    let sub = sub.args(["-t", "alice/#", "-C", "1", "-W", "20", "-v"]).stdout(Stdio::piped()).spawn().unwrap();
    thread::sleep(Duration::from_millis(500));
    let mut publish = Command::new("mosquitto_pub");
    client(&mut publish);
    let out = publish.args(["-t", "alice/x", "-m", "as alice"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = sub.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "alice/x as alice");
    // Without --tls-client-ca the flag is refused at start.
    let out = mqvisor()
        .args(["run", "--listen-tls", "127.0.0.1:0", "--tls-cert", &pki.path("server.pem")])
        .args(["--tls-key", &pki.path("server.key"), "--tls-identity-as-user"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125), "{out:?}");
}

/// An upgrade request for `/mqtt`, subprotocol mqtt.
const UPGRADE: &str = "GET /mqtt HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                       Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
                       Sec-WebSocket-Protocol: mqtt\r\n\r\n";

/// A masked client frame with `opcode` and `payload` (at most 125 bytes),
/// or only the header of one announcing `announced` bytes.
fn client_frame(opcode: u8, payload: &[u8], announced: Option<u64>) -> Vec<u8> {
    let mut frame = vec![0x80 | opcode];
    match announced {
        None => frame.push(0x80 | u8::try_from(payload.len()).unwrap()),
        Some(len) => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&len.to_be_bytes());
        }
    }
    frame.extend_from_slice(&[0, 0, 0, 0]); // a zero mask: the payload as is
    frame.extend_from_slice(payload);
    frame
}

/// The close code in what a WebSocket server sent after its 101.
fn close_code(answer: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(answer);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    let at = answer.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let frames = &answer[at..];
    (frames.len() >= 4 && frames[0] == 0x88).then(|| u16::from_be_bytes([frames[2], frames[3]]))
}

#[test]
fn hostile_clients_get_a_clear_refusal_and_nobody_else_notices() {
    if !tools("hostile_clients_get_a_clear_refusal_and_nobody_else_notices") {
        return;
    }
    let pki = Pki::make("hostile");
    let vm = start(&tls_args(&pki, &["--listen-ws", "127.0.0.1:0", "--connect-timeout-ms", "1000"]));
    let mut bystander = plain_connack(vm.plain.unwrap());
    let ws = vm.ws.unwrap();

    // A text frame: close 1003 (MQTT-6.0.0-1).
    let mut bytes = UPGRADE.as_bytes().to_vec();
    bytes.extend(client_frame(0x1, b"hello", None));
    assert_eq!(close_code(&answer_to(ws, &bytes)), Some(1003));
    // A frame announcing 1 GiB: close 1009 before any of it is buffered.
    let mut bytes = UPGRADE.as_bytes().to_vec();
    bytes.extend(client_frame(0x2, &[], Some(1 << 30)));
    assert_eq!(close_code(&answer_to(ws, &bytes)), Some(1009));
    // An upgrade request over 16 KiB: 431.
    let mut bytes = b"GET /mqtt HTTP/1.1\r\nHost: localhost\r\nX-Pad: ".to_vec();
    bytes.resize(20_000, b'a');
    let got = answer_to(ws, &bytes);
    assert!(got.starts_with(b"HTTP/1.1 431"), "{:?}", String::from_utf8_lossy(&got));

    // A TLS handshake that never finishes (nothing after the TCP
    // connection): closed by the CONNECT deadline (with a close_notify
    // alert at most).
    let started = std::time::Instant::now();
    let got = answer_to(vm.tls, &[]);
    assert!(
        (got.is_empty() || got[0] == 0x15) && started.elapsed() < Duration::from_secs(8),
        "{got:?} after {:?}",
        started.elapsed()
    );
    // Garbage instead of a ClientHello: an alert (content type 21) at most.
    let got = answer_to(vm.tls, &[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5]);
    assert!(got.is_empty() || got[0] == 0x15, "{got:02x?}");

    bystander.write_all(&[0xc0, 0]).unwrap();
    let mut pong = [0u8; 2];
    bystander.read_exact(&mut pong).unwrap();
    assert_eq!(pong, [0xd0, 0]);
    mosquitto_tls_round_trip(vm.tls, &pki, "tlsv1.2", &[]);
}

#[test]
fn a_client_hello_sent_a_byte_at_a_time_still_gets_its_connack() {
    let test = "a_client_hello_sent_a_byte_at_a_time_still_gets_its_connack";
    if !tools(test) || !tool_available(test, "python3", "command -v python3") {
        return;
    }
    let pki = Pki::make("bytewise");
    let vm = start(&tls_args(&pki, &[]));
    let out = common::tls_connect_a_byte_at_a_time(vm.tls.port(), &pki.path("ca.pem"), "localhost");
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}
