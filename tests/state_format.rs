//! The state file under attack and misuse (docs/state-format.md): client
//! payloads shaped as log batches are never replayed, a message larger
//! than a log batch is kept like any other, a resized file and a damaged
//! newest superblock stop the start instead of silently losing state.
//! Real VMs, raw MQTT clients.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::wire::{self, read_packet, try_read_packet};
use common::{RunningVm, kvm_available};

fn state_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mqvisor-format-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("tenant.state")
}

fn start(state: &Path) -> RunningVm {
    RunningVm::start(&["--state", state.to_str().unwrap(), "--state-size", "64"])
}

fn connect(addr: SocketAddr, level: u8, client_id: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&wire::connect_as(level, client_id, true, None, None)).unwrap();
    let (header, body) = read_packet(&mut s);
    assert_eq!((header, body[1]), (0x20, 0), "CONNACK, accepted");
    s
}

/// Publishes retained QoS 1 messages (3.1.1) and waits for each PUBACK.
fn publish_retained(addr: SocketAddr, messages: impl Iterator<Item = (String, Vec<u8>)>) {
    let mut s = connect(addr, 4, "writer");
    for (i, (topic, payload)) in messages.enumerate() {
        let id = u16::try_from(i % 60_000 + 1).unwrap();
        s.write_all(&wire::publish(&topic, &payload, 1, id, true)).unwrap();
        assert_eq!(read_packet(&mut s).0, 0x40, "PUBACK");
    }
}

/// The retained messages under `filter`, as (topic, payload).
fn retained(addr: SocketAddr, filter: &str) -> Vec<(String, Vec<u8>)> {
    let mut s = connect(addr, 4, "reader");
    s.write_all(&wire::subscribe(filter, 0, 1)).unwrap();
    assert_eq!(read_packet(&mut s).0, 0x90, "SUBACK");
    s.set_read_timeout(Some(Duration::from_millis(700))).unwrap();
    let mut seen = Vec::new();
    while let Ok((_, body)) = try_read_packet(&mut s) {
        let len = usize::from(u16::from_be_bytes([body[0], body[1]]));
        seen.push((String::from_utf8(body[2..2 + len].to_vec()).unwrap(), body[2 + len..].to_vec()));
    }
    seen
}

fn run_to_end(state: &Path) -> std::process::Output {
    common::mqvisor()
        .args(["run", "--listen", "127.0.0.1:0", "--timeout", "60", "--state", state.to_str().unwrap()])
        .output()
        .unwrap()
}

/// A retained-message record as the log holds it (kind 1, no expiry, the
/// message as an MQTT 5 PUBLISH).
fn retain_record(topic: &str, payload: &[u8]) -> Vec<u8> {
    let publish = wire::publish_v5(topic, payload, 0, 0, true);
    let mut record = vec![1];
    record.extend_from_slice(&u64::MAX.to_be_bytes());
    record.extend_from_slice(&u32::try_from(publish.len()).unwrap().to_be_bytes());
    record.extend_from_slice(&publish);
    record
}

