//! Rate quotas of `mqvisor run` on real VMs, enforced by backpressure: at
//! `--max-publish-rate 2000`, 6,000 QoS 0 messages take at least 2.5 s and
//! every one arrives (mosquitto_pub -l, mosquitto_sub -C); a client
//! pushing at 10x its `--max-client-publish-rate` is held to it while a
//! polite client of the same tenant keeps its round trip and gets every
//! message through; new connections past `--max-connection-rate` wait,
//! none refused.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::wire::{self, read_packet};
use common::{RunningVm, kvm_available, tool_available};

const MOSQUITTO: &str = "mosquitto_pub/mosquitto_sub (apt-get install mosquitto-clients)";
const MOSQUITTO_PROBE: &str = "command -v mosquitto_pub && command -v mosquitto_sub";

/// mosquitto_sub for `count` messages on `filter`, giving up after 30 s.
fn subscriber(vm: &RunningVm, filter: &str, count: usize) -> std::process::Child {
    Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &vm.addr.port().to_string(), "-t", filter, "-C", &count.to_string()])
        .args(["-W", "30", "-q", "0"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawning mosquitto_sub")
}

/// mosquitto_pub -l on `topic` at QoS 0, its stdin for the caller's lines.
fn line_publisher(vm: &RunningVm, topic: &str) -> std::process::Child {
    Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &vm.addr.port().to_string(), "-t", topic, "-l", "-q", "0"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawning mosquitto_pub")
}

/// A raw client, connected and subscribed to `filter`.
fn raw_client(vm: &RunningVm, id: &str, filter: &str) -> TcpStream {
    let mut s = TcpStream::connect(vm.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(&wire::connect_packet(id)).unwrap();
    assert_eq!(read_packet(&mut s).0, 0x20, "CONNACK");
    s.write_all(&wire::subscribe(filter, 0, 1)).unwrap();
    assert_eq!(read_packet(&mut s).0, 0x90, "SUBACK");
    s
}

/// The VM's `--stats` line (on stderr at its end).
fn stats(vm: RunningVm) -> String {
    let (_, rest) = vm.stop();
    rest.lines().find(|l| l.contains("stats:")).unwrap_or_default().to_string()
}

/// The number after `key ` in a stats line.
fn stat(line: &str, key: &str) -> u64 {
    line.split(key).nth(1).and_then(|r| r.split([',', ' ']).find(|w| !w.is_empty())?.parse().ok()).unwrap_or(0)
}

#[test]
fn six_thousand_messages_at_2000_a_second_take_their_time_and_all_arrive() {
    let test = "six_thousand_messages_at_2000_a_second_take_their_time_and_all_arrive";
    if !kvm_available(test) || !tool_available(test, MOSQUITTO, MOSQUITTO_PROBE) {
        return;
    }
    let vm = RunningVm::start(&["--max-publish-rate", "2000", "--stats"]);
    let sub = subscriber(&vm, "quota/load", 6000);
    // mosquitto_sub subscribes within milliseconds of its start.
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    let mut publisher = line_publisher(&vm, "quota/load");
    let mut stdin = publisher.stdin.take().unwrap();
    let lines: String = (0..6000).map(|i| format!("{i}\n")).collect();
    stdin.write_all(lines.as_bytes()).unwrap();
    drop(stdin);
    let out = sub.wait_with_output().unwrap();
    let took = started.elapsed();
    assert!(publisher.wait().unwrap().success());
    let received = String::from_utf8_lossy(&out.stdout).lines().count();
    let line = stats(vm);
    eprintln!(
        "6,000 QoS 0 messages at max_publish_rate 2000: {received} arrived in {:.2} s; {line}",
        took.as_secs_f64()
    );
    assert_eq!(received, 6000, "every message arrives");
    assert!(took >= Duration::from_millis(2500), "took {took:?}: the rate was not held");
    assert!(stat(&line, "publishes") > 0 && stat(&line, "reads") > 0, "throttling is counted: {line}");
}

/// Round trips of `n` QoS 0 messages of the client to itself, ms, sorted.
fn round_trips(client: &mut TcpStream, topic: &str, n: usize) -> Vec<f64> {
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let sent = Instant::now();
        client.write_all(&wire::publish(topic, i.to_string().as_bytes(), 0, 0, false)).unwrap();
        let (header, _) = read_packet(client);
        assert_eq!(header & 0xf0, 0x30, "the polite client's message {i} came back");
        times.push(sent.elapsed().as_secs_f64() * 1000.0);
        std::thread::sleep(Duration::from_millis(5));
    }
    times.sort_by(f64::total_cmp);
    times
}

#[test]
fn a_noisy_client_is_held_to_its_rate_and_a_polite_one_keeps_its_round_trip() {
    let test = "a_noisy_client_is_held_to_its_rate_and_a_polite_one_keeps_its_round_trip";
    if !kvm_available(test) || !tool_available(test, MOSQUITTO, MOSQUITTO_PROBE) {
        return;
    }
    const LIMIT: u64 = 500;
    let vm = RunningVm::start(&["--max-client-publish-rate", &LIMIT.to_string(), "--stats"]);
    let mut polite = raw_client(&vm, "polite", "polite/rt");
    let mut counter = raw_client(&vm, "counter", "noisy/#");
    let unloaded = round_trips(&mut polite, "polite/rt", 200);
    // The noisy client offers 10x its limit: 50 lines every 10 ms.
    let mut noisy = line_publisher(&vm, "noisy/x");
    let mut stdin = noisy.stdin.take().unwrap();
    let offer = std::thread::spawn(move || {
        let batch: String = (0..50).map(|i| format!("{i}\n")).collect();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(4) {
            if stdin.write_all(batch.as_bytes()).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    // What reaches the tenant from the noisy client, as it arrives.
    counter.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (loaded, arrivals) = std::thread::scope(|scope| {
        let count = scope.spawn(|| {
            let mut at = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if wire::try_read_packet(&mut counter).is_ok() {
                    at.push(Instant::now());
                }
            }
            at
        });
        std::thread::sleep(Duration::from_millis(500));
        let window = Instant::now();
        let loaded = round_trips(&mut polite, "polite/rt", 200);
        std::thread::sleep(Duration::from_secs(2).saturating_sub(window.elapsed()));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let arrivals: Vec<Instant> = count.join().unwrap();
        (loaded, arrivals.into_iter().filter(|t| *t >= window && *t < window + Duration::from_secs(2)).count())
    });
    let rate = arrivals as f64 / 2.0;
    offer.join().unwrap();
    let _ = noisy.kill();
    let _ = noisy.wait();
    let line = stats(vm);
    let p50 = |t: &[f64]| t[t.len() / 2];
    let p99 = |t: &[f64]| t[t.len() * 99 / 100];
    eprintln!(
        "polite round trip p50/p99: unloaded {:.3}/{:.3} ms, beside a client at 10x max_client_publish_rate \
         {LIMIT}: {:.3}/{:.3} ms ({:.2}x); the noisy client got {rate:.0} msg/s through; {line}",
        p50(&unloaded),
        p99(&unloaded),
        p50(&loaded),
        p99(&loaded),
        p50(&loaded) / p50(&unloaded)
    );
    // Deterministic: the noisy client is held to its bucket (its rate
    // plus one 100 ms burst over the window), and throttling is counted.
    assert!(rate <= LIMIT as f64 * 1.1, "noisy client at {rate:.0} msg/s past its limit {LIMIT}");
    assert!(rate >= LIMIT as f64 * 0.5, "noisy client starved at {rate:.0} msg/s");
    assert!(stat(&line, "publishes") > 0, "{line}");
    // Every polite round trip completed (asserted in round_trips); its
    // p50 within 2x, with a margin for a loaded 2-core machine.
    assert!(p50(&loaded) <= 2.0 * p50(&unloaded) + 2.0, "polite p50 {:.3} ms", p50(&loaded));
}

#[test]
fn connections_past_the_rate_wait_and_none_is_refused() {
    let test = "connections_past_the_rate_wait_and_none_is_refused";
    if !kvm_available(test) {
        return;
    }
    let vm = RunningVm::start(&["--max-connection-rate", "20", "--stats"]);
    let start = Instant::now();
    // 22 clients: 2 in the first 100 ms burst, the others one per 50 ms.
    let clients: Vec<TcpStream> = (0..22).map(|i| raw_client(&vm, &format!("c{i}"), "x")).collect();
    let took = start.elapsed();
    drop(clients);
    let line = stats(vm);
    eprintln!("22 connections at max_connection_rate 20: all answered in {:.2} s; {line}", took.as_secs_f64());
    assert!(took >= Duration::from_millis(900), "took {took:?}");
    assert!(stat(&line, "connections") >= 19, "{line}");
}
