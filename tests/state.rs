//! Durable tenant state (`mqvisor run --state`): `kill -9` of the VMM under
//! QoS 1 and QoS 2 load loses nothing it acknowledged and duplicates no
//! QoS 2 message; a torn last batch is dropped, damage in the middle stops
//! the start with its offset; a full disk refuses publishes cleanly and
//! acknowledges nothing it cannot keep; compaction keeps the file bounded;
//! session expiry counts across restarts. Real VMs, raw MQTT clients.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::wire::{self, read_packet, try_read_packet};
use common::{RunningVm, kvm_available};

fn state_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mqvisor-state-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("tenant.state")
}

fn start(state: &Path, extra: &[&str]) -> RunningVm {
    let mut args = vec!["--state", state.to_str().unwrap(), "--stats", "--max-queued-messages", "100000"];
    args.extend_from_slice(extra);
    RunningVm::start(&args)
}

fn connect(addr: SocketAddr, level: u8, client_id: &str, clean: bool) -> (TcpStream, bool) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(&wire::connect_as(level, client_id, clean, None, None)).unwrap();
    let (header, body) = read_packet(&mut s);
    assert_eq!(header, 0x20, "CONNACK expected");
    assert_eq!(body[1], 0, "connection accepted");
    (s, body[0] & 1 == 1)
}

fn ack(kind: u8, id: u16) -> [u8; 4] {
    let [hi, lo] = id.to_be_bytes();
    [kind, 2, hi, lo]
}

fn packet_id(body: &[u8]) -> u16 {
    u16::from_be_bytes([body[0], body[1]])
}

/// A durable subscriber that keeps its QoS 2 receiver state across its own
/// reconnects, as a client with a persistent session does: a message is
/// delivered on its first PUBLISH, and a DUP under an id still held is not
/// delivered again.
#[derive(Default)]
struct Subscriber {
    id: String,
    held: HashSet<u16>,
    delivered: Vec<String>,
}

impl Subscriber {
    /// One session: connect (not clean), subscribe on the first one, then
    /// receive and acknowledge until `quiet` passes without a packet, the
    /// connection ends, or `stop` is set. Returns whether the session was present.
    fn session(&mut self, addr: SocketAddr, qos: u8, first: bool, quiet: Duration, stop: &AtomicBool) -> bool {
        let (mut s, present) = connect(addr, 4, &self.id, false);
        if first {
            s.write_all(&wire::subscribe("load/#", qos, 1)).unwrap();
            assert_eq!(read_packet(&mut s).0, 0x90);
        }
        s.set_read_timeout(Some(quiet)).unwrap();
        while !stop.load(Ordering::Relaxed) {
            let Ok((header, body)) = try_read_packet(&mut s) else { break };
            match header >> 4 {
                3 => {
                    let topic_len = usize::from(packet_id(&body));
                    let id = packet_id(&body[2 + topic_len..]);
                    let payload = String::from_utf8(body[4 + topic_len..].to_vec()).unwrap();
                    match (header >> 1) & 3 {
                        1 => {
                            self.delivered.push(payload);
                            let _ = s.write_all(&ack(0x40, id));
                        }
                        2 => {
                            if self.held.insert(id) {
                                self.delivered.push(payload);
                            }
                            let _ = s.write_all(&ack(0x50, id));
                        }
                        q => panic!("QoS {q} delivery on a QoS {qos} subscription"),
                    }
                }
                6 => {
                    let id = packet_id(&body);
                    self.held.remove(&id);
                    let _ = s.write_all(&ack(0x70, id));
                }
                _ => {}
            }
        }
        present
    }
}

