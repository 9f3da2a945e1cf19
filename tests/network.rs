//! End-to-end tests of the network path: host TCP clients, the VMM's proxy,
//! virtio-net, and the guest's echo service, in a real VM.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::{RunningVm, kvm_available};

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    // xorshift: reproducible, incompressible enough for an echo test.
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

fn connect(vm: &RunningVm) -> TcpStream {
    let stream = TcpStream::connect(vm.addr).expect("connecting to the tenant listener");
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    stream.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
    stream
}

/// Sends `data` and reads back as much, concurrently; returns what came back.
fn echo(stream: TcpStream, data: &[u8]) -> Vec<u8> {
    let mut reader = stream.try_clone().unwrap();
    let len = data.len();
    let read = thread::spawn(move || {
        let mut got = vec![0u8; len];
        reader.read_exact(&mut got).map(|()| got)
    });
    let mut writer = stream;
    writer.write_all(data).unwrap();
    read.join().unwrap().expect("reading the echo")
}

#[test]
fn many_concurrent_connections_echo_large_payloads_intact() {
    if !kvm_available("many_concurrent_connections_echo_large_payloads_intact") {
        return;
    }
    let vm = RunningVm::start(&["--service", "echo", "--memory", "64", "--timeout", "120"]);
    let clients: Vec<_> = (0..24)
        .map(|i| {
            let stream = connect(&vm);
            thread::spawn(move || {
                let data = random_bytes(512 * 1024 + i * 4099, i as u64 + 1);
                let got = echo(stream, &data);
                assert!(got == data, "connection {i}: echoed bytes differ");
            })
        })
        .collect();
    for client in clients {
        client.join().expect("a client failed");
    }
}

#[test]
fn half_close_gets_all_data_back_then_eof() {
    if !kvm_available("half_close_gets_all_data_back_then_eof") {
        return;
    }
    let vm = RunningVm::start(&["--service", "echo", "--timeout", "60"]);
    let mut stream = connect(&vm);
    let data = random_bytes(300_000, 7);
    stream.write_all(&data).unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    stream.read_to_end(&mut got).expect("a clean EOF after the echo");
    assert!(got == data, "echo after half-close differs ({} of {} bytes)", got.len(), data.len());
}

#[test]
fn a_client_reset_does_not_disturb_other_connections() {
    if !kvm_available("a_client_reset_does_not_disturb_other_connections") {
        return;
    }
    let vm = RunningVm::start(&["--service", "echo", "--timeout", "60"]);
    let bystander = connect(&vm);
    for round in 0..5 {
        let mut doomed = connect(&vm);
        doomed.write_all(&random_bytes(100_000, round)).unwrap();
        // SO_LINGER 0: close sends RST instead of FIN.
        let fd = std::os::fd::AsRawFd::as_raw_fd(&doomed);
        let linger = libc::linger { l_onoff: 1, l_linger: 0 };
        // SAFETY: a valid socket fd and a correctly sized linger struct.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&raw const linger).cast(),
                libc::socklen_t::try_from(size_of::<libc::linger>()).unwrap(),
            )
        };
        assert_eq!(rc, 0);
        drop(doomed);
    }
    let data = random_bytes(200_000, 99);
    assert!(echo(bystander, &data) == data);
    let fresh = connect(&vm);
    assert!(echo(fresh, b"still serving") == b"still serving");
}

#[test]
fn stopping_the_vm_closes_connected_clients_cleanly() {
    if !kvm_available("stopping_the_vm_closes_connected_clients_cleanly") {
        return;
    }
    let vm = RunningVm::start(&["--service", "echo", "--timeout", "60", "--stats"]);
    let mut clients: Vec<TcpStream> = (0..4).map(|_| connect(&vm)).collect();
    for client in &mut clients {
        client.write_all(b"ping").unwrap();
        let mut pong = [0u8; 4];
        client.read_exact(&mut pong).unwrap();
        assert_eq!(&pong, b"ping");
    }
    let (status, stderr) = vm.stop();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{stderr}");
    assert!(stderr.contains("stopped by signal"), "{stderr}");
    assert!(stderr.contains("mqvisor: stats: exits "), "{stderr}");
    for mut client in clients {
        let mut rest = Vec::new();
        // A clean close is an EOF, not a reset.
        client.read_to_end(&mut rest).expect("EOF rather than a reset");
        assert!(rest.is_empty());
    }
}

