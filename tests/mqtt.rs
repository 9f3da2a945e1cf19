//! MQTT end to end with real clients: mosquitto_pub / mosquitto_sub (Debian)
//! and paho-mqtt (PyPI), against the tenant VM (`mqvisor run`) and the
//! host-native runner (`mqvisor broker`); and hostile bytes on the wire.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use common::{RunningVm, kvm_available, tool_available};

const PAHO: &str = "Python paho-mqtt (pip install paho-mqtt)";
const PAHO_PROBE: &str = "python3 -c 'import paho.mqtt'";
const MOSQUITTO: &str = "mosquitto_pub/mosquitto_sub (apt-get install mosquitto-clients)";
const MOSQUITTO_PROBE: &str = "command -v mosquitto_pub && command -v mosquitto_sub";

fn paho_suite(target: &RunningVm) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/clients/paho_suite.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(target.addr.ip().to_string())
        .arg(target.addr.port().to_string())
        .output()
        .expect("running python3");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "paho checks failed:\n{report}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(report.lines().filter(|l| l.starts_with("ok ")).count() >= 11, "{report}");
}

fn mosquitto_round_trip(target: &RunningVm) {
    let (host, port) = (target.addr.ip().to_string(), target.addr.port().to_string());
    for (version, qos) in [("mqttv311", "0"), ("mqttv311", "1"), ("mqttv5", "2"), ("mqttv31", "1")] {
        let topic = format!("mosq/{version}/{qos}");
        let sub = Command::new("mosquitto_sub")
            .args(["-h", &host, "-p", &port, "-V", version, "-q", qos, "-t", "mosq/#", "-C", "3", "-W", "10", "-v"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("mosquitto_sub");
        thread::sleep(Duration::from_millis(300));
        for i in 0..3 {
            let status = Command::new("mosquitto_pub")
                .args(["-h", &host, "-p", &port, "-V", version, "-q", qos, "-t", &topic, "-m", &format!("m{i}")])
                .status()
                .expect("mosquitto_pub");
            assert!(status.success(), "mosquitto_pub {version} QoS {qos}");
        }
        let out = sub.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let expected: Vec<String> = (0..3).map(|i| format!("{topic} m{i}")).collect();
        assert_eq!(text.lines().collect::<Vec<_>>(), expected, "{version} QoS {qos}");
    }
    // A retained message reaches a later subscriber.
    let status = Command::new("mosquitto_pub")
        .args(["-h", &host, "-p", &port, "-t", "mosq/retained", "-m", "kept", "-r", "-q", "1"])
        .status()
        .unwrap();
    assert!(status.success());
    let out = Command::new("mosquitto_sub")
        .args(["-h", &host, "-p", &port, "-t", "mosq/retained", "-C", "1", "-W", "10"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "kept");
}

/// Garbage, a packet before CONNECT, and an oversize packet all end the
/// connection, and the broker keeps serving.
fn hostile_bytes(target: &RunningVm) {
    let expect_closed = |mut s: TcpStream| {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        rest
    };
    let mut garbage = TcpStream::connect(target.addr).unwrap();
    garbage.write_all(&[0xff; 64]).unwrap();
    assert!(expect_closed(garbage).is_empty());

    let mut early = TcpStream::connect(target.addr).unwrap();
    early.write_all(&[0xc0, 0x00]).unwrap(); // PINGREQ before CONNECT
    assert!(expect_closed(early).is_empty());

    // v5 CONNECT, then a PUBLISH announcing 200 MB: DISCONNECT 0x95.
    let mut big = TcpStream::connect(target.addr).unwrap();
    big.write_all(&[0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 30, 0, 0, 0]).unwrap();
    big.write_all(&[0x30, 0x80, 0x80, 0x80, 0x60]).unwrap();
    let rest = expect_closed(big);
    // DISCONNECT (0xe0), a one-byte remaining length, reason 0x95.
    let disconnect = rest.windows(3).any(|w| w[0] == 0xe0 && w[1] < 0x80 && w[2] == 0x95);
    assert!(disconnect, "expected DISCONNECT 0x95 after CONNACK, got {rest:02x?}");

    // Still serving.
    let mut fine = TcpStream::connect(target.addr).unwrap();
    fine.write_all(&[0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 30, 0, 0]).unwrap();
    let mut connack = [0u8; 4];
    fine.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    fine.read_exact(&mut connack).unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0]);
}

#[test]
fn vm_paho_suite() {
    if !kvm_available("vm_paho_suite") || !tool_available("vm_paho_suite", PAHO, PAHO_PROBE) {
        return;
    }
    paho_suite(&RunningVm::start(&["--service", "mqtt", "--timeout", "300"]));
}

#[test]
fn host_runner_paho_suite() {
    if !tool_available("host_runner_paho_suite", PAHO, PAHO_PROBE) {
        return;
    }
    paho_suite(&RunningVm::start_host_broker());
}

#[test]
fn vm_mosquitto_clients() {
    if !kvm_available("vm_mosquitto_clients") || !tool_available("vm_mosquitto_clients", MOSQUITTO, MOSQUITTO_PROBE) {
        return;
    }
    mosquitto_round_trip(&RunningVm::start(&["--service", "mqtt", "--timeout", "300"]));
}

#[test]
fn host_runner_mosquitto_clients() {
    if !tool_available("host_runner_mosquitto_clients", MOSQUITTO, MOSQUITTO_PROBE) {
        return;
    }
    mosquitto_round_trip(&RunningVm::start_host_broker());
}

#[test]
fn vm_refuses_hostile_bytes() {
    if !kvm_available("vm_refuses_hostile_bytes") {
        return;
    }
    hostile_bytes(&RunningVm::start(&["--service", "mqtt", "--timeout", "300"]));
}

#[test]
fn host_runner_refuses_hostile_bytes() {
    hostile_bytes(&RunningVm::start_host_broker());
}

/// A password file as `mosquitto_passwd` writes it: alice / s3cret.
const PASSWORDS: &str = "alice:$7$101$UdmVFG4Cfxk2O1VO$rSNLgEwwuKSNj861LvltavG18Kq8wv1IQbj67BhI+jBe6eA9T8etGURdw69SZ2LTo1aWIS2XT9CsGfKLIiqCdg==\n";

#[test]
fn vm_password_file_and_acl() {
    if !kvm_available("vm_password_file_and_acl")
        || !tool_available("vm_password_file_and_acl", MOSQUITTO, MOSQUITTO_PROBE)
    {
        return;
    }
    let dir = std::env::temp_dir().join(format!("mqvisor-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (pw, acl) = (dir.join("passwords"), dir.join("acl"));
    std::fs::write(&pw, PASSWORDS).unwrap();
    std::fs::write(&acl, "user alice\ntopic readwrite alice/#\n").unwrap();
    let vm = RunningVm::start(&[
        "--service",
        "mqtt",
        "--timeout",
        "300",
        "--password-file",
        pw.to_str().unwrap(),
        "--acl-file",
        acl.to_str().unwrap(),
    ]);
    let (host, port) = (vm.addr.ip().to_string(), vm.addr.port().to_string());
    let pub_as = |user: &[&str], topic: &str| {
        Command::new("mosquitto_pub")
            .args(["-h", &host, "-p", &port, "-t", topic, "-m", "x", "-q", "1"])
            .args(user)
            .output()
            .unwrap()
    };
    // Anonymous: CONNACK 5 (not authorised); wrong password: 4.
    let anonymous = pub_as(&[], "alice/x");
    assert!(String::from_utf8_lossy(&anonymous.stderr).contains("not authorised"), "{anonymous:?}");
    let wrong = pub_as(&["-u", "alice", "-P", "nope"], "alice/x");
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("bad user name or password"), "{wrong:?}");
    // Alice within her ACL: delivered.
    let sub = Command::new("mosquitto_sub")
        .args(["-h", &host, "-p", &port, "-u", "alice", "-P", "s3cret", "-t", "alice/#", "-C", "1", "-W", "10"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(400));
    assert!(pub_as(&["-u", "alice", "-P", "s3cret"], "alice/x").status.success());
    assert_eq!(String::from_utf8_lossy(&sub.wait_with_output().unwrap().stdout).trim(), "x");
    // Outside it: the subscription is refused (v5 reason 0x87).
    let denied = Command::new("mosquitto_sub")
        .args(["-h", &host, "-p", &port, "-u", "alice", "-P", "s3cret", "-t", "bob/#", "-C", "1", "-W", "5"])
        .args(["-V", "mqttv5"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&denied.stderr).contains("denied"), "{denied:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unreadable_or_malformed_auth_files_are_clear_errors() {
    let out = common::mqvisor().args(["broker", "--password-file", "/nonexistent/pw"]).output().unwrap();
    common::assert_fails_with(&out, 125, "password file /nonexistent/pw");
    let dir = std::env::temp_dir().join(format!("mqvisor-badauth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("acl");
    std::fs::write(&bad, "topic read a/#\nfrobnicate x\n").unwrap();
    let out = common::run_vm(&["--service", "mqtt", "--acl-file", bad.to_str().unwrap()]);
    common::assert_fails_with(&out, 125, "line 2: unknown keyword `frobnicate`");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn vm_enforces_limits_set_on_the_host() {
    use mqvisor_broker::packet::{self, Connect, Packet, QoS, Subscribe, SubscriptionOptions, Version};
    use mqvisor_broker::properties::Properties;
    if !kvm_available("vm_enforces_limits_set_on_the_host") {
        return;
    }
    let vm = RunningVm::start(&["--service", "mqtt", "--timeout", "300", "--max-topic-levels", "2"]);
    let mut stream = TcpStream::connect(vm.addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let connect = Connect {
        version: Version::V5,
        clean_start: true,
        keep_alive: 30,
        properties: Properties::default(),
        client_id: "limits".into(),
        will: None,
        username: None,
        password: None,
    };
    let options =
        SubscriptionOptions { qos: QoS::AtMostOnce, no_local: false, retain_as_published: false, retain_handling: 0 };
    let subscribe = Subscribe {
        packet_id: 1,
        properties: Properties::default(),
        filters: vec![("a/b".into(), options), ("a/b/c".into(), options)],
    };
    let mut bytes = Vec::new();
    packet::encode(&Packet::Connect(Box::new(connect)), Version::V5, &mut bytes);
    packet::encode(&Packet::Subscribe(subscribe), Version::V5, &mut bytes);
    stream.write_all(&bytes).unwrap();
    let mut got = Vec::new();
    let suback = loop {
        let mut chunk = [0u8; 256];
        let n = stream.read(&mut chunk).unwrap();
        assert!(n > 0, "connection closed early");
        got.extend_from_slice(&chunk[..n]);
        // Skip the CONNACK; decode the SUBACK once it is whole.
        let connack_len = packet::frame(&got, usize::MAX).unwrap().map(|f| f.len);
        if let Some((at, frame)) = connack_len.and_then(|at| Some((at, packet::frame(&got[at..], usize::MAX).ok()??))) {
            break packet::decode_from_server(frame, &got[at..], Version::V5).unwrap();
        }
    };
    // Two levels are fine; three exceed the limit: Topic Filter invalid.
    assert!(matches!(suback, Packet::Suback { codes, .. } if codes == vec![0, 0x8f]));
}

#[test]
fn broker_settings_are_not_command_line_words() {
    // They travel in the boot-info configuration blob (checked by its codec's
    // unit tests); a stray `mqtt.*` word is an unknown word to the guest.
    if !kvm_available("broker_settings_are_not_command_line_words") {
        return;
    }
    let out = common::run_vm(&[
        "--service",
        "mqtt",
        "--listen",
        "127.0.0.1:0",
        "--cmdline",
        "mqtt.max_inflight=lots",
        "--timeout",
        "30",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    // The listener is announced first; the guest's refusal is the last line.
    let last = err.trim_end().lines().last().unwrap_or_default();
    assert!(last.contains("unknown or malformed command-line word \"mqtt.max_inflight=lots\""), "{err}");
}

#[test]
fn vm_caps_keep_alive_like_mosquitto() {
    if !kvm_available("vm_caps_keep_alive_like_mosquitto")
        || !tool_available("vm_caps_keep_alive", MOSQUITTO, MOSQUITTO_PROBE)
    {
        return;
    }
    // The cap travels to the guest in the configuration blob.
    let vm = RunningVm::start(&["--service", "mqtt", "--timeout", "300", "--max-keep-alive", "30"]);
    let (host, port) = (vm.addr.ip().to_string(), vm.addr.port().to_string());
    let publish = |version: &str, keep_alive: &str| {
        Command::new("mosquitto_pub")
            .args(["-h", &host, "-p", &port, "-V", version, "-k", keep_alive, "-t", "ka", "-m", "x", "-q", "1"])
            .output()
            .expect("mosquitto_pub")
    };
    let refused = publish("mqttv311", "60");
    assert!(!refused.status.success(), "a 3.1.1 client asking for more than the cap is refused");
    let why = String::from_utf8_lossy(&refused.stderr).to_lowercase();
    assert!(why.contains("identifier rejected"), "{why}");
    assert!(publish("mqttv311", "30").status.success(), "at the cap a 3.1.1 client is accepted");
    assert!(publish("mqttv5", "60").status.success(), "an MQTT 5 client is told the cap instead");
    let (status, rest) = vm.stop();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "the VM served until stopped: {rest}");
}