/// Publishes `load/P` messages "P:i" at `qos`, one at a time, until the
/// connection fails or `count` are acknowledged (PUBACK; for QoS 2 the
/// PUBREC, when the broker owns the message). Returns the acknowledged ones.
fn publisher(addr: SocketAddr, n: usize, qos: u8, count: usize, acked_total: &AtomicUsize) -> Vec<String> {
    let (mut s, _) = connect(addr, 4, &format!("pub{n}"), true);
    let mut acked = Vec::new();
    for i in 0..count {
        let id = u16::try_from(i % 65_000 + 1).unwrap();
        let payload = format!("{n}:{i}");
        if s.write_all(&wire::publish(&format!("load/{n}"), payload.as_bytes(), qos, id, false)).is_err() {
            break;
        }
        let Ok((header, body)) = try_read_packet(&mut s) else { break };
        assert_eq!((header >> 4, packet_id(&body)), (if qos == 1 { 4 } else { 5 }, id));
        acked.push(payload);
        acked_total.fetch_add(1, Ordering::Relaxed);
        if qos == 2 {
            if s.write_all(&ack(0x62, id)).is_err() {
                break;
            }
            let Ok((header, _)) = try_read_packet(&mut s) else { break };
            assert_eq!(header >> 4, 7, "PUBCOMP");
        }
    }
    acked
}

fn kill_under_load(qos: u8) {
    let name = format!("kill_9_under_qos{qos}_load");
    if !kvm_available(&name) {
        return;
    }
    let state = state_path(&name);
    let mut vm = start(&state, &[]);
    let never = AtomicBool::new(false);
    // One subscriber offline for the whole load, one online through it.
    let mut offline = Subscriber { id: "offline".into(), ..Subscriber::default() };
    offline.session(vm.addr, qos, true, Duration::from_millis(50), &never);
    let online_stop = Arc::new(AtomicBool::new(false));
    let addr = vm.addr;
    let stop = online_stop.clone();
    let online = thread::spawn(move || {
        let mut s = Subscriber { id: "online".into(), ..Subscriber::default() };
        s.session(addr, qos, true, Duration::from_secs(30), &stop);
        s
    });
    thread::sleep(Duration::from_millis(200));

    let acked_total = Arc::new(AtomicUsize::new(0));
    let publishers: Vec<_> = (0..4)
        .map(|n| {
            let total = acked_total.clone();
            thread::spawn(move || publisher(addr, n, qos, 1_000_000, &total))
        })
        .collect();
    // Kill mid-stream, once a good number of messages are acknowledged.
    let began = Instant::now();
    while acked_total.load(Ordering::Relaxed) < 1500 && began.elapsed() < Duration::from_secs(60) {
        thread::sleep(Duration::from_millis(5));
    }
    vm.child.kill().unwrap();
    vm.child.wait().unwrap();
    let acked: Vec<String> = publishers.into_iter().flat_map(|p| p.join().unwrap()).collect();
    let mut online = online.join().unwrap();
    assert!(acked.len() >= 1500, "the load ran: {} acknowledged", acked.len());

    let vm = start(&state, &[]);
    let quiet = Duration::from_millis(1500);
    assert!(online.session(vm.addr, qos, false, quiet, &never), "the online subscriber's session is restored");
    assert!(offline.session(vm.addr, qos, false, quiet, &never), "the offline subscriber's session is restored");
    for s in [&online, &offline] {
        let got: BTreeSet<&String> = s.delivered.iter().collect();
        let lost: Vec<&String> = acked.iter().filter(|m| !got.contains(m)).collect();
        assert!(
            lost.is_empty(),
            "{}: {} of {} acknowledged messages lost, e.g. {:?}",
            s.id,
            lost.len(),
            acked.len(),
            &lost[..lost.len().min(5)]
        );
        if qos == 2 {
            assert_eq!(got.len(), s.delivered.len(), "{}: a QoS 2 message was delivered twice", s.id);
        }
    }
    eprintln!(
        "qos {qos}: {} acknowledged before kill -9; delivered online {} (before and after), offline {}",
        acked.len(),
        online.delivered.len(),
        offline.delivered.len()
    );
    let (_, stderr) = vm.stop();
    assert!(stderr.contains("flushes"), "{stderr}");
    let _ = std::fs::remove_dir_all(state.parent().unwrap());
}