#[test]
fn a_client_that_never_reads_cannot_make_the_vmm_buffer_without_bound() {
    if !kvm_available("a_client_that_never_reads_cannot_make_the_vmm_buffer_without_bound") {
        return;
    }
    let vm = RunningVm::start(&["--service", "echo", "--timeout", "60"]);
    let stream = connect(&vm);
    stream.set_nonblocking(true).unwrap();
    let before = vm.rss_kib();
    // Push as much as the path will take for a while without reading the echo.
    let chunk = random_bytes(1 << 20, 3);
    let mut accepted = 0usize;
    let started = Instant::now();
    let mut last_progress = Instant::now();
    let mut writer = &stream;
    while started.elapsed() < Duration::from_secs(10) && last_progress.elapsed() < Duration::from_secs(1) {
        match writer.write(&chunk) {
            Ok(n) => {
                accepted += n;
                last_progress = Instant::now();
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("write failed: {e}"),
        }
    }
    let grown_kib = vm.rss_kib().saturating_sub(before);
    // Everything in flight sits in bounded buffers: kernel socket buffers,
    // and one stream window per direction on the link.
    assert!(accepted < 64 << 20, "the path accepted {accepted} bytes without the client reading");
    assert!(grown_kib < 32 * 1024, "the VMM grew by {grown_kib} KiB");
    // And the connection still works once the client reads.
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut reader = &stream;
    let mut echoed = vec![0u8; accepted];
    reader.read_exact(&mut echoed).expect("the held-back echo arrives");
}

#[test]
fn a_busy_listen_address_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = common::run_vm(&["--service", "echo", "--listen", &addr]);
    common::assert_fails_with(&out, 125, &format!("cannot listen on {addr}"));
}

#[test]
fn every_vmm_thread_runs_under_its_seccomp_filter() {
    if !kvm_available("every_vmm_thread_runs_under_its_seccomp_filter") {
        return;
    }
    let state = std::env::temp_dir().join(format!("mqvisor-seccomp-{}.state", std::process::id()));
    let _ = std::fs::remove_file(&state);
    let vm = RunningVm::start(&["--timeout", "30", "--state", state.to_str().unwrap()]);
    // Serve one client, so every thread has run its loop (the block thread
    // has recovered the state and written its superblock).
    assert_eq!(mqtt_connack(&vm), [0x20, 2, 0, 0]);
    let tasks = std::fs::read_dir(format!("/proc/{}/task", vm.child.id())).unwrap();
    let mut threads = Vec::new();
    for task in tasks.flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let field = |name: &str| {
            status.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_string()).unwrap_or_default()
        };
        // KVM's own kernel helper threads carry the process's filter too.
        threads.push((field("Name:"), field("Seccomp:"), field("NoNewPrivs:")));
    }
    let _ = std::fs::remove_file(&state);
    for name in ["mqvisor", "vcpu0", "net", "block"] {
        assert!(threads.iter().any(|(n, _, _)| n == name), "no {name} thread in {threads:?}");
    }
    for (name, seccomp, no_new_privs) in &threads {
        assert_eq!(seccomp, "2", "thread {name} is not filtered: {threads:?}");
        assert_eq!(no_new_privs, "1", "thread {name} may gain privileges: {threads:?}");
    }
}