/// 512 bytes that look like one log batch holding `record`, in format 1
/// (CRC-32C, all computable) or format 2 (tags under a guessed key).
fn forged_sector(record: &[u8], format: u32, generation: u64, seq: u64) -> Vec<u8> {
    let crc = |bytes: &[u8]| mqvisor_broker::store::log::crc32c(bytes);
    let mut s = vec![0u8; 512];
    s[..4].copy_from_slice(&0x4d51_5642u32.to_le_bytes());
    if format == 1 {
        let mut payload = u32::try_from(record.len()).unwrap().to_le_bytes().to_vec();
        payload.extend_from_slice(&crc(record).to_le_bytes());
        payload.extend_from_slice(record);
        s[4..8].copy_from_slice(&u32::try_from(generation).unwrap().to_le_bytes());
        s[8..16].copy_from_slice(&seq.to_le_bytes());
        s[16..20].copy_from_slice(&u32::try_from(payload.len()).unwrap().to_le_bytes());
        s[20..24].copy_from_slice(&1u32.to_le_bytes());
        let header_crc = crc(&s[..28]);
        s[28..32].copy_from_slice(&header_crc.to_le_bytes());
        s[32..32 + payload.len()].copy_from_slice(&payload);
    } else {
        let mut payload = u32::try_from(record.len()).unwrap().to_le_bytes().to_vec();
        payload.extend_from_slice(record);
        s[4..8].copy_from_slice(&1u32.to_le_bytes());
        s[8..16].copy_from_slice(&generation.to_le_bytes());
        s[24..32].copy_from_slice(&seq.to_le_bytes());
        s[32..36].copy_from_slice(&u32::try_from(payload.len()).unwrap().to_le_bytes());
        // Tags a stranger can compute: CRCs standing in for the unknown key's.
        s[48..56].copy_from_slice(&u64::from(crc(&payload)).to_le_bytes());
        let header_tag = u64::from(crc(&s[..56]));
        s[56..64].copy_from_slice(&header_tag.to_le_bytes());
        s[64..64 + payload.len()].copy_from_slice(&payload);
    }
    s
}

/// The recipe of the attack that forged records in format 1: a retained
/// payload laid out, sector by sector, as batches that set a retained
/// message on a topic nobody published to; cleared; then enough retained
/// traffic for two compactions, so the region holding the payload is
/// reused; then a restart.
#[test]
fn client_payloads_shaped_as_log_batches_are_never_replayed() {
    if !kvm_available("client_payloads_shaped_as_log_batches_are_never_replayed") {
        return;
    }
    let state = state_path("forgery");
    let vm = start(&state);
    let record = retain_record("admin/alarm", b"FIRE - evacuate (forged)");
    // Sector i of the payload guesses generation 2 (after two compactions)
    // and a run of sequence numbers; the two formats take turns.
    let sectors = 1000;
    let mut payload = Vec::new();
    for i in 0..sectors {
        let format = if i % 2 == 0 { 1 } else { 2 };
        payload.extend_from_slice(&forged_sector(&record, format, 2, i / 2));
    }
    // A variant that would make every later start fail: a far sequence number.
    payload.extend_from_slice(&forged_sector(&record, 1, 2, 1_000_000));
    publish_retained(vm.addr, std::iter::once(("eve/payload".to_string(), payload)));
    publish_retained(vm.addr, std::iter::once(("eve/payload".to_string(), Vec::new())));
    let churn = (0..800).map(|i| (format!("eve/churn/{}", i % 8), vec![b'c'; 16 << 10]));
    publish_retained(vm.addr, churn);
    vm.stop();
    assert!(generations(&state)[0].max(generations(&state)[1]) >= 2, "two compactions reused the region");

    let vm = start(&state);
    assert!(retained(vm.addr, "admin/#").is_empty(), "a client's payload became a retained message");
    assert_eq!(retained(vm.addr, "eve/#").len(), 8, "the real retained messages are back");
    let (_, log) = vm.stop();
    assert!(!log.contains("corrupt"), "{log}");
    let _ = std::fs::remove_dir_all(state.parent().unwrap());
}

/// A v5 retained QoS 1 publish just under the default maximum packet size
/// (1 MiB) is larger than one log batch: it is kept, it does not stop
/// other durable publishes, and it is back after a restart.
#[test]
fn a_message_larger_than_a_log_batch_is_kept_and_blocks_nothing() {
    if !kvm_available("a_message_larger_than_a_log_batch_is_kept_and_blocks_nothing") {
        return;
    }
    let state = state_path("large");
    let vm = start(&state);
    // 1 + 3 (remaining length) + 2 + 7 (topic) + 2 (id) + 1 (properties) = 16.
    let payload: Vec<u8> = (0..1_048_560u32 - 16).map(|i| u8::try_from(i % 251).unwrap()).collect();
    let packet = wire::publish_v5("big/one", &payload, 1, 1, true);
    assert_eq!(packet.len(), 1_048_560);
    let mut s = connect(vm.addr, 5, "big-writer");
    s.write_all(&packet).unwrap();
    let (header, body) = read_packet(&mut s);
    // 0x10 ("no matching subscribers") is a success too.
    assert_eq!((header, wire::puback_code(&body) & 0x80), (0x40, 0), "the large message is accepted");
    s.write_all(&wire::publish_v5("small/one", b"x", 1, 2, true)).unwrap();
    let (header, body) = read_packet(&mut s);
    assert_eq!((header, wire::puback_code(&body) & 0x80), (0x40, 0), "durable publishes go on after it");
    drop(s);
    vm.stop();

    let vm = start(&state);
    let big = retained(vm.addr, "big/#");
    assert_eq!(big.len(), 1);
    assert!(big[0].1 == payload, "the large message is back whole");
    assert_eq!(retained(vm.addr, "small/#"), [("small/one".to_string(), b"x".to_vec())]);
    vm.stop();
    let _ = std::fs::remove_dir_all(state.parent().unwrap());
}