#[test]
fn kill_9_under_qos1_load_loses_no_acknowledged_message() {
    kill_under_load(1);
}

#[test]
fn kill_9_under_qos2_load_loses_none_and_duplicates_none() {
    kill_under_load(2);
}

/// Byte offsets of the batches in the active region of a state file that
/// never compacted (region 0), read from their headers.
fn batch_offsets(state: &Path) -> Vec<usize> {
    use mqvisor_broker::store::log::{DATA_START, SECTOR};
    let bytes = std::fs::read(state).unwrap();
    let mut at = usize::try_from(DATA_START).unwrap();
    let mut offsets = Vec::new();
    while bytes[at..at + 4] == 0x4d51_5642u32.to_le_bytes() {
        offsets.push(at);
        let len = u32::from_le_bytes(bytes[at + 32..at + 36].try_into().unwrap()) as usize;
        at += (64 + len).next_multiple_of(usize::try_from(SECTOR).unwrap());
    }
    offsets
}

fn flip_byte(state: &Path, at: usize) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().read(true).write(true).open(state).unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, at as u64).unwrap();
    file.write_all_at(&[byte[0] ^ 0x5a], at as u64).unwrap();
}

/// Retained messages on `r/#` as a fresh subscriber sees them.
fn retained(addr: SocketAddr) -> BTreeSet<String> {
    let (mut s, _) = connect(addr, 4, "reader", true);
    s.write_all(&wire::subscribe("r/#", 0, 1)).unwrap();
    assert_eq!(read_packet(&mut s).0, 0x90);
    s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut seen = BTreeSet::new();
    while let Ok((_, body)) = try_read_packet(&mut s) {
        let topic_len = usize::from(packet_id(&body));
        seen.insert(String::from_utf8(body[2..2 + topic_len].to_vec()).unwrap());
    }
    seen
}

fn publish_retained(addr: SocketAddr, topics: impl Iterator<Item = String>, payload: &[u8]) {
    let (mut s, _) = connect(addr, 4, "writer", true);
    for (i, topic) in topics.enumerate() {
        let id = u16::try_from(i % 60_000 + 1).unwrap();
        s.write_all(&wire::publish(&topic, payload, 1, id, true)).unwrap();
        assert_eq!(read_packet(&mut s).0, 0x40, "PUBACK");
    }
}

#[test]
fn a_torn_last_batch_is_dropped_and_damage_in_the_middle_stops_the_start() {
    if !kvm_available("torn_tail_and_corruption") {
        return;
    }
    let state = state_path("torn");
    let vm = start(&state, &[]);
    // One acknowledged publish, one group commit, one batch each.
    publish_retained(vm.addr, (1..=5).map(|i| format!("r/{i}")), b"v");
    vm.stop();
    let batches = batch_offsets(&state);
    assert_eq!(batches.len(), 5, "one batch per acknowledged publish");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&state).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "a tenant's messages are readable by its VMM's user only");

    // A torn last write: its records fail their tag, and nothing follows.
    flip_byte(&state, batches[4] + 70);
    let checked = common::mqvisor().arg("state-check").arg(&state).output().unwrap();
    assert!(checked.status.success(), "{}", common::stderr(&checked));
    assert!(common::stdout(&checked).contains("a torn last batch"), "{}", common::stdout(&checked));
    let vm = start(&state, &[]);
    let want: BTreeSet<String> = (1..=4).map(|i| format!("r/{i}")).collect();
    assert_eq!(retained(vm.addr), want, "everything before the torn batch is back");
    vm.stop();

    // Damage in the middle: the start is refused with the offset, the file untouched.
    flip_byte(&state, batches[1] + 40);
    let checked = common::mqvisor().arg("state-check").arg(&state).output().unwrap();
    assert_eq!(checked.status.code(), Some(1));
    assert!(
        common::stderr(&checked).contains(&format!("corrupt at byte {}", batches[1])),
        "{}",
        common::stderr(&checked)
    );
    let out = common::mqvisor()
        .args(["run", "--listen", "127.0.0.1:0", "--timeout", "60", "--state", state.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = common::stderr(&out);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains(&format!("corrupt at byte {}", batches[1])), "{stderr}");

    // The operator may choose to start empty; the damaged file is kept.
    let vm = start(&state, &["--discard-corrupt-state"]);
    assert!(retained(vm.addr).is_empty());
    vm.stop();
    assert!(state.with_file_name("tenant.state.corrupt").exists(), "the damaged state is kept aside as PATH.corrupt");
    let _ = std::fs::remove_dir_all(state.parent().unwrap());
}