/// A CONNECT and its CONNACK through the VM.
fn mqtt_connack(vm: &RunningVm) -> Vec<u8> {
    let mut stream = connect(vm);
    stream.write_all(&[0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 30, 0, 0]).unwrap();
    let mut connack = vec![0u8; 4];
    stream.read_exact(&mut connack).unwrap();
    connack
}

#[test]
fn a_denied_system_call_ends_the_vm_with_one_line_and_126() {
    if !kvm_available("a_denied_system_call_ends_the_vm_with_one_line_and_126") {
        return;
    }
    let out = common::mqvisor()
        .args(["run", "--listen", "127.0.0.1:0", "--timeout", "30"])
        .env("MQVISOR_SECCOMP_SELFTEST", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(126), "{stderr}");
    let line = stderr.lines().find(|l| l.contains("seccomp")).expect("a seccomp line");
    assert!(line.contains("thread vcpu") && line.contains(&format!("system call {}", libc::SYS_getppid)), "{line}");
}

#[test]
fn started_as_root_with_user_the_vmm_keeps_no_privilege() {
    if !kvm_available("started_as_root_with_user_the_vmm_keeps_no_privilege") {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        // An ordinary user cannot drop to another: said clearly.
        let out = common::run_vm(&["--service", "mqtt", "--listen", "127.0.0.1:0", "--user", "nobody"]);
        common::assert_fails_with(&out, 125, "--user needs the VMM to start as root");
        return;
    }
    let vm = RunningVm::start(&["--timeout", "30", "--user", "nobody"]);
    assert_eq!(mqtt_connack(&vm), [0x20, 2, 0, 0], "the VM serves after dropping privileges");
    let status = std::fs::read_to_string(format!("/proc/{}/status", vm.child.id())).unwrap();
    let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).unwrap_or("").trim().to_string();
    assert!(field("Uid:").split_whitespace().all(|u| u == "65534"), "{status}");
    assert!(field("Gid:").split_whitespace().all(|g| g == "65534"), "{status}");
    for caps in ["CapPrm:", "CapEff:", "CapBnd:", "CapAmb:", "CapInh:"] {
        assert_eq!(field(caps).trim_start_matches('0'), "", "{caps} {}", field(caps));
    }
    assert_eq!(field("NoNewPrivs:"), "1");
}

/// Sends `packets` and shuts the write side (FIN), then reads to the end:
/// what came back before the close.
fn send_then_half_close(addr: std::net::SocketAddr, packets: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(packets).unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    let _ = stream.read_to_end(&mut got);
    got
}

/// A client that sends CONNECT (and a QoS 1 PUBLISH) and then shuts its
/// write side down gets its CONNACK (and PUBACK) before the close, as from
/// Mosquitto, `tries` times in a row.
fn half_closed_clients_get_their_answers(addr: std::net::SocketAddr, tries: usize) {
    use common::wire::{connect_as, publish};
    for i in 0..tries {
        // Clean session: the CONNACK needs nothing written.
        let got = send_then_half_close(addr, &connect_as(4, &format!("half-{i}"), true, None, None));
        assert_eq!(got, [0x20, 2, 0, 0], "try {i}: CONNECT then FIN");
        // A durable session and a retained QoS 1 message: with --state,
        // both answers wait for their records to be on disk.
        let mut packets = connect_as(4, &format!("half-durable-{i}"), false, None, None);
        packets.extend_from_slice(&publish(&format!("half/{i}"), b"kept", 1, 7, true));
        let got = send_then_half_close(addr, &packets);
        assert_eq!(got, [0x20, 2, 0, 0, 0x40, 2, 0, 7], "try {i}: CONNECT, PUBLISH (QoS 1) then FIN");
    }
}