#[test]
fn a_resized_state_file_is_refused_with_the_size_to_restore() {
    if !kvm_available("a_resized_state_file_is_refused_with_the_size_to_restore") {
        return;
    }
    let state = state_path("resized");
    let vm = start(&state);
    publish_retained(vm.addr, std::iter::once(("r/1".to_string(), b"kept".to_vec())));
    vm.stop();
    let file = std::fs::OpenOptions::new().write(true).open(&state).unwrap();
    for size in [2u64 << 30, 600 << 20, 32 << 20] {
        file.set_len(size).unwrap();
        let out = run_to_end(&state);
        let stderr = common::stderr(&out);
        assert_eq!(out.status.code(), Some(5), "resized to {size}: {stderr}");
        assert!(stderr.contains(&format!("truncate -s {}", 64 << 20)), "{stderr}");
        let checked = common::mqvisor().arg("state-check").arg(&state).output().unwrap();
        assert_eq!(checked.status.code(), Some(1), "{}", common::stderr(&checked));
    }
    file.set_len(64 << 20).unwrap();
    let vm = start(&state);
    assert_eq!(retained(vm.addr, "r/#"), [("r/1".to_string(), b"kept".to_vec())]);
    vm.stop();
    let _ = std::fs::remove_dir_all(state.parent().unwrap());
}

#[test]
fn a_damaged_newest_superblock_stops_the_start_instead_of_rolling_back() {
    if !kvm_available("a_damaged_newest_superblock_stops_the_start_instead_of_rolling_back") {
        return;
    }
    let state = state_path("superblock");
    let vm = start(&state);
    publish_retained(vm.addr, std::iter::once(("r/cleared".to_string(), b"old".to_vec())));
    // Past one compaction, then a change the older generation does not hold.
    publish_retained(vm.addr, (0..300).map(|i| (format!("r/churn/{}", i % 4), vec![b'c'; 16 << 10])));
    publish_retained(vm.addr, std::iter::once(("r/cleared".to_string(), Vec::new())));
    vm.stop();
    let generations = generations(&state);
    assert!(generations[1] >= 1, "a compaction wrote a second superblock");
    let newest = if generations[1] > generations[0] { 1 } else { 0 };
    flip(&state, newest * 512 + 20);
    let out = run_to_end(&state);
    let stderr = common::stderr(&out);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("superblock is damaged"), "{stderr}");
    // Undamaged again, the newest state is back (the clear holds).
    flip(&state, newest * 512 + 20);
    let vm = start(&state);
    assert!(retained(vm.addr, "r/cleared").is_empty());
    vm.stop();
    let _ = std::fs::remove_dir_all(state.parent().unwrap());
}

fn flip(state: &Path, at: usize) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().read(true).write(true).open(state).unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, at as u64).unwrap();
    file.write_all_at(&[byte[0] ^ 0x10], at as u64).unwrap();
}

/// The generations in the two superblock slots (format 2: a u64 at 16).
fn generations(state: &Path) -> [u64; 2] {
    let bytes = std::fs::read(state).unwrap();
    [0, 1].map(|slot: usize| u64::from_le_bytes(bytes[slot * 512 + 16..slot * 512 + 24].try_into().unwrap()))
}