#[test]
fn compaction_keeps_the_state_file_bounded_under_retained_updates() {
    if !kvm_available("compaction") {
        return;
    }
    let state = state_path("compaction");
    let vm = start(&state, &[]);
    // 6,000 updates of 2 KB over 20 topics: 12 MB written, 40 KB live.
    let payload = vec![b'x'; 2000];
    publish_retained(vm.addr, (0..6000).map(|i| format!("r/{}", i % 20)), &payload);
    let (_, stderr) = vm.stop();
    let allocated = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&state).unwrap()) * 512;
    eprintln!("state file: {} KiB allocated after 12 MB of updates; {stderr}", allocated >> 10);
    assert!(allocated < 10 << 20, "compaction bounds the file: {allocated} bytes allocated");
    let vm = start(&state, &[]);
    let want: BTreeSet<String> = (0..20).map(|i| format!("r/{i}")).collect();
    assert_eq!(retained(vm.addr), want, "the compacted state holds every topic");
    vm.stop();
    let _ = std::fs::remove_dir_all(state.parent().unwrap());
}

#[test]
fn a_full_disk_refuses_durable_publishes_and_keeps_serving_readers() {
    if !kvm_available("full_disk") {
        return;
    }
    let state = state_path("full");
    // Create the (sparse) state file first, then run under a 2 MiB
    // file-size limit: the log's first MiB fits, the rest fails (EFBIG).
    start(&state, &[]).stop();
    let mut command = common::mqvisor();
    command.args(["run", "--listen", "127.0.0.1:0", "--stats", "--state", state.to_str().unwrap()]);
    command.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
    common::limit_child(&mut command, libc::RLIMIT_FSIZE, 2 << 20, Some(2 << 20));
    let vm = RunningVm::from_child(command.spawn().unwrap(), "mqvisor: tenant VM listening on ");

    // A reader subscribed before the disk fills keeps getting live traffic.
    let (mut reader, _) = connect(vm.addr, 5, "reader", true);
    // v5 SUBSCRIBE: packet id, no properties, the filter, QoS 0.
    reader.write_all(&[0x82, 10, 0, 1, 0, 0, 4, b'l', b'i', b'v', b'e', 0]).unwrap();
    assert_eq!(read_packet(&mut reader).0, 0x90);

    let (mut writer, _) = connect(vm.addr, 5, "writer", true);
    let payload = vec![b'x'; 10_000];
    let mut accepted = 0;
    let mut withdrawn = 0;
    let refused = loop {
        let id = u16::try_from(accepted % 60_000 + 1).unwrap();
        writer.write_all(&wire::publish_v5(&format!("r/{accepted}"), &payload, 1, id, true)).unwrap();
        // The publish whose commit failed is never acknowledged: its
        // connection ends instead, and the client comes back.
        let Ok((header, body)) = try_read_packet(&mut writer) else {
            withdrawn += 1;
            assert_eq!(withdrawn, 1, "only the publish in the failed commit is withdrawn");
            writer = connect(vm.addr, 5, "writer", true).0;
            continue;
        };
        assert_eq!(header >> 4, 4, "PUBACK");
        // Below 0x80 is success (0x10: no matching subscribers).
        let code = wire::puback_code(&body);
        if code >= 0x80 {
            break code;
        }
        accepted += 1;
        assert!(accepted < 1000, "the 2 MiB limit never refused a publish");
    };
    assert_eq!(refused, 0x97, "v5 refusal: quota exceeded");
    assert_eq!(withdrawn, 1, "the acknowledgement that could not be kept was withdrawn");
    assert!(accepted > 10, "the disk took messages before it filled: {accepted}");

    // Readers are still served, with QoS 0 traffic that needs no disk.
    writer.write_all(&wire::publish_v5("live", b"still here", 0, 0, false)).unwrap();
    reader.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let (header, body) = read_packet(&mut reader);
    assert_eq!(header >> 4, 3);
    assert!(body.ends_with(b"still here"));
    // A 3.1.1 client cannot be told no in a PUBACK: its connection ends.
    let (mut old, _) = connect(vm.addr, 4, "old", true);
    old.write_all(&wire::publish("r/old", b"x", 1, 1, false)).unwrap();
    old.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(try_read_packet(&mut old).is_err(), "the 3.1.1 publisher is disconnected");

    let (status, stderr) = vm.stop();
    assert!(status.code().is_some(), "the VM ended by itself, not by a crash: {status:?}");
    assert!(stderr.contains("write of the state file failed"), "{stderr}");
    assert!(!stderr.contains("I/O errors 0"), "{stderr}");
    let _ = std::fs::remove_dir_all(state.parent().unwrap());
}