#[test]
fn a_half_closed_client_gets_its_connack_and_puback() {
    if !kvm_available("a_half_closed_client_gets_its_connack_and_puback") {
        return;
    }
    let vm = RunningVm::start(&["--timeout", "60"]);
    half_closed_clients_get_their_answers(vm.addr, 20);
    let state = std::env::temp_dir().join(format!("mqvisor-half-close-{}.state", std::process::id()));
    let _ = std::fs::remove_file(&state);
    let durable = RunningVm::start(&["--timeout", "60", "--state", state.to_str().unwrap()]);
    half_closed_clients_get_their_answers(durable.addr, 20);
    drop(durable);
    let _ = std::fs::remove_file(&state);
    let host = RunningVm::start_host_broker();
    half_closed_clients_get_their_answers(host.addr, 20);
}

/// A client with a small receive buffer (so the kernel does not take a
/// large answer on its behalf) that sends `packets` and shuts its write
/// side down.
fn half_closed_with_small_buffer(vm: &RunningVm, packets: &[u8]) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&vm.addr.into()).unwrap();
    let mut client: TcpStream = socket.into();
    client.write_all(packets).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    client
}

#[test]
fn a_half_closed_client_that_stops_reading_its_answers_is_dropped_and_frees_its_place() {
    use common::wire::{connect_as, publish, read_packet, subscribe};
    if !kvm_available("a_half_closed_client_that_stops_reading_its_answers_is_dropped_and_frees_its_place") {
        return;
    }
    let args = ["--timeout", "60", "--max-connections", "3", "--memory", "128", "--max-packet-size", "8388608"];
    let vm = RunningVm::start(&args);
    // A 6 MB retained message: more than a stream's window (256 KiB) and
    // the kernel's socket buffers hold for a client that does not read.
    let mut publisher = connect(&vm);
    publisher.write_all(&connect_as(4, "pub", true, None, None)).unwrap();
    assert_eq!(read_packet(&mut publisher).0, 0x20);
    publisher.write_all(&publish("big", &vec![0x5a; 6_000_000], 1, 1, true)).unwrap();
    assert_eq!(read_packet(&mut publisher), (0x40, vec![0, 1]), "PUBACK");
    drop(publisher);
    // Two clients ask for it and finish sending: one reads it in bursts of
    // 2 MB 3 s apart (longer in all than the 5 s a client may take nothing),
    // one never.
    let asks = |id: &str| [connect_as(4, id, true, None, None), subscribe("big", 0, 1)].concat();
    let mut slow = half_closed_with_small_buffer(&vm, &asks("slow"));
    let lazy = half_closed_with_small_buffer(&vm, &asks("lazy"));
    let started = Instant::now();
    let mut got = 0;
    let mut buf = vec![0u8; 100_000];
    slow.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    loop {
        match slow.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if (got + n) / 2_000_000 > got / 2_000_000 {
                    thread::sleep(Duration::from_secs(3));
                }
                got += n;
            }
            Err(e) => panic!("the slow reader lost its answer after {got} bytes, {:?}: {e}", started.elapsed()),
        }
    }
    // CONNACK, SUBACK and the message (its header 10 bytes), then the close.
    assert_eq!(got, 4 + 5 + 10 + 6_000_000, "the slow reader's answers after {:?}", started.elapsed());
    // The one that never read is dropped (within twice the 5 s: its kernel
    // took a few KiB at first), and every place is free again: three
    // clients fit in --max-connections 3.
    thread::sleep(Duration::from_secs(11).saturating_sub(started.elapsed()));
    let held: Vec<TcpStream> = (0..3)
        .map(|i| {
            let mut client = connect(&vm);
            client.write_all(&connect_as(4, &format!("after-{i}"), true, None, None)).unwrap();
            assert_eq!(read_packet(&mut client), (0x20, vec![0, 0]), "client {i} after the half-closed ones");
            client
        })
        .collect();
    let mut lazy = lazy;
    let mut rest = Vec::new();
    lazy.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let end = lazy.read_to_end(&mut rest);
    assert!(end.is_err() && rest.len() < 6_000_000, "the lazy client was not dropped: {end:?}, {} bytes", rest.len());
    drop(held);
}