#[test]
fn state_settings_that_cannot_work_are_refused_before_the_vm_starts() {
    let dir = state_path("settings");
    let small = dir.with_file_name("small.state");
    std::fs::write(&small, vec![0u8; 1 << 20]).unwrap();
    let run = |args: &[&str]| {
        let mut all = vec!["--service", "mqtt", "--listen", "127.0.0.1:0"];
        all.extend_from_slice(args);
        common::run_vm(&all)
    };
    common::assert_fails_with(&run(&["--persistence", "sync"]), 125, "--persistence sync or batch needs --state PATH");
    let missing_dir = dir.with_file_name("no/such/dir/x.state");
    common::assert_fails_with(&run(&["--state", missing_dir.to_str().unwrap()]), 125, "cannot open the state file");
    common::assert_fails_with(&run(&["--state", small.to_str().unwrap()]), 125, "a state file is at least 4 MiB");
    let echo = common::run_vm(&["--service", "echo", "--listen", "127.0.0.1:0", "--state", dir.to_str().unwrap()]);
    common::assert_fails_with(&echo, 125, "--state is only for --service mqtt");
    let _ = std::fs::remove_dir_all(dir.parent().unwrap());
}

#[test]
fn a_file_that_is_not_a_state_file_is_refused_and_left_alone() {
    if !kvm_available("a_file_that_is_not_a_state_file_is_refused_and_left_alone") {
        return;
    }
    let state = state_path("foreign");
    let foreign: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8 | 1).collect();
    std::fs::write(&state, &foreign).unwrap();
    let checked = common::mqvisor().arg("state-check").arg(&state).output().unwrap();
    assert_eq!(checked.status.code(), Some(1));
    assert!(
        common::stderr(&checked).contains("does not start with a state superblock"),
        "{}",
        common::stderr(&checked)
    );
    let out = common::mqvisor()
        .args(["run", "--listen", "127.0.0.1:0", "--timeout", "60", "--state", state.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = common::stderr(&out);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("does not start with a state superblock"), "{stderr}");
    assert_eq!(std::fs::read(&state).unwrap(), foreign, "the file is not touched");
    let _ = std::fs::remove_dir_all(state.parent().unwrap());
}

/// A v5 CONNECT with a session expiry interval, keep-alive 0.
fn connect_v5(client_id: &str, clean: bool, expiry: u32) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, u8::from(clean) << 1, 0, 0, 5, 0x11];
    body.extend_from_slice(&expiry.to_be_bytes());
    body.extend_from_slice(&u16::try_from(client_id.len()).unwrap().to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut packet = vec![0x10];
    wire::remaining_length(body.len(), &mut packet);
    packet.extend_from_slice(&body);
    packet
}

/// Connects with `connect` and returns the CONNACK's session-present flag
/// and code, and the stream.
fn connack(addr: SocketAddr, connect: &[u8]) -> (bool, u8, TcpStream) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(connect).unwrap();
    let (header, body) = read_packet(&mut s);
    assert_eq!(header, 0x20, "CONNACK expected");
    (body[0] & 1 == 1, body[1], s)
}

/// Runs the VM on `state` under a 2 MiB file-size limit: the log's first
/// MiB fits, the rest fails (EFBIG).
fn start_on_a_small_disk(state: &Path) -> RunningVm {
    let mut command = common::mqvisor();
    command.args(["run", "--listen", "127.0.0.1:0", "--stats", "--state", state.to_str().unwrap()]);
    command.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
    common::limit_child(&mut command, libc::RLIMIT_FSIZE, 2 << 20, Some(2 << 20));
    RunningVm::from_child(command.spawn().unwrap(), "mqvisor: tenant VM listening on ")
}

/// Fills the disk with retained QoS 1 publishes until one is refused.
/// Returns the topic of the publish whose commit failed: its PUBACK was
/// withdrawn with its connection, and sent again, it was refused (0x97).
fn fill_the_disk(vm: &RunningVm) -> String {
    let (mut writer, _) = connect(vm.addr, 5, "writer", true);
    let payload = vec![b'x'; 10_000];
    let (mut accepted, mut withdrawn) = (0, None);
    loop {
        let id = u16::try_from(accepted % 60_000 + 1).unwrap();
        let topic = format!("r/{accepted}");
        writer.write_all(&wire::publish_v5(&topic, &payload, 1, id, true)).unwrap();
        let Ok((header, body)) = try_read_packet(&mut writer) else {
            assert_eq!(withdrawn.replace(topic), None, "only the publish in the failed commit is withdrawn");
            writer = connect(vm.addr, 5, "writer", true).0;
            continue;
        };
        assert_eq!(header >> 4, 4, "PUBACK");
        if wire::puback_code(&body) >= 0x80 {
            assert_eq!(wire::puback_code(&body), 0x97);
            let withdrawn = withdrawn.expect("the failed commit's acknowledgement was withdrawn");
            assert_eq!(withdrawn, topic, "the client sent the withdrawn publish again");
            return withdrawn;
        }
        accepted += 1;
        assert!(accepted < 1000, "the 2 MiB limit never refused a publish");
    }
}

#[test]
fn a_failing_disk_acknowledges_nothing_it_cannot_keep() {
    if !kvm_available("a_failing_disk_acknowledges_nothing_it_cannot_keep") {
        return;
    }
    let state = state_path("acks");
    // A durable QoS 2 publisher's message, id 9, is taken (PUBREC) while
    // the disk works.
    let vm = start(&state, &[]);
    let (mut p2, _) = connect(vm.addr, 4, "p2", false);
    p2.write_all(&wire::publish("q2", b"first", 2, 9, false)).unwrap();
    assert_eq!(read_packet(&mut p2), (0x50, vec![0, 9]));
    drop(p2);
    vm.stop();

    let mut vm = start_on_a_small_disk(&state);
    let (mut p2, present) = connect(vm.addr, 4, "p2", false);
    assert!(present);
    let withdrawn = fill_the_disk(&vm);
    // The release cannot be written: no PUBCOMP, and the connection ends.
    p2.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    p2.write_all(&ack(0x62, 9)).unwrap();
    let answer = try_read_packet(&mut p2);
    let completed = matches!(answer, Ok((0x70, _)));
    let ended = answer.is_err();
    // New durable sessions are refused, "server unavailable".
    let (_, v5_code, _) = connack(vm.addr, &connect_v5("new5", true, 600));
    let (_, v3_code, _) = connack(vm.addr, &wire::connect_as(4, "new3", false, None, None));
    // The publish the client saw refused is not retained.
    let (mut reader, _) = connect(vm.addr, 4, "reader", true);
    reader.write_all(&wire::subscribe(&withdrawn, 1, 1)).unwrap();
    assert_eq!(read_packet(&mut reader).0, 0x90);
    reader.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let retained_refused = try_read_packet(&mut reader).is_ok();
    vm.child.kill().unwrap();
    vm.child.wait().unwrap();

    // After kill -9 the publisher goes on as MQTT says (a PUBREL it saw no
    // PUBCOMP for is sent again) and reuses id 9 for a new message.
    let vm = start(&state, &[]);
    let (mut sub, _) = connect(vm.addr, 4, "sub", true);
    sub.write_all(&wire::subscribe("q2", 0, 1)).unwrap();
    assert_eq!(read_packet(&mut sub).0, 0x90);
    let (mut p2, present) = connect(vm.addr, 4, "p2", false);
    assert!(present);
    if !completed {
        p2.write_all(&ack(0x62, 9)).unwrap();
        assert_eq!(read_packet(&mut p2), (0x70, vec![0, 9]));
    }
    p2.write_all(&wire::publish("q2", b"second", 2, 9, false)).unwrap();
    assert_eq!(read_packet(&mut p2), (0x50, vec![0, 9]));
    p2.write_all(&ack(0x62, 9)).unwrap();
    assert_eq!(read_packet(&mut p2), (0x70, vec![0, 9]));
    sub.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let delivered = try_read_packet(&mut sub).ok();
    assert!(
        delivered.as_ref().is_some_and(|(header, body)| header >> 4 == 3 && body.ends_with(b"second")),
        "a new message under a reused packet id is delivered, not taken for the old one: {delivered:?}"
    );

    assert!(!completed, "no PUBCOMP for a release that is not on disk");
    assert!(ended, "the publisher's connection ends, so it sends PUBREL again when it is back");
    assert_eq!((v5_code, v3_code), (0x88, 3), "new durable sessions are refused while the disk fails");
    assert!(!retained_refused, "a publish refused (0x97) is not retained");
    vm.stop();
    let _ = std::fs::remove_dir_all(state.parent().unwrap());
}

#[test]
fn session_expiry_counts_from_the_lost_connection_across_restarts() {
    if !kvm_available("session_expiry_counts_from_the_lost_connection_across_restarts") {
        return;
    }
    let state = state_path("expiry");
    let mut vm = start(&state, &[]);
    // "gone" (expiry 2 s) disconnects; "crashed" (3 s) is still connected
    // when the VMM is killed.
    let (_, code, gone) = connack(vm.addr, &connect_v5("gone", true, 2));
    assert_eq!(code, 0);
    drop(gone);
    let (_, code, _crashed) = connack(vm.addr, &connect_v5("crashed", true, 3));
    assert_eq!(code, 0);
    thread::sleep(Duration::from_millis(200));
    vm.child.kill().unwrap();
    vm.child.wait().unwrap();

    thread::sleep(Duration::from_millis(2500));
    // 2.5 s after "gone" lost its connection, though the broker was down:
    // expired. "crashed" lost its connection at this start.
    let mut vm = start(&state, &[]);
    let (gone_present, _, _) = connack(vm.addr, &connect_v5("gone", false, 0));
    thread::sleep(Duration::from_millis(300));
    vm.child.kill().unwrap();
    vm.child.wait().unwrap();
    thread::sleep(Duration::from_millis(3300));
    // 3.3 s after that start: expired too, though the broker restarted.
    let vm = start(&state, &[]);
    let (crashed_present, _, _) = connack(vm.addr, &connect_v5("crashed", false, 0));
    assert!(!gone_present, "a session expires across a restart, from when it lost its connection");
    assert!(!crashed_present, "a session connected at a crash expires from the restart, across more restarts");
    vm.stop();
    let _ = std::fs::remove_dir_all(state.parent().unwrap());
}
